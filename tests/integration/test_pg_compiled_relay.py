"""[proxy] relay = "compiled" against a real PostgreSQL: more clients than backends (pgbench, psycopg, asyncpg), rows,
pins, settings and pool counts, and the requests the engine's screen sends back to the Python path."""
from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import threading
import time
import uuid

import asyncpg
import psycopg
import pytest

from .helpers import metric, metrics_text, run_clients
from .pgserver import AUTH_DB
from .proxy import free_port
from .test_pg_pooling import direct_connect, psycopg_connect, wait_for

USER = "mp_trust"


def compiled_config(pg, max_size: int = 4) -> dict:
    cluster = {"engine": "postgres", "hosts": [f"127.0.0.1:{pg.port}"], "backend": {"tls": "disable"},
               "pool": {"mode": "transaction", "max_size": max_size, "borrow_timeout": 30.0}}
    return {
        "proxy": {"admin_listen": f"127.0.0.1:{free_port()}", "log_level": "info", "relay": "compiled"},
        "clusters": {"main": cluster},
        "listeners": [{"name": "pg", "listen": f"127.0.0.1:{free_port()}", "cluster": "main", "role": "writer",
                       "auth": "trust"}],
    }


def lane_metrics(proxy) -> dict:
    text = metrics_text(proxy)
    found = {name: metric(text, f"multiproxy_relay_lane_{name}") for name in
             ("clients", "backends", "transactions_total", "returns_total")}
    found["returns"] = {why: metric(text, "multiproxy_relay_lane_returns_total", why=why) for why in
                        ("stopped", "malformed", "closed", "connection_lost", "pool_wanted", "no_backend", "settings")}
    return found


def server_backends(pg) -> int:
    with direct_connect(pg) as conn:
        return conn.execute("SELECT count(*) FROM pg_stat_activity WHERE usename = %s", (USER,)).fetchone()[0]


def assert_no_timeout_no_pin(proxy, pg, backends: int) -> None:
    """No borrow timed out, nothing pinned, and the server saw at most `backends` connections of the test's user."""
    assert not pool_metric(proxy, "multiproxy_database_connection_borrow_timeouts_total")
    assert not metric(metrics_text(proxy), "multiproxy_pin_reasons_detected_total")
    assert server_backends(pg) <= backends


def client_table(pg, prefix: str) -> str:
    """A new table (client int, n int) the test's user may write, made directly on the server; its name."""
    table = f"{prefix}_{uuid.uuid4().hex[:8]}"
    with direct_connect(pg) as conn:
        conn.execute(f"CREATE TABLE {table} (client int, n int)")
        conn.execute(f"GRANT ALL ON {table} TO {USER}")
    return table


def simple_query(conn: psycopg.Connection, sql: str):
    """One simple-protocol Query (psycopg's execute without parameters on a raw cursor)."""
    with psycopg.RawCursor(conn) as cur:
        cur.execute(sql, prepare=False)
        return cur.fetchall() if cur.description else None


def pgbench_initialized(pg, proxy) -> dict:
    """pgbench's tables made on the server (scale 1); the environment that points pgbench at the proxy."""
    env = {**os.environ, "PGHOST": proxy.host, "PGPORT": str(proxy.port), "PGUSER": USER, "PGDATABASE": AUTH_DB,
           "PGCONNECT_TIMEOUT": "10"}
    init = subprocess.run(["pgbench", "-i", "-s", "1", "-q"], env={**env, "PGHOST": pg.host, "PGPORT": str(pg.port)},
                          capture_output=True, text=True, timeout=120)
    assert init.returncode == 0, init.stderr
    return env


@pytest.mark.timeout(180)
def test_pgbench_with_more_clients_than_backends_runs_in_the_relay(pg, proxy_factory, tmp_path):
    if not shutil.which("pgbench"):
        pytest.skip("pgbench is not installed")
    proxy = proxy_factory(compiled_config(pg, max_size=4))
    env = pgbench_initialized(pg, proxy)
    run = subprocess.run(["pgbench", "-S", "-M", "simple", "-c", "12", "-j", "2", "-t", "300", "-n"], env=env,
                         capture_output=True, text=True, timeout=150)
    assert run.returncode == 0, run.stdout + run.stderr + proxy.log_tail()
    assert "number of transactions actually processed: 3600/3600" in run.stdout, run.stdout
    assert "number of failed transactions: 0" in run.stdout or "failed" not in run.stdout, run.stdout
    lanes = lane_metrics(proxy)
    print("relay lanes after pgbench:", lanes)
    assert lanes["transactions_total"] >= 3000, lanes      # almost all of them with no Python
    assert lanes["backends"] <= 4
    assert server_backends(pg) <= 4
    text = metrics_text(proxy)
    assert not metric(text, "multiproxy_database_connections_currently_session_pinned")


@pytest.mark.timeout(180)
def test_psycopg_clients_keep_their_rows_settings_and_pins_right(pg, proxy_factory):
    proxy = proxy_factory(compiled_config(pg, max_size=3))
    table = client_table(pg, "relay")
    clients, rounds = 10, 40
    errors = []
    plain_done = threading.Barrier(clients + 1, timeout=120)
    relayed_plain = []

    def client(number: int) -> None:
        try:
            with psycopg_connect(proxy, autocommit=True) as conn:
                for n in range(rounds):
                    simple_query(conn, f"INSERT INTO {table} VALUES ({number}, {n})")
                    got = simple_query(conn, f"SELECT count(*) FROM {table} WHERE client = {number}")
                    assert got == [(n + 1,)], (number, n, got)
                plain_done.wait()
                plain_done.wait()
                # a tracked setting goes through Python and follows the client to any backend
                simple_query(conn, f"SET application_name = 'relay-{number}'")
                for _ in range(5):
                    assert simple_query(conn, "SELECT current_setting('application_name')") == [(f"relay-{number}",)]
                # an explicit transaction: its statements run on one backend
                simple_query(conn, "BEGIN")
                simple_query(conn, f"INSERT INTO {table} VALUES ({number}, -1)")
                pid = simple_query(conn, "SELECT pg_backend_pid()")
                assert simple_query(conn, "SELECT pg_backend_pid()") == pid
                simple_query(conn, "ROLLBACK")
                assert simple_query(conn, f"SELECT count(*) FROM {table} WHERE n = -1 AND client = {number}") == [(0,)]
        except Exception as exc:  # collected, re-raised in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    try:
        plain_done.wait()
        relayed_plain.append(lane_metrics(proxy))       # every client ran its plain statements, one key for all
        plain_done.wait()
    except threading.BrokenBarrierError:
        pass            # a client failed: its error says why
    for thread in threads:
        thread.join(150)
    assert not errors, errors[:3]
    # of the 800 plain statements nearly all ran in the relay (each backend's first transaction replays the
    # clients' reported parameters on the Python path)
    assert relayed_plain and relayed_plain[0]["transactions_total"] >= clients * rounds, str(relayed_plain)
    with direct_connect(pg) as conn:
        assert conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0] == clients * rounds
    text = metrics_text(proxy)
    assert not metric(text, "multiproxy_database_connections_currently_session_pinned")
    assert server_backends(pg) <= 3
    lanes = lane_metrics(proxy)
    print("relay lanes after the psycopg clients:", lanes)
    # SET and BEGIN went through Python; afterwards each client has a key of its own (its application_name), so
    # the lanes of the pool compete for 3 backends through the pool's queue: a backend holding another client's
    # settings serves on the Python path, which replays them (settings); no lane gives its clients to the Python
    # path because others wait for the pool (pool_wanted)
    assert lanes["returns"]["stopped"] >= clients * 2, lanes
    assert not lanes["returns"]["pool_wanted"], lanes


