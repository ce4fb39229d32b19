"""The users file: who may connect to the proxy, stored as password verifiers and never as plaintext."""
from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import os
import re
import secrets
import stringprep
import tempfile
import tomllib
import unicodedata
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

__all__ = [
    "POOL_MODES",
    "SCRAM_DEFAULT_ITERATIONS",
    "SCRAM_SALT_LENGTH",
    "UNCHANGED",
    "ScramVerifier",
    "UserRecord",
    "UsersFile",
    "UsersFileError",
    "VERIFIER_KINDS",
    "md5_verifier",
    "parse_md5_verifier",
    "parse_scram_verifier",
    "saslprep",
    "scram_keys",
    "scram_salted_password",
    "scram_sha_256_verifier",
]

POOL_MODES = ("session", "transaction")
SCRAM_DEFAULT_ITERATIONS = 4096
SCRAM_SALT_LENGTH = 16  # what PostgreSQL uses for its own verifiers
_SCRAM_KEY_LENGTH = 32  # SHA-256 digest size

# Keys of a user table that are settings; every other string-valued key is a verifier.
_SETTING_KEYS = ("listeners", "max_connections", "pool_mode")
_PLAINTEXT_KEYS = ("password", "plaintext", "plain_password", "password_plain")


class UsersFileError(Exception):
    """The users file could not be read or is invalid; `errors` holds one line per problem."""

    def __init__(self, errors: Iterable[str]):
        self.errors = list(errors)
        super().__init__("\n".join(self.errors))


# --------------------------------------------------------------------------- verifiers


def saslprep(password: str) -> str:
    """Prepare a password as PostgreSQL does before SCRAM hashing (RFC 4013 SASLprep).

    Uses the stdlib `stringprep` tables (Unicode 3.2, as the RFC specifies). Like PostgreSQL, a
    password that SASLprep rejects (prohibited or unassigned characters, bad bidi) is used as it
    is rather than refused, so that any password the server accepts also verifies here.
    """
    if password.isascii():
        return password  # PostgreSQL skips SASLprep entirely for pure ASCII
    mapped = "".join(
        " " if stringprep.in_table_c12(ch) else ch
        for ch in password
        if not stringprep.in_table_b1(ch)
    )
    prepared = unicodedata.ucd_3_2_0.normalize("NFKC", mapped)
    if not prepared:
        return password
    prohibited = (
        stringprep.in_table_c12,
        stringprep.in_table_c21_c22,
        stringprep.in_table_c3,
        stringprep.in_table_c4,
        stringprep.in_table_c5,
        stringprep.in_table_c6,
        stringprep.in_table_c7,
        stringprep.in_table_c8,
        stringprep.in_table_c9,
        stringprep.in_table_a1,
    )
    for ch in prepared:
        if any(check(ch) for check in prohibited):
            return password
    if any(stringprep.in_table_d1(ch) for ch in prepared):
        if any(stringprep.in_table_d2(ch) for ch in prepared):
            return password
        if not (stringprep.in_table_d1(prepared[0]) and stringprep.in_table_d1(prepared[-1])):
            return password
    return prepared


@dataclass(frozen=True)
class ScramVerifier:
    """The parts of a `SCRAM-SHA-256$<iter>:<salt>$<StoredKey>:<ServerKey>` verifier."""

    iterations: int
    salt: bytes
    stored_key: bytes
    server_key: bytes

    def __str__(self) -> str:
        return "SCRAM-SHA-256$%d:%s$%s:%s" % (
            self.iterations,
            _b64(self.salt),
            _b64(self.stored_key),
            _b64(self.server_key),
        )


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _b64decode(text: str) -> bytes:
    """Strict base64 decoding; raises ValueError on anything that is not canonical-looking base64."""
    return base64.b64decode(text.encode("ascii"), validate=True)


def scram_salted_password(password: str, salt: bytes, iterations: int) -> bytes:
    """SaltedPassword := Hi(Normalize(password), salt, i) from RFC 5802."""
    return hashlib.pbkdf2_hmac("sha256", saslprep(password).encode("utf-8"), salt, iterations)


def scram_keys(salted_password: bytes) -> tuple[bytes, bytes, bytes]:
    """(ClientKey, StoredKey, ServerKey) derived from a SaltedPassword."""
    client_key = hmac.digest(salted_password, b"Client Key", "sha256")
    server_key = hmac.digest(salted_password, b"Server Key", "sha256")
    return client_key, hashlib.sha256(client_key).digest(), server_key


