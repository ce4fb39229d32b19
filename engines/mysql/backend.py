"""Sans-IO conversations with a MySQL/MariaDB backend: login (TLS, native, caching_sha2, ed25519), KILL QUERY cancel, role probe."""
from __future__ import annotations

import dataclasses
import struct
from collections import OrderedDict
from dataclasses import dataclass, field

from multiproxy.engine import BackendError, BackendScript, BackendTarget

from . import protocol as p
from .auth import (
    CACHING_SHA2, CLEAR, ED25519, NATIVE, SHA256_PASSWORD, ed25519_sign, native_scramble, rsa_encrypt_password,
    sha2_scramble,
)

# What the proxy asks of every backend; the client-dependent bits come from the pool variant.
BACKEND_BASE_CAPABILITIES = (p.CLIENT_LONG_PASSWORD | p.CLIENT_LONG_FLAG | p.CLIENT_CONNECT_WITH_DB
                             | p.CLIENT_PROTOCOL_41 | p.CLIENT_TRANSACTIONS | p.CLIENT_SECURE_CONNECTION
                             | p.CLIENT_PLUGIN_AUTH | p.CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA | p.CLIENT_CONNECT_ATTRS
                             | p.CLIENT_MULTI_RESULTS | p.CLIENT_PS_MULTI_RESULTS)
DEFAULT_CHARSET = 45            # utf8mb4_general_ci
ACCESS_DENIED_CODES = frozenset({1045, 1044, 1698, 1862})


@dataclass
class MySQLServerState:
    """What the proxy knows about one backend connection."""

    version: bytes = b""
    thread_id: int = 0
    capabilities: int = 0          # negotiated: what the proxy asked and the server has
    charset: int = DEFAULT_CHARSET
    status: int = p.SERVER_STATUS_AUTOCOMMIT
    login_status: int = p.SERVER_STATUS_AUTOCOMMIT
    schema: str = ""
    login_schema: str = ""
    variables: dict = field(default_factory=dict)   # tracked settings in effect beyond the login's defaults
    multi_statements: bool = False
    mariadb: bool = False
    # (SQL text, schema) -> statements.BackendStatement, least recently used first (statements.py)
    prepared: OrderedDict = field(default_factory=OrderedDict)
    last_key: tuple | None = None                   # the statement prepared last (MariaDB's id 0xFFFFFFFF)
    stale_statements: list = field(default_factory=list)   # ids to COM_STMT_CLOSE with the next request

    @property
    def tx_variables(self) -> tuple[str, str]:
        """Names of the isolation and read-only variables on this server."""
        if self.mariadb:
            try:
                major, minor = (int(x) for x in self.version.split(b"-MariaDB")[0].split(b"-")[-1].split(b".")[:2])
            except ValueError:
                major, minor = 10, 0
            if (major, minor) < (11, 1):
                return "tx_isolation", "tx_read_only"
        return "transaction_isolation", "transaction_read_only"

    @property
    def supports_last_statement_id(self) -> bool:
        """MariaDB executes statement id 0xFFFFFFFF as 'the statement prepared last' (pipelined re-prepare)."""
        return self.mariadb


class PacketReader:
    """Splits a byte stream into (sequence id, payload) packets (logins and scripts: no 16 MiB payloads)."""

    def __init__(self):
        self.buf = bytearray()

    def feed(self, data: bytes):
        self.buf += data
        buf = self.buf
        while len(buf) >= 4:
            length, seq = p.header(buf)
            if len(buf) < 4 + length:
                return
            payload = bytes(buf[4:4 + length])
            del buf[:4 + length]
            yield seq, payload


