"""Byte vectors of binary prepared statements through MySQLClient: the proxy's ids, the per-backend cache, re-prepare
in front of an execute (pipelined on MariaDB, the execute held for the new id on MySQL), long data held, LRU
eviction, a changed table, cursors pinning, and a little fuzzing."""
from __future__ import annotations

import random

import pytest

from multiproxy.engine import PinReason, ProtocolError
from multiproxy_engines.mysql import protocol as p
from multiproxy_engines.mysql.statements import LAST_STATEMENT

from .test_mysql_relay import chunkings, column, eof, logged_in, ok, server_state

SQL = b"SELECT a FROM t WHERE b = ?"
LONG_TYPE = b"\x03\x00"         # MYSQL_TYPE_LONG, signed
BLOB_TYPE = b"\xfc\x00"


def prepare(sql: bytes = SQL) -> bytes:
    return p.packet(0, b"\x16" + sql)


def prepare_ok(backend_id: int, params: int = 1, columns: int = 1, deprecate: bool = False) -> bytes:
    out = [p.packet(1, b"\x00" + p.UINT32.pack(backend_id) + p.UINT16.pack(columns) + p.UINT16.pack(params)
                    + b"\x00\x00\x00")]
    seq = 2
    for kind, count in (("param", params), ("column", columns)):
        for _ in range(count):
            out.append(column(seq, b"?" if kind == "param" else b"a"))
            seq += 1
        if count and not deprecate:
            out.append(eof(seq))
            seq += 1
    return b"".join(out)


