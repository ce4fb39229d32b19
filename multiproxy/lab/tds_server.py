"""The TDS lab server: a gevent TDS 7.4 server that runs T-SQL on SQLite, a real backend for tests and the lab.

    python -m multiproxy.lab.tds_server --port 14330 --user sa --password secret [--read-only] [--db-file F]

or in-process: `TDSLabServer(host, port, users={'sa': 'pw'}).start()`. See docs/engines/tds-lab-server.md.
"""
from __future__ import annotations

import argparse
import itertools
import os
import shutil
import signal
import socket as _stdsocket
import ssl
import struct
import sys
import tempfile
import traceback

import gevent
import gevent.queue
import gevent.socket
from gevent.threadpool import ThreadPool

from multiproxy_engines.tds.wire import messages as tp
from multiproxy_engines.tds.wire import token_stream as tk
from multiproxy_engines.tds.wire.memory_tls import MemoryTLS

from .tds_sql import Cancelled, LabDatabases, SqlError, SqlSession

ENCRYPTION_MODES = {"off": tp.ENCRYPT_OFF, "on": tp.ENCRYPT_ON, "not_supported": tp.ENCRYPT_NOT_SUP}
_SUPPORTED_VERSIONS = {tp.TDS72: bytes.fromhex("72090002"), tp.TDS73A: bytes.fromhex("730A0003"),
                       tp.TDS73B: bytes.fromhex("730B0003"), tp.TDS74: tk.TDS74_VERSION_BYTES}
LOGIN_TIMEOUT = 30.0
DONE_RPCINBATCH = 0x80      # with DONE_MORE on the DONEPROC of every call of an RPC batch but the last


class ConnectionClosed(Exception):
    """The client went away."""


