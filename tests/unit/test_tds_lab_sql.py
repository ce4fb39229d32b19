"""The lab server's T-SQL front end: statement splitting, result type inference, and what ORMs send (on SQLite)."""
import datetime
import decimal

import pytest

from multiproxy.lab.tds_sql import (BigInt, LabDatabases, SqlSession, VarChar, infer_columns, object_name_part,
                                   split_statements)
from multiproxy_engines.tds.wire import token_stream as tk


@pytest.mark.parametrize("batch,expected", [
    ("SET NOCOUNT ON\nSET ANSI_NULLS ON\nSELECT 1", ["SET NOCOUNT ON", "SET ANSI_NULLS ON", "SELECT 1"]),
    ("BEGIN TRAN INSERT INTO t VALUES (1) COMMIT TRAN", ["BEGIN TRAN", "INSERT INTO t VALUES (1)", "COMMIT TRAN"]),
    ("UPDATE t SET a = 1 WHERE b = 2 SELECT @@ROWCOUNT", ["UPDATE t SET a = 1 WHERE b = 2", "SELECT @@ROWCOUNT"]),
    ("INSERT INTO t SELECT * FROM u; SELECT 2", ["INSERT INTO t SELECT * FROM u", "SELECT 2"]),
    ("WITH c AS (SELECT 1 AS x) SELECT * FROM c", ["WITH c AS (SELECT 1 AS x) SELECT * FROM c"]),
    ("SELECT 1 UNION ALL SELECT 2", ["SELECT 1 UNION ALL SELECT 2"]),
    ("SELECT 'SELECT; BEGIN' -- COMMIT\n/* ROLLBACK */ SELECT 2", ["SELECT 'SELECT; BEGIN' -- COMMIT\n/* ROLLBACK */",
                                                                   "SELECT 2"]),
    ("DROP TABLE IF EXISTS #t CREATE TABLE #t (x INT)", ["DROP TABLE IF EXISTS #t", "CREATE TABLE #t (x INT)"]),
    ("IF @@TRANCOUNT > 0 COMMIT TRAN", ["IF @@TRANCOUNT > 0", "COMMIT TRAN"]),
    ("SELECT * FROM t WITH (NOLOCK) WHERE x IN (SELECT y FROM u)",
     ["SELECT * FROM t WITH (NOLOCK) WHERE x IN (SELECT y FROM u)"]),
    ("", []),
])
def test_split_statements(batch, expected):
    assert split_statements(batch) == expected


def test_infer_columns_types_and_nulls():
    rows = [(1, BigInt(2), True, 1.5, decimal.Decimal("1.25"), "é", VarChar("a"), b"\x01",
             datetime.datetime(2020, 1, 1), None),
            (2 ** 40, None, None, 2, decimal.Decimal("3"), None, None, None, None, None)]
    columns, out = infer_columns([str(i) for i in range(10)], rows)
    types = [(c.type_info.type, c.type_info.size) for c in columns]
    assert types[:4] == [(tk.INTN, 8), (tk.INTN, 8), (tk.BITN, 1), (tk.FLTN, 8)]
    assert columns[4].type_info.type == tk.DECIMALN and columns[4].type_info.scale == 2
    assert [t for t, _ in types[5:]] == [tk.NVARCHAR, tk.BIGVARCHAR, tk.BIGVARBINARY, tk.DATETIMN, tk.INTN]
    assert out[1][3] == 2.0
    assert tk.row(columns, out[0]) and tk.row(columns, out[1])


# -- what ORMs send: catalog views, OBJECT_ID(), OUTPUT, NVARCHAR(max), FOREIGN KEY (a real SQLite file each) ----
@pytest.fixture()
def session(tmp_path):
    lab = LabDatabases(str(tmp_path), None, "unit")
    lab.create_database("app")
    sql = SqlSession(lab, 51, "sa", "app")
    yield sql
    sql.close()


