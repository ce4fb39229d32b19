"""PostgreSQL client startup through PostgresClient: SSL/GSS/cancel requests, trust/md5/SCRAM, malformed packets, login_complete."""
from __future__ import annotations

import struct

import pytest

from multiproxy_engines.postgres import protocol as p
from multiproxy_engines.postgres.auth import ScramClient, md5_password_response
from multiproxy_engines.postgres.backend import PostgresLogin
from multiproxy_engines.postgres.client import PostgresClient
from multiproxy_engines.postgres.handshake import Phase
from multiproxy.auth import UsersFile, md5_verifier, scram_sha_256_verifier
from multiproxy.config import build_config
from multiproxy.engine import (
    AuthFailed, Authenticated, BackendTarget, CancelRequested, ClientContext, CloseClient, ProtocolError, SendToClient,
)
from multiproxy.pinning import PinPolicy

PASSWORD = "correct horse"
USERS = UsersFile.from_dict({"users": {
    "alice": {"scram_sha_256": scram_sha_256_verifier(PASSWORD, b"0123456789abcdef", 4096),
              "md5": md5_verifier("alice", PASSWORD)},
    "scram_only": {"scram_sha_256": scram_sha_256_verifier(PASSWORD, b"fedcba9876543210", 4096)},
    "other_listener": {"scram_sha_256": scram_sha_256_verifier(PASSWORD, b"0123456789abcdef", 4096),
                       "listeners": ["elsewhere"]},
}})

SERVER_PARAMS = (
    ("application_name", ""), ("client_encoding", "UTF8"), ("DateStyle", "ISO, MDY"), ("integer_datetimes", "on"),
    ("IntervalStyle", "postgres"), ("server_encoding", "UTF8"), ("server_version", "16.2"),
    ("standard_conforming_strings", "on"), ("TimeZone", "UTC"),
)


def make_client(auth: str = "scram-sha-256", users: UsersFile = USERS) -> PostgresClient:
    raw = {
        "auth": {"users_file": "users.toml"},
        "clusters": {"main": {"engine": "postgres", "hosts": ["db.internal:5432"]}},
        "listeners": [{"name": "pg", "listen": "127.0.0.1:6432", "cluster": "main", "auth": auth}],
    }
    listener = build_config(raw, "", None).listeners[0]
    ctx = ClientContext(listener=listener, users=users, tls_available=False, cancel_key=(1234, 5678),
                        pin_policy=PinPolicy(), max_message_size=1 << 20)
    return PostgresClient(ctx, mock_secret=b"x" * 32)


def backend_state():
    """A server state as the engine's login script records it from a real server's greeting."""
    login = PostgresLogin(BackendTarget(host="db.internal", port=5432, user="alice", database="app",
                                        password=None, tls="disable"))
    login.start()
    login.feed(p.authentication(p.AUTH_OK) + b"".join(p.parameter_status(k, v) for k, v in SERVER_PARAMS)
               + p.backend_key_data(4242, 9999) + p.READY_IDLE)
    assert login.done
    return login.result


def messages(data: bytes) -> list[tuple[bytes, bytes]]:
    out, pos = [], 0
    while pos < len(data):
        length = struct.unpack_from("!I", data, pos + 1)[0]
        out.append((data[pos:pos + 1], data[pos + 5:pos + 1 + length]))
        pos += 1 + length
    assert pos == len(data)
    return out


def error_fields(data: bytes) -> dict[str, str]:
    ((kind, body),) = messages(data)
    assert kind == b"E"
    return p.parse_fields(body)


def startup(user: str = "alice", **extra: str) -> bytes:
    return p.startup_message({"user": user, "database": "app", **extra})


def password_message(body: bytes) -> bytes:
    return p.message(b"p", body)


def sasl_initial(client_first: bytes) -> bytes:
    return password_message(p.cstring("SCRAM-SHA-256") + p.INT32.pack(len(client_first)) + client_first)


def sent(events) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, SendToClient))


def auth_request(events) -> tuple[int, bytes]:
    ((kind, body),) = messages(sent(events))
    assert kind == b"R"
    return struct.unpack_from("!i", body)[0], body[4:]


def scram_login(client: PostgresClient, user: str, password: str):
    """Run a SCRAM exchange; returns (the final events, the ScramClient)."""
    events = client.receive_handshake(startup(user))
    code, mechanisms = auth_request(events)
    assert code == p.AUTH_SASL and mechanisms == b"SCRAM-SHA-256\x00\x00"
    scram = ScramClient(user, password)
    events = client.receive_handshake(sasl_initial(scram.client_first()))
    code, server_first = auth_request(events)
    assert code == p.AUTH_SASL_CONTINUE
    return client.receive_handshake(password_message(scram.handle_server_first(server_first))), scram


