"""Hostile MySQL clients under live traffic: malformed handshakes, wrong sequence ids, a 16 MiB packet cut short,
oversized lengths, silence mid-handshake, disconnects mid-transaction. Each gets a clear ERR or a clean close; the
backend is rolled back or discarded; other clients carry on."""
from __future__ import annotations

import socket
import time

import pytest

from multiproxy_engines.mysql import protocol as p

try:
    from .mysqlkit import connect, direct, metric, metrics_text, query, start_proxy, wait_for
except ImportError:
    from mysqlkit import connect, direct, metric, metrics_text, query, start_proxy, wait_for

CAPS = (p.CLIENT_PROTOCOL_41 | p.CLIENT_SECURE_CONNECTION | p.CLIENT_PLUGIN_AUTH | p.CLIENT_CONNECT_WITH_DB
        | p.CLIENT_TRANSACTIONS | p.CLIENT_LONG_PASSWORD)


def read_packet(sock) -> tuple[int, bytes]:
    head = _read(sock, 4)
    length, seq = p.header(head)
    return seq, _read(sock, length)


def _read(sock, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            raise ConnectionError(f"closed after {len(out)} of {n} bytes")
        out += chunk
    return out


def closed(sock, timeout: float = 5.0) -> bool:
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
        return True
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


def raw_login(proxy) -> socket.socket:
    """A logged-in raw connection (the listener trusts: no scramble needed)."""
    sock = socket.create_connection((proxy.host, proxy.port), timeout=10)
    read_packet(sock)
    sock.sendall(p.packet(1, p.handshake_response(CAPS, 45, b"app", b"", b"mpdb", b"mysql_native_password")))
    seq, payload = read_packet(sock)
    assert payload[0] == 0, payload
    return sock


@pytest.fixture
def proxy(mariadb, proxy_factory):
    return start_proxy(proxy_factory, mariadb, max_size=3, auth="trust",
                       proxy={"max_message_size": 1 << 20, "handshake_timeout": 1.0})


@pytest.fixture
def bystander(proxy):
    conn = connect(proxy)
    yield conn
    assert query(conn, "SELECT 'still here'") == [("still here",)]
    conn.close()


def test_malformed_handshake_response(proxy, bystander):
    sock = socket.create_connection((proxy.host, proxy.port), timeout=10)
    read_packet(sock)
    sock.sendall(p.packet(1, b"\x00\x02\x00\x00garbage that is not 32 bytes"))
    seq, payload = read_packet(sock)
    assert payload[0] == 0xFF and b"malformed handshake response" in payload
    assert closed(sock)


def test_wrong_sequence_id_in_the_handshake(proxy, bystander):
    sock = socket.create_connection((proxy.host, proxy.port), timeout=10)
    read_packet(sock)
    sock.sendall(p.packet(5, p.handshake_response(CAPS, 45, b"app", b"", b"mpdb", b"mysql_native_password")))
    _, payload = read_packet(sock)
    assert p.parse_err(payload)[0] == p.ER_NET_PACKETS_OUT_OF_ORDER
    assert closed(sock)


def test_wrong_sequence_id_of_a_command(proxy, bystander):
    sock = raw_login(proxy)
    sock.sendall(p.packet(3, b"\x03SELECT 1"))
    _, payload = read_packet(sock)
    code, state, message = p.parse_err(payload)
    assert code == p.ER_NET_PACKETS_OUT_OF_ORDER and "sequence id 0" in message
    assert closed(sock)


def test_length_larger_than_the_message_limit(proxy, bystander):
    sock = raw_login(proxy)
    sock.sendall((2 << 20).to_bytes(3, "little") + b"\x00\x03SELECT ")       # 2 MiB announced, limit 1 MiB
    _, payload = read_packet(sock)
    code, _, message = p.parse_err(payload)
    assert code == p.ER_NET_PACKET_TOO_LARGE and "max_message_size" in message
    assert closed(sock)


def test_16_mib_continuation_cut_short(mariadb, proxy_factory):
    proxy = start_proxy(proxy_factory, mariadb, max_size=1, auth="trust", proxy={"max_message_size": 64 << 20})
    sock = raw_login(proxy)
    # a COM_QUERY of more than 16 MiB: the first packet full, then the client vanishes in the middle
    sock.sendall(p.MAX_PAYLOAD.to_bytes(3, "little") + b"\x00\x03SELECT '" + b"x" * (1 << 20))
    time.sleep(0.3)
    sock.close()
    # the half-sent backend is discarded, not reused: the next client gets a fresh, working one
    assert wait_for(lambda: metric(metrics_text(proxy), "multiproxy_database_connections_currently_borrowed") == 0)
    conn = connect(proxy)
    assert query(conn, "SELECT 1") == [(1,)]
    conn.close()


def test_client_silent_mid_handshake(proxy, bystander):
    sock = socket.create_connection((proxy.host, proxy.port), timeout=10)
    read_packet(sock)          # the greeting; then nothing
    _, payload = read_packet(sock)
    assert p.parse_err(payload)[0] == p.ER_HANDSHAKE_ERROR
    assert closed(sock)


def test_disconnect_mid_transaction_rolls_back(mariadb, proxy, bystander):
    setup = direct(mariadb)
    query(setup, "CREATE TABLE IF NOT EXISTS mid_tx (a int)")
    query(setup, "DELETE FROM mid_tx")
    sock = raw_login(proxy)
    for sql in (b"BEGIN", b"INSERT INTO mid_tx VALUES (1)"):
        sock.sendall(p.packet(0, b"\x03" + sql))
        _, payload = read_packet(sock)
        assert payload[0] == 0
    sock.close()
    assert wait_for(lambda: query(setup, "SELECT COUNT(*) FROM mid_tx") == [(0,)])
    assert wait_for(lambda: metric(metrics_text(proxy), "multiproxy_database_connections_currently_borrowed") <= 1)
    setup.close()


def test_unsupported_and_unknown_commands_get_an_err(proxy, bystander):
    sock = raw_login(proxy)
    for command in (p.COM_BINLOG_DUMP, 0x42):
        sock.sendall(p.packet(0, bytes((command,)) + b"\x00\x00\x00\x00"))
        _, payload = read_packet(sock)
        assert payload[0] == 0xFF and b"not supported" in payload
    sock.sendall(p.packet(0, b"\x03SELECT 5"))
    seq, payload = read_packet(sock)           # still usable
    assert payload[0] == 1
    sock.close()
