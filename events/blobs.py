"""Content-addressed bytes in a JetStream Object Store bucket: image files
now, OCI layers next.

Nothing is shared through a disk: an image's bytes live in the bucket
``images`` and every host fetches them over NATS. Each object is named by
the SHA-256 of its bytes (``sha256/<hex>``), the digest an event already
records as the image's ``checksum``, so one file stored twice is one
object, and a name never holds other bytes than the ones it names:

- ``put`` hashes what it stores and refuses, before the object becomes
  visible, bytes whose digest is not the claimed one (nats-py publishes
  the chunks, then the object's meta; an error while reading purges the
  chunks, and the digest is checked as the last read);
- ``get`` hashes what it hands out and raises if it is not the name's.

The bucket uses file storage and as many replicas as the ``EVENTS``
stream, read from the stream itself, so a single node and a cluster need
no setting of their own. This module uses nats-py's public object store
API only (``object_store``, ``put``, ``get``, ``get_info``, ``delete``) and
the JetStream stream API for the janitor's view of the chunks.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import weakref
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import msgspec
import nats.errors
import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import ObjectMeta, ObjectMetaOptions, StorageType
from nats.js.object_store import ObjectStore

from stratus.events.cluster import log_replicas
from stratus.events.errors import Invalid, NotFound, StratusError, Unavailable

BUCKET = "images"
PREFIX = "sha256/"


def upload_bucket(host: str) -> str:
    """The bucket of ``host``'s compute agent for its snapshots' bytes: the
    only one its credential may write (``images`` is not: an object store's
    subjects carry an object's whole name in one token, so no permission
    can tell a snapshot's object from a user's image there). The report
    relay copies them into ``images``, checked, before it records the image."""
    return f"uploads-{host}"


# One message per chunk: larger than nats-py's 128 KiB default (fewer
# messages for the same bytes), well under the broker's 1 MB max_payload.
CHUNK_BYTES = 512 * 1024
HEX = frozenset("0123456789abcdef")


class DigestMismatch(Invalid):
    """The bytes do not hash to the digest they were stored or asked under."""


class BlobInfo(msgspec.Struct, frozen=True):
    """A stored object: its digest (hex SHA-256), size and when it was stored."""

    digest: str
    size: int
    stored_at: str = ""


def check_digest(digest: str) -> str:
    """A SHA-256 in lowercase hex, or ``Invalid``: it becomes an object name."""
    if len(digest) != 64 or not set(digest) <= HEX:
        raise Invalid(f"not a SHA-256 digest: {digest[:80]!r}")
    return digest


def object_name(digest: str) -> str:
    return PREFIX + check_digest(digest)


def _info(digest: str, obj: Any) -> BlobInfo:
    return BlobInfo(digest=digest, size=obj.size or 0, stored_at=obj.mtime or "")


def _unavailable(what: str, exc: BaseException) -> Unavailable:
    return Unavailable(f"object store: {what}: {exc or type(exc).__name__}")


class _Hashing(io.RawIOBase):
    """A file read through, hashed on the way; at its end, the digest must
    be ``expect`` or the read raises (which makes nats-py's ``put`` purge
    the chunks it sent and publish no meta: nothing becomes visible)."""

    def __init__(self, f: IO[bytes], expect: str, progress: Callable[[int], None] | None) -> None:
        self.f = f
        self.expect = expect
        self.h = hashlib.sha256()
        self.progress = progress
        self.size = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        n = self.f.readinto(b)  # type: ignore[attr-defined]
        if n:
            self.h.update(memoryview(b)[:n])
            self.size += n
            if self.progress is not None:
                self.progress(n)
            return n
        got = self.h.hexdigest()
        if got != self.expect:
            raise DigestMismatch(f"the bytes hash to {got}, not {self.expect}")
        return 0


class _Verifying(io.RawIOBase):
    """A file written through, hashed on the way (``get`` writes into it)."""

    def __init__(self, f: IO[bytes], progress: Callable[[int], None] | None) -> None:
        self.f = f
        self.h = hashlib.sha256()
        self.progress = progress
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        # All of it, even through an unbuffered file (a raw write may be short).
        view = memoryview(b)
        while view:
            view = view[self.f.write(view) or 0 :]
        n = len(b)
        self.h.update(b)
        self.size += len(b)
        if self.progress is not None:
            self.progress(len(b))
        return n


class BlobStore:
    """Put, get, test and delete bytes by their SHA-256 (hex).

    ``open`` finds or creates the bucket; every method translates broker
    failures into ``Unavailable`` and a missing object into ``NotFound``.
    """

    def __init__(self, js: JetStreamContext, obs: ObjectStore, bucket: str = BUCKET) -> None:
        self.js = js
        self.obs = obs
        self.bucket = bucket
        self.stream = f"OBJ_{bucket}"
        # Two puts of one digest at once in this process: the second waits
        # and finds the object (across processes, see ``sweep``).
        self._putting: weakref.WeakValueDictionary[str, asyncio.Lock] = (
            weakref.WeakValueDictionary()
        )

    @classmethod
    async def open(
        cls, js: JetStreamContext, *, bucket: str = BUCKET, like_stream: str = "EVENTS"
    ) -> BlobStore:
        """The bucket, created on first use with the replicas of ``like_stream``
        (raised to them if the stream gained replicas since)."""
        try:
            replicas = await log_replicas(js, like_stream)
            try:
                obs = await js.object_store(bucket)
            except nats.js.errors.BucketNotFoundError:
                try:
                    obs = await js.create_object_store(
                        bucket, storage=StorageType.FILE, replicas=replicas
                    )
                except nats.js.errors.BadRequestError:
                    # Another service created it at the same moment.
                    obs = await js.object_store(bucket)
            info = await js.stream_info(f"OBJ_{bucket}")
            if (info.config.num_replicas or 1) < replicas:
                info.config.num_replicas = replicas
                await js.update_stream(info.config)
        except (TimeoutError, nats.errors.Error) as exc:
            raise _unavailable(f"cannot open bucket {bucket}", exc) from None
        return cls(js, obs, bucket)

    async def replicas(self) -> int:
        try:
            info = await self.js.stream_info(self.stream)
        except (TimeoutError, nats.errors.Error) as exc:
            raise _unavailable("bucket info", exc) from None
        return info.config.num_replicas or 1

    async def exists(self, digest: str) -> BlobInfo | None:
        try:
            obj = await self.obs.get_info(object_name(digest))
        except nats.js.errors.ObjectNotFoundError:
            return None
        except nats.js.errors.NotFoundError:
            return None
        except (TimeoutError, nats.errors.Error) as exc:
            raise _unavailable(f"info of {digest}", exc) from None
        return _info(digest, obj)

    async def put(
        self,
        digest: str,
        source: IO[bytes],
        *,
        progress: Callable[[int], None] | None = None,
    ) -> BlobInfo:
        """Store the bytes of ``source`` (read to its end) as ``digest``.

        Bytes that do not hash to ``digest`` raise ``DigestMismatch`` and
        leave nothing in the bucket. Already stored: nothing is sent again.
        ``progress(n)`` is called with each chunk's size, from a worker
        thread (nats-py reads files in its executor).
        """
        name = object_name(digest)
        lock = self._putting.get(digest)
        if lock is None:
            lock = self._putting[digest] = asyncio.Lock()
        async with lock:
            found = await self.exists(digest)
            if found is not None:
                return found
            reader = _Hashing(source, digest, progress)
            meta = ObjectMeta(name=name, options=ObjectMetaOptions(max_chunk_size=CHUNK_BYTES))
            try:
                obj = await self.obs.put(name, reader, meta=meta)
            except StratusError:
                raise
            except (TimeoutError, nats.errors.Error) as exc:
                raise _unavailable(f"storing {digest}", exc) from None
        stored = _hex(obj.digest)
        if stored != digest or obj.size != reader.size:
            # nats-py hashed what it sent itself: a disagreement is a bug, and
            # the object must not stay under a name it does not match.
            await self.delete(digest)
            raise DigestMismatch(f"the store recorded {stored}, not {digest}")
        # As stored (nats-py's answer carries a time of its own making).
        return await self.exists(digest) or _info(digest, obj)

    async def get(
        self,
        digest: str,
        sink: IO[bytes],
        *,
        progress: Callable[[int], None] | None = None,
        timeout: float | None = None,
    ) -> BlobInfo:
        """Write the bytes of ``digest`` into ``sink``, checked against it.

        ``timeout`` bounds the whole transfer (default: a minute plus a
        second per 4 MiB, so a stalled stream cannot hang a build)."""
        name = object_name(digest)
        found = await self.exists(digest)
        if found is None:
            raise NotFound(f"no object {digest} in bucket {self.bucket}")
        writer = _Verifying(sink, progress)
        limit = timeout if timeout is not None else 60 + found.size / (4 << 20)
        try:
            await asyncio.wait_for(self.obs.get(name, writeinto=writer), limit)
        except nats.js.errors.DigestMismatchError:
            raise DigestMismatch(f"object {digest} is corrupt in the store") from None
        except nats.js.errors.ObjectNotFoundError:
            raise NotFound(f"no object {digest} in bucket {self.bucket}") from None
        except TimeoutError:
            raise Unavailable(f"object {digest}: not fetched within {limit:.0f}s") from None
        except nats.errors.Error as exc:
            raise _unavailable(f"fetching {digest}", exc) from None
        got = writer.h.hexdigest()
        if got != digest or writer.size != found.size:
            raise DigestMismatch(f"object {digest} came back as {got} ({writer.size} bytes)")
        return found

    async def put_file(
        self, digest: str, path: Path, *, progress: Callable[[int], None] | None = None
    ) -> BlobInfo:
        """``put`` of a file's bytes."""
        f = await asyncio.to_thread(open, path, "rb")
        try:
            return await self.put(digest, f, progress=progress)
        finally:
            f.close()

    async def get_file(
        self, digest: str, path: Path, *, progress: Callable[[int], None] | None = None
    ) -> BlobInfo:
        """``get`` into ``path`` (created 0600, or emptied). Written unbuffered:
        once ``progress`` has counted bytes, another descriptor can read them."""
        fd = await asyncio.to_thread(os.open, path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        f = io.FileIO(fd, "wb")
        try:
            return await self.get(digest, f, progress=progress)
        finally:
            f.close()

    async def delete(self, digest: str) -> bool:
        """Remove the object and its chunks; False if there was none."""
        try:
            await self.obs.delete(object_name(digest))
        except (nats.js.errors.ObjectNotFoundError, nats.js.errors.NotFoundError):
            return False
        except (TimeoutError, nats.errors.Error) as exc:
            raise _unavailable(f"deleting {digest}", exc) from None
        return True

    async def stored(self) -> list[BlobInfo]:
        """Every live object of the bucket."""
        out: list[BlobInfo] = []
        try:
            entries = await self.obs.list(ignore_deletes=True)
        except nats.js.errors.NotFoundError:
            return out  # an empty bucket
        except (TimeoutError, nats.errors.Error) as exc:
            raise _unavailable("listing", exc) from None
        for e in entries:
            if e.name.startswith(PREFIX) and not e.deleted:
                out.append(_info(e.name[len(PREFIX) :], e))
        return out

    async def chunk_subjects(self) -> dict[str, int]:
        """Chunk subject -> message count, for every object's chunks in the
        bucket (the objects' own, and those of a put that never finished)."""
        try:
            info = await self.js.stream_info(self.stream, subjects_filter=f"$O.{self.bucket}.C.>")
        except (TimeoutError, nats.errors.Error) as exc:
            raise _unavailable("chunk listing", exc) from None
        return dict(info.state.subjects or {})

    async def sweep(self, grace_s: float) -> int:
        """Purge chunks that no object owns, once the newest of them is
        older than ``grace_s``: a put that died (its process killed between
        the first chunk and the meta) or lost a race with another put of
        the same digest. A put in progress sends a chunk at least every few
        seconds, so a grace of minutes never touches one. The number of
        objects' worth of chunks purged."""
        subjects = await self.chunk_subjects()
        if not subjects:
            return 0
        try:
            entries = await self.obs.list(ignore_deletes=True)
        except nats.js.errors.NotFoundError:
            entries = []
        except (TimeoutError, nats.errors.Error) as exc:
            raise _unavailable("listing", exc) from None
        owned = {e.nuid for e in entries if not e.deleted}
        now = datetime.now(UTC)
        purged = 0
        for subject in subjects:
            if subject.rsplit(".", 1)[-1] in owned:
                continue
            try:
                last = await self.js.get_last_msg(self.stream, subject)
                age = (now - last.time).total_seconds() if last.time else grace_s
                if age < grace_s:
                    continue
                await self.js.purge_stream(self.stream, subject=subject)
            except nats.js.errors.NotFoundError:
                continue  # purged meanwhile
            except (TimeoutError, nats.errors.Error) as exc:
                raise _unavailable("purging orphan chunks", exc) from None
            purged += 1
        return purged


def _hex(nats_digest: str | None) -> str:
    """nats-py's ``SHA-256=<urlsafe base64>`` as lowercase hex."""
    import base64

    if not nats_digest or "=" not in nats_digest:
        return ""
    b64 = nats_digest.split("=", 1)[1]
    try:
        return base64.urlsafe_b64decode(b64 + "=" * (-len(b64) % 4)).hex()
    except ValueError:
        return ""
