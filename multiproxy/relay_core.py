"""The relay core: the compiled multiproxy._relay when it was built, else its pure-Python twin with the same API.

A `Walker` holds the framing rule of one direction of a protocol (declared by the engine: `FRAMINGS` has
PostgreSQL's, MySQL's and TDS's headers) and walks bytes: `feed(data) -> (consumed, event, arg)` stops at
the end of the walkable bytes (what is left is an incomplete header), after a boundary frame (PostgreSQL
ReadyForQuery: `arg` is its status byte), before a `stop` frame the engine wants to see (`arg` is its type)
or before a frame whose length cannot be (MALFORMED). A `Relay` owns an epoll set: linked client/backend
pairs and the idle backends. The caller watches `fileno()` in its event loop and calls `run_ready()`,
which moves bytes between all ready sockets, lends idle backends to clients that start a request (or
queues them), and takes a backend back at the end of each transaction, returning only the events the
engine asked for as (kind, fd, peer_fd, unforwarded bytes, arg) tuples. After an event the relay has
forgotten both sockets of it; the caller owns them again. The relay never closes a socket it was given.

`Relay(..., threaded=True)` (compiled only) serves its sockets in a thread of its own without the GIL;
fileno() is then readable when events wait. `listen(fd, refuse, refusal, hangup)` has the relay accept
clients itself and answer their first packets (PostgreSQL startup framing) from what the engine
declared: `refuse` (the SSLRequest) gets `refusal` (b"N"), a startup packet greeted before
(`cache_greeting(startup, reply)`) gets the same reply, any other is a STARTUP event (fd and the bytes
read) for the engine. Clients it accepted are its own until an event gives them to the caller: at EOF,
or at a `hangup` frame (Terminate) between transactions, it closes them itself. Relay logins
(multiproxy.relay_logins): a keyed greeting (`cache_greeting(startup, reply, key_at=, template=)`) is sent with a
fresh 8-byte cancel key written at key_at, one of those given with `add_keys(bytes)`, within the budget of
`set_login_budget(n, gives_back=False)` (-1: none; gives_back: a quiet client's goodbye gives one back, as for a limit
on the clients rather than a refusal; while it is 0, every wake() is whole); the
client then goes to the caller at once as a GREETED event (arg: template); with no key or no budget its startup is a
STARTUP event. GREETED data: its key, one byte n and n bytes of its peer's struct
sockaddr (getpeername(2); n = 0 if that failed), then what it sent after its startup packet. A keyed greeting cached
with `keep=True` keeps its client in the relay as a client instead (GREETED data: its key and its address alone): the
relay serves what it sends next, and still closes it at EOF or at a hangup frame between transactions, then with a
GONE event, until the caller takes the socket over with `disown(fd)`. A keyed greeting cached with
`scram=(tail, stored_key, server_key)` is sent only after the client's SCRAM-SHA-256 exchange, which the relay runs and
verifies from those keys (its AuthenticationSASLFinal goes first); an exchange it does not finish is an ANSWERED event
(data: one byte n, the relay's n-byte part of the nonce, every byte the client sent; arg: how many of them the relay
answered), for the engine to go on from there (see "Relay logins: SCRAM" in _relay.c). `forget_greetings()` drops
every cached greeting; `take_starting(aged_only=False)` gives the clients still in their startup to the caller as
STARTUP (or ANSWERED) events (aged_only: those already starting at the previous such call, the others marked), and
`unlisten()` forgets the listening sockets (closing none) and gives those clients back likewise. `set_quiet(True)`:
a kept client is counted (`quiet_counts()`) instead of reported, until an event of it, `take_quiet()` or
`report_key(key)` reports it as a QUIET event (GREETED's data, then its greeting time as a C double).
`age_quiet(now, idle_limit, busy_limit, transaction_limit) -> (events, [(fd, state, since)])` judges the client
timeouts of quiet clients with no session: a quiet client's state (WATCH_IDLE, WATCH_BUSY: a request outstanding or
waiting for a backend, WATCH_TRANSACTION: linked with nothing outstanding) and its requests walked, unchanged since
`since` (the `now` of the call that first saw them) for its state's limit (0: none), report it (QUIET event) and
list it.
`wake()` is what the caller's loop may call instead of run_ready(): it calls the handler given to `set_wake(handler)`
with None for a whole wake-up (the handler runs run_ready() itself) after any module-level `attend()`, at the first
wake-up after set_wake, or at every one while `set_wake_rules(eager=True)`; otherwise it serves the ready sockets
itself and calls `handler(events)` only when there are events, clients waiting for a backend, or fewer keys than
set_wake_rules' keys_low, so that a wake-up needing none of the caller's code runs no Python (see _relay.c).

A rule may screen the bodies of some frame types (`screen`, `words`, `max_screen`): such a frame is walked
whole, and one that holds one of the words (ASCII case ignored) or is larger than max_screen is a stop frame.
Words named in `exempt` (each one of the words) do not stop a body that is one statement opening with an `exempt_lead`
(bytes, or up to MAX_LEADS of them): after its leading bytes up to 0x20 (white space; the NUL or command byte before a
PostgreSQL Parse's or a MySQL COM_QUERY's text), the lead and a byte up to 0x20, and no ';' but at its end (only
bytes up to 0x20 and ';' after the first one). An engine exempts SET in one statement opening with SELECT, UPDATE,
... (`OFFSET`, `UPDATE ... SET`, a column named `settings`), since its own SET statements open a statement.
`pg_begin=True` (a PostgreSQL client rule): a simple Query whose whole text is a lone BEGIN [WORK | TRANSACTION] or
START TRANSACTION, with or without modes (ISOLATION LEVEL, READ ONLY / WRITE, [NOT] DEFERRABLE: TXW_MODES; ASCII case
ignored, PostgreSQL's white space around, one ';' at the end) is a LOCAL event before it (arg: the transaction code,
TXW_BEGIN or TXW_START in its low bits, TXW_WORD, and the modes above) whatever the screen says, and while the
walker's `lazy` is set so is a lone COMMIT / END / ROLLBACK / ABORT [WORK | TRANSACTION] (TXW_COMMIT, TXW_ROLLBACK).
The relay answers them itself for a client between transactions: BEGIN with CommandComplete and ReadyForQuery 'T',
holding no backend; COMMIT or ROLLBACK right after it with 'I'; the BEGIN (begin_text: its modes spelt out) goes, as
Parse/Bind/Execute of the unnamed statement with no Sync (a simple Query then gets a Sync of the relay's behind it,
whose ReadyForQuery is dropped), in front of the next request that takes a backend, and its answer is dropped, so that a failed BEGIN's error is that request's answer. A client the relay lets go of with such a
BEGIN unsent (a stop frame, a request that opens with anything but a Query or a Parse, take_waiting, remove, ...):
`lazy_begin(fd)` is that transaction code (begin_text spells it), for the caller to carry the transaction on.
A PostgreSQL client rule may relay batches of the unnamed statement (`pg_unnamed=True`, PostgreSQL's framing only):
a Parse, Bind, Describe or Execute opens a batch that is walked only whole, up to and with its Sync (counted once:
one request, one ReadyForQuery), and relayed when every frame of it is one of: Parse of the unnamed statement (well
formed, its body screened for the words as above; a malformed one stops at once) directly followed by Bind of the
unnamed portal and statement (a Bind with no Parse right before it stops), Describe of the unnamed portal, Execute
of the unnamed portal. Anything else in it (another type, a statement or portal name, a screen word, a length below
the header), or a batch longer than max_screen, makes the batch's first frame a stop frame with nothing of the batch
forwarded; a batch not whole yet waits for more bytes. So every statement relayed is bound at once by its own
client, and no forwarded byte belongs to a batch whose ReadyForQuery is not owed. Named statements: a walker's
`set_statements({name: Parse body})` (Relay.set_statements(fd, ...) for a client) names the client's prepared
statements; a batch that opens with a Bind of one of them to the unnamed portal, with no Parse in it, is a NAMED
event at its start (arg: the statement's index), and the relay turns it into Parse of the statement's text as the
unnamed statement and a Bind of the unnamed statement (walked again as such), dropping that Parse's ParseComplete
from the backend's answer; with anything of the client's in flight, or no room in the buffer, it is a stop frame.
`Relay(..., hold_stops=True)`: a linked client's stop frame waits for the boundary that answers its last request
(the client is not read meanwhile), so the caller never takes over a request half answered: at the end of its
transaction it goes to the caller alone; inside a transaction (a boundary other than 'I', or a stop frame while
linked with nothing outstanding) it goes with its backend (peer fd), the event's arg being the status of that
backend's last boundary ('T', 'E'), for the caller to carry the transaction on (the backend goes instead, as
UNSOLICITED, when it said more than that answer).
Between transactions `take_idle()` (an idle backend's fd, or -1), `take_waiting()` ((fd, bytes not sent) of the
client waiting longest for a backend, or None) and `remove(fd)` (bytes not sent, or None when fd is linked, held or
unknown) give sockets back to the caller; `peer(fd)` is the fd linked to fd now (or -1); `activity(fd)` is a
client's (requests walked since the relay was given it, peer fd or -1, waiting for a backend, requests not answered
yet, its lazy BEGIN: see pg_begin below), or None for a backend or an unknown fd (the client timeouts read it);
`relayed_before(fd)` is the requests
walked for the client last let go of at fd (its event in hand, the relay has forgotten it); `counts()` is (idle backends, waiting clients, linked clients).
`set_yield(on) -> events`: while on, the relay lends no backend by itself: a backend that ends a transaction goes
to the idle list (not to the client waiting longest) and a client that starts a request waits even if a backend is
idle, so the caller decides where every free backend goes (take_idle; add_backend still lends to the client waiting
longest); turned off, the idle backends are lent to the waiting clients, longest waiting first. `age_waiting(limit)`
counts one tick for every waiting client (from 0 when it began to wait) and forgets and returns, as [(fd, bytes not
sent)] longest waiting first, those with `limit` ticks: called at a steady pace, it bounds the wait with no clock.

MySQL has no frame that ends a response: a rule with `response="mysql"` (the server direction, MySQL framing) follows
the text protocol's answers to COM_QUERY / COM_PING instead of types: OK, ERR, or a column count, column definitions,
an EOF (not with `deprecate_eof`: CLIENT_DEPRECATE_EOF in effect), rows and an EOF (with deprecate_eof: an OK with
the 0xFE header) or ERR; packets of 0xFFFFFF payload bytes continue in the next (which has no type byte), and
SERVER_MORE_RESULTS_EXISTS in an end's status flags starts the next result. The end of a response is a boundary with
the status 'T' when SERVER_STATUS_IN_TRANS is set, else 'I'; an ERR (which carries no flags) ends it with the status
of the response before it on the same connection ('I' at first): a failed statement opens no transaction, and one
that fails inside a transaction leaves it open as far as the walk can tell (an error that rolled it back shows in
the next answer's 'I'). A LOCAL INFILE request (0xFB) is MALFORMED (the screen stops LOAD DATA), as are packets the
walk must read whole (a result's first packet, an end) over max_boundary bytes. A rule with `request="mysql"` (the
client direction) makes a packet that opens no command (sequence id not 0, or empty) MALFORMED.

TDS: a rule with `response="tds"` (the server direction, TDS framing) ends a response after the packet with the EOM
status bit, a boundary with the status 'I' (the engine's request check lets through only batches that cannot leave a
transaction open); a packet that is not a tabular result (0x04) or shorter than its header is MALFORMED, as is an EOM
packet over max_boundary bytes (it is read whole). A rule with `request="tds"` (the client direction) makes a
screened packet a stop frame unless its status is EOM alone and its UTF-16LE SQL text, after the ALL_HEADERS its
first 4 bytes measure, opens with the word SELECT after white space.

`IMPLEMENTATION` says which one `Walker` and `Relay` are ("c" or "python"; the environment variable
MULTIPROXY_RELAY_CORE=python chooses the twin even where the extension is built, so that the tests can run a proxy
on it); `PyWalker` and `PyRelay` are always the twin.
"""
from __future__ import annotations

