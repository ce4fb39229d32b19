"""The knobs operators expect, through psycopg on PostgreSQL: init_query, query_timeout, idle_transaction_timeout and
idle_client_timeout (never inside a transaction or while a query runs), max_cluster_connections (a number, a percentage)."""
import threading
import time

import psycopg
import pytest

from .helpers import metric, metrics_text, run_clients
from .proxy import free_port

pytestmark = pytest.mark.timeout(60)


def config(pg, proxy=None, pool=None, backend=None):
    return {
        "proxy": {"admin_listen": f"127.0.0.1:{free_port()}", "log_level": "info", **(proxy or {})},
        "clusters": {"main": {"engine": "postgres", "hosts": [f"127.0.0.1:{pg.port}"],
                              "backend": {"tls": "disable", **(backend or {})},
                              "pool": {"mode": "transaction", "max_size": 4, "borrow_timeout": 10.0, **(pool or {})}}},
        "listeners": [{"name": "pg", "listen": f"127.0.0.1:{free_port()}", "cluster": "main", "auth": "trust"}],
    }


def connect(proxy, dbname="mpdb", **kw):
    host, port = proxy.address("pg")
    return psycopg.connect(host=host, port=port, user="mp_trust", dbname=dbname, connect_timeout=10, **kw)


def test_init_query_runs_on_each_new_backend(pg, proxy_factory):
    proxy = proxy_factory(config(pg, backend={"init_query": "SET statement_timeout = '123s'; SET lock_timeout = '7s'"}))
    with connect(proxy, autocommit=True) as conn:
        assert conn.execute("SHOW statement_timeout").fetchone() == ("123s",)
        assert conn.execute("SHOW lock_timeout").fetchone() == ("7s",)


def test_init_query_failure_fails_the_login_with_the_servers_error(pg, proxy_factory):
    proxy = proxy_factory(config(pg, backend={"init_query": "SELECT no_such_function_knobs()"}))
    with pytest.raises(psycopg.OperationalError) as info:
        connect(proxy)
    assert "no_such_function_knobs" in str(info.value)
    assert "clusters.main.backend.init_query" in proxy.log_text()


def test_query_timeout_cancels_and_the_backend_serves_on(pg, proxy_factory):
    proxy = proxy_factory(config(pg, pool={"query_timeout": 1.0, "max_size": 1}))
    with connect(proxy, autocommit=True) as conn:
        started = time.monotonic()
        with pytest.raises(psycopg.errors.QueryCanceled):
            conn.execute("SELECT pg_sleep(5)")
        assert time.monotonic() - started < 2.5
        assert conn.execute("SELECT 41 + 1").fetchone() == (42,)
        assert conn.execute("SELECT pg_sleep(0.2)").fetchone() == ("",)   # a short query is left alone
    assert metric(metrics_text(proxy), "multiproxy_query_timeouts_total") == 1


def test_idle_client_timeout_spares_transactions_and_running_queries(pg, proxy_factory):
    pg.psql("CREATE TABLE IF NOT EXISTS knobs_idle (n int); GRANT ALL ON knobs_idle TO PUBLIC", db="mpdb")
    proxy = proxy_factory(config(pg, proxy={"idle_client_timeout": 1.0}))
    with connect(proxy) as conn:            # a transaction idle past idle_client_timeout stays open
        conn.execute("INSERT INTO knobs_idle VALUES (11)")
        time.sleep(1.8)
        conn.commit()
    with connect(proxy, autocommit=True) as conn:   # a query running past it is not cut
        assert conn.execute("SELECT pg_sleep(1.8), 5").fetchone() == ("", 5)
        assert conn.execute("SELECT count(*) FROM knobs_idle WHERE n = 11").fetchone() == (1,)
        time.sleep(1.8)                             # idle outside a transaction: closed with an error
        with pytest.raises(psycopg.OperationalError) as info:
            conn.execute("SELECT 1")
        assert "idle_client_timeout" in str(info.value)


