"""Token authentication through the proxy: psycopg over TLS presents RDS IAM tokens (boto3) or JWTs (PyJWT) as its
password; the proxy verifies them and logs in to the private PostgreSQL with the cluster's credentials."""
from __future__ import annotations

import json
import ssl
import time

import boto3
import jwt
import pg8000.native
import psycopg
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from multiproxy.config import ConfigError, build_config

from .proxy import free_port
from .test_pg_tls import write_pki
from .tokenkit import assert_no_token_in_logs, audit
from ..unit.test_token_auth import signed_token as _signed_token  # botocore's signer at a chosen time

USER, DB = "mp_scram", "mpdb"          # the backend authenticates this role with SCRAM: the proxy uses its password
KEY_ID, SECRET, REGION = "AKIDMULTIPROXYTEST", "multiproxy-test-secret-access-key", "eu-west-1"
ISS, AUD = "https://issuer.test", "multiproxy-db"
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)

pytestmark = pytest.mark.timeout(90)


def base_config(pg, tmp_path, listener: dict) -> dict:
    pki = write_pki(str(tmp_path), "tok")
    listener = {"name": "pg", "listen": f"127.0.0.1:{free_port()}", "cluster": "main", "auth": "token",
                "tls_cert_file": pki["cert"], "tls_key_file": pki["key"], **listener}
    return {
        "proxy": {"admin_listen": f"127.0.0.1:{free_port()}", "audit_log": str(tmp_path / "audit.jsonl"),
                  "auth_failure_delay": 0.0, "auth_failure_block_after": 0},
        "clusters": {"main": {"engine": "postgres", "hosts": [f"127.0.0.1:{pg.port}"], "backend": {"tls": "disable"},
                              "pool": {"max_size": 2},
                              "credentials": [{"user": USER, "password": "scram-pw"}]}},
        "listeners": [listener],
    }


def connect(proxy, token: str, sslmode="require", user=USER):
    host, port = proxy.address("pg")
    return psycopg.connect(host=host, port=port, user=user, dbname=DB, password=token, sslmode=sslmode,
                           connect_timeout=10)


def refused(proxy, token: str, user=USER) -> str:
    with pytest.raises(psycopg.OperationalError) as info:
        connect(proxy, token, user=user)
    return str(info.value)


# ---------------------------------------------------------------------------------------------- RDS IAM

@pytest.fixture
def iam_proxy(pg, proxy_factory, tmp_path):
    keys = tmp_path / "iam-keys.toml"
    keys.write_text(f'{KEY_ID} = "{SECRET}"\n')
    keys.chmod(0o600)
    return proxy_factory(base_config(pg, tmp_path, {"token_kind": "rds_iam", "iam_access_keys_file": str(keys),
                                                    "iam_region": REGION, "iam_hostname": "db.proxy.test"}))


def boto_token(proxy, host=None, user=USER, secret=SECRET):
    listen_host, port = proxy.address("pg")
    client = boto3.client("rds", region_name=REGION, aws_access_key_id=KEY_ID, aws_secret_access_key=secret)
    return client.generate_db_auth_token(host or listen_host, port, user, Region=REGION)


