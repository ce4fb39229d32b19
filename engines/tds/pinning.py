"""T-SQL classification for pooling: the SET options the proxy replays, and what ties a session to its backend."""
from __future__ import annotations

import enum
import re
import sys

from multiproxy.engine import PinReason

from .statements import proc_number
from .wire.messages import SP_PREPARE, SP_PREPEXEC


class TDSPinReason(str, enum.Enum):
    """Pin reasons only this engine reports (SQL Server: CONTEXT_INFO / session context, EXECUTE AS); the engine-neutral ones are multiproxy's PinReason."""

    CONTEXT_INFO = "context_info"
    EXECUTE_AS = "execute_as"


ALL_PIN_REASONS = tuple(r.value for r in PinReason) + tuple(r.value for r in TDSPinReason)

# SET options the proxy replays on whichever backend serves the client (after RESETCONNECTION).
TRACKED_OPTIONS = frozenset({
    "ANSI_NULLS", "ANSI_NULL_DFLT_ON", "ANSI_NULL_DFLT_OFF", "ANSI_PADDING", "ANSI_WARNINGS", "ARITHABORT",
    "ARITHIGNORE", "CONCAT_NULL_YIELDS_NULL", "CURSOR_CLOSE_ON_COMMIT", "QUOTED_IDENTIFIER", "NUMERIC_ROUNDABORT",
    "NOCOUNT", "XACT_ABORT", "TEXTSIZE", "DATEFORMAT", "DATEFIRST", "LANGUAGE", "LOCK_TIMEOUT",
    "DEADLOCK_PRIORITY", "TRANSACTION", "IMPLICIT_TRANSACTIONS", "ANSI_DEFAULTS",
    "CONCURRENCY_CONTROL",
})
# Other SET options SQL Server knows: they change the session in ways the proxy does not replay.
UNTRACKED_OPTIONS = frozenset({
    "IDENTITY_INSERT", "ROWCOUNT", "FMTONLY", "NOEXEC", "PARSEONLY", "FORCEPLAN", "OFFSETS", "SHOWPLAN_ALL",
    "SHOWPLAN_TEXT", "SHOWPLAN_XML", "STATISTICS", "QUERY_GOVERNOR_COST_LIMIT", "REMOTE_PROC_TRANSACTIONS",
    "NO_BROWSETABLE", "CONTEXT_INFO", "ROWCOUNT", "RESULT_SET_CACHING",
})

_STRIP = re.compile(r"'(?:[^']|'')*'|--[^\n]*|/\*.*?\*/|\[[^\]]*\]", re.S)
_SET = re.compile(r"\bSET\s+([A-Z_]+(?:\s*,\s*[A-Z_]+)*)\s+(?!=)([^;\s]+)", re.I)
_SET_STMT = re.compile(r"\bSET\s+[^;]*", re.I)
_TEMP = re.compile(r"\b(?:CREATE\s+TABLE|INTO)\s+#", re.I)
_CURSOR = re.compile(r"\bDECLARE\s+\w+\s+(?:INSENSITIVE\s+|SCROLL\s+)*CURSOR\b|\bsp_cursor\w*", re.I)
_PREPARE = re.compile(r"\bsp_prep(?:are|exec)\b", re.I)
_EXECUTE_AS = re.compile(r"\bEXEC(?:UTE)?\s+AS\b", re.I)
_SESSION_CONTEXT = re.compile(r"\bsp_set_session_context\b", re.I)
_APPLOCK = re.compile(r"\bsp_getapplock\b", re.I)
_SESSION_OWNER = re.compile(r"@LockOwner\s*=\s*N?'session'", re.I)


def strip_literals(sql: str) -> str:
    """The text without string literals, comments and bracketed names (keywords inside them do not count)."""
    return _STRIP.sub(" ", sql)


