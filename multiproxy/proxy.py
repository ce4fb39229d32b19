"""The proxy process: listeners, pools, cancel routing, housekeeping, signals, graceful drain."""
from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import signal
import socket as _stdsocket
import time

import gevent
from gevent import socket
from gevent.event import Event

from . import relay_core
from . import reload as live_reload
from . import systemd, takeover
from .acceptor import Acceptor
from .admin import Console
from .audit import AuditLog
from .auth import UsersFile
from .backends import open_socket, run_script
from .config import ClusterConfig, Config, ListenerConfig
from .engine import BackendTarget, ErrorKind, StatementCounts
from .handover import decode, encode
from .metrics import Metrics, start_admin_server
from .parking import IdleParking
from .pinning import PinPolicy
from .pool import Pool
from .registry import Registry
from .relay_lanes import RelayLanes
from .secrets import CachedSecret, SecretError
from .session import Session
from .throttle import LoginThrottle
from .tls import backend_leg_context, client_leg_context

log = logging.getLogger("multiproxy.proxy")
HOUSEKEEPING_INTERVAL = 1.0



class Sessions(set):
    """Proxy.sessions: the sessions of the proxy's clients. The clients a relay lane keeps quietly (relay logins, a
    quiet greeting: multiproxy.relay_logins) have none until one is needed: `len` counts them (`quiet`), and iterating
    makes their sessions first (`materialize`, set by the relay lanes), so every reader sees every client. The lanes
    count quiet clients' logins and goodbyes only when asked (`count_quiet`, set by them): `len` asks, and so must
    every reader of what they count (listener and per-user connections, login totals) before it reads."""

    __slots__ = ("quiet", "materialize", "settle")

    def __init__(self):
        super().__init__()
        self.quiet = 0
        self.materialize = None
        self.settle = None

    def count_quiet(self) -> None:
        """The quiet clients' logins and goodbyes so far are counted now (RelayLanes.count_quiet)."""
        if self.settle is not None:
            self.settle()

    def __len__(self) -> int:
        if self.settle is not None:
            self.settle()
        return set.__len__(self) + self.quiet

    def __iter__(self):
        if self.materialize is not None:
            self.materialize()      # (it counts the quiet clients first: `quiet` may not have them yet)
        return set.__iter__(self)

    def known(self):
        """The sessions made so far, quiet clients left as they are (the parking sweep: a quiet client is idle in its
        relay already)."""
        return set.__iter__(self)

class ListenerRuntime:
    """A configured listener with what its sessions need: engine, cluster, TLS context, pin policy."""

    def __init__(self, config: ListenerConfig, cluster: ClusterConfig, engine, pin_policy: PinPolicy):
        self.engine = engine
        self.reconfigure(config, cluster, pin_policy, self.tls_context_for(config))
        self.acceptor: Acceptor | None = None
        self.connections = 0
        self.cancel_callback = None    # ClientContext.cancel for this listener's sessions (set by the Proxy)

    @staticmethod
    def tls_context_for(config: ListenerConfig):
        """The client-leg TLS context of `config` (its files read now), None without TLS."""
        return client_leg_context(
            config.tls_cert_file, config.tls_key_file, config.tls_min_version, config.tls_ciphers,
            config.tls_client_ca_file, config.tls_verify_client) if config.tls_cert_file else None

    def reconfigure(self, config: ListenerConfig, cluster: ClusterConfig, pin_policy: PinPolicy, tls_context) -> None:
        """Start or reload: what new clients of this listener get (connected ones keep what they started with)."""
        self.config = config
        self.cluster = cluster
        self.pin_policy = pin_policy
        choice = cluster.backend.reset_after_transaction
        self.reset_after_transaction = (choice == "yes" or (choice == "auto"
                                        and getattr(self.engine, "reset_after_transaction_default", False)))
        self.tls_context = tls_context

    def wrap_client_tls(self, sock):
        from gevent import ssl as gssl
        # The handshake runs later, under the session's handshake timeout, once the session owns the socket.
        return gssl.SSLContext.wrap_socket(self.tls_context, sock, server_side=True, do_handshake_on_connect=False)


