"""Transaction pooling through the proxy: many clients over few backends, parameter tracking, borrow timeout,
cancel, backend credentials and client authentication, all against a real PostgreSQL with real clients."""
from __future__ import annotations

import asyncio
import os
import re
import socket
import struct
import threading
import time
import urllib.request
import uuid

import asyncpg
import pg8000.dbapi
import pg8000.native
import psycopg
import pytest

from multiproxy.auth import UsersFile

from .pgserver import AUTH_DB
from .helpers import metric, metrics_text
from .proxy import free_port

USER = "mp_trust"
CONNECT_TIMEOUT = 10


# -- helpers ---------------------------------------------------------------------------------------

def proxy_config(pg, max_size: int = 5, borrow_timeout: float = 10.0, auth: str = "trust",
                 credentials: list | None = None, users_file: str | None = None) -> dict:
    cluster = {"engine": "postgres", "hosts": [f"127.0.0.1:{pg.port}"], "backend": {"tls": "disable"},
               "pool": {"mode": "transaction", "max_size": max_size, "borrow_timeout": borrow_timeout}}
    if credentials:
        cluster["credentials"] = credentials
    config = {
        "proxy": {"admin_listen": f"127.0.0.1:{free_port()}", "log_level": "info"},
        "clusters": {"main": cluster},
        "listeners": [{"name": "pg", "listen": f"127.0.0.1:{free_port()}", "cluster": "main", "role": "writer",
                       "auth": auth}],
    }
    if users_file:
        config["auth"] = {"users_file": users_file}
    return config


def psycopg_connect(proxy, user: str = USER, **kwargs) -> psycopg.Connection:
    kwargs.setdefault("connect_timeout", CONNECT_TIMEOUT)
    return psycopg.connect(host=proxy.host, port=proxy.port, user=user, dbname=AUTH_DB, **kwargs)


def direct_connect(pg) -> psycopg.Connection:
    """A superuser connection straight to the server, to look at what really happens there."""
    return psycopg.connect(host=pg.host, port=pg.port, user="postgres", dbname=AUTH_DB, autocommit=True,
                           connect_timeout=CONNECT_TIMEOUT)


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


# -- many clients over a small pool ------------------------------------------------------------------

CLIENTS = 200
TRANSACTIONS = 5
ROWS_PER_TRANSACTION = 3


