"""The chaos run: commands under load while one part of the control plane is
killed with SIGKILL at a random moment, then the log is checked.

``python -m stratus.ops.bench chaos [--runs N] [--clients 8] [--commands 1500]
[--kinds tree,broker,...] [--settle 60] [--seed S] [--shared] [--keep-failed]
[--json]``

Each run starts a fresh deployment in a temporary directory, as an operator
with several processes would run it (root only: containers need cgroups):

* ``stratus up --hosts 2 --scheduler-replicas 0`` (the broker, command and
  query services, the projector, compute and network agents of ``host-01``
  and ``host-02``);
* beside it, each its own process: ``stratus serve handlers`` (a second
  command service in the same queue group), ``stratus serve scheduler``
  (the only scheduler), ``stratus serve projector`` (a second projector,
  writing its own store ``replica.db``) and ``stratus serve compute-agent
  --host host-03`` (a third host).

(``--shared``: one deployment started once for every run, each run with
tenants of its own and its checks on them: the short form the tests run.)

That is how the parts `up` runs in one process are killed alone: the
command service, projector, scheduler and compute agent killed are those
separate processes, doing real work beside the others. Run ``i`` kills,
one kind per run, in turn:

``tree``          ``up``, its broker and every ``serve`` process at once; all restarted
``broker``        the nats-server child alone; ``up`` restarts it by itself
``up``            ``up`` alone (its broker dies with it); ``up`` restarted
``handlers``      the second command service; restarted after 1 s
``projector``     the second projector; restarted after 1 s
``scheduler``     the scheduler; restarted after 1 s
``compute-agent`` the agent of ``host-03``; restarted after 1 s

The kill comes after a random share (25-60 %) of the commands have been
answered. Clients (``--clients``, each with one-shot connections as the
CLI makes) send ``--commands`` mixed commands: tenant create, network
create and delete, container server create and delete, in a few tenants
with tight quotas. A command whose outcome is unknown (no answer) is sent
again with the same command id until it gets one.

Then, once every server is final or ``--settle`` seconds have passed since
the restart and the last command, the run counts from the log and the hosts:

``lost``           acknowledged commands whose events are not on the log
``duplicated``     commands whose events were appended more than once
``digest_equal``   the live projection digest equals ``projections rebuild``'s
``replica_equal``  the killed-and-restarted projector's store has that digest too
``over_quota``     events after which a tenant used more than its quota
``over_capacity``  hosts whose claims ever exceeded capacity x ratio
``stuck``          servers not final (requested, scheduled, building, deleting)
``orphaned``       servers whose host disagrees with the log: running in the
                   log without an instance, an instance of a server not running
                   there, or an agent's report after ``server.deleted``

and reports the commands refused although they had been applied
(``refused_applied``, a retry decided again), acknowledgements whose
sequence numbers are not exactly the command's events (``misreported``),
and how soon after the kill a new command was acknowledged (``recovery_s``).
Exit status 1 when any of lost, duplicated, over_quota, over_capacity,
stuck, orphaned, unresolved (a command still unanswered after three minutes
of retries) is non-zero or a digest differs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from stratus.events.broker import pid_running
from stratus.ops.bench.common import positive, stop_process

KINDS = ("tree", "broker", "up", "handlers", "projector", "scheduler", "compute-agent")
SERVICES = ("handlers", "scheduler", "projector", "compute-agent")
UP_HOSTS = ("host-01", "host-02")
EXTRA_HOST = "host-03"
PASSWORD = "chaos-admin-password"
FINAL = {"running", "stopped", "error", "deleted"}
# How long one command may go unanswered before it is sent again, and how
# long a command is retried at most (a restart takes seconds).
COMMAND_TIMEOUT_S = 5.0
RETRY_FOR_S = 180.0
RESTART_DELAY_S = 1.0
# Per-tenant limits: tight, so quota refusals happen under the race.
QUOTA = {"instances": 6, "vcpus": 12, "ram_mb": 1536, "networks": 4}
# (verb, weight) of the mix.
MIX = (
    ("server.create", 40),
    ("server.delete", 25),
    ("network.create", 15),
    ("network.delete", 10),
    ("tenant.create", 5),
)
# Any of these non-zero fails a run (unresolved: a command still without an
# answer after RETRY_FOR_S of retries, so the control plane never came back).
COUNTED = ("lost", "duplicated", "over_quota", "over_capacity", "stuck", "orphaned", "unresolved")


@dataclass
class Options:
    runs: int = len(KINDS)
    clients: int = 8
    commands: int = 1500
    kinds: tuple[str, ...] = KINDS
    settle_s: float = 60.0
    tenants: int = 6
    seed: int = 1
    # A run's command phase never takes longer than this.
    phase_s: float = 900.0
    # Keep a failed run's data dir (the log, every process's log) to look into.
    keep_failed: bool = False
    # Every run on one deployment, started once (the short form in the tests).
    shared: bool = False


@dataclass
class Sent:
    """One command as the client saw it."""

    cid: str
    verb: str
    body: dict[str, Any]
    outcome: str = "unknown"  # acked | refused | unknown (never answered)
    seqs: list[int] = field(default_factory=list)
    error: str = ""
    attempts: int = 0
    first_sent: float = 0.0
    answered: float = 0.0
    # Each attempt that went unanswered (timed out, no responders...): when
    # it began, and why.
    unanswered: list[tuple[float, str]] = field(default_factory=list)


@dataclass
class RunResult:
    run: int
    kind: str
    commands: int = 0
    acked: int = 0
    refused: int = 0
    unresolved: int = 0
    retried: int = 0
    kill_after_s: float = 0.0
    restart_s: float | None = None
    recovery_s: float | None = None
    lost: int = 0
    duplicated: int = 0
    refused_applied: int = 0
    misreported: int = 0
    digest_equal: bool = False
    replica_equal: bool = False
    over_quota: int = 0
    over_capacity: int = 0
    stuck: int = 0
    orphaned: int = 0
    servers: dict[str, int] = field(default_factory=dict)
    # Seconds from the run's start at the end of each phase.
    phases: dict[str, float] = field(default_factory=dict)
    details: dict[str, list[str]] = field(default_factory=dict)
    seconds: float = 0.0
    error: str = ""

    @property
    def ok(self) -> bool:
        return (
            not self.error
            and all(getattr(self, k) == 0 for k in COUNTED)
            and self.digest_equal
            and self.replica_equal
        )


# -- the deployment ---------------------------------------------------------------


class Deployment:
    """``stratus up`` and its ``serve`` neighbours on one data dir."""

    def __init__(self, data_dir: Path, seed: int) -> None:
        from stratus.cli.datadir import deployment_prefix
        from stratus.projections.db import sqlite_url

        self.data_dir = data_dir
        self.logs = data_dir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.prefix = deployment_prefix(data_dir)
        self.port = 0
        self.url = ""
        self.up: subprocess.Popen[bytes] | None = None
        self.services: dict[str, subprocess.Popen[bytes]] = {}
        # The simulated hosts the checks look at (name, its agent's data dir).
        self.hosts = {h: data_dir for h in (*UP_HOSTS, EXTRA_HOST)}
        d = str(data_dir)
        self.argv = {
            "handlers": ["serve", "handlers", "--data-dir", d],
            "scheduler": ["serve", "scheduler", "--data-dir", d, "--seed", str(seed)],
            "projector": [
                "serve",
                "projector",
                "--data-dir",
                d,
                "--db",
                sqlite_url(data_dir / "replica.db"),
            ],
            "compute-agent": [
                *("serve", "compute-agent", "--data-dir", d, "--host", EXTRA_HOST),
                *("--types", "container", "--vcpus", "16", "--ram-mb", "65536"),
                *("--disk-gb", "500"),
            ],
        }

    async def start_up(self) -> None:
        from stratus.ops.bench.foundation import start_service_processes

        argv = [
            *("up", "--data-dir", str(self.data_dir), "--port", str(self.port)),
            # Any free port for the OpenStack API at every start: with the
            # broker's port given (a restart), `up` would take 5000, and two
            # deployments on one machine restarting then collide there.
            *("--openstack-port", "0"),
            *("--hosts", str(len(UP_HOSTS)), "--scheduler-replicas", "0"),
            *("--admin-password", PASSWORD),
        ]
        # (--url is the global option; `up` has no use for it)
        (self.up,) = await start_service_processes(
            self.url or "nats://127.0.0.1:1", argv, 1, self.logs, [], label="up"
        )
        self.url = (self.data_dir / "url").read_text().strip()
        # A restart listens where the first did: the neighbours know that URL.
        self.port = int(self.url.rsplit(":", 1)[1])

    def creds(self, name: str) -> Path:
        """The credentials file of service ``name``, issued from the data dir
        `up` initialised (as an operator would: `stratus credentials issue`)."""
        from stratus.cli.creds import local_creds
        from stratus.events.natscreds import dumps, write_private

        path = self.data_dir / f"{name}.creds"
        if not path.exists():
            host = EXTRA_HOST if name == "compute-agent" else ""
            write_private(path, dumps(local_creds(self.data_dir, name, host)))
        return path

    async def start_service(self, name: str) -> None:
        from stratus.ops.bench.foundation import start_service_processes

        argv = [*self.argv[name][:2], "--creds", str(self.creds(name)), *self.argv[name][2:]]
        (self.services[name],) = await start_service_processes(
            self.url, argv, 1, self.logs, [], label=name
        )

    async def start_all(self) -> None:
        await self.start_up()
        await asyncio.gather(*(self.start_service(s) for s in SERVICES))

    def broker_pid(self) -> int | None:
        for f in (self.data_dir / "nats").glob("nats-server_*.ports"):
            pid = int(f.stem.rsplit("_", 1)[1])
            if pid_running(pid):
                return pid
        return None

    def processes(self) -> dict[str, int]:
        out = {name: p.pid for name, p in self.services.items() if p.poll() is None}
        if self.up is not None and self.up.poll() is None:
            out["up"] = self.up.pid
        broker = self.broker_pid()
        if broker is not None:
            out["broker"] = broker
        return out

    async def fault(self, kind: str) -> float:
        """Kill what ``kind`` names with SIGKILL and restart what needs it;
        seconds from the kill until what was killed serves again."""
        t0 = time.monotonic()
        if kind == "tree":
            for pid in self.processes().values():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            self._reap(self.up, *self.services.values())
            await self.start_all()
        elif kind == "broker":
            old = self.broker_pid()
            assert old is not None, "no broker to kill"
            os.kill(old, signal.SIGKILL)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                new = self.broker_pid()
                if new is not None and new != old:
                    break
                await asyncio.sleep(0.02)
            else:
                raise RuntimeError("up did not restart its broker within 60 s")
        elif kind == "up":
            assert self.up is not None
            broker = self.broker_pid()
            self.up.kill()
            self._reap(self.up)
            # Its broker goes with it (parent-death signal).
            for _ in range(750):  # 15 s at most
                if broker is None or not pid_running(broker):
                    break
                await asyncio.sleep(0.02)
            await self.start_up()
        else:
            self.services[kind].kill()
            self._reap(self.services[kind])
            await asyncio.sleep(RESTART_DELAY_S)  # an init system's restart delay
            await self.start_service(kind)
        return time.monotonic() - t0

    @staticmethod
    def _reap(*procs: subprocess.Popen[bytes] | None) -> None:
        # (Their stdout is closed by the thread draining it, at its end:
        # closing it here would wait for that thread's blocked read.)
        for p in procs:
            if p is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(5)

    def stop(self) -> list[str]:
        """Stop everything (services first); what would not stop cleanly."""
        problems = []
        live = {name: p for name, p in self.services.items() if p.poll() is None}
        for p in live.values():
            p.send_signal(signal.SIGTERM)  # all at once: they stop side by side
        for name, p in live.items():
            stop_process(p)
            if p.returncode not in (0, -signal.SIGTERM):
                problems.append(f"{name} exited with {p.returncode} on SIGTERM")
        if self.up is not None and self.up.poll() is None:
            self.up.send_signal(signal.SIGTERM)
            try:
                self.up.wait(60)
            except subprocess.TimeoutExpired:
                problems.append("up did not stop within 60 s of SIGTERM")
                self.up.kill()
                self._reap(self.up)
        return problems

    def namespaces(self) -> list[str]:
        """This deployment's network namespaces still on the machine."""
        netns = Path("/run/netns")
        if not netns.is_dir():
            return []
        return sorted(p.name for p in netns.iterdir() if p.name.startswith(self.prefix))

    def remove_instances(self) -> int:
        """Every container instance of this deployment (they outlive their
        agents by design); how many there were."""
        return remove_instances(self.hosts, self.prefix)


