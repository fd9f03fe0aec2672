"""Events and commands of the inventory: hosts, flavors, images, servers,
volumes, networks, subnets, ports, routers, floating IPs, security groups,
QoS policies, server groups and quotas.

Subjects: a tenant's resource lives on ``ev.<tenant>.<kind>.<id>`` with a
UUIDv7 id; cloud-wide objects (hosts, flavors, public images, external
networks) live in the tenant ``_system`` and, like tenants, are identified
by the name they were created with (immutable, never reused).

Every event class says, in ``status``, the status its resource has once the
event is applied (None: unchanged); the projections and the decision state
both read it, so the lifecycle is written down once.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

import msgspec

from stratus.events.commands import Command
from stratus.events.ids import NAME_RE, RESOURCE_NAME_RE
from stratus.events.model import Event
from stratus.events.oci import OciConfig

SYSTEM = "_system"

Name = Annotated[str, msgspec.Meta(pattern=NAME_RE.pattern, max_length=63)]
# A tenant resource's name. It is shown and matched by refs, never part of a
# subject or a kernel name (those use ids), so it may carry what OpenStack
# tools put in names (upper case, '.', '_') and may be empty (Neutron's
# unnamed subnets and ports); a cloud-wide object's name is its id: ``Name``.
ResourceName = Annotated[str, msgspec.Meta(pattern=RESOURCE_NAME_RE.pattern, max_length=63)]
# A reference to a resource: its id or its name (or a floating IP's address).
# Refs are resolved against the state, never put into a subject as given.
REF_PATTERN = r"^[A-Za-z0-9_.:-]{1,64}(?!\n)$"
Ref = Annotated[str, msgspec.Meta(pattern=REF_PATTERN, max_length=64)]
Count = Annotated[int, msgspec.Meta(ge=0, le=1 << 40)]
Positive = Annotated[int, msgspec.Meta(ge=1, le=1 << 30)]
Ratio = Annotated[float, msgspec.Meta(gt=0, le=1000)]
Text = Annotated[str, msgspec.Meta(max_length=255)]
Label = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.-]{1,63}(?!\n)$")]
Labels = Annotated[dict[Label, Label], msgspec.Meta(max_length=64)]
Refs = Annotated[list[Ref], msgspec.Meta(max_length=16)]
# An address or prefix is parsed by ``ipaddress`` in the decision; this only
# bounds what reaches it.
Addr = Annotated[str, msgspec.Meta(pattern=r"^[0-9A-Fa-f:./]{2,49}(?!\n)$")]
InstanceType = Literal["vm", "container"]


class ResourceEvent(Event, frozen=True):
    """An event about one resource; ``status`` is its status afterwards."""

    status: ClassVar[str | None] = None
    # The resource comes into existence with this event ...
    begins: ClassVar[bool] = False
    # ... or stops existing (its row leaves the views).
    ends: ClassVar[bool] = False
    # Fields it empties, instead of setting its own (whose values say what
    # those fields held: the server a volume was detached from).
    resets: ClassVar[tuple[str, ...]] = ()


# -- hosts (registered by their agents; cloud-wide) ----------------------------


class HostRegistered(ResourceEvent, frozen=True, tag="host.registered"):
    begins = True
    status = "enabled"
    name: str
    vcpus: int
    ram_mb: int
    disk_gb: int
    zone: str = "nova"
    labels: dict[str, str] = {}
    types: list[str] = msgspec.field(default_factory=lambda: ["vm", "container"])
    cpu_ratio: float = 4.0
    ram_ratio: float = 1.0
    disk_ratio: float = 1.0


class HostUpdated(ResourceEvent, frozen=True, tag="host.updated"):
    vcpus: int
    ram_mb: int
    disk_gb: int
    zone: str = "nova"
    labels: dict[str, str] = {}
    types: list[str] = msgspec.field(default_factory=lambda: ["vm", "container"])
    cpu_ratio: float = 4.0
    ram_ratio: float = 1.0
    disk_ratio: float = 1.0


class HostEnabled(ResourceEvent, frozen=True, tag="host.enabled"):
    status = "enabled"
    reason: str = ""


class HostDisabled(ResourceEvent, frozen=True, tag="host.disabled"):
    status = "disabled"
    reason: str = ""


class HostRemoved(ResourceEvent, frozen=True, tag="host.removed"):
    ends = True


# -- flavors (cloud-wide) --------------------------------------------------------


class FlavorCreated(ResourceEvent, frozen=True, tag="flavor.created"):
    begins = True
    status = "active"
    name: str
    vcpus: int
    ram_mb: int
    disk_gb: int = 0


class FlavorDeleted(ResourceEvent, frozen=True, tag="flavor.deleted"):
    ends = True


# -- images ------------------------------------------------------------------------


class ImageCreated(ResourceEvent, frozen=True, tag="image.created"):
    """An image usable at once: a record without bytes (its instances get a
    blank disk), or a snapshot whose bytes its host has already stored in
    the object store under ``checksum`` and verified."""

    begins = True
    status = "active"
    name: str
    format: str = "qcow2"
    size_bytes: int = 0
    checksum: str = ""
    visibility: str = "private"
    parent: str = ""
    min_disk_gb: int = 0
    # Free-form key/value properties (Glance's extra properties).
    properties: dict[str, str] = {}
    # An OCI image (format ``oci``): its layers and process; ``checksum``
    # is its config's digest. A snapshot of a container adds one layer.
    oci: OciConfig | None = None


class ImageQueued(ResourceEvent, frozen=True, tag="image.queued"):
    """An image waiting for its bytes: what they must be (``size_bytes``
    long, hashing to ``checksum``, of ``format``). Nothing boots it until
    ``image.activated``."""

    begins = True
    status = "queued"
    name: str
    format: str = "qcow2"
    size_bytes: int = 0
    checksum: str = ""
    visibility: str = "private"
    min_disk_gb: int = 0


class ImageUploading(ResourceEvent, frozen=True, tag="image.uploading"):
    """Bytes announced for an image that has none yet (Glance's two-step
    create: a record, then its file): what they are, as the OpenStack API
    received them. The image is queued for them, as ``image.queued`` queues
    one, until the image service has stored exactly these
    (``image.activated``). ``md5`` is the checksum Glance clients verify."""

    status = "queued"
    format: str
    size_bytes: int
    checksum: str
    md5: str = ""


class ImageActivated(ResourceEvent, frozen=True, tag="image.activated"):
    """The image service stored the uploaded bytes in the object store under
    ``checksum`` after checking them: the size and SHA-256 the image was
    queued with, and its format (``qemu-img info``). ``reason`` is emptied."""

    status = "active"
    size_bytes: int
    checksum: str
    min_disk_gb: int = 0
    reason: str = ""
    # An OCI archive's image (format ``oci``): its layers, each stored by
    # digest, and its process; ``checksum`` is then the config's digest.
    oci: OciConfig | None = None


class ImageUploadFailed(ResourceEvent, frozen=True, tag="image.upload-failed"):
    """An upload ended without storing anything: the bytes were refused, or
    the client stopped sending. The image stays queued for another upload."""

    status = "queued"
    reason: str


class ImageDeleted(ResourceEvent, frozen=True, tag="image.deleted"):
    ends = True


# -- servers -----------------------------------------------------------------------


class Nic(msgspec.Struct, frozen=True):
    """A server's network interface: its port, and the MAC the guest sees
    (the port's, so DHCP and the security groups know it)."""

    port: str
    mac: str


class ServerSpec(msgspec.Struct, frozen=True, kw_only=True):
    """What a server is asked to be, decided once by ``server create`` and
    carried whole from there: in ``server.requested``, in the scheduler's
    request (its filters read it), in ``host.claimed``, and in the compute
    agent's instance, which adds only what is local to its host. A field
    added here reaches each of them, and the servers view as a column.

    Ids, not names: ``image``, ``flavor`` (empty when sized by hand),
    ``networks``, ``security_groups`` and ``group`` were resolved by the
    decision; ``requested_host`` is ``--host``, where the server must go."""

    name: str
    image: str
    flavor: str = ""
    vcpus: int
    ram_mb: int
    disk_gb: int = 0
    instance_type: str = "vm"
    networks: list[str] = []
    security_groups: list[str] = []
    labels: dict[str, str] = {}
    requested_host: str = ""
    # One per network, in the order of ``networks``.
    nics: list[Nic] = []
    group: str = ""
    zone: str = ""
    # Free key/value pairs about the server (Nova's metadata); unlike
    # ``labels`` the scheduler does not read them.
    metadata: dict[str, str] = {}
    # Addresses its users reach it at, as they say (Nova's accessIPv4/v6).
    access_ipv4: str = ""
    access_ipv6: str = ""
    # A container's process (``--command``), in place of its image's
    # entrypoint and cmd; empty: the image's own.
    command: list[str] = []
    # A framework's task (events.frameworks): placed by accepting an offer,
    # never by the scheduler; its framework's id.
    framework: str = ""


SPEC_FIELDS = frozenset(ServerSpec.__struct_fields__)


def nest_spec(raw: dict[str, Any]) -> dict[str, Any]:
    """Upcaster of an event that carried the spec's fields at its top level
    (``server.requested`` and ``host.claimed`` version 1): they move into
    ``spec``; fields the old event lacked take the spec's defaults."""
    raw["spec"] = {f: raw.pop(f) for f in list(raw) if f in SPEC_FIELDS}
    return raw


class ServerRequested(ResourceEvent, frozen=True, tag="server.requested"):
    # 2: the spec nested whole (1 had its fields at the top level).
    version = 2
    begins = True
    status = "requested"
    spec: ServerSpec


class ServerScheduled(ResourceEvent, frozen=True, tag="server.scheduled"):
    status = "scheduled"
    host: str
    scheduling: dict = {}


class ServerBuilding(ResourceEvent, frozen=True, tag="server.building"):
    status = "building"
    host: str


class ServerRunning(ResourceEvent, frozen=True, tag="server.running"):
    status = "running"
    host: str
    disk: str = ""
    # A container's OCI runtime and its version (``runc 1.1.5``).
    runtime: str = ""


class ServerStopRequested(ResourceEvent, frozen=True, tag="server.stop-requested"):
    # Until the host's agent reports server.stopped.
    status = "stopping"


class ServerStartRequested(ResourceEvent, frozen=True, tag="server.start-requested"):
    # Until the host's agent reports server.running.
    status = "starting"


class ServerRebootRequested(ResourceEvent, frozen=True, tag="server.reboot-requested"):
    pass


class ServerStopped(ResourceEvent, frozen=True, tag="server.stopped"):
    status = "stopped"


class ServerFailed(ResourceEvent, frozen=True, tag="server.failed"):
    status = "error"
    reason: str
    host: str = ""
    # When the scheduler gave up: how many hosts each filter removed.
    scheduling: dict = {}


class ServerDeleting(ResourceEvent, frozen=True, tag="server.deleting"):
    """Asked to go; the compute agent of its host confirms with ``server.deleted``."""

    status = "deleting"


class ServerDeleted(ResourceEvent, frozen=True, tag="server.deleted"):
    ends = True


class ServerGroupCreated(ResourceEvent, frozen=True, tag="server-group.created"):
    begins = True
    status = "active"
    name: str
    policy: str


class ServerGroupDeleted(ResourceEvent, frozen=True, tag="server-group.deleted"):
    ends = True


# -- volumes -----------------------------------------------------------------------


class VolumeCreated(ResourceEvent, frozen=True, tag="volume.created"):
    begins = True
    status = "available"
    name: str
    size_gb: int


class VolumeAttached(ResourceEvent, frozen=True, tag="volume.attached"):
    status = "in-use"
    server: str


class VolumeDetached(ResourceEvent, frozen=True, tag="volume.detached"):
    status = "available"
    resets = ("server",)
    server: str


class VolumeDeleted(ResourceEvent, frozen=True, tag="volume.deleted"):
    ends = True


# -- networks ----------------------------------------------------------------------


class NetworkCreated(ResourceEvent, frozen=True, tag="network.created"):
    """A tenant network, or (tenant ``_system``) an external network whose
    addresses from ``pool_start`` to ``pool_end`` are floating IPs."""

    begins = True
    status = "active"
    name: str
    external: bool = False
    cidr: str = ""
    gateway: str = ""
    pool_start: str = ""
    pool_end: str = ""
    # A tenant network's VXLAN segment (from the segment pool); 0 before VNIs.
    vni: int = 0
    # "routed": a cloud-wide network for containers, routed by BGP with no
    # overlay (events/network.py); its hosts take blocks of this prefix length.
    mode: str = ""
    block_prefix: int = 0


class NetworkDeleted(ResourceEvent, frozen=True, tag="network.deleted"):
    ends = True


class SubnetCreated(ResourceEvent, frozen=True, tag="subnet.created"):
    begins = True
    status = "active"
    name: str
    network: str
    cidr: str
    gateway: str
    pool_start: str
    pool_end: str
    dns: list[str] = []
    ip_version: int = 4
    # Whether the subnet's VM ports get their addresses by DHCP.
    dhcp: bool = True


class SubnetDeleted(ResourceEvent, frozen=True, tag="subnet.deleted"):
    ends = True


class PortCreated(ResourceEvent, frozen=True, tag="port.created"):
    begins = True
    status = "down"
    name: str
    network: str
    subnet: str
    mac: str
    ip: str
    device: str = ""
    device_owner: str = ""
    security_groups: list[str] = []
    qos_policy: str = ""


class PortBound(ResourceEvent, frozen=True, tag="port.bound"):
    status = "active"
    host: str


class PortAddressAssigned(ResourceEvent, frozen=True, tag="port.address-assigned"):
    """A routed network's port bound to ``host`` with an address from one of
    that host's blocks (the binding and the address in one event)."""

    status = "active"
    host: str
    ip: str


class PortUpdated(ResourceEvent, frozen=True, tag="port.updated"):
    """The port's security groups and QoS policy after ``port set``."""

    security_groups: list[str]
    qos_policy: str = ""


class PortDeleted(ResourceEvent, frozen=True, tag="port.deleted"):
    ends = True


class RouterCreated(ResourceEvent, frozen=True, tag="router.created"):
    begins = True
    status = "active"
    name: str
    external_network: str = ""
    # The router's own address on the external network (its SNAT source).
    external_ip: str = ""
    # Administratively down: it routes nothing until set up again.
    admin_up: bool = True


class RouterAdminStateSet(ResourceEvent, frozen=True, tag="router.admin-state-set"):
    admin_up: bool


class RouterInterfaceAdded(ResourceEvent, frozen=True, tag="router.interface-added"):
    subnet: str
    port: str
    ip: str


class RouterInterfaceRemoved(ResourceEvent, frozen=True, tag="router.interface-removed"):
    subnet: str
    port: str


class RouterDeleted(ResourceEvent, frozen=True, tag="router.deleted"):
    ends = True


class FloatingIpCreated(ResourceEvent, frozen=True, tag="floating-ip.created"):
    begins = True
    status = "down"
    address: str
    network: str


class FloatingIpAssociated(ResourceEvent, frozen=True, tag="floating-ip.associated"):
    status = "active"
    port: str
    server: str
    fixed_ip: str


class FloatingIpDisassociated(ResourceEvent, frozen=True, tag="floating-ip.disassociated"):
    status = "down"
    resets = ("port", "server", "fixed_ip")
    port: str


class FloatingIpDeleted(ResourceEvent, frozen=True, tag="floating-ip.deleted"):
    ends = True


# On the external network's subject: the pool's own record of who holds
# which address, so two tenants can never be handed the same one.
class AddressAllocated(Event, frozen=True, tag="pool.address-allocated"):
    address: str
    holder_tenant: str
    holder: str


class AddressReleased(Event, frozen=True, tag="pool.address-released"):
    address: str
    holder_tenant: str
    holder: str


class SecurityGroupCreated(ResourceEvent, frozen=True, tag="security-group.created"):
    begins = True
    status = "active"
    name: str
    description: str = ""


class SecurityGroupRuleAdded(ResourceEvent, frozen=True, tag="security-group.rule-added"):
    rule: str
    direction: str
    protocol: str
    port_min: int = 0
    port_max: int = 0
    remote_cidr: str = ""
    remote_group: str = ""


class SecurityGroupRuleRemoved(ResourceEvent, frozen=True, tag="security-group.rule-removed"):
    rule: str


class SecurityGroupDeleted(ResourceEvent, frozen=True, tag="security-group.deleted"):
    ends = True


class QosPolicyCreated(ResourceEvent, frozen=True, tag="qos-policy.created"):
    begins = True
    status = "active"
    name: str
    max_kbps: int
    burst_kb: int = 0


class QosPolicyDeleted(ResourceEvent, frozen=True, tag="qos-policy.deleted"):
    ends = True


# -- renames (what OpenStack's update calls change) ----------------------------------


class Renamed(ResourceEvent, frozen=True):
    """A tenant resource's new name (and, for a security group, description)."""

    name: str


class NetworkRenamed(Renamed, frozen=True, tag="network.renamed"):
    pass


class SubnetRenamed(Renamed, frozen=True, tag="subnet.renamed"):
    pass


class RouterRenamed(Renamed, frozen=True, tag="router.renamed"):
    pass


class ImageRenamed(Renamed, frozen=True, tag="image.renamed"):
    pass


class SecurityGroupRenamed(Renamed, frozen=True, tag="security-group.renamed"):
    description: str = ""


RENAMED: dict[str, type[Renamed]] = {
    "network": NetworkRenamed,
    "subnet": SubnetRenamed,
    "router": RouterRenamed,
    "image": ImageRenamed,
    "security-group": SecurityGroupRenamed,
}


class QuotaSet(Event, frozen=True, tag="quota.set"):
    """The tenant's limits after the change (every resource, -1 unlimited)."""

    limits: dict[str, int]


EVENTS = (
    HostRegistered,
    HostUpdated,
    HostEnabled,
    HostDisabled,
    HostRemoved,
    FlavorCreated,
    FlavorDeleted,
    ImageCreated,
    ImageQueued,
    ImageUploading,
    ImageActivated,
    ImageUploadFailed,
    ImageDeleted,
    ServerRequested,
    ServerScheduled,
    ServerBuilding,
    ServerRunning,
    ServerStopRequested,
    ServerStartRequested,
    ServerRebootRequested,
    ServerStopped,
    ServerFailed,
    ServerDeleting,
    ServerDeleted,
    ServerGroupCreated,
    ServerGroupDeleted,
    VolumeCreated,
    VolumeAttached,
    VolumeDetached,
    VolumeDeleted,
    NetworkCreated,
    NetworkDeleted,
    SubnetCreated,
    SubnetDeleted,
    PortCreated,
    PortBound,
    PortAddressAssigned,
    PortUpdated,
    PortDeleted,
    RouterCreated,
    RouterInterfaceAdded,
    RouterInterfaceRemoved,
    RouterAdminStateSet,
    RouterDeleted,
    FloatingIpCreated,
    FloatingIpAssociated,
    FloatingIpDisassociated,
    FloatingIpDeleted,
    AddressAllocated,
    AddressReleased,
    SecurityGroupCreated,
    SecurityGroupRuleAdded,
    SecurityGroupRuleRemoved,
    SecurityGroupDeleted,
    QosPolicyCreated,
    QosPolicyDeleted,
    NetworkRenamed,
    SubnetRenamed,
    RouterRenamed,
    ImageRenamed,
    SecurityGroupRenamed,
    QuotaSet,
)

# (type, version) -> the upcaster to the next version (events.catalog registers them).
UPCASTERS = {("server.requested", 1): nest_spec}


# -- commands --------------------------------------------------------------------
#
# ``tenant`` is the tenant acted in; left out, it is the caller's own.


class TenantScoped(Command, frozen=True, kw_only=True):
    tenant: Name | None = None


class HostRegister(Command, frozen=True):
    name: Name
    vcpus: Positive
    ram_mb: Positive
    disk_gb: Positive
    zone: Name = "nova"
    labels: Labels = {}
    types: Annotated[list[InstanceType], msgspec.Meta(min_length=1, max_length=2)] = msgspec.field(
        default_factory=lambda: ["vm", "container"]
    )
    cpu_ratio: Ratio = 4.0
    ram_ratio: Ratio = 1.0
    disk_ratio: Ratio = 1.0


class HostSetEnabled(Command, frozen=True):
    name: Name
    reason: Text = ""


class HostRemove(Command, frozen=True):
    name: Name


class FlavorCreate(Command, frozen=True):
    name: Name
    vcpus: Positive
    ram_mb: Positive
    disk_gb: Count = 0


class FlavorDelete(Command, frozen=True):
    name: Name


PropertyKey = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.:-]{1,255}(?!\n)$")]
Properties = Annotated[
    dict[PropertyKey, Annotated[str, msgspec.Meta(max_length=255)]], msgspec.Meta(max_length=64)
]
Sha256 = Annotated[str, msgspec.Meta(pattern=r"^([0-9a-f]{64})?(?!\n)$")]


