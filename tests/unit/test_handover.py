"""The takeover's wire format (records, descriptors over a socketpair, the value codec, the version check) and each
engine's session export -> JSON -> resume round trip, with the states in which a client must not go; the codec and the
record reader fuzzed."""
from __future__ import annotations

import json
import os
import socket
import tempfile
from collections import deque

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from multiproxy.engine import PinReason
from multiproxy.handover import (
    HANDOVER_VERSION, HandoverError, RecordReader, check_hello, decode, encode, hello, pack, send_record,
)
from multiproxy_engines.mysql import MySQLEngine
from multiproxy_engines.mysql import handover as mysql_handover
from multiproxy_engines.mysql.statements import ClientStatement
from multiproxy_engines.postgres import PostgresEngine
from multiproxy_engines.postgres import handover as pg_handover
from multiproxy_engines.postgres import protocol as pgp
from multiproxy_engines.tds import TDSEngine
from multiproxy_engines.tds import handover as tds_handover
from multiproxy_engines.tds.backend import TDSServerState
from multiproxy_engines.tds.transactions import BEGIN, TransactionVerb
from multiproxy_engines.tds.wire import messages as tp

from ..fuzzkit import tds_logged_in
from .test_mysql_statements import held_client, prepare
from .test_pg_relay import backend_state, logged_in_client
from .test_tds_statements import client as tds_client
from .test_tds_statements import answer, prepare_call, prepared_answer, rpc, send


# ---------------------------------------------------------------- values

def test_values_round_trip_through_json():
    value = {
        "bytes": b"\x00\xffabc", "tuple": (1, "a", (b"x", None)), "set": {1, 2}, "frozen": frozenset({"a"}),
        "deque": deque([(1, 2)], maxlen=4), "int_keys": {1: "one", (2, 3): b"k"}, "dollar": {"$b": "not base64"},
        "reason": PinReason.TEMP_TABLE, "list": [1.5, True, None], "slotted": ClientStatement((b"SELECT ?", "db"), 1, 1),
        "frozen_dataclass": TransactionVerb(BEGIN, True, 2), "dataclass": tp.Login7(username="u", packet_size=2048),
    }
    back = decode(json.loads(json.dumps(encode(value))))
    slotted = back.pop("slotted")
    assert (slotted.key, slotted.params, slotted.columns, slotted.long_data) == ((b"SELECT ?", "db"), 1, 1, [])
    assert back.pop("frozen_dataclass") == TransactionVerb(BEGIN, True, 2)
    assert back.pop("dataclass") == tp.Login7(username="u", packet_size=2048)
    assert type(back["deque"]) is deque and back["deque"].maxlen == 4
    assert back["reason"] is PinReason.TEMP_TABLE
    expected = dict(value)
    for name in ("slotted", "frozen_dataclass", "dataclass"):
        del expected[name]
    assert back == expected


def test_what_cannot_be_handed_over_is_refused():
    with pytest.raises(TypeError, match="socket"):
        encode({"sock": socket.socket()})
    with pytest.raises(TypeError):
        encode([lambda: None])
    with pytest.raises(HandoverError, match="not the proxy's"):
        decode({"$o": "os:stat_result", "s": {}})


# ---------------------------------------------------------------- records and descriptors

def test_records_and_descriptors_over_a_socketpair():
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with tempfile.TemporaryFile() as shared, left, right:
        shared.write(b"handed over")
        shared.flush()
        send_record(left, {"type": "plain", "n": 1})
        send_record(left, {"type": "with_fd", "big": "x" * 200_000}, [shared.fileno()])
        send_record(left, {"type": "two", "n": 2}, [shared.fileno(), left.fileno()])
        reader = RecordReader(right)
        record, fds = reader.read()
        assert record == {"type": "plain", "n": 1} and fds == []
        record, fds = reader.read()
        assert record["type"] == "with_fd" and len(record["big"]) == 200_000 and len(fds) == 1
        assert os.fstat(fds[0]).st_ino == os.fstat(shared.fileno()).st_ino       # the same open file
        os.lseek(fds[0], 0, os.SEEK_SET)
        assert os.read(fds[0], 100) == b"handed over"
        os.close(fds[0])
        record, fds = reader.read()
        assert record == {"type": "two", "n": 2, "fds": 2} and len(fds) == 2
        for fd in fds:
            os.close(fd)
        left.close()
        with pytest.raises(HandoverError, match="closed"):
            reader.read()


