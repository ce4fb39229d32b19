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
# Settings of the current transaction only (SET TRANSACTION writes them): never tracked, never replayed.
TRANSACTION_SCOPED = frozenset({"transaction_isolation", "transaction_read_only", "transaction_deferrable"})
# Session identity: tracked and replayed in their own order (SET SESSION AUTHORIZATION resets the role), and
# RESET ALL leaves them as they are.
IDENTITY_PARAMETERS = frozenset({"session_authorization", "role"})
_IDENTITY_KEYS = IDENTITY_PARAMETERS

_SCREEN = re.compile(r"set|prepare|temp|listen|hold|advisory|load|reset|discard|close", re.IGNORECASE)
_STATEMENT_START = r"(?:^|;)\s*(?:/\*.*?\*/\s*|--[^\n]*\n\s*)*"
_SET = re.compile(_STATEMENT_START + r"(set|reset)\s+(?:session\s+)?(?!local\b)(time\s+zone\b|[\w.$]+|\"[^\"]+\")"
                  r"(?P<rest>[^;]*)", re.IGNORECASE | re.DOTALL)
# SQL-standard spellings of tracked parameters.
_ALIASES = {"names": "client_encoding", "time zone": "timezone", "authorization": "session_authorization"}
_SET_CONFIG = re.compile(r"set_config\s*\(", re.IGNORECASE)
_LITERAL = re.compile(r"\s*'((?:[^']|'')*)'\s*$")
_BARE_VALUE = re.compile(r"\s+(?P<value>.*?)\s*$", re.DOTALL)
# The settings SET SESSION CHARACTERISTICS AS TRANSACTION changes (default_transaction_read_only is reported).
_CHARACTERISTICS = ("default_transaction_isolation", "default_transaction_deferrable")
_DISCARD_ALL = re.compile(_STATEMENT_START + r"discard\s+all\b", re.IGNORECASE)
_SET_VALUE = re.compile(r"\s*(?:=|\bto\b)\s*(?P<value>.*?)\s*$", re.IGNORECASE | re.DOTALL)
_VALUE_ITEM = re.compile(r"'((?:[^']|'')*)'|\"([^\"]+)\"|([-+]?[\w.]+)")
_DOLLAR_QUOTE = re.compile(r"\$(?:[a-z_][a-z0-9_]*)?\$", re.IGNORECASE)
_PLAIN_WORD = re.compile(r"[a-z_][a-z0-9_$]*$")
_TEMP = re.compile(r"\bcreate\s+(?:(?:global|local)\s+)?(?:temp|temporary)\s+(table|view|sequence)\b(?P<rest>[^;]*)"
                   r"|\binto\s+(?:temp|temporary)\b(?P<rest2>[^;]*)|\bcreate\s+(?:unlogged\s+)?table\s+pg_temp\.", re.IGNORECASE)
_ON_COMMIT_DROP = re.compile(r"\bon\s+commit\s+drop\b", re.IGNORECASE)
_LISTEN = re.compile(_STATEMENT_START + r"listen\s+(\w+|\"[^\"]+\")", re.IGNORECASE)
_UNLISTEN = re.compile(_STATEMENT_START + r"unlisten\s+(\*|\w+|\"[^\"]+\")", re.IGNORECASE)
_WITH_HOLD = re.compile(r"\bdeclare\s+(\w+|\"[^\"]+\")[^;]*\bwith\s+hold\b", re.IGNORECASE)
_CLOSE = re.compile(_STATEMENT_START + r"close\s+(\w+|\"[^\"]+\")", re.IGNORECASE)
_DISCARD_TEMP = re.compile(_STATEMENT_START + r"discard\s+temp(?:orary)?\b", re.IGNORECASE)
_SQL_PREPARE = re.compile(_STATEMENT_START + r"prepare\s+(?!transaction\b)\w+", re.IGNORECASE)
_ADVISORY = re.compile(r"\bpg_(?:try_)?advisory_lock(?:_shared)?\s*\(", re.IGNORECASE)
_ADVISORY_UNLOCK_ALL = re.compile(r"\bpg_advisory_unlock_all\s*\(\s*\)", re.IGNORECASE)
_LOAD = re.compile(_STATEMENT_START + r"load\s+'", re.IGNORECASE)
# What DISCARD ALL undoes besides the settings: everything but a loaded library.
_UNDONE_BY_DISCARD_ALL = (PinReason.SESSION_VARIABLE, PinReason.TEMP_TABLE, PostgresPinReason.LISTEN,
                          PostgresPinReason.CURSOR_WITH_HOLD, PinReason.SQL_PREPARE, PinReason.ADVISORY_LOCK,
                          PinReason.PREPARED_STATEMENT)

# What analyze() finds, in order: ("pin", reason, detail, key), ("unpin", reason, key or None for all),
# ("set", name, value) and ("reset", name or None for RESET ALL) of a tracked (unreported) setting, ("discard",)
# for DISCARD ALL (every setting, the session identity too), and ("readback", name or None for every setting the
# session holds) for a value only the server knows: the relay reads it back after the request.
ALL_BUT_IDENTITY = "*"      # an unpin key: every session-variable pin but SET ROLE / SESSION AUTHORIZATION


