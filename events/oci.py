"""OCI images: an archive read, every digest checked, every layer's tar
checked for entries that could write outside the directory it is unpacked
into.

Both sides need this: the image service checks an uploaded archive before
any of its blobs is stored, and a compute agent checks each layer again as
it unpacks it (``agents.compute.layers``). Standard library only.

Two archive forms are read:

- an OCI image layout (``oci-layout``, ``index.json``, ``blobs/sha256/…``),
  as ``skopeo copy … oci-archive:`` and ``umoci`` (tarred) produce: every
  blob must hash to the digest it is named and referenced by;
- a ``docker save`` archive (``manifest.json`` naming a config file and
  layer tars): the config must hash to its name, and each layer to the
  ``rootfs.diff_ids`` entry the config holds for it.

In both, each layer's uncompressed tar must hash to its ``diff_id``.

A layer is refused (``Invalid``) if any entry has an absolute path or a
``..`` component, is a device node, is a hard link to a name not earlier in
the same layer, lies beneath a symlink of the same layer (how an absolute
or ``..`` symlink escapes: ``etc -> /etc`` then ``etc/passwd``), or
replaces a symlink (extracting a file over one writes through it).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import IO, Any

import msgspec

from stratus.events.errors import Invalid

SHA256 = "sha256:"
MAX_LAYERS = 64
# JSON documents of an archive (index, manifest, config) are small.
MAX_JSON = 4 << 20
WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_LAYER = "application/vnd.oci.image.layer.v1.tar"
MEDIA_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
_COPY = 1 << 20


class OciConfig(msgspec.Struct, frozen=True):
    """What ``image.created``/``image.activated`` record of an OCI image:
    its layers (blob digests in the object store, lowest first, with the
    digest of each one's uncompressed tar) and how its process starts."""

    layers: list[str]
    diff_ids: list[str]
    entrypoint: list[str] = []
    cmd: list[str] = []
    env: list[str] = []
    working_dir: str = ""
    user: str = ""

    def argv(self, command: list[str] | None = None) -> list[str]:
        """The process a container runs: ``command`` (``server create
        --command``) replaces the image's entrypoint and cmd."""
        return list(command) if command else [*self.entrypoint, *self.cmd]


class Archive(msgspec.Struct):
    """An archive read and checked: the image's config, the digest it is
    known by (its config's), and its blobs, copied out to files."""

    digest: str
    config: OciConfig
    blobs: dict[str, str]  # hex digest -> path of a verified copy

    def paths(self) -> Iterator[tuple[str, Path]]:
        for d, p in self.blobs.items():
            yield d, Path(p)


def hexdigest(digest: str) -> str:
    """``sha256:<hex>`` -> ``<hex>``, or ``Invalid``."""
    if not isinstance(digest, str) or not digest.startswith(SHA256):
        raise Invalid(f"not a sha256 digest: {str(digest)[:80]!r}")
    h = digest[len(SHA256) :]
    if len(h) != 64 or any(c not in "0123456789abcdef" for c in h):
        raise Invalid(f"not a sha256 digest: {digest[:80]!r}")
    return h


def clean_name(name: str) -> str:
    """A tar entry's name relative to the layer's root, or ``Invalid``."""
    if "\0" in name:
        raise Invalid(f"NUL byte in tar entry name {name!r}")
    if name.startswith("/"):
        raise Invalid(f"absolute path in layer: {name!r}")
    parts = [p for p in PurePosixPath(name).parts if p != "."]
    if ".." in parts:
        raise Invalid(f"'..' escape in layer: {name!r}")
    return "/".join(parts)


class LayerCheck:
    """Every entry of one layer, in order, through ``check``."""

    def __init__(self) -> None:
        self.names: set[str] = set()
        self.files: set[str] = set()
        self.symlinks: set[str] = set()

    def check(self, m: tarfile.TarInfo) -> str:
        name = clean_name(m.name)
        if m.ischr() or m.isblk():
            raise Invalid(f"device node in layer: {name!r}")
        if not (m.isreg() or m.isdir() or m.issym() or m.islnk() or m.isfifo()):
            raise Invalid(f"unsupported entry type {m.type!r} in layer: {name!r}")
        parent = PurePosixPath(name).parent
        for p in [parent, *parent.parents]:
            if str(p) in self.symlinks:
                raise Invalid(f"{name!r} lies beneath the layer's symlink {str(p)!r}")
        if name in self.symlinks:
            raise Invalid(f"{name!r} replaces a symlink of the same layer")
        base = PurePosixPath(name).name
        if base.startswith(WHITEOUT) and base != OPAQUE:
            hidden = base[len(WHITEOUT) :]
            if hidden in ("", ".", "..") or not m.isreg():
                raise Invalid(f"whiteout {name!r} names nothing it could hide")
        if m.islnk():
            target = clean_name(m.linkname)
            if target not in self.files:
                raise Invalid(f"hard link {name!r} points outside the layer: {m.linkname!r}")
        if m.isreg() or m.islnk():
            self.files.add(name)
        if m.issym():
            if "\0" in m.linkname:
                raise Invalid(f"NUL byte in symlink {name!r}")
            self.symlinks.add(name)
        self.names.add(name)
        return name


class _Hashing(io.RawIOBase):
    """A read-only stream that hashes what is read through it."""

    def __init__(self, f: IO[bytes]) -> None:
        self.f = f
        self.h = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        data = self.f.read(len(b))
        self.h.update(data)
        b[: len(data)] = data
        return len(data)


def open_layer(path: Path) -> IO[bytes]:
    """A layer blob's uncompressed tar stream (gzip told by its magic)."""
    f = open(path, "rb")
    if f.read(2) == b"\x1f\x8b":
        f.seek(0)
        return gzip.GzipFile(fileobj=f, mode="rb")  # type: ignore[return-value]
    f.seek(0)
    return f


def walk_layer(path: Path) -> Iterator[tuple[str, tarfile.TarInfo, tarfile.TarFile]]:
    """Each entry of a layer blob, checked (``LayerCheck``), with the open
    stream it can be read from while it is current."""
    check = LayerCheck()
    with open_layer(path) as raw:
        try:
            with tarfile.open(fileobj=raw, mode="r|") as tar:
                for m in tar:
                    yield check.check(m), m, tar
        except (tarfile.TarError, EOFError, OSError, gzip.BadGzipFile) as exc:
            raise Invalid(f"layer is not a readable tar: {exc}") from None


def diff_id(path: Path) -> str:
    """The hex SHA-256 of a layer's uncompressed tar, every entry checked."""
    with open_layer(path) as raw:
        hashing = _Hashing(raw)
        stream = io.BufferedReader(hashing, _COPY)
        check = LayerCheck()
        try:
            with tarfile.open(fileobj=stream, mode="r|") as tar:
                for m in tar:
                    check.check(m)
            # The end-of-archive blocks and padding count too.
            while stream.read(_COPY):
                pass
        except (tarfile.TarError, EOFError, OSError, gzip.BadGzipFile) as exc:
            raise Invalid(f"layer is not a readable tar: {exc}") from None
        return hashing.h.hexdigest()


def _copy_out(src: IO[bytes], dest: Path) -> str:
    h = hashlib.sha256()
    with open(dest, "wb") as out:
        while chunk := src.read(_COPY):
            h.update(chunk)
            out.write(chunk)
    return h.hexdigest()


def _json(path: Path) -> Any:
    if path.stat().st_size > MAX_JSON:
        raise Invalid(f"{path.name}: larger than {MAX_JSON} bytes")
    try:
        return json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError) as exc:
        raise Invalid(f"{path.name} is not JSON: {exc}") from None


