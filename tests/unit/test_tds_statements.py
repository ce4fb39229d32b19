"""The sp_prepare family multiplexed (engines/tds/statements.py), from byte vectors: requests rewritten for the
backend they reach (handle parameter, sp_execute -> sp_prepexec, sp_prepexec -> sp_execute), answers rewritten for
the client (RETURNVALUE rewritten, swallowed, synthesised), local answers in order, LRU eviction, resets, and a
fuzz of many clients over few backends against a model server."""
from __future__ import annotations

import random
import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from multiproxy.engine import StatementCounts
from multiproxy_engines.tds import statements as S
from multiproxy_engines.tds.backend import TDSServerState
from multiproxy_engines.tds.pinning import classify_rpc
from multiproxy_engines.tds.wire import messages as tp
from multiproxy_engines.tds.wire import token_stream as tk

from ..fuzzkit import tds_logged_in

INT4 = tk.TypeInfo(tk.INTN, 4)
NV = tk.TypeInfo(tk.NVARCHAR, 8000)
DECL, TEXT = "@a int", "SELECT @a + 1"


def rpc(*calls: tp.RpcCall, status: int = 0) -> bytes:
    return tp.encode_message(tp.RPC, tp.RpcRequest(list(calls)).encode(), status=status)


def prepare_call(decl=DECL, text=TEXT, proc=tp.SP_PREPARE, name=None, values=()) -> tp.RpcCall:
    params = [tp.RpcParam("@handle", INT4, None, tp.PARAM_BY_REF), tp.RpcParam("@params", NV, decl),
              tp.RpcParam("@stmt", NV, text), *values]
    if name is not None:
        return tp.RpcCall(proc_name=name, params=params)
    return tp.RpcCall(proc_id=proc, params=params)


def execute_call(handle, *values, name=None) -> tp.RpcCall:
    params = [tp.RpcParam("", INT4, handle), *[tp.RpcParam("", INT4, v) for v in values]]
    return tp.RpcCall(proc_name=name, params=params) if name else tp.RpcCall(proc_id=tp.SP_EXECUTE, params=params)


def unprepare_call(handle) -> tp.RpcCall:
    return tp.RpcCall(proc_id=tp.SP_UNPREPARE, params=[tp.RpcParam("", INT4, handle)])


def reply(body: bytes) -> bytes:
    return tp.encode_message(tp.TABULAR_RESULT, body)


def messages(data: bytes) -> list[tp.Message]:
    return tp.MessageReader().feed(data)


def tokens(data: bytes) -> list:
    return [t for m in messages(data) for t in tk.TokenReader().read(m.data)]


def calls_of(data: bytes) -> list[tp.RpcCall]:
    return [c for m in messages(data) for c in tp.RpcRequest.decode(m.data).calls]


def client(reset=True, limit=200):
    proto = tds_logged_in()
    proto.ctx.reset_after_transaction = reset
    proto.ctx.max_prepared_statements = limit
    proto.ctx.statement_counts = StatementCounts()
    return proto


COLS = [tk.Column("", INT4)]


def prepared_answer(handle: int, name: str = "@handle") -> bytes:
    return reply(tk.returnstatus(0) + tk.returnvalue(0, name, INT4, handle) + tk.done_proc())


def rows_answer(value: int, more=False) -> bytes:
    return (tk.colmetadata(COLS) + tk.row(COLS, [value]) + tk.done_in_proc(tk.DONE_COUNT | tk.DONE_MORE, 0xC1, 1)
            + tk.returnstatus(0))


def send(proto, state, request: bytes):
    to_backend, local = proto.client_data(request)
    if to_backend and not proto.linked:
        to_backend = proto.link(state, to_backend)
    return to_backend, local


def answer(proto, data: bytes):
    out, release = proto.backend_data(data)
    if release:
        proto.unlink()
    return out


