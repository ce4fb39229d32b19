"""Relay logins ([proxy] relay = "compiled", multiproxy.relay_logins) against a real PostgreSQL: repeat trust logins
accepted and greeted by the compiled relay core, with unique cancel keys that cancel, counted as clients, bounded by
max_client_connections, and through PAUSE/RESUME, a graceful stop and a reload that removes the listener."""
from __future__ import annotations

import calendar
import copy
import os
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time

import psycopg
import pytest

from multiproxy import relay_core

from .helpers import admin_status, metric, metrics_text
from .pgserver import AUTH_DB
from .proxy import free_port
from .test_live_reload import reload_by_signal, wait_for_log
from .test_takeover import cancel_works

USER = "mp_trust"
TIMEOUT = 10

pytestmark = pytest.mark.skipif(relay_core.IMPLEMENTATION != "c" or os.environ.get("MULTIPROXY_RELAY_CORE") == "python",
                                reason="relay logins need the compiled multiproxy._relay")


def logins_config(pg, max_size: int = 4, **listener) -> dict:
    cluster = {"engine": "postgres", "hosts": [f"127.0.0.1:{pg.port}"], "backend": {"tls": "disable"},
               "pool": {"mode": "transaction", "max_size": max_size, "borrow_timeout": 30.0}}
    return {
        "proxy": {"admin_listen": f"127.0.0.1:{free_port()}", "log_level": "info", "relay": "compiled",
                  "shutdown_timeout": 3.0},
        "admin": {"users": [USER]},
        "clusters": {"main": cluster},
        "listeners": [{"name": "pg", "listen": f"127.0.0.1:{free_port()}", "cluster": "main", "role": "writer",
                       "auth": "trust", **listener}],
    }


def connect(proxy, **kwargs) -> psycopg.Connection:
    kwargs.setdefault("dbname", AUTH_DB)
    return psycopg.connect(host=proxy.host, port=proxy.port, user=USER, connect_timeout=TIMEOUT, autocommit=True,
                           **kwargs)


def relay_logins(proxy) -> float:
    return metric(metrics_text(proxy), "multiproxy_relay_logins_total") or 0


def first_login(proxy) -> None:
    """A login on the Python path that enters its lane: the template of the ones after it."""
    with connect(proxy) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    deadline = time.monotonic() + TIMEOUT
    while "logins greeted by the compiled relay" not in proxy.log_text():
        assert time.monotonic() < deadline, proxy.log_tail()
        time.sleep(0.05)


def greeted(proxy, count: int, **kwargs) -> list[psycopg.Connection]:
    """`count` clients the relay greeted (the counter says so)."""
    before = relay_logins(proxy)
    conns = [connect(proxy, **kwargs) for _ in range(count)]
    assert relay_logins(proxy) == before + count, proxy.log_tail()
    return conns


def pgbench_connect_per_transaction(proxy, pg, clients: int, transactions: int, **env) -> None:
    """pgbench -S -C through the proxy (tables made on the server first): every transaction processed."""
    env = {**os.environ, "PGHOST": proxy.host, "PGPORT": str(proxy.port), "PGUSER": USER, "PGDATABASE": AUTH_DB,
           "PGCONNECT_TIMEOUT": "10", **env}
    init = subprocess.run(["pgbench", "-i", "-s", "1", "-q"], env={**env, "PGHOST": pg.host, "PGPORT": str(pg.port)},
                          capture_output=True, text=True, timeout=120)
    assert init.returncode == 0, init.stderr
    run = subprocess.run(["pgbench", "-S", "-C", "-M", "simple", "-c", str(clients), "-j", "2", "-t", str(transactions),
                          "-n"], env=env, capture_output=True, text=True, timeout=150)
    assert run.returncode == 0, run.stdout + run.stderr + proxy.log_tail()
    done = clients * transactions
    assert f"number of transactions actually processed: {done}/{done}" in run.stdout, run.stdout


@pytest.mark.timeout(180)
def test_pgbench_connect_per_transaction_logs_in_through_the_relay(pg, proxy_factory):
    if not shutil.which("pgbench"):
        pytest.skip("pgbench is not installed")
    proxy = proxy_factory(logins_config(pg, max_size=4))
    pgbench_connect_per_transaction(proxy, pg, clients=8, transactions=200)
    logins = relay_logins(proxy)
    print("relay logins of 1600:", logins)
    assert logins >= 1200, proxy.log_tail()        # all but the first few, which made the template
    status = admin_status(proxy)
    assert [lst["clients"] for lst in status["listeners"]] == [0]     # every one of them counted out again


