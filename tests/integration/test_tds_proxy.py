"""The TDS engine through the proxy with the TDS lab server as backend: tsql, pymssql, python-tds and a raw client."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time

import pytest

from multiproxy.auth import UsersFile
from multiproxy_engines.tds.wire import messages as tp
from multiproxy_engines.tds.wire import token_stream as tk

from .helpers import metric, metrics_text
from .proxy import free_port
from .tdskit import DB, LAB_PASSWORD, LAB_USER, LabProcess, pymssql_refusal
from .tdskit import RawClient as TdsRawClient

pymssql = pytest.importorskip("pymssql")
pytds = pytest.importorskip("pytds")

pytestmark = pytest.mark.tds
APP_USER, APP_PASSWORD = "app", "app-pw"
PINNED = "multiproxy_database_connections_currently_session_pinned"


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    server = LabProcess(tmp_path_factory.mktemp("tdslab"))
    yield server
    server.stop()


def users_toml() -> str:
    users = UsersFile()
    users.add(APP_USER, APP_PASSWORD, kinds=["tds_sha256"])
    return users.dumps()


def tds_config(lab, max_size=5, backend_tls="disable", listener=None, borrow_timeout=10.0, mode="transaction"):
    return {
        "proxy": {"admin_listen": f"127.0.0.1:{free_port()}", "log_level": "info"},
        "auth": {"users_file": "users.toml"},
        "clusters": {"main": {"engine": "tds", "hosts": [f"127.0.0.1:{lab.port}"], "backend": {"tls": backend_tls},
                              "pool": {"mode": mode, "max_size": max_size, "borrow_timeout": borrow_timeout},
                              "credentials": [{"user": "*", "backend_user": LAB_USER, "password": LAB_PASSWORD}]}},
        "listeners": [{"name": "tds", "listen": f"127.0.0.1:{free_port()}", "cluster": "main", "role": "writer",
                       "auth": "scram-sha-256", **(listener or {})}],
    }


def start(proxy_factory, lab, files=None, **kwargs):
    return proxy_factory(tds_config(lab, **kwargs), files={"users.toml": users_toml(), **(files or {})})


def ms(proxy, autocommit=True, **kw):
    kw.setdefault("database", DB)
    return pymssql.connect(server=proxy.host, port=proxy.port, user=APP_USER, password=APP_PASSWORD,
                           autocommit=autocommit, tds_version="7.4", **kw)


def td(proxy, autocommit=True, **kw):
    kw.setdefault("database", DB)
    return pytds.connect(proxy.host, port=proxy.port, user=APP_USER, password=APP_PASSWORD, autocommit=autocommit,
                         **kw)


def one(conn, sql, args=None):
    cur = conn.cursor()
    cur.execute(sql, args) if args is not None else cur.execute(sql)
    return cur.fetchall()


def RawClient(port, packet_size=4096, user=APP_USER, password=APP_PASSWORD, login=True, language=""):
    """A raw client logged in through the proxy as the app user, into the lab database."""
    return TdsRawClient(port, packet_size, user, password, DB, login, language=language)


def errors(toks):
    return [(t.number, t.severity, t.text) for t in toks if t.type == tk.TOKEN_ERROR]


# ---------------------------------------------------------------------------------------------- clients

def test_tsql_freetds(lab, proxy_factory):
    proxy = start(proxy_factory, lab)
    script = ("select 1 as one, N'h\u00e9' as word, CAST(NULL AS INT) as nothing\ngo\n"
              "select DB_NAME() as db, @@TRANCOUNT as tc\ngo\nexit\n")
    out = subprocess.run(["tsql", "-H", proxy.host, "-p", str(proxy.port), "-U", APP_USER, "-P", APP_PASSWORD,
                          "-D", DB], input=script, capture_output=True, text=True, timeout=30,
                         env=dict(os.environ, TDSVER="7.4"))
    assert "one\tword\tnothing" in out.stdout and "1\th\u00e9\tNULL" in out.stdout, out.stdout + out.stderr
    assert f"{DB}\t0" in out.stdout


def test_pymssql_rows_types_nulls_and_wrong_password(lab, proxy_factory):
    proxy = start(proxy_factory, lab)
    with ms(proxy) as conn:
        rows = one(conn, "SELECT 1, 2.5, N'tex\u00e9', CAST(NULL AS INT), CAST(1 AS BIT), 12345678901")
        assert rows == [(1, 2.5, "tex\u00e9", None, True, 12345678901)]
        one_conn = one(conn, "SELECT DB_NAME()")
        assert one_conn == [(DB,)]
    number, text = pymssql_refusal(server=proxy.host, port=proxy.port, user=APP_USER, password="wrong")
    assert number == 18456 and "Login failed" in text, text


def test_pymssql_autocommit_off_holds_no_backend_while_idle(lab, proxy_factory):
    """pymssql with autocommit off sends BEGIN TRAN at connect and after every commit: the proxy answers it and
    begins it on a backend with the next statement, so between transactions the session holds none."""
    proxy = start(proxy_factory, lab, max_size=2)
    setup = ms(proxy)
    one_rowless = setup.cursor()
    one_rowless.execute("CREATE TABLE ac_off (x INT)")
    conn = ms(proxy, autocommit=False)
    cur = conn.cursor()
    cur.execute("INSERT INTO ac_off VALUES (1)")
    assert one(setup, "SELECT COUNT(*) FROM ac_off") == [(0,)]   # not committed yet: another backend
    conn.commit()
    assert one(setup, "SELECT COUNT(*) FROM ac_off") == [(1,)]
    assert metric(metrics_text(proxy), "multiproxy_database_connections_currently_borrowed") == 0   # idle: none
    conn.close()
    setup.close()


def test_pytds_parameters_transactions_and_small_packets(lab, proxy_factory):
    proxy = start(proxy_factory, lab, max_size=2)
    with td(proxy) as conn:
        cur = conn.cursor()
        cur.execute("CREATE TABLE pt (id INT, name NVARCHAR(100))")
    with td(proxy, autocommit=False) as conn:      # python-tds begins a transaction at once (TM requests)
        cur = conn.cursor()
        cur.execute("INSERT INTO pt VALUES (%s, %s)", (1, "one"))
        conn.rollback()
        cur.execute("INSERT INTO pt VALUES (%s, %s)", (2, "two"))
        conn.commit()
    # 512-byte packets toward the client, 4096 toward the backend: messages are re-framed both ways
    with td(proxy, blocksize=512) as conn:
        cur = conn.cursor()
        long = "x" * 1500  # 3000 bytes as NVARCHAR: six 512-byte packets
        cur.execute("SELECT id, name, %s FROM pt", (long,))
        assert cur.fetchall() == [(2, "two", long)]


# ---------------------------------------------------------------------------------------------- pooling

@pytest.mark.timeout(120)
def test_200_clients_over_5_backends(lab, proxy_factory):
    proxy = start(proxy_factory, lab, max_size=5, borrow_timeout=60)
    with ms(proxy) as setup:
        setup.cursor().execute("CREATE TABLE many (client INT, n INT)")
    clients, rounds = 200, 3
    errors_: list = []
    barrier = threading.Barrier(clients)

    def work(i):
        try:
            conn = ms(proxy) if i % 2 else td(proxy)
            barrier.wait(60)
            for n in range(rounds):
                cur = conn.cursor()
                cur.execute("BEGIN TRAN")
                cur.execute(f"INSERT INTO many VALUES ({i}, {n})")
                cur.execute(f"SELECT COUNT(*) FROM many WHERE client = {i}")
                assert cur.fetchone()[0] == n + 1
                cur.execute("COMMIT")
            conn.close()
        except Exception as exc:
            errors_.append(f"client {i}: {exc!r}")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(100)
    assert not errors_, errors_[:5]
    with ms(proxy) as check:
        assert one(check, "SELECT COUNT(*), COUNT(DISTINCT client) FROM many") == [(clients * rounds, clients)]
    assert metric(metrics_text(proxy), "multiproxy_database_connections") <= 5


def test_reset_on_reuse_and_tracked_state_replayed(lab, proxy_factory):
    """One backend, two clients taking turns: each keeps its own SET options and database; nothing leaks."""
    proxy = start(proxy_factory, lab, max_size=1)
    with ms(proxy) as setup:
        setup.cursor().execute("CREATE DATABASE otherdb")
    a, b = RawClient(proxy.port), RawClient(proxy.port)
    try:
        a.batch("SET DATEFIRST 3; SET TEXTSIZE 1000")
        a.batch("USE otherdb")
        spid = a.rows("SELECT @@SPID")
        assert b.rows("SELECT @@SPID") == spid                        # the same backend connection
        assert b.rows("SELECT @@DATEFIRST, @@TEXTSIZE, DB_NAME()") == [[7, -1, DB]]   # reset: nothing leaked
        assert a.rows("SELECT @@DATEFIRST, @@TEXTSIZE, DB_NAME()") == [[3, 1000, "otherdb"]]   # replayed
        toks = b.batch("SELECT 1")
        assert not any(t.type == tk.TOKEN_ENVCHANGE and t.env_type == tk.ENV_RESETACK for t in toks)
        assert b.rows("SELECT @@DATEFIRST") == [[7]]
    finally:
        a.close()
        b.close()


def test_login_language_is_replayed_on_every_backend(lab, proxy_factory):
    """LOGIN7's language is a session setting: it follows the client to each backend and leaks to no other."""
    proxy = start(proxy_factory, lab, max_size=1)
    a, b = RawClient(proxy.port, language="British"), RawClient(proxy.port)
    try:
        assert any(t.type == tk.TOKEN_ENVCHANGE and t.env_type == tk.ENV_LANGUAGE and t.new == "British"
                   for t in a.login_tokens)
        for _ in range(2):                                            # turns on the one backend
            assert a.rows("SELECT @@LANGUAGE") == [["British"]]
            assert b.rows("SELECT @@LANGUAGE") == [["us_english"]]
    finally:
        a.close()
        b.close()


