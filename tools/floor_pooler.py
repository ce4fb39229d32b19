"""The least a gevent transaction pooler must do for `pgbench -S`: a reference floor for tools/bench.py.

It serves only what pgbench sends (SSLRequest, a trust-auth startup, simple Query, Terminate) and
nothing else: no authentication, no parameter tracking, no pinning, no errors, no timeouts, one pool
logged in as one user. Every client gets the greeting of the first backend; each Query borrows a backend
(LIFO, waiting in line when all are busy), is relayed up to its ReadyForQuery and gives it back. It uses
the same gevent mechanics as multiproxy (raw accept, multiproxy.fastio.ClientSocket, parked greenlets),
so its CPU per connection is what the event loop, greenlets and sockets cost before any feature: the
part of multiproxy's cost that Python code on gevent cannot shed. Not for production.

`--relay c` hands the listening socket and the backends to multiproxy.relay_core's compiled Relay: it
accepts, declines SSL, greets every client whose startup packet Python greeted once before, lends a
backend per transaction (taking it back at ReadyForQuery), relays, and closes clients at Terminate, all
in C, one run_ready() per wake-up of its epoll fd in gevent's loop; Python greets the first client of
each startup packet and hears of EOF or errors mid-transaction. `--relay twin` runs the same with the
relay core's pure-Python twin. `--relay c-thread`: the compiled relay serves its sockets in a thread of
its own without the GIL (no Python per wake-up either). `--relay python` (the default) is the greenlet path.
"""
from __future__ import annotations

import _socket
import argparse
import collections
import os
import struct
import sys

import gevent
from gevent import socket
from greenlet import getcurrent

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from multiproxy.fastio import ClientSocket  # noqa: E402
from multiproxy import relay_core  # noqa: E402

READY_IDLE = b"Z\x00\x00\x00\x05I"
TERMINATE = ord("X")
SSL_REQUEST = struct.pack("!II", 8, 80877103)
CANCEL_KEY = b"K\x00\x00\x00\x0c\x00\x00\x00\x01\x00\x00\x00\x02"


def _address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected host:port, got {text!r}")
    return host, int(port)


def _read_until_ready(sock) -> bytes:
    """Bytes from a backend up to and including a ReadyForQuery in idle state."""
    data = sock.recv(65536)
    while not data.endswith(READY_IDLE):
        more = sock.recv(65536)
        if not more:
            raise ConnectionError("backend closed the connection")
        data += more
    return data


def _login(backend: tuple[str, int], user: str, database: str) -> tuple[socket.socket, bytes]:
    """A backend logged in with trust auth, and its greeting without BackendKeyData and ReadyForQuery."""
    sock = socket.create_connection(backend)
    sock.setsockopt(_socket.IPPROTO_TCP, _socket.TCP_NODELAY, 1)
    body = struct.pack("!I", 196608) + b"user\0" + user.encode() + b"\0database\0" + database.encode() + b"\0\0"
    sock.sendall(struct.pack("!I", len(body) + 4) + body)
    reply = _read_until_ready(sock)
    greeting, pos = [], 0
    while pos < len(reply):
        kind, length = reply[pos:pos + 1], struct.unpack_from("!I", reply, pos + 1)[0]
        if kind not in (b"K", b"Z"):
            greeting.append(reply[pos:pos + 1 + length])
        pos += 1 + length
    return sock, b"".join(greeting)


class FloorPooler:
    def __init__(self, backends: list, greeting: bytes):
        self.idle = backends
        self.waiting: collections.deque = collections.deque()
        self.welcome = greeting + CANCEL_KEY + READY_IDLE
        self.parked: list = []

    def borrow(self):
        if self.idle:
            return self.idle.pop()
        me = getcurrent()
        self.waiting.append(me)
        return me.parent.switch()

    def release(self, backend) -> None:
        if self.waiting:
            gevent.get_hub().loop.run_callback(self.waiting.popleft().switch, backend)
        else:
            self.idle.append(backend)

    def serve_client(self, client: ClientSocket) -> None:
        data = client.recv(16384)
        if len(data) == 8:                          # SSLRequest: no
            client.sendall(b"N")
            data = client.recv_later(16384)
        if not data:
            return
        client.sendall(self.welcome)
        while True:
            data = client.recv_later(65536)
            if not data or data[0] == TERMINATE:
                return
            backend = self.borrow()
            try:
                backend.sendall(data)
                answer = _read_until_ready(backend)
            finally:
                self.release(backend)
            client.sendall(answer)

    def client_greenlet(self, client: ClientSocket) -> None:
        switch_to_hub = gevent.get_hub().switch
        me = getcurrent()
        while True:
            try:
                self.serve_client(client)
            except OSError:
                pass
            finally:
                client.close()
            self.parked.append(me)
            client = switch_to_hub()

    def accept_forever(self, listener: socket.socket) -> None:
        hub = gevent.get_hub()
        run_callback = hub.loop.run_callback
        raw_accept = listener._sock._accept
        while True:
            listener._wait(listener._read_event)
            while True:
                try:
                    fd, _ = raw_accept()
                except BlockingIOError:
                    break
                client = ClientSocket(_socket.socket(listener.family, _socket.SOCK_STREAM, 0, fd), hub)
                if self.parked:
                    run_callback(self.parked.pop().switch, client)
                else:
                    gevent.spawn_raw(self.client_greenlet, client)


