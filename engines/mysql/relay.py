"""The relay of one logged-in MySQL client: the packet walks in both directions and the answers awaited.

`client_data` walks the client's packets (headers only, plus the command byte and what policy needs, handed to
`_command` in commands.py); `backend_data` walks the backend's, following each answer through the result-set
states S_* to its end, against the FIFO of `Pending` commands (a client's PREPARE_OK gets the proxy's statement id
and the answers to the proxy's own re-prepares are swallowed: statements.py). At a transaction boundary with nothing
outstanding the backend may be released. Also here: LOCAL INFILE streaming, 16 MiB continuations, the hold of a
read-only refusal (`retry_candidate`, `retry_request`, `retry_declined`, `retry_accepted`), and what a lost or
missing backend means for the client.

Hot path: the per-packet loops of client_data and backend_data. Keep them free of extra calls and lookups
(measure with a round-trip micro-benchmark before changing them).
"""
from __future__ import annotations

import re
from collections import deque

from multiproxy.engine import HELD_REFUSAL, ClientContext, ClientQuit, ErrorKind, ProtocolError

from . import protocol as p
from .errors import render_error

# response kinds, what each outstanding command's answer looks like
R_GENERIC = 0        # OK, ERR, LOCAL INFILE request, or result sets (text or binary), MORE_RESULTS chains
R_SINGLE = 1         # exactly one packet (OK, ERR, EOF, or COM_STATISTICS' string)
R_PREPARE = 2        # COM_STMT_PREPARE_OK with parameter and column definitions, or ERR
R_FIELD_LIST = 3     # column definitions up to EOF, or ERR
R_ROWS = 4           # rows up to EOF (COM_STMT_FETCH), or ERR

# response parser states
S_START, S_COLUMNS, S_COLUMNS_EOF, S_ROWS, S_PARAMS, S_PARAMS_EOF, S_PREP_COLUMNS, S_PREP_COLUMNS_EOF = range(8)
# the result set of an internal query (a read-back): every packet is seen whole and swallowed, off the rows path
S_I_COLUMNS, S_I_COLUMNS_EOF, S_I_ROWS = range(8, 11)
S_I_PREP = 11        # the definitions after an internal PREPARE_OK (a re-prepare), swallowed: rcount packets left

# the response kind of each command the relay forwards
RESPONSE_KIND = {p.COM_QUERY: R_GENERIC, p.COM_STMT_EXECUTE: R_GENERIC, p.COM_INIT_DB: R_SINGLE,
                 p.COM_PING: R_SINGLE, p.COM_STATISTICS: R_SINGLE, p.COM_SET_OPTION: R_SINGLE,
                 p.COM_RESET_CONNECTION: R_SINGLE, p.COM_STMT_RESET: R_SINGLE, p.COM_REFRESH: R_SINGLE,
                 p.COM_STMT_PREPARE: R_PREPARE, p.COM_FIELD_LIST: R_FIELD_LIST, p.COM_STMT_FETCH: R_ROWS,
                 p.COM_DEBUG: R_SINGLE, p.COM_PROCESS_INFO: R_GENERIC, p.COM_CREATE_DB: R_SINGLE,
                 p.COM_DROP_DB: R_SINGLE}


class Pending:
    """One outstanding command: how its answer looks, whether the proxy sent it, what to record on success."""

    __slots__ = ("kind", "internal", "action", "failed", "answers_on_error", "statement")

    def __init__(self, kind: int, internal: bool = False, action=None, answers_on_error: bool = False):
        self.kind = kind
        self.internal = internal
        self.action = action        # callable(success: bool) run when the answer is complete
        self.failed = False
        # An internal command sent in front of the client's next one (a BEGIN the proxy answered): its ERR is
        # the client's answer, and the answer to the client's command is swallowed instead.
        self.answers_on_error = answers_on_error
        # COM_STMT_PREPARE: the (text, schema) key; a prepare the proxy sent: what statements.py needs of its
        # answer; an internal command answered by the proxy: the ERR packet the client gets instead.
        self.statement = None


PLAIN_QUERY = Pending(R_GENERIC)      # shared: a query with nothing to record (the hot path allocates nothing)


