"""Token verification without I/O: RDS IAM tokens made by boto3/botocore and JWTs made by PyJWT."""
import json
import time

import boto3
import jwt
import pytest
from hypothesis import given, settings, strategies as st
from botocore.auth import SigV4QueryAuth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from multiproxy.tokens import IamTokenVerifier, JwtVerifier, TokenRejected, build_verifier, load_access_keys

KEY_ID, SECRET = "AKIDMULTIPROXYTEST", "multiproxy-test-secret-access-key"
HOST, PORT, REGION = "db.proxy.test", 6432, "eu-west-1"


def boto_token(user="alice", host=HOST, port=PORT, secret=SECRET):
    client = boto3.client("rds", region_name=REGION, aws_access_key_id=KEY_ID, aws_secret_access_key=secret)
    return client.generate_db_auth_token(host, port, user, Region=REGION)


def signed_token(user="alice", when: float | None = None, expires=900, host=HOST, port=PORT):
    """A token signed by botocore's SigV4 query signer at a chosen time (what generate_db_auth_token does)."""
    request = AWSRequest(method="GET", url=f"https://{host}:{port}/", params={"Action": "connect", "DBUser": user})
    auth = SigV4QueryAuth(Credentials(KEY_ID, SECRET), "rds-db", REGION, expires=expires)
    request.context["timestamp"] = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(time.time() if when is None else when))
    auth._modify_request_before_signing(request)
    signature = auth.signature(auth.string_to_sign(request, auth.canonical_request(request)), request)
    auth._inject_signature_to_request(request, signature)
    return request.prepare().url[len("https://"):]


def iam(**kw):
    return IamTokenVerifier({KEY_ID: SECRET}, REGION, [(HOST, PORT)], **kw)


def rejected(verifier, token, user="alice") -> str:
    with pytest.raises(TokenRejected) as info:
        verifier.verify(token, user)
    return str(info.value)


def test_boto3_token_accepted():
    iam().verify(boto_token(), "alice")


def test_botocore_signed_token_accepted():
    iam().verify(signed_token(), "alice")


def test_expired_token():
    assert rejected(iam(), signed_token(when=time.time() - 3600)) == "expired"


def test_replayed_after_expiry():
    token = signed_token(when=1_800_000_000, expires=60)
    iam(clock=lambda: 1_800_000_030).verify(token, "alice")
    assert rejected(iam(clock=lambda: 1_800_000_061), token) == "expired"


def test_future_token():
    assert "not yet valid" in rejected(iam(), signed_token(when=time.time() + 3600))


def test_tampered_user_breaks_signature():
    token = boto_token().replace("DBUser=alice", "DBUser=admin")
    assert rejected(iam(), token, user="admin") == "bad signature"


def test_tampered_expiry_and_signature():
    assert rejected(iam(), boto_token().replace("X-Amz-Expires=900", "X-Amz-Expires=9000")) == "bad signature"
    token = boto_token()
    flipped = token[:-1] + ("0" if token[-1] != "0" else "1")
    assert rejected(iam(), flipped) == "bad signature"


def test_wrong_secret_and_unknown_key():
    assert rejected(iam(), boto_token(secret="not-the-secret")) == "bad signature"
    assert rejected(IamTokenVerifier({"OTHER": SECRET}, REGION, [(HOST, PORT)]), boto_token()) == "unknown access key"


def test_wrong_user_and_host():
    assert rejected(iam(), boto_token(user="bob")) == "user mismatch"
    assert "wrong host" in rejected(iam(), boto_token(host="elsewhere.test"))
    assert "wrong host" in rejected(iam(), boto_token(port=5432))


def test_wrong_region():
    assert "wrong region" in rejected(IamTokenVerifier({KEY_ID: SECRET}, "us-east-1", [(HOST, PORT)]), boto_token())


@pytest.mark.parametrize("token", ["", "password", "x/?", "h:1/?a=b", "h:1/?Action=connect&Action=connect",
                                   HOST + ":6432/?" + "&".join(f"{k}=1" for k in range(3)), "é" * 20000])
def test_malformed(token):
    assert rejected(iam(), token).startswith("malformed")


