"""The MySQL engine's errors toward clients: an ErrorKind as an ERR packet (error code, SQLSTATE, message)."""
from __future__ import annotations

from multiproxy.engine import BackendError, ErrorKind

from . import protocol as p

ERRORS = {   # ErrorKind -> (error code, SQLSTATE)
    ErrorKind.POOL_TIMEOUT: (p.ER_CON_COUNT_ERROR, "08004"),
    ErrorKind.BACKEND_UNAVAILABLE: (2003, "08S01"),
    ErrorKind.BACKEND_LOST: (2013, "08S01"),
    ErrorKind.AUTH_FAILED: (p.ER_ACCESS_DENIED_ERROR, "28000"),
    ErrorKind.PROTOCOL_VIOLATION: (p.ER_NET_PACKETS_OUT_OF_ORDER, "08S01"),
    ErrorKind.MESSAGE_TOO_LARGE: (p.ER_NET_PACKET_TOO_LARGE, "08S01"),
    ErrorKind.TOO_MANY_CONNECTIONS: (p.ER_CON_COUNT_ERROR, "08004"),
    ErrorKind.TLS_REQUIRED: (p.ER_SECURE_TRANSPORT_REQUIRED, "HY000"),
    ErrorKind.SHUTTING_DOWN: (p.ER_SERVER_SHUTDOWN, "08S01"),
    ErrorKind.FAILOVER: (2013, "08S01"),
    ErrorKind.IDLE_TIMEOUT: (p.ER_NET_READ_INTERRUPTED, "08S01"),
    ErrorKind.HANDSHAKE_TIMEOUT: (p.ER_HANDSHAKE_ERROR, "08S01"),
    ErrorKind.NOT_SUPPORTED: (p.ER_NOT_SUPPORTED_YET, "42000"),
    ErrorKind.INTERNAL: (p.ER_UNKNOWN_ERROR, "HY000"),
    ErrorKind.QUERY_TIMEOUT: (3024, "HY000"),           # ER_QUERY_TIMEOUT (max_execution_time)
    ErrorKind.IDLE_TRANSACTION_TIMEOUT: (p.ER_NET_READ_INTERRUPTED, "08S01"),
}


def render_error(kind: ErrorKind, message: str, seq: int = 1) -> bytes:
    code, sqlstate = ERRORS.get(kind, (p.ER_UNKNOWN_ERROR, "HY000"))
    return p.packet(seq, p.err_payload(code, sqlstate, f"multiproxy: {message}"))



def render_refusal(refusal: BackendError, seq: int) -> bytes:
    """The backend's own refusal of a login (BackendError.refused_by_server) as the ERR packet it sent: its code,
    SQLSTATE and text, unprefixed, so that the client reads what the server said."""
    try:
        code = int(refusal.code)
    except ValueError:
        code = p.ER_UNKNOWN_ERROR
    return p.packet(seq, p.err_payload(code, refusal.sqlstate or "HY000", refusal.server_message))
