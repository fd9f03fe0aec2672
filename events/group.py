"""Group commit: concurrent appends coalesced into atomic batches.

With ``sync_interval: always`` every acknowledged publish waits for a disk
sync, and a command service with many requests in flight spends its time
waiting for acknowledgements in lockstep with the broker. A ``GroupCommit``
sends the first append at once and, while batches are in flight, gathers
the appends that arrive into the next batch, so one round trip and one sync
serve many commands. A lone caller pays no extra latency.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from stratus.events.model import Event
from stratus.events.store import (
    MAX_BATCH,
    AppendRequest,
    AppendResult,
    Condition,
    EventStore,
)


class GroupCommit:
    def __init__(self, store: EventStore, *, max_in_flight: int = 2) -> None:
        self.store = store
        self.max_in_flight = max_in_flight
        self._pending: list[tuple[AppendRequest, asyncio.Future[AppendResult]]] = []
        self._in_flight = 0
        self._tasks: set[asyncio.Task[None]] = set()

    async def append(
        self,
        events: Sequence[Event],
        condition: Condition | Sequence[Condition] | None = None,
        *,
        msg_id: str | None = None,
    ) -> AppendResult:
        """Same contract as ``EventStore.append``."""
        fut: asyncio.Future[AppendResult] = asyncio.get_running_loop().create_future()
        self._pending.append((AppendRequest(list(events), condition, msg_id), fut))
        self._kick()
        return await fut

    def _kick(self) -> None:
        while self._pending and self._in_flight < self.max_in_flight:
            take, size = 0, 0
            for req, _ in self._pending:
                if take and size + len(req.events) > MAX_BATCH:
                    break
                take += 1
                size += len(req.events)
            group, self._pending = self._pending[:take], self._pending[take:]
            self._in_flight += 1
            task = asyncio.create_task(self._flush(group))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _flush(self, group: list[tuple[AppendRequest, asyncio.Future[AppendResult]]]) -> None:
        try:
            results = await self.store.append_group([req for req, _ in group])
        except BaseException as exc:  # cancelled, or a bug: no caller waits forever
            for _, fut in group:
                if not fut.done():
                    fut.set_exception(exc)
            raise
        finally:
            self._in_flight -= 1
            self._kick()
        for (_, fut), res in zip(group, results, strict=True):
            if fut.done():
                continue
            if isinstance(res, Exception):
                fut.set_exception(res)
            else:
                fut.set_result(res)
