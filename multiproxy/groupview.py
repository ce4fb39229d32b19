"""One view of a group of forked workers: each worker answers its peers' requests (its views, metrics, status and
the console's commands) on an abstract AF_UNIX socket, and whichever worker serves an admin request merges its
own answer with theirs. A peer that does not answer in time is reported down; it never blocks the answer.

The requests are one JSON line each way on a connection of its own (`\\0multiproxy-{group}-rpc-{worker}`): no state
between requests, nothing on disk. The merge functions are pure (unit-tested): counts summed per pool or database,
rows of clients, servers and pins concatenated with a `worker` column, events every worker recorded alike listed
once (merge_events), metric samples of the same labels summed (per-worker figures, e.g. multiproxy_worker_up, added
by the caller).
"""
from __future__ import annotations

import calendar
import json
import logging
import socket as _stdsocket
import time

import gevent
from gevent import socket
from gevent.server import StreamServer

log = logging.getLogger("multiproxy.groupview")

VIEW_TIMEOUT = 2.0            # seconds a peer has to answer a view, metrics or status
COMMAND_TIMEOUT = 300.0       # PAUSE and WAIT_CLOSE wait for borrowed connections to come back


def rpc_address(group: int, worker: int) -> bytes:
    # Linux abstract socket names: nothing on disk to clean up; a respawned worker binds its index's name again.
    return f"\0multiproxy-{group}-rpc-{worker}".encode()


class GroupView:
    """A worker's part in the group view: serves its peers (`handlers`: op -> function(request) -> JSON-able answer)
    and asks them (`ask`)."""

    def __init__(self, worker: int, worker_count: int, group: int, handlers: dict):
        self.worker = worker
        self.worker_count = worker_count
        self.group = group
        self.handlers = handlers
        self.server = None

    def start(self) -> None:
        listener = socket.socket(_stdsocket.AF_UNIX, _stdsocket.SOCK_STREAM)
        listener.bind(rpc_address(self.group, self.worker))
        listener.listen(64)
        self.server = StreamServer(listener, self._serve)
        self.server.start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop(timeout=0)

    def _serve(self, sock, address) -> None:
        try:
            reader = sock.makefile("rb")
            line = reader.readline(1 << 20)
            request = json.loads(line)
            handler = self.handlers.get(request.get("op"))
            if handler is None:
                answer = {"error": f"unknown request {request.get('op')!r}"}
            else:
                try:
                    answer = {"ok": handler(request)}
                except Exception as exc:   # an answer of its own: the asking worker reports it
                    answer = {"error": str(exc), "code": getattr(exc, "code", "internal_error")}
            sock.sendall(json.dumps(answer, default=str).encode() + b"\n")
        except (OSError, ValueError) as exc:
            log.debug("group view: a peer's request failed: %s", exc)
        finally:
            sock.close()

    def ask_one(self, worker: int, request: dict, timeout: float):
        """A peer's answer: {"ok": ...} or {"error": ...}; None when it did not answer (down)."""
        try:
            with gevent.Timeout(timeout):
                sock = socket.socket(_stdsocket.AF_UNIX, _stdsocket.SOCK_STREAM)
                try:
                    sock.connect(rpc_address(self.group, worker))
                    sock.sendall(json.dumps(request).encode() + b"\n")
                    line = sock.makefile("rb").readline(64 << 20)
                finally:
                    sock.close()
            return json.loads(line) if line else None
        except (OSError, ValueError, gevent.Timeout):
            return None

    def ask(self, request: dict, timeout: float = VIEW_TIMEOUT) -> dict:
        """Every other worker's answer, at once: worker -> answer ({"ok": ...} / {"error": ...}) or None (down)."""
        others = [w for w in range(self.worker_count) if w != self.worker]
        jobs = {w: gevent.spawn(self.ask_one, w, request, timeout) for w in others}
        gevent.joinall(list(jobs.values()), timeout=timeout + 1)
        return {w: (job.value if job.successful() else None) for w, job in jobs.items()}


# ---------------------------------------------------------------------------------------------------- merging views

