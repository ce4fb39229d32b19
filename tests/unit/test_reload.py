"""Live reload: the difference between two configs (what applies live, what needs a restart), and pools resized over
real sockets to the toy database (tests/unit/toykit.py)."""
from __future__ import annotations

import copy
import dataclasses
import time

import gevent
import pytest

from multiproxy.config import build_config
from multiproxy.pool import Pool
from multiproxy.reload import diff, flatten

from .toykit import StubProxy, ToyDatabase, ToyEngine, check_counts, make_cluster, wait_until

pytestmark = pytest.mark.timeout(10)

BASE = {
    "proxy": {"admin_listen": "127.0.0.1:9930"},
    "clusters": {"main": {"engine": "postgres", "hosts": ["127.0.0.1:5432"],
                          "pool": {"max_size": 3},
                          "credentials": [{"user": "*", "password": "old-secret"}]}},
    "listeners": [{"name": "pg", "listen": "127.0.0.1:6432", "cluster": "main", "auth": "trust"}],
}


def config(change=None):
    raw = copy.deepcopy(BASE)
    if change:
        change(raw)
    return build_config(raw, "")


def test_an_unchanged_config_is_an_empty_plan():
    plan = diff(config(), config())
    assert plan.empty and not plan.refused


def test_pool_settings_apply_live_one_line_per_key():
    def bigger(raw):
        raw["clusters"]["main"]["pool"].update(max_size=10, borrow_timeout=2.5)
        raw["clusters"]["main"]["backend"] = {"connect_timeout": 1.5}
        raw["proxy"]["idle_client_timeout"] = 60
    plan = diff(config(), config(bigger))
    assert plan.refused == []
    assert plan.changes == ["proxy.idle_client_timeout: 0.0 -> 60.0",
                            "clusters.main.backend.connect_timeout: 5.0 -> 1.5",
                            "clusters.main.pool.max_size: 3 -> 10",
                            "clusters.main.pool.borrow_timeout: 5.0 -> 2.5"]
    assert plan.clusters_changed == ["main"] and plan.proxy_changed == ["idle_client_timeout"]


def test_secrets_are_never_logged():
    def rotate(raw):
        raw["clusters"]["main"]["credentials"][0]["password"] = "new-secret"
    plan = diff(config(), config(rotate))
    assert plan.changes == ["clusters.main.credentials[0].password: (changed)"]
    assert "secret" not in " ".join(plan.changes)


def test_restart_only_settings_are_refused_with_the_reason():
    def workers(raw):
        raw["proxy"].update(workers=4, admin_listen="127.0.0.1:9931")
        raw["clusters"]["main"]["pool"]["max_size"] = 5
    plan = diff(config(), config(workers))
    assert plan.refused == [
        "proxy.workers: 1 -> 4 needs a restart (the worker processes are forked at start)",
        "proxy.admin_listen: '127.0.0.1:9930' -> '127.0.0.1:9931' needs a restart (the admin HTTP server is bound "
        "once, at start)"]
    assert "clusters.main.pool.max_size: 3 -> 5" in plan.changes    # reported, but nothing applies with a refusal


def test_worker_custody_changes_only_with_a_restart():
    def custody_off(raw):
        raw["proxy"]["worker_custody"] = False
    plan = diff(config(), config(custody_off))
    assert plan.refused == ["proxy.worker_custody: True -> False needs a restart (the supervisor sets up the custody "
                            "of clients when it forks the workers)"]


def test_a_clusters_engine_cannot_change_under_its_clients():
    def mysql(raw):
        raw["clusters"]["main"]["engine"] = "mysql"
    plan = diff(config(), config(mysql))
    assert plan.refused[0].startswith("clusters.main.engine: 'postgres' -> 'mysql' needs a restart")
    assert [r.split(":")[0] for r in plan.refused] == ["clusters.main.engine", "listeners.pg.cluster"]


def test_a_listener_moved_to_a_cluster_of_another_engine_is_refused():
    def other(raw):
        raw["clusters"]["my"] = {"engine": "mysql", "hosts": ["127.0.0.1:3306"]}
        raw["listeners"][0]["cluster"] = "my"
    plan = diff(config(), config(other))
    assert plan.clusters_added == ["my"]
    assert [r.split(":")[0] for r in plan.refused] == ["listeners.pg.cluster"]
    assert "from postgres to mysql" in plan.refused[0]


def test_listeners_added_removed_changed_and_moved():
    def listeners(raw):
        raw["listeners"] = [
            {"name": "pg", "listen": "127.0.0.1:6432", "cluster": "main", "auth": "trust",
             "max_client_connections": 5},
            {"name": "pg2", "listen": "127.0.0.1:6433", "cluster": "main", "auth": "trust", "role": "reader"}]
    first, second = config(), config(listeners)
    plan = diff(first, second)
    assert plan.refused == [] and plan.listeners_added == ["pg2"] and plan.listeners_changed == ["pg"]
    assert plan.changes == ["listeners.pg.max_client_connections: 0 -> 5",
                            "listeners.pg2: added (127.0.0.1:6433, cluster main, reader)"]
    back = diff(second, first)
    assert back.listeners_removed == ["pg2"] and back.changes[0].startswith("listeners.pg2: removed (127.0.0.1:6433")

    def moved(raw):
        raw["listeners"][0]["listen"] = "127.0.0.1:7432"
    plan = diff(first, config(moved))
    assert plan.listeners_moved == ["pg"] and plan.changes == ["listeners.pg.listen: 127.0.0.1:6432 -> 127.0.0.1:7432"]


