"""TDS session state from byte vectors: SET options tracked once accepted, resets, requests that never reached a
backend, transactions the proxy answers itself and descriptor mapping, the reset before a backend's next client."""
from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from multiproxy.engine import ErrorKind
from multiproxy_engines.tds.backend import TDSServerState
from multiproxy_engines.tds.session_state import request_effects
from multiproxy_engines.tds.transactions import (
    BEGIN, COMMIT, ROLLBACK, TransactionVerb, transaction_verb, with_local_begin, without_begin_after,
)
from multiproxy_engines.tds.wire import messages as tp
from multiproxy_engines.tds.wire import token_stream as tk

from ..fuzzkit import tds_logged_in


def batch(sql: str, descriptor: int = 0, status: int = 0) -> bytes:
    return tp.encode_message(tp.SQL_BATCH, tp.SqlBatch(sql, tp.AllHeaders(descriptor)).encode(), status=status)


def tm(request_type: int, descriptor: int = 0, begin_after: bool = False, isolation: int = 0) -> bytes:
    req = tp.TransactionRequest(request_type, begin_after=begin_after, isolation_level=isolation,
                                headers=tp.AllHeaders(descriptor))
    return tp.encode_message(tp.TRANSACTION_MANAGER, req.encode())


def reply(tokens: bytes) -> bytes:
    return tp.encode_message(tp.TABULAR_RESULT, tokens)


def messages(data: bytes) -> list[tp.Message]:
    return tp.MessageReader().feed(data)


def tokens(data: bytes) -> list:
    return [t for m in messages(data) for t in tk.TokenReader().read(m.data)]


def descriptor_of(msg: tp.Message) -> int:
    return struct.unpack_from("<Q", msg.data, tp.transaction_descriptor_offset(msg.data))[0]


def client(reset_after_transaction=True):
    proto = tds_logged_in()
    proto.ctx.reset_after_transaction = reset_after_transaction
    return proto


def roundtrip(proto, state, request: bytes, answer: bytes):
    """Send a request (linking a backend if needed) and feed the backend's answer: (sent, to_client, release)."""
    to_backend, local = proto.client_data(request)
    assert local == b""
    if not proto.linked:
        to_backend = proto.link(state, to_backend)
    out, release = proto.backend_data(answer)
    if release:
        proto.unlink()
    return to_backend, out, release


def test_set_options_are_tracked_once_the_server_accepted_them():
    proto, state = client(), TDSServerState()
    roundtrip(proto, state, batch("SET DATEFIRST 3"), reply(tk.error(1, "nope", 1, 16, "s") + tk.done(tk.DONE_ERROR)))
    assert proto.options == {}                                  # refused: nothing to replay
    roundtrip(proto, state, batch("SET DATEFIRST 3; SET NOCOUNT ON"), reply(tk.done()))
    assert proto.options == {"DATEFIRST": "SET DATEFIRST 3", "NOCOUNT": "SET NOCOUNT ON"}
    assert not proto.pinned


def test_a_request_that_never_reached_a_backend_changes_nothing():
    proto = client()
    policy = proto.ctx.pin_policy
    to_backend, _ = proto.client_data(batch("SET NOCOUNT ON; CREATE TABLE #t (x INT); SET IDENTITY_INSERT t ON"))
    assert to_backend
    reply_bytes = proto.fail_pending(ErrorKind.POOL_TIMEOUT, "no database connection became free within 5 s")
    assert tokens(reply_bytes)[0].number == 10928
    assert not proto.pinned and proto.options == {} and sum(policy.pinned_now.values()) == 0
    assert sum(policy.detected_total.values()) == 0
    # the same request that does reach one pins (on arrival, whatever the answer)
    roundtrip(proto, TDSServerState(), batch("CREATE TABLE #t (x INT)"), reply(tk.done()))
    assert proto.pinned and policy.pinned_now["temp_table"] == 1


