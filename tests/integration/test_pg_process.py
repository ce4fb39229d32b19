"""The proxy process: forked workers route cancels, idle clients time out, connection limits, graceful drain."""
import signal
import threading
import time

import psycopg
import pytest

from .proxy import free_port


def config(pg, **proxy_settings):
    proxy = {"admin_listen": f"127.0.0.1:{free_port()}", "log_level": "info"}
    proxy.update(proxy_settings)
    return {
        "proxy": proxy,
        "clusters": {"main": {"engine": "postgres", "hosts": [f"127.0.0.1:{pg.port}"], "backend": {"tls": "disable"},
                              "pool": {"mode": "transaction", "max_size": 4, "borrow_timeout": 5.0}}},
        "listeners": [{"name": "pg", "listen": f"127.0.0.1:{free_port()}", "cluster": "main", "auth": "trust"}],
    }


def connect(proxy, **kw):
    host, port = proxy.address("pg")
    return psycopg.connect(host=host, port=port, user="mp_trust", dbname="mpdb", connect_timeout=10, **kw)


def test_cancels_reach_the_right_worker(pg, proxy_factory):
    proxy = proxy_factory(config(pg, workers=2))
    cancelled = 0
    for _ in range(12):  # a cancel's new connection lands on either worker; all must work
        with connect(proxy, autocommit=True) as conn:
            timer = threading.Timer(0.3, conn.cancel)
            timer.start()
            started = time.monotonic()
            with pytest.raises(psycopg.errors.QueryCanceled):
                conn.execute("SELECT pg_sleep(20)")
            assert time.monotonic() - started < 5
            cancelled += 1
            assert conn.execute("SELECT 41 + 1").fetchone() == (42,)
    assert cancelled == 12


def test_idle_client_is_closed_with_an_error(pg, proxy_factory):
    proxy = proxy_factory(config(pg, idle_client_timeout=1.0))
    conn = connect(proxy, autocommit=True)
    assert conn.execute("SELECT 1").fetchone() == (1,)
    time.sleep(2.0)
    with pytest.raises(psycopg.OperationalError) as info:
        conn.execute("SELECT 1")
    assert "idle" in str(info.value)
    conn.close()
    with connect(proxy, autocommit=True) as other:
        assert other.execute("SELECT 2").fetchone() == (2,)


def test_idle_in_transaction_client_is_closed_and_rolled_back(pg, proxy_factory):
    pg.psql("CREATE TABLE IF NOT EXISTS idle_tx (n int); GRANT ALL ON idle_tx TO PUBLIC", db="mpdb")
    proxy = proxy_factory(config(pg, idle_transaction_timeout=1.0))
    conn = connect(proxy)
    conn.execute("INSERT INTO idle_tx VALUES (7)")
    time.sleep(2.0)
    with pytest.raises(psycopg.errors.IdleInTransactionSessionTimeout) as info:
        conn.commit()
    assert "idle_transaction_timeout" in str(info.value)
    with connect(proxy, autocommit=True) as other:
        assert other.execute("SELECT count(*) FROM idle_tx WHERE n = 7").fetchone() == (0,)


def test_listener_connection_limit(pg, proxy_factory):
    cfg = config(pg)
    cfg["listeners"][0]["max_client_connections"] = 2
    proxy = proxy_factory(cfg)
    first, second = connect(proxy), connect(proxy)
    with pytest.raises(psycopg.OperationalError) as info:
        connect(proxy)
    assert "max_client_connections" in str(info.value)
    first.close()
    deadline = time.monotonic() + 5
    while True:  # the slot frees once the proxy sees the close
        try:
            third = connect(proxy)
            break
        except psycopg.OperationalError:
            assert time.monotonic() < deadline
            time.sleep(0.1)
    assert third.execute("SELECT 3").fetchone() == (3,)
    third.close()
    second.close()


def test_sigterm_lets_a_running_transaction_finish(pg, proxy_factory):
    proxy = proxy_factory(config(pg, shutdown_timeout=10.0))
    conn = connect(proxy, autocommit=True)
    result = {}

    def slow():
        result["row"] = conn.execute("SELECT pg_sleep(1.5), 5").fetchone()

    worker = threading.Thread(target=slow)
    worker.start()
    time.sleep(0.3)
    proxy.send_signal(signal.SIGTERM)
    worker.join(10)
    assert result["row"][1] == 5
    conn.close()
