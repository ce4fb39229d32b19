"""Token authentication: RDS IAM tokens (SigV4 presigned, verified against configured access keys) and JWTs."""
from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import stat
import time
import tomllib
from calendar import timegm
from typing import Callable, Iterable, NamedTuple
from urllib.parse import quote, unquote

__all__ = ["TokenRejected", "AccessKey", "IamTokenVerifier", "JwtVerifier", "ReloadingVerifier", "load_access_keys",
           "build_verifier", "MAX_TOKEN_LENGTH", "KEYS_CHECK_INTERVAL"]

log = logging.getLogger("multiproxy.token_auth")

MAX_TOKEN_LENGTH = 16384
MAX_CLOCK_SKEW = 300          # seconds a token's X-Amz-Date may lie in the future
MAX_IAM_EXPIRES = 7 * 86400   # SigV4's own upper bound on X-Amz-Expires
KEYS_CHECK_INTERVAL = 5.0    # default seconds between looks at a key file's mtime and size
_EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
_IAM_REQUIRED = ("Action", "DBUser", "X-Amz-Algorithm", "X-Amz-Credential", "X-Amz-Date", "X-Amz-Expires",
                 "X-Amz-SignedHeaders", "X-Amz-Signature")


class TokenRejected(Exception):
    """A token was refused; the message is a short reason (never the token) for the audit log."""


class AccessKey(NamedTuple):
    """An access key's secret and, for temporary (STS) credentials, the session token its tokens must carry."""

    secret: str
    session_token: str | None = None


def _hmac(key: bytes, text: str) -> bytes:
    return hmac.new(key, text.encode("utf-8"), hashlib.sha256).digest()


def _check_private_file(path: str, what: str) -> None:
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"{what} {path} is not a regular file")
    if st.st_mode & 0o077:
        raise ValueError(f"{what} {path} is accessible by group or others (mode {stat.S_IMODE(st.st_mode):03o}); "
                         f"run: chmod 600 {path}")


def load_access_keys(path: str) -> dict[str, AccessKey]:
    """Access key id -> AccessKey from a TOML or JSON file that only its owner may read.

    A key's value is either its secret access key (a string) or, for temporary credentials, a table with
    `secret_access_key` and `session_token`."""
    _check_private_file(path, "iam_access_keys_file")
    with open(path, "rb") as f:
        data = f.read()
    try:
        table = json.loads(data) if path.endswith(".json") else tomllib.loads(data.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"iam_access_keys_file {path}: not valid {'JSON' if path.endswith('.json') else 'TOML'}: "
                         f"{exc}") from None
    if not isinstance(table, dict) or not table:
        raise ValueError(f"iam_access_keys_file {path}: expected a table of access key id = \"secret access key\"")
    keys = {}
    for key_id, value in table.items():
        if not key_id:
            raise ValueError(f"iam_access_keys_file {path}: an access key id is empty")
        if isinstance(value, str) and value:
            keys[key_id] = AccessKey(value)
            continue
        if not isinstance(value, dict):
            raise ValueError(f"iam_access_keys_file {path}: {key_id}: expected \"secret access key\" or a table with "
                             "secret_access_key and session_token")
        unknown = sorted(set(value) - {"secret_access_key", "session_token"})
        secret, session_token = value.get("secret_access_key"), value.get("session_token")
        if unknown:
            raise ValueError(f"iam_access_keys_file {path}: {key_id}: unknown key {unknown[0]!r} (expected "
                             "secret_access_key and session_token)")
        if not isinstance(secret, str) or not secret:
            raise ValueError(f"iam_access_keys_file {path}: {key_id}: secret_access_key missing or not a string")
        if session_token is not None and (not isinstance(session_token, str) or not session_token):
            raise ValueError(f"iam_access_keys_file {path}: {key_id}: session_token must be a non-empty string")
        keys[key_id] = AccessKey(secret, session_token)
    return keys


def _address_key(host: str, port: int) -> str:
    return f"{host.lower()}:{port}"


