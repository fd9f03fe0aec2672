"""The object store of image bytes (``events.blobs``) on a real nats-server:
objects named by their SHA-256 hold exactly those bytes, wrong bytes leave
nothing behind, and the chunks of a put killed half-way are swept."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import sys
from pathlib import Path

import pytest

from stratus.events.blobs import BUCKET, BlobStore, DigestMismatch, object_name
from stratus.events.errors import Invalid, NotFound


def blob(path: Path, size: int) -> str:
    data = os.urandom(size)
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


async def test_bytes_go_in_under_their_digest_and_come_back_the_same(store, tmp_path):
    blobs = await BlobStore.open(store.js)
    src = tmp_path / "a.bin"
    digest = blob(src, 3 * (512 << 10) + 17)  # three whole chunks and a bit
    info = await blobs.put_file(digest, src)
    assert (info.digest, info.size) == (digest, src.stat().st_size)
    assert await blobs.exists(digest) == info
    out = tmp_path / "out.bin"
    assert (await blobs.get_file(digest, out)).size == info.size
    assert out.read_bytes() == src.read_bytes()
    # The same bytes again: one object, nothing sent twice.
    assert await blobs.put_file(digest, src) == info
    assert [b.digest for b in await blobs.stored()] == [digest]
    subjects = await blobs.chunk_subjects()
    assert list(subjects.values()) == [4]
    # File storage, and the replicas of the EVENTS stream (one here).
    status = await blobs.obs.status()
    assert status.storage_type == "file"
    assert status.replicas == (await store.js.stream_info("EVENTS")).config.num_replicas == 1


async def test_bytes_that_are_not_their_digest_leave_nothing(store, tmp_path):
    blobs = await BlobStore.open(store.js)
    src = tmp_path / "a.bin"
    real = blob(src, 700 << 10)
    claimed = hashlib.sha256(b"something else").hexdigest()
    with pytest.raises(DigestMismatch, match=real):
        await blobs.put_file(claimed, src)
    assert await blobs.exists(claimed) is None
    assert await blobs.chunk_subjects() == {}  # the chunks sent were purged
    with pytest.raises(NotFound):
        await blobs.get_file(claimed, tmp_path / "out.bin")
    with pytest.raises(Invalid, match="not a SHA-256"):
        object_name("../../etc/passwd")


async def test_delete_removes_the_object_and_its_chunks(store, tmp_path):
    blobs = await BlobStore.open(store.js)
    src = tmp_path / "a.bin"
    digest = blob(src, 100_000)
    await blobs.put_file(digest, src)
    assert await blobs.delete(digest) is True
    assert await blobs.exists(digest) is None
    assert await blobs.chunk_subjects() == {}
    assert await blobs.delete(digest) is False


KILLED_PUT = """
import asyncio, io, sys, time
import nats

class Slow(io.RawIOBase):
    # Two chunks, then it never returns: a process killed mid-upload.
    def __init__(self):
        self.n = 0
    def readable(self):
        return True
    def readinto(self, b):
        self.n += 1
        if self.n > 2:
            print("sent", flush=True)
            time.sleep(3600)
        b[:4] = b"abcd"
        return 4

async def main():
    nc = await nats.connect(sys.argv[1])
    obs = await nc.jetstream().object_store(sys.argv[2])
    await obs.put(sys.argv[3], Slow())

asyncio.run(main())
"""


async def test_chunks_of_a_killed_put_are_swept_once_old_enough(store, nats_server, tmp_path):
    blobs = await BlobStore.open(store.js)
    src = tmp_path / "kept.bin"
    kept = blob(src, 1000)
    await blobs.put_file(kept, src)
    script = tmp_path / "put.py"
    script.write_text(KILLED_PUT)
    name = object_name(hashlib.sha256(b"never finished").hexdigest())
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(script),
        nats_server.url,
        BUCKET,
        name,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        assert line.strip() == b"sent"
    finally:
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
    # Its chunks are in the bucket, with no object owning them.
    subjects = await blobs.chunk_subjects()
    assert sorted(subjects.values()) == [1, 2]
    # Younger than the grace: could be a put in progress, left alone.
    assert await blobs.sweep(grace_s=3600) == 0
    assert len(await blobs.chunk_subjects()) == 2
    assert await blobs.sweep(grace_s=0) == 1
    assert list((await blobs.chunk_subjects()).values()) == [1]  # the kept object's
    out = tmp_path / "out.bin"
    await blobs.get_file(kept, out)
    assert out.read_bytes() == src.read_bytes()
