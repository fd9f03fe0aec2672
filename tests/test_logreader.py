"""The log-reader contract (events/reader.py): every implementation, the fast
one and nats-py's public ordered consumer, and both as a connection reads
that may use consumers of given names only (a host agent's), against a real
nats-server.

Each test runs once per reader. The store fixture here reads through the
reader named by the parameter; appends and the broker are the same for all.
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime, timedelta

import nats.js.errors
import pytest
from nats.aio.client import Client as NATS

from stratus.events import fastread
from stratus.events.errors import Invalid
from stratus.events.fastread import FastConnection, FastReader
from stratus.events.reader import LogReader, NamedReader, OrderedReader
from stratus.events.store import STREAM, Condition, EventStore, connect_nats
from stratus.events.tasks import cancel

from .test_store import bounded, created, renamed

pytestmark = pytest.mark.timeout(90)

READERS = {
    "fast": FastReader,
    "public": OrderedReader,
    "fast-named": FastReader,
    "public-named": NamedReader,
}
# The consumer names a "-named" store's reads may use (as an agent's).
NAMES = ("rd_test_0", "rd_test_1", "rd_test_2")


class QuickFast(FastReader):
    HEARTBEAT_S = 0.25


class QuickPublic(OrderedReader):
    HEARTBEAT_S = 0.25


class QuickNamed(NamedReader):
    HEARTBEAT_S = 0.25


# The same readers with short heartbeats, for the tests that wait for a loss
# to be noticed (three heartbeats of silence).
QUICK = {
    "fast": QuickFast,
    "public": QuickPublic,
    "fast-named": QuickFast,
    "public-named": QuickNamed,
}


async def _open(url: str, kind: str) -> EventStore:
    fast = kind.startswith("fast")
    if fast and (reason := fastread.unsupported()):
        pytest.fail(f"the fast reader refuses the installed nats-py: {reason}", pytrace=False)
    names = NAMES if kind.endswith("-named") else None
    store = EventStore(await connect_nats(url, fast=fast), consumer_names=names)
    # Each reader on the connection it is made for.
    assert isinstance(store.nc, FastConnection) == fast
    assert store.reader is READERS[kind]
    return store


@pytest.fixture(params=sorted(READERS))
def kind(request) -> str:
    return request.param


@pytest.fixture
async def rstore(nats_server, kind):
    """An event store reading through the reader under test."""
    s = await _open(nats_server.url, kind)
    await s.ensure_stream()
    yield s
    await s.close()


def make_reader(store: EventStore, kind: str, **kw) -> LogReader:
    cls = QUICK[kind] if kw.pop("quick", False) else READERS[kind]
    return cls(store, **kw)


# The broker sends a flow-controlled consumer up to 2 MiB of messages
# before it waits for an answer; each event of these tests is more than
# 200 bytes on the wire (subject, ack subject, headers, payload).
FLOW_WINDOW = 2 * 1024 * 1024 // 200


async def eventually(condition, seconds: float = 15.0) -> bool:
    """Whether ``condition()`` comes true within ``seconds``."""
    for _ in range(int(seconds / 0.02)):
        if condition():
            return True
        await asyncio.sleep(0.02)
    return bool(condition())


async def consumers(store: EventStore) -> int:
    return (await store.js.stream_info(STREAM)).state.consumer_count


async def no_consumers_left(store: EventStore, seconds: float = 3.0) -> bool:
    """True once the stream has no consumer (a delete is asynchronous)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while loop.time() < deadline:
        if await consumers(store) == 0:
            return True
        await asyncio.sleep(0.05)
    return False


async def delete_consumers(admin: EventStore) -> int:
    """Delete every consumer of the stream: how many were deleted."""
    deleted = 0
    for info in await admin.js.consumers_info(STREAM):
        # (one may be gone already: a reader replaces its own, too)
        with contextlib.suppress(nats.js.errors.NotFoundError):
            deleted += await admin.js.delete_consumer(STREAM, info.name)
    return deleted


