"""Where a scheduler replica's time goes, phase by phase.

Each phase is timed twice: wall time (``perf_counter``) and this thread's
CPU time (``thread_time``; the event loop and nats-py share the thread).
On a busy machine wall time stretches with every preemption, so CPU time
is the cost that compares between runs. CPU phases (``decode``, ``decide``,
``fold``, ``ack``) run without yielding, so their CPU is their own; waiting
phases (``fetch``, ``append``, ``conflict``) are wall time the work loop
spent waiting, and their CPU includes what other tasks (the follower's
folds) did meanwhile. ``cpu_total`` is the whole process's CPU since the
replica started serving (all figures count from then, not from its start:
folding every host and watching every heartbeat are not placements' costs).
Garbage collector pauses are counted too (``gc.callbacks``),
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
        self._reset()

    def _reset(self) -> None:
        self.seconds: dict[str, float] = dict.fromkeys(PHASES, 0.0)
        self.cpu: dict[str, float] = dict.fromkeys(PHASES, 0.0)
        self._cpu_start = time.process_time()
        # Appends: batches sent, refused whole (a stale member), sent one by one.
        self.counts: dict[str, int] = {"batches": 0, "refused": 0, "one_by_one": 0}
        self.gc_count = 0
        self.gc_seconds = 0.0
        self.gc_max = 0.0
        self._gc_start = 0.0

    def count(self, what: str) -> None:
        self.counts[what] = self.counts.get(what, 0) + 1

    @staticmethod
    def mark() -> tuple[float, float]:
        """Now, on both clocks (pass it to ``add``)."""
        return time.perf_counter(), time.thread_time()

    def add(self, phase: str, since: tuple[float, float]) -> None:
        wall, cpu = since
        self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - wall
        self.cpu[phase] = self.cpu.get(phase, 0.0) + time.thread_time() - cpu

    def serving(self) -> None:
        """The replica starts serving: every figure counts from here (what
        starting cost is not a cost of the placements)."""
        self._reset()

    @contextmanager
    def timed(self, phase: str):
        t0 = self.mark()
        try:
            yield
        finally:
            self.add(phase, t0)

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
        """Totals in ms, and µs per placement for each phase (wall and CPU)."""
        per = max(placed, 1)
        cpu_total = time.process_time() - self._cpu_start
        return {
            "ms": {k: round(v * 1000, 1) for k, v in self.seconds.items()},
            "us_per_placement": {k: round(v * 1e6 / per, 1) for k, v in self.seconds.items()},
            "cpu_us_per_placement": {k: round(v * 1e6 / per, 1) for k, v in self.cpu.items()},
            "cpu_total_ms": round(cpu_total * 1000, 1),
            "cpu_total_us_per_placement": round(cpu_total * 1e6 / per, 1),
            "appends": dict(self.counts),
            "gc": {
                "collections": self.gc_count,
                "ms": round(self.gc_seconds * 1000, 1),
                "max_ms": round(self.gc_max * 1000, 2),
            },
        }
