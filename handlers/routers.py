"""Routers, floating IPs and the external networks they draw addresses from.

An external network is cloud-wide (``ev._system.network.<name>``) and its
subject's state is its address pool, which every tenant shares. A floating
IP, and a router with an external gateway, take an address from the pool:
those decisions read the tenant's world and the pool together and are
appended on both conditions in one atomic batch, so an address is never
handed to two holders. Giving one back needs no condition.
"""

from __future__ import annotations

import msgspec

from stratus.events.errors import Conflict, Invalid, NotFound
from stratus.events.ids import new_id
from stratus.events.model import Cause, Event
from stratus.events.resources import (
    SYSTEM,
    AddressAllocated,
    AddressReleased,
    FloatingIpAssociate,
    FloatingIpAssociated,
    FloatingIpCreate,
    FloatingIpCreated,
    FloatingIpDeleted,
    FloatingIpDisassociated,
    NetworkCreate,
    NetworkCreated,
    PortDeleted,
    RefCommand,
    RouterAdminStateSet,
    RouterCreate,
    RouterCreated,
    RouterDeleted,
    RouterInterface,
    RouterInterfaceAdded,
    RouterInterfaceRemoved,
    RouterSet,
)
from stratus.handlers import quota
from stratus.handlers.addressing import address_range, first_free, parse_network
from stratus.handlers.inventory import delete_unused, unique, unused_name
from stratus.handlers.lookup import Lookup
from stratus.handlers.networks import new_port
from stratus.handlers.records import FloatingIp, Network, Port, Router
from stratus.handlers.world import Aggregate, World, live_tenant, system_subject

Pool = Aggregate[Network]


def decide_external_network_create(a: Pool, cmd: NetworkCreate, cause: Cause) -> list[Event]:
    unused_name(a, "external network", cmd.name)
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
            cidr=str(parse_network(cmd.cidr, "cidr")),
            gateway=r.gateway,
            pool_start=r.start,
            pool_end=r.end,
        )
    ]


def address_pool(cmd: FloatingIpCreate) -> str:
    """The subject a floating IP create also decides on: its network's pool."""
    return system_subject("network", cmd.network)


def gateway_pool(plan: RouterPlan) -> str | None:
    """A router with an external gateway takes an address from the external
    network's pool too; one without decides on its tenant alone."""
    name = plan.cmd.external_network
    return system_subject("network", name) if name else None


def _take(
    pool: Network, allocated: Pool, tenant: str, holder: str, cause: Cause
) -> AddressAllocated:
    """The pool's first free address, allocated to ``holder``."""
    address = first_free(
        pool.pool_start,
        pool.pool_end,
        {*allocated.allocated, pool.gateway},
        f"external network {pool.name}",
    )
    return cause.make(
        AddressAllocated,
        SYSTEM,
        "network",
        pool.name,
        address=address,
        holder_tenant=tenant,
        holder=holder,
    )


def _give_back(network: str, address: str, tenant: str, holder: str, cause: Cause) -> Event:
    return cause.make(
        AddressReleased,
        SYSTEM,
        "network",
        network,
        address=address,
        holder_tenant=tenant,
        holder=holder,
    )


# -- routers ----------------------------------------------------------------------------


class RouterPlan(msgspec.Struct, frozen=True):
    """``router create`` with the external network ``prepare`` looked up.

    Read, not conditioned on: the router writes nothing to the network's
    subject (one event can carry only one condition), and external networks
    are never deleted."""

    cmd: RouterCreate
    external: Network | None

    @property
    def tenant(self) -> str | None:
        return self.cmd.tenant


async def prepare_router(cmd: RouterCreate, lookup: Lookup) -> RouterPlan:
    name = cmd.external_network
    return RouterPlan(cmd, await lookup.system(Network, name) if name else None)


def decide_router_create(
    state: World | tuple[World, Pool | None], plan: RouterPlan, cause: Cause
) -> list[Event]:
    """A router; with an external network (decided with its pool as well)
    it takes an address from the pool for its gateway, as a floating IP does."""
    w, pool = state if isinstance(state, tuple) else (state, None)
    cmd = plan.cmd
    t = cmd.tenant or ""
    live_tenant(w, t)
    unique(w.routers, cmd.name)
    if cmd.external_network and not (plan.external is not None and plan.external.external):
        raise NotFound(f"external network {cmd.external_network} not found")
    quota.check(w, {"routers": 1})
    rid = new_id()
    gateway = None
    if cmd.external_network and pool is not None and pool.attrs is not None:
        gateway = _take(pool.attrs, pool, t, rid, cause)
    router = cause.make(
        RouterCreated,
        t,
        "router",
        rid,
        name=cmd.name,
        external_network=cmd.external_network or "",
        external_ip=gateway.address if gateway else "",
        admin_up=cmd.admin_up,
    )
    return [router, gateway] if gateway else [router]


