"""The image service: image bytes from clients into the object store, and
back out, over request/reply (the protocol is ``events.transfer``).

Why a service in between: clients get no JetStream rights at all (they
may send ``cmd.>``/``q.>`` requests and read their inbox), so none can
write, overwrite or read an object, however it is named. This service
holds the right to write the ``images`` bucket and uses it only for bytes
it has checked:

1. ``image create NAME --file F`` records ``image.queued`` with the size
   and SHA-256 the client computed (a command like any other).
2. The client opens an upload (``cmd.image.upload.open``: its token must
   allow ``image.create`` in the image's tenant, and the image must be
   queued) and sends the file in numbered chunks, at most a window of
   them unanswered; a chunk is answered once the store has room for it.
3. This replica passes the chunks, as they come, to the object store's
   ``put`` (``events.blobs``), writing them to a spool file of its own on
   the way (mode 0600 in a 0700 directory). Once the last is read it
   checks the size, the SHA-256 and, with ``qemu-img info`` on the spool
   file, the format (as claimed, no backing or data file); only then does
   ``put`` publish the object's meta, so no unchecked bytes are ever an
   object. Then ``image.activated`` is appended on the condition that the
   image's subject has not moved: the image is active.

Refused bytes (size, checksum, format) are answered ``invalid``: the chunks
sent are purged, no event is appended. A client that stops sending
(killed, disconnected) leaves a session nothing reaches for ``idle_s``:
its chunks are purged, the spool file deleted, and ``image.upload-failed``
says why on the image, which stays queued for another upload. A process
that dies in the middle of a ``put`` may leave chunks without an object;
``sweep`` (at start and every few minutes) purges those once they are
older than any live upload's pauses.

Downloads run the other way: the object is fetched (and verified) into a
spool file while the client reads the chunks already there.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import os
import queue
import secrets
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import structlog
from nats.aio.msg import Msg

from stratus.events import imagefile, oci
from stratus.events.blobs import BlobStore, DigestMismatch
from stratus.events.commands import H_COMMAND_ID, Reply, explain
from stratus.events.errors import (
    ConcurrencyConflict,
    Conflict,
    Forbidden,
    Invalid,
    NotFound,
    StratusError,
    Unavailable,
)
from stratus.events.ids import is_name, is_token, new_id
from stratus.events.model import Cause
from stratus.events.resources import SYSTEM, ImageActivated, ImageUploadFailed
from stratus.events.responder import Responder
from stratus.events.store import Condition, EventStore
from stratus.events.tasks import cancel
from stratus.events.transfer import (
    BUSY,
    H_DONE,
    H_OFFSET,
    MAX_CHUNK,
    OPEN_SUBJECTS,
    QUEUE_GROUP,
    WINDOW,
    Chunk,
    Opened,
    TransferOpen,
    download_subject,
    upload_subject,
)
from stratus.handlers.rbac import TRUSTED, Caller, RoleBook, authorize
from stratus.handlers.records import Image, view
from stratus.handlers.world import Aggregate, World, fold, fold_aggregate, system_subject

log = structlog.get_logger("stratus.images")

# A session no request reached for this long is over (its client is gone).
IDLE_S = 30.0
MAX_SESSIONS = 16
# Uploads at once: each holds a thread of the event loop's default executor
# (nats-py's put reads there) for as long as its client sends, and the
# agents and other services of ``stratus up`` share those few threads.
MAX_UPLOADS = 2
# The janitor: how often, and how old chunks without an object must be.
SWEEP_INTERVAL_S = 300.0
SWEEP_GRACE_S = 600.0
# Appends that find the image's subject moved look again this often.
MAX_ATTEMPTS = 4

Authenticate = Callable[[dict[str, str]], Caller]
_open = msgspec.json.Decoder(TransferOpen)
_chunk = msgspec.msgpack.Encoder()


class Located(msgspec.Struct):
    """An image as the log has it: its record, subject and that subject's
    last sequence (what an append about it is conditioned on)."""

    image: Image
    subject: str
    seq: int


class ImageService(Responder):
    """Opens transfer sessions (queue group ``images``) and serves them.

    Without ``authenticate`` every caller is trusted as the cloud
    administrator (tests, ``serve handlers --insecure-no-auth``).
    """

    internal_message = "internal error; see the image service log"
    failed = "image transfer failed"

    def __init__(
        self,
        store: EventStore,
        *,
        spool: Path,
        authenticate: Authenticate | None = None,
        roles: RoleBook | None = None,
        idle_s: float = IDLE_S,
        max_sessions: int = MAX_SESSIONS,
        max_uploads: int = MAX_UPLOADS,
        sweep_interval_s: float = SWEEP_INTERVAL_S,
        sweep_grace_s: float = SWEEP_GRACE_S,
    ) -> None:
        super().__init__(store.nc, OPEN_SUBJECTS, queue=QUEUE_GROUP, log=log)
        self.store = store
        # This instance's own directory under ``spool``.
        self.spool = Path(spool) / f"{os.getpid()}-{secrets.token_hex(4)}"
        self.authenticate = authenticate
        self.roles = roles
        self.idle_s = idle_s
        self.max_sessions = max_sessions
        self.max_uploads = max_uploads
        self.sweep_interval_s = sweep_interval_s
        self.sweep_grace_s = sweep_grace_s
        self.blobs: BlobStore | None = None
        self.sessions: dict[str, _Session] = {}
        self._tasks_bg: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        await asyncio.to_thread(self._prepare_spool)
        self.blobs = await BlobStore.open(self.store.js)
        with contextlib.suppress(StratusError):
            await self.sweep()
        self._tasks_bg = [
            asyncio.create_task(self._watch(), name="image-sessions"),
            asyncio.create_task(self._sweeping(), name="image-janitor"),
        ]
        await super().start()

    def _prepare_spool(self) -> None:
        """A spool directory of this service's own (several may share a data
        dir). Sessions do not outlive their process: what a dead one left
        is a transfer nobody will finish."""
        root = self.spool.parent
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(root, 0o700)
        for old in root.iterdir():
            pid = old.name.split("-", 1)[0]
            if old.is_dir() and pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(old, ignore_errors=True)
        self.spool.mkdir(mode=0o700)

    async def stop(self) -> None:
        await super().stop()
        await asyncio.gather(*(cancel(t) for t in self._tasks_bg))
        self._tasks_bg = []
        for s in list(self.sessions.values()):
            await s.abort("the image service stopped")
        await asyncio.to_thread(shutil.rmtree, self.spool, True)

    # -- opening a session ----------------------------------------------------------

    def caller(self, headers: dict[str, str]) -> Caller:
        return TRUSTED if self.authenticate is None else self.authenticate(headers)

    async def answer(self, msg: Msg) -> Reply:
        headers = msg.headers or {}
        caller = self.caller(headers)
        try:
            cmd = _open.decode(msg.data or b"{}")
        except msgspec.ValidationError as exc:
            raise Invalid(f"image transfer: {explain(exc)}") from None
        except msgspec.DecodeError:
            raise Invalid("image transfer: body is not a JSON object") from None
        if cmd.tenant is None:
            cmd = msgspec.structs.replace(cmd, tenant=caller.tenant)
        command_id = headers.get(H_COMMAND_ID, "")
        cause = Cause(
            actor=caller.user,
            correlation_id=command_id if is_token(command_id) else new_id(),
            causation_id=command_id if is_token(command_id) else new_id(),
        )
        if len(self.sessions) >= self.max_sessions:
            raise Unavailable(f"{BUSY}: {len(self.sessions)} transfers under way; retry shortly")
        if msg.subject.split(".")[2] == "upload":
            opened = await self._open_upload(caller, cmd, cause)
        else:
            opened = await self._open_download(caller, cmd, cause)
        return Reply(ok=True, data=msgspec.to_builtins(opened))

    async def _open_upload(self, caller: Caller, cmd: TransferOpen, cause: Cause) -> Opened:
        if cmd.public:
            authorize(caller, "image.create-public", None, self.roles)
        else:
            authorize(caller, "image.create", cmd.tenant, self.roles)
        found = await self.locate(cmd.tenant or "", cmd.ref, cmd.public)
        image = found.image
        if image.status != "queued":
            raise Conflict(f"image {image.name} is {image.status}: only a queued image takes bytes")
        uploads = sum(isinstance(s, _Upload) for s in self.sessions.values())
        if uploads >= self.max_uploads:
            # Each holds a worker thread while the store reads its bytes.
            raise Unavailable(f"{BUSY}: {uploads} uploads under way; retry shortly")
        if any(isinstance(s, _Upload) and s.image.id == image.id for s in self.sessions.values()):
            raise Conflict(f"image {image.name} is being uploaded already")
        free = await asyncio.to_thread(shutil.disk_usage, self.spool)
        if free.free < image.size_bytes + (64 << 20):
            raise Unavailable(f"no room for {image.size_bytes} bytes on the image service; retry")
        session = _Upload(self, caller.user, found, cause)
        await self._begin(session)
        log.info(
            "upload opened",
            image=image.id,
            size=image.size_bytes,
            session=session.id,
            correlation_id=cause.correlation_id,
        )
        return session.opened(upload_subject(session.id))

    async def _open_download(self, caller: Caller, cmd: TransferOpen, cause: Cause) -> Opened:
        found = None
        if not cmd.public:
            authorize(caller, "image.read", cmd.tenant, self.roles)
            with contextlib.suppress(NotFound):
                found = await self.locate(cmd.tenant or "", cmd.ref, public=False)
        if found is None:
            # Any caller may read a public image (by its name).
            found = await self.locate(cmd.tenant or "", cmd.ref, public=True)
        image = found.image
        if image.status != "active" or not image.checksum:
            why = "has no file" if image.status == "active" else f"is {image.status}"
            raise Conflict(f"image {image.name} {why}: nothing to download")
        session = _Download(self, caller.user, found, cause)
        await self._begin(session)
        return session.opened(download_subject(session.id))

    async def _begin(self, session: _Session) -> None:
        self.sessions[session.id] = session
        try:
            await session.begin()
        except BaseException:
            await session.abort("it could not start")
            raise

    # -- the log ----------------------------------------------------------------------

    async def locate(self, tenant: str, ref: str, public: bool) -> Located:
        """Image ``ref`` (id or name) of ``tenant``, or the public one named
        ``ref``, as of the log now; else ``NotFound``."""
        if public:
            subject = system_subject("image", ref) if is_name(ref) else ""
            state: Aggregate[Image] = Aggregate()
            seq = 0
            if subject:
                for rec in await self.store.read_all(subjects=[subject]):
                    fold_aggregate(state, rec.decode(self.store.codec))
                    seq = rec.seq
            if state.attrs is None:
                raise NotFound(f"public image {ref} not found")
            return Located(state.attrs, subject, seq)
        w = World()
        w.tenant = tenant
        last: dict[str, int] = {}
        for rec in await self.store.read_all(subjects=[f"ev.{tenant}.image.*"]):
            fold(w, rec.decode(self.store.codec))
            last[rec.subject] = rec.seq
        image = w.images.find(ref)
        subject = f"ev.{tenant}.image.{image.id}"
        return Located(image, subject, last.get(subject, 0))

    async def record(self, session: _Session, cls: type, **fields: Any) -> Image:
        """Append ``cls`` about the session's image on the condition that its
        subject has not moved, looking again (bounded) if it has: an
        earlier session's ``image.upload-failed`` may have landed since."""
        found = session.found
        image = found.image
        for _ in range(MAX_ATTEMPTS):
            tenant = image.tenant if isinstance(image.tenant, str) else SYSTEM
            event = session.cause.make(cls, tenant, "image", image.id, **fields)
            try:
                await self.store.append([event], Condition(found.subject, found.seq))
            except ConcurrencyConflict:
                found = await self.locate(tenant, image.id, tenant == SYSTEM)
                if found.image.status != "queued" or found.image.checksum != image.checksum:
                    raise Conflict(
                        f"image {image.name} changed during the upload "
                        f"(it is {found.image.status} now)"
                    ) from None
                continue
            after = await self.locate(tenant, image.id, tenant == SYSTEM)
            return after.image
        raise Conflict(f"image {image.name} kept changing; upload again")

    # -- the janitor --------------------------------------------------------------------

    async def sweep(self) -> int:
        """Purge chunks no object owns (see ``BlobStore.sweep``)."""
        assert self.blobs is not None
        purged = await self.blobs.sweep(self.sweep_grace_s)
        if purged:
            log.info("orphan chunks purged", objects=purged)
        return purged

    async def _sweeping(self) -> None:
        while True:
            await asyncio.sleep(self.sweep_interval_s)
            try:
                await self.sweep()
            except StratusError as exc:
                log.warning("sweep failed", error=exc.message)

    async def _watch(self) -> None:
        """End the sessions whose client stopped asking."""
        while True:
            await asyncio.sleep(min(self.idle_s / 4, 5.0))
            now = time.monotonic()
            for s in list(self.sessions.values()):
                if not s.working() and now - s.last > self.idle_s:
                    await s.interrupted(now - s.last)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _Session(Responder):
    """One transfer: its own subject, served by this replica alone."""

    def __init__(self, svc: ImageService, user: str, found: Located, cause: Cause) -> None:
        self.id = secrets.token_hex(16)
        self.svc = svc
        self.user = user
        self.found = found
        self.image = found.image
        self.cause = cause
        self.path = svc.spool / f"{self.id}.part"
        self.last = time.monotonic()
        self.closed = False
        self._waiters: list[asyncio.Future[None]] = []
        super().__init__(svc.nc, "", max_in_flight=WINDOW + 2, log=log)

    def wake(self) -> None:
        """The session moved on: every request waiting looks again."""
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)

    async def until(self, ready: Callable[[], bool], timeout: float) -> None:
        """Wait (at most ``timeout``) until ``ready()`` or the session closed."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not (ready() or self.closed):
            left = deadline - loop.time()
            if left <= 0:
                raise TimeoutError
            waiter = loop.create_future()
            self._waiters.append(waiter)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(waiter, left)

    def opened(self, subject: str) -> Opened:
        self.subject = subject
        return Opened(
            session=self.id,
            subject=subject,
            size=self.image.size_bytes,
            checksum=self.image.checksum,
            format=self.image.format,
            chunk_bytes=MAX_CHUNK,
            window=WINDOW,
            image=view(self.image),
        )

    async def begin(self) -> None:
        raise NotImplementedError

    def check(self, msg: Msg) -> tuple[int, bool]:
        """The request's offset and whether it is the last; its caller must
        be the session's user."""
        headers = msg.headers or {}
        caller = self.svc.caller(headers)
        if caller.user != self.user:
            raise Forbidden("this transfer belongs to another user")
        if self.closed:
            raise Conflict("this transfer is over")
        self.last = time.monotonic()
        try:
            offset = int(headers.get(H_OFFSET, ""))
        except ValueError:
            raise Invalid(f"header {H_OFFSET} must be a byte offset") from None
        if not 0 <= offset <= self.image.size_bytes:
            raise Invalid(f"offset {offset} is outside the image's {self.image.size_bytes} bytes")
        return offset, headers.get(H_DONE) == "1"

    async def close(self) -> None:
        """Stop serving and remove the spool file. Not ``stop``: that waits
        for the requests in flight, and this may run inside one."""
        if self.closed:
            return
        self.closed = True
        self.svc.sessions.pop(self.id, None)
        subs, self._subs = self._subs, []
        for sub in subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        self.wake()
        self._release()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def _release(self) -> None:
        pass

    def working(self) -> bool:
        """Busy without requests (storing): not idle, however long it takes."""
        return False

    async def abort(self, why: str, record: bool = True) -> None:
        await self.close()

    async def interrupted(self, idle: float) -> None:
        await self.abort(f"no request for {idle:.0f}s")


