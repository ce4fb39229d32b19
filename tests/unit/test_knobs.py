"""The knobs of issue 15: the engines' backend_query scripts (byte vectors), max_cluster_connections validation and its
cap across pools, the client timeouts of Session (toy engine over real sockets) and the pin log line."""
from __future__ import annotations

import logging
import struct
from types import SimpleNamespace

import gevent
import pytest

from multiproxy.engine import BackendError, PinReason
from multiproxy.pinning import PinPolicy
from multiproxy_engines.mysql import protocol as mp
from multiproxy_engines.mysql.backend import MySQLQuery, MySQLServerState
from multiproxy_engines.postgres import protocol as pp
from multiproxy_engines.postgres.backend import PostgresQuery, PostgresServerState
from multiproxy_engines.tds.backend import TDSQuery, TDSServerState
from multiproxy_engines.tds.wire import messages as tp
from multiproxy_engines.tds.wire import token_stream as tk

from .test_session import setup  # noqa: F401 - the fixture
from .toykit import ToyEngine, ToyProtocol, wait_until

pytestmark = pytest.mark.timeout(15)


# ---------------------------------------------------------------------------------------------- backend_query scripts

def _pg_row(*values) -> bytes:
    body = struct.pack("!H", len(values))
    for value in values:
        body += struct.pack("!i", len(value)) + value.encode()
    return pp.message(b"D", body)


def test_postgres_query_reads_the_first_row_and_tracks_parameters():
    state = PostgresServerState(params={"timezone": "UTC"}, login_params={"timezone": "UTC"})
    script = PostgresQuery("SET TimeZone = 'Europe/Paris'; SHOW max_connections", state)
    assert script.start() == pp.query("SET TimeZone = 'Europe/Paris'; SHOW max_connections")
    reply = (pp.message(b"C", b"SET\x00") + pp.parameter_status("TimeZone", "Europe/Paris") + _pg_row("100")
             + pp.message(b"C", b"SHOW\x00") + pp.ready_for_query())
    assert script.feed(reply[:7]) == b"" and not script.done
    script.feed(reply[7:])
    assert script.done and script.result == ["100"]
    assert state.params["timezone"] == state.login_params["timezone"] == "Europe/Paris"


def test_postgres_query_error_carries_the_servers_sqlstate():
    script = PostgresQuery("SELECT nope()", PostgresServerState(), "init query (clusters.c.backend.init_query)")
    script.start()
    with pytest.raises(BackendError) as info:
        script.feed(pp.error_response("42883", "function nope() does not exist") + pp.ready_for_query())
    assert info.value.code == "42883" and info.value.refused_by_server
    assert "init query (clusters.c.backend.init_query)" in str(info.value)


def test_postgres_query_that_leaves_a_transaction_open_fails():
    script = PostgresQuery("BEGIN", PostgresServerState())
    with pytest.raises(BackendError, match="transaction open"):
        script.feed(pp.message(b"C", b"BEGIN\x00") + pp.ready_for_query(pp.TX_IN_TRANSACTION))


def _my_column(name: bytes) -> bytes:
    return (mp.lenenc_str(b"def") + mp.lenenc_str(b"") * 3 + mp.lenenc_str(name) + mp.lenenc_str(name)
            + b"\x0c" + struct.pack("<HIBHB", 45, 10, 3, 0, 0) + b"\x00\x00")


@pytest.mark.parametrize("deprecate_eof", [False, True])
def test_mysql_query_reads_a_result_set_in_either_eof_mode(deprecate_eof):
    state = MySQLServerState(capabilities=mp.CLIENT_DEPRECATE_EOF if deprecate_eof else 0)
    script = MySQLQuery("SELECT @@max_connections", state)
    assert script.start() == mp.packet(0, b"\x03SELECT @@max_connections")
    end = mp.ok_payload(mp.SERVER_STATUS_AUTOCOMMIT) if not deprecate_eof else b""
    packets = [mp.lenenc_int(1), _my_column(b"@@max_connections")]
    if not deprecate_eof:
        packets.append(mp.eof_payload(mp.SERVER_STATUS_AUTOCOMMIT))
    packets.append(mp.lenenc_str(b"151"))
    packets.append(mp.eof_payload(mp.SERVER_STATUS_AUTOCOMMIT) if not deprecate_eof
                   else b"\xfe" + mp.ok_payload(mp.SERVER_STATUS_AUTOCOMMIT)[1:])
    assert end is not None
    script.feed(b"".join(mp.packet(i + 1, payload) for i, payload in enumerate(packets)))
    assert script.done and script.result == ["151"]


