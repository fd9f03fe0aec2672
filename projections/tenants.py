"""The tenants view: one row per tenant ever created (deleted ones kept)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import BigInteger, Column, DateTime, String, Table, select
from sqlalchemy.ext.asyncio import AsyncConnection

from stratus.events.model import Event
from stratus.events.tenants import TenantCreated, TenantDeleted, TenantRenamed
from stratus.projections.batch import Op, Patch, Upsert
from stratus.projections.schema import metadata

tenants = Table(
    "tenants",
    metadata,
    Column("id", String(63), primary_key=True),
    Column("name", String(63), nullable=False),
    Column("description", String(255), nullable=False),
    Column("status", String(16), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Column("created_seq", BigInteger, nullable=False),
    Column("updated_seq", BigInteger, nullable=False),
)

NAME = "tenants"
TABLES = (tenants,)
FOLDS = (TenantCreated, TenantRenamed, TenantDeleted)


def apply(seq: int, event: Event) -> Iterable[Op]:
    match event:
        case TenantCreated():
            yield Upsert(
                tenants,
                {
                    "id": event.aggregate.id,
                    "name": event.name,
                    "description": event.description,
                    "status": "active",
                    "created_at": event.at,
                    "updated_at": event.at,
                    "created_seq": seq,
                    "updated_seq": seq,
                },
            )
        case TenantRenamed():
            yield Patch(
                tenants,
                (event.aggregate.id,),
                {"name": event.name, "updated_at": event.at, "updated_seq": seq},
            )
        case TenantDeleted():
            yield Patch(
                tenants,
                (event.aggregate.id,),
                {"status": "deleted", "updated_at": event.at, "updated_seq": seq},
            )


def row_view(row: Any) -> dict[str, Any]:
    return {
        "id": row.id,
        "name": row.name,
        "description": row.description,
        "status": row.status,
        "created_at": iso(row.created_at),
        "updated_at": iso(row.updated_at),
    }


def iso(value: Any) -> str:
    """A stored time as ISO-8601 UTC with a Z (SQLite keeps no offset)."""
    return value.isoformat().replace("+00:00", "Z") if value.tzinfo else value.isoformat() + "Z"


async def list_tenants(conn: AsyncConnection, include_deleted: bool = False) -> list[dict]:
    q = select(tenants).order_by(tenants.c.id)
    if not include_deleted:
        q = q.where(tenants.c.status != "deleted")
    return [row_view(r) for r in (await conn.execute(q)).all()]


async def get_tenant(conn: AsyncConnection, ref: str) -> dict | None:
    """By id first, else by a name that exactly one live tenant has."""
    row = (await conn.execute(select(tenants).where(tenants.c.id == ref))).first()
    if row is None:
        rows = (
            await conn.execute(
                select(tenants).where(tenants.c.name == ref, tenants.c.status != "deleted")
            )
        ).all()
        row = rows[0] if len(rows) == 1 else None
    return row_view(row) if row is not None else None
