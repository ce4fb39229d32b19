"""Pool over real loopback connections to a toy database (tests/unit/toykit.py): no database, no engine."""
from __future__ import annotations

import time
from types import SimpleNamespace

import gevent
import pytest

from multiproxy.engine import BackendTarget
from multiproxy.pool import BackendUnavailable, Pool, PoolTimeout

from .toykit import StubProxy, StubRegistry, ToyDatabase, ToyEngine, check_counts, make_cluster, unused_address, \
    wait_until

pytestmark = pytest.mark.timeout(10)


@pytest.fixture
def db():
    database = ToyDatabase("db1")
    yield database
    database.stop()


@pytest.fixture
def pools():
    made = []
    yield made
    for pool in made:
        pool.close_all()
        for conn in list(pool.in_use):
            conn.close()


@pytest.fixture
def make_pool(pools):
    def make(db, registry=None, role="writer", target=None, **settings):
        cluster = make_cluster(**settings)
        proxy = StubProxy(cluster, registry)
        pool = Pool(proxy, cluster, role, "app", "appdb", ToyEngine(), target or db.target)
        pools.append(pool)
        return pool
    return make


def ask(conn, request: str) -> str:
    """Send one request on a borrowed connection and read its answer, as a linked session would."""
    answers = []
    conn.session = SimpleNamespace(on_backend_data=lambda c, data: answers.append(data),
                                   on_backend_lost=lambda c, why: answers.append(why))
    conn.sendall(request.encode() + b"\n")
    wait_until(lambda: answers, what="an answer")
    conn.session = None
    return answers[0].decode().strip()


class LinkedSession:
    """Stands for a Session linked to a borrowed connection: records what the connection tells it."""

    def __init__(self, pinned=False, clean=True):
        self.lost = []
        self.proto = SimpleNamespace(pinned=pinned, is_clean=lambda: clean)

    def on_backend_data(self, conn, data):
        pass

    def on_backend_lost(self, conn, why):
        self.lost.append(why)


def test_borrow_release_reuses_the_most_recent_connection(db, make_pool):
    pool = make_pool(db)
    a = pool.borrow()
    b = pool.borrow()
    assert (pool.size, pool.borrowed, len(pool.idle)) == (2, 2, 0)
    assert ask(a, "SELECT") == "OK db1#1 SELECT" and ask(b, "SELECT") == "OK db1#2 SELECT"
    pool.release(a)
    pool.release(b)
    assert (pool.size, pool.borrowed, len(pool.idle)) == (2, 0, 2)
    check_counts(pool)
    assert pool.borrow() is b          # LIFO: the most recently released first
    assert pool.borrow() is a
    assert pool.connects_total == 2 and pool.borrows_total == 4 and db.opened == [1, 2]
    assert pool.connections == {a, b}
    check_counts(pool)


def test_welcome_facts_come_from_one_login(db, make_pool):
    pool = make_pool(db)
    assert pool.welcome_facts() == {"node": "db1"}
    assert pool.welcome_facts() == {"node": "db1"}
    assert pool.connects_total == 1 and (pool.size, pool.borrowed) == (1, 0)


def test_a_connection_being_opened_counts_toward_size(db, make_pool):
    db.login_delay = 0.3
    pool = make_pool(db, max_size=1)
    opener = gevent.spawn(pool.borrow)
    wait_until(lambda: pool.opening, what="the connect to start")
    assert (pool.size, pool.borrowed, len(pool.opening)) == (1, 0, 1)
    with pytest.raises(PoolTimeout):
        pool.borrow(timeout=0.05)       # the slot being opened is taken
    conn = opener.get(timeout=2)
    assert (pool.size, pool.borrowed, len(pool.opening)) == (1, 1, 0)
    pool.release(conn)
    check_counts(pool)


