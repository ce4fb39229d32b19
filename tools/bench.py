"""Benchmark multiproxy beside direct and its neighbours (a bare relay, PgBouncer) in one run; print throughput ratios.

PostgreSQL (the default): pgbench against PostgreSQL directly, multiproxy, PgBouncer, tools/relay.py and
tools/floor_pooler.py. `--engine mysql`: sysbench oltp_point_select, text protocol and server-side prepared
statements, directly, through multiproxy and through tools/relay.py. `--engine tds`: pymssql point selects and
tedious prepared statements (tools/node/tds_prepared_bench.js) against the TDS lab server directly and through
multiproxy. `--idle N`: proxy memory (RSS growth) per idle client with N idle clients on one worker, for each
engine, and PgBouncer's beside it for PostgreSQL. docs/performance.md says how to run each and what the figures mean.
"""
import argparse
import importlib.util
import json
import os
import platform
import pwd
import re
import shutil
import signal
import statistics
import socket
import subprocess
import sys
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)  # run as a script from a checkout: import this checkout's multiproxy

from multiproxy.lab.postgres import PostgresNotInstalled, PostgresServer  # noqa: E402

ALL_TARGETS = ("direct", "multiproxy", "multiproxy-c", "pgbouncer", "relay", "floor", "floor-c", "floor-c-thread")
# multiproxy-c (multiproxy with [proxy] relay = "compiled"), floor-c and floor-c-thread (the floor pooler on the
# compiled relay core, a spike) run only when asked for.
DEFAULT_TARGETS = ("direct", "multiproxy", "pgbouncer", "relay", "floor")
LOADS = {
    "steady": ["-S", "-c", "16", "-j", "2"],
    "connect": ["-S", "-C", "-c", "16", "-j", "2"],
    "latency": ["-S", "-c", "1", "-j", "1"],
    "transactions": ["-c", "16", "-j", "2"],    # with LOAD_SCRIPTS: BEGIN, two point selects, END
    "isolated": ["-c", "16", "-j", "2"],        # the same with BEGIN ISOLATION LEVEL REPEATABLE READ
    "tpcb": ["-b", "tpcb-like", "-c", "16", "-j", "2"],   # pgbench's default: BEGIN, 3 UPDATE, SELECT, INSERT, END
    "updates": ["-c", "16", "-j", "2"],         # with LOAD_SCRIPTS: an UPDATE ... SET in autocommit
    "storm": None,      # tools/pg_storm.py: --storm-clients connecting at once, behind a server of few connections
}
DEFAULT_LOADS = ("steady", "connect")
# The transactions load: what a driver outside autocommit sends (psycopg's default, SQLAlchemy, JDBC)
LOAD_SCRIPTS = {
    "transactions": ("\\set aid random(1, 100000)\nBEGIN;\nSELECT abalance FROM pgbench_accounts WHERE aid = :aid;\n"
                     "SELECT abalance FROM pgbench_accounts WHERE aid = :aid % 100000 + 1;\nEND;\n"),
    # the same with an isolation level, as psycopg and SQLAlchemy send it with one set
    "isolated": ("\\set aid random(1, 100000)\nBEGIN ISOLATION LEVEL REPEATABLE READ;\n"
                 "SELECT abalance FROM pgbench_accounts WHERE aid = :aid;\n"
                 "SELECT abalance FROM pgbench_accounts WHERE aid = :aid % 100000 + 1;\nEND;\n"),
    # one UPDATE statement in autocommit: its SET assigns a column (the relay does not stop it)
    "updates": "\\set aid random(1, 100000)\nUPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid = :aid;\n",
}
STORM_TARGETS = ("multiproxy", "multiproxy-c", "pgbouncer")     # poolers only: the storm server allows fewer clients than come
BENCH_USER = "bench"
BENCH_DB = "bench"
BENCH_PASSWORD = "bench-scram-password"         # --auth scram: the bench role's password, stored as SCRAM
WARMUP_SECONDS = 2
START_TIMEOUT = 20.0
CLK_TCK = os.sysconf("SC_CLK_TCK")

# pgbench 14+ prints one tps line: "(without initial connection time)", or with -C
# "(including reconnection times)"; older versions print "excluding"/"including connections establishing".
TPS_LINE = re.compile(r"^tps = ([0-9.]+) \(([^)]*)\)", re.MULTILINE)
TPS_PREFERRED = ("without initial connection time", "excluding connections establishing")


class TargetFailed(Exception):
    """A target did not come up or a load could not run on it; the message goes into the table."""


class Processes:
    """Every process this tool starts, so that all of them are stopped on any exit path."""

    def __init__(self):
        self._started = []

    def start(self, argv, *, log_path, as_user=None, stop_signal=signal.SIGTERM, env=None, cwd=None):
        log = open(log_path, "ab")
        kwargs = {}
        if as_user is not None:
            entry = pwd.getpwnam(as_user)
            kwargs = {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}
            env = dict(env or os.environ, HOME=entry.pw_dir, USER=as_user, LOGNAME=as_user)
        # A new session keeps Ctrl-C in the terminal away from children; we stop them ourselves in order.
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                env=env, cwd=cwd, start_new_session=True, **kwargs)
        log.close()
        self._started.append((proc, stop_signal))
        return proc

    def stop(self, proc, timeout=15.0):
        for i, (started, stop_signal) in enumerate(self._started):
            if started is proc:
                del self._started[i]
                _stop_group(proc, stop_signal, timeout)
                return

    def stop_all(self):
        while self._started:
            proc, stop_signal = self._started.pop()
            _stop_group(proc, stop_signal, 15.0)


def _stop_group(proc, stop_signal, timeout):
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, stop_signal)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout)
            return
        except subprocess.TimeoutExpired:
            pass
    # Also reap forked workers left in the group after their parent exited.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        pass


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tree_cpu_ticks(root_pid):
    """utime+stime of root_pid and all its descendants, from /proc/*/stat (children of forking servers count)."""
    parents, ticks = {}, {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # Fields after the parenthesised command name: state ppid ... utime(14) stime(15).
        fields = stat[stat.rindex(b")") + 2:].split()
        parents[int(name)] = int(fields[1])
        ticks[int(name)] = int(fields[11]) + int(fields[12])
    total, stack, seen = 0, [root_pid], set()
    children = {}
    for pid, ppid in parents.items():
        children.setdefault(ppid, []).append(pid)
    while stack:
        pid = stack.pop()
        if pid in seen:
            continue
        seen.add(pid)
        total += ticks.get(pid, 0)
        stack.extend(children.get(pid, ()))
    return total


def run_quiet(argv, *, as_user=None, timeout=120, check=True):
    kwargs = {}
    if as_user is not None:
        entry = pwd.getpwnam(as_user)
        kwargs = {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": [],
                  "env": dict(os.environ, HOME=entry.pw_dir, USER=as_user, LOGNAME=as_user)}
    result = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                            timeout=timeout, **kwargs)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited with {result.returncode}:\n{result.stdout}{result.stderr}")
    return result