@pytest.mark.timeout(120)
def test_greeted_clients_have_unique_keys_that_cancel_and_are_counted(pg, proxy_factory):
    proxy = proxy_factory(logins_config(pg, max_size=2))
    first_login(proxy)
    conns = greeted(proxy, 12)
    pids = {(c.info.backend_pid, c.pgconn.backend_pid) for c in conns}
    assert len(pids) == 12                          # BackendKeyData: a fresh key for each
    for i, conn in enumerate(conns):
        assert conn.execute("SELECT %s::int", (i,)).fetchone() == (i,)
        assert conn.execute("SHOW application_name").fetchone() is not None
    status = admin_status(proxy)
    assert [lst["clients"] for lst in status["listeners"]] == [12]
    with connect(proxy, dbname="pgbouncer") as console:      # another startup: the Python path, as before
        with console.cursor() as cur:
            cur.execute("SHOW CLIENTS;")
            names = [d.name for d in cur.description]
            rows = [dict(zip(names, row)) for row in cur.fetchall()]
    assert len([r for r in rows if r["database"] == AUTH_DB]) == 12

    # A cancel (CancelRequest: a first packet the relay gives to Python) of a greeted client's request.
    victim = conns[3]
    cancel_works(victim)
    assert victim.execute("SELECT 42").fetchone() == (42,)
    for conn in conns:
        conn.close()
    deadline = time.monotonic() + TIMEOUT
    while admin_status(proxy)["listeners"][0]["clients"]:
        assert time.monotonic() < deadline
        time.sleep(0.05)


@pytest.mark.timeout(120)
def test_a_greeted_client_is_whole_when_the_python_path_needs_it(pg, proxy_factory):
    """A client the relay greeted into its lane has no socket object or client protocol until something needs them:
    a statement the relay stops, an end without goodbye. Its address is the relay's reading."""
    proxy = proxy_factory(logins_config(pg, max_size=2))
    first_login(proxy)
    setter, quitter, quiet = greeted(proxy, 3)
    ports = {socket.socket(fileno=os.dup(conn.fileno())).getsockname()[1] for conn in (setter, quitter, quiet)}
    with connect(proxy, dbname="pgbouncer") as console:
        with console.cursor() as cur:
            cur.execute("SHOW CLIENTS;")
            names = [d.name for d in cur.description]
            rows = [dict(zip(names, row)) for row in cur.fetchall()]
    assert {(r["addr"], r["port"]) for r in rows if r["database"] == AUTH_DB} == {("127.0.0.1", p) for p in ports}
    setter.execute("SET search_path TO pg_catalog")            # stopped by the relay: served on the Python path
    assert setter.execute("SHOW search_path").fetchone() == ("pg_catalog",)
    assert setter.execute("SELECT 7").fetchone() == (7,)
    with socket.socket(fileno=os.dup(quitter.fileno())) as raw:
        raw.shutdown(socket.SHUT_RDWR)                          # gone without a Terminate
    assert quiet.execute("SELECT 8").fetchone() == (8,)
    deadline = time.monotonic() + TIMEOUT
    while admin_status(proxy)["listeners"][0]["clients"] != 2:
        assert time.monotonic() < deadline, admin_status(proxy)
        time.sleep(0.05)
    for conn in (setter, quitter, quiet):
        conn.close()
    while admin_status(proxy)["listeners"][0]["clients"]:
        assert time.monotonic() < deadline, admin_status(proxy)
        time.sleep(0.05)
    # The one that left without a goodbye and the quiet one ended in the relay; the setter on the Python path.
    assert metric(metrics_text(proxy), "multiproxy_relay_logins_ended_total") == 2, proxy.log_text()
    assert "Traceback" not in proxy.log_text(), proxy.log_tail()


@pytest.mark.timeout(120)
def test_idle_client_timeout_ends_greeted_clients_with_its_error(pg, proxy_factory):
    config = logins_config(pg, max_size=2)
    config["proxy"]["idle_client_timeout"] = 1.0
    proxy = proxy_factory(config)
    first_login(proxy)
    idle, busy = greeted(proxy, 2)
    deadline = time.monotonic() + 4.0
    while time.monotonic() < deadline:                      # busy keeps running statements: spared
        assert busy.execute("SELECT 1").fetchone() == (1,)
        time.sleep(0.2)
    with pytest.raises(psycopg.OperationalError, match="idle_client_timeout"):
        idle.execute("SELECT 1")
    assert busy.execute("SELECT 2").fetchone() == (2,)
    busy.close()
    idle.close()


@pytest.mark.timeout(120)
def test_a_reconnect_drops_the_template_before_the_next_greeting(pg, proxy_factory):
    """RECONNECT (a new generation of the pool) makes the door judge its templates again at its next wake-up: the
    next client logs in on the Python path and makes a new template."""
    proxy = proxy_factory(logins_config(pg, max_size=2))
    first_login(proxy)
    kept = greeted(proxy, 1)
    with connect(proxy, dbname="pgbouncer") as console:
        console.execute("RECONNECT")
    before = relay_logins(proxy)
    with connect(proxy) as conn:                        # the Python path: its login is a new template
        assert conn.execute("SELECT 1").fetchone() == (1,)
    assert relay_logins(proxy) == before
    kept += greeted(proxy, 1)
    for conn in kept:
        assert conn.execute("SELECT 2").fetchone() == (2,)
        conn.close()