@pytest.mark.timeout(120)
def test_200_clients_over_5_backends(pg, proxy_factory):
    proxy = proxy_factory(proxy_config(pg, max_size=5, borrow_timeout=60.0))
    table = f"many_{uuid.uuid4().hex[:8]}"
    with direct_connect(pg) as admin:
        admin.execute(f"CREATE TABLE {table} (client int, tx int, n int, backend int)")
        admin.execute(f"GRANT ALL ON {table} TO {USER}")
    errors: list[str] = []
    connected = threading.Barrier(CLIENTS + 1, timeout=60)
    done = threading.Event()
    samples = {"proxy_backends": [], "server_backends": [], "borrowed": []}

    def client(i: int) -> None:
        conn = None
        try:
            conn = psycopg_connect(proxy, prepare_threshold=None)  # unnamed statements only: no pinning
            connected.wait()
            for tx in range(TRANSACTIONS):
                with conn.transaction():
                    for n in range(ROWS_PER_TRANSACTION):
                        conn.execute(f"INSERT INTO {table} VALUES (%s, %s, %s, pg_backend_pid())", (i, tx, n))
                    got = conn.execute(f"SELECT count(*) FROM {table} WHERE client = %s", (i,)).fetchone()[0]
                    if got != (tx + 1) * ROWS_PER_TRANSACTION:
                        errors.append(f"client {i} tx {tx}: sees {got} of its rows")
        except BaseException as exc:  # noqa: BLE001 - every failure is reported below
            errors.append(f"client {i}: {type(exc).__name__}: {exc}")
            if connected.n_waiting and not connected.broken:
                connected.abort()
        finally:
            if conn is not None:
                conn.close()

    def sampler() -> None:
        with direct_connect(pg) as admin:
            for _ in range(100000):
                if done.is_set():
                    return
                text = metrics_text(proxy)
                samples["proxy_backends"].append(metric(text, "multiproxy_database_connections") or 0)
                samples["borrowed"].append(metric(text, "multiproxy_database_connections_currently_borrowed") or 0)
                samples["server_backends"].append(admin.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE usename = %s AND datname = %s",
                    (USER, AUTH_DB)).fetchone()[0])
                time.sleep(0.02)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(CLIENTS)]
    watcher = threading.Thread(target=sampler, daemon=True)
    watcher.start()
    for t in threads:
        t.start()
    connected.wait()
    clients_now = metric(metrics_text(proxy), "multiproxy_client_connections", listener="pg")
    for t in threads:
        t.join(90)
    done.set()
    watcher.join(10)
    assert not any(t.is_alive() for t in threads), "clients still running after 90 s"
    assert errors == [], f"{len(errors)} errors, first ones: {errors[:5]}\n{proxy.log_tail()}"
    assert clients_now == CLIENTS
    with direct_connect(pg) as admin:
        per_client = dict(admin.execute(f"SELECT client, count(*) FROM {table} GROUP BY client").fetchall())
        per_tx = admin.execute(f"SELECT count(*) FROM (SELECT client, tx FROM {table} GROUP BY client, tx "
                               f"HAVING count(*) = %s AND count(DISTINCT backend) = 1) t",
                               (ROWS_PER_TRANSACTION,)).fetchone()[0]
        backends = admin.execute(f"SELECT count(DISTINCT backend) FROM {table}").fetchone()[0]
        admin.execute(f"DROP TABLE {table}")
    assert per_client == {i: TRANSACTIONS * ROWS_PER_TRANSACTION for i in range(CLIENTS)}
    # Each transaction ran whole on one backend; all of them together used at most 5 backends.
    assert per_tx == CLIENTS * TRANSACTIONS
    assert 1 <= backends <= 5
    assert samples["proxy_backends"] and max(samples["proxy_backends"]) <= 5, samples["proxy_backends"]
    assert max(samples["server_backends"]) <= 5, samples["server_backends"]
    assert max(samples["borrowed"]) <= 5
    final = metrics_text(proxy)
    assert metric(final, "multiproxy_database_connections") <= 5
    assert metric(final, "multiproxy_database_connections_opened_total") <= 5
    assert metric(final, "multiproxy_database_connections_currently_borrowed") == 0
    assert not metric(final, "multiproxy_database_connections_currently_session_pinned")
    assert wait_for(lambda: metric(metrics_text(proxy), "multiproxy_client_connections", listener="pg") == 0, 10)


# -- ParameterStatus tracking ------------------------------------------------------------------------

SETTINGS_QUERY = ("SELECT current_setting('application_name'), current_setting('TimeZone'), "
                  "'2024-01-01 12:00:00+00'::timestamptz::text, pg_backend_pid()")
EXPECTED = {"a": ("a", "UTC", "2024-01-01 12:00:00+00"), "b": ("b", "Asia/Tokyo", "2024-01-01 21:00:00+09")}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["set", "startup"])
def test_parameter_status_follows_each_client(pg, proxy_factory, how):
    """Two clients with different application_name and TimeZone share one backend (pool of 1)."""
    proxy = proxy_factory(proxy_config(pg, max_size=1, borrow_timeout=10.0))
    conns = {}
    for name, (app, zone, _) in EXPECTED.items():
        if how == "set":
            conn = psycopg_connect(proxy, autocommit=True)
            conn.execute(f"SET application_name = '{app}'")
            conn.execute(f"SET TimeZone = '{zone}'")
        else:
            conn = psycopg_connect(proxy, autocommit=True, application_name=app, options=f"-c TimeZone={zone}")
        conns[name] = conn
    try:
        pids = set()
        for round_ in range(40):
            for name in ("a", "b") if round_ % 2 else ("b", "a"):
                conn = conns[name]
                if round_ % 3 == 0:
                    with conn.transaction():
                        row = conn.execute(SETTINGS_QUERY).fetchone()
                else:
                    row = conn.execute(SETTINGS_QUERY).fetchone()
                assert row[:3] == EXPECTED[name], f"round {round_}, client {name}"
                pids.add(row[3])
                assert conn.info.parameter_status("application_name") == EXPECTED[name][0]
                assert conn.info.parameter_status("TimeZone") == EXPECTED[name][1]
        assert len(pids) == 1  # one backend served both: the proxy switched its settings back and forth
        text = metrics_text(proxy)
        assert not metric(text, "multiproxy_database_connections_currently_session_pinned")
        assert metric(text, "multiproxy_database_connections") == 1
    finally:
        for conn in conns.values():
            conn.close()