def remove_instances(hosts: dict[str, Path], prefix: str) -> int:
    """Every container instance of the agents of ``hosts`` (host name: its
    agent's data dir) in deployment ``prefix``; how many there were."""
    from stratus.agents.compute.containers import ContainerDriver

    n = 0
    for host, data_dir in hosts.items():
        driver = ContainerDriver(host, data_dir / "hosts" / host / "containers", deployment=prefix)
        for server in driver.list_owned():
            with contextlib.suppress(Exception):
                driver.remove(server)
            n += 1
        driver.cgroups.prune()
    return n


# -- the clients ------------------------------------------------------------------


class Workload:
    """The mixed commands, chosen from what the clients have seen acknowledged."""

    def __init__(self, tenants: list[str], total: int, rng: random.Random, tag: str) -> None:
        self.rng = rng
        self.tag = tag  # in every name this run makes
        self.total = total
        self.issued = 0
        self.tenants = list(tenants)
        self.servers: dict[str, list[str]] = defaultdict(list)
        self.networks: dict[str, list[str]] = defaultdict(list)
        self.n = 0
        verbs, weights = zip(*MIX, strict=True)
        self.verbs: list[str] = list(verbs)
        self.weights: list[int] = list(weights)

    def next(self) -> tuple[str, dict[str, Any]] | None:
        if self.issued >= self.total:
            return None
        self.issued += 1
        self.n += 1
        verb = self.rng.choices(self.verbs, self.weights)[0]
        t = self.rng.choice(self.tenants)
        if verb == "server.delete" and self.servers[t]:
            ref = self.servers[t].pop(self.rng.randrange(len(self.servers[t])))
            return verb, {"tenant": t, "ref": ref}
        if verb == "network.delete" and self.networks[t]:
            ref = self.networks[t].pop(self.rng.randrange(len(self.networks[t])))
            return verb, {"tenant": t, "ref": ref}
        if verb == "network.create":
            return verb, {"tenant": t, "name": f"{self.tag}-net-{self.n}"}
        if verb == "tenant.create":
            return verb, {"name": f"{self.tag}-chaos-{self.n}"}
        return "server.create", {
            "tenant": t,
            "name": f"{self.tag}-box-{self.n}",
            "image": "base",
            "instance_type": "container",
            "vcpus": self.rng.choice((1, 1, 2, 4)),
            "ram_mb": self.rng.choice((64, 128, 256)),
        }

    def acked(self, sent: Sent, data: Any) -> None:
        rid = data.get("id") if isinstance(data, dict) else None
        if sent.verb == "tenant.create":
            self.tenants.append(sent.body["name"])
        elif rid and sent.verb == "server.create":
            self.servers[sent.body["tenant"]].append(rid)
        elif rid and sent.verb == "network.create":
            self.networks[sent.body["tenant"]].append(rid)