def assert_auth_failed(events, user: str):
    assert len(events) == 1 and isinstance(events[0], AuthFailed), events
    fields = error_fields(events[0].data)
    assert fields["C"] == "28P01"
    assert fields["S"] == "FATAL"
    assert fields["M"] == f'password authentication failed for user "{user}"'
    assert events[0].user == user
    assert PASSWORD not in events[0].reason


# ---------------------------------------------------------------- trust, md5, SCRAM


def test_trust_authenticates_at_once():
    events = make_client("trust").receive_handshake(startup(application_name="psql"))
    assert events == [Authenticated("alice", "app", {"user": "alice", "database": "app", "application_name": "psql"})]


def test_database_defaults_to_the_user_name():
    events = make_client("trust").receive_handshake(p.startup_message({"user": "alice"}))
    assert events[-1].database == "alice"


def test_scram_login_succeeds_and_the_server_proves_itself():
    events, scram = scram_login(make_client(), "alice", PASSWORD)
    final, authenticated = events
    assert isinstance(authenticated, Authenticated) and authenticated.user == "alice"
    code, server_final = auth_request([final])
    assert code == p.AUTH_SASL_FINAL
    scram.verify_server_final(server_final)
    assert scram.authenticated


def test_scram_wrong_password_fails_with_28p01():
    events, _ = scram_login(make_client(), "alice", "wrong")
    assert_auth_failed(events, "alice")


def test_scram_unknown_user_fails_like_a_wrong_password():
    events, _ = scram_login(make_client(), "mallory", PASSWORD)
    assert_auth_failed(events, "mallory")


def test_scram_unknown_user_salt_is_stable_so_probing_reveals_nothing():
    def server_first(user):
        client = make_client()
        client.receive_handshake(startup(user))
        events = client.receive_handshake(sasl_initial(ScramClient(user, "x").client_first()))
        return dict(part.split("=", 1) for part in auth_request(events)[1].decode().split(","))
    first, second = server_first("mallory"), server_first("mallory")
    assert first["s"] == second["s"] and first["i"] == second["i"] == "4096"


def test_md5_login_succeeds():
    client = make_client("md5")
    code, salt = auth_request(client.receive_handshake(startup()))
    assert code == p.AUTH_MD5 and len(salt) == 4
    events = client.receive_handshake(password_message(md5_password_response("alice", PASSWORD, salt) + b"\x00"))
    assert events == [Authenticated("alice", "app", {"user": "alice", "database": "app"})]


@pytest.mark.parametrize("user,password", [("alice", "wrong"), ("mallory", PASSWORD)])
def test_md5_wrong_password_and_unknown_user_fail_alike(user, password):
    client = make_client("md5")
    code, salt = auth_request(client.receive_handshake(startup(user)))
    assert code == p.AUTH_MD5
    events = client.receive_handshake(password_message(md5_password_response(user, password, salt) + b"\x00"))
    assert_auth_failed(events, user)


def test_md5_listener_falls_back_to_scram_for_a_scram_only_user():
    events, _ = scram_login(make_client("md5"), "scram_only", PASSWORD)
    assert isinstance(events[-1], Authenticated)


def test_each_phase_expects_one_message_and_data_after_login_is_refused():
    client = make_client()
    assert client.phase is Phase.STARTUP
    client.receive_handshake(startup())
    assert client.phase is Phase.SASL_INITIAL
    scram = ScramClient("alice", PASSWORD)
    code, server_first = auth_request(client.receive_handshake(sasl_initial(scram.client_first())))
    assert client.phase is Phase.SASL_FINAL
    assert isinstance(client.receive_handshake(password_message(scram.handle_server_first(server_first)))[-1],
                      Authenticated)
    assert client.phase is Phase.DONE
    assert client.receive_handshake(b"") == []
    with pytest.raises(ProtocolError) as info:
        client.receive_handshake(p.query("SELECT 1"))
    assert error_fields(info.value.reply)["C"] == "08P01"
    md5 = make_client("md5")
    md5.receive_handshake(startup())
    assert md5.phase is Phase.MD5


def test_user_not_allowed_on_this_listener_is_refused():
    events = make_client().receive_handshake(startup("other_listener"))
    assert isinstance(events[-1], AuthFailed)
    fields = error_fields(events[-1].data)
    assert fields["C"] == "28P01" and fields["S"] == "FATAL"


def test_missing_user_name_closes_with_a_fatal_error():
    events = make_client("trust").receive_handshake(p.startup_message({"database": "app"}))
    assert isinstance(events[-1], CloseClient)
    fields = error_fields(events[-1].data)
    assert fields["S"] == "FATAL" and fields["C"] == "08P01"


