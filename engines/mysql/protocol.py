"""MySQL client/server protocol: packet framing, length-encoded values, OK/ERR/EOF and handshake packets (spec names)."""
from __future__ import annotations

import struct

# ---- packet framing: 3-byte little-endian payload length, 1-byte sequence id ----
MAX_PAYLOAD = 0xFFFFFF            # a payload this long continues in the next packet

# ---- capability flags ----
CLIENT_LONG_PASSWORD = 0x00000001        # also CLIENT_MYSQL: set means "no MariaDB extended capabilities"
CLIENT_FOUND_ROWS = 0x00000002
CLIENT_LONG_FLAG = 0x00000004
CLIENT_CONNECT_WITH_DB = 0x00000008
CLIENT_NO_SCHEMA = 0x00000010
CLIENT_COMPRESS = 0x00000020
CLIENT_ODBC = 0x00000040
CLIENT_LOCAL_FILES = 0x00000080
CLIENT_IGNORE_SPACE = 0x00000100
CLIENT_PROTOCOL_41 = 0x00000200
CLIENT_INTERACTIVE = 0x00000400
CLIENT_SSL = 0x00000800
CLIENT_IGNORE_SIGPIPE = 0x00001000
CLIENT_TRANSACTIONS = 0x00002000
CLIENT_RESERVED = 0x00004000
CLIENT_SECURE_CONNECTION = 0x00008000
CLIENT_MULTI_STATEMENTS = 0x00010000
CLIENT_MULTI_RESULTS = 0x00020000
CLIENT_PS_MULTI_RESULTS = 0x00040000
CLIENT_PLUGIN_AUTH = 0x00080000
CLIENT_CONNECT_ATTRS = 0x00100000
CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA = 0x00200000
CLIENT_CAN_HANDLE_EXPIRED_PASSWORDS = 0x00400000
CLIENT_SESSION_TRACK = 0x00800000
CLIENT_DEPRECATE_EOF = 0x01000000
CLIENT_OPTIONAL_RESULTSET_METADATA = 0x02000000
CLIENT_QUERY_ATTRIBUTES = 0x08000000

# ---- server status flags (OK and EOF packets) ----
SERVER_STATUS_IN_TRANS = 0x0001
SERVER_STATUS_AUTOCOMMIT = 0x0002
SERVER_MORE_RESULTS_EXISTS = 0x0008
SERVER_STATUS_CURSOR_EXISTS = 0x0040
SERVER_STATUS_LAST_ROW_SENT = 0x0080
SERVER_STATUS_IN_TRANS_READONLY = 0x2000
SERVER_SESSION_STATE_CHANGED = 0x4000

# ---- commands ----
COM_SLEEP = 0x00
COM_QUIT = 0x01
COM_INIT_DB = 0x02
COM_QUERY = 0x03
COM_FIELD_LIST = 0x04
COM_CREATE_DB = 0x05
COM_DROP_DB = 0x06
COM_REFRESH = 0x07
COM_SHUTDOWN = 0x08
COM_STATISTICS = 0x09
COM_PROCESS_INFO = 0x0A
COM_CONNECT = 0x0B
COM_PROCESS_KILL = 0x0C
COM_DEBUG = 0x0D
COM_PING = 0x0E
COM_TIME = 0x0F
COM_DELAYED_INSERT = 0x10
COM_CHANGE_USER = 0x11
COM_BINLOG_DUMP = 0x12
COM_TABLE_DUMP = 0x13
COM_CONNECT_OUT = 0x14
COM_REGISTER_SLAVE = 0x15
COM_STMT_PREPARE = 0x16
COM_STMT_EXECUTE = 0x17
COM_STMT_SEND_LONG_DATA = 0x18
COM_STMT_CLOSE = 0x19
COM_STMT_RESET = 0x1A
COM_SET_OPTION = 0x1B
COM_STMT_FETCH = 0x1C
COM_DAEMON = 0x1D
COM_BINLOG_DUMP_GTID = 0x1E
COM_RESET_CONNECTION = 0x1F

