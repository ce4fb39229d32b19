"""[proxy] relay = "compiled" against a real MariaDB: PyMySQL clients (more of them than backends) and sysbench served by
the relay lanes, and what the engine's screen sends back to the Python path (LAST_INSERT_ID after relayed INSERTs,
transactions, settings, pins, KILL QUERY of a relayed statement, multi-statements, a malformed packet)."""
from __future__ import annotations

import shutil
import socket
import subprocess
import threading
import time
import uuid

import pymysql
import pytest
from pymysql.constants import CLIENT

from multiproxy_engines.mysql import protocol as p

try:
    from .mysqlkit import (BACKEND_USER, DB, PINNED, connect, direct, metric, metrics_text, mysql_config, query,
                           start_proxy, users_toml, wait_for)
    from .test_mysql_bad_input import CAPS, closed, raw_login, read_packet
    from .test_mysql_tls import pki, tls_mariadb  # noqa: F401 (fixtures)
except ImportError:
    from mysqlkit import (BACKEND_USER, DB, PINNED, connect, direct, metric, metrics_text, mysql_config, query,
                          start_proxy, users_toml, wait_for)
    from test_mysql_bad_input import CAPS, closed, raw_login, read_packet
    from test_mysql_tls import pki, tls_mariadb  # noqa: F401 (fixtures)


def compiled(proxy_factory, mariadb, max_size: int = 3, **kwargs):
    return start_proxy(proxy_factory, mariadb, max_size=max_size, proxy={"relay": "compiled"}, **kwargs)


def lane_metrics(proxy) -> dict:
    text = metrics_text(proxy)
    found = {name: metric(text, f"multiproxy_relay_lane_{name}") for name in
             ("clients", "backends", "transactions_total", "returns_total")}
    found["returns"] = {why: metric(text, "multiproxy_relay_lane_returns_total", why=why) for why in
                        ("stopped", "in_transaction", "malformed", "closed", "connection_lost", "pool_wanted",
                         "no_backend", "settings")}
    return found


def server_connections(mariadb) -> int:
    admin = direct(mariadb)
    try:
        # the proxy's backends log in as BACKEND_USER, as this admin connection does (not counted)
        return query(admin, "SELECT count(*) FROM information_schema.PROCESSLIST WHERE USER = %s AND ID <> "
                            "CONNECTION_ID()", (BACKEND_USER,))[0][0]
    finally:
        admin.close()


def run_clients(client, count: int) -> None:
    """client(0) ... client(count - 1) at once, each in a thread of its own; the first errors re-raised here."""
    errors = []

    def run(number: int) -> None:
        try:
            client(number)
        except Exception as exc:  # collected, re-raised in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(150)
    assert not errors, errors[:3]


@pytest.fixture
def table(mariadb):
    name = f"relay_{uuid.uuid4().hex[:8]}"
    admin = direct(mariadb)
    query(admin, f"CREATE TABLE {name} (id int primary key auto_increment, client int, n int)")
    admin.close()       # not counted with the proxy's backends meanwhile
    yield name
    admin = direct(mariadb)
    query(admin, f"DROP TABLE {name}")
    admin.close()


@pytest.mark.timeout(180)
def test_more_clients_than_backends_run_in_the_relay_with_rows_right(mariadb, proxy_factory, table):
    proxy = compiled(proxy_factory, mariadb, max_size=3)
    clients, rounds = 10, 40

    def client(number: int) -> None:
        conn = connect(proxy)
        try:
            for n in range(rounds):
                assert query(conn, f"SELECT {number}, {n}, REPEAT('x', {n * 50})") == [(number, n, "x" * n * 50)]
            with conn.cursor() as cur:      # an INSERT with autocommit: relayed, its id kept (Relay.insert_id)
                cur.execute(f"INSERT INTO {table} (client, n) VALUES ({number}, 1)")
                inserted = cur.lastrowid
            assert query(conn, "SELECT LAST_INSERT_ID()") == [(inserted,)]
            assert query(conn, f"SELECT client FROM {table} WHERE id = {inserted}") == [(number,)]
            assert query(conn, f"SELECT count(*) FROM {table} WHERE client = {number}") == [(1,)]
        finally:
            conn.close()

    run_clients(client, clients)
    lanes = lane_metrics(proxy)
    print("relay lanes:", lanes)
    assert lanes["transactions_total"] >= clients * rounds * 0.9, lanes      # nearly every SELECT with no Python
    assert lanes["returns"]["stopped"] >= clients, lanes       # SELECT LAST_INSERT_ID(), answered on the Python path
    assert lanes["returns"]["malformed"] == 0 and lanes["returns"]["connection_lost"] == 0, lanes
    assert server_connections(mariadb) <= 3
    assert not metric(metrics_text(proxy), PINNED)