def wait_until_serving(port, proc, log_path, what, timeout=START_TIMEOUT, user=BENCH_USER, db=BENCH_DB):
    """Wait until a real query answers on port; raise TargetFailed with the log tail if it never does."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise TargetFailed(f"{what} exited with {proc.returncode}: {log_tail(log_path)}")
        try:
            result = subprocess.run(
                ["psql", "-X", "-tA", "-h", "127.0.0.1", "-p", str(port), "-U", user, "-d", db, "-c", "select 1"],
                stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=5,
                env=dict(os.environ, PGCONNECT_TIMEOUT="3"))
            if result.returncode == 0 and result.stdout.strip() == "1":
                return
            last = (result.stderr or result.stdout).strip().splitlines()[-1:] or [""]
            last = last[0]
        except subprocess.TimeoutExpired:
            last = "psql timed out"
        time.sleep(0.2)
    raise TargetFailed(f"{what} did not answer 'select 1' on port {port} within {timeout:.0f}s"
                       f" (last error: {last}); log: {log_tail(log_path)}")


def log_tail(path, lines=3):
    try:
        with open(path, errors="replace") as f:
            tail = [line.strip() for line in f.read().splitlines() if line.strip()][-lines:]
    except OSError:
        return "(no log)"
    return " | ".join(tail) or "(empty log)"


class Workspace:
    """The temp dir holding the private server, configs and logs; owned by the OS user that runs servers."""

    def __init__(self, keep):
        self.path = tempfile.mkdtemp(prefix="multiproxy-bench-")
        self.keep = keep
        self.server_user = "postgres" if os.geteuid() == 0 else None
        self._chown(self.path)

    def file(self, name, text=None):
        path = os.path.join(self.path, name)
        if text is not None:
            with open(path, "w") as f:
                f.write(text)
            self._chown(path)
        return path

    def _chown(self, path):
        if self.server_user is not None:
            entry = pwd.getpwnam(self.server_user)
            os.chown(path, entry.pw_uid, entry.pw_gid)

    def remove(self):
        if self.keep:
            print(f"kept {self.path}", file=sys.stderr)
        else:
            shutil.rmtree(self.path, ignore_errors=True)


class PrivatePostgres:
    """The bench database: a private PostgreSQL (multiproxy.lab.postgres) with the bench role and pgbench tables."""

    def __init__(self, scale, keep, max_connections=300, auth="trust"):
        self.scale, self.auth = scale, auth
        try:
            self.server = PostgresServer(settings={"max_connections": max_connections, "shared_buffers": "128MB"},
                                         keep_datadir=keep)
        except PostgresNotInstalled as exc:
            raise SystemExit(str(exc))
        self.port = None
        self.scram_verifier = None

    def start(self):
        try:
            self.server.start()
        except RuntimeError as exc:
            raise SystemExit(f"private PostgreSQL did not start: {exc}")
        self.port = self.server.port
        self.server.psql(f"CREATE ROLE {BENCH_USER} LOGIN SUPERUSER;")
        self.server.psql(f"CREATE DATABASE {BENCH_DB} OWNER {BENCH_USER};")
        if self.auth == "scram":
            # The server keeps trust for TCP; the poolers verify each client's SCRAM exchange against this verifier
            # (PgBouncer reads it from its auth_file, as a production set-up copies it from pg_authid).
            self.server.psql(f"SET password_encryption = 'scram-sha-256'; "
                             f"ALTER ROLE {BENCH_USER} PASSWORD '{BENCH_PASSWORD}';")
            self.scram_verifier = self.server.psql(
                f"SELECT rolpassword FROM pg_authid WHERE rolname = '{BENCH_USER}';").strip()
        if self.scale == 0:
            return                                  # the storm server: one query of constants, no tables
        print(f"pgbench -i -s {self.scale} ...", file=sys.stderr)
        run_quiet(["pgbench", "-i", "-q", "-s", str(self.scale), "-h", "127.0.0.1", "-p", str(self.port),
                   "-U", BENCH_USER, BENCH_DB], timeout=1800)

    def stop(self):
        if self.server.keep_datadir and self.server.basedir:
            print(f"kept {self.server.basedir}", file=sys.stderr)
        self.server.stop()

    def version(self):
        return self.server.version()


class Target:
    """One thing pgbench connects to; start() returns its port, pid is the process whose CPU is measured."""

    name = ""
    pid = None
    proc = None

    def start(self):
        raise NotImplementedError

    def stop(self):
        pass


class Direct(Target):
    name = "direct"

    def __init__(self, pg):
        self.pg = pg

    def start(self):
        return self.pg.port


def engines_of_this_checkout() -> str:
    """A directory whose `multiproxy_engines` links to this checkout's engines/ (an editable install maps that name
    to the checkout it was installed from, maybe another worktree), to go first on the proxy's PYTHONPATH: the one
    the test suite makes (tests/conftest.py)."""
    spec = importlib.util.spec_from_file_location("multiproxy_tests_conftest",
                                                  os.path.join(REPO_ROOT, "tests", "conftest.py"))
    conftest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conftest)
    return conftest.engines_link_dir()


# --client-timeouts: (idle client, idle in a transaction, query) seconds; RDS Proxy's IdleClientTimeout defaults to
# 1,800 s, and the other two are set by those who fear a stuck transaction or statement.
CLIENT_TIMEOUTS = (1800.0, 300.0, 300.0)


class Multiproxy(Target):
    name = "multiproxy"
    client_timeouts = False     # --client-timeouts
    client_limit = None         # --client-limit

    def __init__(self, ws, procs, pg, pool_size, workers, auth="trust", relay="python"):
        self.ws, self.procs, self.pg, self.pool_size, self.workers = ws, procs, pg, pool_size, workers
        self.auth = auth
        self.relay = relay          # [proxy] relay: "compiled" for the target multiproxy-c
        if relay == "compiled":
            self.name = "multiproxy-c"

    def config(self, port):
        workers = f"workers = {self.workers}\n" if self.workers else ""
        if self.relay != "python":
            workers += f'relay = "{self.relay}"\n'
            if self.workers and self.workers > 1:
                workers += "worker_custody = false\n"
        users = ""
        if self.auth == "scram":
            from multiproxy.auth import UsersFile
            listed = UsersFile()
            listed.add(BENCH_USER, BENCH_PASSWORD)
            users = f'\n[auth]\nusers_file = "{self.ws.file("users.toml", listed.dumps())}"\n'
        idle_client, idle_transaction, query = CLIENT_TIMEOUTS if self.client_timeouts else (0.0, 0.0, 0.0)
        return ("[proxy]\n"
                'admin_listen = ""\n'
                'log_level = "warning"\n'
                f"idle_client_timeout = {idle_client}\n"
                f"idle_transaction_timeout = {idle_transaction}\n"
                f"{workers}"
                f"{users}"
                "\n[clusters.bench]\n"
                'engine = "postgres"\n'
                f'hosts = ["127.0.0.1:{self.pg.port}"]\n'
                "\n[clusters.bench.pool]\n"
                'mode = "transaction"\n'
                f"max_size = {self.pool_size}\n"
                "borrow_timeout = 10.0\n"
                f"query_timeout = {query}\n"
                "\n[[listeners]]\n"
                'name = "bench"\n'
                f'listen = "127.0.0.1:{port}"\n'
                'cluster = "bench"\n'
                'role = "writer"\n'
                f'auth = "{"scram-sha-256" if self.auth == "scram" else "trust"}"\n'
                + (f"max_client_connections = {self.client_limit}\n" if self.client_limit else ""))

    def start(self):
        port = free_port()
        cfg = self.ws.file("multiproxy.toml", self.config(port))
        log = self.ws.file("multiproxy.log")
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [engines_of_this_checkout(), REPO_ROOT,
                                                          env.get("PYTHONPATH")]))
        self.proc = self.procs.start([sys.executable, "-m", "multiproxy", "run", "-c", cfg],
                                     log_path=log, env=env, cwd=REPO_ROOT)
        self.pid = self.proc.pid
        wait_until_serving(port, self.proc, log, "multiproxy")
        return port

    def stop(self):
        if self.proc is not None:
            self.procs.stop(self.proc)


class PgBouncer(Target):
    name = "pgbouncer"
    max_client_conn = 1000
    client_timeouts = False     # --client-timeouts

    def __init__(self, ws, procs, pg, pool_size, auth="trust", max_client_conn=None):
        self.ws, self.procs, self.pg, self.pool_size, self.auth = ws, procs, pg, pool_size, auth
        if max_client_conn is not None:
            self.max_client_conn = max_client_conn
        self.binary = shutil.which("pgbouncer") or next(
            (p for p in ("/usr/sbin/pgbouncer", "/usr/local/bin/pgbouncer") if os.access(p, os.X_OK)), None)

    def version(self):
        if not self.binary:
            return None
        return run_quiet([self.binary, "--version"]).stdout.splitlines()[0].strip()

    def start(self):
        if not self.binary:
            raise TargetFailed("not installed")
        port = free_port()
        secret = self.pg.scram_verifier if self.auth == "scram" else ""
        users = self.ws.file("userlist.txt", f'"{BENCH_USER}" "{secret}"\n"postgres" ""\n')
        ini = self.ws.file("pgbouncer.ini", (
            "[databases]\n"
            f"{BENCH_DB} = host=127.0.0.1 port={self.pg.port} dbname={BENCH_DB}\n"
            "\n[pgbouncer]\n"
            "listen_addr = 127.0.0.1\n"
            f"listen_port = {port}\n"
            f"unix_socket_dir = {self.ws.path}\n"
            f"logfile = {os.path.join(self.ws.path, 'pgbouncer.log')}\n"
            f"pidfile = {os.path.join(self.ws.path, 'pgbouncer.pid')}\n"
            f"auth_type = {'scram-sha-256' if self.auth == 'scram' else 'trust'}\n"
            f"auth_file = {users}\n"
            "pool_mode = transaction\n"
            f"default_pool_size = {self.pool_size}\n"
            f"max_client_conn = {self.max_client_conn}\n"
            "ignore_startup_parameters = extra_float_digits\n"
            "log_connections = 0\n"
            "log_disconnections = 0\n"
            + ("client_idle_timeout = {:g}\nidle_transaction_timeout = {:g}\nquery_timeout = {:g}\n".format(
                *CLIENT_TIMEOUTS) if self.client_timeouts else "")))
        log = self.ws.file("pgbouncer.out")
        self.proc = self.procs.start([self.binary, ini], log_path=log, as_user=self.ws.server_user)
        self.pid = self.proc.pid
        wait_until_serving(port, self.proc, log, "pgbouncer")
        return port

    def stop(self):
        if self.proc is not None:
            self.procs.stop(self.proc)


class Relay(Target):
    name = "relay"

    def __init__(self, ws, procs, pg):
        self.ws, self.procs, self.pg = ws, procs, pg

    def start(self):
        port = free_port()
        log = self.ws.file("relay.log")
        self.proc = self.procs.start(
            [sys.executable, os.path.join(REPO_ROOT, "tools", "relay.py"),
             "--listen", f"127.0.0.1:{port}", "--backend", f"127.0.0.1:{self.pg.port}"], log_path=log)
        self.pid = self.proc.pid
        wait_until_serving(port, self.proc, log, "relay")
        return port

    def stop(self):
        if self.proc is not None:
            self.procs.stop(self.proc)


class FloorPooler(Target):
    """tools/floor_pooler.py: the least a gevent transaction pooler does for pgbench -S (see its docstring);
    relay "c": the same on the compiled relay core (target floor-c)."""
    name = "floor"

    def __init__(self, ws, procs, pg, pool_size, relay="python"):
        self.ws, self.procs, self.pg, self.pool_size, self.relay = ws, procs, pg, pool_size, relay
        if relay != "python":
            self.name = f"floor-{relay}"

    def start(self):
        port = free_port()
        log = self.ws.file(f"{self.name}.log")
        self.proc = self.procs.start(
            [sys.executable, os.path.join(REPO_ROOT, "tools", "floor_pooler.py"), "--listen", f"127.0.0.1:{port}",
             "--backend", f"127.0.0.1:{self.pg.port}", "--user", BENCH_USER, "--database", BENCH_DB,
             "--pool-size", str(self.pool_size), "--relay", self.relay], log_path=log)
        self.pid = self.proc.pid
        wait_until_serving(port, self.proc, log, self.name)
        return port

    def stop(self):
        if self.proc is not None:
            self.procs.stop(self.proc)


def pgbench(port, load, seconds, protocol="simple"):
    script = []
    if load in LOAD_SCRIPTS:
        with tempfile.NamedTemporaryFile("w", suffix=".sql", prefix=f"bench-{load}-", delete=False) as out:
            out.write(LOAD_SCRIPTS[load])
        os.chmod(out.name, 0o644)
        script = ["-f", out.name]
    argv = ["pgbench", *LOADS[load], *script, "-M", protocol, "-T", str(seconds), "-n", "-h", "127.0.0.1", "-p", str(port),
            "-U", BENCH_USER, BENCH_DB]
    try:
        result = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                timeout=seconds + 60)
    except subprocess.TimeoutExpired:
        raise TargetFailed(f"pgbench did not finish within {seconds + 60}s")
    finally:
        for path in script[1:]:
            os.unlink(path)
    found = {label: float(value) for value, label in TPS_LINE.findall(result.stdout)}
    tps = next((found[label] for label in TPS_PREFERRED if label in found), None)
    if tps is None and found:
        tps = next(iter(found.values()))
    if tps is None or result.returncode != 0:
        detail = (result.stderr.strip().splitlines() or result.stdout.strip().splitlines() or [""])[-1]
        if tps is None:
            raise TargetFailed(f"pgbench exited with {result.returncode}: {detail}")
        print(f"  warning: pgbench exited with {result.returncode} ({detail})", file=sys.stderr)
    return tps


def measure(target, port, load, seconds, protocol="simple"):
    """Warm up, then run the load; returns (tps, average CPU% of the target's process tree or None)."""
    pgbench(port, load, WARMUP_SECONDS, protocol)
    before = tree_cpu_ticks(target.pid) if target.pid else None
    started = time.monotonic()
    tps = pgbench(port, load, seconds, protocol)
    elapsed = time.monotonic() - started
    cpu = None
    if before is not None:
        cpu = 100.0 * (tree_cpu_ticks(target.pid) - before) / CLK_TCK / elapsed
    return tps, cpu


def raise_open_file_limit(wanted):
    """Raise RLIMIT_NOFILE's soft limit towards `wanted` within the hard limit (children inherit it)."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def json_tool_result(argv, timeout, what):
    """Run a client tool that prints its result as a JSON last line; that result, or TargetFailed with its stderr."""
    try:
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise TargetFailed(f"{what} did not finish within {timeout:.0f} s")
    try:
        return json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        raise TargetFailed(f"{what} exited with {done.returncode}: "
                           + " | ".join(done.stderr.strip().splitlines()[-2:]))


def storm_once(target, port, clients, timeout):
    """tools/pg_storm.py against port: its JSON result plus the CPU seconds the target's process tree spent."""
    before = tree_cpu_ticks(target.pid) if target.pid else None
    argv = [sys.executable, os.path.join(REPO_ROOT, "tools", "pg_storm.py"), "--port", str(port), "--user",
            BENCH_USER, "--database", BENCH_DB, "--clients", str(clients), "--timeout", str(timeout)]
    if os.environ.get("PGPASSWORD"):
        argv += ["--password", os.environ["PGPASSWORD"]]
    result = json_tool_result(argv, timeout + 90, "pg_storm.py")
    if before is not None:
        result["cpu_s"] = (tree_cpu_ticks(target.pid) - before) / CLK_TCK
    return result


def storm_bench(args, procs):
    """The storm: for each pooler in turn, in front of a private server that allows --storm-server-connections,
    --storm-clients psycopg clients connect at once and run one query; returns lines of a table."""
    raise_open_file_limit(2 * args.storm_clients + 256)
    ws = Workspace(args.keep)
    server = PrivatePostgres(0, args.keep, max_connections=args.storm_server_connections, auth=args.auth)
    pool_size = min(args.pool_size, args.storm_server_connections)
    results = {}
    try:
        server.start()
        makers = {"multiproxy": lambda: Multiproxy(ws, procs, server, pool_size, args.workers, args.auth),
                  "multiproxy-c": lambda: Multiproxy(ws, procs, server, pool_size, args.workers, args.auth,
                                                     relay="compiled"),
                  "pgbouncer": lambda: PgBouncer(ws, procs, server, pool_size, args.auth,
                                                 max_client_conn=args.storm_clients + 100)}
        for round_number in range(args.rounds):
            for name in (t for t in STORM_TARGETS if t in args.targets):
                print(f"round {round_number + 1}/{args.rounds}: {name} / storm of {args.storm_clients} clients",
                      file=sys.stderr)
                target = makers[name]()
                try:
                    port = target.start()
                    results.setdefault(name, []).append(storm_once(target, port, args.storm_clients,
                                                                   args.storm_timeout))
                except TargetFailed as exc:
                    print(f"  {name} / storm: {exc}", file=sys.stderr)
                    results.setdefault(name, []).append({"failed": str(exc)})
                finally:
                    target.stop()
    finally:
        server.stop()
        ws.remove()
    header = ["target", "clients", "served", "errors", "p50 s", "p99 s", "max s", "wall s", "proxy CPU s"]
    lines = []
    for name, runs in results.items():
        good = [r for r in runs if "failed" not in r]
        if not good:
            lines.append([name, str(args.storm_clients), "failed: " + runs[0]["failed"][:60]] + ["-"] * 6)
            continue
        def med(key):
            values = [r[key] for r in good if r.get(key) is not None]
            return f"{statistics.median(values):.2f}" if values else "-"
        lines.append([name, str(args.storm_clients), f"{min(r['served'] for r in good)}",
                      f"{max(r['errors'] for r in good)}", med("p50_s"), med("p99_s"), med("max_s"), med("wall_s"),
                      med("cpu_s")])
        for r in good:
            for error in r["first_errors"]:
                print(f"  {name} / storm: {error}", file=sys.stderr)
    return header, lines, pool_size


def format_plain(header, lines):
    widths = [max(len(r[i]) for r in [header] + lines) for i in range(len(header))]
    fmt = lambda r: "  ".join(c.ljust(w) if i < 1 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa
    return "\n".join([fmt(header), "  ".join("-" * w for w in widths)] + [fmt(r) for r in lines])


def format_markdown(header, lines):
    out = ["| " + " | ".join(header) + " |", "|---|" + "|".join(["---:"] * (len(header) - 1)) + "|"]
    return "\n".join(out + ["| " + " | ".join(line) + " |" for line in lines])


def latency_lines(rows):
    """pgbench -c 1: the mean time of one transaction per target (1 / TPS) and multiproxy's distance to PgBouncer."""
    latency = {target: 1e6 / tps for (target, load), (tps, *_rest) in rows.items() if load == "latency" and tps}
    if not latency:
        return []
    lines = ["latency (pgbench -S -c 1, mean per transaction): "
             + ", ".join(f"{target} {us:.0f} us" for target, us in latency.items())]
    if "multiproxy" in latency and "pgbouncer" in latency:
        lines.append(f"multiproxy - pgbouncer: {latency['multiproxy'] - latency['pgbouncer']:+.0f} us "
                     "(the bar: within 20 us)")
    return lines


def _summary(runs, bouncer_runs):
    """(median TPS, median CPU%, note, CPU per transaction) of one target and load; with several rounds the note
    gives the range of its per-round ratio to PgBouncer (both measured in the same round), and the CPU per
    transaction (µs of the target's CPU per pgbench transaction, CPU% * 10000 / TPS, per round) its range."""
    tps = [t for t, _ in runs if t is not None]
    if not tps:
        return (None, None, "run failed", None)
    cpu = [c for _, c in runs if c is not None]
    note = ""
    if len(runs) > 1 and bouncer_runs:
        ratios = sorted(t / b for (t, _), (b, _) in zip(runs, bouncer_runs) if t and b)
        if ratios:
            note = f"{statistics.median(ratios):.2f} ({ratios[0]:.2f}-{ratios[-1]:.2f})"
    per_tx = sorted(c * 10000 / t for t, c in runs if t and c is not None)
    cost = None
    if per_tx:
        cost = f"{statistics.median(per_tx):.0f}" + (f" ({per_tx[0]:.0f}-{per_tx[-1]:.0f})" if len(per_tx) > 1 else "")
    return (statistics.median(tps), statistics.median(cpu) if cpu else None, note, cost)


def format_table(rows, loads, markdown=False):
    """rows: {(target, load): (tps or None, cpu or None, note, CPU us per transaction or None)}; ratios against
    direct and pgbouncer."""
    header = ["target", "load", "TPS", "vs direct", "vs pgbouncer", "proxy CPU%", "CPU us/tx"]
    rounds = any(note and tps is not None for tps, _, note, _ in rows.values())
    if rounds:
        header.append("vs pgbouncer per round: median (range)")
    lines = []
    for (target, load), (tps, cpu, note, per_tx) in rows.items():
        def ratio(base):
            base_tps = rows.get((base, load), (None,))[0]
            if tps is None or not base_tps:
                return "-"
            return f"{tps / base_tps:.2f}"
        line = [target, load, f"{tps:.0f}" if tps is not None else note,
                ratio("direct"), ratio("pgbouncer"), f"{cpu:.0f}" if cpu is not None else "-", per_tx or "-"]
        if rounds:
            line.append(note if tps is not None and note else "-")
        lines.append(line)
    if markdown:
        out = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(header) - 2)) + "|"]
        out += ["| " + " | ".join(line) + " |" for line in lines]
        return "\n".join(out)
    widths = [max(len(r[i]) for r in [header] + lines) for i in range(len(header))]
    fmt = lambda r: "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([fmt(header), "  ".join("-" * w for w in widths)] + [fmt(r) for r in lines])