def test_records_sent_a_byte_at_a_time_are_read_whole():
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with left, right:
        for byte in pack({"type": "slow", "text": "héllo"}):
            left.send(bytes([byte]))
        assert RecordReader(right).read() == ({"type": "slow", "text": "héllo"}, [])


def test_has_record_says_whether_a_whole_record_is_buffered():
    """A supervisor's poll loop reads on until no whole record is left in the buffer (group_takeover)."""
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with left, right:
        reader = RecordReader(right)
        assert not reader.has_record()
        second = pack({"type": "second"})
        left.sendall(pack({"type": "first"}) + second[:5])
        assert reader.read() == ({"type": "first"}, [])
        assert not reader.has_record()                 # half of the second only
        left.sendall(second[5:] + pack({"type": "third"}))
        assert reader.read() == ({"type": "second"}, [])
        assert reader.has_record()
        assert reader.read() == ({"type": "third"}, [])
        assert not reader.has_record()


def test_malformed_records_are_refused():
    for data, message in ((b"\x00\x00\x00\x02{}", "no type"), (b"\x00\x00\x00\x03abc", "not JSON"),
                          (b"\xff\xff\xff\xff", "announces"), (pack({"type": "x", "fds": 1}), "descriptors")):
        left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        with left, right:
            left.sendall(data)
            with pytest.raises(HandoverError, match=message):
                RecordReader(right).read()


def test_the_version_check_refuses_another_version_with_a_clear_message():
    check_hello(hello(1, multiproxy="x"), "running process")
    with pytest.raises(HandoverError, match=r"speaks takeover version 99, this one %d.*stop the old process"
                       % HANDOVER_VERSION):
        check_hello({**hello(1), "version": 99}, "running process")
    with pytest.raises(HandoverError, match="did not start with hello"):
        check_hello({"type": "client"}, "running process")


# ---------------------------------------------------------------- engine state round trips

def through_json(state: dict) -> dict:
    return json.loads(json.dumps(state))


def same_session(before, after, runtime) -> None:
    """Every attribute the exported client held (but the per-process ones) is equal in the resumed one, value
    objects compared by their contents."""
    mine = {k: v for k, v in vars(before).items() if k not in runtime}
    theirs = {k: v for k, v in vars(after).items() if k not in runtime}
    assert mine.keys() <= theirs.keys()
    for name, value in mine.items():
        assert encode(theirs[name]) == encode(value), name


def test_postgres_session_round_trip():
    client = logged_in_client({"user": "alice", "database": "app", "options": "-c statement_timeout=5s",
                               "application_name": "kept"})
    # a named statement recorded while idle (libpq's PQprepare), to be prepared on the new process's backends
    client.virtualize = True
    parse = pgp.message(b"P", b"doubled\x00SELECT $1::int * 2\x00\x00\x00")
    assert client.client_data(parse + b"S\x00\x00\x00\x04") == (b"", b"1\x00\x00\x00\x04" + pgp.READY_IDLE)
    assert b"doubled" in client.statements
    state = client.handover_state()
    assert state is not None
    engine = PostgresEngine()
    resumed = engine.resume_client(client.ctx, through_json(state))
    same_session(client, resumed, pg_handover.RUNTIME)
    assert resumed.handshake is None and resumed.client_settings["statement_timeout"] == "5s"
    # the resumed client serves its next request on a fresh backend: the settings are replayed first
    forward, local = resumed.client_data(pgp.query("SELECT 1"))
    sent = resumed.link(backend_state(), forward)
    assert b"statement_timeout" in sent and sent.endswith(pgp.query("SELECT 1"))


def test_postgres_clients_busy_or_in_a_transaction_stay():
    client = logged_in_client()
    forward, _ = client.client_data(pgp.query("SELECT 1"))
    client.link(backend_state(), forward)
    assert client.handover_state() is None and pg_handover.not_idle(client) == "a request is outstanding"
    idle = logged_in_client()
    assert idle.client_data(pgp.query("BEGIN"))[0] == b""          # answered by the proxy: a transaction all the same
    assert idle.handover_state() is None and pg_handover.not_idle(idle) == "inside a transaction"
    partial = logged_in_client()
    partial.client_data(pgp.query("SELECT 1")[:3])
    assert partial.handover_state() is None


