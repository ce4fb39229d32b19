"""MySQL session state from byte vectors: every SET tracked and replayed, expressions read back, pins that undo,
requests that never reached a backend, BEGIN answered by the proxy, resets in front of each link."""
from __future__ import annotations

import pytest

from multiproxy.engine import ErrorKind, PinReason
from multiproxy_engines.mysql import protocol as p
from multiproxy_engines.mysql.pinning import ALL, MySQLPinReason, classify

from .test_mysql_relay import AC, column, eof, logged_in, ok, query, resultset, server_state

IN_TRANS = p.SERVER_STATUS_IN_TRANS


def linked(client, sql: bytes, state=None):
    """Send `sql` through a freshly linked backend; return what reached the backend."""
    forward, local = client.client_data(query(sql))
    assert local == b""
    return client.link(state or server_state(), forward)


def err(seq=1, code=1064, text="bad"):
    return p.packet(seq, p.err_payload(code, "42000", text))


def text_row(seq, *values):
    return p.packet(seq, b"".join(b"\xfb" if v is None else p.lenenc_str(v) for v in values))


def readback_answer(*values, seq=1, deprecate_eof=False):
    """A result set of one row, as for SELECT @@SESSION.a, @@SESSION.b (with EOFs, or with CLIENT_DEPRECATE_EOF
    none after the columns and an OK with header 0xFE at the end)."""
    out = [p.packet(seq, bytes((len(values),)))]
    seq += 1
    for _ in values:
        out.append(column(seq))
        seq += 1
    if not deprecate_eof:
        out.append(eof(seq))
        seq += 1
    out.append(text_row(seq, *values))
    out.append(p.packet(seq + 1, p.ok_payload(AC, header_byte=0xFE)) if deprecate_eof else eof(seq + 1))
    return b"".join(out)


# ---------------------------------------------------------------- classification

@pytest.mark.parametrize("sql, assigns", [
    ("SET SESSION wait_timeout = 77", {"wait_timeout": "77"}),
    ("SET @@session.net_read_timeout = 60, @@max_join_size = 1000", {"net_read_timeout": "60", "max_join_size": "1000"}),
    ("SET @@local.sql_select_limit = DEFAULT", {"sql_select_limit": "DEFAULT"}),
    ("set innodb_lock_wait_timeout=5, SESSION time_zone='+00:00'", {"innodb_lock_wait_timeout": "5", "time_zone": "'+00:00'"}),
    ("SET NAMES utf8mb4 COLLATE utf8mb4_unicode_ci", {"names": "NAMES utf8mb4 COLLATE utf8mb4_unicode_ci"}),
    ("SET CHARACTER SET latin1", {"names": "CHARACTER SET latin1"}),
    ("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED, READ ONLY", {"tx_isolation": "'READ-COMMITTED'", "tx_read_only": "1"}),
    ("SET transaction_isolation = 'SERIALIZABLE'", {"tx_isolation": "'SERIALIZABLE'"}),
    ("SET autocommit = 0", {}),
    ("SET GLOBAL wait_timeout = 100", {}),
    ("SET @@global.max_connections = 100", {}),
])
def test_plain_settings_are_tracked_not_pinned(sql, assigns):
    found = classify(sql)
    assert found.pins == [] and found.readback == []
    assert found.assigns == assigns


def test_expressions_are_read_back_and_unreplayable_ones_pin():
    found = classify("SET sql_mode = concat(@@sql_mode, ',STRICT_TRANS_TABLES'), time_zone = @@global.time_zone")
    assert found.pins == [] and found.assigns == {}
    assert found.readback == [("sql_mode", "sql_mode"), ("time_zone", "time_zone")]
    assert classify("SET SESSION transaction_isolation = @@global.transaction_isolation").readback == [
        ("tx_isolation", "transaction_isolation")]
    for sql in ("SET timestamp = 1", "SET insert_id = 5", "SET session_track_schema = 1", "SET pseudo_thread_id = 3"):
        (reason, detail), = classify(sql).pins
        assert reason is PinReason.SESSION_VARIABLE and "cannot be replayed" in detail
    assert classify("SET @x = 1, sql_mode = ''").pins[0][0] is MySQLPinReason.USER_VARIABLE
    assert "not understood" in classify("SET wait_timeout").pins[0][1]