# -- borrow timeout ------------------------------------------------------------------------------

@pytest.mark.timeout(60)
@pytest.mark.parametrize("client", ["psycopg", "pg8000", "asyncpg"])
def test_borrow_timeout_answers_53300_and_connection_survives(pg, proxy_factory, client):
    proxy = proxy_factory(proxy_config(pg, max_size=1, borrow_timeout=1.0))
    holder = psycopg_connect(proxy)
    try:
        assert holder.execute("SELECT 1").fetchone() == (1,)  # opens the transaction that keeps the only backend
        assert holder.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS

        if client == "psycopg":
            waiter = psycopg_connect(proxy, autocommit=True)
            started = time.monotonic()
            with pytest.raises(psycopg.Error) as refused:
                waiter.execute("SELECT 2")
            elapsed = time.monotonic() - started
            assert refused.value.sqlstate == "53300"
            holder.commit()
            assert waiter.execute("SELECT 2").fetchone() == (2,)
            assert waiter.execute("SELECT %s::int + 1", (2,)).fetchone() == (3,)
            waiter.close()
        elif client == "pg8000":
            waiter = pg8000.native.Connection(USER, host=proxy.host, port=proxy.port, database=AUTH_DB,
                                              timeout=CONNECT_TIMEOUT)
            started = time.monotonic()
            with pytest.raises(pg8000.native.DatabaseError) as refused:
                waiter.run("SELECT :x::int", x=2)
            elapsed = time.monotonic() - started
            assert refused.value.args[0]["C"] == "53300"
            holder.commit()
            assert waiter.run("SELECT :x::int", x=2) == [[2]]
            assert waiter.run("SELECT 3") == [[3]]
            waiter.close()
        else:
            async def scenario():
                waiter = await asyncpg.connect(host=proxy.host, port=proxy.port, user=USER, database=AUTH_DB,
                                               timeout=CONNECT_TIMEOUT, command_timeout=20)
                try:
                    began = time.monotonic()
                    with pytest.raises(asyncpg.PostgresError) as refused:
                        await waiter.fetchval("SELECT $1::int", 2)
                    took = time.monotonic() - began
                    assert refused.value.sqlstate == "53300"
                    holder.commit()
                    assert await waiter.fetchval("SELECT $1::int", 2) == 2
                    assert await waiter.fetchval("SELECT 3") == 3
                    return took
                finally:
                    await waiter.close()

            elapsed = asyncio.run(asyncio.wait_for(scenario(), 40))
        assert 0.9 <= elapsed < 5, elapsed
        text = metrics_text(proxy)
        assert metric(text, "multiproxy_database_connection_borrow_timeouts_total") == 1
        assert metric(text, "multiproxy_database_connections") == 1
        # The holder carries on normally too.
        assert holder.execute("SELECT 'holder'").fetchone() == ("holder",)
        holder.commit()
    finally:
        holder.close()


# -- cancel ----------------------------------------------------------------------------------------

def sleeping_queries(admin, pattern: str) -> int:
    return admin.execute("SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query LIKE %s",
                         (pattern,)).fetchone()[0]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("in_transaction", [False, True], ids=["autocommit", "transaction"])
def test_cancel_psycopg(pg, proxy_factory, in_transaction):
    proxy = proxy_factory(proxy_config(pg, max_size=2))
    with psycopg_connect(proxy, autocommit=not in_transaction) as conn, direct_connect(pg) as admin:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        canceller = threading.Thread(target=lambda: (
            wait_for(lambda: sleeping_queries(admin, "SELECT pg_sleep(30)%") == 1, 10), conn.cancel_safe(timeout=10)),
            daemon=True)
        canceller.start()
        started = time.monotonic()
        with pytest.raises(psycopg.errors.QueryCanceled) as cancelled:
            conn.execute("SELECT pg_sleep(30)")
        elapsed = time.monotonic() - started
        canceller.join(10)
        assert cancelled.value.sqlstate == "57014"
        assert elapsed < 10
        if in_transaction:
            assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR
            conn.rollback()
        assert conn.execute("SELECT 'after cancel'").fetchone() == ("after cancel",)
        assert sleeping_queries(admin, "SELECT pg_sleep(30)%") == 0
        text = metrics_text(proxy)
        assert metric(text, "multiproxy_cancel_requests_total", outcome="forwarded") == 1


