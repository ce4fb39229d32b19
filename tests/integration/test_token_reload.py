"""Rotating token keys under a running proxy: psycopg over TLS presents RDS IAM tokens (boto3, static and STS
temporary credentials) and JWTs while the access-keys file and the JWKS change, are reloaded on SIGHUP (in every
forked worker) or noticed by their mtime, and break; the proxy process never restarts."""
from __future__ import annotations

import json
import os
import signal
import time

import boto3
import botocore.session
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from .test_token_auth import AUD, ISS, REGION, USER, base_config, connect, refused

pytestmark = pytest.mark.timeout(90)

OLD_KEY, OLD_SECRET = "AKIDROTATEOLD", "rotate-old-secret-access-key"
NEW_KEY, NEW_SECRET = "AKIDROTATENEW", "rotate-new-secret-access-key"
STS_KEY, STS_SECRET, SESSION = "ASIAROTATESTS", "rotate-sts-secret-access-key", "FwoGZXIvYXdzEXAMPLE+/=" + "t" * 400


def iam_token(proxy, key_id, secret, session_token=None):
    """boto3's generate_db_auth_token; with a session token these are temporary (STS) credentials."""
    session = botocore.session.Session()
    session.set_credentials(key_id, secret, session_token)
    host, port = proxy.address("pg")
    client = boto3.Session(botocore_session=session).client("rds", region_name=REGION)
    return client.generate_db_auth_token(host, port, USER, Region=REGION)


def write_atomically(path, text: str, mode=0o600):
    tmp = path.with_name(path.name + ".new")
    tmp.write_text(text)
    tmp.chmod(mode)
    os.rename(tmp, path)


