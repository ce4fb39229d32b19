"""Runs `python -m multiproxy run -c FILE` as a subprocess with a generated config, for integration tests."""
from __future__ import annotations

import atexit
import ctypes
import datetime
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
import uuid

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


START_ATTEMPTS = 3        # ProxyProcess.start: tries when a free_port() was taken before the proxy bound it


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- a small TOML writer: enough for proxy configs (tables, arrays of tables, scalars, arrays) -----

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _key(key: str) -> str:
    return key if _BARE_KEY.match(key) else _string(key)


def _string(value: str) -> str:
    escaped = []
    for ch in value:
        if ch in ('"', "\\"):
            escaped.append("\\" + ch)
        elif ch == "\n":
            escaped.append("\\n")
        elif ch == "\t":
            escaped.append("\\t")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            escaped.append(f"\\u{ord(ch):04x}")
        else:
            escaped.append(ch)
    return '"' + "".join(escaped) + '"'


def _value(value, path: str) -> str:
    if isinstance(value, bool):  # before int: bool is an int
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        if isinstance(value, float) and value != value:
            return "nan"
        if isinstance(value, float) and value in (float("inf"), float("-inf")):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, (datetime.datetime, datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_value(v, f"{path}[{i}]") for i, v in enumerate(value)) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_key(k)} = {_value(v, f'{path}.{k}')}" for k, v in value.items()) + "}"
    raise TypeError(f"{path}: cannot write {type(value).__name__} {value!r} as TOML")


def _is_table_array(value) -> bool:
    return isinstance(value, (list, tuple)) and bool(value) and all(isinstance(v, dict) for v in value)


def render_toml(data: dict) -> str:
    """Render nested dicts as TOML: scalars first, then [tables] and [[arrays of tables]], recursively."""
    out: list[str] = []
    _render_table(data, [], out)
    return "\n".join(out).lstrip("\n") + "\n"


def _render_table(table: dict, prefix: list[str], out: list[str]) -> None:
    dotted = ".".join(_key(k) for k in prefix)
    for key, value in table.items():
        if value is None:
            continue  # TOML has no null: leave the key out, so the default applies
        if not isinstance(value, dict) and not _is_table_array(value):
            out.append(f"{_key(key)} = {_value(value, '.'.join([*prefix, key]))}")
    for key, value in table.items():
        if isinstance(value, dict):
            out += ["", f"[{dotted + '.' if dotted else ''}{_key(key)}]"]
            _render_table(value, [*prefix, key], out)
        elif _is_table_array(value):
            for item in value:
                out += ["", f"[[{dotted + '.' if dotted else ''}{_key(key)}]]"]
                _render_table(item, [*prefix, key], out)


# -- the proxy process ---------------------------------------------------------------------------

def _die_with_parent() -> None:
    """Ask the kernel to SIGTERM the proxy when the test process dies, however it dies."""
    try:
        ctypes.CDLL(None).prctl(1, int(signal.SIGTERM), 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port)


