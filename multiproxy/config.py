"""Configuration: TOML read with tomllib into frozen dataclasses; every error names its key path, all reported at once."""
from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field
from typing import Any

from .token_auth import ReloadingVerifier

POOL_MODES = ("session", "transaction")
ROLES = ("writer", "reader")
TOKEN_KINDS = ("rds_iam", "jwt")
BACKEND_TLS_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
PIN_ACTIONS = ("pin", "reject", "ignore")
SECRET_KEYS = ("password", "password_env", "password_file", "password_command", "password_secret_arn")
AWS_KEYS = ("aws_region", "aws_endpoint_url")


class ConfigError(Exception):
    """All problems found in one configuration, each naming its key path."""

    def __init__(self, problems: list[str], source: str = ""):
        self.problems = problems
        self.source = source
        head = f"{source}: " if source else ""
        super().__init__(head + f"{len(problems)} problem(s):\n" + "\n".join(f"  {p}" for p in problems))


@dataclass(frozen=True)
class Setting:
    """One declared setting: its type, default and help; validation and docs follow from it."""

    name: str
    kind: type | tuple
    default: Any
    help: str
    choices: tuple = ()
    minimum: float | None = None


def _settings(*items: Setting) -> dict[str, Setting]:
    return {s.name: s for s in items}


ADMIN_SETTINGS = _settings(
    Setting("users", list, [], "client users who may use the admin console (the databases multiproxy and pgbouncer on "
            "PostgreSQL listeners): every SHOW and every command (PgBouncer's admin_users)"),
    Setting("stats_users", list, [], "client users who may use the admin console read-only: SHOW only "
            "(PgBouncer's stats_users)"),
    Setting("http_token_env", str, "", "environment variable holding a token the admin HTTP server's /admin/ "
            "and status page require (Authorization: Bearer TOKEN, or basic auth with TOKEN as the password); empty: /admin/ answers without one, on a loopback admin_listen only"),
)

PROXY_SETTINGS = _settings(
    Setting("admin_listen", str, "127.0.0.1:9930", "host:port of the admin HTTP server (/metrics, /healthz); empty disables it"),
    Setting("log_level", str, "info", "logging level", ("debug", "info", "warning", "error")),
    Setting("handshake_timeout", float, 10.0, "seconds a client has to finish startup and authentication", minimum=0.1),
    Setting("idle_client_timeout", float, 0.0, "close client connections idle this long outside a transaction (with an "
            "error in their protocol); never fires inside a transaction or while a request runs; 0 never", minimum=0),
    Setting("shutdown_timeout", float, 30.0, "seconds to wait for clients to finish on SIGTERM before closing them", minimum=0),
    Setting("max_message_size", int, 64 * 1024 * 1024, "largest client message accepted, in bytes", minimum=1024),
    Setting("workers", int, 1, "worker processes sharing the listeners, under a supervisor that respawns them and "
            "holds max_size and max_cluster_connections for them all; with more than 1, SIGTTIN to the main process adds "
            "one and SIGTTOU removes one (never the last; its idle clients move to the others) until the next "
            "restart", minimum=1),
    Setting("worker_custody", bool, True, "with workers > 1: the supervisor holds a duplicate of each worker's "
            "plaintext client connections and their session state, so that when a worker dies (kill -9, a crash) its "
            "idle clients are resumed by the respawned worker with their session; clients busy at that moment are "
            "closed"),
    Setting("worker_timeout", float, 30.0, "with workers > 1: seconds a worker may go without a heartbeat before the "
            "supervisor kills (SIGKILL) and replaces it", minimum=1.0),
    Setting("max_connections_per_address", int, 0, "most client connections at once from one address; 0 unlimited",
            minimum=0),
    Setting("audit_log", str, "", "file receiving one JSON line per login, failed login, token rejection and limit hit"),
    Setting("auth_failure_delay", float, 0.25, "delay before answering a failed login; doubles with each further "
            "failure from the address, up to auth_failure_max_delay", minimum=0),
    Setting("auth_failure_max_delay", float, 4.0, "longest delay before answering a failed login", minimum=0),
    Setting("auth_failure_block_after", int, 10, "failed logins from one address within 5 minutes that block it; "
            "0 never blocks", minimum=0),
    Setting("auth_failure_block_seconds", float, 60.0, "how long a blocked address is turned away", minimum=0),
    Setting("idle_transaction_timeout", float, 0.0, "close clients idle this long inside a transaction (no request "
            "outstanding), with an error in their protocol; their transaction is rolled back; 0 never", minimum=0),
    Setting("takeover_socket", str, "auto", "Unix socket on which the running process hands its listeners and idle "
            "clients to a new one (multiproxy run --takeover); mode 0600; auto: "
            "/run/multiproxy/multiproxy-takeover-PORT.sock when /run/multiproxy is writable, else in the temporary "
            "directory (PORT: the first listener's); empty disables takeovers"),
    Setting("takeover_drain_timeout", float, 30.0, "seconds a process being taken over waits for its busy clients "
            "to become idle (and go to the new process); those still busy then, and TLS clients, finish with it as "
            "in a graceful stop (proxy.shutdown_timeout). A worker SIGTTOU retires waits as long for its clients to "
            "move to the other workers", minimum=0),
    Setting("relay", str, "python", "how the bytes of transaction-mode sessions move: python (a greenlet relays each "
            "message) or compiled (a plaintext, unpinned client idle between transactions is served by the compiled "
            "relay core with the pool's spare backends, and Python wakes only at what its engine must see: see "
            "docs/architecture.md, Compiled relay mode; PostgreSQL, MySQL/MariaDB, and SQL Server (TDS) where "
            "reset_after_transaction = no (with the reset, TDS stays on python); with one worker, repeat PostgreSQL "
            "logins on a listener without TLS are accepted and greeted by the compiled relay core too, with trust "
            "or with scram-sha-256 for users of the users file (the relay verifies their SCRAM exchange); falls "
            "back to the relay core's pure-Python twin, with a warning, when multiproxy._relay is not built). Needs a "
            "restart; not with worker_custody when workers > 1", ("python", "compiled")),
)

