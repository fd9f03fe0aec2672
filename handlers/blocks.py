"""Which address-block reports a network agent may make (routed networks).

A network agent claims blocks of a routed network and gives them back
(``ipam.block-claimed`` / ``ipam.block-released`` on the network's
subject, ``ev._system.network.<id>``) and hands out a block's addresses
(``ipam.addresses`` on the block's subject). Neither subject carries the
host, so the broker cannot tell one host's from another's: the agent's
credential may not append on them at all, and it sends these through its
host's report relay (``handlers.reports``), which asks ``check`` here
against the network's history, read fresh from the log:

* a claim: for the agent's own host, of a block of a live routed network
  (of the network's block size, inside its prefix) that no host holds;
* a release: of a block its own host holds;
* addresses: on the subject of a block its own host holds, each inside
  that block;
* a port's address (``port.address-assigned``, ``check_address``): a port
  of a routed network, with an address inside a block its host holds. A
  tenant network's addresses are the handlers' to give: an agent that
  could re-address a port there could take another port's traffic.

``check`` is pure: the relay reads, this decides. Every report also
carries a condition on its own subject (the relay requires it), so what
was checked is what the append is conditioned on.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence

from stratus.events import network as nw
from stratus.events.errors import Forbidden
from stratus.events.model import Event
from stratus.events.resources import SYSTEM, NetworkCreated, NetworkDeleted

# The events of this kind a relay accepts: more than one only on one subject
# (several claims or releases on one network, one atomic append).
BLOCK_EVENTS = (nw.BlockClaimed, nw.BlockReleased, nw.BlockAddresses)


def network_of(event: Event) -> str:
    """The routed network whose history decides on ``event``."""
    if isinstance(event, nw.BlockAddresses):
        return event.network
    return event.aggregate.id


def holders(history: Iterable[Event]) -> tuple[NetworkCreated | None, dict[str, str]]:
    """A network subject's history folded: the routed network (None if
    there is none, or it was deleted) and its blocks' hosts (block -> host),
    as the agents' ``Topology`` folds them."""
    net: NetworkCreated | None = None
    blocks: dict[str, str] = {}
    for ev in history:
        if isinstance(ev, NetworkCreated):
            net = ev if ev.mode == nw.ROUTED else None
        elif isinstance(ev, NetworkDeleted):
            net = None
        elif isinstance(ev, nw.BlockClaimed) and net is not None:
            blocks[ev.block] = ev.host
        elif isinstance(ev, nw.BlockReleased) and blocks.get(ev.block) == ev.host:
            del blocks[ev.block]
    return net, blocks


def check(host: str, events: Sequence[Event], history: Iterable[Event]) -> None:
    """Refuse (``Forbidden``) unless every one of ``events`` is ``host``'s
    to report, given the history of their network's subject."""
    net, blocks = holders(history)
    for ev in events:
        what = f"{ev.type_name()} on {ev.subject}"
        if ev.tenant != SYSTEM:
            raise Forbidden(f"{what}: address blocks are the cloud's, not a tenant's")
        if net is None:
            raise Forbidden(f"{what}: no routed network {network_of(ev)}")
        if isinstance(ev, nw.BlockAddresses):
            if ev.subject != nw.block_subject(ev.network, ev.block):
                raise Forbidden(f"{what}: not the subject of block {ev.block}")
            if blocks.get(ev.block) != host:
                raise Forbidden(f"{what}: block {ev.block} is not held by {host}")
            inside = ipaddress.ip_network(ev.block)
            for address in (*ev.allocated, *ev.released):
                if _address(address, what) not in inside:
                    raise Forbidden(f"{what}: {address} is not in block {ev.block}")
            continue
        if ev.aggregate.kind != "network" or ev.host != host:
            raise Forbidden(f"{what}: not a block report of host {host}")
        if isinstance(ev, nw.BlockReleased):
            if blocks.get(ev.block) != host:
                raise Forbidden(f"{what}: block {ev.block} is not held by {host}")
            del blocks[ev.block]
            continue
        _claimable(net, ev.block, blocks, what)
        blocks[ev.block] = host


def _claimable(net: NetworkCreated, block: str, blocks: dict[str, str], what: str) -> None:
    try:
        b = ipaddress.ip_network(block)
        prefix = ipaddress.ip_network(net.cidr)
    except ValueError:
        raise Forbidden(f"{what}: {block!r} is not an address block") from None
    if (
        b.version != prefix.version or b.prefixlen != net.block_prefix or not b.subnet_of(prefix)  # type: ignore[arg-type]
    ):
        raise Forbidden(f"{what}: {block} is not a /{net.block_prefix} block of {net.cidr}")
    if block in blocks:
        raise Forbidden(f"{what}: block {block} is held by {blocks[block]}")


def check_address(host: str, ip: str, history: Iterable[Event], what: str) -> None:
    """Refuse (``Forbidden``) a port's address that is not inside a block
    ``host`` holds, given its network's subject history (none: the port is
    on no routed network)."""
    net, blocks = holders(history)
    if net is None:
        raise Forbidden(f"{what}: the port is on no routed network; its address is not a host's")
    address = _address(ip, what)
    for block, holder in blocks.items():
        if holder == host and address in ipaddress.ip_network(block):
            return
    raise Forbidden(f"{what}: {ip} is in no block {host} holds")


def _address(text: str, what: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise Forbidden(f"{what}: {text!r} is not an address") from None
