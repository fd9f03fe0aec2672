"""Container benchmark (root): ``python -m stratus.ops.bench containers [--json]``.

One compute agent with the container driver on one nats-server, and one
OCI image (busybox, built here, its blobs stored in the object store and
recorded in ``image.created``). The scheduler's part is played by the
benchmark, as in ``compute``: a container is "created" when its
``host.claimed`` + ``server.scheduled`` batch is appended, and done when
its ``server.running`` arrives.

Rows:
- ``runc run -d`` of an equivalent bundle (the same config.json, an overlay
  of the same layer already mounted): the runtime's own cost, the baseline
  measured in the same run;
- create -> running, one container at a time, ``--containers`` of them
  (target p50 <= 300 ms), with everything the agent does (event, netns,
  overlay mount, bundle, runc, the report on the log);
- disk bytes: ``--copies`` containers of the image (the shared layer once,
  plus each one's upper directory, after each wrote a small file) against
  as many full copies of the image's root.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from stratus.ops.bench.common import (
    Procs,
    Report,
    Result,
    compare,
    finish,
    percentile,
    positive,
    with_broker,
)

TARGET_P50_MS = 300.0


@dataclass
class Options:
    containers: int = 50
    copies: int = 20
    phase_seconds: float = 300.0


def _latency(name: str, lat: list[float], errors: int = 0) -> Result:
    return Result(
        name,
        len(lat),
        sum(lat),
        errors=errors,
        p50_ms=(percentile(lat, 50) or 0) * 1000,
        p99_ms=(percentile(lat, 99) or 0) * 1000,
    )


def disk_bytes(*roots: Path) -> int:
    """Bytes of disk the files under ``roots`` hold (each inode once)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            for name in [*dirnames, *filenames, "."]:
                st = os.lstat(os.path.join(dirpath, name))
                key = (st.st_dev, st.st_ino)
                if key not in seen:
                    seen.add(key)
                    total += st.st_blocks * 512
    return total


def _runc_baseline(count: int, layers: list[str], tmp: Path, config: dict) -> Result:
    """``runc run -d`` alone, on bundles prepared beforehand (not timed)."""
    from stratus.agents.compute.runtime import Runc, mount_overlay, unmount

    runc = Runc(Path("/run/stratus-runc") / f"bench-{secrets.token_hex(4)}")
    netns = f"stbench-{secrets.token_hex(4)}"
    subprocess.run(["ip", "netns", "add", netns], check=True)
    lat: list[float] = []
    errors = 0
    bundles: list[tuple[str, Path]] = []
    try:
        for i in range(count):
            b = tmp / "baseline" / f"c{i}"
            for d in ("upper", "work", "rootfs"):
                (b / d).mkdir(parents=True)
            mount_overlay(layers, b / "upper", b / "work", b / "rootfs")
            cfg = json.loads(json.dumps(config))
            cfg["linux"]["cgroupsPath"] = f"/stratus-bench/{runc.root.name}/c{i}"
            cfg["linux"]["namespaces"][-1]["path"] = f"/run/netns/{netns}"
            (b / "config.json").write_text(json.dumps(cfg))
            cid = f"c{i}"
            bundles.append((cid, b))
            t0 = time.perf_counter()
            try:
                runc.run(cid, b, b / "log")
                lat.append(time.perf_counter() - t0)
            except Exception:
                errors += 1
    finally:
        for cid, b in bundles:
            runc.delete(cid)
            unmount(b / "rootfs")
        subprocess.run(["ip", "netns", "delete", netns], check=False)
        for h in Path("/sys/fs/cgroup").iterdir():
            for d in (h / "stratus-bench" / runc.root.name, h / "stratus-bench"):
                try:
                    d.rmdir()
                except OSError:
                    pass
        shutil.rmtree(runc.root, ignore_errors=True)
    return _latency("runc run -d, bundle ready (baseline)", lat, errors)


