"""The relay that appends host agents' reports: only about what is on their host.

An agent's credential cannot append on a server's or a port's subject
(``events.reports`` says why); it asks ``report.<host>``, which the broker
lets only the agent of ``host`` send, and this relay (run by the handlers,
which may append anything) appends the one event if it is that host's to
report, read fresh from the log:

* a server's lifecycle report (``server.building``, ``running``,
  ``stopped``, ``build-failed``, ``failed``, ``deleted``): on the server's
  own subject, whose last placement (``server.scheduled``, or a report of
  its host: ``building``, ``running``) names this host;
* a snapshot's ``image.created``: a new image (condition: nothing on its
  subject yet) of the tenant of a server placed on this host; its bytes
  are copied from the host's own bucket into the image bucket first
  (``handlers.snapshots``);
* ``port.bound`` to this host: a port of a server placed on it, or a router
  port on a host registered as running the routers; ``port.address-assigned``
  the same, for a port of a routed network with an address from a block
  this host holds;
* a routed network's address blocks claimed and given back by this host,
  and the addresses of its blocks (``handlers.blocks``); several claims or
  releases on one network are one atomic append.

The event's actor must be the agent of this host, and its condition, if
any, on the event's own subject; the message id is the agent's, so a
retried report is recognised. Anything else is refused (``forbidden``)
and nothing is appended.
"""

from __future__ import annotations

import contextlib

import msgspec
import structlog
from nats.aio.msg import Msg

from stratus.events.blobs import BlobStore
from stratus.events.errors import ConcurrencyConflict, Forbidden, Invalid, StratusError
from stratus.events.ids import NAME_RE, TOKEN_RE
from stratus.events.model import Event
from stratus.events.network import NetworkAgentRegistered
from stratus.events.reports import REPLY, REPORT_SUBJECT, REQUEST, ReportReply, ReportRequest
from stratus.events.resources import (
    SYSTEM,
    ImageActivated,
    ImageCreated,
    PortAddressAssigned,
    PortBound,
    PortCreated,
    ServerBuilding,
    ServerDeleted,
    ServerFailed,
    ServerRequested,
    ServerRunning,
    ServerScheduled,
    ServerStopped,
)
from stratus.events.responder import Responder
from stratus.events.scheduling import ServerBuildFailed
from stratus.events.store import EventStore
from stratus.handlers import blocks, snapshots

log = structlog.get_logger("stratus.reports")

QUEUE_GROUP = "reports"
# Events in one report, at most (an atomic batch holds 1,000).
MAX_EVENTS = 200
# Events on a server's subject that say where it is (all appended by the
# scheduler, or through this relay after the same check).
PLACEMENTS = (ServerScheduled, ServerBuilding, ServerRunning)
SERVER_REPORTS = (
    ServerBuilding,
    ServerRunning,
    ServerStopped,
    ServerBuildFailed,
    ServerFailed,
    ServerDeleted,
)


