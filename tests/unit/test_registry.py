"""The registry's choices, without I/O: writer selection, readers within the lag bound, fallback, failover events."""
import time

from multiproxy.config import build_config
from multiproxy.plugins import load_engines
from multiproxy.registry import FAST_PROBE_INTERVAL, Registry

ENGINES = {name: le.engine for name, le in load_engines().items()}


class ChangeRecorder:
    """What the registry calls back on a writer change (the proxy drains pools there); records the changes."""

    def __init__(self):
        self.changes = []

    def writer_changed(self, cluster, old, new):
        self.changes.append((old, new))


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


def test_a_refusal_as_read_only_demotes_the_writer_and_probes_fast():
    reg, proxy = registry()
    probed(reg, A, "writer")
    probed(reg, B, "reader")
    state = reg.clusters["c"]
    reg._decide(state)
    for node in state.nodes.values():
        node.next_probe = time.monotonic() + 30
    reg.writer_demoted("c", A)
    assert reg.address_for("c", "writer") is None and not state.writer_known.is_set()
    assert all(node.next_probe <= time.monotonic() + FAST_PROBE_INTERVAL for node in state.nodes.values())
    assert proxy.changes == [(A, None)]