# Columns that describe a pool (or database, or user) rather than count something: kept, not summed.
_KEEP = {"max_size", "pool_mode", "load_balance_hosts", "pool_size", "min_pool_size", "reserve_pool_size",
         "server_lifetime", "max_connections", "max_client_connections", "reserve_pool", "max_user_connections",
         "max_user_client_connections", "host", "port", "force_user", "name", "database", "user", "cluster", "role",
         "engine", "variant", "list", "pool_mode"}
_MAX = {"maxwait", "maxwait_us", "paused", "disabled"}
# The key of a row, per view: rows of the same key from several workers become one.
_KEYS = {
    "pools": ("database", "user", "cluster", "role", "engine", "variant"),
    "databases": ("name", "cluster"),
    "users": ("name",),
    "stats": ("database",), "stats_totals": ("database",), "stats_averages": ("database",),
    "lists": ("list",),
}
# SHOW LISTS items that name distinct things (the same database in two workers is one): the largest count.
_LISTS_MAX = {"databases", "users", "pools", "peers", "peer_pools", "dns_names", "dns_zones"}
_CONCATENATED = {"clients", "servers", "pins"}
MERGED_VIEWS = set(_KEYS) | _CONCATENATED | {"events"}


def merge_view(view: str, columns: list, answers: dict) -> tuple[list, list]:
    """Merge the rows of one view from several workers (`answers`: worker -> rows, in `columns`' order) into one
    answer: summed per key (pools, databases, users, stats, lists), concatenated with a worker column (clients,
    servers, pins), or concatenated in time order (events). Other views: the lowest worker's rows."""
    names = [name for name, _ in columns]
    if view in _CONCATENATED:
        rows = [list(row) + [worker] for worker in sorted(answers) for row in answers[worker]]
        return list(columns) + [("worker", "int4")], rows
    if view == "events":
        return list(columns) + [("workers", "text")], merge_events(answers)[-200:]
    keys = _KEYS.get(view)
    if keys is None:
        return columns, answers[min(answers)] if answers else []
    key_at = [names.index(k) for k in keys if k in names]
    merged: dict = {}
    for worker in sorted(answers):
        for row in answers[worker]:
            key = tuple(row[i] for i in key_at)
            if key not in merged:
                merged[key] = list(row)
                continue
            into = merged[key]
            for i, name in enumerate(names):
                a, b = into[i], row[i]
                if not isinstance(b, (int, float)) or isinstance(b, bool) or name in _KEEP:
                    continue
                if not isinstance(a, (int, float)):
                    into[i] = b
                elif name in _MAX or (view == "lists" and into[0] in _LISTS_MAX):
                    into[i] = max(a, b)
                else:
                    into[i] = a + b
    return columns, list(merged.values())


# Each worker's registry probes on its own schedule, so the workers see one writer change or node failure a probe
# interval (or a down node's back-off, at most health.backoff_max, 10 s by default) apart: rows alike within this
# many seconds are one event.
SAME_EVENT_SECONDS = 15.0


def _event_seconds(when) -> float | None:
    """SHOW EVENTS' time column ('2026-01-02 03:04:05 UTC') as Unix seconds."""
    try:
        return float(calendar.timegm(time.strptime(when, "%Y-%m-%d %H:%M:%S UTC")))
    except (TypeError, ValueError):
        return None


