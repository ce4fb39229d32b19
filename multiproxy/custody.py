"""Worker custody: the supervisor holds each worker's client connections and session records, so a respawned worker resumes the idle ones.

With `[proxy] workers > 1` and `worker_custody = true`, a worker sends its supervisor, over its channel, a duplicate
of each plaintext client connection it logs in (SCM_RIGHTS) with the client's session record (the takeover's
record: multiproxy.takeover.export_record), and a fresh record whenever the session changed in a way a resumed
session depends on (the engine's `handover_generation()` moved), at the end of a transaction. Whether a client is
busy (a request read and not answered, a transaction open, a pin, a half-read message) lives in a `BusyMap`, one
byte per client slot in memory shared with the supervisor: the worker writes it on the hot path (no message), the
supervisor reads it only when the worker died. Then the supervisor (`CustodyBook.after_death`) shuts down the
connections of busy clients (their requests died with the worker: the client sees the end of the connection) and
hands the idle ones to the respawned worker, which inherits the descriptors when it is forked and resumes each
session as a takeover does (`WorkerCustody.resume`). A client that leaves is dropped from custody (`unhold`).

The byte is written once a client's bytes are there and before they are read (`marking_recv`): a worker killed in
between leaves that client counted busy, so it is closed although its request was never read; a client counted
idle never had a byte of a request consumed.
"""
from __future__ import annotations

import array
import dataclasses
import logging
import mmap
import socket as _stdsocket

from gevent import monkey

log = logging.getLogger("multiproxy.custody")
# The supervisor runs no gevent hub: descriptors are closed and shut down with the original calls.
_close = monkey.get_original("os", "close")
_socket_type = monkey.get_original("socket", "socket")

SLOTS = 1 << 16             # client slots per worker: one byte each in the busy map
IDLE = 0
BUSY = 1


class BusyMap:
    """One byte per client slot, in anonymous shared memory that a worker and its supervisor both see (created by
    the supervisor before it forks; the same map serves every incarnation of a worker index)."""

    def __init__(self, slots: int = SLOTS):
        self.slots = slots
        self.memory = mmap.mmap(-1, slots, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)

    def __setitem__(self, slot: int, busy: int) -> None:
        self.memory[slot] = busy

    def __getitem__(self, slot: int) -> int:
        return self.memory[slot]

    def busy(self, slot: int) -> bool:
        return self.memory[slot] != IDLE

    def clear(self) -> None:
        self.memory[:] = bytes(self.slots)

    def close(self) -> None:
        self.memory.close()


@dataclasses.dataclass
class HeldClient:
    """A client connection in the supervisor's custody: its descriptor (the supervisor's duplicate) and its latest
    session record (None until its engine could export it)."""
    fd: int
    record: dict | None


class CustodyBook:
    """The supervisor's custody of one worker index: slot -> HeldClient, and the cancel-key counter its workers
    reached (a respawned worker issues keys after it, so that the keys of resumed clients stay unique). Pure
    bookkeeping: `close` is how a descriptor is closed (os.close in the supervisor)."""

    def __init__(self, close=_close):
        self.held: dict[int, HeldClient] = {}
        self.key_counter = 0
        self.close = close

    def hold(self, slot: int, fd: int, record: dict | None, key_counter: int = 0) -> None:
        previous = self.held.get(slot)
        if previous is not None:            # the slot's previous client left without an unhold reaching us
            self.close(previous.fd)
        self.held[slot] = HeldClient(fd, record)
        self.key_counter = max(self.key_counter, key_counter)

    def update(self, slot: int, record: dict) -> bool:
        held = self.held.get(slot)
        if held is None:
            return False
        held.record = record
        return True

    def unhold(self, slot: int) -> bool:
        held = self.held.pop(slot, None)
        if held is None:
            return False
        self.close(held.fd)
        return True

    def after_death(self, busy_map) -> tuple[list[tuple[int, HeldClient]], list[HeldClient]]:
        """The worker died: (the idle clients, which stay held for the respawned worker, by slot; the busy ones,
        taken out of custody: the caller shuts their connections down and closes them). A client without a record
        counts as busy."""
        idle, busy = [], []
        for slot, held in list(self.held.items()):
            if held.record is None or busy_map.busy(slot):
                busy.append(self.held.pop(slot))
            else:
                idle.append((slot, held))
        return idle, busy

    def release_all(self) -> list[HeldClient]:
        """Everything held, out of custody (the group stops)."""
        held = list(self.held.values())
        self.held.clear()
        return held

    def fds(self) -> list[int]:
        return [held.fd for held in self.held.values()]