def test_max_size_and_the_borrow_timeout(db, make_pool):
    pool = make_pool(db, max_size=1, borrow_timeout=0.1)
    held = pool.borrow()
    started = time.monotonic()
    with pytest.raises(PoolTimeout) as caught:
        pool.borrow()
    assert 0.08 < time.monotonic() - started < 1.0
    assert str(caught.value) == (
        "no database connection became free within 0.1 s: all 1 connections of pool toy/writer/app/appdb are busy; "
        "retry, or raise clusters.toy.pool.max_size or borrow_timeout")
    with pytest.raises(PoolTimeout, match="within 0.05 s"):
        pool.borrow(timeout=0.05)     # an explicit timeout wins over the configured one
    assert pool.borrow_timeouts_total == 2 and pool.waited_borrows_total == 2
    assert not pool.waiters and (pool.size, pool.borrowed) == (1, 1) and db.opened == [1]
    pool.release(held)
    check_counts(pool)


def test_release_hands_the_connection_to_the_longest_waiter(db, make_pool):
    pool = make_pool(db, max_size=1, borrow_timeout=2)
    conn = pool.borrow()
    got = []
    first = gevent.spawn(lambda: got.append(("first", pool.borrow())))
    gevent.sleep(0)
    second = gevent.spawn(lambda: got.append(("second", pool.borrow())))
    wait_until(lambda: len(pool.waiters) == 2, what="two waiters")
    pool.release(conn)
    assert (pool.borrowed, len(pool.idle)) == (1, 0)     # handed over directly, never idle
    first.join(timeout=2)
    assert got == [("first", conn)]
    pool.release(conn)
    second.join(timeout=2)
    assert got == [("first", conn), ("second", conn)]
    assert pool.connects_total == 1 and pool.borrow_timeouts_total == 0
    pool.release(conn)
    check_counts(pool)


def test_a_freed_slot_lets_a_waiter_open_its_own_connection(db, make_pool):
    pool = make_pool(db, max_size=1, borrow_timeout=2)
    conn = pool.borrow()
    waiter = gevent.spawn(pool.borrow)
    wait_until(lambda: pool.waiters, what="a waiter")
    pool.discard_borrowed(conn)        # e.g. its client left mid-transaction
    fresh = waiter.get(timeout=2)
    assert fresh is not conn and conn.closed and db.opened == [1, 2]
    wait_until(lambda: db.closed == [1], what="the database to see the discarded connection close")
    assert (pool.size, pool.borrowed) == (1, 1)
    check_counts(pool)


def test_a_waiter_killed_after_the_hand_off_gives_the_connection_back(db, make_pool):
    pool = make_pool(db, max_size=1, borrow_timeout=2)
    conn = pool.borrow()
    waiter = gevent.spawn(pool.borrow)
    wait_until(lambda: pool.waiters, what="a waiter")
    waiter.kill(block=False)    # the kill reaches the waiter before the connection does
    pool.release(conn)
    waiter.join(timeout=2)
    assert waiter.dead and (pool.size, pool.borrowed, len(pool.idle)) == (1, 0, 1)
    assert pool.borrow() is conn
    check_counts(pool)


def test_idle_timeout_closes_the_oldest_first_down_to_min_size(db, make_pool):
    pool = make_pool(db, min_size=1, idle_timeout=10)
    a, b, c = pool.borrow(), pool.borrow(), pool.borrow()
    for conn in (a, b, c):
        pool.release(conn)
    a.last_used -= 30
    b.last_used -= 20
    c.last_used -= 5
    now = time.monotonic()
    pool.expire(now)
    assert list(pool.idle) == [c] and a.closed and b.closed and not c.closed
    c.last_used -= 10
    pool.expire(now)                  # c is past idle_timeout too, but min_size keeps one open
    assert list(pool.idle) == [c]
    wait_until(lambda: sorted(db.closed) == [1, 2], what="the database to see two connections close")
    check_counts(pool)


