"""Token authentication and TLS policy on TDS listeners: pymssql and tsql log in with an RDS IAM token (boto3) or a
JWT as their password inside an encrypted LOGIN7; the cipher list and client certificates apply to the TLS that
runs inside PRELOGIN packets (an OpenSSL client presents the certificate: FreeTDS clients cannot)."""
from __future__ import annotations

import os
import ssl
import subprocess
import time

import pytest

from multiproxy.auth import UsersFile
from multiproxy.tds import protocol as tp
from multiproxy.tds import tokens as tk

from .proxy import free_port
from .tdskit import DB, LAB_PASSWORD, LAB_USER, LabProcess, RawClient, tls_login
from .test_pg_tls import write_pki
from .test_tls_policy import write_client_cert
from .tokenkit import (
    assert_no_token_in_logs, audit, boto_token, iam_listener, jwt_listener, make_jwt, other_rsa_key, signed_token,
)

pymssql = pytest.importorskip("pymssql")

pytestmark = [pytest.mark.tds, pytest.mark.timeout(90)]
APP_USER, APP_PASSWORD = "app", "app-pw"
USER = "iam_app"          # the token's user; the cluster's credentials (user "*") log in to the lab server as sa


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    server = LabProcess(tmp_path_factory.mktemp("tdstok"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return write_pki(str(tmp_path_factory.mktemp("tds-pki")), "tdstok")


def start(proxy_factory, lab, pki, tmp_path, listener: dict):
    config = {
        "proxy": {"admin_listen": f"127.0.0.1:{free_port()}", "audit_log": str(tmp_path / "audit.jsonl"),
                  "auth_failure_delay": 0.0, "auth_failure_block_after": 0},
        "clusters": {"main": {"engine": "tds", "hosts": [f"127.0.0.1:{lab.port}"], "backend": {"tls": "disable"},
                              "pool": {"max_size": 3},
                              "credentials": [{"user": "*", "backend_user": LAB_USER, "password": LAB_PASSWORD}]}},
        "listeners": [{"name": "tds", "listen": f"127.0.0.1:{free_port()}", "cluster": "main",
                       "tls_cert_file": pki["cert"], "tls_key_file": pki["key"], **listener}],
    }
    if listener.get("auth") != "token":          # password listeners, for the TLS policy tests with FreeTDS
        config["auth"] = {"users_file": "users.toml"}
        users = UsersFile()
        users.add(APP_USER, APP_PASSWORD, kinds=["tds_sha256"])
        return proxy_factory(config, files={"users.toml": users.dumps()})
    return proxy_factory(config)


def ms(proxy, token: str, encryption: str = "request", user: str = USER):
    return pymssql.connect(server=proxy.host, port=proxy.port, user=user, password=token, database=DB,
                           tds_version="7.4", encryption=encryption, login_timeout=10)


def refused(proxy, token: str, **kwargs) -> str:
    with pytest.raises(pymssql.OperationalError) as info:
        ms(proxy, token, **kwargs)
    return str(info.value)


def one(conn, sql):
    cur = conn.cursor()
    cur.execute(sql)
    return cur.fetchall()


def tsql(proxy, token: str, script: str = "select 6 * 7 as answer\ngo\nexit\n", user: str = USER) -> str:
    out = subprocess.run(["tsql", "-H", proxy.host, "-p", str(proxy.port), "-U", user, "-P", token, "-D", DB],
                         input=script, capture_output=True, text=True, timeout=30, env=dict(os.environ, TDSVER="7.4"))
    return out.stdout + out.stderr


def errors(toks):
    return [(t.number, t.text) for t in toks if t.type == tk.TOKEN_ERROR]


@pytest.fixture
def iam_proxy(lab, pki, proxy_factory, tmp_path):
    return start(proxy_factory, lab, pki, tmp_path, iam_listener(tmp_path))


def login(token: str, user: str = USER) -> tp.Login7:
    return tp.Login7(username=user, password=token, database=DB)


def logged_in(toks) -> bool:
    return any(t.type == tk.TOKEN_LOGINACK for t in toks)


def test_iam_token_in_an_encrypted_login7_and_rejections(iam_proxy, tmp_path):
    """An OpenSSL client inside PRELOGIN (as FreeTDS does it) sends LOGIN7 with the whole token as its password."""
    proxy = iam_proxy
    good = boto_token(proxy.host, proxy.port, USER)
    for encryption in (tp.ENCRYPT_ON, tp.ENCRYPT_OFF):      # full encryption, and the login packet only
        toks, _ = tls_login(proxy.port, login(good), client_context(), encryption)
        assert logged_in(toks), errors(toks)
    expired = signed_token(user=USER, when=time.time() - 3600, host=proxy.host, port=proxy.port)
    tampered = good.replace(f"DBUser={USER}", "DBUser=someone_else")
    wrong_user = boto_token(proxy.host, proxy.port, "someone_else")
    for token, user, reason in ((expired, USER, "expired"), (tampered, "someone_else", "bad signature"),
                                (wrong_user, USER, "user mismatch")):
        toks, _ = tls_login(proxy.port, login(token, user), client_context())
        ((number, text),) = errors(toks)
        assert number == 18456
        assert text == f"multiproxy: Login failed for user '{user}': token authentication failed: {reason}"
    reasons = [e["reason"] for e in audit(tmp_path) if e["event"] == "token_rejected"]
    assert reasons == ["token rejected: " + r for r in ("expired", "bad signature", "user mismatch")]
    assert [e["user"] for e in audit(tmp_path) if e["event"] == "auth_ok"] == [USER] * 2
    assert {e["engine"] for e in audit(tmp_path)} == {"tds"}
    assert_no_token_in_logs(proxy, tmp_path, [good, expired, tampered, wrong_user])


def test_freetds_clients_cannot_carry_a_token_and_are_told_why(iam_proxy):
    """tsql and pymssql cut LOGIN7 passwords at 128 characters (pymssql sends none beyond); RDS IAM tokens are
    longer, so the refusal says so instead of only 'malformed token'."""
    good = boto_token(iam_proxy.host, iam_proxy.port, USER)
    assert len(good) > 128
    message = refused(iam_proxy, good)                                  # pymssql: an empty password
    assert "18456" in message and "sent 0 characters" in message and "128" in message, message
    out = tsql(iam_proxy, good)                                         # tsql: the first 128 characters
    assert "18456" in out and "sent 128 characters" in out, out


def test_unencrypted_login_is_refused_before_the_token_is_sent(iam_proxy, tmp_path):
    c = RawClient(iam_proxy.port, login=False)
    c.send(tp.PRELOGIN, tp.Prelogin.build(encryption=tp.ENCRYPT_NOT_SUP).encode())
    data = b""
    while chunk := c.sock.recv(65536):
        data += chunk
    c.close()
    reply, refusal = tp.MessageReader().feed(data)
    assert tp.Prelogin.decode(reply.data).encryption == tp.ENCRYPT_REQ
    ((number, text),) = errors(tk.TokenReader().read(refusal.data))
    assert number == 18456 and "only accepted in an encrypted login" in text
    with pytest.raises(pymssql.OperationalError):                      # FreeTDS with encryption off
        ms(iam_proxy, "x" * 100, encryption="off")
    assert not any(e["event"] in ("auth_ok", "token_rejected") for e in audit(tmp_path))


def test_jwt_in_an_encrypted_login7(lab, pki, proxy_factory, tmp_path):
    proxy = start(proxy_factory, lab, pki, tmp_path, jwt_listener(tmp_path))
    toks, _ = tls_login(proxy.port, login(make_jwt(USER)), client_context())
    assert logged_in(toks), errors(toks)
    for token, reason in ((make_jwt(USER, exp=int(time.time()) - 5), "expired"),
                          (make_jwt(USER, key=other_rsa_key()), "bad signature"),
                          (make_jwt("someone_else"), "user mismatch")):
        toks, _ = tls_login(proxy.port, login(token), client_context())
        assert errors(toks)[0][1].endswith(f"token authentication failed: {reason}")
    assert [e["reason"] for e in audit(tmp_path) if e["event"] == "token_rejected"] == [
        "token rejected: expired", "token rejected: bad signature", "token rejected: user mismatch"]


# ---------------------------------------------------------------------------------------------- TLS policy

def client_context(**kw) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    for key, value in kw.items():
        if key == "ciphers":
            ctx.set_ciphers(value)
        elif key == "cert":
            ctx.load_cert_chain(*value)
    return ctx


def test_cipher_list_applies_inside_prelogin(lab, pki, proxy_factory, tmp_path):
    cipher = "ECDHE-ECDSA-CHACHA20-POLY1305"
    proxy = start(proxy_factory, lab, pki, tmp_path, {"tls_ciphers": cipher})
    app = tp.Login7(username=APP_USER, password=APP_PASSWORD, database=DB)
    toks, tls = tls_login(proxy.port, app, client_context())
    assert logged_in(toks), errors(toks)
    assert tls.version() == "TLSv1.2" and tls.cipher()[0] == cipher
    with pytest.raises((ssl.SSLError, ConnectionError)):          # a client offering only other ciphers
        tls_login(proxy.port, app, client_context(ciphers="ECDHE+AESGCM"))
    for encryption in ("request", "require"):                      # pymssql's FreeTDS (OpenSSL) agrees
        with ms(proxy, APP_PASSWORD, encryption, user=APP_USER) as conn:
            assert one(conn, "SELECT 3") == [(3,)]
    assert "\n42\n" in tsql(proxy, APP_PASSWORD, user=APP_USER)  # and tsql (GnuTLS)
    assert "no shared cipher" in open(proxy.log_path).read().lower()


def test_client_certificates_inside_prelogin(lab, pki, proxy_factory, tmp_path):
    trusted = write_client_cert(str(tmp_path), "trusted", APP_USER)
    stranger = write_client_cert(str(tmp_path), "stranger", APP_USER)
    proxy = start(proxy_factory, lab, pki, tmp_path, {"tls_client_ca_file": trusted["ca"], "tls_verify_client": True})
    app = tp.Login7(username=APP_USER, password=APP_PASSWORD, database=DB)
    for encryption in (tp.ENCRYPT_ON, tp.ENCRYPT_OFF):
        toks, _ = tls_login(proxy.port, app, client_context(cert=(trusted["cert"], trusted["key"])), encryption)
        assert logged_in(toks), errors(toks)
    for ctx in (client_context(cert=(stranger["cert"], stranger["key"])), client_context()):
        with pytest.raises((ssl.SSLError, ConnectionError)):
            tls_login(proxy.port, app, ctx)
    with pytest.raises(pymssql.OperationalError):                  # FreeTDS cannot present a certificate
        ms(proxy, APP_PASSWORD, user=APP_USER)
    out = tsql(proxy, APP_PASSWORD, user=APP_USER)
    assert "\n42\n" not in out
    log = open(proxy.log_path).read()
    assert log.count("TLS handshake failed") >= 4 and "CERTIFICATE" in log.upper(), log[-2000:]
    assert [e["event"] for e in audit(tmp_path)] == ["auth_ok", "auth_ok"]
