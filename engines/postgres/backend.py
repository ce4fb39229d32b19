"""Sans-IO conversations with a PostgreSQL backend: login (TLS, SCRAM/md5/cleartext/trust), cancel and role probe."""
from __future__ import annotations

from dataclasses import dataclass, field

from multiproxy.engine import BackendError, BackendScript, BackendTarget

from . import protocol as p
from .auth import AuthError, ScramClient, md5_password_response

AUTH_FAILURE_CODES = frozenset({"28P01", "28000"})


@dataclass
class PostgresServerState:
    """What the proxy knows about one backend connection: its parameters and cancel key."""

    params: dict = field(default_factory=dict)      # lowercase name -> value currently in effect
    canonical: dict = field(default_factory=dict)   # lowercase name -> name as the server spells it
    reported: frozenset = frozenset()               # names the server reports with ParameterStatus
    pid: int = 0
    secret: int = 0
    settings: dict = field(default_factory=dict)        # unreported settings the proxy applied (startup options)
    prepared: set = field(default_factory=set)          # global names of statements prepared on this backend
    login_params: dict = field(default_factory=dict)    # params as the login left them (greeting new clients)
    welcome_cache: dict = field(default_factory=dict)   # startup parameters -> greeting bytes (see client)


class _MessageReader:
    """Splits a byte stream into (type, body) messages."""

    def __init__(self):
        self.buf = bytearray()

    def feed(self, data: bytes):
        self.buf += data
        buf = self.buf
        while len(buf) >= 5:
            length = p.UINT32.unpack_from(buf, 1)[0]
            if length < 4 or length > 1 << 26:
                raise BackendError(f"backend sent an invalid message length {length}")
            if len(buf) < 1 + length:
                return
            kind = buf[0]
            body = bytes(buf[5:1 + length])
            del buf[:1 + length]
            yield kind, body


def backend_error_text(body: bytes) -> tuple[str, str]:
    fields = p.parse_fields(body)
    return fields.get("C", ""), fields.get("M", "unknown error")


class PostgresLogin(BackendScript):
    """Logs in to a backend as `target.user` and collects its parameters and cancel key."""

    def __init__(self, target: BackendTarget):
        self.target = target
        self.reader = _MessageReader()
        self.state = PostgresServerState()
        self.phase = "ssl" if target.tls not in ("disable", "allow") else "startup"
        self.scram: ScramClient | None = None
        self.done = False
        self.wants_tls = False
        self.result = None

    def _startup(self) -> bytes:
        params = {"user": self.target.user, "database": self.target.database}
        params.update(self.target.params)
        self.phase = "auth"
        return p.startup_message(params)

    def start(self) -> bytes:
        if self.phase == "ssl":
            return p.ssl_request()
        return self._startup()

    def tls_established(self) -> bytes:
        self.wants_tls = False
        return self._startup()

    def feed(self, data: bytes) -> bytes:
        if self.phase == "ssl":
            answer, rest = data[:1], data[1:]
            if rest:
                raise BackendError("backend sent data after its SSL answer (possible man-in-the-middle)")
            if answer == b"S":
                self.wants_tls = True
                self.phase = "tls"
                return b""
            if answer == b"N":
                if self.target.tls in ("require", "verify-ca", "verify-full"):
                    raise BackendError(f"backend {self.target.host}:{self.target.port} does not accept TLS but "
                                       f"clusters.*.backend.tls is {self.target.tls!r}")
                return self._startup()
            raise BackendError(f"backend answered the SSL request with {answer!r}")
        out = []
        for kind, body in self.reader.feed(data):
            if kind == p.AUTHENTICATION:
                out.append(self._authentication(body))
            elif kind == p.PARAMETER_STATUS:
                name, end = p.read_cstring(body, 0)
                value, _ = p.read_cstring(body, end)
                low = name.lower()
                self.state.params[low] = value
                self.state.canonical[low] = name
            elif kind == p.BACKEND_KEY_DATA:
                self.state.pid = p.UINT32.unpack_from(body, 0)[0]
                self.state.secret = p.UINT32.unpack_from(body, 4)[0]
            elif kind == p.ERROR_RESPONSE:
                code, text = backend_error_text(body)
                raise BackendError(f"backend refused the login of {self.target.user!r}: {text} (SQLSTATE {code})",
                                   fatal_auth=code in AUTH_FAILURE_CODES, code=code, sqlstate=code,
                                   server_message=text)
            elif kind == p.READY_FOR_QUERY:
                self.state.reported = frozenset(self.state.params)
                self.state.login_params = dict(self.state.params)
                self.done = True
                self.result = self.state
                self.leftover = bytes(self.reader.buf)
                break
            elif kind in (p.NOTICE_RESPONSE, p.NEGOTIATE_PROTOCOL_VERSION):
                continue
            else:
                raise BackendError(f"backend sent unexpected message {chr(kind)!r} during login")
        return b"".join(out)

    def _password(self) -> str:
        if self.target.password is None:
            raise BackendError(
                f"backend {self.target.host}:{self.target.port} asks for a password for user {self.target.user!r} "
                "but none is configured: add [[clusters.NAME.credentials]] with password_env, password_file or "
                "password_command", fatal_auth=True)
        return self.target.password

    def _authentication(self, body: bytes) -> bytes:
        code = p.INT32.unpack_from(body, 0)[0]
        data = body[4:]
        if code == p.AUTH_OK:
            return b""
        if code == p.AUTH_CLEARTEXT:
            return p.message(b"p", p.cstring(self._password()))
        if code == p.AUTH_MD5:
            return p.message(b"p", md5_password_response(self.target.user, self._password(), data[:4]) + b"\x00")
        if code == p.AUTH_SASL:
            mechanisms = [m.decode() for m in data.split(b"\x00") if m]
            if "SCRAM-SHA-256" not in mechanisms:
                raise BackendError(f"backend offers SASL mechanisms {mechanisms}; multiproxy supports SCRAM-SHA-256")
            self.scram = ScramClient(self.target.user, self._password())
            first = self.scram.client_first()
            return p.message(b"p", p.cstring("SCRAM-SHA-256") + p.INT32.pack(len(first)) + first)
        if code == p.AUTH_SASL_CONTINUE:
            try:
                return p.message(b"p", self.scram.handle_server_first(data))
            except (AuthError, AttributeError) as exc:
                raise BackendError(f"SCRAM exchange with the backend failed: {exc}", fatal_auth=True) from None
        if code == p.AUTH_SASL_FINAL:
            try:
                self.scram.verify_server_final(data)
            except (AuthError, AttributeError) as exc:
                raise BackendError(f"the backend's SCRAM signature is wrong: {exc}", fatal_auth=True) from None
            return b""
        raise BackendError(f"backend asks for authentication method {code}, which multiproxy does not support "
                           "(supported: trust, password, md5, scram-sha-256)")


