"""Prometheus metrics named after RDS Proxy's CloudWatch metrics, and the admin HTTP server (/ the status page, /metrics,
/healthz, /status, and the admin console's views and commands as JSON under /admin/).

Counters live as plain integers on the proxy, pools and sessions, so the hot path pays an addition;
a collector turns them into metric families when Prometheus scrapes.
"""
from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import os
import time

from gevent.pywsgi import WSGIServer
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, SummaryMetricFamily

from .config import parse_address

log = logging.getLogger("multiproxy.metrics")
PREFIX = "multiproxy_"


class Metrics:
    """Process-wide counters that are not naturally held by a pool or a session."""

    def __init__(self, proxy):
        self.proxy = proxy
        self.client_connections_total = 0
        self.rejected_connections = 0
        self.auth_failures = 0
        self.protocol_errors = 0
        self.handshake_timeouts = 0
        self.idle_timeouts = 0
        self.idle_transaction_timeouts = 0
        self.query_timeouts = 0
        self.read_only_retries = 0
        self.borrow_failures = 0
        self.cancels_forwarded = 0
        self.cancels_ignored = 0
        self.closed_session_requests = 0
        # Clients moved by a takeover (multiproxy.takeover): handed_over (by this process), taken_over (by this
        # process, from the old one), stayed (not idle or TLS by the end of the drain: finished by this process).
        self.takeover_clients = {"handed_over": 0, "taken_over": 0, "stayed": 0}
        # Clients of this worker index's previous process, which died (multiproxy.custody): resumed here with their
        # session, closed_busy (busy when it died: the supervisor ended their connections), failed (not resumable).
        self.custody_clients = {"resumed": 0, "closed_busy": 0, "failed": 0}
        self.auth_query_lookups: dict[tuple[str, str], int] = {}   # (cluster, outcome) -> count (auth_lookup)

    def session_closed(self, session) -> None:
        if session.template is not None:
            return      # greeted by the relay and never served on the Python path: it has no requests of its own
        proto = session.proto
        if proto is not None:
            requests = getattr(proto, "requests", 0)
            self.closed_session_requests += requests
            if session.pool is not None:
                session.pool.closed_requests_total += requests