# -- names and pins ----------------------------------------------------------------------------------------
def test_procedure_names_by_name_and_qualified():
    for name in ("sp_prepare", "SP_PREPARE", "sys.sp_prepare", "[sys].[sp_prepare]", "master.sys.sp_prepare",
                 "master..sp_prepare", "[master].[sys].[Sp_Prepare]"):
        assert S.proc_number(name) == tp.SP_PREPARE, name
    assert S.proc_number("sp_execute") == tp.SP_EXECUTE
    assert S.proc_number("sp_unprepare") == tp.SP_UNPREPARE
    assert S.proc_number("sp_prepexec") == tp.SP_PREPEXEC
    assert S.proc_number("sp_executesql") is None
    assert S.proc_number("app.sp_prepare") is None


def test_prepares_no_longer_pin_but_prepexecrpc_and_pin_mode_do():
    assert classify_rpc("sp_prepare", []) == []
    assert classify_rpc("sp_prepexec", []) == []
    assert classify_rpc("sp_prepexecrpc", [])[0][1] == "sp_prepexecrpc"
    assert classify_rpc("sp_prepare", [], virtualised=False)[0][1] == "sp_prepare"


# -- sp_prepare --------------------------------------------------------------------------------------------
def test_prepare_gets_a_proxy_handle_and_the_backend_handle_is_recorded():
    proto, state = client(), TDSServerState()
    sent, local = send(proto, state, rpc(prepare_call()))
    assert local == b""
    call = calls_of(sent)[0]
    assert call.proc_id == tp.SP_PREPARE and call.params[2].value == TEXT     # forwarded as it came
    out = answer(proto, prepared_answer(77))
    values = [t.value for t in tokens(out) if t.type == tk.TOKEN_RETURNVALUE]
    assert values == [1]                                # the proxy's handle, not the backend's 77
    assert state.statements.handles == {(DECL, TEXT): 77}
    assert not proto.pinned and not proto.linked


def test_prepare_metadata_and_other_tokens_pass_unchanged():
    proto, state = client(), TDSServerState()
    send(proto, state, rpc(prepare_call()))
    body = tk.colmetadata(COLS) + tk.returnstatus(0) + tk.returnvalue(0, "@handle", INT4, 5) + tk.done_proc()
    out = answer(proto, reply(body))
    expected = tk.colmetadata(COLS) + tk.returnstatus(0) + tk.returnvalue(0, "@handle", INT4, 1) + tk.done_proc()
    assert messages(out)[0].data == expected


def test_prepare_by_name_in_many_spellings():
    for name in ("sp_prepare", "sys.sp_prepare", "[sys].[sp_prepare]"):
        proto, state = client(), TDSServerState()
        send(proto, state, rpc(prepare_call(name=name)))
        out = answer(proto, prepared_answer(9))
        assert [t.value for t in tokens(out) if t.type == tk.TOKEN_RETURNVALUE] == [1]
        assert proto.handles[1].key == (DECL, TEXT)


def test_failed_prepare_forgets_the_handle():
    proto, state = client(), TDSServerState()
    send(proto, state, rpc(prepare_call(text="SELEC nonsense")))
    out = answer(proto, reply(tk.error(102, "Incorrect syntax", 1, 15, "s") + tk.returnstatus(1)
                              + tk.returnvalue(0, "@handle", INT4, None) + tk.done_proc(tk.DONE_ERROR)))
    assert [t.value for t in tokens(out) if t.type == tk.TOKEN_RETURNVALUE] == [None]
    assert proto.handles == {} and state.statements.handles == {}


# -- sp_execute ---------------------------------------------------------------------------------------------
def prepared_client():
    proto, state = client(), TDSServerState()
    send(proto, state, rpc(prepare_call()))
    answer(proto, prepared_answer(77))
    return proto, state


def test_execute_hit_rewrites_the_handle_parameter_only():
    proto, state = prepared_client()
    request = rpc(execute_call(1, 41))
    sent, _ = send(proto, state, request)
    # same bytes but the handle: 1 -> 77 (the first value of the call after its proc id and flags)
    expected = bytearray(request)
    at = request.index(b"\x26\x04\x04\x01\x00\x00\x00")
    expected[at + 3:at + 7] = struct.pack("<i", 77)
    assert sent == bytes(expected)
    body = rows_answer(42) + tk.done_proc()
    assert answer(proto, reply(body)) == reply(body)        # passed as it came
    assert proto.ctx.statement_counts.hits == 1


