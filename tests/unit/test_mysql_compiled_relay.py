"""MySQL's declaration for the compiled relay: its COM_QUERY screen and stop commands on byte vectors (C and twin), the
response walk against the Python path's own walk on the same answers, the relay key of a client in each state, and
whether a backend serves a key."""
from __future__ import annotations

import pytest

from multiproxy import relay_core as rc
from multiproxy_engines.mysql import MySQLEngine
from multiproxy_engines.mysql import protocol as p
from multiproxy_engines.mysql.compiled_relay import MAX_SCREENED, RELAY_SCREEN_WORDS, relay_rules, relay_serves
from multiproxy_engines.mysql.pinning import Classification, classify, might_matter

from .test_mysql_relay import AC, column, eof, logged_in, ok, query, row, server_state

try:
    from multiproxy import _relay
except ImportError:
    _relay = None

WALKERS = [pytest.param(rc.PyWalker, id="python"),
           pytest.param(_relay.Walker if _relay else None, id="c",
                        marks=pytest.mark.skipif(_relay is None, reason="multiproxy._relay is not built"))]


def com_query(sql: bytes) -> bytes:
    return p.packet(0, bytes((p.COM_QUERY,)) + sql)


def event_of(walker_type, data: bytes) -> int:
    walker = walker_type(**relay_rules()["client"])
    return walker.feed(data)[1]


RELAYED = [b"SELECT c FROM sbtest1 WHERE id=5017", b"select 1", b"DELETE FROM t WHERE id = 3",
           b"SELECT x FROM t ORDER BY 1 LIMIT 5", b"SELECT NOW(), SLEEP(0)", b"SELECT 1; SELECT 2", b"DO 1",
           b"SHOW TABLES", b"SELECT CONNECTION_ID()", b"COMMIT", b"ROLLBACK", b"SAVEPOINT a",
           b"select 1; Commit",      # (they end an autocommit-off client's transaction; nothing outside one)
           b"UPDATE sbtest1 SET k=k+1 WHERE id=5017", b"UPDATE t SET x = 1;",     # one UPDATE's SET: columns
           b"SELECT * FROM t LIMIT 5 OFFSET 10", b"SELECT CAST(x AS CHAR CHARACTER SET utf8mb4)",
           b" select settings from t", b"DELETE FROM t WHERE asset = 1",    # "set" in one SELECT / DELETE
           b"INSERT INTO t VALUES (1)", b"REPLACE INTO t VALUES (1)", b"insert into t set a = 1",
           b"INSERT INTO t (a) VALUES (1) ON DUPLICATE KEY UPDATE a = a + 1"]   # (the insert id: Relay.insert_id)
STOPPED = [b"SET autocommit = 0", b"set names utf8mb4", b"SET SESSION sql_mode = ''", b"SELECT @x", b"SELECT @@sql_mode",
           b"USE other", b"LOCK TABLES t READ", b"SELECT GET_LOCK('a', 1)", b"CREATE TEMPORARY TABLE t (x int)",
           b"PREPARE s FROM 'SELECT 1'", b"SELECT SQL_CALC_FOUND_ROWS * FROM t", b"SELECT FOUND_ROWS()",
           b"HANDLER t OPEN", b"XA START 'x'", b"KILL QUERY 5", b"FLUSH TABLES", b"SELECT LAST_INSERT_ID()",
           b"DROP TABLE t", b"LOAD DATA LOCAL INFILE 'x' INTO TABLE t", b"CALL p()",
           b"INSERT INTO t VALUES (LAST_INSERT_ID())", b"INSERT INTO t SET a = @x", b"INSERT INTO t VALUES (1); SET y = 2",
           b"UPDATE t SET x = 1; SET y = 2", b"UPDATE t SET x = @v",
           b"SET TRANSACTION ISOLATION LEVEL SERIALIZABLE", b"START TRANSACTION READ ONLY", b"BEGIN TRANSACTION",
           b"begin; select 1", b"SELECT 1 OFFSET 1; SET y = 2", b"SELECT 1;SET NAMES latin1", b"SELECT(1); set autocommit=0",
           b"select\tsettings from t; set x = 1"]


@pytest.mark.parametrize("walker_type", WALKERS)
@pytest.mark.parametrize("sql", RELAYED)
def test_harmless_queries_are_relayed_and_counted(walker_type, sql):
    walker = walker_type(**relay_rules()["client"])
    packet = com_query(sql)
    assert walker.feed(packet) == (len(packet), rc.NONE, -1)
    assert walker.take_count() == 1


