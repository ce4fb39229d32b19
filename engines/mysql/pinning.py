"""Classifies MySQL SQL text: tracked session settings (replayed elsewhere), pin reasons, USE, KILL; and the
client's pin record (`PinTracking`, a mixin of MySQLClient)."""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import enum

from multiproxy.engine import PinReason


class MySQLPinReason(str, enum.Enum):
    """Pin reasons only this engine reports (MySQL/MariaDB: @user variables, FOUND_ROWS(), HANDLER, XA transactions); the engine-neutral ones are multiproxy's PinReason."""

    USER_VARIABLE = "user_variable"
    FOUND_ROWS = "found_rows"
    HANDLER = "handler"
    XA = "xa"


ALL_PIN_REASONS = tuple(r.value for r in PinReason) + tuple(r.value for r in MySQLPinReason)

# Session variables replayed on whichever backend a client lands on, by canonical name. The two
# transaction ones are spelled per server when replayed (tx_* on MariaDB before 11.1, transaction_* elsewhere).
TRACKED = frozenset({"sql_mode", "time_zone", "tx_isolation", "tx_read_only", "character_set_client",
                     "character_set_connection", "character_set_results", "collation_connection"})
ALIASES = {"transaction_isolation": "tx_isolation", "transaction_read_only": "tx_read_only"}
# Settings the proxy knows from the OK packet's status flags: allowed, never pinned, never replayed from text.
STATUS_TRACKED = frozenset({"autocommit"})
# The pseudo-variable holding `NAMES x [COLLATE y]` or `CHARACTER SET x` (replayed first).
NAMES = "names"
CHARSET_VARIABLES = ("character_set_client", "character_set_connection", "character_set_results",
                     "collation_connection")

_KEYWORDS = (b"set", b"@", b"use", b"lock", b"temporary", b"prepare", b"found_rows", b"handler", b"xa",
             b"kill", b"flush", b"sql_calc", b"last_insert_id")

_LEXEME = re.compile(r"""'(?:[^'\\]|\\.|'')*'?|"(?:[^"\\]|\\.|"")*"?|`(?:[^`]|``)*`?|/\*!\d*|\*/"""
                     r"""|/\*.*?(?:\*/|$)|(?:--[ \t]|#)[^\n]*""", re.S)
_LITERAL = re.compile(r"\x01(\d+)\x01")
_WORD_VALUE = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:e[+-]?\d+)?|[a-z_][a-z0-9_$]*|\x01\d+\x01", re.I)
_USER_VARIABLE = re.compile(r"(?<![@\w$])@(?!@)(?:[\w$.]|\x01)")
_TEMP_TABLE = re.compile(r"\bcreate\s+(?:or\s+replace\s+)?temporary\s+table\b")
_GET_LOCK = re.compile(r"\bget_lock\s*\(")
_LOCK_TABLES = re.compile(r"^lock\s+tables?\b")
_FTWRL = re.compile(r"^flush\s+tables?\b.*\bwith\s+read\s+lock\b")
_SQL_PREPARE = re.compile(r"^prepare\s+\S+\s+from\b")
_FOUND_ROWS = re.compile(r"\bsql_calc_found_rows\b|\bfound_rows\s*\(")
_HANDLER = re.compile(r"^handler\s+\S+\s+open\b")
_XA = re.compile(r"^xa\s+(?:start|begin)\b")
_USE = re.compile(r"^use\s+(`(?:[^`]|``)+`|[\w$]+)\s*$")
_KILL = re.compile(r"^kill\s+(?:(?:hard|soft)\s+)?(query\s+|connection\s+)?(\d+)\s*$")
_SET = re.compile(r"^set\s+(.*)$", re.S)
_SCOPE = re.compile(r"^(?:(global|session|local|persist|persist_only)\s+|@@(global|session|local)\.|@@)")
_ASSIGN = re.compile(r"^([\w$]+)\s*:?=\s*(.*)$", re.S)
_TRANSACTION = re.compile(r"^transaction\s+(.*)$", re.S)
_ISOLATION = re.compile(r"isolation\s+level\s+(read\s+uncommitted|read\s+committed|repeatable\s+read|serializable)")
_NAMES = re.compile(r"^names\s+(\S+)(?:\s+collate\s+(\S+))?\s*$")
_CHARSET = re.compile(r"^(?:character\s+set|charset)\s+(\S+)\s*$")
_LAST_INSERT_ID = re.compile(r"^select\s+last_insert_id\s*\(\s*\)(?:\s+as\s+(`[^`]+`|\w+|\x01\d+\x01))?\s*$")