def test_execute_miss_becomes_prepexec_and_swallows_the_handle():
    proto, state = prepared_client()
    other = TDSServerState()                                    # a backend that never saw the statement
    proto.unlink()
    sent, _ = send(proto, other, rpc(tp.RpcCall(proc_id=tp.SP_EXECUTE, params=[
        tp.RpcParam("", INT4, 1), tp.RpcParam("@a", INT4, 41), tp.RpcParam("@out", INT4, None, tp.PARAM_BY_REF)])))
    call = calls_of(sent)[0]
    assert call.proc_id == tp.SP_PREPEXEC
    assert [p.value for p in call.params] == [None, DECL, TEXT, 41, None]
    assert call.params[0].output and [p.name for p in call.params][3:] == ["@a", "@out"]
    backend = (rows_answer(42) + tk.returnvalue(0, "@handle", INT4, 5) + tk.returnvalue(4, "@out", INT4, 7)
               + tk.done_proc())
    out = answer(proto, reply(backend))
    expected = rows_answer(42) + tk.returnvalue(2, "@out", INT4, 7) + tk.done_proc()
    assert messages(out)[0].data == expected                   # handle swallowed, the output's ordinal moved back
    assert other.statements.handles == {(DECL, TEXT): 5}
    assert proto.ctx.statement_counts.misses == 1


def test_unknown_handle_is_error_8179_answered_locally():
    proto, state = client(), TDSServerState()
    sent, local = send(proto, state, rpc(execute_call(12, 1)))
    assert sent == b"" and not proto.linked
    toks = tokens(local)
    assert toks[0].number == 8179 and toks[0].text == "Could not find prepared statement with handle 12."
    assert toks[-1].type == tk.TOKEN_DONEPROC and toks[-1].status & tk.DONE_ERROR


# -- sp_prepexec -----------------------------------------------------------------------------------------------
def test_prepexec_hit_becomes_execute_and_synthesises_the_handle():
    proto, state = prepared_client()
    sent, _ = send(proto, state, rpc(prepare_call(proc=tp.SP_PREPEXEC, values=[tp.RpcParam("@a", INT4, 4)])))
    call = calls_of(sent)[0]
    assert call.proc_id == tp.SP_EXECUTE and [p.value for p in call.params] == [77, 4]
    out = answer(proto, reply(rows_answer(5) + tk.done_proc()))
    expected = rows_answer(5) + tk.returnvalue(0, "@handle", INT4, 2) + tk.done_proc()
    assert messages(out)[0].data == expected
    assert proto.handles[2].key == (DECL, TEXT)
    assert proto.ctx.statement_counts.hits == 1


def test_prepexec_miss_is_forwarded_and_its_handle_rewritten():
    proto, state = client(), TDSServerState()
    sent, _ = send(proto, state, rpc(prepare_call(proc=tp.SP_PREPEXEC, values=[tp.RpcParam("@a", INT4, 4)])))
    assert calls_of(sent)[0].proc_id == tp.SP_PREPEXEC
    out = answer(proto, reply(rows_answer(5) + tk.returnvalue(0, "@handle", INT4, 31) + tk.done_proc()))
    assert messages(out)[0].data == rows_answer(5) + tk.returnvalue(0, "@handle", INT4, 1) + tk.done_proc()
    assert state.statements.handles == {(DECL, TEXT): 31}


# -- sp_unprepare ----------------------------------------------------------------------------------------------
def test_unprepare_is_answered_locally_and_the_backend_keeps_the_statement():
    proto, state = prepared_client()
    sent, local = send(proto, state, rpc(unprepare_call(1)))
    assert sent == b""
    toks = tokens(local)
    assert [t.type for t in toks] == [tk.TOKEN_RETURNSTATUS, tk.TOKEN_DONEPROC] and toks[-1].status == 0
    assert proto.handles == {} and state.statements.handles == {(DECL, TEXT): 77}
    _, local = send(proto, state, rpc(unprepare_call(1)))
    assert tokens(local)[0].number == 8179