def test_iam_token_logs_in_and_rejections_are_explained(iam_proxy, tmp_path):
    proxy = iam_proxy
    good = boto_token(proxy)
    with connect(proxy, good) as conn:
        assert conn.info.pgconn.ssl_in_use
        assert conn.execute("SELECT current_user").fetchone() == (USER,)
    with connect(proxy, boto_token(proxy, host="db.proxy.test")) as conn:      # the iam_hostname is accepted too
        assert conn.execute("SELECT 1").fetchone() == (1,)
    host, port = proxy.address("pg")
    expired = _signed_token(user=USER, when=time.time() - 3600, host=host, port=port)
    tampered = good.replace(f"DBUser={USER}", "DBUser=mp_md5")
    wrong_user = boto_token(proxy, user="mp_md5")
    wrong_secret = boto_token(proxy, secret="another-secret")
    tls = ssl.create_default_context()
    tls.check_hostname, tls.verify_mode = False, ssl.CERT_NONE
    with pytest.raises(pg8000.native.DatabaseError) as info:     # pg8000 shows the SQLSTATE of a failed login
        pg8000.native.Connection(USER, host=host, port=port, database=DB, password=expired, ssl_context=tls, timeout=10)
    assert info.value.args[0]["C"] == "28P01"
    message = refused(proxy, expired)
    assert 'token authentication failed for user "mp_scram": expired' in message
    assert "bad signature" in refused(proxy, tampered, user="mp_md5")
    assert "user mismatch" in refused(proxy, wrong_user)
    assert "bad signature" in refused(proxy, wrong_secret)
    assert "malformed" in refused(proxy, "scram-pw")                        # a password is not a token
    reasons = [e["reason"] for e in audit(tmp_path) if e["event"] == "token_rejected"]
    assert reasons == ["token rejected: expired"] * 2 + ["token rejected: bad signature", "token rejected: user mismatch",
                       "token rejected: bad signature", "token rejected: malformed token: not an RDS IAM token"]
    assert [e["user"] for e in audit(tmp_path) if e["event"] == "auth_ok"] == [USER, USER]
    assert_no_token_in_logs(proxy, tmp_path, [good, expired, tampered, wrong_user, wrong_secret])


def test_iam_token_replayed_after_expiry(iam_proxy, tmp_path):
    host, port = iam_proxy.address("pg")
    token = _signed_token(user=USER, expires=2, host=host, port=port)
    with connect(iam_proxy, token) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    time.sleep(3.1)
    assert "expired" in refused(iam_proxy, token)


def test_token_needs_tls_from_the_client(iam_proxy, tmp_path):
    with pytest.raises(psycopg.OperationalError) as info:
        connect(iam_proxy, boto_token(iam_proxy), sslmode="disable")
    assert "only accepted over TLS" in str(info.value)
    assert not any(e["event"] == "auth_ok" for e in audit(tmp_path))


def test_token_listener_without_tls_is_a_config_error(pg, tmp_path):
    config = base_config(pg, tmp_path, {"token_kind": "jwt", "jwt_shared_key_env": "HOME", "jwt_issuer": ISS,
                                        "jwt_audience": AUD})
    del config["listeners"][0]["tls_cert_file"], config["listeners"][0]["tls_key_file"]
    with pytest.raises(ConfigError) as info:
        build_config(config)
    assert "'token' needs TLS on the client leg" in str(info.value)


# ---------------------------------------------------------------------------------------------- JWT

@pytest.fixture
def jwt_proxy(pg, proxy_factory, tmp_path):
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(RSA_KEY.public_key()))
    jwk["kid"] = "k1"
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps({"keys": [jwk]}))
    return proxy_factory(base_config(pg, tmp_path, {"token_kind": "jwt", "jwt_jwks_file": str(jwks),
                                                    "jwt_issuer": ISS, "jwt_audience": AUD, "jwt_user_claim": "db_user"}))


def make_jwt(key=RSA_KEY, **claims):
    body = {"iss": ISS, "aud": AUD, "sub": "someone", "db_user": USER, "exp": int(time.time()) + 120, **claims}
    return jwt.encode(body, key, algorithm="RS256", headers={"kid": "k1"})


def test_jwt_logs_in_and_rejections_are_explained(jwt_proxy, tmp_path):
    good = make_jwt()
    with connect(jwt_proxy, good) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (USER,)
    expired = make_jwt(exp=int(time.time()) - 5)
    audience = make_jwt(aud="another-service")
    forged = make_jwt(rsa.generate_private_key(public_exponent=65537, key_size=2048))
    other_user = make_jwt(db_user="mp_md5")
    assert "expired" in refused(jwt_proxy, expired)
    assert "wrong audience" in refused(jwt_proxy, audience)
    assert "bad signature" in refused(jwt_proxy, forged)
    assert "user mismatch" in refused(jwt_proxy, other_user)
    reasons = [e["reason"] for e in audit(tmp_path) if e["event"] == "token_rejected"]
    assert reasons == ["token rejected: " + r for r in ("expired", "wrong audience", "bad signature", "user mismatch")]
    assert_no_token_in_logs(jwt_proxy, tmp_path, [good, expired, audience, forged, other_user])
