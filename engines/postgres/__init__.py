"""The PostgreSQL engine plugin: protocol 3.0 clients and backends, transaction pooling, pin detection."""
from __future__ import annotations

import os

from multiproxy.engine import BackendTarget, ClientContext, Engine, ErrorKind

from . import auth, compiled_relay, handover
from .backend import PostgresCancel, PostgresLogin, PostgresProbe, PostgresQuery
from .client import PostgresClient, render_error
from .pinning import ALL_PIN_REASONS


class PostgresEngine(Engine):
    name = "postgres"
    default_port = 5432
    description = "PostgreSQL frontend/backend protocol 3.0"
    probe_database = "postgres"
    supports_token_auth = True     # AuthenticationCleartextPassword after SSLRequest (see handshake.py _begin_auth)
    client_auth_methods = ("trust", "md5", "scram-sha-256", "token")
    pin_reasons = ALL_PIN_REASONS

    auth_query_default = auth.AUTH_QUERY_DEFAULT

    def auth_query_sql(self, query: str, user: str) -> str:
        return auth.auth_query_sql(query, user)

    def auth_query_verifiers(self, value: str) -> dict:
        return auth.auth_query_verifiers(value)

    def __init__(self):
        # Per-process secret that makes fake SCRAM salts of unknown users stable (no user enumeration).
        self._mock_secret = os.urandom(32)
        self._key_bytes = b""
        self._key_pos = 0

    def client_protocol(self, ctx: ClientContext) -> PostgresClient:
        return PostgresClient(ctx, self._mock_secret)

    def resume_client(self, ctx: ClientContext, state: dict) -> PostgresClient:
        return handover.resume(self, ctx, state)

    def relay_rules(self, key=None) -> dict:
        return compiled_relay.relay_rules()

    def relay_serves(self, key, server_state) -> bool:
        return compiled_relay.relay_serves(key, server_state)

    relay_login_refusal = (compiled_relay.SSL_REQUEST, b"N")     # no TLS on the listeners of relay logins
    relay_login_auth = compiled_relay.RELAY_LOGIN_AUTH

    def relay_login(self, client, server_state):
        return compiled_relay.relay_login(client, server_state)

    def relay_login_same(self, facts, newer) -> bool:
        return compiled_relay.relay_login_same(facts, newer)

    def relay_login_key(self, data: bytes):
        return compiled_relay.KEY.unpack(data)

    def relay_login_key_bytes(self, key) -> bytes:
        return compiled_relay.KEY.pack(*key)

    def backend_login(self, target: BackendTarget) -> PostgresLogin:
        return PostgresLogin(target)

    def cancel_script(self, target: BackendTarget, server_state) -> PostgresCancel:
        return PostgresCancel(server_state)

    max_connections_query = "SHOW max_connections"

    def backend_query(self, sql: str, server_state, what: str = "query") -> PostgresQuery:
        return PostgresQuery(sql, server_state, what)

    def probe_script(self, target: BackendTarget) -> PostgresProbe:
        return PostgresProbe(target)

    def render_error(self, kind: ErrorKind, message: str) -> bytes:
        return render_error(kind, message)

    def new_cancel_key(self, counter: int, worker: int):
        # pid: worker in the high byte, a counter below; the secret is random, so keys cannot be guessed.
        pid = ((worker & 0x7F) << 24) | (counter & 0xFFFFFF)
        if self._key_pos >= len(self._key_bytes):
            self._key_bytes = os.urandom(4096)        # one system call per thousand keys
            self._key_pos = 0
        secret = int.from_bytes(self._key_bytes[self._key_pos:self._key_pos + 4], "big")
        self._key_pos += 4
        return pid, secret

    def cancel_key_worker(self, key) -> int:
        return (key[0] >> 24) & 0x7F