PIN_CASES = [
    ("temp_table", "CREATE TABLE #pinme (x INT)"),
    ("session_variable", "SET IDENTITY_INSERT pinned_t ON"),
    ("context_info", "SET CONTEXT_INFO 0x01"),
    ("execute_as", "EXECUTE AS USER = 'dbo'"),
    ("context_info", "EXEC sp_set_session_context @key = N'k', @value = 1"),
    ("advisory_lock", "EXEC sp_getapplock @Resource = 'r', @LockMode = 'Exclusive', @LockOwner = 'Session'"),
    ("cursor", "DECLARE c CURSOR FOR SELECT 1"),
]


@pytest.mark.parametrize("reason,sql", PIN_CASES, ids=[f"{r}-{i}" for i, (r, _) in enumerate(PIN_CASES)])
def test_pin_reasons(lab, proxy_factory, reason, sql):
    """Each pin reason pins the session (the lab server may refuse the statement; the pin is on the attempt)
    and the backend is reset when the client leaves: the next client sees a clean session."""
    proxy = start(proxy_factory, lab, max_size=1)
    c = RawClient(proxy.port)
    c.batch(sql)
    assert metric(metrics_text(proxy), PINNED, reason=reason) == 1
    c.close()
    deadline = time.monotonic() + 5
    while metric(metrics_text(proxy), PINNED, reason=reason) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert metric(metrics_text(proxy), PINNED, reason=reason) == 0
    d = RawClient(proxy.port)
    if reason == "temp_table":
        assert errors(d.batch("SELECT * FROM #pinme"))[0][0] == 208
    assert d.rows("SELECT 1") == [[1]]
    d.close()


