"""One MySQL client connection, sans-IO: handshake and authentication, then transaction-aware relaying of commands.

The relay walks packet headers only. It decodes what policy needs: the command byte and the SQL of
COM_QUERY (pin detection, tracked settings, KILL), the first bytes of each response packet (to find where
a response ends) and the status flags of OK/EOF packets (transaction state, autocommit, more results).
"""
from __future__ import annotations

import os
import re
import struct
from collections import deque

from multiproxy.engine import (
    HELD_REFUSAL, AuthFailed, Authenticated, ClientContext, ClientProtocol, ClientQuit, CloseClient, ErrorKind,
    PinReason, ProtocolError, SendToClient, StartClientTLS,
)

from . import protocol as p
from multiproxy.token_auth import TokenRejected

from .auth import (
    CACHING_SHA2, CLEAR, NATIVE, AuthError, native_check, parse_caching_sha2_verifier, parse_native_verifier,
    rsa_decrypt_password, rsa_public_pem, sha2_check, sha2_check_cleartext,
)
from .pinning import CHARSET_VARIABLES, NAMES, TRACKED, classify, might_matter

DEFAULT_SERVER_VERSION = "5.5.5-10.11.0-MariaDB-multiproxy"
# What the proxy offers clients (no compression, no session tracking, no MariaDB extended capabilities:
# CLIENT_LONG_PASSWORD set means "a MySQL server", so MariaDB clients use no bulk or COM_MULTI commands).
SERVER_CAPABILITIES = (p.CLIENT_LONG_PASSWORD | p.CLIENT_FOUND_ROWS | p.CLIENT_LONG_FLAG | p.CLIENT_CONNECT_WITH_DB
                       | p.CLIENT_NO_SCHEMA | p.CLIENT_ODBC | p.CLIENT_LOCAL_FILES | p.CLIENT_IGNORE_SPACE
                       | p.CLIENT_PROTOCOL_41 | p.CLIENT_INTERACTIVE | p.CLIENT_IGNORE_SIGPIPE | p.CLIENT_TRANSACTIONS
                       | p.CLIENT_RESERVED | p.CLIENT_SECURE_CONNECTION | p.CLIENT_MULTI_STATEMENTS
                       | p.CLIENT_MULTI_RESULTS | p.CLIENT_PS_MULTI_RESULTS | p.CLIENT_PLUGIN_AUTH
                       | p.CLIENT_CONNECT_ATTRS | p.CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA
                       | p.CLIENT_CAN_HANDLE_EXPIRED_PASSWORDS | p.CLIENT_DEPRECATE_EOF)
# Client capabilities that change what a backend sends or accepts: clients differing in them use separate pools.
VARIANT_CAPABILITIES = (p.CLIENT_FOUND_ROWS | p.CLIENT_LOCAL_FILES | p.CLIENT_IGNORE_SPACE | p.CLIENT_INTERACTIVE
                        | p.CLIENT_MULTI_STATEMENTS | p.CLIENT_MULTI_RESULTS | p.CLIENT_PS_MULTI_RESULTS
                        | p.CLIENT_DEPRECATE_EOF)
# Login collation ids the proxy can name when it must restore a backend's character set.
COLLATIONS = {8: ("latin1", "latin1_swedish_ci"), 11: ("ascii", "ascii_general_ci"), 33: ("utf8", "utf8_general_ci"),
              45: ("utf8mb4", "utf8mb4_general_ci"), 46: ("utf8mb4", "utf8mb4_bin"), 63: ("binary", "binary"),
              83: ("utf8", "utf8_bin"), 224: ("utf8mb4", "utf8mb4_unicode_ci"), 255: ("utf8mb4", "")}

ERRORS = {   # ErrorKind -> (error code, SQLSTATE)
    ErrorKind.POOL_TIMEOUT: (p.ER_CON_COUNT_ERROR, "08004"),
    ErrorKind.BACKEND_UNAVAILABLE: (2003, "08S01"),
    ErrorKind.BACKEND_LOST: (2013, "08S01"),
    ErrorKind.AUTH_FAILED: (p.ER_ACCESS_DENIED_ERROR, "28000"),
    ErrorKind.PROTOCOL_VIOLATION: (p.ER_NET_PACKETS_OUT_OF_ORDER, "08S01"),
    ErrorKind.MESSAGE_TOO_LARGE: (p.ER_NET_PACKET_TOO_LARGE, "08S01"),
    ErrorKind.TOO_MANY_CONNECTIONS: (p.ER_CON_COUNT_ERROR, "08004"),
    ErrorKind.TLS_REQUIRED: (p.ER_SECURE_TRANSPORT_REQUIRED, "HY000"),
    ErrorKind.SHUTTING_DOWN: (p.ER_SERVER_SHUTDOWN, "08S01"),
    ErrorKind.FAILOVER: (2013, "08S01"),
    ErrorKind.IDLE_TIMEOUT: (p.ER_NET_READ_INTERRUPTED, "08S01"),
    ErrorKind.HANDSHAKE_TIMEOUT: (p.ER_HANDSHAKE_ERROR, "08S01"),
    ErrorKind.NOT_SUPPORTED: (p.ER_NOT_SUPPORTED_YET, "42000"),
    ErrorKind.INTERNAL: (p.ER_UNKNOWN_ERROR, "HY000"),
}


def render_error(kind: ErrorKind, message: str, seq: int = 1) -> bytes:
    code, sqlstate = ERRORS.get(kind, (p.ER_UNKNOWN_ERROR, "HY000"))
    return p.packet(seq, p.err_payload(code, sqlstate, f"multiproxy: {message}"))


# response kinds, what each outstanding command's answer looks like
R_GENERIC = 0        # OK, ERR, LOCAL INFILE request, or result sets (text or binary), MORE_RESULTS chains
R_SINGLE = 1         # exactly one packet (OK, ERR, EOF, or COM_STATISTICS' string)
R_PREPARE = 2        # COM_STMT_PREPARE_OK with parameter and column definitions, or ERR
R_FIELD_LIST = 3     # column definitions up to EOF, or ERR
R_ROWS = 4           # rows up to EOF (COM_STMT_FETCH), or ERR

# response parser states
S_START, S_COLUMNS, S_COLUMNS_EOF, S_ROWS, S_PARAMS, S_PARAMS_EOF, S_PREP_COLUMNS, S_PREP_COLUMNS_EOF = range(8)

_NO_ANSWER = frozenset((p.COM_STMT_CLOSE, p.COM_STMT_SEND_LONG_DATA))
_UNSUPPORTED = frozenset((p.COM_SLEEP, p.COM_CONNECT, p.COM_TIME, p.COM_DELAYED_INSERT, p.COM_BINLOG_DUMP,
                          p.COM_TABLE_DUMP, p.COM_CONNECT_OUT, p.COM_REGISTER_SLAVE, p.COM_DAEMON,
                          p.COM_BINLOG_DUMP_GTID, p.COM_SHUTDOWN))