class ImageCreate(TenantScoped, frozen=True):
    name: ResourceName
    format: Literal["qcow2", "raw", "oci"] = "qcow2"
    size_bytes: Count = 0
    checksum: Sha256 = ""
    public: bool = False
    min_disk_gb: Count = 0
    properties: Properties = {}


class PublicImageCreate(ImageCreate, frozen=True):
    """A public image: cloud-wide, so its name is its id (``Name``)."""

    name: Name


class ImageUpload(TenantScoped, frozen=True):
    """Queue an image without bytes for these (see ``image.uploading``)."""

    ref: Ref
    size_bytes: Annotated[int, msgspec.Meta(ge=1, le=1 << 40)]
    checksum: Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{64}(?!\n)$")]
    format: Literal["qcow2", "raw"] = "qcow2"
    md5: Annotated[str, msgspec.Meta(pattern=r"^([0-9a-f]{32})?(?!\n)$")] = ""


Metadata = Annotated[
    dict[Annotated[str, msgspec.Meta(min_length=1, max_length=255)], Text],
    msgspec.Meta(max_length=128),
]


class ServerCreate(TenantScoped, frozen=True):
    name: ResourceName
    image: Ref
    flavor: Ref | None = None
    vcpus: Positive | None = None
    ram_mb: Positive | None = None
    disk_gb: Count | None = None
    instance_type: InstanceType = "vm"
    networks: Refs = []
    security_groups: Refs = []
    labels: Labels = {}
    host: Name | None = None
    group: Ref | None = None
    zone: Name | None = None
    metadata: Metadata = {}
    access_ipv4: Addr | None = None
    access_ipv6: Addr | None = None
    command: Annotated[
        list[Annotated[str, msgspec.Meta(max_length=4096, pattern=r"^[^\x00]*$")]],
        msgspec.Meta(max_length=256),
    ] = []


