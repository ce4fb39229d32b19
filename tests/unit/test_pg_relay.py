"""Golden byte vectors of PostgreSQL conversations replayed through PostgresClient whole, byte by byte and in random chunks."""
from __future__ import annotations

import dataclasses
import random
import re
import struct
from dataclasses import dataclass, field

import pytest

from multiproxy_engines.postgres import protocol as p
from multiproxy_engines.postgres.backend import PostgresLogin
from multiproxy_engines.postgres.client import PostgresClient
from multiproxy_engines.postgres.relay import BEGIN_SYNC
from multiproxy.auth import UsersFile
from multiproxy.config import build_config
from multiproxy.engine import HELD_REFUSAL, BackendTarget, ClientContext, ClientQuit, ErrorKind, PinReason
from multiproxy.pinning import PinPolicy

# ---------------------------------------------------------------- frontend messages (spec names)


def parse(name: str, sql: str, types: tuple[int, ...] = ()) -> bytes:
    body = p.cstring(name) + p.cstring(sql) + struct.pack("!h", len(types))
    body += b"".join(struct.pack("!I", t) for t in types)
    return p.message(b"P", body)


def bind(portal: str = "", statement: str = "", params: tuple[bytes | None, ...] = ()) -> bytes:
    body = p.cstring(portal) + p.cstring(statement) + struct.pack("!h", 0) + struct.pack("!h", len(params))
    for value in params:
        body += struct.pack("!i", -1) if value is None else struct.pack("!i", len(value)) + value
    return p.message(b"B", body + struct.pack("!h", 0))


def describe(kind: bytes, name: str = "") -> bytes:
    return p.message(b"D", kind + p.cstring(name))


def execute(portal: str = "", max_rows: int = 0) -> bytes:
    return p.message(b"E", p.cstring(portal) + struct.pack("!i", max_rows))


SYNC = b"S\x00\x00\x00\x04"
FLUSH = b"H\x00\x00\x00\x04"
COPY_DONE_FE = b"c\x00\x00\x00\x04"


def copy_data(payload: bytes) -> bytes:
    return p.message(b"d", payload)


# ---------------------------------------------------------------- backend messages (spec names)

PARSE_COMPLETE = b"1\x00\x00\x00\x04"
BIND_COMPLETE = b"2\x00\x00\x00\x04"
NO_DATA = b"n\x00\x00\x00\x04"
COPY_DONE_BE = b"c\x00\x00\x00\x04"
READY_IDLE = b"Z\x00\x00\x00\x05I"
READY_IN_TRANSACTION = b"Z\x00\x00\x00\x05T"
READY_FAILED = b"Z\x00\x00\x00\x05E"

# Hand-written: what PostgreSQL 16 sends for SELECT 1 (one int4 column named ?column?).
ROW_DESCRIPTION_SELECT_1 = (
    b"T\x00\x00\x00\x21\x00\x01?column?\x00"
    b"\x00\x00\x00\x00\x00\x00\x00\x00\x00\x17\x00\x04\xff\xff\xff\xff\x00\x00"
)
DATA_ROW_1 = b"D\x00\x00\x00\x0b\x00\x01\x00\x00\x00\x011"
COMMAND_COMPLETE_SELECT_1 = b"C\x00\x00\x00\x0dSELECT 1\x00"
QUERY_SELECT_1 = b"Q\x00\x00\x00\x0dSELECT 1\x00"


def row_description(*columns: tuple[str, int]) -> bytes:
    body = struct.pack("!h", len(columns))
    for name, type_oid in columns:
        body += p.cstring(name) + struct.pack("!IhIhih", 0, 0, type_oid, 4, -1, 0)
    return p.message(b"T", body)


def data_row(*values: bytes | None) -> bytes:
    body = struct.pack("!h", len(values))
    for value in values:
        body += struct.pack("!i", -1) if value is None else struct.pack("!i", len(value)) + value
    return p.message(b"D", body)


def command_complete(tag: str) -> bytes:
    return p.message(b"C", p.cstring(tag))


def parameter_description(*type_oids: int) -> bytes:
    return p.message(b"t", struct.pack("!h", len(type_oids)) + b"".join(struct.pack("!I", t) for t in type_oids))


def copy_response(kind: bytes, columns: int = 2) -> bytes:
    return p.message(kind, b"\x00" + struct.pack("!h", columns) + struct.pack("!h", 0) * columns)


def notification(pid: int, channel: str, payload: str) -> bytes:
    return p.message(b"A", struct.pack("!I", pid) + p.cstring(channel) + p.cstring(payload))


# ---------------------------------------------------------------- building clients and backends

SERVER_PARAMS = (
    ("application_name", ""),
    ("client_encoding", "UTF8"),
    ("DateStyle", "ISO, MDY"),
    ("integer_datetimes", "on"),
    ("IntervalStyle", "postgres"),
    ("server_encoding", "UTF8"),
    ("server_version", "16.2"),
    ("standard_conforming_strings", "on"),
    ("TimeZone", "UTC"),
)


def make_listener(auth: str = "trust"):
    raw = {
        "auth": {"users_file": "users.toml"},
        "clusters": {"main": {"engine": "postgres", "hosts": ["db.internal:5432"]}},
        "listeners": [{"name": "pg", "listen": "127.0.0.1:6432", "cluster": "main", "auth": auth}],
    }
    return build_config(raw, "", None).listeners[0]


# Named statements pin (rather than being virtualised) so that the relay's bytes stay verbatim.
ENGINE_OPTIONS = {"prepared_statements": "pin"}


def make_client(policy: PinPolicy | None = None, users: UsersFile | None = None, auth: str = "trust") -> PostgresClient:
    extra = {}
    if "engine_options" in {f.name for f in dataclasses.fields(ClientContext)}:
        extra["engine_options"] = dict(ENGINE_OPTIONS)
    ctx = ClientContext(listener=make_listener(auth), users=users or UsersFile.empty(), tls_available=False,
                        cancel_key=(1234, 5678), pin_policy=policy or PinPolicy(), max_message_size=1 << 20, **extra)
    return PostgresClient(ctx, mock_secret=b"x" * 32)


def link_backend(client: PostgresClient, state, to_backend: bytes = b"") -> bytes:
    """What the core sends to a freshly linked backend (the contract's `link`, formerly `link_prelude` + bytes)."""
    if hasattr(client, "link"):
        return client.link(state, to_backend)
    return client.link_prelude(state) + to_backend


