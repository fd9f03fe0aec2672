"""Shared by the scheduler tests and benchmark: hosts and requests appended
as the agents and the command handlers would, and the log folded back into
what every host holds."""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from typing import Any

from stratus.events.heartbeat import beat
from stratus.events.ids import new_id
from stratus.events.model import Cause
from stratus.events.resources import (
    SYSTEM,
    HostDisabled,
    HostRegistered,
    ServerFailed,
    ServerGroupCreated,
    ServerRequested,
    ServerScheduled,
    ServerSpec,
)
from stratus.events.scheduling import HostClaimed, HostReleased
from stratus.events.store import EventStore

CAUSE = Cause(actor="test", correlation_id="c-test", causation_id="c-test")


def host_event(name: str, vcpus: int = 16, ram_mb: int = 65536, disk_gb: int = 1000, **kw: Any):
    return CAUSE.make(
        HostRegistered,
        SYSTEM,
        "host",
        name,
        name=name,
        vcpus=vcpus,
        ram_mb=ram_mb,
        disk_gb=disk_gb,
        **kw,
    )


async def register_hosts(
    store: EventStore, hosts: list[Any], alive: bool = True, ttl: float = 600
) -> None:
    """Append ``host.registered`` for each, 500 to a batch, and beat for them,
    500 beats in flight at a time: 10,000 at once wait out their publish
    timeout on a busy machine (seen at a load of 17 on 2 cores)."""
    for i in range(0, len(hosts), 500):
        await store.append(hosts[i : i + 500])
    if alive:
        for i in range(0, len(hosts), 500):
            chunk = hosts[i : i + 500]
            await asyncio.gather(*(beat(store.js, h.aggregate.id, ttl=ttl) for h in chunk))


async def disable_host(store: EventStore, name: str) -> None:
    await store.append([CAUSE.make(HostDisabled, SYSTEM, "host", name)])


def server_request(tenant: str = "acme", vcpus: int = 1, ram_mb: int = 1024, **kw: Any):
    """``server.requested`` of a server of that size; ``kw`` sets its spec's other fields."""
    sid = new_id()
    kw.setdefault("name", f"s-{sid[-8:]}")
    spec = ServerSpec(image="img", vcpus=vcpus, ram_mb=ram_mb, **kw)
    return CAUSE.make(ServerRequested, tenant, "server", sid, spec=spec)


def group_event(tenant: str, policy: str):
    gid = new_id()
    return CAUSE.make(
        ServerGroupCreated, tenant, "server-group", gid, name=f"g-{gid[-6:]}", policy=policy
    )


async def outcome(
    store: EventStore, tenant: str, server: str, timeout: float = 10.0, after: int = 0
):
    """The scheduler's answer for one server (scheduled or failed), waiting for it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for rec in await store.read_all(after, subjects=[f"ev.{tenant}.server.{server}"]):
            e = rec.decode()
            if isinstance(e, (ServerScheduled, ServerFailed)):
                return e
        await asyncio.sleep(0.05)
    raise AssertionError(f"server {server} was neither scheduled nor failed in {timeout}s")


async def wait_outcomes(store: EventStore, servers: set[str], timeout: float) -> dict[str, Any]:
    """Scheduled or failed, for every server of ``servers`` (read from the log)."""
    deadline = time.monotonic() + timeout
    seen: dict[str, Any] = {}
    after = 0
    while time.monotonic() < deadline:
        for rec in await store.read_all(after, subjects=["ev.*.server.*"]):
            after = rec.seq
            e = rec.decode()
            if isinstance(e, (ServerScheduled, ServerFailed)) and e.aggregate.id in servers:
                seen[e.aggregate.id] = e
        if len(seen) == len(servers):
            return seen
        await asyncio.sleep(0.1)
    raise AssertionError(f"{len(servers) - len(seen)} of {len(servers)} servers got no answer")


async def fold_claims(store: EventStore) -> tuple[dict[str, dict], dict[str, list[str]]]:
    """From the log alone: each host's capacity (after ratios), what its claims
    add up to at their highest, and which servers each host holds now."""
    caps: dict[str, dict] = {}
    used: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    peak: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    holds: dict[str, dict[str, HostClaimed]] = defaultdict(dict)
    for rec in await store.read_all(subjects=["ev._system.host.>"]):
        e = rec.decode()
        h = e.aggregate.id
        if isinstance(e, HostRegistered):
            caps[h] = {"vcpus": e.vcpus * e.cpu_ratio, "ram_mb": e.ram_mb * e.ram_ratio}
        elif isinstance(e, HostClaimed):
            holds[h][e.server] = e
            used[h][0] += e.spec.vcpus
            used[h][1] += e.spec.ram_mb
            peak[h] = [max(peak[h][0], used[h][0]), max(peak[h][1], used[h][1])]
        elif isinstance(e, HostReleased):
            c = holds[h].pop(e.server, None)
            if c is not None:
                used[h][0] -= c.spec.vcpus
                used[h][1] -= c.spec.ram_mb
    report = {h: {**caps[h], "peak_vcpus": peak[h][0], "peak_ram_mb": peak[h][1]} for h in caps}
    return report, {h: list(s) for h, s in holds.items()}


def overcommitted(report: dict[str, dict]) -> list[str]:
    return [
        h
        for h, r in report.items()
        if r["peak_vcpus"] > r["vcpus"] + 1e-9 or r["peak_ram_mb"] > r["ram_mb"] + 1e-9
    ]