BACKEND_SETTINGS = _settings(
    Setting("tls", str, "prefer", "TLS toward the backend, as libpq's sslmode", BACKEND_TLS_MODES),
    Setting("tls_ca_file", str, "", "CA bundle used to verify backend certificates (verify-ca, verify-full)"),
    Setting("tls_cert_file", str, "", "client certificate presented to the backend"),
    Setting("tls_key_file", str, "", "key of the client certificate presented to the backend"),
    Setting("connect_timeout", float, 5.0, "seconds to connect and log in to a backend", minimum=0.1),
    Setting("reset_query", str, "", "statement that resets a backend released by a pinned session; empty uses the engine's own"),
    Setting("reset_after_transaction", str, "auto", "reset every backend before it serves the next transaction, "
            "so state a client set indirectly (in a function, procedure or dynamic SQL) never reaches another; "
            "auto follows the engine (TDS yes: RESETCONNECTION is free; PostgreSQL and MySQL no)",
            ("auto", "yes", "no")),
    Setting("max_prepared_statements", int, 200, "server-side prepared statements kept on each backend connection "
            "for the clients it serves in turn (MySQL binary protocol, TDS sp_prepare); the least recently used is "
            "closed beyond this, and prepared again when a client next needs it (PgBouncer's "
            "max_prepared_statements)", minimum=1),
    Setting("init_query", str, "", "statements run once on each new backend connection, after its login and before "
            "it serves a client (RDS Proxy's InitQuery, PgBouncer's connect_query); what it sets holds for every client "
            "of that connection; its failure fails the login with the server's error; empty: none"),
)

AUTH_QUERY_SETTINGS = _settings(
    Setting("user", str, None, "the client user whose backend credentials ([[clusters.NAME.credentials]]) the lookup "
            "logs in with; it must be able to read the verifiers (pg_shadow, mysql.user: see docs/security.md)"),
    Setting("query", str, "", "the lookup, with one placeholder for the user name ($1 on PostgreSQL, ? on "
            "MySQL/MariaDB), bound as a quoted literal; its first row's last column is the verifier; empty: the "
            "engine's own (PostgreSQL: SELECT usename, passwd FROM pg_catalog.pg_shadow WHERE usename = $1 AND "
            "(valuntil IS NULL OR valuntil > now()); MySQL/MariaDB: SELECT authentication_string FROM mysql.user "
            "WHERE user = ? AND plugin = 'mysql_native_password' AND password_expired = 'N')"),
    Setting("database", str, "", "the database the lookup logs in to; empty: the client's"),
    Setting("cache_seconds", float, 60.0, "how long a user found is trusted before it is looked up again", minimum=0),
    Setting("negative_cache_seconds", float, 5.0, "how long a user not found stays refused before it is looked up "
            "again", minimum=0),
)

POOL_SETTINGS = _settings(
    Setting("mode", str, "transaction", "when a client gives its backend back: after each transaction or at disconnect", POOL_MODES),
    Setting("min_size", int, 0, "backend connections kept open per (user, database) even when idle", minimum=0),
    Setting("max_size", int, 20, "most backend connections per (user, database)", minimum=1),
    Setting("borrow_timeout", float, 5.0, "seconds a transaction waits for a backend before it fails", minimum=0),
    Setting("idle_timeout", float, 600.0, "close pooled backend connections idle this long; 0 never", minimum=0),
    Setting("max_lifetime", float, 3600.0, "close backend connections this old when they come back to the pool; 0 never", minimum=0),
    Setting("query_timeout", float, 0.0, "cancel a request (through the engine's own cancel) whose answer has not "
            "completed within this many seconds; the client gets the server's cancel error; 0 never", minimum=0),
    Setting("max_cluster_connections", (int, str), 0, "most backend connections of the cluster's role across all its "
            "users, databases and client variants: a number, or a percentage of the server's max_connections as "
            "\"80%\" (read from the server at the first login); borrowers beyond it wait in one queue, first come "
            "first served; 0 unlimited (PgBouncer's max_db_connections, RDS Proxy's MaxConnectionsPercent)"),
)

