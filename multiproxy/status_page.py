"""The live status page at `/` of the admin server: clusters, pools, pins and a failover timeline, one inline page.

`Sampler` keeps a bounded ring of once-a-second samples (client and backend connections per pool and listener, the
pools' borrow counters) in a greenlet of its own, so the page can draw the last minutes. `collect` reads the proxy
into a plain dict; `render_sections` turns that dict into HTML fragments (every value escaped, statements redacted of
password literals, nothing secret read in the first place) and `render_page` into the whole document: CSS, JS and SVG
charts inline, no external assets. The page refreshes itself without JavaScript (`<noscript>` meta refresh); with it,
inline JS polls `/status.json` (the same fragments and the data) and swaps the sections in place. Nothing here runs
per packet: all of it is computed when a page is asked for, or once a second by the sampler.
"""
from __future__ import annotations

import collections
import html
import json
import logging
import re
import socket as _stdsocket
import time

import gevent
from gevent import socket

log = logging.getLogger("multiproxy.status_page")

SAMPLE_INTERVAL = 1.0      # seconds between samples
SAMPLES = 300              # samples kept: the charts show the last five minutes
CHART_POOLS = 12           # at most this many pools get charts (the busiest); the table lists all
CHART_POINTS = 100         # points per line of a chart (samples are merged into as many buckets)
TABLE_ROWS = 200           # at most this many rows in the pins and timeline tables
TIMELINE_KINDS = ("dns", "writer", "role", "node", "retired", "read-only check", "drain")
PATHS = ("/", "/status.json")
PEER_FRESH = 3.0           # seconds a worker's report counts (it reports every second)
PEER_PINNED = 50           # pinned sessions a worker reports
REPORT_LIMIT = 60_000      # bytes of one worker's report (one datagram)

_KEYWORDS = r"password|passwd|pwd|secret|token"
_QUOTED_SECRET = re.compile(r"(?i)\b(" + _KEYWORDS + r"|identified\s+(?:by|with\s+\w+\s+(?:by|as)))"
                            r"(\s*[=:]?\s*\(?\s*)('(?:[^']|'')*'|\"[^\"]*\")")
_ASSIGNED_SECRET = re.compile(r"(?i)\b(" + _KEYWORDS + r")(\s*[=:]\s*)([^\s'\";,)]+)")


def redact(text) -> str:
    """`text` with the literal of PASSWORD '...', IDENTIFIED BY '...', password=..., secret: ... (and the like)
    replaced by ***; prose such as `password authentication failed` stays as it is."""
    if text is None:
        return ""
    text = _QUOTED_SECRET.sub(lambda m: f"{m.group(1)}{m.group(2)}***", str(text))
    return _ASSIGNED_SECRET.sub(lambda m: f"{m.group(1)}{m.group(2)}***", text)


# ---------------------------------------------------------------------------------------------------------- sampling


def clients_by_pool(proxy) -> collections.Counter:
    """Clients per pool (by id): the sessions', and the clients relay lanes keep quietly (relay logins), counted
    without making their sessions."""
    proxy.sessions.count_quiet()
    clients = collections.Counter(id(s.pool) for s in list(proxy.sessions.known()) if s.pool is not None)
    lanes = getattr(proxy, "relay_lanes", None)
    for lane in list(lanes.lanes.values()) if lanes is not None else ():
        if lane.quiet_clients:
            clients[id(lane.pool)] += lane.quiet_clients
    return clients

