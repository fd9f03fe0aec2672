"""The network agent's plan for VM ports and DHCP, as a pure function of
events: which host wires which tap, where dnsmasq runs and what it hands
out, and what the security groups let through for DHCP."""

from __future__ import annotations

from stratus.agents.network.desired import VXLAN_MTU, Topology, plan
from stratus.events import network as nw
from stratus.events import resources as rs
from stratus.events.model import Cause
from stratus.events.scheduling import HostReleased

C = Cause(actor="t", correlation_id="c", causation_id="c")
P = "tp"


def world(
    routed: bool, instance_type: str = "vm", running: bool = True, dhcp: bool = True
) -> Topology:
    """acme's net (10.0.0.0/24, VNI 5000) with one server on h2; agents on
    h1 (routers) and h2; with ``routed``, a router on the subnet."""
    t = Topology()
    events = [
        C.make(
            nw.NetworkAgentRegistered,
            "_system",
            "network-agent",
            "h1",
            host="h1",
            vtep="192.0.2.1",
            routers=True,
        ),
        C.make(
            nw.NetworkAgentRegistered, "_system", "network-agent", "h2", host="h2", vtep="192.0.2.2"
        ),
        C.make(rs.NetworkCreated, "acme", "network", "net", name="net", vni=5000),
        C.make(
            rs.SubnetCreated,
            "acme",
            "subnet",
            "sub",
            name="sub",
            network="net",
            cidr="10.0.0.0/24",
            gateway="10.0.0.1",
            pool_start="10.0.0.2",
            pool_end="10.0.0.254",
            dns=["192.0.2.53"],
            dhcp=dhcp,
        ),
        C.make(
            rs.ServerRequested,
            "acme",
            "server",
            "s1",
            spec=rs.ServerSpec(
                name="s1", image="i", vcpus=1, ram_mb=64, instance_type=instance_type
            ),
        ),
        C.make(
            rs.PortCreated,
            "acme",
            "port",
            "p1",
            name="p1",
            network="net",
            subnet="sub",
            mac="fa:16:3e:00:00:01",
            ip="10.0.0.5",
            device="s1",
            device_owner="compute",
            security_groups=["sg"],
        ),
        C.make(rs.ServerScheduled, "acme", "server", "s1", host="h2"),
    ]
    if running:
        events.append(C.make(rs.ServerRunning, "acme", "server", "s1", host="h2"))
    if routed:
        events += [
            C.make(rs.RouterCreated, "acme", "router", "r1", name="r1"),
            C.make(
                rs.PortCreated,
                "acme",
                "port",
                "rp",
                name="rp",
                network="net",
                subnet="sub",
                mac="fa:16:3e:00:00:02",
                ip="10.0.0.1",
                device="r1",
                device_owner="router_interface",
            ),
            C.make(
                rs.RouterInterfaceAdded,
                "acme",
                "router",
                "r1",
                subnet="sub",
                port="rp",
                ip="10.0.0.1",
            ),
        ]
    for seq, ev in enumerate(events, 1):
        t.apply(seq, ev)
    return t


def test_a_vm_port_is_its_tap_on_the_bridge_with_no_namespace_and_no_static_address():
    hp = plan(world(routed=False), "h2", P)
    tap = nw.vm_tap("p1")
    pp = hp.ports[tap]
    assert pp.vm and pp.netns == "" and pp.peer == "" and pp.gateway == ""
    assert pp.bridge == nw.kernel_name(P, "bridge", "net")
    assert hp.taps() == {tap}
    # the bridge reaches the router host, where DHCP lives
    assert hp.bridges[pp.bridge].remotes == {"192.0.2.1"}
    assert hp.dhcp == {}  # DHCP runs on the router host only
    # a container's port stays a veth into its namespace
    cp = plan(world(routed=False, instance_type="container"), "h2", P)
    assert not cp.taps() and nw.kernel_name(P, "port", "p1") in cp.ports
    # until the guest runs the tap is libvirt's to set up: not taken yet,
    # while DHCP is ready for the guest's first request
    assert not plan(world(routed=False, running=False), "h2", P).taps()
    assert plan(world(routed=False, running=False), "h1", P).dhcp


