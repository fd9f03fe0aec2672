"""A tenant's volumes: create and delete within quota, attach to one VM at
a time and detach. Decided on the tenant's world (see ``handlers.world``);
attaching to or detaching from a placed server is told to its host's agent.
"""

from __future__ import annotations

from stratus.events.errors import Conflict, Invalid
from stratus.events.model import Cause, Event
from stratus.events.resources import (
    RefCommand,
    VolumeAttach,
    VolumeAttached,
    VolumeCreate,
    VolumeCreated,
    VolumeDeleted,
    VolumeDetached,
)
from stratus.handlers.inventory import create, delete_unused, host_action
from stratus.handlers.records import Volume
from stratus.handlers.world import World


def decide_volume_create(w: World, cmd: VolumeCreate, cause: Cause) -> list[Event]:
    wanted = {"volumes": 1, "volume_gb": cmd.size_gb}
    return create(w.volumes, cmd, cause, VolumeCreated, wanted, size_gb=cmd.size_gb)


def decide_volume_delete(w: World, cmd: RefCommand, cause: Cause) -> list[Event]:
    def attached(v: Volume) -> list[str]:
        return [f"server {v.server} (detach it first)"] if v.server else []

    return delete_unused(w.volumes, cmd, cause, VolumeDeleted, attached)


def decide_volume_attach(w: World, cmd: VolumeAttach, cause: Cause) -> list[Event]:
    v, s = w.volumes.find(cmd.volume), w.servers.find(cmd.server)
    if v.server == s.id:
        return []
    if v.server:
        raise Conflict(f"volume {v.name} is attached to another server")
    if s.status in ("deleting", "error"):
        raise Conflict(f"server {s.name} is {s.status}")
    if s.spec.instance_type == "container":
        raise Invalid(f"server {s.name} is a container; volumes attach to VMs")
    t = cmd.tenant or ""
    out = [cause.make(VolumeAttached, t, "volume", v.id, server=s.id)]
    if s.host:
        out.append(host_action(s, t, cause, "attach-volume", volume=v.id, size_gb=v.size_gb))
    return out


def decide_volume_detach(w: World, cmd: VolumeAttach, cause: Cause) -> list[Event]:
    v, s = w.volumes.find(cmd.volume), w.servers.find(cmd.server)
    if v.server != s.id:
        raise Conflict(f"volume {v.name} is not attached to server {s.name}")
    t = cmd.tenant or ""
    out = [cause.make(VolumeDetached, t, "volume", v.id, server=s.id)]
    if s.host:
        out.append(host_action(s, t, cause, "detach-volume", volume=v.id))
    return out
