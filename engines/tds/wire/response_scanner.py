"""Incremental TDS response scanning and re-framing, sans-IO: token boundaries without decoding values."""
from __future__ import annotations

import struct

from . import token_stream as tk
from .messages import HEADER_SIZE, STATUS_EOM, TABULAR_RESULT
from .token_stream import ProtocolError, read_type_info

_u16 = struct.Struct("<H").unpack_from
_u32 = struct.Struct("<I").unpack_from
_u64 = struct.Struct("<Q").unpack_from
_SIZED_U16 = frozenset((tk.TOKEN_ENVCHANGE, tk.TOKEN_INFO, tk.TOKEN_ERROR, tk.TOKEN_LOGINACK, tk.TOKEN_ORDER,
                        tk.TOKEN_COLINFO, tk.TOKEN_TABNAME, tk.TOKEN_SSPI))
_DONES = frozenset((tk.TOKEN_DONE, tk.TOKEN_DONEPROC, tk.TOKEN_DONEINPROC))
_FIXED = tk.FIXED_SIZES
_BYTELEN = tk.BYTELEN_TYPES | {tk.DATEN} | tk.SCALE_TYPES


class NeedMore(Exception):
    """The token at the scan position continues in a later packet."""


def _need(data: bytes, pos: int, n: int) -> None:
    if pos + n > len(data):
        raise NeedMore()


def skip_value(info: tk.TypeInfo, data: bytes, pos: int) -> int:
    """The position after one value of `info`'s type; NeedMore when it is not all there."""
    t = info.type
    size = _FIXED.get(t)
    if size is not None:
        _need(data, pos, size)
        return pos + size
    if t in _BYTELEN:
        _need(data, pos, 1)
        end = pos + 1 + data[pos]
        _need(data, end, 0)
        return end
    if t in tk.USHORTLEN_TYPES:
        if info.size == tk.PLP_MAX:
            _need(data, pos, 8)
            if _u64(data, pos)[0] == tk.PLP_NULL:
                return pos + 8
            pos += 8
            while True:
                _need(data, pos, 4)
                chunk = _u32(data, pos)[0]
                pos += 4
                if chunk == 0:
                    return pos
                _need(data, pos, chunk)
                pos += chunk
        _need(data, pos, 2)
        n = _u16(data, pos)[0]
        if n == 0xFFFF:
            return pos + 2
        _need(data, pos + 2, n)
        return pos + 2 + n
    if t in tk.LONGLEN_TYPES:
        _need(data, pos, 1)
        ptr = data[pos]
        if ptr == 0:
            return pos + 1
        _need(data, pos + 1, ptr + 12)
        n = _u32(data, pos + 1 + ptr + 8)[0]
        _need(data, pos + 1 + ptr + 12, n)
        return pos + 1 + ptr + 12 + n
    raise ProtocolError(f"unsupported data type 0x{t:02x} in a response")


def _type_info(data: bytes, pos: int):
    try:
        return read_type_info(data, pos)
    except ProtocolError as exc:
        if str(exc).startswith("truncated"):
            raise NeedMore() from None
        raise


def _b_varchar_end(data: bytes, pos: int) -> int:
    _need(data, pos, 1)
    end = pos + 1 + 2 * data[pos]
    _need(data, end, 0)
    return end


