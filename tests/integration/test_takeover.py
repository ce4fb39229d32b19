"""Online restart (multiproxy run --takeover): a new process takes the listeners and the idle clients over from a
running one, which drains and exits. Real servers, real clients: the clients' connections (same local port) and
their session state (settings, prepared statements, cancel keys) survive, with zero failures under load."""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request

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


def cancel_works(conn) -> None:
    """pg_sleep cancelled with the cancel key the client holds (after a takeover: a key the old side issued; with
    workers, its worker may be another one than the listener's), and the connection serves again."""
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
    assert failure and time.monotonic() - started < 10, failure
    assert conn.execute("SELECT 7").fetchone()[0] == 7

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
    cancel_works(conn)

    # New clients are served by the new process; the old one is gone.
    with psycopg.connect(host=new.host, port=new.port, user=USER, dbname=AUTH_DB, autocommit=True) as fresh:
        assert fresh.execute("SELECT 3").fetchone()[0] == 3
    # The admin console of the new process shows the takeover among its events.
    with urllib.request.urlopen(f"http://{new.admin_address[0]}:{new.admin_address[1]}/admin/events",
                                timeout=5) as page:
        events = page.read().decode()
    assert "takeover" in events and "clients=2" in events, events
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
    # an sp_prepare handle the proxy gave the client (multiplexed: prepared again on the new process's backends)
    import pymssql
    cur = conn.cursor()
    handle = cur.callproc("[sys].[sp_prepare]", (pymssql.output(int), "@a int", "SELECT @a * 3"))[0]
    cur.callproc("sp_execute", (handle, 2))
    assert cur.fetchall() == [(6,)]

    new = take_over(old, tmp_path)
    assert took_over(new) == (1, 2)

    assert raw.sock.getsockname()[1] == port_before
    assert raw.rows("SELECT @@DATEFIRST, @@TEXTSIZE") == [[3, 1000]]
    assert one(conn, "SELECT @@DATEFIRST") == [(5,)]
    cur = conn.cursor()
    cur.callproc("sp_execute", (handle, 7))
    assert cur.fetchall() == [(21,)]
    assert one(conn, "SELECT 2 + 2") == [(4,)]
    raw.close()
    conn.close()
    new.stop()


# -- under load: zero failed transactions ----------------------------------------------------------------

def client_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["PGPASSFILE"] = os.devnull
    env["LC_ALL"] = "C"
    return env


PGBENCH_CLIENTS = 8
PGBENCH_TRANSACTIONS = 1500


@pytest.mark.timeout(240)
@pytest.mark.parametrize("mode", ["simple", "prepared"])
def test_pg_takeover_under_pgbench_load(pg, proxy_factory, tmp_path, mode):
    """pgbench -c 8 against a pool of 4 while a takeover happens: every client is handed over as it becomes idle
    between transactions; pgbench counts no failure and the rows add up."""
    old = proxy_factory(pg_config(pg, tmp_path, max_size=4, drain=30.0))
    base = ["-h", old.host, "-p", str(old.port), "-U", USER]
    init = subprocess.run(["pgbench", "-i", "-s", "1", "-q", *base, AUTH_DB], capture_output=True, text=True,
                          env=client_env(), timeout=120)
    assert init.returncode == 0, init.stderr
    bench = subprocess.Popen(["pgbench", "-n", "-M", mode, "-c", str(PGBENCH_CLIENTS), "-j", "2", "-t",
                              str(PGBENCH_TRANSACTIONS), *base, AUTH_DB], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=client_env())
    try:
        time.sleep(1.5)
        assert bench.poll() is None, bench.communicate()
        new = take_over(old, tmp_path)
        out, err = bench.communicate(timeout=180)
    finally:
        if bench.poll() is None:
            bench.kill()
    assert bench.returncode == 0, f"pgbench failed:\n{out}\n{err}"
    total = PGBENCH_CLIENTS * PGBENCH_TRANSACTIONS
    processed = re.search(r"number of transactions actually processed: (\d+)/(\d+)", out)
    assert processed and processed.groups() == (str(total), str(total)), out
    failed = re.search(r"number of failed transactions: (\d+)", out)
    assert failed is None or failed.group(1) == "0", out
    assert "error" not in err.lower(), err
    assert took_over(new) == (1, PGBENCH_CLIENTS)     # every pgbench client went to the new process
    assert pg.psql("SELECT count(*) FROM pgbench_history;", db=AUTH_DB) == str(total)
    sums = pg.psql("SELECT (SELECT sum(delta) FROM pgbench_history), (SELECT sum(abalance) FROM pgbench_accounts), "
                   "(SELECT sum(bbalance) FROM pgbench_branches), (SELECT sum(tbalance) FROM pgbench_tellers);",
                   db=AUTH_DB)
    history, accounts, branches, tellers = sums.split("|")
    assert history == accounts == branches == tellers
    new.stop()