@pytest.mark.timeout(120)
def test_clients_of_a_lane_other_than_the_doors_join_it_as_greeted_sessions(pg, proxy_factory):
    """The door listens in the lane of its first template (a health check's, say); the application's clients, with
    another application_name and so another lane, are greeted too and wait in their own lane without their session
    being made whole, and what they send right after their startup packet is served."""
    proxy = proxy_factory(logins_config(pg, max_size=2))
    with connect(proxy, application_name="health") as conn:     # the door's lane
        assert conn.execute("SELECT 1").fetchone() == (1,)
    with connect(proxy, application_name="app") as conn:        # the Python path: the app's template
        assert conn.execute("SELECT 1").fetchone() == (1,)
    apps = greeted(proxy, 6, application_name="app")
    for i, conn in enumerate(apps):
        with psycopg.RawCursor(conn) as cur:
            cur.execute(f"SELECT {i} + 1", prepare=False)
            assert cur.fetchone() == (i + 1,)
    text = metrics_text(proxy)
    assert metric(text, "multiproxy_relay_logins_whole_total") == 0
    assert metric(text, "multiproxy_relay_lane_clients") == 6
    apps[0].execute("SET search_path TO pg_catalog")          # stopped: made whole, with its state
    assert apps[0].execute("SHOW application_name").fetchone() == ("app",)
    assert metric(metrics_text(proxy), "multiproxy_relay_logins_whole_total") == 1
    for conn in apps:
        conn.close()
    deadline = time.monotonic() + TIMEOUT
    while admin_status(proxy)["listeners"][0]["clients"]:
        assert time.monotonic() < deadline, admin_status(proxy)
        time.sleep(0.05)
    assert "Traceback" not in proxy.log_text(), proxy.log_tail()


@pytest.mark.timeout(120)
def test_the_door_moves_into_the_lane_its_greetings_go_to(pg, proxy_factory):
    """A door opened in a health check's lane follows the application's logins: once most greetings go to the app's
    lane, it listens in that lane's relay and keeps its clients there (their goodbye ends them in the relay)."""
    proxy = proxy_factory(logins_config(pg, max_size=2))
    with connect(proxy, application_name="health") as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    deadline = time.monotonic() + 30
    rounds = 0
    while "busiest lane now" not in proxy.log_text():
        assert time.monotonic() < deadline, proxy.log_tail()
        with connect(proxy, application_name="app") as conn:
            with psycopg.RawCursor(conn) as cur:
                cur.execute("SELECT 2", prepare=False)
                assert cur.fetchone() == (2,)
        rounds += 1
    ended = metric(metrics_text(proxy), "multiproxy_relay_logins_ended_total")
    for _ in range(5):
        with connect(proxy, application_name="app") as conn:
            assert conn.execute("SELECT 3").fetchone() == (3,)
    deadline = time.monotonic() + TIMEOUT
    while metric(metrics_text(proxy), "multiproxy_relay_logins_ended_total") < ended + 5:
        assert time.monotonic() < deadline, proxy.log_tail()
        time.sleep(0.05)
    with connect(proxy, application_name="health") as conn:     # the other lane's clients are still greeted
        assert conn.execute("SELECT 4").fetchone() == (4,)
    assert metric(metrics_text(proxy), "multiproxy_relay_logins_whole_total") == 0
    assert "Traceback" not in proxy.log_text(), proxy.log_tail()


@pytest.mark.timeout(120)
def test_another_startup_stays_on_the_python_path(pg, proxy_factory):
    proxy = proxy_factory(logins_config(pg))
    first_login(proxy)
    before = relay_logins(proxy)
    with connect(proxy, application_name="other-app") as other:
        assert other.execute("SHOW application_name").fetchone() == ("other-app",)
    assert relay_logins(proxy) == before           # not greeted by the relay: its startup differs
    with connect(proxy, application_name="other-app") as again:         # now a template of its own
        assert again.execute("SHOW application_name").fetchone() == ("other-app",)
    assert relay_logins(proxy) == before + 1
    with pytest.raises(psycopg.OperationalError):                       # TLS asked for: refused, as before
        psycopg.connect(host=proxy.host, port=proxy.port, user=USER, dbname=AUTH_DB, sslmode="require",
                        connect_timeout=TIMEOUT)
    with connect(proxy, sslmode="prefer") as plain:                     # SSLRequest refused by the relay, then greeted
        assert plain.execute("SELECT 2").fetchone() == (2,)
    assert relay_logins(proxy) == before + 2


