"""Binary prepared statements through the lab's MySQL writer listener (pool max_size 10) with 13 clients at once:
mysql-connector prepared cursors, MariaDB Connector/Python with parameters, sysbench --db-ps-mode=auto. No pool
timeouts and no prepared_statement pins: the statements move between the lab's backends (statements.py)."""
from __future__ import annotations

import re
import shutil
import subprocess

import mariadb as mariadb_connector
import mysql.connector
import pytest

from .helpers import metric, run_clients

CLIENTS = 13
TIMEOUTS = "multiproxy_database_connection_borrow_timeouts_total"
DETECTED = "multiproxy_pin_reasons_detected_total"
STATEMENTS = "multiproxy_prepared_statements_total"
TABLE = "lab_ps_rows"


def counts(lab) -> tuple[float, float, float]:
    text = lab.metrics_text()
    return ((metric(text, TIMEOUTS) or 0), (metric(text, DETECTED, reason="prepared_statement") or 0),
            (metric(text, STATEMENTS, outcome="hit") or 0) + (metric(text, STATEMENTS, outcome="miss") or 0))


@pytest.fixture
def writer(shared_lab):
    args = shared_lab.args("MULTIPROXY_MYSQL_URL")
    conn = mysql.connector.connect(**args, use_pure=True, ssl_disabled=True, connection_timeout=10, autocommit=True)
    cur = conn.cursor()
    cur.execute(f"CREATE OR REPLACE TABLE {TABLE} (id int primary key, worker int, v int, note varchar(20))")
    yield args
    cur.execute(f"DROP TABLE IF EXISTS {TABLE}")
    conn.close()


def assert_clean(lab, before) -> None:
    after = counts(lab)
    assert after[0] == before[0], f"pool timeouts: {after[0] - before[0]}"
    assert after[1] == before[1], f"prepared_statement pins: {after[1] - before[1]}"
    assert after[2] > before[2], "no prepared statement executed through the proxy"


@pytest.mark.timeout(180)
def test_lab_mysql_connector_prepared_cursors(shared_lab, writer):
    before = counts(shared_lab)

    def work(w: int) -> None:
        conn = mysql.connector.connect(**writer, use_pure=True, ssl_disabled=True, connection_timeout=10)
        try:
            cur = conn.cursor(prepared=True)
            for i in range(5):
                cur.execute(f"INSERT INTO {TABLE} VALUES (?, ?, ?, ?)", (w * 100 + i, w, i, None if i % 2 else "x"))
                conn.commit()
                cur.execute(f"SELECT v, note FROM {TABLE} WHERE id = ?", (w * 100 + i,))
                assert cur.fetchall() == [(i, None if i % 2 else "x")]
            cur.close()
        finally:
            conn.close()
    failures = run_clients(CLIENTS, work, 120.0)
    assert failures == [], failures
    assert_clean(shared_lab, before)


@pytest.mark.timeout(180)
def test_lab_mariadb_connector_with_parameters(shared_lab, writer):
    before = counts(shared_lab)

    def work(w: int) -> None:
        conn = mariadb_connector.connect(**writer, connect_timeout=10)
        try:
            cur = conn.cursor()
            cur.executemany(f"INSERT INTO {TABLE} VALUES (?, ?, ?, ?)", [(w * 100 + i, w, i, None) for i in range(5)])
            conn.commit()
            cur.execute(f"SELECT COUNT(*), SUM(v) FROM {TABLE} WHERE worker = ?", (w,))
            assert cur.fetchall() == [(5, 10)]
            cur.close()
        finally:
            conn.close()
    failures = run_clients(CLIENTS, work, 120.0)
    assert failures == [], failures
    assert_clean(shared_lab, before)


@pytest.mark.timeout(240)
@pytest.mark.skipif(shutil.which("sysbench") is None, reason="sysbench is not installed")
def test_lab_sysbench_prepared_statements(shared_lab, writer):
    common = ["--db-driver=mysql", f"--mysql-host={writer['host']}", f"--mysql-port={writer['port']}",
              f"--mysql-user={writer['user']}", f"--mysql-password={writer['password']}",
              f"--mysql-db={writer['database']}", "--tables=1", "--table-size=500", "--mysql-ssl=off"]
    # sysbench names its tables itself (sbtest1): drop any left by an earlier run in the same lab first
    subprocess.run(["sysbench", "oltp_read_write", "cleanup", *common], capture_output=True, timeout=60)
    try:
        prepared = subprocess.run(["sysbench", "oltp_read_write", "prepare", *common], capture_output=True, text=True,
                                  timeout=120)
        assert prepared.returncode == 0, prepared.stdout + prepared.stderr
        before = counts(shared_lab)
        out = subprocess.run(["sysbench", "oltp_read_write", "run", f"--threads={CLIENTS}", "--time=5",
                              "--db-ps-mode=auto", *common], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stdout + out.stderr
        assert int(re.search(r"transactions:\s+(\d+)", out.stdout).group(1)) > 50, out.stdout
        assert int(re.search(r"reconnects:\s+(\d+)", out.stdout).group(1)) == 0, out.stdout
        assert_clean(shared_lab, before)
    finally:
        subprocess.run(["sysbench", "oltp_read_write", "cleanup", *common], capture_output=True, timeout=60)