class ResponseScanner:
    """Feed the payload bytes of a response stream; get the tokens that matter to a proxy:
    ('env', env_type, new, old), ('done', token, status), ('error', number, state, severity, text).
    Rows and metadata are skipped by their lengths, never decoded."""

    __slots__ = ("buf", "columns")

    def __init__(self):
        self.buf = b""
        self.columns: list | None = None

    @property
    def partial(self) -> bool:
        return bool(self.buf)

    def feed(self, data: bytes) -> list:
        buf = self.buf + data if self.buf else bytes(data)
        pos, end, events = 0, len(buf), []
        while pos < end:
            try:
                pos = self._token(buf, pos, events)
            except NeedMore:
                break
        self.buf = buf[pos:]
        return events

    def _token(self, data: bytes, pos: int, events: list) -> int:
        t = data[pos]
        if t in _DONES:
            _need(data, pos, 13)
            events.append(("done", t, _u16(data, pos + 1)[0]))
            return pos + 13
        if t == tk.TOKEN_ROW or t == tk.TOKEN_NBCROW:
            columns = self.columns
            if columns is None:
                raise ProtocolError("ROW before COLMETADATA")
            p = pos + 1
            if t == tk.TOKEN_NBCROW:
                size = (len(columns) + 7) // 8
                _need(data, p, size)
                nulls = data[p:p + size]
                p += size
                for index, info in enumerate(columns):
                    if not nulls[index >> 3] & (1 << (index & 7)):
                        p = skip_value(info, data, p)
                return p
            for info in columns:
                p = skip_value(info, data, p)
            return p
        if t in _SIZED_U16:
            _need(data, pos, 3)
            size = _u16(data, pos + 1)[0]
            _need(data, pos + 3, size)
            body = data[pos + 3:pos + 3 + size]
            if t == tk.TOKEN_ENVCHANGE or t == tk.TOKEN_ERROR:
                fields = tk.decode_sized(t, body)
                if t == tk.TOKEN_ENVCHANGE:
                    events.append(("env", fields["env_type"], fields["new"], fields["old"]))
                else:
                    events.append(("error", fields["number"], fields["state"], fields["severity"], fields["text"]))
            return pos + 3 + size
        if t == tk.TOKEN_COLMETADATA:
            _need(data, pos, 3)
            count = _u16(data, pos + 1)[0]
            p = pos + 3
            if count == 0xFFFF:
                return p
            columns = []
            for _ in range(count):
                _need(data, p, 6)
                info, p = _type_info(data, p + 6)
                if info.type in tk.LONGLEN_TYPES:
                    _need(data, p, 1)
                    parts = data[p]
                    p += 1
                    for _ in range(parts):
                        _need(data, p, 2)
                        p += 2 + 2 * _u16(data, p)[0]
                p = _b_varchar_end(data, p)
                columns.append(info)
            self.columns = columns
            return p
        if t == tk.TOKEN_RETURNSTATUS:
            _need(data, pos, 5)
            return pos + 5
        if t == tk.TOKEN_RETURNVALUE:
            p = _b_varchar_end(data, pos + 3)
            _need(data, p, 7)
            info, p = _type_info(data, p + 7)
            return skip_value(info, data, p)
        if t in (tk.TOKEN_SESSIONSTATE, tk.TOKEN_FEDAUTHINFO):
            _need(data, pos, 5)
            size = _u32(data, pos + 1)[0]
            _need(data, pos + 5, size)
            return pos + 5 + size
        if t == tk.TOKEN_FEATUREEXTACK:
            p = pos + 1
            while True:
                _need(data, p, 1)
                if data[p] == 0xFF:
                    return p + 1
                _need(data, p, 5)
                size = _u32(data, p + 1)[0]
                _need(data, p + 5, size)
                p += 5 + size
        raise ProtocolError(f"unknown token 0x{t:02x} in a response")


class Reframer:
    """Re-packetises one direction's messages at a packet size: payload pieces in, whole packets out, packet
    ids counting from 1 in each message, EOM on the last packet, `status` bits on the first."""

    __slots__ = ("room", "buf", "packet_id", "msg_type", "first_status")

    def __init__(self, packet_size: int, msg_type: int = TABULAR_RESULT):
        self.room = packet_size - HEADER_SIZE
        self.buf = b""
        self.packet_id = 1
        self.msg_type = msg_type
        self.first_status = 0

    def feed(self, payload: bytes, eom: bool) -> bytes:
        buf = self.buf + payload if self.buf else payload
        room = self.room
        if eom and len(buf) <= room:        # the common case: the rest of a message fits one packet
            out = struct.pack(">BBHHBB", self.msg_type, STATUS_EOM | self.first_status, len(buf) + HEADER_SIZE, 0,
                              self.packet_id & 0xFF, 0) + buf
            self.buf, self.packet_id, self.first_status = b"", 1, 0
            return out
        out = bytearray()
        pos = 0
        while len(buf) - pos > room or (eom and pos < len(buf)):
            chunk = buf[pos:pos + room]
            pos += len(chunk)
            last = eom and pos >= len(buf)
            out += struct.pack(">BBHHBB", self.msg_type, (STATUS_EOM if last else 0) | self.first_status,
                               len(chunk) + HEADER_SIZE, 0, self.packet_id & 0xFF, 0) + chunk
            self.first_status = 0
            self.packet_id += 1
            if last:
                break
        self.buf = buf[pos:]
        if eom:
            self.buf, self.packet_id = b"", 1
        return bytes(out)
