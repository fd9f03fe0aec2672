"""A small rtnetlink client for the agent's hot path: links, addresses,
routes, neighbours and FDB entries, one request and its acknowledgement at a
time on a plain ``AF_NETLINK`` socket.

Why not pyroute2 here: each pyroute2 request runs through its asyncio core
(measured here: 0.8-0.9 ms to get one link; 0.08 ms for the same request on
a raw socket), and wiring a port takes a dozen requests. pyroute2 stays for
what is rare (qdiscs). ``tests/test_network_rtnl.py`` checks what this
module makes against what pyroute2 reads, and the other way round.

A socket belongs to the namespace it was made in: ``Rtnl.open(ns)`` makes it
from inside ``ns`` (this thread only enters it, see ``kernel.in_netns``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import ipaddress
import os
import socket
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Self

# message types
RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK = 16, 17, 18
RTM_NEWADDR, RTM_DELADDR, RTM_GETADDR = 20, 21, 22
RTM_NEWROUTE, RTM_DELROUTE, RTM_GETROUTE = 24, 25, 26
RTM_NEWNEIGH, RTM_DELNEIGH, RTM_GETNEIGH = 28, 29, 30
RTM_GETQDISC = 38
NLMSG_ERROR, NLMSG_DONE = 2, 3
# flags
F_REQUEST, F_MULTI, F_ACK = 0x1, 0x2, 0x4
F_DUMP, F_REPLACE, F_EXCL, F_CREATE, F_APPEND = 0x300, 0x100, 0x200, 0x400, 0x800
NLA_F_NESTED = 0x8000
SOL_NETLINK, NETLINK_GET_STRICT_CHK = 270, 12
# link attributes
IFLA_ADDRESS, IFLA_IFNAME, IFLA_LINK, IFLA_MASTER = 1, 3, 5, 10
IFLA_OPERSTATE, IFLA_LINKINFO, IFLA_NET_NS_FD, IFLA_LINK_NETNSID = 16, 18, 28, 37
IFLA_TARGET_NETNSID = 46  # (a lookup of a link in another namespace, by its id here)
IF_OPER_UP = 6
IFLA_INFO_KIND, IFLA_INFO_DATA, IFLA_INFO_SLAVE_KIND, IFLA_INFO_SLAVE_DATA = 1, 2, 4, 5
IFLA_BRPORT_NEIGH_SUPPRESS = 32
VETH_INFO_PEER = 1
IFLA_VXLAN_ID, IFLA_VXLAN_LOCAL, IFLA_VXLAN_LEARNING, IFLA_VXLAN_PORT = 1, 4, 7, 15
IFF_UP, IFF_LOWER_UP = 0x1, 0x10000
# address, route, neighbour attributes
IFA_ADDRESS, IFA_LOCAL, IFA_LABEL = 1, 2, 3
RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_TABLE = 1, 4, 5, 15
NDA_DST, NDA_LLADDR, NDA_MASTER = 1, 2, 9
RT_TABLE_MAIN = 254
RTPROT_BOOT, RTPROT_STATIC = 3, 4
RT_SCOPE_UNIVERSE, RT_SCOPE_LINK = 0, 253
RTN_UNICAST = 1
RTNH_F_ONLINK = 4
NUD_NOARP, NUD_PERMANENT = 0x40, 0x80
NTF_SELF, NTF_MASTER = 0x02, 0x04
AF_BRIDGE = 7

_HDR = struct.Struct("=LHHLL")
_IFINFO = struct.Struct("=BxHiII")
_IFADDR = struct.Struct("=BBBBI")
_RTMSG = struct.Struct("=BBBBBBBBI")
_NDMSG = struct.Struct("=BxxxiHBB")
_TCMSG = struct.Struct("=BxxxiIII")
_U32 = struct.Struct("=I")
_I32 = struct.Struct("=i")
TCA_KIND, TCA_OPTIONS = 1, 2
TCA_TBF_PARMS, TCA_TBF_RATE64 = 1, 4
TC_H_ROOT = 0xFFFFFFFF


Request = tuple[int, int, bytes]  # message type, flags, body (see Netlink.do_many)


class RtnlError(OSError):
    """The kernel refused a request; ``errno`` says why (EEXIST, ENODEV ...)."""


@dataclass(frozen=True)
class Link:
    index: int
    name: str
    kind: str
    master: int
    up: bool
    vni: int = 0
    mac: str = ""
    netnsid: int = -1  # a veth's peer namespace, as this namespace numbers it
    peer: int = 0  # the peer's index there (IFLA_LINK)
    suppress: bool = False  # a bridge port answering ARP from the bridge's table
    oper_up: bool = False  # operationally up (RFC 2863), as the kernel's link watch set it


@dataclass(frozen=True)
class Route:
    dst: str  # "a.b.c.d/len"
    gateway: str
    oif: int
    table: int
    protocol: int
    scope: int


def nla(kind: int, payload: bytes) -> bytes:
    size = 4 + len(payload)
    return struct.pack("=HH", size, kind) + payload + b"\0" * (-size % 4)


def _nested(kind: int, *attrs: bytes) -> bytes:
    return nla(kind | NLA_F_NESTED, b"".join(attrs))


def _str(kind: int, value: str) -> bytes:
    return nla(kind, value.encode() + b"\0")


def _u32(kind: int, value: int) -> bytes:
    return nla(kind, struct.pack("=I", value))


def _mac(value: str) -> bytes:
    return bytes(int(b, 16) for b in value.split(":"))


def _ip4(value: str) -> bytes:
    return ipaddress.IPv4Address(value).packed


def nlas(data: bytes, offset: int = 0) -> Iterator[tuple[int, bytes]]:
    while offset + 4 <= len(data):
        size, kind = struct.unpack_from("=HH", data, offset)
        if size < 4:
            return
        yield kind & 0x3FFF, data[offset + 4 : offset + size]
        offset += (size + 3) & ~3


_NLA = struct.Struct("=HH")


def nla_map(data: bytes | memoryview, offset: int = 0) -> dict[int, memoryview]:
    """A message's attributes by type (the first of each), as views: a dump
    decodes thousands of them, and only a few are read."""
    out: dict[int, memoryview] = {}
    view = data if isinstance(data, memoryview) else memoryview(data)
    end = len(view)
    unpack = _NLA.unpack_from
    while offset + 4 <= end:
        size, kind = unpack(view, offset)
        if size < 4:
            break
        kind &= 0x3FFF
        if kind not in out:
            out[kind] = view[offset + 4 : offset + size]
        offset += (size + 3) & ~3
    return out


def _cstr(b: bytes) -> str:
    return b.split(b"\0", 1)[0].decode()


def _fmt_mac(b: bytes) -> str:
    return ":".join(f"{x:02x}" for x in b)


_BUFFERS = threading.local()


def _recv_buffer() -> memoryview:
    """This thread's receive buffer (one per thread: a socket is read by
    the thread that sent on it, and two threads may read two sockets)."""
    buf = getattr(_BUFFERS, "buf", None)
    if buf is None:
        buf = _BUFFERS.buf = memoryview(bytearray(1 << 20))
    return buf


class Netlink:
    """One netlink socket of ``protocol``, in the namespace it was opened in:
    a request, then its answers up to the acknowledgement or the dump's end."""

    protocol = socket.NETLINK_ROUTE
    error = RtnlError

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, self.protocol)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            if self.protocol == socket.NETLINK_ROUTE:
                # The kernel then filters dumps by what the request names (a
                # link's addresses, routes, neighbours; a table), not us.
                self.sock.setsockopt(SOL_NETLINK, NETLINK_GET_STRICT_CHK, 1)
            self.sock.bind((0, 0))
            # (the kernel answers at once; a missing answer is a bug, not a wait)
            self.sock.settimeout(10)
        except OSError:
            self.sock.close()
            raise
        self.seq = 0

    @classmethod
    def open(cls, ns: str | None) -> Self:
        """A socket in namespace ``ns`` (None: this thread's own)."""
        if not ns:
            return cls()
        from stratus.agents.network.kernel import in_netns

        with in_netns(ns):
            return cls()

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _send(self, kind: int, flags: int, body: bytes) -> int:
        self.seq = (self.seq + 1) & 0xFFFFFFFF
        head = _HDR.pack(_HDR.size + len(body), kind, flags | F_REQUEST, self.seq, 0)
        self.sock.send(head + body)
        return self.seq

    def _frames(self) -> Iterator[tuple[int, int, bytes]]:
        """(type, sequence number, payload) of each message of one read."""
        # Into the thread's own buffer: ``recv(1 << 20)`` would map a fresh
        # megabyte for every answer and unmap it again (in a process of many
        # threads each unmap interrupts every CPU to flush its TLB), where
        # an answer is one kernel buffer of at most 32 KiB.
        buf = _recv_buffer()
        n = self.sock.recv_into(buf)
        data = bytes(buf[:n])
        offset = 0
        while offset + _HDR.size <= len(data):
            size, kind, _, mseq, _ = _HDR.unpack_from(data, offset)
            if size < _HDR.size:
                return
            yield kind, mseq, data[offset + _HDR.size : offset + size]
            offset += (size + 3) & ~3

    def _error(self, payload: bytes) -> RtnlError | None:
        """An acknowledgement's error (None: the request was applied)."""
        code = -struct.unpack_from("=i", payload)[0]
        if not code:
            return None
        return self.error(code, os.strerror(code) if 0 < code < 4096 else f"error {code}")

    def _replies(self, seq: int) -> Iterator[tuple[int, bytes]]:
        """(type, payload) of each message answering ``seq``, until done or acked."""
        while True:
            for kind, mseq, payload in self._frames():
                if mseq != seq:
                    continue  # a late answer to an earlier request
                if kind == NLMSG_DONE:
                    return
                if kind == NLMSG_ERROR:
                    err = self._error(payload)
                    if err is not None:
                        raise err
                    return
                yield kind, payload

    def do(self, kind: int, flags: int, body: bytes) -> None:
        """A change, acknowledged."""
        for _ in self._replies(self._send(kind, flags | F_ACK, body)):
            pass

    def do_many(self, requests: list[Request], chunk: int = 256) -> list[RtnlError | None]:
        """Changes sent together (``chunk`` messages per write), each
        acknowledged: the kernel applies them in order and answers each, a
        refused one not stopping the others. One error (or None) per request."""
        return [err for err, _ in self.exchange(requests, chunk)]

    def exchange(
        self, requests: list[Request], chunk: int = 256
    ) -> list[tuple[RtnlError | None, list[bytes]]]:
        """``do_many`` that also keeps what the kernel answers each request
        with (a lookup's reply): the error (or None) and those payloads,
        per request.

        Only the last request of each write asks for an acknowledgement.
        The kernel applies a write's messages in order and answers a
        refused one whether asked or not, so once the last is acknowledged
        every one before it is done, and each has its error if it had one.
        An acknowledgement each would be a read each: in a process of busy
        threads every read gives up the interpreter and waits to get it
        back (the 135 entries of a wave were 135 such waits)."""
        out: list[tuple[RtnlError | None, list[bytes]]] = []
        for i in range(0, len(requests), chunk):
            part = requests[i : i + chunk]
            seqs = []
            buf = bytearray()
            for j, (kind, flags, body) in enumerate(part):
                self.seq = (self.seq + 1) & 0xFFFFFFFF
                seqs.append(self.seq)
                flags |= F_REQUEST | (F_ACK if j == len(part) - 1 else 0)
                buf += _HDR.pack(_HDR.size + len(body), kind, flags, self.seq, 0)
                buf += body + b"\0" * (-len(body) % 4)
            self.sock.send(bytes(buf))
            wanted, last = set(seqs), seqs[-1]
            answers: dict[int, RtnlError | None] = {}
            replies: dict[int, list[bytes]] = {s: [] for s in seqs}
            while last not in answers:
                for kind, mseq, payload in self._frames():
                    if mseq not in wanted:
                        continue  # a late answer to an earlier request
                    if kind == NLMSG_ERROR:
                        answers[mseq] = self._error(payload)
                    elif kind != NLMSG_DONE:
                        replies[mseq].append(payload)
            out += [(answers.get(s), replies[s]) for s in seqs]
        return out

    def dump(self, kind: int, body: bytes) -> list[bytes]:
        return [p for _, p in self._replies(self._send(kind, F_DUMP, body))]