class PostgresCancel(BackendScript):
    """Sends a CancelRequest with the backend's own key on a fresh connection; the server answers nothing."""

    def __init__(self, state: PostgresServerState):
        self.state = state
        self.done = False
        self.wants_tls = False

    def start(self) -> bytes:
        self.done = True
        return p.cancel_request(self.state.pid, self.state.secret)

    def feed(self, data: bytes) -> bytes:
        return b""


class PostgresProbe(BackendScript):
    """After logging in, asks whether the node is a writer and, on a standby, how far its replay lags.

    Result: {"role": "writer" | "reader", "lag": seconds or None, "lag_bytes": int or None, "skip": None}.
    A standby that has replayed all the WAL it received lags 0, however long ago its last transaction was
    (an idle cluster is not behind); otherwise its lag is the replay delay, now() minus the commit time of
    the last replayed transaction, and lag_bytes the received WAL not yet replayed. A standby that never
    streamed (restored from the archive: no receive position) reports the replay delay and lag_bytes None.
    """

    # Columns: reader? (in recovery, or transactions default to read-only), in recovery?, lag, lag_bytes.
    # The receive position is where streaming ended; a replay position at or past it means nothing received
    # waits (after a restart replay may run ahead of a receiver that has not reconnected yet). Without a
    # receive position (never streamed) the comparisons are NULL and the replay delay decides; without a
    # replayed transaction that delay is unknown (NULL).
    SQL = ("SELECT s.rec OR current_setting('default_transaction_read_only')::bool, s.rec, "
           "CASE WHEN NOT s.rec OR s.recv <= s.rep THEN 0 "
           "WHEN s.ts IS NULL THEN NULL ELSE GREATEST(0, EXTRACT(EPOCH FROM (now() - s.ts))) END, "
           "CASE WHEN NOT s.rec OR s.recv <= s.rep THEN 0 "
           "ELSE pg_catalog.pg_wal_lsn_diff(s.recv, s.rep)::bigint END "
           "FROM (SELECT pg_catalog.pg_is_in_recovery() AS rec, pg_catalog.pg_last_wal_receive_lsn() AS recv, "
           "pg_catalog.pg_last_wal_replay_lsn() AS rep, pg_catalog.pg_last_xact_replay_timestamp() AS ts) AS s")

    def __init__(self, target: BackendTarget):
        self.login = PostgresLogin(target)
        self.reader = None
        self.done = False
        self.result = None
        self.row: list = []

    @property
    def wants_tls(self):
        return self.login.wants_tls

    def start(self) -> bytes:
        return self.login.start()

    def tls_established(self) -> bytes:
        return self.login.tls_established()

    def feed(self, data: bytes) -> bytes:
        if not self.login.done:
            out = self.login.feed(data)
            if not self.login.done:
                return out
            self.reader = _MessageReader()
            data = self.login.leftover
            out += p.query(self.SQL)
            if not data:
                return out
            return out + self._read(data)
        return self._read(data)

    def _read(self, data: bytes) -> bytes:
        for kind, body in self.reader.feed(data):
            if kind == ord("D"):
                count = p.INT16.unpack_from(body, 0)[0]
                pos = 2
                row = []
                for _ in range(count):
                    size = p.INT32.unpack_from(body, pos)[0]
                    pos += 4
                    row.append(None if size < 0 else body[pos:pos + size].decode())
                    pos += max(size, 0)
                self.row = row
            elif kind == p.ERROR_RESPONSE:
                code, text = backend_error_text(body)
                raise BackendError(f"role probe failed: {text} (SQLSTATE {code})")
            elif kind == p.READY_FOR_QUERY:
                self.result = self.parse_row(self.row)
                self.done = True
                return p.message(b"X")
        return b""

    @staticmethod
    def parse_row(row: list) -> dict:
        """The probe's result from its one row of text values (see SQL)."""
        if len(row) < 4 or row[0] not in ("t", "f") or row[1] not in ("t", "f"):
            raise BackendError(f"role probe: unexpected answer {row!r}")
        if row[0] == "f":
            return {"role": "writer", "lag": 0.0, "lag_bytes": 0, "skip": None}
        if row[1] == "f":
            # Read-only by configuration but not in recovery: it replicates from nothing, so what it serves
            # falls behind the writer from now on (a demoted primary). Not a writer, and no reader either.
            return {"role": "reader", "lag": None, "lag_bytes": None,
                    "skip": "read-only (default_transaction_read_only) but not a standby: it replicates from nothing"}
        try:
            lag = max(0.0, float(row[2])) if row[2] is not None else None
            lag_bytes = max(0, int(row[3])) if row[3] is not None else None
        except ValueError:
            raise BackendError(f"role probe: unexpected answer {row!r}") from None
        return {"role": "reader", "lag": lag, "lag_bytes": lag_bytes, "skip": None}