def test_an_unrouted_subnet_is_served_from_a_dhcp_namespace_holding_its_gateway():
    hp = plan(world(routed=False), "h1", P)
    ns = nw.kernel_name(P, "dhcp", "net")
    (dp,) = hp.dhcp.values()
    assert dp.netns == ns
    (leg,) = dp.legs
    assert leg.address == "10.0.0.1/24" and leg.bridge == nw.kernel_name(P, "bridge", "net")
    assert leg.ifname in hp.names()
    lines = dp.config.splitlines()
    assert "dhcp-host=fa:16:3e:00:00:01,10.0.0.5" in lines
    assert "dhcp-range=set:s0,10.0.0.0,static,255.255.255.0,12h" in lines
    assert "dhcp-option=tag:s0,option:router" in lines  # none: nothing routes it
    assert f"dhcp-option-force=tag:s0,option:mtu,{VXLAN_MTU}" in lines
    assert "dhcp-option=tag:s0,option:dns-server,192.0.2.53" in lines
    assert f"interface={leg.inner}" in lines and "port=0" in lines
    # h1 has no port of its own here, yet carries the network for DHCP
    assert hp.bridges[leg.bridge].remotes == {"192.0.2.2"}


def test_a_routed_subnet_is_served_inside_its_router_namespace():
    hp = plan(world(routed=True), "h1", P)
    rns = nw.kernel_name(P, "router", "r1")
    assert set(hp.dhcp) == {rns} and hp.dhcp[rns].legs == ()
    lines = hp.dhcp[rns].config.splitlines()
    assert "dhcp-option=tag:s0,option:router,10.0.0.1" in lines
    assert f"interface={nw.kernel_name(P, 'gw', 'rp')}" in lines
    assert not [n for n in hp.names() if nw.owned(P, n, "dleg")]


def test_no_vm_port_no_dhcp():
    assert plan(world(routed=True, instance_type="container"), "h1", P).dhcp == {}


def test_the_security_groups_let_dhcp_through_for_a_vm_port_only():
    base = nw.kernel_name(P, "port", "p1")
    rules = plan(world(routed=False), "h2", P).firewall.splitlines()
    discover = (
        f"-A {base}-o -s 0.0.0.0/32 -d 255.255.255.255/32 -p udp -m udp "
        "--sport 68 --dport 67 -j RETURN"
    )
    offer = f"-A {base}-i -s 10.0.0.1/32 -p udp -m udp --sport 67 --dport 68 -j ACCEPT"
    spoof = f"-A {base}-o ! -s 10.0.0.5/32 -j DROP"
    assert discover in rules and offer in rules
    # the discover (from 0.0.0.0) is let out before the anti-spoofing drop
    assert rules.index(discover) < rules.index(spoof)
    # chains carry the deployment's prefix; the match is on the tap itself
    assert any(f"--physdev-in {nw.vm_tap('p1')} " in r for r in rules)
    container = plan(world(routed=False, instance_type="container"), "h2", P).firewall
    assert "--sport 67" not in container and "--sport 68" not in container


def test_tap_names_are_kernel_safe_and_macs_are_checked():
    import pytest

    from stratus.events.errors import Invalid

    assert nw.vm_tap("p1") == nw.check_kernel_name(nw.vm_tap("p1"))
    assert len(nw.vm_tap("x" * 500)) == 15
    assert nw.check_mac("fa:16:3e:00:00:01") == "fa:16:3e:00:00:01"
    for bad in ("FA:16:3E:00:00:01", "01:00:5e:00:00:01", "fa:16:3e:00:00", "fa:16:3e:00:00:01\n"):
        with pytest.raises(Invalid):
            nw.check_mac(bad)


def test_a_subnet_without_dhcp_gets_no_dhcp_server():
    t = world(routed=False, dhcp=False)
    assert plan(t, "h1", P).dhcp == {}
    # its VM port is still wired on its own host
    assert nw.vm_tap("p1") in plan(t, "h2", P).ports


