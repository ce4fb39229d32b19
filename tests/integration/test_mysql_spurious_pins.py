"""No spurious pins (issue 13, MySQL/MariaDB): session settings are tracked and replayed, expressions read back,
resets and undoing statements unpin, a statement that never reached a backend changes nothing, idle transactions
hold no backend, and reset_after_transaction stops indirect state from leaking. Real MariaDB, real PyMySQL and
MariaDB Connector/Python, more clients than backends, pin gauges and borrow timeouts checked."""
from __future__ import annotations

import time

import mariadb as mariadb_connector
import pymysql
import pytest

from .helpers import run_clients
from .mysqlkit import (APP_PASSWORD, APP_USER, DB, PINNED, connect, direct, metric, metrics_text, mysql_config, query,
                       start_proxy, users_toml, wait_for)

BORROW_TIMEOUTS = "multiproxy_database_connection_borrow_timeouts_total"
DETECTED = "multiproxy_pin_reasons_detected_total"


def pinned(proxy) -> float:
    return metric(metrics_text(proxy), PINNED)


def one(conn, sql: str):
    return query(conn, sql)[0][0]


@pytest.fixture(scope="module")
def table(mariadb):
    conn = direct(mariadb)
    query(conn, "CREATE TABLE IF NOT EXISTS spurious (id int primary key, v int)")
    query(conn, "DELETE FROM spurious")
    conn.close()
    return "spurious"


# -- item 2: settings are replayed, not pinned ---------------------------------------------------------------

@pytest.mark.timeout(180)
def test_session_settings_follow_each_client_across_backends(mariadb, proxy_factory):
    proxy = start_proxy(proxy_factory, mariadb, max_size=2, borrow_timeout=10.0)

    def client(i: int) -> None:
        conn = connect(proxy)
        try:
            # several per statement, any variable, NAMES, the isolation level, and expressions
            query(conn, f"SET SESSION wait_timeout = {100 + i}, @@session.net_read_timeout = {200 + i}, "
                        "max_join_size = 1000000")
            query(conn, "SET NAMES latin1")
            query(conn, "SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")
            query(conn, "SET sql_mode = concat(@@sql_mode, ',NO_UNSIGNED_SUBTRACTION')")
            query(conn, f"SET time_zone = concat('+0', {i % 9}, ':00')")
            for _ in range(5):
                row = query(conn, "SELECT @@wait_timeout, @@net_read_timeout, @@character_set_client, "
                                  "@@tx_isolation, @@sql_mode, @@time_zone, @@max_join_size")[0]
                assert row[0] == 100 + i and row[1] == 200 + i and row[2] == "latin1", row
                assert row[3] == "READ-COMMITTED" and "NO_UNSIGNED_SUBTRACTION" in row[4], row
                assert row[5] == f"+0{i % 9}:00" and row[6] == 1000000, row
        finally:
            conn.close()
    failures = run_clients(12, client, 60.0)
    assert failures == [], failures + [proxy.log_tail()]
    text = metrics_text(proxy)
    assert metric(text, DETECTED) == 0 and metric(text, BORROW_TIMEOUTS) == 0
    assert metric(text, "multiproxy_database_connections") <= 2


@pytest.mark.timeout(60)
def test_global_sets_are_forwarded_untracked_and_user_variables_still_pin(mariadb, proxy_factory):
    proxy = start_proxy(proxy_factory, mariadb, max_size=2)
    conn = connect(proxy)
    try:
        before = one(conn, "SELECT @@GLOBAL.max_connect_errors")
        query(conn, f"SET GLOBAL max_connect_errors = {before + 1}")
        assert one(direct(mariadb), "SELECT @@GLOBAL.max_connect_errors") == before + 1
        query(conn, f"SET GLOBAL max_connect_errors = {before}")
        assert pinned(proxy) == 0
        query(conn, "SET @mine = 5")
        assert one(conn, "SELECT @mine") == 5
        assert metric(metrics_text(proxy), PINNED, reason="user_variable") == 1
    finally:
        conn.close()
    assert wait_for(lambda: pinned(proxy) == 0)


# -- item 1: resets and undoing statements unpin ----------------------------------------------------------------