def scram_sha_256_verifier(
    password: str, salt: bytes | None = None, iterations: int = SCRAM_DEFAULT_ITERATIONS
) -> str:
    """A verifier in exactly PostgreSQL's `pg_authid.rolpassword` format for this password.

    The password goes through SASLprep (see `saslprep`) first, as PostgreSQL does.
    """
    if iterations < 1:
        raise ValueError("iterations must be at least 1, got %d" % iterations)
    if salt is None:
        salt = secrets.token_bytes(SCRAM_SALT_LENGTH)
    if not salt:
        raise ValueError("salt must not be empty")
    _, stored_key, server_key = scram_keys(scram_salted_password(password, salt, iterations))
    return str(ScramVerifier(iterations, salt, stored_key, server_key))


_SCRAM_RE = re.compile(r"SCRAM-SHA-256\$([0-9]+):([^$:]+)\$([^$:]+):([^$:]+)")


def parse_scram_verifier(text: str) -> ScramVerifier:
    """Split a SCRAM-SHA-256 verifier into its parts; raises ValueError saying what is wrong."""
    match = _SCRAM_RE.fullmatch(text)
    if match is None:
        raise ValueError("not a SCRAM-SHA-256 verifier (expected SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>)")
    iterations = int(match.group(1))
    if iterations < 1:
        raise ValueError("SCRAM-SHA-256 verifier has iteration count 0")
    parts = {}
    for name, group in (("salt", 2), ("StoredKey", 3), ("ServerKey", 4)):
        try:
            parts[name] = _b64decode(match.group(group))
        except ValueError:
            raise ValueError("SCRAM-SHA-256 verifier %s is not valid base64" % name) from None
    for name in ("StoredKey", "ServerKey"):
        if len(parts[name]) != _SCRAM_KEY_LENGTH:
            raise ValueError(
                "SCRAM-SHA-256 verifier %s is %d bytes, expected %d" % (name, len(parts[name]), _SCRAM_KEY_LENGTH)
            )
    return ScramVerifier(iterations, parts["salt"], parts["StoredKey"], parts["ServerKey"])


def md5_verifier(user: str, password: str) -> str:
    """PostgreSQL's md5 verifier: "md5" + hex(md5(password + username))."""
    return "md5" + hashlib.md5((password + user).encode("utf-8")).hexdigest()


_MD5_RE = re.compile(r"md5[0-9a-f]{32}")


def parse_md5_verifier(text: str) -> str:
    """Return the verifier unchanged if it is "md5" + 32 lowercase hex digits; raise ValueError otherwise."""
    if _MD5_RE.fullmatch(text) is None:
        raise ValueError("not an md5 verifier (expected md5 followed by 32 lowercase hex digits)")
    return text


# Makers of each verifier kind from (user, password). The core's own are the password-derived standards; engines add
# theirs (Engine.verifier_kinds), registered when the plugins load (see engine_verifier_kinds).
VERIFIER_KINDS: dict[str, Callable[[str, str], str]] = {
    "scram_sha_256": lambda user, password: scram_sha_256_verifier(password),
    "md5": md5_verifier,
}


def register_verifier_kinds(kinds: Mapping[str, Callable[[str, str], str]]) -> None:
    """Add an engine's verifier kinds (kind -> maker(user, password) -> verifier text)."""
    VERIFIER_KINDS.update(kinds)


def engine_verifier_kinds() -> dict[str, Callable[[str, str], str]]:
    """Every verifier kind: the core's and those of every engine plugin (loaded through their entry points)."""
    from .plugins import PluginError, load_engines
    try:
        for loaded in load_engines().values():
            register_verifier_kinds(getattr(loaded.engine, "verifier_kinds", {}) or {})
    except PluginError:
        pass            # a broken plugin is reported where engines are needed; its kinds are just missing here
    return VERIFIER_KINDS


# Checkers used when loading: each raises ValueError with a reason. Kinds without a checker are kept as-is.
_VERIFIER_CHECKS: dict[str, Callable[[str], object]] = {
    "scram_sha_256": parse_scram_verifier,
    "md5": parse_md5_verifier,
}
# The MySQL kinds are checked where they are used (engines/mysql: a malformed one denies the login), so
# files written for other tools by hand stay loadable.


# --------------------------------------------------------------------------- the users file


