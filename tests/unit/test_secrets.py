"""Tests for backend credential sources: literal, environment, file (with permission checks), command, cache."""
import os

import pytest

from multiproxy.secrets import CachedSecret, SecretError, resolve_secret

KEY = "clusters.orders.backend"


def secret_file(tmp_path, text, mode=0o600):
    path = tmp_path / "pw"
    path.write_text(text)
    os.chmod(path, mode)
    return str(path)


def test_literal_password():
    assert resolve_secret({"password": "pw", "user": "app"}, KEY) == "pw"


def test_env(monkeypatch):
    monkeypatch.setenv("MP_TEST_PW", "from-env")
    assert resolve_secret({"password_env": "MP_TEST_PW"}, KEY) == "from-env"


def test_env_missing(monkeypatch):
    monkeypatch.delenv("MP_TEST_PW", raising=False)
    with pytest.raises(SecretError) as info:
        resolve_secret({"password_env": "MP_TEST_PW"}, KEY)
    assert str(info.value) == (
        "clusters.orders.backend.password_env: environment variable MP_TEST_PW is not set; "
        "export it before starting multiproxy"
    )


def test_file_strips_only_the_trailing_newline(tmp_path):
    assert resolve_secret({"password_file": secret_file(tmp_path, " pw \n")}, KEY) == " pw "


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620, 0o602])
def test_file_open_to_group_or_others_is_refused(tmp_path, mode):
    path = secret_file(tmp_path, "pw\n", mode)
    with pytest.raises(SecretError) as info:
        resolve_secret({"password_file": path}, KEY)
    message = str(info.value)
    assert message.startswith("clusters.orders.backend.password_file: %s is readable or writable by group or others" % path)
    assert message.endswith("run: chmod 600 %s" % path)
    assert "pw" not in message.replace(path, "")


def test_file_owner_only_modes_are_fine(tmp_path):
    assert resolve_secret({"password_file": secret_file(tmp_path, "pw", 0o400)}, KEY) == "pw"
    assert resolve_secret({"password_file": secret_file(tmp_path, "pw", 0o700)}, KEY) == "pw"


def test_file_missing_or_not_a_file(tmp_path):
    with pytest.raises(SecretError, match=r"^clusters.orders.backend.password_file: cannot read .*: No such file"):
        resolve_secret({"password_file": str(tmp_path / "nope")}, KEY)
    with pytest.raises(SecretError, match="not a regular file"):
        resolve_secret({"password_file": str(tmp_path)}, KEY)


def test_command_stdout_stripped():
    assert resolve_secret({"password_command": "printf '  s3cret\\n'"}, KEY) == "s3cret"


def test_command_failure_shows_stderr_not_stdout():
    with pytest.raises(SecretError) as info:
        resolve_secret({"password_command": "echo leaked; echo 'vault: permission denied' >&2; exit 3"}, KEY)
    assert str(info.value) == (
        "clusters.orders.backend.password_command: command exited with status 3: vault: permission denied"
    )


def test_command_timeout():
    with pytest.raises(SecretError, match=r"password_command: command did not finish within 0.2 s"):
        resolve_secret({"password_command": "sleep 5"}, KEY, command_timeout=0.2)


def test_empty_secret_is_an_error(monkeypatch, tmp_path):
    monkeypatch.setenv("MP_TEST_EMPTY", "")
    for source in ({"password_env": "MP_TEST_EMPTY"}, {"password_command": "true"}, {"password_file": secret_file(tmp_path, "\n")}):
        with pytest.raises(SecretError, match="the secret is empty"):
            resolve_secret(source, KEY)
    with pytest.raises(SecretError, match=r"backend.password: expected a non-empty string"):
        resolve_secret({"password": ""}, KEY)
    with pytest.raises(SecretError, match=r"backend.password_env: expected a non-empty string"):
        resolve_secret({"password_env": 3}, KEY)


def test_exactly_one_source():
    with pytest.raises(SecretError) as info:
        resolve_secret({"user": "app"}, KEY)
    assert str(info.value) == (
        "clusters.orders.backend: no password source; set one of password, password_env, password_file, password_command, "
        "password_secret_arn"
    )
    with pytest.raises(SecretError) as info:
        resolve_secret({"password": "a", "password_env": "B"}, KEY)
    assert str(info.value) == "clusters.orders.backend: password and password_env are set; keep exactly one password source"
    with pytest.raises(SecretError, match="password, password_env and password_command are set"):
        resolve_secret({"password": "a", "password_env": "B", "password_command": "c"}, KEY)


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def counting_resolver():
    calls = []

    def resolve(source, key_path):
        calls.append(key_path)
        return "secret-%d" % len(calls)

    return resolve, calls


def test_cached_secret_ttl_and_invalidate():
    clock = FakeClock()
    resolve, calls = counting_resolver()
    cached = CachedSecret({"password_env": "X"}, KEY, ttl=60, clock=clock, resolver=resolve)
    assert cached.get() == "secret-1"
    clock.now += 59
    assert cached.get() == "secret-1"
    clock.now += 1
    assert cached.get() == "secret-2"
    cached.invalidate()
    assert cached.get() == "secret-3"
    assert calls == [KEY] * 3
    assert "secret" not in repr(cached).replace(KEY, "")


def test_cached_secret_without_ttl_and_errors_not_cached():
    clock = FakeClock()
    resolve, calls = counting_resolver()
    cached = CachedSecret({}, KEY, ttl=None, clock=clock, resolver=resolve)
    assert cached.get() == "secret-1"
    clock.now += 1e9
    assert cached.get() == "secret-1"

    failing = CachedSecret({"password_env": "MP_TEST_NOPE_%d" % os.getpid()}, KEY)
    with pytest.raises(SecretError):
        failing.get()
    os.environ["MP_TEST_NOPE_%d" % os.getpid()] = "now-set"
    try:
        assert failing.get() == "now-set"
    finally:
        del os.environ["MP_TEST_NOPE_%d" % os.getpid()]
