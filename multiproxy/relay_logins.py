"""Relay logins: repeat PostgreSQL logins accepted and greeted by the compiled relay core ([proxy] relay = "compiled").

Scope (outside it nothing changes; logins stay on the Python path): an engine with `Engine.relay_login`
(PostgreSQL), the compiled multiproxy._relay (not its twin), a listener with no TLS whose `auth` is one of the
engine's `relay_login_auth` ("trust"; "scram-sha-256" for users of the users file with a SCRAM verifier), one worker
(no custody, no process group), no audit log, no max_connections_per_address, a session in transaction pool mode
whose user has no per-user max_connections, and no takeover under way.

Templates: when a session that logged in on the Python path enters a relay lane before its first request, its
greeting and its exported state (as a takeover exports it, multiproxy.takeover) become a template of its listener's
`LoginDoor`, keyed by its startup packet. The door listens in the relay of the lane its first template went into
(RelayLane.door), while the listener's Python acceptor is paused (one accepts at a time). The relay accepts, refuses
the SSLRequest ("N"), and answers a startup packet of a template with its greeting and a fresh cancel key
(`cache_greeting(..., key_at=...)`); on a SCRAM listener only after the client's SCRAM exchange, which the relay
verifies from the user's stored keys (`cache_greeting(..., scram=scram_keys(record))`): an exchange it does not
finish (a wrong proof, anything it does not take as PostgreSQL would, a template dropped meanwhile, no key or budget
left, a client aged or given back) comes as an ANSWERED event, and the Python path's handshake goes on from where the
relay stood (ClientProtocol.replay_handshake), with its own failure delays, counts and messages. A template of the
door's own lane is kept (`keep=True`): its client stays in the relay as one of the lane's clients, and quietly (the
door's lane runs its relay with `set_quiet(True)`): no event, no session; the lane counts quiet clients in and out in
bulk at each wake-up (RelayLane._count_quiet: listener and per-user client counts, logins, the metrics) and the relay
closes one at its goodbye with no event. A quiet client gets its session when something needs it: an event of it
(the relay reports it first: a QUIET event, as GREETED), a cancel of its key (Proxy.cancel), anything that reads
Proxy.sessions whole (the admin console, a stop, a takeover, the client-timeout sweep: Sessions.materialize), a lane
giving clients back, and the door before its templates change or it leaves the lane. That session is a
GreetedSession, which joins the lane with no socket object or client protocol until something needs them; the relay
closes it at its goodbye (a GONE event) until then. A template of another lane hands its client over (GREETED: its
key, its address, the bytes it sent after its startup packet); it becomes a GreetedSession too, which its own lane's
relay takes with those bytes. The door follows the logins: when most greetings of a sweep go to another lane, it moves into that
lane's relay (follow_logins). Either way the counts a login makes are made (sessions, cancel keys, per-user and
per-address counts, the pool's logins, the metrics). Every other first packet (another startup, a CancelRequest,
one of a template the relay has no key or budget for, a malformed one) comes as a STARTUP event and is served as a
client the acceptor took, from the bytes read (and may make a template in turn).

Keys: the door gives the relay blocks of cancel keys made by `Proxy.new_cancel_key` (unique, and routed by
`by_cancel_key` once the session is registered); with none left the relay gives the startup to Python. Budget: before
each run of the relay the door sets how many clients it may greet: the listener's max_client_connections less its
clients and the logins handed to Python not yet counted (no limit without one), and none while the proxy stops, while
any address has failed logins on record (the Python path's throttle judges those) or while a database is disabled from
the admin console. The relay greets only inside the lane's run_ready, before which the door (`prepare`) checks its
templates when what they were made from may have changed (pool.logins_epoch, a reload, a stop, a takeover): a template
whose pool's latest login greets differently (Engine.relay_login_same: other parameters after a failover), whose pool
has a new generation or drains, whose listener, users file or proxy settings changed (a reload) is dropped first, so no
client is greeted from stale facts. A door whose listener leaves the scope closes: its lane's relay lets go of the
listening socket (clients still sending their startup go to Python with the bytes read) and the acceptor accepts again;
so does a door whose acceptor closes (a graceful stop, a listener a reload removed or moved), a door whose lane closes,
and every door when a takeover begins, before it hands the listening sockets over.
"""
from __future__ import annotations

