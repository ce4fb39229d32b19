"""TLS on both legs of the PostgreSQL proxy: client leg (listener certificate, require_tls, SSLRequest abuse) and
backend leg (require, verify-full with the right and a wrong CA) against a second private PostgreSQL with ssl=on.
Certificates are generated per module with `cryptography`: a CA and a server certificate for 127.0.0.1/localhost.
"""
from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
import socket
import struct
import subprocess
import tempfile
import time

import pg8000.dbapi
import psycopg
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .pgserver import OS_USER, PostgresServer
from .helpers import read_until_closed
from .proxy import free_port

USER = "mp_trust"
DB = "mpdb"
HANDSHAKE_TIMEOUT = 2.0

pytestmark = pytest.mark.timeout(60)


# ---------------------------------------------------------------------------------------------- certificates

def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_ca(cn: str):
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn)).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return cert, key


def make_server_cert(ca_cert, ca_key, cn: str):
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    return cert, key


def write_pki(directory: str, prefix: str) -> dict[str, str]:
    """CA, server cert and key (PEM) under `directory`; returns their paths."""
    ca_cert, ca_key = make_ca(f"multiproxy test CA {prefix}")
    cert, key = make_server_cert(ca_cert, ca_key, "localhost")
    paths = {"ca": os.path.join(directory, f"{prefix}-ca.crt"), "cert": os.path.join(directory, f"{prefix}-server.crt"),
             "key": os.path.join(directory, f"{prefix}-server.key")}
    with open(paths["ca"], "wb") as f:
        f.write(ca_cert.public_bytes(serialization.Encoding.PEM))
    with open(paths["cert"], "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    fd = os.open(paths["key"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                  serialization.NoEncryption()))
    return paths


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("pki"))
    return {"proxy": write_pki(directory, "proxy"), "other": write_pki(directory, "other")}


# ---------------------------------------------------------------------------------------------- raw protocol helpers

def startup_packet(params: dict[str, str]) -> bytes:
    body = struct.pack("!I", 196608) + b"".join(k.encode() + b"\x00" + v.encode() + b"\x00" for k, v in params.items())
    body += b"\x00"
    return struct.pack("!I", len(body) + 4) + body


SSL_REQUEST = struct.pack("!II", 8, 80877103)


def parse_messages(data: bytes) -> list[tuple[bytes, bytes]]:
    out, pos = [], 0
    while len(data) - pos >= 5:
        length = struct.unpack_from("!I", data, pos + 1)[0]
        if length < 4 or pos + 1 + length > len(data):
            break
        out.append((data[pos:pos + 1], data[pos + 5:pos + 1 + length]))
        pos += 1 + length
    return out


def error_fields(body: bytes) -> dict[str, str]:
    return {chr(part[0]): part[1:].decode("utf-8", "replace") for part in body.split(b"\x00") if part}