def merge_events(answers: dict) -> list:
    """SHOW EVENTS of several workers (`answers`: worker -> rows of time, event, cluster, database, detail) -> one
    list in time order with a `workers` column. What every worker records alike (a writer change each registry sees,
    a console command run in every worker) is one row, at its earliest time, with workers `all`; a row from some
    workers only names them ('0', '0,2'). Rows alike are the same event, cluster, database and detail within
    SAME_EVENT_SECONDS, at most one row of each worker: a worker's own repeats stay apart."""
    everyone = set(answers)
    tagged = sorted(((_event_seconds(row[0]), worker, row) for worker, rows in answers.items() for row in rows),
                    key=lambda item: (item[0] is not None, item[0] or 0.0, item[1]))
    groups: list = []                  # [first seconds, row, workers]
    open_groups: dict = {}             # (event, cluster, database, detail) -> groups still taking rows
    for seconds, worker, row in tagged:
        key = tuple(row[1:])
        candidates = open_groups.setdefault(key, [])
        group = next((g for g in candidates if worker not in g[2] and seconds is not None and g[0] is not None
                      and seconds - g[0] <= SAME_EVENT_SECONDS), None)
        if group is None:
            group = [seconds, row, set()]
            groups.append(group)
            candidates.append(group)
        group[2].add(worker)
    return [list(row) + ["all" if workers == everyone and len(everyone) > 1 else ",".join(map(str, sorted(workers)))]
            for _, row, workers in groups]


# ---------------------------------------------------------------------------------------------------- metrics

# What every worker reports alike (a setting, a node's state, a writer change each worker's registry sees): the
# group's value is the largest, not the sum. Probes, DNS lookups and read-only checks each worker makes are summed.
SAME_IN_EVERY_WORKER = {"cluster_connections_max", "backend_node_up", "backend_node_replica_lag_seconds",
                        "backend_node_replica_lag_bytes", "backend_node_serving", "cluster_writer_known",
                        "cluster_writer_changes"}


def families_as_json(families) -> list:
    """prometheus_client metric families -> [name, type, documentation, [[sample name, labels, value], ...]]."""
    return [[f.name, f.type, f.documentation, [[s.name, dict(s.labels), s.value] for s in f.samples]]
            for f in families]


def merge_families(answers: list, prefix: str = "") -> list:
    """Families (as families_as_json) of several workers -> one list: samples of the same name and labels summed
    (SAME_IN_EVERY_WORKER: the largest), in the order first seen."""
    merged: dict = {}
    for families in answers:
        for name, kind, documentation, samples in families:
            entry = merged.setdefault(name, [name, kind, documentation, {}])
            largest = name[len(prefix):] in SAME_IN_EVERY_WORKER
            for sample_name, labels, value in samples:
                key = (sample_name, tuple(sorted(labels.items())))
                if key in entry[3]:
                    old = entry[3][key][2]
                    value = max(old, value) if largest else old + value
                entry[3][key] = [sample_name, labels, value]
    return [[name, kind, documentation, list(samples.values())] for name, kind, documentation, samples in
            merged.values()]


# ---------------------------------------------------------------------------------------------------- /status

def merge_status(own: dict, others: list) -> dict:
    """status_snapshot of several workers -> one: clients per listener, pool counts and pins summed."""
    merged = json.loads(json.dumps(own, default=str))
    listeners = {item["name"]: item for item in merged["listeners"]}
    pools = {item["pool"]: item for item in merged["pools"]}
    caps = {(item["cluster"], item["role"]): item for item in merged.get("cluster_caps", [])}
    for other in others:
        for item in other.get("listeners", []):
            if item["name"] in listeners:
                listeners[item["name"]]["clients"] += item["clients"]
            else:
                listeners[item["name"]] = item
                merged["listeners"].append(item)
        for item in other.get("pools", []):
            mine = pools.get(item["pool"])
            if mine is None:
                pools[item["pool"]] = item
                merged["pools"].append(item)
                continue
            for field in ("size", "idle", "borrowed", "waiting", "budget_size"):
                mine[field] += item[field]
        for cluster, pins in other.get("pins", {}).items():
            into = merged["pins"].setdefault(cluster, {"now": {}, "detected_total": {}})
            for part in ("now", "detected_total"):
                for reason, count in pins.get(part, {}).items():
                    into[part][reason] = into[part].get(reason, 0) + count
        for item in other.get("cluster_caps", []):
            mine = caps.get((item["cluster"], item["role"]))
            if mine is None:
                caps[(item["cluster"], item["role"])] = item
                merged.setdefault("cluster_caps", []).append(item)
            else:
                mine["connections"] += item["connections"]
                mine["max"] = max(mine["max"], item["max"])
    return merged
