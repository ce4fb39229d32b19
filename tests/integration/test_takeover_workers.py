"""Takeover with forked workers (multiproxy.group_takeover): a group (supervisor + workers) hands its listeners and
idle clients to a new group or process, and a single process to a new group. Real servers, real clients: the clients'
connections and session state survive, cancels reach the clients wherever they are, zero failures under pgbench.
The same drain and adopt move the MySQL and TDS clients of a worker SIGTTOU retires to the other workers."""
from __future__ import annotations

import re
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
from .proxy import ProxyProcess
from .test_takeover import (CONNECT_TIMEOUT, PGBENCH_CLIENTS, PGBENCH_TRANSACTIONS, USER, cancel_works, client_env,
                            local_port, my_config, pg_config, tds_files, tds_lab, tds_setup, took_over, wait_for)

__all__ = ["tds_lab"]       # the module-scoped TDS lab fixture, shared with test_takeover
WORKER_STARTED = re.compile(r"worker (\d+) started \(pid (\d+)\)")


def with_workers(config: dict, workers: int) -> dict:
    config["proxy"]["workers"] = workers
    return config


def pg_connect(proxy) -> psycopg.Connection:
    return psycopg.connect(host=proxy.host, port=proxy.port, user=USER, dbname=AUTH_DB, autocommit=True,
                           connect_timeout=CONNECT_TIMEOUT)


def serving_workers(proxy) -> set[int]:
    """The pids of the workers a group's supervisor started, from its log."""
    return {int(pid) for _, pid in WORKER_STARTED.findall(proxy.log_text())}


def start_new(old: ProxyProcess, tmp_path, workers: int | None, name: str = "new", env=None) -> ProxyProcess:
    """`multiproxy run --takeover` with the old process's config, its workers set to `workers` (None: as is)."""
    text = old.config_text
    if workers is not None:
        text = re.sub(r"(?m)^workers = \d+\n", "", text).replace("[proxy]\n", f"[proxy]\nworkers = {workers}\n", 1)
    return ProxyProcess(text, workdir=str(tmp_path / name), files=old.files, env=env,
                        argv=[sys.executable, "-m", "multiproxy", "run", "--takeover", "-c"], startup_timeout=60)


def take_over_with(old: ProxyProcess, tmp_path, workers: int | None, name: str = "new") -> ProxyProcess:
    new = start_new(old, tmp_path, workers, name).start()
    assert wait_for(lambda: "took over" in new.log_text() or not new.running, 60), new.log_tail()
    assert new.running, new.log_tail()
    assert wait_for(lambda: not old.running, 60), old.log_tail()
    assert old.stop() == 0, old.log_tail()
    return new


def pg_session(proxy, name: str):
    """A psycopg client with a setting, a named prepared statement and its proxy-issued cancel key (backend pid)."""
    conn = pg_connect(proxy)
    conn.execute(f"SET application_name = '{name}'")
    conn.execute("SET statement_timeout = '23456ms'")
    result = conn.pgconn.prepare(b"tripled", b"SELECT $1::int * 3")
    assert result.status == psycopg.pq.ExecStatus.COMMAND_OK
    return conn, local_port(conn.pgconn.socket), conn.info.backend_pid


def check_pg_session(conn, name: str, port: int, key_pid: int) -> None:
    assert local_port(conn.pgconn.socket) == port
    assert conn.execute("SHOW application_name").fetchone()[0] == name
    assert conn.execute("SHOW statement_timeout").fetchone()[0] == "23456ms"
    res = conn.pgconn.exec_prepared(b"tripled", [b"14"])
    assert res.status == psycopg.pq.ExecStatus.TUPLES_OK and res.get_value(0, 0) == b"42"
    assert conn.info.backend_pid == key_pid


# -- PostgreSQL: N -> M workers ---------------------------------------------------------------------------------

