"""Nova v2.1 (microversion 2.1 only): versions, flavors, servers and their
actions, and quota sets.

Servers are Stratus servers; their statuses map to Nova's (BUILD, ACTIVE,
SHUTOFF, ERROR, DELETED), and a server the scheduler could not place shows
a ``fault`` whose message is the scheduler's own reason. Responses carry
exactly the keys Nova 2.1 has (Tempest's schemas refuse any other).
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import secrets
from typing import Annotated, Any, Literal

import msgspec
from aiohttp import web

from stratus.api.http import (
    TITLES,
    Face,
    HttpError,
    caller,
    decode,
    fetch,
    json_response,
    no_content,
    origin,
    page,
    path_id,
    query_int,
    session,
)
from stratus.events.errors import Forbidden, Invalid
from stratus.events.resources import QUOTA_DEFAULTS

PREFIX = "/compute"
API = f"{PREFIX}/v2.1"
VERSION = "2.1"
_FAULT_KEYS = {
    400: "badRequest",
    401: "unauthorized",
    403: "forbidden",
    404: "itemNotFound",
    405: "badMethod",
    409: "conflictingRequest",
    413: "overLimit",
    503: "serviceUnavailable",
}


def fault(status: int, message: str, kind: str) -> web.Response:
    if kind == "quota_exceeded":
        message = f"Quota exceeded: {message}"
    key = _FAULT_KEYS.get(status, "computeFault")
    return json_response({key: {"code": status, "message": message}}, status, _version_headers())


# Nova answers a quota refusal with 403 and a "Quota exceeded" message.
FACE = Face("compute", PREFIX, fault, quota_status=403)


def _version_headers() -> dict[str, str]:
    return {
        "OpenStack-API-Version": f"compute {VERSION}",
        "X-OpenStack-Nova-API-Version": VERSION,
        "Vary": "OpenStack-API-Version, X-OpenStack-Nova-API-Version",
    }


def check_microversion(request: web.Request) -> None:
    """Only 2.1 is served; asking for another is Nova's 406."""
    asked = request.headers.get("X-OpenStack-Nova-API-Version")
    header = request.headers.get("OpenStack-API-Version", "")
    for part in header.split(","):
        service, _, value = part.strip().partition(" ")
        if service.lower() == "compute" and value:
            asked = value.strip()
    if asked and asked.lower() not in ("2.1", "latest"):
        raise HttpError(406, f"Version {asked} is not supported by the API (2.1 only)")


def respond(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return json_response(data, status, {**_version_headers(), **(headers or {})})


# -- versions ----------------------------------------------------------------

_UPDATED = "2013-07-23T11:33:21Z"


def _version(base: str, vid: str) -> dict[str, Any]:
    current = vid == "v2.1"
    return {
        "id": vid,
        "status": "CURRENT" if current else "DEPRECATED",
        "version": VERSION if current else "",
        "min_version": VERSION if current else "",
        "updated": _UPDATED if current else "2025-07-04T12:00:00Z",
        "links": [{"rel": "self", "href": f"{base}{PREFIX}/{'v2.1' if current else 'v2'}/"}],
    }


async def versions(request: web.Request) -> web.Response:
    base = origin(request)
    return respond({"versions": [_version(base, "v2.0"), _version(base, "v2.1")]})


async def version(request: web.Request) -> web.Response:
    vid = "v2.1" if request.path.rstrip("/").endswith("v2.1") else "v2.0"
    doc = _version(origin(request), vid)
    media = "application/vnd.openstack.compute+json;version=" + vid[1:]
    doc["media-types"] = [{"base": "application/json", "type": media}]
    doc["links"].append(
        {"rel": "describedby", "type": "text/html", "href": "https://docs.openstack.org/"}
    )
    return respond({"version": doc})


# -- flavors -------------------------------------------------------------------


def _links(base: str, kind: str, rid: str) -> list[dict[str, str]]:
    return [
        {"rel": "self", "href": f"{base}{API}/{kind}/{rid}"},
        {"rel": "bookmark", "href": f"{base}{PREFIX}/{kind}/{rid}"},
    ]


def flavor_view(f: dict[str, Any], base: str, detail: bool = True) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": f["id"],
        "name": f["name"],
        "links": _links(base, "flavors", f["id"]),
    }
    if detail:
        out.update(
            {
                "ram": f["ram_mb"],
                "vcpus": f["vcpus"],
                "disk": f.get("disk_gb") or 0,
                "swap": "",
                "OS-FLV-EXT-DATA:ephemeral": 0,
                "OS-FLV-DISABLED:disabled": False,
                "os-flavor-access:is_public": True,
                "rxtx_factor": 1.0,
            }
        )
    return out


