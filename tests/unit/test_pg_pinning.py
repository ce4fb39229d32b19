"""classify(): which PostgreSQL statements tie a session to its backend, and which are tracked or transaction-scoped."""
from __future__ import annotations

import pytest

from multiproxy_engines.postgres.pinning import _KEYWORDS, ALL_BUT_IDENTITY, analyze, classify, might_pin
from multiproxy_engines.postgres.pinning import PostgresPinReason as PR
from multiproxy.engine import PinReason as R


def reasons(sql: str) -> set[R]:
    return {reason for reason, _ in classify(sql)}


PINS = [
    # set_config whose scope only the server knows
    ("SELECT set_config('a.b', 'c', is_local)", R.SESSION_VARIABLE),
    ("CREATE TEMP TABLE scratch (id int)", R.TEMP_TABLE),
    ("CREATE TEMPORARY TABLE scratch (id int) ON COMMIT PRESERVE ROWS", R.TEMP_TABLE),
    ("CREATE GLOBAL TEMPORARY TABLE g (id int)", R.TEMP_TABLE),
    ("CREATE TEMP VIEW v AS SELECT 1", R.TEMP_TABLE),
    ("CREATE TEMP SEQUENCE s", R.TEMP_TABLE),
    ("SELECT * INTO TEMP scratch FROM orders", R.TEMP_TABLE),
    ("SELECT 1 AS x INTO TEMPORARY TABLE scratch", R.TEMP_TABLE),
    ("CREATE TABLE pg_temp.scratch (id int)", R.TEMP_TABLE),
    ("LISTEN jobs", PR.LISTEN),
    ("DECLARE c CURSOR WITH HOLD FOR SELECT 1", PR.CURSOR_WITH_HOLD),
    ("DECLARE c NO SCROLL CURSOR WITH HOLD FOR SELECT * FROM t", PR.CURSOR_WITH_HOLD),
    ("PREPARE q AS SELECT 1", R.SQL_PREPARE),
    ("PREPARE q (int) AS SELECT $1", R.SQL_PREPARE),
    ("SELECT pg_advisory_lock(42)", R.ADVISORY_LOCK),
    ("SELECT pg_try_advisory_lock(1, 2)", R.ADVISORY_LOCK),
    ("SELECT pg_advisory_lock_shared(7)", R.ADVISORY_LOCK),
    ("LOAD 'auto_explain'", PR.LOAD),
    # case-insensitivity
    ("create temp table T (id int)", R.TEMP_TABLE),
    ("listen JOBS", PR.LISTEN),
    ("Prepare Q As Select 1", R.SQL_PREPARE),
    ("SELECT PG_ADVISORY_LOCK(1)", R.ADVISORY_LOCK),
    ("load 'x'", PR.LOAD),
    ("declare c cursor with hold for select 1", PR.CURSOR_WITH_HOLD),
    # after comments and leading whitespace
    ("-- note\n  LISTEN jobs", PR.LISTEN),
]

NOT_PINS = [
    "SELECT 1",
    "SET LOCAL search_path = app",
    "SET LOCAL statement_timeout = '1s'",
    "SET application_name = 'billing'",
    "SET TimeZone = 'Europe/Paris'",
    "SET DateStyle = ISO",
    "SET client_encoding = 'UTF8'",
    "SET IntervalStyle = iso_8601",
    "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
    "SET TRANSACTION READ ONLY",
    "SET CONSTRAINTS ALL DEFERRED",
    "RESET application_name",
    "SELECT set_config('search_path', 'app', true)",
    "SELECT set_config('a.b', 'c', TRUE)",
    "CREATE TEMP TABLE scratch (id int) ON COMMIT DROP",
    "CREATE TEMPORARY TABLE s AS SELECT 1 ON COMMIT DROP",
    "CREATE TABLE permanent (id int)",
    "UNLISTEN jobs",
    "SET search_path = app, public",
    "SET SESSION search_path TO app",
    "set statement_timeout = '5s'",
    'SET "search_path" = x',
    "SET extra_float_digits = 3",
    "SET lock_timeout TO 100",
    "SET myapp.tenant = '42'",
    "RESET search_path",
    "RESET ALL",
    "SELECT set_config('search_path', 'app', false)",
    "SELECT set_config('a.b', 'c', FALSE)",
    "SELECT set_config('TimeZone', 'Asia/Tokyo', false)",
    "SELECT set_config('application_name', 'x', false)",
    "CLOSE ALL",
    "CLOSE c",
    "DISCARD TEMP",
    "SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL;",
    "UNLISTEN *",
    "DECLARE c CURSOR FOR SELECT 1",
    "DECLARE c CURSOR WITHOUT HOLD FOR SELECT 1",
    "PREPARE TRANSACTION 'tx1'",
    "COMMIT PREPARED 'tx1'",
    "SELECT pg_advisory_xact_lock(42)",
    "SELECT pg_try_advisory_xact_lock(42)",
    "SELECT pg_advisory_unlock_all()",
    "UPDATE settings SET value = 1",
    "INSERT INTO t (offset_value) VALUES (1)",
    "SELECT 'reset' AS word, template FROM t",
    "SELECT * FROM temperatures",
    "DELETE FROM holdings",
    "EXECUTE q",
]


