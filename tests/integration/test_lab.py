"""`multiproxy lab` end to end: up --detach, env, writes and replicated reads through the proxy, status, failover, down
(PostgreSQL, MariaDB and TDS in one lab)."""
from __future__ import annotations

import os
import re
import subprocess
import time

import psycopg
import pymysql
import pytest
import pytds

from .labkit import lab, parse_exports, tds_args, url_args

ENV_NAMES = {"MULTIPROXY_PG_URL", "MULTIPROXY_PG_READER_URL", "MULTIPROXY_PG_DIRECT_URL",
             "MULTIPROXY_MYSQL_URL", "MULTIPROXY_MYSQL_READER_URL", "MULTIPROXY_MYSQL_DIRECT_URL",
             "MULTIPROXY_TDS_URL", "MULTIPROXY_TDS_READER_URL", "MULTIPROXY_TDS_DIRECT_URL",
             "PGHOST", "PGPORT", "PGUSER", "PGPASSWORD", "PGDATABASE"}


def lab_pids(lab_dir: str, data: str | None = None) -> list[str]:
    """Processes whose command line mentions the lab's directory or its data directory (as root under /tmp:
    pass the path DIR/data pointed to, as the link is gone after `lab down`)."""
    data = data or os.path.realpath(os.path.join(lab_dir, "data"))
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if ("postgres" in cmd or "multiproxy" in cmd or "mariadbd" in cmd) and (lab_dir in cmd or data in cmd):
            found.append(f"{entry}: {cmd}")
    return found


def outage_of(failover: subprocess.CompletedProcess) -> float:
    found = re.search(r"outage seen through the proxy: ([\d.]+) s", failover.stdout)
    assert found, failover.stdout + failover.stderr
    return float(found.group(1))


def check_mysql(values: dict[str, str]) -> None:
    """Writes through the writer listener; the reader listener sees them once the replica has caught up."""
    for name in ("MULTIPROXY_MYSQL_URL", "MULTIPROXY_MYSQL_READER_URL", "MULTIPROXY_MYSQL_DIRECT_URL"):
        assert values[name].startswith("mysql://lab:"), values[name]
    with pymysql.connect(**url_args(values["MULTIPROXY_MYSQL_URL"]), autocommit=True, connect_timeout=10) as conn:
        cur = conn.cursor()
        cur.execute("CREATE TABLE lab_check (id int PRIMARY KEY, note text)")
        cur.execute("INSERT INTO lab_check VALUES (1, 'written through my-writer')")
        cur.execute("SELECT @@read_only")
        assert cur.fetchone() == (0,)
    with pymysql.connect(**url_args(values["MULTIPROXY_MYSQL_READER_URL"]), autocommit=True,
                         connect_timeout=10) as conn:
        cur = conn.cursor()
        cur.execute("SELECT @@read_only")
        assert cur.fetchone() == (1,)
        deadline = time.monotonic() + 15
        row = None
        while row is None and time.monotonic() < deadline:
            cur.execute("SELECT count(*) FROM information_schema.tables WHERE table_name = 'lab_check'")
            if cur.fetchone()[0]:
                cur.execute("SELECT note FROM lab_check WHERE id = 1")
                row = cur.fetchone()
            if row is None:
                time.sleep(0.1)
        assert row == ("written through my-writer",), "the replica did not apply the write within 15 s"


def check_tds(values: dict[str, str]) -> None:
    for name in ("MULTIPROXY_TDS_URL", "MULTIPROXY_TDS_READER_URL", "MULTIPROXY_TDS_DIRECT_URL"):
        assert values[name].startswith("mssql://lab:"), values[name]
    with pytds.connect(**tds_args(values["MULTIPROXY_TDS_URL"])) as conn:
        cur = conn.cursor()
        cur.execute("SELECT DATABASEPROPERTYEX(DB_NAME(), 'Updateability'), DB_NAME()")
        assert cur.fetchone() == ("READ_WRITE", "lab")
    with pytds.connect(**tds_args(values["MULTIPROXY_TDS_READER_URL"])) as conn:
        cur = conn.cursor()
        cur.execute("SELECT DATABASEPROPERTYEX(DB_NAME(), 'Updateability')")
        assert cur.fetchone() == ("READ_ONLY",)