@pytest.mark.timeout(120)
def test_a_transaction_runs_on_the_python_path_on_one_backend(mariadb, proxy_factory, table):
    proxy = compiled(proxy_factory, mariadb, max_size=2)
    conn, other = connect(proxy), connect(proxy)
    for n in range(5):
        assert query(conn, f"SELECT {n}") == [(n,)]
        assert query(other, f"SELECT {n}") == [(n,)]
    before = lane_metrics(proxy)["transactions_total"]
    query(conn, "BEGIN")
    query(conn, f"INSERT INTO {table} (client, n) VALUES (1, 1)")
    backend = query(conn, "SELECT CONNECTION_ID()")
    assert query(other, "SELECT 5") == [(5,)]                          # the other client is served meanwhile
    assert query(conn, f"SELECT count(*) FROM {table}") == [(1,)]
    assert query(other, f"SELECT count(*) FROM {table}") == [(0,)]     # not committed yet
    assert query(conn, "SELECT CONNECTION_ID()") == backend
    query(conn, "COMMIT")
    assert query(other, f"SELECT count(*) FROM {table}") == [(1,)]
    query(conn, "START TRANSACTION")
    query(conn, f"INSERT INTO {table} (client, n) VALUES (1, 2)")
    query(conn, "ROLLBACK")
    assert query(other, f"SELECT count(*) FROM {table}") == [(1,)]
    for n in range(5):                                                 # back in the relay
        assert query(conn, f"SELECT {n}") == [(n,)]
    assert lane_metrics(proxy)["transactions_total"] >= before + 5
    conn.close()
    other.close()


@pytest.mark.timeout(120)
def test_settings_are_replayed_and_a_user_variable_pins(mariadb, proxy_factory):
    proxy = compiled(proxy_factory, mariadb, max_size=2)
    conns = [connect(proxy) for _ in range(4)]
    modes = ["ANSI_QUOTES", "NO_ZERO_DATE", "ANSI_QUOTES", ""]
    for conn, mode in zip(conns, modes):
        query(conn, f"SET SESSION sql_mode = '{mode}'")
    for _ in range(10):
        for conn, mode in zip(conns, modes):
            # (not @@sql_mode: '@' stops in the relay's screen)
            assert query(conn, "SELECT VARIABLE_VALUE FROM information_schema.SESSION_VARIABLES "
                               "WHERE VARIABLE_NAME = 'SQL_MODE'") == [(mode,)]
    assert server_connections(mariadb) <= 2
    lanes = lane_metrics(proxy)
    # three keys share two backends: a backend holding other settings serves a client on the Python path, which
    # replays them; afterwards the backend serves that key's lane
    assert lanes["transactions_total"] >= 5, lanes
    # a user variable pins: the client keeps its backend (and leaves the relay)
    query(conns[0], "SET @relay_mark = 42")
    backend = query(conns[0], "SELECT CONNECTION_ID()")
    for _ in range(5):
        assert query(conns[0], "SELECT @relay_mark") == [(42,)]
        assert query(conns[0], "SELECT CONNECTION_ID()") == backend
    assert metric(metrics_text(proxy), PINNED) == 1
    conns[0].close()
    assert wait_for(lambda: not metric(metrics_text(proxy), PINNED))
    for conn in conns[1:]:
        assert query(conn, "SELECT @relay_mark") == [(None,)]
        conn.close()


