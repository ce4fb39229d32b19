"""Malformed and hostile PostgreSQL clients against one proxy, while a well-behaved client keeps working.

One proxy serves the whole module. A psycopg client runs transactions in a thread for the module's
lifetime and must never see an error; each case speaks raw bytes on its own socket and checks that the
proxy answers (ErrorResponse with the right SQLSTATE, or a clean close) and never hangs. The bad clients
that log in use database `mp_badinput`, a pool of its own, so its borrowed-connections gauge is not
disturbed by the background traffic. The last test checks the process is alive, healthy and holds no
more file descriptors than it did before the cases.
"""
from __future__ import annotations

import os
import re
import socket
import struct
import threading
import time
import urllib.request

import psycopg
import pytest

from .helpers import read_until_closed
from .proxy import ProxyProcess, free_port

USER = "mp_trust"
DB = "mpdb"                 # the background client's database
BAD_DB = "mp_badinput"      # the database of the bad clients that log in (a separate pool)
TRAFFIC_TABLE = "mp_bad_traffic"
HANDSHAKE_TIMEOUT = 2.0

pytestmark = pytest.mark.timeout(60)


# ---------------------------------------------------------------------------------------------- raw protocol

def startup_packet(params: dict[str, str], version: int = 196608) -> bytes:
    body = struct.pack("!I", version)
    for key, value in params.items():
        body += key.encode() + b"\x00" + value.encode() + b"\x00"
    body += b"\x00"
    return struct.pack("!I", len(body) + 4) + body


def message(kind: bytes, payload: bytes) -> bytes:
    return kind + struct.pack("!I", len(payload) + 4) + payload


def parse_messages(data: bytes) -> list[tuple[bytes, bytes]]:
    """Whole backend messages in `data` (a trailing partial message is ignored)."""
    out = []
    pos = 0
    while len(data) - pos >= 5:
        length = struct.unpack_from("!I", data, pos + 1)[0]
        if length < 4 or pos + 1 + length > len(data):
            break
        out.append((data[pos:pos + 1], data[pos + 5:pos + 1 + length]))
        pos += 1 + length
    return out


def error_fields(body: bytes) -> dict[str, str]:
    fields = {}
    for part in body.split(b"\x00"):
        if part:
            fields[chr(part[0])] = part[1:].decode("utf-8", "replace")
    return fields


def errors_in(data: bytes) -> list[dict[str, str]]:
    return [error_fields(body) for kind, body in parse_messages(data) if kind == b"E"]


def connect_raw(address, timeout: float = 5.0) -> socket.socket:
    return socket.create_connection(address, timeout=timeout)


def read_until_ready(sock: socket.socket, timeout: float = 5.0) -> bytes:
    """Read until a ReadyForQuery arrives; fail on close or timeout."""
    deadline = time.monotonic() + timeout
    data = b""
    while True:
        msgs = parse_messages(data)
        if msgs and msgs[-1][0] == b"Z":
            return data
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"no ReadyForQuery within {timeout}s; got {data!r}"
        sock.settimeout(remaining)
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before ReadyForQuery; got {data!r}"
        data += chunk


def login(address, database: str = BAD_DB) -> socket.socket:
    sock = connect_raw(address)
    sock.sendall(startup_packet({"user": USER, "database": database}))
    data = read_until_ready(sock)
    kinds = [k for k, _ in parse_messages(data)]
    assert kinds[0] == b"R" and b"E" not in kinds, data
    return sock


def assert_error_then_close(sock: socket.socket, sqlstates: tuple[str, ...], timeout: float = 5.0,
                            severity: str | None = None) -> dict[str, str]:
    data, closed = read_until_closed(sock, timeout)
    assert closed, f"the proxy neither answered nor closed within {timeout}s (got {data!r})"
    errs = errors_in(data)
    assert errs, f"expected an ErrorResponse before the close, got {data!r}"
    assert errs[-1].get("C") in sqlstates, errs
    if severity:
        assert errs[-1].get("S") == severity, errs
    return errs[-1]