class Rtnl(Netlink):
    """One rtnetlink socket (in the namespace it was opened in)."""

    # -- links -------------------------------------------------------------------------

    @staticmethod
    def _link(payload: bytes) -> Link:
        _, _, index, flags, _ = _IFINFO.unpack_from(payload)
        a = nla_map(payload, _IFINFO.size)
        name = _cstr(bytes(a[IFLA_IFNAME])) if IFLA_IFNAME in a else ""
        master = _U32.unpack_from(a[IFLA_MASTER])[0] if IFLA_MASTER in a else 0
        mac = _fmt_mac(bytes(a[IFLA_ADDRESS])) if IFLA_ADDRESS in a else ""
        nsid = _I32.unpack_from(a[IFLA_LINK_NETNSID])[0] if IFLA_LINK_NETNSID in a else -1
        peer = _U32.unpack_from(a[IFLA_LINK])[0] if IFLA_LINK in a else 0
        kind, vni, suppress = "", 0, False
        if IFLA_LINKINFO in a:
            info = nla_map(a[IFLA_LINKINFO])
            if IFLA_INFO_KIND in info:
                kind = _cstr(bytes(info[IFLA_INFO_KIND]))
            if kind == "vxlan" and IFLA_INFO_DATA in info:
                data = nla_map(info[IFLA_INFO_DATA])
                if IFLA_VXLAN_ID in data:
                    vni = _U32.unpack_from(data[IFLA_VXLAN_ID])[0]
                # (only a VXLAN device's port settings are read: the agent sets no other's)
                if IFLA_INFO_SLAVE_DATA in info:
                    port = nla_map(info[IFLA_INFO_SLAVE_DATA])
                    if IFLA_BRPORT_NEIGH_SUPPRESS in port:
                        suppress = bool(port[IFLA_BRPORT_NEIGH_SUPPRESS][0])
        up = bool(flags & IFF_UP)
        oper = IFLA_OPERSTATE in a and a[IFLA_OPERSTATE][0] == IF_OPER_UP
        return Link(index, name, kind, master, up, vni, mac, nsid, peer, suppress, oper)

    def links(self) -> list[Link]:
        return [self._link(p) for p in self.dump(RTM_GETLINK, _IFINFO.pack(0, 0, 0, 0, 0))]

    def link(self, name: str) -> Link | None:
        """One link by name (a single request, not a dump)."""
        kind, flags, body = link_get(name)
        try:
            found = [p for _, p in self._replies(self._send(kind, flags | F_ACK, body))]
        except RtnlError as exc:
            if exc.errno == errno.ENODEV:
                return None
            raise
        return self._link(found[0]) if found else None

    def links_named(self, names: list[str]) -> dict[str, Link | None]:
        """Links by name, all looked up in one exchange (None: no such link)."""
        return dict(zip(names, self.lookup([link_get(n) for n in names]), strict=True))

    def lookup(self, requests: list[Request]) -> list[Link | None]:
        """The links of lookups (``link_get``), in one exchange (None: no such link)."""
        out: list[Link | None] = []
        for err, payloads in self.exchange(requests):
            if err is not None and err.errno != errno.ENODEV:
                raise err
            out.append(self._link(payloads[0]) if err is None and payloads else None)
        return out

    def index(self, name: str) -> int:
        link = self.link(name)
        if link is None:
            raise RtnlError(errno.ENODEV, f"no link {name}")
        return link.index

    def add(self, name: str, kind: str, data: bytes = b"", *extra: bytes) -> None:
        self.do(*link_add(name, kind, data, *extra))

    def create(self, requests: list[Request], names: list[str]) -> dict[str, Link]:
        """Links made and then looked up by name, all in one exchange (a
        round trip each is a wait, and in a process of many agents a wait
        for the interpreter too): each of ``names`` as the kernel has it
        once ``requests`` were applied. The first refused request raises."""
        answers = self.exchange([*requests, *(link_get(n) for n in names)])
        for err, _ in answers:
            if err is not None:
                raise err
        found = {}
        for name, (_, payloads) in zip(names, answers[len(requests) :], strict=True):
            if not payloads:
                raise RtnlError(errno.ENODEV, f"no link {name}")
            found[name] = self._link(payloads[0])
        return found

    def add_bridge(self, name: str, mac: str = "") -> None:
        self.do(*bridge_add(name, mac))

    def add_vxlan(self, name: str, vni: int, local: str, port: int, learning: bool = True) -> None:
        self.do(*vxlan_add(name, vni, local, port, learning))

    def add_veth(
        self,
        name: str,
        peer: str,
        peer_netns_fd: int | None = None,
        mac: str = "",
        peer_mac: str = "",
    ) -> None:
        """A veth pair; its ``peer`` made directly in the namespace of
        ``peer_netns_fd`` (an open ``/run/netns`` file) when given."""
        self.do(*veth_add(name, peer, peer_netns_fd, mac, peer_mac))

    def set(
        self,
        index: int,
        *,
        up: bool | None = None,
        master: int | None = None,
        mac: str = "",
        netns_fd: int | None = None,
        name: str = "",
    ) -> None:
        self.do(*link_set(index, up=up, master=master, mac=mac, netns_fd=netns_fd, name=name))

    def neigh_suppress(self, index: int, on: bool = True) -> None:
        self.do(*neigh_suppress(index, on))

    def delete(self, index: int) -> None:
        self.do(RTM_DELLINK, 0, _IFINFO.pack(0, 0, index, 0, 0))

    # -- addresses ---------------------------------------------------------------------

    def addrs(self, index: int = 0) -> list[tuple[int, str, int]]:
        """IPv4 addresses (of link ``index``, or all): (link index, address, prefix length)."""
        return [(i, ip, plen) for i, _, ip, plen in self.labelled_addrs(index)]

    def labelled_addrs(self, index: int = 0) -> list[tuple[int, str, str, int]]:
        """IPv4 addresses with their link's name: (index, name, address, prefix length)."""
        out = []
        for p in self.dump(RTM_GETADDR, _IFADDR.pack(socket.AF_INET, 0, 0, 0, index)):
            family, plen, _, _, idx = _IFADDR.unpack_from(p)
            if family != socket.AF_INET or (index and idx != index):
                continue
            a = nla_map(p, _IFADDR.size)
            raw = a.get(IFA_LOCAL) or a.get(IFA_ADDRESS)
            if raw is not None:
                label = _cstr(bytes(a[IFA_LABEL])) if IFA_LABEL in a else ""
                out.append((idx, label, socket.inet_ntoa(bytes(raw[:4])), plen))
        return out

    def add_addr(self, index: int, address: str, prefixlen: int) -> None:
        self.do(*addr_add(index, address, prefixlen))

    def del_addr(self, index: int, address: str, prefixlen: int) -> None:
        raw = _ip4(address)
        body = _IFADDR.pack(socket.AF_INET, prefixlen, 0, 0, index)
        body += nla(IFA_LOCAL, raw) + nla(IFA_ADDRESS, raw)
        self.do(RTM_DELADDR, 0, body)

    # -- routes ------------------------------------------------------------------------

    def routes(self, table: int = RT_TABLE_MAIN) -> list[Route]:
        """IPv4 routes of ``table`` (the kernel filters the dump)."""
        out = []
        body = _RTMSG.pack(socket.AF_INET, 0, 0, 0, table if table < 256 else 0, 0, 0, 0, 0)
        if table >= 256:
            body += _u32(RTA_TABLE, table)
        for p in self.dump(RTM_GETROUTE, body):
            family, dst_len, _, _, tbl, proto, scope, _, _ = _RTMSG.unpack_from(p)
            if family != socket.AF_INET:
                continue
            a = nla_map(p, _RTMSG.size)
            dst = socket.inet_ntoa(bytes(a[RTA_DST][:4])) if RTA_DST in a else "0.0.0.0"
            gw = socket.inet_ntoa(bytes(a[RTA_GATEWAY][:4])) if RTA_GATEWAY in a else ""
            oif = _U32.unpack_from(a[RTA_OIF])[0] if RTA_OIF in a else 0
            if RTA_TABLE in a:
                tbl = _U32.unpack_from(a[RTA_TABLE])[0]
            if tbl == table:
                out.append(Route(f"{dst}/{dst_len}", gw, oif, tbl, proto, scope))
        return out

    def replace_route(
        self, dst: str, *, gateway: str = "", oif: int = 0, onlink: bool = False
    ) -> None:
        """``dst`` (a.b.c.d/len) via ``gateway`` or straight out of ``oif``."""
        self.do(*route_replace(dst, gateway=gateway, oif=oif, onlink=onlink))

    def del_route(self, dst: str, oif: int = 0) -> None:
        net = ipaddress.IPv4Network(dst)
        body = _RTMSG.pack(socket.AF_INET, net.prefixlen, 0, 0, RT_TABLE_MAIN, 0, 0, 0, 0)
        if net.prefixlen:
            body += nla(RTA_DST, net.network_address.packed)
        if oif:
            body += _u32(RTA_OIF, oif)
        self.do(RTM_DELROUTE, 0, body)

    # -- qdiscs (read only: adding one is pyroute2's, see kernel.Host) ----------------

    def root_qdiscs(self) -> dict[int, tuple[str, int]]:
        """Each link's root qdisc: index -> (kind, rate in bytes/s for a tbf, else 0)."""
        out = {}
        for p in self.dump(RTM_GETQDISC, _TCMSG.pack(0, 0, 0, 0, 0)):
            _, idx, _, parent, _ = _TCMSG.unpack_from(p)
            if parent != TC_H_ROOT:
                continue
            kind, rate = "", 0
            for t, v in nlas(p, _TCMSG.size):
                if t == TCA_KIND:
                    kind = _cstr(v)
                elif t == TCA_OPTIONS and kind == "tbf":
                    for ot, ov in nlas(v):
                        if ot == TCA_TBF_PARMS and len(ov) >= 12 and not rate:
                            rate = struct.unpack_from("=I", ov, 8)[0]
                        elif ot == TCA_TBF_RATE64:
                            rate = struct.unpack_from("=Q", ov)[0]
            out[idx] = (kind, rate)
        return out

    # -- neighbours and the bridge FDB ---------------------------------------------------------

    def neighbours(self, index: int) -> dict[str, tuple[str, int]]:
        """IPv4 neighbours on link ``index``: address -> (MAC, NUD state)."""
        out = {}
        # (a strict dump filters by an NDA_IFINDEX attribute, not the header's
        # index, which yields nothing: a namespace has few neighbours anyway)
        for p in self.dump(RTM_GETNEIGH, _NDMSG.pack(socket.AF_INET, 0, 0, 0, 0)):
            family, idx, state, _, _ = _NDMSG.unpack_from(p)
            if family != socket.AF_INET or idx != index:
                continue
            a = nla_map(p, _NDMSG.size)
            if NDA_DST in a:
                mac = _fmt_mac(bytes(a[NDA_LLADDR])) if NDA_LLADDR in a else ""
                out[socket.inet_ntoa(bytes(a[NDA_DST][:4]))] = (mac, state)
        return out

    def permanent_neighbours(self) -> dict[int, dict[str, str]]:
        """Every link's permanent IPv4 neighbours: index -> address -> MAC (one dump)."""
        out: dict[int, dict[str, str]] = {}
        for p in self.dump(RTM_GETNEIGH, _NDMSG.pack(socket.AF_INET, 0, 0, 0, 0)):
            family, idx, state, _, _ = _NDMSG.unpack_from(p)
            if family != socket.AF_INET or not state & NUD_PERMANENT:
                continue
            a = nla_map(p, _NDMSG.size)
            if NDA_DST in a and NDA_LLADDR in a:
                ip = socket.inet_ntoa(bytes(a[NDA_DST][:4]))
                out.setdefault(idx, {})[ip] = _fmt_mac(bytes(a[NDA_LLADDR]))
        return out

    def permanent_neighbour(self, index: int, address: str, mac: str) -> None:
        self.do(*neighbour_add(index, address, mac))

    def del_neighbour(self, index: int, address: str) -> None:
        self.do(*neighbour_delete(index, address))

    def fdb(self) -> dict[int, set[str]]:
        """Head-end replication entries (all-zero MAC, a remote VTEP): link index -> VTEPs."""
        return self.fdb_table().flood

    def fdb_table(self) -> Fdb:
        """The bridge FDB (one dump): head-end replication entries, permanent
        unicast entries of VXLAN devices, and static entries of bridge ports."""
        out = Fdb()
        zero = b"\0" * 6
        for p in self.dump(RTM_GETNEIGH, _NDMSG.pack(AF_BRIDGE, 0, 0, 0, 0)):
            family, idx, state, _, _ = _NDMSG.unpack_from(p)
            if family != AF_BRIDGE:
                continue
            a = nla_map(p, _NDMSG.size)
            if NDA_LLADDR not in a:
                continue
            mac = bytes(a[NDA_LLADDR])
            dst = a.get(NDA_DST)
            if dst is not None and len(dst) == 4:
                if mac == zero:
                    out.flood.setdefault(idx, set()).add(socket.inet_ntoa(bytes(dst)))
                elif state & NUD_PERMANENT:
                    out.unicast.setdefault(idx, {})[_fmt_mac(mac)] = socket.inet_ntoa(bytes(dst))
            elif NDA_MASTER in a and state & NUD_NOARP and not state & NUD_PERMANENT:
                # (the bridge's own entries carry their bridge, not NTF_MASTER)
                out.static.setdefault(idx, set()).add(_fmt_mac(mac))
        return out

    def fdb_append(self, index: int, dst: str) -> None:
        self.do(*fdb_flood(index, dst))

    def fdb_delete(self, index: int, dst: str) -> None:
        self.do(*fdb_flood(index, dst, delete=True))

    def fdb_unicast(self, index: int, mac: str, dst: str) -> None:
        self.do(*fdb_unicast(index, mac, dst))

    def fdb_static(self, port: int, mac: str) -> None:
        self.do(*fdb_static(port, mac))