@pytest.mark.parametrize("walker_type", WALKERS)
@pytest.mark.parametrize("sql", STOPPED)
def test_queries_that_pin_or_track_stop(walker_type, sql):
    assert event_of(walker_type, com_query(sql)) == rc.HANDOVER


@pytest.mark.parametrize("walker_type", WALKERS)
@pytest.mark.parametrize("sql,word", [(b"BEGIN", rc.TXW_BEGIN), (b"begin work;", rc.TXW_BEGIN),
                                      (b"START TRANSACTION", rc.TXW_START)])
def test_a_lone_begin_is_for_the_relay_to_answer(walker_type, sql, word):
    for key in (None, (frozenset(), "app", True, False, False)):
        walker = walker_type(**relay_rules(key)["client"])
        assert walker.feed(com_query(sql)) == (0, rc.LOCAL, word)
    # answered with the lane's status flags: in a transaction, and autocommit as the key says
    began = relay_rules((frozenset(), "app", True, False, False))["client"]["mysql_begin"]
    assert began == p.packet(1, p.ok_payload(p.SERVER_STATUS_IN_TRANS))
    assert relay_rules()["client"]["mysql_begin"] == p.packet(
        1, p.ok_payload(p.SERVER_STATUS_IN_TRANS | p.SERVER_STATUS_AUTOCOMMIT))


@pytest.mark.parametrize("walker_type", WALKERS)
def test_every_query_the_python_path_would_act_on_stops(walker_type):
    for sql in STOPPED + RELAYED:
        if classify(sql.decode()) != Classification():
            assert event_of(walker_type, com_query(sql)) in (rc.HANDOVER, rc.LOCAL), sql
    extra = (b"begin", b"start", b"load", b"call")
    assert all(might_matter(word) or word in extra for word in RELAY_SCREEN_WORDS)


@pytest.mark.parametrize("walker_type", WALKERS)
def test_only_com_query_and_com_ping_are_relayed(walker_type):
    for command in (p.COM_QUIT, p.COM_INIT_DB, p.COM_FIELD_LIST, p.COM_STATISTICS, p.COM_PROCESS_KILL,
                    p.COM_CHANGE_USER, p.COM_STMT_PREPARE, p.COM_STMT_EXECUTE, p.COM_STMT_CLOSE, p.COM_STMT_RESET,
                    p.COM_SET_OPTION, p.COM_RESET_CONNECTION, 0x00, 0xFF):
        assert event_of(walker_type, p.packet(0, bytes((command,)) + b"x")) == rc.HANDOVER, hex(command)
    assert event_of(walker_type, p.packet(0, bytes((p.COM_PING,)))) == rc.NONE
    assert event_of(walker_type, com_query(b"select " + b"1" * MAX_SCREENED)) == rc.HANDOVER
    assert event_of(walker_type, p.packet(1, b"\x03select 1")) == rc.MALFORMED          # not a command's start
    assert event_of(walker_type, p.packet(0, b"")) == rc.MALFORMED


def answers(deprecate_eof: bool) -> list:
    """(answer bytes, the status the relay must end it with) as the server sends them."""
    def end(seq, status=AC):
        return p.packet(seq, p.ok_payload(status, header_byte=p.EOF_HEADER)) if deprecate_eof else eof(seq, status)

    def result(rows, status=AC, seq=1):
        out = p.packet(seq, b"\x02") + column(seq + 1) + column(seq + 2, b"b")
        seq += 3
        if not deprecate_eof:
            out += eof(seq)
            seq += 1
        for values in rows:
            out += row(seq, *values)
            seq += 1
        return out + end(seq, status)

    more = AC | p.SERVER_MORE_RESULTS_EXISTS
    return [
        (ok(1, AC, 3, 7), "I"),
        (ok(1, AC | p.SERVER_STATUS_IN_TRANS), "T"),
        (p.packet(1, p.err_payload(1146, "42S02", "Table 'app.nope' doesn't exist")), "I"),
        (result([(b"1", b"x"), (b"2", b"y" * 300)]), "I"),
        (result([]), "I"),
        (result([(b"1", b"z")], more) + ok(6, more, 1) + result([(b"3", b"w")], AC, 7), "I"),
    ]


