"""AWS test tools: moto's server on loopback stands in for AWS Secrets Manager (no real AWS call is made)."""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time

from .proxy import free_port

# Fake keys and no metadata service or shared config, for the tests and for the proxy processes they start.
AWS_ENV = {"AWS_ACCESS_KEY_ID": "moto-testing", "AWS_SECRET_ACCESS_KEY": "moto-testing",
           "AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull}
REGION = "eu-west-1"


@contextlib.contextmanager
def moto_server(log_path, start_timeout: float = 20.0):
    """`python -m moto.server` on a free loopback port; yields its endpoint URL and stops it on exit."""
    port = free_port()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, **AWS_ENV})
        try:
            deadline = time.monotonic() + start_timeout
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    if time.monotonic() > deadline or proc.poll() is not None:
                        raise RuntimeError(f"moto server did not start; see {log_path}")
                    time.sleep(0.1)
            yield f"http://127.0.0.1:{port}"
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def secrets_client(endpoint: str):
    """A boto3 Secrets Manager client of the moto server at `endpoint`."""
    import boto3
    return boto3.client("secretsmanager", region_name=REGION, endpoint_url=endpoint,
                        aws_access_key_id=AWS_ENV["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=AWS_ENV["AWS_SECRET_ACCESS_KEY"])
