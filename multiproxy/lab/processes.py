"""Process helpers for the lab: free ports, parent-death signals, and stopping a process tree by pid."""
from __future__ import annotations

import ctypes
import glob
import os
import signal
import socket
import time

PR_SET_PDEATHSIG = 1


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on `host` that was free a moment ago (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def die_with_parent(sig: int) -> None:
    """In a child before exec: ask the kernel to send `sig` when the parent dies, however it dies."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: the parent's own cleanup is the only safety net


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat after the command name (field 3 onwards), or None when there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot: with the pid, it names one process for good."""
    fields = _stat_fields(pid)
    return int(fields[19]) if fields else None


def alive(pid: int, started: int | None = None) -> bool:
    """True when `pid` runs and is not a zombie; with `started`, only if it is still the same process."""
    fields = _stat_fields(pid)
    if fields is None or fields[0] == "Z":
        return False
    return started is None or int(fields[19]) == started


def children(pid: int) -> list[int]:
    """Pids whose parent is `pid` (Linux /proc; empty elsewhere)."""
    found = []
    for entry in glob.glob("/proc/[0-9]*/stat"):
        child = int(entry.split("/")[2])
        fields = _stat_fields(child)
        if fields and int(fields[1]) == pid:
            found.append(child)
    return found


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _reap(pid: int) -> None:
    """Collect our own child's exit status so that it does not linger as a zombie (no-op otherwise)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def stop_process(pid: int, started: int | None = None, first: int = signal.SIGTERM, timeout: float = 15.0,
                 group: bool = False) -> bool:
    """Send `first`, wait up to `timeout` s, then SIGKILL the process and its children (and its group).

    `started` (from start_time) guards against a recycled pid: a different process is left alone.
    PostgreSQL backends call setsid(), so children are killed by pid, not only through the group.
    Returns True when the process was running.
    """
    if not alive(pid, started):
        _reap(pid)
        return False
    (_killpg if group else _kill)(pid, first)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _reap(pid)
        if not alive(pid):
            break
        time.sleep(0.05)
    else:
        for child in children(pid):
            _kill(child, signal.SIGKILL)
        _kill(pid, signal.SIGKILL)
    if group:  # forked workers that outlived their parent
        _killpg(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while alive(pid) and time.monotonic() < deadline:
        _reap(pid)
        time.sleep(0.05)
    return True


def free_port_on(*hosts: str) -> int:
    """A TCP port free on every one of `hosts` (lab nodes listen on their own loopback address, same port)."""
    for _ in range(50):
        port = free_port(hosts[0])
        try:
            for host in hosts[1:]:
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                    s.bind((host, port))
        except OSError:
            continue
        return port
    raise RuntimeError(f"no TCP port free on all of {', '.join(hosts)}")


def free_udp_port(host: str = "127.0.0.1") -> int:
    """A UDP port on `host` that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]
