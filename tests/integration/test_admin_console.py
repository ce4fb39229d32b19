"""The admin console in PgBouncer's dialect, through real clients: psql and psycopg on the virtual database `pgbouncer`
of a PostgreSQL listener, the same views and commands over HTTP and `multiproxy admin`, Debian's
prometheus-pgbouncer-exporter reading the console, and a MySQL pool showing up in SHOW POOLS."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.request

import psycopg
import pymysql
import pytest

from multiproxy.auth import UsersFile

from .conftest import MARIADB_DB
from .pgserver import AUTH_DB
from .proxy import REPO_ROOT, free_port

ADMIN = "mp_trust"          # a role of the pg fixture (trust), named in [admin] users
STATS = "mp_stats_reader"   # named in [admin] stats_users only
OTHER = "mp_nobody"         # in neither
TIMEOUT = 10

# PgBouncer's columns (its admin.c and stats.c), in its order; multiproxy's own come after them.
POOLS_COLUMNS = ["database", "user", "cl_active", "cl_waiting", "cl_active_cancel_req", "cl_waiting_cancel_req",
                 "sv_active", "sv_active_cancel", "sv_being_canceled", "sv_idle", "sv_used", "sv_tested", "sv_login",
                 "maxwait", "maxwait_us", "pool_mode", "load_balance_hosts"]
SOCKET_COLUMNS = ["type", "user", "database", "replication", "state", "addr", "port", "local_addr", "local_port",
                  "connect_time", "request_time", "wait", "wait_us", "close_needed", "ptr", "link", "remote_pid", "tls",
                  "application_name", "prepared_statements", "id"]
STATS_COLUMNS = ["database", "total_server_assignment_count", "total_xact_count", "total_query_count",
                 "total_received", "total_sent", "total_xact_time", "total_query_time", "total_wait_time",
                 "total_client_parse_count", "total_server_parse_count", "total_bind_count",
                 "total_client_login_count", "avg_server_assignment_count", "avg_xact_count", "avg_query_count",
                 "avg_recv", "avg_sent", "avg_xact_time", "avg_query_time", "avg_wait_time",
                 "avg_client_parse_count", "avg_server_parse_count", "avg_bind_count", "avg_client_login_count"]
DATABASES_COLUMNS = ["name", "host", "port", "database", "force_user", "pool_size", "min_pool_size",
                     "reserve_pool_size", "server_lifetime", "pool_mode", "load_balance_hosts", "max_connections",
                     "current_connections", "max_client_connections", "current_client_connections", "paused",
                     "disabled"]
LISTS = ["databases", "users", "peers", "pools", "peer_pools", "free_clients", "used_clients", "login_clients",
         "free_servers", "used_servers", "dns_names", "dns_zones", "dns_queries", "dns_pending"]


def console_config(pg, max_size: int = 5, borrow_timeout: float = 10.0, users_file: str | None = None,
                   extra_clusters: dict | None = None, extra_listeners: list | None = None) -> dict:
    config = {
        "proxy": {"admin_listen": f"127.0.0.1:{free_port()}", "log_level": "info", "shutdown_timeout": 2.0},
        "admin": {"users": [ADMIN], "stats_users": [STATS]},
        "clusters": {"main": {"engine": "postgres", "hosts": [f"127.0.0.1:{pg.port}"], "backend": {"tls": "disable"},
                              "pool": {"mode": "transaction", "max_size": max_size, "borrow_timeout": borrow_timeout}},
                     **(extra_clusters or {})},
        "listeners": [{"name": "pg", "listen": f"127.0.0.1:{free_port()}", "cluster": "main", "auth": "trust"},
                      *(extra_listeners or [])],
    }
    if users_file:
        config["auth"] = {"users_file": users_file}
    return config


def app(proxy, **kwargs) -> psycopg.Connection:
    return psycopg.connect(host=proxy.host, port=proxy.port, user=ADMIN, dbname=AUTH_DB, connect_timeout=TIMEOUT,
                           **kwargs)


def console(proxy, user: str = ADMIN, dbname: str = "pgbouncer") -> psycopg.Connection:
    return psycopg.connect(host=proxy.host, port=proxy.port, user=user, dbname=dbname, autocommit=True,
                           connect_timeout=TIMEOUT)


def show(conn, view: str) -> tuple[list[str], list[tuple]]:
    with conn.cursor() as cur:
        cur.execute(f"SHOW {view};")
        return [d.name for d in cur.description], cur.fetchall()


def named(conn, view: str) -> list[dict]:
    names, rows = show(conn, view)
    return [dict(zip(names, row)) for row in rows]


def psql(proxy, command: str, dbname: str = "pgbouncer", user: str = ADMIN) -> subprocess.CompletedProcess:
    return subprocess.run(["psql", "-X", "-At", "-h", proxy.host, "-p", str(proxy.port), "-U", user, "-d", dbname,
                           "-c", command], capture_output=True, text=True, timeout=TIMEOUT,
                          env={**os.environ, "PGCONNECT_TIMEOUT": str(TIMEOUT)})


def http(proxy, method: str, path: str, token: str = "") -> tuple[int, dict]:
    host, port = proxy.admin_address
    request = urllib.request.Request(f"http://{host}:{port}{path}", method=method,
                                     data=b"" if method == "POST" else None,
                                     headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as resp:
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)


def wait_for(predicate, timeout: float = TIMEOUT, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def pool_row(conn, database: str = AUTH_DB, user: str = ADMIN) -> dict | None:
    return next((r for r in named(conn, "POOLS") if r["database"] == database and r["user"] == user), None)


# -- views for a known state ---------------------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_views_show_a_known_state(pg, proxy_factory):
    proxy = proxy_factory(console_config(pg))
    idle, in_tx, pinned = app(proxy), app(proxy), app(proxy)
    try:
        idle.execute("SELECT 1").fetchall()
        idle.commit()
        in_tx.execute("SELECT 2").fetchall()            # psycopg opened a transaction: it holds a backend
        pinned.execute("CREATE TEMP TABLE admin_pin (x int)")
        pinned.commit()

        # psql, as an operator would type it
        out = psql(proxy, "SHOW POOLS")
        assert out.returncode == 0, out.stderr
        line = next(line for line in out.stdout.splitlines() if line.startswith(f"{AUTH_DB}|{ADMIN}|"))
        fields = line.split("|")
        assert fields[2:4] == ["3", "0"]                # cl_active, cl_waiting
        assert fields[6] == "2"                          # sv_active: the open transaction and the pinned session

        with console(proxy) as adm:
            names, _ = show(adm, "POOLS")
            assert names[:len(POOLS_COLUMNS)] == POOLS_COLUMNS
            row = pool_row(adm)
            assert (row["cl_active"], row["cl_waiting"], row["sv_active"], row["pool_mode"]) == (3, 0, 2, "transaction")
            assert row["sv_active"] + row["sv_idle"] + row["sv_login"] <= 5 and row["engine"] == "postgres"

            names, clients = show(adm, "CLIENTS")
            assert names[:len(SOCKET_COLUMNS)] == SOCKET_COLUMNS
            clients = [dict(zip(names, c)) for c in clients]
            app_clients = [c for c in clients if c["database"] == AUTH_DB]
            assert len(app_clients) == 3 and {c["type"] for c in app_clients} == {"C"}
            assert sorted(c["state"] for c in app_clients) == ["active", "active", "idle"]
            assert sum(c["pinned"] for c in app_clients) == 1
            assert any(c["database"] == "pgbouncer" for c in clients)     # the console's own client

            names, servers = show(adm, "SERVERS")
            assert names[:len(SOCKET_COLUMNS)] == SOCKET_COLUMNS
            servers = [dict(zip(names, s)) for s in servers]
            assert len(servers) == row["sv_active"] + row["sv_idle"] + row["sv_login"]
            active = [s for s in servers if s["state"] == "active"]
            assert len(active) == 2 and all(s["link"] for s in active)
            assert all(s["port"] == pg.port and s["remote_pid"] > 0 for s in servers)

            pins = named(adm, "PINS")
            assert len(pins) == 1, pins
            assert pins[0]["reason"] == "temp_table" and "CREATE TEMP TABLE" in pins[0]["statement"].upper()
            assert pins[0]["user"] == ADMIN and pins[0]["listener"] == "pg" and pins[0]["since"]

            names, stats = show(adm, "STATS")
            assert names[:len(STATS_COLUMNS)] == STATS_COLUMNS and "total_requests" in names
            stat = next(dict(zip(names, s)) for s in stats if s[0] == AUTH_DB)
            assert stat["total_xact_count"] >= 3 and stat["total_query_count"] >= 3
            assert stat["total_client_login_count"] == 3
            names, totals = show(adm, "STATS_TOTALS")
            assert names[:4] == ["database", "server_assignment_count", "xact_count", "query_count"]
            assert any(r[0] == AUTH_DB and r[2] >= 3 for r in totals)
            names, _ = show(adm, "STATS_AVERAGES")
            assert names[:4] == ["database", "server_assignment_count", "xact_count", "query_count"]

            names, databases = show(adm, "DATABASES")
            assert names[:len(DATABASES_COLUMNS)] == DATABASES_COLUMNS
            db = next(dict(zip(names, d)) for d in databases if d[0] == AUTH_DB)
            assert (db["host"], db["port"], db["pool_size"], db["current_client_connections"]) == \
                ("127.0.0.1", pg.port, 5, 3)
            assert (db["paused"], db["disabled"], db["cluster"]) == (0, 0, "main")

            users = named(adm, "USERS")
            assert any(u["name"] == ADMIN and u["current_connections"] >= 2 for u in users)
            config = {r["key"]: r for r in named(adm, "CONFIG")}
            assert config["admin.users"]["value"] == ADMIN
            assert config["clusters.main.pool.max_size"]["value"] == "5"
            lists = dict(show(adm, "LISTS")[1])
            assert list(lists) == LISTS
            assert (lists["pools"], lists["databases"], lists["used_clients"]) == (1, 1, 4)
            assert show(adm, "VERSION")[1][0][0].startswith("multiproxy ")
            clusters = named(adm, "CLUSTERS")
            assert [(c["cluster"], c["node"], c["role"]) for c in clusters] == [("main", f"127.0.0.1:{pg.port}", "writer")]
            names, _ = show(adm, "EVENTS")
            assert names == ["time", "event", "cluster", "database", "detail"]
            assert show(adm, "help")[1]                       # case-insensitive
            with pytest.raises(psycopg.errors.UndefinedObject, match="unknown view"):
                show(adm, "NOSUCHVIEW")
            with pytest.raises(psycopg.errors.SyntaxError, match="unknown command"):
                adm.execute("FROBNICATE")
            assert adm.execute("SHOW VERSION").fetchall()    # the connection still works after errors

        # the same over HTTP and from the shell
        status, body = http(proxy, "GET", "/admin/pools")
        assert status == 200 and [c["name"] for c in body["columns"]][:2] == ["database", "user"]
        status, body = http(proxy, "GET", "/admin/pins?format=objects")
        assert status == 200 and body["rows"][0]["reason"] == "temp_table"
        assert http(proxy, "GET", "/admin/nosuch")[0] == 404
        host, port = proxy.admin_address
        out = subprocess.run([sys.executable, "-m", "multiproxy", "admin", "--admin", f"{host}:{port}", "SHOW", "POOLS"],
                             capture_output=True, text=True, timeout=30,
                             env={**os.environ, "PYTHONPATH": os.pathsep.join([REPO_ROOT, os.environ.get("PYTHONPATH", "")])})
        assert out.returncode == 0, out.stderr
        assert "cl_active" in out.stdout and AUTH_DB in out.stdout and "(1 row)" in out.stdout
    finally:
        for conn in (idle, in_tx, pinned):
            conn.close()


# -- who may use the console -------------------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_admin_http_token_when_configured(pg, proxy_factory):
    config = console_config(pg)
    config["admin"]["http_token_env"] = "MP_TEST_ADMIN_TOKEN"
    proxy = proxy_factory(config, env={"MP_TEST_ADMIN_TOKEN": "s3cret-token"})
    status, body = http(proxy, "GET", "/admin/pools")
    assert status == 403 and "Authorization: Bearer" in body["error"]
    assert http(proxy, "GET", "/admin/pools", token="wrong")[0] == 403
    assert http(proxy, "GET", "/admin/lists", token="s3cret-token")[0] == 200
    host, port = proxy.admin_address
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO_ROOT, os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-m", "multiproxy", "admin", "--admin", f"{host}:{port}", "SHOW", "LISTS"],
                         capture_output=True, text=True, timeout=30, env=env)
    assert out.returncode == 1 and "admin token" in out.stderr
    out = subprocess.run([sys.executable, "-m", "multiproxy", "admin", "--admin", f"{host}:{port}", "disable", "x"],
                         capture_output=True, text=True, timeout=30, env={**env, "MULTIPROXY_ADMIN_TOKEN": "s3cret-token"})
    assert out.returncode == 0 and out.stdout.strip() == "DISABLE", out.stderr
    with console(proxy) as adm:
        assert next(r for r in named(adm, "DATABASES") if r["name"] == "x")["disabled"] == 1


@pytest.mark.timeout(60)
def test_non_admin_refused_stats_user_shows_only_and_simple_queries_only(pg, proxy_factory):
    proxy = proxy_factory(console_config(pg))
    for database in ("pgbouncer", "multiproxy"):
        with pytest.raises(psycopg.OperationalError, match="not allowed"):
            console(proxy, user=OTHER, dbname=database)
    out = psql(proxy, "SHOW POOLS", user=OTHER)
    assert out.returncode != 0 and "not allowed" in out.stderr and "[admin] users" in out.stderr
    with console(proxy, user=STATS) as stats:
        assert show(stats, "POOLS")[0][0] == "database"
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="stats_users"):
            stats.execute("PAUSE")
    with console(proxy, dbname="multiproxy") as adm:
        # psycopg's parameters go over the extended protocol: refused, and the session goes on
        with pytest.raises(psycopg.errors.FeatureNotSupported, match="simple queries only"):
            adm.execute("SHOW POOLS", prepare=True)
        with pytest.raises(psycopg.errors.FeatureNotSupported, match="simple queries only"):
            adm.execute("SHOW %s", ["POOLS"])
        assert adm.execute("show lists").fetchall()
    # nothing of this reached a backend: no pool for the console databases
    with console(proxy) as adm:
        assert [r for r in named(adm, "POOLS") if r["database"] in ("pgbouncer", "multiproxy")] == []


@pytest.mark.timeout(60)
def test_pool_of_a_missing_database_is_not_kept(pg, proxy_factory):
    proxy = proxy_factory(console_config(pg))
    out = psql(proxy, "SELECT 1", dbname="no_such_db_here")
    assert out.returncode != 0 and "does not exist" in out.stderr
    with pytest.raises(psycopg.OperationalError, match="does not exist"):
        psycopg.connect(host=proxy.host, port=proxy.port, user=ADMIN, dbname="no_such_db_either",
                        connect_timeout=TIMEOUT)
    with app(proxy) as conn:
        conn.execute("SELECT 1").fetchall()
    with console(proxy) as adm:
        assert [(r["database"], r["user"]) for r in named(adm, "POOLS")] == [(AUTH_DB, ADMIN)]
    status, body = http(proxy, "GET", "/admin/databases?format=objects")
    assert [r["name"] for r in body["rows"]] == [AUTH_DB]


# -- commands ----------------------------------------------------------------------------------------------------

@pytest.mark.timeout(90)
def test_pause_waits_for_borrowed_backends_and_resume_lets_waiting_clients_on(pg, proxy_factory):
    proxy = proxy_factory(console_config(pg, borrow_timeout=20.0))
    holder = app(proxy)
    holder.execute("SELECT 1").fetchall()           # a transaction is open: its backend is borrowed
    adm = console(proxy)
    paused = threading.Event()
    threading.Thread(target=lambda: (adm.execute(f"PAUSE {AUTH_DB}"), paused.set()), daemon=True).start()
    try:
        assert not paused.wait(0.7), "PAUSE answered while a backend was still borrowed"
        holder.commit()
        assert paused.wait(TIMEOUT), "PAUSE did not answer once the backend came back"
        with console(proxy) as watch:     # as PgBouncer's PAUSE: the backends are closed, the server may restart
            assert [s for s in named(watch, "SERVERS") if s["database"] == AUTH_DB] == []

        waiter = app(proxy, autocommit=True)
        result: list = []
        thread = threading.Thread(target=lambda: result.append(waiter.execute("SELECT 42").fetchone()[0]), daemon=True)
        thread.start()
        with console(proxy) as watch:
            assert wait_for(lambda: (pool_row(watch) or {}).get("cl_waiting") == 1), pool_row(watch)
            time.sleep(0.2)
            row = pool_row(watch)
            assert row["maxwait"] * 1_000_000 + row["maxwait_us"] >= 200_000     # the waiting client, in seconds and µs
            db = next(r for r in named(watch, "DATABASES") if r["name"] == AUTH_DB)
            assert db["paused"] == 1
        time.sleep(0.3)
        assert result == []                            # still waiting while paused
        adm.execute(f"RESUME {AUTH_DB}")
        thread.join(TIMEOUT)
        assert result == [42]
        with pytest.raises(psycopg.errors.InvalidParameterValue, match="not paused"):
            adm.execute(f"RESUME {AUTH_DB}")
        # over HTTP: POST /admin/pause/<db> answers once nothing is borrowed, then resume
        assert http(proxy, "POST", f"/admin/pause/{AUTH_DB}") == (200, {"command": "PAUSE", "columns": [], "rows": []})
        assert http(proxy, "POST", f"/admin/resume/{AUTH_DB}")[0] == 200
        waiter.close()
    finally:
        holder.close()
        adm.close()


@pytest.mark.timeout(90)
def test_reconnect_wait_close_kill_disable_enable(pg, proxy_factory):
    proxy = proxy_factory(console_config(pg))
    adm = console(proxy)
    try:
        with app(proxy, autocommit=True) as conn:
            before = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
            adm.execute(f"RECONNECT {AUTH_DB}")
            adm.execute(f"WAIT_CLOSE {AUTH_DB}")
            assert [s for s in named(adm, "SERVERS") if s["database"] == AUTH_DB and s["close_needed"]] == []
            after = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
            assert after != before                      # a new login served the next transaction

        victims = [app(proxy, autocommit=True) for _ in range(2)]
        for victim in victims:
            victim.execute("SELECT 1").fetchall()
        adm.execute(f"KILL {AUTH_DB}")
        for victim in victims:
            with pytest.raises(psycopg.OperationalError):
                victim.execute("SELECT 1")
            victim.close()
        assert wait_for(lambda: not [c for c in named(adm, "CLIENTS") if c["database"] == AUTH_DB])
        db = next(r for r in named(adm, "DATABASES") if r["name"] == AUTH_DB)
        assert (db["paused"], db["current_connections"]) == (1, 0)      # KILL leaves the database paused
        adm.execute(f"RESUME {AUTH_DB}")

        adm.execute(f"DISABLE {AUTH_DB}")
        with pytest.raises(psycopg.OperationalError, match="disabled by an administrator"):
            app(proxy)
        assert next(r for r in named(adm, "DATABASES") if r["name"] == AUTH_DB)["disabled"] == 1
        adm.execute(f"enable {AUTH_DB};")
        with app(proxy) as conn:
            assert conn.execute("SELECT 7").fetchone()[0] == 7
        with pytest.raises(psycopg.errors.SyntaxError, match="needs a database name"):
            adm.execute("DISABLE")
        events = [e["event"] for e in named(adm, "EVENTS")]
        assert events == ["reconnect", "kill", "resume", "disable", "enable"]
    finally:
        adm.close()


@pytest.mark.timeout(60)
def test_reload_reads_the_users_file_and_shutdown_stops_the_proxy(pg, proxy_factory, tmp_path):
    users_path = tmp_path / "users.toml"
    users = UsersFile.empty()
    users.add("mp_first", password="pw-one")
    users.save(users_path)
    proxy = proxy_factory(console_config(pg, users_file=str(users_path)))
    with console(proxy) as adm:
        assert [u["name"] for u in named(adm, "USERS")] == ["mp_first"]
        users.add("mp_second", password="pw-two")
        users.save(users_path)
        adm.execute("RELOAD")
        assert [u["name"] for u in named(adm, "USERS")] == ["mp_first", "mp_second"]
        holder = app(proxy)
        holder.execute("SELECT 1").fetchall()
        adm.execute("SHUTDOWN")
        # graceful: the client in a transaction is told (proxy.shutdown_timeout = 2 s), then the process ends
        assert wait_for(lambda: proxy._proc.poll() is not None, timeout=20), "the proxy did not stop"
        assert proxy._proc.returncode == 0
        with pytest.raises(psycopg.OperationalError):
            holder.execute("SELECT 1")
        holder.close()


# -- other engines' pools and the exporter -----------------------------------------------------------------------

@pytest.mark.timeout(90)
def test_mysql_pool_appears_in_show_pools(pg, mariadb, proxy_factory):
    mysql_port = free_port()
    proxy = proxy_factory(console_config(
        pg,
        extra_clusters={"maria": {"engine": "mysql", "hosts": [f"127.0.0.1:{mariadb.port}"], "backend": {"tls": "disable"},
                                  "credentials": [{"user": "mp_native", "password": "native-pw"}]}},
        extra_listeners=[{"name": "my", "listen": f"127.0.0.1:{mysql_port}", "cluster": "maria", "auth": "trust"}]))
    conn = pymysql.connect(host="127.0.0.1", port=mysql_port, user="mp_native", password="", database=MARIADB_DB,
                           connect_timeout=TIMEOUT)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 1")
            assert cur.fetchone() == (1,)
        with console(proxy) as adm:
            rows = [r for r in named(adm, "POOLS") if r["engine"] == "mysql"]
            assert [(r["database"], r["user"], r["cluster"], r["cl_active"]) for r in rows] == \
                [(MARIADB_DB, "mp_native", "maria", 1)]
            clients = [c for c in named(adm, "CLIENTS") if c["engine"] == "mysql"]
            assert [(c["user"], c["listener"]) for c in clients] == [("mp_native", "my")]
            servers = [s for s in named(adm, "SERVERS") if s["engine"] == "mysql"]
            assert servers and all(s["remote_pid"] > 0 for s in servers)     # MySQL's connection (thread) id
            assert [r["node"] for r in named(adm, "CLUSTERS") if r["cluster"] == "maria"] == [f"127.0.0.1:{mariadb.port}"]
        # a MySQL client that merely tried a missing database leaves no pool behind either
        with pytest.raises(pymysql.err.OperationalError, match="Unknown database"):
            pymysql.connect(host="127.0.0.1", port=mysql_port, user="mp_native", password="", database="no_such_db",
                            connect_timeout=TIMEOUT).cursor().execute("SELECT 1")
        with console(proxy) as adm:
            assert [r["database"] for r in named(adm, "POOLS") if r["engine"] == "mysql"] == [MARIADB_DB]
    finally:
        conn.close()


EXPORTER = "/usr/bin/prometheus-pgbouncer-exporter"


@pytest.mark.timeout(90)
@pytest.mark.skipif(not os.path.exists(EXPORTER), reason="Debian's prometheus-pgbouncer-exporter is not installed "
                    "(tools/install-deps.sh installs it)")
def test_prometheus_pgbouncer_exporter_reads_the_console(pg, proxy_factory, tmp_path):
    proxy = proxy_factory(console_config(pg))
    clients = [app(proxy, autocommit=True) for _ in range(2)]
    for conn in clients:
        conn.execute("SELECT 1").fetchall()
    port = free_port()
    log_path = tmp_path / "exporter.log"
    with open(log_path, "wb") as log:
        # The Debian package's own interpreter and psycopg2; a config file is optional (every flag has a default).
        exporter = subprocess.Popen(
            [EXPORTER, "--host", "127.0.0.1", "--port", str(port), "--pgbouncer-host", proxy.host,
             "--pgbouncer-port", str(proxy.port), "--pgbouncer-user", ADMIN],
            stdout=log, stderr=subprocess.STDOUT, env={"PATH": "/usr/bin:/bin", "PGCONNECT_TIMEOUT": "10"})
    try:
        def scrape():
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=TIMEOUT) as resp:
                    return resp.read().decode()
            except OSError:
                return None
        text = wait_for(scrape, timeout=30, interval=0.2)
        assert text, log_path.read_text()
        lines = text.splitlines()

        def sample(name, **labels):
            want = ",".join(f'{k}="{v}"' for k, v in labels.items())
            return next((float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith(f"{name}{{{want}}}")), None)
        assert sample("pgbouncer_active_clients", database=AUTH_DB, user=ADMIN) == 2.0
        assert sample("pgbouncer_waiting_clients", database=AUTH_DB, user=ADMIN) == 0.0
        assert sample("pgbouncer_requests_total", database=AUTH_DB) >= 2.0
        assert sample("pgbouncer_pool_size", database=AUTH_DB) == 5.0
        assert next(float(line.split()[-1]) for line in lines if line.startswith("pgbouncer_pools ")) == 1.0
        assert next(float(line.split()[-1]) for line in lines if line.startswith("pgbouncer_used_clients ")) >= 3.0
    finally:
        exporter.terminate()
        exporter.wait(10)
        for conn in clients:
            conn.close()
