"""Hostile load against one proxy with PostgreSQL, MySQL and TDS listeners while valid clients keep working.

One proxy process: a PostgreSQL listener (SCRAM, TLS available), a PostgreSQL token listener (JWT, HS256 key
from an environment variable), a MySQL listener (TLS available) and a TDS listener, in front of the private
PostgreSQL and MariaDB and a TDS lab server. Valid clients (pg8000, psycopg with a JWT, PyMySQL, pymssql) run
transactions from 127.0.0.1 and check each one's effect; meanwhile several hundred hostile connections, at most
HOSTILE_CONCURRENCY at once, send garbage, half handshakes then stall or close, 2 GiB (or the largest) lengths,
truncated messages, wrong passwords, expired JWTs and TLS garbage. Wrong passwords and tokens come from
127.0.0.2-127.0.0.4, which the failed-login throttle blocks; the rest from 127.0.0.5-127.0.0.8, which never fail
a login and so reach the parsers. Afterwards the proxy's descriptors, RSS and /metrics are back where they were.
"""
from __future__ import annotations

import os
import random
import socket
import ssl
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import jwt
import pg8000.native
import psycopg
import pymysql
import pytest

from multiproxy_engines.mysql import protocol as myp
from multiproxy_engines.mysql.auth import native_scramble
from multiproxy.auth import UsersFile
from multiproxy_engines.tds.wire import messages as tp

from ..fuzzkit import check_mysql_error, check_pg_error, check_tds_error, tls_client_hello
from .helpers import metric, metrics_text
from .proxy import free_port
from .tdskit import DB as TDS_DB
from .tdskit import LAB_PASSWORD, LAB_USER, LabProcess
from .test_pg_tls import write_pki

pymssql = pytest.importorskip("pymssql")
pytestmark = pytest.mark.timeout(120)

PG_USER, PG_PASSWORD, PG_DB = "mp_trust", "hostile-load-pg-pw", "mpdb"
APP_USER, APP_PASSWORD = "app", "hostile-load-app-pw"      # MySQL and TDS clients
MY_DB = "mpdb"
JWT_ENV, JWT_KEY, ISS, AUD = "MP_HOSTILE_JWT_KEY", "hostile-load-shared-key-of-40-characters", "https://iss.test", "mp"
HANDSHAKE_TIMEOUT = 2.0
MAX_MESSAGE = 1 << 20
HOSTILE_TOTAL = 420
HOSTILE_CONCURRENCY = 40
WRONG_SOURCES = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
RAW_SOURCES = ["127.0.0.5", "127.0.0.6", "127.0.0.7", "127.0.0.8"]
MY_CAPS = (myp.CLIENT_PROTOCOL_41 | myp.CLIENT_SECURE_CONNECTION | myp.CLIENT_PLUGIN_AUTH | myp.CLIENT_CONNECT_WITH_DB
           | myp.CLIENT_TRANSACTIONS | myp.CLIENT_MULTI_RESULTS)
END_TIMEOUT = HANDSHAKE_TIMEOUT + 6.0     # a hostile connection must be answered and closed within this
# RSS margin after the load, against the baseline taken after warm-up (which ran every hostile kind once).
# CPython keeps an arena while one object in it lives, glibc keeps freed heap below its trim threshold,
# OpenSSL and gevent keep per-thread and hub caches: a few MiB can stay after hundreds of connections even with
# nothing leaked. 16 MiB stays far below what a leak would hold: ~40 KiB kept per hostile connection (a read
# buffer, a greenlet, a TLS object) over HOSTILE_TOTAL connections already exceeds it.
RSS_MARGIN_KB = 16 * 1024


# ---------------------------------------------------------------------------------------------- proxy

def jwt_token(exp_in: int, user: str = PG_USER) -> str:
    return jwt.encode({"iss": ISS, "aud": AUD, "sub": user, "exp": int(time.time()) + exp_in}, JWT_KEY,
                      algorithm="HS256")


def users_toml() -> str:
    users = UsersFile()
    users.add(PG_USER, PG_PASSWORD)
    users.add(APP_USER, APP_PASSWORD, kinds=["mysql_native_password", "tds_sha256"])
    return users.dumps()


