"""The network agent benchmark (issues 7 and 21), as root on one machine.

``python -m stratus.ops.bench network [--ports N] [--hosts H] [--networks M]
[--wave W] [--modes vxlan,routed] [--json]``. In one run, on one
nats-server, for each mode in turn (each with hosts and agents of its own):

1. H simulated hosts (namespaces on an underlay bridge), a network agent
   for each in this process, and M/10 tenants. In ``vxlan`` mode M networks
   that all use the same prefixes (10.0.k.0/24 in every tenant); in
   ``routed`` mode one routed network (10.244.0.0/16, /26 blocks, BIRD on
   every host) shared by the tenants. M "anchor" containers are placed
   first, on hosts in turn (not timed).
2. Binding to traffic, incremental: the other N - M ports, in waves of W.
   Per port, its server and port are decided and logged and its instance
   namespace made (as the compute agent would); then the wave's binding
   events (``server.scheduled`` to a host) are appended as one burst, and
   the clock runs from each port's append until an ICMP echo from the new
   instance to its anchor (on another host: across VXLAN, or routed by the
   routes BGP learned) is answered; probes go every 10 ms from a raw socket
   in the instance's namespace. p50/p99 of that; the rate is ports per
   second of wave time (first binding of a wave to its last answer); the
   binding-to-wired split is read from the agents.
3. Each agent's reconcile passes during phase 2 (shallow, after new
   events) against one deep, full pass per host over the finished state
   (probing every link, FDB entry, qdisc, peer, route, set and rule).
4. Restart to converged: every agent stopped and a fresh one started (a new
   fold of the whole log, then a deep pass): seconds until all hosts match
   the log, and how many changes they made (0 expected: nothing changed).

Everything is removed at the end (namespaces, links, rules, sets, BIRD).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import select
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from stratus.ops.bench.common import Load, Report, percentile, positive, print_table, result
from stratus.ops.bench.common import Result as Row

MODES = ("vxlan", "routed")


@dataclass
class Options:
    ports: int = 1000
    hosts: int = 10
    networks: int = 50
    wave: int = 50
    modes: tuple[str, ...] = MODES
    # "thread": every agent in this process (issue 7's harness); "process":
    # each host's agent its own `stratus serve network-agent`, as deployed.
    agents: str = "thread"
    timeout: float = 30.0  # per port, binding to traffic


@dataclass
class Placed:
    ns: str
    port: str
    ip: str
    host: str
    binding: list


class AgentProcesses:
    """Each host's agent as its own ``stratus serve network-agent``."""

    def __init__(self, url: str, sim, prefix: str, state: Path) -> None:
        self.url, self.sim, self.prefix, self.state = url, sim, prefix, state
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def _argv(self, host: str) -> list[str]:
        return [
            sys.executable, "-m", "stratus.cli.main", "--url", self.url, "serve",
            # the bench's broker has no authentication
            "--insecure-no-auth", "--data-dir", str(self.state), "network-agent", "--host", host,
            "--vtep", self.sim.vtep(host), "--netns", self.sim.netns(host),
            "--prefix", self.prefix, "--interval", "3600", "--bgp-hold", "3",
        ]  # fmt: skip

    def start(self, hosts: list[str], timeout: float = 120) -> None:
        """Start them all, then wait until each says it is ready (bounded)."""
        self.state.mkdir(parents=True, exist_ok=True)
        for h in hosts:
            # Its log to a file, not a pipe nobody drains (a full pipe would
            # stall the agent); read back when it does not start.
            with open(self.state / f"{h}.log", "w") as log:
                self.procs[h] = subprocess.Popen(self._argv(h), stdout=subprocess.PIPE, stderr=log)
        deadline = time.monotonic() + timeout
        for h in hosts:
            out = self.procs[h].stdout
            assert out is not None
            # Raw reads on the descriptor: select() cannot see what a
            # buffered reader already holds.
            seen = b""
            while b"ready" not in seen:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([out], [], [], left)[0]:
                    raise TimeoutError(f"the agent of {h} did not start: {self._tail(h)}")
                chunk = os.read(out.fileno(), 4096)
                if not chunk:
                    self.procs[h].wait(5)
                    raise RuntimeError(f"the agent of {h} exited: {self._tail(h)}")
                seen = seen[-16:] + chunk

    def _tail(self, host: str) -> str:
        lines = (self.state / f"{host}.log").read_text(errors="replace").splitlines()
        return " | ".join(lines[-3:]) or "(nothing logged)"

    def stop(self) -> None:
        from stratus.ops.bench.common import stop_process

        for p in self.procs.values():
            stop_process(p)  # type: ignore[arg-type]
            if p.stdout:
                p.stdout.close()
        for h in self.procs:
            (self.state / f"{h}.log").unlink(missing_ok=True)
        self.procs = {}


