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
import socket
import struct

from stratus.agents.network.rtnl import (
    F_ACK,
    F_CREATE,
    F_DUMP,
    F_EXCL,
    NLA_F_NESTED,
    Netlink,
    RtnlError,
    nla,
    nlas,
)

NETLINK_NETFILTER = 12
NFNL_SUBSYS_IPSET = 6
IPSET_PROTOCOL = 6
CMD_CREATE, CMD_DESTROY, CMD_FLUSH, CMD_LIST, CMD_ADD, CMD_DEL = 2, 3, 4, 7, 9, 10
ATTR_PROTOCOL, ATTR_SETNAME, ATTR_TYPENAME, ATTR_REVISION = 1, 2, 3, 4
ATTR_FAMILY, ATTR_FLAGS, ATTR_DATA, ATTR_ADT = 5, 6, 7, 8
ATTR_IP, ATTR_IPADDR_IPV4 = 1, 1
FLAG_EXIST = 1  # (IPSET_ATTR_FLAGS) adding what is there, or deleting what is not, is fine
NFPROTO_IPV4 = 2
NLA_F_NET_BYTEORDER = 0x4000


_NFGEN = struct.Struct("=BBH")


class IpSetError(RtnlError):
    """The kernel refused an ipset request (errno, or ipset's own code above 4096)."""


def _name(name: str) -> bytes:
    if not 0 < len(name) < 32:
        raise IpSetError(errno.EINVAL, f"set name {name!r} is not 1-31 bytes")
    return nla(ATTR_SETNAME, name.encode() + b"\0")


def _ip(address: str) -> bytes:
    raw = ipaddress.IPv4Address(address).packed
    inner = nla(ATTR_IPADDR_IPV4 | NLA_F_NET_BYTEORDER, raw)
    return nla(ATTR_DATA | NLA_F_NESTED, nla(ATTR_IP | NLA_F_NESTED, inner))


class IpSets(Netlink):
    """One netfilter netlink socket (in the namespace it was opened in)."""

    protocol = NETLINK_NETFILTER
    error = IpSetError

    def _request(self, cmd: int, flags: int, attrs: bytes) -> list[bytes]:
        body = _NFGEN.pack(NFPROTO_IPV4, 0, 0) + nla(ATTR_PROTOCOL, bytes([IPSET_PROTOCOL]))
        seq = self._send((NFNL_SUBSYS_IPSET << 8) | cmd, flags, body + attrs)
        return [p[_NFGEN.size :] for _, p in self._replies(seq)]

    def create(self, name: str) -> None:
        """An empty ``hash:ip`` set (IPv4); nothing if it exists already."""
        attrs = (
            _name(name)
            + nla(ATTR_TYPENAME, b"hash:ip\0")
            + nla(ATTR_REVISION, bytes([0]))
            + nla(ATTR_FAMILY, bytes([NFPROTO_IPV4]))
            + nla(ATTR_DATA | NLA_F_NESTED, b"")
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
        self.change([(name, address)], [])

    def delete(self, name: str, address: str) -> None:
        self.change([], [(name, address)])

    def change(self, add: list[tuple[str, str]], delete: list[tuple[str, str]]) -> None:
        """Members added and deleted, (set, address) each, in one exchange
        (a request a member, all written at once: a round trip each would
        be a wait for the interpreter in a busy agent). The kernel applies
        them in order; the first it refused raises, after the rest."""
        body = _NFGEN.pack(NFPROTO_IPV4, 0, 0) + nla(ATTR_PROTOCOL, bytes([IPSET_PROTOCOL]))
        flags = nla(ATTR_FLAGS, struct.pack("!I", FLAG_EXIST))
        requests = [
            ((NFNL_SUBSYS_IPSET << 8) | cmd, 0, body + _name(name) + _ip(address) + flags)
            for cmd, pairs in ((CMD_ADD, add), (CMD_DEL, delete))
            for name, address in pairs
        ]
        for err in self.do_many(requests) if requests else []:
            if err is not None:
                raise err

    def listing(self, name: str | None = None) -> dict[str, set[str]]:
        """Sets (one, or all) and their IPv4 members."""
        out: dict[str, set[str]] = {}
        for payload in self._request(CMD_LIST, F_DUMP, _name(name) if name else b""):
            setname, members = "", set()
            for t, v in nlas(payload):
                if t == ATTR_SETNAME:
                    setname = v.split(b"\0", 1)[0].decode()
                elif t == ATTR_ADT:
                    for dt, dv in nlas(v):
                        if dt != ATTR_DATA:
                            continue
                        for it, iv in nlas(dv):
                            if it != ATTR_IP:
                                continue
                            for at, av in nlas(iv):
                                if at == ATTR_IPADDR_IPV4 and len(av) == 4:
                                    members.add(socket.inet_ntoa(av))
            if setname:
                out.setdefault(setname, set()).update(members)
        return out
