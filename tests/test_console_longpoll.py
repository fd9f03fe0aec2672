"""``q.events`` as a long poll (``wait_ms``), what the console's live pages
are fed by: an answer as soon as the asked tenant's next event is stored,
an empty one when the wait runs out, never an event of another tenant, and
no wait that outlives the service."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from stratus.events.errors import Invalid
from stratus.events.ids import new_id
from stratus.events.model import Cause
from stratus.events.tenants import TenantCreated
from stratus.projections.projector import init_schema
from stratus.projections.query import MAX_WAIT_MS, QueryService

pytestmark = pytest.mark.timeout(60)


async def _append(store, tenant: str) -> int:
    cid = new_id()
    event = Cause("alice", cid, cid).make(TenantCreated, tenant, "tenant", new_id(), name=tenant)
    return (await store.append([event])).seqs[0]


def _poll(svc: QueryService, **body):
    return svc.handle("events", json.dumps(body).encode(), {})


@pytest.fixture
async def service(store, sqlite_engine):
    engine = sqlite_engine()
    await init_schema(engine)
    svc = QueryService(store, engine)
    yield svc
    await svc.stop()


async def test_a_long_poll_answers_with_the_next_event_of_its_tenant(service, store):
    first = await _append(store, "acme")
    asked = asyncio.create_task(_poll(service, tenant="acme", after=first, wait_ms=10_000))
    await asyncio.sleep(0.3)
    assert not asked.done()  # nothing new yet: it waits
    await _append(store, "globex")  # another tenant's event does not answer it
    await asyncio.sleep(0.3)
    assert not asked.done()
    t0 = time.monotonic()
    mine = await _append(store, "acme")
    got = await asyncio.wait_for(asked, 5)
    assert time.monotonic() - t0 < 2
    assert [e["seq"] for e in got] == [mine] and got[0]["tenant"] == "acme"


async def test_a_long_poll_with_events_waiting_answers_at_once(service, store):
    seqs = [await _append(store, "acme") for _ in range(3)]
    t0 = time.monotonic()
    got = await _poll(service, tenant="acme", after=seqs[0], wait_ms=10_000)
    assert time.monotonic() - t0 < 2
    assert [e["seq"] for e in got] == seqs[1:]


async def test_a_long_poll_ends_empty_when_its_wait_runs_out(service, store):
    last = await _append(store, "acme")
    t0 = time.monotonic()
    assert await _poll(service, tenant="acme", after=last, wait_ms=700) == []
    assert 0.6 < time.monotonic() - t0 < 3


async def test_stopping_the_service_ends_its_long_polls(service, store):
    last = await _append(store, "acme")
    asked = asyncio.create_task(_poll(service, tenant="acme", after=last, wait_ms=MAX_WAIT_MS))
    await asyncio.sleep(0.3)
    t0 = time.monotonic()
    await service.stop()
    assert await asyncio.wait_for(asked, 5) == []
    assert time.monotonic() - t0 < 3


async def test_waits_are_bounded(service):
    with pytest.raises(Invalid):
        await _poll(service, tenant="acme", wait_ms=MAX_WAIT_MS + 1)


async def test_a_live_pages_status_is_the_positions_alone(service, store):
    """What a live page polls while the projector catches up: no hosts, no
    services (each would cost a JetStream request)."""
    await _append(store, "acme")
    full = await service.handle("status", b'{"digest": false}', {})
    lean = await service.handle("status", b'{"digest": false, "parts": false}', {})
    assert "hosts" in full and "services" in full
    assert set(lean) == {"last_seq", "projector_seq", "projector_lag", "quarantined"}
    assert lean["last_seq"] == full["last_seq"] >= 1