@pytest.mark.timeout(60)
def test_cancel_asyncpg_timeout(pg, proxy_factory):
    """asyncpg cancels the query itself (CancelRequest on a new connection) when a call times out."""
    proxy = proxy_factory(proxy_config(pg, max_size=2))

    async def scenario():
        conn = await asyncpg.connect(host=proxy.host, port=proxy.port, user=USER, database=AUTH_DB,
                                     timeout=CONNECT_TIMEOUT, statement_cache_size=0)
        try:
            began = time.monotonic()
            with pytest.raises(asyncio.TimeoutError):
                await conn.fetchval("SELECT pg_sleep(30)", timeout=1.0)
            took = time.monotonic() - began
            assert await conn.fetchval("SELECT $1::text", "after cancel", timeout=10) == "after cancel"
            return took
        finally:
            await conn.close(timeout=10)

    with direct_connect(pg) as admin:
        elapsed = asyncio.run(asyncio.wait_for(scenario(), 40))
        assert elapsed < 5
        # The cancel reached the server: the sleep is gone, not left running on a pooled backend.
        assert wait_for(lambda: sleeping_queries(admin, "SELECT pg_sleep(30)%") == 0, 5)
    assert metric(metrics_text(proxy), "multiproxy_cancel_requests_total", outcome="forwarded") == 1


def send_cancel(proxy, pid: int, secret: int) -> bytes:
    """A raw CancelRequest on a new connection; returns what the proxy sent back before closing (nothing)."""
    with socket.create_connection((proxy.host, proxy.port), timeout=5) as sock:
        sock.sendall(struct.pack("!IIII", 16, 80877102, pid, secret))
        sock.settimeout(5)
        chunks = []
        for _ in range(100):
            data = sock.recv(4096)
            if not data:
                break
            chunks.append(data)
        return b"".join(chunks)


@pytest.mark.timeout(60)
def test_cancel_with_wrong_key_does_nothing(pg, proxy_factory):
    proxy = proxy_factory(proxy_config(pg, max_size=2))
    conn = pg8000.native.Connection(USER, host=proxy.host, port=proxy.port, database=AUTH_DB, timeout=CONNECT_TIMEOUT)
    result: dict = {}

    def sleeper():
        began = time.monotonic()
        try:
            result["rows"] = conn.run("SELECT pg_sleep(2), 'slept'")
        except Exception as exc:  # noqa: BLE001
            result["error"] = exc
        result["elapsed"] = time.monotonic() - began

    try:
        pid, secret = struct.unpack("!II", conn._backend_key_data)
        with direct_connect(pg) as admin:
            thread = threading.Thread(target=sleeper, daemon=True)
            thread.start()
            assert wait_for(lambda: sleeping_queries(admin, "SELECT pg_sleep(2)%") == 1, 10)
            assert send_cancel(proxy, pid, secret ^ 0x5A5A5A5A) == b""
            assert send_cancel(proxy, pid ^ 0x7FFF, secret) == b""
            assert send_cancel(proxy, 0, 0) == b""
            thread.join(15)
        assert "error" not in result, result.get("error")
        assert result["rows"] == [["", "slept"]]
        assert result["elapsed"] >= 1.9
        assert conn.run("SELECT 'still fine'") == [["still fine"]]
        text = metrics_text(proxy)
        assert metric(text, "multiproxy_cancel_requests_total", outcome="forwarded") == 0
        assert metric(text, "multiproxy_cancel_requests_total", outcome="ignored") == 3
    finally:
        conn.close()


@pytest.mark.timeout(60)
def test_cancel_of_idle_client_does_nothing(pg, proxy_factory):
    """A right key while the client holds no backend: nothing to cancel, the next query runs normally."""
    proxy = proxy_factory(proxy_config(pg, max_size=1))
    conn = pg8000.native.Connection(USER, host=proxy.host, port=proxy.port, database=AUTH_DB, timeout=CONNECT_TIMEOUT)
    other = psycopg_connect(proxy, autocommit=True)
    try:
        assert conn.run("SELECT 1") == [[1]]
        pid, secret = struct.unpack("!II", conn._backend_key_data)
        # Another client is running on the (only) backend now; the idle client's key must not cancel it.
        result: dict = {}
        thread = threading.Thread(target=lambda: result.update(row=other.execute("SELECT pg_sleep(1), 'other'").fetchone()),
                                  daemon=True)
        with direct_connect(pg) as admin:
            thread.start()
            assert wait_for(lambda: sleeping_queries(admin, "SELECT pg_sleep(1)%") == 1, 10)
            send_cancel(proxy, pid, secret)
            thread.join(10)
        assert result.get("row") == ("", "other")
        assert conn.run("SELECT 2") == [[2]]
        assert metric(metrics_text(proxy), "multiproxy_cancel_requests_total", outcome="ignored") == 1
    finally:
        conn.close()
        other.close()


