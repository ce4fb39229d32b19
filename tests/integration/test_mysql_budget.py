"""MySQL logins never wait for a busy backend, and the capability variants of one (user, database) share one
max_size: counted on the private MariaDB's processlist while PyMySQL, mysql-connector, MariaDB Connector/Python and
the mariadb CLI (four capability sets) run together."""
from __future__ import annotations

import shutil
import socket
import subprocess
import json
import threading
import time
import urllib.request

import pymysql
import pytest

from multiproxy_engines.mysql import protocol as p

try:
    from .mysqlkit import APP_PASSWORD, APP_USER, DB, metric, metrics_text, mysql_config, query, users_toml, wait_for
except ImportError:
    from mysqlkit import APP_PASSWORD, APP_USER, DB, metric, metrics_text, mysql_config, query, users_toml, wait_for

pytestmark = pytest.mark.timeout(120)

BUDGET_USER, BUDGET_PASSWORD = "mp_budget", "budget-pw"
CONNECTIONS = "multiproxy_database_connections"
TIMEOUTS = "multiproxy_database_connection_borrow_timeouts_total"


@pytest.fixture(scope="module")
def budget_user(mariadb):
    """A backend user of its own, so that the processlist counts the proxy's connections and nothing else."""
    mariadb.sql(f"CREATE USER IF NOT EXISTS '{BUDGET_USER}'@'%' IDENTIFIED BY '{BUDGET_PASSWORD}';"
                f"GRANT ALL ON {DB}.* TO '{BUDGET_USER}'@'%';")
    return BUDGET_USER


def start(proxy_factory, mariadb, **kwargs):
    config = mysql_config(mariadb, backend_user=BUDGET_USER, backend_password=BUDGET_PASSWORD, **kwargs)
    return proxy_factory(config, files={"users.toml": users_toml()})


def server_threads(mariadb) -> list:
    """The proxy's connections as the server lists them: (id, command, state) each."""
    conn = pymysql.connect(host=mariadb.host, port=mariadb.port, user="root", password="", connect_timeout=10)
    try:
        return query(conn, "SELECT id, command, state FROM information_schema.processlist WHERE user = %s",
                     (BUDGET_USER,))
    finally:
        conn.close()


def server_connections(mariadb) -> int:
    return len(server_threads(mariadb))


def status(proxy) -> dict:
    host, port = proxy.admin_address
    with urllib.request.urlopen(f"http://{host}:{port}/status", timeout=5) as response:
        return json.loads(response.read())


def pymysql_client(proxy, **kwargs):
    return pymysql.connect(host=proxy.host, port=proxy.port, user=APP_USER, password=APP_PASSWORD, database=DB,
                           autocommit=True, connect_timeout=10, **kwargs)


def connector_client(proxy):
    mysql_connector = pytest.importorskip("mysql.connector")
    # autocommit is on in the login's status already: the connector sends no query while it connects.
    return mysql_connector.connect(host=proxy.host, port=proxy.port, user=APP_USER, password=APP_PASSWORD,
                                   database=DB, use_pure=True, ssl_disabled=True, connection_timeout=10)


def mariadb_client(proxy):
    mariadb_module = pytest.importorskip("mariadb", reason="MariaDB Connector/Python did not install")
    conn = mariadb_module.connect(host=proxy.host, port=proxy.port, user=APP_USER, password=APP_PASSWORD,
                                  database=DB, connect_timeout=10)
    conn.autocommit = True
    return conn


def run(conn, sql: str) -> list:
    cur = conn.cursor()
    try:
        cur.execute(sql)
        return list(cur.fetchall())
    finally:
        cur.close()


# ---------------------------------------------------------------------------------------------- logins never wait

