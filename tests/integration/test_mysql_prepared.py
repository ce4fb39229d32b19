"""Binary prepared statements multiplexed (issue 14): drivers that prepare server-side (mysql-connector
`cursor(prepared=True)`, MariaDB Connector/Python with parameters, sysbench --db-ps-mode=auto) with more clients
than backends through a real MariaDB: rows right, zero borrow timeouts, zero pins, the statement cache counted;
a changed table never yields wrong rows; a server-side cursor pins, with its reason, and works.

Each scenario of a statement missing on its backend runs twice: with MariaDB's pipelined re-prepare (statement id
0xFFFFFFFF) and with it switched off (`pipelined_reprepare = "false"`), which holds each such execute until its
re-prepare's id is known, as on MySQL servers (there is no MySQL server here)."""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading

import mariadb as mariadb_connector
import mariadb.constants.CURSOR as MARIADB_CURSOR
import mysql.connector
import pytest
from multiproxy_engines.mysql import protocol as p

from .helpers import run_clients
from .proxy import REPO_ROOT
from .mysqlkit import APP_PASSWORD, APP_USER, DB, PINNED, direct, metric, metrics_text, query, start_proxy

BORROW_TIMEOUTS = "multiproxy_database_connection_borrow_timeouts_total"
DETECTED = "multiproxy_pin_reasons_detected_total"
STATEMENTS = "multiproxy_prepared_statements_total"
MAX_SIZE = 3
CLIENTS = 12


@pytest.fixture(params=["pipelined", "held"])
def reprepare(request) -> dict:
    """The cluster's engine options: MariaDB's pipelined re-prepare, or executes held for their re-prepare's id."""
    return {} if request.param == "pipelined" else {"pipelined_reprepare": "false"}


def assert_no_pins_no_timeouts(proxy) -> str:
    text = metrics_text(proxy)
    assert metric(text, BORROW_TIMEOUTS) == 0, proxy.log_tail()
    assert metric(text, DETECTED) == 0 and metric(text, PINNED) == 0, text
    assert metric(text, "multiproxy_database_connections") <= MAX_SIZE
    return text


@pytest.fixture
def table(mariadb, request):
    name = f"ps_{request.node.name.split('[')[0][5:][:24]}"
    conn = direct(mariadb)
    query(conn, f"CREATE OR REPLACE TABLE {name} (id int primary key, worker int, v int, note varchar(40), "
                f"data mediumblob)")
    conn.close()
    yield name
    conn = direct(mariadb)
    query(conn, f"DROP TABLE IF EXISTS {name}")
    conn.close()


def rows_of(mariadb, sql: str) -> list:
    conn = direct(mariadb)
    try:
        return query(conn, sql)
    finally:
        conn.close()


def connector_settings(proxy, **extra) -> dict:
    return dict(host=proxy.host, port=proxy.port, user=APP_USER, password=APP_PASSWORD, database=DB,
                ssl_disabled=True, connection_timeout=10, **extra)


BLOB = bytes(range(256)) * 40          # 10 KB


def connector_clients(settings: dict, table: str, use_pure: bool, clients: int) -> list:
    """`clients` mysql-connector connections at once, each inserting and reading back 6 rows through a prepared
    cursor (NULLs, 10 KB blobs; the pure-Python connection sends one by COM_STMT_SEND_LONG_DATA); the failures."""
    def work(w: int) -> None:
        conn = mysql.connector.connect(**settings, use_pure=use_pure)
        assert type(conn).__name__ == ("MySQLConnection" if use_pure else "CMySQLConnection"), type(conn)
        try:
            cur = conn.cursor(prepared=True)
            for i in range(6):
                note = None if i % 2 else f"w{w} i{i}"
                data = io.BytesIO(BLOB) if use_pure and i == 3 else BLOB[i:]      # pure: send_long_data
                cur.execute(f"INSERT INTO {table} (id, worker, v, note, data) VALUES (?, ?, ?, ?, ?)",
                            (w * 100 + i, w, i, note, data))
                conn.commit()
                cur.execute(f"SELECT v, note, data FROM {table} WHERE id = ?", (w * 100 + i,))
                got = cur.fetchall()
                assert len(got) == 1, f"{len(got)} rows"
                v, got_note, got_data = got[0]
                assert v == i and got_note == note, (v, got_note)
                want = BLOB if use_pure and i == 3 else BLOB[i:]
                same = bytes(got_data) == want         # no diff of 10 KB values in the report
                assert same, f"data of {len(got_data)} bytes differs from the {len(want)} sent"
            cur.close()
        finally:
            conn.close()
    return [str(failure) for failure in run_clients(clients, work, 120.0)]


