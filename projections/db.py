"""Engines for the projection store: SQLite (WAL) by default, any SQLAlchemy URL."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from sqlalchemy import URL, Engine, create_engine, event, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from stratus.events.errors import Invalid
from stratus.projections.sqlitefile import file_uri


def sqlite_url(path: str | Path) -> str:
    # Rendered by SQLAlchemy, which escapes what a URL would misread (?, #, %).
    url = URL.create("sqlite+aiosqlite", database=str(Path(path)))
    return url.render_as_string(hide_password=False)


def sqlite_path(engine: AsyncEngine | Engine) -> Path | None:
    """The file of a SQLite store (None: another backend, or in memory)."""
    url = engine.url
    db = url.database
    if engine.dialect.name != "sqlite" or not db or db == ":memory:":
        return None
    if url.query.get("uri") == "true" and db.startswith("file:"):
        name, _, params = db[len("file:") :].partition("?")
        if name == ":memory:" or "mode=memory" in params:
            return None
        return Path(unquote(name))
    return Path(db)


# SQLite's page cache for a bulk rebuild, in KiB: within the rebuild's
# memory budget (300 MB peak RSS at 1M events).
BULK_CACHE_KIB = 64 * 1024
BULK_SORT_THREADS = 2


def make_engine(url: str | URL, *, create: bool = True, **kw: Any) -> AsyncEngine:
    """An engine on the store at ``url``.

    A missing SQLite file must exist already (``Invalid``) unless
    ``create``; then it is made just before the engine's first connection,
    and only then (not here: a service that never opens its store, the
    handlers say, needs no data dir). Every connection opens the file with
    ``mode=rw``, so a store removed underneath later (a swapped-out one) is
    an error, never a new empty file (``sqlitefile``).
    """
    url, missing = _existing_file(make_url(url), create)
    engine = create_async_engine(url, **kw)
    if engine.dialect.name == "sqlite":
        _sqlite_setup(engine.sync_engine)
        if missing is not None:
            _create_before_first_connect(engine.sync_engine, missing)
    return engine


def _existing_file(url: URL, create: bool) -> tuple[URL, Path | None]:
    """A SQLite URL naming a plain file as the ``mode=rw`` URI of that file,
    and the file if it is missing (to be made by the first connection)."""
    db = url.database
    if not url.drivername.startswith("sqlite") or not db or db == ":memory:":
        return url, None
    if url.query.get("uri") == "true":
        return url, None  # the caller's own URI: its mode is theirs
    path = Path(db)
    missing = None
    if not path.exists():
        if not create:
            raise Invalid(f"no projection store at {path}")
        missing = path
    query = {**url.query, "mode": "rw", "uri": "true"}
    # ``file_uri`` ends in ``?mode=rw``; SQLAlchemy appends the query itself.
    return url.set(database=file_uri(path).partition("?")[0], query=query), missing


def _create_before_first_connect(engine: Engine, path: Path) -> None:
    """Make the empty file once, before the first connection; never again
    (a later connection to a removed store must fail, see ``make_engine``)."""
    pending = [True]

    @event.listens_for(engine, "do_connect")
    def _create(*_: Any) -> None:
        if not pending:
            return
        if not path.exists():
            # An empty file is an empty database; its schema comes from the
            # projector. (A directory still missing: this connection fails
            # as SQLite says, and the next one tries again.)
            with contextlib.suppress(sqlite3.OperationalError):
                sqlite3.connect(path).close()
        if path.exists():
            pending.clear()


def sync_writer(engine: AsyncEngine, *, bulk: bool = False) -> Engine | None:
    """A synchronous engine on the same SQLite file, for the projector's writes.

    aiosqlite runs each statement in a thread, and that thread and the event
    loop then trade the GIL row by row: a projector catch-up wrote at 63-68k
    events/s that way and at 73-78k/s writing in the loop itself (100,000
    tenant events, same run). Writes are short batches, so the loop is held
    for a few milliseconds at most. Other backends have truly asynchronous
    drivers and keep using ``engine``.
    """
    if engine.dialect.name != "sqlite":
        return None
    url = engine.url.set(drivername="sqlite")
    sync = create_engine(url)
    _sqlite_setup(sync)
    if bulk:
        _bulk_setup(sync)
    return sync


def _bulk_setup(engine: Engine) -> None:
    """A rebuild's writer: no fsync (a crash leaves a file nobody swaps in,
    and the rebuild starts a new one), a bigger page cache, and no automatic
    WAL checkpoints in the middle (``build_store`` checkpoints at the end)."""

    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_conn: Any, _record: Any) -> None:
        _run_pragmas(
            dbapi_conn,
            "PRAGMA synchronous=OFF",
            f"PRAGMA cache_size=-{BULK_CACHE_KIB}",
            # Worker threads for sorting (CREATE INDEX after the load).
            f"PRAGMA threads={BULK_SORT_THREADS}",
        )


def _sqlite_setup(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_conn: Any, _record: Any) -> None:
        _run_pragmas(
            dbapi_conn,
            # WAL: readers never block the projector's writer. NORMAL sync is
            # safe against a process crash; the store is rebuildable anyway.
            "PRAGMA journal_mode=WAL",
            "PRAGMA synchronous=NORMAL",
            "PRAGMA busy_timeout=10000",
            # Let SQLAlchemy, not the driver, decide when transactions begin,
            # so a read transaction sees one snapshot (SQLAlchemy's recipe).
            autocommit=True,
        )

    @event.listens_for(engine, "begin")
    def _begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN")

    @event.listens_for(engine, "invalidate")
    def _roll_back(dbapi_conn: Any, _record: Any, _exc: BaseException | None) -> None:
        # A task cancelled while a statement ran (aiosqlite awaits each one)
        # gets its connection invalidated: closed without a rollback, and
        # without closing that statement's cursor, which the traceback
        # still holds. SQLite closes a connection only once its statements
        # are gone, so the transaction, and the write lock, outlived the
        # task until the garbage collector freed the cursor. Rolled back
        # here, the store is free as soon as the task has stopped.
        with contextlib.suppress(Exception):
            dbapi_conn.rollback()


def _run_pragmas(dbapi_conn: Any, *pragmas: str, autocommit: bool = False) -> None:
    """A new connection's settings, or the connection closed.

    With aiosqlite each statement is awaited, so a task cancelled while
    connecting stops here. The pool then drops the connection without
    closing it, and its cursor (held by the traceback) kept the statement
    open: after a cancelled first connect, ``PRAGMA journal_mode=WAL`` held
    the new store's lock, and the next projector waited its busy timeout.
    So the cursor is always closed and, if setting up fails, the connection.
    """
    try:
        cur = dbapi_conn.cursor()
        try:
            for pragma in pragmas:
                cur.execute(pragma)
        finally:
            cur.close()
        if autocommit:
            dbapi_conn.isolation_level = None
    except BaseException:
        dbapi_conn.close()
        raise


class SharedEngine:
    """An engine and the readers using it: closed only after the last one.

    A rebuild's swap replaces the live store while queries run. A query
    takes the engine when it starts (``hold``) and may open its connections
    later, after an await (a NATS request, say); had the swap disposed the
    old engine and removed its file by then, that connection found no store.
    So the swap ``retire``s the old engine instead: it is disposed, and its
    ``cleanup`` (removing the file) run, when the last reader has
    ``release``d it, or at once if none holds it.
    """

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.readers = 0
        self.retired = False
        self.closed = asyncio.Event()
        self._cleanup: Callable[[], None] | None = None
        self._closing: asyncio.Future[None] | None = None

    def hold(self) -> AsyncEngine:
        """Take the engine for one reader (no await: the caller read this
        object and holds it in the same step)."""
        if self.retired:
            raise RuntimeError("a retired engine cannot be held again")
        self.readers += 1
        return self.engine

    async def release(self) -> None:
        self.readers -= 1
        if self.readers == 0 and self.retired:
            await self._close()

    @contextlib.asynccontextmanager
    async def reading(self) -> AsyncIterator[AsyncEngine]:
        engine = self.hold()
        try:
            yield engine
        finally:
            await self.release()

    async def retire(self, cleanup: Callable[[], None] | None = None, wait: float = 0.0) -> bool:
        """No more readers; close when the last one is done, then ``cleanup``.

        Waits up to ``wait`` seconds for that; True if it is closed by then
        (else it closes when its last reader releases it).
        """
        self.retired = True
        self._cleanup = cleanup
        if self.readers == 0:
            await self._close()
        if not self.closed.is_set() and wait > 0:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self.closed.wait()
        return self.closed.is_set()

    async def _close(self) -> None:
        if self._closing is None:
            # A task of its own: a reader cancelled while releasing must not
            # leave the engine half closed and its file behind.
            self._closing = asyncio.ensure_future(self._dispose())
        await asyncio.shield(self._closing)

    async def _dispose(self) -> None:
        try:
            await self.engine.dispose()
        finally:
            if self._cleanup is not None:
                self._cleanup()
            self.closed.set()
