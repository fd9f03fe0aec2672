"""The host side: probe what exists and make it match a ``HostPlan``.

pyroute2 for links, addresses, routes, FDB and qdiscs; ``iptables-restore``
with a generated file (an argument list, never a shell string) for the
security groups. Only objects carrying the deployment's prefix are read or
removed, so whatever else runs on the host is left alone. Every function
here blocks: the agent calls them in a worker thread.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pyroute2 import IPRoute, netns
from pyroute2.netlink.exceptions import NetlinkError

from stratus.agents.network.desired import (
    BridgePlan,
    DhcpPlan,
    HostPlan,
    LegPlan,
    PortPlan,
    RouterPlan,
)
from stratus.events import network as nw

ZERO_MAC = "00:00:00:00:00:00"
# The links the agent owns on its host (a simulated host's uplink is not one).
MANAGED = ("bridge", "vxlan", "port", "leg", "ext", "xleg", "dleg")
# dnsmasq's configuration and pid file per namespace it serves (machine-wide,
# as the namespaces are; names carry the deployment's prefix).
DHCP_DIR = Path("/run/stratus-dhcp")


class KernelError(RuntimeError):
    """A netlink or firewall step failed; the message names the object."""


def run_in(ns: str | None, argv: Sequence[str], stdin: str | None = None, timeout: float = 30):
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
    )


_NSENTER = shutil.which("nsenter")


def _child_after_fork() -> None:
    # pyroute2 forks helpers to enter namespaces and ends them with SIGTERM.
    # A forked child keeps the parent's signal handlers and asyncio's wakeup
    # fd, so that SIGTERM would reach the parent's loop as its own and stop
    # ``stratus up``. The child (whose forking thread is now its main thread)
    # lets the signal act as the default (ending it) instead.
    import signal

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


@contextlib.contextmanager
def in_netns(name: str) -> Iterator[None]:
    """Run the block with this thread (only) in network namespace ``name``."""
    nw.check_netns_name(name)
    libc = ctypes.CDLL(None, use_errno=True)
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(f"/run/netns/{name}", os.O_RDONLY)
        try:
            if libc.setns(target, _CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise KernelError(f"cannot enter namespace {name}: {os.strerror(err)}")
            try:
                yield
            finally:
                if libc.setns(own, _CLONE_NEWNET) != 0:
                    raise KernelError("cannot return to the agent's own namespace")
        finally:
            os.close(target)
    finally:
        os.close(own)


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


def _attr(msg, name: str, default=None):
    return msg.get_attr(name, default) if hasattr(msg, "get_attr") else msg.get(name, default)


def _link_info(link) -> dict:
    info = link.get_attr("IFLA_LINKINFO")
    kind = info.get_attr("IFLA_INFO_KIND") if info is not None else None
    return {
        "index": link["index"],
        "kind": kind,
        "master": link.get_attr("IFLA_MASTER") or 0,
        "vni": _vxlan_id(link) if kind == "vxlan" else 0,
        "up": bool(link["flags"] & 1),
    }


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


def _vxlan_id(link) -> int:
    info = _attr(link, "IFLA_LINKINFO")
    data = info.get_attr("IFLA_INFO_DATA") if info is not None else None
    return int(data.get_attr("IFLA_VXLAN_ID") or 0) if data is not None else 0


class Host:
    """One host's kernel (the namespace ``host_ns``, or the current one)."""

    def __init__(
        self, prefix: str, vtep: str, host_ns: str | None = None, routers: bool = False
    ) -> None:
        isolate_forked_helpers()
        self.prefix = prefix
        self.vtep = vtep
        self.host_ns = nw.check_netns_name(host_ns) if host_ns else None
        # Router namespaces are machine-wide names: only a host that runs
        # routers probes and removes them.
        self.routers = routers
        # What the last pass applied: a shallow pass (after new events)
        # trusts what it made itself and only touches what the plan changed;
        # a deep pass (start, periodic) probes everything again.
        self._done: dict[str, object] = {}
        self._rules = ""
        self._declared: set[str] = set()
        self._ns: set[str] = set()
        self._wired: set[str] = set()  # ports this process saw wired
        self._mutex = threading.RLock()
        self._sockets: dict[str | None, IPRoute] | None = None
        self._pass_thread = 0
        self._fdb: dict[int, set[str]] | None = None
        self._deep = True
        self._names: set[str] = set()  # the link names of the last plan

    def _ipr(self, ns: str | None = None) -> contextlib.AbstractContextManager[IPRoute]:
        """A netlink socket in ``ns`` (default: the host's). Within a pass,
        one per namespace is kept for the whole pass: opening one costs
        more than most requests made on it."""
        target = ns if ns is not None else self.host_ns
        if self._sockets is not None and threading.get_ident() == self._pass_thread:
            sock = self._sockets.get(target)
            if sock is None:
                sock = self._sockets[target] = self._open(target)
            return contextlib.nullcontext(sock)
        return self._open(target)

    @staticmethod
    def _open(target: str | None) -> IPRoute:
        if not target:
            return IPRoute()
        # The socket is opened by this thread after entering the namespace
        # (a netlink socket stays in the namespace it was made in), instead
        # of pyroute2's forked helper per connection.
        with in_netns(target):
            return IPRoute()

    @contextlib.contextmanager
    def _pass(self) -> Iterator[None]:
        """The scope of one reconcile pass: its sockets and its FDB dump."""
        self._sockets, self._pass_thread, self._fdb = {}, threading.get_ident(), None
        try:
            yield
        finally:
            sockets, self._sockets, self._fdb = self._sockets, None, None
            for sock in sockets.values():
                with contextlib.suppress(Exception):
                    sock.close()

    # -- probing --------------------------------------------------------------

    def wired(self) -> set[str]:
        """Ports this process has seen wired (made, or found in order)."""
        return set(self._wired)

    def links(self, taps: set[str] | frozenset[str] = frozenset()) -> dict[str, dict]:
        """Our links (and the VM ``taps`` we wire): name -> index, kind,
        master index, vni, up."""
        out: dict[str, dict] = {}
        with self._ipr() as ipr:
            for link in ipr.get_links():
                name = link.get_attr("IFLA_IFNAME")
                ours = any(nw.owned(self.prefix, name, role) for role in MANAGED)
                if ours or name in taps:
                    out[name] = _link_info(link)
        return out

    def link(self, name: str) -> dict | None:
        """One link by name (a single request, not a dump), None if absent."""
        with self._ipr() as ipr:
            try:
                found = ipr.link("get", ifname=name)
            except NetlinkError as exc:
                if exc.code == 19:  # ENODEV
                    return None
                raise
        return _link_info(found[0]) if found else None

    def fdb(self, index: int) -> set[str]:
        """The head-end replication entries (remote VTEPs) on VXLAN device
        ``index``. A pass dumps the host's table once, not once per device."""
        if self._fdb is not None:
            return set(self._fdb.get(index, ()))
        table: dict[int, set[str]] = {}
        with self._ipr() as ipr:
            for e in ipr.fdb("dump"):
                dst = e.get_attr("NDA_DST")
                if dst and e.get_attr("NDA_LLADDR") == ZERO_MAC:
                    table.setdefault(e["ifindex"], set()).add(dst)
        if self._sockets is not None:
            self._fdb = table
        return set(table.get(index, ()))

    def qdisc_rate(self, index: int) -> int:
        """The tbf rate on a link in kbit/s (0: none of ours)."""
        with self._ipr() as ipr:
            for q in ipr.get_qdiscs(index=index):
                if q.get_attr("TCA_KIND") == "tbf" and q["parent"] == 0xFFFFFFFF:
                    opts = q.get_attr("TCA_OPTIONS")
                    parms = opts.get_attr("TCA_TBF_PARMS") if opts is not None else None
                    rate = parms["rate"] if parms is not None else 0
                    return rate * 8 // 1000
        return 0

    def peer_ok(self, pp: PortPlan) -> bool:
        """The instance side exists with its address (and route)."""
        if pp.netns not in namespaces() or not self._addressed(pp.netns, pp.peer, pp.address):
            return False
        if pp.gateway:
            with self._ipr(pp.netns) as ipr:
                routes = ipr.get_routes(family=2, dst_len=0, table=254)
                return any(r.get_attr("RTA_GATEWAY") == pp.gateway for r in routes)
        return True

    def _addressed(self, ns: str, ifname: str, address: str) -> bool:
        """Whether link ``ifname`` in ``ns`` exists and holds ``address`` (ip/prefixlen)."""
        with self._ipr(ns) as ipr:
            idx = ipr.link_lookup(ifname=ifname)
            if not idx:
                return False
            ip, plen = address.split("/")
            addrs = {
                (a.get_attr("IFA_ADDRESS"), a["prefixlen"]) for a in ipr.get_addr(index=idx[0])
            }
            return (ip, int(plen)) in addrs

    # -- changing ------------------------------------------------------------------

    def reconcile(self, hp: HostPlan, deep: bool = True) -> Changes:
        """Make the host match ``hp``; what had to change is returned."""
        # One pass at a time: a pass whose awaiting task was cancelled (the
        # agent stopping) runs on in its thread, and the next (a teardown)
        # must not interleave with it.
        with self._mutex, self._pass():
            return self._reconcile(hp, deep)

    def _reconcile(self, hp: HostPlan, deep: bool) -> Changes:
        ch = Changes()
        failed: KernelError | None = None
        if deep:
            self._done, self._rules = {}, ""
        self._ns = namespaces()
        self._deep = deep
        actual = Links(self, hp.taps(), dump=deep)
        wanted = hp.names()
        if not deep:
            # What the last plan had and this one has not: the stray links a
            # shallow pass can know of without probing the whole host.
            for name in sorted(self._names - wanted):
                actual.get(name)
        self._names = wanted
        for name, link in sorted(actual.items()):
            stale = name not in wanted
            if not stale and name in hp.bridges and link["kind"] != "bridge":
                stale = True
            vx = {b.vxlan: b for b in hp.bridges.values()}.get(name)
            if vx is not None and (link["kind"] != "vxlan" or link["vni"] != vx.vni):
                stale = True
            if stale and link["kind"] in ("bridge", "vxlan", "veth"):
                self._delete(name)
                ch.removed.append(name)
                actual.pop(name)
        before = len(ch.created)
        for b in sorted(hp.bridges.values(), key=lambda b: b.bridge):
            self._bridge(b, actual, ch)
        for name in sorted(n for n in hp.externals if n not in actual):
            with self._ipr() as ipr:
                ipr.link("add", ifname=name, kind="bridge")
                ipr.link("set", index=ipr.link_lookup(ifname=name)[0], state="up")
            ch.created.append(name)
        actual.forget(ch.created[before:])  # new bridges: their indexes
        for pp in sorted(hp.ports.values(), key=lambda p: p.ifname):
            self._port(pp, actual, hp, ch)
        if self.routers:
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
        if hp.firewall and hp.firewall != self._rules:
            if self._firewall(hp.firewall, deep):
                ch.created.append("firewall")
            self._rules = hp.firewall
        if failed is not None:
            raise failed
        return ch

    def _delete(self, name: str) -> None:
        with self._ipr() as ipr:
            idx = ipr.link_lookup(ifname=name)
            if idx:
                ipr.link("del", index=idx[0])

    def _bridge(self, b: BridgePlan, actual: Links, ch: Changes) -> None:
        done = self._done.get(b.bridge)
        if done == b and (not self._deep or (b.bridge in actual and b.vxlan in actual)):
            return
        # A shallow pass trusts the FDB entries it made itself last time.
        trusted = done.remotes if isinstance(done, BridgePlan) and b.vxlan in actual else None
        self._bridge_now(b, actual, ch, trusted)
        self._done[b.bridge] = b

    def _bridge_now(
        self,
        b: BridgePlan,
        actual: Links,
        ch: Changes,
        trusted: frozenset[str] | None = None,
    ) -> None:
        with self._ipr() as ipr:
            if b.bridge not in actual:
                ipr.link("add", ifname=b.bridge, kind="bridge")
                ch.created.append(b.bridge)
            br = ipr.link_lookup(ifname=b.bridge)[0]
            ipr.link("set", index=br, state="up")
            if b.vxlan not in actual:
                ipr.link(
                    "add",
                    ifname=b.vxlan,
                    kind="vxlan",
                    vxlan_id=b.vni,
                    vxlan_local=self.vtep,
                    vxlan_port=nw.VXLAN_PORT,
                    vxlan_learning=1,
                )
                ch.created.append(b.vxlan)
            vx = ipr.link_lookup(ifname=b.vxlan)[0]
            ipr.link("set", index=vx, master=br, state="up")
        have = set(trusted) if trusted is not None else self.fdb(vx)
        with self._ipr() as ipr:
            for dst in sorted(b.remotes - have):
                ipr.fdb("append", ifindex=vx, lladdr=ZERO_MAC, dst=dst)
                ch.created.append(f"fdb {b.vxlan} {dst}")
            for dst in sorted(have - b.remotes):
                ipr.fdb("del", ifindex=vx, lladdr=ZERO_MAC, dst=dst)
                ch.removed.append(f"fdb {b.vxlan} {dst}")

    def _port(self, pp: PortPlan, actual: Links, hp: HostPlan, ch: Changes) -> None:
        if self._done.get(pp.ifname) == pp and (not self._deep or pp.ifname in actual):
            return
        if self._port_now(pp, actual, hp, ch):  # wired, not waiting for its instance
            self._done[pp.ifname] = pp

    def _port_now(self, pp: PortPlan, actual: Links, hp: HostPlan, ch: Changes) -> bool:
        if pp.vm:
            if pp.ifname not in actual:
                if not self._adopt_tap(pp.ifname):
                    return False  # the guest is not running (yet)
                ch.wired.append(pp.ifname)
                actual[pp.ifname] = {"master": 0, "up": False}
        elif pp.netns not in self._ns:
            # The instance is not there (yet): wired once the compute agent made it.
            if pp.ifname in actual:
                self._delete(pp.ifname)
                ch.removed.append(pp.ifname)
            return False
        elif pp.ifname in actual and not self.peer_ok(pp):
            self._delete(pp.ifname)
            ch.removed.append(pp.ifname)
            actual.pop(pp.ifname)
        if pp.ifname not in actual:
            self._veth(pp)
            (ch.created if pp.ifname in self._wired else ch.wired).append(pp.ifname)
        self._wired.add(pp.ifname)
        with self._ipr() as ipr:
            idx = ipr.link_lookup(ifname=pp.ifname)[0]
            br = ipr.link_lookup(ifname=pp.bridge)[0]
            link = actual.get(pp.ifname)
            if link is None or link["master"] != br or not link["up"]:
                ipr.link("set", index=idx, master=br, state="up")
        rate = self.qdisc_rate(idx)
        if rate != pp.kbps:
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
            ch.created.append(f"qos {pp.ifname} {pp.kbps}kbit")
        return True

    def _adopt_tap(self, name: str) -> bool:
        """Whether the VM tap ``name`` is (now) on this host. libvirtd makes
        it in its own namespace; a simulated host's is moved in here."""
        if self.host_ns:
            with IPRoute() as ipr:
                idx = ipr.link_lookup(ifname=name)
                if idx:
                    # (qemu keeps its file descriptor: the device only moves)
                    ipr.link("set", index=idx[0], net_ns_fd=self.host_ns)
        with self._ipr() as ipr:
            return bool(ipr.link_lookup(ifname=name))

    def _veth(self, pp: PortPlan) -> None:
        with self._ipr() as ipr:
            ipr.link("add", ifname=pp.ifname, kind="veth", peer={"ifname": pp.peer})
            peer = ipr.link_lookup(ifname=pp.peer)[0]
            ipr.link("set", index=peer, net_ns_fd=pp.netns)
        with self._ipr(pp.netns) as ipr:
            lo = ipr.link_lookup(ifname="lo")
            if lo:
                ipr.link("set", index=lo[0], state="up")
            idx = ipr.link_lookup(ifname=pp.peer)[0]
            ipr.link("set", index=idx, address=pp.mac)
            ip, plen = pp.address.split("/")
            try:
                ipr.addr("add", index=idx, address=ip, prefixlen=int(plen))
            except NetlinkError as exc:
                if exc.code != 17:  # EEXIST
                    raise
            ipr.link("set", index=idx, state="up")
            if pp.gateway:
                ipr.route("replace", dst="0.0.0.0/0", gateway=pp.gateway, oif=idx)

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
        if run_in(rp.netns, ["sysctl", "-n", "net.ipv4.ip_forward"]).stdout.strip() != "1":
            run_in(rp.netns, ["sysctl", "-qw", "net.ipv4.ip_forward=1"])
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
        with self._ipr() as ipr:
            ipr.link("add", ifname=leg.ifname, kind="veth", peer={"ifname": leg.inner})
            peer = ipr.link_lookup(ifname=leg.inner)[0]
            ipr.link("set", index=peer, net_ns_fd=ns)
            idx = ipr.link_lookup(ifname=leg.ifname)[0]
            br = ipr.link_lookup(ifname=leg.bridge)[0]
            ipr.link("set", index=idx, master=br, state="up")
        with self._ipr(ns) as ipr:
            lo = ipr.link_lookup(ifname="lo")
            if lo:
                ipr.link("set", index=lo[0], state="up")
            idx = ipr.link_lookup(ifname=leg.inner)[0]
            if leg.mac:
                ipr.link("set", index=idx, address=leg.mac)
            ip, plen = leg.address.split("/")
            ipr.addr("add", index=idx, address=ip, prefixlen=int(plen))
            ipr.link("set", index=idx, state="up")

    def _external_addresses(self, rp: RouterPlan, ch: Changes) -> None:
        """Floating IPs as /32s on the external leg (the router answers ARP
        for them), and the default route out through the external gateway."""
        assert rp.external is not None
        with self._ipr(rp.netns) as ipr:
            idx = ipr.link_lookup(ifname=rp.external.inner)[0]
            have = {
                a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(index=idx) if a["prefixlen"] == 32
            }
            for a in sorted(set(rp.extra) - have):
                ipr.addr("add", index=idx, address=a, prefixlen=32)
                ch.created.append(f"{rp.netns} {a}")
            for a in sorted(have - set(rp.extra)):
                ipr.addr("del", index=idx, address=a, prefixlen=32)
                ch.removed.append(f"{rp.netns} {a}")
            if rp.gateway:
                routes = ipr.get_routes(family=2, dst_len=0, table=254)
                if not any(r.get_attr("RTA_GATEWAY") == rp.gateway for r in routes):
                    ipr.route("replace", dst="0.0.0.0/0", gateway=rp.gateway, oif=idx)
                    ch.created.append(f"{rp.netns} default via {rp.gateway}")

    # -- firewall -------------------------------------------------------------------

    def _hooks(self) -> list[tuple[str, str, str]]:
        top = nw.kernel_name(self.prefix, "chain", "forward")
        raw = nw.kernel_name(self.prefix, "chain", "raw")
        return [("filter", "FORWARD", top), ("raw", "PREROUTING", raw)]

    def _hooked(self) -> bool:
        return all(
            run_in(self.host_ns, ["iptables", "-t", t, "-C", hook, "-j", c]).returncode == 0
            for t, hook, c in self._hooks()
        )

    def _firewall(self, rules: str, deep: bool = True) -> bool:
        """Load the ruleset; a deep pass first checks whether the host's
        already matches (and is hooked in). Our stale chains are dropped."""
        if deep and self._firewall_matches(rules) and self._hooked():
            self._declared = _declared(rules)
            return False
        ns = self.host_ns
        if deep or not self._declared:
            for key in (
                "net.bridge.bridge-nf-call-iptables",
                "net.bridge.bridge-nf-call-ip6tables",
            ):
                run_in(ns, ["sysctl", "-qw", f"{key}=1"])
        text = rules if deep or not self._rules else _delta(self._rules, rules)
        if text:
            res = run_in(ns, ["iptables-restore", "--noflush"], stdin=text)
            if res.returncode != 0:
                raise KernelError(f"iptables-restore failed: {res.stderr.strip()}")
        if deep or not self._declared:
            for table, hook, chain in self._hooks():
                if run_in(ns, ["iptables", "-t", table, "-C", hook, "-j", chain]).returncode:
                    run_in(ns, ["iptables", "-t", table, "-I", hook, "-j", chain])
        declared = _declared(rules)
        # (the chains restored above no longer jump to a stale one)
        stale = (self._our_chains("filter") if deep else self._declared) - declared
        for chain in sorted(stale):
            run_in(ns, ["iptables", "-F", chain])
            run_in(ns, ["iptables", "-X", chain])
        self._declared = declared
        return True

    def _our_chains(self, table: str) -> set[str]:
        res = run_in(self.host_ns, ["iptables-save", "-t", table])
        return {
            ln[1:].split()[0]
            for ln in res.stdout.splitlines()
            if ln.startswith(":") and nw.owned(self.prefix, ln[1:].split()[0])
        }

    def _firewall_matches(self, rules: str) -> bool:
        """Whether every chain of ours holds exactly the rules of ``rules``."""
        want: dict[str, list[str]] = {}
        for ln in rules.splitlines():
            if ln.startswith(":"):
                want.setdefault(ln[1:].split()[0], [])
            elif ln.startswith("-A "):
                want.setdefault(ln.split()[1], []).append(ln)
        have: dict[str, list[str]] = {}
        for table in ("raw", "filter"):
            res = run_in(self.host_ns, ["iptables-save", "-t", table])
            if res.returncode != 0:
                return False
            for ln in res.stdout.splitlines():
                if ln.startswith(":") and nw.owned(self.prefix, ln[1:].split()[0]):
                    have.setdefault(ln[1:].split()[0], [])
                elif ln.startswith("-A ") and nw.owned(self.prefix, ln.split()[1]):
                    have.setdefault(ln.split()[1], []).append(ln)
        return {k: sorted(v) for k, v in want.items()} == {k: sorted(v) for k, v in have.items()}

    def teardown(self) -> Changes:
        """Remove every object of ours from this host (links, chains)."""
        with self._mutex:
            ch = self.reconcile(HostPlan())
            wipe_firewall(self)
            return ch


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended


def dnsmasq_pid(ns: str) -> int:
    """The pid of our dnsmasq serving namespace ``ns`` (0: none running)."""
    nw.check_netns_name(ns)
    try:
        pid = int((DHCP_DIR / f"{ns}.pid").read_text().strip() or 0)
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (FileNotFoundError, ValueError, ProcessLookupError):
        return 0
    # A recycled pid is some other process: ours names its own configuration.
    mine = f"--conf-file={DHCP_DIR / f'{ns}.conf'}".encode()
    return pid if mine in cmdline and _alive(pid) else 0


def stop_dnsmasq(ns: str, timeout: float = 5.0) -> None:
    """End the dnsmasq of ``ns`` (bounded: SIGTERM, then SIGKILL) and drop its files."""
    pid = dnsmasq_pid(ns)
    if pid:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
    for suffix in (".pid", ".conf"):
        (DHCP_DIR / f"{ns}{suffix}").unlink(missing_ok=True)


def _chains(rules: str) -> dict[tuple[str, str], list[str]]:
    """(table, chain) -> its rule lines, from an iptables-restore file."""
    out: dict[tuple[str, str], list[str]] = {}
    table = ""
    for ln in rules.splitlines():
        if ln.startswith("*"):
            table = ln[1:]
        elif ln.startswith(":"):
            out.setdefault((table, ln[1:].split()[0]), [])
        elif ln.startswith("-A "):
            out.setdefault((table, ln.split()[1]), []).append(ln)
    return out


