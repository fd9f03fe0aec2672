"""The typed state the inventory decisions read: one record per resource kind.

A record holds what the log has said about one resource: the fields of the
event that began it, then whatever later events of its kind set. Fields
that only a later event fills (the host a server landed on, the server a
volume is attached to) start ``UNSET``: falsy, equal to no string, and left
out of a reply, so a reply shows what the log has said and nothing more.

Every record's fields are named as its events' fields are, so folding is
one rule for every kind (``begin`` and ``update``); the test
``test_records_hold_every_field_of_their_events`` fails when an event gains
a field its record does not keep.
"""

from __future__ import annotations

from functools import cache
from typing import Any, ClassVar, TypeVar

import msgspec
from msgspec import UNSET, UnsetType

from stratus.events.model import Event
from stratus.events.oci import OciConfig
from stratus.events.resources import SPEC_FIELDS, ServerSpec

DEFAULT_TYPES = ("vm", "container")


class Record(msgspec.Struct, kw_only=True):
    """What every record carries besides its kind's own fields (last, as
    keyword-only fields, so a reply lists them after the kind's own)."""

    kind: ClassVar[str]
    id: str = ""
    # Set for a tenant's resources; a cloud-wide object belongs to no tenant.
    tenant: str | UnsetType = UNSET
    status: str = ""

    @classmethod
    def label(cls) -> str:
        """The kind as a person reads it in a message ("security group")."""
        return cls.kind.replace("-", " ")

    def column(self, name: str) -> Any:
        """What the resource's row in its view holds in column ``name``."""
        return getattr(self, name)


R = TypeVar("R", bound=Record)


# -- cloud-wide objects --------------------------------------------------------------


class Host(Record):
    kind = "host"
    name: str
    vcpus: int
    ram_mb: int
    disk_gb: int
    zone: str = "nova"
    labels: dict[str, str] = {}
    types: list[str] = msgspec.field(default_factory=lambda: list(DEFAULT_TYPES))
    cpu_ratio: float = 4.0
    ram_ratio: float = 1.0
    disk_ratio: float = 1.0
    # Why it was last enabled or disabled.
    reason: str | UnsetType = UNSET


class Flavor(Record):
    kind = "flavor"
    name: str
    vcpus: int
    ram_mb: int
    disk_gb: int = 0


# -- a tenant's resources (images and networks are cloud-wide too: public
# images, external networks) -------------------------------------------------------


class Image(Record):
    kind = "image"
    name: str
    format: str = "qcow2"
    size_bytes: int = 0
    checksum: str = ""
    visibility: str = "private"
    parent: str = ""
    min_disk_gb: int = 0
    properties: dict[str, str] = {}
    # Glance's MD5 of the bytes (``image.uploading``: the two-step create).
    md5: str | UnsetType = UNSET
    # Why its last upload stored nothing ("" once active).
    reason: str | UnsetType = UNSET
    # An OCI image's layers and process (None: a disk image).
    oci: OciConfig | None = None


class Server(Record):
    """Its spec whole, as requested; shown flat (``view``), as its row in
    the servers view shows it."""

    kind = "server"
    spec: ServerSpec
    # From the scheduler and the compute agent.
    host: str | UnsetType = UNSET
    scheduling: dict | UnsetType = UNSET
    disk: str | UnsetType = UNSET
    reason: str | UnsetType = UNSET
    # A container's OCI runtime (``runc 1.1.5+ds1``).
    runtime: str | UnsetType = UNSET

    @property
    def name(self) -> str:
        return self.spec.name

    def column(self, name: str) -> Any:
        return getattr(self.spec, name) if name in SPEC_FIELDS else getattr(self, name)


class ServerGroup(Record):
    kind = "server-group"
    name: str
    policy: str


class Volume(Record):
    kind = "volume"
    name: str
    size_gb: int
    # The server it is attached to ("" once detached).
    server: str | UnsetType = UNSET


class Network(Record):
    kind = "network"
    name: str
    external: bool = False
    cidr: str = ""
    gateway: str = ""
    pool_start: str = ""
    pool_end: str = ""
    vni: int = 0
    # A cloud-wide routed network (handlers.routed), and its blocks' length.
    mode: str = ""
    block_prefix: int = 0


class Subnet(Record):
    kind = "subnet"
    name: str
    network: str
    cidr: str
    gateway: str
    pool_start: str
    pool_end: str
    dns: list[str] = []
    ip_version: int = 4
    dhcp: bool = True


class Port(Record):
    kind = "port"
    name: str
    network: str
    subnet: str
    mac: str
    ip: str
    device: str = ""
    device_owner: str = ""
    security_groups: list[str] = []
    qos_policy: str = ""
    # The host its network agent bound it on.
    host: str | UnsetType = UNSET


class Router(Record):
    kind = "router"
    name: str
    external_network: str = ""
    external_ip: str = ""
    admin_up: bool = True
    # subnet id -> the id of the router's port on it
    interfaces: dict[str, str] | UnsetType = UNSET


class FloatingIp(Record):
    kind = "floating-ip"
    address: str
    network: str
    # While associated ("" once disassociated).
    port: str | UnsetType = UNSET
    server: str | UnsetType = UNSET
    fixed_ip: str | UnsetType = UNSET


class Rule(msgspec.Struct):
    """One rule of a security group, as ``security-group.rule-added`` gave it."""

    rule: str
    direction: str
    protocol: str
    port_min: int = 0
    port_max: int = 0
    remote_cidr: str = ""
    remote_group: str = ""


class SecurityGroup(Record):
    kind = "security-group"
    name: str
    description: str = ""
    # rule id -> rule
    rules: dict[str, Rule] | UnsetType = UNSET


class QosPolicy(Record):
    kind = "qos-policy"
    name: str
    max_kbps: int
    burst_kb: int = 0


# Every kind with a record, by kind.
RECORDS: dict[str, type[Record]] = {cls.kind: cls for cls in Record.__subclasses__()}


# -- folding ---------------------------------------------------------------------------


def _fields(cls: type[msgspec.Struct]) -> tuple[str, ...]:
    return cls.payload_fields() if issubclass(cls, Event) else cls.__struct_fields__


@cache
def shared_fields(target: type[msgspec.Struct], source: type[msgspec.Struct]) -> tuple[str, ...]:
    """The fields of ``source`` that ``target`` has too (an event's own
    fields: its envelope is never carried)."""
    own = set(_fields(target))
    return tuple(f for f in _fields(source) if f in own)


def begin(record: type[R], event: Event, **extra: Any) -> R:
    """The record an event that begins a resource makes."""
    fields = {f: getattr(event, f) for f in shared_fields(record, type(event))}
    return record(**fields, id=event.aggregate.id, **extra)


def update(r: Record, event: Event) -> None:
    """Set on ``r`` every field the event carries."""
    for f in shared_fields(type(r), type(event)):
        setattr(r, f, getattr(event, f))


def view(r: Record) -> dict[str, Any]:
    """A record as callers see it: plain data, a server's spec flat, nested
    maps as lists in a stable order, fields no event has set left out."""
    out: dict[str, Any] = msgspec.to_builtins(r)
    spec = out.pop("spec", None)
    if spec is not None:
        out = {**spec, **out}  # a server's spec first, flat, as in its row
    if "rules" in out:
        out["rules"] = [out["rules"][k] for k in sorted(out["rules"])]
    if "interfaces" in out:
        out["interfaces"] = [{"subnet": k, "port": v} for k, v in sorted(out["interfaces"].items())]
    return out
