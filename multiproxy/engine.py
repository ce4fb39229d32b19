"""The engine plugin contract: what an engine provides, the facts it reports and the events its protocols emit.

An engine is pure protocol knowledge. Its objects are sans-IO: the core feeds them bytes and they answer
with bytes to send and facts (transaction boundaries, pin reasons, cancel keys). They never touch a
socket, a clock or gevent. The core owns sockets, time and policy.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Callable


class PinReason(str, enum.Enum):
    """Engine-neutral reasons why a client session must keep its backend connection. An engine adds its own
    reasons as a str Enum of its own and lists every reason it may report in `Engine.pin_reasons`."""

    SESSION_VARIABLE = "session_variable"
    TEMP_TABLE = "temp_table"
    PREPARED_STATEMENT = "prepared_statement"
    SQL_PREPARE = "sql_prepare"
    ADVISORY_LOCK = "advisory_lock"
    TABLE_LOCK = "table_lock"
    CURSOR = "cursor"
    UNKNOWN = "unknown"


class ErrorKind(str, enum.Enum):
    """Engine-neutral error situations the core asks an engine to render in its own protocol."""

    POOL_TIMEOUT = "pool_timeout"              # no backend free within the borrow timeout
    BACKEND_UNAVAILABLE = "backend_unavailable"  # cannot connect or log in to the backend
    BACKEND_LOST = "backend_lost"              # the backend connection died while serving the client
    AUTH_FAILED = "auth_failed"
    PROTOCOL_VIOLATION = "protocol_violation"
    MESSAGE_TOO_LARGE = "message_too_large"
    TOO_MANY_CONNECTIONS = "too_many_connections"
    TLS_REQUIRED = "tls_required"
    SHUTTING_DOWN = "shutting_down"
    FAILOVER = "failover"                      # the transaction was cancelled because the writer changed
    IDLE_TIMEOUT = "idle_timeout"
    HANDSHAKE_TIMEOUT = "handshake_timeout"
    NOT_SUPPORTED = "not_supported"
    INTERNAL = "internal"
    QUERY_TIMEOUT = "query_timeout"            # a request ran past query_timeout and was cancelled
    IDLE_TRANSACTION_TIMEOUT = "idle_transaction_timeout"   # idle inside a transaction: rolled back, closed


class ProtocolError(Exception):
    """The peer broke the protocol. `reply` holds the bytes that tell the client, if any."""

    def __init__(self, message: str, reply: bytes = b"", kind: ErrorKind = ErrorKind.PROTOCOL_VIOLATION):
        super().__init__(message)
        self.reply = reply
        self.kind = kind


class BackendError(Exception):
    """A backend refused or broke a login or script. `fatal_auth` marks a credentials problem.

    When the server itself refused (an error message in its protocol), `code` is its error number or SQLSTATE,
    `sqlstate` its SQLSTATE where the protocol has one besides the number, `server_message` its own text and
    `severity` its class or severity (TDS), so that a client can be told exactly what the server said
    (ClientProtocol.login_refused). A failure of the proxy's own (malformed reply, TLS) leaves `code` empty."""

    def __init__(self, message: str, fatal_auth: bool = False, code: str = "", sqlstate: str = "",
                 server_message: str = "", severity: int = 0):
        super().__init__(message)
        self.fatal_auth = fatal_auth
        self.code = code
        self.sqlstate = sqlstate
        self.server_message = server_message
        self.severity = severity

    @property
    def refused_by_server(self) -> bool:
        """The server answered the login with an error of its own (not a failure of the connection)."""
        return bool(self.code and self.server_message)


# ---- events a client protocol emits during its handshake (the hot path uses plain return values) ----

@dataclass
class SendToClient:
    data: bytes


@dataclass
class StartClientTLS:
    """Upgrade the client socket to TLS now (after sending `data`, the engine's 'yes, go ahead')."""

    data: bytes = b""


@dataclass
class Authenticated:
    """The client proved who it is; the core should find backend facts and call `login_complete`.
    `leftover`: client bytes that arrived with the end of the handshake (pipelined requests); the relay
    serves them first."""

    user: str
    database: str
    params: dict = field(default_factory=dict)
    leftover: bytes = b""


