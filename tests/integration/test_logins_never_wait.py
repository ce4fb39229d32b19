"""Logins never wait for a busy backend on PostgreSQL and TDS either: with the only backend in another client's
transaction, a new client's login completes at once and its first request waits for the backend, as any request.
(MySQL: tests/integration/test_mysql_budget.py.)"""
from __future__ import annotations

import threading
import time

import pytest

try:
    from .mysqlkit import metric, metrics_text
    from .pgserver import AUTH_DB
    from .proxy import free_port
    from .tdskit import DB as TDS_DB
    from .tdskit import LAB_PASSWORD, LAB_USER, LabProcess, RawClient
except ImportError:
    from mysqlkit import metric, metrics_text
    from pgserver import AUTH_DB
    from proxy import free_port
    from tdskit import DB as TDS_DB
    from tdskit import LAB_PASSWORD, LAB_USER, LabProcess, RawClient

pytestmark = pytest.mark.timeout(120)

TIMEOUTS = "multiproxy_database_connection_borrow_timeouts_total"
LOGIN_LIMIT = 0.5       # seconds: a login with every backend busy completes well within this


def one_backend(engine: str, port: int, credentials: list) -> dict:
    cluster = {"engine": engine, "hosts": [f"127.0.0.1:{port}"], "backend": {"tls": "disable"},
               "pool": {"mode": "transaction", "max_size": 1, "borrow_timeout": 30.0}}
    if credentials:
        cluster["credentials"] = credentials
    return {"proxy": {"admin_listen": f"127.0.0.1:{free_port()}", "log_level": "info"},
            "clusters": {"main": cluster},
            "listeners": [{"name": "l", "listen": f"127.0.0.1:{free_port()}", "cluster": "main", "role": "writer",
                           "auth": "trust"}]}


def test_a_postgres_login_completes_while_the_only_backend_is_in_a_transaction(pg, proxy_factory):
    import pg8000.native
    proxy = proxy_factory(one_backend("postgres", pg.port, []))
    host, port = proxy.address("l")
    holder = pg8000.native.Connection("mp_trust", host=host, port=port, database=AUTH_DB, timeout=10)
    holder.run("BEGIN")
    assert holder.run("SELECT 1") == [[1]]                 # the only backend is in this transaction
    started = time.monotonic()
    client = pg8000.native.Connection("mp_trust", host=host, port=port, database=AUTH_DB, timeout=30)
    assert time.monotonic() - started < LOGIN_LIMIT
    rows: list = []
    waiting = threading.Thread(target=lambda: rows.append(client.run("SELECT 2")))
    waiting.start()
    time.sleep(0.3)
    assert not rows                                         # the request waits for the backend, not the login
    holder.run("COMMIT")
    waiting.join(10)
    assert rows == [[[2]]]
    assert metric(metrics_text(proxy), TIMEOUTS) == 0
    client.close()
    holder.close()


@pytest.fixture(scope="module")
def tds_lab(tmp_path_factory):
    server = LabProcess(tmp_path_factory.mktemp("nowait-tds"))
    yield server
    server.stop()


def test_a_tds_login_completes_while_the_only_backend_is_in_a_transaction(tds_lab, proxy_factory):
    credentials = [{"user": "*", "backend_user": LAB_USER, "password": LAB_PASSWORD}]
    proxy = proxy_factory(one_backend("tds", tds_lab.port, credentials))
    holder = RawClient(proxy.port, user="app", password="x", database=TDS_DB, require_loginack=True)
    holder.batch("BEGIN TRAN")
    assert holder.rows("SELECT 1") == [[1]]                # the only backend is in this transaction
    started = time.monotonic()
    client = RawClient(proxy.port, user="app", password="x", database=TDS_DB, require_loginack=True)
    assert time.monotonic() - started < LOGIN_LIMIT
    rows: list = []
    waiting = threading.Thread(target=lambda: rows.append(client.rows("SELECT 2")))
    waiting.start()
    time.sleep(0.3)
    assert not rows
    holder.batch("COMMIT")
    waiting.join(10)
    assert rows == [[[2]]]
    assert metric(metrics_text(proxy), TIMEOUTS) == 0
    client.close()
    holder.close()
