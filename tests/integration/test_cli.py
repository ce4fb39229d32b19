"""The `multiproxy` command line, run as a real subprocess: --version, engines, check-config, users, status."""
from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys

import psycopg
import pytest

from .proxy import REPO_ROOT, free_port, render_toml

pytestmark = pytest.mark.timeout(60)

USER = "mp_trust"
DB = "mpdb"


def multiproxy(*args: str, stdin: str | None = None, cwd: str | None = None, timeout: float = 30,
               console_script: bool = False) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MULTIPROXY_USERS_FILE"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, env.get("PYTHONPATH")) if p)
    argv = [shutil.which("multiproxy")] if console_script else [sys.executable, "-m", "multiproxy"]
    return subprocess.run([*argv, *args], input=stdin, capture_output=True, text=True, cwd=cwd or REPO_ROOT,
                          env=env, timeout=timeout, stdin=None if stdin is not None else subprocess.DEVNULL)


def valid_config(pg_port: int = 5432, admin_port: int | None = None, listen_port: int | None = None) -> dict:
    return {
        "proxy": {"admin_listen": f"127.0.0.1:{admin_port or free_port()}", "log_level": "info", "handshake_timeout": 2.0},
        "clusters": {"main": {"engine": "postgres", "hosts": [f"127.0.0.1:{pg_port}"], "backend": {"tls": "disable"},
                              "pool": {"mode": "transaction", "max_size": 3, "borrow_timeout": 5.0}}},
        "listeners": [{"name": "pg", "listen": f"127.0.0.1:{listen_port or free_port()}", "cluster": "main",
                       "role": "writer", "auth": "trust"}],
    }


def test_version():
    from multiproxy import __version__
    out = multiproxy("--version")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"multiproxy, version {__version__}"


