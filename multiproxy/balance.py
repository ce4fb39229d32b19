"""Accept balance between the workers of a process group: each publishes its client count, the busiest defer accepting.

The workers share each listening socket, and the kernel wakes every one of them for a new connection; the one that
runs first takes it. On a busy machine that is often the same worker, so clients pile up on one (27 to 3 was seen).
`AcceptBalance` is one counter per worker index in memory shared by the supervisor and all its workers (created
before the first fork, as custody's busy map): a worker writes its number of clients when one arrives or leaves,
and before it accepts it looks at the others. A worker with more than `SLACK` clients above the least loaded live
worker waits `DEFER` seconds before it accepts, so that a less loaded worker, woken by the same connection, takes
it; if none did (that worker is busy or stuck), the connection is taken after all. A slot of a worker that is not
running reads `ABSENT` and is left out.
"""
from __future__ import annotations

import mmap

SLOTS = 256                 # worker indexes the map holds; a worker beyond them accepts without comparing
ABSENT = -1                 # the slot's worker is not running
SLACK = 1                   # clients above the least loaded worker that a worker still accepts at once
DEFER = 0.005               # seconds a busier worker waits for the others before it accepts a connection itself


class AcceptBalance:
    """Client counts of a process group's workers, one signed 32-bit slot per worker index, in shared memory."""

    def __init__(self, slots: int = SLOTS):
        # Slot 0 holds how many worker indexes are in use (shared too: a worker added later raises it for all).
        self.memory = mmap.mmap(-1, (slots + 1) * 4, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        self.slots = slots
        self.view = memoryview(self.memory).cast("i")
        self.header, self.counts = self.view[:1], self.view[1:]
        for index in range(slots):
            self.counts[index] = ABSENT
        self.header[0] = 0

    @property
    def workers(self) -> int:
        return self.header[0]

    def started(self, index: int) -> None:
        """The supervisor forked worker `index`: it counts, with no clients yet (a resumed client counts on arrival)."""
        if index >= self.slots:
            return
        self.counts[index] = 0
        if index >= self.header[0]:
            self.header[0] = index + 1

    def stopped(self, index: int) -> None:
        """Worker `index` is gone: the others no longer compare themselves with it."""
        if index < self.slots:
            self.counts[index] = ABSENT

    def publish(self, index: int, clients: int) -> None:
        if index < self.slots:
            self.counts[index] = clients

    def reserve(self, index: int) -> None:
        """The supervisor sent worker `index` a client to adopt: it counts now (so that the next client of a burst goes
        to another worker), until that worker publishes its own count again."""
        if index < self.slots and self.counts[index] != ABSENT:
            self.counts[index] += 1

    def should_defer(self, index: int) -> bool:
        """Whether worker `index` is more than SLACK clients above the least loaded running worker."""
        if index >= self.slots:
            return False
        counts = self.counts
        mine = counts[index]
        least = mine
        for other in range(self.workers):
            count = counts[other]
            if count != ABSENT and count < least:
                least = count
        return mine - least > SLACK

    def snapshot(self) -> list[int]:
        return [self.counts[index] for index in range(self.workers)]

    def close(self) -> None:
        self.header.release()
        self.counts.release()
        self.view.release()
        self.memory.close()
