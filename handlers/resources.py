"""Decisions about the inventory: pure functions of a tenant's world (or of
one cloud-wide aggregate) and a command.

A tenant's resources are decided on ``ev.<tenant>.>`` (see
``handlers.world``), so quota, name uniqueness, address allocation within a
subnet and references between the tenant's resources all hold under any
number of racing handlers. Cloud-wide objects (hosts, flavors, public
images, external networks) are decided on their own subject. Floating IPs
draw from an external network's pool, which every tenant shares: their
decision reads both and conditions on both in one atomic batch.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Callable, Iterable
from typing import Any

import msgspec

from stratus.events.compute import HostServerAction
from stratus.events.errors import AlreadyExists, Conflict, Invalid, NotFound
from stratus.events.ids import is_name, new_id
from stratus.events.model import Cause, Event
from stratus.events.network import (
    SEGMENT_POOL_SUBJECT,
    VNI_FIRST,
    VNI_LAST,
    SegmentAllocated,
    SegmentReleased,
)
from stratus.events.resources import (
    QUOTA_DEFAULTS,
    SYSTEM,
    AddressAllocated,
    AddressReleased,
    FlavorCreate,
    FlavorCreated,
    FlavorDelete,
    FlavorDeleted,
    FloatingIpAssociate,
    FloatingIpAssociated,
    FloatingIpCreate,
    FloatingIpCreated,
    FloatingIpDeleted,
    FloatingIpDisassociated,
    HostDisabled,
    HostEnabled,
    HostRegister,
    HostRegistered,
    HostRemove,
    HostRemoved,
    HostSetEnabled,
    HostUpdated,
    ImageCreate,
    ImageCreated,
    ImageDeleted,
    NetworkCreate,
    NetworkCreated,
    NetworkDeleted,
    Nic,
    PortCreate,
    PortCreated,
    PortDeleted,
    PortSet,
    PortUpdated,
    QosPolicyCreate,
    QosPolicyCreated,
    QosPolicyDeleted,
    QuotaSet,
    QuotaSetCommand,
    RefCommand,
    RouterCreate,
    RouterCreated,
    RouterDeleted,
    RouterInterface,
    RouterInterfaceAdded,
    RouterInterfaceRemoved,
    SecurityGroupCreate,
    SecurityGroupCreated,
    SecurityGroupDeleted,
    SecurityGroupRuleAdd,
    SecurityGroupRuleAdded,
    SecurityGroupRuleRemove,
    SecurityGroupRuleRemoved,
    ServerCreate,
    ServerDeleted,
    ServerDeleting,
    ServerGroupCreate,
    ServerGroupCreated,
    ServerGroupDeleted,
    ServerRebootRequested,
    ServerRequested,
    ServerStartRequested,
    ServerStopRequested,
    SubnetCreate,
    SubnetCreated,
    SubnetDeleted,
    VolumeAttach,
    VolumeAttached,
    VolumeCreate,
    VolumeCreated,
    VolumeDeleted,
    VolumeDetached,
    quota_report,
)
from stratus.handlers.registry import Handler
from stratus.handlers.world import (
    Aggregate,
    World,
    fold,
    fold_aggregate,
    tenant_boundary,
)

# -- helpers ---------------------------------------------------------------------


def system_subject(kind: str, name: str) -> str:
    return f"ev.{SYSTEM}.{kind}.{name}"


def _live_tenant(w: World, tenant: str) -> None:
    if not w.exists or w.deleted:
        raise NotFound(f"tenant {tenant} not found")


def _unique(w: World, kind: str, name: str) -> None:
    # An empty name (an unnamed Neutron subnet or port) is nobody's to hold.
    if name and w.named(kind, name) is not None:
        raise AlreadyExists(f"a {kind} named {name} already exists in tenant {w.tenant}")


def _mac(port_id: str) -> str:
    # OpenStack's locally administered prefix; the rest from the id, so a
    # replayed decision gives the same address.
    h = hashlib.sha256(port_id.encode()).digest()
    return "fa:16:3e:" + ":".join(f"{b:02x}" for b in h[:3])


def _network(value: str, what: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        return ipaddress.ip_network(value, strict=True)
    except ValueError as exc:
        raise Invalid(f"{what}: {exc}") from None


def _address(value: str, what: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address(value)
    except ValueError as exc:
        raise Invalid(f"{what}: {exc}") from None


# The widest tenant subnet per IP version: one L2 segment (a bridge and its
# ARP/neighbour tables on every host) should not hold more than that.
SUBNET_WIDEST = {4: 16, 6: 64}


class Range(msgspec.Struct, frozen=True):
    gateway: str
    start: str
    end: str


def address_range(
    cidr: str, gateway: str | None, start: str | None, end: str | None, what: str
) -> Range:
    """Gateway and allocation pool of a prefix, defaults as Neutron's: the
    first host is the gateway, the rest of the hosts are the pool."""
    net = _network(cidr, f"{what} cidr")
    if net.num_addresses < 4:
        raise Invalid(f"{what} cidr {cidr} is too small: at least a /30 (or /126)")
    first, last = net.network_address + 1, net.broadcast_address - 1
    gw = _address(gateway, f"{what} gateway") if gateway else first
    lo = _address(start, f"{what} pool start") if start else (first + 1 if gw == first else first)
    hi = _address(end, f"{what} pool end") if end else last
    for name, a in (("gateway", gw), ("pool start", lo), ("pool end", hi)):
        if a not in net or a in (net.network_address, net.broadcast_address):
            raise Invalid(f"{what} {name} {a} is not a host address of {cidr}")
    if lo > hi:
        raise Invalid(f"{what} pool start {lo} is after its end {hi}")
    return Range(str(gw), str(lo), str(hi))


def _first_free(start: str, end: str, taken: set[str], what: str) -> str:
    lo, hi = ipaddress.ip_address(start), ipaddress.ip_address(end)
    a = lo
    while a <= hi:
        if str(a) not in taken:
            return str(a)
        a += 1
    raise Conflict(f"{what}: no free address left ({start} to {end} are all in use)")


# -- tenant world decisions ------------------------------------------------------------


def default_security_group(w: World, cause: Cause, tenant: str) -> tuple[str, list[Event]]:
    """The tenant's ``default`` security group, made on first use (as Neutron
    does): all egress, ingress only from members of the same group."""
    sg = w.named("security-group", "default")
    if sg is not None:
        return sg["id"], []
    sg_ev = cause.make(
        SecurityGroupCreated,
        tenant,
        "security-group",
        new_id(),
        name="default",
        description="default: all egress, ingress from members of this group",
    )
    sid = sg_ev.aggregate.id
    rules = [
        cause.make(
            SecurityGroupRuleAdded,
            tenant,
            "security-group",
            sid,
            rule=new_id(),
            direction="egress",
            protocol="any",
        ),
        cause.make(
            SecurityGroupRuleAdded,
            tenant,
            "security-group",
            sid,
            rule=new_id(),
            direction="ingress",
            protocol="any",
            remote_group=sid,
        ),
    ]
    return sid, [sg_ev, *rules]


def _security_groups(
    w: World, refs: list[str], cause: Cause, tenant: str
) -> tuple[list[str], list[Event], int]:
    """Resolved group ids, events creating ``default`` if needed, and how many
    groups those events add (for the quota)."""
    if refs:
        return [w.find("security-group", r, "security group")["id"] for r in refs], [], 0
    sid, made = default_security_group(w, cause, tenant)
    return [sid], made, 1 if made else 0


def _subnets_of(w: World, network_id: str) -> list[dict[str, Any]]:
    subnets = [s for s in w.of("subnet").values() if s["network"] == network_id]
    return sorted(subnets, key=lambda s: s["id"])


def _used_ips(w: World, subnet_id: str) -> set[str]:
    return {p["ip"] for p in w.of("port").values() if p["subnet"] == subnet_id and p["ip"]}


def _new_port(
    w: World,
    cause: Cause,
    tenant: str,
    network: dict[str, Any],
    *,
    name: str,
    subnet_ref: str | None = None,
    ip: str | None = None,
    device: str = "",
    device_owner: str = "",
    security_groups: list[str] | None = None,
    qos_policy: str = "",
    reserved: set[str] | None = None,
    gateway_ok: bool = False,
) -> PortCreated:
    subnets = _subnets_of(w, network["id"])
    if subnet_ref is not None:
        subnet = w.find("subnet", subnet_ref)
        if subnet["network"] != network["id"]:
            raise Invalid(f"subnet {subnet_ref} is not on network {network['name']}")
    elif subnets:
        subnet = subnets[0]
    else:
        subnet = None
    address = ""
    if subnet is not None:
        taken = _used_ips(w, subnet["id"]) | (reserved or set())
        if ip is not None:
            a = _address(ip, "ip")
            on_gateway = str(a) == subnet["gateway"] and not gateway_ok
            if a not in ipaddress.ip_network(subnet["cidr"]) or on_gateway:
                raise Invalid(f"ip {ip} is not a usable address of subnet {subnet['name']}")
            if str(a) in taken:
                raise Conflict(f"ip {ip} is already in use on subnet {subnet['name']}")
            address = str(a)
        else:
            # A gateway given inside the default pool stays the router's.
            address = _first_free(
                subnet["pool_start"],
                subnet["pool_end"],
                taken | {subnet["gateway"]},
                f"subnet {subnet['name']}",
            )
    elif ip is not None:
        raise Invalid(f"network {network['name']} has no subnet to take ip {ip} from")
    pid = new_id()
    return cause.make(
        PortCreated,
        tenant,
        "port",
        pid,
        name=name,
        network=network["id"],
        subnet=subnet["id"] if subnet else "",
        mac=_mac(pid),
        ip=address,
        device=device,
        device_owner=device_owner,
        security_groups=security_groups or [],
        qos_policy=qos_policy,
    )


class ServerPlan(msgspec.Struct, frozen=True):
    """``server create`` with what ``prepare`` looked up outside the tenant."""

    cmd: ServerCreate
    flavor: dict[str, Any] | None
    image: dict[str, Any] | None

    @property
    def tenant(self) -> str | None:
        return self.cmd.tenant


def decide_server_create(w: World, plan: ServerPlan, cause: Cause) -> list[Event]:
    cmd, t = plan.cmd, plan.cmd.tenant or ""
    _live_tenant(w, t)
    _unique(w, "server", cmd.name)
    image = w.named("image", cmd.image) or w.of("image").get(cmd.image) or plan.image
    if image is None:
        raise NotFound(f"image {cmd.image} not found")
    if cmd.flavor is not None:
        if plan.flavor is None:
            raise NotFound(f"flavor {cmd.flavor} not found")
        if cmd.vcpus is not None or cmd.ram_mb is not None:
            raise Invalid("give --flavor or --vcpus/--ram-mb, not both")
        vcpus, ram, disk = plan.flavor["vcpus"], plan.flavor["ram_mb"], plan.flavor["disk_gb"]
    else:
        if cmd.vcpus is None or cmd.ram_mb is None:
            raise Invalid("server create needs --flavor, or --vcpus and --ram-mb")
        vcpus, ram, disk = cmd.vcpus, cmd.ram_mb, cmd.disk_gb or 0
    disk = max(disk, image.get("min_disk_gb", 0))
    group = w.find("server-group", cmd.group, "server group")["id"] if cmd.group else ""
    networks = [w.find("network", n) for n in cmd.networks]
    if len({n["id"] for n in networks}) != len(networks):
        raise Invalid("a network is named twice")
    sgs, sg_events, new_sgs = _security_groups(w, cmd.security_groups, cause, t)
    sid = new_id()
    ports: list[Event] = []
    for i, net in enumerate(networks):
        ports.append(
            _new_port(
                w,
                cause,
                t,
                net,
                name=f"{cmd.name}-{i}",
                device=sid,
                device_owner="compute",
                security_groups=sgs,
            )
        )
    w.check_quota(
        {
            "instances": 1,
            "vcpus": vcpus,
            "ram_mb": ram,
            "ports": len(ports),
            "security_groups": new_sgs,
        }
    )
    nics = [Nic(port=p.aggregate.id, mac=p.mac) for p in ports if isinstance(p, PortCreated)]
    server = cause.make(
        ServerRequested,
        t,
        "server",
        sid,
        name=cmd.name,
        image=image["id"],
        flavor=plan.flavor["id"] if plan.flavor else "",
        vcpus=vcpus,
        ram_mb=ram,
        disk_gb=disk,
        instance_type=cmd.instance_type,
        networks=[n["id"] for n in networks],
        security_groups=sgs,
        labels=dict(cmd.labels),
        requested_host=cmd.host or "",
        group=group,
        zone=cmd.zone or "",
        nics=nics,
        metadata=dict(cmd.metadata),
        access_ipv4=_access_ip(cmd.access_ipv4, 4),
        access_ipv6=_access_ip(cmd.access_ipv6, 6),
    )
    return [*sg_events, server, *ports]


def _access_ip(value: str | None, version: int) -> str:
    if not value:
        return ""
    a = _address(value, f"access IPv{version}")
    if a.version != version:
        raise Invalid(f"access IPv{version} {value} is not an IPv{version} address")
    return str(a)


# Servers already placed on a host need its agent to tear them down.
_PLACED = {"scheduled", "building", "running", "stopped", "deleting"}


def decide_server_delete(w: World, cmd: RefCommand, cause: Cause) -> list[Event]:
    t = cmd.tenant or ""
    s = w.find("server", cmd.ref)
    if s["status"] == "deleting":
        return []
    out: list[Event] = []
    for p in w.of("port").values():
        if p["device"] == s["id"]:
            out.append(cause.make(PortDeleted, t, "port", p["id"]))
    for v in w.of("volume").values():
        if v.get("server") == s["id"]:
            out.append(cause.make(VolumeDetached, t, "volume", v["id"], server=s["id"]))
    for f in w.of("floating-ip").values():
        if f.get("server") == s["id"]:
            out.append(
                cause.make(FloatingIpDisassociated, t, "floating-ip", f["id"], port=f["port"])
            )
    if s["status"] in _PLACED and s.get("host"):
        deleting = cause.make(ServerDeleting, t, "server", s["id"])
        return [deleting, *out, _host_action(s, t, cause, "delete")]
    return [cause.make(ServerDeleted, t, "server", s["id"]), *out]


def _host_action(s: dict[str, Any], tenant: str, cause: Cause, action: str, **kw: Any) -> Event:
    """The same verb told to the agent of the server's host (see events.compute)."""
    return cause.make(
        HostServerAction,
        SYSTEM,
        "host",
        s["host"],
        server=s["id"],
        server_tenant=tenant,
        action=action,
        **kw,
    )


