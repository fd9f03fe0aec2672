"""Taking work from a pull consumer as it is ready (a real nats-server).

The same contract for both ways of taking it: ``fetch_ready`` on nats-py's
pull subscription, and ``Puller`` (the pull protocol on a subscription of
its own)."""

from __future__ import annotations

import asyncio
import time

import nats.errors
import pytest
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from stratus.events.pull import Puller, fetch_ready
from stratus.events.store import STREAM
from stratus.ops.bench.schedkit import server_request

WORK = "ev.*.server.*"


def _config(durable: str, ack_wait: float = 30) -> ConsumerConfig:
    return ConsumerConfig(
        durable_name=durable,
        filter_subject=WORK,
        ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=DeliverPolicy.ALL,
        ack_wait=ack_wait,
    )


@pytest.fixture(params=["fetch_ready", "puller"])
async def taker(request, store):
    """``make(durable)``: a ``fetch(batch, timeout)`` on that durable consumer."""
    pullers: list[Puller] = []

    async def make(durable: str, ack_wait: float = 30):
        if request.param == "fetch_ready":
            sub = await store.js.pull_subscribe(
                WORK, durable=durable, stream=STREAM, config=_config(durable, ack_wait)
            )
            return lambda batch, timeout: fetch_ready(sub, batch, timeout)
        p = Puller(store.js, store.nc, STREAM, durable)
        await p.start(_config(durable, ack_wait))
        pullers.append(p)
        return p.fetch

    yield make
    for p in pullers:
        await p.stop()


async def test_a_trickle_of_work_is_taken_without_waiting_to_fill_the_batch(store, taker):
    fetch = await taker("pull-test")
    # An idle consumer: the first fetch waits, and work comes 5 at a time.
    waiting = asyncio.create_task(fetch(256, 5))
    await asyncio.sleep(0.2)
    t0 = time.monotonic()
    await store.append([server_request() for _ in range(5)])
    got = await waiting
    took = time.monotonic() - t0
    # nats-py 2.16's own fetch(256, timeout=5) returns here only after 5 s; the
    # bound leaves room for a loaded machine and is far below that.
    assert 1 <= len(got) <= 5
    assert took < 2.0, took
    # What is ready is taken at once, all of it, up to the batch.
    await store.append([server_request() for _ in range(20)])
    seen = len(got)
    deadline = time.monotonic() + 5
    while seen < 25 and time.monotonic() < deadline:
        msgs = await fetch(256, 1)
        for m in msgs:
            await m.ack()
        seen += len(msgs)
    assert seen == 25
    for m in got:
        await m.ack()


async def test_no_work_within_the_timeout_raises(store, taker):
    fetch = await taker("pull-idle")
    t0 = time.monotonic()
    with pytest.raises((TimeoutError, nats.errors.TimeoutError)):
        await fetch(16, 0.3)
    assert time.monotonic() - t0 < 2.0


async def test_a_batch_of_one_is_one_message(store, taker):
    fetch = await taker("pull-one")
    await store.append([server_request() for _ in range(3)])
    got = await fetch(1, 5)
    assert len(got) == 1


async def test_work_not_acknowledged_comes_again_and_each_message_is_taken_once(store, taker):
    fetch = await taker("pull-redeliver", ack_wait=1)
    reqs = [server_request() for _ in range(30)]
    await store.append(reqs)
    taken: list[str] = []
    dropped = None
    deadline = time.monotonic() + 10
    while len(taken) < 30 and time.monotonic() < deadline:
        try:
            msgs = await fetch(7, 1)
        except (TimeoutError, nats.errors.TimeoutError):
            continue
        assert len(msgs) <= 7
        for m in msgs:
            if dropped is None:
                dropped = m.metadata.sequence.stream  # never acknowledged
                continue
            taken.append(m.metadata.sequence.stream)
            await m.ack()
    # The one left unacknowledged came back after ack_wait; nothing twice.
    assert dropped in taken
    assert len(taken) == len(set(taken)) == 30


async def test_pullers_sharing_a_consumer_split_the_work_and_never_hold_more_than_asked(store):
    a = Puller(store.js, store.nc, STREAM, "pull-shared")
    b = Puller(store.js, store.nc, STREAM, "pull-shared")
    await a.start(_config("pull-shared"))
    await b.start(_config("pull-shared"))
    try:
        await store.append([server_request() for _ in range(200)])
        seen: dict[int, str] = {}
        deadline = time.monotonic() + 10
        while len(seen) < 200 and time.monotonic() < deadline:
            for name, p in (("a", a), ("b", b)):
                try:
                    msgs = await p.fetch(16, 0.2)
                except (TimeoutError, nats.errors.TimeoutError):
                    continue
                # What it holds besides (delivered or still owed by its
                # open request) never takes it past what was asked.
                assert len(msgs) + p.held <= 16
                for m in msgs:
                    seq = m.metadata.sequence.stream
                    assert seq not in seen, f"{seq} taken by {seen.get(seq)} and {name}"
                    seen[seq] = name
                    await m.ack()
        assert len(seen) == 200
        assert set(seen.values()) == {"a", "b"}
    finally:
        await a.stop()
        await b.stop()


async def test_a_puller_binds_to_an_existing_consumer_as_it_is(store):
    await store.js.add_consumer(STREAM, config=_config("pull-existing", ack_wait=7))
    p = Puller(store.js, store.nc, STREAM, "pull-existing")
    await p.start(_config("pull-existing", ack_wait=30))
    try:
        info = await store.js.consumer_info(STREAM, "pull-existing")
        assert info.config.ack_wait == 7
        await store.append([server_request()])
        assert len(await p.fetch(4, 5)) == 1
    finally:
        await p.stop()


async def test_a_puller_not_started_refuses(store):
    with pytest.raises(nats.errors.Error):
        await Puller(store.js, store.nc, STREAM, "pull-never").fetch(1, 0.1)
