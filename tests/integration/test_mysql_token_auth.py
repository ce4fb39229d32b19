"""Token authentication on a MySQL listener, as RDS IAM authentication for MySQL works: PyMySQL, the mariadb CLI and
MariaDB Connector/Python connect over TLS with an RDS IAM token (boto3) or a JWT as their password, sent with
mysql_clear_password; the proxy logs in to the private MariaDB with the cluster's credentials."""
from __future__ import annotations

import shutil
import ssl
import subprocess
import time

import pymysql
import pytest

from .mysqlkit import BACKEND_USER, DB, mysql_config, query
from .proxy import free_port
from .test_pg_tls import write_pki
from .tokenkit import (
    assert_no_token_in_logs, audit, boto_token, iam_listener, jwt_listener, make_jwt, other_rsa_key, signed_token,
)

USER = "iam_app"          # the token's user; the cluster's credentials (user "*") log in to MariaDB as mp_native

pytestmark = pytest.mark.timeout(90)


def token_proxy(proxy_factory, mariadb, tmp_path, listener: dict, **proxy_settings):
    pki = write_pki(str(tmp_path), "mytok")
    settings = {"audit_log": str(tmp_path / "audit.jsonl"), "auth_failure_delay": 0.0, "auth_failure_block_after": 0,
                **proxy_settings}
    config = mysql_config(mariadb, auth="token", proxy=settings,
                          listener={"tls_cert_file": pki["cert"], "tls_key_file": pki["key"], **listener})
    del config["auth"]                     # token listeners need no users file
    proxy = proxy_factory(config)
    proxy.ca = pki["ca"]
    return proxy


def tls(proxy) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=proxy.ca)


def connect(proxy, token: str, user: str = USER, **kwargs):
    kwargs.setdefault("ssl", tls(proxy))
    return pymysql.connect(host=proxy.host, port=proxy.port, user=user, password=token, database=DB,
                           autocommit=True, connect_timeout=10, read_timeout=30, **kwargs)


def refused(proxy, token: str, user: str = USER, **kwargs) -> tuple[int, str]:
    with pytest.raises(pymysql.err.OperationalError) as info:
        connect(proxy, token, user, **kwargs)
    return info.value.args


def cli(proxy, token: str, sql: str, *extra: str) -> subprocess.CompletedProcess:
    argv = [shutil.which("mariadb") or "mariadb", "--no-defaults", "-h", proxy.host, "-P", str(proxy.port),
            "-u", USER, f"-p{token}", "--ssl", f"--ssl-ca={proxy.ca}", "--enable-cleartext-plugin", *extra, DB]
    return subprocess.run(argv, input=sql, capture_output=True, text=True, timeout=30)


@pytest.fixture
def iam_proxy(mariadb, proxy_factory, tmp_path):
    return token_proxy(proxy_factory, mariadb, tmp_path, iam_listener(tmp_path, iam_hostname="db.proxy.test"))


def test_iam_token_with_pymysql_and_rejections_are_explained(iam_proxy, tmp_path):
    proxy = iam_proxy
    good = boto_token(proxy.host, proxy.port, USER)
    conn = connect(proxy, good)
    try:
        assert isinstance(conn._sock, ssl.SSLSocket)
        assert query(conn, "SELECT 40 + 2") == [(42,)]
        assert query(conn, "SELECT SUBSTRING_INDEX(CURRENT_USER(), '@', 1)") == [(BACKEND_USER,)]
    finally:
        conn.close()
    conn = connect(proxy, boto_token("db.proxy.test", proxy.port, USER))      # the iam_hostname is accepted too
    conn.close()
    expired = signed_token(user=USER, when=time.time() - 3600, host=proxy.host, port=proxy.port)
    tampered = good.replace(f"DBUser={USER}", "DBUser=someone_else")
    wrong_user = boto_token(proxy.host, proxy.port, "someone_else")
    wrong_secret = boto_token(proxy.host, proxy.port, USER, secret="another-secret")
    code, message = refused(proxy, expired)
    assert code == 1045
    assert message == f"Access denied for user '{USER}'@'127.0.0.1' (token authentication failed: expired)"
    assert "bad signature" in refused(proxy, tampered, user="someone_else")[1]
    assert "user mismatch" in refused(proxy, wrong_user)[1]
    assert "bad signature" in refused(proxy, wrong_secret)[1]
    assert "malformed token" in refused(proxy, "native-pw")[1]                # a password is not a token
    reasons = [e["reason"] for e in audit(tmp_path) if e["event"] == "token_rejected"]
    assert reasons == ["token rejected: " + r for r in (
        "expired", "bad signature", "user mismatch", "bad signature", "malformed token: not an RDS IAM token")]
    assert [e["user"] for e in audit(tmp_path) if e["event"] == "auth_ok"] == [USER, USER]
    assert {e["engine"] for e in audit(tmp_path)} == {"mysql"}
    assert_no_token_in_logs(proxy, tmp_path, [good, expired, tampered, wrong_user, wrong_secret])


