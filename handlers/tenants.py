"""Tenant commands: state, fold and decisions (pure functions)."""

from __future__ import annotations

import msgspec

from stratus.events.errors import AlreadyExists, NotFound
from stratus.events.model import Cause, Event
from stratus.events.tenants import (
    KIND,
    TenantCreate,
    TenantCreated,
    TenantDelete,
    TenantDeleted,
    TenantRename,
    TenantRenamed,
)
from stratus.handlers.registry import on_aggregate


class TenantState(msgspec.Struct, frozen=True):
    id: str = ""
    name: str = ""
    description: str = ""
    created: bool = False
    deleted: bool = False

    @property
    def live(self) -> bool:
        return self.created and not self.deleted


def subject(tenant_id: str) -> str:
    return f"ev.{tenant_id}.{KIND}.{tenant_id}"


def fold(state: TenantState, event: Event) -> TenantState:
    match event:
        case TenantCreated():
            return TenantState(
                id=event.aggregate.id,
                name=event.name,
                description=event.description,
                created=True,
            )
        case TenantRenamed():
            return msgspec.structs.replace(state, name=event.name)
        case TenantDeleted():
            return msgspec.structs.replace(state, deleted=True)
    return state


def view(state: TenantState) -> dict:
    return {
        "id": state.id,
        "name": state.name,
        "description": state.description,
        "status": "deleted" if state.deleted else "active",
    }


def _existing(state: TenantState, tenant: str) -> TenantState:
    if not state.live:
        raise NotFound(f"tenant {tenant} not found")
    return state


def decide_create(state: TenantState, cmd: TenantCreate, cause: Cause) -> list[Event]:
    if state.created:
        if state.deleted:
            raise AlreadyExists(
                f"tenant id {cmd.name} belonged to a deleted tenant; ids are never reused "
                "so the audit trail stays unambiguous: choose another name"
            )
        raise AlreadyExists(f"tenant {cmd.name} already exists")
    return [
        cause.make(
            TenantCreated, cmd.name, KIND, cmd.name, name=cmd.name, description=cmd.description
        )
    ]


def decide_rename(state: TenantState, cmd: TenantRename, cause: Cause) -> list[Event]:
    t = _existing(state, cmd.tenant)
    if t.name == cmd.name:
        return []
    return [cause.make(TenantRenamed, t.id, KIND, t.id, name=cmd.name, previous=t.name)]


def decide_delete(state: TenantState, cmd: TenantDelete, cause: Cause) -> list[Event]:
    t = _existing(state, cmd.tenant)
    return [cause.make(TenantDeleted, t.id, KIND, t.id)]


# A verb deciding on one tenant's aggregate; its permission is the verb.
_on_tenant = on_aggregate(subject, TenantState, fold, view)


HANDLERS = [
    _on_tenant("tenant.create", TenantCreate, "name", decide_create),
    _on_tenant("tenant.rename", TenantRename, "tenant", decide_rename),
    _on_tenant("tenant.delete", TenantDelete, "tenant", decide_delete),
]
