"""Compute agent benchmark: ``python -m stratus.ops.bench compute [--json]``.

Ten compute agents (libvirt's test driver, real qcow2 overlays through
qemu-img) on one nats-server. The scheduler's part is played by the
benchmark: a server is "created" when its ``host.claimed`` +
``server.scheduled`` batch is appended, and done when its
``server.running`` arrives on a core subscription to the log's subjects.

Rows:
- awaited append: one event appended and acknowledged, the same-run
  baseline for a round trip through the log;
- create -> running at idle: one server at a time (target p50 <= 50 ms);
- create -> running, N over H hosts: ``--in-flight`` creations
  outstanding at once, throughput and latency under load;
- requested -> scheduled -> running: a ``server.requested`` placed by the
  real scheduler (run in this process), then built, one at a time;
- overlay vs copy: ``qemu-img create -b`` of an overlay against a full copy
  of the same ``--base-gb`` base (target: the overlay >= 100x faster).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from stratus.ops.bench.common import (
    Procs,
    Report,
    Result,
    compare,
    percentile,
    positive,
    print_table,
    with_broker,
)


@dataclass
class Options:
    servers: int = 1000
    hosts: int = 10
    idle: int = 50
    in_flight: int = 100
    base_gb: int = 1
    overlays: int = 20
    phase_seconds: float = 300.0


def _latency_result(name: str, lat: list[float], seconds: float, errors: int) -> Result:
    return Result(
        name,
        len(lat),
        seconds,
        errors=errors,
        p50_ms=(percentile(lat, 50) or 0) * 1000,
        p99_ms=(percentile(lat, 99) or 0) * 1000,
    )


async def _one_at_a_time(
    name: str, fn: Callable[[], Awaitable[float]], count: int, deadline: float
) -> Result:
    """``fn`` (which returns one latency) ``count`` times in a row, or until
    ``deadline``: the idle figures, with nothing else in flight."""
    lat, errors = [], 0
    t0 = time.perf_counter()
    for _ in range(count):
        if time.monotonic() > deadline:
            break
        try:
            lat.append(await fn())
        except Exception:
            errors += 1
    return _latency_result(name, lat, time.perf_counter() - t0, errors)


async def _body(opts: Options, report: Report, url: str, tmp: Path, procs: Procs) -> None:
    del procs  # everything runs in this process
    from stratus.agents.compute.agent import ComputeAgent, HostSpec
    from stratus.agents.compute.domain import LibvirtDriver
    from stratus.events.ids import new_id
    from stratus.events.model import Cause
    from stratus.events.resources import ServerScheduled, ServerSpec
    from stratus.events.store import EventStore
    from stratus.handlers.scheduler import Request
    from stratus.handlers.scheduler.service import claim_event

    store = await EventStore.connect(url)
    await store.ensure_stream()
    hosts = [f"bench-{i:02d}" for i in range(opts.hosts)]
    agents = [
        ComputeAgent(
            store,
            h,
            data_dir=tmp / "hosts" / h,
            spec=HostSpec(vcpus=4096, ram_mb=1 << 22, disk_gb=1 << 20),
            vm=LibvirtDriver("test:///default", h),
            reconcile_interval=3600,
        )
        for h in hosts
    ]
    waiting: dict[str, asyncio.Future[float]] = {}
    failed = 0

    async def on_event(msg) -> None:
        nonlocal failed
        sid = msg.subject.rsplit(".", 1)[-1]
        fut = waiting.get(sid)
        if fut is None or fut.done():
            return
        ev = store.codec.decode(msg.data)
        if ev.type_name() == "server.running":
            fut.set_result(time.perf_counter())
        elif ev.type_name() == "server.build-failed":
            failed += 1
            fut.set_exception(RuntimeError(getattr(ev, "reason", "build failed")))

    sub = await store.nc.subscribe("ev.bench.server.*", cb=on_event)
    try:
        for a in agents:
            await a.start()
        cid = new_id()
        cause = Cause(actor="bench", correlation_id=cid, causation_id=cid)

        # Baseline: an awaited append of one event, same broker, same run.
        lat: list[float] = []
        t0 = time.perf_counter()
        for _ in range(200):
            s = time.perf_counter()
            await store.append([cause.make(ServerScheduled, "bench", "server", new_id(), host="x")])
            lat.append(time.perf_counter() - s)
        base = _latency_result("awaited append (baseline)", lat, time.perf_counter() - t0, 0)
        report.results.append(base)

        counter = 0

        async def create() -> float:
            nonlocal counter
            host = hosts[counter % len(hosts)]
            counter += 1
            sid = new_id()
            c = Cause(actor="bench", correlation_id=sid, causation_id=sid)
            claim = claim_event(
                c,
                host,
                Request(
                    server=sid,
                    tenant="bench",
                    spec=ServerSpec(name=f"s{counter}", image="none", vcpus=1, ram_mb=64),
                ),
            )
            sched = c.make(ServerScheduled, "bench", "server", sid, host=host)
            fut: asyncio.Future[float] = asyncio.get_running_loop().create_future()
            waiting[sid] = fut
            start = time.perf_counter()
            await store.append([claim, sched])
            try:
                done = await asyncio.wait_for(fut, 60)
            finally:
                waiting.pop(sid, None)
            return done - start

        # Warm up: each host's blank base made once, not timed.
        await asyncio.gather(*(create() for _ in hosts))

        deadline = time.monotonic() + opts.phase_seconds
        idle = await _one_at_a_time("create -> running, idle", create, opts.idle, deadline)
        idle.note = "target p50 <= 50 ms"
        report.results.append(idle)
        report.info["idle_p50_target_met"] = idle.p50_ms is not None and idle.p50_ms <= 50

        lat, errors = [], 0
        slots = asyncio.Semaphore(opts.in_flight)

        async def one() -> None:
            nonlocal errors
            async with slots:
                if time.monotonic() > deadline:
                    return
                try:
                    lat.append(await create())
                except Exception:
                    errors += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(opts.servers)))
        load = _latency_result(
            f"create -> running, {opts.servers} over {opts.hosts} hosts",
            lat,
            time.perf_counter() - t0,
            errors,
        )
        load.note = f"{opts.in_flight} in flight"
        report.results.append(load)
        # The whole path: a stored request placed by the real scheduler
        # (in this process), then built by the host's agent.
        from stratus.handlers.scheduler import SchedulerService
        from stratus.ops.bench.schedkit import server_request

        sched = SchedulerService(store)
        await sched.start()
        try:

            async def requested() -> float:
                req = server_request(tenant="bench", vcpus=1, ram_mb=64)
                fut: asyncio.Future[float] = asyncio.get_running_loop().create_future()
                waiting[req.aggregate.id] = fut
                start = time.perf_counter()
                await store.append([req])
                try:
                    done = await asyncio.wait_for(fut, 60)
                finally:
                    waiting.pop(req.aggregate.id, None)
                return done - start

            full = await _one_at_a_time(
                "requested -> scheduled -> running, idle", requested, opts.idle, deadline
            )
            full.note = "through the scheduler"
            report.results.append(full)
        finally:
            await sched.stop()
        running = sum(len(a.drivers["vm"].list_owned()) for a in agents)
        report.info["domains_running"] = running
        report.info["build_failures"] = failed
    finally:
        await sub.unsubscribe()
        for a in agents:
            await a.stop()
            vm = a.drivers["vm"]
            for server in list(vm.list_owned()):
                vm.remove(server)
            vm.close()
        await store.close()

    report.results.extend(_overlay_vs_copy(opts, tmp))


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _overlay_vs_copy(opts: Options, tmp: Path) -> list[Result]:
    from stratus.agents.compute import images

    base = tmp / "base.raw"
    block = os.urandom(1 << 20)
    with open(base, "wb") as f:
        # Real data, not a sparse file: a copy has to move every byte.
        for _ in range(opts.base_gb * 1024):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    # Both sides end with the new disk on disk (fsync): a copy left in the
    # page cache would be timed at memory speed, not what provisioning costs.
    t0 = time.perf_counter()
    shutil.copyfile(base, tmp / "copy.raw")
    _fsync(tmp / "copy.raw")
    copy_s = time.perf_counter() - t0
    (tmp / "copy.raw").unlink()
    copy = Result(f"full copy of a {opts.base_gb} GB base", 1, copy_s, p50_ms=copy_s * 1000)
    lat = []
    for i in range(opts.overlays):
        t0 = time.perf_counter()
        images.create_overlay(base, "raw", tmp / f"o{i}.qcow2")
        _fsync(tmp / f"o{i}.qcow2")
        lat.append(time.perf_counter() - t0)
    overlay = _latency_result("qcow2 overlay on the same base", lat, sum(lat), 0)
    overlay.note = f"{(tmp / 'o0.qcow2').stat().st_size:,} bytes each"
    compare(overlay, copy, target=100.0, label="copy")
    return [copy, overlay]


def run(opts: Options) -> Report:
    report = Report("compute", opts)
    try:
        with_broker(
            report,
            lambda url, tmp, procs: _body(opts, report, url, tmp, procs),
            libvirt="test:///default",
        )
    except Exception as exc:
        report.failures.append(f"compute: {type(exc).__name__}: {exc}")
    return report


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    d = Options()
    p = argparse.ArgumentParser(
        prog="python -m stratus.ops.bench compute",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--servers", type=positive, default=d.servers)
    p.add_argument("--hosts", type=positive, default=d.hosts)
    p.add_argument("--idle", type=positive, default=d.idle, help="servers created one at a time")
    p.add_argument("--in-flight", type=positive, default=d.in_flight)
    p.add_argument("--base-gb", type=positive, default=d.base_gb)
    p.add_argument("--overlays", type=positive, default=d.overlays)
    p.add_argument("--phase-seconds", type=float, default=d.phase_seconds)
    p.add_argument("--json", action="store_true")
    p.add_argument("--strict", action="store_true", help="exit 2 when a target is missed")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from stratus.cli import logs

    # A line per server built would bury the table: warnings only.
    logs.configure("WARNING")
    opts = Options(
        servers=args.servers,
        hosts=args.hosts,
        idle=args.idle,
        in_flight=args.in_flight,
        base_gb=args.base_gb,
        overlays=args.overlays,
        phase_seconds=args.phase_seconds,
    )
    start = time.perf_counter()
    report = run(opts)
    report.info["wall_seconds"] = round(time.perf_counter() - start, 1)
    errors = [f"{r.name}: {r.errors} errors" for r in report.results if r.errors]
    if args.json:
        print(json.dumps({"compute": report.to_json()}, indent=2))
    else:
        i = report.info
        caption = (
            f"{opts.hosts} compute agents on libvirt {i.get('libvirt')}, nats-server "
            f"{i.get('nats_url')}, {i.get('cpus')} CPUs (load {i.get('loadavg')}), Python "
            f"{i.get('python')}; domains running at the end {i.get('domains_running')}, "
            f"build failures {i.get('build_failures')}; wall {i.get('wall_seconds')} s"
        )
        print_table("Stratus compute agent benchmark", report.results, caption)
        for f in report.failures + errors:
            print(f"FAILED: {f}", file=sys.stderr)
    if report.failures or errors:
        return 1
    idle_missed = not report.info.get("idle_p50_target_met", False)
    if args.strict and (idle_missed or any(r.met is False for r in report.results)):
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