def innodb_deadlocks(mariadb) -> int:
    return int(mariadb.sql("SHOW GLOBAL STATUS LIKE 'Innodb_deadlocks'").split()[1])


@pytest.mark.timeout(240)
@pytest.mark.parametrize("workload", ["oltp_point_select", "oltp_read_write"])
def test_mysql_takeover_under_sysbench_load(mariadb, proxy_factory, tmp_path, workload):
    """sysbench with server-side prepared statements, 8 threads over 4 backends, through a takeover: no error, no
    reconnect. (oltp_read_write's own deadlocks, which sysbench retries as 'ignored errors', are the server's: as many
    as InnoDB counted.)"""
    from .mysqlkit import APP_PASSWORD, APP_USER, DB, users_toml
    old = proxy_factory(my_config(mariadb, tmp_path, max_size=4, drain=30.0), files={"users.toml": users_toml()})
    common = [f"--mysql-user={APP_USER}", f"--mysql-password={APP_PASSWORD}", f"--mysql-db={DB}", "--tables=1",
              "--table-size=1000", "--mysql-ssl=off", "--db-driver=mysql", f"--mysql-host={old.host}"]
    at_old = [*common, f"--mysql-port={old.port}"]
    subprocess.run(["sysbench", workload, "cleanup", *at_old], capture_output=True, timeout=60)
    prepared = subprocess.run(["sysbench", workload, "prepare", *at_old], capture_output=True, text=True, timeout=120)
    assert prepared.returncode == 0, prepared.stdout + prepared.stderr
    deadlocks = innodb_deadlocks(mariadb)
    bench = subprocess.Popen(["sysbench", workload, "run", "--threads=8", "--time=12", "--db-ps-mode=auto", *at_old],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    new = None
    try:
        time.sleep(2.0)
        assert bench.poll() is None, bench.communicate()
        new = take_over(old, tmp_path)
        out, _ = bench.communicate(timeout=120)
    finally:
        if bench.poll() is None:
            bench.kill()
        if new is not None:
            subprocess.run(["sysbench", workload, "cleanup", *common, f"--mysql-port={new.port}"],
                           capture_output=True, timeout=60)
    assert bench.returncode == 0, out
    assert int(re.search(r"transactions:\s+(\d+)", out).group(1)) > 50, out
    assert int(re.search(r"reconnects:\s+(\d+)", out).group(1)) == 0, out
    ignored = int(re.search(r"ignored errors:\s+(\d+)", out).group(1))
    assert ignored == innodb_deadlocks(mariadb) - deadlocks, out
    if workload == "oltp_point_select":
        assert ignored == 0, out
    assert took_over(new) == (1, 8)
    new.stop()


TDS_CLIENTS = 6
TDS_ROUNDS = 300


@pytest.mark.timeout(240)
def test_tds_takeover_under_pymssql_load(tds_lab, proxy_factory, tmp_path):
    """pymssql clients looping INSERT and SELECT over a pool of 3 through a takeover: no failure, every row there."""
    from .test_tds_proxy import ms
    old = proxy_factory(tds_setup(tds_lab, tmp_path, max_size=3, drain=30.0), files=tds_files())
    table = f"takeover_{os.getpid()}"
    with ms(old) as setup:
        setup.cursor().execute(f"CREATE TABLE {table} (client INT, n INT)")
    failures: list = []
    progress = [0] * TDS_CLIENTS

    def work(i):
        conn = ms(old)
        try:
            for n in range(TDS_ROUNDS):
                cur = conn.cursor()
                cur.execute(f"INSERT INTO {table} VALUES (%d, %d)", (i, n))
                cur.execute(f"SELECT COUNT(*) FROM {table} WHERE client = %d", (i,))
                assert cur.fetchone()[0] == n + 1
                progress[i] = n + 1
                time.sleep(0.02)
        except Exception as exc:  # noqa: BLE001  every failure is reported
            failures.append(f"client {i}: {exc!r}")
        finally:
            conn.close()
    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(TDS_CLIENTS)]
    for thread in threads:
        thread.start()
    assert wait_for(lambda: min(progress) >= 10, 30), progress
    new = take_over(old, tmp_path)
    for thread in threads:
        thread.join(120)
    assert failures == []
    assert took_over(new) == (1, TDS_CLIENTS)
    with ms(new) as check:
        cur = check.cursor()
        cur.execute(f"SELECT COUNT(*) FROM {table}")
        assert cur.fetchone()[0] == TDS_CLIENTS * TDS_ROUNDS
        cur.execute(f"DROP TABLE {table}")
    new.stop()


