"""The knobs operators expect, on the TDS engine through pymssql and raw TDS against the lab server: init_query (also
after each RESETCONNECTION), query_timeout through an ATTENTION the proxy sends, idle_client_timeout sparing a running
request and a transaction, max_cluster_connections across databases."""
from __future__ import annotations

import time

import pytest

from multiproxy_engines.tds.wire import messages as tp
from multiproxy_engines.tds.wire import token_stream as tk

from .helpers import metric, metrics_text, run_clients
from .test_tds_proxy import RawClient, errors, ms, one, tds_config, users_toml
from .tdskit import LabProcess

pymssql = pytest.importorskip("pymssql")

pytestmark = [pytest.mark.tds, pytest.mark.timeout(60)]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    server = LabProcess(tmp_path_factory.mktemp("tdslab-knobs"))
    yield server
    server.stop()


def start(proxy_factory, lab, proxy=None, pool=None, backend=None, **kwargs):
    config = tds_config(lab, **kwargs)
    config["proxy"].update(proxy or {})
    config["clusters"]["main"]["pool"].update(pool or {})
    config["clusters"]["main"]["backend"].update(backend or {})
    return proxy_factory(config, files={"users.toml": users_toml()})


def test_init_query_holds_across_resets(lab, proxy_factory):
    proxy = start(proxy_factory, lab, max_size=1, backend={"init_query": "SET LOCK_TIMEOUT 1234"})
    with ms(proxy) as conn:
        assert one(conn, "SELECT @@LOCK_TIMEOUT") == [(1234,)]
        assert one(conn, "SELECT @@LOCK_TIMEOUT") == [(1234,)]
    with ms(proxy) as other:        # the same backend, reset for another client: the init query ran again
        assert one(other, "SELECT @@LOCK_TIMEOUT") == [(1234,)]


def test_init_query_failure_fails_the_login(lab, proxy_factory):
    proxy = start(proxy_factory, lab, backend={"init_query": "SELECT * FROM no_such_table_knobs"})
    with pytest.raises(pymssql.Error) as info:
        with ms(proxy) as conn:
            one(conn, "SELECT 1")
    assert "no_such_table_knobs" in str(info.value)
    assert "clusters.main.backend.init_query" in proxy.log_text()


def test_query_timeout_cancels_waitfor_and_the_backend_serves_on(lab, proxy_factory):
    proxy = start(proxy_factory, lab, max_size=1, pool={"query_timeout": 1.0})
    with ms(proxy) as conn:
        started = time.monotonic()
        with pytest.raises(pymssql.Error) as info:
            one(conn, "WAITFOR DELAY '00:00:05'; SELECT 1")
        assert time.monotonic() - started < 2.5
        assert "query_timeout" in str(info.value)
        assert one(conn, "SELECT 42") == [(42,)]
    c = RawClient(proxy.port)           # the raw reply: rows so far, then the proxy's error closing the request
    try:
        c.send(tp.SQL_BATCH, tp.SqlBatch("WAITFOR DELAY '00:00:05'").encode())
        toks = c.read_tokens()
        found = errors(toks)
        assert found and found[0][0] == 50003 and "query_timeout" in found[0][2], found
        assert toks[-1].type == tk.TOKEN_DONE and toks[-1].status & tk.DONE_ERROR
        assert not toks[-1].status & tk.DONE_ATTN
        assert c.rows("SELECT 43") == [[43]]
    finally:
        c.close()
    assert metric(metrics_text(proxy), "multiproxy_query_timeouts_total") == 2


def test_idle_client_timeout_spares_a_running_request_and_a_transaction(lab, proxy_factory):
    proxy = start(proxy_factory, lab, proxy={"idle_client_timeout": 1.0})
    with ms(proxy) as conn:
        assert one(conn, "WAITFOR DELAY '00:00:01.800'; SELECT 7") == [(7,)]
    with ms(proxy, autocommit=False) as conn:
        one(conn, "SELECT 1")
        time.sleep(1.8)
        assert one(conn, "SELECT 2") == [(2,)]
        conn.commit()


def test_cluster_cap_across_databases(lab, proxy_factory):
    proxy = start(proxy_factory, lab, max_size=3, pool={"max_cluster_connections": 2})
    databases = ["master", "labdb"]

    def work(i):
        with pymssql.connect(server=proxy.host, port=proxy.port, user="app", password="app-pw",
                             database=databases[i % len(databases)], autocommit=True, tds_version="7.4") as conn:
            for _ in range(3):
                assert one(conn, "WAITFOR DELAY '00:00:00.100'; SELECT 1") == [(1,)]
    assert run_clients(6, work, timeout=50) == []
    text = metrics_text(proxy)
    assert metric(text, "multiproxy_cluster_connections_max", cluster="main") == 2
    assert metric(text, "multiproxy_cluster_connections", cluster="main") <= 2
    assert metric(text, "multiproxy_database_connections", cluster="main") <= 2
