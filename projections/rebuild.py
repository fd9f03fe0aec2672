"""Rebuild: replay the whole log into a fresh store, then swap it in live.

Where things run (SQLite stores, the embedded ``stratus up``):

1. ``stratus projections rebuild`` (the CLI, on the machine that runs
   ``stratus up``: it reads DATA_DIR for the service's NATS credentials)
   replays the log into ``DATA_DIR/projections.<stamp>.db`` with a progress
   bar. The live store and the services are not involved: the heavy part
   costs them nothing. A long log is replayed on two cores: this process
   reads and folds, a writer process (``projections.writer``) binds and
   writes the rows, commits, and builds the indexes at the end.
2. It then asks the running control plane to swap, on ``ctl.projections.swap``
   (a subject only the service NATS user may publish to), with the caller's
   token: only the cloud admin is obeyed.
3. ``SwapService`` pauses the live projector at a batch boundary, lets the
   new store catch up to the head of the log, points the query service and
   the projector at it (one assignment in the event loop: a query reads one
   store or the other, never a half-built one), records the new file in
   ``DATA_DIR/projections.current`` (so a restart opens it), and removes the
   old file with its snapshots once the last query that began on it is
   done (``db.SharedEngine``). Queries are answered throughout, from the
   old store until the switch.

PostgreSQL stores are not swapped yet: the request is refused with a message
saying so.

Schema changes need no hand-written migrations: ``Projector.start_position``
compares each view's table fingerprint with the one the store recorded and
rebuilds a changed (or newly added) view from the log up to the checkpoint;
``stratus projections rebuild`` rebuilds everything.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import structlog
from nats.aio.msg import Msg
from sqlalchemy.ext.asyncio import AsyncEngine

from stratus.events.commands import MAX_COMMAND_BYTES, Reply
from stratus.events.errors import Forbidden, Invalid, StratusError
from stratus.events.lease import DEFAULT_TTL_S, Lease, LeaseLost
from stratus.events.responder import Responder
from stratus.events.store import EventStore
from stratus.events.tasks import cancel
from stratus.projections.db import make_engine, sqlite_path, sqlite_url
from stratus.projections.leased import LeasedProjector, lease_key
from stratus.projections.projector import DEFAULT_NAME, Projector, read_checkpoint, store_digest
from stratus.projections.snapshots import DEFAULT_EVERY, Snapshots, snapshot_dir

log = structlog.get_logger("stratus.rebuild")

SWAP_SUBJECT = "ctl.projections.swap"
# Queries are short: a swap waits this long for those still on the old store.
OLD_STORE_WAIT_S = 5.0
DEFAULT_STORE = "projections.db"
LIVE_POINTER = "projections.current"
_STORE_NAME = re.compile(r"^projections(\.[0-9]{8}T[0-9]{12}Z)?\.db$")


def live_store_path(data_dir: Path) -> Path:
    """The live SQLite store of a data dir: the last one swapped in, else the default."""
    pointer = data_dir / LIVE_POINTER
    with contextlib.suppress(OSError):
        name = pointer.read_text().strip()
        if _STORE_NAME.match(name):
            return data_dir / name
    return data_dir / DEFAULT_STORE


def set_live_store(data_dir: Path, path: Path) -> None:
    tmp = data_dir / f".{LIVE_POINTER}.tmp"
    tmp.write_text(path.name + "\n")
    os.replace(tmp, data_dir / LIVE_POINTER)


def new_store_path(data_dir: Path) -> Path:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    return data_dir / f"projections.{stamp}.db"


def remove_store(path: Path) -> None:
    """A SQLite store file, its companions and its snapshots."""
    for suffix in ("", "-wal", "-shm", "-journal"):
        with contextlib.suppress(OSError):
            Path(f"{path}{suffix}").unlink()
    shutil.rmtree(snapshot_dir(path), ignore_errors=True)


class Built(msgspec.Struct, frozen=True):
    seq: int
    events: int
    seconds: float
    # The writer process's peak RSS (None: the rebuild ran in one process).
    helper_rss_mb: float | None = None


# Below this many events the writer process (about a third of a second to
# start) costs more than it saves.
HELPER_MIN_EVENTS = 20_000


async def build_store(
    store: EventStore,
    path: Path,
    progress: Callable[[int, int], Any] | None = None,
    *,
    helper: bool | None = None,
) -> Built:
    """Replay the log from 1 into a new SQLite file at ``path``.

    ``helper``: write through a second process (``projections.writer``)
    while this one reads and folds; by default when the log is long enough.
    A failed rebuild (a helper killed, say) leaves no file behind.
    """
    _must_be_new(path)
    t0 = time.perf_counter()
    head = await store.last_seq()
    if helper is None:
        helper = head >= HELPER_MIN_EVENTS
    engine = make_engine(sqlite_url(path))
    projector = Projector(store, engine, batch=5000, bulk=True, helper=helper)
    events = 0

    def counted(n: int, seq: int) -> None:
        nonlocal events
        events += n
        if progress is not None:
            progress(n, seq)

    try:
        try:
            seq = await projector.catch_up(until=head, progress=counted)
            async with engine.connect() as conn:
                # The whole store in the main file: the services open it next.
                await conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            projector.close()
            await engine.dispose()
    except BaseException:
        remove_store(path)
        raise
    written = projector.helper_written
    return Built(
        seq=seq,
        events=events,
        seconds=time.perf_counter() - t0,
        helper_rss_mb=written.rss_mb if written is not None else None,
    )


def _must_be_new(path: Path) -> None:
    if path.exists():
        raise Invalid(f"{path} exists already: a rebuild writes a new file")


class LiveProjection:
    """The live store and the projector that follows the log into it.

    Restarts the projector from its checkpoint after a failure, and can be
    paused at a batch boundary and resumed on another store (a swap).

    A store other processes can write too (PostgreSQL: ``leased`` None
    means "unless SQLite") is written only while this process holds the
    projector lease (``projections.leased``); otherwise it stands by. A
    SQLite store belongs to its machine: each query node keeps its own.
    """

    def __init__(
        self,
        store: EventStore,
        engine: AsyncEngine,
        *,
        snapshot_every: int = DEFAULT_EVERY,
        leased: bool | None = None,
        lease_ttl: float = DEFAULT_TTL_S,
        holder: str | None = None,
    ) -> None:
        self.store = store
        self.engine = engine
        self.snapshot_every = snapshot_every
        self.leased = engine.dialect.name != "sqlite" if leased is None else leased
        self.lease_ttl = lease_ttl
        self.holder = holder
        self.projector: Projector | None = None
        self.candidate: LeasedProjector | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self.leased:
            await self._start_leased()
            return
        path = sqlite_path(self.engine)
        snaps = Snapshots.for_store(path, every=self.snapshot_every) if path else None
        self.projector = Projector(self.store, self.engine, snapshots=snaps)
        await self.projector.start_position()
        self._task = asyncio.create_task(self._run(self.projector))

    async def _start_leased(self) -> None:
        """Stand as a candidate for the lease; project while holding it."""
        lease = Lease(
            self.store.js,
            lease_key(DEFAULT_NAME),
            holder=self.holder,
            ttl=self.lease_ttl,
            stream=self.store.stream,
        )

        def using(projector: Projector | None) -> None:
            self.projector = projector

        self.candidate = LeasedProjector(
            self.store, self.engine, lease, DEFAULT_NAME, self._run, using
        )
        self._task = asyncio.create_task(self.candidate.follow())

    async def _run(self, projector: Projector) -> None:
        said = ""  # the known failure last logged
        while True:
            try:
                await projector.run()
            except (asyncio.CancelledError, LeaseLost):
                raise
            except Exception as exc:
                if self.candidate is not None and not self.candidate.lease.valid():
                    # A write that failed once the lease ran out (the server
                    # ended a paused holder's transaction, say): not a
                    # hiccup to retry, the end of this holder's term.
                    raise LeaseLost(f"projector lease lost during a write: {exc}") from None
                # A broken connection or database hiccup: resume from the
                # checkpoint, which is exactly where the failed batch began.
                if not isinstance(exc, StratusError):
                    log.exception("projector failed; restarting from its checkpoint")
                elif str(exc) != said:
                    # A known cause (no stream yet: `stratus init` not run;
                    # the broker away): one line when it changes, not a
                    # traceback every second while it lasts.
                    log.warning("projector waiting; retrying from its checkpoint", error=str(exc))
                said = str(exc) if isinstance(exc, StratusError) else ""
                await asyncio.sleep(1)

    async def pause(self) -> None:
        """Stop between batches: the store is then exactly at its checkpoint."""
        task, self._task = self._task, None
        if task is not None:
            # (again until it takes: a lease candidate waits on NATS directly)
            await cancel(task)
        projector, self.projector = self.projector, None
        if projector is not None:
            await projector.aclose()

    async def resume(self, engine: AsyncEngine | None = None) -> None:
        if engine is not None:
            self.engine = engine
        await self.start()

    async def stop(self) -> None:
        await self.pause()


class SwapRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    # None: only check that the caller may swap (before a long replay).
    store: str | None = None


class SwapService(Responder):
    """Serves ``ctl.projections.swap`` for the embedded control plane."""

    internal_message = "swap failed; see the log of stratus up"
    failed = "swap failed"

    def __init__(
        self,
        store: EventStore,
        live: LiveProjection,
        queries: Any,  # QueryService: set_engine(engine)
        data_dir: Path,
        *,
        authenticate: Callable[[dict[str, str]], Any] | None = None,
    ) -> None:
        # One swap at a time (``_lock``); a swap in flight may take a while
        # to catch up, and ``stop`` lets it.
        super().__init__(store.nc, SWAP_SUBJECT, drain_s=30, log=log)
        # How long a swap waits for the queries still reading the old store
        # before it answers; the store is removed when they end either way.
        self.old_store_wait_s = OLD_STORE_WAIT_S
        self.store = store
        self.live = live
        self.queries = queries
        self.data_dir = Path(data_dir)
        self.authenticate = authenticate
        self._lock = asyncio.Lock()

    async def answer(self, msg: Msg) -> Reply:
        return Reply(ok=True, data=await self.handle(msg.data, msg.headers or {}))

    async def handle(self, data: bytes, headers: dict[str, str]) -> dict[str, Any]:
        if self.authenticate is not None:
            caller = self.authenticate(headers)
            if not caller.is_cloud_admin:
                raise Forbidden("swapping the projection store is for the cloud admin")
        if len(data) > MAX_COMMAND_BYTES:
            raise Invalid("request too large")
        try:
            req = msgspec.json.decode(data, type=SwapRequest)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            raise Invalid(f"swap: {exc}") from None
        if req.store is None:
            return {"allowed": True}
        return await self.swap(req.store)

    async def swap(self, name: str) -> dict[str, Any]:
        old_path = sqlite_path(self.live.engine)
        if old_path is None:
            raise Invalid("swapping is implemented for SQLite stores only, for now")
        if not _STORE_NAME.match(name) or name == DEFAULT_STORE:
            raise Invalid(f"{name!r} is not a rebuilt store name (projections.<stamp>.db)")
        path = self.data_dir / name
        if path.resolve() == old_path.resolve():
            raise Invalid(f"{name} is the live store already")
        if not path.is_file():
            raise Invalid(f"no store {name} in {self.data_dir}")
        async with self._lock:
            t0 = time.perf_counter()
            engine = make_engine(sqlite_url(path), create=False)
            try:
                async with engine.connect() as conn:
                    built_at = await read_checkpoint(conn)
            except Exception:
                await engine.dispose()
                raise Invalid(f"{name} is not a projection store") from None
            await self.live.pause()
            try:
                # Queries are still answered, from the old store.
                catch_up = Projector(self.store, engine)
                try:
                    reached = await catch_up.catch_up()
                finally:
                    catch_up.close()
            except BaseException:
                await self.live.resume()
                await engine.dispose()
                raise
            old = self.queries.set_engine(engine)
            await self.live.resume(engine)
            set_live_store(self.data_dir, path)
            paused = time.perf_counter() - t0
            # Queries that began on the old store finish on it: it is
            # disposed and its file removed after the last of them.
            removed = await old.retire(lambda: remove_store(old_path), self.old_store_wait_s)
            if not removed:
                log.info("old store is removed when its last query ends", store=old_path.name)
            seq, found = await store_digest(engine)
            log.info("projection store swapped", store=name, built_at=built_at, reached=reached)
            return {
                "store": name,
                "built_at": built_at,
                "caught_up": reached - built_at,
                "seq": seq,
                "digest": found,
                "paused_seconds": round(paused, 3),
                "old_store_removed": removed,
            }
