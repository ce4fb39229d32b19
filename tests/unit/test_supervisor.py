"""The pure parts of the supervisor and the group view: back-off schedule, heartbeat interval, exit statuses in
words, the budget broker's bookkeeping, and the merges of views, metrics and /status over workers."""
from __future__ import annotations

import os
import signal

import pytest

from multiproxy.groupview import merge_families, merge_status, merge_view
from multiproxy.supervisor import Broker, backoff_delay, describe_status, heartbeat_interval


def test_backoff_doubles_from_a_tenth_of_a_second_up_to_ten_seconds():
    assert [backoff_delay(n) for n in range(1, 10)] == [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 10.0, 10.0]
    assert backoff_delay(0) == 0.1     # a worker that ran long enough starts afresh
    assert backoff_delay(1000) == 10.0
    assert backoff_delay(5000) == 10.0    # a worker dying for hours: no OverflowError


def test_heartbeat_interval_gives_several_beats_per_worker_timeout():
    assert heartbeat_interval(30.0) == 1.0
    assert heartbeat_interval(2.0) == 0.4
    assert heartbeat_interval(0.2) == 0.1


def test_exit_statuses_in_words():
    assert describe_status(9) == "killed by signal 9 (SIGKILL)"      # as waitpid reports a SIGKILL
    assert describe_status(1 << 8) == "exited with status 1"
    assert describe_status(0) == "exited with status 0"
    assert describe_status(int(signal.SIGSEGV)) == "killed by signal 11 (SIGSEGV)"
    assert os.WIFSIGNALED(9)


def test_the_broker_grants_up_to_the_limit_of_every_key_all_or_nothing():
    broker = Broker()
    keys = [["budget:main/writer/u/db", 3], ["cap:main/writer", 4]]
    assert [broker.acquire(0, keys)[0] for _ in range(2)] == [True, True]
    assert broker.acquire(1, keys) == (True, [])
    assert broker.acquire(1, keys) == (False, ["budget:main/writer/u/db"])
    assert broker.total("budget:main/writer/u/db") == 3 and broker.total("cap:main/writer") == 3
    # Another budget under the same cap: one slot left there, then the cap is full.
    other = [["budget:main/writer/v/db", 3], ["cap:main/writer", 4]]
    assert broker.acquire(1, other)[0] is True
    assert broker.acquire(0, other) == (False, ["cap:main/writer"])
    assert broker.total("budget:main/writer/v/db") == 1       # nothing taken of a refused request
    assert broker.refusals_total == 2
    # The worker holding the most is asked to close an idle one; it must when the asker holds two fewer or none,
    # else (both hold about their share) only one idle for a while closes.
    assert broker.evict_candidate("budget:main/writer/u/db", besides=1) == (0, False)
    assert broker.evict_candidate("budget:main/writer/u/db", besides=0) == (1, False)
    assert broker.evict_candidate("budget:main/writer/v/db", besides=0) == (1, True)
    broker.release(1, ["budget:main/writer/u/db", "cap:main/writer"])
    assert broker.acquire(0, keys)[0] is True
    assert broker.held["budget:main/writer/u/db"] == {0: 3}
    assert broker.evict_candidate("budget:main/writer/u/db", besides=1) == (0, True)
    assert broker.evict_candidate("budget:main/writer/u/db", besides=0) == (None, False)


def test_a_release_wakes_the_refused_workers_and_a_dead_workers_slots_free():
    broker = Broker()
    keys = [["budget:b", 2]]
    broker.acquire(0, keys)
    broker.acquire(0, keys)
    assert broker.acquire(1, keys)[0] is False
    assert broker.acquire(2, keys)[0] is False
    assert broker.release(0, ["budget:b"]) == [(1, "budget:b"), (2, "budget:b")]
    assert broker.release(0, ["budget:b"]) == []          # woken once; they ask again if they still wait
    assert broker.total("budget:b") == 0
    broker.acquire(0, keys)
    broker.acquire(0, keys)
    assert broker.acquire(1, keys)[0] is False
    assert broker.drop(0) == [(1, "budget:b")]
    assert broker.total("budget:b") == 0 and broker.held == {}
    assert broker.release(3, ["budget:b"], 5) == []         # never below zero
    assert broker.held == {}


