"""The network agent on real namespaces: three simulated hosts joined by an
underlay bridge, two tenants on the same 10.0.0.0/24, container instances
spread over the hosts, and packets to prove what is reachable.
"""

from __future__ import annotations

import asyncio

import pytest

from stratus.agents.network.agent import NetworkAgent
from stratus.agents.network.desired import BridgePlan, HostPlan
from stratus.agents.network.kernel import Host
from stratus.agents.network.sim import leftovers
from stratus.events import network as nw
from stratus.events.resources import (
    FloatingIpAssociate,
    FloatingIpCreate,
    PortBound,
    PortSet,
    QosPolicyCreate,
    RefCommand,
    RouterCreate,
    RouterInterface,
    SecurityGroupCreate,
    SecurityGroupRuleAdd,
    SecurityGroupRuleRemove,
)
from stratus.handlers import networks, routers, security_groups
from stratus.ops.bench.netlab import Lab, ping, probe, running_lab, serve

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
async def lab(store):
    async with running_lab(store, hosts=3) as lab:
        yield lab


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
            out[name] = (await lab.instance(sid), c.port_of(tenant, sid).ip)
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
    vnis = {n.vni for w in lab.cloud.worlds.values() for n in w.networks.values()}
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


async def acme_pair(lab: Lab, **server_kw) -> dict[str, tuple[str, str]]:
    """acme's c1 (host-1) and srv (host-2) on 10.0.0.0/24, agents running."""
    c = lab.cloud
    await c.tenant("acme")
    await c.network("acme", "net", "10.0.0.0/24")
    out = {}
    for name, host in (("c1", "host-1"), ("srv", "host-2")):
        sid = await c.server("acme", name, host, ["net"])
        out[name] = (await lab.instance(sid), c.port_of("acme", sid).ip)
        out[name + "-port"] = c.port_of("acme", sid).id
    await lab.start_agents()
    await lab.converge()
    return out


async def test_a_security_group_rule_opens_a_tcp_port_and_removing_it_closes_it(lab):
    c = lab.cloud
    s = await acme_pair(lab)
    await c.do(
        "acme", security_groups.decide_sg_create, SecurityGroupCreate(tenant="acme", name="web")
    )
    listener = serve(s["srv"][0], "listen", "8080", "60")
    try:
        # srv in the default group: c1, a member, may connect
        assert probe(s["c1"][0], "connect", s["srv"][1], "8080").returncode == 0
        # srv in "web" alone, which has no rule yet: nothing gets in
        await c.do(
            "acme",
            networks.decide_port_set,
            PortSet(tenant="acme", ref=s["srv-port"], security_groups=["web"]),
        )
        await lab.converge()
        assert probe(s["c1"][0], "connect", s["srv"][1], "8080").returncode == 1
        assert not ping(s["c1"][0], s["srv"][1], tries=1)
        add = SecurityGroupRuleAdd(tenant="acme", security_group="web", port_min=8080)
        (ev,) = await c.do("acme", security_groups.decide_sg_rule_add, add)
        await lab.converge()
        assert probe(s["c1"][0], "connect", s["srv"][1], "8080").returncode == 0
        # the rule names one port: others stay closed, ICMP too
        assert probe(s["c1"][0], "connect", s["srv"][1], "8081").returncode == 1
        rm = SecurityGroupRuleRemove(tenant="acme", security_group="web", rule=ev.rule)
        await c.do("acme", security_groups.decide_sg_rule_remove, rm)
        await lab.converge()
        assert probe(s["c1"][0], "connect", s["srv"][1], "8080").returncode == 1
    finally:
        listener.kill()
        listener.wait(5)


async def test_a_qos_limit_of_8_mbit_holds_within_20_percent(lab):
    c = lab.cloud
    s = await acme_pair(lab)
    await c.do(
        "acme",
        networks.decide_qos_create,
        QosPolicyCreate(tenant="acme", name="slow", max_kbps=8000),
    )
    await c.do(
        "acme",
        networks.decide_port_set,
        PortSet(tenant="acme", ref=s["srv-port"], qos_policy="slow"),
    )
    await lab.converge()
    listener = serve(s["srv"][0], "listen", "9000", "60")
    try:
        size = 4_000_000  # 32 Mbit: about 4 s at 8 Mbit/s
        res = probe(s["c1"][0], "send", s["srv"][1], "9000", str(size), timeout=40)
        assert res.returncode == 0, res.stderr
        mbit = size * 8 / float(res.stdout.strip()) / 1e6
        assert 6.4 <= mbit <= 9.6, f"{mbit:.2f} Mbit/s"
    finally:
        listener.kill()
        listener.wait(5)


