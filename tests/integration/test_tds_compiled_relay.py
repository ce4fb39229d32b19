"""[proxy] relay = "compiled" with the TDS lab server: pymssql clients (more of them than backends) whose SELECT
batches the relay lanes serve, and what the engine's screen sends back to the Python path (INSERT, transactions, SET
options, WAITFOR and its cancel, an Attention behind a relayed batch, RPC, malformed packets). The relay serves TDS only
where backends are not reset between clients (reset_after_transaction = no): with the default the clients stay on the
Python path."""
from __future__ import annotations

import socket
import struct
import threading
import time
import uuid

import pytest

from multiproxy_engines.tds.wire import messages as tp
from multiproxy_engines.tds.wire import token_stream as tk

from .helpers import metric, metrics_text
from .tdskit import recv_message
from .test_tds_proxy import PINNED, RawClient, lab, ms, one, tds_config, users_toml  # noqa: F401 (lab: a fixture)

pymssql = pytest.importorskip("pymssql")
pytestmark = pytest.mark.tds


def compiled(proxy_factory, lab, max_size=3, reset="no", **kwargs):
    config = tds_config(lab, max_size=max_size, **kwargs)
    config["proxy"]["relay"] = "compiled"
    config["clusters"]["main"]["backend"]["reset_after_transaction"] = reset
    return proxy_factory(config, files={"users.toml": users_toml()})


def lanes(proxy) -> dict:
    text = metrics_text(proxy)
    found = {name: metric(text, f"multiproxy_relay_lane_{name}") or 0 for name in ("transactions_total",)}
    found["returns"] = {why: metric(text, "multiproxy_relay_lane_returns_total", why=why) or 0 for why in
                        ("stopped", "malformed", "closed", "connection_lost", "pool_wanted", "no_backend", "settings")}
    return found


@pytest.fixture
def table(lab):
    name = f"relay_{uuid.uuid4().hex[:8]}"
    with pymssql.connect(server="127.0.0.1", port=lab.port, user="sa", password="Lab-pw-1", database="labdb",
                         autocommit=True, tds_version="7.4") as admin:
        admin.cursor().execute(f"CREATE TABLE {name} (client INT, n INT)")
    return name


@pytest.mark.timeout(180)
def test_more_clients_than_backends_run_in_the_relay_with_rows_right(lab, proxy_factory, table):
    proxy = compiled(proxy_factory, lab, max_size=3)
    clients, rounds = 10, 30
    errors = []
    # pymssql's connect sends SET options and USE, which the Python path serves: the SELECTs start once every client
    # is connected (while sessions wait for the pool, the lanes give their free backends to it: RelayLane.pool_wanted)
    connected, selected = threading.Barrier(clients, timeout=60), threading.Barrier(clients, timeout=120)

    def client(number: int) -> None:
        try:
            with ms(proxy) as conn:
                connected.wait()
                for n in range(rounds):
                    text = "x" * n * 40
                    assert one(conn, f"SELECT {number}, {n}, '{text}'") == [(number, n, text)]
                selected.wait()
                conn.cursor().execute(f"INSERT INTO {table} VALUES ({number}, 1)")     # not SELECT first: Python
                assert one(conn, f"SELECT count(*) FROM {table} WHERE client = {number}") == [(1,)]
        except Exception as exc:  # collected, re-raised in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(150)
    assert not errors, errors[:3]
    found = lanes(proxy)
    print("relay lanes:", found)
    assert found["transactions_total"] >= clients * rounds * 0.8, found     # most SELECTs with no Python
    assert found["returns"]["stopped"] >= clients, found                   # the INSERTs
    assert found["returns"]["malformed"] == 0 and found["returns"]["connection_lost"] == 0, found
    assert not metric(metrics_text(proxy), PINNED)


@pytest.mark.timeout(120)
def test_with_the_default_reset_tds_clients_stay_on_the_python_path(lab, proxy_factory):
    proxy = compiled(proxy_factory, lab, max_size=2, reset="auto")
    with ms(proxy) as conn, ms(proxy) as other:
        for n in range(10):
            assert one(conn, f"SELECT {n}") == [(n,)]
            assert one(other, f"SELECT {n}") == [(n,)]
    assert lanes(proxy)["transactions_total"] == 0


@pytest.mark.timeout(120)
def test_a_transaction_runs_on_the_python_path_with_rows_right(lab, proxy_factory, table):
    proxy = compiled(proxy_factory, lab, max_size=2)
    with ms(proxy) as conn, ms(proxy) as other:
        for n in range(5):
            assert one(conn, f"SELECT {n}") == [(n,)]
            assert one(other, f"SELECT {n}") == [(n,)]
        cur = conn.cursor()
        cur.execute("BEGIN TRAN")
        cur.execute(f"INSERT INTO {table} VALUES (1, 1)")
        spid = one(conn, "SELECT @@SPID")
        assert one(other, "SELECT 5") == [(5,)]                          # the other client is served meanwhile
        assert one(conn, f"SELECT count(*) FROM {table}") == [(1,)]
        assert one(conn, "SELECT @@TRANCOUNT") == [(1,)]
        assert one(conn, "SELECT @@SPID") == spid                         # the same backend all along
        cur.execute("COMMIT")
        assert one(other, f"SELECT count(*) FROM {table}") == [(1,)]
        cur.execute("BEGIN TRAN")
        cur.execute(f"INSERT INTO {table} VALUES (2, 2)")
        cur.execute("ROLLBACK")
        assert one(other, f"SELECT count(*) FROM {table}") == [(1,)]
        before = lanes(proxy)["transactions_total"]
        for n in range(5):
            assert one(conn, f"SELECT {n}") == [(n,)]
        assert lanes(proxy)["transactions_total"] >= before + 4           # back in the relay after it


