"""One projector writes a PostgreSQL store: a lease in a KV bucket, a fence in the database.

Real nats-server, real PostgreSQL (conftest's ``pg_url``), and for the
takeovers real ``stratus serve projector`` processes killed with SIGKILL or
paused with SIGSTOP. Every committed batch is recorded by a trigger the test
puts on the checkpoint (which lease wrote it, from which sequence to which),
so "no event applied twice or skipped, nothing written by a holder that
lost the lease" is read from the database itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from nats.js.api import StorageType
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from stratus.events.errors import Invalid
from stratus.events.lease import LEASES, Lease, LeaseLost
from stratus.events.model import Cause
from stratus.events.scheduling import HEARTBEATS
from stratus.events.tenants import TenantCreated, TenantRenamed
from stratus.projections.leased import WRITER_EPOCH, LeaseFence, lease_row, take_over
from stratus.projections.projector import Projector, init_schema, read_checkpoint, store_digest
from stratus.projections.query import QueryService
from stratus.projections.schema import checkpoints

from .test_postgres import engine_at
from .test_projector import append_all, make_history

pytestmark = pytest.mark.timeout(180)

STRATUS = [sys.executable, "-m", "stratus.cli.main"]
CAUSE = Cause(actor="test", correlation_id="corr", causation_id="corr")


async def rebuilt_digest(store, sqlite_engine, until: int) -> tuple[int, str]:
    """A fresh SQLite store replayed to ``until``: (checkpoint, digest)."""
    engine = sqlite_engine(f"fresh-{until}.db")
    projector = Projector(store, engine)
    assert await projector.catch_up(until=until) == until
    projector.close()
    return await store_digest(engine)


# -- the lease in the KV bucket ----------------------------------------------


async def test_one_of_many_candidates_takes_a_free_lease_and_keeps_it(store):
    # given six candidates for one free lease, all trying at once
    cands = [Lease(store.js, "projector.race", holder=f"c{i}", ttl=2) for i in range(6)]
    got = await asyncio.gather(*(c.try_acquire() for c in cands))
    # then exactly one holds it
    winners = [c for c, held in zip(cands, got, strict=True) if held is not None]
    assert len(winners) == 1
    holder = winners[0]
    others = [c for c in cands if c is not holder]
    # renewed within its TTL it stays held, well past one TTL
    for _ in range(4):
        await asyncio.sleep(holder.renew_every)
        # (the server stores this renewal after this instant: it expires
        # a TTL after that, not sooner)
        renewing_at = time.monotonic()
        assert await holder.renew()
    epoch = holder.held.epoch
    assert [await c.try_acquire() for c in others] == [None] * len(others)
    assert (await others[0].current()).holder == holder.holder
    # the bucket: as many replicas as the event stream, on disk, per-message TTLs
    info = await store.js.stream_info(f"KV_{LEASES}")
    events = await store.js.stream_info(store.stream)
    assert info.config.num_replicas == events.config.num_replicas == 1
    assert info.config.storage == StorageType.FILE and info.config.allow_msg_ttl

    # when the holder stops renewing, another candidate takes it when the
    # server expires it: not before the TTL, and not long after
    taken = await asyncio.wait_for(others[0].acquire(), 10)
    waited = time.monotonic() - renewing_at
    # (above: the server's expiry, a poll of 0.25 s, a loaded machine)
    assert holder.ttl - 0.05 <= waited <= holder.ttl + 3, waited
    assert taken.epoch > epoch
    # and the old holder learns it lost the lease at its next renewal
    assert await holder.renew() is False and not holder.valid()

    # a clean stop gives the lease up at once
    await others[0].release()
    assert await others[1].try_acquire() is not None
    assert await others[0].renew() is False


async def test_a_lease_with_a_bad_key_or_ttl_is_refused_before_any_write(store):
    for key in ("", "projector main", "projector.*", "projector.>", ".x", "x."):
        with pytest.raises(Invalid, match="lease key"):
            Lease(store.js, key)
    for ttl in (0, 0.5, 2.5):
        with pytest.raises(Invalid, match="lease TTL"):
            Lease(store.js, "projector.main", ttl=ttl)
    # nothing was written: not even the bucket exists (only the log and the
    # heartbeat bucket made with it)
    names = [s.config.name async for s in _streams(store)]
    assert sorted(names) == sorted([store.stream, f"KV_{HEARTBEATS}"])


async def _streams(store) -> AsyncIterator:
    for info in await store.js.streams_info():
        yield info


# -- the fence in the database ------------------------------------------------


async def test_a_write_after_a_takeover_is_refused_and_changes_nothing(
    store, pg_url, sqlite_engine
):
    await append_all(store, make_history(60, seed=41))
    last = await store.last_seq()
    recs = [r async for batch in store.read(batch=500) for r in batch]
    # (TTLs far longer than the test: no lease runs out on its own here)
    a = Lease(store.js, "projector.main", holder="a", ttl=60)
    # (another key of the same bucket: a later revision, as a takeover's)
    b = Lease(store.js, "projector.other", holder="b", ttl=60)
    async with engine_at(pg_url) as pg:
        # given holder A projecting the first 30 events, fenced by its lease
        held_a = await a.try_acquire()
        assert held_a is not None and await take_over(pg, "main", held_a)
        pa = Projector(store, pg, fence=LeaseFence(a, held_a, "main"))
        await pa.start_position()
        await pa.apply(recs[:30])
        at_30 = await store_digest(pg)
        assert at_30 == await rebuilt_digest(store, sqlite_engine, 30)

        # when B takes the store over while A (paused after its own clock
        # said it still held the lease) has not noticed yet
        held_b = await b.try_acquire()
        assert held_b is not None and held_b.epoch > held_a.epoch
        assert await take_over(pg, "main", held_b)
        assert a.valid()
        # then A's next write is refused, and leaves the store as it was
        with pytest.raises(LeaseLost, match="taken over"):
            await pa.apply(recs[30:])
        assert await store_digest(pg) == at_30
        # an older lease cannot take the store back
        assert not await take_over(pg, "main", held_a)
        async with pg.connect() as conn:
            row = await lease_row(conn, "main")
        assert row is not None and (row["holder"], row["epoch"]) == ("b", held_b.epoch)

        # and B carries on from A's checkpoint to a store equal to a rebuild
        pb = Projector(store, pg, fence=LeaseFence(b, held_b, "main"))
        assert await pb.catch_up() == last
        assert await store_digest(pg) == await rebuilt_digest(store, sqlite_engine, last)
        # the store's status says who writes it
        status = await QueryService(store, pg).handle("status", b"{}")
        assert status["projector_lease"]["holder"] == "b"
        assert status["projector_lease"]["epoch"] == held_b.epoch


async def test_a_takeover_waits_for_the_holders_write_in_flight(store, pg_url):
    a = Lease(store.js, "projector.main", holder="a", ttl=60)
    b = Lease(store.js, "projector.other", holder="b", ttl=60)
    async with engine_at(pg_url) as pg:
        held_a = await a.try_acquire()
        assert await take_over(pg, "main", held_a)
        fence = LeaseFence(a, held_a, "main")
        entered, commit = asyncio.Event(), asyncio.Event()

        async def a_writes() -> None:
            async with pg.begin() as conn:
                await fence(conn)
                await conn.execute(checkpoints.insert().values(name="main", last_seq=45))
                entered.set()
                await commit.wait()

        # given A inside a write transaction (past its fence)
        writing = asyncio.create_task(a_writes())
        await asyncio.wait_for(entered.wait(), 10)
        held_b = await b.try_acquire()
        taking = asyncio.create_task(take_over(pg, "main", held_b))
        # then B's takeover waits for it...
        await asyncio.sleep(0.5)
        assert not taking.done()
        commit.set()
        await asyncio.wait_for(writing, 10)
        assert await asyncio.wait_for(taking, 10) is True
        # ...and starts from what A committed
        async with pg.connect() as conn:
            assert await read_checkpoint(conn) == 45


async def test_a_holder_paused_inside_a_write_is_ended_by_the_server(store, pg_url):
    a = Lease(store.js, "projector.main", holder="a", ttl=2)
    b = Lease(store.js, "projector.other", holder="b", ttl=60)
    async with engine_at(pg_url) as pg:
        held_a = await a.try_acquire()
        assert await take_over(pg, "main", held_a)
        # given A stopped inside a write transaction that holds the lease row
        conn = await pg.connect()
        tx = await conn.begin()
        assert await a.renew()  # (just renewed: its own clock lets it write)
        await LeaseFence(a, held_a, "main")(conn)
        await conn.execute(checkpoints.insert().values(name="main", last_seq=7))
        try:
            # when B takes over, the server ends A's idle transaction after
            # the lease's TTL, and B's takeover goes through
            held_b = await b.try_acquire()
            t0 = time.monotonic()
            assert await asyncio.wait_for(take_over(pg, "main", held_b), 15)
            waited = time.monotonic() - t0
            assert 0.5 <= waited <= a.ttl + 5, waited
            # then A's write is gone: its commit fails
            with pytest.raises(DBAPIError):
                await tx.commit()
        finally:
            with contextlib.suppress(Exception):
                await conn.close()
        async with pg.connect() as c:
            assert await read_checkpoint(c) == 0


# -- projector processes ---------------------------------------------------------

# The trigger that records every committed checkpoint write: the lease the
# store named then (read under the fence's lock, in the writer's own
# transaction) and the lease the writer itself believed it held (the
# transaction's WRITER_EPOCH setting, set by its fence): the two differ for a
# stale holder's write that got through.
WRITE_LOG = [
    """CREATE TABLE write_log (
        id bigserial PRIMARY KEY, epoch bigint, holder text, writer_epoch bigint,
        old_seq bigint NOT NULL, new_seq bigint NOT NULL,
        at timestamptz NOT NULL DEFAULT clock_timestamp())""",
    f"""CREATE FUNCTION log_write() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
      INSERT INTO write_log (epoch, holder, writer_epoch, old_seq, new_seq) VALUES (
        (SELECT epoch FROM projector_leases WHERE name = NEW.name),
        (SELECT holder FROM projector_leases WHERE name = NEW.name),
        CAST(NULLIF(current_setting('{WRITER_EPOCH}', true), '') AS bigint),
        CASE WHEN TG_OP = 'UPDATE' THEN OLD.last_seq ELSE 0 END,
        NEW.last_seq);
      RETURN NEW;
    END $$""",
    """CREATE TRIGGER log_write AFTER INSERT OR UPDATE ON checkpoints
       FOR EACH ROW WHEN (NEW.name = 'main') EXECUTE FUNCTION log_write()""",
]


async def install_write_log(pg: AsyncEngine) -> None:
    await init_schema(pg)
    async with pg.begin() as conn:
        for ddl in WRITE_LOG:
            await conn.execute(text(ddl))


async def write_log(pg: AsyncEngine) -> list[tuple[int | None, str | None, int, int]]:
    """(epoch, holder, old_seq, new_seq) of each write, in commit order; every
    write was made by the holder of the lease the store named."""
    async with pg.connect() as conn:
        q = text("SELECT epoch, holder, writer_epoch, old_seq, new_seq FROM write_log ORDER BY id")
        rows = (await conn.execute(q)).all()
    for epoch, _, writer, old, new in rows:
        assert writer == epoch, f"{old}..{new} written under lease {writer} while {epoch} held"
    return [(epoch, holder, old, new) for epoch, holder, _, old, new in rows]


def check_write_log(log: list[tuple]) -> list[tuple[int, str]]:
    """Every event applied exactly once, in order, by one lease at a time:
    each write starts where the last ended, and a lease never writes again
    once a later one has. Returns the leases (epoch, holder) in order."""
    assert log, "nothing was written"
    terms: list[tuple[int, str]] = []
    end = 0
    for epoch, holder, old, new in log:
        assert epoch is not None, "a write without a lease row"
        assert old == end, f"write {old}..{new} after {end}: skipped or applied twice"
        assert new > old
        end = new
        if not terms or terms[-1][0] != epoch:
            assert all(epoch > e for e, _ in terms), f"lease {epoch} wrote after a later one"
            terms.append((epoch, holder))
    return terms


class Projectors:
    """`stratus serve projector` processes on one database, each with its
    own data dir (another machine's), killed or stopped by the test."""

    def __init__(self, url: str, db: str, tmp: Path, ttl: int) -> None:
        self.url, self.db, self.tmp, self.ttl = url, db, tmp, ttl
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str) -> subprocess.Popen:
        data = self.tmp / name
        data.mkdir(parents=True, exist_ok=True)
        with open(self.tmp / f"{name}.log", "ab") as out:
            p = subprocess.Popen(
                [*STRATUS, "--url", self.url, "serve", "projector", "--insecure-no-auth",
                 "--db", self.db, "--data-dir", str(data), "--lease-ttl", str(self.ttl),
                 "--holder", name],
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, "STRATUS_DATA_DIR": str(data)},
            )  # fmt: skip
        self.procs[name] = p
        return p

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text(errors="replace")

    async def ready(self, name: str) -> None:
        for _ in range(300):  # bounded: 30 s
            if "ready" in self.log(name):
                return
            assert self.procs[name].poll() is None, self.log(name)
            await asyncio.sleep(0.1)
        raise AssertionError(f"{name} did not start: {self.log(name)}")

    def stop_all(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(signal.SIGCONT)
                    p.terminate()
        for p in self.procs.values():
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)


