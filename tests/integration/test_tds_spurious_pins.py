"""No spurious pins (issue 13, TDS): idle pymssql/python-tds transactions hold no backend, SET options are tracked
and replayed, resets unpin, a statement that never reached a backend changes nothing, and RESETCONNECTION keeps
indirect changes from leaking to the next client. The TDS lab server, real pymssql and python-tds, more clients
than backends, pin gauges and pool timeout counters checked."""
from __future__ import annotations

import threading
import time

import pytest

from multiproxy_engines.tds.wire import messages as tp
from multiproxy_engines.tds.wire import token_stream as tk

from .helpers import metric, metrics_text, run_clients
from .tdskit import LabProcess
from .test_tds_proxy import PINNED, RawClient, errors, ms, one, start, td

pytestmark = pytest.mark.tds
BORROWED = "multiproxy_database_connections_currently_borrowed"
BORROW_TIMEOUTS = "multiproxy_database_connection_borrow_timeouts_total"


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    server = LabProcess(tmp_path_factory.mktemp("tdslab-pins"))
    yield server
    server.stop()


def start_with_reset(proxy_factory, lab, reset: str, **kwargs):
    """A proxy whose cluster sets [clusters.main.backend] reset_after_transaction."""
    from .test_tds_proxy import tds_config, users_toml
    config = tds_config(lab, **kwargs)
    config["clusters"]["main"]["backend"]["reset_after_transaction"] = reset
    return proxy_factory(config, files={"users.toml": users_toml()})


def pinned(text: str, **labels) -> float:
    """Sessions pinned now (by reason, with `reason=`); the gauge has no sample before any pin."""
    return metric(text, PINNED, **labels) or 0


def wait_for(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.05)
    return predicate()


@pytest.mark.timeout(240)
def test_100_idle_pymssql_autocommit_off_connections_on_10_backends(lab, proxy_factory):
    """The issue's measure: pymssql (autocommit off) sends BEGIN TRAN at connect and after every commit; 100 such
    idle connections on a pool of 10 hold no backend and are all usable."""
    proxy = start(proxy_factory, lab, max_size=10, borrow_timeout=5.0)
    with ms(proxy) as setup:
        setup.cursor().execute("CREATE TABLE idle_tx (client INT, n INT)")
    conns = [ms(proxy, autocommit=False) for _ in range(100)]
    try:
        assert metric(metrics_text(proxy), BORROWED) == 0          # 100 open transactions, no backend held
        barrier = threading.Barrier(100)

        def work(i):
            conn = conns[i]
            barrier.wait(60)
            for n in range(2):
                cur = conn.cursor()
                cur.execute("INSERT INTO idle_tx VALUES (%d, %d)", (i, n))
                cur.execute("SELECT COUNT(*) FROM idle_tx WHERE client = %d", (i,))
                assert cur.fetchone()[0] == n + 1
                conn.commit()

        assert run_clients(100, work, 120.0, together=False) == []
        assert wait_for(lambda: metric(metrics_text(proxy), BORROWED) == 0)
        # a rollback of work done, then of nothing done: each leaves the rows as they were
        cur = conns[0].cursor()
        cur.execute("INSERT INTO idle_tx VALUES (999, 0)")
        conns[0].rollback()
        conns[1].rollback()
    finally:
        for conn in conns:
            conn.close()
    with ms(proxy) as check:
        assert one(check, "SELECT COUNT(*), COUNT(DISTINCT client) FROM idle_tx") == [(200, 100)]
    text = metrics_text(proxy)
    assert metric(text, BORROW_TIMEOUTS) == 0 and pinned(text) == 0
    assert metric(text, "multiproxy_database_connections") <= 10


