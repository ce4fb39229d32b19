"""Golden byte vectors of MySQL conversations replayed through MySQLClient whole, byte by byte and in random chunks."""
from __future__ import annotations

import random

import pytest

from multiproxy_engines.mysql import MySQLEngine
from multiproxy_engines.mysql import protocol as p
from multiproxy_engines.mysql.auth import ed25519_public_key, ed25519_sign, native_scramble, sha2_scramble
from multiproxy_engines.mysql.backend import MySQLLogin, MySQLServerState
from multiproxy_engines.mysql.client import MySQLClient
from multiproxy_engines.mysql.pinning import MySQLPinReason, classify
from multiproxy.auth import UsersFile
from multiproxy.config import build_config
from multiproxy.engine import (
    HELD_REFUSAL, AuthFailed, Authenticated, BackendError, BackendTarget, ClientContext, ClientQuit, ErrorKind,
    PinReason, ProtocolError,
)
from multiproxy.pinning import PinPolicy

USERS = UsersFile()
USERS.add("alice", "secret", kinds=["mysql_native_password", "caching_sha2_password"])


def make_client(auth: str = "trust", deprecate_eof: bool = False, cancels: list | None = None,
                options: dict | None = None) -> MySQLClient:
    raw = {"auth": {"users_file": "users.toml"},
           "clusters": {"main": {"engine": "mysql", "hosts": ["db.internal:3306"]}},
           "listeners": [{"name": "my", "listen": "127.0.0.1:6033", "cluster": "main", "auth": auth}]}
    ctx = ClientContext(listener=build_config(raw, "", None).listeners[0], users=USERS, tls_available=False,
                        cancel_key=7, pin_policy=PinPolicy(), max_message_size=1 << 20,
                        engine_options=options or {})
    if cancels is not None:
        ctx.cancel = lambda key, terminate=False: cancels.append((key, terminate))
    return MySQLClient(ctx, MySQLEngine())


def server_state(**kwargs) -> MySQLServerState:
    kwargs.setdefault("multi_statements", True)     # as the backend logged in for these clients
    state = MySQLServerState(version=b"10.11.6-MariaDB", thread_id=99, mariadb=True, schema="app",
                             login_schema="app", **kwargs)
    return state


def logged_in(deprecate_eof: bool = False, **kwargs) -> MySQLClient:
    client = make_client(**kwargs)
    greeting = client.start()
    assert greeting[4] == 10
    caps = (p.CLIENT_PROTOCOL_41 | p.CLIENT_SECURE_CONNECTION | p.CLIENT_PLUGIN_AUTH | p.CLIENT_CONNECT_WITH_DB
            | (p.CLIENT_DEPRECATE_EOF if deprecate_eof else 0) | p.CLIENT_MULTI_STATEMENTS | p.CLIENT_MULTI_RESULTS)
    events = client.receive_handshake(p.packet(1, p.handshake_response(caps, 45, b"alice", b"", b"app",
                                                                         b"mysql_native_password")))
    assert isinstance(events[-1], Authenticated)
    ok = client.login_complete(server_state())
    assert ok == p.packet(2, p.ok_payload(p.SERVER_STATUS_AUTOCOMMIT))
    return client


# ---------------------------------------------------------------- backend packets (spec names)

AC = p.SERVER_STATUS_AUTOCOMMIT


def ok(seq=1, status=AC, affected=0, insert_id=0):
    return p.packet(seq, p.ok_payload(status, affected, insert_id))


def eof(seq, status=AC):
    return p.packet(seq, p.eof_payload(status))


def column(seq, name=b"a"):
    payload = (p.lenenc_str(b"def") + p.lenenc_str(b"") * 3 + p.lenenc_str(name) + p.lenenc_str(b"")
               + b"\x0c\x3f\x00\x0b\x00\x00\x00\x03\x00\x00\x00\x00\x00")
    return p.packet(seq, payload)


