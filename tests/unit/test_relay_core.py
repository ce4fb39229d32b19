"""The relay core's framing walker and relay, the compiled one and its pure-Python twin, on the same vectors."""
from __future__ import annotations

import base64
import os
import socket
import struct
import time

import pytest
from hypothesis import HealthCheck, example, given, settings, strategies as st

from multiproxy import relay_core as rc
from multiproxy.relay_logins import greeted_parts

try:
    from multiproxy import _relay
except ImportError as exc:  # the extension is optional: setup.py builds it when a compiler is there
    _relay = None
    NOT_BUILT = f"multiproxy._relay is not built ({exc}); python3 setup.py build_ext --inplace"

IMPLS = [
    pytest.param((_relay.Walker, _relay.Relay) if _relay else None, id="c",
                 marks=pytest.mark.skipif(_relay is None, reason=NOT_BUILT if _relay is None else "")),
    pytest.param((rc.PyWalker, rc.PyRelay), id="python"),
]

PG = rc.FRAMINGS["postgres"]


def pg(kind: bytes, body: bytes = b"") -> bytes:
    return kind + struct.pack("!I", len(body) + 4) + body


QUERY = pg(b"Q", b"select 1\0")
RESULT = pg(b"T", b"\0\1a\0" + bytes(18)) + pg(b"D", b"\0\1\0\0\0\1" + b"1") + pg(b"C", b"SELECT 1\0")
READY_IDLE = pg(b"Z", b"I")
READY_IN_TX = pg(b"Z", b"T")
TERMINATE = pg(b"X")


def walkers(impl, **server):
    walker, _ = impl
    return rc.postgres_walkers(walker_type=walker, **server)


def drive(walker, chunks):
    """Feed chunks the way the relay does (an incomplete header waits for the next chunk); returns the
    forwarded bytes, the events with how much had been forwarded at each, and what was handed over."""
    forwarded, events, held = bytearray(), [], b""
    for chunk in chunks:
        held += chunk
        while True:
            consumed, event, arg = walker.feed(held)
            forwarded += held[:consumed]
            held = held[consumed:]
            if event == rc.NONE:
                break
            events.append((event, arg, len(forwarded)))
            if event in (rc.HANDOVER, rc.MALFORMED):
                return bytes(forwarded), events, held + b"".join(chunks[chunks.index(chunk) + 1:])
    return bytes(forwarded), events, held


@pytest.mark.timeout(10)
@pytest.mark.parametrize("impl", IMPLS)
def test_whole_frames_pass_and_requests_are_counted(impl):
    client, server = walkers(impl)
    assert client.feed(QUERY + QUERY) == (2 * len(QUERY), rc.NONE, -1)
    assert client.take_count() == 2 and client.take_count() == 0
    assert server.feed(RESULT + READY_IDLE) == (len(RESULT) + len(READY_IDLE), rc.BOUNDARY, ord("I"))
    assert server.feed(READY_IN_TX) == (len(READY_IN_TX), rc.BOUNDARY, ord("T"))


@pytest.mark.timeout(10)
@pytest.mark.parametrize("impl", IMPLS)
def test_frames_split_anywhere_give_the_same_bytes_and_events(impl):
    stream = RESULT + READY_IN_TX + RESULT + READY_IDLE
    whole = drive(walkers(impl)[1], [stream])
    assert whole == (stream, [(rc.BOUNDARY, ord("T"), len(RESULT) + 6), (rc.BOUNDARY, ord("I"), len(stream))], b"")
    for cut in range(1, len(stream)):
        assert drive(walkers(impl)[1], [stream[:cut], stream[cut:]]) == whole, cut
    assert drive(walkers(impl)[1], [bytes([b]) for b in stream]) == whole


@pytest.mark.timeout(10)
@pytest.mark.parametrize("impl", IMPLS)
def test_an_incomplete_header_is_not_consumed(impl):
    client, server = walkers(impl)
    assert client.feed(QUERY[:4]) == (0, rc.NONE, -1)
    assert client.feed(QUERY[:5]) == (5, rc.NONE, -1)          # the header is enough to stream the body
    assert client.remaining == len(QUERY) - 5
    assert server.feed(READY_IDLE[:5]) == (0, rc.NONE, -1)     # a boundary waits for its status byte
    assert server.feed(RESULT + READY_IDLE[:3]) == (len(RESULT), rc.NONE, -1)


@pytest.mark.timeout(10)
@pytest.mark.parametrize("impl", IMPLS)
def test_a_huge_frame_streams_through_without_being_held(impl):
    _, server = walkers(impl)
    size = 1 << 30                                               # a 1 GiB DataRow, announced in its header
    assert server.feed(b"D" + struct.pack("!I", size)) == (5, rc.NONE, -1)
    assert server.remaining == size - 4
    chunk = bytes(65536)
    assert server.feed(chunk) == (65536, rc.NONE, -1)
    assert server.remaining == size - 4 - 65536
    tail = server.remaining
    rest = bytes(100) + READY_IDLE                               # the frame's end and the next frame in one read
    assert server.feed(bytes(tail - 100)) == (tail - 100, rc.NONE, -1)
    assert server.feed(rest) == (len(rest), rc.BOUNDARY, ord("I"))


@pytest.mark.timeout(10)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("length", [0, 1, 3])
def test_a_length_below_the_header_is_an_error_event_not_a_crash(impl, length):
    client, server = walkers(impl)
    bad = b"Q" + struct.pack("!I", length) + b"junk"
    assert client.feed(QUERY + bad) == (len(QUERY), rc.MALFORMED, ord("Q"))
    assert server.feed(pg(b"Z", b"I" * 5000)) == (0, rc.MALFORMED, ord("Z"))   # bigger than a boundary may be
    assert walkers(impl)[1].feed(pg(b"Z")) == (0, rc.MALFORMED, ord("Z"))       # no status byte


@pytest.mark.timeout(10)
@pytest.mark.parametrize("impl", IMPLS)
def test_stop_types_are_handed_over_before_they_are_forwarded(impl):
    client, server = walkers(impl, server_stop=b"ES")
    assert client.feed(QUERY + TERMINATE) == (len(QUERY), rc.HANDOVER, ord("X"))
    error = pg(b"E", b"SERROR\0\0")
    assert server.feed(RESULT + error + READY_IDLE) == (len(RESULT), rc.HANDOVER, ord("E"))
    assert walkers(impl, server_stop=b"ES")[1].feed(pg(b"S", b"a\0b\0")) == (0, rc.HANDOVER, ord("S"))


@pytest.mark.timeout(10)
@pytest.mark.parametrize("impl", IMPLS)
def test_mysql_and_tds_headers(impl):
    walker, _ = impl
    mysql = walker(**rc.FRAMINGS["mysql"], stop=b"\x01")         # COM_QUIT
    query = struct.pack("<I", 9)[:3] + b"\0" + b"\x03select 1"
    assert mysql.feed(query + query[:3]) == (len(query), rc.NONE, -1)
    assert mysql.feed(b"\x01\0\0\0\x01") == (0, rc.HANDOVER, 1)
    assert mysql.feed(b"\0\0\0\x01") == (4, rc.NONE, -1)          # an empty packet has no command byte
    tds = walker(**rc.FRAMINGS["tds"])
    packet = b"\x01\x01" + struct.pack("!H", 12) + b"\0\0\1\0" + b"abcd"
    assert tds.feed(packet + packet[:7]) == (12, rc.NONE, -1)
    assert tds.feed(b"\x01\x01\0\x07\0\0\1\0") == (0, rc.MALFORMED, 1)


frames = st.one_of(
    st.builds(pg, st.sampled_from([b"T", b"D", b"C", b"N", b"Z", b"E", b"S", b"Q"]), st.binary(max_size=40)),
    st.just(READY_IDLE), st.just(READY_IN_TX),
    st.binary(min_size=1, max_size=12),                           # garbage: bad lengths, huge lengths
)


@pytest.mark.timeout(120)
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(frames, max_size=12), st.lists(st.integers(min_value=1, max_value=64), max_size=20),
       st.sampled_from([b"", b"E", b"ES"]))
def test_c_and_python_walkers_agree(parts, cuts, stop):
    if _relay is None:
        pytest.skip(NOT_BUILT)
    stream = b"".join(parts)
    chunks, pos = [], 0
    for size in cuts:
        chunks.append(stream[pos:pos + size])
        pos += size
    chunks.append(stream[pos:])
    results = []
    for walker in (_relay.Walker, rc.PyWalker):
        client, server = rc.postgres_walkers(server_stop=stop, walker_type=walker)
        results.append((drive(server, chunks), drive(client, chunks), client.take_count(), server.remaining,
                        client.remaining))
    assert results[0] == results[1]


# -- the relay, on socket pairs (real sockets: one end in the relay, the other played by the test)

class Pair:
    """A socket pair whose `inside` end is given to the relay and whose `outside` end the test plays."""

    def __init__(self):
        self.inside, self.outside = socket.socketpair()
        self.inside.setblocking(False)
        self.outside.settimeout(5)

    def fd(self):
        return self.inside.fileno()

    def read(self, size: int) -> bytes:
        data = b""
        while len(data) < size:
            more = self.outside.recv(size - len(data))
            assert more, "closed"
            data += more
        return data

    def close(self):
        self.inside.close()
        self.outside.close()


@pytest.fixture
def pairs():
    made = []

    def make():
        made.append(Pair())
        return made[-1]

    yield make
    for pair in made:
        pair.close()


def serve(relay, rounds=20) -> list:
    events = []
    for _ in range(rounds):
        events += relay.run_ready()
    return events


@pytest.mark.timeout(20)
@pytest.mark.parametrize("impl", IMPLS)
def test_a_transaction_borrows_a_backend_and_gives_it_back(impl, pairs):
    relay = impl[1](*walkers(impl))
    client, backend = pairs(), pairs()
    assert relay.add_backend(backend.fd()) == []
    assert relay.add_client(client.fd()) == []
    assert relay.stats()["idle"] == 1
    client.outside.sendall(QUERY)
    assert serve(relay) == []
    assert backend.read(len(QUERY)) == QUERY
    assert relay.stats()["linked"] == 1 and relay.stats()["idle"] == 0
    backend.outside.sendall(RESULT + READY_IDLE)
    assert serve(relay) == []
    assert client.read(len(RESULT + READY_IDLE)) == RESULT + READY_IDLE
    stats = relay.stats()
    assert (stats["linked"], stats["idle"], stats["transactions"]) == (0, 1, 1)
    client.outside.sendall(TERMINATE)
    assert serve(relay) == [(rc.HANDOVER, client.fd(), -1, TERMINATE, ord("X"))]
    assert relay.stats()["connections"] == 1
    relay.close()


@pytest.mark.timeout(20)
@pytest.mark.parametrize("impl", IMPLS)
def test_activity_counts_a_clients_requests_and_names_its_backend(impl, pairs):
    relay = impl[1](*walkers(impl))
    first, second, backend = pairs(), pairs(), pairs()
    relay.add_backend(backend.fd())
    relay.add_client(first.fd())
    relay.add_client(second.fd())
    assert relay.activity(first.fd()) == (0, -1, 0, 0, 0)
    assert relay.activity(backend.fd()) is None and relay.activity(999) is None
    first.outside.sendall(QUERY + QUERY)            # two requests, pipelined
    serve(relay)
    second.outside.sendall(QUERY)
    serve(relay)
    assert relay.activity(first.fd()) == (2, backend.fd(), 0, 2, 0)
    assert relay.activity(second.fd())[:3] == (1, -1, 1)    # waits for the backend
    backend.read(2 * len(QUERY))
    backend.outside.sendall(READY_IDLE + READY_IN_TX)       # the second answer leaves a transaction open
    serve(relay)
    assert relay.activity(first.fd()) == (2, backend.fd(), 0, 0, 0)    # its backend held, nothing outstanding
    assert relay.activity(second.fd())[:3] == (1, -1, 1)
    first.outside.sendall(QUERY)
    serve(relay)
    backend.read(len(QUERY))
    backend.outside.sendall(READY_IDLE)
    serve(relay)
    assert relay.activity(first.fd()) == (3, -1, 0, 0, 0)
    assert relay.activity(second.fd()) == (1, backend.fd(), 0, 1, 0)
    relay.close()


@pytest.mark.timeout(20)
@pytest.mark.parametrize("impl", IMPLS)
def test_relayed_before_counts_the_requests_of_the_client_last_let_go_at_an_fd(impl, pairs):
    relay = impl[1](*walkers(impl, client_stop=b"P"))
    client, backend = pairs(), pairs()
    relay.add_backend(backend.fd())
    relay.add_client(client.fd())
    assert relay.relayed_before(client.fd()) == 0 and relay.relayed_before(-1) == 0
    for _ in range(2):                                      # two transactions relayed
        client.outside.sendall(QUERY)
        serve(relay)
        backend.read(len(QUERY))
        backend.outside.sendall(READY_IDLE)
        serve(relay)
    client.outside.sendall(pg(b"P", b"named\0select 1\0\0\0"))    # then a stop frame: let go
    events = serve_until(relay, lambda events: events)
    assert [kind for kind, *_ in events] == [rc.HANDOVER]
    assert relay.relayed_before(client.fd()) == 2
    relay.add_client(client.fd())                           # given again: a new stay
    client.outside.sendall(pg(b"P", b"named\0select 1\0\0\0"))
    serve_until(relay, lambda events: events)
    assert relay.relayed_before(client.fd()) == 0
    assert relay.relayed_before(backend.fd()) == 0          # (backends are not counted)
    relay.close()


@pytest.mark.timeout(20)
@pytest.mark.parametrize("impl", IMPLS)
def test_a_transaction_block_keeps_its_backend_until_idle(impl, pairs):
    relay = impl[1](*walkers(impl))
    first, second, backend = pairs(), pairs(), pairs()
    relay.add_backend(backend.fd())
    relay.add_client(first.fd())
    relay.add_client(second.fd(), QUERY)                          # bytes the caller read already
    assert backend.read(len(QUERY)) == QUERY
    first.outside.sendall(QUERY)
    serve(relay)
    assert relay.stats()["waiting"] == 1
    backend.outside.sendall(READY_IN_TX)                          # BEGIN: still the second client's
    serve(relay)
    assert second.read(6) == READY_IN_TX
    second.outside.sendall(QUERY)
    serve(relay)
    assert backend.read(len(QUERY)) == QUERY
    backend.outside.sendall(RESULT + READY_IDLE)                  # COMMIT: the waiting client gets the backend
    serve(relay)
    assert second.read(len(RESULT) + 6) == RESULT + READY_IDLE
    assert backend.read(len(QUERY)) == QUERY
    assert relay.stats()["waiting"] == 0 and relay.stats()["linked"] == 1
    relay.close()


@pytest.mark.timeout(20)
@pytest.mark.parametrize("impl", IMPLS)
def test_eof_and_out_of_turn_data_go_back_to_the_caller(impl, pairs):
    relay = impl[1](*walkers(impl))
    client, backend, spare = pairs(), pairs(), pairs()
    relay.add_backend(backend.fd())
    relay.add_backend(spare.fd())
    relay.add_client(client.fd())
    client.outside.sendall(QUERY)
    serve(relay)
    linked = backend if relay.stats()["idle"] == 1 and _readable(backend.outside) else spare
    idle = spare if linked is backend else backend
    assert linked.read(len(QUERY)) == QUERY
    linked.outside.close()                                        # the backend dies mid-transaction
    assert serve(relay) == [(rc.CLOSED, linked.fd(), client.fd(), b"", 0)]
    idle.outside.sendall(pg(b"N", b"notice\0"))                   # an idle backend speaks
    assert serve(relay) == [(rc.UNSOLICITED, idle.fd(), -1, pg(b"N", b"notice\0"), -1)]
    assert relay.stats()["connections"] == 0
    relay.close()


def _readable(sock) -> bool:
    sock.setblocking(False)
    try:
        return bool(sock.recv(65536, socket.MSG_PEEK))
    except BlockingIOError:
        return False
    finally:
        sock.settimeout(5)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("impl", IMPLS)
def test_a_slow_reader_blocks_its_writer_without_losing_bytes(impl, pairs):
    relay = impl[1](*walkers(impl))
    client, backend = pairs(), pairs()
    relay.add_backend(backend.fd())
    relay.add_client(client.fd())
    client.outside.sendall(QUERY)
    serve(relay)
    backend.read(len(QUERY))
    rows = b"".join(pg(b"D", os.urandom(200)) for _ in range(20000)) + READY_IDLE   # ~4 MB, more than buffers hold
    backend.outside.setblocking(False)
    sent, received = 0, bytearray()
    client.outside.setblocking(False)
    while len(received) < len(rows):
        if sent < len(rows):
            try:
                sent += backend.outside.send(rows[sent:sent + 65536])
            except BlockingIOError:
                pass
        assert serve(relay, 2) == []
        try:
            received += client.outside.recv(1 << 20)
        except BlockingIOError:
            pass
    assert bytes(received) == rows
    assert relay.stats()["transactions"] == 1 and relay.stats()["idle"] == 1
    relay.close()


SSL_REQUEST = struct.pack("!II", 8, 80877103)


def startup_packet(user: bytes) -> bytes:
    body = struct.pack("!I", 196608) + b"user\0" + user + b"\0database\0db\0\0"
    return struct.pack("!I", len(body) + 4) + body


def connect(listener) -> socket.socket:
    sock = socket.create_connection(listener.getsockname(), timeout=5)
    return sock


def recv_exactly(sock, size: int) -> bytes:
    data = b""
    while len(data) < size:
        more = sock.recv(size - len(data))
        assert more, "closed"
        data += more
    return data


@pytest.fixture
def listener():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    sock.setblocking(False)
    yield sock
    sock.close()


def serve_until(relay, done, limit=200) -> list:
    events = []
    for _ in range(limit):
        events += relay.run_ready()
        if done(events):
            return events
        select_wait(relay)
    raise AssertionError(f"not done; events so far: {events}, stats {relay.stats()}")


def select_wait(relay, timeout=0.05):
    import select
    select.select([relay.fileno()], [], [], timeout)


@pytest.mark.timeout(20)
@pytest.mark.parametrize("impl", IMPLS)
def test_the_relay_accepts_greets_from_its_cache_and_hangs_up(impl, listener, pairs):
    relay = impl[1](*walkers(impl))
    backend = pairs()
    relay.add_backend(backend.fd())
    assert relay.listen(listener.fileno(), refuse=SSL_REQUEST, refusal=b"N", hangup=b"X") == []
    first = connect(listener)
    first.sendall(SSL_REQUEST)
    serve_until(relay, lambda _: relay.stats()["accepted"] == 1)
    serve_until(relay, lambda _: _readable(first))
    assert recv_exactly(first, 1) == b"N"
    first.sendall(startup_packet(b"alice") + QUERY)               # not greeted before: the engine's
    events = serve_until(relay, lambda events: events)
    assert [(kind, peer, data, arg) for kind, _, peer, data, arg in events] == \
        [(rc.STARTUP, -1, startup_packet(b"alice") + QUERY, 0)]
    handed = socket.socket(fileno=events[0][1])                   # the caller owns it now
    greeting = pg(b"R", b"\0\0\0\0") + READY_IDLE
    relay.cache_greeting(startup_packet(b"alice"), greeting)
    second = connect(listener)
    second.sendall(startup_packet(b"alice") + QUERY)              # greeted in the relay, query relayed
    serve_until(relay, lambda _: _readable(backend.outside))
    assert recv_exactly(second, len(greeting)) == greeting
    assert backend.read(len(QUERY)) == QUERY
    backend.outside.sendall(RESULT + READY_IDLE)
    serve_until(relay, lambda _: relay.stats()["transactions"] == 1)
    assert recv_exactly(second, len(RESULT) + 6) == RESULT + READY_IDLE
    second.sendall(TERMINATE)                                     # closed by the relay, no event
    assert serve_until(relay, lambda _: relay.stats()["connections"] == 2) == []
    assert second.recv(10) == b""
    assert relay.stats()["greeted"] == 1 and relay.stats()["idle"] == 1
    third = connect(listener)
    third.sendall(struct.pack("!I", 3))                           # a startup length that cannot be
    events = serve_until(relay, lambda events: events)
    assert [(kind, data) for kind, _, _, data, _ in events] == [(rc.MALFORMED, struct.pack("!I", 3))]
    os.close(events[0][1])
    relay.close()
    for sock in (first, second, third, handed):
        sock.close()


