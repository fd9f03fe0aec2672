"""What-if replay: the placements of a stretch of history, decided again with
another configuration.

Two host tables are folded from the log side by side. Up to ``start`` they
are the same. From ``start`` to ``end`` the recorded one keeps folding the
claims that were made, while the alternative one folds every host change
(registration, capacity, enable/disable) but claims what the other
configuration decides for each ``server.requested`` (and each retry after
``server.build-failed``) and releases what ``server.deleted`` gives back.
At the end both are compared: how many decisions differ, and how the load
is spread (per-host utilisation, its standard deviation, hosts left empty).

Liveness is not on the log (heartbeats never are), so every registered host
counts as alive in a replay. With the same seed a replay decides the same.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np

from stratus.events.errors import Invalid
from stratus.events.model import Cause, UnknownEvent
from stratus.events.resources import (
    SYSTEM,
    ServerDeleted,
    ServerFailed,
    ServerRequested,
    ServerScheduled,
)
from stratus.events.scheduling import HostClaimed, HostReleased, ServerBuildFailed
from stratus.events.store import EventStore
from stratus.handlers.scheduler.decide import Decider, NoValidHost, Placed, SchedulerConfig
from stratus.handlers.scheduler.filters import Request
from stratus.handlers.scheduler.service import claim_event, request_of
from stratus.handlers.scheduler.table import SUBJECTS, HostTable

NO_HOST = "(no valid host)"


def spread(t: HostTable) -> dict[str, Any]:
    """Per-host utilisation (the larger of vCPU and RAM share) over live hosts."""
    live = np.flatnonzero(t.col("exists"))
    if len(live) == 0:
        return {"hosts": 0, "mean": 0.0, "stddev": 0.0, "empty": 0, "per_host": {}}
    with np.errstate(divide="ignore", invalid="ignore"):
        cpu = np.nan_to_num(t.used_vcpus[live] / t.cap_vcpus[live])
        ram = np.nan_to_num(t.used_ram[live] / t.cap_ram[live])
    util = np.maximum(cpu, ram)
    holding = {c.host for c in t.claims.values()}
    return {
        "hosts": len(live),
        "mean": round(float(util.mean()), 4),
        "stddev": round(float(util.std()), 4),
        "empty": int(sum(1 for i in live if int(i) not in holding)),
        "per_host": {t.names[int(i)]: round(float(u), 4) for i, u in zip(live, util, strict=True)},
    }


async def replay(
    store: EventStore, config: SchedulerConfig, start: int, end: int | None = None
) -> dict[str, Any]:
    if start < 1:
        raise Invalid("--from must be a sequence number of at least 1")
    last = await store.last_seq()
    if start > last:
        raise Invalid(f"--from {start} is past the end of the log ({last})")
    end = last if end is None else end
    if end < start:
        raise Invalid(f"--to {end} is before --from {start}")
    if config.seed is None:
        config = SchedulerConfig(**{**_fields(config), "seed": 0})
    decider = Decider(config)
    recorded = HostTable()
    alt: HostTable | None = None
    decisions: dict[str, dict[str, str]] = {}
    asked: dict[str, ServerRequested] = {}
    alt_seq = 0
    async for batch in store.read(0, end, subjects=[*SUBJECTS, "ev.*.server.*"]):
        for rec in batch:
            try:
                e = rec.decode()
            except UnknownEvent:
                continue
            if rec.seq < start:
                recorded.apply(rec.seq, e)
                continue
            if alt is None:
                alt = copy.deepcopy(recorded)
                alt_seq = alt.last_applied
            if e.aggregate.kind in ("host", "server-group"):
                recorded.apply(rec.seq, e)
                if not isinstance(e, (HostClaimed, HostReleased)):
                    alt_seq = max(alt_seq + 1, rec.seq)
                    alt.apply(alt_seq, e)
                continue
            sid = e.aggregate.id
            if isinstance(e, (ServerRequested, ServerBuildFailed)):
                if isinstance(e, ServerRequested):
                    r = request_of(e)
                    decisions[sid] = {
                        "server": sid,
                        "tenant": e.tenant,
                        "recorded": "",
                        "alternative": "",
                    }
                    asked[sid] = e
                else:
                    first = asked.get(sid)
                    if first is None or sid not in decisions:
                        continue  # asked before the replayed stretch
                    tried = decisions[sid].setdefault("failed", "")
                    decisions[sid]["failed"] = f"{tried},{e.host}".strip(",")
                    r = request_of(first, tuple(decisions[sid]["failed"].split(",")))
                    alt_seq += 1
                    _release(alt, sid, alt_seq)
                alt.alive_until[: len(alt)] = math.inf
                out = decider.decide(alt, r, use_holds=False)
                if isinstance(out, Placed):
                    alt_seq += 1
                    _claim(alt, out.host, r, alt_seq)
                    decisions[sid]["alternative"] = out.host
                elif isinstance(out, NoValidHost):
                    decisions[sid]["alternative"] = NO_HOST
            elif isinstance(e, ServerScheduled) and sid in decisions:
                decisions[sid]["recorded"] = e.host
            elif isinstance(e, ServerFailed) and sid in decisions and not e.host:
                decisions[sid]["recorded"] = NO_HOST
            elif isinstance(e, ServerDeleted) and alt is not None:
                alt_seq += 1
                _release(alt, sid, alt_seq)
    if alt is None:
        alt = copy.deepcopy(recorded)
    rows = list(decisions.values())
    changed = [d for d in rows if d["recorded"] and d["recorded"] != d["alternative"]]
    return {
        "from": start,
        "to": end,
        "seed": config.seed,
        "config": _fields(config),
        "decisions": len(rows),
        "changed": len(changed),
        "unchanged": sum(1 for d in rows if d["recorded"] and d["recorded"] == d["alternative"]),
        "unknown": sum(1 for d in rows if not d["recorded"]),
        "recorded": spread(recorded),
        "alternative": spread(alt),
        "changes": changed[:50],
    }


def _fields(config: SchedulerConfig) -> dict[str, Any]:
    return {f: getattr(config, f) for f in config.__struct_fields__}


_CAUSE = Cause("replay", "replay", "replay")


def _claim(t: HostTable, host: str, r: Request, seq: int) -> None:
    t.apply(seq, claim_event(_CAUSE, host, r))


def _release(t: HostTable, server: str, seq: int) -> None:
    host = t.host_of(server)
    if host is None:
        return
    e = _CAUSE.make(HostReleased, SYSTEM, "host", host, server=server, server_tenant="")
    t.apply(seq, e)