def test_an_administratively_down_router_has_no_namespace_and_dhcp_moves_out():
    t = world(routed=True)
    t.apply(99, C.make(rs.RouterAdminStateSet, "acme", "router", "r1", admin_up=False))
    hp = plan(t, "h1", P)
    assert hp.routers == {}
    (dp,) = hp.dhcp.values()
    assert dp.netns == nw.kernel_name(P, "dhcp", "net")  # served from a DHCP namespace
    t.apply(100, C.make(rs.RouterAdminStateSet, "acme", "router", "r1", admin_up=True))
    assert nw.kernel_name(P, "router", "r1") in plan(t, "h1", P).routers


# -- the incremental planner against the full plan -----------------------------------


def _random_history(seed: int, steps: int):
    """Events of a small random cloud: three hosts (h1 runs routers), two
    tenants' VXLAN networks and a routed network, security groups whose
    rules name each other, container and VM servers placed, moved, bound,
    re-grouped, rate-limited and deleted, routed ports given addresses from
    the hosts' blocks, a router with an interface."""
    import random

    rnd = random.Random(seed)
    out = []
    hosts = ["h1", "h2", "h3"]
    agents = []
    for i, h in enumerate(hosts):
        agents.append(
            C.make(
                nw.NetworkAgentRegistered,
                "_system",
                "network-agent",
                h,
                host=h,
                vtep=f"192.0.2.{i + 1}",
                routers=h == "h1",
            )
        )
    out.append(
        C.make(
            rs.NetworkCreated,
            "_system",
            "network",
            "pods",
            name="pods",
            cidr="10.244.0.0/16",
            mode=nw.ROUTED,
            block_prefix=26,
        )
    )
    nets, groups, servers, ports = [], [], {}, {}
    used_ips: set[str] = set()
    blocks: dict[str, str] = {}
    for t in ("acme", "umbra"):
        for k in range(2):
            net, sub = f"{t}-n{k}", f"{t}-s{k}"
            out.append(C.make(rs.NetworkCreated, t, "network", net, name=net, vni=5000 + len(nets)))
            out.append(
                C.make(
                    rs.SubnetCreated,
                    t,
                    "subnet",
                    sub,
                    name=sub,
                    network=net,
                    cidr=f"10.{k}.0.0/24",
                    gateway=f"10.{k}.0.1",
                    pool_start=f"10.{k}.0.2",
                    pool_end=f"10.{k}.0.254",
                )
            )
            nets.append((t, net, sub, k))
        for g in ("default", "web"):
            gid = f"{t}-{g}"
            out.append(C.make(rs.SecurityGroupCreated, t, "security-group", gid, name=g))
            groups.append((t, gid))
    out.append(C.make(rs.QosPolicyCreated, "acme", "qos-policy", "slow", name="slow", max_kbps=800))
    n = 0
    for _ in range(steps):
        op = rnd.random()
        if op < 0.25 or not servers:
            n += 1
            t, net, sub, k = rnd.choice(nets)
            routed = rnd.random() < 0.3
            vm = not routed and rnd.random() < 0.2
            sid, pid = f"s{n}", f"p{n}"
            out.append(
                C.make(
                    rs.ServerRequested,
                    t,
                    "server",
                    sid,
                    spec=rs.ServerSpec(
                        name=sid,
                        image="i",
                        vcpus=1,
                        ram_mb=64,
                        instance_type="vm" if vm else "container",
                    ),
                )
            )
            sgs = rnd.sample([g for tt, g in groups if tt == t], rnd.randint(1, 2))
            ip = "" if routed else f"10.{k}.0.{n % 250 + 2}"
            out.append(
                C.make(
                    rs.PortCreated,
                    t,
                    "port",
                    pid,
                    name=pid,
                    network="pods" if routed else net,
                    subnet="" if routed else sub,
                    mac=f"fa:16:3e:00:{n // 256:02x}:{n % 256:02x}",
                    ip=ip,
                    device=sid,
                    device_owner="compute",
                    security_groups=sgs,
                )
            )
            servers[sid] = (t, routed)
            ports[pid] = (t, sid, routed)
        elif op < 0.45:
            sid = rnd.choice(list(servers))
            t, routed = servers[sid]
            host = rnd.choice(hosts)
            out.append(C.make(rs.ServerScheduled, t, "server", sid, host=host))
            if rnd.random() < 0.5:
                out.append(C.make(rs.ServerRunning, t, "server", sid, host=host))
            pid = "p" + sid[1:]
            if routed and pid in ports:
                block = next((b for b, h in blocks.items() if h == host), None)
                if block is None:
                    block = f"10.244.{len(blocks)}.0/26"
                    blocks[block] = host
                    out.append(
                        C.make(
                            nw.BlockClaimed, "_system", "network", "pods", block=block, host=host
                        )
                    )
                base = block.split("/")[0].rsplit(".", 1)[0]
                ip = next(f"{base}.{i}" for i in range(1, 63) if f"{base}.{i}" not in used_ips)
                used_ips.add(ip)
                out.append(C.make(rs.PortAddressAssigned, t, "port", pid, host=host, ip=ip))
            elif pid in ports and rnd.random() < 0.5:
                out.append(C.make(rs.PortBound, t, "port", pid, host=host))
        elif op < 0.55 and ports:
            pid = rnd.choice(list(ports))
            t = ports[pid][0]
            sgs = rnd.sample([g for tt, g in groups if tt == t], rnd.randint(0, 2))
            qos = rnd.choice(["", "slow"]) if t == "acme" else ""
            out.append(C.make(rs.PortUpdated, t, "port", pid, security_groups=sgs, qos_policy=qos))
        elif op < 0.7:
            t, gid = rnd.choice(groups)
            other = rnd.choice([g for tt, g in groups if tt == t])
            out.append(
                C.make(
                    rs.SecurityGroupRuleAdded,
                    t,
                    "security-group",
                    gid,
                    rule=f"r{len(out)}",
                    direction=rnd.choice(["ingress", "egress"]),
                    protocol=rnd.choice(["any", "tcp", "icmp"]),
                    port_min=rnd.choice([0, 80]),
                    remote_group=rnd.choice(["", other]),
                )
            )
        elif op < 0.8 and servers:
            sid = rnd.choice(list(servers))
            t, _ = servers.pop(sid)
            out.append(C.make(rs.ServerDeleted, t, "server", sid))
            if rnd.random() < 0.7:
                pid = "p" + sid[1:]
                ports.pop(pid, None)
                out.append(C.make(rs.PortDeleted, t, "port", pid))
        elif op < 0.85 and servers:
            sid = rnd.choice(list(servers))
            t, _ = servers[sid]
            out.append(C.make(HostReleased, "_system", "host", "h2", server=sid, server_tenant=t))
        elif op < 0.9:
            t, net, sub, k = rnd.choice(nets)
            out.append(C.make(rs.RouterCreated, t, "router", f"r-{t}", name="r"))
            out.append(
                C.make(
                    rs.PortCreated,
                    t,
                    "port",
                    f"rp-{sub}",
                    name="rp",
                    network=net,
                    subnet=sub,
                    mac="fa:16:3e:ff:00:01",
                    ip=f"10.{k}.0.1",
                    device=f"r-{t}",
                    device_owner="router_interface",
                )
            )
            out.append(
                C.make(
                    rs.RouterInterfaceAdded,
                    t,
                    "router",
                    f"r-{t}",
                    subnet=sub,
                    port=f"rp-{sub}",
                    ip=f"10.{k}.0.1",
                )
            )
        else:
            t, gid = rnd.choice(groups)
            rules = [e.rule for e in out if isinstance(e, rs.SecurityGroupRuleAdded)]
            if rules:
                out.append(
                    C.make(
                        rs.SecurityGroupRuleRemoved,
                        t,
                        "security-group",
                        gid,
                        rule=rnd.choice(rules),
                    )
                )
    # agents (the router host too) register at random points: before and
    # after the ports that need them
    for ev in agents:
        out.insert(rnd.randint(0, len(out)), ev)
    return out


