"""The client side of image transfers (``events.transfer``): a local file
sent to the image service in chunks, or fetched from it, over the NATS
connection alone (no data directory, no shared disk).

At most ``window`` requests are unanswered at a time, so memory stays at
a few chunks whatever the file's size, and a slow service slows the
client down instead of piling requests up in the broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec

from stratus.cli.client import Client, decode_reply
from stratus.events.commands import H_COMMAND_ID
from stratus.events.errors import Internal, Invalid, StratusError, Unavailable
from stratus.events.ids import new_id
from stratus.events.transfer import (
    BUSY,
    DOWNLOAD_OPEN,
    H_DONE,
    H_OFFSET,
    UPLOAD_OPEN,
    Chunk,
    Opened,
    TransferOpen,
    is_refusal,
)

Progress = Callable[[int], None]
_chunk = msgspec.msgpack.Decoder(Chunk)


def hash_file(path: Path, progress: Progress | None = None) -> tuple[str, int]:
    """SHA-256 (hex) and size of ``path``, read once (blocking)."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
            size += len(block)
            if progress is not None:
                progress(len(block))
    return h.hexdigest(), size


def store_timeout(size: int) -> float:
    """How long the last upload request may take: the service checks the
    file and stores it (seconds, at a pessimistic 8 MiB/s)."""
    return 120 + size / (8 << 20)


# A busy image service is asked again, for at most this long in all.
BUSY_WAIT_S = 300.0


async def _open(
    c: Client, subject: str, ref: str, tenant: str | None, public: bool, command_id: str
) -> Opened:
    body = msgspec.json.encode(TransferOpen(ref=ref, tenant=tenant, public=public))
    deadline = time.monotonic() + BUSY_WAIT_S
    pause = 0.5
    while True:
        data = await c.send_bytes(subject, body, {H_COMMAND_ID: command_id})
        try:
            reply = decode_reply(subject, data)
        except Unavailable as exc:
            if not exc.message.startswith(BUSY) or time.monotonic() + pause > deadline:
                raise
            await asyncio.sleep(pause)  # its transfers end; then there is room
            pause = min(pause * 2, 5.0)
            continue
        return msgspec.convert(reply.data, Opened)


async def _windowed(
    window: int, requests: Any, send: Callable[[int, Any], Awaitable[None]]
) -> None:
    """Run ``send(offset, item)`` for each ``(offset, item)`` of ``requests``
    with at most ``window`` unanswered; the first failure stops the rest
    and is raised."""
    slots = asyncio.Semaphore(window)
    tasks: set[asyncio.Task[None]] = set()
    failed: list[BaseException] = []

    async def one(offset: int, item: Any) -> None:
        try:
            await send(offset, item)
        except BaseException as exc:  # re-raised below, the first one
            failed.append(exc)
        finally:
            slots.release()

    try:
        for offset, item in requests:
            await slots.acquire()
            if failed:
                break
            t = asyncio.create_task(one(offset, item))
            tasks.add(t)
            t.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            t.cancel()
    if failed:
        raise failed[0]


async def upload(
    c: Client,
    ref: str,
    path: Path,
    *,
    tenant: str | None = None,
    public: bool = False,
    progress: Progress | None = None,
    command_id: str | None = None,
    checksum: str = "",
) -> dict[str, Any]:
    """Send ``path`` as the bytes of queued image ``ref``; the image, active.
    ``checksum``: the file's, if known, to refuse a file that is not the
    image's before sending it."""
    opened = await _open(c, UPLOAD_OPEN, ref, tenant, public, command_id or new_id())
    size = os.stat(path).st_size
    why = ""
    if size != opened.size:
        why = f"{path} has {size} bytes; image {ref} was created for {opened.size}"
    elif checksum and checksum != opened.checksum:
        why = f"{path} hashes to {checksum}; image {ref} was created for {opened.checksum}"
    if why:
        # End the session at once rather than leave it to time out.
        with contextlib.suppress(StratusError):
            await c.send_bytes(opened.subject, b"", {H_OFFSET: "0", H_DONE: "1"})
        raise Invalid(why)

    def chunks() -> Any:
        with open(path, "rb") as f:
            offset = 0
            while offset < size:
                data = f.read(opened.chunk_bytes)
                if not data:
                    raise Invalid(f"{path} shrank while it was being sent")
                yield offset, data
                offset += len(data)

    async def send(offset: int, data: bytes) -> None:
        body = await c.send_bytes(opened.subject, data, {H_OFFSET: str(offset)})
        decode_reply(opened.subject, body)
        if progress is not None:
            progress(len(data))

    await _windowed(opened.window, chunks(), send)
    done = await c.send_bytes(
        opened.subject, b"", {H_OFFSET: str(size), H_DONE: "1"}, timeout=store_timeout(size)
    )
    return decode_reply(opened.subject, done).data  # type: ignore[return-value]