# commands seen whole by _command: their text or ids matter (statement commands are rewritten)
_NEED_WHOLE = frozenset((p.COM_INIT_DB, p.COM_PROCESS_KILL, p.COM_SET_OPTION, p.COM_CHANGE_USER, p.COM_STMT_PREPARE,
                         p.COM_STMT_EXECUTE, p.COM_STMT_SEND_LONG_DATA, p.COM_STMT_CLOSE, p.COM_STMT_RESET,
                         p.COM_STMT_FETCH))

_READ_ONLY_ERRORS = frozenset((
    1792,   # ER_CANT_EXECUTE_IN_READ_ONLY_TRANSACTION (the server's own transaction_read_only)
    1836,   # ER_READ_ONLY_MODE
))
_READ_ONLY_WORDS = re.compile(rb"read[\s_-]*only", re.IGNORECASE)


def _read_only_refusal(payload: bytes) -> bool:
    """An ERR packet saying the node is read-only: 1290 ER_OPTION_PREVENTS_STATEMENT naming --read-only or
    --super-read-only, 1792 or 1836."""
    if len(payload) < 3:
        return False
    code = payload[1] | (payload[2] << 8)
    if code == p.ER_OPTION_PREVENTS_STATEMENT:
        return b"read-only" in payload or b"read_only" in payload
    return code in _READ_ONLY_ERRORS


