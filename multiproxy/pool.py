"""Backend connection pools: LIFO reuse, size budgets shared by backend variants, idle and lifetime expiry, a borrow
queue with a timeout, and the facts that greet a client without waiting for a backend."""
from __future__ import annotations

import logging
import time
from collections import OrderedDict, deque

import gevent
from gevent.event import AsyncResult, Event

from . import relay_core
from .backends import BackendConnection, open_socket, run_script
from .engine import BackendError

log = logging.getLogger("multiproxy.pool")
# Bumped whenever a pool's latest login, generation or drain changes: what the templates of relay logins were made
# from (multiproxy.relay_logins), whose doors judge them again only then rather than at every wake-up.
logins_epoch = 0


def logins_changed() -> None:
    global logins_epoch
    logins_epoch += 1
    relay_core.attend()     # (the relay lanes' login doors judge their templates again at their next wake-up)


class _Slot:
    """Handed to a waiter: a free slot, reserved for it in its pool's `opening` (so that no borrow in between takes
    it), where the waiter opens its own connection."""

    __slots__ = ()


class PoolTimeout(Exception):
    """No backend connection became free within the borrow timeout."""


class BackendUnavailable(Exception):
    """No backend connection could be opened (unreachable, login refused, no writer known). `refusal` is the
    engine's BackendError when the server itself refused the login (its code and text), else None."""

    def __init__(self, message: str, refusal: BackendError | None = None):
        super().__init__(message)
        self.refusal = refusal


class Budget:
    """The max_size and min_size of one (cluster, role, user, database), shared by its pools: one per backend
    variant (MySQL clients differing in capabilities or charset), so that together they never open more.

    A connection closed to make room for another variant counts until the backend has closed its end as well
    (Pool.closing), so that the server never holds more than max_size of them either.

    `changes` is set, and replaced, each time a connect or such a close of one of its pools ends: a client login
    with no facts to greet it from waits on it for a login or a close already under way (see Pool.welcome_facts)."""

    def __init__(self, config, label: str):
        self.config = config
        self.label = label
        self.pools: list[Pool] = []
        self.changes = Event()
        self.over = False       # more connections than max_size after a reload lowered it (see reconfigure)
        self.cap: ClusterCap | None = None      # the cluster's max_cluster_connections, when it has one
        # With forked workers: the supervisor's budget broker (supervisor.WorkerLink), and the slots of the group's
        # max_size (and cap) this worker holds from it, always at least `size`. None and 0 with one process.
        self.group = None
        self.held = 0

    @property
    def size(self) -> int:
        return sum(pool.size for pool in self.pools)

    @property
    def opening(self) -> bool:
        return any(pool.opening for pool in self.pools)

    @property
    def closing(self) -> int:
        return sum(len(pool.closing) for pool in self.pools)

    def waiting(self, besides: "Pool | None" = None) -> int:
        return sum(len(pool.waiters) for pool in self.pools if pool is not besides)

    def changed(self) -> None:
        ended, self.changes = self.changes, Event()
        ended.set()

    def has_room(self) -> bool:
        """A connection may open now: below max_size, and below the cluster's cap if it has one (with workers: of
        the whole group, see group_room)."""
        return self.size < self.config.max_size and (self.cap is None or not self.cap.full()) and self.group_room()

    def group_room(self) -> bool:
        """With forked workers: a slot of the group's budget is held for one more connection, asked of the broker
        when none is spare (a round trip per connection opened, none per borrow). Always True with one process."""
        group = self.group
        if group is None or self.held > self.size:
            return True
        return group.acquire(self)

    def slot_held(self) -> bool:
        """Whether one more connection stays within the group slots held (always with one process)."""
        return self.group is None or self.held > self.size

    def hand_slot(self) -> bool:
        """Give the longest waiter of the budget's pools a slot to open a connection in (after the broker granted
        one); False when none waits."""
        best = None
        for pool in self.pools:
            waiters = pool.waiters
            while waiters and waiters[0].ready():
                waiters.popleft()
            if waiters:
                since = pool.waiting_since.get(waiters[0], 0.0)
                if best is None or since < best[0]:
                    best = (since, pool)
        if best is None:
            return False
        pool = best[1]
        slot = _Slot()
        pool.opening.add(slot)
        pool.waiters.popleft().set(slot)
        return True

    def make_room(self, pool: "Pool") -> bool:
        """Whether `pool` may open a connection now. When the budget is used up, the oldest idle connection of another
        variant is closed for it (unless closes under way already make room for every waiter and this caller):
        the slot comes free, to the longest waiter, once the backend has closed its end. Below max_size but at the
        cluster's cap, the cap does the same across the cluster's pools (ClusterCap.make_room)."""
        if self.size < self.config.max_size:
            cap = self.cap
            if cap is None or not cap.full():
                return self.group_room()
            return cap.make_room(pool)
        if self.closing > self.waiting():
            return False
        oldest = None
        for other in self.pools:
            if other is not pool and other.idle:
                conn = next(iter(other.idle))
                if oldest is None or conn.last_used < oldest.last_used:
                    oldest = conn
        if oldest is not None:
            oldest.pool._evict(oldest)
        return False

    def reconfigure(self, config) -> None:
        """A reload changed the pool settings: waiters get the slots a raised max_size adds now; beyond a lowered
        one, idle connections close now (oldest first) and borrowed ones when they come back (Pool.release)."""
        self.config = config
        for pool in self.pools:
            pool.config = config
        if self.cap is not None:
            self.cap.reconfigure(config)
        elif config.max_cluster_connections:
            log.warning("pool %s: max_cluster_connections applies to pools opened from now on; this one keeps no cap "
                        "until the proxy restarts", self.label)
        for pool in self.pools:
            while pool.waiters and self.size < config.max_size:
                before = self.size
                self.slot_freed(pool)
                if self.size == before:
                    break
        idle = sorted((conn for pool in self.pools for conn in pool.idle), key=lambda conn: conn.last_used)
        for conn in idle:
            if self.size <= config.max_size:
                break
            conn.pool._discard(conn)
        self.over = self.size > config.max_size

    def slot_freed(self, first: "Pool") -> None:
        """A connection of the budget closed: the longest waiter of `first`, else of another variant, may open one
        (with a cluster cap: the longest waiter of the cluster, ClusterCap.slot_freed)."""
        if self.cap is not None:
            self.cap.slot_freed()
            if self.group is not None:
                self.group.trim(self)
            return
        for pool in [first] + [p for p in self.pools if p is not first]:
            waiters = pool.waiters
            while waiters and self.size < self.config.max_size and self.slot_held():
                waiter = waiters.popleft()
                if not waiter.ready():
                    slot = _Slot()
                    pool.opening.add(slot)
                    waiter.set(slot)
                    return
        if self.group is not None:
            self.group.trim(self)      # no waiter here took the slot: it goes back to the group


