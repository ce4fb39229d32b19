"""auth_query, sans-IO: its config, the cache (TTLs, shared lookups, failures not cached), the engines' safe binding
of the user name and reading of stored verifiers, and the LookupUser / user_found turn of the PostgreSQL and MySQL
handshakes."""
from __future__ import annotations

import dataclasses
import hashlib

import gevent
import pytest

from multiproxy.auth import UserRecord, UsersFile, md5_verifier, scram_sha_256_verifier
from multiproxy.auth_lookup import AuthLookup, LookupFailed
from multiproxy.config import AuthQueryConfig, ConfigError, build_config
from multiproxy.engine import AuthFailed, Authenticated, ClientContext, LookupUser, SendToClient
from multiproxy.pinning import PinPolicy
from multiproxy_engines.mysql import MySQLEngine
from multiproxy_engines.mysql import protocol as mp
from multiproxy_engines.mysql.auth import native_scramble, native_verifier
from multiproxy_engines.mysql.client import MySQLClient
from multiproxy_engines.postgres import PostgresEngine
from multiproxy_engines.postgres.client import PostgresClient
from multiproxy_engines.tds import TDSEngine

from .test_pg_handshake import assert_auth_failed, scram_login

PASSWORD = "correct horse"
ENGINES = {"postgres": PostgresEngine(), "mysql": MySQLEngine(), "tds": TDSEngine()}


# ---------------------------------------------------------------- config

def raw(engine: str = "postgres", **auth_query) -> dict:
    return {
        "auth": {"users_file": "users.toml"},
        "clusters": {"main": {"engine": engine, "hosts": ["db.internal"],
                              "credentials": [{"user": "lookup", "password": "pw"}],
                              "auth_query": auth_query}},
        "listeners": [{"name": "l", "listen": "127.0.0.1:6432", "cluster": "main",
                       "auth": "md5" if engine != "tds" else "trust"}],
    }


def problems(config: dict) -> list[str]:
    with pytest.raises(ConfigError) as info:
        build_config(config, "proxy.toml", ENGINES)
    return info.value.problems


def test_config_defaults_and_absence():
    cluster = build_config(raw(user="lookup"), "proxy.toml", ENGINES).clusters["main"]
    assert cluster.auth_query == AuthQueryConfig(user="lookup", query="", database="", cache_seconds=60.0,
                                                 negative_cache_seconds=5.0)
    no_table = raw()
    del no_table["clusters"]["main"]["auth_query"]
    assert build_config(no_table, "proxy.toml", ENGINES).clusters["main"].auth_query is None


def test_config_refuses_tds_bad_placeholders_and_unserved_users():
    (tds,) = problems(raw("tds", user="lookup"))
    assert "clusters.main.auth_query" in tds and "not possible on a tds cluster" in tds
    (pg,) = problems(raw(user="lookup", query="SELECT passwd FROM pg_shadow WHERE usename = 'x'"))
    assert "clusters.main.auth_query.query" in pg and "exactly one $1" in pg
    (my,) = problems(raw("mysql", user="lookup", query="SELECT a FROM t WHERE u = ? OR v = ?"))
    assert "exactly one ?" in my
    (cred,) = problems(raw(user="nobody"))
    assert "clusters.main.auth_query.user" in cred and "no [[clusters.NAME.credentials]] serves user 'nobody'" in cred
    (missing,) = problems(raw())
    assert "clusters.main.auth_query.user" in missing and "missing" in missing
    (ttl,) = problems(raw(user="lookup", cache_seconds=-1))
    assert "cache_seconds" in ttl


# ---------------------------------------------------------------- the engines' binding and verifiers

@pytest.mark.parametrize("user,literal", [
    ("alice", "E'alice'"), ("o'brien", "E'o''brien'"), ("a\\'; DROP ROLE x; --", "E'a\\\\''; DROP ROLE x; --'"),
])
def test_postgres_binds_the_user_as_an_escape_literal(user, literal):
    sql = ENGINES["postgres"].auth_query_sql(PostgresEngine.auth_query_default, user)
    assert sql == (f"SELECT usename, passwd FROM pg_catalog.pg_shadow WHERE usename = {literal} "
                   "AND (valuntil IS NULL OR valuntil > now())")
    with pytest.raises(ValueError):
        ENGINES["postgres"].auth_query_sql("SELECT $1, $1", user)
    assert ENGINES["postgres"].auth_query_sql("SELECT f($1, $10)", "u") == "SELECT f(E'u', $10)"


