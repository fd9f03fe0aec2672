"""The webhook delivery service (``stratus serve webhooks``; ``stratus up`` runs one).

Each subscription gets its own worker: a durable JetStream consumer on its
tenant's events (``webhook-<id>``, from the event after its creation), one
HTTP session and one event in hand at a time, so events reach a receiver in
log order and a slow or hanging receiver holds up only its own worker (every
POST has a timeout). A failed POST is retried with exponential backoff; after
``max_attempts`` the event is dead-lettered and the worker moves on. An
event is acknowledged only after that (an acknowledgement covers the events
before it, so one is sent for a run of them), so a crash mid-delivery
redelivers it: delivery is at least once and receivers dedupe on the
CloudEvent ``id``. Each event is decoded and made a CloudEvent once for all
the subscriptions that receive it.

Attempts and outcomes are kept in the KV bucket ``WEBHOOK_DELIVERIES``,
which ``q.webhook-deliveries`` reads: each subscription's records of the
last ``RECORDS_EVERY_S`` go in one entry (key ``<webhook>.<uuid>``, a JSON
list; one put per record would cost a stream write each, more than the
POST), and a later record of an event replaces an earlier one.

aiohttp rather than raw asyncio streams: connection reuse per subscription,
TLS for https receivers, and a total timeout that covers connect, send and
a receiver that never answers. Every connection goes through the target
policy (``handlers.targets``): a name is resolved by a resolver that hands
the client only allowed addresses, an address in the URL is checked before
the POST, and redirects are not followed (a 3xx is a failed attempt), so no
answer can send a delivery somewhere the policy would refuse.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import json
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Annotated, Any
from urllib.parse import urlsplit

import aiohttp
import msgspec
import nats.errors
import nats.js.errors
import structlog
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, KeyValueConfig, StorageType

from stratus.events import cloudevents
from stratus.events.cluster import log_replicas
from stratus.events.errors import NotFound
from stratus.events.ids import new_id
from stratus.events.integrations import WEBHOOK, WebhookCreated, WebhookDeleted
from stratus.events.resources import REF_PATTERN
from stratus.events.store import STREAM, EventStore
from stratus.events.tasks import cancel
from stratus.handlers.integrations import WebhookKeys
from stratus.handlers.targets import TargetPolicy, TargetRefused

log = structlog.get_logger("stratus.webhooks")

BUCKET = "WEBHOOK_DELIVERIES"
SUBJECTS = ("ev.*.webhook.>",)
MAX_ATTEMPTS = 8
BACKOFF_S = 0.5
BACKOFF_MAX_S = 60.0
TIMEOUT_S = 10.0
# Events the broker sends a subscription ahead of its acknowledgements.
WINDOW = 256
# Events delivered before one acknowledgement covers them (ack policy all),
# or how long without another event before it goes out.
ACK_EVERY = 32
ACK_IDLE_S = 0.25
HEARTBEAT_S = 5.0
RECORDS_IN_FLIGHT = 64
# How long delivery records gather before they are written (one entry per
# subscription): a write is a stream append, fsynced.
RECORDS_EVERY_S = 1.0
# Events rendered once for every subscription (decoded, as a CloudEvent).
RENDERED = 4096
# Deliveries are kept this long (the bucket's max age).
KEEP_S = 7 * 24 * 3600


def consumer_name(webhook_id: str) -> str:
    return f"webhook-{webhook_id}"


def ack_position(reply: str) -> tuple[int, int]:
    """(stream sequence, stored at in ns) of a JetStream delivery, from its
    acknowledgement subject ``$JS.ACK[.<domain>.<account>].<stream>.<consumer>
    .<delivered>.<stream seq>.<consumer seq>.<ns>.<pending>[.<token>]``: what
    ``Msg.metadata`` gives, without building it for every event."""
    tokens = reply.split(".")
    at = 5 if len(tokens) == 9 else 7
    return int(tokens[at]), int(tokens[at + 2])


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


class _Flow:
    """A worker's acknowledgements. One covers every event before it (each
    has its outcome by then), so one goes out after ``ACK_EVERY`` events,
    after an event that needed retries, and ``ACK_IDLE_S`` after the last
    one at most; a crash resends no more than that."""

    def __init__(self) -> None:
        self.last: Any = None
        self.unacked = 0
        self.acked = self.heard = time.monotonic()
        self.failed: BaseException | None = None

    async def ack(self) -> None:
        last, self.last, self.unacked = self.last, None, 0
        self.acked = time.monotonic()
        if last is not None:
            await last.ack()


class Worker:
    def __init__(self, svc: WebhookService, sub: Subscription) -> None:
        self.svc = svc
        self.sub = sub
        self.sign = cloudevents.Signer(svc.keys.secret(sub.id))
        self.headers = {
            "Content-Type": cloudevents.CONTENT_TYPE,
            cloudevents.H_WEBHOOK: sub.id,
        }
        # The policy is fixed for the service's life: an address in the URL
        # is judged once (a name, at each connection, by the resolver).
        self.refused = svc.policy.host_refusal(urlsplit(sub.url).hostname or "")
        self.task: asyncio.Task[None] | None = None
        self.delivered = 0

    def start(self) -> None:
        self.task = asyncio.create_task(self._run(), name=f"webhook-{self.sub.id}")

    async def stop(self) -> None:
        if self.task is not None:
            await cancel(self.task)
            self.task = None

    async def _consumer(self, on_event: Callable[[Any], Awaitable[None]]) -> Any:
        """The subscription's durable consumer, made anew from its ack floor
        and delivering into this connection's inbox, and the subscription
        that hands its events one at a time to ``on_event``.

        A push consumer: the broker streams up to ``WINDOW`` events ahead
        (fetching them request by request cost more than the rest of a
        delivery but the POST). Whatever an earlier run held
        unacknowledged (a crash mid-delivery) comes again at once rather
        than after the ack wait.
        """
        js = self.svc.store.js
        name = consumer_name(self.sub.id)
        start = self.sub.created_seq + 1
        with contextlib.suppress(nats.js.errors.NotFoundError):
            info = await js.consumer_info(STREAM, name)
            start = max(start, info.ack_floor.stream_seq + 1)
            await js.delete_consumer(STREAM, name)
        deliver = self.svc.store.nc.new_inbox()
        config = ConsumerConfig(
            name=name,
            durable_name=name,
            deliver_subject=deliver,
            filter_subject=f"ev.{self.sub.tenant}.>",
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=start,
            ack_policy=AckPolicy.ALL,
            # Longer than any retry schedule: a restart, not this, resends.
            ack_wait=3600,
            # The window bounds what is in flight, below what the
            # subscription buffers: no flow control needed.
            max_ack_pending=WINDOW,
            idle_heartbeat=HEARTBEAT_S,
        )
        await js.add_consumer(STREAM, config)
        # A plain subscription, whose callback nats-py awaits message by
        # message: the events' reply subjects are all an acknowledgement needs.
        return await self.svc.store.nc.subscribe(
            deliver, cb=on_event, pending_msgs_limit=2 * WINDOW
        )

    async def _run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=self.svc.timeout_s)
        connector = aiohttp.TCPConnector(resolver=self.svc.policy.connector_resolver())
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as http:
            while True:
                flow = _Flow()
                sub: Any = None

                async def on_event(m: Any, flow: _Flow = flow) -> None:
                    await self._on_event(http, flow, m)

                try:
                    sub = await self._consumer(on_event)
                    await self._watch(flow)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    log.warning("webhook worker restarting", webhook=self.sub.id, error=str(exc))
                    await asyncio.sleep(1)
                finally:
                    # Stops the callback, an event in hand included (not
                    # acknowledged: it comes again); then what is done.
                    if sub is not None:
                        with contextlib.suppress(Exception):
                            await sub.unsubscribe()
                    if flow.last is not None and flow.failed is None:
                        with contextlib.suppress(Exception):
                            await flow.last.ack()

    async def _on_event(self, http: aiohttp.ClientSession, flow: _Flow, m: Any) -> None:
        flow.heard = time.monotonic()
        if not m.reply or flow.failed is not None:
            return  # a heartbeat; or, after a failure, nothing until the restart
        try:
            retried = await self._deliver(http, m)
        except Exception as exc:
            # Never acknowledged, nor anything after it: the restart resends it.
            flow.failed = exc
            return
        flow.last, flow.unacked = m, flow.unacked + 1
        if retried or flow.unacked >= ACK_EVERY:
            await flow.ack()

    async def _watch(self, flow: _Flow) -> None:
        """Acknowledge what was delivered once ``ACK_IDLE_S`` passed without
        a later acknowledgement; end (for a restart) when the callback
        failed or neither event nor heartbeat came for three beats."""
        while True:
            await asyncio.sleep(ACK_IDLE_S)
            if flow.failed is not None:
                raise flow.failed
            if flow.last is not None and time.monotonic() - flow.acked >= ACK_IDLE_S:
                await flow.ack()
            if time.monotonic() - flow.heard > 3 * HEARTBEAT_S:
                raise ConnectionError("no event and no heartbeat: consumer lost")

    async def _deliver(self, http: aiohttp.ClientSession, m: Any) -> bool:
        """Deliver one event (its outcome recorded); True when it took retries."""
        seq, appended_ns = ack_position(m.reply)
        rendered = self.svc.rendered(seq, m.data)
        if rendered is None:
            return False  # not ours to judge: the projector quarantines it
        event, body = rendered
        if not matches(self.sub.types, event.type_name()):
            return False
        d = Delivery(seq=seq, event_id=event.id, type=event.type_name())
        while True:
            d.attempts += 1
            headers = {
                **self.headers,
                cloudevents.H_SIGNATURE: self.sign(body),
                cloudevents.H_ATTEMPT: str(d.attempts),
            }
            try:
                if self.refused:
                    raise TargetRefused(self.refused)
                async with http.post(
                    self.sub.url, data=body, headers=headers, allow_redirects=False
                ) as resp:
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
                d.latency_ms = round((time.time_ns() - appended_ns) / 1e6, 2)
                break
            if d.attempts >= self.svc.max_attempts:
                d.status = "dead"
                log.warning(
                    "webhook dead-lettered", webhook=self.sub.id, seq=seq, error=d.last_error
                )
                break
            d.status = "retrying"
            self.svc.record(self.sub.id, d)
            with contextlib.suppress(Exception):
                await m.in_progress()
            await asyncio.sleep(backoff(d.attempts, self.svc.backoff_s, self.svc.backoff_max_s))
        self.svc.record(self.sub.id, d)
        self.delivered += 1
        return d.attempts > 1


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
        policy: TargetPolicy | None = None,
    ) -> None:
        self.store = store
        self.keys = keys
        # Where deliveries may go (default: no internal address).
        self.policy = policy or TargetPolicy()
        self.max_attempts = max_attempts
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self.timeout_s = timeout_s
        self.workers: dict[str, Worker] = {}
        self.kv: Any = None
        self._task: asyncio.Task[None] | None = None
        self._enc = msgspec.json.Encoder()
        # webhook -> seq -> its latest record, not yet written
        self._unwritten: dict[str, dict[int, Delivery]] = {}
        self._writer: asyncio.Task[None] | None = None
        self._writes: set[asyncio.Task[None]] = set()
        self._rendered: OrderedDict[int, tuple[Any, bytes] | None] = OrderedDict()

    async def start(self) -> None:
        self.kv = await deliveries_bucket(self.store)
        self._writer = asyncio.create_task(self._write_records())
        self._task = asyncio.create_task(self._follow())

    def rendered(self, seq: int, data: bytes) -> tuple[Any, bytes] | None:
        """The event at ``seq`` and its CloudEvent body, made once for all the
        subscriptions that receive it (None: no event this code knows)."""
        if seq in self._rendered:
            self._rendered.move_to_end(seq)
            return self._rendered[seq]
        try:
            event = self.store.codec.decode(data)
            out: tuple[Any, bytes] | None = (
                event,
                cloudevents.encode(cloudevents.to_cloudevent(event, seq)),
            )
        except Exception:
            out = None
        self._rendered[seq] = out
        if len(self._rendered) > RENDERED:
            self._rendered.popitem(last=False)
        return out

    def record(self, webhook_id: str, d: Delivery) -> None:
        """Keep the delivery's state (a copy: ``d`` goes on changing) for the
        next write of this subscription's records, at most RECORDS_EVERY_S
        away. The delivery itself never waits for it."""
        self._unwritten.setdefault(webhook_id, {})[d.seq] = msgspec.structs.replace(d)

    async def _write_records(self) -> None:
        while True:
            await asyncio.sleep(RECORDS_EVERY_S)
            await self._flush()

    async def _flush(self) -> None:
        pending, self._unwritten = self._unwritten, {}
        for webhook_id, records in pending.items():
            while len(self._writes) >= RECORDS_IN_FLIGHT:
                await asyncio.wait(self._writes, return_when=asyncio.FIRST_COMPLETED)
            # Unique per write, across restarts too: a later entry never
            # hides an earlier one's records.
            key = f"{webhook_id}.{new_id()}"
            value = self._enc.encode(sorted(records.values(), key=lambda r: r.seq))
            t = asyncio.create_task(self._put(key, value, len(records)))
            self._writes.add(t)
            t.add_done_callback(self._writes.discard)

    async def _put(self, key: str, value: bytes, n: int) -> None:
        try:
            await self.kv.put(key, value)
        except Exception as exc:  # the delivery itself counts more than its record
            log.warning("deliveries not recorded", key=key, records=n, error=str(exc))

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
        if self._writer is not None:
            await cancel(self._writer)
            self._writer = None
        await self._flush()  # what the workers recorded last
        if self._writes:
            await asyncio.wait(self._writes, timeout=5)


async def deliveries_bucket(store: EventStore) -> Any:
    js = store.js
    try:
        return await js.key_value(BUCKET)
    except nats.js.errors.BucketNotFoundError:
        replicas = await log_replicas(js, store.stream)
        return await js.create_key_value(
            KeyValueConfig(
                bucket=BUCKET, history=1, ttl=KEEP_S, storage=StorageType.FILE, replicas=replicas
            )
        )


# -- the query: q.webhook-deliveries ------------------------------------------------


class DeliveriesQuery(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    ref: Annotated[str, msgspec.Meta(pattern=REF_PATTERN, max_length=64)]
    tenant: str | None = None
    status: str | None = None
    limit: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 100


async def read_deliveries(store: EventStore, webhook_id: str, limit: int) -> list[dict]:
    """The latest record of each event delivered to ``webhook_id``, in log order.

    Entries are read in the order they were written, so a later record of
    an event (delivered after retrying) replaces an earlier one. An entry
    is a list of records, or one record as earlier versions wrote them.
    """
    kv = await deliveries_bucket(store)
    entries: list[Any] = []
    watcher = await kv.watch(f"{webhook_id}.>")
    try:
        for _ in range(1_000_000):
            entry = await watcher.updates(timeout=5)
            if entry is None:
                break
            if entry.value:
                entries.append(entry)
            if entry.delta == 0:
                break
    finally:
        with contextlib.suppress(Exception):
            await watcher.stop()
    latest: dict[int, dict] = {}
    for entry in sorted(entries, key=lambda e: e.revision):
        value = json.loads(entry.value)
        for r in value if isinstance(value, list) else [value]:
            latest[r["seq"]] = r
    return [latest[seq] for seq in sorted(latest)][-limit:]


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