@pytest.mark.timeout(120)
def test_kill_query_reaches_a_relayed_statement(mariadb, proxy_factory):
    proxy = compiled(proxy_factory, mariadb, max_size=2)
    victim, killer = connect(proxy), connect(proxy)
    assert query(victim, "SELECT 1") == [(1,)]
    assert wait_for(lambda: lane_metrics(proxy)["clients"] == 2)    # both wait in the lane, the SLEEP goes there
    before = lane_metrics(proxy)["transactions_total"]
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
    query(killer, f"KILL QUERY {victim.thread_id()}")
    thread.join(20)
    assert result.get("seconds", 99) < 10, result
    assert result.get("rows") == [(1,)] or result.get("error") == 1317, result   # SLEEP interrupted
    assert lane_metrics(proxy)["transactions_total"] >= before + 1      # the SLEEP ran in the relay
    assert query(victim, "SELECT 7") == [(7,)]
    victim.close()
    killer.close()


@pytest.mark.timeout(120)
def test_multi_statements_and_multi_results_end_in_the_relay(mariadb, proxy_factory):
    proxy = compiled(proxy_factory, mariadb, max_size=1)
    conn = connect(proxy, client_flag=CLIENT.MULTI_STATEMENTS)
    before = lane_metrics(proxy)["transactions_total"]
    for n in range(10):
        with conn.cursor() as cur:
            cur.execute(f"SELECT {n}; SELECT 'b', {n}; DO 1; SELECT NULL")
            assert cur.fetchall() == ((n,),)
            assert cur.nextset() and cur.fetchall() == (("b", n),)
            assert cur.nextset() and not cur.fetchall()
            assert cur.nextset() and cur.fetchall() == ((None,),)
            assert not cur.nextset()
        with pytest.raises(pymysql.err.ProgrammingError):      # an error ends the response
            query(conn, "SELECT 1; SELECT * FROM no_such_table; SELECT 3")
        assert query(conn, "SELECT 4") == [(4,)]
    assert lane_metrics(proxy)["transactions_total"] >= before + 25     # (the first may borrow on the Python path)
    conn.close()


@pytest.mark.timeout(120)
def test_a_malformed_packet_and_a_quit_leave_the_relay(mariadb, proxy_factory):
    proxy = compiled(proxy_factory, mariadb, max_size=2, auth="trust")
    bystander = connect(proxy)
    sock = raw_login(proxy)
    for n in range(3):
        sock.sendall(p.packet(0, b"\x03SELECT 1"))
        answer = [read_packet(sock)[1] for _ in range(5)]       # count, definition, EOF, row, EOF (no DEPRECATE_EOF)
        assert answer[0] == b"\x01" and answer[3] == b"\x011" and answer[4][:1] == b"\xfe", answer
        assert query(bystander, f"SELECT {n}") == [(n,)]
    assert lane_metrics(proxy)["transactions_total"] >= 3
    sock.sendall(p.packet(3, b"\x03SELECT 1"))      # out of sequence: the Python path answers it
    _, payload = read_packet(sock)
    code, _, message = p.parse_err(payload)
    assert code == p.ER_NET_PACKETS_OUT_OF_ORDER and "sequence id 0" in message
    assert closed(sock)
    assert lane_metrics(proxy)["returns"]["malformed"] >= 1
    sock = raw_login(proxy)
    sock.sendall(p.packet(0, b"\x01"))              # COM_QUIT: the connection ends
    assert closed(sock)
    assert query(bystander, "SELECT 'still here'") == [("still here",)]
    bystander.close()
    assert wait_for(lambda: server_connections(mariadb) <= 2)