class ClientQuit(Exception):
    """Raised by `ClientProtocol.client_data` when the client ended its session (PostgreSQL Terminate, MySQL
    COM_QUIT): the core sends `to_backend` and `to_client` as for a normal return, then closes the client."""

    def __init__(self, to_backend: bytes = b"", to_client: bytes = b""):
        super().__init__("the client ended its session")
        self.to_backend = to_backend
        self.to_client = to_client


# What the second value of ClientProtocol.backend_data tells the core.
KEEP = 0              # answers are outstanding, or the transaction goes on: the backend stays linked
RELEASE = 1           # a transaction boundary with nothing outstanding: the backend may go back to the pool
HELD_REFUSAL = 2      # a read-only refusal is held back: the core probes the node, then calls retry_declined()
                      # or retry_accepted()


@dataclass
class CancelRequested:
    """A cancel request for the session holding `key` (the proxy-issued key)."""

    key: Any


@dataclass
class CloseClient:
    """Send `data` (may be empty) and close the client connection."""

    data: bytes = b""
    reason: str = ""


@dataclass
class AuthFailed:
    """Authentication failed: send `data` and close; counted and logged (never with secrets)."""

    user: str
    data: bytes
    reason: str
    audit_event: str = "auth_failed"   # "token_rejected" when a token was refused


@dataclass
class LookupUser:
    """The client's user is not in the users file and the cluster has auth_query: the core looks it up (cached,
    multiproxy.auth_lookup) and calls `ClientProtocol.user_found` with the record or None; the handshake goes on
    with the events that returns. `database`: the client's database (where the lookup logs in by default)."""

    user: str
    database: str = ""


class StatementCounts:
    """A cluster's prepared-statement cache tally: `hits` (the backend had the statement), `misses` (the proxy
    prepared it there first), `evictions` (closed on a backend to stay within max_prepared_statements)."""

    __slots__ = ("hits", "misses", "evictions")

    def __init__(self):
        self.hits = 0
        self.misses = 0
        self.evictions = 0


@dataclass(slots=True)
class ClientContext:
    """What the core tells an engine's client protocol about where it runs (one per client: slotted, no dict)."""

    listener: Any                 # multiproxy.config.ListenerConfig
    users: Any                    # multiproxy.auth.UsersFile
    tls_available: bool
    cancel_key: Any               # the proxy-issued key for this session
    pin_policy: Any               # multiproxy.pinning.PinPolicy
    max_message_size: int
    client_address: tuple = ("", 0)
    engine_options: dict = field(default_factory=dict)   # the cluster's [clusters.NAME.options]
    retry_read_only: bool = False   # retry a first statement refused as read-only on the new writer
    # A reader listener's session: engines that can make a session read-only do so on every backend it uses
    # (so a reader listener served by the writer, with health.reader_fallback_to_writer, refuses plain writes).
    read_only: bool = False
    # In-band cancels (MySQL's KILL QUERY n on another connection): call with a proxy-issued key to cancel
    # what the session holding it runs, as a CancelRequested handshake event would; with terminate=True
    # (KILL CONNECTION n) that session is closed as well. None outside the core.
    cancel: Callable | None = None
    # The listener's server-side ssl.SSLContext (None without a certificate), for engines that run TLS inside
    # their own framing (TDS 7.x carries the TLS handshake in PRELOGIN packets) with ssl.MemoryBIO.
    tls_context: Any = None
    # [clusters.NAME.backend] reset_after_transaction resolved for this engine: link() starts with a reset of the
    # backend (reset_query, or the engine's own: DISCARD ALL, COM_RESET_CONNECTION, TDS RESETCONNECTION) before
    # the session's replay, so indirect state another client left never reaches this one.
    reset_after_transaction: bool = False
    reset_query: str = ""
    # Server-side prepared statements multiplexed over a cluster's backends (MySQL COM_STMT_*, TDS sp_prepare):
    # each backend connection keeps at most this many, least recently used closed first; `statement_counts`
    # is the cluster's shared tally, exported as multiproxy_prepared_statements_total.
    max_prepared_statements: int = 200
    statement_counts: "StatementCounts" = field(default_factory=lambda: StatementCounts())
    # [clusters.NAME.backend] init_query: the core runs it on each new backend connection; engines whose reset
    # between clients undoes session settings (TDS RESETCONNECTION) run it again after such a reset.
    init_query: str = ""
    # [clusters.NAME.auth_query] is set: a user missing from the users file is looked up (the LookupUser event).
    auth_query: bool = False