@pytest.fixture
def projectors(nats_server, pg_url, tmp_path) -> Iterator[Projectors]:
    # A short TTL keeps the test short; the bounds below are in TTLs.
    procs = Projectors(nats_server.url, pg_url, tmp_path / "machines", ttl=2)
    yield procs
    procs.stop_all()


class Stream:
    """Events appended while the test kills and pauses projectors: one
    tenant created, then renamed (two subjects, so batches interleave)."""

    def __init__(self, store) -> None:
        self.store = store
        self.n = 0
        self.task: asyncio.Task | None = None
        self.stopping = False

    async def _run(self) -> None:
        for _ in range(10_000):  # bounded: stopped long before
            if self.stopping:
                return
            t = f"s{self.n:05d}"
            self.n += 1
            await self.store.append([CAUSE.make(TenantCreated, t, "tenant", t, name=t)])
            await self.store.append(
                [CAUSE.make(TenantRenamed, t, "tenant", t, name=f"{t}-r", previous=t)]
            )
            await asyncio.sleep(0.02)

    def __enter__(self) -> Stream:
        self.task = asyncio.create_task(self._run())
        return self

    def __exit__(self, *exc) -> None:
        self.stopping = True

    async def stop(self) -> None:
        # A flag, not a cancel: on Python 3.11 a cancel that lands as an
        # append's reply arrives is lost (see events.tasks), and the stream
        # went on appending until the test timed out.
        self.stopping = True
        if self.task is not None:
            await asyncio.wait_for(self.task, 30)


