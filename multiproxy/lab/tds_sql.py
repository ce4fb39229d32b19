"""T-SQL for the TDS lab server: batches split into statements, transpiled with sqlglot and run on SQLite.

A `SqlSession` is one TDS connection's view of the lab's databases. Its methods run in a worker thread
(SQLite blocks) and return response token bytes; an ATTENTION sets `cancelled`, which the SQLite progress
handler and WAITFOR check.
"""
from __future__ import annotations

import datetime
import decimal
import itertools
import os
import re
import sqlite3
import threading
import time
import uuid
import zlib
from dataclasses import dataclass

import sqlglot
from sqlglot import exp

from multiproxy_engines.tds.wire import token_stream as tk
from multiproxy_engines.tds.wire.token_stream import Column, TypeInfo

try:  # a worker thread must really sleep, even in a gevent-patched process
    from gevent.monkey import get_original
    _sleep = get_original("time", "sleep")
except ImportError:  # pragma: no cover
    _sleep = time.sleep

PRODUCT_VERSION = "16.0.1000.6"
VERSION_TEXT = ("Microsoft SQL Server 2022 (RTM) - 16.0.1000.6 (X64) \n\tmultiproxy TDS lab server "
                f"on SQLite {sqlite3.sqlite_version}\n\tDeveloper Edition (64-bit)")
DEFAULT_OPTIONS = {"ANSI_NULLS": "ON", "QUOTED_IDENTIFIER": "ON", "ANSI_WARNINGS": "ON", "ANSI_PADDING": "ON",
                   "CONCAT_NULL_YIELDS_NULL": "ON", "ARITHABORT": "ON", "NOCOUNT": "OFF", "TEXTSIZE": "-1",
                   "DATEFORMAT": "mdy", "DATEFIRST": "7", "LANGUAGE": "us_english", "XACT_ABORT": "OFF",
                   "IMPLICIT_TRANSACTIONS": "OFF", "TRANSACTION ISOLATION LEVEL": "READ COMMITTED",
                   "LOCK_TIMEOUT": "-1"}
# @@OPTIONS bits of the ON/OFF options (SQL Server's "user options" values)
OPTION_BITS = {"IMPLICIT_TRANSACTIONS": 2, "CURSOR_CLOSE_ON_COMMIT": 4, "ANSI_WARNINGS": 8, "ANSI_PADDING": 16,
               "ANSI_NULLS": 32, "ARITHABORT": 64, "ARITHIGNORE": 128, "QUOTED_IDENTIFIER": 256, "NOCOUNT": 512,
               "ANSI_NULL_DFLT_ON": 1024, "ANSI_NULL_DFLT_OFF": 2048, "CONCAT_NULL_YIELDS_NULL": 4096,
               "NUMERIC_ROUNDABORT": 8192, "XACT_ABORT": 16384}
BUSY_TIMEOUT_MS = 15000
_descriptors = itertools.count(1)


class Cancelled(Exception):
    """The client sent ATTENTION while the request ran."""


@dataclass
class SqlError(Exception):
    number: int
    text: str
    severity: int = 16
    state: int = 1

    def token(self, server: str = "") -> bytes:
        return tk.error(self.number, self.text, self.state, self.severity, server)


# -- typed values out of SQLite: converters keyed by the declared column type ----------------------------
class BigInt(int):
    """An integer from a BIGINT column (sent as INT8 whatever its size)."""


class VarChar(str):
    """A string from a VARCHAR/CHAR/TEXT column (sent as BIGVARCHAR, cp1252)."""


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", errors="replace")


def _convert(fn):
    def converter(raw: bytes):
        try:
            return fn(raw)
        except (ValueError, ArithmeticError):
            return _text(raw)
    return converter


def _to_datetime(raw: bytes):
    text = _text(raw).strip()
    return datetime.datetime.fromisoformat(text.replace("T", " ")) if len(text) > 10 else \
        datetime.datetime.combine(datetime.date.fromisoformat(text), datetime.time())


for _names, _fn in (
        (("BIT",), lambda raw: bool(int(float(raw)))),
        (("BIGINT",), lambda raw: BigInt(int(raw))),
        (("DECIMAL", "NUMERIC", "MONEY", "SMALLMONEY"), lambda raw: decimal.Decimal(_text(raw))),
        (("DATETIME", "DATETIME2", "SMALLDATETIME", "DATE"), _to_datetime),
        (("VARCHAR", "CHAR", "TEXT"), lambda raw: VarChar(_text(raw))),
        (("NVARCHAR", "NCHAR", "NTEXT"), _text),
        (("VARBINARY", "BINARY", "IMAGE"), bytes),
        (("FLOAT", "REAL"), lambda raw: float(raw))):
    for _name in _names:
        sqlite3.register_converter(_name, _convert(_fn))
sqlite3.register_adapter(decimal.Decimal, str)
sqlite3.register_adapter(datetime.datetime, lambda v: v.isoformat(" ", "milliseconds"))
sqlite3.register_adapter(datetime.date, lambda v: v.isoformat())
sqlite3.register_adapter(datetime.time, lambda v: v.isoformat())
sqlite3.register_adapter(uuid.UUID, str)


def infer_columns(names: list[str], rows: list[tuple]) -> tuple[list[Column], list[list]]:
    """TDS columns for SQLite result rows, from the Python values (typed by the converters above)."""
    columns, out_rows = [], [list(r) for r in rows]
    for index, name in enumerate(names):
        values = [r[index] for r in rows if r[index] is not None]
        kinds = {_kind(v) for v in values}
        if not kinds:
            info = TypeInfo(tk.INTN, 4)
        elif kinds <= {"bit"}:
            info = TypeInfo(tk.BITN, 1)
        elif kinds <= {"int", "bit", "bigint"}:
            big = "bigint" in kinds or any(not -2**31 <= v < 2**31 for v in values)
            info = TypeInfo(tk.INTN, 8 if big else 4)
            _map(out_rows, index, int)
        elif kinds <= {"int", "bit", "bigint", "float"}:
            info = TypeInfo(tk.FLTN, 8)
            _map(out_rows, index, float)
        elif kinds <= {"int", "bit", "bigint", "decimal"}:
            decs = [decimal.Decimal(int(v)) if not isinstance(v, decimal.Decimal) else v for v in values]
            if any(not d.is_finite() for d in decs):
                info = TypeInfo(tk.NVARCHAR, 4000)
                _map(out_rows, index, str)
            else:
                scale = min(38, max(max(-d.as_tuple().exponent, 0) for d in decs))
                digits = max(max(d.adjusted() + 1, 1) for d in decs)
                if digits > 38:
                    info = TypeInfo(tk.FLTN, 8)
                    _map(out_rows, index, float)
                else:
                    scale = min(scale, 38 - digits)
                    info = TypeInfo(tk.DECIMALN, tk.decimal_size(38), 38, scale)
        elif kinds <= {"datetime"} and all(1753 <= v.year for v in values):
            info = TypeInfo(tk.DATETIMN, 8)
        elif kinds <= {"bytes"}:
            info = TypeInfo(tk.BIGVARBINARY, 8000 if all(len(v) <= 8000 for v in values) else tk.PLP_MAX)
        elif kinds <= {"varchar"} and all(len(v) <= 8000 and _cp1252(v) for v in values):
            info = TypeInfo(tk.BIGVARCHAR, 8000)
        else:
            _map(out_rows, index, _as_text)
            longest = max(len(_as_text(v)) for v in values)
            info = TypeInfo(tk.NVARCHAR, 4000 if longest <= 4000 else tk.PLP_MAX)
        columns.append(Column(name, info))
    return columns, out_rows