# -- the drain: busy clients go once idle, or finish with the old process --------------------------------------

@pytest.mark.timeout(120)
def test_pg_client_in_a_transaction_goes_once_it_commits(pg, proxy_factory, tmp_path):
    old = proxy_factory(pg_config(pg, tmp_path, drain=20.0))
    table = f"drain_{os.getpid()}"
    conn = psycopg.connect(host=old.host, port=old.port, user=USER, dbname=AUTH_DB, connect_timeout=CONNECT_TIMEOUT)
    conn.execute(f"CREATE TABLE {table} (n int)")
    conn.commit()
    conn.execute(f"INSERT INTO {table} VALUES (1)")        # a transaction open (psycopg's implicit BEGIN)
    new = ProxyProcess(old.config_text, workdir=str(tmp_path / "new"),
                       argv=[sys.executable, "-m", "multiproxy", "run", "--takeover", "-c"]).start()
    assert wait_for(lambda: "handing this process over" in old.log_text(), 20), old.log_tail()
    time.sleep(1.0)
    assert old.running and "took over" not in new.log_text()     # the old process waits for it
    conn.commit()
    assert wait_for(lambda: "took over" in new.log_text(), 20), new.log_tail()
    assert took_over(new) == (1, 1)
    assert wait_for(lambda: not old.running, 20) and old.stop() == 0
    conn.execute(f"INSERT INTO {table} VALUES (2)")
    conn.commit()
    assert [row[0] for row in conn.execute(f"SELECT n FROM {table} ORDER BY n")] == [1, 2]
    conn.execute(f"DROP TABLE {table}")
    conn.commit()
    conn.close()
    new.stop()


@pytest.mark.timeout(120)
def test_pg_client_busy_past_the_drain_finishes_with_the_old_process(pg, proxy_factory, tmp_path):
    config = pg_config(pg, tmp_path, drain=1.0)
    config["proxy"]["shutdown_timeout"] = 20.0
    old = proxy_factory(config)
    table = f"stays_{os.getpid()}"
    conn = psycopg.connect(host=old.host, port=old.port, user=USER, dbname=AUTH_DB, connect_timeout=CONNECT_TIMEOUT)
    conn.execute(f"CREATE TABLE {table} (n int)")
    conn.commit()
    conn.execute(f"INSERT INTO {table} VALUES (1)")
    idle = psycopg.connect(host=old.host, port=old.port, user=USER, dbname=AUTH_DB, autocommit=True)
    new = ProxyProcess(old.config_text, workdir=str(tmp_path / "new"),
                       argv=[sys.executable, "-m", "multiproxy", "run", "--takeover", "-c"]).start()
    assert wait_for(lambda: "took over" in new.log_text(), 20), new.log_tail()
    assert took_over(new) == (1, 1)                           # the idle one
    assert "1 clients stayed there" in new.log_text()
    assert old.running                                        # finishing the busy one's transaction
    conn.commit()                                             # the transaction completes on the old process
    assert wait_for(lambda: not old.running, 20) and old.stop() == 0
    with pytest.raises(psycopg.OperationalError):
        conn.execute("SELECT 1")                              # then its connection was closed, as in a graceful stop
    assert idle.execute(f"SELECT count(*) FROM {table}").fetchone()[0] == 1
    idle.execute(f"DROP TABLE {table}")
    idle.close()
    new.stop()


