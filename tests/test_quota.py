"""Quotas under racing handlers, and the inventory end to end through the CLI.

The concurrency tests run three command-service processes (``stratus serve
handlers``) on one real nats-server and fire many creates at once: only the
tenant-wide conditional append stands between them and an exceeded quota.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from stratus.cli.client import Client
from stratus.events.errors import Conflict, QuotaExceeded
from stratus.events.ids import new_id
from stratus.events.store import EventStore
from stratus.handlers import quota
from stratus.handlers.world import World, fold

from .test_cli import cli, login, wait_projected
from .test_cli import up as up
from .test_idempotency import serve_handlers

pytestmark = pytest.mark.timeout(120)

STRATUS = [sys.executable, "-m", "stratus.cli.main"]


@pytest.fixture
def three_handlers(nats_server, tmp_path):
    """Three `stratus serve handlers` processes sharing the queue group."""
    with serve_handlers(nats_server.url, 3, str(tmp_path / "nodata")):
        yield nats_server.url


async def _race(url: str, verb: str, bodies: list[dict]) -> tuple[list[dict], list[str]]:
    """Send every body at once, each from its own connection."""
    clients = [await Client.connect(url) for _ in bodies]
    try:

        async def one(c: Client, body: dict) -> dict | str:
            # What a careful client does with `conflict` (the state kept
            # moving): send the same command again; its id makes it one.
            command_id = new_id()
            for _ in range(3):
                try:
                    return (await c.command(verb, body, command_id)).data
                except QuotaExceeded as exc:
                    return f"quota_exceeded: {exc.message}"
                except Conflict:
                    continue
            return (await c.command(verb, body, command_id)).data

        results = await asyncio.gather(*(one(c, b) for c, b in zip(clients, bodies, strict=True)))
    finally:
        for c in clients:
            await c.close()
    ok = [r for r in results if isinstance(r, dict)]
    refused = [r for r in results if isinstance(r, str)]
    return ok, refused


async def _setup(url: str, tenant: str, limits: dict[str, int]) -> Client:
    c = await Client.connect(url)
    await c.command("tenant.create", {"name": tenant})
    await c.command("quota.set", {"tenant": tenant, "limits": limits})
    await c.command("image.create", {"tenant": tenant, "name": "img"})
    return c


async def _usage(c: Client, url: str, tenant: str) -> dict[str, int]:
    """Usage as the log itself says: every event of the tenant, folded afresh."""
    store = await EventStore.connect(url)
    try:
        world = World()
        for rec in await store.read_all(subjects=[f"ev.{tenant}.>"]):
            fold(world, rec.decode())
        return quota.usage(world)
    finally:
        await store.close()


async def test_fifty_racing_creates_on_three_handler_processes_never_exceed_the_quota(
    three_handlers,
):
    url = three_handlers
    c = await _setup(url, "acme", {"instances": 7})
    try:
        bodies = [
            {"tenant": "acme", "name": f"s{i}", "image": "img", "vcpus": 1, "ram_mb": 64}
            for i in range(50)
        ]
        ok, refused = await _race(url, "server.create", bodies)
        assert len(ok) == 7, (len(ok), refused[:3])
        assert len(refused) == 43
        assert all("instances 7 of 7 in use" in r for r in refused), refused[:3]
        assert (await _usage(c, url, "acme"))["instances"] == 7
        assert len({s["id"] for s in ok}) == 7
    finally:
        await c.close()


async def test_racing_vcpus_of_mixed_sizes_stop_exactly_at_the_limit(three_handlers):
    url = three_handlers
    c = await _setup(url, "mixed", {"vcpus": 10, "instances": -1, "ram_mb": -1})
    try:
        sizes = [1, 2, 3, 4] * 10
        bodies = [
            {"tenant": "mixed", "name": f"s{i}", "image": "img", "vcpus": v, "ram_mb": 64}
            for i, v in enumerate(sizes)
        ]
        ok, refused = await _race(url, "server.create", bodies)
        used = sum(s["vcpus"] for s in ok)
        assert len(ok) + len(refused) == 40
        assert all("vcpus" in r for r in refused), refused[:3]
        # Ten 1-vCPU requests: if one was refused the 10 were in use then;
        # if none was, they alone fill the 10. Either way exactly 10, never more.
        assert used == 10, [s["vcpus"] for s in ok]
        assert (await _usage(c, url, "mixed"))["vcpus"] == 10
    finally:
        await c.close()


async def test_racing_floating_ips_respect_both_quota_and_pool(three_handlers):
    url = three_handlers
    c = await _setup(url, "fips", {"floating_ips": 7})
    try:
        await c.command(
            "network.create-external",
            {"name": "public", "cidr": "203.0.113.0/24"},
        )
        # a second tenant draws from the same pool at the same time
        await c.command("tenant.create", {"name": "other"})
        await c.command("quota.set", {"tenant": "other", "limits": {"floating_ips": -1}})
        bodies = [{"tenant": "fips", "network": "public"} for _ in range(30)]
        bodies += [{"tenant": "other", "network": "public"} for _ in range(20)]
        ok, refused = await _race(url, "floating-ip.create", bodies)
        mine = [f for f in ok if f["tenant"] == "fips"]
        theirs = [f for f in ok if f["tenant"] == "other"]
        assert len(mine) == 7 and len(theirs) == 20
        assert len(refused) == 23 and all("floating_ips 7 of 7" in r for r in refused)
        addresses = [f["address"] for f in ok]
        assert len(set(addresses)) == len(addresses), "an address was handed out twice"
        assert (await _usage(c, url, "fips"))["floating_ips"] == 7
    finally:
        await c.close()


async def test_lowering_a_quota_below_usage_blocks_only_new_allocations(three_handlers):
    url = three_handlers
    c = await _setup(url, "shrink", {"volumes": 5})
    try:
        for i in range(4):
            await c.command("volume.create", {"tenant": "shrink", "name": f"v{i}", "size_gb": 1})
        await c.command("quota.set", {"tenant": "shrink", "limits": {"volumes": 2}})
        with pytest.raises(QuotaExceeded, match="volumes 4 of 2 in use"):
            await c.command("volume.create", {"tenant": "shrink", "name": "v9", "size_gb": 1})
        # existing ones stay, and deleting frees room only below the new limit
        await c.command("volume.delete", {"tenant": "shrink", "ref": "v0"})
        await c.command("volume.delete", {"tenant": "shrink", "ref": "v1"})
        with pytest.raises(QuotaExceeded):
            await c.command("volume.create", {"tenant": "shrink", "name": "v9", "size_gb": 1})
        await c.command("volume.delete", {"tenant": "shrink", "ref": "v2"})
        await c.command("volume.create", {"tenant": "shrink", "name": "v9", "size_gb": 1})
        assert (await _usage(c, url, "shrink"))["volumes"] == 2
    finally:
        await c.close()


# -- the "done when", through the CLI against `stratus up` --------------


@pytest.fixture
def up_unscheduled(tmp_path):
    """``stratus up`` without a scheduler: the servers stay ``requested``, so
    what is checked here is the quota alone (scheduling has its own tests)."""
    from .test_cli import running_up

    with running_up(tmp_path, "--scheduler-replicas", "0") as u:
        yield u


def test_twelve_racing_cli_creates_under_a_quota_of_three_and_the_past_is_queryable(
    up_unscheduled,
):
    up = up_unscheduled
    url = up.start()
    login(url)

    def ok(*args: str) -> dict:
        r = cli(url, *args, "-o", "json")
        assert r.returncode == 0, (args, r.stderr)
        return json.loads(r.stdout)

    ok("tenant", "create", "acme")
    ok("quota", "set", "acme", "--instances", "3")
    ok("image", "create", "cirros", "--tenant", "acme")
    net = ok("network", "create", "lan", "--tenant", "acme")
    ok(
        "subnet",
        "create",
        "lan-v4",
        "--network",
        "lan",
        "--cidr",
        "10.0.0.0/24",
        "--tenant",
        "acme",
    )
    assert net["name"] == "lan"
    before = wait_projected(url)["last_seq"]

    def create(i: int) -> subprocess.CompletedProcess[str]:
        return cli(
            url, "server", "create", f"web-{i}", "--image", "cirros", "--vcpus", "1",
            "--ram-mb", "128", "--network", "lan", "--tenant", "acme", "-o", "json",
        )  # fmt: skip

    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(create, range(12)))
    created = [json.loads(r.stdout) for r in results if r.returncode == 0]
    refused = [r.stderr for r in results if r.returncode != 0]
    assert len(created) == 3 and len(refused) == 9, refused
    assert all(r.returncode in (0, 1) for r in results)
    assert all(e.startswith("error: quota_exceeded: instances 3 of 3 in use") for e in refused)
    assert {s["status"] for s in created} == {"requested"}

    mid = wait_projected(url)["last_seq"]
    servers = ok("server", "list", "--tenant", "acme")
    assert sorted(s["name"] for s in servers) == sorted(s["name"] for s in created)
    quota = {q["resource"]: q for q in ok("quota", "show", "acme")["quota"]}
    assert quota["instances"]["in_use"] == 3 and quota["instances"]["limit"] == 3
    assert quota["ports"]["in_use"] == 3
    shown = ok("server", "show", created[0]["name"], "--tenant", "acme")
    assert shown["status"] == "requested" and len(shown["addresses"]) == 1
    assert shown["addresses"][0]["ip"].startswith("10.0.0.")

    # delete one: the past still has three, now has two
    ok("server", "delete", created[0]["name"], "--tenant", "acme")
    wait_projected(url)
    assert len(ok("server", "list", "--tenant", "acme")) == 2
    assert ok("server", "list", "--tenant", "acme", "--at", str(before)) == []
    past = ok("server", "list", "--tenant", "acme", "--at", str(mid))
    assert sorted(s["name"] for s in past) == sorted(s["name"] for s in created)

    # the audit trail answers who did what, through which command
    r = cli(url, "audit", "--tenant", "acme", "--type", "server.*", "-o", "json")
    rows = json.loads(r.stdout)
    assert [x["type"] for x in rows].count("server.requested") == 3
    assert {x["actor"] for x in rows} == {"admin"}
    assert rows[-1]["type"] == "server.deleted"

    # bad input: a refused command changes nothing
    last = wait_projected(url)["last_seq"]
    r = cli(url, "subnet", "create", "bad", "--network", "lan", "--cidr", "10.0.0.0/25",
            "--tenant", "acme")  # fmt: skip
    assert r.returncode == 1 and "overlaps" in r.stderr
    r = cli(url, "subnet", "create", "bad", "--network", "lan", "--cidr", "10.0.0.1/24",
            "--tenant", "acme")  # fmt: skip
    assert r.returncode == 1 and "error: invalid" in r.stderr
    assert wait_projected(url)["last_seq"] == last
    with contextlib.suppress(Exception):
        up.stop()


def test_configured_quota_defaults_apply_to_tenants_no_quota_set_touched(tmp_path):
    from .test_cli import CONFIG_HOME, Up

    CONFIG_HOME["value"] = str(tmp_path / "config")
    u = Up(tmp_path / "data", "--quota-default", "instances=1", "--quota-default", "vcpus=-1")
    try:
        url = u.start()
        login(url)
        assert cli(url, "tenant", "create", "dflt").returncode == 0
        assert cli(url, "image", "create", "img", "--tenant", "dflt").returncode == 0
        wait_projected(url)
        r = cli(url, "quota", "show", "dflt", "-o", "json")
        limits = {q["resource"]: q["limit"] for q in json.loads(r.stdout)["quota"]}
        assert limits["instances"] == 1 and limits["vcpus"] == -1 and limits["ports"] == 50
        base = ["server", "create", "--image", "img", "--vcpus", "64", "--ram-mb", "64"]
        assert cli(url, *base[:2], "a", *base[2:], "--tenant", "dflt").returncode == 0
        r = cli(url, *base[:2], "b", *base[2:], "--tenant", "dflt")
        assert r.returncode == 1 and "instances 1 of 1 in use" in r.stderr
    finally:
        u.stop()
