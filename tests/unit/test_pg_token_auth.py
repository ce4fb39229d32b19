"""PostgresClient with auth = 'token', sans-IO: TLS first, then a cleartext password request whose answer is a JWT."""
from __future__ import annotations

import dataclasses
import time

import jwt

from multiproxy_engines.postgres import protocol as p
from multiproxy_engines.postgres.client import PostgresClient
from multiproxy.auth import UsersFile
from multiproxy.config import build_config
from multiproxy.engine import AuthFailed, Authenticated, ClientContext, CloseClient, StartClientTLS
from multiproxy.pinning import PinPolicy
from multiproxy.token_auth import JwtVerifier

from .test_pg_handshake import auth_request, error_fields, password_message, startup

KEY = "a-shared-hs256-key-of-forty-characters!!"
VERIFIER = JwtVerifier(issuer="iss", audience="aud", shared_key=KEY.encode())


def make_client() -> PostgresClient:
    raw = {"clusters": {"main": {"engine": "postgres", "hosts": ["db.internal:5432"]}},
           "listeners": [{"name": "pg", "listen": "127.0.0.1:6432", "cluster": "main", "auth": "trust"}]}
    listener = dataclasses.replace(build_config(raw, "", None).listeners[0], auth="token", token_kind="jwt",
                                   token_verifier=VERIFIER)
    ctx = ClientContext(listener=listener, users=UsersFile.empty(), tls_available=True, cancel_key=(1, 2),
                        pin_policy=PinPolicy(), max_message_size=1 << 20)
    return PostgresClient(ctx, mock_secret=b"x" * 32)


def token(**claims) -> bytes:
    body = {"iss": "iss", "aud": "aud", "sub": "alice", "exp": int(time.time()) + 60, **claims}
    return jwt.encode(body, KEY, algorithm="HS256").encode() + b"\x00"


def after_tls(client: PostgresClient):
    (event,) = client.receive_handshake(p.INT32.pack(8) + p.INT32.pack(p.SSL_REQUEST_CODE))
    assert isinstance(event, StartClientTLS)
    return client.receive_handshake(startup())


def test_token_over_tls_authenticates():
    client = make_client()
    code, _ = auth_request(after_tls(client))
    assert code == p.AUTH_CLEARTEXT
    events = client.receive_handshake(password_message(token()))
    assert events == [Authenticated("alice", "app", {"user": "alice", "database": "app"})]


def test_rejected_token_gets_28p01_and_a_token_rejected_audit_event():
    client = make_client()
    after_tls(client)
    bad = token(exp=int(time.time()) - 5)
    (event,) = client.receive_handshake(password_message(bad))
    assert isinstance(event, AuthFailed) and event.audit_event == "token_rejected"
    assert event.reason == "token rejected: expired"
    fields = error_fields(event.data)
    assert fields["C"] == "28P01" and fields["M"] == 'token authentication failed for user "alice": expired'
    assert bad.decode().rstrip("\x00") not in event.reason + fields["M"]


def test_plaintext_client_is_refused_before_it_is_asked_for_a_token():
    (event,) = make_client().receive_handshake(startup())
    assert isinstance(event, CloseClient)
    fields = error_fields(event.data)
    assert fields["S"] == "FATAL"
    assert "only accepted over TLS" in fields["M"]
