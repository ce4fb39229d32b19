"""The driver matrix of issue 13 on PostgreSQL: each driver's own pool (and its reset on return) with more
clients than the proxy's backends, real server, real drivers. Each test asserts the rows, zero borrow timeouts
(the proxy's pool-timeout counter) and zero pins (gauge and detections) where none is due.

Plain psycopg, pg8000, psql and pgbench's TPC-B rows are covered in test_pg_clients.py, asyncpg's pool reset
in test_pg_spurious_pins.py; here are the pools and ORMs, and pgbench's select-only run per query mode."""
from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import threading
import uuid

import asyncpg
import psycopg
import psycopg_pool
import pytest
import sqlalchemy
from sqlalchemy.ext.asyncio import create_async_engine

from .helpers import metric, metrics_text
from .pgserver import AUTH_DB
from .test_pg_clients import client_env
from .test_pg_pinning import pinned, proxy_config

USER = "mp_trust"
BACKENDS = 3                  # the proxy's max_size
CLIENTS = 12                  # the driver pool's size: four clients per backend
ROUNDS = 8                    # transactions per client
CONNECT_TIMEOUT = 10


def quiet(proxy) -> None:
    """No borrow gave up, nothing pinned now, and no statement that would pin was seen."""
    text = metrics_text(proxy)
    assert (metric(text, "multiproxy_database_connection_borrow_timeouts_total") or 0) == 0, text
    assert pinned(proxy) == 0, text
    assert (metric(text, "multiproxy_pin_reasons_detected_total") or 0) == 0, text


@pytest.fixture
def table(pg):
    """A fresh table (client int, round int) the test user may write, dropped afterwards."""
    name = f"drv_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(host=pg.host, port=pg.port, user="postgres", dbname=AUTH_DB, autocommit=True) as admin:
        admin.execute(f"CREATE TABLE {name} (client int, round int, PRIMARY KEY (client, round))")
        admin.execute(f"GRANT ALL ON {name} TO {USER}")
    yield name
    with psycopg.connect(host=pg.host, port=pg.port, user="postgres", dbname=AUTH_DB, autocommit=True) as admin:
        assert admin.execute(f"SELECT count(*), sum(round) FROM {name}").fetchone() == (
            CLIENTS * ROUNDS, CLIENTS * sum(range(ROUNDS)))
        admin.execute(f"DROP TABLE {name}")


@pytest.fixture
def proxy(pg, proxy_factory):
    return proxy_factory(proxy_config(pg, max_size=BACKENDS, borrow_timeout=10.0))


def dsn(proxy) -> str:
    return f"host={proxy.host} port={proxy.port} user={USER} dbname={AUTH_DB} connect_timeout={CONNECT_TIMEOUT}"


