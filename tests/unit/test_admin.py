"""The admin console without sockets: request parsing, the core's views and commands on an idle proxy, and the
PostgreSQL wire side as byte vectors."""
from __future__ import annotations

import struct

import pytest

from multiproxy.admin import COMMANDS, VIEWS, AdminError, Console, parse
from multiproxy.auth import UsersFile
from multiproxy.config import build_config
from multiproxy.proxy import Sessions
from multiproxy.engine import ClientProtocol, ClientQuit
from multiproxy_engines.postgres.console import PostgresConsole, data_row, row_description

CONFIG = {
    "admin": {"users": ["boss"], "stats_users": ["watcher"]},
    "clusters": {"main": {"engine": "postgres", "hosts": ["127.0.0.1:5432"]}},
    "listeners": [{"name": "pg", "listen": "127.0.0.1:6432", "cluster": "main", "auth": "trust"}],
}


class IdleProxy:
    """What the console reads of a proxy, with no clients and no pools."""

    def __init__(self):
        self.config = build_config(CONFIG)
        self.pools = {}
        self.sessions = Sessions()
        self.handshaking = {}
        self.registry = None
        self.users = UsersFile.empty()
        self.reloads = 0
        self.stopped = False

    def user_sessions(self, user):
        return 0

    def reload(self):
        self.reloads += 1
        return []

    def request_shutdown(self):
        self.stopped = True


# -- parsing -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("SHOW POOLS", ("SHOW", ["POOLS"])),
    ("  show pools ;", ("SHOW", ["pools"])),
    ("pause mydb;;", ("PAUSE", ["mydb"])),
    ('Kill "My Db"', ("KILL", ["My Db"])),
    ("reload", ("RELOAD", [])),
])
def test_parse_is_case_insensitive_and_takes_a_trailing_semicolon(text, expected):
    assert parse(text) == expected


def test_parse_refuses_an_empty_request():
    with pytest.raises(AdminError) as caught:
        parse(" ; ")
    assert caught.value.code == "syntax_error"


# -- the core's views and commands ----------------------------------------------------------------------------------

def test_every_view_answers_on_an_idle_proxy_with_its_columns():
    console = Console(IdleProxy())
    for name in VIEWS:
        result = console.execute(f"SHOW {name.upper()}")
        assert result.tag == "SHOW" and result.columns, name
        assert all(len(row) == len(result.columns) for row in result.rows), name
    lists = dict(console.execute("show lists").rows)
    assert lists["pools"] == 0 and lists["used_clients"] == 0
    assert [c for c, _ in console.execute("SHOW POOLS").columns][:4] == ["database", "user", "cl_active", "cl_waiting"]
    assert console.execute("SHOW CLUSTERS").rows[0][:5] == ["main", "postgres", "hosts", "127.0.0.1:5432", "writer"]


def test_who_may_use_the_console():
    console = Console(IdleProxy())
    assert (console.may_use("boss"), console.may_use("watcher"), console.may_use("someone")) == ("admin", "stats", None)


def test_stats_users_may_only_show():
    console = Console(IdleProxy())
    assert console.execute("SHOW VERSION", may_command=False).rows
    for command in COMMANDS:
        with pytest.raises(AdminError) as caught:
            console.execute(f"{command} db", may_command=False)
        assert caught.value.code == "insufficient_privilege" and "stats_users" in str(caught.value)


def test_unknown_commands_and_views_say_what_exists():
    console = Console(IdleProxy())
    with pytest.raises(AdminError, match="SHOW HELP") as caught:
        console.execute("FROB")
    assert caught.value.code == "syntax_error"
    with pytest.raises(AdminError) as caught:
        console.execute("SHOW NOTHING")
    assert caught.value.code == "undefined_object"
    with pytest.raises(AdminError, match="no such database"):
        console.execute("RECONNECT nosuchdb")
    with pytest.raises(AdminError, match="autocommit") as caught:
        console.execute("BEGIN")
    assert caught.value.code == "feature_not_supported"


def test_commands_change_the_console_state_and_record_events():
    proxy = IdleProxy()
    console = Console(proxy)
    assert console.execute("DISABLE shop").tag == "DISABLE" and console.is_disabled("shop")
    with pytest.raises(AdminError, match="needs a database name"):
        console.execute("DISABLE")
    console.execute("ENABLE shop")
    assert not console.is_disabled("shop")
    with pytest.raises(AdminError, match="not disabled"):
        console.execute("ENABLE shop")
    assert console.execute("PAUSE").tag == "PAUSE" and console.is_paused("anything")
    assert console.execute("SHOW STATE").rows[1] == ["paused", "yes"]
    console.execute("RESUME")
    assert not console.is_paused("anything")
    console.execute("RELOAD")
    assert proxy.reloads == 1
    assert [row[1] for row in console.execute("SHOW EVENTS").rows] == ["disable", "enable", "pause", "resume", "reload"]
    console.execute("SHUTDOWN")
    import gevent
    gevent.sleep(0.1)
    assert proxy.stopped


def test_as_json_gives_columns_and_rows_or_objects():
    result = Console(IdleProxy()).execute("SHOW STATE")
    assert result.as_json()["columns"][0] == {"name": "key", "type": "text"}
    assert result.as_json(objects=True)["rows"][0] == {"key": "active", "value": "yes"}


def test_engines_offer_no_console_by_default():
    assert ClientProtocol().admin_console() is None


# -- the PostgreSQL wire side -------------------------------------------------------------------------------------

