"""The relay of a logged-in PostgreSQL client, sans-IO: the framing walks over both directions and the FIFO.

The relay walks message headers only. It decodes what policy needs: SQL text of Query and Parse (pin
detection), statement names of Parse and Bind (the unnamed-statement hold, named statements), the
status byte of ReadyForQuery, ParameterStatus (tracked session parameters) and CopyInResponse. From them it
keeps the FIFO of answers the backend owes, decides when the backend may be released, holds the answer to a
first statement a read-only node may refuse (the read-only retry), and answers requests that cannot reach a
backend. Session state (session_state.py) and statement virtualisation (statements.py) plug in as mixins of
the same object, so the per-message paths pay no extra attribute lookups.
"""
from __future__ import annotations

import re

from multiproxy.engine import HELD_REFUSAL, ClientQuit, ErrorKind, PinReason, ProtocolError

from . import protocol as p
from .errors import render_error
from .pinning import _IDENTITY_KEYS, ALL_BUT_IDENTITY, analyze, might_pin

# What each ReadyForQuery the relay expects answers: the entries of the FIFO. Entries <= 0 are the proxy's
# own requests: their responses are not the client's.
INTERNAL = 0        # the replay of the session's state, or the reset of a backend a pinned client left
READBACK = -1       # the values of settings an expression set, read back after the client's request
BACKEND_RESET = -2  # reset_after_transaction: the reset before the replay (its ParameterStatus is the backend's)
BEGIN_SYNC = -3     # the Sync that follows a simple Query the proxy sent behind a BEGIN it answered itself
LOGIN_VALUES = -4   # the login's values set again behind RESET ALL / DISCARD ALL: the client's ReadyForQuery
                    # waits for it, so that the client sees the values back when its request is answered
CLIENT_QUERY = 1    # Query or FunctionCall
CLIENT_SYNC = 2     # Sync of the extended protocol
EMPTY_SYNC = 3      # a Sync with nothing before it: the server answers only ReadyForQuery

# A backend setting whose value is not known (a transaction that changed it may have been rolled back): equal
# to no value a client asks for, so the next link sets or resets it.
UNKNOWN_SETTING = "\x00unknown"
STATEMENT_SHOWN = 300   # bytes of a pinning statement kept for SHOW PINS

READ_ONLY_WORDS = re.compile(rb"read[\s_]*only", re.IGNORECASE)
# How a Query's text that transactions.py may answer starts (lowercased): a screen, its regexes decide.
TRANSACTION_PREFIXES = (b"begin", b"start", b"commi", b"end", b"rollb", b"abort")

_INSPECT_BACKEND = frozenset(b"ZSGEW")
_INSPECT_BACKEND_VIRTUAL = frozenset(b"ZSGEW1")
_HEADER_ONLY_CLIENT = {p.SYNC, p.FLUSH, p.TERMINATE, p.FUNCTION_CALL, p.COPY_DATA, p.COPY_DONE, p.COPY_FAIL,
                       p.EXECUTE}
_unpack_uint32 = p.UINT32.unpack_from
_TERMINATE_MESSAGE = b"X\x00\x00\x00\x04"
# The opening messages of an answer that may still end in a read-only refusal: held back until it is known.
_ANSWER_PREFIX = frozenset((p.PARSE_COMPLETE, p.BIND_COMPLETE, ord("t"), ord("n"), ord("T"), p.PARAMETER_STATUS,
                            ord("N")))
# A statement name nobody prepares: a Bind or Describe of the unnamed statement by a client that did not parse it
# on the backend it goes to is sent with it, and the server answers 26000 "prepared statement ... does not exist".
NOT_PARSED_HERE = b"unnamed statement not parsed on this server connection"
# Client-message types accepted after startup. Anything else is a protocol violation.
_KNOWN_CLIENT = frozenset((p.QUERY, p.PARSE, p.BIND, p.DESCRIBE, p.EXECUTE, p.CLOSE, p.SYNC, p.FLUSH,
                           p.TERMINATE, p.FUNCTION_CALL, p.COPY_DATA, p.COPY_DONE, p.COPY_FAIL))


