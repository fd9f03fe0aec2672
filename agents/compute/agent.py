"""The compute agent of one host: events on ``ev._system.host.<name>`` in,
instances on the host and their result events out.

- Registers the host (``host.registered``, or ``host.updated`` when its
  capacity or labels changed; nothing when a restart changed nothing).
- Heartbeats into the KV bucket (``events.heartbeat``), never the log.
- Consumes the host's subject with a durable consumer and acknowledges an
  event only once the host change is done and its result event appended;
  a redelivered event finds the instance it made (names derive from the
  server id) and its report deduplicated by message id.
- Reconciles on start and every ``reconcile_interval``: desired (the fold
  of the subject up to what was acknowledged) against actual (libvirt
  domains and containers carrying this host's Stratus marks, overlay files).
- Serves ``agent.<host>.exec`` (container exec) to the command handlers,
  which authenticate and authorise the caller before forwarding.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec
import nats.errors
import nats.js.errors
import structlog
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from stratus.agents.compute import images
from stratus.agents.compute.containers import ContainerDriver, ExecResult
from stratus.agents.compute.desired import Desired, Want, fold
from stratus.agents.compute.spec import ID_RE, HostError, InstanceSpec, check
from stratus.events.compute import HostReconciled, HostServerAction
from stratus.events.errors import ConcurrencyConflict, Invalid, StratusError
from stratus.events.heartbeat import beat
from stratus.events.ids import NAME_RE, new_id
from stratus.events.model import Cause, Event
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
from stratus.events.scheduling import (
    HEARTBEAT_INTERVAL,
    HostClaimed,
    HostReleased,
    ServerBuildFailed,
)
from stratus.events.store import STREAM, Condition, EventStore

log = structlog.get_logger("stratus.compute")

FETCH_BATCH = 64
# An event whose handling keeps failing (not a refusal by the host, which is
# reported, but an error of the agent's own) is tried this often, then given up.
MAX_DELIVERIES = 5
RETRY_DELAY_S = 5.0
# Server events after which the log no longer wants an instance built.
TERMINAL = {"server.build-failed", "server.failed", "server.deleting", "server.deleted"}
EXEC_SUBJECT = "agent.{host}.exec"


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


def host_subject(host: str) -> str:
    return f"ev.{SYSTEM}.host.{host}"


def consumer_name(host: str) -> str:
    return f"compute-{host}"


class ComputeAgent:
    def __init__(
        self,
        store: EventStore,
        host: str,
        *,
        data_dir: Path,
        image_store: Path,
        spec: HostSpec,
        vm: Any | None = None,
        containers: ContainerDriver | None = None,
        reconcile_interval: float = 60.0,
        heartbeat_interval: float = HEARTBEAT_INTERVAL,
        direct_boot: DirectBoot | None = None,
    ) -> None:
        if not NAME_RE.match(host):
            raise Invalid(f"host name {host!r} is not a valid name")
        self.store = store
        self.host = host
        self.spec = spec
        self.data_dir = Path(data_dir)
        self.image_store = Path(image_store)
        self.disks = self.data_dir / "disks"
        self.volumes = self.data_dir / "volumes"
        self.consoles = self.data_dir / "console"
        for d in (self.disks, self.volumes, self.consoles):
            d.mkdir(parents=True, exist_ok=True)
        self.cache = images.BaseCache(self.data_dir / "base")
        self.drivers: dict[str, Any] = {}
        if vm is not None:
            self.drivers["vm"] = vm
        if containers is not None:
            self.drivers["container"] = containers
        self.reconcile_interval = reconcile_interval
        self.retry_delay = RETRY_DELAY_S
        self.direct_boot = direct_boot
        self.heartbeat_interval = heartbeat_interval
        self.subject = host_subject(host)
        self.desired = Desired()
        self.actor = f"compute-agent:{host}"
        self._images: dict[str, ImageCreated | None] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._psub: Any = None
        self._exec_sub: Any = None
        self._stopping = asyncio.Event()
        self.handled = 0

    # -- lifecycle --------------------------------------------------------------

    async def start(self) -> None:
        await self.register()
        await self._open_consumer()
        await self.reconcile()
        await self._beat_once()
        self._exec_sub = await self.store.nc.subscribe(
            EXEC_SUBJECT.format(host=self.host), cb=self._on_exec
        )
        self._tasks = [
            asyncio.create_task(self._consume(), name=f"compute-{self.host}"),
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
        """Release the hypervisor connection (after ``stop``)."""
        vm = self.drivers.get("vm")
        if vm is not None:
            vm.close()
        containers = self.drivers.get("container")
        if containers is not None and not containers.list_owned():
            # Nothing left running here: leave no empty cgroup directories.
            containers.cgroups.prune()

    # -- registration and heartbeat ----------------------------------------------

    async def read_host(self, until: int | None = None) -> Desired:
        """The fold of the host's subject (up to sequence ``until``)."""
        d = Desired()
        async for batch in self.store.read(until=until, subjects=[self.subject]):
            for rec in batch:
                try:
                    event = rec.decode(self.store.codec)
                except Exception:
                    continue  # a foreign writer's bytes: not ours to act on
                fold(d, event, rec.seq)
        return d

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
        while not self._stopping.is_set():
            await asyncio.sleep(self.heartbeat_interval)
            try:
                await beat(self.store.js, self.host, instances=len(self.desired.instances))
            except Exception as exc:  # the next beat may get through
                log.warning("heartbeat failed", host=self.host, error=str(exc))

    # -- the durable consumer ----------------------------------------------------

    async def _open_consumer(self) -> None:
        name = consumer_name(self.host)
        config = ConsumerConfig(
            durable_name=name,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            filter_subject=self.subject,
            # A build may take a while (a real base image copied to the cache).
            ack_wait=300,
            max_ack_pending=1000,
        )
        self._psub = await self.store.js.pull_subscribe(
            self.subject, durable=name, stream=STREAM, config=config
        )

    async def _acked_floor(self) -> int:
        info = await self.store.js.consumer_info(STREAM, consumer_name(self.host))
        return info.ack_floor.stream_seq if info.ack_floor else 0

    async def _consume(self) -> None:
        next_reconcile = time.monotonic() + self.reconcile_interval
        while not self._stopping.is_set():
            if time.monotonic() >= next_reconcile:
                try:
                    await self.reconcile()
                except Exception:
                    log.exception("reconcile failed", host=self.host)
                next_reconcile = time.monotonic() + self.reconcile_interval
            try:
                msgs = await self._psub.fetch(FETCH_BATCH, timeout=1.0)
            except (TimeoutError, nats.errors.TimeoutError):
                continue
            except nats.errors.Error as exc:
                log.warning("fetch failed", host=self.host, error=str(exc))
                await asyncio.sleep(0.5)
                continue
            await self._handle_batch(msgs)

    async def _handle_batch(self, msgs: Sequence[Any]) -> None:
        # Events of one server stay in order; different servers build at
        # the same time (their overlays and domains are independent).
        lanes: dict[str, list[tuple[Any, Event | None]]] = {}
        for m in msgs:
            try:
                ev: Event | None = self.store.codec.decode(m.data)
            except Exception:
                ev = None
            key = getattr(ev, "server", "") or "_host"
            lanes.setdefault(key, []).append((m, ev))
        await asyncio.gather(*(self._lane(items) for items in lanes.values()))

    async def _lane(self, items: list[tuple[Any, Event | None]]) -> None:
        for i, (m, ev) in enumerate(items):
            if ev is None:
                await m.term()  # not an event this code can read: never redeliver
                continue
            try:
                await self.handle(ev, m.metadata.sequence.stream)
            except Exception as exc:
                log.exception("event failed", host=self.host, type=ev.type_name())
                if m.metadata.num_delivered >= MAX_DELIVERIES:
                    await self._give_up(ev, exc)
                    await m.term()
                    continue
                # Redelivered later, by then perhaps doable (the broker back,
                # the disk freed); the server's later events wait for it, so
                # they are never applied out of order.
                for later, _ in items[i:]:
                    await later.nak(delay=self.retry_delay)
                return
            await m.ack()
            self.handled += 1

    async def _give_up(self, ev: Event, exc: Exception) -> None:
        """After MAX_DELIVERIES attempts: say so on the server, stop retrying."""
        server = getattr(ev, "server", "")
        tenant = getattr(ev, "server_tenant", "")
        if not server or not tenant:
            return
        with contextlib.suppress(Exception):
            await self._report(
                self._cause(ev),
                ServerFailed,
                tenant,
                server,
                "gave-up",
                host=self.host,
                reason=f"agent error after {MAX_DELIVERIES} attempts: {exc}"[:500],
            )

    # -- events -----------------------------------------------------------------

    def _cause(self, ev: Event) -> Cause:
        return Cause(actor=self.actor, correlation_id=ev.correlation_id, causation_id=ev.id)

    async def _report(
        self, cause: Cause, cls: type[Event], tenant: str, server: str, key: str, **fields: Any
    ) -> None:
        """Append the result event; ``key`` makes a redelivery's report a duplicate."""
        ev = cause.make(cls, tenant, "server", server, **fields)
        await self.store.append([ev], msg_id=f"{cause.causation_id}.{key}")

    async def handle(self, ev: Event, seq: int = 0) -> None:
        server = getattr(ev, "server", None)
        if server is not None and not ID_RE.match(server):
            # Names reach cgroup paths and libvirt: never one that is not an id.
            log.warning("event names no valid server; ignored", type=ev.type_name(), seq=seq)
            return
        fold(self.desired, ev, seq)
        if isinstance(ev, HostClaimed):
            await self._build(ev)
        elif isinstance(ev, HostReleased):
            # The scheduler took the claim back (a failed build, a deletion):
            # whatever is left of the instance goes.
            await self._remove(ev.server)
        elif isinstance(ev, HostServerAction):
            await self._act(ev)

    def instance(self, claim: HostClaimed, want: Want | None = None) -> InstanceSpec:
        volumes = {v: str(self.volumes / f"{v}.qcow2") for v in (want.volumes if want else {})}
        return check(
            InstanceSpec(
                server=claim.server,
                tenant=claim.server_tenant,
                name=claim.name,
                vcpus=claim.vcpus,
                ram_mb=claim.ram_mb,
                disk_gb=claim.disk_gb,
                instance_type=claim.instance_type,
                disk=str(self.disks / f"{claim.server}.qcow2")
                if claim.instance_type == "vm"
                else "",
                console_log=str(self.consoles / f"{claim.server}.log"),
                volumes=volumes,
                # A container's ports are veths the network agent makes.
                nics=list(claim.nics) if claim.instance_type == "vm" else [],
                **(
                    msgspec.structs.asdict(self.direct_boot)
                    if self.direct_boot and claim.instance_type == "vm"
                    else {}
                ),
            )
        )

    def _driver(self, instance_type: str) -> Any:
        d = self.drivers.get(instance_type)
        if d is None:
            raise HostError(f"host {self.host} does not run {instance_type} instances")
        return d

    async def _image(self, claim: HostClaimed) -> ImageCreated | None:
        """The image's ``image.created`` (tenant's or public), read once and kept."""
        if claim.image in self._images:
            return self._images[claim.image]
        found: ImageCreated | None = None
        if ID_RE.match(claim.image) and ID_RE.match(claim.server_tenant):
            subjects = [
                f"ev.{claim.server_tenant}.image.{claim.image}",
                f"ev.{SYSTEM}.image.{claim.image}",
            ]
            for rec in await self.store.read_all(subjects=subjects):
                ev = rec.decode(self.store.codec)
                if isinstance(ev, ImageCreated):
                    found = ev
        self._images[claim.image] = found
        return found

    def _prepare_disk(self, spec: InstanceSpec, image: ImageCreated | None) -> None:
        if not spec.disk or os.path.exists(spec.disk):
            return
        checksum = image.checksum if image else ""
        fmt = image.format if image else "qcow2"
        base, base_fmt = self.cache.base(self.image_store, checksum, fmt, blank_gb=spec.disk_gb)
        images.create_overlay(
            base, base_fmt, Path(spec.disk), spec.disk_gb, self.cache.virtual_size(base, base_fmt)
        )
        for vol, path in spec.volumes.items():
            del vol
            images.create_volume(Path(path), 1)

    async def _build(self, claim: HostClaimed, report_building: bool = True) -> bool:
        cause = self._cause(claim)
        t, s = claim.server_tenant, claim.server
        bind = {"host": self.host, "server": s, "correlation_id": claim.correlation_id}
        try:
            spec = self.instance(claim, self.desired.instances.get(s))
        except Invalid as exc:
            await self._report(
                cause,
                ServerBuildFailed,
                t,
                s,
                "failed",
                host=self.host,
                reason=exc.message,
                attempt=claim.attempt,
            )
            return False
        if report_building:
            await self._report(cause, ServerBuilding, t, s, "building", host=self.host)
        try:
            driver = self._driver(claim.instance_type)
            image = await self._image(claim)
            await asyncio.to_thread(self._prepare_disk, spec, image)
            await asyncio.to_thread(driver.ensure, spec, True)
        except (HostError, images.ImageError) as exc:
            reason = getattr(exc, "reason", None) or str(exc)
            log.warning("build failed", reason=reason, **bind)
            with contextlib.suppress(Exception):
                await self._remove(s, claim.instance_type)
            await self._report(
                cause,
                ServerBuildFailed,
                t,
                s,
                "failed",
                host=self.host,
                reason=reason,
                attempt=claim.attempt,
            )
            return False
        await self._report(cause, ServerRunning, t, s, "running", host=self.host, disk=spec.disk)
        log.info("server running", **bind)
        return True

    async def _remove(self, server: str, instance_type: str | None = None) -> None:
        types = [instance_type] if instance_type else list(self.drivers)
        for it in types:
            await asyncio.to_thread(self._driver(it).remove, server)
        for p in (self.disks / f"{server}.qcow2", self.consoles / f"{server}.log"):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()

    async def _act(self, ev: HostServerAction) -> None:
        cause = self._cause(ev)
        t, s = ev.server_tenant, ev.server
        if ev.action == "delete":
            await self._remove(s)
            await self._report(cause, ServerDeleted, t, s, "deleted")
            return
        want = self.desired.instances.get(s)
        if want is None:
            log.warning("action for a server not on this host", action=ev.action, server=s)
            return
        spec = self.instance(want.claim, want)
        try:
            driver = self._driver(spec.instance_type)
            if ev.action == "stop":
                await asyncio.to_thread(driver.stop, s)
                await self._report(cause, ServerStopped, t, s, "stopped")
            elif ev.action in ("start", "reboot"):
                await asyncio.to_thread(self._prepare_disk, spec, await self._image(want.claim))
                fn = driver.start if ev.action == "start" else driver.reboot
                await asyncio.to_thread(fn, spec)
                await self._report(
                    cause, ServerRunning, t, s, "running", host=self.host, disk=spec.disk
                )
            elif ev.action == "attach-volume":
                path = Path(spec.volumes[ev.volume])
                await asyncio.to_thread(images.create_volume, path, max(1, ev.size_gb))
                await asyncio.to_thread(driver.attach, spec, ev.volume, str(path))
            elif ev.action == "snapshot":
                await self._snapshot(ev, want, spec, driver)
            elif ev.action == "detach-volume":
                await asyncio.to_thread(
                    driver.detach, spec, str(self.volumes / f"{ev.volume}.qcow2")
                )
        except (HostError, images.ImageError) as exc:
            reason = getattr(exc, "reason", None) or str(exc)
            await self._report(cause, ServerFailed, t, s, "failed", host=self.host, reason=reason)

    async def _snapshot(
        self, ev: HostServerAction, want: Want, spec: InstanceSpec, vm: Any
    ) -> None:
        """Store the server's disk as image ``ev.image`` and record it."""
        if not ID_RE.match(ev.image) or not spec.disk:
            raise HostError(f"cannot snapshot server {ev.server} as image {ev.image!r}")
        parent = await self._image(want.claim)
        parent_file = images.stored(self.image_store, parent.checksum) if parent else None

        def make() -> images.ImageFile:
            with vm.paused(ev.server):
                return images.snapshot(
                    Path(spec.disk),
                    self.image_store,
                    parent_file,
                    parent.format if parent else "qcow2",
                    ev.image,
                )

        made = await asyncio.to_thread(make)
        created = self._cause(ev).make(
            ImageCreated,
            ev.server_tenant,
            "image",
            ev.image,
            name=ev.image_name,
            format=made.format,
            size_bytes=made.size_bytes,
            checksum=made.checksum,
            visibility="private",
            parent=want.claim.image,
            min_disk_gb=-(-made.virtual_size // (1 << 30)),
        )
        # Once only: a redelivered request finds its image already recorded.
        with contextlib.suppress(ConcurrencyConflict):
            await self.store.append([created], Condition(created.subject, 0))

    # -- reconcile --------------------------------------------------------------

    async def actual(self) -> dict[str, tuple[str, str]]:
        """server id -> (instance type, running|stopped) of what this host runs."""
        out: dict[str, tuple[str, str]] = {}
        for it, driver in self.drivers.items():
            for server, state in (await asyncio.to_thread(driver.list_owned)).items():
                out[server] = (it, state)
        return out

    async def _server_done(self, claim: HostClaimed) -> bool:
        """Whether the server's own log says it is past building (failed, gone)."""
        subject = f"ev.{claim.server_tenant}.server.{claim.server}"
        try:
            msg = await self.store.js.get_last_msg(STREAM, subject, direct=True)
        except nats.js.errors.NotFoundError:
            return True
        try:
            ev = self.store.codec.decode(msg.data)
        except Exception:
            return False
        return ev.type_name() in TERMINAL

    async def reconcile(self) -> HostReconciled | None:
        """Make the host match the log as far as this agent has acknowledged it.

        Later events are the consumer's: an instance they want is no stray
        (``full``), and is built by the consumer with its usual reports.
        """
        floor = await self._acked_floor()
        upto = await self.read_host(until=floor) if floor else Desired()
        full = await self.read_host()
        self.desired = full
        actual = await self.actual()
        fixed: dict[str, list[str]] = {"recreated": [], "started": [], "stopped": [], "removed": []}
        cause = Cause(actor=self.actor, correlation_id=new_id(), causation_id="reconcile")
        for server, (it, _state) in actual.items():
            if server not in full.instances:
                await self._remove(server, it)
                fixed["removed"].append(server)
        for server, want in upto.instances.items():
            have = actual.get(server)
            if have is None and await self._server_done(want.claim):
                continue
            spec = self.instance(want.claim, want)
            running = want.power == "running"
            if (
                have is not None
                and (have[1] == "running") == running
                and (not spec.disk or await asyncio.to_thread(os.path.exists, spec.disk))
            ):
                continue
            try:
                driver = self._driver(spec.instance_type)
                if have is not None and not running:
                    await asyncio.to_thread(driver.stop, server)
                    fixed["stopped"].append(server)
                    continue
                await asyncio.to_thread(self._prepare_disk, spec, await self._image(want.claim))
                await asyncio.to_thread(driver.ensure, spec, running)
            except (HostError, images.ImageError) as exc:
                reason = getattr(exc, "reason", None) or str(exc)
                ev = cause.make(
                    ServerFailed,
                    want.claim.server_tenant,
                    "server",
                    server,
                    reason=reason,
                    host=self.host,
                )
                await self.store.append([ev])
                continue
            fixed["recreated" if have is None else "started"].append(server)
            if running:
                ev = cause.make(
                    ServerRunning,
                    want.claim.server_tenant,
                    "server",
                    server,
                    host=self.host,
                    disk=spec.disk,
                )
                await self.store.append([ev])
        for p in self.disks.glob("*.qcow2"):
            if p.stem not in full.instances:
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
        if not any(fixed.values()):
            return None
        report = cause.make(HostReconciled, SYSTEM, "host", self.host, **fixed)
        await self.store.append([report])
        log.info("reconciled", host=self.host, **{k: len(v) for k, v in fixed.items()})
        return report

    # -- exec -------------------------------------------------------------------

    async def _on_exec(self, msg: Any) -> None:
        try:
            req = msgspec.json.decode(msg.data, type=ExecRequest)
            want = self.desired.instances.get(req.server)
            if want is None or want.claim.instance_type != "container":
                raise HostError(f"no container instance {req.server} on host {self.host}")
            driver = self._driver("container")
            timeout = min(max(req.timeout, 1.0), 600.0)
            result = await asyncio.to_thread(driver.exec, req.server, req.command, timeout)
            body = ExecReply(ok=True, result=result)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            body = ExecReply(ok=False, error=f"bad exec request: {exc}")
        except HostError as exc:
            body = ExecReply(ok=False, error=exc.reason)
        if msg.reply:
            await msg.respond(msgspec.json.encode(body))


def build_agent(
    store: EventStore,
    host: str,
    *,
    libvirt_uri: str,
    data_dir: Path,
    image_store: Path,
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
        image_store=image_store,
        spec=spec,
        vm=vm,
        containers=containers,
        reconcile_interval=reconcile_interval,
    )
