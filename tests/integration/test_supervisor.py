"""Forked workers under the supervisor (multiproxy.supervisor), through real clients on a private PostgreSQL (and
MariaDB for the budget): a worker killed (kill -9, or silenced with SIGSTOP) is logged and respawned while the
listener keeps accepting and no acknowledged commit is lost (psycopg clients, and pgbench); back-off after repeated
deaths; one view of the group (/metrics, /status, /admin/, SHOW through psql, PgBouncer's exporter); RELOAD reaching
every worker before systemd hears READY=1; one backend budget for the group (max_size and the cluster cap, counted
on the server, and freed when a worker dies); cancels across workers after a respawn; SIGTERM drains every worker
and respawns none; a worker that cannot start stops the group; listeners a reload adds or removes after a respawn,
bound once by the supervisor; SHOW EVENTS once per event; SIGTTIN and SIGTTOU (the retired worker's clients move to
the others with their sessions and cancel keys; a pinned one stays), and a lone process ignoring them."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import psycopg
import pytest

from .helpers import metric, metrics_text
from .pgserver import AUTH_DB, SUPERUSER
from .proxy import free_port
from .test_admin_console import ADMIN, console_config

TIMEOUT = 10
STARTED = re.compile(r"worker (\d+) started \(pid (\d+)\)")


def group_config(pg, workers: int = 2, **kwargs) -> dict:
    config = console_config(pg, **kwargs)
    config["proxy"]["workers"] = workers
    return config


def worker_pids(proxy) -> dict[int, int]:
    """Worker index -> its latest pid, from the supervisor's log."""
    pids = {}
    for index, pid in STARTED.findall(proxy.log_text()):
        pids[int(index)] = int(pid)
    return pids


def wait_for(what: str, predicate, timeout: float = TIMEOUT, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")


def status(proxy) -> dict:
    host, port = proxy.admin_address
    with urllib.request.urlopen(f"http://{host}:{port}/status", timeout=TIMEOUT) as answer:
        return json.load(answer)


def app(proxy, **kwargs) -> psycopg.Connection:
    return psycopg.connect(host=proxy.host, port=proxy.port, user=ADMIN, dbname=AUTH_DB, connect_timeout=TIMEOUT,
                           **kwargs)


def spread_clients(proxy, least: int, each: int = 2, **kwargs) -> list[psycopg.Connection]:
    """At least `least` client connections, with at least `each` on every worker. The workers share the listening
    socket, and the one awake first takes a connection: on a busy machine a run of connections may all go to one
    worker, so connect until both have some (at most 80)."""
    conns = []
    while len(conns) < 80:
        conns.append(app(proxy, **kwargs))
        if len(conns) >= least:
            on = [row[-1] for row in psql_console(proxy, "SHOW CLIENTS") if row[2] == AUTH_DB]
            if min(on.count("0"), on.count("1")) >= each:
                return conns
    for conn in conns:
        conn.close()
    raise AssertionError("80 connections all went to one worker")


def psql_console(proxy, sql: str) -> list[list[str]]:
    """`psql -d pgbouncer -c SQL` as a user would, rows split on '|'."""
    out = subprocess.run(["psql", "-h", proxy.host, "-p", str(proxy.port), "-U", ADMIN, "-d", "pgbouncer", "-AtX",
                          "-c", sql], capture_output=True, text=True, timeout=TIMEOUT, check=True).stdout
    return [line.split("|") for line in out.splitlines() if line]


def backend_count(pg, application: str | None = None) -> int:
    where = f"datname = '{AUTH_DB}' AND pid <> pg_backend_pid() AND backend_type = 'client backend'"
    return int(pg.psql(f"SELECT count(*) FROM pg_stat_activity WHERE {where};").strip())


BACKENDS = (f"SELECT count(*) FROM pg_stat_activity WHERE usename = '{ADMIN}' AND datname = %s "
            "AND backend_type = 'client backend'")


def server_connection(pg) -> psycopg.Connection:
    """A connection straight to the server (not through the proxy), as its superuser, to count backends."""
    return psycopg.connect(host=pg.host, port=pg.port, user=SUPERUSER, dbname="postgres", autocommit=True,
                           connect_timeout=TIMEOUT)


class ConnectLoop(threading.Thread):
    """Connects to the listener every 50 ms (TCP only) and counts refusals, until stopped."""

    def __init__(self, address):
        super().__init__(daemon=True)
        self.address = address
        self.attempts = 0
        self.refused: list[str] = []
        self.done = threading.Event()

    def run(self):
        while not self.done.is_set():
            self.attempts += 1
            try:
                with socket.create_connection(self.address, timeout=2):
                    pass
            except OSError as exc:
                self.refused.append(repr(exc))
            time.sleep(0.05)


@pytest.mark.timeout(90)
def test_a_worker_killed_under_load_is_respawned_and_no_acknowledged_commit_is_lost(pg, proxy_factory):
    table = "sup_commits"
    pg.psql(f"DROP TABLE IF EXISTS {table}; CREATE TABLE {table} (client int, n int, PRIMARY KEY (client, n));"
            f"GRANT ALL ON {table} TO {ADMIN};", db=AUTH_DB)
    proxy = proxy_factory(group_config(pg, max_size=6))
    pids = wait_for("both workers started", lambda: (lambda p: p if len(p) == 2 else None)(worker_pids(proxy)))
    loop = ConnectLoop((proxy.host, proxy.port))
    loop.start()
    acknowledged: dict[int, set] = {i: set() for i in range(8)}
    errors: list[str] = []
    stop = threading.Event()

    def client(i):
        n = 0
        conn = None
        while not stop.is_set():
            try:
                if conn is None:
                    conn = app(proxy)
                n += 1
                with conn.transaction():
                    conn.execute(f"INSERT INTO {table} VALUES (%s, %s)", (i, n))
                acknowledged[i].add(n)      # COMMIT answered: must be in the table
            except psycopg.Error as exc:
                errors.append(repr(exc))
                try:
                    conn.close()
                except Exception:
                    pass
                conn = None
                time.sleep(0.05)
        if conn is not None:
            conn.close()

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(8)]
    for thread in threads:
        thread.start()
    try:
        wait_for("commits flowing", lambda: sum(len(a) for a in acknowledged.values()) > 100)
        wait_for("connect loop running", lambda: loop.attempts >= 20)
        victim = pids[1]
        os.kill(victim, signal.SIGKILL)
        respawned = wait_for("worker 1 respawned", lambda: worker_pids(proxy).get(1) != victim and worker_pids(proxy))
        before = sum(len(a) for a in acknowledged.values())
        wait_for("commits flowing after the respawn", lambda: sum(len(a) for a in acknowledged.values()) > before + 100)
        attempts = loop.attempts
        wait_for("connects after the respawn", lambda: loop.attempts >= attempts + 20)
    finally:
        stop.set()
        for thread in threads:
            thread.join(TIMEOUT)
        loop.done.set()
        loop.join(TIMEOUT)
    log = proxy.log_text()
    assert re.search(rf"worker 1 \(pid {victim}\) killed by signal 9 \(SIGKILL\) after [\d.]+ s; respawning it in "
                     r"0\.1 s \(restart 1\)", log), log[-3000:]
    assert respawned[1] != victim and respawned[0] == pids[0]
    assert loop.attempts >= 40 and loop.refused == [], loop.refused
    rows = pg.psql(f"SELECT client, n FROM {table};", db=AUTH_DB).split()
    stored = {tuple(map(int, row.split("|"))) for row in rows}
    missing = [(i, n) for i, ns in acknowledged.items() for n in ns if (i, n) not in stored]
    assert missing == [], f"{len(missing)} acknowledged commits missing"
    assert len(stored) >= sum(len(a) for a in acknowledged.values())
    # The clients of the killed worker saw their connection drop, and reconnected.
    assert all(len(a) > 10 for a in acknowledged.values())
    pg.psql(f"DROP TABLE {table};", db=AUTH_DB)