def test_what_pinned_is_named_and_undoing_it_is_recognised():
    assert classify("CREATE TEMPORARY TABLE IF NOT EXISTS `Tmp` (a int)").effects == [
        ("pin", PinReason.TEMP_TABLE, "CREATE TEMPORARY TABLE", "Tmp")]
    assert classify("DROP TEMPORARY TABLE IF EXISTS Tmp, other").effects == [
        ("unpin", PinReason.TEMP_TABLE, "Tmp"), ("unpin", PinReason.TEMP_TABLE, "other")]
    assert classify("SELECT GET_LOCK('Job', 5)").effects == [("pin", PinReason.ADVISORY_LOCK, "GET_LOCK()", "job")]
    assert classify("SELECT GET_LOCK(@name, 5)").effects[-1] == ("pin", PinReason.ADVISORY_LOCK, "GET_LOCK()", None)
    assert classify("SELECT RELEASE_LOCK('job')").effects == [("unpin", PinReason.ADVISORY_LOCK, "job")]
    assert classify("SELECT RELEASE_ALL_LOCKS()").effects == [("unpin", PinReason.ADVISORY_LOCK, ALL)]
    assert classify("UNLOCK TABLES").effects == [("unpin", PinReason.TABLE_LOCK, ALL)]
    assert classify("PREPARE St FROM 'SELECT 1'").effects == [("pin", PinReason.SQL_PREPARE, "PREPARE ... FROM", "st")]
    assert classify("DEALLOCATE PREPARE st").effects == [("unpin", PinReason.SQL_PREPARE, "st")]
    assert classify("DROP PREPARE st").effects == [("unpin", PinReason.SQL_PREPARE, "st")]
    assert classify("HANDLER t1 OPEN AS h").effects == [("pin", MySQLPinReason.HANDLER, "HANDLER ... OPEN", "h")]
    assert classify("HANDLER h CLOSE").effects == [("unpin", MySQLPinReason.HANDLER, "h")]


# ---------------------------------------------------------------- tracked settings and their replay

def test_any_session_setting_is_replayed_and_a_default_is_forgotten():
    client = logged_in()
    state_a = server_state()
    linked(client, b"SET SESSION wait_timeout = 77, net_write_timeout = 90", state_a)
    assert client.backend_data(ok()) == (ok(), True)
    client.unlink()
    assert client.variables == {"net_write_timeout": "90", "wait_timeout": "77"} and not client.pinned
    fresh = server_state()
    sent = linked(client, b"SELECT 1", fresh)
    assert sent == (query(b"SET SESSION net_write_timeout = 90, SESSION wait_timeout = 77") + query(b"SELECT 1"))
    assert client.backend_data(ok() + resultset([b"1"])) == (resultset([b"1"]), True)
    client.unlink()
    # back to the default: the backend that has the value is reset on the next link, a fresh one needs nothing
    linked(client, b"SET wait_timeout = DEFAULT", fresh)
    assert client.backend_data(ok()) == (ok(), True)
    client.unlink()
    assert client.variables == {"net_write_timeout": "90"}
    assert linked(client, b"SELECT 1", state_a) == query(b"SET SESSION wait_timeout = DEFAULT") + query(b"SELECT 1")
    assert client.backend_data(ok() + resultset([b"1"])) == (resultset([b"1"]), True)
    client.unlink()
    assert state_a.variables == {"net_write_timeout": "90"}
    # another client's setting left on a backend is taken back to the default
    other = logged_in()
    assert linked(other, b"SELECT 1", state_a) == query(b"SET SESSION net_write_timeout = DEFAULT") + query(b"SELECT 1")


def test_a_setting_the_server_refused_is_not_tracked():
    client = logged_in()
    linked(client, b"SET SESSION wait_timeout = 'x'")
    client.backend_data(err(code=1232))
    assert client.variables == {}


