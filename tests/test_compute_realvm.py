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
from stratus.tests.compute_helpers import cleanup, place, unique_host, wait_for

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


def build_initramfs(path: Path) -> None:
    busybox = Path("/bin/busybox").read_bytes()
    d, f = stat.S_IFDIR | 0o755, stat.S_IFREG | 0o755
    archive = _newc(
        [
            ("bin", d, b"", 0),
            ("dev", d, b"", 0),
            # The console the kernel opens for init, before devtmpfs is up.
            ("dev/console", stat.S_IFCHR | 0o600, b"", (5 << 8) | 1),
            ("bin/busybox", f, busybox, 0),
            ("init", f, INIT.encode(), 0),
        ]
    )
    path.write_bytes(archive)


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


async def test_a_real_vm_boots_through_the_agent_to_its_init(libvirtd, store, shared_dir):
    kernels = sorted(glob.glob("/boot/vmlinuz-*"))
    assert kernels, "no kernel in /boot (Debian: linux-image-amd64)"
    initrd = shared_dir / "initramfs.cpio"
    build_initramfs(initrd)
    os.chmod(initrd, 0o644)
    host = unique_host()
    data = shared_dir / host
    agent = ComputeAgent(
        store,
        host,
        data_dir=data,
        image_store=shared_dir / "images",
        spec=HostSpec(vcpus=2, ram_mb=2048, disk_gb=10),
        vm=LibvirtDriver("qemu:///system", host),
        direct_boot=DirectBoot(
            kernel=kernels[-1], initrd=str(initrd), cmdline="console=ttyS0 panic=-1"
        ),
    )
    for d in (data, *data.iterdir()):
        os.chmod(d, 0o755)
    await agent.start()
    try:
        t0 = time.monotonic()
        sid = await place(store, host, ram_mb=256)
        evs = await wait_for(store, sid, "server.running", timeout=60)
        log = Path(agent.consoles / f"{sid}.log")
        deadline = time.monotonic() + 120
        text = ""
        while time.monotonic() < deadline:
            with contextlib.suppress(FileNotFoundError, PermissionError):
                text = await asyncio.to_thread(log.read_text, errors="replace")
            if MARKER in text:
                break
            await asyncio.sleep(0.5)
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
