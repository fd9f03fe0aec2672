"""The cluster run: a 3-node JetStream cluster, every service replicated as
separate processes, mixed commands from 8 clients while one part after
another is killed with SIGKILL; then the log is checked.

``python -m stratus.ops.bench cluster [--clients 8] [--window 12]
[--restart-after 3] [--settle 60] [--seed S] [--keep-failed] [--json]``

The deployment, each part its own process with its own data dir, as on
separate machines (root only: container instances need cgroups):

* three nats-servers (``events.broker.cluster_nodes``: loopback, free
  ports, ``sync_interval: always``), prepared by ``stratus init``'s own
  code (the log and every bucket at R3, the signing key, the first admin);
* ``serve handlers`` x2 (each with a copy of the signing keys), ``serve
  scheduler`` x2, ``serve projector`` + ``serve query`` x2 (each pair on
  its own SQLite store), ``serve compute-agent`` on 4 simulated hosts
  (container instances);
* every process connects to the URL list of all three nodes.

Eight clients (one-shot connections, as the CLI makes; an unanswered
command is sent again with its id) send the chaos run's mix (tenant,
network and container server create and delete, tight quotas). After a
warm-up, every ``--window`` seconds one fault, in turn:

``leader``         the node leading the stream ``EVENTS``
``handlers``       command handler replica 1
``scheduler``      the scheduler replica that has used the most CPU (the
                   one holding most placement work)
``projector``      projector 1 (with the proj branch's lease: the holder)
``compute-agent``  the agent of ``host-01``

each killed with SIGKILL and started again ``--restart-after`` seconds
later (a node on its store and ports, a process with its data dir).

Reported (JSON keys): ``acked``; ``lost`` (acknowledged commands whose
events are not on the log) and ``duplicated`` (commands appended twice),
both from the chaos run's checks; ``max_unavailable_s`` per fault (the
longest time after the kill, within its window, in which no command was
acknowledged; ``baseline_gap_s`` is the same figure over the warm-up, with
no fault, measured in the same run); ``digest_equal`` (both query nodes'
stores, caught up, equal a fresh rebuild from the log);
``overcommitted_hosts`` (hosts whose claims ever exceeded capacity),
``over_quota`` (events after which a tenant used more than its quota) and
``stuck`` (servers not final 60 s after the last restart); ``crashed``
(service processes that exited without being killed).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from stratus.cli import logs
from stratus.ops.bench.chaos import (
    FINAL,
    PASSWORD,
    Clients,
    LogFold,
    RunResult,
    Workload,
    _settle,
    _setup,
    command_checks,
    host_checks,
    remove_instances,
    tally,
)
from stratus.ops.bench.common import positive, stop_process

FAULTS = ("leader", "handlers", "scheduler", "projector", "compute-agent")
HOSTS = 4
NODES = 3
WARMUP_S = 8.0


@dataclass
class Options:
    clients: int = 8
    window_s: float = 12.0
    restart_after_s: float = 3.0
    settle_s: float = 60.0
    tenants: int = 6
    seed: int = 1
    keep_failed: bool = False


@dataclass
class Fault:
    kind: str
    target: str = ""
    at_s: float = 0.0
    restarted_after_s: float = 0.0
    max_unavailable_s: float | None = None
    # For the leader: seconds from the kill until another node leads the stream.
    new_leader_s: float | None = None
    # Attempts begun in the window that went unanswered (the client's
    # timeout or no responders), begun before the restart and after it.
    unanswered_before_restart: int = 0
    unanswered_after_restart: int = 0
    # Why, counted (the error's kind and the start of its message).
    unanswered_why: dict[str, int] = field(default_factory=dict)
    error: str = ""


@dataclass
class Outcome:
    commands: int = 0
    acked: int = 0
    refused: int = 0
    unresolved: int = 0
    retried: int = 0
    lost: int = 0
    duplicated: int = 0
    digest_equal: bool = False
    overcommitted_hosts: int = 0
    over_quota: int = 0
    stuck: int = 0
    orphaned: int = 0
    # Service processes that died without being killed (the other replica
    # of a killed one would leave nothing serving).
    crashed: int = 0
    baseline_gap_s: float | None = None
    faults: list[Fault] = field(default_factory=list)
    servers: dict[str, int] = field(default_factory=dict)
    details: dict[str, list[str]] = field(default_factory=dict)
    seconds: float = 0.0
    error: str = ""

    @property
    def ok(self) -> bool:
        counted = (self.lost, self.duplicated, self.overcommitted_hosts, self.over_quota)
        return (
            not self.error
            and not any(counted)
            and self.stuck == 0
            and self.crashed == 0
            and self.unresolved == 0
            and self.digest_equal
        )


class ClusterDeployment:
    """Three broker nodes (children of this process) and every service as
    its own ``stratus serve`` process with its own data dir."""

    def __init__(self, root: Path, seed: int) -> None:
        from stratus.cli.datadir import deployment_prefix

        self.root = root
        # Where credentials are issued from: the broker keys, the signing key.
        self.data_dir = root / "control"
        self.logs = root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.prefix = deployment_prefix(self.data_dir)
        self.hosts = {f"host-{i:02d}": root / f"agent-{i}" for i in range(1, HOSTS + 1)}
        self.nodes: list[Any] = []
        self.url = ""
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.argv: dict[str, list[str]] = {}
        for i in (1, 2):
            self.argv[f"handlers-{i}"] = ["serve", "handlers", "--data-dir", str(root / f"h{i}")]
            self.argv[f"scheduler-{i}"] = [
                *("serve", "scheduler", "--data-dir", str(root / f"s{i}")),
                *("--seed", str(seed + i)),
            ]
            # A projector and the query service reading its store: one
            # query node (SQLite: each node keeps its own projection).
            self.argv[f"projector-{i}"] = ["serve", "projector", "--data-dir", str(root / f"q{i}")]
            self.argv[f"query-{i}"] = ["serve", "query", "--data-dir", str(root / f"q{i}")]
        for host, d in self.hosts.items():
            self.argv[f"agent-{host}"] = [
                *("serve", "compute-agent", "--data-dir", str(d), "--host", host),
                *("--deployment", self.prefix, "--types", "container"),
                *("--vcpus", "16", "--ram-mb", "65536", "--disk-gb", "500"),
            ]

    async def start(self) -> None:
        from stratus.cli.runtime import auth_block, init_cloud
        from stratus.events.broker import cluster_nodes, start_nodes

        def make() -> list[Any]:
            return cluster_nodes(
                self.root / "nodes",
                NODES,
                name=self.prefix,
                extra_config=auth_block(self.data_dir),
                log_dir=self.logs,
            )

        self.nodes, urls = await start_nodes(make(), make)
        self.url = ",".join(urls)
        await init_cloud(self.url, self.data_dir, admin_password=PASSWORD)
        # The auth callout first: it admits every other process.
        self.argv = {"auth-callout": ["serve", "auth-callout"], **self.argv}
        for i in (1, 2):
            shutil.copytree(self.data_dir / "keys", self.root / f"h{i}" / "keys")
            for d in (f"s{i}", f"q{i}"):
                (self.root / d).mkdir(parents=True, exist_ok=True)
        for d in self.hosts.values():
            d.mkdir(parents=True, exist_ok=True)
        # The projectors first (the query nodes read their stores).
        names = list(self.argv)
        await self.start_service("auth-callout")
        first = [n for n in names if n.startswith(("projector", "handlers"))]
        await asyncio.gather(*(self.start_service(n) for n in first))
        rest = [n for n in names if n not in first and n != "auth-callout"]
        await asyncio.gather(*(self.start_service(n) for n in rest))

    def creds(self, name: str) -> Path:
        """The credentials file of service ``name``, issued from the data
        dir init used (as an operator would: `stratus credentials issue`)."""
        from stratus.cli.creds import local_creds
        from stratus.events.natscreds import dumps, write_private

        argv = self.argv[name]
        kind = argv[1]
        host = argv[argv.index("--host") + 1] if "--host" in argv else ""
        path = self.root / "creds" / f"{name}.creds"
        if not path.exists():
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            write_private(path, dumps(local_creds(self.data_dir, kind, host)))
        return path

    async def start_service(self, name: str) -> None:
        from stratus.ops.bench.foundation import start_service_processes

        argv = [*self.argv[name][:2], "--creds", str(self.creds(name)), *self.argv[name][2:]]
        (self.procs[name],) = await start_service_processes(
            self.url, argv, 1, self.logs, [], label=name
        )

    async def store(self) -> Any:
        from stratus.cli.creds import local_creds
        from stratus.events.store import EventStore

        creds = local_creds(self.data_dir, "handlers", ttl_s=3600)
        return await EventStore.connect(self.url, persistent=False, creds=creds)

    async def leader(self) -> str:
        from stratus.events.cluster import stream_cluster

        store = await self.store()
        try:
            return (await stream_cluster(store.js))["leader"]
        finally:
            await store.close()

    def busiest_scheduler(self) -> str:
        """The scheduler replica with the most CPU time: the one that has
        done most placements (replicas share one work consumer)."""

        def cpu(p: subprocess.Popen[bytes]) -> int:
            try:
                fields = Path(f"/proc/{p.pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                return -1
            return int(fields[11]) + int(fields[12])  # utime + stime

        return max(("scheduler-1", "scheduler-2"), key=lambda n: cpu(self.procs[n]))

    async def new_leader(self, old: str, since: float, limit: float = 60.0) -> float | None:
        """Seconds from ``since`` until a node other than ``old`` leads."""
        while time.monotonic() - since < limit:
            with contextlib.suppress(Exception):
                leader = await asyncio.wait_for(self.leader(), 0.5)
                if leader and leader != old:
                    return round(time.monotonic() - since, 2)
            await asyncio.sleep(0.1)
        return None

    async def fault(self, kind: str, restart_after: float, f: Fault) -> str:
        """Kill one part with SIGKILL, start it again ``restart_after``
        seconds later; what was killed."""
        if kind == "leader":
            leader = await self.leader()
            node = next((n for n in self.nodes if n.server_name == leader), None)
            if node is None:
                raise RuntimeError(f"the stream has no leader to kill ({leader!r})")
            node.kill()
            killed = time.monotonic()
            elected = asyncio.create_task(self.new_leader(leader, killed))
            await asyncio.sleep(restart_after)
            await node.restart_async()
            f.new_leader_s = await elected
            return leader
        name = {
            "handlers": "handlers-1",
            "scheduler": self.busiest_scheduler(),
            "projector": "projector-1",
            "compute-agent": "agent-host-01",
        }[kind]
        p = self.procs[name]
        p.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(5)
        await asyncio.sleep(restart_after)
        await self.start_service(name)
        return name

    def crashed(self) -> list[str]:
        """Services that exited on their own (a killed one was started again)."""
        return [
            f"{n} exited on its own with {p.returncode}"
            for n, p in self.procs.items()
            if p.poll() is not None
        ]

    def stop(self) -> list[str]:
        problems = []
        live = {n: p for n, p in self.procs.items() if p.poll() is None}
        for p in live.values():
            p.send_signal(signal.SIGTERM)
        for name, p in live.items():
            stop_process(p)
            if p.returncode not in (0, -signal.SIGTERM):
                problems.append(f"{name} exited with {p.returncode} on SIGTERM")
        for n in self.nodes:
            n.stop()
        remove_instances(self.hosts, self.prefix)
        return problems


def unavailable(acks: list[float], start: float, end: float) -> float:
    """The longest stretch of [start, end] without an acknowledgement."""
    inside = sorted(a for a in acks if start < a <= end)
    points = [start, *inside]
    gaps = [b - a for a, b in itertools.pairwise(points)]
    gaps.append(end - points[-1])
    return round(max(gaps), 2)


async def digest_check(dep: ClusterDeployment, out: Outcome) -> None:
    """Both query nodes' stores, caught up, against a fresh rebuild."""
    from stratus.projections.db import make_engine, sqlite_url
    from stratus.projections.projector import store_digest
    from stratus.projections.rebuild import build_store, live_store_path

    store = await dep.store()
    try:
        path = dep.root / "rebuild.db"
        built = await build_store(store, path)
    finally:
        await store.close()
    engine = make_engine(sqlite_url(path))
    try:
        _, want = await store_digest(engine)
    finally:
        await engine.dispose()
    equal = True
    for i in (1, 2):
        engine = make_engine(sqlite_url(live_store_path(dep.root / f"q{i}")))
        try:
            deadline = time.monotonic() + 60
            while True:
                seq, have = await store_digest(engine)
                if seq >= built.seq or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.5)
        finally:
            await engine.dispose()
        if seq != built.seq or have != want:
            equal = False
            out.details.setdefault("digest", []).append(
                f"query node {i}: {have} at {seq}; rebuilt {want} at {built.seq}"
            )
    out.digest_equal = equal


