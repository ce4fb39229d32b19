"""The TDS lab server with real clients directly (tsql, pymssql, python-tds) and a raw TDS client of ours."""
import datetime
import decimal
import os
import signal
import socket
import subprocess
import time
import uuid

import pytest

from multiproxy_engines.tds.wire import messages as tp
from multiproxy_engines.tds.wire import token_stream as tk

from .tdskit import LAB_PASSWORD, LAB_USER, LabProcess, pymssql_refusal
from .tdskit import RawClient as TdsRawClient

pymssql = pytest.importorskip("pymssql")
pytds = pytest.importorskip("pytds")

pytestmark = pytest.mark.tds
USER, PASSWORD = LAB_USER, LAB_PASSWORD


def RawClient(port, packet_size=4096):
    """A raw client logged in as the lab server's own user."""
    return TdsRawClient(port, packet_size, require_loginack=True)


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    server = LabProcess(tmp_path_factory.mktemp("tdslab"))
    yield server
    server.stop()


def ms(lab, autocommit=True, **kw):
    return pymssql.connect(server="127.0.0.1", port=lab.port, user=USER, password=PASSWORD, autocommit=autocommit,
                           tds_version="7.4", **kw)


def td(lab, autocommit=True, **kw):
    return pytds.connect("127.0.0.1", port=lab.port, user=USER, password=PASSWORD, autocommit=autocommit, **kw)


def errors(toks):
    return [(t.number, t.text) for t in toks if t.type == tk.TOKEN_ERROR]


def test_tsql_freetds(lab):
    script = ("select 1 as one, N'h\u00e9' as word, CAST(NULL AS INT) as nothing\ngo\n"
              "select DB_NAME() as db, @@TRANCOUNT as tc\ngo\nexit\n")
    out = subprocess.run(["tsql", "-H", "127.0.0.1", "-p", str(lab.port), "-U", USER, "-P", PASSWORD],
                         input=script, capture_output=True, text=True, timeout=30,
                         env=dict(os.environ, TDSVER="7.4"))
    assert "one\tword\tnothing" in out.stdout and "1\th\u00e9\tNULL" in out.stdout, out.stdout + out.stderr
    assert "master\t0" in out.stdout


def test_pymssql_types_and_nulls(lab):
    with ms(lab) as conn:
        cur = conn.cursor()
        cur.execute("CREATE TABLE typed (id INT PRIMARY KEY, big BIGINT, flag BIT, ratio FLOAT, price DECIMAL(10,2), "
                    "name NVARCHAR(50), code VARCHAR(10), blob VARBINARY(20), at DATETIME)")
        cur.execute("INSERT INTO typed VALUES (1, 5000000000, 1, 0.5, 12.25, N'\u00fcber', 'abc', 0x0102, "
                    "'2024-03-04 05:06:07.123')")
        cur.execute("INSERT INTO typed (id) VALUES (2)")
        assert cur.rowcount == 1
        cur.execute("SELECT id, big, flag, ratio, price, name, code, blob, at FROM typed ORDER BY id")
        rows = cur.fetchall()
        assert rows[0] == (1, 5000000000, True, 0.5, decimal.Decimal("12.25"), "\u00fcber", "abc", b"\x01\x02",
                           datetime.datetime(2024, 3, 4, 5, 6, 7, 123000))
        assert rows[1] == (2,) + (None,) * 8
        cur.execute("SELECT @@VERSION, SERVERPROPERTY('ProductVersion'), @@SPID")
        version, product, spid = cur.fetchone()
        assert version.startswith("Microsoft SQL Server") and product.startswith("16.") and spid >= 51


def test_pymssql_autocommit_off_begins_at_connect_and_isolates(lab):
    with ms(lab) as setup:
        setup.cursor().execute("CREATE TABLE acct (id INT PRIMARY KEY, amount INT)")
    writer, reader = ms(lab, autocommit=False), ms(lab)
    try:
        wc, rc = writer.cursor(), reader.cursor()
        wc.execute("SELECT @@TRANCOUNT")
        assert wc.fetchone()[0] == 1  # pymssql sent BEGIN TRAN at connect
        wc.execute("INSERT INTO acct VALUES (1, 10)")
        rc.execute("SELECT COUNT(*) FROM acct")
        assert rc.fetchone()[0] == 0  # not committed yet
        writer.rollback()
        wc.execute("INSERT INTO acct VALUES (2, 20)")
        writer.commit()
        rc.execute("SELECT id FROM acct")
        assert rc.fetchall() == [(2,)]
    finally:
        writer.close()
        reader.close()


