"""A MySQL client's session state as the proxy tracks it, and how a backend is brought to it.

The client's side: tracked settings (`variables`, canonical name -> literal: every session system variable the
client set, see pinning.classify), the current schema, multi-statements, autocommit, a BEGIN the proxy answered
(`deferred_begin`). The backend's side: its `MySQLServerState` (backend.py), updated only when the backend
confirmed a change. `link()` brings a freshly linked backend to the client's state as internal commands whose
answers the client never sees: COM_RESET_CONNECTION first with reset_after_transaction, then COM_INIT_DB,
COM_SET_OPTION, one SET of the differences, the deferred BEGIN. A setting made with an expression is read back
(`SELECT @@SESSION.name`) in the same borrow. COM_RESET_CONNECTION and COM_CHANGE_USER (to the same user) reset
the client's view; `reset_bytes()` resets a backend leaving a pinned session.
"""
from __future__ import annotations

import re

from multiproxy.engine import ErrorKind, ProtocolError

from . import protocol as p
from .errors import render_error
from .pinning import CHARSET_VARIABLES, NAMES, TX_VARIABLES
from .relay import R_GENERIC, R_SINGLE, Pending

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")

COLLATIONS = {8: ("latin1", "latin1_swedish_ci"), 11: ("ascii", "ascii_general_ci"), 33: ("utf8", "utf8_general_ci"),
              45: ("utf8mb4", "utf8mb4_general_ci"), 46: ("utf8mb4", "utf8mb4_bin"), 63: ("binary", "binary"),
              83: ("utf8", "utf8_bin"), 224: ("utf8mb4", "utf8mb4_unicode_ci"), 255: ("utf8mb4", "")}


