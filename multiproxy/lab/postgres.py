"""Private PostgreSQL servers from the installed binaries: primary or streaming standby, on a free loopback port."""
from __future__ import annotations

import glob
import os
import re
import shutil
import signal
import socket
import subprocess
import time

from .processes import ServerProcess, reachable_by

# The superuser initdb creates; fixed so that nothing depends on who runs the server.
SUPERUSER = "postgres"
# The OS user PostgreSQL runs as when we are root (postgres refuses to run as root).
OS_USER = "postgres"
DEBIAN_PACKAGE = "postgresql"
INSTALL_HINT = (
    f"install the Debian package '{DEBIAN_PACKAGE}' (apt-get install {DEBIAN_PACKAGE}), "
    "or run tools/install-deps.sh"
)


class PostgresNotInstalled(RuntimeError):
    """The PostgreSQL server binaries are missing; the message says which package to install."""


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
    raise PostgresNotInstalled(f"PostgreSQL server binaries (initdb, postgres) not found: {INSTALL_HINT}")


def psql_query(host: str, port: int, sql: str, db: str = "postgres", user: str = SUPERUSER,
               password: str | None = None, bindir: str | None = None, timeout: float = 60.0) -> str:
    """Run `sql` with psql over TCP (stop on the first error); return the rows unaligned, or raise RuntimeError."""
    env = _client_env()
    if password is not None:
        env["PGPASSWORD"] = password
    psql = os.path.join(bindir, "psql") if bindir else (shutil.which("psql") or os.path.join(find_bindir(), "psql"))
    cmd = [psql, "-X", "-q", "-A", "-t", "-w", "-v", "ON_ERROR_STOP=1",
           "-h", host, "-p", str(port), "-U", user, "-d", db, "-f", "-"]
    out = subprocess.run(cmd, input=sql, capture_output=True, text=True, env=env, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"psql as {user}@{db} failed ({out.returncode}): {out.stderr.strip()}\nSQL: {sql}")
    return out.stdout.strip()