async def append_singles(store: EventStore, prefix: str, n: int) -> list[str]:
    events = [created(f"{prefix}-{i}") for i in range(n)]
    for e in events:
        await store.append([e])
    return [e.id for e in events]


async def append_many(store: EventStore, n: int, prefix: str = "t") -> None:
    """``n`` events as atomic batches of up to 1,000."""
    for start in range(0, n, 1000):
        await store.append([created(f"{prefix}{i}") for i in range(start, min(n, start + 1000))])


# -- order, positions, filters, headers ---------------------------------------


async def test_everything_in_order_in_bounded_batches(rstore):
    events = [created(f"t{i}") for i in range(25)]
    for i in range(0, 25, 5):
        await rstore.append(events[i : i + 5])

    batches = [b async for b in rstore.read(batch=7)]

    assert all(1 <= len(b) <= 7 for b in batches)
    recs = [r for b in batches for r in b]
    assert [r.seq for r in recs] == list(range(1, 26))
    assert [r.decode().id for r in recs] == [e.id for e in events]
    assert [r.subject for r in recs] == [e.subject for e in events]
    assert all(r.headers is None for r in recs)


async def test_after_and_until_a_sequence_stop_at_the_right_place(rstore):
    for i in range(0, 30, 3):
        await rstore.append([created(f"t{j}") for j in range(i, i + 3)])

    assert [r.seq for r in await rstore.read_all(until=12)] == list(range(1, 13))
    assert [r.seq for r in await rstore.read_all(after=12, until=20)] == list(range(13, 21))
    assert [r.seq for r in await rstore.read_all(after=25)] == [26, 27, 28, 29, 30]
    assert [r.seq for r in await rstore.read_all(after=5, until=1000)] == list(range(6, 31))
    assert await rstore.read_all(after=30) == []
    assert await rstore.read_all(after=12, until=12) == []
    # with small batches too: the cut falls inside a batch
    assert [r.seq for r in await rstore.read_all(until=12, batch=5)] == list(range(1, 13))
    # nothing after the stream's end as it was when the read began
    assert [r.seq for r in await rstore.read_all(after=28)] == [29, 30]


async def test_until_a_time_stops_at_the_right_place(rstore):
    early = await append_singles(rstore, "early", 6)
    await asyncio.sleep(0.05)
    cut = datetime.now(UTC)
    await asyncio.sleep(0.05)
    await append_singles(rstore, "late", 6)

    recs = await rstore.read_all(until=cut)
    assert [r.decode().id for r in recs] == early
    assert all(r.time <= cut for r in recs)

    assert await rstore.read_all(until=cut - timedelta(hours=1)) == []
    assert len(await rstore.read_all(until=datetime.now(UTC) + timedelta(hours=1))) == 12
    assert [r.seq for r in await rstore.read_all(after=3, until=cut, batch=2)] == [4, 5, 6]
    # the cut is inclusive: a record's own time keeps it
    last = recs[-1]
    assert (await rstore.read_all(until=last.time))[-1].seq == last.seq


async def test_a_filtered_read_ends_when_its_subjects_end(rstore):
    # given a subject whose last event is far from the stream's end
    await rstore.append([created("acme"), renamed("acme", "a2")])
    await append_singles(rstore, "t", 20)

    # when reading only that subject (many times: no race in deciding the end)
    for _ in range(10):
        recs = await bounded(rstore.read_all(subjects=["ev.acme.tenant.acme"]))
        assert [r.seq for r in recs] == [1, 2]
    assert await bounded(rstore.read_all(subjects=["ev.nobody.>"])) == []
    assert await bounded(rstore.read_all(after=2, subjects=["ev.acme.>"])) == []