class IamTokenVerifier:
    """Checks tokens made like boto3's generate_db_auth_token: a SigV4 presigned GET of https://host:port/."""

    kind = "rds_iam"

    def __init__(self, access_keys: dict[str, AccessKey | str], region: str, addresses: Iterable[tuple[str, int]],
                 clock: Callable[[], float] = time.time):
        self.access_keys = {k: AccessKey(v) if isinstance(v, str) else v for k, v in access_keys.items()}
        self.region = region
        self.addresses = {_address_key(h, p) for h, p in addresses}
        self.clock = clock

    def verify(self, token: str, user: str | None = None) -> str:
        """The database user `token` lets in (its DBUser), when it is valid and, with `user`, names that user;
        raise TokenRejected with the reason otherwise. `user=None`: the client gave no user name (TDS FEDAUTH),
        the token's own is taken."""
        if len(token) > MAX_TOKEN_LENGTH:
            raise TokenRejected("malformed token: too long")
        hostport, sep, query = token.partition("/?")
        if not sep or not hostport:
            raise TokenRejected("malformed token: not an RDS IAM token")
        params: dict[str, str] = {}
        for pair in query.split("&"):
            key, eq, value = pair.partition("=")
            key, value = unquote(key), unquote(value)
            if not eq or key in params:
                raise TokenRejected("malformed token: bad query string")
            params[key] = value
        missing = [k for k in _IAM_REQUIRED if k not in params]
        if missing:
            raise TokenRejected(f"malformed token: missing {', '.join(missing)}")
        if params["Action"] != "connect" or params["X-Amz-Algorithm"] != "AWS4-HMAC-SHA256":
            raise TokenRejected("malformed token: not a connect token signed with AWS4-HMAC-SHA256")
        if params["X-Amz-SignedHeaders"] != "host":
            raise TokenRejected("malformed token: only the host header may be signed")
        scope = params["X-Amz-Credential"].split("/")
        amz_date = params["X-Amz-Date"]
        if len(scope) != 5 or scope[4] != "aws4_request" or scope[3] != "rds-db":
            raise TokenRejected("malformed token: bad credential scope")
        key_id, day, region = scope[0], scope[1], scope[2]
        try:
            signed_at = timegm(time.strptime(amz_date, "%Y%m%dT%H%M%SZ"))
            expires = int(params["X-Amz-Expires"])
        except ValueError:
            raise TokenRejected("malformed token: bad X-Amz-Date or X-Amz-Expires") from None
        if day != amz_date[:8]:
            raise TokenRejected("malformed token: credential date differs from X-Amz-Date")
        if self.region and region != self.region:
            raise TokenRejected(f"wrong region {region!r}")
        access_key = self.access_keys.get(key_id)
        if access_key is None:
            raise TokenRejected("unknown access key")
        secret = access_key.secret
        host, _, port_text = hostport.rpartition(":")
        signed_host = host if port_text == "443" else hostport
        canonical_query = "&".join(sorted(
            f"{quote(k, safe='-_.~')}={quote(v, safe='-_.~')}" for k, v in params.items() if k != "X-Amz-Signature"))
        canonical_request = "\n".join(("GET", "/", canonical_query, f"host:{signed_host}", "", "host", _EMPTY_SHA256))
        scope_text = "/".join(scope[1:])
        string_to_sign = "\n".join(("AWS4-HMAC-SHA256", amz_date, scope_text,
                                    hashlib.sha256(canonical_request.encode("utf-8")).hexdigest()))
        key = _hmac(("AWS4" + secret).encode("utf-8"), day)
        for part in (region, "rds-db", "aws4_request"):
            key = _hmac(key, part)
        expected = hmac.new(key, string_to_sign.encode("utf-8"), hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, params["X-Amz-Signature"].lower()):
            raise TokenRejected("bad signature")
        # Temporary credentials: the signature covers X-Amz-Security-Token (it is in the canonical query);
        # the token must also be the session token configured with the key.
        session_token = params.get("X-Amz-Security-Token")
        if access_key.session_token is None:
            if session_token is not None:
                raise TokenRejected("security token given, but the access key is configured without a session token")
        elif session_token is None:
            raise TokenRejected("security token missing: the access key is temporary credentials")
        elif not hmac.compare_digest(session_token.encode("utf-8"), access_key.session_token.encode("utf-8")):
            raise TokenRejected("wrong security token")
        now = self.clock()
        if not 1 <= expires <= MAX_IAM_EXPIRES:
            raise TokenRejected("malformed token: X-Amz-Expires out of range")
        if now > signed_at + expires:
            raise TokenRejected("expired")
        if signed_at > now + MAX_CLOCK_SKEW:
            raise TokenRejected("not yet valid (X-Amz-Date in the future)")
        if not port_text.isdigit() or _address_key(host, int(port_text)) not in self.addresses:
            raise TokenRejected("wrong host: the token was made for another endpoint")
        return _named_user(params["DBUser"], user, "DBUser")


