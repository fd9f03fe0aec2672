"""The projector: folding the log into SQL, resuming after a kill, poison events, time travel."""

from __future__ import annotations

import asyncio
import contextlib
import random
import sqlite3
import time
import types
from datetime import UTC, datetime

import msgspec
import pytest
from sqlalchemy import delete, insert, select

from stratus.events.model import Cause
from stratus.events.tasks import cancel
from stratus.events.tenants import TenantCreated, TenantDeleted, TenantRenamed
from stratus.projections.projector import (
    Projector,
    init_schema,
    quarantine_count,
    read_checkpoint,
    store_digest,
)
from stratus.projections.schema import checkpoints, quarantine
from stratus.projections.tenants import get_tenant, list_tenants, tenants
from stratus.projections.views import all_views

pytestmark = pytest.mark.timeout(60)

CAUSE = Cause(actor="test", correlation_id="corr", causation_id="corr")


def make_history(n_tenants: int, seed: int, prefix: str = "t") -> list:
    """Creates, renames and deletes of ``n_tenants`` tenants, in a plausible order."""
    rng = random.Random(seed)
    events = []
    live: dict[str, str] = {}
    for i in range(n_tenants):
        t = f"{prefix}{i:04d}"
        events.append(
            CAUSE.make(TenantCreated, t, "tenant", t, name=t, description=f"tenant number {i}")
        )
        live[t] = t
        for _ in range(rng.randint(0, 2)):
            victim = rng.choice(sorted(live))
            if rng.random() < 0.25:
                events.append(CAUSE.make(TenantDeleted, victim, "tenant", victim))
                del live[victim]
            else:
                name = f"{victim}-r{rng.randint(0, 999)}"
                events.append(
                    CAUSE.make(
                        TenantRenamed, victim, "tenant", victim, name=name, previous=live[victim]
                    )
                )
                live[victim] = name
            if not live:
                break
    return events


def expected_rows(events, first_seq: int = 1) -> dict[str, dict]:
    """The tenants view, folded independently of the projector."""
    rows: dict[str, dict] = {}
    for seq, e in enumerate(events, start=first_seq):
        tid = e.aggregate.id
        at = e.at.replace(tzinfo=None)
        if isinstance(e, TenantCreated):
            rows[tid] = {
                "id": tid,
                "name": e.name,
                "description": e.description,
                "status": "active",
                "created_at": at,
                "updated_at": at,
                "created_seq": seq,
                "updated_seq": seq,
            }
        elif isinstance(e, TenantRenamed):
            rows[tid].update(name=e.name, updated_at=at, updated_seq=seq)
        elif isinstance(e, TenantDeleted):
            rows[tid].update(status="deleted", updated_at=at, updated_seq=seq)
    return rows


async def append_all(store, events, chunk: int = 40) -> None:
    for i in range(0, len(events), chunk):
        await store.append(events[i : i + chunk])


async def view_rows(engine) -> dict[str, dict]:
    async with engine.connect() as conn:
        result = await conn.execute(select(tenants))
        rows = {}
        for r in result.mappings():
            row = dict(r)
            for k in ("created_at", "updated_at"):
                row[k] = row[k].replace(tzinfo=None)
            rows[row["id"]] = row
        return rows


async def checkpoint(engine) -> int:
    async with engine.connect() as conn:
        return await read_checkpoint(conn)