class Sampler:
    """Once a second: per pool (clients, backends, idle, borrowed, waiting, borrows, waited borrows, seconds waited)
    and per listener (clients), in a ring of SAMPLES entries."""

    def __init__(self, proxy, keep: int = SAMPLES):
        self.proxy = proxy
        self.samples: collections.deque = collections.deque(maxlen=keep)
        self._greenlet = None
        # With forked workers (Proxy.worker_count > 1) workers other than 0 send each sample, with their pools' names
        # and their pins, to worker 0 (whose admin server serves the page); worker 0 keeps the latest of each (`peers`:
        # worker -> (monotonic time received, report)) and adds them into its own samples.
        self.workers = getattr(proxy, "worker_count", 1) or 1
        self.worker = getattr(proxy, "worker", 0)
        self.peers: dict[int, tuple[float, dict]] = {}
        self._sock = None
        self._receiver = None
        self._too_big = False

    def start(self) -> None:
        if self.workers > 1:
            self._share()
        if self._greenlet is None:
            self._greenlet = gevent.spawn(self._loop)

    def stop(self) -> None:
        for greenlet in (self._greenlet, self._receiver):
            if greenlet is not None:
                greenlet.kill(block=False)
        self._greenlet = self._receiver = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _share(self) -> None:
        address = group_address(getattr(self.proxy, "cancel_group", 0))
        self._sock = socket.socket(_stdsocket.AF_UNIX, _stdsocket.SOCK_DGRAM)
        if self.worker != 0:
            return                          # sends go to worker 0 with sendto: nothing to bind
        try:
            self._sock.bind(address)
        except OSError as exc:
            log.warning("status page: cannot receive the other workers' reports (%s); it shows worker 0 only", exc)
            self._sock.close()
            self._sock = None
            return
        self._receiver = gevent.spawn(self._receive)

    def _receive(self) -> None:
        sock = self._sock
        while True:
            data = sock.recv(REPORT_LIMIT + 1024)
            try:
                report = json.loads(data)
                self.peers[int(report["worker"])] = (time.monotonic(), report)
            except (ValueError, KeyError, TypeError):
                continue

    def fresh_peers(self) -> list[dict]:
        now = time.monotonic()
        return [report for received, report in self.peers.values() if now - received <= PEER_FRESH]

    def _report(self, pools: dict, listeners: dict) -> None:
        """A worker other than 0 sends its sample to worker 0."""
        proxy = self.proxy
        meta = {pool.label: [pool.cluster.name, pool.role, pool.user, pool.database, pool.config.max_size]
                for pool in list(proxy.pools.values())}
        pins = {cluster: {"now": {r: n for r, n in policy.pinned_now.items() if n},
                          "detected_total": dict(policy.detected_total)}
                for cluster, policy in getattr(proxy, "pin_policies", {}).items()}
        pinned = []
        if getattr(proxy, "console", None) is not None:
            columns, rows = proxy.console.view_pins()
            names = [c for c, _ in columns]
            pinned = [dict(zip(names, row), worker=self.worker) for row in rows[:PEER_PINNED]]
        report = {"worker": self.worker, "pools": pools, "meta": meta, "listeners": listeners, "pins": pins,
                  "pinned": pinned, "read_only_retries": getattr(getattr(proxy, "metrics", None), "read_only_retries", 0)}
        data = json.dumps(report, default=str).encode()
        if len(data) > REPORT_LIMIT:
            report["pinned"] = []
            data = json.dumps(report, default=str).encode()
        if len(data) > REPORT_LIMIT:
            if not self._too_big:
                log.warning("status page: worker %d has too many pools to report to worker 0 (%d bytes)", self.worker,
                            len(data))
                self._too_big = True
            return
        try:
            self._sock.sendto(data, group_address(getattr(proxy, "cancel_group", 0)))
        except OSError:
            pass          # worker 0 is not there (yet): the next second's report will do

    def _loop(self) -> None:
        failed = False
        while not getattr(self.proxy, "stopping", False):
            try:
                self.sample()
            except Exception:  # a bad sample must not end the sampling (said once, not every second)
                if not failed:
                    log.exception("status page: sampling failed")
                failed = True
            gevent.sleep(SAMPLE_INTERVAL)

    def sample(self, now: float | None = None) -> None:
        proxy = self.proxy
        clients = clients_by_pool(proxy)
        pools = {}
        for pool in list(proxy.pools.values()):
            pools[pool.label] = (clients.get(id(pool), 0), pool.size, pool.idle_count, pool.borrowed,
                                 pool.waiting_count, pool.borrows_total, pool.waited_borrows_total,
                                 pool.borrow_wait_seconds_total)
        listeners = {rt.config.name: rt.connections for rt in proxy.listeners}
        if self.workers > 1 and self._sock is not None:
            if self.worker != 0:
                self._report(pools, listeners)
                return                  # worker 0 keeps the samples of the group
            else:
                for report in self.fresh_peers():
                    for label, values in report["pools"].items():
                        mine = pools.get(label)
                        pools[label] = tuple(values) if mine is None else tuple(a + b for a, b in zip(mine, values))
                    for name, count in report["listeners"].items():
                        listeners[name] = listeners.get(name, 0) + count
        self.samples.append((time.time() if now is None else now, pools, listeners))

    def series(self, pool_label: str) -> list[tuple]:
        """(time, clients, backends, borrowed, waiting) of one pool over the kept samples."""
        return [(t, p[0], p[1], p[3], p[4]) for t, pools, _ in self.samples
                for p in (pools.get(pool_label),) if p is not None]

    def listener_series(self, name: str) -> list[tuple]:
        return [(t, listeners[name]) for t, _, listeners in self.samples if name in listeners]

    def borrow_waits(self, pool_label: str) -> dict:
        """Borrow-time percentiles over the kept samples. The pools count borrows, waited borrows and seconds waited,
        not each wait, so each second's waited borrows count at that second's mean wait and the others at zero: an
        approximation that is exact when at most one borrow waited per second."""
        weights: list[tuple[float, int]] = []
        previous = None
        for _, pools, _ in self.samples:
            p = pools.get(pool_label)
            if p is None:
                previous = None
                continue
            if previous is not None:
                borrows, waited, seconds = p[5] - previous[5], p[6] - previous[6], p[7] - previous[7]
                if borrows > 0 and waited >= 0:
                    if borrows - waited > 0:
                        weights.append((0.0, borrows - waited))
                    if waited > 0:
                        weights.append((max(0.0, seconds) / waited, waited))
            previous = p
        total = sum(w for _, w in weights)
        if not total:
            return {"borrows": 0}
        weights.sort()
        out = {"borrows": total, "waited": sum(w for v, w in weights if v > 0)}
        for name, q in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99)):
            rank, seen = q * total, 0
            for value, weight in weights:
                seen += weight
                if seen >= rank:
                    out[name] = value
                    break
        out["max"] = weights[-1][0]
        return out


