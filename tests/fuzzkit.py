"""Fuzzing kit shared by the unit fuzz tests and tools/fuzz_campaign.py: client factories, hypothesis strategies,
the outcome oracle (the protocol's own error or a clean close, bounded buffering) and one Target per client parser.

Test-only code: it builds engine client protocols exactly as the core would (ClientContext from a real config)
and feeds them bytes whole or in chunks. Nothing here does I/O.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import ssl
import struct
import tempfile
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

from hypothesis import strategies as st

from multiproxy_engines.mysql import MySQLEngine
from multiproxy_engines.mysql import protocol as myp
from multiproxy_engines.mysql.backend import MySQLServerState
from multiproxy_engines.postgres import protocol as pgp
from multiproxy_engines.postgres.auth import ScramClient
from multiproxy_engines.postgres.backend import PostgresLogin
from multiproxy_engines.postgres.client import PostgresClient
from multiproxy_engines.tds import TDSEngine
from multiproxy_engines.tds.client import Phase as TDSPhase
from multiproxy_engines.tds.backend import TDSServerState
from multiproxy_engines.tds.wire import messages as tp
from multiproxy_engines.tds.wire import token_stream as tk
from multiproxy_engines.tds.wire.memory_tls import MemoryTLS
from multiproxy.auth import UsersFile, md5_verifier, scram_sha_256_verifier
from multiproxy.config import build_config
from multiproxy.engine import (
    AuthFailed, Authenticated, BackendTarget, CancelRequested, ClientContext, ClientQuit, CloseClient, ProtocolError,
    SendToClient, StartClientTLS,
)
from multiproxy.pinning import PinPolicy

# The fuzzed clients get a small max_message_size, so that buffering beyond it shows with small inputs.
MAX_MESSAGE = 16384
# What a protocol object may hold at most between calls: one message up to max_message_size, plus the largest
# handshake message an engine accepts whatever that setting says (PostgreSQL password messages and MySQL
# handshake packets: 64 KiB; a TDS packet is smaller), plus what arrived with it in one read (16 KiB).
HANDSHAKE_MESSAGE_CAP = 65536 + 8
HELD_LIMIT = MAX_MESSAGE + HANDSHAKE_MESSAGE_CAP + 16384 + 64

HANDSHAKE_EVENTS = (SendToClient, StartClientTLS, Authenticated, CancelRequested, CloseClient, AuthFailed)
ENDING_EVENTS = (CloseClient, AuthFailed, CancelRequested)

PASSWORD = "secret"
JWT_KEY = "a-shared-hs256-key-of-forty-characters!!"


class Finding(AssertionError):
    """An outcome the contract does not allow: not the protocol's error, not a clean close, or unbounded buffering."""


# ---------------------------------------------------------------------------------------------- byte helpers

def chunks_of(data: bytes, sizes: list[int]) -> list[bytes]:
    """`data` cut into pieces of the given sizes, cycled; no sizes: whole."""
    out, pos, i = [], 0, 0
    while pos < len(data):
        size = sizes[i % len(sizes)] if sizes else len(data)
        out.append(data[pos:pos + size])
        pos += size
        i += 1
    return out


def mutate(data: bytes, edits: list[tuple[int, int, int]]) -> bytes:
    """Apply (operation, position, byte) edits: 0 replace, 1 insert, 2 delete, 3 truncate."""
    buf = bytearray(data)
    for op, where, value in edits:
        if not buf:
            buf.append(value)
            continue
        i = where % len(buf)
        if op == 0:
            buf[i] = value
        elif op == 1:
            buf.insert(i, value)
        elif op == 2:
            del buf[i]
        else:
            del buf[i:]
    return bytes(buf)


edits = st.lists(st.tuples(st.integers(0, 3), st.integers(0, 1 << 16), st.integers(0, 255)), min_size=1, max_size=6)
sizes = st.lists(st.integers(1, 64), min_size=0, max_size=8)
# For long streams: byte-sized pieces up to reads of a busy socket.
wide_sizes = st.lists(st.one_of(st.integers(1, 64), st.integers(65, 70000)), min_size=0, max_size=6)


def mutated(streams: list[bytes]) -> st.SearchStrategy:
    return st.builds(mutate, st.sampled_from(streams), edits)


def repeated(units: st.SearchStrategy, most: int = 3000) -> st.SearchStrategy:
    """A prefix and then one generated unit many times: long streams (floods, endless partial messages) for little
    generated data, so that unbounded buffering is reachable."""
    return st.builds(lambda unit, count: unit * count, units, st.integers(1, most))


def hexdump(data: bytes) -> str:
    return data.hex()


# ---------------------------------------------------------------------------------------------- oracles

def check_pg_error(reply: bytes) -> None:
    """A PostgreSQL ErrorResponse (maybe after other whole messages), with a severity and a SQLSTATE."""
    pos, last = 0, None
    while pos < len(reply):
        if len(reply) - pos < 5:
            raise Finding(f"truncated message in the reply {reply!r}")
        length = struct.unpack_from("!I", reply, pos + 1)[0]
        last = (reply[pos:pos + 1], reply[pos + 5:pos + 1 + length])
        pos += 1 + length
    if pos != len(reply) or last is None or last[0] != b"E":
        raise Finding(f"the reply is not framed messages ending in an ErrorResponse: {reply!r}")
    fields = dict((f[:1], f[1:]) for f in last[1].split(b"\x00") if f)
    if fields.get(b"S") not in (b"FATAL", b"ERROR") or len(fields.get(b"C", b"")) != 5:
        raise Finding(f"ErrorResponse without severity or SQLSTATE: {reply!r}")


def check_mysql_error(reply: bytes) -> None:
    """MySQL packets, the last an ERR packet (0xFF, error code, '#' SQLSTATE)."""
    pos, last = 0, None
    while pos < len(reply):
        if len(reply) - pos < 4:
            raise Finding(f"truncated packet in the reply {reply!r}")
        length = int.from_bytes(reply[pos:pos + 3], "little")
        last = reply[pos + 4:pos + 4 + length]
        pos += 4 + length
    if pos != len(reply) or not last or last[0] != myp.ERR_HEADER or len(last) < 9 or last[3:4] != b"#":
        raise Finding(f"the reply is not packets ending in an ERR packet: {reply!r}")


def check_tds_error(reply: bytes) -> None:
    """Whole TDS messages, the last a TABULAR_RESULT with an ERROR token."""
    try:
        messages = tp.MessageReader().feed(reply)
        tokens = tk.TokenReader().read(messages[-1].data) if messages else []
    except tp.ProtocolError as exc:
        raise Finding(f"the reply is not TDS messages: {exc}: {reply!r}") from None
    if not messages or messages[-1].type != tp.TABULAR_RESULT or not any(t.type == tk.TOKEN_ERROR for t in tokens):
        raise Finding(f"the reply has no ERROR token: {reply!r}")


CHECK_ERROR = {"postgres": check_pg_error, "mysql": check_mysql_error, "tds": check_tds_error}


def _encrypted(proto) -> bool:
    """TDS clients past PRELOGIN encryption: replies are TLS records the oracle cannot read."""
    return bool(getattr(proto, "tls_full", False))