def _next_link(request: web.Request, last: str, limit: int | None) -> list[dict[str, str]]:
    params = {k: v for k, v in request.query.items() if k != "marker"}
    params["marker"] = last
    if limit is not None:
        params["limit"] = str(limit)
    url = request.url.with_query(params)
    return [{"rel": "next", "href": f"{origin(request)}{url.path_qs}"}]


async def flavors(request: web.Request) -> web.Response:
    check_microversion(request)
    detail = request.path.rstrip("/").endswith("/detail")
    rows = sorted(await session(request).query("flavors", {}), key=lambda f: f["id"])
    min_disk = query_int(request, "minDisk")
    min_ram = query_int(request, "minRam")
    if min_disk is not None:
        rows = [f for f in rows if (f.get("disk_gb") or 0) >= min_disk]
    if min_ram is not None:
        rows = [f for f in rows if f["ram_mb"] >= min_ram]
    if request.query.get("is_public", "true").lower() in ("false", "0", "no"):
        rows = []  # every flavor is public
    limit = query_int(request, "limit")
    shown, more = page(rows, request.query.get("marker"), limit)
    base = origin(request)
    body: dict[str, Any] = {"flavors": [flavor_view(f, base, detail) for f in shown]}
    if more:
        body["flavors_links"] = _next_link(request, shown[-1]["id"], limit)
    return respond(body)


async def flavor(request: web.Request) -> web.Response:
    check_microversion(request)
    fid = path_id(request, what="flavor")
    found = await session(request).query("flavor", {"ref": fid})
    return respond({"flavor": flavor_view(found, origin(request))})


# -- servers -------------------------------------------------------------------

STATUS = {
    "requested": "BUILD",
    "scheduled": "BUILD",
    "building": "BUILD",
    "running": "ACTIVE",
    "stopped": "SHUTOFF",
    "error": "ERROR",
    "deleting": "DELETED",
}
VM_STATE = {
    "BUILD": "building",
    "ACTIVE": "active",
    "SHUTOFF": "stopped",
    "ERROR": "error",
    "DELETED": "deleted",
}
POWER_STATE = {"ACTIVE": 1, "SHUTOFF": 4}


def _ref(value: str) -> str:
    """An id, or the last part of a link to it (Nova accepts both)."""
    return value.rstrip("/").rsplit("/", 1)[-1]


def _host_id(tenant: str, host: str | None) -> str:
    # Nova's hostId: the host hashed with the project, so tenants cannot
    # compare hosts across projects.
    return hashlib.sha224(f"{tenant}{host}".encode()).hexdigest() if host else ""


class Related(msgspec.Struct):
    """What a server view shows besides the server row: its ports, their
    networks and floating IPs, and security group names."""

    ports: list[dict[str, Any]]
    networks: dict[str, str]
    fips: list[dict[str, Any]]
    groups: dict[str, str]


async def related(s: Any, tenant: str) -> Related:
    ports, nets, fips, sgs = await asyncio.gather(
        s.query("ports", {"tenant": tenant}),
        s.query("networks", {"tenant": tenant}),
        s.query("floating-ips", {"tenant": tenant}),
        s.query("security-groups", {"tenant": tenant}),
    )
    return Related(
        ports=ports,
        networks={n["id"]: n["name"] for n in nets},
        fips=fips,
        groups={g["id"]: g["name"] for g in sgs},
    )


