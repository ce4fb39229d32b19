"""The supervisor of forked workers (as gunicorn's arbiter): respawn with back-off, heartbeats, queued signals, and the
backend budget broker that makes max_size and max_cluster_connections hold for the whole process group.

The supervisor is a plain synchronous loop (no gevent hub runs in it: fork, waitpid, poll and signal are the
originals, as gevent's monkey patching would otherwise route them through a hub that never runs here). It creates
every listening socket once, before forking, and each worker accepts on the same sockets: a listener exists as long
as the supervisor lives, and a worker's death loses no queued connection (SO_REUSEPORT would give each worker a
queue of its own, reset when that worker dies). Each worker gets a channel (an AF_UNIX stream socketpair) to the
supervisor carrying JSON lines: `ready`, `beat` (every heartbeat interval, from the worker's gevent loop),
`reloaded`, `listen` (a reloading worker asks for the sockets of listeners the reload added, which the supervisor
bound once and sends by SCM_RIGHTS), and the broker's `acquire`/`release` (one round trip when a backend connection
opens, none per borrow), answered by `granted`, with `free` (a slot came free: try again) and `evict` (close an idle
connection of that budget for another worker) sent unasked; `group` tells each worker the count after SIGTTIN or
SIGTTOU (multiproxy.scaling), whose retiring worker's clients go to the others over the channels (`drain_clients`,
`handed`, `drained`, `adopt`), with `moved`, `moved_left` and `moved_gone` for their cancel keys. A worker's slots are freed when its channel closes: it died.

With `proxy.worker_custody` (multiproxy.custody) the channel also carries `hold` (a client connection, by
SCM_RIGHTS, with its session record), `record` (a newer record) and `unhold` (the client left); each worker index
has a busy map in shared memory. When a worker dies the supervisor reads what is left on its channel, shuts down
the connections of its busy clients, and forks the replacement with the idle ones, which it resumes.

The supervisor also holds the group's side of a takeover (multiproxy.group_takeover): it listens on the takeover
socket in its loop (`watch`: descriptors polled with the channels), or, started with one, takes the listening
sockets instead of binding them; the channel then carries the takeover's messages too (clients handed over, by
SCM_RIGHTS, in both directions).

`WorkerLink` is the worker's end of the channel.
"""
from __future__ import annotations

import _socket
import array
import collections
import ctypes
import errno
import json
import logging
import os
import signal
import socket as _stdsocket
import time

from gevent import monkey

from . import scaling
from .balance import AcceptBalance
from .custody import BusyMap, CustodyBook, received_fds, shut_and_close

log = logging.getLogger("multiproxy.supervisor")

SPARE_IDLE = 0.5          # seconds idle before a connection goes to a worker that already holds its share
BACKOFF_START = 0.1       # seconds before respawning a worker that died
BACKOFF_MAX = 10.0
BACKOFF_RESET_AFTER = 30.0     # a worker that ran this long starts the back-off afresh when it dies
RELOAD_ACK_TIMEOUT = 60.0      # READY=1 after a reload at the latest this long after it began
OUTBOX_LIMIT = 1 << 20         # bytes waiting for a worker's channel beyond which messages to it are dropped
HANDLED_SIGNALS = (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGCHLD, signal.SIGTTIN,
                   signal.SIGTTOU)

_fork = monkey.get_original("os", "fork")
_waitpid = monkey.get_original("os", "waitpid")
_poll = monkey.get_original("select", "poll")
_signal = monkey.get_original("signal", "signal")
_close = monkey.get_original("os", "close")
CHANNEL_FDS_SPACE = _stdsocket.CMSG_SPACE(16 * 4)     # a recvmsg gets the descriptors of one sendmsg at most


def backoff_delay(quick_deaths: int) -> float:
    """Seconds to wait before respawning a worker that died `quick_deaths` times in a row soon after its start:
    0.1 s, then doubling up to 10 s; 0 quick deaths (it ran BACKOFF_RESET_AFTER seconds): 0.1 s."""
    return min(BACKOFF_MAX, BACKOFF_START * 2.0 ** min(max(0, quick_deaths - 1), 64))   # 2 ** 1024: no float


def heartbeat_interval(worker_timeout: float) -> float:
    """How often a worker beats: several beats per worker_timeout, at most one a second, at least 10 a second."""
    return max(0.1, min(1.0, worker_timeout / 5))


def describe_status(status: int) -> str:
    """A waitpid status in words: 'exited with status 1', 'killed by signal 9 (SIGKILL)'."""
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        try:
            name = signal.Signals(number).name
        except ValueError:
            name = "?"
        return f"killed by signal {number} ({name})"
    if os.WIFEXITED(status):
        return f"exited with status {os.WEXITSTATUS(status)}"
    return f"status {status}"


# ---------------------------------------------------------------------------------------------------- the broker

