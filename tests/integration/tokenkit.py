"""Token-authentication test tools shared by the PostgreSQL, MySQL and TDS token tests: keys, token makers, audit."""
from __future__ import annotations

import json
import time

import boto3
import jwt
from cryptography.hazmat.primitives.asymmetric import rsa

from ..unit.test_token_auth import signed_token  # botocore's signer at a chosen time  # noqa: F401

KEY_ID, SECRET, REGION = "AKIDMULTIPROXYTEST", "multiproxy-test-secret-access-key", "eu-west-1"
ISS, AUD = "https://issuer.test", "multiproxy-db"
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def iam_listener(tmp_path, **extra) -> dict:
    """Listener settings for rds_iam tokens signed with KEY_ID/SECRET in REGION (the keys file is written, 0600)."""
    keys = tmp_path / "iam-keys.toml"
    keys.write_text(f'{KEY_ID} = "{SECRET}"\n')
    keys.chmod(0o600)
    return {"auth": "token", "token_kind": "rds_iam", "iam_access_keys_file": str(keys), "iam_region": REGION, **extra}


def jwt_listener(tmp_path, user_claim: str = "db_user") -> dict:
    """Listener settings for RS256 JWTs signed by RSA_KEY (kid k1), issuer ISS, audience AUD."""
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(RSA_KEY.public_key()))
    jwk["kid"] = "k1"
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps({"keys": [jwk]}))
    return {"auth": "token", "token_kind": "jwt", "jwt_jwks_file": str(jwks), "jwt_issuer": ISS,
            "jwt_audience": AUD, "jwt_user_claim": user_claim}


def boto_token(host: str, port: int, user: str, secret: str = SECRET) -> str:
    """An RDS IAM token as applications make them (boto3's generate_db_auth_token; presigning is local)."""
    client = boto3.client("rds", region_name=REGION, aws_access_key_id=KEY_ID, aws_secret_access_key=secret)
    return client.generate_db_auth_token(host, port, user, Region=REGION)


def make_jwt(user: str, key=RSA_KEY, **claims) -> str:
    body = {"iss": ISS, "aud": AUD, "sub": "someone", "db_user": user, "exp": int(time.time()) + 120, **claims}
    return jwt.encode(body, key, algorithm="RS256", headers={"kid": "k1"})


def other_rsa_key():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def audit(tmp_path) -> list[dict]:
    with open(tmp_path / "audit.jsonl") as f:
        return [json.loads(line) for line in f]


def assert_no_token_in_logs(proxy, tmp_path, tokens):
    logs = (tmp_path / "audit.jsonl").read_text() + open(proxy.log_path).read()
    for token in tokens:
        assert token not in logs
        assert token.rsplit("=", 1)[-1] not in logs      # not even an IAM signature
        assert token.rsplit(".", 1)[-1] not in logs      # nor a JWT signature
