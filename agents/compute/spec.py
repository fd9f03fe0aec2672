"""One instance as the agent wants it: validated values only.

Everything that reaches libvirt XML, a cgroup path, a namespace name or a
command line goes through ``InstanceSpec``: the server's spec as the log
gave it (``requested``, the ``ServerSpec`` of its claim) and what the agent
adds on its own host. Its fields are checked here once, so the drivers
never see a value straight from an event.
"""

from __future__ import annotations

import re
import uuid

import msgspec

from stratus.events.errors import Invalid
from stratus.events.network import check_mac
from stratus.events.resources import ServerSpec

ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]{0,63}(?!\n)$")
MAX_VCPUS = 256
MAX_RAM_MB = 1 << 22  # 4 TiB
MAX_VOLUMES = 16
MAX_NICS = 16
MAX_LAYERS = 64
# Paths that may reach an overlay mount's options: no "," or ":" in them.
SAFE_PATH_RE = re.compile(r"^/[A-Za-z0-9._/+-]{1,1024}(?!\n)$")


class InstanceSpec(msgspec.Struct, frozen=True, kw_only=True):
    server: str
    tenant: str
    requested: ServerSpec
    # Host-local, filled by the agent: the overlay disk, the serial log,
    # attached volumes (volume id -> qcow2 path, in attach order).
    disk: str = ""
    console_log: str = ""
    volumes: dict[str, str] = {}
    # Container instances: CPU as a fraction of cores (defaults to vcpus)
    # and the command their PID 1 runs.
    cpu: float = 0.0
    command: list[str] = []
    # Containers from OCI images: the unpacked layer directories (lowest
    # first) their root is an overlay of, and the image's process settings.
    layers: list[str] = []
    env: list[str] = []
    cwd: str = ""
    user: str = ""
    # VMs booted straight into a kernel (the host's direct-boot setting):
    # absolute paths, and the kernel command line.
    kernel: str = ""
    initrd: str = ""
    cmdline: str = ""

    @property
    def cpus(self) -> float:
        return self.cpu or float(self.requested.vcpus)


def check(spec: InstanceSpec) -> InstanceSpec:
    """``spec`` if every field is safe to hand to a driver, else ``Invalid``."""
    want = spec.requested
    if not ID_RE.match(spec.server):
        raise Invalid(f"server id {spec.server!r} is not an id")
    if not ID_RE.match(spec.tenant) and spec.tenant != "_system":
        raise Invalid(f"tenant {spec.tenant!r} is not a tenant name")
    if not 1 <= want.vcpus <= MAX_VCPUS:
        raise Invalid(f"vcpus {want.vcpus} outside 1..{MAX_VCPUS}")
    if not 1 <= want.ram_mb <= MAX_RAM_MB:
        raise Invalid(f"ram_mb {want.ram_mb} outside 1..{MAX_RAM_MB}")
    if want.instance_type not in ("vm", "container"):
        raise Invalid(f"instance type {want.instance_type!r} is neither vm nor container")
    if not 0 <= spec.cpu <= MAX_VCPUS:
        raise Invalid(f"cpu {spec.cpu} outside 0..{MAX_VCPUS}")
    if len(spec.volumes) > MAX_VOLUMES or not all(ID_RE.match(v) for v in spec.volumes):
        raise Invalid("volumes: at most 16, named by their ids")
    for path in (spec.kernel, spec.initrd, spec.disk, spec.console_log):
        if path and (not path.startswith("/") or "\0" in path or len(path) > 4096):
            raise Invalid(f"{path!r} is not an absolute path")
    if len(spec.cmdline) > 4096 or "\0" in spec.cmdline:
        raise Invalid("kernel command line: at most 4096 characters, no NUL")
    if any("\0" in a for a in spec.command) or len(spec.command) > 256:
        raise Invalid("command: at most 256 arguments without NUL bytes")
    if len(spec.layers) > MAX_LAYERS or not all(SAFE_PATH_RE.match(p) for p in spec.layers):
        raise Invalid(f"layers: at most {MAX_LAYERS} absolute paths of [A-Za-z0-9._/+-]")
    if len(spec.env) > 1024 or any("\0" in e or "=" not in e for e in spec.env):
        raise Invalid("env: at most 1024 NAME=value entries without NUL bytes")
    if "\0" in spec.cwd or "\0" in spec.user or len(spec.cwd) > 4096 or len(spec.user) > 64:
        raise Invalid("working dir and user: no NUL bytes")
    if len(want.nics) > MAX_NICS:
        raise Invalid(f"nics: at most {MAX_NICS}")
    for nic in want.nics:
        if not ID_RE.match(nic.port):
            raise Invalid(f"port id {nic.port!r} is not an id")
        check_mac(nic.mac)
    return spec


def domain_uuid(server: str) -> str | None:
    """The server id as the domain's UUID when it is one (UUIDv7 ids are)."""
    try:
        return str(uuid.UUID(server))
    except ValueError:
        return None