def test_replication_connections_are_refused():
    events = make_client("trust").receive_handshake(startup(replication="database"))
    assert isinstance(events[-1], CloseClient)
    assert error_fields(events[-1].data)["C"] == "0A000"


def test_sasl_with_another_mechanism_fails_authentication():
    client = make_client()
    client.receive_handshake(startup())
    events = client.receive_handshake(password_message(p.cstring("SCRAM-SHA-256-PLUS") + p.INT32.pack(3) + b"p=x"))
    assert isinstance(events[-1], AuthFailed)


def test_non_password_message_during_authentication_is_a_protocol_error():
    client = make_client()
    client.receive_handshake(startup())
    with pytest.raises(ProtocolError) as info:
        client.receive_handshake(p.query("SELECT 1"))
    assert error_fields(info.value.reply)["C"] == "08P01"


# ---------------------------------------------------------------- SSLRequest, GSSENCRequest, CancelRequest


def test_ssl_request_is_answered_n_without_tls_and_startup_continues():
    client = make_client("trust")
    events = client.receive_handshake(p.ssl_request() + startup())
    assert events[0] == SendToClient(b"N")
    assert isinstance(events[-1], Authenticated)


def test_gssenc_request_is_answered_n():
    client = make_client("trust")
    events = client.receive_handshake(struct.pack("!II", 8, p.GSSENC_REQUEST_CODE))
    assert events == [SendToClient(b"N")]
    assert isinstance(client.receive_handshake(startup())[-1], Authenticated)


def test_cancel_request_yields_the_key():
    events = make_client().receive_handshake(p.cancel_request(1234, 5678))
    assert events == [CancelRequested((1234, 5678))]


def test_cancel_request_keys_are_unsigned():
    events = make_client().receive_handshake(p.cancel_request(0xFFFFFFFF, 0x80000000))
    assert events == [CancelRequested((0xFFFFFFFF, 0x80000000))]


def test_cancel_request_of_the_wrong_length_is_a_protocol_error_with_a_reply():
    packet = struct.pack("!III", 12, p.CANCEL_REQUEST_CODE, 1234)
    with pytest.raises(ProtocolError) as info:
        make_client().receive_handshake(packet)
    assert error_fields(info.value.reply)["C"] == "08P01"


# ---------------------------------------------------------------- malformed startup packets

MALFORMED = {
    "length 2 GiB": struct.pack("!II", 0x80000000, p.PROTOCOL_VERSION_3),
    "length 2 GiB, header only": struct.pack("!I", 0x80000000),
    "length below 8": struct.pack("!II", 7, p.PROTOCOL_VERSION_3),
    "length 0": struct.pack("!II", 0, p.PROTOCOL_VERSION_3),
    "unterminated parameters": (lambda body: struct.pack("!I", len(body) + 4) + body)(
        struct.pack("!I", p.PROTOCOL_VERSION_3) + b"user\x00alice"),
    "odd parameter count": (lambda body: struct.pack("!I", len(body) + 4) + body)(
        struct.pack("!I", p.PROTOCOL_VERSION_3) + b"user\x00alice\x00database\x00\x00"),
    "empty parameter name": (lambda body: struct.pack("!I", len(body) + 4) + body)(
        struct.pack("!I", p.PROTOCOL_VERSION_3) + b"\x00alice\x00\x00"),
    "invalid utf-8": (lambda body: struct.pack("!I", len(body) + 4) + body)(
        struct.pack("!I", p.PROTOCOL_VERSION_3) + b"user\x00\xff\xfe\x00\x00"),
    "protocol 2.0": (lambda body: struct.pack("!I", len(body) + 4) + body)(
        struct.pack("!I", 2 << 16) + b"user\x00alice\x00\x00"),
    "SSLRequest of 12 bytes": struct.pack("!III", 12, p.SSL_REQUEST_CODE, 0),
}


