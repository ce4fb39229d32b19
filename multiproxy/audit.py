"""The audit log: one JSON line per authentication, token rejection and limit hit; never a secret."""
from __future__ import annotations

import json
import logging
import os
import time

log = logging.getLogger("multiproxy.audit")
# Fields an audit record may carry; anything else (passwords, verifiers, tokens) is never written.
ALLOWED_FIELDS = ("listener", "engine", "user", "database", "address", "reason", "limit", "blocked_seconds")


class AuditLog:
    """Appends JSON lines to a file (mode 0600); with no path it only counts."""

    def __init__(self, path: str = ""):
        self.path = path
        self.counts: dict[str, int] = {}
        self._file = None
        if path:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            self._file = os.fdopen(fd, "a", buffering=1, encoding="utf-8")

    def record(self, event: str, **fields) -> None:
        self.counts[event] = self.counts.get(event, 0) + 1
        if self._file is None:
            return
        entry = {"time": round(time.time(), 3), "event": event}
        entry.update({k: v for k, v in fields.items() if k in ALLOWED_FIELDS and v not in (None, "")})
        try:
            self._file.write(json.dumps(entry, sort_keys=True) + "\n")
        except OSError as exc:
            log.error("audit log %s: %s", self.path, exc)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
