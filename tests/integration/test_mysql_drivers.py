"""The MySQL driver matrix of issue 13: each driver's own habits (its pool, its settings at connect, its
rollback-on-return and session resets) with more clients than backends through a real MariaDB: rows right, zero
borrow timeouts, zero pins. test_mysql_clients.py covers each client alone; here they crowd a small pool.

What the drivers send at connect (seen in the server's general log through the proxy) and what the proxy does:
PyMySQL `SET NAMES utf8mb4`, `SET AUTOCOMMIT = 0` (tracked, replayed); SQLAlchemy adds `SELECT @@tx_isolation`,
`@@sql_mode` ... (plain reads) and ROLLBACK on return (answered by the proxy when no backend is linked);
mysql-connector `SET NAMES 'utf8mb4' COLLATE 'utf8mb4_general_ci'`, `SET @@session.autocommit = OFF` and, in
its pool, COM_RESET_CONNECTION on return (answered by the proxy); MariaDB Connector/Python `SET AUTOCOMMIT=0`
and, in its pool, COM_RESET_CONNECTION (it runs statements with parameters as binary prepared statements, which
the proxy moves between backends: statements.py, test_mysql_prepared.py); sysbench BEGIN ... COMMIT (BEGIN
answered by the proxy, sent with the first statement).
"""
from __future__ import annotations

import re
import shutil
import subprocess
import threading

import mariadb as mariadb_connector
import mysql.connector
import mysql.connector.pooling
import pytest
import sqlalchemy

from .helpers import run_clients
from .mysqlkit import APP_PASSWORD, APP_USER, DB, PINNED, direct, metric, metrics_text, query, start_proxy

BORROW_TIMEOUTS = "multiproxy_database_connection_borrow_timeouts_total"
DETECTED = "multiproxy_pin_reasons_detected_total"
MAX_SIZE = 3
CLIENTS = 12


def assert_no_pins_no_timeouts(proxy) -> None:
    text = metrics_text(proxy)
    assert metric(text, BORROW_TIMEOUTS) == 0, proxy.log_tail()
    assert metric(text, DETECTED) == 0 and metric(text, PINNED) == 0, text
    assert metric(text, "multiproxy_database_connections") <= MAX_SIZE


@pytest.fixture
def rows_table(mariadb, request):
    name = f"drv_{request.node.name.split('[')[0][5:][:20]}"
    conn = direct(mariadb)
    query(conn, f"CREATE OR REPLACE TABLE {name} (id int primary key, worker int, v int)")
    conn.close()
    yield name
    conn = direct(mariadb)
    query(conn, f"DROP TABLE IF EXISTS {name}")
    conn.close()


def count_rows(mariadb, table: str) -> list:
    conn = direct(mariadb)
    try:
        return query(conn, f"SELECT worker, COUNT(*), SUM(v) FROM {table} GROUP BY worker ORDER BY worker")
    finally:
        conn.close()


def expected_rows(per_worker: int) -> list:
    return [(w, per_worker, sum(range(per_worker))) for w in range(CLIENTS)]


@pytest.mark.timeout(180)
def test_sqlalchemy_pymysql_pool_larger_than_the_proxy(mariadb, proxy_factory, rows_table):
    proxy = start_proxy(proxy_factory, mariadb, max_size=MAX_SIZE, borrow_timeout=5.0)
    engine = sqlalchemy.create_engine(
        f"mysql+pymysql://{APP_USER}:{APP_PASSWORD}@{proxy.host}:{proxy.port}/{DB}",
        pool_size=CLIENTS, max_overflow=0, pool_pre_ping=True)     # 12 connections, rolled back on return
    try:
        def work(w: int) -> None:
            for i in range(10):
                with engine.begin() as conn:
                    conn.execute(sqlalchemy.text(f"INSERT INTO {rows_table} VALUES (:id, :w, :v)"),
                                 {"id": w * 100 + i, "w": w, "v": i})
                with engine.connect() as conn:     # a read; the pool rolls back on return
                    assert conn.execute(sqlalchemy.text(f"SELECT v FROM {rows_table} WHERE id = :id"),
                                        {"id": w * 100 + i}).scalar() == i
        failures = run_clients(CLIENTS, work, 90.0, together=False)
        assert failures == [], failures + [proxy.log_tail()]
        assert engine.pool.checkedin() == CLIENTS            # the driver's pool really held 12 connections
    finally:
        engine.dispose()
    assert count_rows(mariadb, rows_table) == expected_rows(10)
    assert_no_pins_no_timeouts(proxy)


