"""Online restart (multiproxy run --takeover): a new process takes the listeners and the idle clients over from a
running one, which drains and exits. Real servers, real clients: the clients' connections (same local port) and
their session state (settings, prepared statements, cancel keys) survive, with zero failures under load."""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
import time

import pg8000.native
import psycopg
import pytest

from .pgserver import AUTH_DB
from .proxy import ProxyProcess, free_port

USER = "mp_trust"
CONNECT_TIMEOUT = 10


def wait_for(predicate, timeout: float = 20.0, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def with_takeover(config: dict, tmp_path, drain: float = 10.0) -> dict:
    config["proxy"]["takeover_socket"] = str(tmp_path / "takeover.sock")
    config["proxy"]["takeover_drain_timeout"] = drain
    return config


def pg_config(pg, tmp_path, max_size: int = 4, drain: float = 10.0) -> dict:
    cluster = {"engine": "postgres", "hosts": [f"127.0.0.1:{pg.port}"], "backend": {"tls": "disable"},
               "pool": {"mode": "transaction", "max_size": max_size, "borrow_timeout": 30.0}}
    return with_takeover({
        "proxy": {"admin_listen": f"127.0.0.1:{free_port()}", "log_level": "info"},
        "clusters": {"main": cluster},
        "listeners": [{"name": "pg", "listen": f"127.0.0.1:{free_port()}", "cluster": "main", "role": "writer",
                       "auth": "trust"}],
    }, tmp_path, drain)


def take_over(old: ProxyProcess, tmp_path, name: str = "new") -> ProxyProcess:
    """Start `multiproxy run --takeover` with the old process's config; wait until it took the clients over and the
    old process exited 0."""
    new = ProxyProcess(old.config_text, workdir=str(tmp_path / name), files=old.files,
                       argv=[sys.executable, "-m", "multiproxy", "run", "--takeover", "-c"])
    new.start()
    assert wait_for(lambda: "took over" in new.log_text() or not new.running, 60), new.log_tail()
    assert new.running, new.log_tail()
    assert wait_for(lambda: not old.running, 60), old.log_tail()
    assert old.stop() == 0, old.log_tail()
    return new


def took_over(new: ProxyProcess) -> tuple[int, int]:
    """(listeners, clients) of the new process's 'took over' log line."""
    match = re.search(r"took over (\d+) listeners and (\d+) clients from pid (\d+)", new.log_text())
    assert match, new.log_tail()
    return int(match.group(1)), int(match.group(2))


def local_port(fd: int) -> int:
    dup = socket.socket(fileno=os.dup(fd))
    try:
        return dup.getsockname()[1]
    finally:
        dup.close()


# -- PostgreSQL ----------------------------------------------------------------------------------------

@pytest.mark.timeout(120)
def test_pg_idle_clients_keep_their_connections_and_session(pg, proxy_factory, tmp_path):
    old = proxy_factory(pg_config(pg, tmp_path))
    # psycopg: a setting, a named prepared statement (libpq PQprepare), the cancel key it holds
    conn = psycopg.connect(host=old.host, port=old.port, user=USER, dbname=AUTH_DB, autocommit=True,
                           connect_timeout=CONNECT_TIMEOUT)
    conn.execute("SET statement_timeout = '12345ms'")
    conn.execute("SET application_name = 'kept-app'")
    result = conn.pgconn.prepare(b"doubled", b"SELECT $1::int * 2")
    assert result.status == psycopg.pq.ExecStatus.COMMAND_OK
    port_before = local_port(conn.pgconn.socket)
    key_pid = conn.info.backend_pid
    # pg8000: extended protocol, its own setting
    conn2 = pg8000.native.Connection(USER, host=old.host, port=old.port, database=AUTH_DB, timeout=CONNECT_TIMEOUT)
    conn2.run("SET search_path TO pg_catalog, public")
    port2_before = conn2._usock.getsockname()[1]

    new = take_over(old, tmp_path)
    assert took_over(new) == (1, 2)

    assert local_port(conn.pgconn.socket) == port_before
    assert conn.execute("SHOW statement_timeout").fetchone()[0] == "12345ms"
    assert conn.execute("SHOW application_name").fetchone()[0] == "kept-app"
    res = conn.pgconn.exec_prepared(b"doubled", [b"21"])
    assert res.status == psycopg.pq.ExecStatus.TUPLES_OK and res.get_value(0, 0) == b"42"
    assert conn.info.backend_pid == key_pid
    assert conn2._usock.getsockname()[1] == port2_before
    assert conn2.run("SHOW search_path") == [["pg_catalog, public"]]
    assert conn2.run("SELECT 1 + 1") == [[2]]

    # The cancel key the client was given by the old process works with the new one.
    failure = []

    def sleep():
        try:
            conn.execute("SELECT pg_sleep(20)")
        except psycopg.errors.QueryCanceled as exc:
            failure.append(exc)
    thread = threading.Thread(target=sleep)
    started = time.monotonic()
    thread.start()
    time.sleep(0.5)
    conn.cancel()
    thread.join(15)
    assert failure and time.monotonic() - started < 10
    assert conn.execute("SELECT 7").fetchone()[0] == 7

    # New clients are served by the new process; the old one is gone.
    with psycopg.connect(host=new.host, port=new.port, user=USER, dbname=AUTH_DB, autocommit=True) as fresh:
        assert fresh.execute("SELECT 3").fetchone()[0] == 3
    conn.close()
    conn2.close()
    new.stop()


# -- MySQL / MariaDB ---------------------------------------------------------------------------------

def my_config(mariadb, tmp_path, max_size: int = 4, drain: float = 10.0) -> dict:
    from .mysqlkit import mysql_config
    return with_takeover(mysql_config(mariadb, max_size=max_size, borrow_timeout=30.0), tmp_path, drain)


@pytest.mark.timeout(120)
def test_mysql_idle_clients_keep_their_connections_and_session(mariadb, proxy_factory, tmp_path):
    import mysql.connector

    from .mysqlkit import APP_PASSWORD, APP_USER, DB, connect, users_toml
    old = proxy_factory(my_config(mariadb, tmp_path), files={"users.toml": users_toml()})
    conn = connect(old)
    cur = conn.cursor()
    cur.execute("SET SESSION sql_mode = 'ANSI_QUOTES'")
    cur.execute("SET @@session.div_precision_increment = 7")
    port_before = conn._sock.getsockname()[1]
    thread_id = conn.thread_id()
    # mysql-connector's prepared cursor: a server-side statement (COM_STMT_PREPARE), its id kept by the client
    conn2 = mysql.connector.connect(host=old.host, port=old.port, user=APP_USER, password=APP_PASSWORD,
                                    database=DB, autocommit=True, use_pure=True, ssl_disabled=True)
    prepared = conn2.cursor(prepared=True)
    prepared.execute("SELECT ? * 2", (21,))
    assert prepared.fetchall() == [(42,)]
    port2_before = conn2._socket.sock.getsockname()[1]

    new = take_over(old, tmp_path)
    assert took_over(new) == (1, 2)

    assert conn._sock.getsockname()[1] == port_before
    cur.execute("SELECT @@SESSION.sql_mode, @@SESSION.div_precision_increment")
    assert cur.fetchone() == ("ANSI_QUOTES", 7)
    assert conn.thread_id() == thread_id
    assert conn2._socket.sock.getsockname()[1] == port2_before
    prepared.execute("SELECT ? * 2", (50,))           # the same statement id, prepared again by the new process
    assert prepared.fetchall() == [(100,)]

    # KILL QUERY with the connection id the client was given by the old process, from a client of the new one.
    outcome = []

    def sleep():
        try:
            c = conn.cursor()
            c.execute("SELECT SLEEP(20)")
            outcome.append(c.fetchone())
        except Exception as exc:  # noqa: BLE001  an interrupted query may also answer with an error
            outcome.append(exc)
    thread = threading.Thread(target=sleep)
    started = time.monotonic()
    thread.start()
    time.sleep(0.5)
    killer = connect(new)
    killer.cursor().execute(f"KILL QUERY {thread_id}")
    thread.join(15)
    assert outcome and time.monotonic() - started < 10, outcome
    killer.close()
    cur.execute("SELECT 5")
    assert cur.fetchone() == (5,)
    conn.close()
    conn2.close()
    new.stop()


# -- TDS -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tds_lab(tmp_path_factory):
    from .tdskit import LabProcess
    server = LabProcess(tmp_path_factory.mktemp("tdslab-takeover"))
    yield server
    server.stop()


def tds_files() -> dict:
    from .test_tds_proxy import users_toml
    return {"users.toml": users_toml()}


def tds_setup(tds_lab, tmp_path, max_size: int = 4, drain: float = 10.0) -> dict:
    from .test_tds_proxy import tds_config
    return with_takeover(tds_config(tds_lab, max_size=max_size, borrow_timeout=30.0), tmp_path, drain)


@pytest.mark.timeout(120)
def test_tds_idle_clients_keep_their_connections_and_session(tds_lab, proxy_factory, tmp_path):
    from .test_tds_proxy import RawClient, ms, one
    old = proxy_factory(tds_setup(tds_lab, tmp_path), files=tds_files())
    raw = RawClient(old.port, packet_size=2048)
    raw.batch("SET DATEFIRST 3; SET TEXTSIZE 1000")
    port_before = raw.sock.getsockname()[1]
    conn = ms(old)
    conn.cursor().execute("SET DATEFIRST 5")
    assert one(conn, "SELECT @@DATEFIRST") == [(5,)]

    new = take_over(old, tmp_path)
    assert took_over(new) == (1, 2)

    assert raw.sock.getsockname()[1] == port_before
    assert raw.rows("SELECT @@DATEFIRST, @@TEXTSIZE") == [[3, 1000]]
    assert one(conn, "SELECT @@DATEFIRST") == [(5,)]
    assert one(conn, "SELECT 2 + 2") == [(4,)]
    raw.close()
    conn.close()
    new.stop()