def message(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack("!I", len(body) + 4) + body


READY = b"Z\x00\x00\x00\x05I"


def test_row_description_and_data_row_bytes():
    assert row_description([("database", "text"), ("cl_active", "int4")]) == message(
        b"T", b"\x00\x02"
        + b"database\x00" + b"\x00\x00\x00\x00" + b"\x00\x00" + b"\x00\x00\x00\x19" + b"\xff\xff" + b"\xff\xff\xff\xff"
        + b"\x00\x00"
        + b"cl_active\x00" + b"\x00\x00\x00\x00" + b"\x00\x00" + b"\x00\x00\x00\x17" + b"\x00\x04" + b"\xff\xff\xff\xff"
        + b"\x00\x00")
    assert data_row(["db", 3, None, True]) == message(
        b"D", b"\x00\x04" + b"\x00\x00\x00\x02db" + b"\x00\x00\x00\x013" + b"\xff\xff\xff\xff" + b"\x00\x00\x00\x01t")


def test_greeting_has_parameters_the_key_and_ready_for_query():
    out = PostgresConsole((7, 9)).greeting("0.1.0/multiproxy")
    assert out.startswith(message(b"R", b"\x00\x00\x00\x00"))
    assert message(b"S", b"server_version\x000.1.0/multiproxy\x00") in out
    assert message(b"S", b"client_encoding\x00UTF8\x00") in out
    assert out.endswith(message(b"K", struct.pack("!II", 7, 9)) + READY)


def test_result_and_failure_bytes():
    console = PostgresConsole((1, 2))
    assert console.result([], [], "PAUSE") == message(b"C", b"PAUSE\x00") + READY
    out = console.result([("version", "text")], [["x"]], "SHOW")
    assert out == row_description([("version", "text")]) + data_row(["x"]) + message(b"C", b"SHOW\x00") + READY
    assert console.failure("insufficient_privilege", "no") == message(
        b"E", b"SERROR\x00VERROR\x00C42501\x00Mno\x00\x00") + READY


def test_requests_split_queries_across_reads_and_end_on_terminate():
    console = PostgresConsole((1, 2))
    query = message(b"Q", b"SHOW POOLS;\x00")
    assert console.requests(query[:3]) == []
    assert console.requests(query[3:] + message(b"Q", b"pause db\x00")) == ["SHOW POOLS", "pause db"]
    assert console.requests(message(b"Q", b" ; \x00")) == [message(b"I", b"") + READY]     # empty query
    [refusal] = console.requests(message(b"Q", b"PAUSE a; RESUME a\x00"))
    assert b"C0A000" in refusal and refusal.endswith(READY)
    with pytest.raises(ClientQuit):
        console.requests(message(b"X", b""))


def test_the_extended_protocol_is_refused_until_sync():
    console = PostgresConsole((1, 2))
    parse_msg = message(b"P", b"\x00SHOW POOLS\x00\x00\x00")
    bind = message(b"B", b"\x00\x00\x00\x00\x00\x00\x00\x00")
    items = console.requests(parse_msg + bind + message(b"E", b"\x00\x00\x00\x00\x00") + message(b"S", b""))
    assert len(items) == 2
    assert b"C0A000" in items[0] and b"simple queries only" in items[0]
    assert items[1] == READY
    assert console.requests(message(b"Q", b"SHOW LISTS\x00")) == ["SHOW LISTS"]


# -- over HTTP ----------------------------------------------------------------------------------------------------

def test_http_requests_map_to_views_and_commands():
    from multiproxy.metrics import admin_request
    proxy = IdleProxy()
    proxy.console = Console(proxy)
    status, body = admin_request(proxy, "GET", "lists", "")
    assert status == "200 OK" and body["columns"][0] == {"name": "list", "type": "text"}
    assert admin_request(proxy, "GET", "state", "format=objects")[1]["rows"][0] == {"key": "active", "value": "yes"}
    assert admin_request(proxy, "GET", "nothing", "")[0] == "404 Not Found"
    assert admin_request(proxy, "POST", "disable/shop", "") == ("200 OK", {"command": "DISABLE", "columns": [],
                                                                          "rows": []})
    assert proxy.console.is_disabled("shop")
    assert admin_request(proxy, "POST", "show/pools", "")[0] == "400 Bad Request"
    assert admin_request(proxy, "DELETE", "pools", "")[0] == "405 Method Not Allowed"


def test_http_console_needs_loopback_or_the_token(monkeypatch):
    import dataclasses

    from multiproxy.metrics import admin_http_refusal
    proxy = IdleProxy()
    assert admin_http_refusal(proxy, "", loopback=True) == ""
    assert "loopback" in admin_http_refusal(proxy, "", loopback=False)
    proxy.config = dataclasses.replace(proxy.config, admin=dataclasses.replace(proxy.config.admin,
                                                                               http_token_env="MP_UNIT_ADMIN_TOKEN"))
    monkeypatch.delenv("MP_UNIT_ADMIN_TOKEN", raising=False)
    assert "not set" in admin_http_refusal(proxy, "Bearer x", loopback=True)
    monkeypatch.setenv("MP_UNIT_ADMIN_TOKEN", "t0ken")
    assert "needs the admin token" in admin_http_refusal(proxy, "", loopback=True)
    assert "needs the admin token" in admin_http_refusal(proxy, "Bearer wrong", loopback=False)
    assert admin_http_refusal(proxy, "Bearer t0ken", loopback=False) == ""
