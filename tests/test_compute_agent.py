"""The compute agent on libvirt's test driver: claims become running domains
on qcow2 overlays, verbs reach the host, failures are reported, reconcile
repairs the host, and restarting with nothing changed changes nothing."""

from __future__ import annotations

import asyncio
from pathlib import Path

import libvirt
import msgspec
import pytest

from stratus.agents.compute import images
from stratus.agents.compute.agent import HostSpec
from stratus.agents.compute.domain import NS, domain_name
from stratus.events.blobs import BlobStore
from stratus.events.compute import HostServerAction
from stratus.events.heartbeat import Liveness
from stratus.events.ids import new_id
from stratus.events.resources import SYSTEM, ImageCreated
from stratus.events.scheduling import HostReleased

from .compute_helpers import (
    TENANT,
    cause,
    cleanup,
    host_action,
    make_agent,
    owned,
    place,
    running_agent,
    server_events,
    types,
    unique_host,
    wait_for,
)

pytestmark = pytest.mark.timeout(120)


async def action(store, host, sid, what, **kw):
    await store.append([host_action(host, sid, what, **kw)])


async def test_claim_builds_a_running_domain_on_an_overlay(store, tmp_path):
    async with running_agent(store, tmp_path) as agent:
        host = agent.host
        sid = await place(store, host, vcpus=2, ram_mb=128)
        evs = await wait_for(store, sid, "server.running")
        assert types(evs)[-2:] == ["server.building", "server.running"]
        running = evs[-1]
        assert running.host == host
        chain = images.info(Path(running.disk), chain=True)
        # The instance's disk is a qcow2 overlay on the host's cached base.
        assert len(chain) == 2
        assert chain[0]["format"] == "qcow2"
        assert chain[0]["full-backing-filename"].startswith(str(agent.cache.root))
        assert chain[0]["actual-size"] < 1 << 20
        dom = agent.drivers["vm"].conn.lookupByName(domain_name(sid))
        xml = dom.XMLDesc(0)
        assert f'<stratus:instance xmlns:stratus="{NS}"' in xml or NS in xml
        assert "<quota>200000</quota>" in xml and "<shares>2048</shares>" in xml
        assert dom.isActive()
        assert owned(agent) == {sid: "running"}

        # stop, start, reboot, delete: each done on the host and reported.
        await action(store, host, sid, "stop")
        await wait_for(store, sid, "server.stopped")
        assert owned(agent) == {sid: "stopped"}
        await action(store, host, sid, "start")
        evs = await wait_for(store, sid, "server.stopped")
        for _ in range(200):
            evs = await wait_for(store, sid, "server.running")
            if types(evs).count("server.running") == 2:
                break
        assert types(evs).count("server.running") == 2
        assert owned(agent) == {sid: "running"}
        await action(store, host, sid, "delete")
        await wait_for(store, sid, "server.deleted")
        assert owned(agent) == {}
        assert not (agent.disks / f"{sid}.qcow2").exists()


async def test_libvirt_error_is_a_build_failure_with_its_reason(store, tmp_path):
    host = unique_host()
    agent = make_agent(store, host, tmp_path)
    await agent.start()
    conn = agent.drivers["vm"].conn
    sid = new_id()
    # Someone else's domain already holds the name (another UUID, no marks):
    # libvirt refuses the definition, and the foreign domain is left alone.
    foreign = conn.defineXML(
        f"<domain type='test'><name>{domain_name(sid)}</name>"
        "<memory unit='KiB'>1024</memory><os><type>hvm</type></os></domain>"
    )
    try:
        await place(store, host, server=sid)
        evs = await wait_for(store, sid, "server.build-failed")
        failed = evs[-1]
        assert failed.host == host and failed.attempt == 1
        assert "already exists" in failed.reason
        assert "server.running" not in types(evs)
        assert conn.lookupByName(domain_name(sid)).UUIDString() == foreign.UUIDString()
        assert not (agent.disks / f"{sid}.qcow2").exists()
    finally:
        foreign.undefine()
        await cleanup(agent)


async def test_release_removes_the_instance(store, tmp_path):
    async with running_agent(store, tmp_path) as agent:
        host = agent.host
        sid = await place(store, host)
        await wait_for(store, sid, "server.running")
        ev = cause().make(
            HostReleased, SYSTEM, "host", host, server=sid, server_tenant=TENANT, reason="test"
        )
        await store.append([ev])
        for _ in range(200):
            if not owned(agent):
                break
            await asyncio.sleep(0.05)
        assert owned(agent) == {}


