"""Sans-IO conversations with a TDS backend: login (PRELOGIN, login-only TLS over MemoryBIO, LOGIN7), probe, cancel."""
from __future__ import annotations

import os
import ssl
from dataclasses import dataclass, field

from multiproxy.engine import BackendError, BackendScript, BackendTarget
from .statements import StatementCache
from .wire import messages as tp
from .wire import token_stream as tk
from .wire.memory_tls import MemoryTLS

LOGIN_FAILED = 18456
BACKEND_PACKET_SIZE = 4096


@dataclass
class TDSServerState:
    """What the proxy knows about one backend connection: its login facts and who used it last."""

    database: str = "master"
    collation: bytes = tk.DEFAULT_COLLATION
    language: str = "us_english"
    packet_size: int = BACKEND_PACKET_SIZE
    tds_version: bytes = tk.TDS74_VERSION_BYTES
    prog_name: str = "Microsoft SQL Server"
    prog_version: bytes = bytes([16, 0, 0x03, 0xE8])
    last_client: object = None      # the client protocol's identity; another client needs a RESETCONNECTION
    # the tracked SET options the session holds as far as the proxy knows (name -> statement; {} after the login or
    # a RESETCONNECTION), None when unknown (a client reset its session itself, or reset_query ran): what the compiled
    # relay's lanes check
    options: dict | None = field(default_factory=dict)
    # its prepared statements, (declaration, text) -> handle (statements.py); a reset empties it
    statements: StatementCache = field(default_factory=StatementCache)


class TDSLogin(BackendScript):
    """Logs in as `target.user`: PRELOGIN, TLS for the login when configured (records inside PRELOGIN packets
    during the handshake, then raw for LOGIN7 only), LOGIN7, and the login reply's facts."""

    def __init__(self, target: BackendTarget, packet_size: int = BACKEND_PACKET_SIZE):
        self.target = target
        self.packet_size = packet_size
        self.reader = tp.MessageReader(tp.MAX_PACKET_SIZE + 1)
        self.phase = "prelogin"
        self.tls: MemoryTLS | None = None
        self.done = False
        self.wants_tls = False
        self.result = None
        self.leftover = b""

    def start(self) -> bytes:
        encryption = tp.ENCRYPT_NOT_SUP if self.target.tls == "disable" else tp.ENCRYPT_OFF
        prelogin = tp.Prelogin.build(version=(11, 0, 0, 0), encryption=encryption, thread_id=os.getpid(), mars=0)
        return tp.encode_message(tp.PRELOGIN, prelogin.encode())

    def _login7(self) -> bytes:
        target = self.target
        if target.password is None:
            raise BackendError(f"backend {target.host}:{target.port} needs a password for {target.user!r} but none "
                               "is configured: add [[clusters.NAME.credentials]] with a password", fatal_auth=True)
        login = tp.Login7(packet_size=self.packet_size, client_pid=os.getpid(), hostname="multiproxy",
                          username=target.user, password=target.password, appname="multiproxy",
                          servername=target.host, library="multiproxy", database=target.database)
        data = tp.encode_message(tp.LOGIN7, login.encode(), tp.DEFAULT_PACKET_SIZE)
        if self.tls is not None:
            data = self.tls.encrypt(data)
            self.tls = None                 # login-only encryption: the reply and everything after are plain
        self.phase = "reply"
        return data

    def feed(self, data: bytes) -> bytes:
        try:
            messages = self.reader.feed(data)
        except tk.ProtocolError as exc:
            raise BackendError(f"backend {self.target.host}:{self.target.port} broke TDS during login: {exc}") from None
        out = b""
        for msg in messages:
            if self.phase == "prelogin":
                out += self._prelogin(msg)
            elif self.phase == "tls":
                out += self._tls_step(msg)
            elif self.phase == "reply":
                if msg.type == tp.PRELOGIN:
                    continue        # TLS 1.3 session tickets sent after the handshake: the login is over
                self._reply(msg)
                self.leftover = b""
                return out
        return out

    def _prelogin(self, msg: tp.Message) -> bytes:
        try:
            answer = tp.Prelogin.decode(msg.data).encryption
        except tk.ProtocolError as exc:
            raise BackendError(f"backend sent a malformed PRELOGIN reply: {exc}") from None
        mode = self.target.tls
        if answer == tp.ENCRYPT_NOT_SUP or mode == "disable":
            if mode in ("require", "verify-ca", "verify-full"):
                raise BackendError(f"backend {self.target.host}:{self.target.port} does not support encryption but "
                                   f"clusters.*.backend.tls is {mode!r}")
            return self._login7()
        if answer in (tp.ENCRYPT_ON, tp.ENCRYPT_REQ):
            raise BackendError(f"backend {self.target.host}:{self.target.port} requires full encryption; multiproxy "
                               "encrypts the backend login only (set the server's Force Encryption off, or "
                               "backend.tls = \"disable\")")
        context = self.target.tls_context_factory() if self.target.tls_context_factory else None
        if context is None:
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        context.maximum_version = ssl.TLSVersion.TLSv1_2     # as SQL Server for TDS 7.x (no post-handshake tickets)
        self.tls = MemoryTLS(context, server_hostname=self.target.host if context.check_hostname else None)
        self.phase = "tls"
        return self._handshake()

    def _handshake(self, data: bytes = b"") -> bytes:
        try:
            finished = self.tls.handshake(data)
        except ssl.SSLError as exc:
            raise BackendError(f"TLS handshake with backend {self.target.host}:{self.target.port} failed: {exc}") \
                from None
        out = self.tls.pending_output()
        data = tp.encode_message(tp.PRELOGIN, out) if out else b""
        if finished:
            return data + self._login7()
        return data

    def _tls_step(self, msg: tp.Message) -> bytes:
        if msg.type not in (tp.PRELOGIN, tp.TABULAR_RESULT):
            raise BackendError("backend sent something else than a TLS handshake")
        return self._handshake(msg.data)

    def _reply(self, msg: tp.Message) -> None:
        try:
            tokens = tk.TokenReader().read(msg.data)
        except tk.ProtocolError as exc:
            raise BackendError(f"backend sent a malformed login reply: {exc}") from None
        state = TDSServerState(database=self.target.database or "master", packet_size=self.packet_size)
        acked = False
        for tok in tokens:
            if tok.type == tk.TOKEN_ERROR:
                raise BackendError(f"backend refused the login of {self.target.user!r}: {tok.text} "
                                   f"(error {tok.number})", fatal_auth=tok.number == LOGIN_FAILED,
                                   code=str(tok.number), server_message=tok.text, severity=tok.severity)
            if tok.type == tk.TOKEN_LOGINACK:
                acked = True
                state.tds_version, state.prog_name, state.prog_version = tok.tds_version, tok.prog_name, \
                    tok.prog_version
            elif tok.type == tk.TOKEN_ENVCHANGE:
                if tok.env_type == tk.ENV_DATABASE:
                    state.database = tok.new
                elif tok.env_type == tk.ENV_COLLATION and tok.new:
                    state.collation = bytes(tok.new)
                elif tok.env_type == tk.ENV_LANGUAGE:
                    state.language = tok.new
                elif tok.env_type == tk.ENV_PACKETSIZE:
                    try:
                        state.packet_size = int(tok.new)
                    except ValueError:
                        raise BackendError(f"backend sent packet size {tok.new!r}") from None
        if not acked:
            raise BackendError("backend ended its login reply without LOGINACK")
        self.result = state
        self.done = True


