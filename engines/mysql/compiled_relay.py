"""What the compiled relay ([proxy] relay = "compiled") needs from MySQL/MariaDB: framing, stop commands, the
COM_QUERY screen, the response walk.

In the relay a client's COM_QUERY (and COM_PING) goes to a backend lent for it, forwarded as it is (a command opens
with sequence id 0 and the server answers 1..n, which the Python path does not renumber either), and the backend
comes back at the end of the answer (the relay core's response="mysql" walk: OK, ERR, or a text result set up to its
last result) when the server's status flags say no transaction is open. A client with autocommit off (PyMySQL's
default; the relay key carries autocommit) opens a transaction with its first statement that reads a table, and
the relay serves it on that backend to the answer whose flags end it (an ERR inside keeps it: the walk's status
stays 'T' until an answer's flags say otherwise). A stop inside it (a SET, a statement command) goes to
the Python path with the backend once nothing is outstanding, and the client carries the transaction on there
(MySQLClient.relay_adopt). A lone BEGIN [WORK] or START TRANSACTION is answered by the relay itself (the rule's
`mysql_begin`: an OK packet with SERVER_STATUS_IN_TRANS and the lane's autocommit), as the Python path answers it,
so that a client idle after its BEGIN holds no backend (forty such clients share four backends); the relay sends it
as a COM_QUERY of its own ahead of the client's next command, on the backend that then serves the transaction, and
drops its OK (a failed BEGIN's ERR answers that command, whose own answer is dropped, as on the Python path). A
client let go of with its BEGIN answered and not sent carries it on (MySQLClient.relay_began). Other forms (READ
ONLY, WITH CONSISTENT SNAPSHOT) stop on their screen words. COMMIT, ROLLBACK and SAVEPOINT are relayed (they end
an autocommit-off client's transaction, and do nothing outside one).
Every other command stops: COM_QUIT, which the Python path turns into a hangup, COM_INIT_DB and COM_CHANGE_USER /
COM_RESET_CONNECTION (tracked schema and session), COM_STMT_* (statement ids mapped per backend), COM_FIELD_LIST,
COM_SET_OPTION, COM_PROCESS_KILL and anything unknown; so does a packet that opens no command (sequence id not 0,
empty: request="mysql"), and a COM_QUERY or COM_PING larger than MAX_SCREENED (16 MiB continuations included).

A COM_QUERY stops when its text holds a word of RELAY_SCREEN_WORDS (ASCII case ignored, anywhere in the text: a false
alarm only costs a trip through Python): the words of the pin screen (pinning.might_pin: SET, user variables '@', USE,
LOCK (GET_LOCK, LOCK TABLES), TEMPORARY tables, PREPARE, FOUND_ROWS / SQL_CALC_FOUND_ROWS, HANDLER, XA, KILL
(rewritten to the proxy's connection ids), FLUSH, LAST_INSERT_ID, DROP), BEGIN and START (but a lone one: above), LOAD
(LOAD DATA LOCAL asks the client for a file) and CALL (a procedure may open a transaction, set variables or take
locks). SET does not stop a text that is one statement opening with SELECT, INSERT, REPLACE, UPDATE or DELETE (and
holding no ';' but at its end: EXEMPT_LEAD): UPDATE's and INSERT ... SET's SET assigns columns, and OFFSET, CHARACTER
SET or "settings" hold the word; a session SET opens a statement. So no request the relay serves can pin, change a
setting the Python path tracks or ask for a LOCAL INFILE; an ERR is forwarded as it is, with nothing to undo. INSERT
and REPLACE are relayed: the last insert id their OK packets carry (the relay core keeps the last one other than 0 per
client: Relay.insert_id) goes to the client object when the relay lets go of the client (MySQLClient.relay_insert_id),
so that the Python path answers `SELECT LAST_INSERT_ID()` (LAST_INSERT_ID stops) as the server would.

The response walk must know whether CLIENT_DEPRECATE_EOF is in effect: a pool's backends log in with the
capabilities of its clients' variant (Engine.backend_variant), so the relay key carries the client's flag and the
lane's rules follow it (relay_rules(key)); relay_serves checks that the backend negotiated the same.
"""
from __future__ import annotations

