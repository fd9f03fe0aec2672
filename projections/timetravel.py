"""Time travel: the projection store as it was at a past point of the log.

A query with ``Stratus-At: SEQ|TIME`` is answered from a store built by
replaying the log up to that sequence into a temporary SQLite file, with
every view but the audit trail, whose rows up to a point are the live
view's (the query service reads them there, and so does the digest of a
past point). The live store is never written.

- ``resolve`` turns the header into a sequence: a number is taken as is
  (1 .. the log's last sequence); an ISO-8601 time (UTC when no offset is
  given) means the last event stored at or before it, to the microsecond.
- Built stores are cached by sequence (LRU, ``max_stores`` of them): asking
  the same point again costs a lookup. An evicted store's files are removed
  once no query reads it any more, and all of them when the service stops.
  Concurrent requests for the same point share one build.
- A build starts from the nearest copy at or below the target that it can
  find, instead of from sequence 1: one of the live projector's checkpoint
  snapshots (see ``snapshots``), or an already built past store. Only the
  remainder of the log is replayed.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import sqlite3
import tempfile
from collections import OrderedDict
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import structlog
from sqlalchemy.ext.asyncio import AsyncEngine

from stratus.events.errors import Internal, Invalid
from stratus.events.store import EventStore
from stratus.events.tasks import cancel
from stratus.projections.db import make_engine, sqlite_url
from stratus.projections.projector import Projector
from stratus.projections.snapshots import LIVE_ONLY, Snapshots
from stratus.projections.sqlitefile import connect_existing
from stratus.projections.views import View, all_views

log = structlog.get_logger("stratus.timetravel")

DEFAULT_MAX_STORES = 4
# Builds replay the log and write SQLite: on a small machine two at once is
# plenty, and a queue of them must not starve live queries.
MAX_CONCURRENT_BUILDS = 2
_SEQ = re.compile(r"^[+-]?\d+$")


async def resolve(store: EventStore, at: str) -> int:
    """The stream sequence ``at`` names, or ``Invalid`` saying why not."""
    text = at.strip()
    if not text:
        raise Invalid("--at: empty; give a sequence number or an ISO-8601 UTC time")
    if _SEQ.match(text):
        seq = int(text)
        if seq < 1:
            raise Invalid(f"--at {text}: a sequence number is 1 or more")
        last = await store.last_seq()
        if seq > last:
            raise Invalid(f"--at {text}: beyond the end of the log (last sequence is {last})")
        return seq
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise Invalid(
            f"--at {text!r}: not a sequence number or an ISO-8601 UTC time "
            "(e.g. 2026-01-02T03:04:05Z)"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    # The first event after the moment, minus one, is the last one at or
    # before it (sequences have no gaps: the log is never purged).
    after = await store.first_seq_after(when + timedelta(microseconds=1))
    seq = after - 1 if after else await store.last_seq()
    if seq < 1:
        raise Invalid(f"--at {text}: before the first event of the log")
    return seq


class PastStore:
    """One built store: the world as of ``seq``."""

    def __init__(self, seq: int, path: Path, engine: AsyncEngine, base: int) -> None:
        self.seq = seq
        self.path = path
        self.engine = engine
        self.base = base  # the checkpoint it was copied from (0: replayed from 1)
        self.users = 0
        self.evicted = False
        self.closed = False

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        await self.engine.dispose()
        _remove(self.path)


class TimeTravel:
    def __init__(
        self,
        store: EventStore,
        *,
        snapshots: Snapshots | None = None,
        views: Sequence[View] | None = None,
        max_stores: int = DEFAULT_MAX_STORES,
        batch: int = 2000,
    ) -> None:
        if max_stores < 1:
            raise ValueError("max_stores must be at least 1")
        self.store = store
        self.snapshots = snapshots
        # The audit view's rows of a past point are the live view's up to it
        # (see snapshots.LIVE_ONLY): a past store need not fold them again.
        self.views = (
            list(views)
            if views is not None
            else [v for v in all_views() if not all(t.name in LIVE_ONLY for t in v.tables)]
        )
        self.max_stores = max_stores
        self.batch = batch
        self._cache: OrderedDict[int, PastStore] = OrderedDict()
        self._building: dict[int, asyncio.Task[PastStore]] = {}
        self._gate = asyncio.Semaphore(MAX_CONCURRENT_BUILDS)
        self._dir: Path | None = None
        self._n = 0
        # What tests and benchmarks look at.
        self.hits = 0
        self.builds = 0
        self.replayed = 0

    async def resolve(self, at: str) -> int:
        return await resolve(self.store, at)

    def cached(self) -> list[int]:
        return list(self._cache)

    async def acquire(self, seq: int) -> PastStore:
        """The store as of ``seq``, held until ``release``."""
        for _ in range(5):
            past = self._cache.get(seq)
            if past is not None:
                self._cache.move_to_end(seq)
                self.hits += 1
            else:
                task = self._building.get(seq)
                if task is None:
                    task = asyncio.create_task(self._build(seq))
                    self._building[seq] = task
                    task.add_done_callback(lambda _t, s=seq: self._building.pop(s, None))
                # A cancelled caller must not cancel the build others wait for.
                past = await asyncio.shield(task)
            if not past.closed:
                past.users += 1
                return past
            # Evicted between its build and our turn (a tiny cache): again.
        raise Internal(f"the store as of {seq} kept being evicted; enlarge the cache")

    async def release(self, past: PastStore) -> None:
        past.users -= 1
        if past.evicted and past.users <= 0:
            await past.close()

    async def close(self) -> None:
        await asyncio.gather(*(cancel(t) for t in list(self._building.values())))
        for past in list(self._cache.values()):
            await past.close()
        self._cache.clear()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    # -- building -----------------------------------------------------------

    def _workdir(self) -> Path:
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="stratus-at-"))
        return self._dir

    async def _build(self, seq: int) -> PastStore:
        async with self._gate:
            self._n += 1
            path = self._workdir() / f"at-{seq}-{self._n}.db"
            base = await self._copy_base(seq, path)
            engine = make_engine(sqlite_url(path))
            projector = Projector(self.store, engine, views=self.views, batch=self.batch)
            try:
                reached = await projector.catch_up(until=seq)
                if reached != seq:
                    raise Internal(f"replay stopped at {reached}, not at {seq}")
            except BaseException:
                projector.close()
                await PastStore(seq, path, engine, base).close()
                raise
            projector.close()
            # Fold the WAL into the file: it is then complete on its own,
            # and a later build can copy it as a base.
            async with engine.connect() as conn:
                await conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
            past = PastStore(seq, path, engine, base)
            self.builds += 1
            self.replayed += seq - base
            log.info("past store built", seq=seq, base=base, replayed=seq - base)
        self._cache[seq] = past
        await self._evict()
        return past

    async def _copy_base(self, seq: int, path: Path) -> int:
        """Copy the nearest known state at or below ``seq`` to ``path``."""
        candidates: list[tuple[int, Path, bool]] = []
        if self.snapshots is not None:
            snap = self.snapshots.nearest(seq)
            if snap is not None:
                candidates.append((snap[0], snap[1], False))
        below = [p for s, p in self._cache.items() if s <= seq and not p.closed]
        if below:
            best = max(below, key=lambda p: p.seq)
            candidates.append((best.seq, best.path, True))
        for base, source, live_file in sorted(candidates, key=lambda c: -c[0]):
            try:
                if live_file:
                    await asyncio.to_thread(_backup, source, path)
                else:
                    await asyncio.to_thread(shutil.copyfile, source, path)
                return base
            except (OSError, sqlite3.Error) as exc:
                # Pruned or evicted meanwhile: try the next, else replay from 1.
                log.info("time-travel base unusable", source=str(source), error=str(exc))
                _remove(path)
        return 0

    async def _evict(self) -> None:
        while len(self._cache) > self.max_stores:
            _seq, past = self._cache.popitem(last=False)
            past.evicted = True
            if past.users <= 0:
                await past.close()


def _backup(source: Path, target: Path) -> None:
    # The backup API copies a consistent state, WAL included.
    src = connect_existing(source, readonly=True)
    try:
        dst = sqlite3.connect(target)
        try:
            src.backup(dst)
        finally:
            dst.close()
    finally:
        src.close()


def _remove(path: Path) -> None:
    """A SQLite file and its companions."""
    for suffix in ("", "-wal", "-shm", "-journal"):
        with contextlib.suppress(OSError):
            Path(f"{path}{suffix}").unlink()
