"""PostgreSQL's declaration for the compiled relay: its Query screen on byte vectors (C and twin), the relay key of a
client in each state, whether a backend serves a key, and the config rules of [proxy] relay."""
from __future__ import annotations

import struct

import pytest

from multiproxy import relay_core as rc
from multiproxy.config import ConfigError, build_config
from multiproxy.engine import ClientQuit
from multiproxy_engines.postgres import PostgresEngine
from multiproxy_engines.postgres import protocol as p
from multiproxy_engines.postgres.compiled_relay import MAX_SCREENED, RELAY_SCREEN_WORDS, relay_rules
from multiproxy_engines.postgres.pinning import analyze, might_pin

from multiproxy_engines.postgres.relay import NOT_PARSED_HERE

from .test_pg_relay import (BIND_COMPLETE, PARSE_COMPLETE, READY_IDLE, SYNC, FLUSH, backend_state, bind,
                            command_complete, describe, execute, link_backend, logged_in_client, parse)

try:
    from multiproxy import _relay
except ImportError:
    _relay = None

WALKERS = [pytest.param(rc.PyWalker, id="python"),
           pytest.param(_relay.Walker if _relay else None, id="c",
                        marks=pytest.mark.skipif(_relay is None, reason="multiproxy._relay is not built"))]


def query(sql: bytes) -> bytes:
    return b"Q" + struct.pack("!I", len(sql) + 5) + sql + b"\0"


def stops(walker_type, data: bytes) -> bool:
    walker = walker_type(**relay_rules()["client"])
    consumed, event, _ = walker.feed(data)
    return event == rc.HANDOVER


RELAYED = [b"SELECT abalance FROM pgbench_accounts WHERE aid = 42;", b"select 1", b"INSERT INTO t VALUES (1)",
           b"SELECT x FROM t ORDER BY 1 LIMIT 5", b"SELECT now()", b"DELETE FROM t WHERE id = 3",
           b"UPDATE pgbench_accounts SET abalance = abalance + 5 WHERE aid = 7;", b" update t set x = 1 returning x",
           b"SELECT * FROM t LIMIT 5 OFFSET 10", b"insert into t (dataset) values (1)",     # "set" in one statement
           b"WITH x AS (SELECT 1) SELECT * FROM x OFFSET 1", b"DELETE FROM t WHERE asset = 1;", b"VALUES (1) OFFSET 0"]
STOPPED = [b"SET search_path = app", b"set application_name = 'x'", b"SELECT set_config('a.b', '1', false)",
           b"RESET ALL", b"DISCARD ALL", b"PREPARE s AS SELECT 1", b"DEALLOCATE s", b"LISTEN chan", b"UNLISTEN *",
           b"CREATE TEMP TABLE t (x int)", b"DECLARE c CURSOR WITH HOLD FOR SELECT 1", b"SELECT pg_advisory_lock(1)",
           b"LOAD 'auto_explain'", b"CLOSE c", b"begin; select 1; commit", b"BEGIN READ ONLY READ WRITE",
           b"START TRANSACTION READ ONLY -- x", b"COPY t FROM STDIN", b"select 1; SeT x = 1",
           b"UPDATE t SET x = 1; SET work_mem = '5MB'", b"UPDATE t SET x = set_config('a.b', '1', false)",
           b"UPDATE t SET x = 1 -- ; SET y", b"SELECT 1 OFFSET 1; SET y = 2", b"selectx set y = 1",
           b"DO $$ BEGIN SET LOCAL x = 1; END $$", b"EXPLAIN ANALYZE SELECT 1 OFFSET 1"]
LOCAL = [(b"BEGIN", rc.TXW_BEGIN), (b"begin work;", rc.TXW_BEGIN), (b"START TRANSACTION", rc.TXW_START),
         (b"BEGIN ISOLATION LEVEL SERIALIZABLE", rc.TXW_BEGIN | 1 << 3),
         (b"START TRANSACTION READ ONLY", rc.TXW_START | 2 << 6)]


@pytest.mark.parametrize("walker_type", WALKERS)
@pytest.mark.parametrize("sql", RELAYED)
def test_harmless_queries_are_relayed(walker_type, sql):
    assert not stops(walker_type, query(sql))


@pytest.mark.parametrize("walker_type", WALKERS)
@pytest.mark.parametrize("sql", STOPPED)
def test_queries_that_pin_track_or_open_a_transaction_stop(walker_type, sql):
    assert stops(walker_type, query(sql))