@pytest.mark.timeout(60)
def test_a_stopped_worker_is_killed_at_worker_timeout_and_replaced(pg, proxy_factory):
    config = group_config(pg)
    config["proxy"]["worker_timeout"] = 2.0
    proxy = proxy_factory(config)
    pids = wait_for("both workers started", lambda: (lambda p: p if len(p) == 2 else None)(worker_pids(proxy)))
    os.kill(pids[0], signal.SIGSTOP)
    started = time.monotonic()
    wait_for("worker 0 replaced", lambda: worker_pids(proxy).get(0) != pids[0], timeout=15)
    assert 1.5 < time.monotonic() - started < 8
    log = proxy.log_text()
    assert re.search(rf"worker 0 \(pid {pids[0]}\) sent no heartbeat for [\d.]+ s \(proxy.worker_timeout 2 s\): "
                     "killing it", log), log[-2000:]
    assert f"worker 0 (pid {pids[0]}) killed by signal 9 (SIGKILL)" in log
    # The new worker 0 serves the admin server again, and clients.
    wait_for("the admin server back", lambda: _answers(proxy))
    with app(proxy) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def _answers(proxy) -> bool:
    try:
        return bool(status(proxy))
    except OSError:
        return False


@pytest.mark.timeout(60)
def test_a_worker_killed_again_and_again_is_respawned_with_growing_delays(pg, proxy_factory):
    proxy = proxy_factory(group_config(pg))
    delays = []
    for round_ in range(4):
        pid = wait_for("worker 1 running", lambda: worker_pids(proxy).get(1))
        time.sleep(0.3)
        os.kill(pid, signal.SIGKILL)
        wait_for(f"respawn {round_ + 1}", lambda: worker_pids(proxy).get(1) != pid, timeout=15)
    delays = [float(d) for d in re.findall(r"worker 1 \(pid \d+\) killed by signal 9 \(SIGKILL\) after [\d.]+ s; "
                                           r"respawning it in ([\d.]+) s", proxy.log_text())]
    assert delays == [0.1, 0.2, 0.4, 0.8], delays
    with app(proxy) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


@pytest.mark.timeout(60)
def test_metrics_status_and_show_pools_answer_for_both_workers(pg, proxy_factory):
    proxy = proxy_factory(group_config(pg))
    wait_for("both workers started", lambda: len(worker_pids(proxy)) == 2)
    held = spread_clients(proxy, 12, autocommit=True)
    n = len(held)
    try:
        for conn in held:
            conn.execute("SELECT 1").fetchone()
        sessions = psql_console(proxy, "SHOW CLIENTS")
        workers_seen = {row[-1] for row in sessions if row[1] == ADMIN and row[2] == AUTH_DB}
        assert sum(1 for row in sessions if row[2] == AUTH_DB) == n
        pools = [row for row in psql_console(proxy, "SHOW POOLS") if row[0] == AUTH_DB]
        assert len(pools) == 1, pools            # one row per pool, summed over the workers
        assert int(pools[0][2]) + int(pools[0][3]) == n
        text = metrics_text(proxy)
        assert metric(text, "multiproxy_client_connections", listener="pg") >= n
        assert metric(text, "multiproxy_worker_up", worker="0") == 1
        assert metric(text, "multiproxy_worker_up", worker="1") == 1
        assert metric(text, "multiproxy_worker_restarts_total", worker="1") == 0
        assert len(re.findall(r'^multiproxy_client_connections\{listener="pg"\}', text, re.M)) == 1
        host, port = proxy.admin_address
        with urllib.request.urlopen(f"http://{host}:{port}/admin/pools?format=objects", timeout=TIMEOUT) as answer:
            rows = [row for row in json.load(answer)["rows"] if row["database"] == AUTH_DB]
        assert len(rows) == 1 and rows[0]["cl_active"] + rows[0]["cl_waiting"] == n, rows
        snapshot = status(proxy)
        assert snapshot["listeners"][0]["clients"] >= n
        assert [w["up"] for w in snapshot["workers"]] == [1, 1]
        shown = subprocess.run([sys.executable, "-m", "multiproxy", "status", "--admin", "%s:%d" % (host, port)],
                               capture_output=True, text=True, timeout=TIMEOUT, check=True).stdout
        assert re.search(rf"^listener pg .* clients={n}$", shown, re.M), shown
        assert re.findall(r"^worker (\d) pid=\d+ up=1 restarts=0 answered=yes$", shown, re.M) == ["0", "1"], shown
        assert workers_seen == {"0", "1"}
    finally:
        for conn in held:
            conn.close()