def row(seq, *values: bytes):
    return p.packet(seq, b"".join(p.lenenc_str(v) for v in values))


def resultset(values, status=AC, deprecate=False, first_seq=1):
    seq = first_seq
    out = [p.packet(seq, b"\x01"), column(seq + 1)]
    seq += 2
    if not deprecate:
        out.append(eof(seq, status))
        seq += 1
    for value in values:
        out.append(row(seq, value))
        seq += 1
    out.append(p.packet(seq, p.ok_payload(status, header_byte=0xFE)) if deprecate else eof(seq, status))
    return b"".join(out)


def query(sql: bytes) -> bytes:
    return p.packet(0, b"\x03" + sql)


def chunkings(data: bytes, seed: int = 3):
    yield [data]
    yield [data[i:i + 1] for i in range(len(data))]
    rng = random.Random(seed)
    for _ in range(5):
        parts, pos = [], 0
        while pos < len(data):
            size = rng.randint(1, 9)
            parts.append(data[pos:pos + size])
            pos += size
        yield parts


def run_backend(client_factory, request: bytes, response: bytes):
    """Feed `response` in every chunking to fresh clients; return (output, indexes where release came) of each."""
    results = []
    for parts in chunkings(response):
        client = client_factory()
        forward, local = client.client_data(request)
        assert local == b""
        client.link(server_state(), forward)
        out, releases = [], []
        for i, part in enumerate(parts):
            data, release = client.backend_data(part)
            out.append(data)
            if release:
                releases.append(i)
        results.append((b"".join(out), releases, len(parts), client))
    return results


