"""``<kind>.rename``: a tenant resource's new name (what OpenStack's update
calls change), for networks, subnets, routers, images and security groups
(with its description).

Decided on the tenant's world like every tenant verb: the new name must be
free among the tenant's resources of that kind when the append lands.
"""

from __future__ import annotations

from typing import Any

from stratus.events.errors import AlreadyExists, Invalid
from stratus.events.model import Cause, Event
from stratus.events.resources import RENAMED, Rename
from stratus.handlers.registry import Handler
from stratus.handlers.world import World, fold, tenant_boundary


def decide_rename(kind: str) -> Any:
    cls = RENAMED[kind]

    def decide(w: World, cmd: Rename, cause: Cause) -> list[Event]:
        if cmd.description is not None and kind != "security-group":
            raise Invalid(f"a {kind} has no description")
        r = w.find(kind, cmd.ref)
        name = r["name"] if cmd.name is None else cmd.name
        if name and name != r["name"] and w.named(kind, name) is not None:
            raise AlreadyExists(f"a {kind} named {name} already exists in tenant {w.tenant}")
        fields: dict[str, Any] = {"name": name}
        if kind == "security-group":
            fields["description"] = (
                r.get("description", "") if cmd.description is None else cmd.description
            )
        if all(r.get(k) == v for k, v in fields.items()):
            return []
        return [cause.make(cls, cmd.tenant or "", kind, r["id"], **fields)]

    return decide


def _renamed(kind: str) -> Any:
    def result(w: World, events: list[Event]) -> dict[str, Any] | None:
        return dict(w.of(kind).get(events[0].aggregate.id, {})) if events else None

    return result


def handlers(quota_defaults: dict[str, int] | None = None) -> list[Handler]:
    return [
        Handler(
            verb=f"{kind}.rename",
            command=Rename,
            permission=f"{kind}.rename",
            boundary=lambda c: tenant_boundary(c.tenant),
            initial=lambda: World(quota_defaults),
            fold=fold,
            decide=decide_rename(kind),
            tenant_of=lambda c: c.tenant,
            result=_renamed(kind),
        )
        for kind in RENAMED
    ]
