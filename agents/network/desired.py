"""What a host's data plane should be, folded from events alone.

``Topology`` is the cloud's networking as the log says it is (every
tenant's networks, ports, security groups, QoS policies, routers and the
agents' VTEPs); ``plan(topology, host, prefix)`` is the part one host must
realise, as kernel object names and their settings. Both are pure, so a
restart, a redelivered event or a replay gives the same plan.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any

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
    host: str = ""  # from port.bound
    bound_at: int = 0
    cause: tuple[str, str] = ("", "")  # correlation and causation of port.created


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
    seq: int = 0

    @property
    def router_host(self) -> str:
        return min(self.router_hosts) if self.router_hosts else ""

    def apply(self, seq: int, ev: Event) -> None:
        """Fold one event; events this agent has no use for are ignored."""
        self.seq = max(self.seq, seq)
        kind, rid = ev.aggregate.kind, ev.aggregate.id
        if isinstance(ev, rs.NetworkCreated) and not ev.external:
            self.networks[rid] = {"vni": ev.vni, "tenant": ev.tenant}
        elif isinstance(ev, rs.NetworkCreated):
            self.externals[rid] = {"cidr": ev.cidr, "gateway": ev.gateway}
        elif isinstance(ev, rs.RouterCreated):
            self.routers[rid] = {
                "external_network": ev.external_network,
                "external_ip": ev.external_ip,
                "interfaces": {},
                "up": ev.admin_up,
            }
        elif isinstance(ev, rs.RouterAdminStateSet):
            if rid in self.routers:
                self.routers[rid]["up"] = ev.admin_up
        elif isinstance(ev, rs.RouterInterfaceAdded):
            if rid in self.routers:
                self.routers[rid]["interfaces"][ev.subnet] = ev.port
        elif isinstance(ev, rs.RouterInterfaceRemoved):
            if rid in self.routers:
                self.routers[rid]["interfaces"].pop(ev.subnet, None)
        elif isinstance(ev, rs.RouterDeleted):
            self.routers.pop(rid, None)
        elif isinstance(ev, rs.FloatingIpCreated):
            self.fips[rid] = {"address": ev.address, "network": ev.network, "fixed_ip": ""}
        elif isinstance(ev, rs.FloatingIpAssociated):
            if rid in self.fips:
                self.fips[rid].update(port=ev.port, fixed_ip=ev.fixed_ip)
        elif isinstance(ev, rs.FloatingIpDisassociated):
            if rid in self.fips:
                self.fips[rid].update(port="", fixed_ip="")
        elif isinstance(ev, rs.FloatingIpDeleted):
            self.fips.pop(rid, None)
        elif isinstance(ev, rs.NetworkDeleted):
            self.networks.pop(rid, None)
        elif isinstance(ev, rs.SubnetCreated):
            self.subnets[rid] = {
                "network": ev.network,
                "cidr": ev.cidr,
                "gateway": ev.gateway,
                "dns": list(ev.dns),
                "dhcp": ev.dhcp,
            }
        elif isinstance(ev, rs.SubnetDeleted):
            self.subnets.pop(rid, None)
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
            )
        elif isinstance(ev, rs.PortBound):
            p = self.ports.get(rid)
            if p is not None:
                p.host, p.bound_at = ev.host, seq
        elif isinstance(ev, rs.PortUpdated):
            p = self.ports.get(rid)
            if p is not None:
                p.security_groups, p.qos_policy = list(ev.security_groups), ev.qos_policy
        elif isinstance(ev, rs.PortDeleted):
            self.ports.pop(rid, None)
        elif isinstance(ev, rs.ServerRequested):
            self.servers[rid] = {"type": ev.instance_type, "host": ""}
        elif isinstance(ev, rs.ServerScheduled | rs.ServerBuilding | rs.ServerRunning):
            if rid in self.servers:
                self.servers[rid]["host"] = ev.host
                # A VM's tap is libvirt's until the guest runs: taken
                # earlier, libvirt would lose it while still setting it up.
                self.servers[rid]["running"] = isinstance(ev, rs.ServerRunning)
        elif isinstance(ev, rs.ServerStopped | rs.ServerFailed):
            if rid in self.servers:
                self.servers[rid]["running"] = False
        elif isinstance(ev, HostClaimed):
            if ev.server in self.servers:
                self.servers[ev.server]["host"] = rid
        elif isinstance(ev, HostReleased):
            s = self.servers.get(ev.server)
            if s is not None and s["host"] == rid:
                s["host"] = ""
        elif isinstance(ev, rs.ServerDeleted):
            self.servers.pop(rid, None)
        elif isinstance(ev, rs.SecurityGroupCreated):
            self.groups[rid] = {}
        elif isinstance(ev, rs.SecurityGroupRuleAdded):
            rule = {f: getattr(ev, f) for f in ev.payload_fields()}
            self.groups.setdefault(rid, {})[ev.rule] = rule
        elif isinstance(ev, rs.SecurityGroupRuleRemoved):
            self.groups.get(rid, {}).pop(ev.rule, None)
        elif isinstance(ev, rs.SecurityGroupDeleted):
            self.groups.pop(rid, None)
        elif isinstance(ev, rs.QosPolicyCreated):
            self.qos[rid] = ev.max_kbps
        elif isinstance(ev, rs.QosPolicyDeleted):
            self.qos.pop(rid, None)
        elif isinstance(ev, nw.NetworkAgentRegistered) and kind == "network-agent":
            self.vteps[ev.host] = ev.vtep
            if ev.routers:
                self.router_hosts.add(ev.host)
            else:
                self.router_hosts.discard(ev.host)

    def port_host(self, p: Port) -> str:
        """Where a port lives: its binding, else the host its server is placed on."""
        if p.host:
            return p.host
        if p.device_owner == "compute":
            return self.servers.get(p.device, {}).get("host", "")
        if p.device_owner == "router_interface" and p.device in self.routers:
            return self.router_host
        return ""


@dataclass(frozen=True)
class PortPlan:
    port: str
    ifname: str  # host side, on the bridge
    bridge: str
    netns: str  # the instance's namespace ("" for a VM's tap)
    peer: str  # the name inside it
    mac: str
    address: str  # ip/prefixlen
    gateway: str
    kbps: int
    zone: int
    vm: bool = False  # a VM's tap (libvirt makes it) instead of a veth


@dataclass(frozen=True)
class BridgePlan:
    network: str
    bridge: str
    vxlan: str
    vni: int
    remotes: frozenset[str]


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


@dataclass
class HostPlan:
    bridges: dict[str, BridgePlan] = field(default_factory=dict)
    ports: dict[str, PortPlan] = field(default_factory=dict)
    routers: dict[str, RouterPlan] = field(default_factory=dict)
    dhcp: dict[str, DhcpPlan] = field(default_factory=dict)
    externals: set[str] = field(default_factory=set)
    firewall: str = ""

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


def plan(t: Topology, host: str, prefix: str) -> HostPlan:
    """The kernel objects ``host`` needs: a bridge and VXLAN device per
    network with a port here, a veth per container port or the tap of a
    VM's port, tc per QoS; on the router host, routers and DHCP."""
    out = HostPlan()
    here: dict[str, list[Port]] = {}
    spread: dict[str, set[str]] = {}
    dhcp: dict[str, list[Port]] = {}  # subnet -> its VM ports
    for p in t.ports.values():
        h = t.port_host(p)
        if not h or p.network not in t.networks:
            continue
        spread.setdefault(p.network, set()).add(h)
        if h == host:
            here.setdefault(p.network, []).append(p)
        if p.ip and p.subnet in t.subnets and _vm_port(t, p) and t.subnets[p.subnet]["dhcp"]:
            dhcp.setdefault(p.subnet, []).append(p)
    if t.router_host:
        # DHCP lives on the router host: its bridge must be there and known.
        for subnet in dhcp:
            net = t.subnets[subnet]["network"]
            spread.setdefault(net, set()).add(t.router_host)
            if host == t.router_host:
                here.setdefault(net, [])
    firsts: dict[str, str] = {}
    for p in t.ports.values():
        if p.device and (p.device not in firsts or p.id < firsts[p.device]):
            firsts[p.device] = p.id
    for net, ports in sorted(here.items()):
        vni = t.networks[net]["vni"]
        if not vni:
            continue  # a network from before segments: nothing to carry it
        remotes = frozenset(t.vteps[h] for h in spread.get(net, ()) if h != host and h in t.vteps)
        b = BridgePlan(
            net,
            nw.kernel_name(prefix, "bridge", net),
            nw.kernel_name(prefix, "vxlan", net),
            vni,
            remotes,
        )
        out.bridges[b.bridge] = b
        # The first port of a server (by id) carries its default route.
        for p in sorted(ports, key=lambda p: p.id):
            if p.device_owner != "compute":
                continue
            vm = _vm_port(t, p)
            if vm and not t.servers[p.device].get("running"):
                continue
            sub = t.subnets.get(p.subnet)
            if sub is None or not p.ip:
                continue
            netw = ipaddress.ip_network(sub["cidr"])
            first = firsts.get(p.device, p.id)
            name = nw.vm_tap(p.id) if vm else nw.kernel_name(prefix, "port", p.id)
            out.ports[name] = PortPlan(
                port=p.id,
                ifname=name,
                bridge=b.bridge,
                # A VM configures itself by DHCP: the agent only wires its tap.
                netns="" if vm else nw.instance_netns(p.device),
                peer="" if vm else nw.kernel_name(prefix, "peer", p.id),
                mac=p.mac,
                address=f"{p.ip}/{netw.prefixlen}",
                gateway=sub["gateway"] if first == p.id and not vm else "",
                kbps=t.qos.get(p.qos_policy, 0),
                zone=1 + vni % 65535,
                vm=vm,
            )
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
    out.firewall = firewall_rules(t, out, prefix)
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


