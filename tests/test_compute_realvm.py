"""A real VM booted through the compute agent: libvirtd (started here if it
is not running) with qemu:///system, TCG (domain type qemu: the nested KVM
here hangs guests, see DESIGN.md), Debian's kernel and an initramfs this
test builds around busybox-static. The guest's init prints a marker on the
serial console; the agent's console log file must show it."""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import shutil
import stat
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from stratus.agents.compute.agent import ComputeAgent, DirectBoot, HostSpec
from stratus.agents.compute.domain import LibvirtDriver
from stratus.events import network as nw

from .compute_helpers import cleanup, place, unique_host, wait_for

pytestmark = pytest.mark.timeout(240)

MARKER = "stratus-guest-init-reached"
SOCKET = Path("/run/libvirt/libvirt-sock")
INIT = f"""#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev
/bin/busybox mount -t devtmpfs dev /dev
/bin/busybox echo {MARKER} > /dev/ttyS0
/bin/busybox echo {MARKER}
exec /bin/busybox sleep 3600
"""


def _newc(entries: list[tuple[str, int, bytes, int]]) -> bytes:
    """A cpio archive in the kernel's newc format: (name, mode, data, rdev)."""
    out = bytearray()
    for ino, (name, mode, data, rdev) in enumerate([*entries, ("TRAILER!!!", 0, b"", 0)], 1):
        encoded = name.encode() + b"\0"
        fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev >> 8, rdev & 0xFF, len(encoded), 0]
        out += b"070701" + b"".join(f"{f:08x}".encode() for f in fields) + encoded
        out += b"\0" * (-len(out) % 4) + data + b"\0" * (-len(data) % 4)
    return bytes(out)


def build_initramfs(path: Path, init: str = INIT, files: dict[str, bytes] | None = None) -> None:
    """busybox and ``init``, plus ``files`` (path in the guest -> content)."""
    busybox = Path("/bin/busybox").read_bytes()
    d, f = stat.S_IFDIR | 0o755, stat.S_IFREG | 0o755
    extra = files or {}
    parents = {str(a) for p in extra for a in Path(p).parents}
    dirs = sorted(parents - {"bin", "dev", "."})
    archive = _newc(
        [
            ("bin", d, b"", 0),
            ("dev", d, b"", 0),
            *((name, d, b"", 0) for name in dirs),
            # The console the kernel opens for init, before devtmpfs is up.
            ("dev/console", stat.S_IFCHR | 0o600, b"", (5 << 8) | 1),
            ("bin/busybox", f, busybox, 0),
            ("init", f, init.encode(), 0),
            *((name, f, data, 0) for name, data in extra.items()),
        ]
    )
    path.write_bytes(archive)


def modules_for(kernel: str, wanted: list[str]) -> list[Path]:
    """The module files ``wanted`` needs, dependencies first (modules.dep)."""
    version = Path(kernel).name.removeprefix("vmlinuz-")
    root = Path("/lib/modules") / version
    deps: dict[str, list[str]] = {}
    paths: dict[str, Path] = {}
    for line in (root / "modules.dep").read_text().splitlines():
        mod, _, rest = line.partition(":")
        name = Path(mod).name.removesuffix(".ko")
        paths[name] = root / mod
        deps[name] = [Path(x).name.removesuffix(".ko") for x in rest.split()]
    order: list[str] = []

    def visit(name: str) -> None:
        if name in order:
            return
        for dep in deps[name]:
            visit(dep)
        order.append(name)

    for w in wanted:
        visit(w)
    return [paths[m] for m in order]