def addresses(server_id: str, rel: Related) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for p in rel.ports:
        if p.get("device") != server_id or not p.get("ip"):
            continue
        net = rel.networks.get(p["network"], p["network"]) or p["network"]
        entries = out.setdefault(net, [])
        version = 6 if ":" in p["ip"] else 4
        entry = {"version": version, "addr": p["ip"]}
        entries.append({**entry, "OS-EXT-IPS:type": "fixed", "OS-EXT-IPS-MAC:mac_addr": p["mac"]})
        for f in rel.fips:
            if f.get("port") == p["id"]:
                entries.append(
                    {
                        "version": 4,
                        "addr": f["address"],
                        "OS-EXT-IPS:type": "floating",
                        "OS-EXT-IPS-MAC:mac_addr": p["mac"],
                    }
                )
    return out


def server_view(r: dict[str, Any], base: str, rel: Related) -> dict[str, Any]:
    status = STATUS.get(r["status"], "BUILD")
    out: dict[str, Any] = {
        "id": r["id"],
        "name": r["name"],
        "status": status,
        "tenant_id": r["tenant"],
        "user_id": "",
        "metadata": r.get("metadata") or {},
        "hostId": _host_id(r["tenant"], r.get("host")),
        "image": {
            "id": r["image"],
            "links": [{"rel": "bookmark", "href": f"{base}{PREFIX}/images/{r['image']}"}],
        }
        if r.get("image")
        else "",
        "flavor": {"id": r["flavor"], "links": _links(base, "flavors", r["flavor"])[1:]}
        if r.get("flavor")
        else {},
        "created": r["created_at"],
        "updated": r["updated_at"],
        "addresses": addresses(r["id"], rel),
        "accessIPv4": r.get("access_ipv4") or "",
        "accessIPv6": r.get("access_ipv6") or "",
        "links": _links(base, "servers", r["id"]),
        "OS-DCF:diskConfig": "MANUAL",
        "key_name": None,
        "security_groups": [{"name": rel.groups.get(g, g)} for g in r.get("security_groups") or []],
        "OS-SRV-USG:launched_at": r["updated_at"] if status in ("ACTIVE", "SHUTOFF") else None,
        "OS-SRV-USG:terminated_at": None,
        "OS-EXT-AZ:availability_zone": r.get("zone") or "nova",
        "OS-EXT-STS:task_state": "deleting" if r["status"] == "deleting" else None,
        "OS-EXT-STS:vm_state": VM_STATE[status],
        "OS-EXT-STS:power_state": POWER_STATE.get(status, 0),
        "os-extended-volumes:volumes_attached": [],
        "config_drive": "",
    }
    if status in ("ACTIVE", "BUILD"):
        out["progress"] = 100 if status == "ACTIVE" else 0
    if status == "ERROR":
        out["fault"] = {
            "code": 500,
            "created": r["updated_at"],
            "message": r.get("reason") or "the server failed",
        }
    return out


def _brief(r: dict[str, Any], base: str) -> dict[str, Any]:
    return {"id": r["id"], "name": r["name"], "links": _links(base, "servers", r["id"])}


# Nova's name filter is a regular expression, matched here in the API's own
# event loop: only the part clients use (literals, '.', '^', '$' and at most
# two '*'), whose matching stays polynomial; anything else is a 400.
_SAFE_NAME_RE = re.compile(r"^\^?[A-Za-z0-9_.*-]{1,63}\$?(?!\n)$")


def name_pattern(text: str) -> re.Pattern[str]:
    if not _SAFE_NAME_RE.match(text) or text.count("*") > 2 or text.startswith("*"):
        raise Invalid(
            "name: a name or part of one, with '.', '^', '$' and up to two '*' "
            "(other regular expressions are not supported)"
        )
    return re.compile(text)


