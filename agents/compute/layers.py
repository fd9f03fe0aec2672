"""A host's OCI layers: each fetched from the object store by its digest
and unpacked once into a directory of its own, read-only from then on and
shared by every container of every image that has it; and the reverse, a
container's upper directory made into a new layer (a snapshot).

Unpacking converts the OCI tar's whiteouts into overlayfs's own form: a
``.wh.NAME`` entry becomes a 0/0 character device ``NAME`` (overlayfs hides
the lower ``NAME``), and ``.wh..wh..opq`` marks its directory opaque
(``trusted.overlay.opaque=y``: nothing below shows through). A snapshot
does the opposite. Every entry is checked again as it is unpacked
(``events.oci.LayerCheck``), although the bytes were checked on import and
their digest on fetch: the unpacking runs as root.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shutil
import stat
import tarfile
import weakref
from collections.abc import Awaitable, Callable
from pathlib import Path

from stratus.agents.compute.images import part, private_dir
from stratus.events import oci
from stratus.events.blobs import BlobStore, check_digest
from stratus.events.errors import HostError, Invalid, NotFound

OPAQUE_XATTR = "trusted.overlay.opaque"


def unpack(blob: Path, dest: Path) -> None:
    """Unpack layer ``blob`` into the new directory ``dest``."""
    dest.mkdir(mode=0o755)
    dirs: list[tuple[Path, tarfile.TarInfo]] = []
    for name, m, tar in oci.walk_layer(blob):
        if not name:
            continue  # "." itself
        path = dest / name
        base = path.name
        if base == oci.OPAQUE:
            path.parent.mkdir(parents=True, exist_ok=True)
            os.setxattr(path.parent, OPAQUE_XATTR, b"y")
            continue
        if base.startswith(oci.WHITEOUT):
            hidden = path.with_name(base[len(oci.WHITEOUT) :])
            hidden.parent.mkdir(parents=True, exist_ok=True)
            _clear(hidden)
            os.mknod(hidden, stat.S_IFCHR | 0o000, os.makedev(0, 0))
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        if not m.isdir():
            _clear(path)  # a later entry of the same name replaces the earlier one
        # Checked above (no escape, no device), so nothing here leaves ``dest``.
        tar.extract(m, dest, set_attrs=not m.isdir(), numeric_owner=True, filter="fully_trusted")
        if m.isdir():
            dirs.append((path, m))
    # Directory modes and owners last: a read-only one would refuse its children.
    for path, m in reversed(dirs):
        os.chown(path, m.uid, m.gid)
        os.chmod(path, m.mode & 0o7777)
        os.utime(path, (m.mtime, m.mtime))


def _clear(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def commit(upper: Path, out: Path) -> tuple[str, int]:
    """A layer tar at ``out`` of an overlay upper directory (whiteouts back
    to their OCI form); its SHA-256 (blob digest and diff_id alike: it is
    not compressed) and size."""
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        for root, dirnames, filenames in os.walk(upper):
            dirnames.sort()
            rel_root = Path(root).relative_to(upper)
            for name in sorted(dirnames) + sorted(filenames):
                path = Path(root) / name
                rel = (rel_root / name).as_posix()
                st = os.lstat(path)
                if stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(0, 0):
                    tar.addfile(_empty(str(rel_root / (oci.WHITEOUT + name)), st))
                    continue
                info = tar.gettarinfo(str(path), rel)
                info.uname = info.gname = ""
                if info.isreg():
                    with open(path, "rb") as f:
                        tar.addfile(info, f)
                else:
                    tar.addfile(info)
                if stat.S_ISDIR(st.st_mode):
                    with contextlib.suppress(OSError):
                        if os.getxattr(path, OPAQUE_XATTR) == b"y":
                            tar.addfile(_empty(f"{rel}/{oci.OPAQUE}", st))
    h = hashlib.sha256()
    with open(out, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest(), out.stat().st_size


def _empty(name: str, st: os.stat_result) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name.removeprefix("./"))
    info.mtime = int(st.st_mtime)
    return info


class LayerStore:
    """One host's unpacked layers, ``<root>/<digest>`` each."""

    def __init__(self, root: Path, blobs: Callable[[], Awaitable[BlobStore]]) -> None:
        self.root = private_dir(root)
        self._blobs = blobs
        self._fetching: weakref.WeakValueDictionary[str, asyncio.Lock] = (
            weakref.WeakValueDictionary()
        )
        # Layers fetched and unpacked since start (the rest were here).
        self.unpacked = 0

    def path(self, digest: str) -> Path:
        return self.root / check_digest(digest)

    async def fetch(self, digests: list[str]) -> list[Path]:
        """The unpacked directories of ``digests`` (lowest first), each
        fetched (its digest checked) and unpacked on first use."""
        if not digests or len(digests) > oci.MAX_LAYERS:
            raise HostError(f"an image of {len(digests)} layers is not allowed")
        return [await self._one(d) for d in digests]

    async def _one(self, digest: str) -> Path:
        path = self.path(digest)
        if path.is_dir():
            return path
        lock = self._fetching.get(digest)
        if lock is None:
            lock = self._fetching[digest] = asyncio.Lock()
        async with lock:
            if path.is_dir():
                return path
            blob = part(path.with_suffix(".tar"))
            tmp = part(path)
            try:
                await (await self._blobs()).get_file(digest, blob)
                await asyncio.to_thread(unpack, blob, tmp)
                os.replace(tmp, path)
            except (Invalid, NotFound) as exc:
                raise HostError(f"layer {digest[:12]}: {exc.message}") from None
            finally:
                with contextlib.suppress(FileNotFoundError):
                    blob.unlink()
                if tmp.exists():
                    await asyncio.to_thread(shutil.rmtree, tmp, True)
            self.unpacked += 1
            return path

    def adopt(self, digest: str, blob: Path) -> Path:
        """Unpack a layer this host made (a snapshot) into the store."""
        path = self.path(digest)
        if not path.is_dir():
            tmp = part(path)
            unpack(blob, tmp)
            os.replace(tmp, path)
        return path