def hostile_config(pg, mariadb, lab, pki) -> dict:
    tls = {"tls_cert_file": pki["cert"], "tls_key_file": pki["key"]}
    return {
        "proxy": {"admin_listen": f"127.0.0.1:{free_port()}", "log_level": "warning",
                  "handshake_timeout": HANDSHAKE_TIMEOUT, "max_message_size": MAX_MESSAGE,
                  "auth_failure_delay": 0.05, "auth_failure_max_delay": 0.2, "auth_failure_block_after": 5,
                  "auth_failure_block_seconds": 300.0},
        "auth": {"users_file": "users.toml"},
        "clusters": {
            "pg": {"engine": "postgres", "hosts": [f"127.0.0.1:{pg.port}"], "backend": {"tls": "disable"},
                   "pool": {"max_size": 4}},
            "my": {"engine": "mysql", "hosts": [f"127.0.0.1:{mariadb.port}"], "backend": {"tls": "disable"},
                   "pool": {"max_size": 4},
                   "credentials": [{"user": "*", "backend_user": "mp_native", "password": "native-pw"}]},
            "tds": {"engine": "tds", "hosts": [f"127.0.0.1:{lab.port}"], "backend": {"tls": "disable"},
                    "pool": {"max_size": 4},
                    "credentials": [{"user": "*", "backend_user": LAB_USER, "password": LAB_PASSWORD}]},
        },
        "listeners": [
            {"name": "pg", "listen": f"127.0.0.1:{free_port()}", "cluster": "pg", "auth": "scram-sha-256", **tls},
            {"name": "pgtok", "listen": f"127.0.0.1:{free_port()}", "cluster": "pg", "auth": "token",
             "token_kind": "jwt", "jwt_shared_key_env": JWT_ENV, "jwt_issuer": ISS, "jwt_audience": AUD, **tls},
            {"name": "my", "listen": f"127.0.0.1:{free_port()}", "cluster": "my", "auth": "mysql_native_password",
             **tls},
            {"name": "tds", "listen": f"127.0.0.1:{free_port()}", "cluster": "tds", "auth": "scram-sha-256"},
        ],
    }


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def settled_rss_kb(pid: int, seconds: float = 1.5) -> int:
    """The lowest RSS over a short while: memory only goes down by being freed, so the minimum is the settled
    value even when a busy machine delays the proxy's last frees."""
    low, ends = rss_kb(pid), time.monotonic() + seconds
    while time.monotonic() < ends:
        time.sleep(0.1)
        low = min(low, rss_kb(pid))
    return low


def wait_for(predicate, timeout: float) -> bool:
    ends = time.monotonic() + timeout
    while time.monotonic() < ends:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


# ---------------------------------------------------------------------------------------------- valid clients

class Worker(threading.Thread):
    """A valid client running checked transactions in a loop from 127.0.0.1; pause() parks it with only its
    persistent connection (if any) open."""

    def __init__(self, name: str, connect, transaction, persistent: bool):
        super().__init__(name=name, daemon=True)
        self.connect, self.transaction, self.persistent = connect, transaction, persistent
        self.committed = 0
        self.errors: list[str] = []
        self.stop = threading.Event()
        self.pause_wanted = threading.Event()
        self.paused = threading.Event()

    def run(self):
        conn = None
        while not self.stop.is_set():
            if self.pause_wanted.is_set():
                if conn is not None and not self.persistent:
                    conn.close()
                    conn = None
                self.paused.set()
                while self.pause_wanted.is_set() and not self.stop.is_set():
                    time.sleep(0.02)
                self.paused.clear()
                continue
            try:
                if conn is None:
                    conn = self.connect()
                self.transaction(conn, self.name, self.committed + 1)
                self.committed += 1
                if not self.persistent:
                    conn.close()
                    conn = None
            except Exception as exc:  # every error of a valid client fails the test
                self.errors.append(f"{type(exc).__name__}: {exc}")
                conn = None
                time.sleep(0.2)
        if conn is not None:
            conn.close()

    def pause(self):
        self.pause_wanted.set()
        assert self.paused.wait(30), f"{self.name} did not pause"

    def resume(self):
        self.pause_wanted.clear()


