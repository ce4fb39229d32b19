"""Accept balance between workers: who defers, and what a stopped worker's slot counts for."""
import os

from multiproxy.balance import ABSENT, SLACK, AcceptBalance


def test_a_worker_defers_only_when_it_has_more_than_slack_clients_above_the_least_loaded():
    balance = AcceptBalance(slots=4)
    for index in range(3):
        balance.started(index)
    balance.publish(0, 10)
    balance.publish(1, 10 - SLACK)
    balance.publish(2, 10 + SLACK)
    assert not balance.should_defer(0)
    assert not balance.should_defer(1)
    assert balance.should_defer(2)
    balance.publish(1, 0)
    assert balance.should_defer(0) and balance.should_defer(2) and not balance.should_defer(1)
    balance.close()


def test_a_stopped_worker_is_left_out_and_a_lone_worker_never_defers():
    balance = AcceptBalance(slots=4)
    balance.started(0)
    balance.publish(0, 50)
    assert not balance.should_defer(0)
    balance.started(1)
    assert balance.should_defer(0)          # worker 1 runs with no clients
    balance.stopped(1)
    assert balance.snapshot() == [50, ABSENT]
    assert not balance.should_defer(0)
    balance.close()


def test_counts_and_added_workers_are_seen_across_a_fork():
    balance = AcceptBalance(slots=4)
    balance.started(0)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:                            # the "worker": publishes, and sees a worker the parent adds later
        os.close(read_end)
        balance.publish(0, 7)
        os.write(write_end, b"x")
        while balance.workers < 2:
            pass
        os._exit(0 if balance.should_defer(0) else 1)
    os.close(write_end)
    assert os.read(read_end, 1) == b"x"
    assert balance.snapshot() == [7]
    balance.started(1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    os.close(read_end)
    balance.close()


def test_a_worker_beyond_the_slots_is_never_compared_nor_deferred():
    balance = AcceptBalance(slots=2)
    balance.started(0)
    balance.started(5)
    balance.publish(5, 100)
    assert not balance.should_defer(5)
    assert balance.snapshot() == [0]
    balance.close()


def test_a_client_sent_to_adopt_counts_at_once_until_its_worker_publishes():
    balance = AcceptBalance(slots=4)
    balance.started(0)
    balance.started(1)
    balance.publish(0, 3)
    balance.reserve(0)
    balance.reserve(2)                      # not running: stays absent
    assert balance.snapshot()[:2] == [4, 0] and balance.counts[2] == ABSENT
    balance.publish(0, 3)                   # the worker's own count wins
    assert balance.snapshot()[0] == 3
    balance.close()