def _strings(v: Any, what: str) -> list[str]:
    if v is None:
        return []
    if not isinstance(v, list) or not all(isinstance(s, str) and "\0" not in s for s in v):
        raise Invalid(f"image config: {what} must be a list of strings")
    return list(v)


def _string(v: Any, what: str) -> str:
    if v is None:
        return ""
    if not isinstance(v, str) or "\0" in v:
        raise Invalid(f"image config: {what} must be a string")
    return v


def read_archive(archive: Path, work: Path) -> Archive:
    """Read ``archive`` into ``work`` (an empty directory) and check it all.

    Each regular file of the archive is copied out under a number (names
    from the archive never become paths here) and hashed on the way; the
    layout is then resolved and every digest compared."""
    files: dict[str, tuple[Path, str]] = {}  # name in archive -> (copy, sha256)
    try:
        with tarfile.open(archive, mode="r:*") as tar:
            for i, m in enumerate(tar):
                name = clean_name(m.name)
                if m.isdir():
                    continue
                if not m.isreg():
                    raise Invalid(f"archive entry {name!r} is not a regular file")
                if name in files:
                    raise Invalid(f"archive entry {name!r} appears twice")
                src = tar.extractfile(m)
                assert src is not None
                dest = work / f"{i}.blob"
                files[name] = (dest, _copy_out(src, dest))
    except (tarfile.TarError, EOFError, gzip.BadGzipFile) as exc:
        raise Invalid(f"not a tar archive: {exc}") from None
    if "index.json" in files:
        return _oci_layout(files)
    if "manifest.json" in files:
        return _docker_save(files)
    raise Invalid("neither an OCI image layout (index.json) nor a docker save (manifest.json)")


