"""Named prepared statements, virtualised: a client's statement names map to global names shared on the backends.

Every client preparing the same text with the same parameter types uses one backend-side statement
(`global_statement_name`). A Parse of a named statement is recorded and prepared on whichever backend later
needs it; Bind, Describe and Close are rewritten to the global name, with a Parse injected where the backend
lacks it (its ParseComplete is dropped on the way back: the relay's `parse_fifo`). A lone Parse...Sync while
unlinked is answered locally.
"""
from __future__ import annotations

import hashlib

from . import protocol as p
from .relay import CLIENT_SYNC

# A name no statement ever has: closing it answers CloseComplete in order and touches nothing.
CLOSED_STATEMENT = b"multiproxy_closed_statement"
_STATEMENT_MESSAGES = frozenset((p.PARSE, p.BIND, p.DESCRIBE, p.CLOSE))
_unpack_uint32 = p.UINT32.unpack_from


def global_statement_name(parse_rest: bytes) -> bytes:
    """The backend-side name shared by every client preparing the same text with the same parameter types."""
    return b"mp_" + hashlib.blake2b(parse_rest, digest_size=10).hexdigest().encode()


def _parse_message(name: bytes, rest: bytes) -> bytes:
    return b"P" + p.UINT32.pack(len(name) + 1 + len(rest) + 4) + name + b"\x00" + rest



class Statements:
    """Mixin of PostgresClient: statement virtualisation. PostgresClient.__init__ creates `parse_fifo`, one
    (sync group, injected by the proxy, global name prepared by it or None) per Parse sent, and `virtualize`."""

    statements: dict | None = None  # named prepared statements, virtualised: client name -> (global name, Parse body)
    deferred_rewrite = None         # (start, sync group) of client bytes to rewrite once a backend is linked

    def _prepare_locally(self, data: bytes, start: int) -> bytes:
        """Answer a lone `Parse(named)… Sync` (libpq's PQprepare) without a backend.

        The statement is only recorded; whichever backend later serves a Bind or Describe of it gets it
        prepared there. So a client that prepares while others hold every backend does not wait (pgbench
        prepares synchronously inside its event loop, and would otherwise stall all its clients). An
        error in the statement's text is then reported by the Bind or Describe instead of the Parse.
        """
        if (start or self.tx_status != p.TX_IDLE or len(self.fifo) != 1 or self.fifo[0] != CLIENT_SYNC
                or self.c_skip or self.cbuf):
            return b""
        parses = []
        pos, n = 0, len(data)
        while pos < n:
            kind = data[pos]
            end = pos + 1 + _unpack_uint32(data, pos + 1)[0]
            if kind == p.SYNC and end == n and parses:
                break
            if kind != p.PARSE:
                return b""
            name_end = data.index(b"\x00", pos + 5, end)
            if name_end == pos + 5:
                return b""
            parses.append((data[pos + 5:name_end], data[name_end + 1:end]))
            pos = end
        else:
            return b""
        if self.statements is None:
            self.statements = {}
        for name, rest in parses:
            self.statements[name] = (global_statement_name(rest), rest)
        self.state_generation += 1
        self.fifo.clear()
        self.syncs_done += 1             # the Sync is answered here; keep Parse groups aligned
        self.pending_extended = False
        return b"1\x00\x00\x00\x04" * len(parses) + (p.READY_IDLE if self.lazy_begin is None else p.READY_IN_TRANSACTION)

    def _rewrite_statements(self, data: bytes, start: int, group: int) -> bytes:
        """Map the client's statement names to global ones on the linked backend, preparing them there if needed.

        A named Parse becomes Parse of the global name, or, when the backend already has it, a Parse of the
        unnamed statement (so the client still receives a genuine ParseComplete in order). Bind and
        Describe use the global name and are preceded by an injected Parse when the backend lacks it (its
        ParseComplete is dropped on the way back). Close of a named statement closes a name nobody uses,
        which answers CloseComplete without dropping a statement other clients share.
        """
        if self.statements is None:
            self.statements = {}
        prepared = self.server_state.prepared
        statements = self.statements
        parse_fifo = self.parse_fifo
        out = [data[:start]]
        pos = start
        n = len(data)
        while pos < n:
            if n - pos < 5:
                out.append(data[pos:])
                break
            kind = data[pos]
            end = pos + 1 + _unpack_uint32(data, pos + 1)[0]
            if end > n or kind not in _STATEMENT_MESSAGES:
                if kind == p.SYNC:
                    group += 1
                out.append(data[pos:end])
                pos = end
                continue
            body_start = pos + 5
            if kind == p.PARSE:
                name_end = data.index(b"\x00", body_start, end)
                rest = data[name_end + 1:end]
                if name_end == body_start:
                    parse_fifo.append((group, False, None))
                    out.append(data[pos:end])
                else:
                    gname = global_statement_name(rest)
                    statements[data[body_start:name_end]] = (gname, rest)
                    self.state_generation += 1
                    if gname in prepared:
                        parse_fifo.append((group, False, None))
                        out.append(_parse_message(b"", rest))
                    else:
                        prepared.add(gname)
                        parse_fifo.append((group, False, gname))
                        out.append(_parse_message(gname, rest))
            elif kind == p.BIND:
                portal_end = data.index(b"\x00", body_start, end)
                name_end = data.index(b"\x00", portal_end + 1, end)
                entry = statements.get(data[portal_end + 1:name_end])
                if entry is None:
                    out.append(data[pos:end])
                else:
                    gname, rest = entry
                    if gname not in prepared:
                        prepared.add(gname)
                        parse_fifo.append((group, True, gname))
                        out.append(_parse_message(gname, rest))
                    payload = data[body_start:portal_end + 1] + gname + data[name_end:end]
                    out.append(b"B" + p.UINT32.pack(len(payload) + 4) + payload)
            else:  # DESCRIBE or CLOSE
                target = data[body_start]
                name = data[body_start + 1:end - 1]
                entry = statements.get(name) if target == 83 else None
                if entry is None:
                    out.append(data[pos:end])
                elif kind == p.CLOSE:
                    del statements[name]
                    self.state_generation += 1
                    out.append(p.message(b"C", b"S" + CLOSED_STATEMENT + b"\x00"))
                else:
                    gname, rest = entry
                    if gname not in prepared:
                        prepared.add(gname)
                        parse_fifo.append((group, True, gname))
                        out.append(_parse_message(gname, rest))
                    out.append(p.message(b"D", b"S" + gname + b"\x00"))
            pos = end
        return b"".join(out)

    def _parses_unanswered(self, syncs_done: int) -> None:
        """Parses of finished Sync groups that got no ParseComplete failed: the backend lacks those statements."""
        parse_fifo = self.parse_fifo
        prepared = self.server_state.prepared if self.server_state is not None else set()
        while parse_fifo and parse_fifo[0][0] < syncs_done:
            gname = parse_fifo.popleft()[2]
            if gname is not None:
                prepared.discard(gname)
