"""Socket send and receive with fewer system calls and less Python than gevent's generic ones, for the hot path.

gevent's recv tries the system call first and waits only when it would block; in a request/response
relay the data is almost never there yet, so that first try is a wasted system call. Its sendall asks
the kernel for the send buffer size on every call. These helpers wait first and send directly,
falling back to gevent's own methods for partial sends. TLS sockets keep gevent's methods.

`ClientSocket` is what the acceptor gives each plaintext client: the OS socket with one read watcher
(the write watcher is made only if a send ever blocks), about a third of what a gevent socket costs to
set up and tear down. A client that upgrades to TLS is handed over as a gevent socket (`to_gevent`).
An idle client's socket can be parked: its read watcher then calls a function from the hub when the client
sends (or the connection is closed) instead of waking a waiting greenlet, so that no greenlet waits for it.
"""
from __future__ import annotations

import _socket
import ssl

from gevent import socket as gsocket
from gevent._hub_primitives import wait_on_socket
from gevent._socketcommon import cancel_wait_ex
from gevent.hub import get_hub


class ClientSocket:
    """A non-blocking client connection driven from one greenlet (the session's), written from two."""

    __slots__ = ("_sock", "hub", "timeout", "_read_event", "_write_event", "parked", "__weakref__")

    _wait = wait_on_socket          # gevent's wait on a watcher, honouring self.timeout

    def __init__(self, raw: _socket.socket, hub=None):
        raw.setblocking(False)
        self._sock = raw
        self.hub = hub or get_hub()
        self.timeout = None
        self._read_event = self.hub.loop.io(raw.fileno(), 1)
        self._write_event = None
        self.parked = False             # no greenlet waits: the read watcher calls park()'s function instead

    @property
    def closed(self) -> bool:
        return self._read_event is None

    def fileno(self) -> int:
        return self._sock.fileno()

    # -- parking

    def park(self, on_readable, arg) -> None:
        """Wait for the client with no greenlet: `on_readable(arg)` is called from the hub once the client sent
        something or the connection ended, or on the next loop turn after close(); the socket is unparked then."""
        self.parked = True
        self._read_event.start(self._readable, on_readable, arg)

    def _readable(self, on_readable, arg) -> None:
        self.unpark()
        on_readable(arg)

    def unpark(self) -> None:
        """Stop the parked wait without calling its function (the caller serves or lets go of the client)."""
        self.parked = False
        watcher = self._read_event
        if watcher is not None:
            watcher.stop()

    # -- reading

    def recv(self, size: int) -> bytes:
        """Try first: for data that has probably arrived already (a client's first packet)."""
        try:
            return self._sock.recv(size)
        except BlockingIOError:
            pass
        return self.recv_later(size)

    def recv_later(self, size: int) -> bytes:
        """Wait first: for an answer that cannot have arrived yet."""
        raw_recv = self._sock.recv
        while True:
            self._wait(self._read_event)
            try:
                return raw_recv(size)
            except BlockingIOError:
                continue

    def interrupt(self, error: BaseException) -> None:
        """Raise `error` in the greenlet waiting to read from this socket, if one is (a deadline passed)."""
        watcher = self._read_event
        if watcher is not None and watcher.callback is not None:
            self.hub.cancel_wait(watcher, error)

    # -- writing

    def sendall(self, data) -> None:
        try:
            sent = self._sock.send(data)
        except BlockingIOError:
            sent = 0
        if sent != len(data):
            self._send_rest(memoryview(data)[sent:])

    def _send_rest(self, view) -> None:
        if self._write_event is None:
            self._write_event = self.hub.loop.io(self._sock.fileno(), 2)
        send = self._sock.send
        while view:
            self._wait(self._write_event)
            try:
                view = view[send(view):]
            except BlockingIOError:
                continue

    # -- the rest of the socket interface the core uses

    def settimeout(self, timeout) -> None:
        self.timeout = timeout

    def shutdown(self, how: int) -> None:
        self._sock.shutdown(how)

    def close(self) -> None:
        """Close; a greenlet waiting on this socket gets gevent's cancel_wait_ex, as with a gevent socket."""
        read_event, write_event = self._read_event, self._write_event
        if read_event is None:
            return
        if self.parked:
            # Nobody waits: the parked function runs on the next loop turn and finds the socket closed.
            on_readable, arg = read_event.args
            self.unpark()
            self.hub.loop.run_callback(on_readable, arg)
        self._read_event = self._write_event = None
        waiting = False
        for watcher in (read_event, write_event):
            if watcher is not None and watcher.callback is not None:
                self.hub.cancel_wait(watcher, cancel_wait_ex, True)
                waiting = True
            elif watcher is not None:
                watcher.close()
        if waiting:
            # The waiter wakes on the next loop turn; the descriptor must stay valid until then.
            self.hub.loop.run_callback(self._sock.close)
        else:
            self._sock.close()

    def to_gevent(self) -> gsocket.socket:
        """This connection as a gevent socket (for TLS wrapping); this object is closed without closing the
        connection."""
        read_event, write_event = self._read_event, self._write_event
        self._read_event = self._write_event = None
        for watcher in (read_event, write_event):
            if watcher is not None:
                watcher.close()
        raw = self._sock
        sock = gsocket.socket(raw.family, _socket.SOCK_STREAM, 0, fileno=raw.detach())
        sock.settimeout(self.timeout)
        return sock


def _raw(sock):
    raw = getattr(sock, "_sock", None)
    if raw is None or isinstance(sock, ssl.SSLSocket) or not hasattr(sock, "_wait"):
        return None
    return raw


def fast_sendall(sock):
    if type(sock) is ClientSocket:
        return sock.sendall
    raw = _raw(sock)
    if raw is None:
        return sock.sendall
    raw_send = raw.send
    slow = sock.sendall

    def sendall(data):
        try:
            sent = raw_send(data)
        except BlockingIOError:
            sent = 0
        if sent != len(data):
            slow(memoryview(data)[sent:])
    return sendall


def fast_recv(sock):
    if type(sock) is ClientSocket:
        return sock.recv_later
    raw = _raw(sock)
    if raw is None:
        return sock.recv
    raw_recv = raw.recv
    wait = sock._wait
    event = sock._read_event

    def recv(size):
        while True:
            wait(event)
            try:
                return raw_recv(size)
            except BlockingIOError:
                continue
    return recv