# -- backend authentication ----------------------------------------------------------------------

@pytest.mark.timeout(60)
@pytest.mark.parametrize("user", ["mp_scram", "mp_md5", "mp_clear"])
def test_backend_credentials(pg, proxy_factory, tmp_path, user):
    """The proxy logs in to the server with configured passwords; clients use trust on the proxy."""
    password_file = tmp_path / "md5.password"
    password_file.write_text("md5-pw\n")
    os.chmod(password_file, 0o600)
    credentials = [
        {"user": "mp_scram", "password_env": "MP_TEST_SCRAM_PASSWORD"},
        {"user": "mp_md5", "password_file": str(password_file)},
        {"user": "mp_clear", "password": "clear-pw"},
    ]
    proxy = proxy_factory(proxy_config(pg, max_size=2, credentials=credentials),
                          env={"MP_TEST_SCRAM_PASSWORD": "scram-pw"})
    with psycopg_connect(proxy, user=user, autocommit=True) as conn:
        assert conn.execute("SELECT current_user, session_user").fetchone() == (user, user)
        table = f"cred_{user}_{uuid.uuid4().hex[:6]}"
        conn.execute(f"CREATE TABLE {table} (x int)")
        with conn.transaction():
            conn.execute(f"INSERT INTO {table} SELECT generate_series(1, 10)")
        assert conn.execute(f"SELECT count(*), sum(x) FROM {table}").fetchone() == (10, 55)
        conn.execute(f"DROP TABLE {table}")
    conn = pg8000.native.Connection(user, host=proxy.host, port=proxy.port, database=AUTH_DB, timeout=CONNECT_TIMEOUT)
    try:
        assert conn.run("SELECT current_user") == [[user]]
    finally:
        conn.close()
    text = metrics_text(proxy)
    assert metric(text, "multiproxy_database_connections_setup_failed_total", user=user) == 0


@pytest.mark.timeout(60)
def test_backend_credentials_wrong_password_fails_cleanly(pg, proxy_factory):
    credentials = [{"user": "mp_scram", "password": "not-the-password"}]
    proxy = proxy_factory(proxy_config(pg, max_size=2, credentials=credentials))
    with pytest.raises(psycopg.OperationalError) as refused:
        with psycopg_connect(proxy, user="mp_scram") as conn:
            conn.execute("SELECT 1")
    assert "password authentication failed" in str(refused.value)
    # Other users are not affected.
    with psycopg_connect(proxy, autocommit=True) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (USER,)
    assert metric(metrics_text(proxy), "multiproxy_database_connections_setup_failed_total", user="mp_scram") >= 1


# -- client authentication -------------------------------------------------------------------------

CLIENT_PASSWORD = "proxy-side-pw"


def users_file(tmp_path) -> str:
    users = UsersFile()
    users.add(USER, CLIENT_PASSWORD)
    path = tmp_path / "users.toml"
    users.save(path)
    return str(path)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", ["scram-sha-256", "md5"])
