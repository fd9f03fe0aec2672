"""Every event type and command Stratus knows, and the one codec over them."""

from __future__ import annotations

from stratus.events import (
    compute,
    credentials,
    frameworks,
    identity,
    integrations,
    network,
    resources,
    scheduling,
    tenants,
)
from stratus.events.commands import Command
from stratus.events.model import Codec, Event

EVENT_TYPES: tuple[type[Event], ...] = (
    *tenants.EVENTS,
    *identity.EVENTS,
    *credentials.EVENTS,
    *resources.EVENTS,
    *scheduling.EVENTS,
    *compute.EVENTS,
    *integrations.EVENTS,
    *network.EVENTS,
    *frameworks.EVENTS,
)
COMMAND_TYPES: dict[str, type[Command]] = {
    **tenants.COMMANDS,
    **identity.COMMANDS,
    **credentials.COMMANDS,
    **resources.COMMANDS,
    **compute.COMMANDS,
    **integrations.COMMANDS,
    **network.COMMANDS,
    **frameworks.COMMANDS,
}

CODEC = Codec(EVENT_TYPES)
# Older versions of events still on the log, read as today's.
for _module in (resources, scheduling):
    for (_name, _version), _upcast in _module.UPCASTERS.items():
        CODEC.register_upcaster(_name, _version, _upcast)
