"""Live reload under real clients: the config file is rewritten and the proxy told (SIGHUP, the admin console's
RELOAD over HTTP, `multiproxy reload`); pools resize under psycopg and PyMySQL clients holding transactions,
listeners come and go, a bad or restart-only config changes nothing and says why."""
from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import threading
import time
import tomllib
import urllib.error
import urllib.request

import psycopg
import pytest

from .mysqlkit import connect as mysql_connect, metric, metrics_text, query, start_proxy as start_mysql_proxy
from .pgserver import AUTH_DB
from .proxy import free_port, render_toml

pytestmark = pytest.mark.timeout(90)
USER = "mp_trust"


def pg_config(pg, max_size: int = 2) -> dict:
    return {
        "proxy": {"admin_listen": f"127.0.0.1:{free_port()}", "log_level": "info", "shutdown_timeout": 20},
        "clusters": {"main": {"engine": "postgres", "hosts": [f"127.0.0.1:{pg.port}"], "backend": {"tls": "disable"},
                              "pool": {"mode": "transaction", "max_size": max_size, "borrow_timeout": 30}}},
        "listeners": [{"name": "pg", "listen": f"127.0.0.1:{free_port()}", "cluster": "main", "auth": "trust"}],
    }


def rewrite(proxy, config: dict) -> None:
    """Write a new config file in place of the running one (the proxy reads it on reload)."""
    proxy.config_text = render_toml(config)
    proxy.config = tomllib.loads(proxy.config_text)
    proxy.write_file("multiproxy.toml", proxy.config_text)


