"""What the auth callout costs a connection: ``python -m stratus.ops.bench.connect``.

Every CLI command opens one connection, which the broker now admits by
asking the auth callout (a round trip to a Stratus service that verifies
the token, plus a fresh nkey signing the nonce). Rows, measured in this one
run on this machine, alternating in rounds (A B, B A, ...) so drift in the
machine's load falls on both alike:

* baseline: ``nats.connect`` to a nats-server without authentication (what
  the CLI did before: the shared ``client`` user was the no-auth user), then
  close;
* callout: ``Client.connect(url, token)`` to a ``stratus up`` stack (token,
  per-connection nkey, the callout's answer), then close;
* callout + request: the same, plus one ``q.status`` (a CLI command's
  whole connection life).

Then a connect storm: ``--storm N`` connections opened at once (default
100; 0: none), ``--storm-rounds`` times, to each broker (alternating which
goes first): the latency of each connect (baseline: no-auth; callout:
token), connects that failed, and from the callout itself how long each
answer took from the request's arrival (``handled``) and how many requests
had expired before it answered them (``late``: nats-server had given up
and the client saw an authorization timeout).

The storm's clients run in a process of their own, as clients do; with
``--busy``, in the callout's own process instead, whose event loop then
waits behind their work (keys, signatures, sockets): the callout's loop
kept busy, as a loaded ``stratus up``'s is by its services. With ``--load
N`` (default 4), N clients create tenants as fast as they are answered for
the whole of the storms: the callout shares ``stratus up``'s process with
the handlers and the projector, as it does there.

Options: ``--connects N`` per row and round (default 100), ``--rounds R``
(default 4), ``--storm N``, ``--storm-rounds R`` (default 3), ``--load N``,
``--busy``, ``--callout-on-main-loop`` (the callout on the services'
event loop, as before it had one of its own: the comparison), ``--json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import nats

from stratus.ops.bench.common import bench_logs, machine_facts, percentile

PASSWORD = "bench-connect-pw"


async def _timed(op: Callable[[], Awaitable[Any]], n: int, into: list[float]) -> None:
    for _ in range(n):
        t0 = time.perf_counter()
        await op()
        into.append(time.perf_counter() - t0)


def _row(name: str, ts: list[float], base: float | None = None, **extra: Any) -> dict[str, Any]:
    mean = sum(ts) / len(ts) if ts else 0.0
    out: dict[str, Any] = {
        "row": name,
        "count": len(ts),
        "mean_ms": round(mean * 1e3, 3),
        "p50_ms": round((percentile(ts, 50) or 0) * 1e3, 3),
        "p99_ms": round((percentile(ts, 99) or 0) * 1e3, 3),
        "max_ms": round(max(ts, default=0) * 1e3, 3),
    }
    if base is not None:
        out["vs_baseline"] = round(mean / base, 2) if base else None
    return {**out, **extra}


async def _storm(op: Callable[[], Awaitable[Any]], n: int, into: list[float]) -> int:
    """``n`` of ``op`` at once; their latencies into ``into``; how many failed."""

    async def one() -> None:
        t0 = time.perf_counter()
        await op()
        into.append(time.perf_counter() - t0)

    results = await asyncio.gather(*(one() for _ in range(n)), return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:  # (the first, to say why)
        print(
            f"storm: {len(errors)} failed: {type(errors[0]).__name__} {errors[0]}", file=sys.stderr
        )
    return len(errors)


async def _storm_here(url: str, token: str, n: int) -> dict[str, Any]:
    """The storm itself (run in a child process: ``--storm-client``): ``n``
    connects at once (with ``token``: as the CLI, through the callout; without:
    plain nats-py), all held open until the last is in, then closed."""
    from stratus.cli.client import Client

    opened: list[Callable[[], Awaitable[Any]]] = []

    async def connect() -> None:
        if token:
            cl = await Client.connect(url, token, timeout=10)
            opened.append(cl.nc.close)
        else:
            nc = await nats.connect(url, allow_reconnect=False, connect_timeout=10)
            opened.append(nc.close)

    into: list[float] = []
    failed = await _storm(connect, n, into)
    await asyncio.gather(*(close() for close in opened), return_exceptions=True)
    return {"latencies": into, "failed": failed}


async def _storm_child(url: str, token: str, n: int) -> tuple[list[float], int]:
    """A storm from a process of its own, as clients are: the callout's
    process does none of the clients' work (keys, signatures, sockets)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "stratus.ops.bench.connect",
        "--storm-client",
        url,
        str(n),
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "STRATUS_BENCH_TOKEN": token},
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 300)
    if proc.returncode:
        raise RuntimeError(f"storm client exited with {proc.returncode}")
    got = json.loads(out)
    return got["latencies"], got["failed"]


async def _load(url: str, token: str, n: int, stop: asyncio.Event) -> int:
    """``n`` clients creating tenants until ``stop``; how many were created."""
    from stratus.cli.client import Client

    done = 0

    async def one(i: int) -> None:
        nonlocal done
        c = await Client.connect(url, token, timeout=30)
        try:
            for k in range(100_000):  # bounded; ends with ``stop``
                if stop.is_set():
                    return
                await c.command("tenant.create", {"name": f"load-{i}-{k}"})
                done += 1
        finally:
            await c.nc.close()

    await asyncio.gather(*(one(i) for i in range(n)))
    return done