# ---------------------------------------------------------------------------------------------------------- the data

def _fmt(address) -> str:
    return f"{address[0]}:{address[1]}" if address else ""


def collect(proxy, sampler: Sampler | None) -> dict:
    """What the page shows, as plain data (also served as /status.json's `data`)."""
    now = time.time()
    proxy.sessions.count_quiet()    # (the relay's quiet logins and goodbyes in the counts)
    registry = proxy.registry.snapshot() if proxy.registry is not None else {}
    clusters = []
    for name, cluster in proxy.config.clusters.items():
        state = registry.get(name)
        if state is None:
            nodes = [{"address": _fmt(a), "role": "writer" if i == 0 else "reader", "healthy": None, "lag": None,
                      "serving": ["writer"] if i == 0 else ["reader"], "skipped": None, "error": "",
                      "sources": ["hosts"]} for i, a in enumerate(cluster.hosts)]
            clusters.append({"name": name, "engine": cluster.engine, "writer": _fmt(cluster.hosts[0]) if cluster.hosts
                             else "", "followed": False, "endpoints": [], "nodes": nodes})
            continue
        serving = state.get("serving", {})
        nodes = [{**node, "serving": [role for role, addresses in serving.items() if node["address"] in addresses]}
                 for node in state["nodes"]]
        endpoints = [{"kind": kind, "name": e["name"], "addresses": e["addresses"], "error": e["error"]}
                     for kind, e in state.get("endpoints", {}).items()]
        clusters.append({"name": name, "engine": cluster.engine, "writer": state["writer"] or "", "followed": True,
                         "endpoints": endpoints, "nodes": nodes, "read_only_checks": state.get("read_only_checks")})

    clients = clients_by_pool(proxy)
    pools = []
    for pool in list(proxy.pools.values()):
        waits = sampler.borrow_waits(pool.label) if sampler is not None else {"borrows": 0}
        longest = time.monotonic() - min(pool.waiting_since.values()) if getattr(pool, "waiting_since", None) else 0.0
        pools.append({"pool": pool.label, "cluster": pool.cluster.name, "role": pool.role, "user": pool.user,
                      "database": pool.database, "clients": clients.get(id(pool), 0), "size": pool.size,
                      "idle": pool.idle_count, "borrowed": pool.borrowed, "waiting": pool.waiting_count,
                      "max_size": pool.config.max_size, "longest_wait": round(longest, 3), "borrow_wait": waits,
                      "series": sampler.series(pool.label) if sampler is not None else []})
    listeners = [{"name": rt.config.name, "engine": rt.engine.name, "listen": "%s:%d" % tuple(rt.config.listen),
                  "cluster": rt.cluster.name, "role": rt.config.role, "clients": rt.connections,
                  "series": sampler.listener_series(rt.config.name) if sampler is not None else []}
                 for rt in proxy.listeners]

    pins = {"by_cluster": {cluster: {"now": {r: n for r, n in policy.pinned_now.items() if n},
                                     "detected_total": dict(policy.detected_total)}
                           for cluster, policy in proxy.pin_policies.items()},
            "sessions": []}
    columns, rows = proxy.console.view_pins()
    names = [c for c, _ in columns]
    pins["sessions"] = [dict(zip(names, row)) for row in rows]

    peers = sampler.fresh_peers() if sampler is not None else []
    if peers:
        _merge_peers(peers, pools, listeners, pins)
        for row in pools:
            if not row["series"]:
                row["series"] = sampler.series(row["pool"])
                row["borrow_wait"] = sampler.borrow_waits(row["pool"])

    events = [e for e in list(proxy.console.events) if e.get("event") == "drain"]
    if proxy.registry is not None:
        events += [e for e in list(proxy.registry.events) if e.get("event") in TIMELINE_KINDS]
    events.sort(key=lambda e: e.get("time", 0))
    retries = getattr(proxy.metrics, "read_only_retries", 0) + sum(r.get("read_only_retries", 0) for r in peers)

    workers = max(getattr(proxy, "worker_count", 1) or 1, getattr(proxy.config.proxy, "workers", 1) or 1)
    reporting = 1 + len(peers) if sampler is not None and sampler._sock is not None else 1
    return {"time": now, "uptime_seconds": round(now - proxy.started, 1), "worker": getattr(proxy, "worker", 0),
            "workers": workers, "reporting": reporting, "clusters": clusters, "listeners": listeners, "pools": pools, "pins": pins,
            "timeline": events[-TABLE_ROWS:], "read_only_retries": retries, "window_seconds": SAMPLES * SAMPLE_INTERVAL}


