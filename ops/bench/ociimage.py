"""Tiny OCI images built here, without a registry: a root file system of
Debian's ``busybox-static`` (its applets as symlinks to ``/bin/busybox``),
for the container tests and the ``containers`` benchmark."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

from stratus.events import oci

BUSYBOX = Path("/bin/busybox")
APPLETS = (
    "sh", "ls", "cat", "echo", "hostname", "ps", "ping", "sleep", "id", "touch",
    "mount", "dd", "head", "grep", "sed", "rm", "mkdir", "true", "false", "env",
    "ip", "awk", "wc", "yes", "stat", "readlink", "tr", "mknod",
)  # fmt: skip
DIRS = ("bin", "dev", "etc", "proc", "sys", "tmp", "root", "var", "run")


def tar_of(entries: list[tarfile.TarInfo], data: dict[str, bytes] | None = None) -> bytes:
    """A layer tar of ``entries`` (regular files' bytes from ``data``)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for e in entries:
            body = (data or {}).get(e.name)
            if body is not None:
                e.size = len(body)
            tar.addfile(e, io.BytesIO(body) if body is not None else None)
    return buf.getvalue()


def entry(
    name: str, kind: bytes = tarfile.REGTYPE, mode: int = 0o644, link: str = ""
) -> tarfile.TarInfo:
    e = tarfile.TarInfo(name)
    e.type, e.mode, e.linkname = kind, mode, link
    return e


def busybox_layer() -> bytes:
    """The busybox root: /bin/busybox, its applets, the usual directories."""
    entries = [entry(d, tarfile.DIRTYPE, 0o755) for d in DIRS]
    entries[DIRS.index("tmp")].mode = 0o1777
    entries.append(entry("bin/busybox", mode=0o755))
    entries += [entry(f"bin/{a}", tarfile.SYMTYPE, 0o777, "/bin/busybox") for a in APPLETS]
    files = {
        "bin/busybox": BUSYBOX.read_bytes(),
        "etc/passwd": b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534::/:/bin/false\n",
        "etc/group": b"root:x:0:\nnogroup:x:65534:\n",
        "etc/image-release": b"stratus busybox test image\n",
    }
    entries += [entry(n) for n in files if n != "bin/busybox"]
    return tar_of(entries, files)


def busybox_image(out: Path, cmd: list[str] | None = None) -> str:
    """An OCI layout archive of the busybox root at ``out`` (its config digest)."""
    return oci.write_layout(out, [busybox_layer()], cmd=cmd or ["sleep", "3600"])
