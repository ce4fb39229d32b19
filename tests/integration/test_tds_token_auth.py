"""Token authentication and TLS policy on TDS listeners: pymssql and tsql log in with an RDS IAM token (boto3) or a
JWT as their password inside an encrypted LOGIN7; the cipher list and client certificates apply to the TLS that
runs inside PRELOGIN packets (an OpenSSL client presents the certificate: FreeTDS clients cannot)."""
from __future__ import annotations

import os
import ssl
import subprocess
import time

import boto3
import pytest

from multiproxy.auth import UsersFile
from multiproxy_engines.tds.wire import messages as tp
from multiproxy_engines.tds.wire import token_stream as tk

from .proxy import free_port
from .tdskit import DB, LAB_PASSWORD, LAB_USER, LabProcess, RawClient, pymssql_refusal, tls_login
from .test_pg_tls import write_pki
from .test_tls_policy import write_client_cert
from .tokenkit import (
    REGION, assert_no_token_in_logs, audit, boto_token, iam_listener, jwt_listener, make_jwt, other_rsa_key,
    signed_token,
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
    number, text = pymssql_refusal(server=iam_proxy.host, port=iam_proxy.port, user=USER, password=good,
                                   database=DB, encryption="request")      # pymssql: sends an empty password
    assert number == 18456 and "sent 0 characters" in text and "128" in text, text
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


# ---------------------------------------------------------------------------------------------- FEDAUTH

def td(proxy, pki, token: str, **kw):
    """python-tds logging in with an access token: PRELOGIN FEDAUTHREQUIRED, LOGIN7 with the FEDAUTH feature
    (security token library), no user name or password. TLS (pyOpenSSL) needs the CA; the certificate is for
    localhost, the proxy listens on 127.0.0.1."""
    import pytds
    return pytds.connect(proxy.host, port=proxy.port, database=DB, cafile=pki["ca"], validate_host=False,
                         access_token_callable=lambda: token, autocommit=True, login_timeout=10, timeout=20, **kw)


def td_refused(proxy, pki, token: str, **kw) -> str:
    import pytds
    with pytest.raises(pytds.Error) as info:
        td(proxy, pki, token, **kw)
    return str(info.value)


def rows(conn, sql, params=None):
    with conn.cursor() as cur:
        cur.execute(sql, params)
        return cur.fetchall()


STS_KEY_ID, STS_SECRET, STS_SESSION = "ASIAMULTIPROXYTEST", "sts-secret-access-key", "FwoGZXIvYXdzE" + "Q" * 500


def test_python_tds_access_token_with_rds_iam(lab, pki, proxy_factory, tmp_path):
    """RDS IAM tokens in FEDAUTH, longer than LOGIN7's password holds: one from a static key (about 300 characters)
    and one from STS temporary credentials (about 800, as RDS IAM tokens usually are); the database user is the
    token's DBUser. Full encryption and login-only encryption (enc_login_only)."""
    listener = iam_listener(tmp_path)
    keys = tmp_path / "iam-keys.toml"
    keys.write_text(keys.read_text() + f'[{STS_KEY_ID}]\nsecret_access_key = "{STS_SECRET}"\n'
                    f'session_token = "{STS_SESSION}"\n')
    proxy = start(proxy_factory, lab, pki, tmp_path, listener)
    good = boto_token(proxy.host, proxy.port, USER)
    sts = boto3.client("rds", region_name=REGION, aws_access_key_id=STS_KEY_ID, aws_secret_access_key=STS_SECRET,
                       aws_session_token=STS_SESSION).generate_db_auth_token(proxy.host, proxy.port, USER,
                                                                            Region=REGION)
    assert len(good) > 128 and len(sts) > 800
    with td(proxy, pki, sts) as conn:
        assert rows(conn, "SELECT 6 * 7 AS answer") == [(42,)]
    with td(proxy, pki, good) as conn:
        assert rows(conn, "SELECT 6 * 7 AS answer") == [(42,)]
        with conn.cursor() as cur:
            cur.execute("CREATE TABLE fed_iam (id INT PRIMARY KEY, name NVARCHAR(20))")
            cur.execute("INSERT INTO fed_iam VALUES (%s, %s)", (1, "één"))
            cur.execute("INSERT INTO fed_iam VALUES (%s, %s)", (2, "two"))
        assert rows(conn, "SELECT id, name FROM fed_iam ORDER BY id") == [(1, "één"), (2, "two")]
    with td(proxy, pki, good, enc_login_only=True) as conn:             # TLS for the login packet only
        assert rows(conn, "SELECT COUNT(*) FROM fed_iam") == [(2,)]
    records = audit(tmp_path)
    assert [(e["event"], e["user"], e["engine"]) for e in records] == [("auth_ok", USER, "tds")] * 3
    assert_no_token_in_logs(proxy, tmp_path, [good, sts])


def test_python_tds_access_token_with_jwt(lab, pki, proxy_factory, tmp_path):
    """An RS256 JWT (several hundred characters) in FEDAUTH; the database user is the configured claim's."""
    proxy = start(proxy_factory, lab, pki, tmp_path, jwt_listener(tmp_path))
    token = make_jwt(USER)
    assert len(token) > 128
    with td(proxy, pki, token) as conn:
        assert rows(conn, "SELECT 1 AS a UNION ALL SELECT 2 ORDER BY a") == [(1,), (2,)]
        assert rows(conn, "SELECT %s + 1", (41,)) == [(42,)]
    assert [(e["event"], e["user"]) for e in audit(tmp_path)] == [("auth_ok", USER)]
    for token, reason in ((make_jwt(USER, exp=int(time.time()) - 5), "expired"),
                          (make_jwt(USER, aud="another-service"), "wrong audience"),
                          (make_jwt(USER, key=other_rsa_key()), "bad signature"),
                          (make_jwt(""), "the token names no database user")):
        message = td_refused(proxy, pki, token)
        assert "18456" in message or "Login failed" in message, message
        assert f"token authentication failed: {reason}" in message, message
    rejected = [e for e in audit(tmp_path) if e["event"] == "token_rejected"]
    assert [e["reason"].split(" (")[0] for e in rejected] == [
        "token rejected: expired", "token rejected: wrong audience", "token rejected: bad signature",
        "token rejected: the token names no database user"]
    assert_no_token_in_logs(proxy, tmp_path, [token])


def test_python_tds_access_token_refusals(iam_proxy, pki, tmp_path):
    """Expired, tampered and wrong-endpoint IAM tokens are refused with ERROR 18456 and the reason, which
    python-tds shows in its exception; a login without encryption never gets as far as sending the token."""
    proxy = iam_proxy
    expired = signed_token(user=USER, when=time.time() - 3600, host=proxy.host, port=proxy.port)
    tampered = boto_token(proxy.host, proxy.port, USER).replace(f"DBUser={USER}", "DBUser=sa")
    elsewhere = boto_token("db.elsewhere.test", 1433, USER)
    for token, reason in ((expired, "expired"), (tampered, "bad signature"),
                          (elsewhere, "wrong host: the token was made for another endpoint")):
        message = td_refused(proxy, pki, token)
        assert f"Login failed: token authentication failed: {reason} (FEDAUTH access token)" in message, message
    import pytds
    with pytest.raises(pytds.Error, match="encryption"):              # no cafile: python-tds offers no TLS
        pytds.connect(proxy.host, port=proxy.port, database=DB, access_token_callable=lambda: expired,
                      login_timeout=10)
    assert [e["reason"] for e in audit(tmp_path) if e["event"] == "token_rejected"] == [
        "token rejected: expired", "token rejected: bad signature",
        "token rejected: wrong host: the token was made for another endpoint"]
    assert not any(e["event"] == "auth_ok" for e in audit(tmp_path))
    assert_no_token_in_logs(proxy, tmp_path, [expired, tampered, elsewhere])


def fed_login(token: str, echo: bool = True, nonce: bytes | None = None, user: str = "") -> tp.Login7:
    return tp.Login7(username=user, database=DB, fedauth=tp.FedAuth.security_token(token, echo, nonce))


def test_fedauth_prelogin_nonce_echo_and_libraries(iam_proxy):
    """The PRELOGIN answer carries FEDAUTHREQUIRED = 1 and, for a client NONCEOPT, the proxy's own nonce, which the
    FEDAUTH feature must echo; FEATUREEXTACK returns the client's nonce. A wrong echo bit or nonce, a user name that
    is not the token's, a library other than the security token and a malformed feature are refused."""
    proxy = iam_proxy
    good = boto_token(proxy.host, proxy.port, USER)
    client_nonce = os.urandom(32)
    seen = []

    def echo_nonce(server: tp.Prelogin) -> tp.Login7:
        seen.append(server)
        return fed_login(good, nonce=server.nonce)

    asking = tp.Prelogin.build(encryption=tp.ENCRYPT_ON, fedauth_required=1, nonce=client_nonce)
    toks, _ = tls_login(proxy.port, echo_nonce, client_context(), prelogin=asking)
    assert logged_in(toks), errors(toks)
    assert seen[0].fedauth_required == 1 and len(seen[0].nonce) == 32 and seen[0].nonce != client_nonce
    (ack,) = [t for t in toks if t.type == tk.TOKEN_FEATUREEXTACK]
    assert ack.features == {tp.FEATURE_FEDAUTH: client_nonce}
    assert [t.type for t in toks][-2:] == [tk.TOKEN_FEATUREEXTACK, tk.TOKEN_DONE]

    toks, _ = tls_login(proxy.port, fed_login(good), client_context(),   # no client nonce: an empty acknowledgement
                        prelogin=tp.Prelogin.build(encryption=tp.ENCRYPT_ON, fedauth_required=1))
    assert [t.features for t in toks if t.type == tk.TOKEN_FEATUREEXTACK] == [{tp.FEATURE_FEDAUTH: b""}]
    toks, _ = tls_login(proxy.port, fed_login(good, user=USER), client_context(),
                        prelogin=tp.Prelogin.build(encryption=tp.ENCRYPT_ON, fedauth_required=1))
    assert logged_in(toks), errors(toks)                               # a user name, the token's: accepted

    fed_pre = tp.Prelogin.build(encryption=tp.ENCRYPT_ON, fedauth_required=1)
    cases = [
        (fed_login(good, echo=False), fed_pre, "echo bit does not match"),
        (fed_login(good), None, "echo bit does not match"),            # FEDAUTHREQUIRED never asked, echo set
        (fed_login(good, nonce=bytes(32)), asking, "nonce does not match"),
        (fed_login(good), asking, "nonce does not match"),
        (fed_login(good, nonce=bytes(32)), fed_pre, "nonce the server never sent"),
        (fed_login(good, user="someone_else"), fed_pre, "token authentication failed: user mismatch"),
        (tp.Login7(database=DB, fedauth=tp.FedAuth(tp.FEDAUTH_LIVEID, True, b"tok", bytes(32), bytes(32))),
         fed_pre, "through the Live ID compact token library is not supported"),
        (tp.Login7(database=DB, fedauth=tp.FedAuth(tp.FEDAUTH_ADAL, True, workflow=1)), fed_pre,
         "through the ADAL library is not supported"),
        (tp.Login7(database=DB, features={tp.FEATURE_FEDAUTH: b"\x03\xff\x00\x00\x00ab"}), fed_pre,
         "malformed TDS login: FEDAUTH token of 255 bytes runs past"),
    ]
    for login_, prelogin, expected in cases:
        toks, _ = tls_login(proxy.port, login_, client_context(), prelogin=prelogin)
        found = errors(toks)
        assert len(found) == 1 and expected in found[0][1], (expected, found)
        assert found[0][0] == (4002 if "malformed" in expected else 18456)


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
