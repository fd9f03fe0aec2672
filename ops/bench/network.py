"""The network agent benchmark (issue 7), as root on one machine.

``python -m stratus.ops.bench network [--ports N] [--hosts H] [--networks M]
[--wave W] [--json]``. In one run, on one nats-server:

1. H simulated hosts (namespaces on an underlay bridge), a network agent
   for each in this process, and M networks over M/10 tenants that all use
   the same prefixes (10.0.k.0/24 in every tenant). Each network first gets
   an "anchor" container on one host (not timed).
2. Binding to traffic, incremental: the other N - M ports, in waves of W.
   Per port, its server and port are decided and logged and its instance
   namespace made (as the compute agent would), then the binding event
   (``server.scheduled`` to a host) is appended; the clock runs from that
   append until a ping from the new instance to its network's anchor (on
   another host, through VXLAN) is answered. p50/p99 of that.
3. Each agent's reconcile passes during phase 2 (shallow, after new
   events) against one deep, full pass per host over the finished state
   (probing every link, FDB entry, qdisc, peer and rule): the same run's
   incremental vs full reconcile.
4. Restart to converged: every agent stopped and a fresh one started (a new
   fold of the whole log, then a deep pass): seconds until all hosts match
   the log, and how many changes they made (0 expected: nothing changed).

Everything is removed at the end (namespaces, links, rules).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import sys
import time
from dataclasses import dataclass

from stratus.ops.bench.common import Load, Report, percentile, positive, print_table, result
from stratus.ops.bench.common import Result as Row


@dataclass
class Options:
    ports: int = 1000
    hosts: int = 10
    networks: int = 50
    wave: int = 50
    timeout: float = 30.0  # per port, binding to traffic


async def _ping(ns: str, address: str, deadline: float) -> float | None:
    """Seconds (monotonic) when ``address`` first answered from ``ns``, None if never."""
    from pyroute2 import netns

    def enter() -> None:
        netns.setns(ns, flags=0)

    while time.monotonic() < deadline:
        proc = await asyncio.create_subprocess_exec(
            "ping",
            "-n",
            "-q",
            "-c",
            "1",
            "-W",
            "1",
            address,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
            preexec_fn=enter,
        )
        if await proc.wait() == 0:
            return time.monotonic()
        await asyncio.sleep(0.02)
    return None


async def _bench(url: str, opts: Options, report: Report) -> None:
    from pyroute2 import netns

    from stratus.agents.network.agent import NetworkAgent
    from stratus.agents.network.kernel import Host
    from stratus.agents.network.sim import SimulatedHosts, leftovers
    from stratus.events import network as nw
    from stratus.events.resources import ServerScheduled
    from stratus.events.store import EventStore
    from stratus.handlers.world import fold
    from stratus.ops.bench.netlab import CAUSE, Cloud

    prefix = "b" + secrets.token_hex(2)
    hosts = [f"host-{i + 1}" for i in range(opts.hosts)]
    sim = SimulatedHosts(prefix, hosts)
    store = await EventStore.connect(url)
    await store.ensure_stream()
    agents: list[NetworkAgent] = []
    made: list[str] = []

    def new_agent(h: str, st: EventStore) -> NetworkAgent:
        return NetworkAgent(
            st, h, vtep=sim.vtep(h), prefix=prefix, host_ns=sim.netns(h), interval=3600
        )

    async def converged(timeout: float = 120) -> None:
        seq = await store.last_seq()
        await asyncio.gather(*(a.converged(seq, timeout) for a in agents))

    try:
        await asyncio.to_thread(sim.start)
        for h in hosts:
            a = new_agent(h, store)
            await a.start()
            agents.append(a)
        cloud = Cloud(store)
        tenants = [f"bench-{i}" for i in range(max(1, opts.networks // 10))]
        nets: list[tuple[str, str, int]] = []  # tenant, network, index
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
            name = f"n{k // len(tenants)}"
            await cloud.network(t, name, f"10.0.{k // len(tenants)}.0/24")
            nets.append((t, name, k))

        async def place(t: str, net: str, i: int, host: str) -> tuple[str, str, list]:
            """Server and port decided and logged, instance namespace made;
            returns (namespace, ip, binding events not yet appended)."""
            from stratus.events.resources import ServerCreate
            from stratus.handlers import servers
            from stratus.handlers.records import Image

            cmd = ServerCreate(
                tenant=t,
                name=f"s{i}",
                image="img",
                vcpus=1,
                ram_mb=64,
                instance_type="container",
                networks=[net],
            )
            plan = servers.ServerPlan(cmd, None, Image(name="img", id="img"))
            events = await cloud.do(t, servers.decide_server_create, plan)
            sid = next(e.aggregate.id for e in events if e.aggregate.kind == "server")
            ns = nw.instance_netns(sid)
            made.append(ns)
            await asyncio.to_thread(netns.create, ns)
            ev = CAUSE.make(ServerScheduled, t, "server", sid, host=host)
            fold(cloud.worlds[t], ev)
            return ns, cloud.port_of(t, sid).ip, [ev]

        anchors: dict[int, tuple[str, str]] = {}
        pending = []
        for t, net, k in nets:
            ns, ip, evs = await place(t, net, 10**6 + k, hosts[k % len(hosts)])
            anchors[k] = (ns, ip)
            pending += evs
        for ev in pending:
            await store.append([ev])
        await converged()
        for a in agents:
            a.timings.clear()

        # -- phase 2: binding to traffic, incremental -----------------------------
        load = Load()
        started = time.perf_counter()
        measured = max(0, opts.ports - opts.networks)
        for w0 in range(0, measured, opts.wave):
            wave = []
            for i in range(w0, min(measured, w0 + opts.wave)):
                t, net, k = nets[i % len(nets)]
                # another host than the anchor's: traffic crosses VXLAN
                host = hosts[(k + 1 + i // len(nets)) % len(hosts)]
                if len(hosts) > 1 and host == hosts[k % len(hosts)]:
                    host = hosts[(k + 1) % len(hosts)]
                ns, ip, evs = await place(t, net, i, host)
                wave.append((ns, anchors[k][1], evs))
            t0s = []
            for _, _, evs in wave:
                await store.append(evs)
                t0s.append(time.monotonic())

            async def one(ns: str, target: str, t0: float, sem: asyncio.Semaphore) -> None:
                async with sem:
                    ok = await _ping(ns, target, t0 + opts.timeout)
                if ok is None:
                    load.errors += 1
                    load.first_error = load.first_error or f"{ns} never reached {target}"
                else:
                    load.done += 1
                    load.latencies.append(ok - t0)

            sem = asyncio.Semaphore(16)
            await asyncio.gather(
                *(one(ns, tg, t0, sem) for (ns, tg, _), t0 in zip(wave, t0s, strict=True))
            )
        load.seconds = time.perf_counter() - started
        report.results.append(
            result(
                f"binding to traffic ({measured} ports, waves of {opts.wave})",
                load,
                note="p50/p99: event appended -> first ping answered",
            )
        )
        shallow = [s for a in agents for deep, s in a.timings if not deep]

        # -- phase 3: one deep pass per host over the finished state ---------------
        deep_t = []
        for a in agents:
            t0 = time.perf_counter()
            ch = await a.reconcile(correction=True)
            deep_t.append(time.perf_counter() - t0)
            if ch:
                report.failures.append(f"{a.host}: a deep pass changed {ch}")
        report.results.append(_row("incremental reconcile pass (per batch of events)", shallow))
        report.results.append(_row("full reconcile pass (per host, deep)", deep_t))

        # -- phase 4: restart to converged ------------------------------------------
        for a in agents:
            await a.stop()
        fresh_store = await EventStore.connect(url)
        t0 = time.perf_counter()
        fresh = [new_agent(h, fresh_store) for h in hosts]
        await asyncio.gather(*(a.start() for a in fresh))
        restart = time.perf_counter() - t0
        changes = sum(len(a.last_changes.created) + len(a.last_changes.removed) for a in fresh)
        agents = fresh
        report.results.append(
            Row(
                f"restart to converged ({len(hosts)} agents)",
                len(hosts),
                restart,
                note=f"{changes} changes made (nothing changed: 0 expected)",
            )
        )
        if changes:
            report.failures.append(f"restart with nothing changed made {changes} changes")
        report.info.update(
            ports=opts.ports,
            hosts=opts.hosts,
            networks=opts.networks,
            tenants=len(tenants),
            log_events=await store.last_seq(),
        )
        for a in agents:
            await a.stop()
        await fresh_store.close()
    finally:
        for a in agents:
            await a.stop()
        for h in hosts:
            try:
                await asyncio.to_thread(Host(prefix, sim.vtep(h), sim.netns(h)).teardown)
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
        await store.close()


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

    async def body(url, tmp, procs) -> None:
        await _bench(url, opts, report)

    return with_broker(report, body)


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
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    if os.geteuid() != 0:
        print("the network benchmark needs root (namespaces, links, rules)", file=sys.stderr)
        return 1
    opts = Options(ports=a.ports, hosts=a.hosts, networks=a.networks, wave=a.wave)
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
            f"{i.get('networks')} networks in {i.get('tenants')} tenants sharing "
            f"10.0.k.0/24; {i.get('log_events')} events; {i.get('cpus')} CPUs; "
            f"wall {i.get('wall_seconds')} s",
        )
        for f in report.failures:
            print(f"FAILED: {f}", file=sys.stderr)
    return 1 if report.failures else 0
