"""Reading the log: the ``LogReader`` interface, and its portable implementation.

A read is one ephemeral push consumer on the stream, delivering the stored
events after a position in stream order; the reader hands them on as
batches of ``Recorded``. What every implementation guarantees (one contract
suite, ``tests/test_logreader.py``, runs against each):

- every matching event after ``after`` exactly once, in stream order, in
  batches of at most ``batch``;
- a read ends at ``until`` (a sequence, or a time: events stored after it
  are not returned) or at the last matching event stored when it was
  called; a followed read never ends and delivers new events as they land;
- a lost consumer (deleted, or gone with a restarted server), a gap in
  delivery or a reconnect is repaired by a new consumer that starts after
  the last event handed on: nothing is skipped or repeated;
- delivery waits (flow control) while ``high_water`` events are buffered
  unread, so a reader slower than the broker holds a bounded backlog;
- when the read stops (its end, ``aclose``, a cancelled task) no consumer
  of it is left on the server.

``OrderedReader`` (here) uses nats-py's public API only: its ordered
consumer and ``Msg.metadata``. ``FastReader`` (``events/fastread.py``)
reads the protocol itself and is what ``EventStore`` uses on connections
``events.store.connect_nats`` made when that module's hooks fit the
installed nats-py.

A connection whose credential may only use consumers of given names (a host
agent's: the broker's permissions see the name only in the API subject,
never in a request's body) reads through those names (``ConsumerNames``):
``FastReader`` names its consumer itself, and ``NamedReader`` (here, public
API only) stands in for ``OrderedReader``, whose consumers nats-py names.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig, DeliverPolicy
from nats.js.client import JetStreamContext

from stratus.events.catalog import CODEC
from stratus.events.errors import Internal, Invalid, StratusError, Unavailable
from stratus.events.model import Codec, Event

SUBJECTS = "ev.>"

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


class Recorded:
    """One stored event as read from the stream, decoded on demand."""

    __slots__ = ("_event", "data", "headers", "seq", "subject", "ts_ns")

    def __init__(
        self,
        seq: int,
        subject: str,
        ts_ns: int,
        data: bytes,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.seq = seq
        self.subject = subject
        self.ts_ns = ts_ns
        self.data = data
        self.headers = headers
        self._event: Event | None = None

    @property
    def time(self) -> datetime:
        return datetime.fromtimestamp(self.ts_ns / 1e9, UTC)

    def decode(self, codec: Codec = CODEC) -> Event:
        if self._event is None:
            self._event = codec.decode(self.data)
        return self._event

    def __repr__(self) -> str:
        return f"Recorded(seq={self.seq}, subject={self.subject!r})"


Until = int | datetime | None


class ConsumerNames:
    """The consumer names a connection's reads must use, one per read at a
    time (``acquire`` waits while every one is in use)."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = tuple(names)
        self._free = list(reversed(self.names))
        self._released = asyncio.Event()

    async def acquire(self) -> str:
        while not self._free:
            self._released.clear()
            await self._released.wait()
        return self._free.pop()

    def release(self, name: str) -> None:
        if name in self.names and name not in self._free:
            self._free.append(name)
            self._released.set()


class ReadSource(Protocol):
    """What a reader needs of the event store (``EventStore`` is one)."""

    nc: NATS
    js: JetStreamContext
    stream: str
    timeout: float
    # None: consumers named by the server; else the names reads must use.
    consumer_names: ConsumerNames | None

    async def last_seq(self, subject: str | None = None) -> int: ...


async def create_consumer(source: ReadSource, config: dict[str, Any], name: str | None) -> str:
    """Create a reader's consumer through the raw JetStream API; its name.

    Unnamed, the server names it. Named, the name is in the API subject (so
    the broker's permissions can see it) and a consumer of that name left by
    an earlier run (killed before removing it) is removed first."""
    stream = source.stream
    subject = f"$JS.API.CONSUMER.CREATE.{stream}"
    if name is not None:
        await remove_consumer(source, name, wait=True)
        subject += f".{name}"
        config = {**config, "name": name}
    req = json.dumps({"stream_name": stream, "config": config}).encode()
    try:
        resp = await source.nc.request(subject, req, timeout=source.timeout)
    except (TimeoutError, nats.errors.Error) as exc:
        raise broker_error(exc) from None
    info = json.loads(resp.data)
    if "error" in info:
        err = info["error"]
        raise broker_error(
            nats.js.errors.APIError(
                code=err.get("code"),
                err_code=err.get("err_code"),
                description=err.get("description"),
            )
        )
    return str(info["name"])