@dataclass
class BackendTarget:
    """Where and as whom to log in to a backend."""

    host: str
    port: int
    user: str
    database: str
    password: str | None
    tls: str = "prefer"
    tls_context_factory: Callable | None = None   # returns an ssl.SSLContext for the backend leg
    params: dict = field(default_factory=dict)      # engine-specific startup parameters


class BackendScript:
    """A sans-IO conversation with a backend (login, cancel, probe). The core drives it:

    out = script.start(); send(out)
    loop: if script.wants_tls: wrap the socket, out = script.tls_established(); send(out)
          elif script.done: stop; else out = script.feed(recv()); send(out)
    Errors raise BackendError. `result` holds what the script learned.
    """

    done: bool = False
    wants_tls: bool = False
    result: Any = None
    leftover: bytes = b""

    def start(self) -> bytes:
        raise NotImplementedError

    def feed(self, data: bytes) -> bytes:
        raise NotImplementedError

    def tls_established(self) -> bytes:
        raise NotImplementedError

    def tls_refused_ok(self) -> bool:
        return False


_NO_DEFAULT = object()


class LazyContainers:
    """Mixin for an engine's per-client object: `compact_attributes` (for ClientProtocol.compact) drops the containers
    named in `lazy_containers` (name -> factory: deque, dict, list, set) while they are empty, and every attribute
    that holds its class's default, then keeps what is left in a dict of its size, so that a parked idle client costs
    a few hundred bytes instead of a dict grown for every attribute its transactions ever set. Reads are unchanged: a
    dropped attribute reads as its class default; the first use of a dropped container makes all of them again.

    The class itself has no __getattr__ (it would slow every attribute read of the hot path): a compacted object is
    given a subclass that has one, and goes back to its own class at the first read that misses."""

    lazy_containers: dict = {}

    def compact_attributes(self) -> None:
        cls = type(self)
        lazy = cls.lazy_containers
        kept = {}
        dropped = False
        for name, value in self.__dict__.items():
            if name in lazy:
                if not value:
                    dropped = dropped or getattr(cls, name, _NO_DEFAULT) is _NO_DEFAULT
                    continue
            elif getattr(cls, name, _NO_DEFAULT) is value:
                continue
            kept[name] = value
        self.__dict__ = kept
        if dropped:
            self.__class__ = _compacted(cls)


_COMPACTED: dict = {}


def _compacted(cls):
    """The subclass of `cls` a compacted object wears until it reads a container that was dropped."""
    compacted = _COMPACTED.get(cls)
    if compacted is None:
        compacted = _COMPACTED[cls] = type(cls.__name__, (cls,), {"__getattr__": _expand, "__module__": cls.__module__,
                                                                  "__doc__": cls.__doc__, "compacted_from": cls})
    return compacted


def _expand(self, name):
    """A read missed on a compacted object: back to its own class, with its dropped containers made again (empty)."""
    cls = type(self).compacted_from
    self.__class__ = cls
    own = self.__dict__
    for container, factory in cls.lazy_containers.items():
        if container not in own and getattr(cls, container, _NO_DEFAULT) is _NO_DEFAULT:
            own[container] = factory()
    return getattr(self, name)


def restore_attributes(client, fields: dict, runtime=frozenset()) -> None:
    """A takeover's resume (engines' handover.py): `fields`, the exported attributes of a client, onto `client`, a new
    client object of the same class; an attribute that was not exported because it held its class default (compacted
    away) is dropped from the new one too, unless it is per-process (`runtime`). An empty container that was not
    exported stays as the new object made it."""
    own = vars(client)
    cls = type(client)
    lazy = getattr(cls, "lazy_containers", {})
    for name in [name for name in own if name not in fields and name not in runtime and name not in lazy
                 and getattr(cls, name, _NO_DEFAULT) is not _NO_DEFAULT]:
        del own[name]
    own.update(fields)


def contract(method):
    """Marks a ClientProtocol method every engine must implement; the contract kit checks them from this mark."""
    method.__contract__ = True
    return method


