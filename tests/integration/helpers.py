"""Small helpers the integration tests share: reading the admin server and reading raw sockets to the end."""
from __future__ import annotations

import json
import re
import socket
import threading
import time
import urllib.request

_SAMPLE = re.compile(r"^(\w+)(?:\{(.*)\})?\s+(\S+)$")


def run_clients(count: int, work, timeout: float = 120.0, together: bool = True) -> list[str]:
    """Run work(i) for i in range(count) in threads (started together behind a barrier unless `together` is
    False); the failures as text, so that a test asserts on all of them at once. Fails if any is still running."""
    failures: list[str] = []
    barrier = threading.Barrier(count) if together else None

    def body(i):
        try:
            if barrier is not None:
                barrier.wait(timeout)
            work(i)
        except Exception as exc:  # noqa: BLE001 - every failure is reported by the test
            failures.append(f"client {i}: {exc!r}")
    threads = [threading.Thread(target=body, args=(i,), daemon=True) for i in range(count)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    assert not any(thread.is_alive() for thread in threads), "clients still running"
    return failures


def metrics_text(proxy) -> str:
    """The proxy's /metrics page."""
    host, port = proxy.admin_address
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as response:
        return response.read().decode()


def metric(text: str, name: str, **labels) -> float | None:
    """The sum of the samples of `name` whose labels include `labels`; None when there is none."""
    total = None
    for line in text.splitlines():
        found = _SAMPLE.match(line)
        if not found or found.group(1) != name:
            continue
        have = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', found.group(2) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            total = (total or 0.0) + float(found.group(3))
    return total


def admin_status(proxy) -> dict:
    """The proxy's /status document."""
    host, port = proxy.admin_address
    with urllib.request.urlopen(f"http://{host}:{port}/status", timeout=5) as response:
        return json.load(response)


def read_until_closed(sock: socket.socket, timeout: float) -> tuple[bytes, bool]:
    """Everything the peer sends until it closes (True) or `timeout` passes (False)."""
    deadline = time.monotonic() + timeout
    data = b""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return data, False
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            return data, False
        except ConnectionResetError:
            return data, True
        if not chunk:
            return data, True
        data += chunk


def start_dns_server(zone: str):
    """The lab DNS server on a free loopback UDP port, serving `zone`; returns (process, port)."""
    import os
    import subprocess
    import sys
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.Popen([sys.executable, "-m", "multiproxy.lab.dns_server", "--port", str(port), "--zone", zone],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=repo)
    line = proc.stdout.readline()
    assert b"dns server on" in line, line
    return proc, port


def drill_proxy_config(cluster: str, engine: str, port: int, dns_port: int, *, probe_interval: float = 0.5,
                       probe_user: str = "app", credentials: list | None = None) -> dict:
    """A proxy following `writer.CLUSTER.lab`/`reader.CLUSTER.lab` on the drill's DNS server, with a writer
    listener `w` and a reader listener `r`."""
    from .proxy import free_port
    config = {
        "engine": engine, "hosts": [],
        "endpoints": {"writer": f"writer.{cluster}.lab:{port}", "reader": f"reader.{cluster}.lab:{port}"},
        "dns": {"nameserver": f"127.0.0.1:{dns_port}", "ttl_floor": 1.0, "ttl_ceiling": 30.0},
        "health": {"probe_interval": probe_interval, "failure_threshold": 1, "probe_user": probe_user},
        "backend": {"tls": "disable", "connect_timeout": 2.0},
        "pool": {"mode": "transaction", "max_size": 5, "borrow_timeout": 20.0},
    }
    if credentials:
        config["credentials"] = credentials
    return {
        "proxy": {"admin_listen": f"127.0.0.1:{free_port()}", "log_level": "info"},
        "clusters": {cluster: config},
        "listeners": [
            {"name": "w", "listen": f"127.0.0.1:{free_port()}", "cluster": cluster, "role": "writer", "auth": "trust"},
            {"name": "r", "listen": f"127.0.0.1:{free_port()}", "cluster": cluster, "role": "reader", "auth": "trust"}],
    }
