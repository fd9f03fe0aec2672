"""Run the Stratus benchmarks: ``python -m stratus.ops.bench [SUITE] [--json]``.

SUITE is ``foundation`` (broker, write, command and read paths),
``identity`` (token verification and password hashing on one core),
``projections`` (rebuilds of a 1M-event log, time travel, quota-checked
server creation), ``scheduler`` (placements at 5,000 and 10,000 hosts) or
``compute`` (compute agents on libvirt's test driver: claim to running,
overlays against copies); with no SUITE all run, in that order. These run
only when named: ``network`` (the network agent on simulated hosts, as
root), ``integrations``, ``openstack`` (the OpenStack API against the
native path, and Tempest), ``images`` (image upload and download against
raw object-store put and get), ``console`` (live page latency, page cost),
``chaos`` (SIGKILL of each part of a deployment under load, then the log
checked; as root), ``containers`` (OCI containers under runc: create ->
running against ``runc run`` alone, disk of N containers against N copies;
as root) and ``cluster`` (a 3-node cluster with replicated services, each
part killed in turn; as root). ``python -m
stratus.ops.bench identity --help`` (or ``projections --help``) lists that
suite's options; the options below are foundation's.

Exit status: 0 when every phase ran without errors, 1 when one failed, 2
with ``--strict`` when a figure missed its target.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from stratus.ops.bench import (
    chaos,
    compute,
    console,
    containers,
    foundation,
    identity,
    images,
    integrations,
    network,
    openstack,
    projections,
    scheduler,
)
from stratus.ops.bench.common import bench_logs, positive, print_table

SUITES = (
    "foundation",
    "identity",
    "projections",
    "scheduler",
    "compute",
    "integrations",
    "images",
    "network",
    "console",
    "chaos",
    "openstack",
    "containers",
    "cluster",
)


def _counts(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError("expected numbers separated by commas") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError("expected positive numbers")
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    d = foundation.Options()
    p = argparse.ArgumentParser(
        prog="python -m stratus.ops.bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--events", type=positive, default=d.events, help="events to read back")
    p.add_argument("--commands", type=positive, default=d.commands, help="commands per client mode")
    p.add_argument(
        "--publishes",
        type=positive,
        default=d.publishes,
        help="awaited publishes and appends (twice as many in flight)",
    )
    p.add_argument("--clients", type=positive, default=d.clients, help="concurrent clients")
    p.add_argument(
        "--handlers",
        type=_counts,
        default=d.handlers,
        help="handler process counts to run the concurrent clients against, e.g. 1,2",
    )
    p.add_argument(
        "--phase-seconds",
        type=float,
        default=d.phase_seconds,
        help="no phase starts new work after this long",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object, no table")
    p.add_argument("--strict", action="store_true", help="exit 2 when a target is missed")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    bench_logs()
    suite = argv[0] if argv and argv[0] in SUITES else None
    if suite == "identity":
        # Only identity: its own options, table and JSON.
        return identity.main(argv[1:])
    if suite == "projections":
        return projections.main(argv[1:])
    if suite == "scheduler":
        return scheduler.main(argv[1:])
    if suite == "compute":
        return compute.main(argv[1:])
    if suite == "integrations":
        # Not part of the default run: its own stack, receivers and table.
        return integrations.main(argv[1:])
    if suite == "openstack":
        # Heavy (Tempest in its own venv): run by name only.
        return openstack.main(argv[1:])
    if suite == "images":
        # Its own `stratus up` and a 256 MiB file: run by name.
        return images.main(argv[1:])
    if suite == "console":
        # Not part of the default run: its own stack and table.
        return console.main(argv[1:])
    if suite == "network":
        # Root only (namespaces): run by name, not with the others.
        return network.main(argv[1:])
    if suite == "containers":
        # Root only (runc, overlay mounts): run by name.
        return containers.main(argv[1:])
    if suite == "cluster":
        # Root only: a 3-node cluster and replicated services, killed in turn.
        from stratus.ops.bench import cluster

        return cluster.main(argv[1:])
    if suite == "chaos":
        # Root only, kills what it starts: run by name, not with the others.
        return chaos.main(argv[1:])
    if suite is not None:
        argv = argv[1:]
    args = parse_args(argv)
    opts = foundation.Options(
        events=args.events,
        commands=args.commands,
        publishes=args.publishes,
        clients=args.clients,
        handlers=args.handlers,
        phase_seconds=args.phase_seconds,
    )
    start = time.perf_counter()
    report = foundation.run(opts)
    wall = time.perf_counter() - start
    report.info["wall_seconds"] = round(wall, 1)
    errors = [f"{r.name}: {r.errors} errors ({r.note})" for r in report.results if r.errors]
    failures = report.failures + errors
    id_report = None
    if suite is None:
        # Pure CPU, no broker: it runs after foundation has stopped its server.
        id_start = time.perf_counter()
        id_report = identity.run(identity.Options())
        id_report.info["wall_seconds"] = round(time.perf_counter() - id_start, 1)
        failures += id_report.failures
    if args.json:
        out = {"foundation": report.to_json()}
        if id_report is not None:
            out["identity"] = id_report.to_json()
        print(json.dumps(out, indent=2))
    else:
        info = report.info
        prefill = info.get("prefill", {})
        caption = (
            f"nats-server on {info.get('nats_url')} (sync_interval: {info.get('sync_interval')}), "
            f"{info.get('cpus')} CPUs, Python {info.get('python')}; "
            f"events {info.get('event_bytes')} bytes encoded; prefill of "
            f"{prefill.get('events', 0):,} events ({prefill.get('created', 0):,} created, "
            f"{prefill.get('renamed', 0):,} renamed) in {prefill.get('seconds')} s, not timed; "
            f"wall time {wall:.1f} s"
        )
        print_table("Stratus foundation benchmark", report.results, caption)
        if id_report is not None:
            identity.print_report(id_report, id_report.info["wall_seconds"])
        for f in failures:
            print(f"FAILED: {f}", file=sys.stderr)
    code = 0
    if failures:
        code = 1
    results = report.results + (id_report.results if id_report is not None else [])
    if not code and args.strict and any(r.met is False for r in results):
        code = 2
    if suite is None:
        # Last: its own broker, log and table (default sizes: 1M events).
        proj = projections.main(["--json"] if args.json else [])
        code = max(code, proj)
        sched = scheduler.main(["--json"] if args.json else [])
        code = max(code, sched)
        code = max(code, compute.main(["--json"] if args.json else []))
    return code


if __name__ == "__main__":
    sys.exit(main())