@pytest.mark.timeout(180)
def test_python_tds_autocommit_off_idle_connections_hold_no_backend(lab, proxy_factory):
    """python-tds (autocommit off) begins with TM_BEGIN_XACT and commits with TM_COMMIT_XACT + fBeginXact: the
    proxy answers the begins, and the descriptors the client echoes are mapped to the backend's."""
    proxy = start(proxy_factory, lab, max_size=4, borrow_timeout=5.0)
    with td(proxy) as setup:
        setup.cursor().execute("CREATE TABLE idle_tm (client INT)")
    conns = [td(proxy, autocommit=False) for _ in range(20)]
    try:
        assert metric(metrics_text(proxy), BORROWED) == 0

        def work(i):
            cur = conns[i].cursor()
            cur.execute("INSERT INTO idle_tm VALUES (%s)", (i,))
            cur.execute("SELECT COUNT(*) FROM idle_tm WHERE client = %s", (i,))   # same transaction, mapped
            assert cur.fetchone()[0] == 1
            conns[i].commit()
            conns[i].commit()                                  # nothing since: answered by the proxy

        assert run_clients(20, work, 120.0, together=False) == []
        assert wait_for(lambda: metric(metrics_text(proxy), BORROWED) == 0)
    finally:
        for conn in conns:
            conn.close()
    with td(proxy) as check:
        assert one(check, "SELECT COUNT(*) FROM idle_tm") == [(20,)]
    text = metrics_text(proxy)
    assert metric(text, BORROW_TIMEOUTS) == 0 and pinned(text) == 0


def test_set_options_follow_each_client_and_pin_nothing(lab, proxy_factory):
    """pymssql's connect-time SET batch and a client's own SET options: replayed on the one backend as the
    clients take turns, never leaking to the other, never pinning."""
    proxy = start(proxy_factory, lab, max_size=1)
    a, b = ms(proxy), ms(proxy)
    try:
        for sql in ("SET XACT_ABORT ON", "SET LOCK_TIMEOUT 1234", "SET DATEFORMAT dmy",
                    "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE", "SET NOCOUNT ON"):
            a.cursor().execute(sql)
        for _ in range(2):
            assert one(a, "SELECT @@OPTIONS & 16384, @@LOCK_TIMEOUT, @@OPTIONS & 512") == [(16384, 1234, 512)]
            assert one(b, "SELECT @@OPTIONS & 16384, @@LOCK_TIMEOUT, @@OPTIONS & 512") == [(0, -1, 0)]
        assert one(b, "SELECT @@OPTIONS & 4096") == [(4096,)]     # pymssql's CONCAT_NULL_YIELDS_NULL ON
        assert pinned(metrics_text(proxy)) == 0
    finally:
        a.close()
        b.close()


def test_a_statement_that_never_reached_a_backend_changes_nothing(lab, proxy_factory):
    proxy = start(proxy_factory, lab, max_size=1, borrow_timeout=1.0)
    holder, late = RawClient(proxy.port), RawClient(proxy.port)
    try:
        holder.batch("BEGIN TRAN")
        holder.batch("SELECT 1")                      # the transaction now holds the only backend
        refused = errors(late.batch("CREATE TABLE #never (x INT); SET IDENTITY_INSERT t ON"))
        assert refused and refused[0][0] == 10928
        text = metrics_text(proxy)
        assert pinned(text) == 0
        assert not metric(text, "multiproxy_pin_reasons_detected_total")
        holder.batch("COMMIT TRAN")
        assert late.rows("SELECT 1") == [[1]]
        assert wait_for(lambda: metric(metrics_text(proxy), BORROWED) == 0)   # not pinned: released
    finally:
        holder.close()
        late.close()