class MySQLLogin(BackendScript):
    """Logs in to a backend as `target.user`; `target.params` may carry the client-dependent capabilities and charset."""

    def __init__(self, target: BackendTarget, extra_capabilities: int | None = None):
        self.target = target
        self.reader = PacketReader()
        self.state = MySQLServerState()
        self.phase = "greeting"
        self.done = False
        self.wants_tls = False
        self.tls = False
        self.result = None
        self.seq = 0
        self.nonce = b""
        self.plugin = b""
        self.extra = target.params.get("capabilities", 0) if extra_capabilities is None else extra_capabilities
        self.charset = target.params.get("charset", DEFAULT_CHARSET) or DEFAULT_CHARSET
        self.caps = 0

    def start(self) -> bytes:
        return b""

    def _password(self) -> str:
        return self.target.password or ""

    def _send(self, payload: bytes) -> bytes:
        self.seq = (self.seq + 1) & 0xFF
        return p.packet(self.seq, payload)

    def tls_established(self) -> bytes:
        self.wants_tls = False
        self.tls = True
        return self._response()

    def feed(self, data: bytes) -> bytes:
        out = []
        for seq, payload in self.reader.feed(data):
            self.seq = seq
            if self.phase == "greeting":
                out.append(self._greeting(payload))
                if self.wants_tls:
                    break
            else:
                out.append(self._auth(payload))
                if self.done:
                    self.leftover = bytes(self.reader.buf)
                    break
        return b"".join(out)

    def _greeting(self, payload: bytes) -> bytes:
        if payload[:1] == bytes((p.ERR_HEADER,)):
            self._refused(payload)      # instead of a greeting: too many connections, host blocked
        try:
            hello = p.parse_handshake_v10(payload)
        except (ValueError, IndexError, struct.error) as exc:
            raise BackendError(f"backend {self.target.host}:{self.target.port}: malformed handshake: {exc}") from None
        state = self.state
        state.version = hello["version"]
        state.thread_id = hello["thread_id"]
        state.mariadb = b"mariadb" in hello["version"].lower()
        self.nonce = hello["nonce"]
        self.plugin = hello["plugin"] or NATIVE
        server_caps = hello["capabilities"]
        caps = (BACKEND_BASE_CAPABILITIES | self.extra) & (server_caps | p.CLIENT_LONG_PASSWORD)
        if self.target.database:
            caps |= p.CLIENT_CONNECT_WITH_DB
        else:
            caps &= ~p.CLIENT_CONNECT_WITH_DB
        self.caps = caps
        self.phase = "auth"
        wants = self.target.tls not in ("disable", "allow")
        if wants and server_caps & p.CLIENT_SSL:
            self.caps |= p.CLIENT_SSL
            self.wants_tls = True
            return self._send(p.ssl_request(self.caps, self.charset))
        if self.target.tls in ("require", "verify-ca", "verify-full"):
            raise BackendError(f"backend {self.target.host}:{self.target.port} does not offer TLS but "
                               f"clusters.*.backend.tls is {self.target.tls!r}")
        return self._response()

    def _refused(self, payload: bytes):
        """The server's ERR packet during the login, as a BackendError carrying its code, SQLSTATE and text."""
        code, sqlstate, message = p.parse_err(payload)
        raise BackendError(f"backend refused the login of {self.target.user!r}: {message} "
                           f"(error {code}, SQLSTATE {sqlstate})", fatal_auth=code in ACCESS_DENIED_CODES,
                           code=str(code), sqlstate=sqlstate, server_message=message)

    def _scramble(self, plugin: bytes, nonce: bytes) -> bytes:
        password = self._password()
        if plugin == NATIVE:
            return native_scramble(password, nonce)
        if plugin == CACHING_SHA2:
            return sha2_scramble(password, nonce)
        if plugin == ED25519:
            return ed25519_sign(password, nonce[:32])
        if plugin in (CLEAR, SHA256_PASSWORD):
            if not self.tls and plugin == CLEAR:
                raise BackendError("backend asks for the cleartext password without TLS; enable TLS toward it "
                                   "(clusters.*.backend.tls = 'require')", fatal_auth=True)
            if self.tls:
                return password.encode() + b"\x00"
            return b"\x01"      # sha256_password without TLS: ask for the public key
        raise BackendError(f"backend asks for authentication plugin {plugin.decode(errors='replace')!r}; multiproxy "
                           "supports mysql_native_password, caching_sha2_password and client_ed25519", fatal_auth=True)

    def _response(self) -> bytes:
        plugin = self.plugin if self.plugin in (NATIVE, CACHING_SHA2) else NATIVE
        auth = self._scramble(plugin, self.nonce)
        self.plugin = plugin
        payload = p.handshake_response(self.caps, self.charset, self.target.user.encode(), auth,
                                       self.target.database.encode(), plugin,
                                       {"_client_name": "multiproxy", "program_name": "multiproxy"})
        return self._send(payload)

    def _auth(self, payload: bytes) -> bytes:
        if not payload:
            raise BackendError("backend sent an empty packet during login")
        head = payload[0]
        if head == p.OK_HEADER:
            state = self.state
            state.capabilities = self.caps
            state.charset = self.charset
            try:
                state.status = p.ok_status(payload)
            except (IndexError, ValueError, struct.error):
                state.status = p.SERVER_STATUS_AUTOCOMMIT
            state.login_status = state.status
            state.schema = state.login_schema = self.target.database
            state.multi_statements = bool(self.caps & p.CLIENT_MULTI_STATEMENTS)
            self.done = True
            self.result = state
            return b""
        if head == p.ERR_HEADER:
            self._refused(payload)
        if head == p.AUTH_SWITCH_REQUEST:
            end = payload.find(b"\x00", 1)
            plugin = payload[1:end] if end > 0 else payload[1:]
            nonce = payload[end + 1:] if end > 0 else b""
            if nonce.endswith(b"\x00") and bytes(plugin) != ED25519:
                nonce = nonce[:-1]      # (the NUL after a scramble; ed25519's 32 random bytes may end with a zero)
            self.plugin, self.nonce = bytes(plugin), bytes(nonce) or self.nonce
            return self._send(self._scramble(self.plugin, self.nonce))
        if head == p.AUTH_MORE_DATA:
            data = payload[1:]
            if self.plugin == CACHING_SHA2 and len(data) == 1:
                if data[0] == p.CACHING_SHA2_FAST_AUTH_SUCCESS:
                    return b""
                if data[0] == p.CACHING_SHA2_PERFORM_FULL_AUTHENTICATION:
                    if self.tls:
                        return self._send(self._password().encode() + b"\x00")
                    return self._send(bytes((p.CACHING_SHA2_REQUEST_PUBLIC_KEY,)))
            if data.startswith(b"-----BEGIN"):
                try:
                    return self._send(rsa_encrypt_password(data, self._password(), self.nonce))
                except ValueError as exc:
                    raise BackendError(f"backend sent an unusable RSA public key: {exc}") from None
            raise BackendError(f"backend sent unexpected authentication data during login ({len(data)} bytes)")
        raise BackendError(f"backend sent unexpected packet 0x{head:02x} during login")


