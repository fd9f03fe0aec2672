"""Image files through real qemu-img: what is refused and why, a host's
cache filled from the object store, overlays that cost kilobytes, and the
pure parts (domain XML from checked values, the
host's desired state folded from its events)."""

from __future__ import annotations

import asyncio
import io
import os
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from stratus.agents.compute import images
from stratus.agents.compute.desired import Desired, fold
from stratus.agents.compute.domain import NS, domain_xml
from stratus.agents.compute.spec import InstanceSpec
from stratus.events.blobs import BlobStore
from stratus.events.compute import HostServerAction
from stratus.events.errors import Invalid
from stratus.events.ids import new_id
from stratus.events.network import vm_tap
from stratus.events.resources import SPEC_FIELDS, SYSTEM, Nic, ServerSpec
from stratus.events.scheduling import HostClaimed, HostReleased

from .compute_helpers import cause


def qcow2(path: Path, size: str = "16M", backing: Path | None = None, fmt: str = "raw") -> Path:
    args = ["create", "-q", "-f", "qcow2"]
    if backing is not None:
        args += ["-b", str(backing), "-F", fmt]
    images.qemu_img(*args, str(path), size)
    return path


def test_a_good_qcow2_passes_with_its_size_and_checksum(tmp_path):
    src = qcow2(tmp_path / "a.qcow2")
    got = images.inspect(src, "qcow2")
    assert got.format == "qcow2" and got.virtual_size == 16 << 20
    assert got.checksum == images.sha256(src) and got.size_bytes == src.stat().st_size
    assert images.min_disk_gb(got.virtual_size) == 1


@pytest.mark.parametrize(
    ("make", "claimed", "reason"),
    [
        (lambda d: _raw(d / "r.img"), "qcow2", "is a raw image, not qcow2"),
        (lambda d: qcow2(d / "q.qcow2"), "raw", "is a qcow2 image, not raw"),
        (lambda d: _truncated(d / "t.qcow2"), "qcow2", "not a readable image"),
        (lambda d: qcow2(d / "b.qcow2", backing=_raw(d / "secret")), "qcow2", "backing file"),
        (lambda d: _data_file(d), "qcow2", "data in another file"),
        (lambda d: d / "missing.qcow2", "qcow2", "is not a file"),
        (lambda d: qcow2(d / "x.qcow2"), "vmdk", "must be qcow2 or raw"),
    ],
)
def test_malformed_images_are_refused(tmp_path, make, claimed, reason):
    path = make(tmp_path)
    with pytest.raises(Invalid) as err:
        images.inspect(path, claimed)
    assert reason in err.value.message


def _raw(path: Path) -> Path:
    path.write_bytes(b"\xab" * 65536)
    return path


def _truncated(path: Path) -> Path:
    qcow2(path)
    path.write_bytes(path.read_bytes()[:40])  # the magic, then nothing
    return path


def _data_file(d: Path) -> Path:
    """A qcow2 whose guest data lives in another file of the host."""
    images.qemu_img(
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        f"data_file={d / 'host-file'}",
        str(d / "e.qcow2"),
        "1M",
    )
    return d / "e.qcow2"


def test_a_layer_must_name_exactly_the_backing_file_it_is_recorded_with(tmp_path):
    base = qcow2(tmp_path / "base.qcow2")
    layer = images.Layer(images.sha256(base), "qcow2")
    base.rename(tmp_path / layer.name)  # as a host's cache holds it
    snap = tmp_path / "s.qcow2"
    images.qemu_img("create", "-q", "-f", "qcow2", "-b", layer.name, "-F", "qcow2", str(snap))
    assert images.inspect(snap, "qcow2", backing=layer.name).backing == layer.name
    with pytest.raises(Invalid, match="backed by"):
        images.inspect(snap, "qcow2", backing="0" * 64 + ".qcow2")
    with pytest.raises(Invalid, match="backing file"):
        images.inspect(snap, "qcow2")


async def test_overlays_cost_kilobytes_on_a_base_fetched_once_and_checked(store, tmp_path):
    blobs = await BlobStore.open(store.js)

    async def opener() -> BlobStore:
        return blobs

    big = qcow2(tmp_path / "big.qcow2", size="8G")
    layer = images.Layer(images.sha256(big), "qcow2")
    await blobs.put(layer.checksum, io.BytesIO(big.read_bytes()))
    cache = images.BaseCache(tmp_path / "cache", opener)
    # Two builds at once: one fetch.
    first, second = await asyncio.gather(cache.fetch([layer]), cache.fetch([layer]))
    assert first == second == cache.path(layer) and cache.fetched == 1
    assert images.sha256(first) == layer.checksum
    assert oct(first.stat().st_mode & 0o777) == "0o600"
    # Nobody else lists the cache or reads its files (qemu may traverse it).
    assert oct(cache.root.stat().st_mode & 0o777) == "0o711"
    over = tmp_path / "o.qcow2"
    images.create_overlay(
        first, "qcow2", over, size_gb=10, base_size=cache.virtual_size(first, "qcow2")
    )
    chain = images.info(over, chain=True)
    assert [c["filename"] for c in chain] == [str(over), str(first)]
    assert chain[0]["virtual-size"] == 10 << 30  # grown to the flavor's disk
    assert over.stat().st_size < 1 << 20
    # An image whose bytes are not in the store fails the build (no blank
    # disk instead), and bytes that are not of the recorded format never
    # reach the cache.
    with pytest.raises(images.ImageError, match="no object"):
        await cache.fetch([images.Layer("0" * 64, "qcow2")])
    raw = _raw(tmp_path / "r.img")
    wrong = images.Layer(images.sha256(raw), "qcow2")
    await blobs.put(wrong.checksum, io.BytesIO(raw.read_bytes()))
    with pytest.raises(images.ImageError, match="raw image, not qcow2"):
        await cache.fetch([wrong])
    assert not cache.path(wrong).exists()
    assert not [p for p in cache.root.iterdir() if p.name.endswith(".part")]