def test_local_answers_wait_for_the_backend_answers_before_them():
    proto, state = prepared_client()
    sent, local = proto.client_data(rpc(tp.RpcCall(proc_name="sp_executesql", params=[
        tp.RpcParam("", NV, "WAITFOR DELAY '00:00:01'")])) + rpc(unprepare_call(1)) + rpc(execute_call(9)))
    sent = proto.link(state, sent)
    assert local == b"" and len(calls_of(sent)) == 1
    out = answer(proto, reply(tk.returnstatus(0) + tk.done_proc()))
    msgs = messages(out)
    assert len(msgs) == 3
    assert [t.type for t in tk.TokenReader().read(msgs[1].data)] == [tk.TOKEN_RETURNSTATUS, tk.TOKEN_DONEPROC]
    assert tk.TokenReader().read(msgs[2].data)[0].number == 8179
    assert not proto.linked                     # all answered: released


# -- several calls in one message --------------------------------------------------------------------------------
def test_a_batch_of_calls_mixes_backend_and_local_answers_in_order():
    proto, state = prepared_client()
    sent, local = send(proto, state, rpc(execute_call(1, 1), execute_call(99), execute_call(1, 2)))
    assert local == b""
    assert [c.params[0].value for c in calls_of(sent)] == [77, 77]
    out = answer(proto, reply(rows_answer(2) + tk.done_proc(tk.DONE_MORE) + rows_answer(3) + tk.done_proc()))
    toks = tokens(out)
    dones = [t for t in toks if t.type == tk.TOKEN_DONEPROC]
    assert [bool(d.status & tk.DONE_MORE) for d in dones] == [True, True, False]
    errors = [t.number for t in toks if t.type == tk.TOKEN_ERROR]
    assert errors == [8179]
    assert [t.values for t in toks if t.type == tk.TOKEN_ROW] == [[2], [3]]
    assert toks.index(next(t for t in toks if t.type == tk.TOKEN_ERROR)) < toks.index(
        [t for t in toks if t.type == tk.TOKEN_ROW][1])


# -- eviction, garbage, resets ----------------------------------------------------------------------------------
def test_lru_eviction_unprepares_in_front_of_the_next_rewritten_message():
    proto, state = client(limit=2), TDSServerState()
    for n in range(3):
        send(proto, state, rpc(prepare_call(text=f"SELECT @a + {n}")))
        answer(proto, prepared_answer(100 + n))
    assert list(state.statements.handles.values()) == [101, 102]
    assert state.statements.garbage == [100] and proto.ctx.statement_counts.evictions == 1
    sent, _ = send(proto, state, rpc(execute_call(3, 5)))
    calls = calls_of(sent)
    assert [c.proc_id for c in calls] == [tp.SP_UNPREPARE, tp.SP_EXECUTE]
    assert calls[0].params[0].value == 100 and calls[1].params[0].value == 102
    out = answer(proto, reply(tk.returnstatus(0) + tk.done_proc(tk.DONE_MORE) + rows_answer(8) + tk.done_proc()))
    assert messages(out)[0].data == rows_answer(8) + tk.done_proc()    # the unprepare's answer swallowed
    assert state.statements.garbage == []


def test_lru_order_follows_use():
    cache, counts = S.StatementCache(), StatementCounts()
    cache.put("a", 1, 2, counts)
    cache.put("b", 2, 2, counts)
    assert cache.get("a") == 1                  # a is now the most recent
    cache.put("c", 3, 2, counts)
    assert list(cache.handles) == ["a", "c"] and cache.garbage == [2]
    cache.put("a", 4, 2, counts)                # superseded: the old handle is unprepared too
    assert cache.garbage == [2, 1] and counts.evictions == 1


def test_a_reset_link_clears_the_backend_cache_so_execute_reprepares():
    proto, state = prepared_client()
    state.last_client = object()                # another client used the backend since
    sent, _ = send(proto, state, rpc(execute_call(1, 1)))
    assert sent[1] & tp.STATUS_RESETCONNECTION
    assert calls_of(sent)[0].proc_id == tp.SP_PREPEXEC
    assert state.statements.handles == {}