def test_pytds_parameters_types_and_transactions(lab):
    with td(lab) as conn:
        cur = conn.cursor()
        cur.execute("CREATE TABLE params (id INT PRIMARY KEY, name NVARCHAR(100), price DECIMAL(12,3), at DATETIME, "
                    "raw VARBINARY(100), flag BIT)")
        at = datetime.datetime(2023, 12, 31, 23, 59, 58)
        cur.execute("INSERT INTO params VALUES (%s, %s, %s, %s, %s, %s)",
                    (1, "p\u00e4ram", decimal.Decimal("3.125"), at, pytds.Binary(b"\xff\x00"), True))
        cur.execute("INSERT INTO params VALUES (%s, %s, %s, %s, %s, %s)", (2, None, None, None, None, None))
        cur.execute("SELECT name, price, at, raw, flag FROM params WHERE id = %s", (1,))
        assert cur.fetchall() == [("p\u00e4ram", decimal.Decimal("3.125"), at, b"\xff\x00", True)]
        cur.execute("SELECT COUNT(*) FROM params WHERE name IS NULL AND id = %(id)s", {"id": 2})
        assert cur.fetchone()[0] == 1
    tx, other = td(lab, autocommit=False), td(lab)
    try:
        tx.cursor().execute("INSERT INTO params (id) VALUES (3)")
        cur = other.cursor()
        cur.execute("SELECT COUNT(*) FROM params WHERE id = 3")
        assert cur.fetchone()[0] == 0
        tx.commit()  # TM_COMMIT_XACT with a new transaction begun
        cur.execute("SELECT COUNT(*) FROM params WHERE id = 3")
        assert cur.fetchone()[0] == 1
        tx.cursor().execute("DELETE FROM params WHERE id = 3")
        tx.rollback()
        cur.execute("SELECT COUNT(*) FROM params WHERE id = 3")
        assert cur.fetchone()[0] == 1
    finally:
        tx.close()
        other.close()


def test_temp_tables_are_per_connection(lab):
    a, b = RawClient(lab.port), RawClient(lab.port)
    try:
        assert not errors(a.batch("CREATE TABLE #mine (x INT) INSERT INTO #mine VALUES (7)"))
        assert a.rows("SELECT x FROM #mine") == [[7]]
        assert errors(b.batch("SELECT x FROM #mine"))[0][0] == 208
        assert not errors(b.batch("CREATE TABLE #mine (x INT)"))  # same name, its own table
        assert b.rows("SELECT COUNT(*) FROM #mine") == [[0]]
    finally:
        a.close()
        b.close()


def test_begin_commit_rollback_envchanges(lab):
    c = RawClient(lab.port)
    try:
        toks = c.batch("BEGIN TRAN")
        begin = [t for t in toks if t.type == tk.TOKEN_ENVCHANGE]
        assert begin[0].env_type == tk.ENV_BEGINTRAN and len(begin[0].new) == 8
        assert c.rows("SELECT @@TRANCOUNT") == [[1]]
        toks = c.batch("COMMIT TRAN")
        assert [t.env_type for t in toks if t.type == tk.TOKEN_ENVCHANGE] == [tk.ENV_COMMITTRAN]
        c.batch("BEGIN TRANSACTION")
        toks = c.batch("ROLLBACK")
        assert [t.env_type for t in toks if t.type == tk.TOKEN_ENVCHANGE] == [tk.ENV_ROLLBACKTRAN]
        assert errors(c.batch("COMMIT"))[0][0] == 3902
        toks = c.batch("SELECT 1 SELECT 2")
        dones = [t for t in toks if t.type == tk.TOKEN_DONE]
        assert [d.status for d in dones] == [tk.DONE_COUNT | tk.DONE_MORE, tk.DONE_COUNT]
    finally:
        c.close()


