"""TDS engine units: handshake byte vectors fed whole, bytewise and in random chunks; relay framing; classifier; fuzz."""
from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from multiproxy_engines.tds import TDSEngine
from multiproxy_engines.tds.backend import TDSServerState
from multiproxy_engines.tds.pinning import classify_batch, classify_rpc
from multiproxy_engines.tds.auth import check_tds_sha256, tds_sha256_verifier
from multiproxy.auth import UsersFile
from multiproxy.contract import check_engine, contract_context
from multiproxy.engine import Authenticated, AuthFailed, CloseClient, PinReason, ProtocolError, SendToClient
from multiproxy_engines.tds.wire import messages as tp
from multiproxy_engines.tds.wire import token_stream as tk
from multiproxy_engines.tds.wire.response_scanner import Reframer, ResponseScanner

from ..fuzzkit import TDS_PRELOGIN, chunks_of, drive, tds_client, tds_logged_in

PRELOGIN = tp.encode_message(tp.PRELOGIN, tp.Prelogin.build(encryption=tp.ENCRYPT_NOT_SUP).encode())
LOGIN = tp.encode_message(tp.LOGIN7, tp.Login7(username="app", password="pw", database="db").encode())


def client(auth="scram-sha-256"):
    engine = TDSEngine()
    ctx = contract_context(engine, auth)
    users = UsersFile()
    users.add("app", "pw", kinds=["tds_sha256"])
    ctx.users = users
    return engine.client_protocol(ctx)


def feed(proto, data, mode, rng=None):
    events = []
    if mode == "whole":
        return proto.receive_handshake(data)
    pos = 0
    while pos < len(data):
        size = 1 if mode == "bytewise" else rng.randint(1, 40)
        events += proto.receive_handshake(data[pos:pos + size])
        pos += size
    return events


@pytest.mark.parametrize("mode", ["whole", "bytewise", "random"])
def test_login_in_any_chunking(mode):
    proto = client()
    events = feed(proto, PRELOGIN, mode, random.Random(1))
    assert len(events) == 1 and isinstance(events[0], SendToClient)
    reply = tp.MessageReader().feed(events[0].data)[0]
    assert tp.Prelogin.decode(reply.data).encryption == tp.ENCRYPT_NOT_SUP
    assert tp.Prelogin.decode(reply.data).mars == 0
    events = feed(proto, LOGIN, mode, random.Random(2))
    assert events == [Authenticated("app", "db", {})]
    out = proto.login_complete(TDSServerState(database="db"))
    toks = tk.TokenReader().read(tp.MessageReader().feed(out)[0].data)
    order = [(t.type, t.fields.get("env_type")) for t in toks]
    assert order == [(tk.TOKEN_ENVCHANGE, tk.ENV_DATABASE), (tk.TOKEN_INFO, None),
                     (tk.TOKEN_ENVCHANGE, tk.ENV_COLLATION), (tk.TOKEN_ENVCHANGE, tk.ENV_LANGUAGE),
                     (tk.TOKEN_INFO, None), (tk.TOKEN_LOGINACK, None), (tk.TOKEN_ENVCHANGE, tk.ENV_PACKETSIZE),
                     (tk.TOKEN_DONE, None)]


def test_wrong_password_and_sspi_are_refused():
    proto = client()
    proto.receive_handshake(PRELOGIN)
    bad = tp.encode_message(tp.LOGIN7, tp.Login7(username="app", password="nope").encode())
    [event] = proto.receive_handshake(bad)
    assert isinstance(event, AuthFailed)
    proto = client()
    proto.receive_handshake(PRELOGIN)
    sspi = tp.encode_message(tp.LOGIN7, tp.Login7(option_flags2=0x83, sspi=b"NTLMSSP\0").encode())
    [event] = proto.receive_handshake(sspi)
    err = tk.TokenReader().read(tp.MessageReader().feed(event.data)[0].data)[0]
    assert err.number == 18456 and "integrated" in err.text


def test_bad_login_bytes_raise_protocol_error_with_an_error_token():
    proto = client()
    proto.receive_handshake(PRELOGIN)
    raw = bytearray(tp.Login7(username="app", password="pw").encode())
    raw[36:38] = (0x7FFF).to_bytes(2, "little")          # hostname offset far outside
    raw[38:40] = (5).to_bytes(2, "little")
    with pytest.raises(ProtocolError) as info:
        proto.receive_handshake(tp.encode_message(tp.LOGIN7, bytes(raw)))
    assert tk.TokenReader().read(tp.MessageReader().feed(info.value.reply)[0].data)[0].number == 4002
    with pytest.raises(ProtocolError):
        client().receive_handshake(bytes.fromhex("12 01 00 04 00 00 01 00"))


