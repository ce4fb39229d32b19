"""PostgreSQL failover drill: primary and streaming standby, a DNS writer endpoint on loopback, clients through the proxy."""
import socket
import threading
import time
import urllib.request

import psycopg
import pytest

from multiproxy.lab.dns_server import write_zone
from multiproxy.lab.postgres import PostgresServer
from multiproxy.registry import FAST_PROBE_INTERVAL

from .helpers import admin_status, drill_proxy_config, start_dns_server
from .proxy import free_port

PRIMARY_IP, STANDBY_IP = "127.0.0.2", "127.0.0.3"
TTL = 5


def shared_free_port(*hosts) -> int:
    """A TCP port free on every one of `hosts` (each node of the drill listens on its own loopback address)."""
    for _ in range(50):
        port = free_port()
        ok = True
        for host in hosts:
            with socket.socket() as s:
                try:
                    s.bind((host, port))
                except OSError:
                    ok = False
                    break
        if ok:
            return port
    raise RuntimeError("no port free on all drill addresses")


@pytest.fixture
def drill(tmp_path):
    port = shared_free_port(PRIMARY_IP, STANDBY_IP)
    primary = PostgresServer(host=PRIMARY_IP, port=port, settings={"synchronous_commit": "on"}).start()
    standby = None
    dns = None
    try:
        primary.psql("CREATE TABLE drill (id int PRIMARY KEY, at timestamptz DEFAULT now())")
        standby = primary.make_standby(host=STANDBY_IP, port=port)
        # Synchronous replication from now on: a write the proxy reports committed is on the standby too.
        primary.psql("ALTER SYSTEM SET synchronous_standby_names = '*'")
        primary.psql("SELECT pg_reload_conf()")
        zone = str(tmp_path / "zone.json")
        write_zone(zone, {"writer.pg.lab": {"A": [PRIMARY_IP]}, "reader.pg.lab": {"A": [STANDBY_IP]}}, ttl=TTL)
        dns, dns_port = start_dns_server(zone)
        yield {"port": port, "primary": primary, "standby": standby, "zone": zone, "dns_port": dns_port}
    finally:
        if dns is not None:
            dns.kill()
            dns.wait(10)
        if standby is not None:
            standby.stop()
        primary.stop()


def drill_config(d):
    return drill_proxy_config("pg", "postgres", d["port"], d["dns_port"], probe_user="postgres")


def wait_for(predicate, timeout, what, explain=lambda: ""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}: {explain()}")