def raw_login_error(address, params=None, timeout: float = 10.0) -> dict[str, str]:
    """Plaintext startup; the proxy must answer with an ErrorResponse and close. Returns its fields."""
    with socket.create_connection(address, timeout=timeout) as sock:
        sock.sendall(startup_packet(params or {"user": USER, "database": DB}))
        data, closed = read_until_closed(sock, timeout)
    assert closed, f"no close within {timeout}s: {data!r}"
    errors = [error_fields(body) for kind, body in parse_messages(data) if kind == b"E"]
    assert errors, f"no ErrorResponse in {data!r}"
    return errors[-1]


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def wait_for(predicate, timeout: float, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    value = predicate()
    while not value and time.monotonic() < deadline:
        time.sleep(interval)
        value = predicate()
    return value


def psql(address, conninfo: str, sql: str, timeout: float = 20) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["PGPASSFILE"] = os.devnull
    dsn = f"host={address[0]} port={address[1]} user={USER} dbname={DB} connect_timeout=5 {conninfo}"
    return subprocess.run([shutil.which("psql") or "psql", "-X", "-A", "-t", "-w", "-v", "ON_ERROR_STOP=1", "-d", dsn,
                           "-c", sql], capture_output=True, text=True, env=env, timeout=timeout)


def config_for(pg_port: int, listener: dict | None = None, backend: dict | None = None, host: str = "127.0.0.1") -> dict:
    return {
        "proxy": {"admin_listen": f"127.0.0.1:{free_port()}", "log_level": "info", "handshake_timeout": HANDSHAKE_TIMEOUT},
        "clusters": {"main": {"engine": "postgres", "hosts": [f"{host}:{pg_port}"],
                              "backend": backend or {"tls": "disable"},
                              "pool": {"mode": "transaction", "max_size": 3, "borrow_timeout": 5.0}}},
        "listeners": [{"name": "pg", "listen": f"127.0.0.1:{free_port()}", "cluster": "main", "role": "writer",
                       "auth": "trust", **(listener or {})}],
    }


def tls_listener(pki, require_tls: bool) -> dict:
    return {"tls_cert_file": pki["proxy"]["cert"], "tls_key_file": pki["proxy"]["key"], "require_tls": require_tls}


# ---------------------------------------------------------------------------------------------- client leg

def test_client_tls_require_with_psql_and_psycopg(pg, pki, proxy_factory):
    proxy = proxy_factory(config_for(pg.port, tls_listener(pki, require_tls=True)))
    address = proxy.address("pg")

    out = psql(address, "sslmode=require", "SELECT 40 + 2")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "42"
    # libpq checks the proxy's certificate against our CA, by IP and by name
    for host in ("127.0.0.1", "localhost"):
        out = psql((host, address[1]), f"sslmode=verify-full sslrootcert={pki['proxy']['ca']}", "SELECT 'verified'")
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "verified"
    # and refuses it against another CA
    out = psql(address, f"sslmode=verify-full sslrootcert={pki['other']['ca']}", "SELECT 1")
    assert out.returncode != 0
    assert "certificate verify failed" in out.stderr, out.stderr

    with psycopg.connect(host=address[0], port=address[1], user=USER, dbname=DB, sslmode="require",
                         connect_timeout=5, autocommit=True) as conn:
        assert conn.info.pgconn.ssl_in_use is True
        assert conn.execute("SELECT current_user").fetchone() == (USER,)
        # the backend leg is a different connection: plaintext (backend tls = disable)
        assert conn.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone() == (False,)


def test_client_tls_optional_allows_plaintext(pg, pki, proxy_factory):
    proxy = proxy_factory(config_for(pg.port, tls_listener(pki, require_tls=False)))
    address = proxy.address("pg")
    out = psql(address, "sslmode=disable", "SELECT 'plain'")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "plain"
    for mode, encrypted in (("disable", False), ("require", True), ("prefer", True)):
        with psycopg.connect(host=address[0], port=address[1], user=USER, dbname=DB, sslmode=mode,
                             connect_timeout=5, autocommit=True) as conn:
            assert conn.info.pgconn.ssl_in_use is encrypted, mode
            assert conn.execute("SELECT 1").fetchone() == (1,)


def test_client_tls_required_refuses_plaintext(pg, pki, proxy_factory):
    proxy = proxy_factory(config_for(pg.port, tls_listener(pki, require_tls=True)))
    address = proxy.address("pg")
    err = raw_login_error(address)
    assert err["C"] == "28000" and err["S"] == "FATAL", err
    with pytest.raises(pg8000.dbapi.DatabaseError) as refused:
        pg8000.dbapi.connect(user=USER, host=address[0], port=address[1], database=DB, timeout=5, ssl_context=False)
    assert refused.value.args[0]["C"] == "28000", refused.value.args
    with pytest.raises(psycopg.OperationalError, match="TLS"):
        psycopg.connect(host=address[0], port=address[1], user=USER, dbname=DB, sslmode="disable", connect_timeout=5)
    out = psql(address, "sslmode=disable", "SELECT 1")
    assert out.returncode != 0 and "TLS" in out.stderr, out.stderr
    # while TLS clients still get in
    with psycopg.connect(host=address[0], port=address[1], user=USER, dbname=DB, sslmode="require",
                         connect_timeout=5) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_ssl_request_with_pipelined_plaintext_is_rejected(pg, pki, proxy_factory):
    """CVE-2021-23214 style: bytes sent with SSLRequest would be taken as if they came through TLS. Refuse them."""
    proxy = proxy_factory(config_for(pg.port, tls_listener(pki, require_tls=False)))
    address = proxy.address("pg")
    injected = startup_packet({"user": USER, "database": DB}) + b"Q\x00\x00\x00\x0dSELECT 1\x00"
    with socket.create_connection(address, timeout=5) as sock:
        sock.sendall(SSL_REQUEST + injected)
        data, closed = read_until_closed(sock, 5)
    assert closed, f"no close within 5s: {data!r}"
    assert not data.startswith(b"S"), f"the proxy accepted TLS with plaintext pipelined: {data!r}"
    kinds = [k for k, _ in parse_messages(data)]
    assert b"R" not in kinds and b"Z" not in kinds, f"the injected startup was served: {data!r}"
    if data:
        errors = [error_fields(body) for kind, body in parse_messages(data) if kind == b"E"]
        assert errors and errors[-1]["C"] == "08P01", data
    # the listener still serves honest TLS clients
    with psycopg.connect(host=address[0], port=address[1], user=USER, dbname=DB, sslmode="require",
                         connect_timeout=5) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def _tls_proxy_with_baseline(pg, pki, proxy_factory):
    proxy = proxy_factory(config_for(pg.port, tls_listener(pki, require_tls=False)))
    address = proxy.address("pg")
    with psycopg.connect(host=address[0], port=address[1], user=USER, dbname=DB, sslmode="require",
                         connect_timeout=5) as conn:
        conn.execute("SELECT 1")
    time.sleep(0.3)
    return proxy, address, open_fds(proxy.pid)


def _assert_serving_and_no_leak(proxy, address, baseline):
    assert proxy.running
    with psycopg.connect(host=address[0], port=address[1], user=USER, dbname=DB, sslmode="require",
                         connect_timeout=5) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    assert wait_for(lambda: open_fds(proxy.pid) <= baseline + 1, 10), (baseline, open_fds(proxy.pid))
    assert "Traceback" not in proxy.log_text(), proxy.log_tail()


def test_ssl_request_then_garbage_instead_of_client_hello(pg, pki, proxy_factory):
    """'S', then plaintext (a startup packet, random bytes) where the ClientHello belongs: closed at once, no leak."""
    proxy, address, baseline = _tls_proxy_with_baseline(pg, pki, proxy_factory)
    with socket.create_connection(address, timeout=5) as sock:
        sock.sendall(SSL_REQUEST)
        assert sock.recv(1) == b"S"
        started = time.monotonic()
        sock.sendall(startup_packet({"user": USER, "database": DB}))
        data, closed = read_until_closed(sock, HANDSHAKE_TIMEOUT + 5)
        assert closed and time.monotonic() - started < HANDSHAKE_TIMEOUT, data
        assert b"Z\x00\x00\x00\x05" not in data
    socks = []
    try:
        for _ in range(20):
            s = socket.create_connection(address, timeout=5)
            s.sendall(SSL_REQUEST)
            assert s.recv(1) == b"S"
            s.sendall(os.urandom(64))
            socks.append(s)
        for s in socks:
            _, closed = read_until_closed(s, HANDSHAKE_TIMEOUT + 5)
            assert closed
    finally:
        for s in socks:
            s.close()
    _assert_serving_and_no_leak(proxy, address, baseline)


def test_ssl_request_then_silence_closed_after_handshake_timeout(pg, pki, proxy_factory):
    proxy, address, baseline = _tls_proxy_with_baseline(pg, pki, proxy_factory)
    socks = []
    try:
        started = time.monotonic()
        for _ in range(5):
            s = socket.create_connection(address, timeout=5)
            s.sendall(SSL_REQUEST)
            assert s.recv(1) == b"S"
            socks.append(s)
        for s in socks:
            _, closed = read_until_closed(s, HANDSHAKE_TIMEOUT + 5 - (time.monotonic() - started))
            assert closed, f"still open {time.monotonic() - started:.1f}s after 'S' (handshake_timeout {HANDSHAKE_TIMEOUT}s)"
        assert time.monotonic() - started >= HANDSHAKE_TIMEOUT - 0.3
    finally:
        for s in socks:
            s.close()
    _assert_serving_and_no_leak(proxy, address, baseline)


# ---------------------------------------------------------------------------------------------- backend leg

@pytest.fixture(scope="module")
def pg_tls():
    """A second private PostgreSQL with ssl = on, serving a certificate from its own CA."""
    directory = tempfile.mkdtemp(prefix="mp-pg-tls-", dir="/tmp")   # the postgres OS user must reach it
    try:
        paths = write_pki(directory, "backend")
        if os.geteuid() == 0:
            import pwd
            pw = pwd.getpwnam(OS_USER)
            for path in (directory, *paths.values()):
                os.chown(path, pw.pw_uid, pw.pw_gid)
            os.chmod(directory, 0o700)
        os.chmod(paths["key"], 0o600)
        server = PostgresServer(settings={"ssl": "on", "ssl_cert_file": paths["cert"], "ssl_key_file": paths["key"]})
        server.start()
        try:
            server.create_auth_roles()
            server.ca_file = paths["ca"]
            yield server
        finally:
            server.stop()
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="module")
def backend_ca(pg_tls, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("backend-ca") / "ca.crt")
    shutil.copyfile(pg_tls.ca_file, path)
    return path


