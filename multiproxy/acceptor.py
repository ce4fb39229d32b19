"""Accepting client connections: a lean accept loop that hands each client to a greenlet of its own, reused."""
from __future__ import annotations

import _socket
import errno
import logging

import gevent
from gevent import socket
from greenlet import getcurrent

from .balance import DEFER
from .fastio import ClientSocket

log = logging.getLogger("multiproxy.acceptor")
_RESOURCE_ERRORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
# Greenlets kept parked for the next clients: a new greenlet costs an allocation of its Python frame
# stack (a 16 KiB mmap on CPython 3.11) and its setup, each time; a parked one costs nothing until reused.
MAX_PARKED = 256


class Acceptor:
    """Accepts on a listening socket and runs `handle(sock, address)` in a greenlet per client.

    Leaner than gevent's StreamServer (no pool, no per-connection bookkeeping): it accepts every
    pending connection each time the socket is readable, then waits again. A greenlet whose client
    left, or parked (`handle` returned True: the session waits for its client with no greenlet,
    multiproxy.session), parks itself and serves a later client, or a parked session its client woke
    (`resume`). A relay login door (multiproxy.relay_logins) may accept on the socket instead for a while
    (`pause`/`unpause`): it gives the clients it does not greet itself to `run`, with the bytes it read
    (`accepted_with`).
    """

    def __init__(self, listen_socket: socket.socket, handle, defer=None):
        self.sock = listen_socket
        self.handle = handle
        # A worker of a process group shares the listening socket with the others (multiproxy.balance): `defer()`
        # says whether it has more clients than its share, and then it waits a moment before it accepts, so that a
        # less loaded worker takes the connection. It then takes one connection per wake-up, not every pending one,
        # so that a burst is shared too.
        self.defer = defer
        self.greenlet = None
        self.parked: list = []
        self.door = None                # the relay login door accepting on the socket now, if any

    def start(self) -> None:
        self.greenlet = gevent.spawn(self._loop)

    def _loop(self) -> None:
        listener = self.sock
        listener.settimeout(None)          # wait as long as it takes (the OS socket stays non-blocking)
        raw_accept = listener._sock._accept
        wait, event = listener._wait, listener._read_event
        family = listener.family
        hub = listener.hub
        run_callback = hub.loop.run_callback
        spawn = gevent.spawn_raw           # no Greenlet object: _serve handles its own errors
        parked = self.parked
        make_raw = _socket.socket
        stream = _socket.SOCK_STREAM
        accepted = self._accepted
        defer = self.defer
        while True:
            wait(event)
            if defer is not None and defer():
                gevent.sleep(DEFER)
            taken = 0
            while defer is None or not taken:
                try:
                    fd, address = raw_accept()
                except BlockingIOError:
                    break
                except OSError as exc:
                    if exc.errno in _RESOURCE_ERRORS:
                        log.error("cannot accept clients: %s; retrying in 0.1 s", exc.strerror)
                        gevent.sleep(0.1)
                        break
                    if exc.errno in (errno.ECONNABORTED, errno.EINTR):
                        continue
                    raise
                taken += 1
                sock = ClientSocket(make_raw(family, stream, 0, fd), hub)
                if parked:
                    run_callback(parked.pop().switch, accepted, sock, address)
                else:
                    spawn(self._serve, accepted, sock, address)

    def pause(self, door) -> None:
        """`door` accepts on the socket from now on; this acceptor's loop stops until `unpause`."""
        self.door = door
        if self.greenlet is not None:
            self.greenlet.kill(block=False)
            self.greenlet = None

    def unpause(self, door, resume: bool = True) -> None:
        """`door` let go of the socket: the loop accepts again (`resume`, unless the acceptor was closed)."""
        if self.door is door:
            self.door = None
            if resume and self.greenlet is None and self.sock.fileno() >= 0:
                self.start()

    def run(self, job, first, second) -> None:
        """Run `job(first, second)` in a greenlet of this acceptor's (a client a login door hands over)."""
        parked = self.parked
        if parked:
            self.sock.hub.loop.run_callback(parked.pop().switch, job, first, second)
        else:
            gevent.spawn_raw(self._serve, job, first, second)

    def accepted_with(self, sock, address, data: bytes, answered=None) -> bool:
        """A new client whose first bytes (`data`) were read already (`answered`: how many of them a relay login
        answered, and its SCRAM nonce): served as `_accepted` serves one."""
        parked = False
        try:
            parked = self.handle(sock, address, data, answered) if answered else self.handle(sock, address, data)
        finally:
            if not parked:
                sock.close()
        return parked

    def resume(self, serve, session) -> None:
        """Run `serve(session)` in a greenlet of this acceptor's (a parked session whose client sent something):
        `serve` returns True when the session parked again."""
        parked = self.parked
        if parked:
            self.sock.hub.loop.run_callback(parked.pop().switch, serve, session, None)
        else:
            gevent.spawn_raw(self._serve, serve, session, None)

    def _accepted(self, sock, address) -> bool:
        """A new client: served by `handle`, closed unless its session parked."""
        parked = False
        try:
            parked = self.handle(sock, address)
        finally:
            if not parked:
                sock.close()
        return parked

    def _serve(self, job, first, second) -> None:
        parked = self.parked
        hub_switch = self.sock.hub.switch
        me = getcurrent()
        while True:
            try:
                job(first, second) if second is not None else job(first)
            except Exception:  # one client's failure must never reach the hub
                log.exception("client %s: unexpected error", _where(first, second))
            job = first = second = None
            if len(parked) >= MAX_PARKED or (self.greenlet is None and self.door is None):
                return
            parked.append(me)
            job, first, second = hub_switch()

    def close(self) -> None:
        if self.door is not None:
            self.door.close(resume=False)
        if self.greenlet is not None:
            self.greenlet.kill(block=False)
            self.greenlet = None
        # Parked greenlets are dropped; greenlet ends each with GreenletExit when it is collected.
        del self.parked[:]
        try:
            self.sock.close()
        except OSError:
            pass


def _where(first, second) -> str:
    address = second if second is not None else getattr(first, "address", None)
    return address[0] if isinstance(address, tuple) else str(address)
