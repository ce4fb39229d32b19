"""Online restart and upgrade: a new process takes the listening sockets and the idle clients over from a running one.

PgBouncer's takeover (-R), over the running process's takeover socket ([proxy] takeover_socket), record by record
(multiproxy.handover):

    new -> old   hello (version, pid, listeners, admin_listen)
    old -> new   hello (version, pid, listeners, the next cancel-key counter), or refused (why)
    new -> old   ready (the listener lists match), or refused (why: the new process then exits 1)
    old -> new   listeners, with the listening sockets       the new process accepts on them at once
    new -> old   accepting                                    the old one stops accepting
    old -> new   client, with its connection (one per client) every client idle now, then each one as it
                                                              becomes idle, until takeover_drain_timeout
    old -> new   done (counts)                                the old process drains the rest and exits 0
    new -> old   cancel (key), until the old process exits    for the clients that stayed there

If the connection ends before done, the new process went away: the old one listens again and goes on.

A client goes only while its session waits for its next request with no backend linked and its engine says it
can (ClientProtocol.handover_state: nothing outstanding, no transaction, no pin, no TLS). The old process stops
its read watcher before it exports anything, so it never consumes a byte of the client after that moment: bytes
still in the kernel's buffer go with the descriptor. The new process registers the session (its cancel key too)
and serves it from its next request (Session.resume). Clients that never become idle, and TLS clients, stay with
the old process and end as in a graceful stop (proxy.stop: transactions finish, then connections close).

With workers > 1 on either side the supervisors hold this conversation (multiproxy.group_takeover), reusing
`connect_and_negotiate` and `Handover`'s drain; a single process on the other side sees no difference.
"""
from __future__ import annotations

import _socket
import itertools
import logging
import os
import socket as _stdsocket
import stat
import tempfile
import time
from collections import Counter

import gevent
from gevent import socket
from gevent.lock import Semaphore

from . import __version__
from . import relay_core, systemd
from .fastio import ClientSocket
from .handover import HandoverError, RecordReader, check_hello, decode, encode, hello, send_record
from .session import HandedOver, Session

log = logging.getLogger("multiproxy.takeover")
DRAIN_SWEEP = 0.02          # seconds between two looks at the sessions still to hand over
CONNECT_TIMEOUT = 10.0
RUNTIME_DIR = "/run/multiproxy"


class TakeoverError(Exception):
    """The takeover could not start (no running process, another version, other listeners); nothing was handed over."""


class NobodyRunning(TakeoverError):
    """No process listens on the takeover socket."""


def socket_path(config) -> str:
    """Where a process of `config` listens for a takeover: [proxy] takeover_socket ("auto": in /run/multiproxy when
    it is a writable directory, else in the temporary directory, named after the first listener's port); ""
    when disabled."""
    path = getattr(config.proxy, "takeover_socket", "auto")
    if path != "auto":
        return path
    port = config.listeners[0].listen[1] if config.listeners else 0
    directory = RUNTIME_DIR if os.path.isdir(RUNTIME_DIR) and os.access(RUNTIME_DIR, os.W_OK) else tempfile.gettempdir()
    return os.path.join(directory, f"multiproxy-takeover-{port}.sock")


def claim_path(path: str) -> bool:
    """Whether this process may bind a takeover socket at `path`: a stale socket file of a dead process is removed;
    a file that is no socket, or the live socket of another process, is left alone (False, logged). Creates the
    folder."""
    if os.path.exists(path):
        if not stat.S_ISSOCK(os.stat(path).st_mode):
            log.warning("takeover: %s exists and is no socket; takeovers are disabled (proxy.takeover_socket)", path)
            return False
        probe = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        try:
            probe.connect(path)
            log.warning("takeover: another process listens on %s; this one takes no takeovers "
                        "(give each proxy its own proxy.takeover_socket)", path)
            return False
        except OSError:
            os.unlink(path)         # left by a process that is gone
        finally:
            probe.close()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    return True


def config_listener_facts(config, engines) -> list:
    """The listener list a takeover compares (name, address, engine), from a config (a supervisor has no Proxy)."""
    return [{"name": lc.name, "listen": [lc.listen[0], lc.listen[1]],
             "engine": engines[config.clusters[lc.cluster].engine].name} for lc in config.listeners]


