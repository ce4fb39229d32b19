"""A toy engine and a toy database for unit tests of the core's own plumbing (Pool, Session) over real sockets.

The toy protocol is one request per line. The client logs in with `HELLO user database`; every other line is
a request answered by exactly one line. `BEGIN` opens a transaction and `COMMIT`/`ROLLBACK` end it (as the
answers arrive, the way an engine learns it from the server); `PIN` ties the session to its backend. The
backend release point is: nothing outstanding and no transaction open.

The toy database is a gevent StreamServer: `LOGIN user database` is answered `READY node`, then each request
line `OK node#connection request`, `READONLY node` for `WRITE` while it is read-only, and `DIE` closes the
connection; a login naming a database outside `databases` (when set) is refused `NODB database`. It records what each connection received and which connections it saw close.
"""
from __future__ import annotations

import itertools
import socket as _stdsocket
from collections import deque
from types import SimpleNamespace

import gevent
from gevent import socket as gsocket
from gevent.server import StreamServer

from multiproxy.config import BackendConfig, PoolConfig
from multiproxy.engine import (
    HELD_REFUSAL, Authenticated, BackendError, BackendScript, BackendTarget, ClientProtocol, ClientQuit, CloseClient,
    Engine, ErrorKind,
)
from multiproxy.fastio import ClientSocket
from multiproxy.proxy import Sessions
from multiproxy.pinning import PinPolicy
from multiproxy.pool import Pool

WAIT = 3.0      # the longest any single step of these tests may take


def wait_until(condition, timeout: float = WAIT, what: str = "condition"):
    with gevent.Timeout(timeout, AssertionError(f"timed out waiting for {what}")):
        while not condition():
            gevent.sleep(0.005)


# ---------------------------------------------------------------------------------------------- the engine

class ToyLogin(BackendScript):
    def __init__(self, target: BackendTarget):
        self.target = target
        self.buf = b""

    def start(self) -> bytes:
        return f"LOGIN {self.target.user} {self.target.database}\n".encode()

    def feed(self, data: bytes) -> bytes:
        self.buf += data
        if b"\n" in self.buf:
            line, _, self.leftover = self.buf.partition(b"\n")
            if line.startswith(b"READY "):
                self.result = {"node": line[6:].decode()}
                self.done = True
            elif line == b"DENIED":
                raise BackendError("login refused by the toy database", fatal_auth=True)
            elif line.startswith(b"NODB "):
                text = f"no database {line[5:].decode()!r} here"
                raise BackendError(f"backend refused the login: {text}", code="NODB", server_message=text)
            else:
                raise BackendError(f"unexpected login answer {line!r}")
        return b""


