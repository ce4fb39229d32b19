"""PostgreSQL SCRAM-SHA-256 and md5 authentication mechanics, sans-IO: message bytes in, message bytes out."""
from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from typing import Callable

from multiproxy.auth import (
    SCRAM_DEFAULT_ITERATIONS,
    SCRAM_SALT_LENGTH,
    ScramVerifier,
    parse_scram_verifier,
    scram_keys,
    scram_salted_password,
)

__all__ = [
    "AuthError",
    "SCRAM_SHA_256",
    "ScramClient",
    "ScramServer",
    "check_md5_response",
    "md5_password_response",
    "mock_scram_salt",
    "AUTH_QUERY_DEFAULT",
    "auth_query_sql",
    "auth_query_verifiers",
]

SCRAM_SHA_256 = "SCRAM-SHA-256"  # SASL mechanism name, as listed in AuthenticationSASL

# Every failed exchange reports this to the client, so a wrong password and an unknown user look alike.
_FAILED = "password authentication failed"


class AuthError(Exception):
    """Authentication failed or the peer broke the SASL/md5 protocol; the message is safe to show a client."""


def _default_nonce() -> str:
    # 18 random bytes, base64: printable, no ',' and the same length PostgreSQL uses.
    return base64.b64encode(secrets.token_bytes(18)).decode("ascii")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _xor(a: bytes, b: bytes) -> bytes:
    return bytes(x ^ y for x, y in zip(a, b))


def _hmac(key: bytes, msg: bytes) -> bytes:
    return hmac.digest(key, msg, "sha256")


def _decode(data: bytes, what: str) -> str:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise AuthError("malformed SCRAM %s: expected bytes" % what)
    try:
        return bytes(data).decode("utf-8")
    except UnicodeDecodeError:
        raise AuthError("malformed SCRAM %s: not valid UTF-8" % what) from None


def _attributes(text: str, what: str) -> list[tuple[str, str]]:
    """Split "a=1,b=2" into [("a", "1"), ("b", "2")]; every attribute is one letter, '=', value."""
    pairs = []
    for part in text.split(","):
        if len(part) < 2 or part[1] != "=" or not part[0].isascii() or not part[0].isalpha():
            raise AuthError("malformed SCRAM %s: bad attribute %r" % (what, part[:20]))
        pairs.append((part[0], part[2:]))
    return pairs


def _check_nonce(nonce: str, what: str) -> None:
    # RFC 5802 printable: %x21-2B / %x2D-7E (visible ASCII except ',')
    if not nonce or any(not (0x21 <= ord(c) <= 0x7E) or c == "," for c in nonce):
        raise AuthError("malformed SCRAM %s: nonce must be printable ASCII without ','" % what)


