"""What the network agents, the compute agents and the handlers say to each
other about the data plane.

- A tenant network's VXLAN segment (VNI) is drawn from the cloud-wide pool
  on ``ev._system.segment-pool.vxlan`` by a conditional append (as floating
  IPs are drawn from an external network), so two live networks never share
  a VNI; deleting the network gives it back.
- A port is bound to a host by ``port.bound`` on the port's subject:
  ``port_binding`` builds it (the compute agent, or the network agent once
  it has wired a port of a server placed on its host).
- Each network agent says where its host's VXLAN endpoint (VTEP) is with
  ``network-agent.registered`` on ``ev._system.network-agent.<host>``; the
  other agents turn that into static FDB entries (head-end replication, no
  multicast). Corrections that reconcile made are recorded there too.
- Every kernel object name (link, namespace) comes from ``kernel_name``:
  at most 15 bytes of ``[a-z0-9-]``, derived from ids, so no tenant text
  ever reaches netlink, nftables or libvirt.
- A VM's port is a tap device named ``vm_tap(port id)``: the compute agent
  names it in the domain (libvirt creates it when the guest starts), and the
  network agent puts it on the network's bridge (moving it into a simulated
  host's namespace first). Its MAC is the port's.
- A routed network (Calico's model) is cloud-wide, on
  ``ev._system.network.<name>``: no bridge, no overlay, no NAT. Its address
  blocks are claimed by hosts on demand (``ipam.block-claimed`` on the
  network's subject, conditioned on it: a block has one host), and each
  block's addresses are handed out by its host alone, on the block's own
  subject (``block_subject``), together with ``port.address-assigned`` on
  the port. A host gives back a block it no longer uses. Each host's BIRD
  announces its blocks over iBGP; what a host's agent sees of its BGP
  sessions going down and coming back is recorded on its own subject.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from typing import Annotated

import msgspec

from stratus.events.commands import Command
from stratus.events.errors import Invalid
from stratus.events.model import Cause, Event
from stratus.events.resources import SYSTEM, Addr, Name, PortBound

SEGMENT_POOL = "vxlan"
SEGMENT_POOL_SUBJECT = f"ev.{SYSTEM}.segment-pool.{SEGMENT_POOL}"
# VNIs handed to tenant networks: below 4096 is left to operators (provider
# segments), 2**24 - 1 is the largest the VXLAN header carries.
VNI_FIRST = 4096
VNI_LAST = (1 << 24) - 1
VXLAN_PORT = 4789

ROUTED = "routed"
# The cloud's private AS: every host's BIRD speaks iBGP in it (Calico's default).
BGP_ASN = 64512
BLOCK_PREFIX = 26
# A routed port's next hop inside its instance: a link-local address on the
# host's side of the veth, whose MAC is fixed (Calico's convention), so the
# instance gets a permanent neighbour entry and needs no ARP proxy.
ROUTED_GATEWAY = "169.254.1.1"
ROUTED_HOST_MAC = "ee:ee:ee:ee:ee:ee"

# Linux's IFNAMSIZ is 16 with the terminating NUL.
IFNAME_MAX = 15
_KERNEL_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,14}(?!\n)$")
_PREFIX = re.compile(r"^[a-z][a-z0-9]{0,5}(?!\n)$")
# What each kind of object is called after the deployment's prefix.
ROLES = {
    "bridge": "b",  # a tenant network's bridge on a host
    "vxlan": "x",  # its VXLAN device
    "port": "p",  # the host side of a port's veth (or a VM's tap)
    "peer": "i",  # the instance side of a container port's veth
    "router": "r",  # a router's namespace
    "leg": "l",  # host side of a router's leg into a network's bridge
    "gw": "g",  # router side of that leg
    "ext": "e",  # an external network's bridge
    "xleg": "m",  # host side of a router's leg into the external bridge
    "xgw": "n",  # router side of it
    "instance": "c",  # a namespace of our own beside the hosts (a test's outside world)
    "dhcp": "d",  # a network's DHCP namespace
    "dleg": "k",  # host side of a DHCP namespace's leg into a network's bridge
    "dgw": "j",  # the DHCP namespace's side of it
    "host": "h",  # a simulated host's namespace
    "underlay": "u",  # the simulated underlay's namespace (and its bridge)
    "uplink": "v",  # a simulated host's leg into the underlay
    "chain": "f",  # firewall chains
}


def check_kernel_name(name: str) -> str:
    """``name`` if it is safe to hand to the kernel, else Invalid."""
    if not isinstance(name, str) or not _KERNEL_NAME.match(name):
        raise Invalid(f"kernel object name {name!r} must be 1-15 characters of [a-z0-9-]")
    return name


def kernel_name(prefix: str, role: str, ident: str) -> str:
    """The name of the ``role`` object for id ``ident`` under ``prefix``:
    ``<prefix><role letter>-<hash>``, 15 bytes at most.

    The hash (not the id itself) keeps names short and the same for the
    same id on every host; a prefix per deployment (or per test run) keeps
    two of them on one machine apart, and tells what is ours on probing.
    """
    if not _PREFIX.match(prefix):
        raise Invalid(f"name prefix {prefix!r} must be 1-6 of [a-z0-9], starting with a letter")
    letter = ROLES.get(role)
    if letter is None:
        raise Invalid(f"unknown kernel object role {role!r}")
    head = f"{prefix}{letter}-"
    digest = hashlib.sha256(ident.encode()).hexdigest()
    return check_kernel_name(head + digest[: IFNAME_MAX - len(head)])


def bridge_mac(network: str) -> str:
    """A network bridge's MAC: locally administered, unicast, the same for
    the same network on every host and run (the hash of its id)."""
    digest = hashlib.sha256(f"bridge {network}".encode()).digest()
    return ":".join(f"{b:02x}" for b in (0x02, *digest[:5]))


def owned(prefix: str, name: str, role: str | None = None) -> bool:
    """Whether ``name`` is one of ours (of ``role``, if given)."""
    letters = [ROLES[role]] if role else list(ROLES.values())
    return any(name.startswith(f"{prefix}{x}-") for x in letters)


_NETNS_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}(?!\n)$")


def check_netns_name(name: str) -> str:
    """``name`` if it is a safe namespace name (a file under /run/netns), else Invalid."""
    if not isinstance(name, str) or not _NETNS_NAME.match(name):
        raise Invalid(f"namespace name {name!r} must be 1-63 characters of [a-z0-9-]")
    return name


def instance_netns(server_id: str) -> str:
    """The network namespace of a container instance, as the compute agent
    names it (``st-<server id>``; ids are UUIDs, unique on any machine)."""
    return check_netns_name(f"st-{server_id}")


TAP_PREFIX = "tap"


def vm_tap(port_id: str) -> str:
    """The tap device of a VM's port: the same name for the compute agent
    (in the domain XML) and the network agent (on the bridge). No deployment
    prefix: the compute agent does not know it, and port ids are unique."""
    digest = hashlib.sha256(port_id.encode()).hexdigest()
    return check_kernel_name(TAP_PREFIX + digest[: IFNAME_MAX - len(TAP_PREFIX)])


_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}(?!\n)$")


def check_mac(mac: str) -> str:
    """``mac`` if it is a unicast MAC in lower-case colon form, else Invalid."""
    if not isinstance(mac, str) or not _MAC.match(mac) or int(mac[:2], 16) & 1:
        raise Invalid(f"MAC address {mac!r} is not a unicast aa:bb:cc:dd:ee:ff")
    return mac


def block_subject(network: str, block: str) -> str:
    """The subject of one block's address allocations (its host's alone)."""
    net = ipaddress.ip_network(block)
    ident = f"{network}-{str(net.network_address).replace('.', '-')}-{net.prefixlen}"
    return f"ev.{SYSTEM}.ipblock.{ident}"


def port_binding(cause: Cause, tenant: str, port_id: str, host: str) -> PortBound:
    """The event binding a port to ``host``: append it on the port's subject."""
    return cause.make(PortBound, tenant, "port", port_id, host=host)


