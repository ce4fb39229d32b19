"""The EchoDB wire format: newline-terminated UTF-8 lines, shared by the engine and the example server.

Client to server (one request per line):
    AUTH user password [database]    first line of a session; answered `OK session_id secret`
    CANCEL session_id secret         first line of a separate connection; interrupts that session's SLEEP
    QUERY text                       answered `ROW text`
    BEGIN / COMMIT / ROLLBACK        a transaction
    SLEEP seconds                    waits (cancellable)
    SET name value / GET name / RESET   session variables (they tie a client to its backend)
    SESSION                          answered `ROW session_id` (which backend connection serves you)
    QUIT                             ends the session

Server to client: every request is answered by zero or more `ROW ...` and `ERROR ...` lines and ends
with exactly one status line, `DONE` outside a transaction or `DONE TX` inside one. That status line is
the only thing a proxy needs to find transaction boundaries, as ReadyForQuery is for PostgreSQL.
"""
from __future__ import annotations

MAX_LINE = 4096          # longest line either side may send, newline included
DONE_IDLE = b"DONE\n"
DONE_TX = b"DONE TX\n"


class LineTooLong(ValueError):
    """A peer sent more than MAX_LINE bytes without a newline."""


def take_lines(buf: bytearray) -> list[bytes]:
    """Remove every complete line from `buf` and return them, newline included; a partial line stays."""
    end = buf.rfind(b"\n")
    if end < 0:
        if len(buf) > MAX_LINE:
            raise LineTooLong(f"a line longer than {MAX_LINE} bytes")
        return []
    lines = bytes(buf[:end + 1]).splitlines(keepends=True)
    del buf[:end + 1]
    if len(buf) > MAX_LINE or any(len(line) > MAX_LINE for line in lines):
        raise LineTooLong(f"a line longer than {MAX_LINE} bytes")
    return lines


def words(line: bytes, limit: int = -1) -> list[str]:
    """The space-separated words of a line (UTF-8); raises UnicodeDecodeError on bytes that are not UTF-8."""
    return line.decode("utf-8").rstrip("\r\n").split(" ", limit) if line.strip() else []


def error_line(message: str) -> bytes:
    """An ERROR line; newlines in the message are flattened so it stays one line."""
    return ("ERROR " + " ".join(message.split()) + "\n").encode("utf-8")