@pytest.mark.timeout(30)
@pytest.mark.skipif(_relay is None, reason=NOT_BUILT if _relay is None else "")
def test_a_threaded_relay_moves_bytes_without_run_ready(pairs):
    relay = _relay.Relay(*rc.postgres_walkers(walker_type=_relay.Walker), threaded=True)
    client, backend = pairs(), pairs()
    relay.add_backend(backend.fd())
    relay.add_client(client.fd())
    for _ in range(50):                                           # 50 transactions, run_ready never called
        client.outside.sendall(QUERY)
        assert backend.read(len(QUERY)) == QUERY
        backend.outside.sendall(RESULT + READY_IDLE)
        assert client.read(len(RESULT) + 6) == RESULT + READY_IDLE
    client.outside.sendall(TERMINATE)
    select_wait(relay, 5)                                         # its eventfd says an event waits
    assert relay.run_ready() == [(rc.HANDOVER, client.fd(), -1, TERMINATE, ord("X"))]
    stats = relay.stats()
    assert (stats["transactions"], stats["idle"], stats["connections"]) == (50, 1, 1)
    relay.close()
    with pytest.raises(ValueError):
        relay.run_ready()


client_frames = st.one_of(st.just(QUERY), st.just(TERMINATE), st.just(pg(b"S")), st.just(pg(b"P", b"\0q\0\0\0")),
                          st.just(pg(b"Q", b"BEGIN\0")), st.just(pg(b"Q", b"select '" + b"z" * 70 + b"'\0")),
                          st.binary(min_size=1, max_size=8))
server_frames = st.one_of(st.just(RESULT), st.just(READY_IDLE), st.just(READY_IN_TX), st.just(pg(b"E", b"SERROR\0\0")),
                          st.binary(min_size=1, max_size=8))


def assert_cores_agree(steps, **scenario) -> None:
    """The compiled relay and its twin leave the same trace of the same steps (run_scenario's options)."""
    if _relay is None:
        pytest.skip(NOT_BUILT)
    assert (run_scenario((_relay.Walker, _relay.Relay), steps, **scenario)
            == run_scenario((rc.PyWalker, rc.PyRelay), steps, **scenario))


def run_scenario(impl, steps, screened=False, batches=False, mysql=None, begin=False, statements=None) -> list:
    """Play steps (side, bytes) into a relay with one client and two backends; record, in order, what reached
    each far end and the events (with fds named), until the relay has handed the client back. screened: the
    client's Query bodies are screened and its stops held until its transaction ends (hold_stops); batches: the
    same with batches of the unnamed statement relayed (pg_unnamed). mysql: the (client, server) Walker arguments
    of a MySQL relay (held stops). begin: batches and a lone BEGIN answered by the relay (pg_begin). statements:
    the client's named statements (set_statements), with begin."""
    if begin:
        relay = impl[1](*begin_walkers(impl), hold_stops=True)
    elif mysql is not None:
        relay = impl[1](impl[0](**mysql[0]), impl[0](**mysql[1]), hold_stops=True)
    elif batches:
        relay = impl[1](*batch_walkers(impl), hold_stops=True)
    elif screened:
        relay = impl[1](*screened_walkers(impl), hold_stops=True)
    else:
        relay = impl[1](*walkers(impl, server_stop=b"E"))
    client, first, second = Pair(), Pair(), Pair()
    names = {client.fd(): "client", first.fd(): "first", second.fd(): "second", -1: None}
    for pair in (client, first, second):
        pair.outside.setblocking(False)
    trace = []
    try:
        relay.add_backend(first.fd())
        relay.add_backend(second.fd())
        relay.add_client(client.fd())
        if statements is not None:
            relay.set_statements(client.fd(), statements)
        for side, data in steps:
            target = client if side == "client" else (first, second)[side == "second"]
            target.outside.sendall(data)
            for _ in range(3):
                for kind, fd, peer, rest, arg in relay.run_ready():
                    trace.append(("event", kind, names[fd], names[peer], rest, arg))
            for name, pair in (("client", client), ("first", first), ("second", second)):
                try:
                    got = pair.outside.recv(1 << 20)
                except BlockingIOError:
                    continue
                trace.append(("bytes", name, got))
            if any(step[0] == "event" and "client" in step[2:4] for step in trace):
                break
        if mysql is not None:
            trace.append(("insert_id", relay.insert_id(client.fd())))
        stats = relay.stats()
        trace.append(("stats", stats["linked"], stats["idle"], stats["waiting"], stats["transactions"]))
    finally:
        relay.close()
        for pair in (client, first, second):
            pair.close()
    return trace


@pytest.mark.timeout(120)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(st.tuples(st.just("client"), client_frames),
                          st.tuples(st.sampled_from(["first", "second"]), server_frames)), max_size=10))
def test_c_and_python_relays_agree(steps):
    if _relay is None:
        pytest.skip(NOT_BUILT)
    assert run_scenario((_relay.Walker, _relay.Relay), steps) == run_scenario((rc.PyWalker, rc.PyRelay), steps)


# -- the engine's body screen, held stops and giving sockets back between transactions

SCREEN_WORDS = (b"set", b"begin", b"listen")


def screened_walkers(impl, max_screen=64):
    walker, _ = impl
    rule = dict(PG)
    return (walker(**rule, stop=b"XP", count=b"QS", screen=b"Q", words=SCREEN_WORDS, max_screen=max_screen,
                   exempt_lead=(b"update", b"delete"), exempt=(b"set",)),
            walker(**rule, boundary=ord("Z")))


@pytest.mark.timeout(10)
@pytest.mark.parametrize("impl", IMPLS)
def test_a_screened_frame_holding_a_word_is_a_stop_whatever_its_case(impl):
    client, _ = screened_walkers(impl)
    plain = pg(b"Q", b"select 1\0")
    assert client.feed(plain + pg(b"Q", b"SeT x = 1\0")) == (len(plain), rc.HANDOVER, ord("Q"))
    assert client.take_count() == 1
    client, _ = screened_walkers(impl)
    assert client.feed(pg(b"Q", b"select 'LISTEN'\0")) == (0, rc.HANDOVER, ord("Q"))


@pytest.mark.timeout(10)
@pytest.mark.parametrize("impl", IMPLS)
def test_a_screened_frame_is_walked_only_whole_and_a_large_one_stops(impl):
    client, _ = screened_walkers(impl)
    query = pg(b"Q", b"select 42\0")
    for cut in range(1, len(query)):
        assert client.feed(query[:cut]) == (0, rc.NONE, -1)
    assert client.feed(query) == (len(query), rc.NONE, -1)
    big = pg(b"Q", b"select " + b"1" * 80 + b"\0")
    assert client.feed(big) == (0, rc.HANDOVER, ord("Q"))
    # a frame type that is not screened streams through whatever it holds
    assert client.feed(pg(b"S")) == (5, rc.NONE, -1)


EXEMPT_CASES = [  # (text, stops) with words set, set_config, listen, "set" exempt in one UPDATE statement
    (b"UPDATE t SET x = 1 WHERE id = 2", False), (b"  update t\n\tset x = 1;", False),
    (b"UPDATE t SET x = 1;;  ", False),
    (b"UPDATE t SET x = set_config('a', 'b', false)", True), (b"UPDATE t SET x = 1; SET search_path = a", True),
    (b"UPDATE t SET x = 1 -- ; SET y = 2", True), (b"UPDATE t SET x = ';'", True), (b"SET x = 1", True),
    (b"WITH a AS (SELECT 1) UPDATE t SET x = 1", True), (b"UPDATEt SET x = 1", True), (b"/* c */ UPDATE t SET x", True),
    (b"UPDATE t SET x = 1; LISTEN c", True), (b"UPDATE t SET x = (SELECT 1 FROM listen_here)", True),
    (b"update", False), (b"SELECT 1", False), (b"UPDATE t SET x = 1 RETURNING x", False),
]


@pytest.mark.timeout(10)
@pytest.mark.parametrize("impl", IMPLS)
def test_an_exempt_word_does_not_stop_one_statement_opening_with_the_lead(impl):
    walker, _ = impl
    rule = dict(PG, stop=b"X", count=b"QS", screen=b"Q", words=(b"set", b"set_config", b"listen"), max_screen=512,
                exempt_lead=b"UPDATE", exempt=(b"SET",))
    for text, stops in EXEMPT_CASES:
        frame = pg(b"Q", text + b"\0")
        assert walker(**rule).feed(frame)[1] == (rc.HANDOVER if stops else rc.NONE), text
    # the NUL or command byte before the text of a Parse or a COM_QUERY counts as white space
    for query, stops in ((b"\x03UPDATE t SET x = 1", False), (b"\x03UPDATE t SET x = @v", True)):
        mysql = walker(**rc.FRAMINGS["mysql"], count=b"\x03", screen=b"\x03", words=(b"set", b"@"),
                       exempt_lead=b"update", exempt=(b"set",))
        assert mysql.feed(len(query).to_bytes(3, "little") + b"\0" + query)[1] == (rc.HANDOVER if stops else rc.NONE)
    batch = walker(**dict(rule, pg_unnamed=True))
    parse = pg(b"P", b"\0UPDATE t SET x = $1\0\0\0")
    frames = parse + pg(b"B", b"\0\0" + bytes(6)) + pg(b"E", b"\0" + bytes(4)) + pg(b"S")
    assert batch.feed(frames) == (len(frames), rc.NONE, -1)
    with pytest.raises(ValueError):
        walker(**dict(rule, exempt=(b"reset",)))
    with pytest.raises(ValueError):
        walker(**dict(rule, exempt_lead=b"x" * 33))
    with pytest.raises(ValueError):
        walker(**dict(rule, exempt_lead=(b"a",) * 9))
    with pytest.raises(ValueError):
        walker(**dict(rule, exempt_lead=(b"select", "update")))
    # several leads: a statement opening with any of them (the lead whole, then white space)
    several = walker(**dict(rule, exempt_lead=(b"update", b"SELECT", b"")))
    for text, stops in ((b"select * from t offset 5", False), (b" UPDATE t SET x = 1", False),
                        (b"selected set x", True), (b"select 1; set x = 1", True), (b"insert into t (settings)", True),
                        (b"select set_config('a', 'b', false)", True)):
        assert several.feed(pg(b"Q", text + b"\0"))[1] == (rc.HANDOVER if stops else rc.NONE), text


@pytest.mark.timeout(10)
@pytest.mark.parametrize("impl", IMPLS)
def test_screen_words_are_checked(impl):
    walker, _ = impl
    with pytest.raises(ValueError):
        walker(**PG, screen=b"Q", words=[b""])
    with pytest.raises(ValueError):
        walker(**PG, screen=b"Q", words=[b"x" * 33])
    with pytest.raises(ValueError):
        walker(**PG, screen=b"Q", words=[b"w%d" % i for i in range(65)])


@pytest.mark.timeout(20)
@pytest.mark.parametrize("impl", IMPLS)
def test_a_linked_clients_stop_waits_for_the_transaction_end_with_hold_stops(impl, pairs):
    relay = impl[1](*screened_walkers(impl), hold_stops=True)
    client, backend = pairs(), pairs()
    relay.add_backend(backend.fd())
    relay.add_client(client.fd())
    setting = pg(b"Q", b"set x = 1\0")
    client.outside.sendall(QUERY + setting)
    assert serve(relay) == []
    assert backend.read(len(QUERY)) == QUERY
    assert relay.counts() == (0, 0, 1)
    assert (relay.peer(client.fd()), relay.peer(backend.fd())) == (backend.fd(), client.fd())
    assert relay.remove(client.fd()) is None           # linked: not given back
    backend.outside.sendall(RESULT + READY_IDLE)
    assert serve(relay) == [(rc.HANDOVER, client.fd(), -1, setting, ord("Q"))]
    assert client.read(len(RESULT + READY_IDLE)) == RESULT + READY_IDLE
    assert relay.counts() == (1, 0, 0)
    assert relay.peer(backend.fd()) == relay.peer(client.fd()) == -1
    assert relay.take_idle() == backend.fd()
    assert relay.take_idle() == -1
    assert relay.stats()["connections"] == 0
    relay.close()


@pytest.mark.timeout(20)
@pytest.mark.parametrize("impl", IMPLS)
def test_a_stop_inside_a_transaction_goes_with_its_backend_and_status(impl, pairs):
    """hold_stops: a linked client's stop frame inside a transaction (nothing outstanding: at once; behind a request:
    at the boundary answering it) goes to the caller with its backend, the event's arg that backend's last status;
    one whose backend said more than that answer goes as the backend's UNSOLICITED."""
    relay = impl[1](*screened_walkers(impl), hold_stops=True)
    client, backend = pairs(), pairs()
    relay.add_backend(backend.fd())
    relay.add_client(client.fd())
    begin, setting = pg(b"Q", b"insert into t values (1)\0"), pg(b"Q", b"set local x = 1\0")   # (the first opens one)
    client.outside.sendall(begin)
    assert serve(relay) == []
    assert backend.read(len(begin)) == begin
    backend.outside.sendall(pg(b"C", b"BEGIN\0") + READY_IN_TX)
    assert serve(relay) == []
    assert client.read(len(pg(b"C", b"BEGIN\0") + READY_IN_TX)) == pg(b"C", b"BEGIN\0") + READY_IN_TX
    assert relay.counts() == (0, 0, 1) and relay.activity(client.fd())[1:] == (backend.fd(), False, 0, 0)
    client.outside.sendall(setting)
    assert serve(relay) == [(rc.HANDOVER, client.fd(), backend.fd(), setting, ord("T"))]
    assert relay.counts() == (0, 0, 0) and relay.stats()["connections"] == 0
    assert relay.relayed_before(client.fd()) == 1
    # behind a request, after an error: at the boundary that answers it, with 'E'
    relay.add_backend(backend.fd())
    relay.add_client(client.fd())
    client.outside.sendall(begin)
    backend.outside.sendall(pg(b"C", b"BEGIN\0") + READY_IN_TX)
    assert serve(relay) == []
    assert backend.read(len(begin)) == begin
    client.read(len(pg(b"C", b"BEGIN\0") + READY_IN_TX))
    client.outside.sendall(QUERY + setting)
    assert serve(relay) == []
    assert backend.read(len(QUERY)) == QUERY
    failed = pg(b"E", b"SERROR\0\0") + pg(b"Z", b"E")
    backend.outside.sendall(failed)
    assert serve(relay) == [(rc.HANDOVER, client.fd(), backend.fd(), setting, ord("E"))]
    assert client.read(len(failed)) == failed
    # the backend says more than its answer: it goes (the client with it, as its peer)
    relay.add_backend(backend.fd())
    relay.add_client(client.fd())
    client.outside.sendall(begin + setting)
    assert serve(relay) == []
    assert backend.read(len(begin)) == begin
    notice = pg(b"N", b"SNOTICE\0\0")
    backend.outside.sendall(pg(b"C", b"BEGIN\0") + READY_IN_TX + notice)
    events = serve(relay)
    assert events == [(rc.UNSOLICITED, backend.fd(), client.fd(), notice, -1)]
    # a stop frame at the end of the transaction goes alone, as before
    relay.add_backend(backend.fd())
    relay.add_client(client.fd())
    client.read(len(pg(b"C", b"BEGIN\0") + READY_IN_TX))
    client.outside.sendall(QUERY + setting)
    assert serve(relay) == []
    assert backend.read(len(QUERY)) == QUERY
    backend.outside.sendall(RESULT + READY_IDLE)
    assert serve(relay) == [(rc.HANDOVER, client.fd(), -1, setting, ord("Q"))]
    relay.close()


@pytest.mark.timeout(20)
@pytest.mark.parametrize("impl", IMPLS)
def test_waiting_and_idle_clients_are_given_back_with_their_unsent_bytes(impl, pairs):
    relay = impl[1](*screened_walkers(impl), hold_stops=True)
    first, second = pairs(), pairs()
    relay.add_client(first.fd())
    relay.add_client(second.fd(), QUERY)
    assert relay.counts() == (0, 1, 0)
    assert relay.remove(first.fd()) == b""
    assert relay.take_waiting() == (second.fd(), QUERY)
    assert relay.take_waiting() is None
    assert relay.remove(second.fd()) is None
    assert relay.stats()["connections"] == 0
    relay.close()


@pytest.mark.timeout(20)
@pytest.mark.parametrize("impl", IMPLS)
def test_a_yielding_relay_lends_no_backend_by_itself(impl, pairs):
    """set_yield(True): a backend that ends a transaction goes idle (for the caller's take_idle) instead of to the
    client waiting; a client that starts a request waits even with a backend idle; add_backend still lends to the
    client waiting longest; set_yield(False) lends the idle backends to the waiting clients, longest first."""
    relay = impl[1](*walkers(impl))
    first, second, third, backend = pairs(), pairs(), pairs(), pairs()
    for pair in (first, second, third):
        relay.add_client(pair.fd())
    relay.add_backend(backend.fd())
    first.outside.sendall(QUERY)
    assert serve(relay) == []
    assert backend.read(len(QUERY)) == QUERY
    second.outside.sendall(QUERY)
    assert serve(relay) == []
    assert relay.counts() == (0, 1, 1)
    assert relay.set_yield(True) == []
    backend.outside.sendall(RESULT + READY_IDLE)
    assert serve(relay) == []
    assert first.read(len(RESULT + READY_IDLE)) == RESULT + READY_IDLE
    assert relay.counts() == (1, 1, 0)          # idle, not lent to the client that waits
    third.outside.sendall(QUERY)
    assert serve(relay) == []
    assert relay.counts() == (1, 2, 0)          # a new request waits too
    assert relay.take_idle() == backend.fd()
    assert relay.add_backend(backend.fd()) == []    # given again: to the client waiting longest
    assert backend.read(len(QUERY)) == QUERY
    assert relay.peer(second.fd()) == backend.fd() and relay.counts() == (0, 1, 1)
    backend.outside.sendall(RESULT + READY_IDLE)
    assert serve(relay) == []
    assert second.read(len(RESULT + READY_IDLE)) == RESULT + READY_IDLE
    assert relay.counts() == (1, 1, 0)
    assert relay.set_yield(False) == []         # the idle backend goes to the waiting client
    assert backend.read(len(QUERY)) == QUERY
    assert relay.peer(third.fd()) == backend.fd() and relay.counts() == (0, 0, 1)
    backend.outside.sendall(RESULT + READY_IDLE)
    assert serve(relay) == []
    assert third.read(len(RESULT + READY_IDLE)) == RESULT + READY_IDLE
    first.outside.sendall(QUERY)                # not yielding: the idle backend is lent at once
    assert serve(relay) == []
    assert backend.read(len(QUERY)) == QUERY
    assert relay.counts() == (0, 0, 1) and relay.stats()["transactions"] == 3
    relay.close()


