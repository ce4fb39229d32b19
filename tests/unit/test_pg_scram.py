"""Tests for PostgreSQL SCRAM-SHA-256 and md5 mechanics: RFC 7677 vector, round trips, refusals, fuzzing."""
import base64
import hashlib
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from multiproxy_engines.postgres.auth import (
    AuthError,
    ScramClient,
    ScramServer,
    check_md5_response,
    md5_password_response,
    mock_scram_salt,
)
from multiproxy.auth import md5_verifier, scram_sha_256_verifier

# RFC 7677 section 3.
RFC_CLIENT_NONCE = "rOprNGfwEbeRWgbNEkqO"
RFC_SERVER_NONCE = "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
RFC_SALT = base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ==")
RFC_CLIENT_FIRST = b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO"
RFC_SERVER_FIRST = b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
RFC_CLIENT_FINAL = (
    b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
    b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
)
RFC_SERVER_FINAL = b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="

PENCIL = scram_sha_256_verifier("pencil", RFC_SALT, 4096)


def rfc_server():
    return ScramServer(PENCIL, lambda: RFC_SERVER_NONCE)


def rfc_client(password="pencil"):
    return ScramClient("user", password, lambda: RFC_CLIENT_NONCE)


def exchange(server, client):
    """Run a whole exchange; return the server-final-message."""
    final = server.handle_client_final(client.handle_server_first(server.handle_client_first(client.client_first())))
    client.verify_server_final(final)
    return final


# --------------------------------------------------------------------------- RFC 7677 vector


def test_rfc7677_client_messages():
    client = rfc_client()
    assert client.client_first() == RFC_CLIENT_FIRST
    assert client.handle_server_first(RFC_SERVER_FIRST) == RFC_CLIENT_FINAL
    client.verify_server_final(RFC_SERVER_FINAL)
    assert client.authenticated


def test_rfc7677_server_messages():
    server = rfc_server()
    assert server.handle_client_first(RFC_CLIENT_FIRST) == RFC_SERVER_FIRST
    assert server.handle_client_final(RFC_CLIENT_FINAL) == RFC_SERVER_FINAL
    assert server.authenticated and server.client_username == "user"
    assert server.client_key is not None and len(server.client_key) == 32


def test_rfc7677_wrong_server_signature_is_rejected():
    client = rfc_client()
    client.client_first()
    client.handle_server_first(RFC_SERVER_FIRST)
    bad = b"v=" + base64.b64encode(bytes(32))
    with pytest.raises(AuthError, match="server signature is wrong"):
        client.verify_server_final(bad)
    assert not client.authenticated


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("password", ["pencil", "caf\u00e9", "I\u00adX", "with,comma=equals"])
def test_client_server_round_trip(password):
    server = ScramServer(scram_sha_256_verifier(password))
    client = ScramClient("alice,=odd", password)
    exchange(server, client)
    assert server.authenticated and client.authenticated
    assert server.client_username == "alice,=odd"


def test_saslprep_equivalent_passwords_match():
    # The verifier was made from "IX"; U+2168 (ROMAN NUMERAL NINE) normalises to it.
    exchange(ScramServer(scram_sha_256_verifier("IX")), ScramClient("u", "\u2168"))


def test_wrong_password_is_rejected():
    server = ScramServer(scram_sha_256_verifier("right"))
    client = ScramClient("alice", "wrong")
    client_final = client.handle_server_first(server.handle_client_first(client.client_first()))
    with pytest.raises(AuthError, match="^password authentication failed$"):
        server.handle_client_final(client_final)
    assert not server.authenticated and server.client_key is None


def test_y_flag_is_accepted_and_checked_in_final():
    server = rfc_server()
    server.handle_client_first(b"y,,n=user,r=" + RFC_CLIENT_NONCE.encode())
    # The client-final must echo the same GS2 header (base64 "y,,"), so the RFC proof ("n,,") is refused.
    with pytest.raises(AuthError, match="channel binding data does not match"):
        server.handle_client_final(RFC_CLIENT_FINAL)


