"""The registry's choices, without I/O: writer selection, readers within the lag bound, fallback, failover events."""
import time

import pytest

from multiproxy.config import build_config
from multiproxy.plugins import load_engines
from multiproxy.registry import Registry

ENGINES = {name: le.engine for name, le in load_engines().items()}


class ChangeRecorder:
    """What the registry calls back on a writer change (the proxy drains pools there); records the changes."""

    def __init__(self):
        self.changes = []
        self.retired = []

    def writer_changed(self, cluster, old, new):
        self.changes.append((old, new))

    def nodes_retired(self, cluster, role, reasons):
        self.retired.append((role, dict(reasons)))


def registry(max_lag=5.0, fallback=True):
    config = build_config({
        "clusters": {"c": {"engine": "postgres", "hosts": ["10.0.0.1:5432", "10.0.0.2:5432", "10.0.0.3:5432"],
                           "health": {"probe_user": "app", "max_replica_lag": max_lag,
                                      "reader_fallback_to_writer": fallback}}},
        "listeners": [{"name": "l", "listen": "127.0.0.1:1", "cluster": "c", "auth": "trust"}],
    }, "", ENGINES)
    proxy = ChangeRecorder()
    return Registry(proxy, config.clusters, ENGINES), proxy


def probed(reg, address, role, lag=0.0, healthy=True):
    node = reg.clusters["c"].node(address)
    node.role, node.lag, node.healthy, node.last_ok = role, lag, healthy, time.monotonic()


A, B, C = ("10.0.0.1", 5432), ("10.0.0.2", 5432), ("10.0.0.3", 5432)


def test_the_verified_writer_serves_writes_and_fresh_readers_serve_reads():
    reg, _ = registry(max_lag=5.0)
    probed(reg, A, "writer")
    probed(reg, B, "reader", lag=1.0)
    probed(reg, C, "reader", lag=60.0)            # too far behind: skipped
    reg._decide(reg.clusters["c"])
    assert reg.address_for("c", "writer") == A
    assert {reg.address_for("c", "reader") for _ in range(6)} == {B}


def test_readers_fall_back_to_the_writer_only_when_configured():
    reg, _ = registry(fallback=True)
    probed(reg, A, "writer")
    probed(reg, B, "reader", healthy=False)
    reg._decide(reg.clusters["c"])
    assert reg.address_for("c", "reader") == A
    reg, _ = registry(fallback=False)
    probed(reg, A, "writer")
    reg._decide(reg.clusters["c"])
    assert reg.address_for("c", "reader") is None


def test_a_writer_change_is_an_event_with_the_outage_and_drains_the_old_writer():
    reg, proxy = registry()
    probed(reg, A, "writer")
    reg._decide(reg.clusters["c"])
    probed(reg, A, "writer", healthy=False)       # the old writer stops answering
    probed(reg, B, "writer")                      # the promoted replica answers as writer
    reg._decide(reg.clusters["c"])
    assert reg.address_for("c", "writer") == B
    assert proxy.changes == [(A, B)]
    event = [e for e in reg.events if e["event"] == "writer"][-1]
    assert event["old"] == "10.0.0.1:5432" and event["new"] == "10.0.0.2:5432" and "outage_seconds" in event


def probing_answers(reg, answers):
    """Stand in for the probe's I/O in these pure tests: each probe of a node takes its next answer."""
    calls = []

    def probe(state, node):
        calls.append(node.address)
        role, healthy = answers[node.address]
        node.role, node.healthy, node.probing = role, healthy, False
        if healthy:
            node.last_ok = time.monotonic()
    reg._probe = probe
    return calls


def test_a_read_only_refusal_from_a_node_that_still_answers_as_writer_changes_nothing():
    reg, proxy = registry()
    probed(reg, A, "writer")
    probed(reg, B, "reader")
    reg._decide(reg.clusters["c"])
    calls = probing_answers(reg, {A: ("writer", True)})
    assert reg.verify_writer("c", A) is True
    assert calls == [A]
    assert reg.address_for("c", "writer") == A and proxy.changes == [] and proxy.retired == []
    # Refusals right behind it share that probe instead of probing again.
    assert reg.verify_writer("c", A) is True and calls == [A]
    assert reg.clusters["c"].verifications_refuted_total == 0


def test_a_read_only_refusal_demotes_the_writer_only_when_its_probe_says_reader():
    reg, proxy = registry()
    probed(reg, A, "writer")
    probed(reg, B, "reader")
    state = reg.clusters["c"]
    reg._decide(state)
    probing_answers(reg, {A: ("reader", True)})
    assert reg.verify_writer("c", A) is False
    assert reg.address_for("c", "writer") is None and not state.writer_known.is_set()
    assert proxy.changes == [(A, None)]
    assert proxy.retired[0] == ("writer", {A: "it is no longer the cluster's writer"})
    assert proxy.retired[1] == ("reader", {B: "the cluster has no writer: a failover may be promoting this reader"})
    assert state.verifications_refuted_total == 1


