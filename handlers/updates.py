"""What OpenStack's update calls change: ``<kind>.rename`` (a new name for
a network, subnet, router, image or security group, with the group's
description) and ``router.set`` (a router's administrative state).

Decided on the tenant's world like every tenant verb: a new name must be
free among the tenant's resources of that kind when the append lands.
"""

from __future__ import annotations

from typing import Any

from stratus.events.errors import AlreadyExists, Invalid
from stratus.events.model import Cause, Event
from stratus.events.resources import (
    RENAMED,
    Rename,
    RouterAdminStateSet,
    RouterSet,
    TenantScoped,
)
from stratus.handlers import resources
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


def decide_router_set(w: World, cmd: RouterSet, cause: Cause) -> list[Event]:
    r = w.find("router", cmd.ref)
    if r.get("admin_up", True) == cmd.admin_up:
        return []
    return [
        cause.make(RouterAdminStateSet, cmd.tenant or "", "router", r["id"], admin_up=cmd.admin_up)
    ]


def decide_ensure_default(w: World, cmd: TenantScoped, cause: Cause) -> list[Event]:
    """The tenant's ``default`` security group, made now if it has none yet
    (Neutron makes it when a project first lists its groups)."""
    if w.named("security-group", "default") is not None:
        return []
    _, made = resources.default_security_group(w, cause, cmd.tenant or "")
    w.check_quota({"security_groups": 1})
    return made


def _renamed(kind: str) -> Any:
    def result(w: World, events: list[Event]) -> dict[str, Any] | None:
        return dict(w.of(kind).get(events[0].aggregate.id, {})) if events else None

    return result


def _on_tenant(verb: str, command: type, decide: Any, kind: str, defaults: Any) -> Handler:
    return Handler(
        verb=verb,
        command=command,
        permission=verb,
        boundary=lambda c: tenant_boundary(c.tenant),
        initial=lambda: World(defaults),
        fold=fold,
        decide=decide,
        tenant_of=lambda c: c.tenant,
        result=_renamed(kind),
    )


def handlers(quota_defaults: dict[str, int] | None = None) -> list[Handler]:
    return [
        *(
            _on_tenant(f"{kind}.rename", Rename, decide_rename(kind), kind, quota_defaults)
            for kind in RENAMED
        ),
        _on_tenant("router.set", RouterSet, decide_router_set, "router", quota_defaults),
        _on_tenant(
            "security-group.ensure-default",
            TenantScoped,
            decide_ensure_default,
            "security-group",
            quota_defaults,
        ),
    ]
