"""The foundation benchmark: write path, command path and read path.

Everything runs against ONE nats-server (``EmbeddedNats``: file storage,
``sync_interval: always``) so every Stratus figure is compared with a raw
nats-py baseline measured minutes apart on the same broker, disk and CPU
load, not with a number from another day.

Order matters. The read phase runs first, on a stream holding exactly the
prefilled tenant events (sequences 1..N), so the raw reader, ``EventStore``
and the projector all read the same N events and nothing undecodable (the
raw publish payloads) is in their way. The write phases follow.

The command service runs as separate processes (``stratus serve handlers``)
so the 64 clients and the service do not share one Python event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import nats
from nats.aio.msg import Msg
from nats.js.api import DeliverPolicy
from sqlalchemy import func, select

from stratus.cli.client import Client
from stratus.cli.runtime import publish_signing_keys
from stratus.events.ids import new_id
from stratus.events.model import Cause, Event
from stratus.events.store import MAX_BATCH, SUBJECTS, Condition, EventStore
from stratus.events.tenants import KIND, TenantCreated, TenantRenamed
from stratus.handlers.keyring import KeyRing
from stratus.ops.bench.common import (
    Load,
    Report,
    Result,
    compare,
    drive,
    result,
    stop_process,
    with_broker,
)
from stratus.projections import audit
from stratus.projections.db import make_engine, sqlite_url
from stratus.projections.pgserver import LocalPostgres
from stratus.projections.projector import Projector, store_digest
from stratus.projections.tenants import tenants
from stratus.projections.views import View, all_views

RAW_PAYLOAD_BYTES = 145
# One in this many prefilled events renames an earlier tenant.
RENAME_EVERY = 10
# Atomic batches in flight while prefilling: enough to keep the broker busy.
PREFILL_BATCHES_IN_FLIGHT = 4
READY_TIMEOUT_S = 30.0
PREFILL_TIMEOUT_S = 120.0
WARMUP_COMMANDS = 300
AUTH_ROUNDS = 4
# The in-flight write phases run this many times the awaited count: they are
# that much faster, and a phase of a second or less is mostly noise.
IN_FLIGHT_FACTOR = 4


@dataclass
class Options:
    events: int = 100_000
    commands: int = 3_000
    publishes: int = 4_000
    clients: int = 64
    in_flight: int = 500
    # Handler process counts to measure the 64-client figure with.
    handlers: tuple[int, ...] = (1, 2)
    # No phase starts new work after this long; it reports what it did.
    phase_seconds: float = 25.0


def run(opts: Options) -> Report:
    """Start a broker in a temp dir, measure everything, clean up."""
    report = Report("foundation", opts)
    return with_broker(report, lambda url, tmp, procs: _run(url, tmp, opts, report, procs))


async def _run(
    url: str, tmp: Path, opts: Options, report: Report, procs: list[subprocess.Popen[bytes]]
) -> None:
    store = await EventStore.connect(url)
    nc = await nats.connect(url, connect_timeout=3, max_reconnect_attempts=0)
    try:
        await store.ensure_stream()
        # One failed section is reported and the others still run.
        sections: list[tuple[str, Any]] = [
            ("read path", lambda: _read_path(store, nc, tmp, opts, report)),
            ("write path", lambda: _write_path(store, nc, opts, report)),
            ("command path", lambda: _command_path(url, tmp, opts, report, procs)),
        ]
        by_section: dict[str, list[Result]] = {}
        for name, section in sections:
            before = len(report.results)
            try:
                await section()
            except Exception as exc:
                report.failures.append(f"{name}: {type(exc).__name__}: {exc}")
            by_section[name] = report.results[before:]
        # Printed in the order a reader follows a command: write, command, read.
        report.results = [
            r for name in ("write path", "command path", "read path") for r in by_section[name]
        ]
    finally:
        await store.close()
        with contextlib.suppress(Exception):
            await nc.drain()


# -- read path ----------------------------------------------------------------


async def _prefill(store: EventStore, n: int) -> tuple[int, int]:
    """Append ``n`` tenant events as pipelined atomic batches; (creates, renames)."""
    renames = n // RENAME_EVERY
    creates = n - renames
    cid = new_id()
    cause = Cause(actor="bench", correlation_id=cid, causation_id=cid, at=datetime.now(UTC))

    def name(i: int) -> str:
        return f"t{i:07d}"

    created: list[Event] = [
        cause.make(TenantCreated, name(i), KIND, name(i), name=name(i)) for i in range(creates)
    ]
    renamed: list[Event] = [
        cause.make(TenantRenamed, name(i), KIND, name(i), name=f"r{i:07d}", previous=name(i))
        for i in range(renames)
    ]

    async def append_all(events: list[Event]) -> None:
        chunks = [events[i : i + MAX_BATCH] for i in range(0, len(events), MAX_BATCH)]
        sem = asyncio.Semaphore(PREFILL_BATCHES_IN_FLIGHT)

        async def one(chunk: list[Event]) -> None:
            async with sem:
                await store.append(chunk)

        await asyncio.gather(*(one(c) for c in chunks))

    # Every rename lands after its tenant's creation, as on a real log.
    await append_all(created)
    await append_all(renamed)
    return creates, renames


async def _raw_ordered_read(nc: nats.NATS, n: int, max_s: float) -> Load:
    js = nc.jetstream()
    loop = asyncio.get_running_loop()
    finished = loop.create_future()
    load = Load()

    async def cb(_msg: Msg) -> None:
        load.done += 1
        if load.done >= n and not finished.done():
            finished.set_result(None)

    start = time.perf_counter()
    sub = await js.subscribe(
        SUBJECTS, cb=cb, ordered_consumer=True, deliver_policy=DeliverPolicy.ALL
    )
    try:
        await asyncio.wait_for(finished, max_s)
    except TimeoutError:
        load.first_error = f"stopped after {max_s:.0f}s"
    load.seconds = time.perf_counter() - start
    with contextlib.suppress(Exception):
        await sub.unsubscribe()
    return load


async def _store_read(store: EventStore, n: int, max_s: float) -> Load:
    load = Load()
    start = time.perf_counter()

    async def consume() -> None:
        async for batch in store.read(until=n):
            load.done += len(batch)

    try:
        await asyncio.wait_for(consume(), max_s)
    except TimeoutError:
        load.first_error = f"stopped after {max_s:.0f}s"
    load.seconds = time.perf_counter() - start
    return load


async def _projector_catch_up(
    store: EventStore,
    db_url: str,
    n: int,
    creates: int,
    max_s: float,
    views: list[View] | None = None,
) -> tuple[Load, str, str]:
    """Catch a fresh store at ``db_url`` up to ``n``: (load, check note, digest)."""
    engine = make_engine(db_url)
    load = Load()
    check = digest = ""

    def progress(count: int, _seq: int) -> None:
        load.done += count

    try:
        projector = Projector(store, engine, views=views)
        start = time.perf_counter()
        try:
            position = await asyncio.wait_for(projector.catch_up(until=n, progress=progress), max_s)
        except TimeoutError:
            load.first_error = f"stopped after {max_s:.0f}s"
            position = projector.position
        load.seconds = time.perf_counter() - start
        projector.close()
        async with engine.connect() as conn:
            rows = (await conn.execute(select(func.count()).select_from(tenants))).scalar_one()
        if position != n or rows != creates:
            load.errors += 1
            load.first_error = load.first_error or (
                f"checkpoint {position} (want {n}), {rows} tenant rows (want {creates})"
            )
        else:
            check = f"checkpoint {position}, {rows:,} rows"
            digest = (await store_digest(engine))[1]
    finally:
        await engine.dispose()
    return load, check, digest


async def _postgres_catch_up(
    store: EventStore, n: int, creates: int, max_s: float
) -> tuple[Load, str, str]:
    """The same catch-up into a fresh database on a local PostgreSQL server
    (Debian's, default durability: fsync and synchronous commit on)."""
    server = LocalPostgres()
    await asyncio.to_thread(server.start)
    try:
        url = await server.create_database("bench")
        return await _projector_catch_up(store, url, n, creates, max_s)
    finally:
        await asyncio.to_thread(server.stop)


async def _read_path(
    store: EventStore, nc: nats.NATS, tmp: Path, opts: Options, report: Report
) -> None:
    n = opts.events
    t0 = time.perf_counter()
    creates, renames = await asyncio.wait_for(_prefill(store, n), PREFILL_TIMEOUT_S)
    report.info["prefill"] = {
        "events": n,
        "created": creates,
        "renamed": renames,
        "seconds": round(time.perf_counter() - t0, 2),
        "how": f"atomic batches of {MAX_BATCH}, {PREFILL_BATCHES_IN_FLIGHT} in flight",
    }
    last = await store.last_seq()
    if last != n:
        raise RuntimeError(f"prefill left the stream at sequence {last}, expected {n}")

    raw = result(
        f"raw ordered-consumer read of {n:,}",
        await _raw_ordered_read(nc, n, opts.phase_seconds),
        note="nats-py js.subscribe(ordered_consumer=True)",
    )
    read = compare(
        result(
            f"EventStore.read of {n:,}",
            await _store_read(store, n, opts.phase_seconds),
            note="records only, not decoded",
        ),
        raw,
        label="raw read",
    )
    load, check, lite_digest = await _projector_catch_up(
        store, sqlite_url(tmp / "projections.db"), n, creates, opts.phase_seconds * 2
    )
    proj = compare(
        result(f"projector catch-up of {n:,} into SQLite", load, note=check),
        raw,
        target=0.5,
        label="raw read",
    )
    # What the audit trail (one indexed row per event) costs a rebuild.
    others = [v for v in all_views() if v.name != audit.NAME]
    load, check, _ = await _projector_catch_up(
        store,
        sqlite_url(tmp / "projections-no-audit.db"),
        n,
        creates,
        opts.phase_seconds * 2,
        others,
    )
    no_audit = compare(
        result(f"projector catch-up of {n:,}, without the audit view", load, note=check),
        raw,
        label="raw read",
    )
    report.results += [raw, read, no_audit, proj]
    # PostgreSQL after SQLite, on the same log in the same run. Its server
    # needs Debian's binaries: without them this row fails, the others stand.
    load, check, pg_digest = await _postgres_catch_up(store, n, creates, opts.phase_seconds * 2)
    if check and pg_digest != lite_digest:
        load.errors += 1
        load.first_error = "digest differs from SQLite's"
    elif check:
        check += ", digest equals SQLite's"
    report.results.append(
        compare(
            result(f"projector catch-up of {n:,} into PostgreSQL", load, note=check),
            proj,
            label="SQLite catch-up",
        )
    )


# -- write path ---------------------------------------------------------------


async def _write_path(store: EventStore, nc: nats.NATS, opts: Options, report: Report) -> None:
    js = nc.jetstream(timeout=10)
    payload = os.urandom(RAW_PAYLOAD_BYTES)
    n, k, max_s = opts.publishes, opts.in_flight, opts.phase_seconds

    def raw_op(tag: str) -> Any:
        async def op(_w: int, i: int) -> None:
            await js.publish(f"ev.bench.raw.{tag}{i}", payload)

        return op

    def append_op(tag: str) -> Any:
        async def op(_w: int, i: int) -> None:
            # As a handler does: one event on a fresh aggregate, condition
            # "nothing there yet", the command id as the message id.
            cid = new_id()
            cause = Cause(actor="bench", correlation_id=cid, causation_id=cid)
            name = f"a{tag}{i:07d}"
            event = cause.make(TenantCreated, name, KIND, name, name=name)
            await store.append([event], Condition(event.subject, 0), msg_id=cid)

        return op

    many = n * IN_FLIGHT_FACTOR
    raw1 = result(
        "raw js.publish, awaited one by one",
        await drive(raw_op("s"), n, 1, max_s),
        note=f"{RAW_PAYLOAD_BYTES}-byte payload",
    )
    rawk = result(
        f"raw js.publish, {k} in flight",
        await drive(raw_op("p"), many, k, max_s),
        note=f"{RAW_PAYLOAD_BYTES}-byte payload",
    )
    # What the broker gives a load of exactly as many requests in flight as
    # the concurrent command clients can have: the fair ceiling for them.
    rawc = result(
        f"raw js.publish, {opts.clients} in flight",
        await drive(raw_op("c"), many, opts.clients, max_s),
        note=f"{RAW_PAYLOAD_BYTES}-byte payload; context for the {opts.clients}-client figure",
    )
    app1 = compare(
        result("EventStore.append, one by one", await drive(append_op("s"), n, 1, max_s)),
        raw1,
        label="raw awaited",
    )
    appk = compare(
        result(f"EventStore.append, {k} in flight", await drive(append_op("p"), many, k, max_s)),
        rawk,
        label=f"raw {k} in flight",
    )
    report.info["event_bytes"] = len(
        store.codec.encode(
            Cause("bench", new_id(), new_id()).make(
                TenantCreated, "a0000000", KIND, "a0000000", name="a0000000"
            )
        )
    )
    report.results += [raw1, rawk, rawc, app1, appk]
    report.info["baselines"] = {"awaited": raw1.name, "in_flight": rawk.name, "clients": rawc.name}


# -- command path -------------------------------------------------------------


def _stratus_binary() -> str:
    beside = Path(sys.executable).parent / "stratus"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("stratus")
    if found is None:
        raise RuntimeError("the stratus command is not installed beside this Python")
    return found


async def _start_handlers(
    url: str,
    count: int,
    tmp: Path,
    procs: list[subprocess.Popen[bytes]],
    auth_dir: Path | None = None,
) -> list[subprocess.Popen[bytes]]:
    # Without auth_dir the service trusts every request (the write path
    # alone); with it, it verifies each request's token as in production,
    # with the handlers credentials of that key ring.
    auth = ["--insecure-no-auth"]
    if auth_dir is not None:
        from stratus.cli.creds import local_creds
        from stratus.events.natscreds import dumps, write_private

        creds = auth_dir / "handlers.creds"
        write_private(creds, dumps(local_creds(auth_dir, "handlers")))
        auth = ["--creds", str(creds)]
    label = f"handlers-{count}-{'auth' if auth_dir else 'open'}"
    return await start_service_processes(
        url, ["serve", "handlers", *auth], count, tmp, procs, label=label
    )


async def start_service_processes(
    url: str,
    argv: list[str],
    count: int,
    tmp: Path,
    procs: list[subprocess.Popen[bytes]],
    *,
    label: str,
) -> list[subprocess.Popen[bytes]]:
    """Start ``count`` processes of ``stratus --url URL ARGV...`` and wait until
    each says it is ready; their stderr goes to logs under ``tmp``."""
    started: list[subprocess.Popen[bytes]] = []
    logs: dict[int, Path] = {}
    what = " ".join(argv[:2])
    for i in range(count):
        log_path = tmp / f"{label}-{i}.log"
        p = _spawn([_stratus_binary(), "--url", url, *argv], tmp, log_path)
        logs[p.pid] = log_path
        procs.append(p)
        started.append(p)
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        for p in started:
            assert p.stdout is not None
            while True:
                left = deadline - time.monotonic()
                try:
                    line = await asyncio.wait_for(asyncio.to_thread(p.stdout.readline), left)
                except TimeoutError:
                    raise RuntimeError(
                        f"stratus {what} not ready in {READY_TIMEOUT_S:.0f}s"
                    ) from None
                if not line:
                    code = p.wait()
                    raise RuntimeError(f"stratus {what} exited with {code}: {_tail(logs[p.pid])}")
                if b"ready" in line:
                    break
            # Nothing reads stdout after this: drain it so a chatty service
            # can never block on a full pipe in the middle of a phase.
            threading.Thread(target=_drain, args=(p.stdout,), daemon=True).start()
    except BaseException:
        # Stopping them also ends a readline still blocked in its thread,
        # which asyncio.run would otherwise wait for at shutdown.
        for p in started:
            stop_process(p)
            if p.stdout is not None:
                p.stdout.close()
        raise
    return started


def _spawn(argv: list[str], cwd: Path, log_path: Path) -> subprocess.Popen[bytes]:
    # Appended: a restarted process (the chaos run) keeps its predecessor's log.
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log
        )