import base64
import errno
import hashlib
import hmac
import logging
import operator
import os
import re
import select
import socket
import struct
import time

log = logging.getLogger("multiproxy.relay_core")

NONE, BOUNDARY, HANDOVER, MALFORMED, CLOSED, UNSOLICITED, STARTUP, GREETED, GONE, ANSWERED, QUIET, LOCAL, NAMED = \
    range(13)
MAX_STATEMENT_NAME = 63         # bytes of a named statement's name in a walker's table (set_statements)
# pg_begin: a LOCAL event's arg, the transaction code of a lone simple Query (_pg_transaction_word): the transaction
# word in its low bits (TXW_WORD), and a BEGIN's modes above them (TXW_MODES: begin_text spells them out)
TXW_NONE, TXW_BEGIN, TXW_START, TXW_COMMIT, TXW_ROLLBACK = range(5)
TXW_WORD = 7
_ISOLATION_SHIFT, _ACCESS_SHIFT, _DEFER_SHIFT = 3, 6, 8
# (shift, value, the words of the mode, its text): each category of mode at most once in a BEGIN
TXW_MODES = (
    (_ISOLATION_SHIFT, 1, (b"isolation", b"level", b"serializable"), b"ISOLATION LEVEL SERIALIZABLE"),
    (_ISOLATION_SHIFT, 2, (b"isolation", b"level", b"repeatable", b"read"), b"ISOLATION LEVEL REPEATABLE READ"),
    (_ISOLATION_SHIFT, 3, (b"isolation", b"level", b"read", b"committed"), b"ISOLATION LEVEL READ COMMITTED"),
    (_ISOLATION_SHIFT, 4, (b"isolation", b"level", b"read", b"uncommitted"), b"ISOLATION LEVEL READ UNCOMMITTED"),
    (_ACCESS_SHIFT, 1, (b"read", b"write"), b"READ WRITE"),
    (_ACCESS_SHIFT, 2, (b"read", b"only"), b"READ ONLY"),
    (_DEFER_SHIFT, 1, (b"deferrable",), b"DEFERRABLE"),
    (_DEFER_SHIFT, 2, (b"not", b"deferrable"), b"NOT DEFERRABLE"),
)
_MODE_FIELD = {_ISOLATION_SHIFT: 7, _ACCESS_SHIFT: 3, _DEFER_SHIFT: 3}    # each category's bits
MAX_TX_TOKENS, MAX_TX_WORD = 16, 15     # words and commas of a transaction statement; letters of one word


def begin_text(code: int) -> bytes:
    """The BEGIN of a transaction code (lazy_begin(fd)): BEGIN or START TRANSACTION and its modes, as the relay sends it
    ahead (the client's own spelling is not kept: the same statement to the server)."""
    parts = [b"START TRANSACTION" if code & TXW_WORD == TXW_START else b"BEGIN"]
    parts += [text for shift, value, _, text in TXW_MODES if (code >> shift) & _MODE_FIELD[shift] == value]
    return b" ".join(parts)


WATCH_IDLE, WATCH_BUSY, WATCH_TRANSACTION = range(3)    # a quiet client's state for age_quiet()
MAX_STARTUP = 10000     # PostgreSQL's own limit on a startup packet
SCRAM_NONCE_RAW = 18    # relay logins with SCRAM: random bytes of the relay's part of the nonce (24 in base64)
SCRAM_TAIL_MAX = 160    # the end of a server-first-message: ",s=<salt>,i=<iterations>"
SCRAM_TEXT_MAX = 512    # a client-first-message-bare the relay verifies
_SASL_REQUEST = b"R\x00\x00\x00\x17\x00\x00\x00\x0aSCRAM-SHA-256\x00\x00"
MAX_WORDS, MAX_WORD = 64, 32    # screen words of one rule, bytes of one word
MAX_LEADS = 8                   # exempt leads of one rule
_PG_BATCH_OPENS = frozenset(b"PBDE")     # pg_unnamed: the frame types that open a batch of the unnamed statement
_PG_BATCH_INCOMPLETE, _PG_BATCH_RELAYED, _PG_BATCH_STOP = range(3)
# pg_begin (see "a BEGIN the relay answers" in _relay.c): Bind and Execute sent ahead of the request after a lazy
# BEGIN, behind the Parse of its text (_pg_begin_ahead)
_PG_BIND_EXECUTE = b"B\0\0\0\x0c" + bytes(8) + b"E\0\0\0\x09" + bytes(5)
_PG_SYNC = b"S\0\0\0\x04"
_PG_READY_LEN = 6
_PG_SWALLOWED = frozenset(b"12C")       # ParseComplete, BindComplete, CommandComplete of that BEGIN
_PG_PASSED = frozenset(b"NS")           # a notice or parameter report among them: forwarded
_PG_SPACE = frozenset(b" \t\n\r\f")     # PostgreSQL's white space between tokens
_MY_BEGIN_AHEAD = b"\x06\0\0\0\x03BEGIN"   # mysql_begin: the COM_QUERY sent ahead
_TX_WORDS = {b"begin": TXW_BEGIN, b"commit": TXW_COMMIT, b"end": TXW_COMMIT, b"rollback": TXW_ROLLBACK,
             b"abort": TXW_ROLLBACK}
_TX_TOKEN = re.compile(rb"[^ \t\n\r\f,]+|,")
_LOCAL_TAGS = {TXW_BEGIN: b"BEGIN", TXW_START: b"START TRANSACTION", TXW_COMMIT: b"COMMIT", TXW_ROLLBACK: b"ROLLBACK"}

# The framing rules the engines declare: frame size = length field + length_adjust.
FRAMINGS = {
    # type byte, 4-byte big-endian length that counts itself
    "postgres": dict(header_size=5, length_offset=1, length_size=4, big_endian=True, length_adjust=1,
                     type_offset=0),
    # 3-byte little-endian payload length, sequence id; the command / status byte opens the payload
    "mysql": dict(header_size=4, length_offset=0, length_size=3, big_endian=False, length_adjust=4,
                  type_offset=4),
    # packet type, status, 2-byte big-endian length that counts the 8-byte header
    "tds": dict(header_size=8, length_offset=2, length_size=2, big_endian=True, length_adjust=0, type_offset=0),
}


def postgres_walkers(client_stop: bytes = b"X", server_stop: bytes = b"", walker_type=None) -> tuple:
    """Walkers for a PostgreSQL pooler: client requests (Query, Sync, FunctionCall) open a request that the
    server's ReadyForQuery closes; Terminate (and whatever else client_stop names) goes to the caller.
    walker_type: the Walker of the Relay they are for (default: the one in use)."""
    rule = FRAMINGS["postgres"]
    make = walker_type or Walker
    return (make(**rule, stop=client_stop, count=b"QSF"), make(**rule, stop=server_stop, boundary=ord("Z")))


def _pg_transaction_word(body: bytes) -> int:
    """The transaction code of a Query body (its text and the NUL that ends it): BEGIN [WORK | TRANSACTION] or START
    TRANSACTION with the modes of TXW_MODES (separated by white space or one comma, each category once), COMMIT / END,
    ROLLBACK / ABORT [WORK | TRANSACTION]; ASCII case ignored, PostgreSQL's white space (space, tab, CR, LF, FF)
    around, one ';' at the end; else TXW_NONE."""
    if len(body) < 2 or body[-1] != 0 or 0 in body[:-1]:
        return TXW_NONE
    return _transaction_word(body[:-1])


def _transaction_word(text: bytes, mysql: bool = False) -> int:
    """As _pg_transaction_word, of a text with no NUL at its end; mysql: BEGIN [WORK] and START TRANSACTION only."""
    semi = text.find(b";")
    if semi >= 0:
        if any(ch not in _PG_SPACE for ch in text[semi + 1:]):
            return TXW_NONE
        text = text[:semi]
    words = _TX_TOKEN.findall(text)
    if not 1 <= len(words) <= MAX_TX_TOKENS or any(
            w != b"," and (len(w) > MAX_TX_WORD or not all(0x41 <= ch <= 0x5A or 0x61 <= ch <= 0x7A for ch in w))
            for w in words):
        return TXW_NONE
    words = [w.lower() for w in words]
    first, second = words[0], words[1] if len(words) > 1 else b""
    if mysql:
        if len(words) > 2:
            return TXW_NONE
        if first == b"begin" and second in (b"", b"work"):
            return TXW_BEGIN
        return TXW_START if first == b"start" and second == b"transaction" else TXW_NONE
    if first == b"start":
        if second != b"transaction":
            return TXW_NONE
        return _with_modes(TXW_START, words, 2)
    word = _TX_WORDS.get(first, TXW_NONE)
    at = 2 if second in (b"work", b"transaction") else 1
    if word == TXW_BEGIN:
        return _with_modes(TXW_BEGIN, words, at)
    return word if at == len(words) else TXW_NONE


