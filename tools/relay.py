"""A bare gevent TCP byte relay: the throughput floor of any gevent forwarder, for tools/bench.py."""
import argparse
import socket
import sys

import gevent
from gevent import socket as gsocket
from gevent.server import StreamServer


def _address(text):
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected host:port, got {text!r}")
    return host, int(port)


def _pump(src, dst):
    """Copy bytes from src to dst until src reaches end of stream, then pass the half-close on."""
    recv = src.recv
    sendall = dst.sendall
    try:
        while True:
            data = recv(65536)
            if not data:
                break
            sendall(data)
    except OSError:
        pass
    try:
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def make_server(listen, backend):
    def handle(client, _peer):
        try:
            upstream = gsocket.create_connection(backend)
        except OSError:
            client.close()
            return
        # Without NODELAY every small protocol message waits on Nagle + delayed ACK.
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        back = gevent.spawn(_pump, upstream, client)
        _pump(client, upstream)
        back.join()
        upstream.close()
        client.close()

    return StreamServer(listen, handle, backlog=1024)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--listen", type=_address, required=True, help="host:port to accept clients on")
    parser.add_argument("--backend", type=_address, required=True, help="host:port to connect each client to")
    args = parser.parse_args(argv)
    server = make_server(args.listen, args.backend)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
