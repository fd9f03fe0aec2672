"""VM ports: the tap libvirt makes is put on the network's bridge (moved
into a simulated host's namespace first), and dnsmasq answers the guest's
DHCP from the subnet's gateway address: in the router's namespace when the
subnet is routed, else in a DHCP namespace of the network's own.

The guests here are namespaces whose link carries the tap's name on the
host side, so a real DHCP client (busybox udhcpc) runs in them; the real
VM (a TCG guest through libvirt) is in ``test_compute_realvm``.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from pyroute2 import IPRoute, netns

from stratus.agents.network.desired import DhcpPlan
from stratus.agents.network.kernel import KernelError, dnsmasq_pid
from stratus.events import network as nw
from stratus.events.resources import (
    RouterCreate,
    RouterInterface,
    ServerDeleted,
    ServerRunning,
)
from stratus.handlers import routers
from stratus.handlers.records import Port
from stratus.ops.bench.netlab import CAUSE, Lab, dhcp_files, ping, run_in, running_lab

pytestmark = pytest.mark.timeout(180)

BUSYBOX = "/bin/busybox"
# What udhcpc learnt, for the test to read; the address goes on the link as
# a guest's own DHCP client would put it.
SCRIPT = """#!/bin/busybox sh
case "$1" in
  bound|renew)
    /bin/busybox ip addr add "$ip/$mask" dev "$interface"
    [ -n "$router" ] && /bin/busybox ip route add default via "$router" dev "$interface"
    echo "ip=$ip mask=$mask router=$router mtu=$mtu" > "$(dirname "$0")/lease-$interface"
    ;;