def _cp1252(text: str) -> bool:
    try:
        text.encode("cp1252")
        return True
    except UnicodeEncodeError:
        return False


def _kind(value) -> str:
    if isinstance(value, bool):
        return "bit"
    if isinstance(value, BigInt):
        return "bigint"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, decimal.Decimal):
        return "decimal"
    if isinstance(value, datetime.datetime):
        return "datetime"
    if isinstance(value, (bytes, bytearray, memoryview)):
        return "bytes"
    if isinstance(value, VarChar):
        return "varchar"
    return "str"


def _as_text(value) -> str:
    if isinstance(value, (bytes, bytearray)):
        return "0x" + bytes(value).hex().upper()
    if isinstance(value, datetime.datetime):
        return value.isoformat(" ", "milliseconds")
    return str(value)


def _map(rows: list[list], index: int, fn) -> None:
    for r in rows:
        if r[index] is not None:
            r[index] = fn(r[index])


# -- splitting a batch into statements -------------------------------------------------------------------
_LEX = re.compile(r"""(?P<ws>\s+)|(?P<comment>--[^\n]*|/\*.*?\*/)|(?P<str>[Nn]?'(?:[^']|'')*')
    |(?P<quoted>\[[^\]]*\]|"[^"]*")|(?P<word>[@#]{0,2}[A-Za-z_][\w@#$]*)|(?P<num>\d+(?:\.\d*)?)
    |(?P<semi>;)|(?P<lp>\()|(?P<rp>\))|(?P<other>.)""", re.S | re.X)
STARTERS = {"SELECT", "INSERT", "UPDATE", "DELETE", "CREATE", "DROP", "ALTER", "SET", "BEGIN", "COMMIT",
            "ROLLBACK", "SAVE", "USE", "IF", "ELSE", "WAITFOR", "DECLARE", "EXEC", "EXECUTE", "TRUNCATE",
            "PRINT", "WITH", "MERGE", "RAISERROR", "THROW", "GRANT", "REVOKE"}
_OBJECT_WORDS = {"TABLE", "VIEW", "INDEX", "PROCEDURE", "PROC", "DATABASE", "FUNCTION", "TRIGGER", "SCHEMA",
                 "SEQUENCE", "TYPE", "USER", "LOGIN", "ROLE"}


def split_statements(text: str) -> list[str]:
    """T-SQL statements need no semicolons: a statement keyword at the top level starts the next one."""
    toks = [(m.lastgroup, m.group(), m.start()) for m in _LEX.finditer(text)
            if m.lastgroup not in ("ws", "comment")]
    out: list[str] = []
    start = None
    depth = 0
    first = prev = ""
    main_seen = set_seen = False

    def close(end: int) -> None:
        nonlocal start
        if start is not None:
            piece = text[start:end].strip()
            if piece:
                out.append(piece)
        start = None

    for i, (kind, value, pos) in enumerate(toks):
        if kind == "semi" and depth == 0:
            close(pos)
            prev = ";"
            continue
        word = value.upper() if kind == "word" else ""
        if kind == "lp":
            depth += 1
        elif kind == "rp":
            depth = max(0, depth - 1)
        if depth == 0 and word in STARTERS:
            begins = True
            if start is not None:
                nxt = toks[i + 1][1].upper() if i + 1 < len(toks) else ""
                if word == "SELECT" and prev in ("UNION", "ALL", "EXCEPT", "INTERSECT", "AS", "("):
                    begins = False
                elif first in ("INSERT", "WITH") and not main_seen and word in ("SELECT", "INSERT", "UPDATE",
                                                                               "DELETE", "MERGE"):
                    begins = first == "INSERT" and word != "SELECT"
                    main_seen = True
                elif word == "SET" and first == "UPDATE" and not set_seen:
                    begins, set_seen = False, True
                elif word == "WITH" and (nxt in ("(", "TIES") or prev in ("TOP",)):
                    begins = False
                elif word == "IF" and prev in _OBJECT_WORDS:
                    begins = False
                elif word in ("INSERT", "UPDATE", "DELETE") and prev == "THEN":
                    begins = False
                elif first in ("BEGIN", "COMMIT", "ROLLBACK", "SAVE") and prev in ("BEGIN",):
                    begins = False
            if begins:
                close(pos)
                start, first, main_seen, set_seen = pos, word, False, False
        elif start is None:
            start, first, main_seen, set_seen = pos, word, False, False
        if first == "INSERT" and word in ("VALUES", "SELECT", "DEFAULT"):
            main_seen = True
        prev = word or value
    close(len(text))
    return out


# -- per-connection session ------------------------------------------------------------------------------
_SUBST = re.compile(
    r"""(?P<str>[Nn]?'(?:[^']|'')*')|(?P<glob>@@\w+)
    |(?P<dbprop>\bDATABASEPROPERTYEX\s*\((?:[^,()]|\(\s*\))*,\s*N?'(?P<dbprop_name>\w+)'\s*\))
    |(?P<srvprop>\bSERVERPROPERTY\s*\(\s*N?'(?P<srvprop_name>\w+)'\s*\))
    |(?P<func>\b(?:DB_NAME|SCOPE_IDENTITY|SUSER_SNAME|SUSER_NAME|USER_NAME|DB_ID|CURRENT_USER|CONTEXT_INFO
        |SCHEMA_NAME)\s*\(\s*\))
    |(?P<sysuser>\bSYSTEM_USER\b)""", re.I | re.X)
_DYNAMIC_EXEC = re.compile(r"EXEC(?:UTE)?\s*\(", re.I)
_PARAM = re.compile(r"[Nn]?'(?:[^']|'')*'|(?<![@\w])@(\w+)")
_CURCMD = {exp.Insert: tk.CURCMD_INSERT, exp.Delete: tk.CURCMD_DELETE, exp.Update: tk.CURCMD_UPDATE}
_TSQL_WRITE = (exp.Insert, exp.Update, exp.Delete, exp.Create, exp.Drop, exp.Alter, exp.Merge,
               exp.TruncateTable)


def _nstr(text: str) -> str:
    return "N'" + text.replace("'", "''") + "'"


