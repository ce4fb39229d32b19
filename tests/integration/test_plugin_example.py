"""The example engine distribution (docs/examples/multiproxy-echo-engine) installed into a fresh virtualenv: found, validated and served through its entry point."""
from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from .proxy import ProxyProcess, free_port

pytestmark = pytest.mark.timeout(120)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLE = os.path.join(REPO_ROOT, "docs", "examples", "multiproxy-echo-engine")


def _pip_build_args() -> list[str]:
    """`--no-build-isolation` when setuptools can build a wheel offline here (it can from 70.1 on, or with the
    `wheel` package); otherwise pip builds in isolation with setuptools and wheel from its configured index."""
    import setuptools
    major, minor = (int(x) for x in setuptools.__version__.split(".")[:2])
    if importlib.util.find_spec("wheel") is not None or (major, minor) >= (70, 1):
        return ["--no-build-isolation"]
    return []


class Venv:
    """A virtualenv over this interpreter's site-packages, with the repository's multiproxy first on the path."""

    def __init__(self, path):
        self.path = str(path)
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", self.path],
                       check=True, timeout=60)
        self.python = os.path.join(self.path, "bin", "python")
        self.env = {k: v for k, v in os.environ.items() if k not in ("MULTIPROXY_USERS_FILE", "PYTHONHOME")}
        # The multiproxy under test is this checkout (as for every integration test), not an installed copy.
        self.env["PYTHONPATH"] = REPO_ROOT

    def run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([self.python, *args], capture_output=True, text=True, env=self.env, timeout=timeout,
                              cwd=self.path, stdin=subprocess.DEVNULL)

    def install(self, source_dir) -> None:
        """pip install a local distribution (copied first: building writes build/ and *.egg-info next to it)."""
        copy = os.path.join(self.path, "src", os.path.basename(str(source_dir)))
        shutil.copytree(source_dir, copy, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
        out = self.run("-m", "pip", "install", "--quiet", "--no-deps", *_pip_build_args(), copy, timeout=120)
        assert out.returncode == 0, out.stdout + out.stderr


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    env = Venv(tmp_path_factory.mktemp("echo-venv") / "venv")
    env.install(EXAMPLE)
    return env


@pytest.fixture(scope="module")
def echo_server(venv):
    """The example's own EchoDB server, run from the venv (where only the installed distribution provides it)."""
    port = free_port()
    proc = subprocess.Popen([venv.python, "-m", "multiproxy_echo.server", "--port", str(port)], env=venv.env,
                            cwd=venv.path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = proc.stdout.readline()
        assert "listening" in line, line + proc.stdout.read()
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(scope="module")
def proxy(venv, echo_server, tmp_path_factory):
    config = {
        # An admin port of its own: the default 9930 may belong to another proxy on this machine.
        "proxy": {"log_level": "info", "handshake_timeout": 5.0, "admin_listen": f"127.0.0.1:{free_port()}"},
        "clusters": {"echo": {"engine": "echo", "hosts": [f"127.0.0.1:{echo_server}"],
                              "pool": {"mode": "transaction", "max_size": 2, "borrow_timeout": 20.0}}},
        "listeners": [{"name": "echo", "listen": f"127.0.0.1:{free_port()}", "cluster": "echo", "role": "writer",
                       "auth": "trust"}],
    }
    env = {"PYTHONPATH": REPO_ROOT}
    with ProxyProcess(config, workdir=str(tmp_path_factory.mktemp("echo-proxy")), env=env,
                      argv=[venv.python, "-m", "multiproxy", "run", "-c"]) as process:
        yield process


class EchoConnection:
    """A raw-socket EchoDB client: one line out, the answer lines up to the status line back."""

    def __init__(self, address, user="alice", password="secret"):
        self.sock = socket.create_connection(address, timeout=20)
        self.file = self.sock.makefile("rb")
        self.sock.sendall(f"AUTH {user} {password}\n".encode())
        self.greeting = self.file.readline().decode()

    def request(self, line: str) -> list[str]:
        self.sock.sendall(line.encode() + b"\n")
        answer = []
        while True:
            got = self.file.readline().decode()
            assert got, f"connection closed after {answer!r}"
            answer.append(got.rstrip("\n"))
            if got.startswith("DONE"):
                return answer

    def close(self):
        try:
            self.sock.sendall(b"QUIT\n")
        except OSError:
            pass
        self.file.close()
        self.sock.close()


def test_multiproxy_engines_lists_the_installed_plugin(venv):
    out = venv.run("-m", "multiproxy", "engines")
    assert out.returncode == 0, out.stderr
    rows = {fields[0]: fields for fields in (line.split() for line in out.stdout.splitlines()) if fields}
    assert rows["echo"][1:4] == ["multiproxy_echo:EchoEngine", "multiproxy-echo-engine", "0.1.0"], out.stdout
    assert "postgres" in rows        # the built-in engines load through the same entry point


def test_the_contract_kit_passes_on_the_plugin(venv):
    out = venv.run("-c", "from multiproxy.contract import check_engine; from multiproxy_echo import EchoEngine; "
                         "problems = check_engine(EchoEngine()); print(problems); assert problems == []")
    assert out.returncode == 0, out.stdout + out.stderr
    # It came from the venv's installed copy, not from the docs directory.
    where = venv.run("-c", "import multiproxy_echo; print(multiproxy_echo.__file__)")
    assert where.stdout.startswith(venv.path), where.stdout


def test_queries_are_echoed_through_the_proxy(proxy):
    conn = EchoConnection(proxy.address("echo"))
    try:
        assert conn.greeting.startswith("OK "), conn.greeting
        assert conn.request("QUERY hello through multiproxy") == ["ROW hello through multiproxy", "DONE"]
        assert conn.request("NONSENSE") == ["ERROR unknown command 'NONSENSE'", "DONE"]
        # Two requests in one packet are answered in order.
        conn.sock.sendall(b"QUERY one\nQUERY two\n")
        assert [conn.file.readline() for _ in range(4)] == [b"ROW one\n", b"DONE\n", b"ROW two\n", b"DONE\n"]
    finally:
        conn.close()


def test_twenty_clients_share_a_pool_of_two(proxy):
    def client(i):
        conn = EchoConnection(proxy.address("echo"), user="alice")
        try:
            answers = [conn.request(f"QUERY client {i} query {n}") for n in range(10)]
            sessions = {conn.request("SESSION")[0] for _ in range(3)}
            return answers, sessions
        finally:
            conn.close()

    with ThreadPoolExecutor(20) as pool:
        results = list(pool.map(client, range(20)))
    backends = set()
    for i, (answers, sessions) in enumerate(results):
        assert answers == [[f"ROW client {i} query {n}", "DONE"] for n in range(10)]
        backends |= sessions
    assert 1 <= len(backends) <= 2, backends       # 20 clients, never more than the pool's 2 backend connections


def test_a_transaction_keeps_its_backend(proxy):
    holder = EchoConnection(proxy.address("echo"))
    others = [EchoConnection(proxy.address("echo")) for _ in range(3)]
    try:
        assert holder.request("BEGIN") == ["DONE TX"]
        mine = holder.request("SESSION")[0]
        for _ in range(3):
            # While the transaction is open its backend serves nobody else; the others share the second one.
            for other in others:
                assert other.request("SESSION")[0] != mine
            assert holder.request("SESSION") == [mine, "DONE TX"]
        assert holder.request("QUERY inside") == ["ROW inside", "DONE TX"]
        assert holder.request("COMMIT") == ["DONE"]
        # After COMMIT the backend went back to the pool: the holder's next request may land anywhere.
        assert holder.request("QUERY after") == ["ROW after", "DONE"]
    finally:
        for conn in [holder, *others]:
            conn.close()


def test_cancel_interrupts_a_sleep_through_the_proxy(proxy):
    conn = EchoConnection(proxy.address("echo"))
    try:
        _, session_id, secret = conn.greeting.split()
        conn.sock.sendall(b"SLEEP 30\n")
        time.sleep(0.5)
        started = time.monotonic()
        with socket.create_connection(proxy.address("echo"), timeout=5) as cancel:
            cancel.sendall(f"CANCEL {session_id} {secret}\n".encode())
        assert conn.file.readline() == b"ERROR canceling statement due to user request\n"
        assert conn.file.readline() == b"DONE\n"
        assert time.monotonic() - started < 10
    finally:
        conn.close()


BROKEN_SETUP = '''"""A deliberately broken engine plugin for multiproxy's tests: its engine lacks backend_login."""
from setuptools import setup

setup(name="multiproxy-broken-engine", version="0.0.1", py_modules=["multiproxy_broken"],
      entry_points={"multiproxy.engines": ["broken = multiproxy_broken:BrokenEngine"]})
'''

BROKEN_MODULE = '''"""An engine that forgot backend_login."""
from multiproxy.engine import Engine


class BrokenEngine(Engine):
    name = "broken"
    default_port = 7999
    description = "missing backend_login"

    def client_protocol(self, ctx):
        raise NotImplementedError("never reached")

    def cancel_script(self, target, server_state):
        raise NotImplementedError("never reached")

    def render_error(self, kind, message):
        return b"error\\n"
'''


def test_a_broken_plugin_stops_multiproxy_engines_with_a_clear_error(tmp_path):
    source = tmp_path / "multiproxy-broken-engine"
    source.mkdir()
    (source / "setup.py").write_text(BROKEN_SETUP)
    (source / "multiproxy_broken.py").write_text(BROKEN_MODULE)
    env = Venv(tmp_path / "venv")
    env.install(source)
    out = env.run("-m", "multiproxy", "engines")
    assert out.returncode != 0, out.stdout
    assert ("engine plugin 'broken' (multiproxy_broken:BrokenEngine) from distribution multiproxy-broken-engine: "
            "method `backend_login` is not implemented") in out.stderr, out.stderr


def test_set_pins_the_session_and_its_backend_is_reset_after(proxy):
    pinned = EchoConnection(proxy.address("echo"))
    assert pinned.request("SET colour blue") == ["DONE"]
    mine = pinned.request("SESSION")[0]
    other = EchoConnection(proxy.address("echo"))
    try:
        for _ in range(3):       # outside any transaction, yet the pinned session keeps its backend to itself
            assert other.request("SESSION")[0] != mine
            assert pinned.request("GET colour") == ["ROW blue", "DONE"]
    finally:
        other.close()
        pinned.close()
    # Hold both backends at once: neither still has the variable (the pinned one was sent RESET).
    holders = [EchoConnection(proxy.address("echo")) for _ in range(2)]
    try:
        for conn in holders:
            assert conn.request("BEGIN") == ["DONE TX"]
        sessions = {conn.request("SESSION")[0] for conn in holders}
        assert mine in sessions, sessions
        assert [conn.request("GET colour") for conn in holders] == [["ROW ", "DONE TX"]] * 2
        for conn in holders:
            assert conn.request("ROLLBACK") == ["DONE"]
    finally:
        for conn in holders:
            conn.close()
