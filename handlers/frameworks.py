"""Frameworks and their answers to offers (two-level scheduling; see
``events.frameworks`` for the events and ``handlers.allocator`` for who
makes the offers).

``framework register`` is decided on the tenant's world. ``offer accept``
and ``task update`` are decided on the tenant's world and on the offer's
(or task's) host subject at once: both conditions go into
one atomic batch (``Handler.also``). So an acceptance lands only if the
offer is still the host's live offer and nothing was claimed there since,
and its tasks' claims are folded, checked and appended exactly as the
scheduler's are: one capacity truth per host.
"""

from __future__ import annotations

import time
from typing import Any

from stratus.events.commands import Reply
from stratus.events.errors import AlreadyExists, Conflict, Invalid, NotFound
from stratus.events.frameworks import (
    FRAMEWORK_BEATS,
    FrameworkBeat,
    FrameworkRegister,
    FrameworkRegistered,
    FrameworkReregistered,
    HostOffered,
    HostOfferEnded,
    OfferAccept,
    OfferAccepted,
    OfferDecline,
    OfferDeclined,
    TaskFailed,
    TaskFinished,
    TaskRef,
    TaskRunning,
    TaskUpdate,
)
from stratus.events.heartbeat import beat
from stratus.events.ids import new_id
from stratus.events.model import Cause, Event
from stratus.events.resources import (
    SYSTEM,
    HostDisabled,
    HostEnabled,
    HostRegistered,
    HostRemoved,
    HostUpdated,
    ServerRequested,
    ServerScheduled,
    ServerSpec,
)
from stratus.events.scheduling import HostClaimed, HostReleased
from stratus.handlers import quota
from stratus.handlers.registry import Handler, Special
from stratus.handlers.resources import tenant_handler
from stratus.handlers.world import World, fold, live_tenant, system_subject

# How much of a resource an offer must hold to be worth making (Mesos'
# min_allocatable_resources): less than one vCPU or 32 MB is never offered.
MIN_VCPUS = 1.0
MIN_RAM_MB = 32.0


def subjects(tenant: str, framework: str) -> dict[str, str]:
    """The NATS subjects a framework uses, all under its tenant (its users'
    and integrations' permissions cover them)."""
    return {
        "offers": f"ev.{tenant}.offer.*",
        "tasks": f"ev.{tenant}.server.*",
        "framework": f"ev.{tenant}.framework.{framework}",
        "accept": "cmd.offer.accept",
        "decline": "cmd.offer.decline",
        "update": "cmd.task.update",
    }


class HostState:
    """One host's subject, folded for a framework's answer: its capacity
    (after ratios), its claims, and its live offer. Anything that can change
    what fits there (a claim, a capacity change, disabling, removal) ends the
    live offer: an acceptance of it is then stale."""

    __slots__ = ("cap", "claims", "enabled", "exists", "offer")

    def __init__(self) -> None:
        self.exists = self.enabled = False
        self.cap = (0.0, 0.0, 0.0)
        self.claims: dict[str, tuple[int, int, int]] = {}
        self.offer = ""

    def free(self) -> tuple[float, float, float]:
        used = [sum(c[i] for c in self.claims.values()) for i in range(3)]
        return (self.cap[0] - used[0], self.cap[1] - used[1], self.cap[2] - used[2])


def fold_host(h: HostState, e: Event) -> HostState:
    if isinstance(e, (HostRegistered, HostUpdated)):
        h.cap = (e.vcpus * e.cpu_ratio, e.ram_mb * e.ram_ratio, e.disk_gb * e.disk_ratio)
        h.offer = ""
        if isinstance(e, HostRegistered):
            h.exists = h.enabled = True
    elif isinstance(e, HostEnabled):
        h.enabled = True
    elif isinstance(e, (HostDisabled, HostRemoved)):
        h.enabled, h.offer = False, ""
        if isinstance(e, HostRemoved):
            h.exists = False
    elif isinstance(e, HostClaimed):
        h.claims[e.server] = (e.spec.vcpus, e.spec.ram_mb, e.spec.disk_gb)
        h.offer = ""
    elif isinstance(e, HostReleased):
        h.claims.pop(e.server, None)
    elif isinstance(e, HostOffered):
        h.offer = e.offer
    elif isinstance(e, HostOfferEnded) and h.offer == e.offer:
        h.offer = ""
    return h


# -- framework register ----------------------------------------------------------


