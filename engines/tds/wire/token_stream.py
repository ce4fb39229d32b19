"""TDS 7.2+ data types and token streams, sans-IO: TYPE_INFO and values, token builders and a token reader."""
from __future__ import annotations

import datetime
import decimal
import struct
import uuid
from dataclasses import dataclass, field


class ProtocolError(ValueError):
    """Malformed TDS input; the only exception the decoders raise on bad bytes."""


# -- data types (2.2.5.4) -------------------------------------------------------------------------
NULLTYPE = 0x1F
INT1 = 0x30
BIT = 0x32
INT2 = 0x34
INT4 = 0x38
DATETIM4 = 0x3A
FLT4 = 0x3B
MONEY = 0x3C
DATETIME = 0x3D
FLT8 = 0x3E
MONEY4 = 0x7A
INT8 = 0x7F
GUID = 0x24
INTN = 0x26
DECIMAL = 0x37
NUMERIC = 0x3F
BITN = 0x68
DECIMALN = 0x6A
NUMERICN = 0x6C
FLTN = 0x6D
MONEYN = 0x6E
DATETIMN = 0x6F
DATEN = 0x28
TIMEN = 0x29
DATETIME2N = 0x2A
DATETIMEOFFSETN = 0x2B
BIGVARBINARY = 0xA5
BIGVARCHAR = 0xA7
BIGBINARY = 0xAD
BIGCHAR = 0xAF
NVARCHAR = 0xE7
NCHAR = 0xEF
TEXT = 0x23
IMAGE = 0x22
NTEXT = 0x63

FIXED_SIZES = {NULLTYPE: 0, INT1: 1, BIT: 1, INT2: 2, INT4: 4, DATETIM4: 4, FLT4: 4, MONEY: 8, DATETIME: 8,
               FLT8: 8, MONEY4: 4, INT8: 8}
BYTELEN_TYPES = {GUID, INTN, DECIMAL, NUMERIC, BITN, DECIMALN, NUMERICN, FLTN, MONEYN, DATETIMN}
SCALE_TYPES = {TIMEN, DATETIME2N, DATETIMEOFFSETN}
USHORTLEN_TYPES = {BIGVARBINARY, BIGVARCHAR, BIGBINARY, BIGCHAR, NVARCHAR, NCHAR}
COLLATED_TYPES = {BIGVARCHAR, BIGCHAR, NVARCHAR, NCHAR, TEXT, NTEXT}
LONGLEN_TYPES = {TEXT, IMAGE, NTEXT}
PLP_MAX = 0xFFFF  # USHORT max length meaning (MAX): values travel as partially length-prefixed chunks
PLP_NULL = 0xFFFFFFFFFFFFFFFF
PLP_UNKNOWN = 0xFFFFFFFFFFFFFFFE

# SQL_Latin1_General_CP1_CI_AS, as in the spec's examples
DEFAULT_COLLATION = bytes.fromhex("0904D00034")

_EPOCH_1900 = datetime.datetime(1900, 1, 1)
_DATE_0001 = datetime.date(1, 1, 1)


@dataclass
class TypeInfo:
    """A TYPE_INFO: the type byte and what the type carries (length, precision/scale, collation)."""
    type: int
    size: int = 0
    precision: int = 0
    scale: int = 0
    collation: bytes = DEFAULT_COLLATION

    @property
    def is_plp(self) -> bool:
        return self.type in USHORTLEN_TYPES and self.size == PLP_MAX


def _need(data: bytes, pos: int, n: int, what: str) -> None:
    if n < 0 or pos + n > len(data):
        raise ProtocolError(f"truncated {what}")