@pytest.mark.timeout(20)
@pytest.mark.parametrize("impl", IMPLS)
def test_clients_that_waited_limit_ticks_are_given_back_longest_first(impl, pairs):
    relay = impl[1](*walkers(impl))
    first, second, third, backend = pairs(), pairs(), pairs(), pairs()
    for pair in (first, second, third):
        relay.add_client(pair.fd())
    first.outside.sendall(QUERY)
    second.outside.sendall(QUERY)
    assert serve(relay) == []
    assert relay.age_waiting(3) == [] and relay.age_waiting(3) == []
    third.outside.sendall(QUERY + QUERY[:3])
    assert serve(relay) == []
    assert relay.counts() == (0, 3, 0)
    assert relay.age_waiting(3) == [(first.fd(), QUERY), (second.fd(), QUERY)]
    assert relay.counts() == (0, 1, 0) and relay.stats()["connections"] == 1
    assert relay.age_waiting(3) == []           # the third: 2 ticks
    relay.add_backend(backend.fd())             # served: its ticks end with its wait
    assert backend.read(len(QUERY)) == QUERY
    assert relay.age_waiting(3) == [] and relay.counts() == (0, 0, 1)
    backend.outside.sendall(RESULT + READY_IDLE)
    assert serve(relay) == []
    assert third.read(len(RESULT + READY_IDLE)) == RESULT + READY_IDLE
    assert relay.age_waiting(1) == []           # it sent part of a header only: it does not wait
    third.outside.sendall(QUERY[3:])
    assert serve(relay) == []
    assert backend.read(len(QUERY)) == QUERY
    relay.close()


def run_yield_scenario(impl, steps) -> list:
    """Play steps into a relay with three clients and one backend: ("send", i) client i sends a Query, ("answer",)
    the backend answers and ends the transaction, ("yield", on) set_yield, ("take",) take_idle and, when one was
    idle, add_backend again, ("age", limit) age_waiting; record what each call returns, what reached each far end
    and the counts after every step."""
    relay = impl[1](*walkers(impl))
    pairs = [Pair() for _ in range(4)]
    backend = pairs[3]
    names = {pair.fd(): f"c{i}" for i, pair in enumerate(pairs[:3])}
    names[backend.fd()], names[-1] = "backend", None
    for pair in pairs:
        pair.outside.setblocking(False)
    trace = []

    def named(events):
        return [(kind, names[fd], names[peer], rest, arg) for kind, fd, peer, rest, arg in events]

    try:
        relay.add_backend(backend.fd())
        for pair in pairs[:3]:
            relay.add_client(pair.fd())
        for step in steps:
            if step[0] == "send":
                pairs[step[1]].outside.sendall(QUERY)
            elif step[0] == "answer":
                backend.outside.sendall(RESULT + READY_IDLE)
            elif step[0] == "yield":
                trace.append(("yield", named(relay.set_yield(step[1]))))
            elif step[0] == "take":
                fd = relay.take_idle()
                trace.append(("take", names.get(fd)))
                if fd >= 0:
                    trace.append(("add", named(relay.add_backend(fd))))
            else:
                trace.append(("age", [(names[fd], rest) for fd, rest in relay.age_waiting(step[1])]))
            for _ in range(3):
                trace.append(("run", named(relay.run_ready())))
            for pair in pairs:
                try:
                    trace.append(("bytes", names[pair.fd()], pair.outside.recv(1 << 20)))
                except BlockingIOError:
                    pass
            trace.append(("counts", relay.counts(), relay.stats()["transactions"]))
    finally:
        relay.close()
        for pair in pairs:
            pair.close()
    return trace


yield_steps = st.lists(st.one_of(st.tuples(st.just("send"), st.integers(min_value=0, max_value=2)),
                                 st.just(("answer",)), st.tuples(st.just("yield"), st.booleans()),
                                 st.just(("take",)), st.tuples(st.just("age"), st.integers(min_value=1, max_value=3))),
                       max_size=16)


@pytest.mark.timeout(120)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(yield_steps)
def test_c_and_python_relays_agree_on_yielding_and_aging(steps):
    if _relay is None:
        pytest.skip(NOT_BUILT)
    assert run_yield_scenario((_relay.Walker, _relay.Relay), steps) == run_yield_scenario((rc.PyWalker, rc.PyRelay),
                                                                                          steps)


@pytest.mark.timeout(120)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(st.tuples(st.just("client"), client_frames),
                          st.tuples(st.sampled_from(["first", "second"]), server_frames)), max_size=10))
def test_c_and_python_relays_agree_with_a_screen_and_held_stops(steps):
    if _relay is None:
        pytest.skip(NOT_BUILT)
    assert (run_scenario((_relay.Walker, _relay.Relay), steps, screened=True)
            == run_scenario((rc.PyWalker, rc.PyRelay), steps, screened=True))


screened_frames = st.one_of(
    frames,
    st.builds(lambda word, pad: pg(b"Q", pad + word + pad + b"\0"), st.sampled_from(
        [b"SET", b"set", b"Begin", b"lis", b"listen", b"\xc3\xa9set"]), st.binary(max_size=30)),
    st.builds(lambda lead, gap, tail: pg(b"Q", lead + gap + b"t SET x" + tail + b"\0"),
              st.sampled_from([b"update", b" UPDATE", b"\x00Update", b"updates", b"upd"]),
              st.sampled_from([b" ", b"\n", b"", b"x"]),
              st.lists(st.sampled_from([b";", b" ", b"set", b"listen", b"a", b"\n"]), max_size=6).map(b"".join)),
)


@pytest.mark.timeout(120)
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(screened_frames, max_size=12), st.lists(st.integers(min_value=1, max_value=64), max_size=20),
       st.integers(min_value=5, max_value=80))
def test_c_and_python_screening_walkers_agree(parts, cuts, max_screen):
    if _relay is None:
        pytest.skip(NOT_BUILT)
    stream = b"".join(parts)
    chunks, pos = [], 0
    for size in cuts:
        chunks.append(stream[pos:pos + size])
        pos += size
    chunks.append(stream[pos:])
    results = []
    for impl in ((_relay.Walker, _relay.Relay), (rc.PyWalker, rc.PyRelay)):
        client, _ = screened_walkers(impl, max_screen=max_screen)
        results.append((drive(client, chunks), client.take_count(), client.remaining))
    assert results[0] == results[1]


# -- pg_unnamed: whole batches of the unnamed statement and portal (Parse, Bind, Describe, Execute ... Sync)

PARSE = pg(b"P", b"\0select $1\0\0\1\0\0\0\x17")
BIND = pg(b"B", b"\0\0\0\0\0\1\0\0\0\x011\0\0")
DESCRIBE_PORTAL = pg(b"D", b"P\0")
EXECUTE = pg(b"E", b"\0\0\0\0\0")
SYNC = pg(b"S")
FLUSH = pg(b"H")
BATCH = PARSE + BIND + DESCRIBE_PORTAL + EXECUTE + SYNC
BATCH_ANSWER = pg(b"1") + pg(b"2") + RESULT + READY_IDLE


def batch_walkers(impl, max_screen=200):
    walker, _ = impl
    stop = bytes(kind for kind in range(256) if kind not in b"QSPBDE")
    return (walker(**PG, stop=stop, count=b"QS", screen=b"Q", words=SCREEN_WORDS, max_screen=max_screen,
                   pg_unnamed=True),
            walker(**PG, boundary=ord("Z")))


@pytest.mark.timeout(10)
@pytest.mark.parametrize("impl", IMPLS)
def test_a_whole_batch_is_relayed_and_counted_once(impl):
    client, _ = batch_walkers(impl)
    assert client.feed(BATCH) == (len(BATCH), rc.NONE, -1)
    assert client.take_count() == 1
    pipeline = PARSE + BIND + DESCRIBE_PORTAL + EXECUTE + PARSE + BIND + EXECUTE + SYNC
    assert client.feed(QUERY + pipeline + BATCH + QUERY) == (2 * len(QUERY) + len(pipeline) + len(BATCH), rc.NONE, -1)
    assert client.take_count() == 4


@pytest.mark.timeout(10)
@pytest.mark.parametrize("impl", IMPLS)
def test_a_batch_is_walked_only_whole_wherever_it_is_cut(impl):
    stream = QUERY + BATCH + QUERY
    whole = drive(batch_walkers(impl)[0], [stream])
    assert whole == (stream, [], b"")
    for cut in range(1, len(stream)):
        client = batch_walkers(impl)[0]
        consumed, event, _ = client.feed(stream[:cut])
        assert event == rc.NONE
        if len(QUERY) <= cut < len(QUERY) + len(BATCH):
            # the Query before the batch goes at once; nothing of the batch goes before its Sync is there
            assert consumed == len(QUERY), cut
        assert drive(batch_walkers(impl)[0], [stream[:cut], stream[cut:]]) == whole, cut


@pytest.mark.timeout(10)
@pytest.mark.parametrize("impl", IMPLS)
def test_a_batch_with_anything_the_relay_must_not_serve_stops_at_its_first_frame(impl):
    named_parse = pg(b"P", b"s1\0select 1\0\0\0")
    cases = [
        named_parse + BIND + EXECUTE + SYNC,                                    # a named statement
        pg(b"P", b"\0SET x = 1\0\0\0") + BIND + EXECUTE + SYNC,               # a screen word in the Parse
        PARSE + SYNC,                                                           # a Parse not bound at once
        PARSE + DESCRIBE_PORTAL + BIND + EXECUTE + SYNC,
        PARSE + pg(b"B", b"p1\0\0\0\0\0\0\0\0") + EXECUTE + SYNC,            # a named portal
        PARSE + pg(b"B", b"\0s1\0\0\0\0\0\0\0") + EXECUTE + SYNC,            # a named statement bound
        BIND + EXECUTE + SYNC,                                                  # a Bind with no Parse before it
        PARSE + BIND + BIND + EXECUTE + SYNC,
        PARSE + BIND + pg(b"D", b"S\0") + EXECUTE + SYNC,                      # Describe of a statement
        PARSE + BIND + pg(b"D", b"Pp1\0") + EXECUTE + SYNC,                    # ... of a named portal
        PARSE + BIND + pg(b"E", b"p1\0\0\0\0\0") + SYNC,                       # Execute of a named portal
        PARSE + BIND + EXECUTE + pg(b"C", b"S\0") + SYNC,                      # Close
        PARSE + BIND + EXECUTE + FLUSH,                                         # Flush: the client waits before its Sync
        PARSE + BIND + EXECUTE + QUERY,
        PARSE + BIND + EXECUTE + pg(b"S", b"x"),                                # a Sync with a body
        PARSE + BIND + EXECUTE + b"E\0\0\0\3",                                 # a length below the header
        PARSE + BIND + pg(b"E", b"\0") + SYNC,                                  # an Execute without its row limit
        pg(b"P", b"\0select 1\0\0\1") + BIND + EXECUTE + SYNC,                  # a Parse malformed ...
        pg(b"P", b"\0select 1\0\0\1\0\0\0\x17\0") + BIND + EXECUTE + SYNC,
    ]
    for case in cases:
        client, _ = batch_walkers(impl)
        assert client.feed(QUERY + case) == (len(QUERY), rc.HANDOVER, case[0]), case
        assert client.take_count() == 1, case
    # a malformed Parse stops at once, with no frame behind it yet
    for parse in (pg(b"P", b"\0select 1"), pg(b"P", b"stmt"), pg(b"P", b"\0select 1\0\xff\xff")):
        client, _ = batch_walkers(impl)
        assert client.feed(parse) == (0, rc.HANDOVER, ord("P")), parse
    # Describe and Execute of the unnamed portal need no Bind in the batch: a portal never outlives the implicit
    # transaction its Sync ends, so the server answers that it does not exist
    client, _ = batch_walkers(impl)
    assert client.feed(DESCRIBE_PORTAL + EXECUTE + SYNC) == (len(DESCRIBE_PORTAL + EXECUTE + SYNC), rc.NONE, -1)


@pytest.mark.timeout(10)
@pytest.mark.parametrize("impl", IMPLS)
def test_a_batch_waits_for_its_frames_and_a_long_one_stops(impl):
    client, _ = batch_walkers(impl)
    for end in (len(PARSE), len(PARSE) + 3, len(PARSE + BIND), len(BATCH) - 1):
        assert client.feed(BATCH[:end]) == (0, rc.NONE, -1), end
    assert client.take_count() == 0
    client, _ = batch_walkers(impl, max_screen=len(BATCH))
    assert client.feed(BATCH) == (len(BATCH), rc.NONE, -1)
    client, _ = batch_walkers(impl, max_screen=len(BATCH) - 1)
    assert client.feed(BATCH) == (0, rc.HANDOVER, ord("P"))
    client, _ = batch_walkers(impl, max_screen=len(BATCH) - 1)
    assert client.feed(BATCH[:-2]) == (0, rc.HANDOVER, ord("P"))        # known too long before its Sync is there


@pytest.mark.timeout(10)
@pytest.mark.parametrize("impl", IMPLS)
def test_pg_unnamed_takes_only_postgres_framing(impl):
    walker, _ = impl
    with pytest.raises(ValueError):
        walker(**rc.FRAMINGS["mysql"], pg_unnamed=True)
    assert walker(**PG, pg_unnamed=True).feed(BATCH) == (len(BATCH), rc.NONE, -1)


@pytest.mark.timeout(20)
@pytest.mark.parametrize("impl", IMPLS)
def test_a_batch_is_relayed_and_a_stop_behind_it_waits_for_its_ready_for_query(impl, pairs):
    relay = impl[1](*batch_walkers(impl), hold_stops=True)
    client, backend = pairs(), pairs()
    relay.add_backend(backend.fd())
    relay.add_client(client.fd())
    stopped = PARSE + BIND + EXECUTE + FLUSH
    client.outside.sendall(BATCH + stopped)
    assert serve(relay) == []
    assert backend.read(len(BATCH)) == BATCH
    assert relay.counts() == (0, 0, 1)
    backend.outside.sendall(BATCH_ANSWER)
    assert serve(relay) == [(rc.HANDOVER, client.fd(), -1, stopped, ord("P"))]
    assert client.read(len(BATCH_ANSWER)) == BATCH_ANSWER
    assert relay.counts() == (1, 0, 0)
    assert relay.stats()["transactions"] == 1
    relay.close()


@pytest.mark.timeout(20)
@pytest.mark.parametrize("impl", IMPLS)
def test_a_batch_not_ended_takes_no_backend_and_others_are_served(impl, pairs):
    """A client that sends a batch without its Sync and waits (a pipeline) holds no backend: the only backend
    serves another client meanwhile; the Flush it then sends stops the batch, which goes whole to the caller."""
    relay = impl[1](*batch_walkers(impl), hold_stops=True)
    waiting, other, backend = pairs(), pairs(), pairs()
    relay.add_backend(backend.fd())
    relay.add_client(waiting.fd())
    relay.add_client(other.fd())
    open_batch = PARSE + BIND + DESCRIBE_PORTAL + EXECUTE
    waiting.outside.sendall(open_batch)
    assert serve(relay) == []
    assert relay.counts() == (1, 0, 0)                  # no backend lent
    other.outside.sendall(BATCH)
    assert serve(relay) == []
    assert backend.read(len(BATCH)) == BATCH
    backend.outside.sendall(BATCH_ANSWER)
    assert serve(relay) == []
    assert other.read(len(BATCH_ANSWER)) == BATCH_ANSWER
    waiting.outside.sendall(FLUSH)
    assert serve(relay) == [(rc.HANDOVER, waiting.fd(), -1, open_batch + FLUSH, ord("P"))]
    assert relay.counts() == (1, 0, 0)
    relay.close()


batch_frames = st.one_of(
    st.just(PARSE), st.just(BIND), st.just(DESCRIBE_PORTAL), st.just(EXECUTE), st.just(SYNC), st.just(FLUSH),
    st.just(QUERY), st.just(pg(b"P", b"s1\0select 1\0\0\0")), st.just(pg(b"P", b"\0BEGIN\0\0\0")),
    st.just(pg(b"D", b"S\0")), st.just(pg(b"E", b"p\0\0\0\0\0")), st.just(pg(b"C", b"S\0")),
    st.builds(pg, st.sampled_from([b"P", b"B", b"D", b"E", b"S"]), st.binary(max_size=12)),
    st.binary(min_size=1, max_size=8),
)

# -- a BEGIN the relay answers (pg_begin)

def begin_ahead(text: bytes) -> bytes:
    """Parse/Bind/Execute of the unnamed statement holding text, as the relay sends a lazy BEGIN ahead."""
    return pg(b"P", b"\0" + text + b"\0\0\0") + pg(b"B", bytes(8)) + pg(b"E", bytes(5))


BEGIN_AHEAD = begin_ahead(b"BEGIN")
BEGIN_DONE = pg(b"1") + pg(b"2") + pg(b"C", b"BEGIN\0")        # the server's answer to BEGIN_AHEAD
BEGIN_ANSWER = pg(b"C", b"BEGIN\0") + READY_IN_TX              # the relay's answer to a lone BEGIN
READY_FAILED = pg(b"Z", b"E")
FAILURE = pg(b"E", b"SERROR\0C25P02\0\0")


def begin_walkers(impl, max_screen=200):
    """PostgreSQL's relay rules in small: batches of the unnamed statement, a screen with BEGIN in it, pg_begin."""
    walker, _ = impl
    stop = bytes(kind for kind in range(256) if kind not in b"QSPBDE")
    return (walker(**PG, stop=stop, count=b"QS", screen=b"Q", words=SCREEN_WORDS + (b"start",),
                   max_screen=max_screen, pg_unnamed=True, pg_begin=True),
            walker(**PG, boundary=ord("Z")))


def begin_relay(impl, pairs, backends=1):
    relay = impl[1](*begin_walkers(impl), hold_stops=True)
    client, servers = pairs(), [pairs() for _ in range(backends)]
    for server in servers:
        relay.add_backend(server.fd())
    relay.add_client(client.fd())
    return relay, client, servers


def nothing_read(pair) -> bool:
    pair.outside.setblocking(False)
    try:
        pair.outside.recv(1)
    except BlockingIOError:
        return True
    finally:
        pair.outside.settimeout(5)
    return False


@pytest.mark.timeout(10)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("text,lazy,expected", [
    (b"BEGIN", False, (rc.LOCAL, rc.TXW_BEGIN)),
    (b"  begin work ; \n", False, (rc.LOCAL, rc.TXW_BEGIN)),
    (b"Begin\tTransaction;", False, (rc.LOCAL, rc.TXW_BEGIN)),
    (b"start transaction", False, (rc.LOCAL, rc.TXW_START)),
    (b"BEGIN ISOLATION LEVEL SERIALIZABLE", False, (rc.LOCAL, rc.TXW_BEGIN | 1 << 3)),
    (b"begin transaction isolation level repeatable read, read only;", False, (rc.LOCAL, rc.TXW_BEGIN | 2 << 3 | 2 << 6)),
    (b"START TRANSACTION READ WRITE,NOT DEFERRABLE", False, (rc.LOCAL, rc.TXW_START | 1 << 6 | 2 << 8)),
    (b"begin work deferrable isolation level read uncommitted", False, (rc.LOCAL, rc.TXW_BEGIN | 4 << 3 | 1 << 8)),
    (b"BEGIN ISOLATION LEVEL READ COMMITTED", True, (rc.LOCAL, rc.TXW_BEGIN | 3 << 3)),   # (the relay says no)
    (b"BEGIN READ ONLY READ WRITE", False, (rc.HANDOVER, ord("Q"))),     # a kind of mode twice: the Python path's
    (b"BEGIN , READ ONLY", False, (rc.HANDOVER, ord("Q"))),              # commas only between modes
    (b"BEGIN READ ONLY,", False, (rc.HANDOVER, ord("Q"))),
    (b"BEGIN READ ONLY,, DEFERRABLE", False, (rc.HANDOVER, ord("Q"))),
    (b"BEGIN ISOLATION LEVEL READ", False, (rc.HANDOVER, ord("Q"))),
    (b"BEGIN ISOLATION LEVEL SNAPSHOT", False, (rc.HANDOVER, ord("Q"))),
    (b"START READ ONLY", False, (rc.HANDOVER, ord("Q"))),
    (b"COMMIT READ ONLY", True, (rc.NONE, -1)),
    (b"BEGIN; SELECT 1", False, (rc.HANDOVER, ord("Q"))),
    (b"BEGIN;;", False, (rc.HANDOVER, ord("Q"))),
    (b"BEGIN\x0b", False, (rc.HANDOVER, ord("Q"))),              # not PostgreSQL's white space
    (b"/* c */ BEGIN", False, (rc.HANDOVER, ord("Q"))),
    (b"start", False, (rc.HANDOVER, ord("Q"))),
    (b"COMMIT", False, (rc.NONE, -1)),                           # only after a BEGIN the relay answered
    (b"COMMIT", True, (rc.LOCAL, rc.TXW_COMMIT)),
    (b"end transaction;", True, (rc.LOCAL, rc.TXW_COMMIT)),
    (b"ROLLBACK WORK", True, (rc.LOCAL, rc.TXW_ROLLBACK)),
    (b"abort", True, (rc.LOCAL, rc.TXW_ROLLBACK)),
    (b"COMMIT AND CHAIN", True, (rc.NONE, -1)),
    (b"ROLLBACK TO SAVEPOINT a", True, (rc.NONE, -1)),
    (b"commit work transaction", True, (rc.NONE, -1)),
])
def test_pg_begin_finds_the_transaction_words_the_relay_answers(impl, text, lazy, expected):
    client, _ = begin_walkers(impl)
    client.lazy = lazy
    frame = pg(b"Q", text + b"\0")
    consumed, event, arg = client.feed(QUERY + frame)
    assert (event, arg) == expected
    assert consumed == (len(QUERY) if event != rc.NONE else len(QUERY + frame))