def decide_register(w: World, cmd: FrameworkRegister, cause: Cause) -> list[Event]:
    t = cmd.tenant or ""
    live_tenant(w, t)
    if cmd.id is not None:
        # Failover: the same framework back, its tasks still its own.
        fw = w.of("framework").get(cmd.id)
        if fw is None:
            raise NotFound(
                f"framework {cmd.id} not found in tenant {t} (past its failover "
                "timeout it was removed and its tasks killed)"
            )
        if fw.get("name") != cmd.name:
            raise Invalid(f"framework {cmd.id} is named {fw.get('name')}, not {cmd.name}")
        return [cause.make(FrameworkReregistered, t, "framework", cmd.id)]
    if any(f.get("name") == cmd.name for f in w.of("framework").values()):
        raise AlreadyExists(f"a framework named {cmd.name} already exists in tenant {t}")
    return [
        cause.make(
            FrameworkRegistered,
            t,
            "framework",
            new_id(),
            name=cmd.name,
            role=cmd.role,
            weight=cmd.weight,
            failover_timeout_s=cmd.failover_timeout_s,
        )
    ]


def _registered(w: World, events: list[Event]) -> Any:
    for e in events:
        if isinstance(e, (FrameworkRegistered, FrameworkReregistered)):
            fw = w.of("framework").get(e.aggregate.id, {})
            keep = ("name", "role", "weight", "failover_timeout_s", "status")
            return {
                "id": e.aggregate.id,
                **{k: fw.get(k) for k in keep},
                "subjects": subjects(e.tenant, e.aggregate.id),
            }
    return None


async def run_beat(service: Any, cmd: FrameworkBeat, cause: Cause) -> Reply:
    """The framework is alive: a beat in ``FRAMEWORK_BEATS`` for its failover
    timeout (nothing on the log: liveness is not history)."""
    t = cmd.tenant or ""
    w = World()
    w.tenant = t
    async for batch in service.store.read(subjects=[f"ev.{t}.framework.*"]):
        for rec in batch:
            fold(w, rec.decode(service.store.codec))
    fw = w.of("framework").get(cmd.framework)
    if fw is None:
        raise NotFound(f"framework {cmd.framework} not found in tenant {t}")
    ttl = float(fw.get("failover_timeout_s") or 60.0)
    await beat(service.store.js, cmd.framework, ttl=ttl, name=FRAMEWORK_BEATS)
    return Reply(ok=True, data={"id": cmd.framework, "alive_for_s": ttl})


# -- offer accept / decline --------------------------------------------------------


def _open_offer(w: World, ref: str) -> dict[str, Any]:
    offer = w.of("offer").get(ref)
    if offer is None:
        raise Conflict(
            f"offer {ref} is not open in tenant {w.tenant} "
            "(accepted, declined, rescinded, or never made)"
        )
    return offer


def decide_accept(state: tuple[World, HostState], cmd: OfferAccept, cause: Cause) -> list[Event]:
    w, host = state
    t = cmd.tenant or ""
    live_tenant(w, t)
    offer = _open_offer(w, cmd.offer)
    if offer["host"] != cmd.host:
        raise Invalid(f"offer {cmd.offer} is of host {offer['host']}, not {cmd.host}")
    fid = offer["framework"]
    if fid not in w.of("framework"):
        raise Conflict(f"framework {fid} of offer {cmd.offer} is gone")
    if host.offer != cmd.offer:
        raise Conflict(
            f"offer {cmd.offer} is stale: host {cmd.host} changed since it was made; "
            "wait for a new offer"
        )
    if offer["expires_at"] < time.time():
        raise Conflict(f"offer {cmd.offer} expired")
    want = [
        sum(x.vcpus for x in cmd.tasks),
        sum(x.ram_mb for x in cmd.tasks),
        sum(x.disk_gb for x in cmd.tasks),
    ]
    held = [offer["vcpus"], offer["ram_mb"], offer["disk_gb"]]
    for what, need, has in zip(("vCPUs", "MB RAM", "GB disk"), want, held, strict=True):
        if need > has + 1e-9:
            raise Invalid(f"the tasks need {need:g} {what}; offer {cmd.offer} holds {has:g}")
    free = host.free()
    if any(need > has + 1e-9 for need, has in zip(want, free, strict=True)):
        # (The live offer guarantees this; checked as the scheduler checks.)
        raise Conflict(f"host {cmd.host} no longer has room for these tasks")
    names = [x.name for x in cmd.tasks]
    if len(set(names)) != len(names):
        raise Invalid("a task name is given twice")
    for n in names:
        if w.servers.named(n) is not None:
            raise AlreadyExists(f"a server named {n} already exists in tenant {t}")
    quota.check(w, {"instances": len(cmd.tasks), "vcpus": want[0], "ram_mb": want[1]})
    claims: list[Event] = []
    tenant_events: list[Event] = []
    ids = []
    for task in cmd.tasks:
        image = ""
        if task.image:
            img = w.images.named(task.image) or w.images.get(task.image)
            if img is None:
                raise NotFound(f"image {task.image} not found in tenant {t}")
            image = img.id
        sid = new_id()
        ids.append(sid)
        spec = ServerSpec(
            name=task.name,
            image=image,
            vcpus=task.vcpus,
            ram_mb=task.ram_mb,
            disk_gb=task.disk_gb,
            instance_type="container",
            requested_host=cmd.host,
            framework=fid,
        )
        tenant_events.append(cause.make(ServerRequested, t, "server", sid, spec=spec))
        claims.append(
            cause.make(
                HostClaimed, SYSTEM, "host", cmd.host, server=sid, server_tenant=t, spec=spec
            )
        )
        tenant_events.append(
            cause.make(
                ServerScheduled,
                t,
                "server",
                sid,
                host=cmd.host,
                scheduling={"offer": cmd.offer, "framework": fid},
            )
        )
    accepted = cause.make(OfferAccepted, t, "offer", cmd.offer, tasks=ids)
    return [*tenant_events, *claims, accepted]