class TDSProbe(BackendScript):
    """Logs in, then asks whether the database is writable: READ_WRITE is a writer, READ_ONLY a reader. A reader is
    then asked, in a second batch, for its availability-group lag.

    Result: {"role": "writer" | "reader", "lag": seconds or None, "lag_bytes": int or None, "skip": None}. A reader's
    lag is secondary_lag_seconds of its local replica state of the current database, lag_bytes its redo queue
    (KB * 1024); no row (the database is in no availability group) is lag 0.0; NULLs, or an error reading the view
    (it needs VIEW SERVER STATE), leave them unknown (None). The second batch is separate so that a server where
    the view or its columns do not compile still answers the first."""

    SQL = "SELECT DATABASEPROPERTYEX(DB_NAME(), 'Updateability')"
    # Over every local database: the probe logs in to `master`, which is in no availability group. No local
    # secondary database (COUNT 0) means no lag; one whose lag the server leaves NULL means lag unknown.
    LAG_SQL = ("SELECT COUNT(*), MAX(secondary_lag_seconds), SUM(redo_queue_size), "
               "SUM(CASE WHEN secondary_lag_seconds IS NULL THEN 1 ELSE 0 END) "
               "FROM sys.dm_hadr_database_replica_states WHERE is_local = 1 AND is_primary_replica = 0")

    def __init__(self, target: BackendTarget):
        self.login = TDSLogin(target)
        self.reader = tp.MessageReader(tp.MAX_PACKET_SIZE + 1)
        self.done = False
        self.wants_tls = False
        self.result = None
        self.phase = "role"

    def start(self) -> bytes:
        return self.login.start()

    def _batch(self, sql: str) -> bytes:
        return tp.encode_message(tp.SQL_BATCH, tp.SqlBatch(sql).encode(), self.login.result.packet_size)

    def feed(self, data: bytes) -> bytes:
        if not self.login.done:
            out = self.login.feed(data)
            if self.login.done:
                out += self._batch(self.SQL)
            return out
        out = b""
        for msg in self.reader.feed(data):
            if self.done:
                break
            try:
                tokens = tk.TokenReader().read(msg.data)
            except tk.ProtocolError as exc:
                raise BackendError(f"role probe: malformed reply: {exc}") from None
            if self.phase == "role":
                self.result = role_result(tokens)
                if self.result["role"] == "writer":
                    self.done = True
                else:
                    self.phase = "lag"
                    out += self._batch(self.LAG_SQL)
            else:
                self.result = lag_result(tokens)
                self.done = True
        return out


