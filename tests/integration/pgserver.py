"""Starts and stops a private PostgreSQL server from the installed binaries for integration tests."""
from __future__ import annotations

import atexit
import ctypes
import dataclasses
import glob
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time

# The superuser initdb creates; fixed so that tests never depend on who runs them.
SUPERUSER = "postgres"
# The OS user PostgreSQL runs as when we are root (postgres refuses to run as root).
OS_USER = "postgres"
INSTALL_HINT = (
    "install the Debian package 'postgresql' (apt-get install postgresql), "
    "or run tools/install-deps.sh"
)


@dataclasses.dataclass(frozen=True)
class AuthRole:
    """A login role that authenticates over TCP with one pg_hba method."""

    name: str
    password: str | None
    method: str  # the pg_hba.conf method
    stored_as: str | None  # password_encryption used when the password was set


AUTH_ROLES = (
    AuthRole("mp_scram", "scram-pw", "scram-sha-256", "scram-sha-256"),
    AuthRole("mp_md5", "md5-pw", "md5", "md5"),
    AuthRole("mp_clear", "clear-pw", "password", "scram-sha-256"),
    AuthRole("mp_trust", None, "trust", None),
)
AUTH_DB = "mpdb"


def find_bindir() -> str:
    """Directory holding initdb and postgres: $PG_BINDIR, the highest /usr/lib/postgresql/*/bin, or pg_config's."""
    candidates = []
    if os.environ.get("PG_BINDIR"):
        candidates.append(os.environ["PG_BINDIR"])

    def version(path: str) -> tuple[int, ...]:
        found = re.search(r"/postgresql/([\d.]+)/bin$", path)
        return tuple(int(p) for p in found.group(1).split(".") if p) if found else ()

    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version, reverse=True)
    if shutil.which("pg_config"):
        try:
            out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, timeout=10)
            candidates.append(out.stdout.strip())
        except (OSError, subprocess.SubprocessError):
            pass
    for bindir in candidates:
        if bindir and all(os.access(os.path.join(bindir, b), os.X_OK) for b in ("initdb", "postgres")):
            return bindir
    raise RuntimeError(f"PostgreSQL server binaries (initdb, postgres) not found: {INSTALL_HINT}")


