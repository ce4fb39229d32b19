"""KILL from another connection through the proxy: KILL [CONNECTION] n and COM_PROCESS_KILL close the target client
(its statement cancelled, its backend discarded or reset), KILL QUERY n only cancels the running statement."""
from __future__ import annotations

import threading
import time

import pymysql
import pytest

try:
    from .mysqlkit import connect, direct, query, start_proxy, wait_for
except ImportError:
    from mysqlkit import connect, direct, query, start_proxy, wait_for

LOST = (2013, 2006)      # CR_SERVER_LOST, CR_SERVER_GONE_ERROR: what a client of a killed connection sees


def sleeping(conn, seconds: int = 30) -> tuple[threading.Thread, dict]:
    result: dict = {}

    def run():
        started = time.monotonic()
        try:
            result["rows"] = query(conn, f"SELECT SLEEP({seconds})")
        except pymysql.err.MySQLError as exc:
            result["error"] = exc.args[0]
        result["seconds"] = time.monotonic() - started

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, result


def sleeps_on_server(mariadb) -> int:
    admin = direct(mariadb)
    try:
        return len(query(admin, "SELECT id FROM information_schema.PROCESSLIST WHERE INFO LIKE 'SELECT SLEEP(%%'"))
    finally:
        admin.close()


@pytest.mark.parametrize("statement", ["KILL {}", "KILL CONNECTION {}", "COM_PROCESS_KILL"])
def test_kill_connection_closes_the_running_client(mariadb, proxy_factory, statement):
    proxy = start_proxy(proxy_factory, mariadb, max_size=3)
    victim, bystander, killer = connect(proxy), connect(proxy), connect(proxy)
    thread, result = sleeping(victim)
    assert wait_for(lambda: sleeps_on_server(mariadb) == 1, 10)
    if statement == "COM_PROCESS_KILL":
        killer.kill(victim.thread_id())
    else:
        query(killer, statement.format(victim.thread_id()))
    thread.join(20)
    assert result.get("seconds", 99) < 10, result
    assert result.get("error") in LOST, result
    with pytest.raises(pymysql.err.InterfaceError):      # the connection is closed (PyMySQL knows), not just the query
        query(victim, "SELECT 1")
    assert wait_for(lambda: sleeps_on_server(mariadb) == 0, 10), "the statement still runs on the backend"
    assert query(bystander, "SELECT 8") == [(8,)]
    assert query(killer, "SELECT 9") == [(9,)]
    for conn in (bystander, killer):
        conn.close()


def test_kill_connection_of_an_idle_client_in_a_transaction_rolls_it_back(mariadb, proxy_factory):
    setup = direct(mariadb)
    query(setup, "CREATE TABLE IF NOT EXISTS kill_t (id int primary key)")
    query(setup, "DELETE FROM kill_t")
    proxy = start_proxy(proxy_factory, mariadb, max_size=2)
    victim, idle_victim, killer = connect(proxy, autocommit=False), connect(proxy), connect(proxy)
    query(victim, "INSERT INTO kill_t VALUES (1)")           # an open transaction holding a backend
    assert query(idle_victim, "SELECT 1") == [(1,)]          # idle, holding no backend
    query(killer, f"KILL {victim.thread_id()}")
    query(killer, f"KILL CONNECTION {idle_victim.thread_id()}")
    for conn in (victim, idle_victim):
        with pytest.raises(pymysql.err.OperationalError) as info:
            query(conn, "SELECT 1")
        assert info.value.args[0] in LOST
    # the transaction was rolled back (its backend closed), and the pool serves others: max_size 2 is not exhausted
    assert wait_for(lambda: query(setup, "SELECT COUNT(*) FROM kill_t") == [(0,)], 10)
    others = [connect(proxy, autocommit=False) for _ in range(2)]
    for i, conn in enumerate(others):
        query(conn, f"INSERT INTO kill_t VALUES ({10 + i})")     # two transactions at once need both backends
    for conn in others:
        conn.commit()
        conn.close()
    assert query(setup, "SELECT COUNT(*) FROM kill_t") == [(2,)]
    killer.close()
    setup.close()


def test_kill_query_only_cancels(mariadb, proxy_factory):
    proxy = start_proxy(proxy_factory, mariadb, max_size=3)
    victim, killer = connect(proxy), connect(proxy)
    thread, result = sleeping(victim)
    assert wait_for(lambda: sleeps_on_server(mariadb) == 1, 10)
    query(killer, f"KILL QUERY {victim.thread_id()}")
    thread.join(20)
    assert result.get("seconds", 99) < 10, result
    assert result.get("rows") == [(1,)] or result.get("error") == 1317, result    # SLEEP interrupted
    assert query(victim, "SELECT 7") == [(7,)]          # the connection lives on
    idle = connect(proxy)
    query(killer, f"KILL QUERY {idle.thread_id()}")     # nothing running: nothing happens
    assert query(idle, "SELECT 6") == [(6,)]
    for conn in (victim, killer, idle):
        conn.close()