def served_by(conn) -> tuple[str, bool]:
    """(the backend's address, whether it is in recovery) for the next transaction on `conn`."""
    host, recovery = conn.execute("SELECT host(inet_server_addr()), pg_is_in_recovery()").fetchone()
    return host, recovery


@pytest.mark.timeout(150)
def test_lab_up_env_status_failover_down(tmp_path):
    lab_dir = str(tmp_path / "lab")
    up = lab("up", "--dir", lab_dir, "--detach")  # all engines
    assert up.returncode == 0, up.stdout + up.stderr
    data_dir = os.path.realpath(os.path.join(lab_dir, "data"))
    try:
        assert "pg-writer (proxy)" in up.stdout and "psql postgresql://lab:" in up.stdout
        assert "my-writer (proxy)" in up.stdout and re.search(r"mariadb -h 127\.0\.0\.1 -P \d+ -u lab -p\S+ lab", up.stdout)
        assert "tds-reader (proxy)" in up.stdout
        assert re.search(r"TDSVER=7\.4 tsql -H 127\.0\.0\.1 -p \d+ -U lab -P \S+ -D lab", up.stdout), up.stdout
        assert oct(os.stat(os.path.join(lab_dir, "lab.json")).st_mode & 0o777) == "0o600"
        users = open(os.path.join(lab_dir, "users.toml")).read()
        assert "SCRAM-SHA-256$" in users and "mysql_native_password" in users and "tds_sha256" in users

        env = lab("env", "--dir", lab_dir)
        assert env.returncode == 0, env.stderr
        values = parse_exports(env.stdout)
        assert ENV_NAMES <= set(values)
        assert values["PGPASSWORD"] not in users  # the users file holds verifiers only
        for name in ("MULTIPROXY_PG_URL", "MULTIPROXY_PG_READER_URL", "MULTIPROXY_PG_DIRECT_URL"):
            assert values[name].startswith("postgresql://lab:")

        with psycopg.connect(values["MULTIPROXY_PG_URL"], connect_timeout=10, autocommit=True) as conn:
            conn.execute("CREATE TABLE lab_check (id int PRIMARY KEY, note text)")
            conn.execute("INSERT INTO lab_check VALUES (1, 'written through pg-writer')")
            assert conn.execute("SELECT pg_is_in_recovery()").fetchone() == (False,)
        with psycopg.connect(values["MULTIPROXY_PG_READER_URL"], connect_timeout=10, autocommit=True) as conn:
            assert conn.execute("SELECT pg_is_in_recovery()").fetchone() == (True,)
            deadline = time.monotonic() + 15
            row = None
            while row is None and time.monotonic() < deadline:
                exists = conn.execute("SELECT to_regclass('lab_check') IS NOT NULL").fetchone()[0]
                if exists:
                    row = conn.execute("SELECT note FROM lab_check WHERE id = 1").fetchone()
                if row is None:
                    time.sleep(0.1)
            assert row == ("written through pg-writer",), "the standby did not replay the write within 15 s"
        with psycopg.connect(values["MULTIPROXY_PG_DIRECT_URL"], connect_timeout=10) as conn:
            assert conn.execute("SELECT count(*) FROM lab_check").fetchone() == (1,)

        psql_env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        psql_env.update({k: values[k] for k in ("PGHOST", "PGPORT", "PGUSER", "PGPASSWORD", "PGDATABASE")})
        psql = subprocess.run(["psql", "-X", "-At", "-c", "SELECT current_user, current_database(), count(*) FROM lab_check"],
                              capture_output=True, text=True, env=psql_env, timeout=30)
        assert psql.returncode == 0, psql.stderr
        assert psql.stdout.strip() == "lab|lab|1"

        status = lab("status", "--dir", lab_dir)
        assert status.returncode == 0, status.stdout + status.stderr
        assert "verified writer" in status.stdout and "verified reader" in status.stdout
        assert "pool pg/writer" in status.stdout
        assert "pg: writer 127.0.0.2:" in status.stdout  # the registry's view
        assert "writer.pg.lab    -> 127.0.0.2" in status.stdout
        assert re.search(r"my2 +127\.0\.0\.5:\d+ +configured reader +verified reader", status.stdout), status.stdout
        assert re.search(r"tds1 +127\.0\.0\.6:\d+ +configured writer +verified writer", status.stdout), status.stdout
        assert len(lab_pids(lab_dir)) >= 8  # proxy, two servers per engine, DNS server

        check_mysql(values)
        check_tds(values)
        # A MariaDB failover under an open PyMySQL connection through the proxy.
        my_held = pymysql.connect(**url_args(values["MULTIPROXY_MYSQL_URL"]), autocommit=True, connect_timeout=10)
        cur = my_held.cursor()
        cur.execute("SELECT @@server_id")
        assert cur.fetchone() == (1,)
        failover = lab("failover", "mysql", "--dir", lab_dir)
        assert failover.returncode == 0, failover.stdout + failover.stderr
        assert outage_of(failover) < 10
        assert re.search(r"registry: writer \S+ -> 127\.0\.0\.5:\d+ \(probe\)", failover.stdout), failover.stdout
        cur.execute("INSERT INTO lab_check VALUES (2, 'after the failover')")
        cur.execute("SELECT @@server_id, count(*) FROM lab_check")
        assert cur.fetchone() == (2, 2)  # the same connection, now on the promoted replica
        my_held.close()

        # A failover while a client connection through the proxy stays open.
        held = psycopg.connect(values["MULTIPROXY_PG_URL"], connect_timeout=10, autocommit=True)
        assert served_by(held) == ("127.0.0.2", False)
        failover = lab("failover", "postgres", "--dir", lab_dir)
        assert failover.returncode == 0, failover.stdout + failover.stderr
        assert outage_of(failover) < 10
        assert re.search(r"registry: writer \S+ -> 127\.0\.0\.3:\d+ \(probe\)", failover.stdout), failover.stdout
        assert served_by(held) == ("127.0.0.3", False)  # the same connection, now on the new writer
        held.execute("INSERT INTO lab_check VALUES (2, 'after the failover')")
        status = lab("status", "--dir", lab_dir)
        assert status.returncode == 0, status.stdout + status.stderr
        assert "pg: writer 127.0.0.3:" in status.stdout
        assert re.search(r"pg2 +127\.0\.0\.3:\d+ +configured writer +verified writer", status.stdout), status.stdout
        assert re.search(r"pg1 +127\.0\.0\.2:\d+ +configured reader +verified reader", status.stdout), status.stdout
        assert "@127.0.0.3:" in parse_exports(lab("env", "--dir", lab_dir).stdout)["MULTIPROXY_PG_DIRECT_URL"]

        # The old primary was rebuilt as a standby: fail back, this time leaving the old writer stopped.
        failback = lab("failover", "postgres", "--no-rebuild", "--dir", lab_dir)
        assert failback.returncode == 0, failback.stdout + failback.stderr
        assert outage_of(failback) < 10
        assert served_by(held) == ("127.0.0.2", False)
        assert held.execute("SELECT count(*) FROM lab_check").fetchone() == (2,)
        held.close()
        again = lab("failover", "postgres", "--dir", lab_dir)
        assert again.returncode == 1 and "no standby left" in again.stderr, again.stdout + again.stderr
        status = lab("status", "--dir", lab_dir)
        assert status.returncode == 0, status.stdout + status.stderr
        assert "stopped by `lab failover`" in status.stdout
    finally:
        down = lab("down", "--dir", lab_dir)
    assert down.returncode == 0, down.stdout + down.stderr
    status = lab("status", "--dir", lab_dir)
    assert status.returncode != 0
    assert lab_pids(lab_dir, data_dir) == []
    assert not os.path.exists(lab_dir) and not os.path.exists(data_dir)