def run(sql: SqlSession, batch: str) -> tuple[list[list], list[str]]:
    """(rows, error texts) of a batch."""
    body, _ = sql.run_batch(batch)
    toks = tk.TokenReader().read(body)
    return ([t.values for t in toks if t.type == tk.TOKEN_ROW],
            [f"{t.number}: {t.text}" for t in toks if t.type == tk.TOKEN_ERROR])


def test_create_table_with_nvarchar_max_identity_and_foreign_key(session):
    assert run(session, "CREATE TABLE parent (id INT IDENTITY(1,1) NOT NULL, note NVARCHAR(max) NULL, PRIMARY KEY (id))"
                        " CREATE TABLE child (id INT IDENTITY(1,1) NOT NULL, parent_id INT NOT NULL, PRIMARY KEY (id),"
                        " FOREIGN KEY(parent_id) REFERENCES parent (id))") == ([], [])
    assert run(session, "INSERT INTO parent (note) OUTPUT inserted.id VALUES (N'a')") == ([[1]], [])
    assert run(session, "INSERT INTO parent (note) OUTPUT inserted.* VALUES (N'b')") == ([[2, "b"]], [])
    rows, errors = run(session, "INSERT INTO child (parent_id) OUTPUT inserted.id, inserted.parent_id AS p "
                                "SELECT p0 FROM (VALUES (2, 0), (1, 1)) AS imp_sen(p0, sen_counter) "
                                "ORDER BY sen_counter")
    assert (rows, errors) == ([[1, 2], [2, 1]], [])
    rows, errors = run(session, "INSERT INTO child (parent_id) VALUES (99)")
    assert errors and errors[0].startswith("547:")
    rows, errors = run(session, "DROP TABLE parent")              # still referenced by child's rows
    assert errors and errors[0].startswith("547:")
    assert run(session, "UPDATE parent SET note = N'c' OUTPUT inserted.note WHERE id = 1") == ([["c"]], [])
    _, errors = run(session, "UPDATE parent SET note = N'c' OUTPUT deleted.note")
    assert errors and errors[0].startswith("40517:")


def test_catalog_views_and_object_id(session):
    run(session, "CREATE TABLE users (id INT) CREATE TABLE #scratch (x INT)")
    assert run(session, "SELECT sys.objects.name, sys.objects.type FROM sys.objects JOIN sys.schemas "
                        "ON sys.objects.schema_id = sys.schemas.schema_id WHERE sys.schemas.name = 'dbo'")[0] == \
        [["users", "U"]]
    object_id = run(session, "SELECT OBJECT_ID('dbo.[users]', 'U')")[0][0][0]
    assert object_id > 0 and run(session, "SELECT object_id FROM sys.tables WHERE name = 'users'")[0] == [[object_id]]
    assert run(session, "SELECT OBJECT_ID('users', 'V'), OBJECT_ID('nope')")[0] == [[None, None]]
    assert run(session, "SELECT s.name, o.name FROM tempdb.sys.objects AS o JOIN tempdb.sys.schemas AS s "
                        "ON s.schema_id = o.schema_id WHERE o.object_id = OBJECT_ID('tempdb..[#scratch]', 'U')")[0] \
        == [["dbo", "#scratch"]]
    tables = "SELECT TABLE_CATALOG, TABLE_SCHEMA, TABLE_NAME, TABLE_TYPE FROM INFORMATION_SCHEMA.TABLES"
    assert run(session, tables)[0] == [["app", "dbo", "users", "BASE TABLE"]]
    assert run(session, "SELECT name FROM sys.system_views WHERE name IN ('dm_exec_sessions', 'x')")[0] == \
        [["dm_exec_sessions"]]
    session.options["TRANSACTION ISOLATION LEVEL"] = "SERIALIZABLE"
    assert run(session, "SELECT transaction_isolation_level FROM sys.dm_exec_sessions WHERE session_id = @@SPID")[0] \
        == [[4]]
    assert run(session, "SELECT 1 FROM fn_listextendedproperty(default, default, default, default, default, "
                        "default, default)") == ([], [])
    assert run(session, "SELECT schema_name(), CAST(N'x' AS NVARCHAR(max))")[0] == [["dbo", "x"]]
    _, errors = run(session, "SELECT * FROM sys.columns")
    assert errors and errors[0].startswith("208:") and "sys.objects" in errors[0]


