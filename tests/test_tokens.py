"""Unit tests of signed tokens: key ring, signing, verification, revocation, cache."""

from __future__ import annotations

import base64
import json
import os
import stat
import string
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stratus.events.errors import Invalid, Unauthenticated
from stratus.handlers.keyring import KeyRing, key_id
from stratus.handlers.tokens import MAX_TOKEN_CHARS, Principal, Verifier

NOW = 1_700_000_000
TTL = 3600
HYPOTHESIS = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


# -- helpers -------------------------------------------------------------------


@pytest.fixture
def ring(tmp_path: Path) -> KeyRing:
    return KeyRing.load_or_create(tmp_path / "keys")


@pytest.fixture
def verifier(ring: KeyRing) -> Verifier:
    return Verifier(ring.public_keys())


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def compact(header: Any, payload: Any, signature: bytes = b"") -> str:
    """A JWS compact string from raw parts, signed or not: for forgeries."""

    def enc(part: Any) -> str:
        return b64url(part if isinstance(part, bytes) else json.dumps(part).encode())

    return f"{enc(header)}.{enc(payload)}.{b64url(signature)}"


def private_key(ring: KeyRing, kid: str | None = None) -> Ed25519PrivateKey:
    """The ring's private key read back from disk, to sign hand-made claims."""
    kid = kid or ring.signing_kid
    key = serialization.load_pem_private_key((ring.path / f"{kid}.pem").read_bytes(), None)
    assert isinstance(key, Ed25519PrivateKey)
    return key


def claims(**overrides: Any) -> dict[str, Any]:
    c: dict[str, Any] = {
        "jti": "3f2b8c1e-0000-4000-8000-000000000001",
        "sub": "alice",
        "tenant": "acme",
        "roles": ["member"],
        "iat": NOW,
        "exp": NOW + TTL,
    }
    c.update(overrides)
    return {k: v for k, v in c.items() if v is not _DROP}


_DROP = object()


def sign_claims(ring: KeyRing, payload: Any, **headers: Any) -> str:
    """Sign arbitrary claims with the ring's real key, as a buggy issuer might.

    By hand rather than with PyJWT, which refuses to encode some bad claims.
    """
    header = {"alg": "EdDSA", "kid": ring.signing_kid, "typ": "JWT", **headers}
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(payload).encode())}"
    signature = private_key(ring).sign(signing_input.encode("ascii"))
    return f"{signing_input}.{b64url(signature)}"


def refused(v: Verifier, token: Any, now: float = NOW + 10) -> str:
    with pytest.raises(Unauthenticated) as info:
        v.verify(token, now=now)
    assert info.value.kind == "unauthenticated"
    return info.value.message


# -- signing and the happy path ------------------------------------------------


def test_sign_and_verify(ring: KeyRing, verifier: Verifier) -> None:
    token, principal = ring.sign("alice", "acme", ["member", "reader"], ttl_s=TTL, now=NOW)
    assert principal.user == "alice"
    assert principal.tenant == "acme"
    assert principal.roles == ("member", "reader")
    assert (principal.issued_at, principal.expires_at) == (NOW, NOW + TTL)
    assert len(principal.token_id) == 36
    assert verifier.verify(token, now=NOW + 1) == principal
    header = jwt.get_unverified_header(token)
    assert header["alg"] == "EdDSA"
    assert header["kid"] == ring.signing_kid


def test_default_ttl_is_eight_hours(ring: KeyRing) -> None:
    _, p = ring.sign("alice", "acme", [], now=NOW)
    assert p.expires_at - p.issued_at == 8 * 3600


def test_ordinary_jwt_library_verifies_our_tokens(ring: KeyRing) -> None:
    """Integrations check tokens with PyJWT (or any JWT library) and the public key."""
    token, principal = ring.sign("alice", "acme", ["member"])
    raw = ring.public_keys()[ring.signing_kid]
    jwk = jwt.PyJWK({"kty": "OKP", "crv": "Ed25519", "x": b64url(raw)})
    decoded = jwt.decode(token, jwk.key, algorithms=["EdDSA"])
    assert decoded["sub"] == "alice"
    assert decoded["jti"] == principal.token_id
    assert decoded["roles"] == ["member"]