@pytest.mark.timeout(180)
@pytest.mark.parametrize("old_workers,new_workers", [(2, 2), (2, 1), (1, 2), (3, 2)])
def test_pg_idle_clients_keep_their_session_across_worker_counts(pg, proxy_factory, tmp_path, old_workers,
                                                                  new_workers):
    old = proxy_factory(with_workers(pg_config(pg, tmp_path), old_workers), startup_timeout=60)
    sessions = [(f"app-{i}", *pg_session(old, f"app-{i}")) for i in range(6)]
    extended = pg8000.native.Connection(USER, host=old.host, port=old.port, database=AUTH_DB, timeout=CONNECT_TIMEOUT)
    extended.run("SET search_path TO pg_catalog, public")
    extended_port = extended._usock.getsockname()[1]
    old_workers_pids = serving_workers(old)

    new = take_over_with(old, tmp_path, new_workers)
    assert took_over(new) == (1, 7)
    if new_workers > 1:
        assert len(serving_workers(new)) == new_workers
        assert not serving_workers(new) & old_workers_pids

    for name, conn, port, key_pid in sessions:
        check_pg_session(conn, name, port, key_pid)
    assert extended._usock.getsockname()[1] == extended_port
    assert extended.run("SHOW search_path") == [["pg_catalog, public"]]
    for _, conn, _, _ in sessions[:3]:
        cancel_works(conn)
    with pg_connect(new) as fresh:                      # new clients: the new side's
        assert fresh.execute("SELECT 3").fetchone()[0] == 3
        cancel_works(fresh)
    # The admin server (its socket moved too) shows the takeover once among the group's events, and the count.
    admin = f"http://{new.admin_address[0]}:{new.admin_address[1]}"
    with urllib.request.urlopen(f"{admin}/admin/events", timeout=10) as page:
        events = page.read().decode()
    assert events.count("takeover") == 1 and "clients=7" in events, events
    with urllib.request.urlopen(f"{admin}/metrics", timeout=10) as page:
        assert 'multiproxy_takeover_clients_total{side="taken_over"} 7.0' in page.read().decode()
    for _, conn, _, _ in sessions:
        conn.close()
    extended.close()
    new.stop()


@pytest.mark.timeout(180)
def test_group_taken_over_twice_follows_with_takeover_if_running(pg, tmp_path):
    """The template unit's one command, with workers: alone at first, then group to group, twice."""
    argv = [sys.executable, "-m", "multiproxy", "run", "--takeover-if-running", "-c"]
    first = ProxyProcess(with_workers(pg_config(pg, tmp_path), 2), workdir=str(tmp_path / "first"), argv=argv,
                         startup_timeout=60).start()
    try:
        assert "starting without one" in first.log_text()
        conn, port, key_pid = pg_session(first, "blue-green")
        previous = first
        for name in ("second", "third"):
            nxt = ProxyProcess(first.config_text, workdir=str(tmp_path / name), argv=argv, startup_timeout=60).start()
            assert wait_for(lambda: "took over" in nxt.log_text(), 60), nxt.log_tail()
            assert wait_for(lambda: not previous.running, 60) and previous.stop() == 0, previous.log_tail()
            assert took_over(nxt) == (1, 1)
            check_pg_session(conn, "blue-green", port, key_pid)
            previous = nxt
        # No key the third group issues repeats the one the first gave (no client logged in with the second).
        fresh = [pg_connect(previous) for _ in range(6)]
        assert key_pid not in {other.info.backend_pid for other in fresh}
        cancel_works(conn)
        for other in fresh:
            other.close()
        conn.close()
        previous.stop()
    finally:
        first.stop()


@pytest.mark.timeout(180)
@pytest.mark.parametrize("new_workers", [2, 1])
def test_pg_cancel_of_a_client_that_stayed_in_the_old_group(pg, proxy_factory, tmp_path, new_workers):
    """The cancel request reaches the new side (it holds the listener), which does not know the key (with workers:
    the worker the key names): it goes through the old group's supervisor to the worker still serving that client."""
    config = with_workers(pg_config(pg, tmp_path, drain=1.0), 2)
    config["proxy"]["shutdown_timeout"] = 30.0
    old = proxy_factory(config, startup_timeout=60)
    conns = [pg_connect(old) for _ in range(4)]       # so that both workers serve a busy one, most likely
    outcomes: list = [[] for _ in conns]

    def sleep(conn, outcome):
        try:
            conn.execute("SELECT pg_sleep(25)")
            outcome.append("finished")
        except psycopg.errors.QueryCanceled as exc:
            outcome.append(exc)
    threads = [threading.Thread(target=sleep, args=pair) for pair in zip(conns, outcomes)]
    for thread in threads:
        thread.start()
    time.sleep(0.5)
    new = start_new(old, tmp_path, new_workers).start()
    assert wait_for(lambda: "took over" in new.log_text(), 60), new.log_tail()
    assert took_over(new) == (1, 0) and "4 clients stayed there" in new.log_text(), new.log_tail()
    started = time.monotonic()
    for conn in conns:
        conn.cancel()
    for thread in threads:
        thread.join(15)
    for outcome in outcomes:
        assert outcome and isinstance(outcome[0], psycopg.errors.QueryCanceled), outcomes
    assert time.monotonic() - started < 10
    assert wait_for(lambda: not old.running, 60) and old.stop() == 0, old.log_tail()
    for conn in conns:
        conn.close()
    new.stop()