@pytest.mark.timeout(90)
def test_clients_connecting_one_by_one_or_all_at_once_are_shared_evenly_by_the_workers(pg, proxy_factory):
    """The workers share the listening socket; without the accept balance (multiproxy.balance) one worker took 27
    of 30 clients. Each worker publishes its client count and the busier one defers accepting."""
    proxy = proxy_factory(group_config(pg))
    wait_for("both workers started", lambda: len(worker_pids(proxy)) == 2)

    def per_worker() -> list[int]:
        on = [row[-1] for row in psql_console(proxy, "SHOW CLIENTS") if row[2] == AUTH_DB]
        return sorted([on.count("0"), on.count("1")])

    one_by_one = [app(proxy, autocommit=True) for _ in range(20)]
    try:
        low, high = per_worker()
        assert low + high == 20 and high - low <= 4, (low, high)
        at_once: list = []
        failures: list = []

        def connect():
            try:
                at_once.append(app(proxy, autocommit=True))
            except Exception as exc:        # counted below: every client must connect
                failures.append(exc)

        threads = [threading.Thread(target=connect) for _ in range(20)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(TIMEOUT)
        try:
            assert not failures and len(at_once) == 20
            low, high = per_worker()
            assert low + high == 40 and high - low <= 8, (low, high)
            for conn in at_once:
                assert conn.execute("SELECT 1").fetchone() == (1,)
        finally:
            for conn in at_once:
                conn.close()
    finally:
        for conn in one_by_one:
            conn.close()


@pytest.mark.timeout(90)
def test_two_workers_open_at_most_max_size_backends_together(pg, proxy_factory):
    proxy = proxy_factory(group_config(pg, max_size=3, borrow_timeout=20.0))
    wait_for("both workers started", lambda: len(worker_pids(proxy)) == 2)
    peak = [0]
    errors = []
    stop = threading.Event()

    def watch():
        with server_connection(pg) as conn:
            while not stop.is_set():
                peak[0] = max(peak[0], conn.execute(BACKENDS, (AUTH_DB,)).fetchone()[0])
                time.sleep(0.005)

    conns = spread_clients(proxy, 12, each=3)

    def client(i):
        try:
            for _ in range(8):
                with conns[i].transaction():
                    conns[i].execute("SELECT pg_sleep(0.05)")
        except psycopg.Error as exc:
            errors.append(repr(exc))

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    clients = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(len(conns))]
    for thread in clients:
        thread.start()
    for thread in clients:
        thread.join(60)
    stop.set()
    watcher.join(5)
    for conn in conns:
        conn.close()
    assert errors == []
    assert 1 <= peak[0] <= 3, peak[0]
    assert len(psql_console(proxy, "SHOW SERVERS")) <= 3
    assert backend_count(pg) <= 3
    text = metrics_text(proxy)
    assert metric(text, "multiproxy_database_connection_borrow_timeouts_total", database=AUTH_DB) == 0


@pytest.mark.timeout(60)
def test_a_console_reload_reaches_every_worker_and_systemd_hears_ready_after_both(pg, proxy_factory, tmp_path):
    name = f"multiproxy-sup-{os.getpid()}-{time.monotonic_ns()}"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind("\0" + name)
    notify.settimeout(TIMEOUT)
    try:
        config = group_config(pg)
        proxy = proxy_factory(config, env={"NOTIFY_SOCKET": "@" + name})
        assert b"READY=1" in notify.recv(4096)
        config["clusters"]["main"]["pool"]["max_size"] = 4
        proxy.config_text = proxy.config_text.replace("max_size = 5", "max_size = 4")
        proxy.write_file("multiproxy.toml", proxy.config_text)
        psql_console(proxy, "RELOAD")         # lands on one worker; the supervisor has every worker reload
        assert b"RELOADING=1" in notify.recv(4096)
        message = notify.recv(4096)
        log = proxy.log_text()
        assert b"READY=1" in message, message
        # READY=1 came once both workers had applied the change (each logs it before acknowledging).
        for worker in (0, 1):
            assert f"reload (worker {worker}): 1 change(s) applied" in log, log[-3000:]
        assert log.count("clusters.main.pool.max_size: 5 -> 4") == 2
    finally:
        notify.close()


@pytest.mark.timeout(90)
def test_cancels_cross_workers_after_a_respawn_and_a_dead_workers_key_is_counted_ignored(pg, proxy_factory):
    proxy = proxy_factory(group_config(pg, max_size=80))
    pids = wait_for("both workers started", lambda: (lambda p: p if len(p) == 2 else None)(worker_pids(proxy)))
    os.kill(pids[1], signal.SIGKILL)
    wait_for("worker 1 respawned", lambda: worker_pids(proxy).get(1) != pids[1])
    wait_for("worker 1 answers", lambda: metric(metrics_text(proxy), "multiproxy_worker_up", worker="1") == 1)
    conns = spread_clients(proxy, 8, each=3, autocommit=True)
    try:
        on = {row[-1] for row in psql_console(proxy, "SHOW CLIENTS") if row[2] == AUTH_DB}
        assert on == {"0", "1"}, on
        cancelled = []

        def sleeper(conn):
            try:
                conn.execute("SELECT pg_sleep(20)")
            except psycopg.errors.QueryCanceled:
                cancelled.append(conn)

        threads = [threading.Thread(target=sleeper, args=(conn,), daemon=True) for conn in conns]
        for thread in threads:
            thread.start()
        wait_for("all sleeping", lambda: len([r for r in psql_console(proxy, "SHOW SERVERS")
                                              if r[4] == "active"]) == len(conns))
        started = time.monotonic()
        for conn in conns:
            conn.cancel()      # a new connection: it lands on either worker
        for thread in threads:
            thread.join(TIMEOUT)
        assert len(cancelled) == len(conns) and time.monotonic() - started < 5
        before = metric(metrics_text(proxy), "multiproxy_cancel_requests_total", outcome="ignored") or 0
        # A key issued by worker 1's previous process: worker 1 does not know it, and says so.
        with socket.create_connection((proxy.host, proxy.port), timeout=TIMEOUT) as sock:
            sock.sendall((16).to_bytes(4, "big") + (80877102).to_bytes(4, "big") + ((1 << 24) | 4321).to_bytes(4, "big")
                         + (12345).to_bytes(4, "big"))
            sock.settimeout(TIMEOUT)
            assert sock.recv(16) == b""
        wait_for("the stale cancel counted", lambda: (metric(metrics_text(proxy), "multiproxy_cancel_requests_total",
                                                             outcome="ignored") or 0) == before + 1)
    finally:
        for conn in conns:
            conn.close()


def _worker_of(proxy, conn) -> str:
    """The worker serving a psycopg connection (SHOW CLIENTS, matched on the client's port)."""
    port = socket.socket(fileno=os.dup(conn.pgconn.socket)).getsockname()[1]
    rows = psql_console(proxy, "SHOW CLIENTS")
    return next(row[-1] for row in rows if int(row[6]) == port)


@pytest.mark.timeout(60)
def test_idle_connections_of_one_worker_make_room_for_a_waiter_of_the_other(pg, proxy_factory):
    proxy = proxy_factory(group_config(pg, max_size=2, borrow_timeout=5.0))
    wait_for("both workers started", lambda: len(worker_pids(proxy)) == 2)
    conns = spread_clients(proxy, 4)
    try:
        by_worker: dict[str, list] = {}
        for conn in conns:
            by_worker.setdefault(_worker_of(proxy, conn), []).append(conn)
        assert set(by_worker) == {"0", "1"} and len(by_worker["0"]) >= 2, {k: len(v) for k, v in by_worker.items()}
        first, second = by_worker["0"][:2]
        for conn in (first, second):          # two transactions at once: worker 0 opens both slots of max_size 2
            conn.execute("SELECT 1")
        first.commit()
        second.commit()
        servers = psql_console(proxy, "SHOW SERVERS")
        assert sorted((row[4], row[-1]) for row in servers) == [("idle", "0"), ("idle", "0")], servers
        started = time.monotonic()
        other = by_worker["1"][0]
        assert other.execute("SELECT 2").fetchone() == (2,)     # worker 1 gets a slot: worker 0 closed an idle one
        other.commit()
        assert time.monotonic() - started < 3
        assert backend_count(pg) <= 2
        assert sorted(row[-1] for row in psql_console(proxy, "SHOW SERVERS")) == ["0", "1"]
    finally:
        for conn in conns:
            conn.close()