def check_reply(engine: str, proto, reply: bytes, empty_ok: bool) -> None:
    if not isinstance(reply, (bytes, bytearray)):
        raise Finding(f"reply of type {type(reply).__name__}, not bytes")
    if not reply:
        if not empty_ok:
            raise Finding("a protocol error without a reply for the client")
        return
    if _encrypted(proto):
        peer = getattr(proto, "fuzz_peer", None)
        if peer is None:
            return
        reply = peer.decrypt(reply)      # the harness is the client of this TLS session: read what it was told
    if engine == "tds" and getattr(proto, "tls", None) is not None and reply[:1] == bytes((tp.PRELOGIN,)):
        return                     # a TLS alert inside PRELOGIN: the TLS handshake's own refusal
    CHECK_ERROR[engine](bytes(reply))


def held_bytes(obj, depth: int = 0) -> int:
    """Bytes buffered in a protocol object: its bytes attributes, those of its readers and pending queues. Shared
    objects (context, engine, backend state) and tracked session state (dicts) are not buffers and not counted."""
    if isinstance(obj, (bytes, bytearray, memoryview, str)):
        return len(obj)
    if isinstance(obj, ssl.MemoryBIO):
        return obj.pending
    if isinstance(obj, MemoryTLS):       # the TDS client's TLS session: a partial record, output not taken
        return obj.buffered
    if depth > 3:
        return 0
    if isinstance(obj, (list, tuple, deque)):
        # Queues of requests in flight (a pipelining client's) are not buffers; bytes and tuples of bytes are.
        if not obj or not isinstance(obj[0], (bytes, bytearray, memoryview, str, tuple)):
            return 0
        if not isinstance(obj[0], tuple):
            return sum(len(item) for item in obj if isinstance(item, (bytes, bytearray, memoryview, str)))
        if len(obj) > 64:         # long lists of records: estimate from the first ones (walking all is quadratic)
            return sum(held_bytes(obj[i], depth + 1) for i in range(64)) * len(obj) // 64
        return sum(held_bytes(item, depth + 1) for item in obj)
    if isinstance(obj, (int, float, bool, dict, set, frozenset, type(None), ssl.SSLObject)):
        return 0
    names = list(getattr(obj, "__dict__", {}))
    for cls in type(obj).__mro__:
        names += [n for n in getattr(cls, "__slots__", ()) if n != "__weakref__"]
    total = 0
    for name in names:
        if name in ("ctx", "engine", "server_state", "server_params", "ident", "mock_secret", "auth_state",
                    "fuzz_peer"):
            continue
        total += held_bytes(getattr(obj, name, None), depth + 1)
    return total


def check_held(proto, limit: int = HELD_LIMIT) -> None:
    held = held_bytes(proto)
    if held > limit:
        raise Finding(f"unbounded buffering: the protocol object holds {held} bytes, more than {limit} "
                      f"(max_message_size {proto.ctx.max_message_size} + the largest handshake message + one read)")


# ---------------------------------------------------------------------------------------------- drivers

@dataclass
class Outcome:
    """How one example ended: 'error' (the protocol's error), 'closed' (a clean close with or without an error),
    'authenticated', 'open' (wants more bytes)."""

    kind: str
    detail: str = ""


def drive(engine: str, proto, chunks: list[bytes], relay: bool, server_state=None,
          check_held_bytes: bool = True) -> Outcome:
    """Feed `chunks` to the handshake (relay=False) or the relay (relay=True) as the core would; raise Finding
    on any outcome other than the protocol's error, a clean close or progress. After an Authenticated event the
    rest of the bytes go to the relay, as the session does with `leftover`."""
    i = 0
    try:
        if not relay:
            while i < len(chunks):
                events = proto.receive_handshake(chunks[i])
                i += 1
                if not isinstance(events, list):
                    raise Finding(f"receive_handshake returned {type(events).__name__}, not a list")
                for event in events:
                    if not isinstance(event, HANDSHAKE_EVENTS):
                        raise Finding(f"unknown handshake event {event!r}")
                    data = getattr(event, "data", b"")
                    if not isinstance(data, (bytes, bytearray)):
                        raise Finding(f"{type(event).__name__}.data is {type(data).__name__}, not bytes")
                    if isinstance(event, StartClientTLS) and not proto.ctx.tls_available:
                        raise Finding("StartClientTLS on a listener without TLS")
                    if isinstance(event, CloseClient):
                        check_reply(engine, proto, data, empty_ok=True)
                    elif isinstance(event, AuthFailed):
                        check_reply(engine, proto, data, empty_ok=False)
                if check_held_bytes and (i % 16 == 0 or i == len(chunks)):
                    check_held(proto)
                if events and isinstance(events[-1], ENDING_EVENTS):
                    return Outcome("closed", type(events[-1]).__name__)
                if events and isinstance(events[-1], Authenticated):
                    if check_held_bytes:
                        check_held(proto)
                    if server_state is None:
                        return Outcome("authenticated")
                    out = proto.login_complete(server_state() if callable(server_state) else server_state)
                    if not isinstance(out, (bytes, bytearray)):
                        raise Finding("login_complete did not return bytes")
                    rest = events[-1].leftover    # the session serves it first
                    chunks = ([rest] if rest else []) + chunks[i:]
                    i = 0
                    relay = True
                    break
            if not relay:
                return Outcome("open")
        link_state = server_state() if callable(server_state) else server_state
        while i < len(chunks):
            try:
                result = proto.client_data(chunks[i])
            except ClientQuit as said:
                result = (said.to_backend, said.to_client)
                closing = True
            else:
                closing = False
            i += 1
            if not (isinstance(result, tuple) and len(result) == 2 and all(isinstance(x, (bytes, bytearray))
                                                                          for x in result)):
                raise Finding(f"client_data returned {result!r:.80}, not (bytes, bytes)")
            forward = result[0]
            if forward and not getattr(proto, "linked", True) and link_state is not None:
                out = proto.link(link_state, forward)
                if not isinstance(out, (bytes, bytearray)):
                    raise Finding("link did not return bytes")
            if check_held_bytes and (i % 16 == 0 or i == len(chunks)):
                check_held(proto)
            if closing:
                return Outcome("closed", "closing")
        return Outcome("open")
    except ProtocolError as exc:
        check_reply(engine, proto, exc.reply, empty_ok=engine == "tds" and getattr(proto, "tls", None) is not None)
        return Outcome("error", exc.kind.value)


# ---------------------------------------------------------------------------------------------- PostgreSQL

PG_USERS = UsersFile.from_dict({"users": {"alice": {
    "scram_sha_256": scram_sha_256_verifier(PASSWORD, b"0123456789abcdef", 4096),
    "md5": md5_verifier("alice", PASSWORD),
}}})


@functools.lru_cache(maxsize=None)
def _jwt_verifier():
    from multiproxy.token_auth import JwtVerifier
    return JwtVerifier(issuer="iss", audience="aud", shared_key=JWT_KEY.encode())


def pg_client(auth: str = "trust", prepared_statements: str = "pin", tls_available: bool = False,
              max_message: int = MAX_MESSAGE) -> PostgresClient:
    raw = {"auth": {"users_file": "users.toml"},
           "clusters": {"main": {"engine": "postgres", "hosts": ["db.internal:5432"]}},
           "listeners": [{"name": "pg", "listen": "127.0.0.1:6432", "cluster": "main",
                          "auth": "trust" if auth == "token" else auth}]}
    listener = build_config(raw, "", None).listeners[0]
    if auth == "token":
        listener = dataclasses.replace(listener, auth="token", token_kind="jwt", token_verifier=_jwt_verifier())
        tls_available = True
    ctx = ClientContext(listener=listener, users=PG_USERS, tls_available=tls_available, cancel_key=(1234, 5678),
                        pin_policy=PinPolicy(), max_message_size=max_message,
                        engine_options={"prepared_statements": prepared_statements})
    return PostgresClient(ctx, mock_secret=b"x" * 32)