class ProxyCollector:
    """Reads the live proxy state at scrape time."""

    def __init__(self, proxy):
        self.proxy = proxy

    def collect(self):
        proxy = self.proxy
        m = proxy.metrics
        proxy.sessions.count_quiet()                # (the relay's quiet logins and goodbyes in the counts)
        sessions = list(proxy.sessions.known())     # (quiet clients have no requests of theirs)

        g = GaugeMetricFamily(PREFIX + "client_connections", "Client connections open now (ClientConnections)",
                              labels=["listener"])
        for rt in proxy.listeners:
            g.add_metric([rt.config.name], rt.connections)
        yield g

        c = CounterMetricFamily(PREFIX + "client_connections_received", "Client connections accepted (ClientConnectionsReceived)")
        c.add_metric([], m.client_connections_total)
        yield c
        c = CounterMetricFamily(PREFIX + "client_connections_setup_failed_auth",
                                "Client logins refused for bad credentials (ClientConnectionsSetupFailedAuth)")
        c.add_metric([], m.auth_failures)
        yield c
        c = CounterMetricFamily(PREFIX + "client_connections_rejected", "Clients turned away by limits or shutdown")
        c.add_metric([], m.rejected_connections)
        yield c
        c = CounterMetricFamily(PREFIX + "client_protocol_errors", "Clients closed for breaking their protocol")
        c.add_metric([], m.protocol_errors)
        yield c
        c = CounterMetricFamily(PREFIX + "client_handshake_timeouts", "Clients closed for not finishing login in time")
        c.add_metric([], m.handshake_timeouts)
        yield c
        c = CounterMetricFamily(PREFIX + "client_idle_timeouts", "Clients closed by proxy.idle_client_timeout")
        c.add_metric([], m.idle_timeouts)
        yield c
        c = CounterMetricFamily(PREFIX + "client_idle_transaction_timeouts",
                                "Clients closed by proxy.idle_transaction_timeout (their transaction rolled back)")
        c.add_metric([], m.idle_transaction_timeouts)
        yield c
        c = CounterMetricFamily(PREFIX + "query_timeouts", "Requests cancelled by clusters.NAME.pool.query_timeout")
        c.add_metric([], m.query_timeouts)
        yield c
        c = CounterMetricFamily(PREFIX + "read_only_retries", "First statements refused as read-only and sent to the new writer")
        c.add_metric([], m.read_only_retries)
        yield c
        c = CounterMetricFamily(PREFIX + "takeover_clients", "Client connections moved by an online restart "
                                "(multiproxy run --takeover) or from a worker SIGTTOU retires to the others, by side: "
                                "handed_over, taken_over, stayed", labels=["side"])
        for side, count in m.takeover_clients.items():
            c.add_metric([side], count)
        yield c
        c = CounterMetricFamily(PREFIX + "worker_custody_clients", "Clients of a worker that died (workers > 1, "
                                "proxy.worker_custody), by outcome: resumed by its replacement with their session, "
                                "closed_busy (a request or transaction was under way), failed", labels=["outcome"])
        for outcome, count in m.custody_clients.items():
            c.add_metric([outcome], count)
        yield c
        c = CounterMetricFamily(PREFIX + "query_requests", "Requests (queries, syncs) sent by clients (QueryRequests)")
        c.add_metric([], m.closed_session_requests + sum(getattr(s.proto, "requests", 0) for s in sessions
                                                         if s.template is None and s.proto))   # (greeted: none yet)
        yield c
        c = CounterMetricFamily(PREFIX + "cancel_requests", "Cancel requests by outcome", labels=["outcome"])
        c.add_metric(["forwarded"], m.cancels_forwarded)
        c.add_metric(["ignored"], m.cancels_ignored)
        yield c
        c = CounterMetricFamily(PREFIX + "auth_query_lookups", "Users missing from the users file looked up with "
                                "clusters.NAME.auth_query, by outcome: found, not_found, error (queries run), cached "
                                "(answered from the cache)", labels=["cluster", "outcome"])
        for (cluster, outcome), count in sorted(getattr(m, "auth_query_lookups", {}).items()):
            c.add_metric([cluster, outcome], count)
        yield c

        # `variant` names a pool among those of one (cluster, role, user, database) that differ in backend variant (MySQL
        # client capabilities and charset; empty on engines without variants). Together they share max_size.
        labels = ["cluster", "role", "user", "database", "variant"]
        conns = GaugeMetricFamily(PREFIX + "database_connections", "Backend connections open (DatabaseConnections)", labels=labels)
        borrowed = GaugeMetricFamily(PREFIX + "database_connections_currently_borrowed",
                                     "Backend connections serving a client now (DatabaseConnectionsCurrentlyBorrowed)", labels=labels)
        waiting = GaugeMetricFamily(PREFIX + "database_connection_requests_waiting", "Transactions waiting for a backend",
                                    labels=labels)
        requests = CounterMetricFamily(PREFIX + "database_connection_requests",
                                       "Backend borrows (DatabaseConnectionRequests)", labels=labels)
        failed = CounterMetricFamily(PREFIX + "database_connections_setup_failed",
                                     "Backend logins that failed (DatabaseConnectionsSetupFailed)", labels=labels)
        opened = CounterMetricFamily(PREFIX + "database_connections_opened", "Backend logins attempted", labels=labels)
        timeouts = CounterMetricFamily(PREFIX + "database_connection_borrow_timeouts",
                                       "Borrows that gave up after borrow_timeout", labels=labels)
        latency = SummaryMetricFamily(PREFIX + "database_connections_borrow_latency_seconds",
                                      "Time waited for a backend, waiting borrows only (DatabaseConnectionsBorrowLatency)",
                                      labels=labels)
        evicted = CounterMetricFamily(PREFIX + "database_connections_budget_evictions",
                                      "Idle connections closed to make room for another variant of the same budget",
                                      labels=labels)
        for pool in list(proxy.pools.values()):
            lv = [pool.cluster.name, pool.role, pool.user, pool.database, pool.variant_name]
            conns.add_metric(lv, pool.size)
            borrowed.add_metric(lv, pool.borrowed)
            waiting.add_metric(lv, pool.waiting_count)
            requests.add_metric(lv, pool.borrows_total + getattr(pool, "relay_transactions", 0))
            failed.add_metric(lv, pool.connect_failures_total)
            opened.add_metric(lv, pool.connects_total)
            timeouts.add_metric(lv, pool.borrow_timeouts_total)
            latency.add_metric(lv, pool.waited_borrows_total, pool.borrow_wait_seconds_total)
            evicted.add_metric(lv, pool.budget_evictions_total)
        yield from (conns, borrowed, waiting, requests, failed, opened, timeouts, latency, evicted)

        # [clusters.NAME.pool] max_cluster_connections: the cap (0 while a percentage awaits the server's
        # max_connections) and the connections the cluster's role holds against it.
        cap_limit = GaugeMetricFamily(PREFIX + "cluster_connections_max", "max_cluster_connections as connections, per "
                                      "cluster and role (0: not known yet)", labels=["cluster", "role"])
        cap_total = GaugeMetricFamily(PREFIX + "cluster_connections", "Backend connections of the cluster's role "
                                      "counted against max_cluster_connections", labels=["cluster", "role"])
        cap_evicted = CounterMetricFamily(PREFIX + "cluster_connections_evictions", "Idle connections closed to make "
                                          "room under max_cluster_connections for another pool", labels=["cluster", "role"])
        for (cluster, role), cap in list((getattr(proxy, "cluster_caps", None) or {}).items()):
            cap_limit.add_metric([cluster, role], cap.limit)
            cap_total.add_metric([cluster, role], cap.total)
            cap_evicted.add_metric([cluster, role], cap.evictions_total)
        yield from (cap_limit, cap_total, cap_evicted)

        pinned = GaugeMetricFamily(PREFIX + "database_connections_currently_session_pinned",
                                   "Client sessions pinned to their backend now, by reason "
                                   "(DatabaseConnectionsCurrentlySessionPinned)", labels=["cluster", "reason"])
        detected = CounterMetricFamily(PREFIX + "pin_reasons_detected", "Statements that would pin, by reason",
                                       labels=["cluster", "reason"])
        for cluster, policy in proxy.pin_policies.items():
            for reason, count in policy.pinned_now.items():
                pinned.add_metric([cluster, reason], count)
            for reason, count in policy.detected_total.items():
                detected.add_metric([cluster, reason], count)
        yield pinned
        yield detected
        statements = CounterMetricFamily(PREFIX + "prepared_statements", "Prepared statements a client executed, by "
                                         "whether its backend had it (hit), had it prepared first (miss), or closed "
                                         "one to stay within max_prepared_statements (eviction)",
                                         labels=["cluster", "outcome"])
        for cluster, counts in proxy.statement_counts.items():
            statements.add_metric([cluster, "hit"], counts.hits)
            statements.add_metric([cluster, "miss"], counts.misses)
            statements.add_metric([cluster, "eviction"], counts.evictions)
        yield statements
        lanes = getattr(proxy, "relay_lanes", None)
        if lanes is not None:
            stats = lanes.stats()
            g = GaugeMetricFamily(PREFIX + "relay_lane_clients", "Clients served by the compiled relay now "
                                  "([proxy] relay = \"compiled\")")
            g.add_metric([], stats["clients"])
            yield g
            g = GaugeMetricFamily(PREFIX + "relay_lane_backends", "Backend connections lent to the compiled relay now "
                                  "(counted as borrowed by their pools)")
            g.add_metric([], stats["backends"])
            yield g
            c = CounterMetricFamily(PREFIX + "relay_lane_transactions", "Transactions the compiled relay served "
                                    "with no Python")
            c.add_metric([], stats["transactions"])
            yield c
            c = CounterMetricFamily(PREFIX + "relay_lane_returns", "Clients the compiled relay gave back to the "
                                    "Python path, by why: stopped (a request its engine must see), in_transaction "
                                    "(the same inside a transaction the relay served: the backend goes with it), "
                                    "malformed, closed "
                                    "(the connection ended), connection_lost (its backend's), pool_wanted (the pool "
                                    "paused or drained, or its backends use TLS), no_backend (none could be opened, "
                                    "or it waited the borrow timeout), settings (the backend it got holds other "
                                    "settings: Python replays them), takeover", labels=["why"])
            for why, count in sorted(lanes.returns.items()):
                c.add_metric([why], count)
            yield c
            c = CounterMetricFamily(PREFIX + "relay_lane_short_stays", "Clients stopped in the compiled relay before "
                                    "it relayed enough of their requests to pay for the trip (a transaction opened "
                                    "with BEGIN, say): such stays in a row keep the client on the Python path for "
                                    "its next 1, 3, 7, ... up to 63 requests")
            c.add_metric([], stats["short_stays"])
            yield c
            c = CounterMetricFamily(PREFIX + "relay_logins", "Client logins the compiled relay accepted and greeted "
                                    "by itself (relay logins: trust or SCRAM, no TLS, one worker; "
                                    "multiproxy.relay_logins)")
            c.add_metric([], stats["logins"])
            yield c
            c = CounterMetricFamily(PREFIX + "relay_logins_ended", "Clients greeted by the compiled relay that left "
                                    "while it still served them (a goodbye or their end between transactions): closed "
                                    "there, with no Python path")
            c.add_metric([], stats["logins_ended"])
            yield c
            c = CounterMetricFamily(PREFIX + "relay_logins_whole", "Clients greeted by the compiled relay whose "
                                    "session the Python path needed whole (a statement the relay stops, a cancel, a "
                                    "timeout, a drain): their socket object and client state made then")
            c.add_metric([], stats["logins_whole"])
            yield c
            c = CounterMetricFamily(PREFIX + "relay_logins_resumed", "SCRAM logins the compiled relay began and the "
                                    "Python path finished from where the relay stood (a proof that did not hold, a "
                                    "message the relay leaves to the engine, a template dropped midway, a client too "
                                    "slow to log in)")
            c.add_metric([], stats["logins_resumed"])
            yield c
            g = GaugeMetricFamily(PREFIX + "relay_logins_quiet", "Clients greeted by the compiled relay that it keeps "
                                  "quietly now: no session yet, made when something needs it (a statement the relay "
                                  "stops, a cancel, the admin console, a drain)")
            g.add_metric([], stats["quiet"])
            yield g
        if proxy.registry is not None:
            yield from proxy.registry.metric_families(PREFIX)


