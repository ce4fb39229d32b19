"""Parked sessions (multiproxy.parking, Session.park) and the memory trims behind them, over real sockets with the toy
engine and toy database of tests/unit/toykit.py: no database."""
from __future__ import annotations

from collections import deque

import gevent
import pytest

from multiproxy import session as session_module
from multiproxy.engine import LazyContainers, restore_attributes
from multiproxy.parking import IdleParking
from multiproxy.proxy import Proxy
from multiproxy.session import Session

from .toykit import StubProxy, ToyClient, ToyDatabase, make_cluster, make_runtime, socket_pair, wait_until

pytestmark = pytest.mark.timeout(10)


class ParkingProxy(StubProxy):
    """The stub proxy with the real Proxy's parking and bookkeeping: serve_session, resume_parked, client_came and
    client_left."""

    serve_session = Proxy.serve_session
    client_came = Proxy.client_came
    client_left = Proxy.client_left
    resume_parked = Proxy.resume_parked
    _serve_resumed = Proxy._serve_resumed

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.connections_by_address: dict = {}
        self.balance = None             # a lone process: no group to balance accepts with
        self.ended: list = []

    def session_ended(self, session) -> None:
        super().session_ended(session)
        self.ended.append(session)


class Setup:
    def __init__(self):
        self.db = ToyDatabase("db1")
        self.cluster = make_cluster()
        self.proxy = ParkingProxy(self.cluster, target_for=lambda user, database: self.db.target(user, database))
        self.rt = make_runtime(self.cluster)
        self.rt.acceptor = None         # resumed sessions get a greenlet of their own (no listener here)
        self.rt.connections = 0
        self.parking = IdleParking(self.proxy)
        self.greenlets = []
        self.clients = []

    def client(self):
        mine, theirs = socket_pair()
        address = ("127.0.0.1", 41000 + len(self.clients))
        session = Session(self.proxy, self.rt, theirs, address)
        greenlet = gevent.spawn(self.proxy.serve_session, self.rt, session, address[0], session.run)
        self.greenlets.append(greenlet)
        client = ToyClient(mine)
        self.clients.append(client)
        client.send("HELLO app appdb")
        assert client.line() == "WELCOME db1"
        return client, session, greenlet

    def close(self):
        for client in self.clients:
            client.close()
        gevent.joinall(self.greenlets, timeout=2)
        for pool in self.proxy.pools.values():
            pool.close_all()
        self.db.stop()


@pytest.fixture
def setup():
    s = Setup()
    yield s
    s.close()


def parked(session) -> bool:
    return session.sock.parked


def test_the_sweep_parks_a_client_idle_since_its_previous_look_and_its_next_request_is_served(setup):
    client, session, greenlet = setup.client()
    assert client.ask("SELECT 1") == "OK db1#1 SELECT 1"
    wait_until(lambda: session.backend is None, what="the release")
    assert setup.parking.sweep() == 0           # the first look notes the request count
    assert setup.parking.sweep() == 1           # nothing since: parked
    wait_until(lambda: greenlet.dead, what="the session's greenlet to let go")
    assert greenlet.value is True               # serve_session says parked: nothing closed or counted out
    assert parked(session) and session in setup.proxy.sessions and setup.rt.connections == 1
    assert setup.proxy.connections_by_address == {"127.0.0.1": 1}
    assert client.ask("SELECT 2") == "OK db1#1 SELECT 2"     # resumed in a greenlet of its own
    assert not parked(session)
    assert client.ask("BEGIN") == "OK db1#1 BEGIN"
    assert setup.parking.sweep() == 0 and setup.parking.sweep() == 0    # a backend linked: never parked
    assert client.ask("COMMIT") == "OK db1#1 COMMIT"
    assert setup.proxy.ended == []


def test_a_busy_client_is_not_parked(setup):
    client, session, greenlet = setup.client()
    setup.parking.sweep()
    assert client.ask("SELECT 1") == "OK db1#1 SELECT 1"
    wait_until(lambda: session.backend is None, what="the release")
    assert setup.parking.sweep() == 0           # a request since the previous look
    assert not parked(session) and not greenlet.dead


