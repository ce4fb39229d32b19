"""MemoryTLS, the TLS-on-memory-BIOs helper of the TDS engine and the TDS lab server: two ends talking through it."""
from __future__ import annotations

import ssl

import pytest

from multiproxy_engines.tds.wire.memory_tls import MemoryTLS
from tests.fuzzkit import tds_tls_context


def _client_context() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def _pair() -> tuple[MemoryTLS, MemoryTLS]:
    """A client and a server session with the handshake done, moving the records by hand."""
    client, server = MemoryTLS(_client_context()), MemoryTLS(tds_tls_context(), server_side=True)
    assert client.handshake() is False          # the ClientHello is written, the answer awaited
    to_server = client.pending_output()
    assert to_server
    for _ in range(4):
        server_done = server.handshake(to_server)
        client_done = client.handshake(server.pending_output())
        to_server = client.pending_output()
        if server_done and client_done and not to_server:
            break
    assert server_done and client_done
    assert client.buffered == 0 and server.buffered == 0
    return client, server


def test_encrypt_decrypt_both_ways():
    client, server = _pair()
    assert server.decrypt(client.encrypt(b"LOGIN7")) == b"LOGIN7"
    assert client.decrypt(server.encrypt(b"reply" * 1000)) == b"reply" * 1000


def test_partial_record_waits_for_the_rest():
    client, server = _pair()
    records = client.encrypt(b"abc") + client.encrypt(b"def")
    first, rest = records[:7], records[7:]
    assert server.decrypt(first) == b""
    assert server.decrypt(rest) == b"abcdef"
    assert server.buffered == 0


def test_byte_by_byte():
    client, server = _pair()
    records = client.encrypt(b"x" * 100)
    assert b"".join(server.decrypt(records[i:i + 1]) for i in range(len(records))) == b"x" * 100


def test_failed_handshake_raises_and_leaves_the_alert():
    server = MemoryTLS(tds_tls_context(), server_side=True)
    with pytest.raises(ssl.SSLError):
        server.handshake(b"\x16\x03\x01\x00\x05garbage-not-a-client-hello")
    alert = server.pending_output()
    assert alert[:1] == b"\x15"                 # a TLS alert record for the peer


def test_close_notify_ends_the_plaintext():
    client, server = _pair()
    records = client.encrypt(b"last")
    try:
        client.session.unwrap()
    except ssl.SSLWantReadError:
        pass
    assert server.decrypt(records + client.pending_output()) == b"last"