def pg_transaction(conn, worker, n):
    conn.run("BEGIN")
    conn.run("INSERT INTO hostile_load (worker, n) VALUES (:w, :n)", w=worker, n=n)
    count = conn.run("SELECT count(*) FROM hostile_load WHERE worker = :w", w=worker)[0][0]
    assert count == n, (worker, count, n)
    conn.run("COMMIT")


def psycopg_transaction(conn, worker, n):
    with conn.transaction():
        conn.execute("INSERT INTO hostile_load (worker, n) VALUES (%s, %s)", (worker, n))
        count = conn.execute("SELECT count(*) FROM hostile_load WHERE worker = %s", (worker,)).fetchone()[0]
        assert count == n, (worker, count, n)


def dbapi_transaction(conn, worker, n):
    cur = conn.cursor()
    cur.execute("INSERT INTO hostile_load (worker, n) VALUES (%s, %s)", (worker, n))
    cur.execute("SELECT count(*) FROM hostile_load WHERE worker = %s", (worker,))
    count = cur.fetchall()[0][0]
    assert count == n, (worker, count, n)
    conn.commit()


# ---------------------------------------------------------------------------------------------- hostile clients

def raw(address, source: str) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.bind((source, 0))
    sock.connect(address)
    return sock


CHECK = {"pg": check_pg_error, "my": check_mysql_error, "tds": check_tds_error}


def expect_end(sock, engine: str | None, timeout: float = END_TIMEOUT) -> str:
    """The proxy must close within `timeout`; what it said before must be its protocol's error (or nothing).
    engine None: after TLS started, whatever the TLS layer said. A reset (the proxy closed with our unread
    bytes in its buffer) may cut its answer short: then only the close is checked."""
    data, ends = b"", time.monotonic() + timeout
    try:
        while True:
            remaining = ends - time.monotonic()
            assert remaining > 0, f"no close within {timeout} s (a hang); got {data[:200]!r}"
            sock.settimeout(remaining)
            try:
                chunk = sock.recv(65536)
            except socket.timeout:
                continue
            except ConnectionResetError:
                return "error" if data else "closed"
            if not chunk:
                break
            data += chunk
    finally:
        sock.close()
    if data and engine is not None:
        CHECK[engine](data)
    return "error" if data else "closed"


def pg_startup(user=PG_USER, database=PG_DB) -> bytes:
    body = struct.pack("!I", 196608) + b"user\x00" + user.encode() + b"\x00database\x00" + database.encode() + b"\x00\x00"
    return struct.pack("!I", len(body) + 4) + body


def tls_garbage(rng) -> bytes:
    hello = tls_client_hello()
    choice = rng.randrange(3)
    if choice == 0:
        return os.urandom(rng.randint(1, 600))
    if choice == 1:
        return hello[:rng.randint(1, len(hello) - 1)]                 # a truncated ClientHello
    broken = bytearray(hello)
    for _ in range(8):
        broken[rng.randrange(5, len(broken))] = rng.randrange(256)
    return bytes(broken)


