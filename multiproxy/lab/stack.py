"""The lab as a whole: its directory and lab.json, the generated proxy config, and up / down / env / status."""
from __future__ import annotations

import contextlib
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

from ..auth import UsersFile
from . import postgres
from .parts import PARTS, LabPart, LabPartError, proxy_toml
from .dns_server import write_zone
from .processes import alive, die_with_parent, free_port, free_udp_port, start_time, stop_process

STATE_FILE = "lab.json"
CONFIG_FILE = "multiproxy.toml"
USERS_FILE = "users.toml"
PASSWORD_FILE = "lab-password"  # the backend password, for the proxy's password_file (mode 0600)
ZONE_FILE = "dns-zone.json"  # the lab DNS server's records; `lab failover` rewrites it
DNS_TTL = 5  # seconds, as Aurora's cluster endpoints
LAB_USER = "lab"
LAB_DATABASE = "lab"
HOST = "127.0.0.1"
PROXY_START_TIMEOUT = 30.0
PROXY_STOP_TIMEOUT = 10.0  # after SIGTERM; the generated config drains for 5 s
SERVER_STOP_TIMEOUT = 15.0


class LabError(Exception):
    """A lab command cannot do its job; the message says what happened and what to do next."""


def default_dir() -> str:
    return os.environ.get("MULTIPROXY_LAB_DIR") or os.path.join(os.path.expanduser("~"), ".multiproxy", "lab")