class Broker:
    """The group's backend connection budget: per key (a pool's budget, a cluster's cap) the slots each worker
    holds, and the workers refused a slot, to wake when one frees. Pure bookkeeping: the supervisor sends."""

    def __init__(self):
        self.held: dict[str, dict[int, int]] = {}
        self.waiting: dict[str, set[int]] = {}
        self.refusals_total = 0

    def total(self, key: str) -> int:
        return sum(self.held.get(key, {}).values())

    def acquire(self, worker: int, keys: list) -> tuple[bool, list[str]]:
        """One slot of every key ([key, limit], limit 0: none) for `worker`, all or nothing: (granted, the keys
        that are full). A refused worker waits for a `free` of the full keys."""
        full = [key for key, limit in keys if limit and self.total(key) >= limit]
        if full:
            self.refusals_total += 1
            for key in full:
                self.waiting.setdefault(key, set()).add(worker)
            return False, full
        for key, _ in keys:
            counts = self.held.setdefault(key, {})
            counts[worker] = counts.get(worker, 0) + 1
        return True, []

    def release(self, worker: int, keys: list[str], count: int = 1) -> list[tuple[int, str]]:
        """`worker` gives back `count` slots of each key: the (worker, key) pairs to tell `free`."""
        wake = []
        for key in keys:
            counts = self.held.get(key, {})
            left = counts.get(worker, 0) - count
            if left > 0:
                counts[worker] = left
            else:
                counts.pop(worker, None)
            if not counts:
                self.held.pop(key, None)
            wake += [(other, key) for other in sorted(self.waiting.pop(key, ()))]
        return wake

    def drop(self, worker: int) -> list[tuple[int, str]]:
        """A worker died: its slots free; whom to tell `free`."""
        for waiters in self.waiting.values():
            waiters.discard(worker)
        keys = [key for key, counts in self.held.items() if worker in counts]
        wake = []
        for key in keys:
            wake += self.release(worker, [key], self.held[key][worker])
        return [(w, k) for w, k in wake if w != worker]

    def evict_candidate(self, key: str, besides: int) -> tuple[int | None, bool]:
        """The worker holding the most slots of `key` other than `besides` (asked to close an idle one), or None; and
        whether it must (urgent): `besides` holds none, or two fewer than it. Otherwise both hold about their share
        and the other closes only a connection idle for a while (WorkerLink.evict): taking a busy worker's connection
        for a worker as busy would pass slots back and forth, each move a backend closed and another opened."""
        counts = self.held.get(key, {})
        others = [(n, worker) for worker, n in counts.items() if worker != besides and n > 0]
        if not others:
            return None, False
        most, worker = max(others)
        mine = counts.get(besides, 0)
        return worker, mine == 0 or most > mine + 1

# ---------------------------------------------------------------------------------------------------- supervisor

class WorkerState:
    """What the supervisor knows of one worker index."""

    def __init__(self, index: int):
        self.index = index
        self.pid = 0
        self.channel = None          # the supervisor's end (a raw _socket.socket), None while not running
        self.buffer = b""
        self.outbox = b""            # what the channel did not take yet (sent when it can)
        self.started = 0.0
        self.last_beat = 0.0
        self.quick_deaths = 0
        self.restarts = 0
        self.respawn_at: float | None = None
        self.ready = False
        self.generation = 0          # the supervisor's reload count when it forked this worker
        self.fds: collections.deque = collections.deque()  # descriptors received on the channel, not yet claimed
        self.book = CustodyBook()    # worker custody: the clients held for this worker index
        self.busy_map: BusyMap | None = None
        self.closed_busy = 0         # busy clients closed at its last death (told to the respawned worker)
        self.dead_pid = 0
        self.retiring = False        # SIGTTOU stopped it: not respawned (multiproxy.scaling)


