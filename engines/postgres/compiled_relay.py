"""What the compiled relay ([proxy] relay = "compiled") needs from PostgreSQL: framing, stop frames, the Query screen.

In the relay a client's simple Query (and a Sync) goes to a backend lent for the transaction, and the backend comes
back at the ReadyForQuery with status idle that answers the last of them. The extended protocol is relayed for the
unnamed statement and portal only, in whole batches (the Walker's `pg_unnamed` option, multiproxy/relay_core.py): a
Parse of the unnamed statement directly followed by a Bind of it to the unnamed portal, Describe and Execute of the
unnamed portal, up to and with the Sync, all in the relay's buffer before a byte of it goes (at most MAX_SCREENED
bytes); the Parse's text is screened as a Query's is. That is what libpq's PQexecParams / PQsendQueryParams send
(`pgbench -M extended`, psycopg 3 with parameters, and psycopg's pipeline mode up to each Sync). Such a batch leaves
nothing held on the backend: its unnamed statement is bound at once, and a Bind always binds the statement parsed
right before it by the same client, so no client can bind another client's unnamed statement on a shared backend
(a Bind with no Parse right before it stops, and the Python path forwards one only to a backend on which the client
parsed the unnamed statement itself). A batch that opens with a Bind of one of the client's named prepared
statements (statement virtualisation: PostgresClient.relay_statements gives them to the relay each time the client
enters a lane) to the unnamed portal, with no Parse in it, is sent as a Parse of that statement's text as the unnamed
statement and a Bind of the unnamed statement (its ParseComplete dropped by the relay): what psycopg sends for a
prepared statement, asyncpg from its statement cache, `pgbench -M prepared`; the server parses the text again each
time, and no backend needs the statement prepared. The Parse that prepares a named statement stops (the Python path
records it), and so does any other batch at its first frame with nothing of it forwarded: named portals, Describe of
a statement, Close, Flush (a client waiting for answers before its Sync), a Parse not followed by its Bind; and every other client message stops too: FunctionCall, COPY data, Terminate and
anything unknown. A Query or a Parse stops too when its text holds a word of RELAY_SCREEN_WORDS (ASCII case ignored,
anywhere in the text: a false alarm only costs a trip through Python), or is longer than MAX_SCREENED: the words of
the pin screen (pinning.might_pin: SET, RESET, set_config, PREPARE, DEALLOCATE, DISCARD, LISTEN / UNLISTEN, TEMP
tables, cursors WITH HOLD, advisory locks, LOAD, CLOSE), the words that open a transaction block (BEGIN, START),
and COPY, whose CopyIn/CopyOut answers the Python path tracks. SET does not stop a text that is one statement
opening with SELECT, INSERT, UPDATE, DELETE, WITH or VALUES (and holding no ';' but at its end: EXEMPT_LEAD):
UPDATE's SET assigns columns, and OFFSET, "settings" or "dataset" hold the word; the Python path finds SET statements
only where a statement opens, so it tracks nothing there either (set_config, a function call anywhere, is a word of
its own). So no request the relay forwards as it is can pin, change a setting the Python path tracks or start a
COPY; the server messages that follow only such requests (ParameterStatus, NotificationResponse, CopyInResponse) do
not come in answer to it.

Transactions (`pg_begin`, see the relay core): a lone BEGIN or START TRANSACTION (no other statement; its modes, each
kind once, kept as the walker's transaction code and sent ahead spelt out) is answered by the relay itself, with no
backend, as the Python path's LazyTransaction answers it, so that a client idle after its BEGIN holds none; the relay
sends it ahead of the client's next request (Parse/Bind/Execute with no Sync, its answer dropped) on the backend that
serves the rest of the transaction, to the ReadyForQuery 'I' that ends it. A COMMIT or ROLLBACK right after it is
answered by the relay too. A stop frame inside such a transaction goes to the Python path with the backend once
nothing is outstanding (PostgresClient.relay_adopt links it with the status of the last ReadyForQuery); a client let
go of with its BEGIN answered and not sent carries it on there (PostgresClient.relay_began, with relay_core.begin_text
of that code). A BEGIN the relay does not read (a mode given twice, a comment) stops, and the Python path answers it.
An ErrorResponse is forwarded as it is: no tracked setting is there to undo (inside a transaction ReadyForQuery 'E'
keeps the backend until the client's ROLLBACK), and the server skips the rest of the batch to its Sync, which the
relay forwarded with it.

Relay logins (multiproxy.relay_logins): `relay_login` gives the greeting of a client that logged in with trust
authentication (AuthenticationOk, its ParameterStatus messages, BackendKeyData, ReadyForQuery) for the relay to send
by itself, with a fresh cancel key, to a client sending the same startup packet.
"""
from __future__ import annotations

