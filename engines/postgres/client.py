"""One PostgreSQL client connection, sans-IO: the login, then transaction-aware relaying.

`PostgresClient` puts together the jobs of a client connection, one module each:

- handshake.py: `PostgresHandshake`, the startup/TLS/authentication state machine (a `Phase` per expected
  message), an object the client owns until the login is done;
- relay.py: `Relay`, the framing walks of client_data/backend_data, the FIFO of expected answers, release
  decisions, COPY, the read-only retry hold, local answers and failures, and the pin detection glue;
- statements.py: `Statements`, named prepared statement virtualisation;
- session_state.py: `SessionState`, tracked parameters and settings, the greeting, the replay on link, the
  read-back of settings an expression set;
- transactions.py: `LazyTransaction`, a BEGIN answered by the proxy and sent with the first statement;
- pinning.py: the SQL classifier the relay consults; errors.py: the proxy's ErrorResponses;
- console.py: `PostgresConsole`, the admin console's wire side (admin_console, for the databases multiproxy and
  pgbouncer).

Relay, Statements, SessionState and LazyTransaction are mixins of the one client object: the hot paths read their fields as
plain attributes of `self`, as before the split.
"""
from __future__ import annotations

from collections import deque

from multiproxy.engine import BackendError, ClientContext, ClientProtocol, ErrorKind, LazyContainers, PinReason

from . import handover
from . import protocol as p
from .console import PostgresConsole
from .errors import FATAL_KINDS, SQLSTATE, render_error, render_refusal
from .handshake import DONE, MAX_STARTUP_PACKET, Phase, PostgresHandshake, data_after_login
from .relay import CLIENT_QUERY, CLIENT_SYNC, EMPTY_SYNC, INTERNAL, Relay
from .session_state import CLIENT_OWNED, FIXED_PARAMETERS, STARTUP_ONLY, SessionState, parse_options, split_options
from .statements import CLOSED_STATEMENT, Statements, global_statement_name
from .transactions import LazyTransaction

__all__ = [
    "CLIENT_OWNED", "CLIENT_QUERY", "CLIENT_SYNC", "CLOSED_STATEMENT", "EMPTY_SYNC", "FATAL_KINDS", "FIXED_PARAMETERS",
    "INTERNAL", "MAX_STARTUP_PACKET", "Phase", "PostgresClient", "SQLSTATE", "STARTUP_ONLY", "global_statement_name",
    "parse_options", "render_error", "split_options",
]


