"""MariaDB failover drill: a primary and a GTID replica (semi-sync) on 127.0.0.2/.3, DNS endpoints on loopback, clients
through the proxy; and a write refused as read-only (1290) retried on the new writer."""
import threading
import time
import urllib.request

import pymysql
import pytest

from multiproxy.lab.dns_server import write_zone
from multiproxy.lab.mariadb import MariaDBServer
from multiproxy.registry import FAST_PROBE_INTERVAL

from .helpers import admin_status, drill_proxy_config, start_dns_server
from .test_failover_pg import shared_free_port, wait_for

PRIMARY_IP, REPLICA_IP = "127.0.0.2", "127.0.0.3"
TTL = 5
DB = "drilldb"
USER, PASSWORD = "mp_app", "app-pw"       # no SUPER / READ_ONLY ADMIN: read_only applies to it


@pytest.fixture
def drill(tmp_path):
    port = shared_free_port(PRIMARY_IP, REPLICA_IP)
    primary = MariaDBServer(host=PRIMARY_IP, port=port, server_id=1).start()
    replica = dns = None
    try:
        # Semi-sync replication: a commit the proxy reports is already in the replica's relay log, and
        # promote() applies the relay log before it makes the replica writable.
        replica = primary.make_replica(host=REPLICA_IP, port=port, semi_sync=True)
        primary.sql(f"CREATE DATABASE {DB}; CREATE TABLE {DB}.drill (id int PRIMARY KEY, note varchar(20));"
                    f"CREATE USER '{USER}'@'%' IDENTIFIED BY '{PASSWORD}';"
                    f"GRANT SELECT, INSERT, UPDATE, DELETE ON {DB}.* TO '{USER}'@'%';"
                    f"GRANT SLAVE MONITOR ON *.* TO '{USER}'@'%';")
        replica.wait_caught_up(primary)
        zone = str(tmp_path / "zone.json")
        write_zone(zone, {"writer.my.lab": {"A": [PRIMARY_IP]}, "reader.my.lab": {"A": [REPLICA_IP]}}, ttl=TTL)
        dns, dns_port = start_dns_server(zone)
        yield {"port": port, "primary": primary, "replica": replica, "zone": zone, "dns_port": dns_port}
    finally:
        if dns is not None:
            dns.kill()
            dns.wait(10)
        if replica is not None:
            replica.stop()
        primary.stop()


def drill_config(d, probe_interval=0.5):
    return drill_proxy_config("my", "mysql", d["port"], d["dns_port"], probe_interval=probe_interval,
                              credentials=[{"user": "*", "backend_user": USER, "password": PASSWORD}])


def connect(address, autocommit=True):
    host, port = address
    return pymysql.connect(host=host, port=port, user="app", password="", database=DB, autocommit=autocommit,
                           connect_timeout=10, read_timeout=30, ssl_disabled=True)


def rows(conn, sql):
    with conn.cursor() as cur:
        cur.execute(sql)
        return list(cur.fetchall())


def writer_is(proxy, ip, port):
    return admin_status(proxy)["registry"]["my"]["writer"] == f"{ip}:{port}"