@pytest.mark.timeout(120)
def test_set_options_are_replayed_and_lanes_are_per_setting(lab, proxy_factory):
    proxy = compiled(proxy_factory, lab, max_size=2)
    with ms(proxy) as conn, ms(proxy) as other:
        conn.cursor().execute("SET NOCOUNT ON")
        conn.cursor().execute("SET DATEFORMAT dmy")
        assert one(conn, "SELECT 1") == [(1,)]
        for n in range(10):
            assert one(conn, "SELECT @@OPTIONS & 512") == [(512,)]         # NOCOUNT, wherever it runs
            assert one(other, "SELECT @@OPTIONS & 512") == [(0,)]
        conn.cursor().execute("SET NOCOUNT OFF")
        assert one(conn, "SELECT @@OPTIONS & 512") == [(0,)]
    assert lanes(proxy)["transactions_total"] >= 10
    assert not metric(metrics_text(proxy), PINNED)


@pytest.mark.timeout(120)
def test_cancels_and_an_attention_behind_a_relayed_batch(lab, proxy_factory):
    proxy = compiled(proxy_factory, lab, max_size=2)
    c = RawClient(proxy.port)
    try:
        assert c.rows("SELECT 1") == [[1]]
        # WAITFOR stops the screen: the Python path serves it and its Attention cancels it on the server
        c.send(tp.SQL_BATCH, tp.SqlBatch("WAITFOR DELAY '00:00:30'").encode())
        time.sleep(0.3)
        started = time.monotonic()
        c.sock.sendall(tp.encode_message(tp.ATTENTION, b""))
        toks = c.read_tokens()
        while not any(t.type == tk.TOKEN_DONE and t.status & tk.DONE_ATTN for t in toks):
            toks = c.read_tokens()
        assert time.monotonic() - started < 5
        assert c.rows("SELECT 42") == [[42]]
        # an Attention right behind a relayed batch: the whole answer, then the acknowledgement
        backlog: list = []
        for n in range(5):
            c.sock.sendall(tp.encode_message(tp.SQL_BATCH, tp.SqlBatch(f"SELECT {n}").encode(), 4096)
                           + tp.encode_message(tp.ATTENTION, b"", 4096))
            toks = c.tokens.read(recv_message(c.sock, c.reader, backlog).data)
            if not any(t.type == tk.TOKEN_DONE and t.status & tk.DONE_ATTN for t in toks):
                assert [t.values for t in toks if t.type == tk.TOKEN_ROW] == [[n]]
                toks = c.tokens.read(recv_message(c.sock, c.reader, backlog).data)
            assert toks[-1].type == tk.TOKEN_DONE and toks[-1].status & tk.DONE_ATTN
            assert not backlog
            assert c.rows(f"SELECT {n + 10}") == [[n + 10]]
    finally:
        c.close()
    assert lanes(proxy)["transactions_total"] >= 5


@pytest.mark.timeout(120)
def test_multi_packet_batches_rpc_and_malformed_packets(lab, proxy_factory):
    proxy = compiled(proxy_factory, lab, max_size=2)
    c = RawClient(proxy.port)
    try:
        assert c.rows("SELECT 1") == [[1]]
        big = "SELECT '" + "y" * 5000 + "'"                    # several packets: the Python path joins them
        assert c.rows(big) == [["y" * 5000]]
        with ms(proxy) as conn:
            cur = conn.cursor()
            cur.execute("SELECT %d + 1", (41,))                # pymssql interpolates: a batch, relayed
            assert cur.fetchall() == [(42,)]
        assert c.rows("SELECT 2") == [[2]]
    finally:
        c.close()
    for bad in (struct.pack(">BBHHBB", 0x01, 0x01, 4, 0, 1, 0),           # a length below the header
                struct.pack(">BBHHBB", 0x55, 0x01, 9, 0, 1, 0) + b"x"):    # an unknown type
        c = RawClient(proxy.port)
        try:
            assert c.rows("SELECT 3") == [[3]]
            c.sock.sendall(bad)
            c.sock.settimeout(10)
            got = b""
            try:
                while True:
                    data = c.sock.recv(65536)
                    if not data:
                        break
                    got += data
            except (ConnectionResetError, socket.timeout):
                pass
            assert got == b"" or got[0] == tp.TABULAR_RESULT
        finally:
            c.close()
    with ms(proxy) as conn:                                    # the proxy and its backends serve on
        assert one(conn, "SELECT 9") == [(9,)]
    assert lanes(proxy)["returns"]["connection_lost"] == 0
