"""Image files: checked with ``qemu-img info``, stored by content, used as
read-only bases under per-instance qcow2 overlays.

The image store is a directory of files named by their SHA-256 (what
``image.created`` records as ``checksum``), so an event names its file
without carrying a path, and two uploads of one file share it. Each host
keeps its own cache of the bases it uses; an instance's disk is an overlay
backed by the cached base, so creating one writes kilobytes, not a copy.

Images are tenants' data, and ``image create --file`` may run as root on
any file root can read: the store directory is 0700 and its files 0600
(read-only bases are immutable by name, not by mode), so only the service's
user reads them (libvirt relabels what a guest uses).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import threading
from pathlib import Path

import msgspec

from stratus.events.errors import HostError, Invalid

QEMU_IMG = "qemu-img"
FORMATS = ("qcow2", "raw")
SHA256_RE = re.compile(r"^[0-9a-f]{64}(?!\n)$")
# qemu-img on an untrusted file: bound its time and memory use.
INFO_TIMEOUT_S = 30
# Tenants' images: the service's user alone reads them.
STORE_DIR_MODE = 0o700
STORE_FILE_MODE = 0o600


class ImageError(HostError):
    """qemu-img refused or failed; the message is its own reason."""


class ImageFile(msgspec.Struct, frozen=True):
    """What ``image create`` records about a stored file."""

    path: str
    format: str
    size_bytes: int
    virtual_size: int
    checksum: str
    backing: str = ""


def part(path: Path) -> Path:
    """A temporary name beside ``path`` of this process and thread alone:
    two builds making the same cached file at once each write their own,
    and the atomic rename of either leaves a whole file."""
    return path.with_name(f".{path.name.lstrip('.')}.{os.getpid()}-{threading.get_ident()}.part")


def qemu_img(*args: str, timeout: float = 120) -> str:
    try:
        done = subprocess.run(
            [QEMU_IMG, *args], capture_output=True, text=True, timeout=timeout, check=False
        )
    except FileNotFoundError:
        raise ImageError("qemu-img is not installed (Debian package qemu-utils)") from None
    except subprocess.TimeoutExpired:
        raise ImageError(f"qemu-img {args[0]} took longer than {timeout}s") from None
    if done.returncode != 0:
        raise ImageError(done.stderr.strip() or f"qemu-img {args[0]} exited {done.returncode}")
    return done.stdout


def info(path: Path, fmt: str | None = None, chain: bool = False) -> dict | list:
    """``qemu-img info --output=json``; with ``chain``, one entry per layer."""
    args = ["info", "--output=json", "-U"]
    if fmt:
        args += ["-f", fmt]
    if chain:
        args.append("--backing-chain")
    return json.loads(qemu_img(*args, "--", str(path), timeout=INFO_TIMEOUT_S))


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def inspect(path: Path, claimed: str, store: Path) -> ImageFile:
    """Check that ``path`` is an image of format ``claimed``, or raise ``Invalid``.

    qemu-img probes the format itself (never told ``claimed``), so a raw
    file called qcow2 and a qcow2 called raw are both caught. A qcow2 whose
    backing file lies outside the image store is refused: booting it would
    read a file of the host nobody stored as an image.
    """
    if claimed not in FORMATS:
        raise Invalid(f"image format must be qcow2 or raw, not {claimed!r}")
    if not path.is_file():
        raise Invalid(f"{path} is not a file")
    try:
        probed = info(path)
    except ImageError as exc:
        raise Invalid(f"{path} is not a readable image: {exc}") from None
    assert isinstance(probed, dict)
    fmt = probed.get("format")
    if fmt != claimed:
        raise Invalid(f"{path} is a {fmt} image, not {claimed}")
    vsize = probed.get("virtual-size")
    if not isinstance(vsize, int) or vsize <= 0:
        raise Invalid(f"{path}: qemu-img reports no virtual size")
    backing = probed.get("full-backing-filename") or probed.get("backing-filename") or ""
    if backing:
        resolved = (path.parent / backing).resolve()
        if not resolved.is_relative_to(store.resolve()):
            raise Invalid(f"{path} is backed by {backing}, outside the image store {store}")
    return ImageFile(
        path=str(path),
        format=fmt,
        size_bytes=path.stat().st_size,
        virtual_size=vsize,
        checksum=sha256(path),
        backing=backing,
    )


def private_dir(store: Path) -> None:
    """The store directory, made or narrowed to the service's user alone
    (one made by an earlier version was 0755)."""
    store.mkdir(mode=STORE_DIR_MODE, parents=True, exist_ok=True)
    os.chmod(store, STORE_DIR_MODE)


def store_file(path: Path, claimed: str, store: Path) -> ImageFile:
    """Inspect ``path`` and put it in the image store under its checksum."""
    checked = inspect(path, claimed, store)
    private_dir(store)
    dest = store / checked.checksum
    if not dest.exists():
        tmp = part(dest)
        shutil.copyfile(path, tmp)
        os.chmod(tmp, STORE_FILE_MODE)
        os.replace(tmp, dest)
    else:
        os.chmod(dest, STORE_FILE_MODE)  # stored world-readable by an earlier version
    return msgspec.structs.replace(checked, path=str(dest))


def stored(store: Path, checksum: str) -> Path | None:
    """The store's file for ``checksum``, if it holds one."""
    if not SHA256_RE.match(checksum):
        return None
    p = store / checksum
    return p if p.is_file() else None


