"""Images: a tenant's private images (decided on its world, see
``handlers.world``) and public ones (cloud-wide, decided on their own
subject, named for good).

These decisions record what an image is. Its bytes travel separately, to
the image service (``handlers.image_service``), which stores them in the
object store: an image created with a ``checksum`` is ``queued`` until
that service has stored bytes of exactly that size and SHA-256 and
appended ``image.activated``. One created without is a record only,
active at once (its instances get a blank disk).

Glance makes an image in two steps, a record without bytes and then its
file, and the OpenStack API keeps no state between them: the second step
is ``image.upload``, which says what the bytes are (their size, SHA-256 and
MD5, as the API received them) and queues the image for them; the API then
sends them to the image service like ``image create --file`` does.
"""

from __future__ import annotations

from stratus.events.errors import Conflict, Invalid
from stratus.events.ids import new_id
from stratus.events.model import Cause, Event
from stratus.events.resources import (
    SYSTEM,
    ImageCreate,
    ImageCreated,
    ImageDeleted,
    ImageQueued,
    ImageUpload,
    ImageUploading,
    RefCommand,
)
from stratus.handlers.inventory import carried, unique, unused_name
from stratus.handlers.records import Image
from stratus.handlers.world import Aggregate, World, live_tenant


def _created(cmd: ImageCreate, cause: Cause, tenant: str, iid: str, visibility: str) -> Event:
    if cmd.format == "oci" and not cmd.checksum:
        raise Invalid("an oci image needs its archive (--file): it has no blank form")
    if cmd.checksum:
        if cmd.size_bytes <= 0:
            raise Invalid("an image with a checksum needs its size_bytes (the file's length)")
        cls: type[Event] = ImageQueued
    else:
        cls = ImageCreated
    return cause.make(cls, tenant, "image", iid, visibility=visibility, **carried(cmd, cls))


def decide_image_create(w: World, cmd: ImageCreate, cause: Cause) -> list[Event]:
    t = cmd.tenant or ""
    live_tenant(w, t)
    unique(w.images, cmd.name)
    return [_created(cmd, cause, t, new_id(), "private")]


def decide_image_upload(w: World, cmd: ImageUpload, cause: Cause) -> list[Event]:
    """Queue image ``ref`` for the bytes ``cmd`` describes. Nothing if it
    waits for (or holds) these already: a retried upload sends them again."""
    i = w.images.find(cmd.ref)
    if (i.checksum, i.format) == (cmd.checksum, cmd.format):
        return []
    if i.status != "queued" and i.checksum:
        raise Conflict(f"image {i.name or i.id} has its data already")
    fields = carried(cmd, ImageUploading)
    return [cause.make(ImageUploading, cmd.tenant or "", "image", i.id, **fields)]


def decide_image_delete(w: World, cmd: RefCommand, cause: Cause) -> list[Event]:
    i = w.images.find(cmd.ref)
    return [cause.make(ImageDeleted, cmd.tenant or "", "image", i.id)]


def decide_public_image_create(a: Aggregate[Image], cmd: ImageCreate, cause: Cause) -> list[Event]:
    unused_name(a, "public image", cmd.name)
    return [_created(cmd, cause, SYSTEM, cmd.name, "public")]