@pytest.mark.timeout(180)
def test_failover_keeps_idle_clients_and_loses_no_committed_write(drill, proxy_factory):
    proxy = proxy_factory(drill_config(drill))
    wait_for(lambda: admin_status(proxy)["registry"]["pg"]["writer"] == f"{PRIMARY_IP}:{drill['port']}", 15,
             "the registry to verify the primary as writer", lambda: admin_status(proxy)["registry"])
    host, port = proxy.address("w")
    conninfo = dict(host=host, port=port, user="postgres", dbname="postgres", connect_timeout=10)

    idle = [psycopg.connect(**conninfo, autocommit=True) for _ in range(10)]
    for conn in idle:
        assert conn.execute("SELECT 1").fetchone() == (1,)

    reader_host, reader_port = proxy.address("r")
    with psycopg.connect(host=reader_host, port=reader_port, user="postgres", dbname="postgres",
                         autocommit=True) as reader:
        assert reader.execute("SELECT pg_is_in_recovery()").fetchone() == (True,)

    in_flight = psycopg.connect(**conninfo)
    in_flight.execute("INSERT INTO drill (id) VALUES (-1)")      # a transaction left open across the failover

    committed, errors = [], []
    stop = threading.Event()

    def writer():
        with psycopg.connect(**conninfo, autocommit=True) as conn:
            next_id = 0
            while not stop.is_set():
                try:
                    conn.execute("INSERT INTO drill (id) VALUES (%s)", (next_id,))
                    committed.append((next_id, time.monotonic()))
                    next_id += 1
                except psycopg.Error as exc:
                    errors.append((str(exc), time.monotonic()))
                    next_id += 1       # the row may or may not exist; never reuse its id
                    time.sleep(0.05)
                time.sleep(0.01)

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    wait_for(lambda: len(committed) >= 20, 20, "writes before the failover")

    failover_started = time.monotonic()
    drill["primary"].stop()
    drill["standby"].promote()
    write_zone(drill["zone"], {"writer.pg.lab": {"A": [STANDBY_IP]}, "reader.pg.lab": {"A": [STANDBY_IP]}}, ttl=TTL)
    wait_for(lambda: any(at > failover_started for _, at in committed), 60, "a write on the new writer")
    first_after = min(at for _, at in committed if at > failover_started)
    outage = first_after - failover_started
    time.sleep(1.0)
    stop.set()
    thread.join(20)
    print(f"\nwrite outage through multiproxy: {outage:.2f} s; {len(errors)} failed writes during the drill")

    # The in-flight transaction was cancelled with a clear error; the connection itself is still usable.
    with pytest.raises(psycopg.Error) as info:
        in_flight.execute("INSERT INTO drill (id) VALUES (-2)")
        in_flight.commit()
    assert "connection" in str(info.value).lower()
    in_flight.rollback()
    assert in_flight.execute("SELECT 1").fetchone() == (1,)
    in_flight.close()

    # Every idle client connection survived and now writes to the new writer.
    for conn in idle:
        assert conn.execute("SELECT pg_is_in_recovery()").fetchone() == (False,)
        conn.close()

    # No committed write was lost.
    ids = {int(x) for x in drill["standby"].psql("SELECT id FROM drill").split()}
    missing = [i for i, _ in committed if i not in ids]
    assert not missing, f"committed writes lost: {missing[:10]}"
    assert -1 not in ids and -2 not in ids
    snapshot = admin_status(proxy)["registry"]
    assert snapshot["pg"]["writer"] == f"{STANDBY_IP}:{drill['port']}"
    changes = [e for e in snapshot["events"] if e["event"] == "writer" and e.get("new") == f"{STANDBY_IP}:{drill['port']}"]
    assert changes, snapshot["events"]
    assert outage < 30


@pytest.mark.timeout(120)
def test_write_refused_as_read_only_is_retried_on_the_new_writer(drill, proxy_factory):
    config = drill_config(drill)
    config["clusters"]["pg"]["health"]["probe_interval"] = 30.0     # the registry will not notice by itself
    proxy = proxy_factory(config)
    wait_for(lambda: admin_status(proxy)["registry"]["pg"]["writer"] == f"{PRIMARY_IP}:{drill['port']}", 15,
             "the registry to verify the primary as writer", lambda: admin_status(proxy)["registry"])
    time.sleep(FAST_PROBE_INTERVAL * 3)   # let the start-up probing (fast while no writer was known) settle
    host, port = proxy.address("w")
    with psycopg.connect(host=host, port=port, user="postgres", dbname="postgres", autocommit=True) as conn:
        conn.execute("INSERT INTO drill (id) VALUES (1)")
        # The old primary turns read-only and the standby takes over, behind the registry's back.
        drill["primary"].psql("ALTER SYSTEM SET default_transaction_read_only = on")
        drill["primary"].psql("SELECT pg_reload_conf()")
        drill["primary"].psql("ALTER SYSTEM SET synchronous_standby_names = ''")
        drill["primary"].psql("SELECT pg_reload_conf()")
        drill["standby"].promote()
        started = time.monotonic()
        conn.execute("INSERT INTO drill (id) VALUES (2)")            # refused by the old primary, retried
        assert time.monotonic() - started < 10
        assert conn.execute("SELECT pg_is_in_recovery(), count(*) FROM drill WHERE id = 2").fetchone() == (False, 1)
    assert drill["standby"].psql("SELECT count(*) FROM drill WHERE id = 2") == "1"
    assert drill["primary"].psql("SELECT count(*) FROM drill WHERE id = 2") == "0"
    assert admin_status(proxy)["registry"]["pg"]["writer"] == f"{STANDBY_IP}:{drill['port']}"
    host, admin_port = proxy.admin_address
    metrics = urllib.request.urlopen(f"http://{host}:{admin_port}/metrics", timeout=5).read().decode()
    assert "multiproxy_read_only_retries_total 1.0" in metrics