def _merge_peers(peers: list[dict], pools: list[dict], listeners: list[dict], pins: dict) -> None:
    """Add the other workers' latest reports to worker 0's pools, listeners and pins (series are summed already)."""
    rows = {p["pool"]: p for p in pools}
    for report in peers:
        for label, values in report["pools"].items():
            clients, size, idle, borrowed, waiting = values[:5]
            row = rows.get(label)
            if row is None:
                cluster, role, user, database, max_size = report["meta"].get(label, ["?", "?", "?", "?", 0])
                row = rows[label] = {"pool": label, "cluster": cluster, "role": role, "user": user,
                                     "database": database, "clients": 0, "size": 0, "idle": 0, "borrowed": 0,
                                     "waiting": 0, "max_size": 0, "longest_wait": 0.0, "borrow_wait": {"borrows": 0},
                                     "series": []}
                pools.append(row)
            row["clients"] += clients
            row["size"] += size
            row["idle"] += idle
            row["borrowed"] += borrowed
            row["waiting"] += waiting
            # max_size holds for the whole group (the supervisor's budget broker): the same in every report.
            row["max_size"] = max(row["max_size"], report["meta"].get(label, [0] * 5)[4])
        for listener in listeners:
            listener["clients"] += report["listeners"].get(listener["name"], 0)
        for cluster, counts in report["pins"].items():
            mine = pins["by_cluster"].setdefault(cluster, {"now": {}, "detected_total": {}})
            for kind in ("now", "detected_total"):
                for reason, count in counts[kind].items():
                    mine[kind][reason] = mine[kind].get(reason, 0) + count
        pins["sessions"].extend(report.get("pinned", []))


def group_address(group: int) -> bytes:
    """Where worker 0 receives the other workers' reports (a Linux abstract socket name: nothing on disk)."""
    return f"\0multiproxy-{group}-status".encode()