def test_object_name_part():
    assert [object_name_part(n) for n in ("tempdb..[#t]", "dbo.users", "[a.b]", '"q"', "plain", None)] == \
        ["#t", "users", "a.b", "q", "plain", None]


def _rpc(proc, *params):
    from multiproxy_engines.tds.wire import messages as tp
    return tp.RpcCall(proc_id=proc, params=list(params)) if isinstance(proc, int) else \
        tp.RpcCall(proc_name=proc, params=list(params))


def _tokens(body: bytes) -> list:
    return tk.TokenReader().read(body)


def test_prepare_family_as_sql_server_answers_it(session):
    """By id and by name; the handle comes back only for an OUTPUT parameter; RETURN_METADATA describes the
    columns; unknown handles are error 8179 for sp_execute and sp_unprepare alike; a reset drops the handles."""
    from multiproxy_engines.tds.wire import messages as tp
    int4, nv = tk.TypeInfo(tk.INTN, 4), tk.TypeInfo(tk.NVARCHAR, 4000)
    out = tp.PARAM_BY_REF

    def handle_of(toks):
        return [t.value for t in toks if t.type == tk.TOKEN_RETURNVALUE]

    toks = _tokens(session.run_rpc(_rpc("[sys].[sp_prepare]", tp.RpcParam("@handle", int4, None, out),
                                        tp.RpcParam("@params", nv, "@a int"), tp.RpcParam("@stmt", nv,
                                                                                           "SELECT @a + 1 AS n"),
                                        tp.RpcParam("@options", int4, 1))))
    assert [t.type for t in toks] == [tk.TOKEN_COLMETADATA, tk.TOKEN_RETURNSTATUS, tk.TOKEN_RETURNVALUE,
                                      tk.TOKEN_DONEPROC]
    assert [c.name for c in toks[0].columns] == ["n"]
    handle = handle_of(toks)[0]
    toks = _tokens(session.run_rpc(_rpc(tp.SP_PREPARE, tp.RpcParam("@handle", int4, None),
                                        tp.RpcParam("@params", nv, None), tp.RpcParam("@stmt", nv, "SELECT 2"))))
    assert handle_of(toks) == []                              # not OUTPUT: no RETURNVALUE
    toks = _tokens(session.run_rpc(_rpc("sp_execute", tp.RpcParam("", int4, handle), tp.RpcParam("", int4, 4))))
    assert [t.values for t in toks if t.type == tk.TOKEN_ROW] == [[5]]
    toks = _tokens(session.run_rpc(_rpc(tp.SP_UNPREPARE, tp.RpcParam("", int4, 999))))
    assert [t.number for t in toks if t.type == tk.TOKEN_ERROR] == [8179]
    toks = _tokens(session.run_rpc(_rpc(tp.SP_PREPEXEC, tp.RpcParam("@h", int4, None, out),
                                        tp.RpcParam("", nv, "@a int"), tp.RpcParam("", nv, "SELECT @a * 2"),
                                        tp.RpcParam("@a", int4, 21))))
    assert [t.values for t in toks if t.type == tk.TOKEN_ROW] == [[42]] and len(handle_of(toks)) == 1
    session.reset()
    toks = _tokens(session.run_rpc(_rpc(tp.SP_EXECUTE, tp.RpcParam("", int4, handle), tp.RpcParam("", int4, 4))))
    assert [t.number for t in toks if t.type == tk.TOKEN_ERROR] == [8179]
    toks = _tokens(session.run_rpc(_rpc(tp.SP_PREPARE, tp.RpcParam("@handle", int4, None, out))))
    assert [t.number for t in toks if t.type == tk.TOKEN_ERROR] == [201]