def _die_with_parent(sig: int) -> None:
    """Ask the kernel to send `sig` to this (child) process when the test process dies, however it dies."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, int(sig), 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: atexit remains the only safety net


def _traversable_by_others(path: str) -> bool:
    """True when every ancestor of `path` lets other users in (the postgres OS user must reach its datadir)."""
    path = os.path.abspath(path)
    while True:
        if not os.stat(path).st_mode & 0o001:
            return False
        parent = os.path.dirname(path)
        if parent == path:
            return True
        path = parent


class PostgresServer:
    """One private PostgreSQL cluster in a temporary directory, listening on 127.0.0.1:<free port>."""

    host = "127.0.0.1"

    def __init__(self, bindir: str | None = None, settings: dict[str, object] | None = None,
                 keep_datadir: bool = False):
        self.bindir = bindir or find_bindir()
        self.settings = dict(settings or {})
        self.keep_datadir = keep_datadir
        self.port: int | None = None
        self.basedir: str | None = None
        self.datadir: str | None = None
        self.sockdir: str | None = None
        self.logfile: str | None = None
        self._proc: subprocess.Popen | None = None
        self._hba_extra: list[str] = []
        self._roles_created = False
        self._as_postgres = os.geteuid() == 0
        self._pw = pwd.getpwnam(OS_USER) if self._as_postgres else None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self, timeout: float = 60.0) -> "PostgresServer":
        """initdb, then start the server and wait until it answers queries."""
        if self._proc is not None:
            return self
        atexit.register(self.stop)
        try:
            self._make_dirs()
            self._run(["initdb", "-D", self.datadir, "--auth=trust", f"--username={SUPERUSER}",
                       "--encoding=UTF8", "--locale=C", "--no-sync"], timeout=120)
            self._write_hba()
            last_error = ""
            for _attempt in range(5):  # the free port can be taken between probing and binding
                self.port = _free_port()
                self._write_conf()
                try:
                    self._launch(timeout)
                    return self
                except _PortTaken as exc:
                    last_error = str(exc)
            raise RuntimeError(f"PostgreSQL could not bind a port after 5 attempts: {last_error}")
        except BaseException:
            self.stop()
            raise

    def stop(self, timeout: float = 30.0) -> None:
        """Fast shutdown (SIGINT); SIGKILL the whole process group if it lingers; remove the datadir."""
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    # Each backend calls setsid(), so killing the process group is not enough.
                    for pid in [*_children(proc.pid), proc.pid]:
                        try:
                            os.kill(pid, signal.SIGKILL)
                        except ProcessLookupError:
                            pass
                    proc.wait()
        atexit.unregister(self.stop)
        if self.basedir and not self.keep_datadir:
            shutil.rmtree(self.basedir, ignore_errors=True)
            self.basedir = None

    def __enter__(self) -> "PostgresServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    # -- SQL and configuration ----------------------------------------------------------------

    def psql(self, sql: str, db: str = "postgres", user: str = SUPERUSER, password: str | None = None,
             timeout: float = 60.0) -> str:
        """Run `sql` through psql over TCP (one statement at a time, stop on error); return unaligned rows."""
        env = self._clean_env(as_server=False)
        if password is not None:
            env["PGPASSWORD"] = password
        cmd = [os.path.join(self.bindir, "psql"), "-X", "-q", "-A", "-t", "-w", "-v", "ON_ERROR_STOP=1",
               "-h", self.host, "-p", str(self.port), "-U", user, "-d", db, "-f", "-"]
        out = subprocess.run(cmd, input=sql, capture_output=True, text=True, env=env, timeout=timeout)
        if out.returncode != 0:
            raise RuntimeError(f"psql as {user}@{db} failed ({out.returncode}): {out.stderr.strip()}\nSQL: {sql}")
        return out.stdout.strip()

    def add_hba_lines(self, lines: list[str] | str) -> None:
        """Put pg_hba.conf lines before the catch-all trust lines (first match wins) and reload."""
        if isinstance(lines, str):
            lines = lines.splitlines()
        self._hba_extra += [line for line in lines if line.strip()]
        self._write_hba()
        if self.running:
            self.reload()

    def reload(self) -> None:
        """Re-read postgresql.conf and pg_hba.conf, and fail loudly when pg_hba.conf has an error."""
        result = self.psql("SELECT pg_reload_conf();")
        if result != "t":
            raise RuntimeError(f"pg_reload_conf() returned {result!r}")
        errors = self.psql("SELECT line_number || ': ' || error FROM pg_hba_file_rules WHERE error IS NOT NULL;")
        if errors:
            raise RuntimeError(f"pg_hba.conf has errors: {errors}")

    def create_auth_roles(self) -> None:
        """Create AUTH_ROLES and database AUTH_DB, and route each role to its auth method in pg_hba.conf."""
        if self._roles_created:
            return
        for role in AUTH_ROLES:
            setup = f"SET password_encryption = '{role.stored_as}';\n" if role.stored_as else ""
            password = f" PASSWORD '{role.password}'" if role.password is not None else ""
            self.psql(f"{setup}CREATE ROLE {role.name} LOGIN NOCREATEDB NOSUPERUSER{password};")
        owner = next(r.name for r in AUTH_ROLES if r.method == "trust")
        names = ", ".join(r.name for r in AUTH_ROLES)
        self.psql(f"CREATE DATABASE {AUTH_DB} OWNER {owner};")
        self.psql(f"GRANT ALL ON DATABASE {AUTH_DB} TO {names};")
        self.psql(f"GRANT ALL ON SCHEMA public TO {names};", db=AUTH_DB)
        self.add_hba_lines([f"host all {r.name} 127.0.0.1/32 {r.method}" for r in AUTH_ROLES])
        self._roles_created = True

    def log_text(self) -> str:
        """The server's log so far (stderr of the postmaster)."""
        try:
            with open(self.logfile, encoding="utf-8", errors="replace") as f:
                return f.read()
        except (OSError, TypeError):
            return ""

    # -- internals ------------------------------------------------------------------------------

    def _make_dirs(self) -> None:
        base = tempfile.gettempdir()
        if self._as_postgres and not _traversable_by_others(base):
            base = "/tmp"  # e.g. TMPDIR under /root: the postgres user could not reach it
        self.basedir = tempfile.mkdtemp(prefix="mp-pg-", dir=base)
        self.datadir = os.path.join(self.basedir, "data")
        self.sockdir = os.path.join(self.basedir, "sock")
        self.logfile = os.path.join(self.basedir, "postgres.log")
        os.mkdir(self.sockdir)
        if self._as_postgres:
            os.chmod(self.basedir, 0o700)
            for path in (self.basedir, self.sockdir):
                os.chown(path, self._pw.pw_uid, self._pw.pw_gid)

    def _write_conf(self) -> None:
        settings = {
            "port": self.port,
            "listen_addresses": self.host,
            "unix_socket_directories": self.sockdir,
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "max_connections": 200,
            "password_encryption": "scram-sha-256",
            "logging_collector": "off",
            "log_min_messages": "warning",
            **self.settings,
        }
        lines = []
        for key, value in settings.items():
            if isinstance(value, str):
                value = "'" + value.replace("'", "''") + "'"
            lines.append(f"{key} = {value}")
        # postgresql.auto.conf is read last, so this wins over postgresql.conf.
        self._write_file(os.path.join(self.datadir, "postgresql.auto.conf"), "\n".join(lines) + "\n")

    def _write_hba(self) -> None:
        lines = ["# written by tests/integration/pgserver.py", *self._hba_extra,
                 "local all all trust",
                 "host all all 127.0.0.1/32 trust",
                 "host replication all 127.0.0.1/32 trust",
                 "local replication all trust"]
        self._write_file(os.path.join(self.datadir, "pg_hba.conf"), "\n".join(lines) + "\n")

    def _write_file(self, path: str, text: str) -> None:
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        if self._as_postgres:
            os.chown(path, self._pw.pw_uid, self._pw.pw_gid)

    def _launch(self, timeout: float) -> None:
        with open(self.logfile, "ab") as log:
            self._proc = subprocess.Popen(
                [os.path.join(self.bindir, "postgres"), "-D", self.datadir],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                cwd=self.basedir, env=self._clean_env(), process_group=0,  # Ctrl-C stays with pytest
                preexec_fn=lambda: _die_with_parent(signal.SIGQUIT),  # SIGQUIT: immediate shutdown
                **self._user_kwargs())
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                proc, self._proc = self._proc, None
                tail = self.log_text()[-3000:]
                if "could not bind" in tail or "Address already in use" in tail:
                    raise _PortTaken(tail.strip().splitlines()[-1])
                raise RuntimeError(f"postgres exited with {proc.returncode} while starting; log:\n{tail}")
            if self._ready():
                return
            time.sleep(0.1)
        raise RuntimeError(f"postgres did not accept connections within {timeout}s; log:\n{self.log_text()[-3000:]}")

    def _ready(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=1):
                pass
        except OSError:
            return False
        try:
            return self.psql("SELECT 1;", timeout=10) == "1"
        except (RuntimeError, subprocess.TimeoutExpired):
            return False  # e.g. "the database system is starting up"

    def _run(self, argv: list[str], timeout: float) -> None:
        argv = [os.path.join(self.bindir, argv[0]), *argv[1:]]
        out = subprocess.run(argv, capture_output=True, text=True, cwd=self.basedir, env=self._clean_env(),
                             timeout=timeout, **self._user_kwargs())
        if out.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed ({out.returncode}):\n{out.stdout}{out.stderr}")

    def _user_kwargs(self) -> dict:
        if not self._as_postgres:
            return {}
        return {"user": self._pw.pw_uid, "group": self._pw.pw_gid, "extra_groups": []}

    def _clean_env(self, as_server: bool = True) -> dict[str, str]:
        """The environment minus PG* variables and ~/.pgpass, which would make tests depend on the machine."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["LC_ALL"] = "C"
        env["PGPASSFILE"] = os.devnull
        if as_server and self._as_postgres:
            env["HOME"] = self._pw.pw_dir
        return env


class _PortTaken(Exception):
    pass


def _children(pid: int) -> list[int]:
    """Pids whose parent is `pid` (Linux /proc; empty elsewhere)."""
    found = []
    for entry in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(entry, encoding="ascii", errors="replace") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            found.append(int(entry.split("/")[2]))
    return found


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
