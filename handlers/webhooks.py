"""The webhook delivery service (``stratus serve webhooks``; ``stratus up`` runs one).

Each subscription gets its own worker: a durable JetStream consumer on its
tenant's events (``webhook-<id>``, from the event after its creation), one
HTTP session and one event in hand at a time, so events reach a receiver in
log order and a slow or hanging receiver holds up only its own worker (every
POST has a timeout). A failed POST is retried with exponential backoff; after
``max_attempts`` the event is dead-lettered and the worker moves on. The
event is acknowledged only after that, so a crash mid-delivery redelivers it:
delivery is at least once and receivers dedupe on the CloudEvent ``id``.

Attempts and outcomes are kept in the KV bucket ``WEBHOOK_DELIVERIES``
(key ``<webhook>.<seq>``), which ``q.webhook-deliveries`` reads.

aiohttp rather than raw asyncio streams: connection reuse per subscription,
TLS for https receivers, and a total timeout that covers connect, send and
a receiver that never answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import json
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Annotated, Any

import aiohttp
import msgspec
import nats.errors
import nats.js.errors
import structlog
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, KeyValueConfig, StorageType

from stratus.events import cloudevents
from stratus.events.errors import NotFound
from stratus.events.integrations import WEBHOOK, WebhookCreated, WebhookDeleted
from stratus.events.resources import REF_PATTERN
from stratus.events.store import STREAM, EventStore
from stratus.events.tasks import cancel
from stratus.handlers.integrations import WebhookKeys

log = structlog.get_logger("stratus.webhooks")

BUCKET = "WEBHOOK_DELIVERIES"
SUBJECTS = ("ev.*.webhook.>",)
MAX_ATTEMPTS = 8
BACKOFF_S = 0.5
BACKOFF_MAX_S = 60.0
TIMEOUT_S = 10.0
FETCH = 256
RECORDS_IN_FLIGHT = 512
# Deliveries are kept this long (the bucket's max age).
KEEP_S = 7 * 24 * 3600


def consumer_name(webhook_id: str) -> str:
    return f"webhook-{webhook_id}"


def matches(patterns: list[str], event_type: str) -> bool:
    return any(fnmatch.fnmatchcase(event_type, p) for p in patterns)


def backoff(attempt: int, base: float, cap: float) -> float:
    """Seconds before retry ``attempt`` + 1: base, 2·base, 4·base, ... up to cap."""
    return min(cap, base * 2 ** (attempt - 1))


class Subscription(msgspec.Struct):
    id: str
    tenant: str
    url: str
    types: list[str]
    created_seq: int


class Delivery(msgspec.Struct):
    """One event's delivery to one subscription, as ``webhook deliveries`` shows it."""

    seq: int
    event_id: str
    type: str
    status: str = "pending"  # pending, retrying, delivered, dead
    attempts: int = 0
    last_status: int | None = None
    last_error: str = ""
    at: str = ""
    latency_ms: float | None = None


