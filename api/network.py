"""Neutron v2.0: networks, subnets, ports, routers and their interfaces,
floating IPs, security groups and rules, extensions and quotas.

Each Neutron resource is the Stratus resource of the same kind. Filters by
any shown attribute (``?name=``, ``?id=``, ``?device_id=``), ``fields``,
``limit`` and ``marker`` are applied to what the tenant's queries return.
What Stratus does not have (shared networks, several allocation pools, host
routes, a subnet without a gateway, renaming) is refused with a 400 that
says so, never accepted and dropped.
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

import msgspec
from aiohttp import web

from stratus.api.http import (
    Face,
    caller,
    decode,
    deleter,
    fetch,
    json_response,
    no_content,
    origin,
    page,
    path_id,
    query_int,
    session,
)
from stratus.events.errors import Conflict, Forbidden, Invalid, NotFound
from stratus.events.kinds import PLURALS

PREFIX = "/network"
API = f"{PREFIX}/v2.0"

_TYPES = {
    400: "BadRequest",
    401: "NotAuthorized",
    403: "PolicyNotAuthorized",
    404: "NotFound",
    409: "Conflict",
    413: "RequestEntityTooLarge",
    503: "ServiceUnavailable",
}


def fault(status: int, message: str, kind: str) -> web.Response:
    kind_type = "OverQuota" if kind == "quota_exceeded" else _TYPES.get(status, "NeutronError")
    return json_response(
        {"NeutronError": {"type": kind_type, "message": message, "detail": ""}}, status
    )


# Neutron's OverQuota is a 409 Conflict (what its clients and Tempest expect).
FACE = Face("network", PREFIX, fault, quota_status=409)

Text255 = Annotated[str, msgspec.Meta(max_length=255)]
Id = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.:-]{1,64}(?!\n)$")]


# -- versions and extensions -----------------------------------------------------


async def versions(request: web.Request) -> web.Response:
    href = f"{origin(request)}{API}/"
    return json_response(
        {
            "versions": [
                {"id": "v2.0", "status": "CURRENT", "links": [{"rel": "self", "href": href}]}
            ]
        }
    )


COLLECTIONS = {
    "network": "networks",
    "subnet": "subnets",
    "port": "ports",
    "router": "routers",
    "floatingip": "floatingips",
    "security_group": "security-groups",
    "security_group_rule": "security-group-rules",
    "quota": "quotas",
}


async def version(request: web.Request) -> web.Response:
    base = f"{origin(request)}{API}"
    return json_response(
        {
            "resources": [
                {"name": n, "collection": c, "links": [{"rel": "self", "href": f"{base}/{c}"}]}
                for n, c in COLLECTIONS.items()
            ]
        }
    )


EXTENSIONS = {
    "external-net": (
        "Neutron external network",
        "Adds external network attribute to network resource.",
    ),
    "router": (
        "Neutron L3 Router",
        "Router abstraction for basic L3 forwarding between L2 Neutron networks "
        "and access to external networks via a NAT gateway.",
    ),
    "security-group": ("security-group", "The security groups extension."),
    "quotas": ("Quota management support", "Expose functions for quotas management per project"),
    "project-id": (
        "project_id field enabled",
        "Extension that indicates that project_id field is enabled.",
    ),
}


def _extension(alias: str) -> dict[str, Any]:
    name, description = EXTENSIONS[alias]
    return {
        "alias": alias,
        "name": name,
        "description": description,
        "links": [],
        "updated": "2012-10-05T10:00:00-00:00",
    }


async def extensions(request: web.Request) -> web.Response:
    await _whoami(request)
    return json_response({"extensions": [_extension(a) for a in EXTENSIONS]})


async def extension(request: web.Request) -> web.Response:
    await _whoami(request)
    alias = request.match_info["alias"]
    if alias not in EXTENSIONS:
        raise NotFound(f"extension with alias {alias[:64]} does not exist")
    return json_response({"extension": _extension(alias)})


async def _whoami(request: web.Request) -> None:
    """Any answer needs a valid token: ask the control plane once."""
    me = caller(request)
    await session(request).query("tenant", {"tenant": me.tenant})


# -- shared view parts ---------------------------------------------------------------


def _std(r: dict[str, Any]) -> dict[str, Any]:
    """Attributes every Neutron resource has."""
    tenant = r.get("tenant", "")
    return {
        "tenant_id": tenant,
        "project_id": tenant,
        "description": r.get("description") or "",
        "tags": [],
        "created_at": r.get("created_at"),
        "updated_at": r.get("updated_at"),
        "revision_number": 0,
    }


_PAGING = {"fields", "limit", "marker", "sort_key", "sort_dir", "page_reverse", "verbose"}


def _matches(item: dict[str, Any], key: str, wanted: list[str]) -> bool:
    value = item.get(key)
    if isinstance(value, bool):
        value = "true" if value else "false"
        wanted = [w.lower() for w in wanted]
    elif value is None:
        value = ""
    elif isinstance(value, list):
        return any(str(v) in wanted for v in value)
    return str(value) in wanted


def listing(request: web.Request, collection: str, items: list[dict[str, Any]]) -> web.Response:
    """Neutron's filters, ``fields``, ``limit``/``marker`` and next link."""
    q = request.query
    for key in {k for k in q if k not in _PAGING}:
        wanted = q.getall(key)
        items = [i for i in items if _matches(i, key, wanted)]
    limit = query_int(request, "limit")
    shown, more = page(items, q.get("marker"), limit)
    fields = [f for f in q.getall("fields", []) if f]
    if fields:
        shown = [{k: v for k, v in i.items() if k in fields} for i in shown]
    body: dict[str, Any] = {collection: shown}
    if more:
        params = {k: v for k, v in q.items() if k != "marker"}
        params["marker"] = items[len(shown) - 1]["id"] if not fields else shown[-1].get("id", "")
        url = request.url.with_query(params)
        body[f"{collection}_links"] = [{"rel": "next", "href": f"{origin(request)}{url.path_qs}"}]
    return json_response(body)