def wait_for_log(proxy, text: str, count: int = 1, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while proxy.log_text().count(text) < count:
        assert time.monotonic() < deadline, f"{text!r} not logged {count} times; log tail:\n{proxy.log_tail()}"
        time.sleep(0.05)


def logs_in(proxy, token) -> bool:
    with connect(proxy, token) as conn:
        return conn.execute("SELECT current_user").fetchone() == (USER,)


def test_iam_keys_rotate_on_sighup_in_every_worker(pg, proxy_factory, tmp_path):
    keys = tmp_path / "iam-keys.toml"
    write_atomically(keys, f'{OLD_KEY} = "{OLD_SECRET}"\n')
    config = base_config(pg, tmp_path, {"token_kind": "rds_iam", "iam_access_keys_file": str(keys),
                                        "iam_region": REGION, "token_keys_check_interval": 0})
    config["proxy"]["workers"] = 2
    proxy = proxy_factory(config)
    pid = proxy.pid
    old = iam_token(proxy, OLD_KEY, OLD_SECRET)
    assert logs_in(proxy, old)

    write_atomically(keys, f'{NEW_KEY} = "{NEW_SECRET}"\n\n[{STS_KEY}]\nsecret_access_key = "{STS_SECRET}"\n'
                           f'session_token = "{SESSION}"\n')
    assert logs_in(proxy, old)                  # check interval 0: nothing changes before the signal
    proxy.send_signal(signal.SIGHUP)
    wait_for_log(proxy, "token keys reloaded (reload requested): 2 access keys", count=2)   # both workers
    new, sts = iam_token(proxy, NEW_KEY, NEW_SECRET), iam_token(proxy, STS_KEY, STS_SECRET, SESSION)
    # SO_REUSEPORT spreads connections over the workers: several of each reach both.
    for _ in range(4):
        assert "unknown access key" in refused(proxy, old)
        assert logs_in(proxy, new)
        assert logs_in(proxy, sts)
    assert "wrong security token" in refused(proxy, iam_token(proxy, STS_KEY, STS_SECRET, "an-expired-session"))
    assert "security token missing" in refused(proxy, iam_token(proxy, STS_KEY, STS_SECRET))

    keys.write_text("this is = = not toml")     # a broken file on reload: the keys in use stay
    proxy.send_signal(signal.SIGHUP)
    wait_for_log(proxy, f"previous keys stay in use: iam_access_keys_file {keys}: not valid TOML", count=2)
    write_atomically(keys, f'{OLD_KEY} = "{OLD_SECRET}"\n', mode=0o644)   # readable by others: refused too
    proxy.send_signal(signal.SIGHUP)
    wait_for_log(proxy, f"chmod 600 {keys}", count=2)
    for _ in range(4):
        assert logs_in(proxy, new)
        assert "unknown access key" in refused(proxy, old)
    assert proxy.running and proxy.pid == pid
    assert "Traceback" not in proxy.log_text()


def test_iam_keys_file_change_is_noticed_without_a_signal(pg, proxy_factory, tmp_path):
    keys = tmp_path / "iam-keys.json"
    write_atomically(keys, json.dumps({OLD_KEY: OLD_SECRET}))
    proxy = proxy_factory(base_config(pg, tmp_path, {"token_kind": "rds_iam", "iam_access_keys_file": str(keys),
                                                     "iam_region": REGION, "token_keys_check_interval": 0.3}))
    pid = proxy.pid
    old, new = iam_token(proxy, OLD_KEY, OLD_SECRET), iam_token(proxy, NEW_KEY, NEW_SECRET)
    assert logs_in(proxy, old)
    assert "unknown access key" in refused(proxy, new)

    write_atomically(keys, json.dumps({NEW_KEY: NEW_SECRET}))
    time.sleep(0.4)                             # one check interval; the next login looks at the file
    assert "unknown access key" in refused(proxy, old)
    assert logs_in(proxy, new)
    wait_for_log(proxy, f"token keys reloaded ({keys} changed): 1 access keys")

    keys.write_text('{"AKIDBROKEN": ')          # written in place and cut short
    time.sleep(0.4)
    assert logs_in(proxy, new)
    wait_for_log(proxy, f"previous keys stay in use: iam_access_keys_file {keys}: not valid JSON")
    assert proxy.running and proxy.pid == pid


def test_jwks_rotation(pg, proxy_factory, tmp_path):
    first, second = (rsa.generate_private_key(public_exponent=65537, key_size=2048) for _ in range(2))

    def jwks(*pairs) -> str:
        keys = []
        for kid, key in pairs:
            jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
            keys.append({**jwk, "kid": kid})
        return json.dumps({"keys": keys})

    def token(key, kid):
        body = {"iss": ISS, "aud": AUD, "sub": USER, "exp": int(time.time()) + 120}
        return jwt.encode(body, key, algorithm="RS256", headers={"kid": kid})

    path = tmp_path / "jwks.json"
    path.write_text(jwks(("k1", first)))
    proxy = proxy_factory(base_config(pg, tmp_path, {"token_kind": "jwt", "jwt_jwks_file": str(path),
                                                     "jwt_issuer": ISS, "jwt_audience": AUD,
                                                     "token_keys_check_interval": 0.3}))
    pid = proxy.pid
    assert logs_in(proxy, token(first, "k1"))
    assert "unknown key id" in refused(proxy, token(second, "k2"))

    path.write_text(jwks(("k1", first), ("k2", second)))     # the issuer publishes its next key: noticed by mtime
    time.sleep(0.4)
    assert logs_in(proxy, token(second, "k2"))
    assert logs_in(proxy, token(first, "k1"))

    path.write_text(jwks(("k2", second)))                     # and retires the old one: SIGHUP
    proxy.send_signal(signal.SIGHUP)
    wait_for_log(proxy, "token keys reloaded (reload requested): 1 JWKS keys")
    assert "unknown key id" in refused(proxy, token(first, "k1"))
    assert logs_in(proxy, token(second, "k2"))

    path.write_text('{"keys": [{"kty": "RSA"}]}')             # unusable: logins go on with k2
    proxy.send_signal(signal.SIGHUP)
    wait_for_log(proxy, f"previous keys stay in use: jwt_jwks_file: {path}: not a usable JWKS")
    assert logs_in(proxy, token(second, "k2"))
    assert proxy.running and proxy.pid == pid