DNS_SETTINGS = _settings(
    Setting("nameserver", str, "", "host:port of the nameserver to ask for endpoint names; empty uses the system resolver"),
    Setting("ttl_floor", float, 1.0, "poll an endpoint name at most this often, whatever its TTL says", minimum=0.05),
    Setting("ttl_ceiling", float, 30.0, "poll an endpoint name at least this often, whatever its TTL says", minimum=0.05),
    Setting("timeout", float, 2.0, "seconds to wait for a DNS answer", minimum=0.05),
)

HEALTH_SETTINGS = _settings(
    Setting("probe_interval", float, 1.0, "seconds between role probes of each node", minimum=0.05),
    Setting("failure_threshold", int, 2, "failed probes in a row that take a node out of rotation", minimum=1),
    Setting("backoff_max", float, 10.0, "longest wait between probes of a node that is down", minimum=0.05),
    Setting("probe_user", str, "", "the client user whose backend credentials the probes use; empty: the first credential's"),
    Setting("max_replica_lag", float, 30.0, "readers lagging more than this many seconds are skipped", minimum=0),
    Setting("reader_fallback_to_writer", bool, True, "reader listeners use the writer when no reader is available"),
    Setting("writerless_reader_delay", float, 2.0,
            "seconds after the writer is lost during which readers serve nothing (a failover may be promoting one); "
            "after it, readers a probe confirmed since serve again until a writer is found", minimum=0),
    Setting("retry_read_only", bool, True, "retry once on the new writer a first statement refused as read-only"),
)

CREDENTIAL_SETTINGS = _settings(
    Setting("user", str, "*", "the client user these backend credentials serve; * serves any user"),
    Setting("backend_user", str, "", "the user to log in to the backend as; empty means the client's user"),
    Setting("password", str, "", "the backend password, literally (prefer password_env or password_file)"),
    Setting("password_env", str, "", "environment variable holding the backend password"),
    Setting("password_file", str, "", "file holding the backend password (mode 0600)"),
    Setting("password_command", str, "", "shell command printing the backend password"),
    Setting("password_secret_arn", str, "", "AWS Secrets Manager secret holding the backend password (its JSON "
            "\"password\" key, or the whole SecretString)"),
    Setting("aws_region", str, "", "region of password_secret_arn; empty takes it from the ARN"),
    Setting("aws_endpoint_url", str, "", "Secrets Manager endpoint (a VPC endpoint or a local emulator); empty: AWS's"),
)

LISTENER_SETTINGS = _settings(
    Setting("name", str, None, "a unique name for the listener"),
    Setting("listen", str, None, "host:port to accept clients on"),
    Setting("cluster", str, None, "the cluster this listener serves"),
    Setting("role", str, "writer", "which nodes of the cluster serve it", ROLES),
    Setting("auth", str, "scram-sha-256", "how clients authenticate: trust, token (a short-lived token as the "
            "password, over TLS, on engines that support it: see token_kind), or a password method the cluster's "
            "engine offers (its `client_auth_methods`: md5 and scram-sha-256 on every built-in engine; MySQL also "
            "names its own; see docs/engines/)"),
    Setting("tls_cert_file", str, "", "certificate presented to clients; enables TLS on this listener"),
    Setting("tls_key_file", str, "", "private key of tls_cert_file"),
    Setting("require_tls", bool, False, "refuse clients that do not upgrade to TLS"),
    Setting("tls_min_version", str, "TLSv1.2", "oldest TLS version clients may use", ("TLSv1.2", "TLSv1.3")),
    Setting("tls_ciphers", str, "", "OpenSSL cipher list for TLS 1.2 clients (e.g. ECDHE+AESGCM); empty: OpenSSL's "
            "defaults"),
    Setting("tls_client_ca_file", str, "", "CA bundle that client certificates must chain to"),
    Setting("tls_verify_client", bool, False, "require a client certificate issued by tls_client_ca_file"),
    Setting("pool_mode", str, "", "override of the cluster's pool mode for this listener", ("",) + POOL_MODES),
    Setting("max_client_connections", int, 0, "most client connections at once on this listener; 0 unlimited", minimum=0),
    Setting("token_kind", str, "", "with auth = 'token': rds_iam (RDS IAM authentication tokens) or jwt",
            ("",) + TOKEN_KINDS),
    Setting("iam_access_keys_file", str, "", "rds_iam: TOML or JSON file of access key id = secret access key, or "
            "a table with secret_access_key and session_token for temporary credentials (mode 0600)"),
    Setting("iam_region", str, "", "rds_iam: the region tokens must be signed for; empty accepts any"),
    Setting("iam_hostname", str, "", "rds_iam: host:port tokens may name besides the listen address (the DNS name "
            "clients connect to)"),
    Setting("jwt_jwks_file", str, "", "jwt: JSON Web Key Set file with the RS256/ES256 public keys"),
    Setting("jwt_shared_key_env", str, "", "jwt: environment variable holding an HS256 key (32 characters at least)"),
    Setting("jwt_issuer", str, "", "jwt: the required iss claim"),
    Setting("jwt_audience", str, "", "jwt: the required aud claim"),
    Setting("jwt_user_claim", str, "sub", "jwt: the claim that must equal the database user"),
    Setting("token_keys_check_interval", float, 5.0, "seconds between looks at iam_access_keys_file or jwt_jwks_file "
            "(mtime, size); a changed file is reloaded, as on SIGHUP; 0 reloads on SIGHUP only", minimum=0),
)
TOKEN_SETTINGS = ("token_kind", "iam_access_keys_file", "iam_region", "iam_hostname", "jwt_jwks_file",
                  "jwt_shared_key_env", "jwt_issuer", "jwt_audience", "jwt_user_claim", "token_keys_check_interval")