def test_max_lifetime_closes_old_connections_at_release_and_when_idle(db, make_pool):
    pool = make_pool(db, max_lifetime=60)
    old, young = pool.borrow(), pool.borrow()
    old.created -= 120
    pool.release(old)                 # too old: closed instead of kept
    assert old.closed and (pool.size, len(pool.idle)) == (1, 0)
    pool.release(young)
    young.created -= 120
    pool.expire(time.monotonic())
    assert young.closed and pool.size == 0
    check_counts(pool)


def test_fill_opens_min_size_connections_behind_the_idle_ones(db, make_pool):
    pool = make_pool(db, min_size=3)
    used = pool.borrow()
    pool.release(used)
    pool.fill()
    assert (pool.size, len(pool.idle), pool.borrowed) == (3, 3, 0) and db.opened == [1, 2, 3]
    assert pool.borrow() is used      # filled connections go to the oldest end
    pool.fill()
    assert pool.size == 3 and pool.connects_total == 3
    check_counts(pool)


def test_fill_stops_when_the_database_is_unreachable(make_pool):
    host, port = unused_address()
    pool = make_pool(None, min_size=2, target=lambda: BackendTarget(host, port, "app", "appdb", "secret"))
    pool.fill()
    assert pool.size == 0 and pool.connect_failures_total == 1
    assert pool.proxy.backend_failures == [(host, port)]


def test_a_failed_connect_frees_its_slot_and_says_why(make_pool):
    host, port = unused_address()
    pool = make_pool(None, max_size=1, target=lambda: BackendTarget(host, port, "app", "appdb", "secret"))
    with pytest.raises(BackendUnavailable, match=f"cannot connect to {host}:{port}"):
        pool.borrow()
    assert (pool.size, pool.borrowed) == (0, 0) and pool.connect_failures_total == 1
    no_node = make_pool(None, target=lambda: None)
    with pytest.raises(BackendUnavailable, match="no writer node of cluster 'toy' is available"):
        no_node.borrow()
    assert no_node.size == 0


def test_a_refused_login_is_reported_as_a_credentials_problem(db, make_pool):
    db.deny = True
    pool = make_pool(db)
    with pytest.raises(BackendUnavailable, match="login refused by the toy database"):
        pool.borrow()
    assert pool.proxy.credential_failures == ["app"] and pool.proxy.backend_failures == []
    assert pool.size == 0


def test_drain_closes_idle_connections_and_cuts_those_serving_at_the_old_node(db, make_pool):
    pool = make_pool(db)
    serving, between, idle = pool.borrow(), pool.borrow(), pool.borrow()
    pool.release(idle)
    session = LinkedSession()
    serving.session = session          # linked to a client mid-transaction
    pool.drain(db.address, "the writer changed")
    assert pool.generation == 1
    assert idle.closed and serving.closed and not between.closed
    assert session.lost == ["the writer changed"]
    assert (pool.size, pool.borrowed, len(pool.idle)) == (1, 1, 0)
    pool.release(between)              # borrowed before the failover: not reused
    assert between.closed and pool.size == 0
    assert pool.proxy.backend_failures == [db.address]
    fresh = pool.borrow()
    assert fresh.generation == 1 and not fresh.closed
    pool.release(fresh)
    check_counts(pool)


def test_retire_follows_the_eligible_set(db, make_pool):
    registry = StubRegistry(eligible=[db.address])
    pool = make_pool(db, registry=registry, role="reader")
    assert pool.eligible is registry.eligible("toy", "reader")   # the registry's live set, not a copy
    idle, busy, pinned_conn, pinned_busy = pool.borrow(), pool.borrow(), pool.borrow(), pool.borrow()
    pool.release(idle)
    assert pool.serves(busy)
    pinned = LinkedSession(pinned=True, clean=True)           # pinned, between transactions
    pinned_conn.session = pinned
    working = LinkedSession(pinned=True, clean=False)         # pinned, inside a transaction
    pinned_busy.session = working
    pool.eligible.discard(db.address)
    assert not pool.serves(busy)
    pool.retire({db.address: "it lags 30 s"}, "the reader role")
    assert idle.closed and pool.retired_total == 1
    assert pinned_conn.closed and pinned.lost == [
        f"the node {db.address[0]}:{db.address[1]} no longer serves the reader role (it lags 30 s); "
        "your pinned session was closed, reconnect"]
    assert not busy.closed and not pinned_busy.closed and working.lost == []
    pool.release(busy)                 # at its transaction's end
    assert busy.closed and pool.retired_total == 2
    pool.eligible.add(db.address)      # back in the role
    again = pool.borrow()
    assert again.address == db.address and not again.closed
    pinned_busy.session = None
    pool.release(pinned_busy)
    pool.release(again)
    check_counts(pool)