async def holder_now(pg: AsyncEngine) -> dict | None:
    async with pg.connect() as conn:
        return await lease_row(conn, "main")


async def wait_for(predicate, seconds: float, step: float = 0.05):
    """Poll ``predicate`` (async) until truthy; returns (value, seconds waited)."""
    t0 = time.monotonic()
    while True:
        got = await predicate()
        if got:
            return got, time.monotonic() - t0
        if time.monotonic() - t0 > seconds:
            raise AssertionError(f"not within {seconds}s")
        await asyncio.sleep(step)


async def checkpoint_of(pg: AsyncEngine) -> int:
    async with pg.connect() as conn:
        return await read_checkpoint(conn)


async def two_on_one_database(
    projectors: Projectors, store, pg: AsyncEngine, seed: int | None = None
) -> None:
    """The write log installed, a history (if ``seed``) on the log, and two
    projector processes ("m1", "m2") started on one database."""
    await install_write_log(pg)
    if seed is not None:
        await append_all(store, make_history(40, seed=seed))
    for name in ("m1", "m2"):
        projectors.start(name)
    for name in ("m1", "m2"):
        await projectors.ready(name)


async def writing(pg: AsyncEngine) -> dict:
    """The first holder's lease row, once it has written past the history."""
    first, _ = await wait_for(lambda: holder_now(pg), 20)
    await wait_for(lambda: _past(pg, 60), 20)
    return first