# -- refusals: nothing changes for the running process -------------------------------------------------------

def run_takeover(config_text: str, workdir) -> subprocess.CompletedProcess:
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "multiproxy.toml")
    with open(path, "w") as f:
        f.write(config_text)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (os.getcwd(), os.environ.get("PYTHONPATH")) if p)}
    return subprocess.run([sys.executable, "-m", "multiproxy", "run", "--takeover", "-c", path], capture_output=True,
                          text=True, timeout=60, cwd=workdir, env=env)


@pytest.mark.timeout(120)
def test_takeover_refusals_leave_the_running_process_serving(pg, proxy_factory, tmp_path):
    from .proxy import render_toml
    config = pg_config(pg, tmp_path)
    old = proxy_factory(config)
    conn = psycopg.connect(host=old.host, port=old.port, user=USER, dbname=AUTH_DB, autocommit=True)
    # another listener list
    other = dict(config, listeners=[{**config["listeners"][0], "listen": f"127.0.0.1:{free_port()}"}],
                 proxy={**config["proxy"], "admin_listen": ""})
    refused = run_takeover(render_toml(other), tmp_path / "other")
    assert refused.returncode == 1
    assert "serves other listeners: listener 'pg' is postgres on 127.0.0.1" in refused.stderr, refused.stderr
    # nobody to take over
    nobody = dict(config, proxy={**config["proxy"], "takeover_socket": str(tmp_path / "none.sock")})
    refused = run_takeover(render_toml(nobody), tmp_path / "nobody")
    assert refused.returncode == 1 and "cannot reach a running multiproxy at" in refused.stderr, refused.stderr
    assert conn.execute("SELECT 1").fetchone()[0] == 1
    with psycopg.connect(host=old.host, port=old.port, user=USER, dbname=AUTH_DB, autocommit=True) as fresh:
        assert fresh.execute("SELECT 2").fetchone()[0] == 2
    assert old.running
    # and a takeover after them still works
    new = take_over(old, tmp_path)
    assert took_over(new) == (1, 1)
    assert conn.execute("SELECT 3").fetchone()[0] == 3
    conn.close()
    new.stop()



@pytest.mark.timeout(120)
@pytest.mark.parametrize("workers", [1, 2])
def test_a_second_caller_during_a_takeover_is_refused_and_the_first_leaving_frees_the_socket(pg, proxy_factory,
                                                                                             tmp_path, workers):
    """A caller on the takeover socket while another holds it is told a takeover is under way (the single process
    and a group's supervisor alike, takeover.admit_caller); when the first goes away silently, a real takeover
    still works and the clients go with it."""
    from multiproxy.handover import RecordReader
    config = pg_config(pg, tmp_path)
    config["proxy"]["workers"] = workers
    old = proxy_factory(config, startup_timeout=60)
    conn = psycopg.connect(host=old.host, port=old.port, user=USER, dbname=AUTH_DB, autocommit=True)
    path = config["proxy"]["takeover_socket"]
    first = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    first.connect(path)
    time.sleep(0.5)                          # accepted: the socket is busy with it
    second = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    second.settimeout(10)
    second.connect(path)
    record, fds = RecordReader(second).read()
    assert record == {"type": "refused", "reason": "a takeover of this process is already under way"}, record
    assert not fds
    second.close()
    first.close()
    assert conn.execute("SELECT 1").fetchone()[0] == 1
    assert old.running
    new = take_over(old, tmp_path)
    assert took_over(new) == (1, 1)
    assert conn.execute("SELECT 2").fetchone()[0] == 2
    conn.close()
    new.stop()

# -- TLS clients stay with the old process --------------------------------------------------------------------