def test_borrow_skips_idle_connections_that_left_the_role(db, make_pool):
    registry = StubRegistry(eligible=[db.address])
    pool = make_pool(db, registry=registry, role="reader")
    conn = pool.borrow()
    pool.release(conn)
    pool.eligible.clear()
    fresh = pool.borrow()              # the idle one is closed, a new one opened (target_for decides where)
    assert fresh is not conn and conn.closed and pool.size == 1
    pool.release(fresh)                # still not eligible: closed at release
    assert fresh.closed and pool.size == 0 and pool.retired_total == 1
    check_counts(pool)


def test_discard_borrowed_closes_the_connection(db, make_pool):
    pool = make_pool(db)
    conn = pool.borrow()
    ask(conn, "BEGIN")
    pool.discard_borrowed(conn)        # the client left mid-transaction: the database rolls back
    assert conn.closed and (pool.size, pool.borrowed) == (0, 0)
    wait_until(lambda: db.closed == [1], what="the database to see the connection close")
    check_counts(pool)


def test_a_dead_idle_connection_is_forgotten(db, make_pool):
    pool = make_pool(db)
    conn = pool.borrow()
    pool.release(conn)
    db.drop(1)                         # the database goes away
    wait_until(lambda: conn.closed, what="the reader to notice")
    assert (pool.size, len(pool.idle)) == (0, 0) and pool.proxy.backend_failures == [db.address]
    check_counts(pool)


def test_a_dead_borrowed_connection_tells_its_session_and_frees_a_slot(db, make_pool):
    pool = make_pool(db, max_size=1, borrow_timeout=2)
    conn = pool.borrow()
    session = LinkedSession()
    conn.session = session
    waiter = gevent.spawn(pool.borrow)
    wait_until(lambda: pool.waiters, what="a waiter")
    conn.sendall(b"DIE\n")
    fresh = waiter.get(timeout=2)      # the freed slot goes to the waiter
    assert session.lost == ["the backend closed the connection"]
    assert fresh is not conn and (pool.size, pool.borrowed) == (1, 1)
    pool.release(conn)                 # a stray release of the dead one changes nothing: it left in_use when it died
    assert (pool.size, pool.borrowed) == (1, 1)
    pool.release(fresh)
    check_counts(pool)


def test_close_all_closes_idle_connections_and_turns_waiters_away(db, make_pool):
    pool = make_pool(db, max_size=1, borrow_timeout=2)
    conn = pool.borrow()
    def borrow():
        try:
            return pool.borrow()
        except BackendUnavailable as exc:
            return exc
    waiter = gevent.spawn(borrow)
    wait_until(lambda: pool.waiters, what="a waiter")
    pool.close_all()
    refusal = waiter.get(timeout=2)
    assert isinstance(refusal, BackendUnavailable) and str(refusal) == "multiproxy is shutting down"
    pool.release(conn)                 # released while draining: closed
    assert conn.closed and pool.size == 0
    check_counts(pool)


# ---------------------------------------------------------------------------------------------- shared budget

