"""What a host's data plane should be, folded from events alone.

``Topology`` is the cloud's networking as the log says it is (every
tenant's networks, ports, security groups, QoS policies, routers, routed
networks and their blocks, and the agents' addresses); ``plan(topology,
host, prefix)`` is the part one host must realise, as kernel object names
and their settings. Both are pure, so a restart, a redelivered event or a
replay gives the same plan.

``Planner`` keeps one host's plan current event by event: the topology
records what each event touched (ports, networks, security groups), and
only the plan entries those can change are worked out again — a new port
on another host costs this host a dictionary lookup, not a plan of the
cloud. Anything rarer (routers, subnets, QoS, agents coming and going)
plans the host again from scratch. ``tests/test_network_plan.py`` holds the
two to the same answer over random histories.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from stratus.agents.network.bird import BgpConfig, BgpPlan, bgp_plan
from stratus.events import network as nw
from stratus.events import resources as rs
from stratus.events.model import Event
from stratus.events.scheduling import HostClaimed, HostReleased

# A tenant network's MTU: the underlay's 1500 less the VXLAN encapsulation.
VXLAN_MTU = 1450


@dataclass
class Port:
    id: str
    tenant: str
    network: str
    subnet: str
    mac: str
    ip: str
    device: str
    device_owner: str
    security_groups: list[str]
    qos_policy: str
    host: str = ""  # from port.bound (or port.address-assigned)
    bound_at: int = 0
    cause: tuple[str, str] = ("", "")  # correlation and causation of port.created
    vm: bool = False  # a VM's port (its server was a VM when the port was made)


@dataclass
class RoutedNet:
    cidr: str
    block_prefix: int
    seq: int = 0  # the last event on the network's subject (claims are conditioned on it)


@dataclass
class Touched:
    """What events folded since the last ``take`` changed, as plan inputs."""

    ports: set[str] = field(default_factory=set)
    networks: set[str] = field(default_factory=set)  # hosts joined or left
    rules: set[str] = field(default_factory=set)  # security groups' rules
    members: set[str] = field(default_factory=set)  # security groups' member addresses
    bgp: bool = False  # routed networks, blocks and their hosts
    everything: bool = False  # something plans the host again from scratch

    def __bool__(self) -> bool:
        return bool(
            self.ports or self.networks or self.rules or self.members or self.bgp or self.everything
        )


@dataclass
class Topology:
    networks: dict[str, dict[str, Any]] = field(default_factory=dict)
    subnets: dict[str, dict[str, Any]] = field(default_factory=dict)
    ports: dict[str, Port] = field(default_factory=dict)
    servers: dict[str, dict[str, Any]] = field(default_factory=dict)
    groups: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    qos: dict[str, int] = field(default_factory=dict)
    vteps: dict[str, str] = field(default_factory=dict)
    # Hosts whose agent runs routers (the lowest name gets them all).
    router_hosts: set[str] = field(default_factory=set)
    routers: dict[str, dict[str, Any]] = field(default_factory=dict)
    externals: dict[str, dict[str, Any]] = field(default_factory=dict)
    fips: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Routed networks, their blocks (block -> (network, host)), and each
    # block subject's last sequence and allocations (address -> (tenant, port)).
    routed: dict[str, RoutedNet] = field(default_factory=dict)
    blocks: dict[str, tuple[str, str]] = field(default_factory=dict)
    block_seq: dict[str, int] = field(default_factory=dict)
    block_subjects: dict[str, tuple[str, str]] = field(default_factory=dict)  # -> (net, block)
    allocations: dict[str, dict[str, tuple[str, str]]] = field(default_factory=dict)
    seq: int = 0
    # -- indices, kept by ``apply`` ---------------------------------------------------
    by_device: dict[str, set[str]] = field(default_factory=dict)  # server -> its ports
    members: dict[str, dict[str, str]] = field(default_factory=dict)  # group -> port -> ip
    member_of: dict[str, set[str]] = field(default_factory=dict)  # port -> its groups above
    placed: dict[str, str] = field(default_factory=dict)  # port -> host (port_host)
    spread: dict[str, dict[str, int]] = field(default_factory=dict)  # network -> host -> ports
    # network -> port -> (host, ip, mac) of its addressed ports placed somewhere
    addressed: dict[str, dict[str, tuple[str, str, str]]] = field(default_factory=dict)
    held: dict[str, set[tuple[str, str]]] = field(default_factory=dict)  # port -> (subject, ip)
    touched: Touched = field(default_factory=Touched)
    # Networks a host joined or left since the agent last handed their
    # bridges to a running pass (``take_bridges``): the flood lists change.
    # (A port's own entries only spare flooding: they wait for the pass.)
    bridges_touched: set[str] = field(default_factory=set)

    @property
    def router_host(self) -> str:
        return min(self.router_hosts) if self.router_hosts else ""

    def take(self) -> Touched:
        """What changed since the last call."""
        out, self.touched = self.touched, Touched()
        return out

    def take_bridges(self) -> set[str]:
        """The networks a host joined or left since the last call."""
        out, self.bridges_touched = self.bridges_touched, set()
        return out

    def apply(self, seq: int, ev: Event, own: bool = False) -> None:
        """Fold one event; events this agent has no use for are ignored.
        ``own``: an event this agent just appended, folded ahead of the
        stream (it comes again in order, and folds to the same state), so
        ``seq`` is not where the fold has reached."""
        if not own:
            self.seq = max(self.seq, seq)
        kind, rid = ev.aggregate.kind, ev.aggregate.id
        touched = self.touched
        if ev.tenant == rs.SYSTEM and kind == "network" and rid in self.routed:
            self.routed[rid].seq = max(self.routed[rid].seq, seq)
        if isinstance(ev, rs.NetworkCreated) and ev.mode == nw.ROUTED:
            self.routed[rid] = RoutedNet(ev.cidr, ev.block_prefix, seq)
            touched.bgp = touched.everything = True
        elif isinstance(ev, rs.NetworkCreated) and not ev.external:
            self.networks[rid] = {"vni": ev.vni, "tenant": ev.tenant}
            touched.everything = True
        elif isinstance(ev, rs.NetworkCreated):
            self.externals[rid] = {"cidr": ev.cidr, "gateway": ev.gateway}
            touched.everything = True
        elif isinstance(ev, rs.RouterCreated):
            self.routers[rid] = {
                "external_network": ev.external_network,
                "external_ip": ev.external_ip,
                "interfaces": {},
                "up": ev.admin_up,
            }
            touched.everything = True
        elif isinstance(ev, rs.RouterAdminStateSet):
            if rid in self.routers:
                self.routers[rid]["up"] = ev.admin_up
            touched.everything = True
        elif isinstance(ev, rs.RouterInterfaceAdded):
            if rid in self.routers:
                self.routers[rid]["interfaces"][ev.subnet] = ev.port
            touched.everything = True
        elif isinstance(ev, rs.RouterInterfaceRemoved):
            if rid in self.routers:
                self.routers[rid]["interfaces"].pop(ev.subnet, None)
            touched.everything = True
        elif isinstance(ev, rs.RouterDeleted):
            self.routers.pop(rid, None)
            touched.everything = True
        elif isinstance(ev, rs.FloatingIpCreated):
            self.fips[rid] = {"address": ev.address, "network": ev.network, "fixed_ip": ""}
        elif isinstance(ev, rs.FloatingIpAssociated):
            if rid in self.fips:
                self.fips[rid].update(port=ev.port, fixed_ip=ev.fixed_ip)
            touched.everything = True
        elif isinstance(ev, rs.FloatingIpDisassociated):
            if rid in self.fips:
                self.fips[rid].update(port="", fixed_ip="")
            touched.everything = True
        elif isinstance(ev, rs.FloatingIpDeleted):
            self.fips.pop(rid, None)
            touched.everything = True
        elif isinstance(ev, rs.NetworkDeleted):
            self.networks.pop(rid, None)
            touched.everything = True
        elif isinstance(ev, rs.SubnetCreated):
            self.subnets[rid] = {
                "network": ev.network,
                "cidr": ev.cidr,
                "gateway": ev.gateway,
                "dns": list(ev.dns),
                "dhcp": ev.dhcp,
            }
            touched.everything = True
        elif isinstance(ev, rs.SubnetDeleted):
            self.subnets.pop(rid, None)
            touched.everything = True
        elif isinstance(ev, rs.PortCreated):
            self.ports[rid] = Port(
                rid,
                ev.tenant,
                ev.network,
                ev.subnet,
                ev.mac,
                ev.ip,
                ev.device,
                ev.device_owner,
                list(ev.security_groups),
                ev.qos_policy,
                cause=(ev.correlation_id, ev.id),
                vm=self.servers.get(ev.device, {}).get("type") == "vm",
            )
            if ev.device:
                self.by_device.setdefault(ev.device, set()).add(rid)
            self._port_changed(rid)
        elif isinstance(ev, rs.PortBound | rs.PortAddressAssigned):
            p = self.ports.get(rid)
            if p is not None:
                p.host, p.bound_at = ev.host, seq
                if isinstance(ev, rs.PortAddressAssigned):
                    p.ip = ev.ip
                self._port_changed(rid)
        elif isinstance(ev, rs.PortUpdated):
            p = self.ports.get(rid)
            if p is not None:
                if p.qos_policy != ev.qos_policy:
                    touched.ports.add(rid)
                p.security_groups, p.qos_policy = list(ev.security_groups), ev.qos_policy
                self._port_changed(rid)
        elif isinstance(ev, rs.PortDeleted):
            p = self.ports.pop(rid, None)
            if p is not None and p.device in self.by_device:
                self.by_device[p.device].discard(rid)
                if not self.by_device[p.device]:
                    del self.by_device[p.device]
            self._port_changed(rid, p)
        elif isinstance(ev, rs.ServerRequested):
            self.servers[rid] = {"type": ev.spec.instance_type, "host": ""}
            self._server_changed(rid)
        elif isinstance(ev, rs.ServerScheduled | rs.ServerBuilding | rs.ServerRunning):
            if rid in self.servers:
                self.servers[rid]["host"] = ev.host
                # A VM's tap is libvirt's until the guest runs: taken
                # earlier, libvirt would lose it while still setting it up.
                self.servers[rid]["running"] = isinstance(ev, rs.ServerRunning)
                self._server_changed(rid)
        elif isinstance(ev, rs.ServerStopped | rs.ServerFailed):
            if rid in self.servers:
                self.servers[rid]["running"] = False
                self._server_changed(rid)
        elif isinstance(ev, HostClaimed):
            if ev.server in self.servers:
                self.servers[ev.server]["host"] = rid
                self._server_changed(ev.server)
        elif isinstance(ev, HostReleased):
            s = self.servers.get(ev.server)
            if s is not None and s["host"] == rid:
                s["host"] = ""
                self._server_changed(ev.server)
        elif isinstance(ev, rs.ServerDeleted):
            self.servers.pop(rid, None)
            self._server_changed(rid)
        elif isinstance(ev, rs.SecurityGroupCreated):
            self.groups[rid] = {}
            touched.rules.add(rid)
        elif isinstance(ev, rs.SecurityGroupRuleAdded):
            rule = {f: getattr(ev, f) for f in ev.payload_fields()}
            self.groups.setdefault(rid, {})[ev.rule] = rule
            touched.rules.add(rid)
        elif isinstance(ev, rs.SecurityGroupRuleRemoved):
            self.groups.get(rid, {}).pop(ev.rule, None)
            touched.rules.add(rid)
        elif isinstance(ev, rs.SecurityGroupDeleted):
            self.groups.pop(rid, None)
            touched.rules.add(rid)
        elif isinstance(ev, rs.QosPolicyCreated):
            self.qos[rid] = ev.max_kbps
            touched.everything = True
        elif isinstance(ev, rs.QosPolicyDeleted):
            self.qos.pop(rid, None)
            touched.everything = True
        elif isinstance(ev, nw.NetworkAgentRegistered) and kind == "network-agent":
            self.vteps[ev.host] = ev.vtep
            if ev.routers:
                self.router_hosts.add(ev.host)
            else:
                self.router_hosts.discard(ev.host)
            touched.bgp = touched.everything = True
            self._replace_all()
        elif isinstance(ev, nw.BlockClaimed) and rid in self.routed:
            self.blocks[ev.block] = (rid, ev.host)
            self.block_subjects[nw.block_subject(rid, ev.block)] = (rid, ev.block)
            touched.bgp = True
        elif isinstance(ev, nw.BlockReleased):
            if self.blocks.get(ev.block, ("", ""))[1] == ev.host:
                del self.blocks[ev.block]
            touched.bgp = True
        elif isinstance(ev, nw.BlockAddresses):
            subject = ev.subject
            self.block_seq[subject] = max(self.block_seq.get(subject, 0), seq)
            self.block_subjects.setdefault(subject, (ev.network, ev.block))
            held = self.allocations.setdefault(subject, {})
            host = self.blocks.get(ev.block, ("", ""))[1]
            for ip, h in ev.released.items():
                if held.get(ip, ("", ""))[1] == h.port:
                    del held[ip]
                mine = self.held.get(h.port)
                if mine is not None:
                    mine.discard((subject, ip))
                    if not mine:
                        del self.held[h.port]
                p = self.ports.get(h.port)
                if p is not None and p.ip == ip:
                    p.ip = ""
                    self._port_changed(h.port)
                touched.ports.add(h.port)
            for ip, h in ev.allocated.items():
                held[ip] = (h.tenant, h.port)
                self.held.setdefault(h.port, set()).add((subject, ip))
                # The block's allocation is what a port's address is; the
                # port's own port.address-assigned follows and says the same.
                p = self.ports.get(h.port)
                if p is not None and host and (p.ip, p.host) != (ip, host):
                    p.ip, p.host = ip, host
                    self._port_changed(h.port)
                touched.ports.add(h.port)

    # -- index upkeep -----------------------------------------------------------------

    def _server_changed(self, server: str) -> None:
        for pid in self.by_device.get(server, ()):
            self._port_changed(pid)

    def _hosts_changed(self, net: str) -> None:
        self.touched.networks.add(net)
        self.bridges_touched.add(net)

    def _replace_all(self) -> None:
        for pid in list(self.ports):
            self._port_changed(pid)

    def _port_changed(self, pid: str, gone: Port | None = None) -> None:
        """Re-index port ``pid`` (``gone``: as it was before it was deleted)."""
        p = self.ports.get(pid)
        self.touched.ports.add(pid)
        was_port = p or gone
        if was_port is not None and (was_port.vm or was_port.device_owner != "compute"):
            # A VM's port (DHCP) or a router's: the rarer paths plan from scratch.
            self.touched.everything = True
        # Where it lives, as far as the bridges' spread is concerned.
        was = self.placed.get(pid, "")
        now = self.port_host(p) if p is not None and p.network in self.networks else ""
        net = was_port.network if was_port is not None else ""
        if was != now:
            counts = self.spread.setdefault(net, {})
            if was:
                counts[was] -= 1
                if not counts[was]:
                    del counts[was]
                    self._hosts_changed(net)
            if now:
                counts[now] = counts.get(now, 0) + 1
                if counts[now] == 1:
                    self._hosts_changed(net)
            if not counts:
                self.spread.pop(net, None)
            if now:
                self.placed[pid] = now
            else:
                self.placed.pop(pid, None)
        if net:
            # Its address and MAC behind its host: every host of the network
            # answers ARP for it and sends its frames to that host's VTEP.
            entry = (now, p.ip, p.mac) if now and p is not None and p.ip else None
            on_net = self.addressed.get(net, {})
            if on_net.get(pid) != entry:
                if entry is None:
                    del on_net[pid]
                    if not on_net:
                        self.addressed.pop(net, None)
                else:
                    self.addressed.setdefault(net, {})[pid] = entry
                self.touched.networks.add(net)
        # Its groups' member addresses.
        groups = set(p.security_groups) if p is not None and p.ip else set()
        for g in self.member_of.get(pid, set()) - groups:
            members = self.members[g]
            del members[pid]
            self.touched.members.add(g)
            if not members:
                del self.members[g]
        for g in groups:
            m = self.members.setdefault(g, {})
            if m.get(pid) != p.ip:  # type: ignore[union-attr]
                m[pid] = p.ip  # type: ignore[union-attr]
                self.touched.members.add(g)
        if groups:
            self.member_of[pid] = groups
        else:
            self.member_of.pop(pid, None)
        if p is not None and p.device:
            # The first port of a server carries its default route.
            self.touched.ports.update(self.by_device.get(p.device, ()))

    # -- questions --------------------------------------------------------------------

    def port_host(self, p: Port) -> str:
        """Where a port lives: its binding, else the host its server is placed on."""
        if p.host:
            return p.host
        if p.device_owner == "compute":
            return self.servers.get(p.device, {}).get("host", "")
        if p.device_owner == "router_interface" and p.device in self.routers:
            return self.router_host
        return ""

    def routed_here(self, p: Port, host: str) -> bool:
        """A routed network's port whose server is placed on ``host``."""
        return (
            p.network in self.routed
            and p.device_owner == "compute"
            and self.servers.get(p.device, {}).get("host", "") == host
        )

    def members_of(self, group: str) -> list[str]:
        return sorted(set(self.members.get(group, {}).values()))