def test_mysql_session_round_trip_keeps_statement_ids():
    client = held_client()
    client.variables["sql_mode"] = "'ANSI_QUOTES'"
    state = client.handover_state()
    assert state is not None
    engine = MySQLEngine()
    resumed = engine.resume_client(client.ctx, through_json(state))
    same_session(client, resumed, mysql_handover.RUNTIME)
    assert list(resumed.statements) == [1, 2] and resumed.next_statement_id == client.next_statement_id
    assert [s.key for s in resumed.statements.values()] == [s.key for s in client.statements.values()]
    assert resumed.logged_in and engine.server_version == state["server_version"]
    busy = held_client()
    busy.client_data(prepare())
    assert busy.handover_state() is None


def test_tds_session_round_trip_keeps_prepared_handles():
    client, state = tds_client(), TDSServerState()
    send(client, state, rpc(prepare_call()))
    answer(client, prepared_answer(77))
    client.options["DATEFIRST"] = "SET DATEFIRST 3"
    exported = client.handover_state()
    assert exported is not None
    resumed = TDSEngine().resume_client(client.ctx, through_json(exported))
    same_session(client, resumed, tds_handover.RUNTIME | {"login"})
    assert resumed.handles.keys() == client.handles.keys()
    assert [(p.key, p.decl, p.stmt) for p in resumed.handles.values()] == \
        [(p.key, p.decl, p.stmt) for p in client.handles.values()]
    assert resumed.reader.max_packet_size == client.packet_size and resumed.tls is None
    assert client.login.password and resumed.login.password == ""          # no secret travels
    assert client.login.password not in json.dumps(exported)
    assert resumed.login.language == client.login.language and resumed.login.packet_size == client.login.packet_size


def test_tds_clients_encrypting_everything_stay():
    client = tds_logged_in()
    client.tls_full = True
    assert client.handover_state() is None and tds_handover.not_idle(client) == "TLS"


# ---------------------------------------------------------------- the new process against another version

def test_the_new_process_refuses_a_running_process_of_another_version(tmp_path):
    import threading
    from types import SimpleNamespace

    from multiproxy.takeover import Takeover, TakeoverError
    path = str(tmp_path / "takeover.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)
    heard = []

    def old_process():
        conn, _ = server.accept()
        with conn:
            reader = RecordReader(conn)
            heard.append(reader.read()[0])
            send_record(conn, {**hello(4242, multiproxy="0.0.1"), "version": HANDOVER_VERSION + 98})
            heard.append(reader.read()[0])
    thread = threading.Thread(target=old_process, daemon=True)
    thread.start()
    proxy = SimpleNamespace(config=SimpleNamespace(proxy=SimpleNamespace(workers=1, admin_listen="")), listeners=[])
    with pytest.raises(TakeoverError, match=r"pid 4242, multiproxy 0.0.1\) speaks takeover version %d"
                       % (HANDOVER_VERSION + 98)):
        Takeover(proxy, path).connect()
    thread.join(5)
    server.close()
    assert heard[0]["type"] == "hello" and heard[0]["version"] == HANDOVER_VERSION
    assert heard[1]["type"] == "refused" and "cannot hand clients over" in heard[1]["reason"]


# ---------------------------------------------------------------- fuzzing

_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(), st.binary(),
                     st.sampled_from(list(PinReason)))
_hashables = st.recursive(_scalars, lambda inner: st.tuples(inner, inner) | st.frozensets(inner, max_size=3),
                          max_leaves=6)
_values = st.recursive(
    _scalars,
    lambda inner: (st.lists(inner, max_size=4) | st.tuples(inner, inner) | st.sets(_hashables, max_size=3)
                   | st.dictionaries(st.text(), inner, max_size=3) | st.dictionaries(_hashables, inner, max_size=3)
                   | st.lists(inner, max_size=3).map(deque)),
    max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(_values)
def test_any_value_survives_the_codec(value):
    assert decode(json.loads(json.dumps(encode(value)))) == value


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_garbage_on_the_takeover_socket_is_only_ever_a_handover_error(data):
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with left, right:
        left.sendall(data)
        left.close()
        reader = RecordReader(right)
        with pytest.raises(HandoverError):
            while True:
                record, fds = reader.read()
                assert isinstance(record, dict) and fds == []
