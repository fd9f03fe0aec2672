"""Integration credentials and webhook subscriptions: events and commands.

An integration is a NATS user that the broker itself confines to consuming
one tenant's events (``ev.<tenant>.>``) or, for a cloud-wide one (a SIEM),
all of them, through one durable pull consumer that Stratus makes for it
(``integration.created`` says how; ``integration.consumer-reset`` re-makes
it at another start). It lives on ``ev.<tenant>.integration.<id>``
(cloud-wide ones in ``_system``). Its secret never reaches the log: the
creating batch carries only a bcrypt hash, in a separate event that no view
shows, which is what nats-server checks a password against.

A webhook subscription lives on ``ev.<tenant>.webhook.<id>``; its signing
secret is derived from a key kept beside the signing keys (never on the log).
"""

from __future__ import annotations

from typing import Annotated

import msgspec

from stratus.events.commands import Command
from stratus.events.ids import NAME_RE
from stratus.events.model import Event
from stratus.events.resources import REF_PATTERN, ResourceEvent

INTEGRATION = "integration"
WEBHOOK = "webhook"
ALL_TENANTS = "*"

Name = Annotated[str, msgspec.Meta(pattern=NAME_RE.pattern, max_length=63)]
Ref = Annotated[str, msgspec.Meta(pattern=REF_PATTERN, max_length=64)]
# The CLI makes it (token_urlsafe(32)); only its bcrypt hash is kept.
Secret = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{32,128}(?!\n)$")]
Url = Annotated[str, msgspec.Meta(min_length=8, max_length=2048)]
# How long the integration's consumer waits for an ack before redelivering.
AckWait = Annotated[int, msgspec.Meta(ge=1, le=3600)]
ACK_WAIT_S = 30
# A stream sequence to start the consumer at.
StartSeq = Annotated[int, msgspec.Meta(ge=1)]
# Event-type patterns: ``server.*``, ``volume.attached``, ``*``.
TypePattern = Annotated[str, msgspec.Meta(pattern=r"^[a-z0-9_*-]+(\.[a-z0-9_*-]+)?(?!\n)$")]


class IntegrationCreated(ResourceEvent, frozen=True, tag="integration.created"):
    begins = True
    status = "active"
    name: str
    # What the credential may consume: ev.<tenant>.> or ev.>.
    filter_subject: str
    # The NATS user name; its one consumer is named by the integration id.
    user: str
    # The consumer Stratus makes: from this stream sequence, this ack wait.
    start_seq: int = 1
    ack_wait_s: int = ACK_WAIT_S


class IntegrationCredential(Event, frozen=True, tag="integration.credential"):
    """The bcrypt hash nats-server checks the integration's password against.

    Not a resource event, so no view (and no list) ever shows it.
    """

    password_hash: str


class IntegrationRevoked(ResourceEvent, frozen=True, tag="integration.revoked"):
    status = "revoked"


class IntegrationConsumerReset(ResourceEvent, frozen=True, tag="integration.consumer-reset"):
    """Stratus deletes the integration's consumer and makes it again at ``start_seq``."""

    start_seq: int


class WebhookCreated(ResourceEvent, frozen=True, tag="webhook.created"):
    begins = True
    status = "active"
    name: str
    url: str
    types: list[str]


class WebhookDeleted(ResourceEvent, frozen=True, tag="webhook.deleted"):
    ends = True


EVENTS = (
    IntegrationCreated,
    IntegrationCredential,
    IntegrationRevoked,
    IntegrationConsumerReset,
    WebhookCreated,
    WebhookDeleted,
)


class IntegrationCreate(Command, frozen=True):
    name: Name
    secret: Secret
    tenant: Name | None = None
    all_tenants: bool = False
    start_seq: StartSeq = 1
    ack_wait_s: AckWait = ACK_WAIT_S


class IntegrationRevoke(Command, frozen=True):
    ref: Ref
    tenant: Name | None = None
    all_tenants: bool = False


class IntegrationReset(Command, frozen=True):
    ref: Ref
    start_seq: StartSeq
    tenant: Name | None = None
    all_tenants: bool = False


class WebhookCreate(Command, frozen=True):
    name: Name
    url: Url
    types: Annotated[list[TypePattern], msgspec.Meta(min_length=1, max_length=32)]
    tenant: Name | None = None


class WebhookDelete(Command, frozen=True):
    ref: Ref
    tenant: Name | None = None


COMMANDS = {
    "integration.create": IntegrationCreate,
    "integration.revoke": IntegrationRevoke,
    "integration.reset": IntegrationReset,
    "webhook.create": WebhookCreate,
    "webhook.delete": WebhookDelete,
}
