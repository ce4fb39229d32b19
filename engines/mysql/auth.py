"""MySQL authentication mechanics, sans-IO: native and caching_sha2 scrambles, their verifiers, RSA exchange, MariaDB ed25519."""
from __future__ import annotations

import hashlib
import hmac

NATIVE = b"mysql_native_password"
CACHING_SHA2 = b"caching_sha2_password"
CLEAR = b"mysql_clear_password"
ED25519 = b"client_ed25519"
SHA256_PASSWORD = b"sha256_password"


class AuthError(Exception):
    """A credential or an auth message is wrong."""


def _xor(a: bytes, b: bytes) -> bytes:
    return bytes(x ^ y for x, y in zip(a, b))


# ---- mysql_native_password: verifier "*" + HEX(SHA1(SHA1(password))), as mysql.user stores it ----

def native_verifier(password: str) -> str:
    return "*" + hashlib.sha1(hashlib.sha1(password.encode("utf-8")).digest()).hexdigest().upper()


def parse_native_verifier(text: str) -> bytes:
    """SHA1(SHA1(password)) from a `*HEX` verifier; ValueError when it is not one."""
    if len(text) != 41 or text[0] != "*":
        raise ValueError("not a mysql_native_password verifier (expected * followed by 40 hex digits)")
    try:
        return bytes.fromhex(text[1:])
    except ValueError:
        raise ValueError("not a mysql_native_password verifier (expected * followed by 40 hex digits)") from None


def native_scramble(password: str, nonce: bytes) -> bytes:
    """The client's answer: SHA1(pw) XOR SHA1(nonce + SHA1(SHA1(pw))); empty for an empty password."""
    if not password:
        return b""
    stage1 = hashlib.sha1(password.encode("utf-8")).digest()
    stage2 = hashlib.sha1(stage1).digest()
    return _xor(stage1, hashlib.sha1(nonce[:20] + stage2).digest())


def native_check(stage2: bytes, nonce: bytes, response: bytes) -> bool:
    if len(response) != 20:
        return False
    stage1 = _xor(response, hashlib.sha1(nonce[:20] + stage2).digest())
    return hmac.compare_digest(hashlib.sha1(stage1).digest(), stage2)


# ---- caching_sha2_password: verifier "SHA2$" + HEX(SHA256(SHA256(password))) (the fast-path check value) ----

SHA2_PREFIX = "SHA2$"


def caching_sha2_verifier(password: str) -> str:
    return SHA2_PREFIX + hashlib.sha256(hashlib.sha256(password.encode("utf-8")).digest()).hexdigest()


def parse_caching_sha2_verifier(text: str) -> bytes:
    if not text.startswith(SHA2_PREFIX) or len(text) != len(SHA2_PREFIX) + 64:
        raise ValueError("not a caching_sha2_password verifier (expected SHA2$ followed by 64 hex digits)")
    try:
        return bytes.fromhex(text[len(SHA2_PREFIX):])
    except ValueError:
        raise ValueError("not a caching_sha2_password verifier (expected SHA2$ followed by 64 hex digits)") from None


def sha2_scramble(password: str, nonce: bytes) -> bytes:
    """XOR(SHA256(pw), SHA256(SHA256(SHA256(pw)) + nonce)); empty for an empty password."""
    if not password:
        return b""
    stage1 = hashlib.sha256(password.encode("utf-8")).digest()
    stage2 = hashlib.sha256(stage1).digest()
    return _xor(stage1, hashlib.sha256(stage2 + nonce[:20]).digest())


def sha2_check(stage2: bytes, nonce: bytes, response: bytes) -> bool:
    if len(response) != 32:
        return False
    stage1 = _xor(response, hashlib.sha256(stage2 + nonce[:20]).digest())
    return hmac.compare_digest(hashlib.sha256(stage1).digest(), stage2)


def sha2_check_cleartext(stage2: bytes, password: bytes) -> bool:
    return hmac.compare_digest(hashlib.sha256(hashlib.sha256(password).digest()).digest(), stage2)


# ---- RSA key exchange (full authentication without TLS) ----

def rsa_private_key():
    from cryptography.hazmat.primitives.asymmetric import rsa
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def rsa_public_pem(key) -> bytes:
    from cryptography.hazmat.primitives import serialization
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def _oaep():
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding
    return padding.OAEP(mgf=padding.MGF1(algorithm=hashes.SHA1()), algorithm=hashes.SHA1(), label=None)


def _mix(password: bytes, nonce: bytes) -> bytes:
    return bytes(b ^ nonce[i % len(nonce)] for i, b in enumerate(password))


def rsa_encrypt_password(pem: bytes, password: str, nonce: bytes) -> bytes:
    """What a client sends after receiving the server's public key: RSA-OAEP(password + NUL XOR nonce)."""
    from cryptography.hazmat.primitives import serialization
    key = serialization.load_pem_public_key(pem)
    return key.encrypt(_mix(password.encode("utf-8") + b"\x00", nonce[:20]), _oaep())


