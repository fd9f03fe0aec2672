"""A host's images: fetched from the object store into a local cache on
first use, checked, and used as read-only bases under per-instance qcow2
overlays; and the snapshots the host makes of its instances' disks.

The cache is a directory of files named by their SHA-256 and format
(``<checksum>.<format>``), the name ``image.created``/``image.activated``
records, so every host names the same bytes the same way. A snapshot is a
qcow2 backed by its parent image under that relative name, so it resolves
in any host's cache once the parent is fetched beside it. An instance's
disk is an overlay backed by the cached base: creating one writes
kilobytes, not a copy. The cache's files are the agent's alone (0600); its
directory can be listed by nobody else, but traversed (0711): with
``qemu:///system`` libvirt hands each file of a domain's backing chain to
the qemu user, which must still reach it by its path.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import threading
import weakref
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path

import msgspec

from stratus.events.blobs import BlobStore
from stratus.events.errors import Invalid, NotFound
from stratus.events.imagefile import (  # noqa: F401 (the agent's names for them)
    FORMATS,
    SHA256_RE,
    ImageError,
    ImageFile,
    info,
    inspect,
    min_disk_gb,
    qemu_img,
    sha256,
)
from stratus.events.model import Event
from stratus.events.oci import OciConfig
from stratus.events.resources import (
    ImageActivated,
    ImageCreated,
    ImageDeleted,
    ImageQueued,
)

# Snapshots of snapshots: a chain longer than this is refused.
MAX_CHAIN = 16


class Layer(msgspec.Struct, frozen=True):
    """One image of a backing chain: the bytes (by digest) and their format."""

    checksum: str
    format: str

    @property
    def name(self) -> str:
        """Its file name in every host's cache (and a snapshot's backing name)."""
        return f"{self.checksum}.{self.format}"


class ImageRecord(msgspec.Struct):
    """What an agent needs of an image, folded from its events."""

    id: str
    name: str = ""
    status: str = ""
    format: str = "qcow2"
    checksum: str = ""
    parent: str = ""
    # An OCI image's layers and process (its bytes are those layers).
    oci: OciConfig | None = None

    @property
    def layer(self) -> Layer | None:
        if self.oci is not None:
            return None
        return Layer(self.checksum, self.format) if self.checksum else None


def fold_image(image_id: str, events: Iterable[Event]) -> ImageRecord | None:
    """The image's record after ``events`` (of its subject), or None."""
    r: ImageRecord | None = None
    for ev in events:
        if isinstance(ev, ImageCreated | ImageQueued):
            r = ImageRecord(
                id=image_id,
                name=ev.name,
                status=ev.status or "",
                format=ev.format,
                checksum=ev.checksum,
                parent=getattr(ev, "parent", ""),
                oci=getattr(ev, "oci", None),
            )
        elif isinstance(ev, ImageActivated) and r is not None:
            r.status, r.checksum = "active", ev.checksum
            r.oci = ev.oci or r.oci
        elif isinstance(ev, ImageDeleted):
            r = None
    return r


def part(path: Path) -> Path:
    """A temporary name beside ``path`` of this process and thread alone:
    two builds making the same cached file at once each write their own,
    and the atomic rename of either leaves a whole file."""
    return path.with_name(f".{path.name.lstrip('.')}.{os.getpid()}-{threading.get_ident()}.part")


CACHE_MODE = 0o711


def private_dir(path: Path, mode: int = CACHE_MODE) -> Path:
    path.mkdir(mode=mode, parents=True, exist_ok=True)
    os.chmod(path, mode)
    return path


