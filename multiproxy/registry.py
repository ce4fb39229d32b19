"""Failover-aware backend registry: clusters -> endpoints -> addresses -> verified roles; writer changes as events.

DNS says where to look, the engine's probe says who the writer is. Each cluster has a loop that polls its
endpoint names on their TTL (clamped), probes every candidate node over the engine's own login, and
decides the writer and the readers. A node that DNS still calls the writer but that answers as a reader
is not used for writes; a promoted replica found through the reader endpoint or the host list becomes
the writer as soon as its probe says so, without waiting for DNS.
"""
from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass, field

import gevent
from gevent.event import Event

from .backends import open_socket, run_script
from .config import ClusterConfig
from .dns import DnsClient, EndpointWatch

log = logging.getLogger("multiproxy.registry")
FAST_PROBE_INTERVAL = 0.2   # seconds between probes while a cluster has no writer
VERIFY_REUSE = 0.1          # seconds a read-only verification probe answers later refusals from the same node


def down_node_delay(probe_interval: float, backoff_max: float, failures_past_threshold: int) -> float:
    """Seconds until the next probe of a node that is down: probe_interval doubled for each failure past the
    threshold, at most backoff_max. The exponent is bounded (at 64, far past any cap), so that a node down for hours
    (over a thousand failures) still gets a number: 2 ** 1024 does not fit a float, and the OverflowError left the
    node due at once, probed 50 times a second."""
    return min(probe_interval * 2.0 ** min(max(0, failures_past_threshold), 64), backoff_max)


@dataclass
class NodeState:
    """What the registry knows of one address of a cluster."""

    address: tuple[str, int]
    role: str | None = None        # 'writer' / 'reader' as the last successful probe said
    lag: float | None = 0.0        # seconds the replica is behind; None when it cannot tell (replication stopped)
    lag_bytes: int | None = None   # bytes received but not yet applied, where the engine can tell
    skip: str | None = None        # the probe's reason why the node must not serve reads
    healthy: bool = False
    failures: int = 0
    next_probe: float = 0.0
    last_probe: float = 0.0
    last_ok: float = 0.0
    last_error: str = ""
    sources: set = field(default_factory=set)   # 'hosts', 'writer-endpoint', 'reader-endpoint'
    probing: bool = False
    verified: object = None        # the Event of a verification probe under way (see Registry.verify_writer)
    verified_at: float = 0.0


class ClusterState:
    """The registry's view of one cluster."""

    def __init__(self, config: ClusterConfig, engine, dns_client: DnsClient | None):
        self.config = config
        self.engine = engine
        self.health = config.health
        self.nodes: dict[tuple[str, int], NodeState] = {}
        for address in config.hosts:
            self.node(address).sources.add("hosts")
        self.watches: dict[str, EndpointWatch] = {}
        for kind, (name, port) in config.endpoints.items():
            self.watches[kind] = EndpointWatch(name, dns_client, config.dns.ttl_floor, config.dns.ttl_ceiling)
            self.watches[kind].port = port
        self.writer: tuple[str, int] | None = None
        self.writer_known = Event()
        self.writer_lost_at: float | None = None
        self.reader_turn = 0
        self.wakeup = Event()
        self.probes_total = 0
        self.probe_failures_total = 0
        # The addresses each role's pools may use, kept up to date by the registry and read by pools on every
        # borrow and release (updated in place: pools hold these very sets).
        self.eligible: dict[str, set] = {"writer": set(), "reader": set()}
        self.verifications_total = 0
        self.verifications_refuted_total = 0

    def node(self, address: tuple[str, int]) -> NodeState:
        node = self.nodes.get(address)
        if node is None:
            node = self.nodes[address] = NodeState(address)
        return node


