"""SSL contexts for the client leg (server side) and the backend leg (verify modes like libpq's sslmode)."""
from __future__ import annotations

import ssl


TLS_VERSIONS = {"TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}


def client_leg_context(cert_file: str, key_file: str, min_version: str = "TLSv1.2", ciphers: str = "",
                       client_ca_file: str = "", verify_client: bool = False) -> ssl.SSLContext:
    """The context clients see: our certificate, TLS 1.2 at least (or `min_version`), optionally only `ciphers`
    (an OpenSSL cipher list; it governs TLS 1.2, TLS 1.3 suites are OpenSSL's) and, with `verify_client`,
    a client certificate issued by a CA in `client_ca_file`."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = TLS_VERSIONS[min_version]
    if ciphers:
        ctx.set_ciphers(ciphers)
    if client_ca_file:
        ctx.load_verify_locations(client_ca_file)
    if verify_client:
        ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_cert_chain(cert_file, key_file)
    return ctx


def backend_leg_context(mode: str, ca_file: str = "", cert_file: str = "", key_file: str = "") -> ssl.SSLContext:
    """Context toward a backend. require: encrypt, trust anything; verify-ca: check the chain; verify-full: and the name."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if mode in ("verify-ca", "verify-full"):
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.check_hostname = mode == "verify-full"
        if ca_file:
            ctx.load_verify_locations(ca_file)
        else:
            ctx.load_default_certs()
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if cert_file:
        ctx.load_cert_chain(cert_file, key_file or None)
    return ctx
