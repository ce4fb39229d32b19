"""Role probes read their results from the server's bytes: the result contract (role, lag, lag_bytes, skip) for
PostgreSQL, MySQL/MariaDB and TDS, fed whole and byte by byte."""
from __future__ import annotations

import struct

import pytest

from multiproxy_engines.mysql import protocol as mp
from multiproxy_engines.mysql.backend import MySQLProbe, replica_status_query
from multiproxy_engines.postgres import protocol as pp
from multiproxy_engines.postgres.backend import PostgresProbe
from multiproxy_engines.tds.backend import TDSProbe
from multiproxy.engine import BackendError, BackendTarget
from multiproxy_engines.tds.wire import messages as tp
from multiproxy_engines.tds.wire import token_stream as tk

WRITER = {"role": "writer", "lag": 0.0, "lag_bytes": 0, "skip": None}


def feed_all(script, replies: list[bytes], bytewise: bool) -> list[bytes]:
    """Feed each reply (whole or one byte at a time); returns what the script sent after start()."""
    sent = []
    for reply in replies:
        chunks = [reply[i:i + 1] for i in range(len(reply))] if bytewise else [reply]
        for chunk in chunks:
            out = script.feed(chunk)
            if out:
                sent.append(out)
    return sent


# ---------------------------------------------------------------- PostgreSQL

def pg_row(*values: str | None) -> bytes:
    body = struct.pack("!H", len(values))
    for value in values:
        body += struct.pack("!i", -1) if value is None else struct.pack("!I", len(value)) + value.encode()
    return pp.message(b"D", body)


def pg_probe(row: bytes, bytewise: bool = False) -> dict:
    probe = PostgresProbe(BackendTarget(host="db", port=5432, user="probe", database="postgres", password=None,
                                        tls="disable"))
    probe.start()
    login = pp.authentication(pp.AUTH_OK) + pp.backend_key_data(1, 2) + pp.ready_for_query()
    columns = pp.message(b"T", struct.pack("!H", 4) + b"".join(
        pp.cstring(name) + struct.pack("!IHIhiH", 0, 0, 25, -1, -1, 0) for name in "abcd"))
    answer = columns + row + pp.message(b"C", pp.cstring("SELECT 1")) + pp.ready_for_query()
    sent = feed_all(probe, [login, answer], bytewise)
    assert sent[0] == pp.query(PostgresProbe.SQL)
    assert sent[-1] == pp.message(b"X") and probe.done
    return probe.result


@pytest.mark.parametrize("bytewise", [False, True])
@pytest.mark.parametrize("row, expected", [
    (("f", "f", "0", "0"), WRITER),
    # default_transaction_read_only = on outside recovery: no writer, and no reader either (replicates nothing)
    (("t", "f", "0", "0"), {"role": "reader", "lag": None, "lag_bytes": None,
                            "skip": "read-only (default_transaction_read_only) but not a standby: it replicates "
                                    "from nothing"}),
    # a standby that replayed all it received: lag 0 however old its last transaction
    (("t", "t", "0", "0"), {"role": "reader", "lag": 0.0, "lag_bytes": 0, "skip": None}),
    # replay paused or slow: the replay delay and the WAL received but not replayed
    (("t", "t", "4.250000", "16384"), {"role": "reader", "lag": 4.25, "lag_bytes": 16384, "skip": None}),
    # never streamed (restored from the archive): the replay delay, bytes unknown
    (("t", "t", "12.5", None), {"role": "reader", "lag": 12.5, "lag_bytes": None, "skip": None}),
    # behind, with no replayed transaction to date the delay: unknown
    (("t", "t", None, "100"), {"role": "reader", "lag": None, "lag_bytes": 100, "skip": None}),
])
def test_postgres_probe_result(row, expected, bytewise):
    assert pg_probe(pg_row(*row), bytewise) == expected


def test_postgres_probe_sql_compares_receive_and_replay_positions():
    sql = PostgresProbe.SQL
    assert sql.count(";") == 0           # one statement
    for part in ("pg_last_wal_receive_lsn()", "pg_last_wal_replay_lsn()", "pg_wal_lsn_diff(s.recv, s.rep)",
                 "pg_last_xact_replay_timestamp()", "default_transaction_read_only", "s.recv <= s.rep"):
        assert part in sql


