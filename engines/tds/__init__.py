"""The SQL Server (TDS 7.x) engine plugin: login-only or full TLS, LOGIN7 checking, transaction pooling, pins."""
from __future__ import annotations

from multiproxy.engine import BackendTarget, ClientContext, Engine, ErrorKind

from .backend import TDSCancel, TDSLogin, TDSProbe
from .client import TDSClient, render_error


class TDSEngine(Engine):
    name = "tds"
    default_port = 1433
    description = "SQL Server tabular data stream (TDS 7.2-7.4)"

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
