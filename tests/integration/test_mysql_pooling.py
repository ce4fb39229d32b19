"""Transaction pooling of MySQL clients through the proxy: 200 clients over 5 backends, tracked settings replayed on
another backend, every pin reason detected and released with a reset, KILL QUERY routed to the serving backend."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import pymysql
import pytest

try:
    from .mysqlkit import PINNED, connect, direct, metric, metrics_text, query, start_proxy, wait_for
except ImportError:
    from mysqlkit import PINNED, connect, direct, metric, metrics_text, query, start_proxy, wait_for


@pytest.mark.timeout(120)
def test_200_clients_over_5_backends(mariadb, proxy_factory):
    setup = direct(mariadb)
    query(setup, "DROP TABLE IF EXISTS many_rows")
    query(setup, "CREATE TABLE many_rows (client int, n int, PRIMARY KEY (client, n))")
    query(setup, "DROP TABLE IF EXISTS many_totals")
    query(setup, "CREATE TABLE many_totals (client int PRIMARY KEY, total int)")
    proxy = start_proxy(proxy_factory, mariadb, max_size=5, borrow_timeout=60)
    clients, rounds = 200, 3
    errors: list = []
    barrier = threading.Barrier(clients)

    def work(i: int) -> None:
        try:
            conn = connect(proxy, autocommit=(i % 2 == 0))
            barrier.wait(60)
            for n in range(rounds):
                with conn.cursor() as cur:
                    if i % 2 == 0:
                        cur.execute("BEGIN")
                    cur.execute("INSERT INTO many_rows VALUES (%s, %s)", (i, n))
                    cur.execute("INSERT INTO many_totals VALUES (%s, %s) ON DUPLICATE KEY UPDATE total = total + %s",
                                (i, n, n))
                    cur.execute("SELECT COUNT(*) FROM many_rows WHERE client = %s", (i,))
                    assert cur.fetchone()[0] == n + 1      # sees its own uncommitted row: same backend in the transaction
                    conn.commit()
            conn.close()
        except Exception as exc:  # collected and reported below
            errors.append(f"client {i}: {exc!r}")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(100)
    assert not errors, errors[:5]
    assert query(setup, "SELECT COUNT(*), COUNT(DISTINCT client) FROM many_rows") == [(clients * rounds, clients)]
    assert query(setup, "SELECT SUM(total) FROM many_totals") == [(clients * sum(range(rounds)),)]
    text = metrics_text(proxy)
    assert metric(text, "multiproxy_database_connections") <= 5
    setup.close()


TRACKED_A = {
    "@@session.sql_mode": ("SET sql_mode = 'ANSI_QUOTES'", "ANSI_QUOTES"),
    "@@session.time_zone": ("SET time_zone = '+05:30'", "+05:30"),
    "@@session.character_set_client": ("SET NAMES latin1", "latin1"),
    "@@session.tx_isolation": ("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED", "READ-COMMITTED"),
    "@@session.tx_read_only": ("SET SESSION TRANSACTION READ ONLY", 1),
    "@@session.autocommit": ("SET autocommit = 0", 0),
    "DATABASE()": ("USE mysql", "mysql"),
}


def test_each_tracked_setting_is_replayed_after_moving_backends(mariadb, proxy_factory):
    """Pool size 1: two clients alternate on one backend connection; each keeps seeing its own settings."""
    proxy = start_proxy(proxy_factory, mariadb, max_size=1)
    a = connect(proxy)
    b = connect(proxy)
    defaults = {expr: query(b, f"SELECT {expr}")[0][0] for expr in TRACKED_A}
    backend_ids = set()
    for expr, (statement, value) in TRACKED_A.items():
        query(a, statement)
        for _ in range(2):
            got_a = query(a, f"SELECT {expr}, CONNECTION_ID()")[0]
            if expr == "@@session.autocommit":
                a.commit()
            got_b = query(b, f"SELECT {expr}, CONNECTION_ID()")[0]
            assert got_a[0] == value, (expr, got_a)
            assert got_b[0] == defaults[expr], (expr, got_b)
            backend_ids.update((got_a[1], got_b[1]))
    assert len(backend_ids) == 1          # one backend served both clients all along
    # everything together, still in effect for A
    row = query(a, "SELECT @@session.sql_mode, @@session.time_zone, DATABASE(), @@session.character_set_client")[0]
    assert row == ("ANSI_QUOTES", "+05:30", "mysql", "latin1")
    a.commit()
    assert metric(metrics_text(proxy), PINNED) == 0
    a.close()
    b.close()


@dataclass
class PinCase:
    reason: str
    statements: tuple
    check_reset: str = ""          # a query that shows the pinned session's state is gone after reset
    reset_value: object = None


PIN_CASES = [
    PinCase("user_variable", ("SET @mp_x = 42",), "SELECT @mp_x", None),
    PinCase("temp_table", ("CREATE TEMPORARY TABLE mp_tmp (a int)",),
            "SELECT COUNT(*) FROM information_schema.tables WHERE table_name = 'mp_tmp'", 0),
    PinCase("advisory_lock", ("SELECT GET_LOCK('mp_lock', 1)",), "SELECT IS_FREE_LOCK('mp_lock')", 1),
    PinCase("table_lock", ("CREATE TABLE IF NOT EXISTS mp_locked (a int)", "LOCK TABLES mp_locked READ")),
    PinCase("sql_prepare", ("PREPARE mp_stmt FROM 'SELECT 1'",)),
    PinCase("found_rows", ("SELECT SQL_CALC_FOUND_ROWS 1", "SELECT FOUND_ROWS()")),
    # plain settings are tracked and replayed (test_mysql_spurious_pins.py); these cannot move to another backend
    PinCase("session_variable", ("SET SESSION insert_id = 5",)),
    PinCase("session_variable", ("SET SESSION timestamp = 1000",), "SELECT @@session.timestamp > 1000", 1),
    PinCase("handler", ("CREATE TABLE IF NOT EXISTS mp_handler (a int)", "HANDLER mp_handler OPEN")),
    PinCase("xa", ("XA START 'mp_xa'",)),
]


@pytest.mark.parametrize("case", PIN_CASES, ids=lambda c: f"{c.reason}-{c.statements[-1][:20]}")
def test_pin_reason_detected_and_released_with_reset(mariadb, proxy_factory, case):
    proxy = start_proxy(proxy_factory, mariadb, max_size=2)
    client = connect(proxy)
    for statement in case.statements:
        query(client, statement)
    text = metrics_text(proxy)
    assert metric(text, PINNED, reason=case.reason) == 1, text
    pinned_id = query(client, "SELECT CONNECTION_ID()")[0][0]
    other = connect(proxy)
    for _ in range(3):            # the others run on the remaining backend, never on the pinned one
        assert query(other, "SELECT CONNECTION_ID()")[0][0] != pinned_id
    if case.reason == "xa":
        query(client, "XA END 'mp_xa'")
        query(client, "XA ROLLBACK 'mp_xa'")
    client.close()
    assert wait_for(lambda: metric(metrics_text(proxy), PINNED) == 0)
    # reset with COM_RESET_CONNECTION and back in the pool: whoever gets it sees a clean session
    ids = set()
    for _ in range(4):
        conn = connect(proxy)
        ids.add(query(conn, "SELECT CONNECTION_ID()")[0][0])
        if case.check_reset:
            assert query(conn, case.check_reset)[0][0] == case.reset_value
        conn.close()
    assert metric(metrics_text(proxy), "multiproxy_database_connections") <= 2
    other.close()


def test_com_reset_connection_unpins(mariadb, proxy_factory):
    proxy = start_proxy(proxy_factory, mariadb, max_size=2)
    conn = connect(proxy)
    query(conn, "SET @mp_v = 1")
    assert metric(metrics_text(proxy), PINNED, reason="user_variable") == 1
    conn.ping()
    # PyMySQL has no reset call; mysql-connector's reset_session sends COM_RESET_CONNECTION
    mysql_connector = pytest.importorskip("mysql.connector")
    from tests.integration.mysqlkit import APP_PASSWORD, APP_USER, DB
    c = mysql_connector.connect(host=proxy.host, port=proxy.port, user=APP_USER, password=APP_PASSWORD, database=DB,
                                use_pure=True, ssl_disabled=True)
    cur = c.cursor()
    cur.execute("SET @mp_w = 5")
    cur.fetchall()
    assert metric(metrics_text(proxy), PINNED, reason="user_variable") == 2
    c.cmd_reset_connection()
    assert wait_for(lambda: metric(metrics_text(proxy), PINNED, reason="user_variable") == 1)
    cur = c.cursor()
    cur.execute("SELECT @mp_w")
    assert cur.fetchall() == [(None,)]
    c.close()
    conn.close()


def test_kill_query_reaches_the_serving_backend(mariadb, proxy_factory):
    proxy = start_proxy(proxy_factory, mariadb, max_size=3)
    victim = connect(proxy)
    bystander = connect(proxy)
    result: dict = {}

    def sleep():
        started = time.monotonic()
        try:
            result["rows"] = query(victim, "SELECT SLEEP(30)")
        except pymysql.err.OperationalError as exc:
            result["error"] = exc.args[0]
        result["seconds"] = time.monotonic() - started

    thread = threading.Thread(target=sleep)
    thread.start()
    time.sleep(1.0)
    killer = connect(proxy)
    query(killer, f"KILL QUERY {victim.thread_id()}")
    thread.join(20)
    assert result.get("seconds", 99) < 10, result
    assert result.get("rows") == [(1,)] or result.get("error") == 1317, result   # SLEEP interrupted
    assert query(victim, "SELECT 7") == [(7,)]      # the victim's connection lives on
    assert query(bystander, "SELECT 8") == [(8,)]
    # COM_PROCESS_KILL and KILL of an unknown id: answered OK, nothing else touched
    killer.kill(999999)
    query(killer, "KILL 12345")
    assert query(bystander, "SELECT 9") == [(9,)]
    for conn in (victim, bystander, killer):
        conn.close()


def test_last_insert_id_survives_moving_backends(mariadb, proxy_factory):
    setup = direct(mariadb)
    query(setup, "CREATE TABLE IF NOT EXISTS lid (id int primary key auto_increment, v int)")
    proxy = start_proxy(proxy_factory, mariadb, max_size=2)
    conn = connect(proxy)
    with conn.cursor() as cur:
        cur.execute("INSERT INTO lid (v) VALUES (1)")
        inserted = cur.lastrowid
    assert query(conn, "SELECT LAST_INSERT_ID()") == [(inserted,)]
    assert query(conn, "SELECT last_insert_id() AS id") == [(inserted,)]
    conn.close()