async def remove_consumer(source: ReadSource, name: str, *, wait: bool = False) -> None:
    """Remove a reader's consumer (``wait``: until the server answered); never raises."""
    subject = f"$JS.API.CONSUMER.DELETE.{source.stream}.{name}"
    nc = source.nc
    if not nc.is_connected:
        return
    with contextlib.suppress(Exception):
        if wait:
            await nc.request(subject, b"", timeout=source.timeout)
        else:
            await nc.publish(subject, b"")


BROKER_UNAVAILABLE: tuple[type[BaseException], ...] = (
    nats.errors.TimeoutError,
    asyncio.TimeoutError,
    nats.errors.NoRespondersError,
    nats.js.errors.NoStreamResponseError,
    nats.errors.ConnectionClosedError,
    nats.errors.ConnectionDrainingError,
    nats.errors.StaleConnectionError,
    nats.js.errors.ServiceUnavailableError,
)


def broker_error(exc: BaseException) -> StratusError:
    """A broker failure as the Stratus error a caller can act on."""
    if isinstance(exc, BROKER_UNAVAILABLE):
        return Unavailable(f"event store unavailable: {type(exc).__name__} {exc}".strip())
    if isinstance(exc, nats.js.errors.APIError):
        from stratus.events.cluster import placement_refused

        if placement_refused(exc) == "peers":
            # (too few nodes up to place the replicas: for now, not for good)
            return Unavailable(f"event store cannot place replicas: {exc.description}")
        return Internal(f"event store refused: {exc.err_code} {exc.description}")
    return Unavailable(f"event store error: {type(exc).__name__}: {exc}")


def _under_log(subject: str) -> bool:
    tokens = subject.split(".")
    return len(tokens) > 1 and tokens[0] == "ev" and all(tokens) and ">" not in tokens[:-1]


class LogReader(ABC):
    """One read of the log (see the module docstring for the contract).

    The loop that cuts batches, ends the read and restarts a lost consumer
    is here; an implementation creates and removes its consumer and puts
    each delivered event in ``buf`` through ``_deliver``.
    """

    HEARTBEAT_S = 2.0
    # Hold back flow control while this many events wait unread.
    HIGH_WATER = 20_000

    def __init__(
        self,
        source: ReadSource,
        after: int = 0,
        until: Until = None,
        subjects: Sequence[str] = (SUBJECTS,),
        *,
        batch: int = 1000,
        headers: bool = False,
        follow: bool = False,
        high_water: int | None = None,
    ) -> None:
        if not subjects or any(not _under_log(s) for s in subjects):
            raise Invalid(f"a read takes subject filters under {SUBJECTS}, got {list(subjects)}")
        self.source = source
        self.next_seq = after + 1
        self.until_seq = until if isinstance(until, int) else None
        self.until_time = until if isinstance(until, datetime) else None
        self.subjects = list(subjects)
        self.batch = batch
        self.headers = headers
        self.follow = follow
        self.high_water = high_water or self.HIGH_WATER
        self.buf: list[Recorded] = []
        self.wake = asyncio.Event()
        # A restart is due: the consumer was lost or delivered out of order.
        self.broken = False
        # Something arrived since the last look (an event, or a heartbeat).
        self.beat = False
        # How many consumers this read created (1 unless it had to restart).
        self.starts = 0

    @property
    def buffered(self) -> int:
        """Events received from the broker and not yet handed on."""
        return len(self.buf)

    async def batches(self) -> AsyncIterator[list[Recorded]]:
        try:
            if not self.follow:
                end = await self._end()
                if self.until_seq is None or self.until_seq > end:
                    self.until_seq = end
                if self.next_seq > self.until_seq:
                    return
            await self._begin()
            while True:
                if self.broken:
                    await self._recover()
                if not self.buf:
                    self.wake.clear()
                    try:
                        await asyncio.wait_for(self.wake.wait(), self.HEARTBEAT_S * 3)
                    except TimeoutError:
                        await self._idle()
                    continue
                out, self.buf = self.buf[: self.batch], self.buf[self.batch :]
                await self._drained()
                done = False
                if self.until_seq is not None and out[-1].seq >= self.until_seq:
                    out = [r for r in out if r.seq <= self.until_seq]
                    done = True
                # At the resolution of a datetime, which is what ``until`` has.
                if self.until_time is not None and out[-1].time > self.until_time:
                    out = [r for r in out if r.time <= self.until_time]
                    done = True
                if out:
                    yield out
                if done:
                    return
        finally:
            await self._stop()

    async def _end(self) -> int:
        """The last stored event any of the subjects matches (0: none)."""
        ends = await asyncio.gather(
            *(self.source.last_seq(None if s == SUBJECTS else s) for s in self.subjects)
        )
        return max(ends, default=0)

    async def _begin(self) -> None:
        await self._stop()
        self.broken = False
        self.beat = False
        self.starts += 1
        await self._start()

    async def _recover(self) -> None:
        """A new consumer after a loss; retried while the connection is
        reconnecting (it was the broker that went away)."""
        while True:
            try:
                await self._begin()
                return
            except Unavailable:
                if self.source.nc.is_closed:
                    raise
            await asyncio.sleep(self.HEARTBEAT_S)

    def _deliver(self, rec: Recorded) -> None:
        self.next_seq = rec.seq + 1
        self.buf.append(rec)
        self.beat = True
        self.wake.set()

    def _restart(self) -> None:
        """Start a new consumer after the last event received."""
        self.broken = True
        self.wake.set()

    def _config(self, deliver_subject: str | None = None) -> dict[str, Any]:
        """The consumer every implementation creates (JetStream API names)."""
        cfg: dict[str, Any] = {
            "ack_policy": "none",
            "flow_control": True,
            "idle_heartbeat": int(self.HEARTBEAT_S * 1e9),
            # A consumer whose reader died without removing it goes by itself.
            "inactive_threshold": int(30 * 1e9),
            "mem_storage": True,
            "num_replicas": 1,
            "replay_policy": "instant",
            "headers_only": False,
        }
        if deliver_subject:
            cfg["deliver_subject"] = deliver_subject
        if self.next_seq <= 1:
            cfg["deliver_policy"] = "all"
        else:
            cfg["deliver_policy"] = "by_start_sequence"
            cfg["opt_start_seq"] = self.next_seq
        if len(self.subjects) == 1:
            cfg["filter_subject"] = self.subjects[0]
        else:
            cfg["filter_subjects"] = self.subjects
        return cfg

    @abstractmethod
    async def _start(self) -> None:
        """Create a consumer delivering from ``next_seq`` and subscribe to it."""

    @abstractmethod
    async def _stop(self) -> None:
        """Unsubscribe and remove the consumer (if any); never raises."""

    @abstractmethod
    async def _drained(self) -> None:
        """A batch was taken from ``buf``: let delivery go on if it waited."""

    @abstractmethod
    async def _idle(self) -> None:
        """Nothing arrived for three heartbeats: find out whether the
        consumer is still there, and ``_restart`` if not."""


class OrderedReader(LogReader):
    """nats-py's ordered consumer, through its public API only.

    nats-py replaces the consumer itself after a gap or two missed
    heartbeats, from the last stream sequence it delivered. Before the
    first delivery it knows none and would start over from the stream's
    beginning: a delivery from before ``next_seq`` makes this reader start
    its own consumer after the last event it holds instead. A consumer
    deleted under it, or gone with a restarted server, is found by asking
    for its info once delivery has been quiet for three heartbeats.

    Backpressure: nats-py answers the server's flow-control requests as
    soon as they arrive when the subscription has a callback, so the server
    never waits for a slow reader. Instead, at ``high_water`` buffered
    events this reader removes its consumer (what was still on its way is
    dropped unread) and starts a new one after the last event it holds once
    half the buffer has been taken.
    """

    def __init__(self, source: ReadSource, *args: Any, **kw: Any) -> None:
        super().__init__(source, *args, **kw)
        self.sub: JetStreamContext.PushSubscription | None = None
        # Deliveries of an older consumer are ignored.
        self.generation = 0
        # The consumer being removed because the buffer is full.
        self.pausing: asyncio.Task[None] | None = None
        # Every consumer name seen in a delivery: each is removed at the end
        # (nats-py leaves the ones it replaced to their inactive threshold).
        self.consumers: set[str] = set()

    @property
    def buffered(self) -> int:
        # nats-py's own queue holds what the callback has not taken yet.
        return len(self.buf) + (self.sub.pending_msgs if self.sub is not None else 0)

    async def _start(self) -> None:
        cfg = self._config()
        self.generation += 1
        generation = self.generation

        async def on_msg(msg: Msg) -> None:
            if generation == self.generation:
                self._on_msg(msg)

        config = ConsumerConfig(
            filter_subject=cfg.get("filter_subject"),
            filter_subjects=cfg.get("filter_subjects"),
            opt_start_seq=cfg.get("opt_start_seq"),
        )
        try:
            self.sub = await self.source.js.subscribe(
                self.subjects[0],
                stream=self.source.stream,
                cb=on_msg,
                config=config,
                ordered_consumer=True,
                idle_heartbeat=self.HEARTBEAT_S,
                inactive_threshold=cfg["inactive_threshold"] / 1e9,
                deliver_policy=DeliverPolicy(cfg["deliver_policy"]),
            )
        except (TimeoutError, nats.errors.Error) as exc:
            raise broker_error(exc) from None

    def _on_msg(self, msg: Msg) -> None:
        status = (msg.headers or {}).get("Status")
        if status:
            # (nats-py keeps heartbeats and flow control to itself) a
            # deleted or timed-out consumer: start a new one.
            if status in ("404", "408", "409"):
                self._restart()
            return
        md = msg.metadata
        seq = md.sequence.stream
        self.consumers.add(md.consumer)
        if seq < self.next_seq:
            self._restart()  # nats-py started over from the beginning
            return
        # The stream's timestamp, exact to the microsecond it has here.
        ts_ns = (md.timestamp - _EPOCH) // _MICROSECOND * 1000
        self._deliver(
            Recorded(seq, msg.subject, ts_ns, msg.data, msg.headers if self.headers else None)
        )
        if len(self.buf) >= self.high_water and self.pausing is None:
            self.generation += 1
            self.pausing = asyncio.create_task(self._remove())

    async def _drained(self) -> None:
        if self.pausing is not None and len(self.buf) <= self.high_water // 2:
            await self._begin()

    async def _idle(self) -> None:
        sub = self.sub
        if sub is None or self.broken:
            return
        try:
            await sub.consumer_info()
        except nats.js.errors.NotFoundError:
            self._restart()
        except (TimeoutError, nats.errors.Error):
            # Disconnected: nats-py resubscribes when it is back, and a
            # consumer lost meanwhile is found at the next quiet period.
            pass

    async def _stop(self) -> None:
        pausing, self.pausing = self.pausing, None
        if pausing is not None:
            await pausing
        await self._remove()

    async def _remove(self) -> None:
        sub, self.sub = self.sub, None
        self.generation += 1
        if sub is None:
            return
        names = set(self.consumers)
        self.consumers.clear()
        nc = self.source.nc
        if not names and nc.is_connected:
            with contextlib.suppress(Exception):
                names.add((await sub.consumer_info()).name)
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
        if not nc.is_connected:
            return
        for name in names:
            with contextlib.suppress(Exception):
                await self.source.js.delete_consumer(self.source.stream, name)


class PushReader(LogReader):
    """An ephemeral push consumer created and read over core NATS.

    The stream sequence, timestamp and consumer sequence of each event come
    from its ack subject; a consumer sequence out of turn (the server
    dropped something for us) or three heartbeats of silence restart the
    consumer after the last event held. Flow-control requests are answered
    only while fewer than ``high_water`` events wait unread. Subclasses
    subscribe to the delivery inbox (``_subscribe``) and feed ``_on_status``
    and ``_event``.
    """

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.fc_reply: str | None = None
        self.expect_dseq = 1
        self.sub: Any = None
        self.consumer: str | None = None
        self.name: str | None = None

    @abstractmethod
    async def _subscribe(self, inbox: str) -> Any:
        """Subscribe to ``inbox``, where the consumer delivers."""

    async def _unsubscribe(self, sub: Any) -> None:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()

    async def _start(self) -> None:
        self.fc_reply = None
        self.expect_dseq = 1
        names = getattr(self.source, "consumer_names", None)
        if names is not None:
            self.name = await names.acquire()
        inbox = self.source.nc.new_inbox()
        self.sub = await self._subscribe(inbox)
        try:
            self.consumer = await create_consumer(self.source, self._config(inbox), self.name)
        except BaseException:
            await self._stop()
            raise

    async def _stop(self) -> None:
        sub, self.sub = self.sub, None
        if sub is not None:
            await self._unsubscribe(sub)
        name, self.consumer = self.consumer, None
        if name is not None:
            await remove_consumer(self.source, name)
        pooled, self.name = self.name, None
        if pooled is not None:
            self.source.consumer_names.release(pooled)  # type: ignore[union-attr]

    async def _drained(self) -> None:
        if len(self.buf) < self.high_water and self.fc_reply:
            await self.source.nc.publish(self.fc_reply)
            self.fc_reply = None

    async def _idle(self) -> None:
        if not self.beat:
            self._restart()  # consumer or connection lost
        self.beat = False

    async def _on_status(self, status: bytes, reply: bytes) -> None:
        if status == b"100":
            self.beat = True
            if reply:  # a flow-control request: answer once drained
                if len(self.buf) < self.high_water:
                    await self.source.nc.publish(reply.decode())
                else:
                    self.fc_reply = reply.decode()
        elif status in (b"409", b"404", b"408"):
            self._restart()  # consumer deleted or gone: start a new one
        self.wake.set()

    def _event(
        self, subject: bytes, reply: bytes, data: bytes, headers: dict[str, str] | None
    ) -> None:
        if self.broken or not reply.startswith(b"$JS.ACK."):
            return
        t = reply.split(b".")
        if len(t) == 9:
            sseq, dseq, ts = t[5], t[6], t[7]
        else:
            # with a domain and account hash (and maybe a final random token)
            sseq, dseq, ts = t[7], t[8], t[9]
        d = int(dseq)
        if d != self.expect_dseq:
            # A gap: the server dropped something for us. Restart after the
            # last event we hold so nothing is skipped or doubled.
            self._restart()
            return
        self.expect_dseq = d + 1
        self._deliver(Recorded(int(sseq), subject.decode(), int(ts), data, headers))


class NamedReader(PushReader):
    """A ``PushReader`` through nats-py's public API (a plain subscription
    and its ``Msg``): where consumers must be named by the reader and the
    fast reader does not fit the installed nats-py."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        # Deliveries queued for an earlier subscription are ignored.
        self.generation = 0

    async def _subscribe(self, inbox: str) -> Any:
        self.generation += 1
        generation = self.generation

        async def on_msg(msg: Msg) -> None:
            if generation == self.generation:
                await self._on_msg(msg)

        return await self.source.nc.subscribe(inbox, cb=on_msg)

    async def _unsubscribe(self, sub: Any) -> None:
        self.generation += 1
        await super()._unsubscribe(sub)

    async def _on_msg(self, msg: Msg) -> None:
        headers = msg.headers or {}
        status = headers.get("Status")
        if status:
            await self._on_status(status.encode(), (msg.reply or "").encode())
            return
        self._event(
            msg.subject.encode(),
            (msg.reply or "").encode(),
            msg.data,
            dict(headers) if self.headers and headers else None,
        )