class Clients:
    """``clients`` workers sending the workload, each command until answered."""

    def __init__(self, deployment: Deployment, token: str, work: Workload, clients: int) -> None:
        self.dep = deployment
        self.token = token
        self.work = work
        self.clients = clients
        self.sent: list[Sent] = []
        self.acked_count = 0
        self.progress = asyncio.Event()

    async def run(self, deadline: float) -> None:
        await asyncio.gather(*(self._worker(deadline) for _ in range(self.clients)))

    async def _worker(self, deadline: float) -> None:
        from stratus.cli.client import Client
        from stratus.events.errors import Internal, StratusError, Unavailable
        from stratus.events.ids import new_id

        client: Client | None = None
        try:
            while time.monotonic() < deadline:
                nxt = self.work.next()
                if nxt is None:
                    return
                sent = Sent(new_id(), *nxt)
                self.sent.append(sent)
                sent.first_sent = time.monotonic()
                give_up = sent.first_sent + RETRY_FOR_S
                pause = 0.1
                while time.monotonic() < give_up:
                    sent.attempts += 1
                    began = time.monotonic()
                    try:
                        if client is None:
                            # The URL may not be there while `up` restarts.
                            client = await Client.connect(
                                self.dep.url, self.token, timeout=COMMAND_TIMEOUT_S
                            )
                        reply = await client.command(sent.verb, sent.body, sent.cid)
                    except (Unavailable, Internal) as err:
                        # Unknown outcome: the same command, same id, again.
                        sent.error = f"{err.kind}: {err.message}"[:200]
                        sent.unanswered.append((began, sent.error))
                        if client is not None:
                            await client.close()
                        client = None
                        await asyncio.sleep(pause)
                        pause = min(2.0, pause * 2)
                        continue
                    except StratusError as err:
                        sent.outcome, sent.error = "refused", f"{err.kind}: {err.message}"[:200]
                    else:
                        sent.outcome, sent.seqs = "acked", list(reply.seqs or [])
                        self.work.acked(sent, reply.data)
                        self.acked_count += 1
                    sent.answered = time.monotonic()
                    self.progress.set()
                    break
        finally:
            if client is not None:
                await client.close()