def test_prepared_handle_is_multiplexed_not_pinned(lab, proxy_factory):
    """sp_prepare no longer pins (engines/tds/statements.py; test_tds_prepared.py has the rest)."""
    proxy = start(proxy_factory, lab, max_size=2)
    c = RawClient(proxy.port)
    nv, int4 = tk.TypeInfo(tk.NVARCHAR, 4000), tk.TypeInfo(tk.INTN, 4)
    prep = tp.RpcCall(proc_id=tp.SP_PREPARE, params=[
        tp.RpcParam("@handle", int4, None, tp.PARAM_BY_REF), tp.RpcParam("@params", nv, "@a int"),
        tp.RpcParam("@stmt", nv, "SELECT @a + 1")])
    c.send(tp.RPC, tp.RpcRequest([prep]).encode())
    handle = next(t.value for t in c.read_tokens() if t.type == tk.TOKEN_RETURNVALUE)
    assert not metric(metrics_text(proxy), PINNED, reason="prepared_statement")
    c.send(tp.RPC, tp.RpcRequest([tp.RpcCall(proc_id=tp.SP_EXECUTE, params=[
        tp.RpcParam("", int4, handle), tp.RpcParam("", int4, 41)])]).encode())
    assert [t.values for t in c.read_tokens() if t.type == tk.TOKEN_ROW] == [[42]]
    c.close()