async def test_reconcile_recreates_the_missing_and_removes_strays(store, tmp_path):
    async with running_agent(store, tmp_path) as agent:
        host = agent.host
        a = await place(store, host)
        b = await place(store, host)
        await wait_for(store, a, "server.running")
        await wait_for(store, b, "server.running")
        await agent.stop()
        conn = agent.drivers["vm"].conn
        # By hand: one domain destroyed and undefined, one stray of ours added.
        gone = conn.lookupByName(domain_name(a))
        gone.destroy()
        gone.undefine()
        claim_b = (await agent.read_host()).instances[b].claim
        stray = msgspec.structs.replace(claim_b, server="0190aaaa-bbbb-7ccc-8ddd-eeeeeeeeeeee")
        stray_spec = agent.instance(stray)
        agent.drivers["vm"].ensure(stray_spec)
        assert set(owned(agent)) == {b, stray_spec.server}

        restarted = make_agent(store, host, tmp_path)
        await restarted.start()
        try:
            assert owned(restarted) == {a: "running", b: "running"}
            evs = await store.read_all(subjects=[f"ev.{SYSTEM}.host.{host}"])
            report = [r.decode() for r in evs if r.decode().type_name() == "host.reconciled"]
            assert len(report) == 1
            assert report[0].recreated == [a]
            assert report[0].removed == [stray_spec.server]
            assert types(await wait_for(store, a, "server.running")).count("server.running") == 2
            seq = await store.last_seq()
            await restarted.stop()
            # A restart with nothing changed changes nothing, appends nothing.
            again = make_agent(store, host, tmp_path)
            await again.start()
            await again.stop()
            assert await store.last_seq() == seq
            assert owned(again) == {a: "running", b: "running"}
        finally:
            await cleanup(restarted)


async def test_registration_and_heartbeat(store, tmp_path):
    host = unique_host()
    liveness = Liveness(store.js)
    await liveness.start()
    agent = make_agent(store, host, tmp_path)
    try:
        assert not liveness.alive(host)
        await agent.start()
        evs = [r.decode() for r in await store.read_all(subjects=[f"ev.{SYSTEM}.host.{host}"])]
        assert types(evs) == ["host.registered"]
        assert evs[0].vcpus == 16 and evs[0].ram_mb == 32768
        for _ in range(100):
            if liveness.alive(host):
                break
            await asyncio.sleep(0.05)
        assert liveness.alive(host) and host in liveness.alive_hosts()
    finally:
        await liveness.stop()
        await cleanup(agent)


async def test_liveness_watches_again_when_its_watch_dies_with_the_bucket(store):
    """A cluster's node loss can take the bucket's leader and the watch's
    consumer with it, and nothing tells the watcher: the scheduler then saw
    every host lapse for good ('no valid host: not alive' after a leader
    kill). A watch quiet for longer than beats come is made again."""
    from stratus.events.heartbeat import beat, bucket
    from stratus.events.scheduling import HEARTBEATS

    host = unique_host()
    seen: list[float] = []
    liveness = Liveness(
        store.js, on_change=lambda h, until: seen.append(until) if h == host else None, stall_s=1.0
    )
    await liveness.start()
    try:
        await beat(store.js, host)
        for _ in range(100):
            if seen:
                break
            await asyncio.sleep(0.02)
        assert seen and liveness.alive(host)
        # given the watch's consumer gone with its stream
        await store.js.delete_key_value(HEARTBEATS)
        await bucket(store.js)
        before = len(seen)
        # when the host beats again
        await beat(store.js, host)
        # then the watcher learns of it (a dead watch never would)
        for _ in range(200):  # 4 s at most: a stall of 1 s, then a new watch
            if len(seen) > before and seen[-1] > 0:
                break
            await asyncio.sleep(0.02)
        assert len(seen) > before and seen[-1] > 0, seen
    finally:
        await liveness.stop()


