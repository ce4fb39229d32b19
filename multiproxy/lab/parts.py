"""The lab's engine parts: each starts its backends, writes its cluster and listeners, and names its URLs."""
from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from urllib.parse import quote, unquote, urlsplit

from . import mariadb, postgres
from .processes import alive, die_with_parent, free_port_on, start_time, stop_process


class LabPartError(RuntimeError):
    """A part could not start; the message says what to do (e.g. which package to install)."""


def toml_string(text: str) -> str:
    """A TOML basic string (JSON's escapes are valid TOML)."""
    return json.dumps(text)


def url(scheme: str, user: str, password: str, host: str, port: int, database: str) -> str:
    return f"{scheme}://{quote(user, safe='')}:{quote(password, safe='')}@{host}:{port}/{quote(database, safe='')}"


class LabPart:
    """One engine's share of the lab. Live objects start and stop backends; the class methods work from
    the saved state alone, so that `lab env`, `lab status` and `lab down` run in another process.

    A part's state (saved in lab.json under engines.<engine>) holds at least:
    cluster, listeners {writer, reader: {name, address}}, nodes [{name, role, host, port, pid, started,
    stop_signal, log}], with the writer node first. A node's role is "writer", "reader", or "stopped"
    (taken down by `lab failover` and not rebuilt; its pid is then None).

    DNS: the lab's DNS server answers `writer.<cluster>.lab` and `reader.<cluster>.lab` from
    `dns_records()`; before `config_toml()` the lab sets `self.dns_nameserver` ("127.0.0.1:PORT") so the
    cluster can follow those endpoints. Nodes should listen on their own loopback address (127.0.0.x)
    with one shared port, as a cluster's endpoints name hosts and not ports.

    Failover (`lab failover ENGINE`): a part that sets `supports_failover` provides `connect_client`,
    `failover_sql`, `promote` and, optionally, `rebuild_as_reader`; the lab does the rest (write loop,
    stopping the writer with its stop_signal, repointing DNS, measuring the outage).
    """

    engine = ""  # the engine name in multiproxy's config (`multiproxy engines`)
    title = ""  # for people: "PostgreSQL"
    cluster = ""  # the cluster name in the generated config
    env_prefix = ""  # MULTIPROXY_<prefix>_URL
    url_scheme = ""
    debian_package = ""
    verifier_kinds: tuple[str, ...] = ()  # the users file verifiers the lab user needs on this part's listeners
    client_tool, client_package = "", ""  # the interactive client of client_command() and its Debian package
    supports_failover = False
    # The failover write loop: create its table if missing; insert one row (%s: an integer id); list the ids
    # between two bounds (id > %s AND id <= %s: the ids of one run).
    failover_sql = ("", "", "")
    reader_follows = "follows"  # after a rebuild: "<old writer> now <reader_follows> <new writer>"
    # The generated config (config_toml): the listeners' client authentication ("": the listener's default)
    # and the comment above the cluster's tables.
    client_auth = ""
    config_comment = ""

    def __init__(self, data_dir: str, user: str, password: str, database: str, detach: bool):
        self.data_dir, self.user, self.password, self.database = data_dir, user, password, database
        self.detach = detach
        self.dns_nameserver: str | None = None  # set by the lab before config_toml()

    def check_installed(self) -> None:
        raise NotImplementedError

    def start(self, progress) -> None:
        """Start the backends; `progress(label)` returns a context manager that prints one progress line."""
        raise NotImplementedError

    def stop(self) -> None:
        """Stop what this object started (foreground lab, or a failed start)."""
        raise NotImplementedError

    def detach_processes(self) -> None:
        """Let the backends outlive this process (lab up --detach)."""

    def state(self) -> dict:
        raise NotImplementedError

    def port(self) -> int:
        """The port every node of the cluster listens on (each on its own loopback address); once started."""
        raise NotImplementedError

    def config_toml(self, writer_listen: str, reader_listen: str, password_file: str) -> str:
        """This part's [clusters.*] and [[listeners]] tables; paths relative to the config's directory."""
        return cluster_toml(engine=self.engine, cluster=self.cluster, endpoints=self.endpoint_names(), port=self.port(),
                            nameserver=self.dns_nameserver or "", user=self.user, password_file=password_file,
                            writer_listen=writer_listen, reader_listen=reader_listen, auth=self.client_auth,
                            comment=self.config_comment)

    # -- from saved state ------------------------------------------------------------------------

    @classmethod
    def urls(cls, state: dict, lab: dict) -> dict[str, str]:
        """MULTIPROXY_<P>_URL (writer listener), _READER_URL, _DIRECT_URL (the writer backend itself)."""
        def make(address: str) -> str:
            host, _, port = address.rpartition(":")
            return url(cls.url_scheme, lab["user"], lab["password"], host, int(port), lab["database"])
        writer_node = next(n for n in state["nodes"] if n["role"] == "writer")
        return {
            f"MULTIPROXY_{cls.env_prefix}_URL": make(state["listeners"]["writer"]["address"]),
            f"MULTIPROXY_{cls.env_prefix}_READER_URL": make(state["listeners"]["reader"]["address"]),
            f"MULTIPROXY_{cls.env_prefix}_DIRECT_URL": make(f"{writer_node['host']}:{writer_node['port']}"),
        }

    @classmethod
    def client_env(cls, state: dict, lab: dict) -> dict[str, str]:
        """Variables the engine's own client tools read (PGHOST...), for the writer listener."""
        return {}

    @classmethod
    def endpoint_names(cls) -> dict[str, str]:
        """The DNS names of the cluster's writer and reader endpoints in the lab's zone."""
        return {"writer": f"writer.{cls.cluster}.lab", "reader": f"reader.{cls.cluster}.lab"}

    @classmethod
    def dns_records(cls, state: dict) -> dict[str, dict]:
        """Zone records from the nodes' roles: writer -> the writer's address; reader -> the readers'
        addresses, or the writer's when no reader is left (as a cluster's reader endpoint does)."""
        writers = [n["host"] for n in state["nodes"] if n["role"] == "writer"]
        readers = [n["host"] for n in state["nodes"] if n["role"] == "reader"] or writers
        names = cls.endpoint_names()
        return {names["writer"]: {"A": writers}, names["reader"]: {"A": readers}}

    # -- failover, from saved state ------------------------------------------------------------

    @classmethod
    def connect_client(cls, address: str, lab: dict):
        """A DB-API connection in autocommit to `address` as the lab user (for the failover write loop)."""
        raise NotImplementedError

    @classmethod
    def stop_how(cls, node: dict) -> str:
        """How stop_writer stops `node`, for the progress line."""
        return node.get("stop_signal", "SIGTERM")

    @classmethod
    def stop_writer(cls, node: dict, timeout: float) -> None:
        """Stop the writer `node` cleanly (its stop_signal; SIGKILL after `timeout` s)."""
        stop_process(node["pid"], node.get("started"), first=getattr(signal, node.get("stop_signal", "SIGTERM")),
                     timeout=timeout)

    @classmethod
    def promote(cls, node: dict, state: dict, lab: dict) -> None:
        """Make the reader `node` the writer and return once it accepts writes."""
        raise NotImplementedError

    @classmethod
    def rebuild_as_reader(cls, node: dict, writer: dict, state: dict, lab: dict) -> dict:
        """Turn the stopped former writer `node` into a reader of `writer`, running detached; return the node
        dict (role "reader", new pid and started). NotImplementedError: the part cannot, the node stays stopped."""
        raise NotImplementedError

    @classmethod
    def client_command(cls, connection_url: str) -> str:
        """A shell command line that opens an interactive client on `connection_url`."""
        raise NotImplementedError

    @classmethod
    def verify_role(cls, node: dict, lab: dict) -> tuple[str, str]:
        """Ask the node itself: ("writer" | "reader" | "unreachable", detail)."""
        raise NotImplementedError

    @classmethod
    def check_query(cls, address: str, lab: dict) -> str:
        """Run a trivial query through `address` (host:port) as the lab user; return the answer."""
        raise NotImplementedError