def test_channel_binding_is_refused():
    with pytest.raises(AuthError, match="channel binding is not supported"):
        rfc_server().handle_client_first(b"p=tls-server-end-point,,n=user,r=abc")


@pytest.mark.parametrize(
    "message,match",
    [
        (b"n,a=admin,n=user,r=abc", "authorization identity"),
        (b"n,,m=ext,n=user,r=abc", "mandatory extensions"),
        (b"x,,n=user,r=abc", "channel binding flag"),
        (b"n,,r=abc", "expected n="),
        (b"n,,n=user,r=", "nonce"),
        (b"n,,n=us=41er,r=abc", "bad escape"),
        (b"n,,n=user,r=ab\xffc", "UTF-8"),
        (b"n,n=user", "GS2 header"),
    ],
)
def test_malformed_client_first(message, match):
    with pytest.raises(AuthError, match=match):
        rfc_server().handle_client_first(message)


def _rfc_final_with(**changes):
    parts = dict(p.split("=", 1) for p in RFC_CLIENT_FINAL.decode().split(","))
    parts.update(changes)
    return ",".join("%s=%s" % kv for kv in parts.items()).encode()


@pytest.mark.parametrize(
    "message,match",
    [
        (_rfc_final_with(r=RFC_CLIENT_NONCE + "other"), "nonce mismatch"),
        (_rfc_final_with(r=RFC_CLIENT_NONCE), "nonce mismatch"),
        (_rfc_final_with(c="eSws"), "channel binding data does not match"),
        (_rfc_final_with(p="AAAA"), "wrong length"),
        (_rfc_final_with(p="not base64!"), "invalid base64"),
        (RFC_CLIENT_FINAL.split(b",p=")[0], "missing proof"),
        (b"r=x,c=biws,p=AAAA", "expected c="),
    ],
)
def test_bad_client_final(message, match):
    server = rfc_server()
    server.handle_client_first(RFC_CLIENT_FIRST)
    with pytest.raises(AuthError, match=match):
        server.handle_client_final(message)
    assert not server.authenticated


def test_messages_out_of_order():
    server = rfc_server()
    with pytest.raises(AuthError):
        server.handle_client_final(RFC_CLIENT_FINAL)
    server = rfc_server()
    server.handle_client_first(RFC_CLIENT_FIRST)
    with pytest.raises(AuthError):
        server.handle_client_first(RFC_CLIENT_FIRST)
    client = rfc_client()
    with pytest.raises(AuthError):
        client.handle_server_first(RFC_SERVER_FIRST)
    with pytest.raises(AuthError):
        client.verify_server_final(RFC_SERVER_FINAL)


def test_a_failed_server_cannot_be_retried():
    server = rfc_server()
    server.handle_client_first(RFC_CLIENT_FIRST)
    with pytest.raises(AuthError):
        server.handle_client_final(_rfc_final_with(r="nope"))
    with pytest.raises(AuthError, match="unexpected"):
        server.handle_client_final(RFC_CLIENT_FINAL)


@pytest.mark.parametrize(
    "message,match",
    [
        (b"r=other-nonce,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096", "does not extend"),
        (b"r=rOprNGfwEbeRWgbNEkqO,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096", "does not extend"),
        (b"r=rOprNGfwEbeRWgbNEkqOxyz,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=0", "iteration count"),
        (b"r=rOprNGfwEbeRWgbNEkqOxyz,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=\xd9\xa1", "iteration count"),
        (b"r=rOprNGfwEbeRWgbNEkqOxyz,s=,i=4096", "empty salt"),
        (b"r=rOprNGfwEbeRWgbNEkqOxyz,i=4096", "expected r="),
        (b"m=x,r=rOprNGfwEbeRWgbNEkqOxyz,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096", "mandatory extensions"),
    ],
)
def test_client_rejects_bad_server_first(message, match):
    client = rfc_client()
    client.client_first()
    with pytest.raises(AuthError, match=match):
        client.handle_server_first(message)


def test_client_reports_server_error():
    client = rfc_client()
    client.client_first()
    client.handle_server_first(RFC_SERVER_FIRST)
    with pytest.raises(AuthError, match="server rejected SCRAM authentication: invalid-proof"):
        client.verify_server_final(b"e=invalid-proof")


