"""The knobs operators expect, on MariaDB through PyMySQL: init_query (several statements), query_timeout through KILL
QUERY, idle_transaction_timeout and idle_client_timeout (never inside a transaction or while a query runs),
max_cluster_connections across databases (a number, a percentage of @@max_connections)."""
from __future__ import annotations

import threading
import time

import pymysql
import pytest

from .helpers import run_clients
from .mysqlkit import BACKEND_USER, connect, direct, metric, metrics_text, mysql_config, query, users_toml

pytestmark = pytest.mark.timeout(60)


def start(proxy_factory, mariadb, pool=None, backend=None, **kwargs):
    config = mysql_config(mariadb, **kwargs)
    config["clusters"]["main"]["pool"].update(pool or {})
    config["clusters"]["main"]["backend"].update(backend or {})
    return proxy_factory(config, files={"users.toml": users_toml()})


def test_init_query_runs_on_each_new_backend(mariadb, proxy_factory):
    proxy = start(proxy_factory, mariadb, backend={"init_query": "SET SESSION lock_wait_timeout = 77; "
                                                                 "SET @knobs_init = 'yes'"})
    conn = connect(proxy)
    assert query(conn, "SELECT @@SESSION.lock_wait_timeout, @knobs_init") == [(77, "yes")]
    conn.close()


def test_init_query_failure_fails_the_login_with_the_servers_error(mariadb, proxy_factory):
    proxy = start(proxy_factory, mariadb, backend={"init_query": "SELECT * FROM no_such_table_knobs"})
    with pytest.raises(pymysql.err.MySQLError) as info:
        query(connect(proxy), "SELECT 1")
    assert "no_such_table_knobs" in str(info.value)
    assert "clusters.main.backend.init_query" in proxy.log_text()


def test_query_timeout_cancels_with_kill_query_and_the_backend_serves_on(mariadb, proxy_factory):
    proxy = start(proxy_factory, mariadb, max_size=1, pool={"query_timeout": 1.0})
    conn = connect(proxy)
    started = time.monotonic()
    try:
        rows = query(conn, "SELECT SLEEP(5)")
    except pymysql.err.OperationalError as exc:
        rows = exc.args[0]
    assert time.monotonic() - started < 2.5
    assert rows in ([(1,)], 1317), rows      # SLEEP interrupted by KILL QUERY returns 1 (MariaDB), or error 1317
    started = time.monotonic()
    with pytest.raises(pymysql.err.OperationalError) as info:   # a statement the kill interrupts with an error
        query(conn, "SELECT COUNT(*) FROM information_schema.columns a, information_schema.columns b, "
                    "information_schema.columns c")
    assert info.value.args[0] == 1317, info.value
    assert time.monotonic() - started < 2.5
    assert query(conn, "SELECT 41 + 1") == [(42,)]
    conn.close()
    assert metric(metrics_text(proxy), "multiproxy_query_timeouts_total") == 2


def test_idle_timeouts(mariadb, proxy_factory):
    admin = direct(mariadb)
    query(admin, "CREATE TABLE IF NOT EXISTS knobs_idle (n INT)")
    proxy = start(proxy_factory, mariadb, proxy={"idle_client_timeout": 1.0, "idle_transaction_timeout": 2.5})
    conn = connect(proxy)
    assert query(conn, "SELECT SLEEP(1.6), 5") == [(0, 5)]        # a running query is not cut
    conn.begin()
    query(conn, "INSERT INTO knobs_idle VALUES (5)")
    time.sleep(1.6)                                               # past idle_client_timeout, inside a transaction
    assert query(conn, "SELECT COUNT(*) FROM knobs_idle WHERE n = 5") == [(1,)]
    time.sleep(3.0)                                               # past idle_transaction_timeout: closed
    with pytest.raises(pymysql.err.MySQLError) as info:
        conn.commit()
    assert "idle_transaction_timeout" in str(info.value)
    assert query(admin, "SELECT COUNT(*) FROM knobs_idle WHERE n = 5") == [(0,)]   # rolled back
    other = connect(proxy)
    assert query(other, "SELECT 1") == [(1,)]
    time.sleep(1.6)                                               # idle outside a transaction: closed
    with pytest.raises(pymysql.err.MySQLError) as info:
        query(other, "SELECT 1")
    assert "idle_client_timeout" in str(info.value)
    admin.close()


def _server_connections(mariadb) -> int:
    return int(mariadb.sql(f"SELECT COUNT(*) FROM information_schema.processlist WHERE user = '{BACKEND_USER}'"))


def test_cluster_cap_across_databases(mariadb, proxy_factory):
    mariadb.sql("CREATE DATABASE IF NOT EXISTS knobs2; CREATE DATABASE IF NOT EXISTS knobs3; "
                f"GRANT ALL ON knobs2.* TO '{BACKEND_USER}'@'%'; GRANT ALL ON knobs3.* TO '{BACKEND_USER}'@'%';")
    proxy = start(proxy_factory, mariadb, max_size=3, pool={"max_cluster_connections": 4})
    databases = ["mpdb", "knobs2", "knobs3"]
    highest = [0]
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            highest[0] = max(highest[0], _server_connections(mariadb))
            time.sleep(0.05)
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()

    def work(i):
        conn = connect(proxy, database=databases[i % 3], autocommit=False)
        for _ in range(4):
            assert query(conn, "SELECT SLEEP(0.1), 1") == [(0, 1)]
            conn.commit()
        conn.close()
    try:
        failures = run_clients(9, work, timeout=50)
    finally:
        stop.set()
        watcher.join(5)
    assert failures == []
    assert 0 < highest[0] <= 4, highest[0]
    text = metrics_text(proxy)
    assert metric(text, "multiproxy_cluster_connections_max", cluster="main") == 4
    assert metric(text, "multiproxy_cluster_connections", cluster="main") <= 4


def test_cluster_cap_as_a_percentage(mariadb, proxy_factory):
    server_max = int(mariadb.sql("SELECT @@max_connections"))
    proxy = start(proxy_factory, mariadb, max_size=10, pool={"max_cluster_connections": "2%"})
    expected = max(1, int(server_max * 2 / 100))
    assert query(connect(proxy), "SELECT 1") == [(1,)]
    assert metric(metrics_text(proxy), "multiproxy_cluster_connections_max", cluster="main") == expected


def test_the_pin_log_line_names_the_client(mariadb, proxy_factory):
    proxy = start(proxy_factory, mariadb)
    conn = connect(proxy)
    query(conn, "CREATE TEMPORARY TABLE knobs_pinned (n INT)")
    assert query(conn, "SELECT COUNT(*) FROM knobs_pinned") == [(0,)]
    conn.close()
    deadline = time.monotonic() + 5
    while "pinned to its backend" not in proxy.log_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    line = next(line for line in proxy.log_text().splitlines() if "pinned to its backend" in line)
    for part in ("client 127.0.0.1:", "user 'app'", "listener my", "temp_table", "CREATE TEMPORARY TABLE knobs_pinned"):
        assert part in line, (part, line)
