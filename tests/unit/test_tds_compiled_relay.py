"""SQL Server's (TDS) declaration for the compiled relay: its SQLBatch screen and stop types on byte vectors (C and
twin), the response walk ending where the Python path releases, the relay key of a client in each state, whether a
backend serves a key, and the SET options TDSServerState keeps for it."""
from __future__ import annotations

import pytest

from multiproxy import relay_core as rc
from multiproxy_engines.tds import TDSEngine
from multiproxy_engines.tds.backend import TDSServerState
from multiproxy_engines.tds.compiled_relay import RELAY_CLIENT, relay_rules, relay_serves
from multiproxy_engines.tds.wire import messages as tp
from multiproxy_engines.tds.wire import token_stream as tk

from ..fuzzkit import tds_logged_in

try:
    from multiproxy import _relay
except ImportError:
    _relay = None

WALKERS = [pytest.param(rc.PyWalker, id="python"),
           pytest.param(_relay.Walker if _relay else None, id="c",
                        marks=pytest.mark.skipif(_relay is None, reason="multiproxy._relay is not built"))]


def batch(sql: str, status: int = tp.STATUS_EOM) -> bytes:
    return tp.encode_message(tp.SQL_BATCH, tp.SqlBatch(sql).encode(), 4096, status & ~tp.STATUS_EOM)


RELAYED = ["SELECT 1", "select * from t where id = 5", "  SELECT\n1", "SELECT N'h\u00e9', 2.5",
           "SELECT 1; SELECT 2", "SELECT x FROM t; DELETE FROM t WHERE 1 = 0", "SELECT(1)"]
STOPPED = ["SET NOCOUNT ON", "SELECT 1; SET ANSI_NULLS OFF", "BEGIN TRAN", "SELECT 1; BEGIN TRANSACTION",
           "SELECT 1; COMMIT", "select 1; rollback", "SELECT 1; SAVE TRANSACTION a", "USE other", "SELECT 1; USE x",
           "SELECT 1 INTO #t", "SELECT 1; DECLARE c CURSOR FOR SELECT 1", "SELECT 1; EXEC sp_who",
           "SELECT 1; EXECUTE AS USER = 'x'", "SELECT 1; WAITFOR DELAY '00:00:01'", "SELECT 1; KILL 52",
           "SELECT 1; DBCC FREEPROCCACHE", "SELECT 1; SHUTDOWN", "SELECT CONTEXT_INFO()", "INSERT INTO t VALUES (1)",
           "UPDATE t SET x = 1", "DELETE FROM t", "my_procedure", "sp_who", "WITH a AS (SELECT 1) SELECT * FROM a",
           "-- c\nSELECT 1", "SELECTED", "SELECT_1", "\u00a0SELECT 1"]


@pytest.mark.parametrize("walker_type", WALKERS)
@pytest.mark.parametrize("sql", RELAYED)
def test_select_batches_are_relayed_and_counted(walker_type, sql):
    walker = walker_type(**relay_rules()["client"])
    packet = batch(sql)
    assert walker.feed(packet) == (len(packet), rc.NONE, -1)
    assert walker.take_count() == 1


@pytest.mark.parametrize("walker_type", WALKERS)
@pytest.mark.parametrize("sql", STOPPED)
def test_batches_the_python_path_tracks_stop(walker_type, sql):
    walker = walker_type(**relay_rules()["client"])
    assert walker.feed(batch(sql)) == (0, rc.HANDOVER, tp.SQL_BATCH)


@pytest.mark.parametrize("walker_type", WALKERS)
def test_only_single_packet_sql_batches_are_relayed(walker_type):
    for kind in range(256):
        if kind == tp.SQL_BATCH:
            continue
        walker = walker_type(**relay_rules()["client"])
        assert walker.feed(tp.encode_message(kind, b"\x16\0\0\0" + bytes(18), 4096))[1] == rc.HANDOVER
    for status in (tp.STATUS_EOM | tp.STATUS_RESETCONNECTION, tp.STATUS_EOM | tp.STATUS_RESETCONNECTIONSKIPTRAN,
                   tp.STATUS_EOM | tp.STATUS_IGNORE):
        walker = walker_type(**relay_rules()["client"])
        assert walker.feed(batch("SELECT 1", status))[1] == rc.HANDOVER
    long = tp.encode_message(tp.SQL_BATCH, tp.SqlBatch("SELECT '" + "x" * 3000 + "'").encode(), 4096)
    walker = walker_type(**relay_rules()["client"])
    assert walker.feed(long) == (0, rc.HANDOVER, tp.SQL_BATCH)     # two packets: the first has no EOM


