"""Integration credentials and webhook subscriptions: state, fold, decisions.

Both decide on the owning tenant's whole history (``ev.<tenant>.>``): the
tenant must exist and names are unique among its live integrations and
webhooks. Cloud-wide integrations decide on ``ev._system.integration.>``.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import bcrypt
import msgspec

from stratus.events.errors import AlreadyExists, Conflict, Forbidden, Invalid, NotFound
from stratus.events.ids import new_id
from stratus.events.integrations import (
    ALL_TENANTS,
    INTEGRATION,
    WEBHOOK,
    IntegrationConsumerReset,
    IntegrationCreate,
    IntegrationCreated,
    IntegrationCredential,
    IntegrationReset,
    IntegrationRevoke,
    IntegrationRevoked,
    WebhookCreate,
    WebhookCreated,
    WebhookDelete,
    WebhookDeleted,
)
from stratus.events.model import Cause, Event
from stratus.handlers.registry import Handler
from stratus.handlers.targets import TargetPolicy
from stratus.handlers.world import World, fold

SYSTEM = "_system"
# bcrypt's cost: nats-server checks it on every connect of the integration.
BCRYPT_ROUNDS = 10
WEBHOOK_MASTER = "webhook-master"


def _world(boundary: str, defaults: dict[str, int] | None) -> World:
    w = World(defaults)
    if boundary.startswith(f"ev.{SYSTEM}."):
        w.tenant, w.exists = SYSTEM, True  # the cloud itself: always there
    return w


def _live(w: World) -> bool:
    return w.exists and not w.deleted


def _named(w: World, kind: str, name: str) -> bool:
    return any(r.get("name") == name and r.get("status") != "revoked" for r in w.of(kind).values())


def _owner(cmd: Any) -> str:
    return SYSTEM if getattr(cmd, "all_tenants", False) else cmd.tenant


def _boundary(cmd: Any) -> str:
    owner = _owner(cmd)
    return f"ev.{SYSTEM}.{INTEGRATION}.>" if owner == SYSTEM else f"ev.{owner}.>"


# -- integrations ---------------------------------------------------------------


class IntegrationPlan(msgspec.Struct, frozen=True):
    name: str
    tenant: str
    all_tenants: bool
    id: str
    password_hash: str
    start_seq: int
    ack_wait_s: int


def filter_subject(tenant: str) -> str:
    return "ev.>" if tenant == ALL_TENANTS else f"ev.{tenant}.>"


def nats_user(integration_id: str) -> str:
    return f"integration-{integration_id}"


async def prepare_integration(cmd: IntegrationCreate, caller: Any, _svc: Any) -> IntegrationPlan:
    if cmd.all_tenants and not caller.is_cloud_admin:
        raise Forbidden("an all-tenants integration needs the cloud admin role")
    digest = await asyncio.to_thread(
        bcrypt.hashpw, cmd.secret.encode(), bcrypt.gensalt(BCRYPT_ROUNDS)
    )
    return IntegrationPlan(
        cmd.name,
        cmd.tenant or "",
        cmd.all_tenants,
        new_id(),
        digest.decode("ascii"),
        cmd.start_seq,
        cmd.ack_wait_s,
    )


def decide_integration_create(state: World, cmd: IntegrationPlan, cause: Cause) -> list[Event]:
    if not _live(state):
        raise NotFound(f"tenant {cmd.tenant} not found")
    if _named(state, INTEGRATION, cmd.name):
        raise AlreadyExists(f"integration {cmd.name} already exists")
    owner = _owner(cmd)
    scope = ALL_TENANTS if cmd.all_tenants else cmd.tenant
    return [
        cause.make(
            IntegrationCreated,
            owner,
            INTEGRATION,
            cmd.id,
            name=cmd.name,
            filter_subject=filter_subject(scope),
            user=nats_user(cmd.id),
            start_seq=cmd.start_seq,
            ack_wait_s=cmd.ack_wait_s,
        ),
        cause.make(
            IntegrationCredential, owner, INTEGRATION, cmd.id, password_hash=cmd.password_hash
        ),
    ]


def _find_integration(state: World, ref: str) -> dict:
    items = state.of(INTEGRATION)
    e = items.get(ref)
    if e is None:
        named = [r for r in items.values() if r.get("name") == ref]
        # A revoked one keeps its name; the live one (if any) is meant.
        live = [r for r in named if r.get("status") != "revoked"]
        e = (live or named or [None])[0]
    if e is None:
        raise NotFound(f"integration {ref} not found")
    return e


def decide_integration_revoke(state: World, cmd: IntegrationRevoke, cause: Cause) -> list[Event]:
    e = _find_integration(state, cmd.ref)
    if e.get("status") == "revoked":
        return []
    return [cause.make(IntegrationRevoked, _owner(cmd), INTEGRATION, e["id"])]


def decide_integration_reset(state: World, cmd: IntegrationReset, cause: Cause) -> list[Event]:
    """Stratus re-makes the consumer (``natsauth``): the credential itself
    may not create or delete one, whose body could name a push target."""
    e = _find_integration(state, cmd.ref)
    if e.get("status") == "revoked":
        raise Conflict(f"integration {e['name']} is revoked")
    return [
        cause.make(
            IntegrationConsumerReset, _owner(cmd), INTEGRATION, e["id"], start_seq=cmd.start_seq
        )
    ]


def integration_result(_state: World, events: list[Event]) -> dict | None:
    for e in events:
        if isinstance(e, IntegrationCreated):
            return {
                "id": e.aggregate.id,
                "name": e.name,
                "tenant": e.tenant,
                "user": e.user,
                "filter_subject": e.filter_subject,
                "start_seq": e.start_seq,
                "ack_wait_s": e.ack_wait_s,
            }
        if isinstance(e, IntegrationRevoked):
            return {"id": e.aggregate.id, "status": "revoked"}
        if isinstance(e, IntegrationConsumerReset):
            return {"id": e.aggregate.id, "status": "reset", "start_seq": e.start_seq}
    return None


# -- webhooks -------------------------------------------------------------------


class WebhookPlan(msgspec.Struct, frozen=True):
    name: str
    url: str
    types: list[str]
    tenant: str
    id: str


def check_url(url: str) -> str:
    """An http(s) URL with a host; anything else is refused before any event."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises on a malformed port
    except ValueError as exc:
        raise Invalid(f"webhook url {url!r}: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise Invalid(f"webhook url must be http or https, not {parts.scheme or 'schemeless'!r}")
    if not parts.hostname:
        raise Invalid(f"webhook url {url!r} has no host")
    if any(c.isspace() for c in url):
        raise Invalid("webhook url must not contain white space")
    return url


def prepare_webhook(policy: TargetPolicy) -> Any:
    async def prepare(cmd: WebhookCreate, _caller: Any, _svc: Any) -> WebhookPlan:
        check_url(cmd.url)
        policy.check_url(cmd.url)
        return WebhookPlan(cmd.name, cmd.url, list(cmd.types), cmd.tenant or "", new_id())

    return prepare


def decide_webhook_create(state: World, cmd: WebhookPlan, cause: Cause) -> list[Event]:
    if not _live(state):
        raise NotFound(f"tenant {cmd.tenant} not found")
    if _named(state, WEBHOOK, cmd.name):
        raise AlreadyExists(f"webhook {cmd.name} already exists")
    return [
        cause.make(
            WebhookCreated, cmd.tenant, WEBHOOK, cmd.id, name=cmd.name, url=cmd.url, types=cmd.types
        )
    ]


def decide_webhook_delete(state: World, cmd: WebhookDelete, cause: Cause) -> list[Event]:
    e = state.find(WEBHOOK, cmd.ref)
    return [cause.make(WebhookDeleted, cmd.tenant, WEBHOOK, e["id"])]


class WebhookKeys:
    """Derives each webhook's HMAC secret from one master key.

    The master lives beside the token signing keys (mode 0600), so the
    secret is shown once at creation, never stored on the log, and any
    process with the key directory (handlers, the delivery service) derives
    the same secret.
    """

    def __init__(self, master: bytes) -> None:
        self._master = master

    @classmethod
    def load_or_create(cls, directory: Path) -> WebhookKeys:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = directory / WEBHOOK_MASTER
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        else:
            with os.fdopen(fd, "wb") as f:
                f.write(os.urandom(32).hex().encode())
        return cls(path.read_bytes().strip())

    @property
    def master(self) -> bytes:
        """The master key as kept (what a credentials file hands over)."""
        return self._master

    def secret(self, webhook_id: str) -> str:
        mac = hmac.new(self._master, b"webhook:" + webhook_id.encode(), hashlib.sha256)
        return "whsec_" + mac.hexdigest()


def webhook_result(keys: WebhookKeys | None) -> Any:
    def result(_state: World, events: list[Event]) -> dict | None:
        for e in events:
            if isinstance(e, WebhookCreated):
                out = {
                    "id": e.aggregate.id,
                    "name": e.name,
                    "tenant": e.tenant,
                    "url": e.url,
                    "types": e.types,
                }
                if keys is not None:
                    out["secret"] = keys.secret(e.aggregate.id)
                return out
            if isinstance(e, WebhookDeleted):
                return {"id": e.aggregate.id, "status": "deleted"}
        return None

    return result


def _tenant_of(cmd: Any) -> str | None:
    return None if getattr(cmd, "all_tenants", False) else cmd.tenant


def handlers(
    keys: WebhookKeys | None = None,
    quota_defaults: dict[str, int] | None = None,
    webhook_policy: TargetPolicy | None = None,
) -> list[Handler]:
    """The tenant boundary is shared with the inventory handlers (one cached
    ``World`` per tenant), so it is made with the same quota defaults.
    ``webhook_policy``: where webhooks may point (default: no internal address)."""

    def h(verb: str, command: type, decide: Any, **kw: Any) -> Handler:
        return Handler(
            verb=verb,
            command=command,
            permission=verb,
            boundary=_boundary,
            initial=lambda: World(quota_defaults),
            initial_for=lambda b: _world(b, quota_defaults),
            fold=fold,
            decide=decide,
            tenant_of=_tenant_of,
            **kw,
        )

    return [
        h(
            "integration.create",
            IntegrationCreate,
            decide_integration_create,
            prepare=prepare_integration,
            result=integration_result,
        ),
        h(
            "integration.revoke",
            IntegrationRevoke,
            decide_integration_revoke,
            result=integration_result,
        ),
        h(
            "integration.reset",
            IntegrationReset,
            decide_integration_reset,
            result=integration_result,
        ),
        h(
            "webhook.create",
            WebhookCreate,
            decide_webhook_create,
            prepare=prepare_webhook(webhook_policy or TargetPolicy()),
            result=webhook_result(keys),
        ),
        h("webhook.delete", WebhookDelete, decide_webhook_delete, result=webhook_result(keys)),
    ]
