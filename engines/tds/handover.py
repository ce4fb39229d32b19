"""A TDS client's session handed to a new proxy process in a takeover: when it can go, and its state.

A client can go when it is between requests with nothing half-done: no backend linked, no answer owed, no
partial packet, no transaction (nor one the proxy began for it: no transaction descriptor is open), no pin, no
held refusal. A client whose every packet is encrypted (encryption ON) stays: Python's ssl cannot export a TLS
session. A client that encrypted only its login (encryption OFF) is plaintext since, and goes. Its state is
everything the client object holds but the per-process parts: user, database, packet size, TDS version and the
login (language, read-only intent), tracked SET options and what a reset returns to, the sp_prepare handles it
was given (prepared again on demand on the new backends). A cancel is in band (ATTENTION): no key to carry. The
LOGIN7 goes without its password or token.
"""
from __future__ import annotations

import dataclasses

from multiproxy.engine import restore_attributes
from multiproxy.handover import decode, encode

from .wire import messages as tp
from .wire.response_scanner import ResponseScanner, Reframer

# Per-process parts, made again by the new process (or empty between requests).
RUNTIME = frozenset(("ctx", "engine", "server_state", "linked", "reader", "scanner", "reframer", "ident", "tls",
                     "hbuf"))


def not_idle(client) -> str:
    """Why `client` cannot be handed over now ("" when it can)."""
    if client.phase.name != "READY":
        return "logging in"
    if client.tls_full or client.tls_raw:
        return "TLS"
    if client.linked or client.expect or client.sbuf or client.reader.pending:
        return "a request is outstanding"
    if client.in_transaction or client.lazy_begin is not None or client.local_descriptor or client.descriptor:
        return "inside a transaction"
    if client.pinned:
        return "pinned"
    if (client.retry_request is not None or client.retry_refusal is not None or client.transaction_lost
            or client.attn_local or client.attn_by_proxy):
        return "an answer is being completed"
    return ""


def export_state(client) -> dict | None:
    """The session as JSON-ready data, or None when it cannot go now (see not_idle)."""
    if not_idle(client):
        return None
    fields = {name: value for name, value in vars(client).items() if name not in RUNTIME}
    if client.login is not None:
        # What the session still reads of its LOGIN7 (language, packet size, read-only intent), without secrets.
        fields["login"] = dataclasses.replace(client.login, password="", change_password="", sspi=b"", fedauth=None)
    try:
        return {"fields": encode(fields)}
    except TypeError:
        return None


def resume(engine, ctx, state: dict):
    """The client object of a session another process exported, logged in and between requests."""
    client = engine.client_protocol(ctx)
    restore_attributes(client, decode(state["fields"]), RUNTIME)
    client.reader = tp.MessageReader(tp.MAX_PACKET_SIZE + 1)
    client.reader.max_packet_size = client.packet_size
    client.scanner = ResponseScanner()
    client.reframer = Reframer(client.packet_size)
    client.tls = None
    return client
