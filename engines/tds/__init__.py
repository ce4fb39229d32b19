"""The SQL Server (TDS 7.x) engine plugin: login-only or full TLS, LOGIN7 checking, transaction pooling, pins."""
from __future__ import annotations

import ssl

from multiproxy.engine import BackendTarget, ClientContext, Engine, ErrorKind

from .backend import TDSCancel, TDSLogin, TDSProbe
from .client import TDSClient, render_error


class TDSEngine(Engine):
    name = "tds"
    default_port = 1433
    description = "SQL Server tabular data stream (TDS 7.2-7.4)"
    probe_database = "master"      # the role probe logs in here (every SQL Server has it), not in a database named after the user

    def __init__(self):
        self._tls_contexts: dict = {}

    def client_tls_context(self, listener, fallback):
        """A TLS 1.2 server context for the listener's certificate: TDS 7.x clients expect TDS packets right
        after the handshake, where TLS 1.3 would send session tickets (SQL Server uses TLS 1.2 here too)."""
        cert, key = getattr(listener, "tls_cert_file", ""), getattr(listener, "tls_key_file", "")
        if not cert or fallback is None:
            return fallback
        context = self._tls_contexts.get((cert, key))
        if context is None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.minimum_version = context.maximum_version = ssl.TLSVersion.TLSv1_2
            context.load_cert_chain(cert, key or None)
            self._tls_contexts[(cert, key)] = context
        return context

    def client_protocol(self, ctx: ClientContext) -> TDSClient:
        return TDSClient(ctx, self)

    def backend_login(self, target: BackendTarget) -> TDSLogin:
        return TDSLogin(target)

    def cancel_script(self, target: BackendTarget, server_state) -> TDSCancel:
        return TDSCancel()

    def probe_script(self, target: BackendTarget) -> TDSProbe:
        return TDSProbe(target)

    def render_error(self, kind: ErrorKind, message: str) -> bytes:
        return render_error(kind, message)