@pytest.mark.timeout(240)
def test_failover_keeps_idle_clients_and_loses_no_committed_write(drill, proxy_factory):
    proxy = proxy_factory(drill_config(drill))
    wait_for(lambda: writer_is(proxy, PRIMARY_IP, drill["port"]), 15, "the registry to verify the primary as writer",
             lambda: admin_status(proxy)["registry"])
    w = proxy.address("w")
    idle = [connect(w) for _ in range(10)]
    for conn in idle:
        assert rows(conn, "SELECT @@read_only") == [(0,)]
    with connect(proxy.address("r")) as reader:
        assert rows(reader, "SELECT @@read_only") == [(1,)]

    in_flight = connect(w, autocommit=False)
    rows(in_flight, "INSERT INTO drill (id, note) VALUES (-1, 'in flight')")   # left open across the failover

    acknowledged, failures = [], []
    stop = threading.Event()

    def write_loop():
        conn, next_id = None, 0
        while not stop.is_set():
            try:
                if conn is None:
                    conn = connect(w)
                rows(conn, f"INSERT INTO drill (id, note) VALUES ({next_id}, 'loop')")
                acknowledged.append((next_id, time.monotonic()))
            except pymysql.err.MySQLError as exc:   # the row may or may not exist; its id is never reused
                failures.append((str(exc), time.monotonic()))
                if isinstance(exc, pymysql.err.InterfaceError):
                    conn = None
                time.sleep(0.05)
            next_id += 1
            time.sleep(0.01)

    thread = threading.Thread(target=write_loop, daemon=True)
    thread.start()
    wait_for(lambda: len(acknowledged) >= 20, 20, "writes before the failover", lambda: failures[-3:])

    started = time.monotonic()
    drill["primary"].stop()
    drill["replica"].promote()
    write_zone(drill["zone"], {"writer.my.lab": {"A": [REPLICA_IP]}, "reader.my.lab": {"A": [REPLICA_IP]}}, ttl=TTL)
    wait_for(lambda: any(at > started for _, at in acknowledged), 60, "a write on the new writer",
             lambda: failures[-3:])
    outage = min(at for _, at in acknowledged if at > started) - started
    time.sleep(1.0)
    stop.set()
    thread.join(20)
    print(f"\nMariaDB write outage through multiproxy: {outage:.2f} s; {len(failures)} failed writes during the drill")

    # The in-flight transaction gets a clear error; its connection stays usable.
    with pytest.raises(pymysql.err.OperationalError) as info:
        rows(in_flight, "INSERT INTO drill (id, note) VALUES (-2, 'in flight')")
        in_flight.commit()
    code, message = info.value.args
    assert code == 2013 and "rolled back" in message, info.value
    assert rows(in_flight, "SELECT 1") == [(1,)]
    in_flight.close()

    # Every idle client connection survived and now reaches the new writer.
    for conn in idle:
        assert rows(conn, "SELECT @@read_only") == [(0,)]
        conn.close()

    # No acknowledged write was lost (semi-sync: each was in the replica's relay log before it was acknowledged).
    ids = {int(x) for x in drill["replica"].sql(f"SELECT id FROM {DB}.drill").split()}
    missing = [i for i, _ in acknowledged if i not in ids]
    assert not missing, f"acknowledged writes lost: {missing[:10]}"
    assert -1 not in ids and -2 not in ids
    snapshot = admin_status(proxy)["registry"]
    assert snapshot["my"]["writer"] == f"{REPLICA_IP}:{drill['port']}"
    assert [e for e in snapshot["events"] if e["event"] == "writer" and e.get("new") == f"{REPLICA_IP}:{drill['port']}"]
    assert outage < 30


@pytest.mark.timeout(150)
def test_write_refused_as_read_only_is_retried_on_the_new_writer(drill, proxy_factory):
    proxy = proxy_factory(drill_config(drill, probe_interval=30.0))    # the registry will not notice by itself
    wait_for(lambda: writer_is(proxy, PRIMARY_IP, drill["port"]), 15, "the registry to verify the primary as writer",
             lambda: admin_status(proxy)["registry"])
    time.sleep(FAST_PROBE_INTERVAL * 3)   # let the start-up probing (fast while no writer was known) settle
    conn = connect(proxy.address("w"))
    rows(conn, "INSERT INTO drill (id, note) VALUES (1, 'before')")
    drill["replica"].wait_caught_up(drill["primary"])
    # The old primary turns read-only and the replica takes over, behind the registry's back.
    drill["primary"].sql("SET GLOBAL rpl_semi_sync_master_enabled = OFF; SET GLOBAL read_only = ON;")
    drill["replica"].promote()
    started = time.monotonic()
    rows(conn, "INSERT INTO drill (id, note) VALUES (2, 'retried')")     # refused with 1290, retried
    assert time.monotonic() - started < 10
    assert rows(conn, "SELECT @@read_only, COUNT(*) FROM drill WHERE id = 2") == [(0, 1)]
    conn.close()
    assert drill["replica"].sql(f"SELECT COUNT(*) FROM {DB}.drill WHERE id = 2") == "1"
    assert drill["primary"].sql(f"SELECT COUNT(*) FROM {DB}.drill WHERE id = 2") == "0"
    assert writer_is(proxy, REPLICA_IP, drill["port"])
    host, admin_port = proxy.admin_address
    metrics = urllib.request.urlopen(f"http://{host}:{admin_port}/metrics", timeout=5).read().decode()
    assert "multiproxy_read_only_retries_total 1.0" in metrics
