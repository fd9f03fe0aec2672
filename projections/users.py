"""The users view and their role assignments."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import BigInteger, Boolean, Column, DateTime, String, Table, select
from sqlalchemy.ext.asyncio import AsyncConnection

from stratus.events.identity import (
    RoleAssigned,
    RoleRevoked,
    UserCreated,
    UserDisabled,
    UserEnabled,
)
from stratus.events.model import Event
from stratus.projections.batch import Delete, Op, Patch, Upsert
from stratus.projections.schema import metadata
from stratus.projections.tenants import iso

users = Table(
    "users",
    metadata,
    Column("name", String(63), primary_key=True),
    Column("enabled", Boolean, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_seq", BigInteger, nullable=False),
)

role_assignments = Table(
    "role_assignments",
    metadata,
    Column("user", String(63), primary_key=True),
    Column("tenant", String(63), primary_key=True),
    Column("role", String(32), primary_key=True),
    Column("granted_at", DateTime(timezone=True), nullable=False),
    Column("granted_by", String(63), nullable=False),
)

NAME = "users"
TABLES = (users, role_assignments)
FOLDS = (UserCreated, UserDisabled, UserEnabled, RoleAssigned, RoleRevoked)


def apply(seq: int, event: Event) -> Iterable[Op]:
    match event:
        case UserCreated():
            yield Upsert(
                users,
                {"name": event.name, "enabled": True, "created_at": event.at, "updated_seq": seq},
            )
        case UserDisabled():
            yield Patch(users, (event.aggregate.id,), {"enabled": False, "updated_seq": seq})
        case UserEnabled():
            yield Patch(users, (event.aggregate.id,), {"enabled": True, "updated_seq": seq})
        case RoleAssigned():
            yield Upsert(
                role_assignments,
                {
                    "user": event.user,
                    "tenant": event.role_tenant,
                    "role": event.role,
                    "granted_at": event.at,
                    "granted_by": event.actor,
                },
            )
        case RoleRevoked():
            yield Delete(role_assignments, (event.user, event.role_tenant, event.role))


async def list_users(conn: AsyncConnection) -> list[dict[str, Any]]:
    rows = (await conn.execute(select(users).order_by(users.c.name))).all()
    roles = await list_roles(conn)
    by_user: dict[str, list[dict[str, Any]]] = {}
    for r in roles:
        by_user.setdefault(r["user"], []).append({"tenant": r["tenant"], "role": r["role"]})
    return [
        {
            "id": r.name,
            "name": r.name,
            "enabled": bool(r.enabled),
            "created_at": iso(r.created_at),
            "roles": by_user.get(r.name, []),
        }
        for r in rows
    ]


async def list_roles(
    conn: AsyncConnection, user: str | None = None, tenant: str | None = None
) -> list[dict[str, Any]]:
    q = select(role_assignments).order_by(
        role_assignments.c.tenant, role_assignments.c.user, role_assignments.c.role
    )
    if user is not None:
        q = q.where(role_assignments.c.user == user)
    if tenant is not None:
        q = q.where(role_assignments.c.tenant == tenant)
    return [
        {
            "user": r.user,
            "tenant": r.tenant,
            "role": r.role,
            "granted_at": iso(r.granted_at),
            "granted_by": r.granted_by,
        }
        for r in (await conn.execute(q)).all()
    ]
