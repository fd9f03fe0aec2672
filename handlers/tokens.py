"""Signed bearer tokens: Ed25519 JWTs that every service verifies locally.

Tokens follow Keystone's PKI idea: the identity service signs, and every
other service verifies with public keys alone, so checking a caller never
costs a network round trip. They are ordinary JWTs (JWS compact form,
``alg: EdDSA``, a ``kid`` header naming the key) so an integration can
check them with any JWT library given the public key.

Two parts here (the private signing keys, which only the identity service
holds, are ``handlers.keyring.KeyRing``):

* ``Verifier`` checks tokens with public keys only, and honours revocations
  (a token, every token of a disabled user, or a user's tokens for one
  tenant after a role change). Revocations arrive as events; the caller
  feeds them in.
* ``Principal`` is who a verified token speaks for.

Every refusal is ``Unauthenticated`` with a message a person can act on;
nothing else escapes ``Verifier.verify``, whatever bytes a client sends.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import heapq
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from datetime import UTC, datetime

import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from stratus.events.errors import Unauthenticated

ALGORITHM = "EdDSA"
# A token is a few hundred bytes; anything much longer is not ours, and is
# refused before any parsing work is spent on it.
MAX_TOKEN_CHARS = 8 * 1024
DEFAULT_CACHE_SIZE = 100_000
# Latest instant a claim may name (the end of year 9999): beyond it a time
# cannot be printed in a message, and no token of ours goes there.
MAX_TIME = 253_402_300_799

_B64URL = re.compile(r"[A-Za-z0-9_-]*")


class Principal(msgspec.Struct, frozen=True):
    """Who a verified token speaks for, and when it stops doing so."""

    token_id: str
    user: str
    tenant: str
    roles: tuple[str, ...]
    issued_at: int
    expires_at: int
    # A service credential's token: the service kind (and host) it admits
    # to the broker. Such a token speaks for no user: it sends no commands.
    service: str = ""
    host: str = ""

    @property
    def is_cloud_admin(self) -> bool:
        """The cloud's administrator: the ``admin`` role in the ``admin`` tenant.

        ``admin`` in any other tenant only administers that tenant.
        """
        return self.tenant == "admin" and "admin" in self.roles


# -- verification (public keys only; every service) ---------------------------


class _Header(msgspec.Struct):
    alg: str
    kid: str | None = None
    crit: list[str] | None = None


class _Claims(msgspec.Struct):
    jti: str
    sub: str
    tenant: str
    roles: list[str]
    iat: int
    exp: int
    nbf: int | None = None
    svc: str | None = None
    host: str | None = None


def _when(ts: float) -> str:
    """``ts`` as an ISO 8601 UTC time for a message; never raises."""
    try:
        return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, ValueError, OSError, TypeError):
        return f"unix time {ts!r}"


def _printable(value: str, limit: int = 64) -> str:
    """``value`` safe to quote in a message: short, printable."""
    if len(value) <= limit and value.isprintable():
        return value
    return repr(value[:limit]) + ("..." if len(value) > limit else "")


def _malformed(detail: str) -> Unauthenticated:
    return Unauthenticated(f"malformed token: {detail}; send the token exactly as issued")


def _b64url_decode(segment: str, part: str) -> bytes:
    if not _B64URL.fullmatch(segment) or len(segment) % 4 == 1:
        raise _malformed(f"the {part} is not base64url")
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


class Verifier:
    """Checks tokens locally with public keys, and honours revocations.

    Checking a signature costs ~60-100 µs, so tokens whose signature and
    claims already passed are kept in a bounded LRU cache (SHA-256 of the
    token -> Principal, ~600 bytes an entry: 100,000 entries is ~60 MB). A
    cache hit skips only the signature and parsing: expiry and every
    revocation are checked on every call, so a revocation takes effect on the
    very next ``verify``.

    Revocations, fed in from identity events:

    * ``revoke_token``: one token (sign-out). Kept until the token expires,
      then dropped, since expiry refuses it from then on anyway.
    * ``revoke_user``: every token of a user issued at or before a time
      (user disabled, password changed).
    * ``revoke_assignment``: a user's tokens for one tenant issued at or
      before a time (a role taken away; the user signs in again to get a
      token with the roles they still hold).

    Token times are whole seconds, so a token issued in the same second as a
    user or assignment revocation counts as issued before it, and is refused.

    Safe to share between threads.
    """

    def __init__(
        self,
        public_keys: Mapping[str, bytes] | None = None,
        leeway_s: float = 5,
        *,
        cache_size: int = DEFAULT_CACHE_SIZE,
    ) -> None:
        if leeway_s < 0:
            raise ValueError("leeway_s must not be negative")
        if cache_size < 0:
            raise ValueError("cache_size must not be negative")
        self.leeway_s = leeway_s
        self.cache_size = cache_size
        self._keys: dict[str, Ed25519PublicKey] = {}
        self._raw: dict[str, bytes] = {}
        self._lock = threading.Lock()
        self._cache: OrderedDict[bytes, Principal] = OrderedDict()
        # token id -> its expiry, with a heap of (expiry, token id) to prune by.
        self._revoked_tokens: dict[str, int] = {}
        self._revoked_heap: list[tuple[int, str]] = []
        self._revoked_users: dict[str, float] = {}
        self._revoked_assignments: dict[tuple[str, str], float] = {}
        for kid, raw in (public_keys or {}).items():
            self.add_public_key(kid, raw)

    # -- keys and revocations --

    def add_public_key(self, kid: str, raw: bytes) -> None:
        """Trust tokens signed by the key ``kid`` (a raw 32-byte Ed25519 public key)."""
        if not isinstance(kid, str) or not kid:
            raise ValueError("kid must be a non-empty string")
        raw = bytes(raw)
        if len(raw) != 32:
            raise ValueError(f"public key {kid} is {len(raw)} bytes; Ed25519 keys are 32")
        with self._lock:
            if self._raw.get(kid) == raw:
                return
            if kid in self._raw:
                # The kid now names another key: nothing verified under the
                # old one may be served from the cache.
                self._cache.clear()
            self._keys[kid] = Ed25519PublicKey.from_public_bytes(raw)
            self._raw[kid] = raw

    @property
    def kids(self) -> tuple[str, ...]:
        """The kids this verifier trusts."""
        return tuple(self._raw)

    def revoke_token(self, token_id: str, expires_at: int) -> None:
        """Refuse the token ``token_id`` from now on.

        ``expires_at`` must be the token's own ``exp``: the revocation is
        forgotten after it, when expiry refuses the token anyway.
        """
        with self._lock:
            known = self._revoked_tokens.get(token_id)
            if known is not None and known >= expires_at:
                return
            self._revoked_tokens[token_id] = expires_at
            heapq.heappush(self._revoked_heap, (expires_at, token_id))

    def revoke_user(self, user: str, at: float) -> None:
        """Refuse every token of ``user`` issued at or before ``at`` (unix seconds)."""
        with self._lock:
            self._revoked_users[user] = max(at, self._revoked_users.get(user, at))

    def revoke_assignment(self, user: str, tenant: str, at: float) -> None:
        """Refuse ``user``'s tokens for ``tenant`` issued at or before ``at`` (unix seconds)."""
        key = (user, tenant)
        with self._lock:
            self._revoked_assignments[key] = max(at, self._revoked_assignments.get(key, at))

    @property
    def revoked_token_count(self) -> int:
        """How many revoked token ids are remembered (they are dropped after expiry)."""
        return len(self._revoked_tokens)

    def prune(self, now: float | None = None) -> int:
        """Forget revoked tokens that have expired by ``now``; return how many.

        ``verify`` does this as it goes; call it to bound memory on a
        verifier that is idle for long stretches.
        """
        now = time.time() if now is None else now
        dropped = 0
        with self._lock:
            heap = self._revoked_heap
            while heap and heap[0][0] + self.leeway_s < now:
                expires_at, token_id = heapq.heappop(heap)
                if self._revoked_tokens.get(token_id) == expires_at:
                    del self._revoked_tokens[token_id]
                    dropped += 1
        return dropped

    # -- verification --

    def verify(self, token: str, now: float | None = None) -> Principal:
        """The ``Principal`` ``token`` speaks for, or ``Unauthenticated`` saying why not."""
        if now is None:
            now = time.time()
        heap = self._revoked_heap
        if heap and heap[0][0] + self.leeway_s < now:
            self.prune(now)
        if type(token) is not str:
            raise _malformed(f"expected a string, got {type(token).__name__}")
        if len(token) > MAX_TOKEN_CHARS:
            raise _malformed(f"longer than {MAX_TOKEN_CHARS} characters")
        # Keyed by digest, not by the token: a third of the memory per entry,
        # and SHA-256 makes two tokens sharing an entry infeasible.
        digest = hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
        with self._lock:
            principal = self._cache.get(digest)
            if principal is not None:
                self._cache.move_to_end(digest)
        if principal is None:
            try:
                principal, not_before = self._check(token)
            except Unauthenticated:
                raise
            except Exception as exc:  # a parse path we did not foresee is still a refusal
                raise _malformed(f"could not be parsed ({type(exc).__name__})") from exc
            start = max(principal.issued_at, not_before or principal.issued_at)
            if start > now + self.leeway_s:
                raise Unauthenticated(
                    f"token not yet valid: it is valid from {_when(start)}, which is "
                    f"{start - now:.0f} s in the future; check the clocks of this host "
                    "and of the identity service"
                )
            self._refuse_if_revoked_or_expired(principal, now)
            if self.cache_size:
                with self._lock:
                    self._cache[digest] = principal
                    while len(self._cache) > self.cache_size:
                        self._cache.popitem(last=False)
            return principal
        try:
            self._refuse_if_revoked_or_expired(principal, now)
        except Unauthenticated:
            if principal.expires_at + self.leeway_s < now:
                with self._lock:
                    self._cache.pop(digest, None)
            raise
        return principal

    def check(self, principal: Principal, now: float | None = None) -> None:
        """Refuse (``Unauthenticated``) a principal verified earlier that has
        since expired or been revoked: for what stays open after one check,
        such as a broker connection."""
        self._refuse_if_revoked_or_expired(principal, time.time() if now is None else now)

    def _refuse_if_revoked_or_expired(self, p: Principal, now: float) -> None:
        if p.expires_at + self.leeway_s < now:
            raise Unauthenticated(
                f"token expired at {_when(p.expires_at)} ({now - p.expires_at:.0f} s ago); "
                "sign in again for a new token"
            )
        if self._revoked_tokens and p.token_id in self._revoked_tokens:
            raise Unauthenticated(
                f"token revoked (token id {p.token_id}); sign in again for a new token"
            )
        if self._revoked_users:
            at = self._revoked_users.get(p.user)
            if at is not None and p.issued_at <= at:
                raise Unauthenticated(
                    f"token revoked: user {p.user} was disabled or signed out everywhere at "
                    f"{_when(at)}, after this token was issued; sign in again"
                )
        if self._revoked_assignments:
            at = self._revoked_assignments.get((p.user, p.tenant))
            if at is not None and p.issued_at <= at:
                raise Unauthenticated(
                    f"token revoked: the roles of user {p.user} in tenant {p.tenant} changed "
                    f"at {_when(at)}, after this token was issued; sign in again for a token "
                    "with the current roles"
                )

    def _check(self, token: str) -> tuple[Principal, int | None]:
        """Signature and claims of an uncached token: the expensive part, done once."""
        parts = token.split(".")
        if len(parts) != 3:
            raise _malformed("expected three dot-separated parts (header.payload.signature)")
        h_seg, p_seg, s_seg = parts
        try:
            header = msgspec.json.decode(_b64url_decode(h_seg, "header"), type=_Header)
        except (msgspec.DecodeError, UnicodeDecodeError) as exc:
            raise _malformed(f"bad header ({exc})") from None
        if header.alg != ALGORITHM:
            raise Unauthenticated(
                f"token signature invalid: algorithm {_printable(header.alg)} is not "
                f"accepted; Stratus tokens are signed with {ALGORITHM} (Ed25519)"
            )
        if header.crit is not None:
            raise _malformed("it names critical header extensions, which Stratus does not use")
        if not header.kid:
            raise _malformed("the header names no signing key (kid)")
        key = self._keys.get(header.kid)
        if key is None:
            raise Unauthenticated(
                f"unknown signing key {_printable(header.kid)}: this service has not been "
                "given that public key; the token was issued by another identity service, "
                "or the key was rotated out"
            )
        signature = _b64url_decode(s_seg, "signature")
        if len(signature) != 64 or base64.urlsafe_b64encode(signature).rstrip(b"=") != (
            s_seg.encode("ascii")
        ):
            raise Unauthenticated("token signature invalid: not an Ed25519 signature")
        try:
            key.verify(signature, f"{h_seg}.{p_seg}".encode("ascii"))
        except InvalidSignature:
            raise Unauthenticated(
                "token signature invalid: it was altered, or signed by another key "
                f"under the kid {header.kid}"
            ) from None
        try:
            claims = msgspec.json.decode(_b64url_decode(p_seg, "payload"), type=_Claims)
        except (msgspec.DecodeError, UnicodeDecodeError, binascii.Error) as exc:
            raise _malformed(f"bad claims ({exc})") from None
        for name in ("jti", "sub", "tenant"):
            if not getattr(claims, name):
                raise _malformed(f"the claim {name} is empty")
        for name in ("iat", "exp", "nbf"):
            value = getattr(claims, name)
            if value is not None and not 0 <= value <= MAX_TIME:
                raise _malformed(f"the claim {name} is out of range")
        if claims.exp <= claims.iat:
            raise _malformed("it expires before it was issued")
        principal = Principal(
            token_id=claims.jti,
            user=claims.sub,
            tenant=claims.tenant,
            roles=tuple(claims.roles),
            issued_at=claims.iat,
            expires_at=claims.exp,
            service=claims.svc or "",
            host=claims.host or "",
        )
        return principal, claims.nbf
