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


def test_a_template_makes_each_client_as_resuming_its_state_would_and_shares_nothing_mutable():
    from dataclasses import replace

    from engines.postgres import protocol as p
    from multiproxy.handover import encode
    from tests.unit.test_pg_handshake import backend_state, make_client

    engine = PostgresEngine()
    first = make_client("trust")
    first.receive_handshake(p.startup_message({"user": "alice", "database": "app", "application_name": "psql",
                                               "options": "-c search_path=app"}))
    first.login_complete(backend_state())
    first.compact()
    t = Template()
    t.state, t.proto_class, t.proto_fields, t.proto_ctx = first.handover_state(), None, None, None
    assert t.state is not None
    ctx_a, ctx_b, ctx_c = (replace(first.ctx, cancel_key=(n, n)) for n in (1, 2, 3))
    made = [t.client(engine, ctx) for ctx in (ctx_a, ctx_b)]    # the first decodes, the second copies
    resumed = engine.resume_client(ctx_c, t.state)
    resumed.compact()
    for client, ctx in zip(made, (ctx_a, ctx_b)):
        assert type(client) is type(resumed)        # compacted, as a parking session leaves it
        assert client.ctx is ctx
        assert encode({k: v for k, v in vars(client).items() if k != "ctx"}) == \
            encode({k: v for k, v in vars(resumed).items() if k != "ctx"})
    assert made[0].relay_key() == made[1].relay_key() == resumed.relay_key() is not None
    copy_a, copy_b = made[1], t.client(engine, ctx_c)
    for name, value in vars(copy_a).items():
        if isinstance(value, (dict, list, set)) and name != "ctx":
            assert value is not getattr(copy_b, name), name
    copy_a.client_params["application_name"] = "changed"
    assert copy_b.client_params["application_name"] == "psql"
