"""Login refusals, sans-IO from byte vectors: each engine's backend login turns the server's error into a BackendError
carrying its code, SQLSTATE and text, and each client protocol renders it as that server error, in the sequence a
client expects at its login (MySQL: instead of the caching_sha2 fast-auth notice too) or at its first request."""
from __future__ import annotations

import dataclasses

import pytest

from multiproxy.auth import UsersFile
from multiproxy.config import build_config
from multiproxy.contract import contract_context
from multiproxy.engine import Authenticated, BackendError, BackendTarget, ClientContext, ErrorKind, SendToClient
from multiproxy.pinning import PinPolicy
from multiproxy_engines.mysql import MySQLEngine
from multiproxy_engines.mysql import protocol as mp
from multiproxy_engines.mysql.auth import native_scramble, sha2_scramble
from multiproxy_engines.mysql.backend import MySQLLogin, MySQLServerState
from multiproxy_engines.mysql.client import MySQLClient
from multiproxy_engines.postgres import PostgresEngine
from multiproxy_engines.postgres import protocol as pp
from multiproxy_engines.postgres.backend import PostgresLogin
from multiproxy_engines.postgres.client import PostgresClient
from multiproxy_engines.tds import TDSEngine
from multiproxy_engines.tds.backend import TDSLogin
from multiproxy_engines.tds.wire import messages as tp
from multiproxy_engines.tds.wire import token_stream as tk

DENIED = "Access denied for user 'mp'@'10.0.0.9' to database 'secret'"
TARGET = BackendTarget(host="db.internal", port=3306, user="mp", database="secret", password="pw", tls="disable")


# ---------------------------------------------------------------------------------------------- MySQL backend

def mysql_greeting() -> bytes:
    return mp.packet(0, mp.handshake_v10(b"11.4.2-MariaDB", 9, b"n" * 20, 0xFFFFFFFF & ~mp.CLIENT_SSL, 45,
                                         mp.SERVER_STATUS_AUTOCOMMIT, b"mysql_native_password"))


def test_mysql_backend_err_after_the_handshake_response_is_a_refusal_with_the_servers_fields():
    login = MySQLLogin(TARGET)
    login.start()
    assert login.feed(mysql_greeting())[3] == 1          # the handshake response
    with pytest.raises(BackendError) as refused:
        login.feed(mp.packet(2, mp.err_payload(1044, "42000", DENIED)))
    error = refused.value
    assert (error.code, error.sqlstate, error.server_message) == ("1044", "42000", DENIED)
    assert error.refused_by_server and error.fatal_auth


def test_mysql_backend_err_instead_of_a_greeting_is_a_refusal_too():
    login = MySQLLogin(TARGET)
    login.start()
    with pytest.raises(BackendError) as refused:        # as servers send it: no SQLSTATE marker
        login.feed(mp.packet(0, b"\xff\x10\x04Too many connections"))
    assert (refused.value.code, refused.value.sqlstate, refused.value.server_message) == \
        ("1040", "HY000", "Too many connections")


# ---------------------------------------------------------------------------------------------- MySQL client

CAPS = (mp.CLIENT_PROTOCOL_41 | mp.CLIENT_SECURE_CONNECTION | mp.CLIENT_PLUGIN_AUTH | mp.CLIENT_CONNECT_WITH_DB
        | mp.CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA)
REFUSAL = BackendError("backend refused the login", code="1044", sqlstate="42000", server_message=DENIED)


def mysql_client(auth: str) -> MySQLClient:
    raw = {"clusters": {"main": {"engine": "mysql", "hosts": ["db.internal:3306"]}},
           "listeners": [{"name": "my", "listen": "127.0.0.1:6033", "cluster": "main", "auth": "trust"}]}
    listener = dataclasses.replace(build_config(raw, "", None).listeners[0], auth=auth)
    users = UsersFile()
    users.add("alice", "pw", kinds=["mysql_native_password", "caching_sha2_password"])
    ctx = ClientContext(listener=listener, users=users, tls_available=False, cancel_key=7, pin_policy=PinPolicy(),
                        max_message_size=1 << 20, client_address=("10.0.0.9", 5000))
    return MySQLClient(ctx, MySQLEngine())


def log_in(client: MySQLClient, plugin: bytes, scramble) -> list:
    nonce = mp.parse_handshake_v10(client.start()[4:])["nonce"]
    response = mp.handshake_response(CAPS, 45, b"alice", scramble("pw", nonce) if scramble else b"", b"secret", plugin)
    return client.receive_handshake(mp.packet(1, response))


@pytest.mark.parametrize("auth, plugin, scramble", [
    ("mysql_native_password", b"mysql_native_password", native_scramble),
    ("caching_sha2_password", b"caching_sha2_password", sha2_scramble),     # fast path: its notice is not sent
    ("trust", b"mysql_native_password", None),
])
def test_mysql_refusal_at_the_login_answers_the_handshake_response(auth, plugin, scramble):
    client = mysql_client(auth)
    events = log_in(client, plugin, scramble)
    assert isinstance(events[-1], Authenticated)
    reply = client.login_refused(REFUSAL)
    assert reply == mp.packet(2, mp.err_payload(1044, "42000", DENIED))
    assert client.error(ErrorKind.BACKEND_UNAVAILABLE, "down")[3] == 2


