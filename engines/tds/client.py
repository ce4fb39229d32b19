"""One TDS client connection, sans-IO: PRELOGIN (TLS inside PRELOGIN packets), LOGIN7, then transaction pooling."""
from __future__ import annotations

import enum
import os
import ssl
from collections import deque

from multiproxy.engine import (
    HELD_REFUSAL, AuthFailed, Authenticated, ClientContext, ClientProtocol, CloseClient, ErrorKind, LazyContainers,
    PinReason, ProtocolError, SendToClient,
)
from multiproxy.token_auth import TokenRejected

from . import compiled_relay, handover
from .auth import check_tds_sha256
from .session_state import SessionState, request_effects
from .statements import Statements, tsql_unprepares
from .transactions import (
    BEGIN, TransactionVerb, backend_begin_request, local_begin_reply, local_end_reply, new_local_descriptor,
    transaction_verb, with_local_begin, without_begin_after,
)
from .wire import messages as tp
from .wire import token_stream as tk
from .wire.memory_tls import MemoryTLS
from .wire.response_scanner import ResponseScanner, Reframer
from .wire.token_stream import ProtocolError as TDSError

class Phase(enum.Enum):
    """Where a client's login stands: which message the engine expects next."""

    PRELOGIN = enum.auto()          # the PRELOGIN message
    TLS_HANDSHAKE = enum.auto()     # TLS handshake records inside PRELOGIN packets
    LOGIN = enum.auto()             # LOGIN7
    READY = enum.auto()             # logged in: requests go to the relay


# Module-level names: an enum member read through its class costs a lookup per use on the handshake path.
PRELOGIN, TLS_HANDSHAKE, LOGIN, READY = Phase.PRELOGIN, Phase.TLS_HANDSHAKE, Phase.LOGIN, Phase.READY

SERVER_NAME = "multiproxy"
# (number, class) per error situation; messages come from the core and say what to do.
ERRORS = {
    ErrorKind.POOL_TIMEOUT: (10928, 16),
    ErrorKind.BACKEND_UNAVAILABLE: (40613, 17),
    ErrorKind.BACKEND_LOST: (40197, 20),
    ErrorKind.AUTH_FAILED: (18456, 14),
    ErrorKind.PROTOCOL_VIOLATION: (4002, 20),
    ErrorKind.MESSAGE_TOO_LARGE: (4002, 20),
    ErrorKind.TOO_MANY_CONNECTIONS: (17809, 20),
    ErrorKind.TLS_REQUIRED: (18456, 14),
    ErrorKind.SHUTTING_DOWN: (6005, 14),
    ErrorKind.FAILOVER: (40197, 17),
    ErrorKind.IDLE_TIMEOUT: (50001, 20),
    ErrorKind.HANDSHAKE_TIMEOUT: (50002, 20),
    ErrorKind.NOT_SUPPORTED: (40517, 16),
    ErrorKind.INTERNAL: (50000, 20),
    ErrorKind.QUERY_TIMEOUT: (50003, 16),
    ErrorKind.IDLE_TRANSACTION_TIMEOUT: (50001, 20),
}
STATES = {kind: index + 1 for index, kind in enumerate(ErrorKind)}
RESET_ACK = tk.env_reset_ack()
READ_ONLY_ERROR = 3906
LOGIN7_PASSWORD_LIMIT = 128     # characters, as MS-TDS documents it; FreeTDS enforces it on what it sends


def error_tokens(kind: ErrorKind, message: str) -> bytes:
    number, severity = ERRORS.get(kind, (50000, 20))
    return tk.error(number, f"multiproxy: {message}", STATES.get(kind, 1), severity, SERVER_NAME, "", 1)


def render_error(kind: ErrorKind, message: str, packet_size: int = tp.DEFAULT_PACKET_SIZE) -> bytes:
    """A whole reply message: ERROR (number, state, class) then DONE with the error bit."""
    return tp.encode_message(tp.TABULAR_RESULT, error_tokens(kind, message) + tk.done(tk.DONE_ERROR), packet_size)


class _Expect:
    """One response the backend owes: the client's (forwarded) or the proxy's own (swallowed), with what the
    request does to the session (see session_state.request_effects)."""

    __slots__ = ("internal", "strip_reset", "attention", "first", "request", "effects", "sent", "failed",
                 "begin_after", "plan", "rewriter", "wire", "local")

    def __init__(self, internal=False, strip_reset=False, attention=False, request=b"", effects=(),
                 begin_after=None, local=None):
        self.internal = internal
        self.strip_reset = strip_reset
        self.attention = attention
        self.first = True
        self.request = request
        self.effects = effects
        self.sent = False
        self.failed = False
        self.begin_after: TransactionVerb | None = begin_after   # the begin the proxy answers after the commit
        self.plan = None        # an RPC of the sp_prepare family not yet rewritten (no backend linked when it came)
        self.rewriter = None    # statements.Rewriter of its answer
        self.wire = b""         # the bytes client_data gave for it (link() rewrites planned ones)
        self.local = local      # the proxy's own answer, sent when the requests before it are answered


