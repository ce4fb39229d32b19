"""Throttling of failed logins per client address: a growing delay, then a temporary block."""
from __future__ import annotations

import time
from dataclasses import dataclass

from . import relay_core


@dataclass
class _Record:
    failures: int = 0
    last_failure: float = 0.0
    blocked_until: float = 0.0


class LoginThrottle:
    """Counts failed logins per address. Each failure is answered after a delay that doubles (from
    `base_delay`, at most `max_delay`); `block_after` failures within `window` seconds block the address
    for `block_seconds`. A successful login clears the address's record."""

    def __init__(self, base_delay: float = 0.25, max_delay: float = 4.0, block_after: int = 10,
                 block_seconds: float = 60.0, window: float = 300.0, clock=time.monotonic):
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.block_after = block_after
        self.block_seconds = block_seconds
        self.window = window
        self.clock = clock
        self._records: dict[str, _Record] = {}

    def blocked_for(self, address: str) -> float:
        """Seconds the address stays blocked (0 when it may log in)."""
        record = self._records.get(address)
        if record is None:
            return 0.0
        return max(0.0, record.blocked_until - self.clock())

    def failed(self, address: str) -> float:
        """Record a failed login; returns the delay to wait before answering it."""
        now = self.clock()
        record = self._records.get(address)
        if record is None or now - record.last_failure > self.window:
            record = self._records[address] = _Record()
        record.failures += 1
        record.last_failure = now
        relay_core.attend()     # (the relay logins' doors leave every login to the Python path while it watches)
        if self.block_after and record.failures >= self.block_after:
            record.blocked_until = now + self.block_seconds
        if len(self._records) > 100_000:
            self._forget_old(now)
        if not self.base_delay:
            return 0.0
        # A bounded exponent: past 1024 failures 2 ** n no longer fits a float (block_after = 0 never resets them).
        return min(self.base_delay * 2.0 ** min(record.failures - 1, 64), self.max_delay)

    def watching(self) -> bool:
        """Some address has failed logins on record (relay logins leave every login to the Python path then)."""
        return bool(self._records)

    def succeeded(self, address: str) -> None:
        self._records.pop(address, None)

    def _forget_old(self, now: float) -> None:
        for address in [a for a, r in self._records.items()
                        if now - r.last_failure > self.window and r.blocked_until < now]:
            del self._records[address]