@pytest.mark.timeout(10)
@pytest.mark.parametrize("impl", IMPLS)
def test_pg_begin_takes_only_postgres_framing(impl):
    with pytest.raises(ValueError):
        impl[0](**MY, pg_begin=True)


@pytest.mark.timeout(10)
@pytest.mark.parametrize("impl", IMPLS)
def test_a_lone_begin_is_answered_by_the_relay_and_sent_ahead_of_the_first_query(impl, pairs):
    """BEGIN: answered with no backend; the next Query goes with Parse/Bind/Execute of BEGIN in front of it and a Sync
    of the relay's behind it; the BEGIN's answer and that Sync's ReadyForQuery never reach the client, and the backend
    serves the transaction to its end."""
    relay, client, (backend,) = begin_relay(impl, pairs)
    client.outside.sendall(pg(b"Q", b"begin\0"))
    assert serve(relay) == []
    assert client.read(len(BEGIN_ANSWER)) == BEGIN_ANSWER
    assert relay.counts() == (1, 0, 0) and relay.activity(client.fd()) == (1, -1, 0, 0, rc.TXW_BEGIN)
    assert nothing_read(backend)
    client.outside.sendall(QUERY)
    assert serve(relay) == []
    assert backend.read(len(BEGIN_AHEAD + QUERY + SYNC)) == BEGIN_AHEAD + QUERY + SYNC
    assert relay.activity(client.fd())[1:] == (backend.fd(), 0, 2, 0)     # its Query and the relay's Sync
    backend.outside.sendall(BEGIN_DONE + RESULT)
    assert serve(relay) == []
    backend.outside.sendall(READY_IN_TX + READY_IN_TX)
    assert serve(relay) == []
    assert client.read(len(RESULT + READY_IN_TX)) == RESULT + READY_IN_TX
    assert nothing_read(client)
    assert relay.activity(client.fd())[1:] == (backend.fd(), 0, 0, 0)
    commit = pg(b"Q", b"COMMIT\0")
    client.outside.sendall(commit)                      # sent: the transaction is on the backend now
    assert serve(relay) == []
    assert backend.read(len(commit)) == commit
    backend.outside.sendall(pg(b"C", b"COMMIT\0") + READY_IDLE)
    assert serve(relay) == []
    assert client.read(len(pg(b"C", b"COMMIT\0") + READY_IDLE)) == pg(b"C", b"COMMIT\0") + READY_IDLE
    assert relay.counts() == (1, 0, 0) and relay.stats()["transactions"] == 1
    relay.close()


@pytest.mark.timeout(10)
@pytest.mark.parametrize("impl", IMPLS)
def test_a_batch_after_a_lone_begin_gets_it_ahead_with_no_sync_of_the_relays(impl, pairs):
    relay, client, (backend,) = begin_relay(impl, pairs)
    client.outside.sendall(pg(b"Q", b"START TRANSACTION;\0"))
    serve(relay)
    answer = pg(b"C", b"START TRANSACTION\0") + READY_IN_TX
    assert client.read(len(answer)) == answer
    client.outside.sendall(BATCH)
    assert serve(relay) == []
    ahead = begin_ahead(b"START TRANSACTION")
    assert backend.read(len(ahead + BATCH)) == ahead + BATCH
    notice = pg(b"N", b"SNOTICE\0\0")                   # a notice among the BEGIN's answer reaches the client
    backend.outside.sendall(pg(b"1") + notice + pg(b"2") + pg(b"C", b"BEGIN\0") + pg(b"1") + pg(b"2") + RESULT
                            + READY_IN_TX)
    assert serve(relay) == []
    expected = notice + pg(b"1") + pg(b"2") + RESULT + READY_IN_TX
    assert client.read(len(expected)) == expected
    assert relay.activity(client.fd())[1:] == (backend.fd(), 0, 0, 0)
    relay.close()


@pytest.mark.timeout(10)
@pytest.mark.parametrize("impl", IMPLS)
def test_a_begin_with_modes_goes_ahead_with_its_modes(impl, pairs):
    """BEGIN ISOLATION LEVEL ..., READ ONLY: answered as a lone BEGIN is; what goes ahead of the next Query is a BEGIN
    with the same modes; a client let go of carries the code, which begin_text spells."""
    relay, client, (backend,) = begin_relay(impl, pairs)
    client.outside.sendall(pg(b"Q", b"begin isolation level repeatable read, read only;\0"))
    assert serve(relay) == []
    assert client.read(len(BEGIN_ANSWER)) == BEGIN_ANSWER
    code = relay.lazy_begin(client.fd())
    assert code == rc.TXW_BEGIN | 2 << 3 | 2 << 6 and relay.activity(client.fd())[4] == code
    assert rc.begin_text(code) == b"BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"
    client.outside.sendall(QUERY)
    assert serve(relay) == []
    ahead = begin_ahead(b"BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
    assert backend.read(len(ahead + QUERY + SYNC)) == ahead + QUERY + SYNC
    backend.outside.sendall(BEGIN_DONE + RESULT + READY_IN_TX + READY_IN_TX)
    assert serve(relay) == []
    assert client.read(len(RESULT + READY_IN_TX)) == RESULT + READY_IN_TX
    relay.close()
    relay, client, (backend,) = begin_relay(impl, pairs)
    client.outside.sendall(pg(b"Q", b"START TRANSACTION NOT DEFERRABLE\0") + pg(b"Q", b"SET x = 1\0"))
    assert serve(relay) == [(rc.HANDOVER, client.fd(), -1, pg(b"Q", b"SET x = 1\0"), ord("Q"))]
    assert rc.begin_text(relay.lazy_begin(client.fd())) == b"START TRANSACTION NOT DEFERRABLE"
    relay.close()


@pytest.mark.timeout(10)
@pytest.mark.parametrize("impl", IMPLS)
def test_a_begin_that_fails_gives_its_error_as_the_answer_to_the_request_behind_it(impl, pairs):
    """The server skips the client's Query up to the relay's Sync: the client gets the BEGIN's error and that Sync's
    ReadyForQuery as its Query's answer, and the backend is free again."""
    relay, client, (backend,) = begin_relay(impl, pairs)
    client.outside.sendall(pg(b"Q", b"BEGIN\0"))
    serve(relay)
    client.read(len(BEGIN_ANSWER))
    client.outside.sendall(QUERY)
    serve(relay)
    backend.read(len(BEGIN_AHEAD + QUERY + SYNC))
    backend.outside.sendall(pg(b"1") + pg(b"2") + FAILURE + READY_IDLE)
    assert serve(relay) == []
    expected = FAILURE + READY_IDLE
    assert client.read(len(expected)) == expected
    assert relay.counts() == (1, 0, 0) and relay.activity(client.fd()) == (2, -1, 0, 0, 0)
    relay.close()


@pytest.mark.timeout(10)
@pytest.mark.parametrize("impl", IMPLS)
def test_commit_or_rollback_right_after_a_lone_begin_is_answered_with_no_backend(impl, pairs):
    relay, client, (backend,) = begin_relay(impl, pairs)
    for end, tag in ((b"COMMIT", b"COMMIT"), (b"rollback;", b"ROLLBACK"), (b"END", b"COMMIT"), (b"ABORT", b"ROLLBACK")):
        client.outside.sendall(pg(b"Q", b"BEGIN\0") + pg(b"Q", end + b"\0"))
        assert serve(relay) == []
        expected = BEGIN_ANSWER + pg(b"C", tag + b"\0") + READY_IDLE
        assert client.read(len(expected)) == expected
    assert relay.activity(client.fd()) == (8, -1, 0, 0, 0)
    assert nothing_read(backend) and relay.stats()["transactions"] == 0
    relay.close()


@pytest.mark.timeout(10)
@pytest.mark.parametrize("impl", IMPLS)
def test_what_the_relay_cannot_put_its_begin_ahead_of_goes_to_the_caller_with_lazy_begin(impl, pairs):
    """A second BEGIN, a stop frame or a request opening with anything but a Query or a Parse after a lone BEGIN: the
    client goes to the caller with its bytes, and lazy_begin(fd) says its BEGIN was answered and not sent; so does a
    client waiting for a backend that the caller takes back."""
    for request in (pg(b"Q", b"BEGIN\0"), pg(b"Q", b"SET x = 1\0"), TERMINATE, pg(b"S") + QUERY,
                    pg(b"Q", b"begin read only\0")):
        relay, client, (backend,) = begin_relay(impl, pairs)
        client.outside.sendall(pg(b"Q", b"Start Transaction\0"))
        serve(relay)
        client.read(len(pg(b"C", b"START TRANSACTION\0") + READY_IN_TX))
        client.outside.sendall(request)
        assert serve(relay) == [(rc.HANDOVER, client.fd(), -1, request, request[0])]
        assert relay.lazy_begin(client.fd()) == rc.TXW_START and rc.begin_text(rc.TXW_START) == b"START TRANSACTION"
        assert relay.relayed_before(client.fd()) == 1 and nothing_read(backend)
        relay.close()
    relay, client, _ = begin_relay(impl, pairs, backends=0)
    client.outside.sendall(pg(b"Q", b"BEGIN\0") + QUERY)
    assert serve(relay) == []
    client.read(len(BEGIN_ANSWER))
    assert relay.counts() == (0, 1, 0)
    assert relay.take_waiting() == (client.fd(), QUERY)
    assert relay.lazy_begin(client.fd()) == rc.TXW_BEGIN
    relay.add_client(client.fd())                       # a client given to the relay again starts with none
    assert relay.lazy_begin(client.fd()) == 0
    relay.close()


@pytest.mark.timeout(10)
@pytest.mark.parametrize("impl", IMPLS)
def test_a_stop_inside_a_transaction_begun_in_the_relay_goes_with_its_backend_after_the_relays_sync(impl, pairs):
    relay, client, (backend,) = begin_relay(impl, pairs)
    setting = pg(b"Q", b"SET LOCAL x = 1\0")
    client.outside.sendall(pg(b"Q", b"BEGIN\0"))
    serve(relay)
    client.read(len(BEGIN_ANSWER))
    client.outside.sendall(QUERY + setting)             # the stop waits for both ReadyForQuery, then goes
    assert serve(relay) == []
    backend.read(len(BEGIN_AHEAD + QUERY + SYNC))
    backend.outside.sendall(BEGIN_DONE + FAILURE + READY_FAILED)
    assert serve(relay) == []
    assert client.read(len(FAILURE + READY_FAILED)) == FAILURE + READY_FAILED
    backend.outside.sendall(READY_FAILED)
    assert serve(relay) == [(rc.HANDOVER, client.fd(), backend.fd(), setting, ord("E"))]
    assert nothing_read(client) and relay.lazy_begin(client.fd()) == 0
    relay.close()


# -- MySQL: the server's responses (response="mysql") and the client's commands (request="mysql")

MY = rc.FRAMINGS["mysql"]
IN_TRANS, AUTOCOMMIT, MORE_RESULTS = 0x0001, 0x0002, 0x0008


def my(seq: int, payload: bytes) -> bytes:
    return len(payload).to_bytes(3, "little") + bytes((seq,)) + payload


def my_ok(seq: int, status: int = AUTOCOMMIT, affected: bytes = b"\0", insert_id: bytes = b"\0",
          header: int = 0x00, info: bytes = b"") -> bytes:
    return my(seq, bytes((header,)) + affected + insert_id + status.to_bytes(2, "little") + b"\0\0" + info)


def my_eof(seq: int, status: int = AUTOCOMMIT) -> bytes:
    return my(seq, b"\xfe\0\0" + status.to_bytes(2, "little"))


MY_ERR = my(1, b"\xff\x7a\x04#42S02Table 'mpdb.nope' doesn't exist")
COLUMN = b"\x03def\x04mpdb\x01t\x01t\x01a\x01a\x0c\x3f\x00\x0b\x00\x00\x00\x03\x00\x00\x00\x00\x00"


def my_result(rows: list, deprecate_eof: bool, status: int = AUTOCOMMIT, columns: int = 1, seq: int = 1) -> bytes:
    """A text result set: column count, definitions, [EOF], rows, EOF / OK-with-0xFE."""
    out = [my(seq, bytes((columns,)))]
    seq += 1
    for _ in range(columns):
        out.append(my(seq, COLUMN))
        seq += 1
    if not deprecate_eof:
        out.append(my_eof(seq))
        seq += 1
    for row in rows:
        out.append(my(seq & 0xFF, row))
        seq += 1
    out.append(my_ok(seq & 0xFF, status, header=0xFE) if deprecate_eof else my_eof(seq & 0xFF, status))
    return b"".join(out)


def my_walker(impl, deprecate_eof=False, max_boundary=4096):
    walker, _ = impl
    return walker(**MY, response="mysql", deprecate_eof=deprecate_eof, max_boundary=max_boundary)


def assert_every_split(impl, stream: bytes, expected, deprecate_eof=False):
    """Whole, cut in two at every byte, and byte by byte: the same bytes and events."""
    whole = drive(my_walker(impl, deprecate_eof), [stream])
    assert whole == expected
    for cut in range(1, len(stream)):
        assert drive(my_walker(impl, deprecate_eof), [stream[:cut], stream[cut:]]) == whole, cut
    assert drive(my_walker(impl, deprecate_eof), [bytes([b]) for b in stream]) == whole


@pytest.mark.timeout(30)
@pytest.mark.parametrize("impl", IMPLS)
def test_mysql_ok_and_err_end_a_response(impl):
    ok = my_ok(1)
    assert_every_split(impl, ok, (ok, [(rc.BOUNDARY, ord("I"), len(ok))], b""))
    in_trans = my_ok(1, AUTOCOMMIT | IN_TRANS)
    assert drive(my_walker(impl), [in_trans]) == (in_trans, [(rc.BOUNDARY, ord("T"), len(in_trans))], b"")
    # affected rows and last insert id are length-encoded: the flags come after them
    big = my_ok(1, IN_TRANS, affected=b"\xfc\x10\x27", insert_id=b"\xfe" + (2**40).to_bytes(8, "little"),
                info=b"Rows matched: 10000")
    assert drive(my_walker(impl), [big]) == (big, [(rc.BOUNDARY, ord("T"), len(big))], b"")
    # an ERR carries no status flags: it ends the response with the status of the one before ('I' at first)
    assert_every_split(impl, MY_ERR, (MY_ERR, [(rc.BOUNDARY, ord("I"), len(MY_ERR))], b""))
    stream = in_trans + MY_ERR + MY_ERR + ok + MY_ERR
    assert drive(my_walker(impl), [stream]) == (stream, [
        (rc.BOUNDARY, ord("T"), len(in_trans)), (rc.BOUNDARY, ord("T"), len(in_trans + MY_ERR)),
        (rc.BOUNDARY, ord("T"), len(in_trans + MY_ERR * 2)), (rc.BOUNDARY, ord("I"), len(in_trans + MY_ERR * 2 + ok)),
        (rc.BOUNDARY, ord("I"), len(stream))], b"")
    # two answers in one read: one boundary each
    stream = ok + in_trans
    assert drive(my_walker(impl), [stream]) == (
        stream, [(rc.BOUNDARY, ord("I"), len(ok)), (rc.BOUNDARY, ord("T"), len(stream))], b"")


@pytest.mark.timeout(30)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("deprecate_eof", [False, True], ids=["eof", "deprecate_eof"])
def test_mysql_result_sets_end_at_their_terminator(impl, deprecate_eof):
    rows = [b"\x011", b"\x0212", b"\xfb"]       # values, and a NULL (0xFB) that is no LOCAL INFILE mid-result
    stream = my_result(rows, deprecate_eof, columns=2)
    assert_every_split(impl, stream, (stream, [(rc.BOUNDARY, ord("I"), len(stream))], b""), deprecate_eof)
    empty = my_result([], deprecate_eof, status=AUTOCOMMIT | IN_TRANS)
    assert_every_split(impl, empty, (empty, [(rc.BOUNDARY, ord("T"), len(empty))], b""), deprecate_eof)
    # an ERR in place of the rows' end
    failed = my_result([b"\x011"], deprecate_eof)
    failed = failed[:-len(my_eof(0))] if not deprecate_eof else failed[:-len(my_ok(0, header=0xFE))]
    failed += my(9, b"\xff\x26\x05#70100Query execution was interrupted")
    assert_every_split(impl, failed, (failed, [(rc.BOUNDARY, ord("I"), len(failed))], b""), deprecate_eof)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("impl", IMPLS)
def test_mysql_a_row_starting_with_0xfe_is_a_row(impl):
    # without DEPRECATE_EOF only a 0xFE packet shorter than 9 bytes is the EOF
    row = b"\xfe" + (9).to_bytes(8, "little") + b"123456789"
    stream = my_result([row, row[:9]], deprecate_eof=False)
    assert_every_split(impl, stream, (stream, [(rc.BOUNDARY, ord("I"), len(stream))], b""))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("deprecate_eof", [False, True], ids=["eof", "deprecate_eof"])
def test_mysql_16mb_packets_continue_without_a_type_byte(impl, deprecate_eof):
    # a row of 0xFFFFFF + 20 bytes: its first value's length is 0xFE + 8 bytes, so the first packet starts with 0xFE
    # and is 0xFFFFFF long; the continuation starts with 0xFE / 0xFF bytes that are no terminator
    value = 0xFFFFFF + 20 - 9
    payload = b"\xfe" + value.to_bytes(8, "little") + b"\xfe" * (value - 30) + b"\xff" * 30
    first, rest = payload[:0xFFFFFF], payload[0xFFFFFF:]
    header = my(1, b"\x01") + my(2, COLUMN) + (b"" if deprecate_eof else my_eof(3))
    end = my_ok(6, header=0xFE) if deprecate_eof else my_eof(6)
    stream = header + my(4, first) + my(5, rest) + end
    expected = (stream, [(rc.BOUNDARY, ord("I"), len(stream))], b"")
    assert drive(my_walker(impl, deprecate_eof), [stream]) == expected
    cuts = [len(header) + k for k in (1, 3, 4, 5, 4 + 0xFFFFFF, 4 + 0xFFFFFF + 3, 4 + 0xFFFFFF + 5)]
    cuts += [len(stream) - k for k in (1, 3, 5)]
    for cut in cuts:
        assert drive(my_walker(impl, deprecate_eof), [stream[:cut], stream[cut:]]) == expected, cut
    # exactly 0xFFFFFF bytes: an empty packet ends it
    exact = header + my(4, b"\xfe" + (0xFFFFFF - 9).to_bytes(8, "little") + b"\0" * (0xFFFFFF - 9)) + my(5, b"") + end
    assert drive(my_walker(impl, deprecate_eof), [exact]) == (exact, [(rc.BOUNDARY, ord("I"), len(exact))], b"")


@pytest.mark.timeout(30)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("deprecate_eof", [False, True], ids=["eof", "deprecate_eof"])
def test_mysql_multi_results_continue_the_response(impl, deprecate_eof):
    first = my_result([b"\x011"], deprecate_eof, status=AUTOCOMMIT | MORE_RESULTS)
    second_ok = my_ok(1, AUTOCOMMIT | MORE_RESULTS, affected=b"\x03")
    third = my_result([b"\x012"], deprecate_eof, status=AUTOCOMMIT)
    stream = first + second_ok + third
    assert_every_split(impl, stream, (stream, [(rc.BOUNDARY, ord("I"), len(stream))], b""), deprecate_eof)
    # an ERR after a result ends the whole response
    failed = first + MY_ERR
    assert_every_split(impl, failed, (failed, [(rc.BOUNDARY, ord("I"), len(failed))], b""), deprecate_eof)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("impl", IMPLS)
def test_mysql_local_infile_and_malformed_answers_are_events(impl):
    ok = my_ok(1)
    infile = my(1, b"\xfb/etc/passwd")
    assert drive(my_walker(impl), [ok + infile]) == (ok, [(rc.BOUNDARY, ord("I"), len(ok)), (rc.MALFORMED, 0xFB,
                                                                                                len(ok))], infile)
    for bad in (my(1, b""),                                    # an empty packet that is no continuation
                my(1, b"\x00\x00"),                            # an OK cut short
                my(1, b"\x00"),
                my(1, b"\x01\x02"),                            # a column count with bytes after it
                my(1, b"\x01") + my(2, COLUMN) + my(3, b"\x011"),      # no EOF after the definitions
                my(1, b"\x00" + b"x" * 5000)):                 # a first packet too big to be read whole
        forwarded, events, held = drive(my_walker(impl), [bad])
        assert events and events[-1][0] == rc.MALFORMED, (bad, events)
        assert forwarded + held == bad


@pytest.mark.timeout(30)
@pytest.mark.parametrize("impl", IMPLS)
def test_mysql_requests_open_commands(impl):
    walker, _ = impl
    client = walker(**MY, request="mysql", count=b"\x03\x0e", stop=bytes(k for k in range(256) if k not in (3, 14)))
    query = my(0, b"\x03select 1")
    ping = my(0, b"\x0e")
    assert client.feed(query + ping) == (len(query + ping), rc.NONE, -1)
    assert client.take_count() == 2
    assert client.feed(my(0, b"\x01")) == (0, rc.HANDOVER, 1)              # COM_QUIT
    assert client.feed(my(3, b"\x03select 1")) == (0, rc.MALFORMED, 3)     # out of sequence
    assert client.feed(my(0, b"")) == (0, rc.MALFORMED, -1)                 # empty
    with pytest.raises(ValueError):
        walker(**rc.FRAMINGS["postgres"], response="mysql")
    with pytest.raises(ValueError):
        walker(**MY, response="tds")


def my_responses(deprecate_eof: bool):
    row = st.one_of(st.binary(max_size=20), st.builds(lambda b: b"\xfe" + b, st.binary(max_size=14)),
                    st.just(b"\xfb"))
    status = st.sampled_from([AUTOCOMMIT, AUTOCOMMIT | IN_TRANS, AUTOCOMMIT | MORE_RESULTS, 0x4000, 0xFFFF])
    return st.one_of(
        st.builds(lambda s: my_ok(1, s), status),
        st.just(MY_ERR),
        st.builds(lambda rows, s, n: my_result(rows, deprecate_eof, s, n), st.lists(row, max_size=4), status,
                  st.integers(min_value=1, max_value=3)),
        st.builds(lambda p: my(1, p), st.binary(max_size=12)),           # whatever a first packet might be
        st.binary(min_size=1, max_size=12),                              # garbage
    )


@pytest.mark.timeout(120)
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(batch_frames, max_size=14), st.lists(st.integers(min_value=1, max_value=64), max_size=20),
       st.integers(min_value=5, max_value=160))