class ToyProtocol(ClientProtocol):
    def __init__(self, ctx):
        self.ctx = ctx
        self.hs = b""
        self.carry = b""
        self.answers = b""
        self.outstanding: deque = deque()     # requests sent to the backend, oldest first
        self.last_batch = 0                   # requests of the latest client_data
        self.in_transaction = False
        self.pinned = False
        self.retry_request = None
        self.held = None                      # (request, refusal) while a read-only refusal is checked
        self.links: list = []                 # the backend state of each link, in order
        self.unlinks = 0

    # handshake
    def receive_handshake(self, data: bytes) -> list:
        self.hs += data
        if b"\n" not in self.hs:
            return []
        line, _, leftover = self.hs.partition(b"\n")
        words = line.decode().split()
        if len(words) == 3 and words[0] == "HELLO":
            return [Authenticated(words[1], words[2], {}, leftover)]
        return [CloseClient(b"ERROR protocol_violation say HELLO user database\n")]

    def login_complete(self, facts) -> bytes:
        return f"WELCOME {facts['node']}\n".encode()

    # relay
    def client_data(self, data: bytes):
        lines = (self.carry + data).split(b"\n")
        self.carry = lines.pop()
        out = []
        for line in lines:
            if line == b"QUIT":
                self.last_batch = len(out)
                raise ClientQuit(b"".join(out))
            self.outstanding.append(line)
            out.append(line + b"\n")
        self.last_batch = len(out)
        self.requests += len(out)
        return b"".join(out), b""

    def _answered(self, request: bytes) -> None:
        if request == b"BEGIN":
            self.in_transaction = True
        elif request in (b"COMMIT", b"ROLLBACK"):
            self.in_transaction = False
        elif request == b"PIN":
            self.pinned = True
        elif request == b"RESET":
            self.pinned = False

    def _release_ok(self) -> bool:
        return not self.outstanding and not self.in_transaction

    def backend_data(self, data: bytes):
        lines = (self.answers + data).split(b"\n")
        self.answers = lines.pop()
        out = []
        for line in lines:
            request = self.outstanding.popleft()
            if line.startswith(b"READONLY") and self.ctx.retry_read_only and not self.ctx.read_only \
                    and not self.in_transaction:
                self.held = (request, line)
                self.retry_request = request + b"\n"
                return b"".join(out), HELD_REFUSAL
            self._answered(request)
            if request != b"RESET":
                out.append(line + b"\n")
        return b"".join(out), self._release_ok()

    def retry_declined(self):
        request, refusal = self.held
        self.held = self.retry_request = None
        self._answered(request)
        return refusal + b"\n", self._release_ok()

    def retry_accepted(self) -> bytes:
        request, _ = self.held
        self.held = self.retry_request = None
        self.outstanding.appendleft(request)
        return request + b"\n"

    def link(self, server_state, to_backend: bytes) -> bytes:
        self.links.append(server_state)
        return to_backend

    def unlink(self) -> None:
        self.unlinks += 1

    def fail_pending(self, kind: ErrorKind, message: str) -> bytes:
        for _ in range(self.last_batch):
            self.outstanding.pop()
        return f"ERROR {kind.value} {message}\n".encode() * self.last_batch

    def backend_lost(self, message: str):
        self.outstanding.clear()
        self.in_transaction = False
        return f"ERROR {ErrorKind.BACKEND_LOST.value} {message}\n".encode(), False

    def error(self, kind: ErrorKind, message: str) -> bytes:
        return f"ERROR {kind.value} {message}\n".encode()

    def login_refused(self, refusal: BackendError) -> bytes:
        return f"REFUSED {refusal.code} {refusal.server_message}\n".encode()

    def is_clean(self) -> bool:
        return not self.outstanding and not self.in_transaction and self.retry_request is None

    def reset_bytes(self, server_state, reset_query: str) -> bytes:
        self.outstanding.append(b"RESET")
        return reset_query.encode() + b"\n"


class ToyEngine(Engine):
    name = "toy"
    default_port = 0
    description = "line-based toy protocol for unit tests"

    def client_protocol(self, ctx):
        return ToyProtocol(ctx)

    def backend_login(self, target):
        return ToyLogin(target)

    def cancel_script(self, target, server_state):
        raise NotImplementedError

    def __init__(self, shares_facts: bool = False):
        self.shares_facts = shares_facts     # greet a client from another pool's login facts

    def render_error(self, kind, message):
        return f"ERROR {kind.value} {message}\n".encode()

    def welcome_facts_from(self, facts, user, database, of_user, of_database):
        return {**facts, "from": f"{of_user}/{of_database}"} if self.shares_facts else None


# ---------------------------------------------------------------------------------------------- the database