def test_an_expression_is_read_back_in_the_same_borrow_and_the_answer_swallowed():
    client = logged_in()
    state = server_state()
    sent = linked(client, b"SET sql_mode = concat(@@sql_mode, ',STRICT_TRANS_TABLES'), SESSION wait_timeout = @@global.wait_timeout", state)
    assert sent == (query(b"SET sql_mode = concat(@@sql_mode, ',STRICT_TRANS_TABLES'), SESSION wait_timeout = @@global.wait_timeout")
                    + query(b"SELECT @@SESSION.sql_mode, @@SESSION.wait_timeout"))
    out, release = client.backend_data(ok())
    assert (out, release) == (ok(), False)       # the read-back is still outstanding
    answer = readback_answer(b"STRICT_TRANS_TABLES,NO_ENGINE_SUBSTITUTION", b"28800")
    assert client.backend_data(answer[:17]) == (b"", False)        # in pieces: nothing reaches the client
    assert client.backend_data(answer[17:]) == (b"", True)
    assert client.variables == {"sql_mode": "'STRICT_TRANS_TABLES,NO_ENGINE_SUBSTITUTION'", "wait_timeout": "28800"}
    assert state.variables == client.variables and not client.pinned


def test_a_read_back_with_deprecate_eof_and_a_begin_answered_with_an_ok():
    client = logged_in(deprecate_eof=True)
    linked(client, b"SET SESSION sql_mode = concat(@@sql_mode, ',ANSI_QUOTES')")
    answer = ok() + readback_answer(b"ANSI_QUOTES", deprecate_eof=True)
    outputs = [client.backend_data(answer[i:i + 1]) for i in range(len(answer))]
    assert b"".join(out for out, _ in outputs) == ok() and outputs[-1][1] is True
    assert client.variables == {"sql_mode": "'ANSI_QUOTES'"}
    client.unlink()
    assert client.client_data(query(b"BEGIN")) == (b"", ok(status=AC | IN_TRANS))


def test_a_refused_expression_records_what_the_backend_has():
    client = logged_in()
    linked(client, b"SET time_zone = nosuch()")
    assert client.backend_data(err() + readback_answer(b"SYSTEM")) == (err(), True)
    assert client.variables == {"time_zone": "'SYSTEM'"}


def test_a_failed_request_leaves_its_settings_unknown_on_the_backend():
    client = logged_in()
    state = server_state()
    linked(client, b"SET SESSION wait_timeout = 10; SELECT nope", state)
    assert client.backend_data(ok(status=AC | p.SERVER_MORE_RESULTS_EXISTS) + err()) == (
        ok(status=AC | p.SERVER_MORE_RESULTS_EXISTS) + err(), True)
    assert client.variables == {} and state.variables == {"wait_timeout": "__unknown__"}
    client.unlink()
    assert linked(client, b"SELECT 1", state) == query(b"SET SESSION wait_timeout = DEFAULT") + query(b"SELECT 1")


def test_a_null_read_back_is_replayed_as_null():
    client = logged_in()
    linked(client, b"SET character_set_results = (SELECT NULL)")
    assert client.backend_data(ok() + readback_answer(None)) == (ok(), True)
    assert client.variables == {"character_set_results": "NULL"}


# ---------------------------------------------------------------- pins: when they count, what undoes them

def pinned_reasons(client):
    return {reason for reason, _ in client.pin_details}


def test_a_request_that_never_reached_a_backend_changes_nothing():
    client = logged_in()
    forward, _ = client.client_data(query(b"LOCK TABLES t WRITE"))
    assert forward
    reply = client.fail_pending(ErrorKind.POOL_TIMEOUT, "no database connection became free within 5 s")
    assert reply[4] == 0xFF
    assert not client.pinned and client.pin_details == []
    assert client.ctx.pin_policy.detected_total == {} and client.ctx.pin_policy.pinned_now == {}
    forward, _ = client.client_data(query(b"SET SESSION wait_timeout = 5"))
    client.fail_pending(ErrorKind.POOL_TIMEOUT, "no database connection became free within 5 s")
    assert client.variables == {}
    # the same request once a backend is there pins
    linked(client, b"LOCK TABLES t WRITE")
    assert client.pinned and client.ctx.pin_policy.pinned_now["table_lock"] == 1


