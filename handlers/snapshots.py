"""A snapshot's bytes, from its host's bucket into the image bucket.

A compute agent may not write the image bucket (``events.blobs``: the
broker cannot tell its objects from users' there); it puts a snapshot's
objects into its host's own bucket (``upload_bucket``) and reports
``image.created`` through the relay, which, once the report is the host's
to make, copies each object the image needs and the image bucket lacks:
read from the host's bucket and stored under its digest, every byte hashed
on both sides (``BlobStore``), so what lands is what the digest names. An
object already in the image bucket is left as it is: the same digest is
the same bytes, and nothing an agent sends can replace it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from stratus.events.blobs import BlobStore, check_digest, upload_bucket
from stratus.events.errors import Forbidden, NotFound
from stratus.events.resources import ImageCreated


def digests_of(event: ImageCreated) -> list[str]:
    """The objects an image's bytes are: its file, or an OCI image's config
    and layers."""
    out = [event.checksum]
    if event.oci is not None:
        out += [d for d in event.oci.layers if d not in out]
    return out


async def adopt(js: Any, images: BlobStore, host: str, digests: Iterable[str]) -> int:
    """Copy the objects of ``digests`` the image bucket lacks from ``host``'s
    bucket (``Forbidden`` if one is in neither); how many were copied."""
    missing = []
    for digest in digests:
        check_digest(digest)
        if await images.exists(digest) is None:
            missing.append(digest)
    if not missing:
        return 0
    try:
        uploads = await BlobStore.open(js, bucket=upload_bucket(host))
    except Exception as exc:
        raise Forbidden(f"host {host} uploaded nothing: {exc}") from None
    with tempfile.TemporaryDirectory(prefix="stratus-snapshot-") as tmp:
        for digest in missing:
            path = Path(tmp) / digest
            try:
                await uploads.get_file(digest, path)
            except NotFound:
                raise Forbidden(f"object {digest} is not in host {host}'s uploads") from None
            await images.put_file(digest, path)
            with contextlib.suppress(OSError):
                await asyncio.to_thread(os.unlink, path)
    return len(missing)
