"""Images: a tenant's private images (decided on its world, see
``handlers.world``) and public ones (cloud-wide, decided on their own
subject, named for good). The image's bytes are stored elsewhere (the
object store); these decisions record what the image is.
"""

from __future__ import annotations

from stratus.events.ids import new_id
from stratus.events.model import Cause, Event
from stratus.events.resources import SYSTEM, ImageCreate, ImageCreated, ImageDeleted, RefCommand
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


def decide_image_delete(w: World, cmd: RefCommand, cause: Cause) -> list[Event]:
    i = w.images.find(cmd.ref)
    return [cause.make(ImageDeleted, cmd.tenant or "", "image", i.id)]


def decide_public_image_create(a: Aggregate[Image], cmd: ImageCreate, cause: Cause) -> list[Event]:
    unused_name(a, "public image", cmd.name)
    return [_created(cmd, cause, SYSTEM, cmd.name, "public")]