def backend_state(params=SERVER_PARAMS, pid: int = 4242, secret: int = 9999):
    """A server state exactly as the engine's own login script records it from a server's greeting."""
    login = PostgresLogin(BackendTarget(host="db.internal", port=5432, user="alice", database="app",
                                        password=None, tls="disable"))
    login.start()
    greeting = p.authentication(p.AUTH_OK) + b"".join(p.parameter_status(k, v) for k, v in params)
    greeting += p.backend_key_data(pid, secret) + READY_IDLE
    assert login.feed(greeting) == b""
    assert login.done
    return login.result


def logged_in_client(startup: dict | None = None, policy: PinPolicy | None = None) -> PostgresClient:
    client = make_client(policy)
    events = client.receive_handshake(p.startup_message(startup or {"user": "alice", "database": "app"}))
    assert type(events[-1]).__name__ == "Authenticated"
    client.login_complete(backend_state())
    return client


def split_messages(data: bytes) -> list[bytes]:
    out, pos = [], 0
    while pos < len(data):
        length = struct.unpack_from("!I", data, pos + 1)[0]
        out.append(data[pos:pos + 1 + length])
        pos += 1 + length
    assert pos == len(data), "trailing partial message"
    return out


# ---------------------------------------------------------------- the replay machinery


@dataclass
class Step:
    """One leg of a conversation: bytes from the client or the server, with what the proxy must emit."""

    side: str                      # "client", "server" or "link" (a fresh backend is linked)
    data: bytes = b""
    to_backend: bytes | None = None
    to_client: bytes | None = None
    release: bool = False


def client_step(data: bytes, to_backend: bytes | None = None, to_client: bytes = b"") -> Step:
    return Step("client", data, data if to_backend is None else to_backend, to_client)


def server_step(data: bytes, to_client: bytes | None = None, release: bool = False) -> Step:
    return Step("server", data, to_client=data if to_client is None else to_client, release=release)


@dataclass
class Vector:
    name: str
    steps: list[Step]
    startup: dict = field(default_factory=lambda: {"user": "alice", "database": "app"})


def chunkings(data: bytes, mode: str, rng: random.Random) -> list[bytes]:
    if mode == "whole":
        return [data]
    if mode == "bytewise":
        return [data[i:i + 1] for i in range(len(data))]
    chunks, pos = [], 0
    while pos < len(data):
        size = rng.randint(1, 17)
        chunks.append(data[pos:pos + size])
        pos += size
    return chunks


def replay(vector: Vector, mode: str, seed: int = 0):
    """Feed every step in `mode`; return the client, its policy and per-step (to_backend, to_client, release flags)."""
    rng = random.Random(seed)
    policy = PinPolicy()
    client = logged_in_client(vector.startup, policy)
    state = backend_state()
    auto_link = not any(step.side == "link" for step in vector.steps)
    results = []
    for step in vector.steps:
        if step.side == "link":
            results.append((link_backend(client, state), b"", []))
            continue
        to_backend, to_client, flags = [], [], []
        for chunk in chunkings(step.data, mode, rng):
            if step.side == "client":
                forward, local = client.client_data(chunk)
                if forward and auto_link and not client.linked:
                    forward = link_backend(client, state, forward)   # as the core does after a borrow
                to_backend.append(forward)
                to_client.append(local)
            else:
                out, release = client.backend_data(chunk)
                to_client.append(out)
                flags.append(release)
                if release and auto_link and not client.pinned:
                    client.unlink()                                   # as the core does at a release
        results.append((b"".join(to_backend), b"".join(to_client), flags))
    return client, policy, results


MODES = ("whole", "bytewise", "random")


def check_vector(vector: Vector):
    """Every feeding mode yields the golden bytes and reports release exactly once at each expected step."""
    whole_client, whole_policy, whole = replay(vector, "whole")
    for mode, seed in [("whole", 0), ("bytewise", 0)] + [("random", s) for s in range(5)]:
        client, _, results = replay(vector, mode, seed)
        assert [r[:2] for r in results] == [r[:2] for r in whole], f"{vector.name}: {mode}/{seed} differs from whole feed"
        for index, (step, (to_backend, to_client, flags)) in enumerate(zip(vector.steps, results)):
            where = f"{vector.name} step {index} ({step.side}) fed {mode}/{seed}"
            if step.side == "link":
                continue
            if step.side == "client":
                assert to_backend == step.to_backend, where
            assert to_client == step.to_client, where
            assert sum(flags) == (1 if step.release else 0), f"{where}: release flags {flags}"
        assert client.is_clean(), f"{vector.name} fed {mode}: not clean at the end"
        assert client.pinned == whole_client.pinned
    return whole_client, whole_policy, whole


# ---------------------------------------------------------------- the vectors

SIMPLE_QUERY = Vector("simple query", [
    client_step(QUERY_SELECT_1),
    server_step(ROW_DESCRIPTION_SELECT_1 + DATA_ROW_1 + COMMAND_COMPLETE_SELECT_1 + READY_IDLE, release=True),
])

# pg8000: Parse (unnamed) + Sync, Describe + Sync, Bind + Execute + Sync. Each Sync answers 'I', but
# releasing before the Bind would send it to a backend that never saw the unnamed statement.
PG8000_THREE_SYNCS = Vector("pg8000 three syncs", [
    client_step(parse("", "SELECT $1::int4", (23,)) + SYNC),
    server_step(PARSE_COMPLETE + READY_IDLE, release=False),
    client_step(describe(b"S", "") + SYNC),
    server_step(parameter_description(23) + row_description(("int4", 23)) + READY_IDLE, release=False),
    client_step(bind("", "", (b"7",)) + execute("", 0) + SYNC),
    server_step(BIND_COMPLETE + data_row(b"7") + command_complete("SELECT 1") + READY_IDLE, release=True),
])

_BATCH = parse("", "SELECT 1") + bind() + describe(b"P") + execute() + SYNC
_BATCH_ANSWER = PARSE_COMPLETE + BIND_COMPLETE + ROW_DESCRIPTION_SELECT_1 + DATA_ROW_1 + COMMAND_COMPLETE_SELECT_1 + READY_IDLE

PSYCOPG_PIPELINE = Vector("psycopg pipeline, answers one by one", [
    client_step(_BATCH * 3),
    server_step(_BATCH_ANSWER, release=False),
    server_step(_BATCH_ANSWER, release=False),
    server_step(_BATCH_ANSWER, release=True),
])