# ---------------------------------------------------------------------------------------------------------- rendering

def e(value) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _when(unix_time) -> str:
    return time.strftime("%H:%M:%S", time.gmtime(unix_time)) if unix_time else ""


def _seconds(value) -> str:
    if value is None:
        return "–"
    return f"{value * 1000:.1f} ms" if value < 1 else f"{value:.2f} s"


def _table(head: list[str], rows: list[str], cls: str) -> str:
    return (f'<table class="{cls}"><thead><tr>' + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr></thead><tbody>"
            + "".join(rows) + "</tbody></table>")


def chart(series: list[tuple], lines: list[tuple[int, str, str]], title: str, width: int = 300,
          height: int = 64) -> str:
    """An inline SVG of several lines over time: `lines` are (index into each sample, CSS class, legend)."""
    if len(series) < 2:
        return f'<svg class="chart" width="{width}" height="{height}" role="img" aria-label="{e(title)}">' \
               f'<text x="4" y="{height // 2}">collecting samples…</text></svg>'
    if len(series) > CHART_POINTS:      # fewer points, keeping each bucket's peak so that short spikes still show
        step = len(series) / CHART_POINTS
        buckets = [series[int(k * step):int((k + 1) * step)] for k in range(CHART_POINTS)]
        series = [tuple([b[-1][0]] + [max(x[i] for x in b) for i in range(1, len(b[0]))]) for b in buckets if b]
    t0, t1 = series[0][0], series[-1][0]
    span = max(t1 - t0, 1e-9)
    top = max(1, max(s[i] for s in series for i, _, _ in lines))
    paths = []
    for i, cls, _ in lines:
        points = " ".join(f"{(s[0] - t0) / span * (width - 2) + 1:.0f},{height - 12 - s[i] / top * (height - 24):.0f}"
                          for s in series)
        paths.append(f'<polyline class="{cls}" points="{points}"/>')
    legend = " ".join(f'<tspan class="{cls}">■ {e(name)} {series[-1][i]}</tspan>' for i, cls, name in lines)
    return (f'<svg class="chart" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
            f'aria-label="{e(title)}"><title>{e(title)}</title><text x="2" y="8" class="axis">max {top}</text>'
            + "".join(paths) + f'<text x="2" y="{height - 1}" class="legend">{legend} · last {int(span)} s</text></svg>')


def _node_row(node: dict, writer: str) -> str:
    up = node.get("healthy")
    state = "static" if up is None else ("up" if up else "down")
    serving = ", ".join(node.get("serving") or []) or "no"
    lag = node.get("lag")
    lag_text = "unknown" if lag is None and up is not None else ("" if lag is None else f"{lag:.2f} s")
    if node.get("lag_bytes"):
        lag_text += f" ({node['lag_bytes']} B)"
    role = node.get("role") or "?"
    if up is False:     # what the last successful probe said, not what the node is now
        role, lag_text = f"(was {role})" if node.get("role") else "?", ""
    why = node.get("skipped") or ""
    star = " ★" if node["address"] == writer and writer else ""
    return (f'<tr data-node="{e(node["address"])}" data-role="{e(node.get("role"))}" class="{state}">'
            f'<td>{e(node["address"])}{star}</td><td>{e(role)}</td><td class="st">{state}</td>'
            f'<td>{e(lag_text)}</td><td>{e(serving)}</td><td>{e(redact(why))}</td>'
            f'<td>{e(", ".join(node.get("sources") or []))}</td></tr>')


def render_clusters(data: dict) -> str:
    parts = []
    for c in data["clusters"]:
        endpoints = "".join(f'<li>{e(ep["kind"])} <code>{e(ep["name"])}</code> → {e(", ".join(ep["addresses"]) or "–")}'
                            + (f' <span class="bad">{e(ep["error"])}</span>' if ep.get("error") else "") + "</li>"
                            for ep in c["endpoints"])
        writer = c["writer"]
        how = "verified by probe" if c["followed"] else "static: the first host, not probed"
        head = (f'<h3>{e(c["name"])} <small>{e(c["engine"])}</small></h3><p>writer: '
                + (f'<b class="writer">{e(writer)}</b> ({how})' if writer else '<b class="bad writer">none known</b>')
                + "</p>" + (f"<ul>{endpoints}</ul>" if endpoints else ""))
        rows = [_node_row(n, writer) for n in c["nodes"]]
        parts.append(f'<div class="cluster" data-cluster="{e(c["name"])}" data-writer="{e(writer)}">' + head
                     + _table(["node", "role (probe)", "state", "lag", "serving", "why skipped", "found by"], rows,
                              "nodes") + "</div>")
    return "".join(parts) or "<p>no clusters</p>"