async def list_servers(request: web.Request) -> web.Response:
    check_microversion(request)
    detail = request.path.rstrip("/").endswith("/detail")
    me = caller(request)
    s = session(request)
    rows = await s.query("servers", {"tenant": me.tenant})
    q = request.query
    if q.get("name"):
        pattern = name_pattern(q["name"])
        rows = [r for r in rows if pattern.search(r["name"])]
    if q.get("status"):
        want = q["status"].upper()
        rows = [r for r in rows if STATUS.get(r["status"]) == want]
    else:
        # As Nova lists: a server shown DELETED (its delete under way) is
        # left out, so a client that saw it DELETED does not list it again.
        rows = [r for r in rows if STATUS.get(r["status"]) != "DELETED"]
    for key, column in (("image", "image"), ("flavor", "flavor")):
        if q.get(key):
            rows = [r for r in rows if r.get(column) == _ref(q[key])]
    limit = query_int(request, "limit")
    shown, more = page(rows, q.get("marker"), limit)
    base = origin(request)
    if detail:
        rel = await related(s, me.tenant)
        items = [server_view(r, base, rel) for r in shown]
    else:
        items = [_brief(r, base) for r in shown]
    body: dict[str, Any] = {"servers": items}
    if more:
        body["servers_links"] = _next_link(request, shown[-1]["id"], limit)
    return respond(body)


async def show_server(request: web.Request) -> web.Response:
    check_microversion(request)
    sid = path_id(request, what="server")
    me = caller(request)
    s = session(request)
    row, rel = await asyncio.gather(fetch(s, "server", me.tenant, sid), related(s, me.tenant))
    return respond({"server": server_view(row, origin(request), rel)})


Text255 = Annotated[str, msgspec.Meta(max_length=255)]