def make_hostile(addresses, pki_ctx):
    pg, tok, my, tds = addresses["pg"], addresses["pgtok"], addresses["my"], addresses["tds"]
    prelogin = tp.encode_message(tp.PRELOGIN, tp.Prelogin.build(encryption=tp.ENCRYPT_NOT_SUP).encode())

    def login7(password):
        return tp.encode_message(tp.LOGIN7, tp.Login7(username=APP_USER, password=password, database=TDS_DB).encode())

    # -- PostgreSQL
    def pg_garbage(src, rng):
        s = raw(pg, src)
        s.sendall(os.urandom(rng.randint(1, 2048)))
        return expect_end(s, "pg")

    def pg_half_stall(src, rng):
        s = raw(pg, src)
        startup = pg_startup()
        s.sendall(startup[:rng.randint(1, len(startup) - 1)])
        return expect_end(s, "pg")                      # the handshake timeout closes it with 08P01

    def pg_half_close(src, rng):
        s = raw(pg, src)
        s.sendall(pg_startup()[:rng.randint(1, 12)])
        s.close()
        return "closed"

    def pg_2gib_startup(src, rng):
        s = raw(pg, src)
        s.sendall(struct.pack("!II", 0x80000000, 196608) + os.urandom(64))
        return expect_end(s, "pg")

    def pg_tls_garbage(src, rng):
        s = raw(pg, src)
        s.sendall(struct.pack("!II", 8, 80877103))
        assert s.recv(1) == b"S"
        s.sendall(tls_garbage(rng))
        return expect_end(s, None)

    def pg_scram_stall(src, rng):
        s = raw(pg, src)
        s.sendall(pg_startup() + b"p\x00\x00\x00\x40SCRAM-SHA-256\x00")   # a SASLInitialResponse cut short
        return expect_end(s, "pg")

    def pg_logged_in_then(src, rng):
        conn = pg8000.native.Connection(PG_USER, host=pg[0], port=pg[1], database=PG_DB, password=PG_PASSWORD,
                                        timeout=10, source_address=(src, 0))
        conn._sock.close()         # pg8000's buffered file: without it the socket would outlive close()
        s = conn._usock
        kind = rng.randrange(3)
        if kind == 0:
            s.sendall(b"Q" + struct.pack("!I", 0x80000000) + b"SELECT")         # 2 GiB Query: 54000
            return expect_end(s, "pg")
        if kind == 1:
            s.sendall(b"\x01" + struct.pack("!I", 8) + b"abcd")                # unknown message type: 08P01
            return expect_end(s, "pg")
        s.sendall(b"Q" + struct.pack("!I", 200) + b"SELECT 1")                  # truncated, then gone
        s.close()
        return "closed"

    def pg_wrong_password(src, rng):
        with pytest.raises(pg8000.native.DatabaseError) as info:
            pg8000.native.Connection(PG_USER, host=pg[0], port=pg[1], database=PG_DB, password="wrong-" + str(rng.random()),
                                     timeout=10, source_address=(src, 0))
        assert info.value.args[0]["C"] == "28P01", info.value.args
        return "error"

    def pg_expired_jwt(src, rng):
        token = jwt_token(-rng.randint(1, 3600)) if rng.random() < 0.8 else jwt_token(60, user="mallory")
        with pytest.raises(pg8000.native.DatabaseError) as info:
            pg8000.native.Connection(PG_USER, host=tok[0], port=tok[1], database=PG_DB, password=token, timeout=10,
                                     source_address=(src, 0), ssl_context=pki_ctx)
        assert info.value.args[0]["C"] == "28P01", info.value.args
        return "error"

    def pg_token_plaintext(src, rng):
        s = raw(tok, src)
        s.sendall(pg_startup())
        return expect_end(s, "pg")                      # tokens only over TLS: refused at once

    # -- MySQL
    def my_greeting(s):
        data = b""
        while len(data) < 4 or len(data) < 4 + int.from_bytes(data[:3], "little"):
            chunk = s.recv(4096)
            assert chunk, "closed before the greeting"
            data += chunk
        return data

    def my_garbage(src, rng):
        s = raw(my, src)
        my_greeting(s)
        s.sendall(os.urandom(rng.randint(1, 2048)))
        return expect_end(s, "my")

    def my_half_stall(src, rng):
        s = raw(my, src)
        my_greeting(s)
        response = myp.packet(1, myp.handshake_response(MY_CAPS, 45, APP_USER.encode(), b"\x01" * 20,
                                                        MY_DB.encode(), b"mysql_native_password"))
        s.sendall(response[:rng.randint(1, len(response) - 1)])
        return expect_end(s, "my")

    def my_oversize(src, rng):
        s = raw(my, src)
        my_greeting(s)
        s.sendall(b"\xff\xff\xff\x01" + os.urandom(100))                     # 16 MiB - 1: no handshake is that long
        return expect_end(s, "my")

    def my_tls_garbage(src, rng):
        s = raw(my, src)
        my_greeting(s)
        s.sendall(myp.packet(1, myp.ssl_request(MY_CAPS | myp.CLIENT_SSL, 45)))
        s.sendall(tls_garbage(rng))
        return expect_end(s, None)

    def my_wrong_password(src, rng):
        with pytest.raises(pymysql.err.OperationalError) as info:
            pymysql.connect(host=my[0], port=my[1], user=APP_USER, password="wrong", database=MY_DB,
                            connect_timeout=10, read_timeout=10, bind_address=src)
        assert info.value.args[0] == 1045, info.value.args
        return "error"

    def my_logged_in_then(src, rng):
        greeting_done = raw(my, src)
        greeting = my_greeting(greeting_done)
        # the 20-byte nonce: 8 bytes after the version and thread id, 12 more after the capability block
        version_end = greeting.index(b"\x00", 5)
        nonce = greeting[version_end + 5:version_end + 13] + greeting[version_end + 32:version_end + 44]
        auth = native_scramble(APP_PASSWORD, nonce)
        greeting_done.sendall(myp.packet(1, myp.handshake_response(MY_CAPS, 45, APP_USER.encode(), auth,
                                                                   MY_DB.encode(), b"mysql_native_password")))
        ok = greeting_done.recv(4096)
        assert ok[4:5] == b"\x00", ok
        if rng.random() < 0.5:
            greeting_done.sendall(b"\x00\x00\x00\x01\x03SELECT")                # sequence id 1: out of order
            return expect_end(greeting_done, "my")
        greeting_done.sendall(b"\x64\x00\x00\x00\x03SELECT 1")                  # truncated, then gone
        greeting_done.close()
        return "closed"

    # -- TDS
    def tds_garbage(src, rng):
        s = raw(tds, src)
        s.sendall(os.urandom(rng.randint(1, 2048)))
        return expect_end(s, "tds")

    def tds_half_stall(src, rng):
        s = raw(tds, src)
        s.sendall(prelogin[:rng.randint(1, len(prelogin) - 1)])
        return expect_end(s, "tds")

    def tds_oversize(src, rng):
        s = raw(tds, src)
        s.sendall(struct.pack(">BBHHBB", tp.PRELOGIN, 1, 0xFFFF, 0, 1, 0) + os.urandom(64))
        return expect_end(s, "tds")

    def tds_flood(src, rng):
        # PRELOGIN packets that never end a message, past max_message_size: refused, not collected
        s = raw(tds, src)
        packet = struct.pack(">BBHHBB", tp.PRELOGIN, 0, 4096, 0, 1, 0) + bytes(4088)
        try:
            for _ in range(MAX_MESSAGE // 4088 + 8):
                s.sendall(packet)
        except OSError:
            pass                                        # the proxy closed first
        return expect_end(s, "tds")

    def tds_tls_hello(src, rng):
        s = raw(tds, src)
        s.sendall(tls_garbage(rng))
        return expect_end(s, "tds")

    def tds_wrong_password(src, rng):
        s = raw(tds, src)
        s.sendall(prelogin + login7("wrong-" + str(rng.random())))
        return expect_end(s, "tds")

    def tds_logged_in_then(src, rng):
        s = raw(tds, src)
        s.sendall(prelogin + login7(APP_PASSWORD))
        reader, messages = tp.MessageReader(), []
        while len(messages) < 2:
            chunk = s.recv(65536)
            assert chunk, "closed during login"
            messages += reader.feed(chunk)
        batch = tp.encode_message(tp.SQL_BATCH, tp.SqlBatch("SELECT 1").encode())
        if rng.random() < 0.5:
            s.sendall(struct.pack(">BBHHBB", 0x55, 1, 16, 0, 1, 0) + bytes(8))  # unknown packet type
            return expect_end(s, "tds")
        s.sendall(batch[:len(batch) - 5])                                     # truncated, then gone
        s.close()
        return "closed"

    wrong = [pg_wrong_password, pg_expired_jwt, my_wrong_password, tds_wrong_password]
    rest = [pg_garbage, pg_half_stall, pg_half_close, pg_2gib_startup, pg_tls_garbage, pg_scram_stall,
            pg_logged_in_then, pg_token_plaintext, my_garbage, my_half_stall, my_oversize, my_tls_garbage,
            my_logged_in_then, tds_garbage, tds_half_stall, tds_oversize, tds_flood, tds_tls_hello,
            tds_logged_in_then]
    return wrong, rest


def run_hostile(jobs, concurrency: int) -> tuple[dict, list]:
    """Run (kind, source, seed) jobs in parallel; return the outcomes per kind and the failures."""
    outcomes: dict = {}
    failures: list = []
    lock = threading.Lock()

    def one(job):
        kind, source, seed = job
        try:
            result = kind(source, random.Random(seed))
        except BaseException as exc:   # pytest.raises' Failed is a BaseException
            with lock:
                failures.append(f"{kind.__name__} from {source}: {type(exc).__name__}: {exc}")
            return
        with lock:
            outcomes.setdefault(kind.__name__, {}).setdefault(result, 0)
            outcomes[kind.__name__][result] += 1

    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, jobs))
    return outcomes, failures


