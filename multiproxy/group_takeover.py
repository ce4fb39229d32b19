"""Moving idle clients between a group's processes: takeover for process groups (workers > 1), and SIGTTOU's retiring worker.

The conversation stays the one of multiproxy.takeover, supervisor to supervisor (or to and from a single process,
which cannot tell a group from a process), over the takeover socket:

- The old group's supervisor (`GroupHandover`) listens on the takeover socket. When a new process connects it
  asks each worker for the cancel-key counter it reached (`takeover_keys`: the new group issues keys after the
  highest), answers hello, sends its listening sockets (and the admin server's), and once the new side accepts on
  them tells every worker to drain (`drain_clients`): a worker stops accepting (its acceptors pause: the sockets
  stay open, for a failed takeover) and exports each idle client exactly as a single process does
  (`WorkerDrain`, a takeover.Handover whose clients go over the worker's channel: `handed`, with the connection),
  which the supervisor forwards as `client` records. Each worker reports `drained` with its counts; when all did,
  the supervisor sends `done` and the group stops gracefully (exit 0, no STOPPING=1). A worker that dies during the
  drain loses only its busy clients: the idle ones the supervisor held for it (worker custody) go to the new side.
  Cancels the new side passes back (`cancel`) go to the worker that issued the key, over its channel.
- The new group's supervisor (`GroupTakeover`) connects before it forks (takeover.connect_and_negotiate), binds
  nothing and gives the received sockets to its workers, which issue cancel keys after the old side's counter.
  Once every worker serves it answers `accepting` and tells systemd READY=1 with MAINPID. Each `client` goes to
  the worker its cancel key names (modulo the new worker count; Proxy.cancel routes keys the same way), which
  resumes it as a takeover does (`adopt`); until the old side exits, cancels for keys a worker does not know go
  back to it through the supervisor (`cancel_elsewhere`). Then the new group listens for the next takeover.

SIGTTOU (multiproxy.scaling) moves a retiring worker's clients to the other workers of its own group with the same
parts: the worker drains on `drain_clients` as above, and the supervisor gives each handed client to the least loaded
serving worker (`least_loaded_worker`, `give_client`), which adopts it.
"""
from __future__ import annotations

import _socket
import itertools
import json
import logging
import os
import time
from collections import Counter

from . import relay_core
from .handover import HandoverError, RecordReader, check_hello, decode, hello, send_record
from .takeover import (Handover, _counts, admit_caller, cancel_record, claim_path, config_listener_facts,
                       connect_and_negotiate, resume_session, session_source, socket_path)

log = logging.getLogger("multiproxy.takeover")
KEYS_TIMEOUT = 5.0          # seconds the old supervisor waits for its workers' cancel-key counters
RECORD_TIMEOUT = 10.0       # seconds a supervisor waits for the rest of a record it began to read
# Supervisor -> worker messages a worker's GroupTakeoverPart answers.
# "drain_clients" and "adopt" serve SIGTTOU too (multiproxy.scaling): a retiring worker's clients move to the others.
WORKER_OPS = frozenset({"takeover_keys", "drain_clients", "takeover_failed", "adopt", "took_over", "takeover_over",
                        "takeover_cancel"})


class _Conversation:
    """One takeover connection in a supervisor's poll loop: records are read when poll says the socket is readable
    (a record begun is read to its end, RECORD_TIMEOUT at most)."""

    def __init__(self, supervisor, conn):
        self.supervisor = supervisor
        self.conn = conn
        self.reader = RecordReader(conn)
        conn.settimeout(RECORD_TIMEOUT)

    def records(self):
        """The records there now (with their descriptors); HandoverError or OSError at the end of the connection."""
        while True:
            yield self.reader.read()
            if not self.reader.has_record():
                return

    def send(self, record: dict, fds=()) -> None:
        send_record(self.conn, record, fds)

    def close(self) -> None:
        self.supervisor.unwatch(self.conn.fileno())
        self.reader.close_unclaimed()
        self.conn.close()


# ---------------------------------------------------------------------------------------------------- old group