def test_tokens_from_an_ordinary_jwt_library_verify(ring: KeyRing, verifier: Verifier) -> None:
    token = jwt.encode(
        claims(extra="ignored"),
        private_key(ring),
        algorithm="EdDSA",
        headers={"kid": ring.signing_kid},
    )
    assert verifier.verify(token, now=NOW).user == "alice"


def test_cloud_admin() -> None:
    def p(tenant: str, roles: tuple[str, ...]) -> Principal:
        return Principal("id", "u", tenant, roles, NOW, NOW + 1)

    assert p("admin", ("admin",)).is_cloud_admin
    assert p("admin", ("member", "admin")).is_cloud_admin
    assert not p("acme", ("admin",)).is_cloud_admin
    assert not p("admin", ("member",)).is_cloud_admin


@pytest.mark.parametrize(
    "kwargs",
    [
        {"user": ""},
        {"tenant": ""},
        {"roles": "admin"},
        {"roles": ["member", ""]},
        {"roles": [1]},
        {"ttl_s": 0},
        {"ttl_s": float("inf")},
        {"ttl_s": float("nan")},
        {"ttl_s": True},
        {"now": float("nan")},
        {"now": -1},
    ],
)
def test_sign_refuses_bad_arguments(ring: KeyRing, kwargs: dict[str, Any]) -> None:
    args: dict[str, Any] = {"user": "alice", "tenant": "acme", "roles": ["member"]}
    args.update(kwargs)
    with pytest.raises(Invalid):
        ring.sign(**args)


# -- refusals, each with its message -------------------------------------------


@pytest.mark.parametrize(
    "token",
    [
        "",
        "hello",
        "a.b",
        "a.b.c.d",
        "...",
        '{"sub": "alice"}',
        "not base64!.eyJ9.xx",
        "eyJhbGciOiJFZERTQSJ9.e30.é",
        "x" * (MAX_TOKEN_CHARS + 1),
    ],
)
def test_garbage_strings_are_malformed(verifier: Verifier, token: str) -> None:
    assert refused(verifier, token).startswith("malformed token")


@pytest.mark.parametrize("token", [None, 42, b"eyJ.eyJ.xx", ["a", "b"], {"t": 1}])
def test_non_strings_are_malformed(verifier: Verifier, token: Any) -> None:
    assert refused(verifier, token).startswith("malformed token: expected a string")


def test_over_long_token_refused_before_parsing(ring: KeyRing, verifier: Verifier) -> None:
    token = sign_claims(ring, claims(padding="x" * MAX_TOKEN_CHARS))
    assert "longer than 8192 characters" in refused(verifier, token)


@pytest.mark.parametrize("name", ["jti", "sub", "tenant", "roles", "iat", "exp"])
def test_missing_claim_is_malformed(ring: KeyRing, verifier: Verifier, name: str) -> None:
    message = refused(verifier, sign_claims(ring, claims(**{name: _DROP})))
    assert message.startswith("malformed token")
    assert f"missing required field `{name}`" in message


@pytest.mark.parametrize(
    ("overrides", "where"),
    [
        ({"roles": "admin"}, "$.roles"),
        ({"roles": [1]}, "$.roles[0]"),
        ({"roles": {"admin": True}}, "$.roles"),
        ({"sub": 5}, "$.sub"),
        ({"tenant": None}, "$.tenant"),
        ({"jti": ["x"]}, "$.jti"),
        ({"iat": "1700000000"}, "$.iat"),
        ({"exp": 1.7e9}, "$.exp"),
        ({"exp": True}, "$.exp"),
        ({"nbf": "soon"}, "$.nbf"),
    ],
)
def test_wrong_claim_types_are_malformed(
    ring: KeyRing, verifier: Verifier, overrides: dict[str, Any], where: str
) -> None:
    message = refused(verifier, sign_claims(ring, claims(**overrides)))
    assert message.startswith("malformed token")
    assert where in message


