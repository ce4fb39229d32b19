"""What a start of the proxy needs from this machine, checked ahead: files that exist, parse and are private enough,
folders that are writable, environment variables that are set, and listen addresses that are free.

`load_config` judges the configuration's text alone (so a config meant for another host can be checked with
`multiproxy check-config --syntax-only`); `machine_problems` judges it against this machine. Each problem names
the key path it comes from, as configuration errors do, and all of them are reported together.
"""
from __future__ import annotations

import errno
import json
import os
import shlex
import shutil
import socket
import ssl
import stat
import tomllib

from .config import Config, parse_address


def machine_problems(config: Config, check_addresses: bool = True,
                     credentials: bool = True) -> list[tuple[str, str]]:
    """Every reason a start with `config` would fail (or run short of what it was told) on this machine, as
    (key path, message) pairs, in config order. `check_addresses` also tries to bind each listen address;
    `credentials` checks the backend password sources a login would read (a running proxy reads them when a
    user first needs a backend, and tells that user's clients when one fails, so `run` only warns of them)."""
    problems: list[tuple[str, str]] = []

    def problem(key_path: str, message: str) -> None:
        problems.append((key_path, message))

    _check_users_file(config, problem)
    _check_audit_log(config.proxy.audit_log, problem)
    for cluster in config.clusters.values():
        path = f"clusters.{cluster.name}"
        backend = cluster.backend
        if backend.tls_ca_file:
            _check_ca_bundle(f"{path}.backend.tls_ca_file", backend.tls_ca_file, problem)
        if backend.tls_cert_file:
            _check_cert_and_key(f"{path}.backend", backend.tls_cert_file, backend.tls_key_file, problem)
        for credential in cluster.credentials if credentials else ():
            _check_credential(credential, problem)
    for index, listener in enumerate(config.listeners):
        path = f"listeners[{index}]"
        if listener.tls_cert_file:
            _check_cert_and_key(path, listener.tls_cert_file, listener.tls_key_file, problem)
        if listener.tls_client_ca_file:
            _check_ca_bundle(f"{path}.tls_client_ca_file", listener.tls_client_ca_file, problem)
        if listener.iam_access_keys_file:
            _check_keys_file(f"{path}.iam_access_keys_file", listener.iam_access_keys_file, problem)
        if listener.jwt_jwks_file:
            _check_keys_file(f"{path}.jwt_jwks_file", listener.jwt_jwks_file, problem)
        if listener.jwt_shared_key_env and not os.environ.get(listener.jwt_shared_key_env):
            problem(f"{path}.jwt_shared_key_env", f"environment variable {listener.jwt_shared_key_env} is not set "
                                                  "here; set it in the proxy's environment")
        if check_addresses and listener.listen[1]:
            _check_address(f"{path}.listen", listener.listen, problem)
    token_env = config.admin.http_token_env
    if token_env and not os.environ.get(token_env):
        problem("admin.http_token_env", f"environment variable {token_env} is not set here, so the admin HTTP "
                                        "server's /admin/ would refuse every request; set it in the proxy's environment")
    if check_addresses and config.proxy.admin_listen:
        try:
            admin = parse_address(config.proxy.admin_listen)
        except ValueError:
            admin = None    # load_config reported it
        if admin is not None:
            _check_address("proxy.admin_listen", admin, problem)
    return problems


def _check_users_file(config: Config, problem) -> None:
    if not config.users_file:
        return
    from .auth import UsersFile, UsersFileError
    if not _readable_file("auth.users_file", config.users_file, problem):
        return
    try:
        users = UsersFile.load(config.users_file)
    except UsersFileError as exc:
        problem("auth.users_file", str(exc))
        return
    if not len(users) and any(listener.auth not in ("trust", "token") for listener in config.listeners):
        problem("auth.users_file", f"{config.users_file} has no users, so no client can log in; add one with "
                                   "`multiproxy users add NAME --users-file FILE`")


