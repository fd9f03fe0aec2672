"""The projection benchmark (issue 4): rebuilds, time travel and quota-checked
server creation on a realistic log of a cloud with 1,000 tenants.

``python -m stratus.ops.bench projections [--events N]``. In one run, on
one nats-server (``EmbeddedNats``, as the foundation benchmark):

1. N events of ``workload.Workload`` are appended as atomic batches (not
   timed): system objects, tenants with quotas, then their activity.
2. The raw baseline: a nats-py ordered consumer reads all N.
3. ``projections rebuild`` into a fresh SQLite file (``build_store``, what
   the CLI runs) in a CHILD process, which reports its own peak RSS
   (VmHWM) plus its writer process's: the generator's memory does not
   count. The same into another SQLite file reading through nats-py's
   public ordered consumer (``reader.OrderedReader``, the fallback when the
   fast reader refuses the installed nats-py), and into a fresh
   PostgreSQL database (``LocalPostgres``). All stores' digests must agree.
4. Time travel: the rebuilt file becomes the live store (as after a swap),
   a live projector with snapshots every 10,000 events follows a further
   tail of the workload, and ``q.tenants`` with ``Stratus-At`` 1,000 events
   back is asked through the real ``QueryService`` over NATS, twice (the
   first builds the past store from the nearest snapshot, the second is a
   cache hit).
5. ``server.create`` through real ``stratus serve handlers`` processes
   (quota checked, every tenant's world folded), 64 concurrent clients on
   one tenant (every command contends for the same boundary) and spread
   over 100 tenants.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats

from stratus.cli.client import Client
from stratus.events.store import MAX_BATCH, EventStore
from stratus.ops.bench import foundation
from stratus.ops.bench.common import (
    Load,
    Report,
    Result,
    compare,
    drive,
    positive,
    print_table,
    result,
    stop_process,
    with_broker,
)
from stratus.ops.bench.workload import Workload, batches
from stratus.projections.db import make_engine, sqlite_url
from stratus.projections.pgserver import LocalPostgres
from stratus.projections.projector import store_digest
from stratus.projections.query import QueryService
from stratus.projections.rebuild import LiveProjection
from stratus.projections.snapshots import DEFAULT_EVERY

APPENDS_IN_FLIGHT = 4
RSS_LIMIT_MB = 300
AT_LIMIT_S = 1.0
AT_BACK = 1000
CHILD_TIMEOUT_S = 1800.0
ONE_TENANT = "cmd-one"
SPREAD = 100


@dataclass
class Options:
    events: int = 1_000_000
    tenants: int = 1000
    clients: int = 64
    # server.create commands per tenant mode
    commands: int = 3000
    # events appended after the rebuild while the live projector snapshots
    tail: int = 25_000
    # no long phase (read, rebuild) may take longer than this
    phase_seconds: float = 900.0
    command_seconds: float = 60.0
    postgres: bool = True
    json: bool = False
    strict: bool = False


def parse_args(argv: list[str]) -> Options:
    d = Options()
    p = argparse.ArgumentParser(prog="python -m stratus.ops.bench projections")
    p.add_argument("--events", type=positive, default=d.events, help="events in the log")
    p.add_argument("--tenants", type=positive, default=d.tenants)
    p.add_argument("--clients", type=positive, default=d.clients)
    p.add_argument("--commands", type=positive, default=d.commands, help="per tenant mode")
    p.add_argument("--tail", type=positive, default=d.tail, help="events the live store follows")
    p.add_argument("--phase-seconds", type=float, default=d.phase_seconds)
    p.add_argument("--no-postgres", action="store_true", help="skip the PostgreSQL rebuild")
    p.add_argument("--json", action="store_true", help="print one JSON object, no table")
    p.add_argument("--strict", action="store_true", help="exit 2 when a target is missed")
    a = p.parse_args(argv)
    opts = Options(
        events=a.events,
        tenants=a.tenants,
        clients=a.clients,
        commands=a.commands,
        tail=a.tail,
        phase_seconds=a.phase_seconds,
        postgres=not a.no_postgres,
        json=a.json,
        strict=a.strict,
    )
    return opts


def main(argv: list[str]) -> int:
    opts = parse_args(argv)
    start = time.perf_counter()
    report = run(opts)
    wall = time.perf_counter() - start
    report.info["wall_seconds"] = round(wall, 1)
    errors = [f"{r.name}: {r.errors} errors ({r.note})" for r in report.results if r.errors]
    failures = report.failures + errors
    if opts.json:
        print(json.dumps({"projections": report.to_json()}, indent=2, default=str))
    else:
        print_report(report)
        for f in failures:
            print(f"FAILED: {f}", file=sys.stderr)
    if failures:
        return 1
    if opts.strict and any(r.met is False for r in report.results):
        return 2
    return 0


def print_report(report: Report) -> None:
    info = report.info
    gen = info.get("generated", {})
    kinds = gen.get("types", {})
    top = ", ".join(f"{k} {v:,}" for k, v in list(kinds.items())[:6])
    caption = (
        f"nats-server on {info.get('nats_url')}, {info.get('cpus')} CPUs, load average "
        f"{info.get('loadavg')} at start, Python {info.get('python')}; "
        f"{gen.get('events', 0):,} events of {len(kinds)} types over "
        f"{gen.get('tenants', 0):,} tenants ({top}, ...), appended in "
        f"{gen.get('seconds')} s, not timed; views: {info.get('views')}; "
        f"wall time {info.get('wall_seconds')} s"
    )
    print_table("Stratus projection benchmark (issue 4)", report.results, caption)


def run(opts: Options) -> Report:
    from stratus.projections.views import all_views

    report = Report("projections", opts)
    views = ", ".join(v.name for v in all_views())
    return with_broker(
        report, lambda url, tmp, procs: _run(url, tmp, opts, report, procs), views=views
    )


async def _run(
    url: str, tmp: Path, opts: Options, report: Report, procs: list[subprocess.Popen[bytes]]
) -> None:
    store = await EventStore.connect(url)
    nc = await nats.connect(url, connect_timeout=3, max_reconnect_attempts=0)
    workload = Workload(opts.tenants)
    try:
        await store.ensure_stream()
        await _generate(store, workload, opts.events, report)
        sections: list[tuple[str, Any]] = [
            ("rebuild", lambda: _rebuilds(store, nc, url, tmp, opts, report)),
            ("time travel", lambda: _time_travel(store, url, tmp, workload, opts, report)),
            ("server create", lambda: _server_create(url, tmp, opts, report, procs)),
        ]
        for name, section in sections:
            try:
                await section()
            except Exception as exc:
                report.failures.append(f"{name}: {type(exc).__name__}: {exc}")
    finally:
        await store.close()
        with contextlib.suppress(Exception):
            await nc.drain()


# -- the log -----------------------------------------------------------------------


async def _append(store: EventStore, workload: Workload, n: int) -> None:
    sem = asyncio.Semaphore(APPENDS_IN_FLIGHT)
    pending: set[asyncio.Task[Any]] = set()

    async def one(chunk: list[Any]) -> None:
        try:
            await store.append(chunk)
        finally:
            sem.release()

    try:
        for chunk in batches(workload, n, MAX_BATCH):
            # Bounded: at most APPENDS_IN_FLIGHT batches exist at once, so the
            # generator never holds the whole log in memory.
            await sem.acquire()
            task = asyncio.create_task(one(chunk))
            pending.add(task)
            task.add_done_callback(pending.discard)
            for t in [t for t in pending if t.done()]:
                t.result()
        if pending:
            await asyncio.gather(*pending)
    finally:
        for t in pending:
            t.cancel()


async def _generate(store: EventStore, workload: Workload, n: int, report: Report) -> None:
    t0 = time.perf_counter()
    before = await store.last_seq()
    await asyncio.wait_for(_append(store, workload, n), max(120.0, n / 2000))
    last = await store.last_seq()
    if last - before != n:
        raise RuntimeError(f"appended {last - before} events, expected {n}")
    report.info["generated"] = {
        "events": n,
        "tenants": workload.tenant_count,
        "seconds": round(time.perf_counter() - t0, 1),
        "types": dict(sorted(workload.counts.items(), key=lambda kv: -kv[1])),
    }


# -- rebuilds ------------------------------------------------------------------------


def _child_cmd(url: str, target: str, n: int, reader: str) -> list[str]:
    return [
        *(sys.executable, "-m", "stratus.ops.bench.projections", "--child"),
        *(url, target, str(n), reader),
    ]


async def _child_rebuild(
    url: str, target: str, n: int, max_s: float, reader: str = "fast"
) -> dict[str, Any]:
    """Run one rebuild in a child process; its JSON line (events, seconds, RSS).

    ``reader``: ``fast`` (what a service gets) or ``public`` (nats-py's
    ordered consumer, the fallback for a nats-py the fast reader refuses)."""
    proc = await asyncio.create_subprocess_exec(
        *_child_cmd(url, target, n, reader),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), max_s)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise RuntimeError(
            f"rebuild into {target.split(':')[0]} not done in {max_s:.0f}s"
        ) from None
    if proc.returncode != 0:
        raise RuntimeError(f"rebuild child exited {proc.returncode}: {err.decode()[-400:]}")
    return json.loads(out.decode().strip().splitlines()[-1])


def _rss_note(child: dict[str, Any]) -> str:
    who = "child and its writer process" if child.get("helper") else "child process"
    return f"peak RSS {child['rss_mb']:.0f} MB ({who})"


async def _rebuilds(
    store: EventStore, nc: nats.NATS, url: str, tmp: Path, opts: Options, report: Report
) -> None:
    n = await store.last_seq()
    raw = result(
        f"raw ordered-consumer read of {n:,}",
        await foundation._raw_ordered_read(nc, n, opts.phase_seconds),
        note="nats-py js.subscribe(ordered_consumer=True)",
    )
    report.results.append(raw)
    lite_path = tmp / "projections.rebuilt.db"
    lite, child, lite_digest = await _checked_rebuild(
        url, str(lite_path), sqlite_url(lite_path), "SQLite", n, raw, None, opts, target_ratio=0.5
    )
    report.results += [lite, _rss_row("SQLite rebuild", child)]
    report.info["sqlite_store"] = {"path": str(lite_path), "seq": n}
    report.info["sqlite_bytes"] = lite_path.stat().st_size
    public_path = tmp / "projections.public.db"
    public, child, _ = await _checked_rebuild(
        url,
        str(public_path),
        sqlite_url(public_path),
        "SQLite, public reader",
        n,
        raw,
        lite_digest,
        opts,
        reader="public",
        same_as="the fast reader's",
    )
    report.results += [public, _rss_row("SQLite rebuild, public reader", child)]
    if not opts.postgres:
        return
    server = LocalPostgres()
    await asyncio.to_thread(server.start)
    try:
        pg_url = await server.create_database("bench")
        pg, child, _ = await _checked_rebuild(
            url, pg_url, pg_url, "PostgreSQL", n, raw, lite_digest, opts, same_as="SQLite's"
        )
        report.results += [pg, _rss_row("PostgreSQL rebuild", child)]
    finally:
        await asyncio.to_thread(server.stop)


async def _checked_rebuild(
    url: str,
    target: str,
    engine_url: str,
    into: str,
    n: int,
    raw: Result,
    want_digest: str | None,
    opts: Options,
    *,
    reader: str = "fast",
    same_as: str = "",
    target_ratio: float | None = None,
) -> tuple[Result, dict[str, Any], str]:
    """A rebuild in a child process, as a ratio of the raw read, with its
    store's checkpoint checked (and its digest against ``want_digest``);
    the result, the child's report and the digest."""
    child = await _child_rebuild(url, target, n, opts.phase_seconds, reader)
    r = compare(
        Result(
            f"projections rebuild of {n:,} into {into}",
            child["events"],
            child["seconds"],
            note=_rss_note(child),
        ),
        raw,
        target=target_ratio,
        label="raw read",
    )
    engine = make_engine(engine_url)
    try:
        seq, digest = await store_digest(engine)
    finally:
        await engine.dispose()
    if seq != n:
        r.errors += 1
        r.note = f"checkpoint {seq}, want {n}"
    elif want_digest is not None and digest != want_digest:
        r.errors += 1
        r.note = f"digest differs from {same_as}"
    elif want_digest is not None:
        r.note += f", digest equals {same_as}"
    return r, child, digest


