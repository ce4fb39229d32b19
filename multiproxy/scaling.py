"""SIGTTIN and SIGTTOU to the supervisor (as gunicorn's arbiter): one worker more, or one fewer, never fewer than one.

Worker indexes stay 0..N-1, as the channels, the group view's sockets and the cancel keys name workers by index:
SIGTTIN forks worker N (or starts again the lowest index a SIGTTOU stopped, once it has exited); SIGTTOU stops the
highest index still serving with SIGTERM, so it drains as in a graceful stop: its transactions under way finish
within `proxy.shutdown_timeout`, its clients then get the protocol's "shutting down, reconnect" error and are
closed, its backend slots go back to the broker when its channel closes, and with worker custody the supervisor
closes its duplicates of that worker's clients. The state of a stopped index goes once every index above it has
gone too. Every running worker is told the new count (`group`), so that the group view, /metrics and /status ask and
list each worker that runs.
"""
from __future__ import annotations

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
    supervisor.spawn(state)
    log.info("SIGTTIN received: worker %d added (%d workers)", state.index, serving_count(supervisor))
    tell_worker_count(supervisor)


def remove_worker(supervisor) -> None:
    """SIGTTOU: the highest worker still serving drains and stops; the last one stays."""
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
    if state.pid:
        log.info("SIGTTOU received: worker %d (pid %d) drains its clients (proxy.shutdown_timeout %g s) and stops; "
                 "%d workers remain", state.index, state.pid, supervisor.config.proxy.shutdown_timeout,
                 len(serving) - 1)
        try:
            os.kill(state.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    else:
        log.info("SIGTTOU received: worker %d (waiting to be respawned) is not started again; %d workers remain",
                 state.index, len(serving) - 1)
        retired(supervisor)


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