@pytest.mark.parametrize("walker_type", WALKERS)
@pytest.mark.parametrize("sql,word", LOCAL)
def test_a_lone_begin_is_for_the_relay_to_answer(walker_type, sql, word):
    walker = walker_type(**relay_rules()["client"])
    assert walker.feed(query(sql)) == (0, rc.LOCAL, word)


@pytest.mark.parametrize("walker_type", WALKERS)
def test_every_query_the_python_path_would_act_on_stops(walker_type):
    for sql in STOPPED + RELAYED:
        if analyze(sql.decode()):
            assert stops(walker_type, query(sql)), sql
    assert all(might_pin(word) or word in (b"begin", b"start", b"copy") for word in RELAY_SCREEN_WORDS)


@pytest.mark.parametrize("walker_type", WALKERS)
def test_only_query_sync_and_unnamed_batches_are_relayed_and_a_long_query_stops(walker_type):
    for kind in b"CHFdcfX?":
        assert stops(walker_type, bytes((kind,)) + struct.pack("!I", 4)), chr(kind)
    for kind in b"PBDE":        # malformed as batches
        assert stops(walker_type, bytes((kind,)) + struct.pack("!I", 4) + SYNC), chr(kind)
    assert not stops(walker_type, b"S" + struct.pack("!I", 4))
    assert stops(walker_type, query(b"select " + b"1" * MAX_SCREENED))
    assert stops(walker_type, parse("", "SELECT 1") + SYNC)


# What libpq's PQexecParams sends (pgbench -M extended, psycopg 3 with parameters)
PGBENCH_EXTENDED = (parse("", "SELECT abalance FROM pgbench_accounts WHERE aid = $1;", (23,))
                    + bind(params=(b"42",)) + describe(b"P") + execute() + SYNC)


def walk(walker_type, data: bytes):
    walker = walker_type(**relay_rules()["client"])
    result = walker.feed(data)
    return result, walker.take_count()


@pytest.mark.parametrize("walker_type", WALKERS)
def test_a_batch_of_the_unnamed_statement_is_relayed_whole(walker_type):
    assert walk(walker_type, PGBENCH_EXTENDED) == ((len(PGBENCH_EXTENDED), rc.NONE, -1), 1)
    pipeline = (parse("", "INSERT INTO t VALUES ($1)") + bind(params=(b"1",)) + describe(b"P") + execute()
                + parse("", "SELECT $1::int") + bind(params=(b"2",)) + describe(b"P") + execute() + SYNC)
    assert walk(walker_type, pipeline + PGBENCH_EXTENDED) == ((len(pipeline + PGBENCH_EXTENDED), rc.NONE, -1), 2)


@pytest.mark.parametrize("walker_type", WALKERS)
@pytest.mark.parametrize("case, why", [
    (parse("s1", "SELECT 1") + bind(statement="s1") + execute() + SYNC, "a named statement"),
    (parse("", "SELECT 1") + bind(portal="p1") + execute("p1") + SYNC, "a named portal"),
    (parse("", "SELECT 1") + bind(statement="s1") + execute() + SYNC, "Bind of a named statement"),
    (bind() + execute() + SYNC, "Bind with no Parse right before it"),
    (parse("", "SELECT 1") + SYNC, "Parse not bound at once"),
    (parse("", "SELECT 1") + describe(b"S") + bind() + execute() + SYNC, "Describe of a statement"),
    (parse("", "SELECT 1") + bind() + describe(b"P", "p1") + execute() + SYNC, "Describe of a named portal"),
    (parse("", "SELECT 1") + bind() + execute() + FLUSH, "Flush: the client reads before its Sync"),
    (parse("", "SELECT 1") + bind() + execute() + b"C\0\0\0\6S\0" + SYNC, "Close"),
    (parse("", "BEGIN") + bind() + execute() + SYNC, "BEGIN"),
    (parse("", "SET search_path = app") + bind() + execute() + SYNC, "SET"),
    (parse("", "SELECT set_config($1, $2, false)") + bind() + execute() + SYNC, "set_config"),
    (parse("", "COPY t FROM STDIN") + bind() + execute() + SYNC, "COPY"),
    (parse("", "SELECT pg_advisory_lock($1)") + bind() + execute() + SYNC, "advisory lock"),
    (parse("", "SELECT '" + "x" * MAX_SCREENED + "'") + bind() + execute() + SYNC, "longer than MAX_SCREENED"),
])
def test_a_batch_the_relay_must_not_serve_stops_with_nothing_forwarded(walker_type, case, why):
    (consumed, event, arg), counted = walk(walker_type, query(b"select 1") + case)
    assert (consumed, event, arg, counted) == (len(query(b"select 1")), rc.HANDOVER, case[0], 1), why


