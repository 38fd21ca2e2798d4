"""Secrets at rest: salted scrypt hashes for app secrets, sha256 for random tokens.

App secrets may be chosen by people, so they get a slow, salted hash (scrypt, about
50 ms on our machines); tokens are 256 random bits, so a plain sha256 of them is as
strong and lets a token be looked up by its hash. Comparisons are constant-time.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

#: scrypt's cost: 2^14 takes ~60 ms here. Tests lower SCRYPT_N; the default stays this.
DEFAULT_SCRYPT_N = 2**14
SCRYPT_N = DEFAULT_SCRYPT_N
SCRYPT_R = 8
SCRYPT_P = 1
SALT_BYTES = 16
SCHEME = "scrypt"


def new_secret() -> str:
    """A fresh random secret or token, URL-safe, 256 bits."""
    return secrets.token_urlsafe(32)


def hash_secret(secret: str) -> str:
    """The storable form of secret: scheme, cost parameters, salt and digest."""
    salt = secrets.token_bytes(SALT_BYTES)
    digest = _scrypt(secret, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)
    return "$".join([SCHEME, str(SCRYPT_N), str(SCRYPT_R), str(SCRYPT_P), _b64(salt), _b64(digest)])


def verify_secret(secret: str, stored: str) -> bool:
    """Whether secret matches a hash_secret() value, in constant time for a given hash."""
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != SCHEME:
            return False
        expected = base64.urlsafe_b64decode(digest)
        actual = _scrypt(secret, base64.urlsafe_b64decode(salt), int(n), int(r), int(p))
    except ValueError:
        return False
    return hmac.compare_digest(actual, expected)


def token_digest(token: str) -> str:
    """The lookup key of a token: hex sha256."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def _scrypt(secret: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(
        secret.encode("utf-8", "surrogatepass"), salt=salt, n=n, r=r, p=p, dklen=32
    )


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode("ascii")
