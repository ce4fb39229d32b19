"""What each client command means to the proxy: forwarded with the answer it expects (a `Pending` in the FIFO),
answered locally when no backend is linked (COM_PING, COM_SET_OPTION, KILL, `SELECT LAST_INSERT_ID()`,
COM_RESET_CONNECTION, unknown statement ids, a lone BEGIN / START TRANSACTION, whose sending waits for the next
request, and a COMMIT / ROLLBACK with nothing to end), rewritten (KILL while linked; a SET to an expression gets
an internal read-back behind it), dropped (COM_QUIT) or refused (commands the proxy cannot relay).
`client_data` (relay.py) calls `_command` once per command packet.
"""
from __future__ import annotations

import re

from multiproxy.engine import ErrorKind, PinReason, ProtocolError

from . import protocol as p
from .errors import render_error
from .pinning import NAMES, classify, might_matter, undone_by
from .relay import PLAIN_QUERY, R_GENERIC, R_SINGLE, RESPONSE_KIND, Pending
from .session_state import COLLATIONS
from .statements import STATEMENT_COMMANDS

# Transaction control the proxy can answer while no backend is linked: BEGIN [WORK] and START TRANSACTION [READ
# ONLY | READ WRITE] (begun on a backend with the next request), COMMIT [WORK] / ROLLBACK [WORK] (nothing begun
# yet, or nothing open). START TRANSACTION WITH CONSISTENT SNAPSHOT is not deferred: its snapshot is taken when
# it runs.
_BEGIN = re.compile(rb"\s*(?:begin(?:\s+work)?|start\s+transaction(?:\s+read\s+(?:only|write))?)\s*;?\s*", re.I)
_END = re.compile(rb"\s*(?:commit|rollback)(?:\s+work)?\s*;?\s*", re.I)

# Settings drivers send right after logging in, which the proxy takes without a backend when their effect is known
# and cannot fail (PyMySQL sends both inside connect(), with a short read timeout): SET autocommit = 0|1, and SET
# NAMES of a character set (and collation) every MySQL and MariaDB server has.
_AUTOCOMMIT = re.compile(rb"\s*set\s+(?:session\s+|local\s+|@@(?:session\.|local\.)?)?autocommit\s*=\s*"
                         rb"(0|1|on|off|true|false)\s*;?\s*", re.I)
_SET_NAMES = re.compile(rb"\s*set\s+names\s+'?([a-z0-9_]+)'?(?:\s+collate\s+'?([a-z0-9_]+)'?)?\s*;?\s*", re.I)
_EVERYWHERE_CHARSETS = frozenset(charset for charset, _ in COLLATIONS.values())
_EVERYWHERE_COLLATIONS = frozenset(collation for _, collation in COLLATIONS.values() if collation)

_UNSUPPORTED = frozenset((p.COM_SLEEP, p.COM_CONNECT, p.COM_TIME, p.COM_DELAYED_INSERT, p.COM_BINLOG_DUMP,
                          p.COM_TABLE_DUMP, p.COM_CONNECT_OUT, p.COM_REGISTER_SLAVE, p.COM_DAEMON,
                          p.COM_BINLOG_DUMP_GTID, p.COM_SHUTDOWN))


