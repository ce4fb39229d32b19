"""Worker custody's pure parts (multiproxy.custody): the busy map shared with a forked process, the supervisor's book of
held clients, descriptors over a socketpair, a shut-down connection ending for its peer while another descriptor of it
stays open, each engine's change signal (handover_generation) and the session record a worker sends."""
from __future__ import annotations

import array
import json
import os
import socket
from types import SimpleNamespace

from multiproxy.custody import BUSY, IDLE, BusyMap, CustodyBook, received_fds, shut_and_close
from multiproxy.handover import decode
from multiproxy.takeover import export_record
from multiproxy_engines.postgres import PostgresEngine
from multiproxy_engines.postgres import protocol as pgp
from multiproxy_engines.tds.backend import TDSServerState
from multiproxy_engines.tds.wire import token_stream as tk

from ..fuzzkit import tds_logged_in
from .test_mysql_relay import logged_in, ok, query, server_state
from .test_pg_relay import (COMMAND_COMPLETE_SELECT_1, DATA_ROW_1, QUERY_SELECT_1, READY_IDLE, ROW_DESCRIPTION_SELECT_1,
                            backend_state, command_complete, link_backend, logged_in_client)
from .test_tds_session_state import batch, reply, roundtrip


# ---------------------------------------------------------------- the busy map

def test_the_busy_map_is_shared_with_a_forked_process():
    busy = BusyMap(64)
    try:
        pid = os.fork()
        if pid == 0:
            busy[5] = BUSY
            busy[63] = BUSY
            os._exit(0)
        os.waitpid(pid, 0)
        assert [slot for slot in range(64) if busy.busy(slot)] == [5, 63]
        busy[5] = IDLE
        assert not busy.busy(5) and busy[63] == BUSY
        busy.clear()
        assert not any(busy.busy(slot) for slot in range(64))
    finally:
        busy.close()


# ---------------------------------------------------------------- the supervisor's book

def test_the_book_holds_updates_and_drops_clients_closing_their_descriptors():
    closed = []
    book = CustodyBook(close=closed.append)
    book.hold(0, 100, {"n": 1}, key_counter=7)
    book.hold(1, 101, None, key_counter=3)
    assert book.key_counter == 7
    assert book.update(0, {"n": 2}) and book.held[0].record == {"n": 2}
    assert not book.update(9, {"n": 3})          # a slot never held (its hold was lost): nothing to update
    book.hold(0, 102, {"n": 4})                  # the slot's previous client left unseen: its descriptor closes
    assert closed == [100]
    assert book.unhold(1) and closed == [100, 101]
    assert not book.unhold(1)
    assert book.fds() == [102]


def test_after_a_death_idle_clients_stay_held_and_busy_ones_or_those_without_a_record_go():
    closed = []
    book = CustodyBook(close=closed.append)
    busy = BusyMap(8)
    try:
        book.hold(0, 10, {"idle": True})
        book.hold(1, 11, {"busy": True})
        book.hold(2, 12, None)                   # its engine could not export it yet: it cannot be resumed
        busy[1] = BUSY
        idle, gone = book.after_death(busy)
        assert [(slot, held.fd) for slot, held in idle] == [(0, 10)]
        assert sorted(held.fd for held in gone) == [11, 12]
        assert list(book.held) == [0] and closed == []      # the caller shuts the busy ones down
        assert [held.fd for held in book.release_all()] == [10] and not book.held
    finally:
        busy.close()


# ---------------------------------------------------------------- descriptors

def test_a_message_with_a_descriptor_arrives_with_its_descriptor():
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    a, b = socket.socketpair()
    with left, right, a, b:
        line = json.dumps({"op": "hold", "slot": 3}).encode() + b"\n"
        left.sendmsg([line], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [a.fileno()]))])
        left.sendall(b'{"op": "beat"}\n')
        data, ancillary, _, _ = right.recvmsg(65536, socket.CMSG_SPACE(16 * 4))
        (fd,) = received_fds(ancillary)
        with socket.socket(fileno=fd) as copy:
            copy.sendall(b"through the copy")
            assert b.recv(100) == b"through the copy"
        assert data.startswith(line)


