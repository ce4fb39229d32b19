"""MySQLClient with auth = 'token', sans-IO: SSL request first, then an AuthSwitchRequest to mysql_clear_password
whose answer is a JWT (or the token right in a handshake response that already used mysql_clear_password)."""
from __future__ import annotations

import dataclasses
import time

import jwt

from multiproxy_engines.mysql import MySQLEngine
from multiproxy_engines.mysql import protocol as p
from multiproxy_engines.mysql.client import MySQLClient
from multiproxy.auth import UsersFile
from multiproxy.config import build_config
from multiproxy.engine import AuthFailed, Authenticated, ClientContext, CloseClient, SendToClient, StartClientTLS
from multiproxy.pinning import PinPolicy
from multiproxy.token_auth import JwtVerifier

KEY = "a-shared-hs256-key-of-forty-characters!!"
VERIFIER = JwtVerifier(issuer="iss", audience="aud", shared_key=KEY.encode())
CAPS = (p.CLIENT_PROTOCOL_41 | p.CLIENT_SECURE_CONNECTION | p.CLIENT_PLUGIN_AUTH | p.CLIENT_CONNECT_WITH_DB
        | p.CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA)


def make_client() -> MySQLClient:
    raw = {"clusters": {"main": {"engine": "mysql", "hosts": ["db.internal:3306"]}},
           "listeners": [{"name": "my", "listen": "127.0.0.1:6033", "cluster": "main", "auth": "trust"}]}
    listener = dataclasses.replace(build_config(raw, "", None).listeners[0], auth="token", token_kind="jwt",
                                   token_verifier=VERIFIER)
    ctx = ClientContext(listener=listener, users=UsersFile.empty(), tls_available=True, cancel_key=7,
                        pin_policy=PinPolicy(), max_message_size=1 << 20, client_address=("10.0.0.9", 5000))
    return MySQLClient(ctx, MySQLEngine())


def token(**claims) -> bytes:
    body = {"iss": "iss", "aud": "aud", "sub": "alice", "exp": int(time.time()) + 60, **claims}
    return jwt.encode(body, KEY, algorithm="HS256").encode()


def response(seq: int, plugin: bytes = b"mysql_native_password", auth: bytes = b"x" * 20) -> bytes:
    return p.packet(seq, p.handshake_response(CAPS | p.CLIENT_SSL, 45, b"alice", auth, b"app", plugin))


def after_tls(client: MySQLClient, **kwargs) -> list:
    greeting = client.start()
    assert p.parse_handshake_v10(greeting[4:])["capabilities"] & p.CLIENT_SSL
    (event,) = client.receive_handshake(p.packet(1, p.ssl_request(CAPS | p.CLIENT_SSL, 45)))
    assert isinstance(event, StartClientTLS)
    return client.receive_handshake(response(2, **kwargs))


def err(data: bytes) -> tuple[int, str, str]:
    return p.parse_err(data[4:])


def test_the_proxy_switches_to_mysql_clear_password_and_accepts_a_valid_token():
    client = make_client()
    (switch,) = after_tls(client)
    assert isinstance(switch, SendToClient)
    assert switch.data[3] == 3 and switch.data[4] == 0xFE
    assert switch.data[5:].startswith(b"mysql_clear_password\x00")
    events = client.receive_handshake(p.packet(4, token() + b"\x00"))
    assert events == [Authenticated("alice", "app", {"capabilities": 0, "charset": 45})]
    assert client.login_complete(None) == p.packet(5, p.ok_payload(p.SERVER_STATUS_AUTOCOMMIT))


def test_a_client_that_already_speaks_mysql_clear_password_is_not_switched():
    client = make_client()
    events = after_tls(client, plugin=b"mysql_clear_password", auth=token() + b"\x00")
    assert isinstance(events[-1], Authenticated)
    assert client.login_complete(None) == p.packet(3, p.ok_payload(p.SERVER_STATUS_AUTOCOMMIT))


def test_rejected_token_gets_1045_28000_with_the_reason_and_a_token_rejected_audit_event():
    for bad, reason in ((token(exp=int(time.time()) - 5), "expired"), (token(sub="bob"), "user mismatch"),
                        (token()[:-3] + b"AAA", "bad signature"), (b"", "malformed token")):
        client = make_client()
        after_tls(client)
        (event,) = client.receive_handshake(p.packet(4, bad + b"\x00"))
        assert isinstance(event, AuthFailed) and event.audit_event == "token_rejected"
        assert event.reason == f"token rejected: {reason}"
        code, sqlstate, message = err(event.data)
        assert (code, sqlstate) == (1045, "28000")
        assert message == f"Access denied for user 'alice'@'10.0.0.9' (token authentication failed: {reason})"
        assert event.data[3] == 5
        if bad:
            assert bad.decode() not in event.reason + message


def test_plaintext_client_is_refused_with_the_reason_before_it_is_asked_for_a_token():
    client = make_client()
    client.start()
    (event,) = client.receive_handshake(p.packet(1, p.handshake_response(CAPS, 45, b"alice", b"x" * 20, b"app",
                                                                          b"mysql_native_password")))
    assert isinstance(event, CloseClient)
    code, sqlstate, message = err(event.data)
    assert code == p.ER_SECURE_TRANSPORT_REQUIRED
    assert "only accepted over TLS" in message and "--ssl" in message