class PostgresPart(LabPart):
    """A PostgreSQL primary and a streaming standby, the `lab` role and database, cluster `pg`."""

    engine = "postgres"
    title = "PostgreSQL"
    cluster = "pg"
    env_prefix = "PG"
    url_scheme = "postgresql"
    debian_package = postgres.DEBIAN_PACKAGE
    verifier_kinds = ("scram_sha_256",)
    client_tool, client_package = "psql", "postgresql-client"

    reader_follows = "streams from"
    client_auth = "scram-sha-256"
    config_comment = ("# PostgreSQL: a primary and a streaming standby, each on its own loopback address, found through the\n"
                      "# cluster's writer and reader endpoints (DNS names the lab's DNS server answers, TTL 5 s). The probes\n"
                      "# (pg_is_in_recovery()) decide who the writer is; `multiproxy lab failover postgres` moves it.")
    supports_failover = True
    failover_sql = ("CREATE TABLE IF NOT EXISTS lab_failover (id bigint PRIMARY KEY, at timestamptz DEFAULT now())",
                    "INSERT INTO lab_failover (id) VALUES (%s) ON CONFLICT DO NOTHING",
                    "SELECT id FROM lab_failover WHERE id > %s AND id <= %s")
    # Each node on its own loopback address with one shared port, as behind a cluster's DNS endpoints.
    NODE_HOSTS = ("127.0.0.2", "127.0.0.3")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.bindir: str | None = None
        self.primary: postgres.PostgresServer | None = None
        self.standby: postgres.PostgresServer | None = None
        self._detached: dict[str, tuple[int, int | None]] = {}

    def check_installed(self) -> None:
        try:
            self.bindir = postgres.find_bindir()
        except postgres.PostgresNotInstalled as exc:
            raise LabPartError(str(exc)) from None
        for tool in ("pg_basebackup", "psql"):
            if not os.access(os.path.join(self.bindir, tool), os.X_OK) and not shutil.which(tool):
                raise LabPartError(f"{tool} not found: {postgres.INSTALL_HINT}")

    @classmethod
    def hba_lines(cls, user: str) -> list[str]:
        # The lab role logs in with SCRAM; the superuser stays trusted on loopback for the lab's own tools.
        return [f"host all {user} 127.0.0.0/8 scram-sha-256"]

    def start(self, progress) -> None:
        keep = {"keep_datadir": True, "die_with_parent": not self.detach}
        port = free_port_on(*self.NODE_HOSTS)
        with progress("PostgreSQL primary (initdb, start)") as step:
            self.primary = postgres.PostgresServer(bindir=self.bindir, basedir=os.path.join(self.data_dir, "pg1"),
                                                   host=self.NODE_HOSTS[0], port=port, **keep)
            self.primary.start()
            self.primary.add_hba_lines(self.hba_lines(self.user))
            self.primary.psql(f"SET password_encryption = 'scram-sha-256';\n"
                              f"CREATE ROLE {self.user} LOGIN PASSWORD '{self.password}';")
            self.primary.psql(f"CREATE DATABASE {self.database} OWNER {self.user};")
            step.done(f"{self.primary.host}:{self.primary.port}")
        with progress("PostgreSQL standby (pg_basebackup, streaming)") as step:
            self.standby = self.primary.make_standby(basedir=os.path.join(self.data_dir, "pg2"),
                                                     host=self.NODE_HOSTS[1], port=port, **keep)
            if not self.standby.in_recovery():
                raise LabPartError("the standby started but is not in recovery")
            step.done(f"{self.standby.host}:{self.standby.port}")

    def stop(self) -> None:
        for server in (self.standby, self.primary):
            if server is not None:
                server.stop()

    def detach_processes(self) -> None:
        for name, server in (("pg1", self.primary), ("pg2", self.standby)):
            self._detached[name] = server.detach()

    def _node(self, name: str, role: str, server: postgres.PostgresServer) -> dict:
        pid, started = self._detached.get(name) or (server.pid, None)
        if started is None and pid is not None:
            started = start_time(pid)
        return {"name": name, "role": role, "host": server.host, "port": server.port, "pid": pid,
                "started": started, "stop_signal": "SIGINT", "log": server.logfile, "basedir": server.basedir}

    def state(self) -> dict:
        nodes = []
        if self.primary is not None:
            nodes.append(self._node("pg1", "writer", self.primary))
        if self.standby is not None:
            nodes.append(self._node("pg2", "reader", self.standby))
        return {"cluster": self.cluster, "nodes": nodes, "bindir": self.bindir}

    def port(self) -> int:
        return self.primary.port

    # -- failover ---------------------------------------------------------------------------------

    @classmethod
    def connect_client(cls, address: str, lab: dict):
        host, _, port = address.rpartition(":")
        args = dict(host=host, port=int(port), user=lab["user"], password=lab["password"], dbname=lab["database"])
        try:
            import psycopg
        except ImportError:
            psycopg = None
        if psycopg is not None:
            return psycopg.connect(**args, autocommit=True, connect_timeout=10)
        try:
            import pg8000.dbapi
        except ImportError:
            raise LabPartError("the failover write loop needs a PostgreSQL driver: pip install 'psycopg[binary]' "
                               "(or pg8000), or pip install -e '.[test]'") from None
        conn = pg8000.dbapi.connect(host=args["host"], port=args["port"], user=args["user"],
                                    password=args["password"], database=args["dbname"], timeout=30)
        conn.autocommit = True
        return conn

    @classmethod
    def promote(cls, node: dict, state: dict, lab: dict) -> None:
        answer = postgres.psql_query(node["host"], node["port"], "SELECT pg_promote(true, 60);",
                                     bindir=state.get("bindir"), timeout=70)
        if answer != "t":
            raise LabPartError(f"pg_promote() on {node['host']}:{node['port']} returned {answer!r}")

    @classmethod
    def rebuild_as_reader(cls, node: dict, writer: dict, state: dict, lab: dict) -> dict:
        server = postgres.standby_of(writer["host"], writer["port"], hba_lines=cls.hba_lines(lab["user"]),
                                     bindir=state.get("bindir"), basedir=node["basedir"], host=node["host"],
                                     port=node["port"], keep_datadir=True, die_with_parent=False)
        pid, started = server.detach()
        return {**node, "role": "reader", "pid": pid, "started": started, "log": server.logfile}

    @classmethod
    def client_env(cls, state: dict, lab: dict) -> dict[str, str]:
        host, _, port = state["listeners"]["writer"]["address"].rpartition(":")
        return {"PGHOST": host, "PGPORT": port, "PGUSER": lab["user"], "PGPASSWORD": lab["password"],
                "PGDATABASE": lab["database"]}

    @classmethod
    def client_command(cls, connection_url: str) -> str:
        return f"psql {shlex.quote(connection_url)}"

    @classmethod
    def verify_role(cls, node: dict, lab: dict) -> tuple[str, str]:
        try:
            answer = cls.check_query(f"{node['host']}:{node['port']}", lab, "SELECT pg_is_in_recovery();")
        except (RuntimeError, OSError) as exc:
            return "unreachable", str(exc).splitlines()[0]
        return ("reader" if answer == "t" else "writer"), f"pg_is_in_recovery() = {answer}"

    @classmethod
    def check_query(cls, address: str, lab: dict, sql: str = "SELECT 1;") -> str:
        host, _, port = address.rpartition(":")
        return postgres.psql_query(host, int(port), sql, db=lab["database"], user=lab["user"],
                                   password=lab["password"], timeout=15)