PSYCOPG_PIPELINE_ONE_READ = Vector("psycopg pipeline, answers in one read", [
    client_step(_BATCH * 2),
    client_step(_BATCH),
    server_step(_BATCH_ANSWER * 3, release=True),
])

# BEGIN is answered by the proxy and sent with the first statement: as Parse/Bind/Execute with no Sync of its
# own, and a Sync behind the simple Query (an error in the BEGIN makes the server skip to a Sync).
LAZY_BEGIN_PREFIX = parse("", "BEGIN") + bind() + execute()
LAZY_BEGIN_ANSWER = PARSE_COMPLETE + BIND_COMPLETE + command_complete("BEGIN")

TRANSACTION = Vector("BEGIN .. COMMIT with a failed statement", [
    client_step(p.query("BEGIN"), b"", command_complete("BEGIN") + READY_IN_TRANSACTION),
    client_step(p.query("INSERT INTO t VALUES (1)"), LAZY_BEGIN_PREFIX + p.query("INSERT INTO t VALUES (1)") + SYNC),
    server_step(LAZY_BEGIN_ANSWER + command_complete("INSERT 0 1") + READY_IN_TRANSACTION + READY_IN_TRANSACTION,
                command_complete("INSERT 0 1") + READY_IN_TRANSACTION, release=False),
    client_step(p.query("SELECT 1/0")),
    server_step(p.error_response("22012", "division by zero") + READY_FAILED, release=False),
    client_step(p.query("COMMIT")),
    server_step(command_complete("ROLLBACK") + READY_IDLE, release=True),
])

EXTENDED_TRANSACTION = Vector("extended-protocol transaction (asyncpg style)", [
    client_step(parse("", "BEGIN") + bind() + execute() + SYNC),
    server_step(PARSE_COMPLETE + BIND_COMPLETE + command_complete("BEGIN") + READY_IN_TRANSACTION, release=False),
    client_step(_BATCH),
    server_step(_BATCH_ANSWER[:-6] + READY_IN_TRANSACTION, release=False),
    client_step(parse("", "COMMIT") + bind() + execute() + SYNC),
    server_step(PARSE_COMPLETE + BIND_COMPLETE + command_complete("COMMIT") + READY_IDLE, release=True),
])

COPY_IN_SIMPLE = Vector("COPY FROM STDIN by simple query", [
    client_step(p.query("COPY t FROM STDIN")),
    server_step(copy_response(b"G"), release=False),
    client_step(copy_data(b"1\tone\n") + copy_data(b"2\ttwo\n") + COPY_DONE_FE),
    server_step(command_complete("COPY 2") + READY_IDLE, release=True),
])

# The Sync sent with the Execute reaches the server in copy-in mode, which ignores it; only the Sync
# after CopyDone is answered.
COPY_IN_EXTENDED = Vector("COPY FROM STDIN by extended protocol", [
    client_step(parse("", "COPY t FROM STDIN") + bind() + describe(b"P") + execute() + SYNC),
    server_step(PARSE_COMPLETE + BIND_COMPLETE + NO_DATA + copy_response(b"G"), release=False),
    client_step(copy_data(b"1\tone\n") + copy_data(b"2\ttwo\n") + COPY_DONE_FE + SYNC),
    server_step(command_complete("COPY 2") + READY_IDLE, release=True),
])

COPY_OUT = Vector("COPY TO STDOUT", [
    client_step(p.query("COPY t TO STDOUT")),
    server_step(copy_response(b"H") + copy_data(b"1\tone\n"), release=False),
    server_step(copy_data(b"2\ttwo\n") + COPY_DONE_BE + command_complete("COPY 2") + READY_IDLE, release=True),
])

ASYNC_MESSAGES = Vector("NoticeResponse and NotificationResponse pass through", [
    client_step(p.query("DO $$BEGIN RAISE NOTICE 'hi'; END$$; SELECT 1")),
    server_step(p.notice_response("00000", "hi") + command_complete("DO") + notification(4242, "jobs", "42")
                + ROW_DESCRIPTION_SELECT_1 + DATA_ROW_1 + COMMAND_COMPLETE_SELECT_1 + READY_IDLE, release=True),
])

TRACKED_PARAMETER = Vector("SET of a reported parameter is tracked", [
    client_step(p.query("SET application_name = 'billing'")),
    server_step(command_complete("SET") + p.parameter_status("application_name", "billing") + READY_IDLE,
                release=True),
])

NAMED_STATEMENT = Vector("named Parse", [
    client_step(parse("s1", "SELECT $1::int4", (23,)) + describe(b"S", "s1") + SYNC),
    server_step(PARSE_COMPLETE + parameter_description(23) + row_description(("int4", 23)) + READY_IDLE, release=True),
    client_step(bind("", "s1", (b"1",)) + execute() + SYNC),
    server_step(BIND_COMPLETE + data_row(b"1") + command_complete("SELECT 1") + READY_IDLE, release=True),
])

ALL_VECTORS = [SIMPLE_QUERY, PG8000_THREE_SYNCS, PSYCOPG_PIPELINE, PSYCOPG_PIPELINE_ONE_READ, TRANSACTION,
               EXTENDED_TRANSACTION, COPY_IN_SIMPLE, COPY_IN_EXTENDED, COPY_OUT, ASYNC_MESSAGES, TRACKED_PARAMETER,
               NAMED_STATEMENT]


def test_hand_written_vectors_match_the_builders():
    assert QUERY_SELECT_1 == p.query("SELECT 1")
    assert ROW_DESCRIPTION_SELECT_1 == row_description(("?column?", 23))
    assert DATA_ROW_1 == data_row(b"1")
    assert COMMAND_COMPLETE_SELECT_1 == command_complete("SELECT 1")
    assert READY_IDLE == p.ready_for_query(p.TX_IDLE) == p.READY_IDLE
    assert READY_IN_TRANSACTION == p.ready_for_query(p.TX_IN_TRANSACTION)
    assert READY_FAILED == p.ready_for_query(p.TX_FAILED)
    assert SYNC == p.message(b"S")
    assert split_messages(_BATCH_ANSWER)[-1] == READY_IDLE


@pytest.mark.parametrize("vector", ALL_VECTORS, ids=lambda v: v.name)
def test_vector_relays_identically_in_every_chunking(vector):
    check_vector(vector)