@pytest.mark.timeout(120)
def test_a_pinning_statement_leaves_the_relay_and_pins(pg, proxy_factory):
    proxy = proxy_factory(compiled_config(pg, max_size=2))
    with psycopg_connect(proxy, autocommit=True) as conn:
        for _ in range(20):
            assert simple_query(conn, "SELECT 1") == [(1,)]
        simple_query(conn, "CREATE TEMP TABLE relay_pinned (x int)")
        simple_query(conn, "INSERT INTO relay_pinned VALUES (7)")
        pid = simple_query(conn, "SELECT pg_backend_pid()")
        for _ in range(5):
            assert simple_query(conn, "SELECT x FROM relay_pinned") == [(7,)]
            assert simple_query(conn, "SELECT pg_backend_pid()") == pid
        text = metrics_text(proxy)
        assert metric(text, "multiproxy_database_connections_currently_session_pinned") == 1
    # the pinned client left: its backend was reset and serves the relay again
    with psycopg_connect(proxy, autocommit=True) as conn:
        for _ in range(5):
            assert simple_query(conn, "SELECT 2") == [(2,)]
        assert wait_for(lambda: not metric(metrics_text(proxy),
                                           "multiproxy_database_connections_currently_session_pinned"))


@pytest.mark.timeout(120)
def test_asyncpg_clients_use_the_python_path_beside_relayed_ones(pg, proxy_factory):
    proxy = proxy_factory(compiled_config(pg, max_size=3))

    async def asyncpg_client(number: int) -> None:
        conn = await asyncpg.connect(host=proxy.host, port=proxy.port, user=USER, database=AUTH_DB,
                                     statement_cache_size=0, timeout=10)
        try:
            for n in range(30):
                assert await conn.fetchval("SELECT $1::int + $2::int", number, n) == number + n
        finally:
            await conn.close()

    def relayed_client() -> None:
        with psycopg_connect(proxy, autocommit=True) as conn:
            for n in range(60):
                assert simple_query(conn, f"SELECT {n}") == [(n,)]

    threads = [threading.Thread(target=relayed_client) for _ in range(6)]
    for thread in threads:
        thread.start()

    async def main():
        await asyncio.gather(*(asyncpg_client(i) for i in range(6)))

    asyncio.run(main())
    for thread in threads:
        thread.join(60)
    assert server_backends(pg) <= 3
    lanes = lane_metrics(proxy)
    print("relay lanes beside asyncpg:", lanes)
    # asyncpg's extended protocol runs on the Python path; while it waits for the pool, the relay's waiting clients
    # queue there too (first come, first served), so only part of the simple queries run in the relay
    assert lanes["transactions_total"] > 0, lanes
    assert lanes["returns"]["stopped"] >= 6, lanes


@pytest.mark.timeout(120)
def test_a_client_leaving_mid_transaction_and_a_malformed_message(pg, proxy_factory):
    proxy = proxy_factory(compiled_config(pg, max_size=2))
    conn = psycopg_connect(proxy, autocommit=True)
    simple_query(conn, "SELECT 1")
    conn.close()
    # a raw client: a Query then an invalid length; the Python path answers the protocol violation
    import socket
    import struct
    sock = socket.create_connection((proxy.host, proxy.port), timeout=10)
    body = b"user\0" + USER.encode() + b"\0database\0" + AUTH_DB.encode() + b"\0\0"
    sock.sendall(struct.pack("!II", len(body) + 8, 196608) + body)
    greeting = b""
    while not greeting.endswith(b"Z\0\0\0\x05I"):
        more = sock.recv(65536)
        assert more
        greeting += more
    sock.sendall(b"Q\0\0\0\x0dSELECT 1\0")
    answer = b""
    while not answer.endswith(b"Z\0\0\0\x05I"):
        more = sock.recv(65536)
        assert more
        answer += more
    sock.sendall(b"Q\0\0\0\x02")
    reply = b""
    while True:
        more = sock.recv(65536)
        if not more:
            break
        reply += more
    assert reply.startswith(b"E") and b"invalid message length" in reply
    sock.close()
    with psycopg_connect(proxy, autocommit=True) as again:
        assert simple_query(again, "SELECT 3") == [(3,)]
    assert wait_for(lambda: server_backends(pg) <= 2)


# -- the extended protocol of the unnamed statement (Parse/Bind/Describe/Execute...Sync batches) in the relay
# "twin": the proxy's relay lanes run on relay_core's pure-Python twin (MULTIPROXY_RELAY_CORE=python)

# the core of each parameter, whatever MULTIPROXY_RELAY_CORE the tests run with ("": the compiled one when built)
CORES = {"c": {"MULTIPROXY_RELAY_CORE": ""}, "twin": {"MULTIPROXY_RELAY_CORE": "python"}}

def relay_transactions(proxy) -> float:
    return lane_metrics(proxy)["transactions_total"] or 0


