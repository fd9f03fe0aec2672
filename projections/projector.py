"""The projector: folds the log into SQL views, in stream order, exactly once.

Each batch of events is folded in memory (``RowBatch``) and written in one
transaction together with the checkpoint (the last applied sequence). A
crash or cancellation mid-batch rolls the whole batch back, and the next run
starts after the checkpoint: nothing is skipped and nothing applied twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import structlog
from sqlalchemy import Engine, Index, Table, delete, func, insert, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.schema import CreateIndex

from stratus.events.store import EventStore, Recorded, Until
from stratus.events.tasks import cancel, shielded
from stratus.projections.batch import Patch, RowBatch, Statement, Upsert, insert_statement
from stratus.projections.db import sqlite_path, sync_writer
from stratus.projections.schema import checkpoints, metadata, quarantine, view_schemas
from stratus.projections.snapshots import LIVE_ONLY, Snapshots
from stratus.projections.views import View, all_views, dispatch
from stratus.projections.writer import WriterProcess, Written

log = structlog.get_logger("stratus.projector")

DEFAULT_NAME = "main"

# Called first in a write transaction; raises to stop the write.
Fence = Callable[[AsyncConnection], Awaitable[None]]
BULK_COMMIT_EVERY = 50_000


async def init_schema(engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        await conn.run_sync(metadata.create_all)


async def read_checkpoint(conn: AsyncConnection, name: str = DEFAULT_NAME) -> int:
    row = (
        await conn.execute(select(checkpoints.c.last_seq).where(checkpoints.c.name == name))
    ).first()
    return int(row[0]) if row else 0


def fingerprint(view: View) -> str:
    """A hash of a view's tables: names, columns, types, keys, nullability."""
    h = hashlib.sha256()
    for table in sorted(view.tables, key=lambda t: t.name):
        h.update(f"table {table.name}\n".encode())
        for c in sorted(table.columns, key=lambda c: c.name):
            h.update(f"{c.name} {c.type!r} pk={c.primary_key} null={c.nullable}\n".encode())
    return h.hexdigest()


async def quarantine_count(conn: AsyncConnection) -> int:
    return int((await conn.execute(select(func.count()).select_from(quarantine))).scalar_one())


