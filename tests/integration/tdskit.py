"""TDS test tools shared by the lab-server and proxy tests: the lab server as a process, and a raw TDS client."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys

import pytest

from multiproxy_engines.tds.wire import messages as tp
from multiproxy_engines.tds.wire import token_stream as tk

from .proxy import free_port

LAB_USER, LAB_PASSWORD = "sa", "Lab-pw-1"
DB = "labdb"


class LabProcess:
    """`python -m multiproxy.lab.tds_server` on a free port (or `port`: a restart), with database `labdb`; stop()
    checks it never crashed. The login and its password are fixed for the process's life (`password`)."""

    def __init__(self, tmp, *extra, port: int | None = None, password: str = LAB_PASSWORD):
        self.port = port or free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "multiproxy.lab.tds_server", "--port", str(self.port), "--user", LAB_USER,
             "--password", password, "--db-file", str(tmp / "master.sqlite"), "--database", DB, *extra],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        line = self.proc.stdout.readline()
        assert "listening" in line, line + self.proc.stdout.read()

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            out = self.proc.communicate(timeout=10)[0]
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out = self.proc.communicate()[0]
        assert "Traceback" not in out, out


class RawClient:
    """A TDS client from multiproxy_engines.tds.wire, for status bits, bad input and ATTENTION timing no driver exposes."""

    def __init__(self, port, packet_size=4096, user=LAB_USER, password=LAB_PASSWORD, database="", login=True,
                 require_loginack=False, language=""):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.reader = tp.MessageReader()
        self.tokens = tk.TokenReader()
        self.descriptor = 0
        if login:
            self.send(tp.PRELOGIN, tp.Prelogin.build(encryption=tp.ENCRYPT_NOT_SUP).encode())
            assert tp.Prelogin.decode(self.recv().data).encryption == tp.ENCRYPT_NOT_SUP
            self.send(tp.LOGIN7, tp.Login7(username=user, password=password, packet_size=packet_size,
                                           database=database, language=language).encode())
            self.login_tokens = self.read_tokens()
            if require_loginack:
                assert any(t.type == tk.TOKEN_LOGINACK for t in self.login_tokens), self.login_tokens

    def send(self, msg_type, payload, status=0):
        self.sock.sendall(tp.encode_message(msg_type, payload, 4096, status))

    def recv(self) -> tp.Message:
        while True:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("closed")
            messages = self.reader.feed(data)
            if messages:
                return messages[0]

    def read_tokens(self):
        toks = self.tokens.read(self.recv().data)
        descriptor, open_ = tk.transaction_state(toks)
        if open_ is not None:
            self.descriptor = descriptor if open_ else 0
        return toks

    def batch(self, sql, status=0):
        self.send(tp.SQL_BATCH, tp.SqlBatch(sql, tp.AllHeaders(self.descriptor)).encode(), status)
        return self.read_tokens()

    def rows(self, sql, status=0):
        return [t.values for t in self.batch(sql, status) if t.type == tk.TOKEN_ROW]

    def close(self):
        self.sock.close()


def recv_message(sock: socket.socket, reader: tp.MessageReader, backlog: list, tls=None,
                 incoming=None) -> tp.Message:
    """The next whole TDS message; with `tls`, what arrives are TLS records carrying it. `backlog` keeps the
    messages that arrived with it, for the next call."""
    pending = backlog[:]
    while not pending:
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("closed")
        if tls is not None:
            incoming.write(data)
            plain = b""
            while True:
                try:
                    plain += tls.read(65536)
                except ssl.SSLWantReadError:
                    break
            data = plain
        pending = reader.feed(data)
    backlog[:] = pending[1:]
    return pending[0]