def com_query(sql: str) -> bytes:
    return p.packet(0, bytes((p.COM_QUERY,)) + sql.encode("utf-8"))


COM_QUIT_PACKET = p.packet(0, bytes((p.COM_QUIT,)))


class _TextResult:
    """Collects one text-protocol result (no CLIENT_DEPRECATE_EOF): column names and rows, or the error."""

    def __init__(self):
        self.state = "start"
        self.columns: list[str] = []
        self.rows: list[list] = []
        self.count = 0
        self.error = None
        self.done = False

    def feed(self, payload: bytes) -> None:
        head = payload[0] if payload else 0
        if self.state == "start":
            if head == p.OK_HEADER:
                self.done = True
            elif head == p.ERR_HEADER:
                self.error = p.parse_err(payload)
                self.done = True
            else:
                self.count = p.read_lenenc_int(payload, 0)[0]
                self.state = "columns"
        elif self.state == "columns":
            pos = 0
            for _ in range(4):          # catalog, schema, table, org_table
                _, pos = p.read_lenenc_str(payload, pos)
            name, _ = p.read_lenenc_str(payload, pos)
            self.columns.append(name.decode("utf-8", "replace"))
            if len(self.columns) == self.count:
                self.state = "eof"
        elif self.state == "eof":
            self.state = "rows"
        elif self.state == "rows":
            if head == p.EOF_HEADER and len(payload) < 9:
                self.done = True
            elif head == p.ERR_HEADER:
                self.error = p.parse_err(payload)
                self.done = True
            else:
                row, pos = [], 0
                for _ in range(self.count):
                    if payload[pos] == 0xFB:
                        row.append(None)
                        pos += 1
                    else:
                        value, pos = p.read_lenenc_str(payload, pos)
                        row.append(value.decode("utf-8", "replace"))
                self.rows.append(row)