@pytest.mark.skipif(shutil.which("multiproxy") is None, reason="the console script is not installed")
def test_version_console_script():
    out = multiproxy("--version", console_script=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("multiproxy, version ")


def test_engines_lists_postgres_with_its_distribution():
    out = multiproxy("engines")
    assert out.returncode == 0, out.stderr
    lines = [line.split() for line in out.stdout.splitlines() if line.strip()]
    postgres = [fields for fields in lines if fields[0] == "postgres"]
    assert len(postgres) == 1, out.stdout
    fields = postgres[0]
    assert fields[1] == "multiproxy_engines.postgres:PostgresEngine", out.stdout
    assert fields[2] == "multiproxy", out.stdout           # the distribution providing the entry point
    assert fields[3][0].isdigit(), out.stdout               # its version


def test_check_config_valid(tmp_path):
    path = tmp_path / "ok.toml"
    path.write_text(render_toml(valid_config()))
    out = multiproxy("check-config", str(path))
    assert out.returncode == 0, out.stderr
    assert "ok" in out.stdout and "1 cluster" in out.stdout and "1 listener" in out.stdout, out.stdout


def test_check_config_reports_every_mistake_with_its_key_path(tmp_path):
    config = valid_config()
    config["proxy"]["log_level"] = "chatty"                       # not a level
    config["clusters"]["main"]["pool"]["max_size"] = 0            # below the minimum
    config["listeners"][0]["role"] = "primary"                    # not a role
    path = tmp_path / "bad.toml"
    path.write_text(render_toml(config))
    out = multiproxy("check-config", str(path))
    assert out.returncode != 0
    report = out.stdout + out.stderr
    for key_path in ("proxy.log_level", "clusters.main.pool.max_size", "listeners[0].role"):
        assert key_path in report, report
    assert "3 problem" in report, report
    assert "Traceback" not in report, report


def test_check_config_invalid_toml_and_missing_file(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text("[proxy\nlog_level = 'info'\n")
    out = multiproxy("check-config", str(path))
    assert out.returncode != 0 and "TOML" in out.stderr and "Traceback" not in out.stderr, out.stderr
    out = multiproxy("check-config", str(tmp_path / "absent.toml"))
    assert out.returncode != 0 and "absent.toml" in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_check_config_tells_what_this_machine_lacks(tmp_path):
    """Every file the config names is judged here (missing, too open, unparsable, no users), the audit log's
    folder must exist, and a listen address in use is named; --syntax-only judges the text alone."""
    import socket
    users_file = tmp_path / "users.toml"
    users_file.write_text("")                                    # parses, but holds no users
    open_secret = tmp_path / "open.password"
    open_secret.write_text("pw\n")
    open_secret.chmod(0o644)
    not_a_ca = tmp_path / "ca.pem"
    not_a_ca.write_text("-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n")
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    config = valid_config(listen_port=busy.getsockname()[1])
    config["proxy"]["audit_log"] = str(tmp_path / "no-such-folder" / "audit.jsonl")
    config["auth"] = {"users_file": str(users_file)}
    config["listeners"][0]["auth"] = "scram-sha-256"
    config["admin"] = {"users": ["ops"], "http_token_env": "MP_SURELY_UNSET_TOKEN"}
    cluster = config["clusters"]["main"]
    cluster["backend"] = {"tls": "verify-ca", "tls_ca_file": str(not_a_ca)}
    cluster["credentials"] = [{"user": "a", "password_file": str(open_secret)},
                              {"user": "b", "password_file": str(tmp_path / "absent.password")},
                              {"user": "c", "password_env": "MP_SURELY_UNSET_VARIABLE"}]
    path = tmp_path / "here.toml"
    path.write_text(render_toml(config))
    try:
        out = multiproxy("check-config", str(path))
    finally:
        busy.close()
    assert out.returncode == 2, out.stdout + out.stderr
    report = out.stderr
    expected = [
        "auth.users_file: " + f"{users_file} has no users",
        "proxy.audit_log: folder " + str(tmp_path / "no-such-folder") + " does not exist on this machine",
        "clusters.main.backend.tls_ca_file: " + f"{not_a_ca} holds no usable CA certificate",
        "clusters.main.credentials[0].password_file: " + f"{open_secret} is readable or writable by group or "
        "others (mode 644); run: chmod 600",
        "clusters.main.credentials[1].password_file: file not found on this machine: "
        + str(tmp_path / "absent.password"),
        "clusters.main.credentials[2].password_env: environment variable MP_SURELY_UNSET_VARIABLE is not set",
        "admin.http_token_env: environment variable MP_SURELY_UNSET_TOKEN is not set here",
        "listeners[0].listen: address 127.0.0.1:" + str(config["listeners"][0]["listen"].split(":")[1])
        + " is already in use",
    ]
    for line in expected:
        assert line in report, (line, report)
    assert "8 problem(s) on this machine" in report and "Traceback" not in report, report
    out = multiproxy("check-config", "--syntax-only", str(path))
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"{path}: syntax ok (1 cluster(s), 1 listener(s))"), out.stdout


def test_run_refuses_a_config_whose_files_are_missing_here(tmp_path):
    """`run` checks what a start needs before binding anything; credential problems are only warned about (a
    running proxy reads those secrets when a user first needs a backend)."""
    config = valid_config()
    config["clusters"]["main"]["backend"] = {"tls": "verify-ca", "tls_ca_file": str(tmp_path / "absent-ca.pem")}
    path = tmp_path / "run.toml"
    path.write_text(render_toml(config))
    out = multiproxy("run", "-c", str(path), timeout=30)
    assert out.returncode == 2, out.stdout + out.stderr
    assert ("clusters.main.backend.tls_ca_file: file not found on this machine: " + str(tmp_path / "absent-ca.pem")
            in out.stderr), out.stderr


def test_run_names_the_listen_address_in_use(tmp_path):
    import socket
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        path = tmp_path / "busy.toml"
        path.write_text(render_toml(valid_config(listen_port=port)))
        out = multiproxy("run", "-c", str(path), timeout=30)
    assert out.returncode == 1, out.stdout + out.stderr
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in out.stderr, out.stderr


def test_users_add_list_remove_never_stores_plaintext(tmp_path):
    users_file = tmp_path / "users.toml"
    password = "Plain-Text-Secret-9f3a"
    out = multiproxy("users", "add", "alice", "--password-stdin", "--users-file", str(users_file), stdin=password + "\n")
    assert out.returncode == 0, out.stderr
    assert "alice" in out.stdout
    out = multiproxy("users", "add", "bob", "--password-stdin", "--users-file", str(users_file),
                     "--kind", "scram_sha_256", stdin="other-" + password + "\n")
    assert out.returncode == 0, out.stderr

    text = users_file.read_text()
    assert password not in text
    assert "SCRAM-SHA-256$" in text                       # a verifier is stored instead
    assert stat.S_IMODE(os.stat(users_file).st_mode) == 0o600

    out = multiproxy("users", "list", "--users-file", str(users_file))
    assert out.returncode == 0, out.stderr
    listed = {line.split("\t")[0]: line for line in out.stdout.splitlines()}
    assert set(listed) == {"alice", "bob"}, out.stdout
    assert "scram_sha_256" in listed["alice"] and "md5" in listed["alice"]
    assert "md5" not in listed["bob"]
    assert password not in out.stdout and "SCRAM-SHA-256$" not in out.stdout   # never the verifiers either

    out = multiproxy("users", "remove", "bob", "--users-file", str(users_file))
    assert out.returncode == 0, out.stderr
    out = multiproxy("users", "list", "--users-file", str(users_file))
    assert [line.split("\t")[0] for line in out.stdout.splitlines()] == ["alice"]

    out = multiproxy("users", "add", "carol", "--password-stdin", "--users-file", str(users_file), stdin="\n")
    assert out.returncode != 0 and "empty" in out.stderr, out.stderr


def test_users_added_by_cli_log_in_through_the_proxy(pg, proxy_factory, tmp_path):
    """The verifiers the CLI writes are the ones the proxy checks: right password in, wrong password out."""
    users_file = tmp_path / "users.toml"
    out = multiproxy("users", "add", USER, "--password-stdin", "--users-file", str(users_file), stdin="cli-pw\n")
    assert out.returncode == 0, out.stderr
    config = valid_config(pg.port)
    config["auth"] = {"users_file": str(users_file)}
    config["listeners"][0]["auth"] = "scram-sha-256"
    proxy = proxy_factory(config)
    with psycopg.connect(host=proxy.host, port=proxy.port, user=USER, password="cli-pw", dbname=DB,
                         connect_timeout=5) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (USER,)
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(host=proxy.host, port=proxy.port, user=USER, password="wrong", dbname=DB, connect_timeout=5)


def test_status_against_a_running_proxy(pg, proxy_factory):
    admin_port, listen_port = free_port(), free_port()
    proxy = proxy_factory(valid_config(pg.port, admin_port, listen_port))
    with psycopg.connect(host=proxy.host, port=proxy.port, user=USER, dbname=DB, connect_timeout=5,
                         autocommit=True) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        out = multiproxy("status", "--admin", f"127.0.0.1:{admin_port}")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("uptime ")
    listener = [line for line in lines if line.startswith("listener ")]
    assert len(listener) == 1, out.stdout
    fields = listener[0].split()
    assert fields[1:5] == ["pg", "postgres", f"127.0.0.1:{listen_port}", "main/writer"], out.stdout
    assert fields[5] == "clients=1", out.stdout
    pools = [line for line in lines if line.startswith("pool ")]
    assert len(pools) == 1 and pools[0].split()[1] == f"main/writer/{USER}/{DB}", out.stdout
    assert "borrowed=0" in pools[0] and "size=1/3" in pools[0], out.stdout


def test_status_without_a_proxy_fails_clearly():
    port = free_port()
    out = multiproxy("status", "--admin", f"127.0.0.1:{port}", timeout=20)
    assert out.returncode != 0
    assert f"127.0.0.1:{port}" in out.stderr and "Traceback" not in out.stderr, out.stderr