def test_idle_transaction_timeout_rolls_back(pg, proxy_factory):
    pg.psql("CREATE TABLE IF NOT EXISTS knobs_idle_tx (n int); GRANT ALL ON knobs_idle_tx TO PUBLIC", db="mpdb")
    proxy = proxy_factory(config(pg, proxy={"idle_transaction_timeout": 1.0, "idle_client_timeout": 30.0}))
    conn = connect(proxy)
    conn.execute("INSERT INTO knobs_idle_tx VALUES (3)")
    time.sleep(1.8)
    with pytest.raises(psycopg.errors.IdleInTransactionSessionTimeout) as info:
        conn.commit()
    assert "idle_transaction_timeout" in str(info.value)
    conn.close()
    with connect(proxy, autocommit=True) as other:
        assert other.execute("SELECT count(*) FROM knobs_idle_tx WHERE n = 3").fetchone() == (0,)
        time.sleep(1.5)     # outside a transaction idle_transaction_timeout does not apply
        assert other.execute("SELECT 1").fetchone() == (1,)
    assert metric(metrics_text(proxy), "multiproxy_client_idle_transaction_timeouts_total") == 1


def _server_connections(pg, user="mp_trust") -> int:
    return int(pg.psql(f"SELECT count(*) FROM pg_stat_activity WHERE usename = '{user}'"))


def test_cluster_cap_holds_across_databases(pg, proxy_factory):
    for name in ("knobs_db2", "knobs_db3"):
        if pg.psql(f"SELECT count(*) FROM pg_database WHERE datname = '{name}'") == "0":
            pg.psql(f"CREATE DATABASE {name}")
    proxy = proxy_factory(config(pg, pool={"max_size": 3, "max_cluster_connections": 4, "idle_timeout": 0}))
    databases = ["mpdb", "knobs_db2", "knobs_db3"]
    highest = [0]
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            highest[0] = max(highest[0], _server_connections(pg))
            time.sleep(0.05)
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    served = []

    def work(i):
        with connect(proxy, dbname=databases[i % 3]) as conn:
            for _ in range(4):
                with conn.transaction():
                    conn.execute("SELECT pg_sleep(0.1)")
            served.append(i)
    try:
        failures = run_clients(9, work, timeout=50)
    finally:
        stop.set()
        watcher.join(5)
    assert failures == []
    assert sorted(served) == list(range(9))
    assert 0 < highest[0] <= 4, highest[0]
    text = metrics_text(proxy)
    assert metric(text, "multiproxy_cluster_connections_max", cluster="main") == 4
    assert metric(text, "multiproxy_cluster_connections", cluster="main") <= 4


def test_cluster_cap_as_a_percentage_of_max_connections(pg, proxy_factory):
    server_max = int(pg.psql("SHOW max_connections"))
    proxy = proxy_factory(config(pg, pool={"max_size": 10, "max_cluster_connections": "3%"}))
    expected = max(1, int(server_max * 3 / 100))
    with connect(proxy, autocommit=True) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    assert metric(metrics_text(proxy), "multiproxy_cluster_connections_max", cluster="main") == expected

    def work(i):
        with connect(proxy) as conn:
            with conn.transaction():
                conn.execute("SELECT pg_sleep(0.2)")
    assert run_clients(expected + 3, work, timeout=40) == []
    assert metric(metrics_text(proxy), "multiproxy_cluster_connections", cluster="main") <= expected


def test_the_pin_log_line_names_the_client(pg, proxy_factory):
    proxy = proxy_factory(config(pg))
    with connect(proxy, autocommit=True) as conn:
        conn.execute("CREATE TEMP TABLE knobs_pinned (n int)")
        assert conn.execute("SELECT count(*) FROM knobs_pinned").fetchone() == (0,)
    deadline = time.monotonic() + 5
    while "pinned to its backend" not in proxy.log_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    line = next(line for line in proxy.log_text().splitlines() if "pinned to its backend" in line)
    for part in ("client 127.0.0.1:", "user 'mp_trust'", "listener pg", "temp_table", "CREATE TEMP TABLE knobs_pinned"):
        assert part in line, (part, line)