@dataclass(frozen=True)
class UserRecord:
    """One user of the proxy: verifiers by kind and the per-user limits."""

    name: str
    verifiers: dict[str, str]  # kind -> verifier; kinds this version does not know are kept as-is
    listeners: tuple[str, ...] | None = None  # None: every listener
    max_connections: int = 0  # 0: unlimited
    pool_mode: str | None = None  # None: the listener's pool mode

    def may_use(self, listener: str) -> bool:
        return self.listeners is None or listener in self.listeners


_BARE_KEY_RE = re.compile(r"[A-Za-z0-9_-]+")


def _toml_key(key: str) -> str:
    return key if _BARE_KEY_RE.fullmatch(key) else _toml_string(key)


def _toml_string(value: str) -> str:
    out = ['"']
    for ch in value:
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ch in "\b\t\n\f\r":
            out.append({"\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append("\\u%04x" % ord(ch))
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _user_path(name: str) -> str:
    return "users." + _toml_key(name)


def _check_user_name(name: object) -> str | None:
    """Why `name` cannot be a user name, or None if it can."""
    if not isinstance(name, str) or not name:
        return "user name must be a non-empty string"
    if "\x00" in name:
        return "user name must not contain NUL"
    return None


UNCHANGED = object()  # UsersFile.add: keep the user's current value of this setting


class UsersFile:
    """The set of proxy users, loaded from and saved to a TOML users file."""

    def __init__(self, users: Iterable[UserRecord] = ()):
        self._users: dict[str, UserRecord] = {}
        for user in users:
            self._users[user.name] = user

    @classmethod
    def empty(cls) -> "UsersFile":
        return cls()

    @classmethod
    def load(cls, path: str | os.PathLike) -> "UsersFile":
        """Read and validate a users file; all problems are reported together in one UsersFileError."""
        label = os.fspath(path)
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except OSError as e:
            raise UsersFileError(["%s: cannot read: %s" % (label, e.strerror or e)]) from None
        except tomllib.TOMLDecodeError as e:
            raise UsersFileError(["%s: invalid TOML: %s" % (label, e)]) from None
        return cls.from_dict(data, label)

    @classmethod
    def from_dict(cls, data: Mapping, label: str = "users file") -> "UsersFile":
        """Validate already-parsed TOML data; `label` prefixes every error message."""
        errors: list[str] = []
        users: list[UserRecord] = []
        for key in data:
            if key != "users":
                errors.append("%s: %s: unknown key (the file holds only [users.NAME] tables)" % (label, _toml_key(key)))
        table = data.get("users", {})
        if not isinstance(table, dict):
            errors.append("%s: users: expected a table of users" % label)
            table = {}
        for name, entry in table.items():
            user, user_errors = _parse_user(name, entry)
            errors.extend("%s: %s" % (label, e) for e in user_errors)
            if user is not None:
                users.append(user)
        if errors:
            raise UsersFileError(errors)
        return cls(users)

    def get(self, name: str) -> UserRecord | None:
        return self._users.get(name)

    def names(self) -> list[str]:
        return sorted(self._users)

    def __len__(self) -> int:
        return len(self._users)

    def __contains__(self, name: object) -> bool:
        return name in self._users

    def add(
        self,
        name: str,
        password: str,
        kinds: Iterable[str] = ("scram_sha_256", "md5"),
        *,
        listeners: Iterable[str] | None | object = UNCHANGED,
        max_connections: int | None = None,
        pool_mode: str | None | object = UNCHANGED,
    ) -> UserRecord:
        """Add a user, or set a new password for an existing one; returns the new record.

        Setting a password replaces all of the user's verifiers (an old verifier of another kind
        would still accept the old password). Settings not given keep their current value.
        """
        problem = _check_user_name(name)
        if problem:
            raise ValueError(problem)
        if not password:
            raise ValueError("password must not be empty")
        kinds = tuple(kinds)
        if not kinds:
            raise ValueError("at least one verifier kind is needed")
        unknown = [k for k in kinds if k not in VERIFIER_KINDS]
        if unknown:
            engine_verifier_kinds()
            unknown = [k for k in kinds if k not in VERIFIER_KINDS]
        if unknown:
            raise ValueError(
                "unknown verifier kind %s (known: %s)" % (", ".join(unknown), ", ".join(sorted(VERIFIER_KINDS)))
            )
        old = self._users.get(name) or UserRecord(name, {})
        changes: dict = {"verifiers": {kind: VERIFIER_KINDS[kind](name, password) for kind in kinds}}
        if isinstance(listeners, str):
            raise ValueError("listeners must be a list of listener names, not one string")
        if listeners is not UNCHANGED:
            changes["listeners"] = None if listeners is None else tuple(listeners)
        if max_connections is not None:
            if max_connections < 0:
                raise ValueError("max_connections must be 0 (unlimited) or more")
            changes["max_connections"] = max_connections
        if pool_mode is not UNCHANGED:
            if pool_mode is not None and pool_mode not in POOL_MODES:
                raise ValueError("pool_mode must be one of %s" % ", ".join(POOL_MODES))
            changes["pool_mode"] = pool_mode
        record = dataclasses.replace(old, **changes)
        self._users[name] = record
        return record

    def remove(self, name: str) -> None:
        """Remove a user; KeyError if there is no such user."""
        del self._users[name]

    def dumps(self) -> str:
        """The users file as TOML text, users in name order."""
        lines = [
            "# multiproxy users file: password verifiers only, never plaintext.",
            "# Edit with `multiproxy users add|remove`; comments added by hand are not kept.",
        ]
        for name in self.names():
            user = self._users[name]
            lines.append("")
            lines.append("[%s]" % _user_path(name))
            for kind in sorted(user.verifiers):
                lines.append("%s = %s" % (_toml_key(kind), _toml_string(user.verifiers[kind])))
            if user.listeners is not None:
                lines.append("listeners = [%s]" % ", ".join(_toml_string(x) for x in user.listeners))
            if user.max_connections:
                lines.append("max_connections = %d" % user.max_connections)
            if user.pool_mode is not None:
                lines.append("pool_mode = %s" % _toml_string(user.pool_mode))
        return "\n".join(lines) + "\n"

    def save(self, path: str | os.PathLike) -> None:
        """Write the file atomically with mode 0600 (a crash leaves the old file, never half a file)."""
        path = os.fspath(path)
        directory = os.path.dirname(os.path.abspath(path))
        # mkstemp creates the file 0600 from the start, so verifiers are never world-readable.
        fd, tmp = tempfile.mkstemp(prefix=".users-", suffix=".tmp", dir=directory)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(self.dumps())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise


def _parse_user(name: str, entry: object) -> tuple[UserRecord | None, list[str]]:
    path = _user_path(name)
    problem = _check_user_name(name)
    if problem:
        return None, ["%s: %s" % (path, problem)]
    if not isinstance(entry, dict):
        return None, ["%s: expected a table, got %s" % (path, _type_name(entry))]
    errors: list[str] = []
    verifiers: dict[str, str] = {}
    listeners: tuple[str, ...] | None = None
    max_connections = 0
    pool_mode: str | None = None
    for key, value in entry.items():
        key_path = "%s.%s" % (path, _toml_key(key))
        if key in _PLAINTEXT_KEYS:
            errors.append(
                "%s: plaintext passwords are not allowed here; remove it and run "
                "`multiproxy users add %s` to store a verifier instead" % (key_path, name)
            )
        elif key == "listeners":
            if isinstance(value, list) and all(isinstance(x, str) and x for x in value):
                listeners = tuple(value)
            else:
                errors.append("%s: expected a list of listener names, got %r" % (key_path, value))
        elif key == "max_connections":
            if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                max_connections = value
            else:
                errors.append("%s: expected an integer >= 0 (0 = unlimited), got %r" % (key_path, value))
        elif key == "pool_mode":
            if value in POOL_MODES:
                pool_mode = value
            else:
                errors.append("%s: expected one of %s, got %r" % (key_path, ", ".join(POOL_MODES), value))
        elif isinstance(value, str):
            check = _VERIFIER_CHECKS.get(key)
            if check is not None:
                try:
                    check(value)
                except ValueError as e:
                    errors.append("%s: %s" % (key_path, e))
                    continue
            verifiers[key] = value
        else:
            errors.append(
                "%s: unknown setting (settings are %s; verifiers are strings)" % (key_path, ", ".join(_SETTING_KEYS))
            )
    if not verifiers and not errors:
        errors.append(
            "%s: no password verifier; run `multiproxy users add %s` to set one" % (path, name)
        )
    if errors:
        return None, errors
    return UserRecord(name, verifiers, listeners, max_connections, pool_mode), []


def _type_name(value: object) -> str:
    return {dict: "a table", list: "an array", str: "a string", bool: "a boolean", int: "an integer", float: "a float"}.get(
        type(value), type(value).__name__
    )
