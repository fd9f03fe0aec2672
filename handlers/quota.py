"""Quota: a tenant's limits, its usage counted from its resources, the
check every allocating decision makes, and ``quota set``.

Usage is never a counter of its own: it is counted from the world's
records, so it cannot drift from them. The check holds under racing
handlers because the decision is appended on the condition that nothing
matched ``ev.<tenant>.>`` since the world was read (see ``handlers.world``).
"""

from __future__ import annotations

from typing import Any

from stratus.events.errors import Invalid, QuotaExceeded
from stratus.events.model import Cause, Event
from stratus.events.resources import QUOTA_DEFAULTS, QUOTAS, QuotaSet, QuotaSetCommand, quota_report
from stratus.handlers.world import World, live_tenant


def limit(w: World, resource: str) -> int:
    """The tenant's limit of ``resource`` (-1: unlimited)."""
    return w.limits.get(resource, w.defaults.get(resource, -1))


def usage(w: World) -> dict[str, int]:
    """How much of each limited resource the tenant holds."""
    return {
        r: len(w.tables[q.kind])
        if q.column is None
        else sum(x.column(q.column) for x in w.tables[q.kind].values())
        for r, q in QUOTAS.items()
    }


def check(w: World, wanted: dict[str, int]) -> None:
    """Refuse if any of ``wanted`` (resource -> how many more) would exceed its limit."""
    if not any(n > 0 for n in wanted.values()):
        return
    used = usage(w)
    for resource, more in wanted.items():
        most = limit(w, resource)
        if more > 0 and most >= 0 and used[resource] + more > most:
            raise QuotaExceeded(
                f"{resource} {used[resource]} of {most} in use "
                f"(asked for {more} more) in tenant {w.tenant}"
            )


def decide_quota_set(w: World, cmd: QuotaSetCommand, cause: Cause) -> list[Event]:
    t = cmd.tenant or ""
    live_tenant(w, t)
    unknown = sorted(set(cmd.limits) - set(QUOTA_DEFAULTS))
    if unknown:
        raise Invalid(
            f"unknown quota {', '.join(unknown)}; known: {', '.join(sorted(QUOTA_DEFAULTS))}"
        )
    limits = {r: limit(w, r) for r in QUOTA_DEFAULTS}
    merged = {**limits, **cmd.limits}
    if merged == limits and w.limits:
        return []
    # Lowering a limit below usage is allowed: it only blocks new allocations.
    return [cause.make(QuotaSet, t, "quota", t, limits=merged)]


def quota_view(w: World) -> dict[str, Any]:
    """What ``quota show`` and ``quota set`` answer."""
    return quota_report(w.tenant, {r: limit(w, r) for r in QUOTA_DEFAULTS}, usage(w))
