"""The sp_prepare family multiplexed: proxy handles per client, backend handles cached per backend connection.

A client's `sp_prepare` / `sp_prepexec` (well-known proc ids 11 and 13, or by name) gets a handle the proxy assigns
(per client, 1, 2, ...) naming (parameter declaration, statement text). Each backend connection keeps
(declaration, text) -> its own handle in a `StatementCache`, LRU-ordered and bounded by `max_prepared_statements`.
Requests are rewritten for the backend they reach, answers for the client:

- `sp_execute h`: the backend's handle when it has the statement (a hit); otherwise `sp_prepexec` with the
  declaration and text, so one round trip prepares and runs it (a miss); the handle it returns is recorded and its
  RETURNVALUE swallowed (and later RETURNVALUE ordinals moved back by the two parameters added).
- `sp_prepexec`: `sp_execute` with the backend's handle when it has the statement, and a RETURNVALUE of the proxy
  handle synthesised where the server would have put it; otherwise forwarded, the handle's RETURNVALUE rewritten.
- `sp_prepare`: always forwarded (its answer may carry column metadata only the server knows); the RETURNVALUE
  carries the proxy handle; a statement the backend already had is superseded and the old handle unprepared.
- `sp_unprepare h`: forgets the client's handle and is answered by the proxy (RETURNSTATUS, DONEPROC), in order;
  the backend keeps the statement for others.
- An unknown handle gets error 8179 as SQL Server words it, in order.

Handles the cache drops (least recently used past the bound, superseded ones) are unprepared by calls the proxy
puts in front of the next rewritten RPC message to that backend; their answers are swallowed. SQL Server drops a
connection's prepared handles on a reset (RESETCONNECTION, sp_reset_connection): the cache is cleared then, so
after a link with a reset every first execute is a miss. A client's own reset forgets its handles too, as SQL
Server would. `sp_prepexecrpc` (14) is rare and still pins. `[clusters.NAME.options] prepared_statements = "pin"`
restores the old behaviour (prepare pins the session).
"""
from __future__ import annotations

import re
import struct
from collections import OrderedDict

from .wire import messages as tp
from .wire import token_stream as tk
from .wire.response_scanner import NeedMore, ResponseScanner, skip_value
from .wire.token_stream import ProtocolError, TypeInfo, read_type_info, read_value, write_value

PREPARE, EXECUTE, PREPEXEC, UNPREPARE = tp.SP_PREPARE, tp.SP_EXECUTE, tp.SP_PREPEXEC, tp.SP_UNPREPARE
VIRTUALISED = frozenset((PREPARE, EXECUTE, PREPEXEC, UNPREPARE))
RESET_PROC = -1                     # sp_reset_connection called by name: the backend's handles end there
_BY_NAME = {"sp_prepare": PREPARE, "sp_execute": EXECUTE, "sp_prepexec": PREPEXEC, "sp_unprepare": UNPREPARE,
            "sp_reset_connection": RESET_PROC}
_QUALIFIERS = frozenset(("", "sys", "master", "dbo"))
# Byte patterns one of these calls needs somewhere in the message (ProcID form, or its name in UCS-2): an RPC
# without any is not parsed again.
_MARKERS = tuple(struct.pack("<HH", 0xFFFF, p) for p in VIRTUALISED) + tuple(
    w.encode("utf-16-le") for w in ("prep", "PREP", "Prep", "xecute", "XECUTE", "_reset_", "_RESET_"))
NOT_FOUND = 8179
BATCH_SEPARATOR = 0x80              # TDS 7.2+ BatchFlag between the calls of one RPC message
INT4 = TypeInfo(tk.INTN, 4)
_HANDLE_NULL_OUT = b"\x00" + bytes([tp.PARAM_BY_REF]) + tk.write_type_info(INT4) + b"\x00"


def proc_number(name: str) -> int | None:
    """The virtualised procedure a name calls (case-insensitive, `sp_prepare`, `sys.sp_prepare`,
    `[master].[sys].[sp_prepare]`...), or None."""
    parts = [p.strip().strip("[]").strip().lower() for p in name.split(".")]
    if not parts or any(p not in _QUALIFIERS for p in parts[:-1]):
        return None
    return _BY_NAME.get(parts[-1])


# -- the calls of an RPC message, as byte spans -------------------------------------------------------------
class Param:
    __slots__ = ("start", "name", "status", "status_at", "type_at", "info", "value_at", "end")

    def value(self, data: bytes):
        return read_value(self.info, data, self.value_at)[0]


