"""Accepting client connections: a lean accept loop that spawns one greenlet per client."""
from __future__ import annotations

import errno
import logging

import gevent
from gevent import socket

log = logging.getLogger("multiproxy.acceptor")
_RESOURCE_ERRORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


class Acceptor:
    """Accepts on a listening socket and runs `handle(sock, address)` in a new greenlet per client.

    Leaner than gevent's StreamServer (no pool, no per-connection bookkeeping): it accepts every
    pending connection each time the socket is readable, then waits again.
    """

    def __init__(self, listen_socket: socket.socket, handle):
        self.sock = listen_socket
        self.handle = handle
        self.greenlet = None

    def start(self) -> None:
        self.greenlet = gevent.spawn(self._loop)

    def _loop(self) -> None:
        listener = self.sock
        listener.settimeout(None)          # wait as long as it takes (the OS socket stays non-blocking)
        raw_accept = listener._sock._accept
        wait, event = listener._wait, listener._read_event
        family = listener.family
        make_socket = socket.socket
        spawn = gevent.spawn_raw          # no Greenlet object: _run handles its own errors
        handle = self.handle
        while True:
            wait(event)
            while True:
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
                spawn(_run, handle, make_socket(family, socket.SOCK_STREAM, 0, fileno=fd), address)

    def close(self) -> None:
        if self.greenlet is not None:
            self.greenlet.kill(block=False)
            self.greenlet = None
        try:
            self.sock.close()
        except OSError:
            pass


def _run(handle, sock, address) -> None:
    try:
        handle(sock, address)
    except Exception:  # one client's failure must never reach the hub
        log.exception("client %s: unexpected error", address[0] if isinstance(address, tuple) else address)
    finally:
        sock.close()