def report_rows(failover: subprocess.CompletedProcess) -> dict[str, int]:
    """The write figures of a `lab failover` report: committed, failed, on_writer (committed rows on the new
    writer), missing, unacknowledged (failed writes that are there anyway)."""
    text = failover.stdout
    writes = re.search(r"writes: (\d+) committed, (\d+) failed", text)
    rows = re.search(r"rows: (\d+) of (\d+) committed rows are on the new writer", text)
    assert writes and rows, text + failover.stderr
    missing = re.search(r"(\d+) committed row\(s\) are MISSING", text)
    unacknowledged = re.search(r"(\d+) unacknowledged write\(s\) are there too", text)
    figures = {"committed": int(writes.group(1)), "failed": int(writes.group(2)), "on_writer": int(rows.group(1)),
               "missing": int(missing.group(1)) if missing else 0,
               "unacknowledged": int(unacknowledged.group(1)) if unacknowledged else 0}
    assert int(rows.group(2)) == figures["committed"], text
    assert figures["on_writer"] + figures["missing"] == figures["committed"], text
    assert figures["unacknowledged"] <= figures["failed"], text
    assert "no write of the loop explains" not in text, text
    return figures


@pytest.mark.timeout(240)
def test_lab_fails_over_twice_and_back_for_every_engine(tmp_path):
    """`lab failover ENGINE` twice in a row for each engine: every write committed through the proxy is on the
    new writer each time, and the second failover brings the original writer back with the other node
    following it (MariaDB: the old primary was rebuilt as a GTID replica)."""
    lab_dir = str(tmp_path / "lab")
    up = lab("up", "--dir", lab_dir, "--detach")
    assert up.returncode == 0, up.stdout + up.stderr
    try:
        values = parse_exports(lab("env", "--dir", lab_dir).stdout)
        hosts = {"mysql": ("127.0.0.4", "127.0.0.5"), "postgres": ("127.0.0.2", "127.0.0.3"),
                 "tds": ("127.0.0.6", "127.0.0.7")}
        for engine, (first, second) in hosts.items():
            for new_writer in (second, first):
                failover = lab("failover", engine, "--dir", lab_dir)
                assert failover.returncode == 0, failover.stdout + failover.stderr
                assert re.search(rf"-> \S+ {re.escape(new_writer)}:\d+$", failover.stdout.splitlines()[0]), failover.stdout
                figures = report_rows(failover)
                assert figures["committed"] >= 10 and figures["missing"] == 0, failover.stdout
                assert "can run again" in failover.stdout, failover.stdout
                assert outage_of(failover) < 10

        # MariaDB after two failovers: my1 (server_id 1) writes again, my2 replicates from it.
        direct = url_args(values["MULTIPROXY_MYSQL_DIRECT_URL"])
        with pymysql.connect(**url_args(values["MULTIPROXY_MYSQL_URL"]), autocommit=True, connect_timeout=10) as conn:
            cur = conn.cursor()
            cur.execute("SELECT @@server_id, @@read_only")
            assert cur.fetchone() == (1, 0)
            cur.execute("CREATE TABLE after_two (id int PRIMARY KEY)")
            cur.execute("INSERT INTO after_two VALUES (1)")
        with pymysql.connect(**{**direct, "host": "127.0.0.5"}, autocommit=True, connect_timeout=10) as conn:
            cur = conn.cursor()
            cur.execute("SELECT @@server_id, @@read_only")
            assert cur.fetchone() == (2, 1)
            deadline = time.monotonic() + 15
            while True:
                cur.execute("SELECT count(*) FROM information_schema.tables WHERE table_name = 'after_two'")
                if cur.fetchone()[0]:
                    cur.execute("SELECT count(*) FROM after_two")
                    if cur.fetchone() == (1,):
                        break
                assert time.monotonic() < deadline, "my2 did not replicate the write on my1 within 15 s"
                time.sleep(0.1)
        # PostgreSQL: pg1 writes again and pg2 streams from it.
        with psycopg.connect(values["MULTIPROXY_PG_URL"], connect_timeout=10, autocommit=True) as conn:
            assert served_by(conn) == ("127.0.0.2", False)
        status = lab("status", "--dir", lab_dir)
        assert status.returncode == 0, status.stdout + status.stderr
        for name, host, role in (("my1", "127.0.0.4", "writer"), ("my2", "127.0.0.5", "reader"),
                                 ("pg1", "127.0.0.2", "writer"), ("pg2", "127.0.0.3", "reader"),
                                 ("tds1", "127.0.0.6", "writer"), ("tds2", "127.0.0.7", "reader")):
            assert re.search(rf"{name} +{re.escape(host)}:\d+ +configured {role} +verified {role}", status.stdout), \
                status.stdout
        assert re.search(r"node 127\.0\.0\.5:\d+ +reader +up, lag [\d.]+ s", status.stdout), status.stdout
    finally:
        down = lab("down", "--dir", lab_dir)
    assert down.returncode == 0, down.stdout + down.stderr


