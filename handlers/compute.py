"""Verbs served by a host's compute agent rather than decided on the log.

``server snapshot`` is decided on the tenant like any verb and appends one
``host.server-action`` for the host; the agent then records the image.

``server exec`` appends nothing: the handler authenticates and authorises
the caller like any command (the server's tenant, role member or admin),
finds the server and its host from the tenant's server events, and forwards
the request to ``agent.<host>.exec``, a subject only services may publish
to. The agent never sees a token, and a client can never reach it directly.
"""

from __future__ import annotations

from typing import Any

import msgspec
import nats.errors

from stratus.events.commands import Reply
from stratus.events.compute import HostServerAction, ServerExec, ServerSnapshot
from stratus.events.errors import Conflict, Internal, Invalid, Unavailable
from stratus.events.ids import new_id
from stratus.events.model import Cause, Event
from stratus.handlers.inventory import host_action, unique
from stratus.handlers.records import Server
from stratus.handlers.registry import Special
from stratus.handlers.resources import tenant_handler
from stratus.handlers.world import World, fold

EXEC_SUBJECT = "agent.{host}.exec"
# The agent's own bound plus the round trip.
EXEC_SLACK_S = 5.0


async def _server(service: Any, tenant: str, ref: str) -> Server:
    """The server as its tenant's server events say (not the shared cache:
    its entries belong to the deciding handlers and their quota settings)."""
    w = World()
    w.tenant = tenant
    async for batch in service.store.read(subjects=[f"ev.{tenant}.server.*"]):
        for rec in batch:
            fold(w, rec.decode(service.store.codec))
    return w.servers.find(ref)


async def run_exec(service: Any, cmd: ServerExec, cause: Cause) -> Reply:
    s = await _server(service, cmd.tenant or "", cmd.ref)
    if s.spec.instance_type != "container":
        raise Invalid(f"server {s.name} is a {s.spec.instance_type}; exec needs a container")
    if s.status != "running" or not s.host:
        raise Conflict(f"server {s.name} is {s.status}; exec needs it running")
    body = msgspec.json.encode(
        {"server": s.id, "command": list(cmd.command), "timeout": cmd.timeout}
    )
    try:
        msg = await service.store.nc.request(
            EXEC_SUBJECT.format(host=s.host), body, timeout=cmd.timeout + EXEC_SLACK_S
        )
    except nats.errors.NoRespondersError:
        raise Unavailable(f"the compute agent of host {s.host} is not running") from None
    except (TimeoutError, nats.errors.TimeoutError):
        raise Unavailable(f"the compute agent of host {s.host} did not answer") from None
    reply = msgspec.json.decode(msg.data)
    if not reply.get("ok"):
        raise Conflict(f"host {s.host}: {reply.get('error') or 'exec refused'}")
    result = reply.get("result")
    if not isinstance(result, dict):
        raise Internal("the compute agent answered without a result")
    return Reply(ok=True, data={"server": s.id, **result})


def decide_server_snapshot(w: World, cmd: ServerSnapshot, cause: Cause) -> list[Event]:
    """Ask the server's host for an image of its disk; the agent appends
    ``image.created`` (layered on the server's image) once it is stored."""
    t = cmd.tenant or ""
    s = w.servers.find(cmd.ref)
    if s.spec.instance_type != "vm":
        image = w.images.get(s.spec.image)
        if image is not None and image.format != "oci":
            # A process-mode container has no root of its own to commit.
            raise Invalid(f"server {s.name} is a container of no OCI image; nothing to snapshot")
    if s.status not in ("running", "stopped") or not s.host:
        raise Conflict(f"server {s.name} is {s.status}; snapshots need it built")
    unique(w.images, cmd.name)
    return [
        host_action(s, t, cause, "snapshot", image=new_id(), image_name=cmd.name),
    ]


def _snapshot_result(w: World, events: list[Event]) -> Any:
    for ev in events:
        if isinstance(ev, HostServerAction):
            return {"id": ev.image, "name": ev.image_name, "server": ev.server, "status": "saving"}
    return None


def handlers(quota_defaults: dict[str, int] | None = None) -> list[Any]:
    def world() -> World:
        return World(quota_defaults)

    return [
        Special("server.exec", ServerExec, "server.exec", run_exec, tenant_of=lambda c: c.tenant),
        tenant_handler(
            "server.snapshot",
            ServerSnapshot,
            decide_server_snapshot,
            world,
            result=_snapshot_result,
        ),
    ]