def test_no_limit_means_no_refusal():
    broker = Broker()
    assert all(broker.acquire(0, [["cap:c", 0]])[0] for _ in range(50))


POOL_COLUMNS = [("database", "text"), ("user", "text"), ("cl_active", "int4"), ("cl_waiting", "int4"),
                ("sv_active", "int4"), ("sv_idle", "int4"), ("maxwait", "int4"), ("pool_mode", "text"),
                ("cluster", "text"), ("role", "text"), ("engine", "text"), ("variant", "text"), ("max_size", "int4"),
                ("paused", "int4")]


def test_show_pools_sums_the_counts_of_a_pool_over_the_workers_and_keeps_its_settings():
    answers = {
        0: [["db", "u", 2, 1, 2, 0, 3, "transaction", "main", "writer", "postgres", "", 3, 0],
            ["db", "v", 1, 0, 1, 1, 0, "transaction", "main", "writer", "postgres", "", 3, 0]],
        1: [["db", "u", 4, 0, 1, 0, 5, "transaction", "main", "writer", "postgres", "", 3, 1]],
    }
    columns, rows = merge_view("pools", POOL_COLUMNS, answers)
    assert columns == POOL_COLUMNS
    assert rows == [["db", "u", 6, 1, 3, 0, 5, "transaction", "main", "writer", "postgres", "", 3, 1],
                    ["db", "v", 1, 0, 1, 1, 0, "transaction", "main", "writer", "postgres", "", 3, 0]]


def test_client_rows_are_concatenated_with_a_worker_column():
    columns = [("type", "text"), ("user", "text")]
    merged_columns, rows = merge_view("clients", columns, {1: [["C", "b"]], 0: [["C", "a"], ["C", "c"]]})
    assert merged_columns == columns + [("worker", "int4")]
    assert rows == [["C", "a", 0], ["C", "c", 0], ["C", "b", 1]]


EVENT_COLUMNS = [("time", "text"), ("event", "text"), ("cluster", "text"), ("database", "text"), ("detail", "text")]


def test_events_every_worker_records_are_listed_once_and_a_workers_own_name_it():
    writer = ["registry.writer", "main", None, "old=None, new=127.0.0.1:5432, reason=probe"]
    pause = ["pause", None, "app", None]
    answers = {
        0: [["2026-01-02 03:04:05 UTC", *writer], ["2026-01-02 03:05:00 UTC", *pause],
            ["2026-01-02 03:06:00 UTC", "takeover", None, None, "from_pid=7"]],
        1: [["2026-01-02 03:04:06 UTC", *writer], ["2026-01-02 03:05:00 UTC", *pause]],
    }
    columns, rows = merge_view("events", EVENT_COLUMNS, answers)
    assert columns == EVENT_COLUMNS + [("workers", "text")]
    assert rows == [["2026-01-02 03:04:05 UTC", *writer, "all"], ["2026-01-02 03:05:00 UTC", *pause, "all"],
                    ["2026-01-02 03:06:00 UTC", "takeover", None, None, "from_pid=7", "0"]]


def test_events_alike_stay_apart_when_one_worker_repeats_them_or_they_are_far_apart():
    down = ["registry.node", "main", None, "node=127.0.0.1:5432, state=down"]
    answers = {
        0: [["2026-01-02 03:04:05 UTC", *down], ["2026-01-02 03:04:07 UTC", *down],
            ["2026-01-02 04:00:00 UTC", *down]],
        1: [["2026-01-02 03:04:06 UTC", *down]],
        2: [["2026-01-02 03:04:09 UTC", *down]],
    }
    _, rows = merge_view("events", EVENT_COLUMNS, answers)
    assert [(row[0], row[-1]) for row in rows] == [("2026-01-02 03:04:05 UTC", "all"),
                                                  ("2026-01-02 03:04:07 UTC", "0"),
                                                  ("2026-01-02 04:00:00 UTC", "0")]