@pytest.mark.timeout(180)
@pytest.mark.parametrize("core", sorted(CORES))
def test_pgbench_extended_with_more_clients_than_backends_runs_in_the_relay(pg, proxy_factory, core):
    if not shutil.which("pgbench"):
        pytest.skip("pgbench is not installed")
    proxy = proxy_factory(compiled_config(pg, max_size=4), env=CORES[core])
    env = pgbench_initialized(pg, proxy)
    run = subprocess.run(["pgbench", "-S", "-M", "extended", "-c", "12", "-j", "2", "-t", "300", "-n"], env=env,
                         capture_output=True, text=True, timeout=150)
    assert run.returncode == 0, run.stdout + run.stderr + proxy.log_tail()
    assert "number of transactions actually processed: 3600/3600" in run.stdout, run.stdout
    assert "number of failed transactions: 0" in run.stdout or "failed" not in run.stdout, run.stdout
    lanes = lane_metrics(proxy)
    print("relay lanes after pgbench -M extended:", lanes)
    assert ("relay lanes run on its pure-Python twin" in proxy.log_text()) == (core == "twin")
    assert lanes["transactions_total"] >= 3500, lanes      # Parse/Bind/Describe/Execute/Sync with no Python
    assert lanes["backends"] <= 4
    assert server_backends(pg) <= 4
    text = metrics_text(proxy)
    assert not metric(text, "multiproxy_database_connections_currently_session_pinned")


@pytest.mark.timeout(180)
@pytest.mark.parametrize("core", sorted(CORES))
def test_pgbench_updates_run_in_the_relay_with_balances_right(pg, proxy_factory, core, tmp_path):
    """pgbench with a script of an UPDATE ... SET and a SELECT in autocommit, more clients than backends: every
    statement in the relay (one UPDATE statement's SET is no session SET), and the balances add up."""
    if not shutil.which("pgbench"):
        pytest.skip("pgbench is not installed")
    proxy = proxy_factory(compiled_config(pg, max_size=3), env=CORES[core])
    env = pgbench_initialized(pg, proxy)
    script = tmp_path / "updates.sql"
    script.write_text("\\set aid random(1, 100000)\n"
                      "UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid = :aid;\n"
                      "SELECT abalance FROM pgbench_accounts WHERE aid = :aid;\n")
    os.chmod(tmp_path, 0o755)
    script.chmod(0o644)
    before = relay_transactions(proxy)
    run = subprocess.run(["pgbench", "-f", str(script), "-c", "8", "-j", "2", "-t", "150", "-n"], env=env,
                         capture_output=True, text=True, timeout=150)
    assert run.returncode == 0, run.stdout + run.stderr + proxy.log_tail()
    assert "number of transactions actually processed: 1200/1200" in run.stdout, run.stdout
    lanes = lane_metrics(proxy)
    print("relay lanes after pgbench updates:", lanes)
    assert lanes["transactions_total"] - before >= 2200, lanes     # two statements per pgbench transaction
    with direct_connect(pg) as conn:
        assert conn.execute("SELECT sum(abalance) FROM pgbench_accounts").fetchone() == (1200,)
    assert server_backends(pg) <= 3
    assert not metric(metrics_text(proxy), "multiproxy_database_connections_currently_session_pinned")


@pytest.mark.timeout(180)
def test_psycopg_with_parameters_runs_in_the_relay_and_its_prepared_statements_beside_it(pg, proxy_factory):
    proxy = proxy_factory(compiled_config(pg, max_size=3))
    table = client_table(pg, "relay_x")
    clients, rounds = 10, 30
    errors = []
    unnamed_done = threading.Barrier(clients + 1, timeout=120)
    relayed = []

    def client(number: int) -> None:
        try:
            with psycopg_connect(proxy, autocommit=True) as conn:      # the default prepare_threshold (5)
                for n in range(rounds):
                    # a text of its own each time: never prepared, Parse/Bind/Describe/Execute of the unnamed one
                    conn.execute(f"INSERT INTO {table} VALUES (%s, %s) -- {n}", (number, n))
                    got = conn.execute(f"SELECT count(*), %s::text FROM {table} WHERE client = %s -- {n}",
                                       (f"c{number}", number)).fetchall()
                    assert got == [(n + 1, f"c{number}")], (number, n, got)
                unnamed_done.wait()
                unnamed_done.wait()
                # the same text ten times: prepared (a named statement) from the sixth run on
                for n in range(10):
                    got = conn.execute("SELECT %s::int * 2, %s::text", (number + n, "x" * n)).fetchone()
                    assert got == (2 * (number + n), "x" * n), (number, n, got)
                assert conn.execute(f"SELECT count(*) FROM {table} WHERE client = %s", (number,)).fetchone() == (
                    rounds,)
        except Exception as exc:  # collected, re-raised in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    try:
        unnamed_done.wait()
        relayed.append(relay_transactions(proxy))
        unnamed_done.wait()
    except threading.BrokenBarrierError:
        pass            # a client failed: its error says why
    for thread in threads:
        thread.join(150)
    assert not errors, errors[:3]
    print("relayed transactions of", clients * rounds * 2, "unnamed ones:", relayed)
    assert relayed and relayed[0] >= clients * rounds * 2 * 0.9, relayed
    with direct_connect(pg) as conn:
        assert conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0] == clients * rounds
    text = metrics_text(proxy)
    assert not metric(text, "multiproxy_database_connections_currently_session_pinned")
    assert server_backends(pg) <= 3