def test_mysql_query_of_several_statements_switches_multi_statements_on_and_off():
    script = MySQLQuery("SET @a = 1; SET @b = 2", MySQLServerState())
    assert script.start() == mp.packet(0, bytes((mp.COM_SET_OPTION,)) + struct.pack("<H", 0))
    assert script.feed(mp.packet(1, mp.eof_payload(mp.SERVER_STATUS_AUTOCOMMIT))) == mp.packet(0, b"\x03SET @a = 1; SET @b = 2")
    more = mp.SERVER_STATUS_AUTOCOMMIT | mp.SERVER_MORE_RESULTS_EXISTS
    assert script.feed(mp.packet(1, mp.ok_payload(more))) == b""        # the second statement's OK is still due
    assert script.feed(mp.packet(2, mp.ok_payload(mp.SERVER_STATUS_AUTOCOMMIT))) == \
        mp.packet(0, bytes((mp.COM_SET_OPTION,)) + struct.pack("<H", 1))
    script.feed(mp.packet(1, mp.eof_payload(mp.SERVER_STATUS_AUTOCOMMIT)))
    assert script.done and script.result == []


def test_mysql_query_error_carries_the_servers_code():
    script = MySQLQuery("SELECT * FROM nope", MySQLServerState(multi_statements=True))
    script.start()
    with pytest.raises(BackendError) as info:
        script.feed(mp.packet(1, mp.err_payload(1146, "42S02", "Table 'mpdb.nope' doesn't exist")))
    assert info.value.code == "1146" and info.value.sqlstate == "42S02" and info.value.refused_by_server


def test_tds_query_reads_the_first_row_and_reports_errors():
    state = TDSServerState()
    script = TDSQuery("SELECT @@MAX_CONNECTIONS", state)
    assert script.start() == tp.encode_message(tp.SQL_BATCH, tp.SqlBatch("SELECT @@MAX_CONNECTIONS").encode(),
                                               state.packet_size)
    cols = [tk.Column("", tk.TypeInfo(tk.INTN, 4))]
    reply = tk.colmetadata(cols) + tk.row(cols, [32767]) + tk.done(tk.DONE_COUNT, rowcount=1)
    script.feed(tp.encode_message(tp.TABULAR_RESULT, reply, 4096))
    assert script.done and script.result == ["32767"]
    failing = TDSQuery("SELECT * FROM nope", state, "init query")
    with pytest.raises(BackendError) as info:
        failing.feed(tp.encode_message(tp.TABULAR_RESULT, tk.error(208, "Invalid object name 'nope'.", 1, 16)
                                       + tk.done(tk.DONE_ERROR), 4096))
    assert info.value.code == "208" and "Invalid object name" in str(info.value)


# ---------------------------------------------------------------------------------------------- config

CLUSTER_TOML = """
[clusters.c]
engine = "postgres"
hosts = ["127.0.0.1:5432"]
[clusters.c.pool]
max_cluster_connections = {cap}
[[listeners]]
name = "l"
listen = "127.0.0.1:6432"
cluster = "c"
auth = "trust"
"""


@pytest.mark.parametrize("value, ok", [("0", True), ("4", True), ('"80%"', True), ('"2.5%"', True), ('"100%"', True),
                                       ("-1", False), ('"0%"', False), ('"120%"', False), ('"lots"', False),
                                       ("true", False), ("4.5", False)])
def test_max_cluster_connections_validation(tmp_path, value, ok):
    from multiproxy.config import ConfigError, load_config
    path = tmp_path / "c.toml"
    path.write_text(CLUSTER_TOML.format(cap=value))
    if ok:
        load_config(str(path))
        return
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert "clusters.c.pool.max_cluster_connections" in str(info.value)


def test_a_percentage_cap_counts_once_the_servers_max_connections_is_known(tmp_path):
    from multiproxy.config import load_config
    path = tmp_path / "c.toml"
    path.write_text(CLUSTER_TOML.format(cap='"50%"'))
    pool = load_config(str(path)).clusters["c"].pool
    assert pool.cluster_cap() == 0 and pool.cluster_cap(200) == 100 and pool.cluster_cap(1) == 1


# ---------------------------------------------------------------------------------------------- Session timeouts

class AnsweringToy(ToyProtocol):
    """The toy protocol telling the core whether an answer is outstanding."""

    def awaiting_answer(self) -> bool:
        return bool(self.outstanding)

    def client_data(self, data: bytes):
        self.requests += data.count(b"\n")
        return super().client_data(data)


class AnsweringToyEngine(ToyEngine):
    def client_protocol(self, ctx):
        return AnsweringToy(ctx)