def _ident(word: str) -> str:
    return word[1:-1] if word.startswith('"') else word.lower()


def _set(name: str, value: str) -> list[tuple]:
    effects = [("set", name, value), ("unpin", PinReason.SESSION_VARIABLE, name)]
    if name == "session_authorization":
        effects.append(("reset", "role"))           # a new session user has no role set
    return effects


def _reset(name: str) -> list[tuple]:
    effects = [("reset", name), ("unpin", PinReason.SESSION_VARIABLE, name)]
    if name == "session_authorization":
        effects.append(("reset", "role"))
    return effects


def _call_arguments(sql: str, pos: int) -> list[str] | None:
    """The top-level arguments of the call whose '(' ends before `pos`, or None when it does not close."""
    args, depth, start, n = [], 0, pos, len(sql)
    while pos < n:
        char = sql[pos]
        if char == "'":
            end = pos + 1
            while True:
                end = sql.find("'", end)
                if end < 0:
                    return None
                if sql.startswith("''", end):
                    end += 2
                    continue
                break
            pos = end
        elif char == '"':
            pos = sql.find('"', pos + 1)
            if pos < 0:
                return None
        elif char == "(":
            depth += 1
        elif char == ")":
            if depth == 0:
                args.append(sql[start:pos])
                return args
            depth -= 1
        elif char == "," and depth == 0:
            args.append(sql[start:pos])
            start = pos + 1
        pos += 1
    return None


def _plain_value(text: str) -> str | None:
    """The value of `SET name = text` as set_config would take it, or None when it is not plain literals."""
    items = []
    pos = 0
    n = len(text)
    while True:
        match = _VALUE_ITEM.match(text, pos)
        if match is None:
            return None
        items.append(match)
        pos = match.end()
        while pos < n and text[pos].isspace():
            pos += 1
        if pos == n:
            break
        if text[pos] != ",":
            return None
        pos += 1
        while pos < n and text[pos].isspace():
            pos += 1
    if len(items) == 1:
        single, double, word = items[0].groups()
        if single is not None:
            return single.replace("''", "'")
        return double if double is not None else word.lower()
    out = []
    for single, double, word in (m.groups() for m in items):
        if word is not None:
            out.append(word.lower())
            continue
        value = single.replace("''", "'") if single is not None else double
        if not _PLAIN_WORD.match(value):
            if '"' in value:
                return None
            value = f'"{value}"'    # quoted as SET quotes list items (search_path: GUC_LIST_QUOTE)
        out.append(value)
    return ", ".join(out)