def test_postgres_probe_refuses_an_answer_it_cannot_read():
    with pytest.raises(BackendError):
        pg_probe(pg_row("t", "f", "0"))
    with pytest.raises(BackendError):
        pg_probe(pg_row("t", "t", "soon", "0"))


# ---------------------------------------------------------------- MySQL / MariaDB

def my_resultset(names: list[str], rows: list[list[str | None]]) -> bytes:
    out = [mp.packet(1, mp.lenenc_int(len(names)))]
    seq = 2
    for name in names:
        payload = (mp.lenenc_str(b"def") + mp.lenenc_str(b"") * 3 + mp.lenenc_str(name.encode()) + mp.lenenc_str(b"")
                   + b"\x0c\x21\x00\x00\x01\x00\x00\xfd\x00\x00\x00\x00\x00")
        out.append(mp.packet(seq, payload))
        seq += 1
    out.append(mp.packet(seq, mp.eof_payload(mp.SERVER_STATUS_AUTOCOMMIT)))
    seq += 1
    for row in rows:
        out.append(mp.packet(seq, b"".join(b"\xfb" if v is None else mp.lenenc_str(v.encode()) for v in row)))
        seq += 1
    out.append(mp.packet(seq, mp.eof_payload(mp.SERVER_STATUS_AUTOCOMMIT)))
    return b"".join(out)


def my_probe(flags: tuple[str, str], status: bytes, version: bytes = b"10.11.6-MariaDB",
             bytewise: bool = False) -> tuple[dict, list[bytes]]:
    probe = MySQLProbe(BackendTarget(host="db", port=3306, user="probe", database="", password="pw", tls="disable"))
    assert probe.start() == b""
    greeting = mp.handshake_v10(version, 7, b"abcdefghijklmnopqrst", 0xFFFFFFFF & ~mp.CLIENT_SSL, 45,
                                mp.SERVER_STATUS_AUTOCOMMIT, b"mysql_native_password")
    sent = feed_all(probe, [mp.packet(0, greeting), mp.packet(2, mp.ok_payload(mp.SERVER_STATUS_AUTOCOMMIT)),
                            my_resultset(["@@global.read_only", "@@global.innodb_read_only"], [list(flags)]),
                            status], bytewise)
    assert probe.done
    return probe.result, sent


MARIADB_COLUMNS = ["Slave_IO_State", "Master_Host", "Master_Log_File", "Read_Master_Log_Pos", "Relay_Log_File",
                   "Relay_Master_Log_File", "Slave_IO_Running", "Slave_SQL_Running", "Last_Error",
                   "Exec_Master_Log_Pos", "Seconds_Behind_Master", "Last_IO_Error", "Last_SQL_Error"]
MYSQL8_COLUMNS = ["Replica_IO_State", "Source_Host", "Source_Log_File", "Read_Source_Log_Pos", "Relay_Log_File",
                  "Relay_Source_Log_File", "Replica_IO_Running", "Replica_SQL_Running", "Last_Error",
                  "Exec_Source_Log_Pos", "Seconds_Behind_Source", "Last_IO_Error", "Last_SQL_Error"]


def replica_row(io="Yes", sql="Yes", seconds="0", read_pos="1000", exec_pos="1000", exec_file="bin.000002",
                io_error="", sql_error=""):
    return ["Waiting for master", "10.0.0.1", "bin.000002", read_pos, "relay.000003", exec_file, io, sql,
            sql_error, exec_pos, seconds, io_error, sql_error]


@pytest.mark.parametrize("bytewise", [False, True])
def test_mysql_running_replica_reports_seconds_behind_and_relay_backlog(bytewise):
    result, sent = my_probe(("1", "0"), my_resultset(MARIADB_COLUMNS, [replica_row(seconds="3", exec_pos="400")]),
                            bytewise=bytewise)
    assert result == {"role": "reader", "lag": 3.0, "lag_bytes": 600, "skip": None}
    assert mp.packet(0, b"\x03SHOW REPLICA STATUS") in sent
    assert sent[-1] == mp.packet(0, b"\x01")                     # COM_QUIT