def role_result(tokens) -> dict:
    """The Updateability answer: a writer (lag 0) or a reader whose lag the second batch tells."""
    value = None
    for tok in tokens:
        if tok.type == tk.TOKEN_ERROR:
            raise BackendError(f"role probe failed: {tok.text} (error {tok.number})")
        if tok.type == tk.TOKEN_ROW and tok.values:
            value = tok.values[0]
    if isinstance(value, str) and value.upper() == "READ_ONLY":
        return {"role": "reader", "lag": None, "lag_bytes": None, "skip": None}
    return {"role": "writer", "lag": 0.0, "lag_bytes": 0, "skip": None}


def lag_result(tokens) -> dict:
    """A reader's result from the reply to LAG_SQL (see TDSProbe)."""
    rows = []
    for tok in tokens:
        if tok.type == tk.TOKEN_ERROR:
            return {"role": "reader", "lag": None, "lag_bytes": None, "skip": None}
        if tok.type == tk.TOKEN_ROW:
            rows.append(tok.values)
    count, seconds, redo_kb, unknown = (list(rows[0]) + [None] * 4)[:4] if rows else (0, None, None, 0)
    if not count:
        return {"role": "reader", "lag": 0.0, "lag_bytes": 0, "skip": None}
    try:
        lag = max(0.0, float(seconds)) if seconds is not None and not unknown else None
    except (TypeError, ValueError):
        lag = None
    try:
        lag_bytes = max(0, int(redo_kb)) * 1024 if redo_kb is not None else None
    except (TypeError, ValueError):
        lag_bytes = None
    return {"role": "reader", "lag": lag, "lag_bytes": lag_bytes, "skip": None}


class TDSCancel(BackendScript):
    """TDS cancels in-band: the client's ATTENTION travels on its own connection to the backend serving it,
    so there is no out-of-band request to make; this script ends at once without sending anything."""

    def __init__(self):
        self.done = False
        self.wants_tls = False

    def start(self) -> bytes:
        self.done = True
        return b""

    def feed(self, data: bytes) -> bytes:
        return b""


class TDSQuery(BackendScript):
    """Runs `sql` as one SQL batch on a logged-in backend (the cluster's init_query, the read of @@MAX_CONNECTIONS)
    and reads its whole reply. A database change (USE) updates `state`. Result: the first row's values as text
    ([] without rows); an ERROR token of severity above 10 raises BackendError with the server's number and text."""

    def __init__(self, sql: str, state: TDSServerState, what: str = "query"):
        self.sql = sql
        self.state = state
        self.what = what
        self.reader = tp.MessageReader(tp.MAX_PACKET_SIZE + 1)
        self.done = False
        self.wants_tls = False
        self.result = None

    def start(self) -> bytes:
        return tp.encode_message(tp.SQL_BATCH, tp.SqlBatch(self.sql).encode(), self.state.packet_size)

    def feed(self, data: bytes) -> bytes:
        for msg in self.reader.feed(data):
            try:
                tokens = tk.TokenReader().read(msg.data)
            except tk.ProtocolError as exc:
                raise BackendError(f"the {self.what}: malformed reply: {exc}") from None
            row = None
            for tok in tokens:
                if tok.type == tk.TOKEN_ERROR and tok.severity > 10:
                    raise BackendError(f"the backend refused the {self.what}: {tok.text} (error {tok.number})",
                                       code=str(tok.number), server_message=tok.text, severity=tok.severity)
                if tok.type == tk.TOKEN_ROW and row is None:
                    row = [None if v is None else str(v) for v in tok.values]
                elif tok.type == tk.TOKEN_ENVCHANGE and tok.env_type == tk.ENV_DATABASE:
                    self.state.database = tok.new
                elif tok.type == tk.TOKEN_ENVCHANGE and tok.env_type == tk.ENV_BEGINTRAN:
                    raise BackendError(f"the {self.what} left a transaction open; end it with COMMIT")
            self.done = True
            self.result = row or []
            break
        return b""