def _split_url(connection_url: str) -> tuple[str, int, str, str, str]:
    """(host, port, user, password, database) of a lab URL."""
    parts = urlsplit(connection_url)
    return (parts.hostname or "", parts.port or 0, unquote(parts.username or ""), unquote(parts.password or ""),
            unquote(parts.path.lstrip("/")))


def proxy_toml(admin_listen: str, users_file: str, admin_user: str = "lab") -> str:
    """The generated config's [proxy], [admin] and [auth] tables (`admin_user` may use the admin console:
    `psql -d pgbouncer -c 'SHOW POOLS'` on a PostgreSQL listener)."""
    return "\n".join([
        "[proxy]",
        f"admin_listen = {toml_string(admin_listen)}",
        'log_level = "info"',
        "shutdown_timeout = 5.0",
        "",
        "[admin]",
        f"users = [{toml_string(admin_user)}]",
        "",
        "[auth]",
        f"users_file = {toml_string(users_file)}  # verifiers only: see `multiproxy users`",
    ])


def cluster_toml(*, engine: str, cluster: str, endpoints: dict[str, str], port: int, nameserver: str, user: str,
                 password_file: str, writer_listen: str, reader_listen: str, auth: str = "", comment: str = "") -> str:
    """A [clusters.*] table following DNS endpoints (`endpoints`: the writer and reader names, served by
    `nameserver`), and its writer and reader [[listeners]]: the one place the lab's cluster TOML is written."""
    auth_line = f"auth = {toml_string(auth)}\n" if auth else ""
    return f"""
{comment}
[clusters.{cluster}]
engine = {toml_string(engine)}
hosts = []

[clusters.{cluster}.endpoints]
writer = {toml_string(f"{endpoints['writer']}:{port}")}
reader = {toml_string(f"{endpoints['reader']}:{port}")}

[clusters.{cluster}.dns]
nameserver = {toml_string(nameserver)}
ttl_floor = 1.0

[clusters.{cluster}.health]
probe_interval = 1.0
probe_user = {toml_string(user)}

[clusters.{cluster}.backend]
tls = "disable"  # the lab's servers listen on loopback only, without TLS

[clusters.{cluster}.pool]
mode = "transaction"
max_size = 10

[[clusters.{cluster}.credentials]]
user = {toml_string(user)}
password_file = {toml_string(password_file)}

[[listeners]]
name = "{cluster}-writer"
listen = {toml_string(writer_listen)}
cluster = "{cluster}"
role = "writer"
{auth_line}
[[listeners]]
name = "{cluster}-reader"
listen = {toml_string(reader_listen)}
cluster = "{cluster}"
role = "reader"
{auth_line}"""