import struct

from . import protocol as p
from .pinning import _KEYWORDS

RELAY_SCREEN_WORDS = _KEYWORDS + (b"begin", b"start", b"copy", b"set_config")     # "listen" covers UNLISTEN
# The Python path's SET opens a statement (pinning._SET), so "set" does not stop a text that is one statement opening
# with one of these (the relay core's exempt_lead): UPDATE ... SET, LIMIT ... OFFSET, a column named "settings" or
# "dataset" (set_config is a word of its own, and still stops)
EXEMPT_LEAD, EXEMPT_WORDS = (b"select", b"insert", b"update", b"delete", b"with", b"values"), (b"set",)
MAX_SCREENED = 8000         # a longer Query or batch goes through Python (the relay holds a screened frame whole)
BUFFER_SIZE = 16384         # bytes of each connection's buffer in the relay (at least twice MAX_SCREENED)
_COUNTED = frozenset((p.QUERY, p.SYNC))
_RELAYED = _COUNTED | frozenset((p.PARSE, p.BIND, p.DESCRIBE, p.EXECUTE))    # the last four in pg_unnamed batches


def relay_rules() -> dict:
    """The Walker arguments of both directions: the relay core's PostgreSQL framing with this engine's stops and screen.
    (Imported here, not at the top: loading the relay core says which implementation it found, which only the
    compiled mode needs to hear.)"""
    from multiproxy.relay_core import FRAMINGS
    framing = dict(FRAMINGS["postgres"])
    stop = bytes(kind for kind in range(256) if kind not in _RELAYED)
    return {
        "client": dict(framing, stop=stop, count=bytes(_COUNTED), screen=bytes((p.QUERY,)),
                       words=RELAY_SCREEN_WORDS, max_screen=MAX_SCREENED, pg_unnamed=True, exempt_lead=EXEMPT_LEAD,
                       exempt=EXEMPT_WORDS, pg_begin=True),
        "server": dict(framing, boundary=p.READY_FOR_QUERY),
        "buffer_size": BUFFER_SIZE,
        "quit": p.message(b"X"),    # Terminate: the client leaves with nothing to answer (RelayLane ends it at once)
    }


def relay_serves(key, server_state) -> bool:
    """Whether a backend in server_state serves a client of relay key `key` with nothing replayed (the condition of
    SessionState.link for an empty replay)."""
    params, settings = key
    held = server_state.params
    have = server_state.settings
    return (len(settings) == len(have) and all(have.get(name) == value for name, value in settings)
            and all(held.get(name) == value for name, value in params))


KEY = struct.Struct("!II")      # a cancel key as BackendKeyData holds it: pid, secret
RELAY_LOGIN_AUTH = frozenset(("trust", "scram-sha-256"))    # listener methods whose logins the relay runs
SSL_REQUEST = p.UINT32.pack(8) + p.UINT32.pack(p.SSL_REQUEST_CODE)


def relay_login(client, server_state):
    """(startup packet, greeting with a zeroed cancel key, where the key starts) of a client that logged in with
    trust or SCRAM-SHA-256 authentication and has sent no request yet, for the relay to greet clients sending the same
    startup packet by itself, after their own SCRAM exchange with SCRAM (multiproxy.relay_logins); None when its
    greeting is not the cached one of `server_state` or its startup asked for more than protocol 3.0 (a minor version
    or _pq_ options get a NegotiateProtocolVersion)."""
    body = client.startup_body
    if not body or client.ctx.listener.auth not in RELAY_LOGIN_AUTH or b"_pq_." in body or client.requests:
        return None
    cached = server_state.welcome_cache.get(body)
    if cached is None:
        return None
    startup = p.UINT32.pack(len(body) + 8) + p.UINT32.pack(p.PROTOCOL_VERSION_3) + body
    return startup, cached[0] + p.backend_key_data(0, 0) + p.READY_IDLE, len(cached[0]) + 5


def relay_login_same(facts, newer) -> bool:
    """Whether a later login's facts greet a client as `facts` did (session_state.login_complete reads these)."""
    return (facts.login_params == newer.login_params and facts.canonical == newer.canonical
            and facts.reported == newer.reported and facts.settings == newer.settings)