class ToyDatabase:
    """A loopback socket peer that speaks the toy backend protocol."""

    def __init__(self, node: str = "db1", read_only: bool = False):
        self.node = node
        self.read_only = read_only
        self.login_delay = 0.0
        self.deny = False
        self.databases: set | None = None     # the databases a login may name (None: any)
        self.ids = itertools.count(1)
        self.opened: list[int] = []
        self.closed: list[int] = []
        self.received: list[tuple[int, str]] = []
        self.socks: dict[int, gsocket.socket] = {}
        self.server = StreamServer(("127.0.0.1", 0), self._handle)
        self.server.start()
        self.address = ("127.0.0.1", self.server.server_port)

    def _handle(self, sock, address):
        cid = next(self.ids)
        self.socks[cid] = sock
        reader = sock.makefile("rb")
        try:
            login = reader.readline()
            if not login.startswith(b"LOGIN "):
                return
            if self.login_delay:
                gevent.sleep(self.login_delay)
            if self.deny:
                sock.sendall(b"DENIED\n")
                return
            database = login.split()[-1].decode()
            if self.databases is not None and database not in self.databases:
                sock.sendall(f"NODB {database}\n".encode())
                return
            self.opened.append(cid)
            sock.sendall(f"READY {self.node}\n".encode())
            while True:
                line = reader.readline()
                if not line:
                    return
                request = line.rstrip(b"\n").decode()
                self.received.append((cid, request))
                if request == "DIE":
                    return
                if request.startswith("SLEEP "):
                    gevent.sleep(float(request.split()[1]))
                if request == "WRITE" and self.read_only:
                    sock.sendall(f"READONLY {self.node}\n".encode())
                else:
                    sock.sendall(f"OK {self.node}#{cid} {request}\n".encode())
        except OSError:
            pass
        finally:
            self.closed.append(cid)
            self.socks.pop(cid, None)
            reader.close()
            sock.close()

    def target(self, user: str = "app", database: str = "appdb") -> BackendTarget:
        return BackendTarget(self.address[0], self.address[1], user, database, password="secret")

    def drop(self, cid: int) -> None:
        """The database ends connection `cid` on its own (a restart, a kill)."""
        self.socks[cid].shutdown(_stdsocket.SHUT_RDWR)

    def stop(self) -> None:
        self.server.stop(timeout=0.5)
        for cid in list(self.socks):
            try:
                self.drop(cid)
            except (OSError, KeyError):
                pass


def unused_address() -> tuple[str, int]:
    """A loopback port nothing listens on (connects are refused)."""
    s = _stdsocket.socket()
    s.bind(("127.0.0.1", 0))
    address = s.getsockname()
    s.close()
    return address


# ---------------------------------------------------------------------------------------------- the core's peers

class StubRegistry:
    """What Pool and Session ask of the failover registry: the live eligible set, and verify_writer."""

    def __init__(self, eligible=(), still_writer: bool = True):
        self.sets: dict = {}
        self.initial = set(eligible)
        self.still_writer = still_writer
        self.verified: list = []

    def eligible(self, cluster: str, role: str) -> set:
        return self.sets.setdefault((cluster, role), set(self.initial))

    def verify_writer(self, cluster: str, address) -> bool:
        self.verified.append((cluster, address))
        gevent.sleep(0.01)     # a probe takes a moment: the session must not block the backend's reader
        return self.still_writer


def make_cluster(**pool):
    settings = dict(mode="transaction", min_size=0, max_size=4, borrow_timeout=1.0, idle_timeout=0.0,
                    max_lifetime=0.0)
    settings.update(pool)
    return SimpleNamespace(
        name="toy", engine="toy", pool=PoolConfig(**settings),
        backend=BackendConfig(tls="disable", tls_ca_file="", tls_cert_file="", tls_key_file="", connect_timeout=2.0,
                              reset_query="RESET", reset_after_transaction="auto",
                              max_prepared_statements=200),
        health=SimpleNamespace(retry_read_only=True), engine_options={},
        credential_for=lambda user: None)