@pytest.mark.parametrize("sql,reason", PINS, ids=[sql for sql, _ in PINS])
def test_pins(sql, reason):
    assert reason in reasons(sql)


@pytest.mark.parametrize("sql", NOT_PINS)
def test_does_not_pin(sql):
    assert classify(sql) == []


def test_every_reason_comes_with_a_readable_detail():
    for sql, _ in PINS:
        for reason, detail in classify(sql):
            assert isinstance(reason, (R, PR)) and detail


def test_set_detail_names_the_parameter():
    assert classify("DO $$ BEGIN NULL; SET search_path = x; END $$") == [(R.SESSION_VARIABLE, "SET search_path")]


def test_multi_statement_strings_report_each_reason():
    sql = "BEGIN; LOAD 'x'; CREATE TEMP TABLE t (id int); LISTEN jobs; SELECT pg_advisory_lock(1); COMMIT"
    assert reasons(sql) == {PR.LOAD, R.TEMP_TABLE, PR.LISTEN, R.ADVISORY_LOCK}


def test_multi_statement_strings_without_pins():
    assert classify("BEGIN; SET LOCAL search_path = x; SET application_name = 'a'; SELECT 1; COMMIT") == []


def test_on_commit_drop_applies_only_to_its_own_statement():
    sql = "CREATE TEMP TABLE a (id int) ON COMMIT DROP; CREATE TEMP TABLE b (id int)"
    assert [r for r, _ in classify(sql)] == [R.TEMP_TABLE]


def test_set_after_a_semicolon_without_space():
    assert analyze("SELECT 1;SET role = x")[0] == ("set", "role", "x")


def test_set_inside_an_update_is_not_a_session_set():
    assert classify("UPDATE t SET search_path = 'x'") == []


def test_set_config_with_whitespace_before_the_flag():
    assert analyze("SELECT set_config( 'a.b' , 'c' , false )")[0] == ("set", "a.b", "c")
    assert classify("SELECT set_config( 'a.b' , 'c' , true )") == []


@pytest.mark.parametrize("sql", ["SET TIME ZONE 'UTC'", "SET TIME ZONE LOCAL", "SET NAMES 'UTF8'"])
def test_standard_spellings_of_tracked_parameters_do_not_pin(sql):
    assert classify(sql) == []


@pytest.mark.parametrize("word", _KEYWORDS)
def test_might_pin_screens_for_every_keyword_in_any_case(word):
    assert might_pin(b"SELECT 1; " + word.upper() + b" x")
    assert might_pin(b"select " + word)


def test_might_pin_lets_plain_queries_through():
    assert not might_pin(b"SELECT abalance FROM pgbench_accounts WHERE aid = 48213;")
    assert not might_pin(b"")


S = R.SESSION_VARIABLE


@pytest.mark.parametrize("sql,effects", [
    ("SET extra_float_digits = 3", [("set", "extra_float_digits", "3"), ("unpin", S, "extra_float_digits")]),
    ("SET SESSION statement_timeout TO '4321'", [("set", "statement_timeout", "4321"), ("unpin", S, "statement_timeout")]),
    ("SET search_path = App, public", [("set", "search_path", "app, public"), ("unpin", S, "search_path")]),
    ('SET search_path TO "$user", public', [("set", "search_path", '"$user", public'), ("unpin", S, "search_path")]),
    ("SET search_path = 'My Schema', public", [("set", "search_path", '"My Schema", public'), ("unpin", S, "search_path")]),
    ("SET lock_timeout = '1s'", [("set", "lock_timeout", "1s"), ("unpin", S, "lock_timeout")]),
    ("SET myapp.name = 'it''s'", [("set", "myapp.name", "it's"), ("unpin", S, "myapp.name")]),
    ("SET extra_float_digits TO DEFAULT", [("reset", "extra_float_digits"), ("unpin", S, "extra_float_digits")]),
    ("SELECT set_config('search_path', 'a, b', false)", [("set", "search_path", "a, b"), ("unpin", S, "search_path")]),
    ("RESET lock_timeout", [("reset", "lock_timeout"), ("unpin", S, "lock_timeout")]),
    ("RESET ALL", [("reset", None), ("unpin", S, ALL_BUT_IDENTITY)]),
    ("RESET TimeZone", []),
    ("SET TimeZone = 'UTC'", []),
    ("SELECT set_config('TimeZone', 'Asia/Tokyo', false)", []),
    ("SET LOCAL lock_timeout = 1", []),
    ("SELECT set_config('lock_timeout', '1', true)", []),
])
def test_plain_settings_are_tracked_not_pinned(sql, effects):
    assert analyze(sql) == effects


