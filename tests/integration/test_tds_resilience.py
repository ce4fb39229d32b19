"""The TDS engine when things go wrong: handshake and idle timeouts, a backend killed mid-response or mid-transaction,
a client vanishing mid-transaction; real clients (pymssql, python-tds, raw TDS) through the proxy, lab servers behind."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import socket
import struct
import time

import pytest

from multiproxy_engines.tds.wire import messages as tp
from multiproxy_engines.tds.wire import token_stream as tk

from .helpers import metric, metrics_text, read_until_closed
from .proxy import free_port
from .test_tds_proxy import (DB, LAB_PASSWORD, LAB_USER, LabProcess, RawClient, errors, one, start, tds_config,
                             users_toml)

pymssql = pytest.importorskip("pymssql")
pytds = pytest.importorskip("pytds")

pytestmark = pytest.mark.tds
BORROWED = "multiproxy_database_connections_currently_borrowed"


def wait_for(predicate, timeout=10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def direct(lab):
    """A client straight to the lab server (no proxy), autocommit."""
    return pymssql.connect(server="127.0.0.1", port=lab.port, user=LAB_USER, password=LAB_PASSWORD, database=DB,
                           autocommit=True, tds_version="7.4")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@pytest.fixture
def lab(tmp_path):
    server = LabProcess(tmp_path)
    yield server
    if server.proc.poll() is None:
        server.stop()


def restart_on_same_port(old: LabProcess, tmp_path) -> LabProcess:
    """A new lab server process on the port (and database file) of a killed one."""
    new = LabProcess.__new__(LabProcess)
    new.port = old.port
    deadline = time.monotonic() + 10
    while True:
        new.proc = subprocess.Popen(
            [sys.executable, "-m", "multiproxy.lab.tds_server", "--port", str(old.port), "--user", LAB_USER,
             "--password", LAB_PASSWORD, "--db-file", str(tmp_path / "master.sqlite"), "--database", DB],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        line = new.proc.stdout.readline()
        if "listening" in line:
            return new
        new.proc.wait(5)
        if time.monotonic() > deadline:
            raise AssertionError("the lab server did not come back: " + line)
        time.sleep(0.2)


# ---------------------------------------------------------------------------------------------- timeouts

@pytest.mark.parametrize("stop_at", ["nothing", "mid_prelogin", "before_login7", "mid_login7"])
def test_client_stopping_mid_login_is_closed_after_handshake_timeout(lab, proxy_factory, tmp_path, stop_at):
    config = tds_config(lab)
    config["proxy"]["handshake_timeout"] = 1.0
    proxy = proxy_factory(config, files={"users.toml": users_toml()})
    healthy = RawClient(proxy.port)
    healthy.batch("BEGIN TRAN")
    baseline = open_fds(proxy.pid)
    prelogin = tp.encode_message(tp.PRELOGIN, tp.Prelogin.build(encryption=tp.ENCRYPT_NOT_SUP).encode())
    login = tp.encode_message(tp.LOGIN7, tp.Login7(username="app", password="app-pw", database=DB).encode())
    sent = {"nothing": b"", "mid_prelogin": prelogin[:12], "before_login7": prelogin,
            "mid_login7": prelogin + login[:len(login) - 7]}[stop_at]
    with socket.create_connection((proxy.host, proxy.port), timeout=10) as s:
        started = time.monotonic()
        s.sendall(sent)
        data, closed = read_until_closed(s, 8)
        elapsed = time.monotonic() - started
    assert closed, "the proxy did not close a client that stopped mid-login"
    assert 0.7 <= elapsed <= 4.0, elapsed
    if stop_at in ("before_login7", "mid_login7"):
        data = data[tp.PacketHeader.decode(data).length:]          # the PRELOGIN answer
    if data:                                                       # an ERROR token saying why, or nothing
        found = errors(tk.TokenReader().read(tp.MessageReader().feed(data)[0].data))
        assert found and found[0][0] == 50002 and "logging in" in found[0][2], found
    # nothing leaked: no backend borrowed for it, descriptors back, the other client unaffected
    assert healthy.rows("SELECT @@TRANCOUNT") == [[1]]
    healthy.batch("COMMIT")
    assert wait_for(lambda: metric(metrics_text(proxy), BORROWED) == 0)
    assert wait_for(lambda: open_fds(proxy.pid) <= baseline, 5), (open_fds(proxy.pid), baseline)
    healthy.close()
    assert "Traceback" not in proxy.log_text()


def test_idle_client_is_closed_with_an_error_and_idle_in_transaction_rolled_back(lab, proxy_factory):
    config = tds_config(lab)
    config["proxy"]["idle_client_timeout"] = 1.0
    config["proxy"]["idle_transaction_timeout"] = 1.0
    proxy = proxy_factory(config, files={"users.toml": users_toml()})
    with direct(lab) as setup:
        setup.cursor().execute("CREATE TABLE idle_tx (n INT)")
    idle = RawClient(proxy.port)
    assert idle.rows("SELECT 1") == [[1]]
    in_tx = RawClient(proxy.port)
    in_tx.batch("BEGIN TRAN")
    in_tx.batch("INSERT INTO idle_tx VALUES (7)")
    time.sleep(2.0)
    data, closed = read_until_closed(idle.sock, 5)
    assert closed
    found = errors(tk.TokenReader().read(tp.MessageReader().feed(data)[0].data))
    assert found and found[0][0] == 50001 and "idle" in found[0][2], found
    data, closed = read_until_closed(in_tx.sock, 5)
    assert closed
    found = errors(tk.TokenReader().read(tp.MessageReader().feed(data)[0].data))
    assert found and found[0][0] == 50001 and "idle_transaction_timeout" in found[0][2], found
    with direct(lab) as check:
        assert one(check, "SELECT COUNT(*) FROM idle_tx WHERE n = 7") == [(0,)]
    assert wait_for(lambda: metric(metrics_text(proxy), BORROWED) == 0)
    with pymssql.connect(server=proxy.host, port=proxy.port, user="app", password="app-pw", database=DB,
                         autocommit=True, tds_version="7.4") as fresh:
        assert one(fresh, "SELECT 2") == [(2,)]
    idle.close()
    in_tx.close()


# ---------------------------------------------------------------------------------------------- backend lost

def test_backend_killed_mid_response_and_mid_transaction(lab, proxy_factory, tmp_path):
    proxy = start(proxy_factory, lab, max_size=4)
    with direct(lab) as setup:
        setup.cursor().execute("CREATE TABLE lost_tx (n INT)")
    idle = [RawClient(proxy.port) for _ in range(3)]
    for c in idle:
        assert c.rows("SELECT 1") == [[1]]
    in_tx = RawClient(proxy.port)
    in_tx.batch("BEGIN TRAN")
    in_tx.batch("INSERT INTO lost_tx VALUES (1)")
    busy = RawClient(proxy.port)
    busy.send(tp.SQL_BATCH, tp.SqlBatch("WAITFOR DELAY '00:00:30'").encode())
    time.sleep(0.3)
    lab.proc.send_signal(signal.SIGKILL)
    lab.proc.wait(10)
    # the client waiting for a response gets an ERROR token that says what happened
    found = errors(busy.read_tokens())
    assert found and found[0][0] == 40197 and "lost" in found[0][2], found
    # the client whose transaction was open is told the transaction is gone, on its next request
    found = errors(in_tx.batch("INSERT INTO lost_tx VALUES (2)"))
    assert found and found[0][0] == 40197 and "rolled back" in found[0][2], found
    back = restart_on_same_port(lab, tmp_path)
    try:
        # idle clients, and the one whose transaction was lost, keep working once a backend is back
        for c in idle + [in_tx]:
            assert wait_for(lambda: not errors(c.batch("SELECT 1")), 10)
            assert c.rows("SELECT 2") == [[2]]
            assert c.rows("SELECT @@TRANCOUNT") == [[0]]
        with direct(back) as check:
            assert one(check, "SELECT COUNT(*) FROM lost_tx") == [(0,)]
        with pytds.connect(proxy.host, port=proxy.port, user="app", password="app-pw", database=DB,
                           autocommit=True) as conn:
            assert one(conn, "SELECT 3") == [(3,)]
        assert wait_for(lambda: metric(metrics_text(proxy), BORROWED) == 0)
    finally:
        for c in idle + [in_tx, busy]:
            c.close()
        back.stop()
    assert "Traceback" not in proxy.log_text()


# ---------------------------------------------------------------------------------------------- client vanishes

@pytest.mark.parametrize("how", ["close", "reset"])
def test_client_disconnecting_mid_transaction_is_rolled_back(lab, proxy_factory, how):
    proxy = start(proxy_factory, lab, max_size=2)
    with direct(lab) as setup:
        setup.cursor().execute("CREATE TABLE gone_tx (n INT)")
    other = pymssql.connect(server=proxy.host, port=proxy.port, user="app", password="app-pw", database=DB,
                            autocommit=True, tds_version="7.4")
    c = RawClient(proxy.port)
    c.batch("BEGIN TRAN")
    c.batch("INSERT INTO gone_tx VALUES (1)")
    assert metric(metrics_text(proxy), BORROWED) == 1          # the open transaction holds its backend
    if how == "reset":
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    c.close()
    assert wait_for(lambda: metric(metrics_text(proxy), BORROWED) == 0), metric(metrics_text(proxy), BORROWED)
    assert one(other, "SELECT COUNT(*) FROM gone_tx") == [(0,)]          # through the proxy
    with direct(lab) as check:
        assert one(check, "SELECT COUNT(*) FROM gone_tx") == [(0,)]      # and on the server itself
        check.cursor().execute("INSERT INTO gone_tx VALUES (2)")         # no lock left behind
    assert one(other, "SELECT COUNT(*) FROM gone_tx") == [(1,)]
    other.close()