def test_c_and_python_batch_walkers_agree(parts, cuts, max_screen):
    if _relay is None:
        pytest.skip(NOT_BUILT)
    stream = b"".join(parts)
    chunks, pos = [], 0
    for size in cuts:
        chunks.append(stream[pos:pos + size])
        pos += size
    chunks.append(stream[pos:])
    results = []
    for impl in ((_relay.Walker, _relay.Relay), (rc.PyWalker, rc.PyRelay)):
        client, _ = batch_walkers(impl, max_screen=max_screen)
        results.append((drive(client, chunks), client.take_count(), client.remaining))
    assert results[0] == results[1]


batch_client_frames = st.one_of(client_frames, st.just(BATCH), st.just(PARSE + BIND + EXECUTE),
                                 st.just(SYNC), st.just(FLUSH), st.just(BIND + EXECUTE + SYNC),
                                 st.just(PARSE), st.just(BIND + DESCRIBE_PORTAL))


@pytest.mark.timeout(120)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(st.tuples(st.just("client"), batch_client_frames),
                          st.tuples(st.sampled_from(["first", "second"]), server_frames)), max_size=10))
def test_c_and_python_relays_agree_with_batches(steps):
    if _relay is None:
        pytest.skip(NOT_BUILT)
    assert (run_scenario((_relay.Walker, _relay.Relay), steps, batches=True)
            == run_scenario((rc.PyWalker, rc.PyRelay), steps, batches=True))


@pytest.mark.timeout(120)
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data(), st.booleans(), st.lists(st.integers(min_value=1, max_value=64), max_size=20),
       st.integers(min_value=5, max_value=100))
def test_c_and_python_mysql_walkers_agree(data, deprecate_eof, cuts, max_boundary):
    if _relay is None:
        pytest.skip(NOT_BUILT)
    parts = data.draw(st.lists(my_responses(deprecate_eof), max_size=8))
    stream = b"".join(parts)
    chunks, pos = [], 0
    for size in cuts:
        chunks.append(stream[pos:pos + size])
        pos += size
    chunks.append(stream[pos:])
    results = []
    for walker in (_relay.Walker, rc.PyWalker):
        server = walker(**MY, response="mysql", deprecate_eof=deprecate_eof, max_boundary=max_boundary)
        client = walker(**MY, request="mysql", count=b"\x03\x0e", screen=b"\x03\x0e", words=(b"set", b"@"),
                        max_screen=max_boundary + 4, stop=bytes(k for k in range(256) if k not in (3, 14)))
        results.append((drive(server, chunks), server.remaining, drive(client, chunks), client.take_count(),
                        client.remaining))
    assert results[0] == results[1]


MY_CLIENT_RULE = dict(MY, request="mysql", count=b"\x03\x0e", screen=b"\x03\x0e", words=(b"set", b"begin"),
                      max_screen=64, stop=bytes(k for k in range(256) if k not in (3, 14)))
my_client_frames = st.one_of(st.just(my(0, b"\x03select 1")), st.just(my(0, b"\x0e")), st.just(my(0, b"\x01")),
                             st.just(my(0, b"\x03SET x = 1")), st.just(my(0, b"\x03select '" + b"z" * 70 + b"'")),
                             st.just(my(2, b"\x03select 1")), st.binary(min_size=1, max_size=8))
my_server_frames = st.one_of(st.just(my_ok(1)), st.just(my_ok(1, AUTOCOMMIT | IN_TRANS)), st.just(MY_ERR),
                             st.just(my_ok(1, affected=b"\1", insert_id=b"\x05")),
                             st.just(my_result([b"\x011", b"\xfe" * 12], False)),
                             st.just(my_result([b"\x012"], False, AUTOCOMMIT | MORE_RESULTS)),
                             st.just(my(1, b"\xfbfile")), st.binary(min_size=1, max_size=8))


@pytest.mark.timeout(120)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(st.tuples(st.just("client"), my_client_frames),
                          st.tuples(st.sampled_from(["first", "second"]), my_server_frames)), max_size=10),
       st.booleans())
def test_c_and_python_relays_agree_with_the_mysql_rules(steps, deprecate_eof):
    assert_cores_agree(steps, mysql=(MY_CLIENT_RULE, dict(MY, response="mysql", deprecate_eof=deprecate_eof)))


@pytest.mark.timeout(30)
@pytest.mark.parametrize("impl", IMPLS)
def test_a_mysql_relay_lends_a_backend_per_answer(impl):
    rules = (MY_CLIENT_RULE, dict(MY, response="mysql"))
    query, answer = my(0, b"\x03select 1"), my_result([b"\x011"], False)
    # the idle backends are a stack: the one added last ("second") serves, and is back on top after each answer
    trace = run_scenario(impl, [("client", query), ("second", answer), ("client", query), ("second", answer),
                                ("client", my(0, b"\x01"))], mysql=rules)
    assert ("bytes", "client", answer) in trace
    assert trace[-1] == ("stats", 0, 2, 0, 2)       # two answers ended, both backends idle again
    assert ("event", rc.HANDOVER, "client", None, my(0, b"\x01"), 1) in trace     # COM_QUIT goes to the caller
# -- relay logins: keyed greetings (multiproxy.relay_logins)

def _key_data(pid: int, secret: int) -> bytes:
    return pg(b"K", struct.pack("!II", pid, secret))


@pytest.mark.timeout(20)
@pytest.mark.parametrize("impl", IMPLS)
def test_a_keyed_greeting_writes_a_fresh_key_and_hands_the_client_over(impl, listener):
    relay = impl[1](*walkers(impl))
    assert relay.listen(listener.fileno(), refuse=SSL_REQUEST, refusal=b"N", hangup=b"X") == []
    prefix = pg(b"R", b"\0\0\0\0") + pg(b"S", b"server_version\x0017\0")
    reply = prefix + _key_data(0, 0) + READY_IDLE
    relay.cache_greeting(startup_packet(b"alice"), reply, key_at=len(prefix) + 5, template=7)
    keys = struct.pack("!II", 1, 11) + struct.pack("!II", 2, 22)
    assert relay.add_keys(keys) == 2
    with pytest.raises(ValueError):
        relay.add_keys(b"123")
    with pytest.raises(ValueError):
        relay.cache_greeting(b"x" * 8, b"short", key_at=0)
    first = connect(listener)
    first.sendall(SSL_REQUEST)
    serve_until(relay, lambda _: _readable(first))
    assert recv_exactly(first, 1) == b"N"
    first.sendall(startup_packet(b"alice") + QUERY)
    events = serve_until(relay, lambda events: events)
    assert [(kind, peer, greeted_parts(data, socket.AF_INET), arg) for kind, _, peer, data, arg in events] == \
        [(rc.GREETED, -1, (keys[:8], first.getsockname(), QUERY), 7)]   # its key, its address, what it sent next
    assert recv_exactly(first, len(reply)) == prefix + _key_data(1, 11) + READY_IDLE
    handed = [socket.socket(fileno=events[0][1])]                # the caller's now: the relay forgot it
    stats = relay.stats()
    assert (stats["logins"], stats["keys"], stats["connections"]) == (1, 1, 1)
    relay.set_login_budget(0)                                     # no budget: the engine's, as an unknown startup
    second = connect(listener)
    second.sendall(startup_packet(b"alice"))
    events = serve_until(relay, lambda events: events)
    assert [(kind, data) for kind, _, _, data, _ in events] == [(rc.STARTUP, startup_packet(b"alice"))]
    handed.append(socket.socket(fileno=events[0][1]))
    relay.set_login_budget(5)
    third = connect(listener)
    third.sendall(startup_packet(b"alice"))
    events = serve_until(relay, lambda events: events)
    assert [(kind, greeted_parts(data, socket.AF_INET), arg) for kind, _, _, data, arg in events] == \
        [(rc.GREETED, (keys[8:], third.getsockname(), b""), 7)]
    assert recv_exactly(third, len(reply)) == prefix + _key_data(2, 22) + READY_IDLE
    handed.append(socket.socket(fileno=events[0][1]))
    fourth = connect(listener)                                    # no key left: the engine's
    fourth.sendall(startup_packet(b"alice"))
    events = serve_until(relay, lambda events: events)
    assert [kind for kind, *_ in events] == [rc.STARTUP]
    handed.append(socket.socket(fileno=events[0][1]))
    relay.add_keys(struct.pack("!II", 3, 33))
    relay.forget_greetings()                                      # the template is gone: the engine's again
    fifth = connect(listener)
    fifth.sendall(startup_packet(b"alice"))
    events = serve_until(relay, lambda events: events)
    assert [kind for kind, *_ in events] == [rc.STARTUP]
    handed.append(socket.socket(fileno=events[0][1]))
    assert relay.stats()["keys"] == 1 and relay.stats()["logins"] == 2
    relay.close()
    for sock in [first, second, third, fourth, fifth] + handed:
        sock.close()


@pytest.mark.timeout(20)
@pytest.mark.parametrize("impl", IMPLS)
def test_a_kept_greeted_client_is_served_at_once_and_closed_by_the_relay_until_disowned(impl, listener, pairs):
    """A greeting with keep (a login door inside its lane): the greeted client stays in the relay (the event tells its
    key and its address); what it sent after its startup packet is relayed; its Terminate closes it in the relay, with
    a GONE event, until the caller disowns it: then its Terminate is the caller's event and its socket the caller's."""
    relay = impl[1](*walkers(impl), hold_stops=True)
    backend = pairs()
    relay.add_backend(backend.fd())
    relay.listen(listener.fileno(), refuse=SSL_REQUEST, refusal=b"N", hangup=b"X")
    prefix = pg(b"R", b"\0\0\0\0")
    reply = prefix + _key_data(0, 0) + READY_IDLE
    relay.cache_greeting(startup_packet(b"alice"), reply, key_at=len(prefix) + 5, template=3, keep=True)
    relay.add_keys(struct.pack("!II", 4, 44) + struct.pack("!II", 5, 55))
    client = connect(listener)
    client.sendall(startup_packet(b"alice") + QUERY)
    events = serve_until(relay, lambda events: events)
    assert [(kind, peer, greeted_parts(data, socket.AF_INET), arg) for kind, _, peer, data, arg in events] == \
        [(rc.GREETED, -1, (struct.pack("!II", 4, 44), client.getsockname(), b""), 3)]   # its key, its address
    fd = events[0][1]
    serve_until(relay, lambda _: _readable(backend.outside))
    assert backend.read(len(QUERY)) == QUERY                      # relayed with no add_client
    assert recv_exactly(client, len(reply)) == prefix + _key_data(4, 44) + READY_IDLE
    backend.outside.sendall(RESULT + READY_IDLE)
    serve_until(relay, lambda _: relay.stats()["transactions"] == 1)
    assert recv_exactly(client, len(RESULT) + 6) == RESULT + READY_IDLE
    assert relay.activity(fd)[0] == 1
    stats = relay.stats()
    assert (stats["logins"], stats["greeted"], stats["connections"], stats["idle"]) == (1, 1, 3, 1)  # + listener
    client.sendall(TERMINATE)                                     # closed by the relay, which says so
    assert serve_until(relay, lambda events: events) == [(rc.GONE, fd, -1, b"", 0)]
    assert client.recv(10) == b"" and relay.stats()["connections"] == 2
    assert not relay.disown(fd)                                   # gone: nothing to disown
    second = connect(listener)
    second.sendall(startup_packet(b"alice"))
    events = serve_until(relay, lambda events: events)
    assert [kind for kind, *_ in events] == [rc.GREETED]
    fd = events[0][1]
    assert recv_exactly(second, len(reply)) == prefix + _key_data(5, 55) + READY_IDLE
    assert relay.disown(fd)                                       # the caller's from now on
    second.sendall(TERMINATE)
    assert serve_until(relay, lambda events: events) == [(rc.HANDOVER, fd, -1, TERMINATE, ord("X"))]
    os.close(fd)
    assert second.recv(10) == b""
    relay.close()
    client.close()
    second.close()


@pytest.mark.timeout(20)
@pytest.mark.parametrize("impl", IMPLS)
def test_unlisten_gives_the_listener_and_the_clients_still_starting_back(impl, listener):
    relay = impl[1](*walkers(impl))
    relay.listen(listener.fileno(), refuse=SSL_REQUEST, refusal=b"N", hangup=b"X")
    half = connect(listener)
    half.sendall(startup_packet(b"alice")[:6])                    # half a startup packet
    serve_until(relay, lambda _: relay.stats()["accepted"] == 1)
    for _ in range(10):                                           # its 6 bytes read, and no event: it waits for more
        select_wait(relay)
        assert relay.run_ready() == []
    events = relay.unlisten()
    assert [(kind, data) for kind, _, _, data, _ in events] == [(rc.STARTUP, startup_packet(b"alice")[:6])]
    taken = socket.socket(fileno=events[0][1])
    assert relay.stats()["connections"] == 0
    late = connect(listener)                                      # the listening socket is open, not accepted by it
    assert relay.run_ready() == [] and relay.stats()["accepted"] == 1
    conn, _ = listener.accept()
    relay.close()
    for sock in (half, taken, late, conn):
        sock.close()


@pytest.mark.timeout(20)
@pytest.mark.parametrize("impl", IMPLS)
def test_take_starting_gives_the_clients_that_outstayed_a_round(impl, listener):
    relay = impl[1](*walkers(impl))
    relay.listen(listener.fileno(), refuse=SSL_REQUEST, refusal=b"N")
    slow = connect(listener)
    serve_until(relay, lambda _: relay.stats()["accepted"] == 1)
    assert relay.take_starting(True) == []                        # marked
    late = connect(listener)
    serve_until(relay, lambda _: relay.stats()["accepted"] == 2)
    events = relay.take_starting(True)                            # only the one marked before
    assert [(kind, data) for kind, _, _, data, _ in events] == [(rc.STARTUP, b"")]
    first = socket.socket(fileno=events[0][1])
    events = relay.take_starting()                                # every one
    assert [kind for kind, *_ in events] == [rc.STARTUP]
    second = socket.socket(fileno=events[0][1])
    assert relay.stats()["connections"] == 1                      # the listener alone
    relay.close()
    for sock in (slow, late, first, second):
        sock.close()


# -- TDS: the server's responses (response="tds") and the client's batches (request="tds")

TDS = rc.FRAMINGS["tds"]
ALL_HEADERS = struct.pack("<IIH", 22, 18, 2) + bytes(8) + struct.pack("<I", 1)     # a transaction descriptor header


def tds(kind: int, status: int, payload: bytes, spid: int = 0, packet_id: int = 1) -> bytes:
    return struct.pack(">BBHHBB", kind, status, len(payload) + 8, spid, packet_id, 0) + payload


def tds_batch(sql: str, status: int = 1, headers: bytes = ALL_HEADERS) -> bytes:
    return tds(0x01, status, headers + sql.encode("utf-16-le"))


TDS_WORDS = tuple(w.encode("utf-16-le") for w in ("set", "begin", "exec", "#"))
TDS_CLIENT_RULE = dict(TDS, request="tds", count=b"\x01", screen=b"\x01", words=TDS_WORDS, max_screen=4096,
                       stop=bytes(k for k in range(256) if k != 1))