@pytest.mark.timeout(120)
def test_pg_tls_clients_stay_and_finish_with_the_old_process(pg, proxy_factory, tmp_path):
    """Python's ssl cannot export a TLS session: a TLS client stays (counted), the plaintext one goes."""
    from .test_pg_tls import write_pki
    pki = write_pki(str(tmp_path), "takeover")
    config = pg_config(pg, tmp_path, drain=1.0)
    config["listeners"][0].update(tls_cert_file=pki["cert"], tls_key_file=pki["key"])
    old = proxy_factory(config)
    secure = psycopg.connect(host=old.host, port=old.port, user=USER, dbname=AUTH_DB, autocommit=True,
                             sslmode="require")
    assert secure.info.pgconn.ssl_in_use
    plain = psycopg.connect(host=old.host, port=old.port, user=USER, dbname=AUTH_DB, autocommit=True,
                            sslmode="disable")
    new = take_over(old, tmp_path)
    assert took_over(new) == (1, 1)
    assert "1 clients stayed there, 1 of them TLS" in new.log_text()
    assert plain.execute("SELECT 1").fetchone()[0] == 1
    with pytest.raises(psycopg.OperationalError):
        secure.execute("SELECT 1")                   # closed by the old process at its end; it reconnects
    again = psycopg.connect(host=new.host, port=new.port, user=USER, dbname=AUTH_DB, autocommit=True,
                            sslmode="require")
    assert again.execute("SELECT 2").fetchone()[0] == 2
    for conn in (secure, plain, again):
        conn.close()
    new.stop()


@pytest.mark.timeout(120)
def test_takeover_if_running_starts_alone_then_takes_over(pg, tmp_path):
    """The one command a service manager runs for every start: alone at first, a takeover afterwards."""
    argv = [sys.executable, "-m", "multiproxy", "run", "--takeover-if-running", "-c"]
    first = ProxyProcess(pg_config(pg, tmp_path), workdir=str(tmp_path / "first"), argv=argv).start()
    try:
        assert "starting without one" in first.log_text()
        conn = psycopg.connect(host=first.host, port=first.port, user=USER, dbname=AUTH_DB, autocommit=True)
        conn.execute("SET application_name = 'blue-green'")
        second = ProxyProcess(first.config_text, workdir=str(tmp_path / "second"), argv=argv).start()
        try:
            assert wait_for(lambda: "took over" in second.log_text(), 30), second.log_tail()
            assert wait_for(lambda: not first.running, 30) and first.stop() == 0
            assert took_over(second) == (1, 1)
            assert conn.execute("SHOW application_name").fetchone()[0] == "blue-green"
            # and again: a resumed session is handed over like any other
            third = ProxyProcess(first.config_text, workdir=str(tmp_path / "third"), argv=argv).start()
            try:
                assert wait_for(lambda: "took over" in third.log_text(), 30), third.log_tail()
                assert wait_for(lambda: not second.running, 30) and second.stop() == 0
                assert took_over(third) == (1, 1)
                assert conn.execute("SHOW application_name").fetchone()[0] == "blue-green"
            finally:
                third.stop()
            conn.close()
        finally:
            second.stop()
    finally:
        first.stop()


@pytest.mark.timeout(120)
def test_pg_cancel_of_a_client_that_stayed_reaches_the_old_process(pg, proxy_factory, tmp_path):
    """The cancel request arrives at the new process (it holds the listener); it passes the unknown key to the old
    process, which still serves that client."""
    config = pg_config(pg, tmp_path, drain=1.0)
    config["proxy"]["shutdown_timeout"] = 30.0
    old = proxy_factory(config)
    conn = psycopg.connect(host=old.host, port=old.port, user=USER, dbname=AUTH_DB, autocommit=True)
    outcome = []

    def sleep():
        try:
            conn.execute("SELECT pg_sleep(25)")
            outcome.append("finished")
        except psycopg.errors.QueryCanceled as exc:
            outcome.append(exc)
    thread = threading.Thread(target=sleep)
    thread.start()
    time.sleep(0.5)
    new = ProxyProcess(old.config_text, workdir=str(tmp_path / "new"),
                       argv=[sys.executable, "-m", "multiproxy", "run", "--takeover", "-c"]).start()
    assert wait_for(lambda: "took over" in new.log_text(), 20), new.log_tail()
    assert took_over(new) == (1, 0) and "1 clients stayed there" in new.log_text()
    started = time.monotonic()
    conn.cancel()
    thread.join(15)
    assert outcome and isinstance(outcome[0], psycopg.errors.QueryCanceled), outcome
    assert time.monotonic() - started < 5
    assert wait_for(lambda: not old.running, 30) and old.stop() == 0
    conn.close()
    new.stop()