def test_failover_report_counts_each_row_of_the_run_once():
    """The TDS report once said "37 of 36 committed rows": a write whose answer the failover cut had committed.
    Rows are compared by id: committed and on the writer, committed and missing, failed but there anyway."""
    from types import SimpleNamespace
    from multiproxy.lab.failover import WriteCount
    loop = SimpleNamespace(ok=[(i, 0.0, 0.0) for i in (1, 2, 3, 5)], failed=[(4, 0.0, 0.0, "cut"), (6, 0.0, 0.0, "cut")])
    count = WriteCount(loop, {1, 2, 3, 4})
    assert (len(count.kept), len(count.lost), len(count.unacknowledged_present)) == (3, 1, 1)
    assert count.describe() == ("3 of 4 committed rows are on the new writer; 1 committed row(s) are MISSING there "
                                "(lost in the failover); 1 unacknowledged write(s) are there too (the client got an "
                                "error, but the server had committed them)")
    assert WriteCount(loop, None).describe() == "could not read them back from the new writer"


def test_status_describes_lag_and_skipped_nodes():
    from multiproxy.lab.stack import describe_node
    node = {"address": "127.0.0.5:3306", "role": "reader", "healthy": True, "lag": 2.1, "lag_bytes": 48 * 1024,
            "failures": 0, "sources": ["reader"], "error": None, "skipped": None}
    assert describe_node(node).split(None, 2)[2] == "up, lag 2.1 s (48 KB)"
    node.update(lag=None, lag_bytes=None, skipped="replication is stopped")
    assert describe_node(node).endswith("up, lag unknown; skipped: replication is stopped")
    node.update(lag=45.0, skipped="lag 45.0 s beyond max_replica_lag 30 s")
    assert describe_node(node).endswith("lag 45.0 s; skipped: lag 45.0 s beyond max_replica_lag 30 s")
    older = {"address": "127.0.0.5:3306", "role": "reader", "healthy": True, "lag": 0.0, "failures": 0,
             "error": None}  # a proxy without lag_bytes and skipped
    assert describe_node(older).endswith("up, lag 0.0 s")
    down = {"address": "127.0.0.4:3306", "role": None, "healthy": False, "error": "connection refused",
            "skipped": "down: connection refused"}
    assert describe_node(down).endswith("?       DOWN (connection refused)")


def test_lab_commands_without_a_lab(tmp_path):
    lab_dir = str(tmp_path / "nothing")
    assert lab("status", "--dir", lab_dir).returncode == 1
    env = lab("env", "--dir", lab_dir)
    assert env.returncode == 1 and "no lab in" in env.stderr
    assert lab("down", "--dir", lab_dir).returncode == 0
    unknown = lab("up", "--engines", "postgres,oracle", "--dir", lab_dir)
    assert unknown.returncode == 2 and "unknown oracle" in unknown.stderr
    assert not os.path.exists(lab_dir)


def test_lab_refuses_a_directory_that_is_not_a_lab(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    up = lab("up", "--dir", str(tmp_path), "--detach")
    assert up.returncode == 1 and "not a lab directory" in up.stderr
    assert (tmp_path / "precious.txt").read_text() == "keep me"