# -- the checks -------------------------------------------------------------------


@dataclass
class ServerView:
    tenant: str
    status: str = "requested"
    host: str = ""
    deleted_at: int = 0
    after_delete: list[str] = field(default_factory=list)


class LogFold:
    """What the checks need from the log, folded once in order."""

    def __init__(self, quota_defaults: dict[str, int], scope: set[str] | None = None) -> None:
        from stratus.events.resources import QUOTAS

        self.quotas = QUOTAS
        self.defaults = quota_defaults
        # The tenants whose quotas and servers are checked (None: all).
        self.scope = scope
        self.seq = 0
        self.by_cause: dict[str, list[int]] = defaultdict(list)
        self.at_seq: dict[int, tuple[str, str]] = {}  # seq -> (correlation, causation)
        self.servers: dict[str, ServerView] = {}
        self.limits: dict[str, dict[str, int]] = {}
        self.live: dict[str, dict[str, dict[str, Any]]] = defaultdict(lambda: defaultdict(dict))
        self.over_quota: list[str] = []

    def apply(self, seq: int, e: Any) -> None:
        from stratus.events.resources import QuotaSet, ResourceEvent

        self.seq = seq
        self.by_cause[e.causation_id].append(seq)
        self.at_seq[seq] = (e.correlation_id, e.causation_id)
        kind = e.aggregate.kind
        if isinstance(e, QuotaSet):
            self.limits[e.tenant] = dict(e.limits)
        if kind == "server":
            self._server(seq, e)
        if isinstance(e, ResourceEvent) and (e.begins or e.ends):
            live = self.live[e.tenant][kind]
            if e.ends:
                live.pop(e.aggregate.id, None)
            else:
                # A server's sizes are in its spec (server.requested carries it whole).
                sized = getattr(e, "spec", e)
                live[e.aggregate.id] = {
                    f: getattr(sized, f)
                    for f in ("vcpus", "ram_mb", "size_gb")
                    if hasattr(sized, f)
                }
                self._check_quota(seq, e.tenant, kind)

    def _server(self, seq: int, e: Any) -> None:
        sid = e.aggregate.id
        view = self.servers.setdefault(sid, ServerView(e.tenant))
        if view.deleted_at:
            view.after_delete.append(f"{e.type_name()} at {seq}")
            return
        status = getattr(type(e), "status", None)
        if status:
            view.status = status
        host = getattr(e, "host", "")
        if host and e.type_name() in ("server.scheduled", "server.building", "server.running"):
            view.host = host
        if e.type_name() == "server.deleted":
            view.status, view.deleted_at = "deleted", seq

    def _check_quota(self, seq: int, tenant: str, kind: str) -> None:
        if self.scope is not None and tenant not in self.scope:
            return
        limits = self.limits.get(tenant, {})
        for resource, q in self.quotas.items():
            if q.kind != kind:
                continue
            limit = limits.get(resource, self.defaults.get(resource, -1))
            items = self.live[tenant][kind].values()
            used = len(items) if q.column is None else sum(r.get(q.column, 0) for r in items)
            if limit >= 0 and used > limit:
                self.over_quota.append(f"{tenant} {resource} {used} > {limit} at seq {seq}")