@dataclass(frozen=True)
class PortPlan:
    port: str
    ifname: str  # host side, on the bridge
    bridge: str  # "" for a routed port
    netns: str  # the instance's namespace ("" for a VM's tap)
    peer: str  # the name inside it
    mac: str
    address: str  # ip/prefixlen
    gateway: str
    kbps: int
    zone: int
    vm: bool = False  # a VM's tap (libvirt makes it) instead of a veth
    routed: bool = False  # on a routed network: a /32 route to it, no bridge


@dataclass(frozen=True)
class BridgePlan:
    network: str
    bridge: str
    vxlan: str
    vni: int
    remotes: frozenset[str]
    # The network's ports on other hosts: (ip, MAC, their host's VTEP). The
    # host's bridge answers ARP for them and its VXLAN device sends their
    # frames straight to that VTEP (what Neutron's l2population does), so a
    # new port's first packets never wait on ARP across the overlay.
    neighbours: frozenset[tuple[str, str, str]] = frozenset()
    # The bridge's own MAC, set: one it picks itself follows its ports, and
    # each change flushes its neighbour entries (the kernel's NETDEV_CHANGEADDR).
    mac: str = ""


@dataclass(frozen=True)
class LegPlan:
    """One veth between a bridge (host side) and a router's namespace."""

    ifname: str
    bridge: str
    inner: str
    mac: str
    address: str  # ip/prefixlen inside the router
    zone: int = 0


