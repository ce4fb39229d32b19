"""TDS failover drill: two lab servers (one read-only), DNS writer/reader endpoints on loopback, clients through the proxy.

The two lab servers do not replicate. Both are seeded with the same table; "no acknowledged write lost" is
checked per node: every write the proxy acknowledged exists on the node that was the writer when it was
acknowledged (before the flip: the old writer, whose database file survives its process; after: the new one).
"""
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from multiproxy.lab.dns_server import write_zone
from multiproxy.registry import FAST_PROBE_INTERVAL

from .helpers import admin_status, drill_proxy_config, metric, metrics_text, start_dns_server
from .test_failover_pg import shared_free_port, wait_for

pymssql = pytest.importorskip("pymssql")
pytds = pytest.importorskip("pytds")

pytestmark = pytest.mark.tds
OLD_IP, NEW_IP = "127.0.0.2", "127.0.0.3"
TTL = 5
LAB_USER, LAB_PASSWORD, DB = "sa", "Lab-pw-1", "labdb"
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class Node:
    """One TDS lab server process on its own loopback address; its database file outlives the process."""

    def __init__(self, host, port, workdir, read_only=False):
        self.host, self.port, self.workdir = host, port, workdir
        os.makedirs(workdir, exist_ok=True)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "multiproxy.lab.tds_server", "--host", host, "--port", str(port),
             "--user", LAB_USER, "--password", LAB_PASSWORD, "--db-file", os.path.join(workdir, "master.sqlite"),
             "--database", DB, *(["--read-only"] if read_only else [])],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
        line = self.proc.stdout.readline()
        assert "listening" in line, line + self.proc.stdout.read()

    def sql(self, statement):
        with pymssql.connect(server=self.host, port=self.port, user=LAB_USER, password=LAB_PASSWORD, database=DB,
                             autocommit=True, tds_version="7.4") as conn:
            cur = conn.cursor()
            cur.execute(statement)
            return cur.fetchall() if cur.description else None

    def ids(self):
        """The drill table's ids, read from the database file (works whether the server runs or not)."""
        import sqlite3
        path = os.path.join(self.workdir, f"db_{DB}.sqlite")
        with sqlite3.connect(path) as db:
            return {row[0] for row in db.execute("SELECT id FROM drill")}

    def signal(self, sig):
        self.proc.send_signal(sig)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate(timeout=10)


@pytest.fixture
def drill(tmp_path):
    port = shared_free_port(OLD_IP, NEW_IP)
    old = Node(OLD_IP, port, str(tmp_path / "old"))
    new = dns = None
    try:
        new = Node(NEW_IP, port, str(tmp_path / "new"), read_only=True)
        for node in (old, new):          # the same schema on both (no replication between lab servers)
            node.signal(signal.SIGUSR2)
            time.sleep(0.2)
            node.sql("CREATE TABLE drill (id INT PRIMARY KEY, note NVARCHAR(20))")
        new.signal(signal.SIGUSR1)       # the standby is read-only again
        zone = str(tmp_path / "zone.json")
        write_zone(zone, {"writer.tds.lab": {"A": [OLD_IP]}, "reader.tds.lab": {"A": [NEW_IP]}}, ttl=TTL)
        dns, dns_port = start_dns_server(zone)
        yield {"port": port, "old": old, "new": new, "zone": zone, "dns_port": dns_port}
    finally:
        if dns is not None:
            dns.kill()
            dns.wait(10)
        if new is not None:
            new.stop()
        old.stop()


def drill_config(d, probe_interval=0.5):
    return drill_proxy_config("tds", "tds", d["port"], d["dns_port"], probe_interval=probe_interval,
                              credentials=[{"user": "*", "backend_user": LAB_USER, "password": LAB_PASSWORD}])


def connect(address, lib="pymssql"):
    host, port = address
    if lib == "pytds":
        return pytds.connect(host, port=port, user="app", password="x", database=DB, autocommit=True)
    return pymssql.connect(server=host, port=port, user="app", password="x", database=DB, autocommit=True,
                           tds_version="7.4")


def rows(conn, sql):
    cur = conn.cursor()
    cur.execute(sql)
    return cur.fetchall()


def start_proxy(drill, proxy_factory, **kwargs):
    proxy = proxy_factory(drill_config(drill, **kwargs))
    wait_for(lambda: admin_status(proxy)["registry"]["tds"]["writer"] == f"{OLD_IP}:{drill['port']}", 15,
             "the registry to verify the first node as writer", lambda: admin_status(proxy)["registry"])
    return proxy


