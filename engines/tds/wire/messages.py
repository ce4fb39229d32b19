"""TDS 7.x framing and client messages, sans-IO: packets, PRELOGIN, LOGIN7, SQLBatch, RPC, transaction manager.

Everything here turns bytes into values or values into bytes; nothing touches a socket. The only exception a
decoder may raise on bad input is `ProtocolError` (tested by fuzzing).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field

from .token_stream import ProtocolError, TypeInfo, read_type_info, read_value, write_type_info, write_value

# -- packet header (MS-TDS 2.2.3.1) ---------------------------------------------------------------
HEADER_SIZE = 8
SQL_BATCH = 0x01
PRE_TDS7_LOGIN = 0x02
RPC = 0x03
TABULAR_RESULT = 0x04
ATTENTION = 0x06
BULK_LOAD = 0x07
FEDAUTH_TOKEN = 0x08
TRANSACTION_MANAGER = 0x0E
LOGIN7 = 0x10
SSPI = 0x11
PRELOGIN = 0x12
PACKET_TYPES = {SQL_BATCH, PRE_TDS7_LOGIN, RPC, TABULAR_RESULT, ATTENTION, BULK_LOAD, FEDAUTH_TOKEN,
                TRANSACTION_MANAGER, LOGIN7, SSPI, PRELOGIN}

STATUS_EOM = 0x01
STATUS_IGNORE = 0x02
STATUS_RESETCONNECTION = 0x08
STATUS_RESETCONNECTIONSKIPTRAN = 0x10

MIN_PACKET_SIZE = 512
MAX_PACKET_SIZE = 32767
DEFAULT_PACKET_SIZE = 4096

# TDS versions as LOGIN7/LOGINACK carry them (LOGINACK sends them big-endian: 74 00 00 04)
TDS70 = 0x70000000
TDS71 = 0x71000001
TDS72 = 0x72090002
TDS73A = 0x730A0003
TDS73B = 0x730B0003
TDS74 = 0x74000004


@dataclass
class PacketHeader:
    type: int
    status: int
    length: int
    spid: int = 0
    packet_id: int = 1
    window: int = 0

    def encode(self) -> bytes:
        return struct.pack(">BBHHBB", self.type, self.status, self.length, self.spid, self.packet_id, self.window)

    @classmethod
    def decode(cls, data: bytes) -> "PacketHeader":
        if len(data) < HEADER_SIZE:
            raise ProtocolError("truncated packet header")
        return cls(*struct.unpack_from(">BBHHBB", data))


@dataclass
class Message:
    """One reassembled TDS message: the type and status of its first packet and the joined payload."""
    type: int
    status: int
    data: bytes
    spid: int = 0

    @property
    def reset_connection(self) -> bool:
        return bool(self.status & STATUS_RESETCONNECTION)

    @property
    def reset_skip_tran(self) -> bool:
        return bool(self.status & STATUS_RESETCONNECTIONSKIPTRAN)


class MessageReader:
    """Feed bytes, take whole messages. Packets longer than `max_packet_size` or shorter than a header
    are protocol errors; an ATTENTION packet arriving mid-message drops the partial message (the client
    gave up on it); a packet with the IGNORE bit and EOM discards what was collected."""

    def __init__(self, max_packet_size: int = MAX_PACKET_SIZE + 1):
        self.max_packet_size = max_packet_size
        self._buf = bytearray()
        self._parts: list[bytes] = []
        self._first: PacketHeader | None = None

    def feed(self, data: bytes) -> list[Message]:
        self._buf += data
        out: list[Message] = []
        while len(self._buf) >= HEADER_SIZE:
            header = PacketHeader.decode(bytes(self._buf[:HEADER_SIZE]))
            if header.length < HEADER_SIZE:
                raise ProtocolError(f"packet length {header.length} is below the 8-byte header")
            if header.length > self.max_packet_size:
                raise ProtocolError(f"packet length {header.length} exceeds the packet size {self.max_packet_size}")
            if header.type not in PACKET_TYPES:
                raise ProtocolError(f"unknown packet type 0x{header.type:02x}")
            if len(self._buf) < header.length:
                break
            payload = bytes(self._buf[HEADER_SIZE:header.length])
            del self._buf[:header.length]
            if self._first is not None and header.type != self._first.type:
                if header.type != ATTENTION:
                    raise ProtocolError(f"packet type 0x{header.type:02x} inside a 0x{self._first.type:02x} message")
                self._parts, self._first = [], None
            if self._first is None:
                self._first = header
            self._parts.append(payload)
            if header.status & STATUS_EOM:
                first, parts = self._first, self._parts
                self._parts, self._first = [], None
                if header.status & STATUS_IGNORE:
                    continue
                out.append(Message(first.type, first.status, b"".join(parts), first.spid))
        return out

    @property
    def pending(self) -> int:
        """Bytes held that do not yet form a whole message."""
        return len(self._buf) + sum(len(p) for p in self._parts)

    def take_unparsed(self) -> bytes:
        """The bytes fed after the last whole packet, removed from the reader (packets already taken into a message
        stay): for a caller whose peer stops sending packets, as a TDS client sends TLS handshake records right
        behind its PRELOGIN."""
        data = bytes(self._buf)
        self._buf.clear()
        return data


def encode_message(msg_type: int, payload: bytes, packet_size: int = DEFAULT_PACKET_SIZE, status: int = 0,
                   spid: int = 0) -> bytes:
    """Split `payload` into packets of at most `packet_size` bytes; `status` bits (e.g. RESETCONNECTION)
    go on the first packet, EOM on the last; packet ids count from 1 and wrap at 256."""
    room = packet_size - HEADER_SIZE
    if room <= 0:
        raise ValueError(f"packet size {packet_size} is too small")
    chunks = [payload[i:i + room] for i in range(0, len(payload), room)] or [b""]
    out = bytearray()
    for index, chunk in enumerate(chunks):
        flags = status if index == 0 else 0
        if index == len(chunks) - 1:
            flags |= STATUS_EOM
        out += struct.pack(">BBHHBB", msg_type, flags, len(chunk) + HEADER_SIZE, spid, (index + 1) % 256, 0)
        out += chunk
    return bytes(out)


# -- PRELOGIN (2.2.6.5) ---------------------------------------------------------------------------
PL_VERSION = 0x00
PL_ENCRYPTION = 0x01
PL_INSTOPT = 0x02
PL_THREADID = 0x03
PL_MARS = 0x04
PL_TRACEID = 0x05
PL_FEDAUTHREQUIRED = 0x06
PL_NONCEOPT = 0x07
PL_TERMINATOR = 0xFF

ENCRYPT_OFF = 0x00
ENCRYPT_ON = 0x01
ENCRYPT_NOT_SUP = 0x02
ENCRYPT_REQ = 0x03

NONCE_SIZE = 32         # NONCEOPT, and the nonce FEDAUTH echoes


@dataclass
class Prelogin:
    """PRELOGIN options as raw bytes by option token, with accessors for the common ones."""
    options: dict[int, bytes] = field(default_factory=dict)

    @property
    def version(self) -> tuple[int, int, int, int] | None:
        raw = self.options.get(PL_VERSION)
        if raw is None or len(raw) < 6:
            return None
        return raw[0], raw[1], struct.unpack(">H", raw[2:4])[0], struct.unpack(">H", raw[4:6])[0]

    @property
    def encryption(self) -> int | None:
        raw = self.options.get(PL_ENCRYPTION)
        return raw[0] if raw else None

    @property
    def mars(self) -> int | None:
        raw = self.options.get(PL_MARS)
        return raw[0] if raw else None

    @property
    def instance(self) -> str | None:
        raw = self.options.get(PL_INSTOPT)
        return None if raw is None else raw.split(b"\0", 1)[0].decode("latin-1")

    @property
    def thread_id(self) -> int | None:
        raw = self.options.get(PL_THREADID)
        return struct.unpack(">I", raw)[0] if raw is not None and len(raw) == 4 else None

    @property
    def fedauth_required(self) -> int | None:
        """B_FEDAUTHREQUIRED: a client sends 1 when it means to log in with FEDAUTH; the server's answer is what
        the client echoes in LOGIN7's fFedAuthEcho. None when the option is absent (or empty)."""
        raw = self.options.get(PL_FEDAUTHREQUIRED)
        return raw[0] if raw else None

    @property
    def nonce(self) -> bytes | None:
        """NONCEOPT's 32 bytes; None when absent or not 32 bytes long."""
        raw = self.options.get(PL_NONCEOPT)
        return raw if raw is not None and len(raw) == NONCE_SIZE else None

    @classmethod
    def build(cls, version=(16, 0, 0, 0), encryption: int = ENCRYPT_OFF, instance: str = "",
              thread_id: int | None = None, mars: int = 0, fedauth_required: int | None = None,
              nonce: bytes | None = None) -> "Prelogin":
        options = {PL_VERSION: bytes([version[0], version[1]]) + struct.pack(">HH", version[2], version[3]),
                   PL_ENCRYPTION: bytes([encryption]),
                   PL_INSTOPT: instance.encode("latin-1") + b"\0"}
        if thread_id is not None:
            options[PL_THREADID] = struct.pack(">I", thread_id)
        options[PL_MARS] = bytes([mars])
        if fedauth_required is not None:
            options[PL_FEDAUTHREQUIRED] = bytes([fedauth_required])
        if nonce is not None:
            options[PL_NONCEOPT] = bytes(nonce)
        return cls(options)

    def encode(self) -> bytes:
        items = list(self.options.items())
        offset = 5 * len(items) + 1
        head, body = bytearray(), bytearray()
        for token, value in items:
            head += struct.pack(">BHH", token, offset + len(body), len(value))
            body += value
        return bytes(head) + bytes([PL_TERMINATOR]) + bytes(body)

    @classmethod
    def decode(cls, data: bytes) -> "Prelogin":
        options: dict[int, bytes] = {}
        pos = 0
        while True:
            if pos >= len(data):
                raise ProtocolError("PRELOGIN option list has no terminator")
            token = data[pos]
            if token == PL_TERMINATOR:
                break
            if pos + 5 > len(data):
                raise ProtocolError("truncated PRELOGIN option")
            offset, length = struct.unpack_from(">HH", data, pos + 1)
            if offset + length > len(data):
                raise ProtocolError(f"PRELOGIN option 0x{token:02x} points outside the message")
            options[token] = bytes(data[offset:offset + length])
            pos += 5
        return cls(options)


