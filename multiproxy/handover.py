"""The takeover's wire format: length-prefixed JSON records over an AF_UNIX stream, file descriptors by SCM_RIGHTS.

A record is 4 bytes of big-endian length, then that many bytes of UTF-8 JSON (an object with a "type"). A
record that carries descriptors (listening sockets, client connections) says how many in its "fds" field and
is sent in one sendmsg whose ancillary data holds them, so they arrive with the record's first bytes; the
reader keeps descriptors in arrival order and gives each record the ones it announced.

Values that JSON has no type for (bytes, tuples, sets, deques, dicts with non-text keys, str enums and the
slotted or dataclass value objects engines keep their session in) are written as tagged objects by `encode` and rebuilt by
`decode`, so that an engine's session state survives the trip exactly (see ClientProtocol.handover_state).
"""
from __future__ import annotations

import array
import base64
import dataclasses
import enum
import importlib
import json
import socket
import struct
from collections import deque

# Raised on both sides when a peer speaks another handover version: the new process refuses, and says why.
HANDOVER_VERSION = 1
MAX_RECORD = 64 * 1024 * 1024
MAX_FDS_PER_RECORD = 250        # Linux accepts up to SCM_MAX_FD (253) descriptors in one message
_LENGTH = struct.Struct(">I")
# Classes `decode` may rebuild: only the proxy's and its engines' own (the peer is trusted, yet a typo in a
# record must not construct anything else).
_REBUILDABLE = ("multiproxy.", "multiproxy_engines.", "engines.")


class HandoverError(Exception):
    """The peer broke the handover protocol, went away mid-way, or speaks another version."""


# ---------------------------------------------------------------- values

def encode(value):
    """`value` as JSON-ready data; raises TypeError for what cannot be handed over (sockets, functions, ...)."""
    if value is None or type(value) in (bool, int, float, str):
        return value
    if isinstance(value, enum.Enum):
        cls = type(value)
        return {"$enum": f"{cls.__module__}:{cls.__qualname__}", "v": encode(value.value)}
    kind = type(value)
    if kind in (bytes, bytearray, memoryview):
        return {"$b": base64.b64encode(bytes(value)).decode("ascii")}
    if kind is list:
        return [encode(item) for item in value]
    if kind is tuple:
        return {"$t": [encode(item) for item in value]}
    if kind in (set, frozenset):
        return {"$set" if kind is set else "$fset": [encode(item) for item in value]}
    if kind is deque:
        return {"$dq": [encode(item) for item in value], "max": value.maxlen}
    if kind is dict:
        if all(type(key) is str and not key.startswith("$") for key in value):
            return {key: encode(item) for key, item in value.items()}
        return {"$d": [[encode(key), encode(item)] for key, item in value.items()]}
    if kind.__module__.startswith(_REBUILDABLE):
        names = (tuple(f.name for f in dataclasses.fields(kind)) if dataclasses.is_dataclass(kind)
                 else _slots(kind))
        if names is not None:
            return {"$o": f"{kind.__module__}:{kind.__qualname__}",
                    "s": {name: encode(getattr(value, name)) for name in names if hasattr(value, name)}}
    raise TypeError(f"a {kind.__module__}.{kind.__qualname__} cannot be handed over")


def decode(data):
    """The value `encode` wrote."""
    kind = type(data)
    if kind is list:
        return [decode(item) for item in data]
    if kind is not dict:
        return data
    if len(data) <= 2:
        if "$b" in data:
            return base64.b64decode(data["$b"])
        if "$t" in data:
            return tuple(decode(item) for item in data["$t"])
        if "$set" in data:
            return {decode(item) for item in data["$set"]}
        if "$fset" in data:
            return frozenset(decode(item) for item in data["$fset"])
        if "$dq" in data:
            return deque((decode(item) for item in data["$dq"]), data.get("max"))
        if "$d" in data:
            return {decode(key): decode(item) for key, item in data["$d"]}
        if "$enum" in data:
            return _class(data["$enum"])(decode(data["v"]))
        if "$o" in data:
            cls = _class(data["$o"])
            value = cls.__new__(cls)
            for name, item in data["s"].items():
                object.__setattr__(value, name, decode(item))     # (frozen dataclasses too)
            return value
    return {key: decode(item) for key, item in data.items()}