def pg_backend_state():
    login = PostgresLogin(BackendTarget(host="db.internal", port=5432, user="alice", database="app",
                                        password=None, tls="disable"))
    login.start()
    login.feed(pgp.authentication(pgp.AUTH_OK) + pgp.parameter_status("application_name", "")
               + pgp.parameter_status("TimeZone", "UTC") + pgp.parameter_status("server_version", "16.2")
               + pgp.backend_key_data(4242, 9999) + pgp.READY_IDLE)
    return login.result


def pg_logged_in(prepared_statements: str = "pin", startup: dict | None = None,
                 max_message: int = MAX_MESSAGE) -> PostgresClient:
    client = pg_client(prepared_statements=prepared_statements, max_message=max_message)
    client.receive_handshake(pgp.startup_message(startup or {"user": "alice", "database": "app"}))
    client.login_complete(pg_backend_state())
    return client


def pg_message(kind: int, body: bytes) -> bytes:
    return bytes((kind,)) + struct.pack("!I", len(body) + 4) + body


def pg_parse(name: bytes, sql: bytes) -> bytes:
    return pg_message(ord("P"), name + b"\x00" + sql + b"\x00\x00\x00")


def _jwt(**claims) -> bytes:
    import jwt
    body = {"iss": "iss", "aud": "aud", "sub": "alice", "exp": int(time.time()) + 3600, **claims}
    return jwt.encode(body, JWT_KEY, algorithm="HS256").encode()


_SCRAM_FIRST = ScramClient("alice", PASSWORD).client_first()
PG_SSL_REQUEST = pgp.ssl_request()
PG_GSSENC_REQUEST = struct.pack("!II", 8, pgp.GSSENC_REQUEST_CODE)
PG_HANDSHAKE_STREAMS = [
    pgp.startup_message({"user": "alice", "database": "app", "application_name": "x", "options": "-c a=b"}),
    PG_SSL_REQUEST + pgp.startup_message({"user": "alice"}),
    PG_GSSENC_REQUEST + pgp.startup_message({"user": "alice"}),
    PG_GSSENC_REQUEST + PG_SSL_REQUEST + pgp.startup_message({"user": "alice"}),
    pgp.cancel_request(1234, 5678),
    pgp.startup_message({"user": "alice", "_pq_.x": "1"}),
    pgp.startup_message({"user": "alice"}) + pgp.message(b"p", pgp.cstring("SCRAM-SHA-256")
                                                         + pgp.INT32.pack(len(_SCRAM_FIRST)) + _SCRAM_FIRST)
    + pgp.message(b"p", b"c=biws,r=" + _SCRAM_FIRST[-24:] + b"xyz,p=AAAA"),
    pgp.startup_message({"user": "mallory"}) + pgp.message(b"p", b"md5" + b"0" * 32 + b"\x00"),
    pgp.startup_message({"user": "alice"}) + pgp.query("SELECT 1"),
]


@functools.lru_cache(maxsize=None)
def pg_token_streams() -> list[bytes]:
    start = PG_SSL_REQUEST + pgp.startup_message({"user": "alice", "database": "app"})
    return [start + pgp.message(b"p", token + b"\x00") for token in (
        _jwt(), _jwt(exp=int(time.time()) - 60), _jwt(sub="mallory"), _jwt(aud="other"), b"e30.e30.", b"")]


def _b64(data: bytes) -> bytes:
    import base64
    return base64.urlsafe_b64encode(data).rstrip(b"=")