EXPORTER = "/usr/bin/prometheus-pgbouncer-exporter"


@pytest.mark.timeout(90)
@pytest.mark.skipif(not os.path.exists(EXPORTER), reason="Debian's prometheus-pgbouncer-exporter is not installed "
                    "(tools/install-deps.sh installs it)")
def test_prometheus_pgbouncer_exporter_counts_the_clients_of_both_workers(pg, proxy_factory, tmp_path):
    proxy = proxy_factory(group_config(pg))
    clients = spread_clients(proxy, 12, autocommit=True)
    port = free_port()
    log_path = tmp_path / "exporter.log"
    try:
        for conn in clients:
            conn.execute("SELECT 1").fetchall()
        assert {row[-1] for row in psql_console(proxy, "SHOW CLIENTS") if row[2] == AUTH_DB} == {"0", "1"}
        with open(log_path, "wb") as log:
            exporter = subprocess.Popen(
                [EXPORTER, "--host", "127.0.0.1", "--port", str(port), "--pgbouncer-host", proxy.host,
                 "--pgbouncer-port", str(proxy.port), "--pgbouncer-user", ADMIN],
                stdout=log, stderr=subprocess.STDOUT, env={"PATH": "/usr/bin:/bin", "PGCONNECT_TIMEOUT": "10"})
        try:
            def scrape():
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=TIMEOUT) as resp:
                        text = resp.read().decode()
                        return text if "pgbouncer_active_clients" in text else None
                except OSError:
                    return None
            text = wait_for("the exporter's metrics", scrape, timeout=30, interval=0.2)
            found = re.findall(rf'^pgbouncer_active_clients{{database="{AUTH_DB}",user="{ADMIN}"}} (\S+)$', text, re.M)
            assert [float(value) for value in found] == [float(len(clients))], text
            assert re.search(r"^pgbouncer_pools (\S+)$", text, re.M).group(1) == "1.0"
        finally:
            exporter.terminate()
            exporter.wait(10)
    finally:
        for conn in clients:
            conn.close()


@pytest.mark.timeout(90)
def test_pgbench_through_a_worker_kill_every_processed_transaction_is_stored(pg, proxy_factory, tmp_path):
    """pgbench's clients on the killed worker abort (pgbench does not reconnect), the others go on; every
    transaction pgbench counts as processed (its COMMIT answered) is in the table."""
    table = "sup_pgbench"
    pg.psql(f"DROP TABLE IF EXISTS {table}; CREATE TABLE {table} (id bigserial PRIMARY KEY, client int);"
            f"GRANT ALL ON {table} TO {ADMIN}; GRANT ALL ON SEQUENCE {table}_id_seq TO {ADMIN};", db=AUTH_DB)
    proxy = proxy_factory(group_config(pg, max_size=6))
    pids = wait_for("both workers started", lambda: (lambda p: p if len(p) == 2 else None)(worker_pids(proxy)))
    script = tmp_path / "insert.sql"
    script.write_text(f"BEGIN;\nINSERT INTO {table} (client) VALUES (:client_id);\nCOMMIT;\n")
    bench = subprocess.Popen(["pgbench", "-n", "-h", proxy.host, "-p", str(proxy.port), "-U", ADMIN, "-c", "8",
                              "-T", "6", "-f", str(script), AUTH_DB], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    time.sleep(2.5)
    os.kill(pids[1], signal.SIGKILL)
    out, _ = bench.communicate(timeout=60)
    processed = int(re.search(r"number of transactions actually processed: (\d+)", out).group(1))
    stored = int(pg.psql(f"SELECT count(*) FROM {table};", db=AUTH_DB).strip())
    assert processed > 100, out
    # A transaction whose COMMIT was sent when the worker died may be stored without pgbench counting it:
    # stored >= processed, and never fewer.
    assert stored >= processed, (stored, processed, out)
    assert wait_for("worker 1 respawned", lambda: worker_pids(proxy).get(1) != pids[1])
    pg.psql(f"DROP TABLE {table};", db=AUTH_DB)


@pytest.mark.timeout(90)
def test_the_cluster_cap_holds_for_the_group(pg, proxy_factory):
    """max_cluster_connections = 2 over two pools (two databases), each max_size 3, 12 clients on two workers:
    the server never sees more than 2 of the cluster's connections, and every client gets served."""
    config = group_config(pg, max_size=3, borrow_timeout=30.0)
    config["clusters"]["main"]["pool"]["max_cluster_connections"] = 2
    proxy = proxy_factory(config)
    wait_for("both workers started", lambda: len(worker_pids(proxy)) == 2)
    peak = [0]
    errors = []
    stop = threading.Event()

    def watch():
        with server_connection(pg) as conn:
            while not stop.is_set():
                peak[0] = max(peak[0], sum(conn.execute(BACKENDS, (db,)).fetchone()[0] for db in (AUTH_DB, "postgres")))
                time.sleep(0.005)

    def client(i):
        try:
            with psycopg.connect(host=proxy.host, port=proxy.port, user=ADMIN, dbname=(AUTH_DB, "postgres")[i % 2],
                                 connect_timeout=TIMEOUT) as conn:
                for _ in range(10):
                    with conn.transaction():
                        conn.execute("SELECT pg_sleep(0.01)")
        except psycopg.Error as exc:
            errors.append(repr(exc))

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    clients = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(12)]
    for thread in clients:
        thread.start()
    for thread in clients:
        thread.join(60)
    stop.set()
    watcher.join(5)
    assert errors == []
    assert 1 <= peak[0] <= 2, peak[0]
    text = metrics_text(proxy)
    assert metric(text, "multiproxy_cluster_connections_max", cluster="main", role="writer") == 2
    assert metric(text, "multiproxy_cluster_connections", cluster="main", role="writer") <= 2


MYSQL_BUDGET_USER, MYSQL_BUDGET_PASSWORD = "mp_group_budget", "group-budget-pw"


def admin_rows(proxy, view: str) -> list[dict]:
    host, port = proxy.admin_address
    with urllib.request.urlopen(f"http://{host}:{port}/admin/{view}?format=objects", timeout=TIMEOUT) as answer:
        return json.load(answer)["rows"]


