"""An idle client costs at most 4 KB of proxy memory (issue 18): 2,000 real clients per engine log in through one
worker, run a query and idle; the proxy's RSS grows by at most 4 KB per client, the admin views still count them,
and afterwards every client runs a query correctly."""
from __future__ import annotations

import resource
import time
from concurrent.futures import ThreadPoolExecutor

import psycopg
import pytest

from .helpers import admin_status, metric, metrics_text
from .mysqlkit import connect as mysql_connect
from .mysqlkit import start_proxy as start_mysql_proxy
from .proxy import free_port
from .tdskit import LabProcess

pymssql = pytest.importorskip("pymssql")

pytestmark = pytest.mark.timeout(600)

IDLE_CLIENTS = 2000
WARM_CLIENTS = 100          # come and go before the baseline: one-time costs (pools, caches) are not counted
BYTES_PER_IDLE_CLIENT = 4096
CONNECTING_THREADS = 8
SETTLE_SECONDS = 3.0        # the parking sweep parks the clients it finds idle within two of its rounds (1 s each)


@pytest.fixture(autouse=True)
def open_files():
    """Room for the clients here and in the proxy (which inherits the limit): the soft RLIMIT_NOFILE raised within
    the hard limit, and put back afterwards."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = IDLE_CLIENTS + 1000
    if hard != resource.RLIM_INFINITY and hard < wanted:
        pytest.skip(f"the hard RLIMIT_NOFILE ({hard}) leaves no room for {IDLE_CLIENTS} clients")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, wanted), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def idle_growth(proxy, connect, query, while_idle=None) -> int:
    """Bytes of RSS growth per idle client; every client answers `query` correctly afterwards. while_idle(): called
    once while they all idle (after the RSS is read)."""
    for _ in range(WARM_CLIENTS):
        conn = connect()
        query(conn, 0)
        conn.close()
    time.sleep(SETTLE_SECONDS)
    before = rss_bytes(proxy.pid)

    def open_one(i):
        conn = connect()
        query(conn, i)
        return conn

    with ThreadPoolExecutor(CONNECTING_THREADS) as pool:
        clients = list(pool.map(open_one, range(IDLE_CLIENTS)))
    try:
        time.sleep(SETTLE_SECONDS)
        after = rss_bytes(proxy.pid)
        status = admin_status(proxy)        # parked clients are clients: /status counts them
        if while_idle is not None:
            while_idle()
        with ThreadPoolExecutor(CONNECTING_THREADS) as pool:
            list(pool.map(lambda item: query(item[1], item[0] + IDLE_CLIENTS), enumerate(clients)))
    finally:
        for conn in clients:
            conn.close()
    assert sum(listener["clients"] for listener in status["listeners"]) == IDLE_CLIENTS, status["listeners"]
    return (after - before) // IDLE_CLIENTS


def test_idle_postgres_clients_cost_at_most_4_kb_each(pg, proxy_factory):
    proxy = proxy_factory({
        "proxy": {"admin_listen": f"127.0.0.1:{free_port()}", "log_level": "info"},
        "clusters": {"main": {"engine": "postgres", "hosts": [f"127.0.0.1:{pg.port}"], "backend": {"tls": "disable"},
                              "pool": {"mode": "transaction", "max_size": 4, "borrow_timeout": 30.0}}},
        "listeners": [{"name": "pg", "listen": f"127.0.0.1:{free_port()}", "cluster": "main", "auth": "trust"}],
    })
    host, port = proxy.address("pg")

    def connect():
        return psycopg.connect(host=host, port=port, user="mp_trust", dbname="mpdb", connect_timeout=30,
                               autocommit=True)

    def query(conn, i):
        assert conn.execute("SELECT %s::int + 1", (i,)).fetchone() == (i + 1,)

    per_client = idle_growth(proxy, connect, query)
    assert per_client <= BYTES_PER_IDLE_CLIENT, f"{per_client} bytes per idle PostgreSQL client"


def test_idle_postgres_clients_in_relay_lanes_cost_at_most_4_kb_each(pg, proxy_factory):
    """[proxy] relay = "compiled": each idle client waits in a relay lane, where it holds no buffer."""
    proxy = proxy_factory({
        "proxy": {"admin_listen": f"127.0.0.1:{free_port()}", "log_level": "info", "relay": "compiled"},
        "clusters": {"main": {"engine": "postgres", "hosts": [f"127.0.0.1:{pg.port}"], "backend": {"tls": "disable"},
                              "pool": {"mode": "transaction", "max_size": 4, "borrow_timeout": 30.0}}},
        "listeners": [{"name": "pg", "listen": f"127.0.0.1:{free_port()}", "cluster": "main", "auth": "trust"}],
    })
    host, port = proxy.address("pg")

    def connect():
        return psycopg.connect(host=host, port=port, user="mp_trust", dbname="mpdb", connect_timeout=30,
                               autocommit=True)

    def query(conn, i):
        with psycopg.RawCursor(conn) as cur:        # a simple-protocol Query: what the lanes serve
            cur.execute(f"SELECT {i} + 1", prepare=False)
            assert cur.fetchone() == (i + 1,)

    in_lanes, greeted = [], []

    def while_idle():
        text = metrics_text(proxy)
        in_lanes.append(metric(text, "multiproxy_relay_lane_clients"))
        greeted.append(metric(text, "multiproxy_relay_logins_total"))

    per_client = idle_growth(proxy, connect, query, while_idle)
    assert in_lanes and in_lanes[0] >= IDLE_CLIENTS * 0.95, in_lanes
    # Most of them were greeted by the relay itself (relay logins), from their template's state: they count too.
    assert greeted and greeted[0] >= IDLE_CLIENTS * 0.5, greeted
    assert per_client <= BYTES_PER_IDLE_CLIENT, f"{per_client} bytes per idle PostgreSQL client in a relay lane"


def test_idle_mysql_clients_cost_at_most_4_kb_each(mariadb, proxy_factory):
    proxy = start_mysql_proxy(proxy_factory, mariadb, max_size=4, borrow_timeout=30.0)

    def query(conn, i):
        with conn.cursor() as cur:
            cur.execute("SELECT %s + 1", (i,))
            assert cur.fetchone() == (i + 1,)

    per_client = idle_growth(proxy, lambda: mysql_connect(proxy), query)
    assert per_client <= BYTES_PER_IDLE_CLIENT, f"{per_client} bytes per idle MySQL client"


def test_idle_tds_clients_cost_at_most_4_kb_each(proxy_factory, tmp_path):
    from .test_tds_proxy import ms, tds_config, users_toml
    lab = LabProcess(tmp_path)
    try:
        config = tds_config(lab, max_size=4, borrow_timeout=30.0)
        proxy = proxy_factory(config, files={"users.toml": users_toml()})

        def query(conn, i):
            cur = conn.cursor()
            cur.execute("SELECT %d + 1" % i)
            assert cur.fetchone() == (i + 1,)

        per_client = idle_growth(proxy, lambda: ms(proxy), query)
        assert per_client <= BYTES_PER_IDLE_CLIENT, f"{per_client} bytes per idle TDS client"
    finally:
        lab.stop()
