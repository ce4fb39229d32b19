"""A backend's refusal of a login reaches the client as a well-formed error of its own protocol, with the server's code,
SQLSTATE and text, over plaintext and TLS, for every client auth method: at the login when the pool has no facts to
greet it from, with the first request (then the client is closed) when it was greeted from another login's facts.

Each refusal is compared with what the same server says to the same client connecting directly."""
from __future__ import annotations

import os
import shutil
import ssl
import subprocess

import pymysql
import pytest

from multiproxy.auth import UsersFile

try:
    from .mysqlkit import APP_PASSWORD, APP_USER, DB, mysql_config, query, users_toml
    from .pgserver import AUTH_DB
    from .proxy import free_port
    from .tdskit import DB as TDS_DB
    from .tdskit import LAB_PASSWORD, LAB_USER, LabProcess, pymssql_refusal
    from .test_pg_tls import write_pki
except ImportError:
    from mysqlkit import APP_PASSWORD, APP_USER, DB, mysql_config, query, users_toml
    from pgserver import AUTH_DB
    from proxy import free_port
    from tdskit import DB as TDS_DB
    from tdskit import LAB_PASSWORD, LAB_USER, LabProcess, pymssql_refusal
    from test_pg_tls import write_pki

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return write_pki(str(tmp_path_factory.mktemp("refusal-pki")), "proxy")


# ---------------------------------------------------------------------------------------------- MySQL

LIMITED_USER, LIMITED_PASSWORD = "mp_limited", "limited-pw"
SECRET_DB, MISSING_DB = "secretdb", "nosuchdb"
# client auth method -> cluster options; caching_sha2_password's full path with the fast path turned off
MYSQL_METHODS = {"mysql_native_password": ("mysql_native_password", {}),
                 "caching_sha2_fast": ("caching_sha2_password", {}),
                 "caching_sha2_full": ("caching_sha2_password", {"caching_sha2_fast_auth": "false"}),
                 "trust": ("trust", {})}


@pytest.fixture(scope="module")
def limited_user(mariadb):
    """A backend user that may use mpdb and nosuchdb, which does not exist, but not secretdb, which does."""
    mariadb.sql(f"CREATE DATABASE IF NOT EXISTS {SECRET_DB};"
                f"CREATE USER IF NOT EXISTS '{LIMITED_USER}'@'%' IDENTIFIED BY '{LIMITED_PASSWORD}';"
                f"GRANT ALL ON {DB}.* TO '{LIMITED_USER}'@'%'; GRANT ALL ON {MISSING_DB}.* TO '{LIMITED_USER}'@'%';")
    return LIMITED_USER


def mysql_direct_refusal(mariadb, database: str, password: str = LIMITED_PASSWORD,
                         user: str = LIMITED_USER) -> tuple[int, str]:
    """(code, text) the server gives PyMySQL logging in directly (without TLS) as the backend user."""
    with pytest.raises(pymysql.err.OperationalError) as refused:
        pymysql.connect(host=mariadb.host, port=mariadb.port, user=user, password=password,
                        database=database, connect_timeout=10)
    return refused.value.args[0], refused.value.args[1]


def mysql_proxy(proxy_factory, mariadb, pki, method: str, password: str = LIMITED_PASSWORD,
                user: str = LIMITED_USER):
    auth, options = MYSQL_METHODS[method]
    listener = {"tls_cert_file": pki["cert"], "tls_key_file": pki["key"]}
    config = mysql_config(mariadb, auth=auth, options=options or None, listener=listener, backend_user=user,
                          backend_password=password)
    return proxy_factory(config, files={"users.toml": users_toml()})


def pymysql_through(proxy, database: str, tls_ca: str | None) -> tuple[int, str]:
    """(code, text) PyMySQL gets, at its login or, when that is accepted, at its first query."""
    kwargs = {"ssl": ssl.create_default_context(cafile=tls_ca)} if tls_ca else {}
    try:
        conn = pymysql.connect(host=proxy.host, port=proxy.port, user=APP_USER, password=APP_PASSWORD,
                               database=database, connect_timeout=10, read_timeout=30, **kwargs)
    except pymysql.err.OperationalError as exc:
        return exc.args[0], exc.args[1]
    try:
        with pytest.raises(pymysql.err.MySQLError) as refused:
            query(conn, "SELECT 1")
        with pytest.raises(pymysql.err.MySQLError):
            query(conn, "SELECT 1")          # the proxy closed the client after the refusal
        return refused.value.args[0], refused.value.args[1]
    finally:
        conn.close()


