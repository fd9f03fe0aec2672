"""The views a projector folds, in one list."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

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
    # An append-only view (one row per event, never changed afterwards): the
    # event's row, values in the order of the view's one table. A bulk load
    # inserts these as they come instead of folding ``apply``'s upserts.
    row: Callable[[int, Event], list[Any]] | None = None


def all_views() -> list[View]:
    return [
        View(tenants.NAME, tenants.TABLES, tenants.apply, tenants.FOLDS),
        View(users.NAME, users.TABLES, users.apply, users.FOLDS),
        View(audit.NAME, audit.TABLES, audit.apply, audit.FOLDS, audit.row),
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