import _socket
import base64
import copy
import enum
import logging
import os
import struct
import sys
import time
from collections import deque


from . import pool as pool_module, relay_core
from .auth import parse_scram_verifier
from .engine import Engine
from .fastio import ClientSocket
from .session import Session, watch_client_timeouts

log = logging.getLogger("multiproxy.relay_logins")
_GREETED_AT = struct.Struct("d")    # a QUIET event's greeting time (a C double)
KEYS_LOW, KEYS_BLOCK = 64, 256      # the door gives the relay KEYS_BLOCK keys when it holds fewer than KEYS_LOW
MAX_TEMPLATES = 128                 # startups a door greets (the relay looks a startup up among them)
MOVE_AFTER = 16                     # greetings into another lane in a sweep that make the door move there


class Template:
    """What a login of one startup packet on one listener gives a client, and what must hold for it to stay true."""

    __slots__ = ("id", "startup", "reply", "key_at", "state", "user", "database", "variant", "pool", "facts",
                 "generation", "users", "listener", "proxy_config", "proto_class", "proto_fields", "proto_ctx",
                 "relay_key", "keep", "sock_kind", "startup_params", "greeted", "scram")

    def client(self, engine, ctx):
        """A new client protocol object as `Engine.resume_client(ctx, state)` makes it and a parking session compacts
        it, made by copying a prototype instead of decoding the state again: the first login decodes it once. Where
        the prototype holds its own context, the copy holds `ctx` (the client's key and address); containers are
        copied (see _copier), so that no client's state is another's."""
        cls = self.proto_class
        if cls is None:
            proto = engine.resume_client(ctx, self.state)
            proto.compact()
            self.proto_class, self.proto_ctx = type(proto), ctx
            self.proto_fields = [(name, value, _copier(value)) for name, value in vars(proto).items()]
            return proto
        proto = cls.__new__(cls)
        own = self.proto_ctx
        proto.__dict__ = {name: ctx if value is own else value if copy_value is None else copy_value(value)
                          for name, value, copy_value in self.proto_fields}
        return proto

    def valid(self, proxy, rt) -> bool:
        pool = self.pool
        facts = pool.facts
        if facts is not self.facts:     # a later login of the pool: the same greeting, or the template goes
            if facts is None or not rt.engine.relay_login_same(self.facts, facts):
                return False
            self.facts = facts
        return (pool.generation == self.generation and not pool.draining
                and proxy.users is self.users and rt.config is self.listener
                and proxy.config.proxy is self.proxy_config and rt.tls_context is None
                and proxy.pools.get((rt.cluster.name, rt.config.role, self.user, self.database, self.variant)) is pool)