def test_readers_that_cannot_tell_their_lag_or_are_ruled_out_by_their_probe_serve_nothing():
    reg, _ = registry(max_lag=5.0, fallback=False)
    state = reg.clusters["c"]
    probed(reg, A, "writer")
    probed(reg, B, "reader", lag=None)
    probed(reg, C, "reader", lag=0.0)
    state.node(C).skip = "replication is stopped (Slave_SQL_Running = No)"
    reg._decide(state)
    assert reg.address_for("c", "reader") is None
    assert reg.skipped_reason(state, state.node(B)) == "replica lag unknown"
    assert reg.skipped_reason(state, state.node(C)).startswith("replication is stopped")
    nodes = {n["address"]: n for n in reg.snapshot()["c"]["nodes"]}
    assert nodes["10.0.0.2:5432"]["skipped"] == "replica lag unknown" and nodes["10.0.0.1:5432"]["skipped"] is None


def test_pools_are_told_when_a_node_leaves_a_role():
    reg, proxy = registry(max_lag=5.0, fallback=False)
    state = reg.clusters["c"]
    probed(reg, A, "writer")
    probed(reg, B, "reader", lag=0.5)
    reg._decide(state)
    assert state.eligible == {"writer": {A}, "reader": {B}} and proxy.retired == []
    probed(reg, B, "reader", lag=12.0)              # falls behind: reader pools stop using it
    reg._decide(state)
    assert state.eligible["reader"] == set()
    assert proxy.retired == [("reader", {B: "lag 12.0 s beyond max_replica_lag 5 s"})]
    probed(reg, B, "reader", lag=0.0)
    reg._decide(state)
    assert state.eligible["reader"] == {B}
    probed(reg, A, "reader", healthy=False)         # failover: B is promoted
    probed(reg, B, "writer")
    reg._decide(state)
    assert state.eligible == {"writer": {B}, "reader": set()}
    assert proxy.retired[-2][0] == "writer" and A in proxy.retired[-2][1]
    assert proxy.retired[-1][0] == "reader" and B in proxy.retired[-1][1]


def test_while_the_cluster_has_no_writer_readers_wait_until_a_later_probe_confirms_them():
    reg, proxy = registry(max_lag=5.0, fallback=False)
    state = reg.clusters["c"]
    probed(reg, A, "writer")
    probed(reg, B, "reader")
    reg._decide(state)
    assert state.eligible["reader"] == {B}
    probed(reg, A, "writer", healthy=False)         # the writer is lost: B may be mid-promotion
    reg._decide(state)
    assert state.writer is None and state.eligible["reader"] == set()
    assert reg.address_for("c", "reader") is None
    assert "no writer" in reg.skipped_reason(state, state.node(B))
    probed(reg, B, "reader")                        # confirmed, but within writerless_reader_delay
    reg._decide(state)
    assert state.eligible["reader"] == set()
    state.writer_lost_at -= state.health.writerless_reader_delay + 0.1
    probed(reg, B, "reader")                        # confirmed after the delay: serves again, writer or not
    reg._decide(state)
    assert state.eligible["reader"] == {B} and reg.address_for("c", "reader") == B


def test_a_node_down_for_hours_is_still_probed_at_backoff_max_and_not_at_once():
    reg, _ = registry()
    state = reg.clusters["c"]
    node = state.node(A)
    node.failures = 5000           # about 14 hours of failures at the default backoff_max of 10 s
    before = time.monotonic()
    reg._probe(state, node)        # fails: the recorder has no backend targets, as a refused connect would
    assert node.failures == 5001 and not node.healthy
    assert node.next_probe >= before + state.health.backoff_max


def test_a_probe_that_fails_by_a_bug_of_its_own_still_waits_before_the_next():
    reg, _ = registry()
    state = reg.clusters["c"]
    node = state.node(B)
    node.failures = None           # the failure's bookkeeping raises (TypeError) before it sets the next probe
    before = time.monotonic()
    with pytest.raises(TypeError):
        reg._probe(state, node)
    assert node.next_probe >= before + state.health.backoff_max and not node.probing


def test_a_client_waiting_for_a_writer_brings_the_next_probe_of_a_down_node_forward():
    reg, _ = registry()
    state = reg.clusters["c"]
    node = state.node(A)
    now = time.monotonic()
    node.failures, node.healthy, node.last_probe, node.next_probe = 9, False, now - 1.0, now + 10.0
    assert reg.wait_for("c", "writer", 0.05) is None        # no writer: the cluster's loop is not running here
    assert node.next_probe <= time.monotonic() + 0.2        # probed within FAST_PROBE_INTERVAL, not in 10 s
    assert state.wakeup.is_set()