@dataclass(frozen=True)
class ProxyConfig:
    admin_listen: str
    log_level: str
    handshake_timeout: float
    idle_client_timeout: float
    shutdown_timeout: float
    max_message_size: int
    workers: int
    max_connections_per_address: int
    audit_log: str
    auth_failure_delay: float
    auth_failure_max_delay: float
    auth_failure_block_after: int
    auth_failure_block_seconds: float
    idle_transaction_timeout: float = 0.0
    worker_timeout: float = 30.0
    takeover_socket: str = "auto"
    takeover_drain_timeout: float = 30.0
    worker_custody: bool = True
    relay: str = "python"


@dataclass(frozen=True)
class BackendConfig:
    tls: str
    tls_ca_file: str
    tls_cert_file: str
    tls_key_file: str
    connect_timeout: float
    reset_query: str
    reset_after_transaction: str
    max_prepared_statements: int
    init_query: str = ""


@dataclass(frozen=True)
class PoolConfig:
    mode: str
    min_size: int
    max_size: int
    borrow_timeout: float
    idle_timeout: float
    max_lifetime: float
    query_timeout: float = 0.0
    max_cluster_connections: int | str = 0

    def cluster_cap(self, server_max: int | None = None) -> int:
        """max_cluster_connections as a number of connections: the absolute number, or the percentage of the
        server's max_connections (`server_max`; None while unknown: 0, no cap yet). 0: no cap."""
        value = self.max_cluster_connections
        if isinstance(value, int):
            return value
        if not server_max:
            return 0
        return max(1, int(server_max * float(value.strip().rstrip("%")) / 100))


@dataclass(frozen=True)
class DnsConfig:
    nameserver: tuple | None
    ttl_floor: float
    ttl_ceiling: float
    timeout: float


@dataclass(frozen=True)
class HealthConfig:
    probe_interval: float
    failure_threshold: int
    backoff_max: float
    probe_user: str
    max_replica_lag: float
    writerless_reader_delay: float
    reader_fallback_to_writer: bool
    retry_read_only: bool


@dataclass(frozen=True)
class Credential:
    user: str
    backend_user: str
    password: str
    password_env: str
    password_file: str
    password_command: str
    password_secret_arn: str = ""
    aws_region: str = ""
    aws_endpoint_url: str = ""
    key_path: str = ""

    def secret_source(self) -> dict:
        source = {k: getattr(self, k) for k in SECRET_KEYS if getattr(self, k)}
        if source:
            source.update({k: getattr(self, k) for k in AWS_KEYS if getattr(self, k)})
        return source


@dataclass(frozen=True)
class AuthQueryConfig:
    user: str
    query: str
    database: str
    cache_seconds: float
    negative_cache_seconds: float


@dataclass(frozen=True)
class ClusterConfig:
    name: str
    engine: str
    hosts: tuple[tuple[str, int], ...]
    backend: BackendConfig
    pool: PoolConfig
    credentials: tuple[Credential, ...]
    pinning: dict = field(default_factory=dict)
    engine_options: dict = field(default_factory=dict)
    endpoints: dict = field(default_factory=dict)        # 'writer'/'reader' -> (dns name, port)
    dns: DnsConfig | None = None
    health: HealthConfig | None = None
    auth_query: AuthQueryConfig | None = None    # [clusters.NAME.auth_query]; None: users come from the users file only

    def credential_for(self, user: str) -> Credential | None:
        fallback = None
        for cred in self.credentials:
            if cred.user == user:
                return cred
            if cred.user == "*" and fallback is None:
                fallback = cred
        return fallback


@dataclass(frozen=True)
class ListenerConfig:
    name: str
    listen: tuple[str, int]
    cluster: str
    role: str
    auth: str
    tls_cert_file: str
    tls_key_file: str
    require_tls: bool
    pool_mode: str
    max_client_connections: int
    tls_min_version: str = "TLSv1.2"
    tls_ciphers: str = ""
    tls_client_ca_file: str = ""
    tls_verify_client: bool = False
    token_kind: str = ""
    iam_access_keys_file: str = ""
    iam_region: str = ""
    iam_hostname: str = ""
    jwt_jwks_file: str = ""
    jwt_shared_key_env: str = ""
    jwt_issuer: str = ""
    jwt_audience: str = ""
    jwt_user_claim: str = "sub"
    token_keys_check_interval: float = 5.0
    token_verifier: Any = field(default=None, compare=False, repr=False)   # multiproxy.token_auth, with auth = 'token'