async def _bench(
    tmp: Path,
    connects: int,
    rounds: int,
    storm: int = 0,
    storm_rounds: int = 3,
    load: int = 0,
    busy: bool = False,
    callout_thread: bool = True,
) -> dict[str, Any]:
    from stratus.cli.client import Client
    from stratus.cli.runtime import Stack
    from stratus.events.broker import EmbeddedNats

    plain = EmbeddedNats(tmp / "plain", host="127.0.0.1", log_file=str(tmp / "plain.log"))
    plain_url = await asyncio.to_thread(plain.start)
    stack = Stack(
        tmp / "up",
        port=0,
        admin_password=PASSWORD,
        scheduler_replicas=0,
        callout_thread=callout_thread,
    )
    try:
        url = await stack.start()
        anon = await Client.connect(url)
        token = (await anon.command("auth.login", {"user": "admin", "password": PASSWORD})).data[
            "token"
        ]
        await anon.close()

        async def baseline() -> None:
            nc = await nats.connect(plain_url, allow_reconnect=False)
            await nc.close()

        async def callout() -> None:
            c = await Client.connect(url, token)
            await c.nc.close()

        async def callout_request() -> None:
            c = await Client.connect(url, token)
            await c.query("status", {"parts": False})
            await c.nc.close()

        rows: dict[str, list[float]] = {
            "baseline: no-auth connect": [],
            "callout: token connect": [],
            "callout: connect + q.status": [],
        }
        ops = list(zip(rows.values(), (baseline, callout, callout_request), strict=True))
        for _, op in ops:  # warm-up, untimed
            await _timed(op, 10, [])
        for r in range(rounds):
            for into, op in ops if r % 2 == 0 else reversed(ops):
                await _timed(op, connects, into)
        base = sum(rows["baseline: no-auth connect"]) / len(rows["baseline: no-auth connect"])
        out = [_row(name, ts, base) for name, ts in rows.items()]
        callout_stats: dict[str, Any] = {}
        if storm:
            assert stack.callout is not None
            c = stack.callout
            c.handled_s.clear()
            late0 = c.late
            storms: dict[str, list[float]] = {"storm baseline": [], "storm callout": []}
            failed = dict.fromkeys(storms, 0)

            pairs = list(zip(storms, ((plain_url, ""), (url, token)), strict=True))
            stop = asyncio.Event()
            loader = asyncio.create_task(_load(url, token, load, stop))
            started = time.perf_counter()
            try:
                for r in range(storm_rounds):
                    for name, (to, tok) in pairs if r % 2 == 0 else reversed(pairs):
                        if busy:
                            got = await _storm_here(to, tok, storm)
                            ts, bad = got["latencies"], got["failed"]
                        else:
                            ts, bad = await _storm_child(to, tok, storm)
                        storms[name] += ts
                        failed[name] += bad
            finally:
                stop.set()
                created = await loader
            callout_stats["load"] = {
                "clients": load,
                "commands": created,
                "per_s": round(created / (time.perf_counter() - started), 1),
            }
            sbase = sum(storms["storm baseline"]) / max(len(storms["storm baseline"]), 1)
            out += [
                _row(f"{name}: {storm} at once", ts, sbase, failed=failed[name])
                for name, ts in storms.items()
            ]
            callout_stats |= {
                "handled": _row("callout handling (arrival to answer)", list(c.handled_s)),
                "late": c.late - late0,
            }
        return {
            "benchmark": "connect",
            "info": {
                **machine_facts(),
                "connects": connects,
                "rounds": rounds,
                "storm": storm,
                "storm_rounds": storm_rounds,
                "load": load,
                "storm_from": "the callout's process (--busy)" if busy else "a child process",
                "callout": "own thread and loop" if callout_thread else "the services' loop",
            },
            "rows": out,
            "callout": {
                "admitted": stack.callout.admitted if stack.callout else None,
                **callout_stats,
            },
        }
    finally:
        await stack.stop()
        await asyncio.to_thread(plain.stop)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--storm-client"]:  # (the child process of a storm)
        url, n = argv[1], int(argv[2])
        got = asyncio.run(_storm_here(url, os.environ.get("STRATUS_BENCH_TOKEN", ""), n))
        print(json.dumps(got))
        return 0
    bench_logs()
    p = argparse.ArgumentParser(prog="python -m stratus.ops.bench.connect", description=__doc__)
    p.add_argument("--connects", type=int, default=100)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--storm", type=int, default=100)
    p.add_argument("--storm-rounds", type=int, default=3)
    p.add_argument("--load", type=int, default=4)
    p.add_argument(
        "--busy",
        action="store_true",
        help="storm from the callout's own process: its event loop busy with the clients' work",
    )
    p.add_argument(
        "--callout-on-main-loop",
        action="store_true",
        help="the callout on the services' event loop (as before it had a thread of its own)",
    )
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="stratus-bench-connect-"))
    try:
        result = asyncio.run(
            _bench(
                tmp,
                max(args.connects, 1),
                max(args.rounds, 1),
                max(args.storm, 0),
                max(args.storm_rounds, 1),
                max(args.load, 0),
                args.busy,
                not args.callout_on_main_loop,
            )
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"connect cost ({result['info']['connects']} x {result['info']['rounds']} rounds)")
    for r in result["rows"]:
        failed = f"  failed {r['failed']}" if "failed" in r else ""
        print(
            f"  {r['row']:<34} mean {r['mean_ms']:8.3f} ms  p50 {r['p50_ms']:8.3f}"
            f"  p99 {r['p99_ms']:8.3f}  max {r['max_ms']:8.3f}"
            f"  x{r['vs_baseline'] or 0:.2f} of baseline{failed}"
        )
    c = result["callout"]
    if "handled" in c:
        h = c["handled"]
        print(
            f"  callout answers in the storms: {h['count']}, p50 {h['p50_ms']:.3f} ms, "
            f"p99 {h['p99_ms']:.3f} ms, max {h['max_ms']:.3f} ms; expired before answered: "
            f"{c['late']}; load: {c['load']['clients']} clients, {c['load']['per_s']} "
            "commands/s during the storms"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