async def wait_for_checkpoint(engine, seq: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await checkpoint(engine) >= seq:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(
        f"projector did not reach {seq} in {timeout}s: at {await checkpoint(engine)}"
    )


async def rebuild(store, engine, until=None) -> tuple[int, str]:
    """A fresh projection built from sequence 1: (checkpoint, digest)."""
    await Projector(store, engine, batch=500).catch_up(until=until)
    return await store_digest(engine)


async def stop(task: asyncio.Task) -> None:
    assert await cancel(task)  # (3.11 can lose a plain cancel())


# -- folding -----------------------------------------------------------------


async def test_folding_a_history_gives_the_view_rows(store, sqlite_engine):
    # given a history of 120 tenants created, renamed and deleted
    events = make_history(120, seed=1)
    await append_all(store, events)
    last = await store.last_seq()
    assert last == len(events)

    # when a projector catches up, in batches that cut histories apart
    engine = sqlite_engine("live.db")
    position = await Projector(store, engine, batch=13).catch_up()

    # then every tenant's row is what the events say, and the checkpoint is the end
    assert position == last
    assert await checkpoint(engine) == last
    want = expected_rows(events)
    assert await view_rows(engine) == want
    statuses = {r["status"] for r in want.values()}
    assert statuses == {"active", "deleted"}, "the history should exercise deletes too"
    renamed = [r for r in want.values() if r["name"] != r["id"]]
    assert renamed, "the history should exercise renames too"

    # and the query helpers read the same rows
    async with engine.connect() as conn:
        listed = await list_tenants(conn)
        everything = await list_tenants(conn, include_deleted=True)
        one = await get_tenant(conn, renamed[0]["id"])
        by_name = await get_tenant(conn, renamed[0]["name"])
    assert [t["id"] for t in listed] == sorted(
        k for k, r in want.items() if r["status"] == "active"
    )
    assert len(everything) == len(want)
    assert one is not None and one["name"] == renamed[0]["name"]
    if renamed[0]["status"] == "active":
        assert by_name is not None and by_name["id"] == renamed[0]["id"]


async def test_batch_size_does_not_change_the_result(store, sqlite_engine):
    events = make_history(60, seed=2)
    await append_all(store, events)
    digests = set()
    for i, batch in enumerate((1, 3, 64, 5000)):
        engine = sqlite_engine(f"b{i}.db")
        await Projector(store, engine, batch=batch).catch_up()
        digests.add(await store_digest(engine))
        assert await view_rows(engine) == expected_rows(events)
    assert len(digests) == 1


async def test_catch_up_twice_applies_nothing_twice(store, sqlite_engine):
    events = make_history(30, seed=3)
    await append_all(store, events)
    engine = sqlite_engine()
    await Projector(store, engine).catch_up()
    first = await store_digest(engine)
    # a second projector on the same store starts after the checkpoint
    again = Projector(store, engine)
    assert await again.catch_up() == len(events)
    assert await store_digest(engine) == first


# -- killed and resumed ------------------------------------------------------


@pytest.mark.timeout(120)
async def test_a_projector_killed_between_events_resumes_to_the_same_digest(store, sqlite_engine):
    # given a long history, and more appended while the projector runs
    rng = random.Random(7)
    events = make_history(700, seed=4)
    first_half, second_half = events[: len(events) // 2], events[len(events) // 2 :]
    await append_all(store, first_half)
    engine = sqlite_engine("live.db")
    await init_schema(engine)

    kills = []
    pending = list(second_half)
    per_round = len(pending) // 6 + 1
    for k in range(8):
        # when a projector (small batches: many transactions) runs for a moment...
        task = asyncio.create_task(Projector(store, engine, batch=7).run())
        if pending:
            chunk, pending = pending[:per_round], pending[per_round:]
            await append_all(store, chunk, chunk=20)
        await asyncio.sleep(rng.uniform(0.01, 0.15))
        # ...and is killed wherever it is, mid-transaction included
        await stop(task)
        cp, live_digest = await store_digest(engine)
        kills.append(cp)
        # then what it left is exactly the world as of its checkpoint
        _, rebuilt = await rebuild(store, sqlite_engine(f"until-{k}.db"), until=cp)
        assert live_digest == rebuilt, f"kill {k} at checkpoint {cp}"

    assert not pending
    assert len(set(kills)) > 1, f"the kills should land at different points: {kills}"
    last = await store.last_seq()
    assert last == len(events)
    assert min(kills) < last, "at least one kill should land before the end"

    # when it runs once more to the end
    task = asyncio.create_task(Projector(store, engine, batch=7).run())
    try:
        await wait_for_checkpoint(engine, last)
    finally:
        await stop(task)

    # then it matches a fresh rebuild into another file, and the checkpoint is the stream's end
    cp, live_digest = await store_digest(engine)
    rebuilt_cp, rebuilt_digest = await rebuild(store, sqlite_engine("rebuild.db"))
    assert cp == rebuilt_cp == last
    assert live_digest == rebuilt_digest
    assert await view_rows(engine) == expected_rows(events)


class Stepper:
    """Runs a coroutine in a task and cancels it at its ``n``-th await point.

    Every time the coroutine suspends (waits on a future: a database call,
    a NATS reply, another task) counts as one await point. ``waking=False``
    cancels the task while it waits there (``Task.cancel``). ``waking=True``
    cancels it the moment that wait completes instead, as a ``cancel()``
    that lands in the same loop turn as the awaited result would: the
    result is dropped and ``CancelledError`` raised in its place (what
    Python 3.11's ``wait_for`` then swallows).
    """

    def __init__(self, coro, n: int, *, waking: bool) -> None:
        self.n = n
        self.waking = waking
        self.count = 0  # suspensions so far
        self.parked = None  # the future waited on right now
        self.fired = False
        self.task = asyncio.ensure_future(self._run(coro))

    def cancel_now(self) -> None:
        self.fired = True
        self.task.cancel()

    async def _run(self, coro):
        return await self._drive(coro)

    @types.coroutine
    def _drive(self, coro):
        value, error = None, None
        while True:
            try:
                step = coro.throw(error) if error is not None else coro.send(value)
            except StopIteration as stop:
                return stop.value
            self.count += 1
            self.parked = step
            if self.count == self.n and not self.waking and not self.fired:
                self.cancel_now()
            try:
                value, error = (yield step), None
            except BaseException as exc:  # handed on to the coroutine, as a task would
                value, error = None, exc
            self.parked = None
            if self.count == self.n and self.waking and not self.fired and error is None:
                self.fired = True
                value, error = None, asyncio.CancelledError()


def sqlite_free(path) -> tuple[bool, bool]:
    """(no writer holds the lock, no reader holds an old snapshot) — asked
    from another connection, as another process would, without waiting."""
    con = sqlite3.connect(path, timeout=0, isolation_level=None)
    try:
        try:
            con.execute("BEGIN IMMEDIATE")
            con.execute("ROLLBACK")
            unlocked = True
        except sqlite3.OperationalError:
            unlocked = False
        busy = con.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
        return unlocked, busy == 0
    finally:
        con.close()


async def run_until_cancelled(projector: Projector, step_at: int, last: int, waking: bool):
    """Run ``projector`` until its ``step_at``-th await point, or until it
    waits idle at the end of the log: the Stepper (cancelled) and the await
    points its start-up took."""
    started: list[int] = []
    start = projector.start_position

    async def marked() -> int:
        after = await start()
        started.append(step.count)
        return after

    projector.start_position = marked  # type: ignore[method-assign]
    step = Stepper(projector.run(), step_at, waking=waking)
    deadline = time.monotonic() + 20
    while not step.fired:
        assert time.monotonic() < deadline, f"await point {step_at} never came ({step.count})"
        idle = step.parked is not None and not step.parked.done()
        if idle and projector.position == last:
            step.cancel_now()  # past the last point: cancelled while it waits for more
            break
        await asyncio.sleep(0.002)
    return step, (started[0] if started else None)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("waking", [False, True], ids=["while-waiting", "as-the-wait-ends"])
async def test_a_projector_cancelled_at_each_await_point_releases_the_store_and_resumes(
    store, sqlite_engine, tmp_path, waking
):
    # given a log the projector reads as several batches (one view: its
    # start-up awaits once per statement, some 400 times)
    views = [v for v in all_views() if v.name == "tenants"]
    events = make_history(10, seed=9)
    await append_all(store, events)
    last = await store.last_seq()
    assert last >= 12

    async def built(name: str, until: int | None = None) -> tuple[int, str]:
        engine = sqlite_engine(name)
        fresh = Projector(store, engine, views=views, batch=3)
        try:
            await fresh.catch_up(until=until)
        finally:
            fresh.close()
        return await store_digest(engine)

    _, full = await built("full.db")
    at: dict[int, str] = {}  # checkpoint -> digest of a fresh build up to it

    async def trial(n: int) -> tuple[Stepper, int | None]:
        path = tmp_path / f"trial-{n}.db"
        engine = sqlite_engine(path.name)
        projector = Projector(store, engine, views=views, batch=3)
        # when the live projector is cancelled at its n-th await point
        step, start_points = await run_until_cancelled(projector, n, last, waking)

        # then it stops at once
        done, _ = await asyncio.wait([step.task], timeout=10)
        assert done, f"a projector cancelled at await point {n} of {step.count} kept running"
        with contextlib.suppress(asyncio.CancelledError):
            step.task.result()
        await projector.aclose()

        # and holds no connection, transaction or lock on the store (while
        # the cancelled task, and its traceback, still exist)
        assert engine.pool.checkedout() == 0, f"await point {n}: a connection is still out"
        assert sqlite_free(path) == (True, True), f"await point {n}: the store is not free"

        # and what it left is exactly the world as of its checkpoint (a
        # cancel before the schema was made left an empty store)
        await init_schema(engine)
        cp, digest = await store_digest(engine)
        if cp not in at:
            at[cp] = (await built(f"until-{cp}.db", until=cp))[1]
        assert digest == at[cp], f"await point {n}: inconsistent at checkpoint {cp}"

        # and a projector started again resumes to the digest of a fresh build
        again = Projector(store, engine, views=views, batch=3)
        try:
            assert await again.catch_up() == last
        finally:
            again.close()
        assert (await store_digest(engine))[1] == full
        await engine.dispose()
        return step, start_points

    # Every await point after start-up (reading and writing the batches),
    # and a sample of the start-up's own (one per database statement).
    step, start_points = await trial(10**6)
    assert start_points is not None and step.count > start_points
    sample = set(range(1, start_points - 10, 40))
    for n in sorted(sample):
        await trial(n)
    n, points = start_points - 10, None
    while points is None:
        assert n <= start_points + 300, "a few batches should not take 300 awaits"
        step, _ = await trial(n)
        if not step.fired or step.count < n:
            points = step.count
        n += 1

    # the trials covered every batch (each waits at least once for the log)
    assert points - start_points >= last // 3, f"{points} await points, start-up {start_points}"
    assert len(at) >= 3, f"cancels should land before, between and after batches: {sorted(at)}"


@pytest.mark.parametrize("waking", [False, True], ids=["while-waiting", "as-the-wait-ends"])
async def test_a_task_cancelled_inside_a_store_transaction_leaves_the_store_free(
    sqlite_engine, tmp_path, waking
):
    """The async engine (queries, digests) awaits every statement: a task
    cancelled at any of them, from connecting to committing, must leave no
    lock behind, even while its traceback (and the cursor in it) lives on."""

    async def write(engine) -> None:
        async with engine.begin() as conn:
            await conn.run_sync(checkpoints.create, checkfirst=True)
            await conn.execute(delete(checkpoints))
            rows = [{"name": "main", "last_seq": 7}, {"name": "other", "last_seq": 3}]
            await conn.execute(insert(checkpoints), rows)

    points = None
    n = 0
    while points is None:
        n += 1
        assert n <= 200, "connecting and one small transaction should not take 200 awaits"
        path = tmp_path / f"t-{n}.db"
        engine = sqlite_engine(path.name)
        step = Stepper(write(engine), n, waking=waking)
        done, _ = await asyncio.wait([step.task], timeout=10)
        assert done, f"a writer cancelled at await point {n} kept running"
        if not step.fired:
            points = step.count  # it finished before its n-th await point
        # (step, and with it the cancelled task's traceback, is still alive)
        assert engine.pool.checkedout() == 0, f"await point {n}: a connection is still out"
        assert sqlite_free(path) == (True, True), f"await point {n}: the store is not free"
        await engine.dispose()
    assert points > 5


# -- poison events -----------------------------------------------------------


def foreign_event(type_name: str, **payload) -> bytes:
    return msgspec.msgpack.encode(
        {
            "type": type_name,
            "id": "x",
            "v": 1,
            "tenant": "x",
            "aggregate": {"kind": "tenant", "id": "x"},
            "actor": "someone",
            "at": "2024-01-01T00:00:00Z",
            "correlation_id": "c",
            "causation_id": "c",
            **payload,
        }
    )


async def test_a_poison_event_is_quarantined_and_does_not_stop_the_projector(store, sqlite_engine):
    # given a live projector following the log
    engine = sqlite_engine("live.db")
    before = make_history(20, seed=5)
    after = make_history(20, seed=6, prefix="u")
    await append_all(store, before)
    await init_schema(engine)
    task = asyncio.create_task(Projector(store, engine, batch=10).run())
    try:
        await wait_for_checkpoint(engine, len(before))

        # when undecodable events land on the log (not through the store's codec)
        poison = [
            b"\x00\xffthis is not msgpack",
            foreign_event("alien.landed", crew=3),
            foreign_event("tenant.renamed", name="no-previous-field"),
            b"",
        ]
        poison_seqs = []
        for data in poison:
            ack = await store.js.publish("ev.x.tenant.x", data)
            poison_seqs.append(ack.seq)
        # and good events keep coming after them
        await append_all(store, after, chunk=7)
        last = await store.last_seq()

        # then the projector gets past them to the end
        await wait_for_checkpoint(engine, last)
    finally:
        await stop(task)

    async with engine.connect() as conn:
        assert await quarantine_count(conn) == len(poison)
        rows = (await conn.execute(select(quarantine).order_by(quarantine.c.seq))).all()
    assert [r.seq for r in rows] == poison_seqs
    assert all(r.subject == "ev.x.tenant.x" for r in rows)
    assert [r.data for r in rows] == poison
    assert all(r.error for r in rows)
    # every good event was applied, before and after the poison
    good = before + after
    want = {**expected_rows(before), **expected_rows(after, first_seq=len(before) + 5)}
    assert await view_rows(engine) == want
    assert len(want) == len({e.aggregate.id for e in good})
    # and the live store is what a fresh rebuild makes
    cp, live_digest = await store_digest(engine)
    assert (cp, live_digest) == await rebuild(store, sqlite_engine("rebuild.db"))
    assert cp == last


async def test_a_log_of_only_poison_moves_the_checkpoint(store, sqlite_engine):
    for _ in range(3):
        await store.js.publish("ev.x.tenant.x", b"junk")
    engine = sqlite_engine()
    assert await Projector(store, engine).catch_up() == 3
    async with engine.connect() as conn:
        assert await quarantine_count(conn) == 3
    assert await view_rows(engine) == {}


# -- time travel -------------------------------------------------------------


async def test_rebuild_until_a_sequence_or_a_time_is_the_world_as_it_was(store, sqlite_engine):
    # given acme created, renamed (seq 2), then a pause, then deleted (seq 3)
    await store.append([CAUSE.make(TenantCreated, "acme", "tenant", "acme", name="acme")])
    await store.append(
        [CAUSE.make(TenantRenamed, "acme", "tenant", "acme", name="roadrunner", previous="acme")]
    )
    await asyncio.sleep(0.05)
    moment = datetime.now(UTC)
    await asyncio.sleep(0.05)
    await store.append([CAUSE.make(TenantDeleted, "acme", "tenant", "acme")])
    await store.append([CAUSE.make(TenantCreated, "globex", "tenant", "globex", name="globex")])

    # when the world is built as of seq 1, as of the moment, and now
    at_1 = sqlite_engine("at1.db")
    at_moment = sqlite_engine("at-moment.db")
    now = sqlite_engine("now.db")
    assert await Projector(store, at_1).catch_up(until=1) == 1
    assert await Projector(store, at_moment).catch_up(until=moment) == 2
    assert await Projector(store, now).catch_up() == 4

    # then each shows what was true then
    rows_1, rows_moment, rows_now = [await view_rows(e) for e in (at_1, at_moment, now)]
    assert {k: (r["name"], r["status"]) for k, r in rows_1.items()} == {"acme": ("acme", "active")}
    assert {k: (r["name"], r["status"]) for k, r in rows_moment.items()} == {
        "acme": ("roadrunner", "active")
    }
    assert {k: (r["name"], r["status"]) for k, r in rows_now.items()} == {
        "acme": ("roadrunner", "deleted"),
        "globex": ("globex", "active"),
    }
