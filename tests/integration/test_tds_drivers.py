"""The TDS driver matrix (issue 13): pymssql and python-tds with autocommit on and off, and SQLAlchemy 2's
mssql+pymssql pool, each with more clients than backends: rows right, no pool timeouts, no pins."""
from __future__ import annotations


import pytest

from .helpers import metric, metrics_text, run_clients
from .tdskit import DB, LabProcess
from .test_tds_proxy import APP_PASSWORD, APP_USER, ms, one, start, td

sqlalchemy = pytest.importorskip("sqlalchemy")

pytestmark = pytest.mark.tds
BACKENDS = 5
CLIENTS = 24
ROUNDS = 4


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    server = LabProcess(tmp_path_factory.mktemp("tdslab-drivers"))
    yield server
    server.stop()


def assert_no_timeouts_and_no_pins(proxy) -> None:
    text = metrics_text(proxy)
    assert metric(text, "multiproxy_database_connection_borrow_timeouts_total") == 0
    assert not metric(text, "multiproxy_database_connections_currently_session_pinned")
    assert not metric(text, "multiproxy_pin_reasons_detected_total")
    assert metric(text, "multiproxy_database_connections") <= BACKENDS


@pytest.mark.timeout(240)
@pytest.mark.parametrize("driver,autocommit", [("pymssql", True), ("pymssql", False), ("python-tds", True),
                                               ("python-tds", False)])
def test_driver_with_more_clients_than_backends(lab, proxy_factory, driver, autocommit):
    proxy = start(proxy_factory, lab, max_size=BACKENDS, borrow_timeout=10.0)
    table = f"matrix_{driver.replace('-', '_')}_{int(autocommit)}"
    connect = ms if driver == "pymssql" else td
    with connect(proxy) as setup:
        setup.cursor().execute(f"CREATE TABLE {table} (client INT, n INT)")
    # pymssql marks parameters %d/%s by type; python-tds takes %s for all
    mark = "%d" if driver == "pymssql" else "%s"

    def work(i):
        conn = connect(proxy, autocommit=autocommit)
        try:
            for n in range(ROUNDS):
                cur = conn.cursor()
                cur.execute(f"INSERT INTO {table} VALUES ({mark}, {mark})", (i, n))
                cur.execute(f"SELECT COUNT(*) FROM {table} WHERE client = {mark}", (i,))
                assert cur.fetchone()[0] == n + 1
                if not autocommit:
                    conn.commit()
        finally:
            conn.close()

    assert run_clients(CLIENTS, work, 150.0) == []
    with connect(proxy) as check:
        assert one(check, f"SELECT COUNT(*), COUNT(DISTINCT client) FROM {table}") == [(CLIENTS * ROUNDS, CLIENTS)]
    assert_no_timeouts_and_no_pins(proxy)


@pytest.mark.timeout(240)
def test_sqlalchemy_pymssql_pool_larger_than_the_proxys(lab, proxy_factory):
    """SQLAlchemy 2's own pool (20 connections) over the proxy's 5 backends: pymssql under it keeps a transaction
    open (autocommit off), the pool rolls back on every return; plain text() queries."""
    proxy = start(proxy_factory, lab, max_size=BACKENDS, borrow_timeout=10.0)
    engine = sqlalchemy.create_engine(
        f"mssql+pymssql://{APP_USER}:{APP_PASSWORD}@{proxy.host}:{proxy.port}/{DB}?tds_version=7.4",
        pool_size=20, max_overflow=0, pool_timeout=30)
    try:
        with engine.begin() as conn:
            conn.execute(sqlalchemy.text("CREATE TABLE sa_rows (client INT, n INT)"))
        clients = 40

        def work(i):
            for n in range(ROUNDS):
                with engine.begin() as conn:
                    conn.execute(sqlalchemy.text("INSERT INTO sa_rows VALUES (:c, :n)"), {"c": i, "n": n})
                with engine.connect() as conn:
                    count = conn.execute(sqlalchemy.text("SELECT COUNT(*) FROM sa_rows WHERE client = :c"),
                                         {"c": i}).scalar()
                    assert count == n + 1

        assert run_clients(clients, work, 150.0) == []
        with engine.connect() as conn:
            assert conn.execute(sqlalchemy.text("SELECT COUNT(*) FROM sa_rows")).scalar() == clients * ROUNDS
        assert engine.pool.checkedin() > BACKENDS          # the driver pool holds more than the proxy's backends
    finally:
        engine.dispose()
    assert_no_timeouts_and_no_pins(proxy)