class _NetworkRef(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    uuid: Text255 | None = None
    port: Text255 | None = None
    fixed_ip: Text255 | None = None
    tag: Text255 | None = None


class _GroupRef(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: Text255


class _Server(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=255)]
    imageRef: Text255 = ""
    flavorRef: Annotated[str, msgspec.Meta(min_length=1, max_length=255)] = ""
    networks: list[_NetworkRef] | Literal["auto", "none"] | None = None
    security_groups: Annotated[list[_GroupRef], msgspec.Meta(max_length=16)] = []
    metadata: Annotated[
        dict[Annotated[str, msgspec.Meta(min_length=1, max_length=255)], Text255],
        msgspec.Meta(max_length=128),
    ] = {}
    availability_zone: Text255 | None = None
    adminPass: Text255 | None = None
    accessIPv4: Text255 | None = None
    accessIPv6: Text255 | None = None
    key_name: Text255 | None = None
    user_data: Annotated[str, msgspec.Meta(max_length=65535)] | None = None
    config_drive: bool | str | None = None
    min_count: int | str | None = None
    max_count: int | str | None = None
    return_reservation_id: bool | str | None = None
    personality: list[dict[str, str]] | None = None
    block_device_mapping_v2: list[dict[str, Any]] | None = None
    OS_DCF_diskConfig: Literal["AUTO", "MANUAL"] | None = msgspec.field(
        default=None, name="OS-DCF:diskConfig"
    )


class ServerCreateBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    server: _Server
    os_scheduler_hints: dict[str, Any] | None = msgspec.field(
        default=None, name="os:scheduler_hints"
    )


async def _networks(s: Any, tenant: str, asked: Any) -> list[str]:
    if asked == "none":
        return []
    if isinstance(asked, list):
        nets: list[str] = []
        for n in asked:
            if n.port or n.fixed_ip:
                raise Invalid("networks: only {'uuid': NETWORK} is supported (no port, fixed_ip)")
            if not n.uuid:
                raise Invalid("networks: each entry needs a uuid")
            nets.append(n.uuid)
        return nets
    # Left out (or "auto"): the project's network, when it has exactly one.
    own = [n for n in await s.query("networks", {"tenant": tenant}) if n["tenant"] == tenant]
    return [own[0]["id"]] if len(own) == 1 else []


def _local_image_only(bdms: list[dict[str, Any]], image: str) -> bool:
    """Block device mappings that say no more than imageRef (what the
    ``openstack`` command sends): the image, on the local disk."""
    return all(
        b.get("source_type") == "image"
        and b.get("destination_type", "local") == "local"
        and b.get("uuid") in (None, _ref(image))
        and b.get("boot_index") in (0, "0")
        for b in bdms
    )


async def create_server(request: web.Request) -> web.Response:
    check_microversion(request)
    body = await decode(request, ServerCreateBody)
    sv = body.server
    me = caller(request)
    if not sv.imageRef or not _local_image_only(sv.block_device_mapping_v2 or [], sv.imageRef):
        raise Invalid("servers boot from an image (imageRef); volumes as root are not supported")
    for count in (sv.min_count, sv.max_count):
        if count not in (None, 1, "1"):
            raise Invalid("min_count/max_count: one server a request")
    if not sv.flavorRef:
        raise Invalid("flavorRef is required")
    # What Stratus cannot give a guest is refused, not dropped. (adminPass
    # is accepted as Nova's libvirt driver does: answered, not injected.)
    if sv.key_name:
        raise Invalid(f"invalid key_name {sv.key_name!r}: Stratus has no key pairs")
    if sv.user_data or sv.personality or sv.config_drive not in (None, False, "", "false"):
        raise Invalid("user_data, personality and config_drive are not supported by Stratus")
    s = session(request)
    cmd: dict[str, Any] = {
        "name": sv.name,
        "image": _ref(sv.imageRef),
        "flavor": _ref(sv.flavorRef),
        "networks": await _networks(s, me.tenant, sv.networks),
        "security_groups": [g.name for g in sv.security_groups],
        "metadata": dict(sv.metadata),
        "tenant": me.tenant,
    }
    if sv.availability_zone:
        cmd["zone"] = sv.availability_zone
    for key, value in (("access_ipv4", sv.accessIPv4), ("access_ipv6", sv.accessIPv6)):
        if value:
            cmd[key] = value
    data = await s.command("server.create", cmd)
    base = origin(request)
    links = _links(base, "servers", data["id"])
    return respond(
        {
            "server": {
                "id": data["id"],
                "links": links,
                "OS-DCF:diskConfig": "MANUAL",
                "security_groups": [{"name": g.name} for g in sv.security_groups]
                or [{"name": "default"}],
                "adminPass": sv.adminPass or secrets.token_urlsafe(12),
            }
        },
        202,
        {"Location": links[0]["href"]},
    )


async def delete_server(request: web.Request) -> web.Response:
    check_microversion(request)
    sid = path_id(request, what="server")
    me = caller(request)
    await session(request).command("server.delete", {"ref": sid, "tenant": me.tenant})
    return no_content()


ACTIONS = {"os-start": "server.start", "os-stop": "server.stop", "reboot": "server.reboot"}


async def server_action(request: web.Request) -> web.Response:
    check_microversion(request)
    sid = path_id(request, what="server")
    body = await decode(request, dict[str, Any])
    if len(body) != 1 or next(iter(body)) not in ACTIONS:
        raise Invalid(f"one action of {', '.join(ACTIONS)} (others are not supported)")
    verb = ACTIONS[next(iter(body))]
    me = caller(request)
    await session(request).command(verb, {"ref": sid, "tenant": me.tenant})
    return web.Response(status=202, headers=_version_headers())


# -- quota sets ----------------------------------------------------------------

# Nova's quota names and Stratus' resources (None: not limited here).
QUOTAS = {
    "instances": "instances",
    "cores": "vcpus",
    "ram": "ram_mb",
    "floating_ips": "floating_ips",
    "security_groups": "security_groups",
    "fixed_ips": None,
    "metadata_items": None,
    "injected_files": None,
    "injected_file_content_bytes": None,
    "injected_file_path_bytes": None,
    "key_pairs": None,
    "security_group_rules": None,
    "server_groups": None,
    "server_group_members": None,
}


def _project(request: web.Request) -> str:
    project = path_id(request, "project", "project")
    me = caller(request)
    if project != me.tenant and "admin" not in me.roles:
        raise Forbidden(f"policy does not allow showing the quotas of project {project}")
    return project


async def quota_set(request: web.Request) -> web.Response:
    check_microversion(request)
    project = _project(request)
    if request.path.rstrip("/").endswith("/defaults"):
        # Still asks the control plane: the token must be valid.
        await session(request).query("tenant", {"tenant": project})
        limits = {r: QUOTA_DEFAULTS.get(r, -1) for r in QUOTA_DEFAULTS}
        used: dict[str, int] = {}
    else:
        data = await session(request).query("quota", {"tenant": project})
        limits = {q["resource"]: q["limit"] for q in data["quota"]}
        used = {q["resource"]: q["in_use"] for q in data["quota"]}
    detail = request.path.rstrip("/").endswith("/detail")
    out: dict[str, Any] = {"id": project}
    for nova, ours in QUOTAS.items():
        limit = limits.get(ours, -1) if ours else -1
        if detail:
            out[nova] = {"limit": limit, "in_use": used.get(ours, 0) if ours else 0, "reserved": 0}
        else:
            out[nova] = limit
    return respond({"quota_set": out})


class QuotaUpdate(msgspec.Struct, frozen=True):
    quota_set: dict[str, int | bool | str]


async def update_quota_set(request: web.Request) -> web.Response:
    check_microversion(request)
    project = path_id(request, "project", "project")
    body = await decode(request, QuotaUpdate)
    limits: dict[str, int] = {}
    for key, value in body.quota_set.items():
        if key == "force":
            continue
        if key not in QUOTAS:
            raise Invalid(f"quota_set: unknown quota {key!r}")
        ours = QUOTAS[key]
        if ours is None:
            raise Invalid(f"quota_set: {key} is not limited by Stratus")
        if not isinstance(value, int) or isinstance(value, bool) or value < -1:
            raise Invalid(f"quota_set.{key}: an integer >= -1")
        limits[ours] = value
    await session(request).command("quota.set", {"tenant": project, "limits": limits})
    return await quota_set(request)


async def not_found(request: web.Request) -> web.Response:
    raise HttpError(404, f"{request.path} is not served by this API")


def routes() -> list[web.RouteDef]:
    return [
        web.get(f"{PREFIX}", versions),
        web.get(f"{PREFIX}/", versions),
        web.get(f"{API}", version),
        web.get(f"{API}/", version),
        web.get(f"{PREFIX}/v2", version),
        web.get(f"{PREFIX}/v2/", version),
        web.get(f"{API}/flavors", flavors),
        web.get(f"{API}/flavors/detail", flavors),
        web.get(f"{API}/flavors/{{id}}", flavor),
        web.get(f"{API}/servers", list_servers),
        web.get(f"{API}/servers/detail", list_servers),
        web.post(f"{API}/servers", create_server),
        web.get(f"{API}/servers/{{id}}", show_server),
        web.delete(f"{API}/servers/{{id}}", delete_server),
        web.post(f"{API}/servers/{{id}}/action", server_action),
        web.get(f"{API}/os-quota-sets/{{project}}", quota_set),
        web.get(f"{API}/os-quota-sets/{{project}}/detail", quota_set),
        web.get(f"{API}/os-quota-sets/{{project}}/defaults", quota_set),
        web.put(f"{API}/os-quota-sets/{{project}}", update_quota_set),
    ]


__all__ = ["FACE", "TITLES", "routes"]