@pytest.mark.parametrize("walker_type", WALKERS)
def test_a_parse_waits_for_its_bind_across_reads(walker_type):
    """Split reads: a Parse whose Bind comes in a later read is not forwarded until the whole batch is there."""
    for cut in range(1, len(PGBENCH_EXTENDED)):
        walker = walker_type(**relay_rules()["client"])
        assert walker.feed(PGBENCH_EXTENDED[:cut]) == (0, rc.NONE, -1), cut
        assert walker.feed(PGBENCH_EXTENDED) == (len(PGBENCH_EXTENDED), rc.NONE, -1), cut
        assert walker.take_count() == 1
    walker = walker_type(**relay_rules()["client"])
    first = parse("", "SELECT 1")
    assert walker.feed(first) == (0, rc.NONE, -1)
    assert walker.feed(first + describe(b"S") + SYNC) == (0, rc.HANDOVER, ord("P"))


def test_the_relay_key_follows_the_clients_state():
    engine = PostgresEngine()
    client = logged_in_client()
    key = client.relay_key()
    assert key is not None
    state = backend_state()
    assert engine.relay_serves(key, state)
    # a tracked setting changes the key; a backend without it does not serve the new one
    client.client_data(query(b"SET application_name = 'relayed'"))
    assert client.relay_key() is None                   # a request outstanding
    link_backend(client, state, b"")
    client.backend_data(p.parameter_status("application_name", "relayed") + command_complete("SET") + READY_IDLE)
    client.unlink()
    key = client.relay_key()
    assert key is not None and not engine.relay_serves(key, backend_state())
    # a pin keeps the client on the Python path
    client.client_data(query(b"LISTEN chan"))
    link_backend(client, state, b"")
    client.backend_data(command_complete("LISTEN") + READY_IDLE)
    assert client.pinned
    assert client.relay_key() is None


def test_a_client_of_the_extended_protocol_stays_on_the_python_path_until_it_sends_a_simple_query():
    client = logged_in_client()
    assert client.relay_key() is not None
    client.client_data(parse("", "SELECT 1") + b"S\0\0\0\4")
    link_backend(client, backend_state(), b"")
    client.backend_data(b"1\0\0\0\4" + READY_IDLE)
    client.unlink()
    assert client.relay_key() is None
    assert client.relay_key() is None                   # asked again with nothing new: the same answer
    client.client_data(query(b"select 1"))
    link_backend(client, backend_state(), b"")
    client.backend_data(command_complete("SELECT 1") + READY_IDLE)
    client.unlink()
    assert client.relay_key() is not None


def after_a_request(client, request: bytes, answer: bytes) -> bytes:
    """One request through the Python path: what it sent to the backend."""
    sent, local = client.client_data(request)
    assert local == b""
    sent = link_backend(client, backend_state(), sent)
    out, release = client.backend_data(answer)
    assert release
    client.unlink()
    return sent


def test_clients_of_unnamed_batches_and_of_binds_of_their_named_statements_are_relayed():
    client = logged_in_client()
    client.virtualize = True                           # prepared_statements = "virtualize": named ones do not pin
    assert client.relay_statements() is None
    answer = PARSE_COMPLETE + BIND_COMPLETE + b"n\0\0\0\4" + command_complete("SELECT 1") + READY_IDLE
    after_a_request(client, PGBENCH_EXTENDED, answer)
    assert client.relay_key() is not None              # PQexecParams' batches: the relay serves them
    after_a_request(client, parse("s1", "SELECT 1") + bind(statement="s1") + execute() + SYNC, answer)
    assert client.relay_key() is None                  # a named Parse: the relay stops at it
    # the relay serves Binds of the statement (as Parse and Bind of the unnamed one): relay_statements gives it
    assert client.relay_statements() == {b"s1": b"\0SELECT 1\0\0\0"}
    after_a_request(client, bind(statement="s1") + execute() + SYNC, BIND_COMPLETE + command_complete("SELECT 1")
                    + READY_IDLE)
    assert client.relay_key() is not None
    after_a_request(client, bind(statement="s1", portal="p") + execute("p") + SYNC,
                    BIND_COMPLETE + command_complete("SELECT 1") + READY_IDLE)
    assert client.relay_key() is None                  # a named portal: the relay stops at it
    after_a_request(client, PGBENCH_EXTENDED, answer)
    assert client.relay_key() is not None              # back to unnamed batches
    after_a_request(client, parse("", "SELECT 1") + FLUSH + bind() + execute() + SYNC, answer)
    assert client.relay_key() is None                  # a Flush inside: the relay would stop at it


