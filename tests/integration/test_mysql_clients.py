"""Real MySQL clients through the proxy in transaction mode: mariadb CLI, sysbench, PyMySQL, mysql-connector-python,
MariaDB Connector/Python; client auth with both MySQL methods and backend logins with native and ed25519."""
from __future__ import annotations

import re
import shutil
import subprocess

import pymysql
import pytest

try:
    from .mysqlkit import (APP_PASSWORD, APP_USER, DB, connect, direct, metric, metrics_text, query,
                           start_proxy)
except ImportError:
    from mysqlkit import APP_PASSWORD, APP_USER, DB, connect, direct, metric, metrics_text, query, start_proxy


def mariadb_cli(proxy, sql: str, *extra: str) -> subprocess.CompletedProcess:
    argv = [shutil.which("mariadb") or "mariadb", "--no-defaults", "-h", proxy.host, "-P", str(proxy.port),
            "-u", APP_USER, f"-p{APP_PASSWORD}", "-N", "-B", "--ssl=0", *extra, DB]
    return subprocess.run(argv, input=sql, capture_output=True, text=True, timeout=60)


def test_mariadb_cli(mariadb, proxy_factory):
    proxy = start_proxy(proxy_factory, mariadb)
    out = mariadb_cli(proxy, "SELECT 1+1; CREATE TABLE IF NOT EXISTS cli_t (a int); INSERT INTO cli_t VALUES (7);\n"
                             "SELECT COUNT(*) FROM cli_t WHERE a = 7; USE mysql; SELECT DATABASE();\n"
                             "DELIMITER //\nSELECT 5; SELECT 6//\nDELIMITER ;\nSTATUS;\n")
    assert out.returncode == 0, out.stderr + proxy.log_tail()
    lines = out.stdout.splitlines()
    assert lines[:3] == ["2", "1", "mysql"]
    assert "5" in lines and "6" in lines          # a multi-statement query with two result sets


