"""The MySQL/MariaDB engine plugin: protocol 4.1 clients and backends, transaction pooling, tracked session state."""
from __future__ import annotations

from multiproxy.engine import BackendTarget, ClientContext, Engine, ErrorKind

from .auth import VERIFIER_KINDS, rsa_private_key
from .backend import MySQLCancel, MySQLLogin, MySQLProbe
from .client import MySQLClient, render_error
from .pinning import ALL_PIN_REASONS


class MySQLEngine(Engine):
    name = "mysql"
    default_port = 3306
    description = "MySQL and MariaDB client/server protocol 4.1"
    supports_token_auth = True     # an AuthSwitchRequest to mysql_clear_password over TLS, as RDS IAM does
    # scram-sha-256 means caching_sha2_password here and md5 means mysql_native_password
    client_auth_methods = ("trust", "mysql_native_password", "caching_sha2_password", "md5", "scram-sha-256", "token")
    pin_reasons = ALL_PIN_REASONS
    verifier_kinds = VERIFIER_KINDS

    def __init__(self):
        # The version clients are greeted with: the latest backend login's (the greeting precedes any borrow).
        self.server_version = ""
        self._rsa_key = None

    def rsa_key(self):
        """The proxy's RSA key for caching_sha2_password full authentication without TLS (made on first use)."""
        if self._rsa_key is None:
            self._rsa_key = rsa_private_key()
        return self._rsa_key

    def client_protocol(self, ctx: ClientContext) -> MySQLClient:
        return MySQLClient(ctx, self)

    def backend_variant(self, params: dict) -> tuple:
        # Clients differing in result-set format (CLIENT_DEPRECATE_EOF) or server behaviour (found rows,
        # multi statements, local infile, ...) and login character set get their own backends.
        return (("capabilities", int(params.get("capabilities", 0))), ("charset", int(params.get("charset", 45))))

    def backend_login(self, target: BackendTarget) -> MySQLLogin:
        return MySQLLogin(target)

    def cancel_script(self, target: BackendTarget, server_state) -> MySQLCancel:
        return MySQLCancel(target, server_state)

    def probe_script(self, target: BackendTarget) -> MySQLProbe:
        return MySQLProbe(target)

    def render_error(self, kind: ErrorKind, message: str) -> bytes:
        return render_error(kind, message, 2)

    def new_cancel_key(self, counter: int, worker: int) -> int:
        # The thread id clients see in the handshake: worker in the high bits, a counter below.
        return ((worker & 0x7F) << 24) | (counter & 0xFFFFFF) or 1
