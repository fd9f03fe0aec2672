"""The allocator service on a real nats-server: replicas never offer one
host twice at once, offers expire, declines are honoured."""

from __future__ import annotations

import asyncio

import pytest

from stratus.events.frameworks import (
    FrameworkRegistered,
    HostOffered,
    HostOfferEnded,
    OfferDeclined,
    OfferRescinded,
)
from stratus.events.resources import SYSTEM
from stratus.events.scheduling import HostClaimed
from stratus.handlers.allocator import AllocatorConfig, AllocatorService
from stratus.ops.bench.schedkit import CAUSE, host_event, register_hosts

from .test_images import until

pytestmark = pytest.mark.timeout(60)


async def framework(store, tenant: str, name: str, weight: float = 1.0) -> str:
    e = CAUSE.make(FrameworkRegistered, tenant, "framework", f"fw-{name}", name=name, weight=weight)
    await store.append([e])
    return e.aggregate.id


async def host_events(store) -> dict[str, list]:
    out: dict[str, list] = {}
    for r in await store.read_all(subjects=["ev._system.host.>"]):
        e = r.decode()
        out.setdefault(e.aggregate.id, []).append(e)
    return out


async def test_two_replicas_offer_each_host_once(store, connect_store):
    hosts = [host_event(f"al-h{i:02d}", vcpus=4, ram_mb=8192) for i in range(40)]
    await register_hosts(store, hosts)
    await framework(store, "t1", "a")
    await framework(store, "t2", "b")
    replicas = [AllocatorService(await connect_store()) for _ in range(2)]
    for a in replicas:
        await a.start()
    try:

        async def every_host_offered():
            evs = await host_events(store)
            return all(any(isinstance(e, HostOffered) for e in evs[h.name]) for h in hosts)

        await until(every_host_offered, 20, "every host offered")
        await asyncio.sleep(0.5)  # let both replicas run more passes
        for h, evs in (await host_events(store)).items():
            offered = [e for e in evs if isinstance(e, HostOffered)]
            # one live offer at a time: never two offers without an end between
            assert len(offered) == 1, (h, [type(e).__name__ for e in evs])
        # the frameworks were offered hosts in turn (lowest dominant share first)
        by_fw: dict[str, int] = {}
        for evs in (await host_events(store)).values():
            for e in evs:
                if isinstance(e, HostOffered):
                    by_fw[e.framework] = by_fw.get(e.framework, 0) + 1
        assert by_fw == {"fw-a": 20, "fw-b": 20}
    finally:
        for a in replicas:
            await a.stop()
            await a.store.close()


async def test_offers_expire_and_are_made_again(store):
    await register_hosts(store, [host_event("exp-h1", vcpus=4, ram_mb=8192)])
    await framework(store, "t1", "a")
    alloc = AllocatorService(store, AllocatorConfig(interval_s=0.1, offer_timeout_s=0.5))
    await alloc.start()
    try:

        async def rescinded_and_again():
            evs = (await host_events(store))["exp-h1"]
            kinds = [type(e).__name__ for e in evs]
            return "HostOfferEnded" in kinds and kinds.count("HostOffered") >= 2

        await until(rescinded_and_again, 10, "an offer rescinded and made again")
        recs = await store.read_all(subjects=["ev.t1.offer.*"])
        assert any(isinstance(r.decode(), OfferRescinded) for r in recs)
    finally:
        await alloc.stop()


async def test_a_declined_host_goes_to_the_other_framework(store):
    await register_hosts(store, [host_event("dec-h1", vcpus=4, ram_mb=8192)])
    a = await framework(store, "t1", "a")
    alloc = AllocatorService(store, AllocatorConfig(interval_s=0.1))
    await alloc.start()
    try:

        async def offered_to(fid: str):
            evs = (await host_events(store))["dec-h1"]
            last = [e for e in evs if isinstance(e, HostOffered)]
            return last[-1] if last and last[-1].framework == fid else None

        first = await until(lambda: offered_to(a), 10, "an offer to a")
        b = await framework(store, "t2", "b")
        # a declines for 30 s: the host goes to b, not back to a
        await store.append(
            [
                CAUSE.make(OfferDeclined, "t1", "offer", first.offer, refuse_seconds=30),
                CAUSE.make(
                    HostOfferEnded,
                    SYSTEM,
                    "host",
                    "dec-h1",
                    offer=first.offer,
                    framework=a,
                    refuse_seconds=30,
                ),
            ]
        )
        await until(lambda: offered_to(b), 10, "the host offered to b")
        # and while b's offer stands, no other offer of that host is made
        await asyncio.sleep(0.3)
        evs = (await host_events(store))["dec-h1"]
        assert [e.framework for e in evs if isinstance(e, HostOffered)] == [a, b]
        assert not any(isinstance(e, HostClaimed) for e in evs)
    finally:
        await alloc.stop()