# Requests for ``Netlink.do_many`` (and the single calls above).

# Every namespace's loopback device has this index (the kernel's LOOPBACK_IFINDEX).
LOOPBACK_INDEX = 1


def link_set(
    index: int = 0,
    *,
    up: bool | None = None,
    master: int | None = None,
    mac: str = "",
    netns_fd: int | None = None,
    name: str = "",
) -> Request:
    """Change link ``index`` (0: the link named ``name``, which the kernel
    looks up itself: no request for its index first)."""
    flags = change = 0
    if up is not None:
        flags, change = (IFF_UP if up else 0), IFF_UP
    attrs = b""
    if master is not None:
        attrs += _u32(IFLA_MASTER, master)
    if mac:
        attrs += nla(IFLA_ADDRESS, _mac(mac))
    if netns_fd is not None:
        attrs += _u32(IFLA_NET_NS_FD, netns_fd)
    if name:
        attrs += _str(IFLA_IFNAME, name)
    return RTM_NEWLINK, 0, _IFINFO.pack(0, 0, index, flags, change) + attrs


def link_add(name: str, kind: str, data: bytes = b"", *extra: bytes, up: bool = False) -> Request:
    """A new link ``name`` of ``kind`` (``data``: its kind's settings),
    brought up by the same request with ``up``."""
    info = _str(IFLA_INFO_KIND, kind) + (_nested(IFLA_INFO_DATA, data) if data else b"")
    flags = IFF_UP if up else 0
    body = (
        _IFINFO.pack(0, 0, 0, flags, flags)
        + _str(IFLA_IFNAME, name)
        + b"".join(extra)
        + _nested(IFLA_LINKINFO, info)
    )
    return RTM_NEWLINK, F_CREATE | F_EXCL, body