def test_shut_and_close_ends_the_connection_while_another_descriptor_of_it_stays_open():
    server = socket.create_server(("127.0.0.1", 0))
    with server:
        client = socket.create_connection(server.getsockname())
        accepted, _ = server.accept()
        with client, accepted:
            kept = os.dup(accepted.fileno())     # the worker's copy (or the supervisor's)
            try:
                shut_and_close(os.dup(accepted.fileno()))
                client.settimeout(5)
                assert client.recv(10) == b""    # the client reads the end although `kept` is open
            finally:
                os.close(kept)


# ---------------------------------------------------------------- the change signal

def test_postgres_generation_moves_with_settings_and_statements_not_with_queries():
    client = logged_in_client()
    start = client.handover_generation()
    state = backend_state()
    forward, _ = client.client_data(QUERY_SELECT_1)
    link_backend(client, state, forward)
    client.backend_data(ROW_DESCRIPTION_SELECT_1 + DATA_ROW_1 + COMMAND_COMPLETE_SELECT_1 + READY_IDLE)
    client.unlink()
    assert client.handover_generation() == start              # a query changes nothing a resumed session needs
    forward, _ = client.client_data(pgp.query("SET application_name = 'custody'"))
    link_backend(client, state, forward)
    client.backend_data(command_complete("SET") + pgp.parameter_status("application_name", "custody") + READY_IDLE)
    client.unlink()
    after_set = client.handover_generation()
    assert after_set > start
    # The same value reported again (a replay on another backend) is no change.
    client._parameter_status(*_status("application_name", "custody"))
    assert client.handover_generation() == after_set
    client.virtualize = True                     # prepared_statements = "virtualize", the default
    forward, _ = client.client_data(pgp.message(b"P", b"stmt1\x00SELECT 1\x00\x00\x00") + pgp.message(b"S"))
    if forward:                                  # prepared on a backend (else recorded by the proxy alone)
        link_backend(client, state, forward)
    assert client.handover_generation() > after_set and b"stmt1" in client.statements


def _status(name: str, value: str) -> tuple:
    body = pgp.cstring(name) + pgp.cstring(value)
    return body, 0, len(body)


def test_mysql_generation_moves_with_a_tracked_setting_not_with_queries():
    client = logged_in()
    state = server_state()
    start = client.handover_generation()
    forward, _ = client.client_data(query(b"SELECT 1"))
    client.link(state, forward)
    client.backend_data(ok())
    client.unlink()
    assert client.handover_generation() == start
    forward, _ = client.client_data(query(b"SET SESSION sql_mode = 'ANSI_QUOTES'"))
    client.link(state, forward)
    client.backend_data(ok())
    client.unlink()
    assert client.handover_generation() > start
    assert client.variables.get("sql_mode") == "'ANSI_QUOTES'"


def test_tds_generation_moves_with_an_accepted_set_option_not_with_queries():
    proto, state = tds_logged_in(), TDSServerState()
    start = proto.handover_generation()
    roundtrip(proto, state, batch("SELECT 1"), reply(tk.done()))
    assert proto.handover_generation() == start
    roundtrip(proto, state, batch("SET DATEFIRST 3"), reply(tk.done()))
    assert proto.handover_generation() > start


# ---------------------------------------------------------------- the record

def test_the_record_a_worker_sends_is_json_and_resumes_the_same_session():
    client = logged_in_client({"user": "alice", "database": "app", "application_name": "custody"})
    session = SimpleNamespace(proto=client, listener=SimpleNamespace(name="pg"), engine=SimpleNamespace(name="postgres"),
                              user="alice", database="app", cancel_key=(1234, 5678), address=("127.0.0.1", 40000),
                              connected_at=1.5, transaction_mode=True, linked_once=True, pool=SimpleNamespace(variant=()),
                              _where=lambda: "test")
    record = export_record(session)
    line = json.dumps(record).encode()
    assert b"\n" not in line and 500 < len(line) < 8192       # a JSON line on the worker's channel, a few KB
    record = json.loads(line)
    assert decode(record["session"])["cancel_key"] == (1234, 5678)
    resumed = PostgresEngine().resume_client(client.ctx, record["state"])
    assert resumed.client_params == client.client_params and resumed.startup_params == client.startup_params
    assert resumed.handover_generation() == client.handover_generation()


