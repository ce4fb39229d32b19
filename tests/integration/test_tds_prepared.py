"""The sp_prepare family through the proxy in front of the TDS lab server, multiplexed instead of pinned: tedious
prepare()/execute() with more connections than backends, eviction past max_prepared_statements, pymssql and
python-tds calling sp_prepare/sp_execute themselves (by name and by id), raw RPC messages with several calls,
unknown handles and local sp_unprepare answers in order. Zero borrow timeouts, zero pins, rows right."""
from __future__ import annotations

import pytest

from multiproxy_engines.tds.wire import messages as tp
from multiproxy_engines.tds.wire import token_stream as tk

from .helpers import metric, metrics_text, run_clients
from .tdskit import DB, LabProcess, tedious_prepared
from .test_tds_proxy import APP_PASSWORD, APP_USER, RawClient, errors, ms, td, tds_config, users_toml

pytestmark = pytest.mark.tds
TIMEOUTS = "multiproxy_database_connection_borrow_timeouts_total"
PINS = "multiproxy_pin_reasons_detected_total"
STATEMENTS = "multiproxy_prepared_statements_total"
INT4 = tk.TypeInfo(tk.INTN, 4)
NV = tk.TypeInfo(tk.NVARCHAR, 4000)


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    server = LabProcess(tmp_path_factory.mktemp("tdslab-prepared"))
    yield server
    server.stop()


def start(proxy_factory, lab, max_size=3, reset="auto", limit=200, options=None, borrow_timeout=20.0):
    config = tds_config(lab, max_size=max_size, borrow_timeout=borrow_timeout)
    cluster = config["clusters"]["main"]
    cluster["backend"].update(reset_after_transaction=reset, max_prepared_statements=limit)
    if options:
        cluster["options"] = options
    return proxy_factory(config, files={"users.toml": users_toml()})


def counts(proxy) -> dict:
    text = metrics_text(proxy)
    return {"timeouts": metric(text, TIMEOUTS) or 0, "pins": metric(text, PINS, reason="prepared_statement") or 0,
            "pinned_now": metric(text, "multiproxy_database_connections_currently_session_pinned") or 0,
            "hits": metric(text, STATEMENTS, outcome="hit") or 0, "misses": metric(text, STATEMENTS, outcome="miss") or 0,
            "evictions": metric(text, STATEMENTS, outcome="eviction") or 0,
            "connections": metric(text, "multiproxy_database_connections") or 0}


def tedious(proxy, clients, rounds, statements=1, transactions=False, together=False):
    return tedious_prepared(proxy.host, proxy.port, APP_USER, APP_PASSWORD, DB, clients, rounds, statements,
                            transactions=transactions, together=together)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("max_size", [10, 3])
def test_tedious_prepare_execute_20_connections(lab, proxy_factory, max_size):
    proxy = start(proxy_factory, lab, max_size=max_size)
    summary = tedious(proxy, 20, 10)
    assert summary["failures"] == 0, summary["errors"]
    assert summary["executes"] == 200 and summary["ok"] == 200
    seen = counts(proxy)
    assert seen["timeouts"] == 0 and seen["pins"] == 0 and seen["pinned_now"] == 0
    # every execute counted; with the default reset before each link to a backend another client used, SQL Server
    # (and the lab) drop the backend's handles, so nearly all are misses (re-prepared by sp_prepexec): hits are
    # asserted where backends keep them (test_tedious_without_resets_mostly_hits)
    assert seen["hits"] + seen["misses"] == 200
    assert seen["connections"] <= max_size


@pytest.mark.timeout(180)
def test_tedious_without_resets_mostly_hits(lab, proxy_factory):
    """reset_after_transaction = no: the backends keep their statements between clients (SQL Server drops them on
    a reset), so after the first execute on each backend nearly every execute is a hit."""
    proxy = start(proxy_factory, lab, max_size=3, reset="no")
    summary = tedious(proxy, 20, 10)
    assert summary["failures"] == 0, summary["errors"]
    seen = counts(proxy)
    assert seen["timeouts"] == 0 and seen["pins"] == 0
    assert seen["misses"] <= 3 and seen["hits"] >= 197


