"""Hypothesis fuzzing of PostgresClient: handshake and client bytes may only fail with ProtocolError; backend bytes never fail."""
from __future__ import annotations

import dataclasses
import struct

import pytest

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engines.postgres import protocol as p
from engines.postgres.auth import ScramClient
from engines.postgres.backend import PostgresLogin
from engines.postgres.client import PostgresClient
from multiproxy.auth import UsersFile, md5_verifier, scram_sha_256_verifier
from multiproxy.config import build_config
from multiproxy.engine import (
    AuthFailed, Authenticated, BackendTarget, CancelRequested, ClientContext, CloseClient, ProtocolError, StartClientTLS,
)
from multiproxy.pinning import PinPolicy

FUZZ = settings(max_examples=200, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

USERS = UsersFile.from_dict({"users": {"alice": {
    "scram_sha_256": scram_sha_256_verifier("secret", b"0123456789abcdef", 4096),
    "md5": md5_verifier("alice", "secret"),
}}})
TERMINAL = (StartClientTLS, Authenticated, CloseClient, AuthFailed, CancelRequested)


def make_client(auth: str = "trust", prepared_statements: str = "pin") -> PostgresClient:
    raw = {
        "auth": {"users_file": "users.toml"},
        "clusters": {"main": {"engine": "postgres", "hosts": ["db.internal:5432"]}},
        "listeners": [{"name": "pg", "listen": "127.0.0.1:6432", "cluster": "main", "auth": auth}],
    }
    extra = {}
    if "engine_options" in {f.name for f in dataclasses.fields(ClientContext)}:
        extra["engine_options"] = {"prepared_statements": prepared_statements}
    ctx = ClientContext(listener=build_config(raw, "", None).listeners[0], users=USERS, tls_available=False,
                        cancel_key=(1234, 5678), pin_policy=PinPolicy(), max_message_size=1 << 16, **extra)
    return PostgresClient(ctx, mock_secret=b"x" * 32)


def backend_state():
    login = PostgresLogin(BackendTarget(host="db.internal", port=5432, user="alice", database="app",
                                        password=None, tls="disable"))
    login.start()
    login.feed(p.authentication(p.AUTH_OK) + p.parameter_status("application_name", "")
               + p.parameter_status("TimeZone", "UTC") + p.parameter_status("server_version", "16.2")
               + p.backend_key_data(4242, 9999) + p.READY_IDLE)
    return login.result


def logged_in(prepared_statements: str = "pin", startup: dict | None = None) -> PostgresClient:
    client = make_client(prepared_statements=prepared_statements)
    client.receive_handshake(p.startup_message(startup or {"user": "alice", "database": "app"}))
    client.login_complete(backend_state())
    return client


def link_backend(client: PostgresClient, state, to_backend: bytes = b"") -> bytes:
    if hasattr(client, "link"):
        return client.link(state, to_backend)
    return client.link_prelude(state) + to_backend


def check_protocol_error(exc: ProtocolError) -> None:
    """The only allowed failure: a ProtocolError carrying a framed ErrorResponse for the client."""
    assert exc.reply[:1] == b"E", f"ProtocolError {exc} without an ErrorResponse reply: {exc.reply!r}"
    length = struct.unpack_from("!I", exc.reply, 1)[0]
    assert len(exc.reply) == 1 + length
    assert b"C08P01\x00" in exc.reply or b"C54000\x00" in exc.reply


def chunks_of(data: bytes, sizes: list[int]) -> list[bytes]:
    out, pos, i = [], 0, 0
    while pos < len(data):
        size = sizes[i % len(sizes)] if sizes else len(data)
        out.append(data[pos:pos + size])
        pos += size
        i += 1
    return out


def run_handshake(client: PostgresClient, chunks: list[bytes]) -> None:
    try:
        for chunk in chunks:
            events = client.receive_handshake(chunk)
            if events and isinstance(events[-1], TERMINAL):
                return
    except ProtocolError as exc:
        check_protocol_error(exc)


def run_client(client: PostgresClient, chunks: list[bytes]) -> None:
    try:
        for chunk in chunks:
            forward, local = client.client_data(chunk)
            assert isinstance(forward, bytes) and isinstance(local, bytes)
            if client.closing:
                return
    except ProtocolError as exc:
        check_protocol_error(exc)


sizes = st.lists(st.integers(1, 64), min_size=0, max_size=8)
auth_methods = st.sampled_from(["trust", "md5", "scram-sha-256"])


def mutate(data: bytes, edits: list[tuple[int, int, int]]) -> bytes:
    """Apply (operation, position, byte) edits: 0 replace, 1 insert, 2 delete, 3 truncate."""
    buf = bytearray(data)
    for op, where, value in edits:
        if not buf:
            buf.append(value)
            continue
        i = where % len(buf)
        if op == 0:
            buf[i] = value
        elif op == 1:
            buf.insert(i, value)
        elif op == 2:
            del buf[i]
        else:
            del buf[i:]
    return bytes(buf)


edits = st.lists(st.tuples(st.integers(0, 3), st.integers(0, 1 << 16), st.integers(0, 255)), min_size=1, max_size=6)

# ---------------------------------------------------------------- handshake

_SCRAM = ScramClient("alice", "secret")
SCRAM_FIRST = _SCRAM.client_first()
HANDSHAKE_STREAMS = [
    p.startup_message({"user": "alice", "database": "app", "application_name": "x", "options": "-c a=b"}),
    p.ssl_request() + p.startup_message({"user": "alice"}),
    struct.pack("!II", 8, p.GSSENC_REQUEST_CODE) + p.startup_message({"user": "alice"}),
    p.cancel_request(1234, 5678),
    p.startup_message({"user": "alice"}) + p.message(b"p", p.cstring("SCRAM-SHA-256") + p.INT32.pack(len(SCRAM_FIRST))
                                                     + SCRAM_FIRST)
    + p.message(b"p", b"c=biws,r=" + SCRAM_FIRST[-24:] + b"xyz,p=AAAA"),
    p.startup_message({"user": "mallory"}) + p.message(b"p", b"md5" + b"0" * 32 + b"\x00"),
]


@FUZZ
@given(data=st.binary(max_size=300), auth=auth_methods, split=sizes)
def test_handshake_arbitrary_bytes(data, auth, split):
    run_handshake(make_client(auth), chunks_of(data, split))


@FUZZ
@given(stream=st.sampled_from(HANDSHAKE_STREAMS), changes=edits, auth=auth_methods, split=sizes)
def test_handshake_mutated_valid_streams(stream, changes, auth, split):
    run_handshake(make_client(auth), chunks_of(mutate(stream, changes), split))


@FUZZ
@given(body=st.binary(max_size=120), version=st.sampled_from([p.PROTOCOL_VERSION_3, p.PROTOCOL_VERSION_3 | 1, 2 << 16]),
       auth=auth_methods)
def test_handshake_startup_bodies(body, version, auth):
    packet = struct.pack("!II", len(body) + 8, version) + body
    run_handshake(make_client(auth), [packet])


@FUZZ
@given(body=st.binary(max_size=200), auth=st.sampled_from(["md5", "scram-sha-256"]),
       user=st.sampled_from(["alice", "mallory"]))
def test_handshake_password_message_bodies(body, auth, user):
    client = make_client(auth)
    client.receive_handshake(p.startup_message({"user": user}))
    run_handshake(client, [p.message(b"p", body), p.message(b"p", body)])


# ---------------------------------------------------------------- client_data

FRONTEND_KINDS = b"QPBDECSHXFdcf"


def frontend_message(kind: int, body: bytes) -> bytes:
    return bytes((kind,)) + struct.pack("!I", len(body) + 4) + body


def _parse(name: bytes, sql: bytes) -> bytes:
    return frontend_message(ord("P"), name + b"\x00" + sql + b"\x00\x00\x00")


_BIND = frontend_message(ord("B"), b"\x00s1\x00\x00\x00\x00\x00\x00\x00")
_DESCRIBE = frontend_message(ord("D"), b"Ss1\x00")
_EXECUTE = frontend_message(ord("E"), b"\x00\x00\x00\x00\x00")
_SYNC = frontend_message(ord("S"), b"")
CLIENT_STREAMS = [
    p.query("SELECT 1"),
    p.query("BEGIN; SET search_path = x; CREATE TEMP TABLE t (id int)"),
    _parse(b"", b"SELECT $1") + _SYNC + frontend_message(ord("D"), b"S\x00") + _SYNC
    + frontend_message(ord("B"), b"\x00\x00\x00\x00\x00\x00\x00\x00") + _EXECUTE + _SYNC,
    _parse(b"s1", b"SELECT 1") + _BIND + _DESCRIBE + _EXECUTE + frontend_message(ord("C"), b"Ss1\x00") + _SYNC,
    p.query("COPY t FROM STDIN") + frontend_message(ord("d"), b"1\n") + frontend_message(ord("c"), b""),
    frontend_message(ord("F"), b"\x00\x00\x04\xd2\x00\x00\x00\x00\x00\x00") + frontend_message(ord("X"), b""),
]

# Bodies either arbitrary or assembled from the pieces parsers look for (NULs, names, 'S'/'P' targets).
bodies = st.one_of(
    st.binary(max_size=40),
    st.lists(st.sampled_from([b"\x00", b"s1", b"S", b"P", b"\x00\x00", b"\x00\x01", b"SELECT 1"]), max_size=6).map(b"".join),
)
framed_messages = st.lists(
    st.tuples(st.sampled_from(FRONTEND_KINDS), bodies).map(lambda kb: frontend_message(*kb)),
    max_size=8,
).map(b"".join)


@FUZZ
@given(data=st.binary(max_size=300), split=sizes)
def test_client_data_arbitrary_bytes(data, split):
    run_client(logged_in(), chunks_of(data, split))


@FUZZ
@given(data=framed_messages, split=sizes)
def test_client_data_framed_messages_with_arbitrary_bodies(data, split):
    run_client(logged_in(), chunks_of(data, split))


@FUZZ
@given(stream=st.sampled_from(CLIENT_STREAMS), changes=edits, split=sizes)
def test_client_data_mutated_valid_streams(stream, changes, split):
    run_client(logged_in(), chunks_of(mutate(stream, changes), split))


@FUZZ
@given(data=framed_messages, split=sizes)
def test_client_data_while_discarding_after_a_lost_transaction(data, split):
    client = logged_in()
    client.client_data(p.query("BEGIN"))
    client.backend_data(p.message(b"C", p.cstring("BEGIN")) + p.ready_for_query(p.TX_IN_TRANSACTION))
    client.backend_lost("connection reset")
    run_client(client, chunks_of(data, split))


@FUZZ
@given(data=framed_messages, split=sizes)
def test_client_data_with_virtualised_statements_on_a_linked_backend(data, split):
    client = logged_in(prepared_statements="virtualize")
    state = backend_state()
    try:
        link_backend(client, state, client.client_data(_parse(b"s1", b"SELECT 1") + _SYNC)[0])
        for chunk in chunks_of(data, split):
            client.client_data(chunk)
    except ProtocolError as exc:
        check_protocol_error(exc)


def test_bind_with_an_unterminated_statement_name_is_a_protocol_error_when_virtualising():
    client = logged_in(prepared_statements="virtualize")
    link_backend(client, backend_state(), client.client_data(_parse(b"s1", b"SELECT 1") + _SYNC)[0])
    try:
        client.client_data(frontend_message(ord("B"), b"\x00s1"))
    except ProtocolError as exc:
        check_protocol_error(exc)
    else:
        raise AssertionError("a Bind without a terminated statement name was accepted")


# ---------------------------------------------------------------- backend_data

def _fields(items: list[tuple[bytes, bytes]]) -> bytes:
    return b"".join(code + value.replace(b"\x00", b"") + b"\x00" for code, value in items) + b"\x00"


field_items = st.lists(st.tuples(st.sampled_from([b"S", b"V", b"C", b"M", b"D", b"H"]), st.binary(max_size=12)),
                       max_size=5)


def backend_message(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack("!I", len(body) + 4) + body


server_messages = st.one_of(
    st.sampled_from(b"IET").map(lambda status: backend_message(b"Z", bytes((status,)))),
    st.tuples(st.binary(max_size=12), st.binary(max_size=12)).map(
        lambda nv: backend_message(b"S", nv[0].replace(b"\x00", b"") + b"\x00" + nv[1].replace(b"\x00", b"") + b"\x00")),
    field_items.map(lambda items: backend_message(b"E", _fields(items))),
    field_items.map(lambda items: backend_message(b"N", _fields(items))),
    st.tuples(st.sampled_from([b"G", b"H", b"W"]), st.binary(max_size=8)).map(lambda kb: backend_message(*kb)),
    st.tuples(st.sampled_from([b"1", b"2", b"3", b"A", b"C", b"D", b"T", b"t", b"n", b"s", b"I", b"d", b"c", b"K"]),
              st.binary(max_size=40)).map(lambda kb: backend_message(*kb)),
)


@FUZZ
@given(messages=st.lists(server_messages, max_size=12), split=sizes,
       request=st.sampled_from([b"", p.query("SELECT 1"), _parse(b"", b"SELECT 1") + _SYNC + _SYNC]))
def test_backend_data_never_raises(messages, split, request):
    client = logged_in()
    if request:
        client.client_data(request)
    data = b"".join(messages)
    out = b""
    for chunk in chunks_of(data, split):
        to_client, release = client.backend_data(chunk)
        assert isinstance(release, bool)
        out += to_client
    assert out == data                          # nothing internal was pending: everything reaches the client


@FUZZ
@given(messages=st.lists(server_messages, max_size=12), split=sizes)
def test_backend_data_never_raises_while_a_replay_is_pending(messages, split):
    client = logged_in(startup={"user": "alice", "database": "app", "application_name": "fuzz"})
    link_backend(client, backend_state(), client.client_data(p.query("SELECT 1"))[0])
    for chunk in chunks_of(b"".join(messages), split):
        client.backend_data(chunk)


@FUZZ
@given(messages=st.lists(server_messages, max_size=12), split=sizes)
def test_backend_data_never_raises_with_virtualised_statements(messages, split):
    client = logged_in(prepared_statements="virtualize")
    link_backend(client, backend_state(), client.client_data(_parse(b"s1", b"SELECT 1") + _BIND + _EXECUTE + _SYNC)[0])
    for chunk in chunks_of(b"".join(messages), split):
        client.backend_data(chunk)