async def test_a_failed_heartbeat_goes_again_soon_not_an_interval_later(store, tmp_path):
    """While beats fail (a cluster electing the bucket's leader takes 4-9 s)
    the agent beats again within a second or so, so the host's TTL does not
    lapse on top of the outage: here the bucket is gone for a while."""
    from stratus.events.heartbeat import beating_hosts, bucket
    from stratus.events.scheduling import HEARTBEATS

    host = unique_host()
    agent = make_agent(store, host, tmp_path)
    agent.heartbeat_interval = 6.0
    try:
        await agent.start()
        started = asyncio.get_running_loop().time()
        assert host in await beating_hosts(store.js)  # the start's own beat
        # given beats failing: the bucket is gone at the first periodic beat
        await store.js.delete_key_value(HEARTBEATS)
        await asyncio.sleep(max(0.0, started + 6.5 - asyncio.get_running_loop().time()))
        # when it is back (the next periodic beat would be 5.5 s away)
        await bucket(store.js)
        back = asyncio.get_running_loop().time()
        # then the host beats again within the retry, not an interval later
        for _ in range(60):
            if host in await beating_hosts(store.js):
                break
            await asyncio.sleep(0.05)
        waited = asyncio.get_running_loop().time() - back
        assert host in await beating_hosts(store.js), waited
        assert waited < 3.0, waited
    finally:
        await cleanup(agent)


async def wait_image(store, image_id, timeout=20.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        recs = await store.read_all(subjects=[f"ev.{TENANT}.image.{image_id}"])
        if recs:
            return recs[-1].decode()
        await asyncio.sleep(0.05)
    raise AssertionError(f"image {image_id} never recorded")


async def stored_image(store, path: Path, name: str = "base") -> tuple[str, str]:
    """``path`` put in the object store and recorded as an active image: (id, checksum)."""
    checksum = await asyncio.to_thread(images.sha256, path)
    blobs = await BlobStore.open(store.js)
    stored = await blobs.put_file(checksum, path)
    image_id = new_id()
    created = cause().make(
        ImageCreated,
        TENANT,
        "image",
        image_id,
        name=name,
        format="qcow2",
        size_bytes=stored.size,
        checksum=checksum,
    )
    await store.append([created])
    return image_id, checksum


async def test_snapshot_layers_on_its_image_and_boots(store, tmp_path):
    async with running_agent(store, tmp_path) as agent:
        host = agent.host
        src = tmp_path / "base.qcow2"
        await asyncio.to_thread(images.qemu_img, "create", "-q", "-f", "qcow2", str(src), "32M")
        parent_id, parent_sum = await stored_image(store, src)
        first = await place(store, host, image=parent_id)
        await wait_for(store, first, "server.running")

        snap_id = new_id()
        await action(store, host, first, "snapshot", image=snap_id, image_name="snap")
        snap = await wait_image(store, snap_id)
        assert snap.name == "snap" and snap.parent == parent_id and snap.format == "qcow2"
        # Recorded only once stored: the object store has exactly its bytes.
        blobs = await BlobStore.open(store.js)
        assert (await blobs.exists(snap.checksum)).size == snap.size_bytes
        snap_file = agent.cache.root / f"{snap.checksum}.qcow2"
        chain = images.info(snap_file, chain=True)
        # The snapshot keeps only its own changes, backed by the parent's file
        # under its cache name (the same on every host).
        assert [Path(c["filename"]).name for c in chain] == [
            f"{snap.checksum}.qcow2",
            f"{parent_sum}.qcow2",
        ]
        assert images.sha256(snap_file) == snap.checksum
        assert owned(agent)[first] == "running"  # paused for the copy, then resumed

        second = await place(store, host, image=snap_id)
        evs = await wait_for(store, second, "server.running")
        chain = images.info(Path(evs[-1].disk), chain=True)
        assert len(chain) == 3
        assert images.sha256(Path(chain[1]["filename"])) == snap.checksum
        assert images.sha256(Path(chain[2]["filename"])) == parent_sum

        # A redelivered snapshot request records nothing twice.
        want = agent.desired.instances[first]
        redo = cause().make(
            HostServerAction,
            SYSTEM,
            "host",
            host,
            server=first,
            server_tenant=TENANT,
            action="snapshot",
            image=snap_id,
            image_name="snap",
        )
        await agent._snapshot(redo, want, agent.instance(want.claim, want), agent.drivers["vm"])
        assert len(await store.read_all(subjects=[f"ev.{TENANT}.image.{snap_id}"])) == 1


async def test_volume_attach_and_detach_reach_the_domain(store, tmp_path):
    async with running_agent(store, tmp_path) as agent:
        host = agent.host
        sid = await place(store, host)
        await wait_for(store, sid, "server.running")
        vol = new_id()
        path = agent.volumes / f"{vol}.qcow2"
        dom = agent.drivers["vm"].conn.lookupByName(domain_name(sid))

        def xml() -> str:
            # The definition: the test driver has no hotplug, so the disk is
            # added to what the domain boots with (live too where supported).
            return dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)

        await action(store, host, sid, "attach-volume", volume=vol, size_gb=2)
        for _ in range(200):
            if str(path) in xml():
                break
            await asyncio.sleep(0.05)
        assert f"<source file='{path}'/>" in xml()
        assert "<target dev='vdb' bus='virtio'/>" in xml()
        assert images.info(path)["virtual-size"] == 2 << 30
        await action(store, host, sid, "detach-volume", volume=vol)
        for _ in range(200):
            if str(path) not in xml():
                break
            await asyncio.sleep(0.05)
        assert str(path) not in xml()
        assert path.exists()  # the volume outlives its attachment