# --------------------------------------------------------------------------- unknown users


def test_unknown_user_exchange_looks_real_and_fails_like_a_wrong_password():
    secret = b"k" * 32
    server = ScramServer.for_unknown_user("ghost", secret)
    client = ScramClient("ghost", "any")
    server_first = server.handle_client_first(client.client_first())
    attrs = dict(p.split("=", 1) for p in server_first.decode().split(","))
    assert base64.b64decode(attrs["s"]) == mock_scram_salt("ghost", secret)
    assert len(base64.b64decode(attrs["s"])) == 16 and attrs["i"] == "4096"
    with pytest.raises(AuthError, match="^password authentication failed$"):
        server.handle_client_final(client.handle_server_first(server_first))
    assert not server.authenticated


def test_mock_salt_is_stable_per_user_and_secret():
    assert mock_scram_salt("ghost", b"a") == mock_scram_salt("ghost", b"a")
    assert mock_scram_salt("ghost", b"a") != mock_scram_salt("ghost2", b"a")
    assert mock_scram_salt("ghost", b"a") != mock_scram_salt("ghost", b"b")


def test_bad_verifier_is_a_programming_error():
    with pytest.raises(ValueError, match="not a SCRAM-SHA-256 verifier"):
        ScramServer("md5" + "0" * 32)


# --------------------------------------------------------------------------- fuzzing


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_fuzz_client_first_only_raises_auth_error(data):
    try:
        rfc_server().handle_client_first(data)
    except AuthError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=200), st.builds(lambda tail: RFC_CLIENT_FINAL[: len(RFC_CLIENT_FINAL) // 2] + tail, st.binary(max_size=80))))
def test_fuzz_client_final_only_raises_auth_error(data):
    server = rfc_server()
    server.handle_client_first(RFC_CLIENT_FIRST)
    with pytest.raises(AuthError):
        server.handle_client_final(data)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_fuzz_server_messages_only_raise_auth_error(data):
    client = ScramClient("user", "pencil", lambda: "n")
    client.client_first()
    # A fuzzed iteration count may be huge; the key derivation is not what is under test.
    with mock.patch("multiproxy_engines.postgres.auth.scram_salted_password", lambda p, s, i: b"k" * 32):
        try:
            client.handle_server_first(data)
        except AuthError:
            return
    with pytest.raises(AuthError):
        client.verify_server_final(data)


@settings(max_examples=100, deadline=None)
@given(st.text(min_size=1, max_size=30), st.text(max_size=30))
def test_round_trip_any_user_and_password(user, password):
    server = ScramServer(scram_sha_256_verifier(password, iterations=2))
    exchange(server, ScramClient(user, password))
    assert server.client_username == user


# --------------------------------------------------------------------------- md5


def test_md5_password_response_known_value():
    # Computed with md5sum(1): md5("secretpostgres") = 53f4..., then md5("53f4..." + salt).
    assert md5_verifier("postgres", "secret") == "md553f48b7c4b76a86ce72276c5755f217d"
    assert md5_password_response("postgres", "secret", b"\x01\x02\x03\x04") == b"md5bb41a296aab6baccb36ff243a562abff"
    salt = b"wxyz"
    inner = hashlib.md5(b"secretpostgres").hexdigest().encode()
    assert md5_password_response("postgres", "secret", salt) == b"md5" + hashlib.md5(inner + salt).hexdigest().encode()


def test_check_md5_response():
    salt = b"abcd"
    verifier = md5_verifier("postgres", "secret")
    response = md5_password_response("postgres", "secret", salt)
    assert check_md5_response(verifier, salt, response)
    assert not check_md5_response(verifier, b"abce", response)
    assert not check_md5_response(verifier, salt, md5_password_response("postgres", "Secret", salt))
    assert not check_md5_response(verifier, salt, response + b"\x00")
    assert not check_md5_response(verifier, salt, b"")
    assert not check_md5_response(scram_sha_256_verifier("secret"), salt, response)