async def _body(opts: Options, report: Report, url: str, tmp: Path, procs: Procs) -> None:
    del procs  # everything runs in this process
    from stratus.agents.compute.agent import ComputeAgent, HostSpec
    from stratus.agents.compute.containers import ContainerDriver
    from stratus.agents.compute.runtime import bundle_config
    from stratus.events import oci
    from stratus.events.blobs import BlobStore
    from stratus.events.ids import new_id
    from stratus.events.model import Cause
    from stratus.events.resources import ImageCreated, ServerScheduled, ServerSpec
    from stratus.events.store import EventStore
    from stratus.handlers.scheduler import Request
    from stratus.handlers.scheduler.service import claim_event
    from stratus.ops.bench.ociimage import busybox_image

    store = await EventStore.connect(url)
    await store.ensure_stream()
    # The image: built here, its blobs stored by digest, recorded.
    busybox_image(tmp / "bb.tar", cmd=["sleep", "3600"])
    (tmp / "unpacked").mkdir()
    archive = oci.read_archive(tmp / "bb.tar", tmp / "unpacked")
    blobs = await BlobStore.open(store.js)
    for digest, path in archive.paths():
        await blobs.put_file(digest, path)
    cid = new_id()
    cause = Cause(actor="bench", correlation_id=cid, causation_id=cid)
    image = new_id()
    await store.append(
        [
            cause.make(
                ImageCreated,
                "bench",
                "image",
                image,
                name="bb",
                format="oci",
                checksum=archive.digest,
                oci=archive.config,
            )
        ]
    )
    host = "bench-c"
    driver = ContainerDriver(
        host, tmp / "host" / "containers", deployment=f"b{secrets.token_hex(3)}"
    )
    agent = ComputeAgent(
        store,
        host,
        data_dir=tmp / "host",
        spec=HostSpec(vcpus=4096, ram_mb=1 << 22, disk_gb=1 << 20, types=["container"]),
        containers=driver,
        reconcile_interval=3600,
    )
    waiting: dict[str, asyncio.Future[float]] = {}

    async def on_event(msg) -> None:
        fut = waiting.get(msg.subject.rsplit(".", 1)[-1])
        if fut is None or fut.done():
            return
        ev = store.codec.decode(msg.data)
        if ev.type_name() == "server.running":
            fut.set_result(time.perf_counter())
        elif ev.type_name() in ("server.build-failed", "server.failed"):
            fut.set_exception(RuntimeError(getattr(ev, "reason", "failed")))

    sub = await store.nc.subscribe("ev.bench.server.*", cb=on_event)
    counter = 0

    async def create() -> float:
        nonlocal counter
        counter += 1
        sid = new_id()
        c = Cause(actor="bench", correlation_id=sid, causation_id=sid)
        spec = ServerSpec(
            name=f"c{counter}", image=image, vcpus=1, ram_mb=64, instance_type="container"
        )
        claim = claim_event(c, host, Request(server=sid, tenant="bench", spec=spec))
        sched = c.make(ServerScheduled, "bench", "server", sid, host=host)
        fut: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        waiting[sid] = fut
        start = time.perf_counter()
        await store.append([claim, sched])
        try:
            return await asyncio.wait_for(fut, 60) - start
        finally:
            waiting.pop(sid, None)

    try:
        await agent.start()
        # Warm-up, not timed: the layer fetched and unpacked once.
        await create()
        layer_dirs = [str(agent.layers.path(d)) for d in archive.config.layers]
        deadline = time.monotonic() + opts.phase_seconds
        lat: list[float] = []
        errors = 0
        for _ in range(opts.containers):
            if time.monotonic() > deadline:
                break
            try:
                lat.append(await create())
            except Exception as exc:
                errors += 1
                report.failures.append(f"create: {exc}")
        ours = _latency(f"create -> running, {opts.containers} containers of one image", lat)
        ours.errors = errors
        ours.note = f"target p50 <= {TARGET_P50_MS:.0f} ms"
        report.info["p50_target_met"] = bool(lat) and (ours.p50_ms or 0) <= TARGET_P50_MS

        # Disk: the first ``copies`` containers each write a small file.
        owned = sorted(driver.oci.servers())[: opts.copies]
        for server in owned:
            r = await asyncio.to_thread(
                driver.exec, server, ["sh", "-c", "echo hello > /root/hello"], 30
            )
            if r.exit_code != 0:
                report.failures.append(f"exec in {server}: {r.stderr}")
        uppers = [driver.oci.upper(s) for s in owned]
        shared = disk_bytes(*[Path(d) for d in layer_dirs]) + disk_bytes(*uppers)
        copies = tmp / "copies"
        for i in range(len(owned)):
            await asyncio.to_thread(
                shutil.copytree, layer_dirs[0], copies / f"root{i}", symlinks=True
            )
        full = disk_bytes(copies)
        await asyncio.to_thread(shutil.rmtree, copies, True)
        disk = Result(f"disk, {len(owned)} containers (layer once + uppers)", len(owned), 1.0)
        disk.note = f"{shared:,} bytes vs {full:,} for {len(owned)} full copies"
        report.info["disk_bytes_containers"] = shared
        report.info["disk_bytes_full_copies"] = full
        report.info["disk_ratio"] = round(full / shared, 1) if shared else None

        # The baseline: runc alone on equivalent bundles (same config, same layer).
        sample = agent.instance(
            claim_event(
                cause,
                host,
                Request(
                    server="baseline",
                    tenant="bench",
                    spec=ServerSpec(
                        name="base", image=image, vcpus=1, ram_mb=64, instance_type="container"
                    ),
                ),
            )
        )
        import msgspec

        sample = msgspec.structs.replace(
            sample, layers=layer_dirs, command=archive.config.argv(), env=archive.config.env
        )
        config = bundle_config(sample, cgroup="/x", netns="/run/netns/x")
        base = await asyncio.to_thread(_runc_baseline, opts.containers, layer_dirs, tmp, config)
        # Latency ratio as rates: runc's own rate over ours (1.0: no overhead).
        compare(ours, base, label="runc run -d")
        report.results.extend([base, ours, disk])
        report.info["runtime"] = driver.runtime_version
    finally:
        await sub.unsubscribe()
        await agent.stop()
        for server in list(driver.list_owned()):
            await asyncio.to_thread(driver.remove, server)
        driver.close()
        await store.close()


