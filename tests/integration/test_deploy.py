"""Deployment files hold: the systemd unit verifies, `multiproxy run` tells systemd READY=1 once it serves, the
Kubernetes manifests validate, the Containerfile has what docs/deploy.md promises."""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time

import psycopg
import pytest
import yaml

from .proxy import REPO_ROOT, free_port, render_toml

CONFIGS = os.path.join(REPO_ROOT, "configs")
UNIT = os.path.join(CONFIGS, "systemd", "multiproxy.service")
CONTAINERFILE = os.path.join(CONFIGS, "container", "Containerfile")
KUBERNETES = os.path.join(CONFIGS, "kubernetes")


def _unit_settings() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in open(UNIT, encoding="utf-8"):
        line = line.strip()
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


# -- systemd ----------------------------------------------------------------------------------------------------

@pytest.mark.timeout(60)
@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_the_systemd_unit_verifies(tmp_path):
    # systemd-analyze checks that ExecStart's binary exists: point it at this environment's console script.
    binary = shutil.which("multiproxy") or os.path.join(os.path.dirname(sys.executable), "multiproxy")
    assert os.path.exists(binary), "pip install -e . puts the multiproxy console script on PATH"
    text = open(UNIT, encoding="utf-8").read().replace("/usr/local/bin/multiproxy", binary)
    unit = tmp_path / "multiproxy.service"
    unit.write_text(text)
    out = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=50)
    problems = [line for line in out.stderr.splitlines() if "multiproxy.service" in line]
    assert out.returncode == 0 and not problems, out.stderr


def test_the_systemd_unit_says_what_the_deployment_guide_promises():
    s = _unit_settings()
    assert s["Type"] == ["notify"]
    assert s["ExecStart"] == ["/usr/local/bin/multiproxy run -c /etc/multiproxy/multiproxy.toml"]
    assert s["ExecReload"] == ["/usr/local/bin/multiproxy reload --pid $MAINPID"]
    assert s["KillSignal"] == ["SIGTERM"]
    default_shutdown_timeout = 30.0   # proxy.shutdown_timeout's default
    assert float(s["TimeoutStopSec"][0]) > default_shutdown_timeout
    for key, value in {"ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes",
                       "NoNewPrivileges": "yes", "CapabilityBoundingSet": "",
                       "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
                       "SystemCallFilter": "@system-service", "ReadWritePaths": "/var/log/multiproxy"}.items():
        assert s.get(key) == [value], (key, s.get(key))
    assert s.get("User") == ["multiproxy"]
    assert int(s["LimitNOFILE"][0]) >= 65536


# -- sd_notify from a real `multiproxy run` ---------------------------------------------------------------------

def _notify_socket(address) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)   # the kernel tells who sent each datagram
    return sock


def _receive(sock: socket.socket, timeout: float) -> tuple[dict[str, str], int]:
    """One notification: its fields and the sender's pid (SCM_CREDENTIALS), as systemd reads them."""
    sock.settimeout(timeout)
    data, ancillary, _, _ = sock.recvmsg(4096, socket.CMSG_SPACE(struct.calcsize("3i")))
    pid = -1
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
            pid = struct.unpack("3i", payload[:struct.calcsize("3i")])[0]
    fields = dict(line.split("=", 1) for line in data.decode().split("\n") if line)
    return fields, pid


def _config(pg_port: int, listen_port: int, workers: int, admin_listen: str = "") -> str:
    return render_toml({
        "proxy": {"admin_listen": admin_listen, "log_level": "info", "shutdown_timeout": 2.0, "workers": workers},
        "clusters": {"main": {"engine": "postgres", "hosts": [f"127.0.0.1:{pg_port}"], "backend": {"tls": "disable"},
                              "pool": {"mode": "transaction", "max_size": 2, "borrow_timeout": 5.0}}},
        "listeners": [{"name": "pg", "listen": f"127.0.0.1:{listen_port}", "cluster": "main", "role": "writer",
                       "auth": "trust"}],
    })