@functools.lru_cache(maxsize=None)
def token_samples() -> list[bytes]:
    """Tokens for the token listeners of every engine: valid, expired, another user or audience, valid-looking
    JWTs with bad signatures (another key, a flipped signature, alg none, another algorithm), near and over the
    length limit, and garbage."""
    import jwt
    from multiproxy.token_auth import MAX_TOKEN_LENGTH
    good = _jwt()
    head, body, sig = good.split(b".")
    claims = {"iss": "iss", "aud": "aud", "sub": "alice", "exp": int(time.time()) + 3600}
    return [
        good, _jwt(exp=int(time.time()) - 60), _jwt(sub="mallory"), _jwt(aud="other"), _jwt(iss="other"),
        _jwt(nbf=int(time.time()) + 3600), _jwt(sub=None), _jwt(sub=""),
        jwt.encode(claims, "another-hs256-key-of-forty-characters!!!", algorithm="HS256").encode(),
        head + b"." + body + b"." + sig[:-2] + (b"AA" if sig[-2:] != b"AA" else b"BB"),
        head + b"." + body + b".",
        _b64(b'{"alg":"none","typ":"JWT"}') + b"." + body + b".",
        _b64(b'{"alg":"HS512","typ":"JWT"}') + b"." + body + b"." + sig,
        _b64(b'{"alg":"RS256","kid":"x"}') + b"." + body + b"." + sig,
        _b64(b"[]") + b"." + body + b"." + sig,
        head + b"." + _b64(b"not json") + b"." + sig,
        _jwt(pad="x" * (MAX_TOKEN_LENGTH * 3 // 4 - 300)),       # valid, near the limit
        _jwt(pad="x" * MAX_TOKEN_LENGTH),                        # valid-looking, over the limit
        good + b"A" * 70000,                                     # over every message limit
        b"e30.e30.", b".", b"..", b"", b"\x00", "é".encode() * 8, b"\xff\xfe\x80" * 10,
    ]


# Tokens: a sample, a sample with edits, or arbitrary bytes and text.
token_values = st.one_of(st.sampled_from(token_samples()), st.sampled_from(token_samples()[:16]),
                         st.builds(mutate, st.sampled_from(token_samples()[:16]), edits),
                         st.binary(max_size=300), st.text(max_size=100).map(str.encode))


FRONTEND_KINDS = b"QPBDECSHXFdcf"
PG_BIND = pg_message(ord("B"), b"\x00s1\x00\x00\x00\x00\x00\x00\x00")
PG_DESCRIBE = pg_message(ord("D"), b"Ss1\x00")
PG_EXECUTE = pg_message(ord("E"), b"\x00\x00\x00\x00\x00")
PG_SYNC = pg_message(ord("S"), b"")
PG_CLIENT_STREAMS = [
    pgp.query("SELECT 1"),
    pgp.query("BEGIN; SET search_path = x; CREATE TEMP TABLE t (id int)"),
    pg_parse(b"", b"SELECT $1") + PG_SYNC + pg_message(ord("D"), b"S\x00") + PG_SYNC
    + pg_message(ord("B"), b"\x00\x00\x00\x00\x00\x00\x00\x00") + PG_EXECUTE + PG_SYNC,
    pg_parse(b"s1", b"SELECT 1") + PG_BIND + PG_DESCRIBE + PG_EXECUTE + pg_message(ord("C"), b"Ss1\x00") + PG_SYNC,
    pgp.query("COPY t FROM STDIN") + pg_message(ord("d"), b"1\n") + pg_message(ord("c"), b""),
    pg_message(ord("F"), b"\x00\x00\x04\xd2\x00\x00\x00\x00\x00\x00") + pg_message(ord("X"), b""),
]

# Bodies either arbitrary or assembled from the pieces parsers look for (NULs, names, 'S'/'P' targets).
pg_bodies = st.one_of(
    st.binary(max_size=40),
    st.lists(st.sampled_from([b"\x00", b"s1", b"S", b"P", b"\x00\x00", b"\x00\x01", b"SELECT 1"]),
             max_size=6).map(b"".join),
)
pg_frontend_message = st.tuples(st.sampled_from(FRONTEND_KINDS), pg_bodies).map(lambda kb: pg_message(*kb))
pg_framed_messages = st.lists(pg_frontend_message, max_size=8).map(b"".join)
# A header whose length field says anything up to 2 GiB and more, followed by a little of the body.
pg_length_lies = st.builds(lambda kind, length, body: bytes((kind,)) + struct.pack("!I", length) + body,
                           st.sampled_from(FRONTEND_KINDS), st.one_of(st.integers(0, 64), st.integers(0, 0xFFFFFFFF),
                                                                      st.just(0x80000000)), st.binary(max_size=32))
pg_startup_lies = st.builds(lambda length, code, body: struct.pack("!II", length, code) + body,
                            st.one_of(st.integers(0, 16), st.integers(0, 0xFFFFFFFF), st.just(0x80000000)),
                            st.sampled_from([pgp.PROTOCOL_VERSION_3, pgp.SSL_REQUEST_CODE, pgp.GSSENC_REQUEST_CODE,
                                             pgp.CANCEL_REQUEST_CODE, 2 << 16]), st.binary(max_size=32))


# ---------------------------------------------------------------------------------------------- MySQL

MYSQL_USERS = UsersFile()
MYSQL_USERS.add("alice", PASSWORD, kinds=["mysql_native_password", "caching_sha2_password"])
MYSQL_ENGINE = MySQLEngine()
MYSQL_CAPS = (myp.CLIENT_PROTOCOL_41 | myp.CLIENT_SECURE_CONNECTION | myp.CLIENT_PLUGIN_AUTH
              | myp.CLIENT_CONNECT_WITH_DB | myp.CLIENT_MULTI_STATEMENTS | myp.CLIENT_MULTI_RESULTS)


def mysql_client(auth: str = "trust", tls_available: bool = False, max_message: int = MAX_MESSAGE):
    raw = {"auth": {"users_file": "users.toml"},
           "clusters": {"main": {"engine": "mysql", "hosts": ["db.internal:3306"]}},
           "listeners": [{"name": "my", "listen": "127.0.0.1:6033", "cluster": "main",
                          "auth": "trust" if auth == "token" else auth}]}
    listener = build_config(raw, "", None).listeners[0]
    if auth == "token":
        listener = dataclasses.replace(listener, auth="token", token_kind="jwt", token_verifier=_jwt_verifier())
        tls_available = True
    ctx = ClientContext(listener=listener, users=MYSQL_USERS,
                        tls_available=tls_available, cancel_key=7, pin_policy=PinPolicy(), max_message_size=max_message)
    ctx.cancel = lambda key, terminate=False: None
    return MYSQL_ENGINE.client_protocol(ctx)


def mysql_server_state() -> MySQLServerState:
    return MySQLServerState(version=b"10.11.6-MariaDB", thread_id=99, mariadb=True, schema="app", login_schema="app",
                            multi_statements=True)


def mysql_logged_in(deprecate_eof: bool = False, max_message: int = MAX_MESSAGE):
    client = mysql_client(max_message=max_message)
    client.start()
    caps = MYSQL_CAPS | (myp.CLIENT_DEPRECATE_EOF if deprecate_eof else 0)
    events = client.receive_handshake(myp.packet(1, myp.handshake_response(caps, 45, b"alice", b"", b"app",
                                                                            b"mysql_native_password")))
    assert isinstance(events[-1], Authenticated)
    client.login_complete(mysql_server_state())
    return client


MYSQL_SSL_REQUEST = myp.packet(1, myp.ssl_request(MYSQL_CAPS | myp.CLIENT_SSL, 45))
MYSQL_HANDSHAKE_STREAMS = [
    myp.packet(1, myp.handshake_response(MYSQL_CAPS, 45, b"alice", b"\x01" * 20, b"app", b"mysql_native_password")),
    myp.packet(1, myp.handshake_response(MYSQL_CAPS | myp.CLIENT_CONNECT_ATTRS | myp.CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA,
                                         45, b"alice", b"\x02" * 32, b"app", b"caching_sha2_password",
                                         {"_client_name": "fuzz"})),
    # a plugin the listener does not use: an auth switch, answered in packet 3
    myp.packet(1, myp.handshake_response(MYSQL_CAPS, 45, b"alice", b"", b"app", b"client_ed25519"))
    + myp.packet(3, b"\x03" * 20),
    # caching_sha2 full authentication: public key request, then an RSA-encrypted password (garbage here)
    myp.packet(1, myp.handshake_response(MYSQL_CAPS, 45, b"alice", b"\x05" * 32, b"app", b"caching_sha2_password"))
    + myp.packet(3, b"\x02") + myp.packet(5, b"\x07" * 256),
    MYSQL_SSL_REQUEST + myp.packet(2, myp.handshake_response(MYSQL_CAPS | myp.CLIENT_SSL, 45, b"alice", b"", b"app",
                                                             b"mysql_native_password")),
    myp.packet(1, myp.handshake_response(MYSQL_CAPS, 45, b"alice", b"", b"app", b"mysql_native_password"))
    + myp.packet(0, b"\x03SELECT 1"),
]


def _mysql_token_stream(token: bytes, how: str, user: bytes) -> bytes:
    """What a client sends on a token listener after its SSL request (sequence 1): the handshake response
    (sequence 2), then, when it named another plugin, the mysql_clear_password answer to the auth switch
    (sequence 4). `how`: switch (mysql_native_password first), clear (the token in the handshake response),
    bare (the switch answer without its NUL)."""
    caps = MYSQL_CAPS | myp.CLIENT_SSL
    if how == "clear":
        return myp.packet(2, myp.handshake_response(caps | myp.CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA, 45, user,
                                                    token + b"\x00", b"app", b"mysql_clear_password"))
    first = myp.packet(2, myp.handshake_response(caps, 45, user, b"\x01" * 20, b"app", b"mysql_native_password"))
    return first + myp.packet(4, token if how == "bare" else token + b"\x00")


# Token streams: built, or built and then edited anywhere (headers, sequence ids, the handshake response).
mysql_token_streams = st.builds(
    lambda token, how, user, e: mutate(_mysql_token_stream(token, how, user), e) if e
    else _mysql_token_stream(token, how, user),
    token_values, st.sampled_from(["switch", "switch", "clear", "bare"]), st.sampled_from([b"alice", b"mallory"]),
    st.one_of(st.just([]), st.just([]), edits))

mysql_commands = st.sampled_from([0x00, 0x01, 0x02, 0x03, 0x04, 0x09, 0x0C, 0x0E, 0x11, 0x16, 0x17, 0x18, 0x19,
                                  0x1A, 0x1B, 0x1C, 0x1F, 0x12, 0x55])
mysql_packets = st.builds(lambda seq, cmd, body: myp.packet(seq, bytes((cmd,)) + body),
                          st.sampled_from([0, 0, 0, 1]), mysql_commands, st.binary(max_size=40))
mysql_packet_streams = st.lists(mysql_packets, max_size=6).map(b"".join)
MYSQL_CLIENT_STREAMS = [
    myp.packet(0, b"\x03SELECT 1"),
    myp.packet(0, b"\x03BEGIN") + myp.packet(0, b"\x03SET @a = 1; SET autocommit = 0") + myp.packet(0, b"\x01"),
    myp.packet(0, b"\x16SELECT ?") + myp.packet(0, b"\x17\x01\x00\x00\x00\x00\x01\x00\x00\x00\x00\x01\x08\x00"
                                                + b"\x01" * 8) + myp.packet(0, b"\x19\x01\x00\x00\x00"),
    myp.packet(0, b"\x02app") + myp.packet(0, b"\x0c\x05\x00\x00\x00") + myp.packet(0, b"\x1b\x00\x00"),
    myp.packet(0, b"\x11bob\x00\x00app\x00\x2d\x00mysql_native_password\x00"),
    myp.packet(0, b"\x03LOAD DATA LOCAL INFILE 'x' INTO TABLE t") + myp.packet(2, b"1\n") + myp.packet(3, b""),
]
# A header whose length says anything up to 16 MiB - 1 (the continuation case) and more is impossible in 3 bytes.
mysql_length_lies = st.builds(lambda length, seq, body: length.to_bytes(3, "little") + bytes((seq,)) + body,
                              st.one_of(st.integers(0, 64), st.integers(0, 0xFFFFFF), st.just(0xFFFFFF)),
                              st.sampled_from([0, 1, 2, 3]), st.binary(max_size=32))


# ---------------------------------------------------------------------------------------------- TDS

TDS_ENGINE = TDSEngine()
TDS_USERS = UsersFile()
TDS_USERS.add("app", "pw", kinds=["tds_sha256"])
TDS_PRELOGIN = tp.encode_message(tp.PRELOGIN, tp.Prelogin.build(encryption=tp.ENCRYPT_NOT_SUP).encode())
TDS_PRELOGIN_TLS = tp.encode_message(tp.PRELOGIN, tp.Prelogin.build(encryption=tp.ENCRYPT_ON).encode())
TDS_LOGIN = tp.encode_message(tp.LOGIN7, tp.Login7(username="app", password="pw", database="db").encode())
TDS_BAD_LOGIN = tp.encode_message(tp.LOGIN7, tp.Login7(username="app", password="wrong").encode())
TDS_PACKET_TYPES = sorted(tp.PACKET_TYPES)


@functools.lru_cache(maxsize=None)
def tds_tls_context() -> ssl.SSLContext:
    """The TLS 1.2 server context a TDS listener with a certificate uses (a throwaway self-signed one)."""
    from multiproxy.lab.tds_server import make_self_signed
    directory = tempfile.mkdtemp(prefix="mp-fuzz-tls-")
    cert, key = make_self_signed(directory)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    for name in (cert, key):
        os.unlink(name)
    os.rmdir(directory)
    return context


@functools.lru_cache(maxsize=None)
def tls_client_hello() -> bytes:
    """A real TLS ClientHello, as a TDS client sends it inside PRELOGIN packets."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="localhost")
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


def tds_client(auth: str = "scram-sha-256", tls: bool = False, max_message: int = MAX_MESSAGE):
    from multiproxy.contract import contract_context
    ctx = contract_context(TDS_ENGINE, auth)
    ctx.users = TDS_USERS
    ctx.max_message_size = max_message
    if tls:
        ctx.tls_available = True
        ctx.tls_context = tds_tls_context()
    return TDS_ENGINE.client_protocol(ctx)


def tds_token_client(max_message: int = MAX_MESSAGE):
    """A TDS token listener (JWT, TLS inside PRELOGIN with the throwaway certificate)."""
    proto = tds_client("trust", tls=True, max_message=max_message)
    proto.ctx.listener = dataclasses.replace(proto.ctx.listener, auth="token", token_kind="jwt",
                                             token_verifier=_jwt_verifier())
    return proto


@functools.lru_cache(maxsize=None)
def _tls_client_context() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


class TdsTlsPeer:
    """The client's end of TLS inside PRELOGIN: completes the handshake with a TDS client protocol, encrypts what
    the fuzzer sends after it and decrypts the replies (so that the oracle reads them)."""

    def __init__(self):
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = _tls_client_context().wrap_bio(self.incoming, self.outgoing, server_hostname="localhost")

    def handshake(self, proto) -> None:
        for _ in range(8):
            try:
                self.tls.do_handshake()
                done = True
            except ssl.SSLWantReadError:
                done = False
            out = self.outgoing.read()
            if out:
                for event in proto.receive_handshake(tp.encode_message(tp.PRELOGIN, out)):
                    if not isinstance(event, SendToClient):
                        raise Finding(f"the TLS handshake inside PRELOGIN answered {event!r}")
                    for message in tp.MessageReader().feed(event.data):
                        self.incoming.write(message.data)
            if done:
                if proto.phase is not TDSPhase.LOGIN:
                    raise Finding(f"TLS handshake done, but the protocol is in phase {proto.phase!r}")
                return
        raise Finding("the TLS handshake inside PRELOGIN did not finish")

    def encrypt(self, data: bytes) -> bytes:
        self.tls.write(data)
        return self.outgoing.read()

    def decrypt(self, data: bytes) -> bytes:
        self.incoming.write(data)
        plain = bytearray()
        try:
            while True:
                chunk = self.tls.read(65536)
                if not chunk:
                    break
                plain += chunk
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLError as exc:
            raise Finding(f"the client cannot decrypt the reply: {exc}") from None
        if self.incoming.pending:
            raise Finding(f"the reply ends in a partial TLS record ({self.incoming.pending} bytes)")
        return bytes(plain)


# Stands for the server's PRELOGIN NONCEOPT in generated LOGIN7s: the run puts in the nonce the server sent.
TDS_NONCE_MARK = bytes(range(0xA0, 0xA0 + tp.NONCE_SIZE))


def tds_token_prelogin(encryption: int = tp.ENCRYPT_ON, fedauth: int | None = 1, nonce: bytes | None = b"\x11" * 32):
    return tp.encode_message(tp.PRELOGIN, tp.Prelogin.build(encryption=encryption, fedauth_required=fedauth,
                                                            nonce=nonce).encode())


TDS_TOKEN_PRELOGINS = {"on": tds_token_prelogin(), "off": tds_token_prelogin(tp.ENCRYPT_OFF),
                       "nofed": tds_token_prelogin(fedauth=None, nonce=None)}


def tds_fedauth_data(options: int, token: bytes, length: int | None, nonce: bytes, tail: bytes = b"") -> bytes:
    """FEDAUTH FeatureData (security token library): Options, token length, token, nonce; any of them lying."""
    return bytes([options]) + struct.pack("<I", len(token) if length is None else length & 0xFFFFFFFF) + token \
        + nonce + tail


def tds_fedauth_login(user: str, data: bytes, extra: dict | None = None) -> bytes:
    payload = tp.Login7(username=user, database="app", features={tp.FEATURE_FEDAUTH: data, **(extra or {})}).encode()
    return tp.encode_message(tp.LOGIN7, payload)


def tds_logged_in(max_message: int = MAX_MESSAGE):
    proto = tds_client(max_message=max_message)
    proto.receive_handshake(TDS_PRELOGIN)
    events = proto.receive_handshake(TDS_LOGIN)
    assert isinstance(events[-1], Authenticated)
    proto.login_complete(TDSServerState())
    return proto


def tds_packet(msg_type: int, status: int, payload: bytes, length: int | None = None) -> bytes:
    size = tp.HEADER_SIZE + len(payload) if length is None else length
    return struct.pack(">BBHHBB", msg_type, status, size & 0xFFFF, 0, 1, 0) + payload


# Packets of any type and status (EOM or not, IGNORE, RESETCONNECTION), honest or lying lengths.
tds_packets = st.builds(
    tds_packet, st.one_of(st.sampled_from(TDS_PACKET_TYPES), st.integers(0, 255)),
    st.sampled_from([0, tp.STATUS_EOM, tp.STATUS_EOM | tp.STATUS_IGNORE, tp.STATUS_IGNORE, 0x08, 0x10, 0x09]),
    st.binary(max_size=48), st.one_of(st.none(), st.none(), st.integers(0, 0xFFFF)))
tds_packet_streams = st.lists(tds_packets, max_size=8).map(b"".join)
# For floods: also packets near the largest size, so that a few dozen make a message no limit allows.
tds_big_packets = st.one_of(tds_packets, st.builds(
    tds_packet, st.sampled_from(TDS_PACKET_TYPES), st.sampled_from([0, 0x08]),
    st.integers(0, tp.MAX_PACKET_SIZE - tp.HEADER_SIZE).map(lambda n: b"\x00" * n)))
_SQL = tp.SqlBatch("SELECT 1; SET ANSI_NULLS ON").encode()
TDS_CLIENT_STREAMS = [
    tp.encode_message(tp.SQL_BATCH, _SQL),
    tp.encode_message(tp.SQL_BATCH, tp.SqlBatch("BEGIN TRAN; UPDATE t SET a = 1").encode(), 512),
    tp.encode_message(tp.RPC, bytes.fromhex("16000000120000000200000000000000000100000000") + b"\xff\xff\x0a\x00\x00\x00"
                      + b"\x00\xe7\x40\x1f\x09\x04\xd0\x00\x34\x10\x00" + "SELECT 1".encode("utf-16-le")),
    tp.encode_message(tp.ATTENTION, b""),
    tp.encode_message(tp.TRANSACTION_MANAGER, bytes.fromhex("16000000120000000200000000000000000100000000")
                      + b"\x05\x00\x00"),
    tp.encode_message(tp.SQL_BATCH, _SQL, status=tp.STATUS_RESETCONNECTION) + tp.encode_message(tp.ATTENTION, b""),
]
TDS_HANDSHAKE_STREAMS = [TDS_PRELOGIN + TDS_LOGIN, TDS_PRELOGIN + TDS_BAD_LOGIN,
                         TDS_PRELOGIN + tp.encode_message(tp.LOGIN7, tp.Login7(username="app", password="pw",
                                                                                database="db").encode(), 512),
                         TDS_PRELOGIN + TDS_LOGIN + tp.encode_message(tp.SQL_BATCH, _SQL)]


# ---------------------------------------------------------------------------------------------- targets

@dataclass
class Case:
    """One generated example: what to feed, how it is cut, and the variant of the client."""

    data: bytes
    sizes: list
    variant: str = ""

    def chunks(self) -> list[bytes]:
        return chunks_of(self.data, self.sizes)


@dataclass
class Target:
    """One client-facing parser entry point and the inputs that reach it."""

    name: str
    engine: str
    cases: st.SearchStrategy           # of Case
    run: Callable[[Case], Outcome]
    about: str = ""


def _cases(data: st.SearchStrategy, chunking: st.SearchStrategy = sizes, variants=("",)) -> st.SearchStrategy:
    return st.builds(Case, data, chunking, st.sampled_from(list(variants)))


def _pg_handshake(case: Case) -> Outcome:
    auth, _, tls = case.variant.partition("+")
    return drive("postgres", pg_client(auth, tls_available=bool(tls)), case.chunks(), relay=False,
                 server_state=pg_backend_state)


def _pg_password(case: Case) -> Outcome:
    auth, _, user = case.variant.partition(":")
    client = pg_client(auth)
    client.receive_handshake(pgp.startup_message({"user": user}))
    return drive("postgres", client, case.chunks(), relay=False)


def _pg_relay(case: Case) -> Outcome:
    variant = case.variant
    client = pg_logged_in(prepared_statements="virtualize" if variant == "virtualize" else "pin")
    if variant == "lost":
        client.client_data(pgp.query("BEGIN"))
        client.backend_data(pgp.message(b"C", pgp.cstring("BEGIN")) + pgp.ready_for_query(pgp.TX_IN_TRANSACTION))
        client.backend_lost("connection reset")
    elif variant == "virtualize":
        client.link(pg_backend_state(), client.client_data(pg_parse(b"s1", b"SELECT 1") + PG_SYNC)[0])
    return drive("postgres", client, case.chunks(), relay=True, server_state=pg_backend_state)


def _mysql_handshake(case: Case) -> Outcome:
    auth, _, tls = case.variant.partition("+")
    client = mysql_client(auth, tls_available=bool(tls))
    greeting = client.start()
    if not greeting:
        raise Finding("no greeting from the MySQL client protocol")
    return drive("mysql", client, case.chunks(), relay=False, server_state=mysql_server_state)


def _mysql_switch(case: Case) -> Outcome:
    """After a handshake response that asks for another plugin (switch) or full caching_sha2 authentication."""
    auth, _, stage = case.variant.partition(":")
    client = mysql_client(auth)
    client.start()
    plugin = b"client_ed25519" if stage == "switch" else auth.encode()
    events = client.receive_handshake(myp.packet(1, myp.handshake_response(MYSQL_CAPS, 45, b"alice", b"\x09" * 20,
                                                                           b"app", plugin)))
    if not isinstance(events[-1], SendToClient):
        raise Finding(f"expected an auth switch or more-data request, got {events!r}")
    return drive("mysql", client, case.chunks(), relay=False, server_state=mysql_server_state)


def _mysql_relay(case: Case) -> Outcome:
    client = mysql_logged_in(deprecate_eof=case.variant == "deprecate_eof")
    return drive("mysql", client, case.chunks(), relay=True, server_state=mysql_server_state)


def _tds_handshake(case: Case) -> Outcome:
    proto = tds_client(case.variant or "scram-sha-256")
    return drive("tds", proto, case.chunks(), relay=False, server_state=TDSServerState)


def _tds_after_prelogin(case: Case) -> Outcome:
    proto = tds_client(case.variant or "scram-sha-256")
    proto.receive_handshake(TDS_PRELOGIN)
    return drive("tds", proto, case.chunks(), relay=False, server_state=TDSServerState)


def _tds_tls(case: Case) -> Outcome:
    proto = tds_client(tls=True)
    return drive("tds", proto, case.chunks(), relay=False, server_state=TDSServerState)


def _tds_relay(case: Case) -> Outcome:
    return drive("tds", tds_logged_in(), case.chunks(), relay=True, server_state=TDSServerState)


def _login7_bodies() -> st.SearchStrategy:
    body = tp.Login7(username="app", password="pw", database="db").encode()
    return st.one_of(st.builds(mutate, st.just(body), edits), st.binary(min_size=36, max_size=200)).map(
        lambda payload: tp.encode_message(tp.LOGIN7, payload))


def _tls_streams() -> st.SearchStrategy:
    hello = st.builds(lambda: tls_client_hello())
    inside = hello.map(lambda h: tp.encode_message(tp.PRELOGIN, h))
    return st.one_of(
        st.builds(lambda h, e: TDS_PRELOGIN_TLS + mutate(tp.encode_message(tp.PRELOGIN, h), e), hello, edits),
        st.builds(lambda m, junk: TDS_PRELOGIN_TLS + m + junk, inside, st.binary(max_size=200)),
        st.builds(lambda junk: TDS_PRELOGIN_TLS + tp.encode_message(tp.PRELOGIN, junk), st.binary(max_size=300)),
        st.builds(lambda junk: TDS_PRELOGIN_TLS + junk, st.binary(max_size=300)),
        st.builds(lambda stream: TDS_PRELOGIN_TLS + stream, tds_packet_streams),
    )


def _mysql_token(case: Case) -> Outcome:
    """A MySQL token listener: the SSL request goes first and alone (the core reads it exactly and starts TLS:
    handshake_read_size), then the handshake response and the clear-password answer, whole or in chunks."""
    client = mysql_client("token")
    client.start()
    if case.variant == "tls":
        events = client.receive_handshake(MYSQL_SSL_REQUEST)
        if not (events and isinstance(events[-1], StartClientTLS)):
            raise Finding(f"the SSL request on a token listener did not start TLS: {events!r}")
    return drive("mysql", client, case.chunks(), relay=False, server_state=mysql_server_state)


def _tds_token_prelogin(case: Case) -> Outcome:
    return drive("tds", tds_token_client(), case.chunks(), relay=False)


def _tds_token_login(case: Case) -> Outcome:
    """A TDS token listener: PRELOGIN (FEDAUTHREQUIRED, NONCEOPT; encryption ON or login-only), the TLS handshake
    inside PRELOGIN by a real client, then the generated LOGIN7 encrypted, one TLS record per piece (variant
    '+raw': the records' bytes cut again). Replies under TLS are decrypted for the oracle."""
    mode, _, raw = case.variant.partition("+")
    proto = tds_token_client()
    events = proto.receive_handshake(TDS_TOKEN_PRELOGINS[mode])
    if not (events and isinstance(events[-1], SendToClient)):
        raise Finding(f"PRELOGIN asking for encryption on a token listener was answered {events!r}")
    peer = TdsTlsPeer()
    peer.handshake(proto)
    proto.fuzz_peer = peer
    plain = case.data.replace(TDS_NONCE_MARK, proto.server_nonce or TDS_NONCE_MARK)
    step = len(plain) // 256
    records = [peer.encrypt(piece) for piece in chunks_of(plain, [max(n, step) for n in case.sizes])]
    if raw:
        records = chunks_of(b"".join(records), case.sizes)
    outcome = drive("tds", proto, records, relay=False)
    if outcome.kind == "authenticated":
        reply = proto.login_complete(TDSServerState())
        if proto.tls_full:
            reply = peer.decrypt(reply)
        try:
            tokens = [t.type for m in tp.MessageReader().feed(reply) for t in tk.TokenReader().read(m.data)]
        except (tp.ProtocolError, tk.ProtocolError) as exc:
            raise Finding(f"the login reply is not TDS tokens: {exc}") from None
        if tk.TOKEN_LOGINACK not in tokens or proto.fedauth_ack and tk.TOKEN_FEATUREEXTACK not in tokens:
            raise Finding(f"the login reply lacks LOGINACK or FEATUREEXTACK: {tokens}")
    return outcome


def _tds_token_logins() -> st.SearchStrategy:
    """LOGIN7s for a token listener: FEDAUTH feature data with any Options byte, honest or lying token length,
    UTF-16 or raw token bytes, the server's nonce or none, a short or long one; the token as the password; edits."""
    utf16 = token_values.map(lambda t: t.decode("utf-8", "replace").encode("utf-16-le"))
    fed = st.builds(
        tds_fedauth_data,
        st.one_of(st.sampled_from([0x03, 0x03, 0x02, 0x01, 0x00, 0x05, 0x04]), st.integers(0, 255)),
        st.one_of(utf16, utf16, st.binary(max_size=64)),
        st.one_of(st.none(), st.none(), st.none(), st.integers(0, 600), st.integers(0, 0xFFFFFFFF)),
        st.sampled_from([TDS_NONCE_MARK, TDS_NONCE_MARK, b"", TDS_NONCE_MARK[:31], TDS_NONCE_MARK + b"\x00",
                         b"\x11" * 32, b"\x00" * 64]),
        st.one_of(st.just(b""), st.just(b""), st.binary(max_size=8)))
    users = st.sampled_from(["", "", "alice", "mallory"])
    extras = st.sampled_from([None, None, {0x0A: b"\x01"}, {0x04: b""}])
    fed_logins = st.builds(tds_fedauth_login, users, fed, extras)
    password_logins = st.builds(lambda user, token: tp.encode_message(tp.LOGIN7, tp.Login7(
        username=user, password=token.decode("utf-8", "replace")[:30000], database="app").encode()), users,
        token_values)       # LOGIN7 offsets and lengths are 16-bit: a longer password cannot be encoded
    logins = st.one_of(fed_logins, fed_logins, password_logins)
    return st.one_of(logins, logins, st.builds(mutate, logins, edits),
                     st.builds(lambda login, tail: login + tail, logins, tds_packet_streams))


def _tds_token_prelogin_streams() -> st.SearchStrategy:
    hello = tp.encode_message(tp.PRELOGIN, tls_client_hello())
    streams = [tds_token_prelogin() + hello, tds_token_prelogin(tp.ENCRYPT_OFF) + hello,
               tds_token_prelogin(tp.ENCRYPT_REQ, 0, b"\x22" * 31) + hello,
               tds_token_prelogin(tp.ENCRYPT_NOT_SUP) + tds_fedauth_login("", tds_fedauth_data(
                   0x03, token_samples()[0].decode().encode("utf-16-le"), None, TDS_NONCE_MARK)),
               tds_token_prelogin(tp.ENCRYPT_ON, 1, b"\x11" * 33) + TDS_LOGIN]
    return st.one_of(mutated(streams), st.builds(
        lambda fed, nonce, enc: tds_token_prelogin(enc, fed, nonce) + hello,
        st.one_of(st.none(), st.integers(0, 255)), st.one_of(st.none(), st.binary(max_size=40)),
        st.integers(0, 255)))


def build_targets() -> list[Target]:
    pg_auths = ["trust", "md5", "scram-sha-256", "trust+tls", "scram-sha-256+tls", "token"]
    my_auths = ["trust", "mysql_native_password", "caching_sha2_password", "trust+tls", "caching_sha2_password+tls"]
    tds_auths = ["scram-sha-256", "trust"]
    return [
        # PostgreSQL: startup packet, SSLRequest, GSSENCRequest, CancelRequest, then authentication messages
        Target("pg.startup.bytes", "postgres", _cases(st.binary(max_size=400), sizes, pg_auths), _pg_handshake,
               "arbitrary bytes as the first thing a client sends"),
        Target("pg.startup.mutated", "postgres", _cases(mutated(PG_HANDSHAKE_STREAMS), sizes, pg_auths), _pg_handshake,
               "startup, SSLRequest, GSSENCRequest, CancelRequest and SCRAM/md5 exchanges with edits"),
        Target("pg.startup.lengths", "postgres",
               _cases(st.one_of(pg_startup_lies, repeated(st.binary(min_size=1, max_size=64))), wide_sizes, pg_auths),
               _pg_handshake, "startup packets with any length and request code; floods"),
        Target("pg.auth.password", "postgres",
               _cases(st.one_of(st.binary(max_size=200).map(lambda b: pgp.message(b"p", b) * 2),
                                pg_length_lies, mutated([pgp.message(b"p", b"md5" + b"0" * 32 + b"\x00")])),
                      sizes, ["md5:alice", "md5:mallory", "scram-sha-256:alice", "scram-sha-256:mallory"]),
               _pg_password, "password, SASLInitialResponse and SASLResponse messages"),
        Target("pg.auth.token", "postgres",
               st.builds(lambda streams, e, s: Case(mutate(streams, e) if e else streams, s, "token"),
                         st.sampled_from(pg_token_streams()), st.one_of(st.just([]), edits), sizes),
               _pg_handshake, "JWTs (valid, expired, wrong user/audience, garbage) on a token listener"),
        Target("pg.relay.bytes", "postgres", _cases(st.binary(max_size=400), sizes, ["pin", "virtualize", "lost"]),
               _pg_relay, "arbitrary bytes after login"),
        Target("pg.relay.framed", "postgres",
               _cases(pg_framed_messages, sizes, ["pin", "virtualize", "lost"]), _pg_relay,
               "well-framed frontend messages with arbitrary bodies"),
        Target("pg.relay.mutated", "postgres", _cases(mutated(PG_CLIENT_STREAMS), sizes, ["pin", "virtualize"]),
               _pg_relay, "Query, extended protocol, COPY and FunctionCall streams with edits"),
        Target("pg.relay.lengths", "postgres",
               _cases(st.one_of(pg_length_lies, repeated(pg_frontend_message), repeated(pg_length_lies, 50),
                                repeated(st.sampled_from(PG_CLIENT_STREAMS))),
                      wide_sizes, ["pin", "virtualize"]), _pg_relay,
               "oversize and lying length fields, floods of messages"),
        # MySQL: handshake response, SSL request, auth switch and full-auth answers, then commands
        Target("mysql.handshake.bytes", "mysql", _cases(st.binary(max_size=400), sizes, my_auths), _mysql_handshake,
               "arbitrary bytes after the greeting"),
        Target("mysql.handshake.response", "mysql",
               _cases(st.binary(min_size=32, max_size=160).map(lambda b: myp.packet(1, b)), sizes, my_auths),
               _mysql_handshake, "arbitrary HandshakeResponse41 and SSLRequest bodies"),
        Target("mysql.handshake.mutated", "mysql", _cases(mutated(MYSQL_HANDSHAKE_STREAMS), sizes, my_auths),
               _mysql_handshake, "valid handshakes (native, caching_sha2, switch, full auth, SSL) with edits"),
        Target("mysql.handshake.lengths", "mysql",
               _cases(st.one_of(mysql_length_lies, repeated(st.binary(min_size=1, max_size=64))), wide_sizes, my_auths),
               _mysql_handshake, "lying packet lengths and floods during the handshake"),
        Target("mysql.auth.switch", "mysql",
               _cases(st.one_of(st.binary(max_size=300).map(lambda b: myp.packet(3, b)), st.binary(max_size=300),
                                st.binary(max_size=300).map(lambda b: myp.packet(3, b"\x02") + myp.packet(5, b))),
                      sizes, ["mysql_native_password:switch", "caching_sha2_password:switch",
                              "caching_sha2_password:full"]),
               _mysql_switch, "auth switch responses and caching_sha2 full-authentication packets"),
        Target("mysql.auth.token", "mysql",
               st.one_of(_cases(mysql_token_streams, sizes, ["tls"]),
                         _cases(st.builds(lambda t: myp.packet(1, myp.handshake_response(
                             MYSQL_CAPS | myp.CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA, 45, b"alice", t, b"app",
                             b"mysql_clear_password")), token_values),
                                sizes, ["plain"])),
               _mysql_token, "JWTs (valid, bad signatures, oversize, garbage) in mysql_clear_password on a token listener"),
        Target("mysql.commands.bytes", "mysql", _cases(st.binary(max_size=400), sizes, ["", "deprecate_eof"]),
               _mysql_relay, "arbitrary bytes after login"),
        Target("mysql.commands.framed", "mysql", _cases(mysql_packet_streams, sizes, ["", "deprecate_eof"]),
               _mysql_relay, "command packets with arbitrary bodies"),
        Target("mysql.commands.mutated", "mysql", _cases(mutated(MYSQL_CLIENT_STREAMS), sizes, [""]), _mysql_relay,
               "queries, prepared statements, COM_CHANGE_USER and LOCAL INFILE streams with edits"),
        Target("mysql.commands.lengths", "mysql",
               _cases(st.one_of(mysql_length_lies, repeated(mysql_packets), repeated(mysql_length_lies, 50),
                                repeated(st.sampled_from(MYSQL_CLIENT_STREAMS[:4]))),
                      wide_sizes, [""]), _mysql_relay, "lying lengths, 16 MiB continuations and floods"),
        # TDS: PRELOGIN (with TLS inside PRELOGIN packets), LOGIN7, then packet framing and messages
        Target("tds.prelogin.bytes", "tds", _cases(st.binary(max_size=400), sizes, tds_auths), _tds_handshake,
               "arbitrary bytes as the first thing a client sends"),
        Target("tds.prelogin.framed", "tds", _cases(tds_packet_streams, sizes, tds_auths), _tds_handshake,
               "packets of any type, status and length during the login"),
        Target("tds.prelogin.mutated", "tds", _cases(mutated(TDS_HANDSHAKE_STREAMS), sizes, tds_auths),
               _tds_handshake, "PRELOGIN + LOGIN7 exchanges with edits"),
        Target("tds.prelogin.flood", "tds",
               _cases(st.one_of(repeated(tds_big_packets, 200), repeated(st.binary(min_size=1, max_size=64))), wide_sizes,
                      tds_auths), _tds_handshake, "floods of packets (messages without an end) during the login"),
        Target("tds.login7", "tds", _cases(_login7_bodies(), sizes, tds_auths), _tds_after_prelogin,
               "LOGIN7 payloads (offsets, lengths, features) after a valid PRELOGIN"),
        Target("tds.tls", "tds", _cases(_tls_streams(), sizes, [""]), _tds_tls,
               "TLS inside PRELOGIN packets: ClientHello garbage, broken records, wrong packet types"),
        Target("tds.token.prelogin", "tds", _cases(_tds_token_prelogin_streams(), sizes, [""]), _tds_token_prelogin,
               "PRELOGIN with FEDAUTHREQUIRED and NONCEOPT on a token listener, then the ClientHello"),
        Target("tds.token.login7", "tds", _cases(_tds_token_logins(), sizes, ["on", "off", "nofed", "on+raw"]),
               _tds_token_login, "LOGIN7 inside TLS on a token listener: FEDAUTH data (lengths, options, token, "
               "nonce) and tokens as passwords"),
        Target("tds.relay.bytes", "tds", _cases(st.binary(max_size=400), sizes, [""]), _tds_relay,
               "arbitrary bytes after login"),
        Target("tds.relay.framed", "tds", _cases(tds_packet_streams, sizes, [""]), _tds_relay,
               "packets of any type, status and length after login"),
        Target("tds.relay.mutated", "tds", _cases(mutated(TDS_CLIENT_STREAMS), sizes, [""]), _tds_relay,
               "SQL batches, RPC, ATTENTION and transaction-manager requests with edits"),
        Target("tds.relay.flood", "tds", _cases(repeated(tds_big_packets, 200), wide_sizes, [""]), _tds_relay,
               "floods of packets (messages without an end) after login"),
    ]


ENGINES = ("postgres", "mysql", "tds")