def tls_login(port: int, login, context: ssl.SSLContext, encryption: int = tp.ENCRYPT_ON,
              prelogin: tp.Prelogin | None = None):
    """PRELOGIN, a TLS handshake inside PRELOGIN packets by OpenSSL (as FreeTDS does it), LOGIN7 inside TLS; returns
    (the login reply's tokens, the TLS object). ENCRYPT_ON keeps TLS for the reply, ENCRYPT_OFF encrypts the login
    only. Raises ssl.SSLError or ConnectionError when the proxy refuses the handshake. `login` is a Login7 or a
    function of the server's PRELOGIN answer returning one (to echo FEDAUTHREQUIRED or NONCEOPT); `prelogin`
    replaces the client's PRELOGIN."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        reader, backlog = tp.MessageReader(), []
        sock.sendall(tp.encode_message(tp.PRELOGIN, (prelogin or tp.Prelogin.build(encryption=encryption)).encode()))
        server = tp.Prelogin.decode(recv_message(sock, reader, backlog).data)
        answer = server.encryption
        if callable(login):
            login = login(server)
        assert answer in (tp.ENCRYPT_ON, tp.ENCRYPT_OFF, tp.ENCRYPT_REQ), answer
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = context.wrap_bio(incoming, outgoing)
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                pass
            if out := outgoing.read():
                sock.sendall(tp.encode_message(tp.PRELOGIN, out))
            incoming.write(recv_message(sock, reader, backlog).data)
        if out := outgoing.read():
            sock.sendall(tp.encode_message(tp.PRELOGIN, out))
        tls.write(tp.encode_message(tp.LOGIN7, login.encode()))
        sock.sendall(outgoing.read())
        full = answer != tp.ENCRYPT_OFF
        reply = recv_message(sock, reader, backlog, tls if full else None, incoming)
        return tk.TokenReader().read(reply.data), tls
    finally:
        sock.close()


_PYMSSQL_REFUSAL = """
import json, sys
import pymssql
kwargs = json.loads(sys.argv[1])
try:
    pymssql.connect(**kwargs)
except pymssql.OperationalError as exc:
    number, text = exc.args[0] if isinstance(exc.args[0], tuple) else (0, str(exc).encode())
    print(json.dumps([number, text.decode("utf-8", "replace")]))
else:
    sys.exit("the login succeeded")
"""


def pymssql_refusal(**connect_kwargs) -> tuple[int, str]:
    """(number, text) of the error pymssql raises for a login expected to fail, read in a child process.

    pymssql keeps the most severe login-time server message of its whole process and reports it with later
    failed logins, so in one test process an earlier test's refusal leaks into the next one's; a fresh
    process sees only its own."""
    connect_kwargs.setdefault("tds_version", "7.4")
    connect_kwargs.setdefault("login_timeout", 10)
    out = subprocess.run([sys.executable, "-c", _PYMSSQL_REFUSAL, json.dumps(connect_kwargs)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    number, text = json.loads(out.stdout)
    return number, text


NODE_CLIENTS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "tools",
                            "node")


def tedious_prepared(host: str, port: int, user: str, password: str, database: str, clients: int = 20,
                     rounds: int = 10, statements: int = 1, timeout: float = 120, transactions: bool = False,
                     together: bool = False) -> dict:
    """tools/node/tds_prepared_clients.js: `clients` tedious connections at once, each prepare() once and
    execute() `rounds` times (each in a transaction of its own with `transactions`; with `together`, only once
    all have prepared); its JSON summary (clients, executes, ok, failures, errors, seconds)."""
    if shutil.which("node") is None or not os.path.isdir(os.path.join(NODE_CLIENTS, "node_modules", "tedious")):
        pytest.skip("node and tedious (tools/install-deps.sh, or npm ci --prefix tools/node) are needed")
    out = subprocess.run(["node", os.path.join(NODE_CLIENTS, "tds_prepared_clients.js"), host, str(port), user,
                          password, database, str(clients), str(rounds), str(statements), str(int(transactions)),
                          str(int(together))],
                         capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    assert out.returncode == 0, out.stdout + out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])
