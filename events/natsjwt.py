"""NATS JWTs and nkeys: what nats-server's auth callout sends and expects back.

The format is nats-io/jwt v2 (``ed25519-nkey``): a JWS in compact form whose
header is ``{"typ":"JWT","alg":"ed25519-nkey"}``, whose claims are JSON
(the registered ``jti``, ``iat``, ``iss``, ``sub``, ``aud``, ``exp``,
``name`` plus a ``nats`` object carrying the claim's ``type`` and
``version`` 2), and whose signature is Ed25519 by the issuer's nkey over
``header.claims``; all three parts base64url without padding. ``iss`` is
the signer's public nkey, so a JWT carries what verifies it; ``jti`` is
the base32 SHA-512/256 of the registered claims (without ``jti``), as the
reference library makes it (nothing checks it, but it names the claim).

An nkey is an Ed25519 key in NATS' text form: base32 of a role byte
(``U`` user, ``A`` account, ``N`` server...), the 32 key bytes and a
CRC-16; a seed (``S`` then the role) holds the private half. The ``nkeys``
package makes and reads seeds and signs; public keys are decoded here,
since it has no call for that.

Three claim kinds matter: the server's authorization request (signed by
the server), and the callout's answer, an authorization response carrying
a user JWT (both signed by the callout's issuer account).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import time
from typing import Any

import msgspec
import nkeys

HEADER = {"typ": "JWT", "alg": "ed25519-nkey"}
VERSION = 2
# The subject a server sends its authorization requests on.
AUTH_CALLOUT_SUBJECT = "$SYS.REQ.USER.AUTH"

# Roles: the first character of a public nkey, and its prefix byte.
ROLES = {
    "user": nkeys.PREFIX_BYTE_USER,
    "account": nkeys.PREFIX_BYTE_ACCOUNT,
    "server": nkeys.PREFIX_BYTE_SERVER,
}
_ROLE_OF_BYTE = {v: k for k, v in ROLES.items()}


class JWTError(ValueError):
    """A JWT or nkey that is malformed, or whose signature does not hold."""


class Expired(JWTError):
    """A JWT past its expiry (``exp``)."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as exc:
        raise JWTError(f"not base64url: {exc}") from None


_HEADER_B64 = _b64(msgspec.json.encode(HEADER))


# -- nkeys ------------------------------------------------------------------------


def new_seed(role: str) -> str:
    """A fresh seed (``S...``) for a key of ``role`` (user, account)."""
    return nkeys.encode_seed(os.urandom(32), ROLES[role]).decode()


class Signer:
    """A key pair from a seed: its public nkey and Ed25519 signatures."""

    def __init__(self, seed: str) -> None:
        try:
            self._kp = nkeys.from_seed(bytearray(seed.strip().encode()))
            self.public = self._kp.public_key.decode()
        except (nkeys.NkeysError, ValueError, binascii.Error) as exc:
            raise JWTError(f"not an nkey seed: {exc}") from None
        self.seed = seed.strip()
        self.role = role_of(self.public)

    def sign(self, data: bytes) -> bytes:
        return self._kp.sign(data)


def public_key_bytes(key: str) -> tuple[str, bytes]:
    """The role and the 32 raw bytes of a public nkey; ``JWTError`` if it is none."""
    if not isinstance(key, str) or len(key) != 56:
        raise JWTError("a public nkey is 56 characters")
    try:
        raw = base64.b32decode(key + "=" * (-len(key) % 8))
    except (binascii.Error, ValueError):
        raise JWTError("a public nkey is base32") from None
    body, crc = raw[:-2], int.from_bytes(raw[-2:], "little")
    if len(body) != 33 or nkeys.crc16(body) != crc:
        raise JWTError("the nkey's checksum does not match")
    role = _ROLE_OF_BYTE.get(body[0])
    if role is None:
        raise JWTError(f"the nkey's role {key[0]!r} is not one of {sorted(ROLES)}")
    return role, bytes(body[1:])


def role_of(key: str) -> str:
    return public_key_bytes(key)[0]