def analyze(sql: str) -> list[tuple]:
    """What `sql` does to the session: the pins it causes, the pins it undoes, the settings it tracks."""
    if not _SCREEN.search(sql):
        return []
    found: list[tuple] = []   # (position, effect)
    bodies = _DOLLAR_QUOTE.search(sql) is not None
    for match in _SET.finditer(sql):
        verb, word = match.group(1).lower(), match.group(2)
        name = _ident(word)
        name = _ALIASES.get(re.sub(r"\s+", " ", name), name)
        if name in ("transaction", "constraints") or name in TRANSACTION_SCOPED:
            continue
        at = match.start()
        if verb == "reset":
            if name == "all":
                found.append((at, ("reset", None)))
                found.append((at, ("unpin", PinReason.SESSION_VARIABLE, ALL_BUT_IDENTITY)))
            elif name in IDENTITY_PARAMETERS or name not in REPORTED_PARAMETERS:
                found.extend((at, effect) for effect in _reset(name))
            continue
        if name == "characteristics":
            # SET SESSION CHARACTERISTICS AS TRANSACTION ...: the defaults of later transactions, read back.
            found.extend((at, ("readback", n)) for n in _CHARACTERISTICS)
            continue
        if name == "all" or bodies:
            # A dollar-quoted body (CREATE FUNCTION, DO) may hold a SET that does not run now: pin, never track.
            found.append((at, ("pin", PinReason.SESSION_VARIABLE, f"SET {name.upper() if name == 'all' else name}", name)))
            continue
        if name in REPORTED_PARAMETERS and name not in IDENTITY_PARAMETERS:
            continue          # the server reports it (ParameterStatus): tracked from there
        rest = match.group("rest")
        assignment = _SET_VALUE.match(rest)
        if assignment is None and name in IDENTITY_PARAMETERS:
            assignment = _BARE_VALUE.match(rest)       # SET ROLE x, SET SESSION AUTHORIZATION x
        text = assignment.group("value") if assignment is not None else ""
        value = _plain_value(text) if assignment is not None else None
        if value is None:
            # Not plain literals: the server evaluates it; the value it then holds is read back and tracked.
            found.append((at, ("readback", name)))
            found.append((at, ("unpin", PinReason.SESSION_VARIABLE, name)))
        elif text.lower() == "default" or (name == "role" and text.lower() == "none"):
            found.extend((at, effect) for effect in _reset(name))
        else:
            found.extend((at, effect) for effect in _set(name, value))
    for match in _SET_CONFIG.finditer(sql):
        args = _call_arguments(sql, match.end())
        at = match.start()
        if args is None or len(args) != 3:
            found.append((at, ("pin", PinReason.SESSION_VARIABLE, "set_config(..., false)", "set_config")))
            continue
        flag = args[2].strip().lower()
        if flag == "true":
            continue                                   # the function form of SET LOCAL
        name_literal = _LITERAL.match(args[0])
        if bodies or flag != "false":
            key = name_literal.group(1).replace("''", "'").lower() if name_literal else "set_config"
            found.append((at, ("pin", PinReason.SESSION_VARIABLE, "set_config(..., false)", key)))
            continue
        if name_literal is None:
            # Which setting it changes is known only to the server: read back every setting the session holds.
            found.append((at, ("readback", None)))
            continue
        name = name_literal.group(1).replace("''", "'").lower()
        if (name in REPORTED_PARAMETERS and name not in IDENTITY_PARAMETERS) or name in TRANSACTION_SCOPED:
            continue
        value_literal = _LITERAL.match(args[1])
        if value_literal is None:
            found.append((at, ("readback", name)))
            found.append((at, ("unpin", PinReason.SESSION_VARIABLE, name)))
        else:
            found.extend((at, effect) for effect in _set(name, value_literal.group(1).replace("''", "'")))
    for match in _DISCARD_ALL.finditer(sql):
        found.append((match.start(), ("discard",)))
        found.extend((match.start(), ("unpin", reason, None)) for reason in _UNDONE_BY_DISCARD_ALL)
    for match in _TEMP.finditer(sql):
        rest = match.group("rest") or match.group("rest2") or ""
        if not _ON_COMMIT_DROP.search(rest):
            found.append((match.start(), ("pin", PinReason.TEMP_TABLE, "temporary object", None)))
    discard = _DISCARD_TEMP.search(sql)
    if discard:
        found.append((discard.start(), ("unpin", PinReason.TEMP_TABLE, None)))
    for match in _LISTEN.finditer(sql):
        found.append((match.start(), ("pin", PostgresPinReason.LISTEN, "LISTEN", _ident(match.group(1)))))
    for match in _UNLISTEN.finditer(sql):
        channel = match.group(1)
        found.append((match.start(), ("unpin", PostgresPinReason.LISTEN, None if channel == "*" else _ident(channel))))
    for match in _WITH_HOLD.finditer(sql):
        found.append((match.start(), ("pin", PostgresPinReason.CURSOR_WITH_HOLD, "DECLARE ... WITH HOLD", _ident(match.group(1)))))
    for match in _CLOSE.finditer(sql):
        cursor = _ident(match.group(1))
        found.append((match.start(), ("unpin", PostgresPinReason.CURSOR_WITH_HOLD, None if cursor == "all" else cursor)))
    prepare = _SQL_PREPARE.search(sql)
    if prepare:
        found.append((prepare.start(), ("pin", PinReason.SQL_PREPARE, "PREPARE", None)))
    advisory = _ADVISORY.search(sql)
    if advisory:
        found.append((advisory.start(), ("pin", PinReason.ADVISORY_LOCK, "session advisory lock", None)))
    unlock = _ADVISORY_UNLOCK_ALL.search(sql)
    if unlock:
        found.append((unlock.start(), ("unpin", PinReason.ADVISORY_LOCK, None)))
    load = _LOAD.search(sql)
    if load:
        found.append((load.start(), ("pin", PostgresPinReason.LOAD, "LOAD", None)))
    found.sort(key=lambda item: item[0])
    return [effect for _, effect in found]


_KEYWORDS = (b"set", b"prepare", b"temp", b"listen", b"hold", b"advisory", b"load", b"reset", b"discard",
             b"deallocate", b"close")


def might_pin(sql: bytes) -> bool:
    """A cheap screen on the raw bytes: False means `classify` would find nothing (the words of _KEYWORDS,
    written out: this runs on every simple query). bytes.find, not `in`: on CPython 3.11 `b"x" in data`
    first tries the operand as an integer and formats a TypeError each time."""
    find = bytes(sql).lower().find
    return (find(b"set") >= 0 or find(b"prepare") >= 0 or find(b"temp") >= 0 or find(b"listen") >= 0
            or find(b"hold") >= 0 or find(b"advisory") >= 0 or find(b"load") >= 0 or find(b"reset") >= 0
            or find(b"discard") >= 0 or find(b"deallocate") >= 0 or find(b"close") >= 0)


def classify(sql: str) -> list[tuple[PinReason, str]]:
    """The pin reasons `sql` triggers, each with a short detail naming what was seen."""
    return [(effect[1], effect[2]) for effect in analyze(sql) if effect[0] == "pin"]