class Projector:
    def __init__(
        self,
        store: EventStore,
        engine: AsyncEngine,
        *,
        views: Sequence[View] | None = None,
        name: str = DEFAULT_NAME,
        batch: int = 2000,
        snapshots: Snapshots | None = None,
        bulk: bool = False,
        helper: bool = False,
        fence: Fence | None = None,
    ) -> None:
        """``bulk``: a rebuild into a new store that nothing reads until it
        is complete (``build_store``). Starting from 0, the secondary
        indexes are built once at the end instead of row by row, and a
        SQLite file is written without syncs (a crash leaves a file nobody
        swaps in). A SQLite catch-up commits every ``commit_every`` events
        instead of every batch (``_load``), the checkpoint with the rows as
        ever. ``helper``: a bulk load into a SQLite file writes through a
        second process (``writer``) while this one reads and folds; its
        commits are those of the in-process load, made a little later.
        ``fence``: called first in each write transaction, it raises if this
        projector may no longer write the store (``projections.leased``)."""
        self.store = store
        self.engine = engine
        self.views = list(views) if views is not None else all_views()
        self._dispatch = dispatch(self.views)
        # A bulk load's cheaper path for append-only views (``View.row``):
        # their rows go straight to an INSERT, not through ``RowBatch``.
        self._bulk_dispatch = dispatch([v for v in self.views if v.row is None])
        self._row_views = [
            (v.tables[0], v.row, frozenset(v.folds)) for v in self.views if v.row is not None
        ]
        self.name = name
        self.batch = batch
        self.position = 0
        self._folded = 0
        self._skip: frozenset[int] = frozenset()
        self._check_schema = True
        self.bulk = bulk
        self.helper = helper
        # What the helper reported (its peak RSS, its time), once done.
        self.helper_written: Written | None = None
        # A bulk load's events per transaction (``_load``): bounds the rows
        # held in memory and the work a stopped load loses.
        self.commit_every = BULK_COMMIT_EVERY
        # Indexes dropped for a bulk load, created again when it ends.
        self._deferred: list[Index] = []
        self._sync = sync_writer(engine, bulk=bulk)
        if fence is not None and self._sync is not None:
            raise ValueError("a fenced projector writes through the async engine (not SQLite)")
        self.fence = fence
        # Checkpoint snapshots are copies of a SQLite file (time travel's
        # starting points); other backends do without.
        self._db_path = sqlite_path(engine)
        self.snapshots = snapshots if self._db_path is not None else None

    def close(self) -> None:
        if self._sync is not None:
            self._sync.dispose()

    async def aclose(self) -> None:
        """``close``, after letting a snapshot in progress finish."""
        if self.snapshots is not None:
            await self.snapshots.wait()
        self.close()

    async def start_position(self) -> int:
        await init_schema(self.engine)
        async with self.engine.connect() as conn:
            self.position = await read_checkpoint(conn, self.name)
        self._folded = self.position
        if self._check_schema:
            await self._check_views()
        if self.bulk and self.position == 0:
            await self._defer_indexes()
        else:
            # A bulk load that stopped part way left its indexes out.
            await self._create_indexes(self._view_indexes())
        return self.position

    def _view_indexes(self) -> list[Index]:
        return [ix for v in self.views for t in v.tables for ix in sorted(t.indexes, key=_name)]

    async def _defer_indexes(self) -> None:
        self._deferred = self._view_indexes()
        if not self._deferred:
            return
        async with self.engine.begin() as conn:
            for ix in self._deferred:
                await conn.run_sync(ix.drop, checkfirst=True)

    async def _create_indexes(self, indexes: list[Index]) -> None:
        if not indexes:
            return
        if self._sync is not None and self.bulk:
            # The bulk writer's connection: its pragmas let SQLite sort each
            # index with helper threads (on the other core) in a big cache.
            with self._sync.begin() as sconn:
                for ix in indexes:
                    ix.create(sconn, checkfirst=True)
            return
        async with self.engine.begin() as conn:
            for ix in indexes:
                await conn.run_sync(ix.create, checkfirst=True)

    async def finish_bulk(self) -> None:
        """Create the indexes a bulk load deferred (one sorted pass each)."""
        deferred, self._deferred = self._deferred, []
        await self._create_indexes(deferred)

    async def _check_views(self) -> None:
        """Rebuild every view whose tables changed (or that is new) since
        the store last folded it: schema changes need no migration."""
        want = {v.name: fingerprint(v) for v in self.views}
        async with self.engine.connect() as conn:
            rows = (await conn.execute(select(view_schemas))).all()
        have = {r.view: r.fingerprint for r in rows}
        stale = [v for v in self.views if have.get(v.name) != want[v.name]]
        if not stale:
            return
        if self.position > 0:
            log.warning(
                "view schema changed; rebuilding from the log",
                views=[v.name for v in stale],
                until=self.position,
            )
            await self._rebuild_views(stale)
        async with self.engine.begin() as conn:
            await self._fenced(conn)
            for v in stale:
                await conn.execute(delete(view_schemas).where(view_schemas.c.view == v.name))
            await conn.execute(
                insert(view_schemas), [{"view": v.name, "fingerprint": want[v.name]} for v in stale]
            )

    async def _rebuild_views(self, stale: list[View]) -> None:
        tables: list[Table] = [t for v in stale for t in v.tables]
        async with self.engine.begin() as conn:
            await self._fenced(conn)
            for t in tables:
                await conn.run_sync(t.drop, checkfirst=True)
                await conn.run_sync(t.create)
            poisoned = (await conn.execute(select(quarantine.c.seq))).scalars().all()
        name = f"schema:{self.name}"
        sub = Projector(
            self.store, self.engine, views=stale, name=name, batch=self.batch, fence=self.fence
        )
        # Events already quarantined stay so (and out of every view), as in
        # a full rebuild.
        sub._skip = frozenset(poisoned)
        sub._check_schema = False
        try:
            await sub.catch_up(until=self.position)
        finally:
            sub.close()
        async with self.engine.begin() as conn:
            await self._fenced(conn)
            await conn.execute(delete(checkpoints).where(checkpoints.c.name == name))

    async def run(self) -> None:
        """Follow the log forever (until cancelled)."""
        after = await self.start_position()
        log.info("projector started", after=after)
        async with _reading(self.store.subscribe(after=after, batch=self.batch)) as batches:
            await self._consume(batches)

    async def catch_up(
        self,
        until: Until = None,
        progress: Callable[[int, int], Any] | None = None,
    ) -> int:
        """Apply everything up to ``until`` (default: the end as of now)."""
        after = await self.start_position()
        async with _reading(self.store.read(after=after, until=until, batch=self.batch)) as batches:
            if self.bulk and self._sync is not None:
                await self._load(batches, progress)
            else:
                await self._consume(batches, progress)
        if self._deferred:
            await self.finish_bulk()
        return self.position

    async def apply(self, recs: list[Recorded]) -> None:
        """Fold and write one batch (what ``run`` does, without the overlap)."""
        self._folded = max(self._folded, self.position)
        prepared = self._fold(recs)
        if prepared is not None:
            await self._write(prepared)

    async def _consume(
        self,
        batches: AsyncIterator[list[Recorded]],
        progress: Callable[[int, int], Any] | None = None,
    ) -> None:
        # Fold the next batch while the previous one is being written: the
        # write runs in the database driver's thread, the fold in ours.
        # Writes stay strictly in order, one transaction each. The write is
        # awaited through a shield, like the log (``_reading``), so that a
        # cancellation always reaches this task.
        writing: asyncio.Task[None] | None = None
        try:
            async for recs in batches:
                prepared = self._fold(recs)
                if prepared is None:
                    continue
                if writing is not None:
                    await asyncio.shield(writing)
                writing = asyncio.create_task(self._write(prepared))
                if progress:
                    progress(len(recs), recs[-1].seq)
            if writing is not None:
                await asyncio.shield(writing)
        finally:
            if writing is not None and not writing.done():
                # Mid-transaction: the rollback happens in the write itself.
                await cancel(writing)

    async def _load(
        self,
        batches: AsyncIterator[list[Recorded]],
        progress: Callable[[int, int], Any] | None = None,
    ) -> None:
        """A bulk load into SQLite: one transaction per ``commit_every`` events.

        Rows are folded in memory across the batches of a transaction, so a
        resource row changed many times is written once per commit, not
        once per batch; append-only rows (the audit trail: one per event,
        never changed) go into the open transaction batch by batch, to keep
        memory flat. The checkpoint commits with the rows as ever: a load
        stopped part way rolls back to the last commit, and resumes there.
        """
        assert self._sync is not None
        dialect = self._sync.dialect
        carry = RowBatch()
        appended: dict[Table, list[list[Any]]] = {t: [] for t, _, _ in self._row_views}
        inserts = {t: insert_statement(dialect, t) for t in appended}
        poison = insert_statement(dialect, quarantine)
        poison_cols = [c.name for c in quarantine.columns]
        folded = 0
        last = self.position
        sink: _Writes = (
            _HelperWrites(self._db_path)
            if self.helper and self._db_path is not None
            else _LocalWrites(self._sync)
        )
        # Dates left to the writer process to format (``batch.Statement``).
        keep = not sink.synchronous
        with _fewer_collections():
            try:
                async for recs in batches:
                    prepared = self._fold(recs, carry, appended)
                    if prepared is None:
                        continue
                    out: list[Statement] = []
                    for t, new in appended.items():
                        if new:
                            st = inserts[t]
                            out.append(st.statement(st.lists(new, keep), keep))
                    out += carry.statements(dialect, LIVE_ONLY, keep_dates=keep)
                    if prepared.poisoned:
                        rows = [[q[c] for c in poison_cols] for q in prepared.poisoned]
                        out.append(poison.statement(poison.lists(rows), False))
                        self._warn(prepared.poisoned)
                    folded += len(recs)
                    last = prepared.last
                    commit = folded >= self.commit_every
                    if commit:
                        out += carry.statements(dialect, keep_dates=keep)
                        folded = 0
                    await sink.write(out, commit)
                    for new in appended.values():
                        new.clear()
                    if commit and sink.synchronous:
                        self.position = last
                    if progress:
                        progress(len(recs), recs[-1].seq)
                await sink.write(carry.statements(dialect, keep_dates=keep), True)
                deferred, self._deferred = self._deferred, []
                if not await sink.finish([_create_index(ix, dialect) for ix in deferred]):
                    self._deferred = deferred  # built by ``finish_bulk``, here
                if isinstance(sink, _HelperWrites):
                    self.helper_written = sink.written
                self.position = last
            except BaseException:
                sink.abort()
                raise

    def _fold(
        self,
        recs: list[Recorded],
        rows: RowBatch | None = None,
        appended: dict[Table, list[list[Any]]] | None = None,
    ) -> _Prepared | None:
        """Fold ``recs`` into ``rows`` (a new batch by default); with
        ``appended``, the append-only views' rows go there, per table."""
        if rows is None:
            rows = RowBatch()
        poisoned: list[dict[str, Any]] = []
        codec = self.store.codec
        if appended is None:
            folds, row_views = self._dispatch, []
        else:
            folds, row_views = self._bulk_dispatch, self._row_views
        none: list = []
        floor = self._folded
        skip = self._skip
        add = rows.add
        decode = codec.decode
        # (the usual case, the audit trail: one append-only view)
        one_row = row_views[0] if len(row_views) == 1 else None
        for rec in recs:
            seq = rec.seq
            if seq <= floor:
                continue  # redelivered after a reconnect: already applied
            if seq in skip:
                continue
            try:
                event = decode(rec.data)
                cls = type(event)
                # A list: folds may be generators, whose errors show here.
                ops = [op for f in folds.get(cls, none) for op in f(seq, event)]
                if one_row is not None:
                    new = [(one_row[0], one_row[1](seq, event))] if cls in one_row[2] else []
                else:
                    new = [(t, row(seq, event)) for t, row, types in row_views if cls in types]
                # A NUL byte in the raw data is the cheap sign (usually there
                # is none); only then look at the text values themselves.
                if b"\x00" in rec.data and (_has_nul(ops) or _rows_nul(new)):
                    raise ValueError(NUL_REFUSED)
            except Exception as exc:
                poisoned.append(
                    {
                        "seq": rec.seq,
                        "subject": rec.subject,
                        "error": f"{type(exc).__name__}: {exc}"[:2000],
                        "data": rec.data,
                        "attempts": 1,
                    }
                )
                continue
            for op in ops:
                add(op)
            if appended is not None:
                for t, r in new:
                    appended[t].append(r)
        last = recs[-1].seq
        if last <= floor:
            return None
        rows.add(Upsert(checkpoints, {"name": self.name, "last_seq": last}))
        self._folded = last
        return _Prepared(rows, poisoned, last)

    def _write_sync(self, p: _Prepared) -> None:
        assert self._sync is not None
        with self._sync.begin() as sconn:
            p.rows.flush_sync(sconn)
            if p.poisoned:
                sconn.execute(insert(quarantine), p.poisoned)

    async def _write(self, p: _Prepared) -> None:
        if self._sync is not None:
            self._write_sync(p)
        else:
            async with self.engine.begin() as conn:
                await self._fenced(conn)
                await p.rows.flush(conn)
                if p.poisoned:
                    await conn.execute(insert(quarantine), p.poisoned)
        self.position = p.last
        if self.snapshots is not None and self._db_path is not None:
            # Between batches: the copy's read transaction sees this commit.
            self.snapshots.maybe_take(self._db_path, p.last)
        self._warn(p.poisoned)

    async def _fenced(self, conn: AsyncConnection) -> None:
        if self.fence is not None:
            await self.fence(conn)

    @staticmethod
    def _warn(poisoned: list[dict[str, Any]]) -> None:
        for q in poisoned:
            log.warning("event quarantined", seq=q["seq"], subject=q["subject"], error=q["error"])