@pytest.mark.timeout(120)
def test_two_mysql_workers_open_at_most_max_size_backends_together(mariadb, proxy_factory):
    import pymysql

    from .mysqlkit import APP_PASSWORD, APP_USER, DB, mysql_config, users_toml
    mariadb.sql(f"CREATE USER IF NOT EXISTS '{MYSQL_BUDGET_USER}'@'%' IDENTIFIED BY '{MYSQL_BUDGET_PASSWORD}';"
                f"GRANT ALL ON {DB}.* TO '{MYSQL_BUDGET_USER}'@'%';")
    config = mysql_config(mariadb, max_size=3, borrow_timeout=30.0, backend_user=MYSQL_BUDGET_USER,
                          backend_password=MYSQL_BUDGET_PASSWORD, proxy={"workers": 2})
    proxy = proxy_factory(config, files={"users.toml": users_toml()})
    wait_for("both workers started", lambda: len(worker_pids(proxy)) == 2)

    def client():
        return pymysql.connect(host=proxy.host, port=proxy.port, user=APP_USER, password=APP_PASSWORD, database=DB,
                               autocommit=True, connect_timeout=TIMEOUT, read_timeout=60)
    conns = []
    while len(conns) < 80:
        conns.append(client())
        workers = [row["worker"] for row in admin_rows(proxy, "clients") if row["database"] == DB]
        if len(conns) >= 12 and min(workers.count(0), workers.count(1)) >= 3:
            break
    assert len(conns) < 80, "the clients all went to one worker"
    watch = pymysql.connect(host=mariadb.host, port=mariadb.port, user="root", password="", connect_timeout=TIMEOUT,
                            autocommit=True)
    peak, errors, stop = [0], [], threading.Event()

    def watcher():
        with watch.cursor() as cur:
            while not stop.is_set():
                cur.execute("SELECT count(*) FROM information_schema.processlist WHERE user = %s",
                            (MYSQL_BUDGET_USER,))
                peak[0] = max(peak[0], cur.fetchone()[0])
                time.sleep(0.005)

    def work(conn):
        try:
            with conn.cursor() as cur:
                for _ in range(8):
                    cur.execute("BEGIN")
                    cur.execute("SELECT SLEEP(0.05)")
                    cur.execute("COMMIT")
        except pymysql.Error as exc:
            errors.append(repr(exc))

    watching = threading.Thread(target=watcher, daemon=True)
    watching.start()
    threads = [threading.Thread(target=work, args=(conn,), daemon=True) for conn in conns]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(90)
    stop.set()
    watching.join(5)
    watch.close()
    for conn in conns:
        conn.close()
    assert errors == []
    assert 1 <= peak[0] <= 3, peak[0]
    servers = admin_rows(proxy, "servers")
    assert len(servers) <= 3 and {row["worker"] for row in servers} <= {0, 1}


@pytest.mark.timeout(60)
def test_sigterm_lets_every_worker_finish_its_transactions_and_respawns_none(pg, proxy_factory):
    config = group_config(pg)
    config["proxy"]["shutdown_timeout"] = 10.0
    proxy = proxy_factory(config)
    clients = spread_clients(proxy, 2, each=1)
    one_each = {}
    for conn in clients:
        one_each.setdefault(_worker_of(proxy, conn), conn)
    for conn in clients:
        if conn not in one_each.values():
            conn.close()
    conns = list(one_each.values())
    for conn in conns:
        conn.execute("SELECT 1")          # a transaction open on each worker
    proxy.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    with pytest.raises(OSError):          # the listener is gone at once: no new client queues for nobody
        socket.create_connection((proxy.host, proxy.port), timeout=2).close()
    for conn in conns:                    # the open transactions finish
        assert conn.execute("SELECT 2").fetchone() == (2,)
        conn.commit()
        conn.close()
    assert proxy._proc.wait(15) == 0
    log = proxy.log_text()
    assert "SIGTERM received: every worker drains its clients" in log
    assert "respawning" not in log and log.count("exited with status 0") == 2, log[-2000:]


WORKER_FAILS_TO_START = """
import logging, sys
from gevent import monkey
monkey.patch_all()
from multiproxy.cli import _load_config
from multiproxy import supervisor
from multiproxy.proxy import _run_worker, make_listen_socket
logging.basicConfig(level="INFO", stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
config, engines = _load_config(sys.argv[1])

def run_worker(config, engines, index, sockets, group, **kwargs):
    if index == 1:
        raise OSError(98, "this worker cannot start")
    return _run_worker(config, engines, index, sockets, group, **kwargs)

sys.exit(supervisor.run(config, engines, 2, run_worker, make_listen_socket))
"""


@pytest.mark.timeout(60)
def test_a_worker_that_cannot_start_stops_the_group_instead_of_respawning(pg, tmp_path):
    from .proxy import REPO_ROOT, render_toml
    config = group_config(pg)
    config["proxy"]["shutdown_timeout"] = 1.0
    path = tmp_path / "multiproxy.toml"
    path.write_text(render_toml(config))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (REPO_ROOT, os.environ.get("PYTHONPATH")) if p)}
    done = subprocess.run([sys.executable, "-c", WORKER_FAILS_TO_START, str(path)], capture_output=True, text=True,
                          timeout=30, env=env)
    assert done.returncode == 1, done.stderr[-3000:]
    assert "worker 1 failed: [Errno 98] this worker cannot start" in done.stderr
    assert re.search(r"worker 1 \(pid \d+\) could not start \(exited with status 1\): stopping", done.stderr)
    assert "respawning" not in done.stderr
    assert "worker 0 (pid" in done.stderr      # worker 0 was stopped (drained), not left behind


@pytest.mark.timeout(60)
def test_a_worker_that_does_not_answer_is_reported_down_and_blocks_no_answer(pg, proxy_factory):
    proxy = proxy_factory(group_config(pg))
    conns = spread_clients(proxy, 4, autocommit=True)
    pids = worker_pids(proxy)
    on_zero = [row for row in psql_console(proxy, "SHOW CLIENTS") if row[2] == AUTH_DB and row[-1] == "0"]
    os.kill(pids[1], signal.SIGSTOP)       # alive, but answers nothing (its heartbeat stops: worker_timeout is 30 s)
    try:
        started = time.monotonic()
        text = metrics_text(proxy)
        assert time.monotonic() - started < 5
        assert metric(text, "multiproxy_worker_up", worker="1") == 0
        assert metric(text, "multiproxy_worker_up", worker="0") == 1
        # New clients go to the worker that accepts (the listening socket is shared): psql gets its answer,
        # with worker 0's clients only.
        started = time.monotonic()
        rows = [row for row in psql_console(proxy, "SHOW CLIENTS") if row[2] == AUTH_DB]
        assert time.monotonic() - started < 6
        assert {row[-1] for row in rows} == {"0"} and len(rows) == len(on_zero)
        assert "SHOW CLIENTS: worker 1 did not answer; its rows are missing" in proxy.log_text()
    finally:
        os.kill(pids[1], signal.SIGCONT)
        for conn in conns:
            conn.close()
    snapshot = wait_for("worker 1 answering again", lambda: (lambda s: s if [w["up"] for w in s["workers"]] == [1, 1]
                                                              and all(w["answered"] for w in s["workers"]) else None)(
        status(proxy)))
    assert worker_pids(proxy) == pids      # resumed in time: not replaced


