"""Image bytes benchmark: ``python -m stratus.ops.bench images [--mib 256] [--json]``.

Runs ``stratus up`` (a process of its own, as an operator runs it) and,
from this process, a client as the CLI is one: connected with no
credentials, sending commands and image bytes over NATS only. Each round
moves one file of ``--mib`` random MiB (a raw image) four ways, in an
order that alternates between rounds:

- raw put / raw get: nats-py's object store ``put`` and ``get`` of the
  file, with the handlers' credentials, into the same bucket (``images``,
  the one bucket those may write; the object named ``bench-raw``) of the
  same broker with the same chunk size: the same-run baseline;
- image create --file: what ``stratus image create NAME --file F`` does
  (SHA-256 of the file, ``image.create``, the upload through the image
  service, which checks size, digest and format and stores the object),
  until the image is active;
- image download: what ``stratus image download`` does (the service
  fetches the object, the client fetches the chunks and checks the
  SHA-256), until the file is complete.

Rates are MiB/s; each Stratus row is compared with its raw baseline. The
objects are deleted after each round, so no round finds its bytes stored.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from pathlib import Path

from stratus.ops.bench.common import (
    Procs,
    Report,
    Result,
    compare,
    positive,
    print_table,
    stop_process,
)

PASSWORD = "bench-admin-password"
# The baseline's object, in the image bucket.
RAW = "bench-raw"


@dataclass
class Options:
    mib: int = 256
    rounds: int = 3


def _file(path: Path, mib: int) -> None:
    with open(path, "wb") as f:
        for _ in range(mib):
            f.write(os.urandom(1 << 20))


def _up(data: Path, procs: Procs) -> str:
    """``stratus up`` on a free port; its URL once it says ready."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "stratus.cli.main", "up", "--data-dir", str(data), "--port", "0"],
        env={**os.environ, "STRATUS_ADMIN_PASSWORD": PASSWORD},
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    procs.append(proc)  # type: ignore[arg-type]
    assert proc.stdout is not None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"stratus up exited with {proc.wait(5)}")
        if "ready" in line:
            return (data / "url").read_text().strip()
    raise RuntimeError("stratus up did not say ready within 120 s")