async def test_restart_changes_nothing_and_reconcile_repairs_a_deleted_interface(
    lab, connect_store
):
    s = await acme_pair(lab)
    host2 = lab.agents["host-2"]
    before = await asyncio.to_thread(host2.kernel.links)
    # a restarted agent (a new connection, a fresh fold) finds nothing to do
    await host2.stop()
    again = lab.agent("host-2", store=await connect_store())
    await again.start()
    assert not again.last_changes, again.last_changes
    assert await asyncio.to_thread(again.kernel.links) == before
    # someone deletes srv's veth by hand: the next pass puts it back, and says so
    name = nw.kernel_name(lab.prefix, "port", s["srv-port"])
    await asyncio.to_thread(again.kernel._delete, name)
    assert not ping(s["c1"][0], s["srv"][1], tries=1)
    changes = await again.reconcile(correction=True)
    assert name in changes.created
    assert ping(s["c1"][0], s["srv"][1])
    seen = []
    async for batch in lab.store.read(after=0):
        seen += [rec.decode() for rec in batch]
    corrected = [e for e in seen if isinstance(e, nw.NetworkAgentCorrected) and e.host == "host-2"]
    assert corrected and name in corrected[-1].created
    # and a stale link of ours that no event explains is removed
    stray = nw.kernel_name(lab.prefix, "bridge", "no-such-network")
    await asyncio.to_thread(_add_bridge, again.kernel, stray)
    await again.reconcile(correction=True)
    assert stray not in await asyncio.to_thread(again.kernel.links)
    # (a pass the agent's own event started may have got there first: either
    # way the removal is recorded as a correction)
    recorded = [rec.decode() for rec in await lab.store.read_all(subjects=[corrected[-1].subject])]
    assert any(stray in e.removed for e in recorded if isinstance(e, nw.NetworkAgentCorrected))


def _add_bridge(host: Host, name: str) -> None:
    with host._ipr() as ipr:
        ipr.link("add", ifname=name, kind="bridge")


async def test_teardown_leaves_no_link_chain_or_namespace(lab):
    await acme_pair(lab)
    for a in lab.agents.values():
        await a.stop()
        await a.teardown()
        assert await asyncio.to_thread(a.kernel.links) == {}
        assert await asyncio.to_thread(a.kernel._our_chains, "filter") == set()
        assert await asyncio.to_thread(a.kernel._our_chains, "raw") == set()
    await lab.close()
    assert leftovers(lab.prefix) == []


def _outside(lab: Lab, ns: str, bridge: str, address: str) -> None:
    """A namespace on the external network (the internet, for the test),
    plugged into host-1's external bridge; it has no route to 10.0.0.0/24."""
    from pyroute2 import IPRoute

    leg = nw.kernel_name(lab.prefix, "uplink", "outside")
    with IPRoute(netns=lab.sim.netns("host-1")) as ipr:
        ipr.link("add", ifname=leg, kind="veth", peer={"ifname": "eth0", "net_ns_fd": ns})
        idx = ipr.link_lookup(ifname=leg)[0]
        ipr.link("set", index=idx, master=ipr.link_lookup(ifname=bridge)[0], state="up")
    with IPRoute(netns=ns) as ipr:
        idx = ipr.link_lookup(ifname="eth0")[0]
        ipr.addr("add", index=idx, address=address, prefixlen=24)
        ipr.link("set", index=idx, state="up")