class _QueriesAfterLogin(BackendScript):
    """Logs in with the target's credentials, then runs queries one by one and collects their results."""

    def __init__(self, target: BackendTarget, queries: list[str]):
        # No default database: the probe and cancel users need not own one.
        self.login = MySQLLogin(dataclasses.replace(target, database="", params={}), extra_capabilities=0)
        self.queries = list(queries)
        self.results: list[_TextResult] = []
        self.reader = PacketReader()
        self.done = False
        self.result = None

    @property
    def wants_tls(self):
        return self.login.wants_tls

    def start(self) -> bytes:
        return self.login.start()

    def tls_established(self) -> bytes:
        return self.login.tls_established()

    def _next(self) -> bytes:
        if self.results and self.results[-1].error is not None and self.stop_on_error(self.results[-1]):
            return b""
        if not self.queries:
            self.finish()
            self.done = True
            return COM_QUIT_PACKET
        self.results.append(_TextResult())
        return com_query(self.queries.pop(0))

    def stop_on_error(self, result) -> bool:
        return False

    def finish(self) -> None:
        pass

    def feed(self, data: bytes) -> bytes:
        if not self.login.done:
            out = self.login.feed(data)
            if not self.login.done:
                return out
            data = self.login.leftover
            out += self._next()
            return out + (self._read(data) if data else b"")
        return self._read(data)

    def _read(self, data: bytes) -> bytes:
        out = b""
        try:
            for _seq, payload in self.reader.feed(data):
                result = self.results[-1]
                result.feed(payload)
                if result.done:
                    out += self._next()
                    if self.done:
                        break
        except (IndexError, ValueError, struct.error) as exc:
            raise BackendError(f"backend sent a malformed result: {exc}") from None
        return out


class MySQLCancel(_QueriesAfterLogin):
    """KILL QUERY <backend thread id> over a fresh, logged-in connection."""

    def __init__(self, target: BackendTarget, state: MySQLServerState):
        super().__init__(target, [f"KILL QUERY {int(state.thread_id)}"])

    def finish(self) -> None:
        error = self.results[0].error if self.results else None
        if error is not None and error[0] != 1094:      # 1094: unknown thread (it finished meanwhile)
            raise BackendError(f"KILL QUERY failed: {error[2]} (error {error[0]})")


class MySQLProbe(_QueriesAfterLogin):
    """Role and lag: @@read_only and @@innodb_read_only, then the replica status.

    Result: {"role": "writer" | "reader", "lag": seconds or None, "lag_bytes": int or None, "skip": None or why
    the node must not serve reads}. A node with replica status is a reader whose lag is Seconds_Behind_Master
    (Seconds_Behind_Source) while both replication threads run; when one does not, or the server cannot tell
    its lag (NULL), lag is None and `skip` says why, naming the columns' values and the last error. A read-only
    node without replica status is a standalone reader: lag 0.0.
    """

    def __init__(self, target: BackendTarget):
        super().__init__(target, ["SELECT @@global.read_only, @@global.innodb_read_only"])
        self.replica_query_added = False

    def _next(self) -> bytes:
        if len(self.results) == 1 and not self.replica_query_added and self.results[0].done:
            self.replica_query_added = True
            self.queries.append(replica_status_query(self.login.state.version))
        return super()._next()

    def finish(self) -> None:
        first = self.results[0] if self.results else None
        if first is None or first.error is not None:
            raise BackendError(f"role probe failed: {first.error[2] if first else 'no answer'}")
        row = first.rows[0] if first.rows else ["0", "0"]
        read_only = any(v not in (None, "0", "OFF") for v in row)
        replica = self.results[1] if len(self.results) > 1 else None
        if replica is None:
            status = None
        elif replica.error is not None:
            status = replica.error          # no privilege to read it (REPLICATION CLIENT / SLAVE MONITOR)
        else:
            status = [dict(zip(replica.columns, r)) for r in replica.rows]
        self.result = probe_result(read_only, status)