def test_resetconnection_rolls_back_drops_temp_and_resets_options(lab):
    c = RawClient(lab.port)
    try:
        c.batch("CREATE TABLE resettable (x INT)")
        c.batch("SET NOCOUNT ON CREATE TABLE #t (x INT) BEGIN TRAN INSERT INTO resettable VALUES (1)")
        toks = c.batch("SELECT @@TRANCOUNT", status=tp.STATUS_RESETCONNECTION)
        assert toks[0].type == tk.TOKEN_ENVCHANGE and toks[0].env_type == tk.ENV_RESETACK
        assert [t.values for t in toks if t.type == tk.TOKEN_ROW] == [[0]]
        assert c.rows("SELECT COUNT(*) FROM resettable") == [[0]]
        assert errors(c.batch("SELECT * FROM #t"))[0][0] == 208
        done = [t for t in c.batch("SELECT 1") if t.type == tk.TOKEN_DONE][-1]
        assert done.status & tk.DONE_COUNT  # NOCOUNT is back to OFF
        c.batch("BEGIN TRAN")
        toks = c.batch("SELECT @@TRANCOUNT", status=tp.STATUS_RESETCONNECTIONSKIPTRAN)
        assert toks[0].env_type == tk.ENV_RESETACK and [t.values for t in toks if t.type == tk.TOKEN_ROW] == [[1]]
    finally:
        c.close()


def test_attention_cancels_waitfor(lab):
    c = RawClient(lab.port)
    try:
        c.send(tp.SQL_BATCH, tp.SqlBatch("WAITFOR DELAY '00:00:30'").encode())
        time.sleep(0.3)
        started = time.monotonic()
        c.sock.sendall(tp.encode_message(tp.ATTENTION, b""))
        toks = c.read_tokens()
        assert time.monotonic() - started < 5
        assert toks[-1].type == tk.TOKEN_DONE and toks[-1].status & tk.DONE_ATTN
        assert c.rows("SELECT 42") == [[42]]  # the connection goes on
    finally:
        c.close()


def test_pytds_cancel_on_idle_connection(lab):
    with td(lab) as conn:
        conn.cursor().cancel()
        cur = conn.cursor()
        cur.execute("SELECT 5")
        assert cur.fetchone()[0] == 5


def test_rpc_prepare_execute_unprepare(lab):
    c = RawClient(lab.port)
    try:
        nv = tk.TypeInfo(tk.NVARCHAR, 4000)
        int4 = tk.TypeInfo(tk.INTN, 4)
        prep = tp.RpcCall(proc_id=tp.SP_PREPEXEC, params=[
            tp.RpcParam("@handle", int4, None, tp.PARAM_BY_REF), tp.RpcParam("@params", nv, "@a int, @b nvarchar(10)"),
            tp.RpcParam("@stmt", nv, "SELECT @a + 1, @b"), tp.RpcParam("@a", int4, 41), tp.RpcParam("@b", nv, "x")])
        c.send(tp.RPC, tp.RpcRequest([prep]).encode())
        toks = c.read_tokens()
        assert [t.values for t in toks if t.type == tk.TOKEN_ROW] == [[42, "x"]]
        handle = next(t.value for t in toks if t.type == tk.TOKEN_RETURNVALUE)
        assert toks[-1].type == tk.TOKEN_DONEPROC
        execute = tp.RpcCall(proc_id=tp.SP_EXECUTE, params=[tp.RpcParam("", int4, handle),
                                                            tp.RpcParam("", int4, 1), tp.RpcParam("", nv, "y")])
        c.send(tp.RPC, tp.RpcRequest([execute]).encode())
        assert [t.values for t in c.read_tokens() if t.type == tk.TOKEN_ROW] == [[2, "y"]]
        c.send(tp.RPC, tp.RpcRequest([tp.RpcCall(proc_id=tp.SP_UNPREPARE, params=[tp.RpcParam("", int4, handle)]),
                                      execute]).encode())
        toks = c.read_tokens()
        assert [e[0] for e in errors(toks)] == [8179]
        tm = tp.TransactionRequest(tp.TM_BEGIN_XACT)
        c.send(tp.TRANSACTION_MANAGER, tm.encode())
        assert c.read_tokens()[0].env_type == tk.ENV_BEGINTRAN
        c.send(tp.TRANSACTION_MANAGER, tp.TransactionRequest(tp.TM_ROLLBACK_XACT,
                                                             headers=tp.AllHeaders(c.descriptor)).encode())
        assert c.read_tokens()[0].env_type == tk.ENV_ROLLBACKTRAN
    finally:
        c.close()