class Call:
    __slots__ = ("start", "proc", "flags_at", "params_at", "params", "end", "separator")

    def __init__(self):
        self.params: list[Param] = []
        self.separator = BATCH_SEPARATOR


def _skip_param(info: TypeInfo, data: bytes, pos: int) -> int:
    if info.type in tk.LONGLEN_TYPES:       # RPC parameters carry text/ntext/image as LONGLEN, no text pointer
        if pos + 4 > len(data):
            raise ProtocolError("truncated RPC parameter")
        n = struct.unpack_from("<I", data, pos)[0]
        return pos + 4 + (0 if n == 0xFFFFFFFF else n)
    try:
        end = skip_value(info, data, pos)
    except NeedMore:
        raise ProtocolError("truncated RPC parameter") from None
    if end > len(data):
        raise ProtocolError("truncated RPC parameter")
    return end


def parse_calls(data: bytes) -> tuple[int, list[Call]]:
    """ALL_HEADERS' end and the calls of an RPC message (ProtocolError when it does not parse, e.g. a table-valued
    or sql_variant parameter)."""
    _, pos = tp.read_all_headers(data)
    calls: list[Call] = []
    end = len(data)
    separator = BATCH_SEPARATOR
    while True:
        call = Call()
        call.start = pos
        call.separator = separator
        if pos + 2 > end:
            raise ProtocolError("truncated RPC procedure name")
        size = struct.unpack_from("<H", data, pos)[0]
        pos += 2
        if size == 0xFFFF:
            if pos + 2 > end:
                raise ProtocolError("truncated RPC ProcID")
            number = struct.unpack_from("<H", data, pos)[0]
            call.proc = number if number in VIRTUALISED else None
            pos += 2
        else:
            if pos + 2 * size > end:
                raise ProtocolError("RPC procedure name runs past the message")
            call.proc = proc_number(data[pos:pos + 2 * size].decode("utf-16-le", "replace"))
            pos += 2 * size
        if pos + 2 > end:
            raise ProtocolError("truncated RPC option flags")
        call.flags_at = pos
        pos += 2
        call.params_at = pos
        while pos < end and data[pos] not in tp.RPC_BATCH_FLAGS:
            param = Param()
            param.start = pos
            n = data[pos]
            if pos + 1 + 2 * n + 1 > end:
                raise ProtocolError("truncated RPC parameter name")
            param.name = data[pos + 1:pos + 1 + 2 * n].decode("utf-16-le", "replace")
            pos += 1 + 2 * n
            param.status_at = pos
            param.status = data[pos]
            param.type_at = pos + 1
            param.info, pos = read_type_info(data, pos + 1)
            param.value_at = pos
            pos = param.end = _skip_param(param.info, data, pos)
            call.params.append(param)
        call.end = pos
        calls.append(call)
        if pos >= end:
            return _headers_end(data), calls
        separator = data[pos]
        pos += 1
        if pos >= end:
            return _headers_end(data), calls


def _first_proc(data: bytes) -> int | None:
    """The virtualised procedure the first call of a message names, read from its header alone."""
    try:
        pos = _headers_end(data)
        size = struct.unpack_from("<H", data, pos)[0]
        if size == 0xFFFF:
            number = struct.unpack_from("<H", data, pos + 2)[0]
            return number if number in VIRTUALISED else None
        return proc_number(data[pos + 2:pos + 2 + 2 * size].decode("utf-16-le", "replace"))
    except struct.error:
        return None


def _headers_end(data: bytes) -> int:
    return struct.unpack_from("<I", data, 0)[0]


_TSQL_UNPREPARE = re.compile(r"\s*(?:EXEC(?:UTE)?\s+(?:(?:\[?master\]?\.)?\[?sys\]?\.)?\[?sp_unprepare\]?\s+"
                             r"(\d+)\s*;?\s*)", re.I)
_UNPREPARE_TEXT = ("unprepare".encode("utf-16-le"), "UNPREPARE".encode("utf-16-le"))


def tsql_unprepares(payload: bytes) -> list[int] | None:
    """The handles of a SQL batch made only of `EXEC sp_unprepare N` statements (mssql-jdbc unprepares the
    handles it discards so, in batches), or None for any other batch."""
    if not any(m in payload for m in _UNPREPARE_TEXT):
        return None
    try:
        text = tp.SqlBatch.decode(payload).text
    except (ProtocolError, UnicodeDecodeError):
        return None
    handles, pos = [], 0
    while pos < len(text):
        found = _TSQL_UNPREPARE.match(text, pos)
        if found is None or found.end() == pos:
            return None if text[pos:].strip() else handles or None
        handles.append(int(found.group(1)))
        pos = found.end()
    return handles or None


