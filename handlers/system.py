"""Cloud-wide objects an operator or an agent manages: hosts (registered by
their compute agents, enabled, disabled, removed) and flavors.

Each is decided on its own subject ``ev._system.<kind>.<name>`` (see
``handlers.world.Aggregate``): its name is its id, never reused.
"""

from __future__ import annotations

from collections.abc import Callable

from stratus.events.model import Cause, Event
from stratus.events.resources import (
    SYSTEM,
    FlavorCreate,
    FlavorCreated,
    FlavorDelete,
    FlavorDeleted,
    HostDisabled,
    HostEnabled,
    HostRegister,
    HostRegistered,
    HostRemove,
    HostRemoved,
    HostSetEnabled,
    HostUpdated,
)
from stratus.handlers.inventory import carried, existing, unused_name
from stratus.handlers.records import Flavor, Host
from stratus.handlers.world import Aggregate


def decide_host_register(a: Aggregate[Host], cmd: HostRegister, cause: Cause) -> list[Event]:
    spec = carried(cmd, HostUpdated)  # all it says but its name
    if a.attrs is None:
        return [cause.make(HostRegistered, SYSTEM, "host", cmd.name, name=cmd.name, **spec)]
    current = a.attrs
    if all(getattr(current, k) == v for k, v in spec.items()):
        return []  # an agent restarting with nothing changed
    return [cause.make(HostUpdated, SYSTEM, "host", cmd.name, **spec)]


def host_switch(enabled: bool) -> Callable[[Aggregate[Host], HostSetEnabled, Cause], list[Event]]:
    """The decision of ``host enable`` (or ``host disable``): nothing if it already is."""

    def decide(a: Aggregate[Host], cmd: HostSetEnabled, cause: Cause) -> list[Event]:
        existing(a, "host", cmd.name)
        want = "enabled" if enabled else "disabled"
        if a.attrs is not None and a.attrs.status == want:
            return []
        cls = HostEnabled if enabled else HostDisabled
        return [cause.make(cls, SYSTEM, "host", cmd.name, reason=cmd.reason)]

    return decide


def decide_host_remove(a: Aggregate[Host], cmd: HostRemove, cause: Cause) -> list[Event]:
    existing(a, "host", cmd.name)
    return [cause.make(HostRemoved, SYSTEM, "host", cmd.name)]


def decide_flavor_create(a: Aggregate[Flavor], cmd: FlavorCreate, cause: Cause) -> list[Event]:
    unused_name(a, "flavor", cmd.name)
    return [cause.make(FlavorCreated, SYSTEM, "flavor", cmd.name, **carried(cmd, FlavorCreated))]


def decide_flavor_delete(a: Aggregate[Flavor], cmd: FlavorDelete, cause: Cause) -> list[Event]:
    existing(a, "flavor", cmd.name)
    return [cause.make(FlavorDeleted, SYSTEM, "flavor", cmd.name)]
