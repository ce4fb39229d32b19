"""Chaos drill (issue 11): several failovers per engine in a row, driven through the lab, while writers, readers
and hostile sessions run through the proxy; invariants checked at the end.

Used by tools/failover_drill.py --chaos and tests/integration/test_chaos_drill.py (both call run_drill()).

One lab per engine (multiproxy.lab.stack.Lab, in a temporary directory), whose generated proxy config is
patched before the proxy starts: every cluster's [health] gets reader_fallback_to_writer = false (with the
fallback the reader listener would be served by the writer when no reader is up, which the invariants forbid)
and max_replica_lag = LAG_BOUND. The failovers are the lab's own (Lab.failover: its write loop, stop,
promote, DNS repoint, rebuild of the old writer as a reader).

While the failovers run:
- WRITERS threads insert unique ids through the writer listener in autocommit, recording which inserts were
  acknowledged (and which failed: those may or may not be there);
- READERS threads ask through the reader listener which node answers, whether it is a replica / read-only,
  and its lag as the node itself tells it;
- one thread sends a write to the reader listener every READER_WRITE_PAUSE s (each with a marker id);
- one hostile thread cycles through: a session that sets itself read-only on the writer listener and then
  writes (PostgreSQL SET default_transaction_read_only = on; MySQL SET SESSION TRANSACTION READ ONLY; TDS
  ApplicationIntent=ReadOnly login), a write sent to the reader listener, and BEGIN; INSERT; then the socket
  dropped without a commit. Each hostile write carries a unique marker id.
- IDLE_WRITER + IDLE_READER client connections opened before the first failover stay idle until after the last.

Invariants (per engine, ChaosResult.violations()):
1. every acknowledged write is on the final writer (and the lab failover loop's own report shows none missing);
2. no marker of a write sent to the reader listener is on any node (and none was acknowledged);
   PostgreSQL/MariaDB: no marker of a read-only session's write either; no marker of a dropped transaction;
3. every reader answer came from a replica / read-only node, with a lag within LAG_BOUND;
4. writer changes seen by the proxy (multiproxy_cluster_writer_changes_total) == failovers the drill made;
5. every idle connection still works after the last failover, without reconnecting.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import socket
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field

from multiproxy.lab.failover import failover
from multiproxy.lab.stack import Lab

LAG_BOUND = 5.0            # max_replica_lag in the drill's config, and the bound on every reader answer (s)
WRITERS = 3
READERS = 2
IDLE_WRITER = 8
IDLE_READER = 4
ENGINE_BUDGET = 60.0       # seconds of failovers per engine; fewer failovers are made when it runs out
READER_WAIT = 20.0         # after a failover: wait this long at most for the reader listener to be served again
JOIN_TIMEOUT = 15.0
READER_WRITE_PAUSE = 0.02  # between writes sent to the reader listener (one thread, one connection)
STATEMENT_TIMEOUT = 10     # client-side timeouts (s)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:200]


def _shutdown_fd(fd: int) -> None:
    """Cut a client's TCP connection under its driver (no Terminate/COM_QUIT/logout is sent)."""
    dup = socket.socket(fileno=os.dup(fd))
    try:
        dup.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        dup.close()


# ------------------------------------------------------------------------------------------------ engines

class EngineKit:
    """What the drill needs of one engine: clients, its SQL, and how to tell the node that answered."""

    name = ""
    cluster = ""
    table_sql = ""
    insert_sql = "INSERT INTO chaos_drill (id, kind) VALUES (%s, %s)"
    ro_session_refused = True   # a write after the session set itself read-only must be refused by the server
    session_read_only = True    # the proxy makes reader-listener sessions read-only on every node (PG, MySQL)

    def __init__(self, lab_state: dict):
        self.lab = lab_state
        self.nodes: dict[str, str] = {}    # what answer() returns as the node -> "name host:port"
        self.why: dict[str, str] = {}      # node -> the last reason an answer of it had no lag (MySQL)
        self.note_nodes(lab_state)

    def note_nodes(self, lab_state: dict) -> None:
        self.lab = lab_state

    def connect(self, address: str, **kw):
        raise NotImplementedError

    def answer(self, conn) -> tuple[str, bool, float | None]:
        """(node, is a replica / read-only, lag in seconds or None) of one reader query."""
        raise NotImplementedError

    def ro_session_write(self, address: str, marker: int) -> str:
        raise NotImplementedError

    def drop_mid_transaction(self, address: str, marker: int) -> None:
        raise NotImplementedError

    def ids(self, conn) -> set[int]:
        cur = conn.cursor()
        cur.execute("SELECT id FROM chaos_drill")
        return {int(r[0]) for r in cur.fetchall()}

    def node_address(self, node: dict) -> str:
        return f"{node['host']}:{node['port']}"

    def describe(self, node_key: str) -> str:
        return self.nodes.get(node_key, node_key)


