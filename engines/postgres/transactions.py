"""Idle transactions hold no backend: a BEGIN the proxy answers itself and sends with the first statement.

A client that opens a transaction and then waits (JDBC-style autocommit off, psycopg, SQLAlchemy sessions) would
hold a backend for nothing. While no backend is linked, a simple Query that is only BEGIN / START TRANSACTION
(with its modes) is answered here: CommandComplete and ReadyForQuery 'T'. Its text goes, verbatim, in front of
the next request that needs a backend, as Parse/Bind/Execute of the unnamed statement with no Sync of its own,
so that if it fails the server skips the client's request up to its Sync and the client gets the BEGIN's error
for that request, in order. A simple Query (or FunctionCall) behind it is followed by a Sync of the proxy's, as
the server skips a simple Query too after an error in an extended-protocol segment. COMMIT/END/ROLLBACK/ABORT
while nothing was sent are answered here as well (AND CHAIN keeps the transaction begun).

The extended-protocol form of a lone BEGIN (pg8000's Parse+Sync, Describe+Sync, Bind+Execute+Sync) is sent to a
backend as before: it takes three round trips of its own and holds the unnamed statement in between.
"""
from __future__ import annotations

import re

from . import protocol as p
from .relay import BEGIN_SYNC, INTERNAL

_MODE = r"(?:isolation\s+level\s+(?:serializable|repeatable\s+read|read\s+committed|read\s+uncommitted)" \
        r"|read\s+only|read\s+write|(?:not\s+)?deferrable)"
_BEGIN = re.compile(r"(?:(?P<begin>begin)(?:\s+(?:work|transaction))?|start\s+transaction)"
                    r"(?:\s+" + _MODE + r"(?:\s*,\s*" + _MODE + r"|\s+" + _MODE + r")*)?\s*;?\s*",
                    re.IGNORECASE)
_END = re.compile(r"(?P<verb>commit|end|rollback|abort)(?:\s+(?:work|transaction))?"
                  r"(?:\s+and\s+(?P<no>no\s+)?chain)?\s*;?\s*", re.IGNORECASE)
_SYNC_MESSAGE = b"S\x00\x00\x00\x04"
_EXECUTE_ALL = b"E\x00\x00\x00\x09\x00\x00\x00\x00\x00"
_BIND_UNNAMED = b"B\x00\x00\x00\x0c\x00\x00\x00\x00\x00\x00\x00\x00"
_SIMPLE_REQUESTS = (p.QUERY, p.FUNCTION_CALL)
_unpack_uint32 = p.UINT32.unpack_from
# Messages of a successful BEGIN sent as Parse/Bind/Execute: ParseComplete, BindComplete, CommandComplete.
_BEGIN_ANSWER = frozenset((p.PARSE_COMPLETE, p.BIND_COMPLETE, p.COMMAND_COMPLETE))


def _command_complete(tag: bytes) -> bytes:
    return p.message(b"C", tag + b"\x00")


class LazyTransaction:
    """Mixin of PostgresClient: the transaction a client began while it held no backend."""

    lazy_begin: bytes | None = None     # the text of a BEGIN answered here and not sent yet
    begun_lazily: bytes | None = None   # ... sent with the current link (the read-only retry sends it again)
    begin_answer = 0                    # messages of that BEGIN's answer still to swallow

    def _transaction_locally(self, sql) -> bytes | None:
        """Answer a BEGIN (no transaction yet) or a COMMIT/ROLLBACK (begun here, nothing sent) here, or None."""
        text = bytes(sql).decode("utf-8", "replace").strip()
        begin = _BEGIN.fullmatch(text)
        if self.lazy_begin is None:
            if begin is None or self.pending_extended:
                return None
            self.lazy_begin = bytes(sql)
            self.requests += 1
            return _command_complete(b"BEGIN" if begin.group("begin") else b"START TRANSACTION") \
                + p.READY_IN_TRANSACTION
        self.requests += 1
        if begin is not None:
            # As the server answers a BEGIN inside a transaction block.
            return (p.notice_response("25001", "there is already a transaction in progress", "WARNING")
                    + _command_complete(b"BEGIN" if begin.group("begin") else b"START TRANSACTION")
                    + p.READY_IN_TRANSACTION)
        end = _END.fullmatch(text)
        if end is None:
            self.requests -= 1
            return None
        verb = end.group("verb").lower()
        tag = b"ROLLBACK" if verb in ("rollback", "abort") else b"COMMIT"
        if text.lower().rstrip("; \t\r\n").endswith("chain") and end.group("no") is None:
            return _command_complete(tag) + p.READY_IN_TRANSACTION   # the chained transaction: begun here again
        self.lazy_begin = None
        return _command_complete(tag) + p.READY_IDLE

    def _begin_with(self, data: bytes) -> bytes:
        """The client's bytes behind the BEGIN answered earlier (see the module docstring)."""
        begin, self.lazy_begin = self.lazy_begin, None
        self.begun_lazily = begin
        kind = data[0]
        if kind in _SIMPLE_REQUESTS:
            first_end = 1 + _unpack_uint32(data, 1)[0]
            if first_end > len(data):
                # A FunctionCall still streaming in: BEGIN goes as a request of its own.
                self.fifo.appendleft(INTERNAL)
                return p.query(begin.decode("utf-8", "replace")) + data
            self.fifo.insert(1, BEGIN_SYNC)                # answered right after the client's request
            data = data[:first_end] + _SYNC_MESSAGE + data[first_end:]
        self.begin_answer = 3
        parse = p.message(b"P", b"\x00" + begin + b"\x00\x00\x00")
        return parse + _BIND_UNNAMED + _EXECUTE_ALL + data

    def _begin_answered(self, kind: int) -> int:
        """One message of the BEGIN's answer arrived: how many are still to swallow. An error means the BEGIN
        failed: the server skips the client's request, and the error is the client's answer to it."""
        if kind in _BEGIN_ANSWER:
            self.begin_answer -= 1
        elif kind == p.ERROR_RESPONSE:
            self.begin_answer = 0
            self.begun_lazily = None
            try:
                self.fifo.remove(BEGIN_SYNC)               # the server's skip ends at that Sync: one answer
            except ValueError:
                pass
        return self.begin_answer

    def _begin_again(self) -> None:
        """The request sent behind a lazily begun transaction goes to another backend: begin there too."""
        if self.begun_lazily is not None:
            self.lazy_begin, self.begun_lazily = self.begun_lazily, None
            self.begin_answer = 0