@pytest.mark.parametrize("sql,effect", [
    ("UNLISTEN *", ("unpin", PR.LISTEN, None)),
    ("UNLISTEN jobs", ("unpin", PR.LISTEN, "jobs")),
    ("CLOSE ALL", ("unpin", PR.CURSOR_WITH_HOLD, None)),
    ("CLOSE C", ("unpin", PR.CURSOR_WITH_HOLD, "c")),
    ("DISCARD TEMP", ("unpin", R.TEMP_TABLE, None)),
    ("DISCARD TEMPORARY", ("unpin", R.TEMP_TABLE, None)),
    ("SELECT pg_advisory_unlock_all()", ("unpin", R.ADVISORY_LOCK, None)),
])
def test_resets_undo_their_pins(sql, effect):
    assert analyze(sql) == [effect]


def test_pins_name_what_can_undo_them():
    assert analyze("LISTEN Jobs") == [("pin", PR.LISTEN, "LISTEN", "jobs")]
    assert analyze('DECLARE "C" CURSOR WITH HOLD FOR SELECT 1') == [
        ("pin", PR.CURSOR_WITH_HOLD, "DECLARE ... WITH HOLD", "C")]


def test_effects_come_in_statement_order():
    assert [e[0] for e in analyze("CLOSE ALL; DECLARE c CURSOR WITH HOLD FOR SELECT 1")] == ["unpin", "pin"]
    asyncpg_reset = "SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL;"
    assert [e[0] for e in analyze(asyncpg_reset)] == ["unpin", "unpin", "unpin", "reset", "unpin"]


@pytest.mark.parametrize("sql", [
    "CREATE FUNCTION f() RETURNS void AS $$ BEGIN NULL; SET statement_timeout = 1; END $$ LANGUAGE plpgsql",
    "DO $body$ BEGIN PERFORM set_config('lock_timeout', '1', false); END $body$",
])
def test_settings_inside_dollar_quoted_bodies_pin_and_are_not_tracked(sql):
    effects = analyze(sql)
    assert effects and all(e[0] == "pin" for e in effects)


@pytest.mark.parametrize("sql,effects", [
    # values only the server can compute: read back after the request, in the same borrow
    ("SELECT set_config('search_path', current_setting('search_path') || ',x', false)",
     [("readback", "search_path"), ("unpin", S, "search_path")]),
    ("SELECT set_config('a.b', current_user, false)", [("readback", "a.b"), ("unpin", S, "a.b")]),
    ("SELECT set_config(name, 'c', false) FROM t", [("readback", None)]),
    ("SET search_path = 'My \"Schema', public", [("readback", "search_path"), ("unpin", S, "search_path")]),
    ("set SEARCH_PATH = lower('X')", [("readback", "search_path"), ("unpin", S, "search_path")]),
    ("SELECT set_config('TimeZone', current_setting('TimeZone'), false)", []),     # reported: ParameterStatus
    ("SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL SERIALIZABLE",
     [("readback", "default_transaction_isolation"), ("readback", "default_transaction_deferrable")]),
    ("SELECT set_config('a,b', 'c)', false)", [("set", "a,b", "c)"), ("unpin", S, "a,b")]),
])
def test_values_only_the_server_knows_are_read_back(sql, effects):
    assert analyze(sql) == effects


@pytest.mark.parametrize("sql,effects", [
    ("SET ROLE reporting", [("set", "role", "reporting"), ("unpin", S, "role")]),
    ('SET ROLE "Mixed"', [("set", "role", "Mixed"), ("unpin", S, "role")]),
    ("SET role = 'x'", [("set", "role", "x"), ("unpin", S, "role")]),
    ("SET ROLE NONE", [("reset", "role"), ("unpin", S, "role")]),
    ("RESET ROLE", [("reset", "role"), ("unpin", S, "role")]),
    ("SELECT set_config('role', 'bob', false)", [("set", "role", "bob"), ("unpin", S, "role")]),
    ("SET SESSION AUTHORIZATION bob",
     [("set", "session_authorization", "bob"), ("unpin", S, "session_authorization"), ("reset", "role")]),
    ("SET SESSION AUTHORIZATION DEFAULT",
     [("reset", "session_authorization"), ("unpin", S, "session_authorization"), ("reset", "role")]),
    ("RESET SESSION AUTHORIZATION",
     [("reset", "session_authorization"), ("unpin", S, "session_authorization"), ("reset", "role")]),
    ("SET LOCAL ROLE bob", []),
])
def test_session_identity_is_tracked(sql, effects):
    assert analyze(sql) == effects


@pytest.mark.parametrize("sql", ["SET transaction_isolation = 'serializable'",
                                 "SELECT set_config('transaction_read_only', 'on', false)",
                                 "SET SESSION transaction_deferrable = on"])
def test_settings_of_the_current_transaction_are_not_tracked(sql):
    assert analyze(sql) == []


def test_discard_all_resets_everything_and_undoes_every_pin_but_load():
    effects = analyze("DISCARD ALL")
    assert effects[0] == ("discard",)
    assert {e[1] for e in effects[1:]} == {R.SESSION_VARIABLE, R.TEMP_TABLE, PR.LISTEN, PR.CURSOR_WITH_HOLD,
                                           R.SQL_PREPARE, R.ADVISORY_LOCK, R.PREPARED_STATEMENT}
    assert all(e[0] == "unpin" and e[2] is None for e in effects[1:])
