"""One MySQL client connection, sans-IO: handshake and authentication, then transaction-aware relaying of commands.

`MySQLClient` is put together from one part per job:

- handshake.py: `ClientHandshake`, the login state machine (`LoginPhase`), owned by the client until the end;
- relay.py: `Relay`, the packet walks of `client_data` and `backend_data`, the FIFO of awaited answers, release,
  retries of read-only refusals, lost backends;
- commands.py: `Commands`, what each client command means (forward, answer locally, rewrite, refuse);
- statements.py: `Statements`, COM_STMT_*: the client's statement ids mapped onto each backend's statement cache;
- session_state.py: `SessionState`, tracked settings, schema, multi-statements, the replay in `link()`, resets;
- pinning.py: `PinTracking`, the session's pins (next to the SQL classifier).

The relay parts are mixins, so that the per-packet loops find every field on `self` as before (no extra calls
or lookups on the hot path); the handshake, which ends, is an object of its own.

The relay walks packet headers only. It decodes what policy needs: the command byte and the SQL of
COM_QUERY (pin detection, tracked settings, KILL), the first bytes of each response packet (to find where
a response ends) and the status flags of OK/EOF packets (transaction state, autocommit, more results).
"""
from __future__ import annotations

from collections import deque

from multiproxy.engine import Authenticated, BackendError, ClientContext, ClientProtocol, ErrorKind, LazyContainers

from . import compiled_relay, handover
from . import protocol as p
from .commands import Commands
from .errors import ERRORS, render_error, render_refusal
from .handshake import DEFAULT_SERVER_VERSION, SERVER_CAPABILITIES, VARIANT_CAPABILITIES, ClientHandshake
from .pinning import PinTracking
from .relay import Relay
from .session_state import COLLATIONS, SessionState
from .statements import Statements

__all__ = ["COLLATIONS", "DEFAULT_SERVER_VERSION", "ERRORS", "SERVER_CAPABILITIES", "VARIANT_CAPABILITIES",
           "MySQLClient", "render_error"]


