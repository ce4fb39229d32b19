"""Backend credentials: turn a config's password / _env / _file / _command / _secret_arn (AWS) into the secret."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import threading
import time
from typing import Callable, Mapping

__all__ = ["COMMAND_TIMEOUT", "SOURCE_KEYS", "CachedSecret", "SecretError", "resolve_secret"]

SOURCE_KEYS = ("password", "password_env", "password_file", "password_command", "password_secret_arn")
AWS_TIMEOUT = 10.0  # seconds for one Secrets Manager request
COMMAND_TIMEOUT = 10.0  # seconds a password_command may run


class SecretError(Exception):
    """A backend secret could not be obtained; the message names the config key and what to do."""


def resolve_secret(source: Mapping, key_path: str, *, command_timeout: float = COMMAND_TIMEOUT) -> str:
    """Fetch the secret that `source` points to.

    `source` is a config table holding exactly one of the SOURCE_KEYS (other keys are ignored);
    `key_path` is that table's path in the config, used in error messages. Files and command
    output lose their trailing newline / surrounding whitespace. An empty secret is an error.
    """
    present = [k for k in SOURCE_KEYS if k in source]
    if not present:
        raise SecretError(
            "%s: no password source; set one of %s" % (key_path, ", ".join(SOURCE_KEYS))
        )
    if len(present) > 1:
        listed = ", ".join(present[:-1]) + " and " + present[-1]
        raise SecretError("%s: %s are set; keep exactly one password source" % (key_path, listed))
    key = present[0]
    value = source[key]
    where = "%s.%s" % (key_path, key)
    if not isinstance(value, str) or not value:
        raise SecretError("%s: expected a non-empty string" % where)
    if key == "password":
        secret = value
    elif key == "password_env":
        secret = _from_env(value, where)
    elif key == "password_file":
        secret = _from_file(value, where)
    elif key == "password_command":
        secret = _from_command(value, where, command_timeout)
    else:
        secret = _from_secrets_manager(value, where, source.get("aws_region", ""), source.get("aws_endpoint_url", ""))
    if not secret:
        raise SecretError("%s: the secret is empty" % where)
    return secret


def _from_env(name: str, where: str) -> str:
    try:
        return os.environ[name]
    except KeyError:
        raise SecretError("%s: environment variable %s is not set; export it before starting multiproxy" % (where, name)) from None


def _from_file(path: str, where: str) -> str:
    path = os.path.expanduser(path)
    try:
        # Checked before opening because opening a FIFO would block.
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise SecretError("%s: %s is not a regular file; point password_file at a file" % (where, path))
        with open(path, "r", encoding="utf-8") as f:
            # Checked again on the opened file, so the file checked is the file read.
            st = os.fstat(f.fileno())
            if st.st_mode & 0o066:
                raise SecretError(
                    "%s: %s is readable or writable by group or others (mode %03o); run: chmod 600 %s"
                    % (where, path, stat.S_IMODE(st.st_mode), path)
                )
            text = f.read()
    except OSError as e:
        raise SecretError("%s: cannot read %s: %s" % (where, path, e.strerror or e)) from None
    except UnicodeDecodeError:
        raise SecretError("%s: %s is not UTF-8 text" % (where, path)) from None
    return text.rstrip("\r\n")  # the newline an editor adds is not part of the password


def _from_command(command: str, where: str, timeout: float) -> str:
    try:
        result = subprocess.run(
            command,
            shell=True,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        raise SecretError("%s: command did not finish within %g s; check that it cannot prompt or hang" % (where, timeout)) from None
    except OSError as e:
        raise SecretError("%s: cannot run command: %s" % (where, e.strerror or e)) from None
    if result.returncode != 0:
        # stderr helps the operator; stdout is never shown since it may hold the secret.
        detail = result.stderr.decode("utf-8", "replace").strip().splitlines()
        raise SecretError(
            "%s: command exited with status %d%s"
            % (where, result.returncode, (": " + detail[-1][:200]) if detail else "")
        )
    try:
        return result.stdout.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise SecretError("%s: command output is not UTF-8 text" % where) from None


def _from_secrets_manager(arn: str, where: str, region: str, endpoint_url: str) -> str:
    """SecretString of an AWS Secrets Manager secret: its JSON "password" key, or the whole string."""
    import boto3
    import botocore.config
    import botocore.exceptions
    parts = arn.split(":")
    if not region and len(parts) > 3 and parts[0] == "arn" and parts[2] == "secretsmanager":
        region = parts[3]          # arn:aws:secretsmanager:REGION:ACCOUNT:secret:NAME
    config = botocore.config.Config(connect_timeout=AWS_TIMEOUT, read_timeout=AWS_TIMEOUT,
                                     retries={"max_attempts": 2, "mode": "standard"})
    try:
        client = boto3.session.Session().client("secretsmanager", region_name=region or None,
                                                endpoint_url=endpoint_url or None, config=config)
        response = client.get_secret_value(SecretId=arn)
    except botocore.exceptions.ClientError as e:
        error = e.response.get("Error", {})
        raise SecretError("%s: Secrets Manager refused %s: %s (%s)"
                          % (where, arn, error.get("Code", "error"), error.get("Message", "")[:200])) from None
    except botocore.exceptions.NoCredentialsError:
        raise SecretError("%s: no AWS credentials for Secrets Manager; give the proxy an IAM role or the "
                          "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY environment" % where) from None
    except botocore.exceptions.NoRegionError:
        raise SecretError("%s: no AWS region; set aws_region next to password_secret_arn" % where) from None
    except (botocore.exceptions.BotoCoreError, ValueError) as e:
        raise SecretError("%s: cannot reach Secrets Manager: %s" % (where, e)) from None
    text = response.get("SecretString")
    if not isinstance(text, str):
        raise SecretError("%s: secret %s has no SecretString (binary secrets are not supported)" % (where, arn))
    if text.lstrip().startswith("{"):
        try:
            document = json.loads(text)
        except ValueError:
            raise SecretError("%s: secret %s looks like JSON but does not parse" % (where, arn)) from None
        password = document.get("password") if isinstance(document, dict) else None
        if not isinstance(password, str):
            raise SecretError('%s: secret %s is JSON without a string "password" key' % (where, arn))
        return password
    return text


class CachedSecret:
    """A resolved secret kept for `ttl` seconds; call `invalidate()` after the backend rejects it.

    `ttl=None` keeps it until invalidated. Thread/greenlet safe: one fetch at a time.
    """

    def __init__(
        self,
        source: Mapping,
        key_path: str,
        ttl: float | None = 300.0,
        *,
        clock: Callable[[], float] = time.monotonic,
        resolver: Callable[[Mapping, str], str] = resolve_secret,
    ):
        self.source = dict(source)
        self.key_path = key_path
        self.ttl = ttl
        self._clock = clock
        self._resolver = resolver
        self._lock = threading.Lock()
        self._value: str | None = None
        self._fetched_at = 0.0

    def get(self) -> str:
        with self._lock:
            now = self._clock()
            if self._value is None or (self.ttl is not None and now - self._fetched_at >= self.ttl):
                self._value = self._resolver(self.source, self.key_path)
                self._fetched_at = now
            return self._value

    def invalidate(self) -> None:
        """Forget the secret so the next `get()` fetches it again (e.g. after a rotated password)."""
        with self._lock:
            self._value = None

    def __repr__(self) -> str:
        return "CachedSecret(%r, ttl=%r)" % (self.key_path, self.ttl)  # never the secret itself