def raw_login_with_pipelined_query(proxy, sql: str) -> socket.socket:
    """A client that sends its first query right behind its HandshakeResponse41 (trust listener), as drivers with
    pipelined connects do; returns the socket after the handshake response and the query are written."""
    sock = socket.create_connection((proxy.host, proxy.port), timeout=10)
    header = sock.recv(4)
    sock.recv(int.from_bytes(header[:3], "little"))       # the greeting
    caps = (p.CLIENT_PROTOCOL_41 | p.CLIENT_SECURE_CONNECTION | p.CLIENT_PLUGIN_AUTH | p.CLIENT_CONNECT_WITH_DB
            | p.CLIENT_LONG_PASSWORD | p.CLIENT_TRANSACTIONS)
    response = p.handshake_response(caps, 45, APP_USER.encode(), b"", DB.encode(), b"mysql_native_password", {})
    sock.sendall(p.packet(1, response) + p.packet(0, bytes((p.COM_QUERY,)) + sql.encode()))
    return sock


def read_packet(sock: socket.socket, timeout: float) -> tuple[int, bytes]:
    sock.settimeout(timeout)
    head = b""
    while len(head) < 4:
        chunk = sock.recv(4 - len(head))
        assert chunk, "the proxy closed the connection"
        head += chunk
    length, seq = int.from_bytes(head[:3], "little"), head[3]
    body = b""
    while len(body) < length:
        chunk = sock.recv(length - len(body))
        assert chunk, "the proxy closed the connection"
        body += chunk
    return seq, body


def test_a_login_with_a_pipelined_query_completes_while_every_backend_is_busy(mariadb, budget_user, proxy_factory):
    proxy = start(proxy_factory, mariadb, max_size=1, auth="trust", borrow_timeout=30.0)
    holder = pymysql_client(proxy)
    holder.begin()
    assert query(holder, "SELECT 1") == [(1,)]          # the only backend is in a transaction
    sock = raw_login_with_pipelined_query(proxy, "SELECT 'after the login'")
    try:
        started = time.monotonic()
        seq, ok = read_packet(sock, 0.5)                 # one driver's handshake read timeout
        assert (seq, ok[0]) == (2, p.OK_HEADER) and time.monotonic() - started < 0.5
        with pytest.raises(socket.timeout):
            read_packet(sock, 0.3)                      # the query waits for the backend, not the login
        holder.commit()
        seq, columns = read_packet(sock, 10)
        assert (seq, columns) == (1, b"\x01")            # the query's result set: one column
    finally:
        sock.close()
        holder.close()
    text = metrics_text(proxy)
    assert metric(text, TIMEOUTS) == 0 and metric(text, CONNECTIONS) == 1


def test_pymysql_connects_within_its_read_timeout_while_every_backend_is_busy(mariadb, budget_user, proxy_factory):
    # PyMySQL's connect() sends SET NAMES and SET AUTOCOMMIT = 0 after the login: the proxy takes both (tracked,
    # replayed later) instead of making connect() wait for a backend.
    proxy = start(proxy_factory, mariadb, max_size=1, borrow_timeout=30.0)
    holder = pymysql_client(proxy)
    holder.begin()
    assert query(holder, "SELECT 1") == [(1,)]          # the only backend is in a transaction
    started = time.monotonic()
    late = pymysql.connect(host=proxy.host, port=proxy.port, user=APP_USER, password=APP_PASSWORD, database=DB,
                           charset="utf8mb4", autocommit=False, connect_timeout=10, read_timeout=0.5)
    assert time.monotonic() - started < 0.5
    late._read_timeout = 10                              # the connect was the point; the query may wait
    results: list = []
    worker = threading.Thread(target=lambda: results.append(query(late, "SELECT @@autocommit, @@character_set_client")))
    worker.start()
    time.sleep(0.3)
    assert not results                                   # its first statement waits for the backend
    holder.commit()
    worker.join(10)
    assert results == [[(0, "utf8mb4")]]                 # what connect() set reached the backend
    late.close()
    holder.close()
    assert metric(metrics_text(proxy), TIMEOUTS) == 0