def _reading(
    batches: AsyncIterator[list[Recorded]],
) -> contextlib.aclosing[AsyncIterator[list[Recorded]]]:
    """The log's batches, for a projector that must stop when cancelled.

    Each batch is read in a task of its own (``events.tasks.shielded``):
    the reader waits on NATS requests, and on Python 3.11 such a wait can
    swallow a cancellation, which left a cancelled projector following the
    log (and a test waiting for it to stop timed out). The projector's own
    task waits only on that task, so a cancellation always stops it, and
    the reader is then cancelled until it has stopped and closed.
    """
    return contextlib.aclosing(shielded(batches))


# Allocations between young-generation collections during a bulk load.
BULK_GC_YOUNG = 50_000


@contextlib.contextmanager
def _fewer_collections() -> Iterator[None]:
    """Collect garbage seldom while a bulk load runs.

    Each event allocates a few dicts and tuples that live one batch, and at
    the default threshold (700) the collector ran every few events and kept
    re-scanning the rows held for the open transaction: with collections
    every 50,000 allocations the load ran about a quarter faster (200,000
    events). Nothing of the load is cyclic, so little is left for later.
    """
    old = gc.get_threshold()
    gc.set_threshold(max(old[0], BULK_GC_YOUNG), *old[1:])
    try:
        yield
    finally:
        gc.set_threshold(*old)