def verify_signature(public: str, data: bytes, signature: bytes) -> bool:
    """Whether ``signature`` is ``public``'s Ed25519 signature of ``data``."""
    # Here, not at the top: a CLI command, which only signs, never loads it.
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        _, raw = public_key_bytes(public)
        Ed25519PublicKey.from_public_bytes(raw).verify(signature, data)
    except (JWTError, InvalidSignature, ValueError):
        return False
    return True


def verify_nonce(public: str, nonce: str, sig: str) -> bool:
    """A client's proof that it holds ``public``: its signature of the
    server's nonce, as sent in CONNECT (base64, URL or standard alphabet)."""
    for alphabet in (b"-_", b"+/"):
        try:
            raw = base64.b64decode(sig + "=" * (-len(sig) % 4), altchars=alphabet, validate=True)
        except (binascii.Error, ValueError):
            continue
        if verify_signature(public, nonce.encode(), raw):
            return True
    return False


# -- claims -----------------------------------------------------------------------


def _jti(claims: dict[str, Any]) -> str:
    # The registered claims in the reference library's field order, empty
    # ones left out, ``jti`` blank: the hash that names the claim.
    order = ("aud", "exp", "jti", "iat", "iss", "name", "nbf", "sub")
    registered = {k: claims[k] for k in order if claims.get(k) and k != "jti"}
    digest = hashlib.new("sha512_256", msgspec.json.encode(registered)).digest()
    return base64.b32encode(digest).rstrip(b"=").decode()


def encode(claims: dict[str, Any], signer: Signer, *, now: float | None = None) -> str:
    """``claims`` signed by ``signer``: ``iss``, ``iat`` and ``jti`` are filled in."""
    body = dict(claims)
    body["iss"] = signer.public
    body["iat"] = int(time.time() if now is None else now)
    body["jti"] = _jti(body)
    payload = _b64(msgspec.json.encode(body))
    signing_input = f"{_HEADER_B64}.{payload}"
    return f"{signing_input}.{_b64(signer.sign(signing_input.encode()))}"


def decode(
    token: str, *, issuer_role: str, now: float | None = None, leeway_s: float = 0.0
) -> dict[str, Any]:
    """The claims of ``token`` once its header, signature (by its ``iss``,
    which must be a key of ``issuer_role``) and expiry (``leeway_s`` past
    ``exp`` at most) hold."""
    parts = token.split(".") if isinstance(token, str) else []
    if len(parts) != 3:
        raise JWTError("a JWT has three dot-separated parts")
    try:
        header = msgspec.json.decode(_unb64(parts[0]))
        claims = msgspec.json.decode(_unb64(parts[1]))
    except msgspec.DecodeError as exc:
        raise JWTError(f"not JSON: {exc}") from None
    if not isinstance(header, dict) or not isinstance(claims, dict):
        raise JWTError("the header and claims must be JSON objects")
    if str(header.get("typ", "")).upper() != "JWT" or header.get("alg") != HEADER["alg"]:
        raise JWTError(f"not an ed25519-nkey JWT: {header}")
    issuer = claims.get("iss")
    if not isinstance(issuer, str):
        raise JWTError("no issuer")
    try:
        role = role_of(issuer)
    except JWTError as exc:
        raise JWTError(f"issuer: {exc}") from None
    if role != issuer_role:
        raise JWTError(f"issued by a {role} key, not a {issuer_role} key")
    signing_input = f"{parts[0]}.{parts[1]}".encode()
    if not verify_signature(issuer, signing_input, _unb64(parts[2])):
        raise JWTError("signature does not verify")
    exp = claims.get("exp")
    if isinstance(exp, int) and exp and (time.time() if now is None else now) > exp + leeway_s:
        raise Expired("expired")
    return claims


# -- the auth callout's request and answer --------------------------------------


class ServerID(msgspec.Struct, frozen=True):
    id: str
    name: str = ""
    host: str = ""
    version: str = ""
    cluster: str = ""


class ClientInfo(msgspec.Struct, frozen=True):
    host: str = ""
    id: int = 0  # the connection's id on its server (cid)
    user: str = ""
    name: str = ""
    kind: str = ""
    type: str = ""
    nonce: str = ""