def _tail(path: Path, chars: int = 400) -> str:
    # The temp dir is gone when the report prints: quote the log instead.
    try:
        text = path.read_text(errors="replace").strip()
    except OSError:
        return "(no log)"
    return text[-chars:] or "(empty log)"


def _drain(stream: IO[bytes]) -> None:
    with contextlib.suppress(Exception), stream:
        while stream.read(65536):
            pass


async def _commands(
    clients: list[Client], tag: str, total: int, workers: int, max_s: float
) -> Load:
    async def op(w: int, i: int) -> None:
        await clients[w].command("tenant.create", {"name": f"{tag}-{i:07d}"})

    return await drive(op, total, workers, max_s, latencies=True)


async def _command_path(
    url: str, tmp: Path, opts: Options, report: Report, procs: list[subprocess.Popen[bytes]]
) -> None:
    baselines = {r.name: r for r in report.results}
    names = report.info.get("baselines")
    if not names:
        raise RuntimeError("skipped: the write path measured no baselines to compare with")
    raw1, rawk, rawc = (baselines[names[k]] for k in ("awaited", "in_flight", "clients"))
    clients: list[Client] = []
    try:
        for _ in range(opts.clients):
            clients.append(await Client.connect(url, timeout=10.0))
        for run_no, count in enumerate(opts.handlers):
            # Names must be fresh in every run, or tenant.create is refused.
            tag = f"r{run_no}h{count}"
            label = "1 handler proc" if count == 1 else f"{count} handler procs, queue group"
            started = await _start_handlers(url, count, tmp, procs)
            try:
                # Subscriptions settle and first-use costs (imports, caches)
                # are paid here, not in the measured phases.
                await asyncio.sleep(0.3)
                warm = await _commands(
                    clients, f"{tag}w", WARMUP_COMMANDS, opts.clients, opts.phase_seconds
                )
                if warm.errors:
                    report.failures.append(f"warm-up with {label}: {warm.first_error}")
                if run_no == 0:
                    seq = await _commands(clients, f"{tag}s", opts.commands, 1, opts.phase_seconds)
                    report.results.append(
                        compare(
                            result(f"tenant.create, 1 client ({label})", seq),
                            raw1,
                            label="raw awaited",
                        )
                    )
                par = await _commands(
                    clients, f"{tag}p", opts.commands, opts.clients, opts.phase_seconds
                )
                r = compare(
                    result(f"tenant.create, {opts.clients} clients ({label})", par),
                    rawk,
                    target=0.8,
                    label=f"raw {opts.in_flight} in flight",
                )
                if rawc.rate > 0 and not r.note:
                    r.note = f"{r.rate / rawc.rate:.2f}x raw {opts.clients} in flight"
                report.results.append(r)
            finally:
                for p in started:
                    stop_process(p)
        await _authenticated(url, tmp, opts, report, procs)
    finally:
        for c in clients:
            with contextlib.suppress(Exception):
                await c.close()


