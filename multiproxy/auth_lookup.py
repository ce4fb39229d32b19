"""auth_query: a client user missing from the users file is looked up in the database, and the answer is cached.

PgBouncer's auth_user/auth_query. When `[clusters.NAME.auth_query]` is set and a client's user is not in the
users file, the handshake emits `LookupUser`; the session asks the cluster's `AuthLookup`, which logs in as the
configured lookup user on a connection of its own, runs the query with the user name bound as a literal by the
engine (`Engine.auth_query_sql`), turns the stored verifier into a `UserRecord` (`Engine.auth_query_verifiers`)
and caches it: a found user for `cache_seconds`, a missing one for `negative_cache_seconds`. Concurrent lookups of
one user share one query, so a login storm is one query per user per TTL.
"""
from __future__ import annotations

import logging
import time

from gevent.event import AsyncResult

from .auth import UserRecord
from .backends import open_socket, run_script
from .engine import BackendError

log = logging.getLogger("multiproxy.auth_lookup")

# outcome labels of multiproxy_auth_query_lookups_total
FOUND, NOT_FOUND, ERROR, CACHED = "found", "not_found", "error", "cached"


class LookupFailed(Exception):
    """The lookup query could not run (backend down, lookup user refused, query error): nothing is cached."""


class AuthLookup:
    """The verifier cache of one cluster and the lookups that fill it. `run` (the query, as I/O) is replaceable
    for unit tests; by default it is `proxy_query` bound by the session."""

    def __init__(self, cluster_name: str, settings, counts: dict | None = None, clock=time.monotonic):
        self.cluster_name = cluster_name
        self.settings = settings
        self.counts = counts if counts is not None else {}
        self.clock = clock
        self.cache: dict[str, tuple[float, UserRecord | None]] = {}
        self.inflight: dict[str, AsyncResult] = {}

    def _count(self, outcome: str) -> None:
        key = (self.cluster_name, outcome)
        self.counts[key] = self.counts.get(key, 0) + 1

    def cached(self, user: str):
        """(True, record or None) when the cache holds a live answer for `user`; (False, None) otherwise."""
        entry = self.cache.get(user)
        if entry is not None:
            if entry[0] > self.clock():
                return True, entry[1]
            del self.cache[user]
        return False, None

    def lookup(self, user: str, run) -> UserRecord | None:
        """The record of `user` (None: no such user); `run(user)` runs the query and returns the verifier text or
        None. Raises LookupFailed when the query could not run."""
        hit, record = self.cached(user)
        if hit:
            self._count(CACHED)
            return record
        waiting = self.inflight.get(user)
        if waiting is not None:
            record = waiting.get()      # re-raises the leader's LookupFailed
            self._count(CACHED)
            return record
        result = self.inflight[user] = AsyncResult()
        try:
            try:
                verifiers = run(user)
            except LookupFailed as exc:
                self._count(ERROR)
                result.set_exception(exc)
                raise
            record = UserRecord(user, verifiers) if verifiers else None
            self._count(FOUND if record is not None else NOT_FOUND)
            ttl = self.settings.cache_seconds if record is not None else self.settings.negative_cache_seconds
            if ttl > 0:
                self.cache[user] = (self.clock() + ttl, record)
            if len(self.cache) > 10000:      # bounded: drop what expired, then the oldest entries
                now = self.clock()
                for key in [k for k, (expires, _) in self.cache.items() if expires <= now][:5000] or list(self.cache)[:1000]:
                    self.cache.pop(key, None)
            result.set(record)
            return record
        finally:
            self.inflight.pop(user, None)
            if not result.ready():
                result.set_exception(LookupFailed("the lookup was interrupted"))


def proxy_query(proxy, cluster, role: str, engine, settings, database: str, user: str) -> dict:
    """Run the auth query for `user` on a connection of its own as the lookup user; the verifiers found by kind
    ({} when the user has none the engine can use). Raises LookupFailed."""
    sql = engine.auth_query_sql(settings.query or engine.auth_query_default, user)
    if sql is None:
        raise LookupFailed(f"the {engine.name} engine cannot look users up (auth_query)")
    lookup_database = settings.database or database
    target = proxy.backend_target(cluster, role, settings.user, lookup_database)
    if target is None:
        raise LookupFailed(f"no {role} node of cluster {cluster.name!r} is available to look the user up")
    cred = cluster.credential_for(settings.user)
    if target.password is None and cred is not None and cred.secret_source():
        raise LookupFailed(f"the password of the lookup user {settings.user!r} could not be obtained ({cred.key_path})")
    timeout = cluster.backend.connect_timeout
    sock = None
    try:
        sock = open_socket(target.host, target.port, timeout)
        sock, login = run_script(sock, engine.backend_login(target), target, timeout)
        script = engine.backend_query(sql, login.result, f"auth query (clusters.{cluster.name}.auth_query)")
        if script is None:
            raise LookupFailed(f"the {engine.name} engine cannot run queries (auth_query)")
        sock, script = run_script(sock, script, target, timeout)
    except (OSError, BackendError, ValueError) as exc:
        raise LookupFailed(f"the lookup as {settings.user!r} failed: {exc}") from None
    finally:
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass
    row = script.result or []
    value = row[-1] if row else None
    return engine.auth_query_verifiers(value) if value else {}
