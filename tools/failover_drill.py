"""Failover drill: the write outage seen through multiproxy and by a client that follows the DNS endpoint itself.

One run on this machine: a PostgreSQL primary and streaming standby on their own loopback addresses, a
DNS server answering the writer and reader endpoint names with a TTL, multiproxy following those
endpoints, and two writers running side by side: one through the proxy, one connecting directly to
the writer endpoint with a resolver that caches answers for the TTL (as drivers and JVMs do). The
primary is stopped, the standby promoted and the writer record repointed; each writer's outage is
the time from the primary's stop to its first successful write afterwards. Idle client connections
held through the proxy are counted before and after.

    python3 tools/failover_drill.py [--engine postgres|tds|mysql] [--ttl 5] [--floor 1] [--rounds 1] [--markdown FILE]
    python3 tools/failover_drill.py --chaos [--engine postgres|mysql|tds|all] [--failovers 3] [--markdown FILE]

With --chaos it runs the chaos drill of tests/integration/chaoskit.py instead (issue 11): per engine a lab
(multiproxy.lab) with reader_fallback_to_writer = false, several lab failovers in a row while writers, readers
and hostile sessions (read-only session then write, writes to the reader listener, transactions dropped
mid-way) run through the proxy; it prints a table per engine and every invariant broken, and exits 1 if any is.

With --engine tds the nodes are two TDS lab servers (the second started read-only); the failover stops the
writer's process and makes the other writable (SIGUSR2). Lab servers do not replicate: both hold the same
empty table, and each acknowledged write is on the node that was the writer when it was acknowledged.

With --engine mysql the nodes are a MariaDB primary and a GTID replica (semi-sync, read_only=ON); the
failover stops the primary (SIGTERM) and promotes the replica (applies its relay log, STOP SLAVE,
RESET SLAVE ALL, read_only=OFF). The writers are PyMySQL clients in autocommit.
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import pg8000.native  # noqa: E402

from multiproxy.dns import DnsClient, DnsLookupFailed  # noqa: E402
from multiproxy.lab.dns_server import write_zone  # noqa: E402
from multiproxy.lab.postgres import PostgresServer  # noqa: E402
from multiproxy.lab.processes import free_port  # noqa: E402

PRIMARY_IP, STANDBY_IP = "127.0.0.2", "127.0.0.3"


def shared_port() -> int:
    for _ in range(50):
        port = free_port()
        try:
            for host in (PRIMARY_IP, STANDBY_IP):
                with socket.socket() as s:
                    s.bind((host, port))
            return port
        except OSError:
            continue
    raise RuntimeError("no port free on both drill addresses")


def udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class CachingResolver:
    """Resolves the endpoint like a client library: one lookup, then the cached answer until its TTL expires."""

    def __init__(self, client: DnsClient, name: str):
        self.client, self.name = client, name
        self.address, self.expires = None, 0.0

    def address_now(self) -> str:
        if self.address is None or time.monotonic() >= self.expires:
            try:
                answer = self.client.resolve(self.name)
                self.address, self.expires = answer.addresses[0], time.monotonic() + answer.ttl
            except DnsLookupFailed:
                pass
        return self.address


class WriteLoop(threading.Thread):
    """Inserts rows one by one; records when each commit succeeded."""

    def __init__(self, name: str, connect):
        super().__init__(daemon=True)
        self.label, self.connect = name, connect
        self.successes: list[float] = []
        self.failures = 0
        self.stop_event = threading.Event()

    def run(self):
        conn = None
        n = 0
        while not self.stop_event.is_set():
            try:
                if conn is None:
                    conn = self.connect()
                conn.run("INSERT INTO drill (writer, n) VALUES (:w, :n)", w=self.label, n=n)
                self.successes.append(time.monotonic())
            except Exception:
                self.failures += 1
                try:
                    if conn is not None:
                        conn.close()
                except Exception:
                    pass
                conn = None
                time.sleep(0.05)
            n += 1
            time.sleep(0.02)

    def outage_after(self, t0: float) -> float | None:
        after = [t for t in self.successes if t > t0]
        return (after[0] - t0) if after else None


def measure(args, workdir: str, *, engine: str, cluster: str, port: int, connect, fail_over,
            cluster_toml: str = "", probe_user: str = "app", ready_sql: str = "SELECT 1") -> dict:
    """The engine-neutral part of a round: DNS server and zone, multiproxy following the endpoints, idle
    clients, a writer through the proxy and one following DNS itself; `fail_over()` flips the nodes, then the
    records are repointed and each writer's outage measured. `connect(host, port, timeout, through_proxy)`
    returns a connection with run(sql, **params) and close()."""
    names = {"writer": f"writer.{cluster}.lab", "reader": f"reader.{cluster}.lab"}
    zone = os.path.join(workdir, "zone.json")
    write_zone(zone, {names["writer"]: {"A": [PRIMARY_IP]}, names["reader"]: {"A": [STANDBY_IP]}}, ttl=args.ttl)
    dns = proxy = None
    loops = []
    try:
        dns_port = udp_port()
        dns = subprocess.Popen([sys.executable, "-m", "multiproxy.lab.dns_server", "--port", str(dns_port),
                                "--zone", zone], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        dns.stdout.readline()
        proxy_port, admin_port = free_port(), free_port()
        config = os.path.join(workdir, "proxy.toml")
        with open(config, "w") as f:
            f.write(f"""