class SqlSession:
    """One connection's SQL state: SQLite connection, transaction count, SET options, #temp tables."""

    def __init__(self, lab, spid: int, user: str, database: str):
        self.lab, self.spid, self.user = lab, spid, user
        self.login_database = self.database = database
        self.options = dict(DEFAULT_OPTIONS)
        self.context_info: bytes | None = None     # SET CONTEXT_INFO: session-wide, not undone when a scope ends
        self.trancount = 0
        self.descriptor = 0
        self.rowcount = 0
        self.prepared: dict[int, tuple[list[str], str]] = {}
        self._handles = itertools.count(1)
        self.cancelled = False
        self._attached: set[str] = set()
        self.conn = sqlite3.connect(lab.path_for("master"), isolation_level=None, check_same_thread=False,
                                    detect_types=sqlite3.PARSE_DECLTYPES, timeout=BUSY_TIMEOUT_MS / 1000)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA foreign_keys=ON")            # SQL Server enforces FOREIGN KEY constraints
        self.conn.set_progress_handler(lambda: 1 if self.cancelled else 0, 1000)
        # T-SQL functions older SQLite lacks
        self.conn.create_function("CONCAT", -1, lambda *a: "".join("" if v is None else str(v) for v in a),
                                  deterministic=True)
        self.conn.create_function("lab_object_id", 1, object_id_of, deterministic=True)
        self.conn.create_function("lab_object_name", 1, object_name_part, deterministic=True)
        self._attach(database)

    # the lab's databases are files; master is `main`, the others are attached under their names
    def _schema(self, database: str) -> str:
        return "main" if database.lower() == "master" else database.lower()

    def _attach(self, database: str) -> None:
        schema = self._schema(database)
        if schema != "main" and schema not in self._attached:
            self.conn.execute("ATTACH DATABASE ? AS " + _quote(schema), (self.lab.path_for(database),))
            self._attached.add(schema)

    def close(self) -> None:
        try:
            self.conn.close()
        except sqlite3.Error:
            pass

    @property
    def nocount(self) -> bool:
        return self.options.get("NOCOUNT") == "ON"

    # -- transactions -----------------------------------------------------------------------------------
    def begin(self) -> bytes:
        self.trancount += 1
        if self.trancount == 1:
            self.descriptor = next(_descriptors) | (self.spid << 40)
            return tk.env_begin_tran(self.descriptor)
        return b""

    def commit(self) -> bytes:
        if self.trancount == 0:
            raise SqlError(3902, "The COMMIT TRANSACTION request has no corresponding BEGIN TRANSACTION.")
        self.trancount -= 1
        if self.trancount:
            return b""
        if self.conn.in_transaction:
            self.conn.execute("COMMIT")
        descriptor, self.descriptor = self.descriptor, 0
        return tk.env_commit_tran(descriptor)

    def rollback(self, name: str = "") -> bytes:
        if self.trancount == 0:
            raise SqlError(3903, "The ROLLBACK TRANSACTION request has no corresponding BEGIN TRANSACTION.")
        if name and self.conn.in_transaction and name.lower() in self._savepoints():
            self.conn.execute(f"ROLLBACK TO {_quote(name.lower())}")
            return b""
        if self.conn.in_transaction:
            self.conn.execute("ROLLBACK")
        self.trancount = 0
        descriptor, self.descriptor = self.descriptor, 0
        return tk.env_rollback_tran(descriptor)

    def save(self, name: str) -> bytes:
        if self.trancount == 0:
            raise SqlError(628, "Cannot issue SAVE TRANSACTION when there is no active transaction.")
        self._start_write()
        self.conn.execute(f"SAVEPOINT {_quote(name.lower())}")
        self._savepoint_names.add(name.lower())
        return b""

    def _savepoints(self) -> set[str]:
        return getattr(self, "_savepoint_names", set())

    def _start_write(self) -> None:
        if self.trancount and not self.conn.in_transaction:
            self.conn.execute("BEGIN IMMEDIATE")
            self._savepoint_names = set()

    def reset(self, keep_transaction: bool = False) -> None:
        """RESETCONNECTION: roll back (unless the skip-tran variant), drop #temp tables, forget prepared
        handles, restore SET options and the login's database."""
        if not keep_transaction and self.trancount:
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
            self.trancount, self.descriptor = 0, 0
        for (name,) in self.conn.execute("SELECT name FROM temp.sqlite_master WHERE type = 'table'").fetchall():
            self.conn.execute(f"DROP TABLE temp.{_quote(name)}")
        self.options = dict(DEFAULT_OPTIONS)
        self.context_info = None
        self.prepared.clear()
        self.database = self.login_database

    # -- requests ----------------------------------------------------------------------------------------
    def run_batch(self, text: str, params: dict | None = None, in_proc: bool = False) -> tuple[bytes, int]:
        """Run a batch; returns its tokens (ending in a DONE/DONEINPROC without MORE) and the last status."""
        done_token = tk.TOKEN_DONEINPROC if in_proc else tk.TOKEN_DONE
        pieces: list[list] = []  # [tokens, status, curcmd, count]
        statements = split_statements(text)
        index = 0
        try:
            while index < len(statements):
                stmt = statements[index]
                index += 1
                head = stmt.split(None, 1)[0].upper()
                if head == "IF":
                    cond = stmt[2:].strip()
                    truth = self._scalar(f"SELECT CASE WHEN {cond} THEN 1 ELSE 0 END", params)
                    body = statements[index] if index < len(statements) else ""
                    index += 1
                    else_body = None
                    if index < len(statements) and statements[index].split(None, 1)[0].upper() == "ELSE":
                        rest = statements[index][4:].strip()
                        index += 1
                        if not rest and index < len(statements):
                            rest = statements[index]
                            index += 1
                        else_body = rest
                    chosen = body if truth else else_body
                    if chosen:
                        pieces.append(self.run_statement(chosen, params))
                    continue
                pieces.append(self.run_statement(stmt, params))
        except Cancelled:
            raise
        except SqlError as err:
            pieces.append([err.token(self.lab.server_name), tk.DONE_ERROR, 0, 0])
        if not pieces:
            pieces.append([b"", 0, 0, 0])
        out = bytearray()
        for i, (body, status, curcmd, count) in enumerate(pieces):
            if i < len(pieces) - 1 or in_proc:  # inside a procedure DONEPROC still follows
                status |= tk.DONE_MORE
            out += body + tk.done(status, curcmd, count, done_token)
        return bytes(out), pieces[-1][1]

    def _scalar(self, sql: str, params) -> object:
        cursor = self._execute(self._transpile(sql)[0], params)
        row = cursor.fetchone()
        return row[0] if row else None

    def run_statement(self, stmt: str, params: dict | None = None) -> list:
        """One statement: [tokens, DONE status, CurCmd, row count]."""
        if self.cancelled:
            raise Cancelled()
        dynamic = _DYNAMIC_EXEC.match(stmt)
        if dynamic:
            return self._exec_dynamic(stmt[dynamic.end() - 1:].strip().rstrip(";").strip(), params)
        words = stmt.split()
        head = words[0].upper()
        second = words[1].upper() if len(words) > 1 else ""
        name = words[2] if len(words) > 2 else ""
        if head == "BEGIN" and second in ("TRAN", "TRANSACTION", "DISTRIBUTED"):
            return [self.begin(), 0, 0xD4, 0]
        if head == "COMMIT":
            return [self.commit(), 0, 0xD5, 0]
        if head == "ROLLBACK":
            target = name if second in ("TRAN", "TRANSACTION", "WORK") else second
            return [self.rollback(target.strip("[];")), 0, 0xD5, 0]
        if head == "SAVE" and second in ("TRAN", "TRANSACTION") and name:
            return [self.save(name.strip("[];")), 0, 0, 0]
        if head == "SET":
            return self._set(stmt)
        if head == "USE" and second:
            return [self.use(second.strip("[];")), 0, 0, 0]
        if head == "WAITFOR":
            self._waitfor(stmt)
            return [b"", 0, 0, 0]
        if head == "CREATE" and second == "DATABASE" and name:
            self.lab.create_database(name.strip("[];"))
            return [b"", 0, 0, 0]
        if head == "PRINT":
            value = self._scalar("SELECT " + stmt[5:].strip(), params)
            return [tk.info(0, "" if value is None else str(value), 1, 0, self.lab.server_name), 0, 0, 0]
        if head in ("EXEC", "EXECUTE") and second.split(",")[0].strip("[];").lower().endswith(
                "sp_lab_set_replica_lag"):
            self._set_replica_lag(stmt)
            return [b"", 0, 0, 0]
        if head in ("DECLARE", "EXEC", "EXECUTE", "MERGE", "GRANT", "REVOKE", "THROW", "RAISERROR", "ELSE") \
                or (head == "DROP" and second == "DATABASE"):
            raise SqlError(40517, f"'{head}' is not supported by the multiproxy TDS lab server "
                                  "(see docs/engines/tds-lab-server.md).", 15)
        sql, expression, names, write, temp_only = self._transpile(stmt)
        if write and not temp_only and self.lab.read_only:
            raise SqlError(3906, f'Failed to update database "{self.database}" because the database is '
                                 "read-only.")
        if write:
            self._start_write()
        cursor = self._execute(sql, params)
        if cursor.description:
            rows = cursor.fetchall()
            if not names or len(names) != len(cursor.description):
                names = [d[0] for d in cursor.description]
            columns, rows = infer_columns(names, rows)
            self.rowcount = len(rows)
            body = tk.colmetadata(columns) + b"".join(tk.row(columns, r) for r in rows)
            curcmd = _CURCMD.get(type(expression), tk.CURCMD_SELECT)   # a write's OUTPUT rows count its rows
            return [body, 0 if self.nocount else tk.DONE_COUNT, curcmd, len(rows)]
        curcmd = _CURCMD.get(type(expression))
        if curcmd is None:
            self.rowcount = 0
            return [b"", 0, 0, 0]
        self.rowcount = max(cursor.rowcount, 0)
        return [b"", 0 if self.nocount else tk.DONE_COUNT, curcmd, self.rowcount]

    def _execute(self, sql: str, params: dict | None):
        try:
            if params:
                names = {m.group(1) for m in _PARAM.finditer(sql) if m.group(1)}
                lowered = {k.lower(): v for k, v in params.items()}
                bound = {n: lowered.get(n.lower()) for n in names}
                missing = [n for n in names if n.lower() not in lowered]
                if missing:
                    raise SqlError(137, f'Must declare the scalar variable "@{missing[0]}".', 15, 2)
                return self.conn.execute(sql, bound)
            if _PARAM.search(sql) and any(m.group(1) for m in _PARAM.finditer(sql)):
                name = next(m.group(1) for m in _PARAM.finditer(sql) if m.group(1))
                raise SqlError(137, f'Must declare the scalar variable "@{name}".', 15, 2)
            return self.conn.execute(sql)
        except sqlite3.Error as exc:
            if self.cancelled:
                raise Cancelled() from None
            raise _map_error(exc) from None

    def _transpile(self, stmt: str):
        """T-SQL statement → (SQLite SQL, expression, result column names, writes?, only #temp tables?)."""
        text = _SUBST.sub(self._substitute, stmt)
        try:
            expression = sqlglot.parse_one(text, read="tsql")
        except sqlglot.errors.ParseError as exc:
            near = str(exc).split("\n")[0][:200]
            raise SqlError(102, f"Incorrect syntax: {near}", 15) from None
        if expression is None or isinstance(expression, exp.Command):
            raise SqlError(102, f"Incorrect syntax near '{stmt.split()[0]}' (not supported by the lab "
                                "server).", 15)
        for node in list(expression.find_all(exp.National)):
            node.replace(exp.Literal.string(node.this))
        for table in list(expression.find_all(exp.Table)):
            if table.name.lower() == "dm_hadr_database_replica_states" and table.db.lower() == "sys":
                table.replace(self._replica_states(table.alias_or_name))
        ctes = {cte.alias.lower() for cte in expression.find_all(exp.CTE)}
        tables = []
        for table in expression.find_all(exp.Table):
            ident = table.this
            if not isinstance(ident, exp.Identifier):
                continue
            name = ident.this
            if ident.args.get("temporary") or name.startswith("#"):
                table.set("this", exp.Identifier(this="#" + name.lstrip("#"), quoted=True))
                table.set("db", exp.Identifier(this="temp"))
                table.set("catalog", None)
                tables.append("temp")
                continue
            if name.lower() in ctes and not table.args.get("db"):
                continue
            if table.db.lower() in CATALOG_SCHEMAS:
                continue                               # a catalog view: _catalog_views replaces it below
            if isinstance(table.parent, exp.Schema) and isinstance(table.parent.parent, exp.Reference):
                continue                               # FOREIGN KEY ... REFERENCES t: SQLite wants it unqualified
            database = table.catalog or self.database
            if table.catalog:
                self._attach_known(database)
            table.set("db", exp.Identifier(this=self._schema(database), quoted=True))
            table.set("catalog", None)
            tables.append(database)
        self._catalog_views(expression)
        self._output_clause(expression)
        _values_column_aliases(expression)
        for kind in expression.find_all(exp.DataType):      # NVARCHAR(MAX): SQLite has no MAX (no limit at all)
            if any(isinstance(p.this, exp.Var) and p.this.name.upper() == "MAX" for p in kind.expressions):
                kind.set("expressions", [])
        if isinstance(expression, exp.Create):
            for coldef in expression.find_all(exp.ColumnDef):
                kind = coldef.args.get("kind")
                identity = any(isinstance(c.args.get("kind"), exp.GeneratedAsIdentityColumnConstraint)
                               for c in coldef.constraints)
                if isinstance(kind, exp.DataType) and not identity:
                    kind.replace(exp.DataType(this=exp.DataType.Type.USERDEFINED, kind=kind.sql("tsql")))
        names = None
        select = expression
        while isinstance(select, exp.SetOperation):
            select = select.this
        if isinstance(select, exp.Select) and not any(isinstance(e, exp.Star) or
                                                      (isinstance(e, exp.Column) and isinstance(e.this, exp.Star))
                                                      for e in select.expressions):
            names = [e.alias if isinstance(e, exp.Alias) else e.name if isinstance(e, exp.Column) else ""
                     for e in select.expressions]
        write = isinstance(expression, _TSQL_WRITE) or bool(expression.args.get("into"))
        temp_only = bool(tables) and tables[0] == "temp"
        return expression.sql("sqlite", identify=True), expression, names, write, temp_only

    def _attach_known(self, database: str) -> None:
        if not self.lab.has_database(database):
            raise SqlError(911, f"Database '{database}' does not exist. Make sure that the name is entered "
                                "correctly.")
        self._attach(database)

    # -- catalog views, OBJECT_ID() and OUTPUT: what ORMs ask before and after their DDL and inserts ---------
    def _catalog_views(self, expression: exp.Expression) -> None:
        """sys.objects, sys.tables, sys.views, sys.schemas, sys.system_views, sys.dm_exec_sessions,
        INFORMATION_SCHEMA.TABLES and fn_listextendedproperty() become subqueries over SQLite's own catalog
        (sqlite_master of the database named, `tempdb` meaning this session's #temp tables); OBJECT_ID() looks
        a name up there. Columns qualified as sys.objects.name lose the schema part."""
        for table in list(expression.find_all(exp.Table)):
            if isinstance(table.this, exp.Anonymous) and table.this.name.lower() == "fn_listextendedproperty":
                table.replace(_subquery("SELECT NULL AS objtype, NULL AS objname, NULL AS name, NULL AS value "
                                        "WHERE 1 = 0", table.alias_or_name))   # no extended properties
                continue
            if not isinstance(table.this, exp.Identifier) or table.db.lower() not in CATALOG_SCHEMAS:
                continue
            view = f"{table.db.lower()}.{table.name.lower()}"
            schema = self._catalog_schema(table.catalog)
            if view not in CATALOG_VIEWS:
                raise SqlError(208, f"Invalid object name '{table.db}.{table.name}' (the lab server has "
                                    f"{', '.join(sorted(CATALOG_VIEWS))} and sys.dm_hadr_database_replica_states)"
                                    ".")
            table.replace(_subquery(self._catalog_view_sql(view, schema), table.alias_or_name))
        for column in expression.find_all(exp.Column):
            if column.args.get("db") and column.db.lower() in CATALOG_SCHEMAS:
                column.set("db", None)
                column.set("catalog", None)
        for call in list(expression.find_all(exp.ObjectId)):
            kind = call.expression
            types = {"U": "'table'", "V": "'view'"}.get(kind.name.upper().strip(), "'table', 'view'") \
                if isinstance(kind, exp.Literal) else "'table', 'view'"
            lookup = sqlglot.parse_one(
                "(SELECT lab_object_id(name) FROM (SELECT name, type FROM "
                f"{_quote(self._schema(self.database))}.sqlite_master UNION ALL SELECT name, type FROM "
                f"temp.sqlite_master) WHERE type IN ({types}) AND lower(name) = lower(lab_object_name(NULL)))",
                read="sqlite")
            placeholder = next(f for f in lookup.find_all(exp.Anonymous) if f.name.lower() == "lab_object_name")
            placeholder.set("expressions", [call.this.copy()])
            call.replace(lookup)

    def _catalog_schema(self, catalog: str) -> str:
        if not catalog:
            return self._schema(self.database)
        if catalog.lower() == "tempdb":
            return "temp"
        self._attach_known(catalog)
        return self._schema(catalog)

    def _catalog_view_sql(self, view: str, schema: str) -> str:
        if view == "sys.schemas":
            return " UNION ALL ".join(f"SELECT {i} AS schema_id, '{name}' AS name, {i} AS principal_id"
                                      for i, name in SCHEMAS)
        if view == "sys.system_views":
            return " UNION ALL ".join(f"SELECT '{name.split('.')[1]}' AS name, {object_id_of(name)} AS object_id, "
                                      "4 AS schema_id, 'V' AS type, 'VIEW' AS type_desc, 1 AS is_ms_shipped"
                                      for name in sorted(CATALOG_VIEWS) + ["sys.dm_hadr_database_replica_states"]
                                      if name.startswith("sys."))
        if view == "sys.dm_exec_sessions":
            level = ISOLATION_LEVELS.get(self.options.get("TRANSACTION ISOLATION LEVEL", ""), 2)
            return (f"SELECT {self.spid} AS session_id, {_sqlite_str(self.user)} AS login_name, 'running' AS status, "
                    f"1 AS is_user_process, {self._db_id()} AS database_id, {level} AS transaction_isolation_level, "
                    f"{self.trancount} AS open_transaction_count")
        source = (f"FROM {_quote(schema)}.sqlite_master WHERE type IN ('table', 'view') "
                  "AND name NOT LIKE 'sqlite^_%' ESCAPE '^'")
        if view == "information_schema.tables":
            catalog = "tempdb" if schema == "temp" else self.database
            return (f"SELECT {_sqlite_str(catalog)} AS TABLE_CATALOG, 'dbo' AS TABLE_SCHEMA, name AS TABLE_NAME, "
                    f"CASE type WHEN 'table' THEN 'BASE TABLE' ELSE 'VIEW' END AS TABLE_TYPE {source}")
        only = {"sys.tables": " AND type = 'table'", "sys.views": " AND type = 'view'"}.get(view, "")
        return ("SELECT name, lab_object_id(name) AS object_id, NULL AS principal_id, 1 AS schema_id, "
                "0 AS parent_object_id, CASE type WHEN 'table' THEN 'U' ELSE 'V' END AS type, "
                "CASE type WHEN 'table' THEN 'USER_TABLE' ELSE 'VIEW' END AS type_desc, NULL AS create_date, "
                "NULL AS modify_date, 0 AS is_ms_shipped, 0 AS is_published, 0 AS is_schema_published "
                f"{source}{only}")

    @staticmethod
    def _output_clause(expression: exp.Expression) -> None:
        """INSERT/UPDATE/DELETE ... OUTPUT inserted.x (deleted.x for DELETE) runs as SQLite's RETURNING x."""
        returning = expression.args.get("returning")
        if returning is None:
            return
        allowed = "deleted" if isinstance(expression, exp.Delete) else "inserted"
        if returning.args.get("into"):
            raise SqlError(40517, "OUTPUT ... INTO is not supported by the multiproxy TDS lab server.", 15)
        for column in returning.find_all(exp.Column):
            if column.table.lower() in ("inserted", "deleted"):
                if column.table.lower() != allowed:
                    raise SqlError(40517, f"OUTPUT {column.table}.* in this statement is not supported by the "
                                          f"lab server (it returns {allowed}.* values).", 15)
                column.set("table", None)

    def _replica_states(self, alias: str) -> exp.Expression:
        """sys.dm_hadr_database_replica_states as the lab sees itself: a read-only server is the secondary
        replica of the current database in an availability group (one local row with its set lag), a writable
        one is in no availability group (no rows)."""
        lab = self.lab
        lag = "NULL" if lab.replica_lag is None else str(int(lab.replica_lag))
        redo = "NULL" if lab.redo_queue_kb is None else str(int(lab.redo_queue_kb))
        select = sqlglot.parse_one(
            f"SELECT {self._db_id()} AS database_id, 1 AS is_local, 0 AS is_primary_replica, "
            "'SYNCHRONIZING' AS synchronization_state_desc, 'HEALTHY' AS synchronization_health_desc, "
            f"0 AS log_send_queue_size, {redo} AS redo_queue_size, {lag} AS secondary_lag_seconds"
            + ("" if lab.read_only else " WHERE 1 = 0"), read="tsql")
        return select.subquery(alias)

    def _set_replica_lag(self, stmt: str) -> None:
        """Lab only: EXEC sp_lab_set_replica_lag <seconds | NULL> [, <redo queue KB | NULL>]."""
        match = re.match(r"EXEC(?:UTE)?\s+(?:\w+\.)?\[?sp_lab_set_replica_lag\]?\s+(NULL|\d+)"
                         r"(?:\s*,\s*(NULL|\d+))?\s*;?$", stmt, re.I)
        if not match:
            raise SqlError(201, "Procedure or function 'sp_lab_set_replica_lag' expects @seconds (a whole number "
                                "or NULL) and optionally @redo_queue_kb.")
        seconds, redo = match.groups()
        self.lab.replica_lag = None if seconds.upper() == "NULL" else int(seconds)
        if redo is not None:
            self.lab.redo_queue_kb = None if redo.upper() == "NULL" else int(redo)

    def _db_id(self) -> str:
        return "1" if self.database.lower() == "master" else "5"

    def _substitute(self, m: re.Match) -> str:
        if m.group("str"):
            return m.group("str")
        if m.group("glob"):
            name = m.group("glob")[2:].upper()
            values = {"VERSION": _nstr(VERSION_TEXT), "SPID": str(self.spid), "TRANCOUNT": str(self.trancount),
                      "ROWCOUNT": str(self.rowcount), "IDENTITY": "last_insert_rowid()",
                      "SERVERNAME": _nstr(self.lab.server_name), "SERVICENAME": "N'MSSQLSERVER'",
                      "LANGUAGE": _nstr(self.options.get("LANGUAGE", "us_english")), "ERROR": "0",
                      "MAX_PRECISION": "38", "DATEFIRST": self.options.get("DATEFIRST", "7"),
                      "TEXTSIZE": self.options.get("TEXTSIZE", "-1"),
                      "LOCK_TIMEOUT": self.options.get("LOCK_TIMEOUT", "-1"),
                      "MICROSOFTVERSION": str(0x10000000 + 1000), "OPTIONS": str(self.user_options()),
                      "FETCH_STATUS": "-1",
                      "NESTLEVEL": "0"}
            if name not in values:
                raise SqlError(137, f'Must declare the scalar variable "@@{name}".', 15, 2)
            return values[name]
        if m.group("dbprop"):
            prop = m.group("dbprop_name").upper()
            return {"UPDATEABILITY": "N'READ_ONLY'" if self.lab.read_only else "N'READ_WRITE'",
                    "STATUS": "N'ONLINE'", "RECOVERY": "N'SIMPLE'", "USERACCESS": "N'MULTI_USER'",
                    "COLLATION": "N'SQL_Latin1_General_CP1_CI_AS'"}.get(prop, "NULL")
        if m.group("srvprop"):
            prop = m.group("srvprop_name").upper()
            return {"PRODUCTVERSION": _nstr(PRODUCT_VERSION), "PRODUCTLEVEL": "N'RTM'",
                    "PRODUCTMAJORVERSION": "N'16'", "PRODUCTMINORVERSION": "N'0'",
                    "EDITION": "N'Developer Edition (64-bit)'", "ENGINEEDITION": "3",
                    "SERVERNAME": _nstr(self.lab.server_name), "MACHINENAME": _nstr(self.lab.server_name),
                    "INSTANCENAME": "NULL", "ISCLUSTERED": "0", "ISHADRENABLED": "0",
                    "COLLATION": "N'SQL_Latin1_General_CP1_CI_AS'", "ISSINGLEUSER": "0",
                    "PROCESSID": str(os.getpid())}.get(prop, "NULL")
        func = m.group("func").split("(")[0].strip().upper()
        if func == "SCHEMA_NAME":
            return "N'dbo'"                  # the lab's one schema
        if func == "CONTEXT_INFO":
            return "NULL" if self.context_info is None else f"CAST(0x{self.context_info.hex()} AS VARBINARY(128))"
        if func == "DB_NAME":
            return _nstr(self.database)
        if func == "DB_ID":
            return self._db_id()
        if func == "SCOPE_IDENTITY":
            return "last_insert_rowid()"
        return _nstr(self.user)

    def _set(self, stmt: str) -> list:
        body = stmt[3:].strip().rstrip(";")
        if body.startswith("@"):
            raise SqlError(40517, "Variables are not supported by the multiproxy TDS lab server.", 15)
        upper = body.upper()
        if upper.startswith("CONTEXT_INFO"):
            value = body[len("CONTEXT_INFO"):].strip()
            if not re.fullmatch(r"0[xX][0-9A-Fa-f]{0,256}", value):
                raise SqlError(102, "SET CONTEXT_INFO takes a binary constant (0x...) in the lab server.", 15)
            self.context_info = bytes.fromhex(value[2:]) or None
            return [b"", 0, 0, 0]
        if upper.startswith("TRANSACTION ISOLATION LEVEL"):
            self.options["TRANSACTION ISOLATION LEVEL"] = " ".join(upper.split()[3:])
            return [b"", 0, 0, 0]
        match = re.match(r"((?:\w+\s*,\s*)*\w+)\s+(.+)$", body, re.S)
        if not match:
            raise SqlError(102, f"Incorrect syntax near '{body[:40]}'.", 15)
        value = match.group(2).strip()
        if len(value) > 1 and value[0] == "[" and value[-1] == "]":
            value = value[1:-1].replace("]]", "]")          # a bracketed name: SET LANGUAGE [British]
        else:
            value = value.strip("'").strip()
        tokens = b""
        for option in (o.strip().upper() for o in match.group(1).split(",")):
            old = self.options.get(option)
            self.options[option] = value.upper() if value.upper() in ("ON", "OFF") else value
            if option == "LANGUAGE" and old != value:
                tokens += tk.envchange(tk.ENV_LANGUAGE, value, old or "")
        return [tokens, 0, 0, 0]

    def user_options(self) -> int:
        """@@OPTIONS: a bit per ON/OFF option that is on."""
        return sum(bit for name, bit in OPTION_BITS.items() if self.options.get(name) == "ON")

    def _exec_dynamic(self, argument: str, params: dict | None) -> list:
        """EXEC ('...' [+ '...']): the string runs as a batch of its own; SET options it changes are undone when
        it ends, as SQL Server does at the end of a dynamic SQL scope (CONTEXT_INFO is session-wide and stays)."""
        inner = argument[1:-1].strip() if argument.endswith(")") else ""
        pieces = re.findall(r"[Nn]?'((?:[^']|'')*)'", inner)
        if not pieces or re.sub(r"[Nn]?'(?:[^']|'')*'|\+|\s", "", inner):
            raise SqlError(40517, "EXEC (...) takes string literals (joined with +) in the lab server.", 15)
        saved = dict(self.options)
        try:
            body, status = self.run_batch("".join(p.replace("''", "'") for p in pieces), params, in_proc=True)
        finally:
            self.options = saved
        return [body, status & tk.DONE_ERROR, tk.CURCMD_EXECUTE, 0]

    def use(self, database: str) -> bytes:
        if not self.lab.has_database(database):
            raise SqlError(911, f"Database '{database}' does not exist. Make sure that the name is entered "
                                "correctly.")
        self._attach(database)
        old, self.database = self.database, self.lab.canonical_name(database)
        return tk.envchange(tk.ENV_DATABASE, self.database, old) + \
            tk.info(5701, f"Changed database context to '{self.database}'.", 1, 0, self.lab.server_name)

    def _waitfor(self, stmt: str) -> None:
        match = re.match(r"WAITFOR\s+DELAY\s+N?'(\d+):(\d+)(?::(\d+(?:\.\d+)?))?'\s*;?$", stmt, re.I)
        if not match:
            raise SqlError(40517, "Only WAITFOR DELAY 'hh:mm[:ss[.mmm]]' is supported by the lab server.", 15)
        hours, minutes, seconds = match.groups()
        deadline = time.monotonic() + int(hours) * 3600 + int(minutes) * 60 + float(seconds or 0)
        while not self.cancelled:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            _sleep(min(left, 0.02))
        raise Cancelled()

    # -- RPC -----------------------------------------------------------------------------------------
    def run_rpc(self, call) -> bytes:
        """One RPC call: results (DONEINPROC), RETURNSTATUS, RETURNVALUEs for OUTPUT parameters, DONEPROC."""
        name = call.name.lower().split(".")[-1].strip("[]")
        params = call.params
        outputs: list[tuple[int, object]] = []
        status = 0
        try:
            if name == "sp_executesql":
                if not params:
                    raise SqlError(201, "Procedure or function 'sp_executesql' expects parameter '@statement', "
                                        "which was not supplied.")
                decl, values = "", params[1:]
                if len(params) > 1 and params[1].name.lower() in ("", "@params"):
                    decl, values = params[1].value or "", params[2:]
                body, status = self.run_batch(str(params[0].value or ""), self._bind(decl, values), True)
                outputs = [(i, p.value) for i, p in enumerate(params) if p.output]
            elif name == "sp_prepare":
                # @handle OUTPUT, @params, @stmt [, @options]: the handle comes back only for an OUTPUT parameter;
                # @options & 1 (RETURN_METADATA) describes the result set's columns (COLMETADATA, no rows)
                self._expect(name, params, 3)
                handle = self._prepare(params[1].value or "", params[2].value or "")
                outputs = [(0, handle)] if params[0].output else []
                options = params[3].value if len(params) > 3 else 0
                body = self._metadata(handle) if isinstance(options, int) and options & 1 else b""
            elif name == "sp_prepexec":
                self._expect(name, params, 3)
                handle = self._prepare(params[1].value or "", params[2].value or "")
                decl, sql = self.prepared[handle]
                body, status = self.run_batch(sql, self._bind_names(decl, params[3:]), True)
                outputs = ([(0, handle)] if params[0].output else []) + [
                    (i, p.value) for i, p in enumerate(params) if i >= 3 and p.output]
            elif name == "sp_execute":
                self._expect(name, params, 1)
                handle = params[0].value
                if handle not in self.prepared:
                    raise SqlError(8179, f"Could not find prepared statement with handle {handle}.")
                decl, sql = self.prepared[handle]
                body, status = self.run_batch(sql, self._bind_names(decl, params[1:]), True)
                outputs = [(i, p.value) for i, p in enumerate(params) if i >= 1 and p.output]
            elif name == "sp_unprepare":
                self._expect(name, params, 1)
                handle = params[0].value
                if handle not in self.prepared:
                    raise SqlError(8179, f"Could not find prepared statement with handle {handle}.")
                del self.prepared[handle]
                body = b""
            elif name == "sp_reset_connection":
                self.reset()
                body = b""
            else:
                raise SqlError(2812, f"Could not find stored procedure '{call.name}'.")
        except (IndexError, AttributeError):
            err = SqlError(201, f"Procedure or function '{name}' expects parameters which were not supplied.")
            return err.token(self.lab.server_name) + tk.done_proc(tk.DONE_ERROR)
        except SqlError as err:
            return err.token(self.lab.server_name) + tk.done_proc(tk.DONE_ERROR)
        out = bytearray(body) + tk.returnstatus(0)
        for ordinal, value in outputs:
            param = params[ordinal]
            out += tk.returnvalue(ordinal, param.name, param.type_info if value is None or ordinal else
                                  TypeInfo(tk.INTN, 4), value)
        return bytes(out) + tk.done_proc(status & tk.DONE_ERROR)

    @staticmethod
    def _expect(name: str, params, count: int) -> None:
        wanted = ("@handle", "@params", "@stmt")
        if len(params) < count:
            raise SqlError(201, f"Procedure or function '{name}' expects parameter '{wanted[len(params)]}', which "
                                "was not supplied.")

    def _metadata(self, handle: int) -> bytes:
        """COLMETADATA of a prepared SELECT's result (its parameters bound to NULL), as sp_prepare's
        RETURN_METADATA option gives it; nothing for other statements."""
        decl, sql = self.prepared[handle]
        statements = split_statements(sql)
        if len(statements) != 1 or statements[0].split(None, 1)[0].upper() not in ("SELECT", "WITH"):
            return b""
        try:
            text, _, names, _, _ = self._transpile(statements[0])
            cursor = self._execute(f"SELECT * FROM ({text}) LIMIT 0", {n: None for n in decl})
        except (SqlError, sqlite3.Error):
            return b""
        if not cursor.description:
            return b""
        if not names or len(names) != len(cursor.description):
            names = [d[0] for d in cursor.description]
        return tk.colmetadata(infer_columns(names, [])[0])

    def _prepare(self, decl: str, sql: str) -> int:
        handle = next(self._handles)
        self.prepared[handle] = (_declared_names(str(decl)), str(sql))
        return handle

    def _bind(self, decl: str, values) -> dict:
        return self._bind_names(_declared_names(str(decl)), values)

    @staticmethod
    def _bind_names(names: list[str], values) -> dict:
        bound = {}
        for index, param in enumerate(values):
            key = param.name.lstrip("@") if param.name else (names[index] if index < len(names) else f"p{index}")
            bound[key] = _sqlite_value(param.value)
        return bound


