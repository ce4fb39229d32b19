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
from multiproxy_engines.postgres.pinning import might_pin

from .test_pg_relay import READY_IDLE, backend_state, command_complete, link_backend, logged_in_client, parse

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
           b"SELECT x FROM t ORDER BY 1 LIMIT 5", b"SELECT now()", b"DELETE FROM t WHERE id = 3"]
STOPPED = [b"SET search_path = app", b"set application_name = 'x'", b"SELECT set_config('a.b', '1', false)",
           b"RESET ALL", b"DISCARD ALL", b"PREPARE s AS SELECT 1", b"DEALLOCATE s", b"LISTEN chan", b"UNLISTEN *",
           b"CREATE TEMP TABLE t (x int)", b"DECLARE c CURSOR WITH HOLD FOR SELECT 1", b"SELECT pg_advisory_lock(1)",
           b"LOAD 'auto_explain'", b"CLOSE c", b"BEGIN", b"begin; select 1; commit", b"START TRANSACTION",
           b"COPY t FROM STDIN", b"select 1; SeT x = 1"]


@pytest.mark.parametrize("walker_type", WALKERS)
@pytest.mark.parametrize("sql", RELAYED)
def test_harmless_queries_are_relayed(walker_type, sql):
    assert not stops(walker_type, query(sql))


@pytest.mark.parametrize("walker_type", WALKERS)
@pytest.mark.parametrize("sql", STOPPED)
def test_queries_that_pin_track_or_open_a_transaction_stop(walker_type, sql):
    assert stops(walker_type, query(sql))


@pytest.mark.parametrize("walker_type", WALKERS)
def test_every_query_the_pin_screen_would_look_at_stops(walker_type):
    for sql in STOPPED + RELAYED:
        if might_pin(sql):
            assert stops(walker_type, query(sql)), sql
    assert all(might_pin(word) or word in (b"begin", b"start", b"copy") for word in RELAY_SCREEN_WORDS)


@pytest.mark.parametrize("walker_type", WALKERS)
def test_only_query_and_sync_are_relayed_and_a_long_query_stops(walker_type):
    for kind in b"PBDECHFdcfX?":
        assert stops(walker_type, bytes((kind,)) + struct.pack("!I", 4)), chr(kind)
    assert not stops(walker_type, b"S" + struct.pack("!I", 4))
    assert stops(walker_type, query(b"select " + b"1" * MAX_SCREENED))
    assert stops(walker_type, parse("", "SELECT 1"))


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