def test_lists_sum_clients_but_not_the_names_both_workers_know():
    columns = [("list", "text"), ("items", "int4")]
    _, rows = merge_view("lists", columns, {0: [["databases", 1], ["used_clients", 3]],
                                            1: [["databases", 1], ["used_clients", 4]]})
    assert rows == [["databases", 1], ["used_clients", 7]]


def test_views_that_describe_the_configuration_come_from_one_worker():
    columns = [("key", "text"), ("value", "text")]
    assert merge_view("config", columns, {1: [["b", "2"]], 0: [["a", "1"]]}) == (columns, [["a", "1"]])


def test_metric_samples_of_the_same_labels_are_summed_and_settings_are_not():
    worker0 = [["multiproxy_client_connections", "gauge", "open", [["multiproxy_client_connections",
                                                                     {"listener": "pg"}, 5.0]]],
               ["multiproxy_cancel_requests", "counter", "cancels",
                [["multiproxy_cancel_requests_total", {"outcome": "ignored"}, 1.0]]],
               ["multiproxy_cluster_connections_max", "gauge", "cap",
                [["multiproxy_cluster_connections_max", {"cluster": "main", "role": "writer"}, 10.0]]]]
    worker1 = [["multiproxy_client_connections", "gauge", "open", [["multiproxy_client_connections",
                                                                     {"listener": "pg"}, 7.0],
                                                                    ["multiproxy_client_connections",
                                                                     {"listener": "other"}, 1.0]]],
               ["multiproxy_cluster_connections_max", "gauge", "cap",
                [["multiproxy_cluster_connections_max", {"cluster": "main", "role": "writer"}, 10.0]]]]
    merged = {name: samples for name, _, _, samples in merge_families([worker0, worker1], "multiproxy_")}
    assert merged["multiproxy_client_connections"] == [["multiproxy_client_connections", {"listener": "pg"}, 12.0],
                                                       ["multiproxy_client_connections", {"listener": "other"}, 1.0]]
    assert merged["multiproxy_cancel_requests"][0][2] == 1.0
    assert merged["multiproxy_cluster_connections_max"][0][2] == 10.0


def test_status_snapshots_are_summed_per_listener_pool_and_pin():
    own = {"uptime_seconds": 3, "listeners": [{"name": "pg", "clients": 2}],
           "pools": [{"pool": "main/writer/u/db", "size": 1, "idle": 0, "borrowed": 1, "waiting": 0, "max_size": 3,
                      "budget": "main/writer/u/db", "budget_size": 1}],
           "pins": {"main": {"now": {"temp_table": 1}, "detected_total": {"temp_table": 2}}},
           "registry": None, "cluster_caps": [{"cluster": "main", "role": "writer", "max": 4, "connections": 1}]}
    other = {"listeners": [{"name": "pg", "clients": 3}],
             "pools": [{"pool": "main/writer/u/db", "size": 2, "idle": 2, "borrowed": 0, "waiting": 1, "max_size": 3,
                        "budget": "main/writer/u/db", "budget_size": 2},
                       {"pool": "main/writer/v/db", "size": 1, "idle": 1, "borrowed": 0, "waiting": 0, "max_size": 3,
                        "budget": "main/writer/v/db", "budget_size": 1}],
             "pins": {"main": {"now": {}, "detected_total": {"temp_table": 1}}},
             "cluster_caps": [{"cluster": "main", "role": "writer", "max": 4, "connections": 2}]}
    merged = merge_status(own, [other])
    assert merged["listeners"] == [{"name": "pg", "clients": 5}]
    assert [(p["pool"], p["size"], p["idle"], p["borrowed"], p["waiting"]) for p in merged["pools"]] == [
        ("main/writer/u/db", 3, 2, 1, 1), ("main/writer/v/db", 1, 1, 0, 0)]
    assert merged["pins"]["main"] == {"now": {"temp_table": 1}, "detected_total": {"temp_table": 3}}
    assert merged["cluster_caps"] == [{"cluster": "main", "role": "writer", "max": 4, "connections": 3}]
    assert own["listeners"][0]["clients"] == 2        # the worker's own snapshot is left as it was


@pytest.mark.parametrize("view", ["stats", "stats_totals", "stats_averages"])
def test_stats_are_summed_per_database(view):
    columns = [("database", "text"), ("total_xact_count", "numeric")]
    _, rows = merge_view(view, columns, {0: [["db", 3], ["x", 1]], 1: [["db", 4]]})
    assert rows == [["db", 7], ["x", 1]]