@pytest.fixture
def make_variants(pools):
    """Pools of one (cluster, role, user, database) that differ in backend variant: one Budget for all."""
    def make(db, count=2, shares_facts=False, **settings):
        cluster = make_cluster(**settings)
        proxy = StubProxy(cluster)
        engine = ToyEngine(shares_facts=shares_facts)
        made, budget = [], None
        for n in range(count):
            pool = Pool(proxy, cluster, "writer", "app", "appdb", engine, db.target, (("v", n),), budget)
            budget = pool.budget
            proxy.pools[("writer", "app", "appdb", (("v", n),))] = pool
            pools.append(pool)
            made.append(pool)
        return made
    return make


def test_variants_share_one_max_size_and_are_named_apart(db, make_variants):
    a, b = make_variants(db, max_size=2, borrow_timeout=0.1)
    assert a.budget is b.budget and (a.label, b.label) == ("toy/writer/app/appdb[v=0]", "toy/writer/app/appdb[v=1]")
    held = [a.borrow(), a.borrow()]
    with pytest.raises(PoolTimeout, match=r"all 2 connections of toy/writer/app/appdb \(shared by its 2 client "
                                          r"variants\) are busy"):
        b.borrow()
    assert (a.size, b.size, a.budget.size) == (2, 0, 2) and b.borrow_timeouts_total == 1
    for conn in held:
        a.release(conn)
    check_counts(a)


def test_a_variant_makes_room_by_closing_an_idle_connection_of_another(db, make_variants):
    a, b = make_variants(db, max_size=2)
    first, second = a.borrow(), a.borrow()
    a.release(first)
    started = time.monotonic()
    conn = b.borrow()                   # the budget is used up, but a's idle connection can go: b waits for its close
    assert time.monotonic() - started < 0.5
    assert ask(conn, "SELECT") == "OK db1#3 SELECT"
    assert (a.size, b.size, a.budget.size) == (1, 1, 2) and a.budget_evictions_total == 1
    assert db.closed == [1]             # the database had let go of it before the new one logged in
    check_counts(a)
    check_counts(b)
    a.release(second)
    b.release(conn)


def test_a_released_connection_makes_room_for_a_waiting_variant(db, make_variants):
    a, b = make_variants(db, max_size=2, borrow_timeout=2.0)
    held = [a.borrow(), a.borrow()]
    waiter = gevent.spawn(b.borrow)
    wait_until(lambda: b.waiters, what="b to wait")
    a.release(held[0])                  # no waiter of its own: closed, its slot handed to b's waiter
    conn = waiter.get(timeout=2)
    assert db.closed == [1]             # closed on the database's side first
    assert conn.pool is b and ask(conn, "SELECT") == "OK db1#3 SELECT"
    assert (a.size, b.size, a.budget.size) == (1, 1, 2) and a.budget_evictions_total == 1
    assert b.waited_borrows_total == 1 and b.borrow_timeouts_total == 0
    a.release(held[1])
    b.release(conn)
    check_counts(a)
    check_counts(b)


def test_min_size_and_idle_expiry_count_the_whole_budget(db, make_variants):
    a, b = make_variants(db, max_size=4, min_size=2, idle_timeout=0.01)
    a.fill()
    b.fill()
    assert (a.size, b.size) == (2, 0) and db.opened == [1, 2]
    conn = b.borrow()
    b.release(conn)
    gevent.sleep(0.05)
    a.expire(time.monotonic())
    assert a.budget.size == 2 and (a.size, b.size) == (1, 1)


# ---------------------------------------------------------------------------------------------- logins never wait

def test_a_login_is_greeted_from_its_pool_without_a_borrow(db, make_pool):
    pool = make_pool(db, max_size=1, borrow_timeout=5.0)
    pool.welcome_facts()
    held = pool.borrow()                # every connection busy
    started = time.monotonic()
    assert pool.welcome_facts() == {"node": "db1"}
    assert time.monotonic() - started < 0.1 and pool.waited_borrows_total == 0 and pool.borrows_total == 1
    pool.release(held)


