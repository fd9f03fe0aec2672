"""IP sets (``hash:ip``) over netfilter's netlink: the members of the
security groups that rules name as their remote side.

A rule "from members of group G" matches ``-m set --match-set <G's set>``,
so a new member anywhere in the cloud is one netlink message on each host
that needs it, instead of rewriting a chain with ``iptables-restore`` (a
process) on every such host, which is what capped the agent's rate.

The protocol (``linux/netfilter/ipset/ip_set.h``): messages of the
``NFNL_SUBSYS_IPSET`` subsystem, an ``nfgenmsg`` header, then attributes;
addresses nested as ``IPSET_ATTR_IP`` { ``IPSET_ATTR_IPADDR_IPV4`` } in
network byte order. Like ``rtnl``, a socket belongs to the namespace it was
opened in.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
from collections.abc import Iterator

NETLINK_NETFILTER = 12
NFNL_SUBSYS_IPSET = 6
IPSET_PROTOCOL = 6
CMD_CREATE, CMD_DESTROY, CMD_FLUSH, CMD_LIST, CMD_ADD, CMD_DEL = 2, 3, 4, 7, 9, 10
ATTR_PROTOCOL, ATTR_SETNAME, ATTR_TYPENAME, ATTR_REVISION = 1, 2, 3, 4
ATTR_FAMILY, ATTR_FLAGS, ATTR_DATA, ATTR_ADT = 5, 6, 7, 8
ATTR_IP, ATTR_IPADDR_IPV4 = 1, 1
FLAG_EXIST = 1  # (IPSET_ATTR_FLAGS) adding what is there, or deleting what is not, is fine
NFPROTO_IPV4 = 2
NLA_F_NESTED, NLA_F_NET_BYTEORDER = 0x8000, 0x4000
NLMSG_ERROR, NLMSG_DONE = 2, 3
F_REQUEST, F_ACK, F_DUMP, F_CREATE, F_EXCL = 0x1, 0x4, 0x300, 0x400, 0x200


_HDR = struct.Struct("=LHHLL")
_NFGEN = struct.Struct("=BBH")


class IpSetError(OSError):
    """The kernel refused an ipset request."""


def _attr(kind: int, payload: bytes) -> bytes:
    size = 4 + len(payload)
    return struct.pack("=HH", size, kind) + payload + b"\0" * (-size % 4)


def _attrs(data: bytes, offset: int = 0) -> Iterator[tuple[int, bytes]]:
    while offset + 4 <= len(data):
        size, kind = struct.unpack_from("=HH", data, offset)
        if size < 4:
            return
        yield kind & 0x3FFF, data[offset + 4 : offset + size]
        offset += (size + 3) & ~3


def _name(name: str) -> bytes:
    if not 0 < len(name) < 32:
        raise IpSetError(errno.EINVAL, f"set name {name!r} is not 1-31 bytes")
    return _attr(ATTR_SETNAME, name.encode() + b"\0")


def _ip(address: str) -> bytes:
    raw = ipaddress.IPv4Address(address).packed
    inner = _attr(ATTR_IPADDR_IPV4 | NLA_F_NET_BYTEORDER, raw)
    return _attr(ATTR_DATA | NLA_F_NESTED, _attr(ATTR_IP | NLA_F_NESTED, inner))


class IpSets:
    """One netfilter netlink socket (in the namespace it was opened in)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        try:
            self.sock.bind((0, 0))
            self.sock.settimeout(10)
        except OSError:
            self.sock.close()
            raise
        self.seq = 0

    @classmethod
    def open(cls, ns: str | None) -> IpSets:
        if not ns:
            return cls()
        from stratus.agents.network.kernel import in_netns

        with in_netns(ns):
            return cls()

    def close(self) -> None:
        self.sock.close()

    def _request(self, cmd: int, flags: int, attrs: bytes) -> list[bytes]:
        self.seq = (self.seq + 1) & 0xFFFFFFFF
        body = _NFGEN.pack(NFPROTO_IPV4, 0, 0) + _attr(ATTR_PROTOCOL, bytes([IPSET_PROTOCOL]))
        body += attrs
        kind = (NFNL_SUBSYS_IPSET << 8) | cmd
        head = _HDR.pack(_HDR.size + len(body), kind, flags | F_REQUEST, self.seq, 0)
        self.sock.send(head + body)
        out = []
        while True:
            data = self.sock.recv(1 << 20)
            offset = 0
            while offset + _HDR.size <= len(data):
                size, mtype, _, mseq, _ = _HDR.unpack_from(data, offset)
                if size < _HDR.size:
                    return out
                payload = data[offset + _HDR.size : offset + size]
                offset += (size + 3) & ~3
                if mseq != self.seq:
                    continue
                if mtype == NLMSG_DONE:
                    return out
                if mtype == NLMSG_ERROR:
                    code = -struct.unpack_from("=i", payload)[0]
                    if code:
                        text = os.strerror(code) if code < 4096 else f"ipset error {code}"
                        raise IpSetError(code, text)
                    return out
                out.append(payload[_NFGEN.size :])

    def create(self, name: str) -> None:
        """An empty ``hash:ip`` set (IPv4); nothing if it exists already."""
        attrs = (
            _name(name)
            + _attr(ATTR_TYPENAME, b"hash:ip\0")
            + _attr(ATTR_REVISION, bytes([0]))
            + _attr(ATTR_FAMILY, bytes([NFPROTO_IPV4]))
            + _attr(ATTR_DATA | NLA_F_NESTED, b"")
        )
        try:
            self._request(CMD_CREATE, F_ACK | F_CREATE | F_EXCL, attrs)
        except IpSetError as exc:
            if exc.errno not in (errno.EEXIST, 4101):
                raise

    def destroy(self, name: str) -> None:
        try:
            self._request(CMD_DESTROY, F_ACK, _name(name))
        except IpSetError as exc:
            if exc.errno != errno.ENOENT:
                raise

    def add(self, name: str, address: str) -> None:
        flags = _attr(ATTR_FLAGS, struct.pack("!I", FLAG_EXIST))
        self._request(CMD_ADD, F_ACK, _name(name) + _ip(address) + flags)

    def delete(self, name: str, address: str) -> None:
        flags = _attr(ATTR_FLAGS, struct.pack("!I", FLAG_EXIST))
        self._request(CMD_DEL, F_ACK, _name(name) + _ip(address) + flags)

    def listing(self, name: str | None = None) -> dict[str, set[str]]:
        """Sets (one, or all) and their IPv4 members."""
        out: dict[str, set[str]] = {}
        for payload in self._request(CMD_LIST, F_DUMP, _name(name) if name else b""):
            setname, members = "", set()
            for t, v in _attrs(payload):
                if t == ATTR_SETNAME:
                    setname = v.split(b"\0", 1)[0].decode()
                elif t == ATTR_ADT:
                    for dt, dv in _attrs(v):
                        if dt != ATTR_DATA:
                            continue
                        for it, iv in _attrs(dv):
                            if it != ATTR_IP:
                                continue
                            for at, av in _attrs(iv):
                                if at == ATTR_IPADDR_IPV4 and len(av) == 4:
                                    members.add(socket.inet_ntoa(av))
            if setname:
                out.setdefault(setname, set()).update(members)
        return out
