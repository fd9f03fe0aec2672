"""Address arithmetic of the network decisions: parsing what a command
gives, a prefix's gateway and allocation pool, the first free address of a
pool, and a port's MAC. Pure functions; a bad value is ``Invalid`` and an
exhausted pool ``Conflict``.
"""

from __future__ import annotations

import hashlib
import ipaddress

import msgspec

from stratus.events.errors import Conflict, Invalid

# The widest tenant subnet per IP version: one L2 segment (a bridge and its
# ARP/neighbour tables on every host) should not hold more than that.
SUBNET_WIDEST = {4: 16, 6: 64}


def mac_of(port_id: str) -> str:
    # OpenStack's locally administered prefix; the rest from the id, so a
    # replayed decision gives the same address.
    h = hashlib.sha256(port_id.encode()).digest()
    return "fa:16:3e:" + ":".join(f"{b:02x}" for b in h[:3])


def parse_network(value: str, what: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        return ipaddress.ip_network(value, strict=True)
    except ValueError as exc:
        raise Invalid(f"{what}: {exc}") from None


def parse_address(value: str, what: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address(value)
    except ValueError as exc:
        raise Invalid(f"{what}: {exc}") from None


class Range(msgspec.Struct, frozen=True):
    gateway: str
    start: str
    end: str


def address_range(
    cidr: str, gateway: str | None, start: str | None, end: str | None, what: str
) -> Range:
    """Gateway and allocation pool of a prefix, defaults as Neutron's: the
    first host is the gateway, the rest of the hosts are the pool."""
    net = parse_network(cidr, f"{what} cidr")
    if net.num_addresses < 4:
        raise Invalid(f"{what} cidr {cidr} is too small: at least a /30 (or /126)")
    first, last = net.network_address + 1, net.broadcast_address - 1
    gw = parse_address(gateway, f"{what} gateway") if gateway else first
    lo = (
        parse_address(start, f"{what} pool start")
        if start
        else (first + 1 if gw == first else first)
    )
    hi = parse_address(end, f"{what} pool end") if end else last
    for name, a in (("gateway", gw), ("pool start", lo), ("pool end", hi)):
        if a not in net or a in (net.network_address, net.broadcast_address):
            raise Invalid(f"{what} {name} {a} is not a host address of {cidr}")
    if lo > hi:
        raise Invalid(f"{what} pool start {lo} is after its end {hi}")
    return Range(str(gw), str(lo), str(hi))


def first_free(start: str, end: str, taken: set[str], what: str) -> str:
    """The lowest address from ``start`` to ``end`` not in ``taken``."""
    lo, hi = ipaddress.ip_address(start), ipaddress.ip_address(end)
    a = lo
    while a <= hi:
        if str(a) not in taken:
            return str(a)
        a += 1
    raise Conflict(f"{what}: no free address left ({start} to {end} are all in use)")