def test_unnamed_statement_holds_the_backend_between_syncs():
    client, _, _ = check_vector(PG8000_THREE_SYNCS)
    assert not client.pinned


def test_transaction_status_is_reported_from_ready_for_query():
    client, _, _ = replay(Vector("t", TRANSACTION.steps[:3]), "whole")
    assert client.tx_status == p.TX_IN_TRANSACTION
    assert not client.is_clean()
    client, _, _ = replay(Vector("t", TRANSACTION.steps[:6]), "whole")
    assert client.tx_status == p.TX_FAILED


def test_copy_in_is_not_clean_until_the_copy_ends():
    client, _, _ = replay(Vector("c", COPY_IN_EXTENDED.steps[:2]), "whole")
    assert not client.is_clean()
    client, _, _ = replay(Vector("c", COPY_IN_SIMPLE.steps[:3]), "whole")
    assert not client.is_clean()


def test_parameter_status_updates_the_tracked_value_and_is_replayed_on_the_next_backend():
    client, policy, _ = check_vector(TRACKED_PARAMETER)
    assert client.client_params["application_name"] == "billing"
    assert not client.pinned
    assert sum(policy.detected_total.values()) == 0
    client.unlink()
    prelude = link_backend(client, backend_state())
    assert prelude_statements(prelude) == {'SET "application_name" = \'billing\''}


def test_named_parse_reports_a_prepared_statement_pin():
    client, policy, _ = check_vector(NAMED_STATEMENT)
    assert client.pinned
    assert policy.detected_total[PinReason.PREPARED_STATEMENT.value] == 1
    assert client.pin_details[0][0] is PinReason.PREPARED_STATEMENT


def test_named_parse_under_an_ignore_policy_does_not_pin():
    policy = PinPolicy({"prepared_statement": "ignore"})
    client = logged_in_client(policy=policy)
    forward, _ = client.client_data(parse("s1", "SELECT 1") + SYNC)
    link_backend(client, backend_state(), forward)
    assert not client.pinned
    assert policy.ignored_total["prepared_statement"] == 1


def test_query_text_pins_through_the_policy():
    policy = PinPolicy()
    client = logged_in_client(policy=policy)
    forward, _ = client.client_data(p.query("CREATE TEMP TABLE scratch (id int)"))
    assert not client.pinned and not policy.detected_total      # not before it reaches a backend
    link_backend(client, backend_state(), forward)
    assert client.pinned
    assert policy.detected_total["temp_table"] == 1


# ---------------------------------------------------------------- link_prelude

STARTUP_WITH_SETTINGS = {"user": "alice", "database": "app", "application_name": "psql",
                         "options": "-c search_path=app"}


_SET_CONFIG_CALL = re.compile(r"pg_catalog\.set_config\('((?:[^']|'')*)', '((?:[^']|'')*)', false\)")


def prelude_statements(prelude: bytes) -> set[str]:
    """The replayed settings as `SET "name" = 'value'` / `RESET "name"` lines, whatever SQL carries them."""
    (message,) = split_messages(prelude)
    assert message[:1] == b"Q"
    out = set()
    for statement in message[5:-1].decode().split(";"):
        if statement.startswith("RESET "):
            out.add(statement)
            continue
        assert statement.startswith("SELECT pg_catalog.set_config(")
        for name, value in _SET_CONFIG_CALL.findall(statement):
            out.add(f"SET \"{name}\" = '{value}'")
    return out


def test_link_prelude_sets_only_parameters_that_differ():
    client = logged_in_client(STARTUP_WITH_SETTINGS)
    client.client_data(QUERY_SELECT_1)
    prelude = link_backend(client, backend_state())
    assert prelude_statements(prelude) == {"SET \"application_name\" = 'psql'", "SET \"search_path\" = 'app'"}


def test_link_prelude_is_empty_when_the_backend_already_matches():
    client = logged_in_client()
    client.client_data(QUERY_SELECT_1)
    assert link_backend(client, backend_state()) == b""


def test_link_prelude_quotes_values():
    client = logged_in_client({"user": "alice", "database": "app", "application_name": "it's"})
    assert prelude_statements(link_backend(client, backend_state())) == {"SET \"application_name\" = 'it''s'"}


PRELUDE_ANSWER = (command_complete("SET") + p.parameter_status("application_name", "psql") + command_complete("SET")
                  + READY_IDLE)
LINKED_SELECT = Vector("link prelude answer is swallowed except ParameterStatus", [
    client_step(QUERY_SELECT_1),
    Step("link"),
    server_step(PRELUDE_ANSWER + ROW_DESCRIPTION_SELECT_1 + DATA_ROW_1 + COMMAND_COMPLETE_SELECT_1 + READY_IDLE,
                to_client=p.parameter_status("application_name", "psql") + ROW_DESCRIPTION_SELECT_1 + DATA_ROW_1
                + COMMAND_COMPLETE_SELECT_1 + READY_IDLE, release=True),
], startup=STARTUP_WITH_SETTINGS)

LINKED_SELECT_SEPARATE_READS = Vector("link prelude answer arrives before the client's", [
    client_step(QUERY_SELECT_1),
    Step("link"),
    server_step(PRELUDE_ANSWER, to_client=p.parameter_status("application_name", "psql"), release=False),
    server_step(ROW_DESCRIPTION_SELECT_1 + DATA_ROW_1 + COMMAND_COMPLETE_SELECT_1 + READY_IDLE, release=True),
], startup=STARTUP_WITH_SETTINGS)


@pytest.mark.parametrize("vector", [LINKED_SELECT, LINKED_SELECT_SEPARATE_READS], ids=lambda v: v.name)
def test_link_prelude_answer_is_swallowed(vector):
    check_vector(vector)


def test_failed_replay_becomes_a_warning_not_an_error():
    client = logged_in_client({"user": "alice", "database": "app", "options": "-c lock_timeout=abc"})
    client.client_data(QUERY_SELECT_1)
    assert prelude_statements(link_backend(client, backend_state())) == {"SET \"lock_timeout\" = 'abc'"}
    out, release = client.backend_data(p.error_response("22023", 'invalid value for parameter "lock_timeout": "abc"')
                                       + READY_IDLE)
    (warning,) = split_messages(out)
    assert warning[:1] == b"N"
    fields = p.parse_fields(warning[5:])
    assert fields["S"] == "WARNING" and "lock_timeout" in fields["M"]
    assert not release
    out, release = client.backend_data(ROW_DESCRIPTION_SELECT_1 + DATA_ROW_1 + COMMAND_COMPLETE_SELECT_1 + READY_IDLE)
    assert release