class RelayLogins:
    """The login doors of one proxy process (one per listener at most), made by RelayLanes."""

    def __init__(self, lanes):
        self.lanes = lanes
        self.proxy = lanes.proxy
        self.doors: set = set()
        self.logins_total = 0           # clients the relay greeted (multiproxy_relay_logins_total)
        self.made_whole = 0             # GreetedSessions the Python path needed whole (multiproxy_relay_logins_whole)
        self.resumed = 0                # SCRAM exchanges the relay began, the Python path finished (..._resumed)

    def why_not(self, rt) -> str:
        """Why the listener's logins stay on the Python path ("" when they may be greeted by the relay)."""
        proxy = self.proxy
        if self.lanes.relay_class is not relay_core.Relay or relay_core.IMPLEMENTATION != "c":
            return "the relay core is the pure-Python twin"
        if type(rt.engine).relay_login is Engine.relay_login:
            return f"engine {rt.engine.name} has no relay logins"
        if rt.config.auth not in rt.engine.relay_login_auth:
            return f"the listener authenticates with {rt.config.auth}"
        if rt.tls_context is not None or rt.config.require_tls:
            return "the listener offers TLS"
        if (getattr(proxy, "worker_count", 1) != 1 or getattr(proxy, "custody", None) is not None
                or getattr(proxy, "balance", None) is not None):
            return "more than one worker"
        if proxy.audit.path or proxy.config.proxy.max_connections_per_address:
            return "audit log or max_connections_per_address"
        if proxy.stopping or getattr(proxy, "idle_hook", None) is not None or rt.acceptor is None:
            return "stopping or handing over"
        return ""

    def learn(self, session, lane) -> None:
        """A session that logged in on the Python path enters `lane` before its first request: its login becomes a
        template of its listener's door when it is in scope (a door greets into the lane it was opened in)."""
        rt = session.runtime
        proxy = self.proxy
        pool = session.pool
        facts = pool.facts
        if facts is None or not session.transaction_mode or self.why_not(rt):
            return
        record = proxy.users.get(session.user) if proxy.users is not None else None
        if record is not None and record.max_connections:
            return
        scram = None
        if rt.config.auth == "scram-sha-256":
            scram = scram_keys(record)
            if scram is None:       # a user of auth_query, or none of the users file's: the Python path's
                return
        made = rt.engine.relay_login(session.proto, facts)
        if made is None:
            return
        door = rt.acceptor.door
        if door is not None and (made[0] in door.by_startup or len(door.by_startup) >= MAX_TEMPLATES):
            return
        state = session.proto.handover_state()
        if state is None:
            return
        t = Template()
        t.startup, t.reply, t.key_at = made
        t.state, t.user, t.database, t.variant = state, session.user, session.database, pool.variant
        t.proto_class = t.proto_fields = t.proto_ctx = None
        t.greeted = 0
        t.scram = scram
        t.startup_params = dict(getattr(session.proto, "startup_params", None) or {})
        t.relay_key = lane.key
        t.pool, t.facts, t.generation = pool, facts, pool.generation
        t.users, t.listener, t.proxy_config = proxy.users, rt.config, proxy.config.proxy
        if door is None:
            try:
                door = LoginDoor(self, rt, lane)
            except (OSError, ValueError) as exc:
                log.warning("listener %s: relay logins could not start (%s); logins stay on the Python path",
                            rt.config.name, exc)
                return
        door.add(t)

    def sweep(self) -> None:
        for door in list(self.doors):
            if door.check():
                door.age()
                door.follow_logins()

    def timeouts_watched(self) -> bool:
        """Whether a door's quiet logins have client timeouts to be judged (the ClientTimeouts sweep keeps going
        for them even with no client yet: a quiet login does not wake any Python to start it)."""
        return any(door.timeouts_watched for door in self.doors)

    def close(self) -> None:
        """Every door lets go of its listener; the acceptors accept again (a takeover, the lanes' close)."""
        for door in list(self.doors):
            door.close()