@pytest.mark.parametrize("packet", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_startup_raises_protocol_error_with_08p01(packet):
    with pytest.raises(ProtocolError) as info:
        make_client().receive_handshake(packet)
    fields = error_fields(info.value.reply)
    assert fields["C"] == "08P01"
    assert fields["S"] == "FATAL"


def test_protocol_3_minor_version_gets_negotiate_protocol_version():
    body = struct.pack("!I", p.PROTOCOL_VERSION_3 | 2) + b"user\x00alice\x00_pq_.thing\x00on\x00\x00"
    events = make_client("trust").receive_handshake(struct.pack("!I", len(body) + 4) + body)
    ((kind, payload),) = messages(events[0].data)
    assert kind == b"v"
    assert struct.unpack_from("!ii", payload) == (0, 1)
    assert payload[8:] == b"_pq_.thing\x00"
    assert isinstance(events[-1], Authenticated) and "_pq_.thing" not in events[-1].params


def test_data_pipelined_after_authentication_is_kept_for_the_relay():
    client = make_client("trust")
    events = client.receive_handshake(startup() + p.query("SELECT 1"))
    assert isinstance(events[-1], Authenticated)
    assert events[-1].leftover == p.query("SELECT 1")
    to_backend, to_client = client.client_data(events[-1].leftover)
    assert to_backend == p.query("SELECT 1") and to_client == b""


# ---------------------------------------------------------------- split packets


def feed_bytewise(client: PostgresClient, data: bytes) -> list:
    events = []
    for i in range(len(data)):
        events += client.receive_handshake(data[i:i + 1])
    return events


def test_startup_split_byte_by_byte():
    client = make_client("trust")
    assert feed_bytewise(client, p.ssl_request() + startup(application_name="psql")) == [
        SendToClient(b"N"),
        Authenticated("alice", "app", {"user": "alice", "database": "app", "application_name": "psql"}),
    ]


def test_scram_split_byte_by_byte():
    client = make_client()
    code, _ = auth_request(feed_bytewise(client, startup()))
    assert code == p.AUTH_SASL
    scram = ScramClient("alice", PASSWORD)
    code, server_first = auth_request(feed_bytewise(client, sasl_initial(scram.client_first())))
    assert code == p.AUTH_SASL_CONTINUE
    events = feed_bytewise(client, password_message(scram.handle_server_first(server_first)))
    scram.verify_server_final(auth_request(events[:1])[1])
    assert isinstance(events[-1], Authenticated)


def test_cancel_request_split_byte_by_byte():
    assert feed_bytewise(make_client(), p.cancel_request(1234, 5678)) == [CancelRequested((1234, 5678))]


# ---------------------------------------------------------------- login_complete


def greeting(startup_params: dict[str, str]) -> list[tuple[bytes, bytes]]:
    client = make_client("trust")
    assert isinstance(client.receive_handshake(p.startup_message(startup_params))[-1], Authenticated)
    return messages(client.login_complete(backend_state()))


def reported(msgs) -> dict[str, str]:
    out = {}
    for kind, body in msgs:
        if kind == b"S":
            name, value = body.split(b"\x00")[:2]
            out[name.decode()] = value.decode()
    return out


def test_login_complete_sends_ok_parameters_key_and_ready():
    msgs = greeting({"user": "alice", "database": "app"})
    assert msgs[0] == (b"R", struct.pack("!i", p.AUTH_OK))
    assert [kind for kind, _ in msgs[1:-2]] == [b"S"] * len(SERVER_PARAMS)
    assert reported(msgs) == dict(SERVER_PARAMS)
    assert msgs[-2] == (b"K", struct.pack("!II", 1234, 5678))
    assert msgs[-1] == (b"Z", b"I")


def test_login_complete_reports_the_clients_startup_overrides():
    msgs = greeting({"user": "alice", "database": "app", "application_name": "psql",
                     "options": "-c search_path=x -c DateStyle=German"})
    params = reported(msgs)
    assert params["application_name"] == "psql"
    assert params["DateStyle"] == "German"
    assert "search_path" not in params          # the server does not report it, so neither does the proxy
    assert params["TimeZone"] == "UTC"


def test_login_complete_never_overrides_server_facts():
    params = reported(greeting({"user": "alice", "database": "app", "server_version": "99", "integer_datetimes": "off"}))
    assert params["server_version"] == "16.2"
    assert params["integer_datetimes"] == "on"


def test_startup_settings_are_tracked_for_replay():
    client = make_client("trust")
    client.receive_handshake(startup(application_name="psql", options="-c search_path=x --statement-timeout=5s"))
    client.login_complete(backend_state())
    assert client.client_params["application_name"] == "psql"
    assert client.client_settings == {"search_path": "x", "statement_timeout": "5s"}


def test_two_clients_greeted_from_one_backend_state_do_not_share_settings():
    state = backend_state()
    first, second = make_client("trust"), make_client("trust")
    first.receive_handshake(startup(application_name="one"))
    second.receive_handshake(startup(application_name="two"))
    first_msgs = messages(first.login_complete(state))
    second_msgs = messages(second.login_complete(state))
    assert reported(first_msgs)["application_name"] == "one"
    assert reported(second_msgs)["application_name"] == "two"
    first.client_params["application_name"] = "changed"
    assert second.client_params["application_name"] == "two"