def decide_router_delete(w: World, cmd: RefCommand, cause: Cause) -> list[Event]:
    def interfaces(r: Router) -> list[str]:
        return [
            f"subnet {getattr(w.subnets.get(s), 'name', s)} (remove it first)"
            for s in r.interfaces or {}
        ]

    out = delete_unused(w.routers, cmd, cause, RouterDeleted, interfaces)
    r = w.routers.find(cmd.ref)
    if r.external_ip:
        t = cmd.tenant or ""
        out.append(_give_back(r.external_network, r.external_ip, t, r.id, cause))
    return out


def decide_router_set(w: World, cmd: RouterSet, cause: Cause) -> list[Event]:
    """A router's administrative state: a down router routes nothing (the
    network agent removes its namespace); nothing if it already is so."""
    r = w.routers.find(cmd.ref)
    if r.admin_up == cmd.admin_up:
        return []
    t = cmd.tenant or ""
    return [cause.make(RouterAdminStateSet, t, "router", r.id, admin_up=cmd.admin_up)]


def decide_router_add_subnet(w: World, cmd: RouterInterface, cause: Cause) -> list[Event]:
    t = cmd.tenant or ""
    r, s = w.routers.find(cmd.router), w.subnets.find(cmd.subnet)
    if s.id in (r.interfaces or {}):
        return []
    for other in w.routers.values():
        if s.id in (other.interfaces or {}):
            raise Conflict(f"subnet {s.name} is already on router {other.name}")
    net = w.networks.find(s.network)
    port = new_port(
        w,
        cause,
        t,
        net,
        name=f"{r.name}-{s.name}",
        subnet_ref=s.id,
        ip=s.gateway,
        device=r.id,
        device_owner="router_interface",
        gateway_ok=True,
    )
    quota.check(w, {"ports": 1})
    added = cause.make(
        RouterInterfaceAdded, t, "router", r.id, subnet=s.id, port=port.aggregate.id, ip=s.gateway
    )
    return [port, added]


def decide_router_remove_subnet(w: World, cmd: RouterInterface, cause: Cause) -> list[Event]:
    t = cmd.tenant or ""
    r, s = w.routers.find(cmd.router), w.subnets.find(cmd.subnet)
    port = (r.interfaces or {}).get(s.id)
    if port is None:
        raise Conflict(f"subnet {s.name} is not on router {r.name}")
    return [
        cause.make(RouterInterfaceRemoved, t, "router", r.id, subnet=s.id, port=port),
        cause.make(PortDeleted, t, "port", port),
    ]


# -- floating IPs -------------------------------------------------------------------------


def decide_fip_create(
    state: tuple[World, Pool | None], cmd: FloatingIpCreate, cause: Cause
) -> list[Event]:
    w, pool = state
    t = cmd.tenant or ""
    live_tenant(w, t)
    if pool is None or pool.attrs is None or not pool.attrs.external:
        raise NotFound(f"external network {cmd.network} not found")
    quota.check(w, {"floating_ips": 1})
    fid = new_id()
    taken = _take(pool.attrs, pool, t, fid, cause)
    created = cause.make(
        FloatingIpCreated, t, "floating-ip", fid, address=taken.address, network=cmd.network
    )
    return [created, taken]


def decide_fip_delete(w: World, cmd: RefCommand, cause: Cause) -> list[Event]:
    t = cmd.tenant or ""
    f = _fip(w, cmd.ref)
    return [
        cause.make(FloatingIpDeleted, t, "floating-ip", f.id),
        _give_back(f.network, f.address, t, f.id, cause),
    ]


def _fip(w: World, ref: str) -> FloatingIp:
    """A floating IP by its address, else by its id."""
    for f in w.floating_ips.values():
        if f.address == ref:
            return f
    return w.floating_ips.find(ref)


def decide_fip_associate(w: World, cmd: FloatingIpAssociate, cause: Cause) -> list[Event]:
    t = cmd.tenant or ""
    f = _fip(w, cmd.floating_ip)
    if (cmd.server is None) == (cmd.port is None):
        raise Invalid("give the server or the port to associate with (one of them)")
    port: Port
    if cmd.port is not None:
        port = w.ports.find(cmd.port)
        server = port.device if port.device_owner == "compute" else ""
    else:
        s = w.servers.find(cmd.server or "")
        ports = sorted((p for p in w.ports.values() if p.device == s.id), key=lambda p: p.id)
        if not ports:
            raise Conflict(f"server {s.name} has no port (create it with --network)")
        port, server = ports[0], s.id
    if not port.ip:
        raise Conflict(f"port {port.name} has no fixed address")
    if f.port == port.id:
        return []
    if f.port:
        raise Conflict(f"floating ip {f.address} is associated already; disassociate first")
    return [
        cause.make(
            FloatingIpAssociated,
            t,
            "floating-ip",
            f.id,
            port=port.id,
            server=server,
            fixed_ip=port.ip,
        )
    ]


def decide_fip_disassociate(w: World, cmd: RefCommand, cause: Cause) -> list[Event]:
    f = _fip(w, cmd.ref)
    if not f.port:
        return []
    t = cmd.tenant or ""
    return [cause.make(FloatingIpDisassociated, t, "floating-ip", f.id, port=f.port)]
