"""Image bytes through the object store, as users and hosts meet them: a
client that shares nothing with the services but the URL uploads an image,
agents in data dirs of their own build from it, a snapshot taken on one
host boots on another, downloads come back byte for byte, and what goes
wrong (a killed client, wrong bytes, someone else's session) leaves no
active image and nothing in the bucket."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import nats
import nats.errors
import pytest

from stratus.agents.compute import images
from stratus.cli import transfer
from stratus.cli.client import Client
from stratus.cli.runtime import Stack
from stratus.events.blobs import BlobStore, upload_bucket
from stratus.events.errors import Conflict, Forbidden, Invalid, NotFound
from stratus.events.natscreds import connect_options
from stratus.events.store import EventStore
from stratus.events.transfer import BUSY, H_OFFSET, UPLOAD_OPEN

from .compute_helpers import cleanup, make_agent, place, unique_host, wait_for
from .test_cli import ADMIN_PASSWORD, STRATUS

pytestmark = pytest.mark.timeout(240)


def qcow2(path: Path, size: str = "64M") -> Path:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), size], check=True)
    return path


def random_file(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        for _ in range(size >> 20):
            f.write(os.urandom(1 << 20))
        f.write(os.urandom(size & ((1 << 20) - 1)))
    return path


class Cli:
    """The ``stratus`` command as a user elsewhere runs it: its own working
    directory and config, no data dir, only ``--url``."""

    def __init__(self, url: str, home: Path) -> None:
        self.url = url
        self.home = home
        home.mkdir(parents=True, exist_ok=True)
        self.env = {
            **os.environ,
            "STRATUS_DATA_DIR": str(home / "no-such-data-dir"),
            "XDG_CONFIG_HOME": str(home / ".config"),
        }
        self.env.pop("STRATUS_TOKEN", None)

    async def start(self, *args: str) -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            *STRATUS,
            "--url",
            self.url,
            *args,
            cwd=self.home,
            env=self.env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )

    async def __call__(self, *args: str, ok: bool = True) -> tuple[int, str, str]:
        proc = await self.start(*args)
        out, err = await asyncio.wait_for(proc.communicate(), 120)
        rc = proc.returncode or 0
        if ok:
            assert rc == 0, (args, err.decode())
        return rc, out.decode(), err.decode()

    async def json(self, *args: str) -> Any:
        return json.loads((await self(*args, "-o", "json"))[1])


class Cloud:
    """One ``Stack`` (no hosts of its own) and what the tests need of it."""

    def __init__(self, stack: Stack, tmp: Path) -> None:
        self.stack = stack
        self.tmp = tmp
        self.url = stack.url or ""
        self.agents: list[Any] = []
        self.stores: list[EventStore] = []

    async def service_store(self, kind: str = "handlers", host: str = "") -> EventStore:
        """A connection of its own with the services' credentials (an agent's)."""
        # (the stack closes it when it stops)
        return await self.stack.connect(kind, host)

    async def agent(self, data_dir: Path) -> Any:
        """A compute agent on libvirt's test driver, in ``data_dir``."""
        host = unique_host()
        agent = make_agent(await self.service_store("compute-agent", host), host, data_dir)
        await agent.start()
        self.agents.append(agent)
        return agent

    async def bucket(self) -> tuple[list[str], dict[str, int]]:
        blobs = await BlobStore.open(self.stack.store.js)  # type: ignore[union-attr]
        return [b.digest for b in await blobs.stored()], await blobs.chunk_subjects()

    async def client(self, token: str | None = None) -> Client:
        return await Client.connect(self.url, token)

    async def token(self) -> str:
        c = await self.client()
        try:
            return (
                await c.command("auth.login", {"user": "admin", "password": ADMIN_PASSWORD})
            ).data["token"]
        finally:
            await c.close()


@pytest.fixture
async def cloud(tmp_path) -> AsyncIterator[Cloud]:
    stack = Stack(tmp_path / "services", port=0, admin_password=ADMIN_PASSWORD)
    await stack.start()
    c = Cloud(stack, tmp_path)
    try:
        yield c
    finally:
        for agent in c.agents:
            with contextlib.suppress(Exception):
                await cleanup(agent)
        for s in c.stores:
            await s.close()
        await stack.stop()


