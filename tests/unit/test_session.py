"""Session driving a toy engine (tests/unit/toykit.py) between a socket pair and a toy database: no database."""
from __future__ import annotations

import gevent
import pytest

from multiproxy.session import Session

from .toykit import StubProxy, StubRegistry, ToyClient, ToyDatabase, check_counts, make_cluster, make_runtime, \
    socket_pair, wait_until

pytestmark = pytest.mark.timeout(10)


class Setup:
    """A stub proxy whose pools reach `self.current` (a toy database), and the sessions started on it."""

    def __init__(self, registry=None, role="writer", pool_mode="", **pool):
        self.db = self.current = ToyDatabase("db1")
        self.databases = [self.db]
        self.cluster = make_cluster(**pool)
        self.proxy = StubProxy(self.cluster, registry, target_for=lambda user, database: self.current.target(user, database))
        self.rt = make_runtime(self.cluster, role=role, pool_mode=pool_mode)
        self.greenlets = []
        self.clients = []

    def database(self, node: str, **kwargs) -> ToyDatabase:
        db = ToyDatabase(node, **kwargs)
        self.databases.append(db)
        return db

    def client(self, user="app", database="appdb"):
        mine, theirs = socket_pair()
        session = Session(self.proxy, self.rt, theirs, ("127.0.0.1", 40000 + len(self.clients)))
        self.greenlets.append(gevent.spawn(session.run))
        client = ToyClient(mine)
        self.clients.append(client)
        client.send(f"HELLO {user} {database}")
        assert client.line() == f"WELCOME {self.current.node}"
        return client, session

    @property
    def pool(self):
        (pool,) = self.proxy.pools.values()
        return pool

    def close(self):
        for client in self.clients:
            client.close()
        gevent.joinall(self.greenlets, timeout=2)
        for pool in self.proxy.pools.values():
            pool.close_all()
        for db in self.databases:
            db.stop()


@pytest.fixture
def setup(request):
    made = []

    def make(**kwargs):
        s = Setup(**kwargs)
        made.append(s)
        return s
    yield make
    for s in made:
        s.close()


def test_the_session_relays_and_releases_the_backend_at_each_transaction_end(setup):
    s = setup()
    client, session = s.client()
    assert session.user == "app" and session in s.proxy.sessions
    assert (s.pool.size, s.pool.borrowed) == (1, 0)     # the greeting's login, back in the pool
    assert client.ask("SELECT 1") == "OK db1#1 SELECT 1"
    wait_until(lambda: session.backend is None, what="the release")
    assert (s.pool.borrowed, len(s.pool.idle)) == (0, 1)
    assert client.ask("BEGIN") == "OK db1#1 BEGIN"
    assert session.backend is not None and s.pool.borrowed == 1      # held for the transaction
    client.send("INSERT", "UPDATE")                                 # pipelined in one chunk
    assert [client.line(), client.line()] == ["OK db1#1 INSERT", "OK db1#1 UPDATE"]
    assert session.backend is not None
    assert client.ask("COMMIT") == "OK db1#1 COMMIT"
    wait_until(lambda: session.backend is None, what="the release at COMMIT")
    assert s.pool.borrowed == 0 and session.proto.unlinks == 2 and session.proto.links == [{"node": "db1"}] * 2
    check_counts(s.pool)
    client.close()
    wait_until(lambda: session not in s.proxy.sessions, what="the session to end")
    assert (s.pool.size, len(s.pool.idle)) == (1, 1)


def test_clients_take_turns_on_one_backend(setup):
    s = setup(max_size=1)
    a, _ = s.client()
    b, _ = s.client()
    for _ in range(3):
        assert a.ask("SELECT a") == "OK db1#1 SELECT a"
        assert b.ask("SELECT b") == "OK db1#1 SELECT b"
    assert s.db.opened == [1] and s.pool.connects_total == 1


def test_a_pinned_session_keeps_its_backend_and_is_reset_when_it_leaves(setup):
    s = setup(max_size=2)
    a, session = s.client()
    b, _ = s.client()
    assert a.ask("PIN") == "OK db1#1 PIN"
    assert a.ask("SELECT") == "OK db1#1 SELECT"
    assert session.backend is not None and s.pool.borrowed == 1
    assert b.ask("SELECT") == "OK db1#2 SELECT"          # the pinned backend is not shared
    a.close()
    wait_until(lambda: (1, "RESET") in s.db.received, what="the reset")
    wait_until(lambda: s.pool.borrowed == 0, what="the reset backend to go back")
    assert (s.pool.size, len(s.pool.idle)) == (2, 2) and s.db.closed == []
    check_counts(s.pool)


def test_session_pool_mode_keeps_the_backend_between_transactions(setup):
    s = setup(pool_mode="session")
    client, session = s.client()
    assert client.ask("SELECT") == "OK db1#1 SELECT"
    assert session.backend is not None and s.pool.borrowed == 1
    client.close()
    wait_until(lambda: s.pool.borrowed == 0, what="the reset backend to go back")
    assert (1, "RESET") in s.db.received


def test_a_client_that_leaves_mid_transaction_has_its_backend_closed(setup):
    s = setup()
    client, session = s.client()
    assert client.ask("BEGIN") == "OK db1#1 BEGIN"
    client.close()
    wait_until(lambda: s.db.closed == [1], what="the database to see the connection close (it rolls back)")
    assert (s.pool.size, s.pool.borrowed) == (0, 0) and session not in s.proxy.sessions
    check_counts(s.pool)