async def fold_log(store: Any, fold: LogFold) -> None:
    async for batch in store.read(after=fold.seq):
        for rec in batch:
            fold.apply(rec.seq, rec.decode())


def command_checks(sent: list[Sent], fold: LogFold, res: RunResult) -> None:
    """A command's own events are those it caused directly (``causation_id``
    is its id; what agents report later is only correlated with it): one
    atomic append, so one contiguous run of sequences."""
    lost, dup, refused_applied, misreported = [], [], [], []
    for s in sent:
        mine = sorted(fold.by_cause.get(s.cid, []))
        runs = sum(1 for i, q in enumerate(mine) if i == 0 or q != mine[i - 1] + 1)
        if runs > 1:
            dup.append(f"{s.verb} {s.cid}: seqs {mine}")
        if s.outcome == "acked":
            if s.seqs and not mine:
                lost.append(f"{s.verb} {s.cid}: acked seqs {s.seqs}, none of its events on the log")
            elif sorted(s.seqs) != mine:
                misreported.append(f"{s.verb} {s.cid}: acked seqs {s.seqs}, its events {mine}")
        elif s.outcome == "refused" and mine:
            refused_applied.append(f"{s.verb} {s.cid}: refused ({s.error}) but at {mine}")
    res.lost, res.duplicated = len(lost), len(dup)
    res.refused_applied, res.misreported = len(refused_applied), len(misreported)
    res.details.update(
        lost=lost, duplicated=dup, refused_applied=refused_applied, misreported=misreported
    )


def host_checks(dep: Deployment, fold: LogFold, res: RunResult) -> None:
    from stratus.agents.compute.containers import Cgroups

    def mine(v: ServerView) -> bool:
        return fold.scope is None or v.tenant in fold.scope

    orphans = []
    instances: dict[str, dict[str, bool]] = {}
    for host in dep.hosts:
        cg = Cgroups(host, deployment=dep.prefix)
        instances[host] = {s: bool(cg.pids(s)) for s in cg.servers()}
    servers = {sid: v for sid, v in fold.servers.items() if mine(v)}
    for sid, v in servers.items():
        if v.after_delete:
            orphans.append(f"{sid}: {', '.join(v.after_delete)} after server.deleted")
        if v.status == "running" and not instances.get(v.host, {}).get(sid):
            orphans.append(f"{sid}: running on {v.host} in the log, no live instance there")
    for host, found in instances.items():
        for sid in found:
            v = fold.servers.get(sid)
            if v is not None and not mine(v):
                continue
            # A live server's (even one still building or deleting) is not orphaned.
            if v is None or v.host != host or v.status in ("deleted", "error"):
                state = "unknown" if v is None else f"{v.status} on {v.host or '-'}"
                orphans.append(f"{sid}: an instance on {host}, the log says {state}")
    res.orphaned = len(orphans)
    res.details["orphaned"] = orphans
    stuck = [f"{sid}: {v.status}" for sid, v in servers.items() if v.status not in FINAL]
    res.stuck = len(stuck)
    res.details["stuck"] = stuck
    counts: dict[str, int] = defaultdict(int)
    for v in servers.values():
        counts[v.status] += 1
    res.servers = dict(sorted(counts.items()))