def test_sqlstate_of_a_rejected_token_is_28000(iam_proxy):
    """The SQLSTATE is in the ERR packet; PyMySQL drops it, so read the packet after a raw TLS handshake."""
    from multiproxy_engines.mysql import protocol as p
    import socket
    sock = socket.create_connection((iam_proxy.host, iam_proxy.port), timeout=10)
    greeting = sock.recv(65536)
    assert p.parse_handshake_v10(greeting[4:])["capabilities"] & p.CLIENT_SSL
    caps = (p.CLIENT_PROTOCOL_41 | p.CLIENT_SECURE_CONNECTION | p.CLIENT_PLUGIN_AUTH | p.CLIENT_SSL
            | p.CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA)
    sock.sendall(p.packet(1, p.ssl_request(caps, 45)))
    ctx = tls(iam_proxy)
    ctx.check_hostname = False
    tsock = ctx.wrap_socket(sock)
    tsock.sendall(p.packet(2, p.handshake_response(caps, 45, USER.encode(), b"not-a-token\x00", b"",
                                                   b"mysql_clear_password")))
    data = b""
    while chunk := tsock.recv(65536):
        data += chunk
    assert p.parse_err(data[4:]) == (1045, "28000", f"Access denied for user '{USER}'@'127.0.0.1' "
                                     "(token authentication failed: malformed token: not an RDS IAM token)")
    tsock.close()


def test_plaintext_client_is_refused_and_told_why(iam_proxy, tmp_path):
    code, message = refused(iam_proxy, boto_token(iam_proxy.host, iam_proxy.port, USER), ssl_disabled=True)
    assert code == 3159
    assert "only accepted over TLS" in message and "--ssl" in message
    out = subprocess.run([shutil.which("mariadb") or "mariadb", "--no-defaults", "-h", iam_proxy.host, "-P",
                          str(iam_proxy.port), "-u", USER, "-px", "--ssl=0", DB], input="SELECT 1;\n",
                         capture_output=True, text=True, timeout=30)
    assert out.returncode != 0 and "3159" in out.stderr and "only accepted over TLS" in out.stderr, out.stderr
    assert not any(e["event"] in ("auth_ok", "token_rejected") for e in audit(tmp_path))


def test_failed_tokens_count_toward_the_address_block(mariadb, proxy_factory, tmp_path):
    proxy = token_proxy(proxy_factory, mariadb, tmp_path, iam_listener(tmp_path), auth_failure_block_after=2,
                        auth_failure_block_seconds=30.0)
    bad = boto_token(proxy.host, proxy.port, "someone_else")
    for _ in range(2):
        assert refused(proxy, bad)[0] == 1045
    code, message = refused(proxy, boto_token(proxy.host, proxy.port, USER))   # a good token is turned away too
    assert "blocked" in message, message


def test_mariadb_cli_with_an_iam_token(iam_proxy, tmp_path):
    token = boto_token(iam_proxy.host, iam_proxy.port, USER)
    out = cli(iam_proxy, token, "SELECT 6 * 7 AS answer;\n")
    assert out.returncode == 0, out.stderr + iam_proxy.log_tail()
    assert "42" in out.stdout
    expired = signed_token(user=USER, when=time.time() - 3600, host=iam_proxy.host, port=iam_proxy.port)
    out = cli(iam_proxy, expired, "SELECT 1;\n")
    assert out.returncode != 0
    assert "ERROR 1045 (28000)" in out.stderr and "token authentication failed: expired" in out.stderr, out.stderr


def test_mariadb_connector_python_with_an_iam_token(iam_proxy):
    mariadb_connector = pytest.importorskip("mariadb")
    token = boto_token(iam_proxy.host, iam_proxy.port, USER)
    conn = mariadb_connector.connect(host=iam_proxy.host, port=iam_proxy.port, user=USER, password=token,
                                     database=DB, ssl_ca=iam_proxy.ca, ssl_verify_cert=True, connect_timeout=10)
    try:
        cur = conn.cursor()
        cur.execute("SELECT 2 + 3")
        assert cur.fetchall() == [(5,)]
    finally:
        conn.close()
    with pytest.raises(mariadb_connector.OperationalError) as info:
        mariadb_connector.connect(host=iam_proxy.host, port=iam_proxy.port, user=USER, password=token + "x",
                                  database=DB, ssl_ca=iam_proxy.ca, connect_timeout=10)
    assert "bad signature" in str(info.value)


def test_jwt_with_pymysql_and_rejections(mariadb, proxy_factory, tmp_path):
    proxy = token_proxy(proxy_factory, mariadb, tmp_path, jwt_listener(tmp_path))
    good = make_jwt(USER)
    conn = connect(proxy, good)
    try:
        assert query(conn, "SELECT 1") == [(1,)]
    finally:
        conn.close()
    expired = make_jwt(USER, exp=int(time.time()) - 5)
    forged = make_jwt(USER, key=other_rsa_key())
    other_user = make_jwt("someone_else")
    audience = make_jwt(USER, aud="another-service")
    for token, reason in ((expired, "expired"), (forged, "bad signature"), (other_user, "user mismatch"),
                          (audience, "wrong audience")):
        code, message = refused(proxy, token)
        assert code == 1045 and message.endswith(f"(token authentication failed: {reason})"), message
    reasons = [e["reason"] for e in audit(tmp_path) if e["event"] == "token_rejected"]
    assert reasons == ["token rejected: " + r for r in ("expired", "bad signature", "user mismatch", "wrong audience")]
    assert_no_token_in_logs(proxy, tmp_path, [good, expired, forged, other_user, audience])