@pytest.mark.parametrize(
    ("overrides", "detail"),
    [
        ({"sub": ""}, "claim sub is empty"),
        ({"tenant": ""}, "claim tenant is empty"),
        ({"jti": ""}, "claim jti is empty"),
        ({"exp": NOW}, "expires before it was issued"),
        ({"exp": 10**30}, "claim exp is out of range"),
        ({"iat": -5}, "claim iat is out of range"),
    ],
)
def test_impossible_claims_are_malformed(
    ring: KeyRing, verifier: Verifier, overrides: dict[str, Any], detail: str
) -> None:
    message = refused(verifier, sign_claims(ring, claims(**overrides)))
    assert message.startswith("malformed token")
    assert detail in message


def test_payload_that_is_not_an_object_is_malformed(ring: KeyRing, verifier: Verifier) -> None:
    key = private_key(ring)
    header = b64url(json.dumps({"alg": "EdDSA", "kid": ring.signing_kid}).encode())
    for body in (b"[1, 2]", b"null", b"not json", b"\xff\xfe"):
        signing_input = f"{header}.{b64url(body)}"
        token = f"{signing_input}.{b64url(key.sign(signing_input.encode()))}"
        assert refused(verifier, token).startswith("malformed token: bad claims")


@pytest.mark.parametrize("alg", ["none", "None", "HS256", "RS256", "ES256", "eddsa", "Ed25519"])
def test_only_eddsa_is_accepted(ring: KeyRing, verifier: Verifier, alg: str) -> None:
    token = compact({"alg": alg, "kid": ring.signing_kid, "typ": "JWT"}, claims())
    message = refused(verifier, token)
    assert message.startswith("token signature invalid")
    assert "EdDSA" in message


def test_alg_none_from_pyjwt_is_refused(ring: KeyRing, verifier: Verifier) -> None:
    token = jwt.encode(claims(), None, algorithm="none", headers={"kid": ring.signing_kid})
    assert refused(verifier, token).startswith("token signature invalid: algorithm none")


def test_hs256_keyed_with_the_public_key_is_refused(ring: KeyRing, verifier: Verifier) -> None:
    """The classic key-confusion forgery: HMAC with the (public) verification key."""
    raw = ring.public_keys()[ring.signing_kid]
    token = jwt.encode(claims(), raw, algorithm="HS256", headers={"kid": ring.signing_kid})
    assert refused(verifier, token).startswith("token signature invalid: algorithm HS256")


def test_header_problems_are_malformed(ring: KeyRing, verifier: Verifier) -> None:
    kid = ring.signing_kid
    cases = {
        "no kid": {"alg": "EdDSA"},
        "empty kid": {"alg": "EdDSA", "kid": ""},
        "kid not a string": {"alg": "EdDSA", "kid": 7},
        "no alg": {"kid": kid},
        "alg not a string": {"alg": ["EdDSA"], "kid": kid},
        "crit": {"alg": "EdDSA", "kid": kid, "crit": ["b64"], "b64": False},
        "array": ["EdDSA", kid],
    }
    for name, header in cases.items():
        message = refused(verifier, compact(header, claims(), b"\0" * 64))
        assert message.startswith("malformed token"), name


def test_unknown_signing_key(ring: KeyRing, verifier: Verifier) -> None:
    other = Ed25519PrivateKey.generate()
    other_kid = key_id(other.public_key())
    token = jwt.encode(claims(), other, algorithm="EdDSA", headers={"kid": other_kid})
    assert refused(verifier, token).startswith(f"unknown signing key {other_kid}")


def test_unknown_kid_is_quoted_safely(verifier: Verifier) -> None:
    token = compact({"alg": "EdDSA", "kid": "\n" + "k" * 500}, claims(), b"\0" * 64)
    message = refused(verifier, token)
    assert message.startswith("unknown signing key ")
    assert "\n" not in message and len(message) < 400