_STATEMENT_COMMANDS = frozenset((p.COM_STMT_PREPARE, p.COM_STMT_EXECUTE, p.COM_STMT_SEND_LONG_DATA,
                                 p.COM_STMT_CLOSE, p.COM_STMT_RESET, p.COM_STMT_FETCH))
_RESPONSE_KIND = {p.COM_QUERY: R_GENERIC, p.COM_STMT_EXECUTE: R_GENERIC, p.COM_INIT_DB: R_SINGLE,
                  p.COM_PING: R_SINGLE, p.COM_STATISTICS: R_SINGLE, p.COM_SET_OPTION: R_SINGLE,
                  p.COM_RESET_CONNECTION: R_SINGLE, p.COM_STMT_RESET: R_SINGLE, p.COM_REFRESH: R_SINGLE,
                  p.COM_STMT_PREPARE: R_PREPARE, p.COM_FIELD_LIST: R_FIELD_LIST, p.COM_STMT_FETCH: R_ROWS,
                  p.COM_DEBUG: R_SINGLE, p.COM_PROCESS_INFO: R_GENERIC, p.COM_CREATE_DB: R_SINGLE,
                  p.COM_DROP_DB: R_SINGLE}


class _Pending:
    """One outstanding command: how its answer looks, whether the proxy sent it, what to record on success."""

    __slots__ = ("kind", "internal", "action", "failed")

    def __init__(self, kind: int, internal: bool = False, action=None):
        self.kind = kind
        self.internal = internal
        self.action = action        # callable(success: bool) run when the answer is complete
        self.failed = False


_PLAIN_QUERY = _Pending(R_GENERIC)      # shared: a query with nothing to record (the hot path allocates nothing)


_READ_ONLY_ERRORS = frozenset((
    1792,   # ER_CANT_EXECUTE_IN_READ_ONLY_TRANSACTION (the server's own transaction_read_only)
    1836,   # ER_READ_ONLY_MODE
))
_READ_ONLY_WORDS = re.compile(rb"read[\s_-]*only", re.IGNORECASE)


def _read_only_refusal(payload: bytes) -> bool:
    """An ERR packet saying the node is read-only: 1290 ER_OPTION_PREVENTS_STATEMENT naming --read-only or
    --super-read-only, 1792 or 1836."""
    if len(payload) < 3:
        return False
    code = payload[1] | (payload[2] << 8)
    if code == p.ER_OPTION_PREVENTS_STATEMENT:
        return b"read-only" in payload or b"read_only" in payload
    return code in _READ_ONLY_ERRORS


def _nonce() -> bytes:
    # 20 bytes without NUL (clients read the second part as a NUL-terminated string)
    return bytes(1 + b % 127 for b in os.urandom(20))