class ClientProtocol:
    """Per client connection, sans-IO: the whole of what the core asks of an engine's client side.

    The core calls start(), then receive_handshake() for each read until an Authenticated (or a closing)
    event, then login_complete(); afterwards client_data() for each read from the client and backend_data()
    for each read from the linked backend, link()/unlink() around each use of a backend, and the error
    and reset methods when things go wrong. Methods marked @contract must be implemented; the others have
    defaults. Besides return values the core reads only `pinned`, `backend_owed` (and `requests`, for metrics).

    `backend_owed`: bytes the engine wants sent to the linked backend after a backend_data() call, e.g. a request
    it held until an answer came (MySQL holds an execute until the id of the statement it prepared again is
    known). The core sends them right after that call, then clears the attribute.
    """

    pinned: bool = False        # the session must keep its backend (set through ctx.pin_policy.detected)
    requests: int = 0           # requests seen, for metrics
    backend_owed: bytes = b""   # bytes to send to the linked backend after backend_data() (the core clears it)

    def start(self) -> bytes:
        """Bytes to send as soon as the client connects (engines whose server speaks first), else b""."""
        return b""

    def handshake_read_size(self) -> int:
        """How many bytes the core may read for the next receive_handshake call. Engines whose clients send
        a TLS ClientHello right behind their upgrade request (MySQL) return what is left of that request,
        so the ClientHello stays in the socket for the TLS layer."""
        return 16384

    @contract
    def receive_handshake(self, data: bytes) -> list:
        """Handshake bytes from the client -> a list of events (SendToClient, StartClientTLS, Authenticated,
        CancelRequested, CloseClient, AuthFailed). Bad input raises ProtocolError with the reply to send."""
        raise NotImplementedError

    @contract
    def login_complete(self, server_state) -> bytes:
        """The bytes that finish the client's login, from the facts of a logged-in backend of its pool
        (the BackendScript result of `Engine.backend_login`)."""
        raise NotImplementedError

    @contract
    def client_data(self, data: bytes) -> tuple[bytes, bytes]:
        """Bytes from the client -> (to_backend, to_client). to_backend needs a linked backend (the core
        borrows one and calls link() first); to_client is answered locally. Raises ClientQuit when the client
        ended its session, ProtocolError on bad input."""
        raise NotImplementedError

    @contract
    def backend_data(self, data: bytes) -> tuple[bytes, int]:
        """Bytes from the linked backend -> (to_client, outcome): KEEP, RELEASE (a transaction boundary with
        nothing outstanding: the backend may go back to the pool unless the session is pinned) or
        HELD_REFUSAL (see retry_declined)."""
        raise NotImplementedError

    @contract
    def link(self, server_state, data: bytes) -> bytes:
        """What to send to a freshly linked backend: replays of the session's tracked state (as requests
        whose answers the engine swallows), then `data` (rewritten if the engine maps names per backend)."""
        raise NotImplementedError

    @contract
    def unlink(self) -> None:
        """The link to the backend ended (released, lost or discarded)."""
        raise NotImplementedError

    @contract
    def is_clean(self) -> bool:
        """Nothing outstanding and no transaction open: the backend could serve someone else."""
        raise NotImplementedError

    @contract
    def reset_bytes(self, server_state, reset_query: str = "") -> bytes:
        """Bytes that reset a backend a pinned (or session-mode) client leaves, as a request whose answer the
        engine swallows and ends with RELEASE; `reset_query` is the cluster's override, if any."""
        raise NotImplementedError

    @contract
    def fail_pending(self, kind: "ErrorKind", message: str) -> bytes:
        """Answer, in this protocol, the requests of the last client_data that could not be forwarded (no
        backend within the borrow timeout, none reachable)."""
        raise NotImplementedError

    @contract
    def backend_lost(self, message: str) -> tuple[bytes, bool]:
        """The linked backend died: (bytes telling the client, whether the client must be closed)."""
        raise NotImplementedError

    @contract
    def error(self, kind: "ErrorKind", message: str) -> bytes:
        """An error in this protocol and in the conversation's current state (handshake, idle time)."""
        raise NotImplementedError

    def login_refused(self, refusal: BackendError) -> bytes:
        """The backend refused the login this client's session needs (`refusal.refused_by_server`): at the client's
        own login (before login_complete), or at its first request when the login was completed from the facts
        of an earlier login. The bytes answer that login or request with the server's code, SQLSTATE and text in
        this protocol; the core sends them and closes the client. The default is the generic
        BACKEND_UNAVAILABLE error with the core's message."""
        return self.error(ErrorKind.BACKEND_UNAVAILABLE, str(refusal))

    def retry_declined(self) -> tuple[bytes, int]:
        """After HELD_REFUSAL, the node is still the writer: the held refusal as the answer it is
        (to_client, outcome). Engines that never return HELD_REFUSAL need not implement it."""
        raise NotImplementedError

    def retry_accepted(self) -> bytes:
        """After HELD_REFUSAL, the node is no writer: the refused request, with the session's state as before
        it was sent, for the core to send once to the new writer (it calls unlink() and link() around it)."""
        raise NotImplementedError


    def awaiting_answer(self) -> bool | None:
        """Optional: whether a request sent to the linked backend still waits for (the end of) its answer. The core
        reads it, off the hot path, for query_timeout (a request outstanding too long is cancelled) and the idle
        timeouts (a client waiting for an answer is not idle). None (the default): the engine cannot tell, and
        those timeouts leave its clients alone."""
        return None

    def transaction_open(self) -> bool:
        """Optional: whether the client is inside a transaction (or anything else that keeps its backend until it
        ends), for idle_transaction_timeout and idle_client_timeout. The default reads is_clean()."""
        return not self.is_clean()

    def cancel_in_band(self) -> bytes:
        """Optional: for engines that cancel on the serving connection itself (TDS ATTENTION), the bytes that cancel
        what the linked backend runs now, sent by the core for query_timeout; the engine swallows what the backend
        answers to them and answers the client's request with a cancel error. b"" (the default): the core uses
        `Engine.cancel_script` as for a client's own cancel."""
        return b""

    def replay_handshake(self, data: bytes, nonce: bytes) -> list:
        """Optional, with Engine.relay_login_auth holding "scram-sha-256": handshake bytes that the compiled relay read
        and answered already (its startup packet, and its SASLInitialResponse if the relay answered it with `nonce` as
        its part of the SCRAM nonce), for the handshake to stand where the relay stood; returns the events of those
        bytes other than what the relay sent (SendToClient), for the core to act on as receive_handshake's."""
        raise NotImplementedError

    def user_found(self, record) -> list:
        """Optional, for engines that emit LookupUser: the looked-up multiproxy.auth.UserRecord of the handshake's
        user, or None (unknown: refused like any unknown user); returns the handshake events that follow."""
        raise NotImplementedError

    def handover_state(self) -> dict | None:
        """Optional: this client's session as JSON-ready data for a takeover (multiproxy.takeover), which moves the
        client's connection to a new proxy process that resumes it with `Engine.resume_client`; None when it cannot
        go now: a request outstanding or half read, a backend linked, a transaction open, a pin, TLS on the
        connection (Python's ssl cannot export a session). The core asks only while the client holds no backend
        and waits for its next request. None (the default): the engine's clients stay with the old process until
        they leave or its drain ends."""
        return None

    def handover_generation(self) -> int | None:
        """Optional (with handover_state): a number that changes whenever what handover_state would export changes
        in a way a resumed session depends on (tracked settings, prepared statements, pins; not counters), so that a
        worker's custody (multiproxy.custody) exports a session again only then. None: unknown, export it at every
        transaction end."""
        return None

    def handover_refusal(self) -> str:
        """Optional: in a few words, why handover_state() gives None now ("TLS", "inside a transaction", ...), for the
        takeover's log and counts; "" (the default) when the engine does not say."""
        return ""

    def compact(self) -> None:
        """Optional: the session parks (its client idle, no backend linked, multiproxy.parking): drop what only the
        login needed and buffers larger than what is still to be read, so that an idle client costs little memory.
        Called at every park: cheap when there is nothing to drop. The default drops nothing."""

    def relay_key(self):
        """Optional, with `Engine.relay_rules`: None when this client must stay on the Python path now (pinned, a
        request or transaction open, anything half done, state the next link must replay or that a stopped request
        must see); else a hashable naming the backend state it needs (`Engine.relay_serves`), so that a relay lane
        ([proxy] relay = "compiled", multiproxy.relay_lanes) may serve its next transactions. Called while the
        client holds no backend and waits for its next request. None (the default): never."""
        return None

    def relay_adopt(self, server_state, status: int) -> bool:
        """Optional, with `relay_key`: the relay served this client's transaction so far and hands it over inside
        it (a stop frame, nothing outstanding), with the backend it holds (`server_state`) and the status of that
        backend's last boundary (the rule's arg: 'T' for MySQL's SERVER_STATUS_IN_TRANS). Link to it as if the
        Python path had served the transaction so far (nothing replayed: the relay served the client only on a
        backend `relay_serves` its key), and say True; False (the default): the backend is discarded, and the
        transaction with it."""
        return False

    def relay_began(self, begin: bytes) -> None:
        """Needed with a client rule that answers BEGIN in the relay (the relay core's `pg_begin` or `mysql_begin`):
        the client comes back from the relay after the relay answered its `begin` (the statement, b"BEGIN" or
        b"START TRANSACTION" and any modes it had, spelt out by relay_core.begin_text) and sent it to no backend.
        Carry the transaction on as if the Python path had answered that BEGIN itself and not sent it yet."""
        raise NotImplementedError(f"{type(self).__name__}: relay rules with pg_begin or mysql_begin need relay_began")

    def relay_statements(self) -> "dict[bytes, bytes] | None":
        """Optional, with a client rule that relays batches of the unnamed statement (the relay core's `pg_unnamed`):
        the client's named prepared statements that the relay may serve, {name: the body of a Parse that prepares
        it as the unnamed statement (an empty name, the text, the parameter types)}, given to the relay each time the
        client enters a lane. A batch that opens with a Bind of one of them to the unnamed portal is then sent as
        that Parse and a Bind of the unnamed statement (the relay core's "named statements"). The default: None."""
        return None

    def relay_insert_id(self, value: int) -> None:
        """Optional, with a server rule that walks MySQL answers (the relay core's response="mysql"): the last insert
        id other than 0 that an OK packet carried in the answers the relay served this client since it last took it,
        for what the engine answers itself (MySQL's SELECT LAST_INSERT_ID()). The default keeps nothing."""

    def admin_console(self) -> "AdminConsole | None":
        """Optional: the wire side of the admin console (multiproxy.admin) for this client, called once it logged in
        to a console database (`multiproxy` or `pgbouncer`); None (the default): the engine offers no console, and
        such a client is served by a backend as any other."""
        return None


