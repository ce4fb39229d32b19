"""No spurious pins (issue 13, PostgreSQL): resets unpin, plain settings are tracked and replayed instead of
pinning, and a statement that never reached a backend changes nothing. Real PostgreSQL, real clients, more
clients than backends, pin gauges checked."""
from __future__ import annotations

import asyncio
import threading

import asyncpg
import psycopg
import pytest

from .pgserver import AUTH_DB
from .helpers import metric, metrics_text
from .test_pg_pinning import pinned, proxy_config

USER = "mp_trust"
CONNECT_TIMEOUT = 10
BORROW_FAILURES = "no database connection became free"


def connect(proxy, **kwargs) -> psycopg.Connection:
    kwargs.setdefault("autocommit", True)
    return psycopg.connect(host=proxy.host, port=proxy.port, user=USER, dbname=AUTH_DB,
                           connect_timeout=CONNECT_TIMEOUT, prepare_threshold=None, **kwargs)


def one(conn, sql: str, params=None):
    return conn.execute(sql, params).fetchone()[0]


# -- (a) asyncpg's own pool --------------------------------------------------------------------------

@pytest.mark.timeout(120)
def test_asyncpg_pool_of_30_over_10_backends_never_pins(pg, proxy_factory):
    proxy = proxy_factory(proxy_config(pg, max_size=10, borrow_timeout=5.0))
    failures: list[str] = []

    async def scenario():
        # On release asyncpg sends SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL;
        pool = await asyncpg.create_pool(host=proxy.host, port=proxy.port, user=USER, database=AUTH_DB,
                                         min_size=30, max_size=30, timeout=CONNECT_TIMEOUT, command_timeout=20)
        try:
            queue: asyncio.Queue = asyncio.Queue()
            for i in range(500):
                queue.put_nowait(i)

            async def worker():
                while True:
                    try:
                        i = queue.get_nowait()
                    except asyncio.QueueEmpty:
                        return
                    try:
                        async with pool.acquire() as conn:
                            assert await conn.fetchval("SELECT $1::int + 1", i) == i + 1
                    except Exception as exc:  # noqa: BLE001
                        failures.append(repr(exc))

            await asyncio.gather(*(worker() for _ in range(30)))
        finally:
            await asyncio.wait_for(pool.close(), 20)

    asyncio.run(asyncio.wait_for(scenario(), 100))
    assert failures == []
    assert pinned(proxy) == 0, metrics_text(proxy)


# -- (b) plain settings follow each client ------------------------------------------------------------

