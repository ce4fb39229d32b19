"""PostgreSQL protocol 3.0 framing: message type codes, startup packets and builders of server messages."""
from __future__ import annotations

import struct

PROTOCOL_VERSION_3 = 196608          # 3.0
SSL_REQUEST_CODE = 80877103
GSSENC_REQUEST_CODE = 80877104
CANCEL_REQUEST_CODE = 80877102

# Frontend message types
QUERY = ord("Q")
PARSE = ord("P")
BIND = ord("B")
DESCRIBE = ord("D")
EXECUTE = ord("E")
CLOSE = ord("C")
SYNC = ord("S")
FLUSH = ord("H")
TERMINATE = ord("X")
FUNCTION_CALL = ord("F")
COPY_DATA = ord("d")
COPY_DONE = ord("c")
COPY_FAIL = ord("f")
PASSWORD_MESSAGE = ord("p")   # also SASLInitialResponse and SASLResponse

# Backend message types
AUTHENTICATION = ord("R")
BACKEND_KEY_DATA = ord("K")
PARAMETER_STATUS = ord("S")
READY_FOR_QUERY = ord("Z")
ERROR_RESPONSE = ord("E")
NOTICE_RESPONSE = ord("N")
NOTIFICATION_RESPONSE = ord("A")
COMMAND_COMPLETE = ord("C")
DATA_ROW = ord("D")
COPY_IN_RESPONSE = ord("G")
COPY_OUT_RESPONSE = ord("H")
COPY_BOTH_RESPONSE = ord("W")
PARSE_COMPLETE = ord("1")
BIND_COMPLETE = ord("2")
CLOSE_COMPLETE = ord("3")
NEGOTIATE_PROTOCOL_VERSION = ord("v")

AUTH_OK = 0
AUTH_CLEARTEXT = 3
AUTH_MD5 = 5
AUTH_SASL = 10
AUTH_SASL_CONTINUE = 11
AUTH_SASL_FINAL = 12

TX_IDLE = ord("I")
TX_IN_TRANSACTION = ord("T")
TX_FAILED = ord("E")

HEADER = struct.Struct("!cI")
INT32 = struct.Struct("!i")
UINT32 = struct.Struct("!I")
INT16 = struct.Struct("!h")

READY_IDLE = b"Z\x00\x00\x00\x05I"
READY_IN_TRANSACTION = b"Z\x00\x00\x00\x05T"


def message(kind: bytes, payload: bytes = b"") -> bytes:
    return kind + UINT32.pack(len(payload) + 4) + payload


def cstring(text: str) -> bytes:
    return text.encode() + b"\x00"


def ready_for_query(status: int = TX_IDLE) -> bytes:
    return b"Z\x00\x00\x00\x05" + bytes((status,))


def authentication(code: int, data: bytes = b"") -> bytes:
    return message(b"R", INT32.pack(code) + data)


def parameter_status(name: str, value: str) -> bytes:
    return message(b"S", cstring(name) + cstring(value))


def backend_key_data(pid: int, key: int) -> bytes:
    return message(b"K", UINT32.pack(pid & 0xFFFFFFFF) + UINT32.pack(key & 0xFFFFFFFF))


def error_response(sqlstate: str, message_text: str, severity: str = "ERROR", detail: str = "", hint: str = "") -> bytes:
    """An ErrorResponse (or NoticeResponse via notice=True in notice_response)."""
    body = b"S" + cstring(severity) + b"V" + cstring(severity) + b"C" + cstring(sqlstate) + b"M" + cstring(message_text)
    if detail:
        body += b"D" + cstring(detail)
    if hint:
        body += b"H" + cstring(hint)
    return message(b"E", body + b"\x00")


def notice_response(sqlstate: str, message_text: str, severity: str = "NOTICE") -> bytes:
    body = b"S" + cstring(severity) + b"V" + cstring(severity) + b"C" + cstring(sqlstate) + b"M" + cstring(message_text)
    return message(b"N", body + b"\x00")


def query(sql: str) -> bytes:
    return message(b"Q", cstring(sql))


def startup_message(params: dict[str, str]) -> bytes:
    body = UINT32.pack(PROTOCOL_VERSION_3)
    for key, value in params.items():
        body += cstring(key) + cstring(value)
    body += b"\x00"
    return UINT32.pack(len(body) + 4) + body


def cancel_request(pid: int, key: int) -> bytes:
    return UINT32.pack(16) + UINT32.pack(CANCEL_REQUEST_CODE) + UINT32.pack(pid & 0xFFFFFFFF) + UINT32.pack(key & 0xFFFFFFFF)


def ssl_request() -> bytes:
    return UINT32.pack(8) + UINT32.pack(SSL_REQUEST_CODE)


def parse_startup_params(body: bytes) -> dict[str, str]:
    """Key/value pairs of a StartupMessage body (after the version). Raises ValueError when malformed."""
    # A well-formed body ends with the pair list's terminator: key\0value\0...\0 -> trailing ['', '']
    if not body.endswith(b"\x00\x00") and body != b"\x00":
        raise ValueError("the startup packet's parameter list is not terminated")
    try:
        items = body[:-2].decode().split("\x00") if len(body) > 1 else []
    except UnicodeDecodeError:
        raise ValueError("the startup packet is not valid UTF-8") from None
    if len(items) % 2:
        raise ValueError("the startup packet has a parameter without a value")
    keys = items[0::2]
    if "" in keys:
        raise ValueError("the startup packet has an empty parameter name")
    return dict(zip(keys, items[1::2]))


def parse_fields(body: bytes) -> dict[str, str]:
    """Fields of an ErrorResponse/NoticeResponse body: {'S': 'ERROR', 'C': '42P01', 'M': '...'}."""
    fields = {}
    i = 0
    n = len(body)
    while i < n and body[i] != 0:
        code = chr(body[i])
        end = body.index(b"\x00", i + 1)
        fields[code] = body[i + 1:end].decode("utf-8", "replace")
        i = end + 1
    return fields


def read_cstring(data: bytes | memoryview, start: int) -> tuple[str, int]:
    """The NUL-terminated string at `start` and the offset after it; ValueError when unterminated."""
    end = bytes(data[start:]).index(b"\x00") if isinstance(data, memoryview) else data.index(b"\x00", start)
    if isinstance(data, memoryview):
        end += start
    return bytes(data[start:end]).decode("utf-8", "replace"), end + 1


def quote_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'