def _write_private(path: str, text: str) -> None:
    """Write a file only its owner can read, atomically (no moment where it is world-readable)."""
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=os.path.dirname(path))
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def load_state(lab_dir: str) -> dict | None:
    try:
        with open(os.path.join(lab_dir, STATE_FILE), encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise LabError(f"{os.path.join(lab_dir, STATE_FILE)}: unreadable ({exc}); remove {lab_dir} by hand") from None


def processes(state: dict) -> list[dict]:
    """Every process the lab recorded, in stop order: the proxy first, then each engine's readers, then writers,
    then the DNS server."""
    found = []
    if state.get("proxy", {}).get("pid"):
        found.append({"name": "multiproxy", **state["proxy"]})
    for engine, part in state.get("engines", {}).items():
        for node in reversed(part.get("nodes", [])):
            if node.get("pid"):
                found.append({**node, "name": f"{engine} {node['name']}"})
    if state.get("dns", {}).get("pid"):
        found.append({"name": "dns", **state["dns"]})
    return found


def zone_records(state: dict) -> dict[str, dict]:
    """The DNS records of every engine's endpoints, from the nodes' roles in the lab state."""
    records = {}
    for engine, part_state in state.get("engines", {}).items():
        if engine in PARTS and part_state.get("nodes"):
            records.update(PARTS[engine].dns_records(part_state))
    return records


def _busy(state: dict) -> bool:
    """True while another lab command (a failover) changes the lab's processes."""
    busy = state.get("busy")
    return bool(busy) and alive(busy["pid"], busy.get("started"))


def running(state: dict) -> list[dict]:
    return [p for p in processes(state) if alive(p["pid"], p.get("started"))]


class Progress:
    """Prints one line per start-up step: what starts, then ok with a detail and the time it took."""

    def __init__(self, out):
        self.out = out

    @contextlib.contextmanager
    def __call__(self, label: str):
        step = _Step()
        started = time.monotonic()
        self.out(f"  {label} ...", nl=False)
        try:
            yield step
        except BaseException:
            self.out(" failed")
            raise
        self.out(f" ok{' ' + step.detail if step.detail else ''} ({time.monotonic() - started:.1f} s)")


class _Step:
    detail = ""

    def done(self, detail: str) -> None:
        self.detail = detail


def _echo(text: str, nl: bool = True) -> None:
    sys.stdout.write(text + ("\n" if nl else ""))
    sys.stdout.flush()


class Lab:
    """One lab in one directory. `up` builds it; the other commands read its lab.json."""

    def __init__(self, lab_dir: str | None = None, out=_echo):
        self.dir = os.path.abspath(os.path.expanduser(lab_dir or default_dir()))
        self.out = out
        self.parts: list[LabPart] = []
        self.proxy: subprocess.Popen | None = None
        self.dns: subprocess.Popen | None = None
        self.state: dict = {}

    # -- up -------------------------------------------------------------------------------------

    def up(self, engines: list[str], detach: bool) -> int:
        """Start everything; with detach return at once, else serve until Ctrl-C and then stop everything."""
        unknown = [e for e in engines if e not in PARTS]
        if unknown:
            raise LabError(f"--engines: {', '.join(unknown)} not available in the lab (available: {', '.join(PARTS)})")
        self._claim_dir()
        password = secrets.token_urlsafe(18)
        data_dir = self._make_data_dir()
        self.state = {"version": 1, "dir": self.dir, "data_dir": data_dir, "detached": detach,
                      "user": LAB_USER, "password": password, "database": LAB_DATABASE, "engines": {}}
        self.parts = [PARTS[e](data_dir, LAB_USER, password, LAB_DATABASE, detach) for e in engines]
        progress = Progress(self.out)
        self.out(f"multiproxy lab in {self.dir}")
        try:
            for part in self.parts:
                part.check_installed()
            for part in self.parts:
                part.start(progress)
                self.state["engines"][part.engine] = part.state()
                self._save()
            self._start_dns(progress, detach)
            self._start_proxy(progress, detach)
            for part in self.parts:
                for role in ("writer", "reader"):
                    listener = self.state["engines"][part.engine]["listeners"][role]
                    with progress(f"query through {listener['name']}") as step:
                        part.check_query(listener["address"], self.state)
                        step.done("")
        except BaseException as exc:
            self._stop_started()
            self._remove()
            if isinstance(exc, (LabPartError, postgres.PostgresNotInstalled)):
                raise LabError(str(exc)) from None
            if isinstance(exc, RuntimeError):
                raise LabError(f"the lab did not start: {exc}") from None
            raise
        if detach:
            # Detach before printing: a closed stdout must not take the servers down with us.
            for part in self.parts:
                part.detach_processes()
                self.state["engines"][part.engine].update(part.state())
            self._save()
            self._print_endpoints(detach)
            return 0
        try:
            self._print_endpoints(detach)
        except BaseException:
            self._stop_started()
            self._remove()
            raise
        return self._serve()

    def _claim_dir(self) -> None:
        state = load_state(self.dir)
        if state is not None:
            if running(state):
                raise LabError(f"a lab already runs in {self.dir}; stop it with `multiproxy lab down --dir {self.dir}` "
                               "or choose another --dir")
            self.out(f"removing the leftovers of a stopped lab in {self.dir}")
            self._down(state, keep=False)
        elif os.path.isdir(self.dir) and os.listdir(self.dir):
            raise LabError(f"{self.dir} exists and is not a lab directory (no {STATE_FILE}); choose another --dir")
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        os.chmod(self.dir, 0o700)

    def _make_data_dir(self) -> str:
        """DIR/data, owned by the OS user the servers run as; under /tmp (linked from DIR/data) when that user
        cannot reach DIR, e.g. root's home."""
        link = os.path.join(self.dir, "data")
        if os.geteuid() != 0:
            os.makedirs(link, mode=0o700, exist_ok=True)
            return link
        # As root, each server's own directory below is private to its OS user (postgres, mysql): this one
        # only needs to be passable (0711).
        pw = pwd.getpwnam(postgres.OS_USER)
        os.makedirs(link, mode=0o711, exist_ok=True)
        os.chown(link, pw.pw_uid, pw.pw_gid)
        os.chmod(link, 0o711)
        if postgres.reachable_by(link, pw):
            return link
        os.rmdir(link)
        real = tempfile.mkdtemp(prefix="multiproxy-lab-", dir="/tmp")
        os.chmod(real, 0o711)
        os.chown(real, pw.pw_uid, pw.pw_gid)
        os.symlink(real, link)
        return real

    def _child_env(self) -> dict[str, str]:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        return env

    def _start_dns(self, progress, detach: bool) -> None:
        """The DNS server that answers the clusters' writer and reader endpoints from DIR/dns-zone.json."""
        zone = os.path.join(self.dir, ZONE_FILE)
        write_zone(zone, zone_records(self.state), ttl=DNS_TTL)
        log_path = os.path.join(self.dir, "dns.log")
        with progress("DNS server (cluster endpoints)") as step:
            for _attempt in range(5):  # the free port can be taken between probing and binding
                port = free_udp_port(HOST)
                with open(log_path, "ab") as log:
                    self.dns = subprocess.Popen(
                        [sys.executable, "-m", "multiproxy.lab.dns_server", "--host", HOST, "--port", str(port),
                         "--zone", zone], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                        cwd=self.dir, env=self._child_env(), process_group=0,
                        preexec_fn=None if detach else (lambda: die_with_parent(signal.SIGTERM)))
                self.state["dns"] = {"pid": self.dns.pid, "started": start_time(self.dns.pid), "stop_signal": "SIGTERM",
                                     "address": f"{HOST}:{port}", "zone": zone, "ttl": DNS_TTL, "log": log_path}
                self._save()
                if self._wait_dns(port):
                    break
                self.dns.wait()
            else:
                raise RuntimeError(f"the DNS server did not answer; {log_path}:\n{_tail(log_path)}")
            for part in self.parts:
                part.dns_nameserver = self.state["dns"]["address"]
            step.done(f"{HOST}:{port} ({', '.join(sorted(zone_records(self.state)))}, TTL {DNS_TTL} s)")

    def _wait_dns(self, port: int, timeout: float = 15.0) -> bool:
        """True once the DNS server answers a query; False when it exited (e.g. its port was taken)."""
        import dns.message
        import dns.query
        name = next(iter(zone_records(self.state)), "writer.lab")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.dns.poll() is not None:
                return False
            try:
                dns.query.udp(dns.message.make_query(name, "A"), HOST, port=port, timeout=0.3)
                return True
            except Exception:  # dns.exception.Timeout, OSError: not ready yet
                time.sleep(0.05)
        return False

    def _start_proxy(self, progress, detach: bool) -> None:
        admin = f"{HOST}:{free_port(HOST)}"
        config = ["# Generated by `multiproxy lab up`; the lab rewrites it on every start.", proxy_toml(admin, USERS_FILE, self.state["user"])]
        for part in self.parts:
            listeners = {"writer": {"name": f"{part.cluster}-writer", "address": f"{HOST}:{free_port(HOST)}"},
                         "reader": {"name": f"{part.cluster}-reader", "address": f"{HOST}:{free_port(HOST)}"}}
            self.state["engines"][part.engine]["listeners"] = listeners
            config.append(part.config_toml(listeners["writer"]["address"], listeners["reader"]["address"],
                                           PASSWORD_FILE))
        users = UsersFile.empty()
        kinds = dict.fromkeys(kind for part in self.parts for kind in part.verifier_kinds)
        users.add(self.state["user"], self.state["password"], kinds=tuple(kinds))
        users.save(os.path.join(self.dir, USERS_FILE))
        _write_private(os.path.join(self.dir, PASSWORD_FILE), self.state["password"] + "\n")
        config_path = os.path.join(self.dir, CONFIG_FILE)
        _write_private(config_path, "\n".join(config))
        log_path = os.path.join(self.dir, "multiproxy.log")
        env = self._child_env()
        with progress("multiproxy") as step:
            with open(log_path, "ab") as log:
                self.proxy = subprocess.Popen(
                    [sys.executable, "-m", "multiproxy", "run", "-c", config_path], stdin=subprocess.DEVNULL,
                    stdout=log, stderr=subprocess.STDOUT, cwd=self.dir, env=env,
                    process_group=0,  # Ctrl-C stays with the terminal; down reaches forked workers
                    preexec_fn=None if detach else (lambda: die_with_parent(signal.SIGTERM)))
            self.state["proxy"] = {"pid": self.proxy.pid, "started": start_time(self.proxy.pid),
                                   "stop_signal": "SIGTERM", "group": True, "admin": admin,
                                   "config": config_path, "log": log_path}
            self._save()
            addresses = [admin] + [lst["address"] for part in self.state["engines"].values()
                                   for lst in part["listeners"].values()]
            self._wait_listening(addresses, log_path)
            step.done(f"admin http://{admin}")

    def _wait_listening(self, addresses: list[str], log_path: str) -> None:
        deadline = time.monotonic() + PROXY_START_TIMEOUT
        pending = list(addresses)
        while pending:
            if self.proxy.poll() is not None:
                raise RuntimeError(f"multiproxy exited with {self.proxy.returncode}; {log_path}:\n{_tail(log_path)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"multiproxy not listening on {', '.join(pending)} after {PROXY_START_TIMEOUT:.0f} s;"
                                   f" {log_path}:\n{_tail(log_path)}")
            host, _, port = pending[0].rpartition(":")
            try:
                with socket.create_connection((host, int(port)), timeout=0.5):
                    pending.pop(0)
            except OSError:
                time.sleep(0.05)

    def _save(self) -> None:
        _write_private(os.path.join(self.dir, STATE_FILE), json.dumps(self.state, indent=2) + "\n")

    def _print_endpoints(self, detach: bool) -> None:
        rows = [("endpoint", "address", "connect with")]
        for engine, part_state in self.state["engines"].items():
            part = PARTS[engine]
            urls = part.urls(part_state, self.state)
            for role, key in (("writer", f"MULTIPROXY_{part.env_prefix}_URL"),
                              ("reader", f"MULTIPROXY_{part.env_prefix}_READER_URL")):
                listener = part_state["listeners"][role]
                rows.append((f"{listener['name']} (proxy)", listener["address"], part.client_command(urls[key])))
            for node in part_state["nodes"]:
                address = f"{node['host']}:{node['port']}"
                direct = part.urls({**part_state, "nodes": [{**node, "role": "writer"}]}, self.state)
                rows.append((f"{engine} {node['name']} (direct, {node['role']})", address,
                             part.client_command(direct[f"MULTIPROXY_{part.env_prefix}_DIRECT_URL"])))
        admin = self.state["proxy"]["admin"]
        rows.append(("admin", admin, f"curl http://{admin}/metrics"))
        rows.append(("status page", f"http://{admin}/", "open in a browser"))
        if self.state.get("dns"):
            dns_host, _, dns_port = self.state["dns"]["address"].rpartition(":")
            first = next(iter(zone_records(self.state)), "")
            rows.append(("dns (cluster endpoints)", self.state["dns"]["address"], f"dig @{dns_host} -p {dns_port} {first}"))
        widths = [max(len(r[i]) for r in rows) for i in range(2)]
        self.out("")
        for i, row in enumerate(rows):
            self.out(f"  {row[0]:<{widths[0]}}  {row[1]:<{widths[1]}}  {row[2]}")
            if i == 0:
                self.out(f"  {'-' * widths[0]}  {'-' * widths[1]}  {'-' * 12}")
        dir_opt = "" if self.dir == os.path.abspath(default_dir()) else f" --dir {self.dir}"
        for part in self.parts:
            if part.client_tool and not shutil.which(part.client_tool):
                self.out(f"  ({part.client_tool} not found: install the Debian package '{part.client_package}')")
        self.out("")
        self.out(f'  in your shell:  eval "$(multiproxy lab env{dir_opt})"; psql')
        self.out(f"  status:         multiproxy lab status{dir_opt}")
        if detach:
            self.out(f"  stop:           multiproxy lab down{dir_opt}")
        else:
            self.out("  stop:           Ctrl-C (stops everything and removes the lab)")

    def _serve(self) -> int:
        """Foreground: wait for Ctrl-C (or SIGTERM/SIGHUP); stop everything if any process dies."""
        def interrupt(signum, frame):
            raise KeyboardInterrupt
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a shell may start us with SIGINT ignored
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, interrupt)
        code = 0
        try:
            while True:
                time.sleep(0.5)
                with contextlib.suppress(LabError):  # `lab failover` rewrites lab.json: follow it
                    self.state = load_state(self.dir) or self.state
                if _busy(self.state):
                    continue  # a failover stops and starts nodes on purpose
                dead = [p["name"] for p in processes(self.state) if not alive(p["pid"], p.get("started"))]
                if dead:
                    self.out(f"error: {', '.join(dead)} stopped unexpectedly (logs under {self.dir}); stopping the lab")
                    self.out(_tail(self.state["proxy"]["log"]))
                    code = 1
                    break
        except KeyboardInterrupt:
            self.out("\nstopping the lab")
        self._stop_started()
        self._remove()
        self.out("stopped")
        return code

    def _stop_started(self) -> None:
        """Stop what this process started, in order: proxy, then each part (its readers before its writer), then
        the DNS server; then whatever else lab.json records (nodes a failover rebuilt)."""
        if self.proxy is not None:
            stop_process(self.proxy.pid, first=signal.SIGTERM, timeout=PROXY_STOP_TIMEOUT, group=True)
            self.proxy.wait()
            self.proxy = None
        for part in reversed(self.parts):
            part.stop()
        if self.dns is not None:
            stop_process(self.dns.pid, first=signal.SIGTERM, timeout=5)
            self.dns.wait()
            self.dns = None
        for proc in processes(self.state):
            stop_process(proc["pid"], proc.get("started"), first=getattr(signal, proc.get("stop_signal", "SIGTERM")),
                         timeout=SERVER_STOP_TIMEOUT, group=proc.get("group", False))

    def _remove(self) -> None:
        data_dir = self.state.get("data_dir")
        if data_dir and os.path.abspath(data_dir) != os.path.join(self.dir, "data"):  # the /tmp dir DIR/data links to
            shutil.rmtree(data_dir, ignore_errors=True)
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- down -------------------------------------------------------------------------------------

    def down(self, keep: bool) -> int:
        state = load_state(self.dir)
        if state is None:
            self.out(f"no lab in {self.dir}; nothing to stop")
            return 0
        self._down(state, keep)
        self.out(f"stopped the lab in {self.dir}" + (f"; kept {self.dir}" if keep else ""))
        return 0

    def _down(self, state: dict, keep: bool) -> None:
        for proc in processes(state):
            sig = getattr(signal, proc.get("stop_signal", "SIGTERM"))
            timeout = PROXY_STOP_TIMEOUT if proc["name"] == "multiproxy" else SERVER_STOP_TIMEOUT
            if stop_process(proc["pid"], proc.get("started"), first=sig, timeout=timeout, group=proc.get("group", False)):
                self.out(f"  stopped {proc['name']} (pid {proc['pid']})")
        if keep:
            for proc in ([state.get("proxy", {}), state.get("dns", {})]
                         + [n for p in state.get("engines", {}).values() for n in p["nodes"]]):
                proc.pop("pid", None)
            self.state = state
            self._save()
        else:
            self.state = state
            self._remove()

    # -- env and status -----------------------------------------------------------------------------

    def _require(self) -> dict:
        state = load_state(self.dir)
        if state is None:
            dir_opt = "" if self.dir == os.path.abspath(default_dir()) else f" --dir {self.dir}"
            raise LabError(f"no lab in {self.dir}; start one with `multiproxy lab up{dir_opt}`")
        return state

    def env(self) -> dict[str, str]:
        state = self._require()
        values = {}
        for engine, part_state in state["engines"].items():
            if "listeners" in part_state:
                values.update(PARTS[engine].urls(part_state, state))
        if "proxy" in state:
            values["MULTIPROXY_ADMIN_URL"] = f"http://{state['proxy']['admin']}"
        if "postgres" in state["engines"] and "listeners" in state["engines"]["postgres"]:
            values.update(PARTS["postgres"].client_env(state["engines"]["postgres"], state))
        return values

    def status(self) -> int:
        """Print processes, backends with their verified roles, pools and pins; 0 running, 1 not running."""
        state = self._require()
        procs = processes(state)
        up = [p for p in procs if alive(p["pid"], p.get("started"))]
        if not up:
            self.out(f"lab in {self.dir}: not running (run `multiproxy lab down` to clean up, then `multiproxy lab up`)")
            return 1
        mode = "detached" if state.get("detached") else "in the foreground of another terminal"
        self.out(f"lab in {self.dir}: {len(up)} of {len(procs)} processes running ({mode})")
        for p in procs:
            self.out(f"  {p['name']:<20} pid {p['pid']:<8} {'running' if p in up else 'STOPPED'}")
        self.out("backends (role as configured, then as the server itself reports it)")
        problems = len(procs) - len(up)
        for engine, part_state in state["engines"].items():
            part = PARTS[engine]
            for node in part_state["nodes"]:
                if node["role"] == "stopped":
                    self.out(f"  {part_state['cluster']:<4} {node['name']:<8} {node['host']}:{node['port']:<6} "
                             "stopped by `lab failover` (no standby rebuilt)")
                    continue
                verified, detail = part.verify_role(node, state)
                mark = "" if verified == node["role"] else "   <-- differs"
                problems += bool(mark)
                self.out(f"  {part_state['cluster']:<4} {node['name']:<8} {node['host']}:{node['port']:<6} "
                         f"configured {node['role']:<7} verified {verified:<7} ({detail}){mark}")
        admin = state["proxy"]["admin"]
        try:
            with urllib.request.urlopen(f"http://{admin}/status", timeout=5) as resp:
                snapshot = json.load(resp)
        except (OSError, ValueError) as exc:
            self.out(f"proxy admin http://{admin}/status does not answer: {exc}")
            return 1
        self.out(f"proxy (admin http://{admin}, up {snapshot['uptime_seconds']} s; status page http://{admin}/)")
        for lst in snapshot["listeners"]:
            self.out(f"  listener {lst['name']:<10} {lst['listen']:<16} {lst['cluster']}/{lst['role']:<7} "
                     f"clients {lst['clients']}")
        for pool in snapshot["pools"] or []:
            self.out(f"  pool {pool['pool']:<40} size {pool['size']}/{pool['max_size']} idle {pool['idle']} "
                     f"borrowed {pool['borrowed']} waiting {pool['waiting']}")
        if not snapshot["pools"]:
            self.out("  pools: none yet (a pool opens with the first client transaction)")
        for cluster, pins in snapshot["pins"].items():
            now = ", ".join(f"{k} {v}" for k, v in pins["now"].items()) or "none"
            detected = ", ".join(f"{k} {v}" for k, v in pins["detected_total"].items()) or "none"
            self.out(f"  pins {cluster}: pinned now: {now}; detected since start: {detected}")
        self._print_registry(snapshot.get("registry") or {})
        return 0 if not problems else 2

    def _print_registry(self, registry: dict) -> None:
        """The proxy's own view of each cluster: DNS endpoints, probed nodes, the writer, recent events."""
        clusters = {k: v for k, v in registry.items() if k != "events"}
        if not clusters:
            return
        self.out("registry (the proxy's view: DNS says where to look, probes say who the writer is)")
        for name, cluster in clusters.items():
            self.out(f"  {name}: writer {cluster['writer'] or 'NONE (new transactions wait)'}")
            for kind, endpoint in cluster.get("endpoints", {}).items():
                error = f", last lookup failed: {endpoint['error']}" if endpoint.get("error") else ""
                self.out(f"    endpoint {kind:<6} {endpoint['name']:<16} -> {', '.join(endpoint['addresses']) or '?'}"
                         f"{error}")
            for node in cluster.get("nodes", []):
                self.out(f"    node {describe_node(node)}")
        events = registry.get("events") or []
        if events:
            self.out("  recent events")
        for event in events[-8:]:
            when = time.strftime("%H:%M:%S", time.localtime(event["time"]))
            self.out(f"    {when} {event['cluster']}: {describe_event(event)}")