def read_type_info(data: bytes, pos: int) -> tuple[TypeInfo, int]:
    _need(data, pos, 1, "TYPE_INFO")
    t = data[pos]
    pos += 1
    if t in FIXED_SIZES:
        return TypeInfo(t, FIXED_SIZES[t]), pos
    if t in BYTELEN_TYPES:
        _need(data, pos, 1, "TYPE_INFO length")
        info = TypeInfo(t, data[pos])
        pos += 1
        if t in (DECIMAL, NUMERIC, DECIMALN, NUMERICN):
            _need(data, pos, 2, "TYPE_INFO precision")
            info.precision, info.scale = data[pos], data[pos + 1]
            pos += 2
        return info, pos
    if t == DATEN:
        return TypeInfo(t, 3), pos
    if t in SCALE_TYPES:
        _need(data, pos, 1, "TYPE_INFO scale")
        return TypeInfo(t, 0, scale=data[pos]), pos + 1
    if t in USHORTLEN_TYPES:
        _need(data, pos, 2, "TYPE_INFO length")
        info = TypeInfo(t, struct.unpack_from("<H", data, pos)[0])
        pos += 2
        if t in COLLATED_TYPES:
            _need(data, pos, 5, "TYPE_INFO collation")
            info.collation = bytes(data[pos:pos + 5])
            pos += 5
        return info, pos
    if t in LONGLEN_TYPES:
        _need(data, pos, 4, "TYPE_INFO length")
        info = TypeInfo(t, struct.unpack_from("<I", data, pos)[0])
        pos += 4
        if t in COLLATED_TYPES:
            _need(data, pos, 5, "TYPE_INFO collation")
            info.collation = bytes(data[pos:pos + 5])
            pos += 5
        return info, pos
    raise ProtocolError(f"unsupported data type 0x{t:02x}")


def write_type_info(info: TypeInfo) -> bytes:
    t = info.type
    if t in FIXED_SIZES:
        return bytes([t])
    if t in BYTELEN_TYPES:
        out = bytes([t, info.size])
        if t in (DECIMAL, NUMERIC, DECIMALN, NUMERICN):
            out += bytes([info.precision, info.scale])
        return out
    if t == DATEN:
        return bytes([t])
    if t in SCALE_TYPES:
        return bytes([t, info.scale])
    if t in USHORTLEN_TYPES:
        out = bytes([t]) + struct.pack("<H", info.size)
        return out + info.collation if t in COLLATED_TYPES else out
    if t in LONGLEN_TYPES:
        out = bytes([t]) + struct.pack("<I", info.size)
        return out + info.collation if t in COLLATED_TYPES else out
    raise ValueError(f"unsupported data type 0x{t:02x}")


def decimal_size(precision: int) -> int:
    """Bytes of a DECIMALN value (sign byte included) for a precision."""
    return 5 if precision <= 9 else 9 if precision <= 19 else 13 if precision <= 28 else 17


def _time_size(scale: int) -> int:
    return 3 if scale <= 2 else 4 if scale <= 4 else 5


def _decode_chars(info: TypeInfo, raw: bytes) -> str:
    if info.type in (NVARCHAR, NCHAR, NTEXT):
        if len(raw) % 2:
            raise ProtocolError("odd length for a UCS-2 value")
        return raw.decode("utf-16-le", errors="replace")
    return raw.decode("cp1252", errors="replace")


def _decode_datetime(days: int, ticks: int) -> datetime.datetime:
    try:
        return _EPOCH_1900 + datetime.timedelta(days=days, milliseconds=round(ticks * 10 / 3))
    except OverflowError:
        raise ProtocolError("DATETIME value out of range") from None


def _decode_date(raw: bytes) -> datetime.date:
    try:
        return _DATE_0001 + datetime.timedelta(days=int.from_bytes(raw, "little"))
    except OverflowError:
        raise ProtocolError("DATE value out of range") from None


