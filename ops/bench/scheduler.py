"""Scheduler benchmark: placements per second at thousands of hosts.

``python -m stratus.ops.bench scheduler [--hosts 5000,10000] [--requests 5000]
[--replicas 1,2] [--nodes-to-score PCT] [--rate R] [--json]``

For each host count and replica count, on a nats-server of its own with
``sync_interval: always``: N hosts are registered through events and beat
into the heartbeat bucket; R ``stratus serve scheduler`` processes start;
M ``server.requested`` events of mixed sizes are appended (in batches of 50,
as the command handlers group concurrent commands) at ``--rate`` per second
(0: as fast as the log takes them). Latency is read from the log's own
timestamps: request stored → ``server.scheduled`` (or ``server.failed``)
stored. Then the log is folded to check that no host's claims ever exceeded
its capacity x ratio.

Each configuration runs twice in the same run: with the schedulers scoring
a sample (``hosts_to_score_pct`` = ``--nodes-to-score``, 0 adaptive: 5 % at
10,000 hosts) and with full scoring (100 %, every host filtered and
weighed), so the ratio column is sampled against full, measured side by
side. The spread each leaves (per-host utilisation, its standard deviation:
what ``scheduler replay`` reports) is folded from the log for both.
Filtering and weighing alone is timed in this process too (CPU time per
decision over the same host table, both ways). Fixed targets (issue 20:
3,000 placements/s at 10,000 hosts with 2 replicas) are noted beside.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from stratus.events.store import EventStore
from stratus.ops.bench.common import (
    Procs,
    Report,
    Result,
    percentile,
    positive,
    print_table,
    with_broker,
)
from stratus.ops.bench.foundation import start_service_processes

# Placements/s the issues ask for: (hosts, replicas) -> rate.
TARGETS = {(5000, 1): 1000.0, (10000, 1): 700.0, (10000, 2): 3000.0}
FULL = 100.0


@dataclass
class Options:
    hosts: tuple[int, ...] = (5000, 10000)
    requests: int = 5000
    replicas: tuple[int, ...] = (1, 2)
    rate: float = 0.0
    seed: int = 1
    decisions: int = 2000
    timeout_s: float = 120.0
    # Percent of hosts to find feasible before picking (0: adaptive); full
    # scoring (100) is measured beside it.
    nodes_to_score: float = 0.0
    configs: list[str] = field(default_factory=list)


def _requests(n: int, seed: int) -> list:
    from stratus.ops.bench.schedkit import server_request

    rng = random.Random(seed)
    sizes = [(1, 512), (1, 1024), (2, 2048), (2, 4096), (4, 8192), (8, 16384)]
    out = []
    for i in range(n):
        vcpus, ram = sizes[rng.randrange(len(sizes))]
        out.append(server_request(tenant=f"t{i % 20}", vcpus=vcpus, ram_mb=ram))
    return out


def _hosts(n: int, seed: int) -> list:
    from stratus.ops.bench.schedkit import host_event

    rng = random.Random(seed)
    return [
        host_event(
            f"h{i:05d}",
            vcpus=rng.choice([16, 32, 64]),
            ram_mb=rng.choice([65536, 131072, 262144]),
            labels={"rack": f"r{i % 40}"},
            zone=f"az{i % 3}",
        )
        for i in range(n)
    ]


def decide_cost(hosts: list, requests: list, count: int, pct: float = FULL) -> tuple[float, float]:
    """CPU microseconds per decision (filter + weigh only), and the p99."""
    from stratus.handlers.scheduler import Decider, HostTable, SchedulerConfig
    from stratus.handlers.scheduler.service import request_of

    table = HostTable()
    for seq, h in enumerate(hosts, 1):
        table.apply(seq, h)
    table.alive_until[: len(table)] = time.time() + 3600
    decider = Decider(SchedulerConfig(seed=1, hosts_to_score_pct=pct))
    costs = []
    for r in (requests * (count // max(1, len(requests)) + 1))[:count]:
        req = request_of(r)
        t0 = time.process_time_ns()
        decider.decide(table, req, use_holds=False)
        costs.append((time.process_time_ns() - t0) / 1000)
    return sum(costs) / len(costs), percentile(costs, 99) or 0.0


async def _spread(store: EventStore) -> dict:
    """Utilisation spread over the hosts, folded from the log as ``scheduler
    replay`` folds it (mean and standard deviation of max(vCPU, RAM) share)."""
    from stratus.handlers.scheduler.replay import spread
    from stratus.handlers.scheduler.table import SUBJECTS, HostTable

    t = HostTable()
    async for batch in store.read(0, subjects=list(SUBJECTS)):
        for rec in batch:
            t.apply(rec.seq, rec.decode())
    s = spread(t)
    return {"util_mean": s["mean"], "util_stddev": s["stddev"], "empty_hosts": s["empty"]}


async def _one(
    url: str, tmp: Path, procs: Procs, n_hosts: int, replicas: int, pct: float, opts: Options
):
    from stratus.events.resources import ServerFailed, ServerScheduled
    from stratus.ops.bench.schedkit import fold_claims, overcommitted, register_hosts

    store = await EventStore.connect(url)
    try:
        await store.ensure_stream()
        hosts = _hosts(n_hosts, opts.seed)
        await register_hosts(store, hosts, ttl=opts.timeout_s + 600)
        config = tmp / f"scheduler-{pct:g}.toml"
        config.write_text(f"hosts_to_score_pct = {float(pct)}\n")
        scheds = await start_service_processes(
            url,
            [
                "serve",
                "scheduler",
                "--insecure-no-auth",
                "--seed",
                str(opts.seed),
                "--config",
                str(config),
            ],
            replicas,
            tmp,
            procs,
            label=f"scheduler-{n_hosts}-{replicas}-{pct:g}",
        )
        reqs = _requests(opts.requests, opts.seed + n_hosts)
        ids = {r.aggregate.id for r in reqs}
        t0 = time.perf_counter()
        chunk = 50
        in_flight: set[asyncio.Task] = set()
        for i in range(0, len(reqs), chunk):
            if opts.rate > 0:
                due = t0 + i / opts.rate
                delay = due - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
            task = asyncio.create_task(store.append(reqs[i : i + chunk]))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
            if len(in_flight) >= 8:
                await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
        if in_flight:
            await asyncio.gather(*in_flight)
        # Outcomes from the log, with the log's own timestamps.
        asked: dict[str, int] = {}
        answered: dict[str, tuple[int, object]] = {}
        after = 0
        deadline = time.monotonic() + opts.timeout_s
        while len(answered) < len(ids) and time.monotonic() < deadline:
            got = False
            async for batch in store.read(after, subjects=["ev.*.server.*"], batch=5000):
                for rec in batch:
                    after = rec.seq
                    got = True
                    e = rec.decode()
                    sid = e.aggregate.id
                    if sid not in ids:
                        continue
                    if isinstance(e, (ServerScheduled, ServerFailed)):
                        answered.setdefault(sid, (rec.ts_ns, e))
                    elif sid not in asked:
                        asked[sid] = rec.ts_ns
            if not got:
                await asyncio.sleep(0.2)
        lat = [(answered[s][0] - asked[s]) / 1e9 for s in answered if s in asked]
        first = min(asked.values()) if asked else 0
        last = max(t for t, _ in answered.values()) if answered else 0
        seconds = max((last - first) / 1e9, 1e-9)
        failed = [e for _, e in answered.values() if isinstance(e, ServerFailed)]
        unplaced = len(failed)
        report_claims, _ = await fold_claims(store)
        over = overcommitted(report_claims)
        missing = len(ids) - len(answered)
        phases = _phases(scheds, tmp, f"scheduler-{n_hosts}-{replicas}-{pct:g}")
        return {
            "hosts": n_hosts,
            "replicas": replicas,
            "hosts_to_score_pct": pct,
            "placements": len(answered) - unplaced,
            "answered": len(answered),
            "seconds": seconds,
            "placements_per_s": (len(answered) - unplaced) / seconds,
            "p50_ms": (percentile(lat, 50) or 0) * 1000,
            "p99_ms": (percentile(lat, 99) or 0) * 1000,
            "overcommitted_hosts": len(over),
            "unplaced": unplaced,
            "unanswered": missing,
            "first_refusal": failed[0].reason if failed else "",
            "hosts_used": len(
                {e.host for _, e in answered.values() if isinstance(e, ServerScheduled)}
            ),
            **await _spread(store),
            "phases": phases,
        }
    finally:
        await store.close()


def _phases(procs: list, tmp: Path, label: str) -> list[dict]:
    """Stop the replicas and read where each one's time went (the phase
    totals its ``scheduler stopping`` log line carries)."""
    from stratus.ops.bench.common import stop_process

    out = []
    for i, p in enumerate(procs):
        stop_process(p)
        log_path = tmp / f"{label}-{i}.log"
        for line in log_path.read_text(errors="replace").splitlines():
            if "scheduler stopping" in line:
                out.append(_fields(line))
    return out


def _fields(line: str) -> dict:
    """``key=value`` pairs of a console log line (values as Python literals)."""
    import ast
    import re

    out: dict = {}
    for m in re.finditer(r"(\w+)=", line):
        rest = line[m.end() :]
        # The longest prefix that is a literal: a number, or a whole dict.
        for end in range(len(rest), 0, -1):
            if end < len(rest) and rest[end] != " ":
                continue
            try:
                out[m.group(1)] = ast.literal_eval(rest[:end])
                break
            except (ValueError, SyntaxError):
                continue
    return {
        k: out.get(k)
        for k in ("placed", "no_valid_host", "conflicts", "rounds", "lane_jumps", "phases")
    }


def _label(pct: float) -> str:
    return (
        "full scoring" if pct >= FULL else ("adaptive sample" if pct == 0 else f"{pct:g}% sample")
    )


def run(opts: Options) -> Report:
    report = Report("scheduler", opts)
    rows: list[dict] = []
    modes = [opts.nodes_to_score] + ([FULL] if opts.nodes_to_score < FULL else [])
    for n_hosts in opts.hosts:
        hosts = _hosts(n_hosts, opts.seed)
        costs = {}
        for pct in modes:
            mean_us, p99_us = decide_cost(hosts, _requests(200, opts.seed), opts.decisions, pct)
            costs[pct] = mean_us
            report.info[f"decide_cpu_us_{n_hosts}_{pct:g}"] = {
                "mean": round(mean_us, 1),
                "p99": round(p99_us, 1),
            }
        if len(modes) > 1:
            report.info[f"decide_cpu_ratio_{n_hosts}"] = round(costs[FULL] / costs[modes[0]], 2)
        for replicas in opts.replicas:
            measured: dict[float, Result] = {}
            for pct in modes:
                holder: dict = {}

                async def body(
                    url: str, tmp: Path, procs: Procs, n=n_hosts, r=replicas, p=pct, out=holder
                ) -> None:
                    out["row"] = await _one(url, tmp, procs, n, r, p, opts)

                sub = Report("scheduler", opts)
                what = f"{n_hosts} hosts x {replicas}, {_label(pct)}"
                try:
                    with_broker(sub, body)
                except Exception as exc:  # one configuration failing must not hide the rest
                    report.failures.append(f"{what}: {type(exc).__name__}: {exc}")
                    continue
                report.info.setdefault("nats", sub.info)
                row = holder["row"]
                row["decide_cpu_us"] = round(costs[pct], 1)
                rows.append(row)
                target = TARGETS.get((n_hosts, replicas))
                res = Result(
                    f"placements, {n_hosts:,} hosts, {replicas} replica(s), {_label(pct)}",
                    row["placements"],
                    row["seconds"],
                    errors=row["unanswered"],
                    p50_ms=row["p50_ms"],
                    p99_ms=row["p99_ms"],
                    note=(
                        f"overcommitted_hosts={row['overcommitted_hosts']} "
                        f"unplaced={row['unplaced']} hosts_used={row['hosts_used']} "
                        f"util stddev={row['util_stddev']} mean={row['util_mean']}; "
                        f"filter+weigh {costs[pct]:.0f} us CPU/decision"
                        + (f"; target {target:,.0f}/s" if target else "")
                        + (
                            f"; first refusal: {row['first_refusal'][:80]}"
                            if row["unplaced"]
                            else ""
                        )
                    ),
                )
                measured[pct] = res
                if row["overcommitted_hosts"]:
                    report.failures.append(f"{what}: hosts overcommitted")
                if row["unanswered"]:
                    report.failures.append(f"{what}: {row['unanswered']} unanswered")
                report.results.append(res)
            sampled, full = measured.get(modes[0]), measured.get(FULL)
            if sampled is not None and full is not None and sampled is not full and full.rate:
                # Sampled against full scoring, both measured in this run.
                sampled.baseline = f"full scoring {full.rate:,.0f}/s"
                sampled.ratio = sampled.rate / full.rate
    report.info["rows"] = rows
    return report


def _ints(text: str) -> tuple[int, ...]:
    try:
        v = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError("expected numbers separated by commas") from None
    if not v or min(v) < 1:
        raise argparse.ArgumentTypeError("expected positive numbers")
    return v


def _pct(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError("expected a percentage") from None
    if not 0 <= v <= 100:
        raise argparse.ArgumentTypeError("expected 0 (adaptive) to 100 (full scoring)")
    return v


def main(argv: list[str] | None = None) -> int:
    d = Options()
    p = argparse.ArgumentParser(
        prog="python -m stratus.ops.bench scheduler",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--hosts", type=_ints, default=d.hosts, help="host counts, e.g. 5000,10000")
    p.add_argument("--requests", type=positive, default=d.requests)
    p.add_argument("--replicas", type=_ints, default=d.replicas, help="replica counts, e.g. 1,2")
    p.add_argument("--rate", type=float, default=d.rate, help="requests/s offered (0: unpaced)")
    p.add_argument(
        "--nodes-to-score",
        type=_pct,
        default=d.nodes_to_score,
        metavar="PCT",
        help="percent of hosts to find feasible before picking (0: adaptive); "
        "full scoring (100) is measured beside it",
    )
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--json", action="store_true")
    p.add_argument("--strict", action="store_true", help="exit 2 when a target is missed")
    a = p.parse_args(argv)
    opts = Options(
        hosts=a.hosts,
        requests=a.requests,
        replicas=a.replicas,
        rate=a.rate,
        seed=a.seed,
        nodes_to_score=a.nodes_to_score,
    )
    start = time.perf_counter()
    report = run(opts)
    wall = time.perf_counter() - start
    if a.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        nats = report.info.get("nats", {})
        costs = ", ".join(
            f"{k.split('_')[3]} hosts {_label(float(k.split('_')[4]))} {v['mean']} us "
            f"(p99 {v['p99']})"
            for k, v in report.info.items()
            if k.startswith("decide_cpu_us_")
        )
        caption = (
            f"nats-server sync_interval: {nats.get('sync_interval')}, {nats.get('cpus')} CPUs, "
            f"Python {nats.get('python')}; {opts.requests:,} requests per row, offered "
            f"{'unpaced' if not opts.rate else f'{opts.rate:,.0f}/s'}; latency = request stored "
            f"-> scheduled stored; filter+weigh CPU per decision: {costs}; wall {wall:.0f} s"
        )
        print_table("Stratus scheduler benchmark", report.results, caption)
        for f in report.failures:
            print(f"FAILED: {f}", file=sys.stderr)
    if report.failures:
        return 1
    if a.strict and any(r.met is False for r in report.results):
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
