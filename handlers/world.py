"""A tenant's world: every resource it owns, typed, and its quota limits,
folded from ``ev.<tenant>.>`` alone; and the state of one cloud-wide
aggregate, folded from its own subject.

Quota is a tenant-wide invariant, so decisions about a tenant's resources
are made on this state as of the last event matching ``ev.<tenant>.>`` and
appended on the condition that nothing else matched since. Usage is never a
counter of its own: ``handlers.quota`` counts it from the resources, so it
cannot drift from them.
"""

from __future__ import annotations

from collections.abc import Iterator, ValuesView
from typing import Any, Generic

from stratus.events.errors import NotFound
from stratus.events.model import Event
from stratus.events.network import SegmentAllocated, SegmentReleased
from stratus.events.resources import (
    QUOTA_DEFAULTS,
    SYSTEM,
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
from stratus.handlers.records import (
    RECORDS,
    FloatingIp,
    Image,
    Network,
    Port,
    QosPolicy,
    R,
    Router,
    Rule,
    SecurityGroup,
    Server,
    ServerGroup,
    Subnet,
    Volume,
    begin,
    update,
)


def payload(event: Event) -> dict[str, Any]:
    """The event's own fields (not the envelope), as a fresh dict."""
    return {n: getattr(event, n) for n in event.payload_fields()}


def tenant_boundary(tenant: str) -> str:
    return f"ev.{tenant}.>"


def system_subject(kind: str, name: str) -> str:
    """The subject of a cloud-wide object (a host, a flavor, a public image,
    an external network), named by the name it was created with."""
    return f"ev.{SYSTEM}.{kind}.{name}"


class Table(Generic[R]):
    """A tenant's live resources of one kind, by id; names are unique among them."""

    __slots__ = ("by_id", "record", "world")

    def __init__(self, world: World, record: type[R]) -> None:
        self.world = world
        self.record = record
        self.by_id: dict[str, R] = {}

    def __len__(self) -> int:
        return len(self.by_id)

    def __iter__(self) -> Iterator[str]:
        return iter(self.by_id)

    def values(self) -> ValuesView[R]:
        return self.by_id.values()

    def get(self, rid: str) -> R | None:
        return self.by_id.get(rid)

    def named(self, name: str) -> R | None:
        for r in self.by_id.values():
            if getattr(r, "name", None) == name:
                return r
        return None

    def find(self, ref: str) -> R:
        """A live resource by id, else by its name, else NotFound."""
        found = self.by_id.get(ref) or self.named(ref)
        if found is None:
            raise NotFound(f"{self.record.label()} {ref} not found in tenant {self.world.tenant}")
        return found


class World:
    """Mutable on purpose: folding a tenant with thousands of resources must
    not copy them per event. Decisions only read it.

    Kinds without a record type here (integrations and webhooks, decided in
    ``handlers.integrations``) are kept as plain dicts: ``of`` and ``find``.
    """

    __slots__ = (
        "defaults",
        "deleted",
        "exists",
        "floating_ips",
        "images",
        "limits",
        "networks",
        "ports",
        "qos_policies",
        "routers",
        "security_groups",
        "server_groups",
        "servers",
        "subnets",
        "tables",
        "tenant",
        "untyped",
        "volumes",
    )

    def __init__(self, defaults: dict[str, int] | None = None) -> None:
        # Limits of a tenant no ``quota set`` has touched: the configured
        # defaults (every handler process must be given the same), else ours.
        self.defaults = {**QUOTA_DEFAULTS, **(defaults or {})}
        self.tenant = ""
        self.exists = False
        self.deleted = False
        self.limits: dict[str, int] = {}
        self.images = Table(self, Image)
        self.servers = Table(self, Server)
        self.server_groups = Table(self, ServerGroup)
        self.volumes = Table(self, Volume)
        self.networks = Table(self, Network)
        self.subnets = Table(self, Subnet)
        self.ports = Table(self, Port)
        self.routers = Table(self, Router)
        self.floating_ips = Table(self, FloatingIp)
        self.security_groups = Table(self, SecurityGroup)
        self.qos_policies = Table(self, QosPolicy)
        self.tables: dict[str, Table[Any]] = {
            t.record.kind: t
            for t in (
                self.images,
                self.servers,
                self.server_groups,
                self.volumes,
                self.networks,
                self.subnets,
                self.ports,
                self.routers,
                self.floating_ips,
                self.security_groups,
                self.qos_policies,
            )
        }
        # kind -> id -> attributes, for the kinds without a table.
        self.untyped: dict[str, dict[str, dict[str, Any]]] = {}

    @property
    def live(self) -> bool:
        return self.exists and not self.deleted

    def of(self, kind: str) -> dict[str, dict[str, Any]]:
        """The live resources of a kind without a table, by id."""
        if kind in self.tables:
            raise KeyError(f"{kind} is typed: read world.tables[{kind!r}]")
        return self.untyped.get(kind) or {}

    def find(self, kind: str, ref: str, label: str | None = None) -> dict[str, Any]:
        """A live resource of a kind without a table by id, else by name, else NotFound."""
        items = self.of(kind)
        found = items.get(ref)
        if found is None:
            found = next((r for r in items.values() if r.get("name") == ref), None)
        if found is None:
            raise NotFound(f"{label or kind} {ref} not found in tenant {self.tenant}")
        return found


def live_tenant(w: World, tenant: str) -> None:
    """Refuse to decide in a tenant that does not exist (or no longer does)."""
    if not w.live:
        raise NotFound(f"tenant {tenant} not found")


def fold(world: World, event: Event) -> World:
    if isinstance(event, ResourceEvent):
        table = world.tables.get(event.aggregate.kind)
        if table is not None:
            _fold_record(table, event)
        else:
            _fold_untyped(world, event)
    elif isinstance(event, QuotaSet):
        world.limits = dict(event.limits)
    elif isinstance(event, TenantCreated):
        world.tenant, world.exists, world.deleted = event.aggregate.id, True, False
    elif isinstance(event, TenantDeleted):
        world.deleted = True
    return world


def _fold_record(table: Table[Any], event: ResourceEvent) -> None:
    rid = event.aggregate.id
    if event.ends:
        table.by_id.pop(rid, None)
        return
    if event.begins:
        r = table.by_id[rid] = begin(table.record, event, tenant=event.tenant)
    else:
        r = table.by_id.get(rid)
        if r is None:
            return  # about a resource this tenant never had: nothing to fold
        # (A map is UNSET until its first entry: ``or {}`` makes it.)
        if isinstance(event, SecurityGroupRuleAdded):
            r.rules = r.rules or {}
            r.rules[event.rule] = Rule(**payload(event))
        elif isinstance(event, SecurityGroupRuleRemoved):
            r.rules = r.rules or {}
            r.rules.pop(event.rule, None)
        elif isinstance(event, RouterInterfaceAdded):
            r.interfaces = r.interfaces or {}
            r.interfaces[event.subnet] = event.port
        elif isinstance(event, RouterInterfaceRemoved):
            r.interfaces = r.interfaces or {}
            r.interfaces.pop(event.subnet, None)
        elif event.resets:
            for f in event.resets:
                setattr(r, f, "")
        else:
            update(r, event)
    if event.status is not None:
        r.status = event.status


def _fold_untyped(world: World, event: ResourceEvent) -> None:
    kind, rid = event.aggregate.kind, event.aggregate.id
    items = world.untyped.setdefault(kind, {})
    if event.ends:
        items.pop(rid, None)
        return
    if event.begins:
        r = items[rid] = {**payload(event), "id": rid, "tenant": event.tenant}
    else:
        r = items.get(rid)
        if r is None:
            return
        r.update(dict.fromkeys(event.resets, "") if event.resets else payload(event))
    if event.status is not None:
        r["status"] = event.status


# -- one cloud-wide aggregate (a host, a flavor, a public image, a pool) -------


class Aggregate(Generic[R]):
    """The state of one ``_system`` aggregate: its record while it exists,
    and, for an external network or the segment pool, which addresses (or
    VNIs) are held by whom."""

    __slots__ = ("allocated", "attrs", "ended")

    def __init__(self) -> None:
        self.attrs: R | None = None
        self.ended = False
        self.allocated: dict[str, tuple[str, str]] = {}

    @property
    def live(self) -> bool:
        return self.attrs is not None


def fold_aggregate(state: Aggregate[Any], event: Event) -> Aggregate[Any]:
    if isinstance(event, AddressAllocated):
        state.allocated[event.address] = (event.holder_tenant, event.holder)
    elif isinstance(event, AddressReleased):
        state.allocated.pop(event.address, None)
    elif isinstance(event, SegmentAllocated):
        state.allocated[str(event.vni)] = (event.holder_tenant, event.holder)
    elif isinstance(event, SegmentReleased):
        state.allocated.pop(str(event.vni), None)
    elif isinstance(event, ResourceEvent) and event.aggregate.kind in RECORDS:
        if event.ends:
            state.attrs, state.ended = None, True
        elif event.begins:
            state.attrs = begin(RECORDS[event.aggregate.kind], event)
        elif state.attrs is not None:
            update(state.attrs, event)
        if state.attrs is not None and event.status is not None:
            state.attrs.status = event.status
    return state