def test_with_many_sessions_a_client_parks_as_soon_as_it_would_be_waited_for(setup, monkeypatch):
    monkeypatch.setattr(session_module, "EAGER_PARKING_SESSIONS", 1)
    client, session, greenlet = setup.client()
    wait_until(lambda: greenlet.dead, what="the park right after the login")
    assert greenlet.value is True and parked(session)
    for n in range(3):
        assert client.ask(f"SELECT {n}") == f"OK db1#1 SELECT {n}"
    client.send("BEGIN", "INSERT")          # a transaction across reads, each served by a greenlet resumed for it
    assert [client.line(), client.line()] == ["OK db1#1 BEGIN", "OK db1#1 INSERT"]
    assert client.ask("COMMIT") == "OK db1#1 COMMIT"
    # Its greenlet waited for the next request while the backend answered: parked at the transaction's end.
    wait_until(lambda: parked(session), what="the park at the transaction's end")
    assert client.ask("SELECT 4") == "OK db1#1 SELECT 4"


def test_a_parked_client_that_leaves_is_counted_out_and_its_session_finished(setup):
    client, session, greenlet = setup.client()
    setup.parking.sweep()
    setup.parking.sweep()
    wait_until(lambda: greenlet.dead, what="the park")
    client.close()
    wait_until(lambda: session not in setup.proxy.sessions, what="the session to end")
    assert setup.proxy.ended == [session] and setup.rt.connections == 0
    assert setup.proxy.connections_by_address == {}
    assert session.sock.closed and not parked(session)


def test_a_parked_session_whose_socket_the_proxy_closes_ends(setup):
    client, session, greenlet = setup.client()
    setup.parking.sweep()
    setup.parking.sweep()
    wait_until(lambda: greenlet.dead, what="the park")
    session.sock.close()                    # what a graceful stop or a removed listener does
    wait_until(lambda: session not in setup.proxy.sessions, what="the session to end")
    assert setup.proxy.ended == [session] and setup.rt.connections == 0
    assert client.closed_by_proxy()


def test_a_parked_client_closed_for_idling_reads_why_and_its_session_ends(setup):
    client, session, greenlet = setup.client()
    setup.parking.sweep()
    setup.parking.sweep()
    wait_until(lambda: greenlet.dead, what="the park")
    session._close_idle(b"IDLE TIMEOUT\n")  # idle_client_timeout's way out: tell, then shut the connection down
    assert client.line() == "IDLE TIMEOUT"
    assert client.closed_by_proxy()
    wait_until(lambda: session not in setup.proxy.sessions, what="the session to end")
    assert setup.proxy.ended == [session]


class Lazy(LazyContainers):
    lazy_containers = {"fifo": deque, "names": dict}
    flag = False
    count = 0

    def __init__(self):
        self.fifo = deque()
        self.names = {}
        self.user = "app"
        self.flag = False


def test_compaction_drops_empty_containers_and_defaults_and_the_first_miss_makes_the_containers_again():
    client = Lazy()
    client.names["a"] = 1
    client.count = 3
    client.compact_attributes()
    assert vars(client) == {"user": "app", "names": {"a": 1}, "count": 3}     # empty fifo and default flag gone
    assert isinstance(client, Lazy) and type(client) is not Lazy             # the compacted subclass reads misses
    assert client.flag is False and client.user == "app"                    # read as before
    assert len(client.fifo) == 0 and type(client) is Lazy                    # made again: back to its own class
    client.fifo.append(1)
    assert client.fifo == deque([1])
    with pytest.raises(AttributeError):
        client.missing
    client.compact_attributes()
    with pytest.raises(AttributeError):
        client.missing                  # a miss that is no container still misses, the object back to its class
    assert type(client) is Lazy and len(client.fifo) == 1


def test_a_resumed_client_drops_what_the_exporting_process_compacted_away():
    fresh = Lazy()
    fresh.flag = True                       # as if __init__ had set another value than the class's
    restore_attributes(fresh, {"user": "bob", "count": 2})
    assert vars(fresh) == {"fifo": deque(), "names": {}, "user": "bob", "count": 2}
    assert fresh.flag is False