def client_connections(proxy) -> float:
    return metric(metrics_text(proxy), "multiproxy_client_connections") or 0.0


def backend_connections(proxy) -> float:
    return metric(metrics_text(proxy), "multiproxy_database_connections") or 0.0


# ---------------------------------------------------------------------------------------------- the test

@pytest.fixture
def lab(tmp_path):
    server = LabProcess(tmp_path)
    yield server
    server.stop()


def test_valid_clients_are_unaffected_by_hundreds_of_hostile_connections(pg, mariadb, lab, proxy_factory, tmp_path):
    started = time.monotonic()
    pki = write_pki(str(tmp_path), "hostile")
    proxy = proxy_factory(hostile_config(pg, mariadb, lab, pki), files={"users.toml": users_toml()},
                          env={JWT_ENV: JWT_KEY})
    addresses = {name: proxy.address(name) for name in ("pg", "pgtok", "my", "tds")}
    pid = proxy.pid
    client_tls = ssl.create_default_context(cafile=pki["ca"])
    client_tls.check_hostname = False

    pg.psql("CREATE TABLE IF NOT EXISTS hostile_load (worker text, n int); TRUNCATE hostile_load;"
            f"GRANT ALL ON hostile_load TO {PG_USER};", db=PG_DB)
    mariadb.sql(f"CREATE TABLE IF NOT EXISTS {MY_DB}.hostile_load (worker varchar(40), n int) ENGINE=InnoDB;"
                f"TRUNCATE {MY_DB}.hostile_load;")
    with pymssql.connect(server="127.0.0.1", port=lab.port, user=LAB_USER, password=LAB_PASSWORD, database=TDS_DB,
                         autocommit=True, tds_version="7.4") as direct:
        direct.cursor().execute("CREATE TABLE hostile_load (worker VARCHAR(40), n INT)")

    def pg_conn():
        return pg8000.native.Connection(PG_USER, host=addresses["pg"][0], port=addresses["pg"][1], database=PG_DB,
                                        password=PG_PASSWORD, timeout=30)

    def token_conn():
        host, port = addresses["pgtok"]
        return psycopg.connect(host=host, port=port, user=PG_USER, dbname=PG_DB, password=jwt_token(300),
                               sslmode="require", connect_timeout=30)

    def my_conn():
        host, port = addresses["my"]
        return pymysql.connect(host=host, port=port, user=APP_USER, password=APP_PASSWORD, database=MY_DB,
                               autocommit=False, connect_timeout=30, read_timeout=30)

    def tds_conn():
        host, port = addresses["tds"]
        return pymssql.connect(server=host, port=port, user=APP_USER, password=APP_PASSWORD, database=TDS_DB,
                               autocommit=False, tds_version="7.4", login_timeout=30, timeout=30)

    workers = [Worker("pg-persistent", pg_conn, pg_transaction, True),
               Worker("pg-reconnecting", pg_conn, pg_transaction, False),
               Worker("pg-token", token_conn, psycopg_transaction, False),
               Worker("my-persistent", my_conn, dbapi_transaction, True),
               Worker("my-reconnecting", my_conn, dbapi_transaction, False),
               Worker("tds-persistent", tds_conn, dbapi_transaction, True)]
    persistent = sum(w.persistent for w in workers)
    wrong, rest = make_hostile(addresses, client_tls)
    for w in workers:
        w.start()
    try:
        # warm-up: every hostile kind once (and each wrong-password kind from one address), so that caches,
        # pools and lazily made objects exist before the baseline is taken
        warm = [(kind, WRONG_SOURCES[0], 1) for kind in wrong] + [(kind, RAW_SOURCES[0], 1) for kind in rest]
        outcomes, failures = run_hostile(warm, 8)
        assert not failures, failures
        assert wait_for(lambda: all(w.committed >= 3 for w in workers), 30), [(w.name, w.committed, w.errors)
                                                                              for w in workers]
        for w in workers:
            w.pause()
        assert wait_for(lambda: client_connections(proxy) == persistent, 10), metrics_text(proxy)
        time.sleep(0.5)
        base_fds, base_backends = open_fds(pid), backend_connections(proxy)
        base_rss = settled_rss_kb(pid)
        for w in workers:
            w.resume()

        # the load: wrong credentials from the addresses the throttle will block, the rest from the others
        rng = random.Random(20261125)
        jobs = []
        for i in range(HOSTILE_TOTAL):
            if i % 5 == 0:
                jobs.append((rng.choice(wrong), rng.choice(WRONG_SOURCES), i))
            else:
                jobs.append((rng.choice(rest), rng.choice(RAW_SOURCES), i))
        committed_before = {w.name: w.committed for w in workers}
        load_started = time.monotonic()
        outcomes, failures = run_hostile(jobs, HOSTILE_CONCURRENCY)
        load_seconds = time.monotonic() - load_started
        assert not failures, f"{len(failures)} hostile connections ended badly: {failures[:10]}"
        assert sum(sum(o.values()) for o in outcomes.values()) == HOSTILE_TOTAL
        assert sum(o.get("error", 0) for o in outcomes.values()) > HOSTILE_TOTAL // 2, outcomes

        # valid clients: no error, and they kept committing during the load
        for w in workers:
            assert not w.errors, (w.name, w.errors[:5])
            assert w.committed > committed_before[w.name], (w.name, w.committed, committed_before, load_seconds)

        # a blocked address is turned away even with the right password; 127.0.0.1 never was
        with pytest.raises(pg8000.native.DatabaseError) as info:
            pg8000.native.Connection(PG_USER, host=addresses["pg"][0], port=addresses["pg"][1], database=PG_DB,
                                     password=PG_PASSWORD, timeout=10, source_address=(WRONG_SOURCES[0], 0))
        assert "blocked" in info.value.args[0]["M"], info.value.args

        # afterwards: connections, descriptors and memory back to the baseline
        for w in workers:
            w.pause()
        assert wait_for(lambda: client_connections(proxy) == persistent, 10), \
            f"client connections {client_connections(proxy)}, expected the {persistent} valid ones"

        def fds_back():
            # backend connections the pools opened or closed since the baseline are not the hostile clients'
            return open_fds(pid) <= base_fds + max(0, backend_connections(proxy) - base_backends)
        assert wait_for(fds_back, 10), (open_fds(pid), base_fds, backend_connections(proxy), base_backends)
        after_rss = settled_rss_kb(pid)
        assert after_rss <= base_rss + RSS_MARGIN_KB, (after_rss, base_rss)

        for w in workers:
            w.resume()
        time.sleep(0.5)
    finally:
        for w in workers:
            w.stop.set()
        for w in workers:
            w.join(30)

    for w in workers:
        assert not w.errors, (w.name, w.errors[:5])
    # every committed transaction is in its database, exactly once
    pg_rows = pg.psql("SELECT worker, count(*) FROM hostile_load GROUP BY worker", db=PG_DB)
    counts = dict(line.split("|") for line in pg_rows.split())
    my_rows = mariadb.sql(f"SELECT worker, count(*) FROM {MY_DB}.hostile_load GROUP BY worker")
    counts.update(line.split("\t") for line in my_rows.splitlines())
    with pymssql.connect(server="127.0.0.1", port=lab.port, user=LAB_USER, password=LAB_PASSWORD, database=TDS_DB,
                         autocommit=True, tds_version="7.4") as direct:
        cur = direct.cursor()
        cur.execute("SELECT worker, count(*) FROM hostile_load GROUP BY worker")
        counts.update((name, str(n)) for name, n in cur.fetchall())
    assert {w.name: str(w.committed) for w in workers} == counts
    assert "Traceback" not in proxy.log_text()
    print(f"hostile load: {HOSTILE_TOTAL} connections in {load_seconds:.1f} s, outcomes {outcomes}; "
          f"commits {[(w.name, w.committed) for w in workers]}; fds {base_fds}; rss {base_rss} -> {after_rss} kB; "
          f"total {time.monotonic() - started:.1f} s")
