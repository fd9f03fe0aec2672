"""Libvirt domains for VM instances: XML from a checked spec, and the
operations the agent needs, with libvirt's errors turned into ``HostError``.

Ownership: every domain Stratus defines is named ``stratus-<server id>`` and
carries a ``<stratus:instance>`` metadata element naming its host. Only
those are listed as this host's instances; anything else on the hypervisor
(the test driver's own ``test`` domain, an operator's VM) is left alone.
"""

from __future__ import annotations

import contextlib
import threading
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from stratus.agents.compute.driver import ExecResult, PowerState
from stratus.agents.compute.spec import InstanceSpec, check, domain_uuid
from stratus.events.errors import HostError
from stratus.events.network import vm_tap

NS = "https://stratus.dev/xmlns/compute/1"
PREFIX = "stratus-"
# Guest RAM plus what the hypervisor process needs beyond it: the hard limit
# must leave room for qemu itself or the kernel kills it at the guest's size.
# Under TCG (domain type qemu) its translation cache needs far more.
MEM_OVERHEAD_KIB = 256 * 1024
TCG_OVERHEAD_KIB = 1024 * 1024
CPU_PERIOD_US = 100_000
SHARES_PER_VCPU = 1024
VOLUME_TARGETS = [f"vd{chr(c)}" for c in range(ord("b"), ord("z") + 1)]

ET.register_namespace("stratus", NS)


def domain_name(server: str) -> str:
    return PREFIX + server


CAP_SYS_RESOURCE = 24