# -- MySQL / MariaDB and TDS: group to group ---------------------------------------------------------------------

@pytest.mark.timeout(180)
def test_mysql_group_to_group_idle_clients_keep_their_session(mariadb, proxy_factory, tmp_path):
    from .mysqlkit import connect, users_toml
    old = proxy_factory(with_workers(my_config(mariadb, tmp_path), 2), files={"users.toml": users_toml()},
                        startup_timeout=60)
    clients = []
    for i in range(4):
        conn = connect(old)
        with conn.cursor() as cur:
            cur.execute("SET SESSION sql_mode = 'ANSI_QUOTES'")
            cur.execute(f"SET @@session.div_precision_increment = {i + 2}")
        clients.append((conn, conn._sock.getsockname()[1], conn.thread_id()))

    new = take_over_with(old, tmp_path, 2)
    assert took_over(new) == (1, 4)

    for i, (conn, port, thread_id) in enumerate(clients):
        assert conn._sock.getsockname()[1] == port
        with conn.cursor() as cur:
            cur.execute("SELECT @@SESSION.sql_mode, @@SESSION.div_precision_increment")
            assert cur.fetchone() == ("ANSI_QUOTES", i + 2)
        assert conn.thread_id() == thread_id
    # KILL QUERY with the connection id the old group gave, from a new client (maybe of another worker).
    conn, _, thread_id = clients[0]
    outcome = []

    def sleep():
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT SLEEP(20)")
                outcome.append(cur.fetchone())
        except Exception as exc:  # noqa: BLE001  an interrupted query may also answer with an error
            outcome.append(exc)
    thread = threading.Thread(target=sleep)
    started = time.monotonic()
    thread.start()
    time.sleep(0.5)
    killer = connect(new)
    with killer.cursor() as cur:
        cur.execute(f"KILL QUERY {thread_id}")
    thread.join(15)
    assert outcome and time.monotonic() - started < 10, outcome
    killer.close()
    for conn, _, _ in clients:
        with conn.cursor() as cur:
            cur.execute("SELECT 5")
            assert cur.fetchone() == (5,)
        conn.close()
    new.stop()


@pytest.mark.timeout(180)
def test_tds_group_to_group_idle_clients_keep_their_session(tds_lab, proxy_factory, tmp_path):
    import pymssql

    from .test_tds_proxy import ms, one
    old = proxy_factory(with_workers(tds_setup(tds_lab, tmp_path), 2), files=tds_files(), startup_timeout=60)
    clients = []
    for i in range(4):
        conn = ms(old)
        conn.cursor().execute(f"SET DATEFIRST {i + 2}")
        cur = conn.cursor()
        handle = cur.callproc("[sys].[sp_prepare]", (pymssql.output(int), "@a int", "SELECT @a * 3"))[0]
        cur.callproc("sp_execute", (handle, 2))
        assert cur.fetchall() == [(6,)]
        clients.append((conn, handle))

    new = take_over_with(old, tmp_path, 2)
    assert took_over(new) == (1, 4)

    for i, (conn, handle) in enumerate(clients):
        assert one(conn, "SELECT @@DATEFIRST") == [(i + 2,)]
        cur = conn.cursor()
        cur.callproc("sp_execute", (handle, 7))
        assert cur.fetchall() == [(21,)]
        conn.close()
    new.stop()


# -- SIGTTOU: a retiring worker's clients move to the other workers (the same drain and adopt) -----------------

