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

An object the image bucket has must still be in the host's bucket, whole
(read and hashed, then dropped): a digest proves nothing, for every
image's digests are in the log, and an image naming another tenant's
private bytes would give them to the snapshot's tenant. The one exception
is what the snapshot inherits: the objects of the image the server runs
(an OCI snapshot's base layers), which its tenant may read already.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
from collections.abc import Collection, Iterable
from pathlib import Path
from typing import Any

from stratus.events.blobs import BlobStore, check_digest, upload_bucket
from stratus.events.errors import Forbidden, NotFound
from stratus.events.resources import ImageActivated, ImageCreated


def digests_of(event: ImageCreated | ImageActivated) -> list[str]:
    """The objects an image's bytes are: its file, or an OCI image's config
    and layers."""
    out = [event.checksum]
    if event.oci is not None:
        out += [d for d in event.oci.layers if d not in out]
    return out


async def adopt(
    js: Any,
    images: BlobStore,
    host: str,
    digests: Iterable[str],
    inherited: Collection[str] = (),
) -> int:
    """Check each object of ``digests`` against ``host``'s bucket and copy
    the ones the image bucket lacks (``Forbidden`` if one is not there,
    unless it is ``inherited`` and in the image bucket); how many were
    copied."""
    wanted = []
    for digest in digests:
        check_digest(digest)
        if digest not in wanted:
            wanted.append(digest)
    try:
        uploads = await BlobStore.open(js, bucket=upload_bucket(host))
    except Exception as exc:
        uploads = None
        why = f"host {host} uploaded nothing: {exc}"
    copied = 0
    with tempfile.TemporaryDirectory(prefix="stratus-snapshot-") as tmp:
        for digest in wanted:
            stored = await images.exists(digest) is not None
            if uploads is None or await uploads.exists(digest) is None:
                if stored and digest in inherited:
                    continue
                if uploads is None:
                    raise Forbidden(why)
                raise Forbidden(f"object {digest} is not in host {host}'s uploads")
            path = Path(tmp) / digest
            try:
                await uploads.get_file(digest, path)  # hashed: the bytes are the digest's
            except NotFound:
                raise Forbidden(f"object {digest} is not in host {host}'s uploads") from None
            if not stored:
                await images.put_file(digest, path)
                copied += 1
            with contextlib.suppress(OSError):
                await asyncio.to_thread(os.unlink, path)
    return copied