class Registry:
    """Every cluster that follows DNS endpoints or has several hosts; consulted by pools for addresses."""

    def __init__(self, proxy, clusters: dict[str, ClusterConfig], engines: dict):
        self.proxy = proxy
        self.engines = engines
        self.clusters: dict[str, ClusterState] = {}
        for name, config in clusters.items():
            self.clusters[name] = ClusterState(config, engines[config.engine], _dns_client(config))
        self.events: collections.deque = collections.deque(maxlen=200)
        self.writer_changes_total = collections.Counter()
        self._loops: dict[str, object] = {}
        self.started = False

    @staticmethod
    def wanted(config: ClusterConfig) -> bool:
        """Clusters with DNS endpoints or several hosts need role verification; a single static host does not."""
        return bool(config.endpoints) or len(config.hosts) > 1

    def start(self) -> None:
        self.started = True
        for name, state in self.clusters.items():
            self._loops[name] = gevent.spawn(self._cluster_loop, state)

    def stop(self) -> None:
        for loop in self._loops.values():
            loop.kill(block=False)

    # ------------------------------------------------------------------ reload (multiproxy.reload)

    def add_cluster(self, config: ClusterConfig) -> None:
        """A reload added a cluster that follows roles (or gave one a second host or endpoints): follow it."""
        state = self.clusters[config.name] = ClusterState(config, self.engines[config.engine], _dns_client(config))
        if self.started:
            self._loops[config.name] = gevent.spawn(self._cluster_loop, state)
        else:
            self.start()

    def remove_cluster(self, name: str) -> None:
        """A reload removed the cluster (or left it one static host): stop following it."""
        self.clusters.pop(name, None)
        loop = self._loops.pop(name, None)
        if loop is not None:
            loop.kill(block=False)

    def reconfigure(self, config: ClusterConfig) -> None:
        """A reload changed a followed cluster: new hosts are probed now, removed ones leave (their idle pooled
        connections close, borrowed ones at the end of their transaction, through the eligible sets; the writer too,
        without a failover's drain); a changed endpoint name is looked up now (nodes it named before stay, as after a
        DNS change, until they stop answering in their role); health and DNS settings apply from the next tick."""
        state = self.clusters[config.name]
        old = state.config
        state.config = config
        state.health = config.health
        wanted = set(config.hosts)
        for address in config.hosts:
            state.node(address).sources.add("hosts")
        for node in state.nodes.values():
            if node.address not in wanted:
                node.sources.discard("hosts")
        if config.endpoints != old.endpoints or config.dns != old.dns:
            dns_client = _dns_client(config)
            for kind in list(state.watches):
                if kind not in config.endpoints:
                    del state.watches[kind]
                    for node in state.nodes.values():
                        node.sources.discard(f"{kind}-endpoint")
            for kind, (name, port) in config.endpoints.items():
                watch = EndpointWatch(name, dns_client, config.dns.ttl_floor, config.dns.ttl_ceiling)
                watch.port = port
                state.watches[kind] = watch
        for address in [a for a, node in state.nodes.items() if not node.sources]:
            del state.nodes[address]
            self.events.append({"time": time.time(), "cluster": config.name, "event": "reload",
                                "node": _fmt(address), "result": "removed from the configuration"})
        if state.writer is not None and state.writer not in state.nodes:
            # Not a failover: transactions on the removed writer finish there (its connections retire at their
            # release, through the eligible sets), and new ones wait for the next writer the probes find.
            self._set_writer(state, None, "the writer was removed from the configuration", drain=False)
        now = time.monotonic()
        for node in state.nodes.values():
            if not node.last_probe:
                node.next_probe = now
        self._decide(state)
        state.wakeup.set()

    # ------------------------------------------------------------------ what pools ask

    def address_for(self, cluster: str, role: str) -> tuple[str, int] | None:
        state = self.clusters[cluster]
        if role == "writer":
            return state.writer
        readers = [n for n in state.nodes.values() if _serves_reads(n, state)]
        if readers:
            readers.sort(key=lambda n: n.address)
            state.reader_turn = (state.reader_turn + 1) % len(readers)
            return readers[state.reader_turn].address
        if state.health.reader_fallback_to_writer:
            return state.writer
        return None

    def wait_for(self, cluster: str, role: str, timeout: float) -> tuple[str, int] | None:
        """The address for `role`, waiting up to `timeout` for a writer to be known."""
        state = self.clusters[cluster]
        address = self.address_for(cluster, role)
        if address is not None or timeout <= 0:
            return address
        deadline = time.monotonic() + timeout
        while address is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            self._hurry(state)
            # Readers may return before a writer does (see _serves_reads), and a node that was down may be back
            # before its back-off ends: look again every fast probe while someone waits.
            state.writer_known.wait(min(remaining, FAST_PROBE_INTERVAL))
            address = self.address_for(cluster, role)
            if address is None and state.writer_known.is_set():
                gevent.sleep(0.05)
        return address

    @staticmethod
    def _hurry(state: ClusterState) -> None:
        """A client waits for a node of this cluster: each node is probed again within FAST_PROBE_INTERVAL of its
        last probe, whatever its back-off, so that a server back from an outage serves at once. Without waiting
        clients a node that is down keeps its back-off (up to health.backoff_max) and costs next to nothing."""
        now = time.monotonic()
        for node in state.nodes.values():
            node.next_probe = min(node.next_probe, max(node.last_probe + FAST_PROBE_INTERVAL, now))
        state.wakeup.set()

    def reprobe(self, cluster: str) -> None:
        """Probe every node of the cluster now (a read-only rejection says the writer moved)."""
        state = self.clusters.get(cluster)
        if state is None:
            return
        now = time.monotonic()
        for node in state.nodes.values():
            node.next_probe = min(node.next_probe, now)
        for watch in state.watches.values():
            watch.next_poll = min(watch.next_poll, now)
        state.wakeup.set()

    def eligible(self, cluster: str, role: str) -> set | None:
        """The live set of addresses that pools of `role` may use (None when the cluster does not follow roles)."""
        state = self.clusters.get(cluster)
        return None if state is None else state.eligible.get(role)

    def verify_writer(self, cluster: str, address: tuple[str, int]) -> bool:
        """A node refused a statement as read-only. Only the node itself decides what it is: probe it now
        (concurrent callers share one probe, and a probe finished within VERIFY_REUSE seconds answers
        later callers). True when the node still answers as a healthy writer: it stays the writer and the
        client gets the server's error. Otherwise the registry has already decided anew from that probe."""
        state = self.clusters.get(cluster)
        if state is None:
            return True
        node = state.nodes.get(address)
        if node is None:
            return False
        waiting = node.verified
        if waiting is None and time.monotonic() - node.verified_at > VERIFY_REUSE:
            waiting = node.verified = Event()
            state.verifications_total += 1
            try:
                node.probing = True
                self._probe(state, node)
                self._decide(state)
            finally:
                node.verified = None
                node.verified_at = time.monotonic()
                waiting.set()
            if not (node.healthy and node.role == "writer"):
                # Only a refuted writer is an event: checks that changed nothing are counted, not kept, so that
                # sessions refused over and over cannot push the failover history out of the event list.
                state.verifications_refuted_total += 1
                self.events.append({"time": time.time(), "cluster": state.config.name, "event": "read-only check",
                                    "node": _fmt(address), "role": node.role if node.healthy else "down",
                                    "result": "no writer any more"})
        elif waiting is not None:
            waiting.wait(state.config.backend.connect_timeout + 1)
        return node.healthy and node.role == "writer"

    # ------------------------------------------------------------------ the loop

    def _cluster_loop(self, state: ClusterState) -> None:
        while True:
            try:
                self._tick(state)
            except Exception:  # the registry must outlive any one bad tick
                log.exception("cluster %s: registry tick failed", state.config.name)
            now = time.monotonic()
            due = [n.next_probe for n in state.nodes.values() if not n.probing]
            due += [w.next_poll for w in state.watches.values()]
            sleep_for = max(0.02, min(due, default=now + 1.0) - now)
            state.wakeup.clear()
            state.wakeup.wait(min(sleep_for, 1.0))

    def _tick(self, state: ClusterState) -> None:
        now = time.monotonic()
        for kind, watch in state.watches.items():
            if watch.due(now):
                changed = watch.poll(now)
                if changed or watch.last_error:
                    self.events.append({"time": time.time(), "cluster": state.config.name, "event": "dns",
                                        "endpoint": watch.name, "addresses": list(watch.addresses),
                                        "error": watch.last_error})
            for host in watch.addresses:
                node = state.node((host, watch.port))
                node.sources.add(f"{kind}-endpoint")
        probes = []
        for node in list(state.nodes.values()):
            if not node.probing and node.next_probe <= now:
                node.probing = True
                probes.append(gevent.spawn(self._probe, state, node))
        if probes:
            gevent.joinall(probes, timeout=state.config.backend.connect_timeout + 1)
        self._decide(state)

    def _probe(self, state: ClusterState, node: NodeState) -> None:
        health = state.health
        timeout = state.config.backend.connect_timeout
        state.probes_total += 1
        started = time.monotonic()
        sock = None
        try:
            # Without the probe user's password no login is tried (a backend may lock accounts that fail).
            target = self.proxy.backend_target_at(state.config, node.address, health.probe_user, strict=True)
            script = state.engine.probe_script(target)
            sock = open_socket(target.host, target.port, timeout)
            sock, script = run_script(sock, script, target, timeout)
            result = script.result or {}
            role = result.get("role")
            if node.role is not None and role != node.role:
                self.events.append({"time": time.time(), "cluster": state.config.name, "event": "role",
                                    "node": _fmt(node.address), "role": role, "old": node.role})
            if not node.healthy and node.failures:     # back after being down (not a first probe)
                self.events.append({"time": time.time(), "cluster": state.config.name, "event": "node",
                                    "node": _fmt(node.address), "state": "up", "role": role})
            node.role = role
            lag = result.get("lag", 0.0)
            node.lag = None if lag is None else float(lag)
            lag_bytes = result.get("lag_bytes")
            node.lag_bytes = None if lag_bytes is None else int(lag_bytes)
            node.skip = result.get("skip") or None
            node.healthy = True
            node.failures = 0
            node.last_ok = time.monotonic()
            node.last_error = ""
            node.next_probe = started + self._interval(state)
        except Exception as exc:   # any failure of a probe is a fact about the node
            was_healthy = node.healthy
            state.probe_failures_total += 1
            node.failures += 1
            node.last_error = str(exc) or type(exc).__name__
            if node.failures >= health.failure_threshold and node.healthy:
                log.warning("cluster %s: node %s:%d is down: %s", state.config.name, *node.address, node.last_error)
            if node.failures >= health.failure_threshold:
                node.healthy = False
            # Back off on a down node, but keep probing soon enough to see it return.
            node.next_probe = time.monotonic() + (self._interval(state) if node.failures < health.failure_threshold
                                                  else down_node_delay(health.probe_interval, health.backoff_max,
                                                                       node.failures - health.failure_threshold))
            if node.address == state.writer:
                # A writer that stops answering is suspect at once: stop routing writes there.
                node.healthy = False if node.failures >= 1 else node.healthy
            if was_healthy and not node.healthy:
                self.events.append({"time": time.time(), "cluster": state.config.name, "event": "node",
                                    "node": _fmt(node.address), "state": "down", "error": node.last_error})
        finally:
            node.probing = False
            node.last_probe = time.monotonic()
            if node.next_probe <= started:
                # The probe ended by an error of its own making (a bug, not a fact about the node): the cluster's
                # loop would probe again at once, 50 times a second, so wait as for a node that is down.
                node.next_probe = node.last_probe + health.backoff_max
            if sock is not None:
                try:
                    sock.close()
                except OSError:
                    pass

    @staticmethod
    def _interval(state: ClusterState) -> float:
        """Probe interval: the configured one, but at most 0.2 s while no writer is known (failover under way)."""
        interval = state.health.probe_interval
        return interval if state.writer is not None else min(interval, FAST_PROBE_INTERVAL)

    def backend_failed(self, cluster: str, address: tuple[str, int]) -> None:
        """A connection to `address` failed or died: if it is the writer, look at the cluster again now."""
        state = self.clusters.get(cluster)
        if state is not None and state.writer == address:
            self.reprobe(cluster)

    def _decide(self, state: ClusterState) -> None:
        self._choose_writer(state)
        self._refresh_eligible(state)

    def _refresh_eligible(self, state: ClusterState) -> None:
        """Update the addresses each role's pools may use; connections to addresses that left a role retire."""
        writer = {state.writer} if state.writer else set()
        readers = {n.address for n in state.nodes.values() if _serves_reads(n, state)}
        if not readers and state.health.reader_fallback_to_writer:
            readers = set(writer)
        for role, wanted in (("writer", writer), ("reader", readers)):
            current = state.eligible[role]
            if wanted == current:
                continue
            gone = current - wanted
            current.clear()
            current.update(wanted)
            if gone:
                reasons = {address: "it was removed from the configuration" if address not in state.nodes else
                           "it is no longer the cluster's writer" if role == "writer" else
                           self.skipped_reason(state, state.nodes[address]) or "it left the reader role"
                           for address in gone}
                self.events.append({"time": time.time(), "cluster": state.config.name, "event": "retired",
                                    "role": role, "nodes": {_fmt(a): r for a, r in reasons.items()}})
                self.proxy.nodes_retired(state.config, role, reasons)

    @staticmethod
    def skipped_reason(state: ClusterState, node: NodeState) -> str | None:
        """Why `node` serves no traffic now (None when it serves as writer or reader)."""
        if node.address == state.writer:
            return None
        if not node.healthy:
            return f"down: {node.last_error}" if node.last_error else "not probed yet"
        if node.role == "writer":
            return "answers as a writer but is not the cluster's writer (another node was chosen)"
        if node.role != "reader":
            return f"unknown role {node.role!r}"
        if node.skip:
            return node.skip
        if state.writer is None and not _serves_reads(node, state) and node.lag is not None \
                and node.lag <= state.health.max_replica_lag:
            return "the cluster has no writer: a failover may be promoting this reader"
        if node.lag is None:
            return "replica lag unknown"
        limit = state.health.max_replica_lag
        if node.lag > limit:
            return f"lag {node.lag:.1f} s beyond max_replica_lag {limit:g} s"
        return None

    def _choose_writer(self, state: ClusterState) -> None:
        writers = [n for n in state.nodes.values() if n.healthy and n.role == "writer"]
        current = state.nodes.get(state.writer) if state.writer else None
        if current is not None and current in writers:
            return
        chosen = None
        dns_writer = state.watches.get("writer")
        if dns_writer is not None:
            for node in writers:
                if node.address[0] in dns_writer.addresses and node.address[1] == dns_writer.port:
                    chosen = node
                    break
        if chosen is None and writers:
            chosen = sorted(writers, key=lambda n: n.last_ok, reverse=True)[0]
        new = chosen.address if chosen else None
        if new != state.writer:
            reason = "probe" if new else "no healthy node answers as writer"
            self._set_writer(state, new, reason)

    def _set_writer(self, state: ClusterState, new, reason: str, drain: bool = True) -> None:
        old = state.writer
        now = time.monotonic()
        state.writer = new
        event = {"time": time.time(), "cluster": state.config.name, "event": "writer", "old": _fmt(old),
                 "new": _fmt(new), "reason": reason}
        if new is None:
            state.writer_known.clear()
            for node in state.nodes.values():     # look for the new writer quickly from now on
                node.next_probe = min(node.next_probe, now + FAST_PROBE_INTERVAL)
            state.wakeup.set()
            if state.writer_lost_at is None:
                state.writer_lost_at = now
            log.warning("cluster %s: no writer (%s); new transactions wait up to the borrow timeout",
                        state.config.name, reason)
        else:
            if state.writer_lost_at is not None:
                event["outage_seconds"] = round(now - state.writer_lost_at, 3)
            elif old is not None:
                event["outage_seconds"] = round(now - state.node(old).last_ok, 3)
            state.writer_lost_at = None
            state.writer_known.set()
            self.writer_changes_total[state.config.name] += 1
            log.warning("cluster %s: writer is now %s (was %s)%s", state.config.name, _fmt(new), _fmt(old),
                        f", {event['outage_seconds']} s without a writer" if "outage_seconds" in event else "")
        self.events.append(event)
        if old is not None and old != new and drain:
            self.proxy.writer_changed(state.config, old, new)

    # ------------------------------------------------------------------ reporting

    def snapshot(self) -> dict:
        out = {}
        for name, state in self.clusters.items():
            out[name] = {
                "writer": _fmt(state.writer),
                "nodes": [{"address": _fmt(n.address), "role": n.role, "healthy": n.healthy, "lag": n.lag,
                           "lag_bytes": n.lag_bytes, "skipped": self.skipped_reason(state, n),
                           "failures": n.failures, "sources": sorted(n.sources), "error": n.last_error}
                          for n in state.nodes.values()],
                "serving": {role: sorted(_fmt(a) for a in addresses) for role, addresses in state.eligible.items()},
                "read_only_checks": {"total": state.verifications_total,
                                     "not_writer": state.verifications_refuted_total},
                "endpoints": {kind: {"name": w.name, "addresses": list(w.addresses), "error": w.last_error,
                                     "lookups": w.lookups, "failures": w.failures}
                              for kind, w in state.watches.items()},
            }
        out["events"] = list(self.events)[-50:]
        return out

    def metric_families(self, prefix: str):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
        node = GaugeMetricFamily(prefix + "backend_node_up", "1 when the node's last probes succeeded",
                                 labels=["cluster", "node", "role"])
        lag = GaugeMetricFamily(prefix + "backend_node_replica_lag_seconds",
                                "Replica lag reported by the probe (NaN when the replica cannot tell)",
                                labels=["cluster", "node"])
        lag_bytes = GaugeMetricFamily(prefix + "backend_node_replica_lag_bytes",
                                      "Bytes the replica received but has not applied, where the engine reports it",
                                      labels=["cluster", "node"])
        serving = GaugeMetricFamily(prefix + "backend_node_serving", "1 when pools of the role may use the node",
                                    labels=["cluster", "node", "role"])
        checks = CounterMetricFamily(prefix + "read_only_checks",
                                     "Probes of a node that refused a statement as read-only, by what it answered",
                                     labels=["cluster", "outcome"])
        writer = GaugeMetricFamily(prefix + "cluster_writer_known", "1 when a verified writer is known", labels=["cluster"])
        changes = CounterMetricFamily(prefix + "cluster_writer_changes", "Writer changes seen", labels=["cluster"])
        probes = CounterMetricFamily(prefix + "backend_probes", "Role probes by outcome", labels=["cluster", "outcome"])
        lookups = CounterMetricFamily(prefix + "dns_lookups", "DNS lookups of endpoints by outcome",
                                      labels=["cluster", "endpoint", "outcome"])
        for name, state in self.clusters.items():
            for n in state.nodes.values():
                node.add_metric([name, _fmt(n.address), n.role or "unknown"], 1 if n.healthy else 0)
                lag.add_metric([name, _fmt(n.address)], float("nan") if n.lag is None else n.lag)
                if n.lag_bytes is not None:
                    lag_bytes.add_metric([name, _fmt(n.address)], n.lag_bytes)
                for role, addresses in state.eligible.items():
                    serving.add_metric([name, _fmt(n.address), role], 1 if n.address in addresses else 0)
            writer.add_metric([name], 1 if state.writer else 0)
            changes.add_metric([name], self.writer_changes_total[name])
            checks.add_metric([name, "still_writer"], state.verifications_total - state.verifications_refuted_total)
            checks.add_metric([name, "not_writer"], state.verifications_refuted_total)
            probes.add_metric([name, "ok"], state.probes_total - state.probe_failures_total)
            probes.add_metric([name, "failed"], state.probe_failures_total)
            for kind, w in state.watches.items():
                lookups.add_metric([name, w.name, "ok"], w.lookups - w.failures)
                lookups.add_metric([name, w.name, "failed"], w.failures)
        yield from (node, lag, lag_bytes, serving, writer, changes, probes, lookups, checks)


def _dns_client(config: ClusterConfig) -> DnsClient | None:
    if not config.endpoints:
        return None
    ns_host, ns_port = config.dns.nameserver or ("", 53)
    return DnsClient(ns_host, ns_port, config.dns.timeout)


def _serves_reads(node: NodeState, state: ClusterState) -> bool:
    """A healthy reader that can tell its lag, within max_replica_lag, that its probe did not rule out; while the
    cluster has no writer, only once a probe made writerless_reader_delay after the loss confirmed it."""
    if state.writer is None and state.writer_lost_at is not None and \
            node.last_ok < state.writer_lost_at + state.health.writerless_reader_delay:
        return False
    return (node.healthy and node.role == "reader" and not node.skip and node.lag is not None
            and node.lag <= state.health.max_replica_lag)


def _fmt(address) -> str | None:
    return None if address is None else f"{address[0]}:{address[1]}"