def wait_for_log(proxy, text: str, count: int = 1, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while proxy.log_text().count(text) < count:
        assert time.monotonic() < deadline, f"{text!r} not logged {count} time(s); log tail:\n{proxy.log_tail()}"
        time.sleep(0.05)


def reload_by_signal(proxy, config: dict, outcome: str = "change(s) applied", count: int = 1) -> None:
    done = proxy.log_text().count(outcome)
    rewrite(proxy, config)
    proxy.send_signal(signal.SIGHUP)
    wait_for_log(proxy, outcome, done + count)


def connect(address, **kwargs) -> psycopg.Connection:
    return psycopg.connect(host=address[0], port=address[1], user=USER, dbname=AUTH_DB, connect_timeout=10, **kwargs)


def pool_size(proxy) -> float:
    return metric(metrics_text(proxy), "multiproxy_database_connections")


def waiting(proxy) -> float:
    return metric(metrics_text(proxy), "multiproxy_database_connection_requests_waiting")


def wait_until(predicate, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_max_size_raised_under_waiting_clients_then_lowered(pg, proxy_factory):
    config = pg_config(pg, max_size=2)
    proxy = proxy_factory(config)
    address = proxy.address("pg")
    clients = [connect(address) for _ in range(6)]
    pids: dict[int, int] = {}
    errors: list = []
    hold = threading.Event()

    def transaction(i: int) -> None:
        try:
            pids[i] = clients[i].execute("SELECT pg_backend_pid()").fetchone()[0]   # opens the transaction
            hold.wait(30)
            clients[i].execute("SELECT 1")
            clients[i].commit()
        except Exception as exc:  # reported below
            errors.append(f"client {i}: {exc!r}")

    threads = [threading.Thread(target=transaction, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    wait_until(lambda: len(pids) == 2 and waiting(proxy) == 4, "two transactions served and four waiting")
    assert pool_size(proxy) == 2

    config["clusters"]["main"]["pool"]["max_size"] = 6
    reload_by_signal(proxy, config)
    wait_until(lambda: len(pids) == 6, "the four waiting transactions to be served after the reload")
    assert len(set(pids.values())) == 6 and pool_size(proxy) == 6 and not errors
    assert "reload: clusters.main.pool.max_size: 2 -> 6" in proxy.log_text()
    hold.set()
    for t in threads:
        t.join(30)
    assert not errors, errors

    config["clusters"]["main"]["pool"]["max_size"] = 3
    reload_by_signal(proxy, config)
    wait_until(lambda: pool_size(proxy) == 3, "the pool to shrink to 3")
    with psycopg.connect(host=pg.host, port=pg.port, user="postgres", dbname=AUTH_DB, autocommit=True) as direct:
        wait_until(lambda: direct.execute("SELECT count(*) FROM pg_stat_activity WHERE usename = %s",
                                          (USER,)).fetchone()[0] == 3, "the server to see 3 backends of the pool")
    for client in clients:      # every client kept its connection through both reloads
        assert client.execute("SELECT 42").fetchone() == (42,)
        client.commit()
        client.close()
    assert pool_size(proxy) <= 3


def test_listeners_added_and_removed_and_the_removed_ones_drain(pg, proxy_factory):
    config = pg_config(pg, max_size=4)
    config["listeners"].append({"name": "old", "listen": f"127.0.0.1:{free_port()}", "cluster": "main",
                                "auth": "trust"})
    proxy = proxy_factory(config)
    old_address = proxy.address("old")
    busy = connect(old_address)
    idle = connect(old_address, autocommit=True)
    assert idle.execute("SELECT 1").fetchone() == (1,)
    assert busy.execute("SELECT 7").fetchone() == (7,)         # a transaction is open on the old listener

    new_config = copy.deepcopy(config)
    new_config["listeners"] = [config["listeners"][0],
                               {"name": "new", "listen": f"127.0.0.1:{free_port()}", "cluster": "main",
                                "auth": "trust", "max_client_connections": 1}]
    reload_by_signal(proxy, new_config)
    log = proxy.log_text()
    assert "reload: listeners.new: added" in log and "reload: listeners.old: removed" in log

    with connect(proxy.address("new"), autocommit=True) as fresh:            # the new listener serves
        assert fresh.execute("SELECT 'new'").fetchone() == ("new",)
        with pytest.raises(psycopg.OperationalError, match="max_client_connections"):
            connect(proxy.address("new"))          # its settings apply: one client at most
    with pytest.raises(psycopg.OperationalError):
        connect(old_address)                       # the removed one accepts no more

    # The client in a transaction on the removed listener finishes it, then is closed; the idle one is closed.
    assert busy.execute("SELECT 8").fetchone() == (8,)
    busy.commit()
    wait_for_log(proxy, "listener old: removed; its clients have left")
    for client in (busy, idle):
        with pytest.raises(psycopg.OperationalError):
            client.execute("SELECT 1")
        client.close()


def test_a_bad_config_changes_nothing_and_names_every_problem(pg, proxy_factory):
    config = pg_config(pg, max_size=2)
    proxy = proxy_factory(config)
    bad = copy.deepcopy(config)
    bad["clusters"]["main"]["pool"]["max_size"] = 0
    bad["listeners"][0]["role"] = "boss"
    bad["listeners"].append({"name": "extra", "listen": f"127.0.0.1:{free_port()}", "cluster": "main",
                             "auth": "trust"})
    reload_by_signal(proxy, bad, outcome="reload failed")
    log = proxy.log_text()
    assert "reload: clusters.main.pool.max_size: must be at least 1, got 0" in log
    assert "reload: listeners[0].role: expected one of 'writer', 'reader', got 'boss'" in log
    assert "nothing changed" in log and "listener extra" not in log
    extra_port = int(bad["listeners"][1]["listen"].rsplit(":", 1)[1])
    with pytest.raises(psycopg.OperationalError):
        connect(("127.0.0.1", extra_port))          # the new listener of the bad file was not bound
    with connect(proxy.address("pg"), autocommit=True) as client:
        assert client.execute("SELECT 1").fetchone() == (1,)

    # A file problem (found as a start would find it): the audit log's folder does not exist.
    bad = copy.deepcopy(config)
    bad["proxy"]["audit_log"] = "/nonexistent-folder/audit.jsonl"
    reload_by_signal(proxy, bad, outcome="reload failed", count=1)
    assert "reload: proxy.audit_log:" in proxy.log_text()

    # The console's RELOAD over HTTP answers that it failed, and why.
    host, port = proxy.admin_address
    request = urllib.request.Request(f"http://{host}:{port}/admin/reload", data=b"", method="POST")
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=10)
    body = caught.value.read().decode()
    assert "reload failed, nothing changed" in body and "proxy.audit_log" in body


def test_restart_only_changes_are_refused_and_multiproxy_reload_applies_the_rest(pg, proxy_factory):
    config = pg_config(pg, max_size=2)
    proxy = proxy_factory(config)
    host, port = proxy.admin_address
    command = [sys.executable, "-m", "multiproxy", "reload", "--admin", f"{host}:{port}"]

    refused = copy.deepcopy(config)
    refused["proxy"]["workers"] = 2
    refused["clusters"]["main"]["pool"]["max_size"] = 5
    rewrite(proxy, refused)
    done = subprocess.run(command, capture_output=True, text=True, timeout=30)
    assert done.returncode == 1
    assert "proxy.workers: 1 -> 2 needs a restart (the worker processes are forked at start)" in done.stderr
    assert "clusters.main.pool.max_size: 2 -> 5" not in proxy.log_text()       # nothing applied

    accepted = copy.deepcopy(config)
    accepted["listeners"][0]["max_client_connections"] = 1
    rewrite(proxy, accepted)
    done = subprocess.run(command, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert "reloaded" in done.stdout
    assert "reload: listeners.pg.max_client_connections: 0 -> 1" in proxy.log_text()
    with connect(proxy.address("pg"), autocommit=True) as client:
        assert client.execute("SELECT 1").fetchone() == (1,)
        with pytest.raises(psycopg.OperationalError, match="max_client_connections"):
            connect(proxy.address("pg"))

    accepted["listeners"][0]["max_client_connections"] = 0
    rewrite(proxy, accepted)
    done = subprocess.run([*command[:4], "--pid", str(proxy.pid)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0 and "SIGHUP sent" in done.stdout
    wait_for_log(proxy, "reload: listeners.pg.max_client_connections: 1 -> 0")


def test_every_worker_reloads(pg, proxy_factory):
    config = pg_config(pg, max_size=2)
    config["proxy"]["workers"] = 2
    proxy = proxy_factory(config)
    wait_for_log(proxy, "ready (pid", 2)                         # both workers handle SIGHUP from here on
    config["clusters"]["main"]["pool"]["max_size"] = 4
    reload_by_signal(proxy, config, count=2)                      # SIGHUP: forwarded to each worker
    config["listeners"].append({"name": "more", "listen": f"127.0.0.1:{free_port()}", "cluster": "main",
                                "auth": "trust"})
    rewrite(proxy, config)
    host, port = proxy.admin_address
    before = proxy.log_text().count("change(s) applied")
    urllib.request.urlopen(urllib.request.Request(f"http://{host}:{port}/admin/reload", data=b"", method="POST"),
                           timeout=10).read()                    # the console (worker 0) has every worker reload
    wait_for_log(proxy, "change(s) applied", before + 2)
    for _ in range(6):                                           # either worker may accept each of these
        with connect(proxy.address("more"), autocommit=True) as client:
            assert client.execute("SELECT 2").fetchone() == (2,)


def test_mysql_pool_resized_under_pymysql_clients(mariadb, proxy_factory):
    proxy = start_mysql_proxy(proxy_factory, mariadb, max_size=2, borrow_timeout=30)
    config = copy.deepcopy(proxy.config)
    clients = [mysql_connect(proxy, autocommit=False) for _ in range(5)]
    ids: dict[int, int] = {}
    errors: list = []
    hold = threading.Event()

    def transaction(i: int) -> None:
        try:
            query(clients[i], "BEGIN")
            ids[i] = query(clients[i], "SELECT CONNECTION_ID()")[0][0]
            hold.wait(30)
            clients[i].commit()
        except Exception as exc:  # reported below
            errors.append(f"client {i}: {exc!r}")

    threads = [threading.Thread(target=transaction, args=(i,)) for i in range(5)]
    for t in threads:
        t.start()
    wait_until(lambda: len(ids) == 2 and waiting(proxy) == 3, "two MySQL transactions served and three waiting")
    config["clusters"]["main"]["pool"]["max_size"] = 5
    reload_by_signal(proxy, config)
    wait_until(lambda: len(ids) == 5, "the waiting MySQL transactions to be served")
    assert len(set(ids.values())) == 5 and pool_size(proxy) == 5
    hold.set()
    for t in threads:
        t.join(30)
    assert not errors, errors
    config["clusters"]["main"]["pool"]["max_size"] = 1
    reload_by_signal(proxy, config)
    wait_until(lambda: pool_size(proxy) == 1, "the MySQL pool to shrink to 1")
    for client in clients:
        assert query(client, "SELECT 5") == [(5,)]
        client.commit()
        client.close()


def status(proxy) -> dict:
    host, port = proxy.admin_address
    with urllib.request.urlopen(f"http://{host}:{port}/status", timeout=10) as response:
        return json.load(response)


def test_credentials_hosts_and_clusters_follow_a_reload(pg, proxy_factory, tmp_path):
    wrong, right = tmp_path / "wrong.password", tmp_path / "right.password"
    for path, text in ((wrong, "not-the-password\n"), (right, "scram-pw\n")):
        path.write_text(text)
        os.chmod(path, 0o600)
    dead = f"127.0.0.1:{free_port()}"
    config = pg_config(pg, max_size=2)
    main = config["clusters"]["main"]
    main["hosts"] = [dead]
    main["pool"]["borrow_timeout"] = 5
    main["backend"]["connect_timeout"] = 2
    main["credentials"] = [{"user": "mp_scram", "password_file": str(wrong)}]
    proxy = proxy_factory(config)
    address = proxy.address("pg")

    def scram_client():
        return psycopg.connect(host=address[0], port=address[1], user="mp_scram", dbname=AUTH_DB, autocommit=True,
                               connect_timeout=10)

    with pytest.raises(psycopg.OperationalError, match="cannot connect to"):
        scram_client()
    main["hosts"] = [f"127.0.0.1:{pg.port}"]                       # the host moved
    reload_by_signal(proxy, config)
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        scram_client()
    main["credentials"][0]["password_file"] = str(right)            # a new secret source: the next login uses it
    reload_by_signal(proxy, config)
    assert f"reload: clusters.main.credentials[0].password_file: '{wrong}' -> '{right}'" in proxy.log_text()
    with scram_client() as client:
        assert client.execute("SELECT current_user").fetchone() == ("mp_scram",)

        # A second host (role verification by the registry from now on), then back to one.
        main["hosts"] = [f"127.0.0.1:{pg.port}", dead]
        main["health"] = {"probe_interval": 0.2, "probe_user": "mp_scram"}
        reload_by_signal(proxy, config)
        assert client.execute("SELECT 2").fetchone() == (2,)
        registry = status(proxy)["registry"]["main"]
        assert registry["writer"] == f"127.0.0.1:{pg.port}"
        assert sorted(n["address"] for n in registry["nodes"]) == sorted([f"127.0.0.1:{pg.port}", dead])
        main["hosts"] = [f"127.0.0.1:{pg.port}"]
        reload_by_signal(proxy, config)
        assert client.execute("SELECT 3").fetchone() == (3,)
        assert "main" not in (status(proxy)["registry"] or {})

    # A new cluster with its listener, then both removed.
    config["clusters"]["second"] = {"engine": "postgres", "hosts": [f"127.0.0.1:{pg.port}"],
                                    "backend": {"tls": "disable"}, "pool": {"max_size": 1}}
    config["listeners"].append({"name": "second", "listen": f"127.0.0.1:{free_port()}", "cluster": "second",
                                "auth": "trust"})
    reload_by_signal(proxy, config)
    with connect(proxy.address("second"), autocommit=True) as client:
        assert client.execute("SELECT current_user").fetchone() == (USER,)
    assert any(p["pool"].startswith("second/") for p in status(proxy)["pools"])
    second = proxy.address("second")
    del config["clusters"]["second"]
    config["listeners"].pop()
    reload_by_signal(proxy, config)
    assert "reload: clusters.second: removed" in proxy.log_text()
    assert not any(p["pool"].startswith("second/") for p in status(proxy)["pools"])
    with pytest.raises(psycopg.OperationalError):
        connect(second)


def test_tls_files_are_read_again_on_every_reload(pg, proxy_factory, tmp_path):
    from .test_pg_tls import write_pki
    first, second = write_pki(str(tmp_path), "first"), write_pki(str(tmp_path), "second")
    cert, key = tmp_path / "listener.crt", tmp_path / "listener.key"
    cert.write_bytes(open(first["cert"], "rb").read())
    key.write_bytes(open(first["key"], "rb").read())
    os.chmod(key, 0o600)
    config = pg_config(pg)
    config["listeners"][0].update(tls_cert_file=str(cert), tls_key_file=str(key), require_tls=True)
    proxy = proxy_factory(config)
    address = proxy.address("pg")

    def tls_client(ca):
        return connect(address, autocommit=True, sslmode="verify-full", sslrootcert=ca)

    before = tls_client(first["ca"])
    cert.write_bytes(open(second["cert"], "rb").read())             # the certificate is renewed in place
    key.write_bytes(open(second["key"], "rb").read())
    reload_by_signal(proxy, config, outcome="the configuration is unchanged")
    with tls_client(second["ca"]) as after:                           # new clients get the new certificate
        assert after.execute("SELECT 'renewed'").fetchone() == ("renewed",)
    with pytest.raises(psycopg.OperationalError, match="certificate verify failed"):
        tls_client(first["ca"])
    assert before.execute("SELECT 'kept'").fetchone() == ("kept",)  # a connected client is not disturbed
    before.close()