def taken_from(pg: AsyncEngine, first: dict):
    """A predicate: the lease row once another holder than ``first`` has it."""

    async def taken() -> dict | None:
        row = await holder_now(pg)
        return row if row and row["holder"] != first["holder"] else None

    return taken


# Takeover bound after the holder dies, in seconds: the TTL (the server
# expires the key at most a TTL after the last renewal, which came before
# the death), up to 1 s for the server's expiry (TTLs are whole seconds on
# the wire), a candidate's poll (0.25 s), the takeover's transaction and the
# first batch's fetch and write, with room for a loaded 2-core machine.
def takeover_bound(ttl: int) -> float:
    return ttl + 1 + 0.25 + 2.75


async def test_the_standby_projector_takes_over_after_a_kill_9_exactly_once(
    projectors, store, pg_url, sqlite_engine
):
    async with engine_at(pg_url) as pg:
        # given two projector processes on one database, events streaming in
        await two_on_one_database(projectors, store, pg, seed=51)
        with Stream(store) as stream:
            first = await writing(pg)
            # only the holder writes meanwhile
            assert {h for _, h, _, _ in await write_log(pg)} == {first["holder"]}

            # when the holder is killed with SIGKILL
            projectors.procs[first["holder"]].kill()
            killed_at = time.monotonic()
            at_kill = await checkpoint_of(pg)

            # then the other takes the lease and goes on writing, within the bound
            second, _ = await wait_for(taken_from(pg, first), 30)
            took_lease = time.monotonic() - killed_at
            await wait_for(lambda: _past(pg, at_kill), 30)
            writing_again = time.monotonic() - killed_at
            await stream.stop()
        last = await store.last_seq()
        await wait_for(lambda: _past(pg, last - 1), 30)
        print(f"takeover after kill -9: lease {took_lease:.2f} s, writing {writing_again:.2f} s")
        bound = takeover_bound(projectors.ttl)
        assert took_lease <= writing_again <= bound, (took_lease, writing_again, bound)
        # the second holder stands on a later lease
        assert second["epoch"] > first["epoch"]
        # every event applied exactly once, by one holder at a time
        terms = check_write_log(await write_log(pg))
        assert [h for _, h in terms] == [first["holder"], second["holder"]]
        assert (await write_log(pg))[-1][3] == last
        # and the store equals a fresh rebuild
        assert await store_digest(pg) == await rebuilt_digest(store, sqlite_engine, last)


