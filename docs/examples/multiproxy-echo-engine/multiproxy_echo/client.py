"""One EchoDB client connection seen by the proxy, sans-IO: the AUTH handshake, then transaction-aware relaying.

The core calls these methods with the bytes it read and sends what they return; this object never sees a
socket. Its job is to know, at every moment, how many requests wait for an answer and whether the linked
backend is inside a transaction, so the core can give the backend back to the pool at the right time.
"""
from __future__ import annotations

import hashlib
import hmac

from multiproxy.auth import md5_verifier, parse_scram_verifier, scram_keys, scram_salted_password
from multiproxy.engine import (
    AuthFailed, Authenticated, CancelRequested, ClientContext, ClientProtocol, ClientQuit, CloseClient, ErrorKind,
    PinReason, ProtocolError,
)

from .protocol import DONE_IDLE, DONE_TX, LineTooLong, error_line, take_lines, words

DEFAULT_DATABASE = "echo"


def render_error(kind: ErrorKind, message: str) -> bytes:
    """An error as EchoDB says it: one ERROR line naming the situation."""
    return error_line(f"{kind.value}: {message}")


def password_matches(record, user: str, password: str) -> bool:
    """Check a clear-text password against the verifiers `multiproxy users add` stored for the user.

    EchoDB sends the password itself, so any verifier kind the proxy can recompute from a password works.
    """
    for kind, verifier in record.verifiers.items():
        try:
            if kind == "scram_sha_256":
                stored = parse_scram_verifier(verifier)
                _, stored_key, _ = scram_keys(scram_salted_password(password, stored.salt, stored.iterations))
                if hmac.compare_digest(stored_key, stored.stored_key):
                    return True
            elif kind == "md5":
                if hmac.compare_digest(md5_verifier(user, password), verifier):
                    return True
        except ValueError:
            continue          # a malformed verifier matches nothing
    return False