def test_the_python_path_binds_the_unnamed_statement_only_where_the_client_parsed_it():
    """A client back from the relay (its relayed Parse/Bind/Execute/Sync never seen by the Python path) stops on a
    named Parse, then Binds the unnamed statement alone: the backend it gets may hold another client's unnamed
    statement, so the Bind names a statement nobody has and the server answers that it does not exist."""
    client = logged_in_client()
    assert client.relay_key() is not None              # (in the relay: PGBENCH_EXTENDED relayed, unseen here)
    answer = PARSE_COMPLETE + BIND_COMPLETE + command_complete("SELECT 1") + READY_IDLE
    sent = after_a_request(client, parse("s1", "SELECT 1") + bind(statement="s1") + execute() + SYNC, answer)
    assert NOT_PARSED_HERE not in sent
    assert (client.fifo, client.pending_extended, client.unnamed_held, client.requests, client.syncs_sent) == (
        type(client.fifo)(), False, False, 1, 1)
    alone = bind(params=(b"1",)) + execute() + SYNC
    sent, local = client.client_data(alone)
    assert local == b"" and NOT_PARSED_HERE in sent and len(sent) == len(alone) + len(NOT_PARSED_HERE)
    error = p.error_response("26000", f'prepared statement "{NOT_PARSED_HERE.decode()}" does not exist')
    link_backend(client, backend_state(), sent)
    out, release = client.backend_data(error + READY_IDLE)
    assert release and out.endswith(READY_IDLE)
    client.unlink()
    # its own unnamed statement, parsed and bound in separate round trips on the backend it holds, is bound
    sent, _ = client.client_data(parse("", "SELECT 1") + SYNC)
    link_backend(client, backend_state(), sent)
    assert client.backend_data(PARSE_COMPLETE + READY_IDLE) == (PARSE_COMPLETE + READY_IDLE, False)   # held
    sent, _ = client.client_data(bind() + execute() + SYNC)
    assert sent == bind() + execute() + SYNC
    assert client.backend_data(BIND_COMPLETE + command_complete("SELECT 1") + READY_IDLE)[1]
    client.unlink()
    # a Describe of the unnamed statement is kept from someone else's in the same way; a simple Query drops it
    sent, _ = client.client_data(describe(b"S") + SYNC)
    assert sent == describe(b"S", NOT_PARSED_HERE.decode()) + SYNC


def test_a_parse_that_never_reached_a_backend_does_not_let_a_later_bind_through():
    from multiproxy.engine import ErrorKind
    client = logged_in_client()
    sent, _ = client.client_data(parse("", "SELECT 1") + SYNC)
    assert NOT_PARSED_HERE not in sent
    client.fail_pending(ErrorKind.POOL_TIMEOUT, "no backend")      # the pool could not give one
    sent, _ = client.client_data(bind() + execute() + SYNC)
    assert NOT_PARSED_HERE in sent


def test_a_client_that_quits_has_no_relay_key():
    client = logged_in_client()
    with pytest.raises(ClientQuit):
        client.client_data(b"X\0\0\0\4")
    assert client.relay_key() is None


def config(**proxy) -> dict:
    return {"proxy": proxy, "clusters": {"main": {"engine": "postgres", "hosts": ["db.internal:5432"]}},
            "listeners": [{"name": "pg", "listen": "127.0.0.1:6432", "cluster": "main", "auth": "trust"}]}


def test_relay_compiled_is_refused_with_worker_custody_over_several_workers():
    with pytest.raises(ConfigError) as info:
        build_config(config(relay="compiled", workers=2), "proxy.toml", None)
    assert any("proxy.relay" in problem and "worker_custody" in problem for problem in info.value.problems)
    assert build_config(config(relay="compiled", workers=2, worker_custody=False), "", None).proxy.relay == "compiled"
    assert build_config(config(relay="compiled"), "", None).proxy.relay == "compiled"
    assert build_config(config(), "", None).proxy.relay == "python"
    with pytest.raises(ConfigError):
        build_config(config(relay="c"), "", None)


def test_changing_relay_needs_a_restart():
    from multiproxy.reload import diff
    plan = diff(build_config(config(), "", None), build_config(config(relay="compiled"), "", None))
    assert any(line.startswith("proxy.relay: 'python' -> 'compiled' needs a restart") for line in plan.refused)