class PostgresKit(EngineKit):
    name, cluster = "postgres", "pg"
    table_sql = "CREATE TABLE IF NOT EXISTS chaos_drill (id bigint PRIMARY KEY, kind text)"
    ANSWER = ("SELECT s.rec, host(inet_server_addr()), "
              "CASE WHEN NOT s.rec OR s.recv <= s.rep THEN 0 WHEN s.ts IS NULL THEN NULL "
              "ELSE GREATEST(0, EXTRACT(EPOCH FROM (now() - s.ts))) END "
              "FROM (SELECT pg_is_in_recovery() AS rec, pg_last_wal_receive_lsn() AS recv, "
              "pg_last_wal_replay_lsn() AS rep, pg_last_xact_replay_timestamp() AS ts) AS s")

    def note_nodes(self, lab_state):
        super().note_nodes(lab_state)
        for node in lab_state["engines"]["postgres"]["nodes"]:
            self.nodes[node["host"]] = f"{node['name']} {node['host']}"

    def connect(self, address, **kw):
        import psycopg
        host, _, port = address.rpartition(":")
        return psycopg.connect(host=host, port=int(port), user=self.lab["user"], password=self.lab["password"],
                               dbname=self.lab["database"], autocommit=True, connect_timeout=STATEMENT_TIMEOUT, **kw)

    def answer(self, conn):
        rec, host, lag = conn.execute(self.ANSWER).fetchone()
        return host, bool(rec), None if lag is None else float(lag)

    def ro_session_write(self, address, marker):
        conn = self.connect(address)
        try:
            conn.execute("SET default_transaction_read_only = on")
            try:
                conn.execute(self.insert_sql, (marker, "ro-session"))
            except Exception as exc:
                return f"refused: {getattr(exc, 'sqlstate', '')} {_first_line(exc)}"
            return "EXECUTED"
        finally:
            conn.close()

    def drop_mid_transaction(self, address, marker):
        conn = self.connect(address)
        conn.autocommit = False
        conn.execute(self.insert_sql, (marker, "dropped"))  # psycopg sends BEGIN first
        _shutdown_fd(conn.pgconn.socket)
        with contextlib.suppress(Exception):
            conn.close()


class MySQLKit(EngineKit):
    name, cluster = "mysql", "my"
    table_sql = "CREATE TABLE IF NOT EXISTS chaos_drill (id bigint PRIMARY KEY, kind varchar(16))"

    def note_nodes(self, lab_state):
        super().note_nodes(lab_state)
        for node in lab_state["engines"]["mysql"]["nodes"]:
            self.nodes[str(node.get("server_id"))] = f"{node['name']} {node['host']} (server_id {node.get('server_id')})"

    def connect(self, address, **kw):
        import pymysql
        host, _, port = address.rpartition(":")
        return pymysql.connect(host=host, port=int(port), user=self.lab["user"], password=self.lab["password"],
                               database=self.lab["database"], autocommit=True, connect_timeout=STATEMENT_TIMEOUT,
                               read_timeout=STATEMENT_TIMEOUT + 5, write_timeout=STATEMENT_TIMEOUT, **kw)

    def answer(self, conn):
        import pymysql.cursors
        cur = conn.cursor(pymysql.cursors.DictCursor)
        cur.execute("BEGIN")  # one transaction: both statements on one backend
        try:
            cur.execute("SELECT @@read_only AS ro, @@server_id AS sid")
            row = cur.fetchone()
            cur.execute("SHOW SLAVE STATUS")
            status = cur.fetchone()
        finally:
            cur.execute("COMMIT")
        lag = None
        if status and status.get("Slave_IO_Running") == "Yes" and status.get("Slave_SQL_Running") == "Yes":
            lag = status.get("Seconds_Behind_Master")
        elif not status and not row["ro"]:
            lag = 0.0  # a writer
        node = str(row["sid"])
        if lag is None and status:  # say why, as the probe would
            self.why[node] = (f"Slave_IO_Running = {status.get('Slave_IO_Running')}, Slave_SQL_Running = "
                              f"{status.get('Slave_SQL_Running')}, Seconds_Behind_Master = "
                              f"{status.get('Seconds_Behind_Master')}")
        return node, bool(int(row["ro"])), None if lag is None else float(lag)

    def ro_session_write(self, address, marker):
        conn = self.connect(address)
        try:
            cur = conn.cursor()
            cur.execute("SET SESSION TRANSACTION READ ONLY")
            try:
                cur.execute(self.insert_sql, (marker, "ro-session"))
            except Exception as exc:
                return f"refused: {_first_line(exc)}"
            return "EXECUTED"
        finally:
            conn.close()

    def drop_mid_transaction(self, address, marker):
        conn = self.connect(address)
        cur = conn.cursor()
        cur.execute("BEGIN")
        cur.execute(self.insert_sql, (marker, "dropped"))
        _shutdown_fd(conn._sock.fileno())
        with contextlib.suppress(Exception):
            conn.close()