def bridge_add(name: str, mac: str = "", up: bool = False) -> Request:
    """A new bridge ``name`` (with its MAC ``mac``), up with ``up``."""
    return link_add(name, "bridge", b"", *([nla(IFLA_ADDRESS, _mac(mac))] if mac else []), up=up)


def vxlan_add(name: str, vni: int, local: str, port: int, learning: bool = True) -> Request:
    """A new VXLAN device ``name`` for ``vni`` from ``local`` (UDP ``port``), down."""
    data = (
        _u32(IFLA_VXLAN_ID, vni)
        + nla(IFLA_VXLAN_LOCAL, _ip4(local))
        + nla(IFLA_VXLAN_PORT, struct.pack("!H", port))
        + nla(IFLA_VXLAN_LEARNING, bytes([1 if learning else 0]))
    )
    return link_add(name, "vxlan", data)


def neigh_suppress(index: int, on: bool = True) -> Request:
    """Bridge port ``index`` answers ARP requests from its bridge's
    neighbour table instead of flooding them out of it (the kernel's ARP
    suppression, as EVPN uses on a VXLAN port)."""
    port = nla(IFLA_BRPORT_NEIGH_SUPPRESS, bytes([1 if on else 0]))
    info = _str(IFLA_INFO_SLAVE_KIND, "bridge") + _nested(IFLA_INFO_SLAVE_DATA, port)
    return RTM_NEWLINK, 0, _IFINFO.pack(0, 0, index, 0, 0) + _nested(IFLA_LINKINFO, info)