class Worker:
    def __init__(self, svc: WebhookService, sub: Subscription) -> None:
        self.svc = svc
        self.sub = sub
        self.secret = svc.keys.secret(sub.id)
        self.task: asyncio.Task[None] | None = None
        self.delivered = 0

    def start(self) -> None:
        self.task = asyncio.create_task(self._run(), name=f"webhook-{self.sub.id}")

    async def stop(self) -> None:
        if self.task is not None:
            await cancel(self.task)
            self.task = None

    async def _consumer(self) -> Any:
        """Bind to the subscription's durable consumer, made on first use.

        Events still unacknowledged from an earlier run (a crash mid-batch)
        are sent again at once: the consumer is made anew from its ack floor
        rather than waiting out the ack timeout.
        """
        js = self.svc.store.js
        name = consumer_name(self.sub.id)
        start = self.sub.created_seq + 1
        info: Any = None
        with contextlib.suppress(nats.js.errors.NotFoundError):
            info = await js.consumer_info(STREAM, name)
        if info is not None and info.num_ack_pending:
            start = max(start, info.ack_floor.stream_seq + 1)
            await js.delete_consumer(STREAM, name)
            info = None
        if info is None:
            config = ConsumerConfig(
                name=name,
                durable_name=name,
                filter_subject=f"ev.{self.sub.tenant}.>",
                deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                opt_start_seq=start,
                ack_policy=AckPolicy.EXPLICIT,
                # Longer than any retry schedule: a restart, not this, resends.
                ack_wait=3600,
                max_ack_pending=FETCH,
            )
            await js.add_consumer(STREAM, config)
        return await js.pull_subscribe_bind(durable=name, stream=STREAM)

    async def _run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=self.svc.timeout_s)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            while True:
                psub: Any = None
                try:
                    psub = await self._consumer()
                    while True:
                        try:
                            msgs = await psub.fetch(FETCH, timeout=5)
                        except (nats.errors.TimeoutError, TimeoutError):
                            continue
                        for m in msgs:
                            await self._deliver(http, m)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    log.warning("webhook worker restarting", webhook=self.sub.id, error=str(exc))
                    await asyncio.sleep(1)
                finally:
                    # A subscription left behind would hold the connection's drain.
                    if psub is not None:
                        with contextlib.suppress(Exception):
                            await psub.unsubscribe()

    async def _deliver(self, http: aiohttp.ClientSession, m: Any) -> None:
        seq = m.metadata.sequence.stream
        try:
            event = self.svc.store.codec.decode(m.data)
        except Exception:
            await m.ack()  # not ours to judge: the projector quarantines it
            return
        if not matches(self.sub.types, event.type_name()):
            await m.ack()
            return
        body = cloudevents.encode(cloudevents.to_cloudevent(event, seq))
        d = Delivery(seq=seq, event_id=event.id, type=event.type_name())
        appended = m.metadata.timestamp
        while True:
            d.attempts += 1
            headers = {
                "Content-Type": cloudevents.CONTENT_TYPE,
                cloudevents.H_SIGNATURE: cloudevents.sign(self.secret, body),
                cloudevents.H_WEBHOOK: self.sub.id,
                cloudevents.H_ATTEMPT: str(d.attempts),
            }
            try:
                async with http.post(self.sub.url, data=body, headers=headers) as resp:
                    await resp.read()
                    d.last_status = resp.status
                    ok = 200 <= resp.status < 300
                    d.last_error = "" if ok else f"HTTP {resp.status}"
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                ok = False
                d.last_status = None
                d.last_error = f"{type(exc).__name__}: {exc}"[:300] or type(exc).__name__
            d.at = datetime.now(UTC).isoformat()
            if ok:
                d.status = "delivered"
                if appended is not None:
                    d.latency_ms = round((time.time() - appended.timestamp()) * 1000, 2)
                break
            if d.attempts >= self.svc.max_attempts:
                d.status = "dead"
                log.warning(
                    "webhook dead-lettered", webhook=self.sub.id, seq=seq, error=d.last_error
                )
                break
            d.status = "retrying"
            await self.svc.record(self.sub.id, d)
            with contextlib.suppress(Exception):
                await m.in_progress()
            await asyncio.sleep(backoff(d.attempts, self.svc.backoff_s, self.svc.backoff_max_s))
        await self.svc.record(self.sub.id, d)
        await m.ack()
        self.delivered += 1