def _blob(files: dict[str, tuple[Path, str]], digest: str) -> Path:
    h = hexdigest(digest)
    found = files.get(f"blobs/sha256/{h}")
    if found is None:
        raise Invalid(f"blob {digest} is missing from the archive")
    path, got = found
    if got != h:
        raise Invalid(f"blob {digest} has the wrong digest: its bytes hash to sha256:{got}")
    return path


def _oci_layout(files: dict[str, tuple[Path, str]]) -> Archive:
    index = _json(files["index.json"][0])
    manifests = index.get("manifests") if isinstance(index, dict) else None
    if not isinstance(manifests, list) or not manifests:
        raise Invalid("index.json lists no manifest")
    desc = manifests[0]
    for _ in range(4):  # an index may point at an index (multi-platform)
        if not isinstance(desc, dict):
            raise Invalid("index.json: a manifest descriptor is not an object")
        doc = _json(_blob(files, desc.get("digest", "")))
        if desc.get("mediaType") == MEDIA_INDEX or doc.get("mediaType") == MEDIA_INDEX:
            subs = doc.get("manifests") or []
            if not subs:
                raise Invalid("an image index lists no manifest")
            linux = [s for s in subs if (s.get("platform") or {}).get("os") in (None, "linux")]
            desc = (linux or subs)[0]
            continue
        break
    else:
        raise Invalid("image indexes nested too deep")
    manifest = doc
    cfg_desc = manifest.get("config") or {}
    cfg_digest = hexdigest(cfg_desc.get("digest", ""))
    config = _json(_blob(files, cfg_desc.get("digest", "")))
    layers = manifest.get("layers")
    if not isinstance(layers, list):
        raise Invalid("the manifest lists no layers")
    blobs = {cfg_digest: _blob(files, cfg_desc["digest"])}
    digests = []
    for layer in layers:
        if not isinstance(layer, dict):
            raise Invalid("a layer descriptor is not an object")
        d = layer.get("digest", "")
        blobs[hexdigest(d)] = _blob(files, d)
        digests.append(hexdigest(d))
    return _finish(cfg_digest, config, digests, blobs)


def _docker_save(files: dict[str, tuple[Path, str]]) -> Archive:
    manifest = _json(files["manifest.json"][0])
    if not isinstance(manifest, list) or not manifest or not isinstance(manifest[0], dict):
        raise Invalid("manifest.json lists no image")
    entry = manifest[0]
    cfg_name = clean_name(_string(entry.get("Config"), "Config"))
    if cfg_name not in files:
        raise Invalid(f"config {cfg_name!r} is missing from the archive")
    cfg_path, cfg_digest = files[cfg_name]
    # Its name is its digest (``<hex>.json`` or ``blobs/sha256/<hex>``).
    named = PurePosixPath(cfg_name).name.removesuffix(".json")
    if named != cfg_digest:
        raise Invalid(f"config {cfg_name!r} has the wrong digest: its bytes hash to {cfg_digest}")
    config = _json(cfg_path)
    blobs = {cfg_digest: cfg_path}
    digests = []
    for name in _strings(entry.get("Layers"), "Layers"):
        name = clean_name(name)
        if name not in files:
            raise Invalid(f"layer {name!r} is missing from the archive")
        path, digest = files[name]
        blobs[digest] = path
        digests.append(digest)
    return _finish(cfg_digest, config, digests, blobs)


