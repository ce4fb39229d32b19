"""Worker custody (multiproxy.custody): with forked workers, kill -9 of a worker loses none of its idle clients (they
keep their connection and their session settings in the respawned worker, cancel keys included) and no committed
transaction; its busy clients see their connection end; with worker_custody = false they are lost as before. A
worker SIGTTOU retires that dies before its drain: its held idle clients go to the other workers. Real
servers (PostgreSQL, MariaDB, the TDS lab), real clients (psycopg, pgbench, PyMySQL, pymssql and a raw TDS client)."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
import urllib.request

import psycopg
import pytest

from .helpers import metric, metrics_text
from .pgserver import AUTH_DB
from .test_admin_console import ADMIN, console_config
from .test_supervisor import wait_for, worker_pids

TIMEOUT = 10


def resumed_line(index: int) -> re.Pattern:
    return re.compile(rf"worker {index} resumed (\d+) idle clients of its previous process \(pid (\d+)\); (\d+) busy "
                      r"clients were closed")


def both_started(proxy) -> dict[int, int]:
    return wait_for("both workers started", lambda: (lambda p: p if len(p) == 2 else None)(worker_pids(proxy)), 30)


def client_workers(proxy) -> dict[int, str]:
    """The client's port -> the worker serving it (the admin server's SHOW CLIENTS, merged over the workers)."""
    host, port = proxy.admin_address
    with urllib.request.urlopen(f"http://{host}:{port}/admin/clients?format=objects", timeout=TIMEOUT) as answer:
        return {int(row["port"]): str(row["worker"]) for row in json.load(answer)["rows"]}


def spread(proxy, connect, local_port, each: int = 3, most: int = 60) -> list:
    """Connections until each of the two workers serves at least `each` of them (the first worker awake takes a
    connection, so a run may go to one worker)."""
    conns = []
    while len(conns) < most:
        conns.append(connect())
        if len(conns) >= 2 * each:
            on = client_workers(proxy)
            workers = [on.get(local_port(conn)) for conn in conns]
            if min(workers.count("0"), workers.count("1")) >= each:
                return conns
    raise AssertionError(f"{most} connections all went to one worker")


def kill_worker(proxy, index: int = 1) -> tuple[int, int]:
    """kill -9 a worker and wait for its replacement to resume its clients: (idle resumed, busy closed)."""
    pids = worker_pids(proxy)
    os.kill(pids[index], signal.SIGKILL)
    wait_for(f"worker {index} respawned", lambda: worker_pids(proxy).get(index) not in (None, pids[index]))
    pattern = resumed_line(index)
    match = wait_for("the replacement resumed the idle clients", lambda: pattern.search(proxy.log_text()), 15)
    assert int(match.group(2)) == pids[index]
    return int(match.group(1)), int(match.group(3))


# ---------------------------------------------------------------- PostgreSQL

def pg_group(pg, max_size: int = 4) -> dict:
    config = console_config(pg, max_size=max_size)
    config["proxy"]["workers"] = 2
    return config


def pg_local_port(conn) -> int:
    return socket.socket(fileno=os.dup(conn.pgconn.socket)).getsockname()[1]


def pg_app(proxy, **kwargs) -> psycopg.Connection:
    return psycopg.connect(host=proxy.host, port=proxy.port, user=ADMIN, dbname=AUTH_DB, connect_timeout=TIMEOUT,
                           autocommit=True, **kwargs)


@pytest.mark.timeout(60)
def test_pg_idle_clients_of_a_killed_worker_keep_their_connection_session_and_cancel_key(pg, proxy_factory):
    proxy = proxy_factory(pg_group(pg))
    both_started(proxy)
    conns = spread(proxy, lambda: pg_app(proxy), pg_local_port)
    try:
        ports = {id(conn): pg_local_port(conn) for conn in conns}
        number = {id(conn): i for i, conn in enumerate(conns)}
        for i, conn in enumerate(conns):
            conn.execute(f"SET application_name = 'custody-{i}'")
            conn.execute(f"SET search_path = custody_{i}, public")
        on = client_workers(proxy)
        killed = [conn for conn in conns if on[ports[id(conn)]] == "1"]
        # One client of the victim inside a transaction: busy, so closed (its transaction died with the worker).
        busy = killed.pop()
        busy.execute("BEGIN")
        busy.execute("SELECT 1")
        resumed, closed = kill_worker(proxy)
        assert (resumed, closed) == (len(killed), 1)
        counts = wait_for("the replacement answers for its metrics", lambda: (lambda text: text if metric(
            text, "multiproxy_worker_custody_clients_total", outcome="resumed") else None)(metrics_text(proxy)))
        assert metric(counts, "multiproxy_worker_custody_clients_total", outcome="resumed") == resumed
        assert metric(counts, "multiproxy_worker_custody_clients_total", outcome="closed_busy") == 1
        with pytest.raises(psycopg.OperationalError):
            busy.execute("SELECT 1")
        conns.remove(busy)
        busy.close()
        for conn in conns:
            i = number[id(conn)]
            assert pg_local_port(conn) == ports[id(conn)]       # the same connection, never reconnected
            row = conn.execute("SELECT current_setting('application_name'), current_setting('search_path')").fetchone()
            assert row == (f"custody-{i}", f"custody_{i}, public")
        # A prepared statement (psycopg's, after 5 runs) and a cancel key issued by the dead process still work.
        victim = killed[0]
        for n in range(7):
            assert victim.execute("SELECT %s::int + 1", (n,), prepare=True).fetchone() == (n + 1,)
        cancelled = []

        def sleeper():
            try:
                victim.execute("SELECT pg_sleep(20)")
            except psycopg.errors.QueryCanceled:
                cancelled.append(True)
        thread = threading.Thread(target=sleeper, daemon=True)
        started = time.monotonic()
        thread.start()
        time.sleep(0.5)
        victim.cancel()
        thread.join(TIMEOUT)
        assert cancelled and time.monotonic() - started < 8
        assert victim.execute("SELECT 7").fetchone() == (7,)
        # A new client of the replacement gets a cancel key no resumed client has.
        fresh = pg_app(proxy)
        keys = {c.pgconn.backend_pid for c in conns}
        assert fresh.pgconn.backend_pid not in keys or client_workers(proxy)[pg_local_port(fresh)] == "0"
        fresh.close()
    finally:
        for conn in conns:
            conn.close()


@pytest.mark.timeout(120)
def test_pg_a_worker_sigttou_retires_that_dies_before_its_drain_loses_only_its_busy_clients(pg, proxy_factory):
    """SIGTTOU to a group whose worker 1 is stopped (SIGSTOP: it cannot drain), then kill -9 of that worker: the idle
    clients the supervisor held for it go to worker 0 from its duplicates, with their sessions; a client inside a
    transaction is closed (its transaction died with the worker)."""
    proxy = proxy_factory(pg_group(pg))
    pids = both_started(proxy)
    conns = spread(proxy, lambda: pg_app(proxy), pg_local_port)
    try:
        for i, conn in enumerate(conns):
            conn.execute(f"SET application_name = 'retired-{i}'")
        on = client_workers(proxy)
        retired = [conn for conn in conns if on[pg_local_port(conn)] == "1"]
        busy = retired.pop()
        busy.execute("BEGIN")
        busy.execute("SELECT 1")
        time.sleep(0.5)         # a worker marks a client idle just after it sent the answer
        os.kill(pids[1], signal.SIGSTOP)
        try:
            proxy.send_signal(signal.SIGTTOU)
            wait_for("the SIGTTOU logged", lambda: "SIGTTOU received: worker 1" in proxy.log_text())
        finally:
            os.kill(pids[1], signal.SIGKILL)
        moved = wait_for("the held clients moved", lambda: re.search(
            r"worker 1 \(SIGTTOU\) is gone: (\d+) idle clients held for it went to the other workers, (\d+) busy",
            proxy.log_text()))
        assert (int(moved.group(1)), int(moved.group(2))) == (len(retired), 1)
        wait_for("worker 1 gone", lambda: "stopped after SIGTTOU" in proxy.log_text())
        for i, conn in enumerate(conns):
            if conn is busy:
                with pytest.raises(psycopg.OperationalError):
                    conn.execute("SELECT 1")
            else:
                assert conn.execute("SHOW application_name").fetchone()[0] == f"retired-{i}"
        assert set(client_workers(proxy).values()) == {"0"}
        assert worker_pids(proxy).get(1) == pids[1]       # not respawned
    finally:
        for conn in conns:
            conn.close()


@pytest.mark.timeout(60)
def test_pgbench_through_a_kill_aborts_only_the_busy_clients_and_loses_no_commit(pg, proxy_factory, tmp_path):
    """16 pgbench clients over 8 backends on two workers; worker 1 killed mid-run: pgbench's aborted clients are the
    ones busy at that moment (as many as the supervisor closed), the idle ones go on in the replacement, and every
    transaction pgbench counts as processed is in the table."""
    table = "custody_pgbench"
    pg.psql(f"DROP TABLE IF EXISTS {table}; CREATE TABLE {table} (id bigserial PRIMARY KEY, client int);"
            f"GRANT ALL ON {table} TO {ADMIN}; GRANT ALL ON SEQUENCE {table}_id_seq TO {ADMIN};", db=AUTH_DB)
    proxy = proxy_factory(pg_group(pg, max_size=8))
    both_started(proxy)
    script = tmp_path / "insert.sql"
    script.write_text(f"\\sleep 20 ms\nBEGIN;\nINSERT INTO {table} (client) VALUES (:client_id);\nCOMMIT;\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    bench = subprocess.Popen(["pgbench", "-n", "-h", proxy.host, "-p", str(proxy.port), "-U", ADMIN, "-c", "16",
                              "-T", "6", "-f", str(script), AUTH_DB], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, env=env)
    try:
        time.sleep(2.5)
        # The worker holding more of pgbench's clients (the first worker awake takes a connection: the split varies).
        on = list(client_workers(proxy).values())
        resumed, closed = kill_worker(proxy, 0 if on.count("0") > on.count("1") else 1)
        out, _ = bench.communicate(timeout=40)
    finally:
        if bench.poll() is None:
            bench.kill()
    processed = int(re.search(r"number of transactions actually processed: (\d+)", out).group(1))
    aborted = len(re.findall(r"client \d+ aborted", out))
    stored = int(pg.psql(f"SELECT count(*) FROM {table};", db=AUTH_DB).strip())
    print(f"custody under pgbench: {resumed} idle clients resumed, {closed} busy closed, {aborted} pgbench clients "
          f"aborted; {processed} transactions processed, {stored} stored")
    assert processed > 100, out
    assert resumed > 0, out
    assert aborted == closed, (aborted, closed, out)
    # A transaction whose COMMIT was under way when the worker died may be stored without pgbench counting it.
    assert processed <= stored <= processed + closed, (stored, processed, out)
    pg.psql(f"DROP TABLE {table};", db=AUTH_DB)


# ---------------------------------------------------------------- MySQL / MariaDB

@pytest.mark.timeout(60)
def test_mysql_idle_clients_of_a_killed_worker_keep_their_connection_and_session(mariadb, proxy_factory):
    from .mysqlkit import connect, mysql_config, users_toml
    config = mysql_config(mariadb, max_size=4)
    config["proxy"]["workers"] = 2
    proxy = proxy_factory(config, files={"users.toml": users_toml()})
    both_started(proxy)
    conns = spread(proxy, lambda: connect(proxy), lambda conn: conn._sock.getsockname()[1])
    try:
        ports = {id(conn): conn._sock.getsockname()[1] for conn in conns}
        ids = {id(conn): conn.thread_id() for conn in conns}
        for i, conn in enumerate(conns):
            with conn.cursor() as cur:
                cur.execute("SET SESSION sql_mode = 'ANSI_QUOTES'")
                cur.execute(f"SET @@session.div_precision_increment = {i % 10 + 1}")
        on = client_workers(proxy)
        killed = [conn for conn in conns if on[ports[id(conn)]] == "1"]
        resumed, closed = kill_worker(proxy)
        assert (resumed, closed) == (len(killed), 0)
        for i, conn in enumerate(conns):
            assert conn._sock.getsockname()[1] == ports[id(conn)]
            with conn.cursor() as cur:
                cur.execute("SELECT @@SESSION.sql_mode, @@SESSION.div_precision_increment")
                assert cur.fetchone() == ("ANSI_QUOTES", i % 10 + 1)
        # KILL QUERY with the connection id a resumed client was given by the dead process.
        victim = killed[0]
        outcome = []

        def sleep():
            try:
                with victim.cursor() as cur:
                    cur.execute("SELECT SLEEP(20)")
                    outcome.append(cur.fetchone())
            except Exception as exc:  # noqa: BLE001  an interrupted query may also answer with an error
                outcome.append(exc)
        thread = threading.Thread(target=sleep, daemon=True)
        started = time.monotonic()
        thread.start()
        time.sleep(0.5)
        killer = connect(proxy)
        killer.cursor().execute(f"KILL QUERY {ids[id(victim)]}")
        killer.close()
        thread.join(TIMEOUT)
        assert outcome and time.monotonic() - started < 8, outcome
        with victim.cursor() as cur:
            cur.execute("SELECT 5")
            assert cur.fetchone() == (5,)
    finally:
        for conn in conns:
            conn.close()


# ---------------------------------------------------------------- TDS

@pytest.fixture(scope="module")
def tds_lab(tmp_path_factory):
    from .tdskit import LabProcess
    server = LabProcess(tmp_path_factory.mktemp("tdslab-custody"))
    yield server
    server.stop()


@pytest.mark.timeout(60)
def test_tds_idle_clients_of_a_killed_worker_keep_their_connection_and_set_options(tds_lab, proxy_factory):
    from .test_tds_proxy import RawClient, ms, one, tds_config, users_toml
    config = tds_config(tds_lab, max_size=4)
    config["proxy"]["workers"] = 2
    proxy = proxy_factory(config, files={"users.toml": users_toml()})
    both_started(proxy)
    clients = spread(proxy, lambda: RawClient(proxy.port), lambda raw: raw.sock.getsockname()[1])
    drivers = [ms(proxy) for _ in range(4)]        # pymssql (FreeTDS): which worker serves each is counted below
    try:
        ports = {id(raw): raw.sock.getsockname()[1] for raw in clients}
        for i, raw in enumerate(clients):
            raw.batch(f"SET DATEFIRST {i % 7 + 1}; SET TEXTSIZE {1000 + i}")
        for i, conn in enumerate(drivers):
            conn.cursor().execute(f"SET DATEFIRST {i + 2}")
        on_1 = list(client_workers(proxy).values()).count("1")
        resumed, closed = kill_worker(proxy)
        assert (resumed, closed) == (on_1, 0)
        for i, raw in enumerate(clients):
            assert raw.sock.getsockname()[1] == ports[id(raw)]
            assert raw.rows("SELECT @@DATEFIRST, @@TEXTSIZE") == [[i % 7 + 1, 1000 + i]]
        for i, conn in enumerate(drivers):
            assert one(conn, "SELECT @@DATEFIRST") == [(i + 2,)]
    finally:
        for raw in clients:
            raw.close()
        for conn in drivers:
            conn.close()


@pytest.mark.timeout(60)
def test_pg_without_custody_the_clients_of_a_killed_worker_lose_their_connection(pg, proxy_factory):
    config = pg_group(pg)
    config["proxy"]["worker_custody"] = False
    proxy = proxy_factory(config)
    both_started(proxy)
    conns = spread(proxy, lambda: pg_app(proxy), pg_local_port, each=2)
    try:
        on = client_workers(proxy)
        killed = [conn for conn in conns if on[pg_local_port(conn)] == "1"]
        pids = worker_pids(proxy)
        os.kill(pids[1], signal.SIGKILL)
        wait_for("worker 1 respawned", lambda: worker_pids(proxy).get(1) not in (None, pids[1]))
        for conn in killed:
            with pytest.raises(psycopg.OperationalError):
                conn.execute("SELECT 1")
        for conn in conns:
            if conn not in killed:
                assert conn.execute("SELECT 1").fetchone() == (1,)
        assert "resumed" not in proxy.log_text() and "died holding" not in proxy.log_text()
    finally:
        for conn in conns:
            conn.close()


@pytest.mark.timeout(60)
def test_pg_sixty_idle_pg8000_clients_all_resume_with_their_settings(pg, proxy_factory):
    import pg8000.native
    proxy = proxy_factory(pg_group(pg, max_size=4))
    both_started(proxy)
    clients = []
    try:
        for i in range(60):
            conn = pg8000.native.Connection(ADMIN, host=proxy.host, port=proxy.port, database=AUTH_DB, timeout=TIMEOUT)
            conn.run(f"SET application_name = 'many-{i}'")
            clients.append(conn)
        on_1 = list(client_workers(proxy).values()).count("1")
        started = time.monotonic()
        resumed, closed = kill_worker(proxy)
        took = time.monotonic() - started
        assert (resumed, closed) == (on_1, 0)
        for i, conn in enumerate(clients):
            assert conn.run("SHOW application_name") == [[f"many-{i}"]]
        print(f"custody: {resumed} of 60 pg8000 clients on the killed worker resumed, {took:.2f} s from kill -9 to "
              "the replacement's log line")
    finally:
        for conn in clients:
            conn.close()