async def run_async(opts: Options, root: Path) -> Outcome:
    from stratus.events.resources import QUOTA_DEFAULTS
    from stratus.ops.bench.schedkit import fold_claims, overcommitted

    out = Outcome()
    dep = ClusterDeployment(root, opts.seed)
    t0 = time.monotonic()
    clients: Clients | None = None
    try:
        _say("starting 3 nodes and 14 service processes")
        await dep.start()
        token, tenants = await _setup(dep, opts, 1)  # type: ignore[arg-type]
        work = Workload(tenants, 10**9, random.Random(opts.seed), "c")
        clients = Clients(dep, token, work, opts.clients)  # type: ignore[arg-type]
        began = time.monotonic()
        # Until the last fault's window has passed (then no new commands).
        phase = asyncio.create_task(clients.run(began + 3600))
        await asyncio.sleep(WARMUP_S)
        kills: list[float] = []
        last_restart = time.monotonic()
        for kind in FAULTS:
            f = Fault(kind)
            out.faults.append(f)
            at = time.monotonic()
            kills.append(at)
            f.at_s = round(at - began, 2)
            _say(f"killing {kind}")
            try:
                f.target = await dep.fault(kind, opts.restart_after_s, f)
            except Exception as exc:
                f.error = f"{type(exc).__name__}: {exc}"[:300]
            last_restart = time.monotonic()
            f.restarted_after_s = round(last_restart - at, 2)
            await asyncio.sleep(max(0.0, at + opts.window_s - time.monotonic()))
        work.total = work.issued  # the commands in flight are the last
        await phase
        acks = [s.answered for s in clients.sent if s.outcome == "acked"]
        out.baseline_gap_s = unavailable(acks, began + 1.0, began + WARMUP_S)
        tries = [t for s in clients.sent for t in s.unanswered]
        for f, at in zip(out.faults, kills, strict=True):
            f.max_unavailable_s = unavailable(acks, at, at + opts.window_s)
            back = at + f.restarted_after_s
            f.unanswered_before_restart = sum(at - 1.0 <= t < back for t, _ in tries)
            f.unanswered_after_restart = sum(back <= t < at + opts.window_s for t, _ in tries)
            for t, why in tries:
                if at - 1.0 <= t < at + opts.window_s:
                    key = why[:70]
                    f.unanswered_why[key] = f.unanswered_why.get(key, 0) + 1
        _say("settling and checking")
        fold = LogFold(QUOTA_DEFAULTS, set(work.tenants))
        await _settle(dep, fold, last_restart + opts.settle_s)  # type: ignore[arg-type]
        res = RunResult(run=1, kind="cluster")
        command_checks(clients.sent, fold, res)
        host_checks(dep, fold, res)  # type: ignore[arg-type]
        out.lost, out.duplicated = res.lost, res.duplicated
        out.stuck, out.orphaned, out.servers = res.stuck, res.orphaned, res.servers
        out.over_quota = len(fold.over_quota)
        out.details.update({k: v[:10] for k, v in res.details.items() if v})
        if res.stuck:
            out.details["stuck_history"] = await stuck_histories(dep, fold)
        if fold.over_quota:
            out.details["over_quota"] = fold.over_quota[:10]
        await digest_check(dep, out)
        store = await dep.store()
        try:
            report, _ = await fold_claims(store)
        finally:
            await store.close()
        over = overcommitted(report)
        out.overcommitted_hosts = len(over)
        if over:
            out.details["overcommitted"] = [f"{h}: {report[h]}" for h in over]
    except Exception as exc:
        out.error = f"{type(exc).__name__}: {exc}"[:500]
    finally:
        if clients is not None:
            tally(clients.sent, out)
        crashed = dep.crashed()
        out.crashed = len(crashed)
        if crashed:
            out.details["crashed"] = crashed
        problems = await asyncio.to_thread(dep.stop)
        if problems:
            out.details["stop"] = problems
        out.seconds = round(time.monotonic() - t0, 1)
    return out


