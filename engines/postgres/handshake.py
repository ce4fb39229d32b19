"""A PostgreSQL client's login, sans-IO: SSLRequest/GSSENCRequest/CancelRequest, the StartupMessage, then one of
trust, md5, SCRAM-SHA-256 or a token (cleartext password over TLS). Each phase is a `Phase`; the handshake ends
in `Phase.DONE` with the user, database, startup parameters and any bytes pipelined behind the password."""
from __future__ import annotations

import enum
import os

from multiproxy.engine import (
    AuthFailed, Authenticated, CancelRequested, ClientContext, CloseClient, ErrorKind, LookupUser, ProtocolError,
    SendToClient, StartClientTLS,
)
from multiproxy.token_auth import TokenRejected

from . import protocol as p
from .auth import AuthError, ScramServer, _default_nonce, check_md5_response
from .errors import render_error
from .session_state import split_options

MAX_STARTUP_PACKET = 10000
_unpack_uint32 = p.UINT32.unpack_from
_SSL_REQUEST = p.ssl_request()
_DECLINE_ENCRYPTION = SendToClient(b"N")
_FINAL_HANDSHAKE_EVENTS = frozenset((StartClientTLS, Authenticated, CloseClient, AuthFailed, CancelRequested,
                                    LookupUser))


class Phase(enum.Enum):
    """Which client message the handshake expects next."""

    STARTUP = "startup"             # StartupMessage, or SSLRequest / GSSENCRequest / CancelRequest before it
    MD5 = "md5"                     # PasswordMessage answering AuthenticationMD5Password
    TOKEN = "token"                 # PasswordMessage carrying a token, answering AuthenticationCleartextPassword
    SASL_INITIAL = "sasl_initial"   # SASLInitialResponse: the mechanism and SCRAM's client-first-message
    SASL_FINAL = "sasl_final"       # SASLResponse: SCRAM's client-final-message
    DONE = "done"                   # Authenticated was emitted: every further byte is the relay's

# The members as module globals: Phase.X goes through EnumType's attribute lookup (some 65 ns on Python 3.11),
# once or twice per handshake step.
STARTUP, MD5, TOKEN = Phase.STARTUP, Phase.MD5, Phase.TOKEN
SASL_INITIAL, SASL_FINAL, DONE = Phase.SASL_INITIAL, Phase.SASL_FINAL, Phase.DONE


def data_after_login() -> ProtocolError:
    """What handshake bytes after the login raise: the relay takes every byte from then on."""
    return ProtocolError("data before the login completed", render_error(
        ErrorKind.PROTOCOL_VIOLATION, "the client sent data before authentication finished"))


