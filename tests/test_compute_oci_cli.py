"""OCI images and containers as a user meets them, through the ``stratus``
command against a running stack and a compute agent (root only): an OCI
archive imported with each layer stored once by digest, a container of it
run by runc answering ``server exec``, a snapshot that is one more layer,
and hostile archives refused with nothing stored."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import tarfile
from pathlib import Path

import pytest

from stratus.cli import transfer
from stratus.events import oci
from stratus.events.blobs import BlobStore
from stratus.events.errors import Invalid
from stratus.ops.bench.ociimage import busybox_image, busybox_layer, entry, tar_of

from .compute_helpers import make_agent, unique_host
from .test_cli import ADMIN_PASSWORD
from .test_images import Cli, Cloud, until
from .test_images import cloud as cloud  # the stack fixture, shared

pytestmark = [
    pytest.mark.timeout(240),
    pytest.mark.skipif(os.geteuid() != 0, reason="containers need root (namespaces, mounts)"),
]


async def container_host(cloud: Cloud):
    # (with its own host's credential, as a deployed agent has)
    host = unique_host()
    store = await cloud.service_store("compute-agent", host)
    agent = make_agent(store, host, cloud.tmp / "host", vm=False, containers=True)
    await agent.start()
    cloud.agents.append(agent)
    return agent


async def _image(user: Cli, name: str) -> dict | None:
    rc, out, _ = await user("image", "show", name, "-o", "json", ok=False)
    return json.loads(out) if rc == 0 and json.loads(out)["status"] == "active" else None


async def test_an_oci_image_runs_as_a_container_and_snapshots_as_one_more_layer(cloud):
    user = Cli(cloud.url, cloud.tmp / "client")
    await user("login", "--user", "admin", "--password", ADMIN_PASSWORD)
    agent = await container_host(cloud)
    config_digest = busybox_image(user.home / "bb.tar", cmd=["sleep", "3600"])
    (cloud.tmp / "w").mkdir()
    layer = oci.read_archive(user.home / "bb.tar", cloud.tmp / "w").config.layers[0]

    # The archive's blobs are stored by their digests, not the archive.
    image = await user.json("image", "create", "bb", "--format", "oci", "--file", "bb.tar")
    assert image["status"] == "active" and image["format"] == "oci"
    assert image["checksum"] == config_digest
    assert sorted((await cloud.bucket())[0]) == sorted([config_digest, layer])
    # A second image of the same layer stores no second copy of it.
    busybox_image(user.home / "bb2.tar", cmd=["sleep", "7"])
    await user.json("image", "create", "bb2", "--format", "oci", "--file", "bb2.tar")
    stored = (await cloud.bucket())[0]
    assert len(stored) == 3 and stored.count(layer) == 1

    # What the "done when" runs.
    web = await user.json(
        "server", "create", "web", "--type", "container", "--image", "bb",
        "--vcpus", "1", "--ram-mb", "64", "--wait",
    )  # fmt: skip
    assert web["status"] == "running" and web["host"] == agent.host
    rc, out, _ = await user("server", "exec", "web", "--", "ls", "/")
    assert out.split() == ["bin", "dev", "etc", "proc", "root", "run", "sys", "tmp", "var"]
    rc, out, _ = await user("server", "exec", "web", "--", "hostname")
    assert out.strip() == "web"
    running = [
        r.decode()
        for r in await cloud.stack.store.read_all(subjects=[f"ev.*.server.{web['id']}"])  # type: ignore[union-attr]
    ]
    assert [e.runtime for e in running if e.type_name() == "server.running"] == [
        agent.drivers["container"].runtime_version
    ]
    assert running[-1].runtime.startswith("runc 1.")
    # The layer was fetched and unpacked once on the host.
    assert agent.layers.unpacked == 1

    # --command replaces the image's process; exit codes come back.
    await user(
        "server", "create", "box", "--type", "container", "--image", "bb", "--vcpus", "1",
        "--ram-mb", "64", "--command", "sh -c 'echo started; while :; do sleep 1; done'", "--wait",
    )  # fmt: skip
    rc, out, _ = await user("server", "exec", "box", "--", "sh", "-c", "cat /proc/1/cmdline")
    assert out.split("\0")[:3] == ["sh", "-c", "echo started; while :; do sleep 1; done"]
    rc, _, _ = await user("server", "exec", "box", "--", "sh", "-c", "exit 7", ok=False)
    assert rc == 7

    # A snapshot commits web's writes as one new layer on top of bb's.
    await user("server", "exec", "web", "--", "sh", "-c", "echo kept > /root/note")
    await user("server", "snapshot", "web", "web-snap")
    snap = await until(lambda: _image(user, "web-snap"), 30, "the snapshot")
    assert snap["format"] == "oci" and snap["parent"] == image["id"]
    stored = (await cloud.bucket())[0]
    assert len(stored) == 5  # + the new layer and the new config
    # The base layer's bytes are unchanged: still stored under its digest, and
    # the host's unpacked copy never saw the write.
    base = await BlobStore.open(cloud.stack.store.js)  # type: ignore[union-attr]
    await base.get_file(layer, cloud.tmp / "base-layer.tar")
    assert hashlib.sha256((cloud.tmp / "base-layer.tar").read_bytes()).hexdigest() == layer
    assert not (agent.layers.path(layer) / "root" / "note").exists()
    new = await user.json(
        "server", "create", "web2", "--type", "container", "--image", "web-snap",
        "--vcpus", "1", "--ram-mb", "64", "--wait",
    )  # fmt: skip
    assert new["status"] == "running"
    rc, out, _ = await user("server", "exec", "web2", "--", "cat", "/root/note")
    assert out == "kept\n"

    # Delete: nothing of the containers is left on the host.
    driver = agent.drivers["container"]
    for name in ("web", "box", "web2"):
        await user("server", "delete", name)

    async def gone() -> bool:
        return not driver.list_owned() and not list(driver.oci.bundles.iterdir())

    await until(gone, 30, "the containers to go")
    assert driver.oci.runc.list() == {}
    mounts = await asyncio.to_thread(Path("/proc/self/mountinfo").read_text)
    assert str(driver.oci.bundles) not in mounts


async def test_hostile_archives_are_refused_and_store_nothing(cloud):
    token = await cloud.token()
    c = await cloud.client(token)
    store = cloud.stack.store
    assert store is not None
    escape = [entry("etc", tarfile.SYMTYPE, link="/etc"), entry("etc/cron.d/evil")]
    dev = entry("dev/kmem", tarfile.CHRTYPE, 0o600)
    cases = {
        "traversal": ([entry("../../../tmp/evil")], "'..' escape"),
        "symlink": (escape, "beneath the layer's symlink"),
        "device": ([dev], "device node"),
    }
    try:
        for name, (entries, why) in cases.items():
            path = cloud.tmp / f"{name}.tar"
            oci.write_layout(path, [busybox_layer(), tar_of(entries)], cmd=["sh"])
            checksum, size = transfer.hash_file(path)
            body = {"name": name, "format": "oci", "size_bytes": size, "checksum": checksum}
            iid = (await c.command("image.create", body)).data["id"]
            before = await store.last_seq()
            with pytest.raises(Invalid, match=why):
                await transfer.upload(c, iid, path)
            # No event, no object (not even the good busybox layer), no spool.
            assert await store.last_seq() == before
            assert (await cloud.bucket()) == ([], {})
            assert list(cloud.stack.images.spool.iterdir()) == []  # type: ignore[union-attr]
        # Bytes that are not the checksum the image was created with.
        path = cloud.tmp / "bb.tar"
        busybox_image(path)
        checksum, size = transfer.hash_file(path)
        wrong = hashlib.sha256(b"other").hexdigest()
        body = {"name": "wrong", "format": "oci", "size_bytes": size, "checksum": wrong}
        iid = (await c.command("image.create", body)).data["id"]
        with pytest.raises(Invalid, match="checksum mismatch"):
            await transfer.upload(c, iid, path)
        assert (await cloud.bucket()) == ([], {})
        # An OCI image is never a blank record, and never boots a VM.
        with pytest.raises(Invalid, match="needs its archive"):
            await c.command("image.create", {"name": "empty", "format": "oci"})
    finally:
        await c.close()