def test_mysql_caught_up_replica_and_mysql8_column_names():
    result, _ = my_probe(("1", "0"), my_resultset(MYSQL8_COLUMNS, [replica_row()]), version=b"8.0.36")
    assert result == {"role": "reader", "lag": 0.0, "lag_bytes": 0, "skip": None}
    # positions in different source log files: the backlog is not simply known
    result, _ = my_probe(("1", "0"), my_resultset(MARIADB_COLUMNS, [replica_row(exec_file="bin.000001")]))
    assert result == {"role": "reader", "lag": 0.0, "lag_bytes": None, "skip": None}


def test_mysql_stopped_replication_is_skipped_with_the_reason():
    result, _ = my_probe(("1", "0"), my_resultset(MARIADB_COLUMNS, [replica_row(io="No", seconds=None)]))
    assert result["role"] == "reader" and result["lag"] is None
    assert result["skip"] == "replication is stopped (Slave_IO_Running = No, Slave_SQL_Running = Yes)"
    error = "Error 'Duplicate entry '1' for key 'PRIMARY'' on query. Default database: 'd'. " + "x" * 300
    result, _ = my_probe(("1", "0"), my_resultset(MYSQL8_COLUMNS, [replica_row(sql="No", seconds=None,
                                                                               sql_error=error)]),
                         version=b"8.0.36")
    assert result["lag"] is None
    assert result["skip"].startswith("replication is stopped (Replica_IO_Running = Yes, Replica_SQL_Running = No); "
                                     "Last_SQL_Error: Error 'Duplicate entry")
    assert len(result["skip"]) < 260 and result["skip"].endswith("...")
    result, _ = my_probe(("1", "0"), my_resultset(MARIADB_COLUMNS, [
        replica_row(io="Connecting", seconds=None, io_error="error reconnecting to master 'repl@10.0.0.1:3306'")]))
    assert result["skip"] == ("replication is not running (Slave_IO_Running = Connecting, Slave_SQL_Running = Yes); "
                              "Last_IO_Error: error reconnecting to master 'repl@10.0.0.1:3306'")


def test_mysql_unknown_seconds_behind_is_skipped():
    result, _ = my_probe(("1", "0"), my_resultset(MARIADB_COLUMNS, [replica_row(seconds=None)]))
    assert result == {"role": "reader", "lag": None, "lag_bytes": 0,
                      "skip": "replication lag is unknown (Seconds_Behind_Master = NULL)"}


def test_mysql_standalone_nodes():
    no_rows = my_resultset(MARIADB_COLUMNS, [])
    assert my_probe(("0", "0"), no_rows)[0] == WRITER
    # read-only without replication (a demoted primary, one being rebuilt): no writer, and no reader either
    assert my_probe(("1", "0"), no_rows)[0] == {"role": "reader", "lag": None, "lag_bytes": None,
                                                "skip": "read-only but not replicating (no replica status)"}
    assert my_probe(("0", "1"), no_rows)[0]["role"] == "reader"        # innodb_read_only
    denied = mp.packet(1, mp.err_payload(1227, "42000", "Access denied; you need the REPLICA MONITOR privilege"))
    assert my_probe(("0", "0"), denied)[0] == WRITER
    assert my_probe(("1", "0"), denied)[0] == {"role": "reader", "lag": None, "lag_bytes": None, "skip": None}


def test_mysql_replica_status_statement_by_version():
    assert replica_status_query(b"10.4.32-MariaDB") == "SHOW SLAVE STATUS"
    assert replica_status_query(b"5.5.5-10.11.6-MariaDB-0+deb12u1") == "SHOW SLAVE STATUS"   # still understood
    assert replica_status_query(b"10.5.0-MariaDB") == "SHOW REPLICA STATUS"
    assert replica_status_query(b"5.7.44-log") == "SHOW SLAVE STATUS"
    assert replica_status_query(b"8.0.21") == "SHOW SLAVE STATUS"
    assert replica_status_query(b"8.0.22") == "SHOW REPLICA STATUS"
    assert replica_status_query(b"8.4.0") == "SHOW REPLICA STATUS"