def test_replay_is_retried_after_the_prelude_failed():
    state = backend_state()
    client = logged_in_client({"user": "alice", "database": "app", "options": "-c search_path=app -c log_statement=all"})
    client.client_data(QUERY_SELECT_1)
    assert prelude_statements(link_backend(client, state)) == {"SET \"search_path\" = 'app'",
                                                              "SET \"log_statement\" = 'all'"}
    client.backend_data(command_complete("SET")
                        + p.error_response("42501", 'permission denied to set parameter "log_statement"') + READY_IDLE)
    client.backend_data(ROW_DESCRIPTION_SELECT_1 + DATA_ROW_1 + COMMAND_COMPLETE_SELECT_1 + READY_IDLE)
    client.unlink()
    client.client_data(QUERY_SELECT_1)
    assert "SET \"search_path\" = 'app'" in prelude_statements(link_backend(client, state) or p.query(""))


# ---------------------------------------------------------------- failures and local answers


def test_fail_pending_answers_each_outstanding_request():
    client = logged_in_client()
    client.client_data(QUERY_SELECT_1 + QUERY_SELECT_1)
    reply = client.fail_pending(ErrorKind.POOL_TIMEOUT, "no backend within 5 s")
    messages = split_messages(reply)
    assert messages[0][:1] == b"E" and p.parse_fields(messages[0][5:])["C"] == "53300"
    # each request is answered as a failing server would: its error, then ReadyForQuery
    assert messages[1:] == [READY_IDLE, messages[0], READY_IDLE]
    assert client.is_clean()


def test_fail_pending_discards_the_extended_batch_until_sync():
    client = logged_in_client()
    client.client_data(parse("", "SELECT 1") + bind())
    reply = client.fail_pending(ErrorKind.POOL_TIMEOUT, "no backend within 5 s")
    assert split_messages(reply)[0][:1] == b"E"
    forward, local = client.client_data(execute() + SYNC)
    assert forward == b""
    assert local == READY_IDLE
    assert client.client_data(QUERY_SELECT_1) == (QUERY_SELECT_1, b"")


def test_backend_lost_between_transactions_is_invisible():
    client, _, _ = replay(SIMPLE_QUERY, "whole")
    assert client.backend_lost("connection reset") == (b"", False)
    assert client.client_data(QUERY_SELECT_1) == (QUERY_SELECT_1, b"")


def test_backend_lost_mid_transaction_fails_the_next_request():
    client, _, _ = replay(Vector("t", TRANSACTION.steps[:3]), "whole")
    assert client.backend_lost("connection reset") == (b"", False)
    forward, local = client.client_data(p.query("COMMIT"))
    assert forward == b""
    error, ready = split_messages(local)
    assert p.parse_fields(error[5:])["C"] == "08006"
    assert ready == READY_IDLE


def test_backend_lost_mid_transaction_with_the_next_query_split_across_reads():
    client, _, _ = replay(Vector("t", TRANSACTION.steps[:3]), "whole")
    client.backend_lost("connection reset")
    commit = p.query("COMMIT")
    forwarded, answered = b"", b""
    for chunk in (commit[:7], commit[7:]):
        forward, local = client.client_data(chunk)
        forwarded += forward
        answered += local
    assert forwarded == b""
    assert split_messages(answered)[-1] == READY_IDLE


def test_backend_lost_with_requests_outstanding_answers_them():
    client = logged_in_client()
    client.client_data(QUERY_SELECT_1)
    reply, close = client.backend_lost("connection reset")
    assert not close
    error, ready = split_messages(reply)
    assert p.parse_fields(error[5:])["C"] == "08006" and ready == READY_IDLE


def test_backend_lost_mid_message_closes_the_client():
    client = logged_in_client()
    client.client_data(QUERY_SELECT_1)
    client.backend_data(ROW_DESCRIPTION_SELECT_1[:10])
    reply, close = client.backend_lost("connection reset")
    assert close
    assert p.parse_fields(split_messages(reply)[0][5:])["S"] == "FATAL"


def test_terminate_is_not_forwarded():
    client = logged_in_client()
    with pytest.raises(ClientQuit) as quit:
        client.client_data(QUERY_SELECT_1 + b"X\x00\x00\x00\x04")
    assert quit.value.to_backend == QUERY_SELECT_1 and quit.value.to_client == b""


def test_reset_bytes_is_an_internal_request_whose_answer_is_swallowed():
    client, _, _ = replay(SIMPLE_QUERY, "whole")
    reset = client.reset_bytes(backend_state())
    assert reset == p.query("DISCARD ALL")
    out, release = client.backend_data(command_complete("DISCARD ALL") + READY_IDLE)
    assert out == b"" and release


def test_release_is_reported_when_an_async_message_after_ready_is_split():
    client = logged_in_client()
    client.client_data(QUERY_SELECT_1)
    answer = COMMAND_COMPLETE_SELECT_1 + READY_IDLE + notification(4242, "jobs", "42")
    flags = [client.backend_data(answer[:-3])[1], client.backend_data(answer[-3:])[1]]
    assert flags.count(True) == 1


def test_copy_ended_by_the_server_does_not_hide_later_syncs():
    client = logged_in_client()
    client.client_data(p.query("COPY t FROM STDIN"))
    client.backend_data(copy_response(b"G"))
    client.client_data(copy_data(b"not a number\n"))
    out, release = client.backend_data(p.error_response("22P02", "invalid input syntax for type integer") + READY_IDLE)
    assert release
    client.client_data(_BATCH * 2)
    assert client.backend_data(_BATCH_ANSWER)[1] is False
    assert client.backend_data(_BATCH_ANSWER)[1] is True


def test_lone_sync_and_flush_need_no_backend():
    """psycopg leaving a failed pipeline sends Sync then Flush; neither may borrow a backend."""
    client = logged_in_client()
    forward, local = client.client_data(SYNC + p.message(b"H"))
    assert forward == b"" and local == READY_IDLE
    assert client.is_clean()


# ---------------------------------------------------------------- read-only refusals (issue 11)

READ_ONLY_ERROR = p.error_response("25006", "cannot execute INSERT in a read-only transaction", "ERROR")
INSERT = p.query("INSERT INTO t VALUES (1)")


