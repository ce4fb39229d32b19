"""Classifies PostgreSQL SQL text into the reasons it would tie a client's session to one backend."""
from __future__ import annotations

import re

import enum

from multiproxy.engine import PinReason


class PostgresPinReason(str, enum.Enum):
    """Pin reasons only this engine reports (PostgreSQL: LISTEN, a cursor WITH HOLD, LOAD of a library); the engine-neutral ones are multiproxy's PinReason."""

    LISTEN = "listen"
    CURSOR_WITH_HOLD = "cursor_with_hold"
    LOAD = "load"


ALL_PIN_REASONS = tuple(r.value for r in PinReason) + tuple(r.value for r in PostgresPinReason)

# Parameters the server reports with ParameterStatus (GUC_REPORT): a SET of these is tracked and
# replayed on whichever backend the client lands on, so it does not pin.
REPORTED_PARAMETERS = frozenset({
    "application_name", "client_encoding", "datestyle", "timezone", "intervalstyle",
    "standard_conforming_strings", "default_transaction_read_only", "in_hot_standby",
    "integer_datetimes", "server_encoding", "server_version", "is_superuser",
})
# Reported but still session identity: changing them must pin.
IDENTITY_PARAMETERS = frozenset({"session_authorization", "role"})

_SCREEN = re.compile(r"set|prepare|temp|listen|hold|advisory|load|reset", re.IGNORECASE)
_STATEMENT_START = r"(?:^|;)\s*(?:/\*.*?\*/\s*|--[^\n]*\n\s*)*"
_SET = re.compile(_STATEMENT_START + r"(set|reset)\s+(?:session\s+)?(?!local\b)(time\s+zone\b|\w+|\"[^\"]+\")",
                  re.IGNORECASE | re.DOTALL)
# SQL-standard spellings of tracked parameters.
_ALIASES = {"names": "client_encoding", "time zone": "timezone"}
_SET_CONFIG = re.compile(r"set_config\s*\((.*?)\)", re.IGNORECASE | re.DOTALL)
_TEMP = re.compile(r"\bcreate\s+(?:(?:global|local)\s+)?(?:temp|temporary)\s+(table|view|sequence)\b(?P<rest>[^;]*)"
                   r"|\binto\s+(?:temp|temporary)\b(?P<rest2>[^;]*)|\bcreate\s+(?:unlogged\s+)?table\s+pg_temp\.", re.IGNORECASE)
_ON_COMMIT_DROP = re.compile(r"\bon\s+commit\s+drop\b", re.IGNORECASE)
_LISTEN = re.compile(_STATEMENT_START + r"listen\s", re.IGNORECASE)
_WITH_HOLD = re.compile(r"\bdeclare\b[^;]*\bwith\s+hold\b", re.IGNORECASE)
_SQL_PREPARE = re.compile(_STATEMENT_START + r"prepare\s+(?!transaction\b)\w+", re.IGNORECASE)
_ADVISORY = re.compile(r"\bpg_(?:try_)?advisory_lock(?:_shared)?\s*\(", re.IGNORECASE)
_LOAD = re.compile(_STATEMENT_START + r"load\s+'", re.IGNORECASE)


_KEYWORDS = (b"set", b"prepare", b"temp", b"listen", b"hold", b"advisory", b"load", b"reset", b"discard",
             b"deallocate")


def might_pin(sql: bytes) -> bool:
    """A cheap screen on the raw bytes: False means `classify` would find nothing (the words of _KEYWORDS,
    written out: this runs on every simple query). bytes.find, not `in`: on CPython 3.11 `b"x" in data`
    first tries the operand as an integer and formats a TypeError each time."""
    find = bytes(sql).lower().find
    return (find(b"set") >= 0 or find(b"prepare") >= 0 or find(b"temp") >= 0 or find(b"listen") >= 0
            or find(b"hold") >= 0 or find(b"advisory") >= 0 or find(b"load") >= 0 or find(b"reset") >= 0
            or find(b"discard") >= 0 or find(b"deallocate") >= 0)


def classify(sql: str) -> list[tuple[PinReason, str]]:
    """The pin reasons `sql` triggers, each with a short detail naming what was seen."""
    if not _SCREEN.search(sql):
        return []
    found: list[tuple[PinReason, str]] = []
    for match in _SET.finditer(sql):
        verb, name = match.group(1).lower(), match.group(2).strip('"').lower()
        name = _ALIASES.get(re.sub(r"\s+", " ", name), name)
        if name in ("transaction", "constraints"):
            continue
        if name == "characteristics" or name == "all":
            found.append((PinReason.SESSION_VARIABLE, f"{verb.upper()} {name.upper()}"))
        elif name in IDENTITY_PARAMETERS or name not in REPORTED_PARAMETERS:
            found.append((PinReason.SESSION_VARIABLE, f"{verb.upper()} {name}"))
    for match in _SET_CONFIG.finditer(sql):
        args = match.group(1).rstrip().lower()
        if not args.endswith("true"):
            found.append((PinReason.SESSION_VARIABLE, "set_config(..., false)"))
    for match in _TEMP.finditer(sql):
        rest = match.group("rest") or match.group("rest2") or ""
        if not _ON_COMMIT_DROP.search(rest):
            found.append((PinReason.TEMP_TABLE, "temporary object"))
    if _LISTEN.search(sql):
        found.append((PostgresPinReason.LISTEN, "LISTEN"))
    if _WITH_HOLD.search(sql):
        found.append((PostgresPinReason.CURSOR_WITH_HOLD, "DECLARE ... WITH HOLD"))
    if _SQL_PREPARE.search(sql):
        found.append((PinReason.SQL_PREPARE, "PREPARE"))
    if _ADVISORY.search(sql):
        found.append((PinReason.ADVISORY_LOCK, "session advisory lock"))
    if _LOAD.search(sql):
        found.append((PostgresPinReason.LOAD, "LOAD"))
    return found
