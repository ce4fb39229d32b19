"""What the compiled relay ([proxy] relay = "compiled") needs from PostgreSQL: framing, stop frames, the Query screen.

In the relay a client's simple Query (and a Sync) goes to a backend lent for the transaction, and the backend comes
back at the ReadyForQuery with status idle that answers the last of them. Every other client message stops: the
extended protocol (Parse, Bind, Describe, Close and Execute carry statement and portal names and unnamed-statement
holds the Python path tracks), FunctionCall, COPY data, Terminate and anything unknown. A Query stops too when its
text holds a word of RELAY_SCREEN_WORDS (ASCII case ignored, anywhere in the text: a false alarm only costs a trip
through Python), or is longer than MAX_SCREENED: the words of the pin screen (pinning.might_pin: SET, RESET,
set_config, PREPARE, DEALLOCATE, DISCARD, LISTEN / UNLISTEN, TEMP tables, cursors WITH HOLD, advisory locks, LOAD,
CLOSE), the words that open a transaction block (BEGIN, START), whose statements must run on one backend and
which the Python path answers lazily, and COPY, whose CopyIn/CopyOut answers the Python path tracks. So no request
the relay serves can pin, change a setting the Python path tracks, open a transaction or start a COPY; the server
messages that follow only such requests (ParameterStatus, NotificationResponse, CopyInResponse) do not come in
answer to it. An ErrorResponse is forwarded as it is: no transaction or tracked setting is there to undo.
"""
from __future__ import annotations

from . import protocol as p
from .pinning import _KEYWORDS

RELAY_SCREEN_WORDS = _KEYWORDS + (b"begin", b"start", b"copy")     # "set" covers set_config, "listen" UNLISTEN
MAX_SCREENED = 8000         # a longer Query goes through Python (the relay holds a screened frame whole)
BUFFER_SIZE = 16384         # bytes of each connection's buffer in the relay (at least twice MAX_SCREENED)
_RELAYED = frozenset((p.QUERY, p.SYNC))


def relay_rules() -> dict:
    """The Walker arguments of both directions: the relay core's PostgreSQL framing with this engine's stops and screen.
    (Imported here, not at the top: loading the relay core says which implementation it found, which only the
    compiled mode needs to hear.)"""
    from multiproxy.relay_core import FRAMINGS
    framing = dict(FRAMINGS["postgres"])
    stop = bytes(kind for kind in range(256) if kind not in _RELAYED)
    return {
        "client": dict(framing, stop=stop, count=bytes(_RELAYED), screen=bytes((p.QUERY,)),
                       words=RELAY_SCREEN_WORDS, max_screen=MAX_SCREENED),
        "server": dict(framing, boundary=p.READY_FOR_QUERY),
        "buffer_size": BUFFER_SIZE,
    }


def relay_serves(key, server_state) -> bool:
    """Whether a backend in server_state serves a client of relay key `key` with nothing replayed (the condition of
    SessionState.link for an empty replay)."""
    params, settings = key
    held = server_state.params
    have = server_state.settings
    return (len(settings) == len(have) and all(have.get(name) == value for name, value in settings)
            and all(held.get(name) == value for name, value in params))