def test_mysql_binds_the_user_as_a_hex_literal():
    sql = ENGINES["mysql"].auth_query_sql(MySQLEngine.auth_query_default, "o'b\\é")
    assert sql == ("SELECT authentication_string FROM mysql.user WHERE user = X'" + "o'b\\é".encode().hex() + "' "
                   "AND plugin = 'mysql_native_password' AND password_expired = 'N'")


def test_stored_verifiers_become_users_file_kinds():
    scram = scram_sha_256_verifier(PASSWORD, b"0123456789abcdef", 4096)
    pg = ENGINES["postgres"]
    assert pg.auth_query_verifiers(scram) == {"scram_sha_256": scram}
    assert pg.auth_query_verifiers(md5_verifier("bob", PASSWORD)) == {"md5": md5_verifier("bob", PASSWORD)}
    assert pg.auth_query_verifiers("SCRAM-SHA-256$garbage") == {} and pg.auth_query_verifiers("secret") == {}
    stored = "*" + hashlib.sha1(hashlib.sha1(PASSWORD.encode()).digest()).hexdigest().upper()
    assert stored == native_verifier(PASSWORD)
    assert ENGINES["mysql"].auth_query_verifiers(stored) == {"mysql_native_password": stored}
    assert ENGINES["mysql"].auth_query_verifiers("$A$005$xyz") == {}
    assert TDSEngine().auth_query_sql("SELECT ?", "u") is None


# ---------------------------------------------------------------- the cache

class Clock:
    now = 100.0

    def __call__(self):
        return self.now


def test_cache_keeps_found_and_missing_users_for_their_ttls():
    clock, counts, calls = Clock(), {}, []
    lookup = AuthLookup("main", AuthQueryConfig("lookup", "", "", 60.0, 5.0), counts, clock)

    def run(user):
        calls.append(user)
        return {"md5": "md5" + "0" * 32} if user == "bob" else {}
    assert lookup.lookup("bob", run).verifiers == {"md5": "md5" + "0" * 32}
    assert lookup.lookup("eve", run) is None
    clock.now += 4.9
    assert lookup.lookup("bob", run) is not None and lookup.lookup("eve", run) is None
    assert calls == ["bob", "eve"]
    clock.now += 0.2                # eve's 5 s are over, bob's 60 s are not
    lookup.lookup("eve", run)
    lookup.lookup("bob", run)
    assert calls == ["bob", "eve", "eve"]
    clock.now += 60
    lookup.lookup("bob", run)
    assert calls == ["bob", "eve", "eve", "bob"]
    assert counts == {("main", "found"): 2, ("main", "not_found"): 2, ("main", "cached"): 3}


def test_failures_are_not_cached_and_concurrent_lookups_share_one_query():
    counts, calls = {}, []
    lookup = AuthLookup("main", AuthQueryConfig("lookup", "", "", 60.0, 5.0), counts)

    def failing(user):
        calls.append(user)
        raise LookupFailed("down")
    for _ in range(2):
        with pytest.raises(LookupFailed):
            lookup.lookup("bob", failing)
    assert calls == ["bob", "bob"] and not lookup.cache

    def slow(user):
        calls.append(user)
        gevent.sleep(0.05)
        return {"md5": "md5" + "1" * 32}
    greenlets = [gevent.spawn(lookup.lookup, "carol", slow) for _ in range(20)]
    gevent.joinall(greenlets, timeout=5)
    assert all(g.successful() and g.value.name == "carol" for g in greenlets)
    assert calls.count("carol") == 1
    assert counts[("main", "found")] == 1 and counts[("main", "cached")] == 19 and counts[("main", "error")] == 2


def test_zero_ttl_caches_nothing():
    calls = []
    lookup = AuthLookup("main", AuthQueryConfig("lookup", "", "", 0.0, 0.0))
    for _ in range(3):
        lookup.lookup("bob", lambda user: calls.append(user) or {})
    assert len(calls) == 3


# ---------------------------------------------------------------- the handshakes

def pg_client(auth: str = "scram-sha-256") -> PostgresClient:
    config = build_config({
        "auth": {"users_file": "users.toml"},
        "clusters": {"main": {"engine": "postgres", "hosts": ["db.internal:5432"]}},
        "listeners": [{"name": "pg", "listen": "127.0.0.1:6432", "cluster": "main", "auth": auth}],
    }, "", None)
    users = UsersFile.from_dict({"users": {"filed": {"scram_sha_256": scram_sha_256_verifier(
        PASSWORD, b"0123456789abcdef", 4096)}}})
    ctx = ClientContext(listener=config.listeners[0], users=users, tls_available=False, cancel_key=(1, 2),
                        pin_policy=PinPolicy(), max_message_size=1 << 20, auth_query=True)
    return PostgresClient(ctx, mock_secret=b"x" * 32)