def test_sp_reset_connection_and_the_reset_bit_unpin(lab, proxy_factory):
    proxy = start(proxy_factory, lab, max_size=2)
    c = RawClient(proxy.port)
    try:
        c.batch("CREATE TABLE #mine (x INT); SET TEXTSIZE 77")
        assert pinned(metrics_text(proxy), reason="temp_table") == 1
        c.send(tp.RPC, tp.RpcRequest([tp.RpcCall(proc_name="sp_reset_connection")]).encode())
        c.read_tokens()
        assert wait_for(lambda: pinned(metrics_text(proxy)) == 0)
        assert errors(c.batch("SELECT * FROM #mine"))[0][0] == 208
        assert c.rows("SELECT @@TEXTSIZE") == [[-1]]
        c.batch("SELECT 1 AS x INTO #again")
        assert pinned(metrics_text(proxy), reason="temp_table") == 1
        toks = c.batch("SELECT @@TEXTSIZE", status=tp.STATUS_RESETCONNECTION)
        assert toks[0].type == tk.TOKEN_ENVCHANGE and toks[0].env_type == tk.ENV_RESETACK   # the client's own ack
        assert wait_for(lambda: pinned(metrics_text(proxy)) == 0)
        assert wait_for(lambda: metric(metrics_text(proxy), BORROWED) == 0)
    finally:
        c.close()


@pytest.mark.parametrize("reset,leaks", [("auto", False), ("no", True)])
def test_indirect_change_leaks_only_without_reset(lab, proxy_factory, reset, leaks):
    """CONTEXT_INFO set inside dynamic SQL is invisible to the proxy (no pin): the default RESETCONNECTION before
    the next client clears it; with reset_after_transaction = no the next client sees it."""
    proxy = start_with_reset(proxy_factory, lab, reset, max_size=1)
    a, b = RawClient(proxy.port), RawClient(proxy.port)
    try:
        a.batch("EXEC('SET CONTEXT_INFO 0x0A0B')")
        assert a.rows("SELECT CONTEXT_INFO()") == [[b"\x0a\x0b"]]
        assert pinned(metrics_text(proxy)) == 0
        assert b.rows("SELECT CONTEXT_INFO()") == ([[b"\x0a\x0b"]] if leaks else [[None]])
    finally:
        a.close()
        b.close()


def test_without_resets_another_clients_set_options_never_reach_a_client(lab, proxy_factory):
    """reset_after_transaction = no on one backend: a client that never SET NOCOUNT or DATEFIRST sees the login's
    values after a client that did (the backend is reset for it), and the first client keeps its own."""
    proxy = start_with_reset(proxy_factory, lab, "no", max_size=1)
    a, b = RawClient(proxy.port), RawClient(proxy.port)
    try:
        a.batch("SET NOCOUNT ON; SET DATEFIRST 3")
        for _ in range(3):
            assert a.rows("SELECT @@OPTIONS & 512, @@DATEFIRST") == [[512, 3]]
            assert b.rows("SELECT @@OPTIONS & 512, @@DATEFIRST") == [[0, 7]]
        b.batch("SET DATEFIRST 5")
        assert a.rows("SELECT @@DATEFIRST") == [[3]] and b.rows("SELECT @@OPTIONS & 512, @@DATEFIRST") == [[0, 5]]
    finally:
        a.close()
        b.close()


@pytest.mark.timeout(300)
def test_reset_cost_yes_against_no(lab, proxy_factory, capsys):
    """Two pymssql clients taking turns on one backend (each turn a new link: reset + replay of pymssql's SET
    batch, or the replay alone): both work; the median time per query of five interleaved runs is printed."""
    rounds, runs = 400, 5
    clients = {}
    for reset in ("yes", "no"):
        proxy = start_with_reset(proxy_factory, lab, reset, max_size=1)
        clients[reset] = (ms(proxy), ms(proxy))
    timings: dict[str, list[float]] = {"yes": [], "no": []}
    try:
        for _ in range(runs):
            for reset, (a, b) in clients.items():
                began = time.perf_counter()
                for i in range(rounds):
                    assert one(a if i % 2 else b, "SELECT %d", (i,)) == [(i,)]
                timings[reset].append((time.perf_counter() - began) / rounds * 1e6)
    finally:
        for a, b in clients.values():
            a.close()
            b.close()
    median = {reset: sorted(values)[len(values) // 2] for reset, values in timings.items()}
    with capsys.disabled():
        print(f"\nTDS query alternating two clients on one backend (median of {runs} x {rounds}): "
              f"reset_after_transaction=yes {median['yes']:.0f} us/query, no {median['no']:.0f} us/query")
