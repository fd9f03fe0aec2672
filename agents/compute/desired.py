"""What the log wants on one host: the fold of its subject ``ev._system.host.<name>``.

Pure: ``fold(desired, event)`` and nothing else, so reconcile and the tests
compute the same answer from the same events.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from stratus.events.compute import HostServerAction
from stratus.events.model import Event
from stratus.events.resources import HostRegistered, HostRemoved, HostUpdated
from stratus.events.scheduling import HostClaimed, HostReleased


@dataclass
class Want:
    claim: HostClaimed
    power: str = "running"  # or "stopped"
    volumes: dict[str, int] = field(default_factory=dict)  # volume id -> size in GB


@dataclass
class Desired:
    registered: dict | None = None  # the host's registration as last recorded
    instances: dict[str, Want] = field(default_factory=dict)
    seq: int = 0  # the last host event folded


_SPEC = ("vcpus", "ram_mb", "disk_gb", "zone", "labels", "types")


def fold(d: Desired, event: Event, seq: int = 0) -> Desired:
    if seq:
        d.seq = seq
    if isinstance(event, HostRegistered | HostUpdated):
        d.registered = {k: getattr(event, k) for k in _SPEC}
    elif isinstance(event, HostRemoved):
        d.registered = None
    elif isinstance(event, HostClaimed):
        d.instances[event.server] = Want(event)
    elif isinstance(event, HostReleased):
        d.instances.pop(event.server, None)
    elif isinstance(event, HostServerAction):
        want = d.instances.get(event.server)
        if want is None:
            return d
        if event.action == "delete":
            del d.instances[event.server]
        elif event.action == "stop":
            want.power = "stopped"
        elif event.action in ("start", "reboot"):
            want.power = "running"
        elif event.action == "attach-volume":
            want.volumes[event.volume] = event.size_gb
        elif event.action == "detach-volume":
            want.volumes.pop(event.volume, None)
    return d