def status_snapshot(proxy) -> dict:
    """What `multiproxy status` prints: listeners, pools and pins."""
    return {
        "uptime_seconds": round(time.time() - proxy.started, 1),
        "listeners": [{"name": rt.config.name, "engine": rt.engine.name, "listen": "%s:%d" % rt.config.listen,
                       "cluster": rt.cluster.name, "role": rt.config.role, "clients": rt.connections}
                      for rt in proxy.listeners],
        # A pool's max_size is its budget's, shared with the other variants of its (cluster, role, user, database):
        # `budget` names it and `budget_size` counts the connections of all of them.
        "pools": [{"pool": pool.label, "size": pool.size, "idle": pool.idle_count, "borrowed": pool.borrowed,
                   "waiting": pool.waiting_count, "max_size": pool.config.max_size, "budget": pool.budget.label,
                   "budget_size": pool.budget.size}
                  for pool in proxy.pools.values()],
        "pins": {cluster: {"now": dict(policy.pinned_now), "detected_total": dict(policy.detected_total)}
                 for cluster, policy in proxy.pin_policies.items()},
        "registry": proxy.registry.snapshot() if proxy.registry is not None else None,
        "cluster_caps": [{"cluster": cluster, "role": role, "max": cap.limit, "connections": cap.total}
                         for (cluster, role), cap in (getattr(proxy, "cluster_caps", None) or {}).items()],
    }


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def admin_request(proxy, method: str, rest: str, query: str = "") -> tuple[str, dict]:
    """The admin console over HTTP: GET /admin/<view> (SHOW <view>; ?format=objects for a list of objects) and
    POST /admin/<command>[/<db>]. Returns (HTTP status, JSON body)."""
    from urllib.parse import parse_qs, unquote

    from .admin import AdminError
    parts = [unquote(part) for part in rest.strip("/").split("/") if part]
    if not parts:
        return "404 Not Found", {"error": "name a view (GET /admin/pools) or a command (POST /admin/pause/db)"}
    objects = parse_qs(query).get("format", [""])[0] == "objects"
    try:
        if method == "GET":
            result = proxy.console.show(parts[0], parts[1:])
        elif method == "POST":
            if parts[0].upper() in ("SHOW", "SELECT"):
                raise AdminError("syntax_error", "views are read with GET /admin/<view>")
            result = proxy.console.execute(" ".join(parts), may_command=True)
        else:
            return "405 Method Not Allowed", {"error": "GET a view or POST a command"}
    except AdminError as exc:
        status = "404 Not Found" if exc.code == "undefined_object" else "400 Bad Request"
        return status, {"error": str(exc), "code": exc.code}
    return "200 OK", result.as_json(objects)