def _slots(cls) -> tuple | None:
    """Every slot of a slotted class (its bases' too), or None for a class whose instances have a __dict__."""
    names: list = []
    for klass in cls.__mro__:
        if klass is object:
            continue
        if "__slots__" not in vars(klass):
            return None
        slots = klass.__slots__
        names.extend((slots,) if isinstance(slots, str) else slots)
    return tuple(name for name in names if name not in ("__weakref__", "__dict__"))


def _class(path: str):
    module, _, qualname = path.partition(":")
    if not module.startswith(_REBUILDABLE):
        raise HandoverError(f"a handover record names class {path!r}, which is not the proxy's")
    target = importlib.import_module(module)
    for part in qualname.split("."):
        target = getattr(target, part)
    return target


# ---------------------------------------------------------------- records

def pack(record: dict) -> bytes:
    """A record as its bytes on the wire."""
    body = json.dumps(record, separators=(",", ":")).encode()
    if len(body) > MAX_RECORD:
        raise HandoverError(f"a handover record of {len(body)} bytes is larger than {MAX_RECORD}")
    return _LENGTH.pack(len(body)) + body


def send_record(sock, record: dict, fds=()) -> None:
    """Send one record, with `fds` (descriptors stay open here: the receiver gets duplicates)."""
    fds = list(fds)
    if len(fds) > MAX_FDS_PER_RECORD:
        raise HandoverError(f"at most {MAX_FDS_PER_RECORD} descriptors per record, not {len(fds)}")
    data = pack({**record, "fds": len(fds)} if fds else record)
    if not fds:
        sock.sendall(data)
        return
    sent = sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
    if sent < len(data):
        sock.sendall(data[sent:])


class RecordReader:
    """Reads records (and their descriptors) from a stream socket."""

    def __init__(self, sock):
        self.sock = sock
        self.buf = bytearray()
        self.fds: deque = deque()

    def read(self) -> tuple[dict, list[int]]:
        """The next record and its descriptors (the caller owns and closes them). HandoverError at the end of the
        stream or on a malformed record."""
        while True:
            if len(self.buf) >= 4:
                length = _LENGTH.unpack_from(self.buf)[0]
                if length > MAX_RECORD:
                    raise HandoverError(f"a handover record announces {length} bytes, more than {MAX_RECORD}")
                if len(self.buf) >= 4 + length:
                    body = bytes(self.buf[4:4 + length])
                    del self.buf[:4 + length]
                    try:
                        record = json.loads(body)
                    except ValueError as exc:
                        raise HandoverError(f"a handover record is not JSON: {exc}") from None
                    if type(record) is not dict or "type" not in record:
                        raise HandoverError("a handover record has no type")
                    wanted = record.get("fds", 0)
                    if len(self.fds) < wanted:
                        raise HandoverError(f"a {record['type']} record announces {wanted} descriptors, "
                                            f"{len(self.fds)} came")
                    return record, [self.fds.popleft() for _ in range(wanted)]
            self._fill()

    def has_record(self) -> bool:
        """Whether a whole record is buffered already (read returns it without waiting)."""
        if len(self.buf) < 4:
            return False
        return len(self.buf) >= 4 + _LENGTH.unpack_from(self.buf)[0]

    def _fill(self) -> None:
        space = socket.CMSG_SPACE(MAX_FDS_PER_RECORD * array.array("i").itemsize)
        data, ancillary, _flags, _address = self.sock.recvmsg(1 << 16, space)
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
                self.fds.extend(fds)
        if not data:
            raise HandoverError("the other process closed the takeover connection")
        self.buf += data

    def close_unclaimed(self) -> None:
        """Close descriptors that arrived without a record claiming them (a peer that died mid-way)."""
        import os
        while self.fds:
            try:
                os.close(self.fds.popleft())
            except OSError:
                pass


def hello(pid: int, **facts) -> dict:
    """The first record each side sends."""
    return {"type": "hello", "version": HANDOVER_VERSION, "pid": pid, **facts}


def check_hello(record: dict, peer: str) -> None:
    """Refuse a peer of another handover version (or one that did not start with hello), with a clear message."""
    if record.get("type") != "hello":
        raise HandoverError(f"the {peer} did not start with hello but with {record.get('type')!r}")
    version = record.get("version")
    if version != HANDOVER_VERSION:
        raise HandoverError(
            f"the {peer} (pid {record.get('pid')}, multiproxy {record.get('multiproxy', '?')}) speaks takeover "
            f"version {version}, this one {HANDOVER_VERSION}: they cannot hand clients over; stop the old process "
            "and start the new one instead (clients reconnect)")