def test_an_address_still_draining_for_a_removed_listener_is_refused():
    def renamed(raw):
        raw["listeners"][0]["name"] = "pg-new"
    plan = diff(config(), config(renamed))
    assert plan.listeners_removed == ["pg"] and plan.listeners_added == ["pg-new"]
    assert plan.refused == ["listeners.pg-new.listen: 127.0.0.1:6432 is still open for listener 'pg', which drains "
                            "its clients first; use another address, or reload twice (remove the old listener, then "
                            "add the new one)"]


def test_clusters_added_and_removed():
    def swap(raw):
        raw["clusters"]["replicas"] = {"engine": "postgres", "hosts": ["127.0.0.1:5433", "127.0.0.1:5434"],
                                       "health": {"probe_user": "app"}}
    plan = diff(config(), config(swap))
    assert plan.clusters_added == ["replicas"]
    assert plan.changes == ["clusters.replicas: added (postgres, 127.0.0.1:5433, 127.0.0.1:5434)"]
    assert diff(config(swap), config()).clusters_removed == ["replicas"]


def test_hosts_and_pinning_are_live_changes():
    def hosts(raw):
        raw["clusters"]["main"]["hosts"] = ["127.0.0.1:5432", "127.0.0.1:5440"]
        raw["clusters"]["main"]["health"] = {"probe_user": "app"}
        raw["clusters"]["main"]["pinning"] = {"prepared_statement": "ignore"}
    plan = diff(config(), config(hosts))
    assert plan.refused == []
    assert "clusters.main.hosts: [127.0.0.1:5432] -> [127.0.0.1:5432, 127.0.0.1:5440]" in plan.changes
    assert "clusters.main.pinning.prepared_statement: (unset) -> 'ignore'" in plan.changes


def test_flatten_leaves_out_the_token_verifier_and_key_paths():
    keys = flatten(config(), "", {})
    assert "clusters.main.credentials[0].password" in keys
    assert not any(k.endswith(("token_verifier", "key_path")) for k in keys)


# ---------------------------------------------------------------------------------------------- pools resized live

@pytest.fixture
def db():
    database = ToyDatabase("db1")
    yield database
    database.stop()


@pytest.fixture
def pool_of(db):
    made = []

    def make(**settings):
        cluster = make_cluster(**settings)
        pool = Pool(StubProxy(cluster), cluster, "writer", "app", "appdb", ToyEngine(), db.target)
        made.append(pool)
        return pool
    yield make
    for pool in made:
        pool.close_all()
        for conn in list(pool.in_use):
            conn.close()


def resized(pool, **settings):
    cluster = pool.cluster
    cluster.pool = dataclasses.replace(cluster.pool, **settings)    # a SimpleNamespace: the test's stand-in
    pool.reconfigure(cluster)


def test_raising_max_size_serves_the_waiters_at_once(db, pool_of):
    pool = pool_of(max_size=2, borrow_timeout=5)
    held = [pool.borrow(), pool.borrow()]
    waiters = [gevent.spawn(pool.borrow) for _ in range(4)]
    wait_until(lambda: len(pool.waiters) == 4, what="four waiters")
    resized(pool, max_size=6)
    got = [w.get(timeout=2) for w in waiters]
    assert len(set(got) | set(held)) == 6 and pool.size == 6 and pool.borrow_timeouts_total == 0
    assert pool.budget.config.max_size == 6 and pool.config is pool.budget.config
    for conn in held + got:
        pool.release(conn)
    check_counts(pool)


def test_lowering_max_size_closes_idle_ones_now_and_borrowed_ones_on_release(db, pool_of):
    pool = pool_of(max_size=6)
    conns = [pool.borrow() for _ in range(6)]
    for conn in conns[:3]:
        pool.release(conn)
    assert (len(pool.idle), pool.borrowed) == (3, 3)
    resized(pool, max_size=2)
    assert (len(pool.idle), pool.borrowed) == (0, 3) and pool.budget.over
    wait_until(lambda: len(db.closed) == 3, what="three idle connections to close")
    pool.release(conns[3])
    assert conns[3].closed and pool.size == 2
    pool.release(conns[4])
    assert not conns[4].closed and pool.size == 2 and not pool.budget.over   # back within max_size: kept
    pool.release(conns[5])
    assert list(pool.idle) == [conns[4], conns[5]]
    check_counts(pool)