MYSQL_OPTION_MULTI_STATEMENTS_ON = 0
MYSQL_OPTION_MULTI_STATEMENTS_OFF = 1

# ---- response headers ----
OK_HEADER = 0x00
EOF_HEADER = 0xFE
ERR_HEADER = 0xFF
LOCAL_INFILE_HEADER = 0xFB
AUTH_SWITCH_REQUEST = 0xFE
AUTH_MORE_DATA = 0x01

# caching_sha2_password AuthMoreData codes
CACHING_SHA2_REQUEST_PUBLIC_KEY = 0x02
CACHING_SHA2_FAST_AUTH_SUCCESS = 0x03
CACHING_SHA2_PERFORM_FULL_AUTHENTICATION = 0x04

# ---- error codes (server error numbers) and SQLSTATEs ----
ER_CON_COUNT_ERROR = 1040
ER_HANDSHAKE_ERROR = 1043
ER_ACCESS_DENIED_ERROR = 1045
ER_UNKNOWN_COM_ERROR = 1047
ER_SERVER_SHUTDOWN = 1053
ER_NET_PACKET_TOO_LARGE = 1153
ER_NET_PACKETS_OUT_OF_ORDER = 1156
ER_NET_READ_INTERRUPTED = 1159
ER_NOT_SUPPORTED_YET = 1235
ER_OPTION_PREVENTS_STATEMENT = 1290     # e.g. "running with the --read-only option"
ER_LOCK_WAIT_TIMEOUT = 1205
ER_TOO_MANY_USER_CONNECTIONS = 1203
ER_CONNECTION_KILLED = 1927
ER_SECURE_TRANSPORT_REQUIRED = 3159
ER_QUERY_INTERRUPTED = 1317
ER_UNKNOWN_ERROR = 1105
ER_NEW_ABORTING_CONNECTION = 1184
ER_CANT_SET_ENGINE = 1221

_UINT16 = struct.Struct("<H")
_UINT32 = struct.Struct("<I")
UINT16 = _UINT16
UINT32 = _UINT32


def packet(seq: int, payload: bytes) -> bytes:
    """Frame `payload` as one or more packets starting at sequence id `seq` (split at 16 MiB - 1)."""
    n = len(payload)
    if n < MAX_PAYLOAD:
        return n.to_bytes(3, "little") + bytes((seq & 0xFF,)) + payload
    out = []
    pos = 0
    while True:
        chunk = payload[pos:pos + MAX_PAYLOAD]
        out.append(len(chunk).to_bytes(3, "little") + bytes((seq & 0xFF,)) + chunk)
        seq += 1
        pos += MAX_PAYLOAD
        if len(chunk) < MAX_PAYLOAD:
            break
    return b"".join(out)


def header(data, pos: int = 0) -> tuple[int, int]:
    """(payload length, sequence id) of the packet at `pos`."""
    return data[pos] | (data[pos + 1] << 8) | (data[pos + 2] << 16), data[pos + 3]


def lenenc_int(value: int) -> bytes:
    if value < 251:
        return bytes((value,))
    if value < 1 << 16:
        return b"\xfc" + value.to_bytes(2, "little")
    if value < 1 << 24:
        return b"\xfd" + value.to_bytes(3, "little")
    return b"\xfe" + value.to_bytes(8, "little")


def read_lenenc_int(data, pos: int) -> tuple[int, int]:
    """(value, next position); raises IndexError or ValueError on a truncated or NULL value."""
    first = data[pos]
    if first < 251:
        return first, pos + 1
    if first == 0xFC:
        return int.from_bytes(data[pos + 1:pos + 3], "little"), pos + 3
    if first == 0xFD:
        return int.from_bytes(data[pos + 1:pos + 4], "little"), pos + 4
    if first == 0xFE:
        if pos + 9 > len(data):
            raise IndexError("truncated length-encoded integer")
        return int.from_bytes(data[pos + 1:pos + 9], "little"), pos + 9
    raise ValueError(f"invalid length-encoded integer prefix 0x{first:02x}")


def lenenc_str(value: bytes) -> bytes:
    return lenenc_int(len(value)) + value


