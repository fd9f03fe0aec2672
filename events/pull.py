"""Taking work from a JetStream pull consumer without waiting for a batch.

nats-py's ``fetch(n, timeout)``, when nothing is waiting, leaves a pull
request for ``n`` messages on the server and, once the first arrives, keeps
waiting for the other ``n - 1`` until the timeout: work that trickles in
(50 requests every 50 ms) sits in a half-filled batch for up to the whole
timeout. Measured on the scheduler at 1,000 requests/s offered: p50 16 ms,
p99 938 ms. ``fetch_ready`` waits for one message only, then takes what is
already there.
"""

from __future__ import annotations

from typing import Any

import nats.errors

# How long the second, non-waiting fetch may take to bring what is there:
# it asks with ``no_wait``, so the server answers at once; this only bounds
# a slow answer (whatever arrives later is taken by the next call).
DRAIN_S = 0.01


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