class LoginDoor:
    """One listener's logins, accepted and greeted by the relay of the lane they go into (see the module docstring)."""

    def __init__(self, logins: RelayLogins, rt, lane):
        self.logins = logins
        self.lane = lane
        self.proxy = logins.proxy
        self.rt = rt
        self.acceptor = rt.acceptor
        self.engine = rt.engine
        self.templates: dict = {}       # id -> Template
        self.by_startup: dict = {}      # startup packet -> Template
        self.next_id = 1
        self.keys = 0                   # keys the relay holds
        self.pending = 0                # logins handed to the Python path, not counted in rt.connections yet
        self.aged_at = time.monotonic()
        self.closed = False
        self.seen = None                # what the templates were last judged from (prepare)
        self.budget_set = None          # the login budget the relay was given last
        self.quiet_greeted = 0          # clients greeted quietly since the last sweep (follow_logins)
        self.timeouts_for = None        # the configuration whose client timeouts quiet logins were watched for
        self.timeouts_watched = False   # it has some: each wake-up that greets quietly makes sure the sweep runs
        family = self.acceptor.sock.family
        # What the accepted sockets are, so that making a socket object of one asks the kernel nothing.
        self.sock_kind = (family, _socket.SOCK_STREAM, _socket.IPPROTO_TCP if family != _socket.AF_UNIX else 0)
        refuse, refusal = self.engine.relay_login_refusal
        # A kept client's goodbye between transactions (the lane's quit frame) closes it in the relay: a GONE event.
        self.relay.listen(self.acceptor.sock.fileno(), refuse=refuse, refusal=refusal,
                          hangup=lane.quit[:1] if lane.quit else b"")
        self.acceptor.pause(self)
        lane.door = self        # the lane's wake-ups prepare the door (prepare) and give it its events (handle)
        relay_core.attend()     # (its lane's next wake-up is whole: the door is prepared before the relay greets)
        lane.quiet_begin(self)  # its kept clients have no session until one is needed
        logins.doors.add(self)
        log.info("listener %s: logins greeted by the compiled relay", rt.config.name)

    @property
    def relay(self):
        """The relay of the door's lane, which listens on the listener's socket."""
        return self.lane.relay

    def add(self, t: Template) -> None:
        t.id = self.next_id
        self.next_id += 1
        self.templates[t.id] = t
        self.by_startup[t.startup] = t
        t.keep = t.pool is self.lane.pool and t.relay_key == self.lane.key     # its clients go into the door's lane
        t.sock_kind = self.sock_kind
        self._cache(t)

    def _cache(self, t: Template) -> None:
        self.relay.cache_greeting(t.startup, t.reply, key_at=t.key_at, template=t.id, keep=t.keep, scram=t.scram)

    def follow_logins(self) -> None:
        """Called by the sweep: when most greetings since the last sweep went to another lane than the door's (its
        first template's lane was a health check's, say), the door moves into that lane's relay, so that its clients
        are kept there instead of moved. Clients still sending their startup go to the Python path; the ones kept in
        the old lane stay there."""
        by_lane: dict = {}
        for t in self.templates.values():
            by_lane[(t.pool, t.relay_key)] = by_lane.get((t.pool, t.relay_key), 0) + t.greeted
            t.greeted = 0
        own = by_lane.pop((self.lane.pool, self.lane.key), 0) + self.quiet_greeted
        self.quiet_greeted = 0
        if not by_lane:
            return
        (pool, key), count = max(by_lane.items(), key=lambda item: item[1])
        if count < MOVE_AFTER or count <= 2 * own:
            return
        lane = self.logins.lanes.lanes.get((pool, key))
        if lane is None or lane.closed or lane.door is not None:
            return
        old = self.lane
        old.quiet_end()         # its quiet clients get their sessions while the templates are known
        events = old.relay.unlisten()
        old.relay.forget_greetings()
        old.door = None
        self.lane, self.keys, self.seen, self.budget_set = lane, 0, None, None
        refuse, refusal = self.engine.relay_login_refusal
        self.relay.listen(self.acceptor.sock.fileno(), refuse=refuse, refusal=refusal,
                          hangup=lane.quit[:1] if lane.quit else b"")
        lane.door = self
        relay_core.attend()
        lane.quiet_begin(self)
        for t in self.templates.values():
            t.keep = t.pool is lane.pool and t.relay_key == lane.key
            self._cache(t)
        self._handle(events)
        log.info("listener %s: logins greeted into pool %s's busiest lane now", self.rt.config.name, pool.label)

    def check(self) -> bool:
        """Drop the templates that no longer hold; close when none is left or the listener left the scope. False:
        the door is closed."""
        if self.closed:
            return False
        proxy, rt = self.proxy, self.rt
        if self.logins.why_not(rt) or rt not in proxy.listeners or rt.acceptor is not self.acceptor:
            self.close()
            return False
        stale = [t for t in self.by_startup.values() if not t.valid(proxy, rt)]
        if stale:
            self.lane.materialize()     # quiet clients get their sessions while their templates are known
            relay = self.relay
            relay.forget_greetings()
            for t in stale:
                del self.by_startup[t.startup]
                del self.templates[t.id]    # no GREETED event of it waits: the relay greets only in run_ready, and
                # a SCRAM exchange under way for it goes to the Python path at its next message (ANSWERED)
            for t in self.by_startup.values():
                self._cache(t)
        return True

    def age(self) -> None:
        """Clients that have been sending their startup for a handshake_timeout go to the Python path, whose handshake
        deadline then ends them as it ends any slow login (the relay keeps no clock)."""
        now = time.monotonic()
        if now - self.aged_at >= self.proxy.config.proxy.handshake_timeout:
            self.aged_at = now
            self._handle(self.relay.take_starting(True))

    def _budget(self) -> tuple:
        """(logins the relay may greet now, -1 for no limit; whether a quiet client's goodbye gives one back: the
        budget is max_client_connections' room, not a refusal)."""
        proxy, rt = self.proxy, self.rt
        console = getattr(proxy, "console", None)
        if proxy.stopping or proxy.throttle.watching() or (console is not None and console.disabled):
            return 0, False
        limit = rt.config.max_client_connections
        return (max(0, limit - rt.connections - self.pending), True) if limit else (-1, False)

    def prepare(self) -> None:
        """Before its lane's relay runs (and greets): stale templates go (judged again when what they were made from
        may have changed: a pool's login, generation or drain, a reload; or the proxy stops or hands over), the budget
        and the keys are set."""
        proxy, rt = self.proxy, self.rt
        # (per wake-up of the lane: the common case is a few identity checks)
        seen = self.seen
        if (seen is None or pool_module.logins_epoch != seen[0] or proxy.config is not seen[1]
                or proxy.users is not seen[2] or rt.config is not seen[3] or rt.tls_context is not seen[4]
                or proxy.stopping or rt.acceptor is not self.acceptor or proxy.idle_hook is not None):
            if not self.check():
                return
            self.seen = (pool_module.logins_epoch, proxy.config, proxy.users, rt.config, rt.tls_context)
        self.follow_budget()
        self.top_up_keys()
        self.follow_timeouts(0)

    def follow_budget(self) -> None:
        """The relay's login budget set from the counts (a whole wake-up, and one with events: a Python login or a
        reported client's goodbye changes the room the relay does not see). Between those the relay counts it down
        at each greeting and up at each quiet client's goodbye, and makes every wake-up whole while it is spent."""
        proxy, rt = self.proxy, self.rt
        if (rt.config.max_client_connections or self.budget_set != -1 or proxy.throttle.watching()
                or proxy.console.disabled):
            self.lane.count_quiet()     # (rt.connections with the quiet logins and goodbyes so far)
            budget, gives_back = self._budget()
            if budget != -1 or self.budget_set != -1:   # (no limit stays no limit: the relay counts down a limit)
                self.lane.relay.set_login_budget(budget, gives_back)
                self.budget_set = budget

    def top_up_keys(self) -> None:
        """The relay gets KEYS_BLOCK new cancel keys when it holds fewer than KEYS_LOW (it calls for them then)."""
        if self.keys < KEYS_LOW:
            relay = self.lane.relay
            new_key, engine = self.proxy.new_cancel_key, self.engine
            self.keys = relay.add_keys(b"".join(engine.relay_login_key_bytes(new_key(engine))
                                                for _ in range(KEYS_BLOCK)))

    def each_wake(self) -> bool:
        """Whether the door judges every wake-up of its lane (RelayLane._wake_rules), not only those after an
        attend(): until it has judged its templates once, and while a takeover waits for the proxy to be idle. (A
        login budget needs none: the relay makes every wake-up whole while it is spent, and the events that change
        the room re-set it, follow_budget; nor do client timeouts: the sweep runs while they are configured, and the
        relay judges quiet clients itself, RelayLane.judge_quiet_timeouts.)"""
        return self.seen is None or self.proxy.idle_hook is not None

    def follow_timeouts(self, greeted: int) -> None:
        """The proxy's client-timeout sweep runs for quiet logins when the configuration has client timeouts
        (judged again after a reload, which attend()s; `greeted`: quiet logins just counted, which it must watch).
        The sweep keeps going while a door has timeouts watched (RelayLogins.timeouts_watched)."""
        proxy = self.proxy
        if self.timeouts_for is not proxy.config:
            self.timeouts_for = proxy.config
            self.timeouts_watched = watch_client_timeouts(proxy, self.rt)
        elif greeted and self.timeouts_watched:
            watch_client_timeouts(proxy, self.rt)

    def _handle(self, events) -> None:
        for kind, fd, _, data, arg in events:
            self.handle(kind, fd, data, arg)

    def handle(self, kind: int, fd: int, data: bytes, arg: int) -> None:
        """An event of a client the relay accepted, before it became one of the lane's."""
        try:
            if kind == relay_core.GREETED:
                self.keys -= 1
                self.templates[arg].greeted += 1
                self._greeted(fd, data, arg)
            elif kind == relay_core.QUIET:      # a quiet client, counted already, needs its session now
                self._greeted(fd, data, arg, quiet=True)
            elif kind == relay_core.CLOSED:
                _close_fd(fd)       # gone before it said anything the relay could not answer
            elif kind == relay_core.ANSWERED:   # a SCRAM exchange the relay did not finish: the Python path goes on
                self.logins.resumed += 1
                size = data[0]
                self._python_login(fd, data[1 + size:], (arg, data[1:1 + size]))
            else:
                self._python_login(fd, data)    # STARTUP, or MALFORMED: the Python path answers it
        except Exception:  # one client's failure must not stop the others of the batch
            log.exception("relay logins: client fd %d failed", fd)

    def _greeted(self, fd: int, data: bytes, template_id: int, quiet: bool = False) -> None:
        """A client the relay greeted (data: its cancel key, its address, then what it sent after its startup packet
        unless the relay kept it) gets a GreetedSession, made from the template, and joins its lane with no socket
        object or client protocol: kept (the template's lane is the door's), it is a client of that lane already
        (RelayLane.adopt); otherwise its lane's relay takes it with what it sent (RelayLane.add_client). A client no
        lane takes now is made whole and served as a session that logged in on the Python path."""
        proxy, rt = self.proxy, self.rt
        t = self.templates[template_id]
        key, address, rest = greeted_parts(data, self.sock_kind[0])
        session = GreetedSession(proxy, rt, fd, t, address)
        if quiet and len(rest) == 8:
            session.connected_at, rest = _GREETED_AT.unpack(rest)[0], b""    # (when the relay greeted it)
        lane = None
        try:
            session.cancel_key = self.engine.relay_login_key(key)
            session.pool = t.pool   # (the pool of its user, database and variant: a template holds while it is)
            if not t.keep:
                lane = self.logins.lanes.lane_for(session, t.relay_key)
        except BaseException:
            if not t.keep or self.relay.remove(fd) is not None:
                _close_fd(fd)       # greeted, but nothing of it is registered: closed here, once
            else:
                _shutdown_fd(fd)    # linked already: the lane closes it at the relay's event
                self.lane.orphans.add(fd)
            raise
        self._register(session, address, quiet)
        try:
            if quiet:
                self.lane.adopt(session, counted=True)
            elif t.keep:
                self.lane.adopt(session)
            elif lane is not None:
                lane.add_client(session, rest)
            else:
                session.leftover = rest
                session.whole()
                if rest or not session.park():
                    proxy.resume_parked(session)    # served from its bytes (Session.resume), or ended there
        except BaseException:
            if session.relay_lane is None and (session.template is not None or not session.sock.parked):
                session.finish()                    # counted, then closed here, once
                proxy.client_left(session)
            raise

    def _register(self, session, address, quiet: bool = False) -> None:
        """The counts a login makes (as Session._logged_in and Proxy.serve_session make them); `quiet`: a quiet
        client's, whose counts its lane made already (RelayLane._count_quiet): its records alone."""
        proxy, rt = self.proxy, self.rt
        if quiet:
            lane = self.lane
            lane.quiet_clients -= 1
            proxy.sessions.quiet -= 1
            proxy.sessions.add(session)
            source = address[0] if isinstance(address, tuple) else str(address)
            proxy.connections_by_address[source] = proxy.connections_by_address.get(source, 0) + 1
            proxy.by_cancel_key[session.cancel_key] = session
            session.watch_timeouts()
            return
        proxy.client_came(rt, session, address[0] if isinstance(address, tuple) else str(address))
        proxy.metrics.client_connections_total += 1
        session.pool.logins_total += 1
        proxy.session_started(session)
        self.logins.logins_total += 1
        session.watch_timeouts()

    def _python_login(self, fd: int, data: bytes, answered=None) -> None:
        raw = _socket.socket(fileno=fd)
        try:
            address = raw.getpeername()
            sock = ClientSocket(raw)
        except OSError as exc:
            raw.close()         # gone before its login
            log.debug("relay logins: a client left before its login: %s", exc)
            return
        except BaseException:
            raw.close()
            raise
        self.pending += 1
        self.acceptor.run(self._python_job, (sock, data, answered), address)

    def _python_job(self, sock_data, address) -> bool:
        self.pending -= 1
        sock, data, answered = sock_data
        return self.acceptor.accepted_with(sock, address, data, answered)

    def close(self, resume: bool = True) -> None:
        """Let go of the listener: the relay's pending events are served, the clients still starting go to the Python
        path, and (`resume`) the acceptor accepts again."""
        if self.closed:
            return
        self.closed = True
        self.logins.doors.discard(self)
        lane = self.lane
        if lane.door is self:
            lane.quiet_end()    # its quiet clients get their sessions while the templates are known
            lane.door = None
        events = [] if lane.closed else self.relay.unlisten()   # (the relay greets only in run_ready)
        self._handle(events)
        self.acceptor.unpause(self, resume)
        log.info("listener %s: logins on the Python path again", self.rt.config.name)