class ServerGroupCreate(TenantScoped, frozen=True):
    name: ResourceName
    policy: Literal["affinity", "anti-affinity"]


class VolumeCreate(TenantScoped, frozen=True):
    name: ResourceName
    size_gb: Positive


class VolumeAttach(TenantScoped, frozen=True):
    volume: Ref
    server: Ref


class NetworkCreate(TenantScoped, frozen=True):
    name: ResourceName
    external: bool = False
    cidr: Addr | None = None
    gateway: Addr | None = None
    pool_start: Addr | None = None
    pool_end: Addr | None = None


class ExternalNetworkCreate(NetworkCreate, frozen=True):
    """An external network: cloud-wide, so its name is its id (``Name``)."""

    name: Name


class SubnetCreate(TenantScoped, frozen=True):
    name: ResourceName
    network: Ref
    cidr: Addr
    gateway: Addr | None = None
    pool_start: Addr | None = None
    pool_end: Addr | None = None
    dns: Annotated[list[Addr], msgspec.Meta(max_length=4)] = []
    dhcp: bool = True


class PortCreate(TenantScoped, frozen=True):
    name: ResourceName
    network: Ref
    subnet: Ref | None = None
    ip: Addr | None = None
    security_groups: Refs = []
    qos_policy: Ref | None = None


