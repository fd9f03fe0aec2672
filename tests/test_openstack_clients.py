"""The real OpenStack clients against `stratus up`: the `openstack` command
exactly as a user types it (a clouds.yaml in a temp dir, OS_CLOUD), then the
same flow through openstacksdk.

The `openstack` command takes seconds to start, so each step list runs in
one process through its interactive mode (commands on stdin, one JSON
document out per command that prints one). That mode always exits 1, so a
failed step shows as its error on stderr and a missing document."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .test_cli import CONFIG_HOME, Up, cli, login

OPENSTACK = str(Path(sys.executable).with_name("openstack"))
PASSWORD = "alice-secret"


class Cloud:
    """A `stratus up` with one simulated host, a tenant, a member and a
    flavor, and a clouds.yaml for it."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.up = Up(tmp / "data", "--hosts", "1")

    def start(self) -> None:
        url = self.up.start(timeout=60)
        self.url = url
        # `up` prints the API's auth URL before it says ready.
        (said,) = [x for x in self.up.lines if x.startswith("openstack api: ")]
        self.auth_url = said.removeprefix("openstack api: ").strip()
        login(url)
        for args in (
            ("tenant", "create", "acme"),
            ("tenant", "create", "other"),
            ("user", "create", "alice", "--password", PASSWORD),
            ("user", "create", "bob", "--password", PASSWORD),
            ("role", "assign", "--user", "alice", "--tenant", "acme", "--role", "member"),
            ("role", "assign", "--user", "bob", "--tenant", "other", "--role", "member"),
            ("flavor", "create", "m1-tiny", "--vcpus", "1", "--ram-mb", "256", "--disk-gb", "1"),
            ("flavor", "create", "huge", "--vcpus", "512", "--ram-mb", "256"),
            ("network", "create", "public", "--external", "--cidr", "203.0.113.0/24"),
            ("quota", "set", "acme", "--vcpus", "2000"),
            ("quota", "set", "other", "--vcpus", "2000"),
        ):
            r = cli(url, *args)
            assert r.returncode == 0, (args, r.stderr)
        self.clouds = self.tmp / "clouds.yaml"
        self.clouds.write_text(
            "clouds:\n"
            + "".join(
                f"  {name}:\n"
                "    auth:\n"
                f"      auth_url: {self.auth_url}\n"
                f"      username: {user}\n"
                f"      password: {PASSWORD}\n"
                f"      project_name: {project}\n"
                "      user_domain_name: Default\n"
                "      project_domain_name: Default\n"
                "    region_name: RegionOne\n"
                "    identity_api_version: 3\n"
                for name, user, project in (("acme", "alice", "acme"), ("other", "bob", "other"))
            )
        )

    def stop(self) -> None:
        if self.up.proc is not None:
            self.up.stop(signal.SIGTERM, timeout=30)

    def openstack(
        self, *commands: str, cloud: str = "acme", timeout: float = 240
    ) -> tuple[list[Any], subprocess.CompletedProcess[str]]:
        """Run ``commands`` in one `openstack` process; the JSON documents
        they printed, in order, and the process."""
        env = {
            **os.environ,
            "OS_CLIENT_CONFIG_FILE": str(self.clouds),
            "OS_CLOUD": cloud,
            "HOME": str(self.tmp),
        }
        for k in list(env):
            if k.startswith("OS_") and k not in ("OS_CLIENT_CONFIG_FILE", "OS_CLOUD"):
                env.pop(k)
        done = subprocess.run(
            [OPENSTACK],
            input="\n".join(commands) + "\n",
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            cwd=self.tmp,
        )
        return _documents(done.stdout), done

    def status(self) -> dict[str, Any]:
        r = cli(self.url, "status", "-o", "json")
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)


def _documents(text: str) -> list[Any]:
    out: list[Any] = []
    decoder = json.JSONDecoder()
    i = 0
    while True:
        while i < len(text) and text[i].isspace():
            i += 1
        if i >= len(text):
            return out
        doc, i = decoder.raw_decode(text, i)
        out.append(doc)


