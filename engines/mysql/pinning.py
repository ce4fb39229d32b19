"""Classifies MySQL SQL text: tracked session settings (replayed elsewhere), pins and what undoes them, USE, KILL;
and the client's pin record (`PinTracking`, a mixin of MySQLClient)."""
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

# Every session system variable a client sets to a value is tracked (canonical name -> SQL literal) and replayed on
# whichever backend it lands on. The two transaction ones are spelled per server when replayed (tx_* on MariaDB
# before 11.1, transaction_* elsewhere).
TX_VARIABLES = frozenset({"tx_isolation", "tx_read_only"})
ALIASES = {"transaction_isolation": "tx_isolation", "transaction_read_only": "tx_read_only"}
# Settings the proxy knows from the OK packet's status flags: allowed, never pinned, never replayed from text.
STATUS_TRACKED = frozenset({"autocommit"})
# Session variables that cannot move to another connection: values for the next statement only (binary log
# replay), a connection's identity, or settings changing what the server sends (session tracking in OK packets).
UNREPLAYABLE = frozenset({"insert_id", "last_insert_id", "identity", "timestamp", "rand_seed1", "rand_seed2",
                          "pseudo_thread_id", "pseudo_slave_mode", "gtid_next", "gtid_seq_no", "gtid_domain_id",
                          "server_id", "profiling", "profiling_history_size", "session_track_schema",
                          "session_track_state_change", "session_track_system_variables",
                          "session_track_transaction_info", "session_track_gtids", "debug", "debug_sync",
                          "transaction_allow_batching", "sql_log_off"})
# The pseudo-variable holding `NAMES x [COLLATE y]` or `CHARACTER SET x` (replayed first).
NAMES = "names"
CHARSET_VARIABLES = ("character_set_client", "character_set_connection", "character_set_results",
                     "collation_connection")

_KEYWORDS = (b"set", b"@", b"use", b"lock", b"temporary", b"prepare", b"found_rows", b"handler", b"xa",
             b"kill", b"flush", b"sql_calc", b"last_insert_id", b"drop")

_LEXEME = re.compile(r"""'(?:[^'\\]|\\.|'')*'?|"(?:[^"\\]|\\.|"")*"?|`(?:[^`]|``)*`?|/\*!\d*|\*/"""
                     r"""|/\*.*?(?:\*/|$)|(?:--[ \t]|#)[^\n]*""", re.S)
_LITERAL = re.compile(r"\x01(\d+)\x01")
_WORD_VALUE = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:e[+-]?\d+)?|[a-z_][a-z0-9_$]*|\x01\d+\x01", re.I)
_USER_VARIABLE = re.compile(r"(?<![@\w$])@(?!@)(?:[\w$.]|\x01)")
_TEMP_TABLE = re.compile(r"\bcreate\s+(?:or\s+replace\s+)?temporary\s+table\s+(?:if\s+not\s+exists\s+)?"
                         r"((?:`(?:[^`]|``)+`|[\w$]+)(?:\s*\.\s*(?:`(?:[^`]|``)+`|[\w$]+))?)?")