# -- systemd: the service follows the new process ----------------------------------------------------------

@pytest.mark.timeout(120)
def test_systemd_hears_the_new_main_process_and_no_stop(pg, proxy_factory, tmp_path):
    from .test_deploy import _notify_socket, _receive
    path = str(tmp_path / "notify.sock")
    sock = _notify_socket(path)
    env = {"NOTIFY_SOCKET": path}
    old = proxy_factory(pg_config(pg, tmp_path), env=env)
    fields, pid = _receive(sock, 20)
    assert fields.get("READY") == "1" and pid == old.pid
    conn = psycopg.connect(host=old.host, port=old.port, user=USER, dbname=AUTH_DB, autocommit=True)
    new = ProxyProcess(old.config_text, workdir=str(tmp_path / "new"), env=env,
                       argv=[sys.executable, "-m", "multiproxy", "run", "--takeover", "-c"]).start()
    heard = []
    while True:
        try:
            heard.append(_receive(sock, 3))
        except socket.timeout:
            break
    assert wait_for(lambda: not old.running, 30) and old.stop() == 0
    by_new = [fields for fields, pid in heard if pid == new.pid]
    by_old = [fields for fields, pid in heard if pid == old.pid]
    assert {"READY": "1", "MAINPID": str(new.pid)}.items() <= by_new[0].items(), heard
    assert any(f.get("STATUS", "").startswith("took over 1 clients from pid") for f in by_new), heard
    assert not any("STOPPING" in f for f in by_old), heard        # the service goes on
    assert conn.execute("SELECT 1").fetchone()[0] == 1
    with urllib.request.urlopen(f"http://{new.admin_address[0]}:{new.admin_address[1]}/healthz", timeout=5) as page:
        assert page.status == 200                                 # the admin server's socket moved too
    with urllib.request.urlopen(f"http://{new.admin_address[0]}:{new.admin_address[1]}/metrics", timeout=5) as page:
        assert 'multiproxy_takeover_clients_total{side="taken_over"} 1.0' in page.read().decode()
    conn.close()
    new.stop()


@pytest.mark.timeout(120)
def test_tds_login_only_encryption_goes_full_encryption_stays(tds_lab, proxy_factory, tmp_path):
    """A TDS client that encrypted only its login is plaintext afterwards and follows; one encrypting everything
    stays (Python's ssl cannot export the session)."""
    from multiproxy.lab.tds_server import make_self_signed

    from .test_tds_proxy import ms, one
    cert, key = make_self_signed(str(tmp_path))
    config = tds_setup(tds_lab, tmp_path, drain=1.0)
    config["listeners"][0].update(tls_cert_file=cert, tls_key_file=key)
    old = proxy_factory(config, files=tds_files())
    login_only = ms(old)                           # FreeTDS's default "request": the login packet only
    one(login_only, "SELECT 1")
    full = ms(old, encryption="require")
    one(full, "SELECT 1")
    new = take_over(old, tmp_path)
    assert took_over(new) == (1, 1)
    assert "1 clients stayed there, 1 of them TLS" in new.log_text()
    assert "TLS: 1" in old.log_text()
    assert one(login_only, "SELECT 2 + 3") == [(5,)]
    with pytest.raises(Exception):                 # closed by the old process at its end: it reconnects
        one(full, "SELECT 1")
    login_only.close()
    new.stop()


# -- many idle clients, and a client logging in during the switch ------------------------------------------

@pytest.mark.timeout(240)
def test_pg_200_idle_clients_all_go_with_their_settings(pg, proxy_factory, tmp_path):
    old = proxy_factory(pg_config(pg, tmp_path, max_size=4))
    conns = []
    for i in range(200):
        conn = psycopg.connect(host=old.host, port=old.port, user=USER, dbname=AUTH_DB, autocommit=True)
        conn.execute(f"SET application_name = 'client-{i}'")
        conns.append(conn)
    new = take_over(old, tmp_path)
    assert took_over(new) == (1, 200)
    for i, conn in enumerate(conns):
        assert conn.execute("SHOW application_name").fetchone()[0] == f"client-{i}"
        conn.close()
    new.stop()