@pytest.fixture(scope="module")
def cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cloud]:
    tmp = tmp_path_factory.mktemp("openstack")
    CONFIG_HOME["value"] = str(tmp / "config")
    c = Cloud(tmp)
    try:
        c.start()
        yield c
    finally:
        try:
            c.stop()
        finally:
            c.up.kill()
            for ports in (tmp / "data" / "nats").glob("nats-server_*.ports"):
                pid = int(ports.stem.split("_")[1])
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


def qcow2(path: Path) -> Path:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "64M"], check=True)
    return path


def test_openstack_command_flow(cloud: Cloud) -> None:
    image = qcow2(cloud.tmp / "tiny.qcow2")
    docs, done = cloud.openstack(
        "token issue -f json",
        "flavor list -f json",
        f"image create --file {image} --disk-format qcow2 --container-format bare cirros -f json",
        "image list -f json",
        "network create lan -f json",
        "subnet create lan-v4 --network lan --subnet-range 10.0.0.0/24 -f json",
        "router create edge -f json",
        "router add subnet edge lan-v4",
        "security group create web -f json",
        "security group rule create web --protocol tcp --dst-port 80 -f json",
        "server create --image cirros --flavor m1-tiny --network lan --security-group web"
        " --wait web-1 -f json",
        "server show web-1 -f json",
        "floating ip create public -f json",
    )
    assert done.stderr == "", done.stderr
    token, flavors, img, images, net, subnet, router, group, rule, created, shown, fip = docs
    assert token["project_id"] == "acme" and token["user_id"] == "alice"
    # `stratus status` names the API `up` runs, by its auth URL.
    env = {**os.environ, "STRATUS_DATA_DIR": str(cloud.tmp / "data")}
    env["XDG_CONFIG_HOME"] = CONFIG_HOME["value"]
    status = subprocess.run(
        [sys.executable, "-m", "stratus.cli.main", "status", "-o", "json"],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert json.loads(status.stdout)["openstack_auth_url"] == cloud.auth_url
    assert {"m1-tiny", "huge"} <= {f["Name"] for f in flavors}
    assert img["status"] == "active" and img["disk_format"] == "qcow2"
    assert img["size"] == image.stat().st_size
    assert [i["Name"] for i in images] == ["cirros"]
    assert net["name"] == "lan" and net["status"] == "ACTIVE"
    assert subnet["cidr"] == "10.0.0.0/24" and subnet["gateway_ip"] == "10.0.0.1"
    assert router["name"] == "edge"
    # Neutron's two default egress rules, then the one asked for.
    egress = [r for r in group["rules"] if r["direction"] == "egress"]
    assert sorted(r["ethertype"] for r in egress) == ["IPv4", "IPv6"]
    assert (rule["protocol"], rule["port_range_min"], rule["port_range_max"]) == ("tcp", 80, 80)
    assert created["status"] == "ACTIVE" and shown["status"] == "ACTIVE"
    assert shown["flavor"].startswith("m1-tiny")
    assert shown["addresses"] == {"lan": ["10.0.0.2"]}
    address = fip["floating_ip_address"]
    assert address.startswith("203.0.113.")

    docs, done = cloud.openstack(
        f"server add floating ip web-1 {address}",
        "server show web-1 -f json",
        "router show edge -f json",
        "quota show -f json",
        "server delete --wait web-1",
        "server list -f json",
    )
    assert done.stderr == "", done.stderr
    shown, router, quota, servers = docs
    assert shown["addresses"] == {"lan": ["10.0.0.2", address]}
    assert router["interfaces_info"][0]["ip_address"] == "10.0.0.1"
    quotas = {q["Resource"]: q["Limit"] for q in quota}
    assert quotas["instances"] == 10 and quotas["cores"] == 2000 and quotas["networks"] == 10
    assert servers == []

    # The trail names the channel: every change above came through the API.
    r = cli(cloud.url, "audit", "--tenant", "acme", "--type", "server.*", "-o", "json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    mine = [x for x in rows if x["actor"] == "alice"]
    assert {x["type"] for x in mine} >= {"server.requested", "server.deleting"}
    assert all(x["via"] == "openstack-api" for x in mine)


def test_openstack_impossible_server_shows_the_scheduler_reason(cloud: Cloud) -> None:
    image = qcow2(cloud.tmp / "tiny2.qcow2")
    docs, done = cloud.openstack(
        f"image create --file {image} --disk-format qcow2 base -f json",
        "server create --image base --flavor huge --wait huge-1 -f json",
        "server show huge-1 -f json",
        cloud="other",
    )
    assert "Error creating server: huge-1" in done.stderr  # the --wait create failed ...
    shown = docs[-1]
    assert shown["status"] == "ERROR"
    # ... and the fault says why, in the scheduler's words.
    assert shown["fault"]["message"] == "No valid host: 0/1 hosts: 1 insufficient vCPU"


def test_openstacksdk_flow(cloud: Cloud) -> None:
    import openstack

    os.environ["OS_CLIENT_CONFIG_FILE"] = str(cloud.clouds)
    try:
        conn = openstack.connect(cloud="other")
    finally:
        os.environ.pop("OS_CLIENT_CONFIG_FILE", None)
    before = cloud.status()["last_seq"]
    assert conn.current_project_id == "other"
    assert {f.name for f in conn.compute.flavors()} >= {"m1-tiny"}
    file = qcow2(cloud.tmp / "sdk.qcow2")
    image = conn.create_image("sdk-img", filename=str(file), disk_format="qcow2", wait=True)
    assert image.status == "active"
    got = conn.image.get_image(image.id)
    # The bytes come back from the image service as they went in (the SDK
    # checks them against the MD5 it was given, too).
    assert conn.image.download_image(got).content == file.read_bytes()
    # Extra properties the SDK sends are kept.
    assert got.properties["owner_specified.openstack.object"] == "images/sdk-img"
    net = conn.network.create_network(name="sdk-net")
    sub = conn.network.create_subnet(
        name="sdk-sub", network_id=net.id, ip_version=4, cidr="10.1.0.0/24"
    )
    router = conn.network.create_router(name="sdk-router")
    conn.network.add_interface_to_router(router, subnet_id=sub.id)
    group = conn.network.create_security_group(name="sdk-web")
    conn.network.create_security_group_rule(
        security_group_id=group.id, direction="ingress", protocol="tcp",
        port_range_min=22, port_range_max=22,
    )  # fmt: skip
    server = conn.compute.create_server(
        name="sdk-1",
        image_id=image.id,
        flavor_id="m1-tiny",
        networks=[{"uuid": net.id}],
        security_groups=[{"name": "sdk-web"}],
    )
    server = conn.compute.wait_for_server(server, status="ACTIVE", wait=120)
    assert server.addresses["sdk-net"][0]["addr"] == "10.1.0.2"
    fip = conn.network.create_ip(floating_network_id="public")
    port = next(conn.network.ports(device_id=server.id))
    conn.network.update_ip(fip, port_id=port.id)
    server = conn.compute.get_server(server.id)
    kinds = [a["OS-EXT-IPS:type"] for a in server.addresses["sdk-net"]]
    assert kinds == ["fixed", "floating"]
    assert conn.get_compute_quotas("other").instances == 10
    conn.compute.delete_server(server)
    conn.compute.wait_for_delete(server, wait=120)
    assert "sdk-1" not in [s.name for s in conn.compute.servers()]
    # Every change above is on the log.
    assert cloud.status()["last_seq"] > before
    # Another tenant's server, network and image are not there for bob's peer.
    alice = openstack.connect(
        auth_url=cloud.auth_url, username="alice", password=PASSWORD, project_name="acme",
        user_domain_name="Default", project_domain_name="Default",
    )  # fmt: skip
    assert alice.network.find_network(net.id) is None
    assert alice.image.find_image(image.id) is None
    conn.close()
    alice.close()