def rsa_decrypt_password(key, data: bytes, nonce: bytes) -> bytes:
    """The cleartext password (without its NUL) from a client's RSA-encrypted answer; AuthError if it cannot be read."""
    try:
        plain = key.decrypt(data, _oaep())
    except Exception:
        raise AuthError("cannot decrypt the RSA-encrypted password") from None
    return _mix(plain, nonce[:20]).rstrip(b"\x00")


# ---- MariaDB client_ed25519: an RFC 8032 signature whose secret scalar comes from SHA512(password) ----
# The key is derived from the password of any length (not from a 32-byte seed), so a library's Ed25519
# signer cannot be used; signing needs the curve arithmetic below. Verification in the tests uses
# `cryptography`'s Ed25519 public key, which proves the signatures are standard.

_P = 2 ** 255 - 19
_L = 2 ** 252 + 27742317777372353535851937790883648493
_D = -121665 * pow(121666, _P - 2, _P) % _P
_SQRT_M1 = pow(2, (_P - 1) // 4, _P)


def _recover_x(y: int, sign: int) -> int:
    x2 = (y * y - 1) * pow(_D * y * y + 1, _P - 2, _P) % _P
    x = pow(x2, (_P + 3) // 8, _P)
    if (x * x - x2) % _P:
        x = x * _SQRT_M1 % _P
    if x & 1 != sign:
        x = _P - x
    return x


_BY = 4 * pow(5, _P - 2, _P) % _P
_BX = _recover_x(_BY, 0)
_BASE = (_BX, _BY, 1, _BX * _BY % _P)


def _add(a, b):
    x1, y1, z1, t1 = a
    x2, y2, z2, t2 = b
    aa = (y1 - x1) * (y2 - x2) % _P
    bb = (y1 + x1) * (y2 + x2) % _P
    cc = 2 * t1 * t2 * _D % _P
    dd = 2 * z1 * z2 % _P
    e, f, g, h = bb - aa, dd - cc, dd + cc, bb + aa
    return (e * f % _P, g * h % _P, f * g % _P, e * h % _P)


def _multiply(scalar: int, point):
    result = (0, 1, 1, 0)
    while scalar:
        if scalar & 1:
            result = _add(result, point)
        point = _add(point, point)
        scalar >>= 1
    return result


def _encode(point) -> bytes:
    x, y, z, _ = point
    zi = pow(z, _P - 2, _P)
    x, y = x * zi % _P, y * zi % _P
    return (y | ((x & 1) << 255)).to_bytes(32, "little")


def ed25519_public_key(password: str) -> bytes:
    h = hashlib.sha512(password.encode("utf-8")).digest()
    scalar = int.from_bytes(h[:32], "little") & ((1 << 254) - 8) | (1 << 254)
    return _encode(_multiply(scalar, _BASE))


def ed25519_sign(password: str, message: bytes) -> bytes:
    """The client_ed25519 answer to the server's 32-byte nonce."""
    h = hashlib.sha512(password.encode("utf-8")).digest()
    scalar = int.from_bytes(h[:32], "little") & ((1 << 254) - 8) | (1 << 254)
    public = _encode(_multiply(scalar, _BASE))
    r = int.from_bytes(hashlib.sha512(h[32:] + message).digest(), "little") % _L
    big_r = _encode(_multiply(r, _BASE))
    k = int.from_bytes(hashlib.sha512(big_r + public + message).digest(), "little") % _L
    s = (r + k * scalar) % _L
    return big_r + s.to_bytes(32, "little")


# What `multiproxy users add --kind ...` stores for MySQL clients (MySQLEngine.verifier_kinds).
VERIFIER_KINDS = {
    "mysql_native_password": lambda user, password: native_verifier(password),
    "caching_sha2_password": lambda user, password: caching_sha2_verifier(password),
}


# ---- auth_query ([clusters.NAME.auth_query]): users looked up in mysql.user ----

# Expired passwords are left out: the backend login of a looked-up user goes through the cluster's credentials, so
# the server would not refuse them itself. (Locked accounts: MySQL's mysql.user has account_locked, MariaDB's view
# has not, its global_priv JSON has: a query of one's own adds that.)
AUTH_QUERY_DEFAULT = ("SELECT authentication_string FROM mysql.user WHERE user = ? "
                      "AND plugin = 'mysql_native_password' AND password_expired = 'N'")


def auth_query_sql(query: str, user: str) -> str:
    """`query` with its one `?` replaced by `user` as a hex literal (X'...': no quoting to get wrong, whatever the
    sql_mode says of backslashes). ValueError: not exactly one `?`."""
    if query.count("?") != 1:
        raise ValueError("the query needs exactly one ?, where the user name goes")
    return query.replace("?", "X'" + user.encode("utf-8").hex() + "'")


def auth_query_verifiers(value: str) -> dict:
    """mysql.user's authentication_string as users-file verifiers: mysql_native_password's *HEX; {} otherwise."""
    try:
        parse_native_verifier(value)
    except ValueError:
        return {}
    return {"mysql_native_password": value}
