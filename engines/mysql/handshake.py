"""The login of one MySQL client, sans-IO: the greeting, the SSL request, authentication (mysql_native_password,
caching_sha2_password fast and full, mysql_clear_password tokens), AuthSwitchRequest.

`ClientHandshake` is a state machine over `LoginPhase`. `MySQLClient` owns one, hands it the bytes of the
handshake and, on `Authenticated`, takes over what the relay needs (user, schema, capabilities, sequence id of
the login's OK, bytes that followed the last handshake packet). Nothing here runs once the client is logged in.
"""
from __future__ import annotations

import enum
import os
import struct

from multiproxy.engine import (
    AuthFailed, Authenticated, ClientContext, CloseClient, ErrorKind, LookupUser, ProtocolError, SendToClient,
    StartClientTLS,
)
from multiproxy.token_auth import TokenRejected

from . import protocol as p
from .auth import (
    CACHING_SHA2, CLEAR, NATIVE, AuthError, native_check, parse_caching_sha2_verifier, parse_native_verifier,
    rsa_decrypt_password, rsa_public_pem, sha2_check, sha2_check_cleartext,
)
from .errors import render_error

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


def _nonce() -> bytes:
    # 20 bytes without NUL (clients read the second part as a NUL-terminated string)
    return bytes(1 + b % 127 for b in os.urandom(20))


class LoginPhase(enum.Enum):
    """Where a client's login stands: which packet the proxy waits for next."""
    RESPONSE = enum.auto()      # the HandshakeResponse41, or an SSL request (then the response again, inside TLS)
    SWITCH = enum.auto()        # the AuthSwitchResponse: the answer in the plugin the proxy switched to
    FULL_AUTH = enum.auto()     # caching_sha2_password full authentication: the password, or a public key request
    DONE = enum.auto()          # authenticated (Authenticated was emitted); further bytes are the relay's