def machine_notes(pg, bouncer):
    try:
        gevent_version = __import__("gevent").__version__
    except ImportError:
        gevent_version = "not installed"
    cpu_model = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu_model = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), "")
    except OSError:
        pass
    pgbench_version = run_quiet(["pgbench", "--version"]).stdout.strip()
    return [f"{os.cpu_count()} CPUs ({cpu_model or platform.machine()}), {platform.system()} {platform.release()}",
            pg.version(), pgbench_version, bouncer.version() or "PgBouncer not installed",
            f"Python {platform.python_version()}, gevent {gevent_version}"]


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=int, default=15, help="measured seconds per load (default 15)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="measure every target this many times, interleaved; report medians (default 1)")
    parser.add_argument("--loads", default=",".join(DEFAULT_LOADS),
                        help=f"subset of {','.join(LOADS)} (default {','.join(DEFAULT_LOADS)})")
    parser.add_argument("--auth", choices=("trust", "scram"), default="trust",
                        help="how multiproxy and PgBouncer authenticate clients: trust, or SCRAM-SHA-256 against "
                             "the server's verifier (default trust)")
    parser.add_argument("--storm-clients", type=int, default=2000, help="clients of the storm load (default 2000)")
    parser.add_argument("--storm-server-connections", type=int, default=20,
                        help="max_connections of the storm's server (default 20)")
    parser.add_argument("--storm-timeout", type=float, default=10.0,
                        help="each storm client's limit in seconds, the poolers' borrow timeout (default 10)")
    parser.add_argument("--targets", default=",".join(DEFAULT_TARGETS),
                        help=f"subset of {','.join(ALL_TARGETS)} (default {','.join(DEFAULT_TARGETS)})")
    parser.add_argument("--scale", type=int, default=10, help="pgbench -i scale factor (default 10)")
    parser.add_argument("--protocol", choices=("simple", "extended", "prepared"), default="simple",
                        help="pgbench -M of the steady, connect and latency loads: simple Query, the extended "
                             "protocol's unnamed statement (Parse/Bind/Describe/Execute/Sync), or named prepared "
                             "statements (Parse once per connection, then Bind/Execute/Sync; not with pgbouncer, "
                             "whose transaction pooling serves none before 1.21) (default simple)")
    parser.add_argument("--pool-size", type=int, default=16, help="backend connections per pooler (default 16)")
    parser.add_argument("--workers", type=int, help="multiproxy [proxy] workers (default: its own default)")
    parser.add_argument("--client-timeouts", action="store_true",
                        help="both poolers with client timeouts on, as a production set-up has them: idle client "
                             f"{CLIENT_TIMEOUTS[0]:g} s, idle in a transaction {CLIENT_TIMEOUTS[1]:g} s, query "
                             f"{CLIENT_TIMEOUTS[2]:g} s (none fires during the loads)")
    parser.add_argument("--markdown", metavar="FILE", help="also write the results table as markdown")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs, configs) for inspection")
    parser.add_argument("--client-limit", type=int, metavar="N",
                        help="multiproxy's listener max_client_connections = N as well as PgBouncer's max_client_conn "
                             f"(PgBouncer's is {PgBouncer.max_client_conn} otherwise, multiproxy's none)")
    args = parser.parse_args(argv)
    Multiproxy.client_timeouts = PgBouncer.client_timeouts = args.client_timeouts
    Multiproxy.client_limit = args.client_limit
    if args.client_limit:
        PgBouncer.max_client_conn = args.client_limit
    if args.rounds < 1:
        parser.error("--rounds: at least 1")
    args.loads = [x.strip() for x in args.loads.split(",") if x.strip()]
    args.targets = [x.strip() for x in args.targets.split(",") if x.strip()]
    for value, allowed, option in ((args.loads, LOADS, "--loads"), (args.targets, ALL_TARGETS, "--targets")):
        unknown = [v for v in value if v not in allowed]
        if unknown or not value:
            parser.error(f"{option}: unknown {', '.join(unknown) or 'empty list'}; choose from {', '.join(allowed)}")
    if args.protocol == "prepared" and "pgbouncer" in args.targets:
        parser.error("--protocol prepared: PgBouncer's transaction pooling serves no named prepared statements "
                     "(before 1.21); leave pgbouncer out of --targets")
    return args