def _with_modes(word: int, words: list, at: int) -> int:
    """word with the modes in words[at:] (TXW_MODES), or TXW_NONE: a comma only between two modes, each kind once."""
    code, seen = word, 0
    while at < len(words):
        if words[at] == b",":
            if at == len(words) - 1 or seen == 0:
                return TXW_NONE
            at += 1
        for shift, value, mode_words, _ in TXW_MODES:
            if tuple(words[at:at + len(mode_words)]) == mode_words:
                break
        else:
            return TXW_NONE
        if seen & (1 << shift):
            return TXW_NONE
        seen |= 1 << shift
        code |= value << shift
        at += len(mode_words)
    return code


def _pg_begin_ahead(code: int) -> bytes:
    """Parse, Bind and Execute of the unnamed statement holding the BEGIN of a transaction code, with no Sync."""
    text = begin_text(code)
    return b"P" + (len(text) + 8).to_bytes(4, "big") + b"\0" + text + b"\0\0\0" + _PG_BIND_EXECUTE


def _pg_local_answer(word: int) -> bytes:
    """CommandComplete and ReadyForQuery the relay sends for a transaction word it answers."""
    tag = _LOCAL_TAGS[word & TXW_WORD] + b"\0"
    status = b"T" if word & TXW_WORD in (TXW_BEGIN, TXW_START) else b"I"
    return b"C" + (4 + len(tag)).to_bytes(4, "big") + tag + b"Z\0\0\0\x05" + status


def _pg_parse_well_formed(body: bytes) -> bool:
    """A Parse body: name, query text (both NUL-terminated), int16 count of parameter types, that many int32s."""
    name_end = body.find(b"\0")
    query_end = body.find(b"\0", name_end + 1) if name_end >= 0 else -1
    if query_end < 0 or len(body) - query_end - 1 < 2:
        return False
    count = int.from_bytes(body[query_end + 1:query_end + 3], "big", signed=True)
    return count >= 0 and len(body) - query_end - 3 == count * 4


