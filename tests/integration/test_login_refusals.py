"""A backend's refusal of a login reaches the client as a well-formed error of its own protocol, with the server's code,
SQLSTATE and text, over plaintext and TLS, for every client auth method: at the login when the pool has no facts to
greet it from, with the first request (then the client is closed) when it was greeted from another login's facts.

Each refusal is compared with what the same server says to the same client connecting directly."""
from __future__ import annotations

import shutil
import ssl
import subprocess

import pymysql
import pytest

try:
    from .mysqlkit import APP_PASSWORD, APP_USER, DB, mysql_config, query, users_toml
    from .test_pg_tls import write_pki
except ImportError:
    from mysqlkit import APP_PASSWORD, APP_USER, DB, mysql_config, query, users_toml
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


def mysql_direct_refusal(mariadb, database: str, password: str = LIMITED_PASSWORD) -> tuple[int, str]:
    """(code, text) the server gives PyMySQL logging in directly as the backend user."""
    with pytest.raises(pymysql.err.OperationalError) as refused:
        pymysql.connect(host=mariadb.host, port=mariadb.port, user=LIMITED_USER, password=password,
                        database=database, connect_timeout=10)
    return refused.value.args[0], refused.value.args[1]


def mysql_proxy(proxy_factory, mariadb, pki, method: str, password: str = LIMITED_PASSWORD):
    auth, options = MYSQL_METHODS[method]
    listener = {"tls_cert_file": pki["cert"], "tls_key_file": pki["key"]}
    config = mysql_config(mariadb, auth=auth, options=options or None, listener=listener, backend_user=LIMITED_USER,
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


def cli_line(code: int, sqlstate: str, text: str) -> str:
    return f"ERROR {code} ({sqlstate}) at line 1: {text}"


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
    # Once a pool has logged in, logins are greeted from its facts: the refusal comes with the first request.
    conn = pymysql.connect(host=proxy.host, port=proxy.port, user=APP_USER, password=APP_PASSWORD, database=DB,
                           connect_timeout=10)
    assert query(conn, "SELECT 1") == [(1,)]
    conn.close()
    for tls_ca in (None, pki["ca"]):
        assert pymysql_through(proxy, SECRET_DB, tls_ca) == denied
        assert pymysql_through(proxy, MISSING_DB, tls_ca) == missing
        assert mariadb_cli_through(proxy, SECRET_DB, tls_ca) == cli_line(1044, "42000", denied[1])
        assert mariadb_cli_through(proxy, MISSING_DB, tls_ca) == cli_line(1049, "42000", missing[1])


def test_mysql_access_denied_to_the_backend_user_is_the_servers_error(mariadb, limited_user, proxy_factory, pki):
    proxy = mysql_proxy(proxy_factory, mariadb, pki, "caching_sha2_fast", password="not-the-password")
    code, text = mysql_direct_refusal(mariadb, DB, password="not-the-password")
    assert code == 1045
    for tls_ca in (None, pki["ca"]):
        assert pymysql_through(proxy, DB, tls_ca) == (code, text)