@dataclass(frozen=True)
class RouterPlan:
    router: str
    netns: str
    legs: tuple[LegPlan, ...]
    external: LegPlan | None
    gateway: str  # the external network's gateway: the router's default route
    extra: tuple[str, ...]  # floating IPs held on the external leg (/32)
    nat: tuple[str, ...]  # iptables-restore lines of the nat table


@dataclass(frozen=True)
class DhcpPlan:
    """One dnsmasq serving the VM ports of some subnets, from their gateway
    address: inside the subnet's router namespace when a router holds the
    gateway, else in a DHCP namespace of the network's own whose legs take
    the (otherwise unused) gateway address. The allocator never hands the
    gateway to a port, so the server needs no address of its own."""

    netns: str
    legs: tuple[LegPlan, ...]  # empty inside a router's namespace
    config: str  # the dnsmasq configuration (pid file and path: the host's)


Chain = tuple[str, str]  # (table, chain)


@dataclass
class HostPlan:
    bridges: dict[str, BridgePlan] = field(default_factory=dict)
    ports: dict[str, PortPlan] = field(default_factory=dict)
    routers: dict[str, RouterPlan] = field(default_factory=dict)
    dhcp: dict[str, DhcpPlan] = field(default_factory=dict)
    externals: set[str] = field(default_factory=set)
    # The security groups: (table, chain) -> its rules, as iptables-restore lines.
    chains: dict[Chain, tuple[str, ...]] = field(default_factory=dict)
    # Remote groups' members: ipset name -> addresses (rules match the set).
    ipsets: dict[str, frozenset[str]] = field(default_factory=dict)
    bgp: BgpPlan | None = None

    @property
    def firewall(self) -> str:
        return render_chains(self.chains)

    def same(self, other: HostPlan) -> bool:
        """Whether ``other`` asks the host for exactly the same."""
        return (
            self.ports == other.ports
            and self.bridges == other.bridges
            and self.chains == other.chains
            and self.ipsets == other.ipsets
            and self.bgp == other.bgp
            and self.routers == other.routers
            and self.dhcp == other.dhcp
            and self.externals == other.externals
        )

    def names(self) -> set[str]:
        out = set(self.ports) | set(self.externals)
        for b in self.bridges.values():
            out |= {b.bridge, b.vxlan}
        for r in self.routers.values():
            out |= {leg.ifname for leg in r.legs}
            if r.external is not None:
                out.add(r.external.ifname)
        for d in self.dhcp.values():
            out |= {leg.ifname for leg in d.legs}
        return out

    def taps(self) -> set[str]:
        """VM taps on this host (libvirt's devices: wired, never removed)."""
        return {name for name, pp in self.ports.items() if pp.vm}


