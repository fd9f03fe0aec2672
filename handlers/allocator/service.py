"""The allocator: offers the unclaimed resources of alive, enabled hosts to
frameworks, lowest dominant share first (``drf``).

Its state is a fold of the hosts' subjects (the scheduler's ``HostTable``:
capacity, claims, enabled; liveness from the heartbeat bucket), the
frameworks' and the offers' subjects. Every ``interval_s``, and at once
when something frees resources or ends an offer, it rescinds offers past
their expiry and offers every host that has room and no live offer.

An offer is ``offer.made`` (under the framework's tenant) and
``host.offered`` (on the host's subject) in one atomic batch, on the
condition that nothing came on the host since the state the allocator
decided on. So replicas are safe as the scheduler's are: two of them
offering the same host at once get one offer, never two, and a host is
offered to one framework at a time (never the same resources twice).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import msgspec
import structlog

from stratus.events.errors import ConcurrencyConflict, StratusError
from stratus.events.frameworks import (
    FRAMEWORK_BEATS,
    FrameworkRegistered,
    FrameworkRemoved,
    FrameworkReregistered,
    HostOffered,
    HostOfferEnded,
    OfferAccepted,
    OfferDeclined,
    OfferMade,
    OfferRescinded,
    TaskFailed,
)
from stratus.events.heartbeat import Liveness
from stratus.events.ids import new_id
from stratus.events.model import Cause, Event, UnknownEvent
from stratus.events.resources import (
    SYSTEM,
    HostDisabled,
    HostRemoved,
    HostUpdated,
)
from stratus.events.scheduling import HostClaimed, HostReleased
from stratus.events.store import Condition, EventStore
from stratus.handlers.allocator.drf import Framework, Res, dominant_share, plan_offers
from stratus.handlers.frameworks import MIN_RAM_MB, MIN_VCPUS
from stratus.handlers.scheduler.service import fold_log, follow_log
from stratus.handlers.scheduler.table import HostTable

log = structlog.get_logger("stratus.allocator")

ACTOR = "allocator"
SUBJECTS = ("ev._system.host.>", "ev.*.framework.*", "ev.*.offer.*")


class AllocatorConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    # Seconds between allocation passes when nothing wakes the allocator.
    interval_s: float = 1.0
    # Seconds an offer stays open before it is rescinded.
    offer_timeout_s: float = 30.0


class OpenOffer(msgspec.Struct, frozen=True):
    tenant: str
    framework: str
    host: str
    expires_at: float


class AllocatorService:
    def __init__(
        self, store: EventStore, config: AllocatorConfig | None = None, *, liveness: bool = True
    ) -> None:
        self.store = store
        self.config = config or AllocatorConfig()
        self.use_liveness = liveness
        self.table = HostTable()
        self.liveness: Liveness | None = None
        # framework id -> its failover timeout, and until when it is alive
        # (its registration counts as a beat; then its beats, if any, and
        # the subject's last sequence a removal is conditioned on.
        self.failover: dict[str, float] = {}
        self.fw_until: dict[str, float] = {}
        self.fw_seq: dict[str, int] = {}
        self.fw_liveness: Liveness | None = None
        # framework id -> (tenant, weight); offer id -> the open offer;
        # host -> its live offer; task (server) -> (framework, resources).
        self.frameworks: dict[str, tuple[str, float]] = {}
        self.offers: dict[str, OpenOffer] = {}
        self.host_offer: dict[str, str] = {}
        # offer id -> the sequence of its ``offer.made`` (a rescind is
        # conditioned on nothing having come on the offer since).
        self.offer_seq: dict[str, int] = {}
        self.tasks: dict[str, tuple[str, Res]] = {}
        # task (server) -> (tenant, host), to fail and release it on removal.
        self.task_at: dict[str, tuple[str, str]] = {}
        # (framework, host) -> until when the framework refuses the host.
        self.refused: dict[tuple[str, str], float] = {}
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False
        self.made = self.rescinded = self.conflicts = self.removed = 0

    # -- lifecycle -------------------------------------------------------------

    async def start(self) -> None:
        end = await fold_log(self.store, SUBJECTS, self._fold)
        self._tasks.append(asyncio.create_task(follow_log(self.store, end, SUBJECTS, self._fold)))
        if self.use_liveness:
            self.liveness = Liveness(self.store.js, on_change=self._alive)
            await self.liveness.start()
        self.fw_liveness = Liveness(self.store.js, on_change=self._fw_beat, name=FRAMEWORK_BEATS)
        await self.fw_liveness.start()
        self._tasks.append(asyncio.create_task(self._loop()))
        log.info("allocator started", hosts=len(self.table), frameworks=len(self.frameworks))

    async def stop(self) -> None:
        self._closing = True
        for t in self._tasks:
            t.cancel()
        await asyncio.wait(self._tasks, timeout=5)
        self._tasks.clear()
        for lv in (self.liveness, self.fw_liveness):
            if lv is not None:
                await lv.stop()

    def _fw_beat(self, framework: str, until: float) -> None:
        if until > 0:  # (an expiry marker: the last beat's deadline stands)
            self.fw_until[framework] = max(self.fw_until.get(framework, 0.0), until)

    def _alive(self, host: str, until: float) -> None:
        self.table.set_alive(host, until)
        self._wake.set()

    # -- state -------------------------------------------------------------------

    def _fold(self, seq: int, rec: Any) -> None:
        try:
            e = rec.decode()
        except UnknownEvent:
            return
        self.apply(seq, e)

    def apply(self, seq: int, e: Event) -> None:
        """Fold one event of the hosts', frameworks' or offers' subjects."""
        if seq <= self.table.last_applied:
            return
        self.table.apply(seq, e)
        wake = True
        if isinstance(e, FrameworkRegistered):
            fid = e.aggregate.id
            self.frameworks[fid] = (e.tenant, e.weight)
            self.failover[fid] = e.failover_timeout_s
            self.fw_until[fid] = max(
                self.fw_until.get(fid, 0.0), e.at.timestamp() + e.failover_timeout_s
            )
            self.fw_seq[fid] = seq
        elif isinstance(e, FrameworkReregistered):
            fid = e.aggregate.id
            back = e.at.timestamp() + self.failover.get(fid, 60.0)
            self.fw_until[fid] = max(self.fw_until.get(fid, 0.0), back)
            self.fw_seq[fid] = seq
        elif isinstance(e, FrameworkRemoved):
            fid = e.aggregate.id
            for d in (self.frameworks, self.failover, self.fw_until, self.fw_seq):
                d.pop(fid, None)
        elif isinstance(e, OfferMade):
            self.offers[e.aggregate.id] = OpenOffer(e.tenant, e.framework, e.host, e.expires_at)
            self.offer_seq[e.aggregate.id] = seq
            wake = False
        elif isinstance(e, (OfferAccepted, OfferDeclined, OfferRescinded)):
            self.offers.pop(e.aggregate.id, None)
            self.offer_seq.pop(e.aggregate.id, None)
        elif isinstance(e, HostOffered):
            self.host_offer[e.aggregate.id] = e.offer
            wake = False
        elif isinstance(e, HostOfferEnded):
            if self.host_offer.get(e.aggregate.id) == e.offer:
                del self.host_offer[e.aggregate.id]
            if e.framework and e.refuse_seconds > 0:
                self.refused[(e.framework, e.aggregate.id)] = e.at.timestamp() + e.refuse_seconds
        elif isinstance(e, HostClaimed):
            # A claim changes what is free there: the live offer is stale.
            self.host_offer.pop(e.aggregate.id, None)
            if e.spec.framework:
                s = e.spec
                self.tasks[e.server] = (s.framework, Res(s.vcpus, s.ram_mb, s.disk_gb))
                self.task_at[e.server] = (e.server_tenant, e.aggregate.id)
        elif isinstance(e, HostReleased):
            self.tasks.pop(e.server, None)
            self.task_at.pop(e.server, None)
        elif isinstance(e, (HostUpdated, HostDisabled, HostRemoved)):
            self.host_offer.pop(e.aggregate.id, None)
        if wake:
            self._wake.set()

    async def _loop(self) -> None:
        while not self._closing:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.config.interval_s)
            self._wake.clear()
            try:
                await self.allocate()
            except Exception:
                log.exception("allocation pass failed")
                await asyncio.sleep(0.5)

    # -- what is where --------------------------------------------------------------

    def usable(self, now: float) -> list[int]:
        """Rows of hosts that may be offered at all: alive (when liveness is
        watched), enabled, registered, running containers."""
        t = self.table
        ok = t.col("exists") & t.col("enabled") & t.col("container")
        if self.use_liveness:
            ok &= t.col("alive_until") > now
        return [int(i) for i in ok.nonzero()[0]]

    def total(self, rows: list[int]) -> Res:
        t = self.table
        return Res(
            float(t.cap_vcpus[rows].sum()),
            float(t.cap_ram[rows].sum()),
            float(t.cap_disk[rows].sum()),
        )

    def held(self) -> dict[str, Res]:
        out: dict[str, Res] = {}
        for fid, res in self.tasks.values():
            out[fid] = out.get(fid, Res()) + res
        return out

    def shares(self, now: float | None = None) -> dict[str, float]:
        """Each framework's dominant share of the usable hosts, by what it holds."""
        total = self.total(self.usable(time.time() if now is None else now))
        held = self.held()
        return {
            fid: dominant_share(held.get(fid, Res()), total, w)
            for fid, (_t, w) in self.frameworks.items()
        }

    # -- one pass --------------------------------------------------------------------

    async def allocate(self, now: float | None = None) -> int:
        """Rescind expired offers, then offer every free host; returns how
        many offers were made."""
        now = time.time() if now is None else now
        await self._rescind_expired(now)
        await self._remove_gone(now)
        if not self.frameworks:
            return 0
        t = self.table
        rows = self.usable(now)
        free: dict[str, Res] = {}
        for i in rows:
            name = t.names[i]
            if name in self.host_offer:
                continue
            res = Res(
                float(t.cap_vcpus[i] - t.used_vcpus[i]),
                float(t.cap_ram[i] - t.used_ram[i]),
                float(t.cap_disk[i] - t.used_disk[i]),
            )
            if res.vcpus >= MIN_VCPUS and res.ram_mb >= MIN_RAM_MB:
                free[name] = res
        if not free:
            return 0
        self.refused = {k: v for k, v in self.refused.items() if v > now}
        refused: dict[str, set[str]] = {}
        for fid, host in self.refused:
            refused.setdefault(fid, set()).add(host)
        # Only frameworks that are alive (beating, or just registered).
        fws = [
            Framework(fid, w)
            for fid, (_t, w) in self.frameworks.items()
            if self.fw_until.get(fid, 0.0) > now
        ]
        plan = plan_offers(free, fws, self.held(), self.total(rows), refused)
        results = await asyncio.gather(
            *(self._offer(o.host, o.framework, o.resources, now) for o in plan)
        )
        return sum(results)

    async def _offer(self, host: str, fid: str, res: Res, now: float) -> int:
        t = self.table
        row = t.index[host]
        expected = int(t.last_seq[row])
        tenant, _w = self.frameworks[fid]
        oid = new_id()
        cause = Cause(actor=ACTOR, correlation_id=oid, causation_id=oid)
        expires = now + self.config.offer_timeout_s
        events: list[Event] = [
            cause.make(
                OfferMade,
                tenant,
                "offer",
                oid,
                framework=fid,
                host=host,
                vcpus=res.vcpus,
                ram_mb=res.ram_mb,
                disk_gb=res.disk_gb,
                expires_at=expires,
            ),
            cause.make(
                HostOffered, SYSTEM, "host", host, offer=oid, framework=fid, framework_tenant=tenant
            ),
        ]
        try:
            res_ = await self.store.append(
                events, Condition(f"ev.{SYSTEM}.host.{host}", expected, 1)
            )
        except ConcurrencyConflict:
            self.conflicts += 1  # the host moved (a claim, a replica's offer): next pass
            return 0
        except StratusError as err:
            log.warning("offer not appended", host=host, error=str(err))
            return 0
        self.host_offer.setdefault(host, oid)
        self.offers.setdefault(oid, OpenOffer(tenant, fid, host, expires))
        self.offer_seq.setdefault(oid, res_.seqs[0])
        self.made += 1
        return 1

    async def _rescind_expired(self, now: float) -> None:
        for oid, o in list(self.offers.items()):
            if o.expires_at > now:
                continue
            cause = Cause(actor=ACTOR, correlation_id=oid, causation_id=oid)
            events: list[Event] = [
                cause.make(OfferRescinded, o.tenant, "offer", oid, reason="expired"),
                # Unanswered, it counts as declined for as long as it was open:
                # the host goes to another framework, and an idle one is not
                # offered the same host again (two events) every timeout.
                cause.make(
                    HostOfferEnded,
                    SYSTEM,
                    "host",
                    o.host,
                    offer=oid,
                    framework=o.framework,
                    refuse_seconds=self.config.offer_timeout_s,
                ),
            ]
            # On the offer's own subject: nothing (an acceptance, a decline)
            # came since it was made. The host may have moved; that is fine.
            cond = Condition(f"ev.{o.tenant}.offer.{oid}", self.offer_seq.get(oid, 0), 0)
            try:
                await self.store.append(events, cond)
            except ConcurrencyConflict:
                continue  # accepted or declined meanwhile
            except StratusError as err:
                log.warning("rescind not appended", offer=oid, error=str(err))
                continue
            self.offers.pop(oid, None)
            self.offer_seq.pop(oid, None)
            if self.host_offer.get(o.host) == oid:
                del self.host_offer[o.host]
            self.rescinded += 1

    async def _remove_gone(self, now: float) -> None:
        """Frameworks silent past their failover timeout: ``framework.removed``,
        each of its tasks ``task.failed`` with its claim released, its open
        offers rescinded, in one atomic batch on the condition that nothing
        came on the framework's subject since (a re-registration wins)."""
        for fid, until in list(self.fw_until.items()):
            if until > now or fid not in self.frameworks:
                continue
            tenant, _w = self.frameworks[fid]
            cause = Cause(actor=ACTOR, correlation_id=new_id(), causation_id=fid)
            why = f"no beat for its failover timeout ({self.failover.get(fid, 0):g} s)"
            events: list[Event] = [
                cause.make(FrameworkRemoved, tenant, "framework", fid, reason=why)
            ]
            for server, (f, _res) in self.tasks.items():
                if f != fid or server not in self.task_at:
                    continue
                t_tenant, host = self.task_at[server]
                events.append(cause.make(TaskFailed, t_tenant, "server", server, reason=why))
                events.append(
                    cause.make(
                        HostReleased,
                        SYSTEM,
                        "host",
                        host,
                        server=server,
                        server_tenant=t_tenant,
                        reason="framework removed",
                    )
                )
            for oid, o in self.offers.items():
                if o.framework == fid:
                    events.append(cause.make(OfferRescinded, o.tenant, "offer", oid, reason=why))
                    events.append(
                        cause.make(HostOfferEnded, SYSTEM, "host", o.host, offer=oid, framework=fid)
                    )
            cond = Condition(f"ev.{tenant}.framework.{fid}", self.fw_seq.get(fid, 0), 0)
            try:
                await self.store.append(events[:1000], cond)
            except ConcurrencyConflict:
                continue  # re-registered (or removed by a replica) meanwhile
            except StratusError as err:
                log.warning("framework removal not appended", framework=fid, error=str(err))
                continue
            self.removed += 1
            log.info("framework removed", framework=fid, tasks=(len(events) - 1) // 2)

    def stats(self) -> dict[str, int]:
        return {
            "frameworks": len(self.frameworks),
            "open_offers": len(self.offers),
            "offers_made": self.made,
            "rescinded": self.rescinded,
            "conflicts": self.conflicts,
        }
