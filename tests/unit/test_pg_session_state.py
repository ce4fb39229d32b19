"""Session state that moves between backends (session_state.py): values read back after an expression set them,
session identity replayed in order, and the reset before each link with reset_after_transaction."""
from __future__ import annotations

import dataclasses

from multiproxy_engines.postgres import protocol as p
from multiproxy_engines.postgres.relay import READBACK
from multiproxy_engines.postgres.session_state import replay_statements, resets_statements

from .test_pg_relay import (QUERY_SELECT_1, READY_IDLE, READY_IN_TRANSACTION, ROW_DESCRIPTION_SELECT_1, DATA_ROW_1,
                            COMMAND_COMPLETE_SELECT_1, backend_state, command_complete, data_row, link_backend,
                            logged_in_client, row_description, split_messages, SERVER_PARAMS)

SET_PATH = "SELECT set_config('search_path', current_setting('search_path') || ', extra', false)"
READBACK_COLUMNS = row_description(("n", 25), ("current_setting", 25))


def _answer(value: str) -> bytes:
    return row_description(("set_config", 25)) + data_row(value.encode()) + command_complete("SELECT 1")


def test_an_expression_is_forwarded_then_its_value_read_back_in_the_same_borrow():
    client = logged_in_client()
    request = p.query(SET_PATH)
    forward, local = client.client_data(request)
    assert local == b"" and forward.startswith(request)
    (readback,) = split_messages(forward[len(request):])
    assert b"current_setting(n, true)" in readback and b"'search_path'" in readback
    state = backend_state()
    assert link_backend(client, state, forward) == forward
    assert list(client.fifo)[-1] == READBACK
    answer = _answer('"$user", public, extra') + READY_IDLE
    # The client's answer goes through; the backend is kept until the read-back's answer is in, then swallowed.
    assert client.backend_data(answer) == (answer, False)
    rows = READBACK_COLUMNS + data_row(b"search_path", b'"$user", public, extra') + command_complete("SELECT 1")
    assert client.backend_data(rows + READY_IDLE) == (b"", True)
    assert client.client_settings == {"search_path": '"$user", public, extra'}
    assert state.settings == client.client_settings and not client.pinned
    client.unlink()
    client.client_data(QUERY_SELECT_1)
    replay = link_backend(client, backend_state())
    assert b"set_config('search_path', '\"$user\", public, extra', false)" in replay


def test_a_read_back_in_a_failed_transaction_tracks_nothing():
    client = logged_in_client()
    forward, _ = client.client_data(p.query(SET_PATH))
    link_backend(client, backend_state(), forward)
    error = p.error_response("25P02", "current transaction is aborted")
    out, release = client.backend_data(error + b"Z\x00\x00\x00\x05E" + error + b"Z\x00\x00\x00\x05E")
    assert out == error + b"Z\x00\x00\x00\x05E" and not release
    assert client.client_settings == {}


def test_a_non_literal_name_reads_back_every_session_setting():
    client = logged_in_client()
    forward, _ = client.client_data(p.query("SELECT set_config(name, value, false) FROM app_settings"))
    assert b"FROM pg_catalog.pg_settings WHERE source = 'session'" in forward
    link_backend(client, backend_state(), forward)
    client.backend_data(_answer("x") + READY_IDLE)
    rows = (READBACK_COLUMNS + data_row(b"statement_timeout", b"5s") + data_row(b"TimeZone", b"UTC")
            + data_row(b"transaction_isolation", b"serializable") + command_complete("SELECT 3"))
    assert client.backend_data(rows + READY_IDLE) == (b"", True)
    # TimeZone is reported, tracked from there; transaction_isolation ends with the transaction.
    assert client.client_settings == {"statement_timeout": "5s"}


def test_a_set_config_expression_in_a_rolled_back_transaction_is_undone():
    client = logged_in_client()
    state = backend_state()
    forward, _ = client.client_data(p.query("BEGIN; " + SET_PATH))
    link_backend(client, state, forward)
    client.backend_data(command_complete("BEGIN") + _answer("x") + READY_IN_TRANSACTION)
    rows = READBACK_COLUMNS + data_row(b"search_path", b"x") + command_complete("SELECT 1")
    assert client.backend_data(rows + READY_IN_TRANSACTION) == (b"", False)
    assert client.client_settings == {"search_path": "x"}
    client.client_data(p.query("ROLLBACK"))
    assert client.backend_data(command_complete("ROLLBACK") + READY_IDLE)[1]
    assert client.client_settings == {}


