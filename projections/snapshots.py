"""Checkpoint snapshots of a SQLite projection store, for fast time travel.

The live projector copies its store every ``every`` events into a directory
beside the store file (``projections.db.snapshots/snap-<seq>.db``), keeping
the newest ``keep``. A copy is made with ``VACUUM INTO`` on a connection of
its own: that is one read transaction, so under WAL it is a consistent
snapshot even while the projector goes on writing, and since rows and
checkpoint commit together the copy is exactly at some checkpoint, which it
is then named after. Time travel to a recent point starts from the nearest
snapshot at or below it instead of replaying the log from 1.

A snapshot leaves out the rows of the audit view (``LIVE_ONLY``): they are
one per event, most of the store, and a past point never needs them copied,
since the live view's rows up to that sequence are exactly the past's (the
audit trail and the digest of a past point read them there). Its table is
kept, empty, so the store's schema is whole.

A snapshot belongs to its store file: a rebuild that swaps in another file
starts another directory, and the old one is removed with the old file.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import sqlite3
import uuid
from pathlib import Path

import structlog

from stratus.projections.sqlitefile import connect_existing

log = structlog.get_logger("stratus.snapshots")

SUFFIX = ".snapshots"
_NAME = re.compile(r"^snap-(\d{12})\.db$")

# Append-only tables keyed by ``seq``: the past's rows are the live rows <= seq.
LIVE_ONLY = frozenset({"audit"})
_CREATE = re.compile(r'^CREATE (TABLE|(?:UNIQUE )?INDEX) ("?)(\w+)\2', re.IGNORECASE)

DEFAULT_EVERY = 5_000
DEFAULT_KEEP = 3


def snapshot_dir(store_path: Path) -> Path:
    return store_path.with_name(store_path.name + SUFFIX)


class Snapshots:
    def __init__(
        self, directory: Path, *, every: int = DEFAULT_EVERY, keep: int = DEFAULT_KEEP
    ) -> None:
        if every < 1 or keep < 1:
            raise ValueError("every and keep must be positive")
        self.directory = Path(directory)
        self.every = every
        self.keep = keep
        self._task: asyncio.Task[int | None] | None = None
        newest = self.list()
        self._last = newest[-1][0] if newest else 0

    @classmethod
    def for_store(cls, store_path: Path, **kw: int) -> Snapshots:
        return cls(snapshot_dir(store_path), **kw)

    def list(self) -> list[tuple[int, Path]]:
        """(checkpoint, file) of every finished snapshot, oldest first."""
        if not self.directory.is_dir():
            return []
        out = []
        for p in self.directory.iterdir():
            m = _NAME.match(p.name)
            if m:
                out.append((int(m.group(1)), p))
        return sorted(out)

    def nearest(self, seq: int) -> tuple[int, Path] | None:
        """The newest snapshot at or below ``seq``."""
        best = None
        for s, p in self.list():
            if s <= seq:
                best = (s, p)
        return best

    def maybe_take(self, source: Path, position: int) -> None:
        """Start a snapshot in a thread if ``every`` events passed since the last.

        At most one runs at a time: during a long catch-up the projector does
        not wait for copies, it just gets fewer of them.
        """
        if position - self._last < self.every:
            return
        if self._task is not None and not self._task.done():
            return
        self._task = asyncio.create_task(asyncio.to_thread(self.take, source))

    def take(self, source: Path) -> int | None:
        """Copy ``source`` now (blocking); returns the snapshot's checkpoint."""
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = self.directory / f".tmp-{uuid.uuid4().hex}.db"
        try:
            src = connect_existing(source, timeout=10, isolation_level=None)
            try:
                _copy(src, tmp)
            finally:
                src.close()
            dst = sqlite3.connect(tmp)
            try:
                row = dst.execute("SELECT last_seq FROM checkpoints WHERE name = 'main'").fetchone()
            finally:
                dst.close()
            seq = int(row[0]) if row else 0
            if seq == 0:
                tmp.unlink()
                return None
            os.replace(tmp, self.directory / f"snap-{seq:012d}.db")
            self._last = max(self._last, seq)
            self._prune()
            return seq
        except (sqlite3.Error, OSError) as exc:
            # A missed snapshot only makes time travel slower: never fatal.
            log.warning("snapshot failed", error=str(exc))
            with contextlib.suppress(OSError):
                tmp.unlink()
            return None

    def _prune(self) -> None:
        for _seq, path in self.list()[: -self.keep]:
            with contextlib.suppress(OSError):
                path.unlink()

    async def wait(self) -> None:
        """Let a snapshot in progress finish (a service stopping)."""
        if self._task is not None:
            with contextlib.suppress(Exception):
                await self._task
            self._task = None

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


def _copy(src: sqlite3.Connection, target: Path) -> None:
    """Every table's schema and, but for ``LIVE_ONLY``, its rows, from one
    read transaction (so from one checkpoint), into a new file."""
    src.execute("ATTACH DATABASE ? AS snap", (str(target),))
    try:
        src.execute("BEGIN")
        schema = src.execute(
            "SELECT type, name, tbl_name, sql FROM main.sqlite_master "
            "WHERE sql IS NOT NULL AND name NOT LIKE 'sqlite_%' ORDER BY type DESC"
        ).fetchall()

        # Our own schema text, read back from SQLite: only the object's name
        # is qualified, so it lands in the snapshot file. Tables, then their
        # rows, then the indexes (built once, not row by row).
        def create(sql: str) -> None:
            m = _CREATE.match(sql)
            if m is None:
                raise sqlite3.DatabaseError(f"unexpected schema entry: {sql[:60]}")
            at = m.start(3) - len(m.group(2))
            src.execute(sql[:at] + "snap." + sql[at:])

        for kind, _name, _table, sql in schema:
            if kind == "table":
                create(sql)
        for kind, name, _table, _sql in schema:
            if kind == "table" and name not in LIVE_ONLY:
                src.execute(f'INSERT INTO snap."{name}" SELECT * FROM main."{name}"')
        for kind, _name, _table, sql in schema:
            if kind != "table":
                create(sql)
        src.execute("COMMIT")
    except BaseException:
        if src.in_transaction:
            src.execute("ROLLBACK")
        raise
    finally:
        src.execute("DETACH DATABASE snap")