async def _body(opts: Options, report: Report, tmp: Path, procs: Procs) -> None:
    import nats
    from nats.js.api import ObjectMeta, ObjectMetaOptions

    from stratus.cli import transfer
    from stratus.cli.client import Client
    from stratus.cli.creds import local_creds
    from stratus.events.blobs import BUCKET, CHUNK_BYTES, BlobStore

    data = tmp / "up"
    url = await asyncio.to_thread(_up, data, procs)
    src = tmp / "image.raw"
    await asyncio.to_thread(_file, src, opts.mib)
    # The handlers' rights: the image bucket, and no other (the broker
    # refuses to make one): the baseline writes there too, under a name no
    # image has (images are named sha256/<hex>).
    svc = await nats.connect(url, **local_creds(data, "handlers").connect_options())
    js = svc.jetstream(timeout=60)
    blobs = await BlobStore.open(js)
    raw = await js.object_store(BUCKET)
    client = await Client.connect(url, timeout=60)
    login = {"user": "admin", "password": PASSWORD}
    client.token = (await client.command("auth.login", login)).data["token"]
    times: dict[str, list[float]] = {"put": [], "get": [], "upload": [], "download": []}
    checksum = ""

    async def raw_put() -> None:
        meta = ObjectMeta(name=RAW, options=ObjectMetaOptions(max_chunk_size=CHUNK_BYTES))
        f = await asyncio.to_thread(open, src, "rb")
        try:
            await raw.put(RAW, f, meta=meta)
        finally:
            f.close()

    async def raw_get() -> None:
        f = await asyncio.to_thread(open, tmp / "raw-out", "wb")
        try:
            await raw.get(RAW, writeinto=f)
        finally:
            f.close()

    async def upload(r: int) -> None:
        nonlocal checksum
        checksum, size = await asyncio.to_thread(transfer.hash_file, src)
        body = {"name": f"bench-{r}", "format": "raw", "size_bytes": size, "checksum": checksum}
        created = (await client.command("image.create", body)).data
        done = await transfer.upload(client, created["id"], src)
        if done["status"] != "active":
            raise RuntimeError(f"image {done['name']} is {done['status']} after the upload")

    async def download(r: int) -> None:
        await transfer.download(client, f"bench-{r}", tmp / "out.raw")

    async def timed(key: str, work: Awaitable[None]) -> None:
        t0 = time.perf_counter()
        await work
        times[key].append(time.perf_counter() - t0)

    try:
        for r in range(opts.rounds):
            # Alternate which goes first: the page cache and the machine's
            # other load favour neither side.
            if r % 2 == 0:
                await timed("put", raw_put())
                await timed("upload", upload(r))
            else:
                await timed("upload", upload(r))
                await timed("put", raw_put())
            if r % 2 == 0:
                await timed("get", raw_get())
                await timed("download", download(r))
            else:
                await timed("download", download(r))
                await timed("get", raw_get())
            same = await asyncio.to_thread(transfer.hash_file, tmp / "out.raw")
            if same[0] != checksum:
                report.failures.append(f"round {r}: the download is not the upload")
            await raw.delete(RAW)
            await client.command("image.delete", {"ref": f"bench-{r}"})
            await blobs.delete(checksum)
    finally:
        await client.close()
        await svc.close()
    mib = opts.mib

    def row(name: str, key: str) -> Result:
        ts = times[key]
        return Result(
            name,
            mib * len(ts),
            sum(ts),
            p50_ms=sorted(ts)[len(ts) // 2] * 1000 if ts else None,
            note=f"{mib} MiB a round; rate in MiB/s",
        )

    put, get = row("raw object-store put", "put"), row("raw object-store get", "get")
    up = compare(row("image create --file (hash, upload, check, store)", "upload"), put)
    down = compare(row("image download (fetch, send, check)", "download"), get)
    report.results += [put, up, get, down]
    report.info.update(
        {
            "chunk_bytes": CHUNK_BYTES,
            "upload_ratio": round(up.ratio or 0, 3),
            "download_ratio": round(down.ratio or 0, 3),
        }
    )


def run(opts: Options) -> Report:
    import platform
    import shutil
    import tempfile
    from datetime import UTC, datetime

    report = Report("images", opts)
    tmp = Path(tempfile.mkdtemp(prefix="stratus-bench-images-"))
    procs: Procs = []
    report.info.update(
        {
            "cpus": os.cpu_count(),
            "loadavg": " ".join(f"{x:.2f}" for x in os.getloadavg()),
            "python": platform.python_version(),
            "started": datetime.now(UTC).isoformat(timespec="seconds"),
        }
    )
    try:
        asyncio.run(_body(opts, report, tmp, procs))
    except Exception as exc:
        report.failures.append(f"images: {type(exc).__name__}: {exc}")
    finally:
        for p in procs:
            stop_process(p)
        shutil.rmtree(tmp, ignore_errors=True)
    return report


def main(argv: list[str] | None = None) -> int:
    d = Options()
    p = argparse.ArgumentParser(
        prog="python -m stratus.ops.bench images",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--mib", type=positive, default=d.mib, help="size of the image file")
    p.add_argument("--rounds", type=positive, default=d.rounds)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    opts = Options(mib=args.mib, rounds=args.rounds)
    start = time.perf_counter()
    report = run(opts)
    report.info["wall_seconds"] = round(time.perf_counter() - start, 1)
    if args.json:
        print(json.dumps({"images": report.to_json()}, indent=2))
    else:
        i = report.info
        caption = (
            f"stratus up (sync_interval: always) and one client process; {opts.rounds} rounds "
            f"of {opts.mib} MiB, chunks of {i.get('chunk_bytes', 0) >> 10} KiB; {i.get('cpus')} "
            f"CPUs (load {i.get('loadavg')}), Python {i.get('python')}; wall "
            f"{i.get('wall_seconds')} s"
        )
        print_table("Stratus image bytes benchmark", report.results, caption)
        for f in report.failures:
            print(f"FAILED: {f}", file=sys.stderr)
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