class AdminConsole:
    """The wire side of the admin console for one client, sans-IO (see ClientProtocol.admin_console). The views and
    commands are the core's (multiproxy.admin): the console only frames them in the engine's protocol.

    The core sends greeting() once the client is authenticated, then feeds requests() each read; for each command text
    it returns the core runs the command and sends result() or failure(). Column types are PostgreSQL type names
    (text, int4, int8, numeric, bool); values are None or str/int/float."""

    def greeting(self, server_version: str) -> bytes:
        """The bytes that finish the client's login (no backend is involved)."""
        raise NotImplementedError

    def requests(self, data: bytes) -> list:
        """Bytes from the client -> a list of command texts (str) to run, in order, and answers the console gives
        itself (bytes: a request it does not take). Raises ClientQuit when the client ends its session."""
        raise NotImplementedError

    def result(self, columns: list, rows: list, tag: str) -> bytes:
        """The answer of one command: `columns` as (name, type name) pairs (none for a command without rows),
        `rows` as lists of values, `tag` the command's completion tag (SHOW, PAUSE, ...)."""
        raise NotImplementedError

    def failure(self, code: str, message: str) -> bytes:
        """A command that failed, `code` naming why: syntax_error, insufficient_privilege, undefined_object,
        invalid_parameter, feature_not_supported or internal_error."""
        raise NotImplementedError


