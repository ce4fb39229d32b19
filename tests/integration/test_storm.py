"""A connection storm (tools/pg_storm.py, the bench's storm load) through multiproxy in front of PostgreSQL: hundreds of
psycopg clients released at once onto a pool of three, every one served within the borrow timeout, no error, and
the pool never above its size."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from .helpers import metric, metrics_text
from .pgserver import AUTH_DB
from .proxy import REPO_ROOT, free_port

pytestmark = pytest.mark.timeout(120)
USER = "mp_trust"
CLIENTS = 600
POOL = 3
BORROW_TIMEOUT = 30.0


def test_hundreds_of_clients_at_once_are_all_served_by_a_pool_of_three(pg, proxy_factory):
    proxy = proxy_factory({
        "proxy": {"admin_listen": f"127.0.0.1:{free_port()}", "log_level": "warning"},
        "clusters": {"main": {"engine": "postgres", "hosts": [f"127.0.0.1:{pg.port}"], "backend": {"tls": "disable"},
                              "pool": {"mode": "transaction", "max_size": POOL,
                                       "borrow_timeout": BORROW_TIMEOUT}}},
        "listeners": [{"name": "pg", "listen": f"127.0.0.1:{free_port()}", "cluster": "main", "auth": "trust"}],
    })
    done = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "tools", "pg_storm.py"), "--port", str(proxy.port),
                           "--user", USER, "--database", AUTH_DB, "--clients", str(CLIENTS),
                           "--timeout", str(BORROW_TIMEOUT)],
                          capture_output=True, text=True, timeout=BORROW_TIMEOUT + 60, stdin=subprocess.DEVNULL)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["errors"] == 0, result["first_errors"]
    assert result["served"] == CLIENTS
    assert result["max_s"] < BORROW_TIMEOUT
    assert done.returncode == 0
    text = metrics_text(proxy)
    assert metric(text, "multiproxy_client_connections_received_total") >= CLIENTS
    opened = metric(text, "multiproxy_database_connections_opened_total")
    assert opened is not None and 1 <= opened <= POOL, opened
    assert metric(text, "multiproxy_database_connection_borrow_timeouts_total") in (None, 0.0)