class MySQLClient(LazyContainers, Relay, Commands, Statements, SessionState, PinTracking, ClientProtocol):
    """Protocol state of one client: handshake, then the relay between the client and its current backend."""

    # Bumped whenever what handover_state exports changes in a way that matters to a resumed session (tracked
    # variables, schema, autocommit, statement ids, pins): a worker's custody re-sends the record only then.
    state_generation = 0
    # Class-level defaults of what __init__ sets (compact() drops an attribute back at its default; reads then
    # find the class's value). Dropped while empty, made again at their next use: lazy_containers.
    lazy_containers = {"fifo": deque, "captured": list, "pin_details": list, "pin_keys": dict, "unresolved": list,
                       "held": list, "held_items": list}
    handshake = None
    user = ''
    database = ''
    capabilities = 0
    deprecate_eof = False
    logged_in = False
    ok_seq = 2
    greeting_prefix = b''
    linked = False
    server_state = None
    rstate = 0
    rcount = 0
    rcount2 = 0
    status = 2
    last_insert_id = 0
    closing = False
    hold = 0
    infile = False
    transaction_lost = False
    lost_error = b''
    release_due = False
    retry_read_only = False
    retry_candidate = None
    retry_refusal = b''
    retry_request = None
    cbuf = b''
    c_skip = 0
    c_more = False
    c_size = 0
    sbuf = b''
    s_skip = 0
    s_more = False
    autocommit = True
    schema = ''
    multi_statements = False
    deferred_begin = None
    deferred_pins = None
    next_statement_id = 0
    mark = b''
    pipelined_reprepare = True
    holding = False
    held_size = 0
    held_mark = b''

    def __init__(self, ctx: ClientContext, engine):
        self.ctx = ctx
        self.engine = engine
        self.handshake = ClientHandshake(ctx, engine)
        # from the handshake, once authenticated
        self.user = ""
        self.database = ""
        self.capabilities = 0
        self.deprecate_eof = False
        self.logged_in = False
        self.ok_seq = 2
        self.greeting_prefix = b""
        self._init_relay(ctx)
        self._init_session_state()
        self._init_pins()
        self._init_statements()

    # ------------------------------------------------------------------ handshake

    def start(self) -> bytes:
        return self.handshake.greeting()

    def handshake_read_size(self) -> int:
        return self.handshake.read_size()

    def receive_handshake(self, data: bytes) -> list:
        handshake = self.handshake
        return self._handshake_events(handshake, handshake.receive(data))

    def user_found(self, record) -> list:
        """auth_query's answer to the handshake's LookupUser (see ClientProtocol.user_found)."""
        return self._handshake_events(self.handshake, self.handshake.user_found(record))

    def _handshake_events(self, handshake: ClientHandshake, events: list) -> list:
        if events and isinstance(events[-1], Authenticated):
            self._take_login(handshake)
            events[-1].leftover = handshake.leftover     # pipelined requests: the session serves them first
            handshake.leftover = b""
        return events

    def _take_login(self, handshake: ClientHandshake) -> None:
        """What the relay needs from an authenticated handshake."""
        self.user = handshake.user
        self.database = handshake.database
        self.capabilities = handshake.capabilities
        self.deprecate_eof = handshake.deprecate_eof
        self.multi_statements = handshake.multi_statements
        self.schema = handshake.database
        self.ok_seq = handshake.ok_seq
        self.greeting_prefix = handshake.greeting_prefix
        self.login_charset = handshake.charset

    def login_complete(self, server_state) -> bytes:
        """OK to the client (after the caching_sha2 fast-auth notice, if any)."""
        self.logged_in = True
        if server_state is not None:
            self.engine.server_version = server_state.version.decode("utf-8", "replace")
            self.autocommit = bool(server_state.login_status & p.SERVER_STATUS_AUTOCOMMIT)
        self.status = p.SERVER_STATUS_AUTOCOMMIT if self.autocommit else 0
        if self.ctx.read_only:
            # A reader listener's sessions are read-only on whichever node serves them (the writer too, when
            # readers fall back to it); the client may still turn that off for itself.
            self.variables.setdefault("tx_read_only", "1")
        return self.greeting_prefix + p.packet(self.ok_seq, p.ok_payload(self.status))

    def handover_state(self) -> dict | None:
        return handover.export_state(self)

    def compact(self) -> None:
        """An idle client parks: the login state machine goes once logged in, with the empty lists and the attributes
        back at their class defaults."""
        if self.logged_in:
            self.handshake = None       # its scramble and packets: only a login needs them
            self.compact_attributes()

    def relay_key(self):
        """The relay key when the compiled relay may serve this client's next requests (compiled_relay.py), else None."""
        return compiled_relay.relay_key(self)

    def relay_adopt(self, server_state, status: int) -> bool:
        """Linked to the backend of a transaction the relay served so far (a client with autocommit off, whose
        first statement that reads a table opened it; `status` 'T', the walk's word for SERVER_STATUS_IN_TRANS in
        the last answer or an ERR after it; or a BEGIN the relay answered and sent ahead of the first command):
        nothing is outstanding, no BEGIN was deferred here, and the backend held the client's settings, schema and
        autocommit when the relay lent it."""
        if status != ord("T") or handover.not_idle(self):
            return False
        self.linked = True
        self.server_state = server_state
        self._status((p.SERVER_STATUS_AUTOCOMMIT if self.autocommit else 0) | p.SERVER_STATUS_IN_TRANS)
        return True

    def relay_began(self, begin: bytes) -> None:
        """The relay answered this BEGIN (mysql_begin) and sent it to no backend: deferred here, as a BEGIN this
        client object answered itself (sent in front of the next command that needs a backend)."""
        self.deferred_begin = bytes(begin)
        self.status |= p.SERVER_STATUS_IN_TRANS

    def relay_insert_id(self, value: int) -> None:
        """An INSERT the relay served generated `value`: what `SELECT LAST_INSERT_ID()` answers here from now on, as
        after an OK packet this client object relayed itself (MySQLRelay._ok_packet)."""
        self.last_insert_id = value

    def handover_refusal(self) -> str:
        return handover.not_idle(self)

    def handover_generation(self) -> int:
        return self.state_generation

    def error(self, kind: ErrorKind, message: str) -> bytes:
        if not self.logged_in:
            # Instead of the login's OK, and of the caching_sha2 fast-auth notice when there was one: the answer
            # to the client's last handshake packet.
            return self.handshake.error(kind, message)
        return render_error(kind, message, 1)

    def login_refused(self, refusal: BackendError) -> bytes:
        """The server's ERR for the login: instead of the login's OK, or as the answer to the first command."""
        return render_refusal(refusal, self.handshake.seq + 1 if not self.logged_in else 1)