def might_virtualise(data: bytes) -> bool:
    """Cheap: whether an RPC message may call one of these procedures at all."""
    return any(m in data for m in _MARKERS)


# -- what the proxy knows ------------------------------------------------------------------------------------
class Prepared:
    """A client's prepared statement: the cache key and the declaration and text as the client encoded them
    (TYPE_INFO and value), for re-preparing it on another backend."""

    __slots__ = ("key", "decl", "stmt", "options")

    def __init__(self, key: tuple, decl: bytes, stmt: bytes, options=None):
        self.key, self.decl, self.stmt, self.options = key, decl, stmt, options


class StatementCache:
    """One backend connection's prepared statements: (declaration, text) -> backend handle, least recently used
    first, and the handles to unprepare before its next rewritten RPC."""

    __slots__ = ("handles", "garbage", "epoch")

    def __init__(self):
        self.handles: OrderedDict = OrderedDict()
        self.garbage: list[int] = []
        self.epoch = 0          # counts resets: a handle learnt from an answer sent before one is not kept

    def get(self, key):
        handle = self.handles.get(key)
        if handle is not None:
            self.handles.move_to_end(key)
        return handle

    def put(self, key, handle: int, limit: int, counts) -> None:
        old = self.handles.pop(key, None)
        if old is not None and old != handle:
            self.garbage.append(old)
        self.handles[key] = handle
        while len(self.handles) > limit:
            self.garbage.append(self.handles.popitem(last=False)[1])
            counts.evictions += 1

    def clear(self) -> None:
        """The backend was reset: it holds no prepared statements any more."""
        self.handles.clear()
        self.garbage.clear()
        self.epoch += 1

    def __len__(self) -> int:
        return len(self.handles)


def not_found(handle, server: str) -> bytes:
    return (tk.error(NOT_FOUND, f"Could not find prepared statement with handle {handle}.", 1, 16, server, "", 1)
            + tk.done_proc(tk.DONE_ERROR))


def missing_parameter(proc: str, name: str, server: str) -> bytes:
    return (tk.error(201, f"Procedure or function '{proc}' expects parameter '{name}', which was not supplied.", 4,
                     16, server, proc, 0) + tk.done_proc(tk.DONE_ERROR))


UNPREPARED = tk.returnstatus(0) + tk.done_proc()


# -- steps: one per call of the message sent, or a local answer between them -------------------------------
PASS, SWALLOW, PREPARED, REPREPARED, SYNTH, LOCAL, RAW, RESET = range(8)


class Resolved:
    """One call of a client's message resolved against the client's handles (before any backend is known)."""

    __slots__ = ("kind", "raw", "handle", "prepared", "values", "flags", "name", "output", "tokens", "separator")

    def __init__(self, kind, raw=b"", handle=0, prepared=None, values=b"", flags=b"\0\0", name="", output=True,
                 tokens=b""):
        self.kind, self.raw, self.handle, self.prepared, self.values = kind, raw, handle, prepared, values
        self.flags, self.name, self.output, self.tokens = flags, name, output, tokens
        self.separator = BATCH_SEPARATOR    # the flag byte before it in the client's message


class RpcPlan:
    """A client's RPC message with at least one virtualised call, resolved; `build` rewrites it for a backend."""

    __slots__ = ("status", "headers", "calls", "local_only")

    def __init__(self, status: int, headers: bytes, calls: list[Resolved]):
        self.status, self.headers, self.calls = status, headers, calls
        self.local_only = all(c.kind == LOCAL for c in calls)

    def effects(self) -> list[tuple] | None:
        """What it does to the session (session_state.request_effects' form) when every call is of the family (no
        decoding needed: they pin nothing, sp_reset_connection resets); None when another call is in it."""
        if any(c.kind == RAW for c in self.calls):
            return None
        effects: list[tuple] = []
        if self.status & (tp.STATUS_RESETCONNECTION | tp.STATUS_RESETCONNECTIONSKIPTRAN):
            effects.append(("reset", bool(self.status & tp.STATUS_RESETCONNECTIONSKIPTRAN)))   # session_state.RESET
        effects += [("reset", False) for c in self.calls if c.kind == RESET]
        return effects

    def local_reply(self) -> bytes:
        return _chain([c.tokens for c in self.calls])


