"""Small helpers the integration tests share: reading the admin server and reading raw sockets to the end."""
from __future__ import annotations

import json
import re
import socket
import time
import urllib.request

_SAMPLE = re.compile(r"^(\w+)(?:\{(.*)\})?\s+(\S+)$")


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