class BaseCache:
    """One host's read-only copies of the images its instances are built on."""

    def __init__(self, root: Path, blobs: Callable[[], Awaitable[BlobStore]]) -> None:
        self.root = private_dir(root)
        self._blobs = blobs
        self._sizes: dict[Path, int] = {}
        # Builds of one image at once: the first fetches it, the others wait
        # for it rather than fetch and check the same bytes again.
        self._fetching: weakref.WeakValueDictionary[str, asyncio.Lock] = (
            weakref.WeakValueDictionary()
        )
        self._blank = threading.Lock()
        # Objects fetched from the store since start (the rest came from the cache).
        self.fetched = 0

    def path(self, layer: Layer) -> Path:
        return self.root / layer.name

    def virtual_size(self, path: Path, fmt: str) -> int:
        size = self._sizes.get(path)
        if size is None:
            probed = info(path, fmt)
            assert isinstance(probed, dict)
            size = self._sizes[path] = int(probed["virtual-size"])
        return size

    def blank(self, gb: int) -> Path:
        """A blank qcow2 base of ``gb`` GiB, for images without bytes (the
        instance still gets a real overlay disk, it just boots nothing)."""
        path = self.root / f"blank-{max(1, gb)}g.qcow2"
        with self._blank:
            if not path.exists():
                tmp = part(path)
                qemu_img("create", "-q", "-f", "qcow2", str(tmp), f"{max(1, gb)}G")
                os.chmod(tmp, 0o600)
                os.replace(tmp, path)
        return path

    async def fetch(self, chain: list[Layer]) -> Path:
        """The cached file of ``chain[0]``, whose backing file is ``chain[1]``
        and so on: each layer fetched on first use, its digest checked, and
        ``qemu-img`` asked that it is of its format and backed by exactly the
        next layer's cache name (the last by nothing)."""
        if not chain or len(chain) > MAX_CHAIN:
            raise ImageError(f"an image chain of {len(chain)} layers is not allowed")
        for i in reversed(range(len(chain))):
            backing = chain[i + 1].name if i + 1 < len(chain) else ""
            await self._one(chain[i], backing)
        return self.path(chain[0])

    async def _one(self, layer: Layer, backing: str) -> None:
        path = self.path(layer)
        if path.exists():
            return
        lock = self._fetching.get(layer.checksum)
        if lock is None:
            lock = self._fetching[layer.checksum] = asyncio.Lock()
        async with lock:
            if path.exists():
                return
            tmp = part(path)
            blobs = await self._blobs()
            try:
                await blobs.get_file(layer.checksum, tmp)
                await asyncio.to_thread(inspect, tmp, layer.format, backing, layer.checksum)
            except (Invalid, NotFound) as exc:
                # Bytes missing, corrupt or not what the image says: the
                # build fails with the reason. (``Unavailable``, the broker
                # gone for a moment, is raised as is: the agent retries.)
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
                raise ImageError(f"image {layer.checksum[:12]}: {exc.message}") from None
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
                raise
            os.replace(tmp, path)
            self.fetched += 1

    def keep(self, made: Path, layer: Layer) -> Path:
        """Move a file this host made (a snapshot) into the cache as ``layer``."""
        path = self.path(layer)
        os.chmod(made, 0o600)
        os.replace(made, path)
        return path


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


def snapshot(disk: Path, workdir: Path, parent: Layer | None, tag: str) -> ImageFile:
    """A new image file in ``workdir`` (the cache, where ``parent`` is) from
    an instance's ``disk``, checked as any fetched image is.

    Layered on ``parent`` (the server's image) when it has one: a copy of
    the overlay keeps only what the instance changed and is re-pointed at
    the parent's cache name, relative, so the same file works on every host
    that fetches the parent beside it. Without one it is flattened.
    """
    if not tag.replace("-", "").isalnum():
        raise Invalid(f"not a snapshot tag: {tag!r}")
    tmp = workdir / f".snapshot-{tag}.part"
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    try:
        if parent is not None:
            shutil.copyfile(disk, tmp)
            # -u: the overlay's base is this very file, under another path.
            qemu_img("rebase", "-u", "-b", parent.name, "-F", parent.format, str(tmp))
        else:
            qemu_img("convert", "-O", "qcow2", str(disk), str(tmp))
        os.chmod(tmp, 0o600)
        return inspect(tmp, "qcow2", parent.name if parent else "")
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
