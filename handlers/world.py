"""A tenant's world: every resource it owns, its quota and its usage, folded
from ``ev.<tenant>.>`` alone.

Quota is a tenant-wide invariant, so decisions about a tenant's resources
are made on this state as of the last event matching ``ev.<tenant>.>`` and
appended on the condition that nothing else matched since. Usage is never a
counter of its own: it is counted from the resources, so it cannot drift
from them.
"""

from __future__ import annotations

from typing import Any

from stratus.events.errors import NotFound, QuotaExceeded
from stratus.events.model import Event
from stratus.events.network import SegmentAllocated, SegmentReleased
from stratus.events.resources import (
    QUOTA_DEFAULTS,
    QUOTAS,
    AddressAllocated,
    AddressReleased,
    QuotaSet,
    ResourceEvent,
    RouterInterfaceAdded,
    RouterInterfaceRemoved,
    SecurityGroupRuleAdded,
    SecurityGroupRuleRemoved,
)
from stratus.events.tenants import TenantCreated, TenantDeleted


def payload(event: Event) -> dict[str, Any]:
    """The event's own fields (not the envelope), as a fresh dict."""
    return {n: getattr(event, n) for n in event.payload_fields()}


def tenant_boundary(tenant: str) -> str:
    return f"ev.{tenant}.>"


class World:
    """Mutable on purpose: folding a tenant with thousands of resources must
    not copy them per event. Decisions only read it."""

    __slots__ = ("defaults", "deleted", "exists", "limits", "res", "tenant")

    def __init__(self, defaults: dict[str, int] | None = None) -> None:
        # Limits of a tenant no ``quota set`` has touched: the configured
        # defaults (every handler process must be given the same), else ours.
        self.defaults = {**QUOTA_DEFAULTS, **(defaults or {})}
        self.tenant = ""
        self.exists = False
        self.deleted = False
        self.limits: dict[str, int] = {}
        # kind -> id -> attributes (name, status, payload fields)
        self.res: dict[str, dict[str, dict[str, Any]]] = {}

    def of(self, kind: str) -> dict[str, dict[str, Any]]:
        return self.res.get(kind) or {}

    def find(self, kind: str, ref: str, label: str | None = None) -> dict[str, Any]:
        """A live resource by id, else by its (unique) name, else NotFound."""
        items = self.of(kind)
        found = items.get(ref)
        if found is None:
            for r in items.values():
                if r.get("name") == ref:
                    found = r
                    break
        if found is None:
            raise NotFound(f"{label or kind} {ref} not found in tenant {self.tenant}")
        return found

    def named(self, kind: str, name: str) -> dict[str, Any] | None:
        for r in self.of(kind).values():
            if r.get("name") == name:
                return r
        return None

    def limit(self, resource: str) -> int:
        return self.limits.get(resource, self.defaults.get(resource, -1))

    def usage(self) -> dict[str, int]:
        return {
            r: len(self.of(q.kind))
            if q.column is None
            else sum(x[q.column] for x in self.of(q.kind).values())
            for r, q in QUOTAS.items()
        }

    def check_quota(self, wanted: dict[str, int]) -> None:
        """Refuse if any of ``wanted`` (resource -> how many more) would exceed its limit."""
        if not any(n > 0 for n in wanted.values()):
            return
        used = self.usage()
        for resource, more in wanted.items():
            limit = self.limit(resource)
            if more > 0 and limit >= 0 and used[resource] + more > limit:
                raise QuotaExceeded(
                    f"{resource} {used[resource]} of {limit} in use "
                    f"(asked for {more} more) in tenant {self.tenant}"
                )


def fold(world: World, event: Event) -> World:
    if isinstance(event, ResourceEvent):
        _fold_resource(world, event)
    elif isinstance(event, QuotaSet):
        world.limits = dict(event.limits)
    elif isinstance(event, TenantCreated):
        world.tenant, world.exists, world.deleted = event.aggregate.id, True, False
    elif isinstance(event, TenantDeleted):
        world.deleted = True
    return world


def _fold_resource(world: World, event: ResourceEvent) -> None:
    kind, rid = event.aggregate.kind, event.aggregate.id
    items = world.res.setdefault(kind, {})
    if event.ends:
        items.pop(rid, None)
        return
    if event.begins:
        r = payload(event)
        r["id"] = rid
        r["tenant"] = event.tenant
        items[rid] = r
    else:
        r = items.get(rid)
        if r is None:
            return  # about a resource this tenant never had: nothing to fold
        if isinstance(event, SecurityGroupRuleAdded):
            r.setdefault("rules", {})[event.rule] = payload(event)
        elif isinstance(event, SecurityGroupRuleRemoved):
            r.setdefault("rules", {}).pop(event.rule, None)
        elif isinstance(event, RouterInterfaceAdded):
            r.setdefault("interfaces", {})[event.subnet] = event.port
        elif isinstance(event, RouterInterfaceRemoved):
            r.setdefault("interfaces", {}).pop(event.subnet, None)
        elif event.resets:
            r.update(dict.fromkeys(event.resets, ""))
        else:
            r.update(payload(event))
    if event.status is not None:
        r["status"] = event.status


# -- one cloud-wide aggregate (a host, a flavor, a public image, a pool) -------


class Aggregate:
    """The state of one ``_system`` aggregate: its attributes while it exists,
    and, for an external network, which pool addresses are held by whom."""

    __slots__ = ("allocated", "attrs", "ended")

    def __init__(self) -> None:
        self.attrs: dict[str, Any] | None = None
        self.ended = False
        self.allocated: dict[str, tuple[str, str]] = {}

    @property
    def live(self) -> bool:
        return self.attrs is not None


def fold_aggregate(state: Aggregate, event: Event) -> Aggregate:
    if isinstance(event, AddressAllocated):
        state.allocated[event.address] = (event.holder_tenant, event.holder)
    elif isinstance(event, AddressReleased):
        state.allocated.pop(event.address, None)
    elif isinstance(event, SegmentAllocated):
        state.allocated[str(event.vni)] = (event.holder_tenant, event.holder)
    elif isinstance(event, SegmentReleased):
        state.allocated.pop(str(event.vni), None)
    elif isinstance(event, ResourceEvent):
        if event.ends:
            state.attrs, state.ended = None, True
        elif event.begins:
            state.attrs = payload(event)
            state.attrs["id"] = event.aggregate.id
        elif state.attrs is not None:
            state.attrs.update(payload(event))
        if state.attrs is not None and event.status is not None:
            state.attrs["status"] = event.status
    return state