def _wait_port(host: str, port: int, proc: subprocess.Popen, log: str, timeout: float = 30.0) -> None:
    """Return once host:port accepts connections; RuntimeError when `proc` exits first or time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{log}: the server exited with {proc.returncode}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing listens on {host}:{port} after {timeout:.0f} s; see {log}") from None
            time.sleep(0.05)


class MySQLPart(LabPart):
    """A MariaDB primary and a GTID replica (read_only), the `lab` user (mysql_native_password) and database,
    cluster `my`."""

    engine = "mysql"
    title = "MariaDB"
    cluster = "my"
    env_prefix = "MYSQL"
    url_scheme = "mysql"
    debian_package = "mariadb-server"
    verifier_kinds = ("mysql_native_password", "caching_sha2_password")
    client_tool, client_package = "mariadb", "mariadb-client"

    reader_follows = "replicates (GTID) from"
    client_auth = "mysql_native_password"
    config_comment = ("# MariaDB: a primary and a GTID replica (read_only), each on its own loopback address, found\n"
                      "# through the cluster's endpoints; the probes (@@read_only) decide who the writer is.")
    supports_failover = True
    failover_sql = ("CREATE TABLE IF NOT EXISTS lab_failover (id bigint PRIMARY KEY, "
                    "at timestamp(6) DEFAULT CURRENT_TIMESTAMP(6))",
                    "INSERT IGNORE INTO lab_failover (id) VALUES (%s)",
                    "SELECT id FROM lab_failover WHERE id > %s AND id <= %s")
    NODE_HOSTS = ("127.0.0.4", "127.0.0.5")
    REPLICATION_USER = "lab_repl"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.primary: mariadb.MariaDBServer | None = None
        self.replica: mariadb.MariaDBServer | None = None
        self._detached: dict[str, tuple[int, int | None]] = {}

    def check_installed(self) -> None:
        for names in (("mariadbd", "mysqld"), ("mariadb-install-db", "mysql_install_db"), ("mariadb", "mysql")):
            try:
                mariadb.find_binary(*names)
            except mariadb.MariaDBNotInstalled:
                raise LabPartError(f"{names[0]} not found: install the Debian package '{self.debian_package}' "
                                   "(apt-get install mariadb-server mariadb-client), or leave it out with "
                                   "--engines postgres,tds") from None

    def _server(self, name: str, host: str, port: int, server_id: int, settings: dict) -> mariadb.MariaDBServer:
        return mariadb.MariaDBServer(settings=settings, basedir=os.path.join(self.data_dir, name), keep_datadir=True,
                                     die_with_parent=not self.detach, host=host, port=port, server_id=server_id)

    def start(self, progress) -> None:
        port = free_port_on(*self.NODE_HOSTS)
        with progress("MariaDB primary (install, start)") as step:
            self.primary = self._server("my1", self.NODE_HOSTS[0], port, 1, {}).start()
            self.primary.sql(f"CREATE USER '{self.REPLICATION_USER}'@'%' IDENTIFIED BY '{self.password}';"
                             f"GRANT REPLICATION SLAVE, REPLICATION CLIENT ON *.* TO '{self.REPLICATION_USER}'@'%';")
            step.done(f"{self.primary.host}:{self.primary.port}")
        with progress("MariaDB replica (GTID replication, read_only)") as step:
            self.replica = self._server("my2", self.NODE_HOSTS[1], port, 2, {"read-only": 1}).start()
            mariadb_sql(self.replica.host, port,
                        f"CHANGE MASTER TO MASTER_HOST='{self.primary.host}', MASTER_PORT={port}, "
                        f"MASTER_USER='{self.REPLICATION_USER}', MASTER_PASSWORD='{self.password}', "
                        "MASTER_CONNECT_RETRY=1, MASTER_USE_GTID=slave_pos; START SLAVE;")
            self.primary.sql(f"CREATE DATABASE {self.database};"
                             f"CREATE USER '{self.user}'@'%' IDENTIFIED VIA mysql_native_password "
                             f"USING PASSWORD('{self.password}');"
                             f"GRANT ALL ON {self.database}.* TO '{self.user}'@'%';"
                             f"GRANT REPLICATION CLIENT, SLAVE MONITOR ON *.* TO '{self.user}'@'%';")
            position = self.primary.sql("SELECT @@gtid_binlog_pos")
            if mariadb_sql(self.replica.host, port, f"SELECT MASTER_GTID_WAIT('{position}', 30)", timeout=40) != "0":
                raise LabPartError(f"the MariaDB replica did not catch up with {position} within 30 s; "
                                   f"see {self.replica.logfile}")
            step.done(f"{self.replica.host}:{self.replica.port}")

    def stop(self) -> None:
        for server in (self.replica, self.primary):
            if server is not None:
                server.stop()

    def detach_processes(self) -> None:
        for name, server in (("my1", self.primary), ("my2", self.replica)):
            self._detached[name] = server.detach()

    def _node(self, name: str, role: str, server: mariadb.MariaDBServer) -> dict:
        pid, started = self._detached.get(name) or (server.pid, None)
        if started is None and pid is not None:
            started = start_time(pid)
        return {"name": name, "role": role, "host": server.host, "port": server.port, "pid": pid,
                "started": started, "stop_signal": "SIGTERM", "log": server.logfile, "basedir": server.basedir,
                "server_id": server.server_id}

    def state(self) -> dict:
        nodes = []
        if self.primary is not None:
            nodes.append(self._node("my1", "writer", self.primary))
        if self.replica is not None:
            nodes.append(self._node("my2", "reader", self.replica))
        return {"cluster": self.cluster, "nodes": nodes}

    def port(self) -> int:
        return self.primary.port

    # -- failover ---------------------------------------------------------------------------------

    @classmethod
    def connect_client(cls, address: str, lab: dict):
        try:
            import pymysql
        except ImportError:
            raise LabPartError("the failover write loop needs PyMySQL: pip install pymysql, "
                               "or pip install -e '.[test]'") from None
        host, _, port = address.rpartition(":")
        return pymysql.connect(host=host, port=int(port), user=lab["user"], password=lab["password"],
                               database=lab["database"], autocommit=True, connect_timeout=10)

    @classmethod
    def promote(cls, node: dict, state: dict, lab: dict) -> None:
        host, port = node["host"], node["port"]
        mariadb_sql(host, port, "STOP SLAVE IO_THREAD")
        received = ""
        for line in mariadb_sql(host, port, "SHOW SLAVE STATUS\\G").splitlines():
            if line.strip().startswith("Gtid_IO_Pos:"):
                received = line.split(":", 1)[1].strip()
        if received:  # apply what the replica received before it forgets its primary
            mariadb_sql(host, port, f"SELECT MASTER_GTID_WAIT('{received}', 30)", timeout=40)
        mariadb_sql(host, port, "STOP SLAVE; RESET SLAVE ALL; SET GLOBAL read_only = OFF;")

    @classmethod
    def stop_how(cls, node: dict) -> str:
        return "SHUTDOWN WAIT FOR ALL SLAVES"

    @classmethod
    def stop_writer(cls, node: dict, timeout: float) -> None:
        """A clean shutdown that first sends the replica every event in the binary log. On SIGTERM MariaDB kills
        its binlog dump threads in no particular order, so a commit already acknowledged to a client may never
        reach the replica; WAIT FOR ALL SLAVES kills them last and ends only once the replicas have it all."""
        try:
            mariadb_sql(node["host"], node["port"], "SHUTDOWN WAIT FOR ALL SLAVES", timeout=timeout)
        except (RuntimeError, OSError, subprocess.TimeoutExpired):
            pass  # the connection may drop as the server goes; the wait below decides
        deadline = time.monotonic() + timeout
        while alive(node["pid"], node.get("started")) and time.monotonic() < deadline:
            time.sleep(0.02)
        super().stop_writer(node, timeout)  # SIGTERM, then SIGKILL, if it still runs

    @classmethod
    def rebuild_as_reader(cls, node: dict, writer: dict, state: dict, lab: dict) -> dict:
        """The stopped former primary rejoins as a read_only GTID replica of `writer`, on its own address and
        port: resumed on its own data when that is a prefix of the writer's history, else wiped and re-seeded
        from the writer's binary logs (mariadb.replica_of says why). The lab's replication is asynchronous (no
        rpl_semi_sync settings), so no semi-sync role moves with it."""
        server_id = node.get("server_id") or int(node["name"].lstrip("my"))  # lab.json of an older lab: my1 -> 1
        server, how = mariadb.replica_of(writer["host"], writer["port"], cls.REPLICATION_USER, lab["password"],
                                         server_id=server_id, basedir=node["basedir"], host=node["host"],
                                         port=node["port"])
        pid, started = server.detach()
        return {**node, "role": "reader", "pid": pid, "started": started, "log": server.logfile,
                "server_id": server_id, "rejoined": how}

    @classmethod
    def client_command(cls, connection_url: str) -> str:
        host, port, user, password, database = _split_url(connection_url)
        return f"mariadb -h {host} -P {port} -u {shlex.quote(user)} {shlex.quote('-p' + password)} {shlex.quote(database)}"

    @classmethod
    def verify_role(cls, node: dict, lab: dict) -> tuple[str, str]:
        try:
            answer = mariadb_sql(node["host"], node["port"], "SELECT @@read_only", timeout=15)
        except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
            return "unreachable", str(exc).splitlines()[0]
        return ("reader" if answer == "1" else "writer"), f"@@read_only = {answer}"

    @classmethod
    def check_query(cls, address: str, lab: dict, sql: str = "SELECT 1") -> str:
        host, _, port = address.rpartition(":")
        return mariadb_sql(host, int(port), sql, user=lab["user"], password=lab["password"],
                           database=lab["database"], timeout=15)


def mariadb_sql(host: str, port: int, statements: str, user: str = "root", password: str = "", database: str = "",
                timeout: float = 30.0) -> str:
    """Statements through the mariadb client (root has no password on loopback in the lab); rows tab-separated."""
    argv = [mariadb.find_binary("mariadb", "mysql"), "--no-defaults", "-h", host, "-P", str(port), "-u", user,
            "-N", "-B", "--connect-timeout=5"]
    env = dict(os.environ)
    if password:
        env["MYSQL_PWD"] = password  # not on the command line
    if database:
        argv.append(database)
    out = subprocess.run(argv, input=statements, capture_output=True, text=True, timeout=timeout, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"mariadb on {host}:{port} as {user}: {out.stderr.strip()}")
    return out.stdout.strip()


class TDSPart(LabPart):
    """Two TDS lab servers on one shared SQLite store (like a cluster on shared storage): a writable writer and
    a reader started with --read-only; the `lab` login and database, cluster `tds`."""

    engine = "tds"
    title = "SQL Server (TDS lab server)"
    cluster = "tds"
    env_prefix = "TDS"
    url_scheme = "mssql"
    debian_package = "freetds-bin"  # for tsql, the client; the servers are part of multiproxy
    verifier_kinds = ("tds_sha256",)
    client_tool, client_package = "tsql", "freetds-bin"

    reader_follows = "serves the shared store read-only beside"
    config_comment = ("# TDS: two lab servers on one SQLite store, the reader started read-only; the probes\n"
                      "# (DATABASEPROPERTYEX(DB_NAME(), 'Updateability')) decide who the writer is. Client\n"
                      "# logins are checked against the users file's tds_sha256 verifiers.")
    supports_failover = True
    failover_sql = ("CREATE TABLE IF NOT EXISTS lab_failover (id bigint PRIMARY KEY, at datetime2)",
                    "INSERT INTO lab_failover (id) VALUES (%s)",
                    "SELECT id FROM lab_failover WHERE id > %s AND id <= %s")
    NODE_HOSTS = ("127.0.0.6", "127.0.0.7")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.nodes: list[dict] = []
        self.procs: list[subprocess.Popen] = []

    def check_installed(self) -> None:
        """The lab servers are part of multiproxy; only the python-tds or pymssql driver is needed."""
        try:
            import pytds  # noqa: F401
        except ImportError:
            try:
                import pymssql  # noqa: F401
            except ImportError:
                raise LabPartError("the TDS part needs a driver: pip install python-tds (or pymssql), "
                                   "or pip install -e '.[test]'") from None

    @classmethod
    def launch(cls, node: dict, lab: dict, read_only: bool, detach: bool) -> subprocess.Popen:
        """Start one lab server for `node` (host, port, db_file, log); the password travels in the environment."""
        package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env = dict(os.environ, TDSLAB_PASSWORD=lab["password"], PYTHONUNBUFFERED="1")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        argv = [sys.executable, "-m", "multiproxy.lab.tds_server", "--host", node["host"], "--port", str(node["port"]),
                "--user", lab["user"], "--db-file", node["db_file"], "--database", lab["database"]]
        if read_only:
            argv.append("--read-only")
        with open(node["log"], "ab") as log:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                                    process_group=0,
                                    preexec_fn=None if detach else (lambda: die_with_parent(signal.SIGTERM)))
        _wait_port(node["host"], node["port"], proc, node["log"])
        return proc

    def start(self, progress) -> None:
        port = free_port_on(*self.NODE_HOSTS)
        store = os.path.join(self.data_dir, "tds")
        os.makedirs(store, mode=0o700, exist_ok=True)
        lab = {"user": self.user, "password": self.password, "database": self.database}
        for i, (host, role) in enumerate(zip(self.NODE_HOSTS, ("writer", "reader"))):
            name = f"tds{i + 1}"
            with progress(f"TDS lab server {name} ({'read-only' if role == 'reader' else 'writable'})") as step:
                node = {"name": name, "role": role, "host": host, "port": port,
                        "db_file": os.path.join(store, "master.sqlite"), "log": os.path.join(store, f"{name}.log"),
                        "stop_signal": "SIGTERM"}
                proc = self.launch(node, lab, read_only=role == "reader", detach=self.detach)
                self.procs.append(proc)
                self.nodes.append({**node, "pid": proc.pid, "started": start_time(proc.pid)})
                step.done(f"{host}:{port}")

    def stop(self) -> None:
        for proc in reversed(self.procs):
            stop_process(proc.pid, first=signal.SIGTERM, timeout=10)
            proc.wait()
        self.procs = []

    def detach_processes(self) -> None:
        self.procs = []  # they run on; lab.json names them

    def state(self) -> dict:
        return {"cluster": self.cluster, "nodes": [dict(n) for n in self.nodes]}

    def port(self) -> int:
        return self.nodes[0]["port"]

    # -- failover ---------------------------------------------------------------------------------

    @classmethod
    def connect_client(cls, address: str, lab: dict):
        host, _, port = address.rpartition(":")
        try:
            import pytds
        except ImportError:
            pytds = None
        if pytds is not None:
            return pytds.connect(host, port=int(port), user=lab["user"], password=lab["password"],
                                 database=lab["database"], autocommit=True, login_timeout=10, timeout=30)
        try:
            import pymssql
        except ImportError:
            raise LabPartError("the TDS client needs python-tds or pymssql: pip install python-tds") from None
        return pymssql.connect(server=host, port=int(port), user=lab["user"], password=lab["password"],
                               database=lab["database"], autocommit=True, login_timeout=10, timeout=30,
                               tds_version="7.4")

    @classmethod
    def promote(cls, node: dict, state: dict, lab: dict) -> None:
        os.kill(node["pid"], signal.SIGUSR2)  # the lab server turns writable
        deadline = time.monotonic() + 10
        while cls.verify_role(node, lab)[0] != "writer":
            if time.monotonic() > deadline:
                raise LabPartError(f"{node['host']}:{node['port']} still reads only 10 s after SIGUSR2")
            time.sleep(0.1)

    @classmethod
    def rebuild_as_reader(cls, node: dict, writer: dict, state: dict, lab: dict) -> dict:
        proc = cls.launch(node, lab, read_only=True, detach=True)
        return {**node, "role": "reader", "pid": proc.pid, "started": start_time(proc.pid)}

    @classmethod
    def client_command(cls, connection_url: str) -> str:
        host, port, user, password, database = _split_url(connection_url)
        return (f"TDSVER=7.4 tsql -H {host} -p {port} -U {shlex.quote(user)} -P {shlex.quote(password)} "
                f"-D {shlex.quote(database)}")

    @classmethod
    def verify_role(cls, node: dict, lab: dict) -> tuple[str, str]:
        try:
            answer = cls.check_query(f"{node['host']}:{node['port']}", lab,
                                     "SELECT DATABASEPROPERTYEX(DB_NAME(), 'Updateability')")
        except Exception as exc:  # any driver error: the node does not answer
            return "unreachable", (str(exc).splitlines() or [type(exc).__name__])[0]
        return ("reader" if answer == "READ_ONLY" else "writer"), f"Updateability = {answer}"

    @classmethod
    def check_query(cls, address: str, lab: dict, sql: str = "SELECT 1") -> str:
        conn = cls.connect_client(address, lab)
        try:
            cur = conn.cursor()
            cur.execute(sql)
            return str(cur.fetchone()[0])
        finally:
            conn.close()


# Engines the lab can start, by the name `--engines` takes; `lab up` starts all of them by default.
PARTS: dict[str, type[LabPart]] = {"postgres": PostgresPart, "mysql": MySQLPart, "tds": TDSPart}
