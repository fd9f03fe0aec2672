"""Stopping asyncio tasks for sure, on Python 3.11.

Python 3.11's ``asyncio.wait_for`` loses a cancellation that lands in the
loop turn where the awaited future completes: it returns the result and the
task runs on (CPython gh-86296, fixed in 3.12 by rewriting ``wait_for`` on
``asyncio.timeout``). nats-py waits for every request's reply that way, and
so does the store's reader, so a task following the log can shrug off a
``cancel()`` and go on reading forever; a plain ``await task`` then hangs.

Two rules follow, and everything that stops a task which talks to NATS
uses them: a task that must stop when cancelled waits on such work only
through another task (``shielded``), never directly, and it stops that
task with ``cancel``, which cancels again until it takes.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any, TypeVar

import structlog

log = structlog.get_logger("stratus.tasks")

T = TypeVar("T")

# How long a cancelled task may take to finish before it is cancelled again:
# cleanup (a rollback, an unsubscribe) takes milliseconds.
RETRY_S = 0.25


async def cancel(task: asyncio.Future[Any], tries: int = 20) -> bool:
    """Cancel ``task`` and wait until it is done, cancelling again if it
    swallowed one. Its result or error is dropped. False if it still runs
    after ``tries`` attempts (logged)."""
    for _ in range(tries):
        task.cancel()
        done, _pending = await asyncio.wait([task], timeout=RETRY_S)
        if done:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                task.result()
            return True
    log.warning("task did not stop", task=getattr(task, "get_name", lambda: repr(task))())
    return False


async def shielded(items: AsyncIterator[T]) -> AsyncIterator[T]:
    """``items``, each fetched in a task of its own.

    The caller's task only waits on that task (``asyncio.shield``), which a
    cancellation always interrupts; the fetch is then stopped with
    ``cancel``, and ``items`` closed. Use it with ``contextlib.aclosing``
    so ``items`` is closed even when the caller stops between two items.
    """
    fetch: asyncio.Task[tuple[bool, T | None]] | None = None
    try:
        while True:
            fetch = asyncio.ensure_future(_next(items))
            more, item = await asyncio.shield(fetch)
            fetch = None
            if not more:
                return
            yield item  # type: ignore[misc]
    finally:
        stopped = fetch is None or fetch.done() or await cancel(fetch)
        close = getattr(items, "aclose", None)
        if stopped and close is not None:
            # Runs the generator's own cleanup (its ``finally``) if it is
            # parked at a ``yield``; a no-op once it has finished.
            await close()


async def _next(items: AsyncIterator[T]) -> tuple[bool, T | None]:
    try:
        return True, await anext(items)
    except StopAsyncIteration:
        return False, None