TDS_SERVER_RULE = dict(TDS, response="tds", max_boundary=4096)
TDS_DONE = bytes([0xFD, 0x10, 0, 0xC1, 0]) + struct.pack("<Q", 1)


def tds_walkers(impl, max_boundary=4096):
    walker = impl[0]
    return walker(**TDS_CLIENT_RULE), walker(**dict(TDS_SERVER_RULE, max_boundary=max_boundary))


@pytest.mark.parametrize("impl", IMPLS)
def test_tds_a_response_ends_at_its_eom_packet_split_anywhere(impl):
    response = tds(4, 0, b"\x81" + bytes(30), spid=55) + tds(4, 0, bytes(40), packet_id=2) + tds(4, 1, TDS_DONE,
                                                                                                   packet_id=3)
    for cut in range(1, len(response)):
        _, server = tds_walkers(impl)
        forwarded, events, held = drive(server, [response[:cut], response[cut:]])
        assert (forwarded, events, held) == (response, [(rc.BOUNDARY, ord("I"), len(response))], b"")
    _, server = tds_walkers(impl)
    assert server.feed(response + response[:5]) == (len(response), rc.BOUNDARY, ord("I"))


@pytest.mark.parametrize("impl", IMPLS)
def test_tds_malformed_responses_are_events(impl):
    _, server = tds_walkers(impl, max_boundary=64)
    assert server.feed(tds(1, 1, b"x")) == (0, rc.MALFORMED, 1)                     # not a tabular result
    assert server.feed(b"\x04\x01\x00\x03" + bytes(4)) == (0, rc.MALFORMED, 4)      # shorter than its header
    assert server.feed(tds(4, 1, bytes(100))) == (0, rc.MALFORMED, 4)               # an EOM packet over max_boundary
    assert server.feed(tds(4, 0, bytes(100))) == (108, rc.NONE, -1)                 # a middle packet streams


@pytest.mark.parametrize("impl", IMPLS)
def test_tds_single_packet_select_batches_are_relayed_and_counted(impl):
    client, _ = tds_walkers(impl)
    for sql in ("SELECT 1", "  \r\n\tselect * from t", "Select(1)", "SELECT", "select\n1; insert into t values (2)"):
        batch = tds_batch(sql)
        assert client.feed(batch) == (len(batch), rc.NONE, -1), sql
        assert client.take_count() == 1
    batch = tds_batch("SELECT 1")
    for cut in range(1, len(batch)):
        client, _ = tds_walkers(impl)
        assert drive(client, [batch[:cut], batch[cut:]]) == (batch, [], b"")
        assert client.take_count() == 1


@pytest.mark.parametrize("impl", IMPLS)
def test_tds_batches_the_python_path_must_see_stop(impl):
    stops = [
        tds_batch("SELECT 1", status=0),                    # the first packet of several
        tds_batch("SELECT 1", status=0x09),                 # RESETCONNECTION
        tds_batch("SELECT 1", status=0x11),                 # RESETCONNECTION SKIPTRAN
        tds_batch("SELECT 1", status=0x03),                 # IGNORE
        tds_batch("INSERT INTO t VALUES (1)"),              # not SELECT first
        tds_batch("myproc"),                                # a bare procedure name runs it
        tds_batch("selectx"), tds_batch("select_1"), tds_batch("select@x"), tds_batch("/* c */ SELECT 1"),
        tds_batch("SELECT 1; BEGIN TRAN"), tds_batch("select 1; sEt NOCOUNT ON"), tds_batch("SELECT 1 INTO #t"),
        tds_batch("SELECT 1; EXEC p"),
        tds_batch("SELECT 1", headers=b"\x02\0\0\0"),       # ALL_HEADERS shorter than its own length
        tds_batch("SELECT 1", headers=b"\xff\0\0\0"),       # ALL_HEADERS longer than the packet
        tds(0x01, 1, b"\x04\0"),                            # too short for ALL_HEADERS
        tds(0x03, 1, b"rpc"), tds(0x06, 1, b""), tds(0x0E, 1, b"tm"), tds(0x07, 1, b"bulk"),
    ]
    for packet in stops:
        client, _ = tds_walkers(impl)
        assert client.feed(packet) == (0, rc.HANDOVER, packet[0]), packet
        assert client.take_count() == 0
    # a screen word in UTF-16LE only: the same letters in another alignment or as ASCII do not stop
    client, _ = tds_walkers(impl)
    ascii_set = tds(0x01, 1, ALL_HEADERS + "SELECT '".encode("utf-16-le") + b"set" + "'".encode("utf-16-le"))
    assert client.feed(ascii_set) == (len(ascii_set), rc.NONE, -1)
    client, _ = tds_walkers(impl)
    assert client.feed(tds_batch("SELECT 1") + tds(0x06, 1, b"")) == (len(tds_batch("SELECT 1")), rc.HANDOVER, 6)


@pytest.mark.parametrize("impl", IMPLS)
def test_tds_rules_need_the_tds_framing(impl):
    walker = impl[0]
    with pytest.raises(ValueError):
        walker(**rc.FRAMINGS["postgres"], request="tds")
    with pytest.raises(ValueError):
        walker(**TDS, response="tds", max_boundary=7)
    with pytest.raises(ValueError):
        walker(**TDS, response="sybase")


def tds_requests():
    return st.one_of(
        st.builds(tds_batch, st.sampled_from(["SELECT 1", " select x", "SELECT 1; SET x", "insert", "selectx",
                                              "SELECT @@VERSION", "select 1 into #t"]),
                  st.sampled_from([0, 1, 1, 3, 9]), st.sampled_from([ALL_HEADERS, b"\x04\0\0\0", b"\x09\0\0\0"])),
        st.builds(lambda k, p: tds(k, 1, p), st.sampled_from([1, 3, 6, 14]), st.binary(max_size=30)),
        st.binary(min_size=1, max_size=12),
    )


def tds_responses():
    return st.one_of(
        st.builds(lambda n, body: tds(4, n, body), st.sampled_from([0, 1, 1, 0x11]), st.binary(max_size=40)),
        st.builds(lambda k, s: tds(k, s, b"x"), st.integers(min_value=0, max_value=255), st.integers(0, 255)),
        st.binary(min_size=1, max_size=12),
    )


@pytest.mark.timeout(120)
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(tds_requests(), max_size=8), st.lists(tds_responses(), max_size=8),
       st.lists(st.integers(min_value=1, max_value=64), max_size=20), st.integers(min_value=8, max_value=100))
def test_c_and_python_tds_walkers_agree(requests, responses, cuts, max_boundary):
    if _relay is None:
        pytest.skip(NOT_BUILT)
    results = []
    for stream, make in ((b"".join(requests), "client"), (b"".join(responses), "server")):
        chunks, pos = [], 0
        for size in cuts:
            chunks.append(stream[pos:pos + size])
            pos += size
        chunks.append(stream[pos:])
        pair = []
        for walker in (_relay.Walker, rc.PyWalker):
            client, server = tds_walkers((walker, None), max_boundary=max_boundary)
            w = client if make == "client" else server
            pair.append((drive(w, chunks), w.remaining, w.take_count()))
        results.append(pair)
    for c_result, py_result in results:
        assert c_result == py_result


tds_client_frames = st.one_of(st.just(tds_batch("SELECT 1")), st.just(tds_batch("SELECT 1", status=0)),
                              st.just(tds_batch("BEGIN TRAN")), st.just(tds(6, 1, b"")), st.just(tds(3, 1, b"rpc")),
                              st.binary(min_size=1, max_size=8))
tds_server_frames = st.one_of(st.just(tds(4, 1, TDS_DONE)), st.just(tds(4, 0, bytes(20))),
                              st.just(tds(4, 1, bytes(5000))), st.just(tds(1, 1, b"x")),
                              st.binary(min_size=1, max_size=8))


@pytest.mark.timeout(120)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(st.tuples(st.just("client"), tds_client_frames),
                          st.tuples(st.sampled_from(["first", "second"]), tds_server_frames)), max_size=10))
def test_c_and_python_relays_agree_with_the_tds_rules(steps):
    if _relay is None:
        pytest.skip(NOT_BUILT)
    rules = (TDS_CLIENT_RULE, TDS_SERVER_RULE)
    assert (run_scenario((_relay.Walker, _relay.Relay), steps, mysql=rules)
            == run_scenario((rc.PyWalker, rc.PyRelay), steps, mysql=rules))


@pytest.mark.timeout(30)
@pytest.mark.parametrize("impl", IMPLS)
def test_a_tds_relay_lends_a_backend_per_batch_and_holds_an_attention(impl):
    rules = (TDS_CLIENT_RULE, TDS_SERVER_RULE)
    query = tds_batch("SELECT 1")
    answer = tds(4, 0, bytes(20)) + tds(4, 1, TDS_DONE, packet_id=2)
    attention = tds(6, 1, b"")
    trace = run_scenario(impl, [("client", query), ("second", answer), ("client", query + attention),
                                ("second", answer)], mysql=rules)
    assert trace.count(("bytes", "client", answer)) == 2
    # the Attention sent behind a relayed batch waits for its answer's end, then goes to the caller alone
    assert ("event", rc.HANDOVER, "client", None, attention, 6) in trace
    assert trace[-1] == ("stats", 0, 2, 0, 2)


# -- relay logins with SCRAM-SHA-256: the relay verifies the exchange from the user's stored keys

def _scram_keys(password: str, salt: bytes = b"0123456789abcdef", iterations: int = 4096):
    from multiproxy.auth import parse_scram_verifier, scram_sha_256_verifier
    verifier = parse_scram_verifier(scram_sha_256_verifier(password, salt, iterations))
    tail = b",s=" + base64.b64encode(verifier.salt) + b",i=%d" % verifier.iterations
    return tail, verifier.stored_key, verifier.server_key


def _read_message(sock) -> tuple[bytes, bytes]:
    head = recv_exactly(sock, 5)
    return head[:1], recv_exactly(sock, struct.unpack("!I", head[1:])[0] - 4)


def _sasl_initial(client_first: bytes, mechanism: bytes = b"SCRAM-SHA-256") -> bytes:
    return pg(b"p", mechanism + b"\0" + struct.pack("!I", len(client_first)) + client_first)


def _scram_relay(impl, listener, password="pencil", keep=False):
    relay = impl[1](*walkers(impl))
    assert relay.listen(listener.fileno(), refuse=SSL_REQUEST, refusal=b"N", hangup=b"X") == []
    prefix = pg(b"R", b"\0\0\0\0") + pg(b"S", b"server_version\x0017\0")
    reply = prefix + _key_data(0, 0) + READY_IDLE
    relay.cache_greeting(startup_packet(b"alice"), reply, key_at=len(prefix) + 5, template=5, keep=keep,
                         scram=_scram_keys(password))
    relay.add_keys(struct.pack("!II", 1, 11) + struct.pack("!II", 2, 22))
    return relay, reply


def _scram_until_final(relay, sock, password):
    """A SCRAM exchange up to the client's SASLResponse (the ScramClient the proxy uses against servers)."""
    from engines.postgres.auth import ScramClient
    client = ScramClient("", password)
    sock.sendall(startup_packet(b"alice"))
    serve_until(relay, lambda _: _readable(sock))
    assert _read_message(sock) == (b"R", struct.pack("!I", 10) + b"SCRAM-SHA-256\0\0")
    initial = _sasl_initial(client.client_first())
    sock.sendall(initial)
    serve_until(relay, lambda _: _readable(sock))
    kind, body = _read_message(sock)
    assert kind == b"R" and body[:4] == struct.pack("!I", 11)
    server_first = body[4:]
    assert server_first.endswith(b",s=" + base64.b64encode(b"0123456789abcdef") + b",i=4096")
    final = pg(b"p", client.handle_server_first(server_first))
    sock.sendall(final)
    return client, initial, final, server_first


@pytest.mark.timeout(20)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("keep", [False, True])
def test_the_relay_verifies_a_scram_exchange_then_greets_with_a_key(impl, listener, keep):
    relay, reply = _scram_relay(impl, listener, keep=keep)
    sock = connect(listener)
    client, *_ = _scram_until_final(relay, sock, "pencil")
    events = serve_until(relay, lambda events: events)
    kind, body = _read_message(sock)
    assert kind == b"R" and body[:4] == struct.pack("!I", 12)
    client.verify_server_final(body[4:])            # the relay proved it holds the server key
    assert client.authenticated
    greeting = recv_exactly(sock, len(reply))
    assert greeting == reply.replace(_key_data(0, 0), _key_data(1, 11))
    assert [(kind, greeted_parts(data, socket.AF_INET), arg) for kind, _, _, data, arg in events] == \
        [(rc.GREETED, (struct.pack("!II", 1, 11), sock.getsockname(), b""), 5)]
    assert relay.stats()["greeted"] == 1
    if keep:                                        # a client of the relay now: its goodbye is a GONE event
        sock.sendall(TERMINATE)
        assert [kind for kind, *_ in serve_until(relay, lambda events: events)] == [rc.GONE]
    else:
        os.close(events[0][1])
    relay.close()
    sock.close()


def _answered(event):
    kind, fd, peer, data, arg = event
    assert kind == rc.ANSWERED and peer == -1
    nonce = data[1:1 + data[0]]
    return fd, nonce, data[1 + data[0]:], arg


@pytest.mark.timeout(20)
@pytest.mark.parametrize("impl", IMPLS)
def test_a_scram_proof_that_does_not_hold_goes_to_the_engine_where_the_relay_stands(impl, listener):
    relay, _ = _scram_relay(impl, listener)
    sock = connect(listener)
    _, initial, final, server_first = _scram_until_final(relay, sock, "wrong password")
    events = serve_until(relay, lambda events: events)
    fd, nonce, data, answered = _answered(events[0])
    assert len(events) == 1 and len(nonce) == 24
    assert server_first.startswith(b"r=") and nonce in server_first      # the relay's part of the nonce
    assert data == startup_packet(b"alice") + initial + final            # every byte, the startup packet first
    assert answered == len(startup_packet(b"alice") + initial)           # answered: all but the SASLResponse
    assert not _readable(sock)                                           # nothing said: the engine answers
    os.close(fd)
    relay.close()
    sock.close()


@pytest.mark.timeout(20)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("initial", [
    _sasl_initial(b"p=tls-server-end-point,,n=,r=abc"),                 # channel binding
    _sasl_initial(b"n,,n=,r=abc", b"SCRAM-SHA-256-PLUS"),                # another mechanism
    _sasl_initial(b"n,,n=,r=abc,x=extension"),                           # an extension
    _sasl_initial(b"n,a=admin,n=,r=abc"),                                # an authorization identity
    _sasl_initial("n,,n=é,r=abc".encode()),                              # a name the engine decodes
    _sasl_initial(b"n,,n=a=41,r=abc"),                                   # a bad escape
    pg(b"p", b"SCRAM-SHA-256\0" + struct.pack("!I", 99) + b"n,,n=,r=abc"),   # a wrong length
    pg(b"Q", b"select 1\0"),                                             # not a SASL message
])
def test_what_the_relay_does_not_take_as_postgresql_would_goes_to_the_engine(impl, listener, initial):
    relay, _ = _scram_relay(impl, listener)
    sock = connect(listener)
    sock.sendall(startup_packet(b"alice"))
    serve_until(relay, lambda _: _readable(sock))
    _read_message(sock)
    sock.sendall(initial)
    fd, nonce, data, answered = _answered(serve_until(relay, lambda events: events)[0])
    assert (data, answered) == (startup_packet(b"alice") + initial, len(startup_packet(b"alice")))
    os.close(fd)
    relay.close()
    sock.close()


@pytest.mark.timeout(20)
@pytest.mark.parametrize("impl", IMPLS)
def test_a_scram_login_under_way_goes_to_the_engine_when_taken_or_forgotten(impl, listener):
    relay, _ = _scram_relay(impl, listener)
    first = connect(listener)
    first.sendall(startup_packet(b"alice"))
    serve_until(relay, lambda _: _readable(first))
    _read_message(first)
    first.sendall(b"p\0")                                                # half a header
    serve_until(relay, lambda _: relay.stats()["accepted"] == 1)
    fd, _, data, answered = _answered(relay.take_starting()[0])          # aged, or the door closes
    assert (data, answered) == (startup_packet(b"alice") + b"p\0", len(startup_packet(b"alice")))
    os.close(fd)
    second = connect(listener)
    _, initial, final, _ = _scram_until_final(relay, second, "pencil")
    relay.forget_greetings()                                             # the template went stale meanwhile
    fd, _, data, answered = _answered(serve_until(relay, lambda events: events)[0])
    assert (data, answered) == (startup_packet(b"alice") + initial + final, len(startup_packet(b"alice") + initial))
    assert relay.stats()["greeted"] == 0
    os.close(fd)
    relay.close()
    first.close()
    second.close()


@pytest.mark.parametrize("impl", IMPLS)
def test_a_scram_greeting_needs_a_key_slot_and_its_keys(impl):
    relay = impl[1](*walkers(impl))
    tail, stored, server = _scram_keys("pencil")
    for bad in [dict(scram=(tail, stored, server)), dict(key_at=0, scram=(tail, stored[:31], server)),
                dict(key_at=0, scram=(b"x" * 161, stored, server)), dict(key_at=0, scram=(tail, stored))]:
        with pytest.raises(ValueError):
            relay.cache_greeting(startup_packet(b"alice"), bytes(20), **bad)
    relay.close()


def _quiet_greetings(relay, listener, keys: int) -> bytes:
    """The relay listens and greets alice's startup with a kept, keyed greeting (template 3), quietly, with `keys`
    keys (n, 11 n), n from 1; returns the greeting as cached (its key zeroed)."""
    relay.listen(listener.fileno(), refuse=SSL_REQUEST, refusal=b"N", hangup=b"X")
    prefix = pg(b"R", b"\0\0\0\0")
    reply = prefix + _key_data(0, 0) + READY_IDLE
    relay.cache_greeting(startup_packet(b"alice"), reply, key_at=len(prefix) + 5, template=3, keep=True)
    relay.add_keys(b"".join(struct.pack("!II", n, n * 11) for n in range(1, keys + 1)))
    relay.set_quiet(True)
    return reply