_DROP_TABLE = re.compile(r"^drop\s+(?:temporary\s+)?tables?\s+(?:if\s+exists\s+)?(.*?)(?:\s+(?:restrict|cascade))?$", re.S)
_GET_LOCK = re.compile(r"\bget_lock\s*\(\s*(\x01\d+\x01\s*,)?")
_RELEASE_LOCK = re.compile(r"\brelease_lock\s*\(\s*(\x01\d+\x01)\s*\)")
_RELEASE_ALL_LOCKS = re.compile(r"\brelease_all_locks\s*\(\s*\)")
_LOCK_TABLES = re.compile(r"^lock\s+tables?\b")
_UNLOCK_TABLES = re.compile(r"^unlock\s+tables?\s*$")
_FTWRL = re.compile(r"^flush\s+tables?\b.*\bwith\s+read\s+lock\b")
_SQL_PREPARE = re.compile(r"^prepare\s+(\S+)\s+from\b")
_DEALLOCATE = re.compile(r"^(?:deallocate|drop)\s+prepare\s+(\S+)\s*$")
_FOUND_ROWS = re.compile(r"\bsql_calc_found_rows\b|\bfound_rows\s*\(")
_HANDLER = re.compile(r"^handler\s+(\S+)\s+open\b(?:\s+(?:as\s+)?(\S+))?")
_HANDLER_CLOSE = re.compile(r"^handler\s+(\S+)\s+close\s*$")
_XA = re.compile(r"^xa\s+(?:start|begin)\b")
_USE = re.compile(r"^use\s+(`(?:[^`]|``)+`|[\w$]+)\s*$")
_KILL = re.compile(r"^kill\s+(?:(?:hard|soft)\s+)?(query\s+|connection\s+)?(\d+)\s*$")
_SET = re.compile(r"^set\s+(.*)$", re.S)
_SCOPE = re.compile(r"^(?:(global|session|local|persist|persist_only)\s+|@@(global|session|local)\.|@@)")
_ASSIGN = re.compile(r"^([\w$]+)\s*:?=\s*(.*)$", re.S)
_SESSION_TRANSACTION = re.compile(r"^(?:session|local)\s+transaction\s")
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

    pins: list = field(default_factory=list)          # (PinReason, detail), in statement order
    effects: list = field(default_factory=list)       # ("pin", reason, detail, key) / ("unpin", reason, key), in order
    assigns: dict = field(default_factory=dict)       # canonical name -> SQL literal (or "DEFAULT")
    readback: list = field(default_factory=list)      # (canonical name, spelling) set to an expression: read back
    schema: str | None = None                         # USE
    hold_next: bool = False                           # SET TRANSACTION without SESSION: the next transaction only
    kill: tuple | None = None                         # ("query"|"connection", id) for a lone KILL
    last_insert_id: str | None = None                 # column name of a lone SELECT LAST_INSERT_ID()

    def pin(self, reason, detail: str, key=None) -> None:
        """`key` names what pinned (a lock, a table, a statement) so that undoing it can unpin; None: nothing does."""
        self.pins.append((reason, detail))
        self.effects.append(("pin", reason, detail, key))

    def unpin(self, reason, key) -> None:
        """Undo the pin of `key` for `reason` (ALL: every one of them)."""
        self.effects.append(("unpin", reason, key))


ALL = "*all*"       # an unpin key: everything pinned for the reason (UNLOCK TABLES, RELEASE_ALL_LOCKS())


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
    """The value as a SQL literal to replay, or None when it is an expression (evaluated by the server)."""
    value = value.strip()
    if not _WORD_VALUE.fullmatch(value):
        return None
    return _LITERAL.sub(lambda m: literals[int(m.group(1))], value)


def _lock_name(marker: str, literals: list[str]) -> str:
    """A GET_LOCK/RELEASE_LOCK name from its literal marker (lock names compare case-insensitively)."""
    text = literals[int(marker.strip(" ,\x01").strip("\x01"))]
    return text[1:-1].lower()


def _object_name(text: str) -> str:
    """A table, handler or statement name as the server compares it: backquotes removed, the client's case kept."""
    return ".".join(part.strip().strip("`").replace("``", "`") for part in text.split("."))


def classify(sql: str) -> Classification:
    """Everything `sql` (one COM_QUERY, possibly several statements) does that session policy cares about."""
    result = Classification()
    text, literals = _split_lexemes(sql)
    low_all = text.lower()
    statements = _split_statements(low_all)
    originals = _split_statements(text)
    if len(originals) != len(statements):
        originals = statements
    if len(statements) == 1:
        stmt = statements[0]
        kill = _KILL.match(stmt)
        if kill:
            result.kill = ("connection" if (kill.group(1) or "").startswith("connection") or not kill.group(1)
                           else "query", int(kill.group(2)))
            return result
        lid = _LAST_INSERT_ID.match(stmt)
        if lid:
            original = originals[0]
            if lid.group(1):
                alias = original[len(original) - len(lid.group(1)):] if original.lower().endswith(lid.group(1)) else lid.group(1)
                alias = _LITERAL.sub(lambda m: literals[int(m.group(1))][1:-1], alias).strip("`")
            else:
                alias = original.split(None, 1)[1].strip()
            result.last_insert_id = alias
            return result
    if _USER_VARIABLE.search(low_all):
        result.pin(MySQLPinReason.USER_VARIABLE, "user variable (@name)")
    for stmt, original in zip(statements, originals):
        if stmt.startswith("set"):
            _classify_set(stmt, literals, result)
        elif stmt.startswith("use"):
            use = _USE.match(stmt)
            if use:
                # keep the client's spelling (schema names are case sensitive on most platforms)
                name = original.split(None, 1)[1].strip()
                result.schema = name[1:-1].replace("``", "`") if name.startswith("`") else name
        _classify_objects(stmt, original, literals, result)
    return result