def _power(event: type[Event], allowed: set[str], verb: str) -> Any:
    def decide(w: World, cmd: RefCommand, cause: Cause) -> list[Event]:
        s = w.find("server", cmd.ref)
        if s["status"] not in allowed:
            raise Conflict(
                f"cannot {verb} server {s['name']} while it is {s['status']} "
                f"(needs {' or '.join(sorted(allowed))})"
            )
        t = cmd.tenant or ""
        out = [cause.make(event, t, "server", s["id"])]
        if s.get("host"):
            out.append(_host_action(s, t, cause, verb))
        return out

    return decide


def _create(
    w: World,
    cmd: Any,
    cause: Cause,
    cls: type[Event],
    kind: str,
    quota: dict[str, int] | None = None,
    **fields: Any,
) -> list[Event]:
    """A named resource of the tenant: it must live, the name be free, the quota allow it."""
    t = cmd.tenant or ""
    _live_tenant(w, t)
    _unique(w, kind, cmd.name)
    if quota:
        w.check_quota(quota)
    return [cause.make(cls, t, kind, new_id(), name=cmd.name, **fields)]


def _delete_unused(
    w: World,
    cmd: RefCommand,
    cause: Cause,
    cls: type[Event],
    kind: str,
    users: Callable[[dict[str, Any]], Iterable[str]],
    label: str | None = None,
) -> list[Event]:
    """Delete a resource nothing uses any more; otherwise name what still does."""
    r = w.find(kind, cmd.ref, label)
    using = sorted(users(r))
    if using:
        raise Conflict(f"{label or kind} {r['name'] or r['id']} is in use by {', '.join(using)}")
    return [cause.make(cls, cmd.tenant or "", kind, r["id"])]


