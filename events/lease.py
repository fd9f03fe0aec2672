"""Leases in a JetStream KV bucket: one holder at a time, for a while.

A lease is one key of the bucket ``stratus-leases`` (``projector.main``, say)
whose value names its holder. Each value is written with a per-message TTL:
a holder that stops renewing (killed, paused, cut off) loses the key when the
server expires its last write, and the server then leaves a delete marker.
Every write is conditional on the key's last revision
(``Nats-Expected-Last-Subject-Sequence``), so two candidates that both see
the key free cannot both take it: the server accepts one write and refuses
the other. A holder renews well within the TTL; a renewal refused means
someone else holds it now.

The bucket is made on first use with as many replicas as the event stream
has (R1 on a single node, R3 beside an R3 stream), and raised to them if the
stream gained replicas since: a lease is worth as much as the log it guards.

The lease alone cannot stop a holder that was paused past its TTL from
doing one more write before it notices: whatever the lease guards must also
check, where the write happens, that the write's lease is still the current
one. ``Held.epoch`` (the revision that took the key, which only grows within
a bucket) and ``Held.generation`` (when the bucket was made, which tells one
bucket from a later one of the same name) order leases for that check; the
projector keeps them in its database (``projections.leased``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from datetime import UTC, datetime

import msgspec
import nats.errors
import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import StorageType, StreamInfo
from nats.js.kv import KV_DEL, KV_OP, KV_PURGE

from stratus.events.cluster import log_replicas
from stratus.events.errors import Invalid, StratusError, Unavailable
from stratus.events.store import STREAM, WRONG_LAST_SEQUENCE

LEASES = "stratus-leases"
DEFAULT_TTL_S = 5.0
# A renewal every third of the TTL: two can be lost before the lease is.
RENEW_FRACTION = 3
# How long a candidate waits between looks at a held lease.
POLL_S = 0.25
# How long an expiry's delete marker stays (it tells watchers; a candidate
# takes the key over the marker as over nothing).
MARKER_TTL_S = 1.0
_KEY_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-_.")
_H_EXPECT = "Nats-Expected-Last-Subject-Sequence"
_H_MARKER = "Nats-Marker-Reason"


class LeaseLost(StratusError):
    """This process no longer holds the lease: it must stop what it guards."""

    kind = "lease_lost"


class LeaseRecord(msgspec.Struct, frozen=True):
    """The value of a lease key: who holds it, for how long after ``at``."""

    holder: str
    ttl: float
    at: float


class Held(msgspec.Struct, frozen=True):
    """One holding of a lease, from the write that took the key."""

    key: str
    holder: str
    # The bucket's creation time (µs): a bucket made again starts its
    # revisions at 1, and a later generation still orders after.
    generation: int
    # The revision of the write that took the key.
    epoch: int


_enc = msgspec.msgpack.Encoder()
_dec = msgspec.msgpack.Decoder(LeaseRecord)


def default_holder() -> str:
    """This process, as other processes should read it: host and pid."""
    return f"{socket.gethostname()}:{os.getpid()}"


async def lease_bucket(js: JetStreamContext, stream: str = STREAM) -> StreamInfo:
    """The bucket's stream, made if missing (by whichever process comes
    first; the same config twice is one bucket), with the replicas of the
    event stream (raised to them if the stream gained replicas since)."""
    name = f"KV_{LEASES}"
    replicas = max(1, await log_replicas(js, stream))
    try:
        info = await js.stream_info(name)
    except nats.js.errors.NotFoundError:
        with contextlib.suppress(nats.js.errors.BadRequestError):
            await js.create_key_value(
                bucket=LEASES,
                history=1,
                # Reads of the key from any replica, without a consumer.
                direct=True,
                # On disk: a broker restart keeps who holds what (within TTL).
                storage=StorageType.FILE,
                replicas=replicas,
                limit_marker_ttl=MARKER_TTL_S,
            )
        info = await js.stream_info(name)
    if (info.config.num_replicas or 1) < replicas:
        info.config.num_replicas = replicas
        info = await js.update_stream(info.config)
    return info


def _generation(created: datetime | None) -> int:
    """The bucket's creation time in µs (0 if the server did not say)."""
    if created is None:
        return 0
    if created.tzinfo is None:
        created = created.replace(tzinfo=UTC)
    return int(created.timestamp() * 1_000_000)