def test_no_reset_keeps_the_cache():
    proto, state = client(reset=False), TDSServerState()
    send(proto, state, rpc(prepare_call()))
    answer(proto, prepared_answer(77))
    state.last_client = object()
    sent, _ = send(proto, state, rpc(execute_call(1, 1)))
    assert calls_of(sent)[0].proc_id == tp.SP_EXECUTE and calls_of(sent)[0].params[0].value == 77


def test_a_clients_own_reset_forgets_its_handles():
    proto, state = prepared_client()
    sent, local = send(proto, state, rpc(execute_call(1, 1), status=tp.STATUS_RESETCONNECTION))
    assert sent == b"" and tokens(local)[0].number == 8179
    assert state.statements.handles == {(DECL, TEXT): 77}     # not sent: the backend was not reset


def test_pin_mode_forwards_and_pins():
    proto, state = client(), TDSServerState()
    proto.virtualize = False
    sent, _ = send(proto, state, rpc(prepare_call()))
    assert proto.pinned
    assert [t.value for t in tokens(answer(proto, prepared_answer(77))) if t.type == tk.TOKEN_RETURNVALUE] == [77]


# -- a model server, and many clients over few backends ---------------------------------------------------------
class ModelBackend:
    """Answers the sp_prepare family as SQL Server does, for statements `SELECT @a + N`."""

    def __init__(self):
        self.state = TDSServerState()
        self.prepared: dict[int, str] = {}
        self.next = 1000

    def run(self, data: bytes) -> bytes:
        """One answer per request message."""
        answers = b""
        for msg in messages(data):
            out = b""
            if msg.status & tp.STATUS_RESETCONNECTION:
                self.prepared.clear()
                out += tk.env_reset_ack()
            calls = tp.RpcRequest.decode(msg.data).calls
            for index, call in enumerate(calls):
                part = self.call(call)
                out += part[:-12] + struct.pack("<H", struct.unpack_from("<H", part, len(part) - 12)[0]
                                                | (tk.DONE_MORE if index < len(calls) - 1 else 0)) + part[-10:]
            answers += reply(out)
        return answers

    def call(self, call: tp.RpcCall) -> bytes:
        p = call.params
        if call.proc_id in (tp.SP_PREPARE, tp.SP_PREPEXEC):
            self.next += 1
            self.prepared[self.next] = p[2].value
            body = rows_answer(self.value(p[2].value, p[3].value)) if call.proc_id == tp.SP_PREPEXEC else b""
            return body + tk.returnstatus(0) * (not body) + tk.returnvalue(0, "@handle", INT4, self.next) \
                + tk.done_proc()
        if call.proc_id in (tp.SP_EXECUTE, tp.SP_UNPREPARE):
            text = self.prepared.get(p[0].value)
            if text is None:
                return S.not_found(p[0].value, "model")
            if call.proc_id == tp.SP_UNPREPARE:
                del self.prepared[p[0].value]
                return tk.returnstatus(0) + tk.done_proc()
            return rows_answer(self.value(text, p[1].value)) + tk.done_proc()
        if call.proc_name == "sp_model_echo":
            return rows_answer(p[0].value) + tk.done_proc()
        raise AssertionError(call)

    @staticmethod
    def value(text: str, a: int) -> int:
        return a + int(text.rsplit("+", 1)[1])


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**32), st.sampled_from([True, False]), st.integers(1, 4))
def test_fuzz_many_clients_few_backends_right_answers(seed, reset, limit):
    rng = random.Random(seed)
    backends = [ModelBackend() for _ in range(2)]
    clients = [client(reset=reset, limit=limit) for _ in range(4)]
    for proto in clients:
        proto.ctx.statement_counts = clients[0].ctx.statement_counts
    known: list[dict[int, int]] = [{} for _ in clients]    # proxy handle -> N of its statement
    for _ in range(60):
        i = rng.randrange(len(clients))
        proto, mine = clients[i], known[i]
        backend = rng.choice(backends)
        kind = rng.choice(["prepare", "prepexec", "execute", "execute", "unprepare", "bogus"])
        n = rng.randrange(6)
        a = rng.randrange(100)
        if kind == "prepare":
            request = rpc(prepare_call(text=f"SELECT @a + {n}"))
        elif kind == "prepexec":
            request = rpc(prepare_call(text=f"SELECT @a + {n}", proc=tp.SP_PREPEXEC,
                                       values=[tp.RpcParam("@a", INT4, a)]))
        elif kind in ("execute", "unprepare") and mine:
            handle = rng.choice(sorted(mine))
            request = rpc(execute_call(handle, a) if kind == "execute" else unprepare_call(handle))
        else:
            handle = rng.randrange(50, 60)
            request = rpc(execute_call(handle, a))
        sent, local = proto.client_data(request)
        if sent:
            sent = proto.link(backend.state, sent)
            out = answer(proto, backend.run(sent))
        else:
            out = local
        assert not proto.linked
        toks = tokens(out)
        errors = [t.number for t in toks if t.type == tk.TOKEN_ERROR]
        rows = [t.values[0] for t in toks if t.type == tk.TOKEN_ROW]
        handles = [t.value for t in toks if t.type == tk.TOKEN_RETURNVALUE]
        if kind in ("prepare", "prepexec"):
            assert errors == [] and len(handles) == 1 and handles[0] not in mine
            mine[handles[0]] = n
            assert rows == ([a + n] if kind == "prepexec" else [])
        elif kind == "execute" and mine and request and handle in mine:
            assert errors == [] and handles == [] and rows == [a + mine[handle]]
        elif kind == "unprepare" and handle in mine:
            assert errors == []
            del mine[handle]
        else:
            assert errors == [8179]
        for b in backends:
            assert len(b.state.statements.handles) <= limit
            # the cache never names a handle the backend lacks (or one for another statement)
            for key, h in b.state.statements.handles.items():
                assert b.prepared.get(h) == key[1]


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=120))
def test_fuzz_garbage_rpc_never_crashes(data):
    proto = client()
    header = tp.AllHeaders().encode()
    for body in (header + data, header + b"\xff\xff\x0c\x00\x00\x00" + data, header + b"\xff\xff\x0b\x00\x00\x00"
                 + data):
        try:
            plan = proto._resolve_rpc(0, body)
        except Exception as exc:    # noqa: BLE001 - the point is that nothing escapes
            raise AssertionError(f"{exc!r} for {body!r}")
        if plan is not None and not plan.local_only:
            proto._build_rpc(plan, S.StatementCache())