@pytest.mark.timeout(180)
@pytest.mark.parametrize("how", ["stop", "read_only"])
def test_failover_keeps_idle_clients_and_loses_no_acknowledged_write(drill, proxy_factory, how):
    proxy = start_proxy(drill, proxy_factory)
    w = proxy.address("w")
    idle = [connect(w, "pytds" if i % 2 else "pymssql") for i in range(10)]
    for conn in idle:
        assert rows(conn, "SELECT 1") == [(1,)]
    with connect(proxy.address("r")) as reader:
        assert rows(reader, "SELECT DATABASEPROPERTYEX(DB_NAME(), 'Updateability')") == [("READ_ONLY",)]

    in_flight = connect(w)
    cur = in_flight.cursor()
    cur.execute("BEGIN TRAN")
    # Left open across the failover. A read, not a write: the lab server runs on SQLite, where an open write
    # transaction would block every other writer (the write loop) until it ends.
    cur.execute("SELECT COUNT(*) FROM drill")
    cur.fetchall()

    acknowledged, failures = [], []      # (id, monotonic time of the acknowledgement)
    stop = threading.Event()

    def write_loop():
        conn, next_id = None, 0
        while not stop.is_set():
            try:
                if conn is None:
                    conn = connect(w)
                conn.cursor().execute(f"INSERT INTO drill (id, note) VALUES ({next_id}, 'loop')")
                acknowledged.append((next_id, time.monotonic()))
            except Exception as exc:     # the row may or may not exist; its id is never reused
                failures.append((str(exc), time.monotonic()))
                conn = None
                time.sleep(0.05)
            next_id += 1
            time.sleep(0.01)

    thread = threading.Thread(target=write_loop, daemon=True)
    thread.start()
    wait_for(lambda: len(acknowledged) >= 20, 20, "writes before the failover", lambda: failures[:3])

    flipped = time.monotonic()
    if how == "stop":
        drill["old"].stop()
    else:
        drill["old"].signal(signal.SIGUSR1)
    drill["new"].signal(signal.SIGUSR2)
    write_zone(drill["zone"], {"writer.tds.lab": {"A": [NEW_IP]}, "reader.tds.lab": {"A": [NEW_IP]}}, ttl=TTL)
    if how == "read_only":               # signals are handled asynchronously: wait until the old node says so
        wait_for(lambda: drill["old"].sql("SELECT DATABASEPROPERTYEX(DB_NAME(), 'Updateability')")
                 == [("READ_ONLY",)], 10, "the old writer to turn read-only")
    flip_done = time.monotonic()         # the old writer is dead or read-only from here on
    wait_for(lambda: any(at > flip_done for _, at in acknowledged), 60, "a write on the new writer")
    time.sleep(1.0)
    stop.set()
    thread.join(20)
    on_new = drill["new"].ids()
    # An INSERT already running on the old writer when it was stopped may be acknowledged just after `flipped`:
    # the outage runs to the first acknowledged write that is on the new writer.
    outage = min(at for i, at in acknowledged if at > flipped and i in on_new) - flipped
    print(f"\nTDS write outage through multiproxy ({how}): {outage:.2f} s; {len(failures)} failed writes; "
          f"{len(acknowledged)} acknowledged")

    # The in-flight transaction gets a clear error on its next statement; the connection stays usable.
    with pytest.raises(pymssql.Error) as info:
        cur.execute("INSERT INTO drill (id, note) VALUES (-2, 'in flight')")
        cur.execute("COMMIT")
    text = str(info.value)
    assert "multiproxy" in text and ("rolled back" in text or "writer changed" in text or "failover" in text), text
    assert rows(in_flight, "SELECT @@TRANCOUNT") == [(0,)]
    in_flight.close()

    # Every idle client connection survived and now runs on the new writer.
    for conn in idle:
        assert rows(conn, "SELECT DATABASEPROPERTYEX(DB_NAME(), 'Updateability')") == [("READ_WRITE",)]
        conn.close()

    # No acknowledged write lost: each is on the node that was the writer when it was acknowledged.
    snapshot = admin_status(proxy)["registry"]
    change = next(e for e in snapshot["events"] if e["event"] == "writer"
                  and e.get("new") == f"{NEW_IP}:{drill['port']}")
    on_old = drill["old"].ids()
    missing = [i for i, _ in acknowledged if i not in on_old and i not in on_new]
    assert not missing, f"acknowledged writes lost: {missing[:10]}"
    after = [i for i, at in acknowledged if at > flip_done]
    assert after and all(i in on_new for i in after)
    assert not (on_old & on_new), "a write landed on both nodes"
    assert -2 not in on_old | on_new
    print(f"acknowledged {len(acknowledged)}: {len(on_old)} on the old writer, {len(on_new)} on the new; "
          f"writer event {change}")
    assert snapshot["tds"]["writer"] == f"{NEW_IP}:{drill['port']}"
    assert outage < 30


@pytest.mark.timeout(120)
def test_write_refused_as_read_only_is_retried_on_the_new_writer(drill, proxy_factory):
    proxy = start_proxy(drill, proxy_factory, probe_interval=30.0)     # the registry will not notice by itself
    time.sleep(FAST_PROBE_INTERVAL * 3)   # let the start-up probing (fast while no writer was known) settle
    with connect(proxy.address("w")) as conn:
        conn.cursor().execute("INSERT INTO drill (id, note) VALUES (1, 'before')")
        # The writer turns read-only and the other node writable, behind the registry's back.
        drill["old"].signal(signal.SIGUSR1)
        drill["new"].signal(signal.SIGUSR2)
        time.sleep(0.3)
        started = time.monotonic()
        conn.cursor().execute("INSERT INTO drill (id, note) VALUES (2, 'retried')")    # 3906 on old, retried
        assert time.monotonic() - started < 10
        assert rows(conn, "SELECT DATABASEPROPERTYEX(DB_NAME(), 'Updateability'), COUNT(*) FROM drill "
                          "WHERE id = 2") == [("READ_WRITE", 1)]
    assert drill["new"].ids() == {2}
    assert drill["old"].ids() == {1}
    assert admin_status(proxy)["registry"]["tds"]["writer"] == f"{NEW_IP}:{drill['port']}"
    assert metric(metrics_text(proxy), "multiproxy_read_only_retries_total") == 1
