"""A compute agent killed between a delivery and its acknowledgement.

The agent's durable consumer delivers an event, the agent dies before it
acknowledges it, and the broker would redeliver it only after ``ack_wait``
(300 s), after everything that came later. Each test plays that sequence
deterministically: the event is fetched from the agent's own consumer and
held unacknowledged (what the dead process leaves behind), the log moves on,
a new agent starts on the same host and data directory, and the held
message is released for redelivery when the test says so.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from stratus.agents.compute.agent import consumer_name, host_subject
from stratus.events.model import Cause
from stratus.events.resources import ServerBuilding, ServerDeleting
from stratus.events.scheduling import HostClaimed, ServerBuildTimeout
from stratus.events.store import STREAM, Condition

from .compute_helpers import (
    TENANT,
    cause,
    cleanup,
    host_action,
    make_agent,
    owned,
    place,
    server_events,
    types,
    unique_host,
    wait_for,
)

pytestmark = pytest.mark.timeout(120)


async def held_claims(store, host: str, count: int = 1) -> list:
    """Fetch the host's next events from its agent's durable consumer and
    never acknowledge them: what an agent killed mid-build leaves pending."""
    psub = await store.js.pull_subscribe(
        host_subject(host), durable=consumer_name(host), stream=STREAM
    )
    msgs = await psub.fetch(count, timeout=5)
    assert [type(store.codec.decode(m.data)) for m in msgs] == [HostClaimed] * count
    return msgs


async def settled(store, host: str, timeout: float = 20.0) -> None:
    """Wait until the host's consumer has acknowledged everything on its subject."""
    last = await store.last_seq(host_subject(host))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = await store.js.consumer_info(STREAM, consumer_name(host))
        if info.num_ack_pending == 0 and info.ack_floor.stream_seq >= last:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"host {host}: its consumer never settled ({info})")


async def delete(store, host: str, sid: str) -> None:
    """``server delete`` of a placed server, as the command handler appends it."""
    ask = host_action(host, sid, "delete")
    deleting = Cause(ask.actor, ask.correlation_id, ask.causation_id).make(
        ServerDeleting, TENANT, "server", sid
    )
    await store.append([deleting, ask])


async def stopped_agent(store, host, tmp_path):
    """An agent that ran once (its durable consumer exists) and is down now."""
    agent = make_agent(store, host, tmp_path)
    await agent.start()
    await settled(store, host)  # its registration acknowledged
    await agent.stop()
    agent.close()


async def test_a_claim_redelivered_after_its_server_was_deleted_builds_and_reports_nothing(
    store, tmp_path
):
    host = unique_host()
    await stopped_agent(store, host, tmp_path)
    sid = await place(store, host)
    [held] = await held_claims(store, host)  # delivered; the agent dies before the ack
    await delete(store, host, sid)  # while no agent runs
    agent = make_agent(store, host, tmp_path)
    await agent.start()
    try:
        # The restarted agent confirms the deletion from the log at once.
        await wait_for(store, sid, "server.deleted", timeout=5)
        # The broker redelivers the old claim, after the deletion.
        await held.nak()
        await settled(store, host)
        evs = types(await server_events(store, sid))
        after = evs[evs.index("server.deleting") + 1 :]
        assert after == ["server.deleted"], evs
        assert "server.building" not in evs and "server.running" not in evs
        assert owned(agent) == {}
        assert not (agent.disks / f"{sid}.qcow2").exists()
    finally:
        await cleanup(agent)


async def test_a_restarted_agent_finishes_or_reports_its_claims_at_once(store, tmp_path):
    host = unique_host()
    await stopped_agent(store, host, tmp_path)
    built = await place(store, host)
    never = await place(store, host)
    held = await held_claims(store, host, 2)
    # What the dead agent got done for the first: the build reported, the
    # domain defined and running, and nothing after that.
    scratch = make_agent(store, host, tmp_path)
    try:
        claim = store.codec.decode(held[0].data)
        vm = scratch.drivers["vm"]
        vm.ensure(scratch.instance(claim))
        last = await store.last_seq(f"ev.{TENANT}.server.{built}")
        building = cause().make(ServerBuilding, TENANT, "server", built, host=host)
        await store.append([building], Condition(building.subject, last))
    finally:
        scratch.close()
    agent = make_agent(store, host, tmp_path)
    t0 = time.monotonic()
    await agent.start()
    try:
        # Neither waits for the redelivery of its claim (300 s away).
        a = await wait_for(store, built, "server.running", timeout=5)
        b = await wait_for(store, never, "server.running", timeout=5)
        assert time.monotonic() - t0 < 5
        assert types(a)[-2:] == ["server.building", "server.running"]
        assert types(a).count("server.building") == 1  # found built, not rebuilt
        assert types(b)[-2:] == ["server.building", "server.running"]
        assert owned(agent) == {built: "running", never: "running"}
        # The redelivered claims change and report nothing more.
        for m in held:
            await m.nak()
        await settled(store, host)
        assert types(await server_events(store, built)) == types(a)
        assert types(await server_events(store, never)) == types(b)
    finally:
        await cleanup(agent)


async def test_a_build_timed_out_by_the_scheduler_is_not_built_when_the_host_returns(
    store, tmp_path
):
    host = unique_host()
    await stopped_agent(store, host, tmp_path)
    sid = await place(store, host)
    [held] = await held_claims(store, host)
    # The scheduler's timer fired while the host was down.
    last = await store.last_seq(f"ev.{TENANT}.server.{sid}")
    timeout = cause().make(
        ServerBuildTimeout, TENANT, "server", sid, host=host, reason="host stopped beating"
    )
    await store.append([timeout], Condition(timeout.subject, last))
    agent = make_agent(store, host, tmp_path)
    await agent.start()
    try:
        await held.nak()
        await settled(store, host)
        evs = types(await server_events(store, sid))
        assert evs[-1] == "server.build-timeout", evs
        assert "server.building" not in evs and "server.running" not in evs
        assert owned(agent) == {}
    finally:
        await cleanup(agent)
