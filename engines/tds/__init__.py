"""The SQL Server (TDS 7.x) engine plugin: login-only or full TLS, LOGIN7 checking, transaction pooling, pins."""
from __future__ import annotations

import ssl

from multiproxy.engine import BackendTarget, ClientContext, Engine, ErrorKind
from multiproxy.tls import client_leg_context

from .auth import VERIFIER_KINDS
from . import compiled_relay, handover
from .backend import TDSCancel, TDSLogin, TDSProbe, TDSQuery
from .client import TDSClient, render_error
from .pinning import ALL_PIN_REASONS


class TDSEngine(Engine):
    name = "tds"
    default_port = 1433
    description = "SQL Server tabular data stream (TDS 7.2-7.4)"
    probe_database = "master"      # the role probe logs in here (every SQL Server has it), not in a database named after the user

    # The token comes as an access token in LOGIN7's FEDAUTH feature (python-tds access_token_callable) or as
    # LOGIN7's password; accepted only when the login packet travels inside TLS
    supports_token_auth = True
    # any password method means the tds_sha256 verifier
    client_auth_methods = ("trust", "scram-sha-256", "md5", "token")
    pin_reasons = ALL_PIN_REASONS
    # RESETCONNECTION rides on the first request a backend gets from its next client: no extra round trip, and
    # what SQL Server's own client pools do (reset_after_transaction = auto means yes here)
    reset_after_transaction_default = True
    verifier_kinds = VERIFIER_KINDS

    def __init__(self):
        self._tls_contexts: dict = {}

    def listener_problems(self, settings: dict) -> list[tuple[str, str]]:
        if settings.get("tls_min_version") == "TLSv1.3":
            return [("tls_min_version", "TDS 7.x listeners offer TLS 1.2 only: the TLS handshake travels inside "
                     "PRELOGIN packets, and FreeTDS clients (tsql 1.3) send their TLS 1.3 Finished outside them; "
                     "SQL Server itself offers TLS 1.3 only with TDS 8.0 (strict encryption), which multiproxy does "
                     "not speak. Remove tls_min_version (TLSv1.2 is the default); tls_ciphers and client "
                     "certificates do apply")]
        return []

    def client_tls_context(self, listener, fallback):
        """The listener's TLS policy (ciphers, client certificates) capped at TLS 1.2: TDS 7.x clients expect TDS
        packets right after the handshake, where TLS 1.3 would send session tickets (SQL Server uses TLS 1.2 here
        too)."""
        cert, key = getattr(listener, "tls_cert_file", ""), getattr(listener, "tls_key_file", "")
        if not cert or fallback is None:
            return fallback
        policy = (cert, key, getattr(listener, "tls_ciphers", ""), getattr(listener, "tls_client_ca_file", ""),
                  bool(getattr(listener, "tls_verify_client", False)))
        context = self._tls_contexts.get(policy)
        if context is None:
            context = client_leg_context(cert, key, "TLSv1.2", *policy[2:])
            context.maximum_version = ssl.TLSVersion.TLSv1_2
            self._tls_contexts[policy] = context
        return context

    def relay_rules(self, key=None) -> dict:
        return compiled_relay.relay_rules(key)

    def relay_serves(self, key, server_state) -> bool:
        return compiled_relay.relay_serves(key, server_state)

    def client_protocol(self, ctx: ClientContext) -> TDSClient:
        return TDSClient(ctx, self)

    def resume_client(self, ctx: ClientContext, state: dict) -> TDSClient:
        return handover.resume(self, ctx, state)

    def backend_login(self, target: BackendTarget) -> TDSLogin:
        return TDSLogin(target)

    def cancel_script(self, target: BackendTarget, server_state) -> TDSCancel:
        return TDSCancel()

    max_connections_query = "SELECT @@MAX_CONNECTIONS"

    def backend_query(self, sql: str, server_state, what: str = "query") -> TDSQuery:
        return TDSQuery(sql, server_state, what)

    def probe_script(self, target: BackendTarget) -> TDSProbe:
        return TDSProbe(target)

    def render_error(self, kind: ErrorKind, message: str) -> bytes:
        return render_error(kind, message)