# -- LOGIN7 (2.2.6.4) -----------------------------------------------------------------------------
LOGIN7_FIXED = 94
LOGIN7_FIXED_71 = 86    # TDS 7.0/7.1: no ibChangePassword/cchChangePassword/cbSSPILong (added in 7.2)
# OptionFlags2
F_INT_SECURITY = 0x80
F_ODBC = 0x02
# OptionFlags3
F_EXTENSION = 0x10
# TypeFlags
F_READ_ONLY_INTENT = 0x20
# FeatureExt ids
FEATURE_SESSIONRECOVERY = 0x01
FEATURE_FEDAUTH = 0x02
FEATURE_TERMINATOR = 0xFF
# FEDAUTH bFedAuthLibrary (the Options byte's upper 7 bits; its lowest bit is fFedAuthEcho)
FEDAUTH_LIVEID = 0x00
FEDAUTH_SECURITYTOKEN = 0x01
FEDAUTH_ADAL = 0x02
FEDAUTH_LIBRARIES = {FEDAUTH_LIVEID: "Live ID compact token", FEDAUTH_SECURITYTOKEN: "security token",
                     FEDAUTH_ADAL: "ADAL"}

_LOGIN_STRINGS = ("hostname", "username", "password", "appname", "servername", "extension", "library",
                  "language", "database")


