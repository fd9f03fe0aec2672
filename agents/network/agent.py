"""The network agent of one host: events in, kernel objects out.

It folds the whole log into a ``Topology`` (catching up first, then
following), keeps its host's plan current from what each batch of events
touched (``desired.Planner``), and reconciles the kernel against it: after
every batch, only what changed; at start and every ``interval`` seconds a
deep pass over everything, to catch drift. Drift found when the log had not
moved is recorded as ``network-agent.corrected``; a port it wired for a
server on its host is reported with ``port.bound``. Reconciling the same
plan twice changes nothing, so redelivered events and restarts are harmless.

For routed networks it also hands out its host's addresses (``ipam``),
runs BIRD (through the kernel's plan), and watches its BGP sessions: a
session that drops, and its return, are recorded as
``network-agent.peer-lost`` / ``peer-restored`` with the blocks whose
routes went and came back.
"""

from __future__ import annotations

import asyncio
import functools
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import structlog

from stratus.agents.network import ipam
from stratus.agents.network.bird import BgpConfig
from stratus.agents.network.desired import HostPlan, Planner, Topology, Touched, member_sets
from stratus.agents.network.kernel import Changes, Host
from stratus.events import network as nw
from stratus.events.errors import ConcurrencyConflict
from stratus.events.ids import new_id
from stratus.events.model import Cause, UnknownEvent
from stratus.events.reports import Reporter
from stratus.events.resources import SYSTEM
from stratus.events.store import EventStore, Recorded
from stratus.events.tasks import cancel

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
        state_dir: Path | None = None,
        bgp: BgpConfig | None = None,
        bgp_poll: float = 1.0,
    ) -> None:
        self.store = store
        self.host = host
        # ``port.bound`` is on the port's subject: through the relay of this host.
        self.reports = Reporter(store.nc, host, codec=store.codec)
        self.vtep = vtep
        self.prefix = prefix
        self.kernel = Host(prefix, vtep, host_ns, routers, state_dir)
        self.routers = routers
        self.interval = interval
        self.bgp_poll = bgp_poll
        self.topology = Topology()
        self.planner = Planner(host, prefix, bgp)
        self.converged_seq = -1  # the topology seq the host last matched
        self.reconciles = 0
        self.last_changes = Changes()
        self.corrections: list[Changes] = []
        self.timings: list[tuple[bool, float]] = []
        # Seconds per step of each shallow pass that wired new ports, and
        # how many (what the benchmark breaks a binding's wait down by).
        self.wiring_steps: list[tuple[int, dict[str, float]]] = []
        self._last_plan: HostPlan | None = None
        self._reported: set[str] = set()
        self._lock = asyncio.Lock()
        self._more = asyncio.Event()  # events folded that no pass has taken yet
        self._tasks: list[asyncio.Task[Any]] = []
        self._ipam_todo: set[str] = set()
        self._ipam_all = True
        self._ipam_lock = asyncio.Lock()
        self._sessions: dict[str, bool] = {}
        self._lost: dict[str, int] = {}  # peers recorded lost -> polls since back up
        # The host's passes run one at a time in a thread of its own: on
        # asyncio's shared pool (a few threads for every agent of the
        # process) a host's pass would wait behind other hosts' passes.
        self._thread: ThreadPoolExecutor | None = None
        self._reports: set[asyncio.Task[None]] = set()  # appends in the background
        self._retry: list[ipam.Append] = []  # address reports that failed
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
        await self._addresses(None)
        await self.reconcile(correction=True)
        self._tasks = [
            asyncio.create_task(self._follow(), name=f"{self.actor} follow"),
            asyncio.create_task(self._passes(), name=f"{self.actor} passes"),
            asyncio.create_task(self._periodic(), name=f"{self.actor} periodic"),
            asyncio.create_task(self._watch_bgp(), name=f"{self.actor} bgp"),
        ]
        log.info("network agent started", host=self.host, seq=self.topology.seq)

    async def stop(self) -> None:
        """Stop following the log; the host keeps what it has (links, BIRD)."""
        for t in self._tasks:
            # (cancelled again until it ends: ``events.tasks``)
            await cancel(t, tries=40)
        self._tasks = []
        if self._reports:
            await asyncio.wait(self._reports, timeout=10)
        # (waits for a pass still running in its thread)
        await self._in_thread(self.kernel.close)
        self._end_thread()

    async def _in_thread(self, fn: Any, *args: Any) -> Any:
        if self._thread is None:
            self._thread = ThreadPoolExecutor(1, thread_name_prefix=f"net-{self.host}")
        return await asyncio.get_running_loop().run_in_executor(
            self._thread, functools.partial(fn, *args)
        )

    def _end_thread(self) -> None:
        if self._thread is not None:
            self._thread.shutdown(wait=False)
            self._thread = None

    async def teardown(self) -> Changes:
        """Remove everything of ours from the host (decommissioning it)."""
        async with self._lock:
            try:
                return await self._in_thread(self.kernel.teardown)
            finally:
                self._end_thread()

    def _fold(self, batch: list[Recorded]) -> None:
        for rec in batch:
            try:
                ev = rec.decode()
            except UnknownEvent:
                continue
            self.topology.apply(rec.seq, ev)

    async def _follow(self) -> None:
        """Fold the log as it comes, also while a pass runs (``_passes``
        takes what was folded once it is done), and hand the running pass
        the member sets and the bridges a host joined or left."""
        async for batch in self.store.subscribe(after=self.topology.seq):
            self._fold(batch)
            t = self.topology
            if t.routed:
                self._ipam_todo |= t.touched.ports  # (addresses for them: ``_passes``)
            if t.touched.members:
                self.kernel.members_soon(member_sets(t, t.touched.members, self.prefix))
            bridges = t.take_bridges()
            if bridges:
                self.kernel.bridges_soon(self.planner.bridges(t, bridges))
            self._more.set()

    async def _passes(self) -> None:
        """A shallow pass over what the events folded since the last one changed."""
        while True:
            await self._more.wait()
            self._more.clear()
            try:
                # (its own events are folded at once: the pass below wires them)
                await self._addresses(set())
            except Exception:  # the store: the next batch (or deep pass) retries
                log.exception("addresses failed", host=self.host)
                self._ipam_all = True
            try:
                # (what it changed is taken with the log's position, under the
                # pass's lock: folding goes on meanwhile)
                await self.reconcile(correction=False)
            except Exception:  # a kernel failure: the periodic pass retries
                log.exception("reconcile failed", host=self.host)

    async def _periodic(self) -> None:
        """A deep pass every ``interval`` seconds; in between, twice a second,
        a shallow one while a port waits for its instance (the compute agent
        makes the namespace, a VM's guest its tap, without an event of ours)."""
        deep_at = time.monotonic() + self.interval
        while True:
            await asyncio.sleep(min(0.5, self.interval))
            try:
                if time.monotonic() >= deep_at:
                    deep_at = time.monotonic() + self.interval
                    await self._addresses(None)
                    await self.reconcile(correction=True)
                elif self.kernel.waiting and not self._lock.locked():
                    await self.reconcile(correction=False)
            except Exception:
                log.exception("periodic reconcile failed", host=self.host)

    # -- the work ----------------------------------------------------------------------

    def plan(self) -> HostPlan:
        """The host's plan from scratch (what a deep pass applies)."""
        return self.planner.full(self.topology)

    async def reconcile(self, correction: bool, touched: Touched | None = None) -> Changes:
        """Make the host match the log as folded so far: a deep pass (every
        object probed, the plan made from scratch) with ``correction``, whose
        changes made while the log stood still are recorded as drift; else
        only what the events since the last pass changed."""
        async with self._lock:
            seq = self.topology.seq
            if correction:
                hp = self.planner.full(self.topology)
            else:
                hp = self.planner.update(self.topology, touched)
            # What was handed to a pass before is in this plan; what is
            # handed from now on is newer (the pass applies it as it goes).
            self.topology.take_bridges()
            self.kernel.plan_made()
            started = time.perf_counter()
            if correction or hp is not self._last_plan or self.kernel.waiting:
                ch = await self._in_thread(self.kernel.reconcile, hp, correction, True)
            else:
                ch = Changes()  # nothing here changed: nothing to do
            self.reconciles += 1
            self.last_changes = ch
            # (deep pass?, seconds): what the benchmark compares
            self.timings.append((correction, time.perf_counter() - started))
            del self.timings[:-10_000]
            if ch.wired and not correction:
                self.wiring_steps.append((len(ch.wired), self.kernel.last_pass))
                del self.wiring_steps[:-10_000]
            # Drift: what had to change although the plan had not (the log
            # moved on by events that do not concern this host, or not at all).
            drift = correction or hp is self._last_plan
            self._last_plan = hp
            self.converged_seq = seq
            if ch:
                log.info(
                    "reconciled",
                    host=self.host,
                    seq=seq,
                    created=ch.created[:50],
                    removed=ch.removed[:50],
                    wired=ch.wired[:50],
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
            if ch.wired or correction:
                self._report_bound(hp)
            return ch

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._reports.add(task)
        task.add_done_callback(self._reports.discard)

    def _report(self, a: ipam.Append) -> Any:
        # (its conditions: one at most, on the append's own subject)
        return self.reports.append(a.events, *a.conditions[:1], msg_id=a.msg_id)

    async def _append_reports(self, reports: list[ipam.Append]) -> None:
        """Append ``port.address-assigned`` reports; failed ones go again
        with the next addresses handed out (their ids make repeats duplicates)."""
        reports = self._retry + reports
        self._retry = []
        results = await asyncio.gather(
            # (on the ports' subjects: through this host's relay)
            *(self._report(a) for a in reports),
            return_exceptions=True,
        )
        for a, res in zip(reports, results, strict=True):
            if isinstance(res, BaseException):
                log.warning("address report not appended", host=self.host, error=str(res))
                self._retry.append(a)

    def _report_bound(self, hp: HostPlan) -> None:
        """``port.bound`` for each port wired here that the log does not bind
        here yet (a routed port's binding came with its address). Appended
        in the background, all at once: the next pass need not wait for the
        broker's acknowledgements (a retry is a duplicate by its id)."""
        wired = self.kernel.wired()
        events = []
        for name, pp in hp.ports.items():
            if pp.routed or pp.port in self._reported or name not in wired:
                continue
            port = self.topology.ports.get(pp.port)
            if port is None or port.host == self.host:
                continue
            corr, cause_id = port.cause
            cause = Cause(self.actor, corr or new_id(), cause_id or new_id())
            events.append(nw.port_binding(cause, port.tenant, port.id, self.host))
            self._reported.add(pp.port)
        if events:
            self._spawn(self._append_each(events))

    async def _append_each(self, events: list) -> None:
        results = await asyncio.gather(
            *(
                self.reports.append([ev], msg_id=f"bind-{ev.aggregate.id}-{self.host}")
                for ev in events
            ),
            return_exceptions=True,
        )
        for ev, res in zip(events, results, strict=True):
            if isinstance(res, BaseException):
                # (reported again by the next deep pass)
                self._reported.discard(ev.aggregate.id)
                log.warning("port.bound not appended", port=ev.aggregate.id, error=str(res))

    async def _addresses(self, ports: set[str] | None) -> None:
        """Hand out this host's addresses of routed networks to ports placed
        here (``ports``: those touched; None: all), claiming and returning
        blocks as needed (``ipam``). Every decision is appended on the
        condition that its subject did not move; refused, it is worked out
        again once the events that beat it are folded (they follow on the
        stream)."""
        if ports is None:
            self._ipam_all = True
        else:
            self._ipam_todo |= ports
        t = self.topology
        if not t.routed:
            self._ipam_todo.clear()
            return
        if self._ipam_lock.locked():
            return  # (the call holding it takes the ports too)
        async with self._ipam_lock:
            todo = None if self._ipam_all else self._ipam_todo
            self._ipam_todo, self._ipam_all = set(), False
            w = ipam.work(t, self.host, todo)
            if w.exhausted:
                log.warning("no address block left", host=self.host, networks=w.exhausted)
            if not w:
                if self._retry:
                    self._spawn(self._append_reports([]))
                return
            stored: set[tuple[str, str]] = set()  # (network, block) of addresses stored
            for step in ipam.steps(t, self.host, w, self.actor):
                # (subjects without the host: through the relay, which checks)
                results = await asyncio.gather(
                    *(self._report(a) for a in step),
                    return_exceptions=True,
                )
                failed = False
                for a, res in zip(step, results, strict=True):
                    if isinstance(res, BaseException):
                        if not isinstance(res, ConcurrencyConflict):
                            log.warning("addresses not appended", host=self.host, error=str(res))
                        failed = True
                        continue
                    # Stored: folded now, so the next decision starts from
                    # them and the ports are wired without waiting for the
                    # events to come round (they fold to the same state again).
                    for seq, ev in zip(res.seqs, a.events, strict=True):
                        t.apply(seq, ev, own=True)
                        if isinstance(ev, nw.BlockAddresses):
                            stored.add((ev.network, ev.block))
                if failed:
                    # (another host claimed first, or the store failed: all
                    # again, once the events that beat it are folded)
                    self._ipam_all = True
                    break
            # The addresses stored are decided: each port's own record of it
            # follows in the background (its host wires it meanwhile, as a
            # VXLAN port is wired before its port.bound is appended).
            self._spawn(self._append_reports(ipam.assignments(w, self.host, self.actor, stored)))
            log.info(
                "addresses",
                host=self.host,
                assigned=len(w.assigns),
                released=len(w.releases),
                claimed=[b for _, b in w.claims],
                ahead=[b for _, b in w.ahead],
                returned=[b for _, b in w.returns],
                refused=self._ipam_all,
            )

    # -- BGP sessions ------------------------------------------------------------------

    async def _watch_bgp(self) -> None:
        while True:
            await asyncio.sleep(self.bgp_poll)
            try:
                await self._observe_bgp()
            except Exception:
                log.exception("watching BGP failed", host=self.host)

    async def _observe_bgp(self) -> None:
        """Record sessions that went down (with the routes that went) and
        came back (with the routes that came back)."""
        sessions = await self._in_thread(self.kernel.sessions)
        if sessions is None:
            return  # no BIRD here (no routed network, or it is being restarted)
        before, self._sessions = self._sessions, sessions
        changed = {p for p, up in sessions.items() if before.get(p) != up} | set(self._lost)
        if not changed:
            return
        routes = await self._in_thread(self.kernel.bird_routes)
        t = self.topology
        events = []
        cause = Cause(self.actor, new_id(), new_id())
        for peer in sorted(changed):
            theirs = sorted(b for b, (_, h) in t.blocks.items() if h == peer)
            up = sessions.get(peer, False)
            if not up and before.get(peer) and peer not in self._lost:
                self._lost[peer] = 0
                gone = [b for b in theirs if b not in routes]
                events.append(self._peer_event(cause, nw.PeerLost, peer, withdrawn=gone))
            elif up and peer in self._lost:
                learned = [b for b in theirs if b in routes]
                self._lost[peer] += 1
                # (routes follow the session by a moment: wait a few polls for them)
                if len(learned) == len(theirs) or self._lost[peer] > 5:
                    del self._lost[peer]
                    events.append(self._peer_event(cause, nw.PeerRestored, peer, learned=learned))
        for ev in events:
            log.info(ev.type_name(), host=self.host, peer=ev.peer)  # type: ignore[attr-defined]
            await self.store.append([ev])

    @property
    def bgp_sessions(self) -> dict[str, bool]:
        """The BGP sessions as this agent last saw them (peer host -> established)."""
        return dict(self._sessions)

    def _peer_event(self, cause: Cause, cls: type, peer: str, **kw: Any) -> Any:
        return cause.make(cls, SYSTEM, "network-agent", self.host, host=self.host, peer=peer, **kw)

    async def converged(self, seq: int, timeout: float = 10.0) -> None:
        """Wait until the host matches the log up to ``seq`` (tests, benchmarks)."""
        deadline = time.monotonic() + timeout
        while self.converged_seq < seq or self.topology.seq < seq:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.host}: converged at {self.converged_seq}, wanted {seq}")
            await asyncio.sleep(0.02)