def read_lenenc_str(data, pos: int) -> tuple[bytes, int]:
    size, pos = read_lenenc_int(data, pos)
    if pos + size > len(data):
        raise IndexError("truncated length-encoded string")
    return bytes(data[pos:pos + size]), pos + size


def read_cstring(data, pos: int) -> tuple[bytes, int]:
    end = data.index(b"\x00", pos)
    return bytes(data[pos:end]), end + 1


def ok_payload(status: int, affected: int = 0, insert_id: int = 0, warnings: int = 0, info: bytes = b"",
               header_byte: int = OK_HEADER) -> bytes:
    out = bytes((header_byte,)) + lenenc_int(affected) + lenenc_int(insert_id) + _UINT16.pack(status) + _UINT16.pack(warnings)
    return out + info


def eof_payload(status: int, warnings: int = 0) -> bytes:
    return b"\xfe" + _UINT16.pack(warnings) + _UINT16.pack(status)


def err_payload(code: int, sqlstate: str, message: str) -> bytes:
    return b"\xff" + _UINT16.pack(code) + b"#" + sqlstate.encode("ascii")[:5].ljust(5, b"0") + message.encode("utf-8")


def parse_err(payload) -> tuple[int, str, str]:
    """(code, SQLSTATE, message) of an ERR payload."""
    code = _UINT16.unpack_from(payload, 1)[0] if len(payload) >= 3 else 0
    if len(payload) >= 9 and payload[3] == 0x23:   # '#'
        return code, bytes(payload[4:9]).decode("ascii", "replace"), bytes(payload[9:]).decode("utf-8", "replace")
    return code, "HY000", bytes(payload[3:]).decode("utf-8", "replace")


def ok_status(payload, pos: int = 1) -> int:
    """Server status flags of an OK packet (or an OK-with-0xFE header) payload."""
    _, pos = read_lenenc_int(payload, pos)
    _, pos = read_lenenc_int(payload, pos)
    return _UINT16.unpack_from(payload, pos)[0]


def terminator_status(payload) -> int:
    """Status flags of a result set terminator: a classic EOF (5 bytes) or an OK with a 0xFE header."""
    if len(payload) == 5:
        return _UINT16.unpack_from(payload, 3)[0]
    if len(payload) < 5:
        return 0
    return ok_status(payload, 1)


# ---- connection phase ----

def handshake_v10(version: bytes, thread_id: int, nonce: bytes, capabilities: int, charset: int, status: int,
                  plugin: bytes) -> bytes:
    """Initial Handshake Packet (protocol 10); `nonce` is 20 bytes."""
    return (b"\x0a" + version + b"\x00" + _UINT32.pack(thread_id) + nonce[:8] + b"\x00"
            + _UINT16.pack(capabilities & 0xFFFF) + bytes((charset,)) + _UINT16.pack(status)
            + _UINT16.pack(capabilities >> 16) + bytes((len(nonce) + 1,)) + b"\x00" * 10
            + nonce[8:] + b"\x00" + plugin + b"\x00")


def parse_handshake_v10(payload) -> dict:
    """The fields of a server's Initial Handshake Packet; raises ValueError/IndexError when malformed."""
    if not payload:
        raise ValueError("empty handshake")
    if payload[0] == ERR_HEADER:
        code, state, message = parse_err(payload)
        raise ValueError(f"server refused the connection: {message} ({code})")
    if payload[0] != 10:
        raise ValueError(f"unsupported handshake protocol version {payload[0]}")
    version, pos = read_cstring(payload, 1)
    thread_id = _UINT32.unpack_from(payload, pos)[0]
    nonce = bytes(payload[pos + 4:pos + 12])
    pos += 13
    caps = _UINT16.unpack_from(payload, pos)[0]
    charset = payload[pos + 2]
    status = _UINT16.unpack_from(payload, pos + 3)[0]
    caps |= _UINT16.unpack_from(payload, pos + 5)[0] << 16
    nonce_len = payload[pos + 7]
    pos += 18
    plugin = b""
    if caps & CLIENT_SECURE_CONNECTION:
        part2 = max(13, nonce_len - 8)
        nonce += bytes(payload[pos:pos + part2]).rstrip(b"\x00")
        pos += part2
    if caps & CLIENT_PLUGIN_AUTH and pos < len(payload):
        end = payload.find(b"\x00", pos)
        plugin = bytes(payload[pos:end if end >= 0 else len(payload)])
    return {"version": bytes(version), "thread_id": thread_id, "nonce": nonce, "capabilities": caps,
            "charset": charset, "status": status, "plugin": plugin}


