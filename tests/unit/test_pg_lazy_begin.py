"""Idle transactions hold no backend (transactions.py): BEGIN answered by the proxy, sent with the first statement,
byte vectors replayed whole, byte by byte and in random chunks."""
from __future__ import annotations

from multiproxy.engine import ErrorKind

from multiproxy_engines.postgres import protocol as p
from multiproxy_engines.postgres.relay import BEGIN_SYNC

from .test_pg_relay import (BIND_COMPLETE, LAZY_BEGIN_ANSWER, LAZY_BEGIN_PREFIX, PARSE_COMPLETE, QUERY_SELECT_1,
                            READY_FAILED, READY_IDLE, READY_IN_TRANSACTION, ROW_DESCRIPTION_SELECT_1, DATA_ROW_1,
                            COMMAND_COMPLETE_SELECT_1, SYNC, Vector, backend_state, bind, check_vector,
                            client_step, command_complete, execute, link_backend, logged_in_client, parse,
                            server_step)

BEGUN = command_complete("BEGIN") + READY_IN_TRANSACTION
SELECT_1_ANSWER = ROW_DESCRIPTION_SELECT_1 + DATA_ROW_1 + COMMAND_COMPLETE_SELECT_1


def begin_prefix(sql: str) -> bytes:
    return parse("", sql) + bind() + execute()


def test_begin_with_modes_is_answered_locally_and_sent_verbatim_with_the_first_statement():
    begin = "begin transaction isolation level repeatable read, read write not deferrable;"
    check_vector(Vector("lazy BEGIN with modes", [
        client_step(p.query(begin), b"", BEGUN),
        client_step(QUERY_SELECT_1, begin_prefix(begin) + QUERY_SELECT_1 + SYNC),
        server_step(LAZY_BEGIN_ANSWER + SELECT_1_ANSWER + READY_IN_TRANSACTION + READY_IN_TRANSACTION,
                    SELECT_1_ANSWER + READY_IN_TRANSACTION),
        client_step(p.query("COMMIT")),
        server_step(command_complete("COMMIT") + READY_IDLE, release=True),
    ]))


def test_commit_or_rollback_of_a_transaction_nothing_was_sent_for_is_answered_locally():
    for end, tag in (("COMMIT", "COMMIT"), ("end work", "COMMIT"), ("ROLLBACK;", "ROLLBACK"),
                     ("abort transaction", "ROLLBACK"), ("COMMIT AND NO CHAIN", "COMMIT")):
        client, _, _ = check_vector(Vector(f"BEGIN then {end}", [
            client_step(p.query("START TRANSACTION READ ONLY"), b"",
                        command_complete("START TRANSACTION") + READY_IN_TRANSACTION),
            client_step(p.query(end), b"", command_complete(tag) + READY_IDLE),
        ]))
        assert client.lazy_begin is None and not client.linked


def test_and_chain_keeps_the_transaction_begun_with_the_same_modes():
    client, _, _ = check_vector(Vector("COMMIT AND CHAIN", [
        client_step(p.query("BEGIN READ ONLY"), b"", BEGUN),
        client_step(p.query("COMMIT AND CHAIN"), b"", command_complete("COMMIT") + READY_IN_TRANSACTION),
        client_step(p.query("ROLLBACK AND CHAIN"), b"", command_complete("ROLLBACK") + READY_IN_TRANSACTION),
        client_step(p.query("BEGIN"), b"", p.notice_response("25001", "there is already a transaction in progress",
                                                             "WARNING") + BEGUN),
        client_step(QUERY_SELECT_1, begin_prefix("BEGIN READ ONLY") + QUERY_SELECT_1 + SYNC),
        server_step(LAZY_BEGIN_ANSWER + SELECT_1_ANSWER + READY_IN_TRANSACTION * 2, SELECT_1_ANSWER + READY_IN_TRANSACTION),
        client_step(p.query("ROLLBACK")),
        server_step(command_complete("ROLLBACK") + READY_IDLE, release=True),
    ]))
    assert client.lazy_begin is None


def test_a_begin_that_fails_on_the_server_is_the_answer_to_the_clients_request():
    # The server skips the client's Query up to the proxy's Sync, whose ReadyForQuery answers the client.
    error = p.error_response("25006", "cannot set transaction read-write mode during recovery")
    client, _, _ = check_vector(Vector("failed lazy BEGIN", [
        client_step(p.query("BEGIN READ WRITE"), b"", BEGUN),
        client_step(QUERY_SELECT_1, begin_prefix("BEGIN READ WRITE") + QUERY_SELECT_1 + SYNC),
        server_step(error + READY_IDLE, release=True),
    ]))
    assert BEGIN_SYNC not in client.fifo and client.is_clean()