@pytest.mark.timeout(120)
def test_max_client_connections_holds(pg, proxy_factory):
    proxy = proxy_factory(logins_config(pg, max_client_connections=5))
    first_login(proxy)
    conns = greeted(proxy, 5)
    with pytest.raises(psycopg.OperationalError, match="max_client_connections"):
        connect(proxy)
    conns.pop().close()
    deadline = time.monotonic() + TIMEOUT
    while admin_status(proxy)["listeners"][0]["clients"] != 4:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    conns += greeted(proxy, 1)
    assert all(c.execute("SELECT 1").fetchone() == (1,) for c in conns)
    for _ in range(20):     # a login and a goodbye at the limit, in turn: the relay gives the room back and greets
        conns.pop().close()
        while admin_status(proxy)["listeners"][0]["clients"] != 4:
            assert time.monotonic() < deadline + TIMEOUT
            time.sleep(0.02)
        conns += greeted(proxy, 1)
        with pytest.raises(psycopg.OperationalError, match="max_client_connections"):
            connect(proxy)
    assert [lst["clients"] for lst in admin_status(proxy)["listeners"]] == [5]
    assert all(c.execute("SELECT 2").fetchone() == (2,) for c in conns)
    for conn in conns:
        conn.close()


@pytest.mark.timeout(120)
def test_pause_resume_and_a_graceful_stop_with_greeted_clients_idle(pg, proxy_factory):
    proxy = proxy_factory(logins_config(pg))
    first_login(proxy)
    conns = greeted(proxy, 4)
    with connect(proxy, dbname="pgbouncer") as console:
        console.execute("PAUSE")
        time.sleep(0.6)                             # the lanes' sweep (0.25 s) gives the pool its idle backends back
        done = []
        thread = threading.Thread(target=lambda: done.append(conns[0].execute("SELECT 5").fetchone()))
        thread.start()
        time.sleep(0.5)
        assert not done                             # waits while paused
        console.execute("RESUME")
        thread.join(10)
        assert done == [(5,)]
    proxy.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 15
    while proxy.running:
        assert time.monotonic() < deadline, proxy.log_tail()
        time.sleep(0.05)
    for conn in conns:
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 1")
        conn.close()


@pytest.mark.timeout(120)
def test_a_reload_that_removes_the_listener(pg, proxy_factory):
    config = logins_config(pg)
    config["listeners"].append({"name": "other", "listen": f"127.0.0.1:{free_port()}", "cluster": "main",
                                "auth": "trust"})
    proxy = proxy_factory(config)
    first_login(proxy)
    conns = greeted(proxy, 3)
    address = proxy.address("pg")
    new_config = copy.deepcopy(config)
    new_config["listeners"] = [config["listeners"][1]]
    reload_by_signal(proxy, new_config)
    wait_for_log(proxy, "listener pg: removed; its clients have left")
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(host=address[0], port=address[1], user=USER, dbname=AUTH_DB, connect_timeout=TIMEOUT)
    for conn in conns:
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 1")
        conn.close()
    other = proxy.address("other")
    with psycopg.connect(host=other[0], port=other[1], user=USER, dbname=AUTH_DB, autocommit=True) as conn:
        assert conn.execute("SELECT 3").fetchone() == (3,)


@pytest.mark.timeout(60)
def test_a_client_that_never_sends_its_startup_meets_the_handshake_deadline(pg, proxy_factory):
    config = logins_config(pg)
    config["proxy"]["handshake_timeout"] = 1.0
    proxy = proxy_factory(config)
    first_login(proxy)
    silent = socket.create_connection((proxy.host, proxy.port), timeout=10)
    started = time.monotonic()
    while silent.recv(100):                          # an error, then the end, once the Python path's deadline passed
        pass
    assert time.monotonic() - started < 6, proxy.log_tail()
    silent.close()
    with connect(proxy) as conn:                     # the listener still greets
        assert conn.execute("SELECT 1").fetchone() == (1,)


@pytest.mark.timeout(180)
def test_a_takeover_with_greeted_clients_idle(pg, proxy_factory, tmp_path):
    from .test_takeover import take_over, took_over
    old = proxy_factory(logins_config(pg))
    first_login(old)
    conns = greeted(old, 3)
    keys = [c.info.backend_pid for c in conns]
    new = take_over(old, tmp_path)      # the old process's relay let go of the listener before handing it over
    try:
        assert took_over(new) == (1, 3)
        for conn, key in zip(conns, keys):
            assert conn.execute("SELECT 9").fetchone() == (9,)
            assert conn.info.backend_pid == key
        first_login(new)
        for conn in greeted(new, 2) + conns:
            assert conn.execute("SELECT 10").fetchone() == (10,)
            conn.close()
    finally:
        new.stop()


