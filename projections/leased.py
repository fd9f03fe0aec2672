"""One projector writes a shared store: a lease in NATS, a fence in the database.

With PostgreSQL, projector processes on several machines write one
database; only one of them may, or a batch could be applied twice. Each
process is a candidate for the lease ``projector.<name>`` in the KV bucket
``stratus-leases`` (``events.lease``); the holder projects, the others wait,
and one of them takes over within about a TTL after the holder dies.

A lease alone is not enough. A holder paused past its TTL (a long GC, a
stopped VM, SIGSTOP) does not know it lost the lease until it runs again,
and by then it may be inside a write. So the lease is also written into the
database (``schema.projector_leases``): a new holder first moves that row to
its own lease (``take_over``), and every write transaction of a holder
begins by checking, under the row's lock, that the row is still its lease
(``LeaseFence``). Either the old holder's transaction got the lock first and
commits before the takeover (whose checkpoint is read after it), or the
takeover moved the row first and the old holder's write is refused and
rolled back. The checkpoint is in the same transaction as the rows, so the
views stay exact across any number of takeovers.

A holder paused inside a transaction would keep that lock; each write
transaction therefore asks PostgreSQL to end itself if it is left idle for
longer than the TTL (``idle_in_transaction_session_timeout``), so the
takeover waits for a paused holder at most that long.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import structlog
from sqlalchemy import func, insert, or_, select, text, update
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from stratus.events.lease import Held, Lease, LeaseLost
from stratus.events.tasks import cancel
from stratus.projections.projector import Projector, init_schema
from stratus.projections.schema import projector_leases as leases

log = structlog.get_logger("stratus.projector")

# After a takeover that could not fence the store: how long before trying again.
RETRY_S = 1.0
# How long a takeover waits for a previous holder's write before ending it.
TAKEOVER_WAIT_S = 1.0
LOCK_NOT_AVAILABLE = "55P03"
# A setting of each fenced write transaction: the epoch of the lease it
# writes under (``current_setting('stratus.lease_epoch', true)``).
WRITER_EPOCH = "stratus.lease_epoch"


def lease_key(name: str) -> str:
    return f"projector.{name}"


async def take_over(
    engine: AsyncEngine, name: str, held: Held, *, wait_s: float = TAKEOVER_WAIT_S
) -> bool:
    """Move the store's lease row to ``held``; False if a later lease has it
    already (then ``held`` is stale: it was lost before it got here).

    A previous holder's write in flight holds the row: this waits for it,
    and ends it if it is still there after ``wait_s`` (``end_stale_writers``).
    """
    await init_schema(engine)
    said = False
    while True:
        try:
            return await _move(engine, name, held, wait_s)
        except DBAPIError as exc:
            if getattr(exc.orig, "sqlstate", None) != LOCK_NOT_AVAILABLE:
                raise
        ended = await end_stale_writers(engine)
        if ended or not said:
            log.warning("projector takeover waited for a previous holder", ended=ended)
            said = True


async def end_stale_writers(engine: AsyncEngine) -> int:
    """End the transactions of previous holders still holding the lease row.

    A holder paused (SIGSTOP, a frozen VM) while it was sending a pipelined
    batch leaves its transaction waiting for the rest of the batch, which
    PostgreSQL does not count as idle: ``idle_in_transaction_session_timeout``
    never fires, and the row stays locked while the holder sleeps. Only
    the lease holder runs this, so any other session that changed the
    lease row in its open transaction is a previous holder's write, which
    must not commit anyway. (PostgreSQL lets a role end its own sessions.)
    """
    if engine.dialect.name != "postgresql":
        return 0
    async with engine.begin() as conn:
        ended = await conn.execute(
            text(
                "SELECT pg_terminate_backend(l.pid) FROM pg_locks l"
                " WHERE l.locktype = 'relation' AND l.relation = CAST(:t AS regclass)"
                " AND l.mode = 'RowExclusiveLock' AND l.granted"
                " AND l.pid <> pg_backend_pid()"
            ),
            {"t": leases.name},
        )
        return sum(1 for (done,) in ended.all() if done)


async def _move(engine: AsyncEngine, name: str, held: Held, wait_s: float) -> bool:
    row = {
        "generation": held.generation,
        "epoch": held.epoch,
        "holder": held.holder,
        "since": datetime.now(UTC),
    }
    later = or_(
        leases.c.generation < held.generation,
        (leases.c.generation == held.generation) & (leases.c.epoch < held.epoch),
    )
    try:
        async with engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                # Wait this long for a previous holder's write (then end it).
                await conn.execute(
                    select(func.set_config("lock_timeout", f"{wait_s * 1000:.0f}", True))
                )
            ours = update(leases).where(leases.c.name == name, later).values(row)
            moved = await conn.execute(ours)
            if moved.rowcount == 1:
                return True
            exists = await conn.execute(select(leases.c.epoch).where(leases.c.name == name))
            if exists.first() is not None:
                return False
            await conn.execute(insert(leases).values(name=name, **row))
            return True
    except IntegrityError:
        return False  # another lease's first row went in first


async def lease_row(conn: AsyncConnection, name: str) -> dict[str, Any] | None:
    """Who may write the store now, as the store itself says."""
    found = (await conn.execute(select(leases).where(leases.c.name == name))).first()
    if found is None:
        return None
    since = found.since
    if since is not None and since.tzinfo is None:
        since = since.replace(tzinfo=UTC)
    return {
        "holder": found.holder,
        "epoch": int(found.epoch),
        "generation": int(found.generation),
        "since": since.isoformat().replace("+00:00", "Z") if since else None,
    }


class LeaseFence:
    """The check each write transaction of the holder begins with."""

    def __init__(self, lease: Lease, held: Held, name: str) -> None:
        self.lease = lease
        self.held = held
        self.name = name
        self.idle_ms = int(lease.ttl * 1000)

    async def __call__(self, conn: AsyncConnection) -> None:
        if not self.lease.valid():
            raise LeaseLost(f"projector lease {self.held.epoch} expired before a write")
        if conn.dialect.name == "postgresql":
            # A holder paused mid-transaction must not keep the row locked
            # past its lease: the server ends such a transaction itself.
            # And the transaction says which lease it writes under (for
            # triggers and audits: ``WRITER_EPOCH``, read by the tests).
            await conn.execute(
                select(
                    func.set_config("idle_in_transaction_session_timeout", str(self.idle_ms), True),
                    func.set_config(WRITER_EPOCH, str(self.held.epoch), True),
                )
            )
        mine = (
            leases.c.name == self.name,
            leases.c.generation == self.held.generation,
            leases.c.epoch == self.held.epoch,
        )
        # An update, not a read: it takes the row's lock until this
        # transaction ends, so no takeover can land in between.
        checked = await conn.execute(update(leases).where(*mine).values(epoch=leases.c.epoch))
        if checked.rowcount != 1:
            raise LeaseLost(
                f"projector lease {self.held.epoch} was taken over; this write is refused"
            )


class LeasedProjector:
    """Be a candidate for the lease; while holding it, project (fenced).

    ``run(projector)`` follows the log (``LiveProjection`` restarts it after
    a failure); ``on_projector`` learns the projector in use (None while
    standing by). Runs until cancelled; then gives the lease up at once so
    another candidate need not wait out the TTL.
    """

    def __init__(
        self,
        store: Any,
        engine: AsyncEngine,
        lease: Lease,
        name: str,
        run: Callable[[Projector], Any],
        on_projector: Callable[[Projector | None], None],
    ) -> None:
        self.store = store
        self.engine = engine
        self.lease = lease
        self.name = name
        self.run = run
        self.on_projector = on_projector
        # What tests and status read: how many times this process took over.
        self.terms = 0

    async def follow(self) -> None:
        try:
            while True:
                held = await self._acquire()
                if not await self._fence_store(held):
                    # Let the key go, and do not take it again at once.
                    await self.lease.release()
                    await asyncio.sleep(RETRY_S)
                    continue
                self.terms += 1
                log.info("projector lease acquired", holder=held.holder, epoch=held.epoch)
                await self._term(held)
                log.info("projector standing by", holder=held.holder)
                # Whatever ended the term (a refused write, a failed renewal),
                # this holding is over: let the key go if it is still ours.
                await self.lease.release()
        finally:
            self.on_projector(None)
            await self.lease.release()

    async def _fence_store(self, held: Held) -> bool:
        # (a previous holder's write in flight holds the row: this waits for it)
        log.info("projector lease taken; fencing the store", epoch=held.epoch)
        try:
            if await take_over(self.engine, self.name, held):
                return True
            # The store names a later lease: this one was lost on the way.
            log.warning("projector lease stale when taken; standing by", epoch=held.epoch)
        except Exception as exc:  # the database away: try again later
            log.warning("projector store cannot be fenced; standing by", error=str(exc))
        return False

    async def _acquire(self) -> Held:
        """The lease, waiting while another process holds it."""
        announced = unreachable = False
        while True:
            try:
                held = await self.lease.try_acquire()
                unreachable = False
            except Exception as exc:  # the broker away: keep trying, say so once
                if not unreachable:
                    log.warning("projector lease unavailable", error=str(exc))
                unreachable = True
                held = None
            if held is not None:
                return held
            if not announced:
                log.info("projector standing by: another process holds the lease")
                announced = True
            await asyncio.sleep(self.lease.poll_s)

    async def _term(self, held: Held) -> None:
        """Project until the lease is lost (or this task is cancelled)."""
        fence = LeaseFence(self.lease, held, self.name)
        projector = Projector(self.store, self.engine, fence=fence)
        self.on_projector(projector)
        running = asyncio.create_task(self.run(projector))
        keeping = asyncio.create_task(self._keep())
        try:
            await asyncio.wait({running, keeping}, return_when=asyncio.FIRST_COMPLETED)
            why = "a write was refused" if running.done() else "a renewal failed"
            log.warning("projector lease lost", reason=why, epoch=held.epoch)
        finally:
            for task in (running, keeping):
                await cancel(task)
            self.on_projector(None)
            with contextlib.suppress(Exception):
                await projector.aclose()

    async def _keep(self) -> None:
        """Renew until a renewal fails; returning ends the term."""
        while True:
            await asyncio.sleep(self.lease.renew_every)
            if not await self.lease.renew():
                return
