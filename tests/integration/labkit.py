"""Running `multiproxy lab` from tests: the CLI call, its `env` exports, connection arguments from its URLs, and a
lab shared by the tests of one run (`shared_lab`, a session fixture in conftest.py)."""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
from urllib.parse import unquote, urlsplit

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def lab(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """`python -m multiproxy lab ARGS` with none of the caller's PG*/MULTIPROXY_* variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "MULTIPROXY_"))}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, os.environ.get("PYTHONPATH")) if p)
    return subprocess.run([sys.executable, "-m", "multiproxy", "lab", *args], capture_output=True, text=True,
                          env=env, timeout=timeout, stdin=subprocess.DEVNULL)


def parse_exports(text: str) -> dict[str, str]:
    values = {}
    for line in text.splitlines():
        assert line.startswith("export "), line
        name, _, value = line[len("export "):].partition("=")
        values[name] = shlex.split(value)[0]
    return values


def url_args(url: str) -> dict:
    parts = urlsplit(url)
    return {"host": parts.hostname, "port": parts.port, "user": unquote(parts.username),
            "password": unquote(parts.password), "database": parts.path.lstrip("/")}


def tds_args(url: str) -> dict:
    """python-tds (pytds) connect arguments."""
    args = url_args(url)
    return {"dsn": args.pop("host"), **args, "autocommit": True, "login_timeout": 10}


class SharedLab:
    """A detached lab of every engine: `values` are its `lab env` exports, `dir` its directory."""

    def __init__(self, lab_dir: str):
        self.dir = lab_dir
        self.values: dict[str, str] = {}

    def up(self) -> None:
        started = lab("up", "--dir", self.dir, "--detach", timeout=120)
        assert started.returncode == 0, started.stdout + started.stderr
        env = lab("env", "--dir", self.dir)
        assert env.returncode == 0, env.stderr
        self.values = parse_exports(env.stdout)

    def down(self) -> None:
        lab("down", "--dir", self.dir, timeout=60)

    def args(self, name: str) -> dict:
        """Connection arguments (host, port, user, password, database) of the URL exported as `name`."""
        return url_args(self.values[name])

    def metrics_text(self) -> str:
        """The lab proxy's Prometheus text."""
        import urllib.request
        with urllib.request.urlopen(self.values["MULTIPROXY_ADMIN_URL"] + "/metrics", timeout=10) as answer:
            return answer.read().decode()
