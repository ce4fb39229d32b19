"""The lab's engine parts: each starts its backends, writes its cluster and listeners, and names its URLs."""
from __future__ import annotations

import json
import os
import shlex
import shutil
from urllib.parse import quote

from . import postgres


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
    stop_signal, log}], with the writer node first.
    """

    engine = ""  # the engine name in multiproxy's config (`multiproxy engines`)
    title = ""  # for people: "PostgreSQL"
    cluster = ""  # the cluster name in the generated config
    env_prefix = ""  # MULTIPROXY_<prefix>_URL
    url_scheme = ""
    debian_package = ""

    def __init__(self, data_dir: str, user: str, password: str, database: str, detach: bool):
        self.data_dir, self.user, self.password, self.database = data_dir, user, password, database
        self.detach = detach

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

    def start(self, progress) -> None:
        keep = {"keep_datadir": True, "die_with_parent": not self.detach}
        with progress("PostgreSQL primary (initdb, start)") as step:
            self.primary = postgres.PostgresServer(bindir=self.bindir, basedir=os.path.join(self.data_dir, "pg-primary"),
                                                   **keep)
            self.primary.start()
            # The lab role logs in with SCRAM; the superuser stays trusted on loopback for the lab's own tools.
            self.primary.add_hba_lines([f"host all {self.user} 127.0.0.1/32 scram-sha-256"])
            self.primary.psql(f"SET password_encryption = 'scram-sha-256';\n"
                              f"CREATE ROLE {self.user} LOGIN PASSWORD '{self.password}';")
            self.primary.psql(f"CREATE DATABASE {self.database} OWNER {self.user};")
            step.done(f"{self.primary.host}:{self.primary.port}")
        with progress("PostgreSQL standby (pg_basebackup, streaming)") as step:
            self.standby = self.primary.make_standby(basedir=os.path.join(self.data_dir, "pg-standby"), **keep)
            if not self.standby.in_recovery():
                raise LabPartError("the standby started but is not in recovery")
            step.done(f"{self.standby.host}:{self.standby.port}")

    def stop(self) -> None:
        for server in (self.standby, self.primary):
            if server is not None:
                server.stop()

    def detach_processes(self) -> None:
        for name, server in (("primary", self.primary), ("standby", self.standby)):
            self._detached[name] = server.detach()

    def _node(self, name: str, role: str, server: postgres.PostgresServer) -> dict:
        pid, started = self._detached.get(name) or (server.pid, None)
        if started is None and pid is not None:
            from .processes import start_time
            started = start_time(pid)
        return {"name": name, "role": role, "host": server.host, "port": server.port, "pid": pid,
                "started": started, "stop_signal": "SIGINT", "log": server.logfile, "basedir": server.basedir}

    def state(self) -> dict:
        nodes = []
        if self.primary is not None:
            nodes.append(self._node("primary", "writer", self.primary))
        if self.standby is not None:
            nodes.append(self._node("standby", "reader", self.standby))
        return {"cluster": self.cluster, "nodes": nodes, "bindir": self.bindir}

    def config_toml(self, writer_listen: str, reader_listen: str, password_file: str) -> str:
        hosts = ", ".join(toml_string(f"{s.host}:{s.port}") for s in (self.primary, self.standby))
        return f"""
# PostgreSQL: the primary first (the writer), then the streaming standby (readers use the hosts after the first).
[clusters.{self.cluster}]
engine = "postgres"
hosts = [{hosts}]

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