def _listener_facts(proxy) -> list:
    return [{"name": rt.config.name, "listen": [rt.config.listen[0], rt.config.listen[1]], "engine": rt.engine.name}
            for rt in proxy.listeners]


def _counts(proxy) -> dict:
    metrics = proxy.metrics
    counts = getattr(metrics, "takeover_clients", None)
    if counts is None:
        counts = metrics.takeover_clients = {"handed_over": 0, "taken_over": 0, "stayed": 0}
    return counts


# ---------------------------------------------------------------- the running (old) process

class TakeoverListener:
    """The running process's side: listens on the takeover socket and hands everything to the process that connects."""

    def __init__(self, proxy, path: str):
        self.proxy = proxy
        self.path = path
        self.sock = None
        self.greenlet = None
        self.busy = False
        self.handed_over = False        # this process gave its listeners away: it ends without STOPPING=1

    def start(self) -> None:
        """Bind the socket (0600: only this user may take the process over); a stale file of a dead process is
        replaced, the live socket of another process is left alone (and logged). A socket that cannot be bound
        disables takeovers of this process (logged), never its start."""
        try:
            self._bind()
        except OSError as exc:
            log.error("takeover: cannot listen on %s (%s): this process cannot be taken over; fix proxy.takeover_socket "
                      "and restart it", self.path, exc.strerror or exc)

    def _bind(self) -> None:
        path = self.path
        if not claim_path(path):
            return
        sock = socket.socket(_stdsocket.AF_UNIX, _stdsocket.SOCK_STREAM)
        old_mask = os.umask(0o177)
        try:
            sock.bind(path)
        finally:
            os.umask(old_mask)
        os.chmod(path, 0o600)
        sock.listen(4)
        self.sock = sock
        self.greenlet = gevent.spawn(self._accept)
        log.info("takeover: listening on %s (multiproxy run --takeover hands this process's clients to a new one)",
                 path)

    def close(self) -> None:
        if self.greenlet is not None:
            self.greenlet.kill(block=False)
            self.greenlet = None
        if self.sock is not None:
            self.sock.close()
            self.sock = None
            self._unlink()

    def _unlink(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def _accept(self) -> None:
        while True:
            conn, _ = self.sock.accept()
            if not admit_caller(conn, self.busy):
                continue
            self.busy = True
            gevent.spawn(self._hand_over, conn)

    def release(self) -> None:
        """Give the socket's path up for the new process (which listens there once it has taken over); this
        process takes no further takeovers. Called from the handover's greenlet."""
        if self.greenlet is not None:
            self.greenlet.kill(block=False)
            self.greenlet = None
        if self.sock is not None:
            self.sock.close()
            self.sock = None
            self._unlink()

    def _hand_over(self, conn) -> None:
        proxy = self.proxy
        try:
            handed = Handover(proxy, conn, self.release).run()
        except (HandoverError, OSError) as exc:
            log.warning("takeover: %s; this process goes on serving", exc)
            self.busy = False
            conn.close()
            if self.sock is None:
                self.start()
            return
        if not handed:
            self.busy = False
            conn.close()
            if self.sock is None:
                self.start()            # the path was given up for the new process: take it back
            return
        # This process is done: what stayed ends as in a graceful stop, then it exits 0 (which closes the connection,
        # over which the new process passes the cancels of the clients still here until then).
        self.handed_over = True
        proxy.shutdown_requested.set()


class Handover:
    """One takeover, seen from the process that gives everything away."""

    def __init__(self, proxy, conn, release_path=None):
        self.proxy = proxy
        self.conn = conn
        self.release_path = release_path
        self.sending = Semaphore()
        self.reader = RecordReader(conn)
        self.handed = 0
        self.failed = False         # the new process went away before the done record
        self.done = False

    def run(self) -> bool:
        """True once the listeners went to the new process (this one must then end); False when the new process
        declined before that (nothing changed here)."""
        proxy = self.proxy
        record, _ = self.reader.read()
        check_hello(record, "new process")
        peer = record.get("pid")
        self.peer_admin_listen = record.get("admin_listen")
        send_record(self.conn, hello(os.getpid(), multiproxy=__version__, listeners=_listener_facts(proxy),
                                     cancel_counter=next(proxy._cancel_counter)))
        record, _ = self.reader.read()
        if record["type"] != "ready":
            log.warning("takeover: the new process (pid %s) declined: %s", peer, record.get("reason", record["type"]))
            return False
        log.info("takeover: handing this process over to pid %s", peer)
        systemd.notify("STATUS=handing over to pid %s" % peer)
        if self.release_path is not None:
            self.release_path()
        if getattr(proxy, "relay_lanes", None) is not None:
            proxy.relay_lanes.logins.close()    # the relay lets go of the listeners before they are handed over
        names = [rt.config.name for rt in proxy.listeners]
        fds = [rt.acceptor.sock.fileno() for rt in proxy.listeners]
        admin = proxy.admin is not None and getattr(proxy.admin, "socket", None) is not None
        if admin and self.peer_admin_listen != proxy.config.proxy.admin_listen:
            # The new process serves its admin server elsewhere (or none): it binds its own; this one's goes now.
            proxy.admin.stop()
            proxy.admin = None
            admin = False
        if admin:
            fds.append(proxy.admin.socket.fileno())
        send_record(self.conn, {"type": "listeners", "names": names, "admin": admin}, fds)
        record, _ = self.reader.read()
        if record["type"] != "accepting":
            raise HandoverError(f"expected accepting, got {record['type']!r}")
        for rt in proxy.listeners:         # the new process accepts now; this one keeps only its clients
            if rt.acceptor is not None:
                rt.acceptor.close()
        if admin:
            proxy.admin.stop()
            proxy.admin = None
        proxy.stopping = True
        relay_core.attend()     # (the relay lanes' login doors see it at their next wake-up)
        gevent.spawn(self._receive_cancels)
        self._drain(peer)
        if self.failed:
            # The new process went away mid-way: the clients it took are gone with it; this one serves again.
            try:
                proxy.listen_again()
            except OSError as exc:
                log.error("takeover: cannot listen again after the new process went away (%s); this process ends "
                          "as in a graceful stop", exc)
                return True
            log.warning("takeover: the new process (pid %s) went away; this process accepts again, with the %d "
                        "clients it still had", peer, len(proxy.sessions))
            return False
        return True

    def _receive_cancels(self) -> None:
        """Cancels (PostgreSQL's cancel request, MySQL's KILL) that reached the new process for clients still here."""
        try:
            while True:
                record, fds = self.reader.read()
                for fd in fds:
                    os.close(fd)
                if record.get("type") == "cancel":
                    self.proxy.cancel(decode(record["key"]), None, bool(record.get("terminate")))
        except (HandoverError, OSError):
            # The new process ended the connection: after the done record, as it does when this process exits;
            # before it, it went away.
            if not self.done:
                self.failed = True

    def _drain(self, peer) -> None:
        proxy = self.proxy
        stayed, tls, reasons = self.drain_sessions()
        if not self.failed:
            self.done = True
            try:
                with self.sending:
                    send_record(self.conn, {"type": "done", "clients": self.handed, "stayed": stayed, "tls": tls})
            except OSError:
                pass
        log.info("takeover: handed %d listeners and %d clients to pid %s; %d clients stay here until they finish "
                 "(%d TLS)%s", len(proxy.listeners), self.handed, peer, stayed, tls,
                 "".join(f"; {why}: {count}" for why, count in sorted(reasons.items())))

    def drain_sessions(self) -> tuple[int, int, Counter]:
        """Hand over every client idle now, then each one as it becomes idle, until takeover_drain_timeout (or the
        new process went away): (how many stayed, how many of them TLS, why they stayed)."""
        proxy = self.proxy
        deadline = time.monotonic() + proxy.config.proxy.takeover_drain_timeout
        # A client goes the moment its backend goes back to the pool (Session.on_backend_data calls the hook);
        # the sweep finds the others (idle since before the takeover, or whose hook call found them busy).
        proxy.idle_hook = self.try_hand
        relay_core.attend()     # (the relay lanes' login doors judge every wake-up while it is set)
        try:
            while True:
                for session in list(proxy.sessions):
                    if self.failed:
                        break
                    self.try_hand(session)
                if self.failed or not proxy.sessions or time.monotonic() >= deadline:
                    break
                gevent.sleep(DRAIN_SWEEP)
        finally:
            proxy.idle_hook = None
            relay_core.attend()
        stayed = len(proxy.sessions)
        reasons = Counter(_why_stays(session) for session in proxy.sessions)
        tls = reasons.get("TLS", 0)
        _counts(proxy)["stayed"] += stayed
        return stayed, tls, reasons

    def send_client(self, record: dict, fd: int) -> None:
        """Send one exported client with its connection to the new process (OSError: it went away)."""
        send_record(self.conn, record, [fd])

    def try_hand(self, session) -> bool:
        """Hand `session` over if it waits for its client's next request and its engine can export it."""
        sock = session.sock
        if (self.failed or type(sock) is not ClientSocket or session.backend is not None or session.pool is None
                or session.client_gone or session.leftover or session.proto is None):
            return False
        watcher = sock._read_event
        if watcher is None or watcher.callback is None or not watcher.active:
            return False        # its greenlet is not waiting for the client (borrowing, sending, logging in)
        parked = sock.parked    # no greenlet waits: the session parked (multiproxy.parking)
        waiter = None if parked else getattr(watcher.callback, "__self__", None)
        if not parked and (waiter is None or not hasattr(waiter, "throw")):
            return False
        record = export_record(session)
        if record is None:
            return False
        # One record at a time on the connection; a caller that would wait (the idle hook runs in a backend's reader)
        # leaves the client to the next sweep instead.
        if not self.sending.acquire(blocking=False):
            return False
        try:
            # From here the session's greenlet never wakes for this client again: not a byte is read here any more,
            # and nothing is said to the client (client_gone also keeps the client timeouts' sweep away from it).
            if parked:
                on_readable, _ = watcher.args
                sock.unpark()
            else:
                watcher.stop()
            session.client_gone = True
            try:
                self.send_client(record, sock._sock.fileno())
            except OSError as exc:
                session.client_gone = False
                # The new process is gone: this process keeps the client.
                if parked:
                    sock.park(on_readable, session)
                else:
                    watcher.start(waiter.switch, waiter)
                self.failed = True
                log.error("takeover: the new process went away (%s); the remaining clients stay here", exc)
                return False
        finally:
            self.sending.release()
        self.handed += 1
        _counts(self.proxy)["handed_over"] += 1
        if parked:
            # No greenlet to tell: the session ends here as its greenlet would end it (not a word to the client).
            session.finish(handed_over=True)
            self.proxy.client_left(session)
        else:
            sock.hub.loop.run_callback(waiter.throw, HandedOver())
        return True


def export_record(session) -> dict | None:
    """A logged-in client between requests as the record a takeover (or a worker's custody) sends with its connection:
    the core's part and the engine's (ClientProtocol.handover_state); None when its engine cannot export it now."""
    try:
        state = session.proto.handover_state()
    except Exception:  # an engine's failure keeps its client where it is
        log.exception("exporting client %s failed; it is not handed over", session._where())
        return None
    if state is None:
        return None
    try:
        return {"type": "client", "listener": session.listener.name, "engine": session.engine.name,
                "state": state, "session": encode({
                    "user": session.user, "database": session.database, "cancel_key": session.cancel_key,
                    "address": list(session.address) if isinstance(session.address, tuple) else session.address,
                    "connected_at": session.connected_at, "transaction_mode": session.transaction_mode,
                    "linked_once": session.linked_once, "variant": session.pool.variant})}
    except TypeError as exc:
        log.warning("client %s cannot be handed over: %s", session._where(), exc)
        return None


def resume_session(proxy, record: dict, fd: int) -> Session:
    """The session of a client another process exported (`export_record`) on its connection `fd`, registered with
    its cancel key and ready to serve from its next request (Session.resume). `fd` is this function's: closed here
    when the session cannot be resumed."""
    raw = None
    try:
        rt = next((rt for rt in proxy.listeners if rt.config.name == record["listener"]), None)
        if rt is None:
            raise HandoverError(f"no listener {record['listener']!r} here")
        facts = decode(record["session"])
        raw = _socket.socket(fileno=fd)
        address = facts["address"]
        session = Session(proxy, rt, ClientSocket(raw), tuple(address) if isinstance(address, list) else address)
        session.cancel_key = facts["cancel_key"]
        session.user, session.database = facts["user"], facts["database"]
        session.connected_at = facts["connected_at"]
        session.transaction_mode = facts["transaction_mode"]
        session.linked_once = facts["linked_once"]
        session.proto = rt.engine.resume_client(session.client_context(), record["state"])
        session.pool = proxy.pool_for(rt, session.user, session.database, facts["variant"])
    except BaseException:
        if raw is not None:
            raw.close()
        else:
            os.close(fd)
        raise
    proxy.session_started(session)
    return session


def session_source(session) -> str:
    """The client's address as the per-address connection count knows it."""
    address = session.address
    return address[0] if isinstance(address, tuple) else str(address)


def _why_stays(session) -> str:
    """Why a session was not handed over, for the log."""
    if type(session.sock) is not ClientSocket:
        return "TLS"
    if session.pool is None or session.proto is None:
        return "logging in or on the admin console"
    if session.backend is not None:
        if not session.transaction_mode:
            return "session pool mode"          # its backend is its own for the whole connection: it cannot move
        return "pinned" if session.proto.pinned else "a request or transaction under way"
    return session.proto.handover_refusal() or "busy"


def admit_caller(conn, busy: bool) -> bool:
    """Whether a connection to the takeover socket may go on; if not, it is told why (a takeover already under way)
    or, from another user, closed with a log line."""
    if busy:
        try:
            send_record(conn, {"type": "refused", "reason": "a takeover of this process is already under way"})
        except OSError:
            pass
        conn.close()
        return False
    if not _same_user(conn):
        log.warning("takeover: refused a connection from another user")
        conn.close()
        return False
    return True


def _same_user(conn) -> bool:
    """Only the process's own user (or root) may take it over (the socket is 0600 too)."""
    try:
        creds = conn.getsockopt(_stdsocket.SOL_SOCKET, _stdsocket.SO_PEERCRED, 12)
    except OSError:
        return False
    uid = int.from_bytes(creds[4:8], "little")
    return uid in (os.getuid(), 0)


# ---------------------------------------------------------------- the new process

class Takeover:
    """The new process's side: connect, check that both run the same listeners, take the listening sockets, then
    the clients (`receive_clients`, once this process accepts)."""

    def __init__(self, proxy, path: str):
        self.proxy = proxy
        self.path = path
        self.conn = None
        self.reader = None
        self.peer = None
        self.listen_sockets: dict = {}
        self.admin_socket = None           # the admin HTTP server's listening socket
        self.sending = Semaphore()         # one record at a time (cancels come from any client's greenlet)
        self.taken = 0
        self.summary: dict = {}

    def connect(self) -> dict:
        """Up to the listening sockets; returns them by listener name. Raises TakeoverError (nothing taken)."""
        proxy = self.proxy
        conn = socket.socket(_stdsocket.AF_UNIX, _stdsocket.SOCK_STREAM)
        self.conn, self.reader, offer = connect_and_negotiate(conn, self.path, _listener_facts(proxy),
                                                              proxy.config.proxy.admin_listen)
        self.peer = offer.peer
        if offer.cancel_counter is not None:
            # Keys the old process gave stay valid here: this process's keys start after them.
            proxy._cancel_counter = itertools.count(offer.cancel_counter + 1)
        if offer.admin_fd is not None:
            self.admin_socket = socket.socket(fileno=offer.admin_fd)
            self.admin_socket.setblocking(False)
        for name, fd in offer.listen_fds.items():
            sock = socket.socket(fileno=fd)
            sock.setblocking(False)
            self.listen_sockets[name] = sock
        return self.listen_sockets

    def accepting(self) -> None:
        """This process accepts on the listeners: the old one may stop, and send its clients."""
        send_record(self.conn, {"type": "accepting"})

    def receive_clients(self, on_done=None) -> None:
        """Serve each client the old process sends until its done record, then call `on_done`; until the old process
        exits, pass it the cancels for keys not known here (its clients that stayed)."""
        proxy = self.proxy
        reader = self.reader
        proxy.cancel_elsewhere = self.pass_cancel
        try:
            while True:
                record, fds = reader.read()
                kind = record.get("type")
                if kind == "done":
                    self.summary = record
                    self._log_done()
                    if on_done is not None:
                        on_done()
                    continue
                if kind != "client" or len(fds) != 1:
                    for fd in fds:
                        os.close(fd)
                    log.warning("takeover: ignored a %r record", kind)
                    continue
                try:
                    self.adopt(record, fds[0])
                except Exception:  # one client that cannot be resumed must not stop the others
                    log.exception("takeover: a client of listener %s could not be resumed; it is closed",
                                  record.get("listener"))
        except (HandoverError, OSError) as exc:
            if not self.summary:
                log.warning("takeover: the old process ended the handover early: %s", exc)
                self._log_done()
                if on_done is not None:
                    on_done()
            else:
                log.info("takeover: the old process (pid %s) has exited", self.peer)
        finally:
            proxy.cancel_elsewhere = None
            reader.close_unclaimed()
            self.conn.close()

    def _log_done(self) -> None:
        summary = self.summary
        log.info("took over %d listeners and %d clients from pid %s (%d clients stayed there, %d of them TLS)",
                 len(self.listen_sockets), self.taken, self.peer, summary.get("stayed", 0), summary.get("tls", 0))
        console = getattr(self.proxy, "console", None)
        if console is not None:         # the admin console's SHOW EVENTS
            console.record("takeover", from_pid=self.peer, listeners=len(self.listen_sockets), clients=self.taken,
                           stayed=summary.get("stayed", 0))
        systemd.notify(f"STATUS=took over {self.taken} clients from pid {self.peer}")

    def pass_cancel(self, key, engine, terminate: bool) -> bool:
        """A cancel for a key not known here: the old process may still serve that client (Proxy.cancel_elsewhere)."""
        try:
            with self.sending:
                send_record(self.conn, cancel_record(key, engine, terminate))
        except (OSError, TypeError, ValueError):
            return False
        return True

    def adopt(self, record: dict, fd: int) -> Session:
        """Serve a client handed over by the old process: its session resumes from its next request. The connection
        (`fd`) is this method's: closed here when the session cannot be resumed."""
        proxy = self.proxy
        session = resume_session(proxy, record, fd)
        self.taken += 1
        _counts(proxy)["taken_over"] += 1
        gevent.spawn(proxy.serve_session, session.runtime, session, session_source(session), session.resume)
        return session


class Offer:
    """What the running process handed over in the first part of a takeover: its pid, its cancel-key counter, the
    listening sockets' descriptors by listener name and the admin server's."""

    def __init__(self, peer, cancel_counter, listen_fds: dict, admin_fd):
        self.peer = peer
        self.cancel_counter = cancel_counter
        self.listen_fds = listen_fds
        self.admin_fd = admin_fd


def connect_and_negotiate(conn, path: str, listeners: list, admin_listen: str):
    """The new side's first part of a takeover on `conn` (an unconnected AF_UNIX stream socket, gevent's or the
    plain one: a supervisor's): connect to `path`, hello both ways, compare the listener lists, ready, and take the
    listening sockets. Returns (conn, its RecordReader, Offer); raises TakeoverError (NobodyRunning when no process
    listens at `path`) after closing `conn`: then nothing was taken."""
    if not path:
        conn.close()
        raise TakeoverError("proxy.takeover_socket is empty (takeovers disabled): set it to the running process's "
                            "takeover socket")
    conn.settimeout(CONNECT_TIMEOUT)
    try:
        conn.connect(path)
    except OSError as exc:
        conn.close()
        raise NobodyRunning(f"cannot reach a running multiproxy at {path} ({exc.strerror or exc}): is one running "
                            "with this config (the same proxy.takeover_socket)?") from None
    reader = RecordReader(conn)
    try:
        send_record(conn, hello(os.getpid(), multiproxy=__version__, listeners=listeners, admin_listen=admin_listen))
        record, _ = reader.read()
        if record.get("type") == "refused":
            raise TakeoverError(f"the running process refused: {record.get('reason')}")
        try:
            check_hello(record, "running process")
        except HandoverError as exc:
            send_record(conn, {"type": "refused", "reason": str(exc)})
            raise TakeoverError(str(exc)) from None
        peer = record.get("pid")
        problem = _listener_mismatch(record.get("listeners", []), listeners)
        if problem:
            send_record(conn, {"type": "refused", "reason": problem})
            raise TakeoverError(f"the running process (pid {peer}) serves other listeners: {problem}; a takeover "
                                "keeps the listeners as they are: change them with a reload (SIGHUP) before or after "
                                "it")
        counter = record.get("cancel_counter")
        send_record(conn, {"type": "ready"})
        record, fds = reader.read()
        if record.get("type") != "listeners":
            for fd in fds:
                os.close(fd)
            raise HandoverError(f"expected the listening sockets, got {record.get('type')!r}")
        admin_fd = fds.pop() if record.get("admin") and fds else None
        listen_fds = dict(zip(record["names"], fds))
    except (HandoverError, OSError) as exc:
        conn.close()
        raise TakeoverError(f"the takeover from {path} failed: {exc}") from None
    except TakeoverError:
        conn.close()
        raise
    conn.settimeout(None)
    return conn, reader, Offer(peer, counter if isinstance(counter, int) else None, listen_fds, admin_fd)


def cancel_record(key, engine, terminate: bool) -> dict:
    """A cancel passed to the old process, with its engine's name when known (a group's supervisor routes it to the
    worker that issued the key)."""
    return {"type": "cancel", "key": encode(key), "terminate": bool(terminate),
            "engine": getattr(engine, "name", None)}


def _listener_mismatch(theirs: list, ours: list) -> str:
    """What differs between two listener lists (name, address, engine), or ""."""
    def key(items):
        return {item["name"]: (tuple(item["listen"]), item["engine"]) for item in items}
    a, b = key(theirs), key(ours)
    problems = []
    for name in sorted(a.keys() - b.keys()):
        problems.append(f"listener {name!r} runs there but is not in this config")
    for name in sorted(b.keys() - a.keys()):
        problems.append(f"listener {name!r} of this config does not run there")
    for name in sorted(a.keys() & b.keys()):
        if a[name] != b[name]:
            (host, port), engine = a[name]
            (host2, port2), engine2 = b[name]
            problems.append(f"listener {name!r} is {engine} on {host}:{port} there, {engine2} on {host2}:{port2} here")
    return "; ".join(problems)


def take_over(proxy, required: bool = True) -> Takeover | None:
    """Connect to the running process of `proxy`'s config and take its listening sockets (Takeover.connect). Not
    `required`: None when no process listens on the takeover socket (this one then starts as without a takeover)."""
    takeover = Takeover(proxy, socket_path(proxy.config))
    try:
        takeover.connect()
    except NobodyRunning as exc:
        if required:
            raise
        log.info("takeover: %s; starting without one", exc)
        return None
    return takeover


class ProcessTakeovers:
    """What one proxy process does about takeovers in its life: start with one (`take_over`: True, or "if-running"),
    and listen for the next (`listen`: a process alone, not a forked worker). The process model calls `start_proxy`
    instead of Proxy.start, `ready` once it serves, and `finish` when it is told to end."""

    def __init__(self, proxy, take_over: bool | str = False, listen: bool = True):
        self.proxy = proxy
        self.take_over = take_over
        path = socket_path(proxy.config) if listen else ""
        self.listener = TakeoverListener(proxy, path) if path else None
        self.donor: Takeover | None = None

    def start_proxy(self, listen_sockets=None, admin_socket=None) -> None:
        """Start the proxy: on the listening sockets a takeover brings (TakeoverError when it cannot), else on
        `listen_sockets` and `admin_socket` (a supervisor's) or its own; then listen for the next takeover, unless one
        is under way."""
        proxy = self.proxy
        if self.take_over:
            self.donor = take_over(proxy, required=self.take_over != "if-running")
        if self.donor is not None:
            proxy.start(self.donor.listen_sockets, self.donor.admin_socket)
            self.donor.accepting()
        else:
            proxy.start(listen_sockets, admin_socket)
            if self.listener is not None:
                self.listener.start()

    def ready(self, status: str) -> bool:
        """The process serves. After a takeover: tells systemd this is the service's main process now, and ready
        (True: the caller sends nothing more), and receives the clients."""
        donor = self.donor
        if donor is None:
            return False
        systemd.notify("READY=1", MAINPID=os.getpid(), STATUS=f"{status}, taken over from pid {donor.peer}")

        def taken_over():
            if self.listener is not None and not self.proxy.shutdown_requested.is_set():
                self.listener.start()       # the old process has let go of the socket's path
        gevent.spawn(donor.receive_clients, taken_over)
        return True

    def finish(self) -> bool:
        """The process is to end: no more takeovers. True when it ends because it was taken over (the service goes on,
        in the new process: no STOPPING=1)."""
        if self.listener is None:
            return False
        self.listener.close()
        return self.listener.handed_over
