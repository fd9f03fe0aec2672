"""The audit trail: one row per event, who did what, when, from which command.

Every event type is folded here, generically from the envelope, so a new
event type needs no change: its ``result`` is read from its own fields. The
view is an index into the log, not a copy of it: a row holds what filters
and the table need (each an indexed column), and the event's own fields are
read from the log by sequence when a page is shown. That keeps the rebuild
to one small row per event and the store (which time travel copies) small.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Annotated, Any

import msgspec
from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Index,
    Integer,
    String,
    Table,
    Text,
    select,
)
from sqlalchemy.ext.asyncio import AsyncConnection

from stratus.events.catalog import EVENT_TYPES
from stratus.events.commands import via_of
from stratus.events.errors import Invalid
from stratus.events.model import SECRET_FIELDS, Event
from stratus.projections.batch import Op, Upsert
from stratus.projections.schema import metadata
from stratus.projections.tenants import iso

# On SQLite an INTEGER PRIMARY KEY is the rowid itself: no second B-tree for
# the key, and every index below ends in the sequence for free.
_SEQ = BigInteger().with_variant(Integer, "sqlite")

audit = Table(
    "audit",
    metadata,
    Column("seq", _SEQ, primary_key=True, autoincrement=False),
    Column("at", DateTime(timezone=True), nullable=False),
    # Unbounded strings: an event is never refused by the view for a long id.
    Column("tenant", String, nullable=False),
    Column("actor", String, nullable=False),
    Column("type", String, nullable=False),
    Column("kind", String, nullable=False),
    Column("resource", String, nullable=False),
    Column("event_id", String, nullable=False),
    Column("correlation_id", String, nullable=False),
    Column("causation_id", String, nullable=False),
    Column("result", Text, nullable=False),
    # Each filter walks its index in log order, so a page is a range scan.
    Index("audit_tenant_seq", "tenant", "seq"),
    Index("audit_actor_seq", "actor", "seq"),
    Index("audit_resource_seq", "resource", "seq"),
    Index("audit_correlation_seq", "correlation_id", "seq"),
    Index("audit_type_seq", "type", "seq"),
)

NAME = "audit"
TABLES = (audit,)
FOLDS: tuple[type[Event], ...] = EVENT_TYPES

OK = "ok"
FAILED = "failed"
# Payload fields, in this order, whose text says why something went wrong.
OUTCOME_FIELDS = ("error", "reason")
MAX_RESULT = 500
MAX_PAGE = 1000
REDACTED = "<redacted>"


class _Shape(msgspec.Struct, frozen=True):
    """What the fold needs to know about one event type, worked out once."""

    payload: tuple[str, ...]
    secret: frozenset[str]
    outcome: tuple[str, ...]
    failed: bool
    name: str
    # The result when no outcome field can say otherwise (None: look).
    fixed: str | None


def _shape(cls: type[Event]) -> _Shape:
    payload = cls.payload_fields()
    outcome = tuple(f for f in OUTCOME_FIELDS if f in payload)
    failed = cls.type_name().endswith(".failed")
    return _Shape(
        payload=payload,
        secret=frozenset(payload) & SECRET_FIELDS,
        outcome=outcome,
        failed=failed,
        name=cls.type_name(),
        fixed=None if outcome else FAILED if failed else OK,
    )


SHAPES: dict[type[Event], _Shape] = {cls: _shape(cls) for cls in EVENT_TYPES}


def result_of(event: Event, shape: _Shape | None = None) -> str:
    """ "ok", or what the event says went wrong: its error or reason text,
    else "failed" for a ``*.failed`` type."""
    shape = shape or SHAPES.get(type(event)) or _shape(type(event))
    for f in shape.outcome:
        text = getattr(event, f)
        if text:
            return str(text)[:MAX_RESULT]
    return FAILED if shape.failed else OK


def row(seq: int, event: Event) -> list[Any]:
    """The event's audit row: its values in the table's column order.

    The view's one source: ``apply`` makes it an upsert, and a bulk load
    (a rebuild) inserts it as it is, without a dict per event.
    """
    shape = SHAPES.get(type(event)) or _shape(type(event))
    at = event.at
    if at.tzinfo is not UTC:
        # Stored as UTC wall time (SQLite keeps no offset).
        at = at.astimezone(UTC) if at.tzinfo else at.replace(tzinfo=UTC)
    agg = event.aggregate
    return [
        seq,
        at,
        event.tenant,
        event.actor,
        shape.name,
        agg.kind,
        agg.id,
        event.id,
        event.correlation_id,
        event.causation_id,
        shape.fixed or result_of(event, shape),
    ]


COLUMNS = tuple(c.name for c in audit.columns)


def apply(seq: int, event: Event) -> Iterable[Op]:
    return (Upsert(audit, dict(zip(COLUMNS, row(seq, event), strict=True))),)


# -- reading --------------------------------------------------------------------

# Event types are dotted lower-case words; a filter may add * and ? wildcards.
TYPE_PATTERN_RE = re.compile(r"^[A-Za-z0-9_.*?-]{1,128}(?!\n)$")

Seq = Annotated[int, msgspec.Meta(ge=0)]


class AuditFilter(msgspec.Struct, frozen=True, kw_only=True):
    """What ``list_audit`` selects. ``tenant`` None: every tenant."""

    tenant: str | None = None
    actor: str | None = None
    resource: str | None = None
    type: str | None = None
    command: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    # Forward paging: rows after this sequence, oldest first. Without it,
    # the newest ``limit`` rows (newest last).
    after: int | None = None
    # The last sequence the answer may include (a point in the past).
    upto: int | None = None
    limit: int = 500


async def list_audit(conn: AsyncConnection, f: AuditFilter) -> list[dict[str, Any]]:
    """The audit rows ``f`` selects, in log order."""
    a = audit.c
    q = select(audit)
    for col, value in (
        (a.tenant, f.tenant),
        (a.actor, f.actor),
        (a.resource, f.resource),
        (a.correlation_id, f.command),
    ):
        if value is not None:
            q = q.where(col == value)
    if f.type is not None:
        q = q.where(_type_clause(conn.dialect.name, f.type))
    if f.since is not None:
        q = q.where(a.at >= _utc(f.since))
    if f.until is not None:
        q = q.where(a.at <= _utc(f.until))
    if f.upto is not None:
        q = q.where(a.seq <= f.upto)
    limit = max(1, min(f.limit, MAX_PAGE))
    if f.after is not None:
        q = q.where(a.seq > f.after).order_by(a.seq).limit(limit)
        rows = (await conn.execute(q)).all()
    else:
        q = q.order_by(a.seq.desc()).limit(limit)
        rows = (await conn.execute(q)).all()[::-1]
    return [row_view(r) for r in rows]


def _type_clause(dialect: str, pattern: str) -> Any:
    if not TYPE_PATTERN_RE.match(pattern):
        raise Invalid("type: an event type such as server.created, with * or ? wildcards")
    col = audit.c.type
    if "*" not in pattern and "?" not in pattern:
        return col == pattern
    if dialect == "sqlite":
        # GLOB is case-sensitive with * and ?, as fnmatchcase; LIKE is not.
        return col.op("GLOB")(pattern)
    like = pattern.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return col.like(like.replace("*", "%").replace("?", "_"), escape="\\")


def _utc(t: datetime) -> datetime:
    return t.astimezone(UTC) if t.tzinfo else t.replace(tzinfo=UTC)


def row_view(row: Any) -> dict[str, Any]:
    """One audit row as the API shows it: the event's envelope and its result
    (the query service adds ``data`` from the log: the shape ``q.events``
    gives, plus ``result``)."""
    return {
        "seq": row.seq,
        "subject": f"ev.{row.tenant}.{row.kind}.{row.resource}",
        "type": row.type,
        "tenant": row.tenant,
        "aggregate": {"kind": row.kind, "id": row.resource},
        "actor": row.actor,
        "at": iso(row.at),
        "correlation_id": row.correlation_id,
        "causation_id": row.causation_id,
        "id": row.event_id,
        "result": row.result,
        "via": via_of(row.correlation_id),
    }