def test_the_incremental_plan_is_the_full_plan_after_every_event_of_random_histories():
    import random

    from stratus.agents.network.desired import Planner

    incremental = 0
    for seed in range(12):
        events = _random_history(seed, 120)
        for host in ("h1", "h2", "h3"):
            t, planner = Topology(), Planner(host, P)
            rnd = random.Random(seed)
            i = 0
            while i < len(events):
                # batches of 1-5 events, as the agent folds them
                for ev in events[i : i + rnd.randint(1, 5)]:
                    i += 1
                    t.apply(i, ev)
                before = planner.full_plans
                got = planner.update(t)
                incremental += planner.full_plans == before
                want = plan(t, host, P)
                assert got.same(want), (seed, host, i, type(events[i - 1]).__name__)
    # most batches took the incremental path (else this tests little)
    assert incremental > 1000, incremental


def _tenant_behind_router(tenant: str, n: int, fip: str, fixed: str) -> list:
    """``tenant``'s 10.0.0.0/24 (the same range for every tenant), a router
    on it with a gateway on ``public``, and a server port whose floating IP
    is ``fip``."""
    net, sub, router = f"net{n}", f"sub{n}", f"r{n}"
    port = {"network": net, "subnet": sub}
    return [
        C.make(rs.NetworkCreated, tenant, "network", net, name=net, vni=5000 + n),
        C.make(
            rs.SubnetCreated, tenant, "subnet", sub, name=sub, cidr="10.0.0.0/24",
            gateway="10.0.0.1", pool_start="10.0.0.2", pool_end="10.0.0.254", network=net,
        ),
        C.make(
            rs.RouterCreated, tenant, "router", router, name=router,
            external_network="public", external_ip=f"203.0.113.{10 + n}",
        ),
        C.make(
            rs.PortCreated, tenant, "port", f"rp{n}", name="rp", mac=f"fa:16:3e:00:01:0{n}",
            ip="10.0.0.1", device=router, device_owner="router_interface", **port,
        ),
        C.make(
            rs.RouterInterfaceAdded, tenant, "router", router, subnet=sub, port=f"rp{n}",
            ip="10.0.0.1",
        ),
        C.make(
            rs.PortCreated, tenant, "port", f"p{n}", name="p", mac=f"fa:16:3e:00:02:0{n}",
            ip=fixed, device=f"s{n}", device_owner="compute", **port,
        ),
        C.make(rs.FloatingIpCreated, tenant, "floating-ip", f"f{n}", address=fip, network="public"),
        C.make(
            rs.FloatingIpAssociated, tenant, "floating-ip", f"f{n}", port=f"p{n}",
            server=f"s{n}", fixed_ip=fixed,
        ),
    ]  # fmt: skip