def retrying_client(startup: dict | None = None) -> PostgresClient:
    client = logged_in_client(startup)
    client.retry_read_only = True
    return client


def first_statement(client: PostgresClient, request: bytes = INSERT) -> bytes:
    """The client's first statement on a backend that already has its settings (no replay in between)."""
    to_backend, _ = client.client_data(request)
    state = backend_state()
    state.settings = dict(client.client_settings)
    sent = link_backend(client, state, to_backend)
    assert sent == request
    return sent


@pytest.mark.parametrize("chunked", [False, True])
def test_a_read_only_refusal_is_held_and_delivered_unchanged_when_the_node_stays_writer(chunked):
    client = retrying_client()
    first_statement(client)
    answer = READ_ONLY_ERROR + READY_IDLE
    out = b""
    for piece in ([answer[i:i + 1] for i in range(len(answer))] if chunked else [answer]):
        sent, outcome = client.backend_data(piece)
        out += sent
        assert outcome in (False, HELD_REFUSAL)
    assert out == b"" and outcome == HELD_REFUSAL and client.retry_request == INSERT
    delivered, release = client.retry_declined()
    assert delivered == answer and release and client.retry_request is None and client.is_clean()


def test_a_read_only_refusal_accepted_gives_back_the_request_with_the_state_before_it():
    client = retrying_client()
    first_statement(client)
    assert client.backend_data(READ_ONLY_ERROR + READY_IDLE) == (b"", HELD_REFUSAL)
    assert client.retry_accepted() == INSERT
    client.unlink()
    resent = link_backend(client, backend_state(), INSERT)
    assert resent == INSERT
    ok = command_complete("INSERT 0 1") + READY_IDLE
    assert client.backend_data(ok) == (ok, True)


def test_the_opening_of_an_extended_answer_is_held_with_its_refusal():
    client = retrying_client()
    request = parse("", "INSERT INTO t VALUES ($1)") + bind(params=(b"1",)) + execute() + SYNC
    first_statement(client, request)
    sent, release = client.backend_data(PARSE_COMPLETE + BIND_COMPLETE)
    assert sent == b"" and not release                      # not shown yet: it may be sent again elsewhere
    sent, outcome = client.backend_data(READ_ONLY_ERROR + READY_IDLE)
    assert sent == b"" and outcome == HELD_REFUSAL and client.retry_request == request
    assert client.retry_declined() == (PARSE_COMPLETE + BIND_COMPLETE + READ_ONLY_ERROR + READY_IDLE, True)


def test_an_answer_that_is_no_refusal_is_released_as_soon_as_it_shows():
    client = retrying_client()
    first_statement(client, QUERY_SELECT_1)
    assert client.backend_data(ROW_DESCRIPTION_SELECT_1) == (b"", False)
    rest = DATA_ROW_1 + COMMAND_COMPLETE_SELECT_1 + READY_IDLE
    assert client.backend_data(rest) == (ROW_DESCRIPTION_SELECT_1 + rest, True)
    assert client.retry_request is None


@pytest.mark.parametrize("startup, statement", [
    ({"user": "alice", "database": "app", "options": "-c default_transaction_read_only=on"}, INSERT),
    (None, p.query("BEGIN READ ONLY; INSERT INTO t VALUES (1)")),
])
def test_a_session_that_asked_for_read_only_gets_its_refusal_at_once(startup, statement):
    client = retrying_client(startup)
    first_statement(client, statement)
    answer = READ_ONLY_ERROR + READY_IDLE
    assert client.backend_data(answer) == (answer, True) and client.retry_request is None


def _lazily_begun(client: PostgresClient, begin: str) -> bytes:
    """`begin` answered by the proxy, then INSERT sent behind it to a backend that has the session's settings."""
    tag = b"START TRANSACTION" if begin.lower().startswith("start") else b"BEGIN"
    assert client.client_data(p.query(begin)) == (b"", p.message(b"C", tag + b"\x00") + READY_IN_TRANSACTION)
    to_backend, _ = client.client_data(INSERT)
    assert to_backend == INSERT
    state = backend_state()
    state.settings = dict(client.client_settings)
    sent = link_backend(client, state, to_backend)
    assert sent == parse("", begin) + bind() + execute() + INSERT + SYNC
    return sent


def test_a_refusal_after_a_lazy_begin_read_only_goes_to_the_client_at_once():
    client = retrying_client()
    _lazily_begun(client, "START TRANSACTION READ   ONLY")
    answer = READ_ONLY_ERROR + READY_FAILED
    out, release = client.backend_data(LAZY_BEGIN_ANSWER + answer + READY_FAILED)
    assert (out, release) == (answer, False) and client.retry_request is None


def test_a_refused_first_statement_after_a_lazy_begin_is_retried_with_its_begin():
    client = retrying_client()
    _lazily_begun(client, "BEGIN ISOLATION LEVEL REPEATABLE READ")
    out, outcome = client.backend_data(LAZY_BEGIN_ANSWER + READ_ONLY_ERROR + READY_FAILED)
    assert out == b"" and outcome == HELD_REFUSAL
    assert client.retry_accepted() == INSERT
    client.unlink()
    # On the new writer the BEGIN goes in front again, and the answer reaches the client without it.
    sent = link_backend(client, backend_state(), INSERT)
    assert sent == parse("", "BEGIN ISOLATION LEVEL REPEATABLE READ") + bind() + execute() + INSERT + SYNC
    answer = command_complete("INSERT 0 1") + READY_IN_TRANSACTION
    assert client.backend_data(LAZY_BEGIN_ANSWER + answer + READY_IN_TRANSACTION) == (answer, False)


def test_a_read_only_setting_the_server_reports_by_itself_is_not_the_clients():
    # A DBA made the node read-only (ALTER SYSTEM + reload): the ParameterStatus is the node's, not the session's.
    client = retrying_client()
    first_statement(client, QUERY_SELECT_1)
    status = p.parameter_status("default_transaction_read_only", "on")
    answer = status + ROW_DESCRIPTION_SELECT_1 + DATA_ROW_1 + COMMAND_COMPLETE_SELECT_1 + READY_IDLE
    assert client.backend_data(answer) == (answer, True)
    assert "default_transaction_read_only" not in client.client_settings
    assert "default_transaction_read_only" not in client.client_params


