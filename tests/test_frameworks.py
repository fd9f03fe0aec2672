"""Two-level scheduling end to end: the control plane in this process (a
real nats-server, the command, query and projection services, the
scheduler and the allocator), simulated hosts registered by their events
and beating, frameworks driven through the Python library as a tenant's
user would."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from stratus.cli.client import Client
from stratus.cli.framework_lib import Framework, TaskSpec
from stratus.cli.runtime import Stack
from stratus.events.errors import Conflict, Invalid, NotFound
from stratus.events.heartbeat import beat
from stratus.events.resources import SYSTEM, ServerSpec
from stratus.events.scheduling import HostClaimed
from stratus.ops.bench.schedkit import (
    CAUSE,
    fold_claims,
    host_event,
    overcommitted,
    register_hosts,
    server_request,
    wait_outcomes,
)

from .test_cli import ADMIN_PASSWORD
from .test_images import until

pytestmark = pytest.mark.timeout(120)
GB = 1024


@pytest.fixture
async def stack(tmp_path) -> AsyncIterator[Stack]:
    s = Stack(tmp_path / "services", port=0, admin_password=ADMIN_PASSWORD)
    await s.start()
    try:
        yield s
    finally:
        await s.stop()


async def register_beating(stack: Stack, hosts: list) -> None:
    """Hosts registered, each beating as its agent does: with its own
    compute-agent credential (only that may write the host's beat)."""
    await register_hosts(stack.store, hosts, alive=False)
    for h in hosts:
        agent = await stack.connect("compute-agent", h.aggregate.id)
        await beat(agent.js, h.aggregate.id, ttl=600)


async def client(stack: Stack) -> Client:
    c = await Client.connect(stack.url)
    token = (await c.command("auth.login", {"user": "admin", "password": ADMIN_PASSWORD})).data[
        "token"
    ]
    await c.close()
    return await Client.connect(stack.url, token)


async def settle(fws: list[Framework], quiet: float = 2.0, limit: float = 60.0) -> None:
    """Answer offers until nothing new is launched for ``quiet`` seconds."""
    deadline = time.monotonic() + limit
    last_change = time.monotonic()
    while time.monotonic() - last_change < quiet:
        assert time.monotonic() < deadline, "frameworks never settled"
        launched = 0
        for fw in fws:
            launched += len(await fw.step())
        if launched:
            last_change = time.monotonic()
        await asyncio.sleep(0.05)


async def test_the_drf_paper_example_allocates_three_and_two(stack):
    # given one host of 9 vCPUs and 18 GB at allocation ratio 1.0
    await register_beating(
        stack,
        [host_event("drf-h1", vcpus=9, ram_mb=18 * GB, cpu_ratio=1.0, ram_ratio=1.0)],
    )
    c = await client(stack)
    try:
        # and framework A with tasks of <1 vCPU, 4 GB>, B with <3 vCPUs, 1 GB>,
        # each wanting as many as it can get
        a, b = Framework(c, "fw-a"), Framework(c, "fw-b")
        reg = await a.register()
        await b.register()
        assert reg["subjects"]["offers"] == "ev.admin.offer.*"
        a.submit(*[TaskSpec(f"a-{i}", vcpus=1, ram_mb=4 * GB) for i in range(8)])
        b.submit(*[TaskSpec(f"b-{i}", vcpus=3, ram_mb=1 * GB) for i in range(8)])

        # when they answer offers until nothing more is launched
        await settle([a, b])

        # then DRF gave A 3 tasks and B 2, dominant shares 2/3 each
        assert (len(a.launched), len(b.launched)) == (3, 2)
        assert {t.host for t in a.launched + b.launched} == {"drf-h1"}
        shares = stack.allocator.shares()
        assert shares[a.id] == pytest.approx(2 / 3)
        assert shares[b.id] == pytest.approx(2 / 3)
        # as `framework list` shows them
        rows = {r["name"]: r for r in await c.query("frameworks")}
        assert rows["fw-a"]["tasks"] == 3 and rows["fw-b"]["tasks"] == 2
        assert rows["fw-a"]["dominant_share"] == pytest.approx(2 / 3, abs=1e-3)
        assert rows["fw-b"]["allocation"] == {"vcpus": 6, "ram_mb": 2 * GB, "disk_gb": 0}
        # and the host's claims never exceeded it
        report, holds = await fold_claims(stack.store)
        assert overcommitted(report) == []
        assert len(holds["drf-h1"]) == 5
    finally:
        await c.close()


async def test_a_finished_task_frees_its_resources_and_brings_a_new_offer(stack):
    await register_beating(stack, [host_event("fin-h1", vcpus=2, ram_mb=2 * GB, cpu_ratio=1.0)])
    c = await client(stack)
    try:
        fw = Framework(c, "batch", tasks_per_offer=2)
        await fw.register()
        fw.submit(*[TaskSpec(f"t-{i}", vcpus=1, ram_mb=GB) for i in range(3)])
        await settle([fw], quiet=1.0)
        assert len(fw.launched) == 2 and len(fw.pending) == 1  # the host is full
        first = fw.launched[0]
        await fw.update(first, "running")
        await fw.update(first, "finished")
        # the freed vCPU is offered again and the third task runs
        await fw.run_until_placed(timeout=20)
        assert [t.name for t in fw.launched] == ["t-0", "t-1", "t-2"]
        servers = {s["name"]: s for s in await c.query("servers")}
        assert "t-0" not in servers  # finished: gone from the view
        assert servers["t-2"]["host"] == "fin-h1" and servers["t-2"]["framework"] == fw.id
    finally:
        await c.close()


async def test_accepting_a_stale_or_rescinded_offer_is_a_conflict_and_appends_nothing(stack):
    c = await client(stack)
    try:
        # registered through the command service, as agents do: the host's
        # record is then cached there under its subject, beside this fold
        await c.command(
            "host.register", {"name": "st-h1", "vcpus": 4, "ram_mb": 8 * GB, "disk_gb": 10}
        )
        await beat((await stack.connect("compute-agent", "st-h1")).js, "st-h1", ttl=120)
        fw = Framework(c, "picky")
        await fw.register()
        offer = await _first_offer(fw)
        # a server claims part of the host after the offer was made
        spec = ServerSpec(name="other", image="i", vcpus=1, ram_mb=GB)
        claim = CAUSE.make(
            HostClaimed, SYSTEM, "host", "st-h1", server="x-1", server_tenant="admin", spec=spec
        )
        await stack.store.append([claim])
        before = await stack.store.last_seq()
        with pytest.raises(Conflict, match="stale"):
            await fw.accept(offer, [TaskSpec("late", vcpus=1, ram_mb=GB)])
        # too big for an offer: invalid, nothing appended
        newer = await _first_offer(fw, other_than={offer["id"]})
        with pytest.raises(Invalid, match=r"offer .* holds"):
            await fw.accept(newer, [TaskSpec("huge", vcpus=64, ram_mb=GB)])
        # a declined offer cannot be accepted afterwards
        await fw.decline(newer, refuse_seconds=30)
        with pytest.raises(Conflict, match="not open"):
            await fw.accept(newer, [TaskSpec("after", vcpus=1, ram_mb=GB)])
        recs = await stack.store.read_all(before)
        kinds = [r.decode().type_name() for r in recs]
        assert "server.requested" not in kinds and "host.claimed" not in kinds
    finally:
        await c.close()


async def test_scheduler_servers_and_framework_tasks_share_one_capacity_truth(stack):
    # a host of 4 vCPUs (ratio 1.0) half taken by a framework's tasks
    await register_beating(stack, [host_event("mix-h1", vcpus=4, ram_mb=8 * GB, cpu_ratio=1.0)])
    c = await client(stack)
    try:
        fw = Framework(c, "half", tasks_per_offer=2)
        await fw.register()
        fw.submit(TaskSpec("m-0", vcpus=1, ram_mb=GB), TaskSpec("m-1", vcpus=1, ram_mb=GB))
        await fw.run_until_placed(timeout=20)
        assert len(fw.launched) == 2
        # the scheduler then places 2 one-vCPU servers and refuses a third
        reqs = [server_request(tenant="admin", vcpus=1, ram_mb=512) for _ in range(3)]
        for r in reqs:
            await stack.store.append([r])
            await wait_outcomes(stack.store, {r.aggregate.id}, timeout=20)
        out = await wait_outcomes(stack.store, {r.aggregate.id for r in reqs}, timeout=20)
        placed = [e for e in out.values() if e.type_name() == "server.scheduled"]
        assert len(placed) == 2
        failed = [e for e in out.values() if e.type_name() == "server.failed"]
        assert len(failed) == 1 and "insufficient vCPU" in failed[0].reason
        report, _ = await fold_claims(stack.store)
        assert overcommitted(report) == []
        assert report["mix-h1"]["peak_vcpus"] == 4
    finally:
        await c.close()


async def _first_offer(fw: Framework, other_than: set[str] = frozenset(), timeout: float = 15):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for o in await fw.offers():
            if o["id"] not in other_than:
                return o
        await asyncio.sleep(0.05)
    raise AssertionError("no offer came")


async def test_cli_register_accept_list_and_another_tenant_refused(stack, tmp_path):
    from .test_images import Cli

    await register_beating(stack, [host_event("cli-h1", vcpus=8, ram_mb=16 * GB)])
    user = Cli(stack.url, tmp_path / "client")
    await user("login", "--user", "admin", "--password", ADMIN_PASSWORD)
    fw = await user.json("framework", "register", "cli-fw", "--weight", "2")
    assert fw["name"] == "cli-fw" and fw["weight"] == 2.0
    assert fw["subjects"]["offers"] == "ev.admin.offer.*"

    deadline = time.monotonic() + 15
    offers: list = []
    while not offers:
        assert time.monotonic() < deadline, "no offer came"
        offers = [o for o in await user.json("offer", "list") if o["framework"] == fw["id"]]
        await asyncio.sleep(0.1)
    offer = offers[0]
    assert offer["host"] == "cli-h1" and offer["vcpus"] == 32  # 8 x ratio 4.0
    got = await user.json(
        "offer", "accept", offer["id"],
        "--task", "c-0", "--vcpus", "2", "--ram-mb", "1024",
        "--task", "c-1", "--vcpus", "2", "--ram-mb", "1024",
    )  # fmt: skip
    assert [t["name"] for t in got["tasks"]] == ["c-0", "c-1"]

    # the same offer again: it was consumed
    rc, _, err = await user(
        "offer", "accept", offer["id"], "--host", "cli-h1",
        "--task", "c-2", "--vcpus", "1", "--ram-mb", "512", ok=False,
    )  # fmt: skip
    assert rc == 1 and "conflict" in err

    rows = await user.json("framework", "list")
    row = next(r for r in rows if r["id"] == fw["id"])
    # 4 of 32 vCPUs, 2 of 16 GB: dominant 1/8, weight 2 -> 1/16
    assert row["tasks"] == 2 and row["allocation"]["vcpus"] == 4
    assert row["dominant_share"] == pytest.approx(0.0625, abs=1e-4)

    # a user of another tenant can neither see nor answer this tenant's offers
    await user("tenant", "create", "other")
    await user("user", "create", "mallory", "--password", "pw-mallory-123")
    await user("role", "assign", "--user", "mallory", "--tenant", "other", "--role", "admin")
    mallory = Cli(stack.url, tmp_path / "mallory")
    await mallory("login", "--user", "mallory", "--password", "pw-mallory-123", "--tenant", "other")
    assert [o for o in await mallory.json("offer", "list") if o["framework"] == fw["id"]] == []
    deadline = time.monotonic() + 15
    fresh: list = []
    while not fresh:
        assert time.monotonic() < deadline, "no new offer came"
        fresh = [o for o in await user.json("offer", "list") if o["framework"] == fw["id"]]
        await asyncio.sleep(0.1)
    before = await stack.store.last_seq()
    rc, _, err = await mallory(
        "offer", "accept", fresh[0]["id"], "--host", "cli-h1", "--tenant", "admin",
        "--task", "steal", "--vcpus", "1", "--ram-mb", "512", ok=False,
    )  # fmt: skip
    assert rc == 1 and "not_found" in err
    recs = await stack.store.read_all(before)
    assert not any(r.decode().type_name() == "host.claimed" for r in recs)


async def test_quota_applies_to_tasks(stack):
    from stratus.events.errors import QuotaExceeded

    await register_beating(stack, [host_event("q-h1", vcpus=8, ram_mb=16 * GB)])
    c = await client(stack)
    try:
        await c.command("quota.set", {"tenant": "admin", "limits": {"instances": 1}})
        fw = Framework(c, "greedy")
        await fw.register()
        offer = await _first_offer(fw)
        before = await stack.store.last_seq()
        two = [TaskSpec("q-0", vcpus=1, ram_mb=GB), TaskSpec("q-1", vcpus=1, ram_mb=GB)]
        with pytest.raises(QuotaExceeded, match="instances"):
            await fw.accept(offer, two)
        recs = await stack.store.read_all(before)
        assert not any(r.decode().type_name() == "host.claimed" for r in recs)
        # one task is within quota, from the same offer
        got = await fw.accept(offer, two[:1])
        assert [t.name for t in got] == ["q-0"]
    finally:
        await c.close()


async def test_failover_within_the_timeout_keeps_tasks_past_it_kills_them(stack):
    await register_beating(stack, [host_event("fo-h1", vcpus=4, ram_mb=8 * GB, cpu_ratio=1.0)])
    c = await client(stack)
    try:
        # a framework with a 2 s failover timeout runs a task
        fw = Framework(c, "flaky", failover_timeout_s=2.0)
        await fw.register()
        fw.submit(TaskSpec("fo-0", vcpus=1, ram_mb=GB))
        await fw.run_until_placed(timeout=15)
        assert len(fw.launched) == 1
        # it goes quiet for 1 s, then comes back with its id: the task is its
        await asyncio.sleep(1.0)
        back = Framework(c, "flaky", failover_timeout_s=2.0)
        again = await back.register(fw.id)
        assert again["id"] == fw.id and again["status"] == "active"
        await asyncio.sleep(1.5)  # past the first deadline, within the renewed one
        servers = {s["name"]: s for s in await c.query("servers")}
        assert servers["fo-0"]["framework"] == fw.id

        # then it goes quiet for good: removed, its task failed, its claim released
        async def removed():
            recs = await stack.store.read_all(subjects=[f"ev.admin.framework.{fw.id}"])
            return [r.decode() for r in recs if r.decode().type_name() == "framework.removed"]

        gone = await until(removed, 15, "the framework removed")
        assert "failover timeout" in gone[0].reason
        task = fw.launched[0]
        recs = await stack.store.read_all(subjects=[f"ev.admin.server.{task.id}"])
        assert recs[-1].decode().type_name() == "task.failed"
        _, holds = await fold_claims(stack.store)
        assert holds.get("fo-h1", []) == []
        # and it cannot come back any more
        with pytest.raises(NotFound, match="failover"):
            await Framework(c, "flaky").register(fw.id)
    finally:
        await c.close()
