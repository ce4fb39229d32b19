"""The compiled relay mode ([proxy] relay = "compiled"): idle clients and spare backends served by the relay core.

A session whose client waits for its next request with no backend, in transaction mode, on a plaintext
connection, unpinned and with nothing half done (its engine's `ClientProtocol.relay_key()` is not None), does not
park: its client socket goes into the `RelayLane` of its pool and of its key (the settings a backend must hold to
serve it with nothing replayed). A lane holds one relay_core `Relay` (the compiled multiproxy._relay, or its
pure-Python twin when the extension is missing) built from the framing rules the engine declares
(`Engine.relay_rules()`): a client's request is relayed to one of the lane's backends and the backend comes back to
the lane at the end of the transaction, with no Python per message and no greenlet per client. Python wakes only at
the events the engine asked for: a frame its screen stops (anything that could pin, change session state or open a
transaction block), a malformed frame, the end of a connection, a backend speaking out of turn. The session then
takes its client back and serves the stopped request on the Python path; it comes back to a lane when it is idle
and unpinned again.

Backends: a lane borrows from its pool (`Pool.borrow`, in a greenlet) when its clients wait and the pool has an idle
connection or room for one, and a session leaving the Python path may hand the lane the backend it releases
(`offer_backend`). A lane's backends are the pool's `lent` connections: they count in its size, so max_size, the
budget and the cluster cap hold, and as borrowed or idle as the relay has them (`Pool.borrowed`, `Pool.idle_count`,
SHOW POOLS, /metrics); their reader greenlets are stopped while the relay serves them (`BackendConnection.lend`).

The pool's queue is first come, first served for lanes and sessions alike. A lane whose clients wait with nothing
to take now (no idle backend, nothing idle in the pool, no room) does not send them to the Python path: it queues
one borrow in the pool's queue (`Pool.borrow(lane=...)`, a real waiter in `pool.waiters`; while others wait it does
so even when its own backends serve its clients in turn), and its clients keep waiting in the relay. A backend that
borrow gets serves the lane's client waiting longest (`take_backend(queued=True)`), at least one transaction.
Whenever someone besides the lane's own borrow waits in the queue (a session on the Python path, another lane's
borrow: `Pool._wait` calls `pool_wanted` on every lane, `_reconcile` looks again after every relay event), the lane
gives back its idle backends and turns the relay's `set_yield` on: a backend that ends a transaction then goes idle
instead of to the lane's next waiting client, and `_reconcile` gives it to the pool, whose queue decides who gets
it; `set_yield` goes off once nobody else waits, and the lane serves its clients with its backends as before. A lane
borrow never makes a lane give its clients to the Python path. A client that has waited the pool's
`borrow_timeout` in the relay (`Relay.age_waiting`, one tick per sweep) goes to the Python path with the pool's
timeout error (`Session.handed_error`), which answers its request with it in its protocol, as the pool answers a
waiter of its own; a lane borrow that cannot open a backend (BackendUnavailable) sends its waiting clients to the
Python path, whose borrow reports it (both "no_backend").

While the pool is paused or drained, or its backends turn out to use TLS, the lane gives its idle backends back and
its waiting clients to the Python path ("pool_wanted"), and a takeover under way sends the clients that hold no
backend there ("takeover"); a backend of an older generation, past its lifetime or on a
node that left the role goes back at the next sweep. A lane with no transaction in a sweep gives its idle backends
back, so the pool's idle timeout and min_size rule them as before. The relay moves the protocol's own bytes: a pool
whose backend connections turn out to use TLS ([clusters.*.backend] tls = prefer with a server that offers it,
require, ...) is not served by lanes from its first such backend on, and its clients stay on the Python path.

A client's goodbye (the engine's "quit" bytes: PostgreSQL's Terminate) stopped between transactions ends its session
in the lane's event handler (`Session.finish`, as the Python path would after reading it), with no greenlet.

Logins: a session entering a lane before its first request may make its login a template that the relay core then
answers by itself for the clients sending the same startup packet (multiproxy.relay_logins, `RelayLanes.logins`).
"""
from __future__ import annotations

import logging
import math
import socket as _stdsocket
import struct
import time
import weakref

import gevent

from . import relay_core
from .engine import ErrorKind
from .pool import BackendUnavailable, PoolTimeout
from .relay_logins import KEYS_LOW, RelayLogins

log = logging.getLogger("multiproxy.relay_lanes")
SWEEP_INTERVAL = 0.25       # seconds between two looks at every lane (lifetimes, failover, quiet lanes, takeovers)
RELAYED_TO_PAY = 1          # requests a stay in a lane relays at least not to count as wasted (RelayLane._judge_stay)
MAX_BOUNCES = 6             # short stays in a row counted: at most 2**6 - 1 idle points sat out on the Python path
BUFFER_SIZE = 16384         # bytes of each connection's buffer in the relay
_EVENT_NAMES = {relay_core.HANDOVER: "stopped", relay_core.MALFORMED: "malformed", relay_core.CLOSED: "closed"}