def test_a_batch_with_the_reset_bit_empties_the_cache_and_the_clients_handles():
    proto, state = prepared_client()
    sent, _ = send(proto, state, tp.encode_message(tp.SQL_BATCH, tp.SqlBatch("SELECT 1").encode(),
                                                  status=tp.STATUS_RESETCONNECTION))
    assert state.statements.handles == {} and proto.handles == {}
    answer(proto, reply(tk.env_reset_ack() + tk.done()))


def test_a_handle_learnt_before_a_reset_is_not_kept():
    proto, state = client(reset=False), TDSServerState()
    proto.client_data(rpc(prepare_call()))
    proto.link(state, proto.expect[0].wire)
    # pipelined behind the prepare: a batch with the reset bit (the backend resets after preparing)
    proto.client_data(tp.encode_message(tp.SQL_BATCH, tp.SqlBatch("SELECT 1").encode(),
                                        status=tp.STATUS_RESETCONNECTION))
    answer(proto, prepared_answer(77) + reply(tk.env_reset_ack() + tk.done()))
    assert state.statements.handles == {}


def test_failed_prepare_without_a_returnvalue_forgets_the_handle():
    proto, state = client(), TDSServerState()
    send(proto, state, rpc(prepare_call()))
    answer(proto, reply(tk.error(102, "Incorrect syntax", 1, 15, "s") + tk.done_proc(tk.DONE_ERROR)))
    assert proto.handles == {}


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**32))
def test_rewritten_answers_survive_any_packet_split(seed):
    """A re-prepare's answer with wide rows, in 512-byte packets fed in random pieces: the same tokens as fed
    whole, the handle swallowed."""
    rng = random.Random(seed)
    proto, state = prepared_client()
    proto.unlink()
    other = TDSServerState()
    send(proto, other, rpc(execute_call(1, 1)))
    wide = [tk.Column("w", tk.TypeInfo(tk.NVARCHAR, 8000))]
    rows = tk.colmetadata(wide) + b"".join(tk.row(wide, ["x%d" % i * 700]) for i in range(6))
    body = (rows + tk.done_in_proc(tk.DONE_COUNT | tk.DONE_MORE, 0xC1, 6) + tk.returnstatus(0)
            + tk.returnvalue(0, "@handle", INT4, 5) + tk.done_proc())
    data = tp.encode_message(tp.TABULAR_RESULT, body, 512)
    out = b""
    pos = 0
    while pos < len(data):
        step = rng.randint(1, 700)
        out += answer(proto, data[pos:pos + step])
        pos += step
    got = b"".join(m.data for m in messages(out))
    assert got == rows + tk.done_in_proc(tk.DONE_COUNT | tk.DONE_MORE, 0xC1, 6) + tk.returnstatus(0) + tk.done_proc()
    assert other.statements.handles == {(DECL, TEXT): 5} and not proto.linked