class Relay:
    """Mixin of PostgresClient: the relay between the client and its current backend. PostgresClient.__init__
    creates `fifo` (what each expected ReadyForQuery answers, oldest first), `pin_details`, `max_message` and
    `retry_read_only`. Initial values of the immutable parts of the state live on the class: a connection
    pays only for what it changes (pgbench -C opens one connection per transaction)."""

    tx_status = p.TX_IDLE
    pending_extended = False        # extended-protocol messages sent since the last Sync
    unnamed_held = False            # unnamed statement parsed but not yet bound
    unnamed_parsed = False          # the linked backend's unnamed statement is one this client parsed (since the link)
    unnamed_resent = False          # ... and the request retried on the writer (retry_accepted) parses it there again
    extended_stops = 0              # extended-protocol messages the compiled relay stops at (see relay_key)
    copy_in = False
    discard_until_sync = False
    transaction_lost = False
    pinned = False
    closing = False
    linked = False
    server_state = None             # the linked backend's PostgresServerState
    requests = 0
    syncs_sent = 0
    relay_seen_requests = 0         # `requests` and `extended_stops` at the last relay_key() that saw new requests
    relay_seen_stops = 0
    relay_extended = False          # ... and whether they used what the relay stops at in the extended protocol
    syncs_done = 0
    # partial-message state, client side
    cbuf = b""                      # an incomplete message we must see whole, or a partial header
    c_skip = 0                      # bytes of a streamed message still to come
    c_discard = False               # ... and they are not forwarded (answered locally)
    release_due = False             # a ReadyForQuery ended everything; release once no partial message is left
    local_error = b""               # the error answered locally to requests that cannot reach a backend
    backend_farewell = ""           # a FATAL the backend sent before going away, held back for the client
    # the read-only retry
    retry_candidate = None          # (bytes, fifo entry, syncs_done, rewrite) of a first statement in flight
    retry_held = None               # the answer to the retry candidate so far, held back from the client
    retry_refused = False           # that answer carries a read-only refusal (25006)
    retry_saved = None              # the candidate of a held refusal, for retry_accepted
    retry_request = None            # bytes the core should send again on the new writer
    pin_keys = None                 # {reason: set of what pinned it (cursor names, channels, settings; None)}
    deferred = None                 # what the requests not yet sent to a backend would do to the session
    settings_before = None          # (client settings, names changed) before this transaction changed them
    tx_undone = False               # ... and the transaction may have been rolled back (an error, ROLLBACK)
    unpinned_in_tx = None           # {reason: (its keys, detail)} before this transaction undid pins
    readback_due = None             # names of settings to read back after the request being read (None: all)
    readback_rows = None            # (name, value) rows of the read-back being answered
    startup_replay_due = False      # RESET ALL / DISCARD ALL: the login's values go again behind the request
    held_ready = None               # the client's ReadyForQuery, held until LOGIN_VALUES is answered
    startup_settings: dict = {}     # unreported settings the client chose at login (never changed in place)
    startup_reported: dict = {}     # reported parameters the client chose at login
    # partial-message state, backend side
    sbuf = b""
    s_skip = 0

    # ------------------------------------------------------------------ relay: client to backend

    @property
    def wants_backend(self) -> bool:
        return True

    def client_data(self, data: bytes) -> tuple[bytes, bytes]:
        """Walk the client's messages; return (bytes for the backend, bytes answered locally)."""
        if not self.cbuf and not self.c_skip and not self.c_discard and not self.discard_until_sync \
                and not self.transaction_lost:
            # The common cases first, with nothing pending from earlier reads: one whole simple Query, or
            # Terminate. They end as the general walk below would end them.
            n = len(data)
            if n > 5 and data[0] == 81 and _unpack_uint32(data, 1)[0] + 1 == n and n <= self.max_message:
                self.release_due = False
                fifo = self.fifo
                if (not self.linked and not fifo and not self.pending_extended
                        and data[5:10].lower().startswith(TRANSACTION_PREFIXES)):
                    answer = self._transaction_locally(data[5:n - 1])
                    if answer is not None:
                        return b"", answer
                fifo.append(CLIENT_QUERY)
                self.requests += 1
                self.unnamed_held = self.unnamed_parsed = False
                self._inspect_sql(data[5:n - 1])
                if self.readback_due is not None or self.startup_replay_due:
                    self.retry_candidate = None
                    return self._follow_up(data), b""
                if (self.retry_read_only and not self.linked and self.tx_status == p.TX_IDLE and len(fifo) == 1
                        and not self.pending_extended and not self._asks_read_only(data)):
                    self.retry_candidate = (data, CLIENT_QUERY, self.syncs_done, None)
                else:
                    self.retry_candidate = None
                return data, b""
            if data == _TERMINATE_MESSAGE:
                self.release_due = False
                self.closing = True
                self.retry_candidate = None
                raise ClientQuit()
        if self.cbuf:
            data = self.cbuf + data
            self.cbuf = b""
        n = len(data)
        pos = self.c_skip
        self.release_due = False
        if pos >= n:
            self.c_skip = pos - n
            return (b"" if self.c_discard else data), b""
        self.c_skip = 0
        fifo = self.fifo
        local = b""
        pieces = None                    # kept slices, when some messages are not forwarded
        keep_from = 0
        drop_from = None                 # start of the run of messages being dropped
        dropped_prefix = self.c_discard
        if dropped_prefix:               # the tail of a message that is answered locally
            self.c_discard = False
            drop_from = 0
        start = pos
        rewrite = False
        forwarded_any = pos > 0          # the tail of a streamed message went through
        syncs_before = self.syncs_sent
        unnamed_parse_end = -1           # where the last Parse of the unnamed statement in this read ends
        while pos < n:
            if n - pos < 5:
                self.cbuf = data[pos:]
                break
            kind = data[pos]
            length = _unpack_uint32(data, pos + 1)[0]
            if length < 4:
                raise ProtocolError("invalid message length", render_error(
                    ErrorKind.PROTOCOL_VIOLATION, f"invalid message length {length}", True))
            if length > self.max_message:
                raise ProtocolError("message too large", render_error(
                    ErrorKind.MESSAGE_TOO_LARGE,
                    f"message of {length} bytes exceeds the proxy's limit of {self.max_message} bytes "
                    "(proxy.max_message_size)", True), ErrorKind.MESSAGE_TOO_LARGE)
            end = pos + 1 + length
            if kind not in _KNOWN_CLIENT:
                raise ProtocolError("unknown message type", render_error(
                    ErrorKind.PROTOCOL_VIOLATION, f"invalid frontend message type {kind}", True))
            if (kind == p.SYNC or kind == p.FLUSH) and not self.linked and not fifo and not self.pending_extended \
                    and not forwarded_any and not self.copy_in:
                # A lone Sync or Flush with nothing pending: the server would answer ReadyForQuery or nothing.
                if drop_from is None:
                    drop_from = pos
                if kind == p.SYNC:
                    local += self._answer_locally(kind)
                pos = end
                continue
            if self.discard_until_sync or self.transaction_lost or kind == p.TERMINATE:
                # Answered here, never forwarded.
                if drop_from is None:
                    drop_from = pos
                local += self._answer_locally(kind)
                if end > n:
                    self.c_skip = end - n
                    self.c_discard = True
                    pos = n
                    break
                pos = end
                continue
            if (kind == p.QUERY and end == n > pos + 5 and not forwarded_any and not self.linked and not fifo
                    and not self.pending_extended and not self.copy_in
                    and data[pos + 5:pos + 10].lower().startswith(TRANSACTION_PREFIXES)):
                # A lone BEGIN (or the COMMIT of one answered here), the last message of this read.
                answer = self._transaction_locally(data[pos + 5:end - 1])
                if answer is not None:
                    if drop_from is None:
                        drop_from = pos
                    local += answer
                    pos = end
                    continue
            forwarded_any = True
            if drop_from is not None:
                if pieces is None:
                    pieces = []
                pieces.append(data[keep_from:drop_from])
                keep_from = pos
                drop_from = None
            if kind in _HEADER_ONLY_CLIENT:
                if kind == p.SYNC:
                    if not self.copy_in:
                        fifo.append(CLIENT_SYNC if self.pending_extended else EMPTY_SYNC)
                        self.requests += 1
                        self.syncs_sent += 1
                    self.pending_extended = False
                elif kind == p.COPY_DATA:
                    pass
                elif kind == p.FUNCTION_CALL:
                    fifo.append(CLIENT_QUERY)
                    self.requests += 1
                elif kind == p.COPY_DONE or kind == p.COPY_FAIL:
                    self.copy_in = False
                elif kind == p.EXECUTE:
                    self.pending_extended = True
                elif kind == p.FLUSH:
                    self.extended_stops += 1
                if end > n:
                    self.c_skip = end - n
                    pos = n
                    break
                pos = end
                continue
            # Query, Parse, Bind, Describe, Close: the body is needed whole.
            if end > n:
                self.cbuf = data[pos:]
                break
            try:
                if kind == p.QUERY:
                    fifo.append(CLIENT_QUERY)
                    self.requests += 1
                    self.unnamed_held = self.unnamed_parsed = False
                    self._inspect_sql(data[pos + 5:end - 1])
                elif kind == p.PARSE:
                    self.pending_extended = True
                    name_end = data.index(b"\x00", pos + 5, end)
                    if name_end == pos + 5:
                        self.unnamed_held = self.unnamed_parsed = True
                        unnamed_parse_end = end
                        if end >= n or data[end] != p.BIND:
                            self.extended_stops += 1        # the relay relays a Parse only with its Bind
                    elif self.virtualize:
                        rewrite = True
                        self.unnamed_parsed = False         # the rewrite may parse the unnamed statement
                        self.extended_stops += 1
                    else:
                        self.extended_stops += 1
                        self._detected(PinReason.PREPARED_STATEMENT, "named prepared statement (Parse)")
                    query_end = data.index(b"\x00", name_end + 1, end)
                    self._inspect_sql(data[name_end + 1:query_end], name_end == pos + 5)
                    if self.statements is not None:
                        rewrite = True
                elif kind == p.BIND:
                    self.pending_extended = True
                    portal_end = data.index(b"\x00", pos + 5, end)
                    statement_end = data.index(b"\x00", portal_end + 1, end)
                    if (portal_end != pos + 5 or statement_end != portal_end + 1 or pos != unnamed_parse_end) and not (
                            portal_end == pos + 5 and pos != unnamed_parse_end and self.statements
                            and data[portal_end + 1:statement_end] in self.statements):
                        # (a Bind of a named statement to the unnamed portal, not right after a Parse: the relay
                        # serves it, relay_statements)
                        self.extended_stops += 1
                    if statement_end == portal_end + 1:
                        self.unnamed_held = False
                        if not self.unnamed_parsed:
                            # Not this client's statement on the backend that gets it (another client's, or none):
                            # bind a name no statement has, so the server answers "does not exist" and skips to
                            # the Sync, as it would with no unnamed statement.
                            if pieces is None:
                                pieces = []
                            pieces.append(data[keep_from:pos])
                            pieces.append(p.message(b"B", data[pos + 5:portal_end + 1] + NOT_PARSED_HERE
                                                    + data[statement_end:end]))
                            keep_from = end
                    elif self.statements is not None:
                        rewrite = True
                else:  # DESCRIBE, CLOSE
                    self.pending_extended = True
                    if data[pos + 5] not in (80, 83) or data[end - 1] != 0:   # 'P' or 'S', NUL-terminated
                        raise ValueError("bad describe/close target")
                    if kind == p.CLOSE or data[pos + 5] == 83 or end - pos > 7:
                        self.extended_stops += 1
                    if kind == p.DESCRIBE and data[pos + 5] == 83 and end - pos == 7 and not self.unnamed_parsed:
                        # The unnamed statement of someone else's (or none), as for Bind above.
                        if pieces is None:
                            pieces = []
                        pieces.append(data[keep_from:pos])
                        pieces.append(p.message(b"D", b"S" + NOT_PARSED_HERE + b"\x00"))
                        keep_from = end
                    if data[pos + 5] == 83 and end - pos > 7 and self.statements is not None:
                        rewrite = True
            except (ValueError, IndexError):
                raise ProtocolError("malformed message", render_error(
                    ErrorKind.PROTOCOL_VIOLATION, f"malformed {chr(kind)!r} message", True)) from None
            pos = end
        forward_end = n - len(self.cbuf)
        if drop_from is not None:
            forward_end = drop_from
        if pieces is None:
            forward = data if (forward_end == n and keep_from == 0) else data[keep_from:forward_end]
        else:
            pieces.append(data[keep_from:forward_end])
            forward = b"".join(pieces)
        if dropped_prefix:
            start = 0                    # the forwarded bytes begin at a message boundary
        if (self.retry_read_only and forward and not self.linked and self.tx_status == p.TX_IDLE and len(fifo) == 1
                and not local and not self.cbuf and not self.c_skip and not self.pending_extended
                and self.readback_due is None and not self.startup_replay_due and not self._asks_read_only(forward)):
            # The first statement of a transaction: if a read-only node refuses it, nothing ran, and it can
            # be sent again to the new writer. Keep what is needed to do that.
            self.retry_candidate = (forward, fifo[0], self.syncs_done,
                                    (start, syncs_before) if rewrite else None)
        else:
            self.retry_candidate = None
        if rewrite and forward:
            if self.linked:
                forward = self._rewrite_statements(forward, start, syncs_before)
            else:
                answered = self._prepare_locally(forward, start)
                if answered:
                    if self.closing:
                        raise ClientQuit(b"", local + answered)
                    return b"", local + answered
                self.deferred_rewrite = (start, syncs_before)
        if ((self.readback_due is not None or self.startup_replay_due) and forward and not self.pending_extended
                and not self.cbuf and not self.c_skip):
            forward = self._follow_up(forward)
        if self.closing:
            raise ClientQuit(forward, local)
        return forward, local

    def _answer_locally(self, kind: int) -> bytes:
        """While the client's requests cannot reach a backend, answer each Sync/Query as a failing server would."""
        if kind == p.TERMINATE:
            self.closing = True
            return b""
        if kind == p.SYNC or kind == p.QUERY or kind == p.FUNCTION_CALL:
            out = self.local_error + (p.READY_IDLE if self.lazy_begin is None else p.READY_IN_TRANSACTION)
            if self.transaction_lost or kind == p.SYNC:
                self.local_error = b""
            self.transaction_lost = False
            self.discard_until_sync = False
            self.tx_status = p.TX_IDLE
            return out
        return b""

    def _inspect_sql(self, sql_bytes, may_read_back: bool = True) -> None:
        if self.settings_before is not None:
            # In a transaction that changed tracked settings: a ROLLBACK (to a savepoint too) may undo them.
            low = bytes(sql_bytes).lower()
            if low.find(b"rollback") >= 0 or low.find(b"abort") >= 0:
                self.tx_undone = True
        if not might_pin(sql_bytes):
            return
        low = bytes(sql_bytes).lower()
        if not self.owns_read_only and (READ_ONLY_WORDS.search(low) or low.find(b"reset") >= 0
                                        or low.find(b"discard") >= 0):
            self.owns_read_only = True
            self.state_generation += 1
        if (b"discard" in low or b"deallocate" in low) and self.statements is not None:
            # The client dropped statements itself: forget them and what the backend was thought to hold.
            if self.server_state is not None:
                self.server_state.prepared.clear()
            if b"deallocate" in low or b"all" in low:
                self.statements.clear()
                self.state_generation += 1
        statement = None
        for effect in analyze(bytes(sql_bytes).decode("utf-8", "replace")):
            if (effect[0] == "discard" or effect == ("reset", None)) and (self.startup_settings or self.startup_reported):
                self.startup_replay_due = True
            if effect[0] == "readback":
                if may_read_back and low.find(b"copy") < 0:
                    self._want_readback(effect[1])
                else:
                    # A named statement runs later, maybe many times; a COPY would take the read-back as data.
                    self._effect(("pin", PinReason.SESSION_VARIABLE, f"SET {effect[1] or 'by set_config'}", effect[1]))
                continue
            if effect[0] == "pin":
                # The statement itself, for the admin console's SHOW PINS (only statements that pin get here).
                if statement is None:
                    statement = bytes(sql_bytes[:STATEMENT_SHOWN]).decode("utf-8", "replace").strip()
                effect = effect + (statement,)
            self._effect(effect)

    def _detected(self, reason: PinReason, detail: str) -> None:
        self._effect(("pin", reason, detail, None))

    def _effect(self, effect: tuple) -> None:
        """Apply what a request does to the session (see pinning.analyze) once it goes to a backend: before
        that, keep it; a request that never reaches one (fail_pending) changes nothing."""
        if not self.linked:
            deferred = self.deferred
            if deferred is None:
                deferred = self.deferred = []
            elif effect in deferred:
                deferred.remove(effect)    # the last occurrence decides: a repeating client holds each once
            deferred.append(effect)
            return
        kind = effect[0]
        self.state_generation += 1
        if kind == "pin":
            self._pin(effect[1], effect[2], effect[3], effect[4] if len(effect) > 4 else "")
        elif kind == "unpin":
            self._unpin(effect[1], effect[2])
        elif kind == "set":
            self._track_setting(effect[1], effect[2])
        elif kind == "reset":
            self._track_setting(effect[1], None)
            if effect[1] is None:          # RESET ALL: back to the login's values (startup_replay_due)
                self.client_settings = {**self.startup_settings, **self.client_settings}
        else:                              # DISCARD ALL
            self._track_setting(None, None, identity=True)
            self.client_settings = dict(self.startup_settings)

    def _apply_deferred(self) -> None:
        deferred, self.deferred = self.deferred, None
        for effect in deferred:
            self._effect(effect)

    def _pin(self, reason: PinReason, detail: str, key, statement: str = "") -> None:
        if self.ctx.pin_policy.detected(self, reason, detail, statement):
            if not self.pinned:
                self.pinned = True
            if self.pin_keys is None:
                self.pin_keys = {}
            self.pin_keys.setdefault(reason, set()).add(key)
            # The first detail per reason: a pinned client repeating SET would otherwise grow the list forever.
            if all(known is not reason for known, _ in self.pin_details):
                self.pin_details.append((reason, detail))

    def _unpin(self, reason: PinReason, key) -> None:
        """The client undid (some of) what pinned it for `reason`: unpin when nothing else holds it."""
        keys = self.pin_keys.get(reason) if self.pin_keys else None
        if not keys:
            return
        # Until the transaction is known to have committed: a failed or rolled-back CLOSE/UNLISTEN/... may have
        # undone nothing, and then the pin comes back (see _settings_settled).
        if self.settings_before is None:
            self.settings_before = (self.client_settings, set())
        if self.unpinned_in_tx is None:
            self.unpinned_in_tx = {}
        if reason not in self.unpinned_in_tx:
            detail = next((d for known, d in self.pin_details if known is reason), reason.value)
            self.unpinned_in_tx[reason] = (set(keys), detail)
        if key is None:
            keys.clear()
        elif key == ALL_BUT_IDENTITY:
            keys.intersection_update(_IDENTITY_KEYS)
        else:
            keys.discard(key)
        if keys:
            return
        del self.pin_keys[reason]
        self.pin_details[:] = [(known, detail) for known, detail in self.pin_details if known is not reason]
        self.pinned = self.ctx.pin_policy.released(self, reason)

    def _track_setting(self, name: str, value, identity: bool = False) -> None:
        """The client set (value) or reset (None; name None: RESET ALL, which keeps the session identity unless
        `identity`: DISCARD ALL) an unreported setting on its backend: tracked, so that it is replayed on the
        next backend; the linked backend has it already."""
        def changed(settings: dict) -> dict:
            if name is None:
                if identity:
                    return {}
                return {low: value for low, value in settings.items() if low in _IDENTITY_KEYS}
            settings = dict(settings)
            if value is None:
                settings.pop(name, None)
            else:
                settings[name] = value
            return settings
        if self.settings_before is None:
            self.settings_before = (self.client_settings, set())
        touched = self.settings_before[1]
        if name is None:
            touched.update(self.client_settings)
            if self.server_state is not None:
                touched.update(self.server_state.settings)
        else:
            touched.add(name)
        self.client_settings = changed(self.client_settings)
        self.state_generation += 1
        if self.server_state is not None:
            self.server_state.settings = changed(self.server_state.settings)
        if self.pending_settings is not None:
            self.pending_settings = changed(self.pending_settings)

    def _settings_settled(self) -> None:
        """The transaction that changed tracked settings ended (ReadyForQuery, idle). Rolled back (or maybe:
        an error, ROLLBACK, ABORT): the server undid them, so the client's tracked settings go back, and the
        backend's, being unknown, are marked so that the next link sets or resets each of them."""
        before, touched = self.settings_before
        self.settings_before = None
        unpinned, self.unpinned_in_tx = self.unpinned_in_tx, None
        if not self.tx_undone:
            return
        self.tx_undone = False
        if unpinned:
            for reason, (keys, detail) in unpinned.items():
                self._pin(reason, detail, None)
                self.pin_keys[reason] = set(keys)
        self.client_settings = before
        self.state_generation += 1
        if self.server_state is not None:
            self.server_state.settings = {**self.server_state.settings, **dict.fromkeys(touched, UNKNOWN_SETTING)}
        if self.pending_settings is not None:
            self.pending_settings = {**self.pending_settings, **dict.fromkeys(touched, UNKNOWN_SETTING)}

    # ------------------------------------------------------------------ relay: backend to client

    def backend_data(self, data: bytes) -> tuple[bytes, bool]:
        """Walk the backend's messages; return (bytes for the client, whether the backend may be released)."""
        if self.retry_held is not None and self.retry_candidate is None:
            # The client sent more before the held answer ended (the candidate is gone): it is not retried.
            held = b"".join(self.retry_held)
            self.retry_held = None
            self.retry_refused = False
            out, release = self.backend_data(data)
            return held + out, release
        if self.sbuf:
            data = self.sbuf + data
            self.sbuf = b""
        n = len(data)
        pos = self.s_skip
        if pos >= n:
            self.s_skip = pos - n
            if self.release_due and not self.s_skip:
                self.release_due = False
                return data, True
            return data, False
        self.s_skip = 0
        fifo = self.fifo
        saw_ready = False
        out_parts = None           # set when some messages are swallowed
        parse_fifo = self.parse_fifo
        inspect = _INSPECT_BACKEND_VIRTUAL if parse_fifo else _INSPECT_BACKEND
        keep_from = 0
        begin_answer = self.begin_answer
        if self.retry_candidate is None and fifo and fifo[0] > 0 and not begin_answer:
            # Messages nobody needs to look at (row descriptions, rows, command tags) are passed over
            # here; only the inspected kinds (ReadyForQuery, errors, ...) change what this skip depends on.
            while n - pos >= 5 and data[pos] not in inspect:
                end = pos + 1 + _unpack_uint32(data, pos + 1)[0]
                if end > n:
                    break
                pos = end
        while pos < n:
            if n - pos < 5:
                self.sbuf = data[pos:]
                break
            kind = data[pos]
            length = _unpack_uint32(data, pos + 1)[0]
            end = pos + 1 + length
            internal = fifo and fifo[0] <= 0
            drop = False
            candidate = self.retry_candidate
            if kind in inspect or internal or candidate is not None or begin_answer:
                if end > n:
                    self.sbuf = data[pos:]
                    break
                if begin_answer and not internal:
                    # The answer to the BEGIN the proxy sent in front of the client's request.
                    begin_answer = self._begin_answered(kind)
                    if begin_answer or kind != p.ERROR_RESPONSE:
                        if out_parts is None:
                            out_parts = []
                        out_parts.append(data[keep_from:pos])
                        keep_from = end
                        pos = end
                        continue
                hold = False
                if candidate is not None and not internal:
                    # The answer to a first statement that a read-only node may refuse: hold its opening
                    # messages until the answer shows whether it is a refusal.
                    if self.retry_refused or kind in _ANSWER_PREFIX or (
                            kind == p.ERROR_RESPONSE and b"C25006\x00" in data[pos + 5:end]):
                        hold = True
                        if kind == p.ERROR_RESPONSE:
                            self.retry_refused = True
                    else:
                        # Rows, a command tag or another error: the statement ran; nothing to retry.
                        self.retry_candidate = None
                        if self.retry_held:
                            if out_parts is None:
                                out_parts = []
                            out_parts.append(data[keep_from:pos])
                            out_parts.append(b"".join(self.retry_held))
                            keep_from = pos
                        self.retry_held = None
                        if kind not in inspect:
                            pos = end
                            continue
                if kind == p.READY_FOR_QUERY:
                    self.retry_candidate = None
                    self.tx_status = data[pos + 5]
                    if self.settings_before is not None and not internal:
                        if self.tx_status == p.TX_IDLE:
                            self._settings_settled()
                        elif self.tx_status != p.TX_IN_TRANSACTION:
                            self.tx_undone = True       # a failed transaction block
                    saw_ready = True
                    self.copy_in = False
                    answered = fifo.popleft() if fifo else None
                    if answered == CLIENT_SYNC or answered == EMPTY_SYNC:
                        self.syncs_done += 1
                        if parse_fifo:
                            self._parses_unanswered(self.syncs_done)
                    elif answered == INTERNAL:
                        self._internal_done()
                    elif answered == READBACK:
                        self._read_back()
                    if fifo and fifo[0] == LOGIN_VALUES and answered is not None and answered > 0:
                        self.held_ready = data[pos:end]
                        drop = True
                elif kind == p.PARSE_COMPLETE:
                    if parse_fifo and not internal:
                        drop = parse_fifo.popleft()[1]
                elif kind == p.PARAMETER_STATUS:
                    self._parameter_status(data, pos + 5, end, internal and fifo[0] == BACKEND_RESET)
                elif kind == p.DATA_ROW and internal and fifo[0] == READBACK:
                    self._read_back_row(data, pos + 5, end)
                elif kind == p.COPY_IN_RESPONSE:
                    self.copy_in = True
                    # A Sync sent with the COPY's Execute reaches the server in copy-in mode, which ignores it.
                    if fifo and (fifo[0] == CLIENT_SYNC or fifo[0] == EMPTY_SYNC):
                        fifo.popleft()
                        self.syncs_done += 1
                    elif len(fifo) > 1 and fifo[1] == BEGIN_SYNC:
                        del fifo[1]              # so is the Sync the proxy sent behind a lazily begun COPY
                elif kind == ord("W"):
                    self.copy_in = True
                elif kind == p.ERROR_RESPONSE:
                    self.copy_in = False     # a failed COPY ends copy-in mode on the server's side
                    if internal:
                        if fifo[0] == READBACK:
                            self.readback_rows = None   # nothing known: the request's transaction has failed
                        elif fifo[0] == INTERNAL:
                            self.internal_failed = True
                    elif self.settings_before is not None:
                        self.tx_undone = True
                    if internal or hold:
                        pass
                    elif data[pos + 5:pos + 12] == b"SFATAL\x00" or data[pos + 5:pos + 12] == b"SPANIC\x00":
                        # The backend is going away (shutdown, crash, failover). Keep the client: hold the
                        # message back; backend_lost() answers the pending requests with it as an ERROR.
                        self.backend_farewell = p.parse_fields(data[pos + 5:end]).get("M", "")
                        drop = True
                if drop:
                    if out_parts is None:
                        out_parts = []
                    out_parts.append(data[keep_from:pos])
                    keep_from = end
                elif hold:
                    if out_parts is None:
                        out_parts = []
                    out_parts.append(data[keep_from:pos])
                    keep_from = end
                    if self.retry_held is None:
                        self.retry_held = []
                    self.retry_held.append(data[pos:end])
                    if kind == p.READY_FOR_QUERY:
                        # The whole refusal is here: the core probes the node and calls retry_declined or
                        # retry_accepted. Nothing after it is this answer's.
                        self.retry_saved = candidate
                        self.retry_request = candidate[0]
                        self.retry_refused = False
                        pos = end
                        if pos < n:
                            self.sbuf = data[pos:]
                        break
                elif internal:
                    # Swallow the proxy's own request's response; ParameterStatus still reaches the client.
                    if out_parts is None:
                        out_parts = []
                    out_parts.append(data[keep_from:pos])
                    if kind == p.PARAMETER_STATUS and fifo[0] != BACKEND_RESET:
                        out_parts.append(data[pos:end])
                    elif kind == p.ERROR_RESPONSE and (fifo[0] == INTERNAL or fifo[0] == LOGIN_VALUES):
                        out_parts.append(self._replay_failed(data[pos + 5:end]))
                    elif kind == p.READY_FOR_QUERY and self.held_ready is not None:
                        out_parts.append(self.held_ready)
                        self.held_ready = None
                    elif kind == p.ERROR_RESPONSE and fifo[0] == BACKEND_RESET:
                        out_parts.append(self._reset_failed(data[pos + 5:end]))
                    keep_from = end
            elif end > n:
                self.s_skip = end - n
                pos = n
                break
            pos = end
        forward_end = n - len(self.sbuf)
        if out_parts is not None:
            out_parts.append(data[keep_from:forward_end])
            out = b"".join(out_parts)
        else:
            out = data if forward_end == n else data[:forward_end]
        if saw_ready and not fifo and self.tx_status == p.TX_IDLE and not self.pending_extended and not self.unnamed_held:
            self.release_due = True
        if self.retry_request is not None:
            return out, HELD_REFUSAL
        release = self.release_due and not self.sbuf and not self.s_skip
        if release:
            self.release_due = False
        return out, release

    def retry_declined(self) -> tuple[bytes, bool]:
        """The node is still the writer: the client gets the held refusal as the server sent it."""
        out = b"".join(self.retry_held or ())
        self.retry_held = None
        self.retry_request = self.retry_saved = None
        release = self.release_due and not self.sbuf and not self.s_skip
        if release:
            self.release_due = False
        return out, release

    def retry_accepted(self) -> bytes:
        """Put the refused request back as it was before it was sent; the core sends it to the new writer."""
        forward, entry, syncs_done, rewrite = self.retry_saved
        self.retry_saved = self.retry_request = self.retry_held = None
        self.fifo.clear()
        self.fifo.append(entry)
        self.syncs_done = syncs_done
        self.tx_status = p.TX_IDLE
        self.deferred_rewrite = rewrite
        self.unnamed_resent = self.unnamed_parsed      # the core unlinks, then sends `forward` to the writer
        self.release_due = False
        self.sbuf = b""
        self._begin_again()
        return forward

    def unlink(self) -> None:
        self.linked = False
        self.unnamed_parsed, self.unnamed_resent = self.unnamed_resent, False
        self.retry_held = None
        self.retry_refused = False
        self.release_due = False
        self.pending_settings = None
        self.internal_failed = False
        self.server_state = None
        self.server_params = None
        self.parse_fifo.clear()
        self.readback_rows = None
        self.begin_answer = 0
        self.begun_lazily = None
        self.held_ready = None
        self.sbuf = b""
        self.s_skip = 0

    def awaiting_answer(self) -> bool:
        """A request sent waits for its ReadyForQuery (query_timeout, idle timeouts)."""
        return bool(self.fifo)

    def transaction_open(self) -> bool:
        """Inside a transaction, the proxy's own lazy BEGIN included, or mid COPY or extended query."""
        return not self.is_clean() or getattr(self, "lazy_begin", None) is not None

    def is_clean(self) -> bool:
        """Nothing outstanding, no transaction, no COPY, no half message: the backend could serve someone else."""
        return (not self.fifo and self.tx_status == p.TX_IDLE and not self.pending_extended and not self.copy_in
                and not self.sbuf and not self.s_skip and not self.cbuf and not self.c_skip)

    # ------------------------------------------------------------------ failures

    def fail_pending(self, kind: ErrorKind, message: str) -> bytes:
        """The last client_data could not reach a backend: answer each of its requests with the error, as a
        server would answer each Sync-terminated segment of a pipeline."""
        error = render_error(kind, message, fatal=False)
        out = [p.READY_IDLE if entry == EMPTY_SYNC else error + p.READY_IDLE for entry in self.fifo if entry > 0]
        self.fifo.clear()
        self.readback_due = None
        self.startup_replay_due = False
        self.lazy_begin = None          # its status answer says the transaction is gone: it is
        self.deferred = None            # nothing it asked for happened: no pin, no tracked setting
        out.append(self._forget_unanswerable(error))
        return b"".join(out)

    def _forget_unanswerable(self, error: bytes) -> bytes:
        """Extended-protocol messages not yet closed by a Sync fail now, as on a server; the rest of that
        segment is dropped and its Sync answered locally. Half a message still to come is dropped too."""
        self.tx_status = p.TX_IDLE
        reply = b""
        if self.pending_extended:
            self.discard_until_sync = True
            self.pending_extended = False
            reply = error
        if self.c_skip:
            self.c_discard = True
        self.unnamed_held = self.unnamed_parsed = False     # a Parse not sent parsed nothing
        self.copy_in = False
        self.deferred_rewrite = None
        return reply

    def backend_lost(self, message: str) -> tuple[bytes, bool]:
        """The linked backend died. Returns (bytes for the client, whether the client must be closed)."""
        if self.backend_farewell:
            message += f"; the server said: {self.backend_farewell}"
            self.backend_farewell = ""
        mid_message = bool(self.sbuf or self.s_skip)
        held_ready = self.held_ready         # a request answered but for its ReadyForQuery (LOGIN_VALUES)
        session_state_lost = self.pinned
        if self.settings_before is not None:
            self.tx_undone = True            # the transaction that changed settings died with the backend
            self._settings_settled()
        self.unlink()
        if mid_message or session_state_lost or self.copy_in:
            return render_error(ErrorKind.BACKEND_LOST, message + (
                "; your session's state was lost with it, reconnect" if session_state_lost else ""), fatal=True), True
        error = render_error(ErrorKind.BACKEND_LOST, message + "; the transaction was rolled back, retry it", fatal=False)
        out = [p.READY_IDLE if entry == EMPTY_SYNC else error + p.READY_IDLE for entry in self.fifo if entry > 0]
        if held_ready is not None:
            out.insert(0, held_ready)
        if not any(entry > 0 for entry in self.fifo) and self.tx_status != p.TX_IDLE:
            self.transaction_lost = True
            self.local_error = error
        self.fifo.clear()
        out.append(self._forget_unanswerable(error))
        return b"".join(out), False
