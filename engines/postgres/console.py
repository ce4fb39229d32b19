"""The admin console's PostgreSQL wire side, sans-IO: simple queries in, RowDescription/DataRow/CommandComplete out.

The views and commands are the core's (multiproxy.admin); this module only frames them, as PgBouncer's console
does: one command per Query message, every answer followed by ReadyForQuery, errors as ErrorResponse with a
SQLSTATE. The extended protocol (Parse/Bind/Execute) is refused with an error until the next Sync.
"""
from __future__ import annotations

from multiproxy.engine import AdminConsole, ClientQuit, ProtocolError

from . import protocol as p

# PostgreSQL type names -> (type OID, type length)
TYPES = {"text": (25, -1), "int4": (23, 4), "int8": (20, 8), "numeric": (1700, -1), "bool": (16, 1),
         "float8": (701, 8)}
SQLSTATES = {"syntax_error": "42601", "insufficient_privilege": "42501", "undefined_object": "42704",
             "invalid_parameter": "22023", "feature_not_supported": "0A000", "internal_error": "XX000"}
EXTENDED = frozenset(b"PBDEHCFdcf")     # Parse, Bind, Describe, Execute, Flush, Close, FunctionCall, COPY data
GREETING_PARAMETERS = (("server_version", None), ("server_encoding", "UTF8"), ("client_encoding", "UTF8"),
                       ("DateStyle", "ISO"), ("integer_datetimes", "on"), ("standard_conforming_strings", "on"),
                       ("TimeZone", "UTC"), ("IntervalStyle", "postgres"), ("is_superuser", "off"))
MAX_QUERY = 1 << 20
_READY = p.ready_for_query()
_ONLY_SIMPLE = ("the admin console takes simple queries only (Query messages: psql, or a driver's simple-query "
                "mode, e.g. psycopg's execute without parameters); the extended protocol (Parse/Bind/Execute) is "
                "not served")


def row_description(columns: list) -> bytes:
    out = [p.INT16.pack(len(columns))]
    for name, type_name in columns:
        oid, size = TYPES.get(type_name, TYPES["text"])
        out.append(p.cstring(name) + p.INT32.pack(0) + p.INT16.pack(0) + p.INT32.pack(oid) + p.INT16.pack(size)
                   + p.INT32.pack(-1) + p.INT16.pack(0))
    return p.message(b"T", b"".join(out))


def _text(value) -> bytes | None:
    if value is None:
        return None
    if value is True or value is False:
        return b"t" if value else b"f"
    return str(value).encode("utf-8")


def data_row(values: list) -> bytes:
    out = [p.INT16.pack(len(values))]
    for value in values:
        data = _text(value)
        if data is None:
            out.append(p.INT32.pack(-1))
        else:
            out.append(p.INT32.pack(len(data)) + data)
    return p.message(b"D", b"".join(out))


def command_complete(tag: str) -> bytes:
    return p.message(b"C", p.cstring(tag))


class PostgresConsole(AdminConsole):
    """One console client: frames the core's console answers in protocol 3.0."""

    def __init__(self, cancel_key):
        self.cancel_key = cancel_key
        self.buf = bytearray()
        self.skipping = False          # after an extended-protocol message: discard until Sync, as a server does

    def greeting(self, server_version: str) -> bytes:
        out = [p.authentication(p.AUTH_OK)]
        for name, value in GREETING_PARAMETERS:
            out.append(p.parameter_status(name, server_version if value is None else value))
        pid, secret = self.cancel_key
        out.append(p.backend_key_data(pid, secret))
        out.append(_READY)
        return b"".join(out)

    def requests(self, data: bytes) -> list:
        buf = self.buf
        buf += data
        items: list = []
        while len(buf) >= 5:
            kind = buf[0]
            length = p.UINT32.unpack_from(buf, 1)[0]
            if length < 4 or length > MAX_QUERY:
                raise ProtocolError(f"console: bad message length {length}", p.error_response(
                    "08P01", f"invalid message length {length}", "FATAL"))
            if len(buf) < 1 + length:
                break
            body = bytes(buf[5:1 + length])
            del buf[:1 + length]
            if kind == p.TERMINATE:
                raise ClientQuit()
            if kind == p.SYNC:
                self.skipping = False
                items.append(_READY)
            elif self.skipping:
                continue
            elif kind == p.QUERY:
                text = body.rstrip(b"\x00").decode("utf-8", "replace")
                statements = [part for part in text.split(";") if part.strip()]
                if not statements:
                    items.append(p.message(b"I") + _READY)          # EmptyQueryResponse
                elif len(statements) > 1:
                    items.append(self.failure("feature_not_supported", "the admin console takes one command per "
                                              "query; send them one at a time"))
                else:
                    items.append(statements[0])
            elif kind in EXTENDED:
                self.skipping = True
                items.append(p.error_response("0A000", _ONLY_SIMPLE))
            else:
                items.append(p.error_response("08P01", f"unexpected message type {chr(kind)!r} on the admin console")
                             + _READY)
        return items

    def result(self, columns: list, rows: list, tag: str) -> bytes:
        if not columns:
            return command_complete(tag) + _READY
        out = [row_description(columns)]
        out.extend(data_row(row) for row in rows)
        out.append(command_complete(tag))
        out.append(_READY)
        return b"".join(out)

    def failure(self, code: str, message: str) -> bytes:
        return p.error_response(SQLSTATES.get(code, "XX000"), message) + _READY