class ClusterCap:
    """[clusters.NAME.pool] max_cluster_connections of one (cluster, role): its budgets (each pool's max_size) open
    together at most `limit` connections (counted as Budget.size: open, opening and closing). A borrower beyond it
    waits in its pool's queue; the waiters of all the cluster's pools are served first come, first served (by
    when each began to wait) as slots come free, and an idle connection of another pool is closed to make room
    while one waits (as Budget does between variants). A percentage cap has no limit (0) until the first login
    read the server's max_connections (`learned`)."""

    def __init__(self, config, label: str):
        self.config = config
        self.label = label
        self.budgets: list[Budget] = []
        self.server_max: int | None = None
        self.limit = config.cluster_cap()
        self.evictions_total = 0

    @property
    def wants_server_max(self) -> bool:
        return self.server_max is None and isinstance(self.config.max_cluster_connections, str)

    def learned(self, server_max: int) -> None:
        """The server's max_connections, read at the first login: a percentage cap takes effect."""
        self.server_max = server_max
        self.limit = self.config.cluster_cap(server_max)
        log.info("cluster %s: max_cluster_connections %s of the server's max_connections %d is %d connections",
                 self.label, self.config.max_cluster_connections, server_max, self.limit)

    def reconfigure(self, config) -> None:
        """A reload changed the pool settings: the cap follows (a percentage of the max_connections already read).
        Connections beyond a lowered cap close as they come back idle (Pool.release makes room for waiters)."""
        if config.max_cluster_connections == self.config.max_cluster_connections:
            self.config = config
            return
        self.config = config
        self.limit = config.cluster_cap(self.server_max)
        log.info("cluster %s: max_cluster_connections is now %s (%d connections)", self.label,
                 config.max_cluster_connections or "off", self.limit)

    @property
    def total(self) -> int:
        return sum(budget.size for budget in self.budgets)

    def full(self) -> bool:
        return 0 < self.limit <= self.total

    def pools(self) -> list:
        return [pool for budget in self.budgets for pool in budget.pools]

    @property
    def closing(self) -> int:
        return sum(budget.closing for budget in self.budgets)

    def waiting(self, besides: "Pool | None" = None) -> int:
        """Borrowers waiting for a slot the cap holds back (their own budget has room)."""
        return sum(len(pool.waiters) for pool in self.pools()
                   if pool is not besides and pool.budget.size < pool.budget.config.max_size)

    def first_waiter_elsewhere(self, pool: "Pool") -> bool:
        """Whether a borrower of another pool, held back by the cap alone, waits longer than every borrower of `pool` and
        is not served yet by closes under way (so that a connection `pool` gives back should make room for it)."""
        if self.closing >= self.waiting(besides=pool):
            return False
        own = min((pool.waiting_since.get(w, 0.0) for w in pool.waiters if not w.ready()), default=None)
        for other in self.pools():
            if other is pool or other.budget.size >= other.budget.config.max_size:
                continue
            for waiter in other.waiters:
                if not waiter.ready():
                    if own is None or other.waiting_since.get(waiter, 0.0) < own:
                        return True
                    break
        return False

    def make_room(self, pool: "Pool") -> bool:
        """At the cap: close the oldest idle connection of another pool of the cluster for `pool` (unless closes under
        way make room for every waiter already); the slot goes to the longest waiter once the backend closed its end.
        Always False: the caller waits."""
        if self.closing > self.waiting():
            return False
        oldest = None
        for other in self.pools():
            if other is not pool and other.idle:
                conn = next(iter(other.idle))
                if oldest is None or conn.last_used < oldest.last_used:
                    oldest = conn
        if oldest is not None:
            self.evictions_total += 1
            oldest.pool._evict(oldest)
        return False

    def slot_freed(self) -> None:
        """A connection of the cluster closed (or a connect failed): the longest waiter of the cluster whose own budget
        has room may open one, and so on while the cap has room."""
        self.budgets = [budget for budget in self.budgets if budget.pools]
        while not self.full():
            best = None
            for pool in self.pools():
                waiters = pool.waiters
                while waiters and waiters[0].ready():
                    waiters.popleft()
                if waiters and pool.budget.size < pool.budget.config.max_size and pool.budget.slot_held():
                    since = pool.waiting_since.get(waiters[0], 0.0)
                    if best is None or since < best[0]:
                        best = (since, pool)
            if best is None:
                return
            pool = best[1]
            slot = _Slot()
            pool.opening.add(slot)
            pool.waiters.popleft().set(slot)