@dataclass(frozen=True)
class AdminConfig:
    users: tuple[str, ...] = ()
    stats_users: tuple[str, ...] = ()
    http_token_env: str = ""


@dataclass(frozen=True)
class Config:
    proxy: ProxyConfig
    users_file: str
    clusters: dict[str, ClusterConfig]
    listeners: tuple[ListenerConfig, ...]
    source: str = ""
    admin: AdminConfig = AdminConfig()


def parse_address(text: Any, default_port: int | None = None) -> tuple[str, int]:
    """'host:port' (or '[v6]:port') to a tuple; raises ValueError with a readable reason."""
    if not isinstance(text, str) or not text:
        raise ValueError(f"expected host:port, got {text!r}")
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    else:
        host, sep, port = text.rpartition(":")
        if not sep:
            host, port = text, ""
    if not port and default_port is not None:
        port = str(default_port)
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected host:port, got {text!r}")
    return host, int(port)


class _Reader:
    """Walks a TOML table against declared settings, collecting every problem with its key path."""

    def __init__(self):
        self.problems: list[str] = []

    def problem(self, path: str, message: str) -> None:
        self.problems.append(f"{path}: {message}")

    def table(self, raw: Any, path: str) -> dict:
        if raw is None:
            return {}
        if not isinstance(raw, dict):
            self.problem(path, f"expected a table, got {type(raw).__name__}")
            return {}
        return raw

    def settings(self, raw: dict, path: str, declared: dict[str, Setting], allow_extra: tuple = ()) -> dict:
        values = {}
        for key in raw:
            if key not in declared and key not in allow_extra:
                known = ", ".join(sorted(declared))
                self.problem(f"{path}.{key}", f"unknown setting (known: {known})")
        for name, setting in declared.items():
            key_path = f"{path}.{name}"
            if name not in raw:
                if setting.default is None:
                    self.problem(key_path, "missing; " + setting.help)
                values[name] = setting.default
                continue
            value = raw[name]
            if setting.kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not isinstance(value, setting.kind) or (setting.kind is int and isinstance(value, bool)):
                kind = setting.kind
                names = " or ".join(k.__name__ for k in kind) if isinstance(kind, tuple) else kind.__name__
                self.problem(key_path, f"expected {names}, got {value!r}")
                values[name] = setting.default
                continue
            if setting.choices and value not in setting.choices:
                self.problem(key_path, f"expected one of {', '.join(repr(c) for c in setting.choices)}, got {value!r}")
            if setting.minimum is not None and value < setting.minimum:
                self.problem(key_path, f"must be at least {setting.minimum}, got {value!r}")
            values[name] = value
        return values


def load_config(path: str, known_engines: dict | None = None) -> Config:
    """Read and validate a config file; raises ConfigError listing every problem."""
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except OSError as exc:
        raise ConfigError([f"cannot read the file: {exc.strerror}"], path) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"not valid TOML: {exc}"], path) from None
    return build_config(raw, path, known_engines)