class SegmentAllocated(Event, frozen=True, tag="pool.segment-allocated"):
    """On the segment pool's subject: ``vni`` now belongs to a network."""

    vni: int
    holder_tenant: str
    holder: str


class SegmentReleased(Event, frozen=True, tag="pool.segment-released"):
    vni: int
    holder_tenant: str
    holder: str


class NetworkAgentRegistered(Event, frozen=True, tag="network-agent.registered"):
    """The host's VXLAN endpoint; re-appended only when it changes."""

    host: str
    vtep: str
    routers: bool = False


class NetworkAgentCorrected(Event, frozen=True, tag="network-agent.corrected"):
    """What reconcile found drifted on the host and put right."""

    host: str
    created: list[str] = []
    removed: list[str] = []


class BlockClaimed(Event, frozen=True, tag="ipam.block-claimed"):
    """On a routed network's subject: ``block`` is now ``host``'s (Calico's
    block affinity): only that host hands out its addresses, and its BIRD
    announces it."""

    block: str
    host: str


class BlockReleased(Event, frozen=True, tag="ipam.block-released"):
    """``host`` gave ``block`` back: none of its addresses was in use."""

    block: str
    host: str


class Holder(msgspec.Struct, frozen=True):
    """Who holds an address of a block: a port of a tenant."""

    tenant: str
    port: str


class BlockAddresses(Event, frozen=True, tag="ipam.addresses"):
    """On a block's subject, by its host's agent alone: addresses handed out
    and given back (address -> holder), in one event conditioned on the
    block's last one, so no address is ever handed out twice. Each port
    learns its address from ``port.address-assigned`` on its own subject."""

    network: str
    block: str
    allocated: dict[str, Holder] = {}
    released: dict[str, Holder] = {}


class PeerLost(Event, frozen=True, tag="network-agent.peer-lost"):
    """``host``'s BGP session to ``peer`` went down; the routes it had learned
    from it (``withdrawn``: the peer's blocks) are gone from its table."""

    host: str
    peer: str
    withdrawn: list[str] = []


class PeerRestored(Event, frozen=True, tag="network-agent.peer-restored"):
    """``host``'s BGP session to ``peer`` is established again; ``learned``:
    the peer's blocks it routes to now."""

    host: str
    peer: str
    learned: list[str] = []


class RoutedNetworkCreate(Command, frozen=True):
    """A cloud admin's routed network (``network create NAME --mode routed``)."""

    name: Name
    cidr: Addr
    block_prefix: Annotated[int, msgspec.Meta(ge=20, le=30)] = BLOCK_PREFIX


COMMANDS: dict[str, type[Command]] = {"network.create-routed": RoutedNetworkCreate}

EVENTS = (
    SegmentAllocated,
    SegmentReleased,
    NetworkAgentRegistered,
    NetworkAgentCorrected,
    BlockClaimed,
    BlockReleased,
    BlockAddresses,
    PeerLost,
    PeerRestored,
)