@pytest.mark.parametrize("walker_type", WALKERS)
def test_the_response_walk_ends_where_the_python_path_releases(walker_type):
    body = tk.done(tk.DONE_MORE | tk.DONE_COUNT, 1) * 700 + tk.done()
    reply = tp.encode_message(tp.TABULAR_RESULT, body, 4096)
    assert len(tp.MessageReader().feed(reply)) == 1 and reply[1] == 0      # one message of several packets
    proto = tds_logged_in()
    proto.client_data(batch("SELECT 1"))
    proto.link(TDSServerState(), batch("SELECT 1"))
    walker = walker_type(**relay_rules()["server"])
    for cut in range(0, len(reply), 97):
        out, release = proto.backend_data(reply[cut:cut + 97])
        consumed, event, arg = walker.feed(reply[:cut + 97])
        done = event == rc.BOUNDARY
        assert done == release and (not done or (consumed, arg) == (len(reply), ord("I")))
        walker = walker_type(**relay_rules()["server"])


def test_the_relay_key_follows_the_clients_state():
    proto = tds_logged_in()
    proto.ctx.reset_after_transaction = True
    assert proto.relay_key() is None                       # reset_after_transaction (TDS's default)
    proto.ctx.reset_after_transaction = False
    key = proto.relay_key()
    assert key == (frozenset(), proto.database, proto.packet_size)
    proto.client_data(batch("SET NOCOUNT ON"))
    assert proto.relay_key() is None                       # a request outstanding
    proto.link(TDSServerState(), batch("SET NOCOUNT ON"))
    proto.backend_data(tp.encode_message(tp.TABULAR_RESULT, tk.done()))
    proto.unlink()
    assert proto.relay_key() == (frozenset({("NOCOUNT", "SET NOCOUNT ON")}), proto.database, proto.packet_size)
    proto.options["IMPLICIT_TRANSACTIONS"] = "SET IMPLICIT_TRANSACTIONS ON"
    assert proto.relay_key() is None                       # a SELECT would open a transaction
    del proto.options["IMPLICIT_TRANSACTIONS"]
    proto.packet_size = 8192
    assert proto.relay_key() is None                       # the backends' packet size differs: re-framed in Python
    proto.packet_size = 4096
    proto.client_data(batch("BEGIN TRAN"))
    assert proto.relay_key() is None                       # answered by the proxy, begun lazily
    assert TDSEngine().relay_rules(None)["server"]["response"] == "tds"


def test_a_backend_serves_a_key_with_the_same_options_database_and_packet_size():
    options = frozenset({("NOCOUNT", "SET NOCOUNT ON")})
    state = TDSServerState(database="db")
    assert not relay_serves((options, "db", 4096), state)
    state.options = {"NOCOUNT": "SET NOCOUNT ON"}
    assert not relay_serves((options, "other", 4096), state)
    assert not relay_serves((options, "db", 8192), state)
    assert relay_serves((options, "DB", 4096), state) and state.last_client is RELAY_CLIENT
    state.options = None                                   # unknown (a client reset its session)
    assert not relay_serves((frozenset(), "db", 4096), state)


def test_server_state_options_follow_what_clients_set():
    proto = tds_logged_in()
    proto.ctx.reset_after_transaction = False
    state = TDSServerState()
    state.options = {"DATEFIRST": "SET DATEFIRST 3"}        # left by another client
    proto.client_data(batch("SET NOCOUNT ON"))
    proto.link(state, batch("SET NOCOUNT ON"))
    proto.backend_data(tp.encode_message(tp.TABULAR_RESULT, tk.done()))
    proto.unlink()
    assert state.options == {"DATEFIRST": "SET DATEFIRST 3", "NOCOUNT": "SET NOCOUNT ON"}
    proto.client_data(batch("SELECT 1", tp.STATUS_EOM | tp.STATUS_RESETCONNECTION))
    proto.link(state, batch("SELECT 1"))
    proto.backend_data(tp.encode_message(tp.TABULAR_RESULT, tk.env_reset_ack() + tk.done()))
    proto.unlink()
    assert state.options is None                           # the client reset it: the login's options, unnamed
    proto.ctx.reset_after_transaction = True
    fresh = TDSServerState()
    fresh.last_client = object()
    other = tds_logged_in()
    other.ctx.reset_after_transaction = True
    other.options = {"NOCOUNT": "SET NOCOUNT ON"}
    other.client_data(batch("SELECT 1"))
    other.link(fresh, batch("SELECT 1"))
    assert fresh.options == {"NOCOUNT": "SET NOCOUNT ON"}    # reset, then this client's options replayed


def test_a_backend_a_client_used_last_gets_the_options_it_set_elsewhere_since():
    proto = tds_logged_in()
    proto.ctx.reset_after_transaction = False
    first, second = TDSServerState(), TDSServerState()
    for state, sql in ((first, "SELECT 1"), (second, "SET NOCOUNT ON")):
        proto.client_data(batch(sql))
        proto.link(state, batch(sql))
        proto.backend_data(tp.encode_message(tp.TABULAR_RESULT, tk.done()))
        proto.unlink()
    assert first.last_client is proto.ident and first.options == {}
    proto.client_data(batch("SELECT 2"))
    sent = proto.link(first, batch("SELECT 2"))
    assert "SET NOCOUNT ON" in tp.SqlBatch.decode(tp.MessageReader().feed(sent)[0].data).text
    assert first.options == {"NOCOUNT": "SET NOCOUNT ON"}
