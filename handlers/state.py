"""Decision state: folded from the log, cached, and always checked on append.

A command is decided against the state of its consistency boundary (an
aggregate subject such as ``ev.acme.tenant.acme``, or a tenant-wide filter
``ev.acme.>``) as of the last event matching it, ``seq``. The append then
carries the condition "nothing new matched after ``seq``", so a stale cache
costs a retry, never a wrong decision. That is why the cache may be
optimistic: an aggregate we have never seen is assumed empty (``seq`` 0);
a rejection, though, is only given on state freshly read from the log.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from stratus.events.model import Event
from stratus.events.store import EventStore

S = TypeVar("S")

Fold = Callable[[S, Event], S]


class Tracked(Generic[S]):
    """A boundary's state as of its last event ``seq``.

    It does not remember which commands landed: a retried command is
    recognised by the broker, which keeps every command id for its
    duplicate window (``EventStore.find_append``), whatever came between
    and across restarts.
    """

    __slots__ = ("seq", "stale", "state")

    def __init__(self, state: S) -> None:
        self.state = state
        self.seq = 0
        # Set when the stream shows another writer's event on this boundary:
        # the next decision reads it first instead of losing an append.
        self.stale = False

    def apply(self, seq: int, event: Event, fold: Fold[S]) -> None:
        self.state = fold(self.state, event)
        self.seq = seq


class StateCache:
    """Tracked states keyed by boundary subject, least recently used evicted."""

    def __init__(self, store: EventStore, max_entries: int = 50_000) -> None:
        self.store = store
        self.max_entries = max_entries
        self._entries: OrderedDict[str, Tracked[Any]] = OrderedDict()
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    def get(self, subject: str, initial: Callable[[], S]) -> Tracked[S]:
        t = self._entries.get(subject)
        if t is None:
            t = Tracked(initial())
            self._entries[subject] = t
            if len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        else:
            self._entries.move_to_end(subject)
        return t

    def invalidate(self, subject: str, tenant: str) -> None:
        """An event landed on ``subject``: the cached boundaries it matches
        (its aggregate, its tenant's whole log) are behind."""
        for key in (subject, f"ev.{tenant}.>"):
            t = self._entries.get(key)
            if t is not None:
                t.stale = True

    async def refresh(self, subject: str, tracked: Tracked[S], fold: Fold[S]) -> None:
        """Fold every event on ``subject`` after what ``tracked`` has seen."""
        tracked.stale = False
        async for batch in self.store.read(after=tracked.seq, subjects=[subject]):
            for rec in batch:
                tracked.apply(rec.seq, rec.decode(self.store.codec), fold)

    def lock(self, subject: str) -> _KeyLock:
        """Serialise this process's commands on one boundary (fewer conflicts)."""
        return _KeyLock(self._locks, subject)


class _KeyLock:
    def __init__(self, table: dict[str, tuple[asyncio.Lock, int]], key: str) -> None:
        self.table = table
        self.key = key

    async def __aenter__(self) -> None:
        lock, users = self.table.get(self.key, (None, 0))
        if lock is None:
            lock = asyncio.Lock()
        self.table[self.key] = (lock, users + 1)
        await lock.acquire()

    async def __aexit__(self, *exc: object) -> None:
        lock, users = self.table[self.key]
        lock.release()
        if users <= 1:
            del self.table[self.key]
        else:
            self.table[self.key] = (lock, users - 1)