class TDSKit(EngineKit):
    """The TDS lab servers share one SQLite store: "any node" is that store. A login with ApplicationIntent=ReadOnly
    (pytds readonly=True) does not forbid writes on SQL Server's primary (the intent only routes / admits the
    session to a readable secondary), and the lab server ignores it: its write on the writer is no violation."""

    name, cluster = "tds", "tds"
    table_sql = "CREATE TABLE IF NOT EXISTS chaos_drill (id bigint PRIMARY KEY, kind varchar(16))"
    ro_session_refused = False
    session_read_only = False   # TDS has no session-level read-only setting

    def __init__(self, lab_state):
        self.pids: dict[int, str] = {}
        super().__init__(lab_state)

    def note_nodes(self, lab_state):
        super().note_nodes(lab_state)
        for node in lab_state["engines"]["tds"]["nodes"]:
            if node.get("pid"):
                self.nodes[str(node["pid"])] = f"{node['name']} {node['host']} (pid {node['pid']})"

    def connect(self, address, **kw):
        import pytds
        host, _, port = address.rpartition(":")
        return pytds.connect(host, port=int(port), user=self.lab["user"], password=self.lab["password"],
                             database=self.lab["database"], autocommit=True, login_timeout=STATEMENT_TIMEOUT,
                             timeout=STATEMENT_TIMEOUT + 5, **kw)

    def answer(self, conn):
        cur = conn.cursor()
        cur.execute("SELECT DATABASEPROPERTYEX(DB_NAME(), 'Updateability'), SERVERPROPERTY('ProcessID'); "
                    "SELECT secondary_lag_seconds FROM sys.dm_hadr_database_replica_states WHERE is_local = 1")
        updateability, pid = cur.fetchone()
        lag = 0.0
        if cur.nextset():
            row = cur.fetchone()
            if row is not None:
                lag = None if row[0] is None else float(row[0])
        return str(pid), updateability == "READ_ONLY", lag

    def ro_session_write(self, address, marker):
        conn = self.connect(address, readonly=True)
        try:
            try:
                conn.cursor().execute(self.insert_sql, (marker, "ro-session"))
            except Exception as exc:
                return f"refused: {_first_line(exc)}"
            return "EXECUTED"
        finally:
            conn.close()

    def drop_mid_transaction(self, address, marker):
        conn = self.connect(address)
        cur = conn.cursor()
        cur.execute("BEGIN TRANSACTION")
        cur.execute(self.insert_sql, (marker, "dropped"))
        _shutdown_fd(conn._tds_socket.sock.fileno())
        with contextlib.suppress(Exception):
            conn.close()


KITS = {"postgres": PostgresKit, "mysql": MySQLKit, "tds": TDSKit}


# ------------------------------------------------------------------------------------------------ the lab

class DrillLab(Lab):
    """The lab, with every cluster's [health] patched before the proxy starts (no fallback to the writer)."""

    def _start_proxy(self, progress, detach):
        for part in self.parts:
            generate = part.config_toml

            def patched(*args, _generate=generate, _cluster=part.cluster):
                header = f"[clusters.{_cluster}.health]\n"
                text = _generate(*args)
                if header not in text:
                    raise RuntimeError(f"no {header.strip()} in the lab's config: cannot set reader_fallback_to_writer")
                return text.replace(header, header + "reader_fallback_to_writer = false\n"
                                    f"max_replica_lag = {LAG_BOUND}\n", 1)
            part.config_toml = patched
        super()._start_proxy(progress, detach)


def admin_get(admin: str, path: str):
    with urllib.request.urlopen(f"http://{admin}{path}", timeout=5) as resp:
        body = resp.read().decode()
    return json.loads(body) if path == "/status" else body


def writer_changes(admin: str, cluster: str) -> float:
    text = admin_get(admin, "/metrics")
    found = re.search(rf'^multiproxy_cluster_writer_changes_total\{{cluster="{re.escape(cluster)}"\}} ([\d.e+]+)$',
                      text, re.M)
    if not found:
        raise RuntimeError(f"no multiproxy_cluster_writer_changes_total for {cluster} in /metrics")
    return float(found.group(1))


# ------------------------------------------------------------------------------------------------ load

@dataclass
class Answer:
    t: float
    wall: float
    node: str
    replica: bool
    lag: float | None
    started_wall: float = 0.0      # when its transaction began (wall time), to compare with the proxy's events


@dataclass
class Loads:
    acked: dict = field(default_factory=dict)        # id -> (started, finished) monotonic
    failed: dict = field(default_factory=dict)       # id -> error
    answers: list = field(default_factory=list)
    reader_errors: list = field(default_factory=list)  # (t, error)
    hostile: list = field(default_factory=list)      # (t, kind, marker, outcome)
    reconnects: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