NUL_REFUSED = "a text value holds a NUL character, which PostgreSQL text cannot store"


def _name(ix: Index) -> str:
    return str(ix.name)


def _rows_nul(rows: list[tuple[Table, list[Any]]]) -> bool:
    # Plain loops: msgpack writes small integers as NUL bytes, so this runs
    # for about a quarter of a rebuild's events.
    for _, r in rows:
        for v in r:
            if type(v) is str and "\x00" in v:
                return True
    return False


def _has_nul(ops: list[Any]) -> bool:
    """Whether a row would carry "\\x00" in text: PostgreSQL refuses such a
    row (and so the whole batch, again on every retry) while SQLite keeps it.
    Quarantining the event on every backend keeps them identical."""
    for op in ops:
        # Called for about every other event of a rebuild: no tuple built
        # per op, one loop per kind of value.
        if type(op) is Upsert:
            for v in op.row.values():
                if type(v) is str and "\x00" in v:
                    return True
            continue
        for v in op.key:
            if type(v) is str and "\x00" in v:
                return True
        if type(op) is Patch:
            for v in op.values.values():
                if type(v) is str and "\x00" in v:
                    return True
    return False


def _create_index(ix: Index, dialect: Any) -> str:
    return str(CreateIndex(ix, if_not_exists=True).compile(dialect=dialect))