class PortSet(TenantScoped, frozen=True):
    """Change a port's security groups and QoS policy (None: keep; "" clears the policy)."""

    ref: Ref
    security_groups: Refs | None = None
    qos_policy: Annotated[str, msgspec.Meta(pattern=r"^([A-Za-z0-9_.:-]{1,64})?(?!\n)$")] | None = (
        None
    )


class RouterCreate(TenantScoped, frozen=True):
    name: ResourceName
    external_network: Name | None = None
    admin_up: bool = True


class RouterSet(TenantScoped, frozen=True):
    """A router's administrative state (up: it routes)."""

    ref: Ref
    admin_up: bool


class RouterInterface(TenantScoped, frozen=True):
    router: Ref
    subnet: Ref


class FloatingIpCreate(TenantScoped, frozen=True):
    network: Name = "public"


class FloatingIpAssociate(TenantScoped, frozen=True):
    floating_ip: Ref
    server: Ref | None = None
    port: Ref | None = None


class SecurityGroupCreate(TenantScoped, frozen=True):
    name: ResourceName
    description: Text = ""
    # With Neutron's two default rules: all egress, IPv4 and IPv6.
    default_egress: bool = False


class SecurityGroupRuleAdd(TenantScoped, frozen=True):
    security_group: Ref
    direction: Literal["ingress", "egress"] = "ingress"
    protocol: Literal["tcp", "udp", "icmp", "any"] = "tcp"
    port_min: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 0
    port_max: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 0
    remote_cidr: Addr | None = None
    remote_group: Ref | None = None