class WebhookService:
    """Follows webhook subscriptions on the log and runs one worker each."""

    def __init__(
        self,
        store: EventStore,
        keys: WebhookKeys,
        *,
        max_attempts: int = MAX_ATTEMPTS,
        backoff_s: float = BACKOFF_S,
        backoff_max_s: float = BACKOFF_MAX_S,
        timeout_s: float = TIMEOUT_S,
    ) -> None:
        self.store = store
        self.keys = keys
        self.max_attempts = max_attempts
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self.timeout_s = timeout_s
        self.workers: dict[str, Worker] = {}
        self.kv: Any = None
        self._task: asyncio.Task[None] | None = None
        self._enc = msgspec.json.Encoder()
        self._records: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self.kv = await deliveries_bucket(self.store)
        self._task = asyncio.create_task(self._follow())

    async def record(self, webhook_id: str, d: Delivery) -> None:
        """Save the delivery's state without waiting for the write.

        Awaiting each KV put (an fsync on a ``sync_interval: always``
        broker) would cap every subscription at a few hundred events a
        second; the writes are pipelined instead, at most RECORDS_IN_FLIGHT
        at a time.
        """
        while len(self._records) >= RECORDS_IN_FLIGHT:
            await asyncio.wait(self._records, return_when=asyncio.FIRST_COMPLETED)
        t = asyncio.create_task(self._put(webhook_id, d.seq, self._enc.encode(d)))
        self._records.add(t)
        t.add_done_callback(self._records.discard)

    async def _put(self, webhook_id: str, seq: int, value: bytes) -> None:
        try:
            await self.kv.put(f"{webhook_id}.{seq}", value)
        except Exception as exc:  # the delivery itself counts more than its record
            log.warning("delivery not recorded", webhook=webhook_id, seq=seq, error=str(exc))

    async def _follow(self) -> None:
        async with contextlib.aclosing(self.store.subscribe(0, SUBJECTS)) as batches:
            async for batch in batches:
                await self._apply(batch)

    async def _apply(self, batch: list[Any]) -> None:
        for r in batch:
            try:
                event = r.decode()
            except Exception:
                continue
            wid = event.aggregate.id
            if isinstance(event, WebhookCreated) and wid not in self.workers:
                sub = Subscription(wid, event.tenant, event.url, list(event.types), r.seq)
                w = self.workers[wid] = Worker(self, sub)
                w.start()
            elif isinstance(event, WebhookDeleted):
                w = self.workers.pop(wid, None)
                if w is not None:
                    await w.stop()
                with contextlib.suppress(Exception):
                    await self.store.js.delete_consumer(STREAM, consumer_name(wid))

    async def stop(self) -> None:
        if self._task is not None:
            await cancel(self._task)
            self._task = None
        await asyncio.gather(*(w.stop() for w in self.workers.values()))
        self.workers.clear()
        if self._records:
            await asyncio.wait(self._records, timeout=5)


async def deliveries_bucket(store: EventStore) -> Any:
    js = store.js
    try:
        return await js.key_value(BUCKET)
    except nats.js.errors.BucketNotFoundError:
        return await js.create_key_value(
            KeyValueConfig(bucket=BUCKET, history=1, ttl=KEEP_S, storage=StorageType.FILE)
        )


# -- the query: q.webhook-deliveries ------------------------------------------------


class DeliveriesQuery(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    ref: Annotated[str, msgspec.Meta(pattern=REF_PATTERN, max_length=64)]
    tenant: str | None = None
    status: str | None = None
    limit: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 100


async def read_deliveries(store: EventStore, webhook_id: str, limit: int) -> list[dict]:
    """The latest record of each event delivered to ``webhook_id``, in log order."""
    kv = await deliveries_bucket(store)
    out: list[dict] = []
    watcher = await kv.watch(f"{webhook_id}.>")
    try:
        for _ in range(1_000_000):
            entry = await watcher.updates(timeout=5)
            if entry is None:
                break
            if entry.value:
                out.append(json.loads(entry.value))
            if entry.delta == 0:
                break
    finally:
        with contextlib.suppress(Exception):
            await watcher.stop()
    out.sort(key=lambda d: d["seq"])
    return out[-limit:]


def register_query(queries: Any, store: EventStore) -> None:
    """Add ``q.webhook-deliveries`` to a QueryService (permission ``webhook.read``)."""
    from stratus.projections import resources
    from stratus.projections.query import Route

    async def run(caller: Any, p: DeliveriesQuery, point: Any) -> list[dict]:
        tenants = (
            None if (caller.is_cloud_admin and p.tenant is None) else [p.tenant or caller.tenant]
        )
        async with point.engine.connect() as conn:
            row = await resources.find_row(conn, WEBHOOK, p.ref, tenants)
        if row is None:
            raise NotFound(f"webhook {p.ref} not found")
        rows = await read_deliveries(store, row["id"], p.limit)
        if p.status:
            rows = [r for r in rows if r["status"] == p.status]
        return rows

    tenant_of: Callable[[Any], str | None] = lambda p: p.tenant  # noqa: E731
    queries.routes["webhook-deliveries"] = Route(DeliveriesQuery, run, "webhook.read", tenant_of)