class JwtVerifier:
    """Checks a JWT's signature (JWKS file: RS256/ES256; shared key: HS256), issuer, audience, expiry and user claim."""

    kind = "jwt"

    def __init__(self, *, issuer: str, audience: str, user_claim: str = "sub", jwks: dict | None = None,
                 shared_key: bytes | None = None):
        import jwt  # PyJWT
        self._jwt = jwt
        self.issuer = issuer
        self.audience = audience
        self.user_claim = user_claim
        self.shared_key = shared_key
        self.keys = {}
        if jwks is not None:
            try:
                keyset = jwt.PyJWKSet.from_dict(jwks)
            except jwt.PyJWTError as exc:
                raise ValueError(f"not a usable JWKS: {exc}") from None
            self.keys = {k.key_id: k for k in keyset.keys}
        if not self.keys and shared_key is None:
            raise ValueError("a JWT verifier needs a JWKS or a shared key")

    def verify(self, token: str, user: str | None = None) -> str:
        """The database user the JWT's user claim names, when the JWT is valid and, with `user`, names that user;
        raise TokenRejected with the reason otherwise."""
        jwt = self._jwt
        if len(token) > MAX_TOKEN_LENGTH:
            raise TokenRejected("malformed token: too long")
        try:
            header = jwt.get_unverified_header(token)
            if self.shared_key is not None:
                key, algorithms = self.shared_key, ["HS256"]
            else:
                kid = header.get("kid")
                if kid in self.keys:
                    jwk = self.keys[kid]
                elif kid is None and len(self.keys) == 1:
                    jwk = next(iter(self.keys.values()))
                else:
                    raise TokenRejected("bad signature: unknown key id")
                key, algorithms = jwk.key, ["RS256", "ES256"]
            claims = jwt.decode(token, key, algorithms=algorithms, audience=self.audience, issuer=self.issuer,
                                options={"require": ["exp", "iss", "aud"]})
        except jwt.ExpiredSignatureError:
            raise TokenRejected("expired") from None
        except jwt.InvalidAudienceError:
            raise TokenRejected("wrong audience") from None
        except jwt.InvalidIssuerError:
            raise TokenRejected("wrong issuer") from None
        except jwt.MissingRequiredClaimError as exc:
            raise TokenRejected(f"missing claim {exc.claim!r}") from None
        except jwt.ImmatureSignatureError:
            raise TokenRejected("not yet valid") from None
        except (jwt.InvalidSignatureError, jwt.InvalidAlgorithmError):
            raise TokenRejected("bad signature") from None
        except jwt.InvalidKeyError:
            raise TokenRejected("bad signature: unusable key") from None
        except jwt.PyJWTError:
            raise TokenRejected("malformed token") from None
        named = claims.get(self.user_claim)
        return _named_user("" if named is None else str(named), user, f"claim {self.user_claim!r}")


def _named_user(named: str, user: str | None, where: str) -> str:
    """The user a verified token names, checked against the one the client gave (when it gave one)."""
    if user is not None:
        if named != user:
            raise TokenRejected("user mismatch")
        return named
    if not named:
        raise TokenRejected(f"the token names no database user ({where} is missing or empty)")
    return named