# ---------------------------------------------------------------- TDS

def tds_message(payload: bytes) -> bytes:
    return tp.encode_message(tp.TABULAR_RESULT, payload, 4096)


def tds_select(columns: list[tk.Column], rows: list[list]) -> bytes:
    return tds_message(tk.colmetadata(columns) + b"".join(tk.row(columns, r) for r in rows)
                       + tk.done(tk.DONE_COUNT, tk.CURCMD_SELECT, len(rows)))


UPDATEABILITY = [tk.Column("", tk.TypeInfo(tk.NVARCHAR, 256))]
LAG_COLUMNS = [tk.Column("", tk.TypeInfo(tk.INTN, 4)), tk.Column("", tk.TypeInfo(tk.INTN, 8)),
               tk.Column("", tk.TypeInfo(tk.INTN, 8)), tk.Column("", tk.TypeInfo(tk.INTN, 4))]


def tds_probe(replies: list[bytes], bytewise: bool = False) -> tuple[dict, list[str]]:
    probe = TDSProbe(BackendTarget(host="db", port=1433, user="probe", database="master", password="pw",
                                   tls="disable"))
    probe.start()
    prelogin = tp.encode_message(tp.TABULAR_RESULT, tp.Prelogin.build(encryption=tp.ENCRYPT_NOT_SUP).encode())
    login = tds_message(tk.loginack() + tk.envchange(tk.ENV_PACKETSIZE, "4096", "4096") + tk.done())
    sent = feed_all(probe, [prelogin, login, *replies], bytewise)
    assert probe.done
    batches = [tp.SqlBatch.decode(m.data).text for out in sent for m in tp.MessageReader().feed(out)
               if m.type == tp.SQL_BATCH]
    return probe.result, batches


@pytest.mark.parametrize("bytewise", [False, True])
def test_tds_writer_is_not_asked_for_lag(bytewise):
    result, batches = tds_probe([tds_select(UPDATEABILITY, [["READ_WRITE"]])], bytewise)
    assert result == WRITER and batches == [TDSProbe.SQL]


@pytest.mark.parametrize("bytewise", [False, True])
@pytest.mark.parametrize("rows, expected", [
    ([[0, None, None, None]], {"lag": 0.0, "lag_bytes": 0}),   # no local secondary database
    ([], {"lag": 0.0, "lag_bytes": 0}),
    ([[2, 7, 300, 0]], {"lag": 7.0, "lag_bytes": 300 * 1024}),
    ([[2, 7, 300, 1]], {"lag": None, "lag_bytes": 300 * 1024}),  # one database's lag unknown
    ([[1, None, None, 1]], {"lag": None, "lag_bytes": None}),
])
def test_tds_reader_lag_from_the_replica_states_view(rows, expected, bytewise):
    result, batches = tds_probe([tds_select(UPDATEABILITY, [["READ_ONLY"]]), tds_select(LAG_COLUMNS, rows)],
                                bytewise)
    assert result == {"role": "reader", "skip": None, **expected}
    assert batches == [TDSProbe.SQL, TDSProbe.LAG_SQL]
    assert "sys.dm_hadr_database_replica_states WHERE is_local = 1 AND is_primary_replica = 0" in TDSProbe.LAG_SQL


def test_tds_reader_whose_lag_cannot_be_read_has_unknown_lag():
    denied = tds_message(tk.error(300, "VIEW SERVER STATE permission was denied on object 'server', database "
                                       "'master'.", 1, 14, "sql1") + tk.done(tk.DONE_ERROR))
    result, _ = tds_probe([tds_select(UPDATEABILITY, [["READ_ONLY"]]), denied])
    assert result == {"role": "reader", "lag": None, "lag_bytes": None, "skip": None}


def test_tds_role_error_fails_the_probe():
    failed = tds_message(tk.error(208, "Invalid object name.", 1, 16, "sql1") + tk.done(tk.DONE_ERROR))
    with pytest.raises(BackendError):
        tds_probe([failed])
