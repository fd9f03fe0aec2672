"""Glance v2: create (queued), upload, list with paging, show, download, delete.

An image is recorded without bytes first (``image.create``: Glance's
``queued``). Its file is spooled here as it arrives (size, SHA-256, MD5),
announced on the image (``image.uploading``) and sent to the image service
exactly as ``stratus image create --file`` sends it (``store_upload``): the
service checks it (size, SHA-256, qemu-img: format as claimed), stores it
in the object store and appends ``image.activated``. ``checksum`` is the
MD5 Glance clients verify, ``os_hash_algo``/``os_hash_value`` the SHA-256
the object store keys on. Downloads come from the image service too. Extra
properties (the SDK's ``owner_specified.openstack.*``) are kept on the log
with the image.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
from aiohttp import web

from stratus.api.control import Session
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
from stratus.events import imagefile
from stratus.events.errors import Conflict, Invalid

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

# Where uploads and downloads wait on their way (a private directory each).
SPOOL = web.AppKey("spool", Path)

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
    # Glance's ``active``: with bytes. A record without any is ``queued``
    # in Glance's terms, as is one waiting for its upload.
    uploaded = i.get("status") == "active" and bool(i.get("checksum"))
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
        "os_hash_value": i.get("checksum") or None if uploaded else None,
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


class Spooled(msgspec.Struct, frozen=True):
    """A file received whole: where it waits, and what it is."""

    path: Path
    size_bytes: int
    checksum: str
    md5: str


@contextlib.asynccontextmanager
async def spooled_dir(root: Path) -> AsyncIterator[Path]:
    """A private directory of its own under ``root``, gone afterwards."""

    def make() -> Path:
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(dir=root, prefix="transfer-"))  # 0700

    where = await asyncio.to_thread(make)
    try:
        yield where
    finally:
        await asyncio.to_thread(shutil.rmtree, where, True)


async def spool(content: Any, where: Path) -> Spooled:
    """The request body into ``where/image`` (0600), hashed on the way."""
    sha, md5 = hashlib.sha256(), hashlib.md5(usedforsecurity=False)
    path = where / "image"
    size = 0
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as out:
        while True:
            chunk = await content.read(CHUNK)
            if not chunk:
                break
            size += len(chunk)
            if size > MAX_IMAGE_BYTES:
                raise HttpError(413, f"the image is larger than {MAX_IMAGE_BYTES} bytes")
            sha.update(chunk)
            md5.update(chunk)
            await asyncio.to_thread(out.write, chunk)
    if size == 0:
        raise Invalid("the image file is empty")
    return Spooled(path, size, sha.hexdigest(), md5.hexdigest())


async def store_upload(s: Session, image: dict[str, Any], file: Spooled) -> dict[str, Any]:
    """Give queued ``image`` the bytes of ``file`` as ``stratus image create
    --file`` does: the image service checks and stores them (the one place
    the API hands image bytes on). The image, active."""
    from stratus.cli.transfer import upload

    tenant = image["tenant"]
    return await upload(s.client, image["id"], file.path, tenant=tenant, checksum=file.checksum)


async def upload(request: web.Request) -> web.Response:
    iid = path_id(request, what="image")
    me = caller(request)
    s = session(request)
    image = await fetch(s, "image", me.tenant, iid)
    if image["status"] == "active" and image.get("checksum"):
        raise Conflict(f"image {iid} has its data already (its status is not queued)")
    if image["tenant"] != me.tenant:
        raise HttpError(403, "you may upload only your own project's images")
    fmt = image.get("format") or "raw"
    async with spooled_dir(request.app[SPOOL]) as where:
        file = await spool(request.content, where)
        # Checked here first, so a file the image service would refuse is
        # refused before anything is appended (the service checks again).
        await asyncio.to_thread(imagefile.inspect, file.path, fmt, checksum=file.checksum)
        announce = {"ref": iid, "format": fmt, "tenant": me.tenant}
        announce |= {"size_bytes": file.size_bytes, "checksum": file.checksum, "md5": file.md5}
        await s.command("image.upload", announce, settle=False)
        await store_upload(s, image, file)
    await s.settle()  # the image service's image.activated, in the views
    return no_content()


async def download(request: web.Request) -> web.StreamResponse:
    from stratus.cli.transfer import download as fetch_file

    iid = path_id(request, what="image")
    me = caller(request)
    s = session(request)
    image = await fetch(s, "image", me.tenant, iid)
    if image["status"] != "active" or not image.get("checksum"):
        return no_content()
    headers = {"Content-Type": "application/octet-stream"}
    if image.get("md5"):
        headers["Content-MD5"] = image["md5"]
    async with spooled_dir(request.app[SPOOL]) as where:
        # Whole and verified (SHA-256) before the first byte goes out.
        opened, path = await fetch_file(s.client, iid, where / "image", tenant=me.tenant)
        response = web.StreamResponse(headers=headers)
        response.content_length = opened.size
        await response.prepare(request)
        with open(path, "rb") as f:  # noqa: ASYNC230 (chunks read in a thread below)
            while chunk := await asyncio.to_thread(f.read, CHUNK):
                await response.write(chunk)
        await response.write_eof()
    return response


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