@pytest.mark.timeout(180)
@pytest.mark.parametrize("core", sorted(CORES))
def test_psycopg_pipeline_mode_gets_its_rows(pg, proxy_factory, core):
    proxy = proxy_factory(compiled_config(pg, max_size=2), env=CORES[core])
    clients, rounds = 6, 15
    errors = []
    synced_done = threading.Barrier(clients + 1, timeout=120)
    relayed = []
    # One client alone first: each of its pipelines (five executes, one Sync) is one batch the relay serves.
    with psycopg_connect(proxy, autocommit=True) as conn:
        simple_query(conn, "SELECT 1")              # its lane gets its backend (with the client's parameters)
        before = relay_transactions(proxy)
        for n in range(rounds):
            with conn.pipeline():
                cursors = [conn.execute(f"SELECT %s::int + %s::int -- solo {n}", (n, k)) for k in range(5)]
            assert [cur.fetchone() for cur in cursors] == [(n + k,) for k in range(5)], n
        # Not every one: psycopg may send a Flush behind a pipeline's Sync (when it reads before the results
        # came), which stops (Python answers it), and the client's next transaction is then served on the Python
        # path (PostgreSQL's relay_key: a client whose last requests stopped in the extended protocol), as long as
        # its pipelines bring Flushes. How often depends on timing: on a loaded machine 3 of 15 were seen.
        assert relay_transactions(proxy) - before >= 1, (before, relay_transactions(proxy), lane_metrics(proxy))
    solo_end = relay_transactions(proxy)

    def client(number: int) -> None:
        try:
            with psycopg_connect(proxy, autocommit=True) as conn:
                for n in range(rounds):
                    # five executes and one Sync at the pipeline's end: one batch of the unnamed statement
                    with conn.pipeline():
                        cursors = [conn.execute(f"SELECT %s::int + %s::int -- {n}", (number, k)) for k in range(5)]
                    assert [cur.fetchone() for cur in cursors] == [(number + k,) for k in range(5)], (number, n)
                synced_done.wait()
                synced_done.wait()
                for n in range(rounds):
                    # rows read inside the pipeline: psycopg sends a Flush before the Sync (the Python path's)
                    with conn.pipeline() as pipeline:
                        first = conn.execute(f"SELECT %s::int * 3 -- {n}", (number,))
                        pipeline.sync()
                        assert first.fetchone() == (number * 3,)
                        second = conn.execute(f"SELECT %s::text || '!' -- {n}", (f"n{n}",))
                        assert second.fetchone() == (f"n{n}!",)
        except Exception as exc:  # collected, re-raised in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    try:
        synced_done.wait()
        relayed.append(relay_transactions(proxy))
        synced_done.wait()
    except threading.BrokenBarrierError:
        pass            # a client failed: its error says why
    for thread in threads:
        thread.join(150)
    assert not errors, errors[:3]
    print("relayed pipelines of", clients * rounds, ":", relayed, lane_metrics(proxy))
    # Six clients on two backends: most of their pipelines run in the relay (a lane's clients wait in the relay, its
    # borrow in the pool's queue: none falls to the Python path because others wait for the pool). Not all: the
    # Flush psycopg may send behind a Sync (above) sends the client's next pipeline to the Python path (70-100%
    # relayed in runs on a busy 2-core machine).
    assert relayed and relayed[0] - solo_end >= clients * rounds / 2, (solo_end, relayed)
    assert not lane_metrics(proxy)["returns"]["pool_wanted"]
    assert server_backends(pg) <= 2
    assert not metric(metrics_text(proxy), "multiproxy_database_connections_currently_session_pinned")


def raw_login(proxy):
    import socket
    import struct
    sock = socket.create_connection((proxy.host, proxy.port), timeout=10)
    body = b"user\0" + USER.encode() + b"\0database\0" + AUTH_DB.encode() + b"\0\0"
    sock.sendall(struct.pack("!II", len(body) + 8, 196608) + body)
    read_until_ready(sock)
    return sock


def read_until_ready(sock) -> bytes:
    """Messages up to and with the next ReadyForQuery."""
    import struct
    data = b""
    while True:
        pos = 0
        while len(data) - pos >= 5:
            end = pos + 1 + struct.unpack_from("!I", data, pos + 1)[0]
            if end > len(data):
                break
            if data[pos:pos + 1] == b"Z":
                return data[:end]
            pos = end
        more = sock.recv(65536)
        assert more, data
        data += more


def pg_message(kind: bytes, body: bytes) -> bytes:
    import struct
    return kind + struct.pack("!I", len(body) + 4) + body


UNNAMED_BIND = pg_message(b"B", b"\0\0\0\0\0\0\0\0")
EXECUTE_SYNC = pg_message(b"E", b"\0\0\0\0\0") + pg_message(b"S", b"")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("relay", ["compiled", "compiled-twin", "python"])
def test_a_bind_without_parse_never_binds_another_clients_unnamed_statement(pg, proxy_factory, relay):
    config = compiled_config(pg, max_size=1)        # one backend: every client shares it
    config["proxy"]["relay"] = relay.split("-")[0]
    proxy = proxy_factory(config, env=CORES["twin" if relay.endswith("twin") else "c"])
    owner, intruder = raw_login(proxy), raw_login(proxy)
    try:
        batch = (pg_message(b"P", b"\0SELECT 'secret of the owner'\0\0\0") + UNNAMED_BIND
                 + pg_message(b"D", b"P\0") + EXECUTE_SYNC)
        for _ in range(3):
            owner.sendall(batch)
            answer = read_until_ready(owner)
            assert b"secret of the owner" in answer and answer.endswith(b"Z\0\0\0\5I"), answer
        # the backend holds the owner's unnamed statement now; a Bind of "the unnamed statement" with no Parse
        intruder.sendall(UNNAMED_BIND + EXECUTE_SYNC)
        answer = read_until_ready(intruder)
        assert b"secret" not in answer, answer
        assert answer.startswith(b"E") and b"does not exist" in answer and b"26000" in answer, answer
        assert answer.endswith(b"Z\0\0\0\5I"), answer
        # both go on as before, beside a psycopg client with parameters
        intruder.sendall(pg_message(b"Q", b"SELECT 'intruder ok'\0"))
        assert b"intruder ok" in read_until_ready(intruder)
        with psycopg_connect(proxy, autocommit=True) as conn:
            assert conn.execute("SELECT %s::int + 1", (41,)).fetchone() == (42,)
        owner.sendall(batch)
        assert b"secret of the owner" in read_until_ready(owner)
        # the owner's own unnamed statement, bound in a later round trip, is its own
        owner.sendall(pg_message(b"P", b"\0SELECT 'parsed alone'\0\0\0") + pg_message(b"S", b""))
        assert read_until_ready(owner).startswith(b"1")
        owner.sendall(UNNAMED_BIND + EXECUTE_SYNC)
        assert b"parsed alone" in read_until_ready(owner)
    finally:
        owner.close()
        intruder.close()
    assert server_backends(pg) <= 1


def pool_metric(proxy, name: str) -> float:
    return metric(metrics_text(proxy), name) or 0


