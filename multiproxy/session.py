"""Drives one client connection: socket reads into the engine's protocol, backend links, release at transaction ends.

The client greenlet reads the client and writes to the linked backend. The backend's reader greenlet
(multiproxy.backends) writes to the client and decides, from what the engine reports, when the
backend goes back to the pool. While linked, only the backend side writes to the client, so answers
never interleave. An idle plaintext client has no greenlet: its session parks (see `Session.park`) and a
greenlet serves it again when it sends its next request.
"""
from __future__ import annotations

import logging
import socket as _stdsocket
import time

import gevent

from . import __version__
from .admin import CONSOLE_DATABASES, AdminError
from .auth_lookup import AuthLookup, LookupFailed, proxy_query
from .engine import (
    HELD_REFUSAL, AuthFailed, Authenticated, CancelRequested, ClientContext, ClientQuit, CloseClient, ErrorKind,
    LookupUser, ProtocolError, SendToClient, StartClientTLS, StatementCounts,
)
from .fastio import ClientSocket, fast_recv, fast_sendall
from .pool import BackendUnavailable, PoolTimeout

log = logging.getLogger("multiproxy.session")
RECV_SIZE = 65536
RESET_TIMEOUT = 10.0
# From this many sessions on, a client with nothing outstanding parks as soon as its greenlet would wait for it; with
# fewer, a busy client keeps its greenlet (no greenlet hand-off per request) and the parking sweep parks idle ones.
EAGER_PARKING_SESSIONS = 64


class Parked(Exception):
    """Thrown into a session's greenlet waiting for its client's next request (multiproxy.parking's sweep found it idle,
    its read watcher already stopped): the session parks and the greenlet lets go of it."""


class HandedOver(Exception):
    """Thrown into a session's greenlet waiting for its client's next request once a takeover has sent the connection
    to the new process: the session lets go of it without a word to the client (multiproxy.takeover)."""


class ClientTimeouts:
    """The sweep behind query_timeout, idle_transaction_timeout and idle_client_timeout: one greenlet per proxy looks at
    every session (Session.check_timeouts) every fifth of the shortest limit in use (at most every second, at least
    every 50 ms), so that nothing runs per request and no client socket carries a timeout (which would also bound
    the proxy's writes to a slow reader). A limit fires up to a fifth of itself (a sweep) late."""

    def __init__(self, proxy):
        self.proxy = proxy
        self.shortest = 0.0
        self.greenlet = None

    @classmethod
    def of(cls, proxy) -> "ClientTimeouts":
        sweep = getattr(proxy, "client_timeouts", None)
        if sweep is None:
            sweep = proxy.client_timeouts = cls(proxy)
        return sweep

    def watch(self, limit: float) -> None:
        """A session with this shortest limit is served: sweep often enough for it."""
        if not self.shortest or limit < self.shortest:
            self.shortest = limit
        if self.greenlet is None or self.greenlet.dead:
            self.greenlet = gevent.spawn(self._run)

    def _run(self) -> None:
        proxy = self.proxy
        lanes = getattr(proxy, "relay_lanes", None)
        # It ends with the last client (the next one served starts it again), unless relay logins' doors have
        # timeouts to watch: their quiet logins run no Python that could start it.
        while proxy.sessions or (lanes is not None and lanes.logins.timeouts_watched()):
            gevent.sleep(min(1.0, max(0.05, self.shortest / 5)))
            now = time.monotonic()
            for session in list(proxy.sessions.known()):    # (quiet clients: judged by their relays, below)
                try:
                    session.check_timeouts(now)
                except Exception:  # one session's failure must not stop the sweep of the others
                    log.exception("client timeouts: checking a session failed")
            if lanes is not None:
                lanes.judge_quiet_timeouts(now)



def watch_client_timeouts(proxy, runtime) -> bool:
    """The proxy's ClientTimeouts sweep runs often enough for the shortest client timeout of a client of `runtime`'s
    (a listener's), if any (Session.watch_timeouts; relay logins' quiet clients, which have no session yet); False when
    there is none."""
    settings = proxy.config.proxy
    limits = [t for t in (settings.idle_client_timeout, getattr(settings, "idle_transaction_timeout", 0.0),
                          getattr(runtime.cluster.pool, "query_timeout", 0.0)) if t]
    if limits:
        ClientTimeouts.of(proxy).watch(min(limits))
    return bool(limits)

