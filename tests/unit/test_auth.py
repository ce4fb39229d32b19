"""Tests for the users file, the verifier functions and the `multiproxy users` commands."""
import hashlib
import os
import shutil
import stat
import subprocess
import tomllib
import uuid

import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from multiproxy.auth import (
    UserRecord,
    UsersFile,
    UsersFileError,
    md5_verifier,
    parse_scram_verifier,
    saslprep,
    scram_sha_256_verifier,
)
from multiproxy.users_cmd import users

# (password, verifier) pairs produced by PostgreSQL 15 (`CREATE ROLE ... PASSWORD` with
# password_encryption = 'scram-sha-256'). The non-ASCII ones exercise SASLprep: a soft hyphen
# mapped to nothing, NFKC of a Roman numeral, a no-break space mapped to space, and passwords
# SASLprep rejects (control character, bidi mix), which PostgreSQL then hashes unchanged.
PG_SCRAM_VERIFIERS = [
    ("pw", "SCRAM-SHA-256$4096:CQuR2jCr9GkZ+msc/tn0uQ==$J3QbUkbPdLCvU37U0jl9ZFPJiV24tOF0SxojQ6fAzo0=:T8hxQZjShFmdkrm1Ux0XlX6DmypKUly5zB+I7+1eryw="),
    ("I\u00adX", "SCRAM-SHA-256$4096:UYeiDIs4o1x37Y0u1C/3jQ==$5t7vRTKUG3xkUNSMKZLp4o8JV9xAwXWLlR33pi7u7r0=:Qy3ZdtYl7qigQ8rGcQK+hZqFghNAiprv1ks78HlBFJg="),
    ("\u2168", "SCRAM-SHA-256$4096:Jpef2/7vkGmiCERODck+4g==$mNNOzy7AcA9bIdJ5SvxoBSAkJtcMGZ/IPp93iEc8Lis=:QCkJKJYdBxlDc9J37B33mAJFll7p+1kT/m4PsiwU+Q8="),
    ("a\u00a0b", "SCRAM-SHA-256$4096:pyQxz5W7L6IXH1boKdISGQ==$Xq/rqHQv3chw032dUnmJXwJ39AM6oLwb3+FFDyRMj6A=:7186n4HU7z+tjmIbxEAYBdkCYnjq6zKHEGoVe8cu5Qs="),
    ("caf\u00e9", "SCRAM-SHA-256$4096:a++NUEaTRbQA01a1QYYjBQ==$/CxtEsBulebY9L+3g992+zyEUjVuHBoosOKklg85N+8=:d10FmSwSkWtXqfJMhfqGFvgVkth5dQ9Z2I4teGV7uO0="),
    ("bad\u0007ctl", "SCRAM-SHA-256$4096:xF3NNQu2ucdSFJAulELWbQ==$ymv6MdlrJKLkAN2UQ/bB7iRAmMnKu6GfHl0JkIoevZA=:kGFxUZUUyqJME+Oze3O/YTA5Rf3CBJpMCsqv8MOZ+eE="),
    ("\u00e9\u0007x", "SCRAM-SHA-256$4096:EGTNBa1h+3lbsJp2t20v8w==$C3HPgn3n1yVuN0umRNaLvYnoqy6pGHvJNsvg1FZb1pY=:/nUDvKJ31mfa2rQOG6bHzrnyIPEAnDJA7pXyXoxvlro="),
    ("\u05d0a", "SCRAM-SHA-256$4096:nkYK3gDCq4BSug+cAtS/tQ==$RuFXNbM+jDtkI4UlC8SoXvVz8fbUBY1ZJUF5XV9YHAE=:c3if2YyRecXtVmPMulBEDO5LSVU2HRyf8+7koidG9aY="),
]

# md5 verifier PostgreSQL 15 stored for role "postgres_md5_tmp" with password "secret".
PG_MD5_VERIFIER = ("postgres_md5_tmp", "secret", "md5152bca1ea3f64cddfe72b6774f9d0b37")

SCRAM_PW = PG_SCRAM_VERIFIERS[0][1]
MD5_ALICE = md5_verifier("alice", "pw")


