"""``image.upload``: the bytes of an image that was recorded without them.

Glance makes an image in two steps (a queued record, then its file), and
the OpenStack API keeps no state between them, so the record and the bytes
are two commands. The bytes are checked and stored before the command is
sent (as ``image create --file`` does); the decision only attaches what was
stored to the record, once.
"""

from __future__ import annotations

from stratus.events.errors import Conflict
from stratus.events.model import Cause, Event
from stratus.events.resources import ImageUpload, ImageUploaded
from stratus.handlers.registry import Handler
from stratus.handlers.world import World, fold, tenant_boundary


def decide_image_upload(w: World, cmd: ImageUpload, cause: Cause) -> list[Event]:
    image = w.find("image", cmd.ref)
    if image.get("checksum"):
        if image["checksum"] == cmd.checksum and image.get("format") == cmd.format:
            return []  # the same bytes again (a retried upload)
        raise Conflict(f"image {image['name'] or image['id']} has its data already")
    return [
        cause.make(
            ImageUploaded,
            cmd.tenant or "",
            "image",
            image["id"],
            format=cmd.format,
            size_bytes=cmd.size_bytes,
            checksum=cmd.checksum,
            md5=cmd.md5,
            min_disk_gb=max(cmd.min_disk_gb, image.get("min_disk_gb", 0)),
        )
    ]


def _uploaded(w: World, events: list[Event]) -> dict:
    ref = events[0].aggregate.id if events else ""
    return dict(w.of("image").get(ref, {"id": ref}))


def handlers(quota_defaults: dict[str, int] | None = None) -> list[Handler]:
    return [
        Handler(
            verb="image.upload",
            command=ImageUpload,
            permission="image.upload",
            boundary=lambda c: tenant_boundary(c.tenant),
            initial=lambda: World(quota_defaults),
            fold=fold,
            decide=decide_image_upload,
            tenant_of=lambda c: c.tenant,
            result=_uploaded,
        )
    ]
