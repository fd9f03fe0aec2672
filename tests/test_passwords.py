"""Unit tests of password hashing (scrypt, stdlib)."""

from __future__ import annotations

import time

import pytest

from stratus.handlers.passwords import (
    MAX_PASSWORD_CHARS,
    hash_password,
    needs_rehash,
    verify_password,
)


def test_round_trip() -> None:
    stored = hash_password("correct horse battery staple")
    assert verify_password("correct horse battery staple", stored)


def test_stored_format_names_its_parameters() -> None:
    scheme, n, r, p, salt, digest = hash_password("pw").split("$")
    assert (scheme, n, r, p) == ("scrypt", "16384", "8", "1")
    assert salt and digest
    assert not needs_rehash(hash_password("pw"))


def test_wrong_password_is_false() -> None:
    stored = hash_password("secret")
    assert not verify_password("Secret", stored)
    assert not verify_password("secret ", stored)
    assert not verify_password("", stored)


def test_unicode_round_trip() -> None:
    stored = hash_password("pässwörd ✓ 密码")
    assert verify_password("pässwörd ✓ 密码", stored)
    assert not verify_password("passwoerd ✓ 密码", stored)


def test_salt_makes_every_hash_different() -> None:
    a, b = hash_password("same"), hash_password("same")
    assert a != b
    assert a.split("$")[4] != b.split("$")[4]
    assert verify_password("same", a) and verify_password("same", b)


@pytest.mark.parametrize("bad", ["", "x" * (MAX_PASSWORD_CHARS + 1), "\ud800"])
def test_hash_refuses_empty_over_long_and_unencodable(bad: str) -> None:
    with pytest.raises(ValueError):
        hash_password(bad)


def test_longest_allowed_password() -> None:
    pw = "x" * MAX_PASSWORD_CHARS
    assert verify_password(pw, hash_password(pw))


def test_verify_refuses_over_long_password_without_hashing() -> None:
    stored = hash_password("x")
    assert verify_password("x" * (MAX_PASSWORD_CHARS + 1), stored) is False
    assert verify_password("\ud800", stored) is False


def _good() -> str:
    return hash_password("pw")


@pytest.mark.parametrize(
    "stored",
    [
        "",
        "scrypt",
        "plain-text-password",
        "bcrypt$2b$12$abcdefghijklmnopqrstuv",
        "scrypt$16384$8$1$c2FsdA",  # too few fields
        "scrypt$16384$8$1$c2FsdA$aGFzaA$extra",
        "scrypt$abc$8$1$c2FsdA$aGFzaGhhc2hoYXNoaGFzaA",
        "scrypt$-16384$8$1$c2FsdA$aGFzaGhhc2hoYXNoaGFzaA",
        "scrypt$16383$8$1$c2FsdA$aGFzaGhhc2hoYXNoaGFzaA",  # n not a power of two
        "scrypt$16384$0$1$c2FsdA$aGFzaGhhc2hoYXNoaGFzaA",
        "scrypt$16384$8$0$c2FsdA$aGFzaGhhc2hoYXNoaGFzaA",
        "scrypt$16384$8$1$!!!!$aGFzaGhhc2hoYXNoaGFzaA",  # salt not base64
        "scrypt$16384$8$1$c2FsdA$???",
        "scrypt$16384$8$1$$aGFzaGhhc2hoYXNoaGFzaA",  # empty salt
        "scrypt$16384$8$1$c2FsdA$aGFzaA",  # hash too short
        "scrypt$\uff11\uff16\uff13\uff18\uff14$8$1$c2FsdA$aGFzaGhhc2hoYXNoaGFzaA",  # wide digits
        "scrypt$" + "9" * 5000 + "$8$1$c2FsdA$aGFzaGhhc2hoYXNoaGFzaA",
    ],
)
def test_malformed_stored_is_false(stored: str) -> None:
    assert verify_password("pw", stored) is False
    assert needs_rehash(stored)


def test_mangled_real_hash_is_false() -> None:
    stored = _good()
    assert verify_password("pw", stored)
    assert verify_password("pw", stored[:-2]) is False
    assert verify_password("pw", stored.replace("scrypt", "SCRYPT")) is False
    assert verify_password("pw", stored + "$") is False


def test_non_string_stored_is_false() -> None:
    assert verify_password("pw", None) is False  # type: ignore[arg-type]
    assert verify_password("pw", b"scrypt$16384$8$1$a$b") is False  # type: ignore[arg-type]


def test_hostile_parameters_are_refused_quickly() -> None:
    """A stored string asking for gigabytes of memory is refused, not attempted."""
    start = time.perf_counter()
    assert not verify_password("pw", "scrypt$1073741824$8$1$c2FsdA$aGFzaGhhc2hoYXNoaGFzaA")
    assert not verify_password("pw", "scrypt$1048576$32$16$c2FsdA$aGFzaGhhc2hoYXNoaGFzaA")
    assert time.perf_counter() - start < 0.5


def test_older_parameters_still_verify_and_need_rehash() -> None:
    import base64
    import hashlib

    salt = b"0123456789abcdef"
    digest = hashlib.scrypt(b"pw", salt=salt, n=2**10, r=8, p=1, dklen=32)
    b64 = lambda b: base64.b64encode(b).decode().rstrip("=")  # noqa: E731
    stored = f"scrypt$1024$8$1${b64(salt)}${b64(digest)}"
    assert verify_password("pw", stored)
    assert not verify_password("px", stored)
    assert needs_rehash(stored)