def obfuscate_password(password: str) -> bytes:
    """LOGIN7 password bytes: UCS-2, each byte's nibbles swapped, then XOR 0xA5."""
    return bytes((((b << 4) & 0xF0) | (b >> 4)) ^ 0xA5 for b in password.encode("utf-16-le"))


def deobfuscate_password(data: bytes) -> str:
    raw = bytes((((b ^ 0xA5) << 4) & 0xF0) | ((b ^ 0xA5) >> 4) for b in data)
    return decode_ucs2(raw)


def decode_ucs2(data: bytes) -> str:
    if len(data) % 2:
        raise ProtocolError("odd length for a UCS-2 string")
    return data.decode("utf-16-le", errors="replace")


@dataclass
class FedAuth:
    """LOGIN7's FEDAUTH feature (2.2.6.4, FeatureId 0x02): how Azure AD access tokens travel.

    `library` is bFedAuthLibrary and `echo` fFedAuthEcho (1 if and only if the server's PRELOGIN answered
    FEDAUTHREQUIRED = 1). Security token (what drivers send an access token as): `token` is the L_VARBYTE,
    UTF-16LE text, and `nonce` the 32 bytes echoing the server's PRELOGIN NONCEOPT (present only if the server
    sent one). Live ID: the token is opaque, `nonce` then `signed_data` (channel binding token, signature).
    ADAL: only `workflow`; the token comes later in a FEDAUTH_TOKEN message."""
    library: int = FEDAUTH_SECURITYTOKEN
    echo: bool = False
    token: bytes = b""
    nonce: bytes | None = None
    signed_data: bytes = b""
    workflow: int | None = None

    @property
    def text(self) -> str:
        """The token as text (security token: UTF-16LE; characters that do not decode become U+FFFD)."""
        return self.token.decode("utf-16-le", errors="replace")

    @classmethod
    def decode(cls, data: bytes) -> "FedAuth":
        if not data:
            raise ProtocolError("FEDAUTH feature without its Options byte")
        fed = cls(data[0] >> 1, bool(data[0] & 1))
        if fed.library == FEDAUTH_ADAL:
            if len(data) != 2:
                raise ProtocolError(f"FEDAUTH ADAL data is {len(data) - 1} bytes, expected the 1-byte workflow")
            fed.workflow = data[1]
            return fed
        if fed.library not in (FEDAUTH_SECURITYTOKEN, FEDAUTH_LIVEID):
            raise ProtocolError(f"FEDAUTH library 0x{fed.library:02x} is reserved")
        if len(data) < 5:
            raise ProtocolError("FEDAUTH feature too short for its token length")
        size = struct.unpack_from("<I", data, 1)[0]
        if size == 0:
            raise ProtocolError("FEDAUTH token is empty")
        if 5 + size > len(data):
            raise ProtocolError(f"FEDAUTH token of {size} bytes runs past its {len(data)}-byte feature data")
        fed.token, rest = bytes(data[5:5 + size]), bytes(data[5 + size:])
        if fed.library == FEDAUTH_SECURITYTOKEN:
            if size % 2:
                raise ProtocolError("FEDAUTH security token has an odd length for UTF-16 text")
            if rest and len(rest) != NONCE_SIZE:
                raise ProtocolError(f"FEDAUTH security token is followed by {len(rest)} bytes; only a "
                                    f"{NONCE_SIZE}-byte nonce may follow it")
            fed.nonce = rest or None
        else:
            if len(rest) < 2 * NONCE_SIZE:
                raise ProtocolError("FEDAUTH Live ID token lacks its nonce and signature")
            fed.nonce, fed.signed_data = rest[:NONCE_SIZE], rest[NONCE_SIZE:]
        return fed

    def encode(self) -> bytes:
        """The FeatureData, as a client sends it."""
        options = bytes([(self.library << 1) | int(self.echo)])
        if self.library == FEDAUTH_ADAL:
            return options + bytes([self.workflow or 0])
        return options + struct.pack("<I", len(self.token)) + self.token + (self.nonce or b"") + self.signed_data

    @classmethod
    def security_token(cls, token: str, echo: bool = True, nonce: bytes | None = None) -> "FedAuth":
        return cls(FEDAUTH_SECURITYTOKEN, echo, token.encode("utf-16-le"), nonce)