async def until(check: Callable[[], Any], timeout: float, what: str, every: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = await check()
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(every)


async def test_an_image_from_an_unrelated_client_boots_on_other_hosts_and_comes_back(cloud):
    # given a client that shares nothing with the services but the URL, and
    # two compute agents, each in a data dir of its own
    user = Cli(cloud.url, cloud.tmp / "client")
    await user("login", "--user", "admin", "--password", ADMIN_PASSWORD)
    a = await cloud.agent(cloud.tmp / "host-a")
    b = await cloud.agent(cloud.tmp / "host-b")
    src = qcow2(user.home / "base.qcow2")
    checksum = images.sha256(src)

    # when it uploads an image, with a relative path from its own directory
    image = await user.json("image", "create", "base", "--file", "base.qcow2")

    # then the image is active once its bytes are stored: exactly those bytes
    assert image["status"] == "active" and image["checksum"] == checksum
    assert image["size_bytes"] == src.stat().st_size
    assert (await cloud.bucket())[0] == [checksum]

    # and a VM on host A builds on a copy A fetched into its own cache
    vm1 = await user.json(
        "server", "create", "vm1", "--image", "base", "--vcpus", "1", "--ram-mb", "64",
        "--host", a.host, "--wait",
    )  # fmt: skip
    assert vm1["status"] == "running" and vm1["host"] == a.host
    chain = images.info(Path(vm1["disk"]), chain=True)
    assert Path(chain[1]["filename"]).parent == a.cache.root
    assert images.sha256(Path(chain[1]["filename"])) == checksum
    assert a.cache.fetched == 1

    # when A snapshots it, the snapshot is recorded once its bytes are stored
    await user("server", "snapshot", "vm1", "snap")
    snap = await until(lambda: _active(user, "snap"), 30, "the snapshot to be recorded")
    assert snap["parent"] == image["id"]
    assert sorted((await cloud.bucket())[0]) == sorted([checksum, snap["checksum"]])
    # (A put its bytes into its own bucket, the relay copied them into the
    # image bucket, and A then emptied its own)
    uploads = await BlobStore.open(cloud.stack.store.js, bucket=upload_bucket(a.host))

    async def emptied() -> bool:
        return not await uploads.stored()

    await until(emptied, 10, f"{a.host}'s upload bucket to be emptied")

    # then host B boots it: it fetches the snapshot and the image beneath it
    vm2 = await user.json(
        "server", "create", "vm2", "--image", "snap", "--vcpus", "1", "--ram-mb", "64",
        "--host", b.host, "--wait",
    )  # fmt: skip
    assert vm2["status"] == "running" and vm2["host"] == b.host
    chain = images.info(Path(vm2["disk"]), chain=True)
    assert len(chain) == 3
    assert [images.sha256(Path(c["filename"])) for c in chain[1:]] == [snap["checksum"], checksum]
    assert all(Path(c["filename"]).parent == b.cache.root for c in chain[1:])
    assert b.cache.fetched == 2
    # The cached files are the agent's alone.
    assert [os.stat(c["filename"]).st_mode & 0o777 for c in chain[1:]] == [0o600, 0o600]
    assert os.stat(b.cache.root).st_mode & 0o777 == 0o711  # listed by none, traversed by qemu

    # and downloads come back byte for byte, to a file named after the image
    got = await user.json("image", "download", "snap", "--file", "snap.qcow2")
    assert got["checksum"] == snap["checksum"]
    made_on_a = a.cache.root / f"{snap['checksum']}.qcow2"
    assert (user.home / "snap.qcow2").read_bytes() == made_on_a.read_bytes()
    elsewhere = Cli(cloud.url, cloud.tmp / "other-client")
    elsewhere.env["XDG_CONFIG_HOME"] = user.env["XDG_CONFIG_HOME"]  # same login
    got = await elsewhere.json("image", "download", "base")
    assert Path(got["file"]) == Path("base.qcow2")
    assert (elsewhere.home / "base.qcow2").read_bytes() == src.read_bytes()


async def _active(user: Cli, name: str) -> dict | None:
    rc, out, _ = await user("image", "show", name, "-o", "json", ok=False)
    if rc != 0:
        return None
    row = json.loads(out)
    return row if row["status"] == "active" else None


async def test_a_refused_snapshot_leaves_nothing_in_its_hosts_bucket(cloud):
    # given an agent whose snapshot bytes are in its own bucket
    import io

    from stratus.events.ids import new_id
    from stratus.events.model import Cause
    from stratus.events.resources import ImageCreated

    a = await cloud.agent(cloud.tmp / "host-a")
    uploads = await a.uploads()
    data = b"a snapshot the relay will refuse"
    digest = hashlib.sha256(data).hexdigest()
    await uploads.put(digest, io.BytesIO(data))
    created = Cause(a.actor, new_id(), new_id()).make(
        ImageCreated, "ta", "image", new_id(), name="x", format="raw",
        size_bytes=len(data), checksum=digest,
    )  # fmt: skip
    # when its report is refused (the server is on no host: not its to make)
    with pytest.raises(Forbidden):
        await a._report_image(created, new_id(), [digest])
    # then the bytes left its bucket all the same, and no image was recorded
    assert await uploads.stored() == []
    assert await cloud.stack.store.read_all(subjects=[created.subject]) == []


async def test_two_builds_of_one_image_at_once_fetch_it_once(cloud):
    token = await cloud.token()
    c = await cloud.client(token)
    agent = await cloud.agent(cloud.tmp / "host")
    src = qcow2(cloud.tmp / "once.qcow2", "32M")
    checksum, size = transfer.hash_file(src)
    try:
        created = await c.command(
            "image.create", {"name": "once", "size_bytes": size, "checksum": checksum}
        )
        image = created.data["id"]
        await transfer.upload(c, image, src)
        first, second = await asyncio.gather(
            *(
                # placed as the scheduler would (the agent's credential may not)
                place(cloud.stack.store, agent.host, image=created.data["id"], tenant="admin")
                for _ in "ab"
            )
        )
        for sid in (first, second):
            await wait_for(agent.store, sid, "server.running", tenant="admin")
        assert agent.cache.fetched == 1
        assert sorted(p.name for p in agent.cache.root.glob("*.qcow2")) == [f"{checksum}.qcow2"]
    finally:
        await c.close()


async def test_a_killed_upload_leaves_no_active_image_and_no_chunks(cloud):
    # given an image service that ends a session after 2 s without data
    svc = cloud.stack.images
    assert svc is not None
    svc.idle_s = 2.0
    user = Cli(cloud.url, cloud.tmp / "client")
    await user("login", "--user", "admin", "--password", ADMIN_PASSWORD)
    big = random_file(user.home / "big.raw", 96 << 20)

    # when the client is killed in the middle of its upload
    proc = await user.start("image", "create", "big", "--file", "big.raw", "--format", "raw")
    try:

        async def midway() -> bool:
            return any(
                0 < getattr(s, "received", 0) < big.stat().st_size for s in svc.sessions.values()
            )

        await until(midway, 60, "the upload to be under way", every=0.01)
    finally:
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
    assert proc.returncode == -signal.SIGKILL

    # then the service ends the session: no active image, nothing stored,
    # no spool file, and the image says why it is still queued
    await until(lambda: _no_sessions(svc), 20, "the session to end")
    row = await user.json("image", "show", "big")
    assert row["status"] == "queued", row
    assert (await cloud.bucket()) == ([], {})
    assert list(svc.spool.iterdir()) == []

    async def reason() -> str:
        row = await user.json("image", "show", "big")
        return row.get("reason", "")

    why = await until(reason, 20, "the interruption to be recorded")
    assert "interrupted after" in why and ("no request for" in why or "no data for" in why)
    # and the next attempt completes it
    done = await user.json("image", "upload", "big", "--file", "big.raw")
    assert done["status"] == "active" and done["reason"] == ""
    assert (await cloud.bucket())[0] == [images.sha256(big)]


async def _no_sessions(svc: Any) -> bool:
    return not svc.sessions


async def test_wrong_bytes_are_refused_and_leave_nothing(cloud):
    token = await cloud.token()
    c = await cloud.client(token)
    store = cloud.stack.store
    assert store is not None
    raw = random_file(cloud.tmp / "r.raw", 3 << 20)
    good = qcow2(cloud.tmp / "q.qcow2", "16M")

    async def queued(name: str, path: Path, fmt: str, checksum: str | None = None) -> str:
        real, size = transfer.hash_file(path)
        body = {"name": name, "format": fmt, "size_bytes": size, "checksum": checksum or real}
        return (await c.command("image.create", body)).data["id"]

    try:
        cases = [
            # (bytes, claimed format, checksum claimed, what the refusal says)
            (raw, "raw", hashlib.sha256(b"other").hexdigest(), "checksum mismatch"),
            (raw, "qcow2", None, "is a raw image, not qcow2"),
            (good, "raw", None, "is a qcow2 image, not raw"),
        ]
        for i, (path, fmt, claimed, why) in enumerate(cases):
            iid = await queued(f"bad-{i}", path, fmt, claimed)
            before = await store.last_seq()
            with pytest.raises(Invalid, match=why):
                await transfer.upload(c, iid, path)
            # Nothing recorded, nothing stored, nothing spooled.
            assert await store.last_seq() == before
            assert (await cloud.bucket()) == ([], {})
            assert list(cloud.stack.images.spool.iterdir()) == []  # type: ignore[union-attr]
        # A file of another size is refused before a byte is sent.
        iid = await queued("small", raw, "raw")
        with pytest.raises(Invalid, match="was created for"):
            await transfer.upload(c, iid, good)
        # Bytes beyond the size the image was created with are refused.
        opened = await c.send_bytes(UPLOAD_OPEN, json.dumps({"ref": iid}).encode(), {})
        subject = json.loads(opened)["data"]["subject"]
        reply = json.loads(
            await c.send_bytes(subject, b"x" * 10, {H_OFFSET: str(raw.stat().st_size - 5)})
        )
        assert reply["error"]["kind"] == "invalid" and "more than" in reply["error"]["message"]
        # Nothing of this reached a server either.
        with pytest.raises(Conflict, match="queued"):
            await c.command(
                "server.create", {"name": "s", "image": "small", "vcpus": 1, "ram_mb": 64}
            )
    finally:
        await c.close()


async def _login(c: Client, user: str) -> str:
    body = {"user": user, "password": "password-" + user}
    return (await c.command("auth.login", body)).data["token"]


async def test_clients_cannot_touch_the_bucket_nor_each_others_transfers(cloud):
    token = await cloud.token()
    admin = await cloud.client(token)
    src = qcow2(cloud.tmp / "p.qcow2", "8M")
    checksum, size = transfer.hash_file(src)
    try:
        for t in ("acme", "globex"):
            await admin.command("tenant.create", {"name": t})
        for user, tenant in (("alice", "acme"), ("bob", "globex")):
            await admin.command("user.create", {"name": user, "password": "password-" + user})
            await admin.command("role.assign", {"user": user, "tenant": tenant, "role": "member"})
        alice = await cloud.client(await _login(admin, "alice"))
        bob = await cloud.client(await _login(admin, "bob"))
        body = {"name": "mine", "size_bytes": size, "checksum": checksum}
        mine = (await alice.command("image.create", body)).data["id"]
        # Bob cannot open an upload into, nor download, alice's image.
        for call in (
            transfer.upload(bob, mine, src, tenant="acme"),
            transfer.upload(bob, mine, src),
        ):
            with pytest.raises(NotFound):
                await call
        # Nor send chunks into her session, even knowing its subject.
        opened = json.loads(
            await alice.send_bytes(UPLOAD_OPEN, json.dumps({"ref": mine}).encode(), {})
        )["data"]
        reply = json.loads(await bob.send_bytes(opened["subject"], b"x", {H_OFFSET: "0"}))
        assert reply["error"]["kind"] == Forbidden.kind
        await alice.send_bytes(opened["subject"], b"", {H_OFFSET: "0", "Stratus-Done": "1"})
        done = await transfer.upload(alice, mine, src)
        assert done["status"] == "active"
        with pytest.raises(NotFound):
            await transfer.download(bob, mine, cloud.tmp / "stolen", tenant="acme")
        assert not (cloud.tmp / "stolen").exists()
        # An active image takes no more bytes.
        with pytest.raises(Conflict, match="active"):
            await transfer.upload(alice, mine, src)
        # A public image is anyone's to download.
        public = {"name": "pub", "size_bytes": size, "checksum": checksum, "public": True}
        await admin.command("image.create-public", public)
        await transfer.upload(admin, "pub", src, public=True)
        _, path = await transfer.download(bob, "pub", cloud.tmp / "pub.qcow2")
        assert path.read_bytes() == src.read_bytes()
    finally:
        await admin.close()


async def test_the_broker_keeps_clients_off_the_object_store(cloud):
    # Whatever a client knows, it has no JetStream rights: it can neither
    # write a chunk or an object's meta, nor read the bucket, nor purge it.
    src = qcow2(cloud.tmp / "p.qcow2", "8M")
    checksum, _ = transfer.hash_file(src)
    await (await BlobStore.open(cloud.stack.store.js)).put_file(checksum, src)  # type: ignore[union-attr]
    errors: list[str] = []

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc).lower())

    # a client as the CLI connects, with the cloud admin's own token
    nc = await nats.connect(
        cloud.url,
        error_cb=on_error,
        allow_reconnect=False,
        **connect_options(await cloud.token()),
    )
    try:
        js = nc.jetstream(timeout=0.5)
        for subject in ("$O.images.C.forged", "$O.images.M.forged"):
            with pytest.raises(NO_ANSWER):
                await js.publish(subject, b"forged")
        for api in ("STREAM.INFO.OBJ_images", "STREAM.PURGE.OBJ_images", "DIRECT.GET.OBJ_images"):
            with pytest.raises(NO_ANSWER):
                await nc.request(f"$JS.API.{api}", b"{}", timeout=0.5)
        got: list[str] = []

        async def sniff(msg: Any) -> None:
            got.append(msg.subject)

        for subject in ("$O.images.>", "cmd.image.>"):
            await nc.subscribe(subject, cb=sniff)
        await nc.flush(timeout=2)
        # an upload and a download go by meanwhile
        c = await cloud.client(await cloud.token())
        try:
            body = {"name": "seen", "size_bytes": src.stat().st_size, "checksum": checksum}
            iid = (await c.command("image.create", body)).data["id"]
            await transfer.upload(c, iid, src)
            await transfer.download(c, iid, cloud.tmp / "back.qcow2")
        finally:
            await c.close()
        await asyncio.sleep(0.2)
        assert got == []
        assert sum("permissions violation for subscription" in e for e in errors) == 2, errors
    finally:
        await nc.close()
    blobs = await BlobStore.open(cloud.stack.store.js)  # type: ignore[union-attr]
    assert [b.digest for b in await blobs.stored()] == [checksum]
    assert list((await blobs.chunk_subjects()).values()) == [1]


