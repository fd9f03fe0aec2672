"""What tenant verbs on a placed server tell its host's compute agent.

A server's own events live on ``ev.<tenant>.server.<id>``; its agent
consumes only its host's subject ``ev._system.host.<name>``. So a verb that
needs the host to act (delete, stop, start, reboot, attach a volume, take a
snapshot) appends ``host.server-action`` there too, in the same atomic batch
as the tenant's event: the agent learns its whole job from one subject, in
order, and the action can never land without the tenant event or the other
way round.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from stratus.events.commands import Command
from stratus.events.model import Event
from stratus.events.resources import Name, Ref, TenantScoped

Action = Literal["delete", "stop", "start", "reboot", "attach-volume", "detach-volume", "snapshot"]


class HostServerAction(Event, frozen=True, tag="host.server-action"):
    """Do ``action`` to ``server`` (of ``server_tenant``) on this host.

    ``volume``/``size_gb``: the volume attached or detached; ``image``/
    ``image_name``: the image a snapshot becomes (its id chosen by the verb).
    """

    server: str
    server_tenant: str
    action: Action
    volume: str = ""
    size_gb: int = 0
    image: str = ""
    image_name: str = ""


class HostReconciled(Event, frozen=True, tag="host.reconciled"):
    """What the agent corrected when the host differed from the log: servers
    it recreated, started or stopped to match, and Stratus-owned instances
    no event wants any more that it removed."""

    recreated: list[str] = []
    started: list[str] = []
    stopped: list[str] = []
    removed: list[str] = []


EVENTS = (HostServerAction, HostReconciled)


class ServerExec(TenantScoped, frozen=True):
    """Run ``command`` inside a running container instance (``server exec``)."""

    ref: Ref
    command: Annotated[
        list[Annotated[str, msgspec.Meta(max_length=4096)]],
        msgspec.Meta(min_length=1, max_length=256),
    ]
    timeout: Annotated[float, msgspec.Meta(gt=0, le=600)] = 60.0


class ServerSnapshot(TenantScoped, frozen=True):
    """Make image ``name`` from the server's disk (``server snapshot``)."""

    ref: Ref
    name: Name


COMMANDS: dict[str, type[Command]] = {"server.exec": ServerExec, "server.snapshot": ServerSnapshot}
