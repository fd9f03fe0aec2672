"""The views a projector folds, in one list."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import msgspec
from sqlalchemy import Table

from stratus.events.model import Event
from stratus.projections import tenants, users
from stratus.projections.batch import Op


class View(msgspec.Struct, frozen=True):
    name: str
    tables: tuple[Table, ...]
    apply: Callable[[int, Event], Iterable[Op]]


def all_views() -> list[View]:
    return [
        View(tenants.NAME, tenants.TABLES, tenants.apply),
        View(users.NAME, users.TABLES, users.apply),
    ]