def test_mysql_refusal_after_an_auth_switch_and_full_authentication_follows_the_last_packet():
    client = mysql_client("caching_sha2_password")
    client.ctx.engine_options = {"caching_sha2_fast_auth": "false"}
    client.handshake.options = client.ctx.engine_options
    (switch,) = log_in(client, b"mysql_native_password", native_scramble)     # switched to caching_sha2 (seq 2)
    assert isinstance(switch, SendToClient) and switch.data[3] == 2
    (more,) = client.receive_handshake(mp.packet(3, sha2_scramble("pw", client.handshake.nonce)))
    assert more.data[3:] == bytes((4, mp.AUTH_MORE_DATA, mp.CACHING_SHA2_PERFORM_FULL_AUTHENTICATION))
    (public_key,) = client.receive_handshake(mp.packet(5, bytes((mp.CACHING_SHA2_REQUEST_PUBLIC_KEY,))))
    assert public_key.data[3] == 6
    assert client.login_refused(REFUSAL)[3] == 7


def test_mysql_refusal_at_the_first_command_is_its_answer():
    client = mysql_client("trust")
    log_in(client, b"mysql_native_password", None)
    client.login_complete(MySQLServerState(version=b"11.4.2-MariaDB"))
    assert client.login_refused(REFUSAL) == mp.packet(1, mp.err_payload(1044, "42000", DENIED))


# ---------------------------------------------------------------------------------------------- PostgreSQL

def test_postgres_backend_error_response_is_a_refusal_and_reaches_the_client_as_that_fatal():
    login = PostgresLogin(dataclasses.replace(TARGET, port=5432, database="nosuchdb"))
    login.start()
    with pytest.raises(BackendError) as refused:
        login.feed(pp.authentication(pp.AUTH_OK)
                   + pp.error_response("3D000", 'database "nosuchdb" does not exist', "FATAL"))
    error = refused.value
    assert (error.code, error.sqlstate, error.server_message) == ("3D000", "3D000", 'database "nosuchdb" does not exist')
    client = PostgresClient(contract_context(PostgresEngine()), mock_secret=b"x" * 32)
    assert client.login_refused(error) == pp.error_response("3D000", 'database "nosuchdb" does not exist', "FATAL")


# ---------------------------------------------------------------------------------------------- TDS

def test_tds_backend_login_error_is_a_refusal_and_reaches_the_client_as_that_error():
    login = TDSLogin(dataclasses.replace(TARGET, port=1433, database="nosuchdb"))
    login.start()
    login.feed(tp.encode_message(tp.TABULAR_RESULT, tp.Prelogin.build(encryption=tp.ENCRYPT_NOT_SUP).encode()))
    text = 'Cannot open database "nosuchdb" requested by the login. The login failed.'
    with pytest.raises(BackendError) as refused:
        login.feed(tp.encode_message(tp.TABULAR_RESULT, tk.error(4060, text, 1, 11, "lab") + tk.done(tk.DONE_ERROR)))
    error = refused.value
    assert (error.code, error.server_message, error.severity) == ("4060", text, 11)
    proto = TDSEngine().client_protocol(contract_context(TDSEngine()))
    (reply,) = tp.MessageReader().feed(proto.login_refused(error))
    tokens = tk.TokenReader().read(reply.data)
    assert reply.type == tp.TABULAR_RESULT
    assert [(t.number, t.text, t.severity) for t in tokens if t.type == tk.TOKEN_ERROR] == [(4060, text, 11)]
    assert tokens[-1].type == tk.TOKEN_DONE and tokens[-1].status & tk.DONE_ERROR


# ---------------------------------------------------------------------------------------------- greeting facts

def test_mysql_greets_from_another_logins_facts_and_names_its_variants():
    engine = MySQLEngine()
    facts = MySQLServerState(version=b"11.4.2-MariaDB", login_status=mp.SERVER_STATUS_AUTOCOMMIT, schema="mpdb")
    assert engine.welcome_facts_from(facts, "app", "shop", "other", "mpdb") is facts
    variant = engine.backend_variant({"capabilities": mp.CLIENT_DEPRECATE_EOF | mp.CLIENT_MULTI_RESULTS,
                                      "charset": 45})
    assert engine.variant_name(variant) == "deprecate_eof,multi_results,utf8mb4"
    assert engine.variant_name(engine.backend_variant({"capabilities": 0, "charset": 224})) == "utf8mb4_unicode_ci"
    assert engine.variant_name(engine.backend_variant({"capabilities": 0, "charset": 255})) == "utf8mb4#255"
    assert engine.variant_name(engine.backend_variant({"capabilities": mp.CLIENT_FOUND_ROWS, "charset": 99})) == \
        "found_rows,collation#99"


def test_postgres_and_tds_never_greet_from_another_logins_facts():
    # PostgreSQL's greeting carries the role's and database's own settings (is_superuser, session_authorization,
    # ALTER ROLE/DATABASE ... SET); TDS's the database and its collation.
    assert PostgresEngine().welcome_facts_from(object(), "app", "shop", "other", "mpdb") is None
    assert TDSEngine().welcome_facts_from(object(), "app", "shop", "other", "shop") is None