def backend_ssl(address, dbname: str = DB) -> bool:
    with psycopg.connect(host=address[0], port=address[1], user=USER, dbname=dbname, sslmode="disable",
                         connect_timeout=10, autocommit=True) as conn:
        assert conn.info.pgconn.ssl_in_use is False      # the client leg is plaintext here
        return conn.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone()[0]


def test_backend_server_really_offers_tls(pg_tls, backend_ca):
    with psycopg.connect(host=pg_tls.host, port=pg_tls.port, user=USER, dbname=DB, sslmode="verify-full",
                         sslrootcert=backend_ca, connect_timeout=5) as conn:
        assert conn.info.pgconn.ssl_in_use is True


def test_backend_tls_disable_is_plaintext(pg_tls, proxy_factory):
    proxy = proxy_factory(config_for(pg_tls.port, backend={"tls": "disable"}))
    assert backend_ssl(proxy.address("pg")) is False


def test_backend_tls_require(pg_tls, proxy_factory):
    proxy = proxy_factory(config_for(pg_tls.port, backend={"tls": "require"}))
    assert backend_ssl(proxy.address("pg")) is True
    # transaction pooling over TLS backends: several transactions, backends reused
    with psycopg.connect(host=proxy.host, port=proxy.port, user=USER, dbname=DB, connect_timeout=5,
                         autocommit=True, prepare_threshold=None) as conn:
        for i in range(20):
            with conn.transaction():
                assert conn.execute("SELECT %s::int, ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
                                    (i,)).fetchone() == (i, True)


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_backend_tls_verify_full_right_ca(pg_tls, backend_ca, proxy_factory, host):
    proxy = proxy_factory(config_for(pg_tls.port, backend={"tls": "verify-full", "tls_ca_file": backend_ca}, host=host))
    assert backend_ssl(proxy.address("pg")) is True