class StubProxy:
    """The parts of multiproxy's Proxy that Pool and Session call."""

    def __init__(self, cluster, registry=None, target_for=None, handshake_timeout: float = 2.0):
        self.cluster = cluster
        self.registry = registry
        self.target_for = target_for
        self.config = SimpleNamespace(proxy=SimpleNamespace(
            handshake_timeout=handshake_timeout, max_message_size=1 << 20, idle_client_timeout=0))
        self.users = None
        self.metrics = SimpleNamespace(protocol_errors=0, handshake_timeouts=0, auth_failures=0,
                                       rejected_connections=0, idle_timeouts=0, borrow_failures=0, read_only_retries=0)
        self.handshaking: dict = {}
        self.sessions = Sessions()
        self.pools: dict = {}
        self.backend_failures: list = []
        self.credential_failures: list = []
        self.throttle = SimpleNamespace(succeeded=lambda source: None, failed=lambda source: 0)
        self.audit = SimpleNamespace(path="", record=lambda *args, **kwargs: None)
        self.keys = itertools.count(1)
        self.statement_counts = {}

    # called by Pool
    def backend_failed(self, cluster, address) -> None:
        self.backend_failures.append(address)

    def credentials_failed(self, cluster, user) -> None:
        self.credential_failures.append(user)

    # called by Session
    def new_cancel_key(self, engine):
        return next(self.keys)

    def follows_roles(self, cluster) -> bool:
        return self.registry is not None

    def pool_for(self, rt, user, database, variant=()):
        key = (rt.config.role, user, database, variant)
        if key not in self.pools:
            budget = next((pool.budget for other, pool in self.pools.items() if other[:3] == key[:3]), None)
            self.pools[key] = Pool(self, rt.cluster, rt.config.role, user, database, rt.engine,
                                   lambda: self.target_for(user, database), variant, budget)
        return self.pools[key]

    def session_started(self, session) -> None:
        self.sessions.add(session)

    def session_ended(self, session) -> None:
        self.sessions.discard(session)

    def user_sessions(self, user) -> int:
        return sum(1 for s in self.sessions if s.user == user)

    def cancel(self, key, engine=None, terminate=False) -> None:
        pass


def make_runtime(cluster, role: str = "writer", pool_mode: str = ""):
    return SimpleNamespace(config=SimpleNamespace(name="toy-listener", role=role, pool_mode=pool_mode),
                           engine=ToyEngine(), cluster=cluster, tls_context=None, cancel_callback=None,
                           pin_policy=PinPolicy({}, cluster.name), wrap_client_tls=None, reset_after_transaction=False)


class ToyClient:
    """The test's end of a socket pair whose other end a Session drives."""

    def __init__(self, sock: gsocket.socket):
        self.sock = sock
        self.buf = b""

    def send(self, *lines: str) -> None:
        self.sock.sendall("".join(line + "\n" for line in lines).encode())

    def line(self, timeout: float = WAIT) -> str:
        with gevent.Timeout(timeout, AssertionError(f"no line from the proxy within {timeout} s (got {self.buf!r})")):
            while b"\n" not in self.buf:
                data = self.sock.recv(4096)
                if not data:
                    raise AssertionError(f"the proxy closed the connection (got {self.buf!r})")
                self.buf += data
        line, _, self.buf = self.buf.partition(b"\n")
        return line.decode()

    def ask(self, request: str) -> str:
        self.send(request)
        return self.line()

    def closed_by_proxy(self, timeout: float = WAIT) -> bool:
        with gevent.Timeout(timeout, False):
            while True:
                data = self.sock.recv(4096)
                if not data:
                    return True
                self.buf += data
        return False

    def close(self) -> None:
        self.sock.close()


def socket_pair():
    """(the test's gevent socket, the session's ClientSocket), as the acceptor hands a plaintext client over."""
    mine, theirs = _stdsocket.socketpair()
    return gsocket.socket(fileno=mine.detach()), ClientSocket(theirs)


def check_counts(pool) -> None:
    """The pool's counts are what its membership says, and each connection is in one place."""
    assert not (set(pool.idle) & pool.in_use)
    assert pool.size == len(pool.idle) + len(pool.in_use) + len(pool.opening) + len(pool.closing)
    assert not (set(pool.idle) | pool.in_use) & pool.closing
    assert pool.borrowed == len(pool.in_use)
    assert all(not conn.closed for conn in pool.idle)