def build_config(raw: dict, source: str = "", known_engines: dict | None = None) -> Config:
    r = _Reader()
    base_dir = os.path.dirname(os.path.abspath(source)) if source else os.getcwd()
    for key in raw:
        if key not in ("proxy", "admin", "auth", "clusters", "listeners"):
            r.problem(key, "unknown section (known: proxy, admin, auth, clusters, listeners)")

    proxy_values = r.settings(r.table(raw.get("proxy"), "proxy"), "proxy", PROXY_SETTINGS)
    if proxy_values["audit_log"] and not os.path.isabs(proxy_values["audit_log"]):
        proxy_values["audit_log"] = os.path.join(base_dir, proxy_values["audit_log"])
    if proxy_values["takeover_socket"] not in ("", "auto") and not os.path.isabs(proxy_values["takeover_socket"]):
        proxy_values["takeover_socket"] = os.path.join(base_dir, proxy_values["takeover_socket"])
    proxy = ProxyConfig(**proxy_values)
    if proxy.relay == "compiled" and proxy.workers > 1 and proxy.worker_custody:
        r.problem("proxy.relay", "relay = 'compiled' does not keep worker custody's busy mark of each client "
                  "(proxy.worker_custody, with workers > 1): set proxy.worker_custody = false, or relay = 'python'")
    if proxy.admin_listen:
        try:
            parse_address(proxy.admin_listen)
        except ValueError as exc:
            r.problem("proxy.admin_listen", str(exc))

    admin_values = r.settings(r.table(raw.get("admin"), "admin"), "admin", ADMIN_SETTINGS)
    for name in ("users", "stats_users"):
        names = admin_values[name]
        if not all(isinstance(item, str) and item for item in names):
            r.problem(f"admin.{name}", f"expected a list of user names, got {names!r}")
        admin_values[name] = tuple(item for item in names if isinstance(item, str))
    admin = AdminConfig(**admin_values)

    auth = r.table(raw.get("auth"), "auth")
    users_file = ""
    for key, value in auth.items():
        if key != "users_file":
            r.problem(f"auth.{key}", "unknown setting (known: users_file)")
        elif not isinstance(value, str):
            r.problem("auth.users_file", f"expected a path, got {value!r}")
        else:
            users_file = os.path.join(base_dir, value) if value else ""

    clusters = {}
    for name, craw in r.table(raw.get("clusters"), "clusters").items():
        path = f"clusters.{name}"
        craw = r.table(craw, path)
        engine = craw.get("engine")
        if not isinstance(engine, str) or not engine:
            r.problem(f"{path}.engine", "missing; name an engine (see `multiproxy engines`)")
        elif known_engines is not None and engine not in known_engines:
            r.problem(f"{path}.engine", f"unknown engine {engine!r} (loaded: {', '.join(sorted(known_engines)) or 'none'})")
        default_port = None
        if known_engines and engine in known_engines:
            default_port = getattr(known_engines[engine], "default_port", None)
        hosts = []
        hosts_raw = craw.get("hosts", [])
        endpoints = {}
        for kind, value in r.table(craw.get("endpoints"), f"{path}.endpoints").items():
            if kind not in ROLES:
                r.problem(f"{path}.endpoints.{kind}", f"unknown endpoint (known: {', '.join(ROLES)})")
                continue
            try:
                endpoints[kind] = parse_address(value, default_port)
            except ValueError as exc:
                r.problem(f"{path}.endpoints.{kind}", str(exc))
        if not isinstance(hosts_raw, list) or (not hosts_raw and not endpoints and "endpoints" not in craw):
            r.problem(f"{path}.hosts", "expected a non-empty list of host:port (or give [clusters.NAME.endpoints])")
        else:
            for i, h in enumerate(hosts_raw):
                try:
                    hosts.append(parse_address(h, default_port))
                except ValueError as exc:
                    r.problem(f"{path}.hosts[{i}]", str(exc))
        for key in craw:
            if key not in ("engine", "hosts", "endpoints", "dns", "health", "backend", "pool", "credentials", "pinning",
                           "options", "auth_query"):
                r.problem(f"{path}.{key}", "unknown setting (known: engine, hosts, endpoints, dns, health, backend, pool, "
                          "credentials, pinning, options, auth_query)")
        backend = BackendConfig(**r.settings(r.table(craw.get("backend"), f"{path}.backend"), f"{path}.backend", BACKEND_SETTINGS))
        pool = PoolConfig(**r.settings(r.table(craw.get("pool"), f"{path}.pool"), f"{path}.pool", POOL_SETTINGS))
        if pool.min_size > pool.max_size:
            r.problem(f"{path}.pool.min_size", f"must not exceed max_size ({pool.max_size}), got {pool.min_size}")
        cap = pool.max_cluster_connections
        if isinstance(cap, bool) or (isinstance(cap, int) and cap < 0):
            r.problem(f"{path}.pool.max_cluster_connections", f"expected a number of connections (0: unlimited) or a "
                      f"percentage as \"80%\", got {cap!r}")
        elif isinstance(cap, str):
            try:
                percent = float(cap.strip()[:-1]) if cap.strip().endswith("%") else -1.0
            except ValueError:
                percent = -1.0
            if not 0 < percent <= 100:
                r.problem(f"{path}.pool.max_cluster_connections", f"expected a percentage of the server's "
                          f"max_connections between 0% and 100% as \"80%\" (or a number), got {cap!r}")
        creds = []
        creds_raw = craw.get("credentials", [])
        if not isinstance(creds_raw, list):
            r.problem(f"{path}.credentials", "expected an array of tables ([[clusters.NAME.credentials]])")
            creds_raw = []
        for i, item in enumerate(creds_raw):
            cpath = f"{path}.credentials[{i}]"
            values = r.settings(r.table(item, cpath), cpath, CREDENTIAL_SETTINGS)
            given = [k for k in SECRET_KEYS if values.get(k)]
            if len(given) > 1:
                r.problem(cpath, f"give only one of {', '.join(SECRET_KEYS)}, got {', '.join(given)}")
            for key in AWS_KEYS:
                if values.get(key) and not values.get("password_secret_arn"):
                    r.problem(f"{cpath}.{key}", "only used with password_secret_arn")
            if values.get("password_file") and not os.path.isabs(values["password_file"]):
                values["password_file"] = os.path.join(base_dir, values["password_file"])
            creds.append(Credential(**values, key_path=cpath))
        pinning = r.table(craw.get("pinning"), f"{path}.pinning")
        reasons = getattr((known_engines or {}).get(engine), "pin_reasons", None) if isinstance(engine, str) else None
        for reason, action in pinning.items():
            if action not in PIN_ACTIONS:
                r.problem(f"{path}.pinning.{reason}", f"expected one of {', '.join(PIN_ACTIONS)}, got {action!r}")
            elif reasons is not None and reason not in reasons:
                r.problem(f"{path}.pinning.{reason}", f"engine {engine!r} reports no pin reason {reason!r}; its "
                          f"reasons: {', '.join(reasons)}")
        options = r.table(craw.get("options"), f"{path}.options")
        dns_values = r.settings(r.table(craw.get("dns"), f"{path}.dns"), f"{path}.dns", DNS_SETTINGS)
        nameserver = None
        if dns_values["nameserver"]:
            try:
                nameserver = parse_address(dns_values["nameserver"], 53)
            except ValueError as exc:
                r.problem(f"{path}.dns.nameserver", str(exc))
        dns_values["nameserver"] = nameserver
        if dns_values["ttl_floor"] > dns_values["ttl_ceiling"]:
            r.problem(f"{path}.dns.ttl_floor", f"must not exceed ttl_ceiling ({dns_values['ttl_ceiling']})")
        health = HealthConfig(**r.settings(r.table(craw.get("health"), f"{path}.health"), f"{path}.health", HEALTH_SETTINGS))
        follows_roles = bool(endpoints) or (isinstance(hosts_raw, list) and len(hosts_raw) > 1)
        named_credentials = [c for c in (craw.get("credentials") or []) if isinstance(c, dict) and c.get("user", "*") != "*"]
        if follows_roles and not health.probe_user and not named_credentials:
            r.problem(f"{path}.health.probe_user", "needed to verify node roles (the cluster has endpoints or several "
                      "hosts): name the user the probes log in as")
        auth_query = None
        if "auth_query" in craw:
            apath = f"{path}.auth_query"
            values = r.settings(r.table(craw.get("auth_query"), apath), apath, AUTH_QUERY_SETTINGS)
            if values.get("user") is not None:
                auth_query = AuthQueryConfig(**values)
                _check_auth_query(r, apath, auth_query, (known_engines or {}).get(engine) if isinstance(engine, str)
                                  else None, engine, creds)
        clusters[name] = ClusterConfig(
            name=name, engine=engine or "", hosts=tuple(hosts), backend=backend, pool=pool,
            credentials=tuple(creds), pinning=dict(pinning), engine_options=dict(options),
            endpoints=endpoints, dns=DnsConfig(**dns_values), health=health, auth_query=auth_query,
        )

    listeners = []
    raw_listeners = raw.get("listeners", [])
    if not isinstance(raw_listeners, list):
        r.problem("listeners", "expected an array of tables ([[listeners]])")
        raw_listeners = []
    if not raw_listeners:
        r.problem("listeners", "no listener configured; add a [[listeners]] table")
    seen_names, seen_addresses = set(), set()
    for i, item in enumerate(raw_listeners):
        path = f"listeners[{i}]"
        values = r.settings(r.table(item, path), path, LISTENER_SETTINGS)
        try:
            values["listen"] = parse_address(values["listen"]) if values["listen"] is not None else ("", 0)
        except ValueError as exc:
            r.problem(f"{path}.listen", str(exc))
            values["listen"] = ("", 0)
        if values["name"] in seen_names:
            r.problem(f"{path}.name", f"duplicate listener name {values['name']!r}")
        seen_names.add(values["name"])
        if values["listen"] in seen_addresses and values["listen"][1]:
            r.problem(f"{path}.listen", f"address {values['listen'][0]}:{values['listen'][1]} is used by another listener")
        seen_addresses.add(values["listen"])
        if values["cluster"] is not None and values["cluster"] not in clusters:
            r.problem(f"{path}.cluster", f"no cluster named {values['cluster']!r} (defined: {', '.join(sorted(clusters)) or 'none'})")
        if bool(values["tls_cert_file"]) != bool(values["tls_key_file"]):
            r.problem(f"{path}.tls_key_file", "tls_cert_file and tls_key_file go together")
        if values["require_tls"] and not values["tls_cert_file"]:
            r.problem(f"{path}.require_tls", "needs tls_cert_file and tls_key_file")
        cluster = clusters.get(values["cluster"])
        engine = (known_engines or {}).get(cluster.engine) if cluster is not None else None
        _tls_policy(r, path, values)
        for key in ("tls_cert_file", "tls_key_file", "tls_client_ca_file"):
            if values[key] and not os.path.isabs(values[key]):
                values[key] = os.path.join(base_dir, values[key])   # whether it exists here: preflight.py
        offered = getattr(engine, "client_auth_methods", None)
        if offered is not None and values["auth"] not in offered and values["auth"] != "token":
            r.problem(f"{path}.auth", f"engine {cluster.engine!r} offers no auth method {values['auth']!r}; use one of "
                      + ", ".join(offered))
        elif values["auth"] not in ("trust", "token") and not users_file:
            r.problem(f"{path}.auth", f"{values['auth']!r} needs [auth] users_file (or auth = 'trust')")
        if values["auth"] == "token":
            if engine is not None and not getattr(engine, "supports_token_auth", False):
                r.problem(f"{path}.auth", f"'token' is not supported by engine {cluster.engine!r} (cluster "
                          f"{cluster.name!r}): its plugin does not declare supports_token_auth; use a password method")
            _token_listener(r, path, values, base_dir)
        if engine is not None and callable(getattr(engine, "listener_problems", None)):
            for key, message in engine.listener_problems(dict(values)):
                r.problem(f"{path}.{key}", message)
        listeners.append(ListenerConfig(**values))

    if r.problems:
        raise ConfigError(r.problems, source)
    return Config(proxy=proxy, users_file=users_file, clusters=clusters, listeners=tuple(listeners), source=source,
                  admin=admin)