async def _past(pg: AsyncEngine, seq: int) -> bool:
    return await checkpoint_of(pg) > seq


async def test_a_holder_paused_past_its_lease_writes_nothing_when_it_wakes(
    projectors, store, pg_url, sqlite_engine
):
    async with engine_at(pg_url) as pg:
        await two_on_one_database(projectors, store, pg, seed=52)
        with Stream(store) as stream:
            first = await writing(pg)
            old = projectors.procs[first["holder"]]
            # given the holder paused (SIGSTOP) while events keep coming
            old.send_signal(signal.SIGSTOP)
            paused_at = time.monotonic()
            # when the other takes over and writes
            second, _ = await wait_for(taken_from(pg, first), 30)
            took = time.monotonic() - paused_at
            at_takeover = await checkpoint_of(pg)
            await wait_for(lambda: _past(pg, at_takeover), 30)
            # and the paused one wakes up with events still arriving
            old.send_signal(signal.SIGCONT)
            await wait_for(lambda: _logged(projectors, first["holder"], "lease lost"), 30)
            # (a few renewal periods awake, events streaming)
            await asyncio.sleep(3 * projectors.ttl)
            await stream.stop()
        last = await store.last_seq()
        await wait_for(lambda: _past(pg, last - 1), 30)
        print(f"takeover after SIGSTOP: {took:.2f} s")
        assert took <= takeover_bound(projectors.ttl)
        # then it wrote nothing after the takeover: every write after the
        # second lease's first is the second's, and none was applied twice
        # (check_write_log: no write of the paused holder's lease after a
        # later lease's first)
        terms = check_write_log(await write_log(pg))
        assert [h for _, h in terms[:2]] == [first["holder"], second["holder"]]
        # Any later lease is a new term, taken after a holder's renewal came
        # later than the 2 s TTL (a loaded machine: m2, m1, m1 once): fenced
        # like the takeover, by the check above. The paused one's own lease
        # wrote nothing after the takeover, and it stands by now; the last
        # term's lease holds.
        assert old.poll() is None
        now = await holder_now(pg)
        assert (now["epoch"], now["holder"]) == terms[-1]
        assert await store_digest(pg) == await rebuilt_digest(store, sqlite_engine, last)


async def _logged(projectors: Projectors, name: str, words: str) -> bool:
    return words in projectors.log(name)


async def test_a_stopped_holder_hands_the_lease_over_at_once(projectors, store, pg_url):
    # A TTL far longer than a stop takes, even on a loaded machine: the last
    # renewal came at most a third of it before the stop, so the key cannot
    # expire sooner than two thirds of it after; a takeover before then was
    # a release.
    projectors.ttl = 30
    expiry_at_the_soonest = projectors.ttl * 2 / 3
    async with engine_at(pg_url) as pg:
        await two_on_one_database(projectors, store, pg)
        first, _ = await wait_for(lambda: holder_now(pg), 20)
        # when the holder stops cleanly (SIGTERM), it gives the lease up
        stopped = projectors.procs[first["holder"]]
        stopped.terminate()
        t0 = time.monotonic()
        # then the other takes it before it could have expired
        await wait_for(taken_from(pg, first), expiry_at_the_soonest - 1)
        took = time.monotonic() - t0
        print(f"takeover after SIGTERM: {took:.2f} s")
        assert took < expiry_at_the_soonest, "the lease was released, not expired"
        # and the stopped one exited cleanly
        assert stopped.wait(15) == 0


def test_stratus_serve_projector_refuses_bad_lease_options(nats_server, tmp_path):
    for argv, words in (
        (["--lease-ttl", "0"], "lease-ttl"),
        (["--lease-ttl", "soon"], "lease-ttl"),
        (["--bogus"], "No such option"),
    ):
        r = subprocess.run(
            [*STRATUS, "--url", nats_server.url, "serve", "projector", "--insecure-no-auth", *argv,
             "--data-dir", str(tmp_path)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert r.returncode == 2, (argv, r.stdout, r.stderr)
        assert words in r.stderr, (argv, r.stderr)