class Load:
    """The writer, reader and hostile threads of one drill."""

    def __init__(self, kit: EngineKit, writer_listen: str, reader_listen: str, base: int):
        self.kit, self.writer_listen, self.reader_listen = kit, writer_listen, reader_listen
        self.base = base
        self.stop = threading.Event()
        self.data = Loads()
        self.threads: list[threading.Thread] = []
        self._next = 0
        self._lock = threading.Lock()

    def next_id(self) -> int:
        with self._lock:
            self._next += 1
            return self.base + self._next

    def start(self) -> None:
        for i in range(WRITERS):
            self.threads.append(threading.Thread(target=self._writer, name=f"chaos-writer-{i}", daemon=True))
        for i in range(READERS):
            self.threads.append(threading.Thread(target=self._reader, name=f"chaos-reader-{i}", daemon=True))
        self.threads.append(threading.Thread(target=self._hostile, name="chaos-hostile", daemon=True))
        self.threads.append(threading.Thread(target=self._reader_writer, name="chaos-reader-writes", daemon=True))
        for t in self.threads:
            t.start()

    def finish(self) -> list[str]:
        """Stop every thread; the names of those that did not end within JOIN_TIMEOUT."""
        self.stop.set()
        deadline = time.monotonic() + JOIN_TIMEOUT
        for t in self.threads:
            t.join(max(0.1, deadline - time.monotonic()))
        return [t.name for t in self.threads if t.is_alive()]

    def _conn(self, conn, address):
        if conn is None:
            conn = self.kit.connect(address)
        return conn

    @staticmethod
    def _broken(conn) -> bool:
        closed = getattr(conn, "closed", False)
        if callable(closed):
            closed = False
        if hasattr(conn, "open") and not callable(conn.open):   # PyMySQL
            return not conn.open
        if hasattr(conn, "_tds_socket"):                        # pytds
            return conn._tds_socket is None or not conn._tds_socket.is_connected()
        return bool(closed)

    def _writer(self) -> None:
        conn, first = None, True
        d = self.data
        while not self.stop.is_set():
            i = self.next_id()
            started = time.monotonic()
            try:
                if conn is None:
                    conn = self.kit.connect(self.writer_listen)
                    if not first:
                        with d.lock:
                            d.reconnects += 1
                    first = False
                conn.cursor().execute(self.kit.insert_sql, (i, "writer"))
                with d.lock:
                    d.acked[i] = (started, time.monotonic())
                time.sleep(0.005)
            except Exception as exc:
                with d.lock:
                    d.failed[i] = _first_line(exc)
                if conn is not None and self._broken(conn):
                    with contextlib.suppress(Exception):
                        conn.close()
                    conn = None
                self.stop.wait(0.05)
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()

    def _reader(self) -> None:
        conn = None
        d = self.data
        while not self.stop.is_set():
            try:
                if conn is None:
                    conn = self.kit.connect(self.reader_listen)
                started_wall = time.time()
                node, replica, lag = self.kit.answer(conn)
                with d.lock:
                    d.answers.append(Answer(time.monotonic(), time.time(), node, replica, lag, started_wall))
                self.stop.wait(0.01)
            except Exception as exc:
                with d.lock:
                    d.reader_errors.append((time.monotonic(), _first_line(exc)))
                if conn is not None and self._broken(conn):
                    with contextlib.suppress(Exception):
                        conn.close()
                    conn = None
                self.stop.wait(0.1)
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()

    def _reader_writer(self) -> None:
        """Writes sent to the reader listener every READER_WRITE_PAUSE s on one connection, each with a marker:
        all must be refused (a promoted node still in the reader pools would execute them)."""
        conn = None
        d = self.data
        while not self.stop.is_set():
            marker = self.next_id()
            t = time.monotonic()
            try:
                if conn is None:
                    conn = self.kit.connect(self.reader_listen)
                conn.cursor().execute(self.kit.insert_sql, (marker, "reader"))
                outcome = "EXECUTED"
            except Exception as exc:
                outcome = f"refused: {_first_line(exc)}"
                if conn is not None and self._broken(conn):
                    with contextlib.suppress(Exception):
                        conn.close()
                    conn = None
            with d.lock:
                d.hostile.append((t, "reader-write", marker, outcome))
            self.stop.wait(READER_WRITE_PAUSE)
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()

    def _hostile(self) -> None:
        d = self.data
        kinds = ("ro-session", "reader-write", "dropped")
        turn = 0
        while not self.stop.is_set():
            kind = kinds[turn % len(kinds)]
            turn += 1
            marker = self.next_id()
            t = time.monotonic()
            try:
                if kind == "ro-session":
                    outcome = self.kit.ro_session_write(self.writer_listen, marker)
                elif kind == "reader-write":
                    conn = self.kit.connect(self.reader_listen)
                    try:
                        conn.cursor().execute(self.kit.insert_sql, (marker, "reader"))
                        outcome = "EXECUTED"
                    except Exception as exc:
                        outcome = f"refused: {_first_line(exc)}"
                    finally:
                        with contextlib.suppress(Exception):
                            conn.close()
                else:
                    self.kit.drop_mid_transaction(self.writer_listen, marker)
                    outcome = "dropped"
            except Exception as exc:
                outcome = f"error: {_first_line(exc)}"
            with d.lock:
                d.hostile.append((t, kind, marker, outcome))
            self.stop.wait(0.1 + random.random() * 0.1)


# ------------------------------------------------------------------------------------------------ result

