"""Private MariaDB servers from the installed binaries (mariadb-install-db + mariadbd), on a free loopback port."""
from __future__ import annotations

import atexit
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time

from .postgres import reachable_by
from .processes import children, die_with_parent, free_port

OS_USER = "mysql"            # mariadbd refuses to run as root without --user
INSTALL_HINT = "install the Debian packages 'mariadb-server mariadb-client' (or run tools/install-deps.sh)"


class MariaDBNotInstalled(RuntimeError):
    """mariadbd or mariadb-install-db is missing; the message says which package to install."""


def find_binary(*names: str) -> str:
    for name in names:
        for directory in (os.environ.get("MARIADB_BINDIR", ""), "/usr/sbin", "/usr/bin", "/usr/local/bin"):
            path = os.path.join(directory, name) if directory else ""
            if path and os.access(path, os.X_OK):
                return path
        found = shutil.which(name)
        if found:
            return found
    raise MariaDBNotInstalled(f"{' or '.join(names)} not found: {INSTALL_HINT}")


class MariaDBServer:
    """One private MariaDB in its own temporary directory, listening on 127.0.0.1:<free port>.

    The root user has no password and may connect over TCP from 127.0.0.1 (lab only). `sql()` runs
    statements through the mariadb command-line client.
    """

    host = "127.0.0.1"

    def __init__(self, settings: dict[str, object] | None = None, basedir: str | None = None,
                 keep_datadir: bool = False, die_with_parent: bool = True):
        self.settings = dict(settings or {})
        self.basedir = basedir
        self.keep_datadir = keep_datadir
        self.die_with_parent = die_with_parent
        self.port: int | None = None
        self.datadir = self.socket = self.logfile = None
        self._proc: subprocess.Popen | None = None
        self._as_mysql = os.geteuid() == 0
        self._pw = pwd.getpwnam(OS_USER) if self._as_mysql else None
        self.mariadbd = find_binary("mariadbd", "mysqld")
        self.install_db = find_binary("mariadb-install-db", "mysql_install_db")
        self.client = find_binary("mariadb", "mysql")

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self, timeout: float = 60.0) -> "MariaDBServer":
        if self._proc is not None:
            return self
        atexit.register(self.stop)
        try:
            self._make_dirs()
            user = ["--user=" + OS_USER] if self._as_mysql else []
            out = subprocess.run([self.install_db, "--no-defaults", f"--datadir={self.datadir}", *user,
                                  "--auth-root-authentication-method=normal", "--skip-test-db",
                                  "--skip-name-resolve"], capture_output=True, text=True, timeout=180,
                                 cwd=self.basedir)
            if out.returncode != 0:
                raise RuntimeError(f"mariadb-install-db failed ({out.returncode}):\n{out.stdout}{out.stderr}")
            for _attempt in range(5):
                self.port = free_port(self.host)
                try:
                    self._launch(timeout)
                    return self
                except _PortTaken:
                    continue
            raise RuntimeError("MariaDB could not bind a port after 5 attempts")
        except BaseException:
            self.stop()
            raise

    def _make_dirs(self) -> None:
        if self.basedir is None:
            base = tempfile.gettempdir()
            if self._as_mysql and not reachable_by(base, self._pw):
                base = "/tmp"
            self.basedir = tempfile.mkdtemp(prefix="mp-mariadb-", dir=base)
        os.makedirs(self.basedir, exist_ok=True)
        self.datadir = os.path.join(self.basedir, "data")
        self.socket = os.path.join(self.basedir, "mariadb.sock")
        self.logfile = os.path.join(self.basedir, "mariadb.log")
        os.makedirs(self.datadir, exist_ok=True)
        if self._as_mysql:
            os.chmod(self.basedir, 0o755)
            for path in (self.basedir, self.datadir):
                os.chown(path, self._pw.pw_uid, self._pw.pw_gid)

    def _launch(self, timeout: float) -> None:
        settings = {
            "datadir": self.datadir, "socket": self.socket, "port": self.port, "bind-address": self.host,
            "skip-networking": 0, "skip-name-resolve": 1, "max-connections": 1000, "skip-log-bin": None,
            "innodb-buffer-pool-size": "64M", "innodb-log-file-size": "32M", "innodb-flush-log-at-trx-commit": 0,
            "innodb-doublewrite": 0, "performance-schema": 0, "log-error": self.logfile,
            "pid-file": os.path.join(self.basedir, "mariadb.pid"), "max-allowed-packet": "64M",
            **self.settings,
        }
        argv = [self.mariadbd, "--no-defaults"]
        if self._as_mysql:
            argv.append("--user=" + OS_USER)
        for key, value in settings.items():
            argv.append(f"--{key}" if value is None else f"--{key}={value}")
        preexec = (lambda: die_with_parent(signal.SIGKILL)) if self.die_with_parent else None
        with open(os.path.join(self.basedir, "stdout.log"), "ab") as log:
            self._proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                          cwd=self.basedir, process_group=0, preexec_fn=preexec)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                self._proc = None
                tail = self.log_text()[-3000:]
                if "Address already in use" in tail or "Can't start server: Bind" in tail:
                    raise _PortTaken(tail)
                raise RuntimeError(f"mariadbd exited while starting; log:\n{tail}")
            try:
                if self.sql("SELECT 1", timeout=10) == "1":
                    return
            except (RuntimeError, subprocess.TimeoutExpired):
                pass
            time.sleep(0.2)
        raise RuntimeError(f"mariadbd did not accept connections within {timeout}s; log:\n{self.log_text()[-3000:]}")

    def stop(self, timeout: float = 30.0) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                for pid in [*children(proc.pid), proc.pid]:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                proc.wait()
        atexit.unregister(self.stop)
        if self.basedir and not self.keep_datadir:
            shutil.rmtree(self.basedir, ignore_errors=True)
            self.basedir = None

    def __enter__(self) -> "MariaDBServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log_text(self) -> str:
        try:
            with open(self.logfile, encoding="utf-8", errors="replace") as f:
                return f.read()
        except (OSError, TypeError):
            return ""

    # -- SQL -------------------------------------------------------------------------------------

    def sql(self, statements: str, user: str = "root", password: str = "", database: str = "",
            timeout: float = 60.0) -> str:
        """Run statements with the mariadb client over TCP; rows tab-separated without headers, or RuntimeError."""
        argv = [self.client, "--no-defaults", "-h", self.host, "-P", str(self.port), "-u", user, "-N", "-B",
                "--connect-timeout=5"]
        if password:
            argv.append(f"-p{password}")
        if database:
            argv.append(database)
        out = subprocess.run(argv, input=statements, capture_output=True, text=True, timeout=timeout)
        if out.returncode != 0:
            raise RuntimeError(f"mariadb as {user} failed ({out.returncode}): {out.stderr.strip()}\nSQL: {statements}")
        return out.stdout.strip()


class _PortTaken(RuntimeError):
    pass