def test_backend_tls_verify_ca_right_ca(pg_tls, backend_ca, proxy_factory):
    proxy = proxy_factory(config_for(pg_tls.port, backend={"tls": "verify-ca", "tls_ca_file": backend_ca}))
    assert backend_ssl(proxy.address("pg")) is True


def test_backend_tls_verify_full_wrong_ca(pg_tls, pki, proxy_factory):
    proxy = proxy_factory(config_for(pg_tls.port, backend={"tls": "verify-full", "tls_ca_file": pki["other"]["ca"]}))
    address = proxy.address("pg")
    err = raw_login_error(address)
    assert err["C"] == "08001", err
    assert "certificate" in err["M"].lower(), err
    with pytest.raises(pg8000.dbapi.DatabaseError) as refused:
        pg8000.dbapi.connect(user=USER, host=address[0], port=address[1], database=DB, timeout=10, ssl_context=False)
    assert refused.value.args[0]["C"] == "08001"
    with pytest.raises(psycopg.OperationalError, match="certificate"):
        psycopg.connect(host=address[0], port=address[1], user=USER, dbname=DB, sslmode="disable", connect_timeout=10)
    assert proxy.running
    assert "certificate verify failed" in proxy.log_text()
    # No connection was left behind on the server by the refused handshakes.
    assert wait_for(lambda: pg_tls.psql(
        f"SELECT count(*) FROM pg_stat_activity WHERE usename = '{USER}';") == "0", 5)


def test_backend_tls_require_against_plaintext_server(pg, proxy_factory):
    """The session's PostgreSQL has ssl off: tls = require must refuse to fall back to plaintext."""
    proxy = proxy_factory(config_for(pg.port, backend={"tls": "require"}))
    err = raw_login_error(proxy.address("pg"))
    assert err["C"] == "08001", err
    assert "TLS" in err["M"], err
