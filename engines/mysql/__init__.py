"""The MySQL/MariaDB engine plugin: protocol 4.1 clients and backends, transaction pooling, tracked session state."""
from __future__ import annotations

from multiproxy.engine import BackendTarget, ClientContext, Engine, ErrorKind

from . import auth
from . import compiled_relay
from . import handover
from . import protocol as p
from .auth import VERIFIER_KINDS, rsa_private_key
from .backend import MySQLCancel, MySQLLogin, MySQLProbe, MySQLQuery
from .client import MySQLClient, render_error
from .pinning import ALL_PIN_REASONS
from .session_state import COLLATIONS

# The variant's capability bits by name, in the order pool names list them.
VARIANT_NAMES = ((p.CLIENT_DEPRECATE_EOF, "deprecate_eof"), (p.CLIENT_MULTI_STATEMENTS, "multi_statements"),
                 (p.CLIENT_MULTI_RESULTS, "multi_results"), (p.CLIENT_PS_MULTI_RESULTS, "ps_multi_results"),
                 (p.CLIENT_FOUND_ROWS, "found_rows"), (p.CLIENT_LOCAL_FILES, "local_files"),
                 (p.CLIENT_IGNORE_SPACE, "ignore_space"), (p.CLIENT_INTERACTIVE, "interactive"))
# Default collations of their charsets (all in COLLATIONS), named by the charset alone: latin1, ascii, utf8, ...
DEFAULT_COLLATIONS = frozenset({8, 11, 33, 45, 63})


class MySQLEngine(Engine):
    name = "mysql"
    default_port = 3306
    description = "MySQL and MariaDB client/server protocol 4.1"
    supports_token_auth = True     # an AuthSwitchRequest to mysql_clear_password over TLS, as RDS IAM does
    # scram-sha-256 means caching_sha2_password here and md5 means mysql_native_password
    client_auth_methods = ("trust", "mysql_native_password", "caching_sha2_password", "md5", "scram-sha-256", "token")
    pin_reasons = ALL_PIN_REASONS
    verifier_kinds = VERIFIER_KINDS

    auth_query_default = auth.AUTH_QUERY_DEFAULT

    def auth_query_sql(self, query: str, user: str) -> str:
        return auth.auth_query_sql(query, user)

    def auth_query_verifiers(self, value: str) -> dict:
        return auth.auth_query_verifiers(value)

    def __init__(self):
        # The version clients are greeted with: the latest backend login's (the greeting precedes any borrow).
        self.server_version = ""
        self._rsa_key = None

    def rsa_key(self):
        """The proxy's RSA key for caching_sha2_password full authentication without TLS (made on first use)."""
        if self._rsa_key is None:
            self._rsa_key = rsa_private_key()
        return self._rsa_key

    def relay_rules(self, key=None) -> dict:
        return compiled_relay.relay_rules(key)

    def relay_serves(self, key, server_state) -> bool:
        return compiled_relay.relay_serves(key, server_state)

    def client_protocol(self, ctx: ClientContext) -> MySQLClient:
        return MySQLClient(ctx, self)

    def resume_client(self, ctx: ClientContext, state: dict) -> MySQLClient:
        return handover.resume(self, ctx, state)

    def backend_variant(self, params: dict) -> tuple:
        # Clients differing in result-set format (CLIENT_DEPRECATE_EOF) or server behaviour (found rows,
        # multi statements, local infile, ...) and login character set get their own backends.
        return (("capabilities", int(params.get("capabilities", 0))), ("charset", int(params.get("charset", 45))))

    def variant_name(self, variant: tuple) -> str:
        # The capability bits in the variant by their short names, then the login charset: deprecate_eof,utf8mb4.
        values = dict(variant)
        capabilities = values.get("capabilities", 0)
        names = [name for bit, name in VARIANT_NAMES if capabilities & bit]
        charset = values.get("charset", 45)
        collation = COLLATIONS.get(charset)
        if charset in DEFAULT_COLLATIONS:
            names.append(collation[0])
        elif collation and collation[1]:
            names.append(collation[1])
        else:
            names.append(f"{collation[0] if collation else 'collation'}#{charset}")
        return ",".join(names)

    def welcome_facts_from(self, facts, user: str, database: str, of_user: str, of_database: str):
        # The greeting reads the server's version and its login status flags (autocommit): the same whatever the
        # user, database or capabilities of the login they came from.
        return facts

    def backend_login(self, target: BackendTarget) -> MySQLLogin:
        return MySQLLogin(target)

    def cancel_script(self, target: BackendTarget, server_state) -> MySQLCancel:
        return MySQLCancel(target, server_state)

    max_connections_query = "SELECT @@max_connections"

    def backend_query(self, sql: str, server_state, what: str = "query") -> MySQLQuery:
        return MySQLQuery(sql, server_state, what)

    def probe_script(self, target: BackendTarget) -> MySQLProbe:
        return MySQLProbe(target)

    def render_error(self, kind: ErrorKind, message: str) -> bytes:
        return render_error(kind, message, 2)

    def new_cancel_key(self, counter: int, worker: int) -> int:
        # The thread id clients see in the handshake: worker in the high bits, a counter below.
        return ((worker & 0x7F) << 24) | (counter & 0xFFFFFF) or 1
