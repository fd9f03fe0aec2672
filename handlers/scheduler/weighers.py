"""Weighers: which of the hosts that can take a server should.

A weigher scores the candidate hosts (higher is better) with a pure
function of arrays. Scores are normalised to 0..1 over the candidates and
multiplied by the weigher's multiplier in one place (``weigh``), as in
Nova, so a weigher never worries about scale: a positive multiplier on
``LeastRequested`` spreads servers over hosts, a negative one stacks them.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import ClassVar

import numpy as np

from stratus.handlers.scheduler.filters import Request
from stratus.handlers.scheduler.table import HostTable


def least_requested_score(capacity: np.ndarray, used: np.ndarray, requested: float) -> np.ndarray:
    """Share of the host left free once the server is placed: (cap - used - req) / cap.

    kube-scheduler's LeastAllocated per resource (before its x100 scale). A
    host of no capacity scores 0 (divided only where capacity > 0, which is
    also cheaper than cleaning up NaNs after: this runs on every decision).
    """
    out = np.zeros(len(capacity), np.float64)
    np.divide(capacity - used - requested, capacity, out=out, where=capacity > 0)
    return out


def balanced_score(cpu_fraction: np.ndarray, ram_fraction: np.ndarray) -> np.ndarray:
    """1 - standard deviation of the used fractions: hosts whose CPU and RAM
    fill at the same pace score higher (kube's BalancedResourceAllocation).
    For two resources the standard deviation is |a - b| / 2."""
    return 1.0 - np.abs(cpu_fraction - ram_fraction) / 2.0


class Candidates:
    """The hosts being weighed for one request: their rows, and what more
    than one weigher reads of them, gathered and computed once (each numpy
    call costs about a microsecond whatever its size, and a decision over a
    few hundred hosts is mostly calls)."""

    __slots__ = ("_free", "r", "rows", "t")

    def __init__(self, t: HostTable, r: Request, rows: np.ndarray) -> None:
        self.t, self.r, self.rows = t, r, rows
        self._free: tuple[np.ndarray, np.ndarray] | None = None

    def free(self) -> tuple[np.ndarray, np.ndarray]:
        """``least_requested_score`` of vCPUs and of RAM on each candidate."""
        if self._free is None:
            t, rows, spec = self.t, self.rows, self.r.spec
            self._free = (
                least_requested_score(t.cap_vcpus[rows], t.used_vcpus[rows], spec.vcpus),
                least_requested_score(t.cap_ram[rows], t.used_ram[rows], spec.ram_mb),
            )
        return self._free


class Weigher:
    name: ClassVar[str]

    def key(self, r: Request) -> Hashable:
        """Everything of ``r`` that ``scores`` reads (see ``Filter.key``);
        a weigher that does not say is never shared."""
        return object()

    def scores(self, c: Candidates) -> np.ndarray:
        raise NotImplementedError


class LeastRequested(Weigher):
    """Prefers the emptiest host (spread); a negative multiplier stacks."""

    name = "LeastRequested"

    def key(self, r: Request) -> Hashable:
        # (``Candidates.free``: the request's vCPUs and RAM.)
        return (r.spec.vcpus, r.spec.ram_mb)

    def scores(self, c: Candidates) -> np.ndarray:
        cpu, ram = c.free()
        return (cpu + ram) / 2.0


class BalancedAllocation(Weigher):
    """Prefers hosts whose vCPU and RAM fill at the same pace."""

    name = "BalancedAllocation"

    def key(self, r: Request) -> Hashable:
        # (``Candidates.free``: the request's vCPUs and RAM.)
        return (r.spec.vcpus, r.spec.ram_mb)

    def scores(self, c: Candidates) -> np.ndarray:
        cpu, ram = c.free()
        # balanced_score of the used fractions (1 - free): |a - b| is the
        # same for the free ones, so they are passed as they are.
        return balanced_score(cpu, ram)


WEIGHERS: dict[str, type[Weigher]] = {w.name: w for w in (LeastRequested, BalancedAllocation)}
DEFAULT_WEIGHERS: dict[str, float] = {"LeastRequested": 1.0, "BalancedAllocation": 1.0}


def normalise(scores: np.ndarray) -> np.ndarray:
    """Scale to 0..1 over the candidates; all equal → all 0 (no preference)."""
    lo, hi = float(scores.min()), float(scores.max())
    if hi - lo <= 1e-12:
        return np.zeros_like(scores)
    return (scores - lo) / (hi - lo)


def weigh(
    t: HostTable, r: Request, rows: np.ndarray, weighers: list[tuple[Weigher, float]]
) -> np.ndarray:
    """The total weight of each candidate row: sum of multiplier x normalised score."""
    total = np.zeros(len(rows), np.float64)
    c = Candidates(t, r, rows)
    for w, multiplier in weighers:
        if multiplier:
            total += multiplier * normalise(w.scores(c))
    return total
