"""A tenant's networks, subnets, ports and QoS policies.

Decided on the tenant's world (see ``handlers.world``), so name uniqueness,
quota and address allocation within a subnet hold under racing handlers. A
network's VXLAN segment comes from the cloud-wide segment pool: that
decision reads the pool too and is appended on both conditions.
"""

from __future__ import annotations

import ipaddress

from stratus.events.errors import Conflict, Invalid
from stratus.events.ids import new_id
from stratus.events.model import Cause, Event
from stratus.events.network import (
    SEGMENT_POOL_SUBJECT,
    VNI_FIRST,
    VNI_LAST,
    SegmentAllocated,
    SegmentReleased,
)
from stratus.events.resources import (
    SYSTEM,
    FloatingIpDisassociated,
    NetworkCreate,
    NetworkCreated,
    NetworkDeleted,
    PortCreate,
    PortCreated,
    PortDeleted,
    PortSet,
    PortUpdated,
    QosPolicyCreate,
    QosPolicyCreated,
    QosPolicyDeleted,
    RefCommand,
    SubnetCreate,
    SubnetCreated,
    SubnetDeleted,
)
from stratus.handlers import quota
from stratus.handlers.addressing import (
    SUBNET_WIDEST,
    address_range,
    first_free,
    mac_of,
    parse_address,
    parse_network,
)
from stratus.handlers.inventory import create, delete_unused, ports_where, unique
from stratus.handlers.records import Network, QosPolicy, Subnet
from stratus.handlers.security_groups import resolve_groups
from stratus.handlers.world import Aggregate, World, live_tenant

# The segment pool's aggregate id (the last token of its subject).
SEGMENT_POOL = SEGMENT_POOL_SUBJECT.rsplit(".", 1)[1]


def segment_pool(cmd: NetworkCreate) -> str:
    """The subject a network create also decides on: the segment pool."""
    return SEGMENT_POOL_SUBJECT


def _free_vni(pool: Aggregate | None) -> int:
    taken = pool.allocated if pool is not None else {}
    for vni in range(VNI_FIRST, min(VNI_LAST, VNI_FIRST + len(taken)) + 1):
        if str(vni) not in taken:
            return vni
    raise Conflict(f"no free VXLAN segment left ({VNI_FIRST} to {VNI_LAST} are all in use)")


def decide_network_create(
    state: tuple[World, Aggregate | None], cmd: NetworkCreate, cause: Cause
) -> list[Event]:
    """A tenant network with a VNI from the cloud-wide segment pool, appended
    on the pool's condition too: a VNI is never held by two live networks."""
    w, pool = state
    if cmd.external or cmd.cidr or cmd.pool_start or cmd.pool_end or cmd.gateway:
        raise Invalid("--external, --cidr and pools belong to external networks (cloud admin)")
    vni = _free_vni(pool)
    (net,) = create(w.networks, cmd, cause, NetworkCreated, {"networks": 1}, vni=vni)
    seg = cause.make(
        SegmentAllocated,
        SYSTEM,
        "segment-pool",
        SEGMENT_POOL,
        vni=vni,
        holder_tenant=cmd.tenant or "",
        holder=net.aggregate.id,
    )
    return [net, seg]


def decide_network_delete(w: World, cmd: RefCommand, cause: Cause) -> list[Event]:
    def users(n: Network) -> list[str]:
        subnets = [f"subnet {s.name}" for s in subnets_of(w, n.id)]
        return subnets + ports_where(w, lambda p: p.network == n.id)

    out = delete_unused(w.networks, cmd, cause, NetworkDeleted, users)
    n = w.networks.find(cmd.ref)
    if n.vni:
        # Giving a segment back needs no condition: it can never make two holders.
        out.append(
            cause.make(
                SegmentReleased,
                SYSTEM,
                "segment-pool",
                SEGMENT_POOL,
                vni=n.vni,
                holder_tenant=cmd.tenant or "",
                holder=n.id,
            )
        )
    return out


def subnets_of(w: World, network_id: str) -> list[Subnet]:
    return sorted((s for s in w.subnets.values() if s.network == network_id), key=lambda s: s.id)


def decide_subnet_create(w: World, cmd: SubnetCreate, cause: Cause) -> list[Event]:
    t = cmd.tenant or ""
    live_tenant(w, t)
    net = w.networks.find(cmd.network)
    unique(w.subnets, cmd.name)
    r = address_range(cmd.cidr, cmd.gateway, cmd.pool_start, cmd.pool_end, "subnet")
    mine = parse_network(cmd.cidr, "subnet cidr")
    widest = SUBNET_WIDEST[mine.version]
    if mine.prefixlen < widest:
        raise Invalid(f"subnet cidr {cmd.cidr} is too large: at most a /{widest}")
    for other in subnets_of(w, net.id):
        theirs = ipaddress.ip_network(other.cidr)
        if theirs.version == mine.version and theirs.overlaps(mine):
            raise Invalid(
                f"subnet cidr {cmd.cidr} overlaps subnet {other.name} ({other.cidr}) "
                f"on network {net.name}"
            )
    for d in cmd.dns:
        parse_address(d, "dns server")
    quota.check(w, {"subnets": 1})
    return [
        cause.make(
            SubnetCreated,
            t,
            "subnet",
            new_id(),
            name=cmd.name,
            network=net.id,
            cidr=str(mine),
            gateway=r.gateway,
            pool_start=r.start,
            pool_end=r.end,
            dns=list(cmd.dns),
            ip_version=mine.version,
            dhcp=cmd.dhcp,
        )
    ]