class PostgresQuery(BackendScript):
    """Runs `sql` as one simple Query on a logged-in backend (the cluster's init_query, the read of max_connections)
    and reads to its ReadyForQuery. Parameters it changes (ParameterStatus) update `state`, its login parameters
    included, so clients are greeted with them. Result: the first row's values as text ([] without rows); an
    ErrorResponse raises BackendError with the server's SQLSTATE and text."""

    def __init__(self, sql: str, state: PostgresServerState, what: str = "query"):
        self.sql = sql
        self.state = state
        self.what = what
        self.reader = _MessageReader()
        self.done = False
        self.wants_tls = False
        self.result = None
        self.row: list | None = None
        self.error: BackendError | None = None

    def start(self) -> bytes:
        return p.query(self.sql)

    def feed(self, data: bytes) -> bytes:
        state = self.state
        for kind, body in self.reader.feed(data):
            if kind == p.DATA_ROW and self.row is None:
                count = p.INT16.unpack_from(body, 0)[0]
                pos, row = 2, []
                for _ in range(count):
                    size = p.INT32.unpack_from(body, pos)[0]
                    pos += 4
                    row.append(None if size < 0 else body[pos:pos + size].decode("utf-8", "replace"))
                    pos += max(size, 0)
                self.row = row
            elif kind == p.PARAMETER_STATUS:
                name, end = p.read_cstring(body, 0)
                value, _ = p.read_cstring(body, end)
                low = name.lower()
                state.params[low] = state.login_params[low] = value
                state.canonical[low] = name
            elif kind == p.ERROR_RESPONSE and self.error is None:
                code, text = backend_error_text(body)
                self.error = BackendError(f"the backend refused the {self.what}: {text} (SQLSTATE {code})",
                                          code=code, sqlstate=code, server_message=text)
            elif kind == p.READY_FOR_QUERY:
                if self.error is not None:
                    raise self.error
                if body[:1] != b"I":
                    raise BackendError(f"the {self.what} left a transaction open; end it with COMMIT")
                self.done = True
                self.result = self.row or []
                break
        return b""