# The server drops what a client may not publish: its request gets no answer.
NO_ANSWER = (nats.errors.TimeoutError, nats.errors.NoRespondersError)


async def test_a_busy_image_service_is_asked_again(cloud):
    # given a service that takes one upload at a time, with one under way
    svc = cloud.stack.images
    assert svc is not None
    svc.max_uploads = 1
    c = await cloud.client(await cloud.token())
    src = qcow2(cloud.tmp / "q.qcow2", "8M")
    checksum, size = transfer.hash_file(src)
    try:
        ids = []
        for name in ("first", "second"):
            body = {"name": name, "size_bytes": size, "checksum": checksum}
            ids.append((await c.command("image.create", body)).data["id"])
        held = json.loads(await c.send_bytes(UPLOAD_OPEN, json.dumps({"ref": ids[0]}).encode(), {}))
        assert held["ok"], held
        # when another upload starts, it is told the service is busy ...
        refused = json.loads(
            await c.send_bytes(UPLOAD_OPEN, json.dumps({"ref": ids[1]}).encode(), {})
        )
        assert refused["error"]["kind"] == "unavailable"
        assert refused["error"]["message"].startswith(BUSY)
        # ... and the client asks again until there is room
        second = asyncio.create_task(transfer.upload(c, ids[1], src))
        await asyncio.sleep(1.0)
        assert not second.done()
        subject = held["data"]["subject"]
        await c.send_bytes(subject, b"", {H_OFFSET: "0", "Stratus-Done": "1"})  # ends early
        done = await asyncio.wait_for(second, 60)
        assert done["status"] == "active" and done["id"] == ids[1]
    finally:
        await c.close()
