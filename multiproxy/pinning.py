"""Pinning policy: what to do with each pin reason an engine reports, with counts and explanations."""
from __future__ import annotations

import logging
import time
from collections import Counter

from .engine import PinReason

log = logging.getLogger("multiproxy.pinning")


def _who(session) -> tuple[str, str, str]:
    """The client address, user and listener of an engine's client protocol `session`, for log lines."""
    ctx = getattr(session, "ctx", None)
    address = getattr(ctx, "client_address", None)
    if isinstance(address, tuple) and len(address) >= 2 and address[0]:
        where = f"{address[0]}:{address[1]}"
    else:
        where = str(address or "?")
    listener = getattr(getattr(ctx, "listener", None), "name", "?")
    return where, getattr(session, "user", "") or "?", listener


def _short(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


class PinPolicy:
    """Decides per reason whether a session pins (`pin`) or carries on multiplexed (`ignore`).

    Engines report what they saw; this object decides and keeps the counts that metrics and
    `status` show: pins detected in total and sessions currently pinned, by reason.
    """

    def __init__(self, actions: dict[str, str] | None = None, cluster: str = ""):
        self.actions = dict(actions or {})
        self.cluster = cluster
        self.detected_total: Counter = Counter()
        self.ignored_total: Counter = Counter()
        self.pinned_now: Counter = Counter()
        # id(session) -> {reason: (the detail that pinned it first, wall-clock time)}, for SHOW PINS
        self._session_reasons: dict[int, dict] = {}

    def action_for(self, reason: PinReason) -> str:
        return self.actions.get(reason.value, "pin")

    def detected(self, session, reason: PinReason, detail: str, statement: str = "") -> bool:
        """Record that `session` did something that ties it to its backend; True when it must pin. `statement`: the
        client's statement that did it, where the engine has it at hand (SHOW PINS shows it, else `detail`)."""
        self.detected_total[reason.value] += 1
        if self.action_for(reason) == "ignore":
            self.ignored_total[reason.value] += 1
            return False
        reasons = self._session_reasons.setdefault(id(session), {})
        if reason.value not in reasons:
            reasons[reason.value] = (statement or detail, time.time())
            self.pinned_now[reason.value] += 1
            log.info("cluster %s: session of client %s (user %r, listener %s) pinned to its backend: %s (%s)%s",
                     self.cluster, *_who(session), reason.value, detail,
                     f": {_short(statement)}" if statement and statement != detail else "")
        return True

    def session_ended(self, session) -> None:
        for reason in self._session_reasons.pop(id(session), ()):
            self.pinned_now[reason] -= 1

    def pins_of(self, session) -> list[tuple[str, str, float]]:
        """What pins `session` now: (reason, the statement (or detail) that pinned it, since when as a Unix time), for SHOW PINS."""
        return [(reason, detail, since) for reason, (detail, since) in self._session_reasons.get(id(session), {}).items()]

    def released(self, session, reason: PinReason) -> bool:
        """`session` undid what pinned it for `reason` (CLOSE of its last WITH HOLD cursor, UNLISTEN *, ...);
        True while it stays pinned for another reason."""
        reasons = self._session_reasons.get(id(session))
        if not reasons:
            return False
        if reason.value in reasons:
            del reasons[reason.value]
            self.pinned_now[reason.value] -= 1
            log.info("cluster %s: session no longer pinned for %s", self.cluster, reason.value)
        if not reasons:
            del self._session_reasons[id(session)]
            return False
        return True
