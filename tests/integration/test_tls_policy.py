"""Client-leg TLS policy: minimum version, cipher list and client certificates on a PostgreSQL listener (raw TLS
handshakes after an SSLRequest, psycopg against the private PostgreSQL), and the minimum version on a MySQL one."""
from __future__ import annotations

import datetime
import os
import socket
import ssl
import struct

import psycopg
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from multiproxy.config import ConfigError, build_config

from .mysqlkit import connect as mysql_connect, mysql_config, query, users_toml
from .proxy import free_port
from .test_pg_tls import make_ca, write_pki

USER, DB = "mp_trust", "mpdb"

pytestmark = pytest.mark.timeout(60)


def write_client_cert(directory, prefix: str, user: str = USER) -> dict[str, str]:
    """A CA and a client certificate (CN = user) it issued; returns their PEM paths."""
    ca_cert, ca_key = make_ca(f"multiproxy client CA {prefix}")
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, user)]))
            .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = {name: os.path.join(directory, f"{prefix}-{name}.pem") for name in ("ca", "cert", "key")}
    with open(paths["ca"], "wb") as f:
        f.write(ca_cert.public_bytes(serialization.Encoding.PEM))
    with open(paths["cert"], "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(paths["key"], "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    os.chmod(paths["key"], 0o600)
    return paths


def config(pg, tmp_path, **listener) -> dict:
    pki = write_pki(str(tmp_path), "policy")
    return {
        "proxy": {"admin_listen": f"127.0.0.1:{free_port()}"},
        "clusters": {"main": {"engine": "postgres", "hosts": [f"127.0.0.1:{pg.port}"], "backend": {"tls": "disable"}}},
        "listeners": [{"name": "pg", "listen": f"127.0.0.1:{free_port()}", "cluster": "main", "auth": "trust",
                       "tls_cert_file": pki["cert"], "tls_key_file": pki["key"], "require_tls": True, **listener}],
    }


def handshake(proxy, *, max_version=None, ciphers=None) -> ssl.SSLSocket:
    """SSLRequest, then a TLS handshake with the given client limits; returns the TLS socket."""
    sock = socket.create_connection(proxy.address("pg"), timeout=10)
    sock.sendall(struct.pack("!II", 8, 80877103))
    assert sock.recv(1) == b"S"
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    if max_version:
        ctx.maximum_version = max_version
    if ciphers:
        ctx.set_ciphers(ciphers)
    try:
        return ctx.wrap_socket(sock)
    except BaseException:
        sock.close()
        raise


def connect(proxy, **kw):
    host, port = proxy.address("pg")
    return psycopg.connect(host=host, port=port, user=USER, dbname=DB, sslmode="require", connect_timeout=10, **kw)


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")
def test_default_minimum_is_tls_1_2(pg, proxy_factory, tmp_path):
    proxy = proxy_factory(config(pg, tmp_path))
    with pytest.raises(ssl.SSLError):
        handshake(proxy, max_version=ssl.TLSVersion.TLSv1_1)
    handshake(proxy, max_version=ssl.TLSVersion.TLSv1_2).close()


def test_minimum_tls_1_3(pg, proxy_factory, tmp_path):
    proxy = proxy_factory(config(pg, tmp_path, tls_min_version="TLSv1.3"))
    with pytest.raises(ssl.SSLError):
        handshake(proxy, max_version=ssl.TLSVersion.TLSv1_2)
    tls = handshake(proxy)
    assert tls.version() == "TLSv1.3"
    tls.close()
    with connect(proxy) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_cipher_list(pg, proxy_factory, tmp_path):
    proxy = proxy_factory(config(pg, tmp_path, tls_ciphers="ECDHE-ECDSA-AES256-GCM-SHA384"))
    with pytest.raises(ssl.SSLError):
        handshake(proxy, max_version=ssl.TLSVersion.TLSv1_2, ciphers="ECDHE-ECDSA-AES128-GCM-SHA256")
    tls = handshake(proxy, max_version=ssl.TLSVersion.TLSv1_2)
    assert tls.cipher()[0] == "ECDHE-ECDSA-AES256-GCM-SHA384"
    tls.close()


def test_client_certificates(pg, proxy_factory, tmp_path):
    trusted = write_client_cert(str(tmp_path), "trusted")
    stranger = write_client_cert(str(tmp_path), "stranger")
    proxy = proxy_factory(config(pg, tmp_path, tls_client_ca_file=trusted["ca"], tls_verify_client=True))
    with connect(proxy, sslcert=trusted["cert"], sslkey=trusted["key"]) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (USER,)
    with pytest.raises(psycopg.OperationalError):
        connect(proxy, sslcert=stranger["cert"], sslkey=stranger["key"])   # issued by another CA
    with pytest.raises(psycopg.OperationalError):
        connect(proxy, sslcert="", sslkey="")                              # no certificate at all
    with connect(proxy, sslcert=trusted["cert"], sslkey=trusted["key"]) as conn:   # the proxy still serves
        assert conn.execute("SELECT 2").fetchone() == (2,)


def test_policy_config_errors(pg, tmp_path):
    raw = config(pg, tmp_path, tls_verify_client=True, tls_ciphers="NO-SUCH-CIPHER")
    with pytest.raises(ConfigError) as info:
        build_config(raw)
    text = str(info.value)
    assert "tls_verify_client: needs tls_client_ca_file" in text
    assert "tls_ciphers: OpenSSL knows no cipher" in text


def test_mysql_listener_minimum_tls_1_3(mariadb, proxy_factory, tmp_path):
    import pymysql
    pki = write_pki(str(tmp_path), "mysql-policy")
    listener = {"tls_cert_file": pki["cert"], "tls_key_file": pki["key"], "require_tls": True,
                "tls_min_version": "TLSv1.3"}
    proxy = proxy_factory(mysql_config(mariadb, listener=listener), files={"users.toml": users_toml()})
    old = ssl.create_default_context(cafile=pki["ca"])
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises(pymysql.err.OperationalError):
        mysql_connect(proxy, ssl=old)
    conn = mysql_connect(proxy, ssl=ssl.create_default_context(cafile=pki["ca"]))
    try:
        assert conn._sock.version() == "TLSv1.3"
        assert query(conn, "SELECT 1") == [(1,)]
    finally:
        conn.close()