def test_sp_reset_connection_and_the_reset_bits_clear_state_and_unpin():
    proto, state = client(), TDSServerState()
    policy = proto.ctx.pin_policy
    roundtrip(proto, state, batch("SET TEXTSIZE 10; CREATE TABLE #t (x INT)"), reply(tk.done()))
    roundtrip(proto, state, batch("EXEC sp_getapplock @Resource = 'r', @LockMode = 'Exclusive', "
                                  "@LockOwner = 'Session'"), reply(tk.done()))
    assert proto.pinned and policy.pinned_now["temp_table"] == 1 and policy.pinned_now["advisory_lock"] == 1
    call = tp.RpcCall(proc_name="sp_reset_connection")
    rpc = tp.encode_message(tp.RPC, tp.RpcRequest([call]).encode())
    assert request_effects(messages(rpc)[0])[0] == ("reset", False)
    sent, out, release = roundtrip(proto, state, rpc, reply(tk.returnstatus(0) + tk.done_proc()))
    assert release and not proto.pinned and proto.options == {} and sum(policy.pinned_now.values()) == 0
    # the RESETCONNECTION bit on any request does the same, and the client sees the server's ack
    proto.ctx.reset_after_transaction = False
    roundtrip(proto, state, batch("SET TEXTSIZE 10; SELECT * INTO #u FROM t"), reply(tk.done()))
    assert proto.pinned and proto.options
    sent, out, release = roundtrip(proto, state, batch("SELECT 1", status=tp.STATUS_RESETCONNECTION),
                                   reply(tk.env_reset_ack() + tk.done()))
    assert messages(sent)[0].status & tp.STATUS_RESETCONNECTION
    assert tokens(out)[0].env_type == tk.ENV_RESETACK
    assert release and not proto.pinned and proto.options == {}
    skip = messages(batch("SELECT 1", status=tp.STATUS_RESETCONNECTIONSKIPTRAN))[0]
    assert request_effects(skip) == [("reset", True)]


def test_pymssql_begin_is_answered_and_runs_with_the_next_request():
    proto, state = client(), TDSServerState()
    to_backend, local = proto.client_data(batch("BEGIN TRAN"))
    assert to_backend == b"" and not proto.linked
    [env, done] = tokens(local)
    assert env.env_type == tk.ENV_BEGINTRAN and len(env.new) == 8 and done.type == tk.TOKEN_DONE
    mine = struct.unpack("<Q", env.new)[0]
    # COMMIT with nothing sent since: answered too, with the client's own descriptor
    to_backend, local = proto.client_data(batch("COMMIT TRAN", mine))
    [env, _] = tokens(local)
    assert to_backend == b"" and env.env_type == tk.ENV_COMMITTRAN and env.old == struct.pack("<Q", mine)
    _, local = proto.client_data(batch("BEGIN TRAN"))
    mine = struct.unpack("<Q", tokens(local)[0].new)[0]
    # the next request takes a backend: the begin goes first (answer swallowed), the request's descriptor is 0
    to_backend, local = proto.client_data(batch("INSERT INTO t VALUES (1)", mine))
    sent = messages(proto.link(state, to_backend))
    assert tp.SqlBatch.decode(sent[0].data).text == "BEGIN TRAN" and descriptor_of(sent[1]) == 0
    out, release = proto.backend_data(reply(tk.env_begin_tran(0x77) + tk.done(0, 0xD4))
                                      + reply(tk.done(tk.DONE_COUNT, tk.CURCMD_INSERT, 1)))
    assert [t.type for t in tokens(out)] == [tk.TOKEN_DONE] and not release
    # later requests of the transaction carry the backend's descriptor instead of the proxy's
    to_backend, _ = proto.client_data(batch("COMMIT TRAN", mine))
    assert descriptor_of(messages(to_backend)[0]) == 0x77
    out, release = proto.backend_data(reply(tk.env_commit_tran(0x77) + tk.done(0, 0xD5)))
    assert release and tokens(out)[0].env_type == tk.ENV_COMMITTRAN


