"""Addresses of routed networks, Calico's way: a host claims a block of the
network's prefix when it needs one, hands out the block's addresses to the
instances placed on it, and gives the block back once none is in use.

``work(topology, host, ports)`` is pure: what this host must append for
the given ports (None: all), worked out from the log as folded. The agent
sends it through its host's report relay (which checks the blocks are its
host's: ``handlers.blocks``), each append conditioned on the last event of
the subject it writes (the network's for claims and returns, each block's for
its addresses), so two hosts never claim one block and one block never
hands out an address twice; refused, the work is worked out again once
the events that beat it are folded.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field

from stratus.agents.network.desired import Port, Topology
from stratus.events import network as nw
from stratus.events.model import Cause, Event
from stratus.events.resources import SYSTEM, PortAddressAssigned
from stratus.events.store import Condition


@dataclass
class Work:
    claims: list[tuple[str, str]] = field(default_factory=list)  # (network, block)
    # Blocks claimed ahead: the host's blocks of a network are running low
    # (appended after the addresses, which do not wait for them).
    ahead: list[tuple[str, str]] = field(default_factory=list)  # (network, block)
    assigns: list[tuple[Port, str, str]] = field(default_factory=list)  # (port, block, ip)
    releases: list[tuple[str, str, str, str]] = field(default_factory=list)
    # ^ (block subject, ip, holder tenant, holder port)
    returns: list[tuple[str, str]] = field(default_factory=list)  # (network, block)
    exhausted: list[str] = field(default_factory=list)  # networks with no block left

    def __bool__(self) -> bool:
        return bool(self.claims or self.ahead or self.assigns or self.releases or self.returns)


def reserve(t: Topology, network: str) -> int:
    """Free addresses below which a host claims its next block of the
    network ahead (a quarter of a block). Every claim on a network is
    conditioned on the network's last event, so hosts claiming at once
    are refused in turn and each tries again once it has folded the one
    that beat it; a port should not wait through that."""
    return max(1, 2 ** (32 - t.routed[network].block_prefix) // 4)


def work(t: Topology, host: str, ports: Iterable[str] | None = None, limit: int = 200) -> Work:
    """What ``host`` appends for ``ports`` (None: every port): addresses
    for its routed ports that have none from it, releases of what its
    blocks hold for ports gone or moved, claims of new blocks when its own
    are full (and ahead, when they run low: ``reserve``), and blocks it
    holds but no longer uses, given back (one kept while the others run
    low). At most ``limit`` addresses at a time (an atomic batch holds
    1,000 events)."""
    out = Work()
    mine = {b: net for b, (net, h) in t.blocks.items() if h == host}
    candidates = t.ports.keys() if ports is None else ports
    # Releases: what our blocks hold for a port that is gone, moved or re-addressed.
    held_for = set(t.held) if ports is None else set(candidates)
    for pid in sorted(held_for):
        p = t.ports.get(pid)
        for subject, ip in sorted(t.held.get(pid, ())):
            tenant, _ = t.allocations.get(subject, {}).get(ip, ("", ""))
            _, block = t.block_subjects.get(subject, ("", ""))
            if block not in mine:
                continue  # another host's block: its agent releases
            if p is None or not t.routed_here(p, host) or p.host != host or p.ip != ip:
                out.releases.append((subject, ip, tenant, pid))
    released = {(s, ip) for s, ip, _, _ in out.releases}
    # Addresses for ports placed here that have none from this host yet.
    wanted = []
    for pid in sorted(candidates):
        p = t.ports.get(pid)
        if p is None or not t.routed_here(p, host):
            continue
        good = (
            p.host == host
            and p.ip
            and any((s, ip) not in released and ip == p.ip for s, ip in t.held.get(pid, ()))
        )
        if not good:
            wanted.append(p)
    taken: dict[str, set[str]] = {}
    for p in wanted[:limit]:
        block = _free_block(t, p.network, mine, taken, released)
        if block is None:
            block = _new_block(t, p.network, {b for b, _ in out.claims})
            if block is None:
                out.exhausted.append(p.network)
                continue
            out.claims.append((p.network, block))
            mine[block] = p.network
        ip = _free_address(t, p.network, block, taken, released)
        assert ip is not None  # (a fresh or non-full block has one)
        taken.setdefault(block, set()).add(ip)
        out.assigns.append((p, block, ip))
    # Per network: the free addresses of our blocks, and the empty blocks.
    free: dict[str, int] = {}
    empty: dict[str, list[str]] = {}
    held: dict[str, int] = {}  # blocks
    for block, network in sorted(mine.items(), key=lambda kv: ipaddress.ip_network(kv[0])):
        subject = nw.block_subject(network, block)
        left = {ip for ip in t.allocations.get(subject, {}) if (subject, ip) not in released}
        left |= taken.get(block, set())
        free[network] = free.get(network, 0) + _size(t, network, block) - len(left)
        held[network] = held.get(network, 0) + 1
        if not left:
            empty.setdefault(network, []).append(block)
    for network in sorted(free):
        low = reserve(t, network)
        if len(empty.get(network, ())) == held[network]:
            # Nothing of the network here any more: every block goes back.
            out.returns += [(network, b) for b in empty.get(network, [])]
            continue
        # Empty blocks go back, but for one while the rest run low (the
        # next ports' block, claimed ahead); twice the reserve before it
        # goes, so a block is not claimed and returned wave after wave.
        for b in empty.get(network, []):
            if (network, b) in out.claims:
                continue
            if free[network] - _size(t, network, b) >= 2 * low:
                out.returns.append((network, b))
                free[network] -= _size(t, network, b)
        if free[network] < low:
            block = _new_block(t, network, {b for _, b in out.claims})
            if block is not None:
                out.ahead.append((network, block))
    return out


def _size(t: Topology, network: str, block: str) -> int:
    """How many addresses of ``block`` instances may have (``_usable``)."""
    net, b = ipaddress.ip_network(t.routed[network].cidr), ipaddress.ip_network(block)
    return b.num_addresses - sum(a in b for a in (net.network_address, net.broadcast_address))


def _usable(t: Topology, network: str, block: str) -> Iterable[ipaddress.IPv4Address]:
    """A block's addresses, less the routed network's own first and last
    (every other address of a block is an instance's /32)."""
    net = ipaddress.ip_network(t.routed[network].cidr)
    for a in ipaddress.ip_network(block):
        if a not in (net.network_address, net.broadcast_address):
            yield a


def _free_address(
    t: Topology, network: str, block: str, taken: dict[str, set[str]], released: set
) -> str | None:
    """The block's first address nobody holds (one released in this very
    batch is not handed out again in it)."""
    subject = nw.block_subject(network, block)
    held = t.allocations.get(subject, {})
    now = taken.get(block, set())
    for a in _usable(t, network, block):
        ip = str(a)
        if ip not in now and ip not in held:
            return ip
    return None


def _free_block(
    t: Topology, network: str, mine: dict[str, str], taken: dict[str, set[str]], released: set
) -> str | None:
    for block, net in sorted(mine.items(), key=lambda kv: ipaddress.ip_network(kv[0])):
        if net == network and _free_address(t, network, block, taken, released) is not None:
            return block
    return None


def _new_block(t: Topology, network: str, claiming: set[str]) -> str | None:
    """The first block of the network no host holds."""
    rn = t.routed[network]
    for sub in ipaddress.ip_network(rn.cidr).subnets(new_prefix=rn.block_prefix):
        b = str(sub)
        if b not in t.blocks and b not in claiming:
            return b
    return None


@dataclass
class Append:
    """One append: its events (an atomic batch if several) and conditions."""

    events: list[Event]
    conditions: list[Condition]
    msg_id: str | None = None


def steps(t: Topology, host: str, w: Work, actor: str) -> list[list[Append]]:
    """``w`` as appends, in steps: the appends of a step are independent
    (sent together), a step starts once the one before is stored. Claims
    first (one append per network, conditioned on its last event), then one
    event per block of the addresses it hands out and takes back
    (conditioned on the block's last event: its host's agent is its only
    writer, so that is one publish, no batch), then the blocks given back
    and claimed ahead, of the networks that had no claim first (their
    condition is what the work was decided on; the next work, from the log
    with the claim, does them). Each port's address is reported by
    ``assignments``."""
    from stratus.events.ids import new_id

    own = Cause(actor, new_id(), new_id())
    out: list[list[Append]] = []

    def on_networks(events: list[Event]) -> list[Append]:
        # One append per network (its events on its subject, atomic): each
        # goes through the host's report relay, which takes one subject.
        by_net: dict[str, list[Event]] = {}
        for ev in events:
            by_net.setdefault(ev.aggregate.id, []).append(ev)
        return [
            Append(evs, [Condition(evs[0].subject, t.routed[net].seq)])
            for net, evs in sorted(by_net.items())
        ]

    if w.claims:
        claims = [
            own.make(nw.BlockClaimed, SYSTEM, "network", net, block=block, host=host)
            for net, block in w.claims
        ]
        out.append(on_networks(claims))
    blocks: dict[tuple[str, str], tuple[dict, dict]] = {}
    for subject, ip, tenant, holder in w.releases:
        net, block = t.block_subjects[subject]
        blocks.setdefault((net, block), ({}, {}))[1][ip] = nw.Holder(tenant, holder)
    for p, block, ip in w.assigns:
        blocks.setdefault((p.network, block), ({}, {}))[0][ip] = nw.Holder(p.tenant, p.id)
    per_block = []
    for (net, block), (allocated, released) in sorted(blocks.items()):
        subject = nw.block_subject(net, block)
        ev = own.make(
            nw.BlockAddresses,
            SYSTEM,
            "ipblock",
            subject.rsplit(".", 1)[-1],
            network=net,
            block=block,
            allocated=allocated,
            released=released,
        )
        per_block.append(Append([ev], [Condition(subject, t.block_seq.get(subject, 0))]))
    if per_block:
        out.append(per_block)
    claimed = {net for net, _ in w.claims}
    last = [
        own.make(nw.BlockReleased, SYSTEM, "network", net, block=block, host=host)
        for net, block in w.returns
        if net not in claimed
    ] + [
        own.make(nw.BlockClaimed, SYSTEM, "network", net, block=block, host=host)
        for net, block in w.ahead
        if net not in claimed
    ]
    if last:
        out.append(on_networks(last))
    return out


def assignments(
    w: Work, host: str, actor: str, stored: set[tuple[str, str]] | None = None
) -> list[Append]:
    """Each port's ``port.address-assigned``: a report of what its block's
    event decided (as ``port.bound`` is of a wired port), with an id that
    makes a retry a duplicate; of the blocks ``stored`` (network, block)
    only, when given (their events were stored, the others' not)."""
    from stratus.events.ids import new_id

    out = []
    for p, block, ip in w.assigns:
        if stored is not None and (p.network, block) not in stored:
            continue
        corr, causation = p.cause
        cause = Cause(actor, corr or new_id(), causation or new_id())
        ev = cause.make(PortAddressAssigned, p.tenant, "port", p.id, host=host, ip=ip)
        out.append(Append([ev], [], msg_id=f"addr-{p.id}-{ip}"))
    return out