def write(tmp_path, text, name="users.toml"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def load_errors(tmp_path, text):
    path = write(tmp_path, text)
    with pytest.raises(UsersFileError) as info:
        UsersFile.load(path)
    return info.value


# --------------------------------------------------------------------------- verifiers


@pytest.mark.parametrize("password,verifier", PG_SCRAM_VERIFIERS)
def test_scram_verifier_matches_postgresql(password, verifier):
    parsed = parse_scram_verifier(verifier)
    assert scram_sha_256_verifier(password, parsed.salt, parsed.iterations) == verifier
    assert str(parsed) == verifier


def test_scram_verifier_format_and_fresh_salt():
    a, b = scram_sha_256_verifier("pw"), scram_sha_256_verifier("pw")
    assert a != b  # random salt each time
    parsed = parse_scram_verifier(a)
    assert parsed.iterations == 4096 and len(parsed.salt) == 16
    assert parse_scram_verifier(scram_sha_256_verifier("pw", b"salt", 10)).iterations == 10


@pytest.mark.parametrize(
    "text",
    [
        "",
        "SCRAM-SHA-256$4096:c2FsdA==$abc",
        "SCRAM-SHA-256$0:c2FsdA==$" + "A" * 43 + "=:" + "A" * 43 + "=",
        "SCRAM-SHA-256$4096:c2FsdA==$c2hvcnQ=:" + "A" * 43 + "=",
        "SCRAM-SHA-256$4096:!!!!$" + "A" * 43 + "=:" + "A" * 43 + "=",
        "md5" + "0" * 32,
    ],
)
def test_parse_scram_verifier_rejects(text):
    with pytest.raises(ValueError):
        parse_scram_verifier(text)


def test_md5_verifier_known_values():
    assert md5_verifier("postgres", "secret") == "md5" + hashlib.md5(b"secretpostgres").hexdigest()
    user, password, expected = PG_MD5_VERIFIER
    assert md5_verifier(user, password) == expected


def test_saslprep():
    assert saslprep("pencil") == "pencil"
    assert saslprep("I\u00adX") == "IX"
    assert saslprep("\u2168") == "IX"
    assert saslprep("a\u00a0b") == "a b"
    assert saslprep("\u00e9\u0007x") == "\u00e9\u0007x"  # prohibited: used unchanged, like PostgreSQL


def _psql(*commands):
    args = ["psql", "-h", "127.0.0.1", "-U", "postgres", "-Atq", "-v", "ON_ERROR_STOP=1"]
    for c in commands:
        args += ["-c", c]
    return subprocess.run(args, capture_output=True, text=True, timeout=20, env={**os.environ, "PGCONNECT_TIMEOUT": "3"})


def _postgres_available():
    if shutil.which("psql") is None:
        return False
    try:
        return _psql("select 1").returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.skipif(not _postgres_available(), reason="needs psql and PostgreSQL on 127.0.0.1:5432 with trust auth")
@pytest.mark.parametrize("encryption", ["scram-sha-256", "md5"])
def test_verifiers_match_live_postgresql(encryption):
    role = "tmp_mp_" + uuid.uuid4().hex[:12]
    password = "s3cret caf\u00e9"
    try:
        result = _psql(
            "SET password_encryption = '%s'" % encryption,
            "CREATE ROLE %s PASSWORD '%s'" % (role, password),
            "SELECT rolpassword FROM pg_authid WHERE rolname = '%s'" % role,
        )
        assert result.returncode == 0, result.stderr
        stored = result.stdout.strip()
    finally:
        _psql("DROP ROLE IF EXISTS %s" % role)
    if encryption == "md5":
        assert stored == md5_verifier(role, password)
    else:
        parsed = parse_scram_verifier(stored)
        assert scram_sha_256_verifier(password, parsed.salt, parsed.iterations) == stored


# --------------------------------------------------------------------------- loading


def test_load_full_example(tmp_path):
    path = write(
        tmp_path,
        f"""
[users.alice]
scram_sha_256 = "{SCRAM_PW}"
md5 = "{MD5_ALICE}"
mysql_native_password = "*ABCDEF"
listeners = ["pg-writer"]
max_connections = 5
pool_mode = "session"

[users."bob.smith"]
md5 = "{md5_verifier('bob.smith', 'x')}"
""",
    )
    table = UsersFile.load(path)
    assert table.names() == ["alice", "bob.smith"]
    alice = table.get("alice")
    assert alice == UserRecord(
        "alice",
        {"scram_sha_256": SCRAM_PW, "md5": MD5_ALICE, "mysql_native_password": "*ABCDEF"},
        ("pg-writer",),
        5,
        "session",
    )
    assert alice.may_use("pg-writer") and not alice.may_use("pg-reader")
    bob = table.get("bob.smith")
    assert bob.listeners is None and bob.max_connections == 0 and bob.pool_mode is None
    assert bob.may_use("anything")
    assert table.get("carol") is None


def test_empty_and_missing_users_table(tmp_path):
    assert UsersFile.load(write(tmp_path, "")).names() == []
    assert UsersFile.empty().names() == []


def test_errors_name_file_and_key_path_and_are_collected(tmp_path):
    err = load_errors(
        tmp_path,
        """
[users.alice]
scram_sha_256 = "SCRAM-SHA-256$nope"
md5 = "md5XYZ"
listeners = "pg-writer"
max_connections = -1
pool_mode = "statement"

[users.bob]
password = "hunter2"

[users."x.y"]
scram_sha_256 = "garbage"
""",
    )
    text = str(err)
    assert "users.toml: users.alice.scram_sha_256: not a SCRAM-SHA-256 verifier" in text
    assert "users.toml: users.alice.md5: not an md5 verifier" in text
    assert "users.toml: users.alice.listeners: expected a list of listener names" in text
    assert "users.toml: users.alice.max_connections: expected an integer >= 0" in text
    assert "users.toml: users.alice.pool_mode: expected one of session, transaction, got 'statement'" in text
    assert 'users.toml: users."x.y".scram_sha_256: not a SCRAM-SHA-256 verifier' in text
    assert len(err.errors) == 7
    assert "hunter2" not in text


def test_plaintext_password_is_an_error_pointing_to_users_add(tmp_path):
    err = load_errors(tmp_path, '[users.bob]\npassword = "hunter2"\n')
    assert err.errors == [
        "%s: users.bob.password: plaintext passwords are not allowed here; remove it and run "
        "`multiproxy users add bob` to store a verifier instead" % (tmp_path / "users.toml")
    ]


def test_structural_errors(tmp_path):
    err = load_errors(tmp_path, 'listen = 1\nusers = 3\n')
    assert [e.split(": ", 1)[1] for e in err.errors] == [
        "listen: unknown key (the file holds only [users.NAME] tables)",
        "users: expected a table of users",
    ]
    err = load_errors(tmp_path, '[users]\nalice = "x"\n')
    assert err.errors[0].endswith("users.alice: expected a table, got a string")
    err = load_errors(tmp_path, "[users.alice]\nlisteners = []\n")
    assert err.errors[0].endswith("users.alice: no password verifier; run `multiproxy users add alice` to set one")
    err = load_errors(tmp_path, f'[users.alice]\nmd5 = "{MD5_ALICE}"\nweight = 3\n')
    assert "users.alice.weight: unknown setting" in err.errors[0]


def test_invalid_toml_and_missing_file(tmp_path):
    err = load_errors(tmp_path, "[users.alice\n")
    assert str(err).startswith("%s: invalid TOML: " % (tmp_path / "users.toml"))
    with pytest.raises(UsersFileError, match=r"nope\.toml: cannot read: No such file"):
        UsersFile.load(tmp_path / "nope.toml")


# --------------------------------------------------------------------------- editing and saving


def test_add_save_load_round_trip_with_mode_0600(tmp_path):
    table = UsersFile.empty()
    record = table.add("alice", "pw", listeners=["pg-writer", "pg-reader"], max_connections=3, pool_mode="session")
    assert sorted(record.verifiers) == ["md5", "scram_sha_256"]
    assert record.verifiers["md5"] == md5_verifier("alice", "pw")
    table.add("bob", "pw2", kinds=["scram_sha_256"])
    path = tmp_path / "users.toml"
    table.save(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert "pw2" not in path.read_text()
    again = UsersFile.load(path)
    assert again.get("alice") == table.get("alice")
    assert again.get("bob") == table.get("bob")
    assert [p.name for p in tmp_path.iterdir()] == ["users.toml"]  # no temp file left behind


def test_add_existing_user_replaces_all_verifiers_and_keeps_settings(tmp_path):
    path = write(
        tmp_path,
        f'[users.alice]\nmd5 = "{MD5_ALICE}"\nmysql_native_password = "*OLD"\nmax_connections = 4\n',
    )
    table = UsersFile.load(path)
    record = table.add("alice", "new", kinds=["md5"])
    assert record.verifiers == {"md5": md5_verifier("alice", "new")}  # stale *OLD verifier dropped
    assert record.max_connections == 4
    assert table.add("alice", "new", pool_mode=None).pool_mode is None


def test_unknown_verifier_keys_survive_a_save(tmp_path):
    path = write(tmp_path, f'[users.alice]\nmd5 = "{MD5_ALICE}"\nmysql_native_password = "*ABC"\n')
    table = UsersFile.load(path)
    table.add("bob", "x")
    table.save(path)
    assert UsersFile.load(path).get("alice").verifiers["mysql_native_password"] == "*ABC"


def test_add_rejects_bad_input():
    table = UsersFile.empty()
    with pytest.raises(ValueError, match="empty"):
        table.add("alice", "")
    with pytest.raises(ValueError, match="user name"):
        table.add("", "pw")
    with pytest.raises(ValueError, match="unknown verifier kind"):
        table.add("alice", "pw", kinds=["plain"])
    with pytest.raises(ValueError, match="pool_mode"):
        table.add("alice", "pw", pool_mode="statement")
    with pytest.raises(ValueError, match="listeners"):
        table.add("alice", "pw", listeners="pg-writer")
    assert table.names() == []


def test_remove():
    table = UsersFile.empty()
    table.add("alice", "pw", kinds=["md5"])
    table.remove("alice")
    assert table.get("alice") is None
    with pytest.raises(KeyError):
        table.remove("alice")


names = st.text(st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), min_size=1, max_size=20)


@settings(max_examples=200, deadline=None)
@given(name=names, listener=names, extra=st.text(st.characters(blacklist_categories=("Cs",)), max_size=20))
def test_dumps_is_valid_toml_for_any_names(name, listener, extra):
    table = UsersFile([UserRecord(name, {"md5": md5_verifier(name, "x"), "future_kind": extra}, (listener,), 2, None)])
    data = tomllib.loads(table.dumps())
    assert data == {"users": {name: {"md5": md5_verifier(name, "x"), "future_kind": extra, "listeners": [listener], "max_connections": 2}}}
    assert UsersFile.from_dict(data).get(name) == table.get(name)


# --------------------------------------------------------------------------- `multiproxy users`


def test_cli_add_list_remove(tmp_path):
    path = str(tmp_path / "users.toml")
    runner = CliRunner()
    result = runner.invoke(users, ["add", "alice", "--users-file", path, "--password-stdin", "--listener", "pg-writer"], input="s3cret\n")
    assert result.exit_code == 0, result.output
    assert "added user alice" in result.output and "s3cret" not in result.output
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert "s3cret" not in open(path).read()
    alice = UsersFile.load(path).get("alice")
    assert alice.verifiers["md5"] == md5_verifier("alice", "s3cret")
    parsed = parse_scram_verifier(alice.verifiers["scram_sha_256"])
    assert scram_sha_256_verifier("s3cret", parsed.salt, parsed.iterations) == alice.verifiers["scram_sha_256"]

    result = runner.invoke(users, ["add", "alice", "--users-file", path, "--password-stdin", "--kind", "md5"], input="other\n")
    assert result.exit_code == 0 and "updated user alice" in result.output
    assert UsersFile.load(path).get("alice").listeners == ("pg-writer",)

    result = runner.invoke(users, ["list", "--users-file", path])
    assert result.exit_code == 0
    assert result.output == "alice\tverifiers=md5 listeners=pg-writer max_connections=unlimited\n"

    result = runner.invoke(users, ["remove", "alice", "--users-file", path])
    assert result.exit_code == 0 and UsersFile.load(path).names() == []
    result = runner.invoke(users, ["remove", "alice", "--users-file", path])
    assert result.exit_code != 0 and "no user alice" in result.output


def test_cli_prompts_twice_without_echo(tmp_path):
    path = str(tmp_path / "users.toml")
    result = CliRunner().invoke(users, ["add", "bob", "--users-file", path], input="pw1\npw1\n")
    assert result.exit_code == 0, result.output
    assert "pw1" not in result.output
    assert UsersFile.load(path).get("bob").verifiers["md5"] == md5_verifier("bob", "pw1")


def test_cli_reports_file_errors_and_empty_password(tmp_path):
    path = write(tmp_path, '[users.bob]\npassword = "hunter2"\n')
    result = CliRunner().invoke(users, ["list", "--users-file", str(path)])
    assert result.exit_code != 0 and "users.bob.password: plaintext passwords" in result.output
    assert "hunter2" not in result.output
    result = CliRunner().invoke(users, ["add", "x", "--users-file", str(tmp_path / "new.toml"), "--password-stdin"], input="\n")
    assert result.exit_code != 0 and "password is empty" in result.output
    assert not (tmp_path / "new.toml").exists()