class PyWalker:
    """The framing rule of one direction and its walk state (the twin of _relay.Walker)."""

    __slots__ = ("header_size", "length_offset", "length_size", "big_endian", "length_adjust", "type_offset",
                 "stop", "count", "boundary", "max_boundary", "screen", "words", "max_screen", "pg_unnamed",
                 "remaining", "counted", "response", "deprecate_eof", "request", "mstate", "mmore", "mcount", "mtrans",
                 "exempt_lead", "exempt", "pg_begin", "lazy", "mysql_begin", "insert_id", "statements")

    def __init__(self, header_size, length_offset, length_size, big_endian, length_adjust, type_offset=-1,
                 stop=b"", count=b"", boundary=-1, max_boundary=4096, screen=b"", words=(), max_screen=4096,
                 pg_unnamed=False, response=None, deprecate_eof=False, request=None, exempt_lead=b"", exempt=(),
                 pg_begin=False, mysql_begin=b""):
        if (header_size < 1 or not 1 <= length_size <= 4 or length_offset < 0
                or length_offset + length_size > header_size or not -1 <= type_offset <= 255
                or not -1 <= boundary <= 255 or max_boundary < 1 or max_screen < header_size):
            raise ValueError("inconsistent framing rule")
        if (pg_unnamed or pg_begin) and (header_size, length_offset, length_size, bool(big_endian), length_adjust,
                                         type_offset) != (5, 1, 4, True, 1, 0):
            raise ValueError("pg_unnamed, pg_begin: only with PostgreSQL's framing")
        self.pg_unnamed, self.pg_begin = bool(pg_unnamed), bool(pg_begin)
        self.lazy = False               # pg_begin: a BEGIN answered and not sent (COMMIT / ROLLBACK are LOCAL too)
        if len(mysql_begin or b"") > 64 or (mysql_begin and (request != "mysql" or type_offset != 4)):
            raise ValueError('mysql_begin: at most 64 bytes, only with request="mysql" (the MySQL framing)')
        self.mysql_begin = bytes(mysql_begin or b"")
        if response not in (None, "", "mysql", "tds"):
            raise ValueError('response: "mysql", "tds" or none')
        if request not in (None, "", "mysql", "tds"):
            raise ValueError('request: "mysql", "tds" or none')
        mysql_framing = (header_size, length_offset, length_size, bool(big_endian), length_adjust) == (4, 0, 3, False, 4)
        tds_framing = (header_size, length_offset, length_size, bool(big_endian), length_adjust, type_offset) == (
            8, 2, 2, True, 0, 0)
        if "tds" in (response, request) and (not tds_framing or (response == "tds" and max_boundary < 8)):
            raise ValueError('response="tds" / request="tds" need the TDS framing')
        if response == "mysql" and (not mysql_framing or max_boundary < 5):
            raise ValueError('response="mysql" needs the MySQL framing')
        if request == "mysql" and not mysql_framing:
            raise ValueError('request="mysql" needs the MySQL framing')
        self.response, self.request = response or None, request or None
        self.deprecate_eof = bool(deprecate_eof)
        self.mstate, self.mmore, self.mcount = MY_START, False, 0
        self.mtrans = False             # the last response ended inside a transaction (an ERR after it says 'T')
        self.insert_id = 0              # the last insert id other than 0 an OK packet carried
        words = tuple(words or ())
        if len(words) > MAX_WORDS or any(type(w) is not bytes or not 1 <= len(w) <= MAX_WORD for w in words):
            raise ValueError(f"words: at most {MAX_WORDS}, each 1 to {MAX_WORD} bytes")
        self.screen, self.words, self.max_screen = frozenset(screen or b""), tuple(w.lower() for w in words), max_screen
        exempt = frozenset(w.lower() for w in exempt or ())
        leads = (exempt_lead,) if isinstance(exempt_lead, bytes) else tuple(exempt_lead or ())
        if (len(leads) > MAX_LEADS or any(type(lead) is not bytes or len(lead) > MAX_WORD for lead in leads)
                or not exempt <= set(self.words)):
            raise ValueError(f"exempt_lead: bytes, or at most {MAX_LEADS} of them, each at most {MAX_WORD} bytes; "
                             "exempt: each one of the words")
        self.exempt_lead, self.exempt = tuple(lead.lower() for lead in leads if lead), exempt
        self.header_size, self.length_offset, self.length_size = header_size, length_offset, length_size
        self.big_endian, self.length_adjust, self.type_offset = bool(big_endian), length_adjust, type_offset
        self.stop, self.count = frozenset(stop or b""), frozenset(count or b"")
        self.boundary, self.max_boundary = boundary, max_boundary
        self.remaining = 0
        self.counted = 0
        self.statements = None          # pg_unnamed: {name: (index, Parse body)} a batch may bind (NAMED)

    def set_statements(self, mapping) -> int:
        """The named statements a batch may bind ({name: Parse body of the unnamed statement}, or None): a batch that
        opens with a Bind of one to the unnamed portal, with no Parse in it, is a NAMED event at its start (arg: the
        statement's index, in the order of the dict's usable entries), for the relay to make it a batch of the
        unnamed statement. Entries whose name is not 1 to MAX_STATEMENT_NAME bytes without NUL, or whose Parse body is
        malformed, not of the unnamed statement, holds a screen word or is too big to relay, are left out. How many
        were usable."""
        if mapping is not None and not isinstance(mapping, dict):
            raise TypeError("statements: a dict of bytes names to bytes Parse bodies, or None")
        table = {}
        for name, parse in (mapping or {}).items():
            if not isinstance(name, bytes) or not isinstance(parse, bytes):
                raise TypeError("statements: a dict of bytes names to bytes Parse bodies, or None")
            if (1 <= len(name) <= MAX_STATEMENT_NAME and 0 not in name and parse[:1] == b"\0"
                    and 5 + len(parse) <= self.max_screen and _pg_parse_well_formed(parse)
                    and not self._screen_hit(parse.lower())):
                table[name] = (len(table), parse)
        self.statements = table or None
        return len(table)

    def feed(self, data) -> tuple[int, int, int]:
        """(consumed, event, arg): walk data on from the walker's state (see the module docstring)."""
        if self.response == "mysql":
            return self._feed_mysql_response(data)
        if self.response == "tds":
            return self._feed_tds_response(data)
        pos, end = 0, len(data)
        header_size, type_offset = self.header_size, self.type_offset
        order = "big" if self.big_endian else "little"
        while pos < end:
            if self.remaining:
                take = min(self.remaining, end - pos)
                pos += take
                self.remaining -= take
                continue
            avail = end - pos
            if avail < header_size:
                break
            length = int.from_bytes(data[pos + self.length_offset:pos + self.length_offset + self.length_size], order)
            total = length + self.length_adjust
            kind = -1
            if type_offset >= 0 and total > type_offset:
                if avail <= type_offset:
                    break
                kind = data[pos + type_offset]
            if self.request == "mysql" and (data[pos + 3] != 0 or length == 0):
                return pos, MALFORMED, kind
            if kind in self.stop:
                return pos, HANDOVER, kind
            if self.pg_unnamed and kind in _PG_BATCH_OPENS:
                verdict, size, named = self._pg_batch(data, pos, end)
                if verdict == _PG_BATCH_INCOMPLETE:
                    break
                if verdict == _PG_BATCH_STOP:
                    return pos, HANDOVER, kind
                if named >= 0:          # for the relay to make it a batch of the unnamed statement
                    return pos, NAMED, named
                self.counted += 1
                pos += size
                continue
            if total < header_size:
                return pos, MALFORMED, kind
            if kind >= 0 and kind == self.boundary:
                if total <= header_size or total > self.max_boundary:
                    return pos, MALFORMED, kind
                if avail < total:
                    break
                return pos + total, BOUNDARY, data[pos + header_size]
            if kind in self.screen:
                # a screened frame is walked whole: too big to hold, or holding a word, it goes to the caller
                if total > self.max_screen:
                    return pos, HANDOVER, kind
                if avail < total:
                    break
                if self.pg_begin and kind == 81:        # Q
                    word = _pg_transaction_word(bytes(data[pos + 5:pos + total]))
                    if word & TXW_WORD in (TXW_BEGIN, TXW_START) or (word != TXW_NONE and self.lazy):
                        return pos, LOCAL, word
                if self.mysql_begin and kind == 3 and total > 5:    # COM_QUERY
                    word = _transaction_word(bytes(data[pos + 5:pos + total]), mysql=True)
                    if word != TXW_NONE:
                        return pos, LOCAL, word
                if self._screen_hit(bytes(data[pos + header_size:pos + total]).lower()):
                    return pos, HANDOVER, kind
                if self.request == "tds" and not _tds_request_relayable(bytes(data[pos:pos + total])):
                    return pos, HANDOVER, kind
            if kind in self.count:
                self.counted += 1
            take = min(total, avail)
            pos += take
            self.remaining = total - take
        return pos, NONE, -1

    def _screen_hit(self, low: bytes) -> bool:
        """Whether the lowercased body holds a word (an exempt word only outside an exempt text: _screen_exempt)."""
        exempt = None
        for word in self.words:
            if low.find(word) >= 0:
                if word not in self.exempt:
                    return True
                if exempt is None:
                    exempt = self._screen_exempt(low)
                if not exempt:
                    return True
        return False

    def _screen_exempt(self, low: bytes) -> bool:
        """One statement opening with an exempt lead: after the leading bytes up to 0x20, the lead and a byte up to
        0x20, and no ';' but at the end (only bytes up to 0x20 and ';' after the first one)."""
        i = 0
        while i < len(low) and low[i] <= 0x20:
            i += 1
        if not any(len(low) - i > len(lead) and low[i:i + len(lead)] == lead and low[i + len(lead)] <= 0x20
                   for lead in self.exempt_lead):
            return False
        semi = low.find(b";", i)
        return semi < 0 or all(ch <= 0x20 or ch == 0x3B for ch in low[semi:])

    def _pg_batch(self, data, start, end) -> tuple[int, int, int]:
        """(verdict, size, named) of the batch of the unnamed statement at data[start:end] (see the module docstring):
        named, the index of the statement of set_statements that a batch opening with its Bind binds, else -1."""
        q, after_parse, max_screen, named = start, False, self.max_screen, -1
        while True:
            if end - q < 5:
                return (_PG_BATCH_STOP if q - start + 5 > max_screen else _PG_BATCH_INCOMPLETE), 0, named
            kind = data[q]
            total = int.from_bytes(data[q + 1:q + 5], "big") + 1
            if total < 5 or q - start + total > max_screen:
                return _PG_BATCH_STOP, 0, named
            if end - q < total:
                return _PG_BATCH_INCOMPLETE, 0, named
            body = bytes(data[q + 5:q + total])
            if after_parse and kind != 66:                  # B
                return _PG_BATCH_STOP, 0, named
            if kind == 80:                                  # P
                ok = (named < 0 and body[:1] == b"\0" and _pg_parse_well_formed(body)
                      and not self._screen_hit(body.lower()))
                after_parse = True
            elif kind == 66:                                # B
                if after_parse:
                    ok = body[:2] == b"\0\0"
                elif q == start and self.statements and len(body) >= 2 and body[0] == 0 and body[1] != 0:
                    name_end = body.find(b"\0", 1)
                    entry = self.statements.get(body[1:name_end]) if name_end > 0 else None
                    named = entry[0] if entry is not None else -1
                    ok = named >= 0
                else:
                    ok = False
                after_parse = False
            elif kind == 68:                                # D
                ok = body == b"P\0"
            elif kind == 69:                                # E
                ok = len(body) == 5 and body[0] == 0
            elif kind == 83:                                # S
                if body:
                    return _PG_BATCH_STOP, 0, named
                size = q + total - start
                if named >= 0:
                    name, parse = next((n, b) for n, (i, b) in self.statements.items() if i == named)
                    if size + 5 + len(parse) > max_screen + len(name):
                        return _PG_BATCH_STOP, 0, named     # made a batch of the unnamed statement, too big
                return _PG_BATCH_RELAYED, size, named
            else:
                ok = False
            if not ok:
                return _PG_BATCH_STOP, 0, named
            q += total

    def _feed_mysql_response(self, data) -> tuple[int, int, int]:
        """feed() of response="mysql": the server's answers to COM_QUERY / COM_PING (see the module docstring)."""
        pos, end = 0, len(data)
        while pos < end:
            if self.remaining:
                take = min(self.remaining, end - pos)
                pos += take
                self.remaining -= take
                continue
            avail = end - pos
            if avail < 4:
                break
            length = data[pos] | (data[pos + 1] << 8) | (data[pos + 2] << 16)
            total = length + 4
            if self.mmore:
                self.mmore = length == MY_MAX_PAYLOAD      # a continuation: no type byte
            else:
                if length == 0:
                    return pos, MALFORMED, -1
                if avail < 5:
                    break
                head = data[pos + 4]
                state = self.mstate
                whole = state in (MY_START, MY_COLUMNS_EOF) or (
                    state == MY_ROWS and length < MY_MAX_PAYLOAD
                    and (head == 0xFF or (head == 0xFE and (self.deprecate_eof or length < 9))))
                if not whole:
                    if state == MY_COLUMNS:
                        self.mcount -= 1
                        if self.mcount == 0:
                            self.mstate = MY_ROWS if self.deprecate_eof else MY_COLUMNS_EOF
                    self.mmore = length == MY_MAX_PAYLOAD
                else:
                    if total > self.max_boundary or (state == MY_START and head == 0xFB):
                        return pos, MALFORMED, head     # too big to be read whole, or LOCAL INFILE
                    if avail < total:
                        break
                    payload = bytes(data[pos + 4:pos + total])
                    status, is_end = -1, True
                    if head == 0xFF:
                        status = 0                      # ERR: no flags (see the module docstring)
                    elif state == MY_START:
                        if head == 0x00:
                            status = _mysql_ok_status(payload)
                            insert_id = _mysql_ok_insert_id(payload)
                            if insert_id:
                                self.insert_id = insert_id     # (an INSERT's: the caller keeps it)
                        elif head == 0xFE and length < 9:
                            status = _mysql_eof_status(payload)
                        else:
                            columns, at = _mysql_lenenc(payload, 0)
                            if columns is not None and columns > 0 and at == length:
                                self.mcount, self.mstate, status = columns, MY_COLUMNS, 0
                            is_end = False
                    elif state == MY_COLUMNS_EOF:
                        if head == 0xFE and length < 9:
                            status = _mysql_eof_status(payload)
                            self.mstate = MY_ROWS
                        is_end = False
                    else:                               # MY_ROWS: the terminator
                        status = _mysql_ok_status(payload) if self.deprecate_eof else _mysql_eof_status(payload)
                    if status < 0:
                        return pos, MALFORMED, head
                    if is_end:
                        self.mstate = MY_START
                        if head == 0xFF or not status & MY_MORE_RESULTS_EXISTS:
                            if head != 0xFF:
                                self.mtrans = bool(status & MY_STATUS_IN_TRANS)
                            return pos + total, BOUNDARY, ord("T") if self.mtrans else ord("I")
            take = min(total, avail)
            pos += take
            self.remaining = total - take
        return pos, NONE, -1

    def _feed_tds_response(self, data) -> tuple[int, int, int]:
        """feed() of response="tds": a response's packets up to the one with EOM (see the module docstring)."""
        pos, end = 0, len(data)
        while pos < end:
            if self.remaining:
                take = min(self.remaining, end - pos)
                pos += take
                self.remaining -= take
                continue
            avail = end - pos
            if avail < 8:
                break
            kind, total = data[pos], (data[pos + 2] << 8) | data[pos + 3]
            if kind != TDS_TABULAR_RESULT or total < 8:
                return pos, MALFORMED, kind
            if data[pos + 1] & TDS_STATUS_EOM:
                if total > self.max_boundary:
                    return pos, MALFORMED, kind
                if avail < total:
                    break
                return pos + total, BOUNDARY, ord("I")
            take = min(total, avail)
            pos += take
            self.remaining = total - take
        return pos, NONE, -1

    def take_count(self) -> int:
        n, self.counted = self.counted, 0
        return n

    def copy(self) -> "PyWalker":
        twin = PyWalker(self.header_size, self.length_offset, self.length_size, self.big_endian, self.length_adjust,
                        self.type_offset, bytes(self.stop), bytes(self.count), self.boundary, self.max_boundary,
                        bytes(self.screen), self.words, self.max_screen, self.pg_unnamed, self.response,
                        self.deprecate_eof, self.request, self.exempt_lead, tuple(self.exempt), self.pg_begin,
                        self.mysql_begin)
        twin.lazy = self.lazy
        return twin


# response="mysql" (the compiled walk_mysql_response()): the walk's states and what it reads of the packets
MY_START, MY_COLUMNS, MY_COLUMNS_EOF, MY_ROWS = range(4)
MY_MAX_PAYLOAD = 0xFFFFFF
MY_STATUS_IN_TRANS, MY_MORE_RESULTS_EXISTS = 0x0001, 0x0008


# response="tds" / request="tds" (the compiled walk_tds_response(), tds_request_relayable())
TDS_TABULAR_RESULT, TDS_STATUS_EOM = 0x04, 0x01
_TDS_NAME_CHARS = frozenset(b"abcdefghijklmnopqrstuvwxyz0123456789_@#$")


def _tds_request_relayable(packet: bytes) -> bool:
    """Whether a whole client packet may be relayed: status EOM alone, its SQL text (after ALL_HEADERS) opening with
    SELECT after white space (UTF-16LE, ASCII case ignored)."""
    if packet[1] != TDS_STATUS_EOM or len(packet) < 12:
        return False
    body = packet[8:]
    pos = int.from_bytes(body[:4], "little")
    if not 4 <= pos <= len(body):
        return False
    while pos + 2 <= len(body) and body[pos + 1] == 0 and body[pos] in b" \t\r\n":
        pos += 2
    for ch in b"select":
        if pos + 2 > len(body) or body[pos + 1] != 0 or body[pos] | (0x20 if 65 <= body[pos] <= 90 else 0) != ch:
            return False
        pos += 2
    if pos + 2 > len(body):
        return True
    nxt = body[pos] | (0x20 if 65 <= body[pos] <= 90 else 0)
    return not (body[pos + 1] == 0 and nxt in _TDS_NAME_CHARS)