class SecurityGroupRuleRemove(TenantScoped, frozen=True):
    security_group: Ref
    rule: Ref


class QosPolicyCreate(TenantScoped, frozen=True):
    name: ResourceName
    max_kbps: Positive
    burst_kb: Count = 0


class QuotaSetCommand(TenantScoped, frozen=True):
    limits: Annotated[
        dict[str, Annotated[int, msgspec.Meta(ge=-1, le=1 << 40)]], msgspec.Meta(max_length=32)
    ]


class RefCommand(TenantScoped, frozen=True):
    """A verb on one existing resource (delete, stop, ...)."""

    ref: Ref


class Rename(TenantScoped, frozen=True):
    """A new name (None: keep), and a security group's new description."""

    ref: Ref
    name: ResourceName | None = None
    description: Text | None = None


COMMANDS: dict[str, type[Command]] = {
    "host.register": HostRegister,
    "host.enable": HostSetEnabled,
    "host.disable": HostSetEnabled,
    "host.remove": HostRemove,
    "flavor.create": FlavorCreate,
    "flavor.delete": FlavorDelete,
    "image.create": ImageCreate,
    "image.create-public": PublicImageCreate,
    "image.delete": RefCommand,
    "image.upload": ImageUpload,
    "server.create": ServerCreate,
    "server.delete": RefCommand,
    "server.stop": RefCommand,
    "server.start": RefCommand,
    "server.reboot": RefCommand,
    "server-group.create": ServerGroupCreate,
    "server-group.delete": RefCommand,
    "volume.create": VolumeCreate,
    "volume.delete": RefCommand,
    "volume.attach": VolumeAttach,
    "volume.detach": VolumeAttach,
    "network.create": NetworkCreate,
    "network.create-external": ExternalNetworkCreate,
    "network.delete": RefCommand,
    "subnet.create": SubnetCreate,
    "subnet.delete": RefCommand,
    "port.create": PortCreate,
    "port.delete": RefCommand,
    "port.set": PortSet,
    "router.create": RouterCreate,
    "router.delete": RefCommand,
    "router.add-subnet": RouterInterface,
    "router.remove-subnet": RouterInterface,
    "router.set": RouterSet,
    "security-group.ensure-default": TenantScoped,
    "floating-ip.create": FloatingIpCreate,
    "floating-ip.delete": RefCommand,
    "floating-ip.associate": FloatingIpAssociate,
    "floating-ip.disassociate": RefCommand,
    "security-group.create": SecurityGroupCreate,
    "security-group.delete": RefCommand,
    "security-group.rule-add": SecurityGroupRuleAdd,
    "security-group.rule-remove": SecurityGroupRuleRemove,
    "qos-policy.create": QosPolicyCreate,
    "qos-policy.delete": RefCommand,
    "quota.set": QuotaSetCommand,
    **{f"{kind}.rename": Rename for kind in RENAMED},
}