@pytest.mark.timeout(60)
def test_a_second_sigterm_while_draining_kills_the_workers(pg, proxy_factory):
    config = group_config(pg)
    config["proxy"]["shutdown_timeout"] = 30.0
    proxy = proxy_factory(config)
    conn = app(proxy)
    conn.execute("SELECT 1")              # an open transaction: the drain would wait 30 s for it
    proxy.send_signal(signal.SIGTERM)
    time.sleep(1.5)
    assert proxy.running
    started = time.monotonic()
    proxy.send_signal(signal.SIGTERM)
    code = proxy._proc.wait(10)
    assert time.monotonic() - started < 5 and code == 0
    log = proxy.log_text()
    assert "SIGTERM received again while draining: killing the workers" in log
    # The worker serving the open transaction is killed (the other one, idle, had finished its drain already).
    assert log.count("killed by signal 9 (SIGKILL)") >= 1 and "respawning" not in log, log[-2000:]
    with pytest.raises(psycopg.OperationalError):
        conn.execute("SELECT 2")
    conn.close()


@pytest.mark.timeout(60)
def test_the_slots_of_a_killed_worker_go_back_to_the_group(pg, proxy_factory):
    proxy = proxy_factory(group_config(pg, max_size=2, borrow_timeout=8.0))
    clients = spread_clients(proxy, 4)
    by_worker: dict[str, list] = {}
    for conn in clients:
        by_worker.setdefault(_worker_of(proxy, conn), []).append(conn)
    holders, waiter = by_worker["1"][:2], by_worker["0"][0]
    for conn in holders:                  # worker 1 holds both slots of max_size 2, in open transactions
        conn.execute("SELECT 1")
    assert sorted(row[-1] for row in psql_console(proxy, "SHOW SERVERS")) == ["1", "1"]
    os.kill(worker_pids(proxy)[1], signal.SIGKILL)
    started = time.monotonic()
    assert waiter.execute("SELECT 3").fetchone() == (3,)     # a slot of the dead worker, at once
    waiter.commit()
    assert time.monotonic() - started < 4
    wait_for("the dead worker's backends gone", lambda: backend_count(pg) <= 2)
    for conn in clients:
        conn.close()


@pytest.mark.timeout(60)
def test_listeners_a_reload_adds_or_removes_survive_a_respawn(pg, proxy_factory):
    from .proxy import render_toml
    config = group_config(pg)
    proxy = proxy_factory(config)
    pids = wait_for("both workers started", lambda: (lambda p: p if len(p) == 2 else None)(worker_pids(proxy)))
    extra_port = free_port()
    config["listeners"].append({"name": "extra", "listen": f"127.0.0.1:{extra_port}", "cluster": "main",
                                "auth": "trust"})

    def reload(expected: int):
        proxy.config_text = render_toml(config)
        proxy.write_file("multiproxy.toml", proxy.config_text)
        proxy.send_signal(signal.SIGHUP)
        wait_for("both workers reloaded", lambda: proxy.log_text().count("change(s) applied") == expected)

    def query(port: int):
        with psycopg.connect(host="127.0.0.1", port=port, user=ADMIN, dbname=AUTH_DB, connect_timeout=TIMEOUT) as c:
            return c.execute("SELECT 7").fetchone()

    reload(2)
    os.kill(pids[1], signal.SIGKILL)
    wait_for("worker 1 respawned", lambda: worker_pids(proxy).get(1) != pids[1])
    wait_for("worker 1 serving", lambda: proxy.log_text().count("multiproxy worker 1 ready") == 2)
    assert "cannot listen" not in proxy.log_text()
    assert all(query(extra_port) == (7,) for _ in range(10))
    old_port = proxy.port
    config["listeners"] = [lc for lc in config["listeners"] if lc["name"] != "pg"]
    reload(4)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", old_port), timeout=2).close()
    assert query(extra_port) == (7,)


@pytest.mark.timeout(90)
def test_show_events_lists_what_every_worker_records_once(pg, proxy_factory):
    # Two hosts make a registry in each worker: both see the writer chosen, and both run the console's PAUSE.
    config = group_config(pg)
    config["clusters"]["main"]["hosts"].append(f"127.0.0.1:{free_port()}")
    config["clusters"]["main"]["health"] = {"probe_user": SUPERUSER}
    proxy = proxy_factory(config)
    wait_for("both workers started", lambda: len(worker_pids(proxy)) == 2)
    with app(proxy, autocommit=True) as conn:
        conn.execute("SELECT 1").fetchone()
    psql_console(proxy, "PAUSE")
    psql_console(proxy, "RESUME")
    rows = psql_console(proxy, "SHOW EVENTS")
    writer = [row for row in rows if row[1] == "registry.writer"]
    assert len(writer) == 1 and writer[0][-1] == "all", rows
    assert [row[-1] for row in rows if row[1] in ("pause", "resume")] == ["all", "all"], rows
    host, port = proxy.admin_address
    with urllib.request.urlopen(f"http://{host}:{port}/admin/events?format=objects", timeout=TIMEOUT) as answer:
        objects = json.load(answer)["rows"]
    assert [(o["event"], o["workers"]) for o in objects if o["event"] in ("registry.writer", "pause", "resume")] == \
        [("registry.writer", "all"), ("pause", "all"), ("resume", "all")], objects


def on_worker(proxy, conn) -> int:
    """The worker serving a client connection, from SHOW CLIENTS (its port) through the console."""
    with socket.socket(fileno=os.dup(conn.pgconn.socket)) as sock:
        port = sock.getsockname()[1]
    rows = psql_console(proxy, "SHOW CLIENTS")
    return next(int(row[-1]) for row in rows if row[6] == str(port))


def serving_workers(proxy) -> list[int]:
    return [w["worker"] for w in status(proxy)["workers"] if w["up"]]


