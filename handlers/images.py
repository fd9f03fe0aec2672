"""Images: a tenant's private images (decided on its world, see
``handlers.world``) and public ones (cloud-wide, decided on their own
subject, named for good). The image's bytes are stored elsewhere (the
object store); these decisions record what the image is.

Glance makes an image in two steps, a record without bytes (``queued``)
and then its file, and the OpenStack API keeps no state between them: the
second step is ``image.upload``. Its bytes are checked and stored before
the command is sent, as ``image create --file`` does; the decision only
attaches what was stored to the record, once.
"""

from __future__ import annotations

from stratus.events.errors import Conflict
from stratus.events.ids import new_id
from stratus.events.model import Cause, Event
from stratus.events.resources import (
    SYSTEM,
    ImageCreate,
    ImageCreated,
    ImageDeleted,
    ImageUpload,
    ImageUploaded,
    RefCommand,
)
from stratus.handlers.inventory import carried, unique, unused_name
from stratus.handlers.records import Image
from stratus.handlers.world import Aggregate, World, live_tenant


def _created(cmd: ImageCreate, cause: Cause, tenant: str, iid: str, visibility: str) -> Event:
    fields = carried(cmd, ImageCreated)
    return cause.make(ImageCreated, tenant, "image", iid, visibility=visibility, **fields)


def decide_image_create(w: World, cmd: ImageCreate, cause: Cause) -> list[Event]:
    t = cmd.tenant or ""
    live_tenant(w, t)
    unique(w.images, cmd.name)
    return [_created(cmd, cause, t, new_id(), "private")]


def decide_image_upload(w: World, cmd: ImageUpload, cause: Cause) -> list[Event]:
    i = w.images.find(cmd.ref)
    if i.checksum:
        if (i.checksum, i.format) == (cmd.checksum, cmd.format):
            return []  # the same bytes again (a retried upload)
        raise Conflict(f"image {i.name or i.id} has its data already")
    fields = carried(cmd, ImageUploaded)
    fields["min_disk_gb"] = max(cmd.min_disk_gb, i.min_disk_gb)
    return [cause.make(ImageUploaded, cmd.tenant or "", "image", i.id, **fields)]


def decide_image_delete(w: World, cmd: RefCommand, cause: Cause) -> list[Event]:
    i = w.images.find(cmd.ref)
    return [cause.make(ImageDeleted, cmd.tenant or "", "image", i.id)]


def decide_public_image_create(a: Aggregate[Image], cmd: ImageCreate, cause: Cause) -> list[Event]:
    unused_name(a, "public image", cmd.name)
    return [_created(cmd, cause, SYSTEM, cmd.name, "public")]