MYSQL_TARGETS = ("direct", "multiproxy", "relay")
# --targets of `--engine mysql`: multiproxy-c is multiproxy with [proxy] relay = "compiled" (multiproxy.relay_lanes)
MYSQL_ALL_TARGETS = ("direct", "multiproxy", "multiproxy-c", "relay")
TDS_TARGETS = ("direct", "multiproxy")
# --targets of `--engine tds`: multiproxy-c is multiproxy with [proxy] relay = "compiled" and reset_after_transaction =
# "no" (the TDS relay lanes serve only pools that do not reset backends between clients: engines/tds/compiled_relay.py)
TDS_ALL_TARGETS = ("direct", "multiproxy", "multiproxy-c")
# The variants of the MySQL and TDS benchmarks: `text` is the plain query protocol (sysbench --db-ps-mode=disable;
# pymssql), `ps` server-side prepared statements with as many clients as the pool has connections (sysbench
# --db-ps-mode=auto: COM_STMT_PREPARE/EXECUTE; tedious prepare/execute: sp_prepare/sp_execute), `ps-over` the same
# with more clients than the pool (default twice as many), which needs statements multiplexed across backends.
VARIANTS = ("text", "ps", "ps-over")
# MySQL also: read-only = sysbench oltp_read_only, text protocol (BEGIN, ten point selects, four range selects, COMMIT);
# insert = sysbench oltp_insert, text protocol (one INSERT in autocommit, its id generated)
MYSQL_VARIANTS = VARIANTS + ("read-only", "insert")
MYSQL_SCRIPTS = {"read-only": "oltp_read_only", "insert": "oltp_insert"}
METRIC_LINE = re.compile(r'^multiproxy_prepared_statements_total\{([^}]*)\}\s+([0-9.eE+-]+)\s*$', re.MULTILINE)
NODE_DIR = os.path.join(REPO_ROOT, "tools", "node")


class EngineRun:
    """Samples of one MySQL or TDS run: per (variant, target) a list over rounds of (rate, None) or (None, why)."""

    def __init__(self, variants, targets, clients):
        self.variants, self.targets, self.clients = variants, targets, clients
        self.samples: dict = {}

    def add(self, variant, target, rate, error=None):
        self.samples.setdefault((variant, target), []).append((rate, error))

    def median(self, variant, target):
        rates = [r for r, _ in self.samples.get((variant, target), ()) if r is not None]
        return statistics.median(rates) if rates else None

    def failures(self):
        """'variant / target: failed in k of n rounds: why' for every (variant, target) that failed at least once."""
        out = []
        for (variant, target), runs in self.samples.items():
            errors = [e for r, e in runs if r is None]
            if errors:
                # One example of each kind of failure: rounds that differ only in their figures are one kind.
                kinds = {re.sub(r"[0-9.]+", "#", e): e for e in reversed(errors)}
                reasons = " || ".join(list(kinds.values())[::-1][:3])
                out.append(f"{variant} / {target} ({self.clients[variant]} clients): failed in {len(errors)} of "
                           f"{len(runs)} rounds: {reasons}")
        return out

    def table(self, unit, base):
        """Markdown table: one row per variant, the targets side by side, multiproxy against `base` (and direct)."""
        rounds = max((len(runs) for runs in self.samples.values()), default=1)
        extra = [t for t in ("multiproxy-c",) if t in self.targets]
        header = ["variant", "clients"] + [f"{t} {unit}" for t in self.targets] + [f"multiproxy / {base}"]
        header += [f"{t} / {base}" for t in extra]
        if base != "direct":
            header.append("multiproxy / direct")
        if rounds > 1:
            header += [f"{t} / {base} per round: median (range)" for t in ["multiproxy"] + extra]
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
        for variant in self.variants:
            cells = [variant, str(self.clients[variant])]
            for target in self.targets:
                rate = self.median(variant, target)
                cells.append(f"{rate:.0f}" if rate is not None else "failed")
            mine = self.median(variant, "multiproxy")
            for other in [base] + (["direct"] if base != "direct" else []):
                theirs = self.median(variant, other)
                cells.append(f"{mine / theirs:.2f}" if mine is not None and theirs else "-")
                for target in extra if other == base else ():
                    rate = self.median(variant, target)
                    cells.append(f"{rate / theirs:.2f}" if rate is not None and theirs else "-")
            for target in ["multiproxy"] + extra if rounds > 1 else ():
                ratios = sorted(m / b for (m, _), (b, _) in zip(self.samples.get((variant, target), ()),
                                                              self.samples.get((variant, base), ())) if m and b)
                cells.append(f"{statistics.median(ratios):.2f} ({ratios[0]:.2f}-{ratios[-1]:.2f})" if ratios else "-")
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)


def _variant_clients(variants, pool_size, text_clients, ps_clients, over_clients):
    ps_clients = ps_clients or pool_size
    chosen = {"text": text_clients, "ps": ps_clients, "ps-over": over_clients or 2 * ps_clients,
              "read-only": text_clients, "insert": text_clients}
    return {v: chosen[v] for v in variants}


def _proxy_config(engine, backend_port, listen_port, admin_port, pool_size, listener_extra=""):
    """multiproxy.toml of the MySQL and TDS benchmarks: one cluster, transaction pooling, the admin server on
    admin_port (for /metrics), users.toml beside it."""
    return (f'[proxy]\nadmin_listen = "127.0.0.1:{admin_port}"\nlog_level = "warning"\n'
            f'[auth]\nusers_file = "users.toml"\n\n'
            f'[clusters.main]\nengine = "{engine}"\nhosts = ["127.0.0.1:{backend_port}"]\n'
            f'[clusters.main.backend]\ntls = "disable"\n\n'
            f'[clusters.main.pool]\nmax_size = {pool_size}\nborrow_timeout = 5.0\n'
            f'[[clusters.main.credentials]]\nuser = "*"\npassword = "bench"\n\n'
            f'[[listeners]]\nname = "bench"\nlisten = "127.0.0.1:{listen_port}"\ncluster = "main"\n{listener_extra}')


def _start_proxy(procs, work, engine, backend_port, pool_size, listener_extra="", relay="", name="mp", reset=""):
    """Start multiproxy for the MySQL or TDS benchmark ([proxy] relay = `relay` and [clusters.main.backend]
    reset_after_transaction = `reset` when given; its files named after `name`); returns (process, client port, admin
    port)."""
    port, admin_port = free_port(), free_port()
    config = _proxy_config(engine, backend_port, port, admin_port, pool_size, listener_extra)
    if relay:
        config = config.replace("[proxy]\n", f'[proxy]\nrelay = "{relay}"\n', 1)
    if reset:
        config = config.replace('[clusters.main.backend]\ntls = "disable"\n',
                                f'[clusters.main.backend]\ntls = "disable"\nreset_after_transaction = "{reset}"\n', 1)
    with open(os.path.join(work, f"{name}.toml"), "w") as f:
        f.write(config)
    env = dict(os.environ)
    # this checkout's engines first (an editable install maps multiproxy_engines to the checkout it came from)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [engines_of_this_checkout(), REPO_ROOT, env.get("PYTHONPATH")]))
    log_path = os.path.join(work, "multiproxy.log" if name == "mp" else f"{name}.log")
    proc = procs.start([sys.executable, "-m", "multiproxy", "run", "-c", os.path.join(work, f"{name}.toml")],
                       log_path=log_path, cwd=work, env=env)
    _wait_port(port, proc, log_path)
    return proc, port, admin_port


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process `pid` so far (all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def statement_counts(admin_port):
    """multiproxy_prepared_statements_total from the proxy's /metrics: "hit=… miss=… eviction=…" per cluster."""
    import urllib.request
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=10) as response:
            text = response.read().decode("utf-8", "replace")
    except OSError as exc:
        return f"multiproxy_prepared_statements_total: /metrics did not answer ({exc})"
    counts: dict = {}
    for labels, value in METRIC_LINE.findall(text):
        fields = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        counts.setdefault(fields.get("cluster", "?"), {})[fields.get("outcome", "?")] = float(value)
    if not counts:
        return "multiproxy_prepared_statements_total: not in /metrics"
    parts = [f"cluster {cluster}: " + ", ".join(f"{k}={v:.0f}" for k, v in sorted(outcomes.items()))
             for cluster, outcomes in counts.items()]
    total = sum(v for outcomes in counts.values() for v in outcomes.values())
    note = ("; all 0: statements pinned the client session to its backend (measured before statement multiplexing)"
            if total == 0 else "")
    return "multiproxy_prepared_statements_total after the run: " + "; ".join(parts) + note