def test_attention_cancels_waitfor(lab, proxy_factory):
    proxy = start(proxy_factory, lab)
    c = RawClient(proxy.port)
    try:
        c.send(tp.SQL_BATCH, tp.SqlBatch("WAITFOR DELAY '00:00:30'").encode())
        time.sleep(0.3)
        started = time.monotonic()
        c.sock.sendall(tp.encode_message(tp.ATTENTION, b""))
        toks = c.read_tokens()
        while not any(t.type == tk.TOKEN_DONE and t.status & tk.DONE_ATTN for t in toks):
            toks = c.read_tokens()
        assert time.monotonic() - started < 5
        assert c.rows("SELECT 42") == [[42]]
        c.sock.sendall(tp.encode_message(tp.ATTENTION, b""))     # holding no backend: answered by the proxy
        toks = c.read_tokens()
        assert toks[-1].type == tk.TOKEN_DONE and toks[-1].status & tk.DONE_ATTN
        assert c.rows("SELECT 43") == [[43]]
    finally:
        c.close()
    with td(proxy) as conn:                                      # python-tds cancel on an idle connection
        conn.cursor().cancel()
        assert one(conn, "SELECT 5") == [(5,)]


# ---------------------------------------------------------------------------------------------- login, TLS, bad input

def test_integrated_and_federated_auth_refused(lab, proxy_factory):
    """SSPI is not supported; an access token (FEDAUTH) on a password listener is told to use a password."""
    proxy = start(proxy_factory, lab)
    for login, expected in (
            (tp.Login7(username="", option_flags2=0x03 | tp.F_INT_SECURITY, sspi=b"NTLMSSP\0"),
             "not supported by multiproxy"),
            (tp.Login7(fedauth=tp.FedAuth.security_token("x" * 900, echo=False)),
             "listener 'tds' authenticates with passwords, not access tokens (FEDAUTH)")):
        c = RawClient(proxy.port, login=False)
        c.send(tp.PRELOGIN, tp.Prelogin.build(encryption=tp.ENCRYPT_NOT_SUP, fedauth_required=1).encode())
        assert tp.Prelogin.decode(c.recv().data).fedauth_required == 0      # password listener: no FEDAUTH
        c.send(tp.LOGIN7, login.encode())
        found = errors(c.read_tokens())
        assert found and found[0][0] == 18456 and expected in found[0][2], found
        c.close()