def test_wrong_key_under_a_known_kid(ring: KeyRing, verifier: Verifier) -> None:
    impostor = Ed25519PrivateKey.generate()
    token = jwt.encode(claims(), impostor, algorithm="EdDSA", headers={"kid": ring.signing_kid})
    assert refused(verifier, token).startswith("token signature invalid")


def test_tampered_payload(ring: KeyRing, verifier: Verifier) -> None:
    token, _ = ring.sign("alice", "acme", ["member"], now=NOW)
    header, _, signature = token.split(".")
    for forged in (
        claims(sub="mallory"),
        claims(roles=["admin"], tenant="admin"),
        claims(exp=NOW + 10 * TTL),
    ):
        forged_token = f"{header}.{b64url(json.dumps(forged).encode())}.{signature}"
        assert refused(verifier, forged_token).startswith("token signature invalid")


def test_tampered_header(ring: KeyRing, verifier: Verifier) -> None:
    token, _ = ring.sign("alice", "acme", ["member"], now=NOW)
    _, payload, signature = token.split(".")
    header = b64url(json.dumps({"alg": "EdDSA", "kid": ring.signing_kid}).encode())
    assert refused(verifier, f"{header}.{payload}.{signature}").startswith(
        "token signature invalid"
    )


def test_tampered_signature(ring: KeyRing, verifier: Verifier) -> None:
    token, _ = ring.sign("alice", "acme", ["member"], now=NOW)
    head, sig = token.rsplit(".", 1)
    raw = bytearray(base64.urlsafe_b64decode(sig + "=="))
    raw[10] ^= 0x01
    assert refused(verifier, f"{head}.{b64url(bytes(raw))}").startswith("token signature invalid")
    assert refused(verifier, f"{head}.{b64url(bytes(raw[:63]))}").startswith(
        "token signature invalid"
    )
    assert refused(verifier, f"{head}.").startswith("token signature invalid")


def test_non_canonical_signature_encoding_is_refused(ring: KeyRing, verifier: Verifier) -> None:
    """The last base64url character of a 64-byte signature carries 4 spare bits.

    Setting them would make a second string for the same signature; refusing
    it keeps one token string per token.
    """
    token, _ = ring.sign("alice", "acme", ["member"], now=NOW)
    alphabet = string.ascii_uppercase + string.ascii_lowercase + string.digits + "-_"
    last = token[-1]
    twin = alphabet[alphabet.index(last) ^ 0x01]
    assert base64.urlsafe_b64decode(token.rsplit(".", 1)[1][:-1] + twin + "==") == (
        base64.urlsafe_b64decode(token.rsplit(".", 1)[1] + "==")
    )
    assert refused(verifier, token[:-1] + twin).startswith("token signature invalid")


def test_expired(ring: KeyRing) -> None:
    v = Verifier(ring.public_keys(), leeway_s=5)
    token, p = ring.sign("alice", "acme", [], ttl_s=TTL, now=NOW)
    assert v.verify(token, now=p.expires_at + 5) == p  # within the leeway
    message = refused(v, token, now=p.expires_at + 6)
    assert message.startswith("token expired at 2023-11-14T23:13:20Z (6 s ago)")
    assert "sign in again" in message


def test_expired_token_is_never_cached_and_refused_at_once(ring: KeyRing) -> None:
    v = Verifier(ring.public_keys(), leeway_s=0)
    token, p = ring.sign("alice", "acme", [], ttl_s=TTL, now=NOW)
    assert refused(v, token, now=p.expires_at + 1).startswith("token expired at")
    assert len(v._cache) == 0


def test_issued_in_the_future(ring: KeyRing) -> None:
    v = Verifier(ring.public_keys(), leeway_s=5)
    token, _ = ring.sign("alice", "acme", [], now=NOW + 60)
    message = refused(v, token, now=NOW)
    assert message.startswith("token not yet valid")
    assert "60 s in the future" in message and "clock" in message
    token, p = ring.sign("alice", "acme", [], now=NOW + 5)
    assert v.verify(token, now=NOW) == p  # within the leeway