def render_pools(data: dict) -> str:
    rows = []
    for p in data["pools"]:
        w = p["borrow_wait"]
        pct = " / ".join(_seconds(w.get(k)) for k in ("p50", "p95", "p99")) if w.get("borrows") else "no borrows in the window"
        rows.append(f'<tr data-pool="{e(p["pool"])}"><td>{e(p["pool"])}</td><td>{p["clients"]}</td><td>{p["size"]}'
                    f'/{p["max_size"]}</td><td>{p["idle"]}</td><td>{p["borrowed"]}</td><td>{p["waiting"]}</td>'
                    f'<td>{e(pct)}</td><td>{_seconds(p["longest_wait"]) if p["waiting"] else ""}</td></tr>')
    table = _table(["pool (cluster/role/user/database)", "clients", "backends/max", "idle", "borrowed", "waiting",
                    "borrow wait p50 / p95 / p99", "longest wait now"], rows, "pools") if rows else \
        "<p>no pools yet: a pool opens with its first client</p>"
    busiest = sorted(data["pools"], key=lambda p: (-(p["clients"] + p["size"]), p["pool"]))[:CHART_POOLS]
    charts = "".join(f'<figure><figcaption>{e(p["pool"])}</figcaption>'
                     + chart(p["series"], [(1, "c", "clients"), (2, "b", "backends"), (4, "w", "waiting")],
                             f"clients vs backends of {p['pool']}") + "</figure>" for p in busiest)
    more = len(data["pools"]) - len(busiest)
    listener_rows = [f'<tr data-listener="{e(lst["name"])}"><td>{e(lst["name"])}</td><td>{e(lst["engine"])}</td>'
                     f'<td>{e(lst["listen"])}</td><td>{e(lst["cluster"])}/{e(lst["role"])}</td><td>{lst["clients"]}</td>'
                     f'<td>{chart([(t, n) for t, n in lst["series"]], [(1, "c", "clients")], "clients of " + lst["name"], 200, 40)}'
                     "</td></tr>" for lst in data["listeners"]]
    return (table + (f'<div class="charts">{charts}</div>' if charts else "")
            + (f"<p>{more} quieter pools without charts (all are in the table)</p>" if more > 0 else "")
            + "<h3>listeners</h3>" + _table(["listener", "engine", "address", "cluster/role", "clients", "clients over time"],
                                            listener_rows, "listeners")
            + '<p class="note">Borrow wait: per-second means of the borrows that waited, the others count as 0 '
              "(pools count waits, not each one).</p>")


def render_pins(data: dict) -> str:
    pins = data["pins"]
    rows = []
    for cluster, counts in pins["by_cluster"].items():
        reasons = sorted(set(counts["now"]) | set(counts["detected_total"]))
        for reason in reasons:
            rows.append(f'<tr data-reason="{e(reason)}"><td>{e(cluster)}</td><td>{e(reason)}</td>'
                        f'<td>{counts["now"].get(reason, 0)}</td><td>{counts["detected_total"].get(reason, 0)}</td></tr>')
    summary = _table(["cluster", "reason", "sessions pinned now", "statements seen (total)"], rows, "pin-reasons") \
        if rows else "<p>no pins seen</p>"
    sessions = pins["sessions"]
    srows = [f'<tr class="pinned"><td>{e(s.get("addr"))}:{e(s.get("port"))}</td><td>{e(s.get("user"))}</td>'
             f'<td>{e(s.get("database"))}</td><td>{e(s.get("listener"))}</td><td>{e(s.get("reason"))}</td>'
             f'<td><code>{e(redact(s.get("statement")))}</code></td><td>{e(s.get("since"))}</td></tr>'
             for s in sessions[:TABLE_ROWS]]
    detail = _table(["client", "user", "database", "listener", "reason", "statement that pinned it", "since"], srows,
                    "pinned-sessions") if srows else "<p>no session is pinned now</p>"
    more = f"<p>{len(sessions) - TABLE_ROWS} more: GET /admin/pins</p>" if len(sessions) > TABLE_ROWS else ""
    return summary + "<h3>sessions pinned now</h3>" + detail + more