def connector_clients_in_cext_process(settings: dict, table: str, clients: int) -> list:
    """connector_clients with mysql-connector's C extension (CMySQLConnection, libmysqlclient's prepared statement
    API), in a process of its own: the wheel's extension needs the OpenSSL it ships in mysql/vendor (newer than
    Debian 12's), which only a process started with LD_LIBRARY_PATH pointing there loads; this one has the
    system's libssl loaded already."""
    vendor = os.path.join(os.path.dirname(mysql.connector.__path__[0]), "vendor")
    assert os.path.isdir(vendor), f"mysql-connector-python ships no {vendor}"
    env = dict(os.environ, LD_LIBRARY_PATH=os.pathsep.join(p for p in (vendor, os.environ.get("LD_LIBRARY_PATH"))
                                                           if p))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, os.environ.get("PYTHONPATH")) if p)
    code = ("import json, sys, mysql.connector\n"
            "assert mysql.connector.HAVE_CEXT, 'the C extension does not load'\n"
            "from tests.integration.test_mysql_prepared import connector_clients\n"
            "print(json.dumps(connector_clients(*json.loads(sys.argv[1]))))\n")
    done = subprocess.run([sys.executable, "-c", code, json.dumps([settings, table, False, clients])], env=env,
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=150)
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.timeout(180)
@pytest.mark.parametrize("use_pure", [True, False], ids=["pure", "cext"])
def test_mysql_connector_prepared_cursors_share_a_small_pool(mariadb, proxy_factory, table, use_pure, reprepare):
    proxy = start_proxy(proxy_factory, mariadb, max_size=MAX_SIZE, borrow_timeout=5.0, options=reprepare)
    settings = connector_settings(proxy)
    if use_pure:
        failures = connector_clients(settings, table, True, CLIENTS)
    else:
        failures = connector_clients_in_cext_process(settings, table, CLIENTS)
    assert failures == [], failures + [proxy.log_tail()]
    assert rows_of(mariadb, f"SELECT worker, COUNT(*), SUM(v), COUNT(note) FROM {table} GROUP BY worker") == [
        (w, 6, 15, 3) for w in range(CLIENTS)]
    text = assert_no_pins_no_timeouts(proxy)
    assert metric(text, STATEMENTS, outcome="hit") > 0, text


@pytest.mark.timeout(180)
def test_many_distinct_statements_beyond_the_cache_are_evicted_and_stay_right(mariadb, proxy_factory, table,
                                                                              reprepare):
    proxy = start_proxy(proxy_factory, mariadb, max_size=MAX_SIZE, borrow_timeout=5.0, options=reprepare,
                        backend={"max_prepared_statements": 4})
    conn = direct(mariadb)
    query(conn, f"INSERT INTO {table} (id, worker, v) VALUES " + ", ".join(f"({i}, 0, {i * i})" for i in range(20)))
    conn.close()

    def work(w: int) -> None:
        conn = mysql.connector.connect(**connector_settings(proxy, use_pure=True))
        try:
            cursors = [conn.cursor(prepared=True) for _ in range(10)]      # 10 statements open at once
            for rounds in range(3):
                for k, cur in enumerate(cursors):
                    # distinct texts: k + 1 spaces
                    cur.execute(f"SELECT v {' ' * (k + 1)}FROM {table} WHERE id = ?", ((w + k + rounds) % 20,))
                    assert cur.fetchall() == [(((w + k + rounds) % 20) ** 2,)]
            for cur in cursors:
                cur.close()
        finally:
            conn.close()
    failures = run_clients(CLIENTS, work, 120.0)
    assert failures == [], failures + [proxy.log_tail()]
    text = assert_no_pins_no_timeouts(proxy)
    assert metric(text, STATEMENTS, outcome="eviction") > 0, text
    assert metric(text, STATEMENTS, outcome="miss") > 0, text