class Commands:
    """Mixin of MySQLClient: per-command handling and the packets the proxy answers with itself."""

    def _ok(self, seq: int = 1) -> bytes:
        return p.packet(seq, p.ok_payload(self.status, 0, 0))

    def _eof(self, seq: int = 1) -> bytes:
        if self.deprecate_eof:
            return p.packet(seq, p.ok_payload(self.status, header_byte=p.EOF_HEADER))
        return p.packet(seq, p.eof_payload(self.status))

    def _err(self, code: int, sqlstate: str, message: str, seq: int = 1) -> bytes:
        return p.packet(seq, p.err_payload(code, sqlstate, message))

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
            if can_answer and length < 100 and (self._transaction_control(sql, local)
                                                or self._setting_locally(sql, local)):
                return b""
            if might_matter(sql):
                return self._query(sql, local, can_answer, data[pos:end] if length < p.MAX_PAYLOAD else None)
            self.fifo.append(PLAIN_QUERY)
            return None
        if command == p.COM_QUIT:
            self.closing = True
            return b""
        if command == p.COM_PING:
            if can_answer:
                local.append(self._ok())
                self._answered_locally = True
                return b""
            self.fifo.append(Pending(R_SINGLE))
            return None
        if command == p.COM_INIT_DB:
            name = data[pos + 5:end].decode("utf-8", "replace")
            self.fifo.append(Pending(R_SINGLE, action=lambda ok, name=name: self._schema_changed(ok, name)))
            return None
        if command in STATEMENT_COMMANDS:
            return self._statement(command, data, pos, end, length, local, can_answer)
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
                self.fifo.append(Pending(R_SINGLE))
                return None
            wanted = option == p.MYSQL_OPTION_MULTI_STATEMENTS_ON
            self.multi_statements = wanted
            if can_answer:
                local.append(self._eof())
                self._answered_locally = True
                return b""
            self.fifo.append(Pending(R_SINGLE, action=lambda ok, w=wanted: self._set_server(ok, "multi_statements", w)))
            return None
        if command == p.COM_RESET_CONNECTION:
            if can_answer:
                self._client_reset()
                local.append(self._ok())
                self._answered_locally = True
                return b""
            self.fifo.append(Pending(R_SINGLE, action=self._reset_done))
            return None
        if command == p.COM_CHANGE_USER:
            return self._change_user(data[pos + 5:end], local, can_answer)
        if command in _UNSUPPORTED or command not in RESPONSE_KIND:
            name = f"command 0x{command:02x}"
            if can_answer:
                local.append(self._err(p.ER_UNKNOWN_COM_ERROR, "08S01",
                                       f"multiproxy: {name} is not supported through the proxy; connect to the server directly"))
                self._answered_locally = True
                return b""
            raise ProtocolError(f"unsupported {name}", render_error(
                ErrorKind.NOT_SUPPORTED, f"{name} is not supported through the proxy", 1), ErrorKind.NOT_SUPPORTED)
        self.fifo.append(Pending(RESPONSE_KIND[command]))
        return None

    def _answer_ok(self, local: list, can_answer: bool) -> bytes:
        if can_answer:
            local.append(self._ok())
            self._answered_locally = True
            return b""
        # Linked: the backend answers a harmless statement instead, so that answers stay in order.
        self.fifo.append(Pending(R_GENERIC))
        return p.packet(0, bytes((p.COM_QUERY,)) + b"DO 0")

    def _kill(self, thread_id: int, terminate: bool) -> None:
        """KILL QUERY cancels the statement the target runs; KILL [CONNECTION] also closes the target client."""
        cancel = getattr(self.ctx, "cancel", None)
        if cancel is not None:
            cancel(thread_id, terminate)

    def _transaction_control(self, sql: bytes, local: list) -> bool:
        """BEGIN / START TRANSACTION, COMMIT / ROLLBACK while no backend is linked, answered by the proxy: an idle
        transaction holds no backend. True when answered."""
        if _BEGIN.fullmatch(sql):
            # An open transaction would be committed by it; a deferred one is replaced (it had begun nothing).
            if self.status & p.SERVER_STATUS_IN_TRANS and self.deferred_begin is None:
                return False
            self.deferred_begin = bytes(sql).strip().rstrip(b";").strip()
            self.status |= p.SERVER_STATUS_IN_TRANS
        elif _END.fullmatch(sql):
            if self.status & p.SERVER_STATUS_IN_TRANS and self.deferred_begin is None:
                return False
            if "completion_type" in self.variables:
                return False        # COMMIT may chain or release: the server decides
            self.deferred_begin = None
            self.status &= ~p.SERVER_STATUS_IN_TRANS
        else:
            return False
        local.append(self._ok())
        self._answered_locally = True
        return True

    def _setting_locally(self, sql: bytes, local: list) -> bool:
        """SET autocommit = 0|1 and SET NAMES of a character set every server knows, while no backend is linked and
        no transaction is open, answered by the proxy and tracked (replayed on the next backend). True when answered."""
        if self.status & p.SERVER_STATUS_IN_TRANS:
            return False        # SET autocommit = 1 would commit: the server does that
        autocommit = _AUTOCOMMIT.fullmatch(sql)
        if autocommit is not None:
            self.autocommit = autocommit.group(1).lower() in (b"1", b"on", b"true")
            self.state_generation += 1
            if self.autocommit:
                self.status |= p.SERVER_STATUS_AUTOCOMMIT
            else:
                self.status &= ~p.SERVER_STATUS_AUTOCOMMIT
        else:
            names = _SET_NAMES.fullmatch(sql)
            if names is None or names.group(1).decode().lower() not in _EVERYWHERE_CHARSETS:
                return False
            if names.group(2) is not None and names.group(2).decode().lower() not in _EVERYWHERE_COLLATIONS:
                return False
            found = classify(bytes(sql).decode("utf-8", "replace"))
            if found.effects or list(found.assigns) != [NAMES]:
                return False
            self._settings_made(True, found.assigns, None)
        local.append(self._ok())
        self._answered_locally = True
        return True

    def _query(self, sql: bytes, local: list, can_answer: bool, request: bytes | None) -> bytes | None:
        found = classify(bytes(sql).decode("utf-8", "replace"))
        if found.kill is not None:
            self._kill(found.kill[1], found.kill[0] == "connection")
            return self._answer_ok(local, can_answer)
        if found.last_insert_id is not None and can_answer:
            local.append(self._last_insert_id_result(found.last_insert_id))
            self._answered_locally = True
            return b""
        if found.readback and request is None:
            # a 16 MiB statement continues in further packets: nothing can follow it in the same write
            found.pin(PinReason.SESSION_VARIABLE, "SET to an expression in a statement over 16 MiB")
        pins = [effect for effect in found.effects if effect[0] == "pin"]
        if pins:
            self.pin_statement = sql     # for the pin's log line and SHOW PINS
            self._pins_sent(pins)
        if found.hold_next:
            self.hold = 2
        unpins = undone_by(found.effects) if len(pins) < len(found.effects) else ()
        action = None
        if found.assigns or found.schema is not None or unpins:
            assigns, schema = found.assigns, found.schema
            action = lambda ok: self._settings_made(ok, assigns, schema, unpins)    # noqa: E731
        self.fifo.append(Pending(R_GENERIC, action=action))
        if found.readback and request is not None:
            # Read back whether the statement succeeded or not: what the backend has now is what the session has.
            names = found.readback
            self.fifo.append(Pending(R_GENERIC, True, lambda ok: self._read_back(ok, names)))
            columns = ", ".join(f"@@SESSION.{spelled}" for _, spelled in names)
            return request + p.packet(0, bytes((p.COM_QUERY,)) + f"SELECT {columns}".encode())
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
