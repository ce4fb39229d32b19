"""Failed-login throttling per client address (multiproxy.throttle): the doubling delay, its cap, the block."""
from __future__ import annotations

from multiproxy.throttle import LoginThrottle


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_delay_doubles_up_to_its_cap_and_a_success_clears_it():
    throttle = LoginThrottle(base_delay=0.25, max_delay=4.0, block_after=0, clock=Clock())
    assert [throttle.failed("10.0.0.1") for _ in range(7)] == [0.25, 0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    throttle.succeeded("10.0.0.1")
    assert throttle.failed("10.0.0.1") == 0.25


def test_an_address_failing_thousands_of_times_without_a_block_still_gets_the_cap():
    throttle = LoginThrottle(base_delay=0.25, max_delay=4.0, block_after=0, clock=Clock())
    for _ in range(3000):       # past 1025 failures, 2 ** n no longer fits a float
        delay = throttle.failed("10.0.0.1")
    assert delay == 4.0 and throttle.blocked_for("10.0.0.1") == 0.0


def test_block_after_failures_blocks_the_address_for_block_seconds():
    clock = Clock()
    throttle = LoginThrottle(block_after=3, block_seconds=60.0, clock=clock)
    for _ in range(3):
        throttle.failed("10.0.0.2")
    assert throttle.blocked_for("10.0.0.2") == 60.0
    clock.now += 61
    assert throttle.blocked_for("10.0.0.2") == 0.0
