"""Taking work from a JetStream pull consumer without waiting for a batch.

nats-py's ``fetch(n, timeout)``, when nothing is waiting, leaves a pull
request for ``n`` messages on the server and, once the first arrives, keeps
waiting for the other ``n - 1`` until the timeout: work that trickles in
(50 requests every 50 ms) sits in a half-filled batch for up to the whole
timeout. Measured on the scheduler at 1,000 requests/s offered: p50 16 ms,
p99 938 ms. ``fetch_ready`` waits for one message only, then takes what is
already there. ``Puller`` does the same for a replica that takes work all
the time, at half the client CPU per message.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import Any

import nats.errors
import nats.js.errors
from nats.js.api import DEFAULT_PREFIX, ConsumerConfig

# How long the second, non-waiting fetch may take to bring what is there:
# it asks with ``no_wait``, so the server answers at once; this only bounds
# a slow answer (whatever arrives later is taken by the next call).
DRAIN_S = 0.01
# Status messages of the pull protocol: an idle heartbeat is not an answer.
STATUS = "Status"
HEARTBEAT = "100"


async def fetch_ready(sub: Any, batch: int, timeout: float) -> list[Any]:
    """Up to ``batch`` messages of pull subscription ``sub``: waits up to
    ``timeout`` for the first (raising ``nats.errors.TimeoutError`` if none
    comes), then returns it with what else is ready, never waiting to fill
    the batch."""
    first = await sub.fetch(1, timeout=timeout)
    if batch <= len(first):
        return first
    try:
        more = await sub.fetch(batch - len(first), timeout=DRAIN_S)
    except (TimeoutError, nats.errors.TimeoutError):
        more = []
    return [*first, *more]


class Puller:
    """Work from a durable pull consumer, taken as it is ready, over nats-py's
    public API only: the JetStream pull protocol (a ``CONSUMER.MSG.NEXT``
    request whose reply subject is an inbox of ours) on one callback
    subscription.

    ``fetch_ready`` on nats-py's ``PullSubscription`` costs about 44 µs of
    CPU per message here (with its ack): nats-py waits for each message of a
    fetch with ``next_msg``, a task, a ``wait_for`` and a uuid each. Here a
    message is appended to a list by the subscription's callback and a fetch
    takes the list: about 20 µs (measured over 20,000 messages each way).

    One pull request is open at a time, for at most what the caller asked
    less what it has not yet taken, so a busy caller never holds more work
    than it asked for (work it holds is work another replica cannot take).
    The request stays open until the server has delivered it whole or says
    it is over (its expiry, a leader change: a status message), so work
    that arrives while the caller is busy is already here when it asks
    again.
    """

    def __init__(
        self, js: Any, nc: Any, stream: str, durable: str, *, expires: float = 5.0
    ) -> None:
        self.js, self.nc = js, nc
        self.stream, self.durable = stream, durable
        self.expires = expires
        self._ready: list[Any] = []
        self._arrived = asyncio.Event()
        self._sub: Any = None
        self._inbox = ""
        # The open request: its number (its reply subject's last token), the
        # messages it still owes, and when it is over at the latest.
        self._request = 0
        self._reply = ""
        self._owed = 0
        self._until = 0.0

    async def start(self, config: ConsumerConfig) -> None:
        """Bind to the durable consumer ``config`` names, creating it if it
        does not exist (an existing one is left as it is, as nats-py's
        ``pull_subscribe`` does)."""
        try:
            await self.js.consumer_info(self.stream, self.durable)
        except nats.js.errors.NotFoundError:
            await self.js.add_consumer(self.stream, config=config)
        self._inbox = self.nc.new_inbox()
        self._sub = await self.nc.subscribe(f"{self._inbox}.*", cb=self._on_msg)

    async def stop(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None

    @property
    def held(self) -> int:
        """Messages delivered and not yet taken, plus those the open request
        still owes."""
        return len(self._ready) + self._owed

    async def _on_msg(self, msg: Any) -> None:
        status = msg.headers.get(STATUS) if msg.headers else None
        if status is None:
            # (A message comes with its own subject, not the request's: with
            # one request open at a time, it is that request's.)
            self._ready.append(msg)
            if self._owed:
                self._owed -= 1
        elif status != HEARTBEAT and msg.subject == self._reply:
            # 408 (expired), 409 (leader change, consumer deleted...), 404:
            # the request is over; the next fetch opens another. (A late
            # status of an earlier request names that request's subject.)
            self._owed = 0
        self._arrived.set()

    async def fetch(self, batch: int, timeout: float) -> list[Any]:
        """Up to ``batch`` messages: waits up to ``timeout`` for the first
        (raising ``nats.errors.TimeoutError`` if none comes), then returns it
        with what else has arrived, never waiting to fill the batch."""
        if self._sub is None:
            raise nats.errors.Error("puller not started")
        deadline = time.monotonic() + timeout
        while not self._ready:
            now = time.monotonic()
            if now >= deadline:
                raise nats.errors.TimeoutError
            if self._owed and now >= self._until:
                self._owed = 0  # no word from the server: over all the same
            if not self._owed:
                await self._ask(batch, min(self.expires, max(deadline - now, 0.05)))
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), deadline - time.monotonic())
        out = self._ready[:batch]
        del self._ready[:batch]
        if not self._owed and not self._ready and len(out) < batch:
            # Ask for the rest now, so it is on its way while this is decided.
            await self._ask(batch - len(out), self.expires)
        return out

    async def _ask(self, n: int, expires: float) -> None:
        self._request += 1
        self._reply = f"{self._inbox}.{self._request}"
        self._owed = n
        self._until = time.monotonic() + expires + 1.0
        body = {"batch": n, "expires": int(expires * 1e9)}
        await self.nc.publish(
            f"{DEFAULT_PREFIX}.CONSUMER.MSG.NEXT.{self.stream}.{self.durable}",
            json.dumps(body).encode(),
            reply=self._reply,
        )