def replica_status_query(version: bytes) -> str:
    """SHOW REPLICA STATUS where the server knows it (MariaDB 10.5, MySQL 8.0.22), else SHOW SLAVE STATUS."""
    version = version.lower()
    try:
        numbers = tuple(int(x) for x in version.split(b"-")[0].split(b".")[:3])
    except ValueError:
        return "SHOW REPLICA STATUS"
    return "SHOW SLAVE STATUS" if numbers < ((10, 5) if b"mariadb" in version else (8, 0, 22)) else \
        "SHOW REPLICA STATUS"


def _column(record: dict, *names: str):
    for name in names:
        if name in record:
            return record[name]
    return None


def probe_result(read_only: bool, status) -> dict:
    """The probe's result from the read-only flags and the replica status: None (not asked), an error tuple
    (the status could not be read), or its rows as dicts (column name -> text value or None)."""
    if isinstance(status, list) and status:
        record = status[0]
        io = _column(record, "Slave_IO_Running", "Replica_IO_Running")
        sql = _column(record, "Slave_SQL_Running", "Replica_SQL_Running")
        seconds = _column(record, "Seconds_Behind_Master", "Seconds_Behind_Source")
        result = {"role": "reader", "lag": None, "lag_bytes": _relay_backlog(record), "skip": None}
        if io != "Yes" or sql != "Yes":
            names = ("Replica_IO_Running", "Replica_SQL_Running") if "Replica_IO_Running" in record else \
                ("Slave_IO_Running", "Slave_SQL_Running")
            state = "stopped" if "No" in (io, sql) else "not running"
            reason = f"replication is {state} ({names[0]} = {io}, {names[1]} = {sql})"
            errors = [f"{name}: {_short(record.get(name))}" for name in ("Last_IO_Error", "Last_SQL_Error")
                      if record.get(name)]
            result["skip"] = reason + ("; " + "; ".join(errors) if errors else "")
            return result
        try:
            result["lag"] = max(0.0, float(seconds)) if seconds is not None else None
        except ValueError:
            result["lag"] = None
        if result["lag"] is None:
            column = "Seconds_Behind_Source" if "Seconds_Behind_Source" in record else "Seconds_Behind_Master"
            result["skip"] = f"replication lag is unknown ({column} = {seconds if seconds is not None else 'NULL'})"
        return result
    if not read_only:
        return {"role": "writer", "lag": 0.0, "lag_bytes": 0, "skip": None}
    if isinstance(status, tuple):
        # A read-only node whose replica status this user may not read: a reader of unknown lag.
        return {"role": "reader", "lag": None, "lag_bytes": None, "skip": None}
    # Read-only without replication (a demoted primary, or one being rebuilt before it replicates): what it
    # serves falls behind the writer from now on. Not a writer, and no reader either.
    return {"role": "reader", "lag": None, "lag_bytes": None,
            "skip": "read-only but not replicating (no replica status)"}


def _short(text, limit: int = 160) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _relay_backlog(record: dict) -> int | None:
    """Bytes of the source's binary log read into the relay log but not yet executed, when both positions are in
    the same source log file (otherwise None)."""
    read_file = _column(record, "Master_Log_File", "Source_Log_File")
    exec_file = _column(record, "Relay_Master_Log_File", "Relay_Source_Log_File")
    read_pos = _column(record, "Read_Master_Log_Pos", "Read_Source_Log_Pos")
    exec_pos = _column(record, "Exec_Master_Log_Pos", "Exec_Source_Log_Pos")
    if not read_file or read_file != exec_file:
        return None
    try:
        return max(0, int(read_pos) - int(exec_pos))
    except (TypeError, ValueError):
        return None


