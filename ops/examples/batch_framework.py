"""A batch framework on Stratus' two-level scheduling: N short tasks run
through resource offers, and what ran where.

    python ops/examples/batch_framework.py --tasks 20 --task-vcpus 2 --task-ram-mb 2048
    python ops/examples/batch_framework.py --drf-example

It starts a control plane of its own in a temporary directory (nats-server,
the command, query and projection services, the scheduler and the
allocator), registers ``--hosts`` simulated hosts through their events and
keeps them beating, then drives the framework through
``stratus.cli.framework_lib``, as any tenant's program would: register,
read offers, accept them with tasks, report each task running and then
finished after ``--task-seconds`` (the framework's own executor: the
simulated hosts have no compute agent), which frees its resources and
brings new offers.

``--drf-example`` runs the DRF paper's example instead (Ghodsi et al., NSDI
2011): one host of 9 vCPUs and 18 GB at allocation ratio 1.0, framework A
with tasks of <1 vCPU, 4 GB>, B with <3 vCPUs, 1 GB>, both wanting as many
as they can get; DRF gives A 3 tasks and B 2, dominant shares 2/3 each.
``--weight-b W`` weighs B; ``--split`` puts the same 9 vCPUs and 18 GB on
three hosts of 3 vCPUs and 6 GB (A gets 2 tasks, B 1: after one task of
each round, no host has room for the other's shape; see the README).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from stratus.cli.client import Client
from stratus.cli.framework_lib import Framework, Launched, TaskSpec
from stratus.cli.runtime import Stack
from stratus.ops.bench.schedkit import host_event, register_hosts

GB = 1024


async def _client(stack: Stack, password: str) -> Client:
    c = await Client.connect(stack.url)
    reply = await c.command("auth.login", {"user": "admin", "password": password})
    await c.close()
    return await Client.connect(stack.url, reply.data["token"])


async def _settle(fws: list[Framework], quiet: float, limit: float) -> None:
    """Answer offers until nothing new is launched for ``quiet`` seconds."""
    deadline = time.monotonic() + limit
    last = time.monotonic()
    while time.monotonic() - last < quiet and time.monotonic() < deadline:
        if sum([len(await fw.step()) for fw in fws]):
            last = time.monotonic()
        await asyncio.sleep(0.05)


async def batch(c: Client, a: argparse.Namespace) -> dict[str, Any]:
    fw = Framework(c, "batch", tasks_per_offer=a.tasks)
    await fw.register()
    fw.submit(
        *[
            TaskSpec(f"task-{i:03d}", vcpus=a.task_vcpus, ram_mb=a.task_ram_mb)
            for i in range(a.tasks)
        ]
    )
    done: list[dict[str, Any]] = []
    running: dict[str, tuple[Launched, float]] = {}
    t0 = time.monotonic()
    deadline = t0 + a.timeout
    while (fw.pending or running) and time.monotonic() < deadline:
        for task in await fw.step():
            await fw.update(task, "running")
            running[task.id] = (task, time.monotonic())
        now = time.monotonic()
        for tid, (task, started) in list(running.items()):
            if now - started >= a.task_seconds:
                await fw.update(task, "finished")
                del running[tid]
                done.append(
                    {
                        "task": task.name,
                        "host": task.host,
                        "offer": task.offer,
                        "started_s": round(started - t0, 2),
                        "finished_s": round(now - t0, 2),
                    }
                )
        await asyncio.sleep(0.05)
    return {
        "tasks": sorted(done, key=lambda d: d["task"]),
        "finished": len(done),
        "unplaced": len(fw.pending),
        "still_running": len(running),
        "declined_offers": fw.declined,
        "stale_offers": fw.stale,
        "seconds": round(time.monotonic() - t0, 2),
    }


async def drf_example(
    c: Client, stack: Stack, hosts: list[Any], a: argparse.Namespace
) -> dict[str, Any]:
    # Both frameworks exist before any host does: registered after the hosts,
    # the first would be offered every host before the second could be.
    fa = Framework(c, "fw-a")
    fb = Framework(c, "fw-b", weight=a.weight_b)
    await fa.register()
    await fb.register()
    assert stack.store is not None
    await register_hosts(stack.store, hosts, ttl=a.timeout + 60)
    fa.submit(*[TaskSpec(f"a-{i}", vcpus=1, ram_mb=4 * GB) for i in range(20)])
    fb.submit(*[TaskSpec(f"b-{i}", vcpus=3, ram_mb=1 * GB) for i in range(20)])
    await _settle([fa, fb], quiet=2.0, limit=a.timeout)
    rows = {r["name"]: r for r in await c.query("frameworks")}
    out = {}
    for fw in (fa, fb):
        hosts: dict[str, int] = {}
        for t in fw.launched:
            hosts[t.host] = hosts.get(t.host, 0) + 1
        r = rows[fw.name]
        out[fw.name] = {
            "weight": fw.weight,
            "tasks": len(fw.launched),
            "per_host": hosts,
            "allocation": r["allocation"],
            "dominant_share": r["dominant_share"],
        }
    return out


async def main(a: argparse.Namespace) -> dict[str, Any]:
    password = secrets.token_urlsafe(16)
    with tempfile.TemporaryDirectory(prefix="stratus-batch-framework-") as tmp:
        stack = Stack(Path(tmp) / "cloud", port=0, admin_password=password)
        await stack.start()
        try:
            assert stack.store is not None
            run = secrets.token_hex(3)  # host names of this run
            if a.drf_example:
                shapes = [(3, 6 * GB)] * 3 if a.split else [(9, 18 * GB)]
            else:
                shapes = [(a.host_vcpus, a.host_ram_mb)] * a.hosts
            hosts = [
                host_event(f"h{run}-{i}", vcpus=v, ram_mb=m, cpu_ratio=1.0, ram_ratio=1.0)
                for i, (v, m) in enumerate(shapes)
            ]
            c = await _client(stack, password)
            try:
                if a.drf_example:
                    return await drf_example(c, stack, hosts, a)
                await register_hosts(stack.store, hosts, ttl=a.timeout + 60)
                return await batch(c, a)
            finally:
                await c.close()
        finally:
            await stack.stop()


def _print(result: dict[str, Any], a: argparse.Namespace) -> None:
    if a.json:
        print(json.dumps(result, indent=2))
        return
    if a.drf_example:
        for name, r in result.items():
            print(
                f"{name}: weight {r['weight']:g}, {r['tasks']} tasks {r['per_host']}, "
                f"holds {r['allocation']}, dominant share {r['dominant_share']:.4f}"
            )
        return
    for t in result["tasks"]:
        print(f"{t['task']}  on {t['host']}  {t['started_s']:6.2f}s .. {t['finished_s']:6.2f}s")
    print(
        f"{result['finished']} finished, {result['unplaced']} unplaced, "
        f"{result['declined_offers']} offers declined, {result['stale_offers']} stale, "
        f"in {result['seconds']} s"
    )


def cli(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tasks", type=int, default=10)
    p.add_argument("--task-vcpus", type=int, default=1)
    p.add_argument("--task-ram-mb", type=int, default=1024)
    p.add_argument("--task-seconds", type=float, default=1.0, help="how long each task runs")
    p.add_argument("--hosts", type=int, default=2, help="simulated hosts")
    p.add_argument("--host-vcpus", type=int, default=4)
    p.add_argument("--host-ram-mb", type=int, default=8192)
    p.add_argument("--drf-example", action="store_true", help="the DRF paper's example")
    p.add_argument("--weight-b", type=float, default=1.0, help="--drf-example: B's weight")
    p.add_argument("--split", action="store_true", help="--drf-example on three hosts")
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    if min(a.tasks, a.task_vcpus, a.task_ram_mb, a.hosts, a.host_vcpus, a.host_ram_mb) < 1:
        p.error("counts and sizes must be at least 1")
    result = asyncio.run(main(a))
    _print(result, a)
    if not a.drf_example and (result["unplaced"] or result["still_running"]):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(cli())