class TDSClient(LazyContainers, SessionState, Statements, ClientProtocol):
    """Protocol state of one client: handshake, then the relay between it and its current backend."""

    # Bumped whenever what handover_state exports changes in a way that matters to a resumed session (SET options,
    # database, prepared handles, pins): a worker's custody re-sends the record only then.
    state_generation = 0
    # Class-level defaults of what __init__ sets (compact() drops an attribute back at its default; reads then
    # find the class's value). Dropped while empty, made again at their next use: lazy_containers.
    lazy_containers = {"expect": deque, "pin_reasons": set}
    closing = False
    leftover = b''
    retry_request = None
    retry_refusal = None
    hbuf = b''
    tls = None
    tls_full = False
    tls_login_only = False
    tls_raw = False
    user = ''
    login = None
    fedauth_required = False
    server_nonce = None
    client_nonce = None
    fedauth_ack = False
    linked = False
    server_state = None
    sbuf = b''
    in_transaction = False
    database = ''
    login_state = None
    attn_local = False
    attn_by_proxy = False
    retry_ok = False
    descriptor = b''
    local_descriptor = b''
    lazy_begin = None
    transaction_lost = ''
    virtualize = True
    next_handle = 1

    def __init__(self, ctx: ClientContext, engine):
        self.ctx = ctx
        self.engine = engine
        self.pinned = False
        self.closing = False
        self.requests = 0
        self.leftover = b""
        self.retry_request = None
        self.retry_refusal = None        # (payload, eom) of a held read-only refusal (see retry_declined)
        self.phase = PRELOGIN
        self.hbuf = b""
        self.reader = tp.MessageReader(tp.MAX_PACKET_SIZE + 1)
        self.tls: MemoryTLS | None = None    # while TLS runs inside the engine
        self.tls_full = False            # every byte after the login is TLS (encryption ON/REQ)
        self.tls_login_only = False
        self.tls_raw = False             # TLS records come raw on the socket (after the PRELOGIN handshake)
        self.user = ""
        self.login: tp.Login7 | None = None
        self.fedauth_required = False    # what PRELOGIN answered in FEDAUTHREQUIRED: LOGIN7's FEDAUTH must echo it
        self.server_nonce = None         # NONCEOPT sent to the client: a FEDAUTH security token must echo it
        self.client_nonce = None         # the client's NONCEOPT: FEATUREEXTACK returns it
        self.fedauth_ack = False         # logged in with a FEDAUTH token: the login reply acknowledges it
        self.packet_size = tp.DEFAULT_PACKET_SIZE
        self.backend_size = tp.DEFAULT_PACKET_SIZE
        # relay state
        self.linked = False
        self.server_state = None
        self.expect: deque[_Expect] = deque()
        self.scanner = ResponseScanner()
        self.reframer = Reframer(tp.DEFAULT_PACKET_SIZE)
        self.sbuf = b""
        self.in_transaction = False
        self.database = ""               # the client's current database (from ENVCHANGE)
        self.options: dict[str, str] = {}   # tracked SET options: name -> statement to replay
        self.login_state: tuple[str, dict] | None = None   # (database, options) the login gave: a reset's target
        self.pin_reasons: set = set()    # what pins the session (a reset undoes them all)
        self.ident = object()
        self.attn_local = False
        self.attn_by_proxy = False      # an ATTENTION the proxy sent (query_timeout), not the client
        self.retry_ok = False
        self.descriptor = b""            # the backend's descriptor of the open transaction (ENVCHANGE 8)
        self.local_descriptor = b""      # a descriptor the proxy made for the client: mapped to the backend's
        self.lazy_begin: TransactionVerb | None = None   # a begin the proxy answered, to run with the next request
        self.transaction_lost = ""       # the backend died under an idle transaction: the next request is told
        # the sp_prepare family (statements.py): proxy handle -> Prepared
        self.virtualize = ctx.engine_options.get("prepared_statements", "virtualize") != "pin"
        self.handles: dict = {}
        self.next_handle = 1

    # ------------------------------------------------------------------ TLS inside the engine

    def _out(self, data: bytes) -> bytes:
        # Before the TLS handshake inside PRELOGIN finished there is no session to encrypt with: errors go plain.
        if self.tls_full and data and self.phase is not TLS_HANDSHAKE:
            return self.tls.encrypt(data)
        return data

    def _decrypt(self, data: bytes) -> bytes:
        try:
            return self.tls.decrypt(data)
        except ssl.SSLError as exc:
            raise ProtocolError(f"TLS error: {exc}") from None

    # ------------------------------------------------------------------ handshake

    def _fail(self, kind: ErrorKind, message: str) -> CloseClient:
        return CloseClient(self._out(render_error(kind, message)), message)

    def receive_handshake(self, data: bytes) -> list:
        try:
            return self._handshake(data)
        except TDSError as exc:
            raise ProtocolError(f"malformed TDS login: {exc}", self._out(render_error(
                ErrorKind.PROTOCOL_VIOLATION, f"malformed TDS login: {exc}"))) from None

    def _handshake(self, data: bytes) -> list:
        events: list = []
        if self.phase is TLS_HANDSHAKE:
            # Packet by packet: once the handshake ends, what follows are raw TLS records (TLS 1.3 clients send
            # LOGIN7 right behind their Finished, often in the same segment).
            self.hbuf += data
            data = b""
            while self.phase is TLS_HANDSHAKE and len(self.hbuf) >= tp.HEADER_SIZE:
                header = tp.PacketHeader.decode(self.hbuf[:tp.HEADER_SIZE])
                if header.type != tp.PRELOGIN or header.length < tp.HEADER_SIZE:
                    raise TDSError("expected the TLS handshake inside PRELOGIN packets")
                if len(self.hbuf) < header.length:
                    break
                payload, self.hbuf = self.hbuf[tp.HEADER_SIZE:header.length], self.hbuf[header.length:]
                event = self._tls_step(tp.Message(tp.PRELOGIN, header.status, payload))
                if event is not None:
                    events.append(event)
                if isinstance(event, CloseClient):
                    return events
            if self.phase is TLS_HANDSHAKE:
                return events
            data, self.hbuf = self.hbuf, b""
        if self.tls_raw and data:
            data = self._decrypt(data)
        messages = self.reader.feed(data)
        if self.reader.pending > self.ctx.max_message_size:
            # packets without an end of message: the login message would grow for as long as the client sends
            raise TDSError(f"a login message of more than {self.ctx.max_message_size} bytes (proxy.max_message_size)")
        for msg in messages:
            if len(msg.data) > self.ctx.max_message_size:
                # a whole one that arrived in one read: it would be parsed and kept (LOGIN7 is held for the backend)
                raise TDSError(f"a login message of more than {self.ctx.max_message_size} bytes "
                               "(proxy.max_message_size)")
            if self.phase is PRELOGIN:
                events.append(self._prelogin(msg))
            elif self.phase is LOGIN:
                events.append(self._login7(msg))
            else:
                raise TDSError(f"unexpected message 0x{msg.type:02x} during login")
            if isinstance(events[-1], (Authenticated, CloseClient, AuthFailed)):
                break
        return [e for e in events if e is not None]

    def _prelogin(self, msg: tp.Message):
        if msg.type != tp.PRELOGIN:
            return self._fail(ErrorKind.PROTOCOL_VIOLATION,
                              "expected PRELOGIN first; connect with a TDS 7.x client (TDSVER=7.4)")
        prelogin = tp.Prelogin.decode(msg.data)
        client = prelogin.encryption if prelogin.encryption is not None else tp.ENCRYPT_NOT_SUP
        listener = self.ctx.listener
        context = self.engine.client_tls_context(listener, self.ctx.tls_context)
        if context is None:
            answer = tp.ENCRYPT_NOT_SUP
        elif getattr(listener, "require_tls", False) or (listener.auth == "token" and client == tp.ENCRYPT_NOT_SUP):
            answer = tp.ENCRYPT_REQ
        elif client in (tp.ENCRYPT_ON, tp.ENCRYPT_REQ):
            answer = tp.ENCRYPT_ON
        elif client == tp.ENCRYPT_OFF:
            answer = tp.ENCRYPT_OFF
        else:
            answer = tp.ENCRYPT_NOT_SUP
        reply = tp.Prelogin.build(version=(16, 0, 1000, 6), encryption=answer, mars=0)
        reply.options[tp.PL_INSTOPT] = b"\0"
        if prelogin.fedauth_required is not None:
            # The client means to send an access token (FEDAUTH). Token listeners answer 1, as Azure SQL does: the
            # client then sets fFedAuthEcho and expects FEATUREEXTACK; password listeners answer 0 (and refuse the
            # FEDAUTH login with a message saying to use a password).
            self.fedauth_required = listener.auth == "token"
            reply.options[tp.PL_FEDAUTHREQUIRED] = bytes([int(self.fedauth_required)])
        if prelogin.nonce is not None and listener.auth == "token":
            self.client_nonce, self.server_nonce = prelogin.nonce, os.urandom(tp.NONCE_SIZE)
            reply.options[tp.PL_NONCEOPT] = self.server_nonce
        out = tp.encode_message(tp.TABULAR_RESULT, reply.encode())
        if answer == tp.ENCRYPT_NOT_SUP:
            if getattr(listener, "require_tls", False) or listener.auth == "token":
                return CloseClient(out + render_error(ErrorKind.TLS_REQUIRED, "TLS is required"))
            self.phase = LOGIN
            return SendToClient(out)
        if client == tp.ENCRYPT_NOT_SUP:
            if listener.auth == "token":    # refused now, before the client sends its token in LOGIN7
                message = (f"listener {listener.name!r} authenticates with tokens, which are only accepted in an "
                           "encrypted login: connect with encryption enabled (FreeTDS: encryption = request or "
                           "require; pymssql: encryption='request')")
            else:
                message = (f"listener {listener.name!r} requires encryption: connect with encryption enabled "
                           "(FreeTDS: encryption = require; pymssql/pytds: a TLS-capable build)")
            return CloseClient(out + render_error(ErrorKind.TLS_REQUIRED, message), message)
        self.tls = MemoryTLS(context, server_side=True)
        self.tls_full = answer != tp.ENCRYPT_OFF
        self.tls_login_only = answer == tp.ENCRYPT_OFF
        self.phase = TLS_HANDSHAKE
        self.hbuf = self.reader.take_unparsed()   # TLS handshake bytes that came with the PRELOGIN
        return SendToClient(out)

    def _tls_step(self, msg: tp.Message):
        if msg.type != tp.PRELOGIN:
            raise TDSError("expected the TLS handshake inside PRELOGIN packets")
        try:
            finished = self.tls.handshake(msg.data)
        except ssl.SSLError as exc:
            # Tell the client with the TLS alert OpenSSL wrote (inside PRELOGIN, as the handshake), and log why
            # (a missing or untrusted client certificate, no shared cipher).
            alert = self.tls.pending_output()
            why = exc.reason.replace("_", " ").lower() if exc.reason else str(exc)
            raise ProtocolError(f"TLS handshake failed: {why}",
                                tp.encode_message(tp.PRELOGIN, alert) if alert else b"",
                                ErrorKind.TLS_REQUIRED) from None
        out = self.tls.pending_output()
        if finished:
            self.phase = LOGIN
            self.tls_raw = True
            self.tls_full_pending = self.tls_full
            self.tls_full = False
        return SendToClient(tp.encode_message(tp.PRELOGIN, out)) if out else None

    def _login7(self, msg: tp.Message):
        if msg.type != tp.LOGIN7:
            return self._fail(ErrorKind.PROTOCOL_VIOLATION, f"expected LOGIN7, got a message of type 0x{msg.type:02x}")
        if self.tls is not None:
            self.tls_full = getattr(self, "tls_full_pending", False)
            if self.tls_login_only:
                self.tls_raw = False
        login = self.login = tp.Login7.decode(msg.data)
        self.user = login.username
        ctx = self.ctx
        if ctx.listener.require_tls and self.tls is None:
            return self._fail(ErrorKind.TLS_REQUIRED, f"listener {ctx.listener.name!r} requires TLS")
        if login.tds_version < tp.TDS72:
            spoken = f"{login.tds_version >> 28}.{(login.tds_version >> 24) & 0xF}"
            return self._fail(ErrorKind.NOT_SUPPORTED,
                              f"this client logged in with TDS {spoken}; multiproxy speaks TDS 7.2 to 7.4: set "
                              "TDSVER=7.4 (FreeTDS), tds_version='7.4' (pymssql), or use a driver that speaks TDS 7.2 "
                              "or later (jTDS stops at 7.1; Microsoft's JDBC driver speaks 7.4)")
        if login.integrated_security:
            return self._denied("integrated (SSPI/Kerberos) authentication is not supported by multiproxy; "
                                "use a SQL login (user name and password)")
        if login.fedauth is not None:
            return self._check_fedauth(login, login.fedauth)
        if not login.username:
            return self._denied("no user name in LOGIN7; use a SQL login")
        if ctx.listener.auth == "token":
            return self._check_token(login)
        if ctx.listener.auth != "trust":
            record = ctx.users.get(login.username) if ctx.users is not None else None
            verifier = record.verifiers.get("tds_sha256") if record is not None else None
            if record is not None and not record.may_use(ctx.listener.name):
                return self._denied(None, "listener not allowed for user")
            if verifier is None or not check_tds_sha256(verifier, login.password):
                return self._denied(None, "wrong password or no tds_sha256 verifier")
        return self._login_accepted(login)

    def _check_token(self, login: tp.Login7):
        """Token listeners: the token is LOGIN7's password, accepted only when the login travelled inside TLS
        (encryption ON, or OFF where only the login packet is encrypted: either way the token was protected)."""
        if self.tls is None:
            return self._fail(ErrorKind.TLS_REQUIRED, f"listener {self.ctx.listener.name!r} authenticates with "
                              "tokens, which are only accepted in an encrypted login: connect with encryption enabled")
        verifier = self.ctx.listener.token_verifier
        try:
            if verifier is None:
                raise TokenRejected("no token verifier configured")
            verifier.verify(login.password, login.username)
        except TokenRejected as exc:
            hint = ""
            if len(login.password) in (0, LOGIN7_PASSWORD_LIMIT):
                hint = (f" (the client sent {len(login.password)} characters: FreeTDS clients such as tsql and "
                        f"pymssql cut a password at {LOGIN7_PASSWORD_LIMIT} characters or send none: send the token "
                        "as an access token instead (LOGIN7 FEDAUTH, e.g. python-tds access_token_callable))")
            return self._denied(f"Login failed for user '{login.username}': token authentication failed: {exc}{hint}",
                                f"token rejected: {exc}", "token_rejected")
        return self._login_accepted(login)

    def _check_fedauth(self, login: tp.Login7, fed: tp.FedAuth):
        """LOGIN7 with the FEDAUTH feature: an access token (security token library, as python-tds'
        access_token_callable and SqlClient send it) instead of a user name and password. Token listeners
        verify it and take the database user from it (RDS IAM: DBUser; JWT: the user claim); a user name sent
        next to it must be the token's."""
        listener = self.ctx.listener
        if listener.auth != "token":
            return self._denied(f"Login failed: listener {listener.name!r} authenticates with passwords, not access "
                                "tokens (FEDAUTH): log in with a user name and password (SQL login)",
                                "FEDAUTH access token on a password listener")
        if fed.library != tp.FEDAUTH_SECURITYTOKEN:
            library = tp.FEDAUTH_LIBRARIES.get(fed.library, f"0x{fed.library:02x}")
            return self._denied(f"Login failed: federated authentication through the {library} library is not "
                                "supported by multiproxy; send the access token itself (security token library, "
                                "e.g. python-tds access_token_callable)", f"FEDAUTH library {library} not supported")
        if self.tls is None:
            return self._fail(ErrorKind.TLS_REQUIRED, f"listener {listener.name!r} authenticates with tokens, which "
                              "are only accepted in an encrypted login: connect with encryption enabled")
        if fed.echo != self.fedauth_required:
            return self._denied("Login failed: the FEDAUTH feature's echo bit does not match the FEDAUTHREQUIRED "
                                "option of the server's PRELOGIN answer", "FEDAUTH echo bit mismatch")
        if fed.nonce != self.server_nonce:
            return self._denied("Login failed: the FEDAUTH feature's nonce does not match the server's PRELOGIN "
                                "NONCEOPT" if self.server_nonce else
                                "Login failed: the FEDAUTH feature carries a nonce the server never sent",
                                "FEDAUTH nonce mismatch")
        verifier = listener.token_verifier
        try:
            if verifier is None:
                raise TokenRejected("no token verifier configured")
            user = verifier.verify(fed.text, login.username or None)
        except TokenRejected as exc:
            who = f" for user '{login.username}'" if login.username else ""
            return self._denied(f"Login failed{who}: token authentication failed: {exc} (FEDAUTH access token)",
                                f"token rejected: {exc}", "token_rejected")
        self.user = user
        self.fedauth_ack = True
        return self._login_accepted(login, user)

    def _login_accepted(self, login: tp.Login7, user: str | None = None):
        requested = login.packet_size or tp.DEFAULT_PACKET_SIZE
        self.packet_size = min(max(requested, tp.MIN_PACKET_SIZE), tp.MAX_PACKET_SIZE)
        self.reader.max_packet_size = self.packet_size
        self.reframer = Reframer(self.packet_size)
        self.phase = READY
        return Authenticated(user or login.username, login.database, {})

    def _denied(self, text: str | None, reason: str = "", audit_event: str = "auth_failed"):
        message = text or f"Login failed for user '{self.user}'."
        return AuthFailed(self.user, self._out(render_error(ErrorKind.AUTH_FAILED, message)), reason or message,
                          audit_event)

    def login_complete(self, server_state) -> bytes:
        """The login reply, from the backend's login facts, in the order FreeTDS and python-tds accept."""
        state = server_state
        database = state.database if state is not None else (self.login.database or "master")
        self.database = database
        name = SERVER_NAME
        language = state.language if state else "us_english"
        wanted = (self.login.language or "").strip()
        if wanted and wanted.lower() != language.lower():
            # LOGIN7's language is a session setting: replayed with the client's other SET options on every
            # backend it uses (a language the server lacks fails there, as SET LANGUAGE would).
            self.options["LANGUAGE"] = f"SET LANGUAGE [{wanted.replace(']', ']]')}]"
            language = wanted
        body = (tk.envchange(tk.ENV_DATABASE, database, "master")
                + tk.info(5701, f"Changed database context to '{database}'.", 2, 0, name)
                + tk.envchange(tk.ENV_COLLATION, state.collation if state else tk.DEFAULT_COLLATION, b"")
                + tk.envchange(tk.ENV_LANGUAGE, language, "")
                + tk.info(5703, f"Changed language setting to {language}.", 1, 0, name)
                + tk.loginack(state.prog_name if state else "Microsoft SQL Server",
                              state.tds_version if state else tk.TDS74_VERSION_BYTES,
                              state.prog_version if state else bytes([16, 0, 0x03, 0xE8]))
                + tk.envchange(tk.ENV_PACKETSIZE, str(self.packet_size), str(self.login.packet_size))
                + (tk.fedauth_ack(self.client_nonce) if self.fedauth_ack else b"")
                + tk.done())
        return self._out(tp.encode_message(tp.TABULAR_RESULT, body, self.packet_size))

    # ------------------------------------------------------------------ relay: client to backend

    def client_data(self, data: bytes) -> tuple[bytes, bytes]:
        if self.tls_full:
            data = self._decrypt(data)
        try:
            messages = self.reader.feed(data)
        except TDSError as exc:
            raise ProtocolError(str(exc), self._out(render_error(ErrorKind.PROTOCOL_VIOLATION, str(exc)))) from None
        if self.reader.pending > self.ctx.max_message_size:
            message = (f"request of more than {self.ctx.max_message_size} bytes exceeds proxy.max_message_size; "
                       "send smaller batches or raise it")
            raise ProtocolError(message, self._out(render_error(ErrorKind.MESSAGE_TOO_LARGE, message)),
                                ErrorKind.MESSAGE_TOO_LARGE)
        out = []
        local: list[bytes] = []         # the proxy's answers, one message each
        if self.login_state is None:
            self.login_state = (self.database, dict(self.options))      # before any request changes them
        for msg in messages:
            if msg.type == tp.ATTENTION:
                if self.linked or self.expect:
                    entry = _Expect(attention=True)
                    entry.wire = tp.encode_message(tp.ATTENTION, b"", self.backend_size)
                    entry.sent = self.linked
                    self.expect.append(entry)
                    out.append(entry.wire)
                else:
                    local.append(tk.done(tk.DONE_ATTN))
                continue
            if msg.type not in (tp.SQL_BATCH, tp.RPC, tp.TRANSACTION_MANAGER):
                message = f"TDS message type 0x{msg.type:02x} is not supported after login"
                raise ProtocolError(message, self._out(render_error(ErrorKind.NOT_SUPPORTED, message)),
                                    ErrorKind.NOT_SUPPORTED)
            self.requests += 1
            if self.transaction_lost:
                local.append(self._lost_transaction_reply(self.transaction_lost))
                self.transaction_lost = ""
                continue
            verb = transaction_verb(msg) if msg.type in (tp.SQL_BATCH, tp.TRANSACTION_MANAGER) else None
            if verb is not None and not out and not self.expect:
                answer = self._local_transaction(verb)
                if answer:
                    local.append(answer)
                    continue
            payload = msg.data
            if self.local_descriptor and msg.type in (tp.SQL_BATCH, tp.RPC, tp.TRANSACTION_MANAGER):
                # The client echoes the descriptor the proxy gave it: the backend knows its own (or, for the
                # request that travels behind the begin, none yet: 0 stands for the session's transaction).
                payload = tp.with_transaction_descriptor(
                    payload, self.descriptor if self.linked and self.in_transaction else bytes(8))
            if msg.type == tp.RPC and self.virtualize:
                plan = self._resolve_rpc(msg.status, payload)
                if plan is not None:
                    if plan.local_only:
                        if self.expect:     # answered in order, after what the backend still owes
                            self.expect.append(_Expect(local=plan.local_reply()))
                        else:
                            local.append(plan.local_reply())
                        continue
                    effects = plan.effects()
                    entry = _Expect(effects=request_effects(msg, self.virtualize) if effects is None else effects)
                    self.expect.append(entry)
                    if self.linked:
                        self._on_sent(entry)       # a reset it asks for empties the backend's statements first
                        payload, entry.rewriter = self._build_rpc(plan, self.server_state.statements)
                    else:
                        entry.plan = plan          # rewritten by link() for the backend it gets
                    entry.wire = tp.encode_message(msg.type, payload, self.backend_size, msg.status & ~tp.STATUS_EOM)
                    out.append(entry.wire)
                    continue
            elif msg.status & (tp.STATUS_RESETCONNECTION | tp.STATUS_RESETCONNECTIONSKIPTRAN):
                self.handles.clear()                # the client's reset ends its prepared statements
            elif (msg.type == tp.SQL_BATCH and self.virtualize
                  and PinReason.PREPARED_STATEMENT not in self.pin_reasons):
                unprepares = tsql_unprepares(payload)
                if unprepares is not None:          # handles are the proxy's: the backends keep their statements
                    if self.expect:
                        self.expect.append(_Expect(local=self._tsql_unprepare(unprepares)))
                    else:
                        local.append(self._tsql_unprepare(unprepares))
                    continue
            begin_after = None
            if verb is not None and verb.begin_after and not self.pinned:
                # Commit (or roll back) on the backend; the next transaction begins when it is used.
                payload = without_begin_after(payload)
                begin_after = TransactionVerb(BEGIN, True, verb.isolation_level)
            encoded = tp.encode_message(msg.type, payload, self.backend_size, msg.status & ~tp.STATUS_EOM)
            # A first request outside a transaction may be retried on the new writer if a read-only node
            # refuses it, unless the client logged in with ApplicationIntent=ReadOnly (the refusal is its own).
            retry = (self.ctx.retry_read_only and not self.in_transaction and self.lazy_begin is None
                     and not self.local_descriptor and not self.login.read_only_intent)
            entry = _Expect(request=encoded if retry else b"", effects=request_effects(msg, self.virtualize),
                            begin_after=begin_after)
            entry.wire = encoded
            self.expect.append(entry)
            if self.linked:
                self._on_sent(entry)
            out.append(encoded)
        to_client = b""
        if local:
            to_client = self._out(b"".join(tp.encode_message(tp.TABULAR_RESULT, body, self.packet_size)
                                           for body in local))
        return b"".join(out), to_client

    def _local_transaction(self, verb: TransactionVerb) -> bytes:
        """Answer a begin while the client holds no backend and no transaction, and the commit or rollback of
        such a begin nothing used since; b"" for what must go to a backend."""
        if self.linked or self.in_transaction:
            return b""
        if verb.kind == BEGIN:
            if self.local_descriptor:
                return b""          # nested in one the proxy answered: both run on the backend
            self.local_descriptor, self.lazy_begin = new_local_descriptor(), verb
            return local_begin_reply(self.local_descriptor, verb.via_tm)
        if self.lazy_begin is None:
            return b""
        ended, self.local_descriptor, self.lazy_begin = self.local_descriptor, b"", None
        if verb.begin_after:
            self.local_descriptor = new_local_descriptor()
            self.lazy_begin = TransactionVerb(BEGIN, True, verb.isolation_level)
        return local_end_reply(verb, ended, self.local_descriptor)

    # ------------------------------------------------------------------ linking to backends

    def link(self, server_state, data: bytes) -> bytes:
        """What a freshly linked backend gets before the client's request: a reset when another client used it
        since (ctx.reset_after_transaction: the RESETCONNECTION bit, or ctx.reset_query as a batch; without it, the
        bit when the backend carries a SET option this client never set), this
        client's database and SET options, and a begin the proxy answered; their answers are swallowed."""
        self.linked = True
        self.server_state = server_state
        self.backend_size = server_state.packet_size
        fresh = [entry for entry in self.expect if not entry.sent and entry.local is None]
        for entry in fresh:
            if entry.attention:
                entry.sent = True
            else:
                self._on_sent(entry)             # the requests reach a backend now: their pins and resets count
        internal: list[bytes] = []
        reset = False
        known = server_state.options
        # the client's own backend again, unless the client SET options elsewhere since (its last use left others)
        stale = known is not None and any(known.get(name) != value for name, value in self.options.items())
        if server_state.last_client is not self.ident or stale:
            # With reset_after_transaction = no a backend keeps the SET options its last clients left. Those this
            # client set are replayed; one it never set can go back to the login's value only through a reset
            # (T-SQL has no SET ... DEFAULT, and that value depends on the login and the server's user options), so
            # such a backend is reset for this client all the same.
            foreign = known is not None and any(name not in self.options for name in known)
            reset = (self.ctx.reset_after_transaction or foreign) and server_state.last_client is not None
            server_state.last_client = self.ident
            if reset:
                server_state.database = self.login_state[0]     # a reset returns it to its login's database
                if not self.ctx.reset_query or not self.ctx.reset_after_transaction:
                    server_state.statements.clear()             # the bit drops its prepared statements too
                else:
                    internal.append(tp.encode_message(tp.SQL_BATCH, tp.SqlBatch(self.ctx.reset_query).encode(),
                                                      self.backend_size))
                    reset = False
                    server_state.options = None     # what the reset query leaves is the query's to say
                if self.ctx.init_query:     # a reset undoes what the init query set: it runs again after it
                    internal.append(tp.encode_message(tp.SQL_BATCH, tp.SqlBatch(self.ctx.init_query).encode(),
                                                      self.backend_size))
            if reset:
                server_state.options = dict(self.options)      # the login's options, then the client's replayed
            elif server_state.options is not None:
                server_state.options = {**server_state.options, **self.options}
            replay = self._replay_statements(server_state.database)
            if replay:
                internal.append(tp.encode_message(tp.SQL_BATCH, tp.SqlBatch("; ".join(replay)).encode(),
                                                  self.backend_size))
        if any(entry.plan is not None for entry in fresh):
            data = self._rewrite_planned(fresh, data)
        if self.lazy_begin is not None and data and data[0] != tp.ATTENTION:
            internal.append(backend_begin_request(self.lazy_begin, self.backend_size))
            self.lazy_begin = None
        for _ in internal:
            self.expect.appendleft(_Expect(internal=True))
        if internal:
            if reset:
                first = internal[0]
                internal[0] = first[:1] + bytes([first[1] | tp.STATUS_RESETCONNECTION]) + first[2:]
            return b"".join(internal) + data
        if not reset or not data or data[0] == tp.ATTENTION:
            return data
        # RESETCONNECTION on the first packet of the client's request; its ENVCHANGE 18 is not shown (unless the
        # client asked for a reset itself: then the one reset answers both).
        if data[1] & (tp.STATUS_RESETCONNECTION | tp.STATUS_RESETCONNECTIONSKIPTRAN):
            return data
        first = next((e for e in self.expect if not e.internal and not e.attention), None)
        if first is None:
            return data
        first.strip_reset = True
        return data[:1] + bytes([data[1] | tp.STATUS_RESETCONNECTION]) + data[2:]

    def _rewrite_planned(self, fresh: list, data: bytes) -> bytes:
        """The requests client_data gave while no backend was linked (`data`: each entry's `wire`, in order), with
        the sp_prepare family rewritten for this backend's statements."""
        parts = []
        for entry in fresh:
            plan = entry.plan
            if plan is None:
                parts.append(entry.wire)
                continue
            entry.plan = None
            payload, entry.rewriter = self._build_rpc(plan, self.server_state.statements)
            first = entry.wire[1]
            parts.append(tp.encode_message(tp.RPC, payload, self.backend_size, first & ~tp.STATUS_EOM))
        return b"".join(parts)

    def unlink(self) -> None:
        state = self.server_state
        if state is not None and state.options is not None:
            state.options.update(self.options)      # what the client SET while linked stays on the backend
        self.linked = False
        self.server_state = None
        self.sbuf = b""

    # ------------------------------------------------------------------ relay: backend to client

    def backend_data(self, data: bytes) -> tuple[bytes, bool]:
        buf = self.sbuf + data if self.sbuf else data
        pos, end = 0, len(buf)
        out = []
        while end - pos >= 8:
            length = (buf[pos + 2] << 8) | buf[pos + 3]
            if length < 8:
                length = 8
            if end - pos < length:
                break
            self._packet(buf[pos + 8:pos + length], buf[pos + 1] & tp.STATUS_EOM, out)
            pos += length
        self.sbuf = buf[pos:]
        to_client = b"".join(out)
        if self.retry_request is not None:
            return (self._out(to_client) if to_client else b""), HELD_REFUSAL
        release = not self.expect and not self.in_transaction and not self.sbuf and self.linked
        return (self._out(to_client) if to_client else b""), release

    def retry_declined(self) -> tuple[bytes, bool]:
        """The node is still the writer: its refusal goes to the client, processed as the answer it is."""
        payload, eom = self.retry_refusal
        self.retry_refusal = self.retry_request = None
        out: list = []
        self._packet(payload, eom, out)
        release = not self.expect and not self.in_transaction and not self.sbuf and self.linked
        to_client = b"".join(out)
        return (self._out(to_client) if to_client else b""), release

    def retry_accepted(self) -> bytes:
        """The refused request, to send to the new writer (its answer is still awaited)."""
        request, self.retry_request, self.retry_refusal = self.retry_request, None, None
        return request

    def _packet(self, payload: bytes, eom: int, out: list) -> None:
        expect = self.expect
        entry = expect[0] if expect else None
        if entry is not None and entry.first:
            entry.first = False
            if entry.strip_reset and payload.startswith(RESET_ACK):
                payload = payload[len(RESET_ACK):]
        if entry is not None and entry.rewriter is not None:
            payload = entry.rewriter.feed(payload, bool(eom))
        attention_done = False
        read_only = False
        for event in self.scanner.feed(payload):
            kind = event[0]
            if kind == "env":
                env = event[1]
                if env == tk.ENV_BEGINTRAN:
                    self.in_transaction = True
                    self.descriptor = event[2] if isinstance(event[2], bytes) else b""
                elif env in (tk.ENV_COMMITTRAN, tk.ENV_ROLLBACKTRAN, tk.ENV_TRANENDED, tk.ENV_DEFECTTRAN):
                    self.in_transaction = False
                    self.descriptor = self.local_descriptor = b""
                elif env == tk.ENV_DATABASE:
                    if self.database != event[2]:
                        self.state_generation += 1
                    self.database = event[2]
                    if self.server_state is not None:
                        self.server_state.database = event[2]
            elif kind == "done":
                if event[2] & tk.DONE_ATTN:
                    attention_done = True
                elif event[2] & tk.DONE_ERROR and entry is not None:
                    entry.failed = True
            elif kind == "error":
                if event[3] > 10 and entry is not None:
                    entry.failed = True
                if event[1] == READ_ONLY_ERROR:
                    read_only = True
        internal = entry is not None and entry.internal
        if not internal:
            if (read_only and entry is not None and entry.request and eom and len(expect) == 1
                    and not self.in_transaction and self.retry_request is None and not self.reframer.buf
                    and self.reframer.packet_id == 1):
                self.retry_request = entry.request      # a read-only node refused it: the core decides
                self.retry_refusal = (payload, eom)
                entry.request, entry.first, entry.strip_reset = b"", True, False
                while expect[0] is not entry:
                    expect.popleft()
                self.scanner = ResponseScanner()
                return
            if eom and entry is not None and entry.begin_after is not None and not entry.failed:
                # the commit the client asked to begin a new transaction after: the proxy begins it (lazily)
                self.local_descriptor, self.lazy_begin = new_local_descriptor(), entry.begin_after
                payload = with_local_begin(payload, self.local_descriptor)
            if attention_done and self.attn_by_proxy:
                payload = self._proxy_attention_reply(payload)
            if payload:
                out.append(self.reframer.feed(payload, bool(eom)))
        if not eom:
            return
        self.scanner.buf = b""
        if attention_done:
            while expect:
                if expect.popleft().attention:
                    break
        elif expect and not expect[0].attention:
            answered = expect.popleft()
            self._on_answered(answered, answered.failed)
        while expect and expect[0].local is not None:
            out.append(self.reframer.feed(expect.popleft().local, True))

    # ------------------------------------------------------------------ session end, failures

    def reset_bytes(self, server_state, reset_query: str = "") -> bytes:
        """A pinned session left: RESETCONNECTION on a batch of its own; the answer is swallowed."""
        self.linked = True
        self.server_state = server_state
        server_state.last_client = None
        server_state.statements.clear()
        server_state.options = {}
        self.options = {}       # the client is gone: unlink() must not put its options back on the reset backend
        self.expect.append(_Expect(internal=True, strip_reset=True))
        batch = tp.SqlBatch(reset_query or "SELECT 1 WHERE 1 = 0").encode()
        return tp.encode_message(tp.SQL_BATCH, batch, server_state.packet_size, tp.STATUS_RESETCONNECTION)

    def awaiting_answer(self) -> bool:
        """A request sent waits for (the end of) its reply (query_timeout, idle timeouts)."""
        return bool(self.expect)

    def transaction_open(self) -> bool:
        """Inside a transaction, the one the proxy answered BEGIN TRAN for and begins lazily included."""
        return not self.is_clean() or self.lazy_begin is not None or bool(self.local_descriptor)

    def _proxy_attention_reply(self, payload: bytes) -> bytes:
        """The reply that ends with the acknowledgement of the proxy's own ATTENTION: the request's reply ends with the
        proxy's QUERY_TIMEOUT error instead of DONE(ATTN); an acknowledgement alone (the request was answered
        before the ATTENTION arrived) is swallowed."""
        self.attn_by_proxy = False
        expect = self.expect
        if len(payload) < 13 or payload[-13] != tk.TOKEN_DONE:
            return payload
        if expect and expect[0].attention:
            return payload[:-13]
        return payload[:-13] + error_tokens(ErrorKind.QUERY_TIMEOUT, "the request ran longer than the cluster's "
                                            "query_timeout and was cancelled; make it faster or raise "
                                            "clusters.NAME.pool.query_timeout") + tk.done(tk.DONE_ERROR)

    def cancel_in_band(self) -> bytes:
        """query_timeout: an ATTENTION on the serving connection; the reply's closing DONE(ATTN) becomes the proxy's
        error for the request (the client sent no ATTENTION of its own)."""
        if not self.linked or not self.expect or any(e.attention for e in self.expect):
            return b""
        self.expect.append(_Expect(attention=True))
        self.attn_by_proxy = True
        return tp.encode_message(tp.ATTENTION, b"", self.backend_size)

    def is_clean(self) -> bool:
        return not self.expect and not self.in_transaction and not self.sbuf and not self.reader.pending

    def fail_pending(self, kind: ErrorKind, message: str) -> bytes:
        count = sum(1 for e in self.expect if not e.internal and not e.attention)
        attention = any(e.attention for e in self.expect)
        self.expect.clear()
        body = (error_tokens(kind, message) + tk.done(tk.DONE_ERROR | tk.DONE_MORE)) * max(count - 1, 0)
        if count:
            body += error_tokens(kind, message) + tk.done(tk.DONE_ERROR)
        if attention:
            body += tk.done(tk.DONE_ATTN)
        return self._out(tp.encode_message(tp.TABULAR_RESULT, body, self.packet_size)) if body else b""

    def _lost_transaction_reply(self, text: str) -> bytes:
        """ENVCHANGE rollback (so the client drops its transaction descriptor), ERROR, DONE with the error bit."""
        body = (tk.envchange(tk.ENV_ROLLBACKTRAN, b"", self.local_descriptor or self.descriptor or bytes(8))
                + error_tokens(ErrorKind.BACKEND_LOST, text) + tk.done(tk.DONE_ERROR))
        self.descriptor = self.local_descriptor = b""
        return body

    def backend_lost(self, message: str) -> tuple[bytes, bool]:
        outstanding = any(not e.internal for e in self.expect)
        mid = bool(self.sbuf or self.reframer.buf or self.reframer.packet_id != 1)
        # a begin the proxy answered and sent in front of a request still unanswered is a transaction too
        pinned = self.pinned
        in_transaction = self.in_transaction or bool(self.local_descriptor and self.lazy_begin is None)
        self.expect.clear()
        self.unlink()
        self.scanner = ResponseScanner()
        self.reframer = Reframer(self.packet_size)
        self.in_transaction = False
        if mid or pinned:
            text = message + ("; your session's state was lost with it, reconnect" if pinned else "; reconnect")
            return self._out(render_error(ErrorKind.BACKEND_LOST, text, self.packet_size)), True
        if in_transaction:
            # The server rolled the transaction back when the connection died. The client stays connected: a
            # request waiting for its answer gets the error now, an idle client with its next request.
            text = message + "; the transaction was rolled back, retry it"
            if outstanding:
                return self._out(tp.encode_message(tp.TABULAR_RESULT, self._lost_transaction_reply(text),
                                                   self.packet_size)), False
            self.transaction_lost = text
            return b"", False
        if outstanding:
            return self._out(render_error(ErrorKind.BACKEND_LOST, message + "; retry", self.packet_size)), False
        return b"", False

    def handover_state(self) -> dict | None:
        return handover.export_state(self)

    def handover_generation(self) -> int:
        return self.state_generation
    def compact(self) -> None:
        """An idle client parks: its LOGIN7 keeps only what the session reads later (database, language, packet size,
        flags), and the empty containers and attributes back at their class defaults go."""
        if self.phase is not READY:
            return
        login = self.login
        if login is not None and (login.client_pid or login.hostname or login.appname or login.password
                                  or login.features):
            self.login = tp.Login7(
                tds_version=login.tds_version, packet_size=login.packet_size, option_flags1=login.option_flags1,
                option_flags2=login.option_flags2, type_flags=login.type_flags, option_flags3=login.option_flags3,
                client_lcid=login.client_lcid, language=login.language, database=login.database)
        self.compact_attributes()

    def relay_key(self):
        """The relay key when the compiled relay may serve this client's next requests (compiled_relay.py), else None."""
        return compiled_relay.relay_key(self)

    def handover_refusal(self) -> str:
        return handover.not_idle(self)

    def error(self, kind: ErrorKind, message: str) -> bytes:
        return self._out(render_error(kind, message, self.packet_size))

    def login_refused(self, refusal) -> bytes:
        """The server's ERROR (its number, class and text) answering the LOGIN7, or the first request, then DONE."""
        try:
            number = int(refusal.code)
        except ValueError:
            number = ERRORS[ErrorKind.BACKEND_UNAVAILABLE][0]
        body = tk.error(number, refusal.server_message, 1, refusal.severity or 14, SERVER_NAME, "", 1) \
            + tk.done(tk.DONE_ERROR)
        return self._out(tp.encode_message(tp.TABULAR_RESULT, body, self.packet_size))