@pytest.mark.timeout(180)
def test_mysql_connector_plain_and_pooled(mariadb, proxy_factory, rows_table):
    proxy = start_proxy(proxy_factory, mariadb, max_size=MAX_SIZE, borrow_timeout=5.0)
    settings = dict(host=proxy.host, port=proxy.port, user=APP_USER, password=APP_PASSWORD, database=DB,
                    use_pure=True, ssl_disabled=True, connection_timeout=10)
    pool = mysql.connector.pooling.MySQLConnectionPool(pool_name="drivers", pool_size=CLIENTS // 2, **settings)

    def work(w: int) -> None:
        for i in range(8):
            if w % 2:
                conn = pool.get_connection()        # its return resets the session (COM_RESET_CONNECTION)
            else:
                conn = mysql.connector.connect(**settings)
            try:
                cur = conn.cursor()
                cur.execute(f"INSERT INTO {rows_table} VALUES (%s, %s, %s)", (w * 100 + i, w, i))
                conn.commit()
                cur.execute(f"SELECT v FROM {rows_table} WHERE id = %s", (w * 100 + i,))
                assert cur.fetchall() == [(i,)]
                conn.rollback()
                cur.close()
            finally:
                conn.close()
    failures = run_clients(CLIENTS, work, 90.0, together=False)
    assert failures == [], failures + [proxy.log_tail()]
    assert count_rows(mariadb, rows_table) == expected_rows(8)
    assert_no_pins_no_timeouts(proxy)


@pytest.mark.timeout(180)
def test_mariadb_connector_plain_and_its_connection_pool(mariadb, proxy_factory, rows_table):
    proxy = start_proxy(proxy_factory, mariadb, max_size=MAX_SIZE, borrow_timeout=5.0)
    settings = dict(host=proxy.host, port=proxy.port, user=APP_USER, password=APP_PASSWORD, database=DB,
                    connect_timeout=10)
    pool = mariadb_connector.ConnectionPool(pool_name="drivers", pool_size=CLIENTS // 2, **settings)
    lock = threading.Lock()

    def work(w: int) -> None:
        for i in range(8):
            if w % 2:
                with lock:                          # the pool hands out one connection per call, not thread-safe
                    conn = pool.get_connection()
            else:
                conn = mariadb_connector.connect(**settings)
            try:
                cur = conn.cursor()
                # with parameters the connector uses binary prepared statements (moved between backends, no pin)
                cur.execute(f"INSERT INTO {rows_table} VALUES (?, ?, ?)", (w * 100 + i, w, i))
                conn.commit()
                cur.execute(f"SELECT v FROM {rows_table} WHERE id = ?", (w * 100 + i,))
                assert cur.fetchall() == [(i,)]
                cur.close()
            finally:
                if w % 2:
                    with lock:
                        conn.close()                # back to the pool, reset with COM_RESET_CONNECTION
                else:
                    conn.close()
    failures = run_clients(CLIENTS, work, 90.0, together=False)
    pool.close()
    assert failures == [], failures + [proxy.log_tail()]
    assert count_rows(mariadb, rows_table) == expected_rows(8)
    assert_no_pins_no_timeouts(proxy)


@pytest.mark.timeout(180)
@pytest.mark.skipif(shutil.which("sysbench") is None, reason="sysbench is not installed")
def test_sysbench_read_write_text_protocol_on_a_small_pool(mariadb, proxy_factory):
    common = ["--db-driver=mysql", f"--mysql-db={DB}", "--tables=1", "--table-size=1000", "--mysql-ssl=off"]
    prepare = ["sysbench", "oltp_read_write", "prepare", "--mysql-host=127.0.0.1", f"--mysql-port={mariadb.port}",
               "--mysql-user=mp_native", "--mysql-password=native-pw", *common]
    subprocess.run(["sysbench", "oltp_read_write", "cleanup", *prepare[3:]], capture_output=True, timeout=60)
    assert subprocess.run(prepare, capture_output=True, text=True, timeout=120).returncode == 0
    proxy = start_proxy(proxy_factory, mariadb, max_size=MAX_SIZE, borrow_timeout=5.0)
    run = ["sysbench", "oltp_read_write", "run", f"--threads={CLIENTS}", "--time=5", "--db-ps-mode=disable",
           f"--mysql-host={proxy.host}", f"--mysql-port={proxy.port}", f"--mysql-user={APP_USER}",
           f"--mysql-password={APP_PASSWORD}", *common]
    out = subprocess.run(run, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr + proxy.log_tail()
    transactions = int(re.search(r"transactions:\s+(\d+)", out.stdout).group(1))
    assert transactions > 50, out.stdout
    assert_no_pins_no_timeouts(proxy)
