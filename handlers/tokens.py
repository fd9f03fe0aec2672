"""Signed bearer tokens: Ed25519 JWTs that every service verifies locally.

Tokens follow Keystone's PKI idea: the identity service signs, and every
other service verifies with public keys alone, so checking a caller never
costs a network round trip. They are ordinary JWTs (JWS compact form,
``alg: EdDSA``, a ``kid`` header naming the key) so an integration can
check them with any JWT library given the public key.

Three parts:

* ``KeyRing`` holds the private signing keys on disk (identity service only).
  Keys rotate: ``add_key`` makes a new signing key while the old ones stay in
  the ring, so tokens signed before a rotation keep verifying until they
  expire.
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
import contextlib
import fcntl
import hashlib
import heapq
import os
import re
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path

import jwt
import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from stratus.events.errors import Invalid, Unauthenticated

ALGORITHM = "EdDSA"
DEFAULT_TTL_S = 8 * 3600
# A token is a few hundred bytes; anything much longer is not ours, and is
# refused before any parsing work is spent on it.
MAX_TOKEN_CHARS = 8 * 1024
DEFAULT_CACHE_SIZE = 100_000
# Hex characters of the public key's SHA-256 used as the key id.
KID_CHARS = 16
# Latest instant a claim may name (the end of year 9999): beyond it a time
# cannot be printed in a message, and no token of ours goes there.
_MAX_TIME = 253_402_300_799

_INDEX = "order"
_LOCK = ".lock"
_B64URL = re.compile(r"[A-Za-z0-9_-]*")


class Principal(msgspec.Struct, frozen=True):
    """Who a verified token speaks for, and when it stops doing so."""

    token_id: str
    user: str
    tenant: str
    roles: tuple[str, ...]
    issued_at: int
    expires_at: int

    @property
    def is_cloud_admin(self) -> bool:
        """The cloud's administrator: the ``admin`` role in the ``admin`` tenant.

        ``admin`` in any other tenant only administers that tenant.
        """
        return self.tenant == "admin" and "admin" in self.roles


# -- key ring (private keys; the identity service only) -----------------------


def key_id(public: Ed25519PublicKey | bytes) -> str:
    """The key id of a public key: a short hex fingerprint of its raw bytes.

    Derived from the key itself, so two rings can never disagree about which
    key a kid names.
    """
    raw = public if isinstance(public, bytes) else _raw_public(public)
    return hashlib.sha256(raw).hexdigest()[:KID_CHARS]


def _raw_public(public: Ed25519PublicKey) -> bytes:
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _write_private(path: Path, data: bytes, *, exclusive: bool = False) -> None:
    """Write ``data`` to a file created with mode 0600 and flush it to disk.

    The mode is given to ``open`` itself, so the file is never readable by
    anyone else, not even for the moment between creating and chmod-ing it.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW
    flags |= os.O_EXCL if exclusive else os.O_TRUNC
    fd = os.open(path, flags, 0o600)
    try:
        os.fchmod(fd, 0o600)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class KeyRing:
    """Private Ed25519 signing keys kept in one directory.

    Layout: ``<kid>.pem`` per key (PKCS#8, mode 0600) and ``order``, the kids
    oldest first, one per line. The last kid in ``order`` signs new tokens;
    the others remain only so their public keys stay published until the
    tokens they signed have expired. A key file is written before ``order``
    names it, so a crash half-way leaves at most an unused file behind,
    never an index naming a missing key. ``order`` is replaced atomically.

    Changes take an exclusive ``flock`` on the directory's ``.lock`` file,
    so replicas starting together on a shared directory create one first
    key, not one each. A ring in another process does not see a key added
    here until it is loaded again.
    """

    def __init__(self, path: Path, keys: list[tuple[str, Ed25519PrivateKey]]) -> None:
        if not keys:
            raise ValueError(f"key ring {path} holds no keys")
        self.path = path
        self._keys: dict[str, Ed25519PrivateKey] = dict(keys)
        self._order: list[str] = [kid for kid, _ in keys]

    # -- loading and rotation --

    @classmethod
    def load_or_create(cls, path: Path) -> KeyRing:
        """Load the ring in ``path``, creating the directory and a first key if needed.

        Refuses (``ValueError``) a key file that group or others may read,
        an index naming a missing key, and a key whose fingerprint does not
        match its kid: signing with a leaked or swapped key is worse than
        not starting.
        """
        path = Path(path)
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileExistsError):
                path.mkdir(mode=0o700)
                os.chmod(path, 0o700)
        with _locked(path):
            order = _read_order(path)
            if not order:
                stray = sorted(p.name for p in path.glob("*.pem"))
                if stray:
                    raise ValueError(
                        f"key ring {path} has key files ({', '.join(stray)}) but no "
                        f"'{_INDEX}' file; write their kids into it, oldest first"
                    )
                kid = _new_key_file(path)
                _write_order(path, [kid])
                order = [kid]
            return cls(path, [(kid, _load_key(path, kid)) for kid in order])

    def add_key(self) -> str:
        """Create a new key, make it the signing key, and return its kid.

        Publish the new public key to every verifier before the first token
        it signs reaches them; keep the old ones published until the tokens
        they signed have expired.
        """
        with _locked(self.path):
            # Another process may have rotated since this ring was loaded.
            order = _read_order(self.path) or list(self._order)
            kid = _new_key_file(self.path)
            order = [k for k in order if k != kid] + [kid]
            _write_order(self.path, order)
            for k in order:
                if k not in self._keys:
                    self._keys[k] = _load_key(self.path, k)
            self._order = order
        return kid

    @property
    def signing_kid(self) -> str:
        """The kid of the key that signs new tokens: the newest one."""
        return self._order[-1]

    @property
    def kids(self) -> tuple[str, ...]:
        """Every kid in the ring, oldest first."""
        return tuple(self._order)

    def public_keys(self) -> dict[str, bytes]:
        """Every key's raw 32-byte public key by kid: what verifiers need."""
        return {kid: _raw_public(self._keys[kid].public_key()) for kid in self._order}

    # -- signing --

    def sign(
        self,
        user: str,
        tenant: str,
        roles: Iterable[str],
        ttl_s: float = DEFAULT_TTL_S,
        now: float | None = None,
    ) -> tuple[str, Principal]:
        """Issue a token for ``user`` in ``tenant`` with ``roles``, valid for ``ttl_s``.

        Returns the token and the ``Principal`` it verifies to. Callers have
        already checked the password and the role assignments: this only
        refuses arguments no token should carry (``Invalid``).
        """
        for name, value in (("user", user), ("tenant", tenant)):
            if not isinstance(value, str) or not value:
                raise Invalid(f"{name} must be a non-empty string")
        if isinstance(roles, str):
            raise Invalid("roles must be a list of role names, not one string")
        role_tuple = tuple(roles)
        if not all(isinstance(r, str) and r for r in role_tuple):
            raise Invalid("roles must be non-empty strings")
        if isinstance(ttl_s, bool) or not isinstance(ttl_s, int | float):
            raise Invalid("ttl_s must be a number of seconds")
        if not 1 <= ttl_s <= _MAX_TIME:
            raise Invalid("ttl_s must be at least one second")
        if now is not None and not 0 <= now <= _MAX_TIME:
            raise Invalid("now is out of range")
        issued_at = int(time.time() if now is None else now)
        expires_at = issued_at + int(ttl_s)
        if issued_at < 0 or expires_at > _MAX_TIME:
            raise Invalid("token times out of range")
        principal = Principal(
            token_id=str(uuid.uuid4()),
            user=user,
            tenant=tenant,
            roles=role_tuple,
            issued_at=issued_at,
            expires_at=expires_at,
        )
        kid = self.signing_kid
        claims = {
            "jti": principal.token_id,
            "sub": user,
            "tenant": tenant,
            "roles": list(role_tuple),
            "iat": issued_at,
            "exp": expires_at,
        }
        token = jwt.encode(claims, self._keys[kid], algorithm=ALGORITHM, headers={"kid": kid})
        return token, principal


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    fd = os.open(path / _LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _read_order(path: Path) -> list[str]:
    try:
        text = (path / _INDEX).read_text("ascii")
    except FileNotFoundError:
        return []
    order = [line.strip() for line in text.splitlines() if line.strip()]
    for kid in order:
        if not re.fullmatch(r"[0-9a-f]{1,64}", kid):
            raise ValueError(f"key ring {path}: '{_INDEX}' names {kid!r}, which is not a kid")
    return order


def _write_order(path: Path, order: list[str]) -> None:
    tmp = path / f"{_INDEX}.tmp"
    _write_private(tmp, "".join(f"{kid}\n" for kid in order).encode("ascii"))
    os.replace(tmp, path / _INDEX)
    _fsync_dir(path)


def _new_key_file(path: Path) -> str:
    key = Ed25519PrivateKey.generate()
    kid = key_id(key.public_key())
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _write_private(path / f"{kid}.pem", pem, exclusive=True)
    _fsync_dir(path)
    return kid


def _load_key(path: Path, kid: str) -> Ed25519PrivateKey:
    file = path / f"{kid}.pem"
    try:
        st = file.stat()
    except FileNotFoundError:
        raise ValueError(f"key ring {path}: '{_INDEX}' names {kid} but {file} is missing") from None
    if st.st_mode & 0o077:
        raise ValueError(
            f"key file {file} is readable by group or others (mode {st.st_mode & 0o777:04o}); "
            f"run: chmod 600 {file}"
        )
    key = serialization.load_pem_private_key(file.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"key file {file} does not hold an Ed25519 private key")
    if key_id(key.public_key()) != kid:
        raise ValueError(f"key file {file} holds the key {key_id(key.public_key())}, not {kid}")
    return key


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
            if value is not None and not 0 <= value <= _MAX_TIME:
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
        )
        return principal, claims.nbf