@pytest.mark.timeout(20)
@pytest.mark.parametrize("impl", IMPLS)
def test_quiet_clients_are_counted_and_reported_only_when_needed(impl, listener, pairs):
    """set_quiet(True): a client kept at a keyed greeting costs no event. Its transactions and its goodbye are the
    relay's alone (quiet_counts counts it in and out); it is reported (a QUIET event, GREETED's data) before any event
    of it, and by take_quiet()."""
    relay = impl[1](*walkers(impl, client_stop=b"XP"), hold_stops=True)
    backend = pairs()
    relay.add_backend(backend.fd())
    reply = _quiet_greetings(relay, listener, keys=5)
    assert relay.quiet_counts() == (0, 0)
    first = connect(listener)                                     # a transaction, then its goodbye: no event at all
    first.sendall(startup_packet(b"alice") + QUERY)
    serve_until(relay, lambda _: _readable(backend.outside))
    assert backend.read(len(QUERY)) == QUERY
    backend.outside.sendall(RESULT + READY_IDLE)
    serve_until(relay, lambda _: relay.stats()["transactions"] == 1)
    assert recv_exactly(first, len(reply)) == reply.replace(_key_data(0, 0), _key_data(1, 11))
    assert recv_exactly(first, len(RESULT) + 6) == RESULT + READY_IDLE
    assert relay.stats()["quiet"] == 1
    first.sendall(TERMINATE)
    assert serve_until(relay, lambda _: relay.stats()["connections"] == 2) == []
    assert first.recv(10) == b"" and relay.quiet_counts() == (1, 1) and relay.quiet_counts() == (0, 0)
    second, third = connect(listener), connect(listener)          # reported by take_quiet
    second.sendall(startup_packet(b"alice"))
    third.sendall(startup_packet(b"alice"))
    assert serve_until(relay, lambda _: relay.stats()["quiet"] == 2) == []
    events = relay.take_quiet()
    parts = [(kind, greeted_parts(data, socket.AF_INET), arg) for kind, _, _, data, arg in events]
    assert sorted((kind, (key, address), arg) for kind, (key, address, _), arg in parts) == sorted(
        [(rc.QUIET, (struct.pack("!II", 2, 22), second.getsockname()), 3),
         (rc.QUIET, (struct.pack("!II", 3, 33), third.getsockname()), 3)])
    for _, (_, _, greeted_at), _ in parts:                        # when the relay greeted it: a C double
        assert abs(struct.unpack("d", greeted_at)[0] - time.time()) < 5
    assert relay.stats()["quiet"] == 0 and relay.quiet_counts() == (2, 0)
    with pytest.raises(ValueError):
        relay.report_key(b"short")
    assert relay.report_key(struct.pack("!II", 2, 22)) == []      # reported already: nothing
    second.sendall(TERMINATE)                                     # reported: its goodbye is a GONE event again
    assert [kind for kind, *_ in serve_until(relay, lambda events: events)] == [rc.GONE]
    fourth, fifth = connect(listener), connect(listener)          # reported by its key alone (a cancel's)
    fourth.sendall(startup_packet(b"alice"))
    serve_until(relay, lambda _: relay.stats()["quiet"] == 1)
    fifth.sendall(startup_packet(b"alice"))
    serve_until(relay, lambda _: relay.stats()["quiet"] == 2)
    assert relay.report_key(struct.pack("!II", 9, 99)) == []      # no such key
    events = relay.report_key(struct.pack("!II", 5, 55))
    assert [(kind, greeted_parts(data, socket.AF_INET)[:2], arg) for kind, _, _, data, arg in events] == \
        [(rc.QUIET, (struct.pack("!II", 5, 55), fifth.getsockname()), 3)]
    assert relay.stats()["quiet"] == 1                            # fourth is still quiet
    fourth.sendall(pg(b"P", b"named\0select 1\0\0\0"))
    events = serve_until(relay, lambda events: events)
    assert [(kind, arg) for kind, _, _, _, arg in events] == [(rc.QUIET, 3), (rc.HANDOVER, ord("P"))]
    assert events[0][1] == events[1][1] and greeted_parts(events[0][3], socket.AF_INET)[0] == struct.pack("!II", 4, 44)
    assert relay.quiet_counts() == (2, 0)
    os.close(events[1][1])
    relay.close()                                                 # third, fifth: known, so not closed by the relay
    for sock in (first, second, third, fourth, fifth):
        sock.close()


@pytest.mark.timeout(20)
@pytest.mark.parametrize("impl", IMPLS)
def test_age_quiet_judges_quiet_clients_timeouts_with_no_session(impl, listener, pairs):
    """age_quiet(now, idle, busy, transaction limits): a quiet client whose state (idle; a request outstanding or
    waiting for a backend; idle in a transaction) and requests have not changed for its state's limit is reported
    (QUIET) and listed with its state and since when; a request walked restarts its clock; 0 is no limit."""
    relay = impl[1](*walkers(impl, client_stop=b"XP"), hold_stops=True)
    backends = [pairs(), pairs()]
    for backend in backends:
        relay.add_backend(backend.fd())
    reply = _quiet_greetings(relay, listener, keys=8)

    def served_by_a_backend() -> Pair:
        serve_until(relay, lambda _: any(_readable(b.outside) for b in backends))
        backend = next(b for b in backends if _readable(b.outside))
        assert backend.read(len(QUERY)) == QUERY
        return backend

    idle, in_tx, busy, waiting, later = (connect(listener) for _ in range(5))
    idle.sendall(startup_packet(b"alice"))
    in_tx.sendall(startup_packet(b"alice") + QUERY)           # BEGIN, in effect: answered "in a transaction"
    tx_backend = served_by_a_backend()
    tx_backend.outside.sendall(RESULT + READY_IN_TX)
    busy.sendall(startup_packet(b"alice") + QUERY)            # the other backend, never answered
    served_by_a_backend()
    waiting.sendall(startup_packet(b"alice") + QUERY)         # no backend left: waits
    later.sendall(startup_packet(b"alice"))
    assert serve_until(relay, lambda _: relay.stats()["quiet"] == 5 and relay.counts() == (0, 1, 2)) == []
    assert relay.age_quiet(100.0, 5, 5, 5) == ([], [])        # first seen: the clocks start
    in_tx.sendall(QUERY)                                      # a request in the transaction restarts its clock
    serve_until(relay, lambda _: _readable(tx_backend.outside))
    assert tx_backend.read(len(QUERY)) == QUERY
    tx_backend.outside.sendall(RESULT + READY_IN_TX)
    answers = len(reply) + 2 * (len(RESULT) + 6)

    def answered(_) -> bool:
        in_tx.setblocking(False)
        try:
            return len(in_tx.recv(answers, socket.MSG_PEEK)) == answers
        except BlockingIOError:
            return False
        finally:
            in_tx.settimeout(5)

    serve_until(relay, answered)
    assert recv_exactly(in_tx, answers)[-6:] == READY_IN_TX
    assert relay.age_quiet(103.0, 5, 5, 5) == ([], [])
    assert relay.age_quiet(104.9, 5, 5, 5) == ([], [])

    def judged(now, idle_limit, busy_limit, tx_limit) -> tuple:
        events, overdue = relay.age_quiet(now, idle_limit, busy_limit, tx_limit)
        assert sorted(fd for _, fd, *_ in events) == sorted(fd for fd, _, _ in overdue)
        assert {kind for kind, *_ in events} == {rc.QUIET}
        by_fd = {fd: (state, since) for fd, state, since in overdue}
        return sorted((greeted_parts(data, socket.AF_INET)[1], by_fd[fd]) for _, fd, _, data, _ in events), overdue

    seen, overdue = judged(105.0, 5, 0, 5)                   # the idle ones; busy ones have no limit
    assert seen == sorted([(idle.getsockname(), (rc.WATCH_IDLE, 100.0)), (later.getsockname(), (rc.WATCH_IDLE, 100.0))])
    assert relay.stats()["quiet"] == 3
    seen, more = judged(108.0, 0, 5, 5)
    assert seen == sorted([(busy.getsockname(), (rc.WATCH_BUSY, 100.0)),
                           (waiting.getsockname(), (rc.WATCH_BUSY, 100.0)),
                           (in_tx.getsockname(), (rc.WATCH_TRANSACTION, 103.0))])
    assert relay.stats()["quiet"] == 0 and relay.age_quiet(200.0, 1, 1, 1) == ([], [])
    relay.close()
    for fd, _, _ in overdue + more:                           # reported: the caller's to close
        os.close(fd)
    for sock in (idle, in_tx, busy, waiting, later):
        sock.close()


def _scram_outcome(impl, listener, initial: bytes, final: bytes | None) -> list:
    """What one implementation does with a SCRAM exchange's two client messages (random bytes or mutated good ones):
    what it sends (the relay's nonce masked) and its events (data after the nonce; the answered count)."""
    relay, reply = _scram_relay(impl, listener)
    sock = connect(listener)
    seen = []
    try:
        sock.sendall(startup_packet(b"alice"))
        serve_until(relay, lambda _: _readable(sock))
        seen.append(_read_message(sock))
        for message in (initial, final):
            if message is None:
                break
            sock.sendall(message)
            events = serve_until(relay, lambda events: events or _readable(sock))
            if events:
                for kind, fd, _, data, arg in events:
                    seen.append((kind, data[1 + data[0]:] if kind == rc.ANSWERED else data[8:9], arg))
                    os.close(fd)
                break
            kind, body = _read_message(sock)
            nonce_at = body.find(b"r=")
            seen.append((kind, body[:4], body[nonce_at + 2:].split(b",", 1)[-1] if nonce_at >= 0 else body))
        return seen
    finally:
        relay.close()
        sock.close()


scram_initials = st.one_of(
    st.binary(max_size=40).map(lambda data: pg(b"p", data)),
    st.builds(lambda head, name, nonce, tail: _sasl_initial(head + b"n=" + name + b",r=" + nonce + tail),
              st.sampled_from([b"n,,", b"y,,", b"p=x,,", b"n,a=b,", b"n,", b""]),
              st.sampled_from([b"", b"user", b"a=2Cb", b"a=41", b"\xc3\xa9", b"x,y"]),
              st.one_of(st.binary(max_size=12), st.text(alphabet=[chr(c) for c in range(0x21, 0x7F) if c != 0x2C],
                                                        min_size=1, max_size=30).map(str.encode)),
              st.sampled_from([b"", b",x=1", b","])))


@pytest.mark.timeout(120)
@pytest.mark.skipif(_relay is None, reason=NOT_BUILT if _relay is None else "")
@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(scram_initials, st.one_of(st.none(), st.binary(max_size=90).map(lambda data: pg(b"p", data))))
@example(_sasl_initial(b"n,,n=,r=abc"), pg(b"p", b"c=biws,r=abc" + b"x" * 24 + b",p=" + b"A" * 43 + b"="))
@example(_sasl_initial(b"y,,n=user,r=abc"), pg(b"p", b"c=eSws,r=abc,p=" + b"A" * 43 + b"="))
@example(_sasl_initial(b"n,,n=,r=abc"), pg(b"Q", b"select 1\0"))
def test_c_and_python_relays_agree_on_scram_messages(listener, initial, final):
    """The compiled relay's SCRAM parsing (C, on bytes from the network) against its twin's, on good, odd and random
    client messages: the same answers, the same events, the same bytes handed over."""
    c_impl, py_impl = (_relay.Walker, _relay.Relay), (rc.PyWalker, rc.PyRelay)
    assert _scram_outcome(c_impl, listener, initial, final) == _scram_outcome(py_impl, listener, initial, final)


# -- wake(): the relay serves a wake-up by itself and calls its handler only when the caller's code is needed


class WakeLog:
    """A wake handler that records what it was called with; a whole wake-up (None) runs run_ready as a lane does."""

    def __init__(self, relay):
        self.relay = relay
        self.calls = []
        self.served = []

    def __call__(self, events):
        self.calls.append(events)
        if events is None:
            self.served += self.relay.run_ready()
        else:
            self.served += events
        return "handled"


@pytest.mark.timeout(20)
@pytest.mark.parametrize("impl", IMPLS)
def test_wake_serves_a_transaction_with_no_call_of_its_handler(impl, pairs):
    relay = impl[1](*walkers(impl))
    with pytest.raises(ValueError):
        relay.wake()                                              # no handler yet
    with pytest.raises(TypeError):
        relay.set_wake(42)
    handler = WakeLog(relay)
    relay.set_wake(handler)
    client, backend = pairs(), pairs()
    relay.add_backend(backend.fd())
    relay.add_client(client.fd())
    assert relay.wake() == "handled" and handler.calls == [None]  # the first wake-up after set_wake is whole
    client.outside.sendall(QUERY)
    select_wait(relay)
    assert relay.wake() is None                                   # forwarded in C: no event, nobody waits
    assert backend.read(len(QUERY)) == QUERY
    backend.outside.sendall(RESULT + READY_IDLE)
    select_wait(relay)
    assert relay.wake() is None
    assert client.read(len(RESULT + READY_IDLE)) == RESULT + READY_IDLE
    assert handler.calls == [None] and relay.stats()["transactions"] == 1
    client.outside.sendall(TERMINATE)                             # an event: the handler gets it
    select_wait(relay)
    assert relay.wake() == "handled"
    assert handler.calls[1:] == [[(rc.HANDOVER, client.fd(), -1, TERMINATE, ord("X"))]]
    relay.set_wake(None)
    with pytest.raises(ValueError):
        relay.wake()
    relay.close()


@pytest.mark.timeout(20)
@pytest.mark.parametrize("impl", IMPLS)
def test_wake_calls_its_handler_for_waiting_clients_attend_and_eager(impl, pairs):
    relay = impl[1](*walkers(impl))
    handler = WakeLog(relay)
    relay.set_wake(handler)
    relay.wake()                                                  # (the whole first one)
    client = pairs()
    relay.add_client(client.fd())
    client.outside.sendall(QUERY)                                 # no backend: it waits, the caller must find one
    select_wait(relay)
    assert relay.wake() == "handled" and handler.calls[-1] == []
    assert relay.stats()["waiting"] == 1
    assert relay.wake() == "handled" and handler.calls[-1] == []  # and at every wake-up while it waits
    backend = pairs()
    relay.add_backend(backend.fd())                               # lent to it at once
    assert backend.read(len(QUERY)) == QUERY
    calls = len(handler.calls)
    assert relay.wake() is None and len(handler.calls) == calls
    rc.attend()                                                   # what the handler judges may have changed
    assert relay.wake() == "handled" and handler.calls[-1] is None
    assert relay.wake() is None                                   # once
    relay.set_wake_rules(True)                                    # eager: every wake-up is whole
    assert relay.wake() == "handled" and relay.wake() == "handled" and handler.calls[-2:] == [None, None]
    relay.set_wake_rules(False)
    assert relay.wake() is None
    with pytest.raises(ValueError):
        relay.set_wake_rules(False, -1)
    relay.close()
    assert relay.wake() is None                                   # closed: nothing to serve, no call
    relay.set_wake(None)


@pytest.mark.timeout(20)
@pytest.mark.parametrize("impl", IMPLS)
def test_wake_calls_its_handler_when_keys_run_low(impl, listener, pairs):
    relay = impl[1](*walkers(impl))
    handler = WakeLog(relay)
    relay.set_wake(handler)
    relay.wake()
    relay.listen(listener.fileno(), refuse=SSL_REQUEST, refusal=b"N", hangup=b"X")
    relay.add_keys(bytes(range(16)))                              # two keys
    relay.set_wake_rules(False, 2)
    assert relay.wake() is None                                   # two held, two wanted: no call
    relay.set_wake_rules(False, 3)
    assert relay.wake() == "handled" and handler.calls[-1] == []  # fewer than keys_low: the caller tops them up
    relay.close()
    relay.set_wake(None)


@pytest.mark.timeout(20)
@pytest.mark.parametrize("impl", IMPLS)
def test_wake_is_whole_while_the_login_budget_is_spent_and_a_quiet_goodbye_gives_one_back(impl, listener):
    """A spent budget makes every wake-up whole (the caller judges the room again); a quiet client the relay closes
    gives its greeting back to the budget, so the next login needs no call."""
    relay = impl[1](*walkers(impl))
    handler = WakeLog(relay)
    relay.set_wake(handler)
    relay.wake()
    reply = _quiet_greetings(relay, listener, keys=8)
    relay.set_login_budget(1, True)                               # a limit's room: goodbyes give it back
    first = connect(listener)
    first.sendall(startup_packet(b"alice"))

    def wake_until(done) -> None:
        for _ in range(200):
            relay.wake()
            if done():
                return
            select_wait(relay)
        raise AssertionError("not done")

    calls = len(handler.calls)
    wake_until(lambda: relay.stats()["quiet"] == 1)
    assert recv_exactly(first, len(reply))[-6:] == READY_IDLE
    assert len(handler.calls) == calls                            # greeted with no call
    assert relay.wake() == "handled" and handler.calls[-1] is None    # spent: whole
    assert relay.wake() == "handled" and handler.calls[-1] is None
    first.sendall(TERMINATE)                                      # its goodbye gives the greeting back
    wake_until(lambda: relay.stats()["quiet"] == 0)
    assert relay.quiet_counts() == (1, 1)
    calls = len(handler.calls)
    assert relay.wake() is None and len(handler.calls) == calls  # room again: no call
    second = connect(listener)
    second.sendall(startup_packet(b"alice"))
    wake_until(lambda: relay.stats()["quiet"] == 1)
    assert len(handler.calls) == calls                            # greeted with no call, the budget spent again
    assert relay.wake() == "handled" and handler.calls[-1] is None
    relay.set_login_budget(0)                                     # a refusal (DISABLE, say): a goodbye gives none
    second.sendall(TERMINATE)
    wake_until(lambda: relay.stats()["quiet"] == 0)
    assert relay.wake() == "handled" and handler.calls[-1] is None
    third = connect(listener)
    third.sendall(startup_packet(b"alice"))                       # not greeted: the engine's startup
    wake_until(lambda: any(kind == rc.STARTUP for kind, *_ in handler.served))
    assert relay.stats()["quiet"] == 0
    relay.set_login_budget(-1)                                    # no limit: never whole for it
    calls = len(handler.calls)
    assert relay.wake() is None and len(handler.calls) == calls
    relay.close()
    relay.set_wake(None)
    for sock in (first, second, third):
        sock.close()
    for kind, fd, *_ in handler.served:
        if kind == rc.STARTUP:
            os.close(fd)


@pytest.mark.timeout(20)
@pytest.mark.parametrize("impl", IMPLS)
def test_a_relay_and_its_handler_that_holds_it_are_collected(impl):
    import gc
    import weakref

    class Owner:
        pass

    owner = Owner()
    owner.relay = impl[1](*walkers(impl))
    owner.relay.set_wake(lambda events, owner=owner: None)       # a cycle: relay -> handler -> owner -> relay
    gone = weakref.ref(owner)
    del owner
    gc.collect()
    assert gone() is None


@pytest.mark.timeout(20)
@pytest.mark.parametrize("impl", IMPLS)
def test_a_whole_wake_up_that_fails_or_sees_an_attend_is_whole_again(impl):
    relay = impl[1](*walkers(impl))
    calls = []

    def failing(events):
        calls.append(events)
        raise RuntimeError("the lane failed")

    relay.set_wake(failing)
    with pytest.raises(RuntimeError):
        relay.wake()
    with pytest.raises(RuntimeError):
        relay.wake()                                              # whole again: the first one did not finish
    assert calls == [None, None]

    def attending(events):
        calls.append(events)
        if len(calls) == 3:
            rc.attend()                                           # something changed while the lane judged

    relay.set_wake(attending)
    relay.wake()
    relay.wake()
    assert calls[2:] == [None, None]
    assert relay.wake() is None and len(calls) == 4
    relay.set_wake(None)
    relay.close()


@pytest.mark.timeout(120)
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(
    st.tuples(st.just("client"), st.one_of(batch_client_frames, st.sampled_from([
        pg(b"Q", b"BEGIN\0"), pg(b"Q", b"commit\0"), pg(b"Q", b"rollback\0"), pg(b"Q", b"start transaction\0"),
        pg(b"Q", b"begin isolation level serializable, read only\0")]))),
    st.tuples(st.sampled_from(["first", "second"]), st.one_of(server_frames, st.sampled_from([
        BEGIN_DONE, pg(b"1"), pg(b"2") + pg(b"C", b"BEGIN\0"), pg(b"N", b"SNOTICE\0\0"), READY_FAILED])))),
    max_size=12))
def test_c_and_python_relays_agree_with_pg_begin(steps):
    assert_cores_agree(steps, begin=True)


tx_texts = st.lists(st.sampled_from([b"begin", b"BEGIN", b"start", b"transaction", b"work", b"commit", b"end",
                                     b"rollback", b"abort", b"and", b"chain", b"Transactions", b" ", b"\t", b"\n",
                                     b"\x0b", b";", b"x", b"\xc3\xa9", b"\0", b",", b" isolation level", b" read",
                                     b" only", b" write", b" committed", b" uncommitted", b" serializable",
                                     b" repeatable", b" not", b" deferrable", b"deferrablexxxxxx"]),
                    max_size=12).map(b"".join)