async def test_several_subject_filters_and_wildcards(rstore):
    await rstore.append([created("a"), created("b"), created("c"), created("a", agg="x")])
    await rstore.append([renamed("b", "b2"), created("d")])

    recs = await bounded(rstore.read_all(subjects=["ev.a.>", "ev.c.>"]))
    assert [r.seq for r in recs] == [1, 3, 4]
    recs = await bounded(rstore.read_all(subjects=["ev.*.tenant.b", "ev.d.>"], batch=1))
    assert [(r.seq, r.subject) for r in recs] == [
        (2, "ev.b.tenant.b"),
        (5, "ev.b.tenant.b"),
        (6, "ev.d.tenant.d"),
    ]
    recs = await bounded(rstore.read_all(after=1, until=5, subjects=["ev.*.tenant.*"]))
    assert [r.seq for r in recs] == [2, 3, 4, 5]


@pytest.mark.parametrize(
    "subjects", [[], ["foo.>"], ["ev"], ["ev..x"], ["ev.>.x"], ["ev.a.>", ">"]]
)
async def test_a_filter_outside_the_log_is_invalid_and_reads_nothing(rstore, subjects):
    await rstore.append([created("acme")])
    with pytest.raises(Invalid, match=r"subject filters under ev\.>"):
        await bounded(rstore.read_all(subjects=subjects))
    with pytest.raises(Invalid):
        async for _ in rstore.subscribe(subjects=subjects):
            pass
    assert await consumers(rstore) == 0


async def test_headers_come_back_when_asked_for(rstore):
    e = created("acme")
    await rstore.append([e], msg_id="cmd-1")
    await rstore.append([renamed("acme", "a2")], condition=None, msg_id="cmd-2")
    await rstore.append([renamed("acme", "a3")], Condition("ev.acme.>", 2), msg_id="cmd-3")

    recs = await bounded(rstore.read_all(headers=True))
    assert [r.headers for r in recs] == [
        {"Nats-Msg-Id": "cmd-1"},
        {"Nats-Msg-Id": "cmd-2"},
        {
            "Nats-Expected-Last-Subject-Sequence": "2",
            "Nats-Expected-Last-Subject-Sequence-Subject": "ev.acme.>",
            "Nats-Msg-Id": "cmd-3",
        },
    ]
    assert all(r.headers is None for r in await bounded(rstore.read_all()))


async def test_both_readers_give_the_same_records(nats_server):
    fast = await _open(nats_server.url, "fast")
    public = await _open(nats_server.url, "public")
    try:
        await fast.ensure_stream()
        for i in range(0, 40, 8):
            await fast.append([created(f"t{j}") for j in range(i, i + 8)], msg_id=f"m{i}")

        def fields(recs):
            return [(r.seq, r.subject, r.time, r.data, r.headers) for r in recs]

        for kw in ({}, {"headers": True}, {"after": 7, "until": 30, "subjects": ["ev.*.tenant.*"]}):
            a = await bounded(fast.read_all(**kw))
            b = await bounded(public.read_all(**kw))
            assert len(a) == (23 if "until" in kw else 40)
            assert fields(a) == fields(b)
    finally:
        await fast.close()
        await public.close()


# -- following -----------------------------------------------------------------


async def test_follow_delivers_the_backlog_then_new_events(rstore):
    await append_singles(rstore, "old", 2)
    got: list[int] = []
    backlog_seen = asyncio.Event()
    live_seen = asyncio.Event()

    async def follow():
        async with contextlib.aclosing(rstore.subscribe(after=1, batch=3)) as sub:
            async for batch in sub:
                got.extend(r.seq for r in batch)
                if 2 in got:
                    backlog_seen.set()
                if len(got) >= 6:
                    live_seen.set()
                    return

    task = asyncio.create_task(follow())
    try:
        await asyncio.wait_for(backlog_seen.wait(), 10)
        fresh = [created(f"new-{i}") for i in range(5)]
        await rstore.append(fresh[:2])
        for e in fresh[2:]:
            await rstore.append([e])
        await asyncio.wait_for(live_seen.wait(), 10)
    finally:
        assert await cancel(task)  # (3.11 can lose a plain cancel())
    assert got == [2, 3, 4, 5, 6, 7]


