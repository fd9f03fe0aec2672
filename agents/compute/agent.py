"""The compute agent of one host: events on ``ev._system.host.<name>`` in,
instances on the host and their result events out.

It has the network agent's shape: the log folded into the host's desired
state (``desired.fold``), the host probed through its drivers, and one
``converge()`` that applies the difference and reports it, for every event
and for the periodic pass alike.

- Registers the host (``host.registered``, or ``host.updated`` when its
  capacity or labels changed; nothing when a restart changed nothing).
- Heartbeats into the KV bucket (``events.heartbeat``), never the log.
- On start, folds the host's whole subject in log order and converges every
  instance it names, so work claimed before a crash is finished (or
  reported as found) at once, not when the broker redelivers it.
- Consumes the host's subject with a durable consumer whose only job is to
  fold new events and converge the servers they touch; an event is
  acknowledged once that is done. A redelivered event (older than what was
  folded) changes nothing in the desired state: a claim redelivered after
  its server was deleted builds nothing.
- Every report on a server's subject (``server.building``, ``running``,
  ``stopped``, ``build-failed``, ``failed``, ``deleted``) is appended on
  the condition that the subject has not moved since the agent read the
  state its work was for, so no report can contradict the server's later
  history (a ``server.running`` after ``server.deleting``, say). Its
  credential may append on its host's subject only: reports on servers'
  subjects go through the handlers' relay (``events.reports``), which
  appends them if the server is placed on this host.
- Converges every ``reconcile_interval`` too: instances the log wants and
  the host lacks are rebuilt, Stratus-owned ones it no longer wants are
  removed, and what had to change although the log did not ask for it is
  recorded as drift (``host.reconciled``).
- Serves ``agent.<host>.exec`` (container exec) to the command handlers,
  which authenticate and authorise the caller before forwarding.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import os
import weakref
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import nats.errors
import nats.js.errors
import structlog
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from stratus.agents.compute import images, layers
from stratus.agents.compute.containers import ContainerDriver
from stratus.agents.compute.desired import Desired, Want, fold
from stratus.agents.compute.driver import Driver, ExecResult, PowerState
from stratus.agents.compute.spec import ID_RE, InstanceSpec, check
from stratus.events import oci
from stratus.events.blobs import BlobStore, upload_bucket
from stratus.events.compute import HostReconciled, HostServerAction
from stratus.events.errors import (
    ConcurrencyConflict,
    HostError,
    Invalid,
    StratusError,
    Unavailable,
)
from stratus.events.heartbeat import beat
from stratus.events.ids import NAME_RE, new_id
from stratus.events.model import Cause, Event
from stratus.events.natscreds import durable_name
from stratus.events.pull import fetch_ready
from stratus.events.reports import Reporter
from stratus.events.resources import (
    SYSTEM,
    HostRegistered,
    HostUpdated,
    ImageCreated,
    ServerBuilding,
    ServerDeleted,
    ServerFailed,
    ServerRunning,
    ServerStopped,
)
from stratus.events.scheduling import HEARTBEAT_INTERVAL, HostClaimed, ServerBuildFailed
from stratus.events.store import STREAM, Condition, EventStore

log = structlog.get_logger("stratus.compute")

FETCH_BATCH = 64
# An event whose handling keeps failing (not a refusal by the host, which is
# reported, but an error of the agent's own) is tried this often, then given up.
MAX_DELIVERIES = 5
RETRY_DELAY_S = 5.0
# A delivery lost on its way (the node leading the consumer died, the
# agent's connection was moving to another node) is sent again only after
# the consumer's ack_wait, and nothing else would bring its event to the
# agent: so it is short, and the agent keeps the events it works on alive
# with in-progress acks (every third of it) while a build takes longer.
ACK_WAIT_S = 15.0
# A server's subject moving while the agent works on it (a verb, a report of
# the scheduler's) makes it look again; this often at most per pass.
MAX_LOOKS = 4
# Servers one periodic pass works on at once.
PASS_CONCURRENCY = 8
# A beat not answered in BEAT_TIMEOUT_S is sent again BEAT_RETRY_S later.
BEAT_TIMEOUT_S = 2.0
BEAT_RETRY_S = 1.0
EXEC_SUBJECT = "agent.{host}.exec"

# What the last event on a server's subject says its instance is doing, as
# far as the log knows. A server whose last event is not here (failed, its
# build failed or timed out, deleting, deleted, or a type this code does not
# know) is out of this host's hands: the scheduler or the tenant moves next.
REPORTED: dict[str, str] = {
    "": "building",  # nothing on its subject (a claim from a test or a foreign writer)
    "server.scheduled": "building",
    "server.building": "building",
    "server.running": "running",
    "server.reboot-requested": "running",
    "server.stop-requested": "running",
    "server.stopped": "stopped",
    "server.start-requested": "stopped",
}
# The server has not been built anywhere yet: its first build says so.
NOT_STARTED = ("", "server.scheduled")


class HostSpec(msgspec.Struct, frozen=True):
    """What the agent registers for its host."""

    vcpus: int
    ram_mb: int
    disk_gb: int
    zone: str = "nova"
    labels: dict[str, str] = {}
    types: list[str] = msgspec.field(default_factory=lambda: ["vm", "container"])


class DirectBoot(msgspec.Struct, frozen=True):
    """A host setting: boot every VM straight into this kernel and initrd
    (its overlay disk still attached), for images that carry no boot loader."""

    kernel: str
    initrd: str = ""
    cmdline: str = "console=ttyS0"


class ExecRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    server: str
    command: list[str]
    timeout: float = 60.0


class ExecReply(msgspec.Struct, frozen=True):
    ok: bool
    result: ExecResult | None = None
    error: str = ""


@dataclass
class ServerLog:
    """The last event on a server's subject, as the agent last read or wrote it."""

    seq: int
    type: str
    host: str = ""


