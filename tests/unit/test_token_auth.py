"""Token verification without I/O: RDS IAM tokens made by boto3/botocore and JWTs made by PyJWT."""
import json
import time
from urllib.parse import quote

import boto3
import botocore.session
import jwt
import pytest
from hypothesis import given, settings, strategies as st
from botocore.auth import SigV4QueryAuth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from multiproxy.token_auth import (AccessKey, IamTokenVerifier, JwtVerifier, ReloadingVerifier, TokenRejected,
                               build_verifier, load_access_keys)

KEY_ID, SECRET = "AKIDMULTIPROXYTEST", "multiproxy-test-secret-access-key"
HOST, PORT, REGION = "db.proxy.test", 6432, "eu-west-1"


def boto_token(user="alice", host=HOST, port=PORT, secret=SECRET):
    client = boto3.client("rds", region_name=REGION, aws_access_key_id=KEY_ID, aws_secret_access_key=secret)
    return client.generate_db_auth_token(host, port, user, Region=REGION)


def signed_token(user="alice", when: float | None = None, expires=900, host=HOST, port=PORT, key_id=KEY_ID,
                 secret=SECRET, session_token=None):
    """A token signed by botocore's SigV4 query signer at a chosen time (what generate_db_auth_token does)."""
    request = AWSRequest(method="GET", url=f"https://{host}:{port}/", params={"Action": "connect", "DBUser": user})
    auth = SigV4QueryAuth(Credentials(key_id, secret, session_token), "rds-db", REGION, expires=expires)
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
    assert load_access_keys(str(path)) == {KEY_ID: AccessKey(SECRET)}
    js = tmp_path / "keys.json"
    js.write_text(json.dumps({KEY_ID: SECRET}))
    js.chmod(0o600)
    assert load_access_keys(str(js)) == {KEY_ID: AccessKey(SECRET)}
    verifier = build_verifier({"token_kind": "rds_iam", "iam_access_keys_file": str(js), "iam_region": REGION},
                              [("127.0.0.1", PORT), (HOST, PORT)])
    verifier.verify(boto_token(), "alice")


# ---- STS temporary credentials (X-Amz-Security-Token)

STS_KEY_ID, STS_SECRET = "ASIAMULTIPROXYTEST", "multiproxy-temporary-secret-key"
SESSION_TOKEN = "IQoJb3JpZ2luX2VjEXAMPLE+session/token=" + "x" * 600   # real ones are long and carry + / =


def sts_boto_token(user="alice", session_token=SESSION_TOKEN, host=HOST, port=PORT):
    """boto3's generate_db_auth_token with static temporary credentials (presigning is local: no AWS call)."""
    session = botocore.session.Session()
    session.set_credentials(STS_KEY_ID, STS_SECRET, session_token)
    client = boto3.Session(botocore_session=session).client("rds", region_name=REGION)
    return client.generate_db_auth_token(host, port, user, Region=REGION)


def sts_iam(session_token=SESSION_TOKEN, **kw):
    return IamTokenVerifier({STS_KEY_ID: AccessKey(STS_SECRET, session_token), KEY_ID: SECRET}, REGION,
                            [(HOST, PORT)], **kw)


def test_sts_token_accepted():
    token = sts_boto_token()
    assert "X-Amz-Security-Token=" in token
    sts_iam().verify(token, "alice")
    sts_iam().verify(boto_token(), "alice")       # a static key next to it still works


def test_sts_wrong_or_missing_session_token():
    assert rejected(sts_iam(), sts_boto_token(session_token="another-session-token")) == "wrong security token"
    # Signed with the right secret but without a session token: a temporary key needs it.
    no_token = signed_token(key_id=STS_KEY_ID, secret=STS_SECRET)
    assert rejected(sts_iam(), no_token) == "security token missing: the access key is temporary credentials"
    # A session token for a key configured as a static one.
    assert rejected(sts_iam(session_token=None), sts_boto_token()) == \
        "security token given, but the access key is configured without a session token"