class ProxyProcess:
    """One multiproxy process: writes the config into a work dir, starts it, waits for its listeners."""

    def __init__(self, config: str | dict, workdir: str | None = None, env: dict[str, str] | None = None,
                 files: dict[str, str] | None = None, argv: list[str] | None = None,
                 startup_timeout: float = 15.0):
        """`files` are written next to the config (e.g. users.toml); `argv` replaces the proxy command
        (the config path is appended), for testing this fixture itself."""
        self._own_workdir = workdir is None
        self.workdir = workdir or tempfile.mkdtemp(prefix="mp-proxy-")
        os.makedirs(self.workdir, exist_ok=True)
        self.config_text = config if isinstance(config, str) else render_toml(config)
        self.config = tomllib.loads(self.config_text)  # also rejects a malformed config early
        self._choose_relay(os.environ.get("MULTIPROXY_TEST_RELAY", ""))
        self.config_path = os.path.join(self.workdir, "multiproxy.toml")
        self.log_path = os.path.join(self.workdir, "proxy.log")
        self.env = dict(env or {})
        self.files = dict(files or {})
        self.argv = list(argv) if argv else [sys.executable, "-m", "multiproxy", "run", "-c"]
        self.startup_timeout = startup_timeout
        self._proc: subprocess.Popen | None = None
        self._notify: socket.socket | None = None      # where the proxy's READY=1 arrives (see _wait_ready)
        self.returncode: int | None = None

    def _choose_relay(self, relay: str) -> None:
        """MULTIPROXY_TEST_RELAY=compiled runs every proxy of the suite with [proxy] relay = "compiled" (where the
        config does not choose, and the config allows it: not with worker custody over several workers)."""
        proxy = self.config.get("proxy", {})
        if not relay or "relay" in proxy or (proxy.get("workers", 1) > 1 and proxy.get("worker_custody", True)):
            return
        if "proxy" in self.config:
            lines = self.config_text.splitlines()
            at = next((i for i, line in enumerate(lines) if line.strip() == "[proxy]"), None)
            if at is None:
                return      # a [proxy] table written some other way: left as it is
            lines.insert(at + 1, f"relay = {_string(relay)}")
            self.config_text = "\n".join(lines) + "\n"
        else:
            self.config_text += f"\n[proxy]\nrelay = {_string(relay)}\n"
        self.config = tomllib.loads(self.config_text)

    # -- addresses from the config -------------------------------------------------------------

    @property
    def listeners(self) -> dict[str, tuple[str, int]]:
        """Listener name → (host, port), in config order."""
        return {item.get("name", f"listeners[{i}]"): _split_address(item["listen"])
                for i, item in enumerate(self.config.get("listeners", []))}

    @property
    def port(self) -> int:
        """The first listener's port."""
        return next(iter(self.listeners.values()))[1]

    @property
    def host(self) -> str:
        return next(iter(self.listeners.values()))[0]

    def address(self, listener: str) -> tuple[str, int]:
        return self.listeners[listener]

    @property
    def admin_address(self) -> tuple[str, int] | None:
        admin = self.config.get("proxy", {}).get("admin_listen", "")
        return _split_address(admin) if admin else None

    # -- lifecycle -----------------------------------------------------------------------------

    def write_file(self, name: str, text: str) -> str:
        """Write a file into the work dir (relative paths in the config resolve against it). A new text of the
        config file itself gets MULTIPROXY_TEST_RELAY's setting too (a reload must not see it go)."""
        path = os.path.join(self.workdir, name)
        if path == self.config_path and os.environ.get("MULTIPROXY_TEST_RELAY"):
            self.config_text = text
            self.config = tomllib.loads(text)
            self._choose_relay(os.environ.get("MULTIPROXY_TEST_RELAY", ""))
            text = self.config_text
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return path

    def start(self) -> "ProxyProcess":
        """Start the process and wait until it serves; raise with the log's tail if not. free_port() only promises a
        port that was free a moment ago: when another process took one before the proxy bound it (the proxy exits
        naming the address in use), the listeners and the admin server get fresh ports and the start is tried again,
        up to START_ATTEMPTS times (read the addresses from this object, not from the config given)."""
        if self._proc is not None:
            return self
        for attempt in range(1, START_ATTEMPTS + 1):
            log_offset = os.path.getsize(self.log_path) if os.path.exists(self.log_path) else 0
            try:
                return self._start_once()
            except RuntimeError:
                if attempt == START_ATTEMPTS or not self._lost_a_port(log_offset):
                    raise
                self._pick_fresh_ports()
        raise AssertionError("unreachable")

    def _lost_a_port(self, log_offset: int) -> bool:
        if not self._runs_multiproxy():
            return False
        with open(self.log_path, "rb") as f:
            f.seek(log_offset)
            return b"already in use" in f.read()

    def _pick_fresh_ports(self) -> None:
        for listener in self.config.get("listeners", []):
            host, _ = _split_address(listener["listen"])
            listener["listen"] = f"{host}:{free_port()}"
        proxy = self.config.get("proxy", {})
        if proxy.get("admin_listen"):
            host, _ = _split_address(proxy["admin_listen"])
            proxy["admin_listen"] = f"{host}:{free_port()}"
        self.config_text = render_toml(self.config)

    def _start_once(self) -> "ProxyProcess":
        self.write_file(os.path.basename(self.config_path), self.config_text)
        for name, text in self.files.items():
            self.write_file(name, text)
        env = {**os.environ, **self.env}
        if self._runs_multiproxy() and "NOTIFY_SOCKET" not in self.env:
            # The proxy's own READY=1 (multiproxy.systemd) is the proof it serves: see _wait_ready.
            self._notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            name = f"mp-test-ready-{os.getpid()}-{uuid.uuid4().hex[:12]}"
            self._notify.bind(b"\0" + name.encode())
            env["NOTIFY_SOCKET"] = "@" + name
        env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, env.get("PYTHONPATH")) if p)
        env.setdefault("PYTHONUNBUFFERED", "1")
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                [*self.argv, self.config_path], stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, cwd=self.workdir, env=env,
                process_group=0,  # lets stop() reach forked workers; Ctrl-C stays with pytest
                preexec_fn=_die_with_parent)
        atexit.register(self.stop)
        try:
            self._wait_listening()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_listening(self) -> None:
        addresses = list(self.listeners.values())
        if not addresses:
            raise RuntimeError(f"{self.config_path}: no [[listeners]] to wait for")
        if self.admin_address is not None:
            # The admin server starts after the listeners: tests read /status as soon as start() returns.
            addresses.append(self.admin_address)
        deadline = time.monotonic() + self.startup_timeout
        pending = list(addresses)
        while pending:
            if self._proc.poll() is not None:
                raise RuntimeError(f"multiproxy exited with {self._proc.returncode} while starting; "
                                   f"log tail:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"multiproxy not listening on {pending} after {self.startup_timeout}s; "
                                   f"log tail:\n{self.log_tail()}")
            try:
                with socket.create_connection(pending[0], timeout=0.5):
                    pending.pop(0)
            except OSError:
                time.sleep(0.05)
        if self._notify is not None:
            self._wait_ready(deadline)

    def _runs_multiproxy(self) -> bool:
        return "multiproxy" in self.argv and "run" in self.argv

    def _wait_ready(self, deadline: float) -> None:
        """A port that accepts may belong to another process that took it between free_port() and the proxy's bind
        (the proxy then exits on its own bind error): the READY=1 the proxy sends its service manager once every
        listener is bound (and, with workers, every worker serves) is the proof it serves. The socket stays open
        until stop(), so later notifications (RELOADING, STOPPING) find it."""
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(f"multiproxy exited with {self._proc.returncode} while starting; "
                                   f"log tail:\n{self.log_tail()}")
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"multiproxy did not notify READY=1 after {self.startup_timeout}s; "
                                   f"log tail:\n{self.log_tail()}")
            self._notify.settimeout(min(left, 0.2))
            try:
                fields = self._notify.recv(4096).decode(errors="replace").split("\n")
            except socket.timeout:
                continue
            if "READY=1" in fields:
                return

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL the process group after `timeout` seconds; return the exit code."""
        proc, self._proc = self._proc, None
        atexit.unregister(self.stop)
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        try:  # forked workers that outlived their master, or a master that ignored SIGTERM
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.returncode = proc.wait()
        if self._notify is not None:
            self._notify.close()
            self._notify = None
        return self.returncode

    def cleanup(self) -> None:
        """Stop, and remove the work dir when this object created it."""
        self.stop()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "ProxyProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.cleanup()

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def send_signal(self, sig: int) -> None:
        """E.g. SIGHUP for a reload test."""
        self._proc.send_signal(sig)

    def log_text(self) -> str:
        """Everything the proxy wrote to stdout and stderr so far."""
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])
