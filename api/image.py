"""Glance v2: create (queued), upload, list with paging, show, download, delete.

An image is recorded without bytes first (``image.create``: Glance's
``queued``), then its file is checked and stored exactly as ``stratus image
create --file`` stores it (``agents.compute.images.store_file``: qemu-img
checks the format, the bytes go into the image store under their SHA-256)
and attached to the record (``image.upload``: ``active``). ``checksum`` is
the MD5 Glance clients verify, ``os_hash_algo``/``os_hash_value`` the
SHA-256 the store keys on. Extra properties (the SDK's
``owner_specified.openstack.*``) are kept on the log with the image.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any

import msgspec
from aiohttp import web

from stratus.api.http import (
    TITLES,
    Face,
    HttpError,
    caller,
    decode,
    deleter,
    fetch,
    json_response,
    no_content,
    origin,
    page,
    path_id,
    query_int,
    session,
)
from stratus.events.errors import Conflict, Invalid, NotFound

PREFIX = "/image"
API = f"{PREFIX}/v2"
# The largest image file accepted (the store's disk is the real bound).
MAX_IMAGE_BYTES = 64 << 30
CHUNK = 1 << 20


def fault(status: int, message: str, _kind: str) -> web.Response:
    title = TITLES.get(status, "Error")
    return web.Response(
        text=f"{status} {title}\n\n{message}\n\n   ", status=status, content_type="text/plain"
    )


FACE = Face("image", PREFIX, fault, quota_status=413)

IMAGE_STORE = web.AppKey("image_store", Path)

# Glance's own attributes; any other string-valued key is an extra property.
_READ_ONLY = {
    "id",
    "status",
    "checksum",
    "os_hash_algo",
    "os_hash_value",
    "size",
    "virtual_size",
    "created_at",
    "updated_at",
    "file",
    "self",
    "schema",
    "owner",
    "direct_url",
    "locations",
}
_ATTRS = {
    "name",
    "disk_format",
    "container_format",
    "visibility",
    "min_disk",
    "min_ram",
    "protected",
    "tags",
    "os_hidden",
}


async def versions(request: web.Request) -> web.Response:
    href = f"{origin(request)}{API}/"
    return json_response(
        {
            "versions": [
                {"id": "v2.0", "status": "CURRENT", "links": [{"rel": "self", "href": href}]}
            ]
        },
        300,
    )


def image_view(i: dict[str, Any]) -> dict[str, Any]:
    iid = i["id"]
    uploaded = bool(i.get("checksum"))
    out: dict[str, Any] = {
        **(i.get("properties") or {}),
        "id": iid,
        "name": i["name"] or None,
        "status": "active" if uploaded else "queued",
        "visibility": i.get("visibility") or "private",
        "protected": False,
        "os_hidden": False,
        "checksum": i.get("md5") or None if uploaded else None,
        "os_hash_algo": "sha256" if uploaded else None,
        "os_hash_value": i.get("checksum") or None,
        "size": i.get("size_bytes") if uploaded else None,
        "virtual_size": None,
        "min_disk": i.get("min_disk_gb") or 0,
        "min_ram": 0,
        "disk_format": i.get("format") or "raw",
        "container_format": "bare",
        "owner": "" if i.get("tenant") == "_system" else i.get("tenant", ""),
        "tags": [],
        "created_at": i.get("created_at"),
        "updated_at": i.get("updated_at"),
        "self": f"/v2/images/{iid}",
        "file": f"/v2/images/{iid}/file",
        "schema": "/v2/schemas/image",
    }
    return out


async def create_image(request: web.Request) -> web.Response:
    body = await decode(request, dict[str, Any])
    for key in body:
        if key in _READ_ONLY:
            raise HttpError(403, f"attribute '{key}' is read-only")
    name = body.get("name") or ""
    fmt = body.get("disk_format") or "raw"
    if fmt not in ("qcow2", "raw"):
        raise Invalid(f"disk_format {fmt!r}: qcow2 or raw")
    if body.get("container_format") not in (None, "bare"):
        raise Invalid("container_format: only bare is supported")
    if body.get("visibility", "private") != "private":
        raise Invalid(
            "visibility: only private images are made here (stratus image create --public)"
        )
    if body.get("protected") or body.get("os_hidden"):
        raise Invalid("protected and hidden images are not supported")
    if body.get("tags"):
        raise Invalid("image tags are not supported")
    min_disk = body.get("min_disk", 0)
    if not isinstance(name, str) or not isinstance(min_disk, int) or isinstance(min_disk, bool):
        raise Invalid("name must be a string and min_disk an integer")
    props: dict[str, str] = {}
    for key, value in body.items():
        if key in _ATTRS:
            continue
        if not isinstance(value, str):
            raise Invalid(f"property {key!r}: extra properties are strings")
        props[key] = value
    me = caller(request)
    cmd = {
        "name": name,
        "format": fmt,
        "min_disk_gb": min_disk,
        "properties": props,
        "tenant": me.tenant,
    }
    s = session(request)
    made = await s.command("image.create", cmd)
    view = image_view(await fetch(s, "image", me.tenant, made["id"]))
    return json_response(view, 201, {"Location": f"{origin(request)}{API}/images/{made['id']}"})


async def list_images(request: web.Request) -> web.Response:
    me = caller(request)
    rows = [image_view(i) for i in await session(request).query("images", {"tenant": me.tenant})]
    q = request.query
    for key in ("name", "status", "visibility", "disk_format", "container_format", "owner"):
        if key in q:
            rows = [r for r in rows if str(r.get(key)) == q[key]]
    limit = query_int(request, "limit", 25)
    shown, more = page(rows, q.get("marker"), limit)
    body: dict[str, Any] = {"images": shown, "schema": "/v2/schemas/images", "first": "/v2/images"}
    if more:
        params = {k: v for k, v in q.items() if k != "marker"}
        params["marker"] = shown[-1]["id"]
        body["next"] = str(request.url.relative().with_query(params)).replace(PREFIX, "", 1)
    return json_response(body)


async def show_image(request: web.Request) -> web.Response:
    iid = path_id(request, what="image")
    me = caller(request)
    return json_response(image_view(await fetch(session(request), "image", me.tenant, iid)))


class _PatchOp(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    op: str
    path: str
    value: Any = None


def _patch_op(raw: dict[str, Any]) -> _PatchOp:
    """One operation, in RFC 6902's form or the v2.0 media type's
    (``{"replace": "/name", "value": ...}``)."""
    for op in ("add", "replace", "remove"):
        if op in raw and "op" not in raw:
            raw = {"op": op, "path": raw[op], **{k: v for k, v in raw.items() if k != op}}
    try:
        return msgspec.convert(raw, _PatchOp)
    except msgspec.ValidationError as exc:
        raise Invalid(f"invalid patch: {exc}") from None


PATCH_TYPES = (
    "application/openstack-images-v2.1-json-patch",
    "application/openstack-images-v2.0-json-patch",
)


async def update_image(request: web.Request) -> web.Response:
    """Glance's JSON patch; Stratus renames an image, nothing else."""
    if request.content_type not in PATCH_TYPES:
        raise HttpError(415, f"send {PATCH_TYPES[0]}")
    iid = path_id(request, what="image")
    name: str | None = None
    for op in map(_patch_op, await decode(request, list[dict[str, Any]])):
        if op.op in ("replace", "add") and op.path == "/name" and isinstance(op.value, str):
            name = op.value
        else:
            raise HttpError(403, f"changing {op.path} ({op.op}) is not supported by Stratus")
    me = caller(request)
    s = session(request)
    await fetch(s, "image", me.tenant, iid)
    if name is not None:
        await s.command("image.rename", {"ref": iid, "name": name, "tenant": me.tenant})
    return json_response(image_view(await fetch(s, "image", me.tenant, iid)))


