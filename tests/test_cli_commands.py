"""The CLI builds each command as its Struct and checks it before sending:
a bad value is refused by the CLI itself, in the words the command service
would have used, and nothing reaches the broker."""

import asyncio
import os
import subprocess
import sys

import pytest

from stratus.cli.client import Client
from stratus.events.errors import Invalid
from stratus.handlers.catalog import all_handlers
from stratus.handlers.service import CommandService

STRATUS = [sys.executable, "-m", "stratus.cli.main"]

# (argv, the verb, the same mistake as a raw body any client could send)
BAD = [
    (["tenant", "create", "Not-Valid"], "tenant.create", {"name": "Not-Valid"}),
    (
        ["server", "create", "web", "--image", "img", "--vcpus", "0", "--ram-mb", "64"],
        "server.create",
        {"name": "web", "image": "img", "vcpus": 0, "ram_mb": 64},
    ),
    (
        ["server", "create", "web", "--image", "img", "--type", "vmm"],
        "server.create",
        {"name": "web", "image": "img", "instance_type": "vmm"},
    ),
    (
        ["security-group", "rule", "add", "sg", "--protocol", "tcpp"],
        "security-group.rule-add",
        {"security_group": "sg", "protocol": "tcpp"},
    ),
    (
        ["security-group", "rule", "add", "sg", "--port", "70000"],
        "security-group.rule-add",
        {"security_group": "sg", "port_min": 70000, "port_max": 70000},
    ),
    (
        ["quota", "set", "acme", "--instances", "-2"],
        "quota.set",
        {"tenant": "acme", "limits": {"instances": -2}},
    ),
    (
        ["subnet", "create", "s", "--network", "n", "--cidr", "10.0.0.0/24 ; x"],
        "subnet.create",
        {"name": "s", "network": "n", "cidr": "10.0.0.0/24 ; x"},
    ),
    (
        ["user", "create", "bob", "--password", "short"],
        "user.create",
        {"name": "bob", "password": "short"},
    ),
    (
        ["role", "assign", "--user", "bob", "--tenant", "acme", "--role", "Super User"],
        "role.assign",
        {"user": "bob", "tenant": "acme", "role": "Super User"},
    ),
    (
        ["webhook", "create", "--url", "https://example.com/h", "--types", "Server.*"],
        "webhook.create",
        {"name": "h", "url": "https://example.com/h", "types": ["Server.*"]},
    ),
    (
        ["server-group", "create", "g", "--policy", "scatter"],
        "server-group.create",
        {"name": "g", "policy": "scatter"},
    ),
    (["volume", "attach", "web 1", "vol"], "volume.attach", {"server": "web 1", "volume": "vol"}),
]


def cli(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STRATUS_")}
    env.update(XDG_CONFIG_HOME="/nonexistent-stratus-config", STRATUS_DATA_DIR="/nonexistent")
    return subprocess.run(
        [*STRATUS, "--url", url, *args], capture_output=True, text=True, timeout=60, env=env
    )


@pytest.mark.parametrize(("argv", "verb", "raw"), BAD, ids=[" ".join(b[0][:3]) for b in BAD])
async def test_a_bad_value_is_refused_before_anything_is_sent(store, nats_server, argv, verb, raw):
    seen: list[str] = []

    async def record(msg) -> None:
        # The server's own advisories (the fixture's stream creation, told
        # asynchronously) are not something the CLI sent.
        if not msg.subject.startswith("$JS.EVENT.ADVISORY."):
            seen.append(msg.subject)

    # Everything anyone publishes on this broker while the CLI runs.
    tap = await store.nc.subscribe(">", cb=record)
    await store.nc.flush()
    r = await asyncio.to_thread(cli, nats_server.url, *argv)
    await store.nc.flush()
    await tap.unsubscribe()
    assert r.returncode == 1, r.stderr
    assert r.stderr.startswith(f"error: invalid: {verb}: "), r.stderr
    assert seen == []

    # The command service refuses the same mistake in the same words.
    svc = CommandService(store, all_handlers())
    await svc.start()
    client = await Client.connect(nats_server.url)
    try:
        with pytest.raises(Invalid) as refused:
            await client.command(verb, raw)
    finally:
        await client.close()
        await svc.stop()
    assert r.stderr.strip() == f"error: invalid: {refused.value.message}"


def test_a_file_is_not_read_for_a_bad_image_name(tmp_path):
    # The file does not exist: had the CLI looked at it first, it would say so.
    argv = ["image", "create", "Bad Name", "--file", str(tmp_path / "none.raw"), "--format", "raw"]
    r = cli("nats://127.0.0.1:1", *argv)
    # Refused as invalid (1), not as unreachable (3): it never got that far.
    assert r.returncode == 1 and r.stderr.startswith("error: invalid: image.create: "), r.stderr
    r = cli("nats://127.0.0.1:1", "image", "create", "good", "--file", str(tmp_path / "none.raw"))
    assert r.returncode == 1 and "none.raw is not a file" in r.stderr, r.stderr


def test_usage_errors_still_exit_2_before_the_struct_is_built():
    r = cli("nats://127.0.0.1:1", "server", "create", "web", "--image", "img", "--vcpus", "x")
    assert r.returncode == 2
    r = cli("nats://127.0.0.1:1", "security-group", "rule", "add", "sg", "--port", "1-2")
    assert r.returncode == 2 and "--port wants N or N:M" in r.stderr