def mariadb_cli_through(proxy, database: str, tls_ca: str | None) -> str:
    """The mariadb CLI's error line (it connects, then runs one query; a failed query is echoed above it)."""
    argv = [shutil.which("mariadb") or "mariadb", "--no-defaults", "-h", proxy.host, "-P", str(proxy.port),
            "-u", APP_USER, f"-p{APP_PASSWORD}", "-N", "-B"]
    argv += ["--ssl", f"--ssl-ca={tls_ca}", "--ssl-verify-server-cert"] if tls_ca else ["--skip-ssl"]
    out = subprocess.run([*argv, database], input="SELECT 1;\n", capture_output=True, text=True, timeout=60)
    assert out.returncode != 0, out.stdout
    return out.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("method", list(MYSQL_METHODS))
def test_mysql_refusals_are_the_servers_errors(mariadb, limited_user, proxy_factory, pki, method):
    proxy = mysql_proxy(proxy_factory, mariadb, pki, method)
    denied = mysql_direct_refusal(mariadb, SECRET_DB)
    missing = mysql_direct_refusal(mariadb, MISSING_DB)
    assert denied[0] == 1044 and missing[0] == 1049
    # No pool has logged in yet: the client's own login is refused, at its login.
    for tls_ca in (None, pki["ca"]):
        assert pymysql_through(proxy, SECRET_DB, tls_ca) == denied
        assert pymysql_through(proxy, MISSING_DB, tls_ca) == missing
    cold = mariadb_cli_through(proxy, SECRET_DB, pki["ca"])
    assert cold.startswith("ERROR 1044 (42000)") and cold.endswith(denied[1]), cold
    # Once another pool has logged in, a new pool with a free slot still logs in itself: the refusal still comes
    # at the login, as directly (borrowed greeting facts are for a budget with no free slot).
    conn = pymysql.connect(host=proxy.host, port=proxy.port, user=APP_USER, password=APP_PASSWORD, database=DB,
                           connect_timeout=10)
    assert query(conn, "SELECT 1") == [(1,)]
    conn.close()
    for tls_ca in (None, pki["ca"]):
        assert pymysql_through(proxy, SECRET_DB, tls_ca) == denied
        assert pymysql_through(proxy, MISSING_DB, tls_ca) == missing
        for database, (code, text) in ((SECRET_DB, denied), (MISSING_DB, missing)):
            line = mariadb_cli_through(proxy, database, tls_ca)
            assert line.startswith(f"ERROR {code} (42000)") and line.endswith(text) and "at line" not in line, line


def test_mysql_access_denied_to_the_backend_user_is_the_servers_error(mariadb, limited_user, proxy_factory, pki):
    proxy = mysql_proxy(proxy_factory, mariadb, pki, "caching_sha2_fast", password="not-the-password")
    code, text = mysql_direct_refusal(mariadb, DB, password="not-the-password")
    assert code == 1045
    for tls_ca in (None, pki["ca"]):
        assert pymysql_through(proxy, DB, tls_ca) == (code, text)


# ---------------------------------------------------------------------------------------------- PostgreSQL

PG_BACKEND_USER, PG_BACKEND_PASSWORD = "mp_scram", "scram-pw"
PG_METHODS = ("trust", "md5", "scram-sha-256")


def pg_proxy(proxy_factory, pg, pki, method: str, password: str = PG_BACKEND_PASSWORD, user: str = PG_BACKEND_USER):
    users = UsersFile()
    users.add(APP_USER, APP_PASSWORD, kinds=["scram_sha_256", "md5"])
    config = {
        "proxy": {"admin_listen": f"127.0.0.1:{free_port()}", "log_level": "info"},
        "clusters": {"main": {"engine": "postgres", "hosts": [f"127.0.0.1:{pg.port}"], "backend": {"tls": "disable"},
                              "pool": {"mode": "transaction", "max_size": 3, "borrow_timeout": 10.0},
                              "credentials": [{"user": "*", "backend_user": user, "password": password}]}},
        "listeners": [{"name": "pg", "listen": f"127.0.0.1:{free_port()}", "cluster": "main", "role": "writer",
                       "auth": method, "tls_cert_file": pki["cert"], "tls_key_file": pki["key"]}],
    }
    if method != "trust":
        config["auth"] = {"users_file": "users.toml"}
    return proxy_factory(config, files={"users.toml": users.dumps()})


