"""Servers and server groups: create (with its ports and, on first use,
the tenant's default security group), delete, and the power verbs.

Decided on the tenant's world (see ``handlers.world``). A server already
placed on a host is also told to that host's agent (``host_action``). The
flavor and a public image live outside the tenant: ``prepare_server`` looks
them up first, so the decision itself stays pure.
"""

from __future__ import annotations

from collections.abc import Callable

import msgspec

from stratus.events.errors import Conflict, Invalid, NotFound
from stratus.events.ids import new_id
from stratus.events.model import Cause, Event
from stratus.events.resources import (
    FloatingIpDisassociated,
    Nic,
    PortCreated,
    PortDeleted,
    RefCommand,
    ServerCreate,
    ServerDeleted,
    ServerDeleting,
    ServerGroupCreate,
    ServerGroupCreated,
    ServerGroupDeleted,
    ServerRequested,
    ServerSpec,
    VolumeDetached,
)
from stratus.handlers import quota
from stratus.handlers.addressing import parse_address
from stratus.handlers.inventory import create, delete_unused, host_action, unique
from stratus.handlers.lookup import Lookup
from stratus.handlers.networks import new_port
from stratus.handlers.records import Flavor, Image, Network, ServerGroup
from stratus.handlers.routed import attachable, routed_networks
from stratus.handlers.security_groups import resolve_groups
from stratus.handlers.world import World, live_tenant


class ServerPlan(msgspec.Struct, frozen=True):
    """``server create`` with what ``prepare`` looked up outside the tenant."""

    cmd: ServerCreate
    flavor: Flavor | None
    image: Image | None
    # Cloud-wide routed networks the command names (handlers.routed).
    routed: dict[str, Network] = {}

    @property
    def tenant(self) -> str | None:
        return self.cmd.tenant


async def prepare_server(cmd: ServerCreate, lookup: Lookup) -> ServerPlan:
    flavor = await lookup.system(Flavor, cmd.flavor) if cmd.flavor else None
    image = await lookup.system(Image, cmd.image)
    if image is not None and image.status != "active":
        # Its activation may have landed a moment ago: refuse only on the log.
        image = await lookup.system(Image, cmd.image, fresh=True)
    return ServerPlan(cmd, flavor, image, await routed_networks(cmd.networks, lookup))


def _sizes(plan: ServerPlan) -> tuple[int, int, int]:
    """vCPUs, RAM and disk: the flavor's, or the ones given (not both)."""
    cmd = plan.cmd
    if cmd.flavor is None:
        if cmd.vcpus is None or cmd.ram_mb is None:
            raise Invalid("server create needs --flavor, or --vcpus and --ram-mb")
        return cmd.vcpus, cmd.ram_mb, cmd.disk_gb or 0
    if plan.flavor is None:
        raise NotFound(f"flavor {cmd.flavor} not found")
    if cmd.vcpus is not None or cmd.ram_mb is not None:
        raise Invalid("give --flavor or --vcpus/--ram-mb, not both")
    return plan.flavor.vcpus, plan.flavor.ram_mb, plan.flavor.disk_gb