async def test_a_floating_ip_answers_from_outside_and_the_instance_reaches_out_through_snat(lab):
    c = lab.cloud
    await c.external("public", "203.0.113.0/24", "203.0.113.1")
    await c.tenant("acme")
    await c.network("acme", "net", "10.0.0.0/24")
    sid = await c.server("acme", "c1", "host-2", ["net"])
    inst = await lab.instance(sid)
    (router, _) = await c.on_pool(
        "acme",
        "public",
        routers.decide_router_create,
        routers.RouterPlan(
            RouterCreate(tenant="acme", name="edge", external_network="public"),
            c.pools["public"].attrs,
        ),
    )
    await c.do(
        "acme",
        routers.decide_router_add_subnet,
        RouterInterface(tenant="acme", router="edge", subnet="net-sub"),
    )
    fip, _ = await c.on_pool(
        "acme", "public", routers.decide_fip_create, FloatingIpCreate(tenant="acme")
    )
    await c.do(
        "acme",
        routers.decide_fip_associate,
        FloatingIpAssociate(tenant="acme", floating_ip=fip.address, server="c1"),
    )
    icmp = SecurityGroupRuleAdd(tenant="acme", security_group="default", protocol="icmp")
    await c.do("acme", security_groups.decide_sg_rule_add, icmp)
    await lab.start_agents(routers="host-1")
    await lab.converge()
    assert router.external_ip == "203.0.113.2" and fip.address == "203.0.113.3"
    outside = nw.kernel_name(lab.prefix, "instance", "outside")
    lab.instances.append(outside)
    await asyncio.to_thread(netns_create, outside)
    bridge = nw.kernel_name(lab.prefix, "ext", "public")
    await asyncio.to_thread(_outside, lab, outside, bridge, "203.0.113.1")
    # the instance (host-2) reaches its router (host-1) over VXLAN
    assert ping(inst, "10.0.0.1")
    # from outside, the floating IP answers (DNAT to 10.0.0.2 on host-2)
    assert ping(outside, fip.address)
    # and the instance reaches outside, which has no route back to 10.0.0.0/24:
    # only a translated source gets an answer
    assert ping(inst, "203.0.113.1")
    # disassociated, the floating IP stops answering
    await c.do("acme", routers.decide_fip_disassociate, RefCommand(tenant="acme", ref=fip.address))
    await lab.converge()
    assert not ping(outside, fip.address, tries=1)
    assert ping(inst, "203.0.113.1")  # still out, through the router's own address
    # the router host's teardown takes the router's namespace too
    for a in lab.agents.values():
        await a.stop()
        await a.teardown()
    assert not [n for n in leftovers(lab.prefix) if nw.owned(lab.prefix, n, "router")]


def netns_create(name: str) -> None:
    from pyroute2 import netns

    netns.create(name)


def test_stratus_up_with_hosts_builds_simulated_hosts_and_removes_them_on_stop(tmp_path):
    import hashlib

    from .test_cli import Up

    data = tmp_path / "data"
    u = Up(data, "--hosts", "2")
    data.mkdir()
    prefix = "s" + hashlib.sha256(str(data.resolve()).encode()).hexdigest()[:3]
    try:
        u.start(timeout=60)
        names = set(leftovers(prefix))
        hosts = {nw.kernel_name(prefix, "host", h) for h in ("host-01", "host-02")}
        assert hosts | {nw.kernel_name(prefix, "underlay", "underlay")} == names
        rc, _ = u.stop(timeout=30)
        assert rc == 0
        assert leftovers(prefix) == []
    finally:
        u.kill()
        for ns in leftovers(prefix):
            netns_remove(ns)


def netns_remove(name: str) -> None:
    from pyroute2 import netns

    netns.remove(name)


async def test_an_agent_killed_and_restarted_changes_nothing_on_its_host(lab, nats_server):
    """`stratus serve network-agent` as a process: SIGKILL once ready, then a
    new one on the same host finds nothing to change (every link keeps its
    index, no correction is recorded) and traffic still flows."""
    import sys

    s = await acme_pair(lab)
    for a in lab.agents.values():
        await a.stop()
    host = "host-2"
    argv = [sys.executable, "-m", "stratus.cli.main", "--url", nats_server.url, "serve",
            "--insecure-no-auth", "network-agent", "--host", host, "--vtep", lab.sim.vtep(host),
            "--netns", lab.sim.netns(host), "--prefix", lab.prefix]  # fmt: skip
    kernel = Host(lab.prefix, "", lab.sim.netns(host))
    before = await asyncio.to_thread(kernel.links)
    seq = await lab.store.last_seq()
    for _ in range(2):
        await asyncio.to_thread(_start_and_kill, argv)
    assert await asyncio.to_thread(kernel.links) == before  # same names, same indexes
    assert ping(s["c1"][0], s["srv"][1])
    later = [rec.decode() for rec in await lab.store.read_all(after=seq)]
    assert not [e for e in later if isinstance(e, nw.NetworkAgentCorrected)]