esac
exit 0
"""


@pytest.fixture
async def lab(store):
    async with running_lab(store, hosts=2) as lab:
        yield lab


def plug_guest(tap: str, mac: str, guest: str) -> None:
    """What libvirt does for a VM with an ``ethernet`` interface, with a
    namespace as the guest: the host side named ``tap`` in this namespace
    (libvirtd's), the guest's side ``eth0`` with the port's MAC."""
    netns.create(guest)
    inner = "g" + tap[3:]
    with IPRoute() as ipr:
        ipr.link("add", ifname=tap, kind="veth", peer={"ifname": inner})
        ipr.link("set", index=ipr.link_lookup(ifname=tap)[0], state="up")
        ipr.link("set", index=ipr.link_lookup(ifname=inner)[0], net_ns_fd=guest)
    with netns_ipr(guest) as ipr:
        idx = ipr.link_lookup(ifname=inner)[0]
        ipr.link("set", index=idx, ifname="eth0", address=mac)
        ipr.link("set", index=idx, state="up")
        ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")


def _here(name: str) -> bool:
    with IPRoute() as ipr:
        return bool(ipr.link_lookup(ifname=name))


def netns_ipr(ns: str) -> IPRoute:
    from stratus.agents.network.kernel import in_netns

    with in_netns(ns):
        return IPRoute()


def dhcp(guest: str, workdir: Path, tries: int = 8) -> dict[str, str] | None:
    """One bounded DHCP exchange from ``guest`` (``tries`` discovers, 1 s
    apart): what the server handed out, or None."""
    script = workdir / "udhcpc.sh"
    script.write_text(SCRIPT)
    script.chmod(0o755)
    lease = workdir / "lease-eth0"
    lease.unlink(missing_ok=True)
    argv = [BUSYBOX, "udhcpc", "-i", "eth0", "-f", "-q", "-n", "-t", str(tries), "-T", "1"]
    res = run_in(guest, [*argv, "-O", "mtu", "-s", str(script)], timeout=tries * 3 + 10)
    if res.returncode != 0 or not lease.exists():
        return None
    return dict(kv.split("=", 1) for kv in lease.read_text().split())


async def vm(lab: Lab, tenant: str, name: str, host: str, net: str) -> tuple[str, Port]:
    """A VM server placed on ``host``; its guest is plugged and running."""
    c = lab.cloud
    sid = await c.server(tenant, name, host, [net], instance_type="vm")
    port = c.port_of(tenant, sid)
    guest = nw.kernel_name(lab.prefix, "instance", sid)
    lab.instances.append(guest)
    await asyncio.to_thread(plug_guest, nw.vm_tap(port.id), port.mac, guest)
    # the compute agent says so once libvirt started the guest: the agent
    # of its host wires the tap on that event, not on its next periodic pass
    await c.append([CAUSE.make(ServerRunning, tenant, "server", sid, host=host)])
    return guest, port


async def test_a_routed_vm_port_gets_its_address_by_dhcp_and_pings_its_router(lab, tmp_path):
    c = lab.cloud
    await c.tenant("acme")
    await c.network("acme", "net", "10.0.0.0/24")
    await lab.start_agents(routers="host-1")
    await c.do(
        "acme",
        routers.decide_router_create,
        routers.RouterPlan(RouterCreate(tenant="acme", name="edge"), None),
    )
    await c.do(
        "acme",
        routers.decide_router_add_subnet,
        RouterInterface(tenant="acme", router="edge", subnet="net-sub"),
    )
    # the guest is on host-2; the router and DHCP on host-1, across VXLAN
    guest, port = await vm(lab, "acme", "v1", "host-2", "net")
    await lab.converge()
    host2 = lab.agents["host-2"]
    tap = nw.vm_tap(port.id)
    links = await asyncio.to_thread(host2.kernel.links, {tap})
    bridge = links[nw.kernel_name(lab.prefix, "bridge", port.network)]
    assert links[tap]["master"] == bridge["index"] and links[tap]["up"]
    assert not await asyncio.to_thread(_here, tap)  # moved off libvirt's namespace
    lease = await asyncio.to_thread(dhcp, guest, tmp_path)
    assert lease is not None, "no DHCP answer"
    assert lease["ip"] == port.ip == "10.0.0.2"
    assert lease["router"] == "10.0.0.1" and lease["mtu"] == "1450"
    assert ping(guest, "10.0.0.1")
    # the agent recorded binding the port to host-2; wiring a guest that
    # appeared is its work, not drift it put right
    rows = await lab.store.read_all(subjects=[f"ev.acme.port.{port.id}"])
    assert any(e.type_name() == "port.bound" and e.host == "host-2" for e in decoded(rows))
    agents = decoded(await lab.store.read_all(subjects=["ev._system.network-agent.>"]))
    fixes = [e for e in agents if e.type_name() == "network-agent.corrected"]
    assert not [e for e in fixes if tap in e.created], fixes


def decoded(rows) -> list:
    return [rec.decode() for rec in rows]


async def test_an_unrouted_network_serves_dhcp_from_its_own_namespace_to_its_ports_only(
    lab, tmp_path
):
    c = lab.cloud
    await c.tenant("acme")
    await c.network("acme", "lan", "192.168.7.0/24")
    await lab.start_agents(routers="host-1")
    guest, port = await vm(lab, "acme", "v1", "host-2", "lan")
    await lab.converge()
    ns = nw.kernel_name(lab.prefix, "dhcp", port.network)
    assert ns in netns.listnetns()
    pid = dnsmasq_pid(ns)
    assert pid
    lease = await asyncio.to_thread(dhcp, guest, tmp_path)
    assert lease is not None and lease["ip"] == port.ip
    assert lease["router"] == ""  # nothing routes this network anywhere
    # a guest whose MAC is no port's gets nothing (static leases only)
    stranger = nw.kernel_name(lab.prefix, "instance", "stranger")
    lab.instances.append(stranger)
    fake_port = "stranger-port"
    await asyncio.to_thread(plug_guest, nw.vm_tap(fake_port), "fa:16:3e:aa:bb:cc", stranger)
    host2 = lab.agents["host-2"]
    await asyncio.to_thread(_enslave_by_hand, host2, nw.vm_tap(fake_port), port.network, lab)
    (tmp_path / "s").mkdir()
    assert await asyncio.to_thread(dhcp, stranger, tmp_path / "s", 3) is None
    # a restarted router host changes nothing: dnsmasq keeps running as it was
    host1 = lab.agents["host-1"]
    await host1.stop()
    again = lab.agent("host-1", routers=True)
    await again.start()
    assert not again.last_changes, again.last_changes
    assert dnsmasq_pid(ns) == pid
    # its server gone, the network needs no DHCP: dnsmasq and namespace go
    await c.append([CAUSE.make(ServerDeleted, "acme", "server", port.device)])
    await lab.converge()
    assert not dnsmasq_pid(ns)
    assert ns not in netns.listnetns()
    assert not [f for f in dhcp_files() if nw.owned(lab.prefix, f.stem)]


def _enslave_by_hand(agent, tap: str, network: str, lab: Lab) -> None:
    """Move a stranger's tap onto the network's bridge of host-2, as an
    operator's mistake would: only the DHCP server's policy stops it."""
    with IPRoute() as ipr:
        ipr.link("set", index=ipr.link_lookup(ifname=tap)[0], net_ns_fd=agent.kernel.host_ns)
    with agent.kernel._ipr() as ipr:
        idx = ipr.link_lookup(ifname=tap)[0]
        br = ipr.link_lookup(ifname=nw.kernel_name(lab.prefix, "bridge", network))[0]
        ipr.link("set", index=idx, master=br, state="up")


async def test_a_dhcp_server_that_cannot_start_fails_the_pass_but_not_the_firewall(lab):
    """dnsmasq refusing its configuration is reported (a typed error naming
    the namespace), and the security groups of the same pass still land."""
    c = lab.cloud
    await c.tenant("acme")
    await c.network("acme", "net", "10.0.0.0/24")
    await c.server("acme", "c1", "host-1", ["net"])
    agent = lab.agent("host-1", routers=True)
    hp = agent.plan()
    assert hp.firewall and not hp.dhcp
    ns = nw.kernel_name(lab.prefix, "dhcp", "broken")
    hp.dhcp[ns] = DhcpPlan(ns, (), "bind-interfaces\ninterface=no-such-link\nport=0\n")
    await asyncio.to_thread(netns.create, ns)
    lab.instances.append(ns)
    with pytest.raises(KernelError, match=f"DHCP in {ns}"):
        await asyncio.to_thread(agent.kernel.reconcile, hp)
    assert not dnsmasq_pid(ns)
    rules = run_in(lab.sim.netns("host-1"), ["iptables-save", "-t", "filter"]).stdout
    assert nw.kernel_name(lab.prefix, "chain", "forward") in rules
    await asyncio.to_thread(agent.kernel.teardown)