def test_python_tds_transaction_manager_requests():
    proto, state = client(), TDSServerState()
    _, local = proto.client_data(tm(tp.TM_BEGIN_XACT, isolation=2))
    mine = struct.unpack("<Q", tokens(local)[0].new)[0]
    to_backend, _ = proto.client_data(batch("SELECT 1", mine))
    sent = messages(proto.link(state, to_backend))
    begin = tp.TransactionRequest.decode(sent[0].data)
    assert sent[0].type == tp.TRANSACTION_MANAGER and begin.request_type == tp.TM_BEGIN_XACT
    assert begin.isolation_level == 2
    proto.backend_data(reply(tk.env_begin_tran(0x55) + tk.done()) + reply(tk.done(tk.DONE_COUNT, 0xC1, 1)))
    # commit with fBeginXact: the backend commits only; the client gets the next begin from the proxy
    to_backend, _ = proto.client_data(tm(tp.TM_COMMIT_XACT, mine, begin_after=True))
    req = tp.TransactionRequest.decode(messages(to_backend)[0].data)
    assert req.request_type == tp.TM_COMMIT_XACT and not req.begin_after
    assert req.headers.transaction_descriptor == 0x55
    out, release = proto.backend_data(reply(tk.env_commit_tran(0x55) + tk.done()))
    envs = [(t.env_type, t.new, t.old) for t in tokens(out) if t.type == tk.TOKEN_ENVCHANGE]
    assert envs[0][0] == tk.ENV_COMMITTRAN and envs[1][0] == tk.ENV_BEGINTRAN and release
    proto.unlink()
    # nothing sent since: TM rollback with fBeginXact is answered with rollback + begin
    _, local = proto.client_data(tm(tp.TM_ROLLBACK_XACT, struct.unpack("<Q", envs[1][1])[0], begin_after=True))
    assert [t.env_type for t in tokens(local) if t.type == tk.TOKEN_ENVCHANGE] == [tk.ENV_ROLLBACKTRAN,
                                                                                   tk.ENV_BEGINTRAN]


def test_transaction_verbs():
    def verb(data):
        return transaction_verb(messages(data)[0])
    assert verb(batch("begin tran")) == TransactionVerb(BEGIN)
    assert verb(batch(" BEGIN TRANSACTION;\n")) == TransactionVerb(BEGIN)
    assert verb(batch("COMMIT TRAN")) == TransactionVerb(COMMIT)
    assert verb(batch("IF @@TRANCOUNT > 0 ROLLBACK TRAN")) == TransactionVerb(ROLLBACK)
    assert verb(batch("BEGIN TRAN; SELECT 1")) is None and verb(batch("ROLLBACK TRAN sp1")) is None
    assert verb(tm(tp.TM_COMMIT_XACT, 5, True, 3)) == TransactionVerb(COMMIT, True, 3, True)
    assert verb(tm(tp.TM_SAVE_XACT)) is None
    stripped = tp.TransactionRequest.decode(without_begin_after(messages(tm(tp.TM_COMMIT_XACT, 5, True))[0].data))
    assert not stripped.begin_after and stripped.headers.transaction_descriptor == 5
    answer = tk.env_commit_tran(5) + tk.done()
    assert tk.TokenReader().read(with_local_begin(answer, bytes(8)))[1].env_type == tk.ENV_BEGINTRAN


def test_reset_before_the_next_client_bit_query_or_none():
    state = TDSServerState()
    a = client()
    roundtrip(a, state, batch("SET NOCOUNT ON"), reply(tk.done()))
    b = client()
    sent, out, _ = roundtrip(b, state, batch("SELECT 1"), reply(tk.env_reset_ack() + tk.done(tk.DONE_COUNT)))
    assert messages(sent)[0].status & tp.STATUS_RESETCONNECTION
    assert [t.type for t in tokens(out)] == [tk.TOKEN_DONE]          # the ack is the proxy's own
    # the same client again: nothing to reset; a's replay rides on the reset
    sent, _, _ = roundtrip(b, state, batch("SELECT 1"), reply(tk.done()))
    assert not messages(sent)[0].status & tp.STATUS_RESETCONNECTION
    sent, out, _ = roundtrip(a, state, batch("SELECT 2"), reply(tk.env_reset_ack() + tk.done()) + reply(tk.done()))
    first, request = messages(sent)
    assert first.status & tp.STATUS_RESETCONNECTION and tp.SqlBatch.decode(first.data).text == "SET NOCOUNT ON"
    assert not request.status & tp.STATUS_RESETCONNECTION and len(tokens(out)) == 1
    # reset_query: a batch of its own instead of the bit
    c = client()
    c.ctx.reset_query = "EXEC sp_my_reset"
    sent, out, _ = roundtrip(c, state, batch("SELECT 3"), reply(tk.done()) + reply(tk.done()))
    first, request = messages(sent)
    assert tp.SqlBatch.decode(first.data).text == "EXEC sp_my_reset" and not request.status & 0x18
    # reset_after_transaction = no: no reset at all, only the replay
    d = client(reset_after_transaction=False)
    sent, _, _ = roundtrip(d, state, batch("SELECT 4"), reply(tk.done()))
    assert not messages(sent)[0].status & tp.STATUS_RESETCONNECTION