@pytest.fixture(scope="module")
def libvirtd(tmp_path_factory):
    """libvirtd for qemu:///system: the running one, or one started here."""
    started: list[subprocess.Popen[bytes]] = []
    if not _answers():
        logs = tmp_path_factory.mktemp("libvirtd")
        for daemon in ("virtlogd", "libvirtd"):
            started.append(
                subprocess.Popen(
                    [daemon],
                    stdout=open(logs / f"{daemon}.log", "wb"),
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
            time.sleep(0.5)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not _answers():
            time.sleep(0.2)
        if not _answers():
            for p in started:
                p.terminate()
            pytest.fail("libvirtd did not start (Debian: libvirt-daemon-system, qemu-system-x86)")
    yield
    for p in reversed(started):
        p.terminate()
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)


def _answers() -> bool:
    if not SOCKET.exists():
        return False
    import libvirt

    try:
        libvirt.open("qemu:///system").close()
        return True
    except libvirt.libvirtError:
        return False


@pytest.fixture
def shared_dir():
    """A directory libvirt's qemu user can reach (pytest's tmp is root-only)."""
    d = Path(tempfile.mkdtemp(prefix="stratus-realvm-", dir="/var/tmp"))
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


async def console_until(log: Path, markers: list[str], timeout: float) -> str:
    """The guest's serial log once it shows one of ``markers`` (or the timeout)."""
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        with contextlib.suppress(FileNotFoundError, PermissionError):
            text = await asyncio.to_thread(log.read_text, errors="replace")
        if any(m in text for m in markers):
            break
        await asyncio.sleep(0.5)
    return text


def real_agent(
    store, host: str, shared_dir: Path, kernel: str, initrd: Path, cmdline: str
) -> ComputeAgent:
    """A compute agent on qemu:///system booting VMs straight into ``kernel``."""
    data = shared_dir / host
    agent = ComputeAgent(
        store,
        host,
        data_dir=data,
        spec=HostSpec(vcpus=2, ram_mb=2048, disk_gb=10),
        vm=LibvirtDriver("qemu:///system", host),
        direct_boot=DirectBoot(kernel=kernel, initrd=str(initrd), cmdline=cmdline),
    )
    # libvirt's qemu user reads the disks and writes the console log there.
    for d in (data, *data.iterdir()):
        os.chmod(d, 0o755)
    return agent


async def test_a_real_vm_boots_through_the_agent_to_its_init(libvirtd, store, shared_dir):
    kernels = sorted(glob.glob("/boot/vmlinuz-*"))
    assert kernels, "no kernel in /boot (Debian: linux-image-amd64)"
    initrd = shared_dir / "initramfs.cpio"
    build_initramfs(initrd)
    os.chmod(initrd, 0o644)
    host = unique_host()
    agent = real_agent(store, host, shared_dir, kernels[-1], initrd, "console=ttyS0 panic=-1")
    await agent.start()
    try:
        t0 = time.monotonic()
        sid = await place(store, host, ram_mb=256)
        evs = await wait_for(store, sid, "server.running", timeout=60)
        text = await console_until(agent.consoles / f"{sid}.log", [MARKER], 120)
        booted = time.monotonic() - t0
        assert MARKER in text, text[-2000:]
        assert "Linux version" in text
        print(f"real VM (TCG) reached init {booted:.1f}s after its claim")
        dom = agent.drivers["vm"].conn.lookupByName(f"stratus-{sid}")
        assert dom.isActive()
        xml = dom.XMLDesc(0)
        assert "<domain type='qemu'" in xml
        # Hard where libvirt may raise RLIMIT_MEMLOCK to it, else soft (this
        # container lacks CAP_SYS_RESOURCE); CPU limits either way.
        limit = "hard_limit" if agent.drivers["vm"].hard_limit else "soft_limit"
        assert f"<{limit} unit='KiB'>" in xml and "<quota>100000</quota>" in xml
        assert evs[-1].disk and await asyncio.to_thread(os.path.exists, evs[-1].disk)
    finally:
        await cleanup(agent)


# The guest loads virtio-net (a module in Debian's kernel), asks DHCP for its
# address and pings the router the lease names, saying how on the console.
DHCP_INIT = """#!/bin/busybox sh
B=/bin/busybox
$B mkdir -p /proc /sys /dev /tmp
$B mount -t devtmpfs dev /dev
$B mount -t proc proc /proc
for m in MODULES; do $B insmod /lib/modules/$m.ko; done
$B ip link set lo up
$B ip link set eth0 up
if $B udhcpc -i eth0 -f -q -n -t 40 -T 2 -O mtu -s /bin/lease.sh > /dev/null 2>&1; then
  echo "stratus-lease $(cat /tmp/lease)" > /dev/ttyS0
  if $B ping -c 3 -W 2 "$(cat /tmp/router)" > /dev/null 2>&1; then
    echo stratus-ping-ok > /dev/ttyS0
  else
    echo stratus-ping-failed > /dev/ttyS0
  fi
else
  echo stratus-no-lease > /dev/ttyS0
fi
exec $B sleep 3600
"""
LEASE_SCRIPT = """#!/bin/busybox sh
case "$1" in
  bound|renew)
    /bin/busybox ip addr add "$ip/$mask" dev "$interface"
    echo "ip=$ip router=$router mtu=$mtu" > /tmp/lease
    echo "$router" > /tmp/router
    ;;
esac
exit 0
"""


async def test_a_real_vm_gets_its_address_by_dhcp_and_pings_its_router(libvirtd, store, shared_dir):
    """The whole path: a tenant network with a router, a VM server claimed on
    a simulated host, libvirt's tap wired by that host's network agent, and
    dnsmasq (on the router host, across VXLAN) answering the real guest."""
    from stratus.events.resources import RouterCreate, RouterInterface
    from stratus.handlers import routers
    from stratus.ops.bench.netlab import running_lab

    kernel = sorted(glob.glob("/boot/vmlinuz-*"))[-1]
    mods = modules_for(kernel, ["virtio_pci", "virtio_net"])
    init = DHCP_INIT.replace("MODULES", " ".join(p.stem for p in mods))
    files = {f"lib/modules/{p.name}": p.read_bytes() for p in mods}
    files["bin/lease.sh"] = LEASE_SCRIPT.encode()
    initrd = shared_dir / "initramfs-dhcp.cpio"
    build_initramfs(initrd, init, files)
    os.chmod(initrd, 0o644)
    names = sorted([unique_host(), unique_host()])
    router_host, vm_host = names
    async with running_lab(store, 2, names) as lab:
        agent = None
        try:
            await lab.start_agents(routers=router_host)
            c = lab.cloud
            await c.tenant("acme")
            await c.network("acme", "net", "10.0.0.0/24")
            await c.do(
                "acme",
                routers.decide_router_create,
                routers.RouterPlan(RouterCreate(tenant="acme", name="e"), None),
            )
            iface = RouterInterface(tenant="acme", router="e", subnet="net-sub")
            await c.do("acme", routers.decide_router_add_subnet, iface)
            agent = real_agent(store, vm_host, shared_dir, kernel, initrd, "console=ttyS0")
            await agent.start()
            t0 = time.monotonic()
            sid = await c.server(
                "acme", "vm1", vm_host, ["net"], instance_type="vm", claim=True, ram_mb=256
            )
            port = c.port_of("acme", sid)
            await wait_for(store, sid, "server.running", timeout=60, tenant="acme")
            ends = ["stratus-ping-", "stratus-no-lease"]
            text = await console_until(agent.consoles / f"{sid}.log", ends, 180)
            print(f"real VM (TCG): DHCP and ping done {time.monotonic() - t0:.1f}s after its claim")
            assert f"stratus-lease ip={port.ip} router=10.0.0.1 mtu=1450" in text, text[-3000:]
            assert "stratus-ping-ok" in text, text[-3000:]
            dom = agent.drivers["vm"].conn.lookupByName(f"stratus-{sid}")
            assert f"<target dev='{nw.vm_tap(port.id)}'" in dom.XMLDesc(0)
        finally:
            if agent is not None:
                await cleanup(agent)
