"""Socket send and receive with fewer system calls than gevent's generic ones, for the relay's hot path.

gevent's recv tries the system call first and waits only when it would block; in a request/response
relay the data is almost never there yet, so that first try is a wasted system call. Its sendall asks
the kernel for the send buffer size on every call. These helpers wait first and send directly,
falling back to gevent's own methods for partial sends. TLS sockets keep gevent's methods.
"""
from __future__ import annotations

import ssl


def _raw(sock):
    raw = getattr(sock, "_sock", None)
    if raw is None or isinstance(sock, ssl.SSLSocket) or not hasattr(sock, "_wait"):
        return None
    return raw


def fast_sendall(sock):
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