@pytest.mark.timeout(120)
def test_quiet_clients_are_counted_and_get_their_sessions_only_when_needed(pg, proxy_factory):
    """Kept clients are quiet: counted, with no session, while they only run transactions in the relay and say
    goodbye; a cancel of one's request finds it (its session is made then), as the admin console does."""
    proxy = proxy_factory(logins_config(pg, max_size=2))
    first_login(proxy)
    ended = metric(metrics_text(proxy), "multiproxy_relay_logins_ended_total") or 0
    came = int(time.time())
    conns = greeted(proxy, 6)
    for i, conn in enumerate(conns):
        assert conn.execute("SELECT %s::int", (i,)).fetchone() == (i,)
    text = metrics_text(proxy)
    assert metric(text, "multiproxy_relay_logins_quiet") == 6, proxy.log_tail()
    assert metric(text, "multiproxy_client_connections", listener="pg") == 6
    assert [lst["clients"] for lst in admin_status(proxy)["listeners"]] == [6]
    for conn in conns[4:]:                          # goodbyes of quiet clients: counted out, no session made
        conn.close()
    deadline = time.monotonic() + TIMEOUT
    while metric(metrics_text(proxy), "multiproxy_client_connections", listener="pg") != 4:
        assert time.monotonic() < deadline, proxy.log_tail()
        time.sleep(0.05)
    text = metrics_text(proxy)
    assert metric(text, "multiproxy_relay_logins_quiet") == 4
    assert metric(text, "multiproxy_relay_logins_ended_total") == ended + 2
    with socket.create_connection((proxy.host, proxy.port), timeout=TIMEOUT) as stray:   # a key nobody holds
        stray.sendall(struct.pack("!IIII", 16, 80877102, 1, 2))
        assert stray.recv(10) == b""
    assert metric(metrics_text(proxy), "multiproxy_relay_logins_quiet") == 4     # no session made for it
    time.sleep(1.5)                                 # (their sessions, made later, say when they came)
    cancel_works(conns[1])                          # its key is among the quiet clients'
    assert metric(metrics_text(proxy), "multiproxy_relay_logins_quiet") == 3     # the victim's alone, found by its key
    with connect(proxy, dbname="pgbouncer") as console:
        with console.cursor() as cur:
            cur.execute("SHOW CLIENTS;")
            names = [d.name for d in cur.description]
            rows = [dict(zip(names, row)) for row in cur.fetchall()]
    mine = [r for r in rows if r["database"] == AUTH_DB]
    assert len(mine) == 4
    for row in mine:                                # the relay's time of their greeting, not the time of the cancel
        connected = calendar.timegm(time.strptime(row["connect_time"], "%Y-%m-%d %H:%M:%S UTC"))
        assert came <= connected <= came + 1, (row["connect_time"], came)
    assert metric(metrics_text(proxy), "multiproxy_relay_logins_whole_total") <= 1    # the victim's, for its cancel
    for conn in conns[:4]:
        assert conn.execute("SELECT 7").fetchone() == (7,)
        conn.close()
    deadline = time.monotonic() + TIMEOUT
    while admin_status(proxy)["listeners"][0]["clients"]:
        assert time.monotonic() < deadline, proxy.log_tail()
        time.sleep(0.05)


# -- SCRAM-SHA-256 listeners: the relay verifies the exchange from the users file's stored keys

PASSWORD = "relay-scram-pw"


def scram_config(pg, proxy_factory, password: str = PASSWORD, **proxy_settings):
    from multiproxy.auth import UsersFile
    users = UsersFile()
    users.add(USER, password, kinds=["scram_sha_256"])
    config = logins_config(pg, auth="scram-sha-256")
    config["auth"] = {"users_file": "users.toml"}
    config["proxy"].update(proxy_settings)
    return config, users.dumps()


def scram_proxy(pg, proxy_factory, **proxy_settings):
    config, users = scram_config(pg, proxy_factory, **proxy_settings)
    proxy = proxy_factory(config, files={"users.toml": users})
    with connect(proxy, password=PASSWORD) as conn:      # the Python path's SCRAM login makes the template
        assert conn.execute("SELECT 1").fetchone() == (1,)
    deadline = time.monotonic() + TIMEOUT
    while "logins greeted by the compiled relay" not in proxy.log_text():
        assert time.monotonic() < deadline, proxy.log_tail()
        time.sleep(0.05)
    return proxy, config


def read_message(sock) -> tuple[bytes, bytes]:
    head = b""
    while len(head) < 5:
        more = sock.recv(5 - len(head))
        assert more, "closed"
        head += more
    size = int.from_bytes(head[1:], "big") - 4
    body = b""
    while len(body) < size:
        more = sock.recv(size - len(body))
        assert more, "closed"
        body += more
    return head[:1], body