@pytest.mark.timeout(120)
def test_sigttin_adds_a_worker_and_sigttou_removes_one_down_to_the_last(pg, proxy_factory):
    proxy = proxy_factory(group_config(pg))
    wait_for("both workers started", lambda: len(worker_pids(proxy)) == 2)
    wait_for("both workers serving", lambda: serving_workers(proxy) == [0, 1])

    proxy.send_signal(signal.SIGTTIN)
    wait_for("worker 2 serving", lambda: serving_workers(proxy) == [0, 1, 2])
    assert "SIGTTIN received: worker 2 added (3 workers)" in proxy.log_text()
    wait_for("/metrics lists worker 2 up", lambda: metric(metrics_text(proxy), "multiproxy_worker_up", worker="2") == 1)
    conns = []
    try:
        while not any(on_worker(proxy, conn) == 2 for conn in conns[-1:]):
            assert len(conns) < 60, "60 connections and none went to worker 2"
            conns.append(app(proxy, autocommit=True))
        leaving = conns[-1]
        for conn in conns:
            conn.execute("SELECT 1").fetchone()

        # A request under way on the worker SIGTTOU removes finishes; then that client moves to another worker,
        # and the others go on.
        finished = []
        sleeper = threading.Thread(target=lambda: finished.append(
            leaving.execute("SELECT pg_sleep(1.5), 'done'").fetchone()[1]))
        sleeper.start()
        time.sleep(0.5)
        proxy.send_signal(signal.SIGTTOU)
        sleeper.join(TIMEOUT)
        assert finished == ["done"]
        wait_for("worker 2 gone", lambda: serving_workers(proxy) == [0, 1])
        assert re.search(r"worker 2 \(pid \d+\) stopped after SIGTTOU", proxy.log_text())
        assert leaving.execute("SELECT 1").fetchone() == (1,)
        assert on_worker(proxy, leaving) in (0, 1)
        assert [w["worker"] for w in status(proxy)["workers"]] == [0, 1]

        proxy.send_signal(signal.SIGTTOU)
        wait_for("one worker left", lambda: [w["worker"] for w in status(proxy)["workers"]] == [0])
        proxy.send_signal(signal.SIGTTOU)
        wait_for("the last worker stays", lambda: "is the last one and stays" in proxy.log_text())
        assert serving_workers(proxy) == [0]
        text = metrics_text(proxy)
        assert metric(text, "multiproxy_worker_up", worker="0") == 1
        assert not re.search(r'^multiproxy_worker_up\{worker="[12]"\}', text, re.M), text
        for _ in range(5):
            with app(proxy, autocommit=True) as conn:
                assert conn.execute("SELECT 1").fetchone() == (1,)
        assert {row[-1] for row in psql_console(proxy, "SHOW CLIENTS")} <= {"0"}

        proxy.send_signal(signal.SIGTTIN)      # and back up: index 1 again
        wait_for("worker 1 serving again", lambda: serving_workers(proxy) == [0, 1])
    finally:
        for conn in conns:
            conn.close()


def pg_key_pid(conn) -> int:
    """The pid of the cancel key the proxy gave a psycopg client (its high byte names the worker that issued it)."""
    return conn.info.backend_pid


def prepared_client(proxy, name: str) -> psycopg.Connection:
    """A client with a session setting and a server-side prepared statement."""
    conn = app(proxy, autocommit=True)
    conn.execute(f"SET application_name = '{name}'")
    assert conn.pgconn.prepare(b"tripled", b"SELECT $1::int * 3").status == psycopg.pq.ExecStatus.COMMAND_OK
    return conn


def check_prepared_client(conn, name: str) -> None:
    assert conn.execute("SHOW application_name").fetchone()[0] == name
    result = conn.pgconn.exec_prepared(b"tripled", [b"14"])
    assert result.status == psycopg.pq.ExecStatus.TUPLES_OK and result.get_value(0, 0) == b"42"
    assert conn.execute("SELECT 7").fetchone() == (7,)


@pytest.mark.timeout(300)
def test_sigttou_hands_the_retired_workers_clients_to_the_least_loaded_others(pg, proxy_factory):
    """workers = 3: SIGTTOU retires worker 2, whose idle clients move to workers 0 and 1 (the least loaded first)
    with their settings and prepared statements, and a client mid-transaction commits, then moves. Cancels reach the
    moved clients (their keys name index 2), also after a kill -9 of their new worker (whose custody resumes them:
    the supervisor's duplicates moved to its book) and after a SIGTTIN started index 2 again, whose keys differ."""
    from .test_custody import client_workers, kill_worker
    from .test_takeover import local_port
    from .test_takeover import cancel_works
    config = group_config(pg, workers=3)
    config["proxy"]["takeover_drain_timeout"] = 30.0
    proxy = proxy_factory(config, startup_timeout=60)
    wait_for("three workers serving", lambda: serving_workers(proxy) == [0, 1, 2], 30)
    pg.psql(f"DROP TABLE IF EXISTS ttou_moves; CREATE TABLE ttou_moves (i int); GRANT ALL ON ttou_moves TO {ADMIN};",
            db=AUTH_DB)
    conns, names = [], {}
    try:
        while True:
            assert len(conns) < 80, "80 connections and the workers did not all get 3"
            conn = prepared_client(proxy, f"client-{len(conns)}")
            conns.append(conn)
            names[conn] = f"client-{len(conns) - 1}"
            if len(conns) >= 9:
                on = client_workers(proxy)
                before = {conn: on[local_port(conn.pgconn.socket)] for conn in conns}
                if all(list(before.values()).count(str(w)) >= 3 for w in range(3)):
                    break
        movers = [conn for conn in conns if before[conn] == "2"]
        assert all(pg_key_pid(conn) >> 24 == 2 for conn in movers)
        in_transaction = movers[0]
        in_transaction.execute("BEGIN")
        in_transaction.execute("INSERT INTO ttou_moves VALUES (1)")
        counts = {w: list(before.values()).count(str(w)) for w in (0, 1)}

        proxy.send_signal(signal.SIGTTOU)
        # The idle ones move at once; the one in its transaction waits for its commit.
        wait_for("the idle clients of worker 2 moved",
                 lambda: list(client_workers(proxy).values()).count("2") == 1, 30)
        assert in_transaction.execute("SELECT count(*) FROM ttou_moves").fetchone() == (1,)
        in_transaction.execute("COMMIT")
        wait_for("worker 2 gone", lambda: serving_workers(proxy) == [0, 1], 30)
        log = proxy.log_text()
        assert re.search(r"worker 2 \(pid \d+\) stopped after SIGTTOU: exited with status 0", log), log[-3000:]
        assert re.search(rf"worker 2 \(SIGTTOU\): handed {len(movers)} clients to the other workers; 0 stay", log)
        after = client_workers(proxy)
        assert sorted(after) == sorted(local_port(conn.pgconn.socket) for conn in conns)   # nobody was closed
        assert set(after.values()) <= {"0", "1"}
        for conn in conns:
            check_prepared_client(conn, names[conn])
        assert pg.psql("SELECT count(*) FROM ttou_moves;", db=AUTH_DB).strip() == "1"
        # The least loaded first: the moved clients even the counts out as far as they go.
        final = {w: list(after.values()).count(str(w)) for w in (0, 1)}
        assert abs(final[0] - final[1]) <= max(2, abs(counts[0] - counts[1]) - len(movers) + 1), (counts, final)
        if len(movers) >= abs(counts[0] - counts[1]) + 3:
            assert all(final[w] > counts[w] for w in (0, 1)), (counts, final)
        for conn in movers:
            cancel_works(conn)

        # Custody moved with them: a kill -9 of the worker serving a moved client resumes it there.
        target = int(after[local_port(movers[0].pgconn.socket)])
        time.sleep(0.5)         # a worker marks a client idle just after it sent the answer (multiproxy.custody)
        resumed, closed = kill_worker(proxy, target)
        assert closed == 0 and resumed == final[target], (resumed, final)
        for conn in conns:
            check_prepared_client(conn, names[conn])
        wait_for("the respawned worker serving", lambda: serving_workers(proxy) == [0, 1], 30)
        for conn in movers:
            cancel_works(conn)

        # Index 2 again: its keys come after those of the clients it had, whose cancels still reach them.
        proxy.send_signal(signal.SIGTTIN)
        wait_for("worker 2 serving again", lambda: serving_workers(proxy) == [0, 1, 2], 30)
        fresh = []
        while not any(client_workers(proxy).get(local_port(conn.pgconn.socket)) == "2" for conn in fresh):
            assert len(fresh) < 60, "60 connections and none went to the new worker 2"
            fresh.append(app(proxy, autocommit=True))
        conns += fresh
        newcomer = next(conn for conn in fresh if client_workers(proxy)[local_port(conn.pgconn.socket)] == "2")
        assert pg_key_pid(newcomer) >> 24 == 2
        assert pg_key_pid(newcomer) not in {pg_key_pid(conn) for conn in movers}
        cancel_works(newcomer)
        for conn in movers:
            cancel_works(conn)
            check_prepared_client(conn, names[conn])
    finally:
        for conn in conns:
            conn.close()