class Relay:
    """Mixin of MySQLClient: the relay's state and packet walks (see the module docstring)."""

    def _init_relay(self, ctx: ClientContext) -> None:
        self.max_message = ctx.max_message_size
        self.linked = False
        self.server_state = None
        self.fifo: deque = deque()      # Pending answers, oldest first
        self.rstate = S_START
        self.rcount = 0
        self.rcount2 = 0
        self.status = p.SERVER_STATUS_AUTOCOMMIT      # as the client last saw it
        self.last_insert_id = 0
        self.closing = False
        self.requests = 0
        self.hold = 0                   # commands to complete before the backend may go (SET TRANSACTION)
        self.infile = False             # the client streams a LOCAL INFILE
        self.transaction_lost = False
        self.lost_error = b""
        self.release_due = False
        self.retry_read_only = ctx.retry_read_only
        self.retry_candidate = None     # a lone first COM_QUERY in flight, kept to resend if a read-only node refuses it
        self.retry_refusal = b""        # the held ERR packet of a read-only refusal (see retry_declined)
        self.retry_request = None       # the refused COM_QUERY while its refusal is held (HELD_REFUSAL)
        self.captured: list = []        # rows of the internal query answered last (read-backs of settings)
        # partial packets
        self.cbuf = b""
        self.c_skip = 0
        self.c_more = False             # the last client packet was 16 MiB - 1: a continuation follows
        self.c_size = 0                 # bytes of the current (multi-packet) command so far
        self.sbuf = b""
        self.s_skip = 0
        self.s_more = False

    # ------------------------------------------------------------------ client to backend

    def client_data(self, data: bytes) -> tuple[bytes, bytes]:
        """Walk the client's packets; return (bytes for the backend, bytes answered locally)."""
        if self.cbuf:
            data = self.cbuf + data
            self.cbuf = b""
        n = len(data)
        pos = self.c_skip
        if pos >= n:
            self.c_skip = pos - n
            return data, b""
        self.c_skip = 0
        self.release_due = False
        local = []
        pieces = None          # kept slices when some packets are not forwarded as they are
        keep_from = 0
        forwarding = self.linked
        while pos < n:
            if n - pos < 4:
                self.cbuf = data[pos:]
                break
            length = data[pos] | (data[pos + 1] << 8) | (data[pos + 2] << 16)
            seq = data[pos + 3]
            end = pos + 4 + length
            if self.c_more or self.infile:
                # a continuation of a 16 MiB command, or LOCAL INFILE content: forwarded as it comes
                if self.c_more:
                    self.c_size += length
                    if self.c_size > self.max_message:
                        self._too_large(self.c_size)
                    self.c_more = length == p.MAX_PAYLOAD
                elif length == 0:
                    self.infile = False
                if end > n:
                    self.c_skip = end - n
                    pos = n
                    break
                pos = end
                continue
            if seq != 0:
                raise ProtocolError("packets out of order", render_error(
                    ErrorKind.PROTOCOL_VIOLATION,
                    f"a command must start with packet sequence id 0, got {seq} (packets out of order)", seq + 1))
            if length > self.max_message:
                self._too_large(length)
            if length == 0:
                raise ProtocolError("empty command packet", render_error(
                    ErrorKind.PROTOCOL_VIOLATION, "empty command packet", 1))
            if pos + 4 >= n:
                self.cbuf = data[pos:]
                break
            command = data[pos + 4]
            need_whole = command == p.COM_QUERY or command in _NEED_WHOLE
            if need_whole and end > n and length < p.MAX_PAYLOAD:
                self.cbuf = data[pos:]
                break
            self.requests += 1
            replace = self._command(command, data, pos, end, length, local, forwarding)
            if replace is not None or (not forwarding and self._answered_locally):
                # this packet is not forwarded as it is
                if pieces is None:
                    pieces = []
                pieces.append(data[keep_from:pos])
                if replace:
                    pieces.append(replace)
                keep_from = min(end, n)
            else:
                forwarding = True
                if length == p.MAX_PAYLOAD:
                    self.c_more = True
                    self.c_size = length
            if self.closing:
                keep_from = n           # nothing after COM_QUIT is forwarded
                break
            if end > n:
                self.c_skip = end - n
                pos = n
                break
            pos = end
        forward_end = n - len(self.cbuf)
        if pieces is None:
            forward = data if forward_end == n and keep_from == 0 else data[keep_from:forward_end]
        else:
            if keep_from < forward_end:
                pieces.append(data[keep_from:forward_end])
            forward = b"".join(pieces)
        if forward and self.linked and self.server_state is not None and self.server_state.stale_statements:
            forward = self._close_stale(self.server_state) + forward
        if self.holding and forward:
            forward = self._hold(forward)       # behind an execute waiting for its re-prepare (statements.py)
        if forward:
            # The first statement of a transaction, alone: if a read-only node refuses it (1290), nothing ran,
            # and it can be sent again to the new writer.
            self.retry_candidate = forward if (
                self.retry_read_only and not self.linked and not local and len(self.fifo) == 1
                and not self.fifo[0].internal and not self.status & p.SERVER_STATUS_IN_TRANS and not self.hold
                and not self.cbuf and not self.c_skip and not self.c_more and not self.infile
                and len(forward) > 4 and forward[4] == p.COM_QUERY and not self._asks_read_only(forward)) else None
        if self.closing:
            raise ClientQuit(forward, b"".join(local))
        return forward, b"".join(local)

    _answered_locally = False

    def _asks_read_only(self, request: bytes) -> bool:
        """Whether the session itself wants read-only transactions (SET SESSION TRANSACTION READ ONLY,
        tx_read_only / transaction_read_only, or such words in the request): a refusal is then its own doing."""
        value = self.variables.get("tx_read_only")
        if value is not None and value.strip("'\"").lower() in ("1", "on", "true"):
            return True
        return _READ_ONLY_WORDS.search(request, 5) is not None

    def retry_declined(self) -> tuple[bytes, bool]:
        """The node is still the writer: its refusal goes to the client, processed as the answer it is."""
        refusal, self.retry_refusal, self.retry_request = self.retry_refusal, b"", None
        after, self.sbuf = self.sbuf, b""
        out, release = self.backend_data(refusal)
        if after:
            self.sbuf = after
            release = False
        return out, release

    def retry_accepted(self) -> bytes:
        """The refused COM_QUERY, to send to the new writer (its answer is still awaited)."""
        request, self.retry_request, self.retry_refusal = self.retry_request, None, b""
        return request

    def _too_large(self, size: int) -> None:
        raise ProtocolError("message too large", render_error(
            ErrorKind.MESSAGE_TOO_LARGE,
            f"command of {size} bytes exceeds the proxy's limit of {self.max_message} bytes (proxy.max_message_size)", 1),
            ErrorKind.MESSAGE_TOO_LARGE)

    # ------------------------------------------------------------------ backend to client

    def backend_data(self, data: bytes) -> tuple[bytes, bool]:
        """Walk the backend's packets; return (bytes for the client, whether the backend may be released)."""
        if self.sbuf:
            data = self.sbuf + data
            self.sbuf = b""
        n = len(data)
        pos = self.s_skip
        parts = None
        keep_from = 0
        if pos:
            if pos >= n:
                self.s_skip = pos - n
                return data, False
            self.s_skip = 0
        fifo = self.fifo
        while pos < n:
            if n - pos < 5:
                if n - pos == 4 and data[pos] == 0 and data[pos + 1] == 0 and data[pos + 2] == 0:
                    pass    # an empty packet: only ever a continuation end
                else:
                    self.sbuf = data[pos:]
                    break
            length = data[pos] | (data[pos + 1] << 8) | (data[pos + 2] << 16)
            end = pos + 4 + length
            if self.s_more or not fifo:
                # continuation of a 16 MiB packet, or something nobody asked for: pass it on
                self.s_more = length == p.MAX_PAYLOAD
                if end > n:
                    self.s_skip = end - n
                    pos = n
                    break
                pos = end
                continue
            head = data[pos + 4] if length else 0
            state = self.rstate
            pending = fifo[0]
            if state == S_ROWS or state == S_COLUMNS or state == S_PARAMS or state == S_PREP_COLUMNS:
                if state == S_ROWS and (head == 0xFE or head == 0xFF) and length < p.MAX_PAYLOAD:
                    if end > n:
                        self.sbuf = data[pos:]
                        break
                    if head == 0xFF:
                        self._finish(pending, False)
                    else:
                        self._result_end(pending, data[pos + 4:end])
                elif state != S_ROWS:
                    self.rcount -= 1
                    if self.rcount <= 0:
                        self._definitions_done(state)
                elif length == p.MAX_PAYLOAD:
                    self.s_more = True
                if end > n:
                    self.s_skip = end - n
                    pos = n
                    break
                pos = end
                continue
            # a packet that must be seen whole: the first of an answer, or an EOF after definitions
            if end > n:
                self.sbuf = data[pos:]
                break
            payload = data[pos + 4:end]
            if (head == p.ERR_HEADER and state == S_START and self.retry_candidate is not None and not pending.internal
                    and _read_only_refusal(payload)):
                # The node refused the statement as read-only: it is no writer (any more). The client does not
                # see this answer; the core sends the statement again, once, to the writer it finds.
                if parts is None:
                    parts = []
                parts.append(data[keep_from:pos])
                keep_from = end
                self.retry_request, self.retry_candidate = self.retry_candidate, None
                self.retry_refusal = data[pos:end]
                pos = end
                continue
            if pending.internal:
                if parts is None:
                    parts = []
                parts.append(data[keep_from:pos])
                keep_from = end
                if state == S_START and pending.statement is not None:
                    # A re-prepare in front of an execute, or a command the proxy answers in the server's place.
                    parts.append(self._internal_answer(pending, head, payload))
                elif head == p.ERR_HEADER and state == S_START and pending.answers_on_error and len(fifo) > 1:
                    # The BEGIN the proxy answered failed: its error answers the client's command behind it,
                    # whose own answer the client no longer expects.
                    parts.append(p.packet(1, payload))
                    behind = fifo[1]
                    fifo[1] = Pending(behind.kind, True, behind.action)
            elif state == S_START and pending.kind == R_PREPARE:
                # The client's PREPARE_OK: the proxy's statement id in place of the server's.
                if head == p.OK_HEADER and len(payload) >= 9:
                    if parts is None:
                        parts = []
                    parts.append(data[keep_from:pos + 4])
                    keep_from = end
                    parts.append(self._prepared(pending, payload))
                elif self.server_state is not None:
                    self.server_state.last_key = None       # a failed prepare: 0xFFFFFFFF names nothing
            self._answer_packet(pending, state, head, payload)
            pos = end
        forward_end = n - len(self.sbuf)
        if parts is not None:
            parts.append(data[keep_from:forward_end])
            out = b"".join(parts)
        else:
            out = data if forward_end == n else data[:forward_end]
        if self.retry_request is not None:
            return out, HELD_REFUSAL
        if self.release_due and not self.sbuf and not self.s_skip and not self.s_more:
            self.release_due = False
            return out, True
        return out, False

    def _answer_packet(self, pending: Pending, state: int, head: int, payload: bytes) -> None:
        if state >= S_I_COLUMNS:
            self._internal_result(pending, state, head, payload)
            return
        kind = pending.kind
        if state == S_COLUMNS_EOF:
            status = p.terminator_status(payload)
            self._status(status)
            if status & p.SERVER_STATUS_CURSOR_EXISTS and kind == R_GENERIC:
                self._finish(pending, True)     # a cursor: rows come with COM_STMT_FETCH
            else:
                self.rstate = S_ROWS
            return
        if state == S_PARAMS_EOF:
            self._after_params()
            return
        if state == S_PREP_COLUMNS_EOF:
            self._finish(pending, True)
            return
        # S_START
        if head == p.ERR_HEADER:
            self._finish(pending, False)
            return
        if kind == R_SINGLE:
            if head == p.OK_HEADER and len(payload) >= 7:
                self._ok_packet(payload)
            elif head == p.EOF_HEADER and len(payload) < p.MAX_PAYLOAD:
                self._status(p.terminator_status(payload))
            self._finish(pending, True)
            return
        if kind == R_PREPARE:
            if head != p.OK_HEADER or len(payload) < 9:
                self._finish(pending, True)
                return
            columns = p.UINT16.unpack_from(payload, 5)[0]
            params = p.UINT16.unpack_from(payload, 7)[0]
            if pending.internal:
                # a re-prepare: its definitions are swallowed
                count = params + columns + (0 if self.deprecate_eof else (params > 0) + (columns > 0))
                if count:
                    self.rcount = count
                    self.rstate = S_I_PREP
                else:
                    self._finish(pending, True)
                return
            self.rcount2 = columns
            if params:
                self.rcount = params
                self.rstate = S_PARAMS
            else:
                self._after_params()
            return
        if kind == R_FIELD_LIST or kind == R_ROWS:
            if head == p.EOF_HEADER and len(payload) < p.MAX_PAYLOAD:
                self._result_end(pending, payload)
            else:
                self.rstate = S_ROWS       # a field definition or a row; the terminator ends it
            return
        # R_GENERIC
        if head == p.OK_HEADER:
            self._ok_packet(payload)
            self._after_result(pending)
        elif head == p.EOF_HEADER and len(payload) < 9:
            self._status(p.terminator_status(payload))
            self._after_result(pending)
        elif head == p.LOCAL_INFILE_HEADER:
            self.infile = True          # the client sends the file; the server then answers OK or ERR
        else:
            try:
                count = p.read_lenenc_int(payload, 0)[0]
            except (IndexError, ValueError):
                count = 0
            self.rcount = count
            if pending.internal:
                self.rstate = S_I_COLUMNS if count else S_I_ROWS
            else:
                self.rstate = S_COLUMNS if count else S_ROWS

    def _internal_result(self, pending: Pending, state: int, head: int, payload: bytes) -> None:
        """A packet of an internal query's result set: rows kept in `captured` for the pending's action."""
        if state == S_I_PREP:
            self.rcount -= 1
            if self.rcount <= 0:
                self._finish(pending, True)
        elif state == S_I_COLUMNS:
            self.rcount -= 1
            if self.rcount <= 0:
                self.rstate = S_I_ROWS if self.deprecate_eof else S_I_COLUMNS_EOF
        elif state == S_I_COLUMNS_EOF:
            self._status(p.terminator_status(payload))
            self.rstate = S_I_ROWS
        elif head == 0xFF:
            self._finish(pending, False)
        elif head == 0xFE and len(payload) < p.MAX_PAYLOAD:
            self._result_end(pending, payload)
        else:
            self.captured.append(payload)

    def _definitions_done(self, state: int) -> None:
        if state == S_COLUMNS:
            self.rstate = S_ROWS if self.deprecate_eof else S_COLUMNS_EOF
        elif state == S_PARAMS:
            if self.deprecate_eof:
                self._after_params()
            else:
                self.rstate = S_PARAMS_EOF
        else:   # S_PREP_COLUMNS
            if self.deprecate_eof:
                self._finish(self.fifo[0], True)
            else:
                self.rstate = S_PREP_COLUMNS_EOF

    def _after_params(self) -> None:
        if self.rcount2:
            self.rcount = self.rcount2
            self.rcount2 = 0
            self.rstate = S_PREP_COLUMNS
        else:
            self._finish(self.fifo[0], True)

    def _ok_packet(self, payload: bytes) -> None:
        try:
            _, pos = p.read_lenenc_int(payload, 1)
            insert_id, pos = p.read_lenenc_int(payload, pos)
            status = p.UINT16.unpack_from(payload, pos)[0]
        except (IndexError, ValueError, Exception):
            return
        if insert_id and not self.fifo[0].internal:
            self.last_insert_id = insert_id
        self._status(status)

    def _status(self, status: int) -> None:
        self.status = status
        if self.server_state is not None:
            self.server_state.status = status

    def _result_end(self, pending: Pending, payload: bytes) -> None:
        self._status(p.terminator_status(payload))
        self._after_result(pending)

    def _after_result(self, pending: Pending) -> None:
        if self.status & p.SERVER_MORE_RESULTS_EXISTS:
            self.rstate = S_START
            return
        self._finish(pending, not pending.failed)

    def _finish(self, pending: Pending, ok: bool) -> None:
        """The answer to the oldest outstanding command is complete."""
        self.fifo.popleft()
        self.rstate = S_START
        self.infile = False
        if pending.internal:
            if pending.action is not None:
                pending.action(ok)
            if self.captured:
                self.captured = []      # rows no read-back took (a reset_query that returns some)
        else:
            self.retry_candidate = None
            autocommit = bool(self.status & p.SERVER_STATUS_AUTOCOMMIT)
            if autocommit is not self.autocommit:
                self.autocommit = autocommit
                self.state_generation += 1
            if pending.action is not None:
                pending.action(ok)
            if self.hold:
                self.hold -= 1
        if not self.fifo and not self.hold and not self.status & p.SERVER_STATUS_IN_TRANS:
            self.release_due = True

    # ------------------------------------------------------------------ links, failures

    def unlink(self) -> None:
        if self.holding:
            self._drop_held()
        self.linked = False
        self.server_state = None
        self.release_due = False
        self.sbuf = b""
        self.s_skip = 0
        self.s_more = False
        self.rstate = S_START

    def awaiting_answer(self) -> bool:
        """A command sent waits for (the end of) its answer (query_timeout, idle timeouts)."""
        return bool(self.fifo)

    def is_clean(self) -> bool:
        return (not self.fifo and not self.status & p.SERVER_STATUS_IN_TRANS and not self.infile and not self.sbuf
                and not self.s_skip and not self.s_more and not self.cbuf and not self.c_skip and not self.c_more
                and not self.hold)

    def fail_pending(self, kind: ErrorKind, message: str) -> bytes:
        """No backend for the last chunk: answer each of its commands with an ERR, as a failing server would."""
        count = sum(1 for entry in self.fifo if not entry.internal)
        self.fifo.clear()
        self.deferred_pins = None       # what never reached a backend pins nothing
        self.unresolved = []
        self.rstate = S_START
        self.hold = 0
        self.infile = False
        if self.c_skip or self.c_more:
            raise ProtocolError(message, render_error(kind, message, 1), kind)
        return render_error(kind, message, 1) * count

    def backend_lost(self, message: str) -> tuple[bytes, bool]:
        outstanding = [entry for entry in self.fifo if not entry.internal]
        mid_answer = bool(self.sbuf or self.s_skip or self.s_more or self.rstate != S_START or self.infile)
        in_transaction = bool(self.status & p.SERVER_STATUS_IN_TRANS)
        pinned = self.pinned
        self.retry_candidate = None
        self.unlink()
        self.fifo.clear()
        self.hold = 0
        self.infile = False
        self.status &= ~p.SERVER_STATUS_IN_TRANS
        if mid_answer or pinned:
            return render_error(ErrorKind.BACKEND_LOST, message + (
                "; your session's state was lost with it, reconnect" if pinned else ""), 1), True
        text = message + ("; the transaction was rolled back, retry it" if in_transaction else "; retry")
        if outstanding:
            return render_error(ErrorKind.BACKEND_LOST, text, 1), False
        if in_transaction:
            self.transaction_lost = True
            self.lost_error = render_error(ErrorKind.BACKEND_LOST, text, 1)
        return b"", False