def libpq_startup() -> bytes:
    """The startup packet psycopg sends for `connect(proxy, ...)` (the relay greets only a template's packet), read
    by a listener of the test's that refuses TLS, then closes."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(TIMEOUT)
    packets = []

    def serve():
        sock, _ = listener.accept()
        with sock:
            sock.settimeout(TIMEOUT)
            while True:
                size = int.from_bytes(sock.recv(4, socket.MSG_WAITALL), "big")
                packet = size.to_bytes(4, "big") + sock.recv(size - 4, socket.MSG_WAITALL)
                if packet[4:8] != (80877103).to_bytes(4, "big"):    # not the SSLRequest: the startup packet
                    packets.append(packet)
                    return
                sock.sendall(b"N")

    thread = threading.Thread(target=serve)
    thread.start()
    host, port = listener.getsockname()
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(host=host, port=port, user=USER, dbname=AUTH_DB, connect_timeout=TIMEOUT, password="x")
    thread.join(TIMEOUT)
    listener.close()
    return packets[0]


def sasl(kind: bytes, body: bytes) -> bytes:
    return kind + (len(body) + 4).to_bytes(4, "big") + body


def scram_to_final(proxy, password: str):
    """A SCRAM login by hand with psycopg's startup packet (the template's, so the relay runs the exchange): up to
    the client's SASLResponse, made but not sent."""
    from engines.postgres.auth import ScramClient
    sock = socket.create_connection((proxy.host, proxy.port), timeout=TIMEOUT)
    sock.sendall(libpq_startup())
    assert read_message(sock) == (b"R", (10).to_bytes(4, "big") + b"SCRAM-SHA-256\0\0")
    client = ScramClient("", password)
    first = client.client_first()
    sock.sendall(sasl(b"p", b"SCRAM-SHA-256\0" + len(first).to_bytes(4, "big") + first))
    kind, body = read_message(sock)
    assert (kind, body[:4]) == (b"R", (11).to_bytes(4, "big")), body
    return sock, client, sasl(b"p", client.handle_server_first(body[4:]))


@pytest.mark.timeout(180)
def test_pgbench_with_scram_logs_in_through_the_relay(pg, proxy_factory):
    if not shutil.which("pgbench"):
        pytest.skip("pgbench is not installed")
    proxy, _ = scram_proxy(pg, proxy_factory)
    failures = metric(metrics_text(proxy), "multiproxy_client_connections_setup_failed_auth_total") or 0
    pgbench_connect_per_transaction(proxy, pg, clients=4, transactions=100, PGPASSWORD=PASSWORD)
    logins = relay_logins(proxy)
    print("relay logins of 400 (SCRAM):", logins)
    assert logins >= 300, proxy.log_tail()          # each a SCRAM exchange libpq verified the proxy's signature of
    assert (metric(metrics_text(proxy), "multiproxy_client_connections_setup_failed_auth_total") or 0) == failures


@pytest.mark.timeout(120)
def test_a_wrong_scram_password_fails_on_the_python_path_and_the_right_one_goes_on(pg, proxy_factory):
    proxy, _ = scram_proxy(pg, proxy_factory, auth_failure_delay=0.1)
    greeted(proxy, 2, password=PASSWORD)[0].close()
    failures = metric(metrics_text(proxy), "multiproxy_client_connections_setup_failed_auth_total") or 0
    before = relay_logins(proxy)
    with pytest.raises(psycopg.OperationalError, match=f'password authentication failed for user "{USER}"'):
        connect(proxy, password="not the password")
    assert metric(metrics_text(proxy), "multiproxy_client_connections_setup_failed_auth_total") == failures + 1   # counted, as any failure
    assert relay_logins(proxy) == before
    assert metric(metrics_text(proxy), "multiproxy_relay_logins_resumed_total") == 1   # began in the relay
    assert "authentication failed for user" in proxy.log_text()
    with connect(proxy, password=PASSWORD) as conn:     # (on the Python path while the failure is on record)
        assert conn.execute("SELECT 2").fetchone() == (2,)


@pytest.mark.timeout(120)
def test_a_scram_login_whose_template_went_stale_midway_is_verified_on_the_python_path(pg, proxy_factory):
    proxy, config = scram_proxy(pg, proxy_factory)
    conns = greeted(proxy, 1, password=PASSWORD)       # the template greets psycopg's startup packet
    sock, client, final = scram_to_final(proxy, PASSWORD)
    reload_by_signal(proxy, config, outcome="configuration is unchanged")     # the users file is read again
    sock.sendall(final)
    kind, body = read_message(sock)
    assert (kind, body[:4]) == (b"R", (12).to_bytes(4, "big")), body
    client.verify_server_final(body[4:])                # the Python path went on with the relay's nonce
    assert read_message(sock)[0] == b"R"                # AuthenticationOk
    assert metric(metrics_text(proxy), "multiproxy_relay_logins_resumed_total") == 1
    sock.close()
    for conn in conns:
        conn.close()