def fdb_flood(index: int, dst: str, delete: bool = False) -> Request:
    """VXLAN device ``index`` sends broadcast and unknown frames to VTEP
    ``dst`` too (head-end replication), or no more with ``delete``."""
    body = _NDMSG.pack(AF_BRIDGE, index, NUD_PERMANENT | NUD_NOARP, NTF_SELF, 0)
    body += nla(NDA_LLADDR, b"\0" * 6) + nla(NDA_DST, _ip4(dst))
    if delete:
        return RTM_DELNEIGH, 0, body
    return RTM_NEWNEIGH, F_CREATE | F_APPEND, body


def veth_add(
    name: str,
    peer: str,
    peer_netns_fd: int | None = None,
    mac: str = "",
    peer_mac: str = "",
    *,
    netns_fd: int | None = None,
    up: bool = False,
) -> Request:
    """A veth pair (see ``Rtnl.add_veth``): ``name`` here (or in the
    namespace of ``netns_fd``), brought up by the request with ``up``, and
    ``peer`` made down (the peer of a pair is made before the pair is
    joined, and cannot come up in the same request). Descriptors must stay
    open until the request is sent."""
    peer_attrs = _str(IFLA_IFNAME, peer)
    if peer_netns_fd is not None:
        peer_attrs += _u32(IFLA_NET_NS_FD, peer_netns_fd)
    if peer_mac:
        peer_attrs += nla(IFLA_ADDRESS, _mac(peer_mac))
    data = nla(VETH_INFO_PEER | NLA_F_NESTED, _IFINFO.pack(0, 0, 0, 0, 0) + peer_attrs)
    extra = [_u32(IFLA_NET_NS_FD, netns_fd)] if netns_fd is not None else []
    if mac:
        extra.append(nla(IFLA_ADDRESS, _mac(mac)))
    return link_add(name, "veth", data, *extra, up=up)