from . import protocol as p
from .handover import not_idle
from .pinning import _KEYWORDS

RELAY_SCREEN_WORDS = _KEYWORDS + (b"begin", b"start", b"load", b"call")
# A session SET opens a statement (user variables are '@'): "set" does not stop a text that is one statement opening
# with one of these (the relay core's exempt_lead): UPDATE ... SET, LIMIT ... OFFSET, CHARACTER SET in a CAST, a
# column named "settings"
EXEMPT_LEAD, EXEMPT_WORDS = (b"select", b"insert", b"replace", b"update", b"delete"), (b"set",)
MAX_SCREENED = 8000         # a longer COM_QUERY goes through Python (the relay holds a screened packet whole)
MAX_ANSWER_HEAD = 4096      # the packets the response walk reads whole (a result's first packet, OK/EOF/ERR)
BUFFER_SIZE = 16384         # bytes of each connection's buffer in the relay (at least twice MAX_SCREENED)
_RELAYED = (p.COM_QUERY, p.COM_PING)


def relay_rules(key=None) -> dict:
    """The Walker arguments of both directions for a lane of relay key `key` (None: a key without
    CLIENT_DEPRECATE_EOF). (The relay core is imported here, not at the top: loading it says which implementation
    it found, which only the compiled mode needs to hear.)"""
    from multiproxy.relay_core import FRAMINGS
    framing = dict(FRAMINGS["mysql"])
    deprecate_eof = bool(key[3]) if key is not None else False
    autocommit = bool(key[4]) if key is not None else True
    stop = bytes(kind for kind in range(256) if kind not in _RELAYED)
    # a lone BEGIN is answered in the relay (mysql_begin) as the Python path answers it (commands._transaction_control)
    began = p.packet(1, p.ok_payload(p.SERVER_STATUS_IN_TRANS | (p.SERVER_STATUS_AUTOCOMMIT if autocommit else 0)))
    return {
        "client": dict(framing, stop=stop, count=bytes(_RELAYED), screen=bytes(_RELAYED), words=RELAY_SCREEN_WORDS,
                       max_screen=MAX_SCREENED, request="mysql", exempt_lead=EXEMPT_LEAD, exempt=EXEMPT_WORDS,
                       mysql_begin=began),
        "server": dict(framing, response="mysql", deprecate_eof=deprecate_eof, max_boundary=MAX_ANSWER_HEAD),
        "buffer_size": BUFFER_SIZE,
    }


def relay_key(client):
    """(tracked settings, schema, multi-statements, CLIENT_DEPRECATE_EOF, autocommit) when the compiled relay may
    serve the client's next requests, else None: a client that is not plainly idle (handover.not_idle: logged in, no
    backend, nothing outstanding or half read, no transaction, no pin), no deferred pins, and no per-request work of
    the Python path (retries of read-only refusals, a reset after each transaction). With autocommit off (PyMySQL's
    default) the first statement opens a transaction, which the relay serves on one backend to its COMMIT."""
    if (client.deferred_pins or client.retry_read_only or client.ctx.reset_after_transaction or client.closing
            or not_idle(client)):
        return None
    return (frozenset(client.variables.items()), client.schema, client.multi_statements, client.deprecate_eof,
            client.autocommit)


def relay_serves(key, server) -> bool:
    """Whether a backend in MySQLServerState `server` serves clients of relay key `key` with nothing replayed
    (SessionState.link would send nothing): the same settings, schema, multi-statements and autocommit, no
    transaction, no statement to close, and the same CLIENT_DEPRECATE_EOF."""
    variables, schema, multi_statements, deprecate_eof, autocommit = key
    return (not server.stale_statements and server.schema == schema and server.multi_statements == multi_statements
            and bool(server.status & p.SERVER_STATUS_AUTOCOMMIT) == autocommit
            and not server.status & p.SERVER_STATUS_IN_TRANS
            and bool(server.capabilities & p.CLIENT_DEPRECATE_EOF) == deprecate_eof
            and len(server.variables) == len(variables) and all(server.variables.get(n) == v for n, v in variables))