async def digest_checks(dep: Deployment, token: str, res: RunResult) -> None:
    """The live digest against ``projections rebuild`` at the same sequence,
    and the second projector's store against both."""
    from stratus.cli.client import Client
    from stratus.ops.bench.foundation import _stratus_binary
    from stratus.projections.db import make_engine, sqlite_url
    from stratus.projections.projector import store_digest

    for _ in range(5):
        client = await Client.connect(dep.url, token, timeout=30)
        try:
            deadline = time.monotonic() + 120
            while True:
                status = await client.query("status")
                if status["projector_lag"] == 0 or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.5)
        finally:
            await client.close()
        done = await asyncio.to_thread(
            subprocess.run,
            [
                *(_stratus_binary(), "--url", dep.url, "--token", token),
                *("projections", "rebuild", "--data-dir", str(dep.data_dir), "-o", "json"),
            ],
            capture_output=True,
            text=True,
            timeout=600,
        )
        if done.returncode != 0:
            raise RuntimeError(f"projections rebuild failed: {done.stderr.strip()[-300:]}")
        rebuilt = json.loads(done.stdout)
        if rebuilt["seq"] != status["last_seq"]:
            continue  # an event landed in between: compare again
        res.digest_equal = rebuilt["digest"] == status["projection_digest"]
        if not res.digest_equal:
            res.details["digest"] = [
                f"live {status['projection_digest']} at {status['last_seq']}, "
                f"rebuilt {rebuilt['digest']} at {rebuilt['seq']}"
            ]
        engine = make_engine(sqlite_url(dep.data_dir / "replica.db"))
        try:
            deadline = time.monotonic() + 60
            while True:
                seq, digest = await store_digest(engine)
                if seq >= rebuilt["seq"] or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.5)
        finally:
            await engine.dispose()
        res.replica_equal = seq == rebuilt["seq"] and digest == rebuilt["digest"]
        if not res.replica_equal:
            res.details["replica"] = [f"replica {digest} at {seq}"]
        return
    res.details["digest"] = ["the log kept moving: no rebuild at the live sequence in 5 tries"]


# -- one run --------------------------------------------------------------------------


async def _setup(dep: Deployment, opts: Options, run: int) -> tuple[str, list[str]]:
    """Log in, make the public image (once) and this run's tenants with
    their quotas (a run's own: on a shared deployment, its checks look at
    its tenants)."""
    from stratus.cli.client import Client
    from stratus.events.errors import AlreadyExists

    client = await Client.connect(dep.url, timeout=30)
    try:
        r = await client.command("auth.login", {"user": "admin", "password": PASSWORD})
        token = r.data["token"]
        client.token = token
        with contextlib.suppress(AlreadyExists):
            await client.command("image.create-public", {"name": "base"})
        tenants = [f"r{run}t{i}" for i in range(opts.tenants)]
        for t in tenants:
            await client.command("tenant.create", {"name": t})
            await client.command("quota.set", {"tenant": t, "limits": QUOTA})
    finally:
        await client.close()
    return token, tenants


async def _store(dep: Deployment) -> Any:
    from stratus.cli.creds import local_creds
    from stratus.events.store import EventStore

    # a reader of the log, with a credential signed by the deployment's key ring
    return await EventStore.connect(dep.url, creds=local_creds(dep.data_dir, "projector"))


async def _settle(dep: Deployment, fold: LogFold, until: float) -> None:
    """Fold the log until every server is final, or until ``until``."""
    while True:
        store = await _store(dep)
        try:
            await fold_log(store, fold)
        finally:
            await store.close()
        scoped = (v for v in fold.servers.values() if fold.scope is None or v.tenant in fold.scope)
        if all(v.status in FINAL for v in scoped) or time.monotonic() >= until:
            return
        await asyncio.sleep(1.0)