def _b64decode(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except ValueError:  # binascii.Error and non-ASCII UnicodeEncodeError are both ValueErrors
        raise AuthError("malformed SCRAM %s: invalid base64" % what) from None


def _saslname_decode(text: str, what: str) -> str:
    """Undo RFC 5802 saslname escaping (=2C is ',', =3D is '=')."""
    out, i = [], 0
    while i < len(text):
        if text[i] == "=":
            code = text[i + 1 : i + 3]
            if code == "2C":
                out.append(",")
            elif code == "3D":
                out.append("=")
            else:
                raise AuthError("malformed SCRAM %s: bad escape in user name" % what)
            i += 3
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def _saslname_encode(name: str) -> str:
    return name.replace("=", "=3D").replace(",", "=2C")


def mock_scram_salt(user: str, mock_secret: bytes) -> bytes:
    """A salt for a user that does not exist: stable per user name, so probing twice reveals nothing."""
    return hmac.digest(mock_secret, b"multiproxy mock salt\x00" + user.encode("utf-8"), "sha256")[:SCRAM_SALT_LENGTH]


class ScramServer:
    """The server side of one SCRAM-SHA-256 exchange (RFC 5802/7677) as PostgreSQL runs it.

    Channel binding (SCRAM-SHA-256-PLUS) is not offered, so clients may send `n,,` or `y,,`; `p=`
    is refused. The user name inside client-first is ignored (PostgreSQL uses the startup packet's).
    With `verifier=None` the server plays a convincing exchange for an unknown user, using a salt
    from `mock_scram_salt`, and fails it at the end exactly as a wrong password fails.
    """

    def __init__(
        self,
        verifier: str | None,
        nonce_factory: Callable[[], str] = _default_nonce,
        *,
        mock_salt: bytes | None = None,
    ):
        if verifier is None:
            # The keys are random and never match: the exchange can only fail.
            self._verifier = ScramVerifier(
                SCRAM_DEFAULT_ITERATIONS,
                mock_salt if mock_salt else secrets.token_bytes(SCRAM_SALT_LENGTH),
                secrets.token_bytes(32),
                secrets.token_bytes(32),
            )
            self._doomed = True
        else:
            try:
                self._verifier = parse_scram_verifier(verifier)
            except ValueError as e:
                raise ValueError("cannot run SCRAM with this verifier: %s" % e) from None
            self._doomed = False
        self._nonce_factory = nonce_factory
        self._state = "client-first"
        self._gs2_header = ""
        self._client_first_bare = ""
        self._server_first = ""
        self._nonce = ""
        self.client_username: str | None = None  # as sent in client-first (informational)
        self.client_key: bytes | None = None  # recovered from the proof after a successful exchange
        self.authenticated = False

    @classmethod
    def for_unknown_user(
        cls, user: str, mock_secret: bytes, nonce_factory: Callable[[], str] = _default_nonce
    ) -> "ScramServer":
        """A server that fails at the end like a wrong password; `mock_secret` is per proxy, kept private."""
        return cls(None, nonce_factory, mock_salt=mock_scram_salt(user, mock_secret))

    def handle_client_first(self, data: bytes) -> bytes:
        """Take the client-first-message (SASLInitialResponse data); return the server-first-message."""
        if self._state != "client-first":
            raise AuthError("unexpected SCRAM client-first-message")
        self._state = "failed"
        text = _decode(data, "client-first-message")
        # gs2-header: cbind-flag "," [authzid] ","
        flag, sep, rest = text.partition(",")
        if not sep:
            raise AuthError("malformed SCRAM client-first-message: missing GS2 header")
        if flag.startswith("p="):
            raise AuthError("channel binding is not supported; connect without channel binding (channel_binding=disable)")
        if flag not in ("n", "y"):
            raise AuthError("malformed SCRAM client-first-message: bad channel binding flag")
        authzid, sep, bare = rest.partition(",")
        if not sep:
            raise AuthError("malformed SCRAM client-first-message: missing GS2 header")
        if authzid:
            raise AuthError("SCRAM authorization identity (a=) is not supported")
        attrs = _attributes(bare, "client-first-message")
        if attrs[0][0] == "m":
            raise AuthError("SCRAM mandatory extensions (m=) are not supported")
        if len(attrs) < 2 or attrs[0][0] != "n" or attrs[1][0] != "r":
            raise AuthError("malformed SCRAM client-first-message: expected n=...,r=...")
        self.client_username = _saslname_decode(attrs[0][1], "client-first-message")
        client_nonce = attrs[1][1]
        _check_nonce(client_nonce, "client-first-message")
        server_nonce = self._nonce_factory()
        _check_nonce(server_nonce, "server nonce")

        self._gs2_header = flag + ",,"
        self._client_first_bare = bare
        self._nonce = client_nonce + server_nonce
        self._server_first = "r=%s,s=%s,i=%d" % (self._nonce, _b64(self._verifier.salt), self._verifier.iterations)
        self._state = "client-final"
        return self._server_first.encode("ascii")

    def handle_client_final(self, data: bytes) -> bytes:
        """Take the client-final-message; return server-final-message `v=...` or raise AuthError."""
        if self._state != "client-final":
            raise AuthError("unexpected SCRAM client-final-message")
        self._state = "failed"
        text = _decode(data, "client-final-message")
        without_proof, sep, proof_b64 = text.rpartition(",p=")
        if not sep:
            raise AuthError("malformed SCRAM client-final-message: missing proof")
        attrs = _attributes(without_proof, "client-final-message")
        if len(attrs) < 2 or attrs[0][0] != "c" or attrs[1][0] != "r":
            raise AuthError("malformed SCRAM client-final-message: expected c=...,r=...,p=...")
        if _b64decode(attrs[0][1], "channel binding") != self._gs2_header.encode("ascii"):
            raise AuthError("SCRAM channel binding data does not match the client-first-message")
        if not hmac.compare_digest(attrs[1][1].encode("utf-8"), self._nonce.encode("utf-8")):
            raise AuthError("SCRAM nonce mismatch")
        proof = _b64decode(proof_b64, "proof")
        if len(proof) != len(self._verifier.stored_key):
            raise AuthError("malformed SCRAM client-final-message: proof has the wrong length")

        auth_message = ",".join((self._client_first_bare, self._server_first, without_proof)).encode("utf-8")
        client_signature = _hmac(self._verifier.stored_key, auth_message)
        client_key = _xor(proof, client_signature)
        matches = hmac.compare_digest(hashlib.sha256(client_key).digest(), self._verifier.stored_key)
        if self._doomed or not matches:
            raise AuthError(_FAILED)
        self.client_key = client_key
        self.authenticated = True
        self._state = "done"
        return ("v=" + _b64(_hmac(self._verifier.server_key, auth_message))).encode("ascii")


class ScramClient:
    """The client side of one SCRAM-SHA-256 exchange, used by the proxy to log in to a backend."""

    def __init__(self, user: str, password: str, nonce_factory: Callable[[], str] = _default_nonce):
        self.user = user
        self._password = password
        self._nonce = nonce_factory()
        _check_nonce(self._nonce, "client nonce")
        self._client_first_bare = "n=%s,r=%s" % (_saslname_encode(user), self._nonce)
        self._server_signature: bytes | None = None
        self._state = "start"
        self.authenticated = False

    def client_first(self) -> bytes:
        """The client-first-message, sent in SASLInitialResponse."""
        if self._state != "start":
            raise AuthError("SCRAM client-first-message already sent")
        self._state = "server-first"
        return ("n,," + self._client_first_bare).encode("utf-8")

    def handle_server_first(self, data: bytes) -> bytes:
        """Take the server-first-message (AuthenticationSASLContinue); return the client-final-message."""
        if self._state != "server-first":
            raise AuthError("unexpected SCRAM server-first-message")
        self._state = "failed"
        text = _decode(data, "server-first-message")
        attrs = _attributes(text, "server-first-message")
        if attrs[0][0] == "m":
            raise AuthError("SCRAM mandatory extensions (m=) are not supported")
        if len(attrs) < 3 or [a[0] for a in attrs[:3]] != ["r", "s", "i"]:
            raise AuthError("malformed SCRAM server-first-message: expected r=...,s=...,i=...")
        nonce, salt_b64, iterations_text = attrs[0][1], attrs[1][1], attrs[2][1]
        _check_nonce(nonce, "server-first-message")
        if not nonce.startswith(self._nonce) or len(nonce) == len(self._nonce):
            raise AuthError("SCRAM server nonce does not extend the client nonce")
        salt = _b64decode(salt_b64, "salt")
        if not salt:
            raise AuthError("malformed SCRAM server-first-message: empty salt")
        if not (iterations_text.isascii() and iterations_text.isdigit()) or int(iterations_text) < 1:
            raise AuthError("malformed SCRAM server-first-message: bad iteration count")

        salted = scram_salted_password(self._password, salt, int(iterations_text))
        client_key, stored_key, server_key = scram_keys(salted)
        without_proof = "c=biws,r=" + nonce  # biws = base64("n,,")
        auth_message = ",".join((self._client_first_bare, text, without_proof)).encode("utf-8")
        proof = _xor(client_key, _hmac(stored_key, auth_message))
        self._server_signature = _hmac(server_key, auth_message)
        self._state = "server-final"
        return ("%s,p=%s" % (without_proof, _b64(proof))).encode("ascii")

    def verify_server_final(self, data: bytes) -> None:
        """Check the server-final-message (AuthenticationSASLFinal); AuthError unless the server proved itself."""
        if self._state != "server-final":
            raise AuthError("unexpected SCRAM server-final-message")
        self._state = "failed"
        text = _decode(data, "server-final-message")
        attrs = _attributes(text, "server-final-message")
        if attrs[0][0] == "e":
            raise AuthError("server rejected SCRAM authentication: %s" % attrs[0][1])
        if attrs[0][0] != "v":
            raise AuthError("malformed SCRAM server-final-message: expected v=...")
        signature = _b64decode(attrs[0][1], "server signature")
        if not hmac.compare_digest(signature, self._server_signature or b""):
            raise AuthError("SCRAM server signature is wrong: the server does not know the password")
        self.authenticated = True
        self._state = "done"


def md5_password_response(user: str, password: str, salt4: bytes) -> bytes:
    """What a client sends in PasswordMessage for AuthenticationMD5Password (without the trailing NUL)."""
    inner = hashlib.md5((password + user).encode("utf-8")).hexdigest()
    return b"md5" + hashlib.md5(inner.encode("ascii") + bytes(salt4)).hexdigest().encode("ascii")


def check_md5_response(verifier: str, salt4: bytes, response: bytes) -> bool:
    """Whether a PasswordMessage answer (trailing NUL already removed) matches an md5 verifier.

    The comparison is constant-time. A verifier that is not an md5 verifier never matches.
    """
    if len(salt4) != 4 or not verifier.startswith("md5") or len(verifier) != 35:
        return False
    expected = b"md5" + hashlib.md5(verifier[3:].encode("ascii", "replace") + bytes(salt4)).hexdigest().encode("ascii")
    return hmac.compare_digest(expected, bytes(response))


# ---- auth_query ([clusters.NAME.auth_query]): users looked up in pg_shadow, as PgBouncer's auth_query ----

# PgBouncer's, plus the expiry of the password: the backend login of a looked-up user goes through the cluster's
# credentials, so the server would not check VALID UNTIL itself (pg_shadow lists LOGIN roles only).
AUTH_QUERY_DEFAULT = ("SELECT usename, passwd FROM pg_catalog.pg_shadow WHERE usename = $1 "
                      "AND (valuntil IS NULL OR valuntil > now())")
_PLACEHOLDER = re.compile(r"\$1(?![0-9])")


def auth_query_sql(query: str, user: str) -> str:
    """`query` with its one `$1` replaced by `user` as an escape string literal (E'...': backslashes and quotes
    doubled, so it reads the same whatever standard_conforming_strings says). ValueError: not exactly one `$1`, or a
    NUL in the name."""
    if len(_PLACEHOLDER.findall(query)) != 1:
        raise ValueError("the query needs exactly one $1, where the user name goes")
    if "\x00" in user:
        raise ValueError("a user name cannot hold NUL")
    literal = "E'" + user.replace("\\", "\\\\").replace("'", "''") + "'"
    return _PLACEHOLDER.sub(lambda _: literal, query)


def auth_query_verifiers(value: str) -> dict:
    """pg_shadow's passwd as users-file verifiers: SCRAM-SHA-256$... or md5 + 32 hex; {} for anything else."""
    if value.startswith("SCRAM-SHA-256$"):
        try:
            parse_scram_verifier(value)
        except ValueError:
            return {}
        return {"scram_sha_256": value}
    if value.startswith("md5") and len(value) == 35:
        return {"md5": value}
    return {}