def _vm_port(t: Topology, p: Port) -> bool:
    return p.device_owner == "compute" and t.servers.get(p.device, {}).get("type") == "vm"


def _first_port(t: Topology, p: Port) -> bool:
    """Whether ``p`` is its server's first port (by id): it carries the default route."""
    return p.id == min(t.by_device.get(p.device, {p.id}) | {p.id})


def port_plan(t: Topology, p: Port, host: str, prefix: str) -> PortPlan | None:
    """What ``host`` wires for port ``p`` (None: nothing, or not yet)."""
    if p.device_owner != "compute":
        return None
    if p.network in t.routed:
        if not (t.routed_here(p, host) and p.host == host and p.ip):
            return None  # the address comes from this host's block first
        return PortPlan(
            port=p.id,
            ifname=nw.kernel_name(prefix, "port", p.id),
            bridge="",
            netns=nw.instance_netns(p.device),
            peer=nw.kernel_name(prefix, "peer", p.id),
            mac=p.mac,
            address=f"{p.ip}/32",
            gateway=nw.ROUTED_GATEWAY if _first_port(t, p) else "",
            kbps=t.qos.get(p.qos_policy, 0),
            zone=0,
            routed=True,
        )
    net = t.networks.get(p.network)
    if net is None or not net["vni"] or t.port_host(p) != host:
        return None
    vm = _vm_port(t, p)
    if vm and not t.servers[p.device].get("running"):
        return None
    sub = t.subnets.get(p.subnet)
    if sub is None or not p.ip:
        return None
    plen = ipaddress.ip_network(sub["cidr"]).prefixlen
    return PortPlan(
        port=p.id,
        ifname=nw.vm_tap(p.id) if vm else nw.kernel_name(prefix, "port", p.id),
        bridge=nw.kernel_name(prefix, "bridge", p.network),
        # A VM configures itself by DHCP: the agent only wires its tap.
        netns="" if vm else nw.instance_netns(p.device),
        peer="" if vm else nw.kernel_name(prefix, "peer", p.id),
        mac=p.mac,
        address=f"{p.ip}/{plen}",
        gateway=sub["gateway"] if _first_port(t, p) and not vm else "",
        kbps=t.qos.get(p.qos_policy, 0),
        zone=1 + net["vni"] % 65535,
        vm=vm,
    )


