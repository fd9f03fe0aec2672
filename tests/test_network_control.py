"""The network control plane through the real command service on a real
NATS: VXLAN segments never shared by two live networks, bad input refused
as ``invalid`` with nothing appended, and kernel names that only ids make.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from stratus.events import network as nw
from stratus.events.errors import Invalid, StratusError
from stratus.handlers.catalog import all_handlers
from stratus.handlers.keyring import KeyRing
from stratus.handlers.rbac import CLOUD_ADMIN_ROLE, CLOUD_TENANT, Caller
from stratus.handlers.service import CommandService


@pytest.fixture
async def svc(store, tmp_path):
    s = CommandService(store, all_handlers(KeyRing.load_or_create(tmp_path / "keys")))
    await s.start()
    yield s
    await s.stop()


async def call(svc: CommandService, verb: str, **body) -> dict:
    """The reply a client would get (a refusal as the wire carries it)."""
    try:
        raw = await asyncio.wait_for(svc.handle(f"cmd.{verb}", json.dumps(body).encode(), {}), 10)
    except StratusError as err:
        return {"ok": False, "error": {"kind": err.kind, "message": err.message}}
    return json.loads(raw)


async def ok(svc: CommandService, verb: str, **body) -> dict:
    reply = await call(svc, verb, **body)
    assert reply["ok"], (verb, body, reply)
    return reply["data"]


async def test_racing_network_creates_in_two_tenants_never_share_a_vni(
    svc, store, connect_store, tmp_path
):
    # a second handler on its own connection: only the pool's condition keeps them apart
    other = CommandService(
        await connect_store(), all_handlers(KeyRing.load_or_create(tmp_path / "keys"))
    )
    await other.start()
    for t in ("acme", "umbra"):
        await ok(svc, "tenant.create", name=t)
        await ok(svc, "quota.set", tenant=t, limits={"networks": 20})
    try:
        made = await asyncio.gather(
            *(
                ok(svc if i % 2 else other, "network.create", tenant=t, name=f"n{i}")
                for t in ("acme", "umbra")
                for i in range(8)
            )
        )
    finally:
        await other.stop()
    vnis = [n["vni"] for n in made]
    assert len(set(vnis)) == 16 and min(vnis) >= nw.VNI_FIRST
    # a deleted network gives its segment back; the next network may take it
    gone = made[0]
    await ok(svc, "network.delete", tenant="acme", ref=gone["id"])
    again = await ok(svc, "network.create", tenant="acme", name="again")
    assert again["vni"] == gone["vni"]
    # the pool's own subject records every allocation and release
    pool = [rec.decode() for rec in await store.read_all(subjects=[nw.SEGMENT_POOL_SUBJECT])]
    kinds = [type(e).__name__ for e in pool]
    assert kinds.count("SegmentAllocated") == 17 and kinds.count("SegmentReleased") == 1


@pytest.mark.parametrize(
    ("verb", "body", "words"),
    [
        ("subnet.create", {"name": "b", "network": "lan", "cidr": "10.0.0.128/25"}, "overlaps"),
        ("subnet.create", {"name": "b", "network": "lan", "cidr": "10.0.0.0/8"}, "too large"),
        (
            "subnet.create",
            {"name": "b", "network": "lan2", "cidr": "10.1.0.0/24", "gateway": "10.2.0.1"},
            "gateway 10.2.0.1 is not a host address",
        ),
        ("port.create", {"name": "p", "network": "lan", "ip": "10.9.0.5"}, "not a usable address"),
        (
            "security-group.rule-add",
            {"security_group": "default", "port_min": 70000},
            "port_min",
        ),
    ],
)
async def test_bad_network_input_is_invalid_and_appends_nothing(svc, store, verb, body, words):
    await ok(svc, "tenant.create", name="acme")
    await ok(svc, "network.create", tenant="acme", name="lan")
    await ok(svc, "network.create", tenant="acme", name="lan2")
    await ok(svc, "subnet.create", tenant="acme", name="lan-sub", network="lan", cidr="10.0.0.0/24")
    await ok(svc, "port.create", tenant="acme", name="first", network="lan")
    before = await store.last_seq()
    reply = await call(svc, verb, tenant="acme", **body)
    assert not reply["ok"]
    assert reply["error"]["kind"] == "invalid", reply
    assert words in reply["error"]["message"], reply
    assert await store.last_seq() == before


def test_kernel_names_come_from_ids_and_fit_the_kernel():
    a = nw.kernel_name("st", "bridge", "0192f0c4-aaaa-7bbb-8ccc-123456789abc")
    assert a == nw.kernel_name("st", "bridge", "0192f0c4-aaaa-7bbb-8ccc-123456789abc")
    assert a.startswith("stb-") and len(a.encode()) <= 15
    # tenant text never becomes a name: the id is hashed, whatever it holds
    odd = nw.kernel_name("st", "port", "x; rm -rf / $(reboot)\n")
    assert odd.startswith("stp-") and nw.check_kernel_name(odd) == odd
    assert nw.kernel_name("st", "port", "a") != nw.kernel_name("st", "peer", "a")
    assert nw.owned("st", a, "bridge") and not nw.owned("st", a, "port")
    assert not nw.owned("st", "eth0") and not nw.owned("t1", a)
    for bad in ("", "Eth0", "a" * 16, "a b", "a/b", "-x", "é"):
        with pytest.raises(Invalid):
            nw.check_kernel_name(bad)
    for prefix in ("", "ST", "1st", "toolong7", "s-t"):
        with pytest.raises(Invalid):
            nw.kernel_name(prefix, "bridge", "x")
    with pytest.raises(Invalid):
        nw.kernel_name("st", "nonsense", "x")


async def test_a_router_gateway_takes_a_pool_address_and_gives_it_back(svc, store):
    await ok(svc, "network.create-external", name="public", cidr="203.0.113.0/29")
    await ok(svc, "tenant.create", name="acme")
    edge = await ok(svc, "router.create", tenant="acme", name="edge", external_network="public")
    assert edge["external_ip"] == "203.0.113.2"  # .1 is the gateway
    fip = await ok(svc, "floating-ip.create", tenant="acme", network="public")
    assert fip["address"] == "203.0.113.3"  # never the router's
    await ok(svc, "router.delete", tenant="acme", ref="edge")
    again = await ok(svc, "floating-ip.create", tenant="acme", network="public")
    assert again["address"] == "203.0.113.2"
    # a router without an external network takes nothing
    inner = await ok(svc, "router.create", tenant="acme", name="inner")
    assert inner["external_ip"] == ""


async def test_port_set_changes_groups_and_qos_and_refuses_unknown_ones(svc, store):
    await ok(svc, "tenant.create", name="acme")
    await ok(svc, "network.create", tenant="acme", name="lan")
    await ok(svc, "subnet.create", tenant="acme", name="s", network="lan", cidr="10.0.0.0/24")
    port = await ok(svc, "port.create", tenant="acme", name="p", network="lan")
    await ok(svc, "security-group.create", tenant="acme", name="web")
    await ok(svc, "qos-policy.create", tenant="acme", name="slow", max_kbps=8000)
    got = await ok(
        svc, "port.set", tenant="acme", ref="p", security_groups=["web"], qos_policy="slow"
    )
    assert got["qos_policy"] != "" and got["security_groups"] != port["security_groups"]
    before = await store.last_seq()
    # the same again changes nothing; unknown references are not found
    same = await call(svc, "port.set", tenant="acme", ref="p", security_groups=["web"])
    assert same["ok"] and not same.get("seqs")
    reply = await call(svc, "port.set", tenant="acme", ref="p", qos_policy="nope")
    assert reply["error"]["kind"] == "not_found"
    assert await store.last_seq() == before
    # in use, the policy cannot go; cleared from the port, it can
    reply = await call(svc, "qos-policy.delete", tenant="acme", ref="slow")
    assert reply["error"]["kind"] == "conflict"
    await ok(svc, "port.set", tenant="acme", ref="p", qos_policy="")
    await ok(svc, "qos-policy.delete", tenant="acme", ref="slow")


# -- routed networks -------------------------------------------------------------------

ADMIN = Caller(user="admin", tenant=CLOUD_TENANT, roles=(CLOUD_ADMIN_ROLE,))
MEMBER = Caller(user="alice", tenant="acme", roles=("member",))


@pytest.fixture
async def authed(store, tmp_path):
    """The command service with callers named by a ``who`` header (as tokens would)."""
    callers = {"admin": ADMIN, "alice": MEMBER}
    s = CommandService(
        store,
        all_handlers(KeyRing.load_or_create(tmp_path / "keys")),
        authenticate=lambda h: callers[h["who"]],
    )
    await s.start()
    yield s
    await s.stop()


async def as_(svc: CommandService, who: str, verb: str, **body) -> dict:
    try:
        raw = await asyncio.wait_for(
            svc.handle(f"cmd.{verb}", json.dumps(body).encode(), {"who": who}), 10
        )
    except StratusError as err:
        return {"ok": False, "error": {"kind": err.kind, "message": err.message}}
    return json.loads(raw)


async def test_a_routed_network_is_the_cloud_admins_and_bad_input_appends_nothing(authed, store):
    assert (await as_(authed, "admin", "tenant.create", name="acme"))["ok"]
    before = await store.last_seq()
    # a tenant's member cannot make one (the broker-facing command service says so)
    refused = await as_(authed, "alice", "network.create-routed", name="p", cidr="10.244.0.0/16")
    assert refused["error"]["kind"] == "forbidden"
    assert await store.last_seq() == before
    made = await as_(authed, "admin", "network.create-routed", name="pods", cidr="10.244.0.0/16")
    assert made["ok"], made
    assert made["data"]["mode"] == nw.ROUTED and made["data"]["block_prefix"] == nw.BLOCK_PREFIX
    before = await store.last_seq()
    for body, kind, words in [
        ({"name": "q", "cidr": "10.244.0.1/16"}, "invalid", "host bits"),
        ({"name": "q", "cidr": "0.0.0.0/4"}, "invalid", "too large"),
        ({"name": "q", "cidr": "10.245.0.0/24", "block_prefix": 20}, "invalid", "wider"),
        ({"name": "q", "cidr": "10.244.128.0/17"}, "invalid", "overlaps network pods"),
        ({"name": "q", "cidr": "fd00::/64"}, "invalid", "IPv4"),
        ({"name": "q", "cidr": "10.246.0.0/16", "block_prefix": 31}, "invalid", ""),
        ({"name": "pods", "cidr": "10.247.0.0/16"}, "already_exists", "never reused"),
        ({"name": "Bad Name", "cidr": "10.247.0.0/16"}, "invalid", "name"),
    ]:
        reply = await as_(authed, "admin", "network.create-routed", **body)
        assert not reply["ok"] and reply["error"]["kind"] == kind, (body, reply)
        assert words in reply["error"]["message"], (body, reply)
    assert await store.last_seq() == before
    # a tenant's container attaches to it by name; its port has no address
    # until a host hands one out of its block
    await as_(authed, "admin", "image.create-public", name="img")
    box = await as_(
        authed,
        "alice",
        "server.create",
        name="box",
        image="img",
        vcpus=1,
        ram_mb=64,
        instance_type="container",
        networks=["pods"],
    )
    assert box["ok"], box
    ports = [
        rec.decode()
        for rec in await store.read_all(subjects=["ev.acme.port.>"])
        if rec.decode().type_name() == "port.created"
    ]
    assert [(p.network, p.ip, p.subnet) for p in ports] == [("pods", "", "")]
    # a VM cannot (no DHCP, no overlay there); an unknown network is not found
    before = await store.last_seq()
    vm = await as_(
        authed, "alice", "server.create", name="vm", image="img", vcpus=1, ram_mb=64,
        networks=["pods"],
    )  # fmt: skip
    assert vm["error"]["kind"] == "invalid" and "container instances only" in vm["error"]["message"]
    nowhere = await as_(
        authed, "alice", "server.create", name="c2", image="img", vcpus=1, ram_mb=64,
        instance_type="container", networks=["nope"],
    )  # fmt: skip
    assert nowhere["error"]["kind"] == "not_found"
    assert await store.last_seq() == before
