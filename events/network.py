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
"""

from __future__ import annotations

import hashlib
import re

from stratus.events.errors import Invalid
from stratus.events.model import Cause, Event
from stratus.events.resources import SYSTEM, PortBound

SEGMENT_POOL = "vxlan"
SEGMENT_POOL_SUBJECT = f"ev.{SYSTEM}.segment-pool.{SEGMENT_POOL}"
# VNIs handed to tenant networks: below 4096 is left to operators (provider
# segments), 2**24 - 1 is the largest the VXLAN header carries.
VNI_FIRST = 4096
VNI_LAST = (1 << 24) - 1
VXLAN_PORT = 4789

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


EVENTS = (SegmentAllocated, SegmentReleased, NetworkAgentRegistered, NetworkAgentCorrected)
