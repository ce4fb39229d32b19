"""Role probes against real servers report lag that means lag (issue 11): a PostgreSQL standby that replayed all it
received lags 0 however idle the cluster, a paused one shows its backlog; a MariaDB replica whose replication stops
is skipped with the reason; a TDS lab server reports the lag it is told. The probes run as the registry runs them:
open_socket + run_script(engine.probe_script(target)). Private servers on free loopback ports only."""
from __future__ import annotations

import signal
import time

import pytest

from multiproxy_engines.mysql import MySQLEngine
from multiproxy_engines.postgres import PostgresEngine
from multiproxy_engines.tds import TDSEngine
from multiproxy.backends import open_socket, run_script
from multiproxy.engine import BackendTarget

from .tdskit import DB as TDS_DB
from .tdskit import LAB_PASSWORD, LAB_USER, LabProcess, RawClient

PROBE_TIMEOUT = 10.0


def probe(engine, host: str, port: int, user: str, password: str | None, database: str) -> dict:
    target = BackendTarget(host=host, port=port, user=user, database=database, password=password, tls="disable")
    sock = open_socket(host, port, PROBE_TIMEOUT)
    try:
        sock, script = run_script(sock, engine.probe_script(target), target, PROBE_TIMEOUT)
    finally:
        sock.close()
    return script.result


def wait_for_result(read, predicate, timeout: float, what: str) -> dict:
    deadline = time.monotonic() + timeout
    result = read()
    while not predicate(result):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}; last probe result: {result}")
        time.sleep(0.2)
        result = read()
    return result


# ---------------------------------------------------------------- PostgreSQL

@pytest.fixture
def pg_pair():
    from multiproxy.lab.postgres import PostgresServer

    primary = PostgresServer(host="127.0.0.1").start()
    standby = None
    try:
        standby = primary.make_standby(host="127.0.0.1")
        yield primary, standby
    finally:
        if standby is not None:
            standby.stop()
        primary.stop()


@pytest.mark.timeout(180)
def test_postgres_standby_lag_is_zero_when_idle_and_shows_a_paused_replay(pg_pair):
    from multiproxy.lab.postgres import SUPERUSER

    primary, standby = pg_pair
    engine = PostgresEngine()

    def standby_probe():
        return probe(engine, standby.host, standby.port, SUPERUSER, None, "postgres")

    assert probe(engine, primary.host, primary.port, SUPERUSER, None, "postgres") == \
        {"role": "writer", "lag": 0.0, "lag_bytes": 0, "skip": None}
    primary.psql("CREATE TABLE lagtest (id int)")
    primary.psql("INSERT INTO lagtest SELECT generate_series(1, 100)")
    primary.wait_replayed(standby)
    time.sleep(3.5)
    # The old formula (now() - last replayed commit) calls this idle standby 3+ s behind.
    assert float(standby.psql("SELECT EXTRACT(EPOCH FROM now() - pg_last_xact_replay_timestamp())")) >= 3.0
    assert standby_probe() == {"role": "reader", "lag": 0.0, "lag_bytes": 0, "skip": None}

    standby.psql("SELECT pg_wal_replay_pause()")
    try:
        primary.psql("INSERT INTO lagtest SELECT generate_series(1, 1000)")
        paused = wait_for_result(standby_probe, lambda r: (r["lag_bytes"] or 0) > 0, 15,
                                 "WAL received but not replayed")
        assert paused["role"] == "reader" and paused["skip"] is None
        assert paused["lag"] is not None and paused["lag"] > 0     # the last replayed commit is 3.5+ s old
    finally:
        standby.psql("SELECT pg_wal_replay_resume()")
    primary.wait_replayed(standby)
    wait_for_result(standby_probe, lambda r: r == {"role": "reader", "lag": 0.0, "lag_bytes": 0, "skip": None},
                    15, "the resumed standby to report no lag")


# ---------------------------------------------------------------- MariaDB

@pytest.fixture
def mariadb_pair():
    from multiproxy.lab.mariadb import MariaDBServer

    primary = MariaDBServer(host="127.0.0.1", server_id=1).start()
    replica = None
    try:
        replica = primary.make_replica(host="127.0.0.1", semi_sync=False)
        yield primary, replica
    finally:
        if replica is not None:
            replica.stop()
        primary.stop()


@pytest.mark.timeout(240)
def test_mariadb_replica_lag_and_stopped_replication(mariadb_pair):
    primary, replica = mariadb_pair
    engine = MySQLEngine()

    def replica_probe():
        return probe(engine, replica.host, replica.port, "root", "", "")

    assert probe(engine, primary.host, primary.port, "root", "", "") == \
        {"role": "writer", "lag": 0.0, "lag_bytes": 0, "skip": None}
    primary.sql("CREATE DATABASE lagdb; CREATE TABLE lagdb.t (id int PRIMARY KEY); INSERT INTO lagdb.t VALUES (1);")
    replica.wait_caught_up(primary)
    running = wait_for_result(replica_probe, lambda r: r["lag"] == 0.0, 15, "the running replica to report lag 0")
    assert running["role"] == "reader" and running["skip"] is None
    assert running["lag_bytes"] in (0, None)

    replica.sql("STOP SLAVE")
    stopped = replica_probe()
    assert stopped["role"] == "reader" and stopped["lag"] is None
    assert stopped["skip"].startswith("replication is stopped (")
    assert "_IO_Running = No" in stopped["skip"] and "_SQL_Running = No" in stopped["skip"]

    replica.sql("START SLAVE")
    primary.sql("INSERT INTO lagdb.t VALUES (2);")
    replica.wait_caught_up(primary)
    wait_for_result(replica_probe, lambda r: r["lag"] == 0.0 and r["skip"] is None, 20,
                    "the restarted replica to report lag 0 again")


# ---------------------------------------------------------------- TDS lab server

@pytest.mark.timeout(120)
def test_tds_lab_server_reports_its_replica_lag(tmp_path):
    engine = TDSEngine()
    lab = LabProcess(tmp_path, "--read-only", "--replica-lag", "7")
    try:
        def lab_probe():
            return probe(engine, "127.0.0.1", lab.port, LAB_USER, LAB_PASSWORD, TDS_DB)

        assert lab_probe() == {"role": "reader", "lag": 7.0, "lag_bytes": 0, "skip": None}
        client = RawClient(lab.port, database=TDS_DB)
        try:
            client.batch("EXEC sp_lab_set_replica_lag 2, 64")
            assert lab_probe() == {"role": "reader", "lag": 2.0, "lag_bytes": 64 * 1024, "skip": None}
            client.batch("EXEC sp_lab_set_replica_lag NULL")
            assert lab_probe() == {"role": "reader", "lag": None, "lag_bytes": 64 * 1024, "skip": None}
            lab.proc.send_signal(signal.SIGUSR2)          # writable: in no availability group
            wait_for_result(lab_probe, lambda r: r["role"] == "writer", 10, "the lab server to turn writable")
            assert lab_probe() == {"role": "writer", "lag": 0.0, "lag_bytes": 0, "skip": None}
            assert client.rows("SELECT secondary_lag_seconds FROM sys.dm_hadr_database_replica_states") == []
        finally:
            client.close()
    finally:
        lab.stop()
    writable = LabProcess(tmp_path, "--replica-lag", "9", port=None)
    try:
        assert probe(engine, "127.0.0.1", writable.port, LAB_USER, LAB_PASSWORD, TDS_DB) == \
            {"role": "writer", "lag": 0.0, "lag_bytes": 0, "skip": None}
    finally:
        writable.stop()