_BEGIN_HEADS = (b"BEGIN", b"begin work", b"Begin Transaction", b"START TRANSACTION")
_MODE_SEPARATORS = (b" ", b", ", b",", b" ,\t", b"\n")
begin_with_modes = st.tuples(
    st.sampled_from(_BEGIN_HEADS), st.lists(st.sampled_from(rc.TXW_MODES), max_size=4),
    st.lists(st.sampled_from(_MODE_SEPARATORS), min_size=4, max_size=4), st.booleans(), st.booleans())


def begin_text_of(head, modes, separators, semicolon, lower):
    """The text a client sends: head, then the modes (each after a separator; the first after white space)."""
    text = head
    for n, mode in enumerate(modes):
        words = mode[3].lower() if lower else mode[3]
        text += (b" " if n == 0 else separators[n]) + words
    return text + (b" ;" if semicolon else b"")


@pytest.mark.timeout(60)
@settings(max_examples=300, deadline=None)
@given(begin_with_modes)
def test_a_begin_with_modes_is_answered_and_begin_text_spells_them(case):
    """Modes in any order, commas or white space between them: one of each kind is a LOCAL BEGIN whose begin_text
    has the same head and modes; a kind given twice stops (the Python path sends the client's own text)."""
    head, modes, separators, semicolon, lower = case
    text = begin_text_of(head, modes, separators, semicolon, lower)
    kinds = [mode[0] for mode in modes]
    results = []
    for impl in ((_relay.Walker, _relay.Relay),) * (_relay is not None) + ((rc.PyWalker, rc.PyRelay),):
        client, _ = begin_walkers(impl)
        results.append(client.feed(pg(b"Q", text + b"\0")))
    assert results[0] == results[-1]
    _, event, code = results[-1]
    if len(set(kinds)) < len(kinds):
        assert event == rc.HANDOVER
        return
    assert event == rc.LOCAL
    spelt = rc.begin_text(code)
    assert spelt.startswith(b"START TRANSACTION" if head.startswith(b"START") else b"BEGIN")
    assert sorted(mode[3] for mode in modes) == sorted(m[3] for m in rc.TXW_MODES if m[3] in spelt
                                                       and not (m[3] == b"DEFERRABLE" and b"NOT DEFERRABLE" in spelt))
    assert rc._pg_transaction_word(spelt + b"\0") == code        # what the relay sends means the same


@pytest.mark.timeout(120)
@settings(max_examples=500, deadline=None)
@given(st.one_of(tx_texts, begin_with_modes.map(lambda case: begin_text_of(*case))), st.booleans())
def test_c_and_python_agree_on_the_transaction_words(text, lazy):
    if _relay is None:
        pytest.skip(NOT_BUILT)
    frame = pg(b"Q", text + b"\0")
    results = []
    for impl in ((_relay.Walker, _relay.Relay), (rc.PyWalker, rc.PyRelay)):
        client, _ = begin_walkers(impl)
        client.lazy = lazy
        results.append((client.feed(frame), client.take_count(), client.lazy))
    assert results[0] == results[1]


# -- named statements: a Bind of a statement the client prepared, made a batch of the unnamed statement

STATEMENTS = {b"s1": b"\0select $1\0\0\1\0\0\0\x17", b"_pg3_0": b"\0SELECT 2\0\0\0",
              b"pins": b"\0SET x = 1\0\0\0", b"bad": b"\0select\0\0\2"}


def bind_named(name: bytes, portal: bytes = b"") -> bytes:
    """Bind of a named statement, one text parameter '1', text results (as BIND binds the unnamed one)."""
    return pg(b"B", portal + b"\0" + name + b"\0\0\0\0\1\0\0\0\x011\0\0")


NAMED_BATCH = bind_named(b"s1") + DESCRIBE_PORTAL + EXECUTE + SYNC
# what the backend gets for it: Parse of the statement's text as the unnamed statement, and BIND
UNNAMED_BATCH = pg(b"P", STATEMENTS[b"s1"]) + BIND + DESCRIBE_PORTAL + EXECUTE + SYNC


@pytest.mark.timeout(10)
@pytest.mark.parametrize("impl", IMPLS)
def test_a_batch_binding_a_known_statement_is_named_and_others_stop(impl):
    client, _ = begin_walkers(impl)
    assert client.set_statements(STATEMENTS) == 2           # SET pins; "bad" is malformed: left out
    long_text = b"\0select '" + b"x" * 160 + b"'\0\0\0"       # relayable, but not with a Parse of it in front
    assert client.set_statements({**STATEMENTS, b"long": long_text, b"longer": long_text + b"x" * 30}) == 3
    assert client.feed(bind_named(b"long") + EXECUTE + SYNC) == (0, rc.HANDOVER, ord("B"))
    assert client.set_statements(STATEMENTS) == 2
    assert client.feed(NAMED_BATCH) == (0, rc.NAMED, 0)
    assert client.feed(bind_named(b"_pg3_0") + EXECUTE + SYNC) == (0, rc.NAMED, 1)
    assert client.feed(QUERY + NAMED_BATCH) == (len(QUERY), rc.NAMED, 0) and client.take_count() == 1
    for stopped in (bind_named(b"pins") + SYNC, bind_named(b"other") + SYNC, bind_named(b"s1", b"portal") + SYNC,
                    NAMED_BATCH[:-5] + PARSE + BIND + SYNC,           # a Parse in it
                    EXECUTE + bind_named(b"s1") + SYNC,               # not its first frame
                    pg(b"D", b"Ss1\0") + SYNC):                       # Describe of the statement
        assert client.feed(stopped) == (0, rc.HANDOVER, stopped[0]), stopped
    assert client.set_statements(None) == 0
    assert client.feed(NAMED_BATCH) == (0, rc.HANDOVER, ord("B"))
    with pytest.raises(TypeError):
        client.set_statements({"s1": b"x"})


@pytest.mark.timeout(10)
@pytest.mark.parametrize("impl", IMPLS)
def test_a_named_statement_is_served_as_the_unnamed_one_and_its_parse_complete_dropped(impl, pairs):
    """The backend gets Parse of the statement's text and a Bind of the unnamed statement; the client gets the Bind's
    answer without the ParseComplete it did not ask for, a notice among them included; an unknown name stops."""
    relay, client, (backend,) = begin_relay(impl, pairs)
    assert relay.set_statements(client.fd(), STATEMENTS) == 2
    for _ in range(2):
        client.outside.sendall(NAMED_BATCH)
        assert serve(relay) == []
        assert backend.read(len(UNNAMED_BATCH)) == UNNAMED_BATCH
        notice = pg(b"N", b"SNOTICE\0\0")
        backend.outside.sendall(notice + pg(b"1") + pg(b"2") + RESULT + READY_IDLE)
        assert serve(relay) == []
        expected = notice + pg(b"2") + RESULT + READY_IDLE
        assert client.read(len(expected)) == expected
        assert relay.counts() == (1, 0, 0) and relay.stats()["transactions"] >= 1
    failing = bind_named(b"_pg3_0") + EXECUTE + SYNC      # its Parse fails (a table dropped since): the error answers
    client.outside.sendall(failing)
    assert serve(relay) == []
    sent = pg(b"P", STATEMENTS[b"_pg3_0"]) + pg(b"B", b"\0\0\0\0\0\1\0\0\0\x011\0\0") + EXECUTE + SYNC
    assert backend.read(len(sent)) == sent
    backend.outside.sendall(FAILURE + READY_IDLE)
    assert serve(relay) == []
    assert client.read(len(FAILURE + READY_IDLE)) == FAILURE + READY_IDLE
    client.outside.sendall(NAMED_BATCH)                   # and the next one is served as before
    serve(relay)
    assert backend.read(len(UNNAMED_BATCH)) == UNNAMED_BATCH
    backend.outside.sendall(pg(b"1") + pg(b"2") + RESULT + READY_IDLE)
    serve(relay)
    assert client.read(len(pg(b"2") + RESULT + READY_IDLE)) == pg(b"2") + RESULT + READY_IDLE
    unknown = bind_named(b"other") + EXECUTE + SYNC
    client.outside.sendall(unknown)
    assert serve(relay) == [(rc.HANDOVER, client.fd(), -1, unknown, ord("B"))]
    relay.close()


@pytest.mark.timeout(10)
@pytest.mark.parametrize("impl", IMPLS)
def test_a_named_statement_after_a_lone_begin_and_one_behind_an_answer_owed(impl, pairs):
    """After a BEGIN the relay answered, the BEGIN goes ahead of the Parse the relay puts in front of the Bind; a named
    batch behind a request whose answer is still owed stops (the answers could not be told apart), and goes to the
    caller with the backend at the end of that answer, inside the transaction."""
    relay, client, (backend,) = begin_relay(impl, pairs)
    relay.set_statements(client.fd(), STATEMENTS)
    client.outside.sendall(pg(b"Q", b"BEGIN\0"))
    serve(relay)
    assert client.read(len(BEGIN_ANSWER)) == BEGIN_ANSWER
    client.outside.sendall(NAMED_BATCH)
    assert serve(relay) == []
    assert backend.read(len(BEGIN_AHEAD + UNNAMED_BATCH)) == BEGIN_AHEAD + UNNAMED_BATCH
    backend.outside.sendall(BEGIN_DONE + pg(b"1") + pg(b"2") + RESULT + READY_IN_TX)
    assert serve(relay) == []
    expected = pg(b"2") + RESULT + READY_IN_TX
    assert client.read(len(expected)) == expected
    client.outside.sendall(QUERY + NAMED_BATCH)           # pipelined behind a Query: it waits for the Query's answer
    assert serve(relay) == []
    assert backend.read(len(QUERY)) == QUERY and nothing_read(backend)
    backend.outside.sendall(RESULT + READY_IN_TX)
    assert serve(relay) == [(rc.HANDOVER, client.fd(), backend.fd(), NAMED_BATCH, ord("T"))]
    assert client.read(len(RESULT + READY_IN_TX)) == RESULT + READY_IN_TX
    relay.close()


@pytest.mark.timeout(10)
@pytest.mark.parametrize("impl", IMPLS)
def test_a_named_batch_waiting_for_a_backend_is_what_the_client_sent_until_it_gets_one(impl, pairs):
    """With no backend free the batch waits as the client sent it: taken back, the caller gets those bytes; given a
    backend (with a lazy BEGIN ahead), it goes as the batch of the unnamed statement."""
    relay, client, _ = begin_relay(impl, pairs, backends=0)
    relay.set_statements(client.fd(), STATEMENTS)
    client.outside.sendall(NAMED_BATCH)
    assert serve(relay) == []
    assert relay.counts() == (0, 1, 0)
    assert relay.take_waiting() == (client.fd(), NAMED_BATCH)
    relay.close()
    relay, client, _ = begin_relay(impl, pairs, backends=0)
    relay.set_statements(client.fd(), STATEMENTS)
    client.outside.sendall(pg(b"Q", b"BEGIN\0") + NAMED_BATCH)
    assert serve(relay) == []
    assert client.read(len(BEGIN_ANSWER)) == BEGIN_ANSWER and relay.counts() == (0, 1, 0)
    backend = pairs()
    relay.add_backend(backend.fd())
    assert serve(relay) == []
    assert backend.read(len(BEGIN_AHEAD + UNNAMED_BATCH)) == BEGIN_AHEAD + UNNAMED_BATCH
    backend.outside.sendall(BEGIN_DONE + pg(b"1") + pg(b"2") + RESULT + READY_IN_TX)
    assert serve(relay) == []
    assert client.read(len(pg(b"2") + RESULT + READY_IN_TX)) == pg(b"2") + RESULT + READY_IN_TX
    relay.close()


@pytest.mark.timeout(120)
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(
    st.tuples(st.just("client"), st.one_of(batch_client_frames, st.sampled_from([
        NAMED_BATCH, bind_named(b"_pg3_0") + EXECUTE + SYNC, bind_named(b"other") + SYNC, pg(b"Q", b"BEGIN\0"),
        NAMED_BATCH + NAMED_BATCH]))),
    st.tuples(st.sampled_from(["first", "second"]), st.one_of(server_frames, st.sampled_from([
        pg(b"1"), pg(b"1") + pg(b"2"), pg(b"N", b"SNOTICE\0\0"), FAILURE, BEGIN_DONE])))),
    max_size=12))
def test_c_and_python_relays_agree_with_named_statements(steps):
    assert_cores_agree(steps, begin=True, statements=STATEMENTS)


# -- MySQL: a BEGIN the relay answers (mysql_begin)

MY_BEGAN = my_ok(1, AUTOCOMMIT | IN_TRANS)                    # the relay's answer: the lane's status flags
MY_BEGIN_RULE = dict(MY_CLIENT_RULE, mysql_begin=MY_BEGAN)
MY_BEGIN_AHEAD = my(0, b"\x03BEGIN")


def my_begin_relay(impl, pairs):
    relay = impl[1](impl[0](**MY_BEGIN_RULE), impl[0](**MY, response="mysql"), hold_stops=True)
    client, backend = pairs(), pairs()
    relay.add_backend(backend.fd())
    relay.add_client(client.fd())
    return relay, client, backend


@pytest.mark.timeout(10)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("text,expected", [
    (b"BEGIN", (rc.LOCAL, rc.TXW_BEGIN)), (b" begin work;", (rc.LOCAL, rc.TXW_BEGIN)),
    (b"START TRANSACTION", (rc.LOCAL, rc.TXW_START)),
    (b"BEGIN TRANSACTION", (rc.HANDOVER, 3)),                  # not MySQL: the screen stops it, the server answers
    (b"START TRANSACTION READ ONLY", (rc.NONE, -1)),           # (no screen word of this rule: forwarded)
    (b"COMMIT", (rc.NONE, -1)), (b"BEGIN\0", (rc.HANDOVER, 3)),
])
def test_mysql_begin_finds_a_lone_begin(impl, text, expected):
    client = impl[0](**MY_BEGIN_RULE)
    client.lazy = True                                          # (MySQL has no COMMIT the relay answers)
    packet = my(0, b"\x03" + text)
    consumed, event, arg = client.feed(packet)
    assert (event, arg) == expected and consumed == (len(packet) if event == rc.NONE else 0)
    with pytest.raises(ValueError):
        impl[0](**dict(MY, mysql_begin=MY_BEGAN))               # only with request="mysql"


@pytest.mark.timeout(10)
@pytest.mark.parametrize("impl", IMPLS)
def test_a_mysql_begin_is_answered_and_sent_ahead_and_its_ok_dropped(impl, pairs):
    relay, client, backend = my_begin_relay(impl, pairs)
    client.outside.sendall(my(0, b"\x03BEGIN"))
    assert serve(relay) == []
    assert client.read(len(MY_BEGAN)) == MY_BEGAN
    assert relay.activity(client.fd()) == (1, -1, 0, 0, rc.TXW_BEGIN) and nothing_read(backend)
    query, answer = my(0, b"\x03select 1"), my_result([b"\x011"], False, AUTOCOMMIT | IN_TRANS)
    client.outside.sendall(query)
    assert serve(relay) == []
    assert backend.read(len(MY_BEGIN_AHEAD + query)) == MY_BEGIN_AHEAD + query
    backend.outside.sendall(my_ok(1, AUTOCOMMIT | IN_TRANS) + answer)
    assert serve(relay) == []
    assert client.read(len(answer)) == answer
    # an ERR inside the transaction keeps the backend (the dropped OK said the transaction is open)
    client.outside.sendall(my(0, b"\x03select nope"))
    serve(relay)
    backend.read(len(my(0, b"\x03select nope")))
    backend.outside.sendall(MY_ERR)
    assert serve(relay) == []
    assert client.read(len(MY_ERR)) == MY_ERR
    assert relay.activity(client.fd())[1:] == (backend.fd(), 0, 0, 0)
    commit = my(0, b"\x03COMMIT")
    client.outside.sendall(commit)
    serve(relay)
    assert backend.read(len(commit)) == commit
    backend.outside.sendall(my_ok(1))
    serve(relay)
    assert client.read(len(my_ok(1))) == my_ok(1)
    assert relay.counts() == (1, 0, 0) and relay.stats()["transactions"] == 1
    relay.close()


@pytest.mark.timeout(10)
@pytest.mark.parametrize("impl", IMPLS)
def test_a_mysql_begin_that_fails_answers_the_command_behind_it(impl, pairs):
    """As the Python path does: the BEGIN's ERR is the answer to the client's command, whose own answer is dropped."""
    relay, client, backend = my_begin_relay(impl, pairs)
    client.outside.sendall(my(0, b"\x03START TRANSACTION") + my(0, b"\x03select 1"))
    assert serve(relay) == []
    assert client.read(len(MY_BEGAN)) == MY_BEGAN
    backend.read(len(MY_BEGIN_AHEAD + my(0, b"\x03select 1")))
    backend.outside.sendall(MY_ERR + my_result([b"\x011", b"\x012"], False))
    assert serve(relay) == []
    assert client.read(len(MY_ERR)) == MY_ERR and nothing_read(client)
    assert relay.counts() == (1, 0, 0) and relay.activity(client.fd()) == (2, -1, 0, 0, 0)
    # a stop frame after a lone BEGIN goes to the caller with lazy_begin
    client.outside.sendall(my(0, b"\x03BEGIN") + my(0, b"\x01"))
    assert serve(relay) == [(rc.HANDOVER, client.fd(), -1, my(0, b"\x01"), 1)]
    assert client.read(len(MY_BEGAN)) == MY_BEGAN
    assert relay.lazy_begin(client.fd()) == rc.TXW_BEGIN
    relay.close()


@pytest.mark.timeout(120)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(
    st.tuples(st.just("client"), st.one_of(my_client_frames, st.sampled_from([
        my(0, b"\x03BEGIN"), my(0, b"\x03start transaction"), my(0, b"\x03COMMIT")]))),
    st.tuples(st.sampled_from(["first", "second"]), my_server_frames)), max_size=12), st.booleans())
def test_c_and_python_relays_agree_with_mysql_begin(steps, deprecate_eof):
    assert_cores_agree(steps, mysql=(MY_BEGIN_RULE, dict(MY, response="mysql", deprecate_eof=deprecate_eof)))


@pytest.mark.timeout(10)
@pytest.mark.parametrize("impl", IMPLS)
def test_the_last_insert_id_of_the_answers_relayed_to_a_client_is_kept_for_the_caller(impl, pairs):
    """An OK packet's last insert id other than 0 (an INSERT's) is the client's: insert_id(fd) while the relay holds
    it and after it let go of it (until the next client there), for the engine to answer LAST_INSERT_ID()."""
    relay = impl[1](impl[0](**MY_CLIENT_RULE), impl[0](**MY, response="mysql"), hold_stops=True)
    client, backend = pairs(), pairs()
    relay.add_backend(backend.fd())
    relay.add_client(client.fd())
    insert = my(0, b"\x03INSERT INTO t VALUES (NULL)")
    for answer, expected in ((my_ok(1, affected=b"\1", insert_id=b"\x2a"), 42), (my_ok(1), 42),
                             (my_ok(1, affected=b"\1", insert_id=b"\xfc\x10\x27"), 10000)):
        client.outside.sendall(insert)
        serve(relay)
        backend.read(len(insert))
        backend.outside.sendall(answer)
        serve(relay)
        assert client.read(len(answer)) == answer
        assert relay.insert_id(client.fd()) == expected
    assert relay.insert_id(backend.fd()) == 0 and relay.insert_id(999) == 0
    client.outside.sendall(my(0, b"\x01"))                      # COM_QUIT: let go of
    assert serve(relay)[0][0] == rc.HANDOVER
    assert relay.insert_id(client.fd()) == 10000
    relay.add_client(client.fd())                               # a client given to the relay again starts with none
    assert relay.insert_id(client.fd()) == 0
    server = impl[0](**MY, response="mysql")
    server.feed(my_ok(1, insert_id=b"\x07") + my_ok(1))
    assert server.insert_id == 7
    relay.close()
