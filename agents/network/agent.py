"""The network agent of one host: events in, kernel objects out.

It folds the whole log into a ``Topology`` (catching up first, then
following), plans what its host needs, and reconciles the kernel against
that plan: after every batch of new events, and every ``interval`` seconds
to catch drift. Drift found when the log had not moved is recorded as
``network-agent.corrected``; a port it wired for a server on its host is
reported with ``port.bound``. Reconciling the same plan twice changes
nothing, so redelivered events and restarts are harmless.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import structlog

from stratus.agents.network.desired import HostPlan, Topology, plan
from stratus.agents.network.kernel import Changes, Host
from stratus.events import network as nw
from stratus.events.errors import StratusError, Unavailable
from stratus.events.ids import new_id
from stratus.events.model import Cause, UnknownEvent
from stratus.events.reports import Reporter
from stratus.events.resources import SYSTEM
from stratus.events.store import EventStore, Recorded

log = structlog.get_logger("stratus.network-agent")


class NetworkAgent:
    def __init__(
        self,
        store: EventStore,
        host: str,
        *,
        vtep: str,
        prefix: str = "st",
        host_ns: str | None = None,
        interval: float = 10.0,
        routers: bool = False,
    ) -> None:
        self.store = store
        self.host = host
        # ``port.bound`` is on the port's subject: through the relay of this host.
        self.reports = Reporter(store.nc, host, codec=store.codec)
        self.vtep = vtep
        self.prefix = prefix
        self.kernel = Host(prefix, vtep, host_ns, routers)
        self.routers = routers
        self.interval = interval
        self.topology = Topology()
        self.converged_seq = -1  # the topology seq the host last matched
        self.reconciles = 0
        self.last_changes = Changes()
        self.corrections: list[Changes] = []
        self.timings: list[tuple[bool, float]] = []
        self._last_plan: HostPlan | None = None
        self._reported: set[str] = set()
        self._lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[Any]] = []
        self.actor = f"network-agent:{host}"

    # -- life cycle ----------------------------------------------------------------

    async def start(self) -> None:
        """Catch up with the log, register the VTEP, reconcile, then follow."""
        async for batch in self.store.read(after=0):
            self._fold(batch)
        registered = self.topology.vteps.get(self.host) == self.vtep and (
            self.routers == (self.host in self.topology.router_hosts)
        )
        if not registered:
            cause = Cause(self.actor, new_id(), new_id())
            ev = cause.make(
                nw.NetworkAgentRegistered,
                SYSTEM,
                "network-agent",
                self.host,
                host=self.host,
                vtep=self.vtep,
                routers=self.routers,
            )
            await self.store.append([ev])
        await self.reconcile(correction=True)
        self._tasks = [
            asyncio.create_task(self._follow(), name=f"{self.actor} follow"),
            asyncio.create_task(self._periodic(), name=f"{self.actor} periodic"),
        ]
        log.info("network agent started", host=self.host, seq=self.topology.seq)

    async def stop(self) -> None:
        for t in self._tasks:
            # Cancelled again until it ends: Python 3.11's wait_for (in the
            # store's follower) can swallow a cancellation that races with
            # the event it waits for, and the follower would wait on.
            for _ in range(100):
                t.cancel()
                done, _ = await asyncio.wait({t}, timeout=0.1)
                if done:
                    break
            if t.done():
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    t.result()
        self._tasks = []

    async def teardown(self) -> Changes:
        """Remove everything of ours from the host (decommissioning it)."""
        async with self._lock:
            return await asyncio.to_thread(self.kernel.teardown)

    def _fold(self, batch: list[Recorded]) -> None:
        for rec in batch:
            try:
                ev = rec.decode()
            except UnknownEvent:
                continue
            self.topology.apply(rec.seq, ev)

    async def _follow(self) -> None:
        async for batch in self.store.subscribe(after=self.topology.seq):
            self._fold(batch)
            try:
                await self.reconcile(correction=False)
            except Exception:  # a kernel failure: the periodic pass retries
                log.exception("reconcile failed", host=self.host)

    async def _periodic(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.reconcile(correction=True)
            except Exception:
                log.exception("periodic reconcile failed", host=self.host)

    # -- the work ----------------------------------------------------------------------

    def plan(self) -> HostPlan:
        return plan(self.topology, self.host, self.prefix)

    async def reconcile(self, correction: bool) -> Changes:
        """Make the host match the log as folded so far; with ``correction``,
        changes made while the log stood still are recorded as drift."""
        async with self._lock:
            seq = self.topology.seq
            hp = self.plan()
            started = time.perf_counter()
            ch = await asyncio.to_thread(self.kernel.reconcile, hp, correction)
            self.reconciles += 1
            self.last_changes = ch
            # (deep pass?, seconds): what the benchmark compares
            self.timings.append((correction, time.perf_counter() - started))
            del self.timings[:-10_000]
            # Drift: what had to change although the plan had not (the log
            # moved on by events that do not concern this host, or not at all).
            drift = correction or hp == self._last_plan
            self._last_plan = hp
            self.converged_seq = seq
            if ch:
                log.info(
                    "reconciled",
                    host=self.host,
                    seq=seq,
                    created=ch.created,
                    removed=ch.removed,
                    wired=ch.wired,
                    drift=drift,
                    ms=round((time.perf_counter() - started) * 1000, 1),
                )
            if ch.drifted and drift:
                self.corrections.append(ch)
                cause = Cause(self.actor, new_id(), new_id())
                ev = cause.make(
                    nw.NetworkAgentCorrected,
                    SYSTEM,
                    "network-agent",
                    self.host,
                    host=self.host,
                    created=ch.created[:200],
                    removed=ch.removed[:200],
                )
                await self.store.append([ev])
            await self._report_bound(hp, ch)
            return ch

    async def _report_bound(self, hp: HostPlan, ch: Changes) -> None:
        """``port.bound`` for each port wired here that the log does not bind here yet."""
        if not any(
            (p := self.topology.ports.get(pp.port)) is not None
            and p.host != self.host
            and pp.port not in self._reported
            for pp in hp.ports.values()
        ):
            return
        wired = self.kernel.wired()
        events = []
        for name, pp in hp.ports.items():
            port = self.topology.ports.get(pp.port)
            if port is None or port.host == self.host or pp.port in self._reported:
                continue
            if name not in wired:
                continue
            corr, cause_id = port.cause
            cause = Cause(self.actor, corr or new_id(), cause_id or new_id())
            events.append(nw.port_binding(cause, port.tenant, port.id, self.host))
            self._reported.add(pp.port)
        for ev in events:
            try:
                await self.reports.append([ev], msg_id=f"bind-{ev.aggregate.id}-{self.host}")
            except Unavailable as exc:
                self._reported.discard(ev.aggregate.id)  # the next pass tries again
                log.warning("port binding not reported", port=ev.aggregate.id, error=exc.message)
            except StratusError as exc:
                # Refused (the relay does not see the port's server here):
                # asking again would change nothing.
                log.warning("port binding refused", port=ev.aggregate.id, error=exc.message)

    async def converged(self, seq: int, timeout: float = 10.0) -> None:
        """Wait until the host matches the log up to ``seq`` (tests, benchmarks)."""
        deadline = time.monotonic() + timeout
        while self.converged_seq < seq or self.topology.seq < seq:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.host}: converged at {self.converged_seq}, wanted {seq}")
            await asyncio.sleep(0.02)