DONE_RPCINBATCH = 0x80      # on the DONEPROC of every call of an RPC batch but the last (SQL Server sets it)


def _with_more(tokens: bytes, more: bool, flags: int = tk.DONE_MORE | DONE_RPCINBATCH) -> bytes:
    """Tokens ending in DONEPROC, with DONE_MORE (and DONE_RPCINBATCH: RPC batches) set or cleared on it."""
    status = struct.unpack_from("<H", tokens, len(tokens) - 12)[0]
    status = status | flags if more else status & ~flags
    return tokens[:-12] + struct.pack("<H", status) + tokens[-10:]


def _chain(parts: list[bytes]) -> bytes:
    return b"".join(_with_more(p, i < len(parts) - 1) for i, p in enumerate(parts))


def _call_bytes(proc: int, flags: bytes, params: bytes) -> bytes:
    return struct.pack("<HH", 0xFFFF, proc) + flags + params


def _int_param(value: int) -> bytes:
    return b"\x00\x00" + tk.write_type_info(INT4) + write_value(INT4, value)


def unprepare_call(handle: int) -> bytes:
    return _call_bytes(UNPREPARE, b"\0\0", _int_param(handle))


class Step:
    __slots__ = ("kind", "handle", "prepared", "name", "output", "shift", "tokens", "seen_value", "synthesised")

    def __init__(self, kind, handle=0, prepared=None, name="", output=True, shift=0, tokens=b""):
        self.kind, self.handle, self.prepared, self.name, self.output = kind, handle, prepared, name, output
        self.shift, self.tokens = shift, tokens
        self.seen_value = self.synthesised = False