class Quota(msgspec.Struct, frozen=True):
    """One limited resource: its built-in default (-1: unlimited), and how
    its usage is counted from the tenant's resources (rows of ``kind``, or
    the sum of their ``column``)."""

    default: int
    kind: str
    column: str | None = None


QUOTAS: dict[str, Quota] = {
    "instances": Quota(10, "server"),
    "vcpus": Quota(20, "server", "vcpus"),
    "ram_mb": Quota(51200, "server", "ram_mb"),
    "volumes": Quota(10, "volume"),
    "volume_gb": Quota(1000, "volume", "size_gb"),
    "networks": Quota(10, "network"),
    "subnets": Quota(10, "subnet"),
    "ports": Quota(50, "port"),
    "routers": Quota(10, "router"),
    "floating_ips": Quota(10, "floating-ip"),
    "security_groups": Quota(10, "security-group"),
}
QUOTA_DEFAULTS: dict[str, int] = {r: q.default for r, q in QUOTAS.items()}


def quota_report(tenant: str, limits: dict[str, int], used: dict[str, int]) -> dict:
    """What ``quota show`` and ``quota set`` answer."""
    return {
        "tenant": tenant,
        "quota": [{"resource": r, "limit": limits.get(r, -1), "in_use": used[r]} for r in QUOTAS],
    }