class Proxy:
    """Everything one worker process runs."""

    # While a takeover drains this process: called with each session that has just given its backend back, so that
    # an idle client goes to the new process at once (multiproxy.takeover).
    idle_hook = None
    # After a takeover, while the old process still finishes its clients: passes it a cancel for a key not known here
    # (returns True when passed).
    cancel_elsewhere = None

    def __init__(self, config: Config, engines: dict, worker: int = 0):
        self.config = config
        self.engines = engines                # name -> Engine instance
        self.worker = worker
        self.users = UsersFile.load(config.users_file) if config.users_file else UsersFile.empty()
        self.metrics = Metrics(self)
        self.pools: dict[tuple, Pool] = {}
        self.sessions: Sessions = Sessions()
        self.balance = None          # a worker of a process group: the group's client counts (multiproxy.balance)
        self.handshaking: dict = {}           # session -> monotonic deadline, while a plaintext client logs in
        self.by_cancel_key: dict = {}
        # With forked workers: the cancel keys of clients a worker retired by SIGTTOU handed over -> the worker that
        # serves each now (their keys name the retired index; multiproxy.scaling).
        self.moved_cancel_keys: dict = {}
        self.sessions_per_user: dict[str, int] = {}
        self.connections_by_address: dict[str, int] = {}
        pc = config.proxy
        # [proxy] relay = "compiled": idle clients and spare backends are served by the relay core (restart-only)
        self.relay_lanes = RelayLanes(self, pc.relay) if getattr(pc, "relay", "python") == "compiled" else None
        self.audit = AuditLog(pc.audit_log)
        self.throttle = LoginThrottle(pc.auth_failure_delay, pc.auth_failure_max_delay, pc.auth_failure_block_after,
                                      pc.auth_failure_block_seconds)
        self._cancel_counter = itertools.count(1)
        self.cancel_keys_issued = 0           # the counter of the latest key (worker custody passes it on)
        self.pin_policies = {name: PinPolicy(c.pinning, name) for name, c in config.clusters.items()}
        self.statement_counts = {name: StatementCounts() for name in config.clusters}
        self.secrets: dict[tuple, CachedSecret] = {}
        self.listeners: list[ListenerRuntime] = []
        for lc in config.listeners:
            cluster = config.clusters[lc.cluster]
            rt = ListenerRuntime(lc, cluster, engines[cluster.engine], self.pin_policies[lc.cluster])
            rt.cancel_callback = self._cancel_callback(rt.engine)
            self.listeners.append(rt)
        self.started = time.time()
        self.stopping = False
        self.console = Console(self)          # the admin console's state, views and commands
        self.shutdown_requested = Event()   # SIGTERM, SIGINT or the console's SHUTDOWN
        self.admin = None
        self._housekeeper = None
        self.registry = None   # the failover registry, when clusters follow DNS endpoints or list several hosts
        followed = {name: c for name, c in config.clusters.items() if Registry.wanted(c)}
        if followed:
            self.registry = Registry(self, followed, engines)
        self.worker_count = 1
        self.cancel_socket = None
        self.link = None      # with forked workers: the channel to the supervisor (supervisor.WorkerLink)
        self.custody = None   # with forked workers and proxy.worker_custody: custody.WorkerCustody
        self.parking = IdleParking(self)   # parks the sessions of idle clients (no greenlet per idle client)
        self.group = None     # with forked workers: the peers, for one view of the group (groupview.GroupView)

    # ------------------------------------------------------------------ lifecycle

    def start(self, listen_sockets: dict | None = None, admin_socket=None) -> None:
        """Accept on the listeners (on `listen_sockets` by listener name where given, and the admin HTTP server on
        `admin_socket`: the sockets the supervisor bound, or a takeover brought)."""
        for rt in self.listeners:
            host, port = rt.config.listen
            sock = (listen_sockets or {}).get(rt.config.name)
            if sock is None:
                # With forked workers, a listener a reload added that the supervisor could not bind is bound by
                # each worker (SO_REUSEPORT), as the running workers did in their reload; so is one a group's
                # takeover brought no socket for (its workers bound it that way, and still hold it while they drain).
                sock = make_listen_socket(host, port, reuse_port=self.worker_count > 1 or bool(listen_sockets))
            self._start_listener(rt, sock)
        if self.config.proxy.admin_listen and self.worker == 0:
            self.admin = start_admin_server(self.config.proxy.admin_listen, self, admin_socket)
        elif self.config.proxy.admin_listen and self.worker_count > 1:
            from .status_page import Sampler   # the status page in worker 0 shows this worker's pools too
            Sampler(self).start()
        self._housekeeper = gevent.spawn(self._housekeeping)
        self._janitor = gevent.spawn(self._handshake_deadlines)
        self.parking.start()
        if self.registry is not None:
            self.registry.start()

    def _handler(self, rt: ListenerRuntime):
        metrics = self.metrics

        def handle(sock, address, first=b"", answered=None):
            limit = rt.config.max_client_connections                  # read per client: a reload may change them
            per_address = self.config.proxy.max_connections_per_address
            if limit:
                self.sessions.count_quiet()     # (rt.connections with the relay's quiet logins)
            session = Session(self, rt, sock, address)
            session.leftover = first        # bytes a relay login door read (Session.handshake reads them first)
            session.answered = answered     # (how many of them the relay answered, its SCRAM nonce)
            source = address[0] if isinstance(address, tuple) else str(address)
            reject = None
            blocked = self.throttle.blocked_for(source)
            if self.stopping:
                reject = (ErrorKind.SHUTTING_DOWN, "multiproxy is shutting down; reconnect in a moment")
            elif blocked:
                reject = (ErrorKind.AUTH_FAILED, f"too many failed logins from {source}; this address is blocked for "
                          f"{blocked:.0f} more seconds (proxy.auth_failure_block_after)")
            elif limit and rt.connections >= limit:
                reject = (ErrorKind.TOO_MANY_CONNECTIONS,
                          f"listener {rt.config.name!r} has reached max_client_connections ({limit}); retry later")
            elif per_address and self.connections_by_address.get(source, 0) >= per_address:
                reject = (ErrorKind.TOO_MANY_CONNECTIONS,
                          f"{source} already has {per_address} connections, proxy.max_connections_per_address; "
                          "close some and retry")
            if reject is not None:
                # Turned away after its login, so that the client reads the reason in its own protocol.
                metrics.rejected_connections += 1
                if reject[0] is not ErrorKind.SHUTTING_DOWN:
                    self.audit.record("limit", listener=rt.config.name, address=source, reason=reject[1],
                                      blocked_seconds=round(blocked, 1) if blocked else None)
                session.reject = reject
                return session.run()
            metrics.client_connections_total += 1
            return self.serve_session(rt, session, source, session.run)
        return handle

    def serve_session(self, rt: ListenerRuntime, session: Session, source: str, run) -> bool:
        """Count `session` as a client of `rt` from `source` and serve it with `run` (Session.run for a client accepted
        here, Session.resume for one a takeover brought). True when the session parked: it stays counted until its
        client leaves (client_left)."""
        self.client_came(rt, session, source)
        parked = False
        try:
            parked = run()
        finally:
            if not parked:
                self.client_left(session)
        return parked

    def client_came(self, rt: ListenerRuntime, session: Session, source: str) -> None:
        """The bookkeeping of a client that came (client_left undoes it)."""
        rt.connections += 1
        self.connections_by_address[source] = self.connections_by_address.get(source, 0) + 1
        self.sessions.add(session)
        if self.balance is not None:
            self.balance.publish(self.worker, len(self.sessions))

    def client_left(self, session: Session) -> None:
        """The bookkeeping of a client that really left (not one whose session parked)."""
        self.sessions.discard(session)
        if self.balance is not None:
            self.balance.publish(self.worker, len(self.sessions))
        session.runtime.connections -= 1
        address = session.address
        source = address[0] if isinstance(address, tuple) else str(address)
        left = self.connections_by_address.get(source, 1) - 1
        if left:
            self.connections_by_address[source] = left
        else:
            self.connections_by_address.pop(source, None)

    def resume_parked(self, session: Session) -> None:
        """Called from the hub when a parked session's client sent something (or its connection ended or was closed):
        a greenlet serves the session again, one of its listener's acceptor when there is one."""
        acceptor = session.runtime.acceptor
        if acceptor is not None:
            acceptor.resume(self._serve_resumed, session)
        else:
            gevent.spawn_raw(self._serve_resumed, session)

    def _serve_resumed(self, session: Session) -> bool:
        parked = False
        try:
            parked = session.resume()
        finally:
            if not parked:
                self.client_left(session)
        return parked

    def stop(self, timeout: float | None = None) -> None:
        """Stop accepting, let clients finish for `timeout` seconds, then close everything."""
        if timeout is None:
            timeout = self.config.proxy.shutdown_timeout
        self.stopping = True
        relay_core.attend()     # (the relay lanes' login doors see it at their next wake-up)
        for rt in self.listeners:
            if rt.acceptor is not None:
                rt.acceptor.close()
        deadline = time.monotonic() + timeout
        lanes = self.relay_lanes
        while time.monotonic() < deadline and (any(s.backend is not None for s in list(self.sessions))
                                               or (lanes is not None and lanes.busy())):
            gevent.sleep(0.1)
        if lanes is not None:
            lanes.close()       # their clients park as on the Python path, and are closed below
        for session in list(self.sessions):
            session._send_quietly(session.engine.render_error(ErrorKind.SHUTTING_DOWN,
                                                              "multiproxy is shutting down; reconnect in a moment"))
            try:
                session.sock.close()
            except OSError:
                pass
        for pool in list(self.pools.values()):
            pool.close_all()
        if self._housekeeper is not None:
            self._housekeeper.kill(block=False)
        self.parking.stop()
        if self.admin is not None:
            self.admin.stop()
        if self.registry is not None:
            self.registry.stop()
        self.audit.close()

    def _handshake_deadlines(self) -> None:
        """Time out plaintext clients that do not finish logging in: one sweep for all of them instead of a
        timer per connection (TLS clients use their socket's own timeout)."""
        handshaking = self.handshaking
        while True:
            # Read each round: a reload may change handshake_timeout.
            gevent.sleep(max(0.05, min(0.5, self.config.proxy.handshake_timeout / 5)))
            if not handshaking:
                continue
            now = time.monotonic()
            for session, deadline in list(handshaking.items()):
                if deadline <= now:
                    session.handshake_overdue()

    def _housekeeping(self) -> None:
        while True:
            gevent.sleep(HOUSEKEEPING_INTERVAL)
            now = time.monotonic()
            for pool in list(self.pools.values()):
                try:
                    pool.expire(now)
                    if pool.budget.size < pool.config.min_size:
                        gevent.spawn(pool.fill)
                except Exception:  # housekeeping must never die
                    log.exception("pool %s: housekeeping failed", pool.label)

    # ------------------------------------------------------------------ pools and backends

    def pool_for(self, rt: ListenerRuntime, user: str, database: str, variant: tuple = ()) -> Pool:
        """The pool of (cluster, role, user, database) plus the engine's backend variant (see Engine.backend_variant)."""
        key = (rt.cluster.name, rt.config.role, user, database, variant)
        pool = self.pools.get(key)
        if pool is None:
            cluster = rt.cluster
            params = dict(variant)
            # The variants of one (cluster, role, user, database) share one max_size and min_size.
            budget = next((other.budget for other_key, other in self.pools.items() if other_key[:4] == key[:4]), None)

            def target_for():
                # pool.cluster, not rt.cluster: a reload may give the pool a new ClusterConfig
                target = self.backend_target(pool.cluster, key[1], user, database)
                if target is not None and params:
                    target.params = {**target.params, **params}
                return target
            pool = Pool(self, cluster, rt.config.role, user, database, rt.engine, target_for, variant, budget)
            pool.paused = self.console.is_paused(database)
            self.pools[key] = pool
        return pool

    def drop_refused_pool(self, pool: Pool, besides=None) -> None:
        """A pool whose first login the server refused (no such database, no access) and that holds nothing is
        not kept: a client that merely tried a database leaves no pool behind. `besides`: the asking session."""
        if not pool.refused_login or pool.facts is not None or pool.size or pool.waiters:
            return
        if any(session.pool is pool for session in list(self.sessions) if session is not besides):
            return
        key = (pool.cluster.name, pool.role, pool.user, pool.database, pool.variant)
        if self.pools.get(key) is pool:
            del self.pools[key]
            if pool in pool.budget.pools:
                pool.budget.pools.remove(pool)
            log.info("pool %s: dropped, the server refused its login and it holds no connection", pool.label)

    def reload(self, everywhere: bool = True) -> list[str]:
        """What SIGHUP, the console's RELOAD and `multiproxy reload` do: read the config file again, validate it and
        apply what changed live, all or nothing (multiproxy.reload). Returns the problems (nothing changed then).

        With forked workers each one reloads on its SIGHUP; a RELOAD from the console (on whichever worker it
        landed) validates here and, when the file is good, has the supervisor send every worker SIGHUP."""
        if everywhere and self.worker_count > 1:
            problems = live_reload.reload(self, apply=False)
            if not problems:
                log.info("reload: the configuration is valid; asking every worker to reload (SIGHUP)")
                os.kill(os.getppid(), signal.SIGHUP)
            return problems
        if not everywhere:
            return live_reload.reload(self)
        # A console or HTTP RELOAD of a lone process: systemd hears of it as of a SIGHUP (its own handler
        # in _run_worker notifies around reload(False)).
        systemd.reloading()
        try:
            return live_reload.reload(self)
        finally:
            systemd.ready()

    def apply_plan(self, plan) -> list[str]:
        """Apply a reload.Plan without refusals: everything that can fail (binding new listen addresses, reading TLS
        files, the users file, the audit log) is done first; a failure there undoes it and is returned, and
        nothing has changed. Then each change is applied and logged."""
        new = plan.new
        problems = []
        bound: dict[str, object] = {}
        tls: dict[str, object] = {}
        users = self.users
        audit = None
        reuse = self.worker_count > 1
        opening = [lc.name for lc in new.listeners if lc.name in plan.listeners_added or lc.name in plan.listeners_moved]
        # With forked workers the supervisor binds a new listener once and hands it to each worker, as at the start.
        given = self.link.listen_sockets(opening) if self.link is not None and opening else {}
        for i, lc in enumerate(new.listeners):
            try:
                tls[lc.name] = ListenerRuntime.tls_context_for(lc)
            except Exception as exc:
                problems.append(f"listeners[{i}].tls_cert_file: cannot load the TLS files of listener "
                                f"{lc.name!r}: {exc}")
            if lc.name in opening:
                sock, listen = given.pop(lc.name, (None, None))
                if sock is not None and listen == tuple(lc.listen):
                    bound[lc.name] = sock
                    continue
                if sock is not None:
                    sock.close()    # the supervisor read another version of the file: this worker binds its own
                try:
                    bound[lc.name] = make_listen_socket(lc.listen[0], lc.listen[1], reuse_port=reuse)
                except OSError as exc:
                    problems.append(f"listeners[{i}].listen: {exc.strerror or exc}")
        for sock, _ in given.values():
            sock.close()
        if new.users_file:
            try:
                users = UsersFile.load(new.users_file)
            except Exception as exc:
                problems.append(f"auth.users_file: not reloaded: {exc}")
        else:
            users = UsersFile.empty()
        if new.proxy.audit_log != self.config.proxy.audit_log:
            try:
                audit = AuditLog(new.proxy.audit_log)
            except OSError as exc:
                problems.append(f"proxy.audit_log: cannot open {new.proxy.audit_log}: {exc.strerror or exc}")
        if problems:
            for sock in bound.values():
                sock.close()
            if audit is not None:
                audit.close()
            return problems

        old = self.config
        self.config = new
        relay_core.attend()     # (the relay logins' templates are judged again: here and once the reload is done)
        for line in plan.changes:
            log.info("reload: %s", line)
        self.users = users
        if new.users_file:
            log.info("users file reloaded: %d users", len(users))
        pc = new.proxy
        if "log_level" in plan.proxy_changed:
            logging.getLogger().setLevel(pc.log_level.upper())
        if audit is not None:
            self.audit, previous = audit, self.audit
            previous.close()
        throttle = self.throttle
        throttle.base_delay, throttle.max_delay = pc.auth_failure_delay, pc.auth_failure_max_delay
        throttle.block_after, throttle.block_seconds = pc.auth_failure_block_after, pc.auth_failure_block_seconds

        for name in plan.clusters_added:
            cluster = new.clusters[name]
            self.pin_policies[name] = PinPolicy(cluster.pinning, name)
            self.statement_counts[name] = StatementCounts()
            if Registry.wanted(cluster):
                self._registry().add_cluster(cluster)
        for name in plan.clusters_changed:
            self._cluster_changed(old.clusters[name], new.clusters[name])

        by_name = {rt.config.name: rt for rt in self.listeners}
        for lc in new.listeners:
            cluster = new.clusters[lc.cluster]
            rt = by_name.get(lc.name)
            if rt is None:
                rt = ListenerRuntime(lc, cluster, self.engines[cluster.engine], self.pin_policies[lc.cluster])
                rt.tls_context = tls[lc.name]
                rt.cancel_callback = self._cancel_callback(rt.engine)
                self.listeners.append(rt)
                self._start_listener(rt, bound[lc.name])
                continue
            if rt.config == lc:
                lc = rt.config       # the same settings: keep the running object (its token verifier, reloaded below)
                if hasattr(lc.token_verifier, "reload"):
                    lc.token_verifier.reload()
            rt.reconfigure(lc, cluster, self.pin_policies[lc.cluster], tls[lc.name])
            if lc.name in plan.listeners_moved:
                rt.acceptor.close()
                self._start_listener(rt, bound[lc.name])
        for name in plan.listeners_removed:
            rt = by_name[name]
            self.listeners.remove(rt)
            gevent.spawn(self._drain_listener, rt)
        # The running listener objects (an unchanged listener keeps its own, with the token verifier in use).
        running = {rt.config.name: rt.config for rt in self.listeners}
        self.config = dataclasses.replace(new, listeners=tuple(running[lc.name] for lc in new.listeners))

        for name in plan.clusters_removed:
            cluster = old.clusters[name]
            if self.registry is not None:
                self.registry.remove_cluster(name)
            for key, pool in list(self.pools.items()):
                if key[0] == name:
                    pool.close_all()           # idle ones close now; borrowed ones (removed listeners) on release
                    del self.pools[key]
            self.pin_policies.pop(name, None)
            for cache_key in [k for k in self.secrets if k[0] == name]:
                del self.secrets[cache_key]
        relay_core.attend()
        return []

    def _registry(self) -> Registry:
        if self.registry is None:
            self.registry = Registry(self, {}, self.engines)
        return self.registry

    def _cluster_changed(self, old: ClusterConfig, cluster: ClusterConfig) -> None:
        """A cluster's settings changed: its pools, pin policy, password cache and registry state follow."""
        name = cluster.name
        self.pin_policies[name].actions = dict(cluster.pinning)
        if old.credentials != cluster.credentials:
            for cache_key in [k for k in self.secrets if k[0] == name]:
                del self.secrets[cache_key]      # the next backend login reads the new source
        was, now = Registry.wanted(old), Registry.wanted(cluster)
        if now:
            registry = self._registry()
            if was:
                registry.reconfigure(cluster)
            else:
                registry.add_cluster(cluster)
        elif was:
            self.registry.remove_cluster(name)
        hosts_moved = (not now and old.hosts != cluster.hosts) or (was and not now)
        for key, pool in list(self.pools.items()):
            if key[0] != name:
                continue
            pool.reconfigure(cluster)
            pool.eligible = self.registry.eligible(name, pool.role) if now else None
            if hosts_moved:
                pool.reconnect()   # connections to the old host: idle ones close now, borrowed ones on release

    def listen_again(self) -> None:
        """Accept again on every listener, and serve the admin server again: a takeover failed after this process
        had given its listeners away (the new process went away). Raises OSError when an address is taken."""
        bound = []
        try:
            for rt in self.listeners:
                bound.append((rt, make_listen_socket(*rt.config.listen)))
        except OSError:
            for _, sock in bound:
                sock.close()
            raise
        for rt, sock in bound:
            self._start_listener(rt, sock)
        self.stopping = False
        relay_core.attend()
        if self.config.proxy.admin_listen and self.admin is None and self.worker == 0:
            self.admin = start_admin_server(self.config.proxy.admin_listen, self)

    def _start_listener(self, rt: ListenerRuntime, sock) -> None:
        balance = self.balance
        index = self.worker
        defer = None if balance is None else lambda: balance.should_defer(index)
        rt.acceptor = Acceptor(sock, self._handler(rt), defer)
        rt.acceptor.start()
        relay_core.attend()     # (a login door of the listener's old acceptor closes at its lane's next wake-up)
        host, port = rt.config.listen
        log.info("listener %s: %s clients on %s:%d for cluster %s (%s)", rt.config.name, rt.engine.name, host, port,
                 rt.cluster.name, rt.config.role)

    def _drain_listener(self, rt: ListenerRuntime) -> None:
        """A reload removed this listener: it stops accepting now; each of its clients is closed, with the reason
        in its protocol, once it is between transactions (or at proxy.shutdown_timeout)."""
        if rt.acceptor is not None:
            rt.acceptor.close()
        name = rt.config.name
        message = (f"listener {name!r} was removed from multiproxy's configuration; reconnect to another "
                   "listener")
        deadline = time.monotonic() + self.config.proxy.shutdown_timeout
        while True:
            mine = [s for s in list(self.sessions) if s.runtime is rt]
            if not mine:
                break
            late = time.monotonic() >= deadline
            for session in mine:
                if late or session.backend is None:
                    self.sessions.discard(session)
                    session._send_quietly(session.engine.render_error(ErrorKind.SHUTTING_DOWN, message))
                    try:
                        session.sock.close()
                    except OSError:
                        pass
            if late:
                break
            gevent.sleep(0.05)
        log.info("listener %s: removed; its clients have left", name)

    def request_shutdown(self) -> None:
        """A graceful stop, as SIGTERM: the process drains its clients (proxy.shutdown_timeout) and exits. With
        forked workers the supervisor is asked, so that every worker stops (and none is respawned)."""
        if self.link is not None:
            os.kill(os.getppid(), signal.SIGTERM)
            return
        self.shutdown_requested.set()

    def follows_roles(self, cluster: ClusterConfig) -> bool:
        return self.registry is not None and cluster.name in self.registry.clusters

    def node_for(self, cluster: ClusterConfig, role: str) -> tuple[str, int] | None:
        if self.registry is not None and cluster.name in self.registry.clusters:
            # No writer known (failover under way): wait for one, bounded by the borrow timeout.
            return self.registry.wait_for(cluster.name, role, cluster.pool.borrow_timeout)
        # Without a registry: the first host is the writer, the others are readers (round robin).
        if role == "reader" and len(cluster.hosts) > 1:
            self._reader_turn = (getattr(self, "_reader_turn", 0) + 1) % (len(cluster.hosts) - 1)
            return cluster.hosts[1 + self._reader_turn]
        return cluster.hosts[0]

    def backend_target(self, cluster: ClusterConfig, role: str, user: str, database: str) -> BackendTarget | None:
        address = self.node_for(cluster, role)
        if address is None:
            return None
        return self.backend_target_at(cluster, address, user, database)

    def backend_target_at(self, cluster: ClusterConfig, address: tuple[str, int], user: str,
                          database: str | None = None, strict: bool = False) -> BackendTarget:
        """How to log in at `address` for the client user `user` (probes: the health.probe_user). When the
        configured password source fails, the password is None (pools refuse to log in without it), or with
        `strict` the SecretError is raised."""
        if not user:
            named = [c.user for c in cluster.credentials if c.user != "*"]
            user = named[0] if named else ""
        if database is None:
            database = getattr(self.engines[cluster.engine], "probe_database", "") or user
        cred = cluster.credential_for(user)
        backend_user = (cred.backend_user if cred and cred.backend_user else user)
        password = None
        if cred is not None and cred.secret_source():
            cache_key = (cluster.name, cred.key_path)
            secret = self.secrets.get(cache_key)
            if secret is None:
                secret = self.secrets[cache_key] = CachedSecret(cred.secret_source(), cred.key_path)
            try:
                password = secret.get()
            except SecretError as exc:
                log.error("%s", exc)
                if strict:
                    raise
                password = None
        backend = cluster.backend
        tls_factory = None
        if backend.tls not in ("disable", "allow"):
            tls_factory = lambda: backend_leg_context(backend.tls, backend.tls_ca_file, backend.tls_cert_file,
                                                      backend.tls_key_file)
        return BackendTarget(host=address[0], port=address[1], user=backend_user, database=database, password=password,
                             tls=backend.tls, tls_context_factory=tls_factory)

    def writer_changed(self, cluster: ClusterConfig, old: tuple[str, int], new: tuple[str, int] | None) -> None:
        """Failover: pools of the old writer drain; clients in a transaction there get a clear error."""
        reason = (f"failover: the writer of cluster {cluster.name!r} moved from {old[0]}:{old[1]} to "
                  + (f"{new[0]}:{new[1]}" if new else "an unknown node")
                  + "; your transaction was cancelled, retry it")
        drained = 0
        for pool in list(self.pools.values()):
            if pool.cluster.name == cluster.name and pool.role == "writer":
                pool.drain(old, reason)
                drained += 1
        self.console.record("drain", cluster=cluster.name, old=f"{old[0]}:{old[1]}",
                            new=f"{new[0]}:{new[1]}" if new else None, pools=drained)

    def nodes_retired(self, cluster: ClusterConfig, role: str, reasons: dict) -> None:
        """The registry took nodes out of `role` ({address: why}): pools of that role stop using them."""
        role_text = f"the {role} role of cluster {cluster.name!r}"
        for pool in list(self.pools.values()):
            if pool.cluster.name == cluster.name and pool.role == role:
                pool.retire(reasons, role_text)
        for address, why in reasons.items():
            log.warning("cluster %s: %s:%d no longer serves %s pools: %s", cluster.name, *address, role, why)

    def backend_failed(self, cluster: ClusterConfig, address: tuple[str, int]) -> None:
        """A backend connection could not be opened or died on its own: the registry re-probes if it was the writer."""
        if self.registry is not None and cluster.name in self.registry.clusters:
            self.registry.backend_failed(cluster.name, address)

    def credentials_failed(self, cluster: ClusterConfig, user: str) -> None:
        """The backend refused our credentials: fetch them again next time (they may have been rotated)."""
        cred = cluster.credential_for(user)
        if cred is not None:
            secret = self.secrets.get((cluster.name, cred.key_path))
            if secret is not None:
                secret.invalidate()

    # ------------------------------------------------------------------ sessions and cancel keys

    def _cancel_callback(self, engine):
        def cancel(key, terminate=False):
            self.cancel(key, engine, terminate)
        return cancel

    def new_cancel_key(self, engine):
        counter = self.cancel_keys_issued = next(self._cancel_counter)
        return engine.new_cancel_key(counter, self.worker)

    def session_started(self, session: Session) -> None:
        self.by_cancel_key[session.cancel_key] = session
        self.sessions_per_user[session.user] = self.sessions_per_user.get(session.user, 0) + 1

    def user_sessions(self, user: str) -> int:
        self.sessions.count_quiet()
        return self.sessions_per_user.get(user, 0)

    def session_ended(self, session: Session) -> None:
        if session.cancel_key is not None and self.by_cancel_key.get(session.cancel_key) is session:
            del self.by_cancel_key[session.cancel_key]
            self.sessions_per_user[session.user] -= 1
            if self.moved_cancel_keys.get(session.cancel_key) == self.worker and self.link is not None:
                self.link.send({"op": "moved_left", "key": encode(session.cancel_key)})
        self.metrics.session_closed(session)

    def cancel(self, key, engine=None, terminate: bool = False) -> None:
        """Forward a client's cancel to the backend now serving it; unknown keys and idle clients are ignored.
        With `terminate` (MySQL's KILL CONNECTION) the session holding `key` is also closed.

        With several workers the key names the worker that issued it; a cancel that arrived elsewhere
        is passed to that worker over a datagram socket."""
        if self.worker_count > 1 and engine is not None:
            # A client a retired worker handed over is where the supervisor said; modulo: a client a takeover
            # brought from a larger group sits in the worker its key names modulo ours.
            owner = self.moved_cancel_keys.get(key)
            if owner is None:
                owner = engine.cancel_key_worker(key) % self.worker_count
            if owner != self.worker:
                self._pass_cancel(owner, engine.name, key, terminate)
                return
        session = self.by_cancel_key.get(key)
        if session is None and self.relay_lanes is not None:
            self.relay_lanes.materialize_key(key, engine)   # a client kept quietly in a relay lane may hold it
            session = self.by_cancel_key.get(key)
        if session is None:
            if self.cancel_elsewhere is not None and self.cancel_elsewhere(key, engine, terminate):
                return
            self.metrics.cancels_ignored += 1
            return
        backend = session.cancel_target()
        if terminate:
            session.terminate()
        if backend is None:
            if not terminate:
                self.metrics.cancels_ignored += 1
            return
        cluster = session.runtime.cluster
        # The pool's own credentials at the serving node's address: engines whose cancel is a statement
        # on a new connection (MySQL's KILL QUERY) must log in; PostgreSQL's cancel packet ignores them.
        try:
            target = self.backend_target_at(cluster, backend.address, session.user, backend.database, strict=True)
        except SecretError:
            # No login without the password (a backend may lock accounts that fail); the log says why.
            log.warning("cancel for a client of cluster %s not sent: the backend password could not be obtained",
                        cluster.name)
            self.metrics.cancels_ignored += 1
            return
        self.metrics.cancels_forwarded += 1
        script = session.engine.cancel_script(target, backend.state)
        gevent.spawn(self._send_cancel, target, script, cluster.backend.connect_timeout)

    def clients_moved(self, entries: list) -> None:
        """The supervisor says which worker serves each client a SIGTTOU'd worker handed over: [engine, key (the
        handover's encoding), worker]."""
        for _engine, key, worker in entries:
            self.moved_cancel_keys[decode(key)] = int(worker)

    def moved_client_gone(self, key) -> None:
        self.moved_cancel_keys.pop(decode(key), None)

    def listen_for_cancels(self, worker_count: int, group: int) -> None:
        """With forked workers: receive cancels that other workers passed to this one."""
        self.worker_count = worker_count
        self.cancel_group = group
        sock = socket.socket(_stdsocket.AF_UNIX, _stdsocket.SOCK_DGRAM)
        sock.bind(_cancel_address(group, self.worker))
        self.cancel_socket = sock

        def receive():
            while True:
                data = sock.recv(4096)
                try:
                    engine_name, key, *rest = json.loads(data)
                    key = tuple(key) if isinstance(key, list) else key
                except ValueError:
                    continue
                self.cancel(key, terminate=bool(rest and rest[0]))
        gevent.spawn(receive)

    def _pass_cancel(self, owner: int, engine_name: str, key, terminate: bool = False) -> None:
        try:
            self.cancel_socket.sendto(json.dumps([engine_name, key, terminate]).encode(),
                                      _cancel_address(self.cancel_group, owner))
        except OSError as exc:
            # The worker is gone (its clients with it) or restarting: the cancel has nothing left to cancel.
            self.metrics.cancels_ignored += 1
            log.warning("cannot pass a cancel to worker %d: %s", owner, exc)

    def _send_cancel(self, target: BackendTarget, script, timeout: float) -> None:
        try:
            sock = open_socket(target.host, target.port, timeout)
            try:
                run_script(sock, script, target, timeout)
            finally:
                sock.close()
        except Exception as exc:  # a failed cancel is logged, never fatal
            log.warning("cancel to %s:%d failed: %s", target.host, target.port, exc)