def test_not_before_in_the_future(ring: KeyRing, verifier: Verifier) -> None:
    token = sign_claims(ring, claims(nbf=NOW + 600))
    assert refused(verifier, token, now=NOW).startswith("token not yet valid")
    assert verifier.verify(token, now=NOW + 600).user == "alice"


def test_revoked_token(ring: KeyRing, verifier: Verifier) -> None:
    token, p = ring.sign("alice", "acme", [], now=NOW)
    other, _ = ring.sign("alice", "acme", [], now=NOW)
    verifier.revoke_token(p.token_id, p.expires_at)
    message = refused(verifier, token)
    assert message.startswith("token revoked")
    assert p.token_id in message
    assert verifier.verify(other, now=NOW + 10).user == "alice"


def test_revoked_user(ring: KeyRing, verifier: Verifier) -> None:
    before, _ = ring.sign("alice", "acme", [], now=NOW)
    same_second, _ = ring.sign("alice", "acme", [], now=NOW + 100)
    bob, _ = ring.sign("bob", "acme", [], now=NOW)
    verifier.revoke_user("alice", NOW + 100.5)
    assert refused(verifier, before, now=NOW + 200).startswith(
        "token revoked: user alice was disabled"
    )
    assert refused(verifier, same_second, now=NOW + 200).startswith("token revoked")
    assert verifier.verify(bob, now=NOW + 200).user == "bob"
    # Enabled again and signed in again: the new token is accepted.
    after, _ = ring.sign("alice", "acme", [], now=NOW + 101)
    assert verifier.verify(after, now=NOW + 200).user == "alice"
    # An older revocation event arriving late does not move the mark back.
    verifier.revoke_user("alice", NOW)
    assert refused(verifier, before, now=NOW + 200).startswith("token revoked")


def test_revoked_assignment(ring: KeyRing, verifier: Verifier) -> None:
    acme, _ = ring.sign("alice", "acme", ["admin"], now=NOW)
    other_tenant, _ = ring.sign("alice", "globex", ["admin"], now=NOW)
    verifier.revoke_assignment("alice", "acme", NOW + 50)
    message = refused(verifier, acme, now=NOW + 60)
    assert message.startswith("token revoked: the roles of user alice in tenant acme changed")
    assert verifier.verify(other_tenant, now=NOW + 60).tenant == "globex"
    fresh, _ = ring.sign("alice", "acme", ["member"], now=NOW + 51)
    assert verifier.verify(fresh, now=NOW + 60).roles == ("member",)


# -- the cache -----------------------------------------------------------------


class CountingVerifier(Verifier):
    """Counts the expensive path, to tell cache hits from misses."""

    checks = 0

    def _check(self, token: str) -> Any:
        self.checks += 1
        return super()._check(token)


def test_cache_hit_skips_the_signature(ring: KeyRing) -> None:
    v = CountingVerifier(ring.public_keys())
    token, p = ring.sign("alice", "acme", [], now=NOW)
    for i in range(5):
        assert v.verify(token, now=NOW + i) == p
    assert v.checks == 1


def test_cache_hit_honours_every_revocation_at_once(ring: KeyRing) -> None:
    v = CountingVerifier(ring.public_keys())
    t1, p1 = ring.sign("alice", "acme", [], now=NOW)
    t2, _ = ring.sign("bob", "acme", [], now=NOW)
    t3, _ = ring.sign("carol", "acme", [], now=NOW)
    for t in (t1, t2, t3):
        v.verify(t, now=NOW + 1)
    assert v.checks == 3

    v.revoke_token(p1.token_id, p1.expires_at)
    assert refused(v, t1, now=NOW + 2).startswith("token revoked")
    v.revoke_user("bob", NOW + 2)
    assert refused(v, t2, now=NOW + 3).startswith("token revoked: user bob")
    v.revoke_assignment("carol", "acme", NOW + 3)
    assert refused(v, t3, now=NOW + 4).startswith("token revoked: the roles of user carol")
    assert v.checks == 3  # every refusal above came from the cache-hit path