class PostgresClient(LazyContainers, Relay, Statements, SessionState, LazyTransaction, ClientProtocol):
    """Protocol state of one client: handshake, then the relay between the client and its current backend."""

    # Dropped while empty when the session parks (compact), made again at their next use.
    lazy_containers = {"fifo": deque, "parse_fifo": deque, "pin_details": list, "client_settings": dict,
                       "startup_settings": dict}

    # What the handshake found, kept once it is done (the handshake object itself is then dropped).
    user = ""
    database = ""
    startup_body = b""              # the StartupMessage's parameter bytes, the key of the greeting cache
    # Bumped whenever what handover_state exports changes in a way that matters to a resumed session (tracked
    # settings and parameters, prepared statements, pins): a worker's custody re-sends the record only then.
    state_generation = 0

    def __init__(self, ctx: ClientContext, mock_secret: bytes):
        self.ctx = ctx
        self.handshake: PostgresHandshake | None = PostgresHandshake(ctx, mock_secret)
        self.max_message = ctx.max_message_size
        self.startup_params: dict[str, str] = {}
        self.fifo: deque = deque()      # what each expected ReadyForQuery answers, oldest first
        self.pin_details: list[tuple[PinReason, str]] = []
        self.client_params: dict[str, str] = {}  # reported parameters: lowercase name -> value the client believes in
        self.client_settings: dict[str, str] = {}  # unreported startup settings (options -c ...) to replay
        self.canonical: dict[str, str] = {}
        self.virtualize = ctx.engine_options.get("prepared_statements", "virtualize") == "virtualize"
        self.parse_fifo: deque = deque()   # (sync group, injected by the proxy, global name) per Parse sent
        self.retry_read_only = ctx.retry_read_only

    @property
    def phase(self) -> Phase:
        """Where the login stands; Phase.DONE once the client is authenticated."""
        handshake = self.handshake
        return DONE if handshake is None else handshake.phase

    def receive_handshake(self, data: bytes) -> list:
        handshake = self.handshake
        if handshake is None:           # logged in
            if data:
                raise data_after_login()
            return []
        return self._handshake_events(handshake, handshake.receive(data))

    def replay_handshake(self, data: bytes, nonce: bytes) -> list:
        handshake = self.handshake
        if handshake is None:
            raise data_after_login()
        return self._handshake_events(handshake, handshake.replay(data, nonce))

    def user_found(self, record) -> list:
        """auth_query's answer to the handshake's LookupUser (see ClientProtocol.user_found)."""
        handshake = self.handshake
        if handshake is None:
            return []
        return self._handshake_events(handshake, handshake.user_found(record))

    def _handshake_events(self, handshake: PostgresHandshake, events: list) -> list:
        if handshake.phase is DONE:
            self.user = handshake.user
            self.database = handshake.database
            self.startup_params = handshake.startup_params
            self.startup_body = handshake.startup_body
            self.handshake = None
        return events

    def error(self, kind: ErrorKind, message: str) -> bytes:
        return render_error(kind, message)

    def admin_console(self) -> PostgresConsole:
        # The virtual databases multiproxy and pgbouncer: PgBouncer's admin console, answered by the proxy.
        return PostgresConsole(self.ctx.cancel_key)

    def handover_state(self) -> dict | None:
        return handover.export_state(self)

    def compact(self) -> None:
        """An idle client parks: the empty FIFOs and lists go, and the attributes back at their class defaults."""
        if self.handshake is None:
            self.compact_attributes()

    def relay_key(self):
        """(reported parameters, tracked settings) the backend must hold, when the compiled relay may serve this
        client's next transactions (engines/postgres/compiled_relay.py); else None."""
        requests = self.requests
        if requests != self.relay_seen_requests:
            # A client whose last requests used what the relay stops at in the extended protocol (counted by
            # client_data in extended_stops: a named statement or portal, Describe of a statement, Close, Flush, a
            # Parse of the unnamed statement without its Bind right behind it or a Bind without its Parse) stays
            # on the Python path: its next ones would stop in the relay again, at a cost on every transaction.
            # The unnamed statement in PQexecParams' batches counts nothing: those clients are relayed.
            self.relay_extended = self.extended_stops != self.relay_seen_stops
            self.relay_seen_requests, self.relay_seen_stops = requests, self.extended_stops
        if (self.relay_extended or handover.not_idle(self) or self.retry_read_only or self.ctx.reset_after_transaction
                or self.unnamed_held or self.deferred is not None or self.closing or self.sbuf or self.s_skip
                or self.local_error):
            return None
        return frozenset(self.client_params.items()), frozenset(self.client_settings.items())

    def relay_adopt(self, server_state, status: int) -> bool:
        """Linked to the backend of a transaction the relay served so far (a BEGIN it answered and sent ahead of the
        first statement, and the statements after it), whose last ReadyForQuery said `status`: 'T', or 'E' after an
        error. Nothing is outstanding, and the backend held the client's parameters and settings when the relay lent
        it."""
        if status not in (p.TX_IN_TRANSACTION, p.TX_FAILED) or handover.not_idle(self):
            return False
        self.linked = True
        self.server_state = server_state
        self.server_params = server_state.params
        self.tx_status = status
        return True

    def relay_statements(self):
        """The named statements this client prepared (statement virtualisation), for the relay to serve their Binds:
        {name: Parse body of the unnamed statement}."""
        statements = self.statements
        if not statements:
            return None
        return {name: b"\x00" + rest for name, (_, rest) in statements.items()}

    def relay_began(self, begin: bytes) -> None:
        """The relay answered this BEGIN and sent it to no backend: LazyTransaction sends it ahead of the next request
        that needs a backend, as for a BEGIN answered here."""
        self.lazy_begin = bytes(begin)

    def handover_refusal(self) -> str:
        return handover.not_idle(self)

    def handover_generation(self) -> int:
        return self.state_generation

    def login_refused(self, refusal: BackendError) -> bytes:
        # FATAL, as the server says it at a login or at any time after: no ReadyForQuery follows, the client is closed.
        return render_refusal(refusal)