def _dhcp_networks(t: Topology) -> dict[str, list[Port]]:
    """Subnets with VM ports (DHCP serves them from the router host) -> those
    ports; a subnet made without DHCP has no server (its guests are set by hand)."""
    out: dict[str, list[Port]] = {}
    for p in t.ports.values():
        if p.ip and p.subnet in t.subnets and p.network in t.networks and _vm_port(t, p):
            if t.port_host(p) and t.subnets[p.subnet]["dhcp"]:
                out.setdefault(p.subnet, []).append(p)
    return out


def bridge_plan(
    t: Topology, network: str, host: str, prefix: str, dhcp_nets: frozenset[str]
) -> BridgePlan | None:
    """The network's bridge on ``host``: while a port of it lives there (or
    it is the router host and serves the network's DHCP)."""
    net = t.networks.get(network)
    if net is None or not net["vni"]:
        return None  # (a network from before segments: nothing to carry it)
    spread = set(t.spread.get(network, {}))
    if t.router_host and network in dhcp_nets:
        spread.add(t.router_host)  # DHCP lives on the router host
    if host not in spread:
        return None
    return BridgePlan(
        network,
        nw.kernel_name(prefix, "bridge", network),
        nw.kernel_name(prefix, "vxlan", network),
        net["vni"],
        frozenset(t.vteps[h] for h in spread if h != host and h in t.vteps),
        frozenset(
            (ip, mac, t.vteps[h])
            for h, ip, mac in t.addressed.get(network, {}).values()
            if h != host and h in t.vteps
        ),
        nw.bridge_mac(network),
    )


def host_bgp(t: Topology, host: str, cfg: BgpConfig) -> BgpPlan | None:
    """This host's BIRD while a routed network exists (and the host has an address)."""
    if not t.routed or host not in t.vteps:
        return None
    mine = [b for b, (_, h) in t.blocks.items() if h == host]
    return bgp_plan(host, t.vteps, mine, cfg)


def plan(t: Topology, host: str, prefix: str, bgp: BgpConfig | None = None) -> HostPlan:
    """The kernel objects ``host`` needs: a bridge and VXLAN device per
    network with a port here, a veth per container port or the tap of a
    VM's port, tc per QoS; for a routed network, a veth and a /32 route per
    port and BIRD; on the router host, routers and DHCP."""
    out = HostPlan()
    dhcp = _dhcp_networks(t)
    dhcp_nets = frozenset(t.subnets[s]["network"] for s in dhcp)
    for net in sorted(t.networks):
        b = bridge_plan(t, net, host, prefix, dhcp_nets)
        if b is not None:
            out.bridges[b.bridge] = b
    for p in t.ports.values():
        pp = port_plan(t, p, host, prefix)
        if pp is not None:
            out.ports[pp.ifname] = pp
    if host == t.router_host:
        for rid, r in sorted(t.routers.items()):
            if not r["up"]:
                continue  # administratively down: no namespace, nothing routed
            rp = _router(t, rid, r, out, prefix)
            if rp is not None:
                out.routers[rp.netns] = rp
                if rp.external is not None:
                    out.externals.add(rp.external.bridge)
        out.dhcp = _dhcp(t, dhcp, out, prefix)
    out.bgp = host_bgp(t, host, bgp or BgpConfig())
    out.chains, out.ipsets = firewall_chains(t, out, prefix)
    return out


class Planner:
    """One host's plan, kept current from what each batch of events touched."""

    def __init__(self, host: str, prefix: str, bgp: BgpConfig | None = None) -> None:
        self.host, self.prefix, self.bgp = host, prefix, bgp or BgpConfig()
        self.hp: HostPlan | None = None
        self._dhcp_nets: frozenset[str] = frozenset()
        self.full_plans = 0

    def full(self, t: Topology) -> HostPlan:
        t.take()
        self.hp = plan(t, self.host, self.prefix, self.bgp)
        self._dhcp_nets = frozenset(t.subnets[s]["network"] for s in _dhcp_networks(t))
        self.full_plans += 1
        return self.hp

    def update(self, t: Topology, touched: Touched | None = None) -> HostPlan:
        """The plan after the events folded since the last call (``touched``:
        what they changed, if the caller took it already); a new object
        when anything in it changed, so the caller can compare."""
        if touched is None:
            touched = t.take()
        if self.hp is None or touched.everything:
            t.touched = touched  # (full() takes it again)
            return self.full(t)
        if not touched:
            return self.hp
        hp, host, prefix = self.hp, self.host, self.prefix
        new = HostPlan(
            dict(hp.bridges),
            dict(hp.ports),
            hp.routers,
            hp.dhcp,
            hp.externals,
            dict(hp.chains),
            dict(hp.ipsets),
        )
        new.bgp = host_bgp(t, host, self.bgp) if touched.bgp else hp.bgp
        changed_ports: set[str] = set()
        local: set[str] = set()  # touched ports wired here (their groups may have changed)
        for pid in touched.ports:
            p = t.ports.get(pid)
            pp = port_plan(t, p, host, prefix) if p is not None else None
            name = pp.ifname if pp is not None else _name_of(hp, pid, prefix)
            old = new.ports.get(name)
            if pp != old:
                if pp is None:
                    del new.ports[name]
                else:
                    new.ports[name] = pp
                changed_ports.add(name)
            elif pp is not None:
                local.add(name)
        for net in touched.networks:
            bname = nw.kernel_name(prefix, "bridge", net)
            b = bridge_plan(t, net, host, prefix, self._dhcp_nets)
            if b is None:
                new.bridges.pop(bname, None)
            else:
                new.bridges[bname] = b
        _update_chains(t, new, hp, touched, changed_ports, local, prefix)
        if new.same(hp):
            return hp  # (the same object: the caller need not look at the host)
        # What did not change stays the same object: the kernel's pass skips
        # what it has applied already by identity.
        for name in ("bridges", "ports", "chains", "ipsets"):
            if getattr(new, name) == getattr(hp, name):
                setattr(new, name, getattr(hp, name))
        self.hp = new
        return new

    def bridges(self, t: Topology, networks: Iterable[str]) -> dict[str, BridgePlan]:
        """The bridges of ``networks`` as the log has them now, of those in
        the host's plan (for a pass already running: ``Host.bridges_soon``);
        a network new to the host waits for the next plan."""
        if self.hp is None:
            return {}
        out = {}
        for net in networks:
            name = nw.kernel_name(self.prefix, "bridge", net)
            if name in self.hp.bridges:
                b = bridge_plan(t, net, self.host, self.prefix, self._dhcp_nets)
                if b is not None:
                    out[name] = b
        return out