def _rss_row(what: str, child: dict[str, Any]) -> Result:
    # The table compares rates: express "RSS under the limit" as a ratio
    # (limit / peak) that must reach 1.
    r = Result(f"{what}: peak RSS {child['rss_mb']:.0f} MB", 1, 1.0)
    r.baseline = f"{RSS_LIMIT_MB} MB / peak"
    r.ratio = RSS_LIMIT_MB / child["rss_mb"]
    r.target = 1.0
    r.count = 0
    r.seconds = 0.0
    r.note = f"target < {RSS_LIMIT_MB} MB"
    return r


def _peak_rss_mb() -> float:
    """This process's peak resident set: VmHWM, else ru_maxrss (KiB on Linux)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def _child(url: str, target: str, n: int, reader: str) -> dict[str, Any]:
    """In the child: the rebuild ``stratus projections rebuild`` runs."""
    from stratus.projections.projector import Projector
    from stratus.projections.rebuild import build_store

    store = await EventStore.connect(url, fast=reader == "fast")
    try:
        if "://" not in target:
            built = await build_store(store, Path(target))
            return {
                "events": built.events,
                "seconds": built.seconds,
                "seq": built.seq,
                "helper_rss_mb": built.helper_rss_mb or 0.0,
            }
        engine = make_engine(target)
        events = 0

        def progress(k: int, _seq: int) -> None:
            nonlocal events
            events += k

        t0 = time.perf_counter()
        projector = Projector(store, engine, batch=5000)
        try:
            seq = await projector.catch_up(until=n, progress=progress)
        finally:
            projector.close()
            await engine.dispose()
        return {"events": events, "seconds": time.perf_counter() - t0, "seq": seq}
    finally:
        await store.close()


def child_main(argv: list[str]) -> int:
    url, target, n, reader = argv[0], argv[1], int(argv[2]), argv[3]
    out = asyncio.run(_child(url, target, n, reader))
    # Every process of the rebuild counts: the writer's peak is added (a
    # bound: the two peaks need not coincide).
    helper = out.pop("helper_rss_mb", 0.0)
    out["helper"] = helper > 0
    out["rss_mb"] = _peak_rss_mb() + helper
    print(json.dumps(out))
    return 0


# -- time travel -------------------------------------------------------------------


async def _time_travel(
    store: EventStore, url: str, tmp: Path, workload: Workload, opts: Options, report: Report
) -> None:
    path = Path(report.info["sqlite_store"]["path"])
    engine = make_engine(sqlite_url(path))
    live = LiveProjection(store, engine, snapshot_every=DEFAULT_EVERY)
    queries = QueryService(store, engine)
    client = await Client.connect(url, timeout=30.0)
    try:
        await live.start()
        await queries.start()
        # The tail arrives in steps the live projector keeps up with (as
        # commands do), so it snapshots every DEFAULT_EVERY events.
        step = 5000
        t0 = time.perf_counter()
        done = 0
        while done < opts.tail:
            k = min(step, opts.tail - done)
            await _append(store, workload, k)
            done += k
            last = await store.last_seq()
            await _until_projected(live, last, 120.0)
        report.info["tail"] = {"events": done, "seconds": round(time.perf_counter() - t0, 1)}
        last = await store.last_seq()
        at = max(1, last - AT_BACK)
        snaps = queries.timetravel.snapshots
        nearest = snaps.nearest(at) if snaps is not None else None
        note_base = f"snapshot at {nearest[0]:,}" if nearest else "no snapshot: replay from 1"
        times = []
        rows = []
        for _ in range(2):
            t = time.perf_counter()
            answer = await client.query("tenants", {}, at=at)
            times.append(time.perf_counter() - t)
            rows.append(len(answer) if isinstance(answer, list) else answer)
        for label, secs in (("first", times[0]), ("repeated", times[1])):
            r = Result(f"--at {at:,} ({AT_BACK:,} back of {last:,}), {label} answer", 1, secs)
            r.p50_ms = secs * 1000
            r.baseline = f"{AT_LIMIT_S:.0f} s / answer"
            r.ratio = AT_LIMIT_S / secs if secs > 0 else None
            r.target = 1.0
            r.note = f"q.tenants over NATS; {note_base}; target < {AT_LIMIT_S:.0f} s"
            if label == "first":
                r.note += f"; replayed {queries.timetravel.replayed:,}"
            report.results.append(r)
        if rows[0] != rows[1]:
            report.failures.append("time travel: the repeated answer differs from the first")
    finally:
        with contextlib.suppress(Exception):
            await client.close()
        await queries.stop()
        await live.stop()
        await engine.dispose()


async def _until_projected(live: LiveProjection, seq: int, max_s: float) -> None:
    deadline = time.monotonic() + max_s
    while time.monotonic() < deadline:
        p = live.projector
        if p is not None and p.position >= seq:
            if p.snapshots is not None:
                await p.snapshots.wait()
            return
        await asyncio.sleep(0.05)
    raise RuntimeError(f"the live projector did not reach {seq} in {max_s:.0f}s")


# -- server create -----------------------------------------------------------------


async def _server_create(
    url: str, tmp: Path, opts: Options, report: Report, procs: list[subprocess.Popen[bytes]]
) -> None:
    started = await foundation._start_handlers(url, 1, tmp, procs)
    clients: list[Client] = []
    try:
        for _ in range(opts.clients):
            clients.append(await Client.connect(url, timeout=30.0))
        admin = clients[0]
        spread = [f"cmd-s{i:03d}" for i in range(SPREAD)]
        limits = {"instances": -1, "vcpus": -1, "ram_mb": -1, "ports": -1, "security_groups": -1}

        async def setup(_w: int, i: int) -> None:
            t = ([ONE_TENANT, *spread])[i]
            await admin.command("tenant.create", {"name": t})
            await admin.command("quota.set", {"tenant": t, "limits": limits})
            await admin.command("image.create", {"tenant": t, "name": "img"})
            # The first server makes the tenant's default security group.
            await admin.command(
                "server.create",
                {"tenant": t, "name": "first", "image": "img", "vcpus": 1, "ram_mb": 512},
            )

        ready = await drive(setup, SPREAD + 1, 16, opts.command_seconds * 2)
        if ready.errors or ready.done != SPREAD + 1:
            raise RuntimeError(f"setting up the command tenants: {ready.first_error}")
        one = await _creates(clients, lambda w, i: ONE_TENANT, "o", opts)
        many = await _creates(clients, lambda w, i: spread[i % SPREAD], "m", opts)
        r1 = result(f"server.create, {opts.clients} clients, 1 tenant", one)
        r100 = compare(
            result(f"server.create, {opts.clients} clients, {SPREAD} tenants", many),
            r1,
            label="1 tenant",
        )
        r1.note = r1.note or "quota checked; every command on one tenant's boundary"
        r100.note = r100.note or "quota checked; no two clients' commands on one tenant at once"
        report.results += [r1, r100]
    finally:
        for c in clients:
            with contextlib.suppress(Exception):
                await c.close()
        for p in started:
            stop_process(p)


async def _creates(clients: list[Client], tenant: Any, tag: str, opts: Options) -> Load:
    async def op(w: int, i: int) -> None:
        body = {"tenant": tenant(w, i), "name": f"{tag}{i:06d}", "image": "img"}
        await clients[w].command("server.create", {**body, "vcpus": 1, "ram_mb": 512})

    return await drive(op, opts.commands, opts.clients, opts.command_seconds, latencies=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        sys.exit(child_main(sys.argv[2:]))
    sys.exit(main(sys.argv[1:]))