def test_plan_effects_match_request_effects():
    from multiproxy_engines.tds.session_state import request_effects
    proto = client()
    reset_call = tp.RpcCall(proc_name="sp_reset_connection")
    for status in (0, tp.STATUS_RESETCONNECTION, tp.STATUS_RESETCONNECTIONSKIPTRAN):
        data = rpc(prepare_call(), reset_call, execute_call(5, 1), status=status)
        msg = messages(data)[0]
        plan = proto._resolve_rpc(msg.status, msg.data)
        assert plan.effects() == request_effects(msg)
    msg = messages(rpc(prepare_call(), tp.RpcCall(proc_id=tp.SP_EXECUTESQL, params=[tp.RpcParam("", NV, "SELECT 1")])))[0]
    assert proto._resolve_rpc(msg.status, msg.data).effects() is None


def test_tsql_unprepare_batches_are_answered_by_the_proxy():
    """mssql-jdbc unprepares discarded handles with a SQL batch of `EXEC sp_unprepare N;`: those are proxy
    handles, so the batch never reaches a backend (where the numbers name other statements)."""
    assert S.tsql_unprepares(tp.SqlBatch("EXEC sp_unprepare 1;EXEC sp_unprepare 22;").encode()) == [1, 22]
    assert S.tsql_unprepares(tp.SqlBatch(" exec [sys].[sp_unprepare] 3 ").encode()) == [3]
    assert S.tsql_unprepares(tp.SqlBatch("EXEC sp_unprepare 1; SELECT 1").encode()) is None
    assert S.tsql_unprepares(tp.SqlBatch("SELECT 'sp_unprepare'").encode()) is None
    proto, state = prepared_client()
    sent, local = send(proto, state, tp.encode_message(tp.SQL_BATCH, tp.SqlBatch(
        "EXEC sp_unprepare 1;EXEC sp_unprepare 5;").encode()))
    assert sent == b""
    toks = tokens(local)
    assert [t.type for t in toks] == [tk.TOKEN_RETURNSTATUS, tk.TOKEN_DONEPROC, tk.TOKEN_ERROR, tk.TOKEN_DONEPROC,
                                      tk.TOKEN_DONE]
    assert toks[2].number == 8179 and toks[-1].status == 0
    assert proto.handles == {} and state.statements.handles == {(DECL, TEXT): 77}