@pytest.mark.timeout(180)
@pytest.mark.parametrize("core", sorted(CORES))
@pytest.mark.parametrize("keys", [1, 2])
def test_twelve_clients_on_three_backends_stay_in_their_lane(pg, proxy_factory, core, keys):
    """Continuous short transactions of 12 clients through a pool of 3: the lane's clients wait in the relay and
    its borrow in the pool's queue, so they are not sent to the Python path because others wait for the pool.
    keys=2: two lanes (two application_names) take turns with the backends through the pool's queue."""
    proxy = proxy_factory(compiled_config(pg, max_size=3), env=CORES[core])
    table = client_table(pg, "relay")
    clients, seconds = 12, 4.0
    errors, done = [], {}
    ready = threading.Barrier(clients + 1, timeout=60)
    stop = threading.Event()

    def client(number: int) -> None:
        n = 0
        try:
            with psycopg_connect(proxy, autocommit=True) as conn:
                if keys > 1:    # a tracked setting: the client's relay key (its lane) holds it
                    simple_query(conn, f"SET application_name = 'lane{number % keys}'")
                ready.wait()
                while not stop.is_set():
                    simple_query(conn, f"INSERT INTO {table} VALUES ({number}, {n})")
                    n += 1
                    got = simple_query(conn, f"SELECT count(*) FROM {table} WHERE client = {number}")
                    assert got == [(n,)], (number, n, got)
        except Exception as exc:  # collected, re-raised in the test's thread
            errors.append(exc)
        done[number] = n

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    ready.wait()
    before = lane_metrics(proxy)
    sizes = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        sizes.append(server_backends(pg))
        time.sleep(0.2)
    stop.set()
    for thread in threads:
        thread.join(60)
    assert not errors, errors[:3]
    lanes = lane_metrics(proxy)
    statements = 2 * sum(done.values())
    relayed = lanes["transactions_total"] - (before["transactions_total"] or 0)
    print(f"{statements} statements, {relayed} relayed; pool sizes {sorted(set(sizes))}; {lanes}")
    with direct_connect(pg) as conn:
        assert conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0] == sum(done.values())
    assert statements >= clients * 10, done
    assert max(sizes) <= 3 and server_backends(pg) <= 3, sizes
    assert relayed >= statements * 0.8, (statements, relayed, lanes)
    assert (lanes["returns"]["pool_wanted"] or 0) <= 2, lanes
    assert not lanes["returns"]["no_backend"], lanes
    assert not pool_metric(proxy, "multiproxy_database_connection_borrow_timeouts_total")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("core", sorted(CORES))
def test_a_lane_client_gets_the_pools_timeout_when_others_hold_every_backend(pg, proxy_factory, core):
    config = compiled_config(pg, max_size=2)
    config["clusters"]["main"]["pool"]["borrow_timeout"] = 1.0
    proxy = proxy_factory(config, env=CORES[core])
    holders = [psycopg_connect(proxy, autocommit=True) for _ in range(2)]
    waiter = psycopg_connect(proxy, autocommit=True)
    try:
        assert simple_query(waiter, "SELECT 1") == [(1,)]         # served in its lane
        for conn in holders:
            # (a stop right after the BEGIN the relay answered: the holders go to the Python path with their BEGIN)
            simple_query(conn, "BEGIN")
            simple_query(conn, "SET LOCAL lock_timeout = '5s'")
            simple_query(conn, "SELECT 1")                         # each holds one of the 2 backends
        assert wait_for(lambda: lane_metrics(proxy)["clients"] == 1), lane_metrics(proxy)
        seen = []       # while it waits in its lane, the pool counts it as a transaction waiting (not its borrow)
        sampler = threading.Timer(0.5, lambda: seen.append(
            metric(metrics_text(proxy), "multiproxy_database_connection_requests_waiting")))
        sampler.start()
        started = time.monotonic()
        with pytest.raises(psycopg.OperationalError) as caught:
            simple_query(waiter, "SELECT 2")
        waited = time.monotonic() - started
        sampler.join()
        assert seen == [1.0], seen
        assert "no database connection became free within 1 s" in str(caught.value), caught.value
        assert 0.9 <= waited <= 4.0, waited
        assert lane_metrics(proxy)["returns"]["no_backend"] == 1
        # the Python path's own count of borrow timeouts counts it, as it would count a waiter of its own
        assert pool_metric(proxy, "multiproxy_database_connection_borrow_timeouts_total") == 1
        for conn in holders:
            simple_query(conn, "COMMIT")
        assert simple_query(waiter, "SELECT 3") == [(3,)]          # the same client, served again
    finally:
        for conn in holders + [waiter]:
            conn.close()
    assert server_backends(pg) <= 2


@contextlib.contextmanager
def busy_lane_clients(proxy, count: int, query: str, setting: str | None = None):
    """`count` psycopg clients (each first running `setting`, if any) running `query` over and over in their lanes
    until the block ends; yields the barrier to wait on with them once they are connected. Their errors are raised
    after the block."""
    errors: list = []
    stop = threading.Event()
    ready = threading.Barrier(count + 1, timeout=60)

    def client() -> None:
        try:
            with psycopg_connect(proxy, autocommit=True) as conn:
                if setting:
                    simple_query(conn, setting)
                ready.wait()
                while not stop.is_set():
                    assert simple_query(conn, query) == [(1,)]
        except Exception as exc:  # collected, re-raised in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=client) for _ in range(count)]
    for thread in threads:
        thread.start()
    try:
        yield ready
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)
    assert not errors, errors[:3]


