"""Binary prepared statements (COM_STMT_*) virtualised over the pool: the client's statement ids are the proxy's,
and each backend connection keeps a bounded cache of statements keyed by text, prepared again where missing.

The client sees ids the proxy assigns (per client, from 1); `statements` maps each to a `ClientStatement` (SQL
text, schema at prepare time, parameter and column counts, the parameter types last bound, held long data).
Each backend's `MySQLServerState.prepared` maps (text, schema) to a `BackendStatement` (the server's id, counts,
types last bound there), least recently used first, at most `ctx.max_prepared_statements`; beyond that the
oldest is closed (COM_STMT_CLOSE sent ahead of the next command, which has no answer).

- COM_STMT_PREPARE is forwarded (a backend is borrowed like for any request); the PREPARE_OK is recorded in the
  backend's cache and reaches the client with the proxy's id in place of the server's.
- COM_STMT_EXECUTE, RESET and FETCH carry the proxy's id and are rewritten to the linked backend's. A backend
  that lacks the statement (another connection, evicted, reset) gets a COM_STMT_PREPARE first; the answer to that
  prepare is swallowed. On MariaDB it is pipelined with the execute, which names statement id 0xFFFFFFFF ("the
  statement prepared last"). Elsewhere (MySQL servers have no such id; or `[clusters.NAME.options]
  pipelined_reprepare = "false"`) the prepare goes alone and the execute (with its long data) and every client
  byte behind it are held (`held`, in order, the execute as a placeholder: a per-client random mark and an index
  into `held_items`) until the PREPARE_OK gives the new id; then they are written with it and handed to the core
  as `backend_owed` (up to the next execute still waiting for its prepare). If the prepare fails, its ERR answers
  the execute (whose own answer is swallowed, or which is dropped when held); if its parameter or column counts
  differ from what the client was given (the table changed), the client gets ERR 1615 (prepare it again) in its
  place. Parameter types are re-sent (new-params-bound = 1) whenever the backend statement last saw other types
  than the client bound.
- While no backend is linked the backend is not known yet: such commands leave a placeholder (a per-client
  random mark and an index) in the bytes for the backend, and `link()` resolves them against the backend linked.
- COM_STMT_SEND_LONG_DATA is held by the proxy (bounded by max_message_size in total) and sent in front of the
  execute; RESET and CLOSE drop it. COM_STMT_CLOSE only forgets the client's id (the backend statement stays
  cached for anyone preparing the same text). COM_STMT_RESET is answered by the proxy while no backend is linked.
- An execute that opens a server-side cursor (flags != 0) pins the session from that execute on (the cursor
  lives on that backend, and COM_STMT_FETCH reads it); resetting or closing the statement releases that pin.
- A backend reset (COM_RESET_CONNECTION, COM_CHANGE_USER, reset_after_transaction) empties its cache
  (session_state.py); a client's own reset also forgets its ids. Ids the client never got answer ERR 1243.
"""
from __future__ import annotations

import os

from multiproxy.engine import ErrorKind, PinReason, ProtocolError

from . import protocol as p
from .errors import render_error
from .relay import R_PREPARE, R_ROWS, R_SINGLE, R_GENERIC, Pending

LAST_STATEMENT = 0xFFFFFFFF     # MariaDB: the statement this connection prepared last
NO_STATEMENT = 0                # an id no server assigns: the server's ERR 1243 answers in order
CURSOR_FLAGS = 0x07             # CURSOR_TYPE_READ_ONLY | FOR_UPDATE | SCROLLABLE
ER_UNKNOWN_STMT_HANDLER = 1243
ER_NEED_REPREPARE = 1615
ER_STMT_HAS_NO_OPEN_CURSOR = 1421

STATEMENT_COMMANDS = frozenset((p.COM_STMT_PREPARE, p.COM_STMT_EXECUTE, p.COM_STMT_SEND_LONG_DATA,
                                p.COM_STMT_CLOSE, p.COM_STMT_RESET, p.COM_STMT_FETCH))
CURSOR_DETAIL = "server-side cursor (COM_STMT_EXECUTE with a cursor)"