@pytest.mark.timeout(60)
@pytest.mark.parametrize("pin, undo, reason", [
    ("LOCK TABLES spurious READ", "UNLOCK TABLES", "table_lock"),
    ("SELECT GET_LOCK('spurious_a', 5)", "SELECT RELEASE_LOCK('spurious_a')", "advisory_lock"),
    ("SELECT GET_LOCK('spurious_b', 5), GET_LOCK('spurious_c', 5)", "SELECT RELEASE_ALL_LOCKS()", "advisory_lock"),
    ("CREATE TEMPORARY TABLE spurious_tmp (a int)", "DROP TEMPORARY TABLE spurious_tmp", "temp_table"),
    ("PREPARE spurious_st FROM 'SELECT 1'", "DEALLOCATE PREPARE spurious_st", "sql_prepare"),
])
def test_undoing_what_pinned_unpins(mariadb, proxy_factory, table, pin, undo, reason):
    proxy = start_proxy(proxy_factory, mariadb, max_size=1, borrow_timeout=3.0)
    conn = connect(proxy)
    other = connect(proxy)
    try:
        query(conn, pin)
        assert metric(metrics_text(proxy), PINNED, reason=reason) == 1
        query(conn, undo)
        assert pinned(proxy) == 0
        # the one backend serves another client now
        assert one(other, "SELECT 41 + 1") == 42
    finally:
        conn.close()
        other.close()


@pytest.mark.timeout(60)
def test_reset_connection_and_change_user_unpin(mariadb, proxy_factory, table):
    proxy = start_proxy(proxy_factory, mariadb, max_size=1, borrow_timeout=3.0)
    conn = mariadb_connector.connect(host=proxy.host, port=proxy.port, user=APP_USER, password=APP_PASSWORD,
                                     database=DB, autocommit=True, connect_timeout=10)
    try:
        cur = conn.cursor()
        cur.execute("SET @x = 1")
        cur.execute("SET SESSION wait_timeout = 99")
        cur.execute("CREATE TEMPORARY TABLE reset_tmp (a int)")
        assert pinned(proxy) == 2
        conn.reset()                                    # COM_RESET_CONNECTION
        assert pinned(proxy) == 0
        cur = conn.cursor()
        cur.execute("SELECT @x, @@wait_timeout")
        assert cur.fetchone() == (None, 28800)
        cur.execute("SET @y = 2")
        assert pinned(proxy) == 1
        conn.change_user(APP_USER, APP_PASSWORD, DB)     # COM_CHANGE_USER to the same user
        assert pinned(proxy) == 0
        other = connect(proxy)
        assert one(other, "SELECT 8") == 8              # nothing holds the only backend
        other.close()
        cur = conn.cursor()
        cur.execute("SELECT @y, 7")                      # reading a user variable pins again
        assert cur.fetchone() == (None, 7)
    finally:
        conn.close()


# -- item 3: a statement that never reached a backend changes nothing -----------------------------------------

@pytest.mark.timeout(60)
def test_a_statement_that_timed_out_in_the_pool_pins_nothing(mariadb, proxy_factory, table):
    proxy = start_proxy(proxy_factory, mariadb, max_size=1, borrow_timeout=0.5)
    holder = connect(proxy, autocommit=False)
    waiter = connect(proxy)
    try:
        query(holder, "SELECT * FROM spurious")          # a transaction: the only backend stays with it
        for statement in ("LOCK TABLES spurious READ", "SET SESSION wait_timeout = 5", "SET @v = 1"):
            with pytest.raises(pymysql.err.OperationalError) as raised:
                query(waiter, statement)
            assert "no database connection became free" in str(raised.value)
        holder.commit()
        text = metrics_text(proxy)
        assert metric(text, PINNED) == 0 and metric(text, DETECTED) == 0 and metric(text, BORROW_TIMEOUTS) == 3
        assert one(waiter, "SELECT @@wait_timeout") == 28800
        assert one(holder, "SELECT 1") == 1             # the backend is free between the two clients' requests
        holder.commit()
    finally:
        holder.close()
        waiter.close()


# -- item 4: idle transactions hold no backend ---------------------------------------------------------------

