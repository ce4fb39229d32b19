"""The admin console in PgBouncer's dialect: its views (SHOW ...) and commands (PAUSE, KILL, RELOAD, ...), engine-neutral.

`Console` belongs to the proxy. Each view returns (columns, rows), columns as (name, PostgreSQL type name) with
PgBouncer's column names where a column applies (multiproxy's own columns come after them, so tools that read columns
by name keep working); commands act on the proxy. The wire side is the engine's (ClientProtocol.admin_console: the
PostgreSQL engine serves the virtual databases `multiproxy` and `pgbouncer`); the admin HTTP server (/admin/...) and
`multiproxy admin` run the same views and commands. Nothing here runs per packet: views are computed when asked.
"""
from __future__ import annotations

import collections
import logging
import re
import time

import gevent
from gevent.event import Event

from . import __version__, relay_core
from .groupview import COMMAND_TIMEOUT, MERGED_VIEWS, merge_view

log = logging.getLogger("multiproxy.admin")

CONSOLE_DATABASES = frozenset({"multiproxy", "pgbouncer"})
_QUOTED_OR_WORD = re.compile(r'"(?:[^"]|"")*"|[^\s"]+')
WAIT_POLL = 0.05          # seconds between looks while PAUSE / WAIT_CLOSE wait for backends