def test_use_database_and_cross_database_names(lab):
    c = RawClient(lab.port)
    try:
        toks = c.batch("USE labdb")
        assert (toks[0].env_type, toks[0].new, toks[0].old) == (tk.ENV_DATABASE, "labdb", "master")
        c.batch("CREATE TABLE only_here (x INT) INSERT INTO only_here VALUES (3)")
        assert c.rows("SELECT DB_NAME(), x FROM only_here") == [["labdb", 3]]
        c.batch("USE master")
        assert errors(c.batch("SELECT x FROM only_here"))[0][0] == 208
        assert c.rows("SELECT x FROM labdb.dbo.only_here") == [[3]]
        assert errors(c.batch("USE nowhere"))[0][0] == 911
    finally:
        c.close()


def test_read_only_mode_switched_at_run_time(lab):
    probe = "SELECT DATABASEPROPERTYEX(DB_NAME(), 'Updateability')"
    with ms(lab) as conn:
        cur = conn.cursor()
        cur.execute("CREATE TABLE ro_check (x INT)")
        lab.proc.send_signal(signal.SIGUSR1)
        try:
            deadline = time.monotonic() + 5
            while True:
                cur.execute(probe)
                if cur.fetchone()[0] == "READ_ONLY" or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            cur.execute(probe)
            assert cur.fetchone()[0] == "READ_ONLY"
            with pytest.raises(pymssql.OperationalError) as info:
                cur.execute("INSERT INTO ro_check VALUES (1)")
            assert info.value.args[0] == 3906
            cur.execute("CREATE TABLE #scratch (x INT) INSERT INTO #scratch VALUES (1)")  # tempdb stays writable
        finally:
            lab.proc.send_signal(signal.SIGUSR2)
        deadline = time.monotonic() + 5
        while True:
            cur.execute(probe)
            if cur.fetchone()[0] == "READ_WRITE" or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        cur.execute("INSERT INTO ro_check VALUES (1)")


def test_login_failures(lab):
    number, text = pymssql_refusal(server="127.0.0.1", port=lab.port, user=USER, password="wrong")
    assert number == 18456, text
    with pytest.raises(pymssql.OperationalError):
        pymssql.connect(server="127.0.0.1", port=lab.port, user=USER, password=PASSWORD, database="nope",
                        tds_version="7.4")


def tsql_login_refusal(port: int, user: str, password: str, tdsver: str) -> str:
    out = subprocess.run(["tsql", "-H", "127.0.0.1", "-p", str(port), "-U", user, "-P", password],
                         input="select 1\ngo\nexit\n", capture_output=True, text=True, timeout=30,
                         env=dict(os.environ, TDSVER=tdsver))
    return out.stdout + out.stderr


@pytest.mark.timeout(90)
def test_tds71_login_is_refused_by_version_directly_and_through_the_proxy(lab, proxy_factory):
    """FreeTDS tsql with TDSVER=7.1 (LOGIN7's shorter 7.1 fixed part, as jTDS sends it) is told which TDS version
    to use, by the lab server and by the proxy, not that its login is malformed."""
    from .test_tds_proxy import APP_PASSWORD, APP_USER, start
    direct = tsql_login_refusal(lab.port, USER, PASSWORD, "7.1")
    assert "Msg 18456" in direct and "logged in with TDS 7.1" in direct and "TDSVER=7.4" in direct, direct
    assert "malformed" not in direct
    proxy = start(proxy_factory, lab)
    through = tsql_login_refusal(proxy.port, APP_USER, APP_PASSWORD, "7.1")
    assert "Msg 40517" in through and "logged in with TDS 7.1" in through, through
    assert "multiproxy speaks TDS 7.2 to 7.4" in through and "TDSVER=7.4" in through and "jTDS" in through
    assert "malformed" not in through
    accepted = tsql_login_refusal(proxy.port, APP_USER, APP_PASSWORD, "7.4")     # the version it names works
    assert "\n1\n" in accepted and "Msg" not in accepted, accepted


def _expect_closed_or_error(sock):
    sock.settimeout(5)
    data = b""
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except (ConnectionResetError, socket.timeout):
        pass
    if data:
        messages = tp.MessageReader().feed(data)
        if messages and messages[-1].type == tp.TABULAR_RESULT and messages[-1].data[:1] == b"\xaa":
            return
        assert messages, data
    return