def assert_error_or_clean_close(sock: socket.socket, sqlstates: tuple[str, ...], timeout: float = 5.0) -> None:
    data, closed = read_until_closed(sock, timeout)
    assert closed, f"the proxy neither answered nor closed within {timeout}s (got {data!r})"
    if data:
        errs = errors_in(data)
        assert errs and errs[-1].get("C") in sqlstates, f"unexpected answer {data!r}"


# ---------------------------------------------------------------------------------------------- admin helpers

def http_get(admin, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://{admin[0]}:{admin[1]}{path}", timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def borrowed(admin, database: str) -> float | None:
    _, text = http_get(admin, "/metrics")
    for line in text.splitlines():
        if line.startswith("multiproxy_database_connections_currently_borrowed{") and f'database="{database}"' in line \
                and f'user="{USER}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return None


def wait_for(predicate, timeout: float, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    value = predicate()
    while not value and time.monotonic() < deadline:
        time.sleep(interval)
        value = predicate()
    return value


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


# ---------------------------------------------------------------------------------------------- background client

class Traffic(threading.Thread):
    """A steady loop of small transactions through the proxy; every exception is recorded."""

    def __init__(self, address):
        super().__init__(daemon=True, name="pg-traffic")
        self.address = address
        self.stop_event = threading.Event()
        self.ok = 0
        self.errors: list[str] = []

    def _connect(self):
        return psycopg.connect(host=self.address[0], port=self.address[1], user=USER, dbname=DB, autocommit=True,
                               prepare_threshold=None, connect_timeout=5)

    def run(self) -> None:
        conn = None
        i = int.from_bytes(os.urandom(4), "big") * 1_000_000   # unique values even when several runs share the table
        while not self.stop_event.is_set():
            try:
                if conn is None or conn.closed:
                    conn = self._connect()
                i += 1
                with conn.transaction():
                    cur = conn.execute(f"INSERT INTO {TRAFFIC_TABLE} (n) VALUES (%s) RETURNING n", (i,))
                    assert cur.fetchone()[0] == i
                    cur = conn.execute(f"SELECT count(*) FROM {TRAFFIC_TABLE} WHERE n = %s", (i,))
                    assert cur.fetchone()[0] == 1
                self.ok += 1
            except Exception as exc:  # recorded, asserted by the tests
                self.errors.append(f"{type(exc).__name__}: {exc}")
                if conn is not None:
                    try:
                        conn.close()
                    except Exception:
                        pass
                conn = None
                time.sleep(0.1)
            self.stop_event.wait(0.005)
        if conn is not None:
            conn.close()

    def assert_healthy(self, timeout: float = 5.0) -> None:
        """No error so far, and the loop is still making progress."""
        before = self.ok
        progressed = wait_for(lambda: self.ok > before + 2 or self.errors, timeout)
        assert self.errors == []
        assert progressed, f"background traffic stalled at {self.ok}"
        assert self.is_alive()


class Env:
    def __init__(self, proxy: ProxyProcess, traffic: Traffic, pg):
        self.proxy = proxy
        self.traffic = traffic
        self.pg = pg
        self.address = proxy.address("pg")
        self.admin = proxy.admin_address
        self.baseline_fds = 0

    def assert_pool_idle_and_serving(self, timeout: float = 5.0) -> None:
        # None: the pool does not exist yet (before the first client of BAD_DB)
        assert wait_for(lambda: borrowed(self.admin, BAD_DB) in (0, None), timeout), \
            f"borrowed gauge of {BAD_DB} stays at {borrowed(self.admin, BAD_DB)}\n{self.proxy.log_tail()}"
        with psycopg.connect(host=self.address[0], port=self.address[1], user=USER, dbname=BAD_DB, autocommit=True,
                             prepare_threshold=None, connect_timeout=5) as conn:
            assert conn.execute("SELECT 41 + 1").fetchone() == (42,)
        assert wait_for(lambda: borrowed(self.admin, BAD_DB) == 0, timeout)


@pytest.fixture(scope="module")
def env(pg, tmp_path_factory):
    if pg.psql(f"SELECT 1 FROM pg_database WHERE datname = '{BAD_DB}';") != "1":
        pg.psql(f"CREATE DATABASE {BAD_DB} OWNER {USER};")
    pg.psql(f"DROP TABLE IF EXISTS {TRAFFIC_TABLE}; CREATE TABLE {TRAFFIC_TABLE} (n bigint);", db=DB, user=USER)
    pg.psql("DROP TABLE IF EXISTS mid_tx; CREATE TABLE mid_tx (marker text);", db=BAD_DB, user=USER)
    config = {
        "proxy": {"admin_listen": f"127.0.0.1:{free_port()}", "log_level": "info",
                  "handshake_timeout": HANDSHAKE_TIMEOUT},
        "clusters": {"main": {"engine": "postgres", "hosts": [f"127.0.0.1:{pg.port}"], "backend": {"tls": "disable"},
                              "pool": {"mode": "transaction", "max_size": 3, "borrow_timeout": 5.0}}},
        "listeners": [{"name": "pg", "listen": f"127.0.0.1:{free_port()}", "cluster": "main", "role": "writer",
                       "auth": "trust"}],
    }
    proxy = ProxyProcess(config, workdir=str(tmp_path_factory.mktemp("bad-input-proxy")))
    proxy.start()
    traffic = Traffic(proxy.address("pg"))
    e = Env(proxy, traffic, pg)
    try:
        traffic.start()
        assert wait_for(lambda: traffic.ok >= 5 or traffic.errors, 15), "background traffic did not start"
        assert traffic.errors == []
        e.assert_pool_idle_and_serving()      # opens the bad clients' pool once, so the baseline includes it
        time.sleep(0.3)
        e.baseline_fds = open_fds(proxy.pid)
        yield e
    finally:
        traffic.stop_event.set()
        traffic.join(10)
        proxy.stop()


# ---------------------------------------------------------------------------------------------- startup packet

def test_startup_length_2gib(env):
    with connect_raw(env.address) as sock:
        sock.sendall(struct.pack("!II", 0x80000000, 196608) + b"user\x00mp_trust\x00")
        assert_error_or_clean_close(sock, ("08P01",))
    env.traffic.assert_healthy()


def test_startup_length_2gib_header_only(env):
    """Only the 4 length bytes: the proxy must not wait for a 2 GiB body."""
    with connect_raw(env.address) as sock:
        sock.sendall(struct.pack("!I", 0x7FFFFFFF + 1))
        assert_error_or_clean_close(sock, ("08P01",))
    env.traffic.assert_healthy()


@pytest.mark.parametrize("length", [0, 4, 7])
def test_startup_length_below_8(env, length):
    with connect_raw(env.address) as sock:
        sock.sendall(struct.pack("!II", length, 196608))
        assert_error_or_clean_close(sock, ("08P01",))
    env.traffic.assert_healthy()


@pytest.mark.parametrize("garbage", [
    b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(32)),    # a TLS ClientHello without SSLRequest
    b"\x00\x00\x00\x10\xde\xad\xbe\xef" + b"\xff" * 8,                     # right length, nonsense version
    bytes((i * 37 + 11) & 0xFF for i in range(512)),
], ids=["http", "tls-hello", "bad-version", "noise"])
def test_startup_garbage(env, garbage):
    with connect_raw(env.address) as sock:
        sock.sendall(garbage)
        assert_error_or_clean_close(sock, ("08P01",))
    env.traffic.assert_healthy()


@pytest.mark.parametrize("body", [
    b"user\x00mp_trust",                       # no terminator at all
    b"user\x00mp_trust\x00database",           # a key without value or terminator
    b"user\x00mp_trust\x00database\x00",       # a key with no value before the end
    b"user\x00\xff\xfe\x00\x00",               # not UTF-8
], ids=["no-nul", "dangling-key", "key-without-value", "bad-utf8"])
def test_startup_unterminated_parameters(env, body):
    packet = struct.pack("!II", 8 + len(body), 196608) + body
    with connect_raw(env.address) as sock:
        sock.sendall(packet)
        data, closed = read_until_closed(sock, 5)
        assert closed, f"no close within 5s, got {data!r}"
        errs = errors_in(data)
        assert errs and errs[-1]["C"] == "08P01", data
        assert errs[-1]["S"] == "FATAL"
    env.traffic.assert_healthy()


def test_startup_protocol_2(env):
    with connect_raw(env.address) as sock:
        sock.sendall(startup_packet({"user": USER, "database": BAD_DB}, version=2 << 16))
        err = assert_error_then_close(sock, ("08P01", "0A000"))
        assert "protocol" in err.get("M", "").lower()
    env.traffic.assert_healthy()


def test_truncated_startup_then_silence(env):
    packet = startup_packet({"user": USER, "database": BAD_DB})
    with connect_raw(env.address) as sock:
        started = time.monotonic()
        sock.sendall(packet[:len(packet) - 5])
        err = assert_error_then_close(sock, ("08P01",), timeout=HANDSHAKE_TIMEOUT + 5)
        elapsed = time.monotonic() - started
    assert HANDSHAKE_TIMEOUT - 0.3 <= elapsed <= HANDSHAKE_TIMEOUT + 3, elapsed
    assert err["S"] == "FATAL"
    env.traffic.assert_healthy()


def test_silent_client_is_closed_after_handshake_timeout(env):
    with connect_raw(env.address) as sock:
        started = time.monotonic()
        assert_error_or_clean_close(sock, ("08P01",), timeout=HANDSHAKE_TIMEOUT + 5)
        assert time.monotonic() - started >= HANDSHAKE_TIMEOUT - 0.3
    env.traffic.assert_healthy()


def test_ssl_request_answered_n_without_tls(env):
    """No TLS on this listener: SSLRequest gets 'N', and the plaintext login goes on as usual."""
    with connect_raw(env.address) as sock:
        sock.sendall(struct.pack("!II", 8, 80877103))
        sock.settimeout(5)
        assert sock.recv(1) == b"N"
        sock.sendall(startup_packet({"user": USER, "database": BAD_DB}))
        read_until_ready(sock)
        sock.sendall(message(b"Q", b"SELECT 1\x00"))
        data = read_until_ready(sock)
        assert [k for k, _ in parse_messages(data)] == [b"T", b"D", b"C", b"Z"]
        sock.sendall(message(b"X", b""))
    env.assert_pool_idle_and_serving()
    env.traffic.assert_healthy()


# ---------------------------------------------------------------------------------------------- after login

def test_message_length_0x7fffffff(env):
    with login(env.address) as sock:
        sock.sendall(b"Q" + struct.pack("!I", 0x7FFFFFFF))
        assert_error_then_close(sock, ("54000", "08P01"), severity="FATAL")
    env.assert_pool_idle_and_serving()
    env.traffic.assert_healthy()


@pytest.mark.parametrize("length", [0, 3])
def test_message_length_below_4(env, length):
    with login(env.address) as sock:
        sock.sendall(b"Q" + struct.pack("!I", length) + b"SELECT 1\x00")
        assert_error_then_close(sock, ("08P01",), severity="FATAL")
    env.assert_pool_idle_and_serving()
    env.traffic.assert_healthy()


@pytest.mark.parametrize("kind", [b"Q", b"P", b"E", b"d"], ids=["query", "parse", "execute", "copydata"])
def test_truncated_message_then_disconnect(env, kind):
    """Half a message (Query/Parse are buffered whole, Execute/CopyData are streamed), then the client vanishes."""
    with login(env.address) as sock:
        sock.sendall(kind + struct.pack("!I", 1000) + b"SELECT pg_sleep(0)")
        time.sleep(0.3)
    env.assert_pool_idle_and_serving()
    env.traffic.assert_healthy()


def test_unknown_message_type_after_login(env):
    with login(env.address) as sock:
        sock.sendall(message(b"y", b"whatever\x00"))
        err = assert_error_then_close(sock, ("08P01",), severity="FATAL")
        assert err.get("M")
    env.assert_pool_idle_and_serving()
    env.traffic.assert_healthy()


def test_unknown_message_type_inside_transaction(env):
    """The same violation while the client holds a backend in a transaction: rolled back, backend not leaked."""
    with login(env.address) as sock:
        sock.sendall(message(b"Q", b"BEGIN; INSERT INTO mid_tx VALUES ('unknown-type')\x00"))
        data = read_until_ready(sock)
        assert parse_messages(data)[-1] == (b"Z", b"T")
        sock.sendall(message(b"y", b""))
        assert_error_then_close(sock, ("08P01",), severity="FATAL")
    env.assert_pool_idle_and_serving()
    assert env.pg.psql("SELECT count(*) FROM mid_tx WHERE marker = 'unknown-type';", db=BAD_DB) == "0"
    env.traffic.assert_healthy()


def test_disconnect_mid_transaction(env):
    with login(env.address) as sock:
        sock.sendall(message(b"Q", b"BEGIN\x00"))
        assert parse_messages(read_until_ready(sock))[-1] == (b"Z", b"T")
        sock.sendall(message(b"Q", b"INSERT INTO mid_tx VALUES ('abandoned')\x00"))
        data = read_until_ready(sock)
        assert [k for k, _ in parse_messages(data)] == [b"C", b"Z"]
        assert parse_messages(data)[-1] == (b"Z", b"T")
        assert borrowed(env.admin, BAD_DB) == 1          # the transaction holds its backend
        # Abortive close (RST), the way a killed client process goes away.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    # The backend is closed (not reused), so the server rolls the transaction back.
    env.assert_pool_idle_and_serving()
    assert wait_for(lambda: env.pg.psql(
        f"SELECT count(*) FROM pg_stat_activity WHERE datname = '{BAD_DB}' AND state LIKE 'idle in transaction%';") == "0",
        5), "a backend is still idle in transaction"
    assert env.pg.psql("SELECT count(*) FROM mid_tx WHERE marker = 'abandoned';", db=BAD_DB) == "0"
    env.traffic.assert_healthy()


def test_disconnect_mid_transaction_with_pipelined_rest(env):
    """The client pipelines BEGIN, an INSERT and a slow query, then vanishes before reading anything."""
    with login(env.address) as sock:
        sock.sendall(message(b"Q", b"BEGIN\x00") + message(b"Q", b"INSERT INTO mid_tx VALUES ('pipelined')\x00")
                     + message(b"Q", b"SELECT pg_sleep(0.5)\x00"))
        time.sleep(0.1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    env.assert_pool_idle_and_serving(timeout=8)
    assert env.pg.psql("SELECT count(*) FROM mid_tx WHERE marker = 'pipelined';", db=BAD_DB) == "0"
    env.traffic.assert_healthy()


def test_many_bad_clients_at_once(env):
    """A burst of bad clients in parallel: each gets an answer or a close, none hangs."""
    socks = [connect_raw(env.address) for _ in range(30)]
    try:
        for i, sock in enumerate(socks):
            sock.sendall([b"\x00\x00\x00\x04", b"\xff" * 16, struct.pack("!II", 9, 2 << 16) + b"\x00"][i % 3])
        for sock in socks:
            assert_error_or_clean_close(sock, ("08P01",))
    finally:
        for sock in socks:
            sock.close()
    env.traffic.assert_healthy()


def test_query_pipelined_with_startup(env):
    """Startup and a Query in one write. PostgreSQL answers the query; the proxy must answer it or refuse, never go silent."""
    with connect_raw(env.address) as sock:
        sock.sendall(startup_packet({"user": USER, "database": BAD_DB}) + message(b"Q", b"SELECT 1\x00"))
        data, closed = read_until_closed(sock, 3)
        kinds = [k for k, _ in parse_messages(data)]
        if closed:   # refused as a protocol violation
            errs = errors_in(data)
            assert errs and errs[-1]["C"] == "08P01" and errs[-1]["S"] == "FATAL", data
        else:        # or served like PostgreSQL does
            assert kinds[-5:] == [b"Z", b"T", b"D", b"C", b"Z"], kinds
    env.assert_pool_idle_and_serving()
    env.traffic.assert_healthy()


# ---------------------------------------------------------------------------------------------- the process after all that

def test_proxy_alive_healthy_and_fds_back_to_baseline(env):
    assert env.proxy.running
    assert http_get(env.admin, "/healthz") == (200, "ok\n")
    env.assert_pool_idle_and_serving()
    slack = 2
    assert wait_for(lambda: open_fds(env.proxy.pid) <= env.baseline_fds + slack, 10), \
        f"fds: baseline {env.baseline_fds}, now {open_fds(env.proxy.pid)}: " + \
        " ".join(sorted(os.readlink(f"/proc/{env.proxy.pid}/fd/{fd}") for fd in os.listdir(f"/proc/{env.proxy.pid}/fd")))
    _, metrics = http_get(env.admin, "/metrics")
    protocol_errors = re.search(r"^multiproxy_client_protocol_errors_total (\S+)$", metrics, re.M)
    assert protocol_errors and float(protocol_errors.group(1)) >= 10, metrics
    env.traffic.assert_healthy()
    assert env.traffic.ok > 50
    log = env.proxy.log_text()
    assert "Traceback" not in log, log[-4000:]


# ---------------------------------------------------------------------------------------------- malformed extended messages
# Each on a proxy of its own, with its own background client: a regression here (at 3841ddb Bind crashed the
# session greenlet with a traceback) must not hide behind the module's final no-traceback check.

MALFORMED = {
    "parse-no-nul": message(b"P", b"stmt"),
    "parse-unterminated-query": message(b"P", b"\x00SELECT 1"),
    "bind-portal-name-only": message(b"B", b"\x00"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_extended_message(pg, proxy_factory, case):
    """Parse/Bind whose strings are not NUL-terminated inside the message: FATAL 08P01, a close, no traceback."""
    if pg.psql(f"SELECT 1 FROM pg_database WHERE datname = '{BAD_DB}';") != "1":
        pg.psql(f"CREATE DATABASE {BAD_DB} OWNER {USER};")
    pg.psql(f"CREATE TABLE IF NOT EXISTS {TRAFFIC_TABLE} (n bigint);", db=DB, user=USER)
    config = {
        "proxy": {"admin_listen": f"127.0.0.1:{free_port()}", "log_level": "info", "handshake_timeout": HANDSHAKE_TIMEOUT},
        "clusters": {"main": {"engine": "postgres", "hosts": [f"127.0.0.1:{pg.port}"], "backend": {"tls": "disable"},
                              "pool": {"mode": "transaction", "max_size": 3, "borrow_timeout": 5.0}}},
        "listeners": [{"name": "pg", "listen": f"127.0.0.1:{free_port()}", "cluster": "main", "role": "writer",
                       "auth": "trust"}],
    }
    proxy = proxy_factory(config)
    traffic = Traffic(proxy.address("pg"))
    e = Env(proxy, traffic, pg)
    traffic.start()
    try:
        assert wait_for(lambda: traffic.ok >= 3 or traffic.errors, 15)
        with login(e.address) as sock:
            sock.sendall(MALFORMED[case])
            assert_error_then_close(sock, ("08P01",), severity="FATAL")
        e.assert_pool_idle_and_serving()
        traffic.assert_healthy()
        assert proxy.running
        assert "Traceback" not in proxy.log_text(), proxy.log_tail()
    finally:
        traffic.stop_event.set()
        traffic.join(10)