async def _authenticated(
    url: str,
    tmp: Path,
    opts: Options,
    report: Report,
    procs: list[subprocess.Popen[bytes]],
) -> None:
    """64 clients with every request's token verified, against the same
    without authentication. The two alternate in rounds (A B, B A, A B, B A) so a
    drift of the machine's speed does not land on one side."""
    auth_dir = tmp / "auth"
    keyring = KeyRing.load_or_create(auth_dir / "keys")
    store = await EventStore.connect(url)
    try:
        await publish_signing_keys(store, keyring)
    finally:
        await store.close()
    # One token per client, as separate CLI sessions would have.
    tokens = [keyring.sign("admin", "admin", ["admin"])[0] for _ in range(opts.clients)]
    sides = {
        "open": ([await Client.connect(url, timeout=10.0) for _ in tokens], None),
        "auth": ([await Client.connect(url, t, timeout=10.0) for t in tokens], auth_dir),
    }
    totals = {k: Load() for k in sides}
    per_round = max(1, opts.commands // AUTH_ROUNDS)
    try:
        for rnd in range(AUTH_ROUNDS):
            # A B, B A, ...: neither side always runs first in a round.
            order = list(sides.items()) if rnd % 2 == 0 else list(sides.items())[::-1]
            for side, (clients, auth) in order:
                started = await _start_handlers(url, 1, tmp, procs, auth)
                try:
                    await asyncio.sleep(0.3)
                    tag = f"a{side[0]}{rnd}"
                    warm = await _commands(
                        clients, f"{tag}w", WARMUP_COMMANDS // 2, opts.clients, opts.phase_seconds
                    )
                    if warm.errors:
                        report.failures.append(f"warm-up ({side}): {warm.first_error}")
                    got = await _commands(
                        clients, f"{tag}p", per_round, opts.clients, opts.phase_seconds
                    )
                    t = totals[side]
                    t.done += got.done
                    t.errors += got.errors
                    t.seconds += got.seconds
                    t.latencies.extend(got.latencies)
                    t.first_error = t.first_error or got.first_error
                finally:
                    for p in started:
                        stop_process(p)
        rounds = f"{AUTH_ROUNDS} alternating rounds"
        base = result(
            f"tenant.create, {opts.clients} clients (1 handler proc, no auth, {rounds})",
            totals["open"],
        )
        r = result(
            f"tenant.create, {opts.clients} clients (1 handler proc, tokens verified, {rounds})",
            totals["auth"],
        )
        report.results.extend([base, compare(r, base, target=0.9, label="no auth")])
    finally:
        for clients, _ in sides.values():
            for c in clients:
                with contextlib.suppress(Exception):
                    await c.close()
