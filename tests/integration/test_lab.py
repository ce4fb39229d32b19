"""`multiproxy lab` end to end: up --detach, env, writes and replicated reads through the proxy, status, failover, down
(PostgreSQL, MariaDB and TDS in one lab)."""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from urllib.parse import unquote, urlsplit

import psycopg
import pymysql
import pytest
import pytds

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV_NAMES = {"MULTIPROXY_PG_URL", "MULTIPROXY_PG_READER_URL", "MULTIPROXY_PG_DIRECT_URL",
             "MULTIPROXY_MYSQL_URL", "MULTIPROXY_MYSQL_READER_URL", "MULTIPROXY_MYSQL_DIRECT_URL",
             "MULTIPROXY_TDS_URL", "MULTIPROXY_TDS_READER_URL", "MULTIPROXY_TDS_DIRECT_URL",
             "PGHOST", "PGPORT", "PGUSER", "PGPASSWORD", "PGDATABASE"}


def lab(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "MULTIPROXY_"))}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, os.environ.get("PYTHONPATH")) if p)
    return subprocess.run([sys.executable, "-m", "multiproxy", "lab", *args], capture_output=True, text=True,
                          env=env, timeout=timeout, stdin=subprocess.DEVNULL)


def parse_exports(text: str) -> dict[str, str]:
    values = {}
    for line in text.splitlines():
        assert line.startswith("export "), line
        name, _, value = line[len("export "):].partition("=")
        values[name] = shlex.split(value)[0]
    return values


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


def url_args(url: str) -> dict:
    parts = urlsplit(url)
    return {"host": parts.hostname, "port": parts.port, "user": unquote(parts.username),
            "password": unquote(parts.password), "database": parts.path.lstrip("/")}


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


def tds_args(url: str) -> dict:
    args = url_args(url)
    return {"dsn": args.pop("host"), **args, "autocommit": True, "login_timeout": 10}


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
