"""auth_query: clients whose users are not in the users file log in with the verifier the database holds
(PostgreSQL pg_shadow through a SECURITY DEFINER function, MariaDB mysql.user), wrong passwords and unknown users
are refused as usual, and the answers are cached (multiproxy_auth_query_lookups_total counts the queries)."""
from __future__ import annotations

import copy
import threading
import time

import psycopg
import pymysql
import pytest

from multiproxy.auth import UsersFile

from .helpers import metric, metrics_text
from .mysqlkit import BACKEND_PASSWORD, BACKEND_USER, DB, mysql_config, users_toml
from .pgserver import AUTH_DB
from .proxy import free_port
from .test_live_reload import reload_by_signal

pytestmark = pytest.mark.timeout(120)
LOOKUPS = "multiproxy_auth_query_lookups_total"


def lookups(proxy, outcome: str) -> float:
    return metric(metrics_text(proxy), LOOKUPS, cluster="main", outcome=outcome) or 0.0


# ---------------------------------------------------------------------------------------------- PostgreSQL

@pytest.fixture(scope="module")
def pg_roles(pg):
    """aq_scram (SCRAM verifier), aq_md5 (md5 verifier), aq_gone (dropped by the test), aq_expired (its password
    expired): in the database, not in
    the users file; aq_lookup, a plain role that reads verifiers only through a SECURITY DEFINER function."""
    pg.psql("SET password_encryption = 'scram-sha-256'; CREATE ROLE aq_scram LOGIN PASSWORD 'scram-secret';"
            "CREATE ROLE aq_gone LOGIN PASSWORD 'gone-secret';"
            "CREATE ROLE aq_expired LOGIN PASSWORD 'expired-secret' VALID UNTIL '2000-01-01';"
            "SET password_encryption = 'md5'; CREATE ROLE aq_md5 LOGIN PASSWORD 'md5-secret';"
            "CREATE ROLE aq_lookup LOGIN;")
    pg.psql("CREATE FUNCTION public.aq_user_lookup(p_user text, OUT usename name, OUT passwd text) RETURNS SETOF "
            "record LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog AS "
            "'SELECT usename, passwd FROM pg_catalog.pg_shadow WHERE usename = p_user "
            "AND (valuntil IS NULL OR valuntil > now())';"
            "REVOKE ALL ON FUNCTION public.aq_user_lookup(text) FROM public;"
            "GRANT EXECUTE ON FUNCTION public.aq_user_lookup(text) TO aq_lookup;", db=AUTH_DB)
    return pg


def pg_proxy(proxy_factory, pg, cache_seconds: float = 60.0, negative: float = 5.0, lookup_as: str = "aq_lookup",
             query: str = "SELECT * FROM public.aq_user_lookup($1)", config_only: bool = False):
    users = UsersFile()
    users.add("someone", "someone-pw", kinds=["scram_sha_256"])
    cluster = {"engine": "postgres", "hosts": [f"127.0.0.1:{pg.port}"], "backend": {"tls": "disable"},
               "pool": {"mode": "transaction", "max_size": 3},
               "credentials": [{"user": "*", "backend_user": "mp_trust"},
                               {"user": "lookup", "backend_user": lookup_as}],
               "auth_query": {"user": "lookup", "query": query,
                              "cache_seconds": cache_seconds, "negative_cache_seconds": negative}}
    config = {
        "proxy": {"admin_listen": f"127.0.0.1:{free_port()}", "log_level": "info", "auth_failure_delay": 0.0},
        "auth": {"users_file": "users.toml"},
        "clusters": {"main": cluster},
        "listeners": [{"name": "scram", "listen": f"127.0.0.1:{free_port()}", "cluster": "main", "role": "writer",
                       "auth": "scram-sha-256"},
                      {"name": "md5", "listen": f"127.0.0.1:{free_port()}", "cluster": "main", "role": "writer",
                       "auth": "md5"}],
    }
    if config_only:
        return config
    return proxy_factory(config, files={"users.toml": users.dumps()})


