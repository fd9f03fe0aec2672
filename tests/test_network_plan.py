"""The network agent's plan for VM ports and DHCP, as a pure function of
events: which host wires which tap, where dnsmasq runs and what it hands
out, and what the security groups let through for DHCP."""

from __future__ import annotations

from stratus.agents.network.desired import VXLAN_MTU, Topology, plan
from stratus.events import network as nw
from stratus.events import resources as rs
from stratus.events.model import Cause

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
            name="s1",
            image="i",
            flavor="",
            vcpus=1,
            ram_mb=64,
            disk_gb=0,
            instance_type=instance_type,
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