def _start_and_kill(argv: list[str]) -> None:
    """Run the agent until it says ready (60 s at most), then SIGKILL it."""
    import signal
    import subprocess
    import time

    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        deadline = time.monotonic() + 60
        line = ""
        while "ready" not in line and time.monotonic() < deadline:
            line = p.stdout.readline() if p.stdout else ""
            assert line or p.poll() is None, "the agent exited"
        assert "ready" in line
        p.send_signal(signal.SIGKILL)
        p.wait(10)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(5)
        if p.stdout:
            p.stdout.close()


async def test_a_teardown_racing_a_pass_still_running_waits_for_it(lab):
    """A stopped agent's last pass may still run in its thread (its task was
    cancelled, not the thread): a teardown started then must wait for it,
    not share its sockets, and still leave nothing behind."""
    await acme_pair(lab)
    agent = lab.agents["host-2"]
    await agent.stop()
    for _ in range(3):
        passing = asyncio.create_task(asyncio.to_thread(agent.kernel.reconcile, agent.plan()))
        await asyncio.sleep(0.005)
        await asyncio.wait_for(asyncio.to_thread(agent.kernel.teardown), 60)
        await asyncio.wait_for(passing, 60)
    # whichever ran last, a final teardown leaves no link of ours
    await asyncio.wait_for(asyncio.to_thread(agent.kernel.teardown), 60)
    assert await asyncio.to_thread(agent.kernel.links) == {}


async def test_a_port_whose_instance_appears_later_is_wired_without_another_event(lab):
    """The compute agent makes a container's namespace on its own time: the
    port waits for it, and is wired within about a second of it appearing,
    though nothing more is appended to the log."""
    import time

    from pyroute2 import netns as pyroute_netns

    from stratus.ops.bench.netlab import echo

    s = await acme_pair(lab)
    c = lab.cloud
    sid = await c.server("acme", "late", "host-3", ["net"])
    await lab.converge()
    name = nw.kernel_name(lab.prefix, "port", c.port_of("acme", sid).id)
    agent = lab.agents["host-3"]
    assert name in agent.kernel.waiting
    seq = await lab.store.last_seq()
    ns = nw.instance_netns(sid)
    lab.instances.append(ns)
    t0 = time.monotonic()
    await asyncio.to_thread(pyroute_netns.create, ns)
    ip = c.port_of("acme", sid).ip
    assert await echo(ns, s["srv"][1], seconds=5)
    assert time.monotonic() - t0 < 3
    assert name not in agent.kernel.waiting
    # (its port.bound is the only thing appended meanwhile)
    later = [rec.decode().type_name() for rec in await lab.store.read_all(after=seq)]
    assert set(later) <= {"port.bound"}, later
    assert ip


def _l2pop(host: Host, bridge: str, vxlan: str) -> tuple[set[tuple[str, str, str]], bool]:
    """What host's kernel holds for a network's remote ports, read from its
    tables: (ip, MAC, VTEP) where the bridge's neighbour entry, its static
    FDB entry and the VXLAN device's unicast entry all agree; and whether
    the VXLAN port suppresses ARP."""
    from stratus.agents.network.rtnl import Rtnl

    with Rtnl.open(host.host_ns) as nl:
        br, vx = nl.link(bridge), nl.link(vxlan)
        assert br is not None and vx is not None
        fdb = nl.fdb_table()
        neigh = nl.permanent_neighbours().get(br.index, {})
        unicast, static = fdb.unicast.get(vx.index, {}), fdb.static.get(vx.index, set())
        # (nothing of ours that does not pair up)
        assert set(neigh.values()) == static == set(unicast), (neigh, static, unicast)
        return {(ip, mac, unicast[mac]) for ip, mac in neigh.items()}, vx.suppress


