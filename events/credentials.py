"""Service credentials on the log: issued and revoked.

A service credential is a token (``credential.issued`` carries its id, not
the token) that admits one service of one kind (for one host) to the
broker; ``stratus credentials issue`` writes it into a credentials file.
It lives on ``ev._system.credential.<id>``. Revoking it
(``credential.revoked``) makes every verifier refuse the token until it
would have expired anyway, and the auth callout cuts its connections.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

from stratus.events.commands import Command
from stratus.events.identity import Name, TokenId
from stratus.events.model import Event

CREDENTIAL = "credential"
# Longest a credential may be issued for (days).
MAX_TTL_DAYS = 3660

Kind = Annotated[str, msgspec.Meta(pattern=r"^[a-z][a-z-]{0,31}(?!\n)$")]


class CredentialIssued(Event, frozen=True, tag="credential.issued"):
    # The service kind it admits (and the host, for an agent's).
    service: str
    host: str = ""
    expires_at: int = 0


class CredentialRevoked(Event, frozen=True, tag="credential.revoked"):
    # Until then verifiers remember the revocation; the token expires then.
    expires_at: int


EVENTS = (CredentialIssued, CredentialRevoked)


class CredentialIssue(Command, frozen=True):
    """A service credential of ``kind`` (for ``host``), valid ``ttl_days``."""

    kind: Kind
    host: Name | None = None
    ttl_days: Annotated[int, msgspec.Meta(ge=1, le=MAX_TTL_DAYS)] = 365


class CredentialRevoke(Command, frozen=True):
    id: TokenId


COMMANDS = {
    "credential.issue": CredentialIssue,
    "credential.revoke": CredentialRevoke,
}