def _dhcp(
    t: Topology, wanted: dict[str, list[Port]], hp: HostPlan, prefix: str
) -> dict[str, DhcpPlan]:
    """dnsmasq per namespace: a routed subnet's in its router's namespace
    (on the leg holding the gateway), the others' in a DHCP namespace per
    network with a leg per subnet holding the gateway."""
    routed: dict[str, tuple[str, str]] = {}  # subnet -> (router netns, leg inside)
    for rp in hp.routers.values():
        r = t.routers.get(rp.router, {})
        for subnet, port_id in r.get("interfaces", {}).items():
            inner = nw.kernel_name(prefix, "gw", port_id)
            if any(leg.inner == inner for leg in rp.legs):
                routed[subnet] = (rp.netns, inner)
    served: dict[str, list[tuple[str, str]]] = {}  # netns -> (subnet, interface)
    legs: dict[str, list[LegPlan]] = {}
    for subnet in sorted(wanted):
        sub = t.subnets[subnet]
        bridge = nw.kernel_name(prefix, "bridge", sub["network"])
        if bridge not in hp.bridges:
            continue
        if subnet in routed:
            ns, ifname = routed[subnet]
        else:
            ns = nw.kernel_name(prefix, "dhcp", sub["network"])
            ifname = nw.kernel_name(prefix, "dgw", subnet)
            plen = ipaddress.ip_network(sub["cidr"]).prefixlen
            legs.setdefault(ns, []).append(
                LegPlan(
                    nw.kernel_name(prefix, "dleg", subnet),
                    bridge,
                    ifname,
                    "",
                    f"{sub['gateway']}/{plen}",
                    zone=1 + hp.bridges[bridge].vni % 65535,
                )
            )
        served.setdefault(ns, []).append((subnet, ifname))
    out: dict[str, DhcpPlan] = {}
    for ns, subnets in sorted(served.items()):
        lines = [
            "# the Stratus network agent's: rewritten on every change",
            "port=0",  # DHCP only, no DNS
            "bind-interfaces",
            "except-interface=lo",
            "no-resolv",
            "no-hosts",
            "leasefile-ro",
            "dhcp-authoritative",
        ]
        lines += [f"interface={ifname}" for _, ifname in subnets]
        for i, (subnet, _) in enumerate(subnets):
            sub = t.subnets[subnet]
            netw = ipaddress.ip_network(sub["cidr"])
            tag = f"s{i}"
            lines.append(f"dhcp-range=set:{tag},{netw.network_address},static,{netw.netmask},12h")
            if subnet in routed:
                lines.append(f"dhcp-option=tag:{tag},option:router,{sub['gateway']}")
            else:
                lines.append(f"dhcp-option=tag:{tag},option:router")  # no way out
            # VXLAN's 50 bytes come off the guest's frames.
            lines.append(f"dhcp-option-force=tag:{tag},option:mtu,{VXLAN_MTU}")
            if sub.get("dns"):
                lines.append(f"dhcp-option=tag:{tag},option:dns-server,{','.join(sub['dns'])}")
            for p in sorted(wanted[subnet], key=lambda p: p.ip):
                lines.append(f"dhcp-host={p.mac},{p.ip}")
        out[ns] = DhcpPlan(ns, tuple(legs.get(ns, ())), "\n".join([*lines, ""]))
    return out


def _router(
    t: Topology, rid: str, r: dict[str, Any], hp: HostPlan, prefix: str
) -> RouterPlan | None:
    legs = []
    snat_sources = []
    for subnet, port_id in sorted(r["interfaces"].items()):
        port, sub = t.ports.get(port_id), t.subnets.get(subnet)
        if port is None or sub is None:
            continue
        bridge = nw.kernel_name(prefix, "bridge", port.network)
        if bridge not in hp.bridges:
            continue
        plen = ipaddress.ip_network(sub["cidr"]).prefixlen
        legs.append(
            LegPlan(
                nw.kernel_name(prefix, "leg", port_id),
                bridge,
                nw.kernel_name(prefix, "gw", port_id),
                port.mac,
                f"{port.ip}/{plen}",
                zone=1 + hp.bridges[bridge].vni % 65535,
            )
        )
        snat_sources.append(sub["cidr"])
    ext = t.externals.get(r["external_network"])
    external, gateway, extra, nat = None, "", [], []
    if ext is not None and r["external_ip"]:
        plen = ipaddress.ip_network(ext["cidr"]).prefixlen
        xname = nw.kernel_name(prefix, "xgw", rid)
        external = LegPlan(
            nw.kernel_name(prefix, "xleg", rid),
            nw.kernel_name(prefix, "ext", r["external_network"]),
            xname,
            "",
            f"{r['external_ip']}/{plen}",
        )
        gateway = ext["gateway"]
        # A floating IP is this router's when its port is on one of the
        # router's networks. Not when its fixed address falls in one of the
        # router's CIDRs: tenants' CIDRs overlap, and two routers holding
        # one address answer ARP for it in turn (and DNAT it into the wrong
        # tenant's network).
        mine = {t.ports[p].network for p in r["interfaces"].values() if p in t.ports}
        for _, f in sorted(t.fips.items()):
            fixed, port = f.get("fixed_ip"), t.ports.get(f.get("port") or "")
            if f["network"] != r["external_network"] or not fixed or port is None:
                continue
            if port.network not in mine:
                continue
            extra.append(f["address"])
            nat.append(f"-A PREROUTING -d {f['address']}/32 -j DNAT --to-destination {fixed}")
            nat.append(
                f"-A POSTROUTING -s {fixed}/32 -o {xname} -j SNAT --to-source {f['address']}"
            )
        for cidr in snat_sources:
            nat.append(
                f"-A POSTROUTING -s {cidr} -o {xname} -j SNAT --to-source {r['external_ip']}"
            )
    return RouterPlan(
        rid,
        nw.kernel_name(prefix, "router", rid),
        tuple(legs),
        external,
        gateway,
        tuple(extra),
        tuple(nat),
    )