def describe_node(node: dict) -> str:
    """One node of the registry (from /status) for people: address, role, health, a reader's lag and, when the
    proxy sends it no traffic, why. Keys an older proxy does not send are left out."""
    healthy = node.get("healthy")
    health = "up" if healthy else f"DOWN ({node.get('error') or 'not probed yet'})"
    text = f"{node.get('address', '?'):<16} {node.get('role') or '?':<7} {health}"
    if node.get("role") == "reader" and "lag" in node:
        text += f", {describe_lag(node.get('lag'), node.get('lag_bytes'))}"
    if node.get("skipped") and not (not healthy and str(node["skipped"]).startswith("down")):  # DOWN said why
        text += f"; skipped: {node['skipped']}"
    return text


def describe_lag(seconds: float | None, size: int | None = None) -> str:
    """'lag 0.0 s', 'lag 2.1 s (48 KB)', 'lag unknown' (the replica cannot tell, e.g. replication stopped)."""
    if seconds is None:
        text = "lag unknown"
    else:
        text = f"lag {float(seconds):.1f} s"
    if size:  # 0 or None: nothing worth saying
        text += f" ({_size(int(size))})"
    return text


def _size(n: int) -> str:
    for unit, scale in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if n >= scale:
            value = n / scale
            return f"{value:.0f} {unit}" if value >= 10 else f"{value:.1f} {unit}"
    return f"{n} B"


def describe_event(event: dict) -> str:
    """One registry event (from /status) for people."""
    if event.get("event") == "writer":
        text = f"writer {event.get('old') or 'none'} -> {event.get('new') or 'none'} ({event.get('reason')})"
        if "outage_seconds" in event:
            text += f", {event['outage_seconds']} s without a writer"
        return text
    if event.get("event") == "dns":
        text = f"dns {event.get('endpoint')} -> {', '.join(event.get('addresses') or []) or '?'}"
        return text + (f" (lookup failed: {event['error']})" if event.get("error") else "")
    return json.dumps(event)


def _tail(path: str, lines: int = 15) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return "\n".join(f.read().splitlines()[-lines:])
    except OSError:
        return "(no log)"