class GroupHandover:
    """The running group's supervisor: listens on the takeover socket and hands the group over to whoever connects
    (see the module docstring). One takeover at a time."""

    def __init__(self, supervisor):
        self.supervisor = supervisor
        self.path = socket_path(supervisor.config)
        self.sock = None
        self.talk: _Conversation | None = None
        self.phase = ""                 # hello, keys, ready, accepting, draining, done
        self.peer = None
        self.peer_admin_listen = None
        self.keys_pending: set[int] = set()
        self.keys_deadline = 0.0
        self.key_counter = 0
        self.draining: set[int] = set()  # worker indexes still draining
        self.drained: list[dict] = []
        self.handed = 0
        self.admin_sent = False
        self.handed_over = False        # the group gave its listeners away: it ends with exit 0, no STOPPING=1

    # ------------------------------------------------------------------ the takeover socket

    def start(self) -> None:
        """Listen on the takeover socket (0600); a socket that cannot be bound disables takeovers, never the start."""
        if not self.path or self.sock is not None:
            return
        try:
            if not claim_path(self.path):
                return
            sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
            old_mask = os.umask(0o177)
            try:
                sock.bind(self.path)
            finally:
                os.umask(old_mask)
            os.chmod(self.path, 0o600)
            sock.listen(4)
            sock.setblocking(False)
        except OSError as exc:
            log.error("takeover: cannot listen on %s (%s): this group cannot be taken over; fix "
                      "proxy.takeover_socket and restart it", self.path, exc.strerror or exc)
            return
        self.sock = sock
        self.supervisor.watch(sock.fileno(), self._accept)
        log.info("takeover: listening on %s (multiproxy run --takeover hands this group's clients to a new process "
                 "or group)", self.path)

    def close(self) -> None:
        """Stop listening (the path goes: the new side listens there once it has taken over)."""
        if self.sock is None:
            return
        self.supervisor.unwatch(self.sock.fileno())
        self.sock.close()
        self.sock = None
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def _accept(self) -> None:
        try:
            fd, _ = self.sock._accept()
        except (BlockingIOError, InterruptedError):
            return
        conn = _socket.socket(fileno=fd)
        conn.setblocking(True)
        conn.settimeout(1.0)        # a refusal never blocks the supervisor's loop for long
        if not admit_caller(conn, self.talk is not None):
            return
        conn.settimeout(None)
        self.talk = _Conversation(self.supervisor, conn)
        self.phase = "hello"
        self.supervisor.watch(conn.fileno(), self._readable)

    def _hello(self, record: dict) -> None:
        check_hello(record, "new process")
        self.peer = record.get("pid")
        self.peer_admin_listen = record.get("admin_listen")
        # The new side must issue cancel keys after every key a worker of this group issued: ask them.
        self.phase = "keys"
        self.key_counter = max(state.book.key_counter for state in self.supervisor.workers)
        self.keys_pending = {state.index for state in self.supervisor.workers if state.pid and state.channel}
        self.keys_deadline = time.monotonic() + KEYS_TIMEOUT
        for index in self.keys_pending:
            self.supervisor.send(self.supervisor.workers[index], {"op": "takeover_keys"})
        self._maybe_hello()

    def tick(self, now: float) -> None:
        """The supervisor's loop came round: a worker that did not tell its counter in time is not waited for."""
        if self.phase == "keys" and now >= self.keys_deadline:
            log.warning("takeover: workers %s did not tell their cancel-key counters within %g s",
                        sorted(self.keys_pending), KEYS_TIMEOUT)
            self.keys_pending = set()
            self._maybe_hello()

    def _maybe_hello(self) -> None:
        if self.phase != "keys" or self.keys_pending:
            return
        supervisor = self.supervisor
        from . import __version__
        try:
            self.talk.send(hello(os.getpid(), multiproxy=__version__,
                                 listeners=config_listener_facts(supervisor.config, supervisor.engines),
                                 cancel_counter=self.key_counter, workers=len(supervisor.workers)))
        except OSError as exc:
            self._ended(exc)
            return
        self.phase = "ready"

    # ------------------------------------------------------------------ the conversation

    def _readable(self) -> None:
        try:
            for record, fds in self.talk.records():
                for fd in fds:
                    os.close(fd)
                self._on_record(record)
                if self.talk is None:
                    return
        except (HandoverError, OSError) as exc:
            self._ended(exc)

    def _on_record(self, record: dict) -> None:
        kind = record.get("type")
        if self.phase == "hello":
            self._hello(record)
        elif kind == "cancel":
            self._route_cancel(record)
        elif self.phase == "ready":
            if kind != "ready":
                log.warning("takeover: the new process (pid %s) declined: %s", self.peer,
                            record.get("reason", kind))
                self._reset()
                return
            self._send_listeners()
        elif self.phase == "accepting":
            if kind != "accepting":
                raise HandoverError(f"expected accepting, got {kind!r}")
            self._drain()
        else:
            log.warning("takeover: ignored a %r record from pid %s", kind, self.peer)

    def _send_listeners(self) -> None:
        supervisor = self.supervisor
        log.info("takeover: handing this group (%d workers) over to pid %s", len(supervisor.workers), self.peer)
        from . import systemd
        systemd.notify("STATUS=handing over to pid %s" % self.peer)
        self.close()                    # the path is the new side's from now on
        names = list(supervisor.sockets)
        fds = [supervisor.sockets[name].fileno() for name in names]
        self.admin_sent = (supervisor.admin_socket is not None
                           and self.peer_admin_listen == supervisor.config.proxy.admin_listen)
        if self.admin_sent:
            fds.append(supervisor.admin_socket.fileno())
        self.talk.send({"type": "listeners", "names": names, "admin": self.admin_sent}, fds)
        self.phase = "accepting"

    def _drain(self) -> None:
        """The new side accepts: every worker stops accepting and hands its idle clients over."""
        supervisor = self.supervisor
        self.phase = "draining"
        self.handed = 0
        self.drained = []
        # A worker SIGTTOU retires drains already: what it hands over from now on goes to the new side as well
        # (multiproxy.scaling), and the group's end does not wait for it.
        self.draining = {state.index for state in supervisor.workers if not state.retiring}
        for state in supervisor.workers:
            if state.retiring:
                continue
            if state.pid and state.channel is not None:
                supervisor.send(state, {"op": "drain_clients", "admin": self.admin_sent})
            else:
                self.worker_gone(state)         # waiting for its respawn: its held idle clients go now
        self._maybe_done()

    def on_message(self, state, message: dict) -> None:
        """A worker's message about the takeover (see WORKER_OPS for the other direction)."""
        op = message["op"]
        if op == "keys":
            self.key_counter = max(self.key_counter, int(message.get("keys", 0)))
            self.keys_pending.discard(state.index)
            self._maybe_hello()
        elif op == "handed":
            fd = state.fds.popleft() if state.fds else None
            if fd is None:
                log.error("worker %d: a handed client came without its connection", state.index)
                return
            self.forward(message["record"], fd)
        elif op == "drained":
            if state.index in self.draining:
                self.draining.discard(state.index)
                self.drained.append(message)
                self._maybe_done()

    def forward(self, record: dict, fd: int) -> None:
        """Send a client to the new side; this supervisor's descriptor of it closes."""
        try:
            if self.talk is not None and self.phase in ("draining", "done"):
                self.talk.send(record, [fd])
                self.handed += 1
            else:
                # The new side went away: the worker has let the client go, nobody can serve it now.
                from .custody import shut_and_close
                shut_and_close(fd)
                fd = None
        except OSError as exc:
            self._ended(exc)
        finally:
            if fd is not None:
                os.close(fd)

    def worker_gone(self, state) -> bool:
        """A worker died (or was waiting for its respawn) while the group drains: the idle clients held for it go to
        the new side, it is not respawned. False when no takeover drains."""
        if self.phase != "draining":
            return False
        state.respawn_at = None
        sent = 0
        for slot, held in list(state.book.held.items()):
            state.book.held.pop(slot)
            if held.record is not None:
                self.forward(held.record, held.fd)
                sent += 1
            else:
                from .custody import shut_and_close
                shut_and_close(held.fd)
        if sent:
            log.info("takeover: worker %d is gone; the %d idle clients held for it go to pid %s", state.index, sent,
                     self.peer)
        if state.index in self.draining:       # (one that reported drained before it died counted already)
            self.draining.discard(state.index)
            self.drained.append({"op": "drained", "handed": sent, "stayed": 0, "tls": 0, "reasons": {}})
            self._maybe_done()
        return True

    def _maybe_done(self) -> None:
        if self.phase != "draining" or self.draining:
            return
        stayed = sum(int(item.get("stayed", 0)) for item in self.drained)
        tls = sum(int(item.get("tls", 0)) for item in self.drained)
        reasons = Counter()
        for item in self.drained:
            reasons.update(item.get("reasons", {}))
        self.phase = "done"
        try:
            self.talk.send({"type": "done", "clients": self.handed, "stayed": stayed, "tls": tls})
        except OSError:
            pass
        log.info("takeover: handed %d listeners and %d clients to pid %s; %d clients stay here until they finish "
                 "(%d TLS)%s", len(self.supervisor.sockets), self.handed, self.peer, stayed, tls,
                 "".join(f"; {why}: {count}" for why, count in sorted(reasons.items())))
        # The group is done: what stayed ends as in a graceful stop, then the supervisor exits 0 (which closes the
        # connection, over which the new side passes the cancels of the clients still here until then).
        self.handed_over = True
        self.supervisor.stop_gracefully(notify=False)

    def _route_cancel(self, record: dict) -> None:
        """A cancel the new side got for a key it does not know: to the worker that issued it (every worker when the
        engine is not named), over its channel."""
        supervisor = self.supervisor
        try:
            key = decode(record["key"])
        except (HandoverError, KeyError, TypeError, ValueError):
            return
        engine = supervisor.engines.get(record.get("engine") or "")
        workers = supervisor.workers
        moved = supervisor.moved_keys.get(json.dumps(record["key"], sort_keys=True))    # SIGTTOU moved that client
        if moved is not None and moved[2] < len(workers):
            targets = [workers[moved[2]]]
        elif engine is not None:
            targets = [workers[engine.cancel_key_worker(key) % len(workers)]]
        else:
            targets = workers
        for state in targets:
            supervisor.send(state, {"op": "takeover_cancel", "key": record["key"],
                                    "terminate": bool(record.get("terminate"))})

    def _ended(self, exc) -> None:
        """The connection ended: after done, the new side is only gone (or ends it); before, the takeover failed."""
        phase = self.phase
        if phase == "done":
            self.talk.close()
            self.talk = None
            return
        if phase == "draining":
            log.warning("takeover: the new process (pid %s) went away (%s); this group accepts again, with the "
                        "clients it still has", self.peer, exc)
            now = time.monotonic()
            for state in self.supervisor.workers:
                if state.retiring:
                    continue            # SIGTTOU's drain goes on: it does not accept again
                if state.pid and state.channel is not None:
                    self.supervisor.send(state, {"op": "takeover_failed"})
                elif not state.pid and state.respawn_at is None:
                    state.respawn_at = now      # died during the drain (not respawned then): respawned now
        elif phase == "accepting":
            log.warning("takeover: the new process (pid %s) went away before it accepted (%s); this group goes on "
                        "serving", self.peer, exc)
        else:
            log.warning("takeover: %s; this group goes on serving", exc)
        self._reset()

    def _reset(self) -> None:
        if self.talk is not None:
            self.talk.close()
            self.talk = None
        self.phase = ""
        self.draining = set()
        self.start()                    # the path was given up for the new side: take it back

    def forget(self) -> None:
        """In a forked worker: close this process's copies of the supervisor's descriptors (the path stays)."""
        for sock in (self.sock, self.talk.conn if self.talk is not None else None):
            if sock is not None:
                sock.close()
        self.sock = self.talk = None

    def stop(self) -> None:
        """The group ends."""
        self.close()
        if self.talk is not None:
            self.talk.close()
            self.talk = None


