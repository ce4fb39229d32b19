"""The proxy while its database server is stopped under it, on a private server of each engine's own (PostgreSQL:
a fast shutdown; MariaDB: a normal one), with pool min_size > 0, a client connected and idle, with and without a
failover registry (a second, never reachable, host makes one): the proxy's CPU over a few seconds stays low (its
utime + stime from /proc), and once the server is back on the same port the idle client and a new one are served
within a few seconds."""
from __future__ import annotations

import os
import time

import psycopg
import pymysql
import pytest

from .pgserver import SUPERUSER, PostgresServer
from .proxy import free_port

CLK_TCK = os.sysconf("SC_CLK_TCK")
MEASURE_SECONDS = 5.0
# An idle proxy whose server is down costs well under 1% of a core here; a loop without back-off costs 10-50%.
# The bound is generous for a loaded CI machine.
CPU_BOUND = 0.10
BACK_WITHIN = 5.0         # seconds from the server's return until clients are served again
MARIADB_USER, MARIADB_PASSWORD, MARIADB_DB = "mp_outage", "outage-pw", "mpdb"


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, in seconds, from /proc/PID/stat (fields 14 and 15)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def cpu_share(pid: int, seconds: float) -> float:
    """The share of one core process `pid` used over the next `seconds`."""
    before, started = cpu_seconds(pid), time.monotonic()
    time.sleep(seconds)
    return (cpu_seconds(pid) - before) / (time.monotonic() - started)


def until_served(what: str, attempt, timeout: float) -> float:
    """Call attempt() until it returns without an error; the seconds it took (an AssertionError after timeout)."""
    started = time.monotonic()
    while True:
        try:
            attempt()
            return time.monotonic() - started
        except (psycopg.Error, pymysql.MySQLError, OSError) as exc:
            if time.monotonic() - started > timeout:
                raise AssertionError(f"{what}: not served within {timeout:g} s after the server returned: {exc}")
            time.sleep(0.1)


class PostgresSide:
    engine = "postgres"

    def __init__(self):
        self.server = PostgresServer().start()

    def cluster(self) -> dict:
        return {"credentials": []}

    def listener(self) -> dict:
        return {"auth": "trust"}

    def connect(self, proxy):
        return psycopg.connect(host=proxy.host, port=proxy.port, user=SUPERUSER, dbname="postgres", autocommit=True,
                               connect_timeout=5)

    def query(self, conn) -> None:
        assert conn.execute("SELECT 1").fetchone() == (1,)


class MariaDBSide:
    engine = "mysql"

    def __init__(self):
        from multiproxy.lab.mariadb import MariaDBServer
        self.server = MariaDBServer().start()
        self.server.sql(f"CREATE DATABASE {MARIADB_DB};\n"
                        f"CREATE USER '{MARIADB_USER}'@'%' IDENTIFIED BY '{MARIADB_PASSWORD}';\n"
                        f"GRANT ALL ON *.* TO '{MARIADB_USER}'@'%';")

    def cluster(self) -> dict:
        return {"credentials": [{"user": "*", "backend_user": MARIADB_USER, "password": MARIADB_PASSWORD}]}

    def listener(self) -> dict:
        return {"auth": "trust"}

    def connect(self, proxy):
        return pymysql.connect(host=proxy.host, port=proxy.port, user=MARIADB_USER, database=MARIADB_DB,
                               autocommit=True, connect_timeout=5, read_timeout=30)

    def query(self, conn) -> None:
        with conn.cursor() as cur:
            cur.execute("SELECT 1")
            assert cur.fetchall() == ((1,),)


@pytest.fixture(params=["postgres", "mariadb"])
def side(request):
    made = PostgresSide() if request.param == "postgres" else MariaDBSide()
    try:
        yield made
    finally:
        made.server.stop()


def outage_config(side, registry: bool) -> dict:
    server = side.server
    hosts = [f"127.0.0.1:{server.port}"]
    cluster = {"engine": side.engine, "hosts": hosts, "backend": {"tls": "disable", "connect_timeout": 2.0},
               "pool": {"mode": "transaction", "max_size": 5, "min_size": 2, "borrow_timeout": 10.0},
               **side.cluster()}
    if registry:
        hosts.append(f"127.0.0.1:{free_port()}")     # never reachable: a node down from the start
        cluster["health"] = {"probe_user": SUPERUSER if side.engine == "postgres" else MARIADB_USER}
    return {"proxy": {"admin_listen": "", "log_level": "info"},
            "clusters": {"main": cluster},
            "listeners": [{"name": "db", "listen": f"127.0.0.1:{free_port()}", "cluster": "main", **side.listener()}]}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("registry", [False, True], ids=["hosts", "registry"])
def test_a_stopped_server_costs_the_proxy_little_cpu_and_clients_are_served_once_it_is_back(side, registry,
                                                                                            proxy_factory):
    proxy = proxy_factory(outage_config(side, registry))
    idle = None
    deadline = time.monotonic() + 15
    while idle is None:                   # with a registry, logins wait for its first probe of the writer
        try:
            idle = side.connect(proxy)
        except (psycopg.Error, pymysql.MySQLError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    side.query(idle)

    side.server.stop_keeping_data()
    time.sleep(1.5)                       # the pool's connections close, the registry finds the node down
    share = cpu_share(proxy.pid, MEASURE_SECONDS)
    assert share < CPU_BOUND, (f"the proxy used {share:.0%} of a core over {MEASURE_SECONDS:g} s with its server "
                               f"stopped\n{proxy.log_tail(30)}")
    assert proxy.running

    side.server.start_again()
    took = until_served("the idle client", lambda: side.query(idle), BACK_WITHIN)

    def new_client():
        conn = side.connect(proxy)
        try:
            side.query(conn)
        finally:
            conn.close()
    until_served("a new client", new_client, BACK_WITHIN)
    idle.close()
    assert took < BACK_WITHIN
