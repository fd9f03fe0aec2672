"""Authenticating requests: bearer tokens verified locally, revocations from the log.

Every service that serves requests runs an ``IdentityFeed``: it reads the
signing keys and every revocation from the log at start, then follows the
log, so a verifier needs no call to another service and honours a
revocation as soon as the event reaches it (milliseconds on one broker).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import structlog

from stratus.events.commands import H_AUTHORIZATION
from stratus.events.credentials import CREDENTIAL, CredentialRevoked
from stratus.events.errors import Unauthenticated
from stratus.events.identity import (
    KEY,
    ROLE,
    SYSTEM,
    TOKEN,
    USER,
    RoleDefined,
    RoleRevoked,
    SigningKeyAdded,
    TokenRevoked,
    UserDisabled,
    UserTokensRevoked,
)
from stratus.events.model import Event
from stratus.events.store import EventStore
from stratus.events.tasks import cancel
from stratus.handlers.rbac import Caller, RoleBook
from stratus.handlers.tokens import Verifier

log = structlog.get_logger("stratus.auth")

FEED_SUBJECTS = (
    f"ev.{SYSTEM}.{KEY}.*",
    f"ev.{SYSTEM}.{TOKEN}.*",
    f"ev.{SYSTEM}.{USER}.*",
    f"ev.{SYSTEM}.{ROLE}.*",
    f"ev.{SYSTEM}.{CREDENTIAL}.*",
)


def bearer(headers: dict[str, str]) -> str:
    value = headers.get(H_AUTHORIZATION, "")
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated("no bearer token: log in with `stratus login`")
    return token.strip()


class Authenticator:
    """Headers -> ``Caller``, or ``Unauthenticated``."""

    def __init__(self, verifier: Verifier) -> None:
        self.verifier = verifier

    def __call__(self, headers: dict[str, str]) -> Caller:
        p = self.verifier.verify(bearer(headers))
        if p.service:
            # It admits a service to the broker; it speaks for no one.
            raise Unauthenticated(
                f"a {p.service} credential's token cannot send requests: log in as a user"
            )
        return Caller(
            user=p.user,
            tenant=p.tenant,
            roles=tuple(p.roles),
            token_id=p.token_id,
            expires_at=p.expires_at,
        )


def apply_identity_event(verifier: Verifier, event: Event, book: RoleBook | None = None) -> None:
    """Fold one event into what a verifier (and the role book) must know."""
    at = event.at.timestamp()
    match event:
        case SigningKeyAdded():
            verifier.add_public_key(event.kid, event.public_key)
        case TokenRevoked() | CredentialRevoked():
            verifier.revoke_token(event.aggregate.id, event.expires_at)
        case UserTokensRevoked() | UserDisabled():
            verifier.revoke_user(event.aggregate.id, at)
        case RoleRevoked():
            verifier.revoke_assignment(event.user, event.role_tenant, at)
        case RoleDefined() if book is not None:
            book.define(event.name, event.permissions)


class IdentityFeed:
    """``on_event(event)``: called after each identity event is applied (the
    auth callout cuts the connections a revocation voids)."""

    def __init__(
        self,
        store: EventStore,
        verifier: Verifier,
        book: RoleBook | None = None,
        on_event: Callable[[Event], None] | None = None,
    ) -> None:
        self.store = store
        self.verifier = verifier
        self.book = book
        self.on_event = on_event
        self.position = 0
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Catch up with the log, then follow it in the background."""
        async for batch in self.store.read(subjects=FEED_SUBJECTS):
            self._apply(batch)
        self._task = asyncio.create_task(self._follow())

    def _apply(self, batch: list) -> None:
        for rec in batch:
            try:
                event = rec.decode(self.store.codec)
                apply_identity_event(self.verifier, event, self.book)
                if self.on_event is not None:
                    self.on_event(event)
            except Exception as exc:  # a poison event must not stop authentication
                log.warning("identity event skipped", seq=rec.seq, error=str(exc))
            self.position = rec.seq

    async def _follow(self) -> None:
        while True:
            try:
                async for batch in self.store.subscribe(
                    after=self.position, subjects=FEED_SUBJECTS
                ):
                    self._apply(batch)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("identity feed broke; resuming")
                await asyncio.sleep(0.5)

    async def stop(self) -> None:
        if self._task is not None:
            await cancel(self._task)  # (it follows the log: ``events.tasks``)
            self._task = None