def test_attention_during_a_rewritten_answer():
    proto, state = prepared_client()
    send(proto, state, rpc(prepare_call(proc=tp.SP_PREPEXEC, values=[tp.RpcParam("@a", INT4, 4)])))
    sent, _ = proto.client_data(tp.encode_message(tp.ATTENTION, b""))
    assert sent[0] == tp.ATTENTION
    out = answer(proto, reply(tk.colmetadata(COLS) + tk.row(COLS, [5])) + reply(tk.done(tk.DONE_ATTN)))
    toks = tokens(out)
    assert toks[-1].type == tk.TOKEN_DONE and toks[-1].status & tk.DONE_ATTN
    assert not proto.expect and not proto.linked


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**32), st.sampled_from([True, False]))
def test_fuzz_pipelined_requests_answered_in_order(seed, reset):
    """Several requests in one chunk (the family, unknown handles, unprepares, plain sp_executesql, several calls
    per message), some answered by the proxy and some by the model backend: every answer in request order and
    right."""
    rng = random.Random(seed)
    backends = [ModelBackend() for _ in range(2)]
    proto = client(reset=reset, limit=rng.randint(1, 3))
    mine: dict[int, int] = {}
    next_handle = 1
    for _ in range(15):
        requests, expected = [], []
        for _ in range(rng.randint(1, 4)):
            kind = rng.choice(["execute", "execute", "unprepare", "bogus", "sql", "prepare", "multi"])
            a = rng.randrange(100)
            if kind in ("execute", "unprepare", "multi") and not mine:
                kind = "bogus"
            if kind == "execute":
                h = rng.choice(sorted(mine))
                requests.append(rpc(execute_call(h, a)))
                expected.append(("rows", [a + mine[h]]))
            elif kind == "unprepare":
                h = rng.choice(sorted(mine))
                requests.append(rpc(unprepare_call(h)))
                expected.append(("ok", None))
                del mine[h]
            elif kind == "bogus":
                requests.append(rpc(execute_call(rng.randrange(500, 600), a)))
                expected.append(("error", 8179))
            elif kind == "sql":
                requests.append(rpc(tp.RpcCall(proc_name="sp_model_echo", params=[tp.RpcParam("", INT4, a)])))
                expected.append(("rows", [a]))
            elif kind == "prepare":
                n = rng.randrange(5)
                requests.append(rpc(prepare_call(text=f"SELECT @a + {n}")))
                expected.append(("handle", next_handle))
                mine[next_handle] = n
                next_handle += 1
            else:
                h = rng.choice(sorted(mine))
                requests.append(rpc(execute_call(h, a), execute_call(999, 0), execute_call(h, a + 1)))
                expected.append(("multi", [[a + mine[h]], [a + 1 + mine[h]]]))
        backend = rng.choice(backends)
        sent, local = proto.client_data(b"".join(requests))
        out = local
        if sent:
            sent = proto.link(backend.state, sent)
            out += answer(proto, backend.run(sent))
        assert not proto.linked and not proto.expect
        answers = messages(out)
        assert len(answers) == len(expected)
        for msg, (what, value) in zip(answers, expected):
            toks = tk.TokenReader().read(msg.data)
            rows = [t.values[0] for t in toks if t.type == tk.TOKEN_ROW]
            errs = [t.number for t in toks if t.type == tk.TOKEN_ERROR]
            if what == "rows":
                assert rows == value and errs == []
            elif what == "ok":
                assert rows == [] and errs == []
            elif what == "error":
                assert errs == [value]
            elif what == "handle":
                assert [t.value for t in toks if t.type == tk.TOKEN_RETURNVALUE] == [value] and errs == []
            else:
                assert [[r] for r in rows] == value and errs == [8179]
        for b in backends:
            for key, h in b.state.statements.handles.items():
                assert b.prepared.get(h) == key[1]


def test_odd_spellings_and_separators_are_kept():
    proto, state = prepared_client()
    sent, _ = send(proto, state, rpc(execute_call(1, 1, name="sP_eXeCuTe")))
    assert calls_of(sent)[0].params[0].value == 77          # rewritten though no marker matched
    answer(proto, reply(rows_answer(2) + tk.done_proc()))
    request = bytearray(rpc(execute_call(1, 1), execute_call(1, 2)))
    at = request.index(b"\xff\xff\xff\x0c\x00")          # RpcRequest.encode separates calls with 0xFF
    request[at] = 0xFE                                      # NoExecFlag between the calls
    sent, _ = send(proto, state, bytes(request))
    assert b"\xfe\xff\xff\x0c\x00" in sent