def _event_text(ev: dict) -> str:
    kind = ev.get("event")
    if kind == "writer":
        text = f"writer {ev.get('old') or 'none'} → {ev.get('new') or 'none'} ({ev.get('reason')})"
        if ev.get("outage_seconds") is not None:
            text += f", {ev['outage_seconds']} s without a writer"
        return text
    if kind == "dns":
        return (f"{ev.get('endpoint')} → {', '.join(ev.get('addresses') or []) or 'no address'}"
                + (f" (error: {ev['error']})" if ev.get("error") else ""))
    if kind == "role":
        return f"{ev.get('node')} now answers as {ev.get('role')} (was {ev.get('old')})"
    if kind == "node":
        return f"{ev.get('node')} is {ev.get('state')}" + (f": {ev['error']}" if ev.get("error") else "")
    if kind == "retired":
        return f"left the {ev.get('role')} role: " + "; ".join(f"{k} ({v})" for k, v in (ev.get("nodes") or {}).items())
    if kind == "read-only check":
        return f"{ev.get('node')} refused a write as read-only; its probe says {ev.get('role')}: {ev.get('result')}"
    if kind == "drain":
        return f"writer pools drained ({ev.get('pools')}): {ev.get('old')} → {ev.get('new') or 'none'}"
    return ", ".join(f"{k}={v}" for k, v in ev.items() if k not in ("time", "event", "cluster"))


def render_timeline(data: dict) -> str:
    rows = [f'<tr data-event="{e(ev.get("event"))}"><td>{e(_when(ev.get("time")))}</td><td>{e(ev.get("cluster"))}</td>'
            f'<td class="k">{e(ev.get("event"))}</td><td>{e(redact(_event_text(ev)))}</td></tr>'
            for ev in reversed(data["timeline"])]
    table = _table(["time (UTC)", "cluster", "event", "what happened"], rows, "timeline") if rows else \
        "<p>no failover events yet</p>"
    return (f'<p>read-only retries (first statements sent on to the new writer): <b>{data["read_only_retries"]}</b>'
            "</p>" + table)


def render_header(data: dict) -> str:
    workers, reporting = data["workers"], data.get("reporting", 1)
    if workers <= 1:
        who = "one process"
    elif reporting > 1:
        who = (f"{reporting} of {workers} workers: pools, clients and pins summed over them (each reports once a "
               "second); clusters and the timeline are worker 0's registry (each worker probes for itself)")
    else:
        who = (f"worker {data['worker']} of {workers}: this page shows the pools, clients and pins of this worker only "
               "(no other worker reports; each has its own pools and failover registry)")
    return (f'<span>up {e(_uptime(data["uptime_seconds"]))}</span> · <span class="who">{e(who)}</span> · '
            f'<span>as of {e(_when(data["time"]))} UTC</span>')