class ClientStatement:
    """A statement as the client knows it, under the proxy's id."""

    __slots__ = ("key", "params", "columns", "types", "long_data", "long_size", "cursor")

    def __init__(self, key: tuple, params: int, columns: int):
        self.key = key                  # (SQL text, schema at prepare time)
        self.params = params
        self.columns = columns
        self.types: bytes | None = None     # 2 bytes per parameter, as last bound by the client
        self.long_data: list = []       # COM_STMT_SEND_LONG_DATA payloads after the id (param id, data)
        self.long_size = 0
        self.cursor = False             # an execute opened a server-side cursor (pinned)


class BackendStatement:
    """A statement prepared on one backend connection (`MySQLServerState.prepared`)."""

    __slots__ = ("id", "params", "columns", "types", "failure")

    def __init__(self, statement_id: int | None, params: int, columns: int):
        self.id = statement_id          # None while its PREPARE_OK is on its way
        self.params = params
        self.columns = columns
        self.types: bytes | None = None     # parameter types last bound on this backend
        self.failure: bytes | None = None   # the ERR payload of its (held-mode) re-prepare, if that failed


def _with_id(payload: bytes, statement_id: int) -> bytes:
    return payload[:1] + p.UINT32.pack(statement_id) + payload[5:]


class Statements:
    """Mixin of MySQLClient: COM_STMT_* commands, the per-backend statement cache, stale statements."""

    def _init_statements(self) -> None:
        self.statements: dict[int, ClientStatement] = {}
        self.next_statement_id = 0
        self.unresolved: list = []      # commands waiting for a backend: (command, payload, Pending or None)
        self.mark = b""                 # placeholder of an unresolved command in the bytes for the backend
        # Executes held until their re-prepare's id is known (MySQL servers; not `hold`, which is SET TRANSACTION's)
        options = self.ctx.engine_options or {}
        self.pipelined_reprepare = str(options.get("pipelined_reprepare", "true")).lower() not in (
            "false", "0", "no", "off")
        self.holding = False            # an execute waits for its re-prepare: client bytes go to `held`
        self.held: list = []            # client bytes for the backend, held in order (first one at a placeholder)
        self.held_size = 0
        self.held_items: list = []      # [statement, entry, payload, long data (None: RESET, FETCH), Pending or None]
        self.held_mark = b""

    # ------------------------------------------------------------------ client commands

    def _statement(self, command: int, data: bytes, pos: int, end: int, length: int, local: list,
                   can_answer: bool) -> bytes | None:
        if length >= p.MAX_PAYLOAD:
            raise ProtocolError("prepared-statement command of 16 MiB", render_error(
                ErrorKind.NOT_SUPPORTED, "prepared-statement commands of 16 MiB or more are not supported through "
                "the proxy; send large values with COM_STMT_SEND_LONG_DATA in smaller pieces", 1),
                ErrorKind.NOT_SUPPORTED)
        payload = bytes(data[pos + 4:end])
        if command == p.COM_STMT_PREPARE:
            pending = Pending(R_PREPARE)
            pending.statement = (payload[1:], self.schema)
            self.fifo.append(pending)
            if not self.linked:
                return self._defer(command, payload, pending)
            return self._send_prepare(self.server_state, payload, pending)
        statement_id = p.UINT32.unpack_from(payload, 1)[0] if len(payload) >= 5 else None
        statement = self.statements.get(statement_id)
        if statement is None:
            return self._unknown(command, payload, local, can_answer)
        if command == p.COM_STMT_EXECUTE:
            if len(payload) >= 6 and payload[5] & CURSOR_FLAGS and not statement.cursor:
                # The cursor lives on this backend: the session stays there from this execute on.
                statement.cursor = True
                self._pins_sent([("pin", PinReason.PREPARED_STATEMENT, CURSOR_DETAIL, ("cursor", statement_id))])
            pending = Pending(R_GENERIC)
            self.fifo.append(pending)
            long_data, statement.long_data, statement.long_size = statement.long_data, [], 0
            if not self.linked:
                return self._defer(command, (statement, payload, long_data), pending)
            return self._execute_on(self.server_state, statement, payload, long_data, pending)
        if command == p.COM_STMT_SEND_LONG_DATA:
            statement.long_size += len(payload)
            if statement.long_size > self.max_message:
                statement.long_data, statement.long_size = [], 0
                raise ProtocolError("long data too large", render_error(
                    ErrorKind.MESSAGE_TOO_LARGE, f"COM_STMT_SEND_LONG_DATA for statement {statement_id} exceeds the "
                    f"proxy's limit of {self.max_message} bytes in total (proxy.max_message_size)", 1),
                    ErrorKind.MESSAGE_TOO_LARGE)
            statement.long_data.append(payload[5:])
            return b""
        if command == p.COM_STMT_CLOSE:
            del self.statements[statement_id]
            self.state_generation += 1
            if statement.cursor:
                self._released(PinReason.PREPARED_STATEMENT, ("cursor", statement_id))
                entry = self.server_state.prepared.get(statement.key) if self.linked else None
                if entry is not None and entry.id is not None:
                    # Close the cursor it left on the backend; the statement stays cached.
                    self.fifo.append(Pending(R_SINGLE, True))
                    return p.packet(0, bytes((p.COM_STMT_RESET,)) + p.UINT32.pack(entry.id))
            return b""
        if command == p.COM_STMT_RESET:
            statement.long_data, statement.long_size = [], 0
            if statement.cursor:
                # the reset closes the cursor on the (pinned) backend: nothing ties the session there any more
                statement.cursor = False
                self._released(PinReason.PREPARED_STATEMENT, ("cursor", statement_id))
            if can_answer and not self.linked:
                local.append(self._ok())
                self._answered_locally = True
                return b""
            pending = Pending(R_SINGLE)
            self.fifo.append(pending)
            entry = self.server_state.prepared.get(statement.key) if self.linked else None
            if entry is not None and entry.id is not None:
                return p.packet(0, _with_id(payload, entry.id))
            if entry is not None and self.holding:
                return self._hold_point(statement, entry, payload, None, pending)    # behind its held execute
            return p.packet(0, bytes((p.COM_PING,)))      # nothing to reset there: an OK in its place
        # COM_STMT_FETCH: rows of the cursor opened on this (pinned) backend
        if not self.linked:
            if can_answer:
                local.append(self._err(ER_STMT_HAS_NO_OPEN_CURSOR, "HY000",
                                       f"The statement ({statement_id}) has no open cursor."))
                self._answered_locally = True
                return b""
            self.fifo.append(Pending(R_ROWS))
            return p.packet(0, _with_id(payload, NO_STATEMENT))
        pending = Pending(R_ROWS)
        self.fifo.append(pending)
        entry = self.server_state.prepared.get(statement.key)
        if entry is not None and entry.id is None and self.holding:
            return self._hold_point(statement, entry, payload, None, pending)        # behind its held execute
        return p.packet(0, _with_id(payload, entry.id if entry is not None and entry.id is not None else NO_STATEMENT))

    def _unknown(self, command: int, payload: bytes, local: list, can_answer: bool) -> bytes:
        """An id the client never got from this proxy (or closed): ERR 1243, as the server would answer."""
        if command in (p.COM_STMT_CLOSE, p.COM_STMT_SEND_LONG_DATA):
            return b""      # no answer
        if can_answer:
            local.append(self._err(ER_UNKNOWN_STMT_HANDLER, "HY000",
                                   "Unknown prepared statement handler given to multiproxy; prepare it again"))
            self._answered_locally = True
            return b""
        # Behind other commands: the server's own ERR 1243 for an id it never assigns keeps answers in order.
        self.fifo.append(Pending(R_ROWS if command == p.COM_STMT_FETCH else
                                 R_SINGLE if command == p.COM_STMT_RESET else R_GENERIC))
        return p.packet(0, _with_id(payload, NO_STATEMENT) if len(payload) >= 5 else
                        bytes((command,)) + p.UINT32.pack(NO_STATEMENT))

    def _defer(self, command: int, what, pending: Pending) -> bytes:
        """A placeholder for a command whose bytes depend on the backend not linked yet (resolved by link())."""
        if not self.mark:
            self.mark = os.urandom(12)
        self.unresolved.append((command, what, pending))
        return self.mark + p.UINT16.pack(len(self.unresolved) - 1)

    def _resolve(self, server_state, data: bytes) -> bytes:
        """The bytes for the backend just linked, the placeholders of `_defer` replaced in order."""
        unresolved, self.unresolved = self.unresolved, []
        pieces = data.split(self.mark)
        out = [pieces[0]]
        for piece in pieces[1:]:
            command, what, pending = unresolved[p.UINT16.unpack_from(piece, 0)[0]]
            if command == p.COM_STMT_PREPARE:
                out.append(self._send_prepare(server_state, what, pending))
            else:
                statement, payload, long_data = what
                out.append(self._execute_on(server_state, statement, payload, long_data, pending))
            out.append(piece[2:])
        return b"".join(out)

    # ------------------------------------------------------------------ on a backend

    def _send_prepare(self, server_state, payload: bytes, pending: Pending) -> bytes:
        server_state.last_key = pending.statement
        return p.packet(0, payload)

    def _execute_on(self, server_state, statement: ClientStatement, payload: bytes, long_data: list,
                    pending: Pending) -> bytes:
        """COM_STMT_EXECUTE of `statement` on this backend: its id there, prepared first if missing, long data and
        parameter types re-sent where needed."""
        cache = server_state.prepared
        key = statement.key
        entry = cache.get(key)
        counts = self.ctx.statement_counts
        out = []
        hold = not (self.pipelined_reprepare and server_state.supports_last_statement_id)
        if entry is not None and entry.id is not None:
            cache.move_to_end(key)
            counts.hits += 1
            statement_id = entry.id
        elif entry is not None and (self.holding if hold else server_state.last_key == key):
            # its prepare is on its way, in front of this execute (held: its answer releases this one)
            cache.move_to_end(key)
            counts.hits += 1
            if hold:
                return self._hold_point(statement, entry, payload, long_data, pending)
            statement_id = LAST_STATEMENT
        else:
            counts.misses += 1
            entry = BackendStatement(None, statement.params, statement.columns)
            cache.pop(key, None)
            cache[key] = entry
            out.append(self._evict(server_state))
            sql, schema = key
            # prepared where the client prepared it; the backend is in the client's current schema (the replay)
            switch = schema != self.schema and schema
            if switch:
                out.append(p.packet(0, bytes((p.COM_INIT_DB,)) + schema.encode("utf-8")))
                self._insert_before(pending, Pending(R_SINGLE, True))
            prepare = Pending(R_PREPARE, True)
            prepare.statement = (key, statement, entry, pending, hold)
            self._insert_before(pending, prepare)
            out.append(p.packet(0, bytes((p.COM_STMT_PREPARE,)) + sql))
            server_state.last_key = key
            if switch:
                out.append(p.packet(0, bytes((p.COM_INIT_DB,)) + self.schema.encode("utf-8")))
                self._insert_before(pending, Pending(R_SINGLE, True))
            if hold:
                out.append(self._hold_point(statement, entry, payload, long_data, pending))
                return b"".join(out)
            statement_id = LAST_STATEMENT
        packed_id = p.UINT32.pack(statement_id)
        for piece in long_data:
            out.append(p.packet(0, bytes((p.COM_STMT_SEND_LONG_DATA,)) + packed_id + piece))
        out.append(p.packet(0, self._bind_types(statement, entry, payload[:1] + packed_id + payload[5:])))
        return b"".join(out)

    # ------------------------------------------------------------------ executes held for their re-prepare

    def _hold_point(self, statement: ClientStatement, entry: BackendStatement, payload: bytes, long_data: list,
                    pending: Pending) -> bytes:
        """A placeholder for an execute that needs the id of a prepare still on its way: from here on the bytes for
        the backend are held (`_hold`) until that PREPARE_OK (`_release_held`)."""
        if not self.held_mark:
            self.held_mark = os.urandom(12)
        self.holding = True
        self.held_items.append([statement, entry, payload, long_data, pending])
        return self.held_mark + p.UINT32.pack(len(self.held_items) - 1)

    def _hold(self, data: bytes) -> bytes:
        """The part of `data` (bytes for the backend) to send now: what precedes the first held execute."""
        if not self.held:
            at = data.find(self.held_mark)      # the hold begins in this client read (or link)
            if at < 0:
                return data
            self.held.append(data[at:])
            self.held_size = len(data) - at
            return data[:at]
        self.held.append(data)
        self.held_size += len(data)
        if self.held_size > self.max_message:
            raise ProtocolError("too much pipelined behind a held execute", render_error(
                ErrorKind.MESSAGE_TOO_LARGE, f"the commands pipelined behind an execute waiting for its statement to "
                f"be prepared again exceed the proxy's limit of {self.max_message} bytes (proxy.max_message_size); "
                "wait for answers before sending more", 1), ErrorKind.MESSAGE_TOO_LARGE)
        return b""

    def _release_held(self) -> None:
        """A re-prepare was answered: the held bytes up to the next execute still waiting for its prepare, with
        the statement ids now known, go to the backend (`backend_owed`)."""
        data = b"".join(self.held)
        self.held = []
        self.held_size = 0
        mark = self.held_mark
        items = self.held_items
        out = []
        pos = 0
        while True:
            at = data.find(mark, pos)
            if at < 0:
                out.append(data[pos:])
                break
            out.append(data[pos:at])
            statement, entry, payload, long_data, pending = items[p.UINT32.unpack_from(data, at + 12)[0]]
            if entry.id is None and entry.failure is None:
                # its prepare is among the bytes released now: held until that one is answered
                rest = data[at:]
                self.held.append(rest)
                self.held_size = len(rest)
                break
            if pending is not None:
                out.append(self._held_execute(statement, entry, payload, long_data, pending))
            pos = at + 16
        if not self.held:
            self.holding = False
            self.held_items = []
        self.backend_owed += b"".join(out)

    def _held_execute(self, statement: ClientStatement, entry: BackendStatement, payload: bytes, long_data: list,
                      pending: Pending) -> bytes:
        """A held execute with the id its backend statement now has (or, if its prepare failed or the statement
        changed shape, sent with an id no server assigns and answered by the proxy with the error). A held
        COM_STMT_RESET or FETCH (`long_data` None) gets the id, or one no server assigns (its ERR answers)."""
        if long_data is None:
            return p.packet(0, _with_id(payload, entry.id if entry.id is not None else NO_STATEMENT))
        if entry.failure is not None or entry.params != statement.params or entry.columns != statement.columns:
            answer = Pending(R_GENERIC, True)
            answer.statement = p.packet(1, entry.failure) if entry.failure is not None else self._err(
                ER_NEED_REPREPARE, "HY000", "Prepared statement needs to be re-prepared (multiproxy: it now has "
                f"{entry.params} parameters and {entry.columns} columns, it had {statement.params} and "
                f"{statement.columns}); prepare it again")
            self._replace_pending(pending, answer)
            return p.packet(0, _with_id(payload, NO_STATEMENT))
        packed_id = p.UINT32.pack(entry.id)
        out = [p.packet(0, bytes((p.COM_STMT_SEND_LONG_DATA,)) + packed_id + piece) for piece in long_data]
        out.append(p.packet(0, self._bind_types(statement, entry, payload[:1] + packed_id + payload[5:])))
        return b"".join(out)

    def _drop_held(self) -> None:
        """The backend went (lost, or its link ended): nothing held is sent anywhere."""
        self.holding = False
        self.held = []
        self.held_size = 0
        self.held_items = []

    def _bind_types(self, statement: ClientStatement, entry: BackendStatement, payload: bytes) -> bytes:
        """The execute with parameter types bound on this backend: the client's, re-sent when the backend statement
        last saw others (or none)."""
        count = statement.params
        if not count:
            return payload
        flag = 10 + (count + 7) // 8        # command, id, flags, iteration count, NULL bitmap
        if len(payload) <= flag:
            return payload                  # malformed: the server says so
        if payload[flag]:
            types = payload[flag + 1:flag + 1 + 2 * count]
            statement.types = entry.types = types
            return payload
        if statement.types is None or entry.types == statement.types:
            return payload
        entry.types = statement.types
        return payload[:flag] + b"\x01" + statement.types + payload[flag + 1:]

    def _evict(self, server_state) -> bytes:
        """COM_STMT_CLOSE of the least recently used statements beyond max_prepared_statements (no answers)."""
        cache = server_state.prepared
        limit = self.ctx.max_prepared_statements
        if len(cache) <= limit:
            return b""
        out = []
        while len(cache) > limit:
            _, old = cache.popitem(last=False)
            self.ctx.statement_counts.evictions += 1
            if old.id is not None:
                out.append(p.packet(0, bytes((p.COM_STMT_CLOSE,)) + p.UINT32.pack(old.id)))
        return b"".join(out)

    def _insert_before(self, pending: Pending, internal: Pending) -> None:
        fifo = self.fifo
        for i in range(len(fifo) - 1, -1, -1):
            if fifo[i] is pending:
                fifo.insert(i, internal)
                return
        fifo.append(internal)

    def _replace_pending(self, pending: Pending, replacement: Pending | None) -> None:
        fifo = self.fifo
        for i in range(len(fifo) - 1, -1, -1):
            if fifo[i] is pending:
                if replacement is None:
                    del fifo[i]
                else:
                    fifo[i] = replacement
                return

    # ------------------------------------------------------------------ answers

    def _prepared(self, pending: Pending, payload: bytes) -> bytes:
        """The client's PREPARE_OK: recorded on the backend and for the client, with the proxy's id."""
        server_state = self.server_state
        key = pending.statement
        backend_id = p.UINT32.unpack_from(payload, 1)[0]
        columns = p.UINT16.unpack_from(payload, 5)[0]
        params = p.UINT16.unpack_from(payload, 7)[0]
        cache = server_state.prepared
        old = cache.pop(key, None)
        if old is not None and old.id is not None and old.id != backend_id:
            server_state.stale_statements.append(old.id)
        cache[key] = BackendStatement(backend_id, params, columns)
        limit = self.ctx.max_prepared_statements
        while len(cache) > limit:
            _, evicted = cache.popitem(last=False)
            self.ctx.statement_counts.evictions += 1
            if evicted.id is not None:
                server_state.stale_statements.append(evicted.id)
        self.next_statement_id += 1
        self.statements[self.next_statement_id] = ClientStatement(key, params, columns)
        self.state_generation += 1
        return _with_id(payload, self.next_statement_id)

    def _internal_answer(self, pending: Pending, head: int, payload: bytes) -> bytes:
        """The first packet of the answer to a statement command the proxy sent: what the client gets instead."""
        if type(pending.statement) is bytes:
            return pending.statement        # the proxy's own answer in place of the server's
        return self._reprepared(pending, head, payload)

    def _reprepared(self, pending: Pending, head: int, payload: bytes) -> bytes:
        """The answer to a prepare the proxy sent in front of an execute: recorded; an ERR, or counts other than
        the client was given, answer the execute instead (returned for the client), whose own answer is swallowed."""
        key, statement, entry, execute, held = pending.statement
        server_state = self.server_state
        cache = server_state.prepared
        if head == p.ERR_HEADER:
            if cache.get(key) is entry:
                del cache[key]
            entry.failure = bytes(payload)
            answer = p.packet(1, payload)
        else:
            backend_id = p.UINT32.unpack_from(payload, 1)[0]
            columns = p.UINT16.unpack_from(payload, 5)[0]
            params = p.UINT16.unpack_from(payload, 7)[0]
            entry.id, entry.params, entry.columns = backend_id, params, columns
            if cache.get(key) is not entry:
                server_state.stale_statements.append(backend_id)     # evicted meanwhile
            if params == statement.params and columns == statement.columns:
                if held:
                    self._release_held()
                return b""
            answer = self._err(ER_NEED_REPREPARE, "HY000", "Prepared statement needs to be re-prepared (multiproxy: "
                               f"it now has {params} parameters and {columns} columns, it had {statement.params} "
                               f"and {statement.columns}); prepare it again")
        if held:
            # the execute, still held, is dropped: this answers it
            self._replace_pending(execute, None)
            for item in self.held_items:
                if item[4] is execute:
                    item[4] = None
                    break
            self._release_held()
        else:
            self._replace_pending(execute, Pending(execute.kind, True, execute.action))
        return answer

    def _close_stale(self, server_state) -> bytes:
        out = b"".join(p.packet(0, bytes((p.COM_STMT_CLOSE,)) + p.UINT32.pack(sid)) for sid in server_state.stale_statements)
        server_state.stale_statements.clear()
        return out

    def _forget_statements(self) -> None:
        """The client's session was reset: its statement ids are gone (as the server would drop them)."""
        self.state_generation += 1
        self.statements = {}