@dataclass
class Login7:
    tds_version: int = TDS74
    packet_size: int = DEFAULT_PACKET_SIZE
    client_prog_version: int = 0
    client_pid: int = 0
    connection_id: int = 0
    option_flags1: int = 0xE0
    option_flags2: int = 0x03
    type_flags: int = 0
    option_flags3: int = 0
    client_timezone: int = 0
    client_lcid: int = 0x0409
    hostname: str = ""
    username: str = ""
    password: str = ""
    appname: str = ""
    servername: str = ""
    library: str = ""
    language: str = ""
    database: str = ""
    client_id: bytes = b"\0" * 6
    sspi: bytes = b""
    attach_db_file: str = ""
    change_password: str = ""
    features: dict[int, bytes] = field(default_factory=dict)   # FeatureExt data by FeatureId, as sent
    fedauth: FedAuth | None = None                              # the FEDAUTH feature, decoded

    @property
    def integrated_security(self) -> bool:
        return bool(self.option_flags2 & F_INT_SECURITY) or bool(self.sspi)

    @property
    def read_only_intent(self) -> bool:
        return bool(self.type_flags & F_READ_ONLY_INTENT)

    @classmethod
    def decode(cls, data: bytes) -> "Login7":
        """A LOGIN7 of TDS 7.2+ or, with its shorter fixed part, of TDS 7.0/7.1 (decoded so that it can be refused
        by version rather than as malformed)."""
        if len(data) < 8:
            raise ProtocolError(f"LOGIN7 is {len(data)} bytes, too short for its length and TDS version")
        fixed = LOGIN7_FIXED if struct.unpack_from("<I", data, 4)[0] >= TDS72 else LOGIN7_FIXED_71
        if len(data) < fixed:
            raise ProtocolError(f"LOGIN7 is {len(data)} bytes, shorter than its {fixed}-byte fixed part")
        (length, version, packet_size, prog_ver, pid, conn_id, of1, of2, tf, of3, tz, lcid) = \
            struct.unpack_from("<IIIIIIBBBBiI", data, 0)
        if length > len(data) or length < fixed:
            raise ProtocolError(f"LOGIN7 length {length} does not match the {len(data)} bytes received")
        data = data[:length]
        pairs = struct.unpack_from("<18H", data, 36)
        login = cls(version, packet_size, prog_ver, pid, conn_id, of1, of2, tf, of3, tz, lcid)
        login.client_id = bytes(data[72:78])
        ib_sspi, cb_sspi, ib_atch, cch_atch = struct.unpack_from("<4H", data, 78)
        ib_chg = cch_chg = cb_sspi_long = 0
        if fixed == LOGIN7_FIXED:
            ib_chg, cch_chg, cb_sspi_long = struct.unpack_from("<2HI", data, 86)

        def span(offset: int, size: int, what: str) -> bytes:
            if size and (offset < fixed or offset + size > length):
                raise ProtocolError(f"LOGIN7 {what} (offset {offset}, {size} bytes) lies outside the message")
            return bytes(data[offset:offset + size])

        extension_offset = None
        for index, name in enumerate(_LOGIN_STRINGS):
            offset, count = pairs[2 * index], pairs[2 * index + 1]
            if name == "extension":
                if of3 & F_EXTENSION and count >= 4 and fixed == LOGIN7_FIXED:
                    extension_offset = struct.unpack("<I", span(offset, 4, name))[0]
                continue
            raw = span(offset, 2 * count, name)
            setattr(login, name, deobfuscate_password(raw) if name == "password" else decode_ucs2(raw))
        login.sspi = span(ib_sspi, cb_sspi if cb_sspi != 0xFFFF else cb_sspi_long, "SSPI")
        login.attach_db_file = decode_ucs2(span(ib_atch, 2 * cch_atch, "AtchDBFile"))
        login.change_password = deobfuscate_password(span(ib_chg, 2 * cch_chg, "ChangePassword"))
        if extension_offset is not None:
            if extension_offset < fixed or extension_offset >= length:
                raise ProtocolError("LOGIN7 FeatureExt offset lies outside the message")
            pos = extension_offset
            while True:
                if pos >= length:
                    raise ProtocolError("LOGIN7 FeatureExt has no terminator")
                feature = data[pos]
                if feature == FEATURE_TERMINATOR:
                    break
                if pos + 5 > length:
                    raise ProtocolError("truncated LOGIN7 FeatureExt")
                size = struct.unpack_from("<I", data, pos + 1)[0]
                if pos + 5 + size > length:
                    raise ProtocolError("LOGIN7 FeatureExt data lies outside the message")
                if feature in login.features:
                    raise ProtocolError(f"LOGIN7 FeatureExt names feature 0x{feature:02x} twice")
                login.features[feature] = bytes(data[pos + 5:pos + 5 + size])
                pos += 5 + size
            if FEATURE_FEDAUTH in login.features:
                login.fedauth = FedAuth.decode(login.features[FEATURE_FEDAUTH])
        return login

    def encode(self) -> bytes:
        """The LOGIN7 payload (without packet header), as a client sends it."""
        values: list[bytes] = []
        for name in _LOGIN_STRINGS:
            if name == "extension":
                values.append(b"")
            elif name == "password":
                values.append(obfuscate_password(self.password))
            else:
                values.append(getattr(self, name).encode("utf-16-le"))
        pairs: list[int] = []
        body = bytearray()
        offset = LOGIN7_FIXED
        features = b""
        option_flags3 = self.option_flags3
        feature_data = dict(self.features)
        if self.fedauth is not None:
            feature_data[FEATURE_FEDAUTH] = self.fedauth.encode()
        if feature_data:
            option_flags3 |= F_EXTENSION
            features = b"".join(bytes([fid]) + struct.pack("<I", len(d)) + d for fid, d in feature_data.items())
            features += bytes([FEATURE_TERMINATOR])
        for name, value in zip(_LOGIN_STRINGS, values):
            if name == "extension" and features:
                value = b"\0\0\0\0"  # patched below with the FeatureExt offset
                ext_at = len(body)
                pairs += [offset + len(body), 4]
            else:
                pairs += [offset + len(body), len(value) // 2 if name != "extension" else 0]
            body += value
        sspi_at = offset + len(body)
        body += self.sspi
        atch = self.attach_db_file.encode("utf-16-le")
        atch_at = offset + len(body)
        body += atch
        chg = obfuscate_password(self.change_password) if self.change_password else b""
        chg_at = offset + len(body)
        body += chg
        if features:
            struct.pack_into("<I", body, ext_at, offset + len(body))
            body += features
        total = LOGIN7_FIXED + len(body)
        fixed = struct.pack("<IIIIIIBBBBiI", total, self.tds_version, self.packet_size, self.client_prog_version,
                            self.client_pid, self.connection_id, self.option_flags1, self.option_flags2,
                            self.type_flags, option_flags3, self.client_timezone, self.client_lcid)
        fixed += struct.pack("<18H", *pairs) + self.client_id[:6].ljust(6, b"\0")
        fixed += struct.pack("<6HI", sspi_at, len(self.sspi) if len(self.sspi) < 0xFFFF else 0xFFFF, atch_at,
                             len(atch) // 2, chg_at, len(chg) // 2,
                             len(self.sspi) if len(self.sspi) >= 0xFFFF else 0)
        return fixed + bytes(body)


# -- ALL_HEADERS (2.2.5.3) ------------------------------------------------------------------------
HEADER_QUERY_NOTIFICATIONS = 1
HEADER_TRANSACTION_DESCRIPTOR = 2
HEADER_TRACE_ACTIVITY = 3


@dataclass
class AllHeaders:
    transaction_descriptor: int = 0
    outstanding_requests: int = 1
    other: dict[int, bytes] = field(default_factory=dict)

    def encode(self) -> bytes:
        body = struct.pack("<IHQI", 18, HEADER_TRANSACTION_DESCRIPTOR, self.transaction_descriptor,
                           self.outstanding_requests)
        for htype, data in self.other.items():
            body += struct.pack("<IH", 6 + len(data), htype) + data
        return struct.pack("<I", 4 + len(body)) + body


def read_all_headers(data: bytes) -> tuple[AllHeaders, int]:
    """Parse ALL_HEADERS at the start of a request; returns the headers and the offset after them."""
    if len(data) < 4:
        raise ProtocolError("truncated ALL_HEADERS")
    total = struct.unpack_from("<I", data, 0)[0]
    if total < 4 or total > len(data):
        raise ProtocolError(f"ALL_HEADERS length {total} does not fit the {len(data)}-byte request")
    headers = AllHeaders(outstanding_requests=0)
    pos = 4
    while pos < total:
        if pos + 6 > total:
            raise ProtocolError("truncated ALL_HEADERS header")
        length, htype = struct.unpack_from("<IH", data, pos)
        if length < 6 or pos + length > total:
            raise ProtocolError(f"ALL_HEADERS header length {length} is out of bounds")
        body = bytes(data[pos + 6:pos + length])
        if htype == HEADER_TRANSACTION_DESCRIPTOR:
            if len(body) != 12:
                raise ProtocolError("transaction descriptor header must hold 12 bytes")
            headers.transaction_descriptor, headers.outstanding_requests = struct.unpack("<QI", body)
        else:
            headers.other[htype] = body
        pos += length
    return headers, total


def transaction_descriptor_offset(data: bytes) -> int:
    """Where the 8-byte transaction descriptor sits in a request that starts with ALL_HEADERS, or -1 (no such
    header, or headers that do not parse: the server refuses those itself)."""
    if len(data) < 4:
        return -1
    total = struct.unpack_from("<I", data, 0)[0]
    if total < 4 or total > len(data):
        return -1
    pos = 4
    while pos + 6 <= total:
        length, htype = struct.unpack_from("<IH", data, pos)
        if length < 6 or pos + length > total:
            return -1
        if htype == HEADER_TRANSACTION_DESCRIPTOR and length == 18:
            return pos + 6
        pos += length
    return -1


def with_transaction_descriptor(data: bytes, descriptor: bytes) -> bytes:
    """The request with its ALL_HEADERS transaction descriptor replaced (unchanged when it has none)."""
    at = transaction_descriptor_offset(data)
    if at < 0:
        return data
    return data[:at] + descriptor + data[at + 8:]


# -- SQLBatch (2.2.6.7) ---------------------------------------------------------------------------
@dataclass
class SqlBatch:
    text: str
    headers: AllHeaders = field(default_factory=AllHeaders)

    @classmethod
    def decode(cls, data: bytes) -> "SqlBatch":
        headers, pos = read_all_headers(data)
        return cls(decode_ucs2(bytes(data[pos:])), headers)

    def encode(self) -> bytes:
        return self.headers.encode() + self.text.encode("utf-16-le")


# -- RPC (2.2.6.6) --------------------------------------------------------------------------------
SP_CURSOR = 1
SP_CURSOROPEN = 2
SP_CURSORPREPARE = 3
SP_CURSOREXECUTE = 4
SP_CURSORPREPEXEC = 5
SP_CURSORUNPREPARE = 6
SP_CURSORFETCH = 7
SP_CURSOROPTION = 8
SP_CURSORCLOSE = 9
SP_EXECUTESQL = 10
SP_PREPARE = 11
SP_EXECUTE = 12
SP_PREPEXEC = 13
SP_PREPEXECRPC = 14
SP_UNPREPARE = 15
PROC_NAMES = {SP_CURSOR: "sp_cursor", SP_CURSOROPEN: "sp_cursoropen", SP_CURSORPREPARE: "sp_cursorprepare",
              SP_CURSOREXECUTE: "sp_cursorexecute", SP_CURSORPREPEXEC: "sp_cursorprepexec",
              SP_CURSORUNPREPARE: "sp_cursorunprepare", SP_CURSORFETCH: "sp_cursorfetch",
              SP_CURSOROPTION: "sp_cursoroption", SP_CURSORCLOSE: "sp_cursorclose",
              SP_EXECUTESQL: "sp_executesql", SP_PREPARE: "sp_prepare", SP_EXECUTE: "sp_execute",
              SP_PREPEXEC: "sp_prepexec", SP_PREPEXECRPC: "sp_prepexecrpc", SP_UNPREPARE: "sp_unprepare"}

PARAM_BY_REF = 0x01  # an OUTPUT parameter
PARAM_DEFAULT = 0x02
RPC_BATCH_FLAGS = (0x80, 0xFE, 0xFF)


@dataclass
class RpcParam:
    name: str
    type_info: TypeInfo
    value: object
    status: int = 0

    @property
    def output(self) -> bool:
        return bool(self.status & PARAM_BY_REF)


@dataclass
class RpcCall:
    proc_id: int | None = None
    proc_name: str = ""
    option_flags: int = 0
    params: list[RpcParam] = field(default_factory=list)

    @property
    def name(self) -> str:
        """The procedure's name whether it came by id or by name (lowercase for the well-known ones)."""
        if self.proc_id is not None:
            return PROC_NAMES.get(self.proc_id, f"procid {self.proc_id}")
        return self.proc_name


@dataclass
class RpcRequest:
    calls: list[RpcCall]
    headers: AllHeaders = field(default_factory=AllHeaders)

    @classmethod
    def decode(cls, data: bytes) -> "RpcRequest":
        data = bytes(data)
        headers, pos = read_all_headers(data)
        calls: list[RpcCall] = []
        while True:
            if pos + 2 > len(data):
                raise ProtocolError("truncated RPC procedure name")
            size = struct.unpack_from("<H", data, pos)[0]
            pos += 2
            call = RpcCall()
            if size == 0xFFFF:
                if pos + 2 > len(data):
                    raise ProtocolError("truncated RPC ProcID")
                call.proc_id = struct.unpack_from("<H", data, pos)[0]
                pos += 2
            else:
                if pos + 2 * size > len(data):
                    raise ProtocolError("RPC procedure name runs past the message")
                call.proc_name = decode_ucs2(data[pos:pos + 2 * size])
                pos += 2 * size
            if pos + 2 > len(data):
                raise ProtocolError("truncated RPC option flags")
            call.option_flags = struct.unpack_from("<H", data, pos)[0]
            pos += 2
            while pos < len(data) and data[pos] not in RPC_BATCH_FLAGS:
                name_len = data[pos]
                pos += 1
                if pos + 2 * name_len + 1 > len(data):
                    raise ProtocolError("truncated RPC parameter name")
                name = decode_ucs2(data[pos:pos + 2 * name_len])
                pos += 2 * name_len
                status = data[pos]
                pos += 1
                type_info, pos = read_type_info(data, pos)
                value, pos = read_value(type_info, data, pos)
                call.params.append(RpcParam(name, type_info, value, status))
            calls.append(call)
            if pos >= len(data):
                break
            pos += 1  # batch separator
            if pos >= len(data):
                break
        return cls(calls, headers)

    def encode(self) -> bytes:
        out = bytearray(self.headers.encode())
        for index, call in enumerate(self.calls):
            if index:
                out.append(0xFF)
            if call.proc_id is not None:
                out += struct.pack("<HH", 0xFFFF, call.proc_id)
            else:
                out += struct.pack("<H", len(call.proc_name)) + call.proc_name.encode("utf-16-le")
            out += struct.pack("<H", call.option_flags)
            for param in call.params:
                out.append(len(param.name))
                out += param.name.encode("utf-16-le")
                out.append(param.status)
                out += write_type_info(param.type_info)
                out += write_value(param.type_info, param.value)
        return bytes(out)


# -- transaction manager requests (2.2.6.9) -------------------------------------------------------
TM_GET_DTC_ADDRESS = 0
TM_PROPAGATE_XACT = 1
TM_BEGIN_XACT = 5
TM_PROMOTE_XACT = 6
TM_COMMIT_XACT = 7
TM_ROLLBACK_XACT = 8
TM_SAVE_XACT = 9

ISOLATION_LEVELS = {0: None, 1: "READ UNCOMMITTED", 2: "READ COMMITTED", 3: "REPEATABLE READ",
                    4: "SERIALIZABLE", 5: "SNAPSHOT"}


@dataclass
class TransactionRequest:
    request_type: int
    name: str = ""
    isolation_level: int = 0
    begin_after: bool = False  # fBeginXact on commit/rollback: start a new transaction at once
    begin_name: str = ""
    payload: bytes = b""  # TM_PROPAGATE_XACT / GET_DTC_ADDRESS data
    headers: AllHeaders = field(default_factory=AllHeaders)

    @classmethod
    def decode(cls, data: bytes) -> "TransactionRequest":
        data = bytes(data)
        headers, pos = read_all_headers(data)

        def need(n: int) -> None:
            if pos + n > len(data):
                raise ProtocolError("truncated transaction manager request")

        def b_varbyte() -> str:
            nonlocal pos
            need(1)
            size = data[pos]
            need(1 + size)
            text = decode_ucs2(data[pos + 1:pos + 1 + size])
            pos += 1 + size
            return text

        need(2)
        req = cls(struct.unpack_from("<H", data, pos)[0], headers=headers)
        pos += 2
        if req.request_type == TM_BEGIN_XACT:
            need(1)
            req.isolation_level = data[pos]
            pos += 1
            req.name = b_varbyte()
        elif req.request_type in (TM_COMMIT_XACT, TM_ROLLBACK_XACT):
            req.name = b_varbyte()
            need(1)
            req.begin_after = bool(data[pos] & 1)
            pos += 1
            if req.begin_after:
                need(1)
                req.isolation_level = data[pos]
                pos += 1
                req.begin_name = b_varbyte()
        elif req.request_type == TM_SAVE_XACT:
            req.name = b_varbyte()
        elif req.request_type in (TM_GET_DTC_ADDRESS, TM_PROPAGATE_XACT):
            need(2)
            size = struct.unpack_from("<H", data, pos)[0]
            pos += 2
            need(size)
            req.payload = data[pos:pos + size]
        else:  # TM_PROMOTE_XACT has no payload; unknown types keep theirs for the server to refuse
            req.payload = data[pos:]
        return req

    def encode(self) -> bytes:
        def b_varbyte(text: str) -> bytes:
            raw = text.encode("utf-16-le")
            return bytes([len(raw)]) + raw

        out = self.headers.encode() + struct.pack("<H", self.request_type)
        if self.request_type == TM_BEGIN_XACT:
            out += bytes([self.isolation_level]) + b_varbyte(self.name)
        elif self.request_type in (TM_COMMIT_XACT, TM_ROLLBACK_XACT):
            out += b_varbyte(self.name) + bytes([1 if self.begin_after else 0])
            if self.begin_after:
                out += bytes([self.isolation_level]) + b_varbyte(self.begin_name)
        elif self.request_type == TM_SAVE_XACT:
            out += b_varbyte(self.name)
        elif self.request_type in (TM_GET_DTC_ADDRESS, TM_PROPAGATE_XACT):
            out += struct.pack("<H", len(self.payload)) + self.payload
        return out