@pytest.mark.timeout(180)
@pytest.mark.parametrize("core", sorted(CORES))
def test_python_path_waiters_get_backends_promptly_while_lanes_are_busy(pg, proxy_factory, core):
    """Lane clients that always have a request waiting do not hoard the backends: each one that ends a transaction
    goes to the pool's queue while a session on the Python path waits there (first come, first served)."""
    config = compiled_config(pg, max_size=2)
    config["clusters"]["main"]["pool"]["borrow_timeout"] = 10.0
    proxy = proxy_factory(config, env=CORES[core])
    latencies = []
    with busy_lane_clients(proxy, 8, "SELECT count(*) FROM pg_sleep(0.005)") as ready:
        with psycopg_connect(proxy, autocommit=True) as conn:
            ready.wait()
            before = lane_metrics(proxy)["transactions_total"] or 0
            deadline, n = time.monotonic() + 3.0, 0
            while time.monotonic() < deadline:
                # the relay answers BEGIN and the first statement of the transaction borrows for the lane, queued
                # in the pool behind the lanes' own borrows
                simple_query(conn, "BEGIN")
                started = time.monotonic()
                assert simple_query(conn, f"SELECT {n}") == [(n,)]
                latencies.append(time.monotonic() - started)
                simple_query(conn, "COMMIT")
                n += 1
                time.sleep(0.02)
            relayed = (lane_metrics(proxy)["transactions_total"] or 0) - before
    lanes = lane_metrics(proxy)
    latencies.sort()
    print(f"{len(latencies)} transactions on the Python path, first statement latencies: median "
          f"{latencies[len(latencies) // 2]:.3f} s, max {latencies[-1]:.3f} s; {relayed} relayed meanwhile; {lanes}")
    assert latencies[-1] < 2.0, latencies                  # its borrow_timeout is 10 s
    assert relayed >= 100, relayed                          # the lane went on serving its clients meanwhile
    assert (lanes["returns"]["pool_wanted"] or 0) <= 2, lanes
    assert server_backends(pg) <= 2


@pytest.mark.timeout(180)
@pytest.mark.parametrize("core", sorted(CORES))
def test_a_lane_with_no_backend_gets_its_turn_from_a_busy_lane(pg, proxy_factory, core):
    """Lane a's clients keep both backends busy; lane b's client (another tracked setting) waits with no backend:
    its lane's borrow waits in the pool's queue, lane a yields the next backend that ends a transaction, and b's
    client is served (on the Python path, which replays its setting: the backend held a's) long before its
    borrow timeout."""
    config = compiled_config(pg, max_size=2)
    config["clusters"]["main"]["pool"]["borrow_timeout"] = 10.0
    proxy = proxy_factory(config, env=CORES[core])
    latencies = []
    with busy_lane_clients(proxy, 6, "SELECT 1 FROM pg_sleep(0.005)", "SET application_name = 'lane_a'") as ready:
        with psycopg_connect(proxy, autocommit=True) as conn:
            simple_query(conn, "SET application_name = 'lane_b'")
            ready.wait()
            time.sleep(0.5)
            before = lane_metrics(proxy)["transactions_total"] or 0
            for n in range(10):
                started = time.monotonic()
                assert simple_query(conn, f"SELECT {n}") == [(n,)]
                latencies.append(time.monotonic() - started)
                time.sleep(0.05)
            relayed = (lane_metrics(proxy)["transactions_total"] or 0) - before
            # its setting went with it (the screen stops a statement that names the word: not relayed)
            assert simple_query(conn, "SELECT current_setting('application_name')") == [("lane_b",)]
    lanes = lane_metrics(proxy)
    print(f"lane b's latencies: {sorted(round(x, 3) for x in latencies)}; {relayed} relayed meanwhile; {lanes}")
    assert max(latencies) < 2.0, latencies
    assert relayed >= 50, relayed                   # lane a went on meanwhile
    assert not lanes["returns"]["pool_wanted"] and not lanes["returns"]["no_backend"], lanes
    assert server_backends(pg) <= 2


@pytest.mark.timeout(120)
@pytest.mark.parametrize("core", sorted(CORES))
def test_a_python_path_waiter_gets_a_backend_a_quiet_lane_frees(pg, proxy_factory, core):
    """Both backends serve one long statement each in a lane, and then their clients say nothing more: a session on
    the Python path that began to wait meanwhile gets the first backend that ends its transaction (the lane yields
    and gives it back at that wake-up, which nothing else in the lane needs), not one at its borrow timeout."""
    config = compiled_config(pg, max_size=2)
    config["clusters"]["main"]["pool"]["borrow_timeout"] = 20.0
    proxy = proxy_factory(config, env=CORES[core])
    lane_clients = [psycopg_connect(proxy, autocommit=True) for _ in range(2)]
    try:
        for conn in lane_clients:
            assert simple_query(conn, "SELECT 1") == [(1,)]
        done = []

        def sleep_in_the_lane(conn) -> None:
            assert simple_query(conn, "SELECT count(*) FROM pg_sleep(1)") == [(1,)]
            done.append(time.monotonic())

        sleepers = [threading.Thread(target=sleep_in_the_lane, args=(conn,)) for conn in lane_clients]
        for thread in sleepers:
            thread.start()
        wait_for(lambda: server_backends(pg) == 2 and (lane_metrics(proxy)["backends"] or 0) == 2, timeout=10)
        time.sleep(0.2)
        with psycopg_connect(proxy, autocommit=True) as conn:
            started = time.monotonic()
            simple_query(conn, "BEGIN")         # (its first statement borrows on the Python path and waits)
            assert simple_query(conn, "SELECT 41 + 1") == [(42,)]
            answered = time.monotonic()
            waited = answered - started
            simple_query(conn, "COMMIT")
        for thread in sleepers:
            thread.join(10)
    finally:
        for conn in lane_clients:
            conn.close()
    after = answered - min(done)
    print(f"the Python path's borrow waited {waited:.3f} s, answered {after:.3f} s after the first sleep ended")
    assert len(done) == 2
    # The backend went back to the pool at the wake-up that ended its transaction (before this, the lane's sweep
    # gave it back up to 0.25 s later); its borrow_timeout is 20 s.
    assert after < 0.15, (waited, after)
    assert server_backends(pg) <= 2