def _sqlite_value(value):
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (decimal.Decimal, uuid.UUID)):
        return str(value)
    if isinstance(value, datetime.datetime):
        return value.replace(tzinfo=None).isoformat(" ", "milliseconds")
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    return value


def _declared_names(decl: str) -> list[str]:
    return [m.group(1) for m in re.finditer(r"@(\w+)", re.sub(r"\([^)]*\)", "", decl))]


CATALOG_SCHEMAS = ("sys", "information_schema")
CATALOG_VIEWS = {"sys.objects", "sys.tables", "sys.views", "sys.schemas", "sys.system_views", "sys.dm_exec_sessions",
                 "information_schema.tables"}
SCHEMAS = ((1, "dbo"), (2, "guest"), (3, "INFORMATION_SCHEMA"), (4, "sys"))
ISOLATION_LEVELS = {"READ UNCOMMITTED": 1, "READ COMMITTED": 2, "REPEATABLE READ": 3, "SERIALIZABLE": 4,
                    "SNAPSHOT": 5}


def object_id_of(name) -> int | None:
    """The lab's object_id of a table or view: a stable number from its name (SQLite keeps no ids)."""
    if name is None:
        return None
    return 1000 + zlib.crc32(str(name).lower().encode()) % 2_000_000_000


def object_name_part(qualified) -> str | None:
    """The object's own name out of a qualified one: 'tempdb..[#t]' -> '#t', 'dbo.users' -> 'users'."""
    if qualified is None:
        return None
    parts = re.findall(r"\[(?:[^\]]|\]\])*\]|\"(?:[^\"]|\"\")*\"|[^.]+", str(qualified))
    if not parts:
        return None
    last = parts[-1].strip()
    if last[:1] == "[" and last[-1:] == "]":
        return last[1:-1].replace("]]", "]")
    if last[:1] == '"' and last[-1:] == '"':
        return last[1:-1].replace('""', '"')
    return last