def lister(kind: str, collection: str, view: Any) -> Any:
    """``GET /<collection>``: the tenant's rows of ``kind`` as ``view`` shows them."""

    async def list_(request: web.Request) -> web.Response:
        me = caller(request)
        rows = await session(request).query(PLURALS[kind], {"tenant": me.tenant})
        return listing(request, collection, [view(r) for r in rows])

    return list_


def shower(kind: str, key: str, view: Any) -> Any:
    """``GET /<collection>/{id}``: one of the tenant's ``kind`` by id."""

    async def show(request: web.Request) -> web.Response:
        rid = path_id(request, what=kind)
        me = caller(request)
        return one(request, key, view(await fetch(session(request), kind, me.tenant, rid)))

    return show


def one(request: web.Request, key: str, item: dict[str, Any], status: int = 200) -> web.Response:
    fields = [f for f in request.query.getall("fields", []) if f]
    if fields:
        item = {k: v for k, v in item.items() if k in fields}
    return json_response({key: item}, status)


def _tenant_of(request: web.Request, asked: str | None) -> str:
    """The project a create is for: the caller's own (the cloud admin: any)."""
    me = caller(request)
    if asked and asked != me.tenant and "admin" not in me.roles:
        raise Forbidden(f"you may not create resources in project {asked}")
    return asked or me.tenant


class World(msgspec.Struct):
    """The tenant's network resources, read together for one answer."""

    networks: list[dict[str, Any]]
    subnets: list[dict[str, Any]]
    ports: list[dict[str, Any]]


async def _world(s: Any, tenant: str, *, ports: bool = True) -> World:
    queries = [s.query("networks", {"tenant": tenant}), s.query("subnets", {"tenant": tenant})]
    if ports:
        queries.append(s.query("ports", {"tenant": tenant}))
    found = await asyncio.gather(*queries)
    return World(found[0], found[1], found[2] if ports else [])


# -- networks -----------------------------------------------------------------------


def network_view(n: dict[str, Any], subnets: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "id": n["id"],
        "name": n["name"],
        "status": "ACTIVE",
        "admin_state_up": True,
        "shared": False,
        "router:external": bool(n.get("external")),
        "subnets": [s["id"] for s in subnets if s["network"] == n["id"]],
        "mtu": 1450,
        "port_security_enabled": True,
        "availability_zone_hints": [],
        "availability_zones": ["nova"],
        "ipv4_address_scope": None,
        "ipv6_address_scope": None,
        "l2_adjacency": True,
        **_std(n),
    }


