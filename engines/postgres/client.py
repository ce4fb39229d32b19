"""One PostgreSQL client connection, sans-IO: startup and authentication, then transaction-aware relaying.

The relay walks message headers only. It decodes what policy needs: SQL text of Query and Parse (pin
detection), statement names of Parse and Bind (the unnamed-statement hold, named statements), the
status byte of ReadyForQuery, ParameterStatus (tracked session parameters) and CopyInResponse.
"""
from __future__ import annotations

import hashlib
import os
import re
import shlex
from collections import deque

from multiproxy.engine import (
    HELD_REFUSAL, AuthFailed, Authenticated, CancelRequested, ClientContext, ClientProtocol, ClientQuit, CloseClient,
    ErrorKind, PinReason, ProtocolError, SendToClient, StartClientTLS,
)
from multiproxy.token_auth import TokenRejected

from . import protocol as p
from .auth import AuthError, ScramServer, check_md5_response
from .pinning import classify, might_pin

MAX_STARTUP_PACKET = 10000
# Parameters a client cannot choose; the server reports them and they are never replayed.
FIXED_PARAMETERS = frozenset({
    "server_version", "server_encoding", "integer_datetimes", "is_superuser", "session_authorization",
    "in_hot_standby",
})
STARTUP_ONLY = frozenset({"user", "database", "options", "replication"})
# Reported parameters the server may also change by itself (a DBA making a node read-only with ALTER SYSTEM
# and a reload): tracked for a client only when the client set them (startup option, SET, RESET), so the
# node's own value is never replayed elsewhere nor overridden.
CLIENT_OWNED = frozenset({"default_transaction_read_only"})

INTERNAL = 0        # a request the proxy made itself (replay, reset): its response is not the client's
CLIENT_QUERY = 1    # Query or FunctionCall
CLIENT_SYNC = 2     # Sync of the extended protocol
EMPTY_SYNC = 3      # a Sync with nothing before it: the server answers only ReadyForQuery

_INSPECT_BACKEND = frozenset(b"ZSGEW")
_INSPECT_BACKEND_VIRTUAL = frozenset(b"ZSGEW1")
# A name no statement ever has: closing it answers CloseComplete in order and touches nothing.
CLOSED_STATEMENT = b"multiproxy_closed_statement"
_HEADER_ONLY_CLIENT = {p.SYNC, p.FLUSH, p.TERMINATE, p.FUNCTION_CALL, p.COPY_DATA, p.COPY_DONE, p.COPY_FAIL,
                       p.EXECUTE}
_EXTENDED = frozenset((p.PARSE, p.BIND, p.DESCRIBE, p.EXECUTE, p.CLOSE, p.FLUSH))
_unpack_uint32 = p.UINT32.unpack_from

_SSL_REQUEST = p.ssl_request()
_DECLINE_ENCRYPTION = SendToClient(b"N")
_FINAL_HANDSHAKE_EVENTS = frozenset((StartClientTLS, Authenticated, CloseClient, AuthFailed, CancelRequested))
_TERMINATE_MESSAGE = b"X\x00\x00\x00\x04"
# The opening messages of an answer that may still end in a read-only refusal: held back until it is known.
_ANSWER_PREFIX = frozenset((p.PARSE_COMPLETE, p.BIND_COMPLETE, ord("t"), ord("n"), ord("T"), p.PARAMETER_STATUS,
                            ord("N")))
_READ_ONLY_WORDS = re.compile(rb"read[\s_]*only", re.IGNORECASE)
_TRUE_WORDS = frozenset(("on", "true", "yes", "1", "t", "y"))
# Client-message types accepted after startup. Anything else is a protocol violation.
_KNOWN_CLIENT = frozenset((p.QUERY, p.PARSE, p.BIND, p.DESCRIBE, p.EXECUTE, p.CLOSE, p.SYNC, p.FLUSH,
                           p.TERMINATE, p.FUNCTION_CALL, p.COPY_DATA, p.COPY_DONE, p.COPY_FAIL))

_STATEMENT_MESSAGES = frozenset((p.PARSE, p.BIND, p.DESCRIBE, p.CLOSE))


def global_statement_name(parse_rest: bytes) -> bytes:
    """The backend-side name shared by every client preparing the same text with the same parameter types."""
    return b"mp_" + hashlib.blake2b(parse_rest, digest_size=10).hexdigest().encode()


def _parse_message(name: bytes, rest: bytes) -> bytes:
    return b"P" + p.UINT32.pack(len(name) + 1 + len(rest) + 4) + name + b"\x00" + rest


SQLSTATE = {
    ErrorKind.POOL_TIMEOUT: "53300",
    ErrorKind.BACKEND_UNAVAILABLE: "08001",
    ErrorKind.BACKEND_LOST: "08006",
    ErrorKind.AUTH_FAILED: "28P01",
    ErrorKind.PROTOCOL_VIOLATION: "08P01",
    ErrorKind.MESSAGE_TOO_LARGE: "54000",
    ErrorKind.TOO_MANY_CONNECTIONS: "53300",
    ErrorKind.TLS_REQUIRED: "28000",
    ErrorKind.SHUTTING_DOWN: "57P01",
    ErrorKind.FAILOVER: "08006",
    ErrorKind.IDLE_TIMEOUT: "57P05",
    ErrorKind.HANDSHAKE_TIMEOUT: "08P01",
    ErrorKind.NOT_SUPPORTED: "0A000",
    ErrorKind.INTERNAL: "XX000",
}
# Errors after which the proxy closes the connection are FATAL, as PostgreSQL would say them.
FATAL_KINDS = frozenset({ErrorKind.AUTH_FAILED, ErrorKind.PROTOCOL_VIOLATION, ErrorKind.MESSAGE_TOO_LARGE,
                         ErrorKind.TOO_MANY_CONNECTIONS, ErrorKind.TLS_REQUIRED, ErrorKind.SHUTTING_DOWN,
                         ErrorKind.IDLE_TIMEOUT, ErrorKind.HANDSHAKE_TIMEOUT})


def render_error(kind: ErrorKind, message: str, fatal: bool | None = None) -> bytes:
    if fatal is None:
        fatal = kind in FATAL_KINDS
    return p.error_response(SQLSTATE.get(kind, "XX000"), message, "FATAL" if fatal else "ERROR")


def parse_options(options: str) -> dict[str, str]:
    """The `-c name=value` and `--name=value` settings inside the startup `options` parameter."""
    return split_options(options)[0]


