"""The rules every inventory decision shares: a named resource is created
in a live tenant under a free name and within quota, deleted only when
nothing uses it; a cloud-wide object's name is never reused; a verb on a
placed server is told to its host's agent as well.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import msgspec

from stratus.events.compute import HostServerAction
from stratus.events.errors import AlreadyExists, Conflict, Invalid, NotFound
from stratus.events.ids import new_id
from stratus.events.model import Cause, Event
from stratus.events.resources import RENAMED, SYSTEM, RefCommand, Rename
from stratus.handlers import quota
from stratus.handlers.records import R, Server, shared_fields
from stratus.handlers.world import Aggregate, Table, World, live_tenant


def carried(cmd: msgspec.Struct, event: type[Event]) -> dict[str, Any]:
    """What the command asked, as the event records it: the command's fields
    the event has under the same names."""
    return {f: getattr(cmd, f) for f in shared_fields(event, type(cmd))}


def unique(table: Table[Any], name: str) -> None:
    # An empty name (an unnamed Neutron subnet or port) is nobody's to hold.
    if name and table.named(name) is not None:
        raise AlreadyExists(
            f"a {table.record.kind} named {name} already exists in tenant {table.world.tenant}"
        )


def create(
    table: Table[Any],
    cmd: Any,
    cause: Cause,
    cls: type[Event],
    wanted: dict[str, int] | None = None,
    **fields: Any,
) -> list[Event]:
    """A named resource of the tenant: it must live, the name be free, the quota allow it."""
    t = cmd.tenant or ""
    live_tenant(table.world, t)
    unique(table, cmd.name)
    if wanted:
        quota.check(table.world, wanted)
    return [cause.make(cls, t, table.record.kind, new_id(), name=cmd.name, **fields)]


def decide_rename(kind: str) -> Callable[[World, Rename, Cause], list[Event]]:
    """The decision of ``<kind>.rename`` (what OpenStack's update calls
    change): a new name, free among the tenant's resources of the kind when
    the append lands, and a security group's new description."""
    cls = RENAMED[kind]
    described = "description" in cls.payload_fields()

    def decide(w: World, cmd: Rename, cause: Cause) -> list[Event]:
        table = w.tables[kind]
        if cmd.description is not None and not described:
            raise Invalid(f"a {table.record.label()} has no description")
        r = table.find(cmd.ref)
        fields: dict[str, Any] = {"name": r.name if cmd.name is None else cmd.name}
        if described:
            fields["description"] = r.description if cmd.description is None else cmd.description
        if all(getattr(r, k) == v for k, v in fields.items()):
            return []
        if fields["name"] != r.name:
            unique(table, fields["name"])
        return [cause.make(cls, cmd.tenant or "", kind, r.id, **fields)]

    return decide


def delete_unused(
    table: Table[R],
    cmd: RefCommand,
    cause: Cause,
    cls: type[Event],
    users: Callable[[R], Iterable[str]],
) -> list[Event]:
    """Delete a resource nothing uses any more; otherwise name what still does."""
    r = table.find(cmd.ref)
    using = sorted(users(r))
    if using:
        name = getattr(r, "name", "") or r.id  # an unnamed one by its id
        raise Conflict(f"{r.label()} {name} is in use by {', '.join(using)}")
    return [cause.make(cls, cmd.tenant or "", table.record.kind, r.id)]


def ports_where(w: World, test: Callable[[Any], bool]) -> list[str]:
    """The ports that pass ``test``, as a refusal names them."""
    return [f"port {p.name}" for p in w.ports.values() if test(p)]


def host_action(s: Server, tenant: str, cause: Cause, action: str, **kw: Any) -> Event:
    """The same verb told to the agent of the server's host (see events.compute)."""
    return cause.make(
        HostServerAction,
        SYSTEM,
        "host",
        str(s.host),
        server=s.id,
        server_tenant=tenant,
        action=action,
        **kw,
    )


# -- cloud-wide objects -------------------------------------------------------------


def existing(a: Aggregate[Any], what: str, name: str) -> None:
    if not a.live:
        raise NotFound(f"{what} {name} not found")


def unused_name(a: Aggregate[Any], what: str, name: str) -> None:
    # A cloud-wide object's name is its id, on the log forever: never reused.
    if a.live or a.ended:
        raise AlreadyExists(f"{what} {name} exists or existed; names are never reused")