def retire_last_worker(proxy, index: int) -> None:
    """SIGTTOU, and wait until worker `index` handed its clients over and stopped."""
    import signal
    proxy.send_signal(signal.SIGTTOU)
    assert wait_for(lambda: re.search(rf"worker {index} \(pid \d+\) stopped after SIGTTOU", proxy.log_text()), 60), \
        proxy.log_tail()


def handed_by(proxy, index: int) -> int:
    match = re.search(rf"worker {index} \(SIGTTOU\): handed (\d+) clients to the other workers", proxy.log_text())
    assert match, proxy.log_tail()
    return int(match.group(1))


@pytest.mark.timeout(180)
def test_mysql_idle_clients_of_a_worker_sigttou_retires_keep_their_session(mariadb, proxy_factory, tmp_path):
    """PyMySQL clients of worker 1 (their connection ids name it) move to worker 0 with their settings; KILL QUERY
    with such an id reaches the moved client."""
    from .mysqlkit import connect, users_toml
    proxy = proxy_factory(with_workers(my_config(mariadb, tmp_path), 2), files={"users.toml": users_toml()},
                          startup_timeout=60)
    clients = []
    while sum(1 for _, _, thread_id in clients if thread_id >> 24 == 1) < 2:
        assert len(clients) < 60, "60 connections and worker 1 did not get 2"
        conn = connect(proxy)
        with conn.cursor() as cur:
            cur.execute("SET SESSION sql_mode = 'ANSI_QUOTES'")
            cur.execute(f"SET @@session.div_precision_increment = {len(clients) % 20 + 2}")
        clients.append((conn, conn._sock.getsockname()[1], conn.thread_id()))
    retire_last_worker(proxy, 1)
    assert handed_by(proxy, 1) == sum(1 for _, _, thread_id in clients if thread_id >> 24 == 1)
    for i, (conn, port, thread_id) in enumerate(clients):
        assert conn._sock.getsockname()[1] == port and conn.thread_id() == thread_id
        with conn.cursor() as cur:
            cur.execute("SELECT @@SESSION.sql_mode, @@SESSION.div_precision_increment")
            assert cur.fetchone() == ("ANSI_QUOTES", i % 20 + 2)
    conn, _, thread_id = next(client for client in clients if client[2] >> 24 == 1)
    outcome = []

    def sleep():
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT SLEEP(20)")
                outcome.append(cur.fetchone())
        except Exception as exc:  # noqa: BLE001  an interrupted query may also answer with an error
            outcome.append(exc)
    thread = threading.Thread(target=sleep)
    started = time.monotonic()
    thread.start()
    time.sleep(0.5)
    killer = connect(proxy)
    with killer.cursor() as cur:
        cur.execute(f"KILL QUERY {thread_id}")
    thread.join(15)
    assert outcome and time.monotonic() - started < 10, outcome
    killer.close()
    for conn, _, _ in clients:
        with conn.cursor() as cur:
            cur.execute("SELECT 5")
            assert cur.fetchone() == (5,)
        conn.close()


@pytest.mark.timeout(180)
def test_tds_idle_clients_of_a_worker_sigttou_retires_keep_their_session(tds_lab, proxy_factory, tmp_path):
    """pymssql clients of worker 1 move to worker 0 with their settings and sp_prepare handles."""
    import pymssql

    from .proxy import free_port
    from .test_custody import client_workers
    from .test_tds_proxy import ms, one
    config = with_workers(tds_setup(tds_lab, tmp_path), 2)
    config["proxy"]["admin_listen"] = f"127.0.0.1:{free_port()}"
    proxy = proxy_factory(config, files=tds_files(), startup_timeout=60)
    clients = []
    while True:
        assert len(clients) < 60, "60 connections and worker 1 did not get 2"
        conn = ms(proxy)
        conn.cursor().execute(f"SET DATEFIRST {len(clients) % 6 + 2}")
        cur = conn.cursor()
        handle = cur.callproc("[sys].[sp_prepare]", (pymssql.output(int), "@a int", "SELECT @a * 3"))[0]
        cur.callproc("sp_execute", (handle, 2))
        assert cur.fetchall() == [(6,)]
        clients.append((conn, handle))
        on_one = list(client_workers(proxy).values()).count("1")
        if on_one >= 2:
            break
    retire_last_worker(proxy, 1)
    assert handed_by(proxy, 1) == on_one
    assert set(client_workers(proxy).values()) == {"0"} and len(client_workers(proxy)) == len(clients)
    for i, (conn, handle) in enumerate(clients):
        assert one(conn, "SELECT @@DATEFIRST") == [(i % 6 + 2,)]
        cur = conn.cursor()
        cur.callproc("sp_execute", (handle, 7))
        assert cur.fetchall() == [(21,)]
        conn.close()


