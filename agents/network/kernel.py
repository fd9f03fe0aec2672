"""The host side: probe what exists and make it match a ``HostPlan``.

Links, addresses, routes, neighbours and FDB entries through ``rtnl`` (a
raw rtnetlink socket: the host's kept for the agent's life, an instance's
for one pass), qdiscs through pyroute2, sysctls through ``/proc`` from a
thread inside the namespace, the security groups with ``iptables-restore``
(one process per pass, only the chains that changed), BIRD through its
control socket. No shell: argument lists only. Only objects carrying the
deployment's prefix are read or removed, so whatever else runs on the host
is left alone. Every function here blocks: the agent calls them in a worker
thread.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import ipaddress
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pyroute2 import IPRoute, netns

from stratus.agents.network import rtnl
from stratus.agents.network.bird import BgpPlan, Bird, BirdError, render
from stratus.agents.network.daemons import pid_of, terminate
from stratus.agents.network.desired import (
    BridgePlan,
    Chain,
    DhcpPlan,
    HostPlan,
    LegPlan,
    PortPlan,
    RouterPlan,
    render_chains,
    unordered,
)
from stratus.agents.network.ipset import IpSetError, IpSets
from stratus.agents.network.rtnl import Fdb, Link, Rtnl, RtnlError, netns_fd
from stratus.events import network as nw

# The links the agent owns on its host (a simulated host's uplink is not one).
MANAGED = ("bridge", "vxlan", "port", "leg", "ext", "xleg", "dleg")
# dnsmasq's configuration and pid file per namespace it serves (machine-wide,
# as the namespaces are; names carry the deployment's prefix).
DHCP_DIR = Path("/run/stratus-dhcp")


class KernelError(RuntimeError):
    """A netlink or firewall step failed; the message names the object."""


def run_in(
    ns: str | None,
    argv: Sequence[str],
    stdin: str | None = None,
    timeout: float = 30,
    cwd: Path | None = None,
):
    """Run ``argv`` (a list, no shell) inside network namespace ``ns``.

    Through util-linux's nsenter rather than a setns in a pre-exec hook: a
    hook makes Python fork the whole agent process for every command, where
    without one it spawns the child cheaply (vfork)."""
    if ns is not None:
        nw.check_netns_name(ns)
        argv = [_NSENTER or "nsenter", f"--net=/run/netns/{ns}", "--", *argv]
    return subprocess.run(
        list(argv),
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=cwd,
    )


_NSENTER = shutil.which("nsenter")


def _child_after_fork() -> None:
    # pyroute2 forks helpers to enter namespaces and ends them with SIGTERM.
    # A forked child keeps the parent's signal handlers and asyncio's wakeup
    # fd, so that SIGTERM would reach the parent's loop as its own and stop
    # ``stratus up``. The child (whose forking thread is now its main thread)
    # lets the signal act as the default (ending it) instead.
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
    except (ValueError, OSError):
        pass


_FORK_HOOK: list[bool] = []


def isolate_forked_helpers() -> None:
    """Install the fork hook above once per process."""
    if not _FORK_HOOK:
        os.register_at_fork(after_in_child=_child_after_fork)
        _FORK_HOOK.append(True)


_CLONE_NEWNET = 0x40000000
_LIBC = ctypes.CDLL(None, use_errno=True)


@contextlib.contextmanager
def in_netns(name: str) -> Iterator[None]:
    """Run the block with this thread (only) in network namespace ``name``."""
    nw.check_netns_name(name)
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(f"/run/netns/{name}", os.O_RDONLY)
        try:
            if _LIBC.setns(target, _CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise KernelError(f"cannot enter namespace {name}: {os.strerror(err)}")
            try:
                yield
            finally:
                if _LIBC.setns(own, _CLONE_NEWNET) != 0:
                    raise KernelError("cannot return to the agent's own namespace")
        finally:
            os.close(target)
    finally:
        os.close(own)


_SYSCTL = re.compile(r"^[a-z0-9_]+(\.[a-z0-9_-]+)+(?!\n)$")


def sysctl(ns: str | None, key: str, value: str | None = None) -> str:
    """Read (and with ``value``, first write) ``key`` in namespace ``ns``,
    through ``/proc/sys`` from this thread inside it: no process."""
    if not _SYSCTL.match(key):
        raise KernelError(f"not a sysctl key: {key!r}")
    path = "/proc/sys/" + key.replace(".", "/")
    with in_netns(ns) if ns else contextlib.nullcontext():
        if value is not None:
            with open(path, "w") as f:
                f.write(value)
        with open(path) as f:
            return f.read().strip()


def namespaces() -> set[str]:
    return set(netns.listnetns())


@dataclass
class Changes:
    created: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    # Ports wired the first time their instance appeared (a container's
    # namespace, a VM's tap): expected work, never drift.
    wired: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.created or self.removed or self.wired)

    @property
    def drifted(self) -> bool:
        return bool(self.created or self.removed)


def _info(link: Link) -> dict:
    return {
        "index": link.index,
        "kind": link.kind or None,
        "master": link.master,
        "vni": link.vni,
        "up": link.up,
        "suppress": link.suppress,
        "mac": link.mac,
    }


class _Clock:
    """Seconds each step of a pass took (what the benchmark reports)."""

    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self._t = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = now - self._t
        self._t = now


class Links:
    """The host's links as a pass sees them: every one of ours, dumped at
    once (a deep pass, which must find strays), or only those the pass asks
    about, looked up one by one (a shallow pass: a dump decodes every link
    on the host, which costs more than the pass's own work)."""

    def __init__(self, host: Host, taps: set[str], dump: bool) -> None:
        self.host, self.taps = host, taps
        self.complete = dump
        self.known: dict[str, dict | None] = dict(host.links(taps)) if dump else {}

    def get(self, name: str) -> dict | None:
        if name not in self.known:
            self.known[name] = None if self.complete else self.host.link(name)
        return self.known[name]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.get(name) is not None

    def prefetch(self, names: Iterable[str]) -> None:
        """Look up now, in one exchange, those of ``names`` the pass will ask
        about (one request each is a wait each, for the interpreter too)."""
        if self.complete:
            return
        todo = sorted({n for n in names if n not in self.known})
        if todo:
            self.known.update(self.host.links_named(todo))

    def __setitem__(self, name: str, info: dict) -> None:
        self.known[name] = info

    def pop(self, name: str, default: object = None) -> object:
        info = self.known.get(name)
        self.known[name] = None
        return info if info is not None else default

    def forget(self, names: list[str]) -> None:
        """Look these up again when asked (they were just made)."""
        for n in names:
            self.known.pop(n, None)
        if self.complete:
            self.complete = False

    def items(self) -> list[tuple[str, dict]]:
        return [(k, v) for k, v in self.known.items() if v is not None]


@dataclass
class _Entries:
    """A bridge's FDB and neighbour entries of ours: head-end replication
    VTEPs, remote MAC -> VTEP (VXLAN device), remote MACs behind the VXLAN
    port (bridge), remote address -> MAC (the bridge's ARP answers)."""

    flood: frozenset[str]
    unicast: dict[str, str]
    static: set[str]
    neigh: dict[str, str]

    @classmethod
    def planned(cls, b: BridgePlan) -> _Entries:
        return cls(
            b.remotes,
            {mac: vtep for _, mac, vtep in b.neighbours},
            {mac for _, mac, _ in b.neighbours},
            {ip: mac for ip, mac, _ in b.neighbours},
        )


class Host:
    """One host's kernel (the namespace ``host_ns``, or the current one).
    ``state_dir`` holds BIRD's files (routed networks need it)."""

    def __init__(
        self,
        prefix: str,
        vtep: str,
        host_ns: str | None = None,
        routers: bool = False,
        state_dir: Path | None = None,
    ) -> None:
        isolate_forked_helpers()
        self.prefix = prefix
        self.vtep = vtep
        self.host_ns = nw.check_netns_name(host_ns) if host_ns else None
        # Router namespaces are machine-wide names: only a host that runs
        # routers probes and removes them.
        self.routers = routers
        self.bird = Bird(Path(state_dir) / "bird") if state_dir is not None else None
        # What the last pass applied: a shallow pass (after new events)
        # trusts what it made itself and only touches what the plan changed;
        # a deep pass (start, periodic) probes everything again.
        self._done: dict[str, object] = {}
        self._chains: dict[Chain, tuple[str, ...]] | None = None
        self._ns: set[str] | None = None  # a deep pass lists the namespaces once
        self._wired: set[str] = set()  # ports this process saw wired
        # When each port's veth was made (monotonic), by port id: what the
        # benchmark splits its latency by (the last 10,000).
        self.wired_at: dict[str, float] = {}
        self.pass_of: dict[str, float] = {}  # and when the pass that made it began
        self._pass_began = 0.0
        self._mutex = threading.RLock()
        self._host_nl: Rtnl | None = None  # the host's socket, kept for the agent's life
        self._host_sets: IpSets | None = None  # and its netfilter one, for the ipsets
        self._sets: dict[str, frozenset[str]] | None = None  # the member sets last applied
        self._sockets: dict[str | None, Rtnl] | None = None
        self._pass_thread = 0
        self._fdb: Fdb | None = None
        self._neigh: dict[int, dict[str, str]] | None = None
        self._qdiscs: dict[int, tuple[str, int]] | None = None
        self._deep = True
        self._names: set[str] = set()  # the link names of the last plan
        self.last_pass: dict[str, float] = {}  # seconds per step of the last pass
        # Ports waiting for their instance (its namespace, a VM's tap): the
        # agent passes again for them on its next events, or soon.
        self.waiting: set[str] = set()
        self._applied: HostPlan | None = None  # the plan the last full pass applied
        self._unplugged: list[PortPlan] = []
        # New veths' host sides as made: their peers' indexes (IFLA_LINK) and
        # the ids here of their peers' namespaces (IFLA_LINK_NETNSID).
        self._veths: dict[str, rtnl.Link] = {}
        self._fresh: list[PortPlan] = []  # new veths, made together (``_make_veths``)
        self._entries: list[rtnl.Request] = []
        self._entries_for: set[str] = set()
        # What a pass sends at once, in one exchange (``_flush_now``): a
        # request and whether it may find nothing to remove; and the bridges
        # it is of (probed again if the pass fails before it is sent).
        self._now: list[tuple[rtnl.Request, bool]] = []
        self._now_for: set[str] = set()
        self._stale_sets: set[str] = set()
        # Member sets and bridges the agent folded while a pass ran
        # (``members_soon``, ``bridges_soon``).
        self._soon: dict[str, frozenset[str]] = {}
        self._bridges_soon: dict[str, BridgePlan] = {}
        self._soon_lock = threading.Lock()

    def _nl(self, ns: str | None = None) -> Rtnl:
        """A netlink socket in ``ns`` (default: the host's). The host's is
        kept open; others are kept for the pass (opening one costs more
        than most requests made on it)."""
        target = ns if ns is not None else self.host_ns
        if target == self.host_ns:
            if self._host_nl is None:
                self._host_nl = Rtnl.open(target)
            return self._host_nl
        if self._sockets is not None and threading.get_ident() == self._pass_thread:
            sock = self._sockets.get(target)
            if sock is None:
                sock = self._sockets[target] = Rtnl.open(target)
            return sock
        raise KernelError("a namespace's socket outside a pass")  # (a bug)

    @contextlib.contextmanager
    def _ipr(self, ns: str | None = None) -> Iterator[IPRoute]:
        """pyroute2 in ``ns`` (default: the host's), for qdiscs."""
        target = ns if ns is not None else self.host_ns
        if not target:
            ipr = IPRoute()
        else:
            # Opened by this thread inside the namespace (a netlink socket
            # stays where it was made), not by pyroute2's forked helper.
            with in_netns(target):
                ipr = IPRoute()
        try:
            yield ipr
        finally:
            ipr.close()

    @contextlib.contextmanager
    def _pass(self) -> Iterator[None]:
        """The scope of one reconcile pass: its sockets and its dumps."""
        self._sockets, self._pass_thread = {}, threading.get_ident()
        self._fdb = self._qdiscs = self._neigh = None
        try:
            yield
        finally:
            sockets, self._sockets, self._fdb, self._qdiscs = self._sockets, None, None, None
            self._neigh = None
            for sock in sockets.values():
                with contextlib.suppress(Exception):
                    sock.close()

    def _ipsets(self) -> IpSets:
        if self._host_sets is None:
            self._host_sets = IpSets.open(self.host_ns)
        return self._host_sets

    def close(self) -> None:
        """Close the host's sockets (the agent is done with this host)."""
        with self._mutex:
            for sock in (self._host_nl, self._host_sets):
                if sock is not None:
                    sock.close()
            self._host_nl = self._host_sets = None

    # -- probing --------------------------------------------------------------

    def wired(self) -> set[str]:
        """Ports this process has seen wired (made, or found in order)."""
        return set(self._wired)

    def links(self, taps: set[str] | frozenset[str] = frozenset()) -> dict[str, dict]:
        """Our links (and the VM ``taps`` we wire): name -> index, kind,
        master index, vni, up."""
        with self._mutex:
            out: dict[str, dict] = {}
            for link in self._nl().links():
                ours = any(nw.owned(self.prefix, link.name, role) for role in MANAGED)
                if ours or link.name in taps:
                    out[link.name] = _info(link)
            return out

    def links_named(self, names: list[str]) -> dict[str, dict | None]:
        """Links by name (one exchange, not a dump), None for an absent one."""
        found = self._nl().links_named(names)
        return {n: _info(ln) if ln is not None else None for n, ln in found.items()}

    def link(self, name: str) -> dict | None:
        """One link by name (a single request, not a dump), None if absent."""
        found = self._nl().link(name)
        return _info(found) if found is not None else None

    def fdb(self, index: int) -> set[str]:
        """The head-end replication entries (remote VTEPs) on VXLAN device
        ``index``. A pass dumps the host's table once, not once per device."""
        if self._fdb is None:
            self._fdb = self._nl().fdb_table()
        return set(self._fdb.flood.get(index, ()))

    def qdisc_rate(self, index: int) -> int:
        """The tbf rate on a link in kbit/s (0: none of ours). A pass dumps
        the host's qdiscs once."""
        if self._qdiscs is None:
            self._qdiscs = self._nl().root_qdiscs()
        kind, rate = self._qdiscs.get(index, ("", 0))
        return rate * 8 // 1000 if kind == "tbf" else 0

    def _has_ns(self, ns: str) -> bool:
        """Whether the instance's namespace is there, and made (one still
        being made is waited for, as one not there yet)."""
        if self._ns is not None and ns not in self._ns:
            return False
        return rtnl.netns_ready(ns)

    def peer_ok(self, pp: PortPlan) -> bool:
        """The instance side exists, up, with its address and routes: two
        dumps in the instance's namespace (three for a routed port). A link
        that is down has no routes through it, so they tell that too."""
        if not self._has_ns(pp.netns):
            return False
        nl = self._nl(pp.netns)
        ip, plen = pp.address.split("/")
        want = (pp.peer, ip, int(plen))
        found = [i for i, *rest in nl.labelled_addrs() if tuple(rest) == want]
        if not found:
            return False
        (idx,) = found
        routes = {(r.dst, r.gateway) for r in nl.routes() if r.oif == idx}
        if pp.routed:
            neigh = nl.neighbours(idx).get(nw.ROUTED_GATEWAY)
            if neigh is None or neigh[0] != nw.ROUTED_HOST_MAC:
                return False
            up = (f"{nw.ROUTED_GATEWAY}/32", "") in routes
        else:
            up = (str(ipaddress.ip_interface(pp.address).network), "") in routes
        return up and (not pp.gateway or ("0.0.0.0/0", pp.gateway) in routes)

    def _addressed(self, ns: str, ifname: str, address: str) -> bool:
        """Whether link ``ifname`` in ``ns`` exists and holds ``address`` (ip/prefixlen)."""
        nl = self._nl(ns)
        link = nl.link(ifname)
        if link is None:
            return False
        ip, plen = address.split("/")
        return (link.index, ip, int(plen)) in set(nl.addrs(link.index))

    # -- changing ------------------------------------------------------------------

    def reconcile(self, hp: HostPlan, deep: bool = True, soon_newer: bool = False) -> Changes:
        """Make the host match ``hp``; what had to change is returned.
        ``soon_newer``: what was handed in since the caller's ``plan_made``
        is newer than ``hp`` (else whatever was handed in before the pass
        is taken as older)."""
        # One pass at a time: a pass whose awaiting task was cancelled (the
        # agent stopping) runs on in its thread, and the next (a teardown)
        # must not interleave with it.
        with self._mutex, self._pass():
            try:
                return self._reconcile(hp, deep, soon_newer)
            except RtnlError as exc:
                raise KernelError(f"netlink: {exc}") from None
            finally:
                # Bridges whose new entries were worked out but not all made
                # (the pass failed first): probed again by the next pass.
                for name in self._entries_for | self._now_for:
                    self._done.pop(name, None)
                self._entries, self._entries_for = [], set()
                self._now, self._now_for = [], set()

    def _reconcile(self, hp: HostPlan, deep: bool, soon_newer: bool = False) -> Changes:
        ch = Changes()
        self._pass_began = time.monotonic()
        failed: KernelError | None = None
        clock = _Clock()
        if deep:
            self._done, self._chains, self._sets = {}, None, None
        self._ns = namespaces() if deep else None
        self._deep = deep
        self._unplugged: list[PortPlan] = []
        self._veths = {}
        self._fresh: list[PortPlan] = []
        self._entries: list[rtnl.Request] = []  # remote ports' entries (``_send_entries``)
        self._entries_for: set[str] = set()  # the bridges they are of
        last = self._applied
        self._applied = None  # (until this pass ends well)
        # Member sets first: they need no link, and a new member elsewhere
        # (an instance on another host, say, whose first packets this
        # host's rules must let in) is not kept waiting behind this host's
        # own new ports. Stale ones go after the rules (``_after_links``;
        # kept until then, should this pass fail before).
        if not soon_newer:
            self.plan_made()  # (the plan is as new as any handed in before it)
        if hp.ipsets != self._sets:
            self._stale_sets |= self._sync_sets(hp.ipsets, ch)
        clock.lap("ipsets")
        links_same = (
            not deep
            and last is not None
            and hp.ports is last.ports
            and hp.bridges is last.bridges
            and hp.externals is last.externals
        )
        if links_same:
            # Nothing of the links changed (a new member somewhere, say):
            # only the ports still waiting for their instance are looked at.
            actual = Links(self, set(), dump=False)
            actual.prefetch(n for n in self.waiting if n in hp.ports)
            for name in sorted(self.waiting):
                pp = hp.ports.get(name)
                if pp is not None:
                    self._port(pp, actual, ch, None)
            self._make_veths(actual, ch)
            clock.lap("ports")
            self._soon_now(ch)
            self._after_links(hp, deep, ch, clock, last, actual, failed)
            return ch
        actual = Links(self, hp.taps(), dump=deep)
        wanted = hp.names()
        if not deep:
            # What the last plan had and this one has not: the stray links a
            # shallow pass can know of without probing the whole host; the
            # ports the pass looks at (not done as planned), and the bridges
            # it does not trust (new here, say).
            actual.prefetch(
                [
                    *(self._names - wanted),
                    *(n for n, pp in hp.ports.items() if self._done.get(n) != pp),
                    *(
                        n
                        for b in hp.bridges.values()
                        if not isinstance(self._done.get(b.bridge), BridgePlan)
                        for n in (b.bridge, b.vxlan)
                    ),
                ]
            )
            for name in sorted(self._names - wanted):
                actual.get(name)
        self._names = wanted
        clock.lap("links")
        vxlans = {b.vxlan: b for b in hp.bridges.values()}
        for name, link in sorted(actual.items()):
            stale = name not in wanted
            if not stale and name in hp.bridges and link["kind"] != "bridge":
                stale = True
            vx = vxlans.get(name)
            if vx is not None and (link["kind"] != "vxlan" or link["vni"] != vx.vni):
                stale = True
            pp = hp.ports.get(name)
            if pp is not None and pp.routed and link["master"]:
                stale = True  # a routed port is on no bridge
            if stale and link["kind"] in ("bridge", "vxlan", "veth"):
                self._delete(name)
                ch.removed.append(name)
                actual.pop(name)
                # (made again later, it is made from scratch: new index, no entries)
                self._done.pop(name, None)
                self._done.pop(f"index {name}", None)
        before = len(ch.created)
        # Bridges here already whose remotes changed first, their flood
        # entries at once: a host new to a network is reached only once it
        # is in the flood list of the network's other hosts (an ARP request
        # for its new port goes nowhere else). Then the ones to make.
        rest = [
            b
            for b in sorted(hp.bridges.values(), key=lambda b: b.bridge)
            if not self._remotes(b, ch)
        ]
        self._flush_now()
        fresh: list[BridgePlan] = []
        for b in rest:
            self._bridge(b, actual, ch, fresh)
        self._make_bridges(fresh, ch)
        self._flush_now()
        for name in sorted(n for n in hp.externals if n not in actual):
            nl = self._nl()
            nl.add_bridge(name)
            nl.set(nl.index(name), up=True)
            ch.created.append(name)
        actual.forget(ch.created[before:])  # new bridges: their indexes
        clock.lap("bridges")
        if hp.bgp is not None and (deep or "forwarding" not in self._done):
            # A routed network's host routes between its veths and the underlay.
            if sysctl(self.host_ns, "net.ipv4.ip_forward") != "1":
                sysctl(self.host_ns, "net.ipv4.ip_forward", "1")
                ch.created.append("ip_forward")
            self._done["forwarding"] = True
        routes = self._routes() if deep and any(p.routed for p in hp.ports.values()) else None
        self.waiting = set()
        for pp in sorted(hp.ports.values(), key=lambda p: p.ifname):
            self._port(pp, actual, ch, routes)
        self._make_veths(actual, ch)
        clock.lap("ports")
        self._soon_now(ch)
        self._after_links(hp, deep, ch, clock, last, actual, failed)
        return ch

    def _after_links(
        self,
        hp: HostPlan,
        deep: bool,
        ch: Changes,
        clock: _Clock,
        last: HostPlan | None,
        actual: Links,
        failed: KernelError | None,
    ) -> None:
        """Routers and DHCP, member sets, rules, plugging new ports in, BIRD."""
        routers_same = (
            not deep and last is not None and (hp.routers is last.routers and hp.dhcp is last.dhcp)
        )
        if self.routers and not routers_same:
            # dnsmasq first: one may run inside a router namespace going away.
            self._stale_dhcp(hp, ch)
            have = {n for n in namespaces() if nw.owned(self.prefix, n, "router")}
            for ns in sorted(have - set(hp.routers)):
                netns.remove(ns)
                ch.removed.append(ns)
            for rp in sorted(hp.routers.values(), key=lambda r: r.netns):
                self._router(rp, actual, ch)
            for dp in sorted(hp.dhcp.values(), key=lambda d: d.netns):
                try:
                    self._dhcp(dp, actual, ch)
                except (KernelError, OSError) as exc:
                    # DHCP is one service among many: the security groups
                    # below still get their update; the pass fails after.
                    failed = failed or KernelError(f"DHCP in {dp.netns}: {exc}")
        clock.lap("routers")
        # (member sets were made first: the rules below may match them)
        stale, self._stale_sets = self._stale_sets - set(hp.ipsets), set()
        if hp.chains and hp.chains != self._chains:
            if self._firewall(hp.chains, deep):
                ch.created.append("firewall")
            self._chains = dict(hp.chains)
        clock.lap("firewall")
        self._soon_now(ch)
        self._plug_all(self._unplugged, actual, ch)
        clock.lap("plug")
        self._soon_now(ch)
        self._send_entries()
        clock.lap("entries")
        for name in sorted(stale):
            try:
                self._ipsets().destroy(name)
                ch.removed.append(f"ipset {name}")
            except IpSetError:
                pass  # still matched by a rule (a teardown wipes those first)
        try:
            self._bgp(hp.bgp, ch)
        except (BirdError, OSError) as exc:
            failed = failed or KernelError(f"BIRD: {exc}")
        clock.lap("bgp")
        self.last_pass = clock.laps
        if failed is not None:
            raise failed
        self._applied = hp

    def _delete(self, name: str) -> None:
        nl = self._nl()
        link = nl.link(name)
        if link is not None:
            with contextlib.suppress(RtnlError):  # (gone with its peer meanwhile)
                nl.delete(link.index)

    def _remotes(self, b: BridgePlan, ch: Changes) -> bool:
        """A bridge a shallow pass need not look at (done as planned), or
        whose remotes only changed (its flood and stale entries queued,
        ``_flush_now``): the FDB and neighbour entries it made itself last
        time, and the devices, are trusted. False: ``_bridge`` it."""
        if self._deep:
            return False
        done = self._done.get(b.bridge)
        if done is b or done == b:
            return True
        trusted = self._trusted(b)
        if trusted is None:
            return False
        done, vx, br = trusted
        self._fdb_now(b, vx, br, _Entries.planned(done), ch)
        self._done[b.bridge] = b
        return True

    def _trusted(self, b: BridgePlan) -> tuple[BridgePlan, int, int] | None:
        """The plan this host last applied to ``b``'s bridge and its
        devices' indexes, when a pass may trust them (same VNI): only the
        remotes' entries can differ. None: look at the host."""
        done = self._done.get(b.bridge)
        vx = self._done.get(f"index {b.vxlan}")
        br = self._done.get(f"index {b.bridge}")
        if isinstance(done, BridgePlan) and done.vni == b.vni and vx and br:
            return done, int(vx), int(br)  # type: ignore[call-overload]
        return None

    def _bridge(self, b: BridgePlan, actual: Links, ch: Changes, fresh: list[BridgePlan]) -> None:
        """Bridge ``b`` made or repaired (one new here, with neither device,
        is left in ``fresh``: ``_make_bridges`` makes them all at once)."""
        done = self._done.get(b.bridge)
        same = done is b or done == b
        if same and (not self._deep or (b.bridge in actual and b.vxlan in actual)):
            return
        if actual.get(b.bridge) is None and actual.get(b.vxlan) is None:
            fresh.append(b)
            return
        trusted = done if isinstance(done, BridgePlan) and b.vxlan in actual else None
        self._bridge_now(b, actual, ch, trusted)
        self._done[b.bridge] = b

    def _make_bridges(self, fresh: list[BridgePlan], ch: Changes) -> None:
        """New bridges, each with its VXLAN device and flood entries, in two
        exchanges for all of them: a wave of bindings brings a host several
        networks at once, and each request alone is a wait (for the
        interpreter too, in a process of many agents)."""
        if not fresh:
            return
        nl = self._nl()
        made = nl.create(
            [
                r
                for b in fresh
                for r in (
                    rtnl.bridge_add(b.bridge, b.mac, up=True),
                    rtnl.vxlan_add(b.vxlan, b.vni, self.vtep, nw.VXLAN_PORT),
                )
            ],
            [n for b in fresh for n in (b.bridge, b.vxlan)],
        )
        for b in fresh:
            br, vx = made[b.bridge].index, made[b.vxlan].index
            ch.created += [b.bridge, b.vxlan]
            # (ARP for the network's remote ports answered by the bridge from
            # its neighbour entries, never flooded to the others)
            self._now += [(rtnl.link_set(vx, master=br, up=True), False)]
            self._now += [(rtnl.neigh_suppress(vx), False)]
            self._now_for.add(b.bridge)
            self._done[f"index {b.vxlan}"] = vx
            self._done[f"index {b.bridge}"] = br
            # (both made just now: they hold none of ours yet)
            self._fdb_now(b, vx, br, _Entries(frozenset(), {}, set(), {}), ch)
            self._done[b.bridge] = b

    def _flush_now(self) -> None:
        """Send what the pass queued to be done at once (flood entries, stale
        entries, new bridges' settings), in one exchange. A stale entry
        already gone is what was wanted; any other refusal fails the pass."""
        now, self._now = self._now, []
        if now:
            errors = self._nl().do_many([r for r, _ in now])
            for (_, gone_ok), err in zip(now, errors, strict=True):
                if err is not None and not gone_ok:
                    raise err
        self._now_for = set()

    def _bridge_now(
        self,
        b: BridgePlan,
        actual: Links,
        ch: Changes,
        trusted: BridgePlan | None = None,
    ) -> None:
        nl = self._nl()
        brl, vxl = actual.get(b.bridge), actual.get(b.vxlan)
        if brl is None:
            nl.add_bridge(b.bridge, b.mac)
            ch.created.append(b.bridge)
        br = brl["index"] if brl is not None else nl.index(b.bridge)
        if brl is not None and b.mac and brl["mac"] != b.mac:
            nl.set(br, mac=b.mac)  # (flushes its neighbour entries: all made again below)
            ch.created.append(f"mac {b.bridge}")
            trusted = None
        if brl is None or not brl["up"]:
            nl.set(br, up=True)
        if vxl is None:
            nl.add_vxlan(b.vxlan, b.vni, self.vtep, nw.VXLAN_PORT)
            ch.created.append(b.vxlan)
        vx = vxl["index"] if vxl is not None else nl.index(b.vxlan)
        if vxl is None or vxl["master"] != br or not vxl["up"]:
            nl.set(vx, master=br, up=True)
        if vxl is None or not vxl["suppress"]:
            # ARP for the network's remote ports is answered by the bridge
            # from its neighbour entries (below), never flooded to the others.
            nl.neigh_suppress(vx)
            if vxl is not None:
                ch.created.append(f"neigh_suppress {b.vxlan}")
        self._done[f"index {b.vxlan}"] = vx
        self._done[f"index {b.bridge}"] = br
        if trusted is not None:
            have = _Entries.planned(trusted)
        elif brl is None and vxl is None:
            # Both made just now: they hold none of ours yet. (Probing would
            # dump the host's whole FDB, every other network's entries too,
            # for each network a wave brings to this host.)
            have = _Entries(frozenset(), {}, set(), {})
        else:
            have = self._probe_entries(vx, br)
        self._fdb_now(b, vx, br, have, ch)

    def _permanent_neighbours(self) -> dict[int, dict[str, str]]:
        """The host's permanent neighbour entries (one dump per pass)."""
        if self._neigh is None:
            self._neigh = self._nl().permanent_neighbours()
        return self._neigh

    def _probe_entries(self, vx: int, br: int) -> _Entries:
        """What the host has of a bridge's entries (from the pass's dumps)."""
        if self._fdb is None:
            self._fdb = self._nl().fdb_table()
        return _Entries(
            frozenset(self._fdb.flood.get(vx, ())),
            dict(self._fdb.unicast.get(vx, {})),
            set(self._fdb.static.get(vx, ())),
            dict(self._permanent_neighbours().get(br, {})),
        )

    def _fdb_now(
        self, b: BridgePlan, vx: int, br: int, have: _Entries, ch: Changes, later: bool = True
    ) -> None:
        """Head-end replication to the network's other hosts, and per remote
        port: its MAC behind the VXLAN port (bridge) and its VTEP (VXLAN
        device), its address answered by the bridge (ARP suppression). New
        entries are sent with the pass's others (``_send_entries``), or at
        once if not ``later``."""
        now: list[tuple[rtnl.Request, bool]] = []  # (a request, whether it may find nothing)
        for dst in sorted(b.remotes - have.flood):
            now.append((rtnl.fdb_flood(vx, dst), False))
            ch.created.append(f"fdb {b.vxlan} {dst}")
        for dst in sorted(have.flood - b.remotes):
            now.append((rtnl.fdb_flood(vx, dst, delete=True), True))
            ch.removed.append(f"fdb {b.vxlan} {dst}")
        want = _Entries.planned(b)
        # Stale ones now (a MAC or address may come back under another
        # port, even this host's); the new ones are sent once the pass's
        # own new ports are plugged in (``_send_entries``): the VXLAN device
        # learns where a MAC lives before the bridge sends to it, and the
        # bridge the MAC before it answers for the address.
        made: list[rtnl.Request] = []
        for ip in sorted(set(have.neigh) - set(want.neigh)):
            now.append((rtnl.neighbour_delete(br, ip), True))
            ch.removed.append(f"neigh {b.bridge} {ip}")
        for mac in sorted(have.static - want.static):
            now.append((rtnl.fdb_static_delete(vx, mac), True))
            ch.removed.append(f"fdb {b.bridge} {mac}")
        for mac in sorted(set(have.unicast) - set(want.unicast)):
            now.append((rtnl.fdb_unicast_delete(vx, mac), True))
            ch.removed.append(f"fdb {b.vxlan} {mac}")
        for mac, dst in sorted(want.unicast.items()):
            if have.unicast.get(mac) != dst:
                made.append(rtnl.fdb_unicast(vx, mac, dst))
                ch.created.append(f"fdb {b.vxlan} {mac} {dst}")
        for mac in sorted(want.static - have.static):
            made.append(rtnl.fdb_static(vx, mac))
            ch.created.append(f"fdb {b.bridge} {mac}")
        for ip, mac in sorted(want.neigh.items()):
            if have.neigh.get(ip) != mac:
                made.append(rtnl.neighbour_add(br, ip, mac))
                ch.created.append(f"neigh {b.bridge} {ip}")
        if not later:
            # (all at once, in the order worked out: stale ones first)
            self._now += now + [(m, False) for m in made]
            self._flush_now()
            return
        if now:
            self._now += now
            self._now_for.add(b.bridge)
        if made:
            self._entries += made
            self._entries_for.add(b.bridge)

    def _send_entries(self) -> None:
        """The remote ports' entries the pass worked out, in one batch, after
        its own new ports are wired. They spare the network's flooding (each
        remote port's MAC sent to its VTEP, its address answered by the
        bridge), but traffic needs none of them: unknown MACs and
        unanswered ARP requests go to every VTEP of the network (the flood
        entries, made at once). A wave of bindings brings each host many
        remote ports and a few of its own: the own ones are not kept
        waiting behind the others' entries."""
        if self._entries:
            # (one not made fails the pass)
            failed = [e for e in self._nl().do_many(self._entries) if e is not None]
            if failed:
                raise failed[0]
        self._entries, self._entries_for = [], set()

    def _routes(self) -> set[tuple[str, int]]:
        """The host's routes straight out of a link: (destination, link index)."""
        return {(r.dst, r.oif) for r in self._nl().routes() if not r.gateway}

    def _port(
        self, pp: PortPlan, actual: Links, ch: Changes, routes: set[tuple[str, int]] | None
    ) -> None:
        done = self._done.get(pp.ifname)
        # (the planner keeps an unchanged port's plan as the same object)
        if (done is pp or done == pp) and (not self._deep or pp.ifname in actual):
            if not pp.routed or routes is None:
                return
        if self._port_now(pp, actual, ch, routes):  # wired, not waiting for its instance
            if pp not in self._unplugged:
                self._done[pp.ifname] = pp  # (a new one once it is plugged in)

    def _port_now(
        self, pp: PortPlan, actual: Links, ch: Changes, routes: set[tuple[str, int]] | None
    ) -> bool:
        nl = self._nl()
        if pp.vm:
            if pp.ifname not in actual:
                if not self._adopt_tap(pp.ifname):
                    self.waiting.add(pp.ifname)
                    return False  # the guest is not running (yet)
                ch.wired.append(pp.ifname)
                actual.forget([pp.ifname])
        elif not self._has_ns(pp.netns):
            # The instance is not there (yet): wired once the compute agent made it.
            if pp.ifname in actual:
                self._delete(pp.ifname)
                ch.removed.append(pp.ifname)
                actual.pop(pp.ifname)
            self.waiting.add(pp.ifname)
            return False
        elif pp.ifname in actual and not self.peer_ok(pp):
            self._delete(pp.ifname)
            ch.removed.append(pp.ifname)
            actual.pop(pp.ifname)
        self.waiting.discard(pp.ifname)
        if pp.ifname not in actual:
            (ch.created if pp.ifname in self._wired else ch.wired).append(pp.ifname)
            self._wired.add(pp.ifname)
            # Made with the pass's other new veths (``_make_veths``), and
            # plugged in once its rules are loaded (``_plug_all``).
            self._fresh.append(pp)
            self._unplugged.append(pp)
            return True
        self._wired.add(pp.ifname)
        link = actual.get(pp.ifname)
        if link is None:
            raise KernelError(f"{pp.ifname} vanished while it was wired")
        idx = link["index"]
        if pp.routed:
            if not link["up"]:
                nl.set(idx, up=True)
            if routes is None or (pp.address, idx) not in routes:
                nl.replace_route(pp.address, oif=idx)
                if routes is not None:
                    ch.created.append(f"route {pp.address}")
            ip = pp.address.split("/")[0]
            if routes is None or self._permanent_neighbours().get(idx, {}).get(ip) != pp.mac:
                nl.permanent_neighbour(idx, ip, pp.mac)
                if routes is not None:
                    ch.created.append(f"neigh {pp.address}")
        else:
            br_index = self._bridge_index(pp.bridge, actual)
            if link["master"] != br_index or not link["up"]:
                nl.set(idx, master=br_index, up=True)
        self._qdisc(pp, idx, self.qdisc_rate(idx), ch)
        return True

    def _qdisc(self, pp: PortPlan, idx: int, rate: int, ch: Changes) -> None:
        """The port's rate limit, when link ``idx`` has another (``rate``)."""
        if rate == pp.kbps:
            return
        with self._ipr() as ipr:
            if rate:
                ipr.tc("del", "tbf", index=idx, handle="1:")
            if pp.kbps:
                # A burst of at least one 10 ms slice (and an MTU), as tc advises.
                burst = max(pp.kbps * 1000 // 8 // 100, 16 * 1024)
                ipr.tc(
                    "add",
                    "tbf",
                    index=idx,
                    handle="1:",
                    rate=f"{pp.kbps}kbit",
                    burst=burst,
                    latency="50ms",
                )
        if self._qdiscs is not None:
            self._qdiscs[idx] = ("tbf", pp.kbps * 1000 // 8) if pp.kbps else ("", 0)
        ch.created.append(f"qos {pp.ifname} {pp.kbps}kbit")

    def _adopt_tap(self, name: str) -> bool:
        """Whether the VM tap ``name`` is (now) on this host. libvirtd makes
        it in its own namespace; a simulated host's is moved in here."""
        if self.host_ns:
            with Rtnl() as own:  # (this thread's namespace: the agent's, libvirt's)
                tap = own.link(name)
                if tap is not None:
                    # (qemu keeps its file descriptor: the device only moves)
                    with netns_fd(self.host_ns) as fd:
                        own.set(tap.index, netns_fd=fd)
        return self._nl().link(name) is not None

    def _bridge_index(self, bridge: str, actual: Links) -> int:
        br = actual.get(bridge)
        return br["index"] if br is not None else self._nl().index(bridge)

    def _make_veths(self, actual: Links, ch: Changes) -> None:
        """The pass's new veths: each made with its instance's side inside
        the instance's namespace (with the port's MAC) and already up, the
        host's side down, none addressed (``_plug_all`` finishes them).
        All made and looked up in one exchange: under a busy interpreter
        each round trip is a wait (traced: ~10 ms a port in the full
        bench), not the kernel's work (~1 ms for a port's whole sequence)."""
        fresh, self._fresh = self._fresh, []
        for i in range(0, len(fresh), 64):  # (a namespace descriptor open per veth until sent)
            part = fresh[i : i + 64]
            with contextlib.ExitStack() as stack:
                requests = [
                    rtnl.veth_inside(
                        pp.ifname,
                        pp.peer,
                        stack.enter_context(netns_fd(pp.netns)),
                        outer_mac=nw.ROUTED_HOST_MAC if pp.routed else "",
                        inner_mac=pp.mac,
                    )
                    for pp in part
                ]
                made = self._nl().create(requests, [pp.ifname for pp in part])
            for pp in part:
                idx = made[pp.ifname].index
                self._veths[pp.ifname] = made[pp.ifname]
                actual[pp.ifname] = {
                    "index": idx,
                    "kind": "veth",
                    "master": 0,
                    "vni": 0,
                    "up": False,
                    "suppress": False,
                    "mac": "",
                }
                # A veth made just now has no qdisc: only a rate asks for one.
                self._qdisc(pp, idx, 0, ch)

    def _plug_all(self, pps: list[PortPlan], actual: Links, ch: Changes) -> None:
        """Plug new veths in, once their rules are loaded (their instance's
        sides are up since they were made): the host's sides up, bridged or
        routed to, in one exchange; then, once both sides are operationally
        up, each instance's side addressed and routed, in one exchange per
        instance. Before that the instance cannot send, and its first
        packets are not lost.

        Why wait: a veth's carrier comes on from the kernel's link watch
        (asynchronous, under the RTNL lock, batched), and until that has
        run for a side its queue drops what is sent through it: the
        instance's first ARP request (traced: dropped by its qdisc 0.3 ms
        after its host's side was seen up), or the replies to it; the
        instance retries only a second later. The host's side comes up in
        the exchange below (its queue is made there); the instance's side,
        up since it was made, waits for the link watch."""
        if not pps:
            return
        # In batches (a request each is a round trip, and in a process
        # holding many agents a wait for the interpreter after each).
        _do_all(self._nl(), [r for pp in pps for r in self._plug_links(pp, actual)])
        lookups = [rtnl.link_get(pp.ifname) for pp in pps]
        # (the instance's side looked up from here, through the id this
        # namespace has for the instance's: one exchange for all of them)
        lookups += [
            rtnl.link_get(pp.peer, self._veths[pp.ifname].netnsid)
            for pp in pps
            if pp.ifname in self._veths and self._veths[pp.ifname].netnsid >= 0
        ]
        self._await_oper_up(lookups, ch)
        for pp in pps:
            self._plug_addresses(pp)

    def _await_oper_up(
        self, lookups: list[rtnl.Request], ch: Changes, timeout: float = 2.0
    ) -> None:
        """Until each link of ``lookups`` (``rtnl.link_get``) is
        operationally up (bounded: after ``timeout`` the pass goes on; the
        instance's ARP retries then cover the rest). Meanwhile what the
        agent handed in since the pass began is applied (``_soon_now``)."""
        nl = self._nl()
        deadline = time.monotonic() + timeout
        pending = list(lookups)
        while pending:
            found = nl.lookup(pending)  # (one exchange for all)
            pending = [r for r, ln in zip(pending, found, strict=True) if ln and not ln.oper_up]
            if not pending or time.monotonic() > deadline:
                return
            self._soon_now(ch)
            time.sleep(0.002)

    def _plug_links(self, pp: PortPlan, actual: Links) -> list[rtnl.Request]:
        """The host's side of a new veth up: bridged, or routed to."""
        idx = actual.known[pp.ifname]["index"]  # type: ignore[index]
        if not pp.routed:
            return [rtnl.link_set(idx, master=self._bridge_index(pp.bridge, actual), up=True)]
        # The host knows the instance's MAC (it set it): no ARP for it, and
        # no dynamic entry (the kernel's table of those is bounded,
        # gc_thresh3, and a full one drops packets to new neighbours).
        return [
            rtnl.link_set(idx, up=True),
            rtnl.route_replace(pp.address, oif=idx),
            rtnl.neighbour_add(idx, pp.address.split("/")[0], pp.mac),
        ]

    def _plug_addresses(self, pp: PortPlan) -> None:
        inner = self._nl(pp.netns)
        made = self._veths.pop(pp.ifname, None)
        pidx = (made.peer if made is not None else 0) or inner.index(pp.peer)
        # (the instance's side was made up; its loopback comes up here, in
        # the same exchange as its address and routes)
        requests = [rtnl.link_set(rtnl.LOOPBACK_INDEX, up=True)]
        if pp.routed:
            # The host's side answers for the link-local next hop (Calico's
            # 169.254.1.1): a permanent neighbour entry, so no ARP proxy.
            requests += [
                rtnl.neighbour_add(pidx, nw.ROUTED_GATEWAY, nw.ROUTED_HOST_MAC),
                rtnl.route_replace(f"{nw.ROUTED_GATEWAY}/32", oif=pidx),
            ]
        ip, plen = pp.address.split("/")
        addr = len(requests)  # (its address there already is what was wanted)
        requests.append(rtnl.addr_add(pidx, ip, int(plen)))
        if pp.gateway:
            requests.append(
                rtnl.route_replace("0.0.0.0/0", gateway=pp.gateway, oif=pidx, onlink=pp.routed)
            )
        _do_all(inner, requests, exists_ok=addr)
        self._done[pp.ifname] = pp
        self.wired_at[pp.port] = time.monotonic()
        self.pass_of[pp.port] = self._pass_began
        if len(self.wired_at) > 20_000:
            for k in list(self.wired_at)[:10_000]:
                del self.wired_at[k]
                self.pass_of.pop(k, None)

    # -- routers ---------------------------------------------------------------------

    def _router(self, rp: RouterPlan, actual: Links, ch: Changes) -> None:
        key = f"router {rp.netns}"
        if not self._deep and self._done.get(key) == rp:
            return  # (its sysctl and NAT table are probed by deep passes)
        self._router_now(rp, actual, ch)
        self._done[key] = rp

    def _router_now(self, rp: RouterPlan, actual: Links, ch: Changes) -> None:
        legs = [*rp.legs, *([rp.external] if rp.external else [])]
        self._namespace(rp.netns, legs, actual, ch)
        if sysctl(rp.netns, "net.ipv4.ip_forward") != "1":
            sysctl(rp.netns, "net.ipv4.ip_forward", "1")
            ch.created.append(f"{rp.netns} ip_forward")
        if rp.external is not None:
            self._external_addresses(rp, ch)
        have = run_in(rp.netns, ["iptables-save", "-t", "nat"]).stdout.splitlines()
        if sorted(ln for ln in have if ln.startswith("-A ")) != sorted(rp.nat):
            chains = [
                f":{c} ACCEPT [0:0]" for c in ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING")
            ]
            text = "\n".join(["*nat", *chains, *rp.nat, "COMMIT", ""])
            res = run_in(rp.netns, ["iptables-restore"], stdin=text)
            if res.returncode != 0:
                raise KernelError(f"iptables-restore in {rp.netns}: {res.stderr.strip()}")
            ch.created.append(f"{rp.netns} nat")

    # -- DHCP ------------------------------------------------------------------------

    def _dhcp(self, dp: DhcpPlan, actual: Links, ch: Changes) -> None:
        if self._done.get(f"dhcp {dp.netns}") != dp:
            if dp.legs:  # (else a router's namespace, made above)
                self._namespace(dp.netns, dp.legs, actual, ch)
            self._done[f"dhcp {dp.netns}"] = dp
        conf = DHCP_DIR / f"{dp.netns}.conf"
        pid = dnsmasq_pid(dp.netns)
        with contextlib.suppress(FileNotFoundError):
            if pid and conf.read_text() == dp.config:
                return
        if pid:
            stop_dnsmasq(dp.netns)
        if shutil.which("dnsmasq") is None:
            raise KernelError("dnsmasq is not installed (Debian: dnsmasq-base): no DHCP")
        DHCP_DIR.mkdir(mode=0o755, exist_ok=True)
        tmp = conf.with_suffix(".tmp")
        tmp.write_text(dp.config)
        tmp.replace(conf)
        pidfile = DHCP_DIR / f"{dp.netns}.pid"
        # dnsmasq forks itself off; its first process reports a bad start.
        res = run_in(dp.netns, ["dnsmasq", f"--conf-file={conf}", f"--pid-file={pidfile}"])
        if res.returncode != 0:
            stop_dnsmasq(dp.netns)  # (drops the files: the next pass tries again)
            raise KernelError(f"dnsmasq in {dp.netns}: {res.stderr.strip()}")
        ch.created.append(f"{dp.netns} dhcp")

    def _stale_dhcp(self, hp: HostPlan, ch: Changes) -> None:
        running = {f.stem for f in DHCP_DIR.iterdir()} if DHCP_DIR.is_dir() else set()
        for ns in sorted(running - set(hp.dhcp)):
            if nw.owned(self.prefix, ns):
                stop_dnsmasq(ns)
                ch.removed.append(f"{ns} dhcp")
        have = {n for n in namespaces() if nw.owned(self.prefix, n, "dhcp")}
        for ns in sorted(have - set(hp.dhcp)):
            netns.remove(ns)
            ch.removed.append(ns)

    def _namespace(self, ns: str, legs: Sequence[LegPlan], actual: Links, ch: Changes) -> None:
        """Namespace ``ns`` with its veth ``legs`` into the host's bridges."""
        if ns not in namespaces():
            netns.create(ns)
            ch.created.append(ns)
        for leg in legs:
            if leg.ifname in actual and not self._addressed(ns, leg.inner, leg.address):
                self._delete(leg.ifname)
                actual.pop(leg.ifname)
                ch.removed.append(leg.ifname)
            if leg.ifname not in actual:
                self._leg(ns, leg)
                ch.created.append(leg.ifname)

    def _leg(self, ns: str, leg: LegPlan) -> None:
        nl = self._nl()
        with netns_fd(ns) as fd:
            nl.add_veth(leg.ifname, leg.inner, fd, peer_mac=leg.mac)
        nl.set(nl.index(leg.ifname), master=nl.index(leg.bridge), up=True)
        inner = self._nl(ns)
        lo = inner.link("lo")
        if lo is not None and not lo.up:
            inner.set(lo.index, up=True)
        idx = inner.index(leg.inner)
        ip, plen = leg.address.split("/")
        inner.add_addr(idx, ip, int(plen))
        inner.set(idx, up=True)

    def _external_addresses(self, rp: RouterPlan, ch: Changes) -> None:
        """Floating IPs as /32s on the external leg (the router answers ARP
        for them), and the default route out through the external gateway."""
        assert rp.external is not None
        nl = self._nl(rp.netns)
        idx = nl.index(rp.external.inner)
        have = {a for i, a, plen in nl.addrs(idx) if plen == 32}
        for a in sorted(set(rp.extra) - have):
            nl.add_addr(idx, a, 32)
            ch.created.append(f"{rp.netns} {a}")
        for a in sorted(have - set(rp.extra)):
            nl.del_addr(idx, a, 32)
            ch.removed.append(f"{rp.netns} {a}")
        if rp.gateway:
            if not any(r.dst == "0.0.0.0/0" and r.gateway == rp.gateway for r in nl.routes()):
                nl.replace_route("0.0.0.0/0", gateway=rp.gateway, oif=idx)
                ch.created.append(f"{rp.netns} default via {rp.gateway}")

    # -- member sets -------------------------------------------------------------------

    def members_soon(self, sets: dict[str, frozenset[str]]) -> None:
        """Member sets as the log has them now, for a pass already running
        to apply between its steps (from any thread). A new member's
        address (an instance on another host, which this host's ingress
        rules must let in) then waits for the step under way, not for the
        rest of the pass and the next one's plan."""
        with self._soon_lock:
            self._soon.update(sets)

    def bridges_soon(self, plans: dict[str, BridgePlan]) -> None:
        """Bridges as the log has them now (``Planner.bridges``: those a host
        joined or left), for a pass already running to apply between its
        steps (from any thread). A host new to the network then waits for
        the step under way, not for the rest of the pass: its new port's
        first packets come as soon as its own host wired it, and this
        host's instances answer them (their ARP request for it goes out to
        its host only once that host is in the flood list)."""
        with self._soon_lock:
            self._bridges_soon.update(plans)

    def plan_made(self) -> None:
        """A plan was made from the log as folded now: what was handed in
        before (``members_soon``, ``bridges_soon``) is in it."""
        with self._soon_lock:
            self._soon, self._bridges_soon = {}, {}

    def _soon_now(self, ch: Changes) -> None:
        """Within a pass: what the agent handed in since it began."""
        self._members_now(ch)
        self._bridges_now()

    def _bridges_now(self) -> None:
        """The bridges handed in since the pass began, of those it has made
        (or trusts) already: their flood and remote ports' entries changed
        at once. (Planned changes, not drift: not in the pass's changes.)"""
        with self._soon_lock:
            soon, self._bridges_soon = self._bridges_soon, {}
        if not soon:
            return
        if self._entries_for & set(soon):
            # The pass's own entries of these bridges first: what the newer
            # plan removes must not be sent after it is gone.
            self._send_entries()
        for name, b in sorted(soon.items()):
            trusted = self._trusted(b)
            if trusted is None or trusted[0] == b:
                continue  # (not made by this pass or the last, or nothing new)
            done, vx, br = trusted
            # (not trusted until made: a failure has the next pass probe it)
            self._done.pop(name)
            self._fdb_now(b, vx, br, _Entries.planned(done), Changes(), later=False)
            self._done[name] = b

    def _members_now(self, ch: Changes) -> None:
        """Within a pass: the member sets handed in since it started, of
        the sets this host has."""
        with self._soon_lock:
            soon, self._soon = self._soon, {}
        have = self._sets
        if have is None:
            return  # (a deep pass probes them)
        newer = {n: m for n, m in soon.items() if n in have and have[n] != m}
        if newer:
            self._sync_sets({**have, **newer}, ch)

    def _sync_sets(self, wanted: dict[str, frozenset[str]], ch: Changes) -> set[str]:
        """Make our ipsets hold ``wanted`` (a deep pass lists them; a shallow
        one trusts what it applied last); return the stale ones."""
        ips = self._ipsets()
        probed = self._sets is None
        if probed:
            have = {n: frozenset(m) for n, m in ips.listing().items() if nw.owned(self.prefix, n)}
        else:
            have = dict(self._sets)
        adds: list[tuple[str, str]] = []
        drops: list[tuple[str, str]] = []
        for name, members in sorted(wanted.items()):
            cur = have.get(name)
            if cur is members:
                continue  # (unchanged since the last pass: the same object)
            if cur is None:
                ips.create(name)
                cur = frozenset()
            add, drop = members - cur, cur - members
            adds += [(name, ip) for ip in sorted(add)]
            drops += [(name, ip) for ip in sorted(drop)]
            if probed and (add or drop or name not in have):
                # (found wrong by probing: drift; after events it is the plan's work)
                ch.created.append(f"ipset {name}")
        # (every set's members in one exchange; a refusal fails the pass,
        # and the next one, trusting nothing it did not finish, syncs again)
        self._sets = None
        ips.change(adds, drops)
        self._sets = dict(wanted)
        return set(have) - set(wanted)

    # -- BGP -------------------------------------------------------------------------

    def _bgp(self, bp: BgpPlan | None, ch: Changes) -> None:
        """BIRD running with ``bp``'s configuration (or not at all)."""
        bird = self.bird
        if bp is None:
            if bird is not None and (bird.pid() or bird.conf.exists()):
                bird.stop()
                ch.removed.append("bird")
            self._done.pop("bgp", None)
            return
        if bird is None:
            raise BirdError("routed networks need the agent's data directory (BIRD's files)")
        if not self._deep and self._done.get("bgp") == bp:
            return
        config = render(bp, bird.log)
        if not bird.pid():
            bird.start(config, lambda argv, cwd: run_in(self.host_ns, argv, cwd=cwd))
            ch.created.append("bird")
        elif bird.running_config() != config:
            bird.reconfigure(config)
            if self._done.get("bgp") is None:
                ch.created.append("bird config")  # (not what this agent left)
        self._done["bgp"] = bp

    def sessions(self) -> dict[str, bool] | None:
        """BIRD's BGP sessions (peer host -> established); None if it is not running."""
        if self.bird is None or not self.bird.pid():
            return None
        try:
            return self.bird.sessions()
        except (OSError, BirdError):
            return None

    def bird_routes(self) -> dict[str, str]:
        """Routes BIRD installed in the host's table: prefix -> next hop."""
        from stratus.agents.network.bird import RTPROT_BIRD

        with self._mutex:
            return {r.dst: r.gateway for r in self._nl().routes() if r.protocol == RTPROT_BIRD}

    # -- firewall -------------------------------------------------------------------

    def _hooks(self) -> list[tuple[str, str, str]]:
        top = nw.kernel_name(self.prefix, "chain", "forward")
        raw = nw.kernel_name(self.prefix, "chain", "raw")
        return [("filter", "FORWARD", top), ("raw", "PREROUTING", raw)]

    def _saved(self) -> tuple[dict[Chain, list[str]], set[Chain]] | None:
        """Our chains as the host has them, and the hooks into them that are
        in place (one ``iptables-save``); None if it failed."""
        res = run_in(self.host_ns, ["iptables-save"])
        if res.returncode != 0:
            return None
        have: dict[Chain, list[str]] = {}
        hooked: set[Chain] = set()
        hooks = {(t, hook, c) for t, hook, c in self._hooks()}
        table = ""
        for ln in res.stdout.splitlines():
            if ln.startswith("*"):
                table = ln[1:]
            elif ln.startswith(":"):
                name = ln[1:].split()[0]
                if nw.owned(self.prefix, name):
                    have.setdefault((table, name), [])
            elif ln.startswith("-A "):
                parts = ln.split()
                if nw.owned(self.prefix, parts[1]):
                    have.setdefault((table, parts[1]), []).append(ln)
                elif len(parts) == 4 and parts[2] == "-j" and (table, parts[1], parts[3]) in hooks:
                    hooked.add((table, parts[3]))
        return have, hooked

    def _firewall(self, chains: dict[Chain, tuple[str, ...]], deep: bool = True) -> bool:
        """Load the chains that differ from what the host has (a deep pass
        reads it; a shallow one trusts what the last pass loaded), drop our
        stale ones and hook ours in: one ``iptables-restore`` at most."""
        if deep or self._chains is None:
            saved = self._saved()
            if saved is None:
                have: dict[Chain, list[str]] = {}
                hooked: set[Chain] = set()
            else:
                have, hooked = saved
            changed = [
                k for k, v in chains.items() if k not in have or sorted(v) != sorted(have[k])
            ]
            stale = set(have) - set(chains)
            missing = [(t, h, c) for t, h, c in self._hooks() if (t, c) not in hooked]
            if deep:
                for key in ("net.bridge.bridge-nf-call-iptables",):
                    with contextlib.suppress(OSError):
                        if sysctl(self.host_ns, key) != "1":
                            sysctl(self.host_ns, key, "1")
        else:
            before = self._chains
            changed = [k for k, v in chains.items() if v != before.get(k)]
            stale = set(before) - set(chains)
            missing = []
        if not (changed or stale or missing):
            return False
        # A chain whose rules are independent of their order, and that the
        # host has, gets its added rules appended and its removed ones
        # deleted, instead of being written again (it grows with the ports).
        edits: list[Chain] = []
        if not deep:
            loose = unordered(self.prefix)
            edits = [k for k in changed if k in loose and k in self._chains]  # type: ignore[operator]
            changed = [k for k in changed if k not in edits]
        text = render_chains(chains, changed)
        for table in ("raw", "filter"):
            lines = []
            for k in (k for k in edits if k[0] == table):
                old, new = set(self._chains[k]), set(chains[k])  # type: ignore[index]
                lines += ["-D" + ln[2:] for ln in sorted(old - new)]
                lines += sorted(new - old)
            if lines:
                text += "\n".join([f"*{table}", *lines, "COMMIT", ""])
        extra = []
        for table in ("raw", "filter"):
            lines = [f"-F {c}" for t, c in sorted(stale) if t == table]
            lines += [f"-X {c}" for t, c in sorted(stale) if t == table]
            lines += [f"-I {h} 1 -j {c}" for t, h, c in missing if t == table]
            if lines:
                extra += [f"*{table}", *lines, "COMMIT"]
        text += "\n".join([*extra, ""]) if extra else ""
        res = run_in(self.host_ns, ["iptables-restore", "--noflush"], stdin=text)
        if res.returncode != 0:
            self._chains = None  # (probe again next time)
            raise KernelError(f"iptables-restore failed: {res.stderr.strip()}")
        return True

    def _our_chains(self, table: str) -> set[str]:
        saved = self._saved()
        return {c for t, c in saved[0] if t == table} if saved is not None else set()

    def teardown(self) -> Changes:
        """Remove every object of ours from this host (links, chains, BIRD)."""
        with self._mutex:
            ch = self.reconcile(HostPlan())
            wipe_firewall(self)
            ips = self._ipsets()
            for name in sorted(ips.listing()):
                if nw.owned(self.prefix, name):
                    ips.destroy(name)  # (no rule matches them now)
            self._sets = None
            if self.bird is not None:
                self.bird.stop()
                with contextlib.suppress(OSError):  # (the agent's own directory, if empty)
                    self.bird.dir.parent.rmdir()
            self.close()
            return ch


def _do_all(nl: Rtnl, requests: list[rtnl.Request], exists_ok: int = -1) -> None:
    """``requests`` in one batch; the first refused one raises (request
    ``exists_ok`` may find what it makes there already)."""
    for i, err in enumerate(nl.do_many(requests)):
        if err is not None and not (i == exists_ok and err.errno == errno.EEXIST):
            raise err


def dnsmasq_pid(ns: str) -> int:
    """The pid of our dnsmasq serving namespace ``ns`` (0: none running)."""
    nw.check_netns_name(ns)
    # A recycled pid is some other process: ours names its own configuration.
    return pid_of(DHCP_DIR / f"{ns}.pid", f"--conf-file={DHCP_DIR / f'{ns}.conf'}")


def stop_dnsmasq(ns: str, timeout: float = 5.0) -> None:
    """End the dnsmasq of ``ns`` (bounded: SIGTERM, then SIGKILL) and drop its files."""
    terminate(dnsmasq_pid(ns), timeout)
    for suffix in (".pid", ".conf"):
        (DHCP_DIR / f"{ns}{suffix}").unlink(missing_ok=True)


def wipe_firewall(host: Host) -> None:
    """Unhook and remove every chain of ours (one ``iptables-restore``)."""
    host._chains = None
    saved = host._saved()
    if saved is None:
        return
    have, hooked = saved
    lines: list[str] = []
    for table in ("raw", "filter"):
        mine = sorted(c for t, c in have if t == table)
        hooks = [f"-D {h} -j {c}" for t, h, c in host._hooks() if t == table and (t, c) in hooked]
        if mine or hooks:
            lines += [f"*{table}", *hooks, *(f"-F {c}" for c in mine)]
            lines += [*(f"-X {c}" for c in mine), "COMMIT"]
    if lines:
        res = run_in(host.host_ns, ["iptables-restore", "--noflush"], stdin="\n".join([*lines, ""]))
        if res.returncode != 0:
            raise KernelError(f"iptables-restore (wiping ours) failed: {res.stderr.strip()}")