class MySQLClient(ClientProtocol):
    """Protocol state of one client: handshake, then the relay between the client and its current backend."""

    def __init__(self, ctx: ClientContext, engine):
        self.ctx = ctx
        self.engine = engine
        self.max_message = ctx.max_message_size
        self.options = ctx.engine_options or {}
        self.thread_id = ctx.cancel_key if isinstance(ctx.cancel_key, int) else 0
        self.nonce = _nonce()
        self.tls_active = False
        self.hbuf = bytearray()
        self.phase = "response"
        self.hseq = 0                   # sequence id of the last handshake packet received
        self.user = ""
        self.database = ""
        self.capabilities = 0
        self.charset = 45
        self.auth_plugin = b""
        self.verifier = None
        self.deprecate_eof = False
        self.logged_in = False
        self.ok_seq = 2
        self.greeting_prefix = b""
        # relay state
        self.fifo: deque = deque()
        self.rstate = S_START
        self.rcount = 0
        self.rcount2 = 0
        self.status = p.SERVER_STATUS_AUTOCOMMIT      # as the client last saw it
        self.autocommit = True
        self.last_insert_id = 0
        self.variables: dict[str, str] = {}          # tracked settings the client made (canonical name -> literal)
        self.schema = ""
        self.multi_statements = False
        self.linked = False
        self.server_state = None
        self.pinned = False
        self.pin_details: list = []
        self.closing = False
        self.requests = 0
        self.hold = 0                   # commands to complete before the backend may go (SET TRANSACTION)
        self.infile = False             # the client streams a LOCAL INFILE
        self.transaction_lost = False
        self.lost_error = b""
        self.release_due = False
        self.retry_read_only = ctx.retry_read_only
        self.retry_candidate = None     # a lone first COM_QUERY in flight, kept to resend if a read-only node refuses it
        self.retry_refusal = b""        # the held ERR packet of a read-only refusal (see retry_declined)
        self.retry_request = None       # the refused COM_QUERY while its refusal is held (HELD_REFUSAL)
        # partial packets
        self.cbuf = b""
        self.c_skip = 0
        self.c_more = False             # the last client packet was 16 MiB - 1: a continuation follows
        self.c_size = 0                 # bytes of the current (multi-packet) command so far
        self.c_seq = 0
        self.sbuf = b""
        self.s_skip = 0
        self.s_more = False

    # ------------------------------------------------------------------ handshake

    def start(self) -> bytes:
        version = (self.options.get("server_version") or self.engine.server_version or DEFAULT_SERVER_VERSION)
        caps = SERVER_CAPABILITIES | (p.CLIENT_SSL if self.ctx.tls_available else 0)
        plugin = CACHING_SHA2 if self._method() == "caching_sha2_password" else NATIVE
        return p.packet(0, p.handshake_v10(str(version).encode(), self.thread_id, self.nonce, caps, 45,
                                           p.SERVER_STATUS_AUTOCOMMIT, plugin))

    def _method(self) -> str:
        method = self.ctx.listener.auth
        # PostgreSQL method names (the listener default) mean the closest MySQL method.
        return {"scram-sha-256": "caching_sha2_password", "md5": "mysql_native_password"}.get(method, method)

    def _fatal(self, kind: ErrorKind, message: str) -> CloseClient:
        return CloseClient(render_error(kind, message, self.hseq + 1), message)

    def _reply(self, payload: bytes) -> bytes:
        """A handshake packet to the client; the client's next packet follows its sequence id."""
        self.hseq = (self.hseq + 1) & 0xFF
        return p.packet(self.hseq, payload)

    def _packet(self) -> tuple[int, bytes] | None:
        buf = self.hbuf
        if len(buf) < 4:
            return None
        length, seq = p.header(buf)
        if length > 65536:
            raise ProtocolError(f"handshake packet of {length} bytes", render_error(
                ErrorKind.PROTOCOL_VIOLATION, f"handshake packet of {length} bytes is too large", seq + 1))
        if len(buf) < 4 + length:
            return None
        payload = bytes(buf[4:4 + length])
        del buf[:4 + length]
        if seq != (self.hseq + 1) & 0xFF:
            raise ProtocolError("packets out of order", render_error(
                ErrorKind.PROTOCOL_VIOLATION, f"got packet sequence id {seq}, expected {self.hseq + 1} (packets out of order)",
                seq + 1))
        self.hseq = seq
        return seq, payload

    def handshake_read_size(self) -> int:
        """Before TLS, read the first packet exactly: a client sends its ClientHello right behind the SSL
        request without waiting, and those bytes belong to the TLS layer."""
        if self.phase != "response" or self.tls_active or not self.ctx.tls_available:
            return 16384
        have = len(self.hbuf)
        if have < 4:
            return 4 - have
        length = int.from_bytes(self.hbuf[:3], "little")
        return max(1, min(16384, 4 + length - have))

    def receive_handshake(self, data: bytes) -> list:
        self.hbuf += data
        events: list = []
        while True:
            if self.phase == "ready":
                break
            packet = self._packet()
            if packet is None:
                break
            _, payload = packet
            try:
                event = self._handshake_packet(payload)
            except (ValueError, IndexError, struct.error) as exc:
                raise ProtocolError(f"malformed handshake: {exc}", render_error(
                    ErrorKind.PROTOCOL_VIOLATION, f"malformed handshake response: {exc}", self.hseq + 1)) from None
            if event is not None:
                events.append(event)
            if events and isinstance(events[-1], (StartClientTLS, Authenticated, CloseClient, AuthFailed)):
                break
        return events

    def _handshake_packet(self, payload: bytes):
        if self.phase == "response":
            return self._handshake_response(payload)
        if self.phase == "switch":
            return self._check(self.auth_plugin, payload)
        if self.phase == "full":
            return self._full_auth(payload)
        raise ValueError("unexpected packet")

    def _handshake_response(self, payload: bytes):
        info = p.parse_handshake_response(payload)
        caps = info["capabilities"]
        if info["ssl_request"]:
            if not self.ctx.tls_available or self.tls_active:
                raise ValueError("SSL request, but TLS is not offered")
            if self.hbuf:
                raise ProtocolError("data after SSL request", render_error(
                    ErrorKind.PROTOCOL_VIOLATION, "received unencrypted data after the SSL request", self.hseq + 1))
            self.tls_active = True
            return StartClientTLS(b"")
        self.capabilities = caps & (SERVER_CAPABILITIES | p.CLIENT_SSL)
        self.deprecate_eof = bool(caps & p.CLIENT_DEPRECATE_EOF)
        self.multi_statements = bool(caps & p.CLIENT_MULTI_STATEMENTS)
        self.charset = info["charset"] or 45
        self.user = info["user"].decode("utf-8", "replace")
        self.database = info["database"].decode("utf-8", "replace") if caps & p.CLIENT_CONNECT_WITH_DB else ""
        self.schema = self.database
        if caps & p.CLIENT_COMPRESS and not SERVER_CAPABILITIES & p.CLIENT_COMPRESS:
            pass    # not offered, so not negotiated: the stream stays uncompressed
        ctx = self.ctx
        if ctx.listener.require_tls and not self.tls_active:
            return self._fatal(ErrorKind.TLS_REQUIRED,
                               f"listener {ctx.listener.name!r} requires TLS: connect with --ssl (ssl-mode=REQUIRED)")
        if not self.user:
            return self._fatal(ErrorKind.AUTH_FAILED, "no user name in the handshake response")
        record = ctx.users.get(self.user) if ctx.users is not None else None
        if record is not None and not record.may_use(ctx.listener.name):
            return self._denied("listener not allowed for user")
        method = self._method()
        if method == "trust":
            return self._authenticated()
        plugin = info["plugin"] if caps & p.CLIENT_PLUGIN_AUTH else NATIVE
        if method == "token":
            return self._ask_token(plugin, info["auth"])
        wanted = CACHING_SHA2 if method == "caching_sha2_password" else NATIVE
        verifiers = record.verifiers if record is not None else {}
        text = verifiers.get(method)
        try:
            if text is not None:
                self.verifier = (parse_caching_sha2_verifier(text) if wanted == CACHING_SHA2
                                 else parse_native_verifier(text))
        except ValueError:
            self.verifier = None
        self.auth_plugin = wanted
        if plugin != wanted:
            self.nonce = _nonce()
            self.phase = "switch"
            return SendToClient(self._reply(p.auth_switch_request(wanted, self.nonce + b"\x00")))
        return self._check(wanted, info["auth"])

    def _ask_token(self, plugin: bytes, response: bytes):
        """Token listeners, as RDS IAM authentication for MySQL: TLS first, then the token in cleartext
        (mysql_clear_password), which TLS protects. The greeting offered mysql_native_password, so a client that
        skipped TLS sent no more than a scramble before it is turned away."""
        if not self.tls_active:
            return self._fatal(ErrorKind.TLS_REQUIRED, f"listener {self.ctx.listener.name!r} authenticates with "
                               "tokens, which are only accepted over TLS: connect with --ssl (ssl-mode=REQUIRED) "
                               "and the cleartext plugin (mariadb/mysql: --enable-cleartext-plugin)")
        self.auth_plugin = CLEAR
        if plugin == CLEAR:
            return self._check_token(response)
        self.phase = "switch"
        return SendToClient(self._reply(p.auth_switch_request(CLEAR, self.nonce + b"\x00")))   # as servers do

    def _check_token(self, response: bytes):
        token = response.rstrip(b"\x00").decode("utf-8", "replace")
        verifier = self.ctx.listener.token_verifier
        try:
            if verifier is None:
                raise TokenRejected("no token verifier configured")
            verifier.verify(token, self.user)
        except TokenRejected as exc:
            message = (f"Access denied for user '{self.user}'@'{self.ctx.client_address[0]}' "
                       f"(token authentication failed: {exc})")
            data = p.packet(self.hseq + 1, p.err_payload(p.ER_ACCESS_DENIED_ERROR, "28000", message))
            return AuthFailed(self.user, data, f"token rejected: {exc}", "token_rejected")
        return self._authenticated()

    def _denied(self, reason: str):
        message = (f"Access denied for user '{self.user}'@'{self.ctx.client_address[0]}' "
                   f"(using password: {'YES' if self.verifier is not None or reason else 'NO'})")
        data = p.packet(self.hseq + 1, p.err_payload(p.ER_ACCESS_DENIED_ERROR, "28000", message))
        return AuthFailed(self.user, data, reason)

    def _check(self, plugin: bytes, response: bytes):
        if plugin == CLEAR:
            return self._check_token(response)
        if plugin == NATIVE:
            if self.verifier is not None and native_check(self.verifier, self.nonce, response):
                return self._authenticated()
            return self._denied("wrong mysql_native_password response")
        fast = str(self.options.get("caching_sha2_fast_auth", "true")).lower() not in ("false", "0", "no", "off")
        if fast and self.verifier is not None and sha2_check(self.verifier, self.nonce, response):
            self.phase = "ready"
            event = self._authenticated(more=p.packet(self.hseq + 1, bytes((p.AUTH_MORE_DATA,
                                                                           p.CACHING_SHA2_FAST_AUTH_SUCCESS))))
            return event
        if not response and not fast:
            pass
        self.phase = "full"
        return SendToClient(self._reply(bytes((p.AUTH_MORE_DATA, p.CACHING_SHA2_PERFORM_FULL_AUTHENTICATION))))

    def _full_auth(self, payload: bytes):
        if payload == bytes((p.CACHING_SHA2_REQUEST_PUBLIC_KEY,)):
            if self.tls_active:
                raise ValueError("public key requested over TLS")
            return SendToClient(self._reply(bytes((p.AUTH_MORE_DATA,)) + rsa_public_pem(self.engine.rsa_key())))
        if self.tls_active:
            password = payload.rstrip(b"\x00")
        else:
            try:
                password = rsa_decrypt_password(self.engine.rsa_key(), payload, self.nonce)
            except AuthError:
                return self._denied("undecryptable RSA password")
        if self.verifier is not None and sha2_check_cleartext(self.verifier, password):
            return self._authenticated()
        return self._denied("wrong caching_sha2_password (full authentication)")

    def _authenticated(self, more: bytes = b""):
        self.phase = "ready"
        self.ok_seq = self.hseq + 1 + (1 if more else 0)
        self.greeting_prefix = more
        leftover = bytes(self.hbuf)
        self.hbuf.clear()
        params = {"capabilities": self.capabilities & VARIANT_CAPABILITIES, "charset": self.charset}
        return Authenticated(self.user, self.database, params, leftover)

    def login_complete(self, server_state) -> bytes:
        """OK to the client (after the caching_sha2 fast-auth notice, if any)."""
        self.logged_in = True
        if server_state is not None:
            self.engine.server_version = server_state.version.decode("utf-8", "replace")
            self.autocommit = bool(server_state.login_status & p.SERVER_STATUS_AUTOCOMMIT)
        self.status = p.SERVER_STATUS_AUTOCOMMIT if self.autocommit else 0
        if self.ctx.read_only:
            # A reader listener's sessions are read-only on whichever node serves them (the writer too, when
            # readers fall back to it); the client may still turn that off for itself.
            self.variables.setdefault("tx_read_only", "1")
        return self.greeting_prefix + p.packet(self.ok_seq, p.ok_payload(self.status))

    # ------------------------------------------------------------------ relay: client to backend

    def _ok(self, seq: int = 1) -> bytes:
        return p.packet(seq, p.ok_payload(self.status, 0, 0))

    def _eof(self, seq: int = 1) -> bytes:
        if self.deprecate_eof:
            return p.packet(seq, p.ok_payload(self.status, header_byte=p.EOF_HEADER))
        return p.packet(seq, p.eof_payload(self.status))

    def _err(self, code: int, sqlstate: str, message: str, seq: int = 1) -> bytes:
        return p.packet(seq, p.err_payload(code, sqlstate, message))

    def client_data(self, data: bytes) -> tuple[bytes, bytes]:
        """Walk the client's packets; return (bytes for the backend, bytes answered locally)."""
        if self.cbuf:
            data = self.cbuf + data
            self.cbuf = b""
        n = len(data)
        pos = self.c_skip
        if pos >= n:
            self.c_skip = pos - n
            return data, b""
        self.c_skip = 0
        self.release_due = False
        local = []
        pieces = None          # kept slices when some packets are not forwarded as they are
        keep_from = 0
        forwarding = self.linked
        while pos < n:
            if n - pos < 4:
                self.cbuf = data[pos:]
                break
            length = data[pos] | (data[pos + 1] << 8) | (data[pos + 2] << 16)
            seq = data[pos + 3]
            end = pos + 4 + length
            if self.c_more or self.infile:
                # a continuation of a 16 MiB command, or LOCAL INFILE content: forwarded as it comes
                if self.c_more:
                    self.c_size += length
                    if self.c_size > self.max_message:
                        self._too_large(self.c_size)
                    self.c_more = length == p.MAX_PAYLOAD
                elif length == 0:
                    self.infile = False
                if end > n:
                    self.c_skip = end - n
                    pos = n
                    break
                pos = end
                continue
            if seq != 0:
                raise ProtocolError("packets out of order", render_error(
                    ErrorKind.PROTOCOL_VIOLATION,
                    f"a command must start with packet sequence id 0, got {seq} (packets out of order)", seq + 1))
            if length > self.max_message:
                self._too_large(length)
            if length == 0:
                raise ProtocolError("empty command packet", render_error(
                    ErrorKind.PROTOCOL_VIOLATION, "empty command packet", 1))
            if pos + 4 >= n:
                self.cbuf = data[pos:]
                break
            command = data[pos + 4]
            need_whole = command == p.COM_QUERY or command in (
                p.COM_INIT_DB, p.COM_PROCESS_KILL, p.COM_SET_OPTION, p.COM_CHANGE_USER)
            if need_whole and end > n and length < p.MAX_PAYLOAD:
                self.cbuf = data[pos:]
                break
            self.requests += 1
            replace = self._command(command, data, pos, end, length, local, forwarding)
            if replace is not None or (not forwarding and self._answered_locally):
                # this packet is not forwarded as it is
                if pieces is None:
                    pieces = []
                pieces.append(data[keep_from:pos])
                if replace:
                    pieces.append(replace)
                keep_from = min(end, n)
            else:
                forwarding = True
                if length == p.MAX_PAYLOAD:
                    self.c_more = True
                    self.c_size = length
            if self.closing:
                keep_from = n           # nothing after COM_QUIT is forwarded
                break
            if end > n:
                self.c_skip = end - n
                pos = n
                break
            pos = end
        forward_end = n - len(self.cbuf)
        if pieces is None:
            forward = data if forward_end == n and keep_from == 0 else data[keep_from:forward_end]
        else:
            if keep_from < forward_end:
                pieces.append(data[keep_from:forward_end])
            forward = b"".join(pieces)
        if forward and self.linked and self.server_state is not None and self.server_state.stale_statements:
            forward = self._close_stale(self.server_state) + forward
        if forward:
            # The first statement of a transaction, alone: if a read-only node refuses it (1290), nothing ran,
            # and it can be sent again to the new writer.
            self.retry_candidate = forward if (
                self.retry_read_only and not self.linked and not local and len(self.fifo) == 1
                and not self.fifo[0].internal and not self.status & p.SERVER_STATUS_IN_TRANS and not self.hold
                and not self.cbuf and not self.c_skip and not self.c_more and not self.infile
                and len(forward) > 4 and forward[4] == p.COM_QUERY and not self._asks_read_only(forward)) else None
        if self.closing:
            raise ClientQuit(forward, b"".join(local))
        return forward, b"".join(local)

    _answered_locally = False

    def _asks_read_only(self, request: bytes) -> bool:
        """Whether the session itself wants read-only transactions (SET SESSION TRANSACTION READ ONLY,
        tx_read_only / transaction_read_only, or such words in the request): a refusal is then its own doing."""
        value = self.variables.get("tx_read_only")
        if value is not None and value.strip("'\"").lower() in ("1", "on", "true"):
            return True
        return _READ_ONLY_WORDS.search(request, 5) is not None

    def retry_declined(self) -> tuple[bytes, bool]:
        """The node is still the writer: its refusal goes to the client, processed as the answer it is."""
        refusal, self.retry_refusal, self.retry_request = self.retry_refusal, b"", None
        after, self.sbuf = self.sbuf, b""
        out, release = self.backend_data(refusal)
        if after:
            self.sbuf = after
            release = False
        return out, release

    def retry_accepted(self) -> bytes:
        """The refused COM_QUERY, to send to the new writer (its answer is still awaited)."""
        request, self.retry_request, self.retry_refusal = self.retry_request, None, b""
        return request

    def _too_large(self, size: int) -> None:
        raise ProtocolError("message too large", render_error(
            ErrorKind.MESSAGE_TOO_LARGE,
            f"command of {size} bytes exceeds the proxy's limit of {self.max_message} bytes (proxy.max_message_size)", 1),
            ErrorKind.MESSAGE_TOO_LARGE)

    def _command(self, command: int, data: bytes, pos: int, end: int, length: int, local: list,
                 forwarding: bool) -> bytes | None:
        """Handle one command. Returns replacement bytes (b"" drops it) or None to forward it as it is.
        Sets self._answered_locally when the answer was appended to `local`."""
        self._answered_locally = False
        can_answer = not forwarding and not self.fifo
        if self.transaction_lost:
            if command == p.COM_QUIT:
                self.closing = True
                return b""
            if can_answer:
                self.transaction_lost = False
                local.append(self.lost_error)
                self._answered_locally = True
                return b""
        if command == p.COM_QUERY:
            sql = data[pos + 5:end]
            if might_matter(sql):
                return self._query(sql, local, can_answer)
            self.fifo.append(_PLAIN_QUERY)
            return None
        if command == p.COM_QUIT:
            self.closing = True
            return b""
        if command == p.COM_PING:
            if can_answer:
                local.append(self._ok())
                self._answered_locally = True
                return b""
            self.fifo.append(_Pending(R_SINGLE))
            return None
        if command == p.COM_INIT_DB:
            name = data[pos + 5:end].decode("utf-8", "replace")
            self.fifo.append(_Pending(R_SINGLE, action=lambda ok, name=name: self._schema_changed(ok, name)))
            return None
        if command in _STATEMENT_COMMANDS:
            return self._statement(command, local, can_answer)
        if command == p.COM_PROCESS_KILL:
            if length >= 5:
                self._kill(int.from_bytes(data[pos + 5:pos + 9], "little"), True)
            return self._answer_ok(local, can_answer)
        if command == p.COM_SET_OPTION:
            option = int.from_bytes(data[pos + 5:pos + 7], "little") if length >= 3 else -1
            if option not in (p.MYSQL_OPTION_MULTI_STATEMENTS_ON, p.MYSQL_OPTION_MULTI_STATEMENTS_OFF):
                if can_answer:
                    local.append(self._err(p.ER_UNKNOWN_COM_ERROR, "HY000", "Unknown command option"))
                    self._answered_locally = True
                    return b""
                self.fifo.append(_Pending(R_SINGLE))
                return None
            wanted = option == p.MYSQL_OPTION_MULTI_STATEMENTS_ON
            self.multi_statements = wanted
            if can_answer:
                local.append(self._eof())
                self._answered_locally = True
                return b""
            self.fifo.append(_Pending(R_SINGLE, action=lambda ok, w=wanted: self._set_server(ok, "multi_statements", w)))
            return None
        if command == p.COM_RESET_CONNECTION:
            self._client_reset()
            if can_answer:
                local.append(self._ok())
                self._answered_locally = True
                return b""
            self.fifo.append(_Pending(R_SINGLE, action=self._backend_was_reset))
            return None
        if command == p.COM_CHANGE_USER:
            return self._change_user(data[pos + 5:end], local, can_answer)
        if command in _UNSUPPORTED or command not in _RESPONSE_KIND:
            name = f"command 0x{command:02x}"
            if can_answer:
                local.append(self._err(p.ER_UNKNOWN_COM_ERROR, "08S01",
                                       f"multiproxy: {name} is not supported through the proxy; connect to the server directly"))
                self._answered_locally = True
                return b""
            raise ProtocolError(f"unsupported {name}", render_error(
                ErrorKind.NOT_SUPPORTED, f"{name} is not supported through the proxy", 1), ErrorKind.NOT_SUPPORTED)
        self.fifo.append(_Pending(_RESPONSE_KIND[command]))
        return None

    def _answer_ok(self, local: list, can_answer: bool) -> bytes:
        if can_answer:
            local.append(self._ok())
            self._answered_locally = True
            return b""
        # Linked: the backend answers a harmless statement instead, so that answers stay in order.
        self.fifo.append(_Pending(R_GENERIC))
        return p.packet(0, bytes((p.COM_QUERY,)) + b"DO 0")

    def _kill(self, thread_id: int, terminate: bool) -> None:
        """KILL QUERY cancels the statement the target runs; KILL [CONNECTION] also closes the target client."""
        cancel = getattr(self.ctx, "cancel", None)
        if cancel is not None:
            cancel(thread_id, terminate)

    def _query(self, sql: bytes, local: list, can_answer: bool) -> bytes | None:
        found = classify(bytes(sql).decode("utf-8", "replace"))
        if found.kill is not None:
            self._kill(found.kill[1], found.kill[0] == "connection")
            return self._answer_ok(local, can_answer)
        if found.last_insert_id is not None and can_answer:
            local.append(self._last_insert_id_result(found.last_insert_id))
            self._answered_locally = True
            return b""
        for reason, detail in found.pins:
            self._detected(reason, detail)
        if found.hold_next:
            self.hold = 2
        action = None
        if found.assigns or found.schema is not None:
            assigns, schema = found.assigns, found.schema
            action = lambda ok: self._settings_made(ok, assigns, schema)   # noqa: E731
        self.fifo.append(_Pending(R_GENERIC, action=action))
        return None

    def _last_insert_id_result(self, name: str) -> bytes:
        """A one-row result for `SELECT LAST_INSERT_ID()` from the client's own last OK packet (no backend needed)."""
        column = (p.lenenc_str(b"def") + p.lenenc_str(b"") + p.lenenc_str(b"") + p.lenenc_str(b"")
                  + p.lenenc_str(name.encode()) + p.lenenc_str(b"") + b"\x0c" + p.UINT16.pack(63)
                  + p.UINT32.pack(21) + b"\x08" + p.UINT16.pack(0x81 | 0x20) + b"\x00" + b"\x00\x00")
        out = [p.packet(1, b"\x01"), p.packet(2, column)]
        seq = 3
        if not self.deprecate_eof:
            out.append(p.packet(seq, p.eof_payload(self.status)))
            seq += 1
        out.append(p.packet(seq, p.lenenc_str(str(self.last_insert_id).encode())))
        out.append(self._eof(seq + 1))
        return b"".join(out)

    def _statement(self, command: int, local: list, can_answer: bool) -> bytes | None:
        """Binary prepared statements: ids are per backend connection, so the session pins to its backend."""
        if command == p.COM_STMT_PREPARE:
            self._detected(PinReason.PREPARED_STATEMENT, "COM_STMT_PREPARE")
        elif not self.linked and not self.pinned and can_answer:
            # A statement of a backend this client no longer holds (or never prepared).
            if command in _NO_ANSWER:
                self._answered_locally = True
                return b""
            local.append(self._err(1243, "HY000", "Unknown prepared statement handler given to multiproxy; "
                                                   "prepare it again"))
            self._answered_locally = True
            return b""
        if command not in _NO_ANSWER:
            self.fifo.append(_Pending(_RESPONSE_KIND[command]))
        return None

    def _change_user(self, payload: bytes, local: list, can_answer: bool) -> bytes | None:
        """COM_CHANGE_USER to the same user resets the session (as connectors' pools use it); another user is refused."""
        try:
            user, pos = p.read_cstring(payload, 0)
            if self.capabilities & p.CLIENT_SECURE_CONNECTION:
                size = payload[pos]
                pos += 1 + size
            else:
                _, pos = p.read_cstring(payload, pos)
            database = p.read_cstring(payload, pos)[0] if pos < len(payload) else b""
        except (ValueError, IndexError):
            raise ProtocolError("malformed COM_CHANGE_USER", render_error(
                ErrorKind.PROTOCOL_VIOLATION, "malformed COM_CHANGE_USER", 1)) from None
        if user.decode("utf-8", "replace") != self.user:
            if can_answer:
                local.append(self._err(p.ER_NOT_SUPPORTED_YET, "42000",
                                       "multiproxy: COM_CHANGE_USER to another user is not supported; open a new "
                                       "connection as that user"))
                self._answered_locally = True
                return b""
            raise ProtocolError("COM_CHANGE_USER to another user", render_error(
                ErrorKind.NOT_SUPPORTED, "COM_CHANGE_USER to another user is not supported; open a new connection", 1),
                ErrorKind.NOT_SUPPORTED)
        self._client_reset()
        if database:
            self.schema = database.decode("utf-8", "replace")
        if can_answer:
            local.append(self._ok(1))
            self._answered_locally = True
            return b""
        self.fifo.append(_Pending(R_SINGLE, action=self._backend_was_reset))
        return p.packet(0, bytes((p.COM_RESET_CONNECTION,)))

    def _client_reset(self) -> None:
        """COM_RESET_CONNECTION semantics for the client's view: defaults, no pins."""
        self.variables = {}
        self.autocommit = True
        self.multi_statements = bool(self.capabilities & p.CLIENT_MULTI_STATEMENTS)
        self.hold = 0
        if self.pinned:
            self.pinned = False
            self.pin_details = []
            self.ctx.pin_policy.session_ended(self)

    def _detected(self, reason: PinReason, detail: str) -> None:
        if self.ctx.pin_policy.detected(self, reason, detail):
            self.pinned = True
            # The first detail per reason: a pinned client repeating SET would otherwise grow the list forever.
            if all(known is not reason for known, _ in self.pin_details):
                self.pin_details.append((reason, detail))

    # ------------------------------------------------------------------ recording what succeeded

    def _settings_made(self, ok: bool, assigns: dict, schema: str | None) -> None:
        if not ok:
            return
        server = self.server_state
        for name, value in assigns.items():
            if name == NAMES:
                for other in CHARSET_VARIABLES:
                    self.variables.pop(other, None)
                    if server is not None:
                        server.variables.pop(other, None)
            self.variables[name] = value
            if server is not None:
                server.variables[name] = value
        if schema is not None:
            self._schema_changed(True, schema)

    def _schema_changed(self, ok: bool, name: str) -> None:
        if ok:
            self.schema = name
            if self.server_state is not None:
                self.server_state.schema = name

    def _set_server(self, ok: bool, attribute: str, value) -> None:
        if ok and self.server_state is not None:
            setattr(self.server_state, attribute, value)

    def _backend_was_reset(self, ok: bool) -> None:
        server = self.server_state
        if ok and server is not None:
            server.variables = {}
            server.multi_statements = bool(server.capabilities & p.CLIENT_MULTI_STATEMENTS)
            server.prepared.clear()
            server.types.clear()
            # COM_RESET_CONNECTION sets the character set to the server's default: restore the login's.
            names = COLLATIONS.get(server.charset)
            if names is not None:
                server.variables[NAMES] = "__server_default__"

    def _internal_done(self, ok: bool, values: dict, server) -> None:
        if ok:
            for name, value in values.items():
                if value == "DEFAULT":
                    server.variables.pop(name, None)
                else:
                    server.variables[name] = value
        else:
            server.variables = {name: "__unknown__" for name in (*TRACKED, NAMES)}

    # ------------------------------------------------------------------ relay: backend to client

    def backend_data(self, data: bytes) -> tuple[bytes, bool]:
        """Walk the backend's packets; return (bytes for the client, whether the backend may be released)."""
        if self.sbuf:
            data = self.sbuf + data
            self.sbuf = b""
        n = len(data)
        pos = self.s_skip
        parts = None
        keep_from = 0
        if pos:
            if pos >= n:
                self.s_skip = pos - n
                return data, False
            self.s_skip = 0
        fifo = self.fifo
        while pos < n:
            if n - pos < 5:
                if n - pos == 4 and data[pos] == 0 and data[pos + 1] == 0 and data[pos + 2] == 0:
                    pass    # an empty packet: only ever a continuation end
                else:
                    self.sbuf = data[pos:]
                    break
            length = data[pos] | (data[pos + 1] << 8) | (data[pos + 2] << 16)
            end = pos + 4 + length
            if self.s_more or not fifo:
                # continuation of a 16 MiB packet, or something nobody asked for: pass it on
                self.s_more = length == p.MAX_PAYLOAD
                if end > n:
                    self.s_skip = end - n
                    pos = n
                    break
                pos = end
                continue
            head = data[pos + 4] if length else 0
            state = self.rstate
            pending = fifo[0]
            if state == S_ROWS or state == S_COLUMNS or state == S_PARAMS or state == S_PREP_COLUMNS:
                if state == S_ROWS and (head == 0xFE or head == 0xFF) and length < p.MAX_PAYLOAD:
                    if end > n:
                        self.sbuf = data[pos:]
                        break
                    if head == 0xFF:
                        self._finish(pending, False)
                    else:
                        self._result_end(pending, data[pos + 4:end])
                elif state != S_ROWS:
                    self.rcount -= 1
                    if self.rcount <= 0:
                        self._definitions_done(state)
                elif length == p.MAX_PAYLOAD:
                    self.s_more = True
                if end > n:
                    self.s_skip = end - n
                    pos = n
                    break
                pos = end
                continue
            # a packet that must be seen whole: the first of an answer, or an EOF after definitions
            if end > n:
                self.sbuf = data[pos:]
                break
            payload = data[pos + 4:end]
            if (head == p.ERR_HEADER and state == S_START and self.retry_candidate is not None and not pending.internal
                    and _read_only_refusal(payload)):
                # The node refused the statement as read-only: it is no writer (any more). The client does not
                # see this answer; the core sends the statement again, once, to the writer it finds.
                if parts is None:
                    parts = []
                parts.append(data[keep_from:pos])
                keep_from = end
                self.retry_request, self.retry_candidate = self.retry_candidate, None
                self.retry_refusal = data[pos:end]
                pos = end
                continue
            if pending.internal:
                if parts is None:
                    parts = []
                parts.append(data[keep_from:pos])
                keep_from = end
            self._answer_packet(pending, state, head, payload)
            pos = end
        forward_end = n - len(self.sbuf)
        if parts is not None:
            parts.append(data[keep_from:forward_end])
            out = b"".join(parts)
        else:
            out = data if forward_end == n else data[:forward_end]
        if self.retry_request is not None:
            return out, HELD_REFUSAL
        if self.release_due and not self.sbuf and not self.s_skip and not self.s_more:
            self.release_due = False
            return out, True
        return out, False

    def _answer_packet(self, pending: _Pending, state: int, head: int, payload: bytes) -> None:
        kind = pending.kind
        if state == S_COLUMNS_EOF:
            status = p.terminator_status(payload)
            self._status(status)
            if status & p.SERVER_STATUS_CURSOR_EXISTS and kind == R_GENERIC:
                self._finish(pending, True)     # a cursor: rows come with COM_STMT_FETCH
            else:
                self.rstate = S_ROWS
            return
        if state == S_PARAMS_EOF:
            self._after_params()
            return
        if state == S_PREP_COLUMNS_EOF:
            self._finish(pending, True)
            return
        # S_START
        if head == p.ERR_HEADER:
            self._finish(pending, False)
            return
        if kind == R_SINGLE:
            if head == p.OK_HEADER and len(payload) >= 7:
                self._ok_packet(payload)
            elif head == p.EOF_HEADER and len(payload) < p.MAX_PAYLOAD:
                self._status(p.terminator_status(payload))
            self._finish(pending, True)
            return
        if kind == R_PREPARE:
            if head != p.OK_HEADER or len(payload) < 9:
                self._finish(pending, True)
                return
            columns = p.UINT16.unpack_from(payload, 5)[0]
            params = p.UINT16.unpack_from(payload, 7)[0]
            self.rcount2 = columns
            if params:
                self.rcount = params
                self.rstate = S_PARAMS
            else:
                self._after_params()
            return
        if kind == R_FIELD_LIST or kind == R_ROWS:
            if head == p.EOF_HEADER and len(payload) < p.MAX_PAYLOAD:
                self._result_end(pending, payload)
            else:
                self.rstate = S_ROWS       # a field definition or a row; the terminator ends it
            return
        # R_GENERIC
        if head == p.OK_HEADER:
            self._ok_packet(payload)
            self._after_result(pending)
        elif head == p.EOF_HEADER and len(payload) < 9:
            self._status(p.terminator_status(payload))
            self._after_result(pending)
        elif head == p.LOCAL_INFILE_HEADER:
            self.infile = True          # the client sends the file; the server then answers OK or ERR
        else:
            try:
                count = p.read_lenenc_int(payload, 0)[0]
            except (IndexError, ValueError):
                count = 0
            self.rcount = count
            self.rstate = S_COLUMNS if count else S_ROWS

    def _definitions_done(self, state: int) -> None:
        if state == S_COLUMNS:
            self.rstate = S_ROWS if self.deprecate_eof else S_COLUMNS_EOF
        elif state == S_PARAMS:
            if self.deprecate_eof:
                self._after_params()
            else:
                self.rstate = S_PARAMS_EOF
        else:   # S_PREP_COLUMNS
            if self.deprecate_eof:
                self._finish(self.fifo[0], True)
            else:
                self.rstate = S_PREP_COLUMNS_EOF

    def _after_params(self) -> None:
        if self.rcount2:
            self.rcount = self.rcount2
            self.rcount2 = 0
            self.rstate = S_PREP_COLUMNS
        else:
            self._finish(self.fifo[0], True)

    def _ok_packet(self, payload: bytes) -> None:
        try:
            _, pos = p.read_lenenc_int(payload, 1)
            insert_id, pos = p.read_lenenc_int(payload, pos)
            status = p.UINT16.unpack_from(payload, pos)[0]
        except (IndexError, ValueError, Exception):
            return
        if insert_id and not self.fifo[0].internal:
            self.last_insert_id = insert_id
        self._status(status)

    def _status(self, status: int) -> None:
        self.status = status
        if self.server_state is not None:
            self.server_state.status = status

    def _result_end(self, pending: _Pending, payload: bytes) -> None:
        self._status(p.terminator_status(payload))
        self._after_result(pending)

    def _after_result(self, pending: _Pending) -> None:
        if self.status & p.SERVER_MORE_RESULTS_EXISTS:
            self.rstate = S_START
            return
        self._finish(pending, not pending.failed)

    def _finish(self, pending: _Pending, ok: bool) -> None:
        """The answer to the oldest outstanding command is complete."""
        self.fifo.popleft()
        self.rstate = S_START
        self.infile = False
        if pending.internal:
            if pending.action is not None:
                pending.action(ok)
        else:
            self.retry_candidate = None
            self.autocommit = bool(self.status & p.SERVER_STATUS_AUTOCOMMIT)
            if pending.action is not None:
                pending.action(ok)
            if self.hold:
                self.hold -= 1
        if not self.fifo and not self.hold and not self.status & p.SERVER_STATUS_IN_TRANS:
            self.release_due = True

    # ------------------------------------------------------------------ linking to backends

    def link(self, server_state, data: bytes) -> bytes:
        """The bytes for a freshly linked backend: commands bringing it to this client's tracked state, then `data`."""
        self.linked = True
        self.server_state = server_state
        internal = []
        pendings = []
        if self.schema and self.schema != server_state.schema:
            schema = self.schema
            internal.append(p.packet(0, bytes((p.COM_INIT_DB,)) + schema.encode("utf-8")))
            pendings.append(_Pending(R_SINGLE, True, lambda ok, s=schema, st=server_state: ok and setattr(st, "schema", s)))
        if self.multi_statements != server_state.multi_statements:
            wanted = self.multi_statements
            option = p.MYSQL_OPTION_MULTI_STATEMENTS_ON if wanted else p.MYSQL_OPTION_MULTI_STATEMENTS_OFF
            internal.append(p.packet(0, bytes((p.COM_SET_OPTION,)) + p.UINT16.pack(option)))
            pendings.append(_Pending(R_SINGLE, True,
                                     lambda ok, w=wanted, st=server_state: ok and setattr(st, "multi_statements", w)))
        assignments, values = self._replay(server_state)
        if assignments:
            internal.append(p.packet(0, bytes((p.COM_QUERY,)) + ("SET " + ", ".join(assignments)).encode("utf-8")))
            pendings.append(_Pending(R_GENERIC, True,
                                     lambda ok, v=values, st=server_state: self._internal_done(ok, v, st)))
        if server_state.stale_statements:
            internal.insert(0, self._close_stale(server_state))
        if not internal:
            return data
        for pending in reversed(pendings):
            self.fifo.appendleft(pending)
        return b"".join(internal) + data

    def _close_stale(self, server_state) -> bytes:
        out = b"".join(p.packet(0, bytes((p.COM_STMT_CLOSE,)) + p.UINT32.pack(sid)) for sid in server_state.stale_statements)
        server_state.stale_statements.clear()
        return out

    def _replay(self, server) -> tuple[list[str], dict]:
        """SET assignments making the backend's session settings equal this client's."""
        mine, theirs = self.variables, server.variables
        assignments: list[str] = []
        values: dict = {}
        if mine.get(NAMES) != theirs.get(NAMES):
            value = mine.get(NAMES)
            if value is None:
                names = COLLATIONS.get(server.charset)
                if names is not None:
                    value = f"NAMES {names[0]}" + (f" COLLATE {names[1]}" if names[1] else "")
                    assignments.append(value)
                values[NAMES] = "DEFAULT"
            else:
                assignments.append(value)
                values[NAMES] = value
        isolation, read_only = server.tx_variables
        for name in TRACKED:
            value = mine.get(name)
            if value == theirs.get(name):
                continue
            if value is None and name in CHARSET_VARIABLES and NAMES in values:
                values[name] = "DEFAULT"
                continue        # SET NAMES above restored it
            spelled = isolation if name == "tx_isolation" else read_only if name == "tx_read_only" else name
            assignments.append(f"SESSION {spelled} = {value if value is not None else 'DEFAULT'}")
            values[name] = value if value is not None else "DEFAULT"
        server_autocommit = bool(server.status & p.SERVER_STATUS_AUTOCOMMIT)
        if self.autocommit != server_autocommit:
            assignments.append(f"SESSION autocommit = {1 if self.autocommit else 0}")
        return assignments, values

    def unlink(self) -> None:
        self.linked = False
        self.server_state = None
        self.release_due = False
        self.sbuf = b""
        self.s_skip = 0
        self.s_more = False
        self.rstate = S_START

    def reset_bytes(self, server_state, reset_query: str = "") -> bytes:
        """Reset a backend leaving a pinned session: COM_RESET_CONNECTION (or the configured query), internal."""
        self.server_state = server_state
        self.fifo.append(_Pending(R_GENERIC if reset_query else R_SINGLE, True, self._backend_was_reset))
        if reset_query:
            return p.packet(0, bytes((p.COM_QUERY,)) + reset_query.encode("utf-8"))
        return p.packet(0, bytes((p.COM_RESET_CONNECTION,)))

    def is_clean(self) -> bool:
        return (not self.fifo and not self.status & p.SERVER_STATUS_IN_TRANS and not self.infile and not self.sbuf
                and not self.s_skip and not self.s_more and not self.cbuf and not self.c_skip and not self.c_more
                and not self.hold)

    # ------------------------------------------------------------------ failures

    def fail_pending(self, kind: ErrorKind, message: str) -> bytes:
        """No backend for the last chunk: answer each of its commands with an ERR, as a failing server would."""
        count = sum(1 for entry in self.fifo if not entry.internal)
        self.fifo.clear()
        self.rstate = S_START
        self.hold = 0
        self.infile = False
        if self.c_skip or self.c_more:
            raise ProtocolError(message, render_error(kind, message, 1), kind)
        return render_error(kind, message, 1) * count

    def backend_lost(self, message: str) -> tuple[bytes, bool]:
        outstanding = [entry for entry in self.fifo if not entry.internal]
        mid_answer = bool(self.sbuf or self.s_skip or self.s_more or self.rstate != S_START or self.infile)
        in_transaction = bool(self.status & p.SERVER_STATUS_IN_TRANS)
        pinned = self.pinned
        self.retry_candidate = None
        self.unlink()
        self.fifo.clear()
        self.hold = 0
        self.infile = False
        self.status &= ~p.SERVER_STATUS_IN_TRANS
        if mid_answer or pinned:
            return render_error(ErrorKind.BACKEND_LOST, message + (
                "; your session's state was lost with it, reconnect" if pinned else ""), 1), True
        text = message + ("; the transaction was rolled back, retry it" if in_transaction else "; retry")
        if outstanding:
            return render_error(ErrorKind.BACKEND_LOST, text, 1), False
        if in_transaction:
            self.transaction_lost = True
            self.lost_error = render_error(ErrorKind.BACKEND_LOST, text, 1)
        return b"", False

    def error(self, kind: ErrorKind, message: str) -> bytes:
        if self.phase != "ready":
            return render_error(kind, message, self.hseq + 1)
        if not self.logged_in:
            return render_error(kind, message, self.ok_seq)     # instead of the login's OK
        return render_error(kind, message, 1)