class Supervisor:
    """Forks `workers` workers and keeps them running; see the module docstring."""

    def __init__(self, config, engines, workers: int, run_worker, make_listen_socket, take_over: bool | str = False):
        self.config = config
        self.engines = engines
        self.run_worker = run_worker
        self.group = os.getpid()
        self.workers = [WorkerState(i) for i in range(workers)]
        self.by_fd: dict[int, WorkerState] = {}
        self.broker = Broker()
        self.signals: collections.deque = collections.deque()
        self.stopping_since: float | None = None
        self.reload_pending: set[int] = set()
        self.reload_began = 0.0
        self.reload_open = False        # a reload began; systemd hears READY=1 when it ends
        self.generation = 0             # reloads so far
        self.announced_ready = False
        self.exit_status = 0
        self.make_listen_socket = make_listen_socket     # also binds the listeners a reload adds
        self.watchers: dict = {}        # descriptor -> what to call when poll says it is readable (takeovers)
        # SIGTTOU (multiproxy.scaling): the cancel-key counter each retired index reached, and where each client a
        # retired worker handed over is served now (its key as JSON -> [engine, key, worker]).
        self.key_floors: dict[int, int] = {}
        self.moved_keys: dict[str, list] = {}
        from .group_takeover import GroupHandover, GroupTakeover
        self.handover = GroupHandover(self)     # this group handed over to a new process or group
        self.takeover = None                    # this group taking over from a running one
        taken = None
        if take_over:
            self.takeover = GroupTakeover(self, required=take_over != "if-running")
            taken = self.takeover.connect(_taken_socket)
            if taken is None:
                self.takeover = None
        self.listen_addresses = {lc.name: lc.listen for lc in config.listeners}
        self.admin_socket = None
        if taken is not None:
            # The running process's listening sockets: nothing is bound here (a listener of this config it did not
            # hand over is bound by each worker, as one a reload adds).
            self.sockets, self.admin_socket = taken
        else:
            # The listening sockets, created once: every worker accepts on them (see the module docstring).
            # SO_REUSEPORT on them too, so that a listener a reload adds that the supervisor could not bind (each
            # worker binds it then) may share an address.
            self.sockets = {lc.name: make_listen_socket(lc.listen[0], lc.listen[1], reuse_port=True)
                            for lc in config.listeners}
        if config.proxy.admin_listen and self.admin_socket is None:
            from .config import parse_address
            host, port = parse_address(config.proxy.admin_listen)
            # Bound here as well, so that a respawned worker 0 serves the admin HTTP server on the same socket.
            self.admin_socket = make_listen_socket(host, port)
        # Worker custody: a busy map per worker index, shared with every process of that index.
        self.custody = bool(config.proxy.worker_custody)
        if self.custody:
            for state in self.workers:
                state.busy_map = BusyMap()
        # Accept balance: every worker's client count, shared (multiproxy.balance).
        self.balance = AcceptBalance()
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)
        self.poller = _poll()
        self.poller.register(self.wake_r, 0x001)

    # ------------------------------------------------------------------ signals: queued, handled by the loop

    def _on_signal(self, signum, frame):
        if signum != signal.SIGCHLD and len(self.signals) < 10:
            self.signals.append(signum)
        try:
            os.write(self.wake_w, b".")
        except OSError:
            pass

    # ------------------------------------------------------------------ running

    def run(self) -> int:
        for signum in HANDLED_SIGNALS:
            _signal(signum, self._on_signal)
        for state in self.workers:
            self.spawn(state)
        if self.takeover is None:
            self.listen_for_takeovers()
        while True:
            self.reap()
            if self.stopping_since is not None and not any(s.pid for s in self.workers):
                break
            while self.signals:
                self.handle_signal(self.signals.popleft())
            now = time.monotonic()
            self.check_heartbeats(now)
            self.check_respawns(now)
            self.check_reload(now)
            self.check_stop(now)
            self.handover.tick(now)
            self.wait(self.next_timeout(now))
        self.handover.stop()
        if self.takeover is not None:
            self.takeover.stop()
        for state in self.workers:
            for held in state.book.release_all():
                shut_and_close(held.fd)
        for sock in self.sockets.values():
            sock.close()
        if self.admin_socket is not None:
            self.admin_socket.close()
        return self.exit_status

    def next_timeout(self, now: float) -> float:
        timeout = 0.1 if self.handover.phase == "keys" else 0.5
        for state in self.workers:
            if state.respawn_at is not None:
                timeout = min(timeout, max(0.0, state.respawn_at - now))
        return timeout

    def wait(self, timeout: float) -> None:
        try:
            events = self.poller.poll(timeout * 1000)
        except InterruptedError:
            return
        for fd, event in events:
            if fd == self.wake_r:
                try:
                    while os.read(self.wake_r, 512):
                        pass
                except BlockingIOError:
                    pass
                continue
            watcher = self.watchers.get(fd)
            if watcher is not None:
                watcher()
                continue
            state = self.by_fd.get(fd)
            if state is not None and event & 0x004:       # POLLOUT: the rest of what it did not take
                self.flush(state)
            state = self.by_fd.get(fd)
            if state is not None and event & ~0x004:
                self.read_channel(state)

    # ------------------------------------------------------------------ takeovers (multiproxy.group_takeover)

    def watch(self, fd: int, on_readable) -> None:
        self.watchers[fd] = on_readable
        self.poller.register(fd, 0x001)

    def unwatch(self, fd: int) -> None:
        if self.watchers.pop(fd, None) is not None:
            try:
                self.poller.unregister(fd)
            except KeyError:
                pass

    def listen_for_takeovers(self) -> None:
        """Listen on the takeover socket (from the start, or once this group has taken over)."""
        if self.stopping_since is None:
            self.handover.start()

    def spawn(self, state: WorkerState) -> None:
        ours, theirs = _socket.socketpair(_socket.AF_UNIX, _socket.SOCK_STREAM)
        if state.busy_map is not None:
            state.busy_map.clear()      # slots of the clients it resumes are idle; the others are free
        self.balance.started(state.index)
        pid = _fork()
        if pid == 0:
            self._become_worker(state.index, ours, theirs)    # never returns
        theirs.close()
        ours.setblocking(False)
        state.pid = pid
        state.channel = ours
        state.buffer = state.outbox = b""
        state.started = state.last_beat = time.monotonic()
        state.respawn_at = None
        state.ready = False
        state.generation = self.generation
        state.closed_busy = 0
        self.by_fd[ours.fileno()] = state
        self.poller.register(ours.fileno(), 0x001)
        log.info("worker %d started (pid %d)", state.index, pid)

    def _become_worker(self, index: int, ours, theirs) -> None:
        code = 1
        state = self.workers[index]
        try:
            for signum in HANDLED_SIGNALS:
                _signal(signum, signal.SIG_DFL)
            # Until the worker's own handler is set (after it starts), a reload signal must not kill it. SIGTTIN and
            # SIGTTOU are the supervisor's (a stray one to the process group must not stop a worker).
            for signum in (signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU):
                _signal(signum, signal.SIG_IGN)
            try:
                ctypes.CDLL(None).prctl(1, int(signal.SIGTERM), 0, 0, 0)    # PR_SET_PDEATHSIG: die with us
            except (OSError, AttributeError):
                pass
            ours.close()
            for other in self.workers:
                if other.channel is not None:
                    other.channel.close()
                if other is not state:
                    for fd in other.book.fds():     # other workers' clients are none of this process's business
                        _close(fd)
            custody = None
            if state.busy_map is not None:
                custody = {"busy_map": state.busy_map, "key_counter": state.book.key_counter,
                           "closed_busy": state.closed_busy, "dead_pid": state.dead_pid,
                           "inherited": [(slot, held.fd, held.record) for slot, held in state.book.held.items()]}
            os.close(self.wake_r)
            os.close(self.wake_w)
            import gevent
            gevent.reinit()
            from gevent import socket as gsocket
            channel = gsocket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM, fileno=theirs.detach())
            self.handover.forget()
            takeover = None
            if self.takeover is not None:
                takeover = self.takeover.worker_options()
                self.takeover.forget()
            code = self.run_worker(self.config, self.engines, index, dict(self.sockets), self.group,
                                   # at least 2: a worker under a supervisor, even after SIGTTOU left one
                                   channel=channel, worker_count=max(2, len(self.workers)),
                                   admin_socket=self.admin_socket,
                                   custody=custody, group_takeover=takeover, balance=self.balance,
                                   # after every key this index issued (a SIGTTOU'd index's moved clients keep theirs)
                                   cancel_counter=state.book.key_counter)
        except BaseException as exc:
            log.error("worker %d failed: %s", index, exc, exc_info=not isinstance(exc, OSError))
            code = 2 if type(exc).__name__ == "UsersFileError" else 1
        finally:
            os._exit(code)

    def reap(self) -> None:
        while True:
            try:
                pid, status = _waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            except InterruptedError:
                continue
            if pid == 0:
                return
            state = next((s for s in self.workers if s.pid == pid), None)
            if state is not None:
                self.worker_died(state, status)

    def worker_died(self, state: WorkerState, status: int) -> None:
        now = time.monotonic()
        ran = now - state.started
        self.drain_channel(state)       # its last holds, records and unholds count
        self._close_channel(state)
        pid, state.pid = state.pid, 0
        self.balance.stopped(state.index)
        self.reload_pending.discard(state.index)
        self.custody_after_death(state, pid)
        if state.retiring:
            log.info("worker %d (pid %d) stopped after SIGTTOU: %s", state.index, pid, describe_status(status))
            scaling.retired(self)
            return
        if self.handover.worker_gone(state):
            log.warning("worker %d (pid %d) %s during the takeover; not respawned", state.index, pid,
                        describe_status(status))
            return
        if self.stopping_since is not None:
            log.info("worker %d (pid %d) %s", state.index, pid, describe_status(status))
            if os.WIFEXITED(status) and os.WEXITSTATUS(status):
                self.exit_status = self.exit_status or os.WEXITSTATUS(status)
            return
        if not state.ready and not self.announced_ready and os.WIFEXITED(status) and os.WEXITSTATUS(status):
            # It failed to start before the group ever served (a users file, an address): retrying would fail
            # the same way, so the group stops, as a single process would.
            log.error("worker %d (pid %d) could not start (%s): stopping", state.index, pid, describe_status(status))
            self.exit_status = os.WEXITSTATUS(status)
            self.stop_gracefully()
            return
        state.quick_deaths = 0 if ran >= BACKOFF_RESET_AFTER else state.quick_deaths + 1
        delay = backoff_delay(state.quick_deaths)
        state.respawn_at = now + delay
        state.restarts += 1
        log.error("worker %d (pid %d) %s after %.1f s; respawning it in %.1f s (restart %d)", state.index, pid,
                  describe_status(status), ran, delay, state.restarts)

    def drain_channel(self, state: WorkerState) -> None:
        """Read what a dead worker left on its channel (it ends with the end of the stream)."""
        if state.channel is None:
            return
        try:
            state.channel.settimeout(1.0)
        except OSError:
            return
        # Until its end; nothing for a second: whatever still holds the other end is not the dead worker.
        while state.channel is not None and self.read_channel(state):
            pass

    def custody_after_death(self, state: WorkerState, pid: int) -> None:
        """The worker died: its busy clients' connections end; its idle ones wait for its replacement (none when the
        group stops)."""
        while state.fds:
            _close(state.fds.popleft())
        if not state.book.held:
            state.closed_busy = 0
            return
        if self.stopping_since is not None or state.busy_map is None:
            held = state.book.release_all()
            for client in held:
                shut_and_close(client.fd)
            log.info("worker %d (pid %d): %d clients it held were closed (the group stops)", state.index, pid,
                     len(held))
            return
        if state.retiring:
            scaling.hand_held_clients(self, state)      # died before it handed them over: the others take them
            return
        idle, busy = state.book.after_death(state.busy_map)
        for client in busy:
            shut_and_close(client.fd)
        state.closed_busy = len(busy)
        state.dead_pid = pid
        log.warning("worker %d (pid %d) died holding %d clients: %d idle ones go to its replacement with their "
                    "sessions, %d busy ones (a request or transaction under way) were closed", state.index, pid,
                    len(idle) + len(busy), len(idle), len(busy))

    def _close_channel(self, state: WorkerState) -> None:
        if state.channel is None:
            return
        fd = state.channel.fileno()
        self.by_fd.pop(fd, None)
        try:
            self.poller.unregister(fd)
        except KeyError:
            pass
        state.channel.close()
        state.channel = None
        for worker, key in self.broker.drop(state.index):
            self.send(self.workers[worker], {"op": "free", "key": key})

    def check_respawns(self, now: float) -> None:
        if self.stopping_since is not None:
            return
        for state in self.workers:
            if state.respawn_at is not None and state.pid == 0 and now >= state.respawn_at:
                self.spawn(state)

    def check_heartbeats(self, now: float) -> None:
        timeout = self.config.proxy.worker_timeout
        if self.stopping_since is not None:
            return
        for state in self.workers:
            if state.pid and now - state.last_beat > timeout:
                log.error("worker %d (pid %d) sent no heartbeat for %.1f s (proxy.worker_timeout %g s): killing it",
                          state.index, state.pid, now - state.last_beat, timeout)
                state.last_beat = now      # once: its death (reaped) respawns it
                try:
                    os.kill(state.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    # ------------------------------------------------------------------ signals

    def handle_signal(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if signum == signal.SIGHUP:
            if self.stopping_since is not None:
                return
            self.reload()
        elif signum in (signal.SIGTERM, signal.SIGINT):
            if self.stopping_since is None:
                log.info("%s received: every worker drains its clients (proxy.shutdown_timeout %g s)", name,
                         self.config.proxy.shutdown_timeout)
                self.stop_gracefully()
            elif time.monotonic() - self.stopping_since > 1.0:
                log.warning("%s received again while draining: killing the workers", name)
                self.kill_all()
        elif signum == signal.SIGTTIN:
            scaling.add_worker(self, WorkerState)
        elif signum == signal.SIGTTOU:
            scaling.remove_worker(self)
        elif signum == signal.SIGQUIT:
            log.warning("SIGQUIT received: killing the workers now")
            if self.stopping_since is None:
                from . import systemd
                systemd.stopping()
                self.stopping_since = time.monotonic()
            self.kill_all()

    def stop_gracefully(self, notify: bool = True) -> None:
        """Every worker drains and exits, none is respawned; `notify`: systemd hears STOPPING=1 (not when the group
        was taken over: the service goes on, in the new process)."""
        from . import systemd
        if notify:
            systemd.stopping()
        self.handover.close()
        self.stopping_since = time.monotonic()
        # New clients are refused from now on (rather than queued where no worker accepts any more).
        for sock in self.sockets.values():
            sock.close()
        for state in self.workers:
            state.respawn_at = None
            if state.pid:
                try:
                    os.kill(state.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass

    def check_stop(self, now: float) -> None:
        # Workers drain for shutdown_timeout; one that is still there well after is killed.
        if self.stopping_since is not None and now - self.stopping_since > self.config.proxy.shutdown_timeout + 10:
            self.kill_all()

    def kill_all(self) -> None:
        for state in self.workers:
            if state.pid:
                try:
                    os.kill(state.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def reload(self) -> None:
        """SIGHUP: later workers fork with the new configuration, every worker reloads, and systemd hears READY=1 once
        each acknowledged it (or died)."""
        from . import reload as live_reload
        from . import systemd
        systemd.reloading()
        if self.config.source:
            new, problems = live_reload.read(self.config.source, self.engines)
            if new is not None and not live_reload.diff(self.config, new).refused:
                self.config = new
                # A listener removed or moved: the shared socket closes here too (the workers close theirs), else
                # clients would queue where no worker accepts. One a reload added is bound by each worker.
                listens = {lc.name: lc.listen for lc in new.listeners}
                for name in [name for name in self.sockets if name not in listens or listens[name] !=
                             self.listen_addresses[name]]:
                    self.sockets.pop(name).close()
                self.bind_added_listeners(new)
        self.generation += 1
        self.reload_began = time.monotonic()
        self.reload_pending = set()
        for state in self.workers:
            # A worker still starting ignores SIGHUP until its handler is set: it is asked once it is ready.
            if state.pid and state.ready:
                self.ask_reload(state)
        log.info("reload: asked %d workers to reload", len(self.reload_pending))
        self.reload_open = True

    def bind_added_listeners(self, config) -> None:
        """A reload added or moved listeners: bound here once, as at the start, and handed to each worker that asks
        (`listen`, in its reload) and to workers forked later. One the supervisor cannot bind is bound by each
        worker with SO_REUSEPORT, whose reload reports the problem if it cannot either."""
        for lc in config.listeners:
            if lc.name in self.sockets:
                continue
            try:
                self.sockets[lc.name] = self.make_listen_socket(lc.listen[0], lc.listen[1], reuse_port=True)
                self.listen_addresses[lc.name] = lc.listen
            except OSError as exc:
                log.warning("reload: listener %s: %s; each worker binds it with SO_REUSEPORT instead", lc.name, exc)

    def send_listen_sockets(self, state: WorkerState, message: dict) -> None:
        """A reloading worker asks for the sockets of listeners its reload adds: those bound here go by SCM_RIGHTS
        with their addresses (it binds any other itself)."""
        names = [name for name in message.get("names", []) if name in self.sockets]
        self.flush(state)
        if state.outbox:
            names = []          # the descriptors must go with their own line: without them the worker binds
        reply = {"op": "reply", "id": message["id"], "names": names,
                 "listens": [list(self.listen_addresses[name]) for name in names]}
        data = json.dumps(reply).encode() + b"\n"
        fds = [self.sockets[name].fileno() for name in names]
        try:
            if fds:
                sent = state.channel.sendmsg([data], [(_stdsocket.SOL_SOCKET, _stdsocket.SCM_RIGHTS,
                                                       array.array("i", fds))])
                state.outbox = data[sent:]
                self.flush(state)
            else:
                self.send(state, reply)
        except BlockingIOError:
            self.send(state, {**reply, "names": [], "listens": []})
        except OSError as exc:
            log.warning("worker %d: cannot send listening sockets: %s", state.index, exc)

    def ask_reload(self, state: WorkerState) -> None:
        state.generation = self.generation
        self.reload_pending.add(state.index)
        try:
            os.kill(state.pid, signal.SIGHUP)
        except ProcessLookupError:
            self.reload_pending.discard(state.index)

    def check_reload(self, now: float) -> None:
        if not self.reload_open:
            return
        if self.reload_pending and now - self.reload_began < RELOAD_ACK_TIMEOUT:
            return
        from . import systemd
        if self.reload_pending:
            log.warning("reload: workers %s did not acknowledge their reload within %g s", sorted(self.reload_pending),
                        RELOAD_ACK_TIMEOUT)
        self.reload_open = False
        self.reload_pending = set()
        systemd.ready()

    # ------------------------------------------------------------------ the channels

    def send(self, state: WorkerState, message: dict) -> None:
        if state.channel is None:
            return
        if len(state.outbox) > OUTBOX_LIMIT:
            # A worker that does not read its channel (stopped) loses messages; its heartbeat will tell.
            log.warning("worker %d: its channel is full; a %s message was dropped", state.index, message.get("op"))
            return
        state.outbox += json.dumps(message).encode() + b"\n"
        self.flush(state)

    def send_with_fds(self, state: WorkerState, message: dict, fds: list[int]) -> bool:
        """Send a message with descriptors (SCM_RIGHTS, with its first byte), after what waits in its outbox; False
        when the worker's channel is closed or does not take it within a few seconds."""
        if state.channel is None:
            return False
        data = json.dumps(message).encode() + b"\n"
        channel = state.channel
        try:
            channel.settimeout(5.0)
            while state.outbox:
                sent = channel.send(state.outbox)
                state.outbox = state.outbox[sent:]
            sent = channel.sendmsg([data], [(_stdsocket.SOL_SOCKET, _stdsocket.SCM_RIGHTS, array.array("i", fds))])
            if sent < len(data):
                channel.sendall(data[sent:])
        except OSError as exc:
            log.warning("worker %d: cannot send it a connection: %s", state.index, exc)
            return False
        finally:
            if state.channel is not None:
                state.channel.setblocking(False)
        return True

    def flush(self, state: WorkerState) -> None:
        """Send what the channel takes now; the rest when poll says it can take more (whole lines, in order)."""
        try:
            while state.outbox:
                sent = state.channel.send(state.outbox)
                state.outbox = state.outbox[sent:]
        except BlockingIOError:
            pass
        except OSError:
            state.outbox = b""
        fd = state.channel.fileno()
        self.poller.modify(fd, 0x001 | (0x004 if state.outbox else 0))

    def read_channel(self, state: WorkerState) -> bool:
        """Read and handle what the channel holds now; False when nothing came (nothing yet, or its end)."""
        try:
            data, ancillary, _flags, _address = state.channel.recvmsg(65536, CHANNEL_FDS_SPACE)
            if ancillary:
                state.fds.extend(received_fds(ancillary))
        except (BlockingIOError, TimeoutError):
            return False
        except OSError as exc:
            if exc.errno not in (errno.ECONNRESET,):
                log.warning("worker %d: channel error: %s", state.index, exc)
            data = b""
        if not data:
            self._close_channel(state)     # it exits; the reap logs and respawns
            return False
        state.last_beat = time.monotonic()
        state.buffer += data
        *lines, state.buffer = state.buffer.split(b"\n")
        for line in lines:
            try:
                self.handle_message(state, json.loads(line))
            except (ValueError, KeyError, TypeError) as exc:      # a bad message must not stop the supervisor
                log.error("worker %d: bad message on its channel: %r (%s)", state.index, line[:200], exc)
            if state.channel is None:
                break
        return True

    def handle_message(self, state: WorkerState, message: dict) -> None:
        op = message.get("op")
        if op == "acquire":
            granted, full = self.broker.acquire(state.index, message["keys"])
            self.send(state, {"op": "granted", "id": message["id"], "ok": granted})
            for key in full:
                other, urgent = self.broker.evict_candidate(key, state.index)
                if other is not None:
                    self.send(self.workers[other], {"op": "evict", "key": key, "urgent": urgent})
        elif op == "release":
            for worker, key in self.broker.release(state.index, message["keys"], int(message.get("count", 1))):
                self.send(self.workers[worker], {"op": "free", "key": key})
        elif op == "ready":
            if not state.ready:
                state.ready = True
                scaling.tell_worker_count(self, state)
                scaling.tell_moved_keys(self, state)
                if state.generation < self.generation:
                    self.ask_reload(state)     # forked before a reload read the file: it reloads now
                if not self.announced_ready and all(s.ready for s in self.workers):
                    from . import systemd
                    self.announced_ready = True
                    if self.takeover is not None:
                        self.takeover.serving()     # READY=1 with MAINPID, then the clients come
                    else:
                        systemd.ready(f"{len(self.workers)} workers serving {len(self.config.listeners)} listeners")
        elif op == "reloaded":
            self.reload_pending.discard(state.index)
        elif op == "listen":
            self.send_listen_sockets(state, message)
        elif op == "workers":
            now = time.monotonic()
            self.send(state, {"op": "reply", "id": message["id"], "workers": [
                {"worker": s.index, "pid": s.pid, "up": int(bool(s.pid and s.ready)), "restarts": s.restarts,
                 "uptime_seconds": round(now - s.started, 1) if s.pid else 0.0} for s in self.workers]})
        elif op == "hold":
            fd = state.fds.popleft() if state.fds else None
            if fd is None:
                log.error("worker %d: a hold of slot %s came without its connection", state.index, message.get("slot"))
            elif not self.custody:
                _close(fd)
            else:
                state.book.hold(int(message["slot"]), fd, message.get("record"), int(message.get("keys", 0)))
        elif op == "record":
            state.book.update(int(message["slot"]), message["record"])
        elif op == "unhold":
            state.book.unhold(int(message["slot"]))
        elif op in ("handed", "drained") and state.retiring:
            scaling.on_message(self, state, message)      # SIGTTOU: its clients go to the other workers
        elif op in ("keys", "handed", "drained"):
            self.handover.on_message(state, message)
        elif op == "moved_left":
            scaling.moved_left(self, state, message)
        elif op == "cancel_elsewhere":
            if self.takeover is not None:
                self.takeover.pass_cancel(message)
        # "beat": last_beat is set for every message


def run(config, engines, workers: int, run_worker, make_listen_socket, take_over: bool | str = False) -> int:
    """Run `workers` workers under a supervisor until SIGTERM/SIGINT (see Supervisor); with `take_over`, first take the
    listening sockets (and then the clients) over from the running process or group (multiproxy.group_takeover)."""
    return Supervisor(config, engines, workers, run_worker, make_listen_socket, take_over).run()


def _taken_socket(fd: int):
    """A listening socket received in a takeover, as the workers use one the supervisor bound."""
    from gevent import socket as gsocket
    sock = gsocket.socket(fileno=fd)
    sock.setblocking(False)
    return sock


# ---------------------------------------------------------------------------------------------------- worker side

class WorkerLink:
    """A worker's end of its channel: tells the supervisor it serves, beats, acknowledges reloads, and asks the
    broker for backend slots (Budget.group_room); closes idle connections when the broker asks (`evict`)."""

    def __init__(self, proxy, channel):
        import gevent.lock
        self.proxy = proxy
        self.channel = channel
        self.lock = gevent.lock.Semaphore()
        self.ids = iter(range(1, 1 << 62))
        self.pending: dict = {}
        self.wanted: dict[str, int] = {}     # key -> idle connections the broker asked for, to close on release
        self.late: dict[int, list] = {}      # acquire requests given up on (timeout) -> their keys
        self.greenlets = []
        self.closed = False
        self.fds: collections.deque = collections.deque()   # descriptors received, not yet claimed by a message
        self.takeover = None      # the worker's part in a takeover of its group (group_takeover.GroupTakeoverPart)

    def start(self) -> None:
        import gevent
        self.greenlets = [gevent.spawn(self._read), gevent.spawn(self._beat)]

    def stop(self) -> None:
        for greenlet in self.greenlets:
            greenlet.kill(block=False)

    def send(self, message: dict) -> None:
        if self.closed:
            return
        with self.lock:
            try:
                self.channel.sendall(json.dumps(message).encode() + b"\n")
            except OSError:
                self.closed = True

    def send_with_fds(self, message: dict, fds: list[int]) -> bool:
        """Send a message with descriptors (SCM_RIGHTS, with its first bytes); False when the channel is closed."""
        if self.closed:
            return False
        data = json.dumps(message).encode() + b"\n"
        with self.lock:
            try:
                sent = self.channel.sendmsg([data], [(_stdsocket.SOL_SOCKET, _stdsocket.SCM_RIGHTS,
                                                      array.array("i", fds))])
                if sent < len(data):
                    self.channel.sendall(data[sent:])
            except OSError:
                self.closed = True
                return False
        return True

    def request(self, message: dict, timeout: float = 5.0):
        """A message the supervisor answers: its answer, or None (no answer in `timeout`, channel closed)."""
        from gevent.event import AsyncResult
        ident = next(self.ids)
        result = self.pending[ident] = AsyncResult()
        try:
            self.send({**message, "id": ident})
            return result.get(timeout=timeout)
        except Exception:
            if message.get("op") == "acquire":
                self.late[ident] = message["keys"]     # a grant arriving after all goes straight back
            return None
        finally:
            self.pending.pop(ident, None)

    def _read(self) -> None:
        from .custody import received_fds
        buffer = b""
        while True:
            try:
                data, ancillary, _flags, _address = self.channel.recvmsg(65536, CHANNEL_FDS_SPACE)
                if ancillary:
                    self.fds.extend(received_fds(ancillary))
            except OSError:
                data = b""
            if not data:
                self.closed = True
                log.warning("worker %d: the supervisor's channel closed", self.proxy.worker)
                return
            buffer += data
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                try:
                    self._handle(json.loads(line))
                except Exception:
                    log.exception("worker %d: bad message from the supervisor", self.proxy.worker)

    def _handle(self, message: dict) -> None:
        import gevent
        op = message.get("op")
        if op in ("granted", "reply"):
            waiter = self.pending.get(message.get("id"))
            if waiter is not None:
                waiter.set(message)
            keys = self.late.pop(message.get("id"), None)
            if keys is not None and message.get("ok"):
                self.send({"op": "release", "keys": [k for k, _ in keys], "count": 1})
        elif op == "free":
            for budget in self._budgets(message["key"]):
                gevent.spawn(self.retry, budget)
        elif op == "evict":
            self.evict(message["key"], message.get("urgent", True))
        elif op == "group":
            self.proxy.group.worker_count = int(message["workers"])     # SIGTTIN or SIGTTOU changed the group
        elif op == "moved":         # clients a worker SIGTTOU retired handed over: who serves them (their cancels)
            self.proxy.clients_moved(message["keys"])
        elif op == "moved_gone":
            self.proxy.moved_client_gone(message["key"])
        elif self.takeover is not None:
            from .group_takeover import WORKER_OPS
            if op in WORKER_OPS:
                self.takeover.handle(message, self.fds)

    def listen_sockets(self, names: list[str]) -> dict:
        """The supervisor's listening sockets for listeners a reload adds: name -> (socket, (host, port) it is bound
        to); those it does not have are missing (the worker binds them)."""
        from gevent import socket as gsocket
        answer = self.request({"op": "listen", "names": list(names)}) if names else None
        given = {}
        for name, listen in zip((answer or {}).get("names", []), (answer or {}).get("listens", [])):
            if not self.fds:
                log.error("worker %d: the supervisor's socket of listener %s did not come", self.proxy.worker, name)
                break
            sock = gsocket.socket(fileno=self.fds.popleft())
            sock.setblocking(False)
            given[name] = (sock, tuple(listen))
        return given

    def _beat(self) -> None:
        import gevent
        while True:
            self.send({"op": "beat"})
            # Read each round: a reload may change worker_timeout (the supervisor reads it from the file too).
            gevent.sleep(heartbeat_interval(self.proxy.config.proxy.worker_timeout))
            # Slots held beyond what the budgets use go back (a failed connect in fill, a lost wake-up), and
            # budgets with waiters ask again: nothing stays stuck on a lost message.
            for budget in self.budgets():
                if self._has_waiters(budget):
                    gevent.spawn(self.retry, budget)
                else:
                    self.trim(budget)

    # ------------------------------------------------------------------ the broker, seen from a budget

    def budgets(self) -> list:
        seen = {}
        for pool in list(self.proxy.pools.values()):
            seen[id(pool.budget)] = pool.budget
        return list(seen.values())

    @staticmethod
    def keys(budget) -> list:
        keys = [["budget:" + budget.label, budget.config.max_size]]
        if budget.cap is not None:
            keys.append(["cap:" + budget.cap.label, budget.cap.limit])
        return keys

    def _budgets(self, key: str) -> list:
        return [b for b in self.budgets() if key in (k for k, _ in self.keys(b))]

    @staticmethod
    def _has_waiters(budget) -> bool:
        return any(not w.ready() for pool in budget.pools for w in pool.waiters)

    def acquire(self, budget) -> bool:
        """One more slot of the group for `budget` (a round trip): True when granted (budget.held counts it)."""
        if self.closed:
            return False
        answer = self.request({"op": "acquire", "keys": self.keys(budget)})
        if answer is None or not answer.get("ok"):
            return False
        budget.held += 1
        return True

    def trim(self, budget) -> None:
        """Give back the slots `budget` holds beyond its connections, when no borrower of it waits."""
        surplus = budget.held - budget.size
        if surplus > 0 and not self._has_waiters(budget):
            budget.held -= surplus
            self.send({"op": "release", "keys": [k for k, _ in self.keys(budget)], "count": surplus})

    def retry(self, budget) -> None:
        """A slot came free in the group: the longest waiter of `budget` gets it, if the broker grants it."""
        if not self._has_waiters(budget) or budget.size >= budget.config.max_size:
            self.trim(budget)
            return
        if budget.held <= budget.size and not self.acquire(budget):
            return
        budget.hand_slot()
        self.trim(budget)

    def evict(self, key: str, urgent: bool = True) -> None:
        """The broker asks for an idle connection of `key` for another worker: the oldest idle one closes now, else
        the next one given back does (take_wanted). Not `urgent` (both workers hold their share): only one idle for
        SPARE_IDLE seconds closes, none otherwise."""
        oldest = None
        for budget in self._budgets(key):
            for pool in budget.pools:
                if pool.idle:
                    conn = next(iter(pool.idle))
                    if oldest is None or conn.last_used < oldest.last_used:
                        oldest = conn
        if not urgent:
            if oldest is not None and time.monotonic() - oldest.last_used >= SPARE_IDLE:
                oldest.pool._evict(oldest)
            return
        if oldest is not None:
            oldest.pool._evict(oldest)
            return
        self.wanted[key] = min(self.wanted.get(key, 0) + 1, 64)

    def take_wanted(self, budget) -> bool:
        """Whether a connection `budget` gets back closes for another worker instead of idling (see evict)."""
        for key, _ in self.keys(budget):
            if self.wanted.get(key):
                self.wanted[key] -= 1
                return True
        return False
