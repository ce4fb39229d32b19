"""The lab server's T-SQL front end: statement splitting without semicolons and result type inference."""
import datetime
import decimal

import pytest

from multiproxy.lab.tds_sql import BigInt, VarChar, infer_columns, split_statements
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