@pytest.mark.timeout(180)
@pytest.mark.parametrize("core", sorted(CORES))
def test_psycopg_transactions_run_in_the_relay_and_an_idle_begin_holds_no_backend(pg, proxy_factory, core):
    """psycopg's default (no autocommit: a plain BEGIN before each transaction's first statement): the relay answers
    the BEGIN itself and sends it ahead of the first statement, so whole transactions (BEGIN, INSERT, SELECT, COMMIT)
    run in the relay, six clients on two backends, rows right, no stay cut short. Clients idle after their BEGIN
    hold no backend meanwhile (four of them and two backends: the six others still get through), and one that
    commits or rolls back with nothing sent is answered by the relay with no backend at all."""
    proxy = proxy_factory(compiled_config(pg, max_size=2), env=CORES[core])
    table = client_table(pg, "lazy")
    clients, transactions = 6, 40
    errors = []
    idle = [psycopg_connect(proxy, autocommit=True) for _ in range(4)]
    for conn in idle:                   # BEGIN answered and nothing else: a transaction that holds no backend
        assert simple_query(conn, "SELECT 1") == [(1,)]
        assert simple_query(conn, "begin work;") is None
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS

    def transactional(number: int) -> None:
        try:
            with psycopg_connect(proxy) as conn:
                for n in range(transactions):
                    with psycopg.RawCursor(conn) as cur:
                        cur.execute(f"INSERT INTO {table} VALUES ({number}, {n})", prepare=False)
                        cur.execute(f"SELECT count(*) FROM {table} WHERE client = {number}", prepare=False)
                        assert cur.fetchone() == (n + 1,), (number, n)
                    if n % 5 == 4:
                        conn.rollback()     # (every fifth transaction rolled back: its row is gone)
                        cur = conn.execute(f"SELECT count(*) FROM {table} WHERE client = {number}")
                        assert cur.fetchone() == (n,), (number, n)
                        conn.execute(f"INSERT INTO {table} VALUES ({number}, {n})")
                    conn.commit()
        except Exception as exc:  # collected, re-raised in the test's thread
            errors.append(exc)

    before = relay_transactions(proxy)
    short_before = metric(metrics_text(proxy), "multiproxy_relay_lane_short_stays_total") or 0
    threads = [threading.Thread(target=transactional, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(150)
    assert not errors, errors[:3]
    with direct_connect(pg) as conn:
        assert conn.execute(f"SELECT count(*) FROM {table}").fetchone() == (clients * transactions,)
    relayed = relay_transactions(proxy) - before
    assert relayed >= clients * transactions, relayed
    assert (metric(metrics_text(proxy), "multiproxy_relay_lane_short_stays_total") or 0) == short_before
    for n, conn in enumerate(idle):     # the idle transactions end with no backend: answered by the relay
        assert simple_query(conn, "COMMIT" if n % 2 else "ROLLBACK") is None
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        assert simple_query(conn, "SELECT 42") == [(42,)]
        conn.close()
    assert_no_timeout_no_pin(proxy, pg, backends=2)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("core", sorted(CORES))
def test_transactions_with_modes_run_in_the_relay_with_their_modes(pg, proxy_factory, core):
    """psycopg with an isolation level, read_only or deferrable set sends BEGIN with those modes: the relay answers
    it and sends the same modes ahead, so each transaction runs in the relay with the isolation level and access mode
    its client asked for (four clients with four different ones on two backends, the server's own settings read
    inside each); a read-only transaction's INSERT is refused by the server (25006) and the client rolls back and
    goes on; an idle BEGIN READ ONLY holds no backend; a stop after such a BEGIN carries its modes to the Python
    path."""
    proxy = proxy_factory(compiled_config(pg, max_size=2), env=CORES[core])
    table = client_table(pg, "modes")
    modes = [   # (isolation level, read_only, deferrable) -> (transaction_isolation, transaction_read_only)
        ((psycopg.IsolationLevel.REPEATABLE_READ, None, None), ("repeatable read", "off")),
        ((psycopg.IsolationLevel.SERIALIZABLE, True, True), ("serializable", "on")),
        ((None, False, False), ("read committed", "off")),
        ((psycopg.IsolationLevel.READ_UNCOMMITTED, True, None), ("read uncommitted", "on")),
    ]
    transactions = 30
    idle = psycopg_connect(proxy, autocommit=True)
    assert simple_query(idle, "BEGIN READ ONLY, ISOLATION LEVEL SERIALIZABLE;") is None   # answered, no backend

    def transactional(number: int) -> None:
        (level, read_only, deferrable), expected = modes[number]
        with psycopg_connect(proxy) as conn:       # autocommit off: psycopg sends BEGIN with the modes first
            conn.isolation_level, conn.read_only, conn.deferrable = level, read_only, deferrable
            for n in range(transactions):
                with psycopg.RawCursor(conn) as cur:
                    cur.execute("SELECT current_setting('transaction_isolation'), "
                                "current_setting('transaction_read_only')", prepare=False)
                    assert cur.fetchone() == expected, (number, n)
                    if read_only:
                        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
                            cur.execute(f"INSERT INTO {table} VALUES ({number}, {n})", prepare=False)
                        conn.rollback()
                        continue
                    cur.execute(f"INSERT INTO {table} VALUES ({number}, {n})", prepare=False)
                conn.commit()

    before = relay_transactions(proxy)
    short_before = metric(metrics_text(proxy), "multiproxy_relay_lane_short_stays_total") or 0
    failures = run_clients(len(modes), transactional, timeout=150.0)
    assert not failures, failures[:3]
    with direct_connect(pg) as conn:
        assert conn.execute(f"SELECT client, count(*) FROM {table} GROUP BY client ORDER BY client").fetchall() == \
            [(0, transactions), (2, transactions)]
    relayed = relay_transactions(proxy) - before
    assert relayed >= len(modes) * transactions, relayed
    assert (metric(metrics_text(proxy), "multiproxy_relay_lane_short_stays_total") or 0) == short_before
    # the idle client's BEGIN held no backend meanwhile; a stop inside its transaction takes the modes along
    assert simple_query(idle, "SET LOCAL lock_timeout = '5s'") is None
    assert simple_query(idle, "SELECT current_setting('transaction_isolation'), "
                              "current_setting('transaction_read_only')") == [("serializable", "on")]
    assert simple_query(idle, "COMMIT") is None
    idle.close()
    assert_no_timeout_no_pin(proxy, pg, backends=2)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("core", sorted(CORES))
def test_named_statements_run_in_the_relay_as_the_unnamed_one(pg, proxy_factory, core):
    """psycopg preparing every statement (prepare_threshold=0; its default of 5 does the same from the sixth run of a
    text on) in transactions (its default BEGIN), six clients on two backends: each prepares its two statements once
    on the Python path, and from then on every transaction (BEGIN, Bind of the INSERT, Bind of the SELECT, COMMIT)
    runs in the relay, which sends each Bind as Parse and Bind of the unnamed statement; rows right, no pin. asyncpg
    beside them (its statement cache: named statements, autocommit) is relayed the same way."""
    proxy = proxy_factory(compiled_config(pg, max_size=2), env=CORES[core])
    table = client_table(pg, "named")
    clients, transactions = 6, 40

    def transactional(number: int) -> None:
        with psycopg_connect(proxy, prepare_threshold=0) as conn:
            for n in range(transactions):
                conn.execute(f"INSERT INTO {table} VALUES (%s, %s)", (number, n))
                got = conn.execute(f"SELECT count(*), %s::text FROM {table} WHERE client = %s",
                                   (f"c{number}", number)).fetchone()
                assert got == (n + 1, f"c{number}"), (number, n, got)
                conn.commit()

    before = relay_transactions(proxy)
    failures = run_clients(clients, transactional, timeout=150.0)
    assert not failures, failures[:3]
    with direct_connect(pg) as conn:
        assert conn.execute(f"SELECT count(*) FROM {table}").fetchone() == (clients * transactions,)
    relayed = relay_transactions(proxy) - before
    assert relayed >= clients * (transactions - 5), relayed     # (the first ones prepare on the Python path)

    async def asyncpg_client(number: int) -> None:
        conn = await asyncpg.connect(host=proxy.host, port=proxy.port, user=USER, database=AUTH_DB, timeout=10)
        try:
            for n in range(40):
                assert await conn.fetchval("SELECT $1::int + $2::int", number, n) == number + n
        finally:
            await conn.close()

    async def main():
        await asyncio.gather(*(asyncpg_client(i) for i in range(4)))

    before = relay_transactions(proxy)
    asyncio.run(main())
    relayed = relay_transactions(proxy) - before
    assert relayed >= 4 * 30, relayed
    assert_no_timeout_no_pin(proxy, pg, backends=2)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("core,crowd", [("c", 0), ("twin", 0), ("c", 70)])
def test_clients_whose_transactions_stop_after_their_begin_sit_out_the_lanes(pg, proxy_factory, core, crowd):
    """A client whose every transaction sets something right after its BEGIN (psycopg without autocommit, a SET
    LOCAL first) stops in the relay at once, after the BEGIN the relay answered: such a client, after stays in a lane
    that relayed nothing but that BEGIN, serves its next transactions on the Python path (its greenlet kept, its
    backend not lent to the lane), trying the lane again after 1, 3, 7, ... of them; a client beside it that runs
    single statements stays in the relay. Rows stay right; more clients than backends. crowd: idle clients beside
    them, enough for sessions to park at every transaction's end (EAGER_PARKING_SESSIONS): such a session parks on
    the Python path while it sits out."""
    proxy = proxy_factory(compiled_config(pg, max_size=2), env=CORES[core])
    idle = [psycopg_connect(proxy, autocommit=True) for _ in range(crowd)]
    table = client_table(pg, "begins")
    clients, transactions = 4, 60
    errors = []

    def transactional(number: int) -> None:
        try:
            with psycopg_connect(proxy) as conn:       # autocommit off: psycopg sends BEGIN first
                for n in range(transactions):
                    with psycopg.RawCursor(conn) as cur:
                        cur.execute("SET LOCAL lock_timeout = '5s'", prepare=False)
                        cur.execute(f"INSERT INTO {table} VALUES ({number}, {n})", prepare=False)
                        cur.execute(f"SELECT count(*) FROM {table} WHERE client = {number}", prepare=False)
                        assert cur.fetchone() == (n + 1,), (number, n)
                    conn.commit()
        except Exception as exc:  # collected, re-raised in the test's thread
            errors.append(exc)

    before = metric(metrics_text(proxy), "multiproxy_relay_lane_short_stays_total") or 0
    threads = [threading.Thread(target=transactional, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    with psycopg_connect(proxy, autocommit=True) as single:     # beside them: single statements, relayed
        relayed_before = relay_transactions(proxy)
        for n in range(100):
            assert simple_query(single, f"SELECT {n}") == [(n,)]
        relayed = relay_transactions(proxy) - relayed_before
    for thread in threads:
        thread.join(120)
    assert not errors, errors[:3]
    with direct_connect(pg) as conn:
        assert conn.execute(f"SELECT count(*) FROM {table}").fetchone() == (clients * transactions,)
    short = (metric(metrics_text(proxy), "multiproxy_relay_lane_short_stays_total") or 0) - before
    print("short stays of", clients * transactions, "transactions:", short, "; relayed of 100:", relayed)
    # Stays that relayed nothing, at transactions 1, 3, 7, 15, 31 of each client (and a few more when the one-by-one
    # statements of a stay end it at an idle point first): far fewer than its transactions.
    assert 1 <= short <= clients * 8, short
    assert relayed >= 80, relayed
    for conn in idle:
        conn.close()


@pytest.mark.timeout(120)
def test_a_client_sitting_out_the_lanes_keeps_its_settings_to_itself(pg, proxy_factory):
    """A client with a setting of its own whose transactions stop after their BEGIN (a SET LOCAL first) sits out the
    lanes and takes backends from the pool and other lanes: the Python path replays its setting where it runs, and
    clients beside it, on the same two backends, never see it."""
    proxy = proxy_factory(compiled_config(pg, max_size=2))
    errors = []
    stop = threading.Event()

    def with_setting() -> None:
        try:
            with psycopg_connect(proxy) as conn:       # autocommit off: BEGIN first
                with psycopg.RawCursor(conn) as cur:
                    cur.execute("SET statement_timeout = '7s'", prepare=False)
                    conn.commit()
                    while not stop.is_set():
                        cur.execute("SET LOCAL lock_timeout = '5s'", prepare=False)
                        cur.execute("SHOW statement_timeout", prepare=False)
                        assert cur.fetchone() == ("7s",)
                        conn.commit()
        except Exception as exc:  # collected, re-raised in the test's thread
            errors.append(exc)

    thread = threading.Thread(target=with_setting)
    thread.start()
    try:
        with psycopg_connect(proxy, autocommit=True) as a, psycopg_connect(proxy, autocommit=True) as b:
            for _ in range(150):
                for conn in (a, b):
                    assert simple_query(conn, "SHOW statement_timeout") == [("0",)]
    finally:
        stop.set()
        thread.join(30)
    assert not errors, errors[:3]
    assert (metric(metrics_text(proxy), "multiproxy_relay_lane_short_stays_total") or 0) >= 1