def veth_inside(
    outer: str, inner: str, inner_netns_fd: int, outer_mac: str = "", inner_mac: str = ""
) -> Request:
    """A veth pair whose side ``inner`` is made in the namespace of
    ``inner_netns_fd`` and up, and ``outer`` here and down: the inner side
    is the request's own link, so the kernel brings it up as it makes it.
    Nothing passes until ``outer`` comes up."""
    return veth_add(inner, outer, None, inner_mac, outer_mac, netns_fd=inner_netns_fd, up=True)


def link_get(name: str, netnsid: int = -1) -> Request:
    """A lookup of the link ``name`` (its reply: the link); of the one in
    namespace ``netnsid`` (as this namespace numbers it: a veth's
    ``Link.netnsid``) when given."""
    body = _IFINFO.pack(0, 0, 0, 0, 0) + _str(IFLA_IFNAME, name)
    if netnsid >= 0:
        body += nla(IFLA_TARGET_NETNSID, _I32.pack(netnsid))
    return RTM_GETLINK, 0, body


def addr_add(index: int, address: str, prefixlen: int) -> Request:
    raw = _ip4(address)
    body = _IFADDR.pack(socket.AF_INET, prefixlen, 0, 0, index)
    body += nla(IFA_LOCAL, raw) + nla(IFA_ADDRESS, raw)
    return RTM_NEWADDR, F_CREATE | F_EXCL, body