# -- under load: zero failed transactions ----------------------------------------------------------------------

@pytest.mark.timeout(300)
@pytest.mark.parametrize("mode", ["simple", "prepared"])
def test_pg_group_takeover_under_pgbench_load(pg, proxy_factory, tmp_path, mode):
    """pgbench -c 8 against 2 workers sharing a pool of 4 while a new group of 2 takes over: every client goes as it
    becomes idle between transactions; pgbench counts no failure and the rows add up."""
    old = proxy_factory(with_workers(pg_config(pg, tmp_path, max_size=4, drain=30.0), 2), startup_timeout=60)
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
        new = take_over_with(old, tmp_path, 2)
        out, err = bench.communicate(timeout=240)
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
    assert took_over(new) == (1, PGBENCH_CLIENTS)
    assert pg.psql("SELECT count(*) FROM pgbench_history;", db=AUTH_DB) == str(total)
    sums = pg.psql("SELECT (SELECT sum(delta) FROM pgbench_history), (SELECT sum(abalance) FROM pgbench_accounts), "
                   "(SELECT sum(bbalance) FROM pgbench_branches), (SELECT sum(tbalance) FROM pgbench_tellers);",
                   db=AUTH_DB)
    history, accounts, branches, tellers = sums.split("|")
    assert history == accounts == branches == tellers
    new.stop()


# -- systemd: READY=1 from the new supervisor once its workers serve ------------------------------------------------

@pytest.mark.timeout(180)
def test_systemd_hears_the_new_supervisor_ready_after_its_workers(pg, proxy_factory, tmp_path):
    from .test_deploy import _notify_socket, _receive
    path = str(tmp_path / "notify.sock")
    sock = _notify_socket(path)
    env = {"NOTIFY_SOCKET": path}
    old = proxy_factory(with_workers(pg_config(pg, tmp_path), 2), env=env, startup_timeout=60)
    fields, pid = _receive(sock, 30)
    assert fields.get("READY") == "1" and pid == old.pid
    conn = pg_connect(old)
    new = start_new(old, tmp_path, 2, env=env).start()
    heard = []
    workers_ready_at_ready = None
    while True:
        try:
            fields, pid = _receive(sock, 3)
        except socket.timeout:
            break
        heard.append((fields, pid))
        if pid == new.pid and fields.get("READY") == "1":
            workers_ready_at_ready = len(re.findall(r"multiproxy worker \d ready", new.log_text()))
    assert wait_for(lambda: not old.running, 60) and old.stop() == 0, old.log_tail()
    assert workers_ready_at_ready == 2, heard         # READY=1 once both workers serve, not before
    by_new = [fields for fields, pid in heard if pid == new.pid]
    by_old = [fields for fields, pid in heard if pid == old.pid]
    ready = next(f for f in by_new if f.get("READY") == "1")
    assert ready.get("MAINPID") == str(new.pid), heard
    assert ready.get("STATUS", "").startswith("2 workers serving 1 listeners, taken over from pid"), heard
    assert any(f.get("STATUS", "").startswith("took over 1 clients from pid") for f in by_new), heard
    assert not any("STOPPING" in f for f in by_old), heard        # the service goes on
    assert conn.execute("SELECT 1").fetchone()[0] == 1
    with urllib.request.urlopen(f"http://{new.admin_address[0]}:{new.admin_address[1]}/healthz", timeout=10) as page:
        assert page.status == 200                                 # the admin server's socket moved too
    conn.close()
    new.stop()


@pytest.mark.timeout(240)
def test_pg_150_idle_clients_go_group_to_group_with_their_settings(pg, proxy_factory, tmp_path):
    old = proxy_factory(with_workers(pg_config(pg, tmp_path, max_size=4), 2), startup_timeout=60)
    conns = []
    for i in range(150):
        conn = pg_connect(old)
        conn.execute(f"SET application_name = 'client-{i}'")
        conns.append(conn)
    new = take_over_with(old, tmp_path, 3)
    assert took_over(new) == (1, 150)
    for i, conn in enumerate(conns):
        assert conn.execute("SHOW application_name").fetchone()[0] == f"client-{i}"
        conn.close()
    new.stop()


