"""A resource's causal history, composed from audit queries: what ``stratus
why`` prints and the console's timeline draws.

Every command that touched the resource, then every event each of those
commands caused (the scheduler's decision, the claim on a host, the agents'
reports), in log order, each with how far it is from its command and the
reason it carries.
"""

from __future__ import annotations

from typing import Any

from stratus.cli.client import Client
from stratus.events.errors import NotFound

# The most audit rows one history reads per query (the query's own limit).
PAGE = 1000


async def causal_chain(
    c: Client,
    resource_id: str,
    *,
    tenant: str | None = None,
    at: str | int | None = None,
    chain_tenant: bool = True,
) -> list[dict]:
    """The audit rows of every command that touched ``resource_id`` and of
    everything those commands caused, in log order.

    ``tenant`` scopes the search for the resource; ``chain_tenant=False``
    follows each command into every tenant the caller may read (for the
    cloud admin: the claims on ``_system`` hosts too; for anyone else the
    query service keeps it to their own tenant).
    """
    base: dict[str, Any] = {"resource": resource_id, "limit": PAGE}
    if tenant is not None:
        base["tenant"] = tenant
    touched = await c.query("audit", base, at=at)
    if not touched:
        raise NotFound(f"no events about {resource_id} (or not visible to you)")
    seen: dict[int, dict] = {}
    for cid in dict.fromkeys(r["correlation_id"] for r in touched):
        params = {**base, "command": cid}
        del params["resource"]
        if tenant is None or not chain_tenant:
            params.pop("tenant", None)
        for r in await c.query("audit", params, at=at):
            seen[r["seq"]] = r
    return [seen[k] for k in sorted(seen)]


def causal_depths(rows: list[dict]) -> dict[str, int]:
    """How far each event is from its command: 0 for what the command
    appended, one more for each event caused by another in the chain (an
    event whose cause the caller may not see, a claim on a cloud host, say,
    counts as one step away)."""
    by_id = {r["id"]: r for r in rows}
    depth: dict[str, int] = {}

    def of(r: dict, hops: int = 0) -> int:
        if r["id"] in depth:
            return depth[r["id"]]
        parent = by_id.get(r["causation_id"])
        if parent is None or hops > 64:
            d = 0 if r["causation_id"] == r["correlation_id"] else 1
        else:
            d = of(parent, hops + 1) + 1
        depth[r["id"]] = d
        return d

    for r in rows:
        of(r)
    return depth


def because(row: dict) -> str:
    """The reason an event carries, in a line: where the scheduler placed a
    server and what it ruled out, or why something failed."""
    data = row.get("data") or {}
    sched = data.get("scheduling") or {}
    removed = ", ".join(f"{n} {why}" for why, n in (sched.get("removed") or {}).items())
    if row["type"] == "server.scheduled":
        head = f"on {data.get('host')}: {sched.get('passed')}/{sched.get('hosts')} hosts passed"
        if "examined" in sched:  # a sample: the counts are of the hosts examined
            head = (
                f"on {data.get('host')}: {sched.get('passed')}/{sched['examined']} hosts "
                f"examined passed (sampled from {sched.get('hosts')})"
            )
        return head + (f" ({removed})" if removed else "")
    if row["type"] in ("server.failed", "server.build-failed", "server.build-timeout"):
        return str(data.get("reason", ""))
    if row["type"] == "host.claimed":
        spec = data.get("spec") or {}
        return f"{spec.get('vcpus')} vCPU, {spec.get('ram_mb')} MB for {data.get('server')}"
    return ""