def ssl_request(capabilities: int, charset: int, max_packet: int = MAX_PAYLOAD) -> bytes:
    return _UINT32.pack(capabilities) + _UINT32.pack(max_packet) + bytes((charset,)) + b"\x00" * 23


def handshake_response(capabilities: int, charset: int, user: bytes, auth: bytes, database: bytes, plugin: bytes,
                       attributes: dict | None = None, max_packet: int = MAX_PAYLOAD) -> bytes:
    """HandshakeResponse41."""
    out = [_UINT32.pack(capabilities), _UINT32.pack(max_packet), bytes((charset,)), b"\x00" * 23, user, b"\x00"]
    if capabilities & CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA:
        out.append(lenenc_str(auth))
    else:
        out.append(bytes((len(auth),)) + auth)
    if capabilities & CLIENT_CONNECT_WITH_DB:
        out.append(database + b"\x00")
    if capabilities & CLIENT_PLUGIN_AUTH:
        out.append(plugin + b"\x00")
    if capabilities & CLIENT_CONNECT_ATTRS:
        attrs = b"".join(lenenc_str(k.encode()) + lenenc_str(v.encode()) for k, v in (attributes or {}).items())
        out.append(lenenc_str(attrs))
    return b"".join(out)


def parse_handshake_response(payload) -> dict:
    """The fields of a HandshakeResponse41 (or an SSLRequest when only 32 bytes); raises ValueError/IndexError."""
    if len(payload) < 32:
        raise ValueError("handshake response shorter than 32 bytes")
    caps = _UINT32.unpack_from(payload, 0)[0]
    if not caps & CLIENT_PROTOCOL_41:
        raise ValueError("the client does not speak protocol 4.1 (CLIENT_PROTOCOL_41)")
    result = {"capabilities": caps, "max_packet": _UINT32.unpack_from(payload, 4)[0], "charset": payload[8],
              "ssl_request": len(payload) == 32, "user": b"", "auth": b"", "database": b"", "plugin": b"",
              "attributes": b""}
    if len(payload) == 32:
        return result
    user, pos = read_cstring(payload, 32)
    result["user"] = user
    if caps & CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA:
        auth, pos = read_lenenc_str(payload, pos)
    elif caps & CLIENT_SECURE_CONNECTION:
        size = payload[pos]
        if pos + 1 + size > len(payload):
            raise ValueError("truncated auth response")
        auth, pos = bytes(payload[pos + 1:pos + 1 + size]), pos + 1 + size
    else:
        auth, pos = read_cstring(payload, pos)
    result["auth"] = auth
    if caps & CLIENT_CONNECT_WITH_DB and pos < len(payload):
        result["database"], pos = read_cstring(payload, pos)
    if caps & CLIENT_PLUGIN_AUTH and pos < len(payload):
        end = payload.find(b"\x00", pos)
        result["plugin"] = bytes(payload[pos:end if end >= 0 else len(payload)])
        pos = end + 1 if end >= 0 else len(payload)
    if caps & CLIENT_CONNECT_ATTRS and pos < len(payload):
        result["attributes"], pos = read_lenenc_str(payload, pos)
    return result


def auth_switch_request(plugin: bytes, data: bytes) -> bytes:
    return b"\xfe" + plugin + b"\x00" + data


def quote_string(value: str) -> str:
    """A single-quoted SQL string literal (backslashes and quotes escaped)."""
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def quote_ident(value: str) -> str:
    return "`" + value.replace("`", "``") + "`"