def _decode_time(raw: bytes, scale: int) -> datetime.time:
    units = int.from_bytes(raw, "little")
    micro = units * 10 ** 6 // 10 ** scale if scale <= 6 else units // 10 ** (scale - 6)
    if micro >= 86400 * 10 ** 6 or scale > 7:
        raise ProtocolError("TIME value out of range")
    seconds, micro = divmod(micro, 10 ** 6)
    return datetime.time(seconds // 3600, seconds // 60 % 60, seconds % 60, micro)


def _decode_fixed(info: TypeInfo, raw: bytes):
    t, n = info.type, len(raw)
    if t in (INT1, INT2, INT4, INT8, INTN):
        if n not in (1, 2, 4, 8):
            raise ProtocolError(f"bad integer length {n}")
        return int.from_bytes(raw, "little", signed=n != 1)
    if t in (BIT, BITN):
        if n != 1:
            raise ProtocolError(f"bad bit length {n}")
        return raw[0] != 0
    if t in (FLT4, FLT8, FLTN):
        if n not in (4, 8):
            raise ProtocolError(f"bad float length {n}")
        return struct.unpack("<f" if n == 4 else "<d", raw)[0]
    if t in (MONEY, MONEY4, MONEYN):
        if n == 4:
            return decimal.Decimal(int.from_bytes(raw, "little", signed=True)).scaleb(-4)
        if n == 8:
            value = (int.from_bytes(raw[:4], "little", signed=True) << 32) | int.from_bytes(raw[4:], "little")
            return decimal.Decimal(value).scaleb(-4)
        raise ProtocolError(f"bad money length {n}")
    if t in (DATETIME, DATETIM4, DATETIMN):
        if n == 8:
            days, ticks = struct.unpack("<iI", raw)
            return _decode_datetime(days, ticks)
        if n == 4:
            days, minutes = struct.unpack("<HH", raw)
            return _decode_datetime(days, minutes * 60 * 300)
        raise ProtocolError(f"bad datetime length {n}")
    if t in (DECIMAL, NUMERIC, DECIMALN, NUMERICN):
        if n < 1 or n > 17:
            raise ProtocolError(f"bad decimal length {n}")
        magnitude = decimal.Decimal(int.from_bytes(raw[1:], "little"))
        value = magnitude.scaleb(-info.scale) if info.scale < 256 else magnitude
        return value if raw[0] == 1 else -value
    if t == GUID:
        if n != 16:
            raise ProtocolError(f"bad GUID length {n}")
        return uuid.UUID(bytes_le=raw)
    if t == DATEN:
        if n != 3:
            raise ProtocolError(f"bad date length {n}")
        return _decode_date(raw)
    if t == TIMEN:
        if n != _time_size(info.scale):
            raise ProtocolError(f"bad time length {n}")
        return _decode_time(raw, info.scale)
    if t in (DATETIME2N, DATETIMEOFFSETN):
        size = _time_size(info.scale)
        extra = 2 if t == DATETIMEOFFSETN else 0
        if n != size + 3 + extra:
            raise ProtocolError(f"bad datetime2 length {n}")
        value = datetime.datetime.combine(_decode_date(raw[size:size + 3]), _decode_time(raw[:size], info.scale))
        if t == DATETIMEOFFSETN:
            offset = int.from_bytes(raw[size + 3:], "little", signed=True)
            try:
                tz = datetime.timezone(datetime.timedelta(minutes=offset))
            except ValueError:
                raise ProtocolError("bad datetimeoffset offset") from None
            value = value.replace(tzinfo=datetime.timezone.utc).astimezone(tz)
        return value
    raise ProtocolError(f"unsupported data type 0x{t:02x}")


def read_value(info: TypeInfo, data: bytes, pos: int) -> tuple[object, int]:
    """Read one value of `info`'s type (TYPE_VARBYTE); None is NULL."""
    try:
        return _read_value(info, data, pos)
    except ProtocolError:
        raise
    except (OverflowError, ValueError) as exc:
        raise ProtocolError(f"bad value of type 0x{info.type:02x}: {exc}") from None


def _read_value(info: TypeInfo, data: bytes, pos: int) -> tuple[object, int]:
    t = info.type
    if t in FIXED_SIZES:
        n = FIXED_SIZES[t]
        _need(data, pos, n, "value")
        return (None if t == NULLTYPE else _decode_fixed(info, bytes(data[pos:pos + n]))), pos + n
    if t in BYTELEN_TYPES or t == DATEN or t in SCALE_TYPES:
        _need(data, pos, 1, "value length")
        n = data[pos]
        pos += 1
        if n == 0:
            return None, pos
        _need(data, pos, n, "value")
        return _decode_fixed(info, bytes(data[pos:pos + n])), pos + n
    if t in USHORTLEN_TYPES:
        if info.is_plp:
            _need(data, pos, 8, "PLP length")
            total = struct.unpack_from("<Q", data, pos)[0]
            pos += 8
            if total == PLP_NULL:
                return None, pos
            parts = []
            while True:
                _need(data, pos, 4, "PLP chunk length")
                size = struct.unpack_from("<I", data, pos)[0]
                pos += 4
                if size == 0:
                    break
                _need(data, pos, size, "PLP chunk")
                parts.append(bytes(data[pos:pos + size]))
                pos += size
            raw = b"".join(parts)
        else:
            _need(data, pos, 2, "value length")
            n = struct.unpack_from("<H", data, pos)[0]
            pos += 2
            if n == 0xFFFF:
                return None, pos
            _need(data, pos, n, "value")
            raw = bytes(data[pos:pos + n])
            pos += n
        return (raw if t in (BIGVARBINARY, BIGBINARY) else _decode_chars(info, raw)), pos
    if t in LONGLEN_TYPES:
        _need(data, pos, 1, "text pointer length")
        ptr = data[pos]
        pos += 1
        if ptr == 0:
            return None, pos
        _need(data, pos, ptr + 8 + 4, "text pointer")
        pos += ptr + 8
        n = struct.unpack_from("<I", data, pos)[0]
        pos += 4
        _need(data, pos, n, "value")
        raw = bytes(data[pos:pos + n])
        return (raw if t == IMAGE else _decode_chars(info, raw)), pos + n
    raise ProtocolError(f"unsupported data type 0x{t:02x}")


def _encode_datetime(value: datetime.datetime) -> bytes:
    if not isinstance(value, datetime.datetime):
        value = datetime.datetime.combine(value, datetime.time())
    delta = value.replace(tzinfo=None) - _EPOCH_1900
    ticks = round((delta.seconds * 1000 + delta.microseconds / 1000) * 0.3)
    days = delta.days
    if ticks >= 300 * 86400:
        days, ticks = days + 1, 0
    return struct.pack("<iI", days, ticks)


def _encode_time(value: datetime.time, scale: int) -> bytes:
    micro = ((value.hour * 60 + value.minute) * 60 + value.second) * 10 ** 6 + value.microsecond
    units = micro * 10 ** scale // 10 ** 6
    return units.to_bytes(_time_size(scale), "little")


def _encode_fixed(info: TypeInfo, value) -> bytes:
    t = info.type
    if t in (INT1, INT2, INT4, INT8, INTN):
        size = FIXED_SIZES.get(t, info.size)
        return int(value).to_bytes(size, "little", signed=size != 1)
    if t in (BIT, BITN):
        return b"\x01" if value else b"\x00"
    if t in (FLT4, FLT8, FLTN):
        return struct.pack("<f" if FIXED_SIZES.get(t, info.size) == 4 else "<d", float(value))
    if t in (DATETIME, DATETIMN):
        return _encode_datetime(value)
    if t in (MONEY, MONEYN):
        units = int(decimal.Decimal(value).scaleb(4).to_integral_value())
        if FIXED_SIZES.get(t, info.size) == 4:
            return units.to_bytes(4, "little", signed=True)
        return ((units >> 32) & 0xFFFFFFFF).to_bytes(4, "little") + (units & 0xFFFFFFFF).to_bytes(4, "little")
    if t in (DECIMAL, NUMERIC, DECIMALN, NUMERICN):
        units = int(decimal.Decimal(value).scaleb(info.scale).to_integral_value(decimal.ROUND_HALF_EVEN))
        size = decimal_size(info.precision)
        return bytes([1 if units >= 0 else 0]) + abs(units).to_bytes(size - 1, "little")
    if t == GUID:
        return (value if isinstance(value, uuid.UUID) else uuid.UUID(str(value))).bytes_le
    if t == DATEN:
        return (value.toordinal() - 1).to_bytes(3, "little")
    if t == TIMEN:
        return _encode_time(value, info.scale)
    if t == DATETIME2N:
        return _encode_time(value.time(), info.scale) + (value.toordinal() - 1).to_bytes(3, "little")
    raise ValueError(f"cannot encode type 0x{t:02x}")


def write_value(info: TypeInfo, value) -> bytes:
    """Encode one value (TYPE_VARBYTE) for `info`; None is NULL where the type allows it."""
    t = info.type
    if t in FIXED_SIZES:
        if value is None:
            raise ValueError(f"fixed-length type 0x{t:02x} cannot carry NULL")
        return _encode_fixed(info, value)
    if t in BYTELEN_TYPES or t == DATEN or t in SCALE_TYPES:
        if value is None:
            return b"\x00"
        raw = _encode_fixed(info, value)
        return bytes([len(raw)]) + raw
    if t in USHORTLEN_TYPES:
        if t in (BIGVARBINARY, BIGBINARY):
            raw = None if value is None else bytes(value)
        elif t in (NVARCHAR, NCHAR):
            raw = None if value is None else str(value).encode("utf-16-le")
        else:
            raw = None if value is None else str(value).encode("cp1252", errors="replace")
        if info.is_plp:
            if raw is None:
                return struct.pack("<Q", PLP_NULL)
            out = struct.pack("<Q", len(raw))
            if raw:
                out += struct.pack("<I", len(raw)) + raw
            return out + b"\0\0\0\0"
        if raw is None:
            return b"\xff\xff"
        if len(raw) > info.size:
            raise ValueError(f"value of {len(raw)} bytes exceeds the column size {info.size}")
        return struct.pack("<H", len(raw)) + raw
    raise ValueError(f"cannot encode type 0x{t:02x}")


# -- tokens (2.2.7) -------------------------------------------------------------------------------
TOKEN_ALTMETADATA = 0x88
TOKEN_ALTROW = 0xD3
TOKEN_COLINFO = 0xA5
TOKEN_COLMETADATA = 0x81
TOKEN_DONE = 0xFD
TOKEN_DONEPROC = 0xFE
TOKEN_DONEINPROC = 0xFF
TOKEN_ENVCHANGE = 0xE3
TOKEN_ERROR = 0xAA
TOKEN_FEATUREEXTACK = 0xAE
TOKEN_FEDAUTHINFO = 0xEE
TOKEN_INFO = 0xAB
TOKEN_LOGINACK = 0xAD
TOKEN_NBCROW = 0xD2
TOKEN_ORDER = 0xA9
TOKEN_RETURNSTATUS = 0x79
TOKEN_RETURNVALUE = 0xAC
TOKEN_ROW = 0xD1
TOKEN_SESSIONSTATE = 0xE4
TOKEN_SSPI = 0xED
TOKEN_TABNAME = 0xA4

DONE_FINAL = 0x00
DONE_MORE = 0x01
DONE_ERROR = 0x02
DONE_INXACT = 0x04
DONE_COUNT = 0x10
DONE_ATTN = 0x20
DONE_SRVERROR = 0x100

ENV_DATABASE = 1
ENV_LANGUAGE = 2
ENV_CHARSET = 3
ENV_PACKETSIZE = 4
ENV_COLLATION = 7
ENV_BEGINTRAN = 8
ENV_COMMITTRAN = 9
ENV_ROLLBACKTRAN = 10
ENV_ENLISTDTC = 11
ENV_DEFECTTRAN = 12
ENV_MIRROR_PARTNER = 13
ENV_PROMOTETRAN = 15
ENV_TRANMANAGERADDR = 16
ENV_TRANENDED = 17
ENV_RESETACK = 18
ENV_USERINFO = 19
ENV_ROUTING = 20
_ENV_BINARY = {ENV_COLLATION, ENV_BEGINTRAN, ENV_COMMITTRAN, ENV_ROLLBACKTRAN, ENV_ENLISTDTC, ENV_DEFECTTRAN,
               ENV_TRANENDED, ENV_RESETACK, ENV_PROMOTETRAN, ENV_TRANMANAGERADDR}
_ENV_TRANSACTION = {ENV_BEGINTRAN, ENV_COMMITTRAN, ENV_ROLLBACKTRAN, ENV_DEFECTTRAN, ENV_TRANENDED}

# DONE CurCmd values SQL Server uses
CURCMD_SELECT = 0xC1
CURCMD_INSERT = 0xC3
CURCMD_DELETE = 0xC4
CURCMD_UPDATE = 0xC5
CURCMD_EXECUTE = 0xE0

COLUMN_NULLABLE = 0x0001
COLUMN_UPDATEABLE = 0x0008  # usUpdateable read/write (bits 2-3: 0 read-only, 1 read/write)
COLUMN_IDENTITY = 0x0010

TDS74_VERSION_BYTES = bytes.fromhex("74000004")


def _b_varchar(text: str) -> bytes:
    raw = text.encode("utf-16-le")
    if len(raw) // 2 > 255:
        raise ValueError("B_VARCHAR longer than 255 characters")
    return bytes([len(raw) // 2]) + raw


def _us_varchar(text: str) -> bytes:
    raw = text.encode("utf-16-le")
    return struct.pack("<H", len(raw) // 2) + raw


def _b_varbyte(raw: bytes) -> bytes:
    return bytes([len(raw)]) + raw


def done(status: int = DONE_FINAL, curcmd: int = 0, rowcount: int = 0, token: int = TOKEN_DONE) -> bytes:
    return struct.pack("<BHHQ", token, status, curcmd, rowcount)


def done_proc(status: int = DONE_FINAL, curcmd: int = CURCMD_EXECUTE, rowcount: int = 0) -> bytes:
    return done(status, curcmd, rowcount, TOKEN_DONEPROC)


def done_in_proc(status: int = DONE_FINAL, curcmd: int = 0, rowcount: int = 0) -> bytes:
    return done(status, curcmd, rowcount, TOKEN_DONEINPROC)


def envchange(env_type: int, new, old=None) -> bytes:
    """ENVCHANGE; string types take str values, binary types (collation, transactions, reset) bytes."""
    if env_type in _ENV_BINARY:
        body = bytes([env_type]) + _b_varbyte(new or b"") + _b_varbyte(old or b"")
    else:
        body = bytes([env_type]) + _b_varchar(new or "") + _b_varchar(old or "")
    return struct.pack("<BH", TOKEN_ENVCHANGE, len(body)) + body


def env_begin_tran(descriptor: int) -> bytes:
    return envchange(ENV_BEGINTRAN, struct.pack("<Q", descriptor), b"")


def env_commit_tran(descriptor: int) -> bytes:
    return envchange(ENV_COMMITTRAN, b"", struct.pack("<Q", descriptor))


def env_rollback_tran(descriptor: int) -> bytes:
    return envchange(ENV_ROLLBACKTRAN, b"", struct.pack("<Q", descriptor))


def env_tran_ended(descriptor: int) -> bytes:
    return envchange(ENV_TRANENDED, b"", struct.pack("<Q", descriptor))


def env_reset_ack() -> bytes:
    return envchange(ENV_RESETACK, b"", b"")


def _message(token: int, number: int, state: int, severity: int, text: str, server: str, proc: str,
             line: int) -> bytes:
    body = struct.pack("<iBB", number, state, severity) + _us_varchar(text) + _b_varchar(server) \
        + _b_varchar(proc) + struct.pack("<i", line)
    return struct.pack("<BH", token, len(body)) + body


def info(number: int, text: str, state: int = 1, severity: int = 0, server: str = "", proc: str = "",
         line: int = 0) -> bytes:
    return _message(TOKEN_INFO, number, state, severity, text, server, proc, line)


def error(number: int, text: str, state: int = 1, severity: int = 16, server: str = "", proc: str = "",
          line: int = 1) -> bytes:
    return _message(TOKEN_ERROR, number, state, severity, text, server, proc, line)


def loginack(prog_name: str = "Microsoft SQL Server", tds_version: bytes = TDS74_VERSION_BYTES,
             prog_version: bytes = bytes([16, 0, 0x10, 0x00]), interface: int = 1) -> bytes:
    body = bytes([interface]) + tds_version + _b_varchar(prog_name) + prog_version
    return struct.pack("<BH", TOKEN_LOGINACK, len(body)) + body


FEATURE_FEDAUTH = 0x02
FEATURE_TERMINATOR = 0xFF


def featureextack(features: dict[int, bytes]) -> bytes:
    """FEATUREEXTACK (2.2.7.11): per acknowledged feature its id, DWORD length and data, then the terminator."""
    body = b"".join(bytes([fid]) + struct.pack("<I", len(data)) + data for fid, data in features.items())
    return bytes([TOKEN_FEATUREEXTACK]) + body + bytes([FEATURE_TERMINATOR])


def fedauth_ack(nonce: bytes | None = None) -> bytes:
    """The FEATUREEXTACK a FEDAUTH security-token login gets: no data, or the nonce of the client's PRELOGIN
    NONCEOPT when it sent one (the client checks it)."""
    return featureextack({FEATURE_FEDAUTH: nonce or b""})


def returnstatus(value: int) -> bytes:
    return struct.pack("<Bi", TOKEN_RETURNSTATUS, value)


@dataclass
class Column:
    name: str
    type_info: TypeInfo
    flags: int = COLUMN_NULLABLE
    user_type: int = 0


def colmetadata(columns: list[Column]) -> bytes:
    out = bytearray(struct.pack("<BH", TOKEN_COLMETADATA, len(columns)))
    for col in columns:
        out += struct.pack("<IH", col.user_type, col.flags) + write_type_info(col.type_info)
        if col.type_info.type in LONGLEN_TYPES:
            out += b"\x00"  # no table name parts
        out += _b_varchar(col.name)
    return bytes(out)


def row(columns: list[Column], values) -> bytes:
    return bytes([TOKEN_ROW]) + b"".join(write_value(c.type_info, v) for c, v in zip(columns, values))


def returnvalue(ordinal: int, name: str, type_info: TypeInfo, value, status: int = 0x01) -> bytes:
    return struct.pack("<BH", TOKEN_RETURNVALUE, ordinal) + _b_varchar(name) + bytes([status]) \
        + struct.pack("<IH", 0, COLUMN_NULLABLE) + write_type_info(type_info) + write_value(type_info, value)


# -- token reader (for clients, probes and the engine's view of a backend) --------------------------
@dataclass
class Token:
    type: int
    # DONE*: status, curcmd, rowcount; ENVCHANGE: env_type, new, old; INFO/ERROR: number, state, severity,
    # text, server, proc, line; LOGINACK: interface, tds_version, prog_name, prog_version; COLMETADATA:
    # columns; ROW/NBCROW: values; RETURNSTATUS: value; RETURNVALUE: ordinal, name, status, type_info, value;
    # anything else: raw
    fields: dict = field(default_factory=dict)

    def __getattr__(self, name):
        try:
            return self.__dict__["fields"][name]
        except KeyError:
            raise AttributeError(name) from None


class TokenReader:
    """Decode a whole response's token stream. Keeps the last COLMETADATA, which ROW tokens need."""

    def __init__(self):
        self.columns: list[Column] | None = None

    def read(self, data: bytes) -> list[Token]:
        data = bytes(data)
        pos, out = 0, []
        while pos < len(data):
            token, pos = self._read_one(data, pos)
            out.append(token)
        return out

    def _read_one(self, data: bytes, pos: int) -> tuple[Token, int]:
        t = data[pos]
        pos += 1
        if t in (TOKEN_DONE, TOKEN_DONEPROC, TOKEN_DONEINPROC):
            _need(data, pos, 12, "DONE")
            status, curcmd, count = struct.unpack_from("<HHQ", data, pos)
            return Token(t, {"status": status, "curcmd": curcmd, "rowcount": count}), pos + 12
        if t == TOKEN_RETURNSTATUS:
            _need(data, pos, 4, "RETURNSTATUS")
            return Token(t, {"value": struct.unpack_from("<i", data, pos)[0]}), pos + 4
        if t == TOKEN_COLMETADATA:
            _need(data, pos, 2, "COLMETADATA")
            count = struct.unpack_from("<H", data, pos)[0]
            pos += 2
            columns = []
            if count != 0xFFFF:
                for _ in range(count):
                    _need(data, pos, 6, "column metadata")
                    user_type, flags = struct.unpack_from("<IH", data, pos)
                    type_info, pos = read_type_info(data, pos + 6)
                    if type_info.type in LONGLEN_TYPES:
                        _need(data, pos, 1, "table name")
                        parts = data[pos]
                        pos += 1
                        for _ in range(parts):
                            _need(data, pos, 2, "table name part")
                            pos += 2 + 2 * struct.unpack_from("<H", data, pos)[0]
                    name, pos = _read_b_varchar(data, pos)
                    columns.append(Column(name, type_info, flags, user_type))
                self.columns = columns
            return Token(t, {"columns": columns}), pos
        if t in (TOKEN_ROW, TOKEN_NBCROW):
            if self.columns is None:
                raise ProtocolError("ROW before COLMETADATA")
            values = []
            nulls = b""
            if t == TOKEN_NBCROW:
                size = (len(self.columns) + 7) // 8
                _need(data, pos, size, "NBCROW bitmap")
                nulls, pos = data[pos:pos + size], pos + size
            for index, col in enumerate(self.columns):
                if nulls and nulls[index // 8] & (1 << (index % 8)):
                    values.append(None)
                    continue
                value, pos = read_value(col.type_info, data, pos)
                values.append(value)
            return Token(TOKEN_ROW, {"values": values}), pos
        if t == TOKEN_RETURNVALUE:
            _need(data, pos, 2, "RETURNVALUE")
            ordinal = struct.unpack_from("<H", data, pos)[0]
            name, pos = _read_b_varchar(data, pos + 2)
            _need(data, pos, 7, "RETURNVALUE")
            status = data[pos]
            type_info, pos = read_type_info(data, pos + 7)
            value, pos = read_value(type_info, data, pos)
            return Token(t, {"ordinal": ordinal, "name": name, "status": status, "type_info": type_info,
                             "value": value}), pos
        if t in (TOKEN_SESSIONSTATE, TOKEN_FEDAUTHINFO):
            _need(data, pos, 4, "token length")
            size = struct.unpack_from("<I", data, pos)[0]
            _need(data, pos + 4, size, "token")
            return Token(t, {"raw": data[pos + 4:pos + 4 + size]}), pos + 4 + size
        if t == TOKEN_FEATUREEXTACK:
            features = {}
            while True:
                _need(data, pos, 1, "FEATUREEXTACK")
                fid = data[pos]
                pos += 1
                if fid == 0xFF:
                    break
                _need(data, pos, 4, "FEATUREEXTACK")
                size = struct.unpack_from("<I", data, pos)[0]
                _need(data, pos + 4, size, "FEATUREEXTACK")
                features[fid] = data[pos + 4:pos + 4 + size]
                pos += 4 + size
            return Token(t, {"features": features}), pos
        if t in (TOKEN_ENVCHANGE, TOKEN_INFO, TOKEN_ERROR, TOKEN_LOGINACK, TOKEN_ORDER, TOKEN_COLINFO,
                 TOKEN_TABNAME, TOKEN_SSPI):
            _need(data, pos, 2, "token length")
            size = struct.unpack_from("<H", data, pos)[0]
            pos += 2
            _need(data, pos, size, "token")
            body, pos = data[pos:pos + size], pos + size
            return Token(t, decode_sized(t, body)), pos
        raise ProtocolError(f"unknown token 0x{t:02x}")


def _read_b_varchar(data: bytes, pos: int) -> tuple[str, int]:
    _need(data, pos, 1, "B_VARCHAR")
    n = data[pos]
    _need(data, pos + 1, 2 * n, "B_VARCHAR")
    return data[pos + 1:pos + 1 + 2 * n].decode("utf-16-le", errors="replace"), pos + 1 + 2 * n


def decode_sized(t: int, body: bytes) -> dict:
    """The fields of a token with a USHORT length (ENVCHANGE, INFO, ERROR, LOGINACK, ...), from its body."""
    if t == TOKEN_ENVCHANGE:
        _need(body, 0, 1, "ENVCHANGE")
        env_type = body[0]
        if env_type in _ENV_BINARY:
            _need(body, 1, 1, "ENVCHANGE value")
            n = body[1]
            _need(body, 2, n + 1, "ENVCHANGE value")
            new = body[2:2 + n]
            m = body[2 + n]
            _need(body, 3 + n, m, "ENVCHANGE old value")
            old = body[3 + n:3 + n + m]
        elif env_type == ENV_ROUTING:
            new, old = body[1:], b""
        else:
            new, pos = _read_b_varchar(body, 1)
            old, pos = _read_b_varchar(body, pos)
        return {"env_type": env_type, "new": new, "old": old}
    if t in (TOKEN_INFO, TOKEN_ERROR):
        _need(body, 0, 8, "message")
        number, state, severity, n = struct.unpack_from("<iBBH", body, 0)
        _need(body, 8, 2 * n, "message text")
        text = body[8:8 + 2 * n].decode("utf-16-le", errors="replace")
        server, pos = _read_b_varchar(body, 8 + 2 * n)
        proc, pos = _read_b_varchar(body, pos)
        _need(body, pos, 4, "line number")
        line = struct.unpack_from("<i", body, pos)[0]
        return {"number": number, "state": state, "severity": severity, "text": text, "server": server,
                "proc": proc, "line": line}
    if t == TOKEN_LOGINACK:
        _need(body, 0, 5, "LOGINACK")
        name, pos = _read_b_varchar(body, 5)
        _need(body, pos, 4, "LOGINACK version")
        return {"interface": body[0], "tds_version": body[1:5], "prog_name": name, "prog_version": body[pos:pos + 4]}
    return {"raw": body}


def transaction_state(tokens: list[Token]) -> tuple[int | None, bool | None]:
    """From a response's ENVCHANGE tokens: (the descriptor of a transaction begun, whether a transaction is
    open at the end), or None where the response says nothing. SQL Server does not set DONE_INXACT."""
    descriptor, open_ = None, None
    for tok in tokens:
        if tok.type == TOKEN_ENVCHANGE and tok.env_type in _ENV_TRANSACTION:
            if tok.env_type == ENV_BEGINTRAN:
                descriptor, open_ = struct.unpack("<Q", tok.new)[0] if len(tok.new) == 8 else 0, True
            else:
                open_ = False
    return descriptor, open_