@pytest.mark.parametrize("client", ["psycopg", "pg8000"])
def test_client_auth(pg, proxy_factory, tmp_path, method, client):
    proxy = proxy_factory(proxy_config(pg, auth=method, users_file=users_file(tmp_path)))

    def login(user: str, password: str):
        if client == "psycopg":
            with psycopg_connect(proxy, user=user, password=password, autocommit=True) as conn:
                return conn.execute("SELECT current_user, 1 + 1").fetchone()
        conn = pg8000.dbapi.connect(user=user, password=password, host=proxy.host, port=proxy.port,
                                    database=AUTH_DB, timeout=CONNECT_TIMEOUT)
        try:
            cur = conn.cursor()
            cur.execute("SELECT current_user, 1 + 1")
            return tuple(cur.fetchone())
        finally:
            conn.close()

    assert login(USER, CLIENT_PASSWORD) == (USER, 2)
    for user, password in ((USER, "wrong-password"), (USER, CLIENT_PASSWORD + "x"), ("nobody", CLIENT_PASSWORD)):
        if client == "psycopg":
            with pytest.raises(psycopg.OperationalError) as refused:
                login(user, password)
            assert f'password authentication failed for user "{user}"' in str(refused.value)
        else:
            with pytest.raises(pg8000.dbapi.DatabaseError) as refused:
                login(user, password)
            assert refused.value.args[0]["C"] == "28P01"
            assert refused.value.args[0]["S"] == "FATAL"
    assert login(USER, CLIENT_PASSWORD) == (USER, 2)
    text = metrics_text(proxy)
    assert metric(text, "multiproxy_client_connections_setup_failed_auth_total") == 3


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", ["scram-sha-256", "md5"])
def test_client_auth_asyncpg_sqlstate(pg, proxy_factory, tmp_path, method):
    proxy = proxy_factory(proxy_config(pg, auth=method, users_file=users_file(tmp_path)))

    async def scenario():
        conn = await asyncpg.connect(host=proxy.host, port=proxy.port, user=USER, password=CLIENT_PASSWORD,
                                     database=AUTH_DB, timeout=CONNECT_TIMEOUT)
        try:
            assert await conn.fetchval("SELECT current_user") == USER
        finally:
            await conn.close()
        with pytest.raises(asyncpg.InvalidPasswordError) as refused:
            await asyncpg.connect(host=proxy.host, port=proxy.port, user=USER, password="wrong",
                                  database=AUTH_DB, timeout=CONNECT_TIMEOUT)
        assert refused.value.sqlstate == "28P01"

    asyncio.run(asyncio.wait_for(scenario(), 30))


# -- startup options and pipelines ---------------------------------------------------------------

@pytest.mark.timeout(60)
def test_startup_options_do_not_leak_to_other_clients(pg, proxy_factory):
    proxy = proxy_factory(proxy_config(pg, max_size=1))
    query = "SELECT current_setting('statement_timeout'), pg_backend_pid()"
    with psycopg_connect(proxy, autocommit=True, options="-c statement_timeout=1234") as a, \
            psycopg_connect(proxy, autocommit=True) as b:
        for _ in range(3):
            timeout_a, pid_a = a.execute(query).fetchone()
            timeout_b, pid_b = b.execute(query).fetchone()
            assert pid_a == pid_b  # one backend for both
            assert timeout_a == "1234ms"
            assert timeout_b == "0", "client B inherited client A's startup option"


@pytest.mark.timeout(60)
def test_startup_option_search_path_is_a_list(pg, proxy_factory):
    proxy = proxy_factory(proxy_config(pg, max_size=1))
    options = "-c search_path=pin_opts,public"
    with psycopg.connect(host=pg.host, port=pg.port, user=USER, dbname=AUTH_DB, options=options,
                         connect_timeout=CONNECT_TIMEOUT) as server_side:
        expected = server_side.execute("SELECT current_setting('search_path'), current_schemas(false)").fetchone()
    assert expected[0].replace(" ", "") == "pin_opts,public"  # a list of two schemas, as the server reads it
    with psycopg_connect(proxy, autocommit=True, options=options) as conn:
        got = conn.execute("SELECT current_setting('search_path'), current_schemas(false)").fetchone()
        assert got == expected
        assert conn.execute("SELECT current_setting('search_path') LIKE '\"%'").fetchone() == (False,)


@pytest.mark.timeout(60)
def test_borrow_timeout_in_pipeline_connection_survives(pg, proxy_factory):
    proxy = proxy_factory(proxy_config(pg, max_size=1, borrow_timeout=1.0))
    holder = psycopg_connect(proxy)
    waiter = psycopg_connect(proxy, autocommit=True)
    try:
        assert holder.execute("SELECT 1").fetchone() == (1,)  # the only backend stays in this transaction
        with pytest.raises(psycopg.Error) as refused:
            with waiter.pipeline() as pipeline:
                waiter.execute("SELECT 1")
                pipeline.sync()
                waiter.execute("SELECT 2")
                pipeline.sync()
                waiter.execute("SELECT 3")
        assert refused.value.sqlstate == "53300"
        holder.commit()
        assert waiter.execute("SELECT 42").fetchone() == (42,)
        with waiter.pipeline():
            first = waiter.execute("SELECT 1")
            second = waiter.execute("SELECT 2")
        assert (first.fetchone(), second.fetchone()) == ((1,), (2,))
    finally:
        holder.close()
        waiter.close()
