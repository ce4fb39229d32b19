"""multiproxy without the lab extra: `run`, `check-config` and `engines` work with only the core's dependencies,
and `multiproxy lab` says how to get the lab.

The venv is test_plugin_example's (this interpreter's site-packages, this checkout first on the path). The lab
extra's packages, sqlglot and cryptography, are installed here, so a sitecustomize makes them missing: its
import hook refuses them (ModuleNotFoundError, as when they are not installed) and records every attempt to
import them or multiproxy.lab in a file, which must stay empty for the core's commands.
"""
from __future__ import annotations

import ast
import os
import pathlib
import subprocess
import tomllib

import pytest

from multiproxy.auth import UsersFile

from .proxy import ProxyProcess, free_port, render_toml
from .test_pg_tls import write_pki
from .test_plugin_example import REPO_ROOT, Venv

pytestmark = pytest.mark.timeout(120)

CONFIGS = sorted((pathlib.Path(REPO_ROOT) / "configs").glob("*.toml"))
LAB_EXTRA = ("sqlglot", "cryptography")

SITECUSTOMIZE = '''
import os, sys

_BLOCKED = ("sqlglot", "cryptography")
_WATCHED = _BLOCKED + ("multiproxy.lab",)
_LOG = os.environ["MP_IMPORT_LOG"]


class _NoLabExtra:
    """Records imports of the lab extra's packages and of multiproxy.lab; refuses the extra's packages."""

    def find_spec(self, name, path=None, target=None):
        if any(name == top or name.startswith(top + ".") for top in _WATCHED):
            with open(_LOG, "a") as f:
                f.write(name + "\\n")
        if any(name == top or name.startswith(top + ".") for top in _BLOCKED):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked: no lab extra)", name=name)
        return None


sys.meta_path.insert(0, _NoLabExtra())
'''


@pytest.fixture(scope="module")
def core_venv(tmp_path_factory):
    """A venv in which sqlglot and cryptography cannot be imported."""
    base = tmp_path_factory.mktemp("core-venv")
    env = Venv(base / "venv")
    hooks = base / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env.env["PYTHONPATH"] = os.pathsep.join((REPO_ROOT, str(hooks)))
    env.env["MP_IMPORT_LOG"] = str(base / "imports.log")
    env.import_log = base / "imports.log"
    return env


def watched_imports(venv) -> list[str]:
    """What the hook saw since the last call (and forget it)."""
    if not venv.import_log.exists():
        return []
    names = venv.import_log.read_text().split()
    venv.import_log.unlink()
    return names


def test_the_hook_makes_the_lab_extra_missing(core_venv):
    out = core_venv.run("-c", "import sqlglot")
    assert out.returncode != 0 and "ModuleNotFoundError" in out.stderr, out.stderr
    assert watched_imports(core_venv) == ["sqlglot"]


def test_engines_without_the_lab_extra(core_venv):
    out = core_venv.run("-m", "multiproxy", "engines")
    assert out.returncode == 0, out.stderr
    assert {line.split()[0] for line in out.stdout.splitlines()} >= {"postgres", "mysql", "tds"}
    assert watched_imports(core_venv) == []


def example_config(path: pathlib.Path, workdir: pathlib.Path) -> dict:
    """The example with free loopback ports, one worker, and its users file and audit log in `workdir`."""
    config = tomllib.loads(path.read_text())
    config["proxy"]["admin_listen"] = f"127.0.0.1:{free_port()}"
    config["proxy"]["workers"] = 1
    if config["proxy"].get("audit_log"):
        config["proxy"]["audit_log"] = str(workdir / "audit.jsonl")
    for listener in config["listeners"]:
        listener["listen"] = f"127.0.0.1:{free_port()}"
    # The files the example names on its own host, made here: check-config judges them on this machine.
    for name, cluster in config["clusters"].items():
        backend = cluster.get("backend", {})
        if backend.get("tls_ca_file"):
            backend["tls_ca_file"] = write_pki(str(workdir), name)["ca"]
        for index, credential in enumerate(cluster.get("credentials", [])):
            if credential.get("password_file"):
                secret = workdir / f"{name}-{index}.password"
                secret.write_text("example-password\n")
                secret.chmod(0o600)
                credential["password_file"] = str(secret)
    users = UsersFile.empty()
    users.add("app", "app-password", kinds=("scram_sha_256", "mysql_native_password", "caching_sha2_password",
                                            "tds_sha256"))
    users.save(str(workdir / "users.toml"))
    config["auth"]["users_file"] = str(workdir / "users.toml")
    return config


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_check_config_and_run_without_the_lab_extra(core_venv, tmp_path, path):
    config = example_config(path, tmp_path)
    config_path = tmp_path / "multiproxy.toml"
    config_path.write_text(render_toml(config))
    out = core_venv.run("-m", "multiproxy", "check-config", str(config_path))
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"{config_path}: ok"), out.stdout
    assert watched_imports(core_venv) == []

    workdir = tmp_path / "run"
    env = {"PYTHONPATH": core_venv.env["PYTHONPATH"], "MP_IMPORT_LOG": core_venv.env["MP_IMPORT_LOG"]}
    with ProxyProcess(config, workdir=str(workdir), env=env,
                      argv=[core_venv.python, "-m", "multiproxy", "run", "-c"]) as proxy:
        assert len(proxy.listeners) == len(config["listeners"])     # every listener accepts connections
    log = (workdir / "proxy.log").read_text()
    assert "Traceback" not in log, log
    assert watched_imports(core_venv) == []


def test_lab_without_the_lab_extra_says_how_to_install_it(core_venv):
    for args in (["lab", "up"], ["lab", "status", "--dir", "/nonexistent"], ["lab", "--help"], ["lab"]):
        out = core_venv.run("-m", "multiproxy", *args)
        assert out.returncode == 2, (args, out.stdout, out.stderr)
        assert "the lab needs the lab extra: pip install 'multiproxy[lab]'" in out.stderr, out.stderr
        assert "missing: sqlglot, cryptography" in out.stderr, out.stderr
    # The other commands' help still lists it.
    out = core_venv.run("-m", "multiproxy", "--help")
    assert out.returncode == 0 and "lab" in out.stdout and "multiproxy[lab]" in out.stdout, out.stdout + out.stderr
    assert "multiproxy.lab.cli" not in watched_imports(core_venv)


def test_lab_with_the_lab_extra_is_the_lab(core_venv):
    """Without the hook (the full install) `multiproxy lab` is the lab's command group."""
    env = dict(core_venv.env, PYTHONPATH=REPO_ROOT)
    out = subprocess.run([core_venv.python, "-m", "multiproxy", "lab", "--help"], capture_output=True, text=True,
                         env=env, timeout=60, stdin=subprocess.DEVNULL)
    assert out.returncode == 0, out.stderr
    assert "failover" in out.stdout and "up" in out.stdout


def _setup_call() -> dict:
    tree = ast.parse((pathlib.Path(REPO_ROOT) / "setup.py").read_text())
    call = next(node for node in ast.walk(tree) if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "setup")
    return {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords if kw.arg in ("install_requires", "extras_require")}


def test_the_lab_extra_in_setup_py():
    setup = _setup_call()
    names = lambda reqs: {r.split(">")[0].split("=")[0].split("[")[0].strip().lower() for r in reqs}  # noqa: E731
    assert "sqlglot" not in names(setup["install_requires"])
    assert set(LAB_EXTRA) <= names(setup["extras_require"]["lab"])
    from multiproxy.lab import REQUIREMENTS
    assert set(REQUIREMENTS) <= names(setup["extras_require"]["lab"])