def test_an_extended_request_after_a_lazy_begin_gets_no_extra_sync():
    batch = parse("", "SELECT 1") + bind() + execute() + SYNC
    check_vector(Vector("lazy BEGIN, extended request", [
        client_step(p.query("BEGIN"), b"", BEGUN),
        client_step(batch, LAZY_BEGIN_PREFIX + batch),
        server_step(LAZY_BEGIN_ANSWER + PARSE_COMPLETE + BIND_COMPLETE + DATA_ROW_1 + COMMAND_COMPLETE_SELECT_1
                    + READY_IN_TRANSACTION, PARSE_COMPLETE + BIND_COMPLETE + DATA_ROW_1 + COMMAND_COMPLETE_SELECT_1
                    + READY_IN_TRANSACTION),
        client_step(p.query("COMMIT")),
        server_step(command_complete("COMMIT") + READY_IDLE, release=True),
    ]))


def test_a_statement_error_after_a_lazy_begin_leaves_the_transaction_failed():
    error = p.error_response("42601", "syntax error at or near \"SELEC\"")
    check_vector(Vector("error after lazy BEGIN", [
        client_step(p.query("BEGIN"), b"", BEGUN),
        client_step(p.query("SELEC 1"), LAZY_BEGIN_PREFIX + p.query("SELEC 1") + SYNC),
        server_step(LAZY_BEGIN_ANSWER + error + READY_FAILED + READY_FAILED, error + READY_FAILED),
        client_step(p.query("ROLLBACK")),
        server_step(command_complete("ROLLBACK") + READY_IDLE, release=True),
    ]))


def test_a_lone_sync_while_begun_answers_in_transaction():
    client = logged_in_client()
    client.client_data(p.query("BEGIN"))
    assert client.client_data(SYNC) == (b"", READY_IN_TRANSACTION)


def test_begin_pipelined_with_more_is_forwarded_as_it_is():
    client = logged_in_client()
    data = p.query("BEGIN") + QUERY_SELECT_1
    assert client.client_data(data) == (data, b"")
    assert client.lazy_begin is None


def test_a_pool_timeout_after_a_lazy_begin_ends_the_transaction():
    client = logged_in_client()
    client.client_data(p.query("BEGIN"))
    client.client_data(QUERY_SELECT_1)
    reply = client.fail_pending(ErrorKind.POOL_TIMEOUT, "no database connection became free within 1 s")
    assert reply.endswith(READY_IDLE) and client.lazy_begin is None
    assert client.client_data(QUERY_SELECT_1) == (QUERY_SELECT_1, b"")


def test_the_begin_goes_behind_the_replay_of_the_session_state():
    client = logged_in_client()
    client.client_data(p.query("BEGIN"))
    forward, _ = client.client_data(QUERY_SELECT_1)
    state = backend_state()
    state.settings = {"lock_timeout": "5"}            # an earlier client's: reset first
    sent = link_backend(client, state, forward)
    assert sent == p.query('RESET "lock_timeout"') + LAZY_BEGIN_PREFIX + QUERY_SELECT_1 + SYNC
    out, release = client.backend_data(command_complete("RESET") + READY_IDLE + LAZY_BEGIN_ANSWER + SELECT_1_ANSWER
                                       + READY_IN_TRANSACTION * 2)
    assert (out, release) == (SELECT_1_ANSWER + READY_IN_TRANSACTION, False) and not client.fifo


def test_copy_in_after_a_lazy_begin_expects_no_answer_to_the_proxys_sync():
    # The server ignores a Sync in copy-in mode: the one behind the COPY's Query gets no ReadyForQuery.
    from .test_pg_relay import COPY_DONE_FE, copy_data, copy_response
    copy = p.query("COPY t FROM STDIN")
    check_vector(Vector("lazy BEGIN, COPY FROM STDIN", [
        client_step(p.query("BEGIN"), b"", BEGUN),
        client_step(copy, LAZY_BEGIN_PREFIX + copy + SYNC),
        server_step(LAZY_BEGIN_ANSWER + copy_response(b"G"), copy_response(b"G")),
        client_step(copy_data(b"1\tone\n") + COPY_DONE_FE),
        server_step(command_complete("COPY 1") + READY_IN_TRANSACTION),
        client_step(p.query("COMMIT")),
        server_step(command_complete("COMMIT") + READY_IDLE, release=True),
    ]))


def test_a_later_retry_does_not_send_an_old_begin_again():
    from .test_pg_relay import INSERT, READ_ONLY_ERROR, retrying_client
    from multiproxy.engine import HELD_REFUSAL
    client = retrying_client()
    client.client_data(p.query("BEGIN"))
    forward, _ = client.client_data(QUERY_SELECT_1)
    link_backend(client, backend_state(), forward)
    client.backend_data(LAZY_BEGIN_ANSWER + SELECT_1_ANSWER + READY_IN_TRANSACTION * 2)
    client.client_data(p.query("COMMIT"))
    assert client.backend_data(command_complete("COMMIT") + READY_IDLE)[1]
    client.unlink()
    forward, _ = client.client_data(INSERT)
    assert link_backend(client, backend_state(), forward) == INSERT
    assert client.backend_data(READ_ONLY_ERROR + READY_IDLE) == (b"", HELD_REFUSAL)
    assert client.retry_accepted() == INSERT
    client.unlink()
    assert link_backend(client, backend_state(), INSERT) == INSERT       # no BEGIN in front