def test_sts_expired():
    token = signed_token(when=time.time() - 3600, key_id=STS_KEY_ID, secret=STS_SECRET, session_token=SESSION_TOKEN)
    sts_iam(clock=lambda: time.time() - 3500).verify(token, "alice")
    assert rejected(sts_iam(), token) == "expired"


def test_sts_tampered_security_token_breaks_signature():
    """The signature covers X-Amz-Security-Token: swapping in the configured one or dropping it fails."""
    token = sts_boto_token(session_token="stolen-elsewhere")
    start = token.index("X-Amz-Security-Token=") + len("X-Amz-Security-Token=")
    end = token.index("&", start) if "&" in token[start:] else len(token)
    swapped = token[:start] + quote(SESSION_TOKEN, safe="") + token[end:]
    assert rejected(sts_iam(), swapped) == "bad signature"
    dropped = token[:start - len("X-Amz-Security-Token=")] + token[end + 1:]
    assert "X-Amz-Security-Token" not in dropped
    assert rejected(sts_iam(), dropped) == "bad signature"
    assert rejected(sts_iam(), sts_boto_token().replace("DBUser=alice", "DBUser=admin"), "admin") == "bad signature"


def test_access_keys_file_with_session_tokens(tmp_path):
    path = tmp_path / "keys.toml"
    path.write_text(f'{KEY_ID} = "{SECRET}"\n\n[{STS_KEY_ID}]\nsecret_access_key = "{STS_SECRET}"\n'
                    f'session_token = "{SESSION_TOKEN}"\n')
    path.chmod(0o600)
    expected = {KEY_ID: AccessKey(SECRET), STS_KEY_ID: AccessKey(STS_SECRET, SESSION_TOKEN)}
    assert load_access_keys(str(path)) == expected
    js = tmp_path / "keys.json"
    js.write_text(json.dumps({KEY_ID: SECRET, STS_KEY_ID: {"secret_access_key": STS_SECRET,
                                                           "session_token": SESSION_TOKEN}}))
    js.chmod(0o600)
    assert load_access_keys(str(js)) == expected
    verifier = build_verifier({"token_kind": "rds_iam", "iam_access_keys_file": str(js), "iam_region": REGION},
                              [(HOST, PORT)])
    verifier.verify(sts_boto_token(), "alice")
    for body, problem in (({STS_KEY_ID: {"secret": STS_SECRET}}, "unknown key 'secret'"),
                          ({STS_KEY_ID: {"session_token": SESSION_TOKEN}}, "secret_access_key missing"),
                          ({STS_KEY_ID: {"secret_access_key": STS_SECRET, "session_token": ""}}, "session_token must"),
                          ({STS_KEY_ID: 42}, "expected \"secret access key\" or a table")):
        js.write_text(json.dumps(body))
        with pytest.raises(ValueError, match=problem) as info:
            load_access_keys(str(js))
        assert f"iam_access_keys_file {js}: {STS_KEY_ID}" in str(info.value)


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
                        "jwt_audience": AUD}, [("127.0.0.1", PORT)])
    v.verify(make_jwt(shared, "HS256"), "alice")
    assert rejected(v, make_jwt("z" * 40, "HS256")) == "bad signature"
    assert rejected(v, make_jwt()) == "bad signature"   # an RS256 token is not accepted where HS256 is configured
    monkeypatch.setenv("MP_TEST_JWT_KEY", "short")
    with pytest.raises(ValueError, match="shorter than 32"):
        build_verifier({"token_kind": "jwt", "jwt_shared_key_env": "MP_TEST_JWT_KEY", "jwt_issuer": ISS,
                        "jwt_audience": AUD}, [("127.0.0.1", PORT)])


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=400), st.builds(lambda tail: boto_token()[:40] + tail, st.text(max_size=200)),
                 st.builds(lambda tail: make_jwt()[:60] + tail, st.text(max_size=200))))
def test_arbitrary_input_is_only_ever_rejected(token):
    """Whatever a client sends as its password, the verifiers answer TokenRejected, never another exception."""
    for verifier in (iam(), jwt_verifier()):
        with pytest.raises(TokenRejected):
            verifier.verify(token, "alice")