class _Network(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: Text255 = ""
    admin_state_up: bool = True
    shared: bool = False
    router_external: bool = msgspec.field(default=False, name="router:external")
    description: Text255 = ""
    mtu: int | None = None
    port_security_enabled: bool = True
    availability_zone_hints: list[str] = []
    tenant_id: Text255 | None = None
    project_id: Text255 | None = None
    dns_domain: Text255 | None = None
    qos_policy_id: Text255 | None = None
    provider_network_type: str | None = msgspec.field(default=None, name="provider:network_type")
    provider_physical_network: str | None = msgspec.field(
        default=None, name="provider:physical_network"
    )
    provider_segmentation_id: int | None = msgspec.field(
        default=None, name="provider:segmentation_id"
    )


class NetworkBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    network: _Network


class NetworkUpdate(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    network: dict[str, Any]


def _holds(have: list[dict[str, Any]], asked: Any) -> bool:
    """Whether the addresses a port has satisfy a ``fixed_ips`` request."""
    if not isinstance(asked, list) or len(asked) != len(have):
        return False
    return all(
        isinstance(a, dict)
        and a.get("subnet_id", h["subnet_id"]) == h["subnet_id"]
        and a.get("ip_address", h["ip_address"]) == h["ip_address"]
        for a, h in zip(asked, have, strict=True)
    )


def _unsupported(what: str) -> Invalid:
    return Invalid(f"{what} is not supported by Stratus")


async def list_networks(request: web.Request) -> web.Response:
    me = caller(request)
    w = await _world(session(request), me.tenant, ports=False)
    return listing(request, "networks", [network_view(n, w.subnets) for n in w.networks])


async def show_network(request: web.Request) -> web.Response:
    nid = path_id(request, what="network")
    me = caller(request)
    s = session(request)
    n, subnets = await asyncio.gather(
        fetch(s, "network", me.tenant, nid), s.query("subnets", {"tenant": me.tenant})
    )
    return one(request, "network", network_view(n, subnets))


async def create_network(request: web.Request) -> web.Response:
    body = (await decode(request, NetworkBody)).network
    if body.shared:
        raise _unsupported("a shared network")
    if body.router_external:
        raise _unsupported(
            "creating an external network here (stratus network create --external --cidr)"
        )
    if body.provider_network_type or body.provider_segmentation_id is not None:
        raise _unsupported("choosing the provider segment")
    if not body.admin_state_up:
        raise _unsupported("admin_state_up false")
    tenant = _tenant_of(request, body.project_id or body.tenant_id)
    s = session(request)
    made = await s.command("network.create", {"name": body.name, "tenant": tenant})
    # Shown as the views have it (a read after the write sees the same).
    shown = await fetch(s, "network", tenant, made["id"])
    return one(request, "network", network_view(shown, []), 201)


def _renaming(
    view: dict[str, Any], changes: dict[str, Any], tenant: str, described: bool = False
) -> dict[str, Any]:
    """The rename command the update's ``name`` (and a security group's
    ``description``) asks for, taken out of ``changes``; empty if none."""
    cmd: dict[str, Any] = {}
    for key in ("name", "description") if described else ("name",):
        if key in changes:
            value = changes.pop(key)
            if not isinstance(value, str):
                raise Invalid(f"{key} must be a string")
            if value != view[key]:
                cmd[key] = value
    return {"ref": view["id"], "tenant": tenant, **cmd} if cmd else {}


def _same(current: dict[str, Any], changes: dict[str, Any], what: str) -> None:
    """Updates Stratus cannot make are refused unless they change nothing."""
    for key, value in changes.items():
        if current.get(key) != value:
            raise Invalid(f"changing {key} of a {what} is not supported by Stratus")


async def update_network(request: web.Request) -> web.Response:
    nid = path_id(request, what="network")
    changes = (await decode(request, NetworkUpdate)).network
    me = caller(request)
    s = session(request)
    n, subnets = await asyncio.gather(
        fetch(s, "network", me.tenant, nid), s.query("subnets", {"tenant": me.tenant})
    )
    view = network_view(n, subnets)
    rename = _renaming(view, changes, me.tenant)
    _same(view, changes, "network")  # all refused before anything is sent
    if rename:
        await s.command("network.rename", rename)
        view = network_view(await fetch(s, "network", me.tenant, nid), subnets)
    return one(request, "network", view)


async def delete_network(request: web.Request) -> web.Response:
    nid = path_id(request, what="network")
    me = caller(request)
    s = session(request)
    n = await fetch(s, "network", me.tenant, nid)
    w = await _world(s, me.tenant)
    users = [p for p in w.ports if p["network"] == nid]
    if users:
        raise Conflict(
            f"unable to complete operation on network {nid}: one or more ports are in use on it"
        )
    # Neutron deletes a network's subnets with it.
    for sub in (x for x in w.subnets if x["network"] == n["id"]):
        await s.command("subnet.delete", {"ref": sub["id"], "tenant": me.tenant})
    await s.command("network.delete", {"ref": nid, "tenant": me.tenant})
    return no_content()


# -- subnets ------------------------------------------------------------------------


def subnet_view(s: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": s["id"],
        "name": s["name"],
        "network_id": s["network"],
        "ip_version": s.get("ip_version", 4),
        "cidr": s["cidr"],
        "gateway_ip": s["gateway"] or None,
        "allocation_pools": [{"start": s["pool_start"], "end": s["pool_end"]}],
        "dns_nameservers": s.get("dns") or [],
        "host_routes": [],
        "enable_dhcp": s.get("dhcp", True),
        "ipv6_ra_mode": None,
        "ipv6_address_mode": None,
        "subnetpool_id": None,
        "service_types": [],
        "segment_id": None,
        **_std(s),
    }


class _Pool(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    start: Text255
    end: Text255


class _Subnet(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    network_id: Id
    cidr: Text255 | None = None
    ip_version: int = 4
    name: Text255 = ""
    gateway_ip: Text255 | None = ""
    allocation_pools: list[_Pool] = []
    dns_nameservers: Annotated[list[Text255], msgspec.Meta(max_length=4)] = []
    host_routes: list[dict[str, Any]] = []
    enable_dhcp: bool = True
    description: Text255 = ""
    tenant_id: Text255 | None = None
    project_id: Text255 | None = None
    subnetpool_id: Text255 | None = None
    prefixlen: int | None = None
    use_default_subnetpool: bool = False
    ipv6_ra_mode: str | None = None
    ipv6_address_mode: str | None = None
    service_types: list[str] = []
    segment_id: Text255 | None = None


class SubnetBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    subnet: _Subnet


class SubnetUpdate(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    subnet: dict[str, Any]


async def create_subnet(request: web.Request) -> web.Response:
    b = (await decode(request, SubnetBody)).subnet
    if not b.cidr:
        raise _unsupported("a subnet from a subnet pool (give cidr)")
    if b.gateway_ip is None:
        raise _unsupported("a subnet without a gateway")
    if len(b.allocation_pools) > 1:
        raise _unsupported("more than one allocation pool")
    if b.host_routes:
        raise _unsupported("host routes")
    if b.ip_version not in (4, 6):
        raise Invalid(f"ip_version {b.ip_version}: 4 or 6")
    tenant = _tenant_of(request, b.project_id or b.tenant_id)
    cmd: dict[str, Any] = {
        "name": b.name,
        "network": b.network_id,
        "cidr": b.cidr,
        "dns": list(b.dns_nameservers),
        "dhcp": b.enable_dhcp,
        "tenant": tenant,
    }
    if b.gateway_ip:
        cmd["gateway"] = b.gateway_ip
    if b.allocation_pools:
        cmd["pool_start"], cmd["pool_end"] = b.allocation_pools[0].start, b.allocation_pools[0].end
    s = session(request)
    await fetch(s, "network", tenant, b.network_id)  # by id only, as Neutron
    made = await s.command("subnet.create", cmd)
    return one(request, "subnet", subnet_view(await fetch(s, "subnet", tenant, made["id"])), 201)


async def update_subnet(request: web.Request) -> web.Response:
    sid = path_id(request, what="subnet")
    changes = (await decode(request, SubnetUpdate)).subnet
    me = caller(request)
    s = session(request)
    view = subnet_view(await fetch(s, "subnet", me.tenant, sid))
    rename = _renaming(view, changes, me.tenant)
    _same(view, changes, "subnet")
    if rename:
        await s.command("subnet.rename", rename)
        view = subnet_view(await fetch(s, "subnet", me.tenant, sid))
    return one(request, "subnet", view)


# -- ports --------------------------------------------------------------------------

OWNERS = {"compute": "compute:nova", "router_interface": "network:router_interface"}


async def _up_devices(s: Any, tenant: str) -> set[str]:
    """Devices whose ports are bound: routers, and servers that run.

    The network agents do not report ports bound, so a port's Neutron status
    comes from its device: a router's interface is ACTIVE while the router
    exists (as Neutron's, whatever the router's admin state: status is the
    port's binding), a server's port while the server runs."""
    routers, servers = await asyncio.gather(
        s.query("routers", {"tenant": tenant}), s.query("servers", {"tenant": tenant})
    )
    up = {r["id"] for r in routers}
    return up | {v["id"] for v in servers if v["status"] == "running"}


def port_view(p: dict[str, Any], up: set[str]) -> dict[str, Any]:
    active = p.get("status") == "active" or (p.get("device") or "") in up
    return {
        "id": p["id"],
        "name": p["name"],
        "network_id": p["network"],
        "mac_address": p["mac"],
        "fixed_ips": [{"subnet_id": p["subnet"], "ip_address": p["ip"]}] if p.get("ip") else [],
        "device_id": p.get("device") or "",
        "device_owner": OWNERS.get(p.get("device_owner") or "", p.get("device_owner") or ""),
        "status": "ACTIVE" if active else "DOWN",
        "admin_state_up": True,
        "security_groups": p.get("security_groups") or [],
        "allowed_address_pairs": [],
        "extra_dhcp_opts": [],
        "binding:vnic_type": "normal",
        "port_security_enabled": True,
        "qos_policy_id": p.get("qos_policy") or None,
        **_std(p),
    }


class _FixedIp(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    subnet_id: Id | None = None
    ip_address: Text255 | None = None


class _Port(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    network_id: Id
    name: Text255 = ""
    fixed_ips: Annotated[list[_FixedIp], msgspec.Meta(max_length=1)] = []
    security_groups: Annotated[list[Id], msgspec.Meta(max_length=16)] | None = None
    admin_state_up: bool = True
    description: Text255 = ""
    device_id: Text255 = ""
    device_owner: Text255 = ""
    mac_address: Text255 | None = None
    port_security_enabled: bool = True
    qos_policy_id: Id | None = None
    tenant_id: Text255 | None = None
    project_id: Text255 | None = None
    allowed_address_pairs: list[dict[str, Any]] = []
    binding_vnic_type: str | None = msgspec.field(default=None, name="binding:vnic_type")
    binding_host_id: str | None = msgspec.field(default=None, name="binding:host_id")


class PortBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    port: _Port


class PortUpdate(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    port: dict[str, Any]


async def list_ports(request: web.Request) -> web.Response:
    me = caller(request)
    s = session(request)
    rows, up = await asyncio.gather(
        s.query("ports", {"tenant": me.tenant}), _up_devices(s, me.tenant)
    )
    return listing(request, "ports", [port_view(p, up) for p in rows])


async def _port_shown(s: Any, tenant: str, pid: str) -> dict[str, Any]:
    p, up = await asyncio.gather(fetch(s, "port", tenant, pid), _up_devices(s, tenant))
    return port_view(p, up)


async def show_port(request: web.Request) -> web.Response:
    pid = path_id(request, what="port")
    me = caller(request)
    s = session(request)
    return one(request, "port", await _port_shown(s, me.tenant, pid))


async def create_port(request: web.Request) -> web.Response:
    b = (await decode(request, PortBody)).port
    if b.device_id or b.device_owner or b.mac_address or b.binding_host_id:
        raise _unsupported("setting a port's device, owner, MAC or binding")
    if b.allowed_address_pairs or not b.port_security_enabled or not b.admin_state_up:
        raise _unsupported("allowed address pairs, disabled port security or admin state")
    tenant = _tenant_of(request, b.project_id or b.tenant_id)
    cmd: dict[str, Any] = {"name": b.name, "network": b.network_id, "tenant": tenant}
    if b.fixed_ips:
        if b.fixed_ips[0].subnet_id:
            cmd["subnet"] = b.fixed_ips[0].subnet_id
        if b.fixed_ips[0].ip_address:
            cmd["ip"] = b.fixed_ips[0].ip_address
    if b.security_groups is not None:
        if not b.security_groups:
            raise _unsupported("a port without security groups")
        cmd["security_groups"] = list(b.security_groups)
    if b.qos_policy_id:
        cmd["qos_policy"] = b.qos_policy_id
    s = session(request)
    await fetch(s, "network", tenant, b.network_id)
    made = await s.command("port.create", cmd)
    return one(request, "port", await _port_shown(s, tenant, made["id"]), 201)


async def update_port(request: web.Request) -> web.Response:
    pid = path_id(request, what="port")
    changes = dict((await decode(request, PortUpdate)).port)
    me = caller(request)
    s = session(request)
    current = await _port_shown(s, me.tenant, pid)
    cmd: dict[str, Any] = {"ref": pid, "tenant": me.tenant}
    if "security_groups" in changes:
        groups = changes.pop("security_groups")
        if not isinstance(groups, list) or not groups:
            raise Invalid("security_groups: a non-empty list of ids")
        cmd["security_groups"] = groups
    if "qos_policy_id" in changes:
        cmd["qos_policy"] = changes.pop("qos_policy_id") or ""
    if "fixed_ips" in changes and _holds(current["fixed_ips"], changes["fixed_ips"]):
        changes.pop("fixed_ips")  # what it asks for is what the port has
    _same(current, changes, "port")
    if len(cmd) > 2:
        await s.command("port.set", cmd)
    return one(request, "port", await _port_shown(s, me.tenant, pid))


# -- routers ------------------------------------------------------------------------


def router_view(r: dict[str, Any]) -> dict[str, Any]:
    gateway = None
    if r.get("external_network"):
        gateway = {
            "network_id": r["external_network"],
            "enable_snat": True,
            "external_fixed_ips": [
                {"subnet_id": r["external_network"], "ip_address": r["external_ip"]}
            ]
            if r.get("external_ip")
            else [],
        }
    return {
        "id": r["id"],
        "name": r["name"],
        "status": "ACTIVE" if r.get("admin_up", True) else "DOWN",
        "admin_state_up": r.get("admin_up", True),
        "external_gateway_info": gateway,
        "routes": [],
        "distributed": False,
        "ha": False,
        "availability_zone_hints": [],
        "availability_zones": ["nova"],
        "flavor_id": None,
        **_std(r),
    }


class _Gateway(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    network_id: Id | None = None
    enable_snat: bool = True
    external_fixed_ips: list[dict[str, Any]] = []


class _Router(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: Text255 = ""
    admin_state_up: bool = True
    description: Text255 = ""
    external_gateway_info: _Gateway | None = None
    distributed: bool | None = None
    ha: bool | None = None
    availability_zone_hints: list[str] = []
    tenant_id: Text255 | None = None
    project_id: Text255 | None = None


class RouterBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    router: _Router


class RouterUpdate(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    router: dict[str, Any]


class InterfaceBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    subnet_id: Id | None = None
    port_id: Id | None = None


async def create_router(request: web.Request) -> web.Response:
    b = (await decode(request, RouterBody)).router
    if b.distributed or b.ha:
        raise _unsupported("distributed or HA routers")
    tenant = _tenant_of(request, b.project_id or b.tenant_id)
    cmd: dict[str, Any] = {"name": b.name, "admin_up": b.admin_state_up, "tenant": tenant}
    if b.external_gateway_info is not None and b.external_gateway_info.network_id:
        if b.external_gateway_info.external_fixed_ips or not b.external_gateway_info.enable_snat:
            raise _unsupported("choosing the gateway's address or disabling SNAT")
        cmd["external_network"] = b.external_gateway_info.network_id
    s = session(request)
    made = await s.command("router.create", cmd)
    return one(request, "router", router_view(await fetch(s, "router", tenant, made["id"])), 201)


async def update_router(request: web.Request) -> web.Response:
    rid = path_id(request, what="router")
    changes = (await decode(request, RouterUpdate)).router
    me = caller(request)
    s = session(request)
    view = router_view(await fetch(s, "router", me.tenant, rid))
    if "external_gateway_info" in changes:
        asked = changes.pop("external_gateway_info") or None
        have = view["external_gateway_info"]
        if (asked or {}).get("network_id") != (have or {}).get("network_id"):
            raise _unsupported("setting or clearing a router's gateway after creating it")
    admin_up = changes.pop("admin_state_up", view["admin_state_up"])
    if not isinstance(admin_up, bool):
        raise Invalid("admin_state_up must be true or false")
    rename = _renaming(view, changes, me.tenant)
    _same(view, changes, "router")
    if rename:
        await s.command("router.rename", rename)
    if admin_up != view["admin_state_up"]:
        await s.command("router.set", {"ref": rid, "admin_up": admin_up, "tenant": me.tenant})
    if rename or admin_up != view["admin_state_up"]:
        view = router_view(await fetch(s, "router", me.tenant, rid))
    return one(request, "router", view)


async def router_interface(request: web.Request) -> web.Response:
    rid = path_id(request, what="router")
    adding = request.path.endswith("/add_router_interface")
    b = await decode(request, InterfaceBody)
    me = caller(request)
    s = session(request)
    router = await fetch(s, "router", me.tenant, rid)
    subnet_id = b.subnet_id
    if b.port_id is not None:
        if adding or subnet_id:
            raise _unsupported("attaching an existing port to a router (give subnet_id)")
        port = await fetch(s, "port", me.tenant, b.port_id)
        if port.get("device") != rid:
            raise NotFound(f"router {rid} has no interface with port {b.port_id}")
        subnet_id = port["subnet"]
    if not subnet_id:
        raise Invalid("give subnet_id")
    subnet = await fetch(s, "subnet", me.tenant, subnet_id)
    verb = "router.add-subnet" if adding else "router.remove-subnet"
    await s.command(verb, {"router": rid, "subnet": subnet_id, "tenant": me.tenant})
    shown = await s.query("router", {"ref": rid, "tenant": me.tenant})
    port_id = next(
        (i["port"] for i in shown.get("interfaces", []) if i["subnet"] == subnet_id), b.port_id
    )
    if not adding and port_id is None:
        port_id = next(
            (i["port"] for i in router.get("interfaces", []) if i["subnet"] == subnet_id), ""
        )
    return json_response(
        {
            "id": rid,
            "tenant_id": me.tenant,
            "project_id": me.tenant,
            "subnet_id": subnet_id,
            "subnet_ids": [subnet_id],
            "port_id": port_id or "",
            "network_id": subnet["network"],
        }
    )


# -- floating IPs ---------------------------------------------------------------------


def fip_view(f: dict[str, Any], ports: list[dict[str, Any]]) -> dict[str, Any]:
    router = None
    if f.get("port"):
        subnet = next((p["subnet"] for p in ports if p["id"] == f["port"]), None)
        router = next(
            (
                p["device"]
                for p in ports
                if subnet and p["subnet"] == subnet and p.get("device_owner") == "router_interface"
            ),
            None,
        )
    return {
        "id": f["id"],
        "floating_ip_address": f["address"],
        "floating_network_id": f["network"],
        "router_id": router,
        "port_id": f.get("port") or None,
        "fixed_ip_address": f.get("fixed_ip") or None,
        "status": "ACTIVE" if f.get("port") else "DOWN",
        **_std(f),
    }


class _FloatingIp(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    floating_network_id: Id
    port_id: Id | None = None
    fixed_ip_address: Text255 | None = None
    floating_ip_address: Text255 | None = None
    subnet_id: Id | None = None
    description: Text255 = ""
    tenant_id: Text255 | None = None
    project_id: Text255 | None = None


class FloatingIpBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    floatingip: _FloatingIp


class _FipChange(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    port_id: Id | None = None
    fixed_ip_address: Text255 | None = None
    description: Text255 | None = None


class FloatingIpUpdate(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    floatingip: _FipChange


async def list_fips(request: web.Request) -> web.Response:
    me = caller(request)
    s = session(request)
    fips, ports = await asyncio.gather(
        s.query("floating-ips", {"tenant": me.tenant}), s.query("ports", {"tenant": me.tenant})
    )
    return listing(request, "floatingips", [fip_view(f, ports) for f in fips])


async def _fip_answer(
    request: web.Request, s: Any, tenant: str, fid: str, status: int = 200
) -> web.Response:
    f, ports = await asyncio.gather(
        fetch(s, "floating-ip", tenant, fid), s.query("ports", {"tenant": tenant})
    )
    return one(request, "floatingip", fip_view(f, ports), status)


async def show_fip(request: web.Request) -> web.Response:
    fid = path_id(request, what="floating IP")
    me = caller(request)
    return await _fip_answer(request, session(request), me.tenant, fid)


async def create_fip(request: web.Request) -> web.Response:
    b = (await decode(request, FloatingIpBody)).floatingip
    if b.floating_ip_address or b.subnet_id:
        raise _unsupported("choosing the floating IP's address or subnet")
    if b.fixed_ip_address and not b.port_id:
        raise Invalid("fixed_ip_address needs port_id")
    tenant = _tenant_of(request, b.project_id or b.tenant_id)
    s = session(request)
    if b.port_id:
        port = await fetch(s, "port", tenant, b.port_id)  # before anything is appended
        if b.fixed_ip_address and b.fixed_ip_address != port.get("ip"):
            raise Invalid(f"port {b.port_id} has no fixed IP {b.fixed_ip_address}")
    made = await s.command(
        "floating-ip.create", {"network": b.floating_network_id, "tenant": tenant}
    )
    if b.port_id:
        cmd = {"floating_ip": made["id"], "port": b.port_id, "tenant": tenant}
        await s.command("floating-ip.associate", cmd)
    return await _fip_answer(request, s, tenant, made["id"], 201)


async def update_fip(request: web.Request) -> web.Response:
    fid = path_id(request, what="floating IP")
    b = (await decode(request, FloatingIpUpdate)).floatingip
    me = caller(request)
    s = session(request)
    f = await fetch(s, "floating-ip", me.tenant, fid)
    if b.port_id is None:
        if f.get("port"):
            await s.command("floating-ip.disassociate", {"ref": fid, "tenant": me.tenant})
    elif b.port_id != f.get("port"):
        if f.get("port"):
            await s.command("floating-ip.disassociate", {"ref": fid, "tenant": me.tenant})
        cmd = {"floating_ip": fid, "port": b.port_id, "tenant": me.tenant}
        await s.command("floating-ip.associate", cmd)
    return await _fip_answer(request, s, me.tenant, fid)


# -- security groups ------------------------------------------------------------------

PROTOCOLS = {"tcp": "tcp", "6": "tcp", "udp": "udp", "17": "udp", "icmp": "icmp", "1": "icmp"}


def rule_view(g: dict[str, Any], r: dict[str, Any]) -> dict[str, Any]:
    cidr = r.get("remote_cidr") or ""
    v6 = ":" in cidr
    return {
        "id": r["rule"],
        "security_group_id": g["id"],
        "direction": r["direction"],
        "ethertype": "IPv6" if v6 else "IPv4",
        "protocol": None if r["protocol"] == "any" else r["protocol"],
        "port_range_min": r.get("port_min") or None,
        "port_range_max": r.get("port_max") or None,
        "remote_ip_prefix": None if cidr in ("", "::/0") else cidr,
        "remote_group_id": r.get("remote_group") or None,
        "remote_address_group_id": None,
        **_std({**g, "description": ""}),
    }


def group_view(g: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": g["id"],
        "name": g["name"],
        "stateful": True,
        "shared": False,
        "security_group_rules": [rule_view(g, r) for r in g.get("rules", [])],
        **_std(g),
    }


class _Group(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: Text255 = ""
    description: Text255 = ""
    stateful: bool = True
    tenant_id: Text255 | None = None
    project_id: Text255 | None = None


class GroupBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    security_group: _Group


class GroupUpdate(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    security_group: dict[str, Any]


class _Rule(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    security_group_id: Id
    direction: str
    ethertype: str = "IPv4"
    protocol: Annotated[str, msgspec.Meta(max_length=16)] | int | None = None
    port_range_min: int | None = None
    port_range_max: int | None = None
    remote_ip_prefix: Text255 | None = None
    remote_group_id: Id | None = None
    remote_address_group_id: Id | None = None
    description: Text255 = ""
    tenant_id: Text255 | None = None
    project_id: Text255 | None = None


class RuleBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    security_group_rule: _Rule


async def _groups(s: Any, tenant: str) -> list[dict[str, Any]]:
    """Every group of the tenant with its rules (a show per group)."""
    rows = await s.query("security-groups", {"tenant": tenant})
    return list(
        await asyncio.gather(
            *(s.query("security-group", {"ref": g["id"], "tenant": tenant}) for g in rows)
        )
    )


async def list_groups(request: web.Request) -> web.Response:
    me = caller(request)
    s = session(request)
    groups = await _groups(s, me.tenant)
    if not any(g["name"] == "default" for g in groups) and {"admin", "member"} & set(me.roles):
        # Neutron makes a project's default group when it is first listed.
        await s.command("security-group.ensure-default", {"tenant": me.tenant})
        groups = await _groups(s, me.tenant)
    return listing(request, "security_groups", [group_view(g) for g in groups])


async def show_group(request: web.Request) -> web.Response:
    gid = path_id(request, what="security group")
    me = caller(request)
    return one(
        request,
        "security_group",
        group_view(await fetch(session(request), "security-group", me.tenant, gid)),
    )


async def create_group(request: web.Request) -> web.Response:
    b = (await decode(request, GroupBody)).security_group
    if not b.stateful:
        raise _unsupported("a stateless security group")
    if b.name == "default":
        raise Conflict("the default security group is made by Stratus on first use")
    tenant = _tenant_of(request, b.project_id or b.tenant_id)
    s = session(request)
    cmd = {"name": b.name, "description": b.description, "default_egress": True, "tenant": tenant}
    made = await s.command("security-group.create", cmd)
    return one(
        request,
        "security_group",
        group_view(await fetch(s, "security-group", tenant, made["id"])),
        201,
    )


async def update_group(request: web.Request) -> web.Response:
    gid = path_id(request, what="security group")
    changes = (await decode(request, GroupUpdate)).security_group
    me = caller(request)
    s = session(request)
    view = group_view(await fetch(s, "security-group", me.tenant, gid))
    rename = _renaming(view, changes, me.tenant, described=True)
    _same(view, changes, "security group")
    if rename:
        await s.command("security-group.rename", rename)
        view = group_view(await fetch(s, "security-group", me.tenant, gid))
    return one(request, "security_group", view)


async def list_rules(request: web.Request) -> web.Response:
    me = caller(request)
    groups = await _groups(session(request), me.tenant)
    rules = [rule_view(g, r) for g in groups for r in g.get("rules", [])]
    return listing(request, "security_group_rules", rules)


async def _rule(s: Any, tenant: str, rid: str) -> tuple[dict[str, Any], dict[str, Any]]:
    for g in await _groups(s, tenant):
        for r in g.get("rules", []):
            if r["rule"] == rid:
                return g, r
    raise NotFound(f"security group rule {rid} does not exist")


async def show_rule(request: web.Request) -> web.Response:
    rid = path_id(request, what="security group rule")
    me = caller(request)
    g, r = await _rule(session(request), me.tenant, rid)
    return one(request, "security_group_rule", rule_view(g, r))


async def create_rule(request: web.Request) -> web.Response:
    b = (await decode(request, RuleBody)).security_group_rule
    if b.direction not in ("ingress", "egress"):
        raise Invalid(f"direction {b.direction!r}: ingress or egress")
    if b.ethertype not in ("IPv4", "IPv6"):
        raise Invalid(f"ethertype {b.ethertype!r}: IPv4 or IPv6")
    if b.remote_address_group_id:
        raise _unsupported("address groups")
    protocol = "any"
    if b.protocol is not None and str(b.protocol).lower() not in ("any", "0"):
        protocol = PROTOCOLS.get(str(b.protocol).lower(), "")
        if not protocol:
            raise _unsupported(f"protocol {b.protocol} (tcp, udp, icmp or any)")
    lo, hi = b.port_range_min, b.port_range_max
    if protocol in ("icmp", "any") and (lo is not None or hi is not None):
        raise _unsupported(f"ports or ICMP type/code with protocol {protocol}")
    cidr = b.remote_ip_prefix
    if cidr and (":" in cidr) != (b.ethertype == "IPv6"):
        raise Invalid(f"remote_ip_prefix {cidr} does not match ethertype {b.ethertype}")
    if not cidr and b.ethertype == "IPv6":
        cidr = "::/0"  # how Stratus tells an any-IPv6 rule from an IPv4 one
    me = caller(request)
    s = session(request)
    g = await fetch(s, "security-group", me.tenant, b.security_group_id)
    cmd: dict[str, Any] = {
        "security_group": g["id"],
        "direction": b.direction,
        "protocol": protocol,
        "port_min": lo or 0,
        "port_max": hi or 0,
        "tenant": me.tenant,
    }
    if cidr:
        cmd["remote_cidr"] = cidr
    if b.remote_group_id:
        cmd["remote_group"] = b.remote_group_id
    await s.command("security-group.rule-add", cmd)
    after = await fetch(s, "security-group", me.tenant, g["id"])
    old = {x["rule"] for x in g.get("rules", [])}
    new = [r for r in after.get("rules", []) if r["rule"] not in old]
    if not new:
        raise Conflict("the rule was not recorded")
    return one(request, "security_group_rule", rule_view(after, new[0]), 201)


async def delete_rule(request: web.Request) -> web.Response:
    rid = path_id(request, what="security group rule")
    me = caller(request)
    s = session(request)
    g, _ = await _rule(s, me.tenant, rid)
    cmd = {"security_group": g["id"], "rule": rid, "tenant": me.tenant}
    await s.command("security-group.rule-remove", cmd)
    return no_content()


# -- quotas ---------------------------------------------------------------------------

QUOTAS = {
    "network": "networks",
    "subnet": "subnets",
    "port": "ports",
    "router": "routers",
    "floatingip": "floating_ips",
    "security_group": "security_groups",
    "security_group_rule": None,
    "rbac_policy": None,
    "subnetpool": None,
}


async def quotas(request: web.Request) -> web.Response:
    project = path_id(request, "project", "project")
    me = caller(request)
    if project != me.tenant and "admin" not in me.roles:
        raise Forbidden(f"you may not see the quotas of project {project}")
    path = request.path.rstrip("/")
    if path.endswith(".json"):
        path = path[: -len(".json")]
    s = session(request)
    if path.endswith("/default"):
        from stratus.events.resources import QUOTA_DEFAULTS

        await s.query("tenant", {"tenant": project})
        limits, used = dict(QUOTA_DEFAULTS), {}
    else:
        data = await s.query("quota", {"tenant": project})
        limits = {q["resource"]: q["limit"] for q in data["quota"]}
        used = {q["resource"]: q["in_use"] for q in data["quota"]}
    detail = path.endswith("/details")
    out: dict[str, Any] = {}
    for neutron, ours in QUOTAS.items():
        limit = limits.get(ours, -1) if ours else -1
        out[neutron] = (
            {"limit": limit, "used": used.get(ours, 0) if ours else 0, "reserved": 0}
            if detail
            else limit
        )
    return json_response({"quota": out})


class QuotaBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    quota: dict[str, int]


async def update_quotas(request: web.Request) -> web.Response:
    project = path_id(request, "project", "project")
    body = await decode(request, QuotaBody)
    limits: dict[str, int] = {}
    for key, value in body.quota.items():
        ours = QUOTAS.get(key, "")
        if not ours:
            raise Invalid(f"quota {key!r} is not limited by Stratus")
        if value < -1:
            raise Invalid(f"quota {key}: an integer >= -1")
        limits[ours] = value
    await session(request).command("quota.set", {"tenant": project, "limits": limits})
    return await quotas(request)


def routes() -> list[web.RouteDef]:
    out = [
        web.get(f"{PREFIX}", versions),
        web.get(f"{PREFIX}/", versions),
        web.get(f"{API}", version),
        web.get(f"{API}/", version),
        web.get(f"{API}/extensions", extensions),
        web.get(f"{API}/extensions/{{alias}}", extension),
        web.get(f"{API}/quotas/{{project}}", quotas),
        web.get(f"{API}/quotas/{{project}}/details", quotas),
        web.get(f"{API}/quotas/{{project}}/details.json", quotas),
        web.get(f"{API}/quotas/{{project}}/default", quotas),
        web.put(f"{API}/quotas/{{project}}", update_quotas),
        web.put(f"{API}/routers/{{id}}/add_router_interface", router_interface),
        web.put(f"{API}/routers/{{id}}/remove_router_interface", router_interface),
    ]
    crud = {
        "networks": (list_networks, create_network, show_network, update_network, delete_network),
        "subnets": (
            lister("subnet", "subnets", subnet_view),
            create_subnet,
            shower("subnet", "subnet", subnet_view),
            update_subnet,
            deleter("subnet"),
        ),
        "ports": (list_ports, create_port, show_port, update_port, deleter("port")),
        "routers": (
            lister("router", "routers", router_view),
            create_router,
            shower("router", "router", router_view),
            update_router,
            deleter("router"),
        ),
        "floatingips": (list_fips, create_fip, show_fip, update_fip, deleter("floating-ip")),
        "security-groups": (
            list_groups,
            create_group,
            show_group,
            update_group,
            deleter("security-group"),
        ),
        "security-group-rules": (list_rules, create_rule, show_rule, None, delete_rule),
    }
    for coll, (lst, create, show, update, delete) in crud.items():
        out += [
            web.get(f"{API}/{coll}", lst),
            web.post(f"{API}/{coll}", create),
            web.get(f"{API}/{coll}/{{id}}", show),
            web.delete(f"{API}/{coll}/{{id}}", delete),
        ]
        if update is not None:
            out.append(web.put(f"{API}/{coll}/{{id}}", update))
    return out
