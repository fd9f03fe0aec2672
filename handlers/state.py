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
    """Tracked states keyed by boundary subject and fold, least recently
    used evicted.

    The fold is part of the key: two verbs may fold the same subject into
    different states (a tenant's quota usage and its list of names, say),
    and one entry shared between them would hand each the other's state.
    """

    def __init__(self, store: EventStore, max_entries: int = 50_000) -> None:
        self.store = store
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple[str, Fold[Any]], Tracked[Any]] = OrderedDict()
        # subject -> the folds cached for it (what ``invalidate`` marks).
        self._folds: dict[str, set[Fold[Any]]] = {}
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    def get(self, subject: str, initial: Callable[[], S], fold: Fold[S]) -> Tracked[S]:
        key = (subject, fold)
        t = self._entries.get(key)
        if t is None:
            t = Tracked(initial())
            self._entries[key] = t
            self._folds.setdefault(subject, set()).add(fold)
            if len(self._entries) > self.max_entries:
                (old, old_fold), _ = self._entries.popitem(last=False)
                folds = self._folds.get(old)
                if folds is not None:
                    folds.discard(old_fold)
                    if not folds:
                        del self._folds[old]
        else:
            self._entries.move_to_end(key)
        return t

    def invalidate(self, subject: str, tenant: str) -> None:
        """An event landed on ``subject``: the cached boundaries it matches
        (its aggregate, its tenant's whole log), under every fold, are behind."""
        for boundary in (subject, f"ev.{tenant}.>"):
            for fold in self._folds.get(boundary, ()):
                t = self._entries.get((boundary, fold))
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