def spec(**kw) -> InstanceSpec:
    """An instance of a 2-vCPU, 512 MB server; ``kw`` sets its spec's fields or the host's."""
    asked = {"name": "web", "image": "", "vcpus": 2, "ram_mb": 512}
    asked.update({k: kw.pop(k) for k in list(kw) if k in SPEC_FIELDS})
    fields = {"server": new_id(), "tenant": "acme", **kw}
    return InstanceSpec(requested=ServerSpec(**asked), **fields)


def test_domain_xml_carries_limits_and_ownership_as_elements():
    s = spec(name="<script>&'", disk="/d/o.qcow2", console_log="/d/c.log")
    root = ET.fromstring(domain_xml(s, "h1", "test"))
    assert root.findtext("name") == f"stratus-{s.server}"
    assert root.findtext("uuid") == s.server
    assert root.findtext("title") == "<script>&'"  # text, never markup
    meta = root.find(f"metadata/{{{NS}}}instance")
    assert meta is not None and meta.get("host") == "h1" and meta.get("server") == s.server
    assert root.findtext("vcpu") == "2" and root.findtext("memory") == str(512 * 1024)
    assert root.findtext("cputune/shares") == "2048"
    assert root.findtext("cputune/quota") == "200000"
    assert root.findtext("cputune/period") == "100000"
    assert int(root.findtext("memtune/hard_limit")) > 512 * 1024
    assert root.find("devices/disk/source").get("file") == "/d/o.qcow2"
    assert root.find("devices/serial/log").get("file") == "/d/c.log"


def test_a_vm_nic_is_a_tap_named_after_its_port_with_the_port_mac():
    port = new_id()
    s = spec(nics=[Nic(port=port, mac="fa:16:3e:01:02:03")])
    iface = ET.fromstring(domain_xml(s, "h1", "test")).find("devices/interface")
    assert iface is not None and iface.get("type") == "ethernet"
    assert iface.find("mac").get("address") == "fa:16:3e:01:02:03"
    # The name the network agent looks for: the same function on both sides.
    assert iface.find("target").get("dev") == vm_tap(port)
    assert len(vm_tap(port)) <= 15 and vm_tap(port) != vm_tap(new_id())


@pytest.mark.parametrize(
    "bad",
    [
        {"server": "../../etc"},
        {"server": "a b"},
        {"vcpus": 0},
        {"vcpus": 100000},
        {"ram_mb": 0},
        {"instance_type": "lxc"},
        {"disk": "relative/path.qcow2"},
        {"kernel": "/boot/vmlinuz\0x"},
        {"volumes": {"../v": "/x"}},
        {"nics": [Nic(port="../p", mac="fa:16:3e:01:02:03")]},
        {"nics": [Nic(port="p1", mac="fa:16:3e:01:02:03'/><x")]},
        {"nics": [Nic(port="p1", mac="01:00:5e:00:00:01")]},  # multicast
    ],
)
def test_unsafe_values_never_reach_the_xml(bad):
    with pytest.raises(Invalid):
        domain_xml(spec(**bad), "h1")


def _claim(host: str, server: str) -> HostClaimed:
    return cause().make(
        HostClaimed,
        SYSTEM,
        "host",
        host,
        server=server,
        server_tenant="acme",
        spec=ServerSpec(name="s", image="i", vcpus=1, ram_mb=64),
    )


def _act(host: str, server: str, action: str, **kw) -> HostServerAction:
    return cause().make(
        HostServerAction,
        SYSTEM,
        "host",
        host,
        server=server,
        server_tenant="acme",
        action=action,
        **kw,
    )


def test_desired_state_is_the_fold_of_the_host_subject():
    a, b, c = new_id(), new_id(), new_id()
    events = [
        _claim("h", a),
        _claim("h", b),
        _claim("h", c),
        _act("h", a, "stop"),
        _act("h", b, "attach-volume", volume="v1", size_gb=3),
        _act("h", b, "delete"),
        cause().make(HostReleased, SYSTEM, "host", "h", server=c, server_tenant="acme"),
        _act("h", a, "attach-volume", volume="v2", size_gb=1),
        _act("h", new_id(), "start"),  # not on this host: ignored
    ]
    d = Desired()
    for seq, ev in enumerate(events, 1):
        fold(d, ev, seq)
    assert list(d.instances) == [a]
    assert d.instances[a].power == "stopped"
    assert d.instances[a].volumes == {"v2": 1}
    assert d.seq == len(events)
    fold(d, _act("h", a, "start"))
    assert d.instances[a].power == "running"


def test_a_snapshot_file_is_kept_from_other_users(tmp_path):
    """Issue 17: images are tenants' data, and no other local user may read
    them. A snapshot an agent makes is 0600 like every cached base (see
    ``test_overlays_cost_kilobytes_on_a_base_fetched_once_and_checked``; the
    image service's spool is checked in ``test_images``)."""
    import stat

    private = _raw(tmp_path / "private.img")
    os.chmod(private, 0o600)
    disk = qcow2(tmp_path / "disk.qcow2", backing=private)
    shot = images.snapshot(disk, tmp_path, None, "t1")
    assert stat.S_IMODE(Path(shot.path).stat().st_mode) == 0o600