# ---------------------------------------------------------------------------------------------------- new group

class GroupTakeover:
    """The new group's supervisor: takes the listening sockets before it forks, then the clients once its workers
    serve (see the module docstring)."""

    def __init__(self, supervisor, required: bool):
        self.supervisor = supervisor
        self.required = required
        self.talk: _Conversation | None = None
        self.peer = None
        self.cancel_counter = 0
        self.taken = 0
        self.listeners = 0
        self.summary: dict = {}
        self.forwarding = False         # cancels for unknown keys go to the old side

    def connect(self, make_socket):
        """Connect and take the listening sockets: (sockets by listener name, the admin server's or None), each made
        by `make_socket(fd)`; None when nobody runs and the takeover was not required. Raises TakeoverError."""
        from .takeover import NobodyRunning
        supervisor = self.supervisor
        config = supervisor.config
        conn = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        try:
            conn, _, offer = connect_and_negotiate(conn, socket_path(config),
                                                   config_listener_facts(config, supervisor.engines),
                                                   config.proxy.admin_listen)
        except NobodyRunning as exc:
            if self.required:
                raise
            log.info("takeover: %s; starting without one", exc)
            return None
        self.talk = _Conversation(supervisor, conn)
        self.peer = offer.peer
        self.cancel_counter = offer.cancel_counter or 0
        sockets = {name: make_socket(fd) for name, fd in offer.listen_fds.items()}
        self.listeners = len(sockets)
        admin = make_socket(offer.admin_fd) if offer.admin_fd is not None else None
        self.forwarding = True
        log.info("takeover: took %d listening sockets from pid %s; starting %d workers on them", len(sockets),
                 self.peer, len(supervisor.workers))
        return sockets, admin

    def worker_options(self) -> dict:
        """What a worker forked during the takeover needs: its cancel-key counter, whether to pass cancels back."""
        return {"cancel_counter": self.cancel_counter, "forward_cancels": self.forwarding}

    def serving(self) -> None:
        """Every worker serves: the old side may stop accepting and send its clients; systemd hears that this is the
        service's main process now."""
        from . import systemd
        supervisor = self.supervisor
        try:
            self.talk.send({"type": "accepting"})
        except OSError as exc:
            self._ended(exc)
            return
        supervisor.watch(self.talk.conn.fileno(), self._readable)
        systemd.notify("READY=1", MAINPID=os.getpid(),
                       STATUS=f"{len(supervisor.workers)} workers serving {len(supervisor.config.listeners)} "
                              f"listeners, taken over from pid {self.peer}")

    def _readable(self) -> None:
        try:
            for record, fds in self.talk.records():
                self._on_record(record, fds)
        except (HandoverError, OSError) as exc:
            self._ended(exc)

    def _on_record(self, record: dict, fds: list) -> None:
        kind = record.get("type")
        if kind == "done":
            for fd in fds:
                os.close(fd)
            self.summary = record
            self._log_done()
            return
        if kind != "client" or len(fds) != 1:
            for fd in fds:
                os.close(fd)
            log.warning("takeover: ignored a %r record", kind)
            return
        if give_client(self.supervisor, self._worker_for(record), record, fds[0]):
            self.taken += 1
        else:
            log.error("takeover: no worker could take a client of listener %s; it is closed", record.get("listener"))

    def _worker_for(self, record: dict):
        """The worker whose index the client's cancel key names (modulo the worker count), or another running one."""
        workers = self.supervisor.workers
        running = [state for state in workers if state.pid and state.channel is not None]
        if not running:
            return None
        try:
            engine = self.supervisor.engines[record["engine"]]
            index = engine.cancel_key_worker(decode(record["session"])["cancel_key"]) % len(workers)
        except (KeyError, TypeError, ValueError, HandoverError):
            return running[0]
        state = workers[index]
        return state if state in running else running[0]

    def pass_cancel(self, message: dict) -> None:
        """A worker got a cancel for a key it does not know: the old side may still serve that client."""
        if self.talk is None:
            return
        try:
            self.talk.send({"type": "cancel", "key": message["key"], "terminate": bool(message.get("terminate")),
                            "engine": message.get("engine")})
        except OSError:
            pass

    def _log_done(self) -> None:
        summary = self.summary
        log.info("took over %d listeners and %d clients from pid %s (%d clients stayed there, %d of them TLS)",
                 self.listeners, self.taken, self.peer, summary.get("stayed", 0), summary.get("tls", 0))
        from . import systemd
        systemd.notify(f"STATUS=took over {self.taken} clients from pid {self.peer}")
        self.supervisor.listen_for_takeovers()      # the old side has given the takeover socket's path up
        workers = self.supervisor.workers
        if workers and workers[0].channel is not None:      # the admin console's SHOW EVENTS, once for the group
            self.supervisor.send(workers[0], {"op": "took_over", "from_pid": self.peer, "listeners": self.listeners,
                                              "clients": self.taken, "stayed": summary.get("stayed", 0)})

    def _ended(self, exc) -> None:
        """The old side exited (after done), or ended the takeover early: the takeover is over."""
        if not self.summary:
            log.warning("takeover: the old process ended the handover early: %s", exc)
            self._log_done()
        else:
            log.info("takeover: the old process (pid %s) has exited", self.peer)
        self.talk.close()
        self.talk = None
        self.forwarding = False
        supervisor = self.supervisor
        for state in supervisor.workers:
            if state.channel is not None:
                supervisor.send(state, {"op": "takeover_over"})

    def forget(self) -> None:
        """In a forked worker: close this process's copy of the takeover connection."""
        if self.talk is not None:
            self.talk.conn.close()
            self.talk = None

    def stop(self) -> None:
        if self.talk is not None:
            self.talk.close()
            self.talk = None