def _ports_where(w: World, test: Callable[[dict[str, Any]], bool]) -> list[str]:
    return [f"port {p['name']}" for p in w.of("port").values() if test(p)]


def decide_server_group_create(w: World, cmd: ServerGroupCreate, cause: Cause) -> list[Event]:
    return _create(w, cmd, cause, ServerGroupCreated, "server-group", policy=cmd.policy)


def decide_server_group_delete(w: World, cmd: RefCommand, cause: Cause) -> list[Event]:
    def members(g: dict[str, Any]) -> list[str]:
        return [f"server {s['name']}" for s in w.of("server").values() if s.get("group") == g["id"]]

    return _delete_unused(
        w, cmd, cause, ServerGroupDeleted, "server-group", members, "server group"
    )


def decide_volume_create(w: World, cmd: VolumeCreate, cause: Cause) -> list[Event]:
    quota = {"volumes": 1, "volume_gb": cmd.size_gb}
    return _create(w, cmd, cause, VolumeCreated, "volume", quota, size_gb=cmd.size_gb)


def decide_volume_delete(w: World, cmd: RefCommand, cause: Cause) -> list[Event]:
    def attached(v: dict[str, Any]) -> list[str]:
        return [f"server {v['server']} (detach it first)"] if v.get("server") else []

    return _delete_unused(w, cmd, cause, VolumeDeleted, "volume", attached)