def test_timeouts_follow_the_new_settings(db, pool_of):
    pool = pool_of(max_size=1, borrow_timeout=5)
    held = pool.borrow()
    resized(pool, borrow_timeout=0.1)
    with pytest.raises(Exception, match="within 0.1 s"):
        pool.borrow()
    pool.release(held)
    check_counts(pool)


# ---------------------------------------------------------------------------------------------- the registry follows

def test_the_registry_follows_new_hosts_and_drains_removed_ones():
    from multiproxy.plugins import load_engines
    from multiproxy.registry import Registry

    from .test_registry import A, B, C, ChangeRecorder, probed
    engines = {name: le.engine for name, le in load_engines().items()}

    def cluster(hosts, lag=5.0):
        return build_config({
            "clusters": {"c": {"engine": "postgres", "hosts": hosts,
                               "health": {"probe_user": "app", "max_replica_lag": lag}}},
            "listeners": [{"name": "l", "listen": "127.0.0.1:1", "cluster": "c", "auth": "trust"}],
        }, "", engines).clusters["c"]
    proxy = ChangeRecorder()
    reg = Registry(proxy, {"c": cluster(["10.0.0.1:5432", "10.0.0.2:5432", "10.0.0.3:5432"])}, engines)
    for address, role in ((A, "writer"), (B, "reader"), (C, "reader")):
        probed(reg, address, role, lag=1.0)
    state = reg.clusters["c"]
    reg._decide(state)
    assert state.eligible["reader"] == {B, C}
    D = ("10.0.0.4", 5432)
    reg.reconfigure(cluster(["10.0.0.1:5432", "10.0.0.2:5432", "10.0.0.4:5432"], lag=0.5))
    assert set(state.nodes) == {A, B, D} and state.health.max_replica_lag == 0.5
    assert state.nodes[D].next_probe <= time.monotonic()          # a new host is probed at once
    assert state.writer == A and proxy.changes == []              # the writer stays: no failover
    # C left the configuration and B now lags beyond the new bound: pools stop using both (idle connections close,
    # borrowed ones at the end of their transaction), and readers fall back to the writer.
    assert proxy.retired == [("reader", {B: "lag 1.0 s beyond max_replica_lag 0.5 s", C: "it was removed from the configuration"})]
    assert state.eligible["reader"] == {A}
    assert [e["node"] for e in reg.events if e["event"] == "reload"] == ["10.0.0.3:5432"]


def test_the_registry_looks_up_a_changed_endpoint_name_now_and_drops_a_removed_endpoint():
    from multiproxy.plugins import load_engines
    from multiproxy.registry import Registry

    from .test_registry import ChangeRecorder
    engines = {name: le.engine for name, le in load_engines().items()}

    def cluster(endpoints):
        return build_config({
            "clusters": {"c": {"engine": "postgres", "endpoints": endpoints, "dns": {"nameserver": "127.0.0.1:53"},
                               "health": {"probe_user": "app"}}},
            "listeners": [{"name": "l", "listen": "127.0.0.1:1", "cluster": "c", "auth": "trust"}],
        }, "", engines).clusters["c"]
    reg = Registry(ChangeRecorder(), {"c": cluster({"writer": "old.example:5432", "reader": "ro.example:5432"})},
                   engines)
    state = reg.clusters["c"]
    state.node(("10.0.0.9", 5432)).sources.add("reader-endpoint")    # a node the reader endpoint named
    state.watches["writer"].next_poll = 1e12                          # polled a moment ago
    reg.reconfigure(cluster({"writer": "new.example:5433"}))
    assert list(state.watches) == ["writer"]
    watch = state.watches["writer"]
    assert (watch.name, watch.port) == ("new.example", 5433) and watch.due(0.0)
    assert state.nodes == {}      # the node only the removed reader endpoint named is gone


def test_removing_the_writer_host_retires_it_without_cancelling_its_transactions():
    from multiproxy.plugins import load_engines
    from multiproxy.registry import Registry

    from .test_registry import A, B, ChangeRecorder, probed
    engines = {name: le.engine for name, le in load_engines().items()}

    def cluster(hosts):
        return build_config({
            "clusters": {"c": {"engine": "postgres", "hosts": hosts, "health": {"probe_user": "app"}}},
            "listeners": [{"name": "l", "listen": "127.0.0.1:1", "cluster": "c", "auth": "trust"}],
        }, "", engines).clusters["c"]
    proxy = ChangeRecorder()
    reg = Registry(proxy, {"c": cluster(["10.0.0.1:5432", "10.0.0.2:5432"])}, engines)
    probed(reg, A, "writer")
    probed(reg, B, "writer", healthy=False)       # promoted, not yet seen healthy
    state = reg.clusters["c"]
    reg._decide(state)
    reg.reconfigure(cluster(["10.0.0.2:5432"]))
    assert state.writer is None and proxy.changes == []         # no failover drain: no transaction is cancelled
    assert ("writer", {A: "it was removed from the configuration"}) in proxy.retired
    probed(reg, B, "writer")
    reg._decide(state)
    assert state.writer == B and proxy.changes == []
