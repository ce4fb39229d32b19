"""Real PostgreSQL clients through the proxy in transaction mode: psql, pgbench, psycopg 3, pg8000, asyncpg.

Every test starts its own proxy in front of the session's private PostgreSQL, connects as mp_trust to
mpdb (trust on both legs) and checks rows, counts and states the server really holds.
"""
from __future__ import annotations

import asyncio
import datetime
import decimal
import os
import re
import shutil
import subprocess
import uuid

import asyncpg
import pg8000.dbapi
import pg8000.native
import psycopg
import pytest

from .pgserver import AUTH_DB
from .proxy import free_port

USER = "mp_trust"
CONNECT_TIMEOUT = 10


# -- helpers ---------------------------------------------------------------------------------------

def proxy_config(pg, max_size: int = 5, borrow_timeout: float = 10.0) -> dict:
    return {
        "proxy": {"admin_listen": f"127.0.0.1:{free_port()}", "log_level": "info"},
        "clusters": {"main": {"engine": "postgres", "hosts": [f"127.0.0.1:{pg.port}"], "backend": {"tls": "disable"},
                              "pool": {"mode": "transaction", "max_size": max_size,
                                       "borrow_timeout": borrow_timeout}}},
        "listeners": [{"name": "pg", "listen": f"127.0.0.1:{free_port()}", "cluster": "main", "role": "writer",
                       "auth": "trust"}],
    }


@pytest.fixture
def proxy(pg, proxy_factory):
    return proxy_factory(proxy_config(pg))


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


def client_env() -> dict[str, str]:
    """The environment for psql/pgbench without PG* variables or a password file from the machine."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["PGPASSFILE"] = os.devnull
    env["LC_ALL"] = "C"
    env["PGCONNECT_TIMEOUT"] = str(CONNECT_TIMEOUT)
    return env


def run_psql(proxy, *args: str, stdin: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    cmd = ["psql", "-X", "-q", "-A", "-t", "-w", "-v", "ON_ERROR_STOP=1", "-h", proxy.host, "-p", str(proxy.port),
           "-U", USER, "-d", AUTH_DB, *args]
    return subprocess.run(cmd, input=stdin, capture_output=True, text=True, env=client_env(), timeout=timeout)


def direct(pg, sql: str) -> str:
    """Ask the server itself (not through the proxy), as the superuser."""
    return pg.psql(sql, db=AUTH_DB)


def psycopg_connect(proxy, **kwargs) -> psycopg.Connection:
    return psycopg.connect(host=proxy.host, port=proxy.port, user=USER, dbname=AUTH_DB,
                           connect_timeout=CONNECT_TIMEOUT, **kwargs)


# -- psql ------------------------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_psql_queries(proxy):
    out = run_psql(proxy, "-c", "SELECT 1 + 1, current_user, current_database()")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"2|{USER}|{AUTH_DB}"
    # Several -c in one session, each its own simple-protocol Query.
    out = run_psql(proxy, "-c", "SELECT 'a'", "-c", "SELECT count(*) FROM generate_series(1, 1000)",
                   "-c", "SELECT string_agg(x::text, ',') FROM generate_series(1, 5) x")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["a", "1000", "1,2,3,4,5"]
    # An error is reported with its SQLSTATE text and psql exits 1 (ON_ERROR_STOP).
    out = run_psql(proxy, "-c", "SELECT 1/0")
    assert out.returncode == 1
    assert "division by zero" in out.stderr


@pytest.mark.timeout(60)
def test_psql_multi_statement_transaction(pg, proxy):
    table = unique("psql_tx")
    script = f"""
CREATE TABLE {table} (id int PRIMARY KEY, note text);
BEGIN;
INSERT INTO {table} VALUES (1, 'one');
INSERT INTO {table} VALUES (2, 'two');
SELECT count(*) FROM {table};
COMMIT;
BEGIN;
INSERT INTO {table} VALUES (3, 'three');
ROLLBACK;
BEGIN; INSERT INTO {table} VALUES (4, 'four'); UPDATE {table} SET note = upper(note) WHERE id = 1; COMMIT;
SELECT string_agg(id || ':' || note, ',' ORDER BY id) FROM {table};
"""
    out = run_psql(proxy, "-f", "-", stdin=script)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["2", "1:ONE,2:two,4:four"]
    assert direct(pg, f"SELECT count(*), sum(id) FROM {table};") == "3|7"
    # A failed statement inside a transaction aborts it as a whole; psql keeps going without ON_ERROR_STOP.
    script = f"""