@dataclass
class Drift:
    """What a pass changed on the host although the log did not ask for it."""

    recreated: list[str] = field(default_factory=list)
    started: list[str] = field(default_factory=list)
    stopped: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.recreated or self.started or self.stopped or self.removed)


def host_subject(host: str) -> str:
    return f"ev.{SYSTEM}.host.{host}"


def consumer_name(host: str) -> str:
    return durable_name("compute-agent", host)


def server_subject(tenant: str, server: str) -> str:
    return f"ev.{tenant}.server.{server}"


def acceptable(ev: Event) -> bool:
    """Whether the server an event names (if any) may reach paths, cgroups,
    libvirt and subjects: only ids do."""
    server = getattr(ev, "server", None)
    if server is None:
        return True
    tenant = getattr(ev, "server_tenant", "")
    return bool(ID_RE.match(server)) and bool(ID_RE.match(tenant))


class ComputeAgent:
    def __init__(
        self,
        store: EventStore,
        host: str,
        *,
        data_dir: Path,
        spec: HostSpec,
        vm: Driver | None = None,
        containers: Driver | None = None,
        reconcile_interval: float = 60.0,
        heartbeat_interval: float = HEARTBEAT_INTERVAL,
        direct_boot: DirectBoot | None = None,
    ) -> None:
        if not NAME_RE.match(host):
            raise Invalid(f"host name {host!r} is not a valid name")
        self.store = store
        self.host = host
        # Reports on servers' subjects, through the relay of this host.
        self.reports = Reporter(store.nc, host, codec=store.codec)
        self.spec = spec
        self.data_dir = Path(data_dir)
        self.disks = self.data_dir / "disks"
        self.volumes = self.data_dir / "volumes"
        self.consoles = self.data_dir / "console"
        for d in (self.disks, self.volumes, self.consoles):
            d.mkdir(parents=True, exist_ok=True)
        self._blob_store: BlobStore | None = None
        self._upload_store: BlobStore | None = None
        self.cache = images.BaseCache(self.data_dir / "base", self.blobs)
        self.layers = layers.LayerStore(self.data_dir / "layers", self.blobs)
        self.drivers: dict[str, Driver] = {}
        if vm is not None:
            self.drivers["vm"] = vm
        if containers is not None:
            self.drivers["container"] = containers
        self.reconcile_interval = reconcile_interval
        self.retry_delay = RETRY_DELAY_S
        self.ack_wait = ACK_WAIT_S
        self.direct_boot = direct_boot
        self.heartbeat_interval = heartbeat_interval
        self.subject = host_subject(host)
        self.desired = Desired()
        self.actor = f"compute-agent:{host}"
        # Active images, read once (their bytes never change).
        self._images: dict[str, images.ImageRecord] = {}
        # One pass at a time per server (events and the periodic pass share them).
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
        self._tasks: list[asyncio.Task[None]] = []
        self._psub: Any = None
        self._exec_sub: Any = None
        self._stopping = asyncio.Event()
        self.handled = 0

    # -- lifecycle --------------------------------------------------------------

    async def start(self) -> None:
        await self.register()
        # The consumer first: whatever lands after the fold below is delivered.
        await self._open_consumer()
        self.desired = await self.read_host(done=await self._acked_floor())
        await self.converge()
        await self._beat_once()
        self._exec_sub = await self.store.nc.subscribe(
            EXEC_SUBJECT.format(host=self.host), cb=self._on_exec
        )
        self._tasks = [
            asyncio.create_task(self._consume(), name=f"compute-{self.host}"),
            asyncio.create_task(self._periodic(), name=f"converge-{self.host}"),
            asyncio.create_task(self._heartbeat(), name=f"heartbeat-{self.host}"),
        ]
        log.info("compute agent started", host=self.host, drivers=sorted(self.drivers))

    async def stop(self) -> None:
        self._stopping.set()
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._tasks = []
        for sub in (self._exec_sub, self._psub):
            if sub is not None:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
        self._exec_sub = self._psub = None

    def close(self) -> None:
        """Release what the drivers hold (after ``stop``)."""
        for driver in self.drivers.values():
            driver.close()

    # -- registration and heartbeat ----------------------------------------------

    async def read_host(self, until: int | None = None, done: int = 0) -> Desired:
        """The fold of the host's subject (up to sequence ``until``); events
        up to ``done`` were handled before and owe nothing."""
        d = Desired(done=done)
        async for batch in self.store.read(until=until, subjects=[self.subject]):
            self._fold(d, batch)
        return d

    def _fold(self, d: Desired, batch: Iterable[Any]) -> None:
        for rec in batch:
            try:
                event = rec.decode(self.store.codec)
            except Exception:
                event = None  # a foreign writer's bytes: not ours to act on
            if event is not None and acceptable(event):
                fold(d, event, rec.seq)
            else:
                # Skipped, but read: the subject's position (what a
                # registration is conditioned on) moves past it all the same.
                d.seq = max(d.seq, rec.seq)

    async def register(self) -> None:
        """``host.registered`` the first time, ``host.updated`` on a change."""
        want = msgspec.structs.asdict(self.spec)
        cause = Cause(actor=self.actor, correlation_id=new_id(), causation_id="agent-start")
        for _ in range(8):
            d = await self.read_host()
            if d.registered == want:
                return
            if d.registered is None:
                ev: Event = cause.make(
                    HostRegistered, SYSTEM, "host", self.host, name=self.host, **want
                )
            else:
                ev = cause.make(HostUpdated, SYSTEM, "host", self.host, **want)
            try:
                await self.store.append([ev], Condition(self.subject, d.seq))
                return
            except ConcurrencyConflict:
                continue  # a claim landed meanwhile: read again
        raise StratusError(f"could not register host {self.host}: its subject kept changing")

    async def _beat_once(self) -> None:
        with contextlib.suppress(Exception):
            await beat(self.store.js, self.host, instances=len(self.desired.instances))

    async def _heartbeat(self) -> None:
        pause = self.heartbeat_interval
        while not self._stopping.is_set():
            await asyncio.sleep(pause)
            try:
                await beat(
                    self.store.js,
                    self.host,
                    instances=len(self.desired.instances),
                    timeout=BEAT_TIMEOUT_S,
                )
                pause = self.heartbeat_interval
            except Exception as exc:
                # Again soon, not a whole interval later: while a cluster
                # elects the bucket's new leader (4-9 s) beats fail, and one
                # interval more on top would let the host's TTL lapse, so the
                # scheduler would see a live host as dead.
                log.warning("heartbeat failed", host=self.host, error=str(exc))
                pause = min(BEAT_RETRY_S, self.heartbeat_interval)

    # -- the durable consumer: new events into the desired state -------------------

    async def _open_consumer(self) -> None:
        name = consumer_name(self.host)
        config = ConsumerConfig(
            durable_name=name,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            filter_subject=self.subject,
            # (A restarted agent folds the subject itself; a redelivery is
            # for a delivery the running agent never got: see ACK_WAIT_S.)
            ack_wait=self.ack_wait,
            max_ack_pending=1000,
        )
        # Created, or updated in place (a consumer of an older agent had
        # a longer ack_wait), before binding to it.
        await self.store.js.add_consumer(STREAM, config=config)
        self._psub = await self.store.js.pull_subscribe(
            self.subject, durable=name, stream=STREAM, config=config
        )

    async def _acked_floor(self) -> int:
        info = await self.store.js.consumer_info(STREAM, consumer_name(self.host))
        return info.ack_floor.stream_seq if info.ack_floor else 0

    async def _consume(self) -> None:
        while not self._stopping.is_set():
            try:
                # (not fetch(FETCH_BATCH): with one claim waiting it holds
                # it until the batch fills or the timeout, up to 1 s)
                msgs = await fetch_ready(self._psub, FETCH_BATCH, timeout=1.0)
            except (TimeoutError, nats.errors.TimeoutError):
                continue
            except nats.errors.Error as exc:
                log.warning("fetch failed", host=self.host, error=str(exc))
                await asyncio.sleep(0.5)
                continue
            await self._handle_batch(msgs)

    async def _periodic(self) -> None:
        while not self._stopping.is_set():
            await asyncio.sleep(self.reconcile_interval)
            try:
                await self.converge()
            except Exception:
                log.exception("periodic converge failed", host=self.host)

    async def _catch_up(self) -> None:
        """Fold what the log holds after the desired state, in log order."""
        async for batch in self.store.read(after=self.desired.seq, subjects=[self.subject]):
            self._fold(self.desired, batch)

    async def _handle_batch(self, msgs: Sequence[Any]) -> None:
        touched: dict[str, list[tuple[Any, Event]]] = {}
        for m in msgs:
            try:
                ev: Event = self.store.codec.decode(m.data)
            except Exception:
                await m.term()  # not an event this code can read: never redeliver
                continue
            seq = m.metadata.sequence.stream
            if not acceptable(ev):
                # Names reach cgroup paths and libvirt: never one that is not an id.
                log.warning("event names no valid server; ignored", type=ev.type_name(), seq=seq)
                await m.ack()
                continue
            if seq > self.desired.seq and m.metadata.num_delivered > 1:
                # First delivered to a process that died before folding it:
                # later events may have been delivered since, so take the
                # log's order rather than this delivery's.
                await self._catch_up()
            fold(self.desired, ev, seq)
            server = getattr(ev, "server", "")
            if server:
                touched.setdefault(server, []).append((m, ev))
            else:
                await m.ack()
                self.handled += 1
        if not touched:
            return
        msgs = [m for items in touched.values() for m, _ in items]
        async with self._kept_alive(msgs, self.ack_wait / 3):
            failed = await self.converge(touched)
        for server, items in touched.items():
            exc = failed.get(server)
            for m, ev in items:
                if exc is None:
                    await m.ack()
                    self.handled += 1
                elif m.metadata.num_delivered >= MAX_DELIVERIES:
                    await self._give_up(ev, exc)
                    await m.term()
                else:
                    # Tried again later, by then perhaps doable (the broker
                    # back, the disk freed); the periodic pass tries too.
                    await m.nak(delay=self.retry_delay)

    @staticmethod
    @contextlib.asynccontextmanager
    async def _kept_alive(msgs: list[Any], every: float) -> AsyncIterator[None]:
        """While the body runs, tell the broker ``msgs`` are being worked on."""

        async def tick() -> None:
            while True:
                await asyncio.sleep(every)
                for m in msgs:
                    with contextlib.suppress(Exception):  # the broker away: it redelivers
                        await m.in_progress()

        ticking = asyncio.create_task(tick())
        try:
            yield
        finally:
            ticking.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticking

    async def handle(self, ev: Event, seq: int = 0) -> None:
        """Fold one event (``seq`` 0: not from the log) and converge its server."""
        if not acceptable(ev):
            log.warning("event names no valid server; ignored", type=ev.type_name(), seq=seq)
            return
        fold(self.desired, ev, seq)
        server = getattr(ev, "server", "")
        if server:
            failed = await self.converge([server])
            if server in failed:
                raise failed[server]

    async def _give_up(self, ev: Event, exc: Exception) -> None:
        """After MAX_DELIVERIES attempts: say so on the server, stop retrying."""
        server = getattr(ev, "server", "")
        tenant = getattr(ev, "server_tenant", "")
        if not server or not tenant:
            return
        with contextlib.suppress(Exception):
            now = await self._server_log(tenant, server)
            reason = f"agent error after {MAX_DELIVERIES} attempts: {exc}"[:500]
            await self._report(
                ev, now, tenant, server, ServerFailed, "gave-up", host=self.host, reason=reason
            )

    # -- converge: the one apply path -------------------------------------------------

    async def converge(self, servers: Iterable[str] | None = None) -> dict[str, Exception]:
        """Make the host match the desired state, for ``servers`` or (None)
        for everything the log wants here and everything of ours on the host.

        Reports each server's outcome on its subject, records drift as
        ``host.reconciled``, and returns the servers that failed with an
        error of the agent's own (a host's refusal is reported, not raised).
        """
        deep = servers is None
        if servers is None:
            owned = await self.actual()
            targets = set(self.desired.instances) | set(self.desired.gone) | set(owned)
        else:
            targets = set(servers)
        drift = Drift()
        failed: dict[str, Exception] = {}
        slots = asyncio.Semaphore(PASS_CONCURRENCY if deep else len(targets) or 1)

        async def one(server: str) -> None:
            async with slots:
                try:
                    await self._converge_one(server, drift)
                except Exception as exc:
                    log.exception("converge failed", host=self.host, server=server)
                    failed[server] = exc

        await asyncio.gather(*(one(s) for s in sorted(targets)))
        if deep:
            await self._prune_disks()
        if drift:
            await self._record_drift(drift)
        return failed

    async def reconcile(self) -> dict[str, Exception]:
        """The periodic pass, on demand: ``converge()`` over everything."""
        return await self.converge()

    def _lock(self, server: str) -> asyncio.Lock:
        lock = self._locks.get(server)
        if lock is None:
            lock = self._locks[server] = asyncio.Lock()
        return lock

    async def _converge_one(self, server: str, drift: Drift) -> None:
        async with self._lock(server):
            for _ in range(MAX_LOOKS):
                try:
                    await self._apply(server, drift)
                    return
                except ConcurrencyConflict:
                    continue  # the server's subject moved while we worked: look again
            log.warning("server kept moving; left to the next pass", host=self.host, server=server)

    async def _apply(self, server: str, drift: Drift) -> None:
        want = self.desired.instances.get(server)
        have, disk = await asyncio.to_thread(self._probe, server)
        if want is None:
            await self._clear(server, have is not None or disk, drift)
            return
        claim = want.claim
        now = await self._server_log(claim.server_tenant, server)
        if now.type not in REPORTED or (now.host and now.host != self.host):
            # Out of this host's hands (see REPORTED): the scheduler releases
            # the claim or the tenant's delete comes; nothing to do meanwhile.
            want.actions.clear()
            return
        try:
            await self._realise(want, have, disk, now, drift)
        except (Invalid, HostError) as exc:
            await self._refused(want, now, exc)

    async def _realise(
        self, want: Want, have: PowerState | None, disk: bool, now: ServerLog, drift: Drift
    ) -> None:
        """Bring one wanted instance to its desired state and report it."""
        claim = want.claim
        server = claim.server
        spec = self.instance(claim, want)
        driver = self._driver(claim.spec.instance_type)
        runtime = ""
        if claim.spec.instance_type == "container":
            spec, runtime = await self._container(spec, claim, driver)
        running = want.power == "running"
        said = REPORTED[now.type]
        changed = False
        disk_lost = have is not None and bool(spec.disk) and not disk
        if have is None or disk_lost:
            if now.type in NOT_STARTED and have is None:
                await self._report(
                    want.cause,
                    now,
                    claim.server_tenant,
                    server,
                    ServerBuilding,
                    "building",
                    host=self.host,
                )
            elif said != "building":
                drift.recreated.append(server)  # it was built once: the host lost it
            base = await self._base(spec, claim)
            await asyncio.to_thread(self._prepare_disk, spec, want, base)
            await asyncio.to_thread(driver.ensure, spec, running)
            changed = running
        else:
            if running and have != "running":
                await asyncio.to_thread(driver.start, spec)
                if said == "running":
                    drift.started.append(server)
                changed = True
            elif not running and have == "running":
                await asyncio.to_thread(driver.stop, server)
                if said == "stopped":
                    drift.stopped.append(server)
            await self._sync_volumes(want, spec, driver)
        while want.actions:
            action = want.actions[0]
            if action.action == "reboot":
                await asyncio.to_thread(driver.reboot, spec)
                changed = True
            elif action.action == "snapshot":
                await self._snapshot(action, want, spec, driver)
            want.actions.pop(0)
        if running and (changed or said != "running"):
            await self._report(
                want.cause,
                now,
                claim.server_tenant,
                server,
                ServerRunning,
                "running",
                host=self.host,
                disk=spec.disk,
                runtime=runtime,
            )
            log.info("server running", host=self.host, server=server)
        elif not running and said != "stopped":
            await self._report(
                want.cause, now, claim.server_tenant, server, ServerStopped, "stopped"
            )

    async def _refused(self, want: Want, now: ServerLog, exc: StratusError) -> None:
        """The host could not do it (or the log asked for something no host
        may be given): a build that fails is ``server.build-failed`` (the
        scheduler tries elsewhere), anything else ``server.failed``."""
        claim = want.claim
        server = claim.server
        want.actions.clear()
        log.warning("host refused", host=self.host, server=server, reason=exc.message)
        if REPORTED[now.type] == "building":
            with contextlib.suppress(Exception):
                await self._remove(server)
            await self._report(
                want.cause,
                now,
                claim.server_tenant,
                server,
                ServerBuildFailed,
                "failed",
                host=self.host,
                reason=exc.message,
                attempt=claim.attempt,
            )
        else:
            await self._report(
                want.cause,
                now,
                claim.server_tenant,
                server,
                ServerFailed,
                "failed",
                host=self.host,
                reason=exc.message,
            )

    async def _clear(self, server: str, present: bool, drift: Drift) -> None:
        """Nothing of ``server`` may stay; a deletion is confirmed on its subject."""
        gone = self.desired.gone.get(server)
        if present:
            await self._remove(server)
            if gone is None:
                drift.removed.append(server)  # no event asked: a stray
        if gone is None:
            return
        if gone.delete is not None:
            now = await self._server_log(gone.tenant, server)
            if now.type != "server.deleted":
                await self._report(gone.delete, now, gone.tenant, server, ServerDeleted, "deleted")
        if self.desired.gone.get(server) is gone:
            del self.desired.gone[server]

    async def _record_drift(self, drift: Drift) -> None:
        cause = Cause(actor=self.actor, correlation_id=new_id(), causation_id="reconcile")
        report = cause.make(
            HostReconciled,
            SYSTEM,
            "host",
            self.host,
            recreated=sorted(drift.recreated),
            started=sorted(drift.started),
            stopped=sorted(drift.stopped),
            removed=sorted(drift.removed),
        )
        await self.store.append([report])
        log.info("reconciled", host=self.host, **{k: len(v) for k, v in vars(drift).items()})

    async def _prune_disks(self) -> None:
        """Overlay files no wanted instance uses (its removal was interrupted)."""
        for p in await asyncio.to_thread(lambda: list(self.disks.glob("*.qcow2"))):
            server = p.stem
            if server in self.desired.instances:
                continue
            async with self._lock(server):
                if server not in self.desired.instances:
                    with contextlib.suppress(FileNotFoundError):
                        p.unlink()

    # -- reading and writing a server's subject ---------------------------------------

    async def _server_log(self, tenant: str, server: str) -> ServerLog:
        """The last event on the server's subject, read fresh from the log."""
        try:
            msg = await self.store.js.get_last_msg(
                STREAM, server_subject(tenant, server), direct=True
            )
        except nats.js.errors.NotFoundError:
            return ServerLog(0, "")
        except (TimeoutError, nats.errors.Error) as exc:
            raise Unavailable(f"cannot read server {server}: {type(exc).__name__}") from None
        try:
            ev = self.store.codec.decode(msg.data)
        except Exception:
            return ServerLog(msg.seq or 0, "?")  # a newer writer's event: hands off
        return ServerLog(msg.seq or 0, ev.type_name(), getattr(ev, "host", "") or "")

    async def _report(
        self,
        cause_event: Event,
        now: ServerLog,
        tenant: str,
        server: str,
        cls: type[Event],
        key: str,
        **fields: Any,
    ) -> None:
        """Append a result event on the condition that the server's subject
        still ends at ``now`` (the state the work was for), and move ``now``
        to it. The message id makes a retried append of the same report a
        duplicate; a moved subject raises ``ConcurrencyConflict``."""
        cause = Cause(
            actor=self.actor,
            correlation_id=cause_event.correlation_id,
            causation_id=cause_event.id,
        )
        ev = cause.make(cls, tenant, "server", server, **fields)
        done = await self.reports.append(
            [ev], Condition(ev.subject, now.seq), msg_id=f"{cause_event.id}.{key}.{now.seq}"
        )
        now.seq, now.type = done.seqs[0], cls.type_name()
        now.host = fields.get("host", now.host)

    # -- the host ---------------------------------------------------------------------

    def instance(self, claim: HostClaimed, want: Want | None = None) -> InstanceSpec:
        """The claim's spec as this host builds it: the spec whole, and the
        paths and boot settings that are this host's own."""
        vm = claim.spec.instance_type == "vm"
        volumes = {v: str(self.volumes / f"{v}.qcow2") for v in (want.volumes if want else {})}
        return check(
            InstanceSpec(
                server=claim.server,
                tenant=claim.server_tenant,
                # A container's ports are veths the network agent makes.
                requested=claim.spec if vm else msgspec.structs.replace(claim.spec, nics=[]),
                disk=str(self.disks / f"{claim.server}.qcow2") if vm else "",
                console_log=str(self.consoles / f"{claim.server}.log"),
                volumes=volumes,
                **(msgspec.structs.asdict(self.direct_boot) if self.direct_boot and vm else {}),
            )
        )

    def _driver(self, instance_type: str) -> Driver:
        d = self.drivers.get(instance_type)
        if d is None:
            raise HostError(f"host {self.host} does not run {instance_type} instances")
        return d

    def _probe(self, server: str) -> tuple[PowerState | None, bool]:
        """What the host has of ``server``: its instance's state (None: no
        instance) and whether its overlay disk exists (blocking: in a thread)."""
        disk = (self.disks / f"{server}.qcow2").exists()
        for driver in self.drivers.values():
            state = driver.state(server)
            if state is not None:
                return state, disk
        return None, disk

    async def actual(self) -> dict[str, tuple[str, PowerState]]:
        """server id -> (instance type, running|stopped) of what this host runs."""
        out: dict[str, tuple[str, PowerState]] = {}
        for it, driver in self.drivers.items():
            for server, state in (await asyncio.to_thread(driver.list_owned)).items():
                out[server] = (it, state)
        return out

    async def blobs(self) -> BlobStore:
        """The object store's image bucket (read only), opened on first use."""
        if self._blob_store is None:
            self._blob_store = await BlobStore.open(self.store.js)
        return self._blob_store

    async def uploads(self) -> BlobStore:
        """This host's own bucket (``upload_bucket``): a snapshot's bytes go
        there, and the report relay copies them into the image bucket."""
        if self._upload_store is None:
            self._upload_store = await BlobStore.open(
                self.store.js, bucket=upload_bucket(self.host)
            )
        return self._upload_store

    async def _report_image(self, created: ImageCreated, server: str, digests: list[str]) -> None:
        """``image.created`` through the relay, which first copies the
        snapshot's objects (``digests``) from this host's bucket into the
        image bucket; once recorded, they leave this host's bucket."""
        # The relay copies the bytes before it answers: as long as a fetch
        # of them may take (``BlobStore.get``), and a store as long again.
        relay = Reporter(
            self.store.nc,
            self.host,
            codec=self.store.codec,
            timeout=2 * (60 + created.size_bytes / (4 << 20)),
        )
        try:
            # Once only: a request redelivered meanwhile finds its image recorded.
            with contextlib.suppress(ConcurrencyConflict):
                await relay.append([created], Condition(created.subject, 0), server=server)
        finally:
            # Recorded or refused, the bytes have done their part here: a
            # retried snapshot takes and uploads them again.
            uploads = await self.uploads()
            for digest in digests:
                try:
                    await uploads.delete(digest)
                except Exception as exc:  # (a leftover in our own bucket: harmless)
                    log.warning("upload not removed", digest=digest, error=str(exc))

    async def _image(self, tenant: str, image_id: str) -> images.ImageRecord | None:
        """Image ``image_id`` (the tenant's or a public one) as the log has it
        now; an active one is kept (its bytes never change)."""
        if image_id in self._images:
            return self._images[image_id]
        if not (ID_RE.match(image_id) and ID_RE.match(tenant)):
            return None
        subjects = [f"ev.{tenant}.image.{image_id}", f"ev.{SYSTEM}.image.{image_id}"]
        recs = await self.store.read_all(subjects=subjects)
        found = images.fold_image(image_id, [r.decode(self.store.codec) for r in recs])
        if found is not None and found.status == "active":
            self._images[image_id] = found
        return found

    async def _chain(self, tenant: str, image: images.ImageRecord) -> list[images.Layer]:
        """The image's layer, then its parent's (a snapshot is backed by it),
        as far as layers have bytes."""
        chain: list[images.Layer] = []
        r: images.ImageRecord | None = image
        while r is not None and r.layer is not None:
            if r.status != "active":
                raise HostError(f"image {r.name or r.id} is {r.status or 'gone'}, not active")
            if len(chain) >= images.MAX_CHAIN:
                raise HostError(f"image {image.name} has more than {images.MAX_CHAIN} layers")
            chain.append(r.layer)
            r = await self._image(tenant, r.parent) if r.parent else None
        return chain

    async def _base(self, spec: InstanceSpec, claim: HostClaimed) -> tuple[Path, str] | None:
        """The cached base a new overlay disk is made on (fetched from the
        object store on first use), or None when no disk is to be made."""
        if not spec.disk or await asyncio.to_thread(os.path.exists, spec.disk):
            return None
        image = await self._image(claim.server_tenant, claim.spec.image)
        if image is None or image.layer is None:
            # A record without bytes (or none at all): a blank disk.
            return await asyncio.to_thread(self.cache.blank, spec.requested.disk_gb), "qcow2"
        chain = await self._chain(claim.server_tenant, image)
        return await self.cache.fetch(chain), image.format

    def _prepare_disk(self, spec: InstanceSpec, want: Want, base: tuple[Path, str] | None) -> None:
        """The overlay disk and the volumes a new domain is defined with."""
        if base is not None and not os.path.exists(spec.disk):
            path, fmt = base
            images.create_overlay(
                path,
                fmt,
                Path(spec.disk),
                spec.requested.disk_gb,
                self.cache.virtual_size(path, fmt),
            )
        for vol, path_ in spec.volumes.items():
            images.create_volume(Path(path_), max(1, want.volumes.get(vol, 1)))

    async def _sync_volumes(self, want: Want, spec: InstanceSpec, driver: Driver) -> None:
        """Attach the volumes the log wants on the instance, detach the others."""
        if not spec.volumes and spec.requested.instance_type != "vm":
            return
        attached = set(await asyncio.to_thread(driver.volumes, spec.server))
        for vol, path in spec.volumes.items():
            if path not in attached:
                size = max(1, want.volumes.get(vol, 1))
                await asyncio.to_thread(images.create_volume, Path(path), size)
                await asyncio.to_thread(driver.attach, spec, vol, path)
        for path in attached - set(spec.volumes.values()):
            # Only our volumes: a disk an operator added is left alone.
            if Path(path).parent == self.volumes:
                await asyncio.to_thread(driver.detach, spec, path)

    async def _container(
        self, spec: InstanceSpec, claim: HostClaimed, driver: Driver
    ) -> tuple[InstanceSpec, str]:
        """A container's spec with its image's layers (fetched and unpacked
        on first use) and process, and the runtime that runs it; an image
        that is not OCI leaves it a process-mode container."""
        image = await self._image(claim.server_tenant, claim.spec.image)
        command = list(claim.spec.command)
        if image is None or image.oci is None:
            return msgspec.structs.replace(spec, command=command), ""
        if image.status != "active":
            raise HostError(f"image {image.name or image.id} is {image.status or 'gone'}")
        dirs = await self.layers.fetch(image.oci.layers)
        spec = check(
            msgspec.structs.replace(
                spec,
                layers=[str(d) for d in dirs],
                command=image.oci.argv(command),
                env=list(image.oci.env),
                cwd=image.oci.working_dir,
                user=image.oci.user,
            )
        )
        # (A property that asks runc once: in a thread.)
        version = await asyncio.to_thread(lambda: driver.runtime_version)
        return spec, version

    async def _remove(self, server: str) -> None:
        for driver in self.drivers.values():
            await asyncio.to_thread(driver.remove, server)
        for p in (self.disks / f"{server}.qcow2", self.consoles / f"{server}.log"):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()

    async def _snapshot(
        self, ev: HostServerAction, want: Want, spec: InstanceSpec, driver: Driver
    ) -> None:
        """Store the server's disk in the object store as image ``ev.image``,
        then record it: ``image.created`` only names bytes already stored."""
        if not ID_RE.match(ev.image) or not (spec.disk or spec.layers):
            raise HostError(f"cannot snapshot server {ev.server} as image {ev.image!r}")
        subject = f"ev.{ev.server_tenant}.image.{ev.image}"
        if await self.store.last_seq(subject):
            return  # a redelivered request: the image is recorded already
        if spec.layers:
            await self._commit(ev, want, driver)
            return
        claim = want.claim
        parent = await self._image(claim.server_tenant, claim.spec.image)
        chain = await self._chain(claim.server_tenant, parent) if parent else []
        if chain:
            await self.cache.fetch(chain)  # the overlay's base: normally cached already

        def make() -> images.ImageFile:
            with driver.paused(ev.server):
                return images.snapshot(
                    Path(spec.disk), self.cache.root, chain[0] if chain else None, ev.image
                )

        made = await asyncio.to_thread(make)
        try:
            await (await self.uploads()).put_file(made.checksum, Path(made.path))
        finally:
            layer = images.Layer(made.checksum, made.format)
            await asyncio.to_thread(self.cache.keep, Path(made.path), layer)
        created = Cause(
            actor=self.actor, correlation_id=ev.correlation_id, causation_id=ev.id
        ).make(
            ImageCreated,
            ev.server_tenant,
            "image",
            ev.image,
            name=ev.image_name,
            format=made.format,
            size_bytes=made.size_bytes,
            checksum=made.checksum,
            visibility="private",
            parent=claim.spec.image,
            min_disk_gb=images.min_disk_gb(made.virtual_size),
        )
        await self._report_image(created, ev.server, [made.checksum])

    async def _commit(self, ev: HostServerAction, want: Want, driver: Driver) -> None:
        """A container's snapshot: its upper directory committed as one new
        layer on top of its image's (which stay as they are), stored by
        digest with the new image's config, then ``image.created``."""
        claim = want.claim
        parent = await self._image(claim.server_tenant, claim.spec.image)
        if parent is None or parent.oci is None:
            raise HostError(f"server {ev.server} is not a container of an OCI image")
        out = images.part(self.layers.root / f"snapshot-{ev.image}.tar")
        try:
            digest, size = await asyncio.to_thread(driver.commit, ev.server, out)
            base = parent.oci
            config = oci.OciConfig(
                layers=[*base.layers, digest],
                diff_ids=[*base.diff_ids, digest],  # not compressed: the same digest
                entrypoint=base.entrypoint,
                cmd=base.cmd,
                env=base.env,
                working_dir=base.working_dir,
                user=base.user,
            )
            doc = oci.config_json(config)
            config_digest = hashlib.sha256(doc).hexdigest()
            # (into this host's bucket; the relay copies what the image
            # bucket does not hold yet)
            uploads = await self.uploads()
            await uploads.put_file(digest, out)
            await uploads.put(config_digest, io.BytesIO(doc))
            # This host has the layer already: unpacked from the same bytes.
            await asyncio.to_thread(self.layers.adopt, digest, out)
        finally:
            with contextlib.suppress(FileNotFoundError):
                out.unlink()
        created = Cause(
            actor=self.actor, correlation_id=ev.correlation_id, causation_id=ev.id
        ).make(
            ImageCreated,
            ev.server_tenant,
            "image",
            ev.image,
            name=ev.image_name,
            format="oci",
            size_bytes=size,
            checksum=config_digest,
            visibility="private",
            parent=claim.spec.image,
            oci=config,
        )
        await self._report_image(created, ev.server, [digest, config_digest])

    # -- exec -------------------------------------------------------------------

    async def _on_exec(self, msg: Any) -> None:
        try:
            req = msgspec.json.decode(msg.data, type=ExecRequest)
            want = self.desired.instances.get(req.server)
            if want is None or want.claim.spec.instance_type != "container":
                raise HostError(f"no container instance {req.server} on host {self.host}")
            driver = self._driver("container")
            timeout = min(max(req.timeout, 1.0), 600.0)
            result = await asyncio.to_thread(driver.exec, req.server, req.command, timeout)
            body = ExecReply(ok=True, result=result)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            body = ExecReply(ok=False, error=f"bad exec request: {exc}")
        except HostError as exc:
            body = ExecReply(ok=False, error=exc.message)
        if msg.reply:
            await msg.respond(msgspec.json.encode(body))