def set_statements(sql: str) -> list[tuple[list[str], str]]:
    """The SET statements of a batch as (option names upper-case, the value as written)."""
    out = []
    literals: list[str] = []

    def hide(m: re.Match) -> str:
        if m.group(0).startswith("'"):
            literals.append(m.group(0))
            return f" MPLIT{len(literals) - 1}X "
        return " "

    bare = _STRIP.sub(hide, sql)
    for found in _SET.finditer(bare):
        names = [n.strip().upper() for n in found.group(1).split(",")]
        if names[0].startswith("@"):
            continue
        statement = re.sub(r"MPLIT(\d+)X", lambda m: literals[int(m.group(1))], found.group(2))
        if names[0] == "TRANSACTION":
            iso = re.match(r"SET\s+TRANSACTION\s+ISOLATION\s+LEVEL\s+(READ\s+UNCOMMITTED|READ\s+COMMITTED|"
                           r"REPEATABLE\s+READ|SNAPSHOT|SERIALIZABLE)", bare[found.start():], re.I)
            if iso is None:
                continue
            statement = "ISOLATION LEVEL " + " ".join(iso.group(1).upper().split())
        out.append((names, statement))
    return out


def classify_batch(sql: str) -> tuple[list[tuple[PinReason, str]], dict[str, str]]:
    """Pin reasons found in a batch, and the tracked SET options it sets (option -> statement)."""
    reasons: list[tuple[PinReason, str]] = []
    tracked: dict[str, str] = {}
    upper = sql.upper()
    if "#" in sql or "SET" in upper or "SP_" in upper or "EXEC" in upper or "CURSOR" in upper:
        bare = strip_literals(sql)
        if _TEMP.search(bare):
            reasons.append((PinReason.TEMP_TABLE, "#temporary table"))
        if _CURSOR.search(bare):
            reasons.append((PinReason.CURSOR, "cursor"))
        if _PREPARE.search(bare):
            reasons.append((PinReason.PREPARED_STATEMENT, "sp_prepare"))
        if _EXECUTE_AS.search(bare):
            reasons.append((TDSPinReason.EXECUTE_AS, "EXECUTE AS"))
        if _SESSION_CONTEXT.search(bare):
            reasons.append((TDSPinReason.CONTEXT_INFO, "sp_set_session_context"))
        if _APPLOCK.search(bare) and _SESSION_OWNER.search(sql):
            reasons.append((PinReason.ADVISORY_LOCK, "sp_getapplock with @LockOwner = 'Session'"))
        for names, statement in set_statements(sql):
            if "CONTEXT_INFO" in names:
                reasons.append((TDSPinReason.CONTEXT_INFO, "SET CONTEXT_INFO"))
            elif all(n in TRACKED_OPTIONS for n in names) and statement.startswith("@"):
                # the value of a variable: what it was is the server's to know, the proxy cannot replay it
                reasons.append((PinReason.SESSION_VARIABLE, f"SET {', '.join(names)} {statement}"))
            elif all(n in TRACKED_OPTIONS for n in names):
                for name in names:
                    # Interned: every client of a driver sets the same options, so its sessions share the texts.
                    tracked[sys.intern(name)] = sys.intern(f"SET {name} {statement}")
            elif any(n in UNTRACKED_OPTIONS for n in names):
                reasons.append((PinReason.SESSION_VARIABLE, f"SET {', '.join(names)}"))
    return reasons, tracked


def classify_rpc(name: str, params: list, virtualised: bool = True) -> list[tuple[PinReason, str]]:
    """Pin reasons of one RPC call by procedure name (well-known ids already turned into names). sp_prepare and
    sp_prepexec pin only when prepared statements are not virtualised (statements.py); sp_prepexecrpc always."""
    low = name.lower()
    if low.startswith("sp_cursor"):
        return [(PinReason.CURSOR, low)]
    if low.rsplit(".", 1)[-1].strip("[]") == "sp_prepexecrpc":
        return [(PinReason.PREPARED_STATEMENT, "sp_prepexecrpc")]
    if not virtualised and proc_number(name) in (SP_PREPARE, SP_PREPEXEC):
        return [(PinReason.PREPARED_STATEMENT, low)]
    if low.endswith("sp_set_session_context"):
        return [(TDSPinReason.CONTEXT_INFO, "sp_set_session_context")]
    if low.endswith("sp_getapplock"):
        owner = next((p.value for p in params if p.name.lower() == "@lockowner"), "Transaction")
        if isinstance(owner, str) and owner.lower() == "session":
            return [(PinReason.ADVISORY_LOCK, "sp_getapplock with @LockOwner = 'Session'")]
    if low == "sp_executesql" and params and isinstance(params[0].value, str):
        return classify_batch(params[0].value)[0]
    return []
