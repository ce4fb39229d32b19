"""Process helpers for the lab: free ports, parent-death signals, stopping a process tree by pid, and running a private server."""
from __future__ import annotations

import atexit
import ctypes
import glob
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from typing import Self

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


def reachable_by(path: str, pw: pwd.struct_passwd) -> bool:
    """True when the OS user `pw` may traverse every directory from / down to `path` (needs x on each)."""
    groups = set(os.getgrouplist(pw.pw_name, pw.pw_gid))
    path = os.path.realpath(path)
    while True:
        st = os.stat(path)
        if st.st_uid == pw.pw_uid:
            bit = stat.S_IXUSR
        elif st.st_gid in groups:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if pw.pw_uid != 0 and not st.st_mode & bit:
            return False
        parent = os.path.dirname(path)
        if parent == path:
            return True
        path = parent


class PortTaken(RuntimeError):
    """The server exited at start because its port was taken; the message is the log's tail."""


class ServerProcess:
    """One private database server process in its own directory, on a loopback address and port.

    What every engine shares: the directory (temporary unless `basedir` is given; removed at stop()
    unless `keep_datadir`), running as the engine's OS user when we are root, a free port with retries
    when the server finds it taken, waiting until it accepts connections (the log's tail on failure),
    stopping with a signal and a timeout, the kernel's parent-death signal (unless `die_with_parent`
    is False, for a server meant to outlive its starter, which calls detach()), and cleanup at exit.
    A subclass sets the class attributes below and provides _init_datadir(), _command() and _ready().
    """

    host = "127.0.0.1"
    product = "server"             # in messages: "PostgreSQL could not bind a port ..."
    program = "server"             # in messages: "postgres exited with 1 while starting ..."
    os_user = ""                   # the OS user the server runs as when we are root
    dir_prefix = "mp-server-"      # of a temporary basedir
    dir_mode = 0o700
    stop_signal = signal.SIGTERM   # asks for a clean shutdown
    parent_death_signal = signal.SIGKILL
    bind_errors: tuple[str, ...] = ("Address already in use",)  # in the log: the port was taken
    poll_interval = 0.1            # between readiness probes
    port_attempts = 5
    retry_fixed_port = True        # False: a fixed port that is taken fails at once (PortTaken)

    def __init__(self, basedir: str | None = None, keep_datadir: bool = False, die_with_parent: bool = True,
                 host: str | None = None, port: int | None = None):
        if host is not None:
            self.host = host              # any 127.x address: failover drills give each node its own
        self.fixed_port = port
        self.keep_datadir = keep_datadir
        self.die_with_parent = die_with_parent
        self.port: int | None = None
        self.basedir: str | None = basedir
        self.datadir: str | None = None
        self.logfile: str | None = None
        self._proc: subprocess.Popen | None = None
        self._pid: int | None = None
        self._as_os_user = os.geteuid() == 0
        self._pw = pwd.getpwnam(self.os_user) if self._as_os_user else None

    # -- what a subclass provides --------------------------------------------------------------

    def _make_dirs(self) -> None:
        """Make the base directory (_make_basedir) and the engine's files and directories in it."""
        self._make_basedir()

    def _init_datadir(self) -> None:
        """Create the data directory's contents (initdb and the like), once, before the first launch."""

    def _command(self) -> list[str]:
        """The server's command line for self.port (anything the port goes into is written here)."""
        raise NotImplementedError

    def _popen_kwargs(self) -> dict:
        """More keyword arguments for Popen (env, user): none by default."""
        return {}

    def _stdout_path(self) -> str:
        """Where the server's stdout and stderr go."""
        return self.logfile

    def _ready(self) -> bool:
        """True once the server answers a query."""
        raise NotImplementedError

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self, timeout: float = 60.0) -> Self:
        """Make the directory and data, then start the server on a free (or the given) port and wait until
        it answers; on any failure, stop and clean up."""
        if self._proc is not None:
            return self
        atexit.register(self.stop)
        try:
            self._make_dirs()
            self._init_datadir()
            last_error = ""
            for _attempt in range(self.port_attempts):  # the free port can be taken between probing and binding
                self.port = self.fixed_port or free_port(self.host)
                try:
                    self._launch(timeout)
                    return self
                except PortTaken as exc:
                    if self.fixed_port and not self.retry_fixed_port:
                        raise
                    last_error = str(exc).strip().splitlines()[-1]
            raise RuntimeError(f"{self.product} could not bind a port after {self.port_attempts} attempts: "
                               f"{last_error}")
        except BaseException:
            self.stop()
            raise

    def stop(self, timeout: float = 30.0) -> None:
        """Send stop_signal; SIGKILL the server and its children if it lingers; remove the directory."""
        self._stop_process(timeout)
        atexit.unregister(self.stop)
        if self.basedir and not self.keep_datadir:
            shutil.rmtree(self.basedir, ignore_errors=True)
            self.basedir = None

    def stop_keeping_data(self, timeout: float = 30.0) -> None:
        """Stop the server as stop() does (PostgreSQL: a fast shutdown) but keep its directory, data and port, for
        start_again(): an outage under whatever is connected to it."""
        self._stop_process(timeout)

    def start_again(self, timeout: float = 60.0) -> Self:
        """Start a server stopped by stop_keeping_data() on the same port with the same data, and wait until it
        answers. PortTaken when another process took the port meanwhile."""
        if self._proc is not None:
            return self
        if not self.basedir or not self.port:
            raise RuntimeError(f"{self.product}: start_again() needs a server stopped by stop_keeping_data()")
        self._launch(timeout)
        return self

    def _stop_process(self, timeout: float) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(self.stop_signal)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                # PostgreSQL backends call setsid(), so killing the process group is not enough.
                for pid in [*children(proc.pid), proc.pid]:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                proc.wait()
        self._pid = None

    def detach(self) -> tuple[int, int | None]:
        """Leave the server running after this process exits; returns (pid, start_time) to stop it by later."""
        atexit.unregister(self.stop)
        self._proc = None  # stop() must not touch it any more
        return self._pid, start_time(self._pid)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        if self._proc is not None:
            return self._proc.poll() is None
        return self._pid is not None and alive(self._pid)

    @property
    def pid(self) -> int | None:
        return self._pid

    def log_text(self) -> str:
        """The server's log so far."""
        try:
            with open(self.logfile, encoding="utf-8", errors="replace") as f:
                return f.read()
        except (OSError, TypeError):
            return ""

    # -- internals ------------------------------------------------------------------------------

    def _make_basedir(self) -> None:
        """self.basedir, made if missing (a temporary one the OS user can reach if None), owned by the OS user."""
        if self.basedir is None:
            base = tempfile.gettempdir()
            if self._as_os_user and not reachable_by(base, self._pw):
                base = "/tmp"  # e.g. TMPDIR under /root: the server's OS user could not reach it
            self.basedir = tempfile.mkdtemp(prefix=self.dir_prefix, dir=base)
        else:
            os.makedirs(self.basedir, mode=self.dir_mode, exist_ok=True)
        if self._as_os_user:
            os.chmod(self.basedir, self.dir_mode)
            self._chown(self.basedir)

    def _chown(self, *paths: str) -> None:
        """Give `paths` to the server's OS user when we are root (no-op otherwise)."""
        if self._as_os_user:
            for path in paths:
                os.chown(path, self._pw.pw_uid, self._pw.pw_gid)

    def _launch(self, timeout: float) -> None:
        argv = self._command()
        preexec = (lambda: die_with_parent(self.parent_death_signal)) if self.die_with_parent else None
        with open(self._stdout_path(), "ab") as log:
            self._proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                cwd=self.basedir, process_group=0,  # Ctrl-C stays with our terminal
                preexec_fn=preexec, **self._popen_kwargs())
        self._pid = self._proc.pid
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                proc, self._proc, self._pid = self._proc, None, None
                tail = self.log_text()[-3000:]
                if any(marker in tail for marker in self.bind_errors):
                    raise PortTaken(tail)
                raise RuntimeError(f"{self.program} exited with {proc.returncode} while starting; log:\n{tail}")
            if self._ready():
                return
            time.sleep(self.poll_interval)
        raise RuntimeError(f"{self.program} did not accept connections within {timeout}s; log:\n"
                           f"{self.log_text()[-3000:]}")
