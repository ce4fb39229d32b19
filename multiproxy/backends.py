"""Backend connections: opening a socket, driving an engine's login script over it, and reading what the backend sends."""
from __future__ import annotations

import logging
import socket as _stdsocket
import time

import gevent
from gevent import socket

from .engine import BackendError, BackendScript, BackendTarget
from .fastio import fast_recv, fast_sendall

log = logging.getLogger("multiproxy.backend")
RECV_SIZE = 65536


def open_socket(host: str, port: int, timeout: float) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=timeout)
    sock.setsockopt(_stdsocket.IPPROTO_TCP, _stdsocket.TCP_NODELAY, 1)
    return sock


def run_script(sock, script: BackendScript, target: BackendTarget, timeout: float):
    """Drive a sans-IO backend script over `sock` to its end; returns (socket, script). TLS upgrades swap the socket."""
    deadline = time.monotonic() + timeout
    out = script.start()
    if out:
        sock.sendall(out)
    while not script.done:
        if script.wants_tls:
            ctx = target.tls_context_factory() if target.tls_context_factory else None
            if ctx is None:
                raise BackendError("backend offered TLS but no TLS context is configured")
            from gevent import ssl as gssl
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            sock = gssl.SSLContext.wrap_socket(ctx, sock, server_hostname=target.host if ctx.check_hostname else None)
            out = script.tls_established()
            if out:
                sock.sendall(out)
            continue
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise BackendError(f"backend {target.host}:{target.port} did not finish the conversation within {timeout:g} s")
        sock.settimeout(remaining)
        data = sock.recv(RECV_SIZE)
        if not data:
            raise BackendError(f"backend {target.host}:{target.port} closed the connection during login")
        out = script.feed(data)
        if out:
            sock.sendall(out)
    sock.settimeout(None)
    return sock, script


def _no_reader() -> None:
    """The stand-in reader of a connection lent to a relay lane (never runs)."""


class BackendConnection:
    """One logged-in backend connection. A reader greenlet hands what the backend sends to the linked session."""

    __slots__ = ("sock", "state", "address", "pool", "session", "created", "last_used", "closed", "reader",
                 "user", "database", "sendall", "_expected_close", "generation", "lent")

    def __init__(self, sock, state, address, pool, user, database, generation=0):
        self.sock = sock
        self.state = state
        self.address = address
        self.pool = pool
        self.session = None
        self.created = self.last_used = time.monotonic()
        self.closed = False
        self.user = user
        self.database = database
        self.sendall = fast_sendall(sock)
        self._expected_close = False
        self.generation = generation
        self.lent = False               # served by a relay lane (multiproxy.relay_lanes): no reader greenlet
        self.reader = gevent.spawn(self._read_loop)

    def lend(self) -> None:
        """A relay lane serves this connection from now on: its reader greenlet stops (at once, or, when it is the
        caller, as soon as it returns to its loop)."""
        self.lent = True
        reader = self.reader
        self.reader = gevent.Greenlet(_no_reader)      # never started: stands in for the reader until unlend
        if reader is not gevent.getcurrent():
            reader.kill(block=False)

    def unlend(self, reader: bool = True) -> None:
        """The relay lane gave this connection back: a reader greenlet serves it again (unless `reader` is False:
        it is closed or discarded next)."""
        self.lent = False
        if reader:
            self.reader = gevent.spawn(self._read_loop)

    def _read_loop(self):
        me = gevent.getcurrent()
        recv = fast_recv(self.sock)
        while True:
            try:
                data = recv(RECV_SIZE)
            except (OSError, ValueError):
                data = b""
            if not data:
                if self._expected_close:
                    self._closed_by_backend()
                    return
                self._lost("the backend closed the connection")
                return
            if self._expected_close:
                continue        # what the backend says on its way out
            session = self.session
            if session is None:
                self._lost("the backend sent data while idle in the pool")
                return
            session.on_backend_data(self, data)
            if self.reader is not me:
                return          # lent to a relay lane meanwhile (lend)

    def _lost(self, why: str):
        if self.closed:
            return
        self._close_socket()
        session = self.session
        self.session = None
        if session is not None:
            session.on_backend_lost(self, why)
        self.pool.forget(self, why)

    def fail(self, why: str):
        """Cut this connection on purpose while it serves a client (failover): the client hears `why`."""
        if self.reader is not gevent.getcurrent():
            self.reader.kill(block=False)
        self._lost(why)

    def close_gracefully(self, timeout: float) -> None:
        """Close on purpose and tell the pool (closed_gracefully) once the backend has closed its end too, so that
        a slot made for another connection is not reused while the server still counts this one: the backend reads
        end-of-file and ends the session. After `timeout` without that, the socket is closed anyway."""
        self._expected_close = True
        self.session = None
        try:
            self.sock.shutdown(_stdsocket.SHUT_WR)
        except OSError:
            self._closed_by_backend()
            return
        gevent.spawn_later(timeout, self._closed_by_backend)

    def _closed_by_backend(self) -> None:
        if self.closed:
            return
        self._close_socket()
        if self.reader is not gevent.getcurrent():
            self.reader.kill(block=False)
        self.pool.closed_gracefully(self)

    def _close_socket(self) -> None:
        self.closed = True
        try:
            self.sock.close()
        except OSError:
            pass

    def close(self):
        """Close on purpose (reset failed, pool shrinking, client left mid-transaction): the backend rolls back."""
        if self.closed:
            return
        self.session = None
        self._close_socket()
        if self.reader is not gevent.getcurrent():
            self.reader.kill(block=False)