def test_a_new_variant_is_greeted_from_another_variants_facts_when_the_engine_allows(db, make_variants):
    a, b = make_variants(db, max_size=1, borrow_timeout=5.0, shares_facts=True)
    held = a.borrow()
    started = time.monotonic()
    assert b.welcome_facts() == {"node": "db1", "from": "app/appdb"}
    assert time.monotonic() - started < 0.1
    assert (b.connects_total, b.waited_borrows_total, b.facts) == (0, 0, None)
    a.release(held)


def test_a_new_pool_with_a_free_slot_logs_in_itself_even_when_the_engine_shares_facts(db, pools):
    cluster = make_cluster(max_size=1, borrow_timeout=5.0)
    proxy = StubProxy(cluster)
    engine = ToyEngine(shares_facts=True)
    for user in ("app", "reporting"):
        proxy.pools[user] = Pool(proxy, cluster, "writer", user, "appdb", engine, lambda u=user: db.target(u))
        pools.append(proxy.pools[user])
    held = proxy.pools["app"].borrow()
    # its own login, so that the server's refusal of this user or database would come at the client's login
    assert proxy.pools["reporting"].welcome_facts() == {"node": "db1"}
    assert proxy.pools["reporting"].connects_total == 1 and db.opened == [1, 2]
    proxy.pools["app"].release(held)


def test_without_shared_facts_a_new_variant_logs_in_in_room_made_from_an_idle_one(db, make_variants):
    a, b = make_variants(db, max_size=1, borrow_timeout=5.0)
    a.release(a.borrow())
    assert b.welcome_facts() == {"node": "db1"}
    assert (a.size, b.size, b.connects_total, a.budget_evictions_total) == (0, 1, 1, 1)


def test_a_login_waits_only_for_a_login_already_under_way(db, make_pool):
    db.login_delay = 0.3
    pool = make_pool(db, max_size=1, borrow_timeout=5.0)
    opener = gevent.spawn(pool.borrow)
    wait_until(lambda: pool.opening, what="the connect to start")
    started = time.monotonic()
    assert pool.welcome_facts() == {"node": "db1"}     # the facts of that login, not a borrow of its connection
    assert time.monotonic() - started < 0.6
    assert pool.connects_total == 1 and pool.waited_borrows_total == 0
    pool.release(opener.get(timeout=2))


def test_a_refusal_by_the_server_carries_its_code_and_text(db, make_pool):
    db.databases = {"appdb"}
    pool = make_pool(db, target=lambda: db.target(database="nodb"))
    with pytest.raises(BackendUnavailable) as caught:
        pool.welcome_facts()
    assert caught.value.refusal.code == "NODB" and caught.value.refusal.server_message == "no database 'nodb' here"
    assert pool.size == 0 and pool.connect_failures_total == 1


def test_a_slot_made_for_another_variant_stays_taken_until_the_database_closed_its_end(db, make_variants):
    a, b = make_variants(db, max_size=1, borrow_timeout=2.0)
    idle = a.borrow()
    a.release(idle)
    a._evict(idle)                      # as make_room does: shutdown sent, the server has not answered yet
    assert (a.size, len(a.closing), a.budget.size) == (1, 1, 1) and a.budget.make_room(b) is False
    wait_until(lambda: not a.closing, what="the database to close its end")
    assert db.closed == [1] and a.budget.size == 0 and a.budget.make_room(b) is True
    check_counts(a)


def test_a_slot_handed_to_a_waiter_is_reserved_until_it_runs(db, make_pool):
    pool = make_pool(db, max_size=1, borrow_timeout=2.0)
    held = pool.borrow()
    waiter = gevent.spawn(pool.borrow)
    wait_until(lambda: pool.waiters, what="the waiter to queue")
    pool.discard_borrowed(held)         # frees the slot and hands it to the waiter, which has not run yet
    assert pool.size == 1 and len(pool.opening) == 1
    with pytest.raises(PoolTimeout):
        pool.borrow(timeout=0.05)       # a borrow in between does not take the waiter's slot
    conn = waiter.get(timeout=2)
    assert pool.size == 1 and pool.connects_total == 2 and db.opened == [1, 2]
    pool.release(conn)
    check_counts(pool)