def _classify_objects(stmt: str, original: str, literals: list[str], result: Classification) -> None:
    """Pins of session objects (temporary tables, locks, SQL prepared statements, handlers) and what undoes them."""
    temp = _TEMP_TABLE.search(stmt)
    if temp:
        name = _original(stmt, original, temp, 1) if temp.group(1) else None
        result.pin(PinReason.TEMP_TABLE, "CREATE TEMPORARY TABLE", _object_name(name) if name else None)
    elif stmt.startswith("drop"):
        dropped = _DROP_TABLE.match(stmt)
        if dropped:
            names = _original(stmt, original, dropped, 1)
            for name in _split_commas(names):
                result.unpin(PinReason.TEMP_TABLE, _object_name(name))
        deallocate = _DEALLOCATE.match(stmt)
        if deallocate:
            result.unpin(PinReason.SQL_PREPARE, _object_name(deallocate.group(1)).lower())
    for lock in _GET_LOCK.finditer(stmt):
        result.pin(PinReason.ADVISORY_LOCK, "GET_LOCK()", _lock_name(lock.group(1), literals) if lock.group(1) else None)
    for release in _RELEASE_LOCK.finditer(stmt):
        result.unpin(PinReason.ADVISORY_LOCK, _lock_name(release.group(1), literals))
    if _RELEASE_ALL_LOCKS.search(stmt):
        result.unpin(PinReason.ADVISORY_LOCK, ALL)
    if _LOCK_TABLES.search(stmt):
        result.pin(PinReason.TABLE_LOCK, "LOCK TABLES", "tables")
    if _FTWRL.search(stmt):
        result.pin(PinReason.TABLE_LOCK, "FLUSH TABLES WITH READ LOCK", "tables")
    if _UNLOCK_TABLES.match(stmt):
        result.unpin(PinReason.TABLE_LOCK, ALL)
    prepare = _SQL_PREPARE.search(stmt)
    if prepare:
        result.pin(PinReason.SQL_PREPARE, "PREPARE ... FROM", _object_name(prepare.group(1)).lower())
    elif stmt.startswith("deallocate"):
        deallocate = _DEALLOCATE.match(stmt)
        if deallocate:
            result.unpin(PinReason.SQL_PREPARE, _object_name(deallocate.group(1)).lower())
    if _FOUND_ROWS.search(stmt):
        result.pin(MySQLPinReason.FOUND_ROWS, "SQL_CALC_FOUND_ROWS / FOUND_ROWS()")
    handler = _HANDLER.search(stmt)
    if handler:
        group = 2 if handler.group(2) else 1
        result.pin(MySQLPinReason.HANDLER, "HANDLER ... OPEN", _object_name(_original(stmt, original, handler, group)))
    else:
        closed = _HANDLER_CLOSE.match(stmt)
        if closed:
            result.unpin(MySQLPinReason.HANDLER, _object_name(_original(stmt, original, closed, 1)))
    if _XA.search(stmt):
        result.pin(MySQLPinReason.XA, "XA START")


def _original(stmt: str, original: str, match, group: int) -> str:
    """A group of a match on the lower-cased statement, in the client's case."""
    if len(original) == len(stmt):
        return original[match.start(group):match.end(group)]
    return match.group(group)


def _classify_set(stmt: str, literals: list[str], result: Classification) -> None:
    match = _SET.match(stmt)
    if not match:
        return
    body = match.group(1).strip()
    if body.startswith("statement ") or body.startswith("global ") or body.startswith("@@global."):
        return      # SET STATEMENT ... FOR: one statement only; GLOBAL: not session state
    if body.startswith("password") or body.startswith("role ") or body.startswith("default role"):
        result.pin(PinReason.SESSION_VARIABLE, f"SET {body.split()[0].upper()}")
        return
    if _SESSION_TRANSACTION.match(body):
        _classify_assignment(body, literals, result)    # its modes are separated by commas too
        return
    transaction = _TRANSACTION.match(body)
    if transaction:
        result.hold_next = True     # only the next transaction, which must run on this backend
        return
    for part in _split_commas(body):
        _classify_assignment(part, literals, result)


