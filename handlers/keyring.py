"""The private Ed25519 keys that sign bearer tokens (the identity service only).

Keys rotate: ``KeyRing.add_key`` makes a new signing key while the old ones
stay in the ring, so tokens signed before a rotation keep verifying until
they expire. Verifying needs only the public keys (``handlers.tokens``).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from stratus.events.errors import Invalid
from stratus.handlers.tokens import ALGORITHM, MAX_TIME, Principal

DEFAULT_TTL_S = 8 * 3600
# Service credentials live in files on hosts, re-issued now and then.
SERVICE_TTL_S = 365 * 24 * 3600
# The tenant a service token names: no one's (services act for no tenant).
SERVICE_TENANT = "_system"
# Hex characters of the public key's SHA-256 used as the key id.
KID_CHARS = 16

_INDEX = "order"
_LOCK = ".lock"


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

    def __init__(self, path: Path | None, keys: list[tuple[str, Ed25519PrivateKey]]) -> None:
        if not keys:
            raise ValueError(f"key ring {path or '(in memory)'} holds no keys")
        # None: a ring handed over in a credentials file, held in memory only.
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

    @classmethod
    def from_pem(cls, order: list[str], pem: dict[str, str]) -> KeyRing:
        """A ring held in memory (a handlers credentials file's keys): it
        signs, but cannot add a key."""
        keys = []
        for kid in order:
            key = serialization.load_pem_private_key(pem[kid].encode(), password=None)
            if not isinstance(key, Ed25519PrivateKey) or key_id(key.public_key()) != kid:
                raise ValueError(f"signing key {kid} is not the Ed25519 key its kid names")
            keys.append((kid, key))
        return cls(None, keys)

    def to_pem(self) -> tuple[list[str], dict[str, str]]:
        """The private keys as PEM by kid, oldest first (what ``from_pem`` reads)."""
        pem = {
            kid: self._keys[kid]
            .private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            .decode()
            for kid in self._order
        }
        return list(self._order), pem

    def add_key(self) -> str:
        """Create a new key, make it the signing key, and return its kid.

        Publish the new public key to every verifier before the first token
        it signs reaches them; keep the old ones published until the tokens
        they signed have expired.
        """
        if self.path is None:
            raise Invalid(
                "this handler holds its signing keys from a credentials file: rotate the "
                "keys where the key ring directory is, then issue new handlers credentials"
            )
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
        *,
        service: str = "",
        host: str = "",
    ) -> tuple[str, Principal]:
        """Issue a token for ``user`` in ``tenant`` with ``roles``, valid for ``ttl_s``.

        Returns the token and the ``Principal`` it verifies to. Callers have
        already checked the password and the role assignments: this only
        refuses arguments no token should carry (``Invalid``). ``service``
        (and ``host``) make it a service credential's token instead
        (``sign_service``).
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
        if not 1 <= ttl_s <= MAX_TIME:
            raise Invalid("ttl_s must be at least one second")
        if now is not None and not 0 <= now <= MAX_TIME:
            raise Invalid("now is out of range")
        issued_at = int(time.time() if now is None else now)
        expires_at = issued_at + int(ttl_s)
        if issued_at < 0 or expires_at > MAX_TIME:
            raise Invalid("token times out of range")
        principal = Principal(
            token_id=str(uuid.uuid4()),
            user=user,
            tenant=tenant,
            roles=role_tuple,
            issued_at=issued_at,
            expires_at=expires_at,
            service=service,
            host=host,
        )
        kid = self.signing_kid
        claims: dict[str, object] = {
            "jti": principal.token_id,
            "sub": user,
            "tenant": tenant,
            "roles": list(role_tuple),
            "iat": issued_at,
            "exp": expires_at,
        }
        if service:
            claims["svc"] = service
            if host:
                claims["host"] = host
        token = jwt.encode(claims, self._keys[kid], algorithm=ALGORITHM, headers={"kid": kid})
        return token, principal

    def sign_service(
        self, kind: str, host: str = "", ttl_s: float = SERVICE_TTL_S
    ) -> tuple[str, Principal]:
        """A service credential's token: it admits a service of ``kind``
        (for ``host``) to the broker, and speaks for no user."""
        subject = f"service-{kind}" + (f"-{host}" if host else "")
        return self.sign(subject[:63], SERVICE_TENANT, (), ttl_s, service=kind, host=host)


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
