"""Relay logins (multiproxy.relay_logins): when a template no longer holds, and PostgreSQL's part of it."""
from __future__ import annotations

from types import SimpleNamespace

from engines.postgres import PostgresEngine
from engines.postgres.backend import PostgresServerState
from multiproxy.relay_logins import Template


def facts(**params) -> PostgresServerState:
    params = {"server_version": "17.1", "client_encoding": "UTF8", **params}
    return PostgresServerState(params=dict(params), canonical={k: k for k in params},
                               reported=frozenset(params), login_params=dict(params))


def setup():
    engine = PostgresEngine()
    first = facts()
    pool = SimpleNamespace(facts=first, generation=1, draining=False)
    listener = SimpleNamespace(role="writer")
    rt = SimpleNamespace(engine=engine, config=listener, cluster=SimpleNamespace(name="main"), tls_context=None)
    proxy = SimpleNamespace(users=object(), config=SimpleNamespace(proxy=object()),
                            pools={("main", "writer", "u", "db", ()): pool})
    t = Template()
    t.pool, t.facts, t.generation, t.user, t.database, t.variant = pool, first, 1, "u", "db", ()
    t.users, t.listener, t.proxy_config = proxy.users, listener, proxy.config.proxy
    return t, proxy, rt, pool


def test_a_template_holds_while_nothing_it_was_made_from_changed():
    t, proxy, rt, pool = setup()
    assert t.valid(proxy, rt)
    pool.facts = facts()                    # a later login of the pool, with the same parameters: it holds
    assert t.valid(proxy, rt) and t.facts is pool.facts


def test_a_template_goes_when_the_greeting_or_its_setting_changes():
    for change in ("params", "generation", "draining", "users", "listener", "proxy", "pool", "tls"):
        t, proxy, rt, pool = setup()
        if change == "params":
            pool.facts = facts(server_version="18.0")     # a failover to a server that greets otherwise
        elif change == "generation":
            pool.generation = 2
        elif change == "draining":
            pool.draining = True
        elif change == "users":
            proxy.users = object()                       # the users file reloaded
        elif change == "listener":
            rt.config = SimpleNamespace(role="writer")   # the listener's settings reloaded
        elif change == "proxy":
            proxy.config = SimpleNamespace(proxy=object())
        elif change == "pool":
            proxy.pools = {}                             # the pool was dropped
        else:
            rt.tls_context = object()
        assert not t.valid(proxy, rt), change


def test_postgres_cancel_keys_travel_as_backend_key_data():
    engine = PostgresEngine()
    key = engine.new_cancel_key(5, 0)
    data = engine.relay_login_key_bytes(key)
    assert len(data) == 8 and engine.relay_login_key(data) == key
    assert engine.relay_login_refusal == (b"\0\0\0\x08\x04\xd2\x16\x2f", b"N")