def _tls_policy(r: _Reader, path: str, values: dict) -> None:
    """Check a listener's TLS policy settings (versions, ciphers, client certificates)."""
    import ssl
    policy = values["tls_min_version"] != "TLSv1.2" or values["tls_ciphers"] or values["tls_client_ca_file"] \
        or values["tls_verify_client"]
    if policy and not values["tls_cert_file"]:
        r.problem(f"{path}.tls_min_version", "TLS policy settings need tls_cert_file and tls_key_file")
    if values["tls_verify_client"] and not values["tls_client_ca_file"]:
        r.problem(f"{path}.tls_verify_client", "needs tls_client_ca_file, the CA that issues client certificates")
    if values["tls_ciphers"]:
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).set_ciphers(values["tls_ciphers"])
        except ssl.SSLError:
            r.problem(f"{path}.tls_ciphers", f"OpenSSL knows no cipher in {values['tls_ciphers']!r}")


def _token_listener(r: _Reader, path: str, values: dict, base_dir: str) -> None:
    """Check a token listener's settings and build its verifier (it reloads its keys: see ReloadingVerifier)."""
    if not values["tls_cert_file"]:
        r.problem(f"{path}.auth", "'token' needs TLS on the client leg: set tls_cert_file and tls_key_file")
    for key in ("iam_access_keys_file", "jwt_jwks_file"):
        if values[key] and not os.path.isabs(values[key]):
            values[key] = os.path.join(base_dir, values[key])
    # The addresses an RDS IAM token may be made for: the listen address and iam_hostname. A bad iam_hostname
    # is reported only when the rest builds (a missing or bad key file is reported first).
    addresses, hostname_problem = [values["listen"]], None
    if values["token_kind"] == "rds_iam" and values["iam_hostname"]:
        try:
            addresses.append(parse_address(values["iam_hostname"], values["listen"][1]))
        except ValueError as exc:
            hostname_problem = str(exc)
    try:
        verifier = ReloadingVerifier(values, addresses, values["token_keys_check_interval"])
    except ValueError as exc:
        r.problem(path, str(exc))
        return
    if hostname_problem:
        r.problem(path, hostname_problem)
        return
    values["token_verifier"] = verifier