def build_verifier(values: dict, addresses: Iterable[tuple[str, int]]):
    """The verifier a listener's token settings describe; raises ValueError naming the setting at fault.

    `addresses`: the (host, port) pairs an RDS IAM token may be made for (the listen address, and the parsed
    iam_hostname: multiproxy.config parses the settings)."""
    kind = values.get("token_kind", "")
    if kind == "rds_iam":
        path = values.get("iam_access_keys_file", "")
        if not path:
            raise ValueError("iam_access_keys_file: needed for token_kind = 'rds_iam'")
        try:
            keys = load_access_keys(path)
        except OSError as exc:
            raise ValueError(f"iam_access_keys_file: cannot read {path}: {exc.strerror}") from None
        return IamTokenVerifier(keys, values.get("iam_region", ""), list(addresses))
    if kind == "jwt":
        if not values.get("jwt_issuer") or not values.get("jwt_audience"):
            raise ValueError("jwt_issuer and jwt_audience: both needed for token_kind = 'jwt'")
        jwks_file, env = values.get("jwt_jwks_file", ""), values.get("jwt_shared_key_env", "")
        if bool(jwks_file) == bool(env):
            raise ValueError("jwt_jwks_file or jwt_shared_key_env: give exactly one")
        common = dict(issuer=values["jwt_issuer"], audience=values["jwt_audience"],
                      user_claim=values.get("jwt_user_claim") or "sub")
        if env:
            secret = os.environ.get(env, "")
            if len(secret) < 32:
                raise ValueError(f"jwt_shared_key_env: environment variable {env} is unset or shorter than 32 characters")
            return JwtVerifier(shared_key=secret.encode("utf-8"), **common)
        try:
            with open(jwks_file, "rb") as f:
                jwks = json.load(f)
        except OSError as exc:
            raise ValueError(f"jwt_jwks_file: cannot read {jwks_file}: {exc.strerror}") from None
        except ValueError as exc:
            raise ValueError(f"jwt_jwks_file: {jwks_file} is not JSON: {exc}") from None
        if not isinstance(jwks, dict) or not isinstance(jwks.get("keys"), list):
            raise ValueError(f"jwt_jwks_file: {jwks_file} is not a JWKS: expected an object with a \"keys\" list")
        try:
            return JwtVerifier(jwks=jwks, **common)
        except ValueError as exc:
            raise ValueError(f"jwt_jwks_file: {jwks_file}: {exc}") from None
    raise ValueError("token_kind: expected 'rds_iam' or 'jwt'")


def _file_version(path: str):
    """What tells a changed file: device, inode (a file renamed over it), mtime, ctime (chmod) and size."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size


class ReloadingVerifier:
    """A listener's verifier, rebuilt from its settings on reload() (SIGHUP) and when its key file changes.

    Logins look at the key file (iam_access_keys_file or jwt_jwks_file) at most every `check_interval`
    seconds (0: never, only reload() does); a changed stat result rebuilds the inner verifier. A rebuild
    that fails keeps the previous keys and logs why. Building the first one raises ValueError, as
    build_verifier does, so that a bad file at start is a config error."""

    def __init__(self, values: dict, addresses: Iterable[tuple[str, int]], check_interval: float = KEYS_CHECK_INTERVAL,
                 clock: Callable[[], float] = time.monotonic):
        self.values = dict(values)
        self.addresses = list(addresses)
        self.name = values.get("name", "")
        self.path = values.get("iam_access_keys_file") or values.get("jwt_jwks_file") or ""
        self.check_interval = check_interval
        self.clock = clock
        self.version = _file_version(self.path) if self.path else None   # looked at before reading: no lost change
        self.inner = build_verifier(self.values, self.addresses)
        self.kind = self.inner.kind
        self.next_check = clock() + check_interval

    def verify(self, token: str, user: str | None = None) -> str:
        """As the inner verifier's verify: the user the token names; TokenRejected with the reason otherwise."""
        if self.check_interval and self.path:
            now = self.clock()
            if now >= self.next_check:
                self.next_check = now + self.check_interval
                version = _file_version(self.path)
                if version != self.version:
                    self.version = version
                    self._rebuild(f"{self.path} changed")
        return self.inner.verify(token, user)

    def reload(self) -> bool:
        """Rebuild now (SIGHUP): re-read the key file or the shared key's environment variable."""
        if self.path:
            self.version = _file_version(self.path)
        return self._rebuild("reload requested")

    def _rebuild(self, why: str) -> bool:
        try:
            inner = build_verifier(self.values, self.addresses)
        except Exception as exc:  # a bad file must never stop logins with the keys already loaded
            log.error("listener %s: token keys not reloaded (%s), the previous keys stay in use: %s",
                      self.name, why, exc)
            return False
        self.inner = inner
        if isinstance(inner, IamTokenVerifier):
            what = f"{len(inner.access_keys)} access keys from {self.path}"
        elif inner.keys:
            what = f"{len(inner.keys)} JWKS keys from {self.path}"
        else:
            what = f"the shared key from ${self.values.get('jwt_shared_key_env')}"
        log.info("listener %s: token keys reloaded (%s): %s", self.name, why, what)
        return True