def contract_methods(cls=None) -> tuple[str, ...]:
    """The ClientProtocol methods an engine must implement (those marked @contract)."""
    cls = cls or ClientProtocol
    return tuple(name for name, value in vars(cls).items() if getattr(value, "__contract__", False))


class Engine:
    """Base class of engine plugins. Subclasses set the class attributes and implement the methods."""

    name: str = ""
    default_port: int = 0
    description: str = ""
    # The methods every engine must provide; plugin loading checks them.
    required_methods = ("client_protocol", "backend_login", "cancel_script", "render_error")
    # True when the client protocol implements listeners with auth = 'token': it asks for the token only once
    # the client's connection is encrypted, checks it with `ctx.listener.token_verifier.verify(token, user)` and
    # reports a refusal as AuthFailed(audit_event="token_rejected") carrying the verifier's reason. The config
    # refuses auth = 'token' on listeners of engines that do not declare it.
    supports_token_auth: bool = False
    # Every pin reason the engine's protocols may report: PinReason's values and those of the engine's own str
    # Enum. The config accepts these as keys of [clusters.NAME.pinning] (pin, ignore or reject per reason).
    pin_reasons: tuple[str, ...] = tuple(reason.value for reason in PinReason)
    # The values `auth` may take on this engine's listeners; 'token' also needs supports_token_auth.
    client_auth_methods: tuple[str, ...] = ("trust",)
    # Verifier kinds the engine's client authentication reads from the users file, beyond the core's
    # scram_sha_256 and md5: kind -> maker(user, password) -> verifier text (`multiproxy users add --kind`).
    verifier_kinds: dict = {}
    # What [clusters.NAME.backend] reset_after_transaction = 'auto' means on this engine: reset each backend before
    # its next transaction (True where the reset costs nothing, as TDS's RESETCONNECTION flag).
    reset_after_transaction_default: bool = False

    def relay_rules(self, key=None) -> dict | None:
        """Optional: what the compiled relay ([proxy] relay = "compiled", multiproxy.relay_lanes) needs to serve this
        engine's clients between the events the engine must see: {"client": ..., "server": ...}, the keyword
        arguments of a relay_core Walker for each direction (framing, `stop` types, `count` types that open a
        request, the server's `boundary` type that closes one, and a `screen` of words in whole frames of some
        types: every frame that could pin, change session state or open a transaction must stop; PostgreSQL's
        framing may add `pg_unnamed=True`, whole Parse/Bind/Describe/Execute...Sync batches of the unnamed statement
        and portal relayed, see relay_core), optionally "buffer_size". The relay ends a transaction at a boundary
        frame whose status byte is 'I' with no request outstanding. Optionally "quit": the exact bytes of a client's
        goodbye (PostgreSQL's Terminate) which, stopped alone between transactions, ends the session at once (the
        lane finishes it with no greenlet; the Python path would read it, answer nothing and end it the same way).
        `key`: the `relay_key()` of the lane the rules are for (rules may differ per key, as MySQL's response walk
        with CLIENT_DEPRECATE_EOF); None: any key's, to learn whether the engine has rules. None (the default): the
        engine's clients stay on the Python path."""
        return None

    def relay_serves(self, key, server_state) -> bool:
        """Optional, with relay_rules: whether a backend in `server_state` serves clients of `relay_key()` `key`
        with nothing replayed."""
        return False

    # With relay_login: the first packet the relay answers by itself before a startup (the TLS request) and its answer.
    relay_login_refusal: tuple = (b"", b"")
    # With relay_login: the listener auth methods whose logins the relay may run: "trust" (a greeting alone) and
    # "scram-sha-256" (the relay verifies the exchange from the user's stored keys, multiproxy.relay_logins; the
    # client protocol's replay_handshake then takes over an exchange the relay does not finish).
    relay_login_auth: frozenset = frozenset(("trust",))

    def relay_login(self, client: "ClientProtocol", server_state) -> tuple | None:
        """Optional, with relay_rules: the greeting of a logged-in `client` (trust authentication, between its login
        and its first request) that the compiled relay may send by itself to a client sending the same first packet
        (relay logins, multiproxy.relay_logins): (the startup packet, the reply with a zeroed 8-byte cancel key,
        where that key starts in the reply); `server_state` is the facts the client was greeted from. None (the
        default): logins stay on the Python path."""
        return None

    def relay_login_same(self, facts, newer) -> bool:
        """Optional, with relay_login: whether a client greeted from `newer` (a pool's facts of a later login) gets
        the greeting and the session state it would get from `facts`, so that a template made from `facts` holds."""
        return False

    def relay_login_key(self, data: bytes):
        """Optional, with relay_login: the cancel key (as new_cancel_key makes it) that these 8 bytes of a greeting
        hold (the inverse of relay_login_key_bytes)."""
        raise NotImplementedError

    def relay_login_key_bytes(self, key) -> bytes:
        """Optional, with relay_login: the 8 bytes of cancel key `key` (new_cancel_key's) as a greeting holds them."""
        raise NotImplementedError

    def listener_problems(self, settings: dict) -> list[tuple[str, str]]:
        """Optional: listener settings this engine cannot honour, as (setting name, what is wrong and what to do).

        `settings` holds a listener's validated values (tls_min_version, tls_ciphers, auth, ...). The config
        reports each pair under the listener's key path, with the other problems of the file."""
        return []

    def client_protocol(self, ctx: ClientContext) -> ClientProtocol:
        raise NotImplementedError

    def backend_login(self, target: BackendTarget) -> BackendScript:
        raise NotImplementedError

    def cancel_script(self, target: BackendTarget, server_state: Any) -> BackendScript:
        raise NotImplementedError

    def render_error(self, kind: ErrorKind, message: str) -> bytes:
        raise NotImplementedError

    def resume_client(self, ctx: ClientContext, state: dict) -> ClientProtocol:
        """Optional (with ClientProtocol.handover_state): the client protocol of a session another process of the
        proxy exported, already logged in and between requests; the core serves it as if its login had just
        ended here. `ctx.cancel_key` is the key the client was given by the old process."""
        raise NotImplementedError(f"engine {self.name!r} cannot resume clients handed over by a takeover")

    def backend_variant(self, params: dict) -> tuple:
        """Optional: what else a backend must share with a client to serve it, from `Authenticated.params`.

        A hashable tuple of (name, value) pairs. It becomes part of the pool key (cluster, role, user,
        database, variant), so clients with different variants never share a backend connection, and its
        pairs reach `backend_login` as `BackendTarget.params`. MySQL uses it for the client capabilities
        that change the wire format or server behaviour (CLIENT_DEPRECATE_EOF, ...) and the login charset.
        """
        return ()

    def welcome_facts_from(self, facts: Any, user: str, database: str, of_user: str, of_database: str) -> Any:
        """Optional: greet a client of (`user`, `database`) from `facts`, the login facts (BackendScript result of
        `backend_login`) of another pool of the same cluster, role and engine, logged in for (`of_user`,
        `of_database`) and perhaps another backend variant. Return the facts to pass to `login_complete`, adapted
        if need be, or None when they cannot stand for this client's own login (the default): the core then
        logs in to a backend before it completes the client's login. The core asks only when the pool has not
        logged in yet and its budget has no free slot (a pool with a free slot logs in itself, so a refusal comes
        at the login); where the engine accepts them, such a login does not wait for a backend, and a refusal of
        the client's own login (unknown database) comes with its first request (see ClientProtocol.login_refused)."""
        return None

    def variant_name(self, variant: tuple) -> str:
        """Optional: a short name of a backend variant (see backend_variant), which tells its pool apart from the
        other variants of (cluster, role, user, database) in metrics and /status: `main/writer/app/shop[NAME]`."""
        return ",".join(f"{name}={value}" for name, value in variant)

    # A query whose first row's first value is the server's max_connections (for max_cluster_connections given as a
    # percentage); empty: the engine cannot tell, and such a cap is refused at the first login.
    max_connections_query: str = ""

    def backend_query(self, sql: str, server_state: Any, what: str = "query") -> BackendScript | None:
        """Optional: a script that runs `sql` (one or more statements, as the engine's simple request runs them) on a
        logged-in backend connection whose login left `server_state`; used for [clusters.NAME.backend] init_query
        and max_connections_query. The core drives it with run_script right after the login. Its result is the
        first row's values as text ([] without rows); a server error raises BackendError with the server's code and
        text (`what` names the query in its message). None (the default): the engine runs no queries, and a config
        with init_query fails every login of it."""
        return None

    # auth_query ([clusters.NAME.auth_query]): the default query, with one placeholder for the user name.
    auth_query_default: str = ""

    def auth_query_sql(self, query: str, user: str) -> str | None:
        """Optional: `query` with its placeholder replaced by `user` quoted as a literal of the engine's SQL (never
        formatted raw); None (the default): the engine cannot look users up, and config validation refuses
        auth_query on its clusters."""
        return None

    def auth_query_verifiers(self, value: str) -> dict:
        """Optional: the users-file verifiers by kind for a verifier the auth query returned ({}: none usable)."""
        return {}

    def probe_script(self, target: BackendTarget) -> BackendScript | None:
        """Optional: a script whose result says the node's role ('writer'/'reader') and lag."""
        return None

    def new_cancel_key(self, counter: int, worker: int) -> Any:
        """The proxy-issued key handed to a client; hashable and JSON-serialisable (int or tuple of ints)."""
        return (worker << 24) | (counter & 0xFFFFFF)

    def cancel_key_worker(self, key: Any) -> int:
        """Which worker issued `key` (see new_cancel_key)."""
        return (key >> 24) & 0x7F if isinstance(key, int) else 0