async def test_a_remote_port_is_known_to_each_host_of_its_network_until_it_is_deleted(
    lab, connect_store
):
    """l2population: every other host of the network holds the new port's
    MAC behind its VTEP and answers ARP for its address itself; deleting the
    port removes that everywhere; a restart with nothing changed changes nothing."""
    from stratus.handlers import servers

    s = await acme_pair(lab)  # c1 on host-1, srv on host-2
    c = lab.cloud
    net = c.worlds["acme"].networks.find("net").id
    bridge = nw.kernel_name(lab.prefix, "bridge", net)
    vxlan = nw.kernel_name(lab.prefix, "vxlan", net)
    sid = await c.server("acme", "c3", "host-3", ["net"])
    ns3 = await lab.instance(sid)
    await lab.converge()
    p3 = c.port_of("acme", sid)
    # (its namespace came after the event: wired by the agent's next shallow pass)
    name = nw.kernel_name(lab.prefix, "port", p3.id)
    for _ in range(100):
        if name in lab.agents["host-3"].kernel.wired():
            break
        await asyncio.sleep(0.05)
    mine = (p3.ip, p3.mac, lab.sim.vtep("host-3"))
    srv = next(p for p in c.worlds["acme"].ports.values() if p.id == s["srv-port"])
    for h in ("host-1", "host-2"):
        entries, suppress = await asyncio.to_thread(_l2pop, lab.agents[h].kernel, bridge, vxlan)
        assert mine in entries and suppress, (h, entries)
    on3, _ = await asyncio.to_thread(_l2pop, lab.agents["host-3"].kernel, bridge, vxlan)
    assert {e[2] for e in on3} == {lab.sim.vtep("host-1"), lab.sim.vtep("host-2")}
    assert (srv.ip, srv.mac, lab.sim.vtep("host-2")) in on3 and mine not in on3
    # c1 resolves c3's address at once, answered by host-1's bridge (first try)
    assert ping(s["c1"][0], p3.ip, tries=1)
    assert ping(ns3, s["srv"][1], tries=1)
    # an agent restarted with nothing changed finds its entries in place
    await lab.agents["host-1"].stop()
    again = lab.agent("host-1", store=await connect_store())
    await again.start()
    assert not again.last_changes, again.last_changes
    # c3 deleted: its entries go from every other host
    await c.do("acme", servers.decide_server_delete, RefCommand(tenant="acme", ref=sid))
    await lab.converge()
    for h in ("host-1", "host-2"):
        entries, _ = await asyncio.to_thread(_l2pop, lab.agents[h].kernel, bridge, vxlan)
        assert mine not in entries and entries, (h, entries)
    # an entry removed by hand is drift: the next deep pass puts it back, and says so
    from stratus.agents.network.rtnl import Rtnl

    def drop_neighbour() -> None:
        with Rtnl.open(lab.sim.netns("host-1")) as nl:
            nl.del_neighbour(nl.index(bridge), srv.ip)

    await asyncio.to_thread(drop_neighbour)
    changes = await again.reconcile(correction=True)
    assert changes.created == [f"neigh {bridge} {srv.ip}"], changes
    entries, _ = await asyncio.to_thread(_l2pop, again.kernel, bridge, vxlan)
    assert (srv.ip, srv.mac, lab.sim.vtep("host-2")) in entries


async def _host1_alone(lab) -> tuple[NetworkAgent, HostPlan, BridgePlan]:
    """acme's pair (c1 on host-1, srv on host-2), host-1's agent stopped so
    that the passes a test makes are its alone: the agent, its plan, and
    the plan's one bridge."""
    await acme_pair(lab)
    agent = lab.agents["host-1"]
    await agent.stop()
    hp = agent.plan()
    (b,) = hp.bridges.values()
    return agent, hp, b


async def test_a_remote_port_is_its_three_entries_and_a_failed_pass_leaves_them_to_the_next(lab):
    """A shallow pass for a port placed on another host of the network makes
    that port's three entries on this host and nothing else, after the
    pass's own work (member sets first, its new ports, their rules). A pass
    that fails before it sent them (its rules refused) leaves the bridge
    to be looked at again: the next shallow pass makes them."""
    import dataclasses

    from stratus.agents.network.kernel import KernelError

    agent, hp, b = await _host1_alone(lab)
    kernel = agent.kernel
    ip, mac, vtep = "10.0.0.250", "fa:16:3e:00:00:fa", lab.sim.vtep("host-2")
    extra = dataclasses.replace(b, neighbours=b.neighbours | {(ip, mac, vtep)})

    def plan(chains: dict) -> HostPlan:
        return dataclasses.replace(hp, bridges={b.bridge: extra}, chains=chains)

    broken = dict(hp.chains)
    broken[("filter", nw.kernel_name(lab.prefix, "chain", "broken"))] = (
        f"-A {nw.kernel_name(lab.prefix, 'chain', 'broken')} -j NO-SUCH-TARGET",
    )
    with pytest.raises(KernelError, match="iptables-restore"):
        await asyncio.to_thread(kernel.reconcile, plan(broken), False)
    ch = await asyncio.to_thread(kernel.reconcile, plan(dict(hp.chains)), False)
    assert sorted(ch.created) == sorted(
        [f"fdb {b.vxlan} {mac} {vtep}", f"fdb {b.bridge} {mac}", f"neigh {b.bridge} {ip}"]
    ), ch
    assert ch.removed == [] and ch.wired == []
    steps = list(kernel.last_pass)
    assert steps[0] == "ipsets" and steps.index("entries") > steps.index("plug"), steps
    entries, _ = await asyncio.to_thread(_l2pop, kernel, b.bridge, b.vxlan)
    assert (ip, mac, vtep) in entries
    # and the port gone again: its three entries go, nothing else
    ch = await asyncio.to_thread(kernel.reconcile, hp, False)
    assert sorted(ch.removed) == sorted(
        [f"fdb {b.vxlan} {mac}", f"fdb {b.bridge} {mac}", f"neigh {b.bridge} {ip}"]
    ), ch
    assert ch.created == []
    entries, _ = await asyncio.to_thread(_l2pop, kernel, b.bridge, b.vxlan)
    assert (ip, mac, vtep) not in entries and entries