def _classify_assignment(part: str, literals: list[str], result: Classification) -> None:
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
            result.pin(PinReason.SESSION_VARIABLE, "SET NAMES with an expression")
            return
        result.assigns[NAMES] = f"NAMES {charset}" + (f" COLLATE {collate}" if collate else "")
        for name in CHARSET_VARIABLES:
            result.assigns.pop(name, None)
        return
    charset = _CHARSET.match(part)
    if charset:
        value = _literal(charset.group(1), literals)
        if value is None:
            result.pin(PinReason.SESSION_VARIABLE, "SET CHARACTER SET with an expression")
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
        result.pin(PinReason.SESSION_VARIABLE, f"SET {part[:40]} (not understood by the proxy)")
        return
    spelled = assign.group(1)
    name = ALIASES.get(spelled, spelled)
    if name in STATUS_TRACKED:
        return
    if name in UNREPLAYABLE:
        result.pin(PinReason.SESSION_VARIABLE, f"SET {name} (cannot be replayed on another connection)")
        return
    value = _literal(assign.group(2), literals)
    if value is None:
        # An expression: the server evaluates it; the proxy reads the result back in the same borrow.
        result.assigns.pop(name, None)
        result.readback = [entry for entry in result.readback if entry[0] != name] + [(name, spelled)]
        return
    result.assigns[name] = "DEFAULT" if value.lower() == "default" else value
    result.readback = [entry for entry in result.readback if entry[0] != name]


class PinTracking:
    """Mixin of MySQLClient: whether the session is pinned to its backend, why (first detail per reason) and by
    what (`pin_keys`: lock, table, statement and handler names), so that undoing the last of them unpins.
    The pin policy (multiproxy.pinning) decides, per reason, whether a detection pins. A request's pins count
    once it goes to a backend (`link()` applies those of requests sent while unlinked); one that never reaches a
    backend (`fail_pending`) changes nothing."""

    def _init_pins(self) -> None:
        self.pinned = False
        self.pin_details: list = []
        self.pin_keys: dict = {}            # reason -> keys that pinned it (None: unnamed, only a reset undoes it)
        self.deferred_pins: list | None = None   # pins of requests not yet on a backend

    def _pins_sent(self, pins: list) -> None:
        """("pin", reason, detail, key) effects of a request on its way to a backend."""
        if self.linked:
            for _, reason, detail, key in pins:
                self._detected(reason, detail, key)
            return
        deferred = self.deferred_pins
        if deferred is None:
            deferred = self.deferred_pins = []
        for effect in pins:
            if effect[3] is None and effect in deferred:
                continue        # an unnamed pin counts once: a repeating client holds one entry
            deferred.append(effect)

    def _apply_deferred_pins(self) -> None:
        deferred, self.deferred_pins = self.deferred_pins, None
        for _, reason, detail, key in deferred:
            self._detected(reason, detail, key)

    def _detected(self, reason: PinReason, detail: str, key=None) -> None:
        self.state_generation += 1
        statement = getattr(self, "pin_statement", b"")
        if self.ctx.pin_policy.detected(self, reason, detail, bytes(statement[:500]).decode("utf-8", "replace")):
            self.pinned = True
            keys = self.pin_keys.setdefault(reason, [])
            # Advisory locks count (GET_LOCK twice needs RELEASE_LOCK twice); other names are held once.
            if key not in keys or (key is not None and reason is PinReason.ADVISORY_LOCK):
                keys.append(key)
            # The first detail per reason: a pinned client repeating SET would otherwise grow the list forever.
            if all(known is not reason for known, _ in self.pin_details):
                self.pin_details.append((reason, detail))

    def _released(self, reason: PinReason, key) -> None:
        """The client undid what pinned it for `reason` (key ALL: all of it); unpins when nothing else holds it."""
        self.state_generation += 1
        keys = self.pin_keys.get(reason)
        if not keys:
            return
        if key == ALL:
            keys.clear()
        elif key in keys:
            keys.remove(key)
        if keys:
            return
        del self.pin_keys[reason]
        self.pin_details = [(known, detail) for known, detail in self.pin_details if known is not reason]
        self.pinned = self.ctx.pin_policy.released(self, reason)

    def _unpin_all(self) -> None:
        """The session's state was reset (COM_RESET_CONNECTION, COM_CHANGE_USER): nothing ties it any more."""
        self.state_generation += 1
        self.pinned = False
        self.pin_details = []
        self.pin_keys = {}
        self.deferred_pins = None
        self.ctx.pin_policy.session_ended(self)


def undone_by(effects: list) -> list:
    """The ("unpin", reason, key) effects of a request that stay true once it succeeded: those not followed by a
    new pin for the same reason in the same request (UNLOCK TABLES; LOCK TABLES t READ stays pinned)."""
    kept = []
    for i, effect in enumerate(effects):
        if effect[0] == "unpin" and not any(later[0] == "pin" and later[1] is effect[1] for later in effects[i + 1:]):
            kept.append((effect[1], effect[2]))
    return kept