class BaseCache:
    """One host's read-only copies of the images its instances are built on."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self._sizes: dict[Path, int] = {}
        # Builds run in threads: the first to need a base makes it, the
        # others wait for it rather than copy and hash the same image again.
        self._making = threading.Lock()

    def virtual_size(self, path: Path, fmt: str) -> int:
        size = self._sizes.get(path)
        if size is None:
            probed = info(path, fmt)
            assert isinstance(probed, dict)
            size = self._sizes[path] = int(probed["virtual-size"])
        return size

    def base(self, store: Path, checksum: str, fmt: str, blank_gb: int = 1) -> tuple[Path, str]:
        """The cached base (path, format) for an image, fetched on first use.

        An image recorded without a file (no checksum, or not in the store)
        gets a blank qcow2 base of ``blank_gb``: the instance still has a
        real overlay disk, it just boots nothing (the test driver's case).
        """
        src = stored(store, checksum) if checksum else None
        if checksum and src is None:
            raise ImageError(f"image file {checksum} is not in the image store {store}")
        if src is None:
            path = self.root / f"blank-{max(1, blank_gb)}g.qcow2"
        else:
            path = self.root / f"{checksum}.{fmt}"
        if not path.exists():
            with self._making:
                if not path.exists():
                    self._make(path, src, checksum, max(1, blank_gb))
        return path, fmt if src is not None else "qcow2"

    @staticmethod
    def _make(path: Path, src: Path | None, checksum: str, blank_gb: int) -> None:
        tmp = part(path)
        if src is None:
            qemu_img("create", "-q", "-f", "qcow2", str(tmp), f"{blank_gb}G")
        else:
            try:
                os.link(src, tmp)  # same filesystem: the cache costs nothing
            except OSError:
                shutil.copyfile(src, tmp)
                os.chmod(tmp, STORE_FILE_MODE)
            if sha256(tmp) != checksum:
                tmp.unlink()
                raise ImageError(f"image file {src} does not match its checksum {checksum}")
        os.replace(tmp, path)


def create_overlay(
    base: Path, base_fmt: str, overlay: Path, size_gb: int = 0, base_size: int = 0
) -> None:
    """A qcow2 overlay backed by ``base``, grown to ``size_gb`` if that is
    larger than the base's virtual size ``base_size`` (bytes).

    A new overlay of a given base and size is the same few hundred kilobytes
    every time (header, backing path, empty tables), so ``qemu-img`` makes
    it once, as a template beside the base (bases are immutable: stored by
    checksum), and each instance gets a copy: no process per instance."""
    grow = f"{size_gb}G" if size_gb and size_gb * (1 << 30) > base_size else ""
    template = base.with_name(f".{base.name}.{base_fmt}.{grow or 'same'}.overlay")
    if not template.exists():
        args = ["create", "-q", "-f", "qcow2", "-b", str(base), "-F", base_fmt]
        tmp = part(template)
        qemu_img(*args, str(tmp), *([grow] if grow else []))
        os.replace(tmp, template)
    tmp = overlay.with_name(f".{overlay.name}.part")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    shutil.copyfile(template, tmp)
    os.replace(tmp, overlay)


def create_volume(path: Path, size_gb: int) -> None:
    """An empty qcow2 volume (sparse: it grows as the guest writes)."""
    if path.exists():
        return
    tmp = path.with_name(f".{path.name}.part")
    qemu_img("create", "-q", "-f", "qcow2", str(tmp), f"{size_gb}G")
    os.replace(tmp, path)


def snapshot(disk: Path, store: Path, parent: Path | None, parent_fmt: str, tag: str) -> ImageFile:
    """A new image in the store from an instance's ``disk``.

    Layered on ``parent`` (the server's image, already in the store) when it
    has one: the copy of the overlay keeps only what the instance changed
    and is re-pointed at the store's file. Without one it is flattened.
    """
    private_dir(store)
    tmp = store / f".snapshot-{tag}.part"
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    if parent is not None:
        shutil.copyfile(disk, tmp)
        # -u: the cached base and the store file are the same bytes.
        qemu_img("rebase", "-u", "-b", str(parent), "-F", parent_fmt, str(tmp))
    else:
        qemu_img("convert", "-O", "qcow2", str(disk), str(tmp))
    probed = info(tmp, "qcow2")
    assert isinstance(probed, dict)
    checksum = sha256(tmp)
    dest = store / checksum
    os.chmod(tmp, STORE_FILE_MODE)
    if dest.exists():
        tmp.unlink()
    else:
        os.replace(tmp, dest)
    return ImageFile(
        path=str(dest),
        format="qcow2",
        size_bytes=dest.stat().st_size,
        virtual_size=int(probed["virtual-size"]),
        checksum=checksum,
        backing=str(parent or ""),
    )