def test_without_resets_an_option_another_client_left_is_reset_all_the_same():
    """reset_after_transaction = no: a backend carrying a SET option the next client never set gets the bit anyway
    (only a reset returns an option to the login's value); one carrying only options the client shares does not."""
    state = TDSServerState()
    a, b, c = (client(reset_after_transaction=False) for _ in range(3))
    roundtrip(a, state, batch("SET NOCOUNT ON; SET DATEFIRST 3"), reply(tk.done()))
    assert state.options == {"NOCOUNT": "SET NOCOUNT ON", "DATEFIRST": "SET DATEFIRST 3"}
    sent, _, _ = roundtrip(c, state, batch("SET NOCOUNT ON"), reply(tk.env_reset_ack() + tk.done()))
    assert messages(sent)[0].status & tp.STATUS_RESETCONNECTION and c.options == {"NOCOUNT": "SET NOCOUNT ON"}
    assert state.options == {"NOCOUNT": "SET NOCOUNT ON"}
    sent, out, _ = roundtrip(b, state, batch("SELECT 1"), reply(tk.env_reset_ack() + tk.done(tk.DONE_COUNT)))
    assert messages(sent)[0].status & tp.STATUS_RESETCONNECTION
    assert [t.type for t in tokens(out)] == [tk.TOKEN_DONE] and state.options == {}
    # a's options are all replayed on a backend that carries none: no reset
    sent, out, _ = roundtrip(a, state, batch("SELECT 2"), reply(tk.done()) + reply(tk.done()))
    first, request = messages(sent)
    assert not first.status & tp.STATUS_RESETCONNECTION and not request.status & tp.STATUS_RESETCONNECTION
    assert tp.SqlBatch.decode(first.data).text == "SET NOCOUNT ON; SET DATEFIRST 3"
    # c set NOCOUNT ON too but never DATEFIRST: reset, then its own option replayed
    sent, _, _ = roundtrip(c, state, batch("SELECT 3"), reply(tk.env_reset_ack() + tk.done()) + reply(tk.done()))
    first, request = messages(sent)
    assert first.status & tp.STATUS_RESETCONNECTION and tp.SqlBatch.decode(first.data).text == "SET NOCOUNT ON"
    assert state.options == {"NOCOUNT": "SET NOCOUNT ON"}
    # a client holding every option the backend carries: its replay alone
    d = client(reset_after_transaction=False)
    roundtrip(d, state, batch("SET NOCOUNT ON; SET DATEFIRST 5"), reply(tk.env_reset_ack() + tk.done()))
    sent, _, _ = roundtrip(c, state, batch("SELECT 4"), reply(tk.env_reset_ack() + tk.done()) + reply(tk.done()))
    assert messages(sent)[0].status & tp.STATUS_RESETCONNECTION        # d left DATEFIRST
    roundtrip(d, state, batch("SELECT 5"), reply(tk.done()) + reply(tk.done()))
    sent, _, _ = roundtrip(a, state, batch("SELECT 6"), reply(tk.done()) + reply(tk.done()))
    first = messages(sent)[0]
    assert not first.status & tp.STATUS_RESETCONNECTION
    assert tp.SqlBatch.decode(first.data).text == "SET NOCOUNT ON; SET DATEFIRST 3"


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([tp.SQL_BATCH, tp.RPC, tp.TRANSACTION_MANAGER]),
       st.sampled_from([0, tp.STATUS_RESETCONNECTION, tp.STATUS_RESETCONNECTIONSKIPTRAN]),
       st.one_of(st.binary(max_size=96), st.binary(max_size=96).map(lambda tail: tp.AllHeaders(7).encode() + tail)))
def test_fuzz_request_readers_never_raise(msg_type, status, payload):
    """What the engine reads from a request before forwarding it takes any bytes: the server refuses bad ones."""
    msg = tp.Message(msg_type, status | tp.STATUS_EOM, payload)
    transaction_verb(msg)
    request_effects(msg)
    assert len(tp.with_transaction_descriptor(payload, bytes(8))) == len(payload)