def _accepted(w: World, events: list[Event]) -> Any:
    tasks = [
        {"id": e.aggregate.id, "name": e.spec.name, "host": e.spec.requested_host}
        for e in events
        if isinstance(e, ServerRequested)
    ]
    return {
        "offer": next((e.aggregate.id for e in events if isinstance(e, OfferAccepted)), ""),
        "tasks": tasks,
    }


def decide_decline(w: World, cmd: OfferDecline, cause: Cause) -> list[Event]:
    """Ends the offer; ``host.offer-ended`` tells the host's subject (and the
    allocator, which then leaves that host to others for ``refuse_seconds``)."""
    t = cmd.tenant or ""
    offer = _open_offer(w, cmd.offer)
    return [
        cause.make(OfferDeclined, t, "offer", cmd.offer, refuse_seconds=cmd.refuse_seconds),
        cause.make(
            HostOfferEnded,
            SYSTEM,
            "host",
            offer["host"],
            offer=cmd.offer,
            framework=offer["framework"],
            refuse_seconds=cmd.refuse_seconds,
        ),
    ]


# -- task status -------------------------------------------------------------------


def _task(w: World, ref: str) -> Any:
    s = w.servers.find(ref)
    if not s.spec.framework:
        raise Invalid(f"server {s.name} is not a framework's task")
    return s


def decide_task_update(
    state: tuple[World, HostState], cmd: TaskUpdate, cause: Cause
) -> list[Event]:
    w, host = state
    t = cmd.tenant or ""
    s = _task(w, cmd.task)
    if s.host != cmd.host:
        raise Invalid(f"task {s.name} is on host {s.host or '(none)'}, not {cmd.host}")
    if cmd.state == "finished":
        ended: Event = cause.make(TaskFinished, t, "server", s.id)
    else:
        ended = cause.make(TaskFailed, t, "server", s.id, reason=cmd.reason)
    if s.id not in host.claims:
        raise Conflict(f"task {s.name} holds no claim on host {cmd.host}")
    released = cause.make(
        HostReleased,
        SYSTEM,
        "host",
        cmd.host,
        server=s.id,
        server_tenant=t,
        reason=f"task {cmd.state}",
    )
    return [ended, released]


def decide_task_running(w: World, cmd: TaskRef, cause: Cause) -> list[Event]:
    s = _task(w, cmd.task)
    if s.status == "running":
        return []
    return [cause.make(TaskRunning, cmd.tenant or "", "server", s.id)]


def _task_result(w: World, events: list[Event]) -> Any:
    for e in events:
        if isinstance(e, (TaskRunning, TaskFinished, TaskFailed)):
            return {"id": e.aggregate.id, "status": e.status}
    return None


def _declined(w: World, events: list[Event]) -> Any:
    return {"offer": events[0].aggregate.id, "status": "declined"} if events else None


def _tenant(cmd: Any) -> str | None:
    return cmd.tenant


def _host_of(cmd: Any) -> str:
    """The host's subject as a filter of its own, ``ev.*.host.<name>``: it
    matches exactly ``ev._system.host.<name>`` (only the cloud has hosts), but
    the command service caches one state per boundary string, and the host
    verbs cache the host's record (``Aggregate``) under the plain subject;
    this fold (claims and the live offer) must not share that entry."""
    subject = system_subject("host", cmd.host)
    return subject.replace(f"ev.{SYSTEM}.", "ev.*.", 1)


def handlers(quota_defaults: dict[str, int] | None = None) -> list[Handler]:
    def world() -> World:
        return World(quota_defaults)

    on_host = {"also": _host_of, "also_initial": HostState, "also_fold": fold_host}
    return [
        Special("framework.beat", FrameworkBeat, "framework.beat", run_beat, tenant_of=_tenant),
        tenant_handler(
            "framework.register", FrameworkRegister, decide_register, world, result=_registered
        ),
        tenant_handler(
            "offer.accept", OfferAccept, decide_accept, world, result=_accepted, **on_host
        ),
        tenant_handler("offer.decline", OfferDecline, decide_decline, world, result=_declined),
        tenant_handler(
            "task.update", TaskUpdate, decide_task_update, world, result=_task_result, **on_host
        ),
        tenant_handler("task.running", TaskRef, decide_task_running, world, result=_task_result),
    ]