def _client_env() -> dict[str, str]:
    """The environment minus PG* variables and ~/.pgpass, which would make results depend on the machine."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C"
    env["PGPASSFILE"] = os.devnull
    return env


def runs_as_os_user() -> str | None:
    """The OS user servers run as: 'postgres' when we are root, else None (they run as us)."""
    return OS_USER if os.geteuid() == 0 else None


class PostgresServer(ServerProcess):
    """One private PostgreSQL cluster in its own directory, listening on 127.0.0.1:<free port>.

    `basedir` None makes a temporary directory; `keep_datadir` keeps it at stop(). With
    `die_with_parent` the kernel stops the server when the process that started it dies; a server
    meant to outlive its starter (`multiproxy lab up --detach`) passes False and calls detach().
    start() runs initdb (or pg_basebackup from self.primary), then the server; stop() is a fast
    shutdown (SIGINT). The process handling is ServerProcess's.
    """

    product, program, os_user, dir_prefix = "PostgreSQL", "postgres", OS_USER, "mp-pg-"
    stop_signal = signal.SIGINT           # fast shutdown
    parent_death_signal = signal.SIGQUIT  # immediate shutdown: what we want when our parent died
    bind_errors = ("could not bind", "Address already in use")

    def __init__(self, bindir: str | None = None, settings: dict[str, object] | None = None,
                 keep_datadir: bool = False, basedir: str | None = None, die_with_parent: bool = True,
                 host: str | None = None, port: int | None = None):
        super().__init__(basedir=basedir, keep_datadir=keep_datadir, die_with_parent=die_with_parent,
                         host=host, port=port)
        self.bindir = bindir or find_bindir()
        self.settings = dict(settings or {})
        self.sockdir: str | None = None
        self.primary: PostgresServer | None = None  # set on a standby made by make_standby()
        self._hba_extra: list[str] = []

    # -- lifecycle (start, stop, detach: ServerProcess) ----------------------------------------

    def make_standby(self, basedir: str | None = None, settings: dict[str, object] | None = None,
                     keep_datadir: bool | None = None, die_with_parent: bool | None = None,
                     timeout: float = 60.0, host: str | None = None, port: int | None = None) -> "PostgresServer":
        """A streaming standby of this (running) server: pg_basebackup -R, started on its own port."""
        if not self.running:
            raise RuntimeError("make_standby() needs a running primary")
        standby = PostgresServer(
            bindir=self.bindir, settings={**self.settings, **(settings or {})},
            keep_datadir=self.keep_datadir if keep_datadir is None else keep_datadir, basedir=basedir,
            die_with_parent=self.die_with_parent if die_with_parent is None else die_with_parent,
            host=host, port=port)
        standby.primary = self
        standby._hba_extra = list(self._hba_extra)
        return standby.start(timeout)

    def promote(self, timeout: float = 60.0) -> None:
        """Turn this standby into a primary and wait until it accepts writes."""
        done = self.psql(f"SELECT pg_promote(true, {max(1, int(timeout))});", timeout=timeout + 10)
        if done != "t" or self.in_recovery():
            raise RuntimeError(f"promotion did not finish within {timeout}s; log:\n{self.log_text()[-3000:]}")

    def in_recovery(self) -> bool:
        """True on a standby (pg_is_in_recovery())."""
        return self.psql("SELECT pg_is_in_recovery();") == "t"

    def wait_replayed(self, standby: "PostgresServer", timeout: float = 30.0) -> None:
        """Wait until `standby` has replayed everything this primary has written so far."""
        # The insert position, not pg_current_wal_lsn(): with synchronous_commit off, a commit may not be written yet.
        target = self.psql("SELECT pg_current_wal_insert_lsn();")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if standby.psql(f"SELECT pg_last_wal_replay_lsn() >= '{target}'::pg_lsn;") == "t":
                return
            time.sleep(0.05)
        raise RuntimeError(f"standby on port {standby.port} did not replay {target} within {timeout}s")

    # -- SQL and configuration ----------------------------------------------------------------

    def psql(self, sql: str, db: str = "postgres", user: str = SUPERUSER, password: str | None = None,
             timeout: float = 60.0) -> str:
        """Run `sql` through psql over TCP (one statement at a time, stop on error); return unaligned rows."""
        return psql_query(self.host, self.port, sql, db=db, user=user, password=password, bindir=self.bindir,
                          timeout=timeout)

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

    def version(self) -> str:
        """`postgres --version`, e.g. 'postgres (PostgreSQL) 15.8'."""
        out = subprocess.run([os.path.join(self.bindir, "postgres"), "--version"], capture_output=True,
                             text=True, timeout=30)
        return out.stdout.strip()

    # -- internals ------------------------------------------------------------------------------

    def _make_dirs(self) -> None:
        self._make_basedir()
        self.datadir = os.path.join(self.basedir, "data")
        self.sockdir = os.path.join(self.basedir, "sock")
        self.logfile = os.path.join(self.basedir, "postgres.log")  # the postmaster's stderr
        os.makedirs(self.sockdir, exist_ok=True)
        if self._as_os_user:
            self._chown(self.sockdir)
            if not reachable_by(self.basedir, self._pw):
                raise RuntimeError(f"{self.basedir}: the {OS_USER} OS user cannot reach this directory (a parent "
                                   "lacks the x permission for it); choose a directory under /tmp")

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
        path = os.path.join(self.datadir, "postgresql.auto.conf")
        # Keep what others wrote there and we do not set (pg_basebackup -R: primary_conninfo).
        kept = []
        try:
            with open(path, encoding="utf-8") as f:
                for line in f:
                    key = line.split("=", 1)[0].strip()
                    if "=" in line and not line.lstrip().startswith("#") and key not in settings:
                        kept.append(line.rstrip("\n"))
        except FileNotFoundError:
            pass
        lines = ["# written by multiproxy.lab.postgres", *kept]
        for key, value in settings.items():
            if isinstance(value, str):
                value = "'" + value.replace("'", "''") + "'"
            lines.append(f"{key} = {value}")
        # postgresql.auto.conf is read last, so this wins over postgresql.conf.
        self._write_file(path, "\n".join(lines) + "\n")

    def _write_hba(self) -> None:
        lines = ["# written by multiproxy.lab.postgres", *self._hba_extra,
                 "local all all trust",
                 "host all all 127.0.0.0/8 trust",
                 "host replication all 127.0.0.0/8 trust",
                 "local replication all trust"]
        self._write_file(os.path.join(self.datadir, "pg_hba.conf"), "\n".join(lines) + "\n")

    def _write_file(self, path: str, text: str) -> None:
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        self._chown(path)

    def _init_datadir(self) -> None:
        if self.primary is None:
            self._run(["initdb", "-D", self.datadir, "--auth=trust", f"--username={SUPERUSER}",
                       "--encoding=UTF8", "--locale=C", "--no-sync"], timeout=120)
        else:
            # -R writes standby.signal and primary_conninfo; -c fast does not wait for a timed checkpoint.
            self._run(["pg_basebackup", "-D", self.datadir, "-h", self.primary.host,
                       "-p", str(self.primary.port), "-U", SUPERUSER, "-R", "-X", "stream",
                       "-c", "fast", "--no-sync", "-w"], timeout=300)
        self._write_hba()

    def _command(self) -> list[str]:
        self._write_conf()  # the port is in postgresql.auto.conf
        return [os.path.join(self.bindir, "postgres"), "-D", self.datadir]

    def _popen_kwargs(self) -> dict:
        return {"env": self._clean_env(), **self._user_kwargs()}

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
        if not self._as_os_user:
            return {}
        return {"user": self._pw.pw_uid, "group": self._pw.pw_gid, "extra_groups": []}

    def _clean_env(self, as_server: bool = True) -> dict[str, str]:
        """The environment minus PG* variables and ~/.pgpass, which would make results depend on the machine."""
        env = _client_env()
        if as_server and self._as_os_user:
            env["HOME"] = self._pw.pw_dir
        return env


class _Upstream:
    """A running server known by address only (started by another process), to take a base backup from."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port


def standby_of(upstream_host: str, upstream_port: int, hba_lines: list[str] | None = None, timeout: float = 60.0,
               **kwargs) -> PostgresServer:
    """A streaming standby (pg_basebackup -R) of the server at upstream_host:upstream_port; kwargs as for
    PostgresServer (host and port: where the standby itself listens).

    With a `basedir` that holds an old cluster (a stopped former primary), its data directory is replaced.
    """
    server = PostgresServer(**kwargs)
    if server.basedir:
        shutil.rmtree(os.path.join(server.basedir, "data"), ignore_errors=True)
    server.primary = _Upstream(upstream_host, upstream_port)
    server._hba_extra = list(hba_lines or [])
    return server.start(timeout)