_SHARED = frozenset((str, bytes, int, float, bool, type(None), frozenset))


def _copier(value):
    """How a new login gets its own `value`: None (shared: immutable), a shallow copy (a container of immutable values),
    or a deep copy."""
    kind = type(value)
    if kind in _SHARED or isinstance(value, enum.Enum):
        return None
    if kind is tuple:
        return None if all(_copier(item) is None for item in value) else copy.deepcopy
    if kind is dict:
        if all(_copier(key) is None and _copier(item) is None for key, item in value.items()):
            return dict.copy
    elif kind in (list, set, deque):
        if all(_copier(item) is None for item in value):
            return kind.copy
    return copy.deepcopy


class GreetedSession(Session):
    """A session whose client the relay greeted and keeps in its lane (a kept template's): its socket object, its client
    protocol (copied from the template) are made the first time anything reads them, after which it is a plain Session
    (its class changes); its address is the one the relay read. A client that only runs transactions in the relay and
    says goodbye never needs them: its login and its goodbye cost the bookkeeping alone."""

    __slots__ = ()

    def __init__(self, proxy, runtime, fd: int, template: Template, address):
        self._begin(proxy, runtime, address)
        self.user, self.database = template.user, template.database
        self.lane_fd = fd
        self.template = template

    def whole(self) -> None:
        """Make the socket object and the client protocol: from now on a plain Session (whose socket the relay no
        longer closes by itself)."""
        t = self.template
        lane = self.relay_lane
        if lane is not None and not lane.closed:
            lane.relay.disown(self.lane_fd)
        lanes = getattr(self.proxy, "relay_lanes", None)
        if lanes is not None:
            lanes.logins.made_whole += 1
        sock = ClientSocket(_socket.socket(*t.sock_kind, self.lane_fd))
        self.__class__ = Session
        self.sock, self.client_send = sock, sock.sendall
        self.proto = t.client(self.engine, self.client_context())
        self.template = None

    def _get(name):
        slot = getattr(Session, name)

        def get(self):
            self.whole()
            return slot.__get__(self, Session)

        def put(self, value):
            self.whole()
            slot.__set__(self, value)
        return property(get, put)

    sock = _get("sock")
    proto = _get("proto")
    client_send = _get("client_send")
    del _get

    def gone(self) -> None:
        """The relay closed its client (a goodbye, or its end, between transactions): only the bookkeeping is left."""
        self.relay_lane = None
        self.client_gone = True
        proxy = self.proxy
        proxy.session_ended(self)
        proxy.client_left(self)

    def finish(self, handed_over: bool = False) -> None:
        """Its client ends while nothing of it was made: only its bookkeeping is undone, and its socket closed."""
        self.client_gone = True
        self.proxy.session_ended(self)
        lane = self.relay_lane
        if lane is None or lane.remove_client(self):
            _close_fd(self.lane_fd)
        else:
            _shutdown_fd(self.lane_fd)  # linked in the relay: its event ends it (RelayLane._handle)