def might_matter(sql: bytes) -> bool:
    """A cheap screen on the raw bytes: False means `classify` would find nothing."""
    low = sql.lower()
    for word in _KEYWORDS:
        if word in low:
            return True
    return False


@dataclass
class Classification:
    """What one COM_QUERY does to session state."""

    pins: list = field(default_factory=list)          # (PinReason, detail)
    assigns: dict = field(default_factory=dict)       # canonical name -> SQL literal (or "DEFAULT")
    schema: str | None = None                         # USE
    hold_next: bool = False                           # SET TRANSACTION without SESSION: the next transaction only
    kill: tuple | None = None                         # ("query"|"connection", id) for a lone KILL
    last_insert_id: str | None = None                 # column name of a lone SELECT LAST_INSERT_ID()


def _split_lexemes(sql: str) -> tuple[str, list[str]]:
    """SQL with comments removed and string literals replaced by \\x01N\\x01 markers; the literals' text."""
    literals: list[str] = []

    def replace(match):
        text = match.group(0)
        head = text[:2]
        if text[0] in "'\"":
            literals.append(text)
            return f"\x01{len(literals) - 1}\x01"
        if text[0] == "`":
            return text
        if head == "/*" and text[2:3] == "!":
            return " "          # executable comment: its content counts
        if text == "*/":
            return " "
        return " "
    return _LEXEME.sub(replace, sql), literals


def _split_statements(text: str) -> list[str]:
    return [s.strip() for s in text.split(";") if s.strip()]


def _split_commas(text: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts]


def _literal(value: str, literals: list[str]) -> str | None:
    """The value as a SQL literal to replay, or None when it is an expression (which pins)."""
    value = value.strip()
    if not _WORD_VALUE.fullmatch(value):
        return None
    return _LITERAL.sub(lambda m: literals[int(m.group(1))], value)


def classify(sql: str) -> Classification:
    """Everything `sql` (one COM_QUERY, possibly several statements) does that session policy cares about."""
    result = Classification()
    text, literals = _split_lexemes(sql)
    low_all = text.lower()
    statements = _split_statements(low_all)
    if len(statements) == 1:
        stmt = statements[0]
        kill = _KILL.match(stmt)
        if kill:
            result.kill = ("connection" if (kill.group(1) or "").startswith("connection") or not kill.group(1)
                           else "query", int(kill.group(2)))
            return result
        lid = _LAST_INSERT_ID.match(stmt)
        if lid:
            original = _split_statements(text)[0]
            if lid.group(1):
                alias = original[len(original) - len(lid.group(1)):] if original.lower().endswith(lid.group(1)) else lid.group(1)
                alias = _LITERAL.sub(lambda m: literals[int(m.group(1))][1:-1], alias).strip("`")
            else:
                alias = original.split(None, 1)[1].strip()
            result.last_insert_id = alias
            return result
    pins = result.pins
    if _USER_VARIABLE.search(low_all):
        pins.append((MySQLPinReason.USER_VARIABLE, "user variable (@name)"))
    for stmt in statements:
        if stmt.startswith("set"):
            _classify_set(stmt, literals, result)
        elif stmt.startswith("use"):
            use = _USE.match(stmt)
            if use:
                name = use.group(1)
                # keep the client's spelling (schema names are case sensitive on most platforms)
                original = _split_statements(text)[statements.index(stmt)]
                name = original.split(None, 1)[1].strip()
                result.schema = name[1:-1].replace("``", "`") if name.startswith("`") else name
        if _TEMP_TABLE.search(stmt):
            pins.append((PinReason.TEMP_TABLE, "CREATE TEMPORARY TABLE"))
        if _GET_LOCK.search(stmt):
            pins.append((PinReason.ADVISORY_LOCK, "GET_LOCK()"))
        if _LOCK_TABLES.search(stmt):
            pins.append((PinReason.TABLE_LOCK, "LOCK TABLES"))
        if _FTWRL.search(stmt):
            pins.append((PinReason.TABLE_LOCK, "FLUSH TABLES WITH READ LOCK"))
        if _SQL_PREPARE.search(stmt):
            pins.append((PinReason.SQL_PREPARE, "PREPARE ... FROM"))
        if _FOUND_ROWS.search(stmt):
            pins.append((MySQLPinReason.FOUND_ROWS, "SQL_CALC_FOUND_ROWS / FOUND_ROWS()"))
        if _HANDLER.search(stmt):
            pins.append((MySQLPinReason.HANDLER, "HANDLER ... OPEN"))
        if _XA.search(stmt):
            pins.append((MySQLPinReason.XA, "XA START"))
    return result