def test_tls_login_only_and_full_on_listener_and_backend(lab, proxy_factory, tmp_path):
    from multiproxy.lab.tds_server import make_self_signed
    cert, key = make_self_signed(str(tmp_path))
    proxy = start(proxy_factory, lab, backend_tls="prefer", listener={"tls_cert_file": cert, "tls_key_file": key})
    with ms(proxy) as conn:                       # FreeTDS default: encryption "request" -> login-only here
        assert one(conn, "SELECT CONCAT(N'a', N'b')") == [("ab",)]
    out = subprocess.run(["tsql", "-H", proxy.host, "-p", str(proxy.port), "-U", APP_USER, "-P", APP_PASSWORD],
                         input="select 7 as seven\ngo\nexit\n", capture_output=True, text=True, timeout=30,
                         env=dict(os.environ, TDSVER="7.4"))
    assert "seven" in out.stdout and "\n7\n" in out.stdout, out.stdout + out.stderr
    with ms(proxy, encryption="require") as conn:  # full encryption: every byte in TLS records
        assert one(conn, "SELECT 8") == [(8,)]
    strict = start(proxy_factory, lab, listener={"tls_cert_file": cert, "tls_key_file": key, "require_tls": True})
    with ms(strict) as conn:
        assert one(conn, "SELECT 9") == [(9,)]
    c = RawClient(strict.port, login=False)       # a client that cannot encrypt is told why
    c.send(tp.PRELOGIN, tp.Prelogin.build(encryption=tp.ENCRYPT_NOT_SUP).encode())
    data = b""
    while chunk := c.sock.recv(65536):
        data += chunk
    reply, refusal = tp.MessageReader().feed(data)
    assert tp.Prelogin.decode(reply.data).encryption == tp.ENCRYPT_REQ
    found = errors(tk.TokenReader().read(refusal.data))
    assert found and "requires encryption" in found[0][2]
    c.close()


BAD_INPUTS = {
    "truncated_prelogin": tp.encode_message(tp.PRELOGIN, bytes([0, 0, 20, 0, 6])),
    "packet_below_header": bytes.fromhex("12 01 00 04 00 00 01 00"),
    "login7_offsets_outside": tp.encode_message(tp.PRELOGIN, tp.Prelogin.build(encryption=2).encode()) + (
        lambda raw: tp.encode_message(tp.LOGIN7, raw[:36] + b"\xff\x7f\x10\x00" + raw[40:]))(
        tp.Login7(username=APP_USER, password=APP_PASSWORD).encode()),
    "stop_mid_login": tp.encode_message(tp.PRELOGIN, tp.Prelogin.build(encryption=2).encode())[:20],
}


@pytest.mark.parametrize("name", sorted(BAD_INPUTS))
def test_bad_input_gets_error_or_close_and_others_are_fine(lab, proxy_factory, name):
    proxy = start(proxy_factory, lab)
    healthy = RawClient(proxy.port)
    healthy.batch("BEGIN TRAN")
    with socket.create_connection((proxy.host, proxy.port), timeout=5) as s:
        s.sendall(BAD_INPUTS[name])
        if name == "stop_mid_login":
            s.shutdown(socket.SHUT_WR)
        data = b""
        try:
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        except socket.timeout:
            pytest.fail("the proxy neither answered nor closed")
    if data and name != "login7_offsets_outside":
        assert b"multiproxy" in data.decode("utf-16-le", "replace").encode() or tp.PacketHeader.decode(data).type == 4
    assert healthy.rows("SELECT @@TRANCOUNT") == [[1]]
    healthy.batch("COMMIT")
    # oversized packet after login: an ERROR token then close
    c = RawClient(proxy.port, packet_size=512)
    c.sock.sendall(tp.encode_message(tp.SQL_BATCH, tp.SqlBatch("SELECT '" + "y" * 2000 + "'").encode(), 4096))
    found = errors(c.read_tokens())
    assert found and found[0][0] == 4002 and "exceeds the packet size" in found[0][2]
    c.close()
    healthy.close()


def test_read_only_probe_and_retry(tmp_path, proxy_factory):
    """The probe reads DATABASEPROPERTYEX(..., 'Updateability'); a read-only server answers reader."""
    from multiproxy_engines.tds.backend import TDSProbe
    from multiproxy.backends import run_script
    from multiproxy.engine import BackendTarget
    server = LabProcess(tmp_path, "--read-only")
    try:
        target = BackendTarget("127.0.0.1", server.port, LAB_USER, DB, LAB_PASSWORD, tls="disable")
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        _, script = run_script(sock, TDSProbe(target), target, 5)
        sock.close()
        assert script.result["role"] == "reader"
        server.proc.send_signal(signal.SIGUSR2)   # writable again
        time.sleep(0.3)
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        _, script = run_script(sock, TDSProbe(target), target, 5)
        sock.close()
        assert script.result["role"] == "writer"
    finally:
        server.stop()
