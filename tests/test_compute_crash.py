"""A compute agent killed between a delivery and its acknowledgement.

The agent's durable consumer delivers an event, the agent dies before it
acknowledges it, and the broker would redeliver it only after ``ack_wait``
(15 s), after everything that came later. Each test plays that sequence
deterministically: the event is fetched from the agent's own consumer and
held unacknowledged (what the dead process leaves behind), the log moves on,
a new agent starts on the same host and data directory, and the held
message is released for redelivery when the test says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest

from stratus.agents.compute.agent import consumer_name, host_subject
from stratus.events.errors import Unavailable
from stratus.events.ids import new_id
from stratus.events.model import Cause
from stratus.events.reports import Reporter
from stratus.events.resources import ServerBuilding, ServerDeleting, ServerScheduled
from stratus.events.scheduling import HostClaimed, ServerBuildTimeout
from stratus.events.store import STREAM, Condition, EventStore
from stratus.handlers.reports import ReportRelay

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


class Proxy:
    """A TCP relay on loopback between one client and the broker that can
    drop what the broker sends (a delivery lost on its way, as when the
    node holding the consumer dies) and then cut the connection."""

    def __init__(self, target: str) -> None:
        host, _, port = target.rpartition("//")[2].rpartition(":")
        self.target = (host, int(port))
        self.dropping = False
        self.conns: list[asyncio.StreamWriter] = []

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"nats://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _serve(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        sr, sw = await asyncio.open_connection(*self.target)
        self.conns += [cw, sw]

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter, down: bool) -> None:
            with contextlib.suppress(OSError, ConnectionError):
                while data := await r.read(65536):
                    if not (down and self.dropping):
                        w.write(data)
                        await w.drain()
            w.close()

        await asyncio.gather(pipe(cr, sw, False), pipe(sr, cw, True))

    def cut(self) -> None:
        """Close every connection (the client reconnects) and stop dropping."""
        for w in self.conns:
            w.close()
        self.conns = []
        self.dropping = False

    async def close(self) -> None:
        self.cut()
        self.server.close()
        await self.server.wait_closed()


async def test_a_delivery_lost_on_its_way_to_a_running_agent_is_built_after_ack_wait(
    store, tmp_path
):
    """The running agent's pull request is answered while the way back is
    gone (the bytes dropped, then the connection cut, as when a node dies):
    nothing but a redelivery brings that claim to the agent, after its
    consumer's ack_wait, and then it is built, once."""
    proxy = Proxy(store.nc.connected_url.geturl())
    through = await EventStore.connect(await proxy.start())
    host = unique_host()
    agent = make_agent(through, host, tmp_path)
    agent.ack_wait = 2.0  # (15 s in service; short here to keep the test short)
    await agent.start()
    try:
        await settled(store, host)
        proxy.dropping = True
        sid = await place(store, host)
        deadline = time.monotonic() + 10
        while (await store.js.consumer_info(STREAM, consumer_name(host))).num_ack_pending < 1:
            assert time.monotonic() < deadline, "the claim was never delivered"
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.2)  # the claim's bytes into the void
        proxy.cut()
        lost = time.monotonic()
        evs = await wait_for(store, sid, "server.running", timeout=10)
        assert time.monotonic() - lost < agent.ack_wait + 5
        assert types(evs)[-2:] == ["server.building", "server.running"]
        assert types(evs).count("server.building") == 1
        assert owned(agent) == {sid: "running"}
    finally:
        await cleanup(agent)
        await through.close()
        await proxy.close()


class DiesAfterAppending(ReportRelay):
    """A relay replica whose process dies between appending a report and
    answering it: its connection is gone before the reply can leave."""

    async def answer(self, msg):
        out = await super().answer(msg)
        await self.store.nc.close()
        return out


async def a_placed_server(connect_store):
    """A server placed on a new host, and its agent's ``server.building``
    report (to send through the relay on the condition of the placement)."""
    admin = await connect_store()
    await admin.ensure_stream()
    host, sid = unique_host(), new_id()
    placed = cause().make(ServerScheduled, TENANT, "server", sid, host=host)
    [seq] = (await admin.append([placed])).seqs
    building = Cause(f"compute-agent:{host}", new_id(), placed.id).make(
        ServerBuilding, TENANT, "server", sid, host=host
    )
    return admin, host, seq, building


def send(report, building, seq):
    return asyncio.create_task(
        report.append([building], Condition(building.subject, seq), msg_id=f"{building.id}.b")
    )


async def test_a_report_whose_relay_replica_dies_mid_request_goes_again_and_lands_once(
    connect_store,
):
    admin, host, seq, building = await a_placed_server(connect_store)
    sid = building.aggregate.id
    dying = DiesAfterAppending(await connect_store())
    await dying.start()
    report = Reporter((await connect_store()).nc, host)
    t0 = time.monotonic()
    sent = send(report, building, seq)
    # The report landed; its replica is dead; the other replica starts.
    while not dying.store.nc.is_closed:
        assert time.monotonic() - t0 < 5 and not sent.done()
        await asyncio.sleep(0.01)
    other = ReportRelay(await connect_store())
    await other.start()
    try:
        result = await asyncio.wait_for(sent, 10)
        # Sent again at once (not after a 10 s timeout), recognised as the same report.
        assert time.monotonic() - t0 < 5
        assert report.retried >= 1
        assert result.seqs == [seq + 1] and result.duplicate
        assert types(await server_events(admin, sid)) == ["server.scheduled", "server.building"]
    finally:
        await other.stop()


async def test_a_report_sent_while_no_relay_runs_lands_when_one_starts(connect_store):
    admin, host, seq, building = await a_placed_server(connect_store)
    sid = building.aggregate.id
    report = Reporter((await connect_store()).nc, host)
    sent = send(report, building, seq)
    await asyncio.sleep(1.0)  # no responders, tried again meanwhile
    assert not sent.done() and report.retried >= 1
    relay = ReportRelay(await connect_store())
    await relay.start()
    try:
        result = await asyncio.wait_for(sent, 10)
        assert result.seqs == [seq + 1] and not result.duplicate
        assert types(await server_events(admin, sid)) == ["server.scheduled", "server.building"]
    finally:
        await relay.stop()


async def test_an_unidentified_report_is_not_sent_again(connect_store):
    """Without a message id a second try could append twice: one try only."""
    admin = await connect_store()
    await admin.ensure_stream()
    report = Reporter((await connect_store()).nc, unique_host())
    ev = cause().make(ServerBuilding, TENANT, "server", new_id(), host="h")
    with pytest.raises(Unavailable):
        await asyncio.wait_for(report.append([ev]), 5)
    assert report.retried == 0