class FakeSupervisor:
    """What multiproxy.scaling uses of a Supervisor, with workers that are not running (pid 0: no signal is sent)."""

    def __init__(self, count: int):
        from types import SimpleNamespace

        from multiproxy.supervisor import WorkerState
        self.workers = [WorkerState(i) for i in range(count)]
        self.stopping_since = None
        self.custody = False
        self.config = SimpleNamespace(proxy=SimpleNamespace(shutdown_timeout=1.0, takeover_drain_timeout=1.0))
        self.sent = []
        self.spawned = []
        self.key_floors = {}
        self.moved_keys = {}

    def send(self, state, message):
        self.sent.append((state.index, message))

    def spawn(self, state):
        self.spawned.append(state.index)


def test_sigttou_removes_the_highest_index_down_to_one_and_sigttin_starts_the_lowest_stopped_one_again():
    from multiproxy import scaling
    from multiproxy.supervisor import WorkerState
    supervisor = FakeSupervisor(3)
    scaling.remove_worker(supervisor)
    assert [s.index for s in supervisor.workers] == [0, 1]        # not running: gone at once
    supervisor.workers[1].pid = 4242                              # still draining: it stays listed until it exits
    supervisor.workers[1].retiring = True
    scaling.remove_worker(supervisor)                             # worker 0 is the last one serving: it stays
    assert not supervisor.workers[0].retiring
    scaling.add_worker(supervisor, WorkerState)                   # index 1 is still draining: a new index 2
    assert supervisor.spawned == [2] and [s.index for s in supervisor.workers] == [0, 1, 2]
    supervisor.workers[1].pid = 0
    scaling.retired(supervisor)                                   # 1 exited, but 2 runs above it: 1 stays listed
    assert [s.index for s in supervisor.workers] == [0, 1, 2]
    scaling.add_worker(supervisor, WorkerState)                   # the stopped index 1 starts again
    assert supervisor.spawned == [2, 1] and not supervisor.workers[1].retiring


def test_an_index_sigttou_retired_starts_again_with_keys_after_those_of_its_moved_clients():
    from multiproxy import scaling
    from multiproxy.supervisor import WorkerState
    supervisor = FakeSupervisor(3)
    retiring = supervisor.workers[2]
    retiring.pid, retiring.channel, retiring.retiring = 4242, object(), True
    # Its clients went to the others with keys up to its counter (told with each handed client and at drained).
    scaling.note_key_floor(supervisor, retiring, 17)
    scaling.note_key_floor(supervisor, retiring, 12)
    retiring.pid, retiring.channel = 0, None
    scaling.retired(supervisor)
    assert [s.index for s in supervisor.workers] == [0, 1]
    scaling.add_worker(supervisor, WorkerState)
    assert supervisor.spawned == [2] and supervisor.workers[2].book.key_counter == 17


def test_a_moved_client_that_leaves_is_forgotten_only_by_the_worker_that_serves_it():
    from types import SimpleNamespace

    from multiproxy import scaling
    from multiproxy.handover import encode
    supervisor = FakeSupervisor(3)
    for state in supervisor.workers:
        state.pid, state.channel = 100 + state.index, object()
    record = {"engine": "postgres", "session": encode({"cancel_key": (2 << 24 | 5, 99)})}
    scaling.tell_moved(supervisor, record, 1)
    entry = ["postgres", encode((2 << 24 | 5, 99)), 1]
    assert [m for _, m in supervisor.sent] == [{"op": "moved", "keys": [entry]}] * 3
    supervisor.sent.clear()
    scaling.moved_left(supervisor, SimpleNamespace(index=0), {"key": entry[1]})     # not where it is served
    assert supervisor.sent == [] and len(supervisor.moved_keys) == 1
    scaling.moved_left(supervisor, supervisor.workers[1], {"key": entry[1]})
    assert [m for _, m in supervisor.sent] == [{"op": "moved_gone", "key": entry[1]}] * 3
    assert supervisor.moved_keys == {}