@pytest.mark.timeout(120)
def test_plain_settings_on_15_clients_over_5_backends_are_replayed_not_pinned(pg, proxy_factory):
    proxy = proxy_factory(proxy_config(pg, max_size=5, borrow_timeout=10.0))
    conns = [connect(proxy, autocommit=False) for _ in range(15)]
    errors: list[str] = []
    try:
        for n, conn in enumerate(conns):
            conn.execute("SET extra_float_digits = 3")
            conn.execute(f"SET search_path = sp_{n}, public")
            conn.execute(f"SET statement_timeout = {4321 + n}")
            conn.commit()
        assert pinned(proxy) == 0, metrics_text(proxy)

        def run(n, conn):
            try:
                for _ in range(10):
                    with conn.transaction():
                        assert one(conn, "SHOW extra_float_digits") == "3"
                        assert one(conn, "SHOW search_path") == f"sp_{n}, public"
                        assert one(conn, "SHOW statement_timeout") == f"{4321 + n}ms"
                    conn.commit()
            except Exception as exc:  # noqa: BLE001
                errors.append(f"client {n}: {exc!r}")

        threads = [threading.Thread(target=run, args=(n, c), daemon=True) for n, c in enumerate(conns)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not any(t.is_alive() for t in threads)
        assert errors == []
        assert pinned(proxy) == 0
        # Nothing leaks to a client that set nothing, whichever backend it gets: 5 at once hold all five.
        plain = [connect(proxy, autocommit=False) for _ in range(5)]
        try:
            pids = set()
            for conn in plain:
                pids.add(one(conn, "SELECT pg_backend_pid()"))
                assert one(conn, "SHOW extra_float_digits") == "1"
                assert one(conn, "SHOW search_path") == '"$user", public'
                assert one(conn, "SHOW statement_timeout") == "0"
            assert len(pids) == 5
            for conn in plain:
                conn.commit()
        finally:
            for conn in plain:
                conn.close()
    finally:
        for conn in conns:
            conn.close()


# -- (c) set_config of a reported parameter -----------------------------------------------------------

@pytest.mark.timeout(60)
def test_set_config_timezone_does_not_pin(pg, proxy_factory):
    proxy = proxy_factory(proxy_config(pg, max_size=2))
    with connect(proxy) as conn, connect(proxy) as other:
        assert one(conn, "SELECT set_config('TimeZone', 'Asia/Tokyo', false)") == "Asia/Tokyo"
        assert pinned(proxy) == 0
        for _ in range(5):
            assert one(other, "SHOW TimeZone") != "Asia/Tokyo"
            assert one(conn, "SHOW TimeZone") == "Asia/Tokyo"
        assert one(conn, "SELECT set_config('lock_timeout', '1234', false)") == "1234ms"
        assert pinned(proxy) == 0
        with other.transaction():    # holds one backend: conn must move to the other and keep its settings
            one(other, "SELECT 1")
            assert one(conn, "SHOW lock_timeout") == "1234ms"
            assert one(conn, "SHOW TimeZone") == "Asia/Tokyo"
        assert one(other, "SHOW lock_timeout") == "0"


# -- (d) RESET ALL -----------------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_reset_all_after_sets_returns_defaults_and_unpins(pg, proxy_factory):
    proxy = proxy_factory(proxy_config(pg, max_size=2))
    with connect(proxy) as conn, connect(proxy) as other:
        conn.execute("SET statement_timeout = 4321")
        conn.execute("SET extra_float_digits = 3")
        conn.execute("SET ROLE mp_trust")     # identity: tracked and replayed too, no pin
        assert pinned(proxy) == 0
        conn.execute("RESET ALL")             # leaves the role as it is, as on a server
        assert pinned(proxy) == 0
        for _ in range(4):
            with other.transaction():        # conn lands on either backend: both must be at the defaults
                one(other, "SELECT 1")
                assert one(conn, "SHOW statement_timeout") == "0"
                assert one(conn, "SHOW extra_float_digits") == "1"
                assert one(conn, "SELECT current_setting('role')") == "mp_trust"
            assert one(conn, "SHOW statement_timeout") == "0"
        conn.execute("RESET ROLE")
        for _ in range(2):
            with other.transaction():
                one(other, "SELECT 1")
                assert one(conn, "SELECT current_setting('role')") == "none"
        assert pinned(proxy) == 0


# -- (e) WITH HOLD cursors ----------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_with_hold_cursor_pins_until_close_all(pg, proxy_factory):
    proxy = proxy_factory(proxy_config(pg, max_size=2))
    with connect(proxy) as conn:
        conn.execute("DECLARE a CURSOR WITH HOLD FOR SELECT g FROM generate_series(1, 10) g")
        conn.execute("DECLARE b CURSOR WITH HOLD FOR SELECT g FROM generate_series(1, 10) g")
        pid = one(conn, "SELECT pg_backend_pid()")
        assert pinned(proxy, "cursor_with_hold") == 1
        assert conn.execute("FETCH 2 FROM a").fetchall() == [(1,), (2,)]
        conn.execute("CLOSE a")
        assert pinned(proxy, "cursor_with_hold") == 1
        assert one(conn, "SELECT pg_backend_pid()") == pid
        assert conn.execute("FETCH 1 FROM b").fetchall() == [(1,)]
        conn.execute("CLOSE ALL")
        assert pinned(proxy) == 0
        # Its backend is free: two clients in open transactions get both.
        with connect(proxy, autocommit=False) as x, connect(proxy, autocommit=False) as y:
            assert len({one(x, "SELECT pg_backend_pid()"), one(y, "SELECT pg_backend_pid()")}) == 2
            x.commit()
            y.commit()
        assert one(conn, "SELECT 1") == 1


# -- (f) a SET that never reached a backend -----------------------------------------------------------

@pytest.mark.timeout(60)
def test_a_set_that_failed_with_the_pool_timeout_leaves_no_pin_and_no_setting(pg, proxy_factory):
    proxy = proxy_factory(proxy_config(pg, max_size=1, borrow_timeout=1.0))
    with connect(proxy, autocommit=False) as holder, connect(proxy) as conn:
        one(holder, "SELECT 1")               # an open transaction holds the only backend
        for sql in ("SET statement_timeout = 1", "SET ROLE mp_trust", "CREATE TEMP TABLE never (id int)",
                    "SELECT set_config('lock_timeout', '1', false)"):
            with pytest.raises(psycopg.OperationalError, match=BORROW_FAILURES):
                conn.execute(sql)
        assert pinned(proxy) == 0
        assert metric(metrics_text(proxy), "multiproxy_pin_reasons_detected_total") in (None, 0.0)
        holder.commit()
        assert one(conn, "SHOW statement_timeout") == "0"
        assert one(conn, "SHOW lock_timeout") == "0"
        assert one(conn, "SELECT to_regclass('pg_temp.never')") is None
        assert pinned(proxy) == 0
        # The backend is not held by conn: the holder gets it for a new transaction.
        assert one(holder, "SELECT 2") == 2
        holder.commit()


# -- tracked settings follow the server's transaction semantics ----------------------------------------

@pytest.mark.timeout(60)
def test_a_set_in_a_rolled_back_transaction_is_not_replayed(pg, proxy_factory):
    proxy = proxy_factory(proxy_config(pg, max_size=2))
    with connect(proxy, autocommit=False) as conn, connect(proxy, autocommit=False) as other:
        conn.execute("SET statement_timeout = 4321")
        conn.rollback()
        conn.execute("SET lock_timeout = 1234")
        conn.commit()
        with pytest.raises(psycopg.errors.InvalidParameterValue):
            conn.execute("SET lock_timeout = 'abc'")
        conn.rollback()
        for _ in range(4):
            one(other, "SELECT 1")           # holds a backend: conn alternates between the two
            assert one(conn, "SHOW statement_timeout") == "0"
            assert one(conn, "SHOW lock_timeout") == "1234ms"
            conn.commit()
            assert one(other, "SHOW lock_timeout") == "0"
            other.commit()
        assert pinned(proxy) == 0


# -- (g) values only the server knows: read back in the same borrow -----------------------------------

BORROW_TIMEOUTS = "multiproxy_database_connection_borrow_timeouts_total"


def borrow_timeouts(proxy) -> float:
    return metric(metrics_text(proxy), BORROW_TIMEOUTS) or 0.0


def on_every_backend(conn, other, sql: str, rounds: int = 4) -> set:
    """What `sql` answers on `conn` while `other` holds one backend in a transaction, then on any backend."""
    seen = set()
    for _ in range(rounds):
        with other.transaction():
            one(other, "SELECT 1")
            seen.add(one(conn, sql))
        seen.add(one(conn, sql))
    return seen


@pytest.mark.timeout(60)
def test_set_config_with_expressions_is_read_back_and_replayed(pg, proxy_factory):
    proxy = proxy_factory(proxy_config(pg, max_size=2))
    with connect(proxy) as conn, connect(proxy) as other:
        assert one(conn, "SELECT set_config('search_path', current_setting('search_path') || ', sp_extra', false)") \
            == '"$user", public, sp_extra'
        # A name only the server computes: every setting the session holds is read back.
        conn.execute("SELECT set_config(n, v, false) FROM (VALUES ('lock_timeout', '4s')) AS s (n, v)")
        assert one(conn, "SELECT set_config('mp.tenant', (40 + 2)::text, false)") == "42"
        assert pinned(proxy) == 0
        assert on_every_backend(conn, other, "SELECT current_setting('search_path')") == {'"$user", public, sp_extra'}
        assert on_every_backend(conn, other, "SHOW lock_timeout") == {"4s"}
        assert on_every_backend(conn, other, "SELECT current_setting('mp.tenant')") == {"42"}
        assert one(other, "SHOW lock_timeout") == "0"
        # Rolled back: the server undid it, and so does the proxy.
        with conn.transaction():
            conn.execute("SELECT set_config('lock_timeout', (1 + 1)::text || 's', false)")
            assert one(conn, "SHOW lock_timeout") == "2s"
            raise_rollback(conn)
        assert on_every_backend(conn, other, "SHOW lock_timeout") == {"4s"}
        assert pinned(proxy) == 0


def raise_rollback(conn) -> None:
    raise psycopg.Rollback()


# -- (h) SET ROLE and SET SESSION AUTHORIZATION follow the client -------------------------------------

@pytest.fixture(scope="module")
def reader_role(pg):
    with psycopg.connect(host=pg.host, port=pg.port, user="postgres", dbname=AUTH_DB, autocommit=True) as admin:
        admin.execute("DO $$ BEGIN CREATE ROLE mp_reader NOLOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$")
        admin.execute("GRANT mp_reader TO mp_trust")
    return "mp_reader"


@pytest.mark.timeout(60)
def test_set_role_is_replayed_on_each_backend_without_a_pin(pg, proxy_factory, reader_role):
    proxy = proxy_factory(proxy_config(pg, max_size=2))
    with connect(proxy) as conn, connect(proxy) as other:
        conn.execute(f"SET ROLE {reader_role}")
        assert pinned(proxy) == 0
        assert on_every_backend(conn, other, "SELECT current_user") == {reader_role}
        assert one(other, "SELECT current_user") == USER          # never another client's role
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SET ROLE postgres")                      # refused: the role stays as it was
        assert on_every_backend(conn, other, "SELECT current_user") == {reader_role}
        conn.execute("RESET ROLE")
        assert on_every_backend(conn, other, "SELECT current_user") == {USER}
        assert pinned(proxy) == 0


@pytest.mark.timeout(60)
def test_session_authorization_then_role_are_replayed_in_order(pg, proxy_factory, reader_role):
    proxy = proxy_factory(proxy_config(pg, max_size=2))
    as_superuser = dict(host=proxy.host, port=proxy.port, user="postgres", dbname=AUTH_DB, autocommit=True,
                        connect_timeout=CONNECT_TIMEOUT, prepare_threshold=None)
    with psycopg.connect(**as_superuser) as conn, psycopg.connect(**as_superuser) as other:
        conn.execute(f"SET SESSION AUTHORIZATION {USER}")
        conn.execute(f"SET ROLE {reader_role}")
        assert pinned(proxy) == 0
        both = "SELECT session_user || '/' || current_user"
        assert on_every_backend(conn, other, both) == {f"{USER}/{reader_role}"}
        assert one(other, both) == "postgres/postgres"
        conn.execute("SET SESSION AUTHORIZATION DEFAULT")            # resets the role too
        assert on_every_backend(conn, other, both) == {"postgres/postgres"}
        assert pinned(proxy) == 0


# -- (i) an idle transaction holds no backend ---------------------------------------------------------

@pytest.mark.timeout(90)
def test_40_clients_idle_in_begin_on_a_pool_of_4(pg, proxy_factory):
    proxy = proxy_factory(proxy_config(pg, max_size=4, borrow_timeout=10.0))
    with psycopg.connect(host=pg.host, port=pg.port, user="postgres", dbname=AUTH_DB, autocommit=True) as admin:
        admin.execute("DROP TABLE IF EXISTS lazy_begin_rows")
        admin.execute("CREATE TABLE lazy_begin_rows (client int PRIMARY KEY, total int)")
        admin.execute("GRANT ALL ON lazy_begin_rows TO mp_trust")
    conns = [connect(proxy) for _ in range(40)]
    errors: list[str] = []
    try:
        for n, conn in enumerate(conns):
            conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ" if n % 2 else "BEGIN")
            assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
        # 40 open transactions, and none holds a backend.
        assert metric(metrics_text(proxy), "multiproxy_database_connections_currently_borrowed") == 0

        def finish(n: int, conn) -> None:
            try:
                conn.execute("INSERT INTO lazy_begin_rows VALUES (%s, %s)", (n, n * 10))
                assert one(conn, "SELECT current_setting('transaction_isolation')") == \
                    ("repeatable read" if n % 2 else "read committed")
                assert one(conn, "SELECT total FROM lazy_begin_rows WHERE client = %s", (n,)) == n * 10
                conn.execute("COMMIT")
            except Exception as exc:  # noqa: BLE001
                errors.append(f"{n}: {exc!r}")

        threads = [threading.Thread(target=finish, args=(n, conn)) for n, conn in enumerate(conns)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert errors == []
        # A BEGIN followed by COMMIT and nothing else never needs a backend at all.
        for conn in conns[:5]:
            conn.execute("BEGIN")
            conn.execute("COMMIT")
            assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    finally:
        for conn in conns:
            conn.close()
    with psycopg.connect(host=pg.host, port=pg.port, user="postgres", dbname=AUTH_DB, autocommit=True) as admin:
        assert admin.execute("SELECT count(*), sum(total) FROM lazy_begin_rows").fetchone() == (40, sum(range(40)) * 10)
    assert borrow_timeouts(proxy) == 0 and pinned(proxy) == 0


# -- (j) reset_after_transaction: indirect changes do not reach the next client -----------------------

@pytest.fixture(scope="module")
def indirect_setter(pg):
    with psycopg.connect(host=pg.host, port=pg.port, user="postgres", dbname=AUTH_DB, autocommit=True) as admin:
        admin.execute("CREATE OR REPLACE FUNCTION mp_set_tenant(value text) RETURNS text LANGUAGE sql "
                      "AS $$ SELECT set_config('mp.tenant', value, false) $$")
        admin.execute("GRANT EXECUTE ON FUNCTION mp_set_tenant(text) TO mp_trust")
    return "public.mp_set_tenant"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("reset", ["yes", "no"])
def test_reset_after_transaction_stops_indirect_changes_leaking(pg, proxy_factory, indirect_setter, reset):
    config = proxy_config(pg, max_size=1)
    config["clusters"]["main"]["backend"]["reset_after_transaction"] = reset
    proxy = proxy_factory(config)
    with connect(proxy) as first, connect(proxy) as second:
        # Changes the proxy cannot see: inside a DO body's EXECUTE, inside a function. With the reset they last
        # until the end of the transaction that made them, for this client too.
        with first.transaction():
            first.execute("DO $$ BEGIN EXECUTE 'SET search_path = pg_catalog'; END $$")
            first.execute(f"SELECT {indirect_setter}('leaked')")
            assert one(first, "SHOW search_path") == "pg_catalog"
        # One backend: the second client gets the very connection the first one changed.
        search_path = one(second, "SHOW search_path")
        tenant = one(second, "SELECT current_setting('mp.tenant', true)")
        if reset == "yes":
            assert (search_path, tenant) in (('"$user", public', None), ('"$user", public', ""))
        else:
            assert (search_path, tenant) == ("pg_catalog", "leaked")     # documented: it leaks without the reset
        # What the proxy tracks still follows the first client across the reset.
        first.execute("SET lock_timeout = '3s'")
        assert one(second, "SHOW lock_timeout") == "0"
        assert one(first, "SHOW lock_timeout") == "3s"
    assert pinned(proxy) == 0 and borrow_timeouts(proxy) == 0


@pytest.mark.timeout(60)
def test_prepared_statements_survive_the_reset_before_each_transaction(pg, proxy_factory):
    # DISCARD ALL deallocates the backend's statements: the proxy prepares them again where they are needed.
    config = proxy_config(pg, max_size=1)
    config["clusters"]["main"]["backend"]["reset_after_transaction"] = "yes"
    proxy = proxy_factory(config)
    prepared = dict(host=proxy.host, port=proxy.port, user=USER, dbname=AUTH_DB, autocommit=True,
                    connect_timeout=CONNECT_TIMEOUT, prepare_threshold=0)
    with psycopg.connect(**prepared) as first, psycopg.connect(**prepared) as second:
        for i in range(6):
            assert first.execute("SELECT %s::int + 1", (i,)).fetchone()[0] == i + 1
            assert second.execute("SELECT %s::int * 2", (i,)).fetchone()[0] == i * 2
            with first.transaction():
                assert first.execute("SELECT %s::int + 1", (i,)).fetchone()[0] == i + 1
                assert first.execute("SELECT %s::int - 1", (i,)).fetchone()[0] == i - 1
    assert pinned(proxy) == 0 and borrow_timeouts(proxy) == 0


@pytest.mark.timeout(60)
def test_reset_all_and_discard_all_return_to_the_login_values(pg, proxy_factory):
    # As on a server: RESET ALL goes back to what the startup packet chose, not to the backend's own login.
    proxy = proxy_factory(proxy_config(pg, max_size=2))
    with connect(proxy, application_name="startup_app", options="-c statement_timeout=4321") as conn, \
            connect(proxy) as other:
        for reset in ("RESET ALL", "DISCARD ALL"):
            conn.execute("SET statement_timeout = 1000")
            conn.execute("SET application_name = 'changed'")
            conn.execute(reset)
            assert conn.info.parameter_status("application_name") == "startup_app"
            assert on_every_backend(conn, other, "SHOW statement_timeout") == {"4321ms"}
            assert on_every_backend(conn, other, "SHOW application_name") == {"startup_app"}
        assert one(other, "SHOW statement_timeout") == "0"
    assert pinned(proxy) == 0