class AnsweringClient:
    """Answers each LookupUser as the core does (the record, then the events user_found returns)."""

    def __init__(self, client, records: dict):
        self.client, self.records, self.asked = client, records, []

    def receive_handshake(self, data: bytes) -> list:
        events = self.client.receive_handshake(data)
        out = []
        for event in events:
            if isinstance(event, LookupUser):
                self.asked.append((event.user, event.database))
                events.extend(self.client.user_found(self.records.get(event.user)))
            else:
                out.append(event)
        return out


def test_pg_looked_up_scram_user_logs_in_and_a_wrong_password_fails():
    record = UserRecord("bob", {"scram_sha_256": scram_sha_256_verifier(PASSWORD, b"fedcba9876543210", 4096)})
    client = AnsweringClient(pg_client(), {"bob": record})
    events, _ = scram_login(client, "bob", PASSWORD)
    assert isinstance(events[-1], Authenticated) and events[-1].user == "bob"
    assert client.asked == [("bob", "app")]
    events, _ = scram_login(AnsweringClient(pg_client(), {"bob": record}), "bob", "wrong")
    assert_auth_failed(events, "bob")


def test_pg_unknown_user_fails_like_a_wrong_password_and_the_users_file_is_not_looked_up():
    client = AnsweringClient(pg_client(), {})
    events, _ = scram_login(client, "nobody", PASSWORD)
    assert_auth_failed(events, "nobody")
    assert client.asked == [("nobody", "app")]
    client = AnsweringClient(pg_client(), {})
    events, _ = scram_login(client, "filed", PASSWORD)
    assert isinstance(events[-1], Authenticated) and client.asked == []


def test_pg_lookup_is_a_final_event_and_trust_never_looks_up():
    from multiproxy_engines.postgres import protocol as p
    client = pg_client()
    events = client.receive_handshake(p.startup_message({"user": "bob", "database": "app"}))
    assert events == [LookupUser("bob", "app")]
    events = pg_client("trust").receive_handshake(p.startup_message({"user": "bob", "database": "app"}))
    assert isinstance(events[-1], Authenticated)


CAPS = (mp.CLIENT_PROTOCOL_41 | mp.CLIENT_SECURE_CONNECTION | mp.CLIENT_PLUGIN_AUTH | mp.CLIENT_CONNECT_WITH_DB
        | mp.CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA)


def mysql_login(records: dict, user: str, password: str):
    config = build_config({
        "auth": {"users_file": "users.toml"},
        "clusters": {"main": {"engine": "mysql", "hosts": ["db.internal:3306"]}},
        "listeners": [{"name": "my", "listen": "127.0.0.1:6033", "cluster": "main", "auth": "mysql_native_password"}],
    }, "", None)
    ctx = ClientContext(listener=config.listeners[0], users=UsersFile.empty(), tls_available=False, cancel_key=7,
                        pin_policy=PinPolicy(), max_message_size=1 << 20, client_address=("10.0.0.9", 5000),
                        auth_query=True)
    client = MySQLClient(ctx, MySQLEngine())
    nonce = mp.parse_handshake_v10(client.start()[4:])["nonce"]
    answering = AnsweringClient(client, records)
    response = mp.handshake_response(CAPS, 45, user.encode(), native_scramble(password, nonce), b"app",
                                     b"mysql_native_password")
    return answering.receive_handshake(mp.packet(1, response)), answering


def test_mysql_looked_up_native_user_logs_in_and_others_are_denied():
    record = UserRecord("bob", {"mysql_native_password": native_verifier(PASSWORD)})
    events, client = mysql_login({"bob": record}, "bob", PASSWORD)
    assert isinstance(events[-1], Authenticated) and events[-1].user == "bob" and client.asked == [("bob", "app")]
    for user, password in (("bob", "wrong"), ("nobody", PASSWORD)):
        events, _ = mysql_login({"bob": record}, user, password)
        assert isinstance(events[-1], AuthFailed)
        assert mp.parse_err(events[-1].data[4:])[0] == mp.ER_ACCESS_DENIED_ERROR


def test_cache_stays_bounded():
    clock = Clock()
    lookup = AuthLookup("main", AuthQueryConfig("lookup", "", "", 60.0, 5.0), clock=clock)
    for i in range(10001):
        lookup.lookup(f"u{i}", lambda user: {})
        clock.now += 0.001          # negative answers (5 s) of the first names expire as the names go on
    assert len(lookup.cache) <= 10000
    assert lookup.cached("u10000") == (True, None)