def decide_volume_attach(w: World, cmd: VolumeAttach, cause: Cause) -> list[Event]:
    v, s = w.find("volume", cmd.volume), w.find("server", cmd.server)
    if v.get("server") == s["id"]:
        return []
    if v.get("server"):
        raise Conflict(f"volume {v['name']} is attached to another server")
    if s["status"] in ("deleting", "error"):
        raise Conflict(f"server {s['name']} is {s['status']}")
    if s.get("instance_type") == "container":
        raise Invalid(f"server {s['name']} is a container; volumes attach to VMs")
    t = cmd.tenant or ""
    out = [cause.make(VolumeAttached, t, "volume", v["id"], server=s["id"])]
    if s.get("host"):
        out.append(_host_action(s, t, cause, "attach-volume", volume=v["id"], size_gb=v["size_gb"]))
    return out


def decide_volume_detach(w: World, cmd: VolumeAttach, cause: Cause) -> list[Event]:
    v, s = w.find("volume", cmd.volume), w.find("server", cmd.server)
    if v.get("server") != s["id"]:
        raise Conflict(f"volume {v['name']} is not attached to server {s['name']}")
    t = cmd.tenant or ""
    out = [cause.make(VolumeDetached, t, "volume", v["id"], server=s["id"])]
    if s.get("host"):
        out.append(_host_action(s, t, cause, "detach-volume", volume=v["id"]))
    return out


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
    (net,) = _create(w, cmd, cause, NetworkCreated, "network", {"networks": 1}, vni=vni)
    t = cmd.tenant or ""
    seg = cause.make(
        SegmentAllocated,
        SYSTEM,
        "segment-pool",
        SEGMENT_POOL_SUBJECT.rsplit(".", 1)[1],
        vni=vni,
        holder_tenant=t,
        holder=net.aggregate.id,
    )
    return [net, seg]


def decide_network_delete(w: World, cmd: RefCommand, cause: Cause) -> list[Event]:
    def users(n: dict[str, Any]) -> list[str]:
        subnets = [f"subnet {s['name']}" for s in _subnets_of(w, n["id"])]
        return subnets + _ports_where(w, lambda p: p["network"] == n["id"])

    out = _delete_unused(w, cmd, cause, NetworkDeleted, "network", users)
    n = w.find("network", cmd.ref)
    if n.get("vni"):
        # Giving a segment back needs no condition: it can never make two holders.
        out.append(
            cause.make(
                SegmentReleased,
                SYSTEM,
                "segment-pool",
                SEGMENT_POOL_SUBJECT.rsplit(".", 1)[1],
                vni=n["vni"],
                holder_tenant=cmd.tenant or "",
                holder=n["id"],
            )
        )
    return out