async def _bench(url: str, opts: Options, report: Report, mode: str) -> None:
    from pyroute2 import netns

    from stratus.agents.network.agent import NetworkAgent
    from stratus.agents.network.bird import BgpConfig
    from stratus.agents.network.kernel import Host
    from stratus.agents.network.sim import SimulatedHosts, leftovers
    from stratus.events import network as nw
    from stratus.events.network import RoutedNetworkCreate
    from stratus.events.resources import ServerCreate, ServerScheduled
    from stratus.events.store import EventStore
    from stratus.handlers import servers
    from stratus.handlers.records import Image, Network
    from stratus.handlers.reports import ReportRelay
    from stratus.handlers.routed import SystemNetworks, decide_routed_network_create
    from stratus.handlers.world import fold
    from stratus.ops.bench.netlab import CAUSE, Cloud, Echo, Echoes

    prefix = "b" + secrets.token_hex(2)
    # Hosts and tenants of this mode's own: the log holds the other mode's
    # servers too, which must not land on these hosts.
    hosts = [f"{mode[0]}host-{i + 1}" for i in range(opts.hosts)]
    sim = SimulatedHosts(prefix, hosts)
    state = Path(tempfile.mkdtemp(prefix=f"{prefix}-"))
    store = await EventStore.connect(url)
    await store.ensure_stream()
    # The handlers' report relay: agents' port.bound reports and a routed
    # network's block claims and addresses go through it.
    relay = ReportRelay(store)
    await relay.start()
    agents: list[NetworkAgent] = []
    made: list[str] = []
    bgp = BgpConfig(hold=3)

    def new_agent(h: str, st: EventStore) -> NetworkAgent:
        return NetworkAgent(
            st,
            h,
            vtep=sim.vtep(h),
            prefix=prefix,
            host_ns=sim.netns(h),
            interval=3600,
            state_dir=state / h,
            bgp=bgp,
        )

    procs = AgentProcesses(url, sim, prefix, state / "data")
    echoes = Echoes()
    threads = opts.agents == "thread"

    async def settled(timeout: float = 120) -> None:
        """Every agent matches the log, and none appended more meanwhile."""
        deadline = time.monotonic() + timeout
        seq = await store.last_seq()
        while threads:
            left = max(1.0, deadline - time.monotonic())
            await asyncio.gather(*(a.converged(seq, left) for a in agents))
            now = await store.last_seq()
            if now == seq:
                return
            seq = now

    try:
        await asyncio.to_thread(sim.start)
        if threads:
            for h in hosts:
                a = new_agent(h, store)
                await a.start()
                agents.append(a)
        else:
            await asyncio.to_thread(procs.start, hosts)
        cloud = Cloud(store)
        tenants = [f"{mode}-{i}" for i in range(max(1, opts.networks // 10))]
        slots: list[tuple[str, str, int]] = []  # tenant, network, index
        routed: dict[str, Network] = {}
        if mode == "routed":
            cmd = RoutedNetworkCreate(name="pods", cidr="10.244.0.0/16", block_prefix=26)
            (ev,) = decide_routed_network_create(SystemNetworks(), cmd, CAUSE)
            await cloud.append([ev])
            routed["pods"] = Network(name="pods", id="pods", mode=nw.ROUTED, cidr=cmd.cidr)
        for t in tenants:
            await cloud.tenant(t)
            await cloud.do(
                t,
                _quota,
                {
                    "networks": 100,
                    "subnets": 100,
                    "ports": 10_000,
                    "instances": 10_000,
                    "vcpus": 100_000,
                    "ram_mb": 10**9,
                },
            )
        for k in range(opts.networks):
            t = tenants[k % len(tenants)]
            if mode == "routed":
                slots.append((t, "pods", k))
            else:
                name = f"n{k // len(tenants)}"
                await cloud.network(t, name, f"10.0.{k // len(tenants)}.0/24")
                slots.append((t, name, k))

        async def place(t: str, net: str, i: int, host: str) -> Placed:
            """Server and port decided and logged, instance namespace made;
            the binding event not appended yet."""
            cmd = ServerCreate(
                tenant=t,
                name=f"s{i}",
                image="img",
                vcpus=1,
                ram_mb=64,
                instance_type="container",
                networks=[net],
            )
            plan = servers.ServerPlan(
                cmd, None, Image(name="img", id="img", status="active"), routed
            )
            events = await cloud.do(t, servers.decide_server_create, plan)
            sid = next(e.aggregate.id for e in events if e.aggregate.kind == "server")
            ns = nw.instance_netns(sid)
            made.append(ns)
            await asyncio.to_thread(netns.create, ns)
            ev = CAUSE.make(ServerScheduled, t, "server", sid, host=host)
            fold(cloud.worlds[t], ev)
            port = cloud.port_of(t, sid)
            return Placed(ns, port.id, port.ip, host, [ev])

        anchors: dict[int, Placed] = {}
        for t, net, k in slots:
            anchors[k] = await place(t, net, 10**6 + k, hosts[k % len(hosts)])
        for a in anchors.values():
            await store.append(a.binding)
        await settled()
        # every anchor wired (its address in its namespace: an anchor of a
        # routed network has the one its host gave it)
        await _anchors_wired(list(anchors.values()), 120)
        if mode == "routed":
            # and BGP has spread every host's blocks (BIRD's first sessions
            # take a few seconds to come up: not what is measured)
            kernels = {h: Host(prefix, sim.vtep(h), sim.netns(h)) for h in hosts}
            await _routes_spread(store, kernels, 60)
        for a in agents:
            a.timings.clear()
            a.wiring_steps.clear()

        # -- phase 2: binding to traffic, incremental -----------------------------
        load, wired = Load(), Load()
        fulls = _arp_table_fulls()
        busy = 0.0  # seconds from each wave's first binding to its last answer
        wave_cpu = [0.0, 0.0, 0.0]  # CPU seconds in the waves: machine busy, ours user, sys
        started = time.perf_counter()
        measured = max(0, opts.ports - opts.networks)
        by_host = {a.host: a.kernel for a in agents}
        split: list[tuple[float, float, float]] = []  # binding to pass, to wired, to echo
        echoes.start()
        for w0 in range(0, measured, opts.wave):
            wave = []
            for i in range(w0, min(measured, w0 + opts.wave)):
                t, net, k = slots[i % len(slots)]
                # another host than the anchor's: traffic crosses the underlay
                host = hosts[(k + 1 + i // len(slots)) % len(hosts)]
                if len(hosts) > 1 and host == anchors[k].host:
                    host = hosts[(k + 1) % len(hosts)]
                p = await place(t, net, i, host)
                wave.append((p, anchors[k].ip, await Echo.open(p.ns)))
            first = time.monotonic()
            cpu0 = _cpu_seconds()
            try:
                # Each port's binding is appended and then probed from the
                # moment it was stored; gathered, the wave's appends are
                # pipelined, so its bindings land as a burst.
                ends = await asyncio.gather(
                    *(
                        _bind_and_probe(
                            store, p, echoes, e, tg, opts.timeout, load, wired, by_host, split
                        )
                        for p, tg, e in wave
                    )
                )
            finally:
                for *_, e in wave:
                    e.close()
            busy += max(ends) - first
            cpu = [b - a for a, b in zip(cpu0, _cpu_seconds(), strict=True)]
            wave_cpu = [x + y for x, y in zip(wave_cpu, cpu, strict=True)]
        echoes.close()
        load.seconds = busy
        report.results.append(
            result(
                f"{mode}: binding to traffic ({measured} ports, waves of {opts.wave})",
                load,
                note="p50/p99: binding stored -> first echo answered; rate: ports per "
                "second of wave time",
            )
        )
        wired.seconds = busy
        if threads:
            report.results.append(
                result(
                    f"{mode}: binding to wired (the agent's part)",
                    wired,
                    note="binding stored -> the host's pass made the port",
                )
            )
        # The kernel's ARP table is one for the machine (gc_thresh3 dynamic
        # entries for all namespaces): H simulated hosts and N instances share
        # what H real hosts would have each. When full, packets to a new
        # neighbour are dropped until entries older than 5 s can go.
        report.info[f"{mode}_arp_table_fulls"] = _arp_table_fulls() - fulls
        # Were the waves bound by the machine's CPUs? (all CPUs busy: the
        # agents' work, the kernel's, the broker's and any other load)
        cores = os.cpu_count() or 1
        report.info[f"{mode}_wave_cpu"] = {
            "machine_busy": round(wave_cpu[0] / (busy * cores), 2) if busy else None,
            "this_process_user_s_per_port": round(wave_cpu[1] / max(1, load.done), 4),
            "this_process_sys_s_per_port": round(wave_cpu[2] / max(1, load.done), 4),
        }
        if split:
            # Where a port's wait went: until the pass that made it began,
            # that pass until the port was wired, then until the first echo.
            report.info[f"{mode}_binding_split_ms_p50_p90"] = {
                k: [round(1000 * (percentile([x[i] for x in split], q) or 0), 1) for q in (50, 90)]
                for i, k in enumerate(("binding_to_pass", "pass_to_wired", "wired_to_echo"))
            }
            # and the slowest ports' (a tail of ~1 s in wired_to_echo is a
            # first ARP request that went unanswered, retried after 1 s)
            report.info[f"{mode}_slowest_split_ms"] = [
                [round(1000 * x, 1) for x in parts]
                for parts in sorted(split, key=sum, reverse=True)[:5]
            ]
        report.info[f"{mode}_end_to_end_ports_per_s"] = round(
            load.done / (time.perf_counter() - started), 1
        )
        if not threads:
            await _restart_processes(report, mode, store, procs, hosts)
            return
        shallow = [s for a in agents for deep, s in a.timings if not deep]
        # The passes that wired the wave's ports: how many each, and where
        # their time went (p50 and p90 of each step).
        wiring = [w for a in agents for w in a.wiring_steps]
        if wiring:
            report.info[f"{mode}_wiring_passes"] = {
                "count": len(wiring),
                "ports_p50": percentile([n for n, _ in wiring], 50),
                **{
                    f"{k}_ms_p50_p90": [round((percentile(v, q) or 0) * 1000, 1) for q in (50, 90)]
                    for k, v in _by_step(s for _, s in wiring).items()
                },
            }

        # -- phase 3: one deep pass per host over the finished state ---------------
        deep_t = []
        laps = []
        for a in agents:
            t0 = time.perf_counter()
            ch = await a.reconcile(correction=True)
            deep_t.append(time.perf_counter() - t0)
            laps.append(a.kernel.last_pass)
            if ch:
                report.failures.append(f"{mode} {a.host}: a deep pass changed {ch}")
        report.info[f"{mode}_deep_pass_steps_ms_p50"] = {
            k: round((percentile(v, 50) or 0) * 1000, 1) for k, v in _by_step(laps).items()
        }
        per_host = measured // len(hosts) + opts.networks // len(hosts)
        report.results.append(
            _row(f"{mode}: incremental reconcile pass (per batch of events)", shallow)
        )
        report.results.append(
            _row(f"{mode}: full reconcile pass (per host, deep, ~{per_host} ports)", deep_t)
        )

        # -- phase 4: restart to converged ------------------------------------------
        for a in agents:
            await a.stop()
        fresh_store = await EventStore.connect(url)
        t0 = time.perf_counter()
        fresh = [new_agent(h, fresh_store) for h in hosts]
        agents = fresh
        await asyncio.gather(*(a.start() for a in fresh))
        restart = time.perf_counter() - t0
        changes = sum(len(a.last_changes.created) + len(a.last_changes.removed) for a in fresh)
        report.results.append(
            Row(
                f"{mode}: restart to converged ({len(hosts)} agents)",
                len(hosts),
                restart,
                note=f"{changes} changes made (nothing changed: 0 expected)",
            )
        )
        if changes:
            changed = {a.host: a.last_changes for a in fresh if a.last_changes}
            report.failures.append(f"{mode}: restart with nothing changed made {changed}")
        report.info.update(
            ports=opts.ports,
            hosts=opts.hosts,
            networks=opts.networks,
            tenants=len(tenants),
        )
        report.info[f"{mode}_log_events"] = await store.last_seq()
        for a in agents:
            await a.stop()
        await fresh_store.close()
    finally:
        echoes.close()
        for a in agents:
            await a.stop()
        await asyncio.to_thread(procs.stop)
        for h in hosts:
            # (an agent process keeps its files where `serve network-agent` does)
            files_of = state / h if threads else state / "data" / "network" / h
            try:
                host = Host(prefix, sim.vtep(h), sim.netns(h), state_dir=files_of)
                await asyncio.to_thread(host.teardown)
            except Exception as exc:  # the namespaces go below anyway
                report.failures.append(f"teardown {h}: {exc}")
        have = set(netns.listnetns())
        for ns in made:
            if ns in have:
                await asyncio.to_thread(netns.remove, ns)
        await asyncio.to_thread(sim.stop)
        left = leftovers(prefix)
        if left:
            report.failures.append(f"left behind: {left}")
        files = await asyncio.to_thread(_files, state)
        if files:
            report.failures.append(f"files left behind: {files[:5]}")
        shutil.rmtree(state, ignore_errors=True)
        await relay.stop()
        await store.close()


async def _anchors_wired(anchors: list, timeout: float) -> None:
    """Until every anchor's namespace holds an address (bounded); a routed
    anchor's address is read from there."""
    from stratus.agents.network.rtnl import Rtnl

    def addresses(ns: str) -> list[str]:
        with Rtnl.open(ns) as nl:
            return [ip for _, name, ip, _ in nl.labelled_addrs() if name != "lo"]

    deadline = time.monotonic() + timeout
    for a in anchors:
        while not (found := await asyncio.to_thread(addresses, a.ns)):
            if time.monotonic() > deadline:
                raise TimeoutError(f"anchor {a.ns} not wired in {timeout} s")
            await asyncio.sleep(0.1)
        a.ip = found[0]


async def _routes_spread(store, kernels: dict, timeout: float) -> None:
    """Until every host routes to every other host's blocks (bounded)."""
    from stratus.events import network as nw

    blocks: dict[str, str] = {}
    for rec in await store.read_all(subjects=["ev._system.network.>"]):
        ev = rec.decode()
        if isinstance(ev, nw.BlockClaimed):
            blocks[ev.block] = ev.host
        elif isinstance(ev, nw.BlockReleased):
            blocks.pop(ev.block, None)
    deadline = time.monotonic() + timeout
    while True:
        missing = 0
        for h, kernel in kernels.items():
            routes = await asyncio.to_thread(kernel.bird_routes)
            missing += sum(1 for b, owner in blocks.items() if owner != h and b not in routes)
        if not missing:
            for kernel in kernels.values():
                kernel.close()
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{missing} block routes still missing after {timeout} s")
        await asyncio.sleep(0.2)


async def _restart_processes(report: Report, mode: str, store, procs, hosts: list[str]) -> None:
    """Restart to converged with agent processes: every one stopped, all
    started again; seconds until each says it is ready (a fold of the log
    and a deep pass behind it), and the corrections they recorded."""
    from stratus.events import network as nw

    procs.stop()
    seq = await store.last_seq()
    t0 = time.perf_counter()
    await asyncio.to_thread(procs.start, hosts)
    took = time.perf_counter() - t0
    fixes = [
        e
        for e in (rec.decode() for rec in await store.read_all(after=seq))
        if isinstance(e, nw.NetworkAgentCorrected)
    ]
    report.results.append(
        Row(
            f"{mode}: restart to converged ({len(hosts)} agent processes)",
            len(hosts),
            took,
            note=f"{len(fixes)} corrections recorded (nothing changed: 0 expected)",
        )
    )
    if fixes:
        report.failures.append(f"{mode}: restart with nothing changed corrected {fixes[:3]}")


def _by_step(passes: Iterable[dict[str, float]]) -> dict[str, list[float]]:
    """Passes' seconds per step (``Host.last_pass``) as each step's list."""
    steps: dict[str, list[float]] = {}
    for laps in passes:
        for k, v in laps.items():
            steps.setdefault(k, []).append(v)
    return steps


async def _bind_and_probe(
    store,
    p: Placed,
    echoes,
    probe,
    target: str,
    timeout: float,
    load: Load,
    wired: Load,
    agents: dict,
    split: list[tuple[float, float, float]],
) -> float:
    """Append a port's binding, then probe until ``target`` answers through
    it (``echoes``' thread sends ``probe``'s requests): the answer's time
    (or the time it gave up), latency into ``load`` and the agent's part
    (binding to wired) into ``wired``."""
    await store.append(p.binding)
    t0 = time.monotonic()
    ok = await echoes.first_reply(probe, target, t0 + timeout)
    kernel = agents.get(p.host)
    made = kernel.wired_at.get(p.port) if kernel is not None else None
    if made is not None:
        wired.done += 1
        wired.latencies.append(max(0.0, made - t0))
        began = kernel.pass_of.get(p.port)
        if began is not None and ok is not None:
            split.append((max(0.0, began - t0), made - began, ok - made))
    if ok is None:
        load.errors += 1
        load.first_error = load.first_error or f"no answer from {target}"
        return time.monotonic()
    load.done += 1
    load.latencies.append(ok - t0)
    return ok


# The machine's table of dynamic neighbour entries (every namespace's: the
# kernel keeps one) refuses new ones at gc_thresh3 once none is old enough
# to collect. Per measured port the workload makes about two (the instance's
# entry for its peer, the peer's for it), and each host one per other
# host's VTEP.
NEIGH_TABLE = Path("/proc/sys/net/ipv4/neigh/default/gc_thresh3")


def neigh_table_size() -> int | None:
    """The machine's ``gc_thresh3`` (None: not readable here)."""
    try:
        return int(NEIGH_TABLE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def neigh_entries_needed(ports: int, hosts: int) -> int:
    """Dynamic neighbour entries the workload may hold at once (an upper
    estimate, see ``NEIGH_TABLE``)."""
    return 2 * ports + hosts * (hosts - 1)


def neigh_table_warning(size: int | None, ports: int, hosts: int) -> str | None:
    """A warning when the machine's neighbour table is smaller than the
    workload needs (its first packets would be dropped: the tail measured
    would be the kernel's, not the agent's)."""
    need = neigh_entries_needed(ports, hosts)
    if size is None or size >= need:
        return None
    return (
        f"the machine's neighbour table (net.ipv4.neigh.default.gc_thresh3 = {size}) is "
        f"smaller than this workload's ~{need} dynamic entries: once full, packets to new "
        "neighbours are dropped and the latencies measured are the kernel's; "
        "ops/bootstrap raises it (/etc/sysctl.d/60-stratus-neigh.conf)"
    )


def _cpu_seconds() -> tuple[float, float, float]:
    """CPU seconds so far: the machine's busy time (all CPUs, /proc/stat),
    and this process's user and system time (all its threads)."""
    hz = os.sysconf("SC_CLK_TCK")
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    t = os.times()
    return ((sum(fields[:8]) - idle) / hz, t.user, t.system)


def _arp_table_fulls() -> int:
    """How often the machine's ARP table was found full (summed over CPUs;
    the counter counts every namespace: another run on the machine adds to it)."""
    try:
        lines = Path("/proc/net/stat/arp_cache").read_text().split("\n")
    except OSError:
        return 0
    col = lines[0].split().index("table_fulls")
    return sum(int(ln.split()[col], 16) for ln in lines[1:] if ln.strip())


def _files(d: Path) -> list[str]:
    return [str(f) for f in d.rglob("*") if f.is_file()]


def _quota(w, limits, cause):
    from stratus.events.resources import QuotaSet

    return [cause.make(QuotaSet, w.tenant, "quota", w.tenant, limits=limits)]


def _row(name: str, seconds: list[float]) -> Row:
    r = Row(name, len(seconds), sum(seconds))
    if seconds:
        r.p50_ms = (percentile(seconds, 50) or 0) * 1000
        r.p99_ms = (percentile(seconds, 99) or 0) * 1000
    r.note = "rate: passes per second of pass time"
    return r


def run(opts: Options) -> Report:
    from stratus.ops.bench.common import with_broker

    report = Report("network", opts)
    # (read, never changed: the machine's setting is the operator's, see ops/bootstrap)
    report.info["gc_thresh3"] = size = neigh_table_size()
    warning = neigh_table_warning(size, opts.ports, opts.hosts)
    if warning:
        report.info["warnings"] = [warning]

    async def body(url, tmp, procs) -> None:
        for mode in opts.modes:
            await _bench(url, opts, report, mode)

    return with_broker(report, body)


def _modes(text: str) -> tuple[str, ...]:
    modes = tuple(m.strip() for m in text.split(",") if m.strip())
    if not modes or any(m not in MODES for m in modes):
        raise argparse.ArgumentTypeError(f"modes are {', '.join(MODES)}")
    return modes


def main(argv: list[str]) -> int:
    d = Options()
    p = argparse.ArgumentParser(
        prog="python -m stratus.ops.bench network",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--ports", type=positive, default=d.ports)
    p.add_argument("--hosts", type=positive, default=d.hosts)
    p.add_argument("--networks", type=positive, default=d.networks)
    p.add_argument("--wave", type=positive, default=d.wave)
    p.add_argument("--modes", type=_modes, default=d.modes, help="vxlan,routed (both)")
    p.add_argument(
        "--agents",
        choices=("thread", "process"),
        default=d.agents,
        help="all agents in this process, or one `serve network-agent` process per host",
    )
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    if os.geteuid() != 0:
        print("the network benchmark needs root (namespaces, links, rules)", file=sys.stderr)
        return 1
    if a.hosts < 2:
        print("the network benchmark needs 2 hosts at least", file=sys.stderr)
        return 1
    opts = Options(
        ports=a.ports,
        hosts=a.hosts,
        networks=a.networks,
        wave=a.wave,
        modes=a.modes,
        agents=a.agents,
    )
    from stratus.cli import logs

    # The agents' logs on stderr, warnings only: stdout is the table or JSON.
    logs.configure(os.environ.get("STRATUS_BENCH_LOG", "WARNING"))
    warning = neigh_table_warning(neigh_table_size(), opts.ports, opts.hosts)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    t0 = time.perf_counter()
    report = run(opts)
    report.info["wall_seconds"] = round(time.perf_counter() - t0, 1)
    if a.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        i = report.info
        print_table(
            "Stratus network agent benchmark",
            report.results,
            f"{i.get('ports')} ports, {i.get('hosts')} simulated hosts, "
            f"{i.get('networks')} anchors in {i.get('tenants')} tenants (vxlan: a network "
            f"each, sharing 10.0.k.0/24; routed: one network); {i.get('cpus')} CPUs, "
            f"load {i.get('loadavg')}; wall {i.get('wall_seconds')} s",
        )
        for f in report.failures:
            print(f"FAILED: {f}", file=sys.stderr)
    return 1 if report.failures else 0
