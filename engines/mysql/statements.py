"""Binary prepared statements (COM_STMT_*). Statement ids belong to one backend connection, so COM_STMT_PREPARE
pins the session to its backend; a statement id the client kept from a backend it no longer holds gets ERR 1243
(COM_STMT_CLOSE and COM_STMT_SEND_LONG_DATA, which have no answer, are dropped). Statements a backend still
holds for a client that left it (`server_state.stale_statements`) are closed before its next command. A backend
reset (COM_RESET_CONNECTION, also in front of each link with reset_after_transaction) drops its statements: the
session state clears `server_state.prepared` and `types` then.
"""
from __future__ import annotations

from multiproxy.engine import PinReason

from . import protocol as p
from .relay import RESPONSE_KIND, Pending

_PREPARE_PIN = [("pin", PinReason.PREPARED_STATEMENT, "COM_STMT_PREPARE", None)]
_NO_ANSWER = frozenset((p.COM_STMT_CLOSE, p.COM_STMT_SEND_LONG_DATA))
STATEMENT_COMMANDS = frozenset((p.COM_STMT_PREPARE, p.COM_STMT_EXECUTE, p.COM_STMT_SEND_LONG_DATA,
                                p.COM_STMT_CLOSE, p.COM_STMT_RESET, p.COM_STMT_FETCH))


class Statements:
    """Mixin of MySQLClient: COM_STMT_* commands and closing a backend's stale statements."""

    def _statement(self, command: int, local: list, can_answer: bool) -> bytes | None:
        """Binary prepared statements: ids are per backend connection, so the session pins to its backend."""
        if command == p.COM_STMT_PREPARE:
            self._pins_sent(_PREPARE_PIN)
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
            self.fifo.append(Pending(RESPONSE_KIND[command]))
        return None

    def _close_stale(self, server_state) -> bytes:
        out = b"".join(p.packet(0, bytes((p.COM_STMT_CLOSE,)) + p.UINT32.pack(sid)) for sid in server_state.stale_statements)
        server_state.stale_statements.clear()
        return out