def _sqlite_str(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _subquery(sql: str, alias: str) -> exp.Expression:
    return sqlglot.parse_one(sql, read="sqlite").subquery(alias)


def _values_column_aliases(expression: exp.Expression) -> None:
    """(VALUES ...) AS t(a, b): SQLite names a VALUES table's columns column1, column2, ...; select them as a, b."""
    for values in list(expression.find_all(exp.Values)):
        alias = values.args.get("alias")
        if not isinstance(alias, exp.TableAlias) or not alias.columns:
            continue
        inner = values.copy()
        inner.set("alias", None)
        select = exp.select(*(exp.alias_(exp.column(f"column{i + 1}"), name.name, quoted=True)
                              for i, name in enumerate(alias.columns))).from_(exp.Subquery(this=inner))
        values.replace(select.subquery(alias.name))


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _map_error(exc: sqlite3.Error) -> SqlError:
    text = str(exc)
    if m := re.match(r"no such table: (?:\w+\.)?(.+)", text):
        return SqlError(208, f"Invalid object name '{m.group(1)}'.")
    if m := re.match(r"no such column: (.+)", text):
        return SqlError(207, f"Invalid column name '{m.group(1)}'.")
    if m := re.match(r"table (.+) already exists", text):
        return SqlError(2714, f"There is already an object named '{m.group(1).strip(chr(34))}' in the database.")
    if text.startswith("UNIQUE constraint failed"):
        return SqlError(2627, f"Violation of PRIMARY KEY or UNIQUE constraint ({text}). Cannot insert duplicate "
                              "key.", 14)
    if text.startswith("FOREIGN KEY constraint failed"):
        return SqlError(547, "The statement conflicted with a FOREIGN KEY constraint (a referenced row is missing "
                             "or a referencing row still exists).")
    if text.startswith("NOT NULL constraint failed"):
        return SqlError(515, f"Cannot insert the value NULL into a column that does not allow nulls ({text}).")
    if "database is locked" in text or "database table is locked" in text:
        return SqlError(1222, "Lock request time out period exceeded (another session holds the lab "
                              "database's write lock).")
    if "syntax error" in text:
        return SqlError(102, f"Incorrect syntax ({text}).", 15)
    if "readonly" in text:
        return SqlError(3906, "Failed to update database because the database is read-only.")
    return SqlError(50000, f"SQLite: {text}")


class LabDatabases:
    """The databases of one lab server instance: master plus any created, one SQLite file each."""

    def __init__(self, directory: str, master_path: str | None, server_name: str, read_only: bool = False):
        self.directory = directory
        self.master_path = master_path or os.path.join(directory, "master.sqlite")
        self.server_name = server_name
        self.read_only = read_only
        # What sys.dm_hadr_database_replica_states reports while read-only (a secondary): lag in whole seconds
        # (None: NULL, unknown) and the redo queue in KB. See SqlSession._replica_states.
        self.replica_lag: int | None = 0
        self.redo_queue_kb: int | None = 0
        self._names = {"master": "master"}
        self._lock = threading.Lock()
        for entry in os.listdir(directory):
            if entry.startswith("db_") and entry.endswith(".sqlite"):
                name = entry[3:-7]
                self._names[name.lower()] = name

    def path_for(self, name: str) -> str:
        if name.lower() == "master":
            return self.master_path
        return os.path.join(self.directory, f"db_{name.lower()}.sqlite")

    def has_database(self, name: str) -> bool:
        return name.lower() in self._names

    def canonical_name(self, name: str) -> str:
        return self._names.get(name.lower(), name)

    def create_database(self, name: str) -> None:
        if not re.fullmatch(r"[A-Za-z_][\w]{0,100}", name):
            raise SqlError(102, f"Incorrect database name '{name}' (letters, digits and _ only in the lab).", 15)
        with self._lock:
            if name.lower() in self._names:
                raise SqlError(1801, f"Database '{name}' already exists. Choose a different database name.")
            sqlite3.connect(self.path_for(name)).close()
            self._names[name.lower()] = name