def admin_http_refusal(proxy, authorization: str, loopback: bool) -> str:
    """Why an /admin/ request is refused ('' when it is not): with [admin] http_token_env, a request must carry
    `Authorization: Bearer TOKEN`; without it, /admin/ answers only on a loopback admin_listen."""
    name = proxy.config.admin.http_token_env
    if not name:
        if loopback:
            return ""
        return ("the admin console over HTTP answers on a loopback admin_listen only, unless [admin] http_token_env "
                "names a token that requests carry (Authorization: Bearer TOKEN)")
    token = os.environ.get(name, "")
    if not token:
        return f"[admin] http_token_env names {name}, which is not set in the proxy's environment: /admin/ is closed"
    scheme, _, given = authorization.partition(" ")
    if scheme.lower() == "basic":   # a browser's login prompt (the status page): any user name, the token as password
        import base64
        try:
            given = base64.b64decode(given.strip(), validate=True).decode().partition(":")[2]
        except (ValueError, UnicodeDecodeError):
            given = ""
        scheme = "bearer"
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
        return ("this request needs the admin token: Authorization: Bearer TOKEN, or basic auth with the token as the "
                "password (see [admin] http_token_env)")
    return ""


class GroupCollector:
    """With forked workers: every worker's metrics in one exposition (samples of the same labels summed, see
    groupview.merge_families), plus per-worker series from the supervisor: multiproxy_worker_up and
    multiproxy_worker_restarts."""

    def __init__(self, proxy):
        self.proxy = proxy
        self.local = ProxyCollector(proxy)

    def collect(self):
        from prometheus_client.core import Metric

        from .groupview import families_as_json, merge_families
        proxy = self.proxy
        own = families_as_json(self.local.collect())
        answers = proxy.group.ask({"op": "metrics"})
        merged = merge_families([own] + [a["ok"] for a in answers.values() if a and "ok" in a], PREFIX)
        for name, kind, documentation, samples in merged:
            family = Metric(name, documentation, kind)
            for sample_name, labels, value in samples:
                family.add_sample(sample_name, labels, value)
            yield family
        up = GaugeMetricFamily(PREFIX + "worker_up", "1 while the worker runs and answers its peers", labels=["worker"])
        restarts = CounterMetricFamily(PREFIX + "worker_restarts", "Times the supervisor respawned the worker",
                                       labels=["worker"])
        reply = proxy.link.request({"op": "workers"}, timeout=2.0) if proxy.link is not None else None
        table = {w["worker"]: w for w in (reply or {}).get("workers", [])}
        for worker in range(proxy.group.worker_count):
            answered = worker == proxy.worker or bool(answers.get(worker))
            up.add_metric([str(worker)], int(answered and table.get(worker, {"up": 1})["up"] == 1))
            restarts.add_metric([str(worker)], table.get(worker, {}).get("restarts", 0))
        yield up
        yield restarts