def run_threads(work) -> None:
    errors: list[str] = []

    def guarded(client: int) -> None:
        try:
            work(client)
        except Exception as exc:  # noqa: BLE001
            errors.append(f"client {client}: {exc!r}")

    threads = [threading.Thread(target=guarded, args=(client,)) for client in range(CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(40)
    assert errors == []


@pytest.mark.timeout(60)
def test_asyncpg_pool_with_transactions(proxy, table):
    async def scenario():
        pool = await asyncpg.create_pool(host=proxy.host, port=proxy.port, user=USER, database=AUTH_DB,
                                         min_size=CLIENTS, max_size=CLIENTS, timeout=CONNECT_TIMEOUT,
                                         command_timeout=20)
        try:
            async def client(n: int) -> None:
                for r in range(ROUNDS):
                    async with pool.acquire() as conn:
                        async with conn.transaction():
                            await conn.execute(f"INSERT INTO {table} VALUES ($1, $2)", n, r)
                            assert await conn.fetchval(f"SELECT count(*) FROM {table} WHERE client = $1", n) == r + 1

            await asyncio.gather(*(client(n) for n in range(CLIENTS)))
            quiet(proxy)
        finally:
            await asyncio.wait_for(pool.close(), 20)

    asyncio.run(asyncio.wait_for(scenario(), 50))


@pytest.mark.timeout(60)
def test_psycopg_pool_connection_pool(proxy, table):
    # Default prepare_threshold: after five runs psycopg prepares its statements (virtualised by the proxy).
    with psycopg_pool.ConnectionPool(dsn(proxy), min_size=CLIENTS, max_size=CLIENTS, timeout=20, open=True) as pool:
        pool.wait(20)

        def client(n: int) -> None:
            for r in range(ROUNDS):
                with pool.connection() as conn:        # BEGIN, the statements, COMMIT on leaving
                    conn.execute(f"INSERT INTO {table} VALUES (%s, %s)", (n, r))
                    count = conn.execute(f"SELECT count(*) FROM {table} WHERE client = %s", (n,)).fetchone()[0]
                    assert count == r + 1

        run_threads(client)
        quiet(proxy)


@pytest.mark.timeout(60)
def test_psycopg_pool_async_connection_pool(proxy, table):
    async def scenario():
        async with psycopg_pool.AsyncConnectionPool(dsn(proxy), min_size=CLIENTS, max_size=CLIENTS, timeout=20,
                                                    open=False) as pool:
            await pool.wait(20)

            async def client(n: int) -> None:
                for r in range(ROUNDS):
                    async with pool.connection() as conn:
                        await conn.execute(f"INSERT INTO {table} VALUES (%s, %s)", (n, r))
                        cursor = await conn.execute(f"SELECT count(*) FROM {table} WHERE client = %s", (n,))
                        assert (await cursor.fetchone())[0] == r + 1

            await asyncio.gather(*(client(n) for n in range(CLIENTS)))
            quiet(proxy)

    asyncio.run(asyncio.wait_for(scenario(), 50))


@pytest.mark.timeout(60)
def test_sqlalchemy_psycopg(proxy, table):
    engine = sqlalchemy.create_engine(f"postgresql+psycopg://{USER}@{proxy.host}:{proxy.port}/{AUTH_DB}",
                                      pool_size=CLIENTS, max_overflow=0, pool_timeout=20,
                                      connect_args={"connect_timeout": CONNECT_TIMEOUT})
    insert = sqlalchemy.text(f"INSERT INTO {table} VALUES (:client, :round)")
    count = sqlalchemy.text(f"SELECT count(*) FROM {table} WHERE client = :client")
    try:
        def client(n: int) -> None:
            for r in range(ROUNDS):
                with engine.begin() as conn:        # its pool rolls back on return (reset_on_return)
                    conn.execute(insert, {"client": n, "round": r})
                    assert conn.execute(count, {"client": n}).scalar_one() == r + 1
                with engine.connect() as conn:      # autobegin, then returned without commit: rolled back
                    assert conn.execute(count, {"client": n}).scalar_one() == r + 1

        run_threads(client)
        quiet(proxy)
    finally:
        engine.dispose()


@pytest.mark.timeout(60)
def test_sqlalchemy_asyncpg(proxy, table):
    async def scenario():
        engine = create_async_engine(f"postgresql+asyncpg://{USER}@{proxy.host}:{proxy.port}/{AUTH_DB}",
                                     pool_size=CLIENTS, max_overflow=0, pool_timeout=20,
                                     connect_args={"timeout": CONNECT_TIMEOUT})
        insert = sqlalchemy.text(f"INSERT INTO {table} VALUES (:client, :round)")
        count = sqlalchemy.text(f"SELECT count(*) FROM {table} WHERE client = :client")
        try:
            async def client(n: int) -> None:
                for r in range(ROUNDS):
                    async with engine.begin() as conn:
                        await conn.execute(insert, {"client": n, "round": r})
                        assert (await conn.execute(count, {"client": n})).scalar_one() == r + 1

            await asyncio.gather(*(client(n) for n in range(CLIENTS)))
            quiet(proxy)
        finally:
            await engine.dispose()

    asyncio.run(asyncio.wait_for(scenario(), 50))


PGBENCH_TRANSACTIONS = 100


@pytest.mark.timeout(60)
@pytest.mark.skipif(shutil.which("pgbench") is None, reason="pgbench is not installed")
@pytest.mark.parametrize("mode", ["simple", "extended", "prepared"])
def test_pgbench_select_only(pg, proxy, mode):
    base = ["-h", proxy.host, "-p", str(proxy.port), "-U", USER]
    init = subprocess.run(["pgbench", "-i", "-s", "1", "-q", "-h", pg.host, "-p", str(pg.port), "-U", USER, AUTH_DB],
                          capture_output=True, text=True, env=client_env(), timeout=60)
    assert init.returncode == 0, init.stderr
    run = subprocess.run(["pgbench", "-n", "-S", "-M", mode, "-c", str(CLIENTS), "-j", "2",
                          "-t", str(PGBENCH_TRANSACTIONS), *base, AUTH_DB],
                         capture_output=True, text=True, env=client_env(), timeout=50)
    assert run.returncode == 0, f"{run.stdout}\n{run.stderr}\n{proxy.log_tail()}"
    total = CLIENTS * PGBENCH_TRANSACTIONS
    processed = re.search(r"number of transactions actually processed: (\d+)/(\d+)", run.stdout)
    assert processed and processed.groups() == (str(total), str(total)), run.stdout
    text = metrics_text(proxy)
    assert (metric(text, "multiproxy_database_connection_borrow_timeouts_total") or 0) == 0, text
    assert pinned(proxy) == 0