@pytest.mark.timeout(120)
def test_a_scram_login_left_midway_meets_the_handshake_deadline(pg, proxy_factory):
    proxy, _ = scram_proxy(pg, proxy_factory, handshake_timeout=1.0)
    sock, _, _ = scram_to_final(proxy, PASSWORD)         # then silent
    started = time.monotonic()
    kinds = []
    while True:
        try:
            kinds.append(read_message(sock))
        except AssertionError:
            break
    assert time.monotonic() - started < 6, proxy.log_tail()
    assert kinds and kinds[-1][0] == b"E" and b"did not finish logging in" in kinds[-1][1], kinds
    assert metric(metrics_text(proxy), "multiproxy_relay_logins_resumed_total") == 1     # aged in the relay
    sock.close()
    with connect(proxy, password=PASSWORD) as conn:     # the listener still greets
        assert conn.execute("SELECT 1").fetchone() == (1,)


@pytest.mark.timeout(120)
def test_an_address_blocked_for_failed_logins_is_refused_even_with_the_right_password(pg, proxy_factory):
    """A failed login (judged on the Python path) blocks its address at once: the relay, which would verify the
    right password by itself, greets nobody until its lane has judged the throttle again (relay_core.attend)."""
    proxy, _ = scram_proxy(pg, proxy_factory, auth_failure_delay=0.0, auth_failure_block_after=1,
                           auth_failure_block_seconds=60.0)
    greeted(proxy, 2, password=PASSWORD)[0].close()
    before = relay_logins(proxy)
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        connect(proxy, password="not the password")
    for _ in range(3):
        with pytest.raises(psycopg.OperationalError, match="too many failed logins"):
            connect(proxy, password=PASSWORD)
    assert relay_logins(proxy) == before


@pytest.mark.timeout(120)
def test_disable_and_enable_stop_and_resume_the_relays_greetings(pg, proxy_factory):
    """DISABLE: the next login is the Python path's, which refuses it with its message (the relay greets nobody
    meanwhile, even when a quiet client's goodbye frees room under max_client_connections); ENABLE: the relay greets
    again."""
    proxy = proxy_factory(logins_config(pg, max_client_connections=10))
    first_login(proxy)
    kept = greeted(proxy, 3)
    with connect(proxy, dbname="pgbouncer") as console:
        console.execute(f"DISABLE {AUTH_DB}")
        before = relay_logins(proxy)
        kept.pop().close()      # (a goodbye gives the relay no greeting back while the budget is a refusal)
        deadline = time.monotonic() + TIMEOUT
        while admin_status(proxy)["listeners"][0]["clients"] != 3:   # the two kept, the console
            assert time.monotonic() < deadline, admin_status(proxy)
            time.sleep(0.05)
        for _ in range(3):
            with pytest.raises(psycopg.OperationalError, match="is disabled by an administrator"):
                connect(proxy)
        assert relay_logins(proxy) == before
        console.execute(f"ENABLE {AUTH_DB}")
    kept += greeted(proxy, 2)
    assert all(conn.execute("SELECT 7").fetchone() == (7,) for conn in kept)
    for conn in kept:
        conn.close()




@pytest.mark.timeout(120)
def test_a_cancel_through_another_listener_right_after_a_quiet_login_finds_its_client(pg, proxy_factory):
    """A quiet login is counted only when something reads the counts. A cancel of its client's request sent to
    another listener (md5: its logins, and so its CancelRequests, stay on the Python path, and no wake-up of the
    door's lane counts first) still finds the client by its key, before the lanes' sweep (every 0.25 s) counted it."""
    from multiproxy.auth import UsersFile
    users = UsersFile()
    users.add(USER, PASSWORD, kinds=["md5"])
    config = logins_config(pg)
    config["auth"] = {"users_file": "users.toml"}
    other = dict(config["listeners"][0], name="pg_md5", listen=f"127.0.0.1:{free_port()}", auth="md5")
    config["listeners"].append(other)
    proxy = proxy_factory(config, files={"users.toml": users.dumps()})
    first_login(proxy)
    startup = libpq_startup()
    cancel_port = int(other["listen"].rsplit(":", 1)[1])
    before = relay_logins(proxy)
    for n in range(5):
        with socket.create_connection((proxy.host, proxy.port), timeout=TIMEOUT) as victim:
            victim.sendall(startup)                     # greeted quietly: nothing reads the counts meanwhile
            key = None
            while True:
                kind, body = read_message(victim)
                if kind == b"K":
                    key = body
                if kind == b"Z":
                    break
            victim.sendall(sasl(b"Q", b"SELECT pg_sleep(20)\0"))
            time.sleep(0.05)
            started = time.monotonic()
            with socket.create_connection(("127.0.0.1", cancel_port), timeout=TIMEOUT) as cancel:
                cancel.sendall(struct.pack("!II", 16, 80877102) + key)
                assert cancel.recv(10) == b""           # the proxy closes a CancelRequest's connection
            answer = []
            while not answer or answer[-1][0] != b"Z":
                answer.append(read_message(victim))
            assert [kind for kind, _ in answer] == [b"T", b"E", b"Z"], answer
            assert b"C57014\0" in answer[1][1], answer     # query_canceled
            assert time.monotonic() - started < 5
            victim.sendall(sasl(b"Q", f"SELECT {n}".encode() + b"\0"))
            messages = []
            while not messages or messages[-1][0] != b"Z":
                messages.append(read_message(victim))
            assert (b"D", b"\0\x01" + len(str(n)).to_bytes(4, "big") + str(n).encode()) in messages, messages
            victim.sendall(sasl(b"X", b""))
    assert relay_logins(proxy) == before + 5


