"""TLS on both legs of the MySQL proxy: mariadb CLI and PyMySQL over TLS to the proxy, require_tls, caching_sha2
full authentication inside TLS, and backend TLS (require, verify-full with the right and a wrong CA)."""
from __future__ import annotations

import shutil
import ssl
import subprocess

import pymysql
import pytest

try:
    from .mysqlkit import APP_PASSWORD, APP_USER, DB, connect, mysql_config, query, users_toml
    from .test_pg_tls import write_pki
except ImportError:
    from mysqlkit import APP_PASSWORD, APP_USER, DB, connect, mysql_config, query, users_toml
    from test_pg_tls import write_pki

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("mysql-pki"))
    return {"proxy": write_pki(directory, "proxy"), "backend": write_pki(directory, "backend"),
            "other": write_pki(directory, "other")}


def tls_proxy(proxy_factory, mariadb, pki, require_tls=False, **kwargs):
    listener = {"tls_cert_file": pki["proxy"]["cert"], "tls_key_file": pki["proxy"]["key"], "require_tls": require_tls}
    return proxy_factory(mysql_config(mariadb, listener=listener, **kwargs), files={"users.toml": users_toml()})


def cli(proxy, sql: str, *extra: str, password: str = APP_PASSWORD) -> subprocess.CompletedProcess:
    argv = [shutil.which("mariadb") or "mariadb", "--no-defaults", "-h", proxy.host, "-P", str(proxy.port),
            "-u", APP_USER, f"-p{password}", *extra, DB]
    return subprocess.run(argv, input=sql, capture_output=True, text=True, timeout=60)


# ------------------------------------------------------------------------------------------------ client leg

def test_mariadb_cli_over_tls(mariadb, proxy_factory, pki):
    proxy = tls_proxy(proxy_factory, mariadb, pki, require_tls=True)
    out = cli(proxy, "SELECT 40+2;\n\\s\n", "--ssl", f"--ssl-ca={pki['proxy']['ca']}", "--ssl-verify-server-cert")
    assert out.returncode == 0, out.stderr + proxy.log_tail()
    assert "42" in out.stdout
    ssl_line = [line for line in out.stdout.splitlines() if line.startswith("SSL:")]
    assert ssl_line and "Cipher in use is" in ssl_line[0], out.stdout


@pytest.mark.parametrize("auth", ["mysql_native_password", "caching_sha2_password"])
def test_pymysql_over_tls(mariadb, proxy_factory, pki, auth):
    proxy = tls_proxy(proxy_factory, mariadb, pki, require_tls=True, auth=auth)
    ctx = ssl.create_default_context(cafile=pki["proxy"]["ca"])
    conn = connect(proxy, ssl=ctx)
    try:
        assert isinstance(conn._sock, ssl.SSLSocket)
        assert conn._sock.version() in ("TLSv1.2", "TLSv1.3")
        assert query(conn, "SELECT 1") == [(1,)]
        # the backend leg is another connection, plaintext here (backend tls = disable)
        assert query(conn, "SHOW STATUS LIKE 'Ssl_cipher'") == [("Ssl_cipher", "")]
    finally:
        conn.close()


def test_require_tls_refuses_plaintext(mariadb, proxy_factory, pki):
    proxy = tls_proxy(proxy_factory, mariadb, pki, require_tls=True)
    with pytest.raises(pymysql.err.OperationalError) as info:
        connect(proxy, ssl_disabled=True)       # PyMySQL 2 would otherwise prefer TLS on its own
    code, message = info.value.args
    assert code == 3159, info.value
    assert "requires TLS" in message
    out = cli(proxy, "SELECT 1;\n", "--ssl=0")
    assert out.returncode != 0 and "3159" in out.stderr and "requires TLS" in out.stderr, out.stderr


def test_tls_optional_allows_plaintext(mariadb, proxy_factory, pki):
    proxy = tls_proxy(proxy_factory, mariadb, pki, require_tls=False)
    conn = connect(proxy, ssl_disabled=True)
    try:
        assert not isinstance(conn._sock, ssl.SSLSocket)
        assert query(conn, "SELECT 1") == [(1,)]
    finally:
        conn.close()