# ---------------------------------------------------------------------------------------------------- adopting

def give_client(supervisor, state, record: dict, fd: int) -> bool:
    """Send worker `state` a client to adopt (its record, its connection `fd` by SCM_RIGHTS): a takeover's client,
    or one a worker retired by SIGTTOU handed over. The supervisor's descriptor closes either way; False when no
    worker took it (`state` None, its channel closed or full): the connection is shut down then, as nobody serves it."""
    try:
        if state is None or not supervisor.send_with_fds(state, {"op": "adopt", "record": record}, [fd]):
            from .custody import shut_and_close
            shut_and_close(fd)
            fd = None
            return False
        supervisor.balance.reserve(state.index)
        return True
    finally:
        if fd is not None:
            os.close(fd)


def least_loaded_worker(supervisor):
    """The serving worker (running, ready, not retiring) with the fewest clients in the accept balance's counts, the
    lowest index among equals; None when none serves."""
    counts = supervisor.balance.snapshot()
    serving = [state for state in supervisor.workers
               if state.pid and state.channel is not None and state.ready and not state.retiring]
    return min(serving, key=lambda state: (counts[state.index] if state.index < len(counts) else 0, state.index),
               default=None)


# ---------------------------------------------------------------------------------------------------- worker side

class WorkerDrain(Handover):
    """An old group's worker during a takeover: its idle clients go to its supervisor (which forwards them) instead
    of over a takeover connection; the rest is a single process's drain (takeover.Handover)."""

    def __init__(self, proxy, link):
        super().__init__(proxy, None)
        self.link = link
        self.done_draining = False

    def drain_sessions(self):
        try:
            return super().drain_sessions()
        finally:
            self.done_draining = True

    def send_client(self, record: dict, fd: int) -> None:
        # With the worker's cancel-key counter: a SIGTTOU'd index started again issues keys after the moved clients'.
        if not self.link.send_with_fds({"op": "handed", "record": record, "keys": self.proxy.cancel_keys_issued},
                                       [fd]):
            raise OSError("the supervisor's channel is closed")


