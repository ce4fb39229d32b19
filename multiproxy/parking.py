"""Parks the sessions of idle clients, so that an idle client holds no greenlet (the sweep behind Session.park).

A session parks when it waits for its client's next request with no backend linked: its greenlet lets go of it
and the client's read watcher calls `Proxy.resume_parked` from the hub once the client sends something (or the
connection ends), which serves it in a greenlet again. With many clients (`session.EAGER_PARKING_SESSIONS`) a
session parks at once, the moment its greenlet would wait; with few, a busy client keeps its greenlet, and this
sweep parks the clients that sent nothing since its previous look (idle for one to two sweeps). TLS clients (Python's
ssl keeps state in the socket object a greenlet reads) and admin console clients are never parked.
"""
from __future__ import annotations

import logging

import gevent

log = logging.getLogger("multiproxy.parking")
PARKING_SWEEP = 1.0         # seconds between two looks at the sessions


class IdleParking:
    """One greenlet per proxy that looks at every session each PARKING_SWEEP seconds (Session.park_if_idle)."""

    def __init__(self, proxy, interval: float = PARKING_SWEEP):
        self.proxy = proxy
        self.interval = interval
        self.greenlet = None
        self.parked_total = 0       # sessions this sweep parked (those parked at once are not counted here)

    def start(self) -> None:
        if self.greenlet is None:
            self.greenlet = gevent.spawn(self._run)

    def stop(self) -> None:
        if self.greenlet is not None:
            self.greenlet.kill(block=False)
            self.greenlet = None

    def _run(self) -> None:
        while True:
            gevent.sleep(self.interval)
            self.sweep()

    def sweep(self) -> int:
        """Park every session idle since the previous sweep; how many were parked."""
        parked = 0
        for session in list(self.proxy.sessions.known()):
            try:
                if session.park_if_idle():
                    parked += 1
            except Exception:  # one session's failure must not stop the sweep of the others
                log.exception("parking: looking at a session failed")
        self.parked_total += parked
        return parked