@dataclass
class ChaosResult:
    engine: str
    failovers: int = 0
    failovers_wanted: int = 0
    writes_acked: int = 0
    writes_failed: int = 0
    writes_lost: list = field(default_factory=list)
    lab_loop_missing: int = 0
    reader_answers: int = 0
    reader_errors: int = 0
    non_replica_answers: list = field(default_factory=list)   # [(t, node description, lag)]
    beyond_lag_answers: list = field(default_factory=list)
    # reader answers whose lag went out of bounds while their transaction ran (the proxy took the node out
    # during it and let it finish, as it promises): counted and shown, not violations
    in_flight_answers: list = field(default_factory=list)
    hostile: dict = field(default_factory=dict)               # kind -> {outcome kind: count}
    reader_writes_acked: list = field(default_factory=list)
    markers_present: dict = field(default_factory=dict)       # kind -> [ids]
    ro_session_executed: list = field(default_factory=list)
    writer_changes_seen: float = 0
    idle_total: int = 0
    idle_kept: int = 0
    idle_lost: list = field(default_factory=list)
    writer_reconnects: int = 0
    outages: list = field(default_factory=list)                # seconds per failover (drill's writers)
    lab_outages: list = field(default_factory=list)            # seconds per failover (the lab failover loop)
    threads_stuck: list = field(default_factory=list)
    duration: float = 0.0
    timeline: list = field(default_factory=list)               # (n, [(t, text)]) of the lab's failover steps
    episodes: list = field(default_factory=list)               # violations grouped in time, with proxy log lines
    notes: list = field(default_factory=list)
    error: str = ""

    def reader_writes_executed(self) -> set:
        """Markers of writes sent to the reader listener that were acknowledged or are on a node."""
        return {m for _, m in self.reader_writes_acked} | set(self.markers_present.get("reader-write", []))

    def violations(self) -> list[str]:
        out = []
        if self.error:
            out.append(f"drill did not complete: {self.error}")
        if self.failovers < self.failovers_wanted:
            out.append(f"only {self.failovers} of {self.failovers_wanted} failovers made")
        if self.writes_lost:
            out.append(f"{len(self.writes_lost)} acknowledged write(s) missing on the final writer: "
                       f"{sorted(self.writes_lost)[:10]}")
        if self.lab_loop_missing:
            out.append(f"the lab failover loop reports {self.lab_loop_missing} committed row(s) MISSING")
        if self.reader_writes_acked:
            out.append(f"{len(self.reader_writes_acked)} write(s) through the reader listener were acknowledged: "
                       f"{self.reader_writes_acked[:10]}")
        for kind, ids in self.markers_present.items():
            if ids:
                out.append(f"{len(ids)} marker(s) of kind {kind} present: {sorted(ids)[:10]}")
        if self.ro_session_executed:
            out.append(f"{len(self.ro_session_executed)} write(s) of read-only sessions executed: "
                       f"{self.ro_session_executed[:10]}")
        if self.reader_answers == 0:
            out.append("no reader answer at all")
        if self.non_replica_answers:
            out.append(f"{len(self.non_replica_answers)} reader answer(s) from a non-replica: "
                       f"{self.non_replica_answers[:5]}")
        if self.beyond_lag_answers:
            out.append(f"{len(self.beyond_lag_answers)} reader answer(s) beyond the lag bound {LAG_BOUND} s: "
                       f"{self.beyond_lag_answers[:5]}")
        if self.writer_changes_seen != self.failovers:
            out.append(f"writer changes seen {self.writer_changes_seen:g} != failovers made {self.failovers}")
        if self.idle_kept != self.idle_total:
            out.append(f"idle connections kept {self.idle_kept}/{self.idle_total}: {self.idle_lost[:5]}")
        if self.threads_stuck:
            out.append(f"threads did not stop: {self.threads_stuck}")
        return out

    def row(self) -> dict[str, str]:
        hostile_reader = self.hostile.get("reader-write", {})
        return {
            "engine": self.engine,
            "failovers": f"{self.failovers}/{self.failovers_wanted}",
            "writes acked/lost": f"{self.writes_acked}/{len(self.writes_lost)}",
            "reader answers / non-replica / beyond lag": (f"{self.reader_answers} / {len(self.non_replica_answers)} / "
                                                          f"{len(self.beyond_lag_answers)}"),
            "writes to reader listener / executed": (f"{sum(hostile_reader.values())} / "
                                                     f"{len(self.reader_writes_executed())}"),
            "writer changes seen/caused": f"{self.writer_changes_seen:g}/{self.failovers}",
            "idle kept": f"{self.idle_kept}/{self.idle_total}",
            "outage per failover (s)": ", ".join(f"{o:.2f}" if o is not None else "?" for o in self.outages),
        }


def format_table(results: list[ChaosResult]) -> str:
    rows = [r.row() for r in results]
    if not rows:
        return ""
    heads = list(rows[0])
    widths = [max(len(h), *(len(r[h]) for r in rows)) for h in heads]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(heads, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(r[h].ljust(w) for h, w in zip(heads, widths)) + " |")
    return "\n".join(lines)


def format_details(result: ChaosResult) -> str:
    lines = [f"{result.engine}: {result.duration:.1f} s; writes failed {result.writes_failed}, writer reconnects "
             f"{result.writer_reconnects}, reader errors {result.reader_errors}; lab loop outage per failover "
             + ", ".join(f"{o:.2f}" for o in result.lab_outages) + " s"]
    for kind, outcomes in result.hostile.items():
        lines.append(f"  hostile {kind}: " + ", ".join(f"{k} x{v}" for k, v in sorted(outcomes.items())))
    lines += [f"  note: {n}" for n in result.notes]
    for episode in result.episodes:
        lines.append(f"  episode: {episode['what']}")
        lines += [f"    {line}" for line in episode["context"]]
    violations = result.violations()
    lines += [f"  VIOLATION: {v}" for v in violations] or ["  all invariants hold"]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ the drill

_LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) ")
_LOG_WORTH = ("registry", "no longer serves", "retired", "read-only", "refus", "failover", "writer is now", "no writer")


def _log_lines(path: str | None, start: float, end: float) -> list[str]:
    """The proxy's log lines between wall times start and end that say something about roles."""
    if not path:
        return []
    out = []
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                found = _LOG_TIME.match(line)
                if not found:
                    continue
                when = time.mktime(time.strptime(found.group(1), "%Y-%m-%d %H:%M:%S")) + int(found.group(2)) / 1000
                if start <= when <= end and any(w in line for w in _LOG_WORTH):
                    out.append(line.rstrip()[:300])
    except OSError:
        return []
    return out[:12]


def _clock(wall: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(wall)) + f".{int(wall * 1000) % 1000:03d}"


def _episodes(data: Loads, kit: EngineKit, result: ChaosResult, proxy_log: str | None, wall_offset: float) -> list:
    """Reader answers and reader-listener writes that break an invariant, grouped where they are less than 1 s
    apart: when (wall clock, to compare with the proxy's log), which node, how many, the lab's last failover step
    begun before, and the proxy's log lines around them."""
    bad = [(a.t, "non-replica answer" if not a.replica else f"answer with lag {a.lag}", kit.describe(a.node))
           for a in data.answers if not a.replica or a.lag is None or a.lag > LAG_BOUND]
    executed = {m for _, m in result.reader_writes_acked} | set(result.markers_present.get("reader-write", []))
    bad += [(t, "write through the reader listener executed", f"marker {m}")
            for t, k, m, _ in data.hostile if k == "reader-write" and m in executed]
    bad.sort()
    steps = [(t + wall_offset, s.strip()) for _, lines in result.timeline for t, s in lines
             if s.strip() and not s.strip().startswith(("ok", "failed"))]
    groups: list[list] = []
    for item in bad:
        if groups and item[0] - groups[-1][-1][0] < 1.0:
            groups[-1].append(item)
        else:
            groups.append([item])
    episodes = []
    for g in groups:
        first, last = g[0][0] + wall_offset, g[-1][0] + wall_offset
        counts: dict[str, int] = {}
        for _, what, where in g:
            key = f"{what} ({where})" if not where.startswith("marker") else what
            counts[key] = counts.get(key, 0) + 1
        before = [s for w, s in steps if w <= first]
        what = (", ".join(f"{n} x {k}" for k, n in counts.items()) + f"; {_clock(first)} .. {_clock(last)}; "
                f"last lab step begun before: {before[-1] if before else 'none'}")
        why = sorted({kit.why[a.node] for a in data.answers if a.lag is None and a.node in kit.why
                      and first - wall_offset <= a.t <= last - wall_offset})
        if why:
            what += "; replica status seen: " + " | ".join(why[:3])
        episodes.append({"what": what, "context": _log_lines(proxy_log, first - 1.0, last + 0.5)})
    return episodes


class _Capture:
    def __init__(self, echo=None):
        self.lines: list[tuple[float, str]] = []
        self.echo = echo

    def __call__(self, text: str, nl: bool = True) -> None:
        self.lines.append((time.monotonic(), text))
        if self.echo:
            self.echo(text + ("\n" if nl else ""))


