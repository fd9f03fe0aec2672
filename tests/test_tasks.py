"""Stopping tasks whose awaits may swallow a cancellation (``events.tasks``)."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from stratus.events.tasks import cancel, shielded

pytestmark = pytest.mark.timeout(30)


class Stubborn:
    """An async generator's worth of items from a source that ignores the
    first ``swallow`` cancellations, as Python 3.11's ``wait_for`` does when
    its reply lands in the same loop turn as the cancel."""

    def __init__(self, swallow: int) -> None:
        self.swallow = swallow
        self.ignored = 0
        self.closed = False
        self.waiting = asyncio.Event()

    async def items(self):
        try:
            yield 1
            while True:
                self.waiting.set()
                try:
                    await asyncio.sleep(3600)
                except asyncio.CancelledError:
                    if self.ignored == self.swallow:
                        raise
                    self.ignored += 1
        finally:
            self.closed = True


async def test_cancel_cancels_again_until_the_task_stops():
    # given a task stuck in a wait that swallows two cancellations
    src = Stubborn(swallow=2)
    task = asyncio.create_task(_drain(src.items()))
    await src.waiting.wait()

    # a plain cancel() does not stop it...
    task.cancel()
    done, _ = await asyncio.wait([task], timeout=0.3)
    assert not done, "the first cancellation should have been swallowed"

    # ...and cancel() does, cancelling again
    assert await cancel(task) is True
    assert task.cancelled()
    assert src.ignored == 2 and src.closed


async def _drain(gen):
    async for _ in gen:
        pass


async def test_a_consumer_of_a_stubborn_source_stops_and_the_source_is_closed():
    # given a consumer reading through ``shielded`` from a source that
    # swallows the first cancellation
    src = Stubborn(swallow=1)
    got = []

    async def consume():
        async with contextlib.aclosing(shielded(src.items())) as items:
            async for item in items:
                got.append(item)

    consumer = asyncio.create_task(consume())
    await src.waiting.wait()

    # when the consumer is cancelled once
    consumer.cancel()

    # then it stops (a plain ``async for`` over the source would run on)...
    done, _ = await asyncio.wait([consumer], timeout=5)
    assert done and consumer.cancelled()
    assert got == [1]
    # ...once the source, cancelled again, has stopped and is closed
    assert src.ignored == 1
    assert src.closed


async def test_a_consumer_that_stops_between_items_closes_the_source():
    src = Stubborn(swallow=0)

    async def first():
        async with contextlib.aclosing(shielded(src.items())) as items:
            async for item in items:
                return item

    assert await first() == 1
    assert src.closed