def test_cache_hit_honours_expiry(ring: KeyRing) -> None:
    v = CountingVerifier(ring.public_keys(), leeway_s=0)
    token, p = ring.sign("alice", "acme", [], ttl_s=60, now=NOW)
    assert v.verify(token, now=NOW) == p
    assert v.verify(token, now=NOW + 60) == p
    assert refused(v, token, now=NOW + 61).startswith("token expired at")
    assert v.checks == 1
    assert len(v._cache) == 0  # the expired entry was dropped


def test_cache_is_bounded_lru(ring: KeyRing) -> None:
    v = CountingVerifier(ring.public_keys(), cache_size=3)
    tokens = [ring.sign(f"u{i}", "acme", [], now=NOW)[0] for i in range(4)]
    for t in tokens[:3]:
        v.verify(t, now=NOW)
    v.verify(tokens[0], now=NOW)  # most recently used now
    v.verify(tokens[3], now=NOW)  # evicts tokens[1], the least recently used
    assert len(v._cache) == 3
    assert v.checks == 4
    v.verify(tokens[0], now=NOW)
    v.verify(tokens[2], now=NOW)
    assert v.checks == 4
    v.verify(tokens[1], now=NOW)
    assert v.checks == 5


def test_cache_can_be_disabled(ring: KeyRing) -> None:
    v = CountingVerifier(ring.public_keys(), cache_size=0)
    token, _ = ring.sign("alice", "acme", [], now=NOW)
    v.verify(token, now=NOW)
    v.verify(token, now=NOW)
    assert v.checks == 2


def test_replacing_a_key_empties_the_cache(ring: KeyRing) -> None:
    v = CountingVerifier(ring.public_keys())
    token, _ = ring.sign("alice", "acme", [], now=NOW)
    v.verify(token, now=NOW)
    impostor = Ed25519PrivateKey.generate().public_key()
    raw = impostor.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    v.add_public_key(ring.signing_kid, raw)
    assert refused(v, token, now=NOW).startswith("token signature invalid")


def test_add_public_key_refuses_bad_keys() -> None:
    v = Verifier()
    with pytest.raises(ValueError):
        v.add_public_key("k", b"short")
    with pytest.raises(ValueError):
        v.add_public_key("", b"\0" * 32)


# -- revocation memory is bounded ----------------------------------------------


def test_revoked_tokens_are_pruned_after_expiry(ring: KeyRing) -> None:
    v = Verifier(ring.public_keys(), leeway_s=5)
    issued = [ring.sign("alice", "acme", [], ttl_s=ttl, now=NOW) for ttl in (60, 120, 180)]
    for _, p in issued:
        v.revoke_token(p.token_id, p.expires_at)
    assert v.revoked_token_count == 3
    live, _ = ring.sign("bob", "acme", [], ttl_s=TTL, now=NOW)

    v.verify(live, now=NOW + 100)  # verify prunes as it goes
    assert v.revoked_token_count == 2
    assert refused(v, issued[1][0], now=NOW + 100).startswith("token revoked")
    assert v.prune(now=NOW + 1000) == 2
    assert v.revoked_token_count == 0
    assert v._revoked_heap == []
    # Once forgotten, the expiry check still refuses them.
    assert refused(v, issued[2][0], now=NOW + 1000).startswith("token expired at")


def test_pruning_keeps_a_revocation_extended_later(ring: KeyRing) -> None:
    v = Verifier(ring.public_keys(), leeway_s=0)
    v.revoke_token("t", NOW + 10)
    v.revoke_token("t", NOW + 100)
    v.revoke_token("t", NOW + 50)  # an older mark arriving late is ignored
    assert v.prune(now=NOW + 20) == 0
    assert v.revoked_token_count == 1
    assert v.prune(now=NOW + 101) == 1