def test_a_waiting_variant_gets_the_room_of_another_variants_idle_connection(mariadb, budget_user, proxy_factory):
    proxy = start(proxy_factory, mariadb, max_size=1, borrow_timeout=30.0)
    holder = pymysql_client(proxy)
    holder.begin()
    assert query(holder, "SELECT 1") == [(1,)]          # the whole budget, held by PyMySQL's variant
    results: list = []

    def other_variant():
        conn = connector_client(proxy)                   # its connect sends SET autocommit: that waits
        results.append(run(conn, "SELECT 'connector'"))
        conn.close()

    waiting = threading.Thread(target=other_variant)
    waiting.start()
    assert wait_for(lambda: any(entry["waiting"] for entry in status(proxy)["pools"]))
    assert server_connections(mariadb) == 1
    holder.commit()                                      # its idle connection makes room for the other variant
    waiting.join(10)
    assert results == [[("connector",)]]
    assert server_connections(mariadb) == 1
    text = metrics_text(proxy)
    assert metric(text, TIMEOUTS) == 0 and metric(text, "multiproxy_database_connections_budget_evictions_total") == 1
    holder.close()


# ---------------------------------------------------------------------------------------------- one budget

def cli_loop(proxy, rounds: int) -> subprocess.CompletedProcess:
    sql = "".join(f"SELECT SLEEP(0.01), {n};\n" for n in range(rounds))
    argv = [shutil.which("mariadb") or "mariadb", "--no-defaults", "-h", proxy.host, "-P", str(proxy.port),
            "-u", APP_USER, f"-p{APP_PASSWORD}", "-N", "-B", DB]
    return subprocess.run(argv, input=sql, capture_output=True, text=True, timeout=90)


def test_capability_variants_never_open_more_than_max_size_together(mariadb, budget_user, proxy_factory):
    max_size = 3
    proxy = start(proxy_factory, mariadb, max_size=max_size, borrow_timeout=60.0)
    makers = [pymysql_client, connector_client, mariadb_client]
    clients = [make(proxy) for make in makers for _ in range(3)]
    errors: list = []
    peak_rows: list = []                # the most server threads of the proxy's backend user seen at once
    done = threading.Event()

    def work(conn):
        try:
            for n in range(15):
                assert run(conn, f"SELECT SLEEP(0.01), {n}")[0][1] == n
        except Exception as exc:  # reported below with the others
            errors.append(repr(exc))

    def watch():
        while not done.is_set():
            rows = server_threads(mariadb)
            if len(rows) > len(peak_rows):
                peak_rows[:] = rows
            time.sleep(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    threads = [threading.Thread(target=work, args=(conn,)) for conn in clients]
    for thread in threads:
        thread.start()
    cli = [threading.Thread(target=lambda: errors.extend(
        [out.stderr] if (out := cli_loop(proxy, 15)).returncode else [])) for _ in range(2)]
    for thread in cli:
        thread.start()
    for thread in threads + cli:
        thread.join(90)
    done.set()
    watcher.join(10)
    assert not errors, errors[:3]
    assert 1 <= len(peak_rows) <= max_size and len(server_threads(mariadb)) <= max_size, peak_rows
    pools = [entry for entry in status(proxy)["pools"] if entry["budget"] == f"main/writer/{APP_USER}/{DB}"]
    names = [entry["pool"] for entry in pools]
    assert len(pools) >= 3 and len(set(names)) == len(names), names      # one name per capability variant
    assert all(name.startswith(f"main/writer/{APP_USER}/{DB}[") for name in names), names
    assert all(entry["budget_size"] <= max_size and entry["max_size"] == max_size for entry in pools)
    text = metrics_text(proxy)
    assert metric(text, TIMEOUTS) == 0 and metric(text, CONNECTIONS) <= max_size
    variants = {line.split('variant="')[1].split('"')[0] for line in text.splitlines()
                if line.startswith(CONNECTIONS + "{")}
    assert len(variants) == len(pools), variants
    for conn in clients:
        conn.close()
