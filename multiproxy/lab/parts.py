"""The lab's engine parts: each starts its backends, writes its cluster and listeners, and names its URLs."""
from __future__ import annotations

import json
import os
import shlex
import shutil
from urllib.parse import quote

from . import postgres
from .processes import free_port_on, start_time


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
    supports_failover = False
    # The failover write loop: create its table if missing; insert one row (%s: an integer id); count the rows
    # with an id above %s.
    failover_sql = ("", "", "")

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

    def config_toml(self, writer_listen: str, reader_listen: str, password_file: str) -> str:
        """This part's [clusters.*] and [[listeners]] tables; paths relative to the config's directory."""
        raise NotImplementedError

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

    supports_failover = True
    failover_sql = ("CREATE TABLE IF NOT EXISTS lab_failover (id bigint PRIMARY KEY, at timestamptz DEFAULT now())",
                    "INSERT INTO lab_failover (id) VALUES (%s) ON CONFLICT DO NOTHING",
                    "SELECT count(*) FROM lab_failover WHERE id > %s")
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

    def config_toml(self, writer_listen: str, reader_listen: str, password_file: str) -> str:
        port = self.primary.port
        names = self.endpoint_names()
        return f"""
# PostgreSQL: a primary and a streaming standby, each on its own loopback address, found through the
# cluster's writer and reader endpoints (DNS names the lab's DNS server answers, TTL 5 s). The probes
# (pg_is_in_recovery()) decide who the writer is; `multiproxy lab failover postgres` moves it.
[clusters.{self.cluster}]
engine = "postgres"
hosts = []

[clusters.{self.cluster}.endpoints]
writer = {toml_string(f"{names['writer']}:{port}")}
reader = {toml_string(f"{names['reader']}:{port}")}

[clusters.{self.cluster}.dns]
nameserver = {toml_string(self.dns_nameserver or "")}
ttl_floor = 1.0

[clusters.{self.cluster}.health]
probe_interval = 1.0
probe_user = {toml_string(self.user)}

[clusters.{self.cluster}.backend]
tls = "disable"  # the lab's servers listen on loopback only, without TLS

[clusters.{self.cluster}.pool]
mode = "transaction"
max_size = 10

[[clusters.{self.cluster}.credentials]]
user = {toml_string(self.user)}
password_file = {toml_string(password_file)}

[[listeners]]
name = "pg-writer"
listen = {toml_string(writer_listen)}
cluster = "{self.cluster}"
role = "writer"
auth = "scram-sha-256"

[[listeners]]
name = "pg-reader"
listen = {toml_string(reader_listen)}
cluster = "{self.cluster}"
role = "reader"
auth = "scram-sha-256"
"""

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


# Engines the lab can start, by the name `--engines` takes.
PARTS: dict[str, type[LabPart]] = {"postgres": PostgresPart}
# Engines the lab will start later; asking for them says so instead of "unknown".
PLANNED = {"mysql": "MySQL/MariaDB", "tds": "SQL Server (TDS)"}
