"""Integration credentials as nats-server users, and their consumers, kept current from the log.

Why users in the server's own config, reloaded (SIGHUP), rather than auth
callout: the broker enforces every limit itself with plain subject
permissions, a bcrypt hash on the log is all it needs (no secret, no
signing keys for JWTs), and a reload re-checks every open connection, so a
revoked integration is disconnected at once.

What the credential may do, and why no more:

* Stratus makes each integration's durable consumer itself (named by the
  integration's id, filter ``ev.<tenant>.>``), delivering into the
  credential's own inbox prefix (``_INBOX_<id>.events``), which only it may
  subscribe to. The credential may not create or delete a consumer: a
  create request's body can name any ``deliver_subject`` (``_INBOX.x``,
  which every client connecting without credentials may read, or a command
  subject), and subject permissions cannot see bodies.
* It may not fetch (``CONSUMER.MSG.NEXT``) either: a fetch's reply subject
  is the requester's choice, JetStream delivers the events there, and
  permissions do not cover reply subjects, so a pull consumer could still
  be drained into ``_INBOX.x``. Moving integrations to an account of their
  own would map replies back into it, but every reload of a config with
  accounts drops the stream account's JetStream API for a moment (measured:
  12 refused API calls over 20 reloads, none without accounts), and a reload
  happens on every integration created or revoked.
* So it may only subscribe to its inbox prefix, ack
  (``$JS.ACK.EVENTS.<id>.>``) and read its consumer's info.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import msgspec
import nats.js.errors
import structlog
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from stratus.events.integrations import (
    ACK_WAIT_S,
    IntegrationConsumerReset,
    IntegrationCreated,
    IntegrationCredential,
    IntegrationRevoked,
)
from stratus.events.store import STREAM, EventStore
from stratus.events.tasks import cancel

log = structlog.get_logger("stratus.natsauth")

SUBJECTS = ("ev.*.integration.>",)
# Events delivered and not yet acknowledged, at most (the push consumer's window).
MAX_ACK_PENDING = 1000
# Consumer metadata: the event that last (re)made it, so a restart re-makes
# nothing and a reset re-makes it exactly once.
GENERATION = "stratus_generation"
RETRY_S = 2.0


class Credential(msgspec.Struct):
    id: str
    user: str
    filter_subject: str
    password_hash: str = ""
    live: bool = True
    start_seq: int = 1
    ack_wait_s: int = ACK_WAIT_S
    generation: str = ""


def inbox_prefix(integration_id: str) -> str:
    return f"_INBOX_{integration_id}"


def deliver_subject(integration_id: str) -> str:
    """Where its consumer delivers: under the inbox prefix only it may read."""
    return f"{inbox_prefix(integration_id)}.events"


def permissions(c: Credential) -> dict[str, Any]:
    return {
        "publish": {
            "allow": [
                f"$JS.API.CONSUMER.INFO.{STREAM}.{c.id}",
                f"$JS.ACK.{STREAM}.{c.id}.>",
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
    """Apply one event; True when the users or a consumer must change."""
    iid = event.aggregate.id
    if isinstance(event, IntegrationCreated):
        creds[iid] = Credential(
            iid,
            event.user,
            event.filter_subject,
            start_seq=event.start_seq,
            ack_wait_s=event.ack_wait_s,
            generation=event.id,
        )
        return False  # usable once its credential lands (same batch)
    c = creds.get(iid)
    if c is None:
        return False
    if isinstance(event, IntegrationCredential):
        c.password_hash = event.password_hash
        return c.live
    if isinstance(event, IntegrationConsumerReset) and c.live:
        c.start_seq, c.generation = event.start_seq, event.id
        return True
    if isinstance(event, IntegrationRevoked) and c.live:
        c.live = False
        return True
    return False


def consumer_config(c: Credential, start_seq: int) -> ConsumerConfig:
    return ConsumerConfig(
        name=c.id,
        durable_name=c.id,
        filter_subject=c.filter_subject,
        deliver_subject=deliver_subject(c.id),
        deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
        opt_start_seq=start_seq,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=c.ack_wait_s,
        max_ack_pending=MAX_ACK_PENDING,
        metadata={GENERATION: c.generation},
    )


async def ensure_consumer(js: Any, c: Credential) -> bool:
    """Make ``c``'s pull consumer unless the one there is of its generation;
    True when it made one."""
    info: Any = None
    with contextlib.suppress(nats.js.errors.NotFoundError):
        info = await js.consumer_info(STREAM, c.id)
    start = c.start_seq
    if info is not None:
        meta = info.config.metadata or {}
        if meta.get(GENERATION) == c.generation and info.config.deliver_subject == deliver_subject(
            c.id
        ):
            return False
        if GENERATION not in meta:
            # Made by the credential itself (before Stratus made them): keep
            # its position, drop whatever it was configured to do (a push
            # consumer delivering anywhere, say).
            start = max(start, info.ack_floor.stream_seq + 1)
        await js.delete_consumer(STREAM, c.id)
    await js.add_consumer(STREAM, consumer_config(c, start))
    log.info("integration consumer made", integration=c.id, start_seq=start)
    return True


async def delete_consumer(js: Any, integration_id: str) -> None:
    with contextlib.suppress(nats.js.errors.NotFoundError):
        await js.delete_consumer(STREAM, integration_id)


class IntegrationAuth:
    """Follows integration events: makes their consumers and hands the
    broker its users.

    ``apply(users)`` rewrites the server's config and reloads it; it runs
    once after catching up and then after every change. A new integration's
    consumer is made before its user exists, and a revoked one's is deleted
    after its user is gone, so a credential never finds itself without one.
    """

    def __init__(self, store: EventStore, apply: Callable[[dict[str, Any]], Any]) -> None:
        self.store = store
        self.apply = apply
        self.creds: dict[str, Credential] = {}
        self.seq = 0
        self._task: asyncio.Task[None] | None = None
        self._retry: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        self._lock = asyncio.Lock()
        # integration id -> the generation its consumer has ("" once deleted)
        self._consumers: dict[str, str] = {}
        self.reloads = 0

    async def start(self, timeout: float = 30.0) -> None:
        self._task = asyncio.create_task(self._run())
        await asyncio.wait_for(self._ready.wait(), timeout)

    async def _sync_consumers(self, live: bool) -> bool:
        """Make (``live``) or delete (not) the consumers that differ; False if one failed."""
        ok = True
        for c in list(self.creds.values()):
            if c.live != live or (live and not c.password_hash):
                continue
            want = c.generation if live else ""
            if self._consumers.get(c.id) == want:
                continue
            try:
                if live:
                    await ensure_consumer(self.store.js, c)
                else:
                    await delete_consumer(self.store.js, c.id)
            except Exception as exc:
                ok = False
                log.warning("integration consumer not synced", integration=c.id, error=str(exc))
                continue
            self._consumers[c.id] = want
        return ok

    async def _push(self) -> None:
        async with self._lock:
            ok = await self._sync_consumers(live=True)
            result = self.apply(nats_users(self.creds))
            if asyncio.iscoroutine(result):
                await result
            self.reloads += 1
            ok = await self._sync_consumers(live=False) and ok
        if not ok and (self._retry is None or self._retry.done()):
            self._retry = asyncio.create_task(self._again())

    async def _again(self) -> None:
        await asyncio.sleep(RETRY_S)
        await self._push()

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
        for task in (self._retry, self._task):
            if task is not None:
                await cancel(task)
        self._task = self._retry = None