def relay_classes(choice: str):
    """(Walker, Relay) for [proxy] relay = choice ("compiled"), with a warning when only the twin is there."""
    if relay_core.IMPLEMENTATION != "c":
        log.warning("proxy.relay = %r: the compiled multiproxy._relay is not built (python3 setup.py build_ext "
                    "--inplace) or MULTIPROXY_RELAY_CORE=python; the relay lanes run on its pure-Python twin", choice)
        return relay_core.PyWalker, relay_core.PyRelay
    return relay_core.Walker, relay_core.Relay


class RelayLanes:
    """Every lane of one proxy process, by (pool, key), and the sweep that looks after them."""

    def __init__(self, proxy, choice: str = "compiled"):
        self.proxy = proxy
        self.walker_class, self.relay_class = relay_classes(choice)
        self.lanes: dict = {}
        self.rules: dict = {}           # engine name -> its declared rules, or None
        self.sweeper = None
        self.entered_total = 0          # sessions that went into a lane
        self.returned_total = 0         # sessions an event (or a sweep) gave back to the Python path
        self.short_stays_total = 0      # of them, stays that ended at a stop frame before they paid (_judge_stay)
        self.gone_total = 0             # clients a relay closed by itself (relay logins' kept clients)
        self.returns: dict = {}         # why, as in the /metrics label: how many
        self.closed_transactions = 0    # transactions of lanes closed since
        self.encrypted_pools = weakref.WeakSet()    # pools whose backends speak TLS: the relay cannot serve them
        self.logins = RelayLogins(self)  # logins greeted by the relay core (multiproxy.relay_logins)
        proxy.sessions.materialize = self.materialize_quiet     # iterating Proxy.sessions makes quiet clients' sessions
        proxy.sessions.settle = self.count_quiet                # its len() and the counts' readers count them

    # -- sessions

    def eligible_key(self, session):
        """The relay key of a session that may wait in a lane now, else None."""
        proxy = self.proxy
        if (session.backend is not None or session.pool is None or session.client_gone or session.leftover
                or not session.transaction_mode or session.custody_slot is not None
                or getattr(proxy, "idle_hook", None) is not None or getattr(proxy, "stopping", False)):
            return None
        sock = session.sock
        if getattr(sock, "_read_event", None) is None or getattr(sock, "parked", True) or not hasattr(sock, "park"):
            return None     # TLS (a gevent socket), closed, or parked already
        if session.pool in self.encrypted_pools:
            return None     # its backends speak TLS: the relay moves plaintext bytes only
        if self._rules(session.engine) is None:
            return None
        return session.proto.relay_key()

    def enter(self, session) -> bool:
        """Put an idle session's client into its lane (True), or leave it to the Python path (False)."""
        key = self.eligible_key(session)
        if key is None:
            return False
        lane = self._lane(session, key)
        if lane is None:
            return False
        if not session.proto.requests:
            self.logins.learn(session, lane)    # before add_client: the state it exports is the one its login left
        session.proto.compact()
        lane.add_client(session)
        self.entered_total += 1
        return True

    def lane_for(self, session, key):
        """The lane of a session the relay greeted (relay logins' GreetedSession, whose template knows its relay key),
        if it may wait in one now, else None. As eligible_key, without its socket object, which it does not have."""
        proxy = self.proxy
        if (session.pool is None or session.client_gone or not session.transaction_mode
                or getattr(proxy, "idle_hook", None) is not None or getattr(proxy, "stopping", False)
                or session.pool in self.encrypted_pools or self._rules(session.engine) is None):
            return None
        return self._lane(session, key)

    def offer_backend(self, session, backend) -> bool:
        """A session on the Python path releases `backend` at a transaction's end: its lane takes it (True) when
        the backend serves the lane's clients as it is and nobody else (besides the lane's own borrow) waits in the
        pool's queue; not while the session sits out idle points on the Python path (RelayLane._judge_stay): it would
        take the backend back from the lane for its next transaction."""
        if session.lane_skip:
            return False
        key = self.eligible_key(session)
        if key is None:
            return False
        lane = self._lane(session, key)
        return lane is not None and lane.take_backend(backend)

    def idle_backend(self, pool):
        """An idle backend of one of the pool's lanes, borrowed for a session on the Python path (its pool has no idle
        connection), or None: so that such a session does not wait for the pool while a lane holds spare backends."""
        for lane in pool.relay_lanes:
            conn = lane.take_idle_backend()
            if conn is not None:
                return conn
        return None

    def let_go(self, session) -> bool:
        """The session's client is closed from outside: the lane forgets it (True), or it is linked in the relay and
        only a shutdown of its connection ends it (False: the relay's event finishes the session)."""
        lane = session.relay_lane
        return lane is None or lane.remove_client(session)

    # -- lanes

    def _rules(self, engine):
        name = engine.name
        if name not in self.rules:
            self.rules[name] = engine.relay_rules()
        return self.rules[name]

    def _lane(self, session, key):
        pool = session.pool
        lane = self.lanes.get((pool, key))
        if lane is None:
            rules = session.engine.relay_rules(key)
            try:
                try:
                    lane = RelayLane(self, pool, key, session.engine, rules)
                except (TypeError, AttributeError) as exc:     # (an older build: other rules, no wake())
                    if self.relay_class is relay_core.PyRelay:
                        raise ValueError(str(exc)) from exc
                    log.warning("relay lanes: the compiled multiproxy._relay does not take the engine's rules or "
                                "has no wake() (%s: an older build? python3 setup.py build_ext --inplace); using the "
                                "pure-Python twin", exc)
                    self.walker_class, self.relay_class = relay_core.PyWalker, relay_core.PyRelay
                    lane = RelayLane(self, pool, key, session.engine, rules)
            except (ValueError, OSError) as exc:
                log.warning("relay lanes: pool %s: the relay could not be made (%s); its clients stay on the "
                            "Python path", pool.label, exc)
                self.rules[session.engine.name] = None
                return None
            self.lanes[(pool, key)] = lane
            if self.sweeper is None:
                self.sweeper = gevent.spawn(self._sweep_forever)
        return lane

    def busy(self) -> bool:
        """A transaction runs in some lane."""
        return any(lane.relay.counts()[2] for lane in self.lanes.values())

    def stats(self) -> dict:
        self.count_quiet()
        clients = sum(len(lane.clients) for lane in self.lanes.values())
        quiet = sum(lane.quiet_clients for lane in self.lanes.values())
        logins = self.logins
        backends = sum(len(lane.backends) for lane in self.lanes.values())
        transactions = sum(lane.relay.stats()["transactions"] for lane in self.lanes.values())
        return {"lanes": len(self.lanes), "clients": clients + quiet, "quiet": quiet, "backends": backends,
                "transactions": transactions + self.closed_transactions,
                "entered": self.entered_total, "returned": self.returned_total, "short_stays": self.short_stays_total,
                "logins": logins.logins_total,
                "logins_ended": self.gone_total, "logins_whole": logins.made_whole, "logins_resumed": logins.resumed,
                "login_doors": len(logins.doors)}

    def _sweep_forever(self) -> None:
        while True:
            gevent.sleep(SWEEP_INTERVAL)
            self.sweep()

    def sweep(self) -> None:
        evacuate = getattr(self.proxy, "idle_hook", None) is not None
        self.count_quiet()      # (so that a lane whose quiet clients all left closes; follow_logins' counts)
        try:
            self.logins.sweep()
        except Exception:  # the lanes' sweep goes on
            log.exception("relay logins: sweeping the login doors failed")
        for key, lane in list(self.lanes.items()):
            try:
                lane.sweep(evacuate)
                if not lane.clients and not lane.backends and lane.door is None and not lane.quiet_clients:
                    lane.close()
                    self.closed_transactions += lane.transactions_before
                    del self.lanes[key]
            except Exception:  # one lane's failure must not stop the sweep of the others
                log.exception("relay lanes: sweeping pool %s failed", lane.pool.label)

    def materialize_key(self, key, engine=None) -> None:
        """The quiet client holding cancel key `key` (as Proxy.new_cancel_key made it for `engine`), if any, gets its
        session (a cancel whose key no session holds); the other quiet clients stay as they are."""
        for lane in list(self.lanes.values()):
            if lane.closed or (engine is not None and lane.engine.name != engine.name):
                continue
            lane.count_quiet()
            if not lane.quiet_clients:
                continue
            try:
                key_bytes = lane.engine.relay_login_key_bytes(key)
            except (TypeError, ValueError, struct.error):   # not a key of this engine's
                continue
            lane._handle(lane.relay.report_key(key_bytes))

    def materialize_quiet(self) -> None:
        """Every client kept quietly in a lane gets its session (Proxy.sessions is read whole, a cancel key is
        looked up)."""
        for lane in list(self.lanes.values()):
            lane.materialize()

    def judge_quiet_timeouts(self, now: float) -> None:
        """The client timeouts of the quiet clients of every lane (the ClientTimeouts sweep, RelayLane's)."""
        for lane in list(self.lanes.values()):
            if lane.quiet_mode is not None:
                try:
                    lane.judge_quiet_timeouts(now)
                except Exception:  # one lane's failure must not stop the sweep of the others
                    log.exception("relay lanes: judging the client timeouts of pool %s failed", lane.pool.label)

    def count_quiet(self) -> None:
        """The logins and goodbyes of quiet clients so far are counted now, in every lane (a lane's wake-ups that run
        no Python leave them to be counted later: RelayLane.count_quiet)."""
        for lane in list(self.lanes.values()):
            if lane.quiet_mode is not None:
                lane.count_quiet()

    def close(self) -> None:
        """Give every socket back: clients to their sessions (not served again), backends closed."""
        if self.sweeper is not None:
            self.sweeper.kill(block=False)
            self.sweeper = None
        self.logins.close()
        for lane in list(self.lanes.values()):
            lane.close()
            self.closed_transactions += lane.transactions_before
        self.lanes.clear()


