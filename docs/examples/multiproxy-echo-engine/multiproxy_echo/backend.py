"""Sans-IO conversations with an EchoDB server: the login that opens a pooled connection, and a cancel.

The core opens the socket and drives a BackendScript: it sends what `start()` returns, then hands each
chunk the server sends to `feed()` and sends what that returns, until `done`. The script never touches
the socket itself, so it can be tested by feeding it bytes.
"""
from __future__ import annotations

from dataclasses import dataclass

from multiproxy.engine import BackendError, BackendScript, BackendTarget

from .protocol import LineTooLong, take_lines, words


@dataclass
class EchoServerState:
    """What the proxy knows about one backend connection. The core keeps it with the connection and hands
    it back to the engine (login_complete, link, reset_bytes, cancel_script)."""

    session_id: int
    secret: int


class EchoLogin(BackendScript):
    """`AUTH user password database`, then wait for `OK session_id secret` or `ERROR ...`."""

    def __init__(self, target: BackendTarget):
        self.target = target
        self.buf = bytearray()
        self.done = False
        self.result = None

    def start(self) -> bytes:
        # Without configured credentials the password is None; EchoDB servers that check passwords then
        # refuse the login, which the core reports as a credentials problem.
        password = self.target.password or "-"
        return f"AUTH {self.target.user} {password} {self.target.database}\n".encode("utf-8")

    def feed(self, data: bytes) -> bytes:
        self.buf += data
        try:
            lines = take_lines(self.buf)
        except LineTooLong as exc:
            raise BackendError(f"EchoDB server sent {exc} during login") from None
        if not lines:
            return b""                       # half a line so far: wait for more
        first = lines[0]
        try:
            parts = words(first)
        except UnicodeDecodeError:
            raise BackendError("EchoDB server sent bytes that are not UTF-8 during login") from None
        if parts[:1] == ["ERROR"]:
            text = first.decode("utf-8").rstrip("\n")[6:]
            # fatal_auth tells the core the credentials are wrong (it stops hammering the server with them).
            raise BackendError(f"EchoDB server refused the login of {self.target.user!r}: {text}",
                               fatal_auth="password" in text or "user" in text)
        if len(parts) != 3 or parts[0] != "OK" or not parts[1].isdigit() or not parts[2].isdigit():
            raise BackendError(f"EchoDB server answered the login with {first!r}")
        self.result = EchoServerState(int(parts[1]), int(parts[2]))
        # Anything after the OK line belongs to the connection's next user, not to the login.
        self.leftover = b"".join(lines[1:]) + bytes(self.buf)
        self.done = True
        return b""


class EchoCancel(BackendScript):
    """`CANCEL session_id secret` on a fresh connection. The server answers nothing, so the script is done
    as soon as the line is out; the core then closes the socket."""

    def __init__(self, state: EchoServerState):
        self.state = state
        self.done = False

    def start(self) -> bytes:
        self.done = True
        return f"CANCEL {self.state.session_id} {self.state.secret}\n".encode()

    def feed(self, data: bytes) -> bytes:
        return b""
