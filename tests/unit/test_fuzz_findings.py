"""Byte vectors of what tools/fuzz_campaign.py found, replayed through the same oracle so that they stay fixed."""
from __future__ import annotations

import pytest

from multiproxy_engines.mysql import protocol as myp
from multiproxy_engines.postgres import protocol as pgp
from multiproxy.engine import ProtocolError
from multiproxy_engines.tds.wire import messages as tp

from ..fuzzkit import (
    TDS_PRELOGIN_TLS, check_held, check_tds_error, drive, mysql_logged_in, mysql_server_state, pg_backend_state, pg_logged_in, tds_client, tds_packet,
    tls_client_hello,
)


def test_tds_error_during_the_tls_handshake_inside_prelogin_is_sent_plain():
    # PRELOGIN asking for encryption with the ClientHello packet pipelined behind it: the ClientHello arrives as
    # a whole message before the TLS phase began. Refusing it used to try to encrypt the error with a TLS
    # session not yet established (ssl.SSLWantReadError escaped instead of a ProtocolError).
    proto = tds_client(tls=True)
    with pytest.raises(ProtocolError) as info:
        proto.receive_handshake(TDS_PRELOGIN_TLS + tp.encode_message(tp.PRELOGIN, tls_client_hello()))
    check_tds_error(info.value.reply)


def test_tds_tls_garbage_inside_prelogin_ends_with_an_alert_or_an_error():
    proto = tds_client(tls=True)
    outcome = drive("tds", proto, [TDS_PRELOGIN_TLS, tp.encode_message(tp.PRELOGIN, b"\x16\x03\x01\x00\x05hello")],
                    relay=False)
    assert outcome.kind in ("error", "closed")


def test_tds_login_packets_without_an_end_of_message_are_bounded_by_max_message_size():
    # PRELOGIN packets without EOM: the handshake's message reader collected them for as long as the client sent
    # (bounded only by the handshake timeout), where the relay refuses more than max_message_size.
    proto = tds_client(max_message=16384)
    packet = tds_packet(tp.PRELOGIN, 0, b"\x00" * 492)
    with pytest.raises(ProtocolError) as info:
        for _ in range(200):
            proto.receive_handshake(packet)
            check_held(proto)
    check_tds_error(info.value.reply)
    assert proto.reader.pending <= 16384 + 500


def test_tds_a_whole_login_message_over_max_message_size_in_one_read_is_refused():
    # A complete oversize login message (a 140 KB LOGIN7 with a long FEDAUTH token, found by tds.token.login7)
    # that arrived in one read was parsed and kept; only incomplete ones were bounded.
    proto = tds_client(max_message=16384)
    chunk = b"".join(tds_packet(tp.PRELOGIN, 0, b"\x00" * 4000) for _ in range(5)) + tds_packet(tp.PRELOGIN, 1, b"\xff")
    with pytest.raises(ProtocolError) as info:
        proto.receive_handshake(chunk)
    check_tds_error(info.value.reply)
    assert "max_message_size" in str(info.value)


@pytest.mark.parametrize("engine", ["postgres", "mysql"])
def test_a_pinned_session_repeating_pinning_statements_holds_one_detail_per_reason(engine):
    # A flood of SET / PREPARE in one pinned session appended a (reason, detail) record per statement: memory
    # grew with every statement for the life of the connection.
    if engine == "postgres":
        proto = pg_logged_in()
        unit = pgp.query("BEGIN; SET ROLE x; CREATE TEMP TABLE t (id int)")
        state = pg_backend_state      # pins count once a request reaches a backend: the core links on the first
    else:
        proto = mysql_logged_in()
        unit = myp.packet(0, b"\x16SELECT ?") + myp.packet(0, b"\x03SET @a = 1")
        state = mysql_server_state    # as for postgres: pins count once a request reaches a backend
    outcome = drive(engine, proto, [unit] * 3000, relay=True, server_state=state)
    assert outcome.kind == "open" and proto.pinned
    reasons = [reason for reason, _ in proto.pin_details]
    assert len(reasons) == len(set(reasons)) >= 1