class PostgresHandshake:
    """The login of one client connection. `receive(data)` returns handshake events until one ends it."""

    phase = STARTUP
    tls_active = False
    user = ""
    database = ""
    startup_body = b""              # the StartupMessage's parameter bytes, the key of the greeting cache
    verifier = None                 # the md5 verifier, the token verifier or the ScramServer of the phase
    md5_salt = b""
    startup_params: dict[str, str]  # the StartupMessage's parameters, set once it is read
    looked_up = False               # LookupUser was emitted (auth_query): `found` is its answer
    found = None                    # the looked-up UserRecord, or None
    scram_nonce = ""                # replay: the compiled relay's part of the SCRAM nonce, which the exchange goes on with

    def __init__(self, ctx: ClientContext, mock_secret: bytes):
        self.ctx = ctx
        self.mock_secret = mock_secret
        self.hbuf = bytearray()

    def receive(self, data: bytes) -> list:
        if data == _SSL_REQUEST and not self.hbuf and not self.ctx.tls_available and self.phase is STARTUP:
            return [_DECLINE_ENCRYPTION]    # libpq's sslmode=prefer asks first, on a listener without TLS
        hbuf = self.hbuf
        hbuf += data
        events: list = []
        # Each step consumes one message and adds its events; stop when more bytes are needed or the last
        # event ends the handshake (or hands the socket to TLS).
        while hbuf:
            phase = self.phase
            if phase is STARTUP:
                if not self._startup_step(events):
                    break
            elif phase is DONE:
                raise data_after_login()
            elif not self._auth_step(phase, events):     # MD5, TOKEN, SASL_INITIAL or SASL_FINAL
                break
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
        if record is None and ctx.auth_query and method in ("md5", "scram-sha-256"):
            if not self.looked_up:
                # Not in the users file: the core looks the user up in the database, then calls user_found.
                self.looked_up = True
                events.append(LookupUser(user, self.database))
                return True
            record = self.found
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
            self.verifier = ctx.listener.token_verifier
            events.append(SendToClient(p.authentication(p.AUTH_CLEARTEXT)))
            self.phase = TOKEN
            return True
        verifiers = record.verifiers if record else {}
        if method == "md5" and "md5" in verifiers:
            self.md5_salt = os.urandom(4)
            self.verifier = verifiers["md5"]
            events.append(SendToClient(p.authentication(p.AUTH_MD5, self.md5_salt)))
            self.phase = MD5
        elif method == "md5" and record is None:
            # Unknown user: ask like for any other user, fail at the end.
            self.md5_salt = os.urandom(4)
            self.verifier = None
            events.append(SendToClient(p.authentication(p.AUTH_MD5, self.md5_salt)))
            self.phase = MD5
        else:
            verifier = verifiers.get("scram_sha_256")
            nonce = self.scram_nonce
            nonce_factory = (lambda: nonce) if nonce else _default_nonce
            if verifier:
                server = ScramServer(verifier, nonce_factory)
            else:
                server = ScramServer.for_unknown_user(user, self.mock_secret, nonce_factory)
            self.verifier = server
            events.append(SendToClient(p.authentication(p.AUTH_SASL, b"SCRAM-SHA-256\x00\x00")))
            self.phase = SASL_INITIAL
        return True

    def replay(self, data: bytes, nonce: bytes) -> list:
        """Bytes the compiled relay answered already (relay logins with SCRAM: the startup packet, and the
        SASLInitialResponse it answered with `nonce` as its part of the nonce): the handshake then stands where the
        relay stood, and the events other than what the relay sent are returned. A login that cannot go on as it
        began (a reload changed the listener's method or removed the user meanwhile) ends with an error saying so."""
        self.scram_nonce = nonce.decode("ascii")
        events = [event for event in self.receive(data) if type(event) is not SendToClient]
        if events and type(events[-1]) in (AuthFailed, CloseClient):
            return events
        if events or self.phase not in (SASL_INITIAL, SASL_FINAL):
            self.phase = DONE
            message = "the proxy's authentication settings changed during this login; connect again"
            return [CloseClient(render_error(ErrorKind.AUTH_FAILED, message, fatal=True), message)]
        return events

    def user_found(self, record) -> list:
        """The answer to LookupUser: the looked-up record (None: unknown) and the events the login goes on with."""
        if not self.looked_up or self.phase is not STARTUP:
            raise ProtocolError("user_found without a lookup", render_error(
                ErrorKind.PROTOCOL_VIOLATION, "unexpected user lookup", True))
        self.found = record
        events: list = []
        self._begin_auth(self.startup_params, events)
        if self.hbuf and not (events and type(events[-1]) in _FINAL_HANDSHAKE_EVENTS):
            events.extend(self.receive(b""))     # bytes the client sent while the lookup ran
        return events

    def _auth_step(self, phase: Phase, events: list) -> bool:
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
        state = self.verifier
        failure = f'password authentication failed for user "{self.user}"'
        if phase is MD5:
            response = body.rstrip(b"\x00")
            if state is None or not check_md5_response(state, self.md5_salt, response):
                events.append(AuthFailed(self.user, render_error(ErrorKind.AUTH_FAILED, failure, True), "wrong md5 password"))
                return True
            return self._authenticated(events)
        if phase is TOKEN:
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
            if phase is SASL_INITIAL:
                self.phase = SASL_FINAL
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
        self.phase = DONE
        self.verifier = None
        leftover = bytes(self.hbuf)          # requests pipelined right after the password
        self.hbuf.clear()
        events.append(Authenticated(self.user, self.database, self.startup_params, leftover))
        return True