@pytest.mark.timeout(120)
def test_a_malformed_packet_inside_a_relayed_transaction_rolls_it_back(mariadb, proxy_factory, table):
    """A client with autocommit off whose transaction runs in the relay (a read, then an UPDATE) sends a packet out
    of sequence: it goes to the Python path with the backend, gets ER_NET_PACKETS_OUT_OF_ORDER and is closed; the
    transaction is rolled back, and a client beside it is served on."""
    proxy = compiled(proxy_factory, mariadb, max_size=2, auth="trust")
    admin = direct(mariadb)
    query(admin, f"INSERT INTO {table} (id, client, n) VALUES (1, 1, 0)")
    admin.close()
    bystander = connect(proxy)
    sock = raw_login(proxy)
    sock.sendall(p.packet(0, b"\x03SET autocommit = 0"))
    assert read_packet(sock)[1][:1] == b"\x00"
    for _ in range(3):      # the first gets a backend on the Python path (autocommit replayed), which the lane keeps
        sock.sendall(p.packet(0, b"\x03SELECT count(*) FROM " + table.encode()))      # opens the transaction
        answer = [read_packet(sock)[1] for _ in range(5)]
        assert answer[3] == b"\x011", answer
        sock.sendall(p.packet(0, b"\x03COMMIT"))
        assert read_packet(sock)[1][:1] == b"\x00"
    assert wait_for(lambda: lane_metrics(proxy)["clients"] == 2), lane_metrics(proxy)
    before = lane_metrics(proxy)["transactions_total"]
    sock.sendall(p.packet(0, b"\x03SELECT count(*) FROM " + table.encode()))
    answer = [read_packet(sock)[1] for _ in range(5)]
    assert answer[3] == b"\x011", answer
    sock.sendall(p.packet(0, b"\x03UPDATE " + table.encode() + b" SET n = 5 WHERE id = 1"))
    assert read_packet(sock)[1][:1] == b"\x00"
    assert not lane_metrics(proxy)["returns"]["in_transaction"]     # all of it in the relay so far
    assert lane_metrics(proxy)["transactions_total"] == before      # (a transaction open: no boundary 'I' yet)
    sock.sendall(p.packet(3, b"\x03SELECT 1"))      # out of sequence, inside the transaction
    code, _, message = p.parse_err(read_packet(sock)[1])
    assert code == p.ER_NET_PACKETS_OUT_OF_ORDER and "sequence id 0" in message
    assert closed(sock)
    assert lane_metrics(proxy)["returns"]["in_transaction"] == 1, (lane_metrics(proxy), proxy.log_tail())
    assert query(bystander, f"SELECT n FROM {table} WHERE id = 1") == [(0,)]    # rolled back
    assert not metric(metrics_text(proxy), PINNED)
    bystander.close()
    assert wait_for(lambda: server_connections(mariadb) <= 2)