def _mysql_lenenc(payload: bytes, pos: int):
    """(value, position after it) of the length-encoded integer at pos, or (None, pos)."""
    if pos >= len(payload):
        return None, pos
    first = payload[pos]
    if first < 0xFB:
        return first, pos + 1
    size = {0xFC: 2, 0xFD: 3, 0xFE: 8}.get(first, 0)
    if not size or pos + 1 + size > len(payload):      # 0xFB (NULL) and 0xFF are no integers
        return None, pos
    return int.from_bytes(payload[pos + 1:pos + 1 + size], "little"), pos + 1 + size


def _mysql_ok_insert_id(payload: bytes) -> int:
    """The last insert id of an OK packet, or 0."""
    affected, pos = _mysql_lenenc(payload, 1)
    if affected is None:
        return 0
    insert_id, pos = _mysql_lenenc(payload, pos)
    return insert_id or 0


def _mysql_ok_status(payload: bytes) -> int:
    """The status flags of an OK packet (after affected rows and last insert id), or -1."""
    affected, pos = _mysql_lenenc(payload, 1)
    if affected is None:
        return -1
    insert_id, pos = _mysql_lenenc(payload, pos)
    if insert_id is None or pos + 2 > len(payload):
        return -1
    return payload[pos] | (payload[pos + 1] << 8)


def _mysql_eof_status(payload: bytes) -> int:
    return payload[3] | (payload[4] << 8) if len(payload) >= 5 else -1


class _Login:
    """A starting client's SCRAM exchange in the relay (see "Relay logins: SCRAM" in _relay.c)."""
    __slots__ = ("template", "phase", "answered", "snonce", "y", "bare", "server_first")

    def __init__(self, template, answered, snonce):
        self.template, self.phase, self.answered, self.snonce = template, 1, answered, snonce
        self.y, self.bare, self.server_first = False, b"", b""


class _Conn:
    __slots__ = ("fd", "client", "walker", "peer", "idle", "waiting", "blocked", "pending", "outstanding", "mask",
                 "buf", "sent", "fwd", "owned", "starting", "listener", "held", "requests", "aged", "report", "ticks",
                 "login", "quiet", "watch", "last_status", "lazy", "swallow", "zskip", "drop", "insert_id", "inject")

    def __init__(self, fd, client, walker, data=b""):
        self.fd, self.client, self.walker = fd, client, walker
        self.peer = None
        self.idle = self.waiting = self.blocked = self.held = self.aged = False
        self.pending = None             # (event, arg) to act on once buf[sent:fwd] is written
        self.outstanding = self.requests = 0
        self.last_status = ord("I")     # a backend's last boundary status (a handover mid-transaction)
        self.lazy = TXW_NONE            # a client's BEGIN answered by the relay and not sent (pg_begin)
        self.swallow = 0                # a backend's messages of a BEGIN sent ahead still to drop
        self.zskip = 0                  # a backend's: 2, the ReadyForQuery after the next one is the relay's Sync's
        self.drop = False               # a backend's (MySQL): the answer being walked is dropped (its BEGIN failed)
        self.insert_id = 0              # a client's (MySQL): the last insert id other than 0 of its relayed answers
        self.inject = False             # a client's: a Parse the relay put in front of a Bind is in flight
        self.ticks = 0                  # a waiting client: age_waiting() calls since it began to wait
        self.mask = select.EPOLLIN
        self.buf = bytearray(data)
        self.sent = self.fwd = 0
        self.owned = self.starting = self.report = False
        self.listener = None            # a listening socket object (listeners only)
        self.login = None               # a starting client's SCRAM exchange (_Login)
        self.quiet = None               # a quiet client (set_quiet): its GREETED data and template, not reported yet
        self.watch = None               # a quiet client at the last age_quiet(): (state, requests, since)


def _epoll():
    """A new epoll set of the relay's own (gevent's monkey-patching hides select.epoll: the original is used, which
    is right here: run_ready() polls it without waiting)."""
    make = getattr(select, "epoll", None)
    if make is None:
        from gevent.monkey import get_original
        make = get_original("select", "epoll")
    return make()


def _peer_sockaddr(fd: int) -> bytes:
    """The peer's address as a struct sockaddr (what getpeername(2) gives in C; b"" when it fails)."""
    sock = socket.socket(fileno=fd)
    try:
        host, port, *rest = sock.getpeername()
        family = sock.family
    except (OSError, ValueError):
        return b""
    finally:
        sock.detach()
    if family == socket.AF_INET:
        return struct.pack("=H", family) + struct.pack("!H", port) + socket.inet_pton(family, host) + bytes(8)
    if family == socket.AF_INET6:
        flow, scope = rest
        return (struct.pack("=H", family) + struct.pack("!HI", port, flow) + socket.inet_pton(family, host)
                + struct.pack("=I", scope))
    return b""