@pytest.mark.timeout(120)
def test_sigttou_leaves_a_pinned_client_with_the_retiring_worker_until_the_drain_ends(pg, proxy_factory):
    """A pinned client (LISTEN) cannot move: it stays with the retiring worker for proxy.takeover_drain_timeout, then
    gets the shutting-down error of a graceful stop; the idle clients of that worker moved meanwhile."""
    from .test_custody import client_workers
    from .test_takeover import local_port
    config = group_config(pg)
    config["proxy"]["takeover_drain_timeout"] = 3.0
    proxy = proxy_factory(config)
    wait_for("both workers serving", lambda: serving_workers(proxy) == [0, 1], 30)
    conns = []
    try:
        while True:
            assert len(conns) < 60, "60 connections and worker 1 did not get 3"
            conns.append(prepared_client(proxy, f"client-{len(conns)}"))
            on = client_workers(proxy)
            retiring = [conn for conn in conns if on[local_port(conn.pgconn.socket)] == "1"]
            if len(retiring) >= 3:
                break
        pinned = retiring[0]
        pinned.execute("LISTEN ttou_channel")
        proxy.send_signal(signal.SIGTTOU)
        drained = wait_for("worker 1 drained", lambda: re.search(
            r"worker 1 \(SIGTTOU\): handed (\d+) clients to the other workers; (\d+) stay .*; pinned: 1",
            proxy.log_text()), 30)
        assert (int(drained.group(1)), int(drained.group(2))) == (len(retiring) - 1, 1)
        wait_for("worker 1 gone", lambda: serving_workers(proxy) == [0], 30)
        with pytest.raises(psycopg.OperationalError, match="shutting down"):
            pinned.execute("SELECT 1")
        for i, conn in enumerate(conns):
            if conn is not pinned:
                check_prepared_client(conn, f"client-{i}")
    finally:
        for conn in conns:
            conn.close()


def listening_sockets(port: int) -> int:
    """How many listening TCP sockets of this network namespace are bound to `port` (/proc/net/tcp, tcp6)."""
    count = 0
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(path) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":
                    count += 1
    return count


@pytest.mark.timeout(90)
def test_a_listener_a_reload_adds_is_bound_once_and_shared_by_every_worker(pg, proxy_factory):
    from .proxy import render_toml
    config = group_config(pg)
    proxy = proxy_factory(config)
    pids = wait_for("both workers started", lambda: (lambda p: p if len(p) == 2 else None)(worker_pids(proxy)))
    wait_for("both workers serving", lambda: serving_workers(proxy) == [0, 1])
    extra_port = free_port()
    config["listeners"].append({"name": "extra", "listen": f"127.0.0.1:{extra_port}", "cluster": "main",
                                "auth": "trust"})
    proxy.write_file("multiproxy.toml", render_toml(config))
    proxy.send_signal(signal.SIGHUP)
    wait_for("both workers reloaded", lambda: proxy.log_text().count("change(s) applied") == 2)
    assert listening_sockets(extra_port) == 1       # one socket, as the startup listeners: no SO_REUSEPORT copies
    assert listening_sockets(proxy.port) == 1
    workers_seen = set()
    conns = []
    try:
        while workers_seen != {0, 1}:
            assert len(conns) < 60, "60 connections to the added listener and all went to one worker"
            conns.append(psycopg.connect(host="127.0.0.1", port=extra_port, user=ADMIN, dbname=AUTH_DB,
                                         autocommit=True, connect_timeout=TIMEOUT))
            conns[-1].execute("SELECT 1").fetchone()
            workers_seen.add(on_worker(proxy, conns[-1]))
    finally:
        for conn in conns:
            conn.close()
    # A worker killed: the added listener's queue is the supervisor's, so no connection is refused meanwhile.
    loop = ConnectLoop(("127.0.0.1", extra_port))
    loop.start()
    try:
        os.kill(pids[1], signal.SIGKILL)
        wait_for("worker 1 respawned", lambda: worker_pids(proxy).get(1) != pids[1])
        wait_for("worker 1 serving", lambda: proxy.log_text().count("multiproxy worker 1 ready") == 2)
        time.sleep(0.5)
    finally:
        loop.done.set()
        loop.join(TIMEOUT)
    assert loop.attempts > 5 and loop.refused == []
    assert listening_sockets(extra_port) == 1
    assert "cannot listen" not in proxy.log_text()
    with psycopg.connect(host="127.0.0.1", port=extra_port, user=ADMIN, dbname=AUTH_DB, connect_timeout=TIMEOUT) as c:
        assert c.execute("SELECT 7").fetchone() == (7,)


def test_a_lone_process_logs_sigttin_and_sigttou_and_goes_on_serving(pg, proxy_factory):
    proxy = proxy_factory(console_config(pg))
    with app(proxy, autocommit=True) as conn:
        proxy.send_signal(signal.SIGTTIN)
        proxy.send_signal(signal.SIGTTOU)
        wait_for("both logged", lambda: proxy.log_text().count("set it and restart to use them") == 2)
        assert conn.execute("SELECT 1").fetchone() == (1,)
    assert proxy.running