def test_set_role_is_tracked_once_accepted_and_replayed_after_the_session_user():
    client = logged_in_client()
    state = backend_state()
    for sql in ("SET SESSION AUTHORIZATION alice", "SET ROLE reporting"):
        forward, _ = client.client_data(p.query(sql))
        if not client.linked:
            link_backend(client, state, forward)
        client.backend_data(command_complete("SET") + READY_IDLE)
    assert client.client_settings == {"session_authorization": "alice", "role": "reporting"}
    assert not client.pinned
    client.unlink()
    client.client_data(QUERY_SELECT_1)
    replay = link_backend(client, backend_state())
    statements = split_messages(replay)[0][5:-1].decode().split(";")
    assert statements == ["SET SESSION AUTHORIZATION 'alice'", "SET ROLE 'reporting'"]


def test_a_refused_set_role_is_not_tracked():
    client = logged_in_client()
    forward, _ = client.client_data(p.query("SET ROLE admin"))
    link_backend(client, backend_state(), forward)
    client.backend_data(p.error_response("42501", 'permission denied to set role "admin"') + READY_IDLE)
    assert client.client_settings == {} and not client.pinned


def test_replay_order_identity_first_then_resets_then_values():
    assert replay_statements({}, {}, {"role": "r", "session_authorization": "u", "lock_timeout": "1"},
                             {"statement_timeout": "2"}) == [
        "SET SESSION AUTHORIZATION 'u'", "SET ROLE 'r'", 'RESET "statement_timeout"',
        "SELECT pg_catalog.set_config('lock_timeout', '1', false)"]
    # A backend an earlier client left as another user: back to the backend user, which resets its role too.
    assert replay_statements({}, {}, {}, {"session_authorization": "u", "role": "r"}) == [
        "RESET SESSION AUTHORIZATION"]
    # Same session user: only the role changes.
    assert replay_statements({}, {}, {"session_authorization": "u", "role": "r2"},
                             {"session_authorization": "u", "role": "r"}) == ["SET ROLE 'r2'"]


def test_reset_after_transaction_resets_first_and_replays_against_the_login_state():
    client = logged_in_client()
    client.ctx = dataclasses.replace(client.ctx, reset_after_transaction=True)
    client.client_settings = {"search_path": "app"}
    state = backend_state()
    state.settings = {"search_path": "app"}           # what the backend is believed to hold ...
    state.prepared.add(b"mp_x")
    client.client_data(QUERY_SELECT_1)
    sent = link_backend(client, state, QUERY_SELECT_1)
    reset, replay, request = split_messages(sent)
    assert reset == p.query("DISCARD ALL")            # ... no longer counts: an indirect change may hide there
    assert b"set_config('search_path', 'app', false)" in replay and request == QUERY_SELECT_1
    assert not state.prepared
    # The reset's ParameterStatus is the backend's: the client keeps its own view.
    reset_answer = p.parameter_status("application_name", "") + command_complete("DISCARD ALL") + READY_IDLE
    client.client_params["application_name"] = "billing"
    answer = ROW_DESCRIPTION_SELECT_1 + DATA_ROW_1 + COMMAND_COMPLETE_SELECT_1 + READY_IDLE
    out, release = client.backend_data(reset_answer + command_complete("SELECT 1") + READY_IDLE + answer)
    assert out == answer and release
    assert client.client_params["application_name"] == "billing" and state.params["application_name"] == ""


def test_a_configured_reset_query_keeps_the_statement_cache_unless_it_deallocates():
    assert resets_statements("") and resets_statements("DISCARD ALL") and resets_statements("deallocate all; reset all")
    assert not resets_statements("RESET ALL")


def test_a_failed_reset_warns_the_client_and_its_request_goes_on():
    client = logged_in_client()
    client.ctx = dataclasses.replace(client.ctx, reset_after_transaction=True, reset_query="RESET EVERYTHING")
    client.client_data(QUERY_SELECT_1)
    sent = link_backend(client, backend_state(), QUERY_SELECT_1)
    assert split_messages(sent) == [p.query("RESET EVERYTHING"), QUERY_SELECT_1]
    error = p.error_response("42704", 'unrecognized configuration parameter "everything"')
    answer = ROW_DESCRIPTION_SELECT_1 + DATA_ROW_1 + COMMAND_COMPLETE_SELECT_1 + READY_IDLE
    out, release = client.backend_data(error + READY_IDLE + answer)
    notice, *rest = split_messages(out)
    assert notice[:1] == b"N" and b"reset_query" in notice and b"EVERYTHING" not in notice
    assert b"".join(rest) == answer and release