# -- security groups ---------------------------------------------------------------------


def _match(rule: dict[str, Any]) -> list[str]:
    """iptables match arguments of one rule, the remote side by CIDR only."""
    out: list[str] = []
    cidr = rule["remote_cidr"]
    if cidr and cidr != "0.0.0.0/0":
        out += ["-s" if rule["direction"] == "ingress" else "-d", cidr]
    if rule["protocol"] != "any":
        proto = rule["protocol"]
        out += ["-p", proto]
        if proto in ("tcp", "udp") and rule["port_min"]:
            lo, hi = rule["port_min"], rule["port_max"] or rule["port_min"]
            # Written as iptables-save prints it, so probing can compare text.
            out += ["-m", proto, "--dport", f"{lo}:{hi}" if hi != lo else str(lo)]
    return out


def _top(prefix: str) -> str:
    return nw.kernel_name(prefix, "chain", "forward")


def _outs(prefix: str) -> str:
    return nw.kernel_name(prefix, "chain", "outs")


def _ins(prefix: str) -> str:
    return nw.kernel_name(prefix, "chain", "ins")


def _raw(prefix: str) -> str:
    return nw.kernel_name(prefix, "chain", "raw")


def _nodes(prefix: str) -> str:
    return nw.kernel_name(prefix, "chain", "nodes")


def member_sets(t: Topology, groups: Iterable[str], prefix: str) -> dict[str, frozenset[str]]:
    """The member sets of ``groups`` as the log has them (set name -> addresses)."""
    return {member_set(prefix, g): frozenset(t.members_of(g)) for g in groups}


def member_set(prefix: str, group: str) -> str:
    """The ipset of a security group's member addresses."""
    return nw.kernel_name(prefix, "chain", f"{group}/in")


def port_chains(
    t: Topology, pp: PortPlan, prefix: str
) -> tuple[dict[Chain, tuple[str, ...]], set[str]]:
    """The port's two chains, and the groups whose member sets they match."""
    port = t.ports[pp.port]
    # Chains carry the prefix (a VM tap is named without it): ours to probe.
    base = nw.kernel_name(prefix, "port", pp.port)
    cin, cout = f"{base}-i", f"{base}-o"
    lin: list[str] = []
    lout: list[str] = []
    sets: set[str] = set()
    if pp.routed:
        # Kubernetes' network model: every node reaches every pod (its
        # health checks, node -> pod traffic), without NAT.
        lin.append(f"-A {cin} -j {_nodes(prefix)}")
    if pp.vm:
        # DHCP (Neutron's allowances): the guest's discover before it has
        # an address and its renewals; the server's answers (from the
        # gateway address, see DhcpPlan).
        sub = t.subnets.get(port.subnet, {})
        lout.append(
            f"-A {cout} -s 0.0.0.0/32 -d 255.255.255.255/32 -p udp -m udp "
            "--sport 68 --dport 67 -j RETURN"
        )
        if sub.get("gateway"):
            lin.append(
                f"-A {cin} -s {sub['gateway']}/32 -p udp -m udp --sport 67 --dport 68 -j ACCEPT"
            )
    # No spoofing: the instance speaks only from its own address.
    lout.append(f"-A {cout} ! -s {port.ip}/32 -j DROP")
    if pp.vm:
        lout.append(f"-A {cout} -p udp -m udp --sport 68 --dport 67 -j RETURN")
    for g in sorted(port.security_groups):
        for _, rule in sorted(t.groups.get(g, {}).items()):
            if ":" in rule["remote_cidr"]:
                continue  # an IPv6 rule: these chains are iptables' (IPv4) alone
            ingress = rule["direction"] == "ingress"
            lines, chain, verdict = (lin, cin, "ACCEPT") if ingress else (lout, cout, "RETURN")
            match = _match(rule)
            if rule["remote_group"]:
                # Members are one set per group, matched by every rule that
                # names it: a new member is one set entry, no chain changes.
                sets.add(rule["remote_group"])
                side = "src" if ingress else "dst"
                match += [
                    "-m",
                    "set",
                    "--match-set",
                    member_set(prefix, rule["remote_group"]),
                    side,
                ]
            lines.append(" ".join([f"-A {chain}", *match, "-j", verdict]))
    lin.append(f"-A {cin} -j DROP")
    lout.append(f"-A {cout} -j DROP")
    return {("filter", cin): tuple(lin), ("filter", cout): tuple(lout)}, sets


def _top_chains(hp: HostPlan, prefix: str) -> dict[Chain, tuple[str, ...]]:
    """The FORWARD hook's chain: replies, then every port's egress chain
    (``outs``), then every port's ingress chain (``ins``): a port's egress
    is checked before another's ingress can accept. Within ``outs`` and
    ``ins`` order does not matter, so a new port is two appended rules
    there, not the chains written again (see ``UNORDERED``)."""
    top, outs, ins = _top(prefix), _outs(prefix), _ins(prefix)
    lo, li = [], []
    for name, pp in sorted(hp.ports.items()):
        base = nw.kernel_name(prefix, "port", pp.port)
        if pp.routed:
            lo.append(f"-A {outs} -i {name} -j {base}-o")
            li.append(f"-A {ins} -o {name} -j {base}-i")
        else:
            lo.append(f"-A {outs} -m physdev --physdev-in {name} --physdev-is-bridged -j {base}-o")
            li.append(f"-A {ins} -m physdev --physdev-out {name} --physdev-is-bridged -j {base}-i")
    return {
        ("filter", top): (
            f"-A {top} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
            f"-A {top} -j {outs}",
            f"-A {top} -j {ins}",
        ),
        ("filter", outs): tuple(lo),
        ("filter", ins): tuple(li),
    }


