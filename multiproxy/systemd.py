"""Tells the service manager (systemd, Type=notify) the proxy's state through $NOTIFY_SOCKET: ready, reloading, stopping.

Standard library only: one datagram to the AF_UNIX socket named by NOTIFY_SOCKET (a leading '@' names the
abstract namespace). Without NOTIFY_SOCKET every call does nothing, so the proxy runs the same outside systemd.
"""
from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger("multiproxy.systemd")


def notify_address(value: str | None) -> str | bytes | None:
    """The socket address NOTIFY_SOCKET names: a path, or (with '@') an abstract-namespace name; None when unset
    or not an AF_UNIX address (systemd also allows vsock addresses, which the proxy does not speak)."""
    if not value:
        return None
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    return None


def message(*fields: str, **values) -> bytes:
    """A notification: one 'KEY=value' line per field, e.g. message('READY=1', STATUS='serving') ->
    b'READY=1\\nSTATUS=serving'. Values are single lines (a newline would start another field)."""
    lines = list(fields)
    for key, value in values.items():
        text = str(value)
        if "\n" in text:
            raise ValueError(f"{key}: a notification value is one line")
        lines.append(f"{key}={text}")
    return "\n".join(lines).encode()


def notify(*fields: str, **values) -> bool:
    """Send the fields to the service manager; True when sent. Never raises: a manager that is gone must not stop
    the proxy (the failure is logged once per call)."""
    address = notify_address(os.environ.get("NOTIFY_SOCKET"))
    if address is None:
        return False
    try:
        data = message(*fields, **values)
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(data, address)
        return True
    except (OSError, ValueError) as exc:
        log.warning("could not notify the service manager through NOTIFY_SOCKET=%s: %s",
                    os.environ.get("NOTIFY_SOCKET"), exc)
        return False


def ready(status: str = "") -> bool:
    """Every listener is bound (and, with workers, every worker is serving)."""
    return notify("READY=1", **({"STATUS": status} if status else {}))


def reloading() -> bool:
    """A reload starts; systemd (Type=notify-reload, or ExecReload with Type=notify) waits for ready() again.
    MONOTONIC_USEC is the time of the request, which systemd 253+ requires alongside RELOADING=1."""
    return notify("RELOADING=1", MONOTONIC_USEC=time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000)


def stopping() -> bool:
    """The proxy has begun its graceful drain (proxy.shutdown_timeout)."""
    return notify("STOPPING=1", STATUS="draining clients")
