"""Where webhooks may POST: never into the control plane's own networks.

A tenant names the URL, and Stratus makes the request from inside the
cloud, so an unchecked URL lets a tenant reach what only the control plane
should: loopback services, link-local cloud metadata (169.254.169.254),
private networks, multicast. ``TargetPolicy`` refuses every address that is
not globally routable unless a cloud admin allowed its network
(``--webhook-allow-network``). It is checked twice. When a webhook is
created (``invalid``, nothing appended): a host that is an address, in any
form the C library reads as one (``127.1``, ``2130706433``,
``[::ffff:127.0.0.1]``), or a ``localhost`` name; other names are not
looked up then, so the command path never waits on DNS. At every delivery:
on the addresses the name resolves to then, which are the only ones the
HTTP client may connect to, so a name that resolves inward, now or later,
is refused too.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
from collections.abc import Iterable
from urllib.parse import urlsplit

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

from stratus.events.errors import Invalid

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
# IPv6 forms that carry an IPv4 address a router may deliver to.
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


class TargetRefused(OSError):
    """The address is one webhooks may not reach."""

    def __init__(self, message: str) -> None:
        # (errno, strerror): the HTTP client reports strerror as the reason.
        super().__init__(errno.EACCES, message)


def parse_networks(values: Iterable[str]) -> tuple[Network, ...]:
    """``--webhook-allow-network`` values; a bad one raises ``Invalid``."""
    out = []
    for v in values:
        try:
            out.append(ipaddress.ip_network(v.strip(), strict=False))
        except ValueError as exc:
            raise Invalid(f"allowed webhook network {v!r}: {exc}") from None
    return tuple(out)


def _embedded_v4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def why_refused(ip: Address) -> str | None:
    """The kind of address webhooks never reach by default, or None."""
    if isinstance(ip, ipaddress.IPv6Address):
        inner = _embedded_v4(ip)
        if inner is not None:
            return why_refused(inner)
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link-local (where cloud metadata services answer)"
    if ip.is_multicast:
        return "multicast"
    if ip.is_unspecified:
        return "unspecified"
    if ip.is_private:
        return "private"
    if not ip.is_global:
        return "not globally routable (shared, reserved or documentation)"
    return None


class TargetPolicy:
    """The addresses webhooks may reach, and the resolver names go through."""

    def __init__(self, allow: Iterable[str] = (), resolver: AbstractResolver | None = None) -> None:
        self.allow = parse_networks(allow)
        self._resolver = resolver

    @property
    def resolver(self) -> AbstractResolver:
        """Made on first use: aiohttp's default binds to the running loop."""
        if self._resolver is None:
            self._resolver = DefaultResolver()
        return self._resolver

    def refusal(self, ip: Address) -> str | None:
        if any(ip.version == n.version and ip in n for n in self.allow):
            return None
        why = why_refused(ip)
        if why is None:
            return None
        return (
            f"{ip} is {why}; webhooks do not reach internal addresses unless a cloud "
            "admin allowed the network (--webhook-allow-network)"
        )

    def check_url(self, url: str) -> None:
        """At creation: the URL's host, if it is an address or ``localhost``."""
        host = urlsplit(url).hostname or ""
        for ip in _literal(host):
            reason = self.refusal(ip)
            if reason is not None:
                raise Invalid(f"webhook url {url!r}: {reason}")

    def host_refusal(self, host: str) -> str | None:
        """At delivery, for a URL whose host is an address: the HTTP client
        resolves nothing then, so the resolver below never sees it. (A
        name's answer is ``None`` here: the resolver judges it.)"""
        for ip in _literal(host):
            reason = self.refusal(ip)
            if reason is not None:
                return f"refused: {reason}"
        return None

    def connector_resolver(self) -> AbstractResolver:
        return GuardedResolver(self)


def _literal(host: str) -> list[Address]:
    """The addresses ``host`` names without a DNS lookup: an address in any
    form ``getaddrinfo`` reads as one, and the loopback names of RFC 6761."""
    # An IPv6 zone (``fe80::1%eth0``, ``%25`` in a URL) names an interface, not a host.
    name = host.strip("[]").rstrip(".").lower().split("%", 1)[0]
    if name == "localhost" or name.endswith(".localhost"):
        return [ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")]
    try:
        infos = socket.getaddrinfo(name, None, flags=socket.AI_NUMERICHOST)
    except (socket.gaierror, UnicodeError, ValueError):
        return []
    return [ipaddress.ip_address(i[4][0]) for i in infos]


class GuardedResolver(AbstractResolver):
    """The HTTP client's resolver: only allowed addresses come out of it."""

    def __init__(self, policy: TargetPolicy) -> None:
        self.policy = policy

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        infos = await self.policy.resolver.resolve(host, port, family)
        kept: list[ResolveResult] = []
        reasons: list[str] = []
        for info in infos:
            reason = self.policy.refusal(ipaddress.ip_address(info["host"]))
            if reason is None:
                kept.append(info)
            else:
                reasons.append(reason)
        if not kept:
            raise TargetRefused(f"refused: {host} resolves to {'; '.join(reasons) or 'nothing'}")
        return kept

    async def close(self) -> None:
        """The wrapped resolver belongs to the policy, which outlives sessions."""
