"""Routed networks (Calico's model): the cloud admin's decision to make one,
and how a tenant's server finds one by name.

A routed network is cloud-wide, on ``ev._system.network.<name>`` like an
external network, and shared by every tenant's container instances. Its
addresses are unique across the cloud by construction: one prefix, cut into
blocks that hosts claim (see ``events.network``). The decision reads every
cloud-wide network (``ev._system.network.>``) and appends on the condition
that none changed, so two routed networks never overlap each other or an
external one, and a name is never taken twice.

Isolation between tenants on a routed network is by security groups alone,
as in Calico: there is no segment to keep them apart.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from stratus.events.errors import AlreadyExists, Invalid, NotFound
from stratus.events.model import Cause, Event
from stratus.events.network import ROUTED, RoutedNetworkCreate
from stratus.events.resources import SYSTEM, NetworkCreated
from stratus.handlers.lookup import Lookup
from stratus.handlers.records import Network
from stratus.handlers.registry import Handler
from stratus.handlers.world import World, payload

NETWORKS = f"ev.{SYSTEM}.network.>"
# The widest routed network: more blocks than this is more claims than BIRD
# and the agents are built to carry.
WIDEST = 8


class SystemNetworks:
    """Every cloud-wide network (external and routed) ever made: name -> attributes."""

    __slots__ = ("nets",)

    def __init__(self) -> None:
        self.nets: dict[str, dict[str, Any]] = {}


def fold_networks(state: SystemNetworks, event: Event) -> SystemNetworks:
    # (cloud-wide networks are never deleted: a name, once taken, stays taken)
    if isinstance(event, NetworkCreated):
        state.nets[event.aggregate.id] = {**payload(event), "id": event.aggregate.id}
    return state


def decide_routed_network_create(
    s: SystemNetworks, cmd: RoutedNetworkCreate, cause: Cause
) -> list[Event]:
    if cmd.name in s.nets:
        raise AlreadyExists(f"network {cmd.name} exists or existed; names are never reused")
    try:
        net = ipaddress.ip_network(cmd.cidr, strict=True)
    except ValueError as exc:
        raise Invalid(f"cidr: {exc}") from None
    if net.version != 4:
        raise Invalid(f"cidr {cmd.cidr}: routed networks are IPv4")
    if net.prefixlen < WIDEST:
        raise Invalid(f"cidr {cmd.cidr} is too large: at most a /{WIDEST}")
    if cmd.block_prefix < net.prefixlen:
        raise Invalid(f"block prefix /{cmd.block_prefix} is wider than the network {net}")
    for other in s.nets.values():
        if not other.get("cidr"):
            continue
        theirs = ipaddress.ip_network(other["cidr"])
        if theirs.version == net.version and theirs.overlaps(net):
            raise Invalid(f"cidr {net} overlaps network {other['id']} ({theirs})")
    return [
        cause.make(
            NetworkCreated,
            SYSTEM,
            "network",
            cmd.name,
            name=cmd.name,
            cidr=str(net),
            mode=ROUTED,
            block_prefix=cmd.block_prefix,
        )
    ]


def handlers() -> list[Handler]:
    return [
        Handler(
            verb="network.create-routed",
            command=RoutedNetworkCreate,
            permission="network.create-routed",
            boundary=lambda c: NETWORKS,
            initial=SystemNetworks,
            fold=fold_networks,
            decide=decide_routed_network_create,
            result=_created,
        )
    ]


def _created(s: SystemNetworks, events: list[Event]) -> Any:
    for ev in events:
        if isinstance(ev, NetworkCreated):
            return {**s.nets.get(ev.aggregate.id, {}), "status": "active", "tenant": SYSTEM}
    return None


# -- a tenant's server on a routed network ------------------------------------------


async def routed_networks(refs: list[str], lookup: Lookup) -> dict[str, Network]:
    """The routed networks among ``refs`` (by name), read from their own
    subjects: what a server create may attach to besides the tenant's own."""
    out: dict[str, Network] = {}
    for ref in refs:
        net = await lookup.system(Network, ref)
        if net is not None and net.mode == ROUTED:
            out[ref] = net
    return out


def attachable(w: World, routed: dict[str, Network], ref: str, instance_type: str) -> Network:
    """The network a server names: the tenant's own, else a routed network
    (``routed``, found by ``routed_networks``), which carries container
    instances only."""
    try:
        return w.networks.find(ref)
    except NotFound:
        net = routed.get(ref)
        if net is None:
            raise
    if instance_type != "container":
        raise Invalid(f"network {ref} is routed: it carries container instances only")
    return net