async def test_follow_on_an_empty_stream_waits_for_the_first_event(rstore):
    first = asyncio.get_running_loop().create_future()

    async def follow():
        async with contextlib.aclosing(rstore.subscribe()) as sub:
            async for batch in sub:
                first.set_result(batch)
                return

    task = asyncio.create_task(follow())
    try:
        await asyncio.sleep(0.3)
        assert not first.done()
        e = created("acme")
        await rstore.append([e])
        batch = await asyncio.wait_for(first, 10)
    finally:
        assert await cancel(task)  # (3.11 can lose a plain cancel())
    assert [(r.seq, r.decode().id) for r in batch] == [(1, e.id)]


# -- losses: a deleted consumer, a restarted server ---------------------------


async def test_a_consumer_deleted_mid_read_is_replaced_without_a_gap(rstore, kind, connect_store):
    # given a backlog larger than the broker sends unasked (2 MiB), read
    # with a small buffer, so its consumer is still delivering mid-way
    n = 20_000
    await append_many(rstore, n)
    admin = await connect_store()
    reader = make_reader(rstore, kind, quick=True, batch=100, high_water=500)
    seqs: list[int] = []
    deleted = 0
    marks = [1000, 9000]
    async with contextlib.aclosing(reader.batches()) as batches:
        async for batch in batches:
            seqs.extend(r.seq for r in batch)
            # when its consumer is deleted from outside, twice
            if marks and len(seqs) >= marks[0]:
                # (at the next batch again if the reader was between two)
                done = await delete_consumers(admin)
                deleted += done
                if done:
                    marks.pop(0)
            await asyncio.sleep(0)
    # then every event came once, in order, from new consumers
    assert deleted >= 2
    assert seqs == list(range(1, n + 1))
    assert reader.starts >= 3
    assert await no_consumers_left(admin)


class Follower:
    """A task following a reader, keeping the sequences it was handed."""

    def __init__(self, reader: LogReader) -> None:
        self.reader = reader
        self.got: list[int] = []
        self.seen = asyncio.Condition()
        self.task = asyncio.create_task(self._follow())

    async def _follow(self) -> None:
        async for batch in self.reader.batches():
            async with self.seen:
                self.got.extend(r.seq for r in batch)
                self.seen.notify_all()

    async def until(self, n: int, seconds: float = 20) -> None:
        async with self.seen:
            await asyncio.wait_for(self.seen.wait_for(lambda: len(self.got) >= n), seconds)

    async def stop(self) -> None:
        assert await cancel(self.task)  # (3.11 can lose a plain cancel())


async def test_a_follower_survives_a_deleted_consumer_while_idle(rstore, kind, connect_store):
    await append_singles(rstore, "old", 3)
    admin = await connect_store()
    follower = Follower(make_reader(rstore, kind, quick=True, follow=True))
    try:
        await follower.until(3)
        assert await delete_consumers(admin) == 1
        await append_singles(admin, "new", 3)
        await follower.until(6)
    finally:
        await follower.stop()
    assert follower.got == [1, 2, 3, 4, 5, 6]
    assert follower.reader.starts >= 2
    assert await no_consumers_left(admin)


async def test_a_follower_survives_a_server_restart(nats_server, kind):
    store = await _open(nats_server.url, kind)
    try:
        await store.ensure_stream()
        await append_singles(store, "old", 5)
        follower = Follower(make_reader(store, kind, quick=True, follow=True, after=2))
        try:
            await follower.until(3)
            # when the broker restarts (same port and store; consumers are gone)
            port = int(nats_server.url.rsplit(":", 1)[1])
            nats_server.stop()
            nats_server.port = port
            await asyncio.to_thread(nats_server.start)
            await asyncio.wait_for(_until_connected(store.nc), 15)
            # and events land after it
            await append_singles(store, "new", 4)
            await follower.until(7)
        finally:
            await follower.stop()
        # then the follower has every event once, in order
        assert follower.got == [3, 4, 5, 6, 7, 8, 9]
        assert follower.reader.starts >= 2
    finally:
        await store.close()


