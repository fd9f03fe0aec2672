"""Integration credentials as nats-server users, kept current from the log.

Why users in the server's own config, reloaded (SIGHUP), rather than auth
callout: the broker enforces every limit itself with plain subject
permissions, a bcrypt hash on the log is all it needs (no secret, no
signing keys for JWTs), and a reload re-checks every open connection, so a
revoked integration is disconnected at once. The permissions allow exactly
the JetStream API subjects of one durable consumer (named by the
integration's id) whose filter is within ``ev.<tenant>.>`` — the filter is
part of the create subject, and the server refuses a body whose filter
differs — plus a private inbox prefix, so one integration cannot read
another's deliveries.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import msgspec
import structlog

from stratus.events.integrations import (
    IntegrationCreated,
    IntegrationCredential,
    IntegrationRevoked,
)
from stratus.events.store import STREAM, EventStore
from stratus.events.tasks import cancel

log = structlog.get_logger("stratus.natsauth")

SUBJECTS = ("ev.*.integration.>",)


class Credential(msgspec.Struct):
    id: str
    user: str
    filter_subject: str
    password_hash: str = ""
    live: bool = True


def inbox_prefix(integration_id: str) -> str:
    return f"_INBOX_{integration_id}"


def permissions(c: Credential) -> dict[str, Any]:
    durable = c.id
    api = "$JS.API.CONSUMER"
    return {
        "publish": {
            "allow": [
                # The filter is the create subject's tail: `>` admits any
                # narrower filter within the tenant, nothing outside it.
                f"{api}.CREATE.{STREAM}.{durable}.{c.filter_subject}",
                f"{api}.INFO.{STREAM}.{durable}",
                f"{api}.DELETE.{STREAM}.{durable}",
                f"{api}.MSG.NEXT.{STREAM}.{durable}",
                f"$JS.ACK.{STREAM}.{durable}.>",
            ]
        },
        "subscribe": {"allow": [f"{inbox_prefix(c.id)}.>"]},
    }


def nats_users(creds: dict[str, Credential]) -> list[dict[str, Any]]:
    """The ``authorization.users`` entries of every live integration."""
    return [
        {"user": c.user, "password": c.password_hash, "permissions": permissions(c)}
        for c in creds.values()
        if c.live and c.password_hash
    ]


def fold(creds: dict[str, Credential], event: Any) -> bool:
    """Apply one event; True when the set of users changed."""
    iid = event.aggregate.id
    if isinstance(event, IntegrationCreated):
        creds[iid] = Credential(iid, event.user, event.filter_subject)
        return False  # usable once its credential lands (same batch)
    c = creds.get(iid)
    if c is None:
        return False
    if isinstance(event, IntegrationCredential):
        c.password_hash = event.password_hash
        return c.live
    if isinstance(event, IntegrationRevoked) and c.live:
        c.live = False
        return True
    return False


class IntegrationAuth:
    """Follows integration events and hands the broker its new users.

    ``apply(users)`` rewrites the server's config and reloads it; it runs
    once after catching up and then after every change.
    """

    def __init__(self, store: EventStore, apply: Callable[[list[dict[str, Any]]], Any]) -> None:
        self.store = store
        self.apply = apply
        self.creds: dict[str, Credential] = {}
        self.seq = 0
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        self.reloads = 0

    async def start(self, timeout: float = 30.0) -> None:
        self._task = asyncio.create_task(self._run())
        await asyncio.wait_for(self._ready.wait(), timeout)

    async def _push(self) -> None:
        result = self.apply(nats_users(self.creds))
        if asyncio.iscoroutine(result):
            await result
        self.reloads += 1

    async def _run(self) -> None:
        target = await self.store.last_seq(SUBJECTS[0])
        if target == 0:
            await self._push()
            self._ready.set()
        changed = False
        async with contextlib.aclosing(self.store.subscribe(self.seq, SUBJECTS)) as batches:
            async for batch in batches:
                changed = await self._apply(batch, target, changed)

    async def _apply(self, batch: list[Any], target: int, changed: bool) -> bool:
        for r in batch:
            self.seq = r.seq
            try:
                changed |= fold(self.creds, r.decode())
            except Exception:
                log.warning("undecodable integration event", seq=r.seq)
        if not self._ready.is_set() and self.seq < target:
            return changed
        if changed or not self._ready.is_set():
            await self._push()
            self._ready.set()
        return False

    async def stop(self) -> None:
        if self._task is not None:
            await cancel(self._task)
            self._task = None