@pytest.mark.timeout(180)
@pytest.mark.skipif(shutil.which("sysbench") is None, reason="sysbench is not installed")
def test_sysbench_point_selects_run_in_the_relay(mariadb, proxy_factory):
    pool_size = 4
    proxy = compiled(proxy_factory, mariadb, max_size=pool_size, auth="trust")
    common = [f"--mysql-host={proxy.host}", f"--mysql-port={proxy.port}", "--mysql-user=app", "--mysql-password=",
              f"--mysql-db={DB}", "--tables=1", "--table-size=1000", "--db-ps-mode=disable"]
    direct_args = [f"--mysql-host={mariadb.host}", f"--mysql-port={mariadb.port}", f"--mysql-user={BACKEND_USER}",
                   "--mysql-password=native-pw", f"--mysql-db={DB}", "--tables=1", "--table-size=1000"]
    subprocess.run(["sysbench", "oltp_point_select", "cleanup", *direct_args], capture_output=True, timeout=60)
    prepared = subprocess.run(["sysbench", "oltp_point_select", "prepare", *direct_args], capture_output=True,
                              text=True, timeout=120)
    assert prepared.returncode == 0, prepared.stdout + prepared.stderr
    try:
        before = lane_metrics(proxy)["transactions_total"]
        run = subprocess.run(["sysbench", "oltp_point_select", "run", "--threads=12", "--time=4", *common],
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stdout + run.stderr + proxy.log_tail()
        out = run.stdout
        transactions = int(out.split("transactions:")[1].split()[0])
        errors = int(out.split("errors:")[1].split()[0])
        lanes = lane_metrics(proxy)
        print(f"sysbench: {transactions} transactions, {errors} errors; relay lanes: {lanes}")
        assert errors == 0 and transactions > 100, out
        assert lanes["transactions_total"] - before >= transactions * 0.95, (transactions, lanes)
        assert server_connections(mariadb) <= pool_size
        assert lanes["backends"] <= pool_size
        # sysbench's session set-up and point selects pin nothing (no statement that would pin was even seen)
        assert not metric(metrics_text(proxy), "multiproxy_pin_reasons_detected_total"), metrics_text(proxy)
    finally:
        subprocess.run(["sysbench", "oltp_point_select", "cleanup", *direct_args], capture_output=True, timeout=60)


@pytest.mark.timeout(120)
def test_backends_over_tls_stay_on_the_python_path(tls_mariadb, proxy_factory):
    # tls = "prefer" (the default) toward a server that offers TLS: the relay, which moves plaintext bytes, serves none
    config = mysql_config(tls_mariadb, max_size=2, proxy={"relay": "compiled"})
    config["clusters"]["main"]["backend"] = {"tls": "prefer", "connect_timeout": 5.0}
    proxy = proxy_factory(config, files={"users.toml": users_toml()})
    conns = [connect(proxy, ssl_disabled=True) for _ in range(4)]
    for n in range(10):
        for conn in conns:
            assert query(conn, f"SELECT {n}") == [(n,)]
    (_, cipher), = query(conns[0], "SHOW STATUS LIKE 'Ssl_cipher'")
    assert cipher
    lanes = lane_metrics(proxy)
    assert lanes["transactions_total"] == 0 and lanes["returns"]["connection_lost"] == 0, lanes
    for conn in conns:
        conn.close()


@pytest.mark.timeout(120)
def test_a_deprecate_eof_client_with_multi_results(mariadb, proxy_factory):
    # PyMySQL does not ask for CLIENT_DEPRECATE_EOF: a raw client does, with multi-statements; its pool (a variant of
    # its own) has backends that negotiated the same, and the lane's response walk ends rows at the OK with 0xFE
    proxy = compiled(proxy_factory, mariadb, max_size=1, auth="trust")
    caps = CAPS | p.CLIENT_DEPRECATE_EOF | p.CLIENT_MULTI_STATEMENTS | p.CLIENT_MULTI_RESULTS
    sock = socket.create_connection((proxy.host, proxy.port), timeout=10)
    read_packet(sock)
    sock.sendall(p.packet(1, p.handshake_response(caps, 45, b"app", b"", DB.encode(), b"mysql_native_password")))
    assert read_packet(sock)[1][0] == 0
    for n in range(20):
        sock.sendall(p.packet(0, b"\x03SELECT %d; SELECT 'x' FROM DUAL WHERE 1 = 0; DO 1" % n))
        answer = [read_packet(sock) for _ in range(7)]
        payloads = [payload for _, payload in answer]
        assert [seq for seq, _ in answer] == [1, 2, 3, 4, 5, 6, 7], answer     # the results continue the sequence
        assert payloads[0] == b"\x01" and payloads[2] == b"%c%d" % (len(str(n)), n), payloads
        assert payloads[3][0] == 0xFE and p.ok_status(payloads[3]) & 0x0008        # more results
        assert payloads[4] == b"\x01" and payloads[6][0] == 0xFE                  # an empty result
        assert p.ok_status(payloads[6]) & 0x0008
        seq, last = read_packet(sock)                                               # DO 1: OK, the end
        assert seq == 8 and last[0] == 0 and not p.ok_status(last) & 0x0008
    lanes = lane_metrics(proxy)
    assert lanes["transactions_total"] >= 19 and lanes["returns"]["malformed"] == 0, lanes
    sock.sendall(p.packet(0, b"\x01"))
    assert closed(sock)


@pytest.mark.timeout(120)
def test_one_update_statement_runs_in_the_relay(mariadb, proxy_factory, table):
    """UPDATE ... SET (one statement: its SET assigns columns) runs in the relay; an UPDATE followed by a session SET
    in the same COM_QUERY stops (multi-statements on), and the SET holds."""
    proxy = compiled(proxy_factory, mariadb, max_size=2)
    admin = direct(mariadb)
    query(admin, f"INSERT INTO {table} (id, client, n) VALUES (1, 1, 0)")
    admin.close()
    conn = connect(proxy, client_flag=CLIENT.MULTI_STATEMENTS)
    for n in range(3):
        assert query(conn, f"SELECT {n}") == [(n,)]
    before = lane_metrics(proxy)
    for _ in range(11):
        query(conn, f"UPDATE {table} SET n = n + 1 WHERE id = 1")
    after = lane_metrics(proxy)
    assert after["transactions_total"] - before["transactions_total"] == 11, after
    assert after["returns_total"] == before["returns_total"], after
    assert query(conn, f"SELECT n FROM {table} WHERE id = 1") == [(11,)]
    with conn.cursor() as cur:
        cur.execute(f"UPDATE {table} SET n = n + 1 WHERE id = 1; SET SESSION sql_mode = 'ANSI_QUOTES'")
        while cur.nextset():
            pass
    assert lane_metrics(proxy)["returns"]["stopped"] >= (before["returns"]["stopped"] or 0) + 1
    mode = "SELECT VARIABLE_VALUE FROM information_schema.SESSION_VARIABLES WHERE VARIABLE_NAME = 'SQL_MODE'"
    assert query(conn, mode) == [("ANSI_QUOTES",)]
    assert query(conn, f"SELECT n FROM {table} WHERE id = 1") == [(12,)]
    assert not metric(metrics_text(proxy), PINNED)
    conn.close()


@pytest.mark.timeout(120)
def test_an_autocommit_off_client_runs_its_transactions_in_a_lane_of_its_own(mariadb, proxy_factory, table):
    """PyMySQL's default (autocommit off): the first statement opens a transaction, which the relay serves on one
    backend to its COMMIT (a lane keyed by autocommit: the backends it lends have it off); an INSERT inside is relayed
    too, and SELECT LAST_INSERT_ID() after it (a stop) carries the transaction on on the Python path, answered with
    the id the relay kept. A client with autocommit on beside it, on the same two backends."""
    proxy = compiled(proxy_factory, mariadb, max_size=2)
    other = connect(proxy)
    conn = connect(proxy, autocommit=False)
    for n in range(5):
        assert query(conn, f"SELECT count(*) FROM {table}") == [(n,)]      # (a read of a table opens one)
        with conn.cursor() as cur:
            cur.execute(f"INSERT INTO {table} (client, n) VALUES (2, {n})")
            inserted = cur.lastrowid
        assert query(conn, "SELECT LAST_INSERT_ID()") == [(inserted,)]
        assert query(other, f"SELECT count(*) FROM {table}") == [(n,)]      # not committed yet
        conn.commit()
        assert query(other, f"SELECT count(*) FROM {table}") == [(n + 1,)]
    autocommit = ("SELECT VARIABLE_VALUE FROM information_schema.SESSION_VARIABLES "     # ('@' stops in the screen)
                  "WHERE VARIABLE_NAME = 'AUTOCOMMIT'")
    before = lane_metrics(proxy)["transactions_total"]
    for n in range(10):
        assert query(conn, f"SELECT count(*) FROM {table}") == [(5,)]
        backend = query(conn, "SELECT CONNECTION_ID()")
        assert query(conn, autocommit) == [("OFF",)]
        assert query(conn, "SELECT CONNECTION_ID()") == backend              # one backend to the COMMIT
        conn.commit()
        assert query(other, autocommit) == [("ON",)]
    lanes = lane_metrics(proxy)
    assert lanes["transactions_total"] - before >= 18, lanes     # (the other's 10 and nearly all of conn's 10)
    # the first LAST_INSERT_ID() came inside a transaction the relay served
    assert lanes["returns"]["in_transaction"] >= 1, lanes
    assert not metric(metrics_text(proxy), PINNED)
    conn.close()
    other.close()
    assert server_connections(mariadb) <= 2


@pytest.mark.timeout(120)
def test_a_client_sitting_out_the_lanes_keeps_its_sql_mode_to_itself(mariadb, proxy_factory):
    """A client with its own sql_mode whose transactions open with BEGIN sits out the lanes (its stays relay nothing)
    and takes backends from the pool and other lanes: two clients beside it on the same two backends keep theirs."""
    proxy = compiled(proxy_factory, mariadb, max_size=2)
    mode_of = ("SELECT VARIABLE_VALUE FROM information_schema.SESSION_VARIABLES "    # ('@' stops in the screen)
               "WHERE VARIABLE_NAME = 'SQL_MODE'")
    own, a, b = connect(proxy), connect(proxy), connect(proxy)
    try:
        default = query(a, mode_of)
        assert default != [("ANSI_QUOTES",)]
        query(own, "SET SESSION sql_mode = 'ANSI_QUOTES'")
        for _ in range(40):
            query(own, "BEGIN")
            assert query(own, mode_of) == [("ANSI_QUOTES",)]
            query(own, "COMMIT")
            for conn in (a, b):
                assert query(conn, mode_of) == default
        assert server_connections(mariadb) <= 2
        assert (metric(metrics_text(proxy), "multiproxy_relay_lane_short_stays_total") or 0) >= 1
    finally:
        for conn in (own, a, b):
            conn.close()


@pytest.mark.timeout(180)
def test_begin_is_answered_in_the_relay_and_an_idle_begin_holds_no_backend(mariadb, proxy_factory, table):
    """A lone BEGIN / START TRANSACTION is answered by the relay, which sends it ahead of the next command on the
    backend that serves the transaction to its COMMIT: transactions of reads run whole in the relay, six clients on
    two backends, an INSERT in autocommit after each, rows right. Clients idle after their BEGIN hold no backend
    meanwhile; a BEGIN followed at once by a stop (USE) goes to the Python path with its BEGIN unsent, which sends it
    there; a BEGIN, then a read or an INSERT: the transaction in the relay, rolled back."""
    proxy = compiled(proxy_factory, mariadb, max_size=2)
    idle = [connect(proxy) for _ in range(4)]
    for conn in idle:
        assert query(conn, "SELECT 1") == [(1,)]
        query(conn, "BEGIN")                        # answered: a transaction that holds no backend yet
        assert conn.server_status & p.SERVER_STATUS_IN_TRANS
    clients, transactions = 6, 30
    before = lane_metrics(proxy)["transactions_total"]

    def reads(number: int) -> None:
        conn = connect(proxy)
        for n in range(transactions):
            query(conn, "START TRANSACTION" if n % 2 else "BEGIN")
            backend = query(conn, "SELECT CONNECTION_ID()")
            assert query(conn, f"SELECT count(*) FROM {table} WHERE client = {number}") == [(n,)]
            assert query(conn, "SELECT CONNECTION_ID()") == backend      # one backend to the COMMIT
            query(conn, "COMMIT")
            query(conn, f"INSERT INTO {table} (client, n) VALUES ({number}, {n})")     # (in autocommit)
        conn.close()

    run_clients(reads, clients)
    lanes = lane_metrics(proxy)
    assert lanes["transactions_total"] - before >= clients * transactions * 0.8, lanes
    # USE right after BEGIN (a stop): the Python path sends the BEGIN with it and carries the transaction on; a read
    # or nothing before the INSERT: all of it in the relay
    writer, other = connect(proxy), connect(proxy)
    for first in ("USE", "SELECT", None):
        query(writer, "BEGIN")
        if first == "SELECT":
            query(writer, f"SELECT count(*) FROM {table}")
        elif first == "USE":
            query(writer, f"USE {DB}")
        query(writer, f"INSERT INTO {table} (client, n) VALUES (99, 0)")
        assert query(other, f"SELECT count(*) FROM {table} WHERE client = 99") == [(0,)]     # not committed yet
        query(writer, "ROLLBACK")
    assert query(other, f"SELECT count(*) FROM {table} WHERE client = 99") == [(0,)]
    for n, conn in enumerate(idle):                 # the idle transactions end: no backend was ever taken
        query(conn, "COMMIT" if n % 2 else "ROLLBACK")
        assert not conn.server_status & p.SERVER_STATUS_IN_TRANS
        assert query(conn, "SELECT 2") == [(2,)]
        conn.close()
    writer.close()
    other.close()
    admin = direct(mariadb)
    assert query(admin, f"SELECT count(*) FROM {table}") == [(clients * transactions,)]
    admin.close()
    assert not metric(metrics_text(proxy), PINNED)
    assert server_connections(mariadb) <= 2