BEGIN;
INSERT INTO {table} VALUES (5, 'five');
INSERT INTO {table} VALUES (1, 'duplicate');
COMMIT;
SELECT count(*) FROM {table};
"""
    out = run_psql(proxy, "-v", "ON_ERROR_STOP=0", "-f", "-", stdin=script)
    assert "duplicate key value" in out.stderr
    assert out.stdout.split() == ["3"]
    direct(pg, f"DROP TABLE {table};")


@pytest.mark.timeout(60)
def test_psql_copy_in_and_out(pg, proxy, tmp_path):
    table = unique("psql_copy")
    source = tmp_path / "in.csv"
    rows = [f"{i},name {i},{i * 1.5}" for i in range(1, 5001)]
    source.write_text("\n".join(rows) + "\n")
    out = run_psql(proxy, "-c", f"CREATE TABLE {table} (id int, name text, v numeric)")
    assert out.returncode == 0, out.stderr
    out = run_psql(proxy, "-c", f"\\copy {table} FROM '{source}' WITH (FORMAT csv)")
    assert out.returncode == 0, out.stderr
    assert direct(pg, f"SELECT count(*), sum(id), sum(v) FROM {table};") == "5000|12502500|18753750.0"
    target = tmp_path / "out.csv"
    out = run_psql(proxy, "-c", f"\\copy (SELECT id, name, v FROM {table} ORDER BY id) TO '{target}' WITH (FORMAT csv)")
    assert out.returncode == 0, out.stderr
    assert target.read_text().splitlines() == rows
    # COPY in inside a transaction, then a query in the same session: the session is still usable.
    script = f"BEGIN;\n\\copy {table} FROM '{source}' WITH (FORMAT csv)\nSELECT count(*) FROM {table};\nROLLBACK;\n" \
             f"SELECT count(*) FROM {table};\n"
    out = run_psql(proxy, "-f", "-", stdin=script)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["10000", "5000"]
    # A COPY that fails in the middle (bad row) reports the error and leaves the table as it was.
    bad = tmp_path / "bad.csv"
    bad.write_text("\n".join(rows[:100] + ["not-a-number,x,1"]) + "\n")
    out = run_psql(proxy, "-c", f"\\copy {table} FROM '{bad}' WITH (FORMAT csv)")
    assert out.returncode != 0
    assert "invalid input syntax for type integer" in out.stderr
    out = run_psql(proxy, "-c", f"SELECT count(*) FROM {table}")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "5000"
    direct(pg, f"DROP TABLE {table};")


# -- pgbench ---------------------------------------------------------------------------------------

PGBENCH_CLIENTS = 8
PGBENCH_TRANSACTIONS = 200


def run_pgbench(pg, proxy, mode: str, clients: int) -> subprocess.CompletedProcess:
    """pgbench -i, then the TPC-B default script with `clients` clients and PGBENCH_TRANSACTIONS each."""
    base = ["-h", proxy.host, "-p", str(proxy.port), "-U", USER]
    init = subprocess.run(["pgbench", "-i", "-s", "1", "-q", *base, AUTH_DB], capture_output=True, text=True,
                          env=client_env(), timeout=120)
    assert init.returncode == 0, init.stderr
    assert direct(pg, "SELECT count(*) FROM pgbench_accounts;") == "100000"
    assert direct(pg, "SELECT count(*) FROM pgbench_history;") == "0"
    return subprocess.run(["pgbench", "-n", "-M", mode, "-c", str(clients), "-t", str(PGBENCH_TRANSACTIONS),
                           *base, AUTH_DB], capture_output=True, text=True, env=client_env(), timeout=90)


def check_pgbench(pg, proxy, run: subprocess.CompletedProcess, clients: int) -> None:
    assert run.returncode == 0, f"pgbench failed:\n{run.stdout}\n{run.stderr}\n{proxy.log_tail()}"
    total = clients * PGBENCH_TRANSACTIONS
    processed = re.search(r"number of transactions actually processed: (\d+)/(\d+)", run.stdout)
    assert processed and processed.groups() == (str(total), str(total)), run.stdout
    failed = re.search(r"number of failed transactions: (\d+)", run.stdout)
    assert failed is None or failed.group(1) == "0", run.stdout
    assert "error" not in run.stderr.lower(), run.stderr
    # Every TPC-B transaction inserts exactly one history row, and moves the same delta through all tables.
    assert direct(pg, "SELECT count(*) FROM pgbench_history;") == str(total)
    sums = direct(pg, "SELECT (SELECT sum(delta) FROM pgbench_history), (SELECT sum(abalance) FROM pgbench_accounts), "
                      "(SELECT sum(bbalance) FROM pgbench_branches), (SELECT sum(tbalance) FROM pgbench_tellers);")
    history, accounts, branches, tellers = sums.split("|")
    assert history == accounts == branches == tellers




@pytest.mark.timeout(120)
@pytest.mark.skipif(shutil.which("pgbench") is None, reason="pgbench is not installed")
@pytest.mark.parametrize("mode", ["simple", "extended", "prepared"])
def test_pgbench(pg, proxy_factory, mode):
    """pgbench -c 8 over a pool of 5, for each query mode."""
    proxy = proxy_factory(proxy_config(pg, max_size=5, borrow_timeout=5.0))
    run = run_pgbench(pg, proxy, mode, PGBENCH_CLIENTS)
    check_pgbench(pg, proxy, run, PGBENCH_CLIENTS)


@pytest.mark.timeout(120)
@pytest.mark.skipif(shutil.which("pgbench") is None, reason="pgbench is not installed")
def test_pgbench_prepared_within_pool_size(pg, proxy_factory):
    """-M prepared works by pinning when every client can have its own backend."""
    proxy = proxy_factory(proxy_config(pg, max_size=5, borrow_timeout=5.0))
    run = run_pgbench(pg, proxy, "prepared", 5)
    check_pgbench(pg, proxy, run, 5)


# -- psycopg 3 -------------------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_psycopg_autocommit_and_transactions(pg, proxy):
    table = unique("pscg")
    with psycopg_connect(proxy, autocommit=True) as conn:
        assert conn.execute("SELECT %s::int + %s::int, %s::text", (40, 2, "x")).fetchone() == (42, "x")
        conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, v text, at timestamptz, amount numeric)")
        conn.execute(f"INSERT INTO {table} VALUES (%s, %s, %s, %s)",
                     (1, "auto", datetime.datetime(2024, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc),
                      decimal.Decimal("12.34")))
        # An autocommit insert is visible to others at once.
        assert direct(pg, f"SELECT v, amount FROM {table};") == "auto|12.34"
        row = conn.execute(f"SELECT id, v, at, amount FROM {table}").fetchone()
        assert row == (1, "auto", datetime.datetime(2024, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc),
                       decimal.Decimal("12.34"))
    with psycopg_connect(proxy) as conn:
        with conn.transaction():
            conn.execute(f"INSERT INTO {table} (id, v) VALUES (2, 'tx')")
            conn.execute(f"INSERT INTO {table} (id, v) VALUES (3, 'tx')")
            assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
            assert direct(pg, f"SELECT count(*) FROM {table};") == "1"  # not committed yet
        assert direct(pg, f"SELECT count(*) FROM {table};") == "3"
        with pytest.raises(psycopg.errors.UniqueViolation):
            with conn.transaction():
                conn.execute(f"INSERT INTO {table} (id, v) VALUES (4, 'lost')")
                conn.execute(f"INSERT INTO {table} (id, v) VALUES (1, 'dup')")
        assert conn.execute(f"SELECT count(*) FROM {table}").fetchone() == (3,)
        # Savepoints inside one transaction.
        with conn.transaction():
            conn.execute(f"INSERT INTO {table} (id, v) VALUES (5, 'outer')")
            with pytest.raises(psycopg.errors.UniqueViolation):
                with conn.transaction():
                    conn.execute(f"INSERT INTO {table} (id, v) VALUES (5, 'inner dup')")
            conn.execute(f"INSERT INTO {table} (id, v) VALUES (6, 'outer')")
        conn.commit()
        assert conn.execute(f"SELECT array_agg(id ORDER BY id) FROM {table}").fetchone() == ([1, 2, 3, 5, 6],)
        conn.rollback()
        # Non-autocommit default: statements open a transaction that stays open until commit.
        conn.execute(f"DELETE FROM {table} WHERE id = 6")
        assert direct(pg, f"SELECT count(*) FROM {table};") == "5"
        conn.commit()
        assert direct(pg, f"SELECT count(*) FROM {table};") == "4"
    direct(pg, f"DROP TABLE {table};")


@pytest.mark.timeout(60)
def test_psycopg_pipeline(pg, proxy):
    table = unique("pscg_pipe")
    with psycopg_connect(proxy, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, v text)")
        with conn.pipeline():
            cursors = []
            for i in range(1, 51):
                conn.execute(f"INSERT INTO {table} VALUES (%s, %s)", (i, f"v{i}"))
            for i in (1, 25, 50):
                cursors.append(conn.execute(f"SELECT v FROM {table} WHERE id = %s", (i,)))
            count = conn.execute(f"SELECT count(*) FROM {table}")
        assert [c.fetchone() for c in cursors] == [("v1",), ("v25",), ("v50",)]
        assert count.fetchone() == (50,)
        # A pipeline inside a transaction, with executemany.
        with conn.transaction(), conn.pipeline():
            with conn.cursor() as cur:
                cur.executemany(f"INSERT INTO {table} VALUES (%s, %s)", [(i, f"w{i}") for i in range(51, 101)])
            total = conn.execute(f"SELECT count(*), sum(id) FROM {table}")
        assert total.fetchone() == (100, 5050)
        # An error inside a pipeline aborts the statements up to the next Sync (one implicit transaction, as
        # PostgreSQL does it); what an earlier Sync closed stays; the connection is usable afterwards.
        with pytest.raises(psycopg.errors.UniqueViolation):
            with conn.pipeline() as pipeline:
                conn.execute(f"INSERT INTO {table} VALUES (101, 'synced')")
                pipeline.sync()
                conn.execute(f"INSERT INTO {table} VALUES (102, 'rolled back')")
                conn.execute(f"INSERT INTO {table} VALUES (1, 'dup')")
                conn.execute(f"INSERT INTO {table} VALUES (103, 'skipped')")
        assert conn.execute(f"SELECT array_agg(id ORDER BY id) FROM {table} WHERE id > 100").fetchone() == ([101],)
        assert conn.execute(f"SELECT count(*) FROM {table}").fetchone() == (101,)
    assert direct(pg, f"SELECT count(*) FROM {table};") == "101"
    direct(pg, f"DROP TABLE {table};")


@pytest.mark.timeout(60)
def test_psycopg_prepared_statements(proxy):
    with psycopg_connect(proxy, autocommit=True) as conn:
        results = [conn.execute("SELECT %s::int * 2, %s::text", (i, f"p{i}"), prepare=True).fetchone()
                   for i in range(20)]
        assert results == [(i * 2, f"p{i}") for i in range(20)]
        # The statement is really prepared server-side (named) on the backend serving this client.
        names = conn.execute("SELECT count(*) FROM pg_prepared_statements WHERE NOT from_sql").fetchone()[0]
        assert names >= 1
        with conn.transaction():
            assert conn.execute("SELECT %s::int * 2, %s::text", (100, "tx"), prepare=True).fetchone() == (200, "tx")
    with psycopg_connect(proxy, autocommit=True, prepare_threshold=0) as conn:
        results = []
        for i in range(30):
            results.append(conn.execute("SELECT %s::int + 1000", (i,)).fetchone()[0])
            if i % 10 == 0:
                with conn.transaction():
                    assert conn.execute("SELECT %s::int + 1000", (-1,)).fetchone() == (999,)
        assert results == [i + 1000 for i in range(30)]
        assert conn.execute("SELECT count(*) FROM generate_series(1, %s)", (7,)).fetchone() == (7,)


@pytest.mark.timeout(60)
def test_psycopg_copy(pg, proxy):
    table = unique("pscg_copy")
    with psycopg_connect(proxy, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {table} (id int, name text, v float8)")
        with conn.cursor() as cur:
            with cur.copy(f"COPY {table} (id, name, v) FROM STDIN") as copy:
                for i in range(1, 10001):
                    copy.write_row((i, f"n{i}", i / 4))
            assert conn.execute(f"SELECT count(*), sum(id), sum(v) FROM {table}").fetchone() == (10000, 50005000, 12501250.0)
            # Binary COPY in a transaction.
            with conn.transaction():
                with cur.copy(f"COPY {table} (id, name, v) FROM STDIN (FORMAT BINARY)") as copy:
                    copy.set_types(["int4", "text", "float8"])
                    for i in range(10001, 10101):
                        copy.write_row((i, None, 0.5))
            assert conn.execute(f"SELECT count(*) FROM {table} WHERE name IS NULL").fetchone() == (100,)
            rows = []
            with cur.copy(f"COPY (SELECT id, name FROM {table} WHERE id <= 1000 ORDER BY id) TO STDOUT") as copy:
                for row in copy.rows():
                    rows.append(row)
            assert rows == [(str(i), f"n{i}") for i in range(1, 1001)]
            # COPY data with an error: the error reaches the client, the connection stays usable.
            with pytest.raises(psycopg.errors.InvalidTextRepresentation):
                with cur.copy(f"COPY {table} (id, name) FROM STDIN") as copy:
                    copy.write("1\tok\nnot-an-int\tbad\n")
            assert conn.execute(f"SELECT count(*) FROM {table}").fetchone() == (10100,)
    assert direct(pg, f"SELECT count(*) FROM {table};") == "10100"
    direct(pg, f"DROP TABLE {table};")


# -- pg8000 ----------------------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_pg8000_native(pg, proxy):
    table = unique("p8n")
    conn = pg8000.native.Connection(USER, host=proxy.host, port=proxy.port, database=AUTH_DB, timeout=CONNECT_TIMEOUT)
    try:
        assert conn.run("SELECT :a::int + :b::int, :s::text", a=1, b=2, s="three") == [[3, "three"]]
        conn.run(f"CREATE TABLE {table} (id int PRIMARY KEY, v text, d date)")
        for i in range(1, 21):
            conn.run(f"INSERT INTO {table} VALUES (:id, :v, :d)", id=i, v=f"v{i}", d=datetime.date(2024, 1, i))
        assert conn.run(f"SELECT count(*), max(d) FROM {table}") == [[20, datetime.date(2024, 1, 20)]]
        conn.run("START TRANSACTION")
        conn.run(f"DELETE FROM {table} WHERE id > :n", n=10)
        assert conn.run(f"SELECT count(*) FROM {table}") == [[10]]
        conn.run("ROLLBACK")
        assert conn.run(f"SELECT count(*) FROM {table}") == [[20]]
        conn.run("BEGIN")
        conn.run(f"UPDATE {table} SET v = upper(v) WHERE id <= :n", n=5)
        conn.run("COMMIT")
        assert conn.run(f"SELECT count(*) FROM {table} WHERE v LIKE 'V%'") == [[5]]
        # pg8000's own prepared statements (named, unnamed in pg8000 <1.30 is not used here).
        ps = conn.prepare(f"SELECT v FROM {table} WHERE id = :id")
        try:
            assert [ps.run(id=i) for i in (1, 7, 20)] == [[["V1"]], [["v7"]], [["v20"]]]
        finally:
            ps.close()
        with pytest.raises(pg8000.native.DatabaseError) as err:
            conn.run("SELECT 1/0")
        assert err.value.args[0]["C"] == "22012"
        assert conn.run("SELECT 'still works'") == [["still works"]]
    finally:
        conn.close()
    assert direct(pg, f"SELECT count(*) FROM {table} WHERE v LIKE 'V%';") == "5"
    direct(pg, f"DROP TABLE {table};")


@pytest.mark.timeout(60)
def test_pg8000_dbapi(pg, proxy):
    table = unique("p8d")
    conn = pg8000.dbapi.connect(user=USER, host=proxy.host, port=proxy.port, database=AUTH_DB, timeout=CONNECT_TIMEOUT)
    try:
        cur = conn.cursor()
        cur.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, v text)")
        conn.commit()
        cur.executemany(f"INSERT INTO {table} VALUES (%s, %s)", [(i, f"v{i}") for i in range(1, 101)])
        cur.execute(f"SELECT count(*) FROM {table}")
        assert cur.fetchone() == [100]
        assert direct(pg, f"SELECT count(*) FROM {table};") == "0"  # dbapi: still in the transaction
        conn.commit()
        assert direct(pg, f"SELECT count(*) FROM {table};") == "100"
        cur.execute(f"DELETE FROM {table} WHERE id % 2 = 0")
        assert cur.rowcount == 50
        conn.rollback()
        cur.execute(f"SELECT count(*), sum(id) FROM {table} WHERE v = ANY(%s)", (["v1", "v2", "v3"],))
        assert cur.fetchone() == [3, 6]
        with pytest.raises(pg8000.dbapi.DatabaseError) as err:
            cur.execute(f"INSERT INTO {table} VALUES (1, 'dup')")
        assert err.value.args[0]["C"] == "23505"
        conn.rollback()
        cur.execute(f"SELECT v FROM {table} WHERE id = %s", (42,))
        assert cur.fetchall() == (["v42"],)
        conn.rollback()
        conn.autocommit = True
        cur.execute(f"UPDATE {table} SET v = 'auto' WHERE id = 1")
        assert direct(pg, f"SELECT v FROM {table} WHERE id = 1;") == "auto"
    finally:
        conn.close()
    direct(pg, f"DROP TABLE {table};")


# -- asyncpg ---------------------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_asyncpg(pg, proxy):
    table = unique("apg")

    async def scenario():
        conn = await asyncpg.connect(host=proxy.host, port=proxy.port, user=USER, database=AUTH_DB,
                                     timeout=CONNECT_TIMEOUT, command_timeout=30)
        try:
            assert await conn.fetchval("SELECT $1::int * 3", 14) == 42
            await conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, name text, v float8)")
            rows = await conn.fetch("SELECT g AS n, g * g AS sq FROM generate_series(1, $1) g", 5)
            assert [(r["n"], r["sq"]) for r in rows] == [(1, 1), (2, 4), (3, 9), (4, 16), (5, 25)]
            stmt = await conn.prepare(f"INSERT INTO {table} VALUES ($1, $2, $3)")
            for i in range(1, 11):
                await stmt.fetch(i, f"p{i}", i * 0.5)
            select = await conn.prepare(f"SELECT name FROM {table} WHERE id = $1")
            assert [await select.fetchval(i) for i in (1, 5, 10)] == ["p1", "p5", "p10"]
            async with conn.transaction():
                await conn.execute(f"INSERT INTO {table} VALUES (11, 'tx', 0)")
                assert await conn.fetchval(f"SELECT count(*) FROM {table}") == 11
            try:
                async with conn.transaction():
                    await conn.execute(f"INSERT INTO {table} VALUES (12, 'rolled back', 0)")
                    raise RuntimeError("roll back")
            except RuntimeError:
                pass
            assert await conn.fetchval(f"SELECT count(*) FROM {table}") == 11
            with pytest.raises(asyncpg.UniqueViolationError):
                async with conn.transaction():
                    await conn.execute(f"INSERT INTO {table} VALUES (13, 'lost', 0)")
                    await conn.execute(f"INSERT INTO {table} VALUES (1, 'dup', 0)")
            await conn.executemany(f"INSERT INTO {table} VALUES ($1, $2, $3)",
                                   [(i, f"m{i}", float(i)) for i in range(100, 300)])
            assert await conn.fetchval(f"SELECT count(*) FROM {table} WHERE name LIKE 'm%'") == 200
            copied = await conn.copy_records_to_table(
                table, records=[(i, f"c{i}", i / 2) for i in range(1000, 3000)], columns=["id", "name", "v"])
            assert copied == "COPY 2000"
            assert await conn.fetchrow(f"SELECT count(*), sum(id) FROM {table}") == (
                2211, sum(range(1, 12)) + sum(range(100, 300)) + sum(range(1000, 3000)))
            out = await conn.fetch(f"SELECT id FROM {table} WHERE id BETWEEN $1 AND $2 ORDER BY id", 1000, 1004)
            assert [r["id"] for r in out] == [1000, 1001, 1002, 1003, 1004]
        finally:
            await conn.close()

    asyncio.run(asyncio.wait_for(scenario(), 50))
    assert direct(pg, f"SELECT count(*) FROM {table};") == "2211"
    direct(pg, f"DROP TABLE {table};")
