"""A MySQL client's session handed to a new proxy process in a takeover: when it can go, and its state.

A client can go when it is between commands with nothing half-done: no backend linked, no answer owed, no
partial packet, no transaction (a BEGIN the proxy answered itself is one too), no pin, no execute waiting for its
re-prepare. Its state is everything the client object holds but the per-process parts: user, schema, capability
flags, charset, tracked session variables, autocommit, the statement ids it was given (prepared again on demand on
the new backends), the connection id it was told (its cancel key, for KILL). The sequence of an idle client
restarts with its next command, so none is kept.
"""
from __future__ import annotations

from multiproxy.engine import restore_attributes
from multiproxy.handover import decode, encode

from . import protocol as p

# Per-process parts, made again by the new process (or empty between commands).
RUNTIME = frozenset(("ctx", "engine", "handshake", "server_state", "max_message", "retry_read_only",
                     "pipelined_reprepare", "linked"))


def not_idle(client) -> str:
    """Why `client` cannot be handed over now ("" when it can)."""
    if not client.logged_in:
        return "logging in"
    if client.linked or client.fifo or client.unresolved or client.holding or client.held:
        return "a command is outstanding"
    if client.status & p.SERVER_STATUS_IN_TRANS or client.deferred_begin is not None or client.hold:
        return "inside a transaction"
    if client.pinned:
        return "pinned"
    if not client.is_clean() or client.infile:
        return "a command is half read"
    if client.retry_request is not None or client.retry_refusal or client.transaction_lost:
        return "an answer is being completed"
    return ""


def export_state(client) -> dict | None:
    """The session as JSON-ready data, or None when it cannot go now (see not_idle)."""
    if not_idle(client):
        return None
    try:
        return {"fields": encode({name: value for name, value in vars(client).items() if name not in RUNTIME}),
                "server_version": client.engine.server_version}
    except TypeError:
        return None


def resume(engine, ctx, state: dict):
    """The client object of a session another process exported, logged in and between commands."""
    client = engine.client_protocol(ctx)
    restore_attributes(client, decode(state["fields"]), RUNTIME)
    if not engine.server_version and state.get("server_version"):
        engine.server_version = state["server_version"]     # what the client was greeted with, until a login here
    return client