def _members(t: Topology, group: str) -> list[str]:
    return sorted({p.ip for p in t.ports.values() if group in p.security_groups and p.ip})


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


def firewall_rules(t: Topology, hp: HostPlan, prefix: str) -> str:
    """The host's security groups as an ``iptables-restore --noflush`` file:
    conntrack zones per network in ``raw``, a chain per port direction in
    ``filter``. Ingress is denied unless a rule allows it; egress too (the
    default group allows all egress)."""
    top = nw.kernel_name(prefix, "chain", "forward")
    raw = nw.kernel_name(prefix, "chain", "raw")
    raw_lines = [f":{raw} - [0:0]"]
    flt = [f":{top} - [0:0]"]
    body: list[str] = [f"-A {top} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"]
    jumps_out: list[str] = []
    jumps_in: list[str] = []
    member_chains: dict[tuple[str, bool], str] = {}
    for b in sorted(hp.bridges.values(), key=lambda b: b.bridge):
        zone = 1 + b.vni % 65535
        raw_lines.append(f"-A {raw} -m physdev --physdev-in {b.vxlan} -j CT --zone {zone}")
    for r in sorted(hp.routers.values(), key=lambda r: r.netns):
        for leg in r.legs:
            raw_lines.append(
                f"-A {raw} -m physdev --physdev-in {leg.ifname} -j CT --zone {leg.zone}"
            )
    for d in sorted(hp.dhcp.values(), key=lambda d: d.netns):
        for leg in d.legs:
            raw_lines.append(
                f"-A {raw} -m physdev --physdev-in {leg.ifname} -j CT --zone {leg.zone}"
            )
    for name, pp in sorted(hp.ports.items()):
        port = t.ports[pp.port]
        raw_lines.append(f"-A {raw} -m physdev --physdev-in {name} -j CT --zone {pp.zone}")
        # Chains carry the prefix (a VM tap is named without it): ours to probe.
        base = nw.kernel_name(prefix, "port", pp.port)
        cin, cout = f"{base}-i", f"{base}-o"
        flt += [f":{cin} - [0:0]", f":{cout} - [0:0]"]
        jumps_out.append(f"-A {top} -m physdev --physdev-in {name} --physdev-is-bridged -j {cout}")
        jumps_in.append(f"-A {top} -m physdev --physdev-out {name} --physdev-is-bridged -j {cin}")
        if pp.vm:
            # DHCP (Neutron's allowances): the guest's discover before it has
            # an address and its renewals; the server's answers (from the
            # gateway address, see DhcpPlan).
            sub = t.subnets.get(port.subnet, {})
            body.append(
                f"-A {cout} -s 0.0.0.0/32 -d 255.255.255.255/32 -p udp -m udp "
                "--sport 68 --dport 67 -j RETURN"
            )
            if sub.get("gateway"):
                body.append(
                    f"-A {cin} -s {sub['gateway']}/32 -p udp -m udp --sport 67 --dport 68 -j ACCEPT"
                )
        # No spoofing: the instance speaks only from its own address.
        body.append(f"-A {cout} ! -s {port.ip}/32 -j DROP")
        if pp.vm:
            body.append(f"-A {cout} -p udp -m udp --sport 68 --dport 67 -j RETURN")
        for g in sorted(port.security_groups):
            for _, rule in sorted(t.groups.get(g, {}).items()):
                if ":" in rule["remote_cidr"]:
                    continue  # an IPv6 rule: this ruleset is iptables' (IPv4) alone
                ingress = rule["direction"] == "ingress"
                chain, verdict = (cin, "ACCEPT") if ingress else (cout, "RETURN")
                target = verdict
                if rule["remote_group"] and not ingress:
                    # (a RETURN from a called chain would come back here, so
                    # egress to a group's members is spelled out inline)
                    for ip in _members(t, rule["remote_group"]):
                        m = ["-d", f"{ip}/32", *_match(rule)]
                        body.append(" ".join([f"-A {chain}", *m, "-j", verdict]))
                    continue
                if rule["remote_group"]:
                    # Members are listed once per group, not once per rule and
                    # port: a new member rewrites one chain, not every port's.
                    target = member_chains.setdefault(
                        (rule["remote_group"], ingress),
                        nw.kernel_name(prefix, "chain", f"{rule['remote_group']}/in"),
                    )
                body.append(" ".join([f"-A {chain}", *_match(rule), "-j", target]))
        body += [f"-A {cin} -j DROP", f"-A {cout} -j DROP"]
    for (group, _), chain in sorted(member_chains.items()):
        flt.append(f":{chain} - [0:0]")
        for ip in _members(t, group):
            body.append(f"-A {chain} -s {ip}/32 -j ACCEPT")
    return "\n".join(
        ["*raw", *raw_lines, "COMMIT", "*filter", *flt, *body, *jumps_out, *jumps_in, "COMMIT", ""]
    )
