"""Password hashing with scrypt from the standard library.

scrypt is memory-hard: every guess costs ``128 * r * n`` bytes of RAM as well
as CPU time, so a stolen hash table is expensive to attack on GPUs, and it
needs no third-party dependency. The stored string names its own parameters
(``scrypt$n$r$p$<salt>$<hash>``), so the cost can be raised later without
invalidating hashes already on the log: old ones still verify with the
parameters they were made with.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os

SCHEME = "scrypt"
# n=2**14, r=8, p=1: 16 MiB and roughly 35 ms per hash on the reference
# machine (2 cores): slow enough to make guessing costly, fast enough that a
# sign-in does not feel slow.
N = 2**14
R = 8
P = 1
SALT_BYTES = 16
HASH_BYTES = 32
MAX_PASSWORD_CHARS = 1024

# Bounds on parameters read back from a stored string. A stored hash is data;
# a corrupted or hostile one must not make verification allocate gigabytes
# or spin for minutes.
_MAX_N = 2**20
_MAX_R = 32
_MAX_P = 16
_MAX_MEMORY = 256 * 1024 * 1024


def _memory(n: int, r: int, p: int) -> int:
    """An upper bound on what scrypt allocates, passed as ``maxmem``."""
    return 128 * r * (n + p + 2) + 1024 * 1024


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


def _derive(password: bytes, salt: bytes, n: int, r: int, p: int, length: int) -> bytes:
    return hashlib.scrypt(password, salt=salt, n=n, r=r, p=p, dklen=length, maxmem=_memory(n, r, p))


def hash_password(password: str) -> str:
    """Hash ``password`` with a fresh random salt into a self-describing string.

    Raises ``ValueError`` for an empty password or one longer than 1024
    characters: the limit keeps a sign-in request from being used to make
    the service hash megabytes.
    """
    if not isinstance(password, str):
        raise ValueError("password must be a string")
    if not password:
        raise ValueError("password must not be empty")
    if len(password) > MAX_PASSWORD_CHARS:
        raise ValueError(f"password is longer than {MAX_PASSWORD_CHARS} characters")
    # A lone surrogate cannot be encoded: UnicodeEncodeError is a ValueError.
    secret = password.encode("utf-8")
    salt = os.urandom(SALT_BYTES)
    digest = _derive(secret, salt, N, R, P, HASH_BYTES)
    return f"{SCHEME}${N}${R}${P}${_b64(salt)}${_b64(digest)}"


def _parse(stored: str) -> tuple[int, int, int, bytes, bytes] | None:
    """The parameters, salt and hash of ``stored``, or None when it is not one of ours."""
    if not isinstance(stored, str) or len(stored) > 512:
        return None
    parts = stored.split("$")
    if len(parts) != 6 or parts[0] != SCHEME:
        return None
    try:
        if not all(s.isdigit() and s.isascii() for s in parts[1:4]):
            return None
        n, r, p = int(parts[1]), int(parts[2]), int(parts[3])
        salt, digest = _unb64(parts[4]), _unb64(parts[5])
    except (ValueError, binascii.Error):
        return None
    if n < 2 or n > _MAX_N or n & (n - 1):
        return None
    if not (1 <= r <= _MAX_R and 1 <= p <= _MAX_P) or _memory(n, r, p) > _MAX_MEMORY:
        return None
    if not salt or not 16 <= len(digest) <= 64:
        return None
    return n, r, p, salt, digest


def verify_password(password: str, stored: str) -> bool:
    """True when ``password`` matches ``stored``; False otherwise, never an exception.

    A malformed or unknown ``stored`` string is a failed sign-in, not a
    crash of the request handler. The comparison is constant-time.
    """
    parsed = _parse(stored)
    if parsed is None:
        return False
    if not isinstance(password, str) or not password or len(password) > MAX_PASSWORD_CHARS:
        return False
    n, r, p, salt, digest = parsed
    try:
        secret = password.encode("utf-8")
        candidate = _derive(secret, salt, n, r, p, len(digest))
    except (ValueError, MemoryError):
        return False
    return hmac.compare_digest(candidate, digest)


def needs_rehash(stored: str) -> bool:
    """True when ``stored`` was made with other parameters than today's.

    Call after a successful sign-in to upgrade the stored hash in place.
    """
    parsed = _parse(stored)
    if parsed is None:
        return True
    n, r, p, salt, digest = parsed
    return (n, r, p, len(salt), len(digest)) != (N, R, P, SALT_BYTES, HASH_BYTES)