def shut_and_close(fd: int) -> None:
    """End a client connection for good, whoever else holds a descriptor of it: the client reads its end."""
    sock = _socket_type(fileno=fd)
    try:
        sock.shutdown(_stdsocket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


def received_fds(ancillary) -> list[int]:
    """The descriptors of a recvmsg's SCM_RIGHTS ancillary data."""
    fds = array.array("i")
    for level, kind, payload in ancillary:
        if level == _stdsocket.SOL_SOCKET and kind == _stdsocket.SCM_RIGHTS:
            fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
    return list(fds)


# ---------------------------------------------------------------------------------------------------- worker side

class WorkerCustody:
    """A worker's side: assigns each held client a slot, sends the supervisor its connection and records over the
    worker's channel (`proxy.link`, a supervisor.WorkerLink), writes the busy map, and resumes the idle clients of
    the worker's previous incarnation."""

    def __init__(self, proxy, link, busy_map: BusyMap):
        self.proxy = proxy
        self.link = link
        self.busy = busy_map
        self.free = list(range(busy_map.slots - 1, -1, -1))     # popped from the end: slot 0 first
        self.generations: dict[int, object] = {}      # slot -> the handover_generation its latest record has
        self.full_logged = False

    # ------------------------------------------------------------------ held clients

    def hold(self, session) -> None:
        """Take a logged-in client into custody (a plaintext client in transaction pool mode; others are not)."""
        from .fastio import ClientSocket
        if (type(session.sock) is not ClientSocket or not session.transaction_mode or session.pool is None
                or session.proto is None or self.link.closed):
            return
        if not self.free:
            if not self.full_logged:
                log.warning("worker %d: all %d custody slots are taken; later clients are not held (they are lost "
                            "if this worker dies)", self.proxy.worker, self.busy.slots)
                self.full_logged = True
            return
        slot = self.free.pop()
        busy = self.busy
        busy[slot] = BUSY
        session.custody_slot = slot
        record, generation = self._export(session)
        # No record yet (a request came with the login): the next transaction's end exports it whatever the signal.
        self.generations[slot] = generation if record is not None else None
        # A respawned worker issues cancel keys after every key this one issued.
        keys = self.proxy.cancel_keys_issued
        if not self.link.send_with_fds({"op": "hold", "slot": slot, "record": record, "keys": keys},
                                       [session.sock._sock.fileno()]):
            return
        if record is not None and not session.leftover:
            busy[slot] = IDLE

    def settle(self, session) -> None:
        """The client went idle (a transaction ended, a local answer): its record is sent again if its session
        changed, then it counts as idle unless its engine says it cannot go now (inside a transaction, pinned, ...)."""
        slot = session.custody_slot
        proto = session.proto
        if proto.handover_refusal():
            return                                      # stays busy
        generation = proto.handover_generation()
        known = self.generations.get(slot)
        if generation is None or known is None or generation != known:
            requests = proto.requests
            record, generation = self._export(session)
            if record is None:
                return
            self.generations[slot] = generation
            self.link.send({"op": "record", "slot": slot, "record": record})
            # The send may have waited (a full channel): the client may have sent its next request meanwhile.
            if (proto.requests != requests or session.backend is not None or session.client_gone
                    or proto.handover_refusal()):
                return
        self.busy[slot] = IDLE

    def marking_recv(self, sock, slot: int):
        """A held client's recv (a fastio.ClientSocket's wait-then-recv) that marks its slot busy once the client's
        bytes are there and before they are read: a worker killed in between leaves the client counted busy (closed),
        never counted idle with its request consumed (resumed, waiting for an answer that never comes)."""
        memory = self.busy.memory
        raw_recv = sock._sock.recv
        wait = sock._wait

        def recv(size: int) -> bytes:
            while True:
                wait(sock._read_event)
                before = memory[slot]
                memory[slot] = BUSY
                try:
                    return raw_recv(size)
                except BlockingIOError:
                    memory[slot] = before       # woken for nothing
        return recv

    def unhold(self, session) -> None:
        """The client left (or is closed): out of custody."""
        slot = session.custody_slot
        session.custody_slot = None
        self.busy[slot] = BUSY
        self.generations.pop(slot, None)
        self.link.send({"op": "unhold", "slot": slot})
        self.free.append(slot)

    @staticmethod
    def _export(session) -> tuple[dict | None, object]:
        from .takeover import export_record
        proto = session.proto
        generation = proto.handover_generation()
        return export_record(session), generation

    # ------------------------------------------------------------------ after a death

    def resume(self, inherited: list, key_counter: int, closed_busy: int, dead_pid: int) -> int:
        """Serve the idle clients of this worker index's previous process: `inherited` is [(slot, fd, record)], the
        descriptors inherited from the supervisor at the fork. Returns how many sessions resumed."""
        import itertools

        import gevent

        from .takeover import resume_session, session_source
        proxy = self.proxy
        if key_counter:
            proxy._cancel_counter = itertools.count(key_counter + 1)
        taken = {slot for slot, _, _ in inherited}
        if taken:
            self.free = [slot for slot in self.free if slot not in taken]
        resumed = failed = 0
        for slot, fd, record in inherited:
            try:
                session = resume_session(proxy, record, fd)
            except Exception:  # one client that cannot be resumed must not stop the others
                log.exception("worker %d: a client of listener %s held for the dead worker could not be resumed; it "
                              "is closed", proxy.worker, record.get("listener"))
                failed += 1
                self.link.send({"op": "unhold", "slot": slot})
                self.free.append(slot)
                continue
            session.custody_slot = slot
            self.generations[slot] = session.proto.handover_generation()
            self.busy[slot] = IDLE
            resumed += 1
            gevent.spawn(proxy.serve_session, session.runtime, session, session_source(session), session.resume)
        counts = proxy.metrics.custody_clients
        counts["resumed"] += resumed
        counts["closed_busy"] += closed_busy
        counts["failed"] += failed
        if inherited or closed_busy:
            log.info("worker %d resumed %d idle clients of its previous process (pid %d); %d busy clients were closed"
                     "%s", proxy.worker, resumed, dead_pid, closed_busy,
                     f"; {failed} could not be resumed" if failed else "")
        return resumed
