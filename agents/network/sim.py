"""Several hosts on one machine: each simulated host is a network namespace
with one leg into an underlay bridge (itself in a namespace of its own), so
VXLAN between hosts crosses a real L3 underlay and nothing touches the
machine's own namespace.

The underlay uses 198.18.0.0/15 (RFC 2544's benchmarking range): it exists
only inside these namespaces.
"""

from __future__ import annotations

import ipaddress

from pyroute2 import IPRoute, netns

from stratus.events import network as nw

UNDERLAY = ipaddress.ip_network("198.18.0.0/16")


class SimulatedHosts:
    """``n`` hosts named ``host-1`` ... under ``prefix``; ``vtep(host)`` is
    each one's underlay address and ``netns(host)`` its namespace."""

    def __init__(self, prefix: str, names: list[str]) -> None:
        if len(names) >= 250:
            raise ValueError("at most 249 simulated hosts")
        self.prefix = prefix
        self.names = list(names)
        self.underlay = nw.kernel_name(prefix, "underlay", "underlay")

    def netns(self, host: str) -> str:
        return nw.kernel_name(self.prefix, "host", host)

    def vtep(self, host: str) -> str:
        return str(UNDERLAY.network_address + 1 + self.names.index(host))

    def start(self) -> None:
        from stratus.agents.network.kernel import isolate_forked_helpers

        isolate_forked_helpers()
        have = set(netns.listnetns())
        if self.underlay not in have:
            netns.create(self.underlay)
        with IPRoute(netns=self.underlay) as u:
            if not u.link_lookup(ifname=self.underlay):
                u.link("add", ifname=self.underlay, kind="bridge")
            br = u.link_lookup(ifname=self.underlay)[0]
            u.link("set", index=br, state="up")
        for h in self.names:
            self._host(h, have)

    def _host(self, host: str, have: set[str]) -> None:
        ns = self.netns(host)
        leg = nw.kernel_name(self.prefix, "uplink", host)
        if ns not in have:
            netns.create(ns)
        with IPRoute(netns=ns) as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
            if ipr.link_lookup(ifname=leg):
                return
        with IPRoute(netns=self.underlay) as u:
            u.link("add", ifname=leg, kind="veth", peer={"ifname": "uplink", "net_ns_fd": ns})
            idx = u.link_lookup(ifname=leg)[0]
            br = u.link_lookup(ifname=self.underlay)[0]
            u.link("set", index=idx, master=br, state="up")
        with IPRoute(netns=ns) as ipr:
            idx = ipr.link_lookup(ifname="uplink")[0]
            ipr.link("set", index=idx, ifname=leg)
            ipr.addr("add", index=idx, address=self.vtep(host), prefixlen=UNDERLAY.prefixlen)
            ipr.link("set", index=idx, state="up")

    def stop(self) -> None:
        """Remove every namespace of the simulation (their links go with them)."""
        have = set(netns.listnetns())
        for h in self.names:
            if self.netns(h) in have:
                netns.remove(self.netns(h))
        if self.underlay in have:
            netns.remove(self.underlay)


def leftovers(prefix: str) -> list[str]:
    """Namespaces of ours still on the machine (a clean teardown leaves none)."""
    return sorted(n for n in netns.listnetns() if nw.owned(prefix, n))