class Lease:
    """One key of the lease bucket, taken and kept by this process.

    ``acquire`` waits until the key is free and takes it; ``renew`` keeps it
    (False once it is lost); ``release`` gives it up at once, for a clean
    stop, so another candidate need not wait out the TTL. ``valid`` says
    whether this process may still act as the holder by its own clock: a
    renewal confirmed less than a TTL ago (less a margin), so it stops before
    the server can hand the key to someone else.
    """

    def __init__(
        self,
        js: JetStreamContext,
        key: str,
        *,
        holder: str | None = None,
        ttl: float = DEFAULT_TTL_S,
        stream: str = STREAM,
        poll_s: float = POLL_S,
    ) -> None:
        if not key or not set(key) <= _KEY_CHARS or key[0] == "." or key[-1] == ".":
            raise Invalid(f"lease key {key!r}: use [a-z0-9-_] words joined by dots")
        # Per-message TTLs are whole seconds on the wire.
        if ttl < 1 or ttl != int(ttl):
            raise Invalid(f"lease TTL {ttl}: a whole number of seconds, at least 1")
        self.js = js
        self.key = key
        self.holder = holder or default_holder()
        self.ttl = float(ttl)
        self.renew_every = self.ttl / RENEW_FRACTION
        self.poll_s = poll_s
        self.stream = stream
        self.subject = f"$KV.{LEASES}.{key}"
        self.held: Held | None = None
        self._revision = 0
        self._valid_until = 0.0
        self._bucket: str | None = None
        self._direct = False
        self._generation = 0

    # -- the holder -----------------------------------------------------------

    async def acquire(self) -> Held:
        """Wait until the key is free, then take it (cancel to give up)."""
        while True:
            held = await self.try_acquire()
            if held is not None:
                return held
            await asyncio.sleep(self.poll_s)

    async def try_acquire(self) -> Held | None:
        """Take the key if nobody holds it now; None if someone does."""
        await self._ensure_bucket()
        started = time.monotonic()
        last, holder = await self._last()
        if holder is not None:
            return None
        revision = await self._write(last)
        if revision is None:
            return None  # another candidate took it first
        self._revision = revision
        self._valid_until = started + self.ttl - self._margin()
        self.held = Held(self.key, self.holder, self._generation, revision)
        return self.held

    async def renew(self) -> bool:
        """Write the lease again; False if it is lost (someone else holds
        the key, or it expired). A broker that does not answer is not a
        loss yet: ``valid`` runs out on its own clock meanwhile."""
        if self.held is None:
            return False
        started = time.monotonic()
        try:
            revision = await self._write(self._revision)
        except Unavailable:
            return self.valid()
        if revision is None:
            self._lost()
            return False
        self._revision = revision
        self._valid_until = started + self.ttl - self._margin()
        return True

    def valid(self) -> bool:
        """Whether this process still holds the lease, by its own clock."""
        if self.held is not None and time.monotonic() >= self._valid_until:
            self._lost()
        return self.held is not None

    def remaining(self) -> float:
        return max(0.0, self._valid_until - time.monotonic()) if self.held else 0.0

    async def release(self) -> None:
        """Give the lease up now (a clean stop), if still ours."""
        if self.held is None:
            return
        revision, self.held = self._revision, None
        headers = {KV_OP: KV_DEL, _H_EXPECT: str(revision)}
        with contextlib.suppress(nats.errors.Error, TimeoutError):
            await self.js.publish(self.subject, b"", headers=headers)

    async def current(self) -> LeaseRecord | None:
        """Who holds the key now, as the server says (None: nobody)."""
        _, holder = await self._last()
        return holder

    # -- the key on the server --------------------------------------------------

    def _margin(self) -> float:
        # Stop acting before the server can expire the key: the renewal that
        # got this far may have been written late in the round trip.
        return min(1.0, self.ttl / 5)

    def _lost(self) -> None:
        self.held = None
        self._valid_until = 0.0

    async def _ensure_bucket(self) -> None:
        if self._bucket is not None:
            return
        try:
            info = await lease_bucket(self.js, self.stream)
        except (nats.errors.Error, TimeoutError) as exc:
            raise Unavailable(f"lease bucket {LEASES}: {exc or type(exc).__name__}") from None
        self._bucket = info.config.name
        self._direct = bool(info.config.allow_direct)
        self._generation = _generation(info.created)

    async def _last(self) -> tuple[int, LeaseRecord | None]:
        """The key's last revision and its holder (None: free: never
        written, released, or expired)."""
        assert self._bucket is not None
        try:
            msg = await self.js.get_last_msg(self._bucket, self.subject, direct=self._direct)
        except nats.js.errors.NotFoundError:
            return 0, None
        except (nats.errors.Error, TimeoutError) as exc:
            raise Unavailable(f"lease {self.key}: {exc or type(exc).__name__}") from None
        headers = msg.headers or {}
        if headers.get(KV_OP) in (KV_DEL, KV_PURGE) or headers.get(_H_MARKER) or not msg.data:
            return msg.seq or 0, None
        try:
            return msg.seq or 0, _dec.decode(msg.data)
        except msgspec.DecodeError:
            # Not ours: someone wrote the key by hand. Taken as held, so a
            # candidate waits for it to expire rather than overwrite it.
            return msg.seq or 0, LeaseRecord(holder="?", ttl=self.ttl, at=0.0)

    async def _write(self, last: int) -> int | None:
        """Write our record if the key's last revision is ``last``; the new
        revision, or None if the key had moved on."""
        data = _enc.encode(LeaseRecord(self.holder, self.ttl, time.time()))
        try:
            ack = await self.js.publish(
                self.subject, data, headers={_H_EXPECT: str(last)}, msg_ttl=self.ttl
            )
        except nats.js.errors.APIError as exc:
            if exc.err_code in WRONG_LAST_SEQUENCE:  # the key moved on, or is moving
                return None
            raise Unavailable(f"lease {self.key}: {exc}") from None
        except (nats.errors.Error, TimeoutError) as exc:
            raise Unavailable(f"lease {self.key}: {exc or type(exc).__name__}") from None
        return ack.seq