def make_self_signed(directory: str, hostname: str = "localhost") -> tuple[str, str]:
    """A throwaway certificate and key for TLS inside PRELOGIN (written to `directory`)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=365))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = os.path.join(directory, "tds-lab.crt"), os.path.join(directory, "tds-lab.key")
    with open(cert_file, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(key_file, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    os.chmod(key_file, 0o600)
    return cert_file, key_file


class _Transport:
    """A client socket, optionally with TLS records (a MemoryTLS session) between it and the TDS packets."""

    def __init__(self, sock):
        self.sock = sock
        # Carries traffic once set, after the handshake (during it, TLS records travel inside PRELOGIN packets).
        self.tls: MemoryTLS | None = None

    def recv(self) -> bytes:
        while True:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionClosed()
            if self.tls is None:
                return data
            try:
                plain = self.tls.decrypt(data)
            except ssl.SSLZeroReturnError:
                raise ConnectionClosed() from None
            if plain:
                return plain

    def send(self, data: bytes) -> None:
        if self.tls is not None:
            data = self.tls.encrypt(data)
        self.sock.sendall(data)


class _Connection:
    """One client: PRELOGIN (and TLS), LOGIN7, then requests in order; a reader greenlet watches for
    ATTENTION while a request runs."""

    def __init__(self, server: "TDSLabServer", sock, address):
        self.server, self.sock, self.address = server, sock, address
        self.transport = _Transport(sock)
        self.reader = tp.MessageReader(tp.MAX_PACKET_SIZE + 1)
        self.spid = server.next_spid()
        self.packet_size = tp.DEFAULT_PACKET_SIZE
        self.session: SqlSession | None = None
        self.queue: gevent.queue.Queue = gevent.queue.Queue()

    # -- I/O -----------------------------------------------------------------------------------------
    def _read_message(self) -> tp.Message:
        while True:
            if self._pending:
                return self._pending.pop(0)
            self._pending.extend(self.reader.feed(self.transport.recv()))

    _pending: list

    def send(self, payload: bytes, msg_type: int = tp.TABULAR_RESULT) -> None:
        self.transport.send(tp.encode_message(msg_type, payload, self.packet_size, spid=self.spid))

    def fail(self, number: int, text: str, severity: int = 20) -> None:
        try:
            self.send(tk.error(number, text, 1, severity, self.server.server_name) + tk.done(tk.DONE_ERROR))
        except (OSError, ssl.SSLError, ConnectionClosed):
            pass

    # -- lifecycle ------------------------------------------------------------------------------------
    def run(self) -> None:
        self._pending = []
        try:
            with gevent.Timeout(LOGIN_TIMEOUT, ConnectionClosed):
                if not self._login():
                    return
            reader = gevent.spawn(self._read_loop)
            try:
                self._serve()
            finally:
                reader.kill()
        except (ConnectionClosed, OSError, ssl.SSLError):
            pass
        except tp.ProtocolError as exc:
            self.fail(4002, f"The incoming tabular data stream (TDS) protocol stream is incorrect: {exc}.")
        except Exception:  # a lab server bug: say so on stderr, keep serving the others
            traceback.print_exc()
            self.fail(50000, "Internal error in the TDS lab server (see its stderr).")
        finally:
            if self.session is not None:
                self.server.in_thread(self.session.close)
            try:
                self.sock.close()
            except OSError:
                pass

    def _login(self) -> bool:
        msg = self._read_message()
        if msg.type != tp.PRELOGIN:
            self.fail(4002, "Expected a PRELOGIN message first (TDS 7.x clients send one).")
            return False
        prelogin = tp.Prelogin.decode(msg.data)
        client = prelogin.encryption if prelogin.encryption is not None else tp.ENCRYPT_NOT_SUP
        mode = self.server.encryption
        if mode == tp.ENCRYPT_NOT_SUP or client == tp.ENCRYPT_NOT_SUP:
            answer = tp.ENCRYPT_NOT_SUP
        elif mode == tp.ENCRYPT_ON or client in (tp.ENCRYPT_ON, tp.ENCRYPT_REQ):
            answer = tp.ENCRYPT_ON
        else:
            answer = tp.ENCRYPT_OFF
        reply = tp.Prelogin.build(version=(16, 0, 1000, 6), encryption=answer, mars=0)
        reply.options[tp.PL_INSTOPT] = b"\0"
        self.send(reply.encode())
        if mode == tp.ENCRYPT_ON and client == tp.ENCRYPT_NOT_SUP:
            return False  # the server requires encryption; the client cannot do it
        login_only = answer == tp.ENCRYPT_OFF
        if answer != tp.ENCRYPT_NOT_SUP:
            self._tls_handshake()
        msg = self._read_message()
        if msg.type != tp.LOGIN7:
            self.fail(4002, f"Expected LOGIN7, got a message of type 0x{msg.type:02x}.")
            return False
        if login_only:
            self.transport.tls = None  # encryption "off": only the login travels under TLS
        try:
            login = tp.Login7.decode(msg.data)
        except tp.ProtocolError as exc:
            self.fail(4002, f"The login packet is malformed: {exc}.")
            return False
        if login.tds_version not in _SUPPORTED_VERSIONS and login.tds_version < tp.TDS74:
            spoken = f"{login.tds_version >> 28}.{(login.tds_version >> 24) & 0xF}"
            self.fail(18456, f"This client logged in with TDS {spoken}; the lab server speaks TDS 7.2 to 7.4: set "
                             "TDSVER=7.4 (FreeTDS) or tds_version='7.4' (pymssql).", 14)
            return False
        if login.integrated_security or tp.FEATURE_FEDAUTH in login.features:
            self.fail(18456, "Login failed: integrated and federated authentication are not supported by the "
                             "lab server; use a SQL login (user and password).", 14)
            return False
        if self.server.users.get(login.username) != login.password or not login.username:
            self.fail(18456, f"Login failed for user '{login.username}'.", 14)
            return False
        database = login.database or "master"
        if not self.server.databases.has_database(database):
            self.fail(4060, f'Cannot open database "{database}" requested by the login. The login failed.', 11)
            return False
        database = self.server.databases.canonical_name(database)
        version = _SUPPORTED_VERSIONS.get(login.tds_version, tk.TDS74_VERSION_BYTES)
        requested = login.packet_size or tp.DEFAULT_PACKET_SIZE
        self.packet_size = min(max(requested, tp.MIN_PACKET_SIZE), tp.MAX_PACKET_SIZE)
        self.session = self.server.in_thread(SqlSession, self.server.databases, self.spid, login.username, database)
        name = self.server.server_name
        self.send(tk.envchange(tk.ENV_DATABASE, database, "master")
                  + tk.info(5701, f"Changed database context to '{database}'.", 2, 0, name)
                  + tk.envchange(tk.ENV_COLLATION, tk.DEFAULT_COLLATION, b"")
                  + tk.envchange(tk.ENV_LANGUAGE, "us_english", "")
                  + tk.info(5703, "Changed language setting to us_english.", 1, 0, name)
                  + tk.loginack("Microsoft SQL Server", version, bytes([16, 0, 0x03, 0xE8]))
                  + tk.envchange(tk.ENV_PACKETSIZE, str(self.packet_size), str(requested))
                  + tk.done())
        self.reader.max_packet_size = self.packet_size
        return True

    def _tls_handshake(self) -> None:
        tls = MemoryTLS(self.server.ssl_context(), server_side=True)
        while True:
            msg = self._read_message()
            if msg.type != tp.PRELOGIN:
                raise tp.ProtocolError("expected a TLS handshake inside PRELOGIN packets")
            finished = tls.handshake(msg.data)
            out = tls.pending_output()
            if out:
                self.sock.sendall(tp.encode_message(tp.PRELOGIN, out, tp.DEFAULT_PACKET_SIZE))
            if finished:
                self.transport.tls = tls
                return

    def _read_loop(self) -> None:
        try:
            while True:
                for msg in self.reader.feed(self.transport.recv()):
                    if msg.type == tp.ATTENTION and self.session is not None:
                        self.session.cancelled = True
                    self.queue.put(msg)
        except tp.ProtocolError as exc:
            self.queue.put(exc)
        except (ConnectionClosed, OSError, ssl.SSLError):
            self.queue.put(None)

    def _serve(self) -> None:
        for msg in self._pending:
            self.queue.put(msg)
        self._pending = []
        while True:
            msg = self.queue.get()
            if msg is None:
                return
            if isinstance(msg, Exception):
                raise msg
            if msg.type == tp.ATTENTION:
                self.session.cancelled = False
                self.send(tk.done(tk.DONE_ATTN))
                continue
            response = self.server.in_thread(self._handle_or_cancel, msg)
            if response is not None:  # else cancelled: the ATTENTION behind it is answered with DONE_ATTN
                self.send(response)

    # -- requests (run in a worker thread) --------------------------------------------------------------
    def _handle_or_cancel(self, msg: tp.Message) -> bytes | None:
        try:
            return self._handle(msg)
        except Cancelled:  # returned, not raised: the thread pool would print it
            return None

    def _handle(self, msg: tp.Message) -> bytes:
        session = self.session
        prefix = b""
        if msg.status & (tp.STATUS_RESETCONNECTION | tp.STATUS_RESETCONNECTIONSKIPTRAN):
            session.reset(keep_transaction=bool(msg.status & tp.STATUS_RESETCONNECTIONSKIPTRAN))
            prefix = tk.env_reset_ack()
        try:
            self._check_descriptor(msg)
            if msg.type == tp.SQL_BATCH:
                batch = tp.SqlBatch.decode(msg.data)
                return prefix + session.run_batch(batch.text)[0]
            if msg.type == tp.RPC:
                request = tp.RpcRequest.decode(msg.data)
                out = bytearray(prefix)
                for index, call in enumerate(request.calls):
                    part = session.run_rpc(call)
                    if index < len(request.calls) - 1:  # DONEPROC ends the part: more to come, in a batch
                        part = part[:-12] + struct.pack("<H", struct.unpack_from("<H", part, len(part) - 12)[0]
                                                        | tk.DONE_MORE | DONE_RPCINBATCH) + part[-10:]
                    out += part
                return bytes(out)
            if msg.type == tp.TRANSACTION_MANAGER:
                return prefix + self._transaction(tp.TransactionRequest.decode(msg.data))
            raise SqlError(4002, f"The lab server does not support TDS messages of type 0x{msg.type:02x}.", 16)
        except tp.ProtocolError as exc:
            return prefix + tk.error(4002, f"The incoming TDS request is malformed: {exc}.", 1, 16,
                                     self.server.server_name) + tk.done(tk.DONE_ERROR)
        except SqlError as err:
            return prefix + err.token(self.server.server_name) + tk.done(tk.DONE_ERROR)

    def _check_descriptor(self, msg: tp.Message) -> None:
        """A request names the transaction it belongs to in ALL_HEADERS: while one is open, 0 (the session's own
        on a connection without MARS) or its descriptor; any other is refused. Without one open, a stale
        descriptor (the transaction a reset ended) is let through."""
        if msg.type not in (tp.SQL_BATCH, tp.RPC, tp.TRANSACTION_MANAGER) or msg.status & tp.STATUS_RESETCONNECTION:
            return          # a reset ends the transaction the client still names
        at = tp.transaction_descriptor_offset(msg.data)
        if at < 0:
            return
        descriptor = struct.unpack_from("<Q", msg.data, at)[0]
        if descriptor and self.session.descriptor and descriptor != self.session.descriptor:
            raise SqlError(3910, f"The request names transaction 0x{descriptor:016x} in its transaction descriptor "
                                 "header, which is not the session's open transaction "
                                 f"(0x{self.session.descriptor:016x}).", 16)

    def _transaction(self, req: tp.TransactionRequest) -> bytes:
        session = self.session
        if req.request_type == tp.TM_BEGIN_XACT:
            out = session.begin()
        elif req.request_type == tp.TM_COMMIT_XACT:
            out = session.commit()
            if req.begin_after:
                out += session.begin()
        elif req.request_type == tp.TM_ROLLBACK_XACT:
            out = session.rollback(req.name)
            if req.begin_after:
                out += session.begin()
        elif req.request_type == tp.TM_SAVE_XACT:
            out = session.save(req.name)
        else:
            raise SqlError(8509, "Distributed transactions are not supported by the lab server.")
        return out + tk.done()


class TDSLabServer:
    """A TDS 7.4 server on SQLite. `users` maps login names to passwords; `encryption` is 'off' (TLS for the
    login only, or all of it if the client asks), 'on' (required) or 'not_supported'."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, users: dict[str, str] | None = None,
                 read_only: bool = False, db_path: str | None = None, encryption: str = "off",
                 cert_file: str | None = None, key_file: str | None = None, databases: tuple[str, ...] = (),
                 server_name: str = "tdslab", replica_lag: int | None = 0):
        if encryption not in ENCRYPTION_MODES:
            raise ValueError(f"encryption: expected one of {sorted(ENCRYPTION_MODES)}, got {encryption!r}")
        self.host, self.port = host, port
        self.users = dict(users if users is not None else {"sa": "sa"})
        self.encryption = ENCRYPTION_MODES[encryption]
        self.cert_file, self.key_file = cert_file, key_file
        self.server_name = server_name
        self._tmpdir = tempfile.mkdtemp(prefix="tdslab-")
        directory = os.path.dirname(os.path.abspath(db_path)) if db_path else self._tmpdir
        self.databases = LabDatabases(directory, os.path.abspath(db_path) if db_path else None, server_name,
                                      read_only)
        self.databases.replica_lag = replica_lag
        for name in databases:
            if not self.databases.has_database(name):
                self.databases.create_database(name)
        self._spids = itertools.count(51)
        self._pool = ThreadPool(128)
        self._listener = None
        self._acceptor = None
        self._clients: set = set()
        self._context: ssl.SSLContext | None = None

    @property
    def read_only(self) -> bool:
        return self.databases.read_only

    def set_read_only(self, flag: bool) -> None:
        """Writes fail with error 3906 and DATABASEPROPERTYEX(..., 'Updateability') answers READ_ONLY."""
        self.databases.read_only = bool(flag)

    def set_replica_lag(self, seconds: int | None, redo_queue_kb: int | None = 0) -> None:
        """What sys.dm_hadr_database_replica_states reports while the server is read-only: secondary_lag_seconds
        (None: NULL) and redo_queue_size in KB. A writable server reports no rows."""
        self.databases.replica_lag = None if seconds is None else int(seconds)
        self.databases.redo_queue_kb = None if redo_queue_kb is None else int(redo_queue_kb)

    def next_spid(self) -> int:
        """The session id for the next client."""
        return next(self._spids)

    def in_thread(self, function, *args):
        """`function(*args)` run in the server's thread pool (SQLite work), its result or exception returned to the
        calling greenlet."""
        return self._pool.spawn(function, *args).get()

    def ssl_context(self) -> ssl.SSLContext:
        """The server's TLS 1.2 context (a self-signed certificate made on first use when none was given)."""
        if self._context is None:
            if not self.cert_file:
                self.cert_file, self.key_file = make_self_signed(self._tmpdir)
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            # TLS 1.2 as SQL Server uses for TDS 7.x: TLS 1.3 session tickets sent after the handshake
            # would arrive where a TDS 7.x client expects TDS packets.
            context.minimum_version = context.maximum_version = ssl.TLSVersion.TLSv1_2
            context.load_cert_chain(self.cert_file, self.key_file)
            self._context = context
        return self._context

    def start(self) -> "TDSLabServer":
        sock = gevent.socket.socket(_stdsocket.AF_INET6 if ":" in self.host else _stdsocket.AF_INET)
        sock.setsockopt(_stdsocket.SOL_SOCKET, _stdsocket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        sock.listen(256)
        self.port = sock.getsockname()[1]
        self._listener = sock
        self._acceptor = gevent.spawn(self._accept_loop)
        return self

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    def _accept_loop(self) -> None:
        while True:
            try:
                client, address = self._listener.accept()
            except OSError:
                return
            client.setsockopt(_stdsocket.IPPROTO_TCP, _stdsocket.TCP_NODELAY, 1)
            greenlet = gevent.spawn(self._serve_client, client, address)
            self._clients.add(greenlet)
            greenlet.link(self._clients.discard)

    def _serve_client(self, client, address) -> None:
        _Connection(self, client, address).run()

    def serve_forever(self) -> None:
        if self._acceptor is None:
            self.start()
        self._acceptor.join()

    def stop(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        if self._acceptor is not None:
            self._acceptor.kill()
            self._acceptor = None
        gevent.killall(list(self._clients), timeout=5)
        self._pool.kill()
        shutil.rmtree(self._tmpdir, ignore_errors=True)

    def __enter__(self) -> "TDSLabServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m multiproxy.lab.tds_server",
                                     description="The multiproxy TDS lab server: TDS 7.4 on SQLite.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=14330)
    parser.add_argument("--user", default="sa", help="login name (default sa)")
    parser.add_argument("--password", default=os.environ.get("TDSLAB_PASSWORD", ""),
                        help="login password (default: $TDSLAB_PASSWORD)")
    parser.add_argument("--read-only", action="store_true", help="start read-only (writes fail with 3906)")
    parser.add_argument("--replica-lag", type=int, default=0, metavar="SECONDS",
                        help="while read-only, report this secondary_lag_seconds in "
                             "sys.dm_hadr_database_replica_states (default 0; change it at run time with "
                             "EXEC sp_lab_set_replica_lag SECONDS)")
    parser.add_argument("--db-file", help="SQLite file for master (other databases sit beside it); "
                                          "default: a temporary directory")
    parser.add_argument("--database", action="append", default=[], help="create this database too")
    parser.add_argument("--encryption", choices=sorted(ENCRYPTION_MODES), default="off")
    parser.add_argument("--cert-file")
    parser.add_argument("--key-file")
    args = parser.parse_args(argv)
    if not args.password:
        parser.error("--password (or $TDSLAB_PASSWORD) is required")
    server = TDSLabServer(args.host, args.port, {args.user: args.password}, args.read_only, args.db_file,
                          args.encryption, args.cert_file, args.key_file, tuple(args.database),
                          replica_lag=args.replica_lag)
    server.start()
    # SIGUSR1/SIGUSR2 switch read-only on/off at run time (failover drills)
    gevent.signal_handler(signal.SIGUSR1, server.set_read_only, True)
    gevent.signal_handler(signal.SIGUSR2, server.set_read_only, False)
    gevent.signal_handler(signal.SIGTERM, server.stop)
    gevent.signal_handler(signal.SIGINT, server.stop)
    print(f"tds lab server listening on {server.host}:{server.port}", flush=True)
    try:
        server.serve_forever()
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