class PyRelay:
    """The twin of _relay.Relay: the same rules and events, in Python. threaded is accepted for the same
    signature, but the twin always serves in run_ready(): a Python thread would hold the GIL it runs on."""

    def __init__(self, client, server, buffer_size=16384, threaded=False, hold_stops=False):
        for rule in (client, server):
            need = rule.header_size + rule.type_offset + 2
            if rule.boundary >= 0 or rule.response:
                need = max(need, rule.max_boundary + 1)
            if rule.screen or rule.pg_unnamed:
                need = max(need, rule.max_screen + 1)
            if buffer_size < 2 * need:
                raise ValueError("buffer_size too small for the framing rules")
        self._rules = (client, server)
        self._hold_stops = bool(hold_stops)
        self._yielding = False          # set_yield(True): no backend is lent by the relay itself
        self._bufsize = buffer_size
        self._epoll = _epoll()
        self._conns: dict = {}
        self._idle: list = []
        self._waiting: list = []
        self._events: list = []
        self._transactions = self._handed_over = self._accepted = self._greeted = 0
        self._greetings: dict = {}
        self._refuse, self._refusal, self._hangup = b"", b"", frozenset()
        self._keys: list = []               # relay logins: cancel keys for keyed greetings, used in the order given
        self._login_budget = -1
        self._budget_gives_back = False
        self._relayed_before = {}       # fd -> requests walked for the client last forgotten there
        self._lazy_before = {}          # fd -> that client's lazy BEGIN (TXW_BEGIN, TXW_START or TXW_NONE)
        self._insert_id_before = {}     # fd -> that client's insert_id (MySQL)
        self._logins = 0
        self._quiet_mode = False
        self._quiet_counts = (0, 0)     # (kept quietly, closed unreported) since the last quiet_counts()
        self._wake_handler = None       # set_wake (see wake() in _relay.c)
        self._attention_seen = 0
        self._eager = False
        self._keys_low = 0

    # -- the API

    def fileno(self) -> int:
        return self._epoll.fileno()

    def add_client(self, fd, data=b"") -> list:
        if len(data) > self._bufsize:
            raise ValueError("data larger than the relay's buffer")
        c = self._register(_Conn(fd, True, self._rules[0].copy(), data))
        self._pump(c)
        return self._take_events()

    def add_backend(self, fd) -> list:
        c = self._register(_Conn(fd, False, self._rules[1].copy()))
        self._release_backend(c, True)
        return self._take_events()

    def set_yield(self, on) -> list:
        self._yielding = bool(on)
        while not self._yielding and self._idle and self._waiting:
            b = self._idle.pop()
            b.idle = False
            self._release_backend(b, True)
        return self._take_events()

    def age_waiting(self, limit) -> list:
        limit = operator.index(limit)      # an int, as the compiled one takes
        for c in self._waiting:
            c.ticks += 1
        aged = []
        while self._waiting and self._waiting[0].ticks >= limit:   # in the order they began to wait
            c = self._waiting[0]
            self._forget(c)
            aged.append((c.fd, bytes(c.buf[c.sent:])))
        return aged

    def listen(self, fd, refuse=b"", refusal=b"", hangup=b"") -> list:
        if len(refuse) > 16 or len(refusal) > 16:
            raise ValueError("refuse, refusal: at most 16 bytes")
        self._refuse, self._refusal, self._hangup = bytes(refuse), bytes(refusal), frozenset(hangup)
        c = _Conn(fd, False, None)
        c.listener = socket.socket(fileno=fd)
        self._register(c)
        return self._take_events()

    def cache_greeting(self, startup, reply, key_at=-1, template=0, keep=False, scram=None) -> None:
        if key_at < -1 or (key_at >= 0 and key_at + 8 > len(reply)):
            raise ValueError("key_at: -1, or where 8 bytes of the reply start")
        if scram is not None:
            try:
                tail, stored_key, server_key = (bytes(part) for part in scram)
            except (TypeError, ValueError):
                raise ValueError("scram: (tail, stored_key, server_key) of a keyed greeting") from None
            if key_at < 0:
                raise ValueError("scram: (tail, stored_key, server_key) of a keyed greeting")
            if len(tail) > SCRAM_TAIL_MAX or len(stored_key) != 32 or len(server_key) != 32:
                raise ValueError("scram: a tail of at most 160 bytes, keys of 32 bytes")
            scram = (tail, stored_key, server_key)
        self._greetings[bytes(startup)] = (bytes(reply), key_at, template, bool(keep), scram)

    def add_keys(self, keys) -> int:
        keys = bytes(keys)
        if len(keys) % 8:
            raise ValueError("add_keys: 8 bytes per key")
        self._keys.extend(keys[i:i + 8] for i in range(0, len(keys), 8))
        return len(self._keys)

    def set_login_budget(self, budget, gives_back=False) -> None:
        if budget < -1:
            raise ValueError("set_login_budget: -1 or more")
        self._login_budget = budget
        self._budget_gives_back = bool(gives_back)

    def forget_greetings(self) -> None:
        self._greetings.clear()

    def take_starting(self, aged_only=False) -> list:
        for c in list(self._conns.values()):
            if c.client and c.starting:
                if aged_only and not c.aged:
                    c.aged = True
                else:
                    self._give_back_starting(c)
        return self._take_events()

    def unlisten(self) -> list:
        for c in list(self._conns.values()):
            if c.listener is not None:
                self._forget(c)
            elif c.starting:
                self._give_back_starting(c)
        return self._take_events()

    def run_ready(self, max_events=256) -> list:
        try:
            ready = self._epoll.poll(0, max_events if 1 <= max_events <= 4096 else 256)
        except InterruptedError:
            return []
        for fd, what in ready:
            c = self._conns.get(fd)
            if c is None:
                continue
            if c.listener is not None:
                self._on_acceptable(c)
                continue
            if what & select.EPOLLOUT:
                src = c.peer
                if src is not None and src.blocked:
                    src.blocked = False
                    self._update_mask(c)
                    self._update_mask(src)
                    self._pump(src)
                    if self._conns.get(fd) is not c:
                        continue
            if what & (select.EPOLLERR | select.EPOLLHUP) and not what & select.EPOLLIN:
                self._closed(c, 0)
                continue
            if what & select.EPOLLIN and not c.blocked and not c.waiting and not c.held:
                self._on_readable(c)
            elif what & (select.EPOLLERR | select.EPOLLHUP) and c.waiting:
                self._closed(c, 0)
        return self._take_events()

    def wake(self):
        if self._wake_handler is None:
            raise ValueError("wake: no handler (set_wake)")
        if self._epoll.closed:
            return None
        if self._eager or self._attention_seen != _attention[0] or self._login_budget == 0:
            seen = _attention[0]
            result = self._wake_handler(None)
            self._attention_seen = seen     # (not when it raised: the next wake-up is whole again)
            return result
        events = self.run_ready()
        if not events and not self._waiting and len(self._keys) >= self._keys_low:
            return None
        return self._wake_handler(events)

    def set_wake(self, handler) -> None:
        if handler is not None and not callable(handler):
            raise TypeError("set_wake: a callable or None")
        self._wake_handler = handler
        self._attention_seen = 0

    def set_wake_rules(self, eager, keys_low=0) -> None:
        keys_low = operator.index(keys_low)
        if keys_low < 0:
            raise ValueError("set_wake_rules: keys_low of 0 or more")
        self._eager = bool(eager)
        self._keys_low = keys_low

    def set_quiet(self, on) -> None:
        self._quiet_mode = bool(on)

    def take_quiet(self) -> list:
        for c in list(self._conns.values()):
            if c.quiet is not None:
                self._report_quiet(c)
        return self._take_events()

    def report_key(self, key) -> list:
        key = bytes(key)
        if len(key) != 8:
            raise ValueError("report_key: a key of 8 bytes")
        for c in list(self._conns.values()):
            if c.quiet is not None and c.quiet[0][:8] == key:
                self._report_quiet(c)
                break
        return self._take_events()

    def age_quiet(self, now, idle_limit, busy_limit, transaction_limit) -> tuple:
        limits = (float(idle_limit), float(busy_limit), float(transaction_limit))
        now = float(now)
        overdue = []
        for c in list(self._conns.values()):
            if c.quiet is None:
                continue
            if c.lazy and c.peer is None and not c.waiting:
                c.watch = None          # idle in a BEGIN the relay answered: left alone, as the Python path does
                continue
            state = (WATCH_BUSY if c.waiting else WATCH_IDLE if c.peer is None
                     else WATCH_BUSY if c.outstanding > 0 else WATCH_TRANSACTION)
            watch = c.watch
            if watch is None or watch[0] != state or watch[1] != c.requests:
                c.watch = (state, c.requests, now)
                continue
            limit = limits[state]
            if limit > 0.0 and now - watch[2] >= limit:
                overdue.append((c.fd, state, watch[2]))
                self._report_quiet(c)
        return self._take_events(), overdue

    def quiet_counts(self) -> tuple:
        counts = self._quiet_counts
        self._quiet_counts = (0, 0)
        return counts

    def _report_quiet(self, c) -> None:
        data, template = c.quiet
        c.quiet = None
        self._events.append((QUIET, c.fd, -1, data, template))

    def close(self) -> None:
        for c in list(self._conns.values()):
            if c.owned and (not c.report or c.quiet is not None):
                self._hang_up(c)
            else:
                self._forget(c)
        self._events = []
        self._epoll.close()

    def disown(self, fd) -> bool:
        c = self._conns.get(fd)
        known = c is not None and c.report
        if known:
            c.owned = c.report = False
        return known

    def take_idle(self) -> int:
        if not self._idle:
            return -1
        b = self._idle[-1]
        self._forget(b)
        return b.fd

    def remove(self, fd):
        c = self._conns.get(fd)
        if c is None or c.peer is not None or c.listener is not None or c.starting or c.held:
            return None
        self._forget(c)
        return bytes(c.buf[c.sent:])

    def take_waiting(self):
        if not self._waiting:
            return None
        c = self._waiting[0]
        self._forget(c)
        return c.fd, bytes(c.buf[c.sent:])

    def peer(self, fd) -> int:
        c = self._conns.get(fd)
        return c.peer.fd if c is not None and c.peer is not None else -1

    def activity(self, fd):
        c = self._conns.get(fd)
        if c is None or not c.client:
            return None
        return (c.requests, c.peer.fd if c.peer is not None else -1, int(c.waiting), c.outstanding, c.lazy)

    def relayed_before(self, fd) -> int:
        return self._relayed_before.get(fd, 0)

    def insert_id(self, fd) -> int:
        c = self._conns.get(fd)
        if c is not None:
            return c.insert_id if c.client else 0
        return self._insert_id_before.get(fd, 0)

    def set_statements(self, fd, mapping) -> int:
        """The named statements the client at fd may bind in the relay ({name: Parse body of the unnamed statement},
        or None; see Walker.set_statements); how many were usable."""
        c = self._conns.get(fd)
        if c is None or not c.client:
            raise ValueError(f"fd {fd} is no client of the relay")
        return c.walker.set_statements(mapping)

    def lazy_begin(self, fd) -> int:
        c = self._conns.get(fd)
        if c is not None:
            return c.lazy if c.client else TXW_NONE
        return self._lazy_before.get(fd, TXW_NONE)

    def counts(self) -> tuple:
        return (len(self._idle), len(self._waiting),
                sum(1 for c in self._conns.values() if c.client and c.peer is not None))

    def stats(self) -> dict:
        conns = self._conns.values()
        return {"connections": len(self._conns), "idle": len(self._idle), "waiting": len(self._waiting),
                "linked": sum(1 for c in conns if c.client and c.peer is not None),
                "transactions": self._transactions, "handed_over": self._handed_over,
                "accepted": self._accepted, "greeted": self._greeted, "logins": self._logins,
                "keys": len(self._keys), "quiet": sum(1 for c in conns if c.quiet is not None)}

    # -- the machinery

    def _register(self, c):
        if c.fd in self._conns:
            raise ValueError(f"fd {c.fd} is already in the relay")
        self._epoll.register(c.fd, select.EPOLLIN)
        self._conns[c.fd] = c
        return c

    def _take_events(self) -> list:
        events, self._events = self._events, []
        return events

    def _update_mask(self, c) -> None:
        mask = 0 if c.blocked or c.waiting or c.held else select.EPOLLIN
        if c.peer is not None and c.peer.blocked:
            mask |= select.EPOLLOUT
        if mask != c.mask:
            c.mask = mask
            self._epoll.modify(c.fd, mask)

    def _forget(self, c) -> None:
        if self._conns.get(c.fd) is not c:
            return
        if c.idle:
            self._idle.remove(c)
            c.idle = False
        if c.waiting:
            self._waiting.remove(c)
            c.waiting = False
        self._epoll.unregister(c.fd)
        del self._conns[c.fd]
        if c.client:
            self._relayed_before[c.fd] = c.requests
            self._lazy_before[c.fd] = c.lazy
            self._insert_id_before[c.fd] = c.insert_id
        if c.listener is not None:
            c.listener.detach()         # the caller's listening socket stays open
            c.listener = None

    def _hang_up(self, c) -> None:
        if c.quiet is not None:     # never reported: counted, no event
            c.quiet = None
            greeted, gone = self._quiet_counts
            self._quiet_counts = (greeted, gone + 1)
            if self._login_budget >= 0 and self._budget_gives_back:
                self._login_budget += 1     # its room is free again
        elif c.report:
            self._events.append((GONE, c.fd, -1, b"", 0))
        self._forget(c)
        os.close(c.fd)

    def _closed(self, c, err) -> None:
        if c.owned and c.peer is None:
            self._hang_up(c)
        else:
            self._hand_over(CLOSED, c, err)

    def _on_acceptable(self, listener) -> None:
        for _ in range(64):
            try:
                fd, _ = listener.listener._accept()
            except OSError:
                return
            os.set_blocking(fd, False)
            c = _Conn(fd, True, self._rules[0].copy())
            c.owned = c.starting = True
            self._register(c)
            self._accepted += 1

    def _startup(self, c) -> bool:
        """Answer c's first packets that the engine declared; False when c went to the caller."""
        while c.starting:
            if c.login is not None:
                return self._scram_step(c)
            if len(c.buf) < 4:
                return True
            size = int.from_bytes(c.buf[:4], "big")
            if not 8 <= size <= MAX_STARTUP:
                self._hand_over(MALFORMED, c, -1)
                return False
            if len(c.buf) < size:
                return True
            packet = bytes(c.buf[:size])
            greeted = not (self._refuse and packet == self._refuse)
            if not greeted:
                reply = self._refusal
            else:
                greeting = self._greetings.get(packet)
                if greeting is None:
                    self._hand_over(STARTUP, c, 0)
                    return False
                reply, key_at, template, keep, scram = greeting
                if key_at >= 0 and scram is not None:
                    return self._scram_begin(c, size, template)
                if key_at >= 0:
                    return self._greet_with_key(c, size, reply, key_at, template, keep)
            if not self._send_starting(c, reply):
                return False
            del c.buf[:size]
            if greeted:
                c.starting = False
                self._greeted += 1
        return True

    def _greet_with_key(self, c, size, reply, key_at, template, keep, before=b"") -> bool:
        """A keyed greeting (relay logins, see _relay.c): a fresh key in the reply (after `before`: a SCRAM exchange's
        AuthenticationSASLFinal), then the client goes to the caller as GREETED (data: its key + what it sent after
        the startup packet), or with keep stays as a client (data: its key; True: what it sent next is walked); no key
        or no budget: STARTUP."""
        if not self._keys or self._login_budget == 0:
            self._give_back_starting(c)
            return False
        key = self._keys[0]
        if not self._send_starting(c, before + reply[:key_at] + key + reply[key_at + 8:]):
            return False
        del self._keys[0]
        c.login = None
        if self._login_budget > 0:
            self._login_budget -= 1
        self._greeted += 1
        self._logins += 1
        peer = _peer_sockaddr(c.fd)
        key += bytes([len(peer)]) + peer
        if keep and self._quiet_mode:
            c.quiet = (key + struct.pack("d", time.time()), template)
            greeted, gone = self._quiet_counts
            self._quiet_counts = (greeted + 1, gone)
        elif keep:
            self._events.append((GREETED, c.fd, -1, key, template))
        if keep:
            del c.buf[:size]
            c.starting, c.report = False, True
            return True
        self._events.append((GREETED, c.fd, -1, key + bytes(c.buf[size:]), template))
        self._forget(c)
        self._handed_over += 1
        return False

    def _give_back_starting(self, c) -> None:
        """A starting client goes to the caller: STARTUP with its bytes, or ANSWERED in a SCRAM exchange (data: one
        byte n, the relay's nonce, every byte the client sent; arg: how many of them were answered)."""
        login = c.login
        if login is None:
            self._hand_over(STARTUP, c, 0)
            return
        self._events.append((ANSWERED, c.fd, -1, bytes([len(login.snonce)]) + login.snonce + bytes(c.buf),
                             login.answered))
        self._forget(c)
        self._handed_over += 1

    def _scram_greeting(self, template):
        for greeting in self._greetings.values():
            if greeting[2] == template and greeting[1] >= 0 and greeting[4] is not None:
                return greeting
        return None

    def _scram_begin(self, c, size, template) -> bool:
        """A SCRAM template's startup packet (see "Relay logins: SCRAM" in _relay.c): AuthenticationSASL."""
        if not self._keys or self._login_budget == 0:
            self._hand_over(STARTUP, c, 0)
            return False
        c.login = _Login(template, size, base64.b64encode(os.urandom(SCRAM_NONCE_RAW)))
        if not self._send_starting(c, _SASL_REQUEST):
            return False
        return self._scram_step(c)

    def _send_starting(self, c, data) -> bool:
        """Write to a starting client (its send buffer is empty: all of it goes at once); False when it went to the
        caller (CLOSED)."""
        try:
            sent = os.write(c.fd, data) if data else 0
        except OSError as exc:
            self._hand_over(CLOSED, c, exc.errno or 0)
            return False
        if sent != len(data):
            self._hand_over(CLOSED, c, errno.EAGAIN)
            return False
        return True

    def _scram_step(self, c) -> bool:
        login = c.login
        at = login.answered
        buf = c.buf
        if at + 5 > self._bufsize:      # no room for a header (as the compiled relay, whose buffer has a size)
            self._give_back_starting(c)
            return False
        if len(buf) - at < 5:
            return True
        size = int.from_bytes(buf[at + 1:at + 5], "big")
        greeting = self._scram_greeting(login.template)
        if buf[at] != 0x70 or size < 4 or size + 1 > self._bufsize - at or greeting is None:
            self._give_back_starting(c)
            return False
        if len(buf) - at < size + 1:
            return True
        body = bytes(buf[at + 5:at + 1 + size])
        step = self._scram_first if login.phase == 1 else self._scram_final
        done = step(c, greeting, body, at + 1 + size)
        if done is None:
            self._give_back_starting(c)
            return False
        return done

    def _scram_first(self, c, greeting, body, after):
        login = c.login
        if len(body) < 18 or body[:14] != b"SCRAM-SHA-256\x00" or int.from_bytes(body[14:18], "big") != len(body) - 18:
            return None
        data = body[18:]
        if len(data) < 3 or data[:3] not in (b"n,,", b"y,,"):
            return None
        bare = data[3:]
        if not 2 <= len(bare) <= SCRAM_TEXT_MAX or bare[:2] != b"n=":
            return None
        name, comma, nonce_attr = bare[2:].partition(b",")
        i = 0
        while i < len(name):
            if not 0x20 <= name[i] <= 0x7E or (name[i] == 0x3D and name[i + 1:i + 3] not in (b"2C", b"3D")):
                return None
            i += 1
        if not comma or len(nonce_attr) < 3 or nonce_attr[:2] != b"r=":
            return None
        cnonce = nonce_attr[2:]
        if any(not 0x21 <= ch <= 0x7E or ch == 0x2C for ch in cnonce):
            return None
        tail = greeting[4][0]
        server_first = b"r=" + cnonce + login.snonce + tail
        if not self._send_starting(c, b"R" + (8 + len(server_first)).to_bytes(4, "big") + (11).to_bytes(4, "big")
                                   + server_first):
            return False
        login.phase, login.y, login.bare, login.server_first = 2, data[:1] == b"y", bare, server_first
        login.answered = after
        return True

    def _scram_final(self, c, greeting, body, after):
        login = c.login
        tail, stored_key, server_key = greeting[4]
        nonce = login.server_first[2:2 + len(login.server_first) - 2 - len(tail)]
        without_proof = (b"c=eSws,r=" if login.y else b"c=biws,r=") + nonce
        if len(body) != len(without_proof) + 3 + 44 or not body.startswith(without_proof + b",p="):
            return None
        try:
            proof = base64.b64decode(body[-44:], validate=True)
        except ValueError:
            return None
        if len(proof) != 32 or base64.b64encode(proof) != body[-44:]:
            return None
        auth = login.bare + b"," + login.server_first + b"," + without_proof
        signature = hmac.digest(stored_key, auth, "sha256")
        client_key = bytes(a ^ b for a, b in zip(proof, signature))
        if (not hmac.compare_digest(hashlib.sha256(client_key).digest(), stored_key) or not self._keys
                or self._login_budget == 0):
            return None
        final = b"v=" + base64.b64encode(hmac.digest(server_key, auth, "sha256"))
        reply, key_at, template, keep, _ = greeting
        return self._greet_with_key(c, after, reply, key_at, template, keep,
                                    b"R" + (8 + len(final)).to_bytes(4, "big") + (12).to_bytes(4, "big") + final)

    def _hand_over(self, kind, c, arg) -> None:
        p = c.peer
        for known in (c, p):
            if known is not None and known.quiet is not None:
                self._report_quiet(known)   # the caller learns of a quiet client before any event of it
        self._events.append((kind, c.fd, p.fd if p is not None else -1, bytes(c.buf[c.fwd:]), arg))
        self._forget(c)
        if p is not None:
            self._forget(p)
            p.peer = None
        c.peer = None
        self._handed_over += 1

    def _link(self, client, backend) -> None:
        if client.lazy:
            self._begin_ahead(client, backend)
        client.peer, backend.peer = backend, client

    # -- a BEGIN the relay answers (pg_begin; see _relay.c)

    def _begin_fits(self, c) -> bool:
        if self._rules[0].mysql_begin:
            return len(c.buf) + len(_MY_BEGIN_AHEAD) <= self._bufsize
        return (c.buf[c.sent] in b"QP"
                and len(c.buf) + len(_pg_begin_ahead(c.lazy)) + len(_PG_SYNC) <= self._bufsize)

    def _begin_ahead(self, c, b) -> None:
        at = c.sent
        if self._rules[0].mysql_begin:
            c.buf[at:at] = _MY_BEGIN_AHEAD
            c.fwd += len(_MY_BEGIN_AHEAD)
            b.swallow = 1
            c.lazy = TXW_NONE
            c.walker.lazy = False
            return
        if c.buf[at] == 81:             # Q (a screened Query: whole before fwd)
            end = at + 1 + int.from_bytes(c.buf[at + 1:at + 5], "big")
            c.buf[end:end] = _PG_SYNC
            c.fwd += len(_PG_SYNC)
            c.outstanding += 1
            b.zskip = 2
        ahead = _pg_begin_ahead(c.lazy)
        c.buf[at:at] = ahead
        c.fwd += len(ahead)
        b.swallow = 3
        c.lazy = TXW_NONE
        c.walker.lazy = False

    def _answer_locally(self, c, word) -> int:
        """1: the relay answered the transaction word at c.buf[c.fwd] (the Query is dropped); 0: it did not; -1: the
        client was handed over (an answer cut short)."""
        begin = word & TXW_WORD in (TXW_BEGIN, TXW_START)
        if c.peer is not None or c.outstanding or (bool(c.lazy) if begin else not c.lazy):
            return 0
        mysql_begin = self._rules[0].mysql_begin
        answer = mysql_begin or _pg_local_answer(word)
        while True:
            try:
                n = os.write(c.fd, answer)
            except InterruptedError:
                continue
            except BlockingIOError:
                return 0
            except OSError as exc:
                n, err = -1, exc.errno or errno.EPIPE
            break
        if n != len(answer):
            try:
                socket.socket(fileno=os.dup(c.fd)).shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._closed(c, err if n < 0 else errno.EPIPE)
            return -1
        c.fwd += (4 + int.from_bytes(c.buf[c.fwd:c.fwd + 3], "little") if mysql_begin
                  else 1 + int.from_bytes(c.buf[c.fwd + 1:c.fwd + 5], "big"))
        c.sent = c.fwd
        c.lazy = word if begin else TXW_NONE
        c.walker.lazy = bool(c.lazy)
        c.requests += 1
        return 1

    @staticmethod
    def _statement(c, index) -> tuple | None:
        """(name, Parse body) of statement `index` of the client's table, or None."""
        for name, (i, parse) in (c.walker.statements or {}).items():
            if i == index:
                return name, parse
        return None

    def _named_fits(self, c, index) -> bool:
        """Whether the buffer has room for the batch at c.buf[c.fwd] made a batch of the unnamed statement, and for the
        client's lazy BEGIN in front of it (see _relay.c)."""
        found = self._statement(c, index)
        if found is None:
            return False
        grows = 5 + len(found[1]) - len(found[0]) + (len(_pg_begin_ahead(c.lazy)) if c.lazy else 0)
        return len(c.buf) + grows <= self._bufsize

    def _named_to_unnamed(self, c, index) -> None:
        """The batch at c.buf[c.fwd] opens with a Bind of statement `index` of the client's table (NAMED; _named_fits):
        Parse of its text as the unnamed statement goes in front, and the Bind binds the unnamed statement (see
        _relay.c, "named statements"); its ParseComplete is dropped (inject)."""
        name, parse = self._statement(c, index)
        buf, at = c.buf, c.fwd
        bind_total = 1 + int.from_bytes(buf[at + 1:at + 5], "big")
        buf[at:at + 6 + len(name)] = (b"P" + (4 + len(parse)).to_bytes(4, "big") + parse
                                      + b"B" + (bind_total - len(name) - 1).to_bytes(4, "big") + b"\0")
        c.inject = True

    def _swallow(self, c) -> bool | None:
        """A backend's answer to a BEGIN sent ahead: True, a message dropped or forwarded (walk on); None, wait for
        more bytes; False, the walk goes on from here."""
        buf, at = c.buf, c.fwd
        if c.walker.response == "mysql":
            if len(buf) - at < 5:
                return None
            size = 4 + int.from_bytes(buf[at:at + 3], "little")
            walker = c.walker
            if size > self._bufsize or walker.mstate != MY_START or walker.mmore:
                c.swallow = 0
                return False
            if len(buf) - at < size:
                return None
            c.swallow = 0
            if buf[at + 4] == 0:        # its OK: dropped; its flags say the transaction is open
                status = _mysql_ok_status(bytes(buf[at + 4:at + size]))
                walker.mtrans = status >= 0 and bool(status & MY_STATUS_IN_TRANS)
                del buf[at:at + size]
                return True
            if buf[at + 4] == 0xFF:     # it failed: its ERR answers the client's command, whose answer goes
                c.drop = True
                c.fwd += size
                return True
            return False
        if len(buf) - at < 5:
            return None
        kind = buf[at]
        size = 1 + int.from_bytes(buf[at + 1:at + 5], "big")
        if size < 5 or size > self._bufsize or not (kind in _PG_SWALLOWED or kind in _PG_PASSED or kind == 69):
            c.swallow = 0
            return False
        if len(buf) - at < size:
            return None
        if kind in _PG_PASSED:
            c.fwd += size
            return True
        if kind == 69:                  # E: the BEGIN failed (see _relay.c)
            c.swallow = 0
            if c.zskip:
                c.zskip = 0
                if c.peer is not None and c.peer.outstanding > 0:
                    c.peer.outstanding -= 1
            return False
        del buf[at:at + size]
        c.swallow -= 1
        return True

    def _release_backend(self, b, lend) -> None:
        if lend and self._waiting:
            client = self._waiting.pop(0)
            client.waiting = False
            self._link(client, b)
            self._update_mask(client)
            self._update_mask(b)
            self._pump(client)
            return
        self._idle.append(b)
        b.idle = True

    def _on_readable(self, c) -> None:
        room = self._bufsize - len(c.buf)
        if room <= 0:
            return
        try:
            data = os.read(c.fd, room)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._closed(c, exc.errno or 0)
            return
        if not data:
            self._closed(c, 0)
            return
        c.buf += data
        self._pump(c)

    def _pump(self, c) -> None:
        if c.starting and (not self._startup(c) or c.starting):
            return          # handed over, or its startup packet is not whole yet: nothing of it is walked
        walker = c.walker
        while True:
            if c.sent < c.fwd:
                p = c.peer
                try:
                    n = os.write(p.fd, c.buf[c.sent:c.fwd])
                except InterruptedError:
                    continue
                except BlockingIOError:
                    c.blocked = True
                    self._update_mask(c)
                    self._update_mask(p)
                    return
                except OSError as exc:
                    self._hand_over(CLOSED, p, exc.errno or errno.EPIPE)
                    return
                c.sent += n
                continue
            if c.pending is not None:
                event, arg = c.pending
                c.pending = None
                if event == BOUNDARY:
                    client = c.peer
                    c.last_status = arg
                    if client.outstanding > 0:
                        client.outstanding -= 1
                    if client.outstanding == 0 and arg != ord("I") and client.held:
                        # its transaction goes on: the stop frame goes to the caller with this backend
                        client.held = False
                        if len(c.buf) > c.fwd:
                            self._hand_over(UNSOLICITED, c, -1)
                        else:
                            self._pump(client)
                        return
                    if client.outstanding == 0 and arg == ord("I"):
                        self._transactions += 1
                        client.peer = c.peer = None
                        self._update_mask(client)
                        self._update_mask(c)
                        if client.held:     # its stop frame goes to the caller now, without a backend
                            client.held = False
                            self._pump(client)
                        if len(c.buf) > c.fwd:
                            self._hand_over(UNSOLICITED, c, -1)
                            return
                        self._release_backend(c, not self._yielding)
                        if self._conns.get(c.fd) is not c:
                            return
                    continue
                if event == LOCAL:
                    answered = self._answer_locally(c, arg)
                    if answered < 0:
                        return
                    if answered:
                        continue
                    walker.lazy = False     # not answered: walked again as an ordinary Query (lazy: _begin_ahead)
                    if arg & TXW_WORD not in (TXW_BEGIN, TXW_START):
                        continue
                    event, arg = HANDOVER, c.buf[c.fwd + walker.type_offset]
                if event == NAMED:
                    if not c.outstanding and not c.inject and self._named_fits(c, arg):
                        # rewritten once the client has its backend (see _relay.c)
                        if c.peer is None and not self._link_or_wait(c):
                            c.pending = (NAMED, arg)
                            return
                        self._named_to_unnamed(c, arg)
                        continue            # walked again: a batch of the unnamed statement now
                    event, arg = HANDOVER, c.buf[c.fwd + walker.type_offset]
                if event == HANDOVER and c.owned and c.peer is None and arg in self._hangup:
                    self._hang_up(c)
                    return
                if self._hold_stops and c.client and c.peer is not None and event in (HANDOVER, MALFORMED):
                    if c.outstanding > 0:
                        c.pending = (event, arg)    # acted on at the backend's boundary that answers the last
                        c.held = True
                        self._update_mask(c)
                        return
                    arg = c.peer.last_status    # mid-transaction: it goes with its backend and that status
                self._hand_over(event, c, arg)
                return
            if c.sent:
                del c.buf[:c.sent]
                c.fwd -= c.sent
                c.sent = 0
            if c.fwd == len(c.buf):
                return
            if c.swallow and not walker.remaining:
                swallowed = self._swallow(c)
                if swallowed is None:
                    return
                if swallowed:
                    continue
            if not c.client and c.peer is not None and c.peer.inject and not walker.remaining:
                # the answer to a Parse the relay put in front of a named statement's Bind (_named_to_unnamed)
                buf, at = c.buf, c.fwd
                if len(buf) - at < 5:
                    return
                size = 1 + int.from_bytes(buf[at + 1:at + 5], "big")
                if buf[at] == 49 and size == 5:             # its ParseComplete: dropped
                    del buf[at:at + 5]
                    c.peer.inject = False
                    continue
                if (buf[at] in _PG_PASSED or buf[at] == 65) and 5 <= size <= self._bufsize:
                    if len(buf) - at < size:
                        return
                    c.fwd += size       # a notice, a parameter report or a notification: forwarded
                    continue
                c.peer.inject = False   # anything else (its error): no ParseComplete comes
            with memoryview(c.buf) as view:
                consumed, event, arg = walker.feed(view[c.fwd:])
            counted = 0
            if c.client:
                counted = walker.take_count()
                c.outstanding += counted
                c.requests += counted
            if consumed == 0 and event == NONE:
                return
            if walker.insert_id:    # (MySQL) an OK's last insert id: the client's, unless its answer is dropped
                if c.peer is not None and not c.drop:
                    c.peer.insert_id = walker.insert_id
                walker.insert_id = 0
            if c.drop:          # the answer to a command behind a failed BEGIN (MySQL): walked, not forwarded
                del c.buf[c.fwd:c.fwd + consumed]
                consumed = 0
                if event == BOUNDARY:
                    c.drop = False
            if event == BOUNDARY and c.zskip:
                if c.zskip == 2:
                    c.zskip = 1         # the client's request's own: forwarded
                else:                   # the relay's Sync's: counted as an answer, not forwarded
                    c.zskip = 0
                    z = c.fwd + consumed - _PG_READY_LEN
                    if consumed >= _PG_READY_LEN and c.buf[z:z + 5] == b"Z\0\0\0\x05":
                        del c.buf[z:z + _PG_READY_LEN]
                        consumed -= _PG_READY_LEN
            c.fwd += consumed
            c.pending = (event, arg) if event != NONE else None
            if c.sent < c.fwd and c.peer is None:
                if not c.client:
                    c.fwd = c.sent
                    c.pending = None
                    self._hand_over(UNSOLICITED, c, -1)
                    return
                if c.lazy and not self._begin_fits(c):      # the caller sends its BEGIN with the request
                    c.outstanding = 0
                    c.requests -= counted
                    c.fwd = c.sent
                    c.pending = None
                    self._hand_over(HANDOVER, c, c.buf[c.sent])
                    return
                if not self._link_or_wait(c):
                    return

    def _link_or_wait(self, c) -> bool:
        """A client with a request and no backend: linked to an idle one (True), or queued to wait for one."""
        if self._idle and not self._yielding:
            b = self._idle.pop()
            b.idle = False
            self._link(c, b)
            self._update_mask(b)
            return True
        c.waiting = True
        c.ticks = 0
        self._waiting.append(c)
        self._update_mask(c)
        return False


