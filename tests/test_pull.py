"""Taking work from a pull consumer as it is ready (a real nats-server)."""

from __future__ import annotations

import asyncio
import time

import nats.errors
import pytest

from stratus.events.pull import fetch_ready
from stratus.events.store import STREAM
from stratus.ops.bench.schedkit import server_request


async def test_a_trickle_of_work_is_taken_without_waiting_to_fill_the_batch(store):
    sub = await store.js.pull_subscribe("ev.*.server.*", durable="pull-test", stream=STREAM)
    # An idle consumer: the first fetch waits, and work comes 5 at a time.
    waiting = asyncio.create_task(fetch_ready(sub, 256, timeout=5))
    await asyncio.sleep(0.2)
    t0 = time.monotonic()
    await store.append([server_request() for _ in range(5)])
    got = await waiting
    took = time.monotonic() - t0
    # nats-py 2.16's own fetch(256, timeout=5) returns here only after 5 s; the
    # bound leaves room for a loaded machine and is far below that.
    assert 1 <= len(got) <= 5
    assert took < 2.0, took
    # What is ready is taken at once, all of it, up to the batch.
    await store.append([server_request() for _ in range(20)])
    seen = len(got)
    deadline = time.monotonic() + 5
    while seen < 25 and time.monotonic() < deadline:
        msgs = await fetch_ready(sub, 256, timeout=1)
        for m in msgs:
            await m.ack()
        seen += len(msgs)
    assert seen == 25
    for m in got:
        await m.ack()


async def test_no_work_within_the_timeout_raises(store):
    sub = await store.js.pull_subscribe("ev.*.server.*", durable="pull-idle", stream=STREAM)
    with pytest.raises((TimeoutError, nats.errors.TimeoutError)):
        await fetch_ready(sub, 16, timeout=0.3)


async def test_a_batch_of_one_is_one_fetch(store):
    sub = await store.js.pull_subscribe("ev.*.server.*", durable="pull-one", stream=STREAM)
    await store.append([server_request() for _ in range(3)])
    got = await fetch_ready(sub, 1, timeout=5)
    assert len(got) == 1
