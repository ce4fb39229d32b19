"""Backend passwords from AWS Secrets Manager: moto's server on loopback stands in for AWS (no real AWS call; the
`moto_endpoint` fixture of conftest.py); the proxy resolves password_secret_arn with boto3, caches it and fetches it
again after the backend refuses it."""
from __future__ import annotations

import json
import time

import pg8000.native
import pytest

from .awskit import AWS_ENV, REGION, secrets_client
from .proxy import free_port

USER, DB, PASSWORD = "mp_scram", "mpdb", "scram-pw"   # a backend role that logs in with SCRAM

pytestmark = pytest.mark.timeout(90)


def proxy_config(pg, tmp_path, arn, endpoint, **cred) -> dict:
    return {
        "proxy": {"admin_listen": f"127.0.0.1:{free_port()}", "audit_log": str(tmp_path / "audit.jsonl")},
        "clusters": {"main": {"engine": "postgres", "hosts": [f"127.0.0.1:{pg.port}"], "backend": {"tls": "disable"},
                              "pool": {"max_size": 2},
                              "credentials": [{"user": USER, "password_secret_arn": arn, "aws_endpoint_url": endpoint,
                                               **cred}]}},
        "listeners": [{"name": "pg", "listen": f"127.0.0.1:{free_port()}", "cluster": "main", "auth": "trust"}],
    }


def connect(proxy):
    host, port = proxy.address("pg")
    return pg8000.native.Connection(USER, host=host, port=port, database=DB, timeout=15)


def test_json_secret_logs_in(pg, proxy_factory, tmp_path, moto_endpoint):
    arn = secrets_client(moto_endpoint).create_secret(
        Name=f"mp/json-{time.time_ns()}", SecretString=json.dumps({"username": USER, "password": PASSWORD}))["ARN"]
    proxy = proxy_factory(proxy_config(pg, tmp_path, arn, moto_endpoint), env=AWS_ENV)
    conn = connect(proxy)
    assert conn.run("SELECT current_user") == [[USER]]
    conn.close()
    logs = open(proxy.log_path).read() + (tmp_path / "audit.jsonl").read_text()
    assert PASSWORD not in logs


def test_plain_secret_is_fetched_again_after_the_backend_refuses_it(pg, proxy_factory, tmp_path, moto_endpoint):
    client = secrets_client(moto_endpoint)
    arn = client.create_secret(Name=f"mp/plain-{time.time_ns()}", SecretString="an-old-password")["ARN"]
    proxy = proxy_factory(proxy_config(pg, tmp_path, arn, moto_endpoint, aws_region=REGION), env=AWS_ENV)
    with pytest.raises(pg8000.native.DatabaseError) as info:
        connect(proxy)                                  # the backend refuses the stale password
    assert "password authentication failed" in info.value.args[0]["M"]
    client.put_secret_value(SecretId=arn, SecretString=PASSWORD)    # rotated: well within the 5-minute cache
    conn = connect(proxy)
    assert conn.run("SELECT 1") == [[1]]
    conn.close()
    logs = open(proxy.log_path).read()
    assert PASSWORD not in logs and "an-old-password" not in logs


def test_missing_secret_is_reported_without_aws(pg, proxy_factory, tmp_path, moto_endpoint):
    arn = f"arn:aws:secretsmanager:{REGION}:123456789012:secret:mp/absent-AbCdEf"
    proxy = proxy_factory(proxy_config(pg, tmp_path, arn, moto_endpoint), env=AWS_ENV)
    with pytest.raises(pg8000.native.DatabaseError):
        connect(proxy)
    assert "ResourceNotFoundException" in open(proxy.log_path).read()