def group_status(proxy) -> dict:
    """/status: this worker's snapshot, or with forked workers the group's (groupview.merge_status), with each
    worker's state from the supervisor."""
    own = status_snapshot(proxy)
    if getattr(proxy, "group", None) is None:
        return own
    from .groupview import merge_status
    answers = proxy.group.ask({"op": "status"})
    merged = merge_status(own, [a["ok"] for a in answers.values() if a and "ok" in a])
    reply = proxy.link.request({"op": "workers"}, timeout=2.0) if proxy.link is not None else None
    workers = (reply or {}).get("workers") or [{"worker": w} for w in range(proxy.group.worker_count)]
    for item in workers:
        item["answered"] = item["worker"] == proxy.worker or bool(answers.get(item["worker"]))
    merged["workers"] = workers
    return merged


def start_admin_server(listen: str, proxy, sock=None) -> WSGIServer:
    """The admin HTTP server on `listen`, or on `sock` when given: bound by the supervisor (forked workers) or
    received in a takeover."""
    host, port = parse_address(listen)
    loopback = _is_loopback(host)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(GroupCollector(proxy) if getattr(proxy, "group", None) is not None else ProxyCollector(proxy))

    from .status_page import PATHS, StatusPage
    page = StatusPage(proxy)

    def app(environ, start_response):
        path = environ.get("PATH_INFO", "/")
        if path in PATHS:
            refusal = admin_http_refusal(proxy, environ.get("HTTP_AUTHORIZATION", ""), loopback)
            return page.respond(path, start_response, refusal, bool(proxy.config.admin.http_token_env))
        if path == "/metrics":
            body = generate_latest(registry)
            start_response("200 OK", [("Content-Type", "text/plain; version=0.0.4; charset=utf-8")])
            return [body]
        if path == "/healthz":
            ok = not proxy.stopping
            start_response("200 OK" if ok else "503 Service Unavailable", [("Content-Type", "text/plain")])
            return [b"ok\n" if ok else b"stopping\n"]
        if path == "/status":
            start_response("200 OK", [("Content-Type", "application/json")])
            return [json.dumps(group_status(proxy), indent=2).encode()]
        if path.startswith("/admin/"):
            refusal = admin_http_refusal(proxy, environ.get("HTTP_AUTHORIZATION", ""), loopback)
            if refusal:
                start_response("403 Forbidden", [("Content-Type", "application/json")])
                return [json.dumps({"error": refusal, "code": "insufficient_privilege"}).encode() + b"\n"]
            status, body = admin_request(proxy, environ.get("REQUEST_METHOD", "GET"), path[len("/admin/"):],
                                         environ.get("QUERY_STRING", ""))
            start_response(status, [("Content-Type", "application/json")])
            return [json.dumps(body, indent=1, default=str).encode() + b"\n"]
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found: try / (the status page), /metrics, /healthz, /status or /admin/<view> (GET) and /admin/<command>[/<db>] (POST)\n"]

    server = WSGIServer(sock if sock is not None else (host, port), app, log=None, error_log=log)
    server.start()
    log.info("admin server on http://%s:%d (/ the status page, /metrics, /healthz, /status, /admin/)", host, port)
    return server