def _finish(cfg_digest: str, config: Any, digests: list[str], blobs: dict[str, Path]) -> Archive:
    """Every layer's uncompressed digest against the config's diff_ids."""
    if not isinstance(config, dict):
        raise Invalid("the image config is not an object")
    if not digests or len(digests) > MAX_LAYERS:
        raise Invalid(f"an image has 1..{MAX_LAYERS} layers, not {len(digests)}")
    rootfs = config.get("rootfs") or {}
    want = [hexdigest(d) for d in _strings(rootfs.get("diff_ids"), "rootfs.diff_ids")]
    if len(want) != len(digests):
        raise Invalid(f"the config names {len(want)} layers, the manifest {len(digests)}")
    for i, (d, expect) in enumerate(zip(digests, want, strict=True)):
        try:
            got = diff_id(blobs[d])
        except Invalid as exc:
            raise Invalid(f"layer {i} (sha256:{d[:12]}): {exc.message}") from None
        if got != expect:
            raise Invalid(f"layer {i} has the wrong diff_id: sha256:{got}, not sha256:{expect}")
    c = config.get("config") or {}
    if not isinstance(c, dict):
        raise Invalid("image config: config is not an object")
    return Archive(
        digest=cfg_digest,
        config=OciConfig(
            layers=digests,
            diff_ids=want,
            entrypoint=_strings(c.get("Entrypoint"), "Entrypoint"),
            cmd=_strings(c.get("Cmd"), "Cmd"),
            env=_strings(c.get("Env"), "Env"),
            working_dir=_string(c.get("WorkingDir"), "WorkingDir"),
            user=_string(c.get("User"), "User"),
        ),
        blobs={d: str(p) for d, p in blobs.items()},
    )


def config_json(config: OciConfig, parent: dict[str, Any] | None = None) -> bytes:
    """An OCI image config document for ``config`` (a snapshot's new image)."""
    doc: dict[str, Any] = dict(parent or {})
    doc.update(
        {
            "architecture": doc.get("architecture", "amd64"),
            "os": "linux",
            "config": {
                "Entrypoint": config.entrypoint or None,
                "Cmd": config.cmd or None,
                "Env": config.env,
                "WorkingDir": config.working_dir,
                "User": config.user,
            },
            "rootfs": {"type": "layers", "diff_ids": [SHA256 + d for d in config.diff_ids]},
        }
    )
    return json.dumps(doc, sort_keys=True).encode()


def write_layout(
    out: Path,
    layers: list[bytes],
    *,
    entrypoint: list[str] | None = None,
    cmd: list[str] | None = None,
    env: list[str] | None = None,
    working_dir: str = "",
    user: str = "",
) -> str:
    """An OCI image layout archive at ``out`` of uncompressed layer tars
    (lowest first); returns its config's hex digest. (What ``umoci`` or
    ``skopeo`` would write, for images built without a registry.)"""
    blobs: dict[str, bytes] = {}

    def add(data: bytes) -> dict[str, Any]:
        h = hashlib.sha256(data).hexdigest()
        blobs[h] = data
        return {"digest": SHA256 + h, "size": len(data)}

    descs = [{"mediaType": MEDIA_LAYER, **add(layer)} for layer in layers]
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Entrypoint": entrypoint,
            "Cmd": cmd,
            "Env": env or ["PATH=/bin:/usr/bin:/sbin:/usr/sbin"],
            "WorkingDir": working_dir,
            "User": user,
        },
        "rootfs": {"type": "layers", "diff_ids": [d["digest"] for d in descs]},
    }
    cfg = add(json.dumps(config, sort_keys=True).encode())
    manifest = {
        "schemaVersion": 2,
        "mediaType": MEDIA_MANIFEST,
        "config": {"mediaType": MEDIA_CONFIG, **cfg},
        "layers": descs,
    }
    man = add(json.dumps(manifest, sort_keys=True).encode())
    index = {
        "schemaVersion": 2,
        "manifests": [{"mediaType": MEDIA_MANIFEST, **man}],
    }
    files = {
        "oci-layout": json.dumps({"imageLayoutVersion": "1.0.0"}).encode(),
        "index.json": json.dumps(index).encode(),
        **{f"blobs/sha256/{h}": data for h, data in blobs.items()},
    }
    with tarfile.open(out, "w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return hexdigest(cfg["digest"])