async def stuck_histories(dep: ClusterDeployment, fold: LogFold) -> list[str]:
    """Each stuck server's events (seq, type, actor, host), and each host
    agent's consumer, to find why."""
    from stratus.events.store import STREAM

    store = await dep.store()
    lines = []
    try:
        for sid, v in fold.servers.items():
            if v.status in FINAL or (fold.scope is not None and v.tenant not in fold.scope):
                continue
            recs = await store.read_all(subjects=[f"ev.{v.tenant}.server.{sid}"])
            steps = []
            for rec in recs:
                ev = rec.decode()
                host = getattr(ev, "host", "")
                steps.append(f"{rec.seq} {ev.type_name()} {ev.actor}{' ' + host if host else ''}")
            lines.append(f"{sid}: " + "; ".join(steps))
        # Whether the hosts' agents have deliveries they never acknowledged.
        from stratus.agents.compute.agent import consumer_name

        for host in dep.hosts:
            with contextlib.suppress(Exception):
                info = await store.js.consumer_info(STREAM, consumer_name(host))
                floor = info.ack_floor.stream_seq if info.ack_floor else 0
                lines.append(
                    f"consumer of {host}: ack pending {info.num_ack_pending}, redelivered "
                    f"{info.num_redelivered}, delivered up to {info.delivered.stream_seq}, "
                    f"ack floor {floor}, leader {info.cluster.leader if info.cluster else '-'}"
                )
    finally:
        await store.close()
    return lines