def machine_line():
    cpu_model = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu_model = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), "")
    except OSError:
        pass
    try:
        gevent_version = __import__("gevent").__version__
    except ImportError:
        gevent_version = "not installed"
    return (f"{os.cpu_count()} CPUs ({cpu_model or platform.machine()}), {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}, gevent {gevent_version}, "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")


def _emit(lines, markdown):
    text = "\n".join(lines)
    print(text)
    if markdown:
        with open(markdown, "w") as f:
            f.write(text + "\n")


def _interleave(run, rounds, variants, targets, seconds, warmup, measure_one):
    """Every round runs each variant on each target back to back (a slow spell of the machine hits all of them);
    the first round of each (variant, target) warms up for `warmup` seconds first. measure_one(variant, target,
    seconds) returns a rate or raises TargetFailed."""
    for round_number in range(rounds):
        for variant in variants:
            for target in targets:
                print(f"round {round_number + 1}/{rounds}: {variant} / {target} ({run.clients[variant]} clients): "
                      f"run {seconds}s", file=sys.stderr)
                if round_number == 0 and warmup > 0:
                    try:
                        measure_one(variant, target, warmup)
                    except TargetFailed as exc:   # the measured run below says whether it fails too
                        print(f"  {variant} / {target}: warm-up: {exc}", file=sys.stderr)
                try:
                    run.add(variant, target, measure_one(variant, target, seconds))
                except TargetFailed as exc:
                    print(f"  {variant} / {target}: {exc}", file=sys.stderr)
                    run.add(variant, target, None, str(exc))


def sysbench(port, threads, ps_mode, seconds, test="oltp_point_select"):
    """One sysbench run of `test`; TPS, or TargetFailed saying why (its FATAL lines)."""
    argv = ["sysbench", test, "run", f"--mysql-port={port}", *SYSBENCH_COMMON,
            f"--threads={threads}", f"--db-ps-mode={ps_mode}", f"--time={seconds}"]
    try:
        out = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=seconds + 60)
    except subprocess.TimeoutExpired:
        raise TargetFailed(f"sysbench did not finish within {seconds + 60} s")
    found = re.search(r"transactions:\s+\d+\s+\(([0-9.]+) per sec", out.stdout)
    if out.returncode == 0 and found:
        return float(found.group(1))
    lines = [l.strip() for l in (out.stdout + "\n" + out.stderr).splitlines() if l.strip()]
    fatal = list(dict.fromkeys(l for l in lines if "FATAL" in l or "error" in l.lower()))[:3]
    raise TargetFailed(f"sysbench exited with {out.returncode}: " + (" | ".join(fatal) or " | ".join(lines[-2:])))


SYSBENCH_COMMON = ["--db-driver=mysql", "--mysql-host=127.0.0.1", "--mysql-user=bench", "--mysql-password=bench",
                   "--mysql-db=bench", "--tables=1", "--table-size=10000", "--mysql-ssl=off"]
SYSBENCH_PS_MODE = {"text": "disable", "ps": "auto", "ps-over": "auto", "read-only": "disable", "insert": "disable"}


def mysql_bench(seconds: int, pool_size: int, keep: bool, markdown: str | None, *, rounds: int = 1,
                warmup: int = WARMUP_SECONDS, variants=VARIANTS, ps_clients: int | None = None,
                over_clients: int | None = None, targets=MYSQL_TARGETS) -> None:
    """sysbench oltp_point_select against a private MariaDB directly, through multiproxy (mysql engine,
    transaction pooling) and through tools/relay.py, in one run, interleaved rounds: the text protocol
    (--db-ps-mode=disable) and server-side prepared statements (--db-ps-mode=auto) with as many threads as the
    pool (ps) and with more (ps-over); TPS medians, multiproxy / relay, and the proxy's prepared-statement tally."""
    from multiproxy.auth import UsersFile
    from multiproxy.lab.mariadb import MariaDBServer
    if not shutil.which("sysbench"):
        raise SystemExit("sysbench must be on PATH")
    clients = _variant_clients(variants, pool_size, ps_clients or pool_size, ps_clients, over_clients)
    work = tempfile.mkdtemp(prefix="mp-bench-mysql-")
    server = MariaDBServer(settings={"max_connections": 500}).start()
    procs = Processes()
    try:
        server.sql("CREATE DATABASE bench; CREATE USER 'bench'@'%' IDENTIFIED BY 'bench'; "
                   "GRANT ALL ON *.* TO 'bench'@'%';")
        run_quiet(["sysbench", "oltp_point_select", "prepare", f"--mysql-port={server.port}", *SYSBENCH_COMMON],
                  timeout=300)
        users = UsersFile()
        users.add("bench", "bench", kinds=["mysql_native_password"])
        with open(os.path.join(work, "users.toml"), "w") as f:
            f.write(users.dumps())
        mp, mp_port, admin_port = _start_proxy(procs, work, "mysql", server.port, pool_size,
                                               'auth = "mysql_native_password"\n')
        relay_port = free_port()
        relay = procs.start([sys.executable, os.path.join(REPO_ROOT, "tools", "relay.py"), "--listen",
                             f"127.0.0.1:{relay_port}", "--backend", f"127.0.0.1:{server.port}"],
                            log_path=os.path.join(work, "relay.log"), cwd=REPO_ROOT)
        _wait_port(relay_port, relay, os.path.join(work, "relay.log"))
        ports = {"direct": server.port, "multiproxy": mp_port, "relay": relay_port}
        pids = {"multiproxy": mp.pid, "relay": relay.pid}
        lanes_admin = None
        if "multiproxy-c" in targets:
            mpc, ports["multiproxy-c"], lanes_admin = _start_proxy(procs, work, "mysql", server.port, pool_size,
                                                         'auth = "mysql_native_password"\n', relay="compiled",
                                                         name="mp-c")
            pids["multiproxy-c"] = mpc.pid
        run = EngineRun(variants, targets, clients)
        cpu: dict = {}      # (variant, target) -> CPU microseconds of the proxy process per transaction, per round

        def measure(variant, target, secs):
            pid = pids.get(target)
            before = process_cpu_seconds(pid) if pid else 0.0
            rate = sysbench(ports[target], clients[variant], SYSBENCH_PS_MODE[variant], secs,
                            MYSQL_SCRIPTS.get(variant, "oltp_point_select"))
            if pid and rate:
                cpu.setdefault((variant, target), []).append(
                    (process_cpu_seconds(pid) - before) / (rate * secs) * 1e6)
            return rate

        _interleave(run, rounds, variants, targets, seconds, warmup, measure)
        tally = statement_counts(admin_port)
        lanes = relay_lane_counts(lanes_admin) if lanes_admin else ""
        version = server.sql("SELECT VERSION()").strip()
        sysbench_version = run_quiet(["sysbench", "--version"]).stdout.strip()
    finally:
        procs.stop_all()
        server.stop()
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"kept {work}", file=sys.stderr)
    scripts = (["oltp_point_select"] if any(v not in MYSQL_SCRIPTS for v in variants) else []) + [
        MYSQL_SCRIPTS[v] for v in variants if v in MYSQL_SCRIPTS]
    lines = ["sysbench " + " and ".join(scripts)
             + f" (10,000 rows), TPS; {seconds} s per run"
             + (f" after a {warmup} s warm-up" if warmup > 0 else "")
             + (f", median of {rounds} interleaved rounds" if rounds > 1 else "")
             + f"; MariaDB {version}, {sysbench_version}, pool max_size {pool_size}",
             "text = --db-ps-mode=disable (COM_QUERY); ps / ps-over = --db-ps-mode=auto (COM_STMT_PREPARE once per "
             "thread, then COM_STMT_EXECUTE); ps-over has more threads than the pool; read-only = sysbench "
             "oltp_read_only, text protocol (a transaction: BEGIN, 14 selects, COMMIT); insert = sysbench oltp_insert, "
             "text protocol (one INSERT in autocommit)", "",
             run.table("TPS", "relay"), ""]
    if cpu:
        lines.append("CPU per transaction of the proxy process (user + system, microseconds, median over rounds; "
                     "warm-ups not counted): " + "; ".join(
                         f"{variant} / {target} {statistics.median(values):.0f}"
                         for (variant, target), values in sorted(cpu.items(), key=lambda item: (
                             variants.index(item[0][0]), targets.index(item[0][1])))
                         if len(values) == rounds or values[1:]))
        lines.append("")
    lines += run.failures()
    lines += [tally] + ([lanes] if lanes else []) + [machine_line()]
    _emit(lines, markdown)


def relay_lane_counts(admin_port):
    """multiproxy-c's relay lane counters after the run (transactions served in lanes, clients given back to the
    Python path by why), from its /metrics."""
    import urllib.request
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=10) as response:
            text = response.read().decode("utf-8", "replace")
    except OSError as exc:
        return f"multiproxy-c relay lanes: /metrics did not answer ({exc})"
    served = re.search(r"^multiproxy_relay_lane_transactions_total(?:\{[^}]*\})?\s+([0-9.eE+]+)", text, re.MULTILINE)
    returns = re.findall(r'^multiproxy_relay_lane_returns_total\{[^}]*why="([^"]*)"[^}]*\}\s+([0-9.eE+]+)', text,
                         re.MULTILINE)
    back = ", ".join(f"{why} {float(n):.0f}" for why, n in returns if float(n)) or "none"
    return (f"multiproxy-c relay lanes after the run (warm-ups included): "
            f"{float(served.group(1)) if served else 0:.0f} transactions served in lanes; clients given back to the "
            f"Python path: {back}")


def _tds_client_process(port: int, threads: int, seconds: float, queue) -> None:
    """One load process: `threads` pymssql connections, each running point selects in autocommit until time;
    puts (queries, [errors])."""
    import threading

    import pymssql
    counts = [0] * threads
    errors: list = []
    stop_at = time.monotonic() + seconds

    def work(index):
        n = 0
        try:
            conn = pymssql.connect(server="127.0.0.1", port=port, user="bench", password="bench", database="bench",
                                   autocommit=True, tds_version="7.4", login_timeout=int(seconds) + 15)
            cur = conn.cursor()
            while time.monotonic() < stop_at:
                cur.execute("SELECT v FROM kv WHERE id = %d" % (n % 1000 + 1))
                cur.fetchall()
                n += 1
            conn.close()
        except Exception as exc:      # noqa: BLE001 - any driver error is a result to report, not a crash
            errors.append(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200])
        counts[index] = n

    pool = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    queue.put((sum(counts), errors))


