"""Access limits: failed logins slowed down then blocked per address, connections per address, the audit log."""
import json
import time

import pg8000.native
import pytest

from multiproxy.auth import UsersFile

from .proxy import free_port

PASSWORD = "right-horse-battery"
WRONG = "wrong-horse-battery"


def config(pg, tmp_path, **proxy_settings):
    users = UsersFile.empty()
    users.add("mp_trust", PASSWORD)
    users.save(str(tmp_path / "users.toml"))
    proxy = {"admin_listen": f"127.0.0.1:{free_port()}", "log_level": "info",
             "audit_log": str(tmp_path / "audit.jsonl")}
    proxy.update(proxy_settings)
    return {
        "proxy": proxy,
        "auth": {"users_file": str(tmp_path / "users.toml")},
        "clusters": {"main": {"engine": "postgres", "hosts": [f"127.0.0.1:{pg.port}"], "backend": {"tls": "disable"},
                              "pool": {"max_size": 3}}},
        "listeners": [{"name": "pg", "listen": f"127.0.0.1:{free_port()}", "cluster": "main", "auth": "scram-sha-256"}],
    }


def connect(proxy, password=PASSWORD, source="127.0.0.1"):
    host, port = proxy.address("pg")
    return pg8000.native.Connection("mp_trust", host=host, port=port, database="mpdb", password=password,
                                    timeout=15, source_address=(source, 0))


def test_failed_logins_are_slowed_then_the_address_is_blocked(pg, proxy_factory, tmp_path):
    proxy = proxy_factory(config(pg, tmp_path, auth_failure_delay=0.2, auth_failure_max_delay=1.0,
                                 auth_failure_block_after=4, auth_failure_block_seconds=3.0))
    took = []
    for _ in range(3):
        started = time.monotonic()
        with pytest.raises(pg8000.native.DatabaseError) as info:
            connect(proxy, WRONG)
        took.append(time.monotonic() - started)
        assert info.value.args[0]["C"] == "28P01"
    assert took[0] >= 0.2 and took[1] >= 0.4 and took[2] >= 0.8, took   # the delay doubles
    with pytest.raises(pg8000.native.DatabaseError):
        connect(proxy, WRONG)                                            # the 4th failure blocks the address
    with pytest.raises(pg8000.native.DatabaseError) as info:
        connect(proxy, PASSWORD)                                         # even the right password is turned away
    assert "blocked" in info.value.args[0]["M"]
    other = connect(proxy, PASSWORD, source="127.0.0.7")                 # other addresses are not affected
    assert other.run("SELECT 1") == [[1]]
    other.close()
    time.sleep(3.2)
    conn = connect(proxy, PASSWORD)
    assert conn.run("SELECT 2") == [[2]]
    conn.close()


def test_connections_per_address_are_limited(pg, proxy_factory, tmp_path):
    proxy = proxy_factory(config(pg, tmp_path, max_connections_per_address=2))
    first, second = connect(proxy), connect(proxy)
    with pytest.raises(pg8000.native.DatabaseError) as info:
        connect(proxy)
    assert info.value.args[0]["C"] == "53300" and "max_connections_per_address" in info.value.args[0]["M"]
    elsewhere = connect(proxy, source="127.0.0.8")
    assert elsewhere.run("SELECT 3") == [[3]]
    first.close()
    deadline = time.monotonic() + 5
    while True:
        try:
            third = connect(proxy)
            break
        except pg8000.native.DatabaseError:
            assert time.monotonic() < deadline
            time.sleep(0.1)
    for conn in (second, third, elsewhere):
        conn.close()


def test_audit_log_records_logins_and_never_a_secret(pg, proxy_factory, tmp_path):
    proxy = proxy_factory(config(pg, tmp_path, auth_failure_delay=0.0, max_connections_per_address=1))
    conn = connect(proxy)
    with pytest.raises(pg8000.native.DatabaseError):
        connect(proxy)                                    # over the per-address limit
    conn.close()
    time.sleep(0.3)
    with pytest.raises(pg8000.native.DatabaseError):
        connect(proxy, WRONG)
    proxy.stop()
    lines = (tmp_path / "audit.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    events = [r["event"] for r in records]
    assert events.count("auth_ok") == 1 and events.count("auth_failed") == 1 and events.count("limit") == 1
    ok = next(r for r in records if r["event"] == "auth_ok")
    assert ok["user"] == "mp_trust" and ok["listener"] == "pg" and ok["address"] == "127.0.0.1"
    everything = "\n".join(lines) + (tmp_path / "proxy0" / "proxy.log").read_text() + (tmp_path / "users.toml").read_text()
    for secret in (PASSWORD, WRONG):
        assert secret not in everything
    assert oct((tmp_path / "audit.jsonl").stat().st_mode & 0o777) == "0o600"