@pytest.mark.timeout(120)
def test_client_timeouts_of_quiet_clients_are_judged_in_the_relay(pg, proxy_factory):
    """With every client timeout configured, quiet clients stay quiet (no session made for them by the timeouts'
    sweep) until one overruns its limit: then that one alone gets its session and the limit's effect. A request
    outstanding past query_timeout is cancelled (the client serves on), idle clients past idle_client_timeout are
    told and closed; beside them, a transaction left idle past idle_transaction_timeout is closed and rolled back."""
    config = logins_config(pg, max_size=2)
    config["proxy"].update(idle_client_timeout=3.0, idle_transaction_timeout=0.5)
    config["clusters"]["main"]["pool"]["query_timeout"] = 0.5
    proxy = proxy_factory(config)
    table = f"quiet_tx_{os.getpid()}"
    with psycopg.connect(host=pg.host, port=pg.port, user=USER, dbname=AUTH_DB, autocommit=True) as direct:
        direct.execute(f"DROP TABLE IF EXISTS {table}")
        direct.execute(f"CREATE TABLE {table} (n int)")
    first_login(proxy)
    idle = greeted(proxy, 20)
    in_tx, sleeper = greeted(proxy, 2)
    in_tx.execute("BEGIN")
    in_tx.execute(f"INSERT INTO {table} VALUES (1)")
    cancelled = []

    def sleep_long() -> None:
        try:
            sleeper.execute("SELECT pg_sleep(10)")
        except psycopg.errors.QueryCanceled as exc:
            cancelled.append(exc)

    thread = threading.Thread(target=sleep_long)
    thread.start()
    time.sleep(0.1)
    # quiet: the idle ones, the sleeper, whose request runs in the relay with no session made, and in_tx, whose
    # transaction runs there too (the relay answered its BEGIN and sent it ahead of the INSERT)
    assert metric(metrics_text(proxy), "multiproxy_relay_logins_quiet") == 22, proxy.log_tail()
    thread.join(TIMEOUT)
    assert len(cancelled) == 1, proxy.log_tail()            # query_timeout: cancelled within a few sweeps
    assert sleeper.execute("SELECT 3").fetchone() == (3,)   # and it serves on
    deadline = time.monotonic() + TIMEOUT
    while "idle in a transaction for" not in proxy.log_text():
        assert time.monotonic() < deadline, proxy.log_tail()
        time.sleep(0.05)
    with pytest.raises(psycopg.errors.IdleInTransactionSessionTimeout, match="idle_transaction_timeout"):
        in_tx.execute("SELECT 1")
    with psycopg.connect(host=pg.host, port=pg.port, user=USER, dbname=AUTH_DB) as direct:
        assert direct.execute(f"SELECT count(*) FROM {table}").fetchone() == (0,)     # rolled back
    # The idle clients are still quiet: the sweep judged them in the relay, making no session (it made every quiet
    # client's session at its first pass before)
    text = metrics_text(proxy)
    assert metric(text, "multiproxy_relay_logins_quiet") == 20, proxy.log_tail()
    assert not metric(text, "multiproxy_client_idle_timeouts_total")
    time.sleep(3.5)
    for conn in idle:
        with pytest.raises(psycopg.OperationalError, match="idle_client_timeout"):
            conn.execute("SELECT 1")
        conn.close()
    text = metrics_text(proxy)
    assert metric(text, "multiproxy_client_idle_timeouts_total") >= 20
    assert metric(text, "multiproxy_query_timeouts_total") == 1
    assert metric(text, "multiproxy_client_idle_transaction_timeouts_total") == 1
    for conn in (in_tx, sleeper):
        conn.close()
    assert "Traceback" not in proxy.log_text(), proxy.log_tail()