class ClientHandshake:
    """The server side of the MySQL handshake for one client connection, up to Authenticated."""

    def __init__(self, ctx: ClientContext, engine):
        self.ctx = ctx
        self.engine = engine
        self.options = ctx.engine_options or {}
        self.thread_id = ctx.cancel_key if isinstance(ctx.cancel_key, int) else 0
        self.nonce = _nonce()
        self.tls_active = False
        self.buf = bytearray()
        self.phase = LoginPhase.RESPONSE
        self.seq = 0                    # sequence id of the last handshake packet received
        self.auth_plugin = b""
        self.verifier = None
        self.no_verifier = ""       # why there is no verifier, for the log (set with the user's record)
        # from the HandshakeResponse41
        self.user = ""
        self.database = ""
        self.capabilities = 0
        self.charset = 45
        self.deprecate_eof = False
        self.multi_statements = False
        # set when authenticated
        self.ok_seq = 2                 # sequence id of the login's OK packet
        self.greeting_prefix = b""      # what precedes that OK (the caching_sha2 fast-auth notice)
        self.leftover = b""             # client bytes that arrived behind the last handshake packet
        self.lookup = None              # auth_query: the HandshakeResponse41 waiting for the LookupUser answer

    def greeting(self) -> bytes:
        """Handshake v10, the server's first packet."""
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
        return CloseClient(render_error(kind, message, self.seq + 1), message)

    def _reply(self, payload: bytes) -> bytes:
        """A handshake packet to the client; the client's next packet follows its sequence id."""
        self.seq = (self.seq + 1) & 0xFF
        return p.packet(self.seq, payload)

    def _packet(self) -> tuple[int, bytes] | None:
        buf = self.buf
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
        if seq != (self.seq + 1) & 0xFF:
            raise ProtocolError("packets out of order", render_error(
                ErrorKind.PROTOCOL_VIOLATION, f"got packet sequence id {seq}, expected {self.seq + 1} (packets out of order)",
                seq + 1))
        self.seq = seq
        return seq, payload

    def read_size(self) -> int:
        """Before TLS, read the first packet exactly: a client sends its ClientHello right behind the SSL
        request without waiting, and those bytes belong to the TLS layer."""
        if self.phase is not LoginPhase.RESPONSE or self.tls_active or not self.ctx.tls_available:
            return 16384
        have = len(self.buf)
        if have < 4:
            return 4 - have
        length = int.from_bytes(self.buf[:3], "little")
        return max(1, min(16384, 4 + length - have))

    def receive(self, data: bytes) -> list:
        """Handshake bytes from the client: the events they lead to (the last one may end the handshake)."""
        self.buf += data
        events: list = []
        while True:
            if self.phase is LoginPhase.DONE:
                break
            packet = self._packet()
            if packet is None:
                break
            _, payload = packet
            try:
                event = self._handshake_packet(payload)
            except (ValueError, IndexError, struct.error) as exc:
                raise ProtocolError(f"malformed handshake: {exc}", render_error(
                    ErrorKind.PROTOCOL_VIOLATION, f"malformed handshake response: {exc}", self.seq + 1)) from None
            if event is not None:
                events.append(event)
            if events and isinstance(events[-1], (StartClientTLS, Authenticated, CloseClient, AuthFailed, LookupUser)):
                break
        return events

    def error(self, kind: ErrorKind, message: str) -> bytes:
        """An ERR packet answering the client's last handshake packet (before Authenticated)."""
        return render_error(kind, message, self.seq + 1)

    def _handshake_packet(self, payload: bytes):
        phase = self.phase
        if phase is LoginPhase.RESPONSE:
            return self._handshake_response(payload)
        if phase is LoginPhase.SWITCH:
            return self._check(self.auth_plugin, payload)
        if phase is LoginPhase.FULL_AUTH:
            return self._full_auth(payload)
        raise ValueError("unexpected packet")

    def _handshake_response(self, payload: bytes):
        info = p.parse_handshake_response(payload)
        caps = info["capabilities"]
        if info["ssl_request"]:
            if not self.ctx.tls_available or self.tls_active:
                raise ValueError("SSL request, but TLS is not offered")
            if self.buf:
                raise ProtocolError("data after SSL request", render_error(
                    ErrorKind.PROTOCOL_VIOLATION, "received unencrypted data after the SSL request", self.seq + 1))
            self.tls_active = True
            return StartClientTLS(b"")
        self.capabilities = caps & (SERVER_CAPABILITIES | p.CLIENT_SSL)
        self.deprecate_eof = bool(caps & p.CLIENT_DEPRECATE_EOF)
        self.multi_statements = bool(caps & p.CLIENT_MULTI_STATEMENTS)
        self.charset = info["charset"] or 45
        self.user = info["user"].decode("utf-8", "replace")
        self.database = info["database"].decode("utf-8", "replace") if caps & p.CLIENT_CONNECT_WITH_DB else ""
        if caps & p.CLIENT_COMPRESS and not SERVER_CAPABILITIES & p.CLIENT_COMPRESS:
            pass    # not offered, so not negotiated: the stream stays uncompressed
        ctx = self.ctx
        if ctx.listener.require_tls and not self.tls_active:
            return self._fatal(ErrorKind.TLS_REQUIRED,
                               f"listener {ctx.listener.name!r} requires TLS: connect with --ssl (ssl-mode=REQUIRED)")
        if not self.user:
            return self._fatal(ErrorKind.AUTH_FAILED, "no user name in the handshake response")
        record = ctx.users.get(self.user) if ctx.users is not None else None
        if record is None and ctx.auth_query and self._method() == "mysql_native_password":
            # Not in the users file: the core looks the user up in the database, then calls user_found.
            self.lookup = info
            return LookupUser(self.user, self.database)
        return self._authenticate(record, info)

    def user_found(self, record) -> list:
        """The answer to LookupUser: the looked-up record (None: unknown) and the events the login goes on with."""
        info, self.lookup = self.lookup, None
        if info is None:
            raise ProtocolError("user_found without a lookup", self.error(
                ErrorKind.PROTOCOL_VIOLATION, "unexpected user lookup"))
        event = self._authenticate(record, info)
        events = [event] if event is not None else []
        if self.buf and not (events and isinstance(events[-1], (StartClientTLS, Authenticated, CloseClient,
                                                                AuthFailed))):
            events.extend(self.receive(b""))     # bytes the client sent while the lookup ran
        return events

    def _authenticate(self, record, info: dict):
        """The rest of the HandshakeResponse41, once the user's record is known (None: unknown user)."""
        ctx = self.ctx
        caps = info["capabilities"]
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
        if self.verifier is None:   # the log's reason (the client hears the same as for a wrong password)
            self.no_verifier = (
                "no such user" if record is None else
                f"the user has no {method} verifier in the users file (`multiproxy users add {self.user} --kind "
                f"{method}` stores one)" if text is None else
                f"the user's {method} verifier in the users file is malformed")
        self.auth_plugin = wanted
        if plugin != wanted:
            self.nonce = _nonce()
            self.phase = LoginPhase.SWITCH
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
        self.phase = LoginPhase.SWITCH
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
            data = p.packet(self.seq + 1, p.err_payload(p.ER_ACCESS_DENIED_ERROR, "28000", message))
            return AuthFailed(self.user, data, f"token rejected: {exc}", "token_rejected")
        return self._authenticated()

    def _denied(self, reason: str):
        message = (f"Access denied for user '{self.user}'@'{self.ctx.client_address[0]}' "
                   f"(using password: {'YES' if self.verifier is not None or reason else 'NO'})")
        data = p.packet(self.seq + 1, p.err_payload(p.ER_ACCESS_DENIED_ERROR, "28000", message))
        return AuthFailed(self.user, data, reason)

    def _check(self, plugin: bytes, response: bytes):
        if plugin == CLEAR:
            return self._check_token(response)
        if plugin == NATIVE:
            if self.verifier is not None and native_check(self.verifier, self.nonce, response):
                return self._authenticated()
            return self._denied(self.no_verifier or "wrong mysql_native_password response")
        fast = str(self.options.get("caching_sha2_fast_auth", "true")).lower() not in ("false", "0", "no", "off")
        if fast and self.verifier is not None and sha2_check(self.verifier, self.nonce, response):
            self.phase = LoginPhase.DONE
            event = self._authenticated(more=p.packet(self.seq + 1, bytes((p.AUTH_MORE_DATA,
                                                                           p.CACHING_SHA2_FAST_AUTH_SUCCESS))))
            return event
        if not response and not fast:
            pass
        self.phase = LoginPhase.FULL_AUTH
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
        return self._denied(self.no_verifier or "wrong caching_sha2_password (full authentication)")

    def _authenticated(self, more: bytes = b""):
        self.phase = LoginPhase.DONE
        self.ok_seq = self.seq + 1 + (1 if more else 0)
        self.greeting_prefix = more
        self.leftover = bytes(self.buf)
        self.buf.clear()
        params = {"capabilities": self.capabilities & VARIANT_CAPABILITIES, "charset": self.charset}
        return Authenticated(self.user, self.database, params)