[proxy]
admin_listen = "127.0.0.1:{admin_port}"
log_level = "warning"
[clusters.{cluster}]
engine = "{engine}"
hosts = []
[clusters.{cluster}.endpoints]
writer = "{names['writer']}:{port}"
reader = "{names['reader']}:{port}"
[clusters.{cluster}.dns]
nameserver = "127.0.0.1:{dns_port}"
ttl_floor = {args.floor}
[clusters.{cluster}.health]
probe_interval = {args.probe_interval}
failure_threshold = 1
probe_user = "{probe_user}"
[clusters.{cluster}.backend]
tls = "disable"
connect_timeout = 2.0
[clusters.{cluster}.pool]
max_size = 10
borrow_timeout = 60.0
{cluster_toml}
[[listeners]]
name = "w"
listen = "127.0.0.1:{proxy_port}"
cluster = "{cluster}"
auth = "trust"
""")
        proxy = subprocess.Popen([sys.executable, "-m", "multiproxy", "run", "-c", config], cwd=REPO,
                                 stdout=subprocess.DEVNULL, stderr=open(os.path.join(workdir, "proxy.log"), "w"))

        def through_proxy():
            return connect("127.0.0.1", proxy_port, 10, True)

        deadline = time.monotonic() + 20
        while True:
            try:
                probe = through_proxy()
                probe.run(ready_sql)
                probe.close()
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"multiproxy did not come up; see {workdir}/proxy.log")
                time.sleep(0.2)
        idle = [through_proxy() for _ in range(args.idle)]
        resolver = CachingResolver(DnsClient("127.0.0.1", dns_port), names["writer"])
        through = WriteLoop("proxy", through_proxy)
        direct = WriteLoop("direct", lambda: connect(resolver.address_now(), port, 2, False))
        loops = [through, direct]
        for loop in loops:
            loop.start()
        time.sleep(2.0)

        t0 = time.monotonic()
        fail_over()
        write_zone(zone, {names["writer"]: {"A": [STANDBY_IP]}, names["reader"]: {"A": [STANDBY_IP]}}, ttl=args.ttl)
        deadline = time.monotonic() + args.ttl * 4 + 30
        while time.monotonic() < deadline and not all(loop.outage_after(t0) is not None for loop in loops):
            time.sleep(0.1)
        for loop in loops:
            loop.stop_event.set()
            loop.join(15)
        survived = 0
        for conn in idle:
            try:
                conn.run("SELECT 1")
                survived += 1
            except Exception:
                pass
            finally:
                try:
                    conn.close()
                except Exception:
                    pass
        return {"proxy": through.outage_after(t0), "direct": direct.outage_after(t0),
                "idle_kept": survived, "idle_total": len(idle)}
    finally:
        for loop in loops:
            loop.stop_event.set()
        if proxy is not None:
            proxy.send_signal(signal.SIGTERM)
            try:
                proxy.wait(15)
            except subprocess.TimeoutExpired:
                proxy.kill()
        if dns is not None:
            dns.kill()
            dns.wait(5)


class PgConnection:
    """pg8000 in autocommit (its native interface is what the write loop uses)."""

    def __init__(self, host: str, port: int, timeout: int, through_proxy: bool):
        self.conn = pg8000.native.Connection("postgres", host=host, port=port, timeout=timeout)

    def run(self, sql: str, **params):
        self.conn.run(sql, **params)

    def close(self):
        self.conn.close()


class TdsConnection:
    """pymssql in autocommit behind the small part of pg8000.native's interface the write loop uses."""

    def __init__(self, host: str, port: int, timeout: int, through_proxy: bool):
        import pymssql
        user, password = ("app", "x") if through_proxy else (TDS_USER, TDS_PASSWORD)
        self.conn = pymssql.connect(server=host, port=port, user=user, password=password, database="labdb",
                                    autocommit=True, tds_version="7.4", login_timeout=timeout, timeout=10)

    def run(self, sql: str, **params):
        for name in params:
            sql = sql.replace(f":{name}", f"%({name})s")
        self.conn.cursor().execute(sql, params)

    def close(self):
        self.conn.close()