def _delta(old: str, new: str) -> str:
    """A restore file with only the chains whose rules changed (declaring a
    chain flushes it): a new port rewrites a few chains, not the host's all."""
    before, after = _chains(old), _chains(new)
    lines: list[str] = []
    for table in ("raw", "filter"):
        changed = [k for k in after if k[0] == table and after[k] != before.get(k)]
        if not changed:
            continue
        lines.append(f"*{table}")
        lines += [f":{c} - [0:0]" for _, c in changed]
        for k in changed:
            lines += after[k]
        lines.append("COMMIT")
    return "\n".join([*lines, ""])


def _declared(rules: str) -> set[str]:
    return {ln[1:].split()[0] for ln in rules.splitlines() if ln.startswith(":")}


def wipe_firewall(host: Host) -> None:
    host._declared, host._rules = set(), ""
    ns, prefix = host.host_ns, host.prefix
    top = nw.kernel_name(prefix, "chain", "forward")
    raw = nw.kernel_name(prefix, "chain", "raw")
    run_in(ns, ["iptables", "-D", "FORWARD", "-j", top])
    run_in(ns, ["iptables", "-t", "raw", "-D", "PREROUTING", "-j", raw])
    for table in ("filter", "raw"):
        for chain in sorted(host._our_chains(table)):
            run_in(ns, ["iptables", "-t", table, "-F", chain])
        for chain in sorted(host._our_chains(table)):
            run_in(ns, ["iptables", "-t", table, "-X", chain])