def read_until_ready(sock) -> bytes:
    data = b""
    while not re.search(rb"Z\x00\x00\x00\x05[ITE]$", data):
        chunk = sock.recv(65536)
        assert chunk, data
        data += chunk
    return data


@pytest.mark.timeout(120)
def test_pg_client_logging_in_during_the_switch_follows_once_logged_in(pg, proxy_factory, tmp_path):
    import struct
    old = proxy_factory(pg_config(pg, tmp_path, drain=20.0))
    sock = socket.create_connection((old.host, old.port), timeout=10)      # accepted by the old process
    new = ProxyProcess(old.config_text, workdir=str(tmp_path / "new"),
                       argv=[sys.executable, "-m", "multiproxy", "run", "--takeover", "-c"]).start()
    assert wait_for(lambda: "handing this process over" in old.log_text(), 20), old.log_tail()
    body = struct.pack("!I", 196608) + b"user\x00" + USER.encode() + b"\x00database\x00" + AUTH_DB.encode() + b"\x00\x00"
    sock.sendall(struct.pack("!I", len(body) + 4) + body)                   # its login, after the switch began
    assert b"R\x00\x00\x00\x08\x00\x00\x00\x00" in read_until_ready(sock)  # AuthenticationOk, from the old process
    assert wait_for(lambda: "took over" in new.log_text(), 20), new.log_tail()
    assert took_over(new) == (1, 1)
    query = b"SELECT 6 * 7\x00"
    sock.sendall(b"Q" + struct.pack("!I", len(query) + 4) + query)
    assert b"\x00\x00\x00\x0242" in read_until_ready(sock)                 # served by the new process
    assert wait_for(lambda: not old.running, 20) and old.stop() == 0
    sock.close()
    new.stop()


@pytest.mark.timeout(120)
def test_old_process_accepts_again_when_the_new_one_dies_mid_takeover(pg, proxy_factory, tmp_path):
    import signal
    old = proxy_factory(pg_config(pg, tmp_path, drain=30.0))
    busy = psycopg.connect(host=old.host, port=old.port, user=USER, dbname=AUTH_DB, connect_timeout=CONNECT_TIMEOUT)
    busy.execute("SELECT 1")                                 # a transaction open: the drain waits for it
    new = ProxyProcess(old.config_text, workdir=str(tmp_path / "new"),
                       argv=[sys.executable, "-m", "multiproxy", "run", "--takeover", "-c"]).start()
    assert wait_for(lambda: "handing this process over" in old.log_text(), 20), old.log_tail()
    time.sleep(0.5)
    new.send_signal(signal.SIGKILL)
    assert wait_for(lambda: "this process accepts again" in old.log_text(), 20), old.log_tail()
    new.stop()
    assert old.running
    busy.commit()                                            # its transaction went on in the old process
    assert busy.execute("SELECT 2").fetchone()[0] == 2
    busy.commit()
    with psycopg.connect(host=old.host, port=old.port, user=USER, dbname=AUTH_DB, autocommit=True) as fresh:
        assert fresh.execute("SELECT 3").fetchone()[0] == 3  # the listener is the old process's again
    busy.close()
    again = take_over(old, tmp_path, name="again")             # and it can be taken over again
    assert took_over(again) == (1, 0)
    again.stop()