CASES = {
    "text resultset": (False, b"SELECT a FROM t", resultset([b"1", b"2"])),
    "deprecate eof resultset": (True, b"SELECT a FROM t", resultset([b"x"], deprecate=True)),
    "multi results": (False, b"SELECT 1; SELECT 2",
                      resultset([b"1"], status=AC | p.SERVER_MORE_RESULTS_EXISTS) + resultset([b"2"], first_seq=6)),
    "ok then err": (False, b"DO 1; DO x", ok(status=AC | p.SERVER_MORE_RESULTS_EXISTS)
                    + p.packet(2, p.err_payload(1054, "42S22", "Unknown column"))),
    "empty resultset": (False, b"SELECT a FROM t WHERE 0", resultset([])),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_response_passes_through_and_releases_at_the_end(name):
    deprecate, sql, response = CASES[name]
    for out, releases, count, client in run_backend(lambda: logged_in(deprecate_eof=deprecate), query(sql), response):
        assert out == response
        assert releases == [count - 1], (name, releases, count)
        assert client.is_clean()


def test_transaction_keeps_the_backend_until_commit():
    client = logged_in()
    # the proxy answers BEGIN itself and sends it in front of the next request
    assert client.client_data(query(b"BEGIN")) == (b"", ok(status=AC | p.SERVER_STATUS_IN_TRANS))
    forward, _ = client.client_data(query(b"INSERT INTO t VALUES (1)"))
    sent = client.link(server_state(), forward)
    assert sent == query(b"BEGIN") + query(b"INSERT INTO t VALUES (1)")
    out, release = client.backend_data(ok(status=AC | p.SERVER_STATUS_IN_TRANS)
                                       + ok(status=AC | p.SERVER_STATUS_IN_TRANS, affected=1, insert_id=5))
    assert out == ok(status=AC | p.SERVER_STATUS_IN_TRANS, affected=1, insert_id=5) and release is False
    assert not client.is_clean()
    client.client_data(query(b"COMMIT"))
    assert client.backend_data(ok())[1] is True
    assert client.last_insert_id == 5


def test_autocommit_off_implicit_transaction_and_error_keeps_state():
    client = logged_in()
    client.link(server_state(), client.client_data(query(b"SET autocommit=0"))[0])
    assert client.backend_data(ok(status=0))[1] is True         # no transaction opened yet
    assert client.autocommit is False
    client.client_data(query(b"INSERT INTO t VALUES (1)"))
    assert client.backend_data(ok(status=p.SERVER_STATUS_IN_TRANS))[1] is False
    client.client_data(query(b"SELECT nope"))
    assert client.backend_data(p.packet(1, p.err_payload(1054, "42S22", "x")))[1] is False   # ERR: still in trans


def test_tracked_settings_are_replayed_on_link_and_the_internal_answer_is_swallowed():
    client = logged_in()
    state_a = server_state()
    client.link(state_a, client.client_data(query(b"SET sql_mode='ANSI', time_zone='+01:00'"))[0])
    assert client.backend_data(ok())[1] is True
    client.unlink()
    assert state_a.variables == {"sql_mode": "'ANSI'", "time_zone": "'+01:00'"}
    state_b = server_state()
    sent = client.link(state_b, client.client_data(query(b"SELECT 1"))[0])
    assert sent.startswith(p.packet(0, b"\x03SET SESSION sql_mode = 'ANSI', SESSION time_zone = '+01:00'")
                           ) or b"SET " in sent
    assert sent.endswith(query(b"SELECT 1"))
    response = resultset([b"1"])
    out, release = client.backend_data(ok() + response)
    assert out == response and release is True
    assert state_b.variables == state_a.variables


def test_schema_and_autocommit_replay():
    client = logged_in()
    state_a = server_state()
    client.link(state_a, client.client_data(p.packet(0, b"\x02other"))[0])
    client.backend_data(ok())
    client.unlink()
    client.link(state_a, client.client_data(query(b"SET autocommit=0"))[0])
    client.backend_data(ok(status=0))
    client.unlink()
    fresh = server_state()
    sent = client.link(fresh, client.client_data(query(b"SELECT 1"))[0])
    assert p.packet(0, b"\x02other") in sent and b"SESSION autocommit = 0" in sent
    out, release = client.backend_data(ok() + ok(status=0) + resultset([b"1"], status=0))
    assert out == resultset([b"1"], status=0) and release is True
    assert fresh.schema == "other"


def test_pins_are_reported():
    client = logged_in()
    forward, _ = client.client_data(query(b"SET @x = 1"))
    assert not client.pinned            # not before the request reaches a backend
    client.link(server_state(), forward)
    assert client.pinned and client.pin_details[0][0] == MySQLPinReason.USER_VARIABLE


def test_ping_and_quit_answered_locally_and_kill_is_routed():
    cancels: list = []
    client = logged_in(cancels=cancels)
    assert client.client_data(p.packet(0, b"\x0e")) == (b"", ok())
    assert client.client_data(query(b"KILL QUERY 4242")) == (b"", ok())
    assert client.client_data(p.packet(0, b"\x0c" + (77).to_bytes(4, "little"))) == (b"", ok())
    assert client.client_data(query(b"KILL CONNECTION 78")) == (b"", ok())
    assert client.client_data(query(b"KILL 79")) == (b"", ok())
    assert cancels == [(4242, False), (77, True), (78, True), (79, True)]
    with pytest.raises(ClientQuit) as quit:
        client.client_data(p.packet(0, b"\x01"))
    assert (quit.value.to_backend, quit.value.to_client) == (b"", b"")


def test_local_infile():
    client = logged_in()
    client.link(server_state(), client.client_data(query(b"LOAD DATA LOCAL INFILE 'f' INTO TABLE t"))[0])
    request = p.packet(1, b"\xfbf")
    assert client.backend_data(request) == (request, False)
    content = p.packet(2, b"1\n2\n") + p.packet(3, b"")
    assert client.client_data(content) == (content, b"")
    assert client.backend_data(ok(4, affected=2))[1] is True


def test_prepare_response_with_params_and_columns():
    client = logged_in()
    client.link(server_state(), client.client_data(p.packet(0, b"\x16SELECT a FROM t WHERE b = ?"))[0])
    response = (p.packet(1, b"\x00" + (1).to_bytes(4, "little") + b"\x01\x00\x01\x00\x00\x00\x00")
                + column(2, b"?") + eof(3) + column(4) + eof(5))
    for parts in chunkings(response):
        fresh = logged_in()
        fresh.link(server_state(), fresh.client_data(p.packet(0, b"\x16SELECT a FROM t WHERE b = ?"))[0])
        out = b"".join(fresh.backend_data(part)[0] for part in parts)
        assert out == response and not fresh.fifo
        # statements move between backends (test_mysql_statements.py): the proxy's id 1 happens to be the server's
        assert not fresh.pinned and fresh.statements[1].params == 1 and fresh.statements[1].columns == 1


def test_bad_sequence_and_oversized_commands():
    client = logged_in()
    with pytest.raises(ProtocolError):
        client.client_data(p.packet(2, b"\x03SELECT 1"))
    client = logged_in()
    with pytest.raises(ProtocolError) as too_large:
        client.client_data((2 << 20).to_bytes(3, "little") + b"\x00\x03")
    assert too_large.value.kind == ErrorKind.MESSAGE_TOO_LARGE


def test_fail_pending_answers_with_err_and_backend_lost():
    client = logged_in()
    client.client_data(query(b"SELECT 1"))
    reply = client.fail_pending(ErrorKind.POOL_TIMEOUT, "no backend")
    assert p.parse_err(reply[4:])[0] == p.ER_CON_COUNT_ERROR
    client.link(server_state(), client.client_data(query(b"BEGIN"))[0])
    client.backend_data(ok(status=AC | p.SERVER_STATUS_IN_TRANS))
    data, close = client.backend_lost("gone")
    assert data == b"" and close is False
    forward, local = client.client_data(query(b"SELECT 1"))
    assert forward == b"" and b"rolled back" in local


# ---------------------------------------------------------------- authentication


def _handshake_nonce(greeting: bytes) -> bytes:
    return p.parse_handshake_v10(greeting[4:])["nonce"]


def test_native_password_auth_and_wrong_password():
    for password, expected in (("secret", Authenticated), ("nope", AuthFailed)):
        client = make_client(auth="mysql_native_password")
        nonce = _handshake_nonce(client.start())
        caps = p.CLIENT_PROTOCOL_41 | p.CLIENT_SECURE_CONNECTION | p.CLIENT_PLUGIN_AUTH
        events = client.receive_handshake(p.packet(1, p.handshake_response(
            caps, 45, b"alice", native_scramble(password, nonce), b"", b"mysql_native_password")))
        assert isinstance(events[-1], expected)


def test_a_missing_verifier_is_named_in_the_log_and_not_to_the_client():
    """A user with no verifier of the listener's kind (stored with the default kinds, PostgreSQL's) or no user at all
    fails as a wrong password does for the client; the reason logged says what to do."""
    from multiproxy_engines.mysql.auth import rsa_encrypt_password
    USERS.add("pg_only", "secret")
    caps = p.CLIENT_PROTOCOL_41 | p.CLIENT_SECURE_CONNECTION | p.CLIENT_PLUGIN_AUTH
    try:
        for user, expected in (("pg_only", "the user has no caching_sha2_password verifier in the users file "
                                           "(`multiproxy users add pg_only --kind caching_sha2_password` stores one)"),
                               ("nobody", "no such user")):
            client = make_client(auth="caching_sha2_password")
            nonce = _handshake_nonce(client.start())
            events = client.receive_handshake(p.packet(1, p.handshake_response(
                caps, 45, user.encode(), sha2_scramble("secret", nonce), b"", b"caching_sha2_password")))
            assert events[-1].data == p.packet(2, b"\x01\x04")       # full authentication, as for a wrong one
            pem = client.receive_handshake(p.packet(3, b"\x02"))[-1].data[5:]
            failed = client.receive_handshake(p.packet(5, rsa_encrypt_password(pem, "secret", nonce)))[-1]
            assert isinstance(failed, AuthFailed) and failed.reason == expected
            assert b"Access denied for user '%s'" % user.encode() in failed.data
        client = make_client(auth="mysql_native_password")
        nonce = _handshake_nonce(client.start())
        failed = client.receive_handshake(p.packet(1, p.handshake_response(
            caps, 45, b"pg_only", native_scramble("secret", nonce), b"", b"mysql_native_password")))[-1]
        assert isinstance(failed, AuthFailed) and "no mysql_native_password verifier" in failed.reason
    finally:
        USERS.remove("pg_only")


def test_caching_sha2_fast_path_auth_switch_and_rsa_full_auth():
    from multiproxy_engines.mysql.auth import rsa_encrypt_password
    client = make_client(auth="caching_sha2_password")
    nonce = _handshake_nonce(client.start())
    caps = p.CLIENT_PROTOCOL_41 | p.CLIENT_SECURE_CONNECTION | p.CLIENT_PLUGIN_AUTH
    events = client.receive_handshake(p.packet(1, p.handshake_response(
        caps, 45, b"alice", sha2_scramble("secret", nonce), b"", b"caching_sha2_password")))
    assert isinstance(events[-1], Authenticated)
    assert client.login_complete(server_state()).startswith(p.packet(2, b"\x01\x03"))
    # a client speaking native first is switched; full authentication by RSA
    client = make_client(auth="caching_sha2_password", options={"caching_sha2_fast_auth": "false"})
    client.start()
    events = client.receive_handshake(p.packet(1, p.handshake_response(caps, 45, b"alice", b"x" * 20, b"",
                                                                         b"mysql_native_password")))
    switch = events[-1].data
    assert switch[4] == 0xFE and b"caching_sha2_password" in switch
    nonce = switch[4:][1 + len(b"caching_sha2_password") + 1:-1]
    events = client.receive_handshake(p.packet(3, sha2_scramble("secret", nonce)))
    assert events[-1].data == p.packet(4, b"\x01\x04")
    events = client.receive_handshake(p.packet(5, b"\x02"))
    pem = events[-1].data[5:]
    assert pem.startswith(b"-----BEGIN PUBLIC KEY")
    events = client.receive_handshake(p.packet(7, rsa_encrypt_password(pem, "secret", nonce)))
    assert isinstance(events[-1], Authenticated)


def test_ed25519_signature_is_standard():
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    message = bytes(range(32))
    Ed25519PublicKey.from_public_bytes(ed25519_public_key("pw")).verify(ed25519_sign("pw", message), message)


def test_backend_login_native_and_refusal():
    login = MySQLLogin(BackendTarget(host="db", port=3306, user="u", database="app", password="pw", tls="disable",
                                     params={"capabilities": p.CLIENT_DEPRECATE_EOF, "charset": 45}))
    assert login.start() == b""
    nonce = b"abcdefghijklmnopqrst"
    greeting = p.handshake_v10(b"10.11.6-MariaDB", 55, nonce, 0xFFFFFFFF & ~p.CLIENT_SSL, 45, AC,
                               b"mysql_native_password")
    response = login.feed(p.packet(0, greeting))
    info = p.parse_handshake_response(response[4:])
    assert info["user"] == b"u" and info["auth"] == native_scramble("pw", nonce)
    assert info["capabilities"] & p.CLIENT_DEPRECATE_EOF
    login.feed(ok(2))
    assert login.done and login.result.thread_id == 55
    refused = MySQLLogin(BackendTarget(host="db", port=3306, user="u", database="app", password="pw", tls="disable"))
    refused.feed(p.packet(0, greeting))
    with pytest.raises(BackendError) as exc:
        refused.feed(p.packet(2, p.err_payload(1045, "28000", "Access denied")))
    assert exc.value.fatal_auth


def test_classifier_tracks_and_pins():
    assert classify("SET NAMES utf8mb4").assigns == {"names": "NAMES utf8mb4"}
    assert classify("SET sql_mode = CONCAT(@@sql_mode, 'x')").readback == [("sql_mode", "sql_mode")]
    assert classify("select 'a@b.c'").pins == []
    assert classify("KILL QUERY 5").kill == ("query", 5)
    assert classify("LOCK TABLES t READ").pins[0][0] == PinReason.TABLE_LOCK
    assert classify("FLUSH TABLES WITH READ LOCK").pins[0][0] == PinReason.TABLE_LOCK
    assert classify("XA START 'x'").pins[0][0] == MySQLPinReason.XA


# ---------------------------------------------------------------- read-only refusals (issue 11)

def read_only_err(code=1290, text=b"The MariaDB server is running with the --read-only option so it cannot "
                                   b"execute this statement"):
    return p.packet(1, b"\xff" + code.to_bytes(2, "little") + b"#HY000" + text)


def retrying() -> MySQLClient:
    client = logged_in()
    client.retry_read_only = True
    return client


@pytest.mark.parametrize("code", [1290, 1792, 1836])
def test_a_read_only_refusal_is_held_then_delivered_or_given_back(code):
    client = retrying()
    insert = query(b"INSERT INTO t VALUES (1)")
    client.link(server_state(), client.client_data(insert)[0])
    refusal = read_only_err(code)
    assert client.backend_data(refusal) == (b"", HELD_REFUSAL) and client.retry_request == insert
    assert client.retry_declined() == (refusal, True)        # the node is still the writer
    assert client.retry_request is None
    client.unlink()
    client.link(server_state(), client.client_data(insert)[0])
    assert client.backend_data(refusal) == (b"", HELD_REFUSAL)
    assert client.retry_accepted() == insert                 # the node is no writer: sent to the new one
    client.unlink()
    assert client.link(server_state(), insert) == insert
    assert client.backend_data(ok()) == (ok(), True)


@pytest.mark.parametrize("setup, statement", [
    (b"SET SESSION TRANSACTION READ ONLY", b"INSERT INTO t VALUES (1)"),
    (b"SET @@session.tx_read_only = ON", b"INSERT INTO t VALUES (1)"),
    (None, b"START TRANSACTION READ ONLY; INSERT INTO t VALUES (1)"),
])
def test_a_session_that_asked_for_read_only_gets_its_refusal_at_once(setup, statement):
    client = retrying()
    if setup is not None:
        client.link(server_state(), client.client_data(query(setup))[0])
        assert client.backend_data(ok())[1] is True
        client.unlink()
    state = server_state()
    state.variables = dict(client.variables)
    client.link(state, client.client_data(query(statement))[0])
    refusal = read_only_err(1792, b"Cannot execute statement in a READ ONLY transaction")
    assert client.backend_data(refusal) == (refusal, True) and client.retry_request is None


@pytest.mark.parametrize("last", [0, 7])
def test_an_ed25519_switch_whose_nonce_ends_with_a_zero_byte_is_signed_whole(last):
    """MariaDB's client_ed25519 sends 32 random bytes with no terminator: one nonce in 256 ends with 0x00, which is
    part of the message to sign (a login refused "Access denied" once in 256 before)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from multiproxy.engine import BackendTarget
    login = MySQLLogin(BackendTarget(host="db", port=3306, user="mp", database="d", password="ed-pw", tls="disable"))
    login.start()
    login.feed(p.packet(0, p.handshake_v10(b"10.11.6-MariaDB", 9, b"n" * 20, 0xFFFFFFFF & ~p.CLIENT_SSL, 45,
                                          p.SERVER_STATUS_AUTOCOMMIT, b"mysql_native_password")))
    nonce = bytes(range(1, 32)) + bytes([last])
    answer = login.feed(p.packet(2, p.auth_switch_request(b"client_ed25519", nonce)))
    signature = answer[4:]
    assert len(signature) == 64
    Ed25519PublicKey.from_public_bytes(ed25519_public_key("ed-pw")).verify(signature, nonce)