class _Interrupted(Exception):
    """An upload that ends without all its bytes; ``record``: say so on the
    image (not when the client itself ended it early)."""

    def __init__(self, why: str, record: bool = True) -> None:
        super().__init__(why)
        self.why = why
        self.record = record


class _Incoming(io.RawIOBase):
    """An upload's bytes as the object store's ``put`` reads them (in a
    worker thread): handed over by the event loop chunk by chunk, written to
    the spool file and hashed on the way, and checked once the last is read
    (size, SHA-256, then ``qemu-img info`` on the spool file: format as
    claimed, no backing or data file). A failed check or a stalled client
    raises from the read, which makes ``put`` purge what it sent and store
    nothing; so the bucket never shows bytes that were not checked.

    ``taken`` is called (in the loop) as each chunk leaves the queue: the
    queue holds at most a window of chunks, which is the flow control.
    """

    def __init__(
        self,
        image: Image,
        fd: int,
        path: Path,
        idle_s: float,
        taken: Callable[[], None],
    ) -> None:
        self.image = image
        # Off when ``put`` reads: it hashes what it stores and refuses a
        # wrong digest itself (``events.blobs``).
        self.hashing = True
        self.fd = fd
        self.path = path
        self.idle_s = idle_s
        self.queue: queue.SimpleQueue[bytes] = queue.SimpleQueue()
        self.loop = asyncio.get_running_loop()
        self.taken = taken
        self.h = hashlib.sha256()
        self.read = 0
        self.left = b""
        self.stop = threading.Event()
        self.why: _Interrupted | None = None
        self.checked: imagefile.ImageFile | None = None

    def readable(self) -> bool:
        return True

    def abort(self, why: _Interrupted) -> None:
        """Make the reader raise ``why`` (from any thread)."""
        self.why = why
        self.stop.set()

    def readinto(self, b: Any) -> int:
        if not self.left:
            if self.read == self.image.size_bytes:
                self._check()
                return 0
            self.left = self._next()
            self.read += len(self.left)
            # On the spool file, hashed: in this thread, off the loop.
            view = memoryview(self.left)
            while view:
                view = view[os.write(self.fd, view) :]
            if self.hashing:
                self.h.update(self.left)
            self.loop.call_soon_threadsafe(self.taken)
        n = min(len(b), len(self.left))
        b[:n] = self.left[:n]
        self.left = self.left[n:]
        return n

    def _next(self) -> bytes:
        deadline = time.monotonic() + self.idle_s
        while True:
            if self.stop.is_set():
                raise self.why or _Interrupted("aborted")
            try:
                return self.queue.get(timeout=0.25)
            except queue.Empty:
                if time.monotonic() > deadline:
                    raise _Interrupted(f"no data for {self.idle_s:.0f}s") from None

    def _check(self) -> None:
        if self.checked is not None:
            return
        image = self.image
        self.close()
        if self.hashing:
            got = self.h.hexdigest()
            if got != image.checksum:
                raise DigestMismatch(f"the bytes hash to {got}, not {image.checksum}")
        if image.format == "oci":
            # An archive of blobs: read and checked whole by ``_store_oci``.
            size = self.path.stat().st_size
            self.checked = imagefile.ImageFile(str(self.path), "oci", size, 0, image.checksum)
            return
        self.checked = imagefile.inspect(self.path, image.format, "", image.checksum)

    def drain(self) -> None:
        """Read (and check) everything without storing it: for bytes the
        bucket holds already, which must still be the ones claimed."""
        buf = bytearray(MAX_CHUNK)
        while self.readinto(buf):
            pass

    def close(self) -> None:
        """Close the spool file (once no read is running: ``_Upload._store``)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        super().close()


class _Upload(_Session):
    """Bytes in: written through to the object store as they come (the
    store's own ``put`` reads them), then ``image.activated``."""

    def __init__(self, svc: ImageService, user: str, found: Located, cause: Cause) -> None:
        super().__init__(svc, user, found, cause)
        self.received = 0
        self.reader: _Incoming | None = None
        self.stored: asyncio.Task[Image] | None = None
        self.slots = asyncio.Semaphore(WINDOW)

    async def begin(self) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        self.reader = _Incoming(self.image, fd, self.path, self.svc.idle_s, self.slots.release)
        self.stored = asyncio.create_task(self._store(), name=f"upload-{self.id}")
        self.subject = upload_subject(self.id)
        await self.start()

    def working(self) -> bool:
        # Every byte is in: the store is checking and writing them.
        return self.received == self.image.size_bytes and not self.stored_done()

    def stored_done(self) -> bool:
        return self.stored is not None and self.stored.done()

    async def _store(self) -> Image:
        """Bytes to the bucket as they come, checked; then the image is
        active. Runs without the client once its bytes are all in."""
        assert self.reader is not None and self.svc.blobs is not None
        image = self.image
        if image.format == "oci":
            return await self._store_oci()
        try:
            if await self.svc.blobs.exists(image.checksum):
                # Stored before (by another image): the bytes must still be
                # these, and are checked, but need not be stored twice.
                await asyncio.to_thread(self.reader.drain)
            else:
                self.reader.hashing = False
                await self.svc.blobs.put(image.checksum, self.reader)
        except DigestMismatch as exc:
            log.info("upload refused", image=image.id, reason=exc.message)
            raise Invalid(f"checksum mismatch: {exc.message}") from None
        except _Interrupted as exc:
            reason = f"upload interrupted after {self.received} of {image.size_bytes} bytes"
            log.info("upload interrupted", image=image.id, reason=exc.why)
            if exc.record:
                with contextlib.suppress(StratusError):
                    await self.svc.record(self, ImageUploadFailed, reason=f"{reason}: {exc.why}")
            raise
        except Invalid as exc:
            # Refused bytes: nothing recorded, nothing kept; the client hears why.
            log.info("upload refused", image=image.id, reason=exc.message)
            raise
        finally:
            # No read is running any more (put and drain have returned).
            self.reader.close()
        checked = self.reader.checked
        assert checked is not None
        after = await self.svc.record(
            self,
            ImageActivated,
            size_bytes=checked.size_bytes,
            checksum=checked.checksum,
            min_disk_gb=imagefile.min_disk_gb(checked.virtual_size),
            reason="",
        )
        log.info(
            "image stored",
            image=image.id,
            checksum=image.checksum,
            correlation_id=self.cause.correlation_id,
        )
        return after

    async def _store_oci(self) -> Image:
        """An OCI archive: spooled and hashed whole, then read (``events.oci``:
        every digest, every layer's entries); only then is each blob stored
        by its own digest (once: a layer two images share is one object),
        and ``image.activated`` records the layers and the image's process.
        A refused archive stores nothing; the spool and its copies go."""
        assert self.reader is not None and self.svc.blobs is not None
        image = self.image
        work = self.path.with_name(self.path.name + ".d")
        try:
            try:
                await asyncio.to_thread(self.reader.drain)
            except DigestMismatch as exc:
                raise Invalid(f"checksum mismatch: {exc.message}") from None
            finally:
                self.reader.close()
            work.mkdir(mode=0o700)
            archive = await asyncio.to_thread(oci.read_archive, self.path, work)
            for digest, path in archive.paths():
                if not await self.svc.blobs.exists(digest):
                    await self.svc.blobs.put_file(digest, path)
        except _Interrupted as exc:
            log.info("upload interrupted", image=image.id, reason=exc.why)
            if exc.record:
                with contextlib.suppress(StratusError):
                    reason = f"upload interrupted after {self.received} bytes: {exc.why}"
                    await self.svc.record(self, ImageUploadFailed, reason=reason)
            raise
        except Invalid as exc:
            log.info("upload refused", image=image.id, reason=exc.message)
            raise
        finally:
            await asyncio.to_thread(shutil.rmtree, work, True)
        after = await self.svc.record(
            self,
            ImageActivated,
            size_bytes=image.size_bytes,
            checksum=archive.digest,
            min_disk_gb=0,
            reason="",
            oci=archive.config,
        )
        log.info("oci image stored", image=image.id, layers=len(archive.config.layers))
        return after

    async def answer(self, msg: Msg) -> Reply:
        offset, done = self.check(msg)
        data = msg.data or b""
        if done:
            return await self._commit(offset)
        if len(data) > MAX_CHUNK:
            raise Invalid(f"a chunk is at most {MAX_CHUNK} bytes, not {len(data)}")
        if offset + len(data) > self.image.size_bytes:
            raise Invalid(
                f"{offset + len(data)} bytes is more than the {self.image.size_bytes} "
                "the image was created with"
            )
        if offset > self.received + WINDOW * MAX_CHUNK:
            raise Invalid(f"offset {offset} is beyond the window (received {self.received})")
        await self._turn(offset)
        if offset < self.received:
            # A chunk sent again (a retry): already taken.
            if offset + len(data) > self.received:
                raise Invalid(f"chunk at {offset} overlaps bytes already received")
            return Reply(ok=True, data={"received": self.received})
        if self.stored_done():
            await self._outcome()  # the store ended early: its reason
        try:
            # A slot frees as the store takes a chunk: at most a window waits.
            await asyncio.wait_for(self.slots.acquire(), self.svc.idle_s)
        except TimeoutError:
            raise Unavailable("the object store is not taking the bytes; upload again") from None
        assert self.reader is not None
        self.reader.queue.put(data)
        self.received += len(data)
        self.wake()
        return Reply(ok=True, data={"received": self.received})

    async def _turn(self, offset: int) -> None:
        """Until everything before ``offset`` is in (requests answered out of
        order wait here for their predecessors)."""
        try:
            await self.until(lambda: self.received >= offset, self.svc.idle_s)
        except TimeoutError:
            raise Invalid(f"bytes before offset {offset} never came") from None
        if self.closed:
            raise Conflict("this transfer is over")

    async def _outcome(self) -> Image:
        """What the store came to, as the client should hear it."""
        assert self.stored is not None
        try:
            return await asyncio.shield(self.stored)
        except Invalid as exc:
            raise Invalid(f"image {self.image.name}: {exc.message}") from None
        except _Interrupted as exc:
            raise Conflict(f"the upload was interrupted: {exc.why}") from None

    async def _commit(self, offset: int) -> Reply:
        await self._turn(offset)
        if self.received != self.image.size_bytes:
            # Ended early by the client: it knows why; nothing is recorded.
            await self.abort(f"ended after {self.received} bytes", record=False)
            raise Invalid(f"got {self.received} of the image's {self.image.size_bytes} bytes")
        try:
            after = await self._outcome()
        finally:
            await self.close()
        return Reply(ok=True, data=view(after))

    async def abort(self, why: str, record: bool = True) -> None:
        """End the session; an upload still waiting for bytes is interrupted
        (and, with ``record``, says so on the image, which stays queued)."""
        if self.closed:
            return
        if self.reader is not None:
            self.reader.abort(_Interrupted(why, record))
        if self.stored is not None:
            with contextlib.suppress(BaseException):
                await self.stored
        await self.close()


class _Download(_Session):
    def __init__(self, svc: ImageService, user: str, found: Located, cause: Cause) -> None:
        super().__init__(svc, user, found, cause)
        self.written = 0
        self.error: StratusError | None = None
        self.fd = -1
        self._fetch: asyncio.Task[None] | None = None

    async def begin(self) -> None:
        # The reader's descriptor; the fetch writes through its own, unbuffered,
        # so what ``written`` counts is in the file.
        os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        self.fd = os.open(self.path, os.O_RDONLY)
        self.subject = download_subject(self.id)
        self._fetch = asyncio.create_task(self._fetching())
        await self.start()

    def _release(self) -> None:
        if self._fetch is not None and not self._fetch.done():
            self._fetch.cancel()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    async def _fetching(self) -> None:
        loop = asyncio.get_running_loop()

        def advanced(n: int) -> None:  # in nats-py's writer thread
            loop.call_soon_threadsafe(self._advance, n)

        assert self.svc.blobs is not None
        try:
            await self.svc.blobs.get_file(self.image.checksum, self.path, progress=advanced)
        except StratusError as exc:
            self.error = exc
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("download fetch failed", image=self.image.id)
            self.error = Unavailable(f"fetching the image failed: {type(exc).__name__}")
        self.wake()

    def _advance(self, n: int) -> None:
        self.written += n
        self.last = time.monotonic()
        self.wake()

    async def answer(self, msg: Msg) -> Reply | bytes:
        offset, done = self.check(msg)
        if done:
            await self.close()
            return Reply(ok=True, data={"closed": True})
        end = min(offset + MAX_CHUNK, self.image.size_bytes)
        try:
            await self.until(lambda: self.written >= end or self.error is not None, self.svc.idle_s)
        except TimeoutError:
            raise Unavailable("the image is not coming out of the object store") from None
        if self.error is not None and self.written < end:
            raise self.error
        if self.closed:
            raise Conflict("this transfer is over")
        data = await asyncio.to_thread(os.pread, self.fd, end - offset, offset)
        self.last = time.monotonic()
        return _chunk.encode(Chunk(offset, data))