def _timeouts(s, idle=0.0, transaction=0.0, query=0.0):
    s.proxy.config.proxy.idle_client_timeout = idle
    s.proxy.config.proxy.idle_transaction_timeout = transaction
    s.cluster.pool = s.cluster.pool.__class__(**{**s.cluster.pool.__dict__, "query_timeout": query})
    s.rt.engine = AnsweringToyEngine()
    cancels = []
    s.proxy.cancel = lambda key, engine=None, terminate=False: cancels.append(key)
    return cancels


def test_idle_client_timeout_spares_a_transaction_and_a_running_request(setup):
    s = setup()
    _timeouts(s, idle=0.3)
    client, _ = s.client()
    assert client.ask("BEGIN").startswith("OK")
    gevent.sleep(0.6)                               # idle inside a transaction: left alone
    assert client.ask("COMMIT").startswith("OK")
    assert client.ask("SLEEP 0.6").startswith("OK")   # waiting for an answer: left alone
    assert client.line(timeout=2).startswith("ERROR idle_timeout")   # idle outside: told, then closed
    assert client.closed_by_proxy()
    assert s.proxy.metrics.idle_timeouts == 1


def test_idle_transaction_timeout_closes_the_client_and_its_backend(setup):
    s = setup()
    _timeouts(s, transaction=0.3)
    client, _ = s.client()
    assert client.ask("BEGIN").startswith("OK")
    line = client.line(timeout=2)
    assert line.startswith("ERROR idle_transaction_timeout") and "rolled back" in line
    assert client.closed_by_proxy()
    wait_until(lambda: s.db.closed, what="the backend closed (the server rolls back)")
    other, _ = s.client()                           # outside a transaction it does not apply
    assert other.ask("X").startswith("OK")
    gevent.sleep(0.5)
    assert other.ask("Y").startswith("OK")


def test_query_timeout_cancels_through_the_engine(setup):
    s = setup()
    # margins wide enough for a loaded machine: a starved process wakes from its 0.1 s sleep late
    cancels = _timeouts(s, query=0.8)
    client, session = s.client()
    assert client.ask("SLEEP 0.1").startswith("OK")   # within the limit: no cancel
    assert cancels == []
    client.send("SLEEP 1.4")       # cancelled at 0.8-1.0 s; the toy answers anyway, before the 1 s grace ends
    wait_until(lambda: cancels, timeout=1.3, what="the cancel")
    assert cancels == [session.cancel_key]
    assert client.line(timeout=2).startswith("OK")
    assert s.proxy.metrics.query_timeouts == 1


# ---------------------------------------------------------------------------------------------- the cluster cap

def test_cluster_cap_queues_across_databases_and_evicts_idle_connections(setup):
    s = setup(max_size=3, borrow_timeout=3.0, max_cluster_connections=2)
    a, _ = s.client(database="a")
    b, _ = s.client(database="b")
    assert a.ask("BEGIN").startswith("OK") and b.ask("BEGIN").startswith("OK")
    caps = s.proxy.cluster_caps
    (cap,) = caps.values()
    assert cap.limit == 2 and cap.total == 2
    done = []

    def third():
        c, _ = s.client(database="c")               # its login waits for a slot: both connections are in use
        done.append(c.ask("Z"))
    g = gevent.spawn(third)
    gevent.sleep(0.3)
    assert not done and cap.total == 2
    assert a.ask("COMMIT").startswith("OK")          # a's connection is released: closed to make room for c
    g.join(3)
    assert done and done[0].startswith("OK")
    wait_until(lambda: len(s.db.opened) - len(s.db.closed) <= 2, what="never more than the cap open")
    assert cap.total <= 2 and cap.evictions_total >= 1
    assert b.ask("COMMIT").startswith("OK")
    assert len(s.db.opened) - len(s.db.closed) <= 2


# ---------------------------------------------------------------------------------------------- the pin log line

def test_the_pin_log_line_names_client_user_listener_reason_and_statement(caplog):
    policy = PinPolicy({}, "main")
    session = SimpleNamespace(ctx=SimpleNamespace(client_address=("10.1.2.3", 5555), listener=SimpleNamespace(name="pg")),
                              user="alice")
    with caplog.at_level(logging.INFO, logger="multiproxy.pinning"):
        assert policy.detected(session, PinReason.TEMP_TABLE, "CREATE TEMP TABLE", "CREATE TEMP TABLE t (n int)")
    text = caplog.text
    for part in ("10.1.2.3:5555", "'alice'", "listener pg", "temp_table", "CREATE TEMP TABLE t (n int)", "main"):
        assert part in text, (part, text)