def _wait(predicate, timeout: float, step: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(step)


def reader_retirements(admin: str, cluster: str, into: dict) -> None:
    """Add the proxy's events that took a node out of its reader pools: {(time, host)}: reason."""
    try:
        events = admin_get(admin, "/status")["registry"]["events"]
    except Exception:  # the proxy may be busy; the next call catches up (the list keeps 50)
        return
    for event in events:
        if event.get("cluster") == cluster and event.get("event") == "retired" and event.get("role") == "reader":
            for address, why in event.get("nodes", {}).items():
                into[(event["time"], address.rsplit(":", 1)[0])] = why


# The lab probes every node each second: a node's lag can go out of bounds up to one probe interval before the
# proxy knows it (plus the probe's own time).
DETECTION_LATENCY = 1.5


def in_flight_at_retirement(answer: "Answer", host: str, retirements: dict) -> bool:
    """The answer's transaction began before the proxy took its node out of the reader pools, within the time a
    probe takes to notice: the proxy cannot know sooner, and it lets such a transaction finish (pools retire
    borrowed connections at the transaction's end)."""
    return any(h == host and t - DETECTION_LATENCY <= answer.started_wall <= t for t, h in retirements)


def _reader_served(admin: str, cluster: str) -> bool:
    try:
        snap = admin_get(admin, "/status")["registry"][cluster]
    except (OSError, ValueError, KeyError):
        return False
    return bool(snap.get("writer")) and bool(snap.get("serving", {}).get("reader"))


def run_drill(engine: str, failovers: int = 3, workdir: str | None = None, echo=None) -> ChaosResult:
    """One engine's chaos drill in a fresh lab; the lab is always taken down."""
    result = ChaosResult(engine=engine, failovers_wanted=failovers)
    started = time.monotonic()
    own_dir = workdir is None
    workdir = workdir or tempfile.mkdtemp(prefix=f"mp-chaos-{engine}-")
    capture = _Capture(echo)
    lab = DrillLab(os.path.join(workdir, "lab"), out=capture)
    load = None
    idle: list[tuple[str, object]] = []
    try:
        if lab.up([engine], detach=True) != 0:
            raise RuntimeError("lab up failed")
        state = lab.state
        kit = KITS[engine](state)
        part_state = state["engines"][engine]
        cluster = part_state["cluster"]
        admin = state["proxy"]["admin"]
        writer_listen = part_state["listeners"]["writer"]["address"]
        reader_listen = part_state["listeners"]["reader"]["address"]
        with contextlib.closing(kit.connect(writer_listen)) as conn:
            conn.cursor().execute(kit.table_sql)
        if not _wait(lambda: _reader_served(admin, cluster), READER_WAIT):
            raise RuntimeError("the reader listener has no reader to serve it")

        def replica_answer():
            try:
                with contextlib.closing(kit.connect(reader_listen)) as c:
                    # The table must have replicated (the replica has applied a transaction) before the load.
                    c.cursor().execute("SELECT count(*) FROM chaos_drill")
                    return kit.answer(c)[1]
            except Exception:
                return False
        if not _wait(replica_answer, READER_WAIT, 0.2):
            raise RuntimeError("the reader listener does not answer from a replica")

        for role, address, n in (("writer", writer_listen, IDLE_WRITER), ("reader", reader_listen, IDLE_READER)):
            for _ in range(n):
                conn = kit.connect(address)
                conn.cursor().execute("SELECT 1")
                idle.append((role, conn))
        result.idle_total = len(idle)

        changes_before = writer_changes(admin, cluster)
        retirements: dict = {}
        load = Load(kit, writer_listen, reader_listen, base=time.time_ns() // 1000 * 1000)
        load.start()
        time.sleep(1.0)
        budget_end = time.monotonic() + ENGINE_BUDGET
        for n in range(failovers):
            if time.monotonic() > budget_end - 10:
                result.notes.append(f"time budget ({ENGINE_BUDGET:.0f} s) spent: stopped after {n} failover(s)")
                break
            mark = len(capture.lines)
            code = failover(lab, engine, rebuild=True)
            reader_retirements(admin, cluster, retirements)
            steps = capture.lines[mark:]
            result.timeline.append((n + 1, steps))
            kit.note_nodes(lab.state)
            text = "".join(t for _, t in steps)
            if code != 0:
                raise RuntimeError(f"failover {n + 1} returned {code}: {text[-500:]}")
            result.failovers += 1
            stop_start = next((t for t, s in steps if "stop the writer" in s), None)
            stop_end = next((steps[i + 1][0] for i, (_, s) in enumerate(steps)
                             if "stop the writer" in s and i + 1 < len(steps)), None)
            with load.data.lock:
                after = [done for s, done in load.data.acked.values() if stop_end is not None and s >= stop_end]
            result.outages.append(min(after) - stop_start if after and stop_start else None)
            found = re.search(r"outage seen through the proxy: ([\d.]+) s", text)
            if found:
                result.lab_outages.append(float(found.group(1)))
            missing = re.search(r"(\d+) committed row\(s\) are MISSING", text)
            result.lab_loop_missing += int(missing.group(1)) if missing else 0
            if "rows: could not read" in text:
                result.notes.append(f"failover {n + 1}: the lab loop could not read its rows back")
            if not _wait(lambda: _reader_served(admin, cluster), READER_WAIT):
                result.notes.append(f"failover {n + 1}: no reader served {READER_WAIT:.0f} s after it")
            time.sleep(1.0)
        result.threads_stuck = load.finish()

        # Idle connections: each must still work, on its own connection (no reconnect).
        for i, (role, conn) in enumerate(idle):
            try:
                if role == "reader":
                    kit.answer(conn)
                else:
                    conn.cursor().execute("SELECT 1")
                result.idle_kept += 1
            except Exception as exc:
                result.idle_lost.append(f"{role} #{i}: {_first_line(exc)}")

        # Writer changes: the metric counts every change to a new, non-null writer.
        time.sleep(1.5)
        result.writer_changes_seen = writer_changes(admin, cluster) - changes_before

        data = load.data
        result.writes_acked, result.writes_failed = len(data.acked), len(data.failed)
        result.writer_reconnects = data.reconnects
        result.reader_answers, result.reader_errors = len(data.answers), len(data.reader_errors)
        t0 = started
        reader_retirements(admin, cluster, retirements)
        for a in data.answers:
            where = f"t+{a.t - t0:.2f}s {kit.describe(a.node)}"
            host = kit.describe(a.node).split()[1] if len(kit.describe(a.node).split()) > 1 else ""
            if not a.replica:
                if in_flight_at_retirement(a, host, retirements):
                    result.in_flight_answers.append((where, "not a replica"))
                else:
                    result.non_replica_answers.append((where, a.lag))
            elif a.lag is None or a.lag > LAG_BOUND:
                if in_flight_at_retirement(a, host, retirements):
                    result.in_flight_answers.append((where, a.lag))
                else:
                    result.beyond_lag_answers.append((where, a.lag))
        if result.in_flight_answers:
            result.notes.append(f"{len(result.in_flight_answers)} reader answer(s) out of the lag bound came from "
                                f"transactions begun at most {DETECTION_LATENCY} s before the proxy took their node "
                                f"out (its probe's detection time; they may finish): "
                                f"{result.in_flight_answers[:3]}")
        for t, kind, marker, outcome in data.hostile:
            key = outcome.split(":")[0]
            result.hostile.setdefault(kind, {}).setdefault(key, 0)
            result.hostile[kind][key] += 1
            if kind == "reader-write" and outcome == "EXECUTED":
                result.reader_writes_acked.append((f"t+{t - t0:.2f}s", marker))
            if kind == "ro-session" and outcome == "EXECUTED" and kit.ro_session_refused:
                result.ro_session_executed.append((f"t+{t - t0:.2f}s", marker))

        # What the nodes hold: the final writer for acknowledged writes, every running node for markers.
        state = lab._require()
        nodes = [n for n in state["engines"][engine]["nodes"] if n.get("pid")]
        writer = next(n for n in nodes if n["role"] == "writer")
        with contextlib.closing(kit.connect(kit.node_address(writer))) as conn:
            on_writer = kit.ids(conn)
        result.writes_lost = sorted(set(data.acked) - on_writer)
        everywhere = set(on_writer)
        for node in nodes:
            if node is writer:
                continue

            def caught_up(node=node):
                try:
                    with contextlib.closing(kit.connect(kit.node_address(node))) as c:
                        return kit.ids(c) >= on_writer and kit.ids(c)
                except Exception:
                    return set()
            held = _wait(caught_up, 15, 0.3)
            if not held:
                result.notes.append(f"{node['name']} did not catch up with the writer within 15 s")
                with contextlib.suppress(Exception), contextlib.closing(kit.connect(kit.node_address(node))) as c:
                    held = kit.ids(c)
            everywhere |= set(held or ())
        kinds = {"reader-write": "reader-write", "dropped": "dropped"}
        if kit.ro_session_refused:
            kinds["ro-session"] = "ro-session"
        for t, kind, marker, outcome in data.hostile:
            if kind in kinds:
                result.markers_present.setdefault(kind, [])
                if marker in everywhere:
                    result.markers_present[kind].append(marker)
        if not kit.session_read_only:
            # No session-level read-only on this engine: a write sent to the reader listener in the moment between
            # a node's promotion and the proxy seeing it runs there. Such writes (begun within the detection time
            # before the proxy took the node out of the reader pools) are reported, not counted as violations.
            offset = time.time() - time.monotonic()
            window = {m for t, k, m, _ in data.hostile if k == "reader-write"
                      and any(tr - DETECTION_LATENCY <= t + offset <= tr for tr, _ in retirements)}
            executed = {m for _, m in result.reader_writes_acked} | set(result.markers_present.get("reader-write", []))
            in_window = executed & window
            if in_window:
                result.reader_writes_acked = [(w, m) for w, m in result.reader_writes_acked if m not in in_window]
                result.markers_present["reader-write"] = [m for m in result.markers_present.get("reader-write", [])
                                                          if m not in in_window]
                result.notes.append(f"{len(in_window)} write(s) through the reader listener ran on a node promoted "
                                    f"moments before the proxy saw it ({kit.name} has no session read-only setting; "
                                    f"begun within {DETECTION_LATENCY} s before the proxy took the node out)")
        if not kit.ro_session_refused:
            ro = [m for _, k, m, _ in data.hostile if k == "ro-session"]
            result.notes.append(f"ApplicationIntent=ReadOnly writes on the writer listener: "
                                f"{sum(m in everywhere for m in ro)} of {len(ro)} executed (not a violation: the "
                                "intent does not forbid writes on a primary, and the lab server ignores it)")
        proxy_log = state["proxy"].get("log")
        result.episodes = _episodes(data, kit, result, proxy_log, wall_offset=time.time() - time.monotonic())
    except Exception as exc:
        result.error = f"{type(exc).__name__}: {_first_line(exc)}"
    finally:
        if load is not None and not load.stop.is_set():
            result.threads_stuck = load.finish()
        for _, conn in idle:
            with contextlib.suppress(Exception):
                conn.close()
        # CHAOS_KEEP=1 keeps the lab directory (logs, data; processes stopped), CHAOS_KEEP_ON_FAIL=1 when an
        # invariant broke; otherwise everything is removed.
        keep = bool(os.environ.get("CHAOS_KEEP")) or (bool(result.violations()) and bool(os.environ.get("CHAOS_KEEP_ON_FAIL")))
        if keep:
            result.notes.append(f"kept: {lab.dir} (proxy log {os.path.join(lab.dir, 'multiproxy.log')}); "
                                f"remove with `multiproxy lab down --dir {lab.dir}`")
        with contextlib.suppress(Exception):
            if keep:
                Lab(lab.dir, out=capture).down(keep=True)
            else:
                Lab(lab.dir, out=capture).down(keep=False)
        if own_dir and not keep:
            shutil.rmtree(workdir, ignore_errors=True)
        result.duration = time.monotonic() - started
    return result