def run(opts: Options) -> Report:
    report = Report("containers", opts)
    return with_broker(report, lambda url, tmp, procs: _body(opts, report, url, tmp, procs))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    d = Options()
    p = argparse.ArgumentParser(prog="python -m stratus.ops.bench containers", description=__doc__)
    p.add_argument("--containers", type=positive, default=d.containers)
    p.add_argument("--copies", type=positive, default=d.copies)
    p.add_argument("--phase-seconds", type=float, default=d.phase_seconds)
    p.add_argument("--json", action="store_true")
    p.add_argument("--strict", action="store_true", help="exit 2 when the p50 target is missed")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("the containers benchmark needs root (namespaces, mounts, cgroups)")
    from stratus.cli.logs import configure

    # The agent's log on stderr, warnings only: stdout is the table or JSON.
    configure("WARNING")
    opts = Options(args.containers, args.copies, args.phase_seconds)
    report = run(opts)
    info = report.info
    caption = (
        f"{info.get('runtime')}; {info.get('cpus')} CPUs, load {info.get('loadavg')}; "
        f"disk {info.get('disk_ratio')}x smaller than full copies"
    )
    rc = finish(report, args.json, "Stratus containers benchmark", caption)
    if rc == 0 and args.strict and not info.get("p50_target_met"):
        return 2
    return rc


if __name__ == "__main__":
    sys.exit(main())