def can_raise_memlock() -> bool:
    """Whether this process (and so a libvirtd beside it) may raise
    RLIMIT_MEMLOCK: libvirt sets it to a domain's memory hard limit, and
    fails the start without CAP_SYS_RESOURCE (containers often drop it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> CAP_SYS_RESOURCE & 1)
    except (OSError, ValueError):
        pass
    return False


def domain_xml(
    spec: InstanceSpec, host: str, domain_type: str = "qemu", hard_limit: bool = True
) -> str:
    """The domain for ``spec``, built as a tree (no user text is ever parsed).

    Without ``hard_limit`` the memory cap is a soft limit (reclaimed first
    under pressure) instead of a hard one."""
    check(spec)
    want = spec.requested
    dom = ET.Element("domain", type=domain_type)
    ET.SubElement(dom, "name").text = domain_name(spec.server)
    uid = domain_uuid(spec.server)
    if uid:
        ET.SubElement(dom, "uuid").text = uid
    ET.SubElement(dom, "title").text = want.name
    meta = ET.SubElement(dom, "metadata")
    ET.SubElement(
        meta,
        f"{{{NS}}}instance",
        server=spec.server,
        tenant=spec.tenant,
        host=host,
        name=want.name,
    )
    ET.SubElement(dom, "memory", unit="KiB").text = str(want.ram_mb * 1024)
    ET.SubElement(dom, "vcpu").text = str(want.vcpus)
    # CPU and memory limits are the cgroups libvirt puts the domain in.
    tune = ET.SubElement(dom, "cputune")
    ET.SubElement(tune, "shares").text = str(SHARES_PER_VCPU * want.vcpus)
    ET.SubElement(tune, "period").text = str(CPU_PERIOD_US)
    ET.SubElement(tune, "quota").text = str(CPU_PERIOD_US * want.vcpus)
    mem = ET.SubElement(dom, "memtune")
    overhead = TCG_OVERHEAD_KIB if domain_type == "qemu" else MEM_OVERHEAD_KIB
    limit = "hard_limit" if hard_limit else "soft_limit"
    ET.SubElement(mem, limit, unit="KiB").text = str(want.ram_mb * 1024 + overhead)
    os_el = ET.SubElement(dom, "os")
    ET.SubElement(os_el, "type", arch="x86_64").text = "hvm"
    if spec.kernel:
        ET.SubElement(os_el, "kernel").text = spec.kernel
        if spec.initrd:
            ET.SubElement(os_el, "initrd").text = spec.initrd
        if spec.cmdline:
            ET.SubElement(os_el, "cmdline").text = spec.cmdline
    else:
        ET.SubElement(os_el, "boot", dev="hd")
    devices = ET.SubElement(dom, "devices")
    if spec.disk:
        devices.append(_disk(spec.disk, "vda"))
    for target, path in zip(VOLUME_TARGETS, spec.volumes.values(), strict=False):
        devices.append(_disk(path, target))
    for nic in want.nics:
        # An unmanaged-by-libvirt network: libvirt makes the tap when the
        # guest starts and the network agent puts it on the bridge.
        iface = ET.SubElement(devices, "interface", type="ethernet")
        ET.SubElement(iface, "mac", address=nic.mac)
        ET.SubElement(iface, "target", dev=vm_tap(nic.port))
        ET.SubElement(iface, "model", type="virtio")
    serial = ET.SubElement(devices, "serial", type="pty")
    if spec.console_log:
        ET.SubElement(serial, "log", file=spec.console_log, append="on")
    ET.SubElement(serial, "target", port="0")
    return ET.tostring(dom, encoding="unicode")


def _disk(path: str, target: str) -> ET.Element:
    disk = ET.Element("disk", type="file", device="disk")
    ET.SubElement(disk, "driver", name="qemu", type="qcow2")
    ET.SubElement(disk, "source", file=path)
    ET.SubElement(disk, "target", dev=target, bus="virtio")
    return disk


def _owner(xml: str) -> dict[str, str] | None:
    el = ET.fromstring(xml).find(f"metadata/{{{NS}}}instance")
    return dict(el.attrib) if el is not None else None


class LibvirtDriver:
    """VM instances of one host on one libvirt connection (blocking calls:
    the agent runs them in a thread)."""

    def __init__(
        self,
        uri: str,
        host: str,
        domain_type: str | None = None,
        hard_limit: bool | None = None,
    ) -> None:
        import libvirt

        self.libvirt: Any = libvirt
        # libvirt prints every error to stderr by default; ours are reported.
        libvirt.registerErrorHandler(lambda *_: None, None)
        self.uri = uri
        self.host = host
        self.domain_type = domain_type or ("test" if uri.startswith("test:") else "qemu")
        if hard_limit is None:
            hard_limit = self.domain_type == "test" or can_raise_memlock()
        self.hard_limit = hard_limit
        self._lock = threading.Lock()
        try:
            self.conn = libvirt.open(uri)
        except libvirt.libvirtError as exc:
            raise HostError(f"cannot open libvirt {uri}: {exc.get_error_message()}") from None

    def close(self) -> None:
        try:
            self.conn.close()
        except self.libvirt.libvirtError:
            pass

    def capacity(self) -> tuple[int, int]:
        """(CPUs, RAM in MiB) libvirt reports for the node."""
        info = self.conn.getInfo()
        return int(info[2]), int(info[1])

    def _call(self, fn: Any, *args: Any) -> Any:
        try:
            with self._lock:
                return fn(*args)
        except self.libvirt.libvirtError as exc:
            raise HostError(exc.get_error_message() or str(exc)) from None

    def _lookup(self, server: str) -> Any | None:
        """This host's domain of ``server``; None if there is none (or it is
        not Stratus's: a foreign domain with our name is never touched)."""
        try:
            with self._lock:
                dom = self.conn.lookupByName(domain_name(server))
                owner = _owner(dom.XMLDesc(0))
        except self.libvirt.libvirtError as exc:
            if exc.get_error_code() == self.libvirt.VIR_ERR_NO_DOMAIN:
                return None
            raise HostError(exc.get_error_message()) from None
        if owner is None or owner.get("host") != self.host:
            return None
        return dom

    def list_owned(self) -> dict[str, PowerState]:
        """server id -> ``running`` or ``stopped`` for this host's domains."""
        out: dict[str, PowerState] = {}
        for dom in self._call(self.conn.listAllDomains, 0):
            if not dom.name().startswith(PREFIX):
                continue
            try:
                owner = _owner(dom.XMLDesc(0))
                active = dom.isActive()
            except self.libvirt.libvirtError:
                continue  # vanished while we looked
            if owner and owner.get("host") == self.host and owner.get("server"):
                out[owner["server"]] = "running" if active else "stopped"
        return out

    def state(self, server: str) -> PowerState | None:
        dom = self._lookup(server)
        if dom is None:
            return None
        return "running" if self._call(dom.isActive) else "stopped"

    def ensure(self, spec: InstanceSpec, running: bool = True) -> None:
        """Defined (and running if ``running``), whatever state it was in."""
        dom = self._lookup(spec.server)
        if dom is None:
            dom = self._call(
                self.conn.defineXML, domain_xml(spec, self.host, self.domain_type, self.hard_limit)
            )
        if running and not self._call(dom.isActive):
            self._call(dom.create)

    def stop(self, server: str) -> None:
        dom = self._lookup(server)
        if dom is not None and self._call(dom.isActive):
            # Power off: a guest that ignores ACPI must not block the agent.
            self._call(dom.destroy)

    def start(self, spec: InstanceSpec) -> None:
        self.ensure(spec, running=True)

    def reboot(self, spec: InstanceSpec) -> None:
        dom = self._lookup(spec.server)
        if dom is None or not self._call(dom.isActive):
            self.ensure(spec)
            return
        self._call(dom.reboot, 0)

    def remove(self, server: str) -> None:
        dom = self._lookup(server)
        if dom is None:
            return
        if self._call(dom.isActive):
            self._call(dom.destroy)
        self._call(dom.undefine)

    @contextlib.contextmanager
    def paused(self, server: str) -> Iterator[None]:
        """The domain suspended meanwhile (its disk is not written under us)."""
        dom = self._lookup(server)
        active = dom is not None and self._call(dom.isActive)
        if active:
            self._call(dom.suspend)
        try:
            yield
        finally:
            if active:
                self._call(dom.resume)

    def volumes(self, server: str) -> list[str]:
        """The files of the disks defined beside the root disk (``vda``)."""
        dom = self._lookup(server)
        if dom is None:
            return []
        desc = ET.fromstring(self._call(dom.XMLDesc, self.libvirt.VIR_DOMAIN_XML_INACTIVE))
        out = []
        for disk in desc.findall("devices/disk"):
            src, target = disk.find("source"), disk.find("target")
            if (
                src is not None
                and src.get("file")
                and (target is None or target.get("dev") != "vda")
            ):
                out.append(src.get("file", ""))
        return out

    def exec(self, server: str, command: list[str], timeout: float) -> ExecResult:
        raise HostError("exec runs in container instances only, not in VMs")

    @property
    def runtime_version(self) -> str:
        return ""  # a VM's runtime is its domain: nothing to record

    def commit(self, server: str, out: Path) -> tuple[str, int]:
        raise HostError("a VM's snapshot is of its disk (paused), not a layer")

    def attach(self, spec: InstanceSpec, volume: str, path: str) -> None:
        """Attach ``path`` as the next virtio disk, live and in the definition."""
        dom = self._lookup(spec.server)
        if dom is None:
            raise HostError(f"server {spec.server} has no domain on {self.host}")
        desc = ET.fromstring(self._call(dom.XMLDesc, self.libvirt.VIR_DOMAIN_XML_INACTIVE))
        disks = desc.findall("devices/disk")
        sources = {src.get("file") for d in disks if (src := d.find("source")) is not None}
        if path in sources:
            return  # attached already
        used = {t.get("dev") for d in disks if (t := d.find("target")) is not None}
        free = [t for t in VOLUME_TARGETS if t not in used]
        if not free:
            raise HostError(f"server {spec.server} has no free disk slot for volume {volume}")
        disk = _disk(path, free[0])
        self._change_disk(dom, ET.tostring(disk, encoding="unicode"), attach=True)

    def detach(self, spec: InstanceSpec, path: str) -> None:
        dom = self._lookup(spec.server)
        if dom is None:
            return
        desc = ET.fromstring(self._call(dom.XMLDesc, self.libvirt.VIR_DOMAIN_XML_INACTIVE))
        for disk in desc.findall("devices/disk"):
            src = disk.find("source")
            if src is not None and src.get("file") == path:
                self._change_disk(dom, ET.tostring(disk, encoding="unicode"), attach=False)

    def _change_disk(self, dom: Any, xml: str, attach: bool) -> None:
        lv = self.libvirt
        flags = lv.VIR_DOMAIN_AFFECT_CONFIG
        if self._call(dom.isActive):
            flags |= lv.VIR_DOMAIN_AFFECT_LIVE
        fn = dom.attachDeviceFlags if attach else dom.detachDeviceFlags
        try:
            with self._lock:
                fn(xml, flags)
            return
        except lv.libvirtError as exc:
            if exc.get_error_code() != lv.VIR_ERR_NO_SUPPORT:
                raise HostError(exc.get_error_message()) from None
        # Drivers without hotplug (the test driver): change the definition,
        # which the domain boots with next time.
        desc = ET.fromstring(self._call(dom.XMLDesc, lv.VIR_DOMAIN_XML_INACTIVE))
        devices = desc.find("devices")
        if devices is None:
            devices = ET.SubElement(desc, "devices")
        wanted = ET.fromstring(xml)
        src = wanted.find("source")
        path = src.get("file") if src is not None else None
        if attach:
            devices.append(wanted)
        else:
            for disk in devices.findall("disk"):
                s = disk.find("source")
                if s is not None and s.get("file") == path:
                    devices.remove(disk)
        self._call(self.conn.defineXML, ET.tostring(desc, encoding="unicode"))