class CoreFloorPooler(FloorPooler):
    """The floor on the relay core: the relay accepts, greets (after Python greeted the first client with the
    same startup packet), relays and hangs up; Python hears only of what the relay cannot do."""

    def __init__(self, backends: list, greeting: bytes, relay_class, walker_class, login, threaded=False):
        super().__init__([], greeting)
        self.relay = relay_class(*relay_core.postgres_walkers(walker_type=walker_class), threaded=threaded)
        self.login = login
        self.owned: dict = {}                       # fd -> socket object, for the sockets Python gave the relay
        self.backend_fds: set = set()
        for backend in backends:
            self.add_backend(backend)
        self.watcher = gevent.get_hub().loop.io(self.relay.fileno(), 1)
        self.watcher.start(self.on_ready)

    def add_backend(self, backend) -> None:
        fd = backend.fileno()
        self.owned[fd] = backend
        self.backend_fds.add(fd)
        self.handle(self.relay.add_backend(fd))

    def replace_backend(self) -> None:
        backend, _ = self.login()
        self.add_backend(backend)

    def on_ready(self) -> None:
        events = self.relay.run_ready()
        if events:
            self.handle(events)

    def handle(self, events: list) -> None:
        """A startup packet the relay has no greeting for is greeted here; for the rest (EOF or errors mid-
        transaction, a backend speaking out of turn) close what the relay gave back, replacing lost backends."""
        for kind, fd, peer_fd, data, _arg in events:
            if kind == relay_core.STARTUP:
                gevent.spawn(self.greet, fd, data)
                continue
            for gone in (fd, peer_fd):
                if gone < 0:
                    continue
                sock = self.owned.pop(gone, None)
                if sock is None:                    # a client the relay accepted itself
                    os.close(gone)
                    continue
                sock.close()
                if gone in self.backend_fds:
                    self.backend_fds.discard(gone)
                    gevent.spawn(self.replace_backend)

    def greet(self, fd: int, data: bytes) -> None:
        client = ClientSocket(_socket.socket(fileno=fd))
        size = struct.unpack_from("!I", data)[0]
        try:
            client.sendall(self.welcome)
        except OSError:
            client.close()
            return
        self.relay.cache_greeting(data[:size], self.welcome)
        self.owned[fd] = client
        self.handle(self.relay.add_client(fd, data[size:]))

    def accept_forever(self, listener: socket.socket) -> None:
        self.handle(self.relay.listen(listener.fileno(), refuse=SSL_REQUEST, refusal=b"N", hangup=b"X"))
        while True:
            gevent.sleep(3600)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", type=_address, required=True, help="host:port to accept pgbench on")
    parser.add_argument("--backend", type=_address, required=True, help="PostgreSQL host:port (trust auth)")
    parser.add_argument("--user", default="bench")
    parser.add_argument("--database", default="bench")
    parser.add_argument("--pool-size", type=int, default=16)
    parser.add_argument("--relay", choices=("python", "c", "c-thread", "twin"), default="python",
                        help="python: greenlets relay each transaction; c: the compiled relay core in gevent's loop; "
                             "c-thread: the compiled relay core in a thread of its own; "
                             "twin: the relay core's pure-Python twin")
    args = parser.parse_args(argv)
    if args.relay.startswith("c") and relay_core.IMPLEMENTATION != "c":
        parser.error(f"--relay {args.relay}: the compiled multiproxy._relay is not built "
                     "(python3 setup.py build_ext --inplace)")
    backends, greeting = [], b""
    for _ in range(args.pool_size):
        sock, greeting = _login(args.backend, args.user, args.database)
        backends.append(sock)
    listener = socket.socket()
    listener.setsockopt(_socket.SOL_SOCKET, _socket.SO_REUSEADDR, 1)
    listener.setsockopt(_socket.IPPROTO_TCP, _socket.TCP_NODELAY, 1)    # inherited by accepted sockets
    listener.bind(args.listen)
    listener.listen(1024)
    if args.relay == "python":
        pooler = FloorPooler(backends, greeting)
    else:
        classes = ((relay_core.Relay, relay_core.Walker) if args.relay.startswith("c")
                   else (relay_core.PyRelay, relay_core.PyWalker))
        pooler = CoreFloorPooler(backends, greeting, *classes, threaded=args.relay == "c-thread",
                                 login=lambda: _login(args.backend, args.user, args.database))
        print(f"floor pooler: relay core {args.relay}", file=sys.stderr, flush=True)
    pooler.accept_forever(listener)


if __name__ == "__main__":
    main()