class GroupTakeoverPart:
    """What a worker does for a group's takeover, on its supervisor's messages (WORKER_OPS)."""

    def __init__(self, proxy, link, admin_socket=None, options: dict | None = None):
        self.proxy = proxy
        self.link = link
        self.admin_socket = admin_socket
        self.drain: WorkerDrain | None = None
        self.paused: list = []          # (listener, its listening socket) while a drain paused its acceptor
        self.admin_spare = None         # a duplicate of the admin server's socket while a drain stopped it
        options = options or {}
        if options.get("cancel_counter"):
            # Keys the old side issued stay valid here: this worker's start after them, and a later takeover of this
            # group hears this counter (takeover_keys) even before the worker issued a key of its own.
            counter = int(options["cancel_counter"])
            proxy._cancel_counter = itertools.count(counter + 1)
            proxy.cancel_keys_issued = max(proxy.cancel_keys_issued, counter)
        if options.get("forward_cancels"):
            proxy.cancel_elsewhere = self.pass_cancel

    def handle(self, message: dict, fds) -> None:
        import gevent
        op = message["op"]
        proxy = self.proxy
        if op == "takeover_keys":
            self.link.send({"op": "keys", "keys": proxy.cancel_keys_issued})
        elif op == "drain_clients":
            if self.drain is None:
                gevent.spawn(self._drain, bool(message.get("admin")))
        elif op == "takeover_failed":
            self._failed()
        elif op == "adopt":
            fd = fds.popleft() if fds else None
            if fd is None:
                log.error("worker %d: a client to adopt came without its connection", proxy.worker)
                return
            self.adopt(message["record"], fd)
        elif op == "took_over":
            console = getattr(proxy, "console", None)
            if console is not None:
                console.record("takeover", from_pid=message.get("from_pid"), listeners=message.get("listeners"),
                               clients=message.get("clients"), stayed=message.get("stayed"))
        elif op == "takeover_over":
            proxy.cancel_elsewhere = None
        elif op == "takeover_cancel":         # a cancel the new side passed back, for a client of this worker
            try:
                key = decode(message["key"])
            except (HandoverError, KeyError, TypeError, ValueError):
                return
            proxy.cancel(key, None, bool(message.get("terminate")))

    def pass_cancel(self, key, engine, terminate: bool) -> bool:
        """Proxy.cancel_elsewhere during a takeover: through the supervisor to the old side."""
        if self.link.closed:
            return False
        try:
            record = cancel_record(key, engine, terminate)
        except (TypeError, ValueError):
            return False
        self.link.send({"op": "cancel_elsewhere", "key": record["key"], "engine": record["engine"],
                        "terminate": record["terminate"]})
        return True

    def adopt(self, record: dict, fd: int) -> None:
        """Serve a client the old side handed over: its session resumes from its next request."""
        import gevent
        proxy = self.proxy
        try:
            session = resume_session(proxy, record, fd)
        except Exception:  # one client that cannot be resumed must not stop the others
            log.exception("takeover: a client of listener %s could not be resumed; it is closed",
                          record.get("listener"))
            return
        _counts(proxy)["taken_over"] += 1
        gevent.spawn(proxy.serve_session, session.runtime, session, session_source(session), session.resume)

    def _drain(self, admin_sent: bool) -> None:
        """Stop accepting (the listening sockets stay open here, for a failed takeover), hand the idle clients over
        until takeover_drain_timeout, and report to the supervisor."""
        proxy = self.proxy
        drain = self.drain = WorkerDrain(proxy, self.link)
        self.paused = []
        for rt in proxy.listeners:
            acceptor = rt.acceptor
            if acceptor is not None:
                if acceptor.greenlet is not None:
                    acceptor.greenlet.kill(block=False)
                    acceptor.greenlet = None
                del acceptor.parked[:]
                self.paused.append((rt, acceptor.sock))
        self.admin_spare = None
        if admin_sent and proxy.admin is not None:
            # The new side serves the admin server on the same socket: this worker's goes (a duplicate is kept for
            # a failed takeover).
            sock = getattr(proxy.admin, "socket", None)
            if sock is not None:
                self.admin_spare = os.dup(sock.fileno())
            proxy.admin.stop()
            proxy.admin = None
        proxy.stopping = True
        relay_core.attend()     # (the relay lanes' login doors see it at their next wake-up)
        stayed, tls, reasons = drain.drain_sessions()
        if drain.failed:
            self._accept_again()
            return
        self.link.send({"op": "drained", "handed": drain.handed, "stayed": stayed, "tls": tls,
                        "reasons": dict(reasons), "keys": proxy.cancel_keys_issued})
        log.info("worker %d: handed %d clients over; %d stay until they finish", proxy.worker, drain.handed, stayed)

    def _failed(self) -> None:
        """The new side went away: a drain under way stops (and accepts again), a finished one accepts again now."""
        drain = self.drain
        if drain is None:
            return
        if drain.done_draining:
            self._accept_again()
        else:
            drain.failed = True

    def _accept_again(self) -> None:
        proxy = self.proxy
        for rt, sock in self.paused:
            proxy._start_listener(rt, sock)
        self.paused = []
        proxy.stopping = False
        relay_core.attend()
        if self.admin_spare is not None:
            from gevent import socket as gsocket

            from .metrics import start_admin_server
            spare = gsocket.socket(fileno=self.admin_spare)
            spare.setblocking(False)
            self.admin_spare = None
            proxy.admin = start_admin_server(proxy.config.proxy.admin_listen, proxy, spare)
        self.drain = None
        log.warning("worker %d: the takeover failed; accepting again", proxy.worker)
