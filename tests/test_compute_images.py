"""Image files through real qemu-img: what is refused and why, overlays that
cost kilobytes, and the pure parts (domain XML from checked values, the
host's desired state folded from its events)."""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from stratus.agents.compute import images
from stratus.agents.compute.desired import Desired, fold
from stratus.agents.compute.domain import NS, domain_xml
from stratus.agents.compute.spec import InstanceSpec
from stratus.events.compute import HostServerAction
from stratus.events.errors import Invalid
from stratus.events.ids import new_id
from stratus.events.network import vm_tap
from stratus.events.resources import SYSTEM, Nic
from stratus.events.scheduling import HostClaimed, HostReleased

from .compute_helpers import cause


def qcow2(path: Path, size: str = "16M", backing: Path | None = None, fmt: str = "raw") -> Path:
    args = ["create", "-q", "-f", "qcow2"]
    if backing is not None:
        args += ["-b", str(backing), "-F", fmt]
    images.qemu_img(*args, str(path), size)
    return path


@pytest.fixture
def store_dir(tmp_path):
    d = tmp_path / "store"
    d.mkdir()
    return d


def test_a_good_qcow2_is_stored_under_its_checksum(tmp_path, store_dir):
    src = qcow2(tmp_path / "a.qcow2")
    got = images.store_file(src, "qcow2", store_dir)
    assert got.format == "qcow2" and got.virtual_size == 16 << 20
    assert got.checksum == images.sha256(src)
    assert Path(got.path) == store_dir / got.checksum
    assert images.sha256(Path(got.path)) == got.checksum
    # Storing the same file again is the same entry, not a second one.
    assert images.store_file(src, "qcow2", store_dir) == got
    assert [p.name for p in store_dir.iterdir()] == [got.checksum]


@pytest.mark.parametrize(
    ("make", "claimed", "reason"),
    [
        (lambda d: _raw(d / "r.img"), "qcow2", "is a raw image, not qcow2"),
        (lambda d: qcow2(d / "q.qcow2"), "raw", "is a qcow2 image, not raw"),
        (lambda d: _truncated(d / "t.qcow2"), "qcow2", "not a readable image"),
        (lambda d: qcow2(d / "b.qcow2", backing=_raw(d / "secret")), "qcow2", "outside"),
        (lambda d: d / "missing.qcow2", "qcow2", "is not a file"),
        (lambda d: qcow2(d / "x.qcow2"), "vmdk", "must be qcow2 or raw"),
    ],
)
def test_malformed_images_are_refused_and_nothing_is_stored(
    tmp_path, store_dir, make, claimed, reason
):
    path = make(tmp_path)
    with pytest.raises(Invalid) as err:
        images.store_file(path, claimed, store_dir)
    assert reason in err.value.message
    assert list(store_dir.iterdir()) == []


def _raw(path: Path) -> Path:
    path.write_bytes(b"\xab" * 65536)
    return path


def _truncated(path: Path) -> Path:
    qcow2(path)
    path.write_bytes(path.read_bytes()[:40])  # the magic, then nothing
    return path


def test_a_backing_file_inside_the_store_is_accepted(tmp_path, store_dir):
    base = images.store_file(qcow2(tmp_path / "base.qcow2"), "qcow2", store_dir)
    layered = qcow2(tmp_path / "l.qcow2", backing=Path(base.path), fmt="qcow2")
    got = images.store_file(layered, "qcow2", store_dir)
    assert got.backing == base.path


def test_overlays_cost_kilobytes_and_chain_to_the_cached_base(tmp_path, store_dir):
    big = qcow2(tmp_path / "big.qcow2", size="8G")
    stored = images.store_file(big, "qcow2", store_dir)
    cache = images.BaseCache(tmp_path / "cache")
    base, fmt = cache.base(store_dir, stored.checksum, "qcow2")
    over = tmp_path / "o.qcow2"
    images.create_overlay(base, fmt, over, size_gb=10, base_size=cache.virtual_size(base, fmt))
    chain = images.info(over, chain=True)
    assert [c["filename"] for c in chain] == [str(over), str(base)]
    assert chain[0]["virtual-size"] == 10 << 30  # grown to the flavor's disk
    assert over.stat().st_size < 1 << 20
    # An image whose file is missing fails the build (no blank disk instead),
    # and a store file that no longer matches its checksum is never used.
    with pytest.raises(images.ImageError, match="not in the image store"):
        cache.base(store_dir, "0" * 64, "qcow2")
    (store_dir / ("1" * 64)).write_bytes(b"tampered")
    with pytest.raises(images.ImageError, match="does not match its checksum"):
        cache.base(store_dir, "1" * 64, "qcow2")
    assert not (cache.root / f"{'1' * 64}.qcow2").exists()


def spec(**kw) -> InstanceSpec:
    fields = {"server": new_id(), "tenant": "acme", "name": "web", "vcpus": 2, "ram_mb": 512}
    return InstanceSpec(**{**fields, **kw})


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
        name="s",
        image="i",
        vcpus=1,
        ram_mb=64,
        disk_gb=0,
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


def test_image_create_keeps_the_stored_file_from_other_users(tmp_path):
    """Issue 17: ``image create --file`` run as root stored any file root can
    read as 0444 in a 0755 directory, so any local user could read every
    tenant's private image. Through the CLI, as a user runs it: the store is
    0700 and its files 0600, also a store an earlier version left open."""
    import json
    import stat

    from .test_cli import cli, login, running_up

    private = _raw(tmp_path / "private.img")
    os.chmod(private, 0o600)
    store = tmp_path / "images"
    store.mkdir()
    os.chmod(store, 0o755)  # as an earlier version made it
    old = qcow2(tmp_path / "old.qcow2")
    stale = store / images.sha256(old)
    stale.write_bytes(old.read_bytes())
    os.chmod(stale, 0o444)
    with running_up(tmp_path) as up:
        url = up.start()
        login(url)
        assert cli(url, "tenant", "create", "acme").returncode == 0
        for name, path, fmt in (("private", private, "raw"), ("old", old, "qcow2")):
            r = cli(url, "image", "create", name, "--file", str(path), "--format", fmt,
                    "--image-store", str(store), "--tenant", "acme", "-o", "json")  # fmt: skip
            assert r.returncode == 0, r.stderr
            assert json.loads(r.stdout)["checksum"] == images.sha256(path)
    assert stat.S_IMODE(store.stat().st_mode) == 0o700
    files = sorted(p for p in store.iterdir() if not p.name.startswith("."))
    assert [p.name for p in files] == sorted([images.sha256(private), images.sha256(old)])
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in files)
    # A snapshot stored by the agent is kept the same way.
    shot = images.snapshot(
        qcow2(tmp_path / "disk.qcow2", backing=store / images.sha256(private)),
        store,
        None,
        "raw",
        "t1",
    )
    assert stat.S_IMODE(Path(shot.path).stat().st_mode) == 0o600
