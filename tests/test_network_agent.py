"""The network agent on real namespaces: three simulated hosts joined by an
underlay bridge, two tenants on the same 10.0.0.0/24, container instances
spread over the hosts, and packets to prove what is reachable.
"""

from __future__ import annotations

import asyncio

import pytest

from stratus.agents.network.kernel import Host
from stratus.events import network as nw
from stratus.events.resources import PortBound
from stratus.tests.netlab import Lab, ping

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
async def lab(store):
    lab = Lab(store, hosts=3)
    try:
        await lab.start()
        yield lab
    finally:
        await lab.close()


async def two_tenants(lab: Lab) -> dict[str, tuple[str, str]]:
    """Tenants acme and umbra, both on 10.0.0.0/24; acme's a1 (host-1) and
    a2 (host-2), umbra's b1 (host-3), b2 (host-2) and b3 (host-1, an address
    acme does not have). Returns server name -> (namespace, ip)."""
    c = lab.cloud
    out = {}
    for tenant, servers in (
        ("acme", [("a1", "host-1"), ("a2", "host-2")]),
        ("umbra", [("b1", "host-3"), ("b2", "host-2"), ("b3", "host-1")]),
    ):
        await c.tenant(tenant)
        await c.network(tenant, "net", "10.0.0.0/24")
        for name, host in servers:
            sid = await c.server(tenant, name, host, ["net"])
            out[name] = (await lab.instance(sid), c.port_of(tenant, sid)["ip"])
    return out


async def test_two_tenants_on_one_cidr_reach_their_own_instances_only(lab, store):
    s = await two_tenants(lab)
    await lab.start_agents()
    await lab.converge()
    # the same addresses in both tenants
    assert s["a1"][1] == s["b1"][1] == "10.0.0.2"
    assert s["a2"][1] == s["b2"][1] == "10.0.0.3"
    assert s["b3"][1] == "10.0.0.4"
    # same tenant, different hosts: over VXLAN across the underlay
    assert ping(s["a1"][0], s["a2"][1])
    assert ping(s["a2"][0], s["a1"][1])
    assert ping(s["b1"][0], s["b2"][1])
    assert ping(s["b2"][0], s["b3"][1])
    # 10.0.0.4 exists only in umbra, and b3 shares host-1 with a1
    assert not ping(s["a1"][0], s["b3"][1], tries=2)
    # each network has its own VNI, and host-2 carries both
    vnis = {n["vni"] for w in lab.cloud.worlds.values() for n in w.of("network").values()}
    assert len(vnis) == 2 and min(vnis) >= nw.VNI_FIRST
    links = await asyncio.to_thread(Host(lab.prefix, "", lab.sim.netns("host-2")).links)
    assert sorted(v["vni"] for v in links.values() if v["kind"] == "vxlan") == sorted(vnis)
    # every wired port was reported bound to its host
    bound = {}
    async for batch in store.read(after=0):
        for rec in batch:
            ev = rec.decode()
            if isinstance(ev, PortBound):
                bound[ev.aggregate.id] = ev.host
    assert len(bound) == 5
    assert set(bound.values()) == {"host-1", "host-2", "host-3"}
