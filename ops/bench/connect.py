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

Options: ``--connects N`` per row and round (default 100), ``--rounds R``
(default 4), ``--json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import nats

from stratus.ops.bench.common import machine_facts, percentile

PASSWORD = "bench-connect-pw"


async def _timed(op: Callable[[], Awaitable[Any]], n: int, into: list[float]) -> None:
    for _ in range(n):
        t0 = time.perf_counter()
        await op()
        into.append(time.perf_counter() - t0)


async def _bench(tmp: Path, connects: int, rounds: int) -> dict[str, Any]:
    from stratus.cli.client import Client
    from stratus.cli.runtime import Stack
    from stratus.events.broker import EmbeddedNats

    plain = EmbeddedNats(tmp / "plain", host="127.0.0.1", log_file=str(tmp / "plain.log"))
    plain_url = await asyncio.to_thread(plain.start)
    stack = Stack(tmp / "up", port=0, admin_password=PASSWORD, scheduler_replicas=0)
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
        out = []
        for name, ts in rows.items():
            mean = sum(ts) / len(ts)
            out.append(
                {
                    "row": name,
                    "count": len(ts),
                    "mean_ms": round(mean * 1e3, 3),
                    "p50_ms": round((percentile(ts, 50) or 0) * 1e3, 3),
                    "p99_ms": round((percentile(ts, 99) or 0) * 1e3, 3),
                    "vs_baseline": round(mean / base, 2),
                }
            )
        return {
            "benchmark": "connect",
            "info": {**machine_facts(), "connects": connects, "rounds": rounds},
            "rows": out,
            "callout": {"admitted": stack.callout.admitted if stack.callout else None},
        }
    finally:
        await stack.stop()
        await asyncio.to_thread(plain.stop)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m stratus.ops.bench.connect", description=__doc__)
    p.add_argument("--connects", type=int, default=100)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="stratus-bench-connect-"))
    try:
        result = asyncio.run(_bench(tmp, max(args.connects, 1), max(args.rounds, 1)))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"connect cost ({result['info']['connects']} x {result['info']['rounds']} rounds)")
    for r in result["rows"]:
        print(
            f"  {r['row']:<30} mean {r['mean_ms']:8.3f} ms  p50 {r['p50_ms']:8.3f}"
            f"  p99 {r['p99_ms']:8.3f}  x{r['vs_baseline']:.2f} of baseline"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