class ReportRelay(Responder):
    """Serves ``report.*`` for every host (a queue group: any number of handlers)."""

    internal_message = "internal error; see the handler log"
    failed = "report failed"

    def __init__(self, store: EventStore, queue: str = QUEUE_GROUP) -> None:
        super().__init__(store.nc, REPORT_SUBJECT.format(host="*"), queue=queue, log=log)
        self.store = store
        self._images: BlobStore | None = None

    async def answer(self, msg: Msg) -> bytes:
        host = msg.subject.partition(".")[2]
        try:
            req, events = self._decode(host, msg.data)
            if len(events) > 1 or isinstance(events[0], blocks.BLOCK_EVENTS):
                await self._blocks(host, events, req)
            else:
                await self.authorize(host, events[0], req)
            if isinstance(events[0], ImageCreated):
                await self._snapshot_bytes(host, events[0], req.server)
            result = await self.store.append(events, req.condition, msg_id=req.msg_id)
        except ConcurrencyConflict as err:
            return REPLY.encode(ReportReply(ok=False, error=err.to_wire(), actual=err.actual))
        except StratusError as err:
            if isinstance(err, Forbidden):
                log.warning("report refused", host=host, reason=err.message)
            return REPLY.encode(ReportReply(ok=False, error=err.to_wire()))
        return REPLY.encode(ReportReply(ok=True, seqs=result.seqs, duplicate=result.duplicate))

    async def _snapshot_bytes(self, host: str, event: ImageCreated, server: str) -> None:
        """A snapshot's objects, from its host's bucket into the image bucket
        (``handlers.snapshots``), before its image is recorded."""
        if self._images is None:
            self._images = await BlobStore.open(self.store.js)
        inherited = await self._server_image_objects(event, server)
        await snapshots.adopt(
            self.store.js, self._images, host, snapshots.digests_of(event), inherited
        )

    async def _server_image_objects(self, event: ImageCreated, server: str) -> set[str]:
        """The objects of the image ``server`` runs, if the snapshot names it
        as its parent (what the snapshot may hold without uploading it)."""
        image = ""
        for ev in await self._history(f"ev.{event.tenant}.server.{server}"):
            if isinstance(ev, ServerRequested):
                image = ev.spec.image
        if not image or event.parent != image or not TOKEN_RE.match(image):
            return set()
        out: set[str] = set()
        for ev in await self._history(f"ev.*.image.{image}"):
            if isinstance(ev, (ImageCreated, ImageActivated)):
                out = set(snapshots.digests_of(ev))
        return out

    def _decode(self, host: str, data: bytes) -> tuple[ReportRequest, list[Event]]:
        if not NAME_RE.match(host):
            raise Invalid(f"report subject names no host: {host!r}")
        try:
            req = REQUEST.decode(data)
        except msgspec.DecodeError as exc:
            raise Invalid(f"not a report request: {exc}") from None
        if len(req.more) >= MAX_EVENTS:
            raise Invalid(f"a report holds at most {MAX_EVENTS} events")
        try:
            events = [self.store.codec.decode(b) for b in (req.event, *req.more)]
        except Exception as exc:  # an unknown or malformed event
            raise Invalid(f"not an event this relay knows: {exc}") from None
        return req, events

    async def _blocks(self, host: str, events: list[Event], req: ReportRequest) -> None:
        """Address-block reports (``handlers.blocks``): one subject, its
        condition required, checked against its network's history."""
        first = events[0]
        what = f"{first.type_name()} on {first.subject}"
        if not all(isinstance(ev, blocks.BLOCK_EVENTS) for ev in events):
            raise Forbidden(f"{what}: only address-block reports come several at once")
        if any(ev.subject != first.subject for ev in events):
            raise Forbidden(f"{what}: the events of one report are on one subject")
        cond = req.condition
        if cond is None or cond.subject != first.subject or cond.index != 0:
            raise Forbidden(f"{what}: a block report is conditioned on its own subject")
        for ev in events:
            self._actor(ev, f"network-agent:{host}")
        network = blocks.network_of(first)
        if not TOKEN_RE.match(network) or any(blocks.network_of(e) != network for e in events):
            raise Forbidden(f"{what}: not of one routed network")
        blocks.check(host, events, await self._history(f"ev.{SYSTEM}.network.{network}"))

    async def authorize(self, host: str, event: Event, req: ReportRequest) -> None:
        """Refuse (``Forbidden``) what is not this host's to report."""
        what = f"{event.type_name()} on {event.subject}"
        cond = req.condition
        if cond is not None and cond.subject != event.subject:
            raise Forbidden(f"{what}: a report's condition is on its own subject")
        if isinstance(event, SERVER_REPORTS):
            self._actor(event, f"compute-agent:{host}")
            if event.aggregate.kind != "server" or getattr(event, "host", host) != host:
                raise Forbidden(f"{what}: not a report of host {host}")
            await self._placed(event.tenant, event.aggregate.id, host, what)
        elif isinstance(event, ImageCreated):
            self._actor(event, f"compute-agent:{host}")
            if cond is None or cond.last_seq != 0:
                raise Forbidden(f"{what}: a snapshot makes a new image (condition: none yet)")
            if not req.server:
                raise Forbidden(f"{what}: name the server the snapshot is of")
            await self._placed(event.tenant, req.server, host, what)
        elif isinstance(event, (PortBound, PortAddressAssigned)):
            # (a routed port's address is handed out by its host's agent)
            self._actor(event, f"network-agent:{host}")
            if event.host != host:
                raise Forbidden(f"{what}: binds it to {event.host}, not to {host}")
            port = await self._port_here(event, host, what)
            if isinstance(event, PortAddressAssigned):
                if not TOKEN_RE.match(port.network):
                    raise Forbidden(f"{what}: no such network")
                history = await self._history(f"ev.{SYSTEM}.network.{port.network}")
                blocks.check_address(host, event.ip, history, what)
        else:
            raise Forbidden(f"{what}: not a report a host agent makes through the relay")

    @staticmethod
    def _actor(event: Event, actor: str) -> None:
        if event.actor != actor:
            raise Forbidden(f"a report of {actor} cannot be made as {event.actor!r}")

    async def _history(self, subject: str) -> list[Event]:
        out = []
        for rec in await self.store.read_all(subjects=[subject]):
            with contextlib.suppress(Exception):  # a foreign writer's bytes
                out.append(rec.decode(self.store.codec))
        return out

    async def _placed(self, tenant: str, server: str, host: str, what: str) -> None:
        if not (NAME_RE.match(tenant) or tenant == SYSTEM) or not TOKEN_RE.match(server):
            raise Forbidden(f"{what}: no such server")
        placed = ""
        for ev in await self._history(f"ev.{tenant}.server.{server}"):
            if isinstance(ev, PLACEMENTS):
                placed = ev.host
        if placed != host:
            raise Forbidden(
                f"{what}: server {server} is placed on {placed or 'no host'}, not on {host}"
            )

    async def _port_here(
        self, event: PortBound | PortAddressAssigned, host: str, what: str
    ) -> PortCreated:
        """The port ``event`` is about, if it is on ``host``."""
        port = None
        for ev in await self._history(event.subject):
            if isinstance(ev, PortCreated):
                port = ev
        if port is None:
            raise Forbidden(f"{what}: no such port")
        if port.device_owner == "compute":
            await self._placed(event.tenant, port.device, host, what)
            return port
        if port.device_owner == "router_interface" and await self._router_host(host):
            return port
        raise Forbidden(f"{what}: the port is not on host {host}")

    async def _router_host(self, host: str) -> bool:
        routers = False
        for ev in await self._history(f"ev.{SYSTEM}.network-agent.{host}"):
            if isinstance(ev, NetworkAgentRegistered):
                routers = ev.routers
        return routers