def test_startup_options_that_are_no_settings_are_refused_at_login():
    client = make_client()
    events = client.receive_handshake(p.startup_message({"user": "alice", "database": "app",
                                                         "options": "-c search_path=x -e"}))
    assert type(events[-1]).__name__ == "CloseClient"
    assert b"startup option '-e'" in events[-1].data


# ---------------------------------------------------------------- issue 13: resets, replayed settings, no pin before a backend

def _run(client, state, sql: str, answer: bytes = b"") -> bool:
    """One simple Query through the relay as the core runs it: link if needed, the server's answer, release."""
    forward, local = client.client_data(p.query(sql))
    assert forward and not local
    if not client.linked:
        link_backend(client, state, forward)
    replay = READY_IDLE if client.fifo and client.fifo[0] == 0 else b""     # the proxy's own SETs, answered
    _, release = client.backend_data(replay + (answer or command_complete("SET")) + READY_IDLE)
    if release and not client.pinned:
        client.unlink()
    return release


def test_plain_settings_are_tracked_and_replayed_not_pinned():
    policy = PinPolicy()
    client = logged_in_client(policy=policy)
    first = backend_state()
    for sql in ("SET extra_float_digits = 3", "SET search_path = app, public", "SET statement_timeout = 4321",
                "SELECT set_config('lock_timeout', '250ms', false)"):
        assert _run(client, first, sql)
        assert not client.pinned and not client.linked
    assert client.client_settings == {"extra_float_digits": "3", "search_path": "app, public",
                                      "statement_timeout": "4321", "lock_timeout": "250ms"}
    assert first.settings == client.client_settings          # the backend that ran them has them
    assert not policy.detected_total and not +policy.pinned_now
    client.client_data(QUERY_SELECT_1)
    assert link_backend(client, first) == b""                 # nothing to replay on that backend
    client.backend_data(COMMAND_COMPLETE_SELECT_1 + READY_IDLE)
    client.unlink()
    client.client_data(QUERY_SELECT_1)
    assert prelude_statements(link_backend(client, backend_state())) == {
        "SET \"extra_float_digits\" = '3'", "SET \"search_path\" = 'app, public'",
        "SET \"statement_timeout\" = '4321'", "SET \"lock_timeout\" = '250ms'"}


def test_reported_parameters_set_by_set_config_neither_pin_nor_double_track():
    policy = PinPolicy()
    client = logged_in_client(policy=policy)
    assert _run(client, backend_state(), "SELECT set_config('TimeZone', 'Asia/Tokyo', false)",
                p.parameter_status("TimeZone", "Asia/Tokyo") + command_complete("SELECT 1"))
    assert not client.pinned and client.client_settings == {}
    assert client.client_params["timezone"] == "Asia/Tokyo"
    assert not policy.detected_total


def test_set_local_and_transaction_scoped_set_config_track_nothing():
    client = logged_in_client()
    assert _run(client, backend_state(), "SET LOCAL statement_timeout = 5; SELECT set_config('a.b', 'c', true)")
    assert client.client_settings == {} and not client.pinned


def test_reset_all_clears_tracked_settings_and_the_next_backend_is_reset():
    client = logged_in_client()
    used = backend_state()
    assert _run(client, used, "SET statement_timeout = 4321; SET extra_float_digits = 3")
    assert _run(client, backend_state(), "RESET ALL")
    assert client.client_settings == {} and not client.pinned
    client.client_data(QUERY_SELECT_1)
    assert prelude_statements(link_backend(client, used)) == {'RESET "statement_timeout"', 'RESET "extra_float_digits"'}


def test_reset_name_forgets_one_setting():
    client = logged_in_client()
    state = backend_state()
    assert _run(client, state, "SET statement_timeout = 4321; SET extra_float_digits = 3")
    assert _run(client, state, "RESET statement_timeout")
    assert client.client_settings == {"extra_float_digits": "3"} and state.settings == {"extra_float_digits": "3"}
    assert _run(client, state, "SET extra_float_digits TO DEFAULT")
    assert client.client_settings == {} and state.settings == {}


def test_with_hold_cursor_pins_until_its_last_close():
    policy = PinPolicy()
    client = logged_in_client(policy=policy)
    state = backend_state()
    assert _run(client, state, "DECLARE a CURSOR WITH HOLD FOR SELECT 1", command_complete("DECLARE CURSOR"))
    assert _run(client, state, "DECLARE b CURSOR WITH HOLD FOR SELECT 1", command_complete("DECLARE CURSOR"))
    assert client.pinned and client.linked and policy.pinned_now["cursor_with_hold"] == 1
    assert _run(client, state, "CLOSE a", command_complete("CLOSE CURSOR"))
    assert client.pinned and client.linked
    assert _run(client, state, "CLOSE b", command_complete("CLOSE CURSOR"))
    assert not client.pinned and not client.linked and policy.pinned_now["cursor_with_hold"] == 0
    assert client.pin_details == []


def test_close_all_discard_temp_unlisten_unlock_all_unpin():
    for pin_sql, reset_sql in (("DECLARE c CURSOR WITH HOLD FOR SELECT 1", "CLOSE ALL"),
                               ("CREATE TEMP TABLE t (id int)", "DISCARD TEMP"),
                               ("LISTEN jobs; LISTEN other", "UNLISTEN *"),
                               ("SELECT pg_advisory_lock(1)", "SELECT pg_advisory_unlock_all()")):
        policy = PinPolicy()
        client = logged_in_client(policy=policy)
        state = backend_state()
        _run(client, state, pin_sql)
        assert client.pinned, pin_sql
        assert _run(client, state, reset_sql)
        assert not client.pinned and not +policy.pinned_now, reset_sql


def test_unlisten_of_one_channel_unpins_only_after_the_last():
    client = logged_in_client()
    state = backend_state()
    _run(client, state, "LISTEN a; LISTEN b")
    _run(client, state, "UNLISTEN a")
    assert client.pinned
    _run(client, state, "UNLISTEN b")
    assert not client.pinned


def test_asyncpg_pool_reset_leaves_the_session_unpinned():
    policy = PinPolicy()
    client = logged_in_client(policy=policy)
    state = backend_state()
    _run(client, state, "SELECT pg_advisory_lock(7); LISTEN jobs; DECLARE c CURSOR WITH HOLD FOR SELECT 1; "
                        "SET statement_timeout = 5")
    assert client.pinned and policy.pinned_now["advisory_lock"] == 1
    assert _run(client, state, "SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL;")
    assert not client.pinned and not client.linked and not +policy.pinned_now
    assert client.client_settings == {}