def test_a_lost_backend_is_reported_and_the_next_request_gets_another(setup):
    s = setup()
    client, session = s.client()
    assert client.ask("DIE") == "ERROR backend_lost the database connection was lost (the backend closed the connection)"
    assert session.backend is None and s.pool.size == 0 and s.proxy.backend_failures == [s.db.address]
    assert client.ask("SELECT") == "OK db1#2 SELECT"
    check_counts(s.pool)


def test_no_backend_free_within_the_borrow_timeout(setup):
    s = setup(max_size=1, borrow_timeout=0.2)
    a, _ = s.client()
    b, _ = s.client()
    assert a.ask("BEGIN") == "OK db1#1 BEGIN"
    b.send("SELECT", "SELECT")
    expected = ("ERROR pool_timeout no database connection became free within 0.2 s: all 1 connections of pool "
                "toy/writer/app/appdb are busy; retry, or raise clusters.toy.pool.max_size or borrow_timeout")
    assert [b.line(), b.line()] == [expected, expected]      # every request of the chunk is answered
    assert s.proxy.metrics.borrow_failures == 1
    assert a.ask("COMMIT") == "OK db1#1 COMMIT"
    assert b.ask("SELECT") == "OK db1#1 SELECT"


def test_quit_ends_the_session(setup):
    s = setup()
    client, session = s.client()
    client.send("QUIT")
    assert client.closed_by_proxy()
    wait_until(lambda: session not in s.proxy.sessions, what="the session to end")


def test_a_read_only_refusal_from_a_node_still_writer_reaches_the_client_unchanged(setup):
    registry = StubRegistry(still_writer=True)
    s = setup(registry=registry)
    registry.initial.add(s.db.address)
    s.db.read_only = True                  # e.g. a read-only transaction setting on the server
    client, session = s.client()
    assert client.ask("WRITE") == "READONLY db1"
    assert registry.verified == [("toy", s.db.address)]
    wait_until(lambda: s.pool.borrowed == 0, what="the release")
    assert s.pool.size == 1 and s.db.closed == [] and s.proxy.metrics.read_only_retries == 0
    assert client.ask("SELECT") == "OK db1#1 SELECT"
    check_counts(s.pool)


def test_a_read_only_refusal_from_a_demoted_writer_is_retried_on_the_new_writer(setup):
    registry = StubRegistry(still_writer=False)
    s = setup(registry=registry)
    new_writer = s.database("db2")
    registry.initial.update([s.db.address, new_writer.address])
    client, session = s.client()
    assert client.ask("SELECT") == "OK db1#1 SELECT"
    s.db.read_only = True                  # the writer was demoted; DNS and probes now say db2
    s.current = new_writer
    assert client.ask("WRITE") == "OK db2#1 WRITE"
    assert registry.verified == [("toy", s.db.address)]
    assert s.proxy.metrics.read_only_retries == 1
    wait_until(lambda: s.db.closed == [1], what="the refusing connection to close")
    assert new_writer.received == [(1, "WRITE")]
    check_counts(s.pool)


def test_a_reader_listener_never_holds_a_read_only_refusal(setup):
    registry = StubRegistry(still_writer=False)
    s = setup(registry=registry, role="reader")
    registry.initial.add(s.db.address)
    s.db.read_only = True
    client, session = s.client()
    assert client.ask("WRITE") == "READONLY db1"
    assert registry.verified == [] and s.proxy.metrics.read_only_retries == 0


# ---------------------------------------------------------------------------------------------- logins

def test_a_login_the_server_refuses_gets_its_error_and_is_closed(setup):
    s = setup()
    s.db.databases = {"appdb"}
    mine, theirs = socket_pair()
    s.greenlets.append(gevent.spawn(Session(s.proxy, s.rt, theirs, ("127.0.0.1", 40000)).run))
    client = ToyClient(mine)
    s.clients.append(client)
    client.send("HELLO app nodb")
    assert client.line() == "REFUSED NODB no database 'nodb' here"
    assert client.closed_by_proxy()


def test_a_new_pool_with_a_free_slot_logs_in_itself_so_a_refusal_comes_at_the_login(setup):
    s = setup()
    s.rt.engine.shares_facts = True                     # other facts would do for a greeting; a free slot comes first
    s.db.databases = {"appdb"}
    s.client()
    mine, theirs = socket_pair()
    s.greenlets.append(gevent.spawn(Session(s.proxy, s.rt, theirs, ("127.0.0.1", 40002)).run))
    client = ToyClient(mine)
    s.clients.append(client)
    client.send("HELLO app nodb")
    assert client.line() == "REFUSED NODB no database 'nodb' here"
    assert client.closed_by_proxy() and client.buf == b""


def test_a_request_pipelined_behind_the_login_waits_for_a_backend_not_the_login(setup):
    s = setup(max_size=1, borrow_timeout=5.0)
    a, _ = s.client()
    assert a.ask("BEGIN") == "OK db1#1 BEGIN"        # the only backend is busy
    mine, theirs = socket_pair()
    s.greenlets.append(gevent.spawn(Session(s.proxy, s.rt, theirs, ("127.0.0.1", 40001)).run))
    b = ToyClient(mine)
    s.clients.append(b)
    b.send("HELLO app appdb", "SELECT")
    assert b.line(timeout=0.3) == "WELCOME db1"
    gevent.sleep(0.2)
    assert b.buf == b"" and s.pool.waiters
    assert a.ask("COMMIT") == "OK db1#1 COMMIT"
    assert b.line() == "OK db1#1 SELECT"
    assert s.pool.borrow_timeouts_total == 0
