"""Where a scheduler replica's time goes, phase by phase.

Each phase is timed on the event loop's clock (``perf_counter``): CPU phases
(``decode``, ``decide``, ``fold``) run one at a time on the loop, so their
sums are CPU spent on them; waiting phases (``fetch``, ``append``,
``conflict``) are wall time the work loop spent waiting, during which the
follower may fold. Garbage collector pauses are counted too (``gc.callbacks``),
since a full collection over a big host table stalls every decision behind it.
The service logs the totals when it stops; the benchmark reads that line.
"""

from __future__ import annotations

import gc
import time
from contextlib import contextmanager
from typing import Any

PHASES = ("fetch", "decode", "decide", "append", "ack", "conflict", "fold")


class Phases:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = dict.fromkeys(PHASES, 0.0)
        # Appends: batches sent, refused whole (a stale member), sent one by one.
        self.counts: dict[str, int] = {"batches": 0, "refused": 0, "one_by_one": 0}
        self.gc_count = 0
        self.gc_seconds = 0.0
        self.gc_max = 0.0
        self._gc_start = 0.0

    def count(self, what: str) -> None:
        self.counts[what] = self.counts.get(what, 0) + 1

    def add(self, phase: str, seconds: float) -> None:
        self.seconds[phase] = self.seconds.get(phase, 0.0) + seconds

    @contextmanager
    def timed(self, phase: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(phase, time.perf_counter() - t0)

    # -- the collector -------------------------------------------------------

    def _on_gc(self, stage: str, info: dict[str, Any]) -> None:
        if stage == "start":
            self._gc_start = time.perf_counter()
            return
        took = time.perf_counter() - self._gc_start
        self.gc_count += 1
        self.gc_seconds += took
        self.gc_max = max(self.gc_max, took)

    def watch_gc(self) -> None:
        if self._on_gc not in gc.callbacks:
            gc.callbacks.append(self._on_gc)

    def unwatch_gc(self) -> None:
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)

    def report(self, placed: int) -> dict[str, Any]:
        """Totals in ms, and µs per placement for each phase."""
        per = max(placed, 1)
        return {
            "ms": {k: round(v * 1000, 1) for k, v in self.seconds.items()},
            "us_per_placement": {k: round(v * 1e6 / per, 1) for k, v in self.seconds.items()},
            "appends": dict(self.counts),
            "gc": {
                "collections": self.gc_count,
                "ms": round(self.gc_seconds * 1000, 1),
                "max_ms": round(self.gc_max * 1000, 2),
            },
        }