class RelayLane:
    """The clients of one pool that share a relay key, and the backends the relay lends them."""

    def __init__(self, lanes: RelayLanes, pool, key, engine, rules: dict):
        self.lanes = lanes
        self.proxy = lanes.proxy
        self.pool = pool
        self.key = key
        self.engine = engine
        walker = lanes.walker_class
        self.relay = lanes.relay_class(walker(**rules["client"]), walker(**rules["server"]),
                                       buffer_size=rules.get("buffer_size", BUFFER_SIZE), hold_stops=True)
        self.clients: dict = {}         # fd -> session
        self.backends: dict = {}        # fd -> BackendConnection
        self.quit = rules.get("quit")   # the client's goodbye, ended here (see Engine.relay_rules)
        self.feeding = 0                # borrows under way for the lane (of what the pool has now)
        self.queued = None              # the greenlet of the lane's borrow that waits in the pool's queue, or None
        self.pool_waiter = None         # that borrow's waiter in pool.waiters while it waits there (Pool._wait)
        self.yielding = False           # the relay's set_yield: others wait for the pool
        self.transactions_seen = 0      # the relay's count at the last sweep
        self.transactions_before = 0
        self.closed = False
        self.door = None                # the login door accepting into this lane's relay (multiproxy.relay_logins)
        self.quiet_mode = None          # the door whose kept clients the relay keeps quietly (set_quiet), or None
        self.quiet_clients = 0          # clients kept quietly in the relay: no session yet (materialize)
        self.orphans: set = set()       # client fds the relay still links whose session could not be made
        self.relay.set_wake(self._on_wake)
        self.watcher = gevent.get_hub().loop.io(self.relay.fileno(), 1)
        self.watcher.start(self.relay.wake)     # (C: a wake-up that needs none of the lane's code runs no Python)
        pool.relay_lanes.append(self)

    # -- clients

    def add_client(self, session, data: bytes = b"") -> None:
        """The session's client waits in the lane from now on; `data`: bytes of it already read (a greeted client's)."""
        fd = session.lane_fd = session.lane_fd if session.template is not None else session.sock.fileno()
        session.relay_lane = self
        self.clients[fd] = session
        events = self.relay.add_client(fd, data)
        # (a session the relay greeted has no statements, nor its protocol made for nothing: template not None)
        statements = session.proto.relay_statements() if session.template is None else None
        if statements:
            try:
                self.relay.set_statements(fd, statements)
            except ValueError:
                pass            # (given back already: its event says why)
        self._handle(events)
        self._reconcile()

    def adopt(self, session, counted: bool = False) -> None:
        """A client the relay greeted and keeps (its login door's): the session joins the lane as add_client's
        (`counted`: a quiet client's, counted in when it came)."""
        session.relay_lane = self
        self.clients[session.lane_fd] = session
        if not counted:
            self.lanes.entered_total += 1

    def remove_client(self, session) -> bool:
        fd = session.lane_fd
        if self.clients.get(fd) is not session:
            session.relay_lane = None
            return True
        if self.relay.remove(fd) is None:
            return False
        del self.clients[fd]
        session.relay_lane = None
        self._carry_state(session, fd)
        return True

    def activity(self, session):
        """(requests the relay walked for the session's client, its backend's fd or -1, whether it waits for one),
        or None when the relay no longer holds it (Session.check_timeouts)."""
        if self.closed or self.clients.get(session.lane_fd) is not session:
            return None
        return self.relay.activity(session.lane_fd)

    def backend_of(self, session):
        """The backend serving the session's client in the relay now, or None (for a cancel)."""
        fd = self.relay.peer(session.lane_fd) if not self.closed else -1
        return self.backends.get(fd)

    def _give_client_back(self, session, data: bytes, why: str, wake: bool = True) -> None:
        """The session serves its client on the Python path again, from `data` (bytes the relay did not send).
        wake=False: with no data, it parks as on the Python path (a takeover looks for parked sessions)."""
        session.relay_lane = None
        self._carry_state(session, session.lane_fd)
        lanes = self.lanes
        lanes.returned_total += 1
        lanes.returns[why] = lanes.returns.get(why, 0) + 1
        session.leftover = data
        if data or wake or not session.park(relay=False):
            self.proxy.resume_parked(session)

    def _carry_state(self, session, fd: int) -> None:
        """What the relay learnt serving the client it let go of at fd goes to its session: a BEGIN answered there and
        not sent (pg_begin, mysql_begin), which the session carries on (ClientProtocol.relay_began); the last insert id
        of the answers it relayed (MySQL; ClientProtocol.relay_insert_id)."""
        if session.client_gone:     # (a session that ends needs nothing, nor its protocol made)
            return
        begun = self.relay.lazy_begin(fd)
        if begun:
            session.proto.relay_began(relay_core.begin_text(begun))
        insert_id = self.relay.insert_id(fd)
        if insert_id:
            session.proto.relay_insert_id(insert_id)

    def _quit(self, session) -> None:
        """The client said goodbye between transactions: its session ends here, as the Python path would end it after
        reading the same bytes (Session.finish, then the proxy's count), with no greenlet."""
        session.relay_lane = None
        lanes = self.lanes
        lanes.returned_total += 1
        lanes.returns["stopped"] = lanes.returns.get("stopped", 0) + 1
        try:
            session.finish()
        finally:
            self.proxy.client_left(session)

    # -- backends

    def take_backend(self, conn, queued: bool = False) -> bool:
        """Lend `conn` (a borrowed connection between transactions) to the relay, if it may serve the lane now.
        queued: the pool's queue gave it to the lane's own borrow, so others waiting do not keep it from the lane
        (it serves the client waiting longest at least one transaction)."""
        if self.closed or not self._plaintext(conn) or not self._keeps(conn, queued) or not self.engine.relay_serves(
                self.key, conn.state):
            return False
        conn.lend()
        pool = self.pool
        pool.in_use.discard(conn)
        pool.lent.add(conn)
        self.backends[conn.sock.fileno()] = conn
        self._handle(self.relay.add_backend(conn.sock.fileno()))
        return True

    def _plaintext(self, conn) -> bool:
        """Whether conn's socket carries the protocol itself (not TLS: a backend leg with [clusters.*.backend]
        tls = prefer, require, ...). One TLS backend stops the pool's lanes: its clients stay on the Python path."""
        if not hasattr(conn.sock, "getpeercert"):
            return True
        if self.pool not in self.lanes.encrypted_pools:
            self.lanes.encrypted_pools.add(self.pool)
            log.info("relay lanes: pool %s: the backend connections use TLS; its clients stay on the Python path",
                     self.pool.label)
        return False

    def _keeps(self, conn, queued: bool = False) -> bool:
        pool = self.pool
        return not ((not queued and self._others_wait()) or pool.paused or pool.budget.over) and self._usable(conn)

    def _others_wait(self) -> bool:
        """Someone waits in the pool's queue besides the lane's own borrow: a session on the Python path, or the
        borrow of another lane (a waiter handed something has left the queue)."""
        waiting = len(self.pool.waiters)
        own = self.pool_waiter
        if own is not None and not own.ready():
            waiting -= 1
        return waiting > 0

    def _give_back(self, conn) -> None:
        self._unlend(conn)
        self.pool.release(conn)

    def _unlend(self, conn, reader: bool = True) -> None:
        """conn leaves the relay: borrowed on the Python path again (until the caller releases or closes it)."""
        conn.unlend(reader)
        pool = self.pool
        pool.lent.discard(conn)
        pool.in_use.add(conn)

    def transactions(self) -> int:
        return self.transactions_before if self.closed else self.relay.stats()["transactions"]

    def linked(self) -> int:
        """Backends serving a client in the relay now."""
        return 0 if self.closed else self.relay.counts()[2]

    def waiting_clients(self) -> int:
        """Clients waiting in the relay for a backend, less the lane's own borrow in the pool's queue (counted
        there): what the lane adds to Pool.waiting_count."""
        if self.closed:
            return 0
        own = self.pool_waiter
        return self.relay.counts()[1] - (1 if own is not None and not own.ready() else 0)

    def idle(self) -> int:
        """Backends idle in the relay now."""
        return 0 if self.closed else self.relay.counts()[0]

    def take_idle_backend(self):
        """One of the lane's idle backends, borrowed on the Python path from now on, or None."""
        while not self.closed:
            fd = self.relay.take_idle()
            if fd < 0:
                return None
            conn = self.backends.pop(fd)
            self._unlend(conn)
            if self._usable(conn):
                self.pool.borrows_total += 1
                return conn
            self.pool.release(conn)     # stale: the pool closes it
        return None

    def _usable(self, conn) -> bool:
        pool = self.pool
        lifetime = pool.config.max_lifetime
        return not (conn.closed or conn.generation != pool.generation or pool.draining or not pool.serves(conn)
                    or (lifetime and time.monotonic() - conn.created > lifetime))

    def pool_wanted(self) -> None:
        """Someone began to wait in the pool's queue (Pool._wait): unless it is the lane's own borrow, the lane
        gives its idle backends back, and from now on each backend that ends a transaction (the relay yields), so
        that the queue decides, first come first served, who gets it. Its clients stay in the lane."""
        if not self.closed and self._others_wait():
            self._set_yield(True)
            self._give_idle_back()

    def _set_yield(self, on: bool) -> None:
        """The relay lends no backend by itself (on: free ones go idle, for _reconcile to give back) or as usual."""
        if on != self.yielding:
            self.yielding = on
            events = self.relay.set_yield(on)
            self._wake_rules()      # (every wake-up calls the lane while it yields: it gives the free backends back)
            if events:
                self._handle(events)

    def _give_idle_back(self) -> None:
        relay = self.relay
        while not self.closed:
            fd = relay.take_idle()
            if fd < 0:
                break
            self._give_back(self.backends.pop(fd))

    def reclaim(self) -> None:
        """The pool is paused or drained (or its backends use TLS): the lane's idle backends go back to it, and the
        lane's waiting clients go to the Python path, where they wait as the pool decides."""
        if self.closed:
            return
        self.materialize()      # (the clients given back need their sessions)
        relay = self.relay
        while True:
            taken = relay.take_waiting()
            if taken is None:
                break
            fd, data = taken
            self._give_client_back(self.clients.pop(fd), data, "pool_wanted")
        while True:
            fd = relay.take_idle()
            if fd < 0:
                break
            self._give_back(self.backends.pop(fd))

    def _feed(self, count: int) -> None:
        for _ in range(count):
            self.feeding += 1
            gevent.spawn(self._borrow_for_lane)

    def _queue_borrow(self) -> None:
        """One borrow that waits in the pool's queue (first come, first served with the Python path's borrows) for
        the lane's waiting clients; it makes the other lanes give back idle backends, never their clients."""
        self.queued = gevent.spawn(self._borrow_for_lane, True)

    def _cancel_queued(self) -> None:
        """The lane's clients no longer wait: its borrow leaves the pool's queue (if it still waits there)."""
        queued = self.queued
        if queued is not None and self.pool_waiter is not None and not self.pool_waiter.ready():
            self.queued = None
            queued.kill(block=False)    # Pool._wait abandons its waiter (and releases what it was handed)

    def _borrow_for_lane(self, queued: bool = False) -> None:
        pool = self.pool
        failure = None
        try:
            if queued:
                conn = pool.borrow(lane=self)
            else:
                # Only what the pool has now (an idle connection, or room to open one).
                conn = pool.borrow() if pool.idle or pool.budget.has_room() else None
        except PoolTimeout:
            conn = None
        except BackendUnavailable as exc:
            conn, failure = None, exc
        finally:
            if not queued:
                self.feeding -= 1
            elif self.queued is gevent.getcurrent():
                self.queued = None
        if conn is None:
            if self.closed:
                return
            if failure is not None and not self.backends:
                # No backend could be opened: the waiting clients get the pool's answer on the Python path.
                self.materialize()
                while True:
                    taken = self.relay.take_waiting()
                    if taken is None:
                        break
                    fd, data = taken
                    self._give_client_back(self.clients.pop(fd), data, "no_backend")
                return
            self._reconcile()       # its backends serve its waiting clients in turn, or it queues a borrow
            return
        if not self._plaintext(conn):
            self.pool.release(conn)
            self.reclaim()          # the waiting clients are served on the Python path; no lane serves the pool again
            return
        if not self.closed and not self.engine.relay_serves(self.key, conn.state):
            # It holds other settings: the client waiting longest is served with it on the Python path, which
            # replays them; the backend serves the lane afterwards (offer_backend).
            self.materialize()
            taken = self.relay.take_waiting()
            if taken is None:
                self.pool.release(conn)
                return
            fd, data = taken
            session = self.clients.pop(fd)
            session.handed_backend = conn
            self._give_client_back(session, data, "settings")
            return
        if not self.take_backend(conn, queued):
            self.pool.release(conn)
        self._reconcile()

    # -- the relay's events

    def _on_wake(self, events) -> None:
        """The relay's wake(): None, a whole wake-up (the relay served nothing yet); else it served the ready sockets
        and these events, waiting clients or its few keys need the lane. Then the relay is told when to call again
        (_wake_rules)."""
        if events is None:
            self._on_ready()
        else:
            self._served(events)
            door = self.door
            if door is not None and not self.closed:
                door.top_up_keys()
                if events:
                    door.follow_budget()    # (a Python login or a reported client's goodbye moved the room)
        self._wake_rules()

    def _on_ready(self) -> None:
        door = self.door
        if door is not None:
            door.prepare()      # before the relay greets anyone: stale templates out, budget and keys in
        self._served(self.relay.run_ready())

    def _served(self, events) -> None:
        if self.quiet_mode is not None:
            self.count_quiet()
        if events:
            self._handle(events)
        self._reconcile()

    def _wake_rules(self) -> None:
        """Which wake-ups of the relay call the lane: every one while the lane yields to the pool's queue, the pool is
        paused or drained, or the door judges each (a login budget counts down, say); otherwise those with events,
        waiting clients or few keys left, and the next after any attend() (relay_core.attend: what a whole wake-up
        judges may have changed)."""
        if self.closed:
            return
        door, pool = self.door, self.pool
        eager = self.yielding or pool.paused or pool.draining or (door is not None and door.each_wake())
        self.relay.set_wake_rules(eager, KEYS_LOW if door is not None else 0)

    # -- quiet clients (relay logins): kept in the relay with no session until one is needed

    def quiet_begin(self, door) -> None:
        """`door`'s kept clients are kept quietly from now on: counted as they come and go, with no session until
        something needs theirs (materialize)."""
        self.quiet_mode = door
        self.relay.set_quiet(True)

    def quiet_end(self) -> None:
        """Every quiet client gets its session (the door leaves the lane): none is kept quietly from now on."""
        if self.quiet_mode is None or self.closed:
            self.quiet_mode = None
            return
        self.relay.set_quiet(False)
        self.materialize()
        self.count_quiet()
        self.quiet_mode = None

    def count_quiet(self) -> None:
        """The relay's quiet logins and goodbyes since the last call, counted now (_count_quiet)."""
        if self.quiet_mode is None or self.closed:
            return
        greeted, gone = self.relay.quiet_counts()
        if greeted or gone:
            self._count_quiet(greeted, gone)

    def _count_quiet(self, greeted: int, gone: int) -> None:
        """The counts that quiet clients' logins and ends make, made in bulk (as GreetedSession's _register and
        gone() make them one by one): clients, logins, per-user sessions; by-address counts, the session set and the
        cancel keys are made when their sessions are (LoginDoor._greeted)."""
        door = self.quiet_mode
        proxy = self.proxy
        change = greeted - gone
        self.quiet_clients += change
        proxy.sessions.quiet += change
        door.rt.connections += change
        user = self.pool.user
        proxy.sessions_per_user[user] = proxy.sessions_per_user.get(user, 0) + change
        if greeted:
            proxy.metrics.client_connections_total += greeted
            self.pool.logins_total += greeted
            door.logins.logins_total += greeted
            self.lanes.entered_total += greeted
            door.keys -= greeted
            door.quiet_greeted += greeted
            door.follow_timeouts(greeted)
        self.lanes.gone_total += gone

    def judge_quiet_timeouts(self, now: float) -> None:
        """The client timeouts of the lane's quiet clients, judged by the relay with no session made (age_quiet, at
        the ClientTimeouts sweep's pace, on the same clock): a client whose state lasted its limit gets its session
        now, its clock as the relay kept it, and the session acts as for any client (Session.check_timeouts: the
        idle ones are told why and closed, a request is cancelled, a transaction left idle is closed)."""
        if self.quiet_mode is None or self.closed:
            return
        self.count_quiet()      # (the QUIET events below are of clients counted already)
        if not self.quiet_clients:
            return
        settings = self.proxy.config.proxy
        pool = self.quiet_mode.rt.cluster.pool
        events, overdue = self.relay.age_quiet(now, settings.idle_client_timeout or 0.0,
                                               getattr(pool, "query_timeout", 0.0) or 0.0,
                                               getattr(settings, "idle_transaction_timeout", 0.0) or 0.0)
        if events:
            self._handle(events)
        for fd, _, since in overdue:
            session = self.clients.get(fd)
            if session is None:
                continue
            session.watch = None
            session.check_timeouts(now)         # its state and requests, seen now...
            if session.watch is not None:
                session.watch[2] = since        # ...and unchanged since the relay first saw them
                session.check_timeouts(now)

    def materialize(self) -> None:
        """Every quiet client of the lane gets its session now (QUIET events, handled as GREETED ones)."""
        if self.quiet_mode is not None and not self.closed:
            self.count_quiet()
        if self.quiet_clients and not self.closed:
            self._handle(self.relay.take_quiet())

    def _reconcile(self) -> None:
        """After the relay's events: backends and borrows as the lane's waiting clients and the pool's queue want."""
        if self.closed:
            return
        pool = self.pool
        if pool.paused or pool.draining:
            self.reclaim()      # PAUSE or a drain: no more transactions begin in the relay
            return
        others = self._others_wait()
        self._set_yield(others)
        if others:
            self._give_idle_back()  # to the pool's queue, first come first served (this lane's borrow included)
        idle, waiting, linked = self.relay.counts()
        if not waiting:
            return
        want = waiting - self.feeding - idle
        if want <= 0:
            return
        if not others:
            room = len(pool.idle) + (max(0, pool.config.max_size - pool.budget.size) if pool.budget.has_room() else 0)
            room -= sum(lane.feeding for lane in pool.relay_lanes)     # borrows spawned, not yet made
            if room > 0:
                self._feed(min(want, room))
                return
        if self.queued is None and not self.feeding and (others or not self.backends):
            # Nothing to take now: the lane waits in the pool's queue, behind whoever came first. A lane whose
            # backends serve its clients in turn queues only when others wait too (then it yields them).
            self._queue_borrow()

    def _handle(self, events) -> None:
        clients, backends = self.clients, self.backends
        for kind, fd, peer_fd, rest, arg in events:
            if kind == relay_core.GONE:     # a client its door greeted, closed by the relay between transactions
                session = clients.pop(fd, None)
                if session is not None:
                    self.lanes.gone_total += 1
                    session.gone()
                continue
            if peer_fd < 0 and fd not in clients and fd not in backends and fd not in self.orphans:
                door = self.door        # a client still logging in at the door (or greeted by it: GREETED, QUIET)
                if door is not None or kind == relay_core.GREETED or kind == relay_core.QUIET:
                    if door is None:
                        _stdsocket.socket(fileno=fd).close()    # (its door closed before the event: no session)
                    else:
                        door.handle(kind, fd, rest, arg)
                    continue
            session = self.clients.pop(fd, None)
            conn = self.backends.pop(fd, None)
            if peer_fd >= 0:
                session = session or self.clients.pop(peer_fd, None)
                conn = conn or self.backends.pop(peer_fd, None)
            backend_failed = conn is not None and conn.sock.fileno() == fd
            # A stop frame inside a transaction the relay served: the session carries it on with the backend (an
            # engine that cannot: the transaction is lost, and the client is told so as if its backend had gone)
            adopted = (conn is not None and session is not None and not backend_failed
                       and (kind == relay_core.HANDOVER or kind == relay_core.MALFORMED)
                       and session.proto.relay_adopt(conn.state, arg))
            transaction_lost = backend_failed or (conn is not None and session is not None and not adopted
                                                  and kind != relay_core.CLOSED)
            if conn is not None:
                self._unlend(conn, reader=adopted)
                if adopted:
                    session.adopt_backend(conn)
                elif session is None or not backend_failed:
                    if session is not None:
                        self.pool.discard_borrowed(conn)    # its client went away mid-transaction
                    else:
                        why = ("the backend sent data while idle in the pool" if kind == relay_core.UNSOLICITED
                               else "the backend closed the connection")
                        conn._lost(why)
                else:
                    conn._lost("the backend sent a message the relay does not take"
                               if kind == relay_core.MALFORMED or kind == relay_core.UNSOLICITED
                               else "the backend closed the connection")
            if session is None:
                if fd in self.orphans or peer_fd in self.orphans:
                    orphan = fd if fd in self.orphans else peer_fd
                    self.orphans.discard(orphan)
                    _stdsocket.socket(fileno=orphan).close()
                continue
            if conn is None and kind == relay_core.HANDOVER and rest == self.quit and rest:
                self._quit(session)
                continue
            if transaction_lost:
                # The backend died under a transaction the relay served: the client hears it, as from a server
                # that went away, and its connection ends (the Python path would keep it; the relay cannot say how
                # many of its requests are unanswered).
                session._send_quietly(session.proto.error(
                    ErrorKind.BACKEND_LOST, "the database connection was lost during your transaction; reconnect"))
                try:
                    session.sock.shutdown(_stdsocket.SHUT_RDWR)
                except (OSError, ValueError):
                    pass
                rest = b""
            if kind == relay_core.HANDOVER and (conn is None or adopted):
                # (a BEGIN the relay answered opened a transaction too: the stay must relay more than that BEGIN)
                self._judge_stay(session, adopted or bool(self.relay.lazy_begin(session.lane_fd)))
            why = ("connection_lost" if backend_failed else "in_transaction" if adopted
                   else _EVENT_NAMES.get(kind, "event"))
            self._give_client_back(session, rest, why)

    def _judge_stay(self, session, in_transaction: bool) -> None:
        """A client's stay in the lane ended at a stop frame: one that relayed none of its requests (inside a
        transaction: none but the one that opened it) cost the trip in and out (parking, the lane, waking its
        greenlet again: about as much as the Python path's work for a transaction of four statements) for nothing,
        so such stays in a row make the session sit out 1, 3, 7, ... up to 63 idle points on the Python path,
        keeping its greenlet, before it tries a lane again (a client whose every transaction sets something after
        its BEGIN, say); a stay that relayed more starts the count again. Sitting out is safe because the Python
        path undoes on a backend the session state its next client never set (a reset, a replay), as for any
        client of relay = "python"."""
        if self.relay.relayed_before(session.lane_fd) >= RELAYED_TO_PAY + in_transaction:
            session.lane_bounces = 0
            return
        bounces = session.lane_bounces = min(session.lane_bounces + 1, MAX_BOUNCES)
        session.lane_skip = (1 << bounces) - 1
        self.lanes.short_stays_total += 1

    # -- housekeeping

    def sweep(self, evacuate: bool) -> None:
        """Idle backends that must not serve again go back to the pool; a quiet lane gives all its idle ones back;
        `evacuate` (a takeover under way): the lane's clients not linked go back to the Python path."""
        if self.closed:
            return
        relay = self.relay
        transactions = relay.stats()["transactions"]
        quiet = transactions == self.transactions_seen
        self.transactions_seen = transactions
        kept = []
        while True:
            fd = relay.take_idle()
            if fd < 0:
                break
            conn = self.backends.pop(fd)
            if quiet or not self._keeps(conn):
                self._give_back(conn)
            else:
                kept.append(conn)
        for conn in kept:
            self.backends[conn.sock.fileno()] = conn
            self._handle(relay.add_backend(conn.sock.fileno()))
        if self.quiet_clients and (evacuate or relay.counts()[1]):
            self.materialize()      # the clients given back below need their sessions
        if evacuate:
            for fd, session in list(self.clients.items()):
                data = relay.remove(fd)
                if data is not None:
                    del self.clients[fd]
                    self._give_client_back(session, data, "takeover", wake=False)
        # Clients that waited the pool's borrow timeout in the relay get its error, as on the Python path: there
        # (Session.link) with the request they sent. Ticks of this sweep's pace, so never before the timeout.
        timeout = self.pool.config.borrow_timeout
        for fd, data in relay.age_waiting(math.ceil(timeout / SWEEP_INTERVAL) + 1):
            session = self.clients.pop(fd)
            session.handed_error = self.pool.timeout_error(timeout)
            self._give_client_back(session, data, "no_backend")
        if not relay.counts()[1]:
            self._cancel_queued()
        self._reconcile()

    def close(self) -> None:
        if self.closed:
            return
        self._cancel_queued()
        if self.door is not None:
            self.door.close()       # its listener goes back to the acceptor before the relay closes
        self.quiet_end()            # (none is left by then: every quiet client has its session before the close)
        self.closed = True
        self.watcher.stop()
        self.relay.set_wake(None)   # (the relay held the lane through its handler)
        try:
            self.pool.relay_lanes.remove(self)
        except ValueError:
            pass
        self.transactions_before = self.relay.stats()["transactions"]
        self.pool.relay_transactions_closed += self.transactions_before
        for fd, session in self.clients.items():
            self._carry_state(session, fd)
        self.relay.close()          # forgets every socket, closes none
        for conn in self.backends.values():
            self._unlend(conn, reader=False)
            self.pool.discard_borrowed(conn)
        self.backends.clear()
        clients = list(self.clients.values())
        self.clients.clear()
        for session in clients:
            session.relay_lane = None
            if not session.park(relay=False):
                self.proxy.resume_parked(session)
