"""One placement decision: filter, weigh, pick among the best few.

The outcome is one of a closed set:

- ``Placed``: a host was chosen; the caller claims it (and on a conflict
  refreshes that host and decides again).
- ``NoValidHost``: no host passes the filters; the server goes to ``error``
  with the summary, which counts what each filter removed.
- ``Busy``: hosts would pass, but each has a claim of this scheduler still
  on its way to the log; the caller decides again once they land.

Not every host need be filtered and weighed. As kube-scheduler's
``percentageOfNodesToScore`` and Nova's ``host_subset_size`` do, a decision
walks the table in windows from a random row and stops once it has found
enough hosts that pass every filter (``hosts_to_score_pct`` of the hosts,
adaptive by default: 50 % less 1 % per 125 hosts, never under 5 % nor 100
hosts), then weighs only those. Filters stay exact: a host is chosen only
if every filter passed it. A decision that finds no host has walked the
whole table, so ``NoValidHost`` counts are exact; a placement made from a
sample says so (``examined`` < ``hosts``) and its counts are of the hosts
examined.
"""

from __future__ import annotations

import tomllib
import zlib
from collections.abc import Iterator
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
    # Filter and weigh until this share (percent) of the hosts is found
    # feasible, then pick among those (kube's percentageOfNodesToScore);
    # 0 adapts to the host count, 100 scores every host.
    hosts_to_score_pct: float = 0.0
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
        if not 0 <= self.hosts_to_score_pct <= 100:
            raise Invalid("hosts_to_score_pct must be 0 (adaptive) to 100 (every host)")


# Fewer feasible hosts than this are never enough to stop early (kube's
# minFeasibleNodesToFind), and tables this small are always filtered whole.
MIN_FEASIBLE = 100
# The smallest window filtered at once: below it numpy's per-call overhead
# outweighs the rows it saves.
MIN_WINDOW = 512


def feasible_to_find(hosts: int, pct: float) -> int:
    """How many feasible hosts a decision looks for before it stops filtering.

    ``pct`` 0 is kube-scheduler's adaptive share: 50 % - hosts/125 %, at least
    5 % (10,000 hosts -> 5 % -> 500); never fewer than ``MIN_FEASIBLE``.
    """
    if hosts <= MIN_FEASIBLE or pct >= 100:
        return hosts
    share = pct if pct > 0 else max(5.0, 50.0 - hosts / 125.0)
    return min(hosts, max(MIN_FEASIBLE, int(hosts * share / 100.0)))


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


class Filtered(msgspec.Struct):
    """One window of a walk, filtered: the rows that passed (table rows),
    how many hosts it examined, and what each check removed."""

    rows: np.ndarray
    examined: int
    removed: dict[str, int]


