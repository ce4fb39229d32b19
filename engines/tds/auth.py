"""The TDS engine's password verifier (tds_sha256): what `multiproxy users add --kind tds_sha256` stores and how
a LOGIN7 password is checked against it."""
from __future__ import annotations

import hashlib
import hmac
import os
import re


def tds_sha256_verifier(password: str, salt: bytes | None = None) -> str:
    """The TDS engine's verifier: "SHA256$" + hex salt + "$" + hex SHA256(salt + UTF-8 password).

    TDS clients send the password itself (obfuscated, usually under TLS), so a salted hash is enough.
    """
    salt = os.urandom(16) if salt is None else salt
    return f"SHA256${salt.hex()}${hashlib.sha256(salt + password.encode('utf-8')).hexdigest()}"


_TDS_SHA256_RE = re.compile(r"SHA256\$([0-9a-f]{2,128})\$([0-9a-f]{64})")


def check_tds_sha256(verifier: str, password: str) -> bool:
    """True when `password` matches a tds_sha256 verifier; a malformed verifier matches nothing."""
    found = _TDS_SHA256_RE.fullmatch(verifier)
    if found is None or len(found.group(1)) % 2:
        return False
    digest = hashlib.sha256(bytes.fromhex(found.group(1)) + password.encode("utf-8")).hexdigest()
    return hmac.compare_digest(digest, found.group(2))


VERIFIER_KINDS = {"tds_sha256": lambda user, password: tds_sha256_verifier(password)}
