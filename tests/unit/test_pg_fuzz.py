"""Hypothesis fuzzing of PostgresClient: handshake and client bytes may only fail with ProtocolError; backend bytes never fail."""
from __future__ import annotations

import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from multiproxy_engines.postgres import protocol as p
from multiproxy_engines.postgres.client import PostgresClient
from multiproxy.engine import (
    AuthFailed, Authenticated, CancelRequested, ClientQuit, CloseClient, ProtocolError, StartClientTLS,
)

from ..fuzzkit import (
    PG_BIND as _BIND, PG_CLIENT_STREAMS as CLIENT_STREAMS, PG_EXECUTE as _EXECUTE, PG_HANDSHAKE_STREAMS as HANDSHAKE_STREAMS,
    PG_SYNC as _SYNC, check_pg_error, chunks_of, edits, mutate, pg_backend_state as backend_state, pg_client,
    pg_framed_messages as framed_messages, pg_logged_in as logged_in, pg_message as frontend_message, pg_parse as _parse,
    sizes,
)

FUZZ = settings(max_examples=200, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
TERMINAL = (StartClientTLS, Authenticated, CloseClient, AuthFailed, CancelRequested)


def make_client(auth: str = "trust") -> PostgresClient:
    return pg_client(auth, max_message=1 << 16)


def link_backend(client: PostgresClient, state, to_backend: bytes = b"") -> bytes:
    return client.link(state, to_backend)


def check_protocol_error(exc: ProtocolError) -> None:
    """The only allowed failure: a ProtocolError carrying a framed ErrorResponse: 08P01, or 54000 (too large)."""
    check_pg_error(exc.reply)
    assert b"C08P01\x00" in exc.reply or b"C54000\x00" in exc.reply


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
    except ClientQuit as said:
        assert isinstance(said.to_backend, bytes) and isinstance(said.to_client, bytes)
    except ProtocolError as exc:
        check_protocol_error(exc)


auth_methods = st.sampled_from(["trust", "md5", "scram-sha-256"])

# ---------------------------------------------------------------- handshake


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
    except ClientQuit:
        pass
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