def _say(text: str) -> None:
    print(f"cluster: {text}", file=sys.stderr, flush=True)


def run(opts: Options) -> Outcome:
    if os.geteuid() != 0:
        raise SystemExit("the cluster run needs root: container instances need cgroups")
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    root = Path(tempfile.mkdtemp(prefix="stratus-cluster-"))
    out = None
    try:
        out = asyncio.run(run_async(opts, root))
        return out
    finally:
        if opts.keep_failed and out is not None and not out.ok:
            # Every process's log and the nodes' stores, to read after.
            out.details["kept"] = [str(root)]
        else:
            shutil.rmtree(root, ignore_errors=True)


def parse_args(argv: list[str] | None) -> tuple[Options, bool]:
    d = Options()
    p = argparse.ArgumentParser(
        prog="python -m stratus.ops.bench cluster",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--clients", type=positive, default=d.clients)
    p.add_argument("--window", type=float, default=d.window_s, help="seconds between faults")
    p.add_argument(
        "--restart-after", type=float, default=d.restart_after_s, help="seconds down per fault"
    )
    p.add_argument("--settle", type=float, default=d.settle_s, help="seconds to become final")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument(
        "--keep-failed", action="store_true", help="keep a failed run's data dir and logs"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    a = p.parse_args(argv)
    if a.restart_after >= a.window:
        p.error("--restart-after must be shorter than --window")
    opts = Options(
        clients=a.clients,
        window_s=a.window,
        restart_after_s=a.restart_after,
        settle_s=a.settle,
        seed=a.seed,
        keep_failed=a.keep_failed,
    )
    return opts, a.json


def report(out: Outcome, opts: Options) -> dict[str, Any]:
    return {
        "benchmark": "cluster",
        "options": asdict(opts),
        "acked": out.acked,
        "refused": out.refused,
        "commands": out.commands,
        "unresolved": out.unresolved,
        "retried": out.retried,
        "lost": out.lost,
        "duplicated": out.duplicated,
        "max_unavailable_s": {f.kind: f.max_unavailable_s for f in out.faults},
        "baseline_gap_s": out.baseline_gap_s,
        "digest_equal": out.digest_equal,
        "overcommitted_hosts": out.overcommitted_hosts,
        "over_quota": out.over_quota,
        "stuck": out.stuck,
        "orphaned": out.orphaned,
        "crashed": out.crashed,
        "servers": out.servers,
        "faults": [asdict(f) for f in out.faults],
        "details": out.details,
        "seconds": out.seconds,
        "error": out.error,
        "ok": out.ok,
    }


def main(argv: list[str] | None = None) -> int:
    opts, as_json = parse_args(argv)
    # Warnings only, on stderr: stdout is the report (one JSON object with --json).
    logs.configure("WARNING")
    out = run(opts)
    data = report(out, opts)
    if as_json:
        print(json.dumps(data, indent=2))
    else:
        for k in ("acked", "refused", "lost", "duplicated", "digest_equal"):
            print(f"{k:>22}: {data[k]}")
        for k in ("overcommitted_hosts", "over_quota", "stuck", "orphaned", "crashed"):
            print(f"{k:>22}: {data[k]}")
        print(f"{'baseline_gap_s':>22}: {out.baseline_gap_s}  (warm-up, no fault)")
        for f in out.faults:
            why = f" {f.error}" if f.error else ""
            print(
                f"{'max_unavailable_s':>22}: {f.max_unavailable_s}  after killing {f.kind} "
                f"({f.target}; restarted after {f.restarted_after_s} s){why}"
            )
        for what, lines in out.details.items():
            for line in lines:
                print(f"{what}: {line}", file=sys.stderr)
        if out.error:
            print(f"error: {out.error}", file=sys.stderr)
    return 0 if out.ok else 1


if __name__ == "__main__":
    sys.exit(main())