def unordered(prefix: str) -> set[Chain]:
    """Chains whose rules exclude each other (one per port or network): a
    change to them may be appended and deleted rule by rule."""
    return {
        ("filter", _outs(prefix)),
        ("filter", _ins(prefix)),
        ("raw", _raw(prefix)),
        ("filter", _nodes(prefix)),
    }


def _raw_lines(hp: HostPlan, prefix: str) -> tuple[str, ...]:
    raw = _raw(prefix)
    lines = []
    for b in sorted(hp.bridges.values(), key=lambda b: b.bridge):
        zone = 1 + b.vni % 65535
        lines.append(f"-A {raw} -m physdev --physdev-in {b.vxlan} -j CT --zone {zone}")
    for r in sorted(hp.routers.values(), key=lambda r: r.netns):
        for leg in r.legs:
            lines.append(f"-A {raw} -m physdev --physdev-in {leg.ifname} -j CT --zone {leg.zone}")
    for d in sorted(hp.dhcp.values(), key=lambda d: d.netns):
        for leg in d.legs:
            lines.append(f"-A {raw} -m physdev --physdev-in {leg.ifname} -j CT --zone {leg.zone}")
    for name, pp in sorted(hp.ports.items()):
        if not pp.routed:  # (routed addresses are unique: the default zone)
            lines.append(f"-A {raw} -m physdev --physdev-in {name} -j CT --zone {pp.zone}")
    return tuple(lines)


def _node_lines(t: Topology, hp: HostPlan, prefix: str) -> tuple[str, ...] | None:
    if not any(pp.routed for pp in hp.ports.values()):
        return None
    chain = _nodes(prefix)
    return tuple(f"-A {chain} -s {a}/32 -j ACCEPT" for _, a in sorted(t.vteps.items()))


def firewall_chains(
    t: Topology, hp: HostPlan, prefix: str
) -> tuple[dict[Chain, tuple[str, ...]], dict[str, frozenset[str]]]:
    """The host's security groups as chains for ``iptables-restore
    --noflush``: conntrack zones per network in ``raw``, a chain per port
    direction in ``filter``. Ingress is denied unless a rule allows it;
    egress too (the default group allows all egress). Also the member sets
    the rules match."""
    out: dict[Chain, tuple[str, ...]] = {("raw", _raw(prefix)): _raw_lines(hp, prefix)}
    out.update(_top_chains(hp, prefix))
    groups: set[str] = set()
    for pp in hp.ports.values():
        chains, g = port_chains(t, pp, prefix)
        out.update(chains)
        groups |= g
    nodes = _node_lines(t, hp, prefix)
    if nodes is not None:
        out[("filter", _nodes(prefix))] = nodes
    return out, {member_set(prefix, g): frozenset(t.members_of(g)) for g in groups}


def _update_chains(
    t: Topology,
    new: HostPlan,
    old: HostPlan,
    touched: Touched,
    changed_ports: set[str],
    local: set[str],
    prefix: str,
) -> None:
    """Work out again what the changes can reach: the chains of changed
    ports and of ports in a group whose rules changed, the member sets of
    groups whose members changed, the top and raw chains when ports or
    bridges came or went."""
    redo = changed_ports | local
    if touched.rules:
        for name, pp in new.ports.items():
            if set(t.ports[pp.port].security_groups) & touched.rules:
                redo.add(name)
    chains = new.chains
    for name in redo:
        pp = old.ports.get(name)
        if pp is not None:
            base = nw.kernel_name(prefix, "port", pp.port)
            chains.pop(("filter", f"{base}-i"), None)
            chains.pop(("filter", f"{base}-o"), None)
        pp = new.ports.get(name)
        if pp is not None:
            chains.update(port_chains(t, pp, prefix)[0])
    if redo:
        # Which groups' sets the ports match (their rules or ports changed).
        wanted: set[str] = set()
        for pp in new.ports.values():
            wanted |= _remote_groups(t, t.ports[pp.port].security_groups)
        names = {member_set(prefix, g): g for g in wanted}
        for name in set(new.ipsets) - set(names):
            del new.ipsets[name]
        for name, g in names.items():
            if name not in new.ipsets:
                new.ipsets[name] = frozenset(t.members_of(g))
    for g in touched.members:
        name = member_set(prefix, g)
        if name in new.ipsets:
            new.ipsets[name] = frozenset(t.members_of(g))
    if changed_ports or new.bridges != old.bridges:
        chains[("raw", _raw(prefix))] = _raw_lines(new, prefix)
    if changed_ports:
        chains.update(_top_chains(new, prefix))
    if changed_ports or touched.everything or touched.bgp:
        nodes = _node_lines(t, new, prefix)
        if nodes is None:
            chains.pop(("filter", _nodes(prefix)), None)
        else:
            chains[("filter", _nodes(prefix))] = nodes


def _name_of(hp: HostPlan, pid: str, prefix: str) -> str:
    """The link name port ``pid`` had in ``hp`` (a veth's, or a VM's tap)."""
    name = nw.kernel_name(prefix, "port", pid)
    return name if name in hp.ports else nw.vm_tap(pid)


def _remote_groups(t: Topology, groups: Iterable[str]) -> set[str]:
    return {
        r["remote_group"] for g in groups for r in t.groups.get(g, {}).values() if r["remote_group"]
    }


def render_chains(chains: dict[Chain, tuple[str, ...]], only: Iterable[Chain] | None = None) -> str:
    """An ``iptables-restore --noflush`` file declaring (so flushing) and
    filling ``only`` those chains (default: all)."""
    keys = sorted(chains if only is None else only)
    lines: list[str] = []
    for table in ("raw", "filter"):
        mine = [k for k in keys if k[0] == table]
        if not mine:
            continue
        lines.append(f"*{table}")
        lines += [f":{c} - [0:0]" for _, c in mine]
        for k in mine:
            lines += chains[k]
        lines.append("COMMIT")
    return "\n".join([*lines, ""])