def tds_text(port: int, clients: int, seconds: float) -> float:
    """pymssql point selects with `clients` connections over 4 processes; queries/s or TargetFailed."""
    import multiprocessing
    import queue as queues
    processes = min(4, clients)
    result_queue = multiprocessing.Queue()
    workers = [multiprocessing.Process(target=_tds_client_process,
                                       args=(port, max(1, clients // processes), seconds, result_queue))
               for _ in range(processes)]
    for w in workers:
        w.start()
    total, errors = 0, []
    try:
        for _ in workers:
            count, errs = result_queue.get(timeout=seconds + 60)
            total += count
            errors += errs
    except queues.Empty:
        errors.append(f"a load process gave no result within {seconds + 60:g} s")
    for w in workers:
        w.join(30)
        if w.is_alive():
            w.kill()
    if errors:
        raise TargetFailed(f"{len(errors)} connection(s) failed ({total / seconds:.0f} q/s from the others): "
                           + " | ".join(dict.fromkeys(errors)))
    return total / seconds


def tds_prepared(port: int, clients: int, seconds: float) -> float:
    """tools/node/tds_prepared_bench.js: `clients` tedious connections, sp_prepare once, sp_execute until time;
    executes/s or TargetFailed (with the errors it printed)."""
    if not shutil.which("node") or not os.path.isdir(os.path.join(NODE_DIR, "node_modules", "tedious")):
        raise TargetFailed(f"node or tedious is missing: run npm ci --prefix {NODE_DIR} (tools/install-deps.sh)")
    argv = ["node", os.path.join(NODE_DIR, "tds_prepared_bench.js"), "--port", str(port),
            "--connections", str(clients), "--seconds", str(seconds)]
    result = json_tool_result(argv, seconds + 60, "tds_prepared_bench.js")
    rate = result["executes"] / max(result["seconds"], 1e-9)
    if result["errors"]:
        raise TargetFailed(f"{result['errors']} error(s), {result['prepared']} of {result['connections']} "
                           f"connections prepared ({rate:.0f} executes/s from those): "
                           + " | ".join(result["error_messages"]))
    idle = sum(1 for n in result["per_connection"] if n == 0)
    if idle:
        # A connection that waited for a backend longer than the run shows no error, only no work.
        raise TargetFailed(f"{idle} of {result['connections']} connections executed nothing in {seconds} s "
                           f"(slowest prepare {result['slowest_prepare_ms']:.0f} ms; {rate:.0f} executes/s from "
                           "the others)")
    if result["rows"] != result["executes"]:
        raise TargetFailed(f"{result['executes']} executes returned {result['rows']} rows (expected one each)")
    return rate


def tds_bench(seconds: int, pool_size: int, clients: int, keep: bool, markdown: str | None, *, rounds: int = 1,
              warmup: int = WARMUP_SECONDS, variants=VARIANTS, ps_clients: int | None = None,
              over_clients: int | None = None, targets=TDS_TARGETS) -> None:
    """Point selects against the TDS lab server directly and through multiproxy (tds engine, transaction pooling)
    in one run, interleaved rounds: pymssql in autocommit (text, `clients` connections over 4 processes), and
    tedious prepared statements (sp_prepare once, sp_execute in a loop) with as many connections as the pool (ps)
    and with more (ps-over); medians per second, multiproxy / direct, and the proxy's prepared-statement tally."""
    from multiproxy.auth import UsersFile
    work = tempfile.mkdtemp(prefix="mp-bench-tds-")
    procs = Processes()
    run_clients = _variant_clients(variants, pool_size, clients, ps_clients, over_clients)
    try:
        lab_port = free_port()
        lab = procs.start([sys.executable, "-m", "multiproxy.lab.tds_server", "--port", str(lab_port), "--user",
                           "bench", "--password", "bench", "--database", "bench", "--db-file",
                           os.path.join(work, "lab.sqlite")], log_path=os.path.join(work, "lab.log"), cwd=REPO_ROOT)
        _wait_port(lab_port, lab, os.path.join(work, "lab.log"))
        import pymssql
        setup = pymssql.connect(server="127.0.0.1", port=lab_port, user="bench", password="bench",
                                database="bench", autocommit=True, tds_version="7.4")
        cur = setup.cursor()
        cur.execute("CREATE TABLE kv (id INT PRIMARY KEY, v NVARCHAR(50))")
        for start in range(1, 1001, 100):
            cur.execute("INSERT INTO kv VALUES " + ", ".join(f"({i}, N'value {i}')" for i in range(start, start + 100)))
        setup.close()
        users = UsersFile()
        users.add("bench", "bench", kinds=["tds_sha256"])
        with open(os.path.join(work, "users.toml"), "w") as f:
            f.write(users.dumps())
        mp, mp_port, admin_port = _start_proxy(procs, work, "tds", lab_port, pool_size)
        ports = {"direct": lab_port, "multiproxy": mp_port}
        pids = {"multiproxy": mp.pid}
        lanes_admin = None
        if "multiproxy-c" in targets:
            mpc, ports["multiproxy-c"], lanes_admin = _start_proxy(procs, work, "tds", lab_port, pool_size,
                                                                   relay="compiled", name="mp-c", reset="no")
            pids["multiproxy-c"] = mpc.pid
        measure_by_variant = {"text": tds_text, "ps": tds_prepared, "ps-over": tds_prepared}
        run = EngineRun(variants, targets, run_clients)
        cpu: dict = {}      # (variant, target) -> CPU microseconds of the proxy process per request, per round

        def measure(variant, target, secs):
            pid = pids.get(target)
            before = process_cpu_seconds(pid) if pid else 0.0
            rate = measure_by_variant[variant](ports[target], run_clients[variant], secs)
            if pid and rate:
                cpu.setdefault((variant, target), []).append(
                    (process_cpu_seconds(pid) - before) / (rate * secs) * 1e6)
            return rate

        _interleave(run, rounds, variants, targets, seconds, warmup, measure)
        tally = statement_counts(admin_port)
        lanes = relay_lane_counts(lanes_admin) if lanes_admin else ""
    finally:
        procs.stop_all()
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"kept {work}", file=sys.stderr)
    lines = [f"TDS point select (SELECT v FROM kv WHERE id = n, 1,000 rows, TDS lab server), per second; {seconds} s "
             "per run" + (f" after a {warmup} s warm-up" if warmup > 0 else "")
             + (f", median of {rounds} interleaved rounds" if rounds > 1 else "") + f"; pool max_size {pool_size}",
             "text = pymssql, autocommit, SQL batches (queries/s); ps / ps-over = tedious prepare() once per "
             "connection (sp_prepare), then execute() (sp_execute) in a loop (executes/s); ps-over has more "
             "connections than the pool", "",
             run.table("/s", "direct"), ""]
    if cpu:
        lines.append("CPU per request of the proxy process (user + system, microseconds, median over rounds; "
                     "warm-ups not counted): " + "; ".join(
                         f"{variant} / {target} {statistics.median(values):.0f}"
                         for (variant, target), values in sorted(cpu.items(), key=lambda item: (
                             variants.index(item[0][0]), targets.index(item[0][1])))))
        lines.append("")
    lines += run.failures()
    lines += [tally] + ([lanes] if lanes else []) + [machine_line()]
    _emit(lines, markdown)


def _wait_port(port: int, proc=None, log_path=None) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"process for port {port} exited with {proc.returncode}: {log_tail(log_path)}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"nothing listens on port {port} after {START_TIMEOUT:g} s")


def engine_args(argv):
    """Options of `--engine mysql|tds` (and `--engine postgres`, which hands the rest to parse_args)."""
    parser = argparse.ArgumentParser(
        description="MySQL (sysbench) and TDS benchmarks of multiproxy beside direct and a bare relay; "
                    "`--engine postgres` or no --engine runs the pgbench benchmark (its own options).")
    parser.add_argument("--engine", choices=("postgres", "mysql", "tds"), default="postgres")
    parser.add_argument("--seconds", type=int, default=15, help="measured seconds per run (default 15)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="measure every variant and target this many times, interleaved; report medians")
    parser.add_argument("--warmup", type=int, default=WARMUP_SECONDS,
                        help=f"warm-up seconds before the first round of each variant and target "
                             f"(default {WARMUP_SECONDS}; 0: none)")
    parser.add_argument("--pool-size", type=int, default=16, help="multiproxy pool max_size (default 16)")
    parser.add_argument("--clients", type=int, default=32, help="TDS text variant: pymssql connections (default 32)")
    parser.add_argument("--ps-clients", type=int,
                        help="clients of the ps variant (MySQL: also of text) (default: --pool-size)")
    parser.add_argument("--over-clients", type=int, help="clients of the ps-over variant (default: 2 x --ps-clients)")
    parser.add_argument("--only", default=",".join(VARIANTS),
                        help="subset of " + ",".join(VARIANTS) + " (MySQL also read-only: sysbench oltp_read_only, "
                             "transactions of BEGIN, 14 selects, COMMIT, text protocol; insert: sysbench oltp_insert, "
                             "one INSERT in autocommit)")
    parser.add_argument("--ps", action="store_true", help="prepared statements only: --only ps,ps-over")
    parser.add_argument("--markdown", metavar="FILE")
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--targets", default=None,
                        help="MySQL: subset of " + ",".join(MYSQL_ALL_TARGETS) + " (default " + ",".join(MYSQL_TARGETS)
                             + "); TDS: subset of " + ",".join(TDS_ALL_TARGETS) + " (default " + ",".join(TDS_TARGETS)
                             + "); multiproxy-c: multiproxy with [proxy] relay = \"compiled\" (TDS: and "
                             "reset_after_transaction = \"no\")")
    known, _rest = parser.parse_known_args(argv)
    if known.engine != "postgres":
        if _rest:
            parser.error(f"unrecognized arguments: {' '.join(_rest)}")
        if known.ps:
            known.only = "ps,ps-over"
        known.variants = [v.strip() for v in known.only.split(",") if v.strip()]
        allowed = MYSQL_VARIANTS if known.engine == "mysql" else VARIANTS
        unknown = [v for v in known.variants if v not in allowed]
        if unknown or not known.variants:
            parser.error(f"--only: unknown {', '.join(unknown) or 'empty list'}; choose from {', '.join(allowed)}")
        if known.rounds < 1 or known.seconds < 1 or known.warmup < 0 or known.pool_size < 1:
            parser.error("--rounds, --seconds and --pool-size: at least 1; --warmup: at least 0")
        if known.engine == "tds":
            targets = [t.strip() for t in (known.targets or ",".join(TDS_TARGETS)).split(",") if t.strip()]
            bad = [t for t in targets if t not in TDS_ALL_TARGETS]
            if bad or "multiproxy" not in targets or "direct" not in targets:
                parser.error(f"--targets: choose from {', '.join(TDS_ALL_TARGETS)}, with multiproxy and direct")
            known.targets = tuple(t for t in TDS_ALL_TARGETS if t in targets)
            return known
        targets = [t.strip() for t in (known.targets or ",".join(MYSQL_TARGETS)).split(",") if t.strip()]
        bad = [t for t in targets if t not in MYSQL_ALL_TARGETS]
        if bad or "multiproxy" not in targets or "relay" not in targets:
            parser.error(f"--targets: choose from {', '.join(MYSQL_ALL_TARGETS)}, with multiproxy and relay")
        known.targets = tuple(t for t in MYSQL_ALL_TARGETS if t in targets)
    return known


IDLE_ENGINES = ("postgres", "mysql", "tds")
IDLE_WARM_CLIENTS = 100     # clients that come and go before the baseline, so that one-time costs are not counted
IDLE_SETTLE_SECONDS = 3.0   # after the last client logged in: the parking sweep parks the last ones (1 to 2 s)
IDLE_CONNECTING_THREADS = 8  # clients log in 8 at a time (PyMySQL waits ~40 ms per login for delayed ACKs)


def rss_kib(pid: int) -> int:
    """The resident set of process `pid` in KiB (VmRSS)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise TargetFailed(f"no VmRSS for pid {pid}")


def raise_open_files(wanted: int) -> int:
    """Raise this process's soft RLIMIT_NOFILE towards `wanted` within its hard limit (processes it starts inherit
    it); returns the soft limit now."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


def idle_clients(pid: int, count: int, connect, query, processes: int = 1) -> dict:
    """Open `count` clients with `connect()`, each running `query(conn)` once, and let them idle; the RSS of process
    `pid` before (after IDLE_WARM_CLIENTS came, ran a query and left) and after, and whether every client still runs
    its query afterwards. The clients are closed at the end. `processes` > 1: the clients are held by that many
    forked processes (a driver whose connections take several descriptors each, as FreeTDS's, would pass the hard
    RLIMIT_NOFILE in one)."""
    for _ in range(IDLE_WARM_CLIENTS):
        conn = connect()
        query(conn)
        conn.close()
    time.sleep(IDLE_SETTLE_SECONDS)
    before = rss_kib(pid)
    if processes > 1:
        return _idle_clients_forked(pid, count, connect, query, processes, before)
    from concurrent.futures import ThreadPoolExecutor
    clients = []

    open_one, query_again = _client_steps(connect, query, clients)

    started = time.monotonic()
    try:
        with ThreadPoolExecutor(IDLE_CONNECTING_THREADS) as pool:
            list(pool.map(open_one, range(count)))
        login_seconds = time.monotonic() - started
        time.sleep(IDLE_SETTLE_SECONDS)
        after = rss_kib(pid)
        with ThreadPoolExecutor(IDLE_CONNECTING_THREADS) as pool:
            failures = sum(pool.map(query_again, clients))
        after_queries = rss_kib(pid)
    finally:
        for conn in clients:
            try:
                conn.close()
            except Exception:  # a client the proxy closed: nothing to close
                pass
    return {"before": before, "after": after, "after_queries": after_queries, "failures": failures,
            "login_seconds": login_seconds}


def _client_steps(connect, query, clients):
    """open_one(_): a client logged in, kept in `clients`, its first query run; query_again(conn): 0 when it still
    answers, 1 when not (counted: every client must still answer)."""
    def open_one(_):
        conn = connect()
        clients.append(conn)
        query(conn)

    def query_again(conn):
        try:
            query(conn)
            return 0
        except Exception:  # counted, not raised
            return 1
    return open_one, query_again


def _hold_clients(count, connect, query, ready, go, results) -> None:
    """In a forked process: open `count` clients, say so on `ready`, wait for `go`, query each again, put the
    failures on `results`, close them."""
    from concurrent.futures import ThreadPoolExecutor
    clients = []
    failed = 0

    open_one, query_again = _client_steps(connect, query, clients)
    try:
        with ThreadPoolExecutor(max(1, IDLE_CONNECTING_THREADS // 2)) as pool:
            list(pool.map(open_one, range(count)))
    except Exception as exc:  # the parent reports it
        ready.put(f"failed: {exc}")
        return
    ready.put(len(clients))
    go.wait()
    with ThreadPoolExecutor(max(1, IDLE_CONNECTING_THREADS // 2)) as pool:
        failed = sum(pool.map(query_again, clients))
    results.put(failed)
    for conn in clients:
        try:
            conn.close()
        except Exception:  # a client the proxy closed: nothing to close
            pass


def _idle_clients_forked(pid, count, connect, query, processes, before) -> dict:
    import multiprocessing
    context = multiprocessing.get_context("fork")
    ready, results, go = context.Queue(), context.Queue(), context.Event()
    shares = [count // processes + (1 if i < count % processes else 0) for i in range(processes)]
    children = [context.Process(target=_hold_clients, args=(share, connect, query, ready, go, results))
                for share in shares]
    started = time.monotonic()
    for child in children:
        child.start()
    try:
        answers = [ready.get(timeout=1800) for _ in children]
        problems = [a for a in answers if isinstance(a, str)]
        if problems:
            raise TargetFailed(problems[0])
        login_seconds = time.monotonic() - started
        time.sleep(IDLE_SETTLE_SECONDS)
        after = rss_kib(pid)
        go.set()
        failures = sum(results.get(timeout=600) for _ in children)
        after_queries = rss_kib(pid)
    finally:
        go.set()
        for child in children:
            child.join(60)
            if child.is_alive():
                child.kill()
    return {"before": before, "after": after, "after_queries": after_queries, "failures": failures,
            "login_seconds": login_seconds}


def _idle_row(name: str, count: int, result: dict) -> str:
    grown = result["after"] - result["before"]
    return (f"| {name} | {count} | {result['before'] / 1024:.1f} | {result['after'] / 1024:.1f} | "
            f"{grown / count:.2f} | {(result['after_queries'] - result['before']) / count:.2f} | "
            f"{count / result['login_seconds']:.0f} | {result['failures']} |")


def _idle_proxy(procs, work, engine, backend_port, pool_size, listener_extra="", users=None):
    if users is not None:
        with open(os.path.join(work, "users.toml"), "w") as f:
            f.write(users.dumps())
    proc, port, _ = _start_proxy(procs, work, engine, backend_port, pool_size, listener_extra)
    return proc, port


def idle_bench(count: int, engines, pool_size: int, keep: bool, markdown: str | None) -> None:
    """Proxy memory per idle client: for each engine, `count` real clients log in through multiproxy (one worker), run
    one query and idle; RSS growth over the baseline divided by `count`, and PgBouncer's beside it for PostgreSQL."""
    from multiproxy.auth import UsersFile
    limit = raise_open_files(2 * count + 1000)
    if limit < count + 200:
        raise SystemExit(f"RLIMIT_NOFILE allows {limit} open files: {count} idle clients need {count + 200} "
                         "(raise the hard limit, or ask for fewer with --idle)")
    rows = []
    procs = Processes()
    work = tempfile.mkdtemp(prefix="mp-bench-idle-")
    try:
        if "postgres" in engines:
            import psycopg
            pg = PrivatePostgres(1, keep)
            try:
                pg.start()
                ws = Workspace(keep)
                mp = Multiproxy(ws, procs, pg, pool_size, 1)
                port = mp.start()

                def pg_connect(port):
                    return lambda: psycopg.connect(host="127.0.0.1", port=port, user=BENCH_USER, dbname=BENCH_DB,
                                                   autocommit=True)

                def pg_query(conn):
                    assert conn.execute("SELECT 1").fetchone() == (1,)
                print(f"postgres: {count} idle clients through multiproxy", file=sys.stderr)
                rows.append(_idle_row("multiproxy (postgres)", count, idle_clients(mp.pid, count, pg_connect(port),
                                                                                   pg_query)))
                mp.stop()
                # The compiled relay mode: each idle client waits in a relay lane (a simple-protocol query, which
                # the lanes serve whatever the version of the extended-protocol rules).
                mp = Multiproxy(ws, procs, pg, pool_size, 1, relay="compiled")
                port = mp.start()

                def pg_simple_query(conn):
                    with psycopg.RawCursor(conn) as cur:
                        cur.execute("SELECT 1", prepare=False)
                        assert cur.fetchone() == (1,)
                print(f"postgres: {count} idle clients through multiproxy-c", file=sys.stderr)
                rows.append(_idle_row("multiproxy-c (postgres)", count, idle_clients(mp.pid, count, pg_connect(port),
                                                                                     pg_simple_query)))
                mp.stop()
                bouncer = PgBouncer(ws, procs, pg, pool_size)
                bouncer.max_client_conn = count + 200
                try:
                    port = bouncer.start()
                    print(f"postgres: {count} idle clients through PgBouncer", file=sys.stderr)
                    rows.append(_idle_row("PgBouncer", count, idle_clients(bouncer.pid, count, pg_connect(port),
                                                                           pg_query)))
                except TargetFailed as exc:
                    rows.append(f"| PgBouncer | {count} | {exc} | | | | | |")
                bouncer.stop()
                ws.remove()
            finally:
                pg.stop()
        if "mysql" in engines:
            import pymysql
            from multiproxy.lab.mariadb import MariaDBServer
            server = MariaDBServer(settings={"max_connections": 200}).start()
            try:
                server.sql("CREATE DATABASE bench; CREATE USER 'bench'@'%' IDENTIFIED BY 'bench'; "
                           "GRANT ALL ON *.* TO 'bench'@'%';")
                users = UsersFile()
                users.add("bench", "bench", kinds=["mysql_native_password"])
                proc, port = _idle_proxy(procs, work, "mysql", server.port, pool_size,
                                         'auth = "mysql_native_password"\n', users)

                def my_connect():
                    return pymysql.connect(host="127.0.0.1", port=port, user="bench", password="bench",
                                           database="bench", autocommit=True)

                def my_query(conn):
                    with conn.cursor() as cur:
                        cur.execute("SELECT 1")
                        assert cur.fetchone() == (1,)
                print(f"mysql: {count} idle clients through multiproxy", file=sys.stderr)
                try:
                    rows.append(_idle_row("multiproxy (mysql)", count, idle_clients(proc.pid, count, my_connect,
                                                                                    my_query)))
                except Exception as exc:  # the rows measured so far are still printed
                    rows.append(f"| multiproxy (mysql) | {count} | failed: {exc} | | | | | |")
                procs.stop(proc)
            finally:
                server.stop()
        if "tds" in engines:
            import pymssql
            pymssql.set_max_connections(count + IDLE_WARM_CLIENTS + 100)     # FreeTDS's DBPROCESS limit
            lab_port = free_port()
            lab = procs.start([sys.executable, "-m", "multiproxy.lab.tds_server", "--port", str(lab_port), "--user",
                               "bench", "--password", "bench", "--database", "bench", "--db-file",
                               os.path.join(work, "lab.sqlite")], log_path=os.path.join(work, "lab.log"),
                              cwd=REPO_ROOT)
            _wait_port(lab_port, lab, os.path.join(work, "lab.log"))
            users = UsersFile()
            users.add("bench", "bench", kinds=["tds_sha256"])
            proc, port = _idle_proxy(procs, work, "tds", lab_port, pool_size, users=users)

            def tds_connect():
                return pymssql.connect(server="127.0.0.1", port=port, user="bench", password="bench",
                                       database="bench", autocommit=True, tds_version="7.4")

            def tds_query(conn):
                cur = conn.cursor()
                cur.execute("SELECT 1")
                assert cur.fetchone() == (1,)
            print(f"tds: {count} idle clients through multiproxy", file=sys.stderr)
            try:
                # FreeTDS takes 3 descriptors per connection: the clients are spread over processes.
                holders = max(1, -(-3 * count // 12000))
                rows.append(_idle_row("multiproxy (tds)", count, idle_clients(proc.pid, count, tds_connect,
                                                                              tds_query, holders)))
            except Exception as exc:  # the rows measured so far are still printed
                rows.append(f"| multiproxy (tds) | {count} | failed: {exc} | | | | | |")
            procs.stop(proc)
    finally:
        procs.stop_all()
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    lines = [f"Idle clients: {count} clients log in ({IDLE_CONNECTING_THREADS} at a time), run SELECT 1 and idle; RSS of the proxy "
             f"process before them (after {IDLE_WARM_CLIENTS} clients came and went) and {IDLE_SETTLE_SECONDS:g} s "
             "after the last login; per client = growth / clients. After: every client runs SELECT 1 again. "
             f"One worker, pool max_size {pool_size}.", "",
             "| target | idle clients | RSS before (MiB) | RSS idle (MiB) | KiB per idle client | KiB per client after "
             "their next query | logins/s | failed queries |",
             "|---|---:|---:|---:|---:|---:|---:|---:|", *rows, "", machine_line()]
    _emit(lines, markdown)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--idle" in argv or any(a.startswith("--idle=") for a in argv):
        parser = argparse.ArgumentParser(description="proxy memory per idle client (see idle_bench)")
        parser.add_argument("--idle", type=int, required=True, metavar="N", help="idle clients per engine")
        parser.add_argument("--idle-engines", default=",".join(IDLE_ENGINES),
                            help=f"subset of {','.join(IDLE_ENGINES)} (default: all)")
        parser.add_argument("--pool-size", type=int, default=4, help="multiproxy pool max_size (default 4)")
        parser.add_argument("--client-timeouts", action="store_true",
                            help="PostgreSQL: both poolers with client timeouts on (as the steady loads' option)")
        parser.add_argument("--markdown", metavar="FILE")
        parser.add_argument("--keep", action="store_true")
        args = parser.parse_args(argv)
        Multiproxy.client_timeouts = PgBouncer.client_timeouts = args.client_timeouts
        engines = [e.strip() for e in args.idle_engines.split(",") if e.strip()]
        if args.idle < 1 or not engines or any(e not in IDLE_ENGINES for e in engines):
            parser.error(f"--idle: at least 1; --idle-engines: a subset of {','.join(IDLE_ENGINES)}")
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(143))    # the finally blocks stop what started
        return idle_bench(args.idle, engines, args.pool_size, args.keep, args.markdown)
    if "--engine" in argv or any(a.startswith("--engine=") for a in argv):
        # `--engine mysql|tds [--seconds N] [--rounds N] [--only text,ps,ps-over | --ps] ...`: see engine_args
        known = engine_args(argv)
        if known.engine == "postgres":
            argv = [a for a in argv if a not in ("--engine", "postgres", "--engine=postgres")]
        else:
            options = dict(rounds=known.rounds, warmup=known.warmup, variants=known.variants,
                           ps_clients=known.ps_clients, over_clients=known.over_clients)
            if known.engine == "mysql":
                return mysql_bench(known.seconds, known.pool_size, known.keep, known.markdown, targets=known.targets,
                                   **options)
            return tds_bench(known.seconds, known.pool_size, known.clients, known.keep, known.markdown,
                             targets=known.targets, **options)
    args = parse_args(argv)
    if not shutil.which("pgbench") or not shutil.which("psql"):
        raise SystemExit("pgbench and psql must be on PATH")

    def on_sigterm(signum, frame):
        raise KeyboardInterrupt

    # Explicit, since a shell starting us in the background leaves SIGINT ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, on_sigterm)
    procs = Processes()
    if args.auth == "scram":
        os.environ["PGPASSWORD"] = BENCH_PASSWORD     # pgbench, psql and pg_storm; the server itself trusts
    pgbench_loads = [load for load in args.loads if LOADS[load] is not None]
    storm = None
    ws = Workspace(args.keep)
    rows = {}
    pg = PrivatePostgres(args.scale, args.keep, auth=args.auth)
    try:
        pg.start()
        bouncer = PgBouncer(ws, procs, pg, args.pool_size, args.auth)
        makers = {
            "direct": lambda: Direct(pg),
            "multiproxy": lambda: Multiproxy(ws, procs, pg, args.pool_size, args.workers, args.auth),
            "multiproxy-c": lambda: Multiproxy(ws, procs, pg, args.pool_size, args.workers, args.auth,
                                               relay="compiled"),
            "pgbouncer": lambda: bouncer,
            "relay": lambda: Relay(ws, procs, pg),
            "floor": lambda: FloorPooler(ws, procs, pg, args.pool_size),
            "floor-c": lambda: FloorPooler(ws, procs, pg, args.pool_size, relay="c"),
            "floor-c-thread": lambda: FloorPooler(ws, procs, pg, args.pool_size, relay="c-thread"),
        }
        started = {}
        for name in args.targets if pgbench_loads else ():
            target = makers[name]()
            try:
                started[name] = (target, target.start())
            except TargetFailed as exc:
                note = "not installed" if str(exc) == "not installed" else "failed to start"
                print(f"{name}: {exc}", file=sys.stderr)
                for load in pgbench_loads:
                    rows[(name, load)] = (None, None, note, None)
                target.stop()
        # Every round runs each target back to back, so a slow spell of the machine hits all of them.
        samples: dict = {}
        for round_number in range(args.rounds):
            for load in pgbench_loads:
                for name, (target, port) in started.items():
                    print(f"round {round_number + 1}/{args.rounds}: {name} / {load}: warm-up {WARMUP_SECONDS}s, "
                          f"run {args.seconds}s", file=sys.stderr)
                    try:
                        samples.setdefault((name, load), []).append(measure(target, port, load, args.seconds,
                                                                            args.protocol))
                    except TargetFailed as exc:
                        print(f"  {name} / {load}: {exc}", file=sys.stderr)
                        samples.setdefault((name, load), []).append((None, None))
        for (name, load), runs in samples.items():
            rows[(name, load)] = _summary(runs, samples.get(("pgbouncer", load)))
        for target, _ in started.values():
            target.stop()
        if "storm" in args.loads:
            storm = storm_bench(args, procs)
        notes = machine_notes(pg, bouncer)
    except KeyboardInterrupt:
        print("interrupted; stopping everything started", file=sys.stderr)
        return 130
    finally:
        procs.stop_all()
        pg.stop()
        ws.remove()

    options = (f"pgbench -S -M {args.protocol}, {args.seconds}s per run after {WARMUP_SECONDS}s warm-up, "
               + (f"median of {args.rounds} interleaved rounds, " if args.rounds > 1 else "")
               + f"scale {args.scale}, pool size {args.pool_size}, client authentication {args.auth}"
               + (f", multiproxy workers {args.workers}" if args.workers else ""))
    explained = ["steady = pgbench -S -c 16 -j 2; connect = the same with -C (a new connection per transaction); "
                 "latency = pgbench -S -c 1 -j 1; transactions = pgbench -c 16 -j 2 with a script of BEGIN, two point "
                 "selects, END (a driver outside autocommit); isolated = the same with BEGIN ISOLATION LEVEL "
                 "REPEATABLE READ (a driver with an isolation level set); tpcb = pgbench -c 16 -j 2 with its default tpcb-like "
                 "script (three UPDATEs, a SELECT and an INSERT in a transaction); updates = pgbench -c 16 -j 2 with a "
                 "script of one UPDATE ... SET in autocommit",
                 "proxy CPU% = CPU of the target's process tree during the measured run (200% = both of 2 cores); "
                 "CPU us/tx = its CPU per transaction (CPU% * 10000 / TPS), median (range) of the rounds"]
    if args.auth == "scram":
        explained.append("scram: multiproxy and PgBouncer verify every client's SCRAM-SHA-256 exchange against the "
                         "server's verifier; the server trusts TCP, so direct, relay and floor do no SCRAM")
    storm_text = []
    if storm is not None:
        header, lines, pool_size = storm
        storm_text = [f"storm: {args.storm_clients} psycopg clients released at once, one query each, each allowed "
                      f"{args.storm_timeout:g} s; server max_connections {args.storm_server_connections}, pool "
                      f"size {pool_size}; medians of {args.rounds} round(s) (served: the fewest, errors: the most)"]
    print()
    if pgbench_loads:
        print(format_table(rows, pgbench_loads))
        print()
    for line in latency_lines(rows):
        print(line)
    if storm is not None:
        print(format_plain(storm[0], storm[1]))
        print()
    print(options)
    for line in explained + storm_text + notes:
        print(line)
    if args.markdown:
        with open(args.markdown, "w") as f:
            if pgbench_loads:
                f.write(format_table(rows, pgbench_loads, markdown=True) + "\n\n")
            f.write("".join(f"{line}\n\n" for line in latency_lines(rows)))
            if storm is not None:
                f.write(format_markdown(storm[0], storm[1]) + "\n\n")
            f.write(options + ".\n\n")
            f.write("".join(f"- {line}\n" for line in explained + storm_text + notes))
        print(f"wrote {args.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