def _classify_set(stmt: str, literals: list[str], result: Classification) -> None:
    match = _SET.match(stmt)
    if not match:
        return
    body = match.group(1).strip()
    if body.startswith("statement ") or body.startswith("global ") or body.startswith("@@global."):
        return      # SET STATEMENT ... FOR: one statement only; GLOBAL: not session state
    if body.startswith("password") or body.startswith("role ") or body.startswith("default role"):
        result.pins.append((PinReason.SESSION_VARIABLE, f"SET {body.split()[0].upper()}"))
        return
    transaction = _TRANSACTION.match(body)
    if transaction:
        result.hold_next = True     # only the next transaction, which must run on this backend
        return
    for part in _split_commas(body):
        _classify_assignment(part, literals, result)


def _classify_assignment(part: str, literals: list[str], result: Classification) -> None:
    pins = result.pins
    scope = _SCOPE.match(part)
    scope_word = ""
    if scope:
        scope_word = scope.group(1) or scope.group(2) or "session"
        part = part[scope.end():].strip()
    if scope_word in ("global", "persist", "persist_only"):
        return
    if part.startswith("@"):
        return      # a user variable: already pinned by the @name scan
    names = _NAMES.match(part)
    if names:
        charset = _literal(names.group(1), literals)
        collate = _literal(names.group(2), literals) if names.group(2) else ""
        if charset is None or collate is None:
            pins.append((PinReason.SESSION_VARIABLE, "SET NAMES with an expression"))
            return
        result.assigns[NAMES] = f"NAMES {charset}" + (f" COLLATE {collate}" if collate else "")
        for name in CHARSET_VARIABLES:
            result.assigns.pop(name, None)
        return
    charset = _CHARSET.match(part)
    if charset:
        value = _literal(charset.group(1), literals)
        if value is None:
            pins.append((PinReason.SESSION_VARIABLE, "SET CHARACTER SET with an expression"))
            return
        result.assigns[NAMES] = f"CHARACTER SET {value}"
        for name in CHARSET_VARIABLES:
            result.assigns.pop(name, None)
        return
    if scope_word in ("session", "local") and part.startswith("transaction "):
        level = _ISOLATION.search(part)
        if level:
            result.assigns["tx_isolation"] = "'" + "-".join(level.group(1).upper().split()) + "'"
        if re.search(r"\bread\s+only\b", part):
            result.assigns["tx_read_only"] = "1"
        elif re.search(r"\bread\s+write\b", part):
            result.assigns["tx_read_only"] = "0"
        return
    assign = _ASSIGN.match(part)
    if not assign:
        pins.append((PinReason.SESSION_VARIABLE, f"SET {part[:40]}"))
        return
    name = ALIASES.get(assign.group(1), assign.group(1))
    if name in STATUS_TRACKED:
        return
    if name in TRACKED:
        value = _literal(assign.group(2), literals)
        if value is None:
            pins.append((PinReason.SESSION_VARIABLE, f"SET {name} to an expression"))
            return
        if name in CHARSET_VARIABLES and NAMES in result.assigns:
            pass
        result.assigns[name] = value
        return
    pins.append((PinReason.SESSION_VARIABLE, f"SET {name}"))


class PinTracking:
    """Mixin of MySQLClient: whether the session is pinned to its backend, and why (first detail per reason).
    The pin policy (multiproxy.pinning) decides, per reason, whether a detection pins."""

    def _init_pins(self) -> None:
        self.pinned = False
        self.pin_details: list = []

    def _detected(self, reason: PinReason, detail: str) -> None:
        if self.ctx.pin_policy.detected(self, reason, detail):
            self.pinned = True
            # The first detail per reason: a pinned client repeating SET would otherwise grow the list forever.
            if all(known is not reason for known, _ in self.pin_details):
                self.pin_details.append((reason, detail))

    def _unpin(self) -> None:
        """The session's state was reset (COM_RESET_CONNECTION, COM_CHANGE_USER): nothing ties it any more."""
        self.pinned = False
        self.pin_details = []
        self.ctx.pin_policy.session_ended(self)