class AdminError(Exception):
    """A console request that cannot be served; `code` names why (see AdminConsole.failure)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


class Result:
    """What a view or command answers: columns as (name, type name), rows as lists, and the completion tag."""

    __slots__ = ("columns", "rows", "tag")

    def __init__(self, columns: list, rows: list, tag: str):
        self.columns = columns
        self.rows = rows
        self.tag = tag

    def as_json(self, objects: bool = False) -> dict:
        names = [name for name, _ in self.columns]
        if objects:
            return {"command": self.tag, "rows": [dict(zip(names, row)) for row in self.rows]}
        return {"command": self.tag, "columns": [{"name": n, "type": t} for n, t in self.columns], "rows": self.rows}


def parse(text: str) -> tuple[str, list[str]]:
    """A console request -> (VERB, arguments): case-insensitive verb, optional trailing `;`, "quoted" names kept."""
    text = text.strip()
    while text.endswith(";"):
        text = text[:-1].rstrip()
    words = _QUOTED_OR_WORD.findall(text)
    if not words:
        raise AdminError("syntax_error", "empty request: try SHOW HELP")
    verb = words[0].upper()
    args = [word[1:-1].replace('""', '"') if len(word) >= 2 and word[0] == word[-1] == '"' else word
            for word in words[1:]]
    return verb, args


def _when(unix_time: float | None) -> str | None:
    if not unix_time:
        return None
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(unix_time))


def _address(address) -> tuple[str, int]:
    if isinstance(address, tuple) and len(address) >= 2:
        return str(address[0]), int(address[1])
    return str(address or ""), 0


def _ptr(obj) -> str:
    return "0x%x" % id(obj)


POOL_MODES = {"transaction": "transaction", "session": "session"}

# -- the views --------------------------------------------------------------------------------------------------------

POOLS_COLUMNS = [
    ("database", "text"), ("user", "text"), ("cl_active", "int4"), ("cl_waiting", "int4"),
    ("cl_active_cancel_req", "int4"), ("cl_waiting_cancel_req", "int4"), ("sv_active", "int4"),
    ("sv_active_cancel", "int4"), ("sv_being_canceled", "int4"), ("sv_idle", "int4"), ("sv_used", "int4"),
    ("sv_tested", "int4"), ("sv_login", "int4"), ("maxwait", "int4"), ("maxwait_us", "int4"), ("pool_mode", "text"),
    ("load_balance_hosts", "text"),
    # multiproxy's own
    ("cluster", "text"), ("role", "text"), ("engine", "text"), ("variant", "text"), ("max_size", "int4"),
    ("paused", "int4"),
]
SOCKET_COLUMNS = [
    ("type", "text"), ("user", "text"), ("database", "text"), ("replication", "text"), ("state", "text"),
    ("addr", "text"), ("port", "int4"), ("local_addr", "text"), ("local_port", "int4"), ("connect_time", "text"),
    ("request_time", "text"), ("wait", "int4"), ("wait_us", "int4"), ("close_needed", "int4"), ("ptr", "text"),
    ("link", "text"), ("remote_pid", "int4"), ("tls", "text"), ("application_name", "text"),
    ("prepared_statements", "int4"), ("id", "int4"),
]
CLIENT_COLUMNS = SOCKET_COLUMNS + [("cluster", "text"), ("engine", "text"), ("listener", "text"), ("pinned", "int4")]
SERVER_COLUMNS = SOCKET_COLUMNS + [("cluster", "text"), ("engine", "text"), ("role", "text")]
STATS_FIELDS = ["server_assignment_count", "xact_count", "query_count", "received", "sent", "xact_time", "query_time",
                "wait_time", "client_parse_count", "server_parse_count", "bind_count", "client_login_count"]
DATABASES_COLUMNS = [
    ("name", "text"), ("host", "text"), ("port", "int4"), ("database", "text"), ("force_user", "text"),
    ("pool_size", "int4"), ("min_pool_size", "int4"), ("reserve_pool_size", "int4"), ("server_lifetime", "int4"),
    ("pool_mode", "text"), ("load_balance_hosts", "text"), ("max_connections", "int4"),
    ("current_connections", "int4"), ("max_client_connections", "int4"), ("current_client_connections", "int4"),
    ("paused", "int4"), ("disabled", "int4"),
    # PgBouncer before 1.20 named reserve_pool_size so (tools written then read it); then multiproxy's own
    ("reserve_pool", "int4"), ("cluster", "text"), ("engine", "text"),
]
USERS_COLUMNS = [
    ("name", "text"), ("pool_size", "text"), ("reserve_pool_size", "text"), ("pool_mode", "text"),
    ("max_user_connections", "int4"), ("current_connections", "int4"), ("max_user_client_connections", "int4"),
    ("current_client_connections", "int4"),
]

HELP = [
    "SHOW HELP|POOLS|CLIENTS|SERVERS|STATS|STATS_TOTALS|STATS_AVERAGES|DATABASES|USERS|CONFIG|LISTS|VERSION|STATE",
    "SHOW PINS|CLUSTERS|EVENTS   (multiproxy's own)",
    "PAUSE [db]   RESUME [db]   RECONNECT [db]   WAIT_CLOSE [db]   KILL [db]",
    "DISABLE db   ENABLE db   RELOAD   SHUTDOWN",
]


class Console:
    """The console's state on one proxy (paused and disabled databases, recent events) and its views and commands."""

    def __init__(self, proxy):
        self.proxy = proxy
        self.paused: set[str] = set()        # database names; "*" pauses every database
        self.disabled: set[str] = set()
        self.resumed = Event()               # replaced and set on each RESUME: paused borrowers wait on it
        self.events: collections.deque = collections.deque(maxlen=200)
        self.stats_since = time.time()

    # ------------------------------------------------------------------ state read by pools and sessions

    def is_paused(self, database: str) -> bool:
        return "*" in self.paused or database in self.paused

    def is_disabled(self, database: str) -> bool:
        return database in self.disabled

    def record(self, event: str, **fields) -> None:
        """One line of SHOW EVENTS (a small ring buffer: the newest 200)."""
        self.events.append({"time": time.time(), "event": event, **fields})

    def may_use(self, user: str) -> str | None:
        """'admin' (every command), 'stats' (SHOW only) or None (not allowed)."""
        admin = self.proxy.config.admin
        if user in admin.users:
            return "admin"
        if user in admin.stats_users:
            return "stats"
        return None

    # ------------------------------------------------------------------ entry point

    def execute(self, text: str, may_command: bool = True, local: bool = False) -> Result:
        """Run a console request. With forked workers views and commands answer for the whole group (a peer's
        request runs with `local`, on that worker alone)."""
        verb, args = parse(text)
        self.proxy.sessions.count_quiet()   # (the relay's quiet logins and goodbyes in what the console shows)
        if verb in ("SHOW", "SELECT"):
            if not args:
                raise AdminError("syntax_error", "SHOW needs a view name: try SHOW HELP")
            return self.show(args[0], args[1:], local)
        command = COMMANDS.get(verb)
        if command is None and verb in ("BEGIN", "START", "COMMIT", "END", "ROLLBACK", "ABORT"):
            raise AdminError("feature_not_supported", "the admin console runs no transactions: connect in autocommit "
                             "mode (psycopg: autocommit=True), as with PgBouncer's console")
        if command is None:
            raise AdminError("syntax_error", f"unknown command {verb!r}: the console takes SHOW, PAUSE, RESUME, "
                             "RECONNECT, WAIT_CLOSE, KILL, DISABLE, ENABLE, RELOAD and SHUTDOWN (try SHOW HELP)")
        if not may_command:
            raise AdminError("insufficient_privilege", f"{verb} is not allowed for [admin] stats_users, which may "
                             "only SHOW: add the user to [admin] users to run commands")
        group = getattr(self.proxy, "group", None)
        if local or group is None or verb not in GROUP_COMMANDS:
            return command(self, args)
        return self._everywhere(group, verb, text, lambda: command(self, args))

    def _everywhere(self, group, verb: str, text: str, run_here) -> Result:
        """A command on every worker at once (each acts on its own pools and clients): the answer once all did.
        A database that no worker knows is an error, as with one process; one that only some know is not."""
        asking = gevent.spawn(group.ask, {"op": "execute", "text": text}, COMMAND_TIMEOUT)
        unknown, result = None, None
        try:
            result = run_here()
        except AdminError as exc:
            if exc.code != "undefined_object":
                asking.kill(block=False)
                raise
            unknown = exc
        answers = asking.get()
        down = sorted(worker for worker, answer in answers.items() if answer is None)
        if down:
            log.warning("admin: %s did not reach workers %s (not answering)", verb, down)
        for answer in answers.values():
            if answer and "error" in answer and answer.get("code") != "undefined_object":
                raise AdminError(answer.get("code") or "internal_error", answer["error"])
        if unknown is not None:
            if not any(answer and "ok" in answer for answer in answers.values()):
                raise unknown
            result = Result([], [], verb)
        return result

    def show(self, name: str, args: list | None = None, local: bool = False) -> Result:
        view = VIEWS.get(name.lower())
        if view is None:
            raise AdminError("undefined_object", f"unknown view {name!r}: try SHOW HELP")
        columns, rows = view(self)
        group = getattr(self.proxy, "group", None)
        if not local and group is not None and name.lower() in MERGED_VIEWS:
            answers = {self.proxy.worker: rows}
            for worker, answer in group.ask({"op": "show", "view": name.lower()}).items():
                if answer and "ok" in answer:
                    answers[worker] = answer["ok"]["rows"]
                else:
                    log.warning("admin: SHOW %s: worker %d did not answer; its rows are missing", name, worker)
            columns, rows = merge_view(name.lower(), columns, answers)
        return Result(columns, rows, "SHOW")

    # ------------------------------------------------------------------ helpers over the proxy's state

    def _pools(self, database: str | None = None) -> list:
        return [pool for pool in list(self.proxy.pools.values()) if database is None or pool.database == database]

    def _clients(self) -> list:
        return [s for s in list(self.proxy.sessions) if s.pool is not None]

    def _admin_clients(self) -> list:
        return [s for s in list(self.proxy.sessions) if s.pool is None and s.database in CONSOLE_DATABASES]

    def _check_database(self, database: str | None) -> None:
        if database is None or database == "*":
            return
        known = {pool.database for pool in self.proxy.pools.values()}
        if database not in known and database not in self.paused and database not in self.disabled:
            raise AdminError("undefined_object", f"no such database: {database!r} (SHOW DATABASES lists the "
                             "databases clients use now)")

    # ------------------------------------------------------------------ views

    def view_help(self):
        return [("help", "text")], [[line] for line in HELP]

    def view_pools(self):
        sessions = self._clients()
        by_pool = collections.Counter(id(s.pool) for s in sessions)
        rows = []
        now = time.monotonic()
        for pool in self._pools():
            waiting = pool.waiting_count + pool.paused_waiting
            longest = now - min(pool.waiting_since.values()) if pool.waiting_since else 0.0
            clients = by_pool.get(id(pool), 0)
            rows.append([pool.database, pool.user, max(0, clients - waiting), waiting, 0, 0, pool.borrowed, 0, 0,
                         pool.idle_count, 0, 0, len(pool.opening), int(longest), int(longest % 1 * 1_000_000),
                         pool.config.mode, None,
                         pool.cluster.name, pool.role, pool.engine.name, pool.variant_name, pool.config.max_size,
                         int(pool.paused)])
        return POOLS_COLUMNS, rows

    def _socket_row(self, kind, user, database, state, peer, local, connect_time, request_time, close_needed, obj,
                    link, remote_pid, tls, application_name, ident):
        host, port = _address(peer)
        lhost, lport = _address(local)
        return [kind, user, database, "no", state, host, port, lhost, lport, _when(connect_time), _when(request_time),
                0, 0, close_needed, _ptr(obj), _ptr(link) if link is not None else None, remote_pid, tls,
                application_name, 0, ident]

    def view_clients(self):
        rows = []
        for session in list(self.proxy.sessions):
            if not session.user:
                continue          # still logging in
            backend = session.backend
            # A client the relay greeted and still serves has no socket object or client protocol yet (relay logins'
            # GreetedSession): what is shown of it comes from its template and its listener.
            greeted = session.template
            proto = session.proto if greeted is None else None
            state = "active" if backend is not None else "idle"
            params = (getattr(proto, "startup_params", None) if greeted is None else greeted.startup_params) or {}
            sock = session.sock if greeted is None else None
            tls = None
            version = getattr(sock, "version", None)
            if callable(version):
                try:
                    tls = version()
                except (OSError, ValueError):
                    tls = None
            try:
                local = sock.getsockname() if greeted is None else session.listener.listen
            except (OSError, ValueError, AttributeError):
                local = ("", 0)
            key = session.cancel_key
            ident = key[0] if isinstance(key, tuple) else key if isinstance(key, int) else 0
            row = self._socket_row("C", session.user, session.database, state, session.address, local,
                                   session.connected_at, session.connected_at, 0, session,
                                   backend, 0, tls, params.get("application_name"), ident & 0x7FFFFFFF)
            rows.append(row + [session.runtime.cluster.name, session.engine.name, session.listener.name,
                               int(bool(proto is not None and proto.pinned))])
        return CLIENT_COLUMNS, rows

    def view_servers(self):
        rows = []
        wall = time.time() - time.monotonic()
        for pool in self._pools():
            for conn, state in ([(c, "active") for c in list(pool.in_use)] + [(c, "idle") for c in list(pool.idle)]
                                + [(c, "relay") for c in list(pool.lent)]):
                try:
                    local = conn.sock.getsockname()
                except (OSError, ValueError, AttributeError):
                    local = ("", 0)
                # PostgreSQL's backend pid, MySQL's connection (thread) id
                remote_pid = getattr(conn.state, "pid", 0) or getattr(conn.state, "thread_id", 0) or 0
                version = getattr(conn.sock, "version", None)
                tls = version() if callable(version) else None
                rows.append(self._socket_row(
                    "S", pool.user, pool.database, state, conn.address, local, wall + conn.created, wall + conn.last_used,
                    int(conn.generation != pool.generation), conn, conn.session, int(remote_pid) & 0x7FFFFFFF, tls,
                    None, id(conn) & 0x7FFFFFFF) + [pool.cluster.name, pool.engine.name, pool.role])
            for _ in range(len(pool.opening)):
                rows.append(self._socket_row("S", pool.user, pool.database, "new", None, None, None, None, 0, pool,
                                             None, 0, None, None, 0) + [pool.cluster.name, pool.engine.name, pool.role])
        return SERVER_COLUMNS, rows

    def _stats_by_database(self) -> dict:
        """database -> totals of STATS_FIELDS over its pools (what the proxy counts; the rest stays 0)."""
        totals: dict = {}
        live_requests = collections.Counter()
        for session in list(self.proxy.sessions):
            if session.pool is not None and session.template is None and session.proto is not None:
                live_requests[session.pool.database] += getattr(session.proto, "requests", 0)
        for pool in self._pools():
            t = totals.setdefault(pool.database, dict.fromkeys(STATS_FIELDS, 0))
            relayed = pool.relay_transactions if pool.relay_lanes or pool.relay_transactions_closed else 0
            t["server_assignment_count"] += pool.borrows_total + relayed
            t["xact_count"] += pool.borrows_total + relayed
            t["query_count"] += pool.closed_requests_total + relayed
            t["wait_time"] += int(pool.borrow_wait_seconds_total * 1_000_000)
            t["client_login_count"] += pool.logins_total
        for database, requests in live_requests.items():
            totals.setdefault(database, dict.fromkeys(STATS_FIELDS, 0))["query_count"] += requests
        return totals

    def view_stats(self):
        elapsed = max(1.0, time.time() - self.stats_since)
        columns = [("database", "text")]
        columns += [(f"total_{f}", "numeric") for f in STATS_FIELDS]
        columns += [(f"avg_{'recv' if f == 'received' else f}", "numeric") for f in STATS_FIELDS]
        columns += [("total_requests", "numeric")]   # PgBouncer before 1.8 (tools written then read it)
        rows = []
        for database, t in sorted(self._stats_by_database().items()):
            rows.append([database] + [t[f] for f in STATS_FIELDS] + [int(t[f] / elapsed) for f in STATS_FIELDS]
                        + [t["query_count"]])
        return columns, rows

    def view_stats_totals(self):
        columns = [("database", "text")] + [(("bytes_" + f) if f in ("received", "sent") else f, "numeric")
                                            for f in STATS_FIELDS]
        rows = [[database] + [t[f] for f in STATS_FIELDS] for database, t in sorted(self._stats_by_database().items())]
        return columns, rows

    def view_stats_averages(self):
        elapsed = max(1.0, time.time() - self.stats_since)
        names = []
        for f in STATS_FIELDS:
            names.append("bytes_" + f if f in ("received", "sent") else
                         "avg_" + f if f.endswith("parse_count") or f in ("bind_count", "client_login_count") else f)
        columns = [("database", "text")] + [(name, "numeric") for name in names]
        rows = [[database] + [int(t[f] / elapsed) for f in STATS_FIELDS]
                for database, t in sorted(self._stats_by_database().items())]
        return columns, rows

    def view_databases(self):
        proxy = self.proxy
        clients = collections.Counter((s.runtime.cluster.name, s.database) for s in self._clients())
        seen: dict = {}
        for pool in self._pools():
            seen.setdefault((pool.cluster.name, pool.database), []).append(pool)
        for database in sorted(self.paused | self.disabled):
            if database != "*" and not any(key[1] == database for key in seen):
                seen.setdefault(("", database), [])
        rows = []
        for (cluster_name, database), pools in sorted(seen.items()):
            cluster = proxy.config.clusters.get(cluster_name)
            host, port, force_user, engine = None, None, None, None
            if cluster is not None:
                address = None
                if proxy.registry is not None and cluster_name in proxy.registry.clusters:
                    address = proxy.registry.clusters[cluster_name].writer
                address = address or (cluster.hosts[0] if cluster.hosts else None)
                if address:
                    host, port = address
                named = [c.backend_user for c in cluster.credentials if c.backend_user]
                force_user = named[0] if len(set(named)) == 1 and len(named) == len(cluster.credentials) else None
                engine = cluster.engine
            pool_config = cluster.pool if cluster is not None else None
            rows.append([
                database, host, port, database, force_user,
                pool_config.max_size if pool_config else 0, pool_config.min_size if pool_config else 0, 0,
                int(pool_config.max_lifetime) if pool_config else 0, pool_config.mode if pool_config else None, None,
                0, sum(pool.size for pool in pools), 0, clients.get((cluster_name, database), 0),
                int(self.is_paused(database)), int(self.is_disabled(database)), 0, cluster_name or None, engine])
        return DATABASES_COLUMNS, rows

    def view_users(self):
        proxy = self.proxy
        names = set(proxy.users.names()) if hasattr(proxy.users, "names") else set()
        names |= {pool.user for pool in self._pools()}
        connections = collections.Counter()
        for pool in self._pools():
            connections[pool.user] += pool.size
        rows = []
        for name in sorted(names):
            record = proxy.users.get(name)
            max_clients = (record.max_connections if record is not None else 0) or 0
            mode = record.pool_mode if record is not None and record.pool_mode else None
            rows.append([name, "", "", mode, 0, connections.get(name, 0), max_clients, proxy.user_sessions(name)])
        return USERS_COLUMNS, rows

    def view_config(self):
        from .config import ADMIN_SETTINGS, BACKEND_SETTINGS, HEALTH_SETTINGS, POOL_SETTINGS, PROXY_SETTINGS
        config = self.proxy.config
        rows = []
        for name, setting in PROXY_SETTINGS.items():
            # changeable: applied by RELOAD (multiproxy.reload); workers and admin_listen need a restart
            rows.append([f"proxy.{name}", _text(getattr(config.proxy, name)), _text(setting.default),
                         "no" if name in ("workers", "admin_listen") else "yes"])
        for name, setting in ADMIN_SETTINGS.items():
            rows.append([f"admin.{name}", _text(getattr(config.admin, name)), _text(setting.default), "yes"])
        rows.append(["auth.users_file", config.users_file, "", "yes"])
        for cluster_name, cluster in config.clusters.items():
            for section, declared, values in (("pool", POOL_SETTINGS, cluster.pool),
                                              ("backend", BACKEND_SETTINGS, cluster.backend),
                                              ("health", HEALTH_SETTINGS, cluster.health)):
                for name, setting in declared.items():
                    if hasattr(values, name):
                        rows.append([f"clusters.{cluster_name}.{section}.{name}", _text(getattr(values, name)),
                                     _text(setting.default), "yes"])
        return [("key", "text"), ("value", "text"), ("default", "text"), ("changeable", "text")], rows

    def view_lists(self):
        proxy = self.proxy
        pools = self._pools()
        used_servers = sum(len(p.idle) + len(p.in_use) + len(p.lent) for p in pools)
        dns_names = 0
        if proxy.registry is not None:
            dns_names = sum(len(state.watches) for state in proxy.registry.clusters.values())
        items = [
            ("databases", len({(p.cluster.name, p.database) for p in pools})),
            ("users", len({p.user for p in pools} | (set(proxy.users.names()) if hasattr(proxy.users, "names") else set()))),
            ("peers", 0), ("pools", len(pools)), ("peer_pools", 0),
            ("free_clients", 0), ("used_clients", len(proxy.sessions)), ("login_clients", len(proxy.handshaking)),
            ("free_servers", 0), ("used_servers", used_servers),
            ("dns_names", dns_names), ("dns_zones", 0), ("dns_queries", 0), ("dns_pending", 0),
        ]
        return [("list", "text"), ("items", "int4")], [[name, count] for name, count in items]

    def view_version(self):
        return [("version", "text")], [[f"multiproxy {__version__} (PgBouncer-style admin console)"]]

    def view_state(self):
        everything = "*" in self.paused
        return [("key", "text"), ("value", "text")], [
            ["active", "no" if everything else "yes"], ["paused", "yes" if everything else "no"],
            ["suspended", "no"]]

    def view_pins(self):
        rows = []
        for session in self._clients():
            proto = session.proto if session.template is None else None     # (a greeted client has no pins)
            if proto is None or not proto.pinned:
                continue
            host, port = _address(session.address)
            for reason, detail, since in session.runtime.pin_policy.pins_of(proto):
                rows.append([host, port, session.user, session.database, session.listener.name,
                             session.runtime.cluster.name, session.engine.name, reason, detail, _when(since)])
        return [("addr", "text"), ("port", "int4"), ("user", "text"), ("database", "text"), ("listener", "text"),
                ("cluster", "text"), ("engine", "text"), ("reason", "text"), ("statement", "text"),
                ("since", "text")], rows

    def view_clusters(self):
        proxy = self.proxy
        snapshot = proxy.registry.snapshot() if proxy.registry is not None else {}
        rows = []
        for name, cluster in proxy.config.clusters.items():
            state = snapshot.get(name)
            if state is None:
                for i, (host, port) in enumerate(cluster.hosts):
                    rows.append([name, cluster.engine, "hosts", f"{host}:{port}", "writer" if i == 0 else "reader",
                                 None, "yes" if i == 0 else "reader", None, "static: no registry (one host, no endpoints)"
                                 if len(cluster.hosts) == 1 else "static: first host is the writer"])
                continue
            serving = state["serving"]
            endpoints = ", ".join(f"{kind}={e['name']}" for kind, e in state["endpoints"].items())
            for node in state["nodes"]:
                roles = [role for role, addresses in serving.items() if node["address"] in addresses]
                rows.append([name, cluster.engine, endpoints or ",".join(node["sources"]), node["address"],
                             node["role"], node["lag"], ",".join(roles) or "no", node["skipped"],
                             node["error"] or None])
        return [("cluster", "text"), ("engine", "text"), ("endpoints", "text"), ("node", "text"), ("role", "text"),
                ("lag", "float8"), ("serving", "text"), ("skipped", "text"), ("note", "text")], rows

    def view_events(self):
        events = list(self.events)
        if self.proxy.registry is not None:
            for event in list(self.proxy.registry.events):
                events.append({**event, "event": f"registry.{event.get('event', '')}"})
        events.sort(key=lambda e: e.get("time", 0))
        rows = []
        for event in events[-200:]:
            detail = ", ".join(f"{k}={v}" for k, v in event.items()
                               if k not in ("time", "event", "cluster", "database") and v not in (None, "", [], {}))
            rows.append([_when(event.get("time")), event.get("event"), event.get("cluster"), event.get("database"),
                         detail or None])
        return [("time", "text"), ("event", "text"), ("cluster", "text"), ("database", "text"), ("detail", "text")], rows

    # ------------------------------------------------------------------ commands

    def _target(self, verb: str, args: list, required: bool = False) -> str | None:
        if len(args) > 1:
            raise AdminError("syntax_error", f"{verb} takes at most one database name, got {' '.join(args)!r}")
        if required and not args:
            raise AdminError("syntax_error", f"{verb} needs a database name: {verb} db")
        database = args[0] if args else None
        return None if database == "*" else database

    def pause(self, args: list) -> Result:
        """Stop lending backends of the database's pools (all without a name) and close them, idle ones now and
        borrowed ones as they come back (as PgBouncer, so that the server can restart); answer once none is
        borrowed."""
        database = self._target("PAUSE", args)
        self._check_database(database)
        self.paused.add(database or "*")
        for pool in self._pools(database):
            pool.paused = True
            pool.reconnect()
        self.record("pause", database=database or "*")
        log.info("admin: PAUSE %s: waiting for borrowed backends to come back", database or "(all)")
        while any(pool.borrowed for pool in self._pools(database)):
            if not self.is_paused(database or "*"):
                raise AdminError("invalid_parameter", f"{database or 'every database'} was resumed before its "
                                 "borrowed backends came back")
            gevent.sleep(WAIT_POLL)
        return Result([], [], "PAUSE")

    def resume(self, args: list) -> Result:
        database = self._target("RESUME", args)
        if database is None:
            self.paused.clear()
        elif database in self.paused:
            self.paused.discard(database)
        elif "*" not in self.paused:
            raise AdminError("invalid_parameter", f"database {database!r} is not paused")
        for pool in self._pools():
            pool.paused = self.is_paused(pool.database)
        relay_core.attend()     # (relay lanes judge their pools at their next wake-up)
        woken, self.resumed = self.resumed, Event()
        woken.set()
        self.record("resume", database=database or "*")
        log.info("admin: RESUME %s", database or "(all)")
        return Result([], [], "RESUME")

    def reconnect(self, args: list) -> Result:
        """Close idle backends now and borrowed ones when they come back (new ones log in afresh)."""
        database = self._target("RECONNECT", args)
        self._check_database(database)
        for pool in self._pools(database):
            pool.reconnect()
        self.record("reconnect", database=database or "*")
        return Result([], [], "RECONNECT")

    def wait_close(self, args: list) -> Result:
        """Wait until the backends closed by RECONNECT (or a failover drain) are gone."""
        database = self._target("WAIT_CLOSE", args)
        self._check_database(database)
        while any(conn.generation != pool.generation for pool in self._pools(database) for conn in pool.connections):
            gevent.sleep(WAIT_POLL)
        return Result([], [], "WAIT_CLOSE")

    def kill(self, args: list) -> Result:
        """Close the database's clients and backends at once; as in PgBouncer the database stays paused (RESUME)."""
        database = self._target("KILL", args)
        self._check_database(database)
        self.paused.add(database or "*")
        clients = [s for s in self._clients() if database is None or s.database == database]
        for session in clients:
            session.terminate()
        for pool in self._pools(database):
            pool.paused = True
            pool.reconnect()
        self.record("kill", database=database or "*", clients=len(clients))
        log.warning("admin: KILL %s: %d clients closed", database or "(all)", len(clients))
        return Result([], [], "KILL")

    def disable(self, args: list) -> Result:
        database = self._target("DISABLE", args, required=True)
        self.disabled.add(database)
        relay_core.attend()     # (the relay logins' doors stop greeting at their next wake-up)
        self.record("disable", database=database)
        return Result([], [], "DISABLE")

    def enable(self, args: list) -> Result:
        database = self._target("ENABLE", args, required=True)
        if database not in self.disabled:
            raise AdminError("invalid_parameter", f"database {database!r} is not disabled")
        self.disabled.discard(database)
        relay_core.attend()
        self.record("enable", database=database)
        return Result([], [], "ENABLE")

    def reload(self, args: list) -> Result:
        self._target("RELOAD", args[:0])
        problems = self.proxy.reload()
        self.record("reload", problems="; ".join(problems) if problems else None)
        if problems:
            raise AdminError("internal_error", f"reload failed, nothing changed ({len(problems)} problem(s); fix the "
                             "config file and RELOAD again): " + "; ".join(problems))
        return Result([], [], "RELOAD")

    def shutdown(self, args: list) -> Result:
        self.record("shutdown")
        log.warning("admin: SHUTDOWN requested")
        gevent.spawn_later(0.05, self.proxy.request_shutdown)
        return Result([], [], "SHUTDOWN")


def _text(value) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value)
    return "" if value is None else str(value)


VIEWS = {
    "help": Console.view_help, "pools": Console.view_pools, "clients": Console.view_clients,
    "servers": Console.view_servers, "stats": Console.view_stats, "stats_totals": Console.view_stats_totals,
    "stats_averages": Console.view_stats_averages, "databases": Console.view_databases, "users": Console.view_users,
    "config": Console.view_config, "lists": Console.view_lists, "version": Console.view_version,
    "state": Console.view_state, "pins": Console.view_pins, "clusters": Console.view_clusters,
    "events": Console.view_events,
}
# Commands every worker runs (RELOAD reaches every worker through the supervisor, SHUTDOWN stops the supervisor).
GROUP_COMMANDS = frozenset({"PAUSE", "RESUME", "RECONNECT", "WAIT_CLOSE", "KILL", "DISABLE", "ENABLE"})
COMMANDS = {
    "PAUSE": Console.pause, "RESUME": Console.resume, "RECONNECT": Console.reconnect, "WAIT_CLOSE": Console.wait_close,
    "KILL": Console.kill, "DISABLE": Console.disable, "ENABLE": Console.enable, "RELOAD": Console.reload,
    "SHUTDOWN": Console.shutdown,
}