def _notify_lifecycle(pg, tmp_path, notify_env: str, bind_address, workers: int) -> None:
    listen_port = free_port()
    admin = f"127.0.0.1:{free_port()}" if workers == 1 else ""
    config = tmp_path / "multiproxy.toml"
    config.write_text(_config(pg.port, listen_port, workers, admin))
    sock = _notify_socket(bind_address)
    env = {**os.environ, "NOTIFY_SOCKET": notify_env, "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, env.get("PYTHONPATH")) if p)
    log = open(tmp_path / "proxy.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "multiproxy", "run", "-c", str(config)], stdin=subprocess.DEVNULL,
                            stdout=log, stderr=subprocess.STDOUT, env=env, process_group=0)
    try:
        try:
            fields, pid = _receive(sock, 20)
        except socket.timeout:
            raise AssertionError("no notification in 20 s; log:\n" + (tmp_path / "proxy.log").read_text())
        # READY=1 means serving: the listener accepts at once, with no retry, and a query goes through.
        with socket.create_connection(("127.0.0.1", listen_port), timeout=2):
            pass
        assert fields.get("READY") == "1", fields
        assert pid == proc.pid, "systemd (NotifyAccess=main) only hears the main process"
        if workers > 1:
            assert fields.get("STATUS") == f"{workers} workers serving 1 listeners", fields
        with psycopg.connect(host="127.0.0.1", port=listen_port, user="mp_trust", dbname="mpdb", connect_timeout=5,
                             autocommit=True) as conn:
            assert conn.execute("SELECT 41 + 1").fetchone() == (42,)

        proc.send_signal(signal.SIGHUP)   # what ExecReload (multiproxy reload --pid $MAINPID) does
        fields, pid = _receive(sock, 10)
        assert fields.get("RELOADING") == "1" and int(fields["MONOTONIC_USEC"]) > 0 and pid == proc.pid, fields
        fields, pid = _receive(sock, 10)
        assert fields.get("READY") == "1" and pid == proc.pid, fields

        if admin:
            # a reload through the admin server (the console's RELOAD does the same) is announced as well
            subprocess.run([sys.executable, "-m", "multiproxy", "reload", "--admin", admin], env=env, check=True,
                           timeout=30, capture_output=True)
            fields, pid = _receive(sock, 10)
            assert fields.get("RELOADING") == "1" and pid == proc.pid, fields
            fields, pid = _receive(sock, 10)
            assert fields.get("READY") == "1" and pid == proc.pid, fields

        proc.send_signal(signal.SIGTERM)
        fields, pid = _receive(sock, 10)
        assert fields.get("STOPPING") == "1" and pid == proc.pid, fields
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        log.close()
        sock.close()


@pytest.mark.timeout(60)
def test_run_notifies_systemd_ready_reloading_and_stopping(pg, tmp_path):
    path = str(tmp_path / "notify.sock")
    _notify_lifecycle(pg, tmp_path, path, path, workers=1)


@pytest.mark.timeout(60)
def test_with_workers_the_main_process_notifies_once_every_worker_serves_on_an_abstract_socket(pg, tmp_path):
    name = f"multiproxy-test-{os.getpid()}-{time.monotonic_ns()}"
    _notify_lifecycle(pg, tmp_path, "@" + name, "\0" + name, workers=2)


# -- container --------------------------------------------------------------------------------------------------

def test_the_containerfile_has_the_instructions_the_deployment_guide_promises():
    text = open(CONTAINERFILE, encoding="utf-8").read()
    joined = re.sub(r"\\\n", " ", text)        # continuation lines
    instructions = [line.strip() for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    by_name: dict[str, list[str]] = {}
    for line in instructions:
        name, _, rest = line.partition(" ")
        by_name.setdefault(name.upper(), []).append(rest.strip())
    assert by_name["FROM"] == ["python:3.11-slim"]
    assert any("pip install ." in run for run in by_name["RUN"])
    user = by_name["USER"][-1]
    assert user.split(":")[0] not in ("root", "0"), user
    assert "/etc/multiproxy" in " ".join(by_name["VOLUME"])
    exposed = {int(port) for line in by_name["EXPOSE"] for port in line.split()}
    assert {6432, 9930} <= exposed
    assert len(by_name["HEALTHCHECK"]) == 1 and "/healthz" in by_name["HEALTHCHECK"][0]
    assert by_name["STOPSIGNAL"] == ["SIGTERM"]
    assert by_name["ENTRYPOINT"] == ['["multiproxy", "run", "-c", "/etc/multiproxy/multiproxy.toml"]']
    copied = {line.split()[0] for line in by_name["COPY"]}
    assert {"setup.py", "multiproxy", "engines"} <= copied     # what `pip install .` needs from the checkout


# -- Kubernetes -------------------------------------------------------------------------------------------------

def _manifests() -> dict[str, dict]:
    found = {}
    for name in sorted(os.listdir(KUBERNETES)):
        if name.endswith(".yaml"):
            for doc in yaml.safe_load_all(open(os.path.join(KUBERNETES, name), encoding="utf-8")):
                if doc:
                    found[doc["kind"]] = doc
    return found


@pytest.mark.timeout(120)
def test_the_kubernetes_manifests_validate():
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    manifests = _manifests()
    core = {"Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler", "ConfigMap", "Secret"}
    assert core | {"ServiceMonitor"} == set(manifests)
    version = kubernetes_validate.latest_version()
    for kind in sorted(core):
        kubernetes_validate.validate(manifests[kind], version, strict=True)   # raises on any problem


def test_the_kubernetes_manifests_fit_together():
    m = _manifests()
    labels = {"app.kubernetes.io/name": "multiproxy"}
    deployment, pod = m["Deployment"], m["Deployment"]["spec"]["template"]["spec"]
    assert deployment["spec"]["selector"]["matchLabels"] == labels
    container = pod["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert container["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["lifecycle"]["preStop"]["exec"]["command"][0] == "sleep"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["resources"]["requests"] and container["resources"]["limits"]

    # The config in the ConfigMap is a valid multiproxy config, and its ports are the ones the pod exposes.
    import tomllib
    from multiproxy.config import build_config
    from multiproxy.plugins import load_engines
    text = m["ConfigMap"]["data"]["multiproxy.toml"]
    parsed = tomllib.loads(text)
    config = build_config(parsed, "configmap multiproxy.toml",
                          {name: loaded.engine for name, loaded in load_engines().items()})   # raises on a problem
    assert [lc.name for lc in config.listeners] == ["app"]
    assert parsed["proxy"]["admin_listen"] == f"0.0.0.0:{ports['admin']}"
    assert parsed["listeners"][0]["listen"] == f"0.0.0.0:{ports['postgres']}"
    prestop = int(container["lifecycle"]["preStop"]["exec"]["command"][1])
    assert pod["terminationGracePeriodSeconds"] > prestop + parsed["proxy"]["shutdown_timeout"]
    # users.toml comes from the Secret, next to multiproxy.toml (users_file = "users.toml").
    sources = pod["volumes"][0]["projected"]["sources"]
    assert {s["configMap"]["name"] for s in sources if "configMap" in s} == {m["ConfigMap"]["metadata"]["name"]}
    assert {s["secret"]["name"] for s in sources if "secret" in s} == {m["Secret"]["metadata"]["name"]}
    assert parsed["auth"]["users_file"] == "users.toml"
    assert "users.toml" in m["Secret"]["stringData"]

    assert m["Service"]["spec"]["selector"] == labels
    assert m["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"] == labels
    hpa = m["HorizontalPodAutoscaler"]["spec"]
    assert hpa["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert hpa["metrics"][0]["type"] == "Pods"
    assert hpa["metrics"][0]["pods"]["metric"]["name"] == "multiproxy_client_connections"

    # ServiceMonitor is a CRD (Prometheus Operator) kubernetes-validate has no schema for: its fields by hand.
    sm = m["ServiceMonitor"]
    assert sm["apiVersion"] == "monitoring.coreos.com/v1" and sm["kind"] == "ServiceMonitor"
    assert sm["metadata"]["name"]
    assert sm["spec"]["selector"]["matchLabels"] == m["Service"]["metadata"]["labels"]
    service_ports = {p["name"] for p in m["Service"]["spec"]["ports"]}
    assert [(e["port"], e["path"]) for e in sm["spec"]["endpoints"]] == [("admin", "/metrics")]
    assert "admin" in service_ports
