"""What the log wants on one host: the fold of its subject ``ev._system.host.<name>``.

Pure: ``fold(desired, event, seq)`` and nothing else, so the agent's start,
its consumer and the tests compute the same answer from the same events.
Folded in log order, a deletion always comes after the claim it ends,
however the consumer happens to deliver them: a claim redelivered after a
crash finds its server already gone here.

Besides the instances (claim, power, volumes) it keeps what the agent still
owes the log: one-shot actions (reboot, snapshot) and deletions to confirm
with ``server.deleted``. Events at or below ``done`` (the consumer's ack
floor when the agent folds at start) were handled before, so they owe
nothing; the agent drops the rest once it has done them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from stratus.events.compute import HostServerAction
from stratus.events.model import Event
from stratus.events.resources import HostRegistered, HostRemoved, HostUpdated
from stratus.events.scheduling import HostClaimed, HostReleased

# Actions that happen once rather than set a state.
ONE_SHOT = ("reboot", "snapshot")


@dataclass
class Want:
    claim: HostClaimed
    power: str = "running"  # or "stopped"
    volumes: dict[str, int] = field(default_factory=dict)  # volume id -> size in GB
    # Reboots and snapshots asked for and not done yet, in log order.
    actions: list[HostServerAction] = field(default_factory=list)
    # The last event that asked something of this instance (the claim, then
    # each action): what its host's reports are caused by.
    cause: Event = field(init=False)

    def __post_init__(self) -> None:
        self.cause = self.claim


@dataclass
class Gone:
    """A server this host must no longer run (deleted, or its claim released).

    ``delete``: the action whose ``server.deleted`` the agent still owes."""

    tenant: str
    seq: int
    delete: HostServerAction | None = None


@dataclass
class Desired:
    registered: dict | None = None  # the host's registration as last recorded
    instances: dict[str, Want] = field(default_factory=dict)
    gone: dict[str, Gone] = field(default_factory=dict)
    seq: int = 0  # the last host event folded
    done: int = 0  # events up to here were handled before: nothing owed for them


_SPEC = ("vcpus", "ram_mb", "disk_gb", "zone", "labels", "types")


def fold(d: Desired, event: Event, seq: int = 0) -> Desired:
    """Fold one event of the host's subject. ``seq`` 0: an event not from the
    log (applied as is); otherwise one already folded is skipped."""
    if seq:
        if seq <= d.seq:
            return d
        d.seq = seq
    owed = not seq or seq > d.done
    if isinstance(event, HostRegistered | HostUpdated):
        d.registered = {k: getattr(event, k) for k in _SPEC}
    elif isinstance(event, HostRemoved):
        d.registered = None
    elif isinstance(event, HostClaimed):
        d.instances[event.server] = Want(event)
        d.gone.pop(event.server, None)
    elif isinstance(event, HostReleased):
        d.instances.pop(event.server, None)
        if owed and event.server not in d.gone:
            d.gone[event.server] = Gone(event.server_tenant, seq)
    elif isinstance(event, HostServerAction):
        _act(d, event, seq, owed)
    return d


def _act(d: Desired, event: HostServerAction, seq: int, owed: bool) -> None:
    if event.action == "delete":
        # Confirmed even when nothing of it is here (its build failed, say):
        # the tenant waits for ``server.deleted`` from this host.
        d.instances.pop(event.server, None)
        if owed:
            d.gone[event.server] = Gone(event.server_tenant, seq, event)
        return
    want = d.instances.get(event.server)
    if want is None:
        return  # not on this host
    want.cause = event
    if event.action == "stop":
        want.power = "stopped"
    elif event.action in ("start", "reboot"):
        want.power = "running"
    elif event.action == "attach-volume":
        want.volumes[event.volume] = event.size_gb
    elif event.action == "detach-volume":
        want.volumes.pop(event.volume, None)
    if event.action in ONE_SHOT and owed:
        want.actions.append(event)