@pytest.mark.parametrize("walker_type", WALKERS)
@pytest.mark.parametrize("deprecate_eof", [False, True], ids=["eof", "deprecate_eof"])
def test_the_response_walk_ends_where_the_python_path_releases(walker_type, deprecate_eof):
    key = (frozenset(), "app", True, deprecate_eof, True)
    for answer, status in answers(deprecate_eof):
        walker = walker_type(**relay_rules(key)["server"])
        assert walker.feed(answer) == (len(answer), rc.BOUNDARY, ord(status)), answer
        # the Python path, serving the same COM_QUERY, ends the answer at the same byte
        client = logged_in(deprecate_eof=deprecate_eof)
        client.client_data(com_query(b"SELECT a, b FROM t"))
        client.link(server_state(capabilities=p.CLIENT_DEPRECATE_EOF if deprecate_eof else 0), b"")
        out, release = client.backend_data(answer)
        assert out == answer and release == (status == "I") and not client.fifo


def test_the_relay_key_follows_the_clients_state():
    client = logged_in()
    key = client.relay_key()
    assert key == (frozenset(), "app", True, False, True)
    client.client_data(com_query(b"SET SESSION sql_mode = 'ANSI'"))
    assert client.relay_key() is None                       # a command outstanding
    client.link(server_state(), b"")
    client.backend_data(ok())
    client.unlink()
    assert client.relay_key() == (frozenset({("sql_mode", "'ANSI'")}), "app", True, False, True)
    client.client_data(com_query(b"BEGIN"))                  # answered by the proxy, begun with the next request
    assert client.relay_key() is None
    client.client_data(com_query(b"ROLLBACK"))
    assert client.relay_key() is not None
    client.client_data(com_query(b"SET autocommit = 0"))     # answered by the proxy: a lane of its own
    assert client.relay_key() == (frozenset({("sql_mode", "'ANSI'")}), "app", True, False, False)
    client.client_data(com_query(b"SET autocommit = 1"))
    assert client.relay_key() is not None
    client.client_data(com_query(b"SET @u = 1"))
    client.link(server_state(), b"")
    client.backend_data(ok())
    assert client.pinned and client.relay_key() is None
    assert logged_in(deprecate_eof=True).relay_key()[3] is True


def test_a_backend_serves_a_key_when_nothing_would_be_replayed():
    engine = MySQLEngine()
    key = (frozenset({("sql_mode", "'ANSI'")}), "app", True, False, True)
    assert engine.relay_serves(key, server_state(variables={"sql_mode": "'ANSI'"}))
    assert not engine.relay_serves(key, server_state())
    assert not engine.relay_serves(key, server_state(variables={"sql_mode": "'ANSI'", "wait_timeout": "5"}))
    assert not engine.relay_serves(key, server_state(variables={"sql_mode": "__unknown__"}))
    other_schema = server_state(variables={"sql_mode": "'ANSI'"})
    other_schema.schema = "other"
    assert not engine.relay_serves(key, other_schema)
    assert not engine.relay_serves(key, server_state(variables={"sql_mode": "'ANSI'"}, multi_statements=False))
    assert not engine.relay_serves(key, server_state(variables={"sql_mode": "'ANSI'"}, status=0))
    assert engine.relay_serves(key[:4] + (False,), server_state(variables={"sql_mode": "'ANSI'"}, status=0))
    assert not engine.relay_serves(key[:4] + (False,), server_state(variables={"sql_mode": "'ANSI'"},
                                                                    status=p.SERVER_STATUS_IN_TRANS))
    assert not engine.relay_serves(key, server_state(variables={"sql_mode": "'ANSI'"},
                                                     capabilities=p.CLIENT_DEPRECATE_EOF))
    assert not engine.relay_serves(key, server_state(variables={"sql_mode": "'ANSI'"}, stale_statements=[3]))
    assert relay_serves((frozenset(), "app", True, True, True), server_state(capabilities=p.CLIENT_DEPRECATE_EOF))
    assert relay_rules((frozenset(), "app", True, True, True))["server"]["deprecate_eof"] is True
    assert relay_rules()["server"]["deprecate_eof"] is False


def test_the_last_insert_id_of_inserts_the_relay_served_answers_select_last_insert_id():
    """The relay served INSERTs (their OK packets carried insert ids): the lane hands the last one other than 0 to
    the client object, which answers SELECT LAST_INSERT_ID() with it, as after an INSERT it relayed itself."""
    client = logged_in()
    client.relay_insert_id(42)
    forward, local = client.client_data(query(b"SELECT LAST_INSERT_ID()"))
    assert forward == b"" and b"42" in local
    assert client.last_insert_id == 42