class ConnectOpts(msgspec.Struct, frozen=True):
    jwt: str = ""
    nkey: str = ""
    sig: str = ""
    auth_token: str = ""
    user: str = ""
    # The CONNECT field is ``pass``, a Python keyword.
    password: str = msgspec.field(default="", name="pass")
    name: str = ""
    lang: str = ""
    version: str = ""


class AuthRequest(msgspec.Struct, frozen=True):
    """What a server asks about one connection attempt (the ``nats`` claims)."""

    server_id: ServerID
    user_nkey: str
    client_info: ClientInfo = ClientInfo()
    connect_opts: ConnectOpts = ConnectOpts()
    type: str = ""
    version: int = 0


# nats-server sets an authorization request's ``exp`` to its arrival plus
# the auth timeout, in whole seconds (truncated), and waits for the answer
# that long: up to a second after ``exp``. Refusing the request at ``exp``
# dropped requests the server still waited for (a third of a connect storm
# on a busy loop); an answer after the server's deadline is ignored by it.
AUTH_REQUEST_LEEWAY_S = 1.0


def auth_request(token: str, now: float | None = None) -> AuthRequest:
    """A server's authorization request, checked (signed by a server key,
    of the right type, not expired: ``AUTH_REQUEST_LEEWAY_S``)."""
    claims = decode(token, issuer_role="server", now=now, leeway_s=AUTH_REQUEST_LEEWAY_S)
    try:
        req = msgspec.convert(claims.get("nats"), AuthRequest)
    except msgspec.ValidationError as exc:
        raise JWTError(f"not an authorization request: {exc}") from None
    if req.type != "authorization_request":
        raise JWTError(f"a {req.type!r} claim, not an authorization request")
    if req.server_id.id != claims.get("iss"):
        raise JWTError("the request is not signed by the server it names")
    role_of(req.user_nkey)  # raises unless an nkey
    return req


class Permissions(msgspec.Struct, frozen=True, omit_defaults=True):
    """Subject permissions of a user, as nats-server applies them: what is
    not allowed is refused (an empty allow list means nothing is)."""

    pub_allow: tuple[str, ...] = ()
    pub_deny: tuple[str, ...] = ()
    sub_allow: tuple[str, ...] = ()
    sub_deny: tuple[str, ...] = ()
    # Answer requests received (one reply each), whatever their reply subject.
    responses: bool = False

    def claims(self) -> dict[str, Any]:
        # nats-server reads an empty permission as "no limit": say "nothing"
        # explicitly where nothing is allowed.
        pub = {"allow": list(self.pub_allow)} if self.pub_allow else {"deny": [">"]}
        if self.pub_allow and self.pub_deny:
            pub["deny"] = list(self.pub_deny)
        sub = {"allow": list(self.sub_allow)} if self.sub_allow else {"deny": [">"]}
        if self.sub_allow and self.sub_deny:
            sub["deny"] = list(self.sub_deny)
        out: dict[str, Any] = {"pub": pub, "sub": sub}
        if self.responses:
            out["resp"] = {"max": 1, "ttl": 0}
        return out


def user_jwt(
    user_nkey: str,
    account: str,
    permissions: Permissions,
    issuer: Signer,
    *,
    name: str,
    expires: int = 0,
) -> str:
    """The user the callout admits: placed in ``account`` (config mode:
    the audience names it), known to monitoring as ``name``."""
    nats: dict[str, Any] = {
        **permissions.claims(),
        # No limits of the JWT's own (the account's apply): -1 is "none".
        "subs": -1,
        "data": -1,
        "payload": -1,
        "type": "user",
        "version": VERSION,
    }
    claims: dict[str, Any] = {"sub": user_nkey, "aud": account, "name": name, "nats": nats}
    if expires:
        claims["exp"] = int(expires)
    return encode(claims, issuer)


def auth_response(req: AuthRequest, issuer: Signer, *, jwt: str = "", error: str = "") -> str:
    """The answer to ``req``: the admitted user's JWT, or an error (one of them)."""
    nats: dict[str, Any] = {"type": "authorization_response", "version": VERSION}
    if jwt:
        nats["jwt"] = jwt
    else:
        nats["error"] = error or "not authorized"
    claims = {"sub": req.user_nkey, "aud": req.server_id.id, "nats": nats}
    return encode(claims, issuer)