def test_a_floating_ip_is_held_by_its_own_tenants_router_only_when_cidrs_overlap():
    # acme's and globex's servers both sit at 10.0.0.x behind routers on the
    # same external network (as in `stratus demo`).
    t = Topology()
    events = [
        C.make(
            nw.NetworkAgentRegistered, "_system", "network-agent", "h1", host="h1",
            vtep="192.0.2.1", routers=True,
        ),
        C.make(
            rs.NetworkCreated, "_system", "network", "public", name="public", external=True,
            cidr="203.0.113.0/24", gateway="203.0.113.1",
        ),
        *_tenant_behind_router("acme", 1, "203.0.113.3", "10.0.0.2"),
        *_tenant_behind_router("globex", 2, "203.0.113.5", "10.0.0.3"),
    ]  # fmt: skip
    for seq, ev in enumerate(events, 1):
        t.apply(seq, ev)
    routers = {rp.router: rp for rp in plan(t, "h1", P).routers.values()}
    acme, globex = routers["r1"], routers["r2"]
    assert acme.extra == ("203.0.113.3",) and globex.extra == ("203.0.113.5",)
    assert "-A PREROUTING -d 203.0.113.3/32 -j DNAT --to-destination 10.0.0.2" in acme.nat
    assert not [line for line in acme.nat if "203.0.113.5" in line]
    assert "-A PREROUTING -d 203.0.113.5/32 -j DNAT --to-destination 10.0.0.3" in globex.nat
    assert not [line for line in globex.nat if "203.0.113.3" in line]