class _Writes:
    """Where a bulk load's statements go: ``_load`` does not care which."""

    # Whether a commit is done when ``write`` returns. A helper commits
    # later, in order: the position moves once it has answered at the end
    # (after a failure, the store's own checkpoint says where it stopped).
    synchronous = True

    async def write(self, statements: list[Statement], commit: bool) -> None:
        raise NotImplementedError

    async def finish(self, ddl: list[str]) -> bool:
        """Commit; True if ``ddl`` (the deferred indexes) was run too."""
        raise NotImplementedError

    def abort(self) -> None:
        raise NotImplementedError


class _LocalWrites(_Writes):
    """On the bulk writer's own connection, in this process."""

    def __init__(self, engine: Engine) -> None:
        self.conn = engine.connect()
        # The driver's own cursor: it binds value lists as they are
        # (SQLAlchemy would want a tuple made of each).
        self.cursor = self.conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        self.tx = self.conn.begin()

    async def write(self, statements: list[Statement], commit: bool) -> None:
        for sql, rows, _ in statements:
            self.cursor.executemany(sql, rows)
        if commit:
            self.tx.commit()
            self.tx = self.conn.begin()

    async def finish(self, ddl: list[str]) -> bool:
        self.tx.commit()
        self.conn.close()
        return False  # indexes: ``finish_bulk``, with its sorting pragmas

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self.tx.rollback()
        self.conn.close()