@pytest.mark.parametrize("pin, undo, reason", [
    (b"LOCK TABLES t READ", b"UNLOCK TABLES", PinReason.TABLE_LOCK),
    (b"FLUSH TABLES WITH READ LOCK", b"UNLOCK TABLES", PinReason.TABLE_LOCK),
    (b"SELECT GET_LOCK('a', 1)", b"SELECT RELEASE_LOCK('a')", PinReason.ADVISORY_LOCK),
    (b"SELECT GET_LOCK('a', 1), GET_LOCK('b', 1)", b"SELECT RELEASE_ALL_LOCKS()", PinReason.ADVISORY_LOCK),
    (b"CREATE TEMPORARY TABLE tt (a int)", b"DROP TEMPORARY TABLE tt", PinReason.TEMP_TABLE),
    (b"CREATE TEMPORARY TABLE tt (a int)", b"DROP TABLE IF EXISTS tt", PinReason.TEMP_TABLE),
    (b"PREPARE s1 FROM 'SELECT 1'", b"DEALLOCATE PREPARE s1", PinReason.SQL_PREPARE),
])
def test_undoing_what_pinned_unpins(pin, undo, reason):
    client = logged_in()
    linked(client, pin)
    client.backend_data(ok())
    assert client.pinned and pinned_reasons(client) == {reason}
    client.client_data(query(undo))             # still linked: pinned sessions keep their backend
    assert client.pinned                        # not before the server confirmed it
    assert client.backend_data(ok()) == (ok(), True)
    assert not client.pinned and client.pin_keys == {}
    assert client.ctx.pin_policy.pinned_now[reason.value] == 0


def test_a_pin_stays_while_something_else_holds_it():
    client = logged_in()
    linked(client, b"SELECT GET_LOCK('a', 1), GET_LOCK('b', 1)")
    client.backend_data(ok())
    client.client_data(query(b"CREATE TEMPORARY TABLE t1 (a int)"))
    client.backend_data(ok())
    client.client_data(query(b"SELECT RELEASE_LOCK('a')"))
    client.backend_data(ok())
    assert client.pinned and pinned_reasons(client) == {PinReason.ADVISORY_LOCK, PinReason.TEMP_TABLE}
    client.client_data(query(b"SELECT RELEASE_LOCK('b')"))
    client.backend_data(ok())
    assert client.pinned and pinned_reasons(client) == {PinReason.TEMP_TABLE}
    client.client_data(query(b"DROP TEMPORARY TABLE t1"))
    client.backend_data(ok())
    assert not client.pinned


def test_an_undo_that_failed_or_is_followed_by_a_new_pin_keeps_the_pin():
    client = logged_in()
    linked(client, b"LOCK TABLES t READ")
    client.backend_data(ok())
    client.client_data(query(b"SELECT nope; UNLOCK TABLES"))
    client.backend_data(err())
    assert client.pinned
    client.client_data(query(b"UNLOCK TABLES; LOCK TABLES u WRITE"))
    client.backend_data(ok())
    assert client.pinned
    client.client_data(query(b"SET @keep = 1; UNLOCK TABLES"))
    client.backend_data(ok())
    assert client.pinned and pinned_reasons(client) == {MySQLPinReason.USER_VARIABLE}