def split_options(options: str) -> tuple[dict[str, str], list[str]]:
    """The startup `options` parameter as (settings to replay, words that are no setting). Only settings can
    follow a client from backend to backend; anything else (postgres's -d, -e, -B ...) is refused at login."""
    out: dict[str, str] = {}
    refused: list[str] = []
    try:
        words = shlex.split(options.replace("\\ ", "\x00"))
    except ValueError:
        return out, [options]
    words = [w.replace("\x00", " ") for w in words]
    i = 0
    while i < len(words):
        word = words[i]
        setting = None
        if word == "-c" and i + 1 < len(words):
            setting = words[i + 1]
            i += 1
        elif word.startswith("-c"):
            setting = word[2:]
        elif word.startswith("--"):
            setting = word[2:]
        if setting and "=" in setting:
            name, value = setting.split("=", 1)
            out[name.replace("-", "_").lower()] = value
        else:
            refused.append(setting if setting else word)
        i += 1
    return out, refused


class PostgresClient(ClientProtocol):
    """Protocol state of one client: handshake, then the relay between the client and its current backend."""

    # Initial values of the immutable parts of the state live on the class: a connection pays only for
    # what it changes (pgbench -C opens one connection per transaction).
    tls_active = False
    phase = "startup"
    user = ""
    database = ""
    startup_body = b""              # the StartupMessage's parameter bytes, the key of the greeting cache
    auth_state = None
    md5_salt = b""
    # relay state
    tx_status = p.TX_IDLE
    pending_extended = False        # extended-protocol messages sent since the last Sync
    unnamed_held = False            # unnamed statement parsed but not yet bound
    copy_in = False
    discard_until_sync = False
    transaction_lost = False
    pinned = False
    closing = False
    linked = False
    server_state = None             # the linked backend's PostgresServerState
    server_params: dict | None = None   # the linked backend's parameter values
    requests = 0
    statements: dict | None = None  # named prepared statements, virtualised: client name -> (global name, Parse body)
    syncs_sent = 0
    syncs_done = 0
    deferred_rewrite = None
    # partial-message state, client side
    cbuf = b""                      # an incomplete message we must see whole, or a partial header
    c_skip = 0                      # bytes of a streamed message still to come
    c_discard = False               # ... and they are not forwarded (answered locally)
    release_due = False             # a ReadyForQuery ended everything; release once no partial message is left
    pending_settings: dict | None = None  # the backend's unreported settings once the proxy's SETs succeed
    local_error = b""               # the error answered locally to requests that cannot reach a backend
    backend_farewell = ""           # a FATAL the backend sent before going away, held back for the client
    retry_candidate = None          # (bytes, fifo entry, syncs_done, rewrite) of a first statement in flight
    retry_held = None               # the answer to the retry candidate so far, held back from the client
    retry_refused = False           # that answer carries a read-only refusal (25006)
    retry_saved = None              # the candidate of a held refusal, for retry_accepted
    owns_read_only = False          # the client has set (or reset) default_transaction_read_only itself
    retry_request = None            # bytes the core should send again on the new writer
    internal_failed = False
    # partial-message state, backend side
    sbuf = b""
    s_skip = 0

    def __init__(self, ctx: ClientContext, mock_secret: bytes):
        self.ctx = ctx
        self.mock_secret = mock_secret
        self.max_message = ctx.max_message_size
        self.hbuf = bytearray()
        self.startup_params: dict[str, str] = {}
        self.fifo: deque = deque()      # what each expected ReadyForQuery answers, oldest first
        self.pin_details: list[tuple[PinReason, str]] = []
        self.client_params: dict[str, str] = {}  # reported parameters: lowercase name -> value the client believes in
        self.client_settings: dict[str, str] = {}  # unreported startup settings (options -c ...) to replay
        self.canonical: dict[str, str] = {}
        self.virtualize = ctx.engine_options.get("prepared_statements", "virtualize") == "virtualize"
        self.parse_fifo: deque = deque()   # (sync group, injected by the proxy, global name) per Parse sent
        self.retry_read_only = ctx.retry_read_only

    # ------------------------------------------------------------------ handshake

    def receive_handshake(self, data: bytes) -> list:
        if data == _SSL_REQUEST and not self.hbuf and not self.ctx.tls_available and self.phase == "startup":
            return [_DECLINE_ENCRYPTION]    # libpq's sslmode=prefer asks first, on a listener without TLS
        hbuf = self.hbuf
        hbuf += data
        events: list = []
        # Each step consumes one message and adds its events; stop when more bytes are needed or the last
        # event ends the handshake (or hands the socket to TLS).
        while hbuf:
            phase = self.phase
            if phase == "startup":
                if not self._startup_step(events):
                    break
            elif phase == "auth":
                if not self._auth_step(events):
                    break
            else:
                raise ProtocolError("data before the login completed", self.error(ErrorKind.PROTOCOL_VIOLATION,
                                    "the client sent data before authentication finished"))
            if events and type(events[-1]) in _FINAL_HANDSHAKE_EVENTS:
                break
        return events

    def _fatal(self, kind: ErrorKind, message: str, events: list) -> bool:
        events.append(CloseClient(render_error(kind, message, fatal=True), message))
        return True

    def _startup_step(self, events: list) -> bool:
        buf = self.hbuf
        if len(buf) < 8:
            if len(buf) >= 4:
                length = _unpack_uint32(buf, 0)[0]
                if length < 8 or length > MAX_STARTUP_PACKET:
                    raise ProtocolError(f"invalid startup packet length {length}",
                                        render_error(ErrorKind.PROTOCOL_VIOLATION, "invalid startup packet layout: bad length", True))
            return False
        length = _unpack_uint32(buf, 0)[0]
        if length < 8 or length > MAX_STARTUP_PACKET:
            raise ProtocolError(f"invalid startup packet length {length}",
                                render_error(ErrorKind.PROTOCOL_VIOLATION, "invalid startup packet layout: bad length", True))
        if len(buf) < length:
            return False
        code = _unpack_uint32(buf, 4)[0]
        body = bytes(buf[8:length])
        del buf[:length]
        if code == p.SSL_REQUEST_CODE:
            if length != 8:
                raise ProtocolError("bad SSLRequest", render_error(ErrorKind.PROTOCOL_VIOLATION, "invalid SSLRequest", True))
            if self.ctx.tls_available and not self.tls_active:
                if buf:
                    # Bytes pipelined after SSLRequest would be read as if they came over TLS.
                    raise ProtocolError("data after SSLRequest", render_error(
                        ErrorKind.PROTOCOL_VIOLATION, "received unencrypted data after SSL request", True))
                self.tls_active = True
                events.append(StartClientTLS(b"S"))
                return True
            events.append(SendToClient(b"N"))
            return True
        if code == p.GSSENC_REQUEST_CODE:
            events.append(SendToClient(b"N"))
            return True
        if code == p.CANCEL_REQUEST_CODE:
            if length != 16:
                raise ProtocolError("bad CancelRequest", render_error(
                    ErrorKind.PROTOCOL_VIOLATION, "invalid length of cancel request packet", True))
            pid = _unpack_uint32(body, 0)[0]
            secret = _unpack_uint32(body, 4)[0]
            events.append(CancelRequested((pid, secret)))
            return True
        major = code >> 16
        if major != 3:
            raise ProtocolError(f"unsupported protocol {major}.{code & 0xFFFF}", render_error(
                ErrorKind.PROTOCOL_VIOLATION,
                f"unsupported frontend protocol {major}.{code & 0xFFFF}: multiproxy speaks protocol 3.0", True))
        try:
            params = p.parse_startup_params(body)
        except ValueError as exc:
            raise ProtocolError(str(exc), render_error(ErrorKind.PROTOCOL_VIOLATION, f"invalid startup packet: {exc}", True))
        self.startup_body = body
        if code & 0xFFFF or (body.find(b"_pq_.") >= 0 and any(k.startswith("_pq_.") for k in params)):
            unsupported = [k for k in params if k.startswith("_pq_.")]
            payload = p.INT32.pack(p.PROTOCOL_VERSION_3 & 0xFFFF) + p.INT32.pack(len(unsupported))
            payload += b"".join(p.cstring(k) for k in unsupported)
            events.append(SendToClient(p.message(b"v", payload)))
            for k in unsupported:
                params.pop(k)
        return self._begin_auth(params, events)

    def _begin_auth(self, params: dict[str, str], events: list) -> bool:
        ctx = self.ctx
        if ctx.listener.require_tls and not self.tls_active:
            return self._fatal(ErrorKind.TLS_REQUIRED,
                               f"listener {ctx.listener.name!r} requires TLS: connect with sslmode=require", events)
        user = params.get("user", "")
        if not user:
            return self._fatal(ErrorKind.PROTOCOL_VIOLATION, "no PostgreSQL user name specified in startup packet", events)
        if "replication" in params and params["replication"].lower() not in ("false", "off", "no", "0"):
            return self._fatal(ErrorKind.NOT_SUPPORTED,
                               "replication connections are not supported through multiproxy; connect to the server directly", events)
        options = next((value for key, value in params.items() if key.lower() == "options"), "")
        if options:
            refused = split_options(options)[1]
            if refused:
                return self._fatal(ErrorKind.NOT_SUPPORTED, "startup option " + ", ".join(repr(w) for w in refused)
                                   + " cannot follow the session through multiproxy's pooled connections: only "
                                   "settings (-c name=value or --name=value in options/PGOPTIONS) are replayed; "
                                   "remove it or set it with SET", events)
        self.user = user
        self.database = params.get("database") or user
        self.startup_params = params
        method = ctx.listener.auth
        record = ctx.users.get(user) if ctx.users is not None else None
        if record is not None and not record.may_use(ctx.listener.name):
            events.append(AuthFailed(user, render_error(ErrorKind.AUTH_FAILED,
                          f'user "{user}" may not connect through listener {ctx.listener.name!r}', True),
                          "listener not allowed for user"))
            return True
        if method == "trust":
            return self._authenticated(events)
        if method == "token":
            if not self.tls_active:
                return self._fatal(ErrorKind.TLS_REQUIRED, f"listener {ctx.listener.name!r} authenticates with tokens, "
                                   "which are only accepted over TLS: connect with sslmode=require", events)
            self.auth_state = ("token", ctx.listener.token_verifier)
            events.append(SendToClient(p.authentication(p.AUTH_CLEARTEXT)))
            self.phase = "auth"
            return True
        verifiers = record.verifiers if record else {}
        if method == "md5" and "md5" in verifiers:
            self.md5_salt = os.urandom(4)
            self.auth_state = ("md5", verifiers["md5"])
            events.append(SendToClient(p.authentication(p.AUTH_MD5, self.md5_salt)))
        elif method == "md5" and record is None:
            # Unknown user: ask like for any other user, fail at the end.
            self.md5_salt = os.urandom(4)
            self.auth_state = ("md5", None)
            events.append(SendToClient(p.authentication(p.AUTH_MD5, self.md5_salt)))
        else:
            verifier = verifiers.get("scram_sha_256")
            if verifier:
                server = ScramServer(verifier)
            else:
                server = ScramServer.for_unknown_user(user, self.mock_secret)
            self.auth_state = ("scram", server)
            events.append(SendToClient(p.authentication(p.AUTH_SASL, b"SCRAM-SHA-256\x00\x00")))
        self.phase = "auth"
        return True

    def _auth_step(self, events: list) -> bool:
        buf = self.hbuf
        if len(buf) < 5:
            return False
        kind = buf[0]
        length = _unpack_uint32(buf, 1)[0]
        if kind != p.PASSWORD_MESSAGE or length < 4 or length > 65536:
            raise ProtocolError("expected a password message", render_error(
                ErrorKind.PROTOCOL_VIOLATION, f"expected password response, got message type {chr(kind)!r}", True))
        if len(buf) < 1 + length:
            return False
        body = bytes(buf[5:1 + length])
        del buf[:1 + length]
        method, state = self.auth_state
        failure = f'password authentication failed for user "{self.user}"'
        if method == "md5":
            response = body.rstrip(b"\x00")
            if state is None or not check_md5_response(state, self.md5_salt, response):
                events.append(AuthFailed(self.user, render_error(ErrorKind.AUTH_FAILED, failure, True), "wrong md5 password"))
                return True
            return self._authenticated(events)
        if method == "token":
            token = body.rstrip(b"\x00").decode("utf-8", "replace")
            try:
                if state is None:
                    raise TokenRejected("no token verifier configured")
                state.verify(token, self.user)
            except TokenRejected as exc:
                message = f'token authentication failed for user "{self.user}": {exc}'
                events.append(AuthFailed(self.user, render_error(ErrorKind.AUTH_FAILED, message, True),
                                         f"token rejected: {exc}", "token_rejected"))
                return True
            return self._authenticated(events)
        server: ScramServer = state
        try:
            if not hasattr(self, "_sasl_started"):
                self._sasl_started = True
                mech, end = p.read_cstring(body, 0)
                if mech != "SCRAM-SHA-256":
                    raise AuthError(f"unsupported SASL mechanism {mech!r}")
                data_len = p.INT32.unpack_from(body, end)[0]
                data = body[end + 4:end + 4 + data_len] if data_len >= 0 else b""
                reply = server.handle_client_first(data)
                events.append(SendToClient(p.authentication(p.AUTH_SASL_CONTINUE, reply)))
                return True
            reply = server.handle_client_final(body)
        except (AuthError, ValueError, IndexError) as exc:
            events.append(AuthFailed(self.user, render_error(ErrorKind.AUTH_FAILED, failure, True), f"SCRAM: {exc}"))
            return True
        except Exception as exc:  # p.INT32 on a short body raises struct.error
            raise ProtocolError(f"malformed SASL message: {exc}", render_error(
                ErrorKind.PROTOCOL_VIOLATION, "malformed SASL message", True)) from None
        events.append(SendToClient(p.authentication(p.AUTH_SASL_FINAL, reply)))
        return self._authenticated(events)

    def _authenticated(self, events: list) -> bool:
        self.phase = "ready"
        leftover = bytes(self.hbuf)          # requests pipelined right after the password
        self.hbuf.clear()
        events.append(Authenticated(self.user, self.database, self.startup_params, leftover))
        return True

    def login_complete(self, server_state) -> bytes:
        """AuthenticationOk, the parameters as this client should see them, its cancel key, ReadyForQuery."""
        # Clients of one pool mostly send the same startup packet: greet them from a cache keyed by its bytes.
        cache = server_state.welcome_cache
        cached = cache.get(self.startup_body)
        if cached is None:
            cached = self._greeting(server_state)
            if len(cache) < 128:
                cache[self.startup_body] = cached
        self.client_params = dict(cached[1])
        self.client_settings = dict(cached[2])
        if self.ctx.read_only and "default_transaction_read_only" not in self.client_settings:
            # A reader listener's sessions are read-only on whichever node serves them (the writer too, when
            # readers fall back to it); the client may still turn that off for itself.
            self.client_settings["default_transaction_read_only"] = "on"
        if CLIENT_OWNED.intersection(self.client_settings):
            self.owns_read_only = True
        self.canonical = server_state.canonical
        pid, secret = self.ctx.cancel_key
        return cached[0] + p.backend_key_data(pid, secret) + p.READY_IDLE

    def _greeting(self, server_state) -> tuple:
        """(AuthenticationOk and ParameterStatus bytes, reported parameters, unreported settings) for this client."""
        wanted = {}
        for key, value in self.startup_params.items():
            low = key.lower()
            if low == "options":
                wanted.update(parse_options(value))
            elif low not in STARTUP_ONLY:
                wanted[low] = value
        out = [p.authentication(p.AUTH_OK)]
        client_params = {}
        client_settings = {}
        for low, value in server_state.login_params.items():
            if low in wanted and low not in FIXED_PARAMETERS:
                value = wanted[low]
            if low not in CLIENT_OWNED:
                client_params[low] = value
            out.append(p.parameter_status(server_state.canonical.get(low, low), value))
        for low, value in wanted.items():
            if (low not in server_state.login_params or low in CLIENT_OWNED) and low not in FIXED_PARAMETERS:
                client_settings[low] = value
        return b"".join(out), client_params, client_settings

    # ------------------------------------------------------------------ relay: client to backend

    @property
    def wants_backend(self) -> bool:
        return True

    def client_data(self, data: bytes) -> tuple[bytes, bytes]:
        """Walk the client's messages; return (bytes for the backend, bytes answered locally)."""
        if not self.cbuf and not self.c_skip and not self.c_discard and not self.discard_until_sync \
                and not self.transaction_lost:
            # The common cases first, with nothing pending from earlier reads: one whole simple Query, or
            # Terminate. They end as the general walk below would end them.
            n = len(data)
            if n > 5 and data[0] == 81 and _unpack_uint32(data, 1)[0] + 1 == n and n <= self.max_message:
                self.release_due = False
                fifo = self.fifo
                fifo.append(CLIENT_QUERY)
                self.requests += 1
                self.unnamed_held = False
                self._inspect_sql(data[5:n - 1])
                if (self.retry_read_only and not self.linked and self.tx_status == p.TX_IDLE and len(fifo) == 1
                        and not self.pending_extended and not self._asks_read_only(data)):
                    self.retry_candidate = (data, CLIENT_QUERY, self.syncs_done, None)
                else:
                    self.retry_candidate = None
                return data, b""
            if data == _TERMINATE_MESSAGE:
                self.release_due = False
                self.closing = True
                self.retry_candidate = None
                raise ClientQuit()
        if self.cbuf:
            data = self.cbuf + data
            self.cbuf = b""
        n = len(data)
        pos = self.c_skip
        self.release_due = False
        if pos >= n:
            self.c_skip = pos - n
            return (b"" if self.c_discard else data), b""
        self.c_skip = 0
        fifo = self.fifo
        local = b""
        pieces = None                    # kept slices, when some messages are not forwarded
        keep_from = 0
        drop_from = None                 # start of the run of messages being dropped
        dropped_prefix = self.c_discard
        if dropped_prefix:               # the tail of a message that is answered locally
            self.c_discard = False
            drop_from = 0
        start = pos
        rewrite = False
        forwarded_any = pos > 0          # the tail of a streamed message went through
        syncs_before = self.syncs_sent
        while pos < n:
            if n - pos < 5:
                self.cbuf = data[pos:]
                break
            kind = data[pos]
            length = _unpack_uint32(data, pos + 1)[0]
            if length < 4:
                raise ProtocolError("invalid message length", render_error(
                    ErrorKind.PROTOCOL_VIOLATION, f"invalid message length {length}", True))
            if length > self.max_message:
                raise ProtocolError("message too large", render_error(
                    ErrorKind.MESSAGE_TOO_LARGE,
                    f"message of {length} bytes exceeds the proxy's limit of {self.max_message} bytes "
                    "(proxy.max_message_size)", True), ErrorKind.MESSAGE_TOO_LARGE)
            end = pos + 1 + length
            if kind not in _KNOWN_CLIENT:
                raise ProtocolError("unknown message type", render_error(
                    ErrorKind.PROTOCOL_VIOLATION, f"invalid frontend message type {kind}", True))
            if (kind == p.SYNC or kind == p.FLUSH) and not self.linked and not fifo and not self.pending_extended \
                    and not forwarded_any and not self.copy_in:
                # A lone Sync or Flush with nothing pending: the server would answer ReadyForQuery or nothing.
                if drop_from is None:
                    drop_from = pos
                if kind == p.SYNC:
                    local += self._answer_locally(kind)
                pos = end
                continue
            if self.discard_until_sync or self.transaction_lost or kind == p.TERMINATE:
                # Answered here, never forwarded.
                if drop_from is None:
                    drop_from = pos
                local += self._answer_locally(kind)
                if end > n:
                    self.c_skip = end - n
                    self.c_discard = True
                    pos = n
                    break
                pos = end
                continue
            forwarded_any = True
            if drop_from is not None:
                if pieces is None:
                    pieces = []
                pieces.append(data[keep_from:drop_from])
                keep_from = pos
                drop_from = None
            if kind in _HEADER_ONLY_CLIENT:
                if kind == p.SYNC:
                    if not self.copy_in:
                        fifo.append(CLIENT_SYNC if self.pending_extended else EMPTY_SYNC)
                        self.requests += 1
                        self.syncs_sent += 1
                    self.pending_extended = False
                elif kind == p.COPY_DATA:
                    pass
                elif kind == p.FUNCTION_CALL:
                    fifo.append(CLIENT_QUERY)
                    self.requests += 1
                elif kind == p.COPY_DONE or kind == p.COPY_FAIL:
                    self.copy_in = False
                elif kind == p.EXECUTE:
                    self.pending_extended = True
                if end > n:
                    self.c_skip = end - n
                    pos = n
                    break
                pos = end
                continue
            # Query, Parse, Bind, Describe, Close: the body is needed whole.
            if end > n:
                self.cbuf = data[pos:]
                break
            try:
                if kind == p.QUERY:
                    fifo.append(CLIENT_QUERY)
                    self.requests += 1
                    self.unnamed_held = False
                    self._inspect_sql(data[pos + 5:end - 1])
                elif kind == p.PARSE:
                    self.pending_extended = True
                    name_end = data.index(b"\x00", pos + 5, end)
                    if name_end == pos + 5:
                        self.unnamed_held = True
                    elif self.virtualize:
                        rewrite = True
                    else:
                        self._detected(PinReason.PREPARED_STATEMENT, "named prepared statement (Parse)")
                    query_end = data.index(b"\x00", name_end + 1, end)
                    self._inspect_sql(data[name_end + 1:query_end])
                    if self.statements is not None:
                        rewrite = True
                elif kind == p.BIND:
                    self.pending_extended = True
                    portal_end = data.index(b"\x00", pos + 5, end)
                    statement_end = data.index(b"\x00", portal_end + 1, end)
                    if statement_end == portal_end + 1:
                        self.unnamed_held = False
                    elif self.statements is not None:
                        rewrite = True
                else:  # DESCRIBE, CLOSE
                    self.pending_extended = True
                    if data[pos + 5] not in (80, 83) or data[end - 1] != 0:   # 'P' or 'S', NUL-terminated
                        raise ValueError("bad describe/close target")
                    if data[pos + 5] == 83 and end - pos > 7 and self.statements is not None:
                        rewrite = True
            except (ValueError, IndexError):
                raise ProtocolError("malformed message", render_error(
                    ErrorKind.PROTOCOL_VIOLATION, f"malformed {chr(kind)!r} message", True)) from None
            pos = end
        forward_end = n - len(self.cbuf)
        if drop_from is not None:
            forward_end = drop_from
        if pieces is None:
            forward = data if (forward_end == n and keep_from == 0) else data[keep_from:forward_end]
        else:
            pieces.append(data[keep_from:forward_end])
            forward = b"".join(pieces)
        if dropped_prefix:
            start = 0                    # the forwarded bytes begin at a message boundary
        if (self.retry_read_only and forward and not self.linked and self.tx_status == p.TX_IDLE and len(fifo) == 1
                and not local and not self.cbuf and not self.c_skip and not self.pending_extended
                and not self._asks_read_only(forward)):
            # The first statement of a transaction: if a read-only node refuses it, nothing ran, and it can
            # be sent again to the new writer. Keep what is needed to do that.
            self.retry_candidate = (forward, fifo[0], self.syncs_done,
                                    (start, syncs_before) if rewrite else None)
        else:
            self.retry_candidate = None
        if rewrite and forward:
            if self.linked:
                forward = self._rewrite_statements(forward, start, syncs_before)
            else:
                answered = self._prepare_locally(forward, start)
                if answered:
                    if self.closing:
                        raise ClientQuit(b"", local + answered)
                    return b"", local + answered
                self.deferred_rewrite = (start, syncs_before)
        if self.closing:
            raise ClientQuit(forward, local)
        return forward, local

    def _asks_read_only(self, request: bytes) -> bool:
        """Whether the session itself wants read-only transactions (its setting, or the request's words): then a
        read-only refusal is its own doing, says nothing about the node, and goes back to it as it is."""
        for source in (self.client_params, self.client_settings):
            for name in ("default_transaction_read_only", "transaction_read_only"):
                value = source.get(name)
                if value is not None and value.lower() in _TRUE_WORDS:
                    return True
        return _READ_ONLY_WORDS.search(request) is not None

    def _prepare_locally(self, data: bytes, start: int) -> bytes:
        """Answer a lone `Parse(named)… Sync` (libpq's PQprepare) without a backend.

        The statement is only recorded; whichever backend later serves a Bind or Describe of it gets it
        prepared there. So a client that prepares while others hold every backend does not wait (pgbench
        prepares synchronously inside its event loop, and would otherwise stall all its clients). An
        error in the statement's text is then reported by the Bind or Describe instead of the Parse.
        """
        if (start or self.tx_status != p.TX_IDLE or len(self.fifo) != 1 or self.fifo[0] != CLIENT_SYNC
                or self.c_skip or self.cbuf):
            return b""
        parses = []
        pos, n = 0, len(data)
        while pos < n:
            kind = data[pos]
            end = pos + 1 + _unpack_uint32(data, pos + 1)[0]
            if kind == p.SYNC and end == n and parses:
                break
            if kind != p.PARSE:
                return b""
            name_end = data.index(b"\x00", pos + 5, end)
            if name_end == pos + 5:
                return b""
            parses.append((data[pos + 5:name_end], data[name_end + 1:end]))
            pos = end
        else:
            return b""
        if self.statements is None:
            self.statements = {}
        for name, rest in parses:
            self.statements[name] = (global_statement_name(rest), rest)
        self.fifo.clear()
        self.syncs_done += 1             # the Sync is answered here; keep Parse groups aligned
        self.pending_extended = False
        return b"1\x00\x00\x00\x04" * len(parses) + p.READY_IDLE

    def _rewrite_statements(self, data: bytes, start: int, group: int) -> bytes:
        """Map the client's statement names to global ones on the linked backend, preparing them there if needed.

        A named Parse becomes Parse of the global name, or, when the backend already has it, a Parse of the
        unnamed statement (so the client still receives a genuine ParseComplete in order). Bind and
        Describe use the global name and are preceded by an injected Parse when the backend lacks it (its
        ParseComplete is dropped on the way back). Close of a named statement closes a name nobody uses,
        which answers CloseComplete without dropping a statement other clients share.
        """
        if self.statements is None:
            self.statements = {}
        prepared = self.server_state.prepared
        statements = self.statements
        parse_fifo = self.parse_fifo
        out = [data[:start]]
        pos = start
        n = len(data)
        while pos < n:
            if n - pos < 5:
                out.append(data[pos:])
                break
            kind = data[pos]
            end = pos + 1 + _unpack_uint32(data, pos + 1)[0]
            if end > n or kind not in _STATEMENT_MESSAGES:
                if kind == p.SYNC:
                    group += 1
                out.append(data[pos:end])
                pos = end
                continue
            body_start = pos + 5
            if kind == p.PARSE:
                name_end = data.index(b"\x00", body_start, end)
                rest = data[name_end + 1:end]
                if name_end == body_start:
                    parse_fifo.append((group, False, None))
                    out.append(data[pos:end])
                else:
                    gname = global_statement_name(rest)
                    statements[data[body_start:name_end]] = (gname, rest)
                    if gname in prepared:
                        parse_fifo.append((group, False, None))
                        out.append(_parse_message(b"", rest))
                    else:
                        prepared.add(gname)
                        parse_fifo.append((group, False, gname))
                        out.append(_parse_message(gname, rest))
            elif kind == p.BIND:
                portal_end = data.index(b"\x00", body_start, end)
                name_end = data.index(b"\x00", portal_end + 1, end)
                entry = statements.get(data[portal_end + 1:name_end])
                if entry is None:
                    out.append(data[pos:end])
                else:
                    gname, rest = entry
                    if gname not in prepared:
                        prepared.add(gname)
                        parse_fifo.append((group, True, gname))
                        out.append(_parse_message(gname, rest))
                    payload = data[body_start:portal_end + 1] + gname + data[name_end:end]
                    out.append(b"B" + p.UINT32.pack(len(payload) + 4) + payload)
            else:  # DESCRIBE or CLOSE
                target = data[body_start]
                name = data[body_start + 1:end - 1]
                entry = statements.get(name) if target == 83 else None
                if entry is None:
                    out.append(data[pos:end])
                elif kind == p.CLOSE:
                    del statements[name]
                    out.append(p.message(b"C", b"S" + CLOSED_STATEMENT + b"\x00"))
                else:
                    gname, rest = entry
                    if gname not in prepared:
                        prepared.add(gname)
                        parse_fifo.append((group, True, gname))
                        out.append(_parse_message(gname, rest))
                    out.append(p.message(b"D", b"S" + gname + b"\x00"))
            pos = end
        return b"".join(out)

    def _answer_locally(self, kind: int) -> bytes:
        """While the client's requests cannot reach a backend, answer each Sync/Query as a failing server would."""
        if kind == p.TERMINATE:
            self.closing = True
            return b""
        if kind == p.SYNC or kind == p.QUERY or kind == p.FUNCTION_CALL:
            out = self.local_error + p.READY_IDLE
            if self.transaction_lost or kind == p.SYNC:
                self.local_error = b""
            self.transaction_lost = False
            self.discard_until_sync = False
            self.tx_status = p.TX_IDLE
            return out
        return b""

    def _inspect_sql(self, sql_bytes) -> None:
        if not might_pin(sql_bytes):
            return
        low = bytes(sql_bytes).lower()
        if not self.owns_read_only and (_READ_ONLY_WORDS.search(low) or low.find(b"reset") >= 0
                                        or low.find(b"discard") >= 0):
            self.owns_read_only = True
        if (b"discard" in low or b"deallocate" in low) and self.statements is not None:
            # The client dropped statements itself: forget them and what the backend was thought to hold.
            if self.server_state is not None:
                self.server_state.prepared.clear()
            if b"deallocate" in low or b"all" in low:
                self.statements.clear()
        for reason, detail in classify(bytes(sql_bytes).decode("utf-8", "replace")):
            self._detected(reason, detail)

    def _detected(self, reason: PinReason, detail: str) -> None:
        if self.ctx.pin_policy.detected(self, reason, detail):
            if not self.pinned:
                self.pinned = True
            # The first detail per reason: a pinned client repeating SET would otherwise grow the list forever.
            if all(known is not reason for known, _ in self.pin_details):
                self.pin_details.append((reason, detail))

    # ------------------------------------------------------------------ relay: backend to client

    def backend_data(self, data: bytes) -> tuple[bytes, bool]:
        """Walk the backend's messages; return (bytes for the client, whether the backend may be released)."""
        if self.retry_held is not None and self.retry_candidate is None:
            # The client sent more before the held answer ended (the candidate is gone): it is not retried.
            held = b"".join(self.retry_held)
            self.retry_held = None
            self.retry_refused = False
            out, release = self.backend_data(data)
            return held + out, release
        if self.sbuf:
            data = self.sbuf + data
            self.sbuf = b""
        n = len(data)
        pos = self.s_skip
        if pos >= n:
            self.s_skip = pos - n
            if self.release_due and not self.s_skip:
                self.release_due = False
                return data, True
            return data, False
        self.s_skip = 0
        fifo = self.fifo
        saw_ready = False
        out_parts = None           # set when some messages are swallowed
        parse_fifo = self.parse_fifo
        inspect = _INSPECT_BACKEND_VIRTUAL if parse_fifo else _INSPECT_BACKEND
        keep_from = 0
        if self.retry_candidate is None and fifo and fifo[0] != INTERNAL:
            # Messages nobody needs to look at (row descriptions, rows, command tags) are passed over
            # here; only the inspected kinds (ReadyForQuery, errors, ...) change what this skip depends on.
            while n - pos >= 5 and data[pos] not in inspect:
                end = pos + 1 + _unpack_uint32(data, pos + 1)[0]
                if end > n:
                    break
                pos = end
        while pos < n:
            if n - pos < 5:
                self.sbuf = data[pos:]
                break
            kind = data[pos]
            length = _unpack_uint32(data, pos + 1)[0]
            end = pos + 1 + length
            internal = fifo and fifo[0] == INTERNAL
            drop = False
            candidate = self.retry_candidate
            if kind in inspect or internal or candidate is not None:
                if end > n:
                    self.sbuf = data[pos:]
                    break
                hold = False
                if candidate is not None and not internal:
                    # The answer to a first statement that a read-only node may refuse: hold its opening
                    # messages until the answer shows whether it is a refusal.
                    if self.retry_refused or kind in _ANSWER_PREFIX or (
                            kind == p.ERROR_RESPONSE and b"C25006\x00" in data[pos + 5:end]):
                        hold = True
                        if kind == p.ERROR_RESPONSE:
                            self.retry_refused = True
                    else:
                        # Rows, a command tag or another error: the statement ran; nothing to retry.
                        self.retry_candidate = None
                        if self.retry_held:
                            if out_parts is None:
                                out_parts = []
                            out_parts.append(data[keep_from:pos])
                            out_parts.append(b"".join(self.retry_held))
                            keep_from = pos
                        self.retry_held = None
                        if kind not in inspect:
                            pos = end
                            continue
                if kind == p.READY_FOR_QUERY:
                    self.retry_candidate = None
                    self.tx_status = data[pos + 5]
                    saw_ready = True
                    self.copy_in = False
                    answered = fifo.popleft() if fifo else None
                    if answered == CLIENT_SYNC or answered == EMPTY_SYNC:
                        self.syncs_done += 1
                        if parse_fifo:
                            self._parses_unanswered(self.syncs_done)
                    elif answered == INTERNAL:
                        self._internal_done()
                elif kind == p.PARSE_COMPLETE:
                    if parse_fifo and not internal:
                        drop = parse_fifo.popleft()[1]
                elif kind == p.PARAMETER_STATUS:
                    self._parameter_status(data, pos + 5, end)
                elif kind == p.COPY_IN_RESPONSE:
                    self.copy_in = True
                    # A Sync sent with the COPY's Execute reaches the server in copy-in mode, which ignores it.
                    if fifo and (fifo[0] == CLIENT_SYNC or fifo[0] == EMPTY_SYNC):
                        fifo.popleft()
                        self.syncs_done += 1
                elif kind == ord("W"):
                    self.copy_in = True
                elif kind == p.ERROR_RESPONSE:
                    self.copy_in = False     # a failed COPY ends copy-in mode on the server's side
                    if internal:
                        self.internal_failed = True
                    elif hold:
                        pass
                    elif data[pos + 5:pos + 12] == b"SFATAL\x00" or data[pos + 5:pos + 12] == b"SPANIC\x00":
                        # The backend is going away (shutdown, crash, failover). Keep the client: hold the
                        # message back; backend_lost() answers the pending requests with it as an ERROR.
                        self.backend_farewell = p.parse_fields(data[pos + 5:end]).get("M", "")
                        drop = True
                if drop:
                    if out_parts is None:
                        out_parts = []
                    out_parts.append(data[keep_from:pos])
                    keep_from = end
                elif hold:
                    if out_parts is None:
                        out_parts = []
                    out_parts.append(data[keep_from:pos])
                    keep_from = end
                    if self.retry_held is None:
                        self.retry_held = []
                    self.retry_held.append(data[pos:end])
                    if kind == p.READY_FOR_QUERY:
                        # The whole refusal is here: the core probes the node and calls retry_declined or
                        # retry_accepted. Nothing after it is this answer's.
                        self.retry_saved = candidate
                        self.retry_request = candidate[0]
                        self.retry_refused = False
                        pos = end
                        if pos < n:
                            self.sbuf = data[pos:]
                        break
                elif internal:
                    # Swallow the proxy's own request's response; ParameterStatus still reaches the client.
                    if out_parts is None:
                        out_parts = []
                    out_parts.append(data[keep_from:pos])
                    if kind == p.PARAMETER_STATUS:
                        out_parts.append(data[pos:end])
                    elif kind == p.ERROR_RESPONSE:
                        out_parts.append(self._replay_failed(data[pos + 5:end]))
                    keep_from = end
            elif end > n:
                self.s_skip = end - n
                pos = n
                break
            pos = end
        forward_end = n - len(self.sbuf)
        if out_parts is not None:
            out_parts.append(data[keep_from:forward_end])
            out = b"".join(out_parts)
        else:
            out = data if forward_end == n else data[:forward_end]
        if saw_ready and not fifo and self.tx_status == p.TX_IDLE and not self.pending_extended and not self.unnamed_held:
            self.release_due = True
        if self.retry_request is not None:
            return out, HELD_REFUSAL
        release = self.release_due and not self.sbuf and not self.s_skip
        if release:
            self.release_due = False
        return out, release

    def retry_declined(self) -> tuple[bytes, bool]:
        """The node is still the writer: the client gets the held refusal as the server sent it."""
        out = b"".join(self.retry_held or ())
        self.retry_held = None
        self.retry_request = self.retry_saved = None
        release = self.release_due and not self.sbuf and not self.s_skip
        if release:
            self.release_due = False
        return out, release

    def retry_accepted(self) -> bytes:
        """Put the refused request back as it was before it was sent; the core sends it to the new writer."""
        forward, entry, syncs_done, rewrite = self.retry_saved
        self.retry_saved = self.retry_request = self.retry_held = None
        self.fifo.clear()
        self.fifo.append(entry)
        self.syncs_done = syncs_done
        self.tx_status = p.TX_IDLE
        self.deferred_rewrite = rewrite
        self.release_due = False
        self.sbuf = b""
        return forward

    def _parses_unanswered(self, syncs_done: int) -> None:
        """Parses of finished Sync groups that got no ParseComplete failed: the backend lacks those statements."""
        parse_fifo = self.parse_fifo
        prepared = self.server_state.prepared if self.server_state is not None else set()
        while parse_fifo and parse_fifo[0][0] < syncs_done:
            gname = parse_fifo.popleft()[2]
            if gname is not None:
                prepared.discard(gname)

    def _internal_done(self) -> None:
        """The proxy's own SETs finished: record the settings they made, unless they failed (then none took)."""
        if self.pending_settings is not None and not self.internal_failed and self.server_state is not None:
            self.server_state.settings = self.pending_settings
        self.pending_settings = None
        self.internal_failed = False

    def _parameter_status(self, data: bytes, start: int, end: int) -> None:
        try:
            name_end = data.index(b"\x00", start, end)
            value_end = data.index(b"\x00", name_end + 1, end)
        except ValueError:
            return
        name = data[start:name_end].decode("utf-8", "replace")
        value = data[name_end + 1:value_end].decode("utf-8", "replace")
        low = name.lower()
        self.canonical.setdefault(low, name)
        if self.server_params is not None:
            self.server_params[low] = value
        if low in CLIENT_OWNED:
            # The client's own doing only if it touched the setting; otherwise the node changed it itself.
            if self.owns_read_only:
                self.client_settings = {**self.client_settings, low: value}
                if self.server_state is not None:
                    self.server_state.settings = {**self.server_state.settings, low: value}
            return
        self.client_params[low] = value

    def _replay_failed(self, body: bytes) -> bytes:
        """A replayed setting failed on the new backend: tell the client as a warning and stop replaying it."""
        fields = p.parse_fields(body)
        text = fields.get("M", "unknown error")
        for low in list(self.client_settings):
            if low in text.lower():
                del self.client_settings[low]
        return p.notice_response("01000", f"multiproxy could not apply your session setting on a pooled connection: {text}",
                                 "WARNING")

    # ------------------------------------------------------------------ linking to backends

    def link(self, server_state, data: bytes) -> bytes:
        """What to send to a freshly linked backend: SET statements bringing it to this client's tracked
        parameters (as an internal request), then the client's bytes (statement names mapped if needed)."""
        self.linked = True
        self.server_state = server_state
        params = server_state.params
        self.server_params = params
        if self.deferred_rewrite is not None:
            start, group = self.deferred_rewrite
            self.deferred_rewrite = None
            data = self._rewrite_statements(data, start, group)
        settings = server_state.settings
        if self.client_params.items() <= params.items() and self.client_settings == settings:
            return data
        assignments = [(low, value) for low, value in self.client_params.items()
                       if low not in FIXED_PARAMETERS and params.get(low) != value]
        statements = []
        if self.client_settings != settings:
            assignments += [(low, value) for low, value in self.client_settings.items() if settings.get(low) != value]
            # Settings an earlier client of this backend made, that this client never asked for.
            statements += [f"RESET {p.quote_ident(low)}" for low in settings if low not in self.client_settings]
            self.pending_settings = dict(self.client_settings)
        if assignments:
            # set_config parses values as the startup packet's -c does (lists such as search_path stay lists).
            statements.append("SELECT " + ", ".join(
                f"pg_catalog.set_config({p.quote_literal(low)}, {p.quote_literal(value)}, false)"
                for low, value in assignments))
        if not statements:
            self.pending_settings = None
            return data
        self.fifo.appendleft(INTERNAL)
        return p.query(";".join(statements)) + data

    def unlink(self) -> None:
        self.linked = False
        self.retry_held = None
        self.retry_refused = False
        self.release_due = False
        self.pending_settings = None
        self.internal_failed = False
        self.server_state = None
        self.server_params = None
        self.parse_fifo.clear()
        self.sbuf = b""
        self.s_skip = 0

    def reset_bytes(self, server_state, reset_query: str = "") -> bytes:
        """Reset a backend leaving a pinned session: DISCARD ALL (or the configured query) as an internal request."""
        server_state.settings = {}
        server_state.prepared.clear()
        self.fifo.append(INTERNAL)
        return p.query(reset_query or "DISCARD ALL")

    def is_clean(self) -> bool:
        """Nothing outstanding, no transaction, no COPY, no half message: the backend could serve someone else."""
        return (not self.fifo and self.tx_status == p.TX_IDLE and not self.pending_extended and not self.copy_in
                and not self.sbuf and not self.s_skip and not self.cbuf and not self.c_skip)

    # ------------------------------------------------------------------ failures

    def fail_pending(self, kind: ErrorKind, message: str) -> bytes:
        """The last client_data could not reach a backend: answer each of its requests with the error, as a
        server would answer each Sync-terminated segment of a pipeline."""
        error = render_error(kind, message, fatal=False)
        out = [p.READY_IDLE if entry == EMPTY_SYNC else error + p.READY_IDLE for entry in self.fifo]
        self.fifo.clear()
        out.append(self._forget_unanswerable(error))
        return b"".join(out)

    def _forget_unanswerable(self, error: bytes) -> bytes:
        """Extended-protocol messages not yet closed by a Sync fail now, as on a server; the rest of that
        segment is dropped and its Sync answered locally. Half a message still to come is dropped too."""
        self.tx_status = p.TX_IDLE
        reply = b""
        if self.pending_extended:
            self.discard_until_sync = True
            self.pending_extended = False
            reply = error
        if self.c_skip:
            self.c_discard = True
        self.unnamed_held = False
        self.copy_in = False
        self.deferred_rewrite = None
        return reply

    def backend_lost(self, message: str) -> tuple[bytes, bool]:
        """The linked backend died. Returns (bytes for the client, whether the client must be closed)."""
        if self.backend_farewell:
            message += f"; the server said: {self.backend_farewell}"
            self.backend_farewell = ""
        mid_message = bool(self.sbuf or self.s_skip)
        session_state_lost = self.pinned
        self.unlink()
        if mid_message or session_state_lost or self.copy_in:
            return render_error(ErrorKind.BACKEND_LOST, message + (
                "; your session's state was lost with it, reconnect" if session_state_lost else ""), fatal=True), True
        error = render_error(ErrorKind.BACKEND_LOST, message + "; the transaction was rolled back, retry it", fatal=False)
        out = [p.READY_IDLE if entry == EMPTY_SYNC else error + p.READY_IDLE for entry in self.fifo]
        if not self.fifo and self.tx_status != p.TX_IDLE:
            self.transaction_lost = True
            self.local_error = error
        self.fifo.clear()
        out.append(self._forget_unanswerable(error))
        return b"".join(out), False

    def error(self, kind: ErrorKind, message: str) -> bytes:
        return render_error(kind, message)