def test_mariadb_cli_wrong_password(mariadb, proxy_factory):
    proxy = start_proxy(proxy_factory, mariadb)
    argv = ["mariadb", "--no-defaults", "-h", proxy.host, "-P", str(proxy.port), "-u", APP_USER, "-pwrong",
            "--ssl=0", "-e", "SELECT 1"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert out.returncode != 0
    assert "1045" in out.stderr and "Access denied" in out.stderr


def _sysbench(proxy_or_server, *args: str, port=None, user=APP_USER, password=APP_PASSWORD, host="127.0.0.1"):
    argv = ["sysbench", *args, "--db-driver=mysql", f"--mysql-host={host}", f"--mysql-port={port}",
            f"--mysql-user={user}", f"--mysql-password={password}", f"--mysql-db={DB}", "--tables=1",
            "--table-size=1000", "--mysql-ssl=off"]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def sysbench_tables(mariadb):
    out = _sysbench(None, "oltp_read_write", "cleanup", port=mariadb.port, user="mp_native", password="native-pw")
    out = _sysbench(None, "oltp_read_write", "prepare", port=mariadb.port, user="mp_native", password="native-pw")
    assert out.returncode == 0, out.stderr
    return True


@pytest.mark.skipif(shutil.which("sysbench") is None, reason="sysbench is not installed")
@pytest.mark.parametrize("test", ["oltp_point_select", "oltp_read_write"])
@pytest.mark.parametrize("ps_mode", ["disable", "auto"])
def test_sysbench(mariadb, proxy_factory, sysbench_tables, test, ps_mode):
    proxy = start_proxy(proxy_factory, mariadb, max_size=5)
    out = _sysbench(proxy, test, "run", "--threads=4", "--time=3", f"--db-ps-mode={ps_mode}", port=proxy.port)
    assert out.returncode == 0, out.stdout + out.stderr + proxy.log_tail()
    transactions = int(re.search(r"transactions:\s+(\d+)", out.stdout).group(1))
    # "ignored errors" are deadlocks that sysbench retries (oltp_read_write on 1000 rows); anything else fails the run
    assert transactions > 50, out.stdout
    if ps_mode == "disable":
        # text protocol: nothing pins, so 4 clients never need more than the pool's 5 connections
        assert metric(metrics_text(proxy), "multiproxy_database_connections") <= 5


@pytest.mark.parametrize("autocommit", [True, False])
def test_pymysql(mariadb, proxy_factory, autocommit):
    proxy = start_proxy(proxy_factory, mariadb, max_size=2)
    setup = direct(mariadb)
    query(setup, "CREATE TABLE IF NOT EXISTS pym (id int primary key auto_increment, v varchar(20))")
    conn = connect(proxy, autocommit=autocommit)
    other = connect(proxy, autocommit=True)
    with conn.cursor() as cur:
        cur.execute("INSERT INTO pym (v) VALUES (%s)", (f"ac-{autocommit}",))
        new_id = cur.lastrowid
        assert new_id > 0
        if not autocommit:
            # the implicit transaction keeps its backend: the row is invisible to others until COMMIT
            assert query(other, "SELECT COUNT(*) FROM pym WHERE id = %s", (new_id,)) == [(0,)]
            conn.commit()
        assert query(other, "SELECT v FROM pym WHERE id = %s", (new_id,)) == [(f"ac-{autocommit}",)]
        cur.executemany("INSERT INTO pym (v) VALUES (%s)", [("a",), ("b",)])
        if not autocommit:
            conn.rollback()
        cur.execute("SELECT @@autocommit")
        assert cur.fetchone()[0] == (1 if autocommit else 0)
    conn.close()
    other.close()


def test_mysql_connector_pure_and_prepared(mariadb, proxy_factory):
    mysql_connector = pytest.importorskip("mysql.connector")
    proxy = start_proxy(proxy_factory, mariadb, max_size=3)
    conn = mysql_connector.connect(host=proxy.host, port=proxy.port, user=APP_USER, password=APP_PASSWORD,
                                   database=DB, use_pure=True, ssl_disabled=True, connection_timeout=10)
    cur = conn.cursor()
    cur.execute("CREATE TABLE IF NOT EXISTS conn_t (id int primary key, v varchar(10))")
    cur.execute("DELETE FROM conn_t")
    conn.commit()
    cur.execute("INSERT INTO conn_t VALUES (%s, %s)", (1, "one"))
    conn.commit()
    cur.execute("SELECT v FROM conn_t WHERE id = %s", (1,))
    assert cur.fetchall() == [("one",)]
    prepared = conn.cursor(prepared=True)
    prepared.execute("SELECT v, id + ? FROM conn_t WHERE id = ?", (10, 1))
    assert prepared.fetchall() == [("one", 11)]
    prepared.execute("INSERT INTO conn_t VALUES (?, ?)", (2, "two"))
    conn.commit()
    prepared.execute("SELECT COUNT(*) FROM conn_t WHERE id > ?", (0,))
    assert prepared.fetchall() == [(2,)]
    # binary prepared statements move between backends (statements.py): no pin; the cache counts the executes
    text = metrics_text(proxy)
    assert metric(text, "multiproxy_database_connections_currently_session_pinned") == 0, text
    assert metric(text, "multiproxy_prepared_statements_total", outcome="hit") >= 3, text
    prepared.close()
    conn.close()


def test_mariadb_connector_python(mariadb, proxy_factory):
    mariadb_module = pytest.importorskip("mariadb", reason="MariaDB Connector/Python did not install")
    proxy = start_proxy(proxy_factory, mariadb, max_size=3)
    conn = mariadb_module.connect(host=proxy.host, port=proxy.port, user=APP_USER, password=APP_PASSWORD,
                                  database=DB, connect_timeout=10)
    cur = conn.cursor()
    cur.execute("CREATE TABLE IF NOT EXISTS mdb_t (id int primary key, v varchar(10))")
    cur.execute("DELETE FROM mdb_t")
    cur.execute("INSERT INTO mdb_t VALUES (?, ?)", (1, "x"))
    conn.commit()
    cur.execute("SELECT v FROM mdb_t WHERE id = ?", (1,))
    assert cur.fetchall() == [("x",)]
    binary = conn.cursor(binary=True)
    binary.execute("SELECT v FROM mdb_t WHERE id = ?", (1,))
    assert binary.fetchall() == [("x",)]
    conn.close()


def test_caching_sha2_client_auth_fast_and_full(mariadb, proxy_factory):
    """caching_sha2_password toward clients: the fast path, and full authentication by RSA key exchange."""
    fast = start_proxy(proxy_factory, mariadb, auth="caching_sha2_password")
    conn = connect(fast)
    assert query(conn, "SELECT 42") == [(42,)]
    conn.close()
    with pytest.raises(pymysql.err.OperationalError) as denied:
        connect(fast, password="wrong")
    assert denied.value.args[0] == 1045
    full = start_proxy(proxy_factory, mariadb, auth="caching_sha2_password",
                       options={"caching_sha2_fast_auth": "false"})
    conn = connect(full)          # PyMySQL asks for the public key and sends the RSA-encrypted password
    assert query(conn, "SELECT 43") == [(43,)]
    conn.close()
    with pytest.raises(pymysql.err.OperationalError):
        connect(full, password="wrong")


def test_backend_login_with_ed25519(mariadb, proxy_factory):
    proxy = start_proxy(proxy_factory, mariadb, backend_user="mp_ed25519", backend_password="ed-pw")
    conn = connect(proxy)
    assert query(conn, "SELECT CURRENT_USER()")[0][0].startswith("mp_ed25519@")
    conn.close()


def test_backend_login_refused_is_a_clear_error(mariadb, proxy_factory):
    proxy = start_proxy(proxy_factory, mariadb, backend_password="not-the-password")
    with pytest.raises(pymysql.err.OperationalError) as refused:
        connect(proxy)
    # the server's own refusal of the backend login: its code and text (the proxy's log says which login failed)
    assert refused.value.args[0] == 1045 and "Access denied for user 'mp_native'" in refused.value.args[1]


def test_client_capabilities_get_separate_backends(mariadb, proxy_factory):
    """PyMySQL without CLIENT_DEPRECATE_EOF and mysql-connector with it never share a backend."""
    mysql_connector = pytest.importorskip("mysql.connector")
    proxy = start_proxy(proxy_factory, mariadb, max_size=1)
    a = connect(proxy)
    b = mysql_connector.connect(host=proxy.host, port=proxy.port, user=APP_USER, password=APP_PASSWORD,
                                database=DB, use_pure=True, ssl_disabled=True)
    for _ in range(3):
        assert query(a, "SELECT 'a', 1") == [("a", 1)]
        cur = b.cursor()
        cur.execute("SELECT 'b', 2")
        assert cur.fetchall() == [("b", 2)]
        cur.close()
    # two pools, one per capability variant, sharing one max_size: the connection of one made room for the other
    text = metrics_text(proxy)
    assert metric(text, "multiproxy_database_connections") == 1
    assert text.count("multiproxy_database_connections{") == 2
    a.close()
    b.close()