def pg8000_refusal(host: str, port: int, user: str, password: str, database: str, tls_ca: str | None = None) -> dict:
    """The fields (C, M, S) of the ErrorResponse pg8000 gets when it logs in and runs one query."""
    import pg8000.native
    context = ssl.create_default_context(cafile=tls_ca) if tls_ca else None
    with pytest.raises(pg8000.native.DatabaseError) as refused:
        conn = pg8000.native.Connection(user, host=host, port=port, password=password, database=database,
                                        timeout=10, ssl_context=context)
        try:
            conn.run("SELECT 1")
        finally:
            conn.close()
    fields = refused.value.args[0]
    return {key: fields[key] for key in ("S", "C", "M")}


def psql_refusal(host: str, port: int, user: str, password: str, database: str, sslmode: str) -> str:
    """psql's error after `FATAL:`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(PGPASSFILE=os.devnull, PGPASSWORD=password, LC_ALL="C")
    dsn = f"host={host} port={port} user={user} dbname={database} connect_timeout=10 sslmode={sslmode}"
    out = subprocess.run([shutil.which("psql") or "psql", "-X", "-A", "-t", "-w", "-d", dsn, "-c", "SELECT 1"],
                         capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode != 0, out.stdout
    return out.stderr.split("FATAL:", 1)[1].strip()


@pytest.mark.parametrize("method", PG_METHODS)
def test_postgres_refusals_are_the_servers_errors(pg, proxy_factory, pki, method):
    proxy = pg_proxy(proxy_factory, pg, pki, method)
    host, port = proxy.address("pg")
    direct = pg8000_refusal(pg.host, pg.port, PG_BACKEND_USER, PG_BACKEND_PASSWORD, MISSING_DB)
    assert direct == {"S": "FATAL", "C": "3D000", "M": f'database "{MISSING_DB}" does not exist'}
    direct_psql = psql_refusal(pg.host, pg.port, PG_BACKEND_USER, PG_BACKEND_PASSWORD, MISSING_DB, "disable")
    for tls_ca in (None, pki["ca"]):
        assert pg8000_refusal(host, port, APP_USER, APP_PASSWORD, MISSING_DB, tls_ca) == direct
    for sslmode in ("disable", "require"):
        assert psql_refusal(host, port, APP_USER, APP_PASSWORD, MISSING_DB, sslmode) == direct_psql
    # after a login to a database that exists, the refusal is the same
    import pg8000.native
    conn = pg8000.native.Connection(APP_USER, host=host, port=port, password=APP_PASSWORD, database=AUTH_DB, timeout=10)
    assert conn.run("SELECT 1") == [[1]]
    conn.close()
    assert pg8000_refusal(host, port, APP_USER, APP_PASSWORD, MISSING_DB) == direct


def test_postgres_password_refused_to_the_backend_user_is_the_servers_error(pg, proxy_factory, pki):
    proxy = pg_proxy(proxy_factory, pg, pki, "scram-sha-256", password="not-the-password")
    host, port = proxy.address("pg")
    direct = pg8000_refusal(pg.host, pg.port, PG_BACKEND_USER, "not-the-password", AUTH_DB)
    assert direct["C"] == "28P01"
    for tls_ca in (None, pki["ca"]):
        assert pg8000_refusal(host, port, APP_USER, APP_PASSWORD, AUTH_DB, tls_ca) == direct
    assert psql_refusal(host, port, APP_USER, APP_PASSWORD, AUTH_DB, "require") == \
        psql_refusal(pg.host, pg.port, PG_BACKEND_USER, "not-the-password", AUTH_DB, "disable")


def test_postgres_tls_required_for_the_backend_user_is_the_servers_error(pg, proxy_factory, pki):
    # The backend leg has no TLS (backend.tls = 'disable'), and pg_hba.conf turns this user away without it.
    pg.add_hba_lines(["hostnossl all mp_tlsonly 127.0.0.1/32 reject"])
    proxy = pg_proxy(proxy_factory, pg, pki, "md5", password="", user="mp_tlsonly")
    host, port = proxy.address("pg")
    direct = pg8000_refusal(pg.host, pg.port, "mp_tlsonly", "", AUTH_DB)
    assert direct["C"] == "28000" and "no encryption" in direct["M"]
    for tls_ca in (None, pki["ca"]):
        assert pg8000_refusal(host, port, APP_USER, APP_PASSWORD, AUTH_DB, tls_ca) == direct


# ---------------------------------------------------------------------------------------------- TDS

@pytest.fixture(scope="module")
def tds_lab(tmp_path_factory):
    pytest.importorskip("pymssql")
    server = LabProcess(tmp_path_factory.mktemp("refusal-tds"))
    yield server
    server.stop()


def tds_proxy(proxy_factory, lab, pki, password: str = LAB_PASSWORD):
    users = UsersFile()
    users.add(APP_USER, APP_PASSWORD, kinds=["tds_sha256"])
    config = {
        "proxy": {"admin_listen": f"127.0.0.1:{free_port()}", "log_level": "info"},
        "auth": {"users_file": "users.toml"},
        "clusters": {"main": {"engine": "tds", "hosts": [f"127.0.0.1:{lab.port}"], "backend": {"tls": "disable"},
                              "pool": {"mode": "transaction", "max_size": 3, "borrow_timeout": 10.0},
                              "credentials": [{"user": "*", "backend_user": LAB_USER, "password": password}]}},
        "listeners": [{"name": "tds", "listen": f"127.0.0.1:{free_port()}", "cluster": "main", "role": "writer",
                       "auth": "scram-sha-256", "tls_cert_file": pki["cert"], "tls_key_file": pki["key"]}],
    }
    return proxy_factory(config, files={"users.toml": users.dumps()})


def test_tds_refusals_are_the_servers_errors(tds_lab, proxy_factory, pki):
    proxy = tds_proxy(proxy_factory, tds_lab, pki)
    direct = pymssql_refusal(server="127.0.0.1", port=tds_lab.port, user=LAB_USER, password=LAB_PASSWORD,
                             database=MISSING_DB)
    assert direct[0] == 4060 and f'"{MISSING_DB}"' in direct[1]
    for encryption in ("off", "request", "require"):
        through = pymssql_refusal(server=proxy.host, port=proxy.port, user=APP_USER, password=APP_PASSWORD,
                                  database=MISSING_DB, encryption=encryption)
        assert through[0] == direct[0] and through[1].startswith(direct[1].split("DB-Lib")[0]), (through, direct)
    wrong = tds_proxy(proxy_factory, tds_lab, pki, password="not-the-password")
    direct = pymssql_refusal(server="127.0.0.1", port=tds_lab.port, user=LAB_USER, password="not-the-password",
                             database=TDS_DB)
    assert direct[0] == 18456
    through = pymssql_refusal(server=wrong.host, port=wrong.port, user=APP_USER, password=APP_PASSWORD,
                              database=TDS_DB)
    assert through[0] == 18456 and through[1].startswith(direct[1].split("DB-Lib")[0]), (through, direct)


def test_mysql_tls_required_by_the_backend_user_is_the_servers_error(mariadb, proxy_factory, pki):
    # The backend leg has no TLS (backend.tls = 'disable'), and the server requires it of this user.
    mariadb.sql("CREATE USER IF NOT EXISTS 'mp_tlsonly'@'%' IDENTIFIED BY 'tls-pw' REQUIRE SSL;"
                f"GRANT ALL ON {DB}.* TO 'mp_tlsonly'@'%';")
    proxy = mysql_proxy(proxy_factory, mariadb, pki, "mysql_native_password", password="tls-pw", user="mp_tlsonly")
    code, text = mysql_direct_refusal(mariadb, DB, password="tls-pw", user="mp_tlsonly")
    assert code == 1045
    for tls_ca in (None, pki["ca"]):
        assert pymysql_through(proxy, DB, tls_ca) == (code, text)
    assert mariadb_cli_through(proxy, DB, pki["ca"]) == f"ERROR 1045 (28000): {text}"