@pytest.mark.parametrize("client", ["pymysql", "cli"])
def test_caching_sha2_full_authentication_over_tls(mariadb, proxy_factory, pki, client):
    """caching_sha2_fast_auth = false: the proxy always asks for the cleartext password, which TLS protects."""
    proxy = tls_proxy(proxy_factory, mariadb, pki, require_tls=True, auth="caching_sha2_password",
                      options={"caching_sha2_fast_auth": "false"})
    if client == "pymysql":
        conn = connect(proxy, ssl=ssl.create_default_context(cafile=pki["proxy"]["ca"]))
        try:
            assert isinstance(conn._sock, ssl.SSLSocket)
            assert query(conn, "SELECT CURRENT_USER() IS NOT NULL") == [(1,)]
        finally:
            conn.close()
        with pytest.raises(pymysql.err.OperationalError) as info:
            connect(proxy, password="wrong", ssl=ssl.create_default_context(cafile=pki["proxy"]["ca"]))
        assert info.value.args[0] == 1045
    else:
        out = cli(proxy, "SELECT 7*6;\n", "--ssl", f"--ssl-ca={pki['proxy']['ca']}",
                  "--default-auth=caching_sha2_password")
        if out.returncode != 0 and "caching_sha2_password" in out.stderr and "plugin" in out.stderr.lower():
            pytest.skip(f"this mariadb client has no caching_sha2_password plugin: {out.stderr.strip()}")
        assert out.returncode == 0, out.stderr + proxy.log_tail()
        assert "42" in out.stdout


# ------------------------------------------------------------------------------------------------ backend leg

@pytest.fixture(scope="module")
def tls_mariadb(pki):
    """A private MariaDB with ssl_cert/ssl_key from the backend CA, database mpdb and the native backend user."""
    from multiproxy.lab.mariadb import MariaDBServer
    server = MariaDBServer(tls={"cert": pki["backend"]["cert"], "key": pki["backend"]["key"]}).start()
    try:
        server.sql(f"CREATE DATABASE {DB}; CREATE USER 'mp_native'@'%' IDENTIFIED BY 'native-pw';"
                   "GRANT ALL ON *.* TO 'mp_native'@'%';")
        yield server
    finally:
        server.stop()


def backend_tls_proxy(proxy_factory, server, backend: dict):
    config = mysql_config(server)
    config["clusters"]["main"]["backend"] = {"connect_timeout": 5.0, **backend}
    return proxy_factory(config, files={"users.toml": users_toml()})


def test_backend_tls_require(tls_mariadb, proxy_factory):
    proxy = backend_tls_proxy(proxy_factory, tls_mariadb, {"tls": "require"})
    conn = connect(proxy, ssl_disabled=True)
    try:
        (name, cipher), = query(conn, "SHOW STATUS LIKE 'Ssl_cipher'")
        assert cipher, "the backend leg is not encrypted"
        assert query(conn, "SHOW STATUS LIKE 'Ssl_version'")[0][1].startswith("TLSv1")
    finally:
        conn.close()


def test_backend_tls_verify_full_with_the_right_ca(tls_mariadb, proxy_factory, pki):
    proxy = backend_tls_proxy(proxy_factory, tls_mariadb, {"tls": "verify-full", "tls_ca_file": pki["backend"]["ca"]})
    conn = connect(proxy, ssl_disabled=True)
    try:
        assert query(conn, "SHOW STATUS LIKE 'Ssl_cipher'")[0][1]
    finally:
        conn.close()


def test_backend_tls_verify_full_with_a_wrong_ca_fails_clearly(tls_mariadb, proxy_factory, pki):
    proxy = backend_tls_proxy(proxy_factory, tls_mariadb, {"tls": "verify-full", "tls_ca_file": pki["other"]["ca"]})
    with pytest.raises(pymysql.err.OperationalError) as info:
        conn = connect(proxy, ssl_disabled=True)
        query(conn, "SELECT 1")
    code, message = info.value.args
    assert code == 2003, info.value
    assert "certificate" in message.lower(), message


def test_backend_tls_require_refuses_a_plaintext_backend(mariadb, proxy_factory):
    proxy = backend_tls_proxy(proxy_factory, mariadb, {"tls": "require"})
    with pytest.raises(pymysql.err.OperationalError) as info:
        conn = connect(proxy, ssl_disabled=True)
        query(conn, "SELECT 1")
    assert info.value.args[0] == 2003, info.value
    assert "tls" in info.value.args[1].lower() or "ssl" in info.value.args[1].lower(), info.value
