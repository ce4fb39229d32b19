"""SIGTTIN and SIGTTOU to the supervisor (as gunicorn's arbiter): one worker more, or one fewer whose idle clients move to the others.

Worker indexes stay 0..N-1, as the channels, the group view's sockets and the cancel keys name workers by index:
SIGTTIN forks worker N (or starts again the lowest index a SIGTTOU stopped, once it has exited); SIGTTOU retires the
highest index still serving. The retiring worker drains as an old group's worker does in a takeover (the same
`drain_clients` of multiproxy.group_takeover): it stops accepting and hands each idle client (record and connection,
`handed` on its channel) to the supervisor as it becomes idle, until `proxy.takeover_drain_timeout`; the supervisor
gives each to the serving worker with the fewest clients (`adopt`, as a takeover's new group does), which resumes
it. Then (`drained`) the supervisor sends it SIGTERM: what stayed (TLS, pinned and session-mode clients, clients
still busy) ends as in a graceful stop. With worker custody, the supervisor's duplicate goes with the client: the
retiring worker unholds it as it lets it go, the adopter holds it in its own book. A retiring worker that dies
before it drained loses only its busy clients: the idle ones the supervisor held for it go to the others too.

A moved client keeps its cancel key, which names the retired index: the supervisor tells every worker (`moved`,
and each worker forked later once it is ready) which worker holds it now, and Proxy.cancel routes such a key there;
when that client leaves its worker says so (`moved_left`) and the entry goes (`moved_gone`). The supervisor keeps the
cancel-key counter each retired index reached, and a worker that index starts again issues keys after it: its keys
never repeat a moved client's. The state of a stopped index goes once every index above it has gone too. Every
running worker is told the new count (`group`), so that the group view, /metrics and /status ask and list each
worker that runs.
"""
from __future__ import annotations

import json
import logging
import os
import signal

from .custody import BusyMap

log = logging.getLogger("multiproxy.supervisor")


def add_worker(supervisor, worker_state) -> None:
    """SIGTTIN: one more worker (`worker_state`: the supervisor's class of what it knows of a worker index)."""
    if supervisor.stopping_since is not None:
        log.info("SIGTTIN received while the group stops: no worker added")
        return
    state = next((s for s in supervisor.workers if s.retiring and not s.pid), None)
    if state is None:
        state = worker_state(len(supervisor.workers))
        if supervisor.custody:
            state.busy_map = BusyMap()
        supervisor.workers.append(state)
    state.retiring = False
    state.quick_deaths = 0
    # Keys of the clients that index had (moved to other workers since) stay unique: it issues keys after them.
    state.book.key_counter = max(state.book.key_counter, supervisor.key_floors.get(state.index, 0))
    supervisor.spawn(state)
    log.info("SIGTTIN received: worker %d added (%d workers)", state.index, serving_count(supervisor))
    tell_worker_count(supervisor)


def remove_worker(supervisor) -> None:
    """SIGTTOU: the highest worker still serving hands its idle clients to the others and stops; the last one stays."""
    if supervisor.stopping_since is not None:
        return
    serving = [s for s in supervisor.workers if not s.retiring]
    if len(serving) <= 1:
        log.warning("SIGTTOU received: worker %d is the last one and stays (a group keeps at least one worker)",
                    serving[0].index if serving else 0)
        return
    state = serving[-1]
    state.retiring = True
    state.respawn_at = None
    if state.pid and state.channel is not None:
        log.info("SIGTTOU received: worker %d (pid %d) hands its idle clients to the other workers as they become "
                 "idle (proxy.takeover_drain_timeout %g s) and stops; %d workers remain", state.index, state.pid,
                 supervisor.config.proxy.takeover_drain_timeout, len(serving) - 1)
        supervisor.send(state, {"op": "drain_clients", "admin": False})
    else:
        log.info("SIGTTOU received: worker %d (waiting to be respawned) is not started again; %d workers remain",
                 state.index, len(serving) - 1)
        hand_held_clients(supervisor, state)
        retired(supervisor)