async def download(
    c: Client,
    ref: str,
    out: Path | None,
    *,
    tenant: str | None = None,
    public: bool = False,
    progress: Progress | None = None,
    on_open: Callable[[Opened], None] | None = None,
) -> tuple[Opened, Path]:
    """Write image ``ref``'s bytes to ``out`` (default ``<name>.<format>``
    here) through ``.<name>.part``, renamed once the SHA-256 is the
    image's; what the session said, and where the file is."""
    opened = await _open(c, DOWNLOAD_OPEN, ref, tenant, public, new_id())
    if on_open is not None:
        on_open(opened)
    out = out or Path(f"{opened.image['name']}.{opened.format}")
    tmp = out.with_name(f".{out.name}.part")
    h = hashlib.sha256()
    # Answers come back in any order: written and hashed in order, the few
    # early ones (at most a window of them) kept until their turn.
    early: dict[int, bytes] = {}
    state = {"next": 0}
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:

        async def fetch(offset: int, want: int) -> None:
            body = await c.send_bytes(opened.subject, b"", {H_OFFSET: str(offset)})
            if is_refusal(body):
                decode_reply(opened.subject, body)  # raises the refusal
            try:
                chunk = _chunk.decode(body)
            except msgspec.DecodeError:
                raise Internal(f"{opened.subject}: unreadable chunk") from None
            if chunk.offset != offset or len(chunk.data) != want:
                raise Internal(f"asked for {want} bytes at {offset}, got another chunk")
            early[offset] = chunk.data
            while state["next"] in early:
                data = early.pop(state["next"])
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                h.update(data)
                state["next"] += len(data)
                if progress is not None:
                    progress(len(data))

        step = opened.chunk_bytes
        offsets = ((o, min(step, opened.size - o)) for o in range(0, opened.size, step))
        await _windowed(opened.window, offsets, fetch)
        got = h.hexdigest()
        if state["next"] != opened.size or got != opened.checksum:
            raise Internal(f"the download hashes to {got}, the image is {opened.checksum}")
    except BaseException:
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    os.close(fd)
    os.replace(tmp, out)
    with contextlib.suppress(StratusError):
        await c.send_bytes(opened.subject, b"", {H_OFFSET: str(opened.size), H_DONE: "1"})
    return opened, out


class Bar:
    """A byte progress bar on stderr, shown only when stderr is a terminal
    (a pipe or a log gets nothing). ``advance(n)`` may be called from any
    thread; ``total`` may be set once known."""

    def __init__(self, label: str, total: int | None = None) -> None:
        import sys

        self.label = label
        self.total = total
        self._bar: Any = None
        self._job: Any = None
        if sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TransferSpeedColumn,
            )

            self._bar = Progress(
                "[progress.description]{task.description}",
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                console=Console(stderr=True),
                transient=True,
            )

    def __enter__(self) -> Bar:
        if self._bar is not None:
            self._bar.start()
            self._job = self._bar.add_task(self.label, total=self.total)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()

    def sized(self, total: int) -> None:
        if self._bar is not None:
            self._bar.update(self._job, total=total)

    def advance(self, n: int) -> None:
        if self._bar is not None:
            self._bar.update(self._job, advance=n)