# ---------------------------------------------------------------- the worker's side

class RecordingLink:
    """The worker's channel as WorkerCustody sees it, recording what it would send."""
    closed = False

    def __init__(self):
        self.sent = []

    def send(self, message):
        self.sent.append(message)

    def send_with_fds(self, message, fds):
        self.sent.append({**message, "fds": len(fds)})
        return True


def test_a_worker_sends_a_record_at_login_and_again_only_when_the_session_changed():
    import _socket

    from multiproxy.custody import WorkerCustody
    from multiproxy.fastio import ClientSocket
    ours, theirs = _socket.socketpair()
    client = logged_in_client()
    link = RecordingLink()
    custody = WorkerCustody(SimpleNamespace(worker=0, cancel_keys_issued=41), link, BusyMap(4))
    session = SimpleNamespace(proto=client, listener=SimpleNamespace(name="pg"), engine=SimpleNamespace(name="postgres"),
                              user="alice", database="app", cancel_key=(1234, 5678), address=("127.0.0.1", 40000),
                              connected_at=1.5, transaction_mode=True, linked_once=True, pool=SimpleNamespace(variant=()),
                              _where=lambda: "test", sock=ClientSocket(ours), leftover=b"", backend=None,
                              client_gone=False, custody_slot=None)
    try:
        custody.hold(session)
        (hold,) = link.sent
        assert (hold["op"], hold["slot"], hold["fds"], hold["keys"]) == ("hold", 0, 1, 41) and hold["record"]
        assert session.custody_slot == 0 and not custody.busy.busy(0)
        # A transaction that changed nothing: no message, idle again.
        custody.busy[0] = BUSY
        state = backend_state()
        forward, _ = client.client_data(QUERY_SELECT_1)
        link_backend(client, state, forward)
        client.backend_data(ROW_DESCRIPTION_SELECT_1 + DATA_ROW_1 + COMMAND_COMPLETE_SELECT_1 + READY_IDLE)
        client.unlink()
        custody.settle(session)
        assert len(link.sent) == 1 and not custody.busy.busy(0)
        # A SET: a new record, then idle.
        custody.busy[0] = BUSY
        forward, _ = client.client_data(pgp.query("SET application_name = 'custody'"))
        link_backend(client, state, forward)
        client.backend_data(command_complete("SET") + pgp.parameter_status("application_name", "custody") + READY_IDLE)
        client.unlink()
        custody.settle(session)
        assert [m["op"] for m in link.sent] == ["hold", "record"] and not custody.busy.busy(0)
        fields = decode(link.sent[-1]["record"]["state"]["fields"])
        assert fields["client_params"]["application_name"] == "custody"
        # Inside a transaction (a BEGIN the proxy answered): busy it stays.
        custody.busy[0] = BUSY
        client.client_data(pgp.query("BEGIN"))
        custody.settle(session)
        assert custody.busy.busy(0) and len(link.sent) == 2
        custody.unhold(session)
        assert link.sent[-1] == {"op": "unhold", "slot": 0} and session.custody_slot is None
        assert custody.free[-1] == 0
    finally:
        session.sock.close()
        ours.close()
        theirs.close()


def test_a_held_client_is_marked_busy_before_its_request_is_read():
    import _socket

    import gevent

    from multiproxy.custody import WorkerCustody
    from multiproxy.fastio import ClientSocket
    ours, theirs = _socket.socketpair()
    custody = WorkerCustody(SimpleNamespace(worker=0), RecordingLink(), BusyMap(4))
    sock = ClientSocket(ours)
    try:
        recv = custody.marking_recv(sock, 2)
        reader = gevent.spawn(recv, 100)
        gevent.sleep(0.01)
        assert not custody.busy.busy(2)          # waiting for the client: idle
        theirs.send(b"Q...")
        assert reader.get(timeout=5) == b"Q..." and custody.busy.busy(2)
    finally:
        sock.close()
        ours.close()
        theirs.close()