@pytest.mark.timeout(180)
def test_forty_idle_transactions_on_four_backends(mariadb, proxy_factory, table):
    proxy = start_proxy(proxy_factory, mariadb, max_size=4, borrow_timeout=5.0)
    clients = []
    try:
        for i in range(40):
            conn = connect(proxy, autocommit=False)
            if i % 2:
                conn.begin()                            # an explicit BEGIN, answered by the proxy
            else:
                conn.commit()                           # autocommit off, nothing open
            clients.append(conn)
        # all 40 hold a transaction (or are about to) and no backend: the pool still serves everyone
        text = metrics_text(proxy)
        assert metric(text, "multiproxy_database_connections_currently_borrowed") == 0

        def work(i: int) -> None:
            conn = clients[i]
            query(conn, "INSERT INTO spurious VALUES (%s, %s)", (1000 + i, i))
            assert query(conn, "SELECT v FROM spurious WHERE id = %s", (1000 + i,)) == [(i,)]
            conn.commit()
            conn.begin()
        failures = run_clients(40, work, 60.0)
        assert failures == [], failures + [proxy.log_tail()]
        check = direct(mariadb)
        assert one(check, "SELECT COUNT(*) FROM spurious WHERE id BETWEEN 1000 AND 1039") == 40
        check.close()
        text = metrics_text(proxy)
        assert metric(text, BORROW_TIMEOUTS) == 0 and metric(text, PINNED) == 0
    finally:
        for conn in clients:
            conn.close()
        cleanup = direct(mariadb)
        query(cleanup, "DELETE FROM spurious WHERE id BETWEEN 1000 AND 1039")
        cleanup.close()


@pytest.mark.timeout(60)
def test_autocommit_off_client_is_idle_after_commit_and_rollback_undoes(mariadb, proxy_factory, table):
    proxy = start_proxy(proxy_factory, mariadb, max_size=1, borrow_timeout=3.0)
    idle = connect(proxy, autocommit=False)
    other = connect(proxy, autocommit=False)
    try:
        query(idle, "INSERT INTO spurious VALUES (2000, 1)")
        idle.rollback()
        query(idle, "INSERT INTO spurious VALUES (2001, 1)")
        idle.commit()
        # `idle` is in no transaction now: the only backend serves `other`, whose session is autocommit off too
        query(other, "INSERT INTO spurious VALUES (2002, 2)")
        assert one(other, "SELECT @@autocommit") == 0
        other.rollback()
        assert query(idle, "SELECT id FROM spurious WHERE id BETWEEN 2000 AND 2002 ORDER BY id") == [(2001,)]
        idle.commit()
        # an error from a BEGIN the proxy answered: START TRANSACTION READ ONLY then a write
        with idle.cursor() as cur:
            cur.execute("START TRANSACTION READ ONLY")
            with pytest.raises(pymysql.err.MySQLError) as refused:
                cur.execute("INSERT INTO spurious VALUES (2003, 3)")
            assert refused.value.args[0] == 1792
            cur.execute("ROLLBACK")
    finally:
        idle.close()
        other.close()
        cleanup = direct(mariadb)
        query(cleanup, "DELETE FROM spurious WHERE id BETWEEN 2000 AND 2003")
        cleanup.close()


# -- item 7: indirect state and reset_after_transaction -------------------------------------------------------

def _procedure(mariadb) -> None:
    conn = direct(mariadb)
    query(conn, "CREATE OR REPLACE PROCEDURE set_wait_timeout() SET SESSION wait_timeout = 77")
    conn.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("reset, leaked", [("no", True), ("yes", False)])
def test_state_set_by_a_procedure_leaks_only_without_reset_after_transaction(mariadb, proxy_factory, reset, leaked):
    _procedure(mariadb)
    config = mysql_config(mariadb, max_size=1)
    config["clusters"]["main"]["backend"]["reset_after_transaction"] = reset
    proxy = proxy_factory(config, files={"users.toml": users_toml()})
    first = connect(proxy)
    query(first, "CALL set_wait_timeout()")
    assert one(first, "SELECT @@wait_timeout") == (77 if leaked else 28800)
    first.close()
    second = connect(proxy)
    try:
        assert one(second, "SELECT @@wait_timeout") == (77 if leaked else 28800)
        assert one(second, "SELECT DATABASE()") == DB
        assert one(second, "SELECT @@character_set_client") == "utf8mb4"   # the login's, after the reset too
        assert pinned(proxy) == 0
    finally:
        second.close()


@pytest.mark.timeout(60)
def test_a_backend_left_with_a_short_wait_timeout_is_replaced_not_handed_out_dead(mariadb, proxy_factory):
    proxy = start_proxy(proxy_factory, mariadb, max_size=1, borrow_timeout=5.0)
    short = connect(proxy)
    other = connect(proxy)
    try:
        query(short, "SET SESSION wait_timeout = 1")
        assert one(short, "SELECT @@wait_timeout") == 1
        time.sleep(2.5)                                  # the server closes the idle backend meanwhile
        assert one(other, "SELECT @@wait_timeout") == 28800
        assert one(short, "SELECT @@wait_timeout") == 1
        assert pinned(proxy) == 0
    finally:
        short.close()
        other.close()
