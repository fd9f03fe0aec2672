"""`stratus up --hosts 1` with its scheduler and compute agent, driven
through the CLI: image files uploaded over NATS, checked and stored in the
object store, a VM on an overlay of that image, a container answering
`server exec`, malformed images refused with nothing left."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from stratus.agents.compute import images
from stratus.agents.compute.containers import ContainerDriver
from stratus.cli.datadir import deployment_prefix

from .test_cli import STRATUS, Up, cli, login

pytestmark = pytest.mark.timeout(180)

HOST = "host-01"


def qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


def show(url: str, ref: str) -> dict:
    r = cli(url, "server", "show", ref, "-o", "json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def create_server(url: str, name: str, *extra: str) -> dict:
    """``server create`` of a 1-vCPU, 64 MB server of image ``base``; its row."""
    args = ["--image", "base", "--vcpus", "1", "--ram-mb", "64", *extra, "-o", "json"]
    r = cli(url, "server", "create", name, *args)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def wait_status(url: str, ref: str, status: str, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = show(url, ref)
        if s["status"] == status:
            return s
        time.sleep(0.2)
    raise AssertionError(f"server {ref} not {status} in {timeout}s: {show(url, ref)}")


def last_seq(url: str) -> int:
    r = cli(url, "status", "-o", "json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["last_seq"]


def bucket(data: Path, url: str) -> tuple[list[str], dict[str, int]]:
    """The image bucket as the services see it: objects, and chunk subjects."""
    from stratus.cli.creds import local_creds
    from stratus.events.blobs import BlobStore
    from stratus.events.store import EventStore

    # the handlers' own rights on the bucket (a credential signed in ``data``)
    creds = local_creds(data, "handlers")

    async def look() -> tuple[list[str], dict[str, int]]:
        store = await EventStore.connect(url, creds=creds)
        try:
            blobs = await BlobStore.open(store.js)
            return [b.digest for b in await blobs.stored()], await blobs.chunk_subjects()
        finally:
            await store.close()

    return asyncio.run(look())


def test_up_with_a_host_runs_servers_from_uploaded_images(tmp_path):
    data = tmp_path / "d"
    up = Up(data, "--hosts", "1")
    url = up.start(timeout=60)
    # The client shares nothing with the services but the URL: its own
    # working directory, and a data dir that does not exist.
    client = tmp_path / "client"
    client.mkdir()
    try:
        login(url)
        r = cli(url, "host", "list", "-o", "json")
        assert r.returncode == 0 and [h["id"] for h in json.loads(r.stdout)] == [HOST]

        # Malformed images are refused and leave nothing: no image, no bytes.
        raw = client / "raw.img"
        raw.write_bytes(b"\0" * 65536)
        evil = client / "evil.qcow2"
        qemu_img("create", "-f", "qcow2", "-b", str(raw), "-F", "raw", str(evil))
        for path, fmt, why in ((raw, "qcow2", "is a raw image"), (evil, "qcow2", "backing file")):
            r = cli(url, "image", "create", "bad", "--file", path.name, "--format", fmt, cwd=client)
            assert r.returncode == 1 and "invalid" in r.stderr and why in r.stderr, r.stderr
        assert json.loads(cli(url, "image", "list", "-o", "json").stdout) == []
        assert bucket(data, url) == ([], {})

        base = client / "base.qcow2"
        qemu_img("create", "-f", "qcow2", str(base), "64M")
        r = cli(url, "image", "create", "base", "--file", "base.qcow2", "-o", "json", cwd=client)
        assert r.returncode == 0, r.stderr
        image = json.loads(r.stdout)
        assert image["status"] == "active" and image["checksum"] == images.sha256(base)
        assert image["size_bytes"] == base.stat().st_size and image["min_disk_gb"] == 1
        objects, chunks = bucket(data, url)
        assert objects == [image["checksum"]] and len(chunks) == 1
        assert not (data / "images").exists()  # no image store on a disk

        vm = create_server(url, "vm1")
        box = create_server(url, "box", "--type", "container")
        # The scheduler places both on the only host; its agent builds them.
        running = wait_status(url, "vm1", "running")
        assert running["id"] == vm["id"] and running["host"] == HOST
        assert running["scheduling"]  # placed by the scheduler, with its reasons
        chain = images.info(Path(running["disk"]), chain=True)
        assert len(chain) == 2
        # The overlay's base is the host's cached copy of exactly that image.
        assert images.sha256(Path(chain[1]["filename"])) == image["checksum"]

        assert wait_status(url, "box", "running")["id"] == box["id"]
        r = cli(url, "server", "exec", "box", "--", "sh", "-c", "echo hello from $$; exit 4")
        assert r.returncode == 4, r.stderr
        assert r.stdout.startswith("hello from ")
        r = cli(url, "server", "exec", "vm1", "--", "true")
        assert r.returncode == 1 and "container" in r.stderr

        # Issue 17: stop and start print the status they lead to, pending
        # until the host's agent has done it (they printed the old one).
        for verb, pending, settled in (
            ("stop", "stopping", "stopped"),
            ("start", "starting", "running"),
        ):
            r = cli(url, "server", verb, "vm1", "-o", "json")
            assert r.returncode == 0, r.stderr
            assert json.loads(r.stdout)["status"] == pending
            wait_status(url, "vm1", settled)

        for name in ("vm1", "box"):
            assert cli(url, "server", "delete", name).returncode == 0
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            r = cli(url, "server", "list", "-o", "json")
            if not json.loads(r.stdout):
                break
            time.sleep(0.2)
        assert json.loads(cli(url, "server", "list", "-o", "json").stdout) == []
        assert not Path(running["disk"]).exists()
    finally:
        up.stop()
        # Whatever a failed run left on the host (instances outlive agents).
        leftover = ContainerDriver(
            HOST, data / "hosts" / HOST / "containers", deployment=deployment_prefix(data)
        )
        for server in leftover.list_owned():
            leftover.remove(server)
        leftover.cgroups.prune()


def test_serve_compute_agent_registers_its_host_and_stops_on_sigterm(tmp_path):
    data = tmp_path / "d"
    up = Up(data)
    url = up.start(timeout=60)
    agent = None
    try:
        login(url)
        # the agent's own credentials, issued where the cloud was initialised,
        # and a data dir of its own
        creds = tmp_path / "edge-7.creds"
        r = cli(
            url,
            *("credentials", "issue", "--service", "compute-agent", "--host", "edge-7"),
            *("--data-dir", str(data), "--file", str(creds)),
        )
        assert r.returncode == 0, r.stderr
        assert oct(creds.stat().st_mode & 0o777) == "0o600"
        agent = subprocess.Popen(
            [
                *STRATUS,
                "--url",
                url,
                "serve",
                "compute-agent",
                "--creds",
                str(creds),
                "--data-dir",
                str(tmp_path / "edge-7"),
                "--host",
                "edge-7",
                "--libvirt-uri",
                "test:///default",
                "--types",
                "vm",
                "--vcpus",
                "8",
                "--label",
                "rack=r1",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        assert agent.stdout is not None
        line = agent.stdout.readline()
        assert "compute-agent edge-7 ready" in line, line
        r = cli(url, "host", "show", "edge-7", "-o", "json")
        assert r.returncode == 0, r.stderr
        host = json.loads(r.stdout)
        assert host["vcpus"] == 8 and host["labels"] == {"rack": "r1"}
        assert host["types"] == ["vm"]
        # a server created through the CLI is placed on edge-7 and built by
        # this agent, which has nothing but its credentials file: the image
        # from the bucket, its reports through the handlers' relay
        client = tmp_path / "client"
        client.mkdir()
        qemu_img("create", "-f", "qcow2", str(client / "base.qcow2"), "64M")
        r = cli(url, "image", "create", "base", "--file", "base.qcow2", cwd=client)
        assert r.returncode == 0, r.stderr
        create_server(url, "vm-edge")
        running = wait_status(url, "vm-edge", "running", timeout=60)
        assert running["host"] == "edge-7"
        assert Path(running["disk"]).is_relative_to(tmp_path / "edge-7")
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(15) == 0
        r = subprocess.run(
            [
                *STRATUS,
                *("--url", url, "serve", "compute-agent"),
                *("--creds", str(creds), "--host", "Bad Name"),
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert r.returncode == 1 and "invalid" in r.stderr
    finally:
        if agent is not None and agent.poll() is None:
            agent.kill()
            agent.wait(5)
        if agent is not None and agent.stdout:
            agent.stdout.close()
        up.stop()


def test_demo_boots_servers_a_snapshot_and_a_container():
    r = subprocess.run([*STRATUS, "demo"], capture_output=True, text=True, timeout=170)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = r.stdout
    assert "disk 2 layers" in out  # vm-1: an overlay on the stored image
    assert "booted from the snapshot" in out and "3 layers" in out
    assert "exec said 'pid " in out and "container box deleted" in out
    assert "demo finished" in out
    # The container went with its server, and nothing of it is left behind.
    data = re.search(r"\(data dir (\S+)\)", out)
    assert data is not None
    group = f"{deployment_prefix(Path(data.group(1)))}.host-01"
    assert not Path("/sys/fs/cgroup/cpu/stratus", group).exists()


def test_serve_with_credentials_of_another_host_or_kind_stops_in_one_line(tmp_path):
    data = tmp_path / "d"
    up = Up(data)
    url = up.start(timeout=60)
    try:
        login(url)
        creds = tmp_path / "edge-7.creds"
        r = cli(
            url,
            *("credentials", "issue", "--service", "compute-agent", "--host", "edge-7"),
            *("--data-dir", str(data), "--file", str(creds)),
        )
        assert r.returncode == 0, r.stderr
        before = last_seq(url)
        runs = {
            # edge-7's credentials for host edge-8: its first append is refused
            "another host": ["compute-agent", "--host", "edge-8", "--types", "vm"],
            # a compute agent's credentials for the scheduler
            "another kind": ["scheduler"],
        }
        for what, args in runs.items():
            r = subprocess.run(
                [
                    *(*STRATUS, "--url", url, "serve", args[0], "--creds", str(creds)),
                    *("--data-dir", str(tmp_path / what.replace(" ", "-")), *args[1:]),
                ],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert r.returncode == 1, (what, r.stderr[-2000:])
            errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
            assert len(errors) == 1, (what, r.stderr[-2000:])
            assert errors[0].startswith("error: forbidden: the broker refused"), errors
            assert "compute-agent for host edge-7 credentials" in errors[0], errors
        assert last_seq(url) == before, "a refused service appended something"
    finally:
        up.stop()
