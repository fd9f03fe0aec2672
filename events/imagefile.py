"""What an image file is, asked of ``qemu-img``: its format, size and
backing chain, checked before its bytes are trusted.

Both sides of the object store need this: the image service checks an
upload before it stores it, and a compute agent checks what it fetched
before it boots it (and the snapshots it makes). They may import only
``events``, so it lives here.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
from pathlib import Path

import msgspec

from stratus.events.errors import HostError, Invalid

QEMU_IMG = "qemu-img"
FORMATS = ("qcow2", "raw")
SHA256_RE = re.compile(r"^[0-9a-f]{64}(?!\n)$")
# qemu-img on an untrusted file: bound its time.
INFO_TIMEOUT_S = 30


class ImageError(HostError):
    """qemu-img refused or failed; the message is its own reason."""


class ImageFile(msgspec.Struct, frozen=True):
    """What the checks found in a file."""

    path: str
    format: str
    size_bytes: int
    virtual_size: int
    checksum: str
    backing: str = ""


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


def min_disk_gb(virtual_size: int) -> int:
    """The smallest disk (whole GiB) the image fits on."""
    return -(-virtual_size // (1 << 30))


def inspect(path: Path, claimed: str, backing: str = "", checksum: str = "") -> ImageFile:
    """Check that ``path`` is an image of format ``claimed``, or raise ``Invalid``.

    qemu-img probes the format itself (never told ``claimed``), so a raw
    file called qcow2 and a qcow2 called raw are both caught. The file may
    name no other file than ``backing`` (exactly that name; "" for none): a
    backing file or an external data file anywhere else would make a guest
    read a file of the host nobody stored as an image. ``checksum``, when
    given, saves hashing the file again.
    """
    if claimed not in FORMATS:
        raise Invalid(f"image format must be qcow2 or raw, not {claimed!r}")
    if not path.is_file():
        raise Invalid(f"{path.name} is not a file")
    try:
        probed = info(path)
    except ImageError as exc:
        raise Invalid(f"not a readable image: {exc.message}") from None
    assert isinstance(probed, dict)
    fmt = probed.get("format")
    if fmt != claimed:
        raise Invalid(f"the file is a {fmt} image, not {claimed}")
    vsize = probed.get("virtual-size")
    if not isinstance(vsize, int) or vsize <= 0:
        raise Invalid("qemu-img reports no virtual size")
    named = probed.get("backing-filename") or ""
    if named != backing:
        if not backing:
            raise Invalid(
                f"the image has a backing file ({named}); upload a flat image "
                "(qemu-img convert -O qcow2 IN OUT)"
            )
        raise Invalid(f"the image is backed by {named or 'nothing'}, not {backing}")
    data_file = ((probed.get("format-specific") or {}).get("data") or {}).get("data-file")
    if data_file:
        raise Invalid(f"the image keeps its data in another file ({data_file})")
    return ImageFile(
        path=str(path),
        format=fmt,
        size_bytes=path.stat().st_size,
        virtual_size=vsize,
        checksum=checksum or sha256(path),
        backing=named,
    )
