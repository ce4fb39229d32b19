"""The single-file executable (tools/build-binary.sh): built once, then run in a clean environment (no
PYTHONPATH, no site-packages of ours, cwd a temp dir) for each CLI command, a real client through it, the lab,
and a third-party engine found in the documented plugin path."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import psycopg
import pytest

from .proxy import free_port, render_toml
from .test_plugin_example import EXAMPLE, _pip_build_args

pytestmark = pytest.mark.timeout(240)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BINARY = os.path.join(REPO_ROOT, "dist", "multiproxy")


@pytest.fixture(scope="module")
def binary(tmp_path_factory):
    """dist/multiproxy, built (or reused when its sources have not changed: the script keeps a hash)."""
    out = subprocess.run([os.path.join(REPO_ROOT, "tools", "build-binary.sh")], capture_output=True, text=True,
                         cwd=REPO_ROOT, timeout=600, env={**os.environ, "PYTHON": sys.executable})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert os.access(BINARY, os.X_OK)
    # A copy in a directory of its own, so that a plugins/ directory beside it belongs to this test alone.
    where = tmp_path_factory.mktemp("bin")
    shutil.copy2(BINARY, where / "multiproxy")
    return str(where / "multiproxy")


@pytest.fixture
def clean(tmp_path):
    """The environment of a machine where nothing of ours is installed: env -i PATH=/usr/bin:/bin HOME=tmp."""
    home = tmp_path / "home"
    home.mkdir()
    return {"PATH": "/usr/bin:/bin", "HOME": str(home)}


def run(binary, env, cwd, *args, timeout=60, stdin=None):
    return subprocess.run([binary, *args], capture_output=True, text=True, env=env, cwd=str(cwd), timeout=timeout,
                          input=stdin)


def engine_rows(stdout: str) -> dict[str, list[str]]:
    return {fields[0]: fields for fields in (line.split() for line in stdout.splitlines()) if fields}


def pg_config(pg, listen_port, users_file=None):
    listener = {"name": "pg", "listen": f"127.0.0.1:{listen_port}", "cluster": "main", "auth": "trust"}
    config = {
        "proxy": {"admin_listen": f"127.0.0.1:{free_port()}", "log_level": "info"},
        "clusters": {"main": {"engine": "postgres", "hosts": [f"127.0.0.1:{pg.port}"], "backend": {"tls": "disable"},
                              "pool": {"mode": "transaction", "max_size": 2, "borrow_timeout": 5.0}}},
        "listeners": [listener],
    }
    return render_toml(config)


def test_version_and_builtin_engines(binary, clean, tmp_path):
    out = run(binary, clean, tmp_path, "--version")
    assert out.returncode == 0 and "0.1.0" in out.stdout, out.stdout + out.stderr
    out = run(binary, clean, tmp_path, "engines")
    assert out.returncode == 0, out.stderr
    rows = engine_rows(out.stdout)
    assert {"postgres", "mysql", "tds"} <= set(rows), out.stdout
    assert rows["postgres"][1] == "multiproxy_engines.postgres:PostgresEngine"


def test_check_config_and_users_add(binary, clean, tmp_path, pg):
    (tmp_path / "multiproxy.toml").write_text(pg_config(pg, free_port()))
    out = run(binary, clean, tmp_path, "check-config", "multiproxy.toml")
    assert out.returncode == 0, out.stdout + out.stderr
    users = tmp_path / "users.toml"
    out = run(binary, clean, tmp_path, "users", "add", "--users-file", str(users), "--password-stdin", "alice",
              stdin="s3cret\n")
    assert out.returncode == 0, out.stdout + out.stderr
    text = users.read_text()
    assert "alice" in text and "SCRAM-SHA-256$" in text and "s3cret" not in text


def test_run_serves_a_real_client(binary, clean, tmp_path, pg):
    port = free_port()
    (tmp_path / "multiproxy.toml").write_text(pg_config(pg, port))
    log = open(tmp_path / "proxy.log", "w")
    proc = subprocess.Popen([binary, "run", "-c", "multiproxy.toml"], env=clean, cwd=str(tmp_path),
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                conn = psycopg.connect(host="127.0.0.1", port=port, user="mp_trust", dbname="mpdb",
                                       connect_timeout=5, autocommit=True)
                break
            except psycopg.OperationalError:
                assert proc.poll() is None, (tmp_path / "proxy.log").read_text()
                assert time.monotonic() < deadline, (tmp_path / "proxy.log").read_text()
                time.sleep(0.2)
        with conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
            assert conn.execute("SELECT count(*) FROM generate_series(1, 1000)").fetchone() == (1000,)
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
            log.close()
    assert proc.returncode == 0, (tmp_path / "proxy.log").read_text()


def test_lab_up_and_down(binary, clean, tmp_path):
    """All three engines: the lab starts its proxy, DNS and TDS lab servers as `multiproxy -m MODULE` (the
    executable itself), then queries each writer and reader listener through the proxy."""
    lab_dir = tmp_path / "lab"
    out = run(binary, clean, tmp_path, "lab", "up", "--engines", "postgres,mysql,tds", "--dir", str(lab_dir),
              "--detach", timeout=150)
    try:
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        for listener in ("pg-writer", "pg-reader", "my-writer", "my-reader", "tds-writer", "tds-reader"):
            assert f"query through {listener} ... ok" in out.stdout, out.stdout
    finally:
        down = run(binary, clean, tmp_path, "lab", "down", "--dir", str(lab_dir), timeout=60)
    assert down.returncode == 0, down.stdout + down.stderr


def test_third_party_engine_in_the_plugin_path(binary, clean, tmp_path):
    """The example engine installed with `pip install --target` into plugins/ beside the executable, and into a
    directory named by $MULTIPROXY_PLUGIN_PATH: `engines` lists it."""
    src = tmp_path / "src"
    shutil.copytree(EXAMPLE, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    target = tmp_path / "plugin-dir"
    out = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", *_pip_build_args(),
                          "--target", str(target), str(src)], capture_output=True, text=True, timeout=120,
                         cwd=str(tmp_path))
    assert out.returncode == 0, out.stdout + out.stderr

    out = run(binary, clean, tmp_path, "engines")
    assert "echo" not in engine_rows(out.stdout), out.stdout       # nothing found before it is installed

    out = run(binary, {**clean, "MULTIPROXY_PLUGIN_PATH": str(target)}, tmp_path, "engines")
    assert out.returncode == 0, out.stderr
    rows = engine_rows(out.stdout)
    assert rows["echo"][1:4] == ["multiproxy_echo:EchoEngine", "multiproxy-echo-engine", "0.1.0"], out.stdout
    assert "postgres" in rows

    beside = os.path.join(os.path.dirname(binary), "plugins")
    shutil.copytree(target, beside)
    try:
        out = run(binary, clean, tmp_path, "engines")
        assert out.returncode == 0, out.stderr
        assert engine_rows(out.stdout)["echo"][1] == "multiproxy_echo:EchoEngine", out.stdout
    finally:
        shutil.rmtree(beside)
