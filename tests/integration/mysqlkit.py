"""Helpers of the MySQL integration tests: proxy configs in front of the private MariaDB, clients, metrics."""
from __future__ import annotations

import re
import time
import urllib.request

import pymysql

from multiproxy.auth import UsersFile

try:
    from .proxy import free_port
except ImportError:
    from proxy import free_port

DB = "mpdb"
APP_USER = "app"
APP_PASSWORD = "app-pw"
BACKEND_USER = "mp_native"
BACKEND_PASSWORD = "native-pw"
PINNED = "multiproxy_database_connections_currently_session_pinned"


def users_toml() -> str:
    users = UsersFile()
    users.add(APP_USER, APP_PASSWORD, kinds=["mysql_native_password", "caching_sha2_password"])
    return users.dumps()


def mysql_config(mariadb, max_size: int = 5, auth: str = "mysql_native_password", borrow_timeout: float = 10.0,
                 backend_user: str = BACKEND_USER, backend_password: str = BACKEND_PASSWORD, options: dict | None = None,
                 listener: dict | None = None, proxy: dict | None = None, pool_mode: str = "transaction",
                 backend: dict | None = None) -> dict:
    cluster = {"engine": "mysql", "hosts": [f"127.0.0.1:{mariadb.port}"], "backend": {"tls": "disable", **(backend or {})},
               "pool": {"mode": pool_mode, "max_size": max_size, "borrow_timeout": borrow_timeout},
               "credentials": [{"user": "*", "backend_user": backend_user, "password": backend_password}]}
    if options:
        cluster["options"] = options
    config = {
        "proxy": {"admin_listen": f"127.0.0.1:{free_port()}", "log_level": "info", **(proxy or {})},
        "clusters": {"main": cluster},
        "listeners": [{"name": "my", "listen": f"127.0.0.1:{free_port()}", "cluster": "main", "role": "writer",
                       "auth": auth, **(listener or {})}],
    }
    if auth != "trust":
        config["auth"] = {"users_file": "users.toml"}
    return config


def start_proxy(proxy_factory, mariadb, **kwargs):
    return proxy_factory(mysql_config(mariadb, **kwargs), files={"users.toml": users_toml()})


def connect(proxy, autocommit=True, **kwargs) -> pymysql.connections.Connection:
    kwargs.setdefault("user", APP_USER)
    kwargs.setdefault("password", APP_PASSWORD)
    kwargs.setdefault("database", DB)
    return pymysql.connect(host=proxy.host, port=proxy.port, autocommit=autocommit, connect_timeout=10,
                           read_timeout=60, **kwargs)


def direct(mariadb, **kwargs) -> pymysql.connections.Connection:
    return pymysql.connect(host=mariadb.host, port=mariadb.port, user=BACKEND_USER, password=BACKEND_PASSWORD,
                           database=DB, autocommit=True, connect_timeout=10, **kwargs)


def query(conn, sql: str, args=None) -> list:
    with conn.cursor() as cur:
        cur.execute(sql, args)
        return list(cur.fetchall())


def metrics_text(proxy) -> str:
    host, port = proxy.admin_address
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as response:
        return response.read().decode()


_SAMPLE = re.compile(r"^(\w+)(?:\{(.*)\})?\s+(\S+)$")


def metric(text: str, name: str, **labels) -> float:
    """The sum of the samples of `name` whose labels include `labels` (0 when there is none)."""
    total = 0.0
    for line in text.splitlines():
        found = _SAMPLE.match(line)
        if not found or found.group(1) != name:
            continue
        have = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', found.group(2) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(found.group(3))
    return total


def wait_for(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()
