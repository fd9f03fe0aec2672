"""The integrations benchmark: how soon integrations see an event, and webhook fan-out.

``python -m stratus.ops.bench integrations [--rate N] [--seconds S] [--subs N] [--json]``

One ``Stack`` (what ``stratus up`` runs) in a temporary directory. Rows:

* latency phase: ``quota.set`` events appended (``EventStore.append``, as a
  handler does once it has decided) at ``--rate`` a second for
  ``--seconds``; for each event, the time from just before its append (the
  event's ``at``) until
  - a core NATS subscriber of the service user sees it (the baseline: the
    broker alone),
  - a tenant integration (its own credentials, a durable pull consumer)
    receives it,
  - a webhook receiver on loopback receives the signed CloudEvent;
* fan-out phase: ``--subs`` webhook subscriptions, ``--fanout-events``
  events appended at once; deliveries a second until every subscription has
  every event (each subscription's in log order, checked), next to raw
  aiohttp POSTs of the same body to the same receiver with as many in
  flight (the same-run baseline).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import pairwise
from pathlib import Path
from typing import Any

import aiohttp
import nats
import nats.errors
from aiohttp import web

from stratus.ops.bench.common import Load, Report, compare, positive, print_table, result

PASSWORD = "bench-admin-password"
# Webhook fan-out against raw POSTs with as many in flight (issue 17).
TARGET = 0.5


@dataclass
class Options:
    rate: int = 500
    seconds: float = 10.0
    subs: int = 100
    fanout_events: int = 100
    rounds: int = 5
    # No phase waits longer than this for its deliveries.
    phase_seconds: float = 120.0


class Receiver:
    """An aiohttp server on loopback counting POSTs (and when each came)."""

    def __init__(self) -> None:
        self.arrivals: list[tuple[float, dict]] = []
        # path -> the stream sequences it got, in arrival order (fan-out phase)
        self.order: dict[str, list[int]] = {}
        self.count = 0
        self.keep = True
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def _post(self, request: web.Request) -> web.Response:
        body = await request.read()
        now = time.time()
        self.count += 1
        ce = json.loads(body)  # the raw baseline's receiver does this too
        if self.keep:
            self.arrivals.append((now, ce))
        elif "stratusseq" in ce and request.path != "/raw":
            self.order.setdefault(request.path, []).append(ce["stratusseq"])
        return web.Response(status=204)

    async def start(self) -> Receiver:
        app = web.Application()
        app.router.add_post("/{name}", self._post)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


async def _until(pred: Callable[[], bool], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not pred():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


def _load(latencies_s: list[float], seconds: float, expected: int) -> Load:
    load = Load(done=len(latencies_s), seconds=seconds, latencies=latencies_s)
    load.errors = max(0, expected - len(latencies_s))
    if load.errors:
        load.first_error = f"{load.errors} of {expected} never arrived"
    return load


async def _raw_posts(http: Any, url: str, body: bytes, n: int, in_flight: int) -> Load:
    """The baseline: ``n`` POSTs of ``body``, ``in_flight`` at a time, one session."""
    queue = iter(range(n))

    async def worker() -> None:
        for _ in queue:
            async with http.post(url, data=body) as resp:
                await resp.read()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(in_flight)))
    return Load(done=n, seconds=time.perf_counter() - t0)


def _total(loads: list[Load]) -> Load:
    out = Load(
        done=sum(x.done for x in loads),
        seconds=sum(x.seconds for x in loads),
        errors=sum(x.errors for x in loads),
    )
    out.first_error = next((x.first_error for x in loads if x.first_error), None)
    return out


def quota_event(i: int) -> Any:
    from stratus.events.model import Cause
    from stratus.events.resources import QuotaSet

    cause = Cause(actor="bench", correlation_id=f"bench-{i}", causation_id=f"bench-{i}")
    return cause.make(QuotaSet, "acme", "quota", "acme", limits={"instances": i})


async def _bench(opts: Options, report: Report, tmp: Path) -> None:
    from stratus.cli.client import Client
    from stratus.cli.integrations import connect_info, wait_usable
    from stratus.cli.runtime import Stack
    from stratus.events.catalog import CODEC

    # The receiver is on loopback, which webhooks reach only when allowed.
    stack = Stack(tmp / "data", port=0, admin_password=PASSWORD, webhook_allow=["127.0.0.1/32"])
    await stack.start()
    rx = await Receiver().start()
    client = nc_int = None
    tasks: list[asyncio.Task[Any]] = []
    try:
        assert stack.url is not None and stack.store is not None
        report.info["nats_url"] = stack.url
        client = await Client.connect(stack.url)
        client.token = (
            await client.command("auth.login", {"user": "admin", "password": PASSWORD})
        ).data["token"]
        await client.command("tenant.create", {"name": "acme"})
        password = secrets.token_urlsafe(32)
        body = {"tenant": "acme", "name": "bench", "secret": password}
        created = (await client.command("integration.create", body)).data
        info = connect_info(stack.url, created, password)
        if await wait_usable(info) is None:
            raise RuntimeError("the integration's credential never worked")
        await client.command(
            "webhook.create",
            {"tenant": "acme", "name": "lat", "url": f"{rx.url}/lat", "types": ["quota.*"]},
        )

        # -- latency at a steady rate -------------------------------------------------
        core: list[float] = []
        integ: list[float] = []

        async def on_core(msg: Any) -> None:
            core.append(time.time() - CODEC.decode(msg.data).at.timestamp())

        core_sub = await stack.store.nc.subscribe("ev.acme.quota.>", cb=on_core)
        nc_int = await nats.connect(info["url"], **info["connect"])
        js = nc_int.jetstream()
        consumer = await js.consumer_info(info["stream"], info["durable"])

        async def on_event(m: Any) -> None:
            event = CODEC.decode(m.data)
            if event.type_name() == "quota.set":
                integ.append(time.time() - event.at.timestamp())
            await m.ack()

        await js.subscribe_bind(
            info["stream"], consumer.config, info["durable"], cb=on_event, manual_ack=True
        )

        await asyncio.sleep(1.0)  # the webhook worker and the consumer are up
        total = int(opts.rate * opts.seconds)
        sent = 0
        failed = 0

        # What a handler does once it has decided: append the event. Driven
        # directly, so the rate is the one asked for whatever the handlers'
        # decision cost (the foundation benchmark measures that).
        async def one(i: int) -> None:
            nonlocal sent, failed
            try:
                await stack.store.append([quota_event(i)])
                sent += 1
            except Exception:
                failed += 1

        t0 = time.perf_counter()
        pending: set[asyncio.Task[None]] = set()
        for i in range(total):
            delay = t0 + i / opts.rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            t = asyncio.create_task(one(i))
            pending.add(t)
            t.add_done_callback(pending.discard)
        if pending:
            await asyncio.wait(pending, timeout=opts.phase_seconds)
        send_s = time.perf_counter() - t0
        await _until(
            lambda: len(integ) >= sent and len(rx.arrivals) >= sent and len(core) >= sent,
            opts.phase_seconds,
        )
        hook = [now - datetime.fromisoformat(ce["time"]).timestamp() for now, ce in rx.arrivals]
        report.info["latency_phase"] = {
            "events": total,
            "appended": sent,
            "failed": failed,
            "seconds": round(send_s, 2),
            "achieved_rate": round(sent / send_s, 1),
        }
        base = result(
            "core subscriber (broker alone)", _load(core, send_s, sent), note="service user"
        )
        rows = [
            base,
            result("tenant integration, its consumer", _load(integ, send_s, sent)),
            result("webhook CloudEvent on loopback", _load(hook, send_s, sent)),
        ]
        for r in rows[1:]:
            r.note = (
                f"p50 +{r.p50_ms - base.p50_ms:.1f} ms over the broker"
                if r.p50_ms is not None and base.p50_ms is not None
                else r.note
            )
        report.results.extend(rows)
        await core_sub.unsubscribe()

        # -- webhook fan-out ----------------------------------------------------------
        await client.command("webhook.delete", {"tenant": "acme", "ref": "lat"})
        rx.keep = False
        rx.count = 0
        for i in range(opts.subs):
            await client.command(
                "webhook.create",
                {"tenant": "acme", "name": f"f{i}", "url": f"{rx.url}/f{i}", "types": ["quota.*"]},
            )
        assert stack.webhooks is not None
        await _until(lambda: len(stack.webhooks.workers) >= opts.subs, 30)
        await asyncio.sleep(1.0)
        want = opts.subs * opts.fanout_events
        sample = json.dumps(rx.arrivals[-1][1] if rx.arrivals else {"x": 1}).encode()
        rx.order.clear()
        # Rounds alternate baseline and fan-out, so a neighbour's load on a
        # shared machine falls on both alike.
        fans: list[Load] = []
        raws: list[Load] = []
        cpu = {"fan": 0.0, "raw": 0.0}
        async with aiohttp.ClientSession() as http:
            for r in range(opts.rounds):
                c0 = time.process_time()
                raws.append(await _raw_posts(http, f"{rx.url}/raw", sample, want, opts.subs))
                cpu["raw"] += time.process_time() - c0
                rx.count = 0
                c0 = time.process_time()
                t0 = time.perf_counter()
                # The round's events land at once, as one atomic batch (one
                # disk sync): the fan-out is measured, not the log's append rate.
                first = 5000 + r * opts.fanout_events
                await stack.store.append(
                    [quota_event(first + i) for i in range(opts.fanout_events)]
                )
                ok = await _until(lambda: rx.count >= want, opts.phase_seconds)
                fans.append(
                    Load(
                        done=rx.count,
                        seconds=time.perf_counter() - t0,
                        errors=0 if ok else want - rx.count,
                    )
                )
                cpu["fan"] += time.process_time() - c0
        fan = _total(fans)
        # A retry repeats a sequence; an earlier one after a later is out of order.
        unordered = [p for p, seqs in rx.order.items() if any(a > b for a, b in pairwise(seqs))]
        every = opts.rounds * opts.fanout_events
        short = [path for path, seqs in rx.order.items() if len(set(seqs)) < every]
        if unordered or short or len(rx.order) != opts.subs:
            fan.errors += len(unordered) + len(short) + abs(opts.subs - len(rx.order))
            fan.first_error = (
                f"{len(unordered)} subscriptions out of order, {len(short)} missing events, "
                f"{len(rx.order)} of {opts.subs} reached"
            )
        per_round = ", ".join(
            f"{f.done / f.seconds / (w.done / w.seconds):.2f}x"
            for f, w in zip(fans, raws, strict=True)
        )
        fan_row = result(f"webhook fan-out, {opts.subs} subscriptions", fan)
        fan_row.note = (
            f"{opts.rounds} rounds of {opts.fanout_events} events x {opts.subs} subscriptions "
            f"(rounds {per_round}); {cpu['fan'] / max(1, fan.done) * 1e6:.0f} us CPU each here"
        )
        raw = result(f"raw aiohttp POST, {opts.subs} in flight", _total(raws))
        raw.note = f"{cpu['raw'] / max(1, raw.count) * 1e6:.0f} us CPU each here"
        report.results.extend([raw, compare(fan_row, raw, target=TARGET, label="raw POST")])
        report.info["fanout_rounds"] = [
            {
                "fanout_per_s": round(f.done / f.seconds, 1),
                "raw_per_s": round(w.done / w.seconds, 1),
            }
            for f, w in zip(fans, raws, strict=True)
        ]
    finally:
        for t in tasks:
            t.cancel()
            with contextlib.suppress(BaseException):
                await t
        if nc_int is not None:
            await nc_int.close()
        if client is not None:
            await client.close()
        await stack.stop()
        await rx.stop()


def run(opts: Options) -> Report:
    report = Report("integrations", opts)
    report.info.update(
        {
            "cpus": os.cpu_count(),
            "loadavg": " ".join(f"{x:.2f}" for x in os.getloadavg()),
            "python": platform.python_version(),
            "started": datetime.now(UTC).isoformat(timespec="seconds"),
            "sync_interval": "always",
        }
    )
    tmp = Path(tempfile.mkdtemp(prefix="stratus-bench-integrations-"))
    try:
        asyncio.run(_bench(opts, report, tmp))
    except Exception as exc:
        report.failures.append(f"{type(exc).__name__}: {exc}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report.failures += [f"{r.name}: {r.note}" for r in report.results if r.errors]
    return report


def main(argv: list[str] | None = None) -> int:
    d = Options()
    p = argparse.ArgumentParser(prog="python -m stratus.ops.bench integrations")
    p.add_argument("--rate", type=positive, default=d.rate, help="commands a second")
    p.add_argument("--seconds", type=float, default=d.seconds, help="latency phase length")
    p.add_argument("--subs", type=positive, default=d.subs, help="webhook subscriptions")
    p.add_argument("--fanout-events", type=positive, default=d.fanout_events)
    p.add_argument("--rounds", type=positive, default=d.rounds, help="fan-out rounds")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    opts = Options(a.rate, a.seconds, a.subs, a.fanout_events, a.rounds)
    start = time.perf_counter()
    report = run(opts)
    report.info["wall_seconds"] = round(time.perf_counter() - start, 1)
    if a.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        lp = report.info.get("latency_phase", {})
        caption = (
            f"{report.info.get('cpus')} CPUs, load {report.info.get('loadavg')}, Python "
            f"{report.info.get('python')}; latency phase: {lp.get('appended')} quota.set "
            f"appends at {lp.get('achieved_rate')}/s (asked {opts.rate}/s); latency from "
            f"just before each append; wall {report.info['wall_seconds']} s"
        )
        print_table("Stratus integrations benchmark", report.results, caption)
    for f in report.failures:
        print(f"FAILED: {f}", file=sys.stderr)
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
