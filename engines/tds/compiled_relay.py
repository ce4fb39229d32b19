"""What the compiled relay ([proxy] relay = "compiled") needs from SQL Server (TDS): framing, the stop types, the
SQLBatch screen, the response walk.

The relay serves a client's SQLBatch (0x01) that is one packet with the EOM status bit alone (no RESETCONNECTION,
no IGNORE, not the first of several packets: request="tds"), whose UTF-16LE text (after ALL_HEADERS) opens with
SELECT after white space and holds no word of RELAY_SCREEN_WORDS (in UTF-16LE, ASCII case ignored, anywhere in the
text: a false alarm only costs a trip through Python). A bare procedure name first in a batch runs the procedure, and
a procedure may leave a transaction open: only SELECT-first batches qualify. The words are those of the pin screen
(pinning.classify_batch: '#' temporary tables, CURSOR, sp_ procedures, EXEC / EXECUTE AS, SET options tracked or
not, CONTEXT_INFO), transaction control (BEGIN, COMMIT, ROLLBACK, SAVE, TRAN: whatever the Python path answers
lazily or tracks through ENVCHANGE), USE (the database is tracked), WAITFOR (a long wait's cancel must reach the
server: see below), KILL, SHUTDOWN, DBCC and RECONFIGURE. So a relayed batch cannot pin, change a tracked setting or
the database, or open a transaction (relay_key also refuses clients with IMPLICIT_TRANSACTIONS or ANSI_DEFAULTS
among their options, under which a SELECT would open one); the backend's response is one message, the packets up to
the one with EOM (response="tds"), and the backend goes back to the lane after it. The DONE tokens and ENVCHANGE are
not read: nothing relayed can begin a transaction.

Every other message type stops: RPC (0x03: virtualised prepared statements, pins by procedure name), Attention
(0x06), Transaction Manager (0x0E), Bulk Load (0x07) and anything else. An Attention a client sends while a relayed
batch runs waits for the end of the batch's response (hold_stops) and is then answered by the Python path (a DONE
with DONE_ATTN, as it answers an Attention that finds no request outstanding): the client reads the whole response
and then the acknowledgement, which TDS allows (the server finished before the Attention). The batch is not cut
short; WAITFOR, the usual long wait, stops the screen so that its cancel reaches the server on the Python path.

Header fields: the request goes as the client framed it (the lane's backends have the client's packet size, so the
Python path would not re-frame it either; a transaction descriptor in ALL_HEADERS is the one the client holds
outside a transaction, which the Python path forwards as it is too); the response goes as the server framed it, its
SPID included (the Python path writes 0 there and renumbers packet ids from 1, as the server does).

RESETCONNECTION: the relay does not set it, so relay_key refuses clients of pools that reset backends between clients
(reset_after_transaction, the TDS default): those stay on the Python path. With reset_after_transaction = false a
backend's session carries the SET options its clients left: TDSServerState.options keeps them, and relay_serves
lends to a lane only a backend whose options, database and packet size are those of the lane's key, and marks it
(last_client = RELAY_CLIENT) so that the next Python client replays its own options on it (reset first when it
carries an option that client never set: TDSClient.link).
"""
from __future__ import annotations

from .backend import BACKEND_PACKET_SIZE
from .handover import not_idle

RELAY_SCREEN_WORDS = tuple(word.encode("utf-16-le") for word in (
    "#", "cursor", "sp_", "exec", "set", "context_info", "begin", "commit", "rollback", "save", "tran", "use",
    "waitfor", "kill", "shutdown", "dbcc", "reconfigure"))
SQL_BATCH = 0x01
MAX_SCREENED = 4096         # at most one packet of the default size; a longer batch goes through Python
BUFFER_SIZE = 16384
UNRELAYABLE_OPTIONS = ("IMPLICIT_TRANSACTIONS", "ANSI_DEFAULTS")


class _RelayClient:
    """The last_client of a backend the relay served: no client's identity (the next one replays its options)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "RELAY_CLIENT"


RELAY_CLIENT = _RelayClient()


def relay_rules(key=None) -> dict:
    """The Walker arguments of both directions for a lane of relay key `key` (None: the default packet size)."""
    from multiproxy.relay_core import FRAMINGS
    framing = dict(FRAMINGS["tds"])
    packet_size = key[2] if key is not None else 4096
    stop = bytes(kind for kind in range(256) if kind != SQL_BATCH)
    return {
        "client": dict(framing, stop=stop, count=bytes([SQL_BATCH]), screen=bytes([SQL_BATCH]),
                       words=RELAY_SCREEN_WORDS, max_screen=min(MAX_SCREENED, packet_size), request="tds"),
        "server": dict(framing, response="tds", max_boundary=packet_size),
        "buffer_size": max(BUFFER_SIZE, 2 * (packet_size + 1)),
    }


def relay_key(client):
    """(tracked options, database, packet size) when the compiled relay may serve the client's next requests, else
    None: a client that is not plainly idle (handover.not_idle: logged in, plaintext, no backend, nothing outstanding
    or half read, no transaction, no pin), of a pool that does not reset backends between clients, with no option
    under which a SELECT opens a transaction, the packet size the proxy's backends log in with (else no backend
    could serve its lane: the Python path re-frames its messages), and no per-request work of the Python path
    (retries of read-only refusals)."""
    ctx = client.ctx
    if (ctx.reset_after_transaction or ctx.retry_read_only or client.closing or client.pinned or client.pin_reasons
            or client.packet_size != BACKEND_PACKET_SIZE or any(name in client.options for name in UNRELAYABLE_OPTIONS)
            or not_idle(client)):
        return None
    return frozenset(client.options.items()), client.database, client.packet_size


def relay_serves(key, server) -> bool:
    """Whether a backend in TDSServerState `server` serves clients of relay key `key` with nothing replayed: the same
    tracked options (known), database and packet size. A backend it serves is marked as the relay's (last_client)."""
    options, database, packet_size = key
    if (server.options is None or server.packet_size != packet_size or server.database.lower() != database.lower()
            or len(server.options) != len(options) or any(server.options.get(n) != v for n, v in options)):
        return False
    server.last_client = RELAY_CLIENT
    return True