def pg_login(proxy, listener: str, user: str, password: str) -> int:
    host, port = proxy.address(listener)
    with psycopg.connect(host=host, port=port, user=user, password=password, dbname=AUTH_DB,
                         connect_timeout=10) as conn:
        return conn.execute("SELECT 40 + 2").fetchone()[0]


def pg_refused(proxy, listener: str, user: str, password: str) -> str:
    with pytest.raises(psycopg.OperationalError) as refused:
        pg_login(proxy, listener, user, password)
    return str(refused.value)


def test_pg_users_looked_up_and_cached(pg_roles, proxy_factory):
    proxy = pg_proxy(proxy_factory, pg_roles)
    assert pg_login(proxy, "scram", "aq_scram", "scram-secret") == 42
    assert pg_login(proxy, "md5", "aq_md5", "md5-secret") == 42
    assert lookups(proxy, "found") == 2
    # Found users are cached: more logins, right or wrong, run no query.
    assert pg_login(proxy, "scram", "aq_scram", "scram-secret") == 42
    assert 'password authentication failed for user "aq_scram"' in pg_refused(proxy, "scram", "aq_scram", "wrong")
    assert 'password authentication failed for user "aq_md5"' in pg_refused(proxy, "md5", "aq_md5", "wrong")
    assert lookups(proxy, "found") == 2 and lookups(proxy, "cached") == 3
    # An unknown user is refused like one with a wrong password, and looked up once per negative TTL.
    unknown = pg_refused(proxy, "scram", "aq_nobody", "whatever")
    assert 'password authentication failed for user "aq_nobody"' in unknown
    pg_refused(proxy, "md5", "aq_nobody", "whatever")
    assert lookups(proxy, "not_found") == 1 and lookups(proxy, "error") == 0
    # The users file still serves its own users and is not looked up.
    assert pg_login(proxy, "scram", "someone", "someone-pw") == 42
    assert lookups(proxy, "found") + lookups(proxy, "not_found") == 3