class Session:
    """One client connection and, while it holds one, its backend connection."""

    __slots__ = ("proxy", "listener", "sock", "address", "proto", "pool", "backend", "transaction_mode",
                 "client_gone", "user", "database", "cancel_key", "engine", "runtime", "_reset_timer", "client_send",
                 "reject", "leftover", "linked_once", "connected_at", "watch", "custody_slot", "park_mark",
                 "relay_lane", "handed_backend", "lane_fd", "template", "handed_error", "answered",
                 "lane_bounces", "lane_skip", "__weakref__")

    def __init__(self, proxy, runtime, sock, address):
        self._begin(proxy, runtime, address)
        self.sock = sock
        self.client_send = sock.sendall
        self.proto = None

    def _begin(self, proxy, runtime, address) -> None:
        """Every field but the client's socket and protocol (which relay logins' GreetedSession makes later)."""
        self.proxy = proxy
        self.runtime = runtime            # the listener's runtime: config, engine, cluster, TLS context
        self.listener = runtime.config
        self.engine = runtime.engine
        self.address = address
        self.pool = None
        self.backend = None
        self.transaction_mode = True
        self.client_gone = False
        self.user = ""
        self.database = ""
        self.cancel_key = None
        self._reset_timer = None
        self.reject = None                # (ErrorKind, message): turn the client away once it has logged in
        self.leftover = b""               # client bytes that came with the end of the handshake (Authenticated)
        self.answered = None              # relay logins: (how many of `leftover` the relay answered, its SCRAM nonce)
        self.linked_once = False          # a backend has served this client (its own login was accepted once)
        self.connected_at = time.time()   # for the admin console's SHOW CLIENTS
        self.watch = None                 # [requests, state, since, cancelled at] of the client timeouts' sweep
        self.custody_slot = None          # with worker custody: this client's slot (multiproxy.custody)
        self.park_mark = -1               # the request count the parking sweep saw last (multiproxy.parking)
        self.relay_lane = None            # the relay lane serving its client now (multiproxy.relay_lanes)
        self.handed_backend = None        # a borrowed backend a relay lane handed over with the client's request
        self.handed_error = None          # the pool's timeout for a request that waited it out in a relay lane
        self.lane_fd = -1                 # its client's descriptor while a relay lane serves it
        self.lane_bounces = 0             # its stays in a relay lane in a row that ended before they paid (RelayLane)
        self.lane_skip = 0                # idle points left before it may enter a lane again (after such stays)
        self.template = None              # relay logins: the template of a greeted session not made whole yet

    # ------------------------------------------------------------------ client greenlet

    def run(self, logged_in: bool = False) -> bool:
        """Serve the client until it leaves or its session parks (True: the caller must neither close nor count out
        the client; `Proxy.resume_parked` serves it again, `Proxy.client_left` counts it out when it leaves).
        `logged_in`: no handshake, the client's next request is served (a parked session resumed, or one another
        process logged in and handed over: a takeover, multiproxy.takeover)."""
        # TCP_NODELAY comes from the listening socket: Linux copies it to every accepted connection.
        handed_over = parked = False
        try:
            if logged_in or self.handshake():
                parked = self.serve(woken=logged_in)
        except Parked:
            parked = self.park()
        except ProtocolError as exc:
            log.info("client %s: protocol error: %s", self.address[0], exc)
            self.proxy.metrics.protocol_errors += 1
            self._send_quietly(exc.reply)
        except (OSError, ValueError) as exc:
            log.debug("client %s: connection error: %s", self.address[0], exc)
        except HandedOver:
            handed_over = True  # a takeover gave the connection to the new process: it is only let go here
        finally:
            if not parked:
                self.finish(handed_over)
        return parked

    def resume(self) -> bool:
        """Serve a logged-in client from its next request: a parked session whose client sent something, or a client
        another process logged in and handed over (its proto, user and pool set by the takeover). True: parked again."""
        if self.sock.closed:        # closed while parked (a drain, the proxy's stop): nothing more to serve
            self.finish()
            return False
        return self.run(logged_in=True)

    # ------------------------------------------------------------------ parking

    def may_park(self) -> bool:
        """Whether this session may wait for its client with no greenlet: a plaintext client, logged in (not on the
        admin console), no backend linked, nothing of its requests read but not served, a proxy that resumes it."""
        sock = self.sock
        return (type(sock) is ClientSocket and not sock.closed and self.backend is None and self.pool is not None
                and not self.client_gone and not self.leftover and hasattr(self.proxy, "resume_parked"))

    def park(self, relay: bool = True, parking: bool = True) -> bool:
        """Let go of the greenlet: the client's socket calls `Proxy.resume_parked` once the client sends (or the
        connection ends); with relay lanes ([proxy] relay = "compiled") and `relay`, a lane serves the client instead
        when its engine allows it now (multiproxy.relay_lanes) and the session does not sit out this idle point
        (after stays in a lane that relayed nothing: RelayLane._judge_stay). False when the session cannot park (the greenlet then
        ends it), or (`parking` False) when no lane takes it."""
        if self.handed_backend is not None:         # the request it came with was answered without it
            backend, self.handed_backend = self.handed_backend, None
            self.pool.release(backend)
        self.handed_error = None
        if not self.may_park():
            return False
        lanes = getattr(self.proxy, "relay_lanes", None) if relay else None
        if lanes is not None and not self._sits_out() and lanes.enter(self):
            return True
        if not parking:
            return False
        self.proto.compact()
        self.sock.park(self.proxy.resume_parked, self)
        return True

    def park_if_idle(self, at_once: bool = False) -> bool:
        """Called by the parking sweep (multiproxy.parking): a session that waits for its client's next request, with
        no request since the sweep before, parks (its greenlet gets Parked). `at_once`: whatever the request count (the
        backend's reader, at a transaction's end, with many sessions)."""
        if self.relay_lane is not None or not self.may_park() or self.sock.parked:
            return False    # (a relay lane's client has no greenlet)
        watcher = self.sock._read_event
        waiter = getattr(watcher.callback, "__self__", None) if watcher.active else None
        if waiter is None or not hasattr(waiter, "throw"):
            return False        # its greenlet does not wait for the client (borrowing, sending, logging in)
        requests = self.proto.requests
        if self.park_mark != requests and not at_once:
            self.park_mark = requests
            return False
        # From here the greenlet cannot wake for the client: only the Parked thrown on the next loop turn wakes it.
        watcher.stop()
        self.sock.hub.loop.run_callback(waiter.throw, Parked())
        return True

    def _send_quietly(self, data: bytes) -> None:
        if data and not self.client_gone:
            try:
                self.sock.sendall(data)
            except (OSError, ValueError):
                self.client_gone = True

    def client_context(self) -> ClientContext:
        """What the engine's client protocol is told about where it runs (at login, and when a takeover resumes it)."""
        proxy = self.proxy
        rt = self.runtime
        cluster = rt.cluster
        return ClientContext(
            listener=self.listener, users=proxy.users, tls_available=rt.tls_context is not None,
            cancel_key=self.cancel_key, pin_policy=rt.pin_policy, max_message_size=proxy.config.proxy.max_message_size,
            client_address=self.address, engine_options=cluster.engine_options,
            # Only a writer listener retries a read-only refusal: a reader listener never sends a write elsewhere.
            retry_read_only=(cluster.health.retry_read_only and self.listener.role == "writer"
                             and proxy.follows_roles(cluster)),
            cancel=rt.cancel_callback, tls_context=rt.tls_context, read_only=self.listener.role == "reader",
            reset_after_transaction=rt.reset_after_transaction, reset_query=cluster.backend.reset_query,
            max_prepared_statements=cluster.backend.max_prepared_statements,
            statement_counts=proxy.statement_counts.setdefault(cluster.name, StatementCounts()),
            init_query=cluster.backend.init_query, auth_query=getattr(cluster, "auth_query", None) is not None,
        )

    def handshake(self) -> bool:
        """Startup, TLS and authentication; True when the client may send requests."""
        proxy = self.proxy
        self.cancel_key = proxy.new_cancel_key(self.engine)
        proto = self.proto = self.engine.client_protocol(self.client_context())
        limit = proxy.config.proxy.handshake_timeout
        deadline = time.monotonic() + limit
        sock = self.sock
        send = fast_sendall(sock)
        lean = type(sock) is ClientSocket
        try:
            out = proto.start()
            if out:
                send(out)
            # A plaintext client's handshake is bounded by the proxy's sweep of deadlines (handshake_overdue),
            # a TLS client's by its socket's timeout; the deadline check after each read bounds the whole of it.
            if lean:
                proxy.handshaking[self] = deadline
            else:
                sock.settimeout(limit)
            # A client that speaks first usually has spoken already: read without waiting. Answers to what
            # the proxy just sent cannot be there yet: wait first.
            recv_next = sock.recv_later if lean else sock.recv
            first, self.leftover = self.leftover, b""     # what a relay login door read (multiproxy.relay_logins)
            replayed = None
            if self.answered is not None:               # ... and answered: the handshake goes on where it stood
                count, nonce = self.answered
                self.answered = None
                replayed = proto.replay_handshake(first[:count], nonce)
                first = first[count:]
            data = first or (None if replayed is not None else
                             (recv_next if out else sock.recv)(proto.handshake_read_size()))
            while True:
                if replayed is not None:
                    events, replayed = replayed, None
                elif not data:
                    return False
                else:
                    events, data = proto.receive_handshake(data), None
                for event in events:        # (a LookupUser's answer appends the events that follow it)
                    kind = type(event)
                    if kind is SendToClient:
                        send(event.data)
                    elif kind is LookupUser:
                        found = self._lookup_user(event)
                        if found is False:
                            return False
                        events.extend(proto.user_found(found))
                    elif kind is StartClientTLS:
                        if event.data:
                            send(event.data)
                        if lean:
                            lean = False
                            proxy.handshaking.pop(self, None)
                            sock = sock.to_gevent()
                            sock.settimeout(max(0.001, deadline - time.monotonic()))
                        sock = self.sock = self.runtime.wrap_client_tls(sock)
                        send, recv_next = sock.sendall, sock.recv
                        try:
                            sock.do_handshake()
                        except BaseException:
                            self.client_gone = True    # no TLS yet: nothing can be said to this client
                            raise
                    elif kind is Authenticated:
                        if lean:
                            del proxy.handshaking[self]
                        else:
                            sock.settimeout(None)
                        return self._logged_in(event)
                    elif kind is CancelRequested:
                        proxy.cancel(event.key, self.engine)
                        return False
                    elif kind is AuthFailed:
                        self._auth_failed(event)
                        send(event.data)
                        return False
                    elif kind is CloseClient:
                        if event.data:
                            sock.sendall(event.data)
                        return False
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError("handshake deadline passed")
                if not lean:
                    sock.settimeout(remaining)
                if data is None:
                    data = recv_next(proto.handshake_read_size())
        except TimeoutError:
            self.proxy.metrics.handshake_timeouts += 1
            if self.client_gone:
                return False
            self.sock.settimeout(2.0)
            self._send_quietly(self.proto.error(
                ErrorKind.HANDSHAKE_TIMEOUT, f"the client did not finish logging in within {limit:g} s"))
            return False
        finally:
            if lean:
                proxy.handshaking.pop(self, None)

    def _lookup_user(self, event: LookupUser):
        """auth_query: the record of a user missing from the users file, from the cluster's cache or the database
        (multiproxy.auth_lookup); None when there is no such user; False when the lookup failed (the client was
        told, and is closed)."""
        proxy = self.proxy
        rt = self.runtime
        cluster = rt.cluster
        settings = cluster.auth_query
        lookups = getattr(proxy, "auth_lookups", None)
        if lookups is None:
            lookups = proxy.auth_lookups = {}
        lookup = lookups.get(cluster.name)
        if lookup is None or lookup.settings != settings:      # first use, or a reload changed the settings
            counts = getattr(proxy.metrics, "auth_query_lookups", None)
            if counts is None:
                counts = proxy.metrics.auth_query_lookups = {}
            lookup = lookups[cluster.name] = AuthLookup(cluster.name, settings, counts)
        try:
            return lookup.lookup(event.user, lambda user: proxy_query(
                proxy, cluster, rt.config.role, self.engine, settings, event.database, user))
        except LookupFailed as exc:
            log.warning("client %s: auth_query lookup of user %r on cluster %s failed: %s", self._where(),
                        event.user, cluster.name, exc)
            self._send_quietly(self.proto.error(
                ErrorKind.BACKEND_UNAVAILABLE, f"the proxy could not look user {event.user!r} up in the database "
                f"(clusters.{cluster.name}.auth_query): the proxy's log says why; retry shortly"))
            return False

    def handshake_overdue(self) -> None:
        """Called by the proxy's deadline sweep: stop waiting for this client's login."""
        sock = self.sock
        if type(sock) is ClientSocket:
            sock.interrupt(TimeoutError("handshake deadline passed"))

    def _auth_failed(self, event: AuthFailed) -> None:
        """Count, audit and slow down a failed login (the delay grows with each failure from the address)."""
        proxy = self.proxy
        source = self.address[0] if isinstance(self.address, tuple) else str(self.address)
        proxy.metrics.auth_failures += 1
        log.warning("client %s: authentication failed for user %r on listener %s: %s",
                    source, event.user, self.listener.name, event.reason)
        proxy.audit.record(event.audit_event, listener=self.listener.name, engine=self.engine.name, user=event.user,
                           address=source, reason=event.reason)
        delay = proxy.throttle.failed(source)
        if delay:
            gevent.sleep(delay)

    def _logged_in(self, event: Authenticated) -> bool:
        proxy = self.proxy
        if self.reject is not None:
            self.sock.sendall(self.proto.error(*self.reject))
            return False
        self.user, self.database = event.user, event.database
        self.leftover = event.leftover
        if event.database in CONSOLE_DATABASES:
            console = self.proto.admin_console()
            if console is not None:
                return self._serve_console(console)
        disabled = getattr(proxy, "console", None) and proxy.console.disabled   # (stand-in proxies of tests have none)
        if disabled and event.database in disabled:
            proxy.metrics.rejected_connections += 1
            self.sock.sendall(self.proto.error(
                ErrorKind.BACKEND_UNAVAILABLE, f'database "{event.database}" is disabled by an administrator (DISABLE '
                'in the admin console): it takes no new clients until ENABLE; retry later'))
            return False
        record = proxy.users.get(event.user) if proxy.users is not None else None
        mode = self.listener.pool_mode or (record.pool_mode if record and record.pool_mode else "") \
            or self.runtime.cluster.pool.mode
        self.transaction_mode = mode == "transaction"
        if record is not None and record.max_connections and proxy.user_sessions(event.user) >= record.max_connections:
            proxy.metrics.rejected_connections += 1
            self.sock.sendall(self.proto.error(
                ErrorKind.TOO_MANY_CONNECTIONS,
                f"user {event.user!r} already has {record.max_connections} connections, its max_connections; "
                "close some or raise it with `multiproxy users add --max-connections`"))
            return False
        self.pool = proxy.pool_for(self.runtime, event.user, event.database, self.engine.backend_variant(event.params))
        try:
            # Never waits for a busy backend: what the client pipelined behind its login waits, as any request.
            facts = self.pool.welcome_facts()
        except (BackendUnavailable, PoolTimeout) as exc:
            refusal = getattr(exc, "refusal", None)
            self.sock.sendall(self.proto.login_refused(refusal) if refusal is not None
                              else self.proto.error(ErrorKind.BACKEND_UNAVAILABLE, str(exc)))
            if refusal is not None and hasattr(proxy, "drop_refused_pool"):
                proxy.drop_refused_pool(self.pool, besides=self)
            return False
        self.sock.sendall(self.proto.login_complete(facts))
        self.pool.logins_total += 1
        proxy.session_started(self)
        source = self.address[0] if isinstance(self.address, tuple) else str(self.address)
        proxy.throttle.succeeded(source)
        if proxy.audit.path:
            proxy.audit.record("auth_ok", listener=self.listener.name, engine=self.engine.name, user=event.user,
                               database=event.database, address=source)
        return True

    def _serve_console(self, console) -> bool:
        """The client logged in to a console database: the proxy answers it itself (multiproxy.admin), never a
        backend. Users not named in [admin] are refused. Returns False: the client is done when this returns."""
        proxy = self.proxy
        source = self.address[0] if isinstance(self.address, tuple) else str(self.address)
        role = proxy.console.may_use(self.user)
        if role is None:
            log.warning("client %s: user %r may not use the admin console (database %r)", source, self.user,
                        self.database)
            proxy.audit.record("limit", listener=self.listener.name, address=source, user=self.user,
                               reason="admin console not allowed")
            self.sock.sendall(self.proto.error(
                ErrorKind.AUTH_FAILED, f'not allowed: user "{self.user}" may not use the admin console (database '
                f'"{self.database}"); name it in the [admin] users (or stats_users, for SHOW only) of the proxy\'s config'))
            return False
        send = self.sock.sendall
        send(console.greeting(f"{__version__}/multiproxy"))
        proxy.throttle.succeeded(source)
        if proxy.audit.path:
            proxy.audit.record("auth_ok", listener=self.listener.name, engine=self.engine.name, user=self.user,
                               database=self.database, address=source)
        recv = fast_recv(self.sock)
        data = self.leftover
        self.leftover = b""
        console_state = proxy.console
        while True:
            if not data:
                data = recv(RECV_SIZE)
                if not data:
                    return False
            try:
                items = console.requests(data)
            except ClientQuit:
                return False
            data = b""
            for item in items:
                if type(item) is bytes:
                    send(item)
                    continue
                try:
                    result = console_state.execute(item, may_command=role == "admin")
                    out = console.result(result.columns, result.rows, result.tag)
                except AdminError as exc:
                    out = console.failure(exc.code, str(exc))
                except Exception as exc:  # a view that fails must not take the proxy's console down
                    log.exception("admin console: %r failed", item)
                    out = console.failure("internal_error", f"{item!r} failed: {exc}")
                log.info("admin console: %s ran %r", self.user, item)
                send(out)

    def serve(self, woken: bool = False) -> bool:
        """Serve the client's requests until it leaves (False) or its session parks (True). `woken`: the client has
        sent something (a parked session resumed): read it before parking again."""
        self.watch_timeouts()
        custody = getattr(self.proxy, "custody", None)
        if custody is not None and self.custody_slot is None:
            custody.hold(self)
        return self._relay(woken)

    def watch_timeouts(self) -> None:
        """The proxy's ClientTimeouts sweep runs often enough for this session's shortest client timeout, if any."""
        watch_client_timeouts(self.proxy, self.runtime)

    def check_timeouts(self, now: float) -> None:
        """Called by the proxy's ClientTimeouts sweep (never per request). The session's state (waiting for an answer,
        idle inside a transaction, idle outside one) and its request count are compared with the last sweep's; a
        state that has lasted, with no request in between, past its limit fires: query_timeout cancels the request
        through the engine's cancel (and, with no answer a query_timeout later, at least 1 s, closes the backend);
        idle_transaction_timeout tells the client and closes it (its backend is closed: the server rolls back);
        idle_client_timeout, outside a transaction only (a pinned session between transactions counts), tells the
        client and closes it."""
        lane = self.relay_lane
        greeted = lane is not None and self.template is not None    # relay logins: no client protocol made yet
        proto = None if greeted else self.proto
        if (proto is None and not greeted) or self.pool is None or self.client_gone:
            return      # still logging in (handshake_timeout's), a console client, or gone
        backend = self.backend
        if lane is not None:
            # Served by the compiled relay: it counts the requests it walks and says whether a backend serves one
            # now (or the client waits for one), and whether the backend answered them all (so holds the client
            # between the requests of a transaction).
            seen = lane.activity(self)
            if seen is None:
                return      # the relay has just let it go: its event is being handled
            relayed, peer_fd, waiting, outstanding, lazy = seen
            backend = lane.backends.get(peer_fd)
            # (lazy: after a BEGIN the relay answered, a transaction holding no backend, left alone as below)
            state = ("awaiting" if waiting or (peer_fd >= 0 and outstanding > 0) else
                     "transaction" if peer_fd >= 0 else "unknown" if lazy else "idle")
            requests = (0 if greeted else proto.requests, relayed)
        else:
            awaiting = proto.awaiting_answer() if backend is not None else False
            if awaiting:
                state = "awaiting"
            elif backend is not None and proto.transaction_open():
                state = "transaction"
            elif awaiting is None or proto.transaction_open():
                state = "unknown"       # the engine cannot tell, or a transaction holding no backend: left alone
            else:
                state = "idle"
            requests = proto.requests
        watch = self.watch
        if watch is None or watch[0] != requests or watch[1] != state:
            self.watch = [requests, state, now, 0.0]
            return
        since, cancelled = watch[2], watch[3]
        settings = self.proxy.config.proxy
        if state == "awaiting":
            limit = getattr(self.runtime.cluster.pool, "query_timeout", 0.0)
            if not limit:
                return
            if not cancelled and now - since >= limit:
                watch[3] = now
                self._query_timed_out(limit)
            elif cancelled and now - cancelled >= max(limit, 1.0) and backend is not None:
                log.warning("client %s: the request cancelled for query_timeout did not end within %g s more; "
                            "closing its backend connection", self._where(), max(limit, 1.0))
                if backend.lent:
                    # A relay lane serves it: the relay must see the end itself (it owns the socket until then),
                    # and then gives the client the lost-connection error and closes it.
                    try:
                        backend.sock.shutdown(_stdsocket.SHUT_RDWR)
                    except (OSError, ValueError):
                        pass
                else:
                    backend.fail(f"the request ran longer than query_timeout ({limit:g} s) and did not end when "
                                 "cancelled")
        elif state == "transaction":
            limit = getattr(settings, "idle_transaction_timeout", 0.0)
            if limit and now - since >= limit:
                metrics = self.proxy.metrics
                metrics.idle_transaction_timeouts = getattr(metrics, "idle_transaction_timeouts", 0) + 1
                log.info("client %s: idle in a transaction for %g s: closed (proxy.idle_transaction_timeout), its "
                         "transaction rolled back", self._where(), limit)
                self._close_idle(self.proto.error(     # (a greeted client's is made now)
                    ErrorKind.IDLE_TRANSACTION_TIMEOUT, f"closing the connection after {limit:g} s idle inside a "
                    "transaction (proxy.idle_transaction_timeout); the transaction was rolled back"))
        elif state == "idle":
            limit = settings.idle_client_timeout
            if limit and now - since >= limit:
                self.proxy.metrics.idle_timeouts += 1
                self._close_idle(self.proto.error(     # (a greeted client's is made now)
                    ErrorKind.IDLE_TIMEOUT, f"closing the connection after {limit:g} s idle (proxy.idle_client_timeout)"))

    def _close_idle(self, error: bytes) -> None:
        """Tell an idle client why and close it: nobody else writes to it now (no answer is outstanding); its reader
        sees the end and finish() returns or closes the backend."""
        self._send_quietly(error)
        self.watch = None
        try:
            self.sock.shutdown(_stdsocket.SHUT_RDWR)
        except (OSError, ValueError):
            pass

    def _where(self) -> str:
        address = self.address
        where = f"{address[0]}:{address[1]}" if isinstance(address, tuple) and len(address) >= 2 else str(address)
        return f"{where} (user {self.user!r}, listener {self.listener.name})"

    def _query_timed_out(self, limit: float) -> None:
        """query_timeout fired for the request the linked backend runs: cancel it as a client's cancel would be
        (the engine's in-band cancel, else its cancel script); the client gets the server's cancel error."""
        metrics = self.proxy.metrics
        metrics.query_timeouts = getattr(metrics, "query_timeouts", 0) + 1
        log.warning("client %s: request outstanding for %g s cancelled (clusters.%s.pool.query_timeout)",
                    self._where(), limit, self.runtime.cluster.name)
        backend = self.backend
        if backend is None:
            # A request the compiled relay serves: the out-of-band cancel below reaches it (cancel_target); bytes
            # of an in-band cancel must not be written into a socket the relay is writing to.
            if self.cancel_target() is not None:
                self.proxy.cancel(self.cancel_key, self.engine)
            return
        data = self.proto.cancel_in_band()
        if data:
            try:
                backend.sendall(data)
            except (OSError, ValueError):
                pass
            return
        self.proxy.cancel(self.cancel_key, self.engine)

    def _relay(self, woken: bool = False) -> bool:
        """The request loop; True when the session parked: with many clients (EAGER_PARKING_SESSIONS) a client that
        has nothing outstanding is waited for with no greenlet from the start (after its login, after an answer the
        proxy gave itself); with few, the parking sweep parks those idle for a while (multiproxy.parking)."""
        custody = getattr(self.proxy, "custody", None)
        held = custody is not None and self.custody_slot is not None
        # A held client is marked busy before a byte of its request is consumed (multiproxy.custody).
        recv = custody.marking_recv(self.sock, self.custody_slot) if held else fast_recv(self.sock)
        send = self.client_send = fast_sendall(self.sock)
        proto = self.proto
        client_data = proto.client_data
        data, self.leftover = self.leftover, b""
        quit = False
        sessions = getattr(self.proxy, "sessions", ())
        # With relay lanes a session goes into a lane the moment it waits for its client, when a lane takes it.
        lanes = getattr(self.proxy, "relay_lanes", None) is not None
        if woken and not data:
            # What woke it has arrived: try before waiting (a held client's recv marks it busy first).
            data = recv(RECV_SIZE) if held else self.sock.recv(RECV_SIZE)
            if not data:
                return False
        while True:
            if not data:
                if self.backend is None and ((lanes and self.park(parking=False))
                                             or (len(sessions) >= EAGER_PARKING_SESSIONS and self.park())):
                    return True
                data = recv(RECV_SIZE)
                if not data:
                    return False
            try:
                to_backend, to_client = client_data(data)
            except ClientQuit as said:
                to_backend, to_client, quit = said.to_backend, said.to_client, True
            data = b""
            if to_backend:
                backend = self.backend
                if backend is None:
                    backend = self.link()
                    if self.client_gone:
                        return False
                    if backend is not None:
                        to_backend = proto.link(backend.state, to_backend)
                if backend is not None:
                    try:
                        backend.sendall(to_backend)
                    except (OSError, ValueError):
                        pass  # the backend's reader notices the loss and tells the client
            if to_client:
                send(to_client)
            if quit:
                return False
            if held and self.backend is None:
                custody.settle(self)    # answered here (or refused): idle again unless its engine says otherwise

    def link(self):
        """Borrow a backend for the request just read, or answer it with an error."""
        try:
            if self.handed_error is not None:       # its request waited the borrow timeout out in a relay lane
                error, self.handed_error = self.handed_error, None
                raise error
            backend = self.handed_backend
            if backend is None:
                pool = self.pool
                if getattr(pool, "lent", None) and not pool.idle and not pool.paused:
                    backend = self.proxy.relay_lanes.idle_backend(pool)     # a spare one a relay lane holds
                if backend is None:
                    backend = pool.borrow()
            else:
                self.handed_backend = None
        except (PoolTimeout, BackendUnavailable) as exc:
            self.proxy.metrics.borrow_failures += 1
            refusal = getattr(exc, "refusal", None)
            if refusal is not None and not self.linked_once:
                # The client's login was completed from the facts of another login; the server refuses this
                # client's own (unknown database, no access): the request gets the server's error, and the client
                # is closed as the server would have closed it.
                self._send_quietly(self.proto.login_refused(refusal))
                self.client_gone = True
                if hasattr(self.proxy, "drop_refused_pool"):
                    self.proxy.drop_refused_pool(self.pool, besides=self)
                return None
            kind = ErrorKind.POOL_TIMEOUT if isinstance(exc, PoolTimeout) else ErrorKind.BACKEND_UNAVAILABLE
            reply = self.proto.fail_pending(kind, str(exc))
            if reply:
                self.sock.sendall(reply)
            return None
        self.linked_once = True
        backend.session = self
        self.backend = backend
        return backend

    def adopt_backend(self, backend) -> None:
        """A relay lane hands the client over inside a transaction it served, with the backend holding it (its
        protocol linked already: ClientProtocol.relay_adopt): the session holds that backend from now on."""
        self.linked_once = True
        backend.session = self
        self.backend = backend

    # ------------------------------------------------------------------ backend reader greenlet

    def on_backend_data(self, backend, data: bytes) -> None:
        proto = self.proto
        to_client, outcome = proto.backend_data(data)
        if proto.backend_owed:
            owed, proto.backend_owed = proto.backend_owed, b""
            try:
                backend.sendall(owed)
            except (OSError, ValueError):
                pass  # the backend's reader notices the loss and tells the client
        if to_client and not self.client_gone:
            try:
                self.client_send(to_client)
            except (OSError, ValueError):
                self.client_gone = True
        if outcome == HELD_REFUSAL:
            # The node refused the first statement of a transaction as read-only. The client's word is not
            # enough to move the writer: the node is probed first, away from this backend's reader.
            gevent.spawn(self._read_only_refusal, backend)
        elif outcome:
            if (self.transaction_mode and not proto.pinned) or self.client_gone:
                self.unlink(backend)
                proxy = self.proxy
                if self.custody_slot is not None and not self.client_gone:
                    proxy.custody.settle(self)          # idle again: the supervisor may resume it (multiproxy.custody)
                idle_hook = getattr(proxy, "idle_hook", None)
                if idle_hook is not None:
                    idle_hook(self)         # a takeover under way: this client may go now (multiproxy.takeover)
                elif len(proxy.sessions) >= EAGER_PARKING_SESSIONS or self._relay_lane_takes_it():
                    self.park_if_idle(at_once=True)     # many clients: no greenlet waits for one between transactions
            elif self.pool.eligible is not None and not self.pool.serves(backend):
                # A pinned session at a transaction's end on a node that left this role: close it as a
                # failover would (its session state cannot move).
                address = backend.address
                backend.fail(f"the node {address[0]}:{address[1]} no longer serves the {self.pool.role} role of "
                            f"cluster {self.runtime.cluster.name!r}; your pinned session was closed, reconnect")

    def _relay_lane_takes_it(self) -> bool:
        """A relay lane would serve this client now ([proxy] relay = "compiled", multiproxy.relay_lanes): not while it
        sits out idle points after stays in one that relayed nothing (it keeps its greenlet then, as on the Python
        path; multiproxy.relay_lanes.RelayLane._judge_stay)."""
        lanes = getattr(self.proxy, "relay_lanes", None)
        return lanes is not None and lanes.eligible_key(self) is not None and not self._sits_out()

    def _sits_out(self) -> bool:
        """One idle point less to sit out on the Python path, if any is left (True)."""
        if self.lane_skip:
            self.lane_skip -= 1
            return True
        return False

    def _read_only_refusal(self, backend) -> None:
        """Probe the node that refused a statement as read-only. Still a writer: the client gets the server's
        error as it was sent. No writer any more (the registry decided so from the probe): the statement goes,
        once, to the writer found now, with the session's tracked state replayed first."""
        proto = self.proto
        registry = self.proxy.registry
        # While the node is checked the connection belongs to no session, so that a failover drain the probe
        # may cause closes it quietly instead of telling this client its transaction was cancelled.
        backend.session = None
        try:
            still_writer = registry is None or registry.verify_writer(self.runtime.cluster.name, backend.address)
        except Exception:  # the check itself failed: nothing is known against the node, the client gets its answer
            log.exception("pool %s: checking %s:%d after a read-only refusal failed", self.pool.label, *backend.address)
            still_writer = True
        if self.backend is not backend:      # the client left meanwhile; finish() took care of the connection
            return
        if still_writer or self.client_gone:
            to_client, release = proto.retry_declined()
            if to_client and not self.client_gone:
                try:
                    self.client_send(to_client)
                except (OSError, ValueError):
                    self.client_gone = True
            if backend.closed or (release and ((self.transaction_mode and not proto.pinned) or self.client_gone)):
                self.unlink(backend)
                if self.custody_slot is not None and not self.client_gone:
                    self.proxy.custody.settle(self)
            else:
                backend.session = self
            return
        data = proto.retry_accepted()
        self.backend = None
        proto.unlink()
        self.pool.discard_borrowed(backend)
        self.proxy.metrics.read_only_retries += 1
        log.warning("pool %s: %s:%d refused a write as read-only and its probe says it is no writer; retrying on "
                    "the writer", self.pool.label, *backend.address)
        self._resend(data)

    def _resend(self, data: bytes) -> None:
        backend = self.link()
        if backend is None or self.client_gone:
            return
        try:
            backend.sendall(self.proto.link(backend.state, data))
        except (OSError, ValueError):
            pass

    def unlink(self, backend) -> None:
        """Give the backend back to the pool at a transaction boundary."""
        if self._reset_timer is not None:
            self._reset_timer.kill(block=False)
            self._reset_timer = None
        backend.session = None
        self.backend = None
        self.proto.unlink()
        lanes = getattr(self.proxy, "relay_lanes", None)
        if lanes is None or not lanes.offer_backend(self, backend):
            self.pool.release(backend)

    def on_backend_lost(self, backend, why: str) -> None:
        self.backend = None
        if self.client_gone:
            self.proto.unlink()
            return
        reply, close_client = self.proto.backend_lost(f"the database connection was lost ({why})")
        self._send_quietly(reply)
        if close_client:
            self.client_gone = True
            try:
                self.sock.shutdown(_stdsocket.SHUT_RDWR)
            except (OSError, ValueError):
                pass

    # ------------------------------------------------------------------ end of the client

    def finish(self, handed_over: bool = False) -> None:
        """The client left: its backend goes back (reset if it was pinned) or is closed if mid-transaction; its
        connection closes (`handed_over`: only let go, another process serves it now)."""
        self.client_gone = True
        proxy = self.proxy
        if self.handed_backend is not None:
            handed, self.handed_backend = self.handed_backend, None
            self.pool.release(handed)
        backend = self.backend
        proto = self.proto
        if backend is not None and proto is not None:
            if not backend.closed and proto.is_clean():
                if proto.pinned or not self.transaction_mode:
                    reset = proto.reset_bytes(backend.state, self.runtime.cluster.backend.reset_query)
                    try:
                        backend.sendall(reset)
                        # The reader releases it when the reset's answer arrives; close it if that never comes.
                        self._reset_timer = gevent.spawn_later(RESET_TIMEOUT, self._reset_overdue, backend)
                    except (OSError, ValueError):
                        self._close_backend(backend)
                else:
                    self.unlink(backend)
            else:
                self._close_backend(backend)
        if proto is not None:
            self.runtime.pin_policy.session_ended(proto)
        proxy.session_ended(self)
        self.close_client(shutdown=not handed_over)

    def close_client(self, shutdown: bool = True) -> None:
        """Close the client's connection. With `shutdown` the connection ends even where another descriptor of it
        stays open (the supervisor's duplicate under worker custody, multiproxy.custody): the client reads its end.
        Without worker custody no other descriptor exists, and the close alone ends it (one system call less)."""
        if self.custody_slot is not None:
            self.proxy.custody.unhold(self)
        elif getattr(self.proxy, "custody", None) is None:
            shutdown = False
        if self.relay_lane is not None and not self.proxy.relay_lanes.let_go(self):
            # Linked in a relay lane: the shutdown ends it there, and the lane's event finishes the session.
            try:
                self.sock.shutdown(_stdsocket.SHUT_RDWR)
            except (OSError, ValueError):
                pass
            return
        if shutdown:
            try:
                self.sock.shutdown(_stdsocket.SHUT_RDWR)
            except (OSError, ValueError, AttributeError):
                pass
        try:
            self.sock.close()
        except OSError:
            pass

    def _close_backend(self, backend) -> None:
        backend.session = None
        self.backend = None
        self.pool.discard_borrowed(backend)

    def _reset_overdue(self, backend) -> None:
        self._reset_timer = None
        if self.backend is backend:
            log.warning("pool %s: backend reset did not finish in %g s; closing it", self.pool.label, RESET_TIMEOUT)
            self._close_backend(backend)

    # ------------------------------------------------------------------ cancel

    def terminate(self) -> None:
        """Close this client's connection from outside (another client's KILL CONNECTION): the client reader
        sees the end, and finish() returns the backend, or discards it if it was mid-transaction or answer."""
        log.info("client %s: connection killed on request", self.address[0] if self.address else "?")
        try:
            self.sock.shutdown(_stdsocket.SHUT_RDWR)
        except (OSError, ValueError):
            pass

    def cancel_target(self):
        """The backend connection currently serving this client, or None."""
        backend = self.backend
        lane = self.relay_lane
        if backend is None and lane is not None:
            backend = lane.backend_of(self)     # a transaction the compiled relay serves
        if backend is None or backend.closed:
            return None
        return backend