class Pool:
    """Backend connections of one (cluster, role, user, database).

    Every connection is in exactly one place, and the counts follow from membership (as PgBouncer's state
    lists): `idle` (ordered oldest to newest; borrow takes the newest), `in_use` (handed to a session, or to a
    waiter that has not picked it up yet), `opening` (one token per connection being opened and logged in, or
    reserved for a waiter) and `closing` (closed to make room for another variant, until the backend closed its
    end). `size` and `borrowed` are derived from them. The pools of one (cluster, role, user, database) that differ in
    backend variant share a `Budget`: max_size and min_size bound their sizes together.
    """

    def __init__(self, proxy, cluster, role: str, user: str, database: str, engine, target_for, variant: tuple = (),
                 budget: Budget | None = None):
        self.proxy = proxy
        self.cluster = cluster
        self.role = role
        self.user = user
        self.database = database
        self.engine = engine
        self.config = cluster.pool
        self.target_for = target_for           # () -> BackendTarget (current address of the role)
        # LIFO: the most recently used is at the end (a dict for O(1) removal of a connection that died)
        self.idle: OrderedDict[BackendConnection, None] = OrderedDict()
        self.in_use: set[BackendConnection] = set()     # borrowed: serving a session or handed to a waiter
        self.opening: set[object] = set()               # one token per connection being opened
        self.closing: set[BackendConnection] = set()    # closed for another variant, until the backend closed too
        self.waiters: deque = deque()
        self.facts = None                      # the engine's state of the latest login (welcome parameters)
        self.generation = 0                    # bumped on failover; older connections are not reused
        self.draining = False
        self.connects_total = 0
        self.connect_failures_total = 0
        self.borrow_timeouts_total = 0
        self.borrow_wait_seconds_total = 0.0
        self.borrows_total = 0
        self.waited_borrows_total = 0
        self.budget_evictions_total = 0        # idle connections closed to make room for another variant
        self.logins_total = 0                  # clients that logged in to this pool (SHOW STATS)
        self.closed_requests_total = 0         # requests of its clients that have left (SHOW STATS)
        self.paused = False                    # the admin console's PAUSE / KILL: borrows wait for RESUME
        self.paused_waiting = 0                # borrows waiting for RESUME now
        self.waiting_since: dict = {}          # each waiting borrow (for a backend or RESUME) -> when it began
        self.refused_login = False             # the server refused this pool's first login (see Proxy.drop_refused_pool)
        base = f"{cluster.name}/{role}/{user}/{database}"
        self.variant = variant
        self.variant_name = engine.variant_name(variant) if variant else ""
        self.label = f"{base}[{self.variant_name}]" if self.variant_name else base
        if budget is None:
            budget = Budget(self.config, base)
            if self.config.max_cluster_connections:
                caps = getattr(proxy, "cluster_caps", None)
                if caps is None:
                    caps = proxy.cluster_caps = {}
                cap = caps.get((cluster.name, role))
                if cap is None:
                    cap = caps[(cluster.name, role)] = ClusterCap(self.config, f"{cluster.name}/{role}")
                cap.budgets.append(budget)
                budget.cap = cap
            budget.group = getattr(proxy, "link", None)
        self.budget = budget
        self.budget.pools.append(self)
        # The addresses the registry lets this role use now (a live set it updates), None without a registry:
        # a connection to an address outside it is not reused, so pools follow roles and lag without a query.
        registry = getattr(proxy, "registry", None)
        self.eligible = registry.eligible(cluster.name, role) if registry is not None else None
        self.retired_total = 0
        self.relay_lanes: list = []            # relay lanes holding this pool's backends (multiproxy.relay_lanes)
        self.lent: set[BackendConnection] = set()       # borrowed by a relay lane, idle or serving in its relay
        self.relay_transactions_closed = 0     # transactions of its relay lanes closed since

    @property
    def size(self) -> int:
        """Open connections plus those being opened or closed (what max_size and min_size bound)."""
        return len(self.idle) + len(self.in_use) + len(self.opening) + len(self.closing) + len(self.lent)

    @property
    def borrowed(self) -> int:
        """Connections serving a session (or handed to a waiter), those serving a client in a relay lane included."""
        if self.lent:
            return len(self.in_use) + sum(lane.linked() for lane in self.relay_lanes)
        return len(self.in_use)

    @property
    def relay_transactions(self) -> int:
        """Transactions its relay lanes served (SHOW STATS and /metrics count them with the borrows)."""
        return self.relay_transactions_closed + sum(lane.transactions() for lane in self.relay_lanes)

    @property
    def idle_count(self) -> int:
        """Connections waiting for a client: in the pool, or idle in a relay lane."""
        if self.lent:
            return len(self.idle) + sum(lane.idle() for lane in self.relay_lanes)
        return len(self.idle)

    @property
    def waiting_count(self) -> int:
        """Transactions waiting for a connection: the borrows in the queue, and the clients waiting in its relay
        lanes (counted instead of their lane's own borrow in the queue, RelayLane.waiting_clients)."""
        if self.relay_lanes:
            return len(self.waiters) + sum(lane.waiting_clients() for lane in self.relay_lanes)
        return len(self.waiters)

    @property
    def connections(self) -> set[BackendConnection]:
        """Every open connection, idle or borrowed (relay lanes' too)."""
        return self.in_use.union(self.idle, self.lent)

    # ------------------------------------------------------------------ borrowing

    def borrow(self, timeout: float | None = None, lane=None) -> BackendConnection:
        """A logged-in connection for exclusive use until `release`; waits at most the borrow timeout. `lane`: the
        borrow of a relay lane for its waiting clients (multiproxy.relay_lanes), which waits in the same queue but
        makes no lane give its clients to the Python path (see _wait)."""
        self.borrows_total += 1
        if self.paused:
            timeout = self._wait_resumed(self.config.borrow_timeout if timeout is None else timeout)
        idle = self.idle
        eligible = self.eligible
        while idle:
            conn = idle.popitem()[0]
            if not conn.closed and conn.generation == self.generation and (
                    eligible is None or conn.address in eligible):
                self.in_use.add(conn)
                return conn
            self._discard(conn)
        if self.budget.make_room(self):
            return self._connect_borrowed()
        return self._wait(self.config.borrow_timeout if timeout is None else timeout, lane)

    def _wait_resumed(self, timeout: float) -> float:
        """The database is paused from the admin console: wait for RESUME, at most `timeout` seconds; returns what
        is left of them for the borrow itself."""
        console = self.proxy.console
        started = time.monotonic()
        deadline = started + timeout
        token = object()
        self.waiting_since[token] = started
        self.paused_waiting += 1
        try:
            while self.paused:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self.borrow_timeouts_total += 1
                    raise PoolTimeout(f"database {self.database!r} is paused by an administrator (PAUSE or KILL in the "
                                      f"admin console) and was not resumed within {timeout:g} s; retry after RESUME")
                console.resumed.wait(remaining)
        finally:
            self.paused_waiting -= 1
            del self.waiting_since[token]
        return max(0.0, deadline - time.monotonic())

    def reconfigure(self, cluster) -> None:
        """A reload changed this pool's cluster settings: timeouts and [backend] settings apply to the next borrow and
        connect (read live from `cluster`); sizes through the budget (Budget.reconfigure)."""
        self.cluster = cluster
        self.config = cluster.pool
        if self.budget.config is not cluster.pool:
            self.budget.reconfigure(cluster.pool)

    def reconnect(self) -> None:
        """The admin console's RECONNECT: idle connections close now, borrowed ones when they come back (release
        closes connections of an older generation), so that every later borrow gets a new login."""
        self.generation += 1
        logins_changed()
        while self.idle:
            self._discard(self.idle.popitem()[0])

    def _wait(self, timeout: float, lane=None) -> BackendConnection:
        """Wait in the queue (first come, first served) for a connection someone releases or a slot that comes
        free. `lane`: a relay lane's borrow (RelayLane.pool_waiter is this waiter while it waits); its timeout is
        not counted as a client's (the lane's clients time out on their own, RelayLane.sweep)."""
        started = time.monotonic()
        self.waited_borrows_total += 1
        waiter = AsyncResult()
        self.waiters.append(waiter)
        waiting = self.waiting_since
        waiting[waiter] = started
        if lane is not None:
            lane.pool_waiter = waiter
        for other in list(self.relay_lanes):
            try:
                other.pool_wanted()     # the relay lanes give back their idle backends, and the free ones from now on
            except Exception:  # a lane's failure must not leave this waiter queued with nobody waiting on it
                log.exception("pool %s: a relay lane failed to give its backends back", self.label)
        try:
            result = waiter.get(timeout=timeout)
        except gevent.Timeout:
            result = None
        except BaseException:
            self._abandon(waiter)
            raise
        finally:
            del waiting[waiter]
            if lane is not None and lane.pool_waiter is waiter:
                lane.pool_waiter = None
        if result is None:
            self._abandon(waiter)
            if waiter.ready() and waiter.successful():
                result = waiter.value
        self.borrow_wait_seconds_total += time.monotonic() - started
        if result is None:
            if lane is not None:
                raise PoolTimeout("a relay lane's borrow waited its borrow timeout")
            raise self.timeout_error(timeout)
        if type(result) is _Slot:
            return self._connect_borrowed(result)
        if isinstance(result, BaseException):
            raise result
        return result

    def timeout_error(self, timeout: float) -> PoolTimeout:
        """The error of a borrow that waited `timeout` seconds for nothing (counted as a borrow timeout); also that
        of a relay lane's client that waited as long in its lane (RelayLane.sweep)."""
        self.borrow_timeouts_total += 1
        budget = self.budget
        cap = budget.cap
        if cap is not None and cap.full() and budget.size < self.config.max_size:
            return PoolTimeout(
                f"no database connection became free within {timeout:g} s: cluster {cap.label} holds all "
                f"{cap.limit} connections its clusters.{self.cluster.name}.pool.max_cluster_connections allows; "
                "retry, or raise max_cluster_connections or borrow_timeout")
        whose = (f"pool {self.label}" if len(budget.pools) == 1 else
                 f"{budget.label} (shared by its {len(budget.pools)} client variants)")
        return PoolTimeout(
            f"no database connection became free within {timeout:g} s: all {self.config.max_size} connections of "
            f"{whose} are busy; retry, or raise clusters.{self.cluster.name}.pool.max_size or borrow_timeout")

    def _abandon(self, waiter):
        try:
            self.waiters.remove(waiter)
        except ValueError:
            # Already handed something: give it back so nothing leaks.
            if waiter.ready() and waiter.successful():
                value = waiter.value
                if type(value) is _Slot:
                    self.opening.discard(value)
                    self._slot_freed()
                elif isinstance(value, BackendConnection):
                    self.release(value)     # release kept it in in_use for this waiter

    def _connect_borrowed(self, slot: _Slot | None = None) -> BackendConnection:
        try:
            conn = self._open(slot)
        except BaseException:
            self._slot_freed()
            raise
        self.in_use.add(conn)
        return conn

    def _open(self, slot: _Slot | None = None) -> BackendConnection:
        """connect(), counted in `opening` while it runs (from the hand-off of `slot`, when a waiter was handed one);
        the caller files the connection (no switch between)."""
        token = slot if slot is not None else object()
        self.opening.add(token)
        try:
            return self.connect()
        finally:
            self.opening.discard(token)
            self.budget.changed()

    def connect(self) -> BackendConnection:
        """Open and log in one backend connection (not filed in the pool: the caller does, see _open)."""
        target = self.target_for()
        if target is None:
            raise BackendUnavailable(f"no {self.role} node of cluster {self.cluster.name!r} is available right now; "
                                     "retry shortly (multiproxy is waiting for the cluster to elect one)")
        if target.password is None:
            cred = self.cluster.credential_for(self.user)
            if cred is not None and cred.secret_source():
                # The configured source failed (the log says why): no login without the password, which a
                # backend may count toward locking the account.
                self.connect_failures_total += 1
                raise BackendUnavailable(f"the database is not reachable through multiproxy: the backend password "
                                         f"of user {self.user!r} could not be obtained ({cred.key_path}); "
                                         "the proxy's log says why")
        timeout = self.cluster.backend.connect_timeout
        self.connects_total += 1
        sock = None
        try:
            sock = open_socket(target.host, target.port, timeout)
            sock, script = run_script(sock, self.engine.backend_login(target), target, timeout)
            if self.cluster.backend.init_query or (self.budget.cap is not None and self.budget.cap.wants_server_max):
                sock = self._after_login(sock, script.result, target, timeout)
        except (OSError, BackendError, ValueError) as exc:
            self.connect_failures_total += 1
            if sock is not None:
                try:
                    sock.close()
                except OSError:
                    pass
            if isinstance(exc, BackendError) and exc.fatal_auth:
                self.proxy.credentials_failed(self.cluster, self.user)
            else:
                self.proxy.backend_failed(self.cluster, (target.host, target.port))
            reason = str(exc) or type(exc).__name__
            if isinstance(exc, OSError) and not isinstance(exc, BackendError):
                reason = f"cannot connect to {target.host}:{target.port}: {exc.strerror or exc}"
            log.warning("pool %s: %s", self.label, reason)
            refusal = exc if isinstance(exc, BackendError) and exc.refused_by_server else None
            if refusal is not None and self.facts is None and not refusal.fatal_auth:
                # The server refused what the client chose (no such database, no access to it): the pool may go
                # (Proxy.drop_refused_pool). A refusal of the proxy's own credentials keeps it, and its counts.
                self.refused_login = True
            raise BackendUnavailable(f"the database is not reachable through multiproxy: {reason}", refusal) from None
        self.facts = script.result
        logins_changed()
        return BackendConnection(sock, script.result, (target.host, target.port), self, self.user, self.database,
                                self.generation)

    def _after_login(self, sock, state, target, timeout: float):
        """The cluster's init_query on a connection just logged in, and, for a percentage max_cluster_connections
        not known yet, the read of the server's max_connections. Failures raise BackendError (the login fails)."""
        engine = self.engine
        cap = self.budget.cap
        if cap is not None and cap.wants_server_max:
            where = f"clusters.{self.cluster.name}.pool.max_cluster_connections"
            script = engine.backend_query(engine.max_connections_query, state, f"read of max_connections ({where})") \
                if engine.max_connections_query else None
            if script is None:
                raise BackendError(f"{where} is a percentage, but the {engine.name} engine cannot read the server's "
                                   "max_connections; give a number of connections instead")
            sock, script = run_script(sock, script, target, timeout)
            try:
                cap.learned(int(float((script.result or [None])[0])))
            except (TypeError, ValueError):
                raise BackendError(f"{where}: the server's max_connections is not a number: {script.result!r}") from None
        init = self.cluster.backend.init_query
        if init:
            where = f"clusters.{self.cluster.name}.backend.init_query"
            script = engine.backend_query(init, state, f"init query ({where})")
            if script is None:
                raise BackendError(f"{where} is set, but the {engine.name} engine cannot run queries after its login; "
                                   "remove it")
            sock, _ = run_script(sock, script, target, timeout)
        return sock

    def welcome_facts(self):
        """The engine state of a logged-in backend, for greeting a new client, without waiting for a busy backend:
        the facts of this pool's latest login; else of a login of its own when the budget has a free slot (so a
        refusal of the user or database reaches the client at its login); else those of another pool the engine
        accepts them from (Engine.welcome_facts_from); else of a login of its own once room is made by closing an
        idle connection of another variant, or under way in the budget (waited for: that
        is a connect, bounded by connect_timeout, not a busy backend). Only a pool whose budget is all borrowed
        by variants whose facts the engine refuses, and none of them logging in, would wait for a borrow: no
        built-in engine has such variants (MySQL, the one with variants, accepts their facts)."""
        deadline = time.monotonic() + self.cluster.backend.connect_timeout
        while True:
            if self.facts is not None:
                return self.facts
            budget = self.budget
            if budget.has_room():
                # A free slot: the pool's own login, so that the server's refusal of this user or database (if it
                # refuses) reaches the client at its login, as it would directly.
                self.release(self._connect_borrowed())
                return self.facts
            facts = self.facts_of_others()
            if facts is not None:
                return facts
            budget = self.budget
            if budget.make_room(self):
                self.release(self._connect_borrowed())
                return self.facts
            remaining = deadline - time.monotonic()
            if not (budget.opening or budget.closing) or remaining <= 0:
                break
            budget.changes.wait(remaining)
        self.release(self.borrow())
        return self.facts

    def facts_of_others(self):
        """Login facts of another pool of this cluster, role and engine that the engine accepts for this pool's
        clients: the other variants of this budget first, then pools of other users and databases."""
        engine = self.engine
        candidates = [pool for pool in self.budget.pools if pool is not self and pool.facts is not None]
        if not candidates:
            cluster, role = self.cluster.name, self.role
            candidates = [pool for pool in list(self.proxy.pools.values())
                          if pool.facts is not None and pool is not self and pool.cluster.name == cluster
                          and pool.role == role and pool.engine is engine]
        for pool in candidates:
            facts = engine.welcome_facts_from(pool.facts, self.user, self.database, pool.user, pool.database)
            if facts is not None:
                return facts
        return None

    # ------------------------------------------------------------------ giving back

    def release(self, conn: BackendConnection) -> None:
        """Take a connection back after a transaction; hand it straight to the longest waiter if any."""
        if conn.closed:
            self.in_use.discard(conn)     # forget() took it out already when it died
            return
        now = time.monotonic()
        lifetime = self.config.max_lifetime
        if self.draining or conn.generation != self.generation or (lifetime and now - conn.created > lifetime):
            self._discard(conn)
            return
        if self.budget.over:
            if self.budget.size > self.config.max_size:
                self._discard(conn)     # a reload lowered max_size: this one closes instead of serving again
                return
            self.budget.over = False
        if self.eligible is not None and conn.address not in self.eligible:
            self.retired_total += 1     # the node left this role (or lags): retire at the transaction's end
            self._discard(conn)
            return
        conn.last_used = now
        waiters = self.waiters
        cap = self.budget.cap
        if cap is not None and cap.full() and cap.first_waiter_elsewhere(self):
            # At the cluster's cap a borrower of another pool waited longer than any of this one: first come, first
            # served across the cluster, so this connection makes room for it.
            cap.evictions_total += 1
            self.in_use.discard(conn)
            self._evict(conn)
            return
        while waiters:
            waiter = waiters.popleft()
            if not waiter.ready():
                waiter.set(conn)          # it stays in in_use, now for the waiter
                return
        self.in_use.discard(conn)
        budget = self.budget
        if len(budget.pools) > 1 and budget.closing < budget.waiting(besides=self):
            # Another variant of the budget waits for a slot: this connection makes room for it.
            self._evict(conn)
            return
        if budget.group is not None and budget.group.take_wanted(budget):
            # Another worker waits for a slot of the group's budget: this connection makes room for it.
            self._evict(conn)
            return
        self.idle[conn] = None

    def _evict(self, conn: BackendConnection) -> None:
        """Close an idle (or just released) connection for another variant of the budget: its slot stays taken,
        in `closing`, until the backend has closed its end (closed_gracefully)."""
        self.idle.pop(conn, None)
        self.closing.add(conn)
        self.budget_evictions_total += 1
        conn.close_gracefully(self.cluster.backend.connect_timeout)

    def closed_gracefully(self, conn: BackendConnection) -> None:
        """The backend closed a connection of `closing` (or it timed out): its slot goes to the longest waiter."""
        self.closing.discard(conn)
        self.budget.changed()
        self._slot_freed()

    def _discard(self, conn: BackendConnection) -> None:
        """Take a connection out of the pool and close it (a closed one was taken out when it died)."""
        self.in_use.discard(conn)
        self.idle.pop(conn, None)
        if not conn.closed:
            conn.close()
            self._slot_freed()

    def forget(self, conn: BackendConnection, why: str) -> None:
        """A connection died on its own (called once, by the connection), idle or borrowed."""
        self.in_use.discard(conn)
        self.idle.pop(conn, None)
        log.info("pool %s: backend connection closed: %s", self.label, why)
        self.proxy.backend_failed(self.cluster, conn.address)
        self._slot_freed()

    def discard_borrowed(self, conn: BackendConnection) -> None:
        """A borrowed connection must not be reused (client left mid-transaction): close it."""
        self._discard(conn)

    def _slot_freed(self) -> None:
        self.budget.slot_freed(self)

    # ------------------------------------------------------------------ housekeeping

    def expire(self, now: float) -> None:
        """Close connections idle past idle_timeout (oldest first), keeping the budget's min_size open."""
        timeout = self.config.idle_timeout
        lifetime = self.config.max_lifetime
        min_size = self.config.min_size
        budget = self.budget
        for conn in list(self.idle):      # oldest first
            if budget.size <= min_size:
                break
            if (timeout and now - conn.last_used > timeout) or (lifetime and now - conn.created > lifetime):
                self._discard(conn)

    def fill(self) -> None:
        """Open connections until the budget holds min_size (called from the housekeeping greenlet). While the
        registry knows no node for the pool's role (an outage, a failover) it opens none and waits for none: the
        next tick looks again, and only clients that wait hurry the registry's probes (Registry.wait_for)."""
        if self.proxy.follows_roles(self.cluster) and \
                self.proxy.registry.address_for(self.cluster.name, self.role) is None:
            return
        while self.budget.size < self.config.min_size and not self.draining and not self.paused and (
                self.budget.cap is None or not self.budget.cap.full()) and self.budget.group_room():
            try:
                conn = self._open()
            except BackendUnavailable:
                return
            self.idle[conn] = None
            self.idle.move_to_end(conn, last=False)   # the oldest end: borrowed last

    def drain(self, address: tuple[str, int], reason: str) -> None:
        """Failover: idle connections close now; those serving a transaction on `address` are cut, and their
        clients told why in their own protocol; the rest are not reused."""
        self.generation += 1
        logins_changed()
        while self.idle:
            self._discard(self.idle.popitem()[0])
        for conn in list(self.in_use):
            if conn.address == address and conn.session is not None:
                conn.fail(reason)

    def serves(self, conn: BackendConnection) -> bool:
        """Whether `server`'s node may still serve this pool's role (always, without a registry)."""
        return self.eligible is None or conn.address in self.eligible

    def retire(self, reasons: dict, role_text: str) -> None:
        """The registry took these addresses out of this pool's role ({address: why}): idle connections to them
        close now, borrowed ones when their transaction ends (release); a pinned session idle between
        transactions there is closed with the reason, as in a writer failover."""
        for conn in [conn for conn in self.idle if conn.address in reasons]:
            self.retired_total += 1
            self._discard(conn)
        for conn in list(self.in_use):
            session = conn.session
            if conn.address in reasons and session is not None and session.proto is not None \
                    and session.proto.pinned and session.proto.is_clean():
                address = conn.address
                conn.fail(f"the node {address[0]}:{address[1]} no longer serves {role_text} "
                            f"({reasons[address]}); your pinned session was closed, reconnect")

    def close_all(self) -> None:
        self.draining = True
        logins_changed()
        while self.idle:
            self._discard(self.idle.popitem()[0])
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.ready():
                waiter.set(BackendUnavailable("multiproxy is shutting down"))