def test_revocation_set_stays_bounded_under_churn(ring: KeyRing) -> None:
    v = Verifier(ring.public_keys(), leeway_s=0)
    token, _ = ring.sign("alice", "acme", [], ttl_s=10**6, now=NOW)
    for i in range(10_000):
        v.revoke_token(f"t{i}", NOW + i + 10)
        v.verify(token, now=NOW + i)
    assert v.revoked_token_count <= 11
    assert len(v._revoked_heap) <= 11


# -- the key ring on disk ------------------------------------------------------


def test_file_modes(tmp_path: Path) -> None:
    old = os.umask(0)  # even a permissive umask must not expose keys
    try:
        ring = KeyRing.load_or_create(tmp_path / "deep" / "keys")
        ring.add_key()
    finally:
        os.umask(old)
    assert stat.S_IMODE(ring.path.stat().st_mode) == 0o700
    pems = sorted(ring.path.glob("*.pem"))
    assert len(pems) == 2
    for f in [*pems, ring.path / "order"]:
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f


def test_kid_is_the_public_key_fingerprint(ring: KeyRing) -> None:
    for kid, raw in ring.public_keys().items():
        assert len(raw) == 32
        assert key_id(raw) == kid
        assert len(kid) == 16 and all(c in "0123456789abcdef" for c in kid)
        assert (ring.path / f"{kid}.pem").exists()


def test_reload_gives_the_same_keys(tmp_path: Path) -> None:
    first = KeyRing.load_or_create(tmp_path / "keys")
    first.add_key()
    newest = first.add_key()
    again = KeyRing.load_or_create(tmp_path / "keys")
    assert again.signing_kid == newest == first.signing_kid
    assert again.kids == first.kids and len(again.kids) == 3
    assert again.public_keys() == first.public_keys()
    token, _ = again.sign("alice", "acme", [], now=NOW)
    assert Verifier(first.public_keys()).verify(token, now=NOW).user == "alice"


def test_load_refuses_a_readable_key_file(ring: KeyRing) -> None:
    pem = ring.path / f"{ring.signing_kid}.pem"
    pem.chmod(0o644)
    with pytest.raises(ValueError, match="chmod 600"):
        KeyRing.load_or_create(ring.path)


def test_load_refuses_a_missing_or_swapped_key(ring: KeyRing) -> None:
    kid = ring.signing_kid
    (ring.path / f"{kid}.pem").rename(ring.path / "moved")
    with pytest.raises(ValueError, match="missing"):
        KeyRing.load_or_create(ring.path)
    other = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(ring.path / f"{kid}.pem", os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, other)
    os.close(fd)
    with pytest.raises(ValueError, match="not " + kid):
        KeyRing.load_or_create(ring.path)


def test_load_refuses_keys_without_an_index(ring: KeyRing) -> None:
    (ring.path / "order").unlink()
    with pytest.raises(ValueError, match="no 'order' file"):
        KeyRing.load_or_create(ring.path)


def test_rotation(tmp_path: Path) -> None:
    ring = KeyRing.load_or_create(tmp_path / "keys")
    old_kid = ring.signing_kid
    old_token, old = ring.sign("alice", "acme", [], ttl_s=TTL, now=NOW)

    new_kid = ring.add_key()
    assert new_kid != old_kid
    assert ring.signing_kid == new_kid
    assert ring.kids == (old_kid, new_kid)
    new_token, _ = ring.sign("alice", "acme", [], ttl_s=TTL, now=NOW + 10)
    assert jwt.get_unverified_header(new_token)["kid"] == new_kid

    both = Verifier(ring.public_keys())
    assert both.verify(old_token, now=NOW + 20) == old  # still valid after rotation
    assert both.verify(new_token, now=NOW + 20).issued_at == NOW + 10
    assert refused(both, old_token, now=old.expires_at + 60).startswith("token expired")

    new_only = Verifier({new_kid: ring.public_keys()[new_kid]})
    assert new_only.verify(new_token, now=NOW + 20).user == "alice"
    assert refused(new_only, old_token, now=NOW + 20).startswith(f"unknown signing key {old_kid}")


