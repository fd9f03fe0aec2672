"""A resource's history as the console draws it: one entry per event of the
causal chain (``stratus why``), with what caused it and the reasons it
carries, ready for the vertical timeline of the server page."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from stratus.cli.history import because, causal_depths

# Event types whose entry is drawn as a failure or a success.
FAILURES = ("server.failed", "server.build-failed", "server.build-timeout")
SUCCESSES = ("server.running",)


@dataclass
class Entry:
    seq: int
    at: str
    type: str
    actor: str
    kind: str
    resource: str
    depth: int
    # The event that caused this one ("" when the caller's command did).
    caused_by: str
    command: str
    result: str
    reason: str
    css: str
    own: bool  # about the resource the page shows (not a port, a host claim ...)
    attempt: int | None = None
    # The scheduler's decision: hosts considered and left, what each filter
    # removed, the best weights.
    hosts: int | None = None
    passed: int | None = None
    removed: list[tuple[str, int]] = field(default_factory=list)
    top: list[tuple[str, float]] = field(default_factory=list)


def _cause(row: dict[str, Any], parent: dict[str, Any] | None) -> str:
    if parent is not None:
        return f"{parent['type']} (#{parent['seq']})"
    cause = row.get("causation_id", "")
    if not cause or cause == row.get("correlation_id"):
        return ""  # the command itself
    return f"event …{cause[-12:]}, outside what you may read"


def entries(rows: list[dict[str, Any]], resource_id: str) -> list[Entry]:
    by_id = {r["id"]: r for r in rows}
    depth = causal_depths(rows)
    out: list[Entry] = []
    for r in rows:
        data = r.get("data") or {}
        agg = r.get("aggregate") or {}
        parent = by_id.get(r.get("causation_id", ""))
        sched = data.get("scheduling") or {}
        t = r.get("type") or "?"
        failed = t in FAILURES or r.get("result", "ok") != "ok"
        e = Entry(
            seq=r["seq"],
            at=r.get("at", ""),
            type=t,
            actor=r.get("actor", ""),
            kind=agg.get("kind", "?"),
            resource=agg.get("id", "?"),
            depth=depth.get(r["id"], 0),
            caused_by=_cause(r, parent),
            command=r.get("correlation_id", ""),
            result=r.get("result", ""),
            reason=because(r),
            css="failed" if failed else ("ok" if t in SUCCESSES else t.split(".")[-1]),
            own=agg.get("id") == resource_id,
            attempt=data.get("attempt") or sched.get("attempt"),
        )
        if sched:
            e.hosts, e.passed = sched.get("hosts"), sched.get("passed")
            e.removed = sorted((sched.get("removed") or {}).items(), key=lambda kv: -kv[1])
            e.top = [(x.get("host", "?"), x.get("weight", 0.0)) for x in sched.get("top") or []]
        out.append(e)
    return out
