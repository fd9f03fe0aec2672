"""Sealed replies: a service's answer readable only by the client that asked.

Clients connect to the broker without credentials of their own, so all of
them share one NATS user, and the broker can only say "clients may
subscribe to ``_INBOX.>``": any client could read every other client's
replies (tokens from logging in, another tenant's listings). A client
therefore sends an ephemeral X25519 public key with each request
(``Stratus-Reply-Key``); the service derives a key from it and its own
X25519 key (ECDH, then HKDF-SHA256) and encrypts the reply with
ChaCha20-Poly1305, bound to the reply subject. Clients cannot subscribe to
requests or publish into inboxes, so a passive reader of inboxes is the
adversary, and it learns nothing. Derived keys are cached per peer: a
reply costs one AEAD operation.
"""

from __future__ import annotations

import base64
import contextlib
import os
from collections import OrderedDict
from typing import Any

import msgspec
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from nats.aio.msg import Msg

from stratus.events.commands import Reply, reply_allowed
from stratus.events.errors import Internal, Invalid

H_REPLY_KEY = "Stratus-Reply-Key"  # request: the client's public key
H_SEALED = "Stratus-Sealed"  # reply: "<service public key>.<nonce>"
_INFO = b"stratus sealed reply v1"
_CACHE = 4096


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class _Party:
    """One side's X25519 key and the AEAD keys derived with each peer."""

    def __init__(self) -> None:
        self._key = X25519PrivateKey.generate()
        # (public_bytes_raw: no need to load the serialization module, which
        # every CLI command would pay for at start.)
        self.public = self._key.public_key().public_bytes_raw()
        self.public_b64 = _b64(self.public)
        self._aeads: OrderedDict[bytes, ChaCha20Poly1305] = OrderedDict()

    def aead(self, peer: bytes, client: bytes, service: bytes) -> ChaCha20Poly1305:
        cached = self._aeads.get(peer)
        if cached is not None:
            self._aeads.move_to_end(peer)
            return cached
        shared = self._key.exchange(X25519PublicKey.from_public_bytes(peer))
        key = HKDF(hashes.SHA256(), 32, salt=client + service, info=_INFO).derive(shared)
        aead = self._aeads[peer] = ChaCha20Poly1305(key)
        if len(self._aeads) > _CACHE:
            self._aeads.popitem(last=False)
        return aead


class Sealer(_Party):
    """The service side."""

    def seal(self, client_key_b64: str, reply: str, body: bytes) -> tuple[bytes, dict[str, str]]:
        """The sealed body and its header; ValueError for a malformed client key."""
        client = _unb64(client_key_b64)
        if len(client) != 32:
            raise ValueError("reply key must be 32 bytes")
        nonce = os.urandom(12)
        sealed = self.aead(client, client, self.public).encrypt(nonce, body, reply.encode())
        return sealed, {H_SEALED: f"{self.public_b64}.{_b64(nonce)}"}


class Opener(_Party):
    """The client side: one key per connection."""

    def open(self, header: str, reply: str, sealed: bytes) -> bytes:
        try:
            service_b64, nonce_b64 = header.split(".")
            service = _unb64(service_b64)
            aead = self.aead(service, self.public, service)
            return aead.decrypt(_unb64(nonce_b64), sealed, reply.encode())
        except (ValueError, InvalidTag) as exc:
            raise Internal(f"a sealed reply could not be opened: {type(exc).__name__}") from None


async def respond(nc: Any, msg: Msg, body: bytes, sealer: Sealer) -> None:
    """Answer a request: only to an inbox, sealed when the client sent a key."""
    reply = msg.reply
    if not reply_allowed(reply):
        return
    headers = None
    client_key = (msg.headers or {}).get(H_REPLY_KEY)
    if client_key:
        try:
            body, headers = sealer.seal(client_key, reply, body)
        except ValueError:
            # A broken key gets a plain refusal, which reveals nothing.
            body = msgspec.json.encode(
                Reply(ok=False, error=Invalid(f"bad {H_REPLY_KEY} header").to_wire())
            )
    with contextlib.suppress(Exception):
        await nc.publish(reply, body, headers=headers)