def test_bad_input_leaves_other_clients_unaffected(lab):
    healthy = RawClient(lab.port)
    try:
        # truncated PRELOGIN, then the client goes away
        with socket.create_connection(("127.0.0.1", lab.port)) as s:
            s.sendall(tp.encode_message(tp.PRELOGIN, tp.Prelogin.build().encode())[:20])
        # a PRELOGIN with an option pointing outside it
        with socket.create_connection(("127.0.0.1", lab.port)) as s:
            s.sendall(tp.encode_message(tp.PRELOGIN, bytes.fromhex("000100ff0006ff")))
            _expect_closed_or_error(s)
        # packet length below the header size
        with socket.create_connection(("127.0.0.1", lab.port)) as s:
            s.sendall(bytes.fromhex("12 01 00 04 00 00 01 00"))
            _expect_closed_or_error(s)
        # LOGIN7 whose offsets point outside the packet
        with socket.create_connection(("127.0.0.1", lab.port)) as s:
            s.sendall(tp.encode_message(tp.PRELOGIN, tp.Prelogin.build(encryption=tp.ENCRYPT_NOT_SUP).encode()))
            tp.MessageReader().feed(s.recv(4096))
            login = bytearray(tp.Login7(username=USER, password=PASSWORD).encode())
            login[40:42] = (0x7FF0).to_bytes(2, "little")
            s.sendall(tp.encode_message(tp.LOGIN7, bytes(login)))
            data = s.recv(65536)
            toks = tk.TokenReader().read(tp.MessageReader().feed(data)[0].data)
            assert toks[0].type == tk.TOKEN_ERROR
        # after login: a packet larger than the negotiated size
        bad = RawClient(lab.port, packet_size=512)
        bad.sock.sendall(tp.encode_message(tp.SQL_BATCH, tp.SqlBatch("SELECT 1" + " " * 600).encode(), 2048))
        _expect_closed_or_error(bad.sock)
        bad.close()
        # garbage packet type
        with socket.create_connection(("127.0.0.1", lab.port)) as s:
            s.sendall(bytes.fromhex("99 01 00 08 00 00 01 00"))
            _expect_closed_or_error(s)
        assert healthy.rows("SELECT 1 + 1") == [[2]]
    finally:
        healthy.close()


@pytest.mark.parametrize("mode", ["on", "not_supported"])
def test_encryption_modes(tmp_path, mode):
    server = LabProcess(tmp_path, "--encryption", mode)
    try:
        with ms(server) as conn:
            cur = conn.cursor()
            cur.execute("SELECT CONCAT(N'secret', N'!')")
            assert cur.fetchone()[0] == "secret!"
        out = subprocess.run(["tsql", "-H", "127.0.0.1", "-p", str(server.port), "-U", USER, "-P", PASSWORD],
                             input="select 7 as seven\ngo\nexit\n", capture_output=True, text=True, timeout=30,
                             env=dict(os.environ, TDSVER="7.4"))
        assert "seven" in out.stdout and "\n7\n" in out.stdout, out.stdout + out.stderr
    finally:
        server.stop()


def test_in_process_class_api(tmp_path):
    gevent = pytest.importorskip("gevent")
    from multiproxy.lab.tds_server import TDSLabServer

    server = TDSLabServer("127.0.0.1", 0, users={"app": "pw"}, db_path=str(tmp_path / "m.sqlite")).start()
    try:
        result = {}

        def client():
            sock = gevent.socket.create_connection(("127.0.0.1", server.port))
            reader = tp.MessageReader()
            sock.sendall(tp.encode_message(tp.PRELOGIN, tp.Prelogin.build(encryption=tp.ENCRYPT_NOT_SUP).encode()))
            while not reader.feed(sock.recv(4096)):
                pass
            sock.sendall(tp.encode_message(tp.LOGIN7, tp.Login7(username="app", password="pw").encode()))
            while not reader.feed(sock.recv(65536)):
                pass
            server.set_read_only(True)
            sock.sendall(tp.encode_message(tp.SQL_BATCH, tp.SqlBatch(
                "SELECT DATABASEPROPERTYEX(DB_NAME(), 'Updateability')").encode()))
            messages = []
            while not messages:
                messages = reader.feed(sock.recv(65536))
            result["rows"] = [t.values for t in tk.TokenReader().read(messages[0].data) if t.type == tk.TOKEN_ROW]
            sock.close()

        gevent.spawn(client).get(timeout=20)
        assert result["rows"] == [["READ_ONLY"]]
    finally:
        server.stop()
    assert uuid  # imported for parameter types in other tests