@pytest.mark.timeout(180)
def test_tedious_executes_in_transactions(lab, proxy_factory):
    """beginTransaction (answered by the proxy, begun with the next request), execute, commit: the execute is
    rewritten for the backend it lands on, behind the begin the proxy sends first."""
    proxy = start(proxy_factory, lab, max_size=3)
    summary = tedious(proxy, 12, 5, transactions=True)
    assert summary["failures"] == 0, summary["errors"]
    assert summary["ok"] == 60
    seen = counts(proxy)
    assert seen["timeouts"] == 0 and seen["pins"] == 0 and seen["hits"] + seen["misses"] == 60


@pytest.mark.timeout(180)
def test_eviction_keeps_results_right(lab, proxy_factory):
    proxy = start(proxy_factory, lab, max_size=3, reset="no", limit=3)
    summary = tedious(proxy, 16, 6, statements=8)
    assert summary["failures"] == 0, summary["errors"]
    assert summary["ok"] == 96
    seen = counts(proxy)
    assert seen["evictions"] > 0 and seen["timeouts"] == 0 and seen["pins"] == 0


@pytest.mark.timeout(120)
def test_twenty_connections_hold_prepared_statements_at_once(lab, proxy_factory):
    """All 20 connections prepare, wait until all have, then execute: on 10 backends this works only because a
    prepared statement holds no backend. With prepared_statements = "pin" (the old behaviour) the first 10 pin
    every backend while they wait, and the others' prepares time out (10928)."""
    proxy = start(proxy_factory, lab, max_size=10)
    summary = tedious(proxy, 20, 10, together=True)
    assert summary["failures"] == 0, summary["errors"]
    assert summary["ok"] == 200
    assert counts(proxy)["timeouts"] == 0
    pinning = start(proxy_factory, lab, max_size=10, options={"prepared_statements": "pin"}, borrow_timeout=1.0)
    summary = tedious(pinning, 20, 10, together=True)
    assert summary["failures"] == 10 and all("10928" in e or "no database connection" in e
                                             for e in summary["errors"]), summary["errors"]
    seen = counts(pinning)
    # each failed client timed out at least once; a failed client's later requests (tedious's unprepare, its
    # close) may time out too, so the count is at least, not exactly, the number of failed clients
    assert seen["pins"] == 10 and seen["timeouts"] >= 10


# -- drivers that call the procedures themselves --------------------------------------------------------------
@pytest.mark.timeout(120)
def test_pymssql_calls_sp_prepare_by_name(lab, proxy_factory):
    """pymssql never prepares on its own (it sends SQL batches with the values quoted in); its callproc calls
    procedures by name, here [sys].[sp_prepare] with an OUTPUT handle, then sp_execute, on 3 backends shared by 8
    clients."""
    pymssql = pytest.importorskip("pymssql")
    proxy = start(proxy_factory, lab, max_size=3)

    def work(i):
        with ms(proxy) as conn:
            cur = conn.cursor()
            params = cur.callproc("[sys].[sp_prepare]", (pymssql.output(int), "@a int", f"SELECT @a + {i}"))
            handle = params[0]
            assert isinstance(handle, int), params
            for n in range(5):
                cur.callproc("sp_execute", (handle, n))
                assert cur.fetchall() == [(n + i,)]
            cur.callproc("sys.sp_unprepare", (handle,))

    assert run_clients(8, work, 90.0) == []
    seen = counts(proxy)
    assert seen["timeouts"] == 0 and seen["pins"] == 0 and seen["hits"] + seen["misses"] == 40