def decide_subnet_create(w: World, cmd: SubnetCreate, cause: Cause) -> list[Event]:
    t = cmd.tenant or ""
    _live_tenant(w, t)
    net = w.find("network", cmd.network)
    _unique(w, "subnet", cmd.name)
    r = address_range(cmd.cidr, cmd.gateway, cmd.pool_start, cmd.pool_end, "subnet")
    mine = _network(cmd.cidr, "subnet cidr")
    widest = SUBNET_WIDEST[mine.version]
    if mine.prefixlen < widest:
        raise Invalid(f"subnet cidr {cmd.cidr} is too large: at most a /{widest}")
    for other in _subnets_of(w, net["id"]):
        theirs = ipaddress.ip_network(other["cidr"])
        if theirs.version == mine.version and theirs.overlaps(mine):
            raise Invalid(
                f"subnet cidr {cmd.cidr} overlaps subnet {other['name']} ({other['cidr']}) "
                f"on network {net['name']}"
            )
    for d in cmd.dns:
        _address(d, "dns server")
    w.check_quota({"subnets": 1})
    return [
        cause.make(
            SubnetCreated,
            t,
            "subnet",
            new_id(),
            name=cmd.name,
            network=net["id"],
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
    def users(s: dict[str, Any]) -> list[str]:
        return _ports_where(w, lambda p: p["subnet"] == s["id"])

    return _delete_unused(w, cmd, cause, SubnetDeleted, "subnet", users)


def decide_port_create(w: World, cmd: PortCreate, cause: Cause) -> list[Event]:
    t = cmd.tenant or ""
    _live_tenant(w, t)
    _unique(w, "port", cmd.name)
    net = w.find("network", cmd.network)
    qos = w.find("qos-policy", cmd.qos_policy, "qos policy")["id"] if cmd.qos_policy else ""
    sgs, sg_events, new_sgs = _security_groups(w, cmd.security_groups, cause, t)
    port = _new_port(
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
    w.check_quota({"ports": 1, "security_groups": new_sgs})
    return [*sg_events, port]


def decide_port_delete(w: World, cmd: RefCommand, cause: Cause) -> list[Event]:
    p = w.find("port", cmd.ref)
    if p["device"]:
        raise Conflict(f"port {p['name']} belongs to {p['device_owner']} {p['device']}")
    out: list[Event] = [cause.make(PortDeleted, cmd.tenant or "", "port", p["id"])]
    for f in w.of("floating-ip").values():
        if f.get("port") == p["id"]:
            out.append(
                cause.make(
                    FloatingIpDisassociated,
                    cmd.tenant or "",
                    "floating-ip",
                    f["id"],
                    port=p["id"],
                )
            )
    return out


def decide_port_set(w: World, cmd: PortSet, cause: Cause) -> list[Event]:
    p = w.find("port", cmd.ref)
    sgs = list(p["security_groups"])
    if cmd.security_groups is not None:
        sgs = [w.find("security-group", g, "security group")["id"] for g in cmd.security_groups]
    qos = p.get("qos_policy", "")
    if cmd.qos_policy is not None:
        qos = w.find("qos-policy", cmd.qos_policy, "qos policy")["id"] if cmd.qos_policy else ""
    if sgs == p["security_groups"] and qos == p.get("qos_policy", ""):
        return []
    return [
        cause.make(
            PortUpdated, cmd.tenant or "", "port", p["id"], security_groups=sgs, qos_policy=qos
        )
    ]


class RouterPlan(msgspec.Struct, frozen=True):
    """``router create`` with the external network ``prepare`` looked up.

    Read, not conditioned on: the router writes nothing to the network's
    subject (one event can carry only one condition), and external networks
    are never deleted."""

    cmd: RouterCreate
    external: dict[str, Any] | None

    @property
    def tenant(self) -> str | None:
        return self.cmd.tenant


def decide_router_create(
    state: World | tuple[World, Aggregate | None], plan: RouterPlan, cause: Cause
) -> list[Event]:
    """A router; with an external network (decided with its pool as well)
    it takes an address from the pool for its gateway, as a floating IP does."""
    w, pool = state if isinstance(state, tuple) else (state, None)
    cmd = plan.cmd
    t = cmd.tenant or ""
    _live_tenant(w, t)
    _unique(w, "router", cmd.name)
    if cmd.external_network and not (plan.external or {}).get("external"):
        raise NotFound(f"external network {cmd.external_network} not found")
    w.check_quota({"routers": 1})
    rid, address = new_id(), ""
    out: list[Event] = []
    if cmd.external_network and pool is not None and pool.attrs:
        a = pool.attrs
        address = _first_free(
            a["pool_start"],
            a["pool_end"],
            {*pool.allocated, a["gateway"]},
            f"external network {cmd.external_network}",
        )
        out.append(
            cause.make(
                AddressAllocated,
                SYSTEM,
                "network",
                cmd.external_network,
                address=address,
                holder_tenant=t,
                holder=rid,
            )
        )
    router = cause.make(
        RouterCreated,
        t,
        "router",
        rid,
        name=cmd.name,
        external_network=cmd.external_network or "",
        external_ip=address,
        admin_up=cmd.admin_up,
    )
    return [router, *out]


def decide_router_delete(w: World, cmd: RefCommand, cause: Cause) -> list[Event]:
    def interfaces(r: dict[str, Any]) -> list[str]:
        subnets = w.of("subnet")
        return [
            f"subnet {subnets.get(s, {}).get('name', s)} (remove it first)"
            for s in r.get("interfaces", {})
        ]

    out = _delete_unused(w, cmd, cause, RouterDeleted, "router", interfaces)
    r = w.find("router", cmd.ref)
    if r.get("external_ip"):
        out.append(
            cause.make(
                AddressReleased,
                SYSTEM,
                "network",
                r["external_network"],
                address=r["external_ip"],
                holder_tenant=cmd.tenant or "",
                holder=r["id"],
            )
        )
    return out


def decide_router_add_subnet(w: World, cmd: RouterInterface, cause: Cause) -> list[Event]:
    t = cmd.tenant or ""
    r, s = w.find("router", cmd.router), w.find("subnet", cmd.subnet)
    if s["id"] in r.get("interfaces", {}):
        return []
    for other in w.of("router").values():
        if s["id"] in other.get("interfaces", {}):
            raise Conflict(f"subnet {s['name']} is already on router {other['name']}")
    net = w.find("network", s["network"])
    port = _new_port(
        w,
        cause,
        t,
        net,
        name=f"{r['name']}-{s['name']}",
        subnet_ref=s["id"],
        ip=s["gateway"],
        device=r["id"],
        device_owner="router_interface",
        gateway_ok=True,
    )
    w.check_quota({"ports": 1})
    return [
        port,
        cause.make(
            RouterInterfaceAdded,
            t,
            "router",
            r["id"],
            subnet=s["id"],
            port=port.aggregate.id,
            ip=s["gateway"],
        ),
    ]


def decide_router_remove_subnet(w: World, cmd: RouterInterface, cause: Cause) -> list[Event]:
    t = cmd.tenant or ""
    r, s = w.find("router", cmd.router), w.find("subnet", cmd.subnet)
    port = r.get("interfaces", {}).get(s["id"])
    if port is None:
        raise Conflict(f"subnet {s['name']} is not on router {r['name']}")
    return [
        cause.make(RouterInterfaceRemoved, t, "router", r["id"], subnet=s["id"], port=port),
        cause.make(PortDeleted, t, "port", port),
    ]


def decide_fip_create(
    state: tuple[World, Aggregate | None], cmd: FloatingIpCreate, cause: Cause
) -> list[Event]:
    w, pool = state
    t = cmd.tenant or ""
    _live_tenant(w, t)
    if pool is None or not pool.live or not pool.attrs or not pool.attrs.get("external"):
        raise NotFound(f"external network {cmd.network} not found")
    w.check_quota({"floating_ips": 1})
    a = pool.attrs
    address = _first_free(
        a["pool_start"],
        a["pool_end"],
        {*pool.allocated, a["gateway"]},
        f"external network {cmd.network}",
    )
    fid = new_id()
    return [
        cause.make(FloatingIpCreated, t, "floating-ip", fid, address=address, network=cmd.network),
        cause.make(
            AddressAllocated,
            SYSTEM,
            "network",
            cmd.network,
            address=address,
            holder_tenant=t,
            holder=fid,
        ),
    ]


def decide_fip_delete(w: World, cmd: RefCommand, cause: Cause) -> list[Event]:
    t = cmd.tenant or ""
    f = _fip(w, cmd.ref)
    # Releasing needs no condition on the pool: an address going back can
    # never make two holders.
    return [
        cause.make(FloatingIpDeleted, t, "floating-ip", f["id"]),
        cause.make(
            AddressReleased,
            SYSTEM,
            "network",
            f["network"],
            address=f["address"],
            holder_tenant=t,
            holder=f["id"],
        ),
    ]


def _fip(w: World, ref: str) -> dict[str, Any]:
    for f in w.of("floating-ip").values():
        if f["address"] == ref:
            return f
    return w.find("floating-ip", ref, "floating ip")


def decide_fip_associate(w: World, cmd: FloatingIpAssociate, cause: Cause) -> list[Event]:
    t = cmd.tenant or ""
    f = _fip(w, cmd.floating_ip)
    if (cmd.server is None) == (cmd.port is None):
        raise Invalid("give the server or the port to associate with (one of them)")
    if cmd.port is not None:
        port = w.find("port", cmd.port)
        server = port["device"] if port["device_owner"] == "compute" else ""
    else:
        s = w.find("server", cmd.server or "")
        ports = sorted(
            (p for p in w.of("port").values() if p["device"] == s["id"]), key=lambda p: p["id"]
        )
        if not ports:
            raise Conflict(f"server {s['name']} has no port (create it with --network)")
        port, server = ports[0], s["id"]
    if not port["ip"]:
        raise Conflict(f"port {port['name']} has no fixed address")
    if f.get("port") == port["id"]:
        return []
    if f.get("port"):
        raise Conflict(f"floating ip {f['address']} is associated already; disassociate first")
    return [
        cause.make(
            FloatingIpAssociated,
            t,
            "floating-ip",
            f["id"],
            port=port["id"],
            server=server,
            fixed_ip=port["ip"],
        )
    ]


def decide_fip_disassociate(w: World, cmd: RefCommand, cause: Cause) -> list[Event]:
    f = _fip(w, cmd.ref)
    if not f.get("port"):
        return []
    return [
        cause.make(
            FloatingIpDisassociated, cmd.tenant or "", "floating-ip", f["id"], port=f["port"]
        )
    ]


def decide_sg_create(w: World, cmd: SecurityGroupCreate, cause: Cause) -> list[Event]:
    quota = {"security_groups": 1}
    made = _create(
        w,
        cmd,
        cause,
        SecurityGroupCreated,
        "security-group",
        quota,
        description=cmd.description,
    )
    if not cmd.default_egress:
        return made
    sid = made[0].aggregate.id
    return [
        *made,
        *(
            cause.make(
                SecurityGroupRuleAdded,
                cmd.tenant or "",
                "security-group",
                sid,
                rule=new_id(),
                direction="egress",
                protocol="any",
                remote_cidr=cidr,
            )
            for cidr in ("", "::/0")
        ),
    ]


def decide_sg_delete(w: World, cmd: RefCommand, cause: Cause) -> list[Event]:
    def users(g: dict[str, Any]) -> list[str]:
        return _ports_where(w, lambda p: g["id"] in p["security_groups"])

    return _delete_unused(
        w, cmd, cause, SecurityGroupDeleted, "security-group", users, "security group"
    )


def decide_sg_rule_add(w: World, cmd: SecurityGroupRuleAdd, cause: Cause) -> list[Event]:
    g = w.find("security-group", cmd.security_group, "security group")
    if cmd.remote_cidr is not None and cmd.remote_group is not None:
        raise Invalid("give --remote-cidr or --remote-group, not both")
    cidr = str(_network(cmd.remote_cidr, "remote cidr")) if cmd.remote_cidr else ""
    remote = (
        w.find("security-group", cmd.remote_group, "security group")["id"]
        if cmd.remote_group
        else ""
    )
    lo, hi = cmd.port_min, cmd.port_max or cmd.port_min
    if cmd.protocol in ("icmp", "any") and (lo or hi):
        raise Invalid(f"--port does not apply to protocol {cmd.protocol}")
    if lo > hi:
        raise Invalid(f"port range {lo}:{hi} is backwards")
    rule = {
        "direction": cmd.direction,
        "protocol": cmd.protocol,
        "port_min": lo,
        "port_max": hi,
        "remote_cidr": cidr,
        "remote_group": remote,
    }
    for existing in g.get("rules", {}).values():
        if all(existing.get(k) == v for k, v in rule.items()):
            raise AlreadyExists(f"security group {g['name']} has this rule already")
    return [
        cause.make(
            SecurityGroupRuleAdded,
            cmd.tenant or "",
            "security-group",
            g["id"],
            rule=new_id(),
            **rule,
        )
    ]


def decide_sg_rule_remove(w: World, cmd: SecurityGroupRuleRemove, cause: Cause) -> list[Event]:
    g = w.find("security-group", cmd.security_group, "security group")
    if cmd.rule not in g.get("rules", {}):
        raise NotFound(f"rule {cmd.rule} not found in security group {g['name']}")
    return [
        cause.make(
            SecurityGroupRuleRemoved, cmd.tenant or "", "security-group", g["id"], rule=cmd.rule
        )
    ]


def decide_qos_create(w: World, cmd: QosPolicyCreate, cause: Cause) -> list[Event]:
    return _create(
        w,
        cmd,
        cause,
        QosPolicyCreated,
        "qos-policy",
        max_kbps=cmd.max_kbps,
        burst_kb=cmd.burst_kb,
    )


def decide_qos_delete(w: World, cmd: RefCommand, cause: Cause) -> list[Event]:
    def users(q: dict[str, Any]) -> list[str]:
        return _ports_where(w, lambda p: p.get("qos_policy") == q["id"])

    return _delete_unused(w, cmd, cause, QosPolicyDeleted, "qos-policy", users, "qos policy")


def decide_image_create(w: World, cmd: ImageCreate, cause: Cause) -> list[Event]:
    t = cmd.tenant or ""
    _live_tenant(w, t)
    _unique(w, "image", cmd.name)
    return [_image_event(cmd, cause, t, new_id(), "private")]


def _image_event(cmd: ImageCreate, cause: Cause, tenant: str, iid: str, vis: str) -> Event:
    return cause.make(
        ImageCreated,
        tenant,
        "image",
        iid,
        name=cmd.name,
        format=cmd.format,
        size_bytes=cmd.size_bytes,
        checksum=cmd.checksum,
        visibility=vis,
        min_disk_gb=cmd.min_disk_gb,
        properties=dict(cmd.properties),
    )


def decide_image_delete(w: World, cmd: RefCommand, cause: Cause) -> list[Event]:
    i = w.find("image", cmd.ref)
    return [cause.make(ImageDeleted, cmd.tenant or "", "image", i["id"])]


def decide_quota_set(w: World, cmd: QuotaSetCommand, cause: Cause) -> list[Event]:
    t = cmd.tenant or ""
    _live_tenant(w, t)
    unknown = sorted(set(cmd.limits) - set(QUOTA_DEFAULTS))
    if unknown:
        raise Invalid(
            f"unknown quota {', '.join(unknown)}; known: {', '.join(sorted(QUOTA_DEFAULTS))}"
        )
    limits = {r: w.limit(r) for r in QUOTA_DEFAULTS}
    merged = {**limits, **cmd.limits}
    if merged == limits and w.limits:
        return []
    # Lowering a limit below usage is allowed: it only blocks new allocations.
    return [cause.make(QuotaSet, t, "quota", t, limits=merged)]


# -- cloud-wide aggregates -----------------------------------------------------------


def _existing(a: Aggregate, what: str, name: str) -> None:
    if not a.live:
        raise NotFound(f"{what} {name} not found")


def _unused_name(a: Aggregate, what: str, name: str) -> None:
    # A cloud-wide object's name is its id, on the log forever: never reused.
    if a.live or a.ended:
        raise AlreadyExists(f"{what} {name} exists or existed; names are never reused")


def decide_host_register(a: Aggregate, cmd: HostRegister, cause: Cause) -> list[Event]:
    spec = {k: v for k, v in msgspec.structs.asdict(cmd).items() if k != "name"}
    spec["labels"], spec["types"] = dict(cmd.labels), list(cmd.types)
    if not a.live:
        return [cause.make(HostRegistered, SYSTEM, "host", cmd.name, name=cmd.name, **spec)]
    current = a.attrs or {}
    if all(current.get(k) == v for k, v in spec.items()):
        return []  # an agent restarting with nothing changed
    return [cause.make(HostUpdated, SYSTEM, "host", cmd.name, **spec)]


def _host_switch(enabled: bool) -> Any:
    def decide(a: Aggregate, cmd: HostSetEnabled, cause: Cause) -> list[Event]:
        _existing(a, "host", cmd.name)
        want = "enabled" if enabled else "disabled"
        if (a.attrs or {}).get("status") == want:
            return []
        cls = HostEnabled if enabled else HostDisabled
        return [cause.make(cls, SYSTEM, "host", cmd.name, reason=cmd.reason)]

    return decide


def decide_host_remove(a: Aggregate, cmd: HostRemove, cause: Cause) -> list[Event]:
    _existing(a, "host", cmd.name)
    return [cause.make(HostRemoved, SYSTEM, "host", cmd.name)]


def decide_flavor_create(a: Aggregate, cmd: FlavorCreate, cause: Cause) -> list[Event]:
    _unused_name(a, "flavor", cmd.name)
    return [
        cause.make(
            FlavorCreated,
            SYSTEM,
            "flavor",
            cmd.name,
            name=cmd.name,
            vcpus=cmd.vcpus,
            ram_mb=cmd.ram_mb,
            disk_gb=cmd.disk_gb,
        )
    ]


def decide_flavor_delete(a: Aggregate, cmd: FlavorDelete, cause: Cause) -> list[Event]:
    _existing(a, "flavor", cmd.name)
    return [cause.make(FlavorDeleted, SYSTEM, "flavor", cmd.name)]


def _system_name(name: str, what: str) -> None:
    # A cloud-wide object's name is its id and part of its subject.
    if not is_name(name):
        raise Invalid(f"{what} name {name!r}: 1-63 lowercase letters, digits and '-'")


def decide_public_image_create(a: Aggregate, cmd: ImageCreate, cause: Cause) -> list[Event]:
    _system_name(cmd.name, "a public image")
    _unused_name(a, "public image", cmd.name)
    return [_image_event(cmd, cause, SYSTEM, cmd.name, "public")]


def decide_external_network_create(a: Aggregate, cmd: NetworkCreate, cause: Cause) -> list[Event]:
    _system_name(cmd.name, "an external network")
    _unused_name(a, "external network", cmd.name)
    if not cmd.cidr:
        raise Invalid("an external network needs --cidr (its floating IPs come from it)")
    r = address_range(cmd.cidr, cmd.gateway, cmd.pool_start, cmd.pool_end, "external network")
    return [
        cause.make(
            NetworkCreated,
            SYSTEM,
            "network",
            cmd.name,
            name=cmd.name,
            external=True,
            cidr=str(_network(cmd.cidr, "cidr")),
            gateway=r.gateway,
            pool_start=r.start,
            pool_end=r.end,
        )
    ]


# -- prepare hooks (may read other state; run before the decision) -------------------


async def _system_attrs(service: Any, kind: str, name: str) -> dict[str, Any] | None:
    if not is_name(name):
        return None
    subject = system_subject(kind, name)
    tracked = service.cache.get(subject, Aggregate)
    if tracked.seq == 0:
        await service.cache.refresh(subject, tracked, fold_aggregate)
    return tracked.state.attrs


async def prepare_server(cmd: ServerCreate, caller: Any, service: Any) -> ServerPlan:
    flavor = await _system_attrs(service, "flavor", cmd.flavor) if cmd.flavor else None
    image = await _system_attrs(service, "image", cmd.image)
    return ServerPlan(cmd, flavor, image)


async def prepare_router(cmd: RouterCreate, caller: Any, service: Any) -> RouterPlan:
    name = cmd.external_network
    return RouterPlan(cmd, await _system_attrs(service, "network", name) if name else None)


# -- replies ------------------------------------------------------------------------


def resource_view(r: dict[str, Any]) -> dict[str, Any]:
    """A resource as callers see it: nested maps as lists, in a stable order."""
    out = dict(r)
    if "rules" in out:
        out["rules"] = [{"rule": k, **v} for k, v in sorted(out["rules"].items())]
    if "interfaces" in out:
        out["interfaces"] = [{"subnet": k, "port": v} for k, v in sorted(out["interfaces"].items())]
    return out


def _touched(kind: str) -> Any:
    """The reply of a tenant verb: the ``kind`` resource its events are about."""

    def result(w: World, events: list[Event]) -> Any:
        for ev in events:
            if ev.aggregate.kind == kind and ev.tenant == w.tenant:
                r = w.of(kind).get(ev.aggregate.id)
                if r is None:
                    return {"id": ev.aggregate.id, "status": "deleted"}
                return resource_view(r)
        return None

    return result


def quota_view(w: World) -> dict[str, Any]:
    return quota_report(w.tenant, {r: w.limit(r) for r in QUOTA_DEFAULTS}, w.usage())


def _aggregate_view(a: Aggregate) -> Any:
    return dict(a.attrs) if a.attrs is not None else {"status": "deleted"}


# -- the handler table ---------------------------------------------------------------


def _tenant(cmd: Any) -> str | None:
    return cmd.tenant


def _tenant_handler(
    verb: str, command: type, decide: Any, initial: Callable[[], World], **kw: Any
) -> Handler:
    kind = verb.split(".")[0]
    if kind == "quota":
        kw.setdefault("view", quota_view)
    else:
        kw.setdefault("result", _touched(kind))
    return Handler(
        verb=verb,
        command=command,
        permission=verb,
        boundary=lambda c: tenant_boundary(c.tenant),
        initial=initial,
        fold=fold,
        decide=decide,
        tenant_of=_tenant,
        **kw,
    )


def _on_system(verb: str, command: type, kind: str, decide: Any, **kw: Any) -> Handler:
    return Handler(
        verb=verb,
        command=command,
        permission=verb,
        boundary=lambda c: system_subject(kind, c.name),
        initial=Aggregate,
        fold=fold_aggregate,
        decide=decide,
        view=_aggregate_view,
        **kw,
    )


def handlers(quota_defaults: dict[str, int] | None = None) -> list[Handler]:
    """Every inventory verb; ``quota_defaults`` are the limits of tenants no
    ``quota set`` has touched (over the built-in ``QUOTA_DEFAULTS``)."""
    unknown = set(quota_defaults or {}) - set(QUOTA_DEFAULTS)
    if unknown:
        raise ValueError(f"unknown quota {', '.join(sorted(unknown))}")

    def world() -> World:
        return World(quota_defaults)

    def _in_tenant(verb: str, command: type, decide: Any, **kw: Any) -> Handler:
        return _tenant_handler(verb, command, decide, world, **kw)

    return [
        _on_system("host.register", HostRegister, "host", decide_host_register),
        _on_system("host.enable", HostSetEnabled, "host", _host_switch(True)),
        _on_system("host.disable", HostSetEnabled, "host", _host_switch(False)),
        _on_system("host.remove", HostRemove, "host", decide_host_remove),
        _on_system("flavor.create", FlavorCreate, "flavor", decide_flavor_create),
        _on_system("flavor.delete", FlavorDelete, "flavor", decide_flavor_delete),
        _on_system("image.create-public", ImageCreate, "image", decide_public_image_create),
        _on_system(
            "network.create-external", NetworkCreate, "network", decide_external_network_create
        ),
        _in_tenant("image.create", ImageCreate, decide_image_create),
        _in_tenant("image.delete", RefCommand, decide_image_delete),
        _in_tenant("server.create", ServerCreate, decide_server_create, prepare=prepare_server),
        _in_tenant("server.delete", RefCommand, decide_server_delete),
        _in_tenant(
            "server.stop",
            RefCommand,
            _power(ServerStopRequested, {"running"}, "stop"),
        ),
        _in_tenant(
            "server.start",
            RefCommand,
            _power(ServerStartRequested, {"stopped"}, "start"),
        ),
        _in_tenant(
            "server.reboot",
            RefCommand,
            _power(ServerRebootRequested, {"running"}, "reboot"),
        ),
        _in_tenant("server-group.create", ServerGroupCreate, decide_server_group_create),
        _in_tenant("server-group.delete", RefCommand, decide_server_group_delete),
        _in_tenant("volume.create", VolumeCreate, decide_volume_create),
        _in_tenant("volume.delete", RefCommand, decide_volume_delete),
        _in_tenant("volume.attach", VolumeAttach, decide_volume_attach),
        _in_tenant("volume.detach", VolumeAttach, decide_volume_detach),
        _in_tenant(
            "network.create",
            NetworkCreate,
            decide_network_create,
            also=lambda c: SEGMENT_POOL_SUBJECT,
            also_initial=Aggregate,
            also_fold=fold_aggregate,
        ),
        _in_tenant("network.delete", RefCommand, decide_network_delete),
        _in_tenant("subnet.create", SubnetCreate, decide_subnet_create),
        _in_tenant("subnet.delete", RefCommand, decide_subnet_delete),
        _in_tenant("port.create", PortCreate, decide_port_create),
        _in_tenant("port.delete", RefCommand, decide_port_delete),
        _in_tenant("port.set", PortSet, decide_port_set),
        _in_tenant(
            "router.create",
            RouterCreate,
            decide_router_create,
            prepare=prepare_router,
            # A gateway takes an address from the external network's pool.
            also=lambda p: (
                system_subject("network", p.cmd.external_network)
                if p.cmd.external_network
                else None
            ),
            also_initial=Aggregate,
            also_fold=fold_aggregate,
        ),
        _in_tenant("router.delete", RefCommand, decide_router_delete),
        _in_tenant("router.add-subnet", RouterInterface, decide_router_add_subnet),
        _in_tenant("router.remove-subnet", RouterInterface, decide_router_remove_subnet),
        _in_tenant(
            "floating-ip.create",
            FloatingIpCreate,
            decide_fip_create,
            # Takes an address from the external network's pool, which
            # every tenant shares: conditioned on the pool's subject too.
            also=lambda c: system_subject("network", c.network),
            also_initial=Aggregate,
            also_fold=fold_aggregate,
        ),
        _in_tenant("floating-ip.delete", RefCommand, decide_fip_delete),
        _in_tenant("floating-ip.associate", FloatingIpAssociate, decide_fip_associate),
        _in_tenant("floating-ip.disassociate", RefCommand, decide_fip_disassociate),
        _in_tenant("security-group.create", SecurityGroupCreate, decide_sg_create),
        _in_tenant("security-group.delete", RefCommand, decide_sg_delete),
        _in_tenant("security-group.rule-add", SecurityGroupRuleAdd, decide_sg_rule_add),
        _in_tenant("security-group.rule-remove", SecurityGroupRuleRemove, decide_sg_rule_remove),
        _in_tenant("qos-policy.create", QosPolicyCreate, decide_qos_create),
        _in_tenant("qos-policy.delete", RefCommand, decide_qos_delete),
        _in_tenant("quota.set", QuotaSetCommand, decide_quota_set),
    ]
