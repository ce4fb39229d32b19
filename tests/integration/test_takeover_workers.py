"""Takeover with forked workers (multiproxy.group_takeover): a group (supervisor + workers) hands its listeners and
idle clients to a new group or process, and a single process to a new group. Real servers, real clients: the clients'
connections and session state survive, cancels reach the clients wherever they are, zero failures under pgbench."""
from __future__ import annotations

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
from .proxy import ProxyProcess
from .test_takeover import (CONNECT_TIMEOUT, PGBENCH_CLIENTS, PGBENCH_TRANSACTIONS, USER, client_env, local_port,
                            my_config, pg_config, take_over, tds_files, tds_lab, tds_setup, took_over, wait_for)

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


def cancel_works(conn) -> None:
    """pg_sleep cancelled with the cancel key the client holds (its worker may be another one than the listener's)."""
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
        assert "READY=1" not in new.log_text()          # (systemd hears it by datagram, see the systemd test)
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
        conn.close()
        previous.stop()
    finally:
        first.stop()


@pytest.mark.timeout(180)
def test_pg_cancel_of_a_client_that_stayed_in_the_old_group(pg, proxy_factory, tmp_path):
    """The cancel request reaches the new group (it holds the listener); the worker the key names does not know it,
    so it goes through both supervisors to the old group's worker still serving that client."""
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
    new = start_new(old, tmp_path, 2).start()
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
