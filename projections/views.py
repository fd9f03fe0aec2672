"""The views a projector folds, in one list."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import msgspec
from sqlalchemy import Table

from stratus.events.model import Event
from stratus.projections import audit, resources, tenants, users
from stratus.projections.batch import Op


class View(msgspec.Struct, frozen=True):
    """A read model: its tables, its fold, and the event types it folds."""

    name: str
    tables: tuple[Table, ...]
    apply: Callable[[int, Event], Iterable[Op]]
    folds: tuple[type[Event], ...]


def all_views() -> list[View]:
    return [
        View(tenants.NAME, tenants.TABLES, tenants.apply, tenants.FOLDS),
        View(users.NAME, users.TABLES, users.apply, users.FOLDS),
        View(audit.NAME, audit.TABLES, audit.apply, audit.FOLDS),
        View(resources.NAME, resources.TABLES, resources.apply, resources.FOLDS),
    ]


def dispatch(
    views: Iterable[View],
) -> dict[type[Event], list[Callable[[int, Event], Iterable[Op]]]]:
    """Event type -> the folds that want it, so an event costs only its views."""
    table: dict[type[Event], list[Callable[[int, Event], Iterable[Op]]]] = {}
    for v in views:
        for t in v.folds:
            table.setdefault(t, []).append(v.apply)
    return table