def test_reset_all_returns_to_the_values_chosen_at_login_in_the_same_borrow():
    startup = {"user": "alice", "database": "app", "application_name": "billing", "client_encoding": "utf-8",
               "options": "-c statement_timeout=4321"}
    client = logged_in_client(startup)
    state = backend_state()
    for sql in ("SET statement_timeout = 1; SET lock_timeout = 2", "RESET ALL"):
        forward, _ = client.client_data(p.query(sql))
        if not client.linked:
            forward = link_backend(client, state, forward)
        if sql == "RESET ALL":
            request, replay = split_messages(forward)
            assert request == p.query("RESET ALL")
            # The backend's RESET ALL returns it to its own login values: the client's go again right behind.
            assert replay == p.query("SELECT pg_catalog.set_config('application_name', 'billing', false), "
                                     "pg_catalog.set_config('statement_timeout', '4321', false)")
            answer = p.parameter_status("application_name", "") + command_complete("RESET") + READY_IDLE
            again = (p.parameter_status("application_name", "billing") + row_description(("set_config", 25))
                     + data_row(b"billing", b"4321") + command_complete("SELECT 1") + READY_IDLE)
            out, release = client.backend_data(answer + again)
            # The client's ReadyForQuery waits for the login's values: it sees them back with its answer.
            assert out == answer[:-6] + p.parameter_status("application_name", "billing") + READY_IDLE and release
        else:
            replay_answer = READY_IDLE if client.fifo[0] == 0 else b""
            client.backend_data(replay_answer + command_complete("SET") * 2 + READY_IDLE)
    assert client.client_params["application_name"] == "billing"
    assert client.client_settings == {"statement_timeout": "4321"}


def test_discard_all_also_returns_to_the_login_values_and_drops_the_role():
    client = logged_in_client({"user": "alice", "database": "app", "options": "-c search_path=app"})
    client.client_settings = {**client.client_settings, "role": "r"}
    forward, _ = client.client_data(p.query("DISCARD ALL"))
    assert b"set_config('search_path', 'app', false)" in forward
    link_backend(client, backend_state(), forward)
    assert client.client_settings == {"search_path": "app"}


def test_a_reader_listeners_read_only_default_survives_reset_all():
    from .test_pg_relay import make_client
    client = make_client()
    client.ctx = dataclasses.replace(client.ctx, read_only=True)
    client.receive_handshake(p.startup_message({"user": "alice", "database": "app"}))
    client.login_complete(backend_state())
    forward, _ = client.client_data(p.query("RESET ALL"))
    assert b"set_config('default_transaction_read_only', 'on', false)" in forward
    link_backend(client, backend_state(), forward)
    assert client.client_settings == {"default_transaction_read_only": "on"}


def test_a_backend_lost_while_the_login_values_go_again_still_ends_the_clients_request():
    client = logged_in_client({"user": "alice", "database": "app", "options": "-c search_path=app"})
    forward, _ = client.client_data(p.query("RESET ALL"))
    link_backend(client, backend_state(), forward)
    replay = READY_IDLE if client.fifo[0] == 0 else b""
    out, release = client.backend_data(replay + command_complete("RESET") + READY_IDLE)
    assert out == command_complete("RESET") and not release
    reply, close = client.backend_lost("connection reset")
    assert reply == READY_IDLE and not close


def test_a_startup_value_the_backend_already_has_takes_the_servers_spelling_and_needs_no_replay():
    """asyncpg sends client_encoding "'utf-8'" (quotes included): the server's UTF8 for it, reported as the server
    reports it, and nothing replayed at link time; an application_name is its own exact text, replayed when the
    backend's differs by as little as an underscore."""
    startup = {"user": "alice", "database": "app", "client_encoding": "'utf-8'", "DateStyle": "iso, mdy",
               "application_name": "my_app"}
    client = logged_in_client(startup)
    assert client.client_params["client_encoding"] == "UTF8" and client.client_params["datestyle"] == "ISO, MDY"
    assert client.client_params["application_name"] == "my_app"
    state = backend_state(params=(("application_name", "myapp"),) + tuple(
        (k, v) for k, v in SERVER_PARAMS if k != "application_name"))
    replay = link_backend(client, state)
    assert replay == p.query("SELECT pg_catalog.set_config('application_name', 'my_app', false)")
