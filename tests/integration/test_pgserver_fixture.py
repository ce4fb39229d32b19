"""Proves the integration fixtures work: the private PostgreSQL, its auth roles, and the proxy process runner."""
import os
import socket
import sys
import textwrap
import tomllib

import pg8000.dbapi
import pytest

from .pgserver import AUTH_DB, AUTH_ROLES, PostgresServer
from .proxy import ProxyProcess, free_port, render_toml


def connect(pg, user, password):
    return pg8000.dbapi.connect(user=user, password=password, host=pg.host, port=pg.port,
                                database=AUTH_DB, timeout=10)


@pytest.mark.parametrize("role", AUTH_ROLES, ids=lambda r: r.name)
def test_each_role_logs_in_with_its_method(pg, role):
    conn = connect(pg, role.name, role.password)
    try:
        cur = conn.cursor()
        cur.execute("SELECT 1, current_user")
        assert cur.fetchone() == [1, role.name]
        # The role may create objects in mpdb's public schema (the proxy tests need that).
        cur.execute(f"CREATE TABLE public.made_by_{role.name} (x int)")
        cur.execute(f"DROP TABLE public.made_by_{role.name}")
        conn.commit()
    finally:
        conn.close()


def test_hba_routes_each_role_to_its_method(pg):
    rules = pg.psql("SELECT user_name[1], auth_method FROM pg_hba_file_rules "
                    "WHERE type = 'host' AND user_name <> '{all}' ORDER BY line_number;")
    ours = {r.name for r in AUTH_ROLES}      # other modules add lines for roles of their own (add_hba_lines)
    assert [line for line in rules.splitlines() if line.split("|")[0] in ours] == \
        [f"{r.name}|{r.method}" for r in AUTH_ROLES]
    stored = pg.psql("SELECT rolname, coalesce(substring(rolpassword from '^(md5|SCRAM-SHA-256)'), '') "
                     "FROM pg_authid WHERE rolname LIKE 'mp\\_%' ORDER BY rolname;")
    assert [line for line in stored.splitlines() if line.split("|")[0] in ours] == \
        ["mp_clear|SCRAM-SHA-256", "mp_md5|md5", "mp_scram|SCRAM-SHA-256", "mp_trust|"]


def test_wrong_password_is_refused(pg):
    with pytest.raises(pg8000.dbapi.DatabaseError) as refused:
        connect(pg, "mp_scram", "not-the-password")
    assert "28P01" in str(refused.value)  # invalid_password


def test_psql_helper_returns_rows(pg):
    assert pg.psql("SELECT 1;") == "1"
    assert pg.psql("SELECT current_user;", db=AUTH_DB, user="mp_scram", password="scram-pw") == "mp_scram"
    with pytest.raises(RuntimeError, match="password authentication failed"):
        pg.psql("SELECT 1;", db=AUTH_DB, user="mp_md5", password="wrong")


def test_stop_leaves_no_process_and_no_datadir():
    server = PostgresServer().start()
    pid, basedir = server.pid, server.basedir
    assert server.psql("SHOW max_connections;") == "200"
    assert server.psql("SHOW password_encryption;") == "scram-sha-256"
    server.stop()
    assert not os.path.exists(f"/proc/{pid}")
    assert not os.path.exists(basedir)


def test_render_toml_round_trips_a_proxy_config():
    config = {
        "proxy": {"admin_listen": "", "log_level": "info"},
        "auth": {"users_file": "users.toml"},
        "clusters": {"main": {
            "engine": "postgres", "hosts": ["127.0.0.1:5432"],
            "backend": {"tls": "disable", "connect_timeout": 5.0},
            "pool": {"mode": "transaction", "max_size": 5, "borrow_timeout": 5.0, "strict": True},
            "credentials": [{"user": "mp_scram", "password_env": "MP_SCRAM_PW"},
                            {"user": "*", "password": 'q"uote\\ \n'}],
        }},
        "listeners": [{"name": "pg", "listen": "127.0.0.1:6432", "cluster": "main",
                       "role": "writer", "auth": "trust", "odd key": None}],
    }
    text = render_toml(config)
    assert "[[clusters.main.credentials]]" in text and "[clusters.main.pool]" in text
    del config["listeners"][0]["odd key"]  # None means "leave the key out"
    assert tomllib.loads(text) == config


FAKE_PROXY = textwrap.dedent("""
    import signal, socket, sys, tomllib
    config = tomllib.load(open(sys.argv[-1], "rb"))
    print("fake proxy starting", flush=True)
    if config["proxy"].get("fail"):
        sys.exit("bad config: " + config["proxy"]["fail"])
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
    host, port = config["listeners"][0]["listen"].rsplit(":", 1)
    s = socket.create_server((host, int(port)))
    while True:
        s.accept()[0].close()
""")


def fake_config(port, **proxy):
    return {"proxy": {"log_level": "info", **proxy},
            "listeners": [{"name": "pg", "listen": f"127.0.0.1:{port}", "cluster": "main"}]}


def test_proxy_process_waits_for_listener_and_stops(proxy_factory):
    port = free_port()
    proxy = proxy_factory(fake_config(port), argv=[sys.executable, "-c", FAKE_PROXY])
    assert proxy.port == port and proxy.running
    assert "fake proxy starting" in proxy.log_text()
    assert proxy.stop() == 0
    assert not proxy.running


def test_proxy_process_failure_shows_log_tail(proxy_factory):
    with pytest.raises(RuntimeError, match="(?s)exited with 1.*bad config: nope"):
        proxy_factory(fake_config(free_port(), fail="nope"), argv=[sys.executable, "-c", FAKE_PROXY])


def test_proxy_process_gives_up_after_startup_timeout(proxy_factory):
    silent = [sys.executable, "-c", "import time; time.sleep(60)"]
    with pytest.raises(RuntimeError, match="not listening"):
        proxy_factory(fake_config(free_port()), argv=silent, startup_timeout=0.5)


def test_proxy_process_moves_to_fresh_ports_when_its_port_was_taken(pg, proxy_factory):
    """Another process holds the listener's port (as one can between free_port() and the proxy's bind): the proxy
    exits naming the address in use, and ProxyProcess starts it again on fresh ports."""
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        proxy = proxy_factory({
            "proxy": {"admin_listen": f"127.0.0.1:{free_port()}", "log_level": "warning"},
            "clusters": {"main": {"engine": "postgres", "hosts": [f"127.0.0.1:{pg.port}"],
                                  "backend": {"tls": "disable"}}},
            "listeners": [{"name": "pg", "listen": f"127.0.0.1:{taken}", "cluster": "main", "auth": "trust"}],
        })
        assert proxy.port != taken and proxy.running
        assert f"127.0.0.1:{taken}" in proxy.log_text() and "already in use" in proxy.log_text()
        with socket.create_connection((proxy.host, proxy.port), timeout=5) as client:
            client.sendall(b"\x00\x00\x00\x08\x04\xd2\x16\x2f")      # SSLRequest: the proxy answers one byte
            assert client.recv(1) in (b"N", b"S")
