"""Transactions the proxy answers itself, sans-IO: a BEGIN nothing has used yet and the COMMIT/ROLLBACK that ends it.

pymssql (autocommit off) sends `BEGIN TRAN` at connect and after every commit; python-tds sends TM_BEGIN_XACT, or
TM_COMMIT_XACT with fBeginXact. A begin that finds the client without a backend is answered here with a descriptor
the proxy makes (ENVCHANGE 8) and begun on the backend in front of the client's next request, so an idle
transaction holds no backend; its COMMIT/ROLLBACK with nothing sent since is answered here too (ENVCHANGE 9/10).
"""
from __future__ import annotations

import itertools
import re
import struct
from dataclasses import dataclass

from .wire import messages as tp
from .wire import token_stream as tk
from .wire.token_stream import ProtocolError

BEGIN, COMMIT, ROLLBACK = "begin", "commit", "rollback"
CURCMD_BEGIN_TRAN = 0xD4          # what SQL Server (and the lab server) put in DONE after BEGIN TRAN
CURCMD_END_TRAN = 0xD5            # ... after COMMIT / ROLLBACK
_DONE_SIZE = 13                   # DONE token: type, status, curcmd, 8-byte row count (TDS 7.2+)
_LONGEST_VERB = 128               # bytes of SQLBatch text worth decoding to look for a transaction verb

_BEGIN = re.compile(r"\s*BEGIN\s+TRAN(?:SACTION)?\s*;?\s*", re.I)
_END = re.compile(r"\s*(?:IF\s+@@TRANCOUNT\s*>\s*0\s+)?(COMMIT|ROLLBACK)(?:\s+(?:TRAN|TRANSACTION|WORK))?\s*;?\s*",
                  re.I)
# Proxy-made descriptors: a marker in the top bytes keeps them apart from any a server hands out in practice.
_descriptors = itertools.count(1)
_LOCAL_MARK = 0x6D70 << 48        # "mp"


@dataclass(frozen=True)
class TransactionVerb:
    """A request that only begins, commits or rolls back the whole transaction (no name, no savepoint)."""

    kind: str                      # BEGIN, COMMIT or ROLLBACK
    via_tm: bool = False           # a transaction-manager request (else a SQLBatch)
    isolation_level: int = 0       # TM_BEGIN_XACT's, or the one fBeginXact asks for
    begin_after: bool = False      # TM_COMMIT_XACT / TM_ROLLBACK_XACT with fBeginXact: a new one begins at once


def transaction_verb(msg: tp.Message) -> TransactionVerb | None:
    """The verb of a whole-transaction request, or None for anything else (which goes to a backend)."""
    try:
        if msg.type == tp.SQL_BATCH:
            if len(msg.data) > _LONGEST_VERB + 64:
                return None
            text = tp.SqlBatch.decode(msg.data).text
            if _BEGIN.fullmatch(text):
                return TransactionVerb(BEGIN)
            end = _END.fullmatch(text)
            if end:
                return TransactionVerb(COMMIT if end.group(1).upper() == "COMMIT" else ROLLBACK)
            return None
        if msg.type == tp.TRANSACTION_MANAGER:
            req = tp.TransactionRequest.decode(msg.data)
            if req.name or req.begin_name:
                return None
            if req.request_type == tp.TM_BEGIN_XACT:
                return TransactionVerb(BEGIN, True, req.isolation_level)
            if req.request_type in (tp.TM_COMMIT_XACT, tp.TM_ROLLBACK_XACT):
                return TransactionVerb(COMMIT if req.request_type == tp.TM_COMMIT_XACT else ROLLBACK, True,
                                       req.isolation_level, req.begin_after)
    except (ProtocolError, UnicodeDecodeError):
        return None
    return None


def new_local_descriptor() -> bytes:
    """A transaction descriptor for a transaction the proxy begun on the client's behalf (8 bytes, never 0)."""
    return struct.pack("<Q", _LOCAL_MARK | next(_descriptors))


def local_begin_reply(descriptor: bytes, via_tm: bool) -> bytes:
    """Tokens answering a begin: ENVCHANGE begin transaction with the proxy's descriptor, DONE."""
    return tk.envchange(tk.ENV_BEGINTRAN, descriptor, b"") + tk.done(0, 0 if via_tm else CURCMD_BEGIN_TRAN)


def local_end_reply(verb: TransactionVerb, descriptor: bytes, next_descriptor: bytes = b"") -> bytes:
    """Tokens answering a commit or rollback of a transaction nothing used: ENVCHANGE commit/rollback, the begin
    of the next one when fBeginXact asked for it, DONE."""
    env = tk.ENV_COMMITTRAN if verb.kind == COMMIT else tk.ENV_ROLLBACKTRAN
    body = tk.envchange(env, b"", descriptor)
    if next_descriptor:
        body += tk.envchange(tk.ENV_BEGINTRAN, next_descriptor, b"")
    return body + tk.done(0, 0 if verb.via_tm else CURCMD_END_TRAN)


def backend_begin_request(verb: TransactionVerb, packet_size: int) -> bytes:
    """The begin, as the client asked for it, to send to a backend in front of the client's next request."""
    if verb.via_tm:
        payload = tp.TransactionRequest(tp.TM_BEGIN_XACT, isolation_level=verb.isolation_level).encode()
        return tp.encode_message(tp.TRANSACTION_MANAGER, payload, packet_size)
    return tp.encode_message(tp.SQL_BATCH, tp.SqlBatch("BEGIN TRAN").encode(), packet_size)


def without_begin_after(payload: bytes) -> bytes:
    """A TM_COMMIT_XACT / TM_ROLLBACK_XACT request without fBeginXact (the proxy answers the begin itself)."""
    req = tp.TransactionRequest.decode(payload)
    req.begin_after, req.isolation_level, req.begin_name = False, 0, ""
    return req.encode()


def with_local_begin(payload: bytes, descriptor: bytes) -> bytes:
    """The last packet of a commit/rollback answer with the begin of the next (proxy-made) transaction in front
    of its final DONE; unchanged when the DONE is not wholly in this packet."""
    at = len(payload) - _DONE_SIZE
    if at < 0 or payload[at] != tk.TOKEN_DONE:
        return payload
    return payload[:at] + tk.envchange(tk.ENV_BEGINTRAN, descriptor, b"") + payload[at:]
