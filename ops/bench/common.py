"""Helpers shared by the benchmarks: bounded load loops, percentiles, output."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table


@dataclass
class Result:
    """One measured figure: ``count`` operations in ``seconds``."""

    name: str
    count: int
    seconds: float
    errors: int = 0
    p50_ms: float | None = None
    p99_ms: float | None = None
    # The baseline this figure is compared with, and the ratio it must reach.
    baseline: str | None = None
    ratio: float | None = None
    target: float | None = None
    note: str = ""

    @property
    def rate(self) -> float:
        return self.count / self.seconds if self.seconds > 0 else 0.0

    @property
    def met(self) -> bool | None:
        if self.target is None or self.ratio is None:
            return None
        return self.ratio >= self.target

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["rate"] = round(self.rate, 1)
        d["seconds"] = round(self.seconds, 3)
        d["met"] = self.met
        for k in ("p50_ms", "p99_ms", "ratio"):
            if d[k] is not None:
                d[k] = round(d[k], 3)
        return d


@dataclass
class Report:
    """One benchmark's figures, the options it ran with, and what went wrong."""

    benchmark: str
    options: Any
    results: list[Result] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "benchmark": self.benchmark,
            "options": asdict(self.options),
            "info": self.info,
            "results": [r.to_json() for r in self.results],
            "failures": self.failures,
        }


def positive(text: str) -> int:
    """argparse type: a whole number of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


@dataclass
class Load:
    """What a bounded load loop achieved."""

    done: int = 0
    errors: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    first_error: str | None = None


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (``q`` in 0..100) of unsorted ``values``."""
    if not values:
        return None
    s = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(s)))
    return s[min(rank, len(s)) - 1]


async def drive(
    op: Callable[[int, int], Awaitable[object]],
    total: int,
    workers: int,
    max_seconds: float,
    *,
    latencies: bool = False,
) -> Load:
    """Run ``op(worker, i)`` for i in 0..total-1 with ``workers`` in flight.

    Each worker awaits its operation before taking the next index, so at
    most ``workers`` are in flight: the same load as ``asyncio.gather`` over
    a semaphore of that size, without ``total`` pending tasks competing for
    the event loop. No new operation starts after ``max_seconds``, so a slow
    system ends the phase with a smaller count rather than hanging the run.
    """
    load = Load()
    next_i = 0
    start = time.perf_counter()
    deadline = start + max_seconds

    async def worker(w: int) -> None:
        nonlocal next_i
        while next_i < total:
            now = time.perf_counter()
            if now >= deadline:
                return
            i = next_i
            next_i += 1
            try:
                await op(w, i)
            except Exception as exc:
                load.errors += 1
                if load.first_error is None:
                    load.first_error = f"{type(exc).__name__}: {exc}"
                continue
            load.done += 1
            if latencies:
                load.latencies.append(time.perf_counter() - now)

    await asyncio.gather(*(worker(w) for w in range(min(workers, total))))
    load.seconds = time.perf_counter() - start
    return load


def result(name: str, load: Load, **kw: Any) -> Result:
    r = Result(name, load.done, load.seconds, load.errors, **kw)
    if load.latencies:
        r.p50_ms = _ms(percentile(load.latencies, 50))
        r.p99_ms = _ms(percentile(load.latencies, 99))
    if load.first_error and not r.note:
        r.note = f"first error: {load.first_error}"[:120]
    return r


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


def compare(r: Result, base: Result, target: float | None = None, label: str = "") -> Result:
    """Rate ratio of ``r`` to ``base``; ``label`` names the baseline in the table."""
    r.baseline = label or base.name
    r.ratio = r.rate / base.rate if base.rate > 0 else None
    r.target = target
    return r


def _fmt(v: float | None, digits: int = 2) -> str:
    return "" if v is None else f"{v:,.{digits}f}"


def print_table(title: str, results: Sequence[Result], caption: str = "") -> None:
    table = Table(title=title, caption=caption or None, caption_justify="left")
    table.add_column("measurement")
    table.add_column("count", justify="right")
    table.add_column("rate/s", justify="right")
    table.add_column("p50 ms", justify="right")
    table.add_column("p99 ms", justify="right")
    table.add_column("vs baseline", justify="right")
    table.add_column("target", justify="right")
    table.add_column("note")
    for r in results:
        ratio = "" if r.ratio is None else f"{r.ratio:.2f}x {r.baseline}"
        if r.met is None:
            target = ""
        else:
            mark = "[green]met[/]" if r.met else "[red]MISSED[/]"
            target = f">= {r.target:.2f}x {mark}"
        count = f"{r.count:,}" + (f" ({r.errors:,} err)" if r.errors else "")
        table.add_row(
            r.name,
            count,
            _fmt(r.rate, 0),
            _fmt(r.p50_ms),
            _fmt(r.p99_ms),
            ratio,
            target,
            r.note,
        )
    Console(width=200).print(table)


Procs = list[subprocess.Popen[bytes]]


def with_broker(
    report: Report,
    body: Callable[[str, Path, Procs], Awaitable[None]],
    **info: Any,
) -> Report:
    """Run ``body(url, tmp, procs)`` against a nats-server of its own in a
    temporary directory, the machine's facts in ``report.info``; afterwards
    every process in ``procs``, the broker and the directory are gone."""
    from stratus.events.broker import EmbeddedNats

    tmp = Path(tempfile.mkdtemp(prefix=f"stratus-bench-{report.benchmark}-"))
    procs: Procs = []
    srv = EmbeddedNats(tmp / "nats", host="127.0.0.1", log_file=str(tmp / "nats.log"))
    try:
        url = srv.start()
        report.info.update(
            {
                "nats_url": url,
                "sync_interval": "always" if srv.sync_always else "default",
                **machine_facts(),
                **info,
            }
        )
        asyncio.run(body(url, tmp, procs))
    finally:
        for p in procs:
            stop_process(p)
        srv.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return report


def finish(report: Report, as_json: bool, title: str, caption: str) -> int:
    """Print a report (a table, or one JSON object) and what failed; the
    exit status: 1 when anything failed."""
    if as_json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        print_table(title, report.results, caption)
    for f in report.failures:
        print(f"FAILED: {f}", file=sys.stderr)
    return 1 if report.failures else 0


def machine_facts() -> dict[str, Any]:
    """What a report says about the machine it ran on, and when."""
    return {
        "cpus": os.cpu_count(),
        "loadavg": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "python": platform.python_version(),
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def stop_process(p: subprocess.Popen[bytes]) -> None:
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)


def bench_logs() -> None:
    """Services' log lines to stderr (at STRATUS_BENCH_LOG, WARNING unless
    set): an unconfigured structlog prints to stdout, into ``--json``."""
    from stratus.cli import logs

    logs.configure(os.environ.get("STRATUS_BENCH_LOG", "WARNING"))