_attention = [1]      # the twin's count of attend() calls (see wake() in _relay.c)


def _py_attend() -> None:
    _attention[0] += 1


def _load():
    if os.environ.get("MULTIPROXY_RELAY_CORE") == "python":
        log.info("relay core: the pure-Python twin (MULTIPROXY_RELAY_CORE=python)")
        return PyWalker, PyRelay, "python"
    try:
        from multiproxy import _relay
    except ImportError as exc:
        log.warning("relay core: the compiled multiproxy._relay is not built (%s); using the pure-Python twin", exc)
        return PyWalker, PyRelay, "python"
    log.info("relay core: the compiled multiproxy._relay")
    return _relay.Walker, _relay.Relay, "c"


Walker, Relay, IMPLEMENTATION = _load()


def attend() -> None:
    """What the wake handlers of relays judge at a whole wake-up (templates, budgets, pool states) may have changed:
    every relay's next wake-up is whole (see wake() in _relay.c), compiled or twin."""
    _py_attend()
    if _c_attend is not None:
        _c_attend()


try:
    from multiproxy._relay import attend as _c_attend
except ImportError:
    _c_attend = None

__all__ = ["Walker", "Relay", "PyWalker", "PyRelay", "IMPLEMENTATION", "FRAMINGS", "postgres_walkers",
           "NONE", "BOUNDARY", "HANDOVER", "MALFORMED", "CLOSED", "UNSOLICITED", "STARTUP", "GREETED", "GONE",
           "ANSWERED", "QUIET", "WATCH_IDLE", "WATCH_BUSY", "WATCH_TRANSACTION", "attend",
           "MAX_STARTUP", "MAX_WORDS", "MAX_WORD"]