def decide_server_create(w: World, plan: ServerPlan, cause: Cause) -> list[Event]:
    cmd, t = plan.cmd, plan.cmd.tenant or ""
    live_tenant(w, t)
    unique(w.servers, cmd.name)
    image = w.images.named(cmd.image) or w.images.get(cmd.image) or plan.image
    if image is None:
        raise NotFound(f"image {cmd.image} not found")
    if image.status != "active":
        # Queued: its bytes are not stored yet, so no host could fetch them.
        raise Conflict(f"image {image.name} is {image.status}, not active: upload its file first")
    if image.format == "oci" and cmd.instance_type != "container":
        raise Invalid(f"image {image.name} is an OCI image: it runs as --type container only")
    if cmd.command and cmd.instance_type != "container":
        raise Invalid("--command is for container servers (a VM boots its image)")
    vcpus, ram, disk = _sizes(plan)
    disk = max(disk, image.min_disk_gb)
    group = w.server_groups.find(cmd.group).id if cmd.group else ""
    networks = [attachable(w, plan.routed, n, cmd.instance_type) for n in cmd.networks]
    if len({n.id for n in networks}) != len(networks):
        raise Invalid("a network is named twice")
    sgs, sg_events, new_sgs = resolve_groups(w, cmd.security_groups, cause, t)
    sid = new_id()
    ports: list[PortCreated] = [
        new_port(
            w,
            cause,
            t,
            net,
            name=f"{cmd.name}-{i}",
            device=sid,
            device_owner="compute",
            security_groups=sgs,
        )
        for i, net in enumerate(networks)
    ]
    quota.check(
        w,
        {
            "instances": 1,
            "vcpus": vcpus,
            "ram_mb": ram,
            "ports": len(ports),
            "security_groups": new_sgs,
        },
    )
    spec = ServerSpec(
        name=cmd.name,
        image=image.id,
        flavor=plan.flavor.id if plan.flavor else "",
        vcpus=vcpus,
        ram_mb=ram,
        disk_gb=disk,
        instance_type=cmd.instance_type,
        networks=[n.id for n in networks],
        security_groups=sgs,
        labels=dict(cmd.labels),
        requested_host=cmd.host or "",
        nics=[Nic(port=p.aggregate.id, mac=p.mac) for p in ports],
        group=group,
        zone=cmd.zone or "",
        metadata=dict(cmd.metadata),
        access_ipv4=_access_ip(cmd.access_ipv4, 4),
        access_ipv6=_access_ip(cmd.access_ipv6, 6),
        command=list(cmd.command),
    )
    server = cause.make(ServerRequested, t, "server", sid, spec=spec)
    return [*sg_events, server, *ports]


def _access_ip(value: str | None, version: int) -> str:
    """An access address as the user gave it, checked to be of its version."""
    if not value:
        return ""
    a = parse_address(value, f"access IPv{version}")
    if a.version != version:
        raise Invalid(f"access IPv{version} {value} is not an IPv{version} address")
    return str(a)


# Servers already placed on a host need its agent to tear them down.
_PLACED = {"scheduled", "building", "running", "stopping", "stopped", "starting", "deleting"}


def decide_server_delete(w: World, cmd: RefCommand, cause: Cause) -> list[Event]:
    t = cmd.tenant or ""
    s = w.servers.find(cmd.ref)
    if s.status == "deleting":
        return []
    out: list[Event] = [
        cause.make(PortDeleted, t, "port", p.id) for p in w.ports.values() if p.device == s.id
    ]
    for v in w.volumes.values():
        if v.server == s.id:
            out.append(cause.make(VolumeDetached, t, "volume", v.id, server=s.id))
    for f in w.floating_ips.values():
        if f.server == s.id:
            out.append(cause.make(FloatingIpDisassociated, t, "floating-ip", f.id, port=f.port))
    if s.status in _PLACED and s.host:
        deleting = cause.make(ServerDeleting, t, "server", s.id)
        return [deleting, *out, host_action(s, t, cause, "delete")]
    return [cause.make(ServerDeleted, t, "server", s.id), *out]


def power(
    event: type[Event], allowed: set[str], verb: str
) -> Callable[[World, RefCommand, Cause], list[Event]]:
    """The decision of a power verb (stop, start, reboot): allowed only from
    the statuses in ``allowed``, and told to the server's host if it has one."""

    def decide(w: World, cmd: RefCommand, cause: Cause) -> list[Event]:
        s = w.servers.find(cmd.ref)
        if s.status not in allowed:
            raise Conflict(
                f"cannot {verb} server {s.name} while it is {s.status} "
                f"(needs {' or '.join(sorted(allowed))})"
            )
        t = cmd.tenant or ""
        out = [cause.make(event, t, "server", s.id)]
        if s.host:
            out.append(host_action(s, t, cause, verb))
        return out

    return decide


# -- server groups ------------------------------------------------------------------------


def decide_server_group_create(w: World, cmd: ServerGroupCreate, cause: Cause) -> list[Event]:
    return create(w.server_groups, cmd, cause, ServerGroupCreated, policy=cmd.policy)


def decide_server_group_delete(w: World, cmd: RefCommand, cause: Cause) -> list[Event]:
    def members(g: ServerGroup) -> list[str]:
        return [f"server {s.name}" for s in w.servers.values() if s.spec.group == g.id]

    return delete_unused(w.server_groups, cmd, cause, ServerGroupDeleted, members)