# ---- reloading keys (SIGHUP calls reload(); logins look at the file's mtime/size every check_interval)

class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def write_keys(path, keys: dict, mode=0o600):
    """Write a new file and rename it over the old one, as a rotation should."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(f'{k} = "{v}"\n' for k, v in keys.items()))
    tmp.chmod(mode)
    tmp.rename(path)


def reloading_iam(path, clock, interval=5.0):
    return ReloadingVerifier({"name": "pg", "token_kind": "rds_iam", "iam_access_keys_file": str(path),
                              "iam_region": REGION}, [(HOST, PORT)], interval, clock)


def test_changed_access_keys_file_is_noticed_after_the_interval(tmp_path):
    path, clock = tmp_path / "keys.toml", Clock()
    write_keys(path, {KEY_ID: SECRET})
    v = reloading_iam(path, clock)
    old_token = boto_token()
    v.verify(old_token, "alice")
    write_keys(path, {"AKIDNEWKEY": "new-secret"})
    clock.now += 4.9
    v.verify(old_token, "alice")                # not looked at yet: no stat per login
    clock.now += 0.2
    assert rejected(v, old_token) == "unknown access key"
    client = boto3.client("rds", region_name=REGION, aws_access_key_id="AKIDNEWKEY", aws_secret_access_key="new-secret")
    v.verify(client.generate_db_auth_token(HOST, PORT, "alice", Region=REGION), "alice")


def test_reload_and_zero_interval(tmp_path):
    path, clock = tmp_path / "keys.toml", Clock()
    write_keys(path, {KEY_ID: SECRET})
    v = reloading_iam(path, clock, interval=0)
    write_keys(path, {"AKIDNEWKEY": "new-secret"})
    clock.now += 3600
    v.verify(boto_token(), "alice")            # interval 0: only reload() looks at the file
    assert v.reload() is True
    assert rejected(v, boto_token()) == "unknown access key"


@pytest.mark.parametrize("breakage, problem", [
    ("garbage", "not valid TOML"),
    ("mode", "chmod 600"),
    ("missing", "cannot read"),
    ("empty", "expected a table"),
])
def test_failed_reload_keeps_the_old_keys(tmp_path, caplog, breakage, problem):
    path, clock = tmp_path / "keys.toml", Clock()
    write_keys(path, {KEY_ID: SECRET})
    v = reloading_iam(path, clock, interval=1)
    if breakage == "garbage":
        path.write_text("this is = = not toml")
    elif breakage == "mode":
        write_keys(path, {"AKIDNEWKEY": "new-secret"}, mode=0o644)
    elif breakage == "missing":
        path.unlink()
    else:
        path.write_text("")
    clock.now += 1
    with caplog.at_level("ERROR", logger="multiproxy.token_auth"):
        v.verify(boto_token(), "alice")         # the change is noticed, the reload fails, the old key still works
        assert v.reload() is False
        v.verify(boto_token(), "alice")
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 2
    assert all(str(path) in e and problem in e and "previous keys stay in use" in e for e in errors)
    clock.now += 1
    caplog.clear()
    v.verify(boto_token(), "alice")             # unchanged since: not reported again
    assert not caplog.records
    write_keys(path, {"AKIDNEWKEY": "new-secret"})   # repaired: picked up
    clock.now += 1
    assert rejected(v, boto_token()) == "unknown access key"


def test_sts_session_token_rotation(tmp_path):
    path, clock = tmp_path / "keys.json", Clock()
    path.write_text(json.dumps({STS_KEY_ID: {"secret_access_key": STS_SECRET, "session_token": SESSION_TOKEN}}))
    path.chmod(0o600)
    v = reloading_iam(path, clock)
    v.verify(sts_boto_token(), "alice")
    path.write_text(json.dumps({STS_KEY_ID: {"secret_access_key": STS_SECRET, "session_token": "renewed-token"}}))
    assert v.reload()
    assert rejected(v, sts_boto_token()) == "wrong security token"
    v.verify(sts_boto_token(session_token="renewed-token"), "alice")


def test_jwks_rotation(tmp_path, caplog):
    path, clock = tmp_path / "jwks.json", Clock()
    path.write_text(json.dumps({"keys": [jwks()["keys"][0]]}))          # rsa1 only
    v = ReloadingVerifier({"name": "pg", "token_kind": "jwt", "jwt_jwks_file": str(path), "jwt_issuer": ISS,
                           "jwt_audience": AUD}, [(HOST, PORT)], 2.0, clock)
    v.verify(make_jwt(), "alice")
    assert rejected(v, make_jwt(EC_KEY, "ES256", "ec1")).startswith("bad signature")
    path.write_text(json.dumps({"keys": [jwks()["keys"][1]]}))          # rotated to ec1
    clock.now += 2
    v.verify(make_jwt(EC_KEY, "ES256", "ec1"), "alice")
    assert rejected(v, make_jwt()) == "bad signature: unknown key id"
    path.write_text('{"keys": [')
    with caplog.at_level("ERROR", logger="multiproxy.token_auth"):
        assert v.reload() is False
    assert f"jwt_jwks_file: {path} is not JSON" in caplog.text
    path.write_text('{"keys": []}')
    assert v.reload() is False
    assert f"jwt_jwks_file: {path}: not a usable JWKS" in caplog.text
    v.verify(make_jwt(EC_KEY, "ES256", "ec1"), "alice")


def test_shared_key_reload_reads_the_environment_again(monkeypatch):
    monkeypatch.setenv("MP_TEST_JWT_KEY", "k" * 40)
    v = ReloadingVerifier({"name": "pg", "token_kind": "jwt", "jwt_shared_key_env": "MP_TEST_JWT_KEY",
                           "jwt_issuer": ISS, "jwt_audience": AUD}, [(HOST, PORT)])
    v.verify(make_jwt("k" * 40, "HS256"), "alice")
    monkeypatch.setenv("MP_TEST_JWT_KEY", "n" * 40)
    assert v.reload()
    assert rejected(v, make_jwt("k" * 40, "HS256")) == "bad signature"
    v.verify(make_jwt("n" * 40, "HS256"), "alice")
    monkeypatch.setenv("MP_TEST_JWT_KEY", "short")
    assert v.reload() is False
    v.verify(make_jwt("n" * 40, "HS256"), "alice")


# ---- the user a token names (TDS FEDAUTH logins carry no user name: the token's is taken)

def test_verify_returns_the_user_the_token_names(tmp_path):
    assert iam().verify(boto_token("alice"), "alice") == "alice"
    assert iam().verify(boto_token("bob")) == "bob"                  # no user given: DBUser
    assert iam().verify(signed_token("carol"), None) == "carol"
    assert rejected(iam(), signed_token(when=time.time() - 3600), None) == "expired"   # still checked in full
    assert rejected(iam(), boto_token("bob").replace("DBUser=bob", "DBUser=eve"), None) == "bad signature"
    assert "names no database user (DBUser" in rejected(iam(), boto_token(""), None)
    assert rejected(iam(), boto_token("bob"), "alice") == "user mismatch"

    assert jwt_verifier().verify(make_jwt(sub="dave")) == "dave"
    assert jwt_verifier(user_claim="db_user").verify(make_jwt(db_user="erin")) == "erin"
    assert jwt_verifier(user_claim="db_user").verify(make_jwt(db_user=42), "42") == "42"
    assert "claim 'db_user' is missing" in rejected(jwt_verifier(user_claim="db_user"), make_jwt(), None)
    assert "names no database user" in rejected(jwt_verifier(), make_jwt(sub=""), None)
    assert rejected(jwt_verifier(), make_jwt(aud="someone-else", sub="dave"), None) == "wrong audience"

    path = tmp_path / "keys.toml"
    write_keys(path, {KEY_ID: SECRET})
    v = reloading_iam(path, Clock())
    assert v.verify(boto_token("frank")) == "frank"
    assert v.verify(boto_token("frank"), "frank") == "frank"