def test_rotation_by_another_process_is_kept(tmp_path: Path) -> None:
    """Two rings on one directory: a rotation by either never loses the other's key."""
    a = KeyRing.load_or_create(tmp_path / "keys")
    b = KeyRing.load_or_create(tmp_path / "keys")
    assert a.signing_kid == b.signing_kid
    ka = a.add_key()
    kb = b.add_key()
    again = KeyRing.load_or_create(tmp_path / "keys")
    assert again.kids[-2:] == (ka, kb)
    assert again.signing_kid == kb
    assert set(b.public_keys()) == set(again.public_keys())


# -- nothing but Unauthenticated escapes verify --------------------------------


def _check_refused_or_principal(v: Verifier, token: Any) -> None:
    try:
        p = v.verify(token, now=NOW)
    except Unauthenticated as exc:
        assert exc.message
        return
    assert isinstance(p, Principal)
    assert isinstance(p.user, str) and p.user
    assert isinstance(p.roles, tuple) and all(isinstance(r, str) for r in p.roles)


@HYPOTHESIS
@given(data=st.binary(max_size=600))
def test_random_bytes_are_refused(verifier: Verifier, data: bytes) -> None:
    refused(verifier, data)
    refused(verifier, data.decode("latin-1"))


@HYPOTHESIS
@given(text=st.text(max_size=600))
def test_random_text_is_refused(verifier: Verifier, text: str) -> None:
    refused(verifier, text)


@HYPOTHESIS
@given(parts=st.lists(st.text(alphabet=string.ascii_letters + "-_=", max_size=80), max_size=5))
def test_random_dotted_base64ish_is_refused(verifier: Verifier, parts: list[str]) -> None:
    refused(verifier, ".".join(parts))


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
claim_names = st.sampled_from(["jti", "sub", "tenant", "roles", "iat", "exp", "nbf", "x"])
headers = st.one_of(
    json_values,
    st.fixed_dictionaries(
        {"alg": st.sampled_from(["EdDSA", "none", "HS256", 1, None])},
        optional={"kid": json_values | st.just("k"), "crit": json_values, "typ": json_values},
    ),
)


@HYPOTHESIS
@given(
    header=headers,
    payload=json_values | st.dictionaries(claim_names, json_values, max_size=8),
    signature=st.binary(max_size=80),
)
def test_random_json_tokens_are_refused(
    ring: KeyRing, verifier: Verifier, header: Any, payload: Any, signature: bytes
) -> None:
    if isinstance(header, dict) and header.get("kid") == "k":
        header["kid"] = ring.signing_kid
    refused(verifier, compact(header, payload, signature))


@HYPOTHESIS
@given(
    payload=st.dictionaries(claim_names, json_values, max_size=8),
    base=st.booleans(),
)
def test_random_claims_signed_with_the_real_key(
    ring: KeyRing, verifier: Verifier, payload: dict[str, Any], base: bool
) -> None:
    """Past the signature, any claims at all give a Principal or Unauthenticated."""
    if base:
        payload = {**claims(), **payload}
    _check_refused_or_principal(verifier, sign_claims(ring, payload))


@HYPOTHESIS
@given(data=st.data())
def test_any_single_character_change_is_refused(
    ring: KeyRing, verifier: Verifier, data: st.DataObject
) -> None:
    token, _ = ring.sign("alice", "acme", ["member"], now=NOW)
    i = data.draw(st.integers(min_value=0, max_value=len(token) - 1))
    c = data.draw(st.characters(codec="ascii").filter(lambda ch: ch != token[i]))
    refused(verifier, token[:i] + c + token[i + 1 :])


def test_absurd_revocation_times_still_give_a_message(ring: KeyRing, verifier: Verifier) -> None:
    token, _ = ring.sign("alice", "acme", [], now=NOW)
    verifier.revoke_user("alice", 1e20)
    assert refused(verifier, token).startswith("token revoked: user alice")