async def test_an_event_naming_no_valid_server_touches_nothing(store, tmp_path):
    host = unique_host()
    agent = make_agent(store, host, tmp_path, containers=True)
    await agent.start()
    try:
        sid = await place(store, host)
        await wait_for(store, sid, "server.running")
        seq = await store.last_seq()
        bad = host_action(host, "../../../etc", "delete")
        await agent.handle(bad)
        assert await store.last_seq() == seq
        assert owned(agent) == {sid: "running"}
        assert "../../../etc" not in agent.desired.instances
        # The same from the log: skipped by the consumer and by a restart's
        # fold, and no obstacle to the restarted agent's registration.
        await store.append([bad])
        first = agent
        await first.stop()
        agent = make_agent(
            store, host, tmp_path, containers=True, spec=HostSpec(vcpus=8, ram_mb=4096, disk_gb=50)
        )
        await agent.start()
        # (closed only now: the test driver forgets its domains with its last connection)
        first.close()
        evs = [r.decode() for r in await store.read_all(subjects=[f"ev.{SYSTEM}.host.{host}"])]
        assert types(evs)[-1] == "host.updated" and evs[-1].vcpus == 8
        assert owned(agent) == {sid: "running"}
        assert "../../../etc" not in agent.desired.instances
    finally:
        await cleanup(agent)


async def test_an_action_no_host_may_be_given_fails_the_server_at_once(store, tmp_path):
    async with running_agent(store, tmp_path) as agent:
        host = agent.host
        sid = await place(store, host)
        await wait_for(store, sid, "server.running")
        # A volume id no path may be made of: refused with the reason, not retried.
        await action(store, host, sid, "attach-volume", volume="../../x", size_gb=1)
        evs = await wait_for(store, sid, "server.failed", timeout=5)
        assert "volumes" in evs[-1].reason and evs[-1].host == host
        assert not any(p.name.startswith("..") for p in agent.volumes.iterdir())
        # Later events of the server are handled as usual.
        await action(store, host, sid, "delete")
        await wait_for(store, sid, "server.deleted")
        assert owned(agent) == {}


async def test_an_error_of_the_agents_own_is_retried_then_given_up_and_reported(store, tmp_path):
    async with running_agent(store, tmp_path) as agent:
        agent.retry_delay = 0.05
        host = agent.host
        # The image as a newer Stratus records it: this agent cannot read it
        # (no host refusal to report), so it tries again, then gives up.
        image = new_id()
        newer = cause().make(ImageCreated, TENANT, "image", image, name="next")
        raw = msgspec.to_builtins(newer) | {"v": 99}
        await store.js.publish(newer.subject, msgspec.msgpack.encode(raw))
        sid = await place(store, host, image=image)
        evs = await wait_for(store, sid, "server.failed", timeout=30)
        assert "after 5 attempts" in evs[-1].reason and "version 99" in evs[-1].reason
        assert "server.running" not in types(evs)
        await action(store, host, sid, "delete")
        await wait_for(store, sid, "server.deleted")
        assert owned(agent) == {}


async def test_a_redelivered_claim_builds_nothing_twice_and_reports_nothing_twice(store, tmp_path):
    async with running_agent(store, tmp_path) as agent:
        host = agent.host
        sid = await place(store, host)
        before = await wait_for(store, sid, "server.running")
        claim = agent.desired.instances[sid].claim
        disk = agent.disks / f"{sid}.qcow2"
        mtime = disk.stat().st_mtime_ns
        await agent.handle(claim)  # what a redelivery after a crash does
        assert types(await server_events(store, sid)) == types(before)
        assert owned(agent) == {sid: "running"}
        assert disk.stat().st_mtime_ns == mtime  # the overlay was kept, not remade
