"""OCI archives as the image service reads them: the busybox image built
here (no registry), a ``docker save`` form of it, an image made by umoci,
and hostile archives, each refused with the reason; and layers unpacked
the way overlayfs wants whiteouts."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest

from stratus.agents.compute import layers
from stratus.events import oci
from stratus.events.errors import Invalid
from stratus.ops.bench.ociimage import busybox_image, busybox_layer, entry, tar_of


def read(archive: Path, tmp: Path) -> oci.Archive:
    work = tmp / f"work-{archive.stem}"
    work.mkdir()
    return oci.read_archive(archive, work)


def test_the_busybox_layout_reads_with_its_config_and_every_digest(tmp_path):
    digest = busybox_image(tmp_path / "bb.tar", cmd=["sleep", "5"])
    a = read(tmp_path / "bb.tar", tmp_path)
    assert a.digest == digest
    assert a.config.cmd == ["sleep", "5"] and a.config.entrypoint == []
    assert a.config.argv() == ["sleep", "5"] and a.config.argv(["id"]) == ["id"]
    # Each blob is a verified copy: it hashes to its digest.
    for d, path in a.paths():
        assert hashlib.sha256(path.read_bytes()).hexdigest() == d
    assert set(a.blobs) == {digest, *a.config.layers}


def test_a_docker_save_archive_reads_to_the_same_layers(tmp_path):
    layer = busybox_layer()
    lid = hashlib.sha256(layer).hexdigest()
    config = {
        "config": {"Entrypoint": ["/bin/sh"], "Cmd": ["-c", "sleep 9"], "WorkingDir": "/tmp"},
        "rootfs": {"type": "layers", "diff_ids": [f"sha256:{lid}"]},
    }
    cfg = json.dumps(config).encode()
    cid = hashlib.sha256(cfg).hexdigest()
    manifest = [{"Config": f"{cid}.json", "RepoTags": ["bb:1"], "Layers": ["abc/layer.tar"]}]
    out = tmp_path / "saved.tar"
    with tarfile.open(out, "w") as tar:
        for name, data in (
            ("manifest.json", json.dumps(manifest).encode()),
            (f"{cid}.json", cfg),
            ("abc/layer.tar", layer),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    a = read(out, tmp_path)
    assert a.digest == cid and a.config.layers == [lid]
    assert a.config.argv() == ["/bin/sh", "-c", "sleep 9"] and a.config.working_dir == "/tmp"


@pytest.mark.skipif(not shutil.which("umoci"), reason="umoci is not installed")
def test_an_image_made_by_umoci_reads(tmp_path):
    # umoci's own layout (gzip layers), from a root file system it packs.
    layout = tmp_path / "layout"
    run = ["umoci", "--log", "error"]
    subprocess.run([*run, "init", "--layout", str(layout)], check=True)
    subprocess.run([*run, "new", "--image", f"{layout}:bb"], check=True)
    bundle = tmp_path / "bundle"
    subprocess.run([*run, "unpack", "--image", f"{layout}:bb", str(bundle)], check=True)
    (bundle / "rootfs" / "bin").mkdir()
    shutil.copy("/bin/busybox", bundle / "rootfs" / "bin" / "busybox")
    subprocess.run([*run, "repack", "--image", f"{layout}:bb", str(bundle)], check=True)
    subprocess.run(
        [*run, "config", "--image", f"{layout}:bb", "--config.cmd", "/bin/busybox"], check=True
    )
    archive = tmp_path / "umoci.tar"
    with tarfile.open(archive, "w") as tar:
        for p in sorted(layout.rglob("*")):
            tar.add(p, p.relative_to(layout).as_posix(), recursive=False)
    a = read(archive, tmp_path)
    assert a.config.cmd == ["/bin/busybox"] and len(a.config.layers) == 1
    # Its layer is gzip: the blob digest is not the diff_id, both are checked.
    assert a.config.layers[0] != a.config.diff_ids[0]


def hostile(kind: str) -> list[tarfile.TarInfo]:
    d = {"name": "x"}
    if kind == "traversal":
        return [entry("../../evil")]
    if kind == "absolute":
        return [entry("/etc/evil")]
    if kind == "symlink-escape":
        return [entry("etc", tarfile.SYMTYPE, link="/etc"), entry("etc/evil")]
    if kind == "relative-symlink-escape":
        return [entry("up", tarfile.SYMTYPE, link="../../.."), entry("up/evil")]
    if kind == "device":
        e = entry("dev/sda", tarfile.BLKTYPE, 0o600)
        e.devmajor, e.devminor = 8, 0
        return [e]
    if kind == "char-device":
        e = entry("dev/mem", tarfile.CHRTYPE, 0o600)
        e.devmajor, e.devminor = 1, 1
        return [e]
    if kind == "hardlink-outside":
        return [entry("shadow", tarfile.LNKTYPE, link="/etc/shadow")]
    if kind == "hardlink-unknown":
        return [entry("shadow", tarfile.LNKTYPE, link="etc/shadow")]
    if kind == "whiteout-dotdot":
        return [entry("etc", tarfile.DIRTYPE, 0o755), entry("etc/.wh..."), entry(".wh...")]
    if kind == "hardlink-to-dir":
        return [entry("d", tarfile.DIRTYPE, 0o755), entry("h", tarfile.LNKTYPE, link="d")]
    if kind == "replaces-symlink":
        return [entry("x", tarfile.SYMTYPE, link="/etc/passwd"), entry(d["name"])]
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind,why",
    [
        ("traversal", "'..' escape"),
        ("absolute", "absolute path"),
        ("symlink-escape", "beneath the layer's symlink"),
        ("relative-symlink-escape", "beneath the layer's symlink"),
        ("device", "device node"),
        ("char-device", "device node"),
        ("hardlink-outside", "absolute path"),
        ("hardlink-unknown", "outside the layer"),
        ("replaces-symlink", "replaces a symlink"),
        ("whiteout-dotdot", "names nothing it could hide"),
        ("hardlink-to-dir", "outside the layer"),
    ],
)
def test_a_hostile_layer_is_refused_with_its_reason(tmp_path, kind, why):
    out = tmp_path / "evil.tar"
    oci.write_layout(out, [busybox_layer(), tar_of(hostile(kind))], cmd=["sh"])
    with pytest.raises(Invalid, match=why):
        read(out, tmp_path)
    # And a host unpacking such bytes (were they ever stored) refuses too,
    # before anything lands outside its directory.
    blob = tmp_path / "layer.tar"
    blob.write_bytes(tar_of(hostile(kind)))
    with pytest.raises(Invalid, match=why):
        layers.unpack(blob, tmp_path / "unpacked")
    assert not (tmp_path / "evil").exists()


def _rewrite(archive: Path, out: Path, change) -> None:
    with tarfile.open(archive) as src, tarfile.open(out, "w") as dst:
        for m in src:
            data = src.extractfile(m).read() if m.isreg() else b""
            m, data = change(m, data)
            m.size = len(data)
            dst.addfile(m, io.BytesIO(data))


def test_wrong_digests_are_refused(tmp_path):
    busybox_image(tmp_path / "bb.tar")
    a = read(tmp_path / "bb.tar", tmp_path)
    lid = a.config.layers[0]

    def flip(m, data):  # one byte of the layer changed, its name kept
        if m.name == f"blobs/sha256/{lid}":
            data = data[:-1] + bytes([data[-1] ^ 1])
        return m, data

    _rewrite(tmp_path / "bb.tar", tmp_path / "flipped.tar", flip)
    with pytest.raises(Invalid, match="wrong digest"):
        read(tmp_path / "flipped.tar", tmp_path)

    # A layer whose bytes match its name but not the config's diff_id.
    other = tar_of([entry("etc", tarfile.DIRTYPE, 0o755)])
    oid = hashlib.sha256(other).hexdigest()

    def swap(m, data):
        if m.name == f"blobs/sha256/{lid}":
            m.name, data = f"blobs/sha256/{oid}", other
        elif m.name.startswith("blobs/") and data.startswith(b"{"):
            data = data.replace(lid.encode(), oid.encode())
        return m, data

    _rewrite(tmp_path / "bb.tar", tmp_path / "swapped.tar", swap)
    with pytest.raises(Invalid, match="wrong digest"):
        read(tmp_path / "swapped.tar", tmp_path)

    (tmp_path / "junk.tar").write_bytes(b"not a tar at all" * 100)
    with pytest.raises(Invalid, match="not a tar"):
        read(tmp_path / "junk.tar", tmp_path)


def test_unpacking_turns_whiteouts_into_overlayfs_form(tmp_path):
    top = tar_of(
        [
            entry("etc/.wh.image-release"),
            entry("var", tarfile.DIRTYPE, 0o755),
            entry("var/.wh..wh..opq"),
            entry("var/new"),
            entry("bin/hard", tarfile.LNKTYPE, link="var/new"),
        ],
        {"var/new": b"fresh\n"},
    )
    blob = tmp_path / "top.tar"
    blob.write_bytes(top)
    dest = tmp_path / "top"
    layers.unpack(blob, dest)
    st = os.lstat(dest / "etc" / "image-release")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(0, 0)
    assert os.getxattr(dest / "var", layers.OPAQUE_XATTR) == b"y"
    assert not (dest / "var" / ".wh..wh..opq").exists()
    assert os.stat(dest / "bin" / "hard").st_ino == os.stat(dest / "var" / "new").st_ino
    # And back: a commit of that directory holds the OCI whiteouts again.
    digest, size = layers.commit(dest, tmp_path / "again.tar")
    assert size == (tmp_path / "again.tar").stat().st_size
    with tarfile.open(tmp_path / "again.tar") as tar:
        names = set(tar.getnames())
    assert {"etc/.wh.image-release", "var/.wh..wh..opq", "var/new"} <= names
    assert oci.diff_id(tmp_path / "again.tar") == digest