def _check_auth_query(r, path: str, settings: AuthQueryConfig, engine_obj, engine: str, creds: list) -> None:
    """[clusters.NAME.auth_query]: an engine that can look users up, a query with one placeholder, a lookup user
    the cluster's credentials serve."""
    if engine == "tds":
        r.problem(path, "auth_query is not possible on a tds cluster: SQL Server's stored password hashes cannot "
                  "verify a TDS login (the client sends the password itself); keep its users in the users file")
        return
    if engine_obj is not None:
        try:
            sql = engine_obj.auth_query_sql(settings.query or getattr(engine_obj, "auth_query_default", ""), "x")
        except ValueError as exc:
            r.problem(f"{path}.query", str(exc))
            return
        if sql is None:
            r.problem(path, f"the {engine} engine cannot look users up in the database; remove auth_query")
            return
    if not settings.user:
        r.problem(f"{path}.user", "name the user the lookup logs in as")
    elif not any(c.user in (settings.user, "*") for c in creds):
        r.problem(f"{path}.user", f"no [[clusters.NAME.credentials]] serves user {settings.user!r}: add one with "
                  f"user = {settings.user!r} (and its backend password)")


def settings_reference() -> str:
    """Markdown reference of every declared setting, for docs/configuration.md."""
    out = []
    for title, declared in (("[proxy]", PROXY_SETTINGS), ("[admin]", ADMIN_SETTINGS), ("[clusters.NAME.backend]", BACKEND_SETTINGS),
                            ("[clusters.NAME.dns]", DNS_SETTINGS), ("[clusters.NAME.health]", HEALTH_SETTINGS),
                            ("[clusters.NAME.pool]", POOL_SETTINGS), ("[[clusters.NAME.credentials]]", CREDENTIAL_SETTINGS),
                            ("[clusters.NAME.auth_query]", AUTH_QUERY_SETTINGS),
                            ("[[listeners]]", LISTENER_SETTINGS)):
        out.append(f"### `{title}`\n\n| key | type | default | meaning |\n|---|---|---|---|")
        for s in declared.values():
            default = "required" if s.default is None else repr(s.default)
            choices = f" One of: {', '.join(repr(c) for c in s.choices if c)}." if s.choices else ""
            kind = " or ".join(k.__name__ for k in s.kind) if isinstance(s.kind, tuple) else s.kind.__name__
            out.append(f"| `{s.name}` | {kind} | {default} | {s.help}.{choices} |")
        out.append("")
    return "\n".join(out)


def replace(obj, **changes):
    return dataclasses.replace(obj, **changes)