def test_reset_all_keeps_the_tracked_role_and_unpins_other_reasons_only_when_all_are_gone():
    client = logged_in_client()
    state = backend_state()
    _run(client, state, "SET ROLE reporting; CREATE TEMP TABLE t (id int)")
    _run(client, state, "RESET ALL")
    assert client.pinned and client.client_settings == {"role": "reporting"}
    _run(client, state, "DISCARD TEMP")
    assert not client.pinned and client.client_settings == {"role": "reporting"}
    _run(client, state, "RESET ROLE")
    assert client.client_settings == {}


def test_a_request_that_never_reached_a_backend_changes_nothing():
    policy = PinPolicy()
    client = logged_in_client(policy=policy)
    for sql in ("SET statement_timeout = 1", "CREATE TEMP TABLE t (id int)", "SET ROLE x",
                "DECLARE c CURSOR WITH HOLD FOR SELECT 1"):
        forward, _ = client.client_data(p.query(sql))
        assert forward
        out = client.fail_pending(ErrorKind.POOL_TIMEOUT, "no database connection became free within 1 s")
        assert out.endswith(READY_IDLE)
        assert not client.pinned and client.client_settings == {} and client.pin_details == []
    assert not policy.detected_total and not +policy.pinned_now
    # the next request that does reach a backend is not charged with the failed ones
    assert _run(client, backend_state(), "SELECT 1", COMMAND_COMPLETE_SELECT_1)
    assert not client.pinned and not policy.detected_total


def test_a_pinning_parse_that_never_reached_a_backend_does_not_pin():
    policy = PinPolicy()
    client = logged_in_client(policy=policy)
    client.client_data(parse("s1", "SELECT 1") + SYNC)
    client.fail_pending(ErrorKind.POOL_TIMEOUT, "timeout")
    assert not client.pinned and not policy.detected_total


def _step(client, state, sql: str, answer: bytes, status: int = p.TX_IDLE) -> None:
    """`sql` through the proxy to a backend that answers it with `answer` and ReadyForQuery(status)."""
    forward, _ = client.client_data(p.query(sql))
    if not forward:
        return                                  # answered by the proxy (a BEGIN, or COMMIT of nothing)
    if not client.linked:
        link_backend(client, state, forward)
    replay = READY_IDLE if client.fifo and client.fifo[0] == 0 else b""
    if client.begin_answer:
        answer = LAZY_BEGIN_ANSWER + answer
    ready = p.ready_for_query(status)
    if BEGIN_SYNC in client.fifo:
        ready += ready
    _, release = client.backend_data(replay + answer + ready)
    if release and not client.pinned:
        client.unlink()


def test_settings_of_a_rolled_back_transaction_are_not_tracked():
    from multiproxy_engines.postgres.relay import UNKNOWN_SETTING
    client = logged_in_client()
    state = backend_state()
    _step(client, state, "SET extra_float_digits = 3", command_complete("SET"))
    _step(client, state, "BEGIN", command_complete("BEGIN"), p.TX_IN_TRANSACTION)
    _step(client, state, "SET statement_timeout = 5; SET extra_float_digits = 2", command_complete("SET") * 2,
          p.TX_IN_TRANSACTION)
    assert client.client_settings == {"extra_float_digits": "2", "statement_timeout": "5"}
    _step(client, state, "ROLLBACK", command_complete("ROLLBACK"))
    assert client.client_settings == {"extra_float_digits": "3"}
    assert state.settings == {"extra_float_digits": UNKNOWN_SETTING, "statement_timeout": UNKNOWN_SETTING}
    client.client_data(QUERY_SELECT_1)
    assert prelude_statements(link_backend(client, state)) == {'RESET "statement_timeout"',
                                                               "SET \"extra_float_digits\" = '3'"}


def test_a_failed_set_is_not_tracked_and_a_committed_one_is():
    client = logged_in_client()
    state = backend_state()
    _step(client, state, "SET lock_timeout = 'abc'", p.error_response("22023", 'invalid value for parameter "lock_timeout"'))
    assert client.client_settings == {}
    _step(client, state, "BEGIN; SET lock_timeout = 10", command_complete("BEGIN") + command_complete("SET"),
          p.TX_IN_TRANSACTION)
    _step(client, state, "SELECT 1/0", p.error_response("22012", "division by zero"), p.TX_FAILED)
    _step(client, state, "ROLLBACK", command_complete("ROLLBACK"))
    assert client.client_settings == {}
    _step(client, state, "BEGIN; SET lock_timeout = 10", command_complete("BEGIN") + command_complete("SET"),
          p.TX_IN_TRANSACTION)
    _step(client, state, "COMMIT", command_complete("COMMIT"))
    assert client.client_settings == {"lock_timeout": "10"} and state.settings == {"lock_timeout": "10"}


def test_a_reset_that_failed_or_was_rolled_back_keeps_the_pin():
    policy = PinPolicy()
    client = logged_in_client(policy=policy)
    state = backend_state()
    _step(client, state, "DECLARE a CURSOR WITH HOLD FOR SELECT 1; DECLARE b CURSOR WITH HOLD FOR SELECT 1",
          command_complete("DECLARE CURSOR") * 2)
    _step(client, state, "BEGIN", command_complete("BEGIN"), p.TX_IN_TRANSACTION)
    _step(client, state, "SELECT 1/0", p.error_response("22012", "division by zero"), p.TX_FAILED)
    _step(client, state, "CLOSE ALL", p.error_response("25P02", "current transaction is aborted"), p.TX_FAILED)
    assert not client.pinned                  # for now; the transaction's end decides
    _step(client, state, "ROLLBACK", command_complete("ROLLBACK"))
    assert client.pinned and client.linked and policy.pinned_now["cursor_with_hold"] == 1
    _step(client, state, "CLOSE a", command_complete("CLOSE CURSOR"))
    assert client.pinned                      # b is still open: the keys came back too
    _step(client, state, "LISTEN x; CLOSE b", command_complete("LISTEN") + command_complete("CLOSE CURSOR"))
    _step(client, state, "UNLISTEN *; SELECT 1/0", command_complete("UNLISTEN") + p.error_response("22012", "x"))
    assert client.pinned and policy.pinned_now["listen"] == 1
    _step(client, state, "UNLISTEN *", command_complete("UNLISTEN"))
    assert not client.pinned and not client.linked and not +policy.pinned_now