class Walk:
    """A walk from one start for one request key, kept for a round's later
    decisions of that key (``Decider.decide``'s ``memo``)."""

    __slots__ = ("_weighed", "parts", "windows")

    def __init__(self, windows: Iterator[tuple[int, int]]) -> None:
        self.windows = windows
        self.parts: list[Filtered] = []
        self._weighed: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def extend(self, d: Decider, t: HostTable, r: Request) -> bool:
        """Filter the next window; False when every row has been walked."""
        span = next(self.windows, None)
        if span is None:
            return False
        self.parts.append(d.filter_window(t, r, *span))
        return True

    def weighed(
        self, d: Decider, t: HostTable, r: Request, used: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The rows that passed in the first ``used`` windows (held or not),
        their weights, and their positions heaviest first."""
        got = self._weighed.get(used)
        if got is None:
            rows = np.concatenate([p.rows for p in self.parts[:used]])
            weights = weigh(t, r, rows, d.weighers)
            # Heaviest first; equal weights in walk order.
            order = np.argsort(-weights, kind="stable")
            got = self._weighed[used] = (rows, weights, order)
        return got


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

    def _windows(self, n: int, first: int, start: int):
        """Row ranges covering every row once, from ``start`` round to it:
        the first ``first`` rows long, each next one twice the last."""
        size, pos, left = max(first, MIN_WINDOW), start, n
        while left > 0:
            hi = min(n, pos + size, pos + left)
            yield pos, hi
            left -= hi - pos
            pos = 0 if hi == n else hi
            size *= 2

    def first_row(self, t: HostTable, salt: str) -> int:
        """A random row to start walking from, salted (by a server id) so
        replicas sharing a seed do not walk the same rows for the requests
        they each get."""
        n = len(t)
        return int(self.rng.integers(n) + zlib.crc32(salt.encode())) % n if n else 0

    def filter_window(self, t: HostTable, r: Request, lo: int, hi: int) -> Filtered:
        """Every filter over rows ``lo..hi``: the rows that pass, how many
        were examined, and how many each check removed."""
        w = t.window(lo, hi)
        remaining = w.col("exists").copy()
        left = examined = int(np.count_nonzero(remaining))
        removed: dict[str, int] = {}
        for f in self.filters:
            if not f.applies(r):
                continue
            for reason, mask in f.checks(w, r):
                # What a check removes is what it leaves fewer (two
                # numpy calls a check: they dominate a small window).
                np.logical_and(remaining, mask, out=remaining)
                now = int(np.count_nonzero(remaining))
                if now < left:
                    removed[reason] = removed.get(reason, 0) + left - now
                    left = now
        return Filtered(lo + np.flatnonzero(remaining), examined, removed)

    def key(self, r: Request) -> tuple:
        """What the filters and weighers read of ``r``: requests with equal
        keys are filtered and weighed alike over the same table."""
        return (
            tuple((f.name, f.key(r)) for f in self.filters if f.applies(r)),
            tuple((w.name, w.key(r)) for w, m in self.weighers if m),
        )

    def decide(
        self,
        t: HostTable,
        r: Request,
        use_holds: bool = True,
        start: int | None = None,
        memo: dict | None = None,
    ) -> Outcome:
        """``start``: the row a sampled walk begins at (random if None). A
        replica gives every decision of one batch the same start: its claims
        then land in one stretch of rows (its own claims in flight held, so
        they spread over it), and another replica's batch, starting
        elsewhere, rarely claims the same host before either has folded the
        other's; decisions each from their own random row would collide in
        nearly every pair of concurrent batches.

        ``memo``: a dict the caller keeps for decisions over one unchanged
        table (one round of a replica: nothing is folded between its
        decisions, only its own claims are held). A request whose ``key``
        an earlier one of them had reuses that one's filtered windows and
        weights instead of computing them again: the same filters pass the
        same hosts, so every filter stays exact and the counts are the same.
        Two things differ, both bounded by the round: hosts held by the
        round's earlier claims are dropped after weighing rather than
        before, so weights are normalised over the hosts that passed
        including those; and heartbeats are read at the round's first
        decision of that key, not at each (a round lasts milliseconds)."""
        n = len(t)
        total = int(np.count_nonzero(t.col("exists")))
        want = feasible_to_find(total, self.config.hosts_to_score_pct)
        if want >= total:
            start = 0
        elif start is None or not 0 <= start < n:
            start = self.first_row(t, r.server)
        walk: Walk | None = None
        if memo is not None:
            mkey = (start, want, self.key(r))
            walk = memo.get(mkey)
            if walk is None:
                walk = memo[mkey] = Walk(self._windows(n, want + want // 4, start))
        windows = self._windows(n, want + want // 4, start) if walk is None else None
        removed: dict[str, int] = {}
        found: list[np.ndarray] = []
        count = passed = examined = used = 0
        # First window: about what should hold ``want`` feasible hosts.
        while count < want:
            if walk is not None:
                if used == len(walk.parts) and not walk.extend(self, t, r):
                    break
                part = walk.parts[used]
            else:
                span = next(windows, None)  # type: ignore[arg-type]
                if span is None:
                    break
                part = self.filter_window(t, r, *span)
            used += 1
            examined += part.examined
            for reason, k in part.removed.items():
                removed[reason] = removed.get(reason, 0) + k
            rows = part.rows
            passed += len(rows)
            if use_holds and len(rows):
                # A host with a claim of ours in flight is decided on again
                # once the claim is in the table: deciding now would
                # double-count.
                rows = rows[t.last_seq[rows] >= t.hold[rows]]
            found.append(rows)
            count += len(rows)
        summary: dict = {"hosts": total, "passed": passed, "removed": removed}
        if examined < total:
            # A sample: say so, since the counts are not of every host.
            summary["examined"] = examined
            summary["note"] = (
                f"sampled: filtered {examined} of {total} hosts, enough to find {want} "
                "that fit; counts are of those examined"
            )
        if passed == 0:
            parts = ", ".join(f"{n} {why}" for why, n in removed.items())
            reason = f"No valid host: 0/{total} hosts" + (f": {parts}" if parts else "")
            return NoValidHost(reason, {**summary, "attempt": r.attempt})
        rows = np.concatenate(found)
        if len(rows) == 0:
            return Busy()
        k = min(self.config.host_subset_size, len(rows))
        if walk is None:
            weights = weigh(t, r, rows, self.weighers)
            best = np.argpartition(-weights, k - 1)[:k] if k < len(rows) else np.arange(len(rows))
            best = best[np.argsort(-weights[best], kind="stable")]
            tied = np.flatnonzero(weights >= weights[best[0]] - 1e-9)
            ties = len(tied)
        else:
            # The walk's hosts in order of weight, once per round; this
            # decision's are those not held, in the same order.
            every, weights, order = walk.weighed(self, t, r, used)
            if len(every) != len(rows):
                order = order[(t.last_seq[every] >= t.hold[every])[order]]
            rows, best = every, order[:k]
            ties = int(np.count_nonzero(weights[order] >= weights[best[0]] - 1e-9))
            tied = order[:ties]
        if ties > k:
            # More hosts share the best weight than the subset holds (empty
            # hosts of one size, say): any of them is as good, and replicas
            # that each pick at random among them rarely pick the same.
            pick = int(tied[self.rng.integers(ties)])
            best = np.concatenate(([pick], best[best != pick]))[:k]
        else:
            pick = int(best[self.rng.integers(k)]) if k > 1 else int(best[0])
        row = int(rows[pick])
        top = [
            {"host": t.names[int(rows[b])], "weight": round(float(weights[b]), 4)} for b in best[:3]
        ]
        return Placed(t.names[row], row, {**summary, "top": top, "attempt": r.attempt})