@pytest.mark.timeout(120)
def test_pg_pinned_and_session_mode_clients_stay(pg, proxy_factory, tmp_path):
    """Their state lives in their own backend connection, which cannot move: they stay and end with the old
    process, and its log says why."""
    config = pg_config(pg, tmp_path, drain=1.0)
    config["proxy"]["shutdown_timeout"] = 2.0     # they hold their backend while idle: the graceful stop waits this long
    config["listeners"].append({"name": "pg_session", "listen": f"127.0.0.1:{free_port()}", "cluster": "main",
                                "role": "writer", "auth": "trust", "pool_mode": "session"})
    old = proxy_factory(config)
    pinned = psycopg.connect(host=old.host, port=old.port, user=USER, dbname=AUTH_DB, autocommit=True)
    pinned.execute("CREATE TEMP TABLE mine (n int)")
    session_host, session_port = old.address("pg_session")
    session_mode = psycopg.connect(host=session_host, port=session_port, user=USER, dbname=AUTH_DB, autocommit=True)
    session_mode.execute("SELECT 1")
    plain = psycopg.connect(host=old.host, port=old.port, user=USER, dbname=AUTH_DB, autocommit=True)
    new = take_over(old, tmp_path)
    assert took_over(new) == (2, 1)
    assert "pinned: 1" in old.log_text() and "session pool mode: 1" in old.log_text(), old.log_text()
    assert plain.execute("SELECT 1").fetchone()[0] == 1
    for conn in (pinned, session_mode):
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 1")
        conn.close()
    plain.close()
    new.stop()


@pytest.mark.timeout(180)
def test_pg_new_connections_during_the_switch_are_never_refused(pg, proxy_factory, tmp_path):
    """pgbench -C (a new connection per transaction) through a takeover: the listening socket is shared by both
    processes for the moment of the switch, so no connection is refused or lost."""
    old = proxy_factory(pg_config(pg, tmp_path, max_size=4, drain=10.0))
    base = ["-h", old.host, "-p", str(old.port), "-U", USER]
    init = subprocess.run(["pgbench", "-i", "-s", "1", "-q", *base, AUTH_DB], capture_output=True, text=True,
                          env=client_env(), timeout=120)
    assert init.returncode == 0, init.stderr
    bench = subprocess.Popen(["pgbench", "-n", "-S", "-C", "-c", "4", "-j", "2", "-T", "8", *base, AUTH_DB],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=client_env())
    try:
        time.sleep(2.0)
        new = take_over(old, tmp_path)
        out, err = bench.communicate(timeout=60)
    finally:
        if bench.poll() is None:
            bench.kill()
    assert bench.returncode == 0, f"{out}\n{err}"
    processed = int(re.search(r"number of transactions actually processed: (\d+)", out).group(1))
    assert processed > 100, out
    failed = re.search(r"number of failed transactions: (\d+)", out)
    assert failed is None or failed.group(1) == "0", out
    assert "error" not in err.lower() and "could not connect" not in err.lower(), err
    new.stop()


# -- the systemd template unit of docs/deploy.md ----------------------------------------------------------------

TEMPLATE_UNIT = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                             "configs", "systemd", "multiproxy@.service")


def test_the_template_unit_is_the_service_with_takeover_if_running():
    service = open(TEMPLATE_UNIT.replace("multiproxy@.service", "multiproxy.service"), encoding="utf-8").read()
    template = open(TEMPLATE_UNIT, encoding="utf-8").read()
    settings = [line for line in service.splitlines() if "=" in line and not line.startswith("#")]
    changed = {"ExecStart", "Description"}
    for line in settings:
        if line.split("=", 1)[0] not in changed:
            assert line in template.splitlines(), line
    assert ("ExecStart=/usr/local/bin/multiproxy run --takeover-if-running -c /etc/multiproxy/multiproxy.toml"
            in template.splitlines())
    for line in ("RuntimeDirectory=multiproxy", "RuntimeDirectoryPreserve=yes", "Type=notify", "NotifyAccess=main"):
        assert line in template.splitlines(), line


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_the_template_unit_verifies(tmp_path):
    binary = shutil.which("multiproxy") or os.path.join(os.path.dirname(sys.executable), "multiproxy")
    assert os.path.exists(binary)
    text = open(TEMPLATE_UNIT, encoding="utf-8").read().replace("/usr/local/bin/multiproxy", binary)
    (tmp_path / "multiproxy@.service").write_text(text)
    unit = tmp_path / "multiproxy@blue.service"
    unit.symlink_to(tmp_path / "multiproxy@.service")
    out = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=50)
    problems = [line for line in out.stderr.splitlines() if "multiproxy@" in line]
    assert out.returncode == 0 and not problems, out.stderr
