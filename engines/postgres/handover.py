"""A PostgreSQL client's session handed to a new proxy process in a takeover: when it can go, and its state.

A client can go when it is between requests with nothing half-done: no backend linked, no answer owed, no
partial message, no transaction (a BEGIN the proxy answered itself is a transaction too), no pin. Its state is
everything the client object holds but the per-process parts (the context, the linked backend's facts), so that
the new process resumes it as the same session: reported parameters and tracked settings, the startup values
RESET ALL returns to, named prepared statements (prepared again on demand on the new backends), counters.
"""
from __future__ import annotations

from multiproxy.engine import restore_attributes
from multiproxy.handover import decode, encode

from . import protocol as p

# Per-process parts, made again by the new process (or empty between requests).
RUNTIME = frozenset(("ctx", "handshake", "server_state", "server_params", "max_message", "retry_read_only",
                     "virtualize", "linked"))


def not_idle(client) -> str:
    """Why `client` cannot be handed over now ("" when it can)."""
    if client.handshake is not None:
        return "logging in"
    if client.linked or client.fifo or client.parse_fifo:
        return "a request is outstanding"
    if client.tx_status != p.TX_IDLE or client.lazy_begin is not None:
        return "inside a transaction"
    if client.pinned:
        return "pinned"
    if (client.cbuf or client.c_skip or client.c_discard or client.pending_extended or client.copy_in
            or client.discard_until_sync or client.deferred_rewrite is not None):
        return "a request is half read"
    if (client.retry_held is not None or client.retry_saved is not None or client.held_ready is not None
            or client.readback_due is not None or client.startup_replay_due or client.transaction_lost):
        return "an answer is being completed"
    return ""


def export_state(client) -> dict | None:
    """The session as JSON-ready data, or None when it cannot go now (see not_idle)."""
    if not_idle(client):
        return None
    try:
        return {"fields": encode({name: value for name, value in vars(client).items() if name not in RUNTIME})}
    except TypeError:
        return None


def resume(engine, ctx, state: dict):
    """The client object of a session another process exported, logged in and between requests."""
    client = engine.client_protocol(ctx)
    restore_attributes(client, decode(state["fields"]), RUNTIME)
    client.handshake = None
    return client