def route_replace(dst: str, *, gateway: str = "", oif: int = 0, onlink: bool = False) -> Request:
    """``dst`` (a.b.c.d/len) via ``gateway`` or straight out of ``oif``."""
    net = ipaddress.IPv4Network(dst)
    scope = RT_SCOPE_UNIVERSE if gateway else RT_SCOPE_LINK
    body = _RTMSG.pack(
        socket.AF_INET,
        net.prefixlen,
        0,
        0,
        RT_TABLE_MAIN,
        RTPROT_STATIC,
        scope,
        RTN_UNICAST,
        RTNH_F_ONLINK if onlink else 0,
    )
    if net.prefixlen:
        body += nla(RTA_DST, net.network_address.packed)
    if gateway:
        body += nla(RTA_GATEWAY, _ip4(gateway))
    if oif:
        body += _u32(RTA_OIF, oif)
    return RTM_NEWROUTE, F_CREATE | F_REPLACE, body


def neighbour_add(index: int, address: str, mac: str) -> Request:
    """A permanent IPv4 neighbour entry on link ``index`` (replacing one there)."""
    body = _NDMSG.pack(socket.AF_INET, index, NUD_PERMANENT, 0, 0)
    body += nla(NDA_DST, _ip4(address)) + nla(NDA_LLADDR, _mac(mac))
    return RTM_NEWNEIGH, F_CREATE | F_REPLACE, body


