"""Private MariaDB servers from the installed binaries (mariadb-install-db + mariadbd), on a free loopback port."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time

from .processes import ServerProcess

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


REPLICATION_USER, REPLICATION_PASSWORD = "mp_repl", "repl-pw"


class MariaDBServer(ServerProcess):
    """One private MariaDB in its own temporary directory, listening on 127.0.0.1:<free port> (or the given
    host and port).

    The root user has no password and may connect over TCP from loopback (lab only). `sql()` runs
    statements through the mariadb command-line client. `tls` ({"cert", "key", optional "ca"} PEM paths)
    turns on TLS; `server_id` turns on the binary log with GTIDs, for `make_replica`. start() runs
    mariadb-install-db, then mariadbd; stop() sends SIGTERM. The process handling is ServerProcess's.
    """

    product, program, os_user, dir_prefix = "MariaDB", "mariadbd", OS_USER, "mp-mariadb-"
    dir_mode = 0o755
    stop_signal = signal.SIGTERM          # normal shutdown
    parent_death_signal = signal.SIGKILL
    bind_errors = ("Address already in use", "Can't start server: Bind")
    poll_interval = 0.2
    retry_fixed_port = False

    def __init__(self, settings: dict[str, object] | None = None, basedir: str | None = None,
                 keep_datadir: bool = False, die_with_parent: bool = True, host: str | None = None,
                 port: int | None = None, tls: dict[str, str] | None = None, server_id: int | None = None):
        super().__init__(basedir=basedir, keep_datadir=keep_datadir, die_with_parent=die_with_parent,
                         host=host, port=port)
        self.settings = dict(settings or {})
        self.tls = dict(tls or {})
        self.server_id = server_id
        self.socket = self.tmpdir = None
        self.mariadbd = find_binary("mariadbd", "mysqld")
        self.install_db = find_binary("mariadb-install-db", "mysql_install_db")
        self.client = find_binary("mariadb", "mysql")

    # -- lifecycle (start, stop, detach: ServerProcess) ------------------------------------------

    def _init_datadir(self) -> None:
        if os.path.isdir(os.path.join(self.datadir, "mysql")):
            return  # a kept data directory (a node restarted by `lab failover`) is used as it is
        user = ["--user=" + OS_USER] if self._as_os_user else []
        out = subprocess.run([self.install_db, "--no-defaults", f"--datadir={self.datadir}", *user,
                              f"--tmpdir={self.tmpdir}",
                              "--auth-root-authentication-method=normal", "--skip-test-db",
                              "--skip-name-resolve"], capture_output=True, text=True, timeout=180,
                             cwd=self.basedir)
        if out.returncode != 0:
            raise RuntimeError(f"mariadb-install-db failed ({out.returncode}):\n{out.stdout}{out.stderr}")

    def _make_dirs(self) -> None:
        self._make_basedir()
        self.datadir = os.path.join(self.basedir, "data")
        self.socket = os.path.join(self.basedir, "mariadb.sock")
        self.logfile = os.path.join(self.basedir, "mariadb.log")
        self.tmpdir = os.path.join(self.basedir, "tmp")     # private: bootstraps running side by side share no /tmp names
        os.makedirs(self.datadir, exist_ok=True)
        os.makedirs(self.tmpdir, exist_ok=True)
        self._chown(self.datadir, self.tmpdir)
        for kind in ("cert", "key", "ca"):
            if self.tls.get(kind):       # copied, so that mariadbd (running as mysql) may read the key
                path = os.path.join(self.basedir, f"tls-{kind}.pem")
                shutil.copyfile(self.tls[kind], path)
                os.chmod(path, 0o600)
                self._chown(path)
                self.settings[{"cert": "ssl-cert", "key": "ssl-key", "ca": "ssl-ca"}[kind]] = path

    def _command(self) -> list[str]:
        settings = {
            "datadir": self.datadir, "tmpdir": self.tmpdir, "socket": self.socket, "port": self.port, "bind-address": self.host,
            "skip-networking": 0, "skip-name-resolve": 1, "max-connections": 1000, "skip-log-bin": None,
            "innodb-buffer-pool-size": "64M", "innodb-log-file-size": "32M", "innodb-flush-log-at-trx-commit": 0,
            "innodb-doublewrite": 0, "performance-schema": 0, "log-error": self.logfile,
            "pid-file": os.path.join(self.basedir, "mariadb.pid"), "max-allowed-packet": "64M",
        }
        if self.server_id is not None:
            del settings["skip-log-bin"]
            settings.update({"server-id": self.server_id, "log-bin": "mariadb-bin", "binlog-format": "ROW",
                             "log-slave-updates": 1, "gtid-strict-mode": 1})
        settings.update(self.settings)
        argv = [self.mariadbd, "--no-defaults"]
        if self._as_os_user:
            argv.append("--user=" + OS_USER)
        for key, value in settings.items():
            argv.append(f"--{key}" if value is None else f"--{key}={value}")
        return argv

    def _stdout_path(self) -> str:
        return os.path.join(self.basedir, "stdout.log")  # the server's own log is self.logfile (log-error)

    def _ready(self) -> bool:
        try:
            return self.sql("SELECT 1", timeout=10) == "1"
        except (RuntimeError, subprocess.TimeoutExpired):
            return False

    # -- replication -----------------------------------------------------------------------------

    def make_replica(self, host: str | None = None, port: int | None = None, server_id: int | None = None,
                     semi_sync: bool = True, timeout: float = 60.0) -> "MariaDBServer":
        """A new MariaDB replicating from this one by GTID (MASTER_USE_GTID=slave_pos), read_only=ON.

        This server needs a server_id. Call it before creating data here: the replica starts empty and
        replays this server's whole binary log. With `semi_sync`, a commit here returns only once the
        replica has received it (rpl_semi_sync, with a long timeout so it never falls back silently).
        """
        if self.server_id is None:
            raise RuntimeError("make_replica needs a primary started with server_id")
        self.sql(f"CREATE USER IF NOT EXISTS '{REPLICATION_USER}'@'%' IDENTIFIED BY '{REPLICATION_PASSWORD}';"
                 f"GRANT REPLICATION SLAVE, REPLICATION CLIENT ON *.* TO '{REPLICATION_USER}'@'%';")
        replica_settings = {"read-only": 1}
        if semi_sync:
            self.sql("SET GLOBAL rpl_semi_sync_master_timeout = 600000; SET GLOBAL rpl_semi_sync_master_enabled = ON;"
                     "SET GLOBAL rpl_semi_sync_master_wait_point = AFTER_SYNC;")
            replica_settings["rpl-semi-sync-slave-enabled"] = 1
        replica = MariaDBServer(settings=replica_settings, host=host, port=port, tls=self.tls,
                                server_id=server_id if server_id is not None else self.server_id + 1,
                                die_with_parent=self.die_with_parent).start(timeout)
        try:
            replica.sql(f"CHANGE MASTER TO MASTER_HOST='{self.host}', MASTER_PORT={self.port}, "
                        f"MASTER_USER='{REPLICATION_USER}', MASTER_PASSWORD='{REPLICATION_PASSWORD}', "
                        "MASTER_CONNECT_RETRY=1, MASTER_USE_GTID=slave_pos; START SLAVE;")
            replica.wait_caught_up(self, timeout)
        except BaseException:
            replica.stop()
            raise
        return replica

    def wait_caught_up(self, primary: "MariaDBServer", timeout: float = 60.0) -> None:
        """Wait until this replica has applied every transaction `primary` has logged so far."""
        position = primary.sql("SELECT @@gtid_binlog_pos")
        out = self.sql(f"SELECT MASTER_GTID_WAIT('{position}', {timeout:g})", timeout=timeout + 10)
        if out != "0":
            status = self.sql("SHOW SLAVE STATUS\\G")
            raise RuntimeError(f"replica did not reach {position} within {timeout:g}s:\n{status}")

    def promote(self, timeout: float = 60.0) -> None:
        """Make this replica a writable primary: apply every transaction it received (semi-sync acknowledged
        them), stop replicating, forget the primary, read_only=OFF."""
        self.sql("STOP SLAVE IO_THREAD")
        status = self.sql("SHOW SLAVE STATUS\\G")
        received = next((line.split(":", 1)[1].strip() for line in status.splitlines()
                         if line.strip().startswith("Gtid_IO_Pos:")), "")
        if received:
            self.sql(f"SELECT MASTER_GTID_WAIT('{received}', {timeout:g})", timeout=timeout + 10)
        self.sql("STOP SLAVE; RESET SLAVE ALL; SET GLOBAL read_only = OFF;")

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


# -- bringing a former primary back as a replica --------------------------------------------------

def gtid_state(text: str) -> dict[tuple[int, int], int]:
    """@@gtid_binlog_state ("0-1-120,0-2-200": the last GTID per domain and server_id) as
    {(domain, server_id): seq_no}."""
    state = {}
    for gtid in filter(None, (part.strip() for part in text.split(","))):
        domain, server_id, seq_no = (int(x) for x in gtid.split("-"))
        state[(domain, server_id)] = seq_no
    return state


def unknown_to(node_state: str, writer_state: str) -> list[str]:
    """The GTIDs that end `node_state` (a stopped former primary's @@gtid_binlog_state) and that the writer
    with `writer_state` never logged; [] when the node's history is a prefix of the writer's.

    With gtid_strict_mode, sequence numbers only grow, and the writer logs every transaction it replicated
    (log_slave_updates); so the node holds a transaction the writer lacks exactly when, for some
    (domain, server_id), its last sequence number is beyond the writer's last one.
    """
    writer = gtid_state(writer_state)
    return [f"{d}-{s}-{n}" for (d, s), n in sorted(gtid_state(node_state).items()) if n > writer.get((d, s), 0)]


def binlogs_complete(host: str, port: int, timeout: float = 30.0) -> bool:
    """True when the server's first binary log starts the history (its Gtid_list event is empty): nothing was
    purged, so a replica can replay every transaction from GTID position ''."""
    def sql(statements: str) -> str:
        return _root_sql(host, port, statements, timeout)

    logs = sql("SHOW BINARY LOGS").splitlines()
    if not logs:
        return False
    first = logs[0].split("\t")[0]
    for row in sql(f"SHOW BINLOG EVENTS IN '{first}' LIMIT 4").splitlines():
        fields = row.split("\t")
        if len(fields) >= 6 and fields[2] == "Gtid_list":
            return fields[5].strip() == "[]"
    return False


def replica_of(writer_host: str, writer_port: int, repl_user: str, repl_password: str, *, server_id: int,
               basedir: str, host: str, port: int, timeout: float = 60.0) -> tuple[MariaDBServer, str]:
    """Bring the stopped former primary in `basedir` back on host:port as a read_only GTID replica of the
    writer at writer_host:writer_port. Returns the running server (not detached) and how it rejoined.

    It restarts on its own data (read_only, --skip-slave-start) and compares its @@gtid_binlog_state with the
    writer's. If its history is a prefix of the writer's, it resumes from its own @@gtid_binlog_pos. If it
    holds transactions the writer never got (asynchronous replication: commits that had not left it when it
    stopped), those would stay on it and break replication, so its data directory is wiped and re-seeded:
    a fresh mariadb-install-db, then GTID replication from position '' replays the writer's whole binary log.
    That is how the lab built the replica in the first place; it is exact by GTID and needs no dump tool,
    and it is only done after checking that the writer's binary logs still start the history (the lab never
    purges them). A resume that the writer refuses anyway (a replication error) falls back to the re-seed.
    """
    def start() -> MariaDBServer:
        return MariaDBServer(settings={"read-only": 1, "skip-slave-start": None}, basedir=basedir,
                             keep_datadir=True, die_with_parent=False, host=host, port=port,
                             server_id=server_id).start(timeout)

    def writer_sql(statements: str) -> str:
        return _root_sql(writer_host, writer_port, statements, timeout)

    def reseed(server: MariaDBServer | None) -> MariaDBServer:
        if not binlogs_complete(writer_host, writer_port):
            raise RuntimeError(f"cannot re-seed from {writer_host}:{writer_port}: its binary logs no longer start "
                               "at the beginning of the history (purged); start a fresh lab")
        if server is not None:
            server.stop()
        shutil.rmtree(os.path.join(basedir, "data"), ignore_errors=True)
        return start()

    def follow(server: MariaDBServer, position: str) -> str:
        """Replicate from the writer starting after `position`; '' when caught up, else what went wrong."""
        server.sql("STOP SLAVE; RESET SLAVE ALL;"
                   f"SET GLOBAL gtid_slave_pos = '{position}';"
                   f"CHANGE MASTER TO MASTER_HOST='{writer_host}', MASTER_PORT={writer_port}, "
                   f"MASTER_USER='{repl_user}', MASTER_PASSWORD='{repl_password}', "
                   "MASTER_CONNECT_RETRY=1, MASTER_USE_GTID=slave_pos; START SLAVE;")
        target = writer_sql("SELECT @@gtid_binlog_pos")
        deadline = time.monotonic() + timeout
        while True:
            if server.sql(f"SELECT MASTER_GTID_WAIT('{target}', 1)", timeout=15) == "0":
                return ""
            status = _slave_status(server.sql("SHOW SLAVE STATUS\\G"))
            for kind in ("IO", "SQL"):
                if status.get(f"Last_{kind}_Errno", "0") != "0":
                    return f"{kind} thread: {status.get(f'Last_{kind}_Error')}"
            if time.monotonic() > deadline:
                return f"not at {target} after {timeout:g} s (at {status.get('Gtid_Slave_Pos', '?')})"

    server = None
    try:
        try:
            server = start()
        except RuntimeError as exc:  # e.g. a data directory damaged by a SIGKILL: start over from the writer
            why = f"it did not start on its own data ({str(exc).strip().splitlines()[0]})"
        else:
            extra = unknown_to(server.sql("SELECT @@gtid_binlog_state"), writer_sql("SELECT @@gtid_binlog_state"))
            if extra:
                why = f"it holds {', '.join(extra)}, which the writer never got"
            else:
                position = server.sql("SELECT @@gtid_binlog_pos")
                problem = follow(server, position)
                if not problem:
                    return server, f"resumed after GTID {position or '(none)'}"
                why = f"resuming after GTID {position} failed ({problem})"
        server = reseed(server)
        problem = follow(server, "")
        if problem:
            raise RuntimeError(f"the re-seeded replica on {host}:{port} does not follow {writer_host}:{writer_port}: "
                               f"{problem}; see {server.logfile}")
        return server, f"re-seeded from the writer's binary logs, as {why}"
    except BaseException:
        if server is not None:
            server.stop()
        raise


def _slave_status(text: str) -> dict[str, str]:
    """SHOW SLAVE STATUS\\G as {field: value}."""
    fields = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key.strip()] = value.strip()
    return fields


def _root_sql(host: str, port: int, statements: str, timeout: float) -> str:
    out = subprocess.run([find_binary("mariadb", "mysql"), "--no-defaults", "-h", host, "-P", str(port), "-u", "root",
                          "-N", "-B", "--connect-timeout=5"], input=statements, capture_output=True, text=True,
                         timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"mariadb on {host}:{port}: {out.stderr.strip()}")
    return out.stdout.strip()