async def _until_connected(nc: NATS) -> None:
    for _ in range(300):
        if nc.is_connected:
            return
        await asyncio.sleep(0.05)


# -- flow control ----------------------------------------------------------------


async def test_a_slow_reader_holds_a_bounded_backlog(rstore, kind):
    # given a backlog many times the reader's high-water mark
    n, high_water = 30_000, 2_000
    await append_many(rstore, n)
    reader = make_reader(rstore, kind, batch=200, high_water=high_water)
    seqs: list[int] = []
    most = 0
    # when it reads slowly at first (the broker could send it everything)
    async with contextlib.aclosing(reader.batches()) as batches:
        async for batch in batches:
            seqs.extend(r.seq for r in batch)
            if len(seqs) == len(batch):
                # after the first batch: the buffer fills up to the mark, and
                # has time to grow past it if nothing held the broker back
                full = high_water - len(batch)
                assert await eventually(lambda full=full: reader.buffered >= full)
                await asyncio.sleep(0.5)
            most = max(most, reader.buffered)
            if len(seqs) <= 4_000:
                await asyncio.sleep(0.02)
    # then it never held much more than its mark, and still read everything
    assert seqs == list(range(1, n + 1))
    assert most <= high_water + FLOW_WINDOW, most


# -- stopping --------------------------------------------------------------------


async def test_stopping_early_or_cancelling_leaves_no_consumer(rstore, kind):
    await append_many(rstore, 3000)

    # a read to its end
    assert len(await bounded(rstore.read_all())) == 3000
    assert await no_consumers_left(rstore)

    # a read left after its first batch
    async with contextlib.aclosing(rstore.read(batch=10)) as batches:
        async for batch in batches:
            # a batch holds at most 10, from the start, in order: the store
            # promises "at most batch" (under load a first batch held 4)
            seqs = [r.seq for r in batch]
            assert 1 <= len(seqs) <= 10 and seqs == list(range(1, len(seqs) + 1))
            assert await consumers(rstore) == 1
            break
    assert await no_consumers_left(rstore)

    # a follower whose task is cancelled, while idle and while delivering
    for after in (3000, 0):
        started = asyncio.Event()

        async def follow(after=after, started=started):
            async for _ in rstore.subscribe(after=after, batch=5):
                started.set()
                await asyncio.sleep(0.01)

        task = asyncio.create_task(follow())
        if after:
            await asyncio.sleep(0.3)
        else:
            await asyncio.wait_for(started.wait(), 10)
        assert await consumers(rstore) == 1
        assert await cancel(task)  # (3.11 can lose a plain cancel())
        assert await no_consumers_left(rstore)


# -- reads through given consumer names (a host agent's) ----------------------------


@pytest.mark.parametrize("kind", ["fast-named", "public-named"])
async def test_named_reads_use_only_their_names_and_replace_a_leftover(nats_server, kind):
    from nats.js.api import ConsumerConfig, DeliverPolicy

    store = await _open(nats_server.url, kind)
    try:
        await store.ensure_stream()
        await append_many(store, 3000)
        # a consumer of one of the names, left by a reader that was killed
        await store.js.add_consumer(
            STREAM,
            ConsumerConfig(
                name=NAMES[0],
                deliver_subject="_INBOX.gone",
                deliver_policy=DeliverPolicy.ALL,
                inactive_threshold=60,
            ),
        )
        seen: set[str] = set()

        async def sample() -> None:
            while True:
                seen.update(c.name for c in await store.js.consumers_info(STREAM))
                await asyncio.sleep(0.01)

        sampler = asyncio.create_task(sample())
        try:
            # more reads at once than there are names: each waits for one
            reads = await asyncio.gather(*(bounded(store.read_all()) for _ in range(5)))
        finally:
            assert await cancel(sampler)  # (3.11 can lose a plain cancel())
        assert [[r.seq for r in read] for read in reads] == [list(range(1, 3001))] * 5
        assert seen and seen <= set(NAMES), seen
        assert await no_consumers_left(store)
    finally:
        await store.close()
