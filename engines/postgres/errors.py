"""PostgreSQL ErrorResponse bytes for the proxy's own errors: the SQLSTATE of each error kind, FATAL or ERROR."""
from __future__ import annotations

from multiproxy.engine import BackendError, ErrorKind

from . import protocol as p

SQLSTATE = {
    ErrorKind.POOL_TIMEOUT: "53300",
    ErrorKind.BACKEND_UNAVAILABLE: "08001",
    ErrorKind.BACKEND_LOST: "08006",
    ErrorKind.AUTH_FAILED: "28P01",
    ErrorKind.PROTOCOL_VIOLATION: "08P01",
    ErrorKind.MESSAGE_TOO_LARGE: "54000",
    ErrorKind.TOO_MANY_CONNECTIONS: "53300",
    ErrorKind.TLS_REQUIRED: "28000",
    ErrorKind.SHUTTING_DOWN: "57P01",
    ErrorKind.FAILOVER: "08006",
    ErrorKind.IDLE_TIMEOUT: "57P05",
    ErrorKind.HANDSHAKE_TIMEOUT: "08P01",
    ErrorKind.NOT_SUPPORTED: "0A000",
    ErrorKind.INTERNAL: "XX000",
    ErrorKind.QUERY_TIMEOUT: "57014",
    ErrorKind.IDLE_TRANSACTION_TIMEOUT: "25P03",
}
# Errors after which the proxy closes the connection are FATAL, as PostgreSQL would say them.
FATAL_KINDS = frozenset({ErrorKind.AUTH_FAILED, ErrorKind.PROTOCOL_VIOLATION, ErrorKind.MESSAGE_TOO_LARGE,
                         ErrorKind.TOO_MANY_CONNECTIONS, ErrorKind.TLS_REQUIRED, ErrorKind.SHUTTING_DOWN,
                         ErrorKind.IDLE_TIMEOUT, ErrorKind.HANDSHAKE_TIMEOUT, ErrorKind.IDLE_TRANSACTION_TIMEOUT})


def render_error(kind: ErrorKind, message: str, fatal: bool | None = None) -> bytes:
    if fatal is None:
        fatal = kind in FATAL_KINDS
    return p.error_response(SQLSTATE.get(kind, "XX000"), message, "FATAL" if fatal else "ERROR")


def render_refusal(refusal: BackendError) -> bytes:
    """The backend's own refusal of a login (BackendError.refused_by_server) as the FATAL ErrorResponse it sent:
    its SQLSTATE and text, so that the client reads what the server said; the proxy then closes the client."""
    return p.error_response(refusal.sqlstate or refusal.code, refusal.server_message, "FATAL")