class Stored(msgspec.Struct, frozen=True):
    size_bytes: int
    checksum: str
    md5: str
    min_disk_gb: int


async def store_upload(content: Any, fmt: str, store: Path) -> Stored:
    """Receive an image file and store it as ``stratus image create --file``
    does. The one place image bytes are written: a move to an object store
    changes this function alone."""
    from stratus.agents.compute import images

    await asyncio.to_thread(images.private_dir, store)
    md5 = hashlib.md5(usedforsecurity=False)
    fd, tmp = tempfile.mkstemp(dir=store, prefix=".upload-", suffix=".part")
    try:
        size = 0
        with os.fdopen(fd, "wb") as out:
            while True:
                chunk = await content.read(CHUNK)
                if not chunk:
                    break
                size += len(chunk)
                if size > MAX_IMAGE_BYTES:
                    raise HttpError(413, f"the image is larger than {MAX_IMAGE_BYTES} bytes")
                md5.update(chunk)
                await asyncio.to_thread(out.write, chunk)
        if size == 0:
            raise Invalid("the image file is empty")
        try:
            checked = await asyncio.to_thread(images.store_file, Path(tmp), fmt, store)
        except images.ImageError as exc:
            raise Invalid(str(exc)) from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return Stored(
        size_bytes=checked.size_bytes,
        checksum=checked.checksum,
        md5=md5.hexdigest(),
        min_disk_gb=-(-checked.virtual_size // (1 << 30)),
    )


async def upload(request: web.Request) -> web.Response:
    iid = path_id(request, what="image")
    me = caller(request)
    s = session(request)
    image = await fetch(s, "image", me.tenant, iid)
    if image.get("checksum"):
        raise Conflict(f"image {iid} has its data already (its status is not queued)")
    if image["tenant"] != me.tenant:
        raise HttpError(403, "you may upload only your own project's images")
    stored = await store_upload(
        request.content, image.get("format") or "raw", request.app[IMAGE_STORE]
    )
    cmd = {"ref": iid, "format": image.get("format") or "raw", "tenant": me.tenant}
    await s.command("image.upload", {**cmd, **msgspec.structs.asdict(stored)})
    return no_content()


async def download(request: web.Request) -> web.StreamResponse:
    from stratus.agents.compute import images

    iid = path_id(request, what="image")
    me = caller(request)
    image = await fetch(session(request), "image", me.tenant, iid)
    if not image.get("checksum"):
        return no_content()
    path = images.stored(request.app[IMAGE_STORE], image["checksum"])
    if path is None:
        raise NotFound(f"image {iid} has no data in this API's image store")
    headers = {"Content-Type": "application/octet-stream"}
    if image.get("md5"):
        headers["Content-MD5"] = image["md5"]
    return web.FileResponse(path, headers=headers)


def routes() -> list[web.RouteDef]:
    return [
        web.get(f"{PREFIX}", versions),
        web.get(f"{PREFIX}/", versions),
        web.get(f"{API}/images", list_images),
        web.post(f"{API}/images", create_image),
        web.get(f"{API}/images/{{id}}", show_image),
        web.delete(f"{API}/images/{{id}}", deleter("image")),
        web.patch(f"{API}/images/{{id}}", update_image),
        web.put(f"{API}/images/{{id}}/file", upload),
        web.get(f"{API}/images/{{id}}/file", download),
    ]