def test_pg_login_storm_is_one_query(pg_roles, proxy_factory):
    """30 clients of one user not in the users file log in at once: one lookup query, every login served."""
    proxy = pg_proxy(proxy_factory, pg_roles)
    results = []

    def client():
        try:
            results.append(pg_login(proxy, "md5", "aq_md5", "md5-secret"))
        except Exception as exc:    # noqa: BLE001 - reported below
            results.append(exc)
    threads = [threading.Thread(target=client) for _ in range(30)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert results == [42] * 30
    assert lookups(proxy, "found") == 1 and lookups(proxy, "cached") == 29


def test_pg_dropped_user_refused_after_cache_expires(pg_roles, proxy_factory):
    proxy = pg_proxy(proxy_factory, pg_roles, cache_seconds=1.0, negative=30.0)
    assert pg_login(proxy, "scram", "aq_gone", "gone-secret") == 42
    pg_roles.psql("DROP ROLE aq_gone;")
    time.sleep(1.2)
    assert 'password authentication failed for user "aq_gone"' in pg_refused(proxy, "scram", "aq_gone", "gone-secret")
    assert lookups(proxy, "found") == 1 and lookups(proxy, "not_found") == 1


def test_pg_default_query_leaves_expired_passwords_out(pg_roles, proxy_factory):
    """The engine's own query (pg_shadow, read here by the superuser): an expired password is refused although it is
    right; a valid role logs in."""
    proxy = pg_proxy(proxy_factory, pg_roles, lookup_as="postgres", query="")
    assert pg_login(proxy, "md5", "aq_scram", "scram-secret") == 42
    refused = pg_refused(proxy, "scram", "aq_expired", "expired-secret")
    assert 'password authentication failed for user "aq_expired"' in refused
    assert lookups(proxy, "found") == 1 and lookups(proxy, "not_found") == 1


def test_pg_auth_query_follows_a_reload(pg_roles, proxy_factory):
    """auth_query added by a live reload: a user refused before logs in after; removed again: refused again."""
    with_lookup = pg_proxy(proxy_factory, pg_roles, config_only=True)
    without = copy.deepcopy(with_lookup)
    del without["clusters"]["main"]["auth_query"]
    users = UsersFile()
    users.add("someone", "someone-pw", kinds=["scram_sha_256"])
    proxy = proxy_factory(without, files={"users.toml": users.dumps()})
    pg_refused(proxy, "scram", "aq_scram", "scram-secret")
    reload_by_signal(proxy, with_lookup)
    assert pg_login(proxy, "scram", "aq_scram", "scram-secret") == 42
    reload_by_signal(proxy, without)
    pg_refused(proxy, "scram", "aq_scram", "scram-secret")
    assert lookups(proxy, "found") == 1


def test_pg_lookup_failure_is_told(pg_roles, proxy_factory, tmp_path):
    """The lookup user cannot run the query (no such function): the client is told, nothing is cached."""
    users = UsersFile()
    users.add("someone", "someone-pw", kinds=["scram_sha_256"])
    config = {
        "proxy": {"admin_listen": f"127.0.0.1:{free_port()}", "log_level": "info"},
        "auth": {"users_file": "users.toml"},
        "clusters": {"main": {"engine": "postgres", "hosts": [f"127.0.0.1:{pg_roles.port}"],
                              "backend": {"tls": "disable"},
                              "credentials": [{"user": "*", "backend_user": "mp_trust"}],
                              "auth_query": {"user": "lookup", "query": "SELECT * FROM public.no_such_fn($1)"}}},
        "listeners": [{"name": "scram", "listen": f"127.0.0.1:{free_port()}", "cluster": "main", "role": "writer",
                       "auth": "scram-sha-256"}],
    }
    proxy = proxy_factory(config, files={"users.toml": users.dumps()})
    message = pg_refused(proxy, "scram", "aq_scram", "scram-secret")
    assert "could not look user 'aq_scram' up" in message
    assert lookups(proxy, "error") == 1
    assert "no_such_fn" in proxy.log_text()


# ---------------------------------------------------------------------------------------------- MariaDB

@pytest.fixture(scope="module")
def maria_user(mariadb):
    mariadb.sql("CREATE USER IF NOT EXISTS 'aq_native'@'%' IDENTIFIED BY 'aq-native-pw';"
                "CREATE USER IF NOT EXISTS 'aq_expired'@'%' IDENTIFIED BY 'aq-expired-pw' PASSWORD EXPIRE;"
                f"GRANT ALL ON {DB}.* TO 'aq_native'@'%';")
    return mariadb


def test_mariadb_user_looked_up(maria_user, proxy_factory):
    config = mysql_config(maria_user)
    config["proxy"]["auth_failure_delay"] = 0.0
    config["clusters"]["main"]["credentials"].append(
        {"user": "lookup", "backend_user": BACKEND_USER, "password": BACKEND_PASSWORD})
    config["clusters"]["main"]["auth_query"] = {"user": "lookup"}
    proxy = proxy_factory(config, files={"users.toml": users_toml()})
    for _ in range(2):
        conn = pymysql.connect(host=proxy.host, port=proxy.port, user="aq_native", password="aq-native-pw",
                               database=DB, connect_timeout=10, read_timeout=30)
        with conn.cursor() as cur:
            cur.execute("SELECT 40 + 2")
            assert cur.fetchone()[0] == 42
        conn.close()
    with pytest.raises(pymysql.err.OperationalError) as refused:
        pymysql.connect(host=proxy.host, port=proxy.port, user="aq_native", password="wrong", database=DB,
                        connect_timeout=10)
    assert refused.value.args[0] == 1045
    with pytest.raises(pymysql.err.OperationalError) as unknown:
        pymysql.connect(host=proxy.host, port=proxy.port, user="aq_nobody", password="x", database=DB,
                        connect_timeout=10)
    assert unknown.value.args[0] == 1045
    with pytest.raises(pymysql.err.OperationalError) as locked:     # the right password, expired
        pymysql.connect(host=proxy.host, port=proxy.port, user="aq_expired", password="aq-expired-pw", database=DB,
                        connect_timeout=10)
    assert locked.value.args[0] == 1045
    assert lookups(proxy, "found") == 1 and lookups(proxy, "cached") == 2 and lookups(proxy, "not_found") == 2