def neighbour_delete(index: int, address: str) -> Request:
    body = _NDMSG.pack(socket.AF_INET, index, 0, 0, 0) + nla(NDA_DST, _ip4(address))
    return RTM_DELNEIGH, 0, body


def fdb_unicast(index: int, mac: str, dst: str) -> Request:
    """VXLAN device ``index`` sends frames for ``mac`` to VTEP ``dst``
    (permanent: what it learns from traffic does not move it)."""
    body = _NDMSG.pack(AF_BRIDGE, index, NUD_PERMANENT | NUD_NOARP, NTF_SELF, 0)
    body += nla(NDA_LLADDR, _mac(mac)) + nla(NDA_DST, _ip4(dst))
    return RTM_NEWNEIGH, F_CREATE | F_REPLACE, body


def fdb_unicast_delete(index: int, mac: str) -> Request:
    body = _NDMSG.pack(AF_BRIDGE, index, 0, NTF_SELF, 0) + nla(NDA_LLADDR, _mac(mac))
    return RTM_DELNEIGH, 0, body


def fdb_static(port: int, mac: str) -> Request:
    """The bridge of ``port`` forwards frames for ``mac`` out of it (a
    static entry: neither learned over nor aged out)."""
    body = _NDMSG.pack(AF_BRIDGE, port, NUD_NOARP, NTF_MASTER, 0) + nla(NDA_LLADDR, _mac(mac))
    return RTM_NEWNEIGH, F_CREATE | F_REPLACE, body


def fdb_static_delete(port: int, mac: str) -> Request:
    body = _NDMSG.pack(AF_BRIDGE, port, 0, NTF_MASTER, 0) + nla(NDA_LLADDR, _mac(mac))
    return RTM_DELNEIGH, 0, body


@dataclass
class Fdb:
    """The bridge FDB as the agent reads it, by link index."""

    flood: dict[int, set[str]] = field(default_factory=dict)  # all-zero MAC -> VTEPs
    unicast: dict[int, dict[str, str]] = field(default_factory=dict)  # MAC -> VTEP
    static: dict[int, set[str]] = field(default_factory=dict)  # MACs behind a port


NS_GET_NSTYPE = 0xB703  # ioctl on a namespace file: its kind (linux/nsfs.h)
CLONE_NEWNET = 0x40000000


def netns_ready(name: str) -> bool:
    """Whether namespace ``name`` is there and made: ``ip netns add`` (and
    pyroute2) create its file under /run/netns first and bind the new
    namespace onto it after; until then the file is a plain one, and a
    link made "in" it is refused (EINVAL)."""
    from stratus.events import network as nw

    try:
        fd = os.open(f"/run/netns/{nw.check_netns_name(name)}", os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        return fcntl.ioctl(fd, NS_GET_NSTYPE) == CLONE_NEWNET
    except OSError:  # (ENOTTY: not a namespace yet)
        return False
    finally:
        os.close(fd)


@contextlib.contextmanager
def netns_fd(name: str) -> Iterator[int]:
    """An open descriptor of namespace ``name`` (for IFLA_NET_NS_FD)."""
    from stratus.events import network as nw

    fd = os.open(f"/run/netns/{nw.check_netns_name(name)}", os.O_RDONLY)
    try:
        yield fd
    finally:
        os.close(fd)
