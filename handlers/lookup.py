"""What a ``prepare`` hook may read beyond its own boundary: a cloud-wide
object (a flavor, a public image, an external network) by kind and name.

A hook gets this narrow ``Lookup`` rather than the whole command service,
so it cannot append, read another tenant, or reach the broker; what it
reads is advisory (the decision still runs on its own boundary, and a
second boundary it must not see move is an ``also`` condition instead).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

from stratus.events.ids import is_name
from stratus.handlers.records import Record
from stratus.handlers.state import StateCache
from stratus.handlers.world import Aggregate, fold_aggregate, system_subject

R = TypeVar("R", bound=Record)
C = TypeVar("C")
P = TypeVar("P")


class Lookup(Protocol):
    async def system(self, record: type[R], name: str, fresh: bool = False) -> R | None:
        """The live cloud-wide ``record.kind`` named ``name``, or None;
        ``fresh``: as the log has it now, not as last cached."""
        ...


class CachedLookup:
    """Reads through the command service's state cache: an object's subject
    is folded once, then only what landed on it since."""

    def __init__(self, cache: StateCache) -> None:
        self._cache = cache

    async def system(self, record: type[R], name: str, fresh: bool = False) -> R | None:
        if not is_name(name):
            return None  # not a name a subject can hold, so no such object
        subject = system_subject(record.kind, name)
        tracked = self._cache.get(subject, Aggregate, fold_aggregate)
        if tracked.seq == 0 or fresh:
            await self._cache.refresh(subject, tracked, fold_aggregate)
        found = tracked.state.attrs
        return found if isinstance(found, record) else None


Hook = Callable[[C, Lookup], Awaitable[P]]


def with_lookup(hook: Hook[C, P]) -> Callable[[C, Any, Any], Awaitable[P]]:
    """``hook(command, lookup)`` as ``Handler.prepare(command, caller, service)``."""

    async def prepare(cmd: C, _caller: Any, service: Any) -> P:
        return await hook(cmd, CachedLookup(service.cache))

    return prepare
