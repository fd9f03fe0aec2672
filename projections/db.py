"""Engines for the projection store: SQLite (WAL) by default, any SQLAlchemy URL."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine


def sqlite_url(path: str | Path) -> str:
    return f"sqlite+aiosqlite:///{Path(path)}"


def sqlite_path(engine: AsyncEngine) -> Path | None:
    """The file of a SQLite store (None: another backend, or in memory)."""
    if engine.dialect.name != "sqlite" or not engine.url.database:
        return None
    if engine.url.database == ":memory:":
        return None
    return Path(engine.url.database)


# SQLite's page cache for a bulk rebuild, in KiB: within the rebuild's
# memory budget (300 MB peak RSS at 1M events).
BULK_CACHE_KIB = 64 * 1024
BULK_SORT_THREADS = 2


def make_engine(url: str, **kw: Any) -> AsyncEngine:
    engine = create_async_engine(url, **kw)
    if engine.dialect.name == "sqlite":
        _sqlite_setup(engine.sync_engine)
    return engine


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