def _check_audit_log(path: str, problem) -> None:
    if not path:
        return
    folder = os.path.dirname(path) or "."
    if os.path.exists(path):
        if not os.path.isfile(path):
            problem("proxy.audit_log", f"{path} is not a regular file")
        elif not os.access(path, os.W_OK):
            problem("proxy.audit_log", f"{path} is not writable by this user")
    elif not os.path.isdir(folder):
        problem("proxy.audit_log", f"folder {folder} does not exist on this machine; create it or change the path")
    elif not os.access(folder, os.W_OK | os.X_OK):
        problem("proxy.audit_log", f"folder {folder} is not writable by this user, so {os.path.basename(path)} "
                                   "cannot be created")


def _readable_file(key_path: str, path: str, problem) -> bool:
    if not os.path.exists(path):
        problem(key_path, f"file not found on this machine: {path}")
        return False
    if not os.path.isfile(path):
        problem(key_path, f"{path} is not a regular file")
        return False
    if not os.access(path, os.R_OK):
        problem(key_path, f"{path} is not readable by this user")
        return False
    return True


def _check_ca_bundle(key_path: str, path: str, problem) -> None:
    if not _readable_file(key_path, path, problem):
        return
    try:
        ssl.create_default_context().load_verify_locations(cafile=path)
    except (ssl.SSLError, ValueError) as exc:
        problem(key_path, f"{path} holds no usable CA certificate (PEM expected): {exc}")


def _check_cert_and_key(path: str, cert_file: str, key_file: str, problem) -> None:
    cert_ok = _readable_file(f"{path}.tls_cert_file", cert_file, problem)
    key_ok = _readable_file(f"{path}.tls_key_file", key_file, problem) if key_file else True
    if not (cert_ok and key_ok):
        return
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert_file, key_file or None)
    except (ssl.SSLError, ValueError) as exc:
        problem(f"{path}.tls_cert_file", f"{cert_file} and its key {key_file or '(in the same file)'} do not load "
                                         f"as a certificate chain and matching private key: {exc}")


def _check_keys_file(key_path: str, path: str, problem) -> None:
    if not _readable_file(key_path, path, problem):
        return
    try:
        with open(path, "rb") as f:
            data = f.read()
        if path.endswith(".toml"):
            tomllib.loads(data.decode())
        else:
            json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        problem(key_path, f"{path} does not parse: {exc}")


def _check_credential(credential, problem) -> None:
    where = credential.key_path or "credential"
    if credential.password_file:
        key_path = f"{where}.password_file"
        path = credential.password_file
        if _readable_file(key_path, path, problem):
            mode = stat.S_IMODE(os.stat(path).st_mode)
            if mode & 0o066:
                problem(key_path, f"{path} is readable or writable by group or others (mode {mode:03o}); run: "
                                  f"chmod 600 {path}")
            elif os.path.getsize(path) == 0:
                problem(key_path, f"{path} is empty")
    if credential.password_env and credential.password_env not in os.environ:
        problem(f"{where}.password_env", f"environment variable {credential.password_env} is not set here; set it "
                                         "in the proxy's environment")
    if credential.password_command:
        try:
            program = shlex.split(credential.password_command)[0]
        except (ValueError, IndexError):
            problem(f"{where}.password_command", "is not a command line")
            return
        if "=" not in program and shutil.which(program) is None:
            problem(f"{where}.password_command", f"program {program!r} is not found (not on PATH, or not "
                                                 "executable)")


def _check_address(key_path: str, address: tuple[str, int], problem) -> None:
    host, port = address
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        problem(key_path, f"{host}:{port}: the host does not resolve here: {exc.strerror}")
        return
    family, _, _, _, sockaddr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(sockaddr)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            problem(key_path, f"address {host}:{port} is already in use (another process listens there: stop it "
                              "or choose another port)")
        elif exc.errno == errno.EADDRNOTAVAIL:
            problem(key_path, f"address {host}:{port} is not an address of this machine")
        elif exc.errno == errno.EACCES:
            problem(key_path, f"address {host}:{port} needs privileges to bind (ports below 1024)")
        else:
            problem(key_path, f"address {host}:{port} cannot be bound: {exc.strerror}")
    finally:
        sock.close()