async def one_run(
    i: int, kind: str, opts: Options, dep: Deployment, *, shared: bool = False
) -> RunResult:
    """One fault under load, then the checks. ``shared``: ``dep`` runs
    already and stays up for the next run (else it is started and stopped)."""
    from stratus.events.resources import QUOTA_DEFAULTS

    res = RunResult(run=i, kind=kind)
    rng = random.Random(opts.seed * 1000 + i)
    t_start = time.monotonic()
    clients: Clients | None = None
    try:
        if not shared:
            await dep.start_all()
        token, tenants = await _setup(dep, opts, i)
        res.phases["start"] = round(time.monotonic() - t_start, 1)
        work = Workload(tenants, opts.commands, rng, f"r{i}")
        clients = Clients(dep, token, work, opts.clients)
        kill_at = int(opts.commands * rng.uniform(0.25, 0.6))
        phase = asyncio.create_task(clients.run(time.monotonic() + opts.phase_s))
        while clients.acked_count + _refused(clients) < kill_at and not phase.done():
            clients.progress.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(clients.progress.wait(), 1.0)
        killed = time.monotonic()
        res.kill_after_s = round(killed - t_start, 2)
        res.restart_s = round(await dep.fault(kind), 2)
        restarted = time.monotonic()
        await phase
        res.phases["commands"] = round(time.monotonic() - t_start, 1)
        after = [
            s.answered - killed
            for s in clients.sent
            if s.outcome == "acked" and s.first_sent >= killed
        ]
        res.recovery_s = round(min(after), 2) if after else None
        # The tenants this run made (those its clients made included).
        scope = set(work.tenants)
        fold = LogFold(QUOTA_DEFAULTS, scope)
        await _settle(dep, fold, max(restarted, time.monotonic()) + opts.settle_s)
        res.phases["settled"] = round(time.monotonic() - t_start, 1)
        command_checks(clients.sent, fold, res)
        host_checks(dep, fold, res)
        res.over_quota = len(fold.over_quota)
        res.details["over_quota"] = fold.over_quota[:20]
        await digest_checks(dep, token, res)
        store = await _store(dep)
        try:
            from stratus.ops.bench.schedkit import fold_claims, overcommitted

            report, _holds = await fold_claims(store)
        finally:
            await store.close()
        over = overcommitted(report)
        res.over_capacity = len(over)
        res.details["over_capacity"] = [f"{h}: {report[h]}" for h in over]
        res.phases["checked"] = round(time.monotonic() - t_start, 1)
    except Exception as exc:
        res.error = f"{type(exc).__name__}: {exc}"[:500]
    finally:
        if clients is not None:
            tally(clients.sent, res)
        if not shared:
            problems = teardown(dep)
            if problems:
                res.details["stop"] = problems
        res.seconds = round(time.monotonic() - t_start, 1)
        # Only what a person would read: the first few of each.
        res.details = {k: v[:10] for k, v in res.details.items() if v}
        if not shared:
            keep(dep, opts, res)
    return res


def tally(sent: list[Sent], into: Any) -> None:
    """The commands sent, by outcome, into ``into``'s counters."""
    into.commands = len(sent)
    into.acked = sum(s.outcome == "acked" for s in sent)
    into.refused = sum(s.outcome == "refused" for s in sent)
    into.unresolved = sum(s.outcome == "unknown" for s in sent)
    into.retried = sum(s.attempts > 1 for s in sent)


def teardown(dep: Deployment) -> list[str]:
    """Stop the deployment and remove what it left on the host; what went wrong."""
    problems = dep.stop()
    dep.remove_instances()
    # A clean stop of `up` takes its simulated hosts' namespaces down.
    problems += [f"namespace {n} left behind" for n in dep.namespaces()]
    return problems


def keep(dep: Deployment, opts: Options, res: RunResult | None) -> None:
    """Remove the data dir, or keep it (with every process's log) when
    ``res`` failed and that was asked for."""
    if opts.keep_failed and res is not None and not res.ok:
        kept = Path(tempfile.gettempdir()) / f"stratus-chaos-kept-{os.getpid()}-{res.run}"
        shutil.move(dep.data_dir, kept)
        res.details["kept"] = [str(kept)]
    shutil.rmtree(dep.data_dir, ignore_errors=True)


async def shared_runs(opts: Options, tmp: Path) -> list[RunResult]:
    """Every run on one deployment (the short form: one start, one stop)."""
    dep = Deployment(tmp / "shared", opts.seed)
    results: list[RunResult] = []
    try:
        await dep.start_all()
        for i in range(opts.runs):
            kind = opts.kinds[i % len(opts.kinds)]
            _say(f"run {i + 1} of {opts.runs}: killing {kind}")
            r = await one_run(i + 1, kind, opts, dep, shared=True)
            _say(f"run {i + 1} ({kind}) {'ok' if r.ok else 'FAILED'} in {r.seconds:.0f} s")
            results.append(r)
    finally:
        problems = teardown(dep)
        if problems and results:
            results[-1].details["stop"] = problems
        keep(dep, opts, next((r for r in results if not r.ok), None))
    return results


def _refused(clients: Clients) -> int:
    return sum(s.outcome == "refused" for s in clients.sent)


def _say(text: str) -> None:
    print(f"chaos: {text}", file=sys.stderr, flush=True)


