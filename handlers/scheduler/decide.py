"""One placement decision: filter, weigh, pick among the best few.

The outcome is one of a closed set:

- ``Placed``: a host was chosen; the caller claims it (and on a conflict
  refreshes that host and decides again).
- ``NoValidHost``: no host passes the filters; the server goes to ``error``
  with the summary, which counts what each filter removed.
- ``Busy``: hosts would pass, but each has a claim of this scheduler still
  on its way to the log; the caller decides again once they land.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import msgspec
import numpy as np

from stratus.events.errors import Invalid
from stratus.handlers.scheduler.filters import DEFAULT_FILTERS, FILTERS, Filter, Request
from stratus.handlers.scheduler.table import HostTable
from stratus.handlers.scheduler.weighers import DEFAULT_WEIGHERS, WEIGHERS, Weigher, weigh


class SchedulerConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What an operator tunes (``--config FILE.toml`` or options)."""

    filters: list[str] = msgspec.field(default_factory=lambda: list(DEFAULT_FILTERS))
    weighers: dict[str, float] = msgspec.field(default_factory=lambda: dict(DEFAULT_WEIGHERS))
    # Pick at random among this many best hosts (Nova's host_subset_size), so
    # replicas deciding at once rarely pick the same host.
    host_subset_size: int = 8
    # Placement attempts per server, the first included (Nova: 3).
    max_attempts: int = 3
    # Seconds a server may stay scheduled or building on a host that stopped
    # beating (seen so by this scheduler for as long) before it is recorded
    # as ``server.build-timeout`` and placed elsewhere; 0 never.
    build_timeout_s: float = 60.0
    seed: int | None = None

    def __post_init__(self) -> None:
        unknown = [f for f in self.filters if f not in FILTERS]
        if unknown:
            raise Invalid(f"unknown filter {unknown[0]} (known: {', '.join(FILTERS)})")
        unknown = [w for w in self.weighers if w not in WEIGHERS]
        if unknown:
            raise Invalid(f"unknown weigher {unknown[0]} (known: {', '.join(WEIGHERS)})")
        if self.host_subset_size < 1 or self.max_attempts < 1:
            raise Invalid("host_subset_size and max_attempts must be at least 1")
        if self.build_timeout_s < 0:
            raise Invalid("build_timeout_s must be 0 (never) or more")


def load_config(path: str | Path | None, **overrides: object) -> SchedulerConfig:
    """A config from a TOML file (keys as in SchedulerConfig), then options on top."""
    raw: dict = {}
    if path is not None:
        try:
            raw = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise Invalid(f"cannot read scheduler config {path}: {exc}") from None
        raw = raw.get("scheduler", raw)
    raw.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return msgspec.convert(raw, SchedulerConfig)
    except msgspec.ValidationError as exc:
        raise Invalid(f"scheduler config: {exc}") from None


class Placed(msgspec.Struct, frozen=True):
    host: str
    row: int
    scheduling: dict


class NoValidHost(msgspec.Struct, frozen=True):
    reason: str
    scheduling: dict


class Busy(msgspec.Struct, frozen=True):
    pass


Outcome = Placed | NoValidHost | Busy


class Decider:
    """Filters and weighers built once from a config; ``decide`` per request."""

    def __init__(self, config: SchedulerConfig | None = None) -> None:
        self.config = config or SchedulerConfig()
        self.filters: list[Filter] = [FILTERS[n]() for n in self.config.filters]
        # The retry exclusion is how retries work, not a choice of the operator.
        if "Retry" not in self.config.filters:
            self.filters.append(FILTERS["Retry"]())
        self.weighers: list[tuple[Weigher, float]] = [
            (WEIGHERS[n](), m) for n, m in self.config.weighers.items()
        ]
        self.rng = np.random.default_rng(self.config.seed)

    def decide(self, t: HostTable, r: Request, use_holds: bool = True) -> Outcome:
        exists = t.col("exists")
        total = int(np.count_nonzero(exists))
        remaining = exists.copy()
        removed: dict[str, int] = {}
        for f in self.filters:
            if not f.applies(r):
                continue
            for reason, mask in f.checks(t, r):
                gone = int(np.count_nonzero(remaining & ~mask))
                if gone:
                    removed[reason] = removed.get(reason, 0) + gone
                    remaining &= mask
        rows = np.flatnonzero(remaining)
        summary = {"hosts": total, "passed": len(rows), "removed": removed}
        if len(rows) == 0:
            parts = ", ".join(f"{n} {why}" for why, n in removed.items())
            reason = f"No valid host: 0/{total} hosts" + (f": {parts}" if parts else "")
            return NoValidHost(reason, {**summary, "attempt": r.attempt})
        if use_holds:
            # A host with a claim of ours in flight is decided on again once
            # the claim is in the table: deciding now would double-count.
            free = t.last_seq[rows] >= t.hold[rows]
            if not free.all():
                rows = rows[free]
                if len(rows) == 0:
                    return Busy()
        weights = weigh(t, r, rows, self.weighers)
        k = min(self.config.host_subset_size, len(rows))
        best = np.argpartition(-weights, k - 1)[:k] if k < len(rows) else np.arange(len(rows))
        best = best[np.argsort(-weights[best], kind="stable")]
        tied = np.flatnonzero(weights >= weights[best[0]] - 1e-9)
        if len(tied) > k:
            # More hosts share the best weight than the subset holds (empty
            # hosts of one size, say): any of them is as good, and replicas
            # that each pick at random among them rarely pick the same.
            pick = int(tied[self.rng.integers(len(tied))])
            best = np.concatenate(([pick], best[best != pick]))[:k]
        else:
            pick = int(best[self.rng.integers(k)]) if k > 1 else int(best[0])
        row = int(rows[pick])
        top = [
            {"host": t.names[int(rows[b])], "weight": round(float(weights[b]), 4)} for b in best[:3]
        ]
        return Placed(t.names[row], row, {**summary, "top": top, "attempt": r.attempt})