@pytest.mark.parametrize("command", [
    p.packet(0, bytes((p.COM_RESET_CONNECTION,))),
    p.packet(0, bytes((p.COM_CHANGE_USER,)) + b"alice\x00" + b"\x00" + b"app\x00" + b"\x2d\x00"
             + b"mysql_native_password\x00"),
])
def test_reset_connection_and_change_user_to_the_same_user_clear_state_and_unpin(command):
    client = logged_in()
    linked(client, b"SET @x = 1, SESSION wait_timeout = 70")
    client.backend_data(ok())
    client.client_data(query(b"LOCK TABLES t READ"))
    client.backend_data(ok())
    assert client.pinned and client.variables == {"wait_timeout": "70"}
    forward, local = client.client_data(command)
    assert forward == p.packet(0, bytes((p.COM_RESET_CONNECTION,))) and local == b""
    assert client.pinned                        # until the server said OK
    assert client.backend_data(ok()) == (ok(), True)
    assert not client.pinned and client.variables == {} and client.pin_keys == {}
    assert sum(client.ctx.pin_policy.pinned_now.values()) == 0
    # unlinked: answered by the proxy, which forgets the client's settings
    client.unlink()
    linked(client, b"SET SESSION wait_timeout = 70")
    client.backend_data(ok())
    client.unlink()
    forward, local = client.client_data(p.packet(0, bytes((p.COM_RESET_CONNECTION,))))
    assert forward == b"" and local == ok() and client.variables == {}


# ---------------------------------------------------------------- BEGIN answered by the proxy

@pytest.mark.parametrize("begin", [b"BEGIN", b"begin work", b"START TRANSACTION", b"START TRANSACTION READ ONLY"])
def test_begin_is_answered_locally_and_sent_in_front_of_the_next_request(begin):
    client = logged_in()
    assert client.client_data(query(begin)) == (b"", ok(status=AC | IN_TRANS))
    assert client.client_data(p.packet(0, b"\x0e")) == (b"", ok(status=AC | IN_TRANS))     # a ping: still idle
    forward, local = client.client_data(query(b"SELECT 1"))
    assert local == b""
    sent = client.link(server_state(), forward)
    assert sent == query(begin) + query(b"SELECT 1")
    answer = resultset([b"1"], status=AC | IN_TRANS)
    assert client.backend_data(ok(status=AC | IN_TRANS) + answer) == (answer, False)
    client.client_data(query(b"COMMIT"))
    assert client.backend_data(ok()) == (ok(), True)


def test_commit_or_rollback_with_nothing_begun_is_answered_locally():
    client = logged_in()
    assert client.client_data(query(b"BEGIN")) == (b"", ok(status=AC | IN_TRANS))
    assert client.client_data(query(b"COMMIT")) == (b"", ok())
    assert client.client_data(query(b"ROLLBACK")) == (b"", ok())
    assert client.client_data(query(b"START TRANSACTION")) == (b"", ok(status=AC | IN_TRANS))
    assert client.client_data(query(b"rollback work")) == (b"", ok())
    assert client.deferred_begin is None
    # a snapshot is taken when START TRANSACTION WITH CONSISTENT SNAPSHOT runs: forwarded
    forward, local = client.client_data(query(b"START TRANSACTION WITH CONSISTENT SNAPSHOT"))
    assert forward == query(b"START TRANSACTION WITH CONSISTENT SNAPSHOT") and local == b""


def test_begin_behind_replayed_settings_and_a_failed_begin_answers_the_request():
    client = logged_in()
    linked(client, b"SET SESSION TRANSACTION ISOLATION LEVEL SERIALIZABLE")
    client.backend_data(ok())
    client.unlink()
    client.client_data(query(b"START TRANSACTION READ WRITE"))
    forward, _ = client.client_data(query(b"SELECT 1"))
    sent = client.link(server_state(), forward)
    assert sent == (query(b"SET SESSION tx_isolation = 'SERIALIZABLE'") + query(b"START TRANSACTION READ WRITE")
                    + query(b"SELECT 1"))
    refusal = err(code=1792, text="refused")
    # the refusal answers SELECT 1; SELECT 1's own answer, which ran without the transaction, is swallowed
    assert client.backend_data(ok() + refusal + resultset([b"1"])) == (refusal, True)


def test_autocommit_off_after_commit_holds_no_backend():
    client = logged_in()
    assert client.client_data(query(b"SET autocommit = 0")) == (b"", ok(status=0))    # taken without a backend
    assert client.client_data(query(b"COMMIT")) == (b"", ok(status=0))       # nothing open on any backend
    sent = linked(client, b"INSERT INTO t VALUES (1)")
    assert sent == query(b"SET SESSION autocommit = 0") + query(b"INSERT INTO t VALUES (1)")
    assert client.backend_data(ok() + ok(status=IN_TRANS))[1] is False
    client.client_data(query(b"COMMIT"))
    assert client.backend_data(ok(status=0)) == (ok(status=0), True)