def _cancel_address(group: int, worker: int) -> bytes:
    # Linux abstract socket names: nothing on disk to clean up.
    return f"\0multiproxy-{group}-cancel-{worker}".encode()


def make_listen_socket(host: str, port: int, reuse_port: bool = False) -> socket.socket:
    family = _stdsocket.AF_INET6 if ":" in host else _stdsocket.AF_INET
    sock = socket.socket(family, _stdsocket.SOCK_STREAM)
    sock.setsockopt(_stdsocket.SOL_SOCKET, _stdsocket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(_stdsocket.SOL_SOCKET, _stdsocket.SO_REUSEPORT, 1)
    # Accepted connections inherit TCP_NODELAY (on Linux), sparing a system call per client.
    sock.setsockopt(_stdsocket.IPPROTO_TCP, _stdsocket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        # Say which address: a config has several, and the errno's text alone names none.
        raise OSError(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(1024)
    sock.setblocking(False)
    return sock


def run_forever(config: Config, engines: dict, take_over: bool | str = False) -> int:
    """Run the proxy in the foreground until SIGTERM/SIGINT; SIGHUP reloads the config (multiproxy.reload).
    With `take_over`, take the listeners and idle clients over from the running process first (multiproxy.takeover);
    "if-running": only when one runs. With proxy.workers > 1 a supervisor forks the workers and keeps them running
    (multiproxy.supervisor)."""
    workers = config.proxy.workers
    if workers <= 1:
        return _run_worker(config, engines, 0, None, take_over=take_over)
    from . import supervisor
    return supervisor.run(config, engines, workers, _run_worker, make_listen_socket, take_over)


def _run_worker(config: Config, engines: dict, worker: int, listen_sockets, group: int = 0, channel=None,
                worker_count: int = 1, admin_socket=None, take_over: bool | str = False, custody=None,
                group_takeover: dict | None = None, balance=None, cancel_counter: int = 0) -> int:
    """One process serving the listeners. Alone (no channel) it tells systemd its state itself, listens for a
    takeover (proxy.takeover_socket) and, with `take_over`, starts with one (multiproxy.takeover); a forked worker
    tells its supervisor over `channel` (ready, heartbeats, reloads, backend slots, and with `custody` its clients:
    multiproxy.custody), and the supervisor tells systemd; its part in a takeover of the group comes over the channel
    too (multiproxy.group_takeover; `group_takeover`: the options of a worker forked while its group takes over).
    `cancel_counter`: the keys it issues come after it (the counter its index reached before)."""
    proxy = Proxy(config, engines, worker)
    if cancel_counter:
        proxy._cancel_counter = itertools.count(cancel_counter + 1)
        proxy.cancel_keys_issued = cancel_counter
    link = None
    if channel is not None:
        from .groupview import GroupView
        from .supervisor import WorkerLink
        link = proxy.link = WorkerLink(proxy, channel)
        proxy.listen_for_cancels(worker_count, group)
        proxy.group = GroupView(worker, worker_count, group, _peer_handlers(proxy))
        proxy.group.start()
        proxy.balance = balance
        if custody is not None:
            from .custody import WorkerCustody
            proxy.custody = WorkerCustody(proxy, link, custody["busy_map"])
        from .group_takeover import GroupTakeoverPart
        link.takeover = GroupTakeoverPart(proxy, link, admin_socket, group_takeover)
    done = proxy.shutdown_requested
    alone = link is None
    takeovers = takeover.ProcessTakeovers(proxy, take_over, listen=alone)
    takeovers.start_proxy(listen_sockets, admin_socket)

    def stop(signum):
        log.info("worker %d: signal %d received, draining clients", worker, signum)
        done.set()

    def reload():
        if alone:
            systemd.reloading()
        proxy.reload(False)
        if alone:
            systemd.ready()
        else:
            link.send({"op": "reloaded"})

    gevent.signal_handler(signal.SIGTERM, stop, signal.SIGTERM)
    gevent.signal_handler(signal.SIGINT, stop, signal.SIGINT)
    gevent.signal_handler(signal.SIGHUP, reload)    # each worker reloads on its own signal
    if alone:
        def no_supervisor(signum):
            log.warning("%s received: workers are added (SIGTTIN) and removed (SIGTTOU) by the supervisor, which runs "
                        "with [proxy] workers > 1; set it and restart to use them", signal.Signals(signum).name)
        # Their default action would stop the process.
        gevent.signal_handler(signal.SIGTTIN, no_supervisor, signal.SIGTTIN)
        gevent.signal_handler(signal.SIGTTOU, no_supervisor, signal.SIGTTOU)
    log.info("multiproxy worker %d ready (pid %d)", worker, os.getpid())
    if takeovers.ready(f"serving {len(config.listeners)} listeners"):
        pass                            # after a takeover: READY=1 with MAINPID, sent by ProcessTakeovers
    elif alone:
        systemd.ready(f"serving {len(config.listeners)} listeners")
    else:
        link.start()
        if proxy.custody is not None:
            proxy.custody.resume(custody["inherited"], custody["key_counter"], custody["closed_busy"],
                                 custody["dead_pid"])
        link.send({"op": "ready"})
    done.wait()
    if not takeovers.finish() and alone:    # taken over: the service goes on, in the new process
        systemd.stopping()
    proxy.stop()
    if link is not None:
        proxy.group.stop()
        link.stop()
    return 0


def _peer_handlers(proxy: Proxy) -> dict:
    """What a worker answers its peers (multiproxy.groupview): its own views, commands, metrics and status."""
    from .groupview import families_as_json
    from .metrics import ProxyCollector, status_snapshot

    def show(request):
        result = proxy.console.show(request["view"], local=True)
        return {"columns": result.columns, "rows": result.rows}

    def execute(request):
        result = proxy.console.execute(request["text"], may_command=True, local=True)
        return {"columns": result.columns, "rows": result.rows, "tag": result.tag}

    return {"show": show, "execute": execute,
            "metrics": lambda request: families_as_json(ProxyCollector(proxy).collect()),
            "status": lambda request: status_snapshot(proxy)}
