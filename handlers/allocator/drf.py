"""Dominant Resource Fairness (Ghodsi et al., NSDI 2011), as pure functions.

A framework's dominant share is the largest of its shares of the cluster's
resources (vCPUs, RAM, disk): what it holds of each over the cluster's
total, the largest one divided by its weight (weighted DRF). The allocator
offers each free host to the framework with the lowest dominant share, as
Mesos' hierarchical allocator does: resources offered and not yet answered
count as held, so one pass over many hosts does not give them all to the
framework that was lowest when it began.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import msgspec

RESOURCES = ("vcpus", "ram_mb", "disk_gb")


class Res(msgspec.Struct, frozen=True):
    vcpus: float = 0.0
    ram_mb: float = 0.0
    disk_gb: float = 0.0

    def __add__(self, o: Res) -> Res:
        return Res(self.vcpus + o.vcpus, self.ram_mb + o.ram_mb, self.disk_gb + o.disk_gb)

    def __sub__(self, o: Res) -> Res:
        return Res(self.vcpus - o.vcpus, self.ram_mb - o.ram_mb, self.disk_gb - o.disk_gb)


def dominant_share(held: Res, total: Res, weight: float = 1.0) -> float:
    """max over resources r of held_r / total_r, divided by ``weight``;
    a resource the cluster has none of does not count.

    The paper's example: 9 vCPUs and 18 GB in all, A holding 3 tasks of
    <1 vCPU, 4 GB> = <3, 12>: max(3/9, 12/18) = 2/3.
    """
    shares = [getattr(held, r) / getattr(total, r) for r in RESOURCES if getattr(total, r) > 0]
    return (max(shares) if shares else 0.0) / weight


class Framework(msgspec.Struct, frozen=True):
    id: str
    weight: float = 1.0


class Offer(msgspec.Struct, frozen=True):
    host: str
    framework: str
    resources: Res


def plan_offers(
    free: Mapping[str, Res],
    frameworks: Iterable[Framework],
    held: Mapping[str, Res],
    total: Res,
    refused: Mapping[str, set[str]] | None = None,
) -> list[Offer]:
    """One offer per free host (``free``: host -> what is unclaimed and not
    offered), each to the framework whose dominant share — of what it holds
    plus what this pass has offered it — is lowest (ties: the lower id).
    ``refused``: framework -> hosts it declined and must not see yet."""
    fws = sorted(frameworks, key=lambda f: f.id)
    if not fws:
        return []
    refused = refused or {}
    mine = {f.id: held.get(f.id, Res()) for f in fws}
    out: list[Offer] = []
    for host in sorted(free):
        res = free[host]
        candidates = [f for f in fws if host not in refused.get(f.id, ())]
        if not candidates:
            continue
        best = min(candidates, key=lambda f: (dominant_share(mine[f.id], total, f.weight), f.id))
        out.append(Offer(host, best.id, res))
        mine[best.id] = mine[best.id] + res
    return out