class EchoClient(ClientProtocol):
    """Protocol state of one client: handshake first, then the relay between it and its current backend."""

    def __init__(self, ctx: ClientContext):
        self.ctx = ctx
        self.hbuf = bytearray()          # handshake bytes not yet parsed
        self.cbuf = bytearray()          # client bytes after login: a partial request line
        self.sbuf = bytearray()          # backend bytes: a partial answer line
        self.outstanding = 0             # requests forwarded (or waiting to be) and not yet answered by DONE
        self.internal = 0                # of those, requests the proxy made itself (reset): answers not forwarded
        self.in_transaction = False      # the last status line said DONE TX
        self.mid_line = False            # part of a backend line was already forwarded
        self.linked = False
        # Attributes the core reads.
        self.pinned = False
        self.requests = 0
        self.leftover = b""

    # ------------------------------------------------------------------ handshake

    def receive_handshake(self, data: bytes) -> list:
        """Parse the first line: `AUTH user password [database]` or `CANCEL session_id secret`."""
        self.hbuf += data
        try:
            lines = take_lines(self.hbuf)
        except LineTooLong as exc:
            raise ProtocolError(str(exc), self.error(ErrorKind.PROTOCOL_VIOLATION, str(exc))) from None
        if not lines:
            return []                    # wait for the rest of the line
        first = lines[0]
        # Requests pipelined behind the AUTH line: the core feeds them to client_data after login_complete.
        self.leftover = b"".join(lines[1:]) + bytes(self.hbuf)
        self.hbuf.clear()
        try:
            parts = words(first)
        except UnicodeDecodeError:
            raise ProtocolError("handshake is not UTF-8", self.error(
                ErrorKind.PROTOCOL_VIOLATION, "the first line must be AUTH or CANCEL in UTF-8")) from None
        if len(parts) == 3 and parts[0] == "CANCEL" and parts[1].isdigit() and parts[2].isdigit():
            return [CancelRequested((int(parts[1]), int(parts[2])))]
        if parts[:1] != ["AUTH"] or len(parts) not in (3, 4) or not all(parts[1:]):
            raise ProtocolError(f"bad first line {first[:80]!r}", self.error(
                ErrorKind.PROTOCOL_VIOLATION, "the first line must be AUTH user password [database]"))
        user, password = parts[1], parts[2]
        database = parts[3] if len(parts) == 4 else DEFAULT_DATABASE
        return [self._authenticate(user, password, database)]

    def _authenticate(self, user: str, password: str, database: str):
        listener = self.ctx.listener
        record = self.ctx.users.get(user) if self.ctx.users is not None else None
        if record is not None and not record.may_use(listener.name):
            return AuthFailed(user, self.error(ErrorKind.AUTH_FAILED, f"user {user!r} may not use this listener"),
                              "listener not allowed for user")
        if listener.auth != "trust":
            # Same answer for an unknown user and a wrong password: no user enumeration.
            if record is None or not password_matches(record, user, password):
                return AuthFailed(user, self.error(ErrorKind.AUTH_FAILED, f"password authentication failed for {user!r}"),
                                  "unknown user" if record is None else "wrong password")
        return Authenticated(user, database, {}, self.leftover)

    def login_complete(self, server_state) -> bytes:
        """The client's `OK`: the proxy-issued cancel key, never the backend's (backends are shared)."""
        session_id, secret = self.ctx.cancel_key
        return f"OK {session_id} {secret}\n".encode()

    # ------------------------------------------------------------------ relay: client to backend

    def client_data(self, data: bytes) -> tuple[bytes, bytes]:
        """Count the complete request lines and forward them; QUIT stays here (the backend is shared)."""
        self.cbuf += data
        try:
            lines = take_lines(self.cbuf)
        except LineTooLong as exc:
            raise ProtocolError(str(exc), self.error(ErrorKind.MESSAGE_TOO_LARGE, str(exc))) from None
        forward = []
        for line in lines:
            command = line.split(b" ", 1)[0].strip().upper()
            if command == b"QUIT":
                # The session ends here; what came before QUIT still goes to the backend.
                raise ClientQuit(b"".join(forward), b"")
            if command == b"SET":
                # Session state lives on the backend connection: tell the policy, which decides to pin.
                if self.ctx.pin_policy.detected(self, PinReason.SESSION_VARIABLE, line.decode("utf-8", "replace").strip()):
                    self.pinned = True
            forward.append(line)
            self.outstanding += 1
            self.requests += 1
        # Unknown commands are forwarded too: the server answers them with ERROR + DONE. Answering here
        # would break the rule that only the backend side writes to the client while linked.
        return b"".join(forward), b""

    def link(self, server_state, to_backend: bytes) -> bytes:
        """A backend was just borrowed for `to_backend`. EchoDB has no session state to replay (SET pins)."""
        self.linked = True
        return to_backend

    def unlink(self) -> None:
        self.linked = False
        self.sbuf.clear()
        self.mid_line = False

    # ------------------------------------------------------------------ relay: backend to client

    def backend_data(self, data: bytes) -> tuple[bytes, bool]:
        """Forward the answer lines; every status line answers one request and says the transaction state.

        Returns (bytes for the client, release_ok). release_ok is True only at a boundary: nothing
        outstanding, outside a transaction and no half line held back. Rows can be long, so only a line
        start short enough to still become a status line is held back; everything else flows through.
        """
        buf = bytes(self.sbuf) + data if self.sbuf else data
        self.sbuf.clear()
        out = []
        pos = 0
        while True:
            end = buf.find(b"\n", pos)
            if end < 0:
                break
            line = buf[pos:end + 1]
            internal = self.internal > 0
            if not self.mid_line and (line == DONE_IDLE or line == DONE_TX):
                self.in_transaction = line == DONE_TX
                self.outstanding = max(0, self.outstanding - 1)
                if internal:
                    self.internal -= 1
            self.mid_line = False
            if not internal:
                out.append(line)
            pos = end + 1
        rest = buf[pos:]
        if rest:
            if self.mid_line or len(rest) >= len(DONE_TX):
                self.mid_line = True          # the line is longer than any status line: a row, pass it on
                if not self.internal:
                    out.append(rest)
            else:
                self.sbuf += rest
        release = not self.outstanding and not self.in_transaction and not self.sbuf and not self.mid_line
        return b"".join(out), release

    # ------------------------------------------------------------------ the end of a session and failures

    def is_clean(self) -> bool:
        """The client left: could its backend serve someone else as it is?"""
        return not self.outstanding and not self.in_transaction and not self.sbuf and not self.mid_line

    def reset_bytes(self, server_state, reset_query: str = "") -> bytes:
        """A pinned session ended: drop its variables. The answer (DONE) is the proxy's, not forwarded."""
        self.outstanding += 1
        self.internal += 1
        line = (reset_query or "RESET").strip()
        return line.encode("utf-8") + b"\n"

    def fail_pending(self, kind: ErrorKind, message: str) -> bytes:
        """No backend for the requests just read: answer each with ERROR + DONE, as the server would."""
        answers = (render_error(kind, message) + DONE_IDLE) * (self.outstanding - self.internal)
        self.outstanding = self.internal = 0
        return answers

    def backend_lost(self, message: str) -> tuple[bytes, bool]:
        """The backend died while linked. A transaction or pinned session died with it: close the client.
        Otherwise answer the waiting requests with an error and keep the client; the next request gets a
        new backend."""
        close = self.in_transaction or self.pinned or bool(self.sbuf) or self.mid_line
        waiting = self.outstanding - self.internal
        self.outstanding = self.internal = 0
        self.in_transaction = False
        self.unlink()
        if close:
            return render_error(ErrorKind.BACKEND_LOST, message + "; the transaction or session state was lost"), True
        return (render_error(ErrorKind.BACKEND_LOST, message) + DONE_IDLE) * waiting, False

    def error(self, kind: ErrorKind, message: str) -> bytes:
        return render_error(kind, message)