class Statements:
    """Mixin of TDSClient: resolves RPC messages that call the sp_prepare family and rewrites them for a backend.
    TDSClient sets `handles` (proxy handle -> Prepared), `next_handle` and `virtualize`."""

    def _resolve_rpc(self, status: int, data: bytes) -> RpcPlan | None:
        """The message's calls resolved against the client's handles; None for a message to forward as it came (no
        call of the family, or one that does not parse and whose first call carries no proxy handle: the server
        says what is wrong with it)."""
        if not might_virtualise(data) and _first_proc(data) is None:
            return None
        try:
            headers_end, calls = parse_calls(data)
        except (ProtocolError, struct.error, UnicodeDecodeError) as exc:
            if _first_proc(data) in (EXECUTE, UNPREPARE):
                # An sp_execute/sp_unprepare the proxy cannot rewrite must not reach a backend with a proxy handle.
                return RpcPlan(status, b"", [Resolved(LOCAL, tokens=tk.error(
                    4002, f"multiproxy could not parse this RPC request ({exc}); send sp_execute in a message of its "
                    "own", 1, 16, "multiproxy", "", 1) + tk.done_proc(tk.DONE_ERROR))])
            return None
        if all(c.proc is None for c in calls):
            return None
        if status & (tp.STATUS_RESETCONNECTION | tp.STATUS_RESETCONNECTIONSKIPTRAN):
            self.handles.clear()       # the reset ends the client's prepared statements, as on SQL Server
            self.state_generation += 1
        resolved = []
        for call in calls:
            resolved.append(self._resolve_call(data, call))
            resolved[-1].separator = call.separator
        return RpcPlan(status, data[:headers_end], resolved)

    def _resolve_call(self, data: bytes, call: Call) -> Resolved:
        proc, params = call.proc, call.params
        flags = data[call.flags_at:call.flags_at + 2]
        raw = data[call.start:call.end]
        if proc is None:
            return Resolved(RAW, raw)
        if proc == RESET_PROC:
            self.handles.clear()
            self.state_generation += 1
            return Resolved(RESET, raw)
        name = tp.PROC_NAMES[proc]
        if proc in (PREPARE, PREPEXEC):
            if len(params) < 3:
                return Resolved(LOCAL, tokens=missing_parameter(name, "@stmt" if len(params) == 2 else "@params",
                                                                  "multiproxy"))
            try:
                decl, text = params[1].value(data), params[2].value(data)
            except (ProtocolError, UnicodeDecodeError):
                return Resolved(RAW, raw)       # the server says what is wrong with it
            handle = self.next_handle
            self.next_handle += 1
            options = None
            if proc == PREPARE and len(params) > 3:
                try:
                    options = params[3].value(data)
                except (ProtocolError, UnicodeDecodeError):
                    options = None
            prepared = Prepared((decl or "", text or ""), data[params[1].type_at:params[1].end],
                                data[params[2].type_at:params[2].end], options)
            self.handles[handle] = prepared
            self.state_generation += 1
            first = params[0]
            # the handle parameter is made OUTPUT: the proxy must learn the backend's handle either way
            forced = (raw[:first.status_at - call.start] + bytes([first.status | tp.PARAM_BY_REF])
                      + raw[first.status_at - call.start + 1:])
            values = data[params[3].start:call.end] if proc == PREPEXEC and len(params) > 3 else b""
            return Resolved(proc, forced, handle, prepared, values, flags, first.name, bool(first.status & tp.PARAM_BY_REF))
        if not params:
            return Resolved(LOCAL, tokens=missing_parameter(name, "@handle", "multiproxy"))
        try:
            handle = params[0].value(data)
        except (ProtocolError, UnicodeDecodeError):
            handle = None
        prepared = self.handles.get(handle) if isinstance(handle, int) else None
        if prepared is None:
            return Resolved(LOCAL, tokens=not_found("NULL" if handle is None else handle, "multiproxy"))
        if proc == UNPREPARE:
            del self.handles[handle]
            self.state_generation += 1
            return Resolved(LOCAL, tokens=UNPREPARED)
        values = data[params[1].start:call.end] if len(params) > 1 else b""
        return Resolved(EXECUTE, raw, handle, prepared, values, flags)

    def _tsql_unprepare(self, handles: list[int]) -> bytes:
        """The answer to a batch of `EXEC sp_unprepare N`: each forgets the client's handle (RETURNSTATUS,
        DONEPROC) or is error 8179, then the batch's DONE; the backends keep their statements."""
        out = b""
        for handle in handles:
            body = UNPREPARED if self.handles.pop(handle, None) is not None else not_found(handle, "multiproxy")
            self.state_generation += 1
            out += _with_more(body, True, tk.DONE_MORE)
        return out + tk.done()

    def _build_rpc(self, plan: RpcPlan, cache: StatementCache) -> tuple[bytes, "Rewriter | None"]:
        """The message for a backend whose statements are `cache`, and the rewriter of its answer (None when the
        answer goes to the client as it is)."""
        if plan.status & (tp.STATUS_RESETCONNECTION | tp.STATUS_RESETCONNECTIONSKIPTRAN):
            cache.clear()
        counts = self.ctx.statement_counts
        parts: list[bytes] = []
        steps: list[Step] = []
        for handle in cache.garbage:
            parts.append(unprepare_call(handle))
            steps.append(Step(SWALLOW))
        cache.garbage.clear()
        separators: list[int] = [BATCH_SEPARATOR] * len(parts)
        for call in plan.calls:
            kind = call.kind
            if kind == LOCAL:
                steps.append(Step(LOCAL, tokens=call.tokens))
                continue
            separators.append(call.separator)
            if kind == RAW or kind == RESET:
                if kind == RESET:
                    cache.clear()
                parts.append(call.raw)
                steps.append(Step(PASS))
            elif kind == PREPARE:
                parts.append(call.raw)
                steps.append(Step(PREPARED, call.handle, call.prepared, output=call.output))
            elif kind == EXECUTE:
                backend_handle = cache.get(call.prepared.key)
                if backend_handle is not None:
                    counts.hits += 1
                    parts.append(_call_bytes(EXECUTE, call.flags, _int_param(backend_handle) + call.values))
                    steps.append(Step(PASS))
                else:
                    counts.misses += 1
                    prepared = call.prepared
                    parts.append(_call_bytes(PREPEXEC, call.flags, _HANDLE_NULL_OUT + b"\x00\x00" + prepared.decl
                                             + b"\x00\x00" + prepared.stmt + call.values))
                    steps.append(Step(REPREPARED, prepared=prepared, shift=-2))
            elif kind == PREPEXEC:
                backend_handle = cache.get(call.prepared.key)
                if backend_handle is not None:
                    counts.hits += 1
                    parts.append(_call_bytes(EXECUTE, call.flags, _int_param(backend_handle) + call.values))
                    steps.append(Step(SYNTH, call.handle, call.prepared, call.name, call.output, shift=2))
                else:
                    counts.misses += 1
                    parts.append(call.raw)
                    steps.append(Step(PREPARED, call.handle, call.prepared, output=call.output))
        out = bytearray(plan.headers)
        for index, part in enumerate(parts):
            if index:
                out.append(separators[index])
            out += part
        if not parts:
            return b"", None
        if all(s.kind == PASS for s in steps):
            return bytes(out), None
        return bytes(out), Rewriter(steps, cache, self)