def test_relay_release_reset_and_replay():
    proto = client()
    proto.receive_handshake(PRELOGIN)
    proto.receive_handshake(LOGIN)
    state = TDSServerState(database="db")
    proto.login_complete(state)
    batch = tp.encode_message(tp.SQL_BATCH, tp.SqlBatch("SELECT 1").encode())
    to_backend, to_client = proto.client_data(batch)
    assert to_backend == batch and to_client == b""
    assert proto.link(state, to_backend) == batch             # a fresh backend: nothing to reset
    reply = tp.encode_message(tp.TABULAR_RESULT, tk.env_begin_tran(7) + tk.done())
    out, release = proto.backend_data(reply)
    assert out == reply and not release                       # a transaction is open
    reply = tp.encode_message(tp.TABULAR_RESULT, tk.env_commit_tran(7) + tk.done())
    proto.client_data(batch)
    out, release = proto.backend_data(reply[:5])
    assert out == b"" and not release
    out, release = proto.backend_data(reply[5:])
    assert release
    proto.client_data(tp.encode_message(tp.SQL_BATCH, tp.SqlBatch("SET DATEFIRST 3").encode()))
    out, release = proto.backend_data(tp.encode_message(tp.TABULAR_RESULT, tk.done()))
    assert release and proto.options == {"DATEFIRST": "SET DATEFIRST 3"}    # accepted: tracked
    proto.unlink()
    proto.ctx.reset_after_transaction = True
    state.last_client = object()                               # another client used it since
    to_backend, _ = proto.client_data(batch)
    sent = proto.link(state, to_backend)
    first = tp.MessageReader().feed(sent)[0]
    assert first.status & tp.STATUS_RESETCONNECTION and "SET DATEFIRST 3" in tp.SqlBatch.decode(first.data).text
    internal = tp.encode_message(tp.TABULAR_RESULT, tk.env_reset_ack() + tk.done())
    out, release = proto.backend_data(internal + tp.encode_message(tp.TABULAR_RESULT, tk.done()))
    assert tk.TokenReader().read(tp.MessageReader().feed(out)[0].data)[0].type == tk.TOKEN_DONE
    assert release


def test_classifier():
    assert classify_batch("SET NOCOUNT ON; SET ANSI_NULLS ON")[1] == {"NOCOUNT": "SET NOCOUNT ON",
                                                                     "ANSI_NULLS": "SET ANSI_NULLS ON"}
    assert classify_batch("UPDATE t SET x = 1")[0] == []
    assert classify_batch("select '#x', 'SET ROWCOUNT 1'") == ([], {})
    assert classify_batch("SELECT * INTO #t FROM x")[0][0][0] == PinReason.TEMP_TABLE
    assert classify_rpc("sp_cursoropen", [])[0][0] == PinReason.CURSOR
    assert classify_rpc("sp_prepare", []) == []            # virtualised (statements.py)
    assert classify_rpc("sp_prepare", [], virtualised=False)[0][0] == PinReason.PREPARED_STATEMENT
    assert classify_rpc("sp_prepexecrpc", [])[0][0] == PinReason.PREPARED_STATEMENT


def test_scanner_and_reframer_agree_on_any_split():
    cols = [tk.Column("a", tk.TypeInfo(tk.INTN, 4)), tk.Column("b", tk.TypeInfo(tk.NVARCHAR, 4000))]
    payload = (tk.colmetadata(cols) + tk.row(cols, [1, "x" * 900]) + tk.row(cols, [None, None])
               + tk.env_begin_tran(3) + tk.done(tk.DONE_COUNT, 0xC1, 2))
    rng = random.Random(5)
    for _ in range(20):
        scanner, events, pos = ResponseScanner(), [], 0
        while pos < len(payload):
            step = rng.randint(1, 300)
            events += scanner.feed(payload[pos:pos + step])
            pos += step
        assert [e[0] for e in events] == ["env", "done"] and not scanner.partial
    framed = Reframer(512).feed(payload, True)
    assert tp.MessageReader(512).feed(framed)[0].data == payload


def test_verifier_and_contract():
    verifier = tds_sha256_verifier("s3cret")
    assert check_tds_sha256(verifier, "s3cret") and not check_tds_sha256(verifier, "other")
    assert not check_tds_sha256("SHA256$zz$00", "x")
    assert check_engine(TDSEngine()) == []


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.integers(min_value=1, max_value=64))
def test_fuzz_handshake_only_protocol_errors(blob, step):
    drive("tds", tds_client(), chunks_of(TDS_PRELOGIN + blob, [step]), relay=False)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_fuzz_relay_client_bytes(blob):
    drive("tds", tds_logged_in(), [blob], relay=True)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_login7_decoder(blob):
    try:
        tp.Login7.decode(blob)
    except tk.ProtocolError:
        pass


FEDAUTH_LOGIN = tp.Login7(database="db", fedauth=tp.FedAuth.security_token("eyJ" + "x" * 200)).encode()


def test_fedauth_login_on_a_password_listener_is_told_to_use_a_password():
    proto = client()
    reply = tp.MessageReader().feed(proto.receive_handshake(tp.encode_message(
        tp.PRELOGIN, tp.Prelogin.build(encryption=tp.ENCRYPT_NOT_SUP, fedauth_required=1).encode()))[0].data)[0]
    assert tp.Prelogin.decode(reply.data).fedauth_required == 0
    (event,) = proto.receive_handshake(tp.encode_message(tp.LOGIN7, FEDAUTH_LOGIN))
    assert isinstance(event, AuthFailed) and event.audit_event == "auth_failed"
    (err,) = [t for t in tk.TokenReader().read(tp.MessageReader().feed(event.data)[0].data)
              if t.type == tk.TOKEN_ERROR]
    assert err.number == 18456 and "authenticates with passwords, not access tokens (FEDAUTH)" in err.text


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_fuzz_mutated_fedauth_login7_on_the_engine(data):
    """A FEDAUTH LOGIN7 with bytes changed (more often in its FeatureExt) and cut: a protocol error or a refusal."""
    body = bytearray(FEDAUTH_LOGIN)
    for _ in range(data.draw(st.integers(1, 4))):
        low = data.draw(st.sampled_from([0, len(body) - 420]))
        body[data.draw(st.integers(low, len(body) - 1))] = data.draw(st.integers(0, 255))
    body = body[:data.draw(st.integers(0, len(body)))]
    proto = client()
    proto.receive_handshake(PRELOGIN)
    try:
        events = proto.receive_handshake(tp.encode_message(tp.LOGIN7, bytes(body)))
    except ProtocolError:
        return
    assert events and isinstance(events[-1], (AuthFailed, CloseClient)), events