def _uptime(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


SECTIONS = (("clusters", "Clusters", render_clusters), ("pools", "Pools", render_pools), ("pins", "Pins", render_pins),
            ("timeline", "Failover timeline", render_timeline))


def render_sections(data: dict) -> dict[str, str]:
    out = {"header": render_header(data)}
    for ident, _, renderer in SECTIONS:
        out[ident] = renderer(data)
    return out


CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:0;color:#222;background:#f6f7f9}
header{background:#1f2d3d;color:#fff;padding:.6em 1em}header h1{display:inline;font-size:1.2em;margin-right:1em}
header nav a{color:#cde;margin-right:.8em}#header{font-size:.9em;color:#cde}
main{padding:0 1em 2em}section{background:#fff;border:1px solid #dde;border-radius:6px;margin:1em 0;padding:.2em 1em 1em}
h2{font-size:1.1em;border-bottom:1px solid #eee}h3{font-size:1em;margin:.8em 0 .3em}h3 small{color:#789;font-weight:normal}
table{border-collapse:collapse;font-size:.9em}th,td{padding:2px 8px;text-align:left;border-bottom:1px solid #eee;vertical-align:top}
th{background:#f0f2f5}tr.down td.st,.bad{color:#b00;font-weight:bold}tr.up td.st{color:#070}.writer{color:#036}
code{font-size:.95em;background:#f3f3f3;padding:0 3px}.charts{display:flex;flex-wrap:wrap;gap:8px;margin-top:.6em}
figure{margin:0;border:1px solid #eee;padding:4px}figcaption{font-size:.8em;color:#555}
svg.chart{display:block;background:#fcfcff}svg polyline{fill:none;stroke-width:1.5}
polyline.c{stroke:#2a6fdb}polyline.b{stroke:#d9822b}polyline.w{stroke:#c22}tspan.c{fill:#2a6fdb}tspan.b{fill:#d9822b}
tspan.w{fill:#c22}svg text{font-size:9px;fill:#555}.note{font-size:.8em;color:#666}#stale{display:none;color:#b00}
tr[data-event=writer] td.k,tr[data-event=drain] td.k{color:#b00;font-weight:bold}
"""

JS = """
(function(){var busy=false,stale=document.getElementById('stale');
function tick(){if(busy)return;busy=true;fetch('status.json',{credentials:'same-origin',cache:'no-store'})
.then(function(r){if(!r.ok)throw new Error(r.status);return r.json()}).then(function(j){
for(var id in j.sections){var el=document.getElementById(id);if(el)el.innerHTML=j.sections[id]}
stale.style.display='none';document.body.setAttribute('data-updated',j.data.time)})
.catch(function(err){stale.textContent='not updating: '+err.message;stale.style.display='inline'})
.then(function(){busy=false})}
setInterval(tick,2000)})();
"""


def render_page(data: dict, sections: dict | None = None) -> str:
    sections = sections or render_sections(data)
    nav = "".join(f'<a href="#{ident}-section">{e(title)}</a>' for ident, title, _ in SECTIONS)
    body = "".join(f'<section id="{ident}-section"><h2>{e(title)}</h2><div id="{ident}">{sections[ident]}</div>'
                   "</section>" for ident, title, _ in SECTIONS)
    return ('<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>multiproxy status</title>'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            '<noscript><meta http-equiv="refresh" content="5"></noscript>'
            f"<style>{CSS}</style></head><body><header><h1>multiproxy</h1><nav>{nav}</nav>"
            f'<div><span id="header">{sections["header"]}</span> <span id="stale"></span></div></header>'
            f"<main>{body}</main><script>{JS}</script></body></html>")


# ---------------------------------------------------------------------------------------------------------- HTTP

class StatusPage:
    """The page's HTTP side, held by the admin server: GET / (HTML) and GET /status.json."""

    def __init__(self, proxy):
        self.proxy = proxy
        self.sampler = Sampler(proxy)
        self.sampler.start()

    def respond(self, path: str, start_response, refusal: str, token_configured: bool):
        if refusal:
            headers = [("Content-Type", "text/plain; charset=utf-8")]
            if token_configured:
                # A browser asks for basic auth: any user name, the admin token as the password.
                headers.append(("WWW-Authenticate", 'Basic realm="multiproxy admin (password: the admin token)"'))
            start_response("401 Unauthorized" if token_configured else "403 Forbidden", headers)
            return [refusal.encode() + b"\n"]
        data = collect(self.proxy, self.sampler)
        sections = render_sections(data)
        headers = [("Cache-Control", "no-store"), ("X-Content-Type-Options", "nosniff")]
        if path == "/status.json":
            start_response("200 OK", [("Content-Type", "application/json")] + headers)
            for row in data["pools"] + data["listeners"]:
                row.pop("series", None)        # drawn in the sections already; the raw samples would weigh most
            return [json.dumps({"sections": sections, "data": data}, default=str).encode()]
        start_response("200 OK", [("Content-Type", "text/html; charset=utf-8"),
                                  ("Content-Security-Policy", "default-src 'none'; connect-src 'self'; "
                                   "style-src 'unsafe-inline'; script-src 'unsafe-inline'; img-src data:")] + headers)
        return [render_page(data, sections).encode()]