def on_message(supervisor, state, message: dict) -> None:
    """A retiring worker's `handed` (a client, its connection waiting in the channel's descriptors) or `drained`."""
    op = message["op"]
    if op == "handed":
        fd = state.fds.popleft() if state.fds else None
        if fd is None:
            log.error("worker %d: a handed client came without its connection", state.index)
            return
        note_key_floor(supervisor, state, int(message.get("keys", 0)))
        move_client(supervisor, state, message["record"], fd)
    elif op == "drained":
        if state.index in supervisor.handover.draining:     # SIGTTOU came while a takeover drained the group
            supervisor.handover.on_message(state, message)
        note_key_floor(supervisor, state, int(message.get("keys", 0)))
        log.info("worker %d (SIGTTOU): handed %s clients to the other workers; %s stay until they finish or "
                 "proxy.shutdown_timeout%s", state.index, message.get("handed", 0), message.get("stayed", 0),
                 "".join(f"; {why}: {count}" for why, count in sorted(message.get("reasons", {}).items())))
        if state.pid:
            try:
                os.kill(state.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass


def move_client(supervisor, state, record: dict, fd: int) -> bool:
    """One client of retiring worker `state` to the least loaded serving worker (to the new side instead while the
    group is being taken over); False when nobody could take it (its connection is closed)."""
    from .group_takeover import give_client, least_loaded_worker
    if supervisor.handover.phase == "draining":
        supervisor.handover.forward(record, fd)
        return True
    target = least_loaded_worker(supervisor)
    if not give_client(supervisor, target, record, fd):
        log.error("SIGTTOU: no worker could take a client of worker %d (listener %s); it is closed", state.index,
                  record.get("listener"))
        return False
    tell_moved(supervisor, record, target.index)
    return True


def tell_moved(supervisor, record: dict, worker: int) -> None:
    """Every running worker hears that the client of `record` is served by `worker` now, for its cancels."""
    from .handover import HandoverError, decode, encode
    try:
        key = encode(decode(record["session"])["cancel_key"])
    except (KeyError, TypeError, ValueError, HandoverError):
        return
    entry = [record.get("engine"), key, worker]
    supervisor.moved_keys[json.dumps(key, sort_keys=True)] = entry
    for target in supervisor.workers:
        if target.pid and target.channel is not None:
            supervisor.send(target, {"op": "moved", "keys": [entry]})


def moved_left(supervisor, state, message: dict) -> None:
    """A moved client left worker `state`: its entry goes everywhere (unless it moved on to another worker since)."""
    name = json.dumps(message.get("key"), sort_keys=True)
    entry = supervisor.moved_keys.get(name)
    if entry is None or entry[2] != state.index:
        return
    del supervisor.moved_keys[name]
    for target in supervisor.workers:
        if target.pid and target.channel is not None:
            supervisor.send(target, {"op": "moved_gone", "key": entry[1]})


def tell_moved_keys(supervisor, state) -> None:
    """A worker is ready: it hears where every moved client is served."""
    if supervisor.moved_keys:
        supervisor.send(state, {"op": "moved", "keys": list(supervisor.moved_keys.values())})


def note_key_floor(supervisor, state, keys: int) -> None:
    """The cancel-key counter retired index `state.index` reached (kept when its state goes)."""
    index = state.index
    supervisor.key_floors[index] = max(supervisor.key_floors.get(index, 0), keys, state.book.key_counter)


def hand_held_clients(supervisor, state) -> None:
    """A retiring worker is gone before it handed its clients over (it died, or was waiting for its respawn): the
    idle clients the supervisor held for it (worker custody) go to the other workers, the busy ones are closed."""
    note_key_floor(supervisor, state, 0)
    if not state.book.held:
        return
    from .custody import shut_and_close
    if state.busy_map is None:
        idle, busy = [], state.book.release_all()
    else:
        idle, busy = state.book.after_death(state.busy_map)
    for client in busy:
        shut_and_close(client.fd)
    moved = 0
    for slot, held in idle:
        state.book.held.pop(slot)
        moved += move_client(supervisor, state, held.record, held.fd)
    log.info("worker %d (SIGTTOU) is gone: %d idle clients held for it went to the other workers, %d busy ones were "
             "closed", state.index, moved, len(busy))


def retired(supervisor) -> None:
    """A worker stopped by SIGTTOU has exited: states of stopped indexes at the end of the list go, and every
    running worker hears the new count."""
    workers = supervisor.workers
    while len(workers) > 1 and workers[-1].retiring and not workers[-1].pid:
        workers.pop()
    tell_worker_count(supervisor)


def serving_count(supervisor) -> int:
    return sum(1 for s in supervisor.workers if not s.retiring)


def tell_worker_count(supervisor, state=None) -> None:
    """Tell every running worker (or `state` only) how many worker indexes the group has now."""
    for target in [state] if state is not None else supervisor.workers:
        if target.pid:
            supervisor.send(target, {"op": "group", "workers": len(supervisor.workers)})