def build_agent(
    store: EventStore,
    host: str,
    *,
    libvirt_uri: str,
    data_dir: Path,
    vcpus: int | None = None,
    ram_mb: int | None = None,
    disk_gb: int | None = None,
    zone: str = "nova",
    labels: dict[str, str] | None = None,
    types: Sequence[str] = ("vm", "container"),
    reconcile_interval: float = 60.0,
    deployment: str = "",
) -> ComputeAgent:
    """An agent with the drivers ``types`` asks for; capacity not given is
    what libvirt reports for the node (and the data directory's disk).
    ``deployment`` prefixes the host's container cgroups (see ``containers``)."""
    from stratus.agents.compute.domain import LibvirtDriver

    unknown = set(types) - {"vm", "container"}
    if unknown or not types:
        raise Invalid(f"instance types must be vm and/or container, not {sorted(unknown)}")
    vm = LibvirtDriver(libvirt_uri, host) if "vm" in types else None
    containers = None
    if "container" in types:
        try:
            containers = ContainerDriver(host, Path(data_dir) / "containers", deployment=deployment)
        except (HostError, OSError) as exc:
            if vm is None:
                raise HostError(f"container instances need cgroups here: {exc}") from None
            log.warning("no container instances on this host", host=host, error=str(exc))
    if vm is not None and (vcpus is None or ram_mb is None):
        node_cpus, node_ram = vm.capacity()
        vcpus, ram_mb = vcpus or node_cpus, ram_mb or node_ram
    if disk_gb is None:
        Path(data_dir).mkdir(parents=True, exist_ok=True)
        st = os.statvfs(data_dir)
        disk_gb = max(1, st.f_blocks * st.f_frsize >> 30)
    spec = HostSpec(
        vcpus=vcpus or os.cpu_count() or 1,
        ram_mb=ram_mb or 1024,
        disk_gb=disk_gb,
        zone=zone,
        labels=dict(labels or {}),
        types=[t for t, d in (("vm", vm), ("container", containers)) if d is not None],
    )
    return ComputeAgent(
        store,
        host,
        data_dir=data_dir,
        spec=spec,
        vm=vm,
        containers=containers,
        reconcile_interval=reconcile_interval,
    )