def execute_payload(statement_id: int, values: list, types: bytes | None = LONG_TYPE, flags: int = 0) -> bytes:
    out = b"\x17" + p.UINT32.pack(statement_id) + bytes((flags,)) + p.UINT32.pack(1)
    if values:
        bitmap = bytearray((len(values) + 7) // 8)
        for i, value in enumerate(values):
            if value is None:
                bitmap[i // 8] |= 1 << (i % 8)
        out += bytes(bitmap) + (b"\x01" + types if types is not None else b"\x00")
        out += b"".join(p.UINT32.pack(v) for v in values if v is not None)
    return out


def execute(statement_id: int, values: list, types: bytes | None = LONG_TYPE, flags: int = 0) -> bytes:
    return p.packet(0, execute_payload(statement_id, values, types, flags))


def binary_rows(value: int = 7, deprecate: bool = False) -> bytes:
    # one column, one binary row
    if deprecate:
        return (p.packet(1, b"\x01") + column(2) + p.packet(3, b"\x00\x00" + p.UINT32.pack(value))
                + p.packet(4, p.ok_payload(p.SERVER_STATUS_AUTOCOMMIT, header_byte=0xFE)))
    return (p.packet(1, b"\x01") + column(2) + eof(3) + p.packet(4, b"\x00\x00" + p.UINT32.pack(value)) + eof(5))


def prepared_client(backend_id: int = 77, state=None, **kwargs):
    """A client that prepared SQL on `state` (released afterwards)."""
    client = logged_in(**kwargs)
    state = state or server_state()
    forward, local = client.client_data(prepare())
    assert local == b""
    assert client.link(state, forward) == prepare()
    deprecate = kwargs.get("deprecate_eof", False)
    out, release = client.backend_data(prepare_ok(backend_id, deprecate=deprecate))
    assert release is True
    assert out == prepare_ok(1, deprecate=deprecate)        # the proxy's id in place of the server's
    client.unlink()
    return client, state


def test_prepare_ok_carries_the_proxy_id_and_the_backend_keeps_the_server_id():
    for parts in chunkings(prepare_ok(4242)):
        client = logged_in()
        state = server_state()
        client.link(state, client.client_data(prepare())[0])
        out = b"".join(client.backend_data(part)[0] for part in parts)
        assert out == prepare_ok(1) and not client.fifo
        assert state.prepared[(SQL, "app")].id == 4242
        assert client.statements[1].key == (SQL, "app") and not client.pinned
    # the next prepare gets the next id, whatever the server's
    client.link(state, client.client_data(prepare(b"SELECT 2"))[0])
    assert client.backend_data(prepare_ok(9, params=0, columns=1))[0] == prepare_ok(2, params=0, columns=1)
    assert list(client.statements) == [1, 2]


def test_execute_on_the_same_backend_is_rewritten_to_its_id_and_counts_a_hit():
    client, state = prepared_client()
    forward, local = client.client_data(execute(1, [5]))
    assert local == b""
    assert client.link(state, forward) == execute(77, [5])
    assert client.backend_data(binary_rows())[0] == binary_rows()
    assert client.ctx.statement_counts.hits == 1 and client.ctx.statement_counts.misses == 0
    # linked already: rewritten at once; types the backend saw need not be sent again
    client.link(state, b"")
    assert client.client_data(execute(1, [6], types=None)) == (execute(77, [6], types=None), b"")


def test_execute_on_another_backend_prepares_first_and_the_prepare_answer_is_swallowed():
    for deprecate in (False, True):
        answer = prepare_ok(31, deprecate=deprecate) + binary_rows(deprecate=deprecate)
        for parts in chunkings(answer):
            client, _ = prepared_client(deprecate_eof=deprecate)
            client.statements[1].types = LONG_TYPE      # bound on the first backend; this one never saw them
            state = server_state()
            sent = client.link(state, client.client_data(execute(1, [5], types=None))[0])
            assert sent == prepare() + execute(LAST_STATEMENT, [5], types=LONG_TYPE)   # new-params-bound set again
            out = []
            for part in parts:
                data, release = client.backend_data(part)
                out.append(data)
            assert b"".join(out) == binary_rows(deprecate=deprecate) and release is True and not client.fifo
            assert state.prepared[(SQL, "app")].id == 31 and state.prepared[(SQL, "app")].types == LONG_TYPE
            assert client.ctx.statement_counts.misses == 1 and client.ctx.statement_counts.hits == 0
            # then the server's id, and the types it has seen
            client.link(state, b"")
            assert client.client_data(execute(1, [8], types=None)) == (execute(31, [8], types=None), b"")


def test_a_statement_prepared_in_another_schema_is_prepared_there():
    client, _ = prepared_client()
    client.schema = "other"
    state = server_state()
    state.schema = "other"
    sent = client.link(state, client.client_data(execute(1, [5]))[0])
    assert sent == (p.packet(0, b"\x02app") + prepare() + p.packet(0, b"\x02other") + execute(LAST_STATEMENT, [5]))
    out, release = client.backend_data(ok() + prepare_ok(8) + ok() + binary_rows())
    assert out == binary_rows() and release is True and state.prepared[(SQL, "app")].id == 8


def test_a_second_execute_in_the_same_pipeline_uses_the_statement_prepared_last():
    client, _ = prepared_client()
    other = server_state()
    forward, _ = client.client_data(execute(1, [1]) + execute(1, [2]))
    assert client.link(other, forward) == prepare() + execute(LAST_STATEMENT, [1]) + execute(LAST_STATEMENT, [2])
    out, release = client.backend_data(prepare_ok(12) + binary_rows(1) + binary_rows(2))
    assert out == binary_rows(1) + binary_rows(2) and release is True


def test_a_failed_re_prepare_answers_the_execute():
    client, _ = prepared_client()
    client.link(server_state(), client.client_data(execute(1, [5]))[0])
    err = p.packet(1, p.err_payload(1146, "42S02", "Table 'app.t' doesn't exist"))
    unknown = p.packet(1, p.err_payload(1243, "HY000", "Unknown prepared statement handler"))
    out, release = client.backend_data(err + unknown)
    assert out == err and release is True and not client.fifo
    assert (SQL, "app") not in client.server_state.prepared if client.server_state else True


def test_a_changed_table_answers_err_1615_instead_of_wrong_rows():
    client, _ = prepared_client()
    state = server_state()
    client.link(state, client.client_data(execute(1, [5]))[0])
    wide = (p.packet(1, b"\x02") + column(2) + column(3) + eof(4)
            + p.packet(5, b"\x00\x00" + p.UINT32.pack(1) + p.UINT32.pack(2)) + eof(6))
    out, release = client.backend_data(prepare_ok(40, params=1, columns=2) + wide)
    assert release is True and not client.fifo
    assert out[4] == 0xFF and p.parse_err(out[4:])[0] == 1615 and len(out) == 4 + p.header(out)[0]
    assert state.prepared[(SQL, "app")].columns == 2        # cached for clients preparing it now


def test_long_data_is_held_and_sent_in_front_of_the_execute():
    client, _ = prepared_client()
    piece = p.packet(0, b"\x18" + p.UINT32.pack(1) + b"\x00\x00" + b"x" * 9000)
    assert client.client_data(piece + piece) == (b"", b"")          # no answer, no backend
    forward, _ = client.client_data(execute(1, [0], types=BLOB_TYPE))
    sent = client.link(server_state(), forward)
    held = p.packet(0, b"\x18" + p.UINT32.pack(LAST_STATEMENT) + b"\x00\x00" + b"x" * 9000)
    assert sent == prepare() + held + held + execute(LAST_STATEMENT, [0], types=BLOB_TYPE)
    assert client.statements[1].long_data == []
    # dropped by a reset, answered by the proxy while unlinked
    client.backend_data(prepare_ok(3) + binary_rows())
    client.unlink()
    assert client.client_data(piece)[0] == b""
    forward, local = client.client_data(p.packet(0, b"\x1a" + p.UINT32.pack(1)))
    assert forward == b"" and local == ok() and client.statements[1].long_data == []


def test_long_data_beyond_the_limit_is_refused():
    client, _ = prepared_client()
    big = p.packet(0, b"\x18" + p.UINT32.pack(1) + b"\x00\x00" + b"x" * 600_000)
    client.client_data(big)
    with pytest.raises(ProtocolError) as refused:
        client.client_data(big)
    assert b"max_message_size" in refused.value.reply


def test_least_recently_used_statements_are_closed_beyond_the_limit():
    client = logged_in()
    client.ctx.max_prepared_statements = 2
    state = server_state()
    for i in range(3):
        client.link(state, client.client_data(prepare(b"SELECT %d" % i))[0])
        client.backend_data(prepare_ok(100 + i, params=0))
        client.unlink()
    assert [entry.id for entry in state.prepared.values()] == [101, 102]
    assert state.stale_statements == [100] and client.ctx.statement_counts.evictions == 1
    # the eviction is closed ahead of the next command on that backend (no answer awaited)
    sent = client.link(state, client.client_data(execute(3, []))[0])
    assert sent == p.packet(0, b"\x19" + p.UINT32.pack(100)) + execute(102, [])
    client.backend_data(binary_rows())
    client.unlink()
    # statement 1 (evicted) is prepared again, evicting the least recently used (101)
    sent = client.link(state, client.client_data(execute(1, []))[0])
    assert sent == (p.packet(0, b"\x19" + p.UINT32.pack(101)) + prepare(b"SELECT 0") + execute(LAST_STATEMENT, []))
    assert client.ctx.statement_counts.evictions == 2


def test_unknown_ids_close_and_reset():
    client, state = prepared_client()
    forward, local = client.client_data(execute(9, []))
    assert forward == b"" and p.parse_err(local[4:])[0] == 1243
    assert client.client_data(p.packet(0, b"\x19" + p.UINT32.pack(1))) == (b"", b"")     # close: no answer
    assert 1 not in client.statements and (SQL, "app") in state.prepared                   # kept for others
    forward, local = client.client_data(execute(1, [1]))
    assert forward == b"" and p.parse_err(local[4:])[0] == 1243
    # behind a forwarded command the server's own ERR for id 0 answers, in order
    forward, local = client.client_data(prepare() + execute(5, []))
    assert local == b""
    sent = client.link(state, forward)
    assert sent == prepare() + execute(0, [])


def test_cursor_execute_pins_and_fetch_follows_it():
    client, state = prepared_client()
    forward, _ = client.client_data(execute(1, [1], flags=1))
    client.link(state, forward)
    assert client.pinned and client.pin_details[0] == (PinReason.PREPARED_STATEMENT,
                                                       "server-side cursor (COM_STMT_EXECUTE with a cursor)")
    answer = p.packet(1, b"\x01") + column(2) + eof(3, p.SERVER_STATUS_AUTOCOMMIT | p.SERVER_STATUS_CURSOR_EXISTS)
    assert client.backend_data(answer)[0] == answer
    fetch = p.packet(0, b"\x1c" + p.UINT32.pack(1) + p.UINT32.pack(10))
    assert client.client_data(fetch)[0] == p.packet(0, b"\x1c" + p.UINT32.pack(77) + p.UINT32.pack(10))
    client.backend_data(p.packet(1, b"\x00\x00" + p.UINT32.pack(1)) + eof(2))
    # closing the statement closes the cursor on the backend and unpins
    assert client.client_data(p.packet(0, b"\x19" + p.UINT32.pack(1)))[0] == p.packet(0, b"\x1a" + p.UINT32.pack(77))
    assert client.backend_data(ok())[0] == b"" and not client.pinned


def test_a_client_reset_forgets_its_ids_and_a_backend_reset_empties_the_cache():
    client, state = prepared_client()
    assert client.client_data(p.packet(0, b"\x1f")) == (b"", ok())       # COM_RESET_CONNECTION, answered locally
    assert client.statements == {}
    client2, state2 = prepared_client()
    client2.link(state2, b"")
    client2.client_data(p.packet(0, b"\x1f"))
    client2.backend_data(ok())
    assert not state2.prepared and state2.last_key is None and client2.statements == {}


def mysql_state() -> object:
    state = server_state()
    state.mariadb = False           # a MySQL server: no statement id 0xFFFFFFFF
    state.version = b"8.0.36"
    return state


def held_client(options: dict | None = None, **kwargs):
    """A client that prepared SQL (id 1, server id 77) and SQL2 (id 2, server id 78) on a MySQL server."""
    client = logged_in(options=options, **kwargs)
    state = mysql_state()
    for sql, server_id in ((SQL, 77), (SQL2, 78)):
        client.link(state, client.client_data(prepare(sql))[0])
        assert client.backend_data(prepare_ok(server_id))[1] is True
        client.unlink()
    assert not client.pinned and list(client.statements) == [1, 2]
    return client


SQL2 = b"SELECT c FROM u WHERE d = ?"
QUERY = p.packet(0, b"\x03SELECT 1")
QUERY_ANSWER = p.packet(1, b"\x01") + column(2) + eof(3) + p.packet(4, b"\x011") + eof(5)


def answers(client, data: bytes) -> tuple[bytes, bytes, bool]:
    """Feed the backend's answer: (bytes for the client, bytes owed to the backend, release)."""
    out, release = client.backend_data(data)
    owed, client.backend_owed = client.backend_owed, b""
    return out, owed, release


def test_mysql_servers_do_not_pin_and_hold_the_execute_until_the_re_prepare_answers():
    for linked_first in (False, True):
        for parts in chunkings(prepare_ok(31)):
            client = held_client()
            state = mysql_state()
            client.statements[1].types = LONG_TYPE
            if linked_first:
                client.link(state, b"")
                sent = client.client_data(execute(1, [5], types=None))[0]
            else:
                sent = client.link(state, client.client_data(execute(1, [5], types=None))[0])
            assert sent == prepare() and client.holding
            out, owed = b"", b""
            for part in parts:
                got, due, release = answers(client, part)
                out, owed = out + got, owed + due
                assert release is False
            # the execute, with the new id and the client's types again
            assert out == b"" and owed == execute(31, [5], types=LONG_TYPE) and not client.holding
            assert answers(client, binary_rows()) == (binary_rows(), b"", True) and not client.fifo
            assert state.prepared[(SQL, "app")].id == 31
            assert client.ctx.statement_counts.misses == 1 and not client.pinned


def test_the_switch_holds_the_execute_on_mariadb_too():
    client, _ = prepared_client(options={"pipelined_reprepare": "false"})
    state = server_state()
    assert client.link(state, client.client_data(execute(1, [5]))[0]) == prepare()
    assert answers(client, prepare_ok(31)) == (b"", execute(31, [5]), False)
    assert answers(client, binary_rows()) == (binary_rows(), b"", True)


def test_packets_pipelined_behind_a_held_execute_follow_it_in_order():
    client = held_client()
    state = mysql_state()
    sent = client.link(state, client.client_data(execute(1, [1]) + QUERY)[0])
    assert sent == prepare()
    # more arrives while the execute is held: held too, nothing goes to the backend
    assert client.client_data(execute(1, [2]) + QUERY) == (b"", b"")
    out, owed, release = answers(client, prepare_ok(31))
    assert out == b"" and release is False
    assert owed == execute(31, [1]) + QUERY + execute(31, [2]) + QUERY
    assert client.ctx.statement_counts.misses == 1 and client.ctx.statement_counts.hits == 1
    out, owed, release = answers(client, binary_rows(1) + QUERY_ANSWER + binary_rows(2) + QUERY_ANSWER)
    assert out == binary_rows(1) + QUERY_ANSWER + binary_rows(2) + QUERY_ANSWER and owed == b"" and release is True
    # afterwards the plain path again
    client.link(state, b"")
    assert client.client_data(execute(1, [3]))[0] == execute(31, [3])


def test_pipelined_executes_of_two_missing_statements_each_wait_for_their_prepare():
    client = held_client()
    state = mysql_state()
    sent = client.link(state, client.client_data(execute(1, [1]) + execute(2, [2]) + execute(1, [3]))[0])
    assert sent == prepare()
    out, owed, _ = answers(client, prepare_ok(31))
    assert out == b"" and owed == execute(31, [1]) + prepare(SQL2) and client.holding
    out, owed, _ = answers(client, binary_rows(1))
    assert out == binary_rows(1) and owed == b""
    out, owed, _ = answers(client, prepare_ok(32))
    assert out == b"" and owed == execute(32, [2]) + execute(31, [3]) and not client.holding
    out, owed, release = answers(client, binary_rows(2) + binary_rows(3))
    assert out == binary_rows(2) + binary_rows(3) and release is True and not client.fifo
    assert {k[0]: e.id for k, e in state.prepared.items()} == {SQL: 31, SQL2: 32}


def test_a_reset_and_a_fetch_behind_the_held_execute_get_the_new_id():
    client = held_client()
    state = mysql_state()
    reset = p.packet(0, b"\x1a" + p.UINT32.pack(1))
    fetch = p.packet(0, b"\x1c" + p.UINT32.pack(1) + p.UINT32.pack(10))
    client.link(state, b"")
    assert client.client_data(execute(1, [5], flags=1) + fetch + reset)[0] == prepare()
    out, owed, _ = answers(client, prepare_ok(31))
    assert owed == (execute(31, [5], flags=1) + p.packet(0, b"\x1c" + p.UINT32.pack(31) + p.UINT32.pack(10))
                    + p.packet(0, b"\x1a" + p.UINT32.pack(31)))
    cursor = p.packet(1, b"\x01") + column(2) + eof(3, AC_CURSOR)
    rows = p.packet(1, b"\x00\x00" + p.UINT32.pack(1)) + eof(2)
    out, owed, release = answers(client, cursor + rows + ok())
    assert out == cursor + rows + ok() and release is True and not client.fifo and not client.pinned


def test_a_failed_re_prepare_answers_the_held_execute_and_the_rest_goes_on():
    err = p.packet(1, p.err_payload(1146, "42S02", "Table 'app.t' doesn't exist"))
    # alone: the ERR is the answer, the execute never goes
    client = held_client()
    state = mysql_state()
    assert client.link(state, client.client_data(execute(1, [5]))[0]) == prepare()
    assert answers(client, err) == (err, b"", True) and not client.fifo and not client.holding
    assert (SQL, "app") not in state.prepared
    # with packets behind it: they go; another execute of the same statement gets the same error, in order
    client = held_client()
    state = mysql_state()
    client.link(state, client.client_data(execute(1, [5]) + QUERY + execute(1, [6]))[0])
    out, owed, release = answers(client, err)
    assert out == err and release is False and owed == QUERY + execute(0, [6])
    unknown = p.packet(1, p.err_payload(1243, "HY000", "Unknown prepared statement handler"))
    out, owed, release = answers(client, QUERY_ANSWER + unknown)
    assert out == QUERY_ANSWER + err and owed == b"" and release is True and not client.fifo


def test_a_changed_table_answers_1615_for_the_held_execute():
    client = held_client()
    state = mysql_state()
    client.link(state, client.client_data(execute(1, [5]) + QUERY)[0])
    out, owed, release = answers(client, prepare_ok(40, params=1, columns=2))
    assert p.parse_err(out[4:])[0] == 1615 and owed == QUERY and release is False
    out, owed, release = answers(client, QUERY_ANSWER)
    assert out == QUERY_ANSWER and release is True and not client.fifo


def test_long_data_is_held_with_its_execute_and_gets_the_new_id():
    client = held_client()
    piece = p.packet(0, b"\x18" + p.UINT32.pack(1) + b"\x00\x00" + b"x" * 9000)
    assert client.client_data(piece + piece) == (b"", b"")
    state = mysql_state()
    assert client.link(state, client.client_data(execute(1, [0], types=BLOB_TYPE))[0]) == prepare()
    held = p.packet(0, b"\x18" + p.UINT32.pack(31) + b"\x00\x00" + b"x" * 9000)
    assert answers(client, prepare_ok(31)) == (b"", held + held + execute(31, [0], types=BLOB_TYPE), False)


def test_what_is_held_is_bounded_and_dropped_with_the_backend():
    client = held_client()
    client.link(mysql_state(), client.client_data(execute(1, [5]))[0])
    with pytest.raises(ProtocolError) as refused:
        for _ in range(200):
            client.client_data(p.packet(0, b"\x03SELECT '" + b"x" * 9000 + b"'"))
    assert b"max_message_size" in refused.value.reply
    client = held_client()
    client.link(mysql_state(), client.client_data(execute(1, [5]) + QUERY)[0])
    assert client.holding
    client.backend_lost("gone")
    assert not client.holding and not client.held and not client.held_items


def test_fuzzed_statement_commands_never_break_the_relay():
    rng = random.Random(14)
    commands = (0x16, 0x17, 0x18, 0x19, 0x1A, 0x1C)
    for _ in range(300):
        client, state = prepared_client()
        data = b""
        for _ in range(rng.randint(1, 4)):
            body = bytes((rng.choice(commands),)) + p.UINT32.pack(rng.choice((0, 1, 2, LAST_STATEMENT)))
            body += bytes(rng.randrange(256) for _ in range(rng.randint(0, 20)))
            data += p.packet(0, body)
        try:
            forward, _ = client.client_data(data)
        except ProtocolError:
            continue
        sent = client.link(state, forward) if forward else b""
        assert not client.unresolved and (not client.mark or client.mark not in sent)
        # whatever went, the FIFO awaits one answer per answered command sent (the proxy's own included)
        assert all(entry.kind is not None for entry in client.fifo)


def test_reset_while_linked_goes_to_the_backend_with_its_id():
    client, state = prepared_client()
    client.link(state, b"")
    assert client.client_data(p.packet(0, b"\x1a" + p.UINT32.pack(1))) == (p.packet(0, b"\x1a" + p.UINT32.pack(77)), b"")
    assert client.backend_data(ok())[0] == ok()
    # a backend without it answers a COM_PING in its place
    client.unlink()
    client.link(server_state(), b"")
    assert client.client_data(p.packet(0, b"\x1a" + p.UINT32.pack(1))) == (p.packet(0, b"\x0e"), b"")
    assert client.backend_data(ok())[0] == ok()


def test_a_reset_of_the_cursor_statement_unpins():
    client, state = prepared_client()
    client.link(state, client.client_data(execute(1, [1], flags=1))[0])
    client.backend_data(p.packet(1, b"\x01") + column(2) + eof(3, AC_CURSOR))
    assert client.pinned
    assert client.client_data(p.packet(0, b"\x1a" + p.UINT32.pack(1)))[0] == p.packet(0, b"\x1a" + p.UINT32.pack(77))
    assert client.backend_data(ok()) == (ok(), True) and not client.pinned


AC_CURSOR = p.SERVER_STATUS_AUTOCOMMIT | p.SERVER_STATUS_CURSOR_EXISTS


class FakeMariaDB:
    """Just enough of a MariaDB connection for statement commands: ids per connection, 0xFFFFFFFF = the last
    prepared (not on MySQL), COM_STMT_CLOSE without an answer; executing `SELECT n` returns one row holding n."""

    def __init__(self, mysql: bool = False):
        self.state = mysql_state() if mysql else server_state()
        self.statements: dict[int, bytes] = {}
        self.next_id = 0
        self.last_id = None

    def answer(self, sent: bytes) -> bytes:
        out, pos = [], 0
        while pos < len(sent):
            length, _ = p.header(sent, pos)
            payload = sent[pos + 4:pos + 4 + length]
            pos += 4 + length
            command = payload[0]
            if command == 0x16:
                self.next_id += 1
                self.statements[self.next_id] = payload[1:]
                self.last_id = self.next_id
                out.append(prepare_ok(self.next_id, params=0, columns=1))
            elif command == 0x17:
                sid = p.UINT32.unpack_from(payload, 1)[0]
                sid = self.last_id if sid == LAST_STATEMENT and self.state.mariadb else sid
                if sid not in self.statements:
                    out.append(p.packet(1, p.err_payload(1243, "HY000", "Unknown prepared statement handler")))
                else:
                    out.append(binary_rows(int(self.statements[sid].split()[1])))
            elif command == 0x19:
                self.statements.pop(p.UINT32.unpack_from(payload, 1)[0], None)
            elif command in (0x1A, 0x0E, 0x02):
                out.append(ok())
            else:
                raise AssertionError(f"unexpected command 0x{command:02x}")
        return b"".join(out)


@pytest.mark.parametrize("server", ["mariadb", "mysql"])
def test_many_clients_over_few_backends_always_run_the_statement_they_prepared(server):
    rng = random.Random(1405)
    backends = [FakeMariaDB(mysql=server == "mysql") for _ in range(3)]
    clients = [logged_in() for _ in range(5)]
    for client in clients:
        client.ctx.max_prepared_statements = 3
    known = [dict() for _ in clients]          # proxy id -> n, per client
    for _ in range(2000):
        c = rng.randrange(len(clients))
        client, ids = clients[c], known[c]
        op = rng.random()
        if op < 0.25 or not ids:
            n = rng.randrange(8)
            request, expect = prepare(b"SELECT %d" % n), ("prepare", n)
        elif op < 0.35:
            victim = rng.choice(list(ids))
            assert client.client_data(p.packet(0, b"\x19" + p.UINT32.pack(victim))) == (b"", b"")
            del ids[victim]
            continue
        else:
            # one execute, or up to three pipelined in one write, a COM_STMT_RESET behind some
            pids = [rng.choice(list(ids)) for _ in range(rng.choice((1, 1, 2, 3)))]
            request = b"".join(execute(pid, []) for pid in pids)
            expect = ("rows", b"".join(binary_rows(ids[pid]) for pid in pids))
            if rng.random() < 0.2:
                request += p.packet(0, b"\x1a" + p.UINT32.pack(pids[-1]))
                expect = ("rows", expect[1] + ok())
        forward, local = client.client_data(request)
        assert local == b"" and forward
        backend = rng.choice(backends)
        sent = client.link(backend.state, forward)
        out = b""
        for _ in range(4):          # on MySQL, executes held for their re-prepares follow the answers
            got, release = client.backend_data(backend.answer(sent))
            out += got
            sent, client.backend_owed = client.backend_owed, b""
            if not sent:
                break
        assert release is True and not client.fifo and not client.holding
        client.unlink()
        if expect[0] == "prepare":
            assert out[4] == 0 and len(out) == len(prepare_ok(1, params=0, columns=1))
            proxy_id = p.UINT32.unpack_from(out, 5)[0]
            assert proxy_id not in ids
            ids[proxy_id] = expect[1]
        else:
            assert out == expect[1], out
        for fake in backends:
            # nothing leaks on a server: each statement is cached (at most 3) or on its way to being closed
            cached = {entry.id for entry in fake.state.prepared.values()}
            assert len(cached) <= 3 and set(fake.statements) <= cached | set(fake.state.stale_statements)
    counts = clients[0].ctx.statement_counts
    assert counts.hits and counts.misses and counts.evictions