def scram_keys(record) -> tuple | None:
    """What the relay verifies a user's SCRAM-SHA-256 exchange with (cache_greeting's `scram`): the end of its
    server-first-message (",s=<salt>,i=<iterations>"), its StoredKey and its ServerKey; None without a SCRAM
    verifier."""
    text = record.verifiers.get("scram_sha_256") if record is not None else None
    if not text:
        return None
    try:
        verifier = parse_scram_verifier(text)
    except ValueError:
        return None
    tail = b",s=" + base64.b64encode(verifier.salt) + b",i=%d" % verifier.iterations
    if len(tail) > relay_core.SCRAM_TAIL_MAX or len(verifier.stored_key) != 32 or len(verifier.server_key) != 32:
        return None
    return tail, verifier.stored_key, verifier.server_key


def greeted_parts(data: bytes, family: int) -> tuple:
    """A GREETED event's data: (the client's cancel key bytes, its address as getpeername() gives it, the bytes it
    sent after its startup packet)."""
    end = 9 + data[8]
    return data[:8], peer_address(data[9:end], family), data[end:]


def peer_address(sockaddr: bytes, family: int):
    """A struct sockaddr (the relay's getpeername) as the socket module's getpeername() gives it."""
    if family == _socket.AF_UNIX:
        return ""
    if len(sockaddr) >= 8 and int.from_bytes(sockaddr[:2], sys.byteorder) == family:
        port = int.from_bytes(sockaddr[2:4], "big")
        if family == _socket.AF_INET:
            return _socket.inet_ntop(family, sockaddr[4:8]), port
        if family == _socket.AF_INET6 and len(sockaddr) >= 28:
            return (_socket.inet_ntop(family, sockaddr[8:24]), port, int.from_bytes(sockaddr[4:8], "big"),
                    int.from_bytes(sockaddr[24:28], sys.byteorder))
    return "", 0


def _shutdown_fd(fd: int) -> None:
    sock = _socket.socket(fileno=fd)
    try:
        sock.shutdown(_socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        sock.detach()


def _close_fd(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass
