"""Host liveness through a JetStream KV bucket, never through the event log.

Each beat is one message on ``$KV.<HEARTBEATS>.<host>`` carrying its own TTL;
when a host stops beating, the server expires its last beat and places a
delete marker, which every watcher sees. The bucket lives in memory: a beat
is worth nothing after its TTL, so it is not worth a disk sync either.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

import msgspec
import nats.errors
import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import StorageType
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue

from stratus.events.cluster import log_replicas
from stratus.events.errors import Unavailable
from stratus.events.ids import NAME_RE
from stratus.events.scheduling import HEARTBEAT_INTERVAL, HEARTBEAT_TTL, HEARTBEATS, HostHeartbeat

_enc = msgspec.msgpack.Encoder()
_dec = msgspec.msgpack.Decoder(HostHeartbeat)


async def bucket(js: JetStreamContext, name: str = HEARTBEATS) -> KeyValue:
    """The heartbeat bucket, made on first use (by whichever side comes first).
    ``name``: another bucket of beats of the same kind (frameworks')."""
    try:
        return await js.key_value(name)
    except nats.js.errors.BucketNotFoundError:
        pass
    replicas = await log_replicas(js)
    with contextlib.suppress(nats.js.errors.BadRequestError):
        # Another process may create it at the same moment with the same config.
        await js.create_key_value(
            bucket=name,
            history=1,
            storage=StorageType.MEMORY,
            # As many copies as the log: a beat survives the loss of a node.
            replicas=replicas,
            # Delete markers for expired beats, so watchers learn of a death.
            limit_marker_ttl=1.0,
        )
    return await js.key_value(name)


async def beat(
    js: JetStreamContext,
    host: str,
    *,
    ttl: float = HEARTBEAT_TTL,
    instances: int = 0,
    name: str = HEARTBEATS,
    timeout: float | None = None,
) -> None:
    """Say ``host`` (or, in bucket ``name``, another beating thing) is alive
    for the next ``ttl`` seconds; ``timeout`` bounds the wait for the
    broker's answer (the JetStream context's own without)."""
    if not NAME_RE.match(host):
        raise ValueError(f"not a host name: {host!r}")
    ttl = max(1.0, ttl)
    data = _enc.encode(HostHeartbeat(host=host, at=time.time(), ttl=ttl, instances=instances))
    subject = f"$KV.{name}.{host}"
    try:
        await js.publish(subject, data, msg_ttl=ttl, timeout=timeout)
    except nats.js.errors.NoStreamResponseError:
        if name == HEARTBEATS:
            # An agent may write its own key, not make the bucket: whoever
            # makes the stream makes it (``EventStore.ensure_stream``).
            raise Unavailable(
                f"no heartbeat bucket {HEARTBEATS} yet: the handlers make it with the stream"
            ) from None
        # A framework's first beat (the handlers beat for it): make the bucket.
        await bucket(js, name)
        await js.publish(subject, data, msg_ttl=ttl)


async def beating_hosts(js: JetStreamContext) -> set[str]:
    """Hosts whose last beat has not expired, read once (no watcher)."""
    try:
        kv = await js.key_value(HEARTBEATS)
        return set(await kv.keys())
    except (nats.js.errors.BucketNotFoundError, nats.js.errors.NoKeysError):
        return set()


class Liveness:
    """Which hosts beat within their TTL, kept current by a KV watch.

    ``on_change(host, alive_until)`` is called for every beat and expiry
    (``alive_until`` 0 when the host's beat expired or was removed).
    """

    def __init__(
        self,
        js: JetStreamContext,
        on_change: Callable[[str, float], None] | None = None,
        ttl: float = HEARTBEAT_TTL,
        name: str = HEARTBEATS,
        stall_s: float = 2 * HEARTBEAT_INTERVAL,
    ) -> None:
        self.js = js
        self.name = name
        self.ttl = ttl
        # No update for this long: watch again (``_follow``).
        self.stall_s = stall_s
        self.on_change = on_change
        self._until: dict[str, float] = {}
        self._task: asyncio.Task[None] | None = None
        self._watcher: KeyValue.KeyWatcher | None = None
        self._closing = False

    async def start(self) -> None:
        kv = await bucket(self.js, self.name)
        self._watcher = await kv.watchall()
        # The current beats first, so the caller starts with a full picture.
        async with asyncio.timeout(10):
            while True:
                entry = await self._watcher.updates(timeout=5)
                if entry is None:
                    break
                self._apply(entry)
        self._task = asyncio.create_task(self._follow())

    async def _follow(self) -> None:
        while not self._closing:
            if self._watcher is None:
                try:
                    self._watcher = await (await bucket(self.js, self.name)).watchall()
                except Exception:  # (the bucket has no leader yet: again soon)
                    await asyncio.sleep(1.0)
                    continue
            try:
                entry = await self._watcher.updates(timeout=self.stall_s)
            except (TimeoutError, nats.errors.TimeoutError):
                # Nothing for longer than beats come: the watch may have died
                # with the bucket's leader (a node lost; nothing tells its
                # ordered consumer), and every host would then lapse for
                # good. Watch again: its first entries are the beats now.
                watcher, self._watcher = self._watcher, None
                with contextlib.suppress(Exception):
                    await watcher.stop()
                continue
            if entry is not None:
                self._apply(entry)

    def _apply(self, entry: KeyValue.Entry) -> None:
        host = entry.key
        until = 0.0
        if entry.operation not in (KV_DEL, KV_PURGE) and entry.value:
            try:
                ttl = _dec.decode(entry.value).ttl
            except msgspec.DecodeError:
                ttl = self.ttl
            # Local receive time, not the sender's clock: hosts may disagree.
            # The server's expiry marker ends it sooner if the beats stop.
            until = time.time() + ttl
        self._until[host] = until
        if self.on_change is not None:
            self.on_change(host, until)

    def alive(self, host: str) -> bool:
        return self._until.get(host, 0.0) > time.time()

    def alive_hosts(self) -> set[str]:
        now = time.time()
        return {h for h, t in self._until.items() if t > now}

    async def stop(self) -> None:
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            # The watcher may report a cancellation as a timeout; the loop
            # then ends on ``_closing`` instead.
            await asyncio.wait([self._task], timeout=5)
        if self._watcher is not None:
            with contextlib.suppress(Exception):
                await self._watcher.stop()
