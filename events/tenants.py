"""Tenant (project) events and commands.

A tenant's id is the name it was created with: immutable, a valid subject
token, and never reused after deletion, so ``ev.<tenant>.>`` names one
tenant's history forever. ``name`` is a label the tenant may change: free
text (``DISPLAY_NAME_RE``), "Acme Corp" as well as "acme".
"""

from __future__ import annotations

from typing import Annotated

import msgspec

from stratus.events.commands import Command
from stratus.events.ids import DISPLAY_NAME_RE, NAME_RE
from stratus.events.model import Event

Name = Annotated[str, msgspec.Meta(pattern=NAME_RE.pattern, max_length=63)]
Description = Annotated[str, msgspec.Meta(max_length=255)]
DisplayName = Annotated[str, msgspec.Meta(pattern=DISPLAY_NAME_RE.pattern, max_length=128)]

KIND = "tenant"


class TenantCreated(Event, frozen=True, tag="tenant.created"):
    name: str
    description: str = ""


class TenantRenamed(Event, frozen=True, tag="tenant.renamed"):
    name: str
    previous: str


class TenantDeleted(Event, frozen=True, tag="tenant.deleted"):
    pass


class TenantCreate(Command, frozen=True):
    name: Name
    description: Description = ""


class TenantRename(Command, frozen=True):
    tenant: Name
    name: DisplayName


class TenantDelete(Command, frozen=True):
    tenant: Name


EVENTS = (TenantCreated, TenantRenamed, TenantDeleted)
COMMANDS = {
    "tenant.create": TenantCreate,
    "tenant.rename": TenantRename,
    "tenant.delete": TenantDelete,
}