def run(opts: Options) -> list[RunResult]:
    if os.geteuid() != 0:
        raise SystemExit("the chaos run needs root: container instances need cgroups")
    # A SIGTERM (a timeout, say) unwinds like Ctrl-C: every run's clean-up
    # (processes, instances, namespaces) still happens.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    tmp = Path(tempfile.mkdtemp(prefix="stratus-chaos-"))
    results = []
    try:
        if opts.shared:
            return asyncio.run(shared_runs(opts, tmp))
        for i in range(opts.runs):
            kind = opts.kinds[i % len(opts.kinds)]
            _say(f"run {i + 1} of {opts.runs}: killing {kind}")
            dep = Deployment(tmp / f"run-{i + 1}-{kind}", opts.seed)
            r = asyncio.run(one_run(i + 1, kind, opts, dep))
            _say(
                f"run {i + 1} ({kind}) {'ok' if r.ok else 'FAILED'} in {r.seconds:.0f} s"
                + (f": {r.error}" if r.error else "")
            )
            results.append(r)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return results


# -- command line -----------------------------------------------------------------------


def _kinds(text: str) -> tuple[str, ...]:
    kinds = tuple(k.strip() for k in text.split(",") if k.strip())
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise argparse.ArgumentTypeError(f"kinds are {', '.join(KINDS)}; not {bad}")
    return kinds


def parse_args(argv: list[str] | None) -> tuple[Options, bool]:
    d = Options()
    p = argparse.ArgumentParser(
        prog="python -m stratus.ops.bench chaos",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--runs", type=positive, default=d.runs, help="runs, one fault kind each")
    p.add_argument("--clients", type=positive, default=d.clients, help="concurrent clients")
    p.add_argument("--commands", type=positive, default=d.commands, help="commands per run")
    p.add_argument("--kinds", type=_kinds, default=d.kinds, help="fault kinds, in turn")
    p.add_argument(
        "--settle", type=float, default=d.settle_s, help="seconds servers have to become final"
    )
    p.add_argument("--tenants", type=positive, default=d.tenants, help="tenants at the start")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument(
        "--keep-failed", action="store_true", help="keep a failed run's data dir and logs"
    )
    p.add_argument(
        "--shared",
        action="store_true",
        help="every run on one deployment started once (each run has its own tenants)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object, no table")
    a = p.parse_args(argv)
    opts = Options(
        runs=a.runs,
        clients=a.clients,
        commands=a.commands,
        kinds=a.kinds,
        settle_s=a.settle,
        tenants=a.tenants,
        seed=a.seed,
        keep_failed=a.keep_failed,
        shared=a.shared,
    )
    return opts, a.json


def print_report(results: list[RunResult], opts: Options, seconds: float) -> None:
    table = Table(
        title="Stratus chaos run",
        caption=(
            f"{opts.clients} clients, {opts.commands} commands a run, SIGKILL at 25-60 % "
            f"of the commands; {os.cpu_count()} CPUs; wall time {seconds:.0f} s"
        ),
        caption_justify="left",
    )
    cols = [
        "run",
        "kill",
        "acked/refused/sent",
        "restart s",
        "recovery s",
        "lost",
        "dup",
        "digest",
        "replica",
        "quota",
        "capacity",
        "stuck",
        "orphaned",
        "refused applied",
        "misreported",
        "servers",
    ]
    for c in cols:
        table.add_column(c)
    for r in results:
        table.add_row(
            str(r.run),
            r.kind,
            f"{r.acked}/{r.refused}/{r.commands}",
            "" if r.restart_s is None else f"{r.restart_s:.1f}",
            "" if r.recovery_s is None else f"{r.recovery_s:.1f}",
            str(r.lost),
            str(r.duplicated),
            "equal" if r.digest_equal else "[red]DIFFERS[/]",
            "equal" if r.replica_equal else "[red]DIFFERS[/]",
            str(r.over_quota),
            str(r.over_capacity),
            str(r.stuck),
            str(r.orphaned),
            str(r.refused_applied),
            str(r.misreported),
            " ".join(f"{k} {v}" for k, v in r.servers.items()),
        )
    Console(width=220).print(table)
    for r in results:
        if r.error:
            print(f"run {r.run} ({r.kind}) failed: {r.error}", file=sys.stderr)
        for what, lines in r.details.items():
            for line in lines:
                print(f"run {r.run} ({r.kind}) {what}: {line}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    opts, as_json = parse_args(argv)
    t0 = time.perf_counter()
    results = run(opts)
    seconds = time.perf_counter() - t0
    if as_json:
        out = {
            "benchmark": "chaos",
            "options": asdict(opts),
            "wall_seconds": round(seconds, 1),
            "runs": [{**asdict(r), "ok": r.ok} for r in results],
        }
        print(json.dumps(out, indent=2))
    else:
        print_report(results, opts, seconds)
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