class SessionState:
    """Mixin of MySQLClient: tracked session state, the replay onto backends, session resets."""

    def _init_session_state(self) -> None:
        self.autocommit = True
        self.variables: dict[str, str] = {}          # tracked settings the client made (canonical name -> literal)
        self.schema = ""
        self.multi_statements = False
        self.deferred_begin: bytes | None = None     # BEGIN / START TRANSACTION answered by the proxy, not yet sent

    # ------------------------------------------------------------------ linking to backends

    def link(self, server_state, data: bytes) -> bytes:
        """The bytes for a freshly linked backend: commands bringing it to this client's tracked state, then `data`."""
        self.linked = True
        self.server_state = server_state
        if self.deferred_pins:
            self._apply_deferred_pins()
        internal = []
        pendings = []
        if self.ctx.reset_after_transaction:
            # Whatever the backend's last client changed indirectly (procedures, prepared statements, ...) goes.
            reset_query = self.ctx.reset_query
            if reset_query:
                internal.append(p.packet(0, bytes((p.COM_QUERY,)) + reset_query.encode("utf-8")))
                pendings.append(Pending(R_GENERIC, True))
            else:
                internal.append(p.packet(0, bytes((p.COM_RESET_CONNECTION,))))
                pendings.append(Pending(R_SINGLE, True, self._reset_connection_done))
            self._assume_reset(server_state, bool(reset_query))
        if self.schema and self.schema != server_state.schema:
            schema = self.schema
            internal.append(p.packet(0, bytes((p.COM_INIT_DB,)) + schema.encode("utf-8")))
            pendings.append(Pending(R_SINGLE, True, lambda ok, s=schema, st=server_state: ok and setattr(st, "schema", s)))
        if self.multi_statements != server_state.multi_statements:
            wanted = self.multi_statements
            option = p.MYSQL_OPTION_MULTI_STATEMENTS_ON if wanted else p.MYSQL_OPTION_MULTI_STATEMENTS_OFF
            internal.append(p.packet(0, bytes((p.COM_SET_OPTION,)) + p.UINT16.pack(option)))
            pendings.append(Pending(R_SINGLE, True,
                                     lambda ok, w=wanted, st=server_state: ok and setattr(st, "multi_statements", w)))
        assignments, values = self._replay(server_state)
        if assignments:
            internal.append(p.packet(0, bytes((p.COM_QUERY,)) + ("SET " + ", ".join(assignments)).encode("utf-8")))
            pendings.append(Pending(R_GENERIC, True,
                                     lambda ok, v=values, st=server_state: self._internal_done(ok, v, st)))
        if self.unresolved:
            data = self._resolve(server_state, data)       # statement commands sent while no backend was linked
        if self.deferred_begin is not None:
            internal.append(p.packet(0, bytes((p.COM_QUERY,)) + self.deferred_begin))
            pendings.append(Pending(R_GENERIC, True, answers_on_error=True))
            self.deferred_begin = None
        if server_state.stale_statements:
            internal.insert(0, self._close_stale(server_state))
        if internal:
            for pending in reversed(pendings):
                self.fifo.appendleft(pending)
            data = b"".join(internal) + data
        if self.holding:
            data = self._hold(data)     # an execute waits for its re-prepare's id (statements.py)
        return data

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
        for name in sorted(set(mine).union(theirs)):
            if name == NAMES:
                continue
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

    def _assume_reset(self, server, by_query: bool) -> None:
        """The backend as the reset sent in front of the replay leaves it (COM_RESET_CONNECTION: the login's
        settings, the server's default character set, no prepared statements; a configured query: unknown)."""
        if by_query:
            server.variables = {name: "__unknown__" for name in (*server.variables, *self.variables, NAMES)}
            return
        self._backend_was_reset(True)
        server.status = server.login_status
        server.stale_statements.clear()

    def _reset_connection_done(self, ok: bool) -> None:
        if not ok and self.server_state is not None:
            self.server_state.variables = {name: "__unknown__" for name in (*self.variables, NAMES)}

    def reset_bytes(self, server_state, reset_query: str = "") -> bytes:
        """Reset a backend leaving a pinned session: COM_RESET_CONNECTION (or the configured query), internal."""
        self.server_state = server_state
        self.fifo.append(Pending(R_GENERIC if reset_query else R_SINGLE, True, self._backend_was_reset))
        if reset_query:
            return p.packet(0, bytes((p.COM_QUERY,)) + reset_query.encode("utf-8"))
        return p.packet(0, bytes((p.COM_RESET_CONNECTION,)))

    # ------------------------------------------------------------------ session resets

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
        schema = database.decode("utf-8", "replace") if database else None
        if can_answer:
            self._client_reset()
            if schema:
                self.schema = schema
            local.append(self._ok(1))
            self._answered_locally = True
            return b""
        self.fifo.append(Pending(R_SINGLE, action=lambda ok: self._reset_done(ok, schema)))
        return p.packet(0, bytes((p.COM_RESET_CONNECTION,)))

    def _client_reset(self) -> None:
        """COM_RESET_CONNECTION semantics for the client's view: defaults, no pins."""
        self.state_generation += 1
        self.variables = {}
        self.autocommit = True
        self.multi_statements = bool(self.capabilities & p.CLIENT_MULTI_STATEMENTS)
        self.hold = 0
        self.deferred_begin = None
        self.status &= ~p.SERVER_STATUS_IN_TRANS
        self._forget_statements()
        if self.pinned or self.pin_keys or self.deferred_pins:
            self._unpin_all()

    def _reset_done(self, ok: bool, schema: str | None = None) -> None:
        """The backend confirmed COM_RESET_CONNECTION (or the one COM_CHANGE_USER became): both views reset."""
        self.state_generation += 1
        if ok:
            self._client_reset()
            self._backend_was_reset(True)
            if schema:
                self._schema_changed(True, schema)

    # ------------------------------------------------------------------ recording what succeeded

    def _settings_made(self, ok: bool, assigns: dict, schema: str | None, unpins=()) -> None:
        self.state_generation += 1
        server = self.server_state
        if not ok:
            # An error may have come after some of the settings ran (several statements): the backend's values
            # are unknown, so its next link sets each of them again.
            if server is not None:
                for name in assigns:
                    server.variables[name] = "__unknown__"
            return
        for name, value in assigns.items():
            if name == NAMES:
                for other in CHARSET_VARIABLES:
                    self.variables.pop(other, None)
                    if server is not None:
                        server.variables.pop(other, None)
            if value == "DEFAULT" and name not in TX_VARIABLES:
                # back to the login's value, which every backend of the pool has: nothing to replay
                self.variables.pop(name, None)
                if server is not None:
                    server.variables.pop(name, None)
                continue
            self.variables[name] = value
            if server is not None:
                server.variables[name] = value
        if schema is not None:
            self._schema_changed(True, schema)
        for reason, key in unpins:
            self._released(reason, key)

    def _read_back(self, ok: bool, names: list) -> None:
        """The answer to `SELECT @@SESSION.a, ...` after settings made with expressions: their values, tracked."""
        self.state_generation += 1
        rows, self.captured = self.captured, []
        if not ok or len(rows) != 1:
            # the backend's values are unknown: its next link sets each of them again
            self._settings_made(False, dict.fromkeys(name for name, _ in names), None)
            return
        values = {}
        pos = 0
        row = rows[0]
        try:
            for name, _ in names:
                if row[pos] == 0xFB:
                    values[name] = "NULL"
                    pos += 1
                    continue
                raw, pos = p.read_lenenc_str(row, pos)
                text = bytes(raw).decode("utf-8", "replace")
                values[name] = text if _NUMBER.fullmatch(text) else p.quote_string(text)
        except (IndexError, ValueError):
            self._settings_made(False, dict.fromkeys(name for name, _ in names), None)
            return
        self._settings_made(True, values, None)

    def _schema_changed(self, ok: bool, name: str) -> None:
        self.state_generation += 1
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
            server.last_key = None
            # MySQL's COM_RESET_CONNECTION sets the character set to the server's default: the login's is restored
            # with SET NAMES. MariaDB's restores the login's itself.
            names = COLLATIONS.get(server.charset)
            if names is not None and not server.mariadb:
                server.variables[NAMES] = "__server_default__"

    def _internal_done(self, ok: bool, values: dict, server) -> None:
        if ok:
            for name, value in values.items():
                if value == "DEFAULT":
                    server.variables.pop(name, None)
                else:
                    server.variables[name] = value
        else:
            server.variables = {name: "__unknown__" for name in (*server.variables, *self.variables, NAMES)}