def test_access_keys_file(tmp_path):
    path = tmp_path / "keys.toml"
    path.write_text(f'{KEY_ID} = "{SECRET}"\n')
    path.chmod(0o644)
    with pytest.raises(ValueError, match="chmod 600"):
        load_access_keys(str(path))
    path.chmod(0o600)
    assert load_access_keys(str(path)) == {KEY_ID: SECRET}
    js = tmp_path / "keys.json"
    js.write_text(json.dumps({KEY_ID: SECRET}))
    js.chmod(0o600)
    assert load_access_keys(str(js)) == {KEY_ID: SECRET}
    verifier = build_verifier({"token_kind": "rds_iam", "iam_access_keys_file": str(js), "iam_region": REGION,
                               "iam_hostname": HOST}, ("127.0.0.1", PORT))
    verifier.verify(boto_token(), "alice")


# ---- JWT

ISS, AUD = "https://issuer.test", "multiproxy"
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())


def jwks() -> dict:
    keys = []
    for kid, key, alg in (("rsa1", RSA_KEY, jwt.algorithms.RSAAlgorithm), ("ec1", EC_KEY, jwt.algorithms.ECAlgorithm)):
        jwk = json.loads(alg.to_jwk(key.public_key()))
        jwk["kid"] = kid
        keys.append(jwk)
    return {"keys": keys}


def make_jwt(key=RSA_KEY, alg="RS256", kid="rsa1", **claims):
    body = {"iss": ISS, "aud": AUD, "sub": "alice", "exp": int(time.time()) + 300}
    body.update(claims)
    return jwt.encode({k: v for k, v in body.items() if v is not None}, key, algorithm=alg, headers={"kid": kid})


def jwt_verifier(**kw):
    return JwtVerifier(issuer=ISS, audience=AUD, jwks=jwks(), **kw)


def test_jwt_rs256_and_es256_accepted():
    jwt_verifier().verify(make_jwt(), "alice")
    jwt_verifier().verify(make_jwt(EC_KEY, "ES256", "ec1"), "alice")


def test_jwt_rejections():
    v = jwt_verifier()
    assert rejected(v, make_jwt(exp=int(time.time()) - 10)) == "expired"
    assert rejected(v, make_jwt(aud="someone-else")) == "wrong audience"
    assert rejected(v, make_jwt(iss="https://evil.test")) == "wrong issuer"
    assert rejected(v, make_jwt(sub="bob")) == "user mismatch"
    assert "missing claim" in rejected(v, make_jwt(exp=None))
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    assert rejected(v, make_jwt(other)) == "bad signature"
    assert rejected(v, make_jwt(kid="unknown")).startswith("bad signature")
    assert rejected(v, make_jwt(key="x" * 32, alg="HS256")) == "bad signature"
    assert rejected(v, "not.a.jwt") == "malformed token"


def test_jwt_user_claim():
    jwt_verifier(user_claim="db_user").verify(make_jwt(db_user="carol"), "carol")


def test_jwt_shared_key(monkeypatch):
    shared = "k" * 40
    monkeypatch.setenv("MP_TEST_JWT_KEY", shared)
    v = build_verifier({"token_kind": "jwt", "jwt_shared_key_env": "MP_TEST_JWT_KEY", "jwt_issuer": ISS,
                        "jwt_audience": AUD}, ("127.0.0.1", PORT))
    v.verify(make_jwt(shared, "HS256"), "alice")
    assert rejected(v, make_jwt("z" * 40, "HS256")) == "bad signature"
    assert rejected(v, make_jwt()) == "bad signature"   # an RS256 token is not accepted where HS256 is configured
    monkeypatch.setenv("MP_TEST_JWT_KEY", "short")
    with pytest.raises(ValueError, match="shorter than 32"):
        build_verifier({"token_kind": "jwt", "jwt_shared_key_env": "MP_TEST_JWT_KEY", "jwt_issuer": ISS,
                        "jwt_audience": AUD}, ("127.0.0.1", PORT))


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=400), st.builds(lambda tail: boto_token()[:40] + tail, st.text(max_size=200)),
                 st.builds(lambda tail: make_jwt()[:60] + tail, st.text(max_size=200))))
def test_arbitrary_input_is_only_ever_rejected(token):
    """Whatever a client sends as its password, the verifiers answer TokenRejected, never another exception."""
    for verifier in (iam(), jwt_verifier()):
        with pytest.raises(TokenRejected):
            verifier.verify(token, "alice")
