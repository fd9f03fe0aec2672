"""Containers of OCI images, run by runc on overlayfs (root only): the
image's root, not the host's; the server's name as hostname; the image's
command as PID 1; writes private to each container and never reaching the
shared layers; the CPU and memory limits; exec; ping without a raw socket;
and nothing left after removal (mounts, bundle, cgroups, runtime state,
network namespace)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from stratus.agents.compute import layers
from stratus.agents.compute.containers import NETNS_DIR, ContainerDriver, netns_name
from stratus.agents.compute.runtime import mounted
from stratus.agents.compute.spec import InstanceSpec
from stratus.events import oci
from stratus.events.errors import HostError
from stratus.events.ids import new_id
from stratus.events.resources import ServerSpec
from stratus.ops.bench.ociimage import busybox_image

from .compute_helpers import unique_host
from .test_compute_containers import cpu_seconds

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(os.geteuid() != 0, reason="containers need root (namespaces, mounts)"),
]


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> tuple[oci.OciConfig, list[str]]:
    """The busybox image, read and checked, its layer unpacked once."""
    tmp = tmp_path_factory.mktemp("ociimage")
    busybox_image(tmp / "bb.tar", cmd=["sleep", "3600"])
    (tmp / "work").mkdir()
    a = oci.read_archive(tmp / "bb.tar", tmp / "work")
    dirs = []
    for d in a.config.layers:
        layers.unpack(Path(a.blobs[d]), tmp / d)
        dirs.append(str(tmp / d))
    return a.config, dirs


@pytest.fixture
def driver(tmp_path):
    d = ContainerDriver(unique_host(), tmp_path / "containers", deployment="t")
    yield d
    for server in list(d.list_owned()):
        d.remove(server)
    d.close()
    assert not d.cgroups.bases[0].exists()
    assert not d.oci.runc.root.exists()


def spec(image, name: str = "web", **kw) -> InstanceSpec:
    config, dirs = image
    asked = ServerSpec(
        name=name, image="bb", vcpus=1, ram_mb=kw.pop("ram_mb", 64), instance_type="container"
    )
    return InstanceSpec(
        server=new_id(),
        tenant="acme",
        requested=asked,
        layers=dirs,
        command=kw.pop("command", config.argv()),
        env=config.env,
        **kw,
    )


def sh(driver: ContainerDriver, server: str, script: str) -> str:
    r = driver.exec(server, ["sh", "-c", script], 20)
    assert r.exit_code == 0, (script, r.stdout, r.stderr)
    return r.stdout


def test_the_root_is_the_images_the_hostname_the_servers_pid1_its_command(driver, image):
    s = spec(image, name="web")
    driver.ensure(s)
    assert driver.state(s.server) == "running"
    root = sh(driver, s.server, "ls /").split()
    assert root == ["bin", "dev", "etc", "proc", "root", "run", "sys", "tmp", "var"]
    assert "usr" in os.listdir("/")  # the host has one, the image has not
    assert sh(driver, s.server, "cat /etc/image-release") == "stratus busybox test image\n"
    assert sh(driver, s.server, "hostname").strip() == "web"
    assert sh(driver, s.server, "cat /proc/1/cmdline | tr '\\0' ' '").strip() == "sleep 3600"
    # runc's default capabilities only, and no new privileges.
    status = sh(driver, s.server, "cat /proc/1/status")
    fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
    assert int(fields["CapEff"], 16) == (1 << 29) | (1 << 5) | (1 << 10) | (1 << 13)
    assert fields["NoNewPrivs"].strip() == "1"
    # Its own network namespace (the one the network agent wires), with lo.
    assert (
        os.stat(NETNS_DIR / netns_name(s.server)).st_ino
        == os.stat(f"/proc/{driver.init_pid(s.server)}/ns/net").st_ino
    )
    # busybox's ping (raw sockets only: CAP_NET_RAW, in its own netns).
    assert " 0% packet loss" in sh(driver, s.server, "ping -c 1 -W 2 127.0.0.1")
    # What it may not do: CAP_SYS_ADMIN is not in its set.
    assert driver.exec(s.server, ["mount", "-t", "tmpfs", "x", "/tmp"], 10).exit_code != 0


def test_writes_are_private_and_never_reach_the_shared_layers(driver, image):
    _, dirs = image
    lower = Path(dirs[0])
    before = sorted(p.name for p in (lower / "etc").iterdir())
    a, b = spec(image, name="a"), spec(image, name="b")
    driver.ensure(a)
    driver.ensure(b)
    sh(driver, a.server, "echo mine > /tmp/note && rm /etc/image-release && echo x > /bin/new")
    assert sh(driver, a.server, "cat /tmp/note") == "mine\n"
    assert driver.exec(b.server, ["cat", "/tmp/note"], 10).exit_code != 0
    assert sh(driver, b.server, "cat /etc/image-release") == "stratus busybox test image\n"
    # The shared layer is as it was: the writes and the deletion are in a's upper.
    assert sorted(p.name for p in (lower / "etc").iterdir()) == before
    assert not (lower / "bin" / "new").exists() and not (lower / "tmp" / "note").exists()
    upper = driver.oci.upper(a.server)
    assert (upper / "tmp" / "note").read_text() == "mine\n"
    assert os.lstat(upper / "etc" / "image-release").st_rdev == os.makedev(0, 0)
    # The overlay mounts the layer read-only: lowerdir, never upperdir.
    mountinfo = Path("/proc/self/mountinfo").read_text()
    line = next(
        ln for ln in mountinfo.splitlines() if f"{driver.oci.bundle(a.server)}/rootfs" in ln
    )
    assert f"lowerdir={lower}" in line and f"upperdir={upper}" in line
    # Stop and start keep the container's writes (its upper stays).
    driver.stop(a.server)
    assert driver.state(a.server) == "stopped"
    driver.ensure(a)
    assert sh(driver, a.server, "cat /tmp/note") == "mine\n"


def test_cpu_limit_holds_a_busy_loop_to_its_share(driver, image):
    s = spec(image, cpu=0.2, command=["sh", "-c", "while :; do :; done"])
    driver.ensure(s)
    pid = driver.init_pid(s.server)
    assert pid is not None
    start, t0 = cpu_seconds(pid), time.monotonic()
    time.sleep(2.0)
    used = (cpu_seconds(pid) - start) / (time.monotonic() - t0)
    assert 0.05 < used < 0.3, f"used {used:.2f} of a core, limit 0.2"


def test_memory_hog_is_killed_at_its_limit(driver, image):
    s = spec(image, ram_mb=32)
    driver.ensure(s)
    r = driver.exec(s.server, ["sh", "-c", "x=$(head -c 200000000 /dev/zero | tr '\\0' a)"], 60)
    assert r.exit_code != 0
    assert driver.cgroups.oom_kills(s.server) >= 1
    assert driver.state(s.server) == "running"  # the hog died, PID 1 did not


def test_nothing_is_left_after_removal(driver, image):
    s = spec(image)
    driver.ensure(s)
    bundle = driver.oci.bundle(s.server)
    group = driver.cgroups.group
    assert mounted(bundle / "rootfs")
    assert s.server in driver.oci.runc.list()
    hierarchies = [h for h in Path("/sys/fs/cgroup").iterdir() if (h / "stratus").is_dir()]
    assert any((h / "stratus" / group / s.server).is_dir() for h in hierarchies)
    driver.remove(s.server)
    assert driver.state(s.server) is None and driver.list_owned() == {}
    assert not mounted(bundle / "rootfs") and not bundle.exists()
    assert s.server not in driver.oci.runc.list()
    assert not any((h / "stratus" / group / s.server).exists() for h in hierarchies)
    assert not (NETNS_DIR / netns_name(s.server)).exists()
    with pytest.raises(HostError, match="not running"):
        driver.exec(s.server, ["true"], 5)


def test_two_deployments_on_one_host_name_see_only_their_own(tmp_path, image):
    host = unique_host()
    mine = ContainerDriver(host, tmp_path / "a", deployment="oa")
    theirs = ContainerDriver(host, tmp_path / "b", deployment="ob")
    try:
        s = spec(image)
        mine.ensure(s)
        assert mine.list_owned() == {s.server: "running"}
        assert theirs.list_owned() == {}
        assert mine.oci.runc.root != theirs.oci.runc.root
        assert theirs.oci.runc.list() == {}
    finally:
        for d in (mine, theirs):
            for server in list(d.list_owned()):
                d.remove(server)
            d.close()


def test_bad_specs_are_refused_before_anything_is_made(driver, image):
    bad = spec(image, name="web")
    for wrong, why in (
        ({"layers": ["/tmp/a,upperdir=/etc"]}, "layers"),
        ({"layers": ["relative/dir"]}, "layers"),
        ({"env": ["NOEQUALS"]}, "env"),
        ({"user": "nobody"}, "uid"),
    ):
        import msgspec

        with pytest.raises(Exception, match=why):
            driver.ensure(msgspec.structs.replace(bad, **wrong))
        assert driver.list_owned() == {}


async def test_the_agent_restarts_a_container_killed_by_hand_and_records_the_drift(store, tmp_path):
    """Reconcile of OCI containers: the image from the object store, the
    container killed behind the agent's back, the periodic pass runs it
    again (its writes kept: the same upper) and says so in the log."""
    import asyncio

    from stratus.events.blobs import BlobStore
    from stratus.events.model import Cause
    from stratus.events.resources import ImageCreated

    from .compute_helpers import TENANT, cleanup, make_agent, place, wait_for

    busybox_image(tmp_path / "bb.tar")
    (tmp_path / "w").mkdir()
    archive = oci.read_archive(tmp_path / "bb.tar", tmp_path / "w")
    blobs = await BlobStore.open(store.js)
    for digest, path in archive.paths():
        await blobs.put_file(digest, path)
    image = new_id()
    cause = Cause(actor="test", correlation_id=image, causation_id=image)
    await store.append(
        [
            cause.make(
                ImageCreated,
                TENANT,
                "image",
                image,
                name="bb",
                format="oci",
                checksum=archive.digest,
                oci=archive.config,
            )
        ]
    )
    host = unique_host()
    agent = make_agent(store, host, tmp_path, vm=False, containers=True, reconcile_interval=1)
    await agent.start()
    try:
        sid = await place(store, host, instance_type="container", image=image)
        evs = await wait_for(store, sid, "server.running")
        assert evs[-1].runtime.startswith("runc ")
        driver = agent.drivers["container"]
        sh(driver, sid, "echo kept > /root/f")
        driver.oci.runc.call("kill", sid, "KILL")
        for _ in range(50):
            if driver.state(sid) == "stopped":
                break
            await asyncio.sleep(0.05)
        fixes: list = []
        for _ in range(100):
            recs = await store.read_all(subjects=[f"ev._system.host.{host}"])
            fixes = [r.decode() for r in recs if r.decode().type_name() == "host.reconciled"]
            if fixes:
                break
            await asyncio.sleep(0.1)
        assert [f.started for f in fixes] == [[sid]]
        assert driver.state(sid) == "running"
        assert sh(driver, sid, "cat /root/f") == "kept\n"
    finally:
        await cleanup(agent)
    assert driver.list_owned() == {}