TDS_USER, TDS_PASSWORD = "sa", "Drill-pw-1"


def start_tds_node(host: str, port: int, workdir: str, read_only: bool) -> subprocess.Popen:
    os.makedirs(workdir, exist_ok=True)
    node = subprocess.Popen([sys.executable, "-m", "multiproxy.lab.tds_server", "--host", host, "--port", str(port),
                             "--user", TDS_USER, "--password", TDS_PASSWORD, "--database", "labdb",
                             "--db-file", os.path.join(workdir, "master.sqlite")] + (["--read-only"] if read_only else []),
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    line = node.stdout.readline()
    if "listening" not in line:
        raise RuntimeError(f"TDS lab server on {host}:{port} did not start: {line}")
    return node


def run_round_tds(args, workdir: str) -> dict:
    port = shared_port()
    nodes = []
    try:
        for host, name in ((PRIMARY_IP, "old"), (STANDBY_IP, "new")):
            nodes.append(start_tds_node(host, port, os.path.join(workdir, name), read_only=False))
            TdsConnection(host, port, 5, False).run(
                "CREATE TABLE drill (id INT IDENTITY PRIMARY KEY, writer NVARCHAR(10), n INT)")
        nodes[1].send_signal(signal.SIGUSR1)          # the second node is the read-only standby

        def fail_over():
            nodes[0].kill()
            nodes[0].wait(10)
            nodes[1].send_signal(signal.SIGUSR2)

        credentials = (f'[[clusters.tds.credentials]]\nuser = "*"\nbackend_user = "{TDS_USER}"\n'
                       f'password = "{TDS_PASSWORD}"')
        return measure(args, workdir, engine="tds", cluster="tds", port=port, connect=TdsConnection,
                       fail_over=fail_over, cluster_toml=credentials)
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
            node.communicate(timeout=10)


MY_USER, MY_PASSWORD, MY_DB = "mp_app", "app-pw", "drilldb"


class MySQLConnection:
    """PyMySQL in autocommit behind the small part of pg8000.native's interface the write loop uses."""

    def __init__(self, host: str, port: int, timeout: int, through_proxy: bool):
        import pymysql
        self.conn = pymysql.connect(host=host, port=port, user="app" if through_proxy else MY_USER,
                                    password="" if through_proxy else MY_PASSWORD, database=MY_DB, autocommit=True,
                                    connect_timeout=timeout, read_timeout=10, write_timeout=10, ssl_disabled=True)

    def run(self, sql: str, **params):
        for name in params:
            sql = sql.replace(f":{name}", f"%({name})s")
        with self.conn.cursor() as cur:
            cur.execute(sql, params)

    def close(self):
        self.conn.close()


def run_round_mysql(args, workdir: str) -> dict:
    from multiproxy.lab.mariadb import MariaDBServer
    port = shared_port()
    primary = replica = None
    try:
        primary = MariaDBServer(host=PRIMARY_IP, port=port, server_id=1, basedir=os.path.join(workdir, "old")).start()
        replica = primary.make_replica(host=STANDBY_IP, port=port, semi_sync=True)
        primary.sql(f"CREATE DATABASE {MY_DB}; CREATE TABLE {MY_DB}.drill "
                    "(id INT AUTO_INCREMENT PRIMARY KEY, writer VARCHAR(10), n INT);"
                    f"CREATE USER '{MY_USER}'@'%' IDENTIFIED BY '{MY_PASSWORD}';"
                    f"GRANT SELECT, INSERT, UPDATE, DELETE ON {MY_DB}.* TO '{MY_USER}'@'%';"
                    f"GRANT SLAVE MONITOR ON *.* TO '{MY_USER}'@'%';")
        replica.wait_caught_up(primary)

        def fail_over():
            primary.stop()
            replica.promote()

        credentials = (f'[[clusters.my.credentials]]\nuser = "*"\nbackend_user = "{MY_USER}"\n'
                       f'password = "{MY_PASSWORD}"')
        return measure(args, workdir, engine="mysql", cluster="my", port=port, connect=MySQLConnection,
                       fail_over=fail_over, cluster_toml=credentials,
                       ready_sql="INSERT INTO drill (writer, n) VALUES ('probe', 0)")
    finally:
        for server in (replica, primary):
            if server is not None:
                server.stop()


def run_round(args, workdir: str) -> dict:
    port = shared_port()
    primary = PostgresServer(host=PRIMARY_IP, port=port, settings={"synchronous_commit": "on"}).start()
    standby = None
    try:
        primary.psql("CREATE TABLE drill (id bigserial PRIMARY KEY, writer text, n int, at timestamptz DEFAULT now())")
        standby = primary.make_standby(host=STANDBY_IP, port=port)

        def fail_over():
            primary.stop()
            standby.promote()

        return measure(args, workdir, engine="postgres", cluster="pg", port=port, connect=PgConnection,
                       fail_over=fail_over, probe_user="postgres")
    finally:
        if standby is not None:
            standby.stop()
        primary.stop()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", choices=["postgres", "tds", "mysql", "all"], default=None,
                        help="default postgres; all: only with --chaos")
    parser.add_argument("--ttl", type=int, default=5, help="TTL of the endpoint records (s)")
    parser.add_argument("--floor", type=float, default=1.0, help="multiproxy's dns.ttl_floor (s)")
    parser.add_argument("--probe-interval", type=float, default=1.0, help="multiproxy's health.probe_interval (s)")
    parser.add_argument("--idle", type=int, default=20, help="idle client connections held through the proxy")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--markdown", help="also write the table to this file")
    parser.add_argument("--chaos", action="store_true",
                        help="the chaos drill: several lab failovers per engine under hostile load, invariants checked")
    parser.add_argument("--failovers", type=int, default=3, help="with --chaos: failovers per engine")
    parser.add_argument("--verbose", action="store_true", help="with --chaos: print the lab's own output")
    args = parser.parse_args(argv)
    if args.chaos:
        return chaos_main(args)
    if args.engine in (None, "all"):
        if args.engine == "all":
            parser.error("--engine all needs --chaos")
        args.engine = "postgres"
    rows = []
    for i in range(args.rounds):
        with tempfile.TemporaryDirectory(prefix="mp-drill-") as workdir:
            os.chmod(workdir, 0o755)
            result = {"tds": run_round_tds, "mysql": run_round_mysql}.get(args.engine, run_round)(args, workdir)
        rows.append(result)
        print(f"round {i + 1}: {result}", file=sys.stderr)
    lines = ["| round | outage through multiproxy (s) | outage direct, DNS TTL %d s (s) | ratio | idle connections kept |" % args.ttl,
             "|---:|---:|---:|---:|---:|"]
    for i, r in enumerate(rows, 1):
        ratio = (r["proxy"] / r["direct"]) if r["proxy"] is not None and r["direct"] else None
        lines.append(f"| {i} | {_fmt(r['proxy'])} | {_fmt(r['direct'])} | {_fmt(ratio)} | {r['idle_kept']}/{r['idle_total']} |")
    table = "\n".join(lines)
    print(table)
    nodes = {"tds": "two TDS lab servers (writer killed, read-only one made writable)",
             "mysql": "MariaDB primary + GTID replica (semi-sync; primary stopped, replica promoted)"}.get(
        args.engine, "PostgreSQL primary+standby")
    print(f"\n{nodes}, TTL {args.ttl} s, multiproxy ttl_floor {args.floor} s, "
          f"probe_interval {args.probe_interval} s")
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table + "\n")
    return 0


def chaos_main(args) -> int:
    """--chaos: run tests/integration/chaoskit.py's drill per engine; the table, the details, 1 on any violation."""
    from tests.integration import chaoskit  # noqa: E402 (the same code the integration test runs)

    engines = ["postgres", "mysql", "tds"] if args.engine in (None, "all") else [args.engine]
    results = []
    for engine in engines:
        print(f"chaos drill: {engine}, {args.failovers} failover(s) ...", file=sys.stderr, flush=True)
        echo = (lambda text: sys.stderr.write(text)) if args.verbose else None
        result = chaoskit.run_drill(engine, args.failovers, echo=echo)
        results.append(result)
        print(chaoskit.format_details(result), file=sys.stderr, flush=True)
    table = chaoskit.format_table(results)
    print(table)
    broken = {r.engine: r.violations() for r in results if r.violations()}
    for engine, violations in broken.items():
        for violation in violations:
            print(f"{engine}: VIOLATION: {violation}")
    if not broken:
        print("all invariants hold for " + ", ".join(engines))
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table + "\n")
    return 1 if broken else 0


def _fmt(value) -> str:
    return "—" if value is None else f"{value:.2f}"


if __name__ == "__main__":
    sys.exit(main())
