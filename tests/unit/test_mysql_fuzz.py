"""Hypothesis fuzzing of MySQLClient: handshake and client bytes may only fail with ProtocolError; backend bytes never fail."""
from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from multiproxy_engines.mysql import protocol as p
from multiproxy_engines.mysql.backend import MySQLLogin
from multiproxy.engine import BackendError, BackendTarget, ClientQuit, ProtocolError

from ..fuzzkit import check_mysql_error, mysql_client as make_client, mysql_logged_in as logged_in
from ..fuzzkit import mysql_packets as packets, mysql_server_state as server_state

FUZZ = settings(max_examples=200, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@FUZZ
@given(st.binary(max_size=200), st.sampled_from(["trust", "mysql_native_password", "caching_sha2_password"]))
def test_handshake_garbage_only_raises_protocol_error(blob, auth):
    client = make_client(auth=auth)
    client.start()
    try:
        client.receive_handshake(blob)
    except ProtocolError as exc:
        check_mysql_error(exc.reply)


@FUZZ
@given(st.binary(min_size=32, max_size=120))
def test_handshake_response_bodies(body):
    client = make_client(auth="mysql_native_password")
    client.start()
    try:
        client.receive_handshake(p.packet(1, body))
    except ProtocolError as exc:
        check_mysql_error(exc.reply)


@FUZZ
@given(st.lists(packets, max_size=6), st.integers(1, 7))
def test_client_commands_only_raise_protocol_error(stream, chunk):
    client = logged_in()
    data = b"".join(stream)
    try:
        for i in range(0, len(data), chunk):
            forward, _ = client.client_data(data[i:i + chunk])
            if forward and not client.linked:
                client.link(server_state(), forward)
    except ClientQuit:
        pass
    except ProtocolError as exc:
        check_mysql_error(exc.reply)


backend_packets = st.builds(lambda seq, body: p.packet(seq, body), st.integers(0, 255),
                            st.one_of(st.binary(max_size=30), st.sampled_from([
                                p.ok_payload(2), p.ok_payload(3), p.ok_payload(10), p.eof_payload(2), b"\x01", b"\x02",
                                b"\xfb", p.err_payload(1, "HY000", "x"), b"\x00\x01\x00\x00\x00\x01\x00\x01\x00\x00"])))


@FUZZ
@given(st.sampled_from([b"\x03SELECT 1", b"\x16SELECT ?", b"\x04t\x00", b"\x09", b"\x1c\x01\x00\x00\x00\x01\x00\x00\x00"]),
       st.lists(backend_packets, max_size=12), st.integers(1, 9), st.booleans())
def test_backend_bytes_never_raise(command, stream, chunk, deprecate):
    client = logged_in(deprecate_eof=deprecate)
    forward, _ = client.client_data(p.packet(0, command))
    client.link(server_state(), forward)
    data = b"".join(stream)
    for i in range(0, len(data), chunk):
        out, release = client.backend_data(data[i:i + chunk])
        assert isinstance(out, bytes) and isinstance(release, bool)
    client.is_clean()
    client.backend_lost("fuzz")


@FUZZ
@given(st.binary(max_size=120))
def test_backend_login_garbage_only_raises_backend_error(blob):
    login = MySQLLogin(BackendTarget(host="db", port=3306, user="u", database="d", password="pw", tls="disable"))
    login.start()
    try:
        login.feed(p.packet(0, blob))
        login.feed(p.packet(2, blob))
    except BackendError:
        pass