def decide_subnet_delete(w: World, cmd: RefCommand, cause: Cause) -> list[Event]:
    def users(s: Subnet) -> list[str]:
        return ports_where(w, lambda p: p.subnet == s.id)

    return delete_unused(w.subnets, cmd, cause, SubnetDeleted, users)


# -- ports ------------------------------------------------------------------------------


def _address_on(w: World, subnet: Subnet, ip: str | None, gateway_ok: bool) -> str:
    """``ip`` if it is free and usable on the subnet, else the pool's first free address."""
    taken = {p.ip for p in w.ports.values() if p.subnet == subnet.id and p.ip}
    if ip is None:
        # A gateway given inside the default pool stays the router's.
        what = f"subnet {subnet.name}"
        return first_free(subnet.pool_start, subnet.pool_end, taken | {subnet.gateway}, what)
    a = parse_address(ip, "ip")
    on_gateway = str(a) == subnet.gateway and not gateway_ok
    if a not in ipaddress.ip_network(subnet.cidr) or on_gateway:
        raise Invalid(f"ip {ip} is not a usable address of subnet {subnet.name}")
    if str(a) in taken:
        raise Conflict(f"ip {ip} is already in use on subnet {subnet.name}")
    return str(a)


def new_port(
    w: World,
    cause: Cause,
    tenant: str,
    network: Network,
    *,
    name: str,
    subnet_ref: str | None = None,
    ip: str | None = None,
    device: str = "",
    device_owner: str = "",
    security_groups: list[str] | None = None,
    qos_policy: str = "",
    gateway_ok: bool = False,
) -> PortCreated:
    """A port on ``network`` with an address from its subnet (the one named,
    else its first), or none on a network without subnets."""
    subnets = subnets_of(w, network.id)
    subnet: Subnet | None
    if subnet_ref is not None:
        subnet = w.subnets.find(subnet_ref)
        if subnet.network != network.id:
            raise Invalid(f"subnet {subnet_ref} is not on network {network.name}")
    else:
        subnet = subnets[0] if subnets else None
    address = ""
    if subnet is not None:
        address = _address_on(w, subnet, ip, gateway_ok)
    elif ip is not None:
        raise Invalid(f"network {network.name} has no subnet to take ip {ip} from")
    pid = new_id()
    return cause.make(
        PortCreated,
        tenant,
        "port",
        pid,
        name=name,
        network=network.id,
        subnet=subnet.id if subnet else "",
        mac=mac_of(pid),
        ip=address,
        device=device,
        device_owner=device_owner,
        security_groups=security_groups or [],
        qos_policy=qos_policy,
    )


def decide_port_create(w: World, cmd: PortCreate, cause: Cause) -> list[Event]:
    t = cmd.tenant or ""
    live_tenant(w, t)
    unique(w.ports, cmd.name)
    net = w.networks.find(cmd.network)
    qos = w.qos_policies.find(cmd.qos_policy).id if cmd.qos_policy else ""
    sgs, sg_events, new_sgs = resolve_groups(w, cmd.security_groups, cause, t)
    port = new_port(
        w,
        cause,
        t,
        net,
        name=cmd.name,
        subnet_ref=cmd.subnet,
        ip=cmd.ip,
        security_groups=sgs,
        qos_policy=qos,
    )
    quota.check(w, {"ports": 1, "security_groups": new_sgs})
    return [*sg_events, port]


def decide_port_delete(w: World, cmd: RefCommand, cause: Cause) -> list[Event]:
    p = w.ports.find(cmd.ref)
    if p.device:
        raise Conflict(f"port {p.name} belongs to {p.device_owner} {p.device}")
    t = cmd.tenant or ""
    out: list[Event] = [cause.make(PortDeleted, t, "port", p.id)]
    for f in w.floating_ips.values():
        if f.port == p.id:
            out.append(cause.make(FloatingIpDisassociated, t, "floating-ip", f.id, port=p.id))
    return out


def decide_port_set(w: World, cmd: PortSet, cause: Cause) -> list[Event]:
    p = w.ports.find(cmd.ref)
    sgs = list(p.security_groups)
    if cmd.security_groups is not None:
        sgs = [w.security_groups.find(g).id for g in cmd.security_groups]
    qos = p.qos_policy
    if cmd.qos_policy is not None:
        qos = w.qos_policies.find(cmd.qos_policy).id if cmd.qos_policy else ""
    if sgs == p.security_groups and qos == p.qos_policy:
        return []
    return [
        cause.make(PortUpdated, cmd.tenant or "", "port", p.id, security_groups=sgs, qos_policy=qos)
    ]


# -- QoS policies -----------------------------------------------------------------------


def decide_qos_create(w: World, cmd: QosPolicyCreate, cause: Cause) -> list[Event]:
    return create(
        w.qos_policies, cmd, cause, QosPolicyCreated, max_kbps=cmd.max_kbps, burst_kb=cmd.burst_kb
    )


def decide_qos_delete(w: World, cmd: RefCommand, cause: Cause) -> list[Event]:
    def users(q: QosPolicy) -> list[str]:
        return ports_where(w, lambda p: p.qos_policy == q.id)

    return delete_unused(w.qos_policies, cmd, cause, QosPolicyDeleted, users)