class Rewriter:
    """Rewrites one RPC answer token by token, step by step (each backend call's part ends with its DONEPROC)."""

    __slots__ = ("steps", "index", "cache", "client", "scanner", "buf", "done", "epoch")

    def __init__(self, steps: list[Step], cache: StatementCache, client):
        self.steps, self.index, self.cache, self.client = steps, 0, cache, client
        self.epoch = cache.epoch
        self.scanner = ResponseScanner()
        self.buf = b""
        self.done = False

    def _more_after(self, index: int) -> bool:
        return any(s.kind != SWALLOW for s in self.steps[index + 1:])

    def _locals(self, out: list) -> None:
        steps = self.steps
        while self.index < len(steps) and steps[self.index].kind == LOCAL:
            out.append(_with_more(steps[self.index].tokens, self._more_after(self.index)))
            self.index += 1

    def feed(self, payload: bytes, eom: bool) -> bytes:
        buf = self.buf + payload if self.buf else payload
        out: list[bytes] = []
        if not self.done and self.index == 0:
            self._locals(out)
        pos, end = 0, len(buf)
        ignored: list = []
        while pos < end:
            try:
                stop = self.scanner._token(buf, pos, ignored)
            except NeedMore:
                break
            ignored.clear()
            token = buf[pos:stop]
            pos = stop
            if self.done or self.index >= len(self.steps):
                out.append(token)
                continue
            self._token(token, out)
        self.buf = buf[pos:]
        if eom:
            if self.buf:
                out.append(self.buf)        # the scanner downstream reports what is wrong with it
                self.buf = b""
            if not self.done:
                self._locals(out)
        return b"".join(out)

    def _token(self, token: bytes, out: list) -> None:
        step = self.steps[self.index]
        kind, t = step.kind, token[0]
        if t == tk.TOKEN_DONEPROC:
            if kind == SYNTH and not step.synthesised:
                self._synthesise(step, out)
            elif kind == PREPARED and not step.seen_value and self.client.handles.get(step.handle) is step.prepared:
                del self.client.handles[step.handle]     # no handle came back: the prepare failed
                self.client.state_generation += 1
            if kind != SWALLOW:
                out.append(_with_more(token, self._more_after(self.index)))
            self.index += 1
            self._locals(out)
            return
        if t == tk.TOKEN_DONE:                  # the whole request ended (attention, a batch-aborting error)
            out.append(token)
            self.done = True
            return
        if kind == SWALLOW:
            return
        if t == tk.TOKEN_RETURNSTATUS:
            out.append(token)
            if kind == SYNTH and not step.synthesised:
                self._synthesise(step, out)
            return
        if t == tk.TOKEN_RETURNVALUE:
            if kind in (PREPARED, REPREPARED) and not step.seen_value:
                step.seen_value = True
                token = self._handle_value(step, token)
                if token:
                    out.append(token)
                return
            if step.shift:
                ordinal = max(struct.unpack_from("<H", token, 1)[0] + step.shift, 0)
                token = token[:1] + struct.pack("<H", ordinal) + token[3:]
            out.append(token)
            return
        out.append(token)

    def _synthesise(self, step: Step, out: list) -> None:
        step.synthesised = True
        if step.output:
            out.append(tk.returnvalue(0, step.name, INT4, step.handle))

    def _handle_value(self, step: Step, token: bytes) -> bytes:
        """The first RETURNVALUE of a prepare: the backend's handle, recorded; the client sees the proxy's (or,
        for a re-prepare, nothing)."""
        pos = 3
        pos += 1 + 2 * token[pos]             # ParamName
        pos += 1 + 4 + 2                      # Status, UserType, Flags
        info, value_at = read_type_info(token, pos)
        value = read_value(info, token, value_at)[0]
        client = self.client
        if isinstance(value, int) and not isinstance(value, bool):
            if self.cache.epoch == self.epoch:      # no reset of the backend since (a later request's) 
                self.cache.put(step.prepared.key, value, client.ctx.max_prepared_statements,
                               client.ctx.statement_counts)
        elif step.kind == PREPARED and client.handles.get(step.handle) is step.prepared:
            del client.handles[step.handle]    # the server prepared nothing: the handle names nothing
            client.state_generation += 1
        if step.kind == REPREPARED or not step.output:
            return b""
        if value is None:
            return token
        return token[:value_at] + write_value(info, step.handle)