class _HelperWrites(_Writes):
    """In a writer process (``writer.WriterProcess``) beside this one."""

    synchronous = False

    def __init__(self, path: Path) -> None:
        self.proc = WriterProcess(path)
        self.proc.start()
        self.written: Written | None = None

    async def write(self, statements: list[Statement], commit: bool) -> None:
        await self.proc.write(statements, commit)

    async def finish(self, ddl: list[str]) -> bool:
        self.written = await self.proc.finish(ddl)
        log.info("bulk load written by a helper", **msgspec.structs.asdict(self.written))
        return True

    def abort(self) -> None:
        self.proc.abort()


class _Prepared:
    __slots__ = ("last", "poisoned", "rows")

    def __init__(self, rows: RowBatch, poisoned: list[dict[str, Any]], last: int) -> None:
        self.rows = rows
        self.poisoned = poisoned
        self.last = last


async def digest(
    conn: AsyncConnection,
    views: Sequence[View] | None = None,
    *,
    live: tuple[AsyncConnection, int] | None = None,
) -> str:
    """A hash of every view's content: equal histories give equal digests.

    Checkpoints are left out (a rebuild beside the live store has another
    name); quarantined events are included so a poison event shows. For a
    past store, ``live`` (the live store and the past point) supplies the
    append-only tables snapshots leave out: their rows up to that point.
    """
    h = hashlib.sha256()
    tables = [t for v in (views if views is not None else all_views()) for t in v.tables]
    tables.append(quarantine)
    for table in sorted(tables, key=lambda t: t.name):
        h.update(f"\x00table {table.name}\n".encode())
        cols = [c for c in table.columns if c.name != "data"]
        order = list(table.primary_key.columns)
        q = select(*cols).order_by(*order)
        if live is not None and table.name in LIVE_ONLY:
            # The past store holds this table's rows from where its replay
            # began (a snapshot leaves them out); the live one the rest.
            source, upto = live
            lo = (await conn.execute(select(func.min(table.c.seq)))).scalar()
            head = q.where(table.c.seq < (lo if lo is not None else upto + 1))
            async for row in await source.stream(head):
                h.update(_canonical(row).encode())
        result = await conn.stream(q)
        async for row in result:
            h.update(_canonical(row).encode())
    return h.hexdigest()


async def store_digest(engine: AsyncEngine) -> tuple[int, str]:
    """The checkpoint and the digest, read from one snapshot."""
    async with engine.connect() as conn, conn.begin():
        return await read_checkpoint(conn), await digest(conn)


def _canonical(row: Any) -> str:
    parts = []
    for v in row:
        if isinstance(v, datetime):
            # SQLite drops the zone, PostgreSQL (timestamptz) answers in UTC:
            # naive UTC on both, so backends hash alike.
            if v.tzinfo is not None:
                v = v.astimezone(UTC)
            v = v.replace(tzinfo=None).isoformat()
        parts.append(repr(v))
    return "\x1f".join(parts) + "\n"