@pytest.mark.timeout(120)
def test_python_tds_calls_the_procedures_by_id(lab, proxy_factory):
    """python-tds runs parameterised queries with sp_executesql and has no prepare API; its callproc takes the
    well-known procedures (ProcIDSwitch), so it drives sp_prepare (11), sp_execute (12) and sp_unprepare (15)."""
    pytds = pytest.importorskip("pytds")
    from pytds import tds_base
    proxy = start(proxy_factory, lab, max_size=3)

    def work(i):
        with td(proxy) as conn:
            cur = conn.cursor()
            params = cur.callproc(tds_base.SP_PREPARE, (pytds.output(param_type=int), "@a int", f"SELECT @a * {i}"))
            handle = params[0]
            assert isinstance(handle, int), params
            for n in range(5):
                cur.callproc(tds_base.SP_EXECUTE, (handle, n))
                assert cur.fetchall() == [(n * i,)]
            cur.callproc(tds_base.InternalProc(tp.SP_UNPREPARE, "sp_unprepare"), (handle,))

    assert run_clients(8, work, 90.0) == []
    seen = counts(proxy)
    assert seen["timeouts"] == 0 and seen["pins"] == 0 and seen["hits"] + seen["misses"] == 40


# -- raw RPC messages --------------------------------------------------------------------------------------------
def prepare(text, proc=tp.SP_PREPARE, values=()):
    return tp.RpcCall(proc_id=proc, params=[tp.RpcParam("@handle", INT4, None, tp.PARAM_BY_REF),
                                            tp.RpcParam("@params", NV, "@a int"), tp.RpcParam("@stmt", NV, text),
                                            *values])


def execute(handle, value):
    return tp.RpcCall(proc_id=tp.SP_EXECUTE, params=[tp.RpcParam("", INT4, handle), tp.RpcParam("", INT4, value)])


@pytest.mark.timeout(60)
def test_raw_batches_of_calls_unknown_handles_and_local_unprepare(lab, proxy_factory):
    proxy = start(proxy_factory, lab, max_size=2)
    a, b = RawClient(proxy.port), RawClient(proxy.port)
    try:
        a.send(tp.RPC, tp.RpcRequest([prepare("SELECT @a + 1")]).encode())
        handle = next(t.value for t in a.read_tokens() if t.type == tk.TOKEN_RETURNVALUE)
        assert handle == 1
        b.send(tp.RPC, tp.RpcRequest([prepare("SELECT @a + 2", tp.SP_PREPEXEC, [tp.RpcParam("@a", INT4, 5)])]).encode())
        toks = b.read_tokens()
        assert [t.values for t in toks if t.type == tk.TOKEN_ROW] == [[7]]
        assert [t.value for t in toks if t.type == tk.TOKEN_RETURNVALUE] == [1]     # b's own first handle
        # three calls in one message: a known handle, an unknown one, the known one again
        a.send(tp.RPC, tp.RpcRequest([execute(handle, 1), execute(41, 0), execute(handle, 2)]).encode())
        toks = a.read_tokens()
        assert [t.values for t in toks if t.type == tk.TOKEN_ROW] == [[2], [3]]
        assert [e[0] for e in errors(toks)] == [8179]
        assert errors(toks)[0][2] == "Could not find prepared statement with handle 41."
        # unprepare while nothing is linked: the proxy answers; the handle is gone for this client only
        a.send(tp.RPC, tp.RpcRequest([tp.RpcCall(proc_name="sp_unprepare", params=[
            tp.RpcParam("", INT4, handle)])]).encode())
        toks = a.read_tokens()
        assert [t.type for t in toks] == [tk.TOKEN_RETURNSTATUS, tk.TOKEN_DONEPROC] and not errors(toks)
        a.send(tp.RPC, tp.RpcRequest([execute(handle, 1)]).encode())
        assert [e[0] for e in errors(a.read_tokens())] == [8179]
        b.send(tp.RPC, tp.RpcRequest([execute(1, 10)]).encode())
        assert [t.values for t in b.read_tokens() if t.type == tk.TOKEN_ROW] == [[12]]
        assert a.rows("SELECT 5") == [[5]]
    finally:
        a.close()
        b.close()
    assert counts(proxy)["pins"] == 0