# -- a respawned worker, and a new group that dies mid-takeover ------------------------------------------------------

@pytest.mark.timeout(180)
def test_old_group_accepts_again_when_the_new_one_dies_mid_takeover(pg, proxy_factory, tmp_path):
    import os
    import signal
    old = proxy_factory(with_workers(pg_config(pg, tmp_path, drain=30.0), 2), startup_timeout=60)
    # A worker respawned before the takeover: the group can still be taken over (its takeover socket stayed).
    victim = max(serving_workers(old))
    os.kill(victim, signal.SIGKILL)
    assert wait_for(lambda: len(serving_workers(old)) == 3, 30), old.log_tail()
    busy = psycopg.connect(host=old.host, port=old.port, user=USER, dbname=AUTH_DB, connect_timeout=CONNECT_TIMEOUT)
    busy.execute("SELECT 1")                                 # a transaction open: the drain waits for it
    new = start_new(old, tmp_path, 2).start()
    assert wait_for(lambda: "handing this group (2 workers) over" in old.log_text(), 30), old.log_tail()
    time.sleep(0.5)
    new.stop(timeout=0)                                      # SIGTERM, then SIGKILL to its whole process group
    assert wait_for(lambda: "this group accepts again" in old.log_text(), 30), old.log_tail()
    assert wait_for(lambda: old.log_text().count("the takeover failed; accepting again") == 2, 30), old.log_tail()
    assert old.running
    busy.commit()                                            # its transaction went on in the old group
    assert busy.execute("SELECT 2").fetchone()[0] == 2
    busy.commit()
    for _ in range(4):                                       # both workers accept again
        with pg_connect(old) as fresh:
            assert fresh.execute("SELECT 3").fetchone()[0] == 3
    again = take_over_with(old, tmp_path, 2, name="again")    # and it can be taken over again
    assert took_over(again) == (1, 1)
    assert busy.execute("SELECT 4").fetchone()[0] == 4
    busy.commit()
    busy.close()
    again.stop()


@pytest.mark.timeout(180)
def test_idle_clients_of_an_old_worker_that_dies_during_the_drain_go_too(pg, proxy_factory, tmp_path):
    """A worker that cannot drain (stopped, then killed during the takeover) is not respawned: the idle clients the
    supervisor held for it (worker custody) go to the new group from the supervisor's duplicates."""
    import os
    import signal

    from .test_custody import client_workers, spread
    from .test_supervisor import worker_pids
    old = proxy_factory(with_workers(pg_config(pg, tmp_path, drain=30.0), 2), startup_timeout=60)
    conns = spread(old, lambda: pg_connect(old), lambda conn: local_port(conn.pgconn.socket), each=2)
    for i, conn in enumerate(conns):
        conn.execute(f"SET application_name = 'held-{i}'")
    on = client_workers(old)
    held_for_one = [on[local_port(conn.pgconn.socket)] for conn in conns].count("1")
    stuck = worker_pids(old)[1]
    os.kill(stuck, signal.SIGSTOP)
    try:
        new = start_new(old, tmp_path, 2).start()
        assert wait_for(lambda: "worker 0: handed" in old.log_text(), 60), old.log_tail()
    finally:
        os.kill(stuck, signal.SIGKILL)
    assert wait_for(lambda: "took over" in new.log_text(), 60), new.log_tail()
    assert wait_for(lambda: not old.running, 60) and old.stop() == 0, old.log_tail()
    gone = re.search(r"worker 1 is gone; the (\d+) idle clients held for it go", old.log_text())
    assert gone and int(gone.group(1)) == held_for_one, old.log_tail()
    assert "worker 1 (pid %d) killed by signal 9 (SIGKILL) during the takeover; not respawned" % stuck in old.log_text()
    assert took_over(new) == (1, len(conns))
    for i, conn in enumerate(conns):
        assert conn.execute("SHOW application_name").fetchone()[0] == f"held-{i}"
        conn.close()
    new.stop()
