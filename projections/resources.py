"""The inventory views: one table per resource kind, its columns derived from
the kind's events, so a field added to an event is a column without a
hand-written migration (the changed view is rebuilt from the log).

A creating event inserts the row, a changing event updates the columns it
carries (and the status its class names), an ending event removes the row:
the past stays in the audit view and is reachable with ``--at``.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any, get_type_hints

import msgspec
from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Float,
    Index,
    String,
    Table,
    Text,
    func,
    select,
)
from sqlalchemy.ext.asyncio import AsyncConnection

from stratus.events import frameworks as fw
from stratus.events import integrations as integ
from stratus.events import resources as ev
from stratus.events.kinds import PLURALS
from stratus.events.model import Event
from stratus.projections.batch import Delete, Op, Patch, Upsert
from stratus.projections.schema import metadata
from stratus.projections.tenants import iso

NAME = "inventory"


# Events whose payload is not columns of their kind's row.
_RULES = (ev.SecurityGroupRuleAdded, ev.SecurityGroupRuleRemoved)
_INTERFACES = (ev.RouterInterfaceAdded, ev.RouterInterfaceRemoved)

_enc = msgspec.json.Encoder(order="sorted")
_dec = msgspec.json.Decoder()


def _column_type(tp: Any) -> Any:
    if tp is bool:
        return Boolean
    if tp is int:
        return BigInteger
    if tp is float:
        return Float
    if tp is str:
        return Text
    return None  # lists and maps: canonical JSON text


def _payload_columns(cls: type) -> dict[str, tuple[str, Any]]:
    """An event's payload as columns: column -> (the payload field holding
    it, "" for the event itself; its type). A payload field that is a
    Struct (a server's spec) gives its own fields as columns, so a field
    added to it is a column of the view too."""
    hints = get_type_hints(cls)
    out: dict[str, tuple[str, Any]] = {}
    for f in cls.payload_fields():
        tp = hints[f]
        if isinstance(tp, type) and issubclass(tp, msgspec.Struct):
            inner = get_type_hints(tp)
            out.update({g: (f, inner[g]) for g in tp.__struct_fields__})
        else:
            out[f] = ("", tp)
    return out


def kind_of(cls: type[ev.ResourceEvent]) -> str:
    """The view an event's row is in: its type's prefix, unless it says
    otherwise (``task.finished`` is about a server)."""
    return getattr(cls, "view_kind", None) or cls.type_name().split(".")[0]


def _kind_events() -> dict[str, list[type[ev.ResourceEvent]]]:
    out: dict[str, list[type[ev.ResourceEvent]]] = {}
    for cls in (*ev.EVENTS, *integ.EVENTS, *fw.EVENTS):
        if isinstance(cls, type) and issubclass(cls, ev.ResourceEvent):
            out.setdefault(kind_of(cls), []).append(cls)
    return out


KIND_EVENTS = _kind_events()
# JSON-text columns, per table (decoded again when read).
JSON_COLUMNS: dict[str, set[str]] = {}
TABLES_BY_KIND: dict[str, Table] = {}


def _make_table(kind: str, classes: list[type[ev.ResourceEvent]]) -> Table:
    cols: dict[str, Any] = {}
    json_cols: set[str] = set()
    for cls in classes:
        if cls in _RULES or cls in _INTERFACES:
            continue
        for field, (_, tp) in _payload_columns(cls).items():
            if field in cols:
                continue
            sql = _column_type(tp)
            if sql is None:
                json_cols.add(field)
                sql = Text
            cols[field] = sql
    name = PLURALS[kind].replace("-", "_")
    JSON_COLUMNS[name] = json_cols
    table = Table(
        name,
        metadata,
        Column("id", String(64), primary_key=True),
        Column("tenant", String(63), nullable=False),
        Column("status", String(16), nullable=False),
        *(Column(f, t) for f, t in cols.items() if f not in ("id", "tenant", "status")),
        Column("created_at", DateTime(timezone=True), nullable=False),
        Column("updated_at", DateTime(timezone=True), nullable=False),
        Column("created_seq", BigInteger, nullable=False),
        Column("updated_seq", BigInteger, nullable=False),
    )
    Index(f"ix_{name}_tenant", table.c.tenant)
    return table


for _kind, _classes in KIND_EVENTS.items():
    TABLES_BY_KIND[_kind] = _make_table(_kind, _classes)

security_group_rules = Table(
    "security_group_rules",
    metadata,
    Column("rule", String(64), primary_key=True),
    Column("security_group", String(64), nullable=False, index=True),
    Column("tenant", String(63), nullable=False),
    Column("direction", String(8), nullable=False),
    Column("protocol", String(8), nullable=False),
    Column("port_min", BigInteger, nullable=False),
    Column("port_max", BigInteger, nullable=False),
    Column("remote_cidr", String(64), nullable=False),
    Column("remote_group", String(64), nullable=False),
    Column("created_seq", BigInteger, nullable=False),
)

router_interfaces = Table(
    "router_interfaces",
    metadata,
    Column("router", String(64), primary_key=True),
    Column("subnet", String(64), primary_key=True),
    Column("tenant", String(63), nullable=False),
    Column("port", String(64), nullable=False),
    Column("ip", String(64), nullable=False),
    Column("created_seq", BigInteger, nullable=False),
)

quotas = Table(
    "quotas",
    metadata,
    Column("tenant", String(63), primary_key=True),
    Column("limits", Text, nullable=False),
    Column("updated_seq", BigInteger, nullable=False),
)

TABLES = (*TABLES_BY_KIND.values(), security_group_rules, router_interfaces, quotas)
FOLDS: tuple[type[Event], ...] = (
    *(c for cs in KIND_EVENTS.values() for c in cs),
    ev.QuotaSet,
)


class _Plan:
    """How one event class becomes row operations, worked out once."""

    __slots__ = ("begins", "deep", "ends", "fixed", "json", "plain", "status", "table", "template")

    def __init__(self, cls: type[ev.ResourceEvent]) -> None:
        self.table = TABLES_BY_KIND[kind_of(cls)]
        special = cls in _RULES or cls in _INTERFACES or cls.resets
        columns = {} if special else _payload_columns(cls)
        fields = tuple(f for f, (held, _) in columns.items() if f in self.table.c and not held)
        json_cols = JSON_COLUMNS[self.table.name]
        self.plain = tuple(f for f in fields if f not in json_cols)
        self.json = tuple(f for f in fields if f in json_cols)
        # Columns from a nested Struct's fields (a server's spec), per field
        # holding it: (that field, plain columns, JSON columns).
        nested: dict[str, list[str]] = {}
        for f, (held, _) in columns.items():
            if f in self.table.c and held:
                nested.setdefault(held, []).append(f)
        self.deep = tuple(
            (
                outer,
                tuple(f for f in inner if f not in json_cols),
                tuple(f for f in inner if f in json_cols),
            )
            for outer, inner in nested.items()
        )
        self.status = cls.status
        self.begins, self.ends = cls.begins, cls.ends
        # What the change sets besides its own fields.
        self.fixed: dict[str, Any] = dict.fromkeys(cls.resets, "")
        if cls.status is not None:
            self.fixed["status"] = cls.status
        self.template = dict.fromkeys(c.name for c in self.table.columns)


_PLANS: dict[type, _Plan] = {}


def _plan(cls: type) -> _Plan:
    p = _PLANS.get(cls)
    if p is None:
        p = _PLANS[cls] = _Plan(cls)
    return p


def _json(value: Any) -> str:
    return _enc.encode(value).decode()


def _side(seq: int, event: Any, cls: type) -> Op:
    """The rows of a security group's rules and a router's interfaces."""
    rid = event.aggregate.id
    if cls is ev.SecurityGroupRuleAdded:
        return Upsert(
            security_group_rules,
            {
                "rule": event.rule,
                "security_group": rid,
                "tenant": event.tenant,
                "direction": event.direction,
                "protocol": event.protocol,
                "port_min": event.port_min,
                "port_max": event.port_max,
                "remote_cidr": event.remote_cidr,
                "remote_group": event.remote_group,
                "created_seq": seq,
            },
        )
    if cls is ev.SecurityGroupRuleRemoved:
        return Delete(security_group_rules, (event.rule,))
    if cls is ev.RouterInterfaceAdded:
        return Upsert(
            router_interfaces,
            {
                "router": rid,
                "subnet": event.subnet,
                "tenant": event.tenant,
                "port": event.port,
                "ip": event.ip,
                "created_seq": seq,
            },
        )
    return Delete(router_interfaces, (rid, event.subnet))


_SIDE = frozenset((*_RULES, *_INTERFACES))


def _nested(values: dict[str, Any], event: Any, deep: tuple) -> None:
    """The columns a nested Struct of ``event`` gives (see ``_Plan.deep``)."""
    for outer, plain, js in deep:
        inner = getattr(event, outer)
        for f in plain:
            values[f] = getattr(inner, f)
        for f in js:
            values[f] = _json(getattr(inner, f))


def apply(seq: int, event: Event) -> Iterable[Op]:
    # Called once per inventory event on a rebuild of the whole log: one
    # plan lookup and plain loops, no per-field helper calls.
    cls = type(event)
    if cls is ev.QuotaSet:
        return (
            Upsert(
                quotas, {"tenant": event.tenant, "limits": _json(event.limits), "updated_seq": seq}
            ),
        )
    p = _PLANS.get(cls) or _plan(cls)
    rid = event.aggregate.id
    side = _side(seq, event, cls) if cls in _SIDE else None
    if p.ends:
        op: Op = Delete(p.table, (rid,))
    elif p.begins:
        row = p.template.copy()
        for f in p.plain:
            row[f] = getattr(event, f)
        for f in p.json:
            row[f] = _json(getattr(event, f))
        if p.deep:
            _nested(row, event, p.deep)
        at = event.at
        row["id"] = rid
        row["tenant"] = event.tenant
        row["status"] = p.status or "active"
        row["created_at"] = row["updated_at"] = at
        row["created_seq"] = row["updated_seq"] = seq
        op = Upsert(p.table, row)
    else:
        values = {"updated_at": event.at, "updated_seq": seq}
        for f in p.plain:
            values[f] = getattr(event, f)
        for f in p.json:
            values[f] = _json(getattr(event, f))
        if p.deep:
            _nested(values, event, p.deep)
        if p.fixed:
            values.update(p.fixed)
        op = Patch(p.table, (rid,), values)
    return (side, op) if side is not None else (op,)


# -- reading ---------------------------------------------------------------------------


def row_view(table: Table, row: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    json_cols = JSON_COLUMNS.get(table.name, ())
    for k, v in row._mapping.items():
        if k in ("created_seq", "updated_seq"):
            continue
        if k in json_cols and isinstance(v, str):
            v = _dec.decode(v)
        elif isinstance(v, datetime):
            v = iso(v)
        out[k] = v
    return out


async def list_rows(
    conn: AsyncConnection, kind: str, tenants: list[str] | None, name: str | None = None
) -> list[dict[str, Any]]:
    """A kind's live rows, of ``tenants`` (None: every tenant), oldest first."""
    t = TABLES_BY_KIND[kind]
    q = select(t).order_by(t.c.created_seq)
    if tenants is not None:
        q = q.where(t.c.tenant.in_(tenants))
    if name is not None and "name" in t.c:
        q = q.where(t.c.name == name)
    return [row_view(t, r) for r in (await conn.execute(q)).all()]


async def find_row(
    conn: AsyncConnection, kind: str, ref: str, tenants: list[str] | None
) -> dict[str, Any] | None:
    """By id, else by a name exactly one row (of ``tenants``) has, else by address."""
    t = TABLES_BY_KIND[kind]
    scope = (lambda q: q) if tenants is None else (lambda q: q.where(t.c.tenant.in_(tenants)))
    rows = (await conn.execute(scope(select(t).where(t.c.id == ref)))).all()
    for column in ("name", "address"):
        if not rows and column in t.c:
            rows = (await conn.execute(scope(select(t).where(t.c[column] == ref)))).all()
    return row_view(t, rows[0]) if len(rows) == 1 else None


async def details(conn: AsyncConnection, kind: str, row: dict[str, Any]) -> dict[str, Any]:
    """What ``show`` adds to a row: a server's addresses, a group's rules, ..."""
    if kind == "server":
        ports = TABLES_BY_KIND["port"]
        q = select(ports.c.network, ports.c.ip, ports.c.mac, ports.c.id).where(
            ports.c.device == row["id"]
        )
        found = (await conn.execute(q.order_by(ports.c.created_seq))).all()
        row["addresses"] = [
            {"network": r.network, "ip": r.ip, "mac": r.mac, "port": r.id} for r in found
        ]
        fips = TABLES_BY_KIND["floating-ip"]
        q = select(fips.c.address).where(fips.c.server == row["id"])
        row["floating_ips"] = [r.address for r in (await conn.execute(q)).all()]
    elif kind == "host":
        add_host_use(row, (await host_use(conn, row["id"])).get(row["id"]))
    elif kind == "framework":
        await add_framework_use(conn, [row])
    elif kind == "security-group":
        r = security_group_rules
        q = select(r).where(r.c.security_group == row["id"]).order_by(r.c.created_seq)
        row["rules"] = [
            {k: v for k, v in x._mapping.items() if k not in ("created_seq", "tenant")}
            for x in (await conn.execute(q)).all()
        ]
    elif kind == "router":
        r = router_interfaces
        q = select(r).where(r.c.router == row["id"]).order_by(r.c.created_seq)
        row["interfaces"] = [
            {"subnet": x.subnet, "port": x.port, "ip": x.ip} for x in (await conn.execute(q)).all()
        ]
    return row


async def add_framework_use(conn: AsyncConnection, rows: list[dict[str, Any]]) -> None:
    """Each framework's allocation (what its live tasks hold), task count and
    dominant share (DRF: the largest of its shares of the enabled hosts'
    vCPUs, RAM and disk, after allocation ratios, divided by its weight)."""
    from stratus.handlers.allocator.drf import Res, dominant_share

    if not rows:
        return
    hosts = TABLES_BY_KIND["host"]
    q = select(
        func.sum(hosts.c.vcpus * hosts.c.cpu_ratio),
        func.sum(hosts.c.ram_mb * hosts.c.ram_ratio),
        func.sum(hosts.c.disk_gb * hosts.c.disk_ratio),
    ).where(hosts.c.status == "enabled")
    cap = (await conn.execute(q)).one()
    total = Res(*(float(x or 0) for x in cap))
    sv = TABLES_BY_KIND["server"]
    q = (
        select(
            sv.c.framework,
            func.count(),
            func.sum(sv.c.vcpus),
            func.sum(sv.c.ram_mb),
            func.sum(sv.c.disk_gb),
        )
        .where(sv.c.framework.in_([r["id"] for r in rows]))
        .where(sv.c.host.is_not(None))
        .where(sv.c.host != "")
        .group_by(sv.c.framework)
    )
    use = {r[0]: r[1:] for r in (await conn.execute(q)).all()}
    for row in rows:
        n, v, m, d = use.get(row["id"], (0, 0, 0, 0))
        held = Res(float(v or 0), float(m or 0), float(d or 0))
        row["tasks"] = int(n)
        row["allocation"] = {"vcpus": int(v or 0), "ram_mb": int(m or 0), "disk_gb": int(d or 0)}
        row["dominant_share"] = round(dominant_share(held, total, row.get("weight") or 1.0), 4)


async def host_use(
    conn: AsyncConnection, host: str | None = None
) -> dict[str, tuple[int, int, int, int]]:
    """What the scheduler's claims hold on each host (or one): servers,
    vCPUs, RAM and disk of the servers placed there (a claim is released
    exactly when its server leaves the view or the scheduler gives up on it,
    which clears its host)."""
    sv = TABLES_BY_KIND["server"]
    q = select(
        sv.c.host,
        func.count(),
        func.sum(sv.c.vcpus),
        func.sum(sv.c.ram_mb),
        func.sum(sv.c.disk_gb),
    ).group_by(sv.c.host)
    q = q.where(sv.c.host == host) if host is not None else q.where(sv.c.host != "")
    return {
        r[0]: (r[1], r[2] or 0, r[3] or 0, r[4] or 0) for r in (await conn.execute(q)).all() if r[0]
    }


def add_host_use(row: dict[str, Any], use: tuple[int, int, int, int] | None) -> None:
    n, cpu, ram, disk = use or (0, 0, 0, 0)
    row["servers"] = n
    row["used_vcpus"], row["used_ram_mb"], row["used_disk_gb"] = cpu, ram, disk


async def quota_usage(
    conn: AsyncConnection, tenant: str, defaults: dict[str, int]
) -> dict[str, Any]:
    """Limits and usage, counted from the tenant's resource rows."""
    row = (await conn.execute(select(quotas.c.limits).where(quotas.c.tenant == tenant))).first()
    limits = {**defaults, **(_dec.decode(row[0]) if row else {})}
    used: dict[str, int] = {}
    for resource, quota in ev.QUOTAS.items():
        tb = TABLES_BY_KIND[quota.kind]
        what = func.count() if quota.column is None else func.sum(tb.c[quota.column])
        q = select(func.coalesce(what, 0)).select_from(tb).where(tb.c.tenant == tenant)
        used[resource] = int((await conn.execute(q)).scalar_one())
    return ev.quota_report(tenant, limits, used)