def _com_set_option(option: int) -> bytes:
    return p.packet(0, bytes((p.COM_SET_OPTION,)) + struct.pack("<H", option))


class MySQLQuery(BackendScript):
    """Runs `sql` as one COM_QUERY on a logged-in backend (the cluster's init_query, the read of max_connections)
    and reads every result to the last (SERVER_MORE_RESULTS_EXISTS), in either EOF mode. Several statements run
    with multi-statements switched on for the query (COM_SET_OPTION) when the login did not ask for them, and off
    again after. Result: the first row's values as text ([] without rows); an ERR raises BackendError with the
    server's code, SQLSTATE and text."""

    def __init__(self, sql: str, state: MySQLServerState, what: str = "query"):
        self.sql = sql
        self.state = state
        self.what = what
        self.reader = PacketReader()
        self.deprecate_eof = bool(state.capabilities & p.CLIENT_DEPRECATE_EOF)
        self.steps = [com_query(sql)]
        if ";" in sql.strip().rstrip(";") and not state.multi_statements:
            self.steps = [_com_set_option(p.MYSQL_OPTION_MULTI_STATEMENTS_ON), self.steps[0],
                          _com_set_option(p.MYSQL_OPTION_MULTI_STATEMENTS_OFF)]
        self.phase = "start"
        self.columns = 0
        self.row: list | None = None
        self.done = False
        self.wants_tls = False
        self.result = None

    def start(self) -> bytes:
        return self.steps[0]

    def _refused(self, payload: bytes):
        code, sqlstate, text = p.parse_err(payload)
        return BackendError(f"the backend refused the {self.what}: {text} (error {code}, SQLSTATE {sqlstate})",
                            code=str(code), sqlstate=sqlstate, server_message=text)

    def _step_done(self) -> bytes:
        self.steps.pop(0)
        self.phase = "start"
        if self.steps:
            return self.steps[0]
        self.done = True
        self.result = self.row or []
        return b""

    def _ended(self, status: int) -> bytes:
        self.state.status = status
        if status & p.SERVER_MORE_RESULTS_EXISTS:
            self.phase = "start"
            return b""
        return self._step_done()

    def feed(self, data: bytes) -> bytes:
        out = b""
        try:
            for _seq, payload in self.reader.feed(data):
                head = payload[0] if payload else 0
                if head == p.ERR_HEADER and self.phase in ("start", "rows"):
                    raise self._refused(payload)
                if self.phase == "start":
                    if head == p.OK_HEADER or (head == p.EOF_HEADER and len(payload) < 9):
                        out += self._ended(p.terminator_status(payload) if head == p.EOF_HEADER
                                           else p.ok_status(payload))
                    else:
                        self.columns = p.read_lenenc_int(payload, 0)[0]
                        self.phase = "columns"
                elif self.phase == "columns":
                    self.columns -= 1
                    if self.columns <= 0:
                        self.phase = "rows" if self.deprecate_eof else "eof"
                elif self.phase == "eof":
                    self.phase = "rows"
                elif head == p.EOF_HEADER and len(payload) < 0xFFFFFF and (self.deprecate_eof or len(payload) < 9):
                    out += self._ended(p.terminator_status(payload))
                elif self.row is None:
                    row, pos = [], 0
                    while pos < len(payload):
                        if payload[pos] == 0xFB:
                            row.append(None)
                            pos += 1
                        else:
                            value, pos = p.read_lenenc_str(payload, pos)
                            row.append(bytes(value).decode("utf-8", "replace"))
                    self.row = row
                if self.done:
                    break
        except (IndexError, ValueError, struct.error) as exc:
            raise BackendError(f"backend sent a malformed answer to the {self.what}: {exc}") from None
        return out