@pytest.mark.timeout(180)
def test_mariadb_connector_parameters_executemany_and_its_pool(mariadb, proxy_factory, table, reprepare):
    proxy = start_proxy(proxy_factory, mariadb, max_size=MAX_SIZE, borrow_timeout=5.0, options=reprepare)
    settings = dict(host=proxy.host, port=proxy.port, user=APP_USER, password=APP_PASSWORD, database=DB,
                    connect_timeout=10)
    pool = mariadb_connector.ConnectionPool(pool_name="prepared", pool_size=CLIENTS // 2, **settings)
    lock = threading.Lock()

    def work(w: int) -> None:
        for i in range(4):
            if w % 2:
                with lock:
                    conn = pool.get_connection()
            else:
                conn = mariadb_connector.connect(**settings)
            try:
                cur = conn.cursor()
                base = w * 100 + i * 10
                cur.executemany(f"INSERT INTO {table} (id, worker, v, note) VALUES (?, ?, ?, ?)",
                                [(base + k, w, k, None if k % 2 else f"n{k}") for k in range(3)])
                conn.commit()
                cur.execute(f"SELECT id, v, note FROM {table} WHERE worker = ? AND id >= ? AND id < ? ORDER BY id",
                            (w, base, base + 10))
                assert cur.fetchall() == [(base + k, k, None if k % 2 else f"n{k}") for k in range(3)]
                cur.close()
            finally:
                if w % 2:
                    with lock:
                        conn.close()
                else:
                    conn.close()
    failures = run_clients(CLIENTS, work, 120.0, together=False)
    pool.close()
    assert failures == [], failures + [proxy.log_tail()]
    assert rows_of(mariadb, f"SELECT worker, COUNT(*), SUM(v) FROM {table} GROUP BY worker") == [
        (w, 12, 12) for w in range(CLIENTS)]
    text = assert_no_pins_no_timeouts(proxy)
    assert metric(text, STATEMENTS, outcome="hit") + metric(text, STATEMENTS, outcome="miss") > 0, text


def sysbench(test: str, proxy, mariadb) -> None:
    common = ["--db-driver=mysql", f"--mysql-db={DB}", "--tables=1", "--table-size=1000", "--mysql-ssl=off"]
    prepare = ["sysbench", test, "prepare", "--mysql-host=127.0.0.1", f"--mysql-port={mariadb.port}",
               "--mysql-user=mp_native", "--mysql-password=native-pw", *common]
    subprocess.run(["sysbench", test, "cleanup", *prepare[3:]], capture_output=True, timeout=60)
    assert subprocess.run(prepare, capture_output=True, text=True, timeout=120).returncode == 0
    run = ["sysbench", test, "run", f"--threads={CLIENTS}", "--time=5", "--db-ps-mode=auto",
           f"--mysql-host={proxy.host}", f"--mysql-port={proxy.port}", f"--mysql-user={APP_USER}",
           f"--mysql-password={APP_PASSWORD}", *common]
    out = subprocess.run(run, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr + proxy.log_tail()
    assert int(re.search(r"transactions:\s+(\d+)", out.stdout).group(1)) > 50, out.stdout
    # Any error but the deadlocks and lock waits sysbench ignores by default (1213, 1205, 1020: oltp_read_write has
    # them directly too, more of them) ends the run with a failure; a read-only test has none at all.
    ignored = int(re.search(r"ignored errors:\s+(\d+)", out.stdout).group(1))
    assert ignored == 0 or test != "oltp_point_select", out.stdout
    assert int(re.search(r"reconnects:\s+(\d+)", out.stdout).group(1)) == 0, out.stdout


@pytest.mark.timeout(240)
@pytest.mark.skipif(shutil.which("sysbench") is None, reason="sysbench is not installed")
@pytest.mark.parametrize("test", ["oltp_point_select", "oltp_read_write"])
def test_sysbench_prepared_statements_on_a_small_pool(mariadb, proxy_factory, test, reprepare):
    proxy = start_proxy(proxy_factory, mariadb, max_size=MAX_SIZE, borrow_timeout=5.0, options=reprepare)
    sysbench(test, proxy, mariadb)
    text = assert_no_pins_no_timeouts(proxy)
    assert metric(text, STATEMENTS, outcome="hit") > 1000, text


@pytest.mark.timeout(120)
def test_a_changed_table_never_gives_wrong_rows(mariadb, proxy_factory, table, reprepare):
    # Every borrow resets its backend: each execute lands where the statement is missing and is prepared again.
    proxy = start_proxy(proxy_factory, mariadb, max_size=MAX_SIZE, borrow_timeout=5.0, options=reprepare,
                        backend={"reset_after_transaction": "yes"})
    conn = direct(mariadb)
    query(conn, f"INSERT INTO {table} (id, worker, v) VALUES (1, 1, 10)")
    client = mysql.connector.connect(**connector_settings(proxy, use_pure=True, autocommit=True))
    try:
        cur = client.cursor(prepared=True)
        statement = f"SELECT * FROM {table} WHERE id = ?"
        cur.execute(statement, (1,))
        assert cur.fetchall() == [(1, 1, 10, None, None)]
        query(conn, f"ALTER TABLE {table} ADD COLUMN extra int DEFAULT 5")
        # prepared again on its reset backend, the statement now has 6 columns where the client was told 5
        with pytest.raises(mysql.connector.Error) as refused:
            cur.execute(statement, (1,))
            cur.fetchall()
        assert refused.value.errno == 1615 and "prepare it again" in refused.value.msg, refused.value
        cur.close()
        again = client.cursor(prepared=True)
        again.execute(statement, (1,))
        assert again.fetchall() == [(1, 1, 10, None, None, 5)]
        again.close()
    finally:
        client.close()
        conn.close()
    text = metrics_text(proxy)
    assert metric(text, STATEMENTS, outcome="miss") >= 2, text
    assert metric(text, DETECTED) == 0, text


@pytest.mark.timeout(120)
def test_a_server_side_cursor_pins_with_its_reason_and_works(mariadb, proxy_factory, table):
    proxy = start_proxy(proxy_factory, mariadb, max_size=MAX_SIZE, borrow_timeout=5.0)
    conn = direct(mariadb)
    query(conn, f"INSERT INTO {table} (id, worker, v) VALUES " + ", ".join(f"({i}, 0, {i})" for i in range(50)))
    conn.close()
    client = mariadb_connector.connect(host=proxy.host, port=proxy.port, user=APP_USER, password=APP_PASSWORD,
                                       database=DB, connect_timeout=10)
    try:
        cur = client.cursor(cursor_type=MARIADB_CURSOR.READ_ONLY, prefetch_size=7)
        cur.execute(f"SELECT v FROM {table} WHERE worker = ? ORDER BY id", (0,))
        assert [row[0] for row in cur.fetchall()] == list(range(50))
        text = metrics_text(proxy)
        assert metric(text, DETECTED, reason="prepared_statement") == 1, text
        assert metric(text, PINNED) == 1, text
        cur.close()         # COM_STMT_CLOSE: the cursor is closed on its backend (COM_STMT_RESET) and the pin released
        plain = client.cursor()
        plain.execute(f"SELECT COUNT(*) FROM {table} WHERE worker = ?", (0,))
        assert plain.fetchall() == [(50,)]
        plain.close()
        assert metric(metrics_text(proxy), PINNED) == 0
    finally:
        client.close()


@pytest.mark.timeout(120)
def test_long_data_goes_with_a_re_prepare(mariadb, proxy_factory, table, reprepare):
    # Every borrow resets its backend: the held long data follows the re-prepare (pipelined, or held with the execute).
    proxy = start_proxy(proxy_factory, mariadb, max_size=MAX_SIZE, borrow_timeout=5.0, options=reprepare,
                        backend={"reset_after_transaction": "yes"})
    blob = bytes(range(251)) * 100          # 25 KB, sent by the driver with COM_STMT_SEND_LONG_DATA
    client = mysql.connector.connect(**connector_settings(proxy, use_pure=True, autocommit=True))
    try:
        cur = client.cursor(prepared=True)
        for i in range(3):
            cur.execute(f"INSERT INTO {table} (id, worker, v, data) VALUES (?, ?, ?, ?)", (i, 0, i, io.BytesIO(blob)))
        cur.execute(f"SELECT id, LENGTH(data), MD5(data) = MD5(?) FROM {table} ORDER BY id", (blob,))
        assert cur.fetchall() == [(i, len(blob), 1) for i in range(3)]
        cur.close()
    finally:
        client.close()
    text = metrics_text(proxy)
    assert metric(text, STATEMENTS, outcome="miss") >= 4 and metric(text, STATEMENTS, outcome="hit") == 0, text


# ------------------------------------------------------------------ a client pipelining statement commands

def read_packet(sock, timeout: float = 10.0) -> bytes:
    sock.settimeout(timeout)
    data = b""
    while len(data) < 4 or len(data) < 4 + int.from_bytes(data[:3], "little"):
        want = 4 - len(data) if len(data) < 4 else 4 + int.from_bytes(data[:3], "little") - len(data)
        chunk = sock.recv(want)
        assert chunk, "the proxy closed the connection"
        data += chunk
    return data[4:]


def read_result(sock) -> list:
    """One result set (EOF packets, no CLIENT_DEPRECATE_EOF): its rows' payloads; an ERR raises."""
    first = read_packet(sock)
    assert first[0] != 0xFF, p.parse_err(first)
    for _ in range(first[0]):
        read_packet(sock)                   # column definitions
    assert read_packet(sock)[0] == 0xFE
    rows = []
    for _ in range(1000):
        row = read_packet(sock)
        if row[0] == 0xFE and len(row) < 9:
            return rows
        rows.append(row)
    raise AssertionError("a result set of more than 1000 rows")


def raw_prepare(sock, sql: bytes) -> int:
    sock.sendall(p.packet(0, bytes((p.COM_STMT_PREPARE,)) + sql))
    ok = read_packet(sock)
    assert ok[0] == 0, p.parse_err(ok)
    columns, params = p.UINT16.unpack_from(ok, 5)[0], p.UINT16.unpack_from(ok, 7)[0]
    for _ in range(params + (params > 0) + columns + (columns > 0)):
        read_packet(sock)
    return p.UINT32.unpack_from(ok, 1)[0]


def raw_execute(statement_id: int, value: int) -> bytes:
    # one MYSQL_TYPE_LONGLONG parameter, bound with this execute
    return p.packet(0, bytes((p.COM_STMT_EXECUTE,)) + p.UINT32.pack(statement_id) + b"\x00" + p.UINT32.pack(1)
                    + b"\x00\x01\x08\x00" + value.to_bytes(8, "little"))


@pytest.mark.timeout(60)
def test_executes_pipelined_behind_missing_statements_answer_in_order(mariadb, proxy_factory, reprepare):
    # Every borrow resets its backend: each write below finds neither statement there. Held mode: the first execute
    # waits for its prepare, the query and the second statement's prepare follow, then that one's execute waits...
    proxy = start_proxy(proxy_factory, mariadb, max_size=MAX_SIZE, borrow_timeout=5.0, options=reprepare,
                        auth="trust", backend={"reset_after_transaction": "yes"})
    sock = socket.create_connection((proxy.host, proxy.port), timeout=10)
    try:
        read_packet(sock)                   # the greeting
        caps = (p.CLIENT_PROTOCOL_41 | p.CLIENT_SECURE_CONNECTION | p.CLIENT_PLUGIN_AUTH | p.CLIENT_CONNECT_WITH_DB
                | p.CLIENT_LONG_PASSWORD | p.CLIENT_TRANSACTIONS)
        sock.sendall(p.packet(1, p.handshake_response(caps, 45, APP_USER.encode(), b"", DB.encode(),
                                                      b"mysql_native_password", {})))
        assert read_packet(sock)[0] == p.OK_HEADER
        plus = raw_prepare(sock, b"SELECT CAST(? + 1 AS CHAR)")
        times = raw_prepare(sock, b"SELECT CAST(? * 10 AS CHAR)")
        for n in range(5):
            sock.sendall(raw_execute(plus, n) + p.packet(0, b"\x03SELECT 'mid'") + raw_execute(times, n)
                         + raw_execute(plus, 40 + n))
            got = [read_result(sock) for _ in range(4)]
            # binary rows: 0x00, the NULL bitmap, a length-encoded string; the text row: a length-encoded string
            values = [rows[0][3:] if i != 1 else rows[0][1:] for i, rows in enumerate(got)]
            assert values == [str(n + 1).encode(), b"mid", str(n * 10).encode(), str(41 + n).encode()], got
    finally:
        sock.close()
    text = assert_no_pins_no_timeouts(proxy)
    # each write: both statements prepared again (the third execute may wait for the first one's prepare: a hit)
    misses, hits = metric(text, STATEMENTS, outcome="miss"), metric(text, STATEMENTS, outcome="hit")
    assert misses >= 10 and misses + hits == 15, text