async def test_bridges_handed_to_a_running_pass_are_applied_by_it_and_older_ones_dropped(lab):
    """``bridges_soon``: a bridge the agent hands in once the pass's plan is
    made (a port bound on a host new to the network, folded while the pass
    runs) is applied by that pass between its steps: the new host's flood
    entry and the port's three entries are there when it returns, though
    its plan has neither. Planned work, not drift: not in its changes, and
    the next pass, whose plan has them, finds nothing to do. One handed in
    before the plan was made is older than the plan and dropped."""
    import dataclasses

    from stratus.agents.network.rtnl import Rtnl

    agent, hp, b = await _host1_alone(lab)
    kernel = agent.kernel
    # (what the agent hands in: the planner's bridges of the networks touched,
    # of those the host has)
    assert agent.planner.bridges(agent.topology, {b.network, "no-such-network"}) == {b.bridge: b}
    await asyncio.to_thread(kernel.reconcile, hp, True)
    ip, mac, vtep = "10.0.0.250", "fa:16:3e:00:00:fa", "198.18.0.200"
    newer = dataclasses.replace(
        b, remotes=b.remotes | {vtep}, neighbours=b.neighbours | {(ip, mac, vtep)}
    )

    def flood() -> frozenset[str]:
        with Rtnl.open(kernel.host_ns) as nl:
            return frozenset(nl.fdb_table().flood.get(nl.index(b.vxlan), ()))

    kernel.bridges_soon({b.bridge: newer})  # (before the plan: dropped)
    ch = await asyncio.to_thread(kernel.reconcile, hp, False)
    entries, _ = await asyncio.to_thread(_l2pop, kernel, b.bridge, b.vxlan)
    assert (ip, mac, vtep) not in entries and vtep not in await asyncio.to_thread(flood)
    assert not ch, ch
    kernel.plan_made()
    kernel.bridges_soon({b.bridge: newer})  # (after it: applied)
    ch = await asyncio.to_thread(kernel.reconcile, hp, False, True)
    assert not ch, ch
    entries, _ = await asyncio.to_thread(_l2pop, kernel, b.bridge, b.vxlan)
    assert (ip, mac, vtep) in entries and entries - {(ip, mac, vtep)}
    assert await asyncio.to_thread(flood) == newer.remotes
    ch = await asyncio.to_thread(
        kernel.reconcile, dataclasses.replace(hp, bridges={b.bridge: newer}), False
    )
    assert not ch, ch


async def test_member_sets_handed_in_before_a_pass_never_undo_its_plan(lab):
    """Member sets the agent hands a running pass (``members_soon``: folded
    while it ran) are applied between its steps; ones handed in before a
    pass are older than its plan and dropped, so they never take a member
    out that the plan has."""
    from stratus.agents.network.ipset import IpSets

    s = await acme_pair(lab)  # c1 on host-1, srv on host-2: both in acme's default group
    agent = lab.agents["host-1"]
    await agent.stop()
    kernel = agent.kernel
    hp = agent.plan()
    (name,) = [n for n, m in hp.ipsets.items() if s["srv"][1] in m]
    kernel.members_soon({name: frozenset()})  # (stale: before the plan)
    await asyncio.to_thread(kernel.reconcile, hp, False)

    def members() -> set[str]:
        sets = IpSets.open(lab.sim.netns("host-1"))
        try:
            return set(sets.listing()[name])
        finally:
            sets.close()

    have = await asyncio.to_thread(members)
    assert have == set(hp.ipsets[name]) and s["srv"][1] in have
    assert ping(s["c1"][0], s["srv"][1], tries=2)