# ---------------------------------------------------------------- reset in front of each link

def test_reset_after_transaction_on_mariadb_keeps_the_login_character_set():
    client = logged_in()
    client.ctx.reset_after_transaction = True
    state = server_state(charset=45, capabilities=p.CLIENT_MULTI_STATEMENTS)     # MariaDB
    assert linked(client, b"SELECT 1", state) == p.packet(0, bytes((p.COM_RESET_CONNECTION,))) + query(b"SELECT 1")
    assert client.backend_data(ok() + resultset([b"1"])) == (resultset([b"1"]), True)


def test_reset_after_transaction_resets_then_replays():
    client = logged_in()
    client.ctx.reset_after_transaction = True
    state = server_state(charset=45, capabilities=p.CLIENT_MULTI_STATEMENTS)
    state.mariadb = False       # MySQL: the reset goes back to the server's default character set
    state.prepared["SELECT ?"] = (1, 1, 0)
    sent = linked(client, b"SET SESSION wait_timeout = 50", state)
    assert sent.startswith(p.packet(0, bytes((p.COM_RESET_CONNECTION,))) + query(b"SET NAMES utf8mb4 COLLATE utf8mb4_general_ci"))
    assert sent.endswith(query(b"SET SESSION wait_timeout = 50"))
    assert state.prepared == {}
    assert client.backend_data(ok() + ok() + ok()) == (ok(), True)
    client.unlink()
    sent = linked(client, b"SELECT 1", state)
    assert sent == (p.packet(0, bytes((p.COM_RESET_CONNECTION,)))
                    + query(b"SET NAMES utf8mb4 COLLATE utf8mb4_general_ci, SESSION wait_timeout = 50") + query(b"SELECT 1"))
    assert client.backend_data(ok() + ok() + resultset([b"1"])) == (resultset([b"1"]), True)


def test_reset_after_transaction_with_a_reset_query():
    client = logged_in()
    client.ctx.reset_after_transaction = True
    client.ctx.reset_query = "SET SESSION wait_timeout = DEFAULT"
    sent = linked(client, b"SELECT 1")
    assert sent.startswith(query(b"SET SESSION wait_timeout = DEFAULT")) and sent.endswith(query(b"SELECT 1"))
    out, release = client.backend_data(ok() + ok() + resultset([b"1"]))
    assert (out, release) == (resultset([b"1"]), True)


# ---------------------------------------------------------------- settings taken without a backend

def test_set_autocommit_and_set_names_at_connect_are_answered_locally_and_replayed():
    client = logged_in()
    assert client.client_data(query(b"SET NAMES utf8mb4")) == (b"", ok())
    assert client.client_data(query(b"SET AUTOCOMMIT = 0")) == (b"", ok(status=0))
    assert client.variables == {"names": "NAMES utf8mb4"} and client.autocommit is False
    forward, local = client.client_data(query(b"SELECT 1"))
    assert local == b""
    sent = client.link(server_state(), forward)
    assert sent.endswith(query(b"SELECT 1")) and b"NAMES utf8mb4" in sent and b"autocommit = 0" in sent


@pytest.mark.parametrize("sql", [b"SET NAMES koi8r", b"SET NAMES utf8mb4 COLLATE utf8mb4_0900_ai_ci",
                                 b"SET autocommit = @x", b"SET NAMES utf8mb4, wait_timeout = 5"])
def test_settings_the_proxy_cannot_vouch_for_go_to_a_backend(sql):
    client = logged_in()
    forward, local = client.client_data(query(sql))
    assert forward == query(sql) and local == b""


def test_set_autocommit_inside_a_transaction_goes_to_the_backend():
    client = logged_in()
    client.client_data(query(b"BEGIN"))
    forward, local = client.client_data(query(b"SET autocommit = 1"))
    assert local == b"" and forward.endswith(query(b"SET autocommit = 1"))
