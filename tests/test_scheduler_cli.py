"""Done when: a server created through the CLI is placed on a host that fits,
``server show`` says why it went there, an impossible request says why
nothing fits, and a replay with another configuration reports the change."""

from __future__ import annotations

import asyncio
import json
import time

from stratus.cli.creds import local_creds
from stratus.events.heartbeat import beat
from stratus.events.store import EventStore

from .test_cli import cli, login, wait_projected
from .test_cli import up as up


def _beat(url: str, data_dir, hosts: list[str]) -> None:
    """What each host's agent does: beat into the heartbeat bucket (with the
    credentials of that host's agent: a key of its own only)."""

    async def main() -> None:
        for h in hosts:
            creds = local_creds(data_dir, "compute-agent", h)
            store = await EventStore.connect(url, creds=creds)
            try:
                await beat(store.js, h, ttl=300)
            finally:
                await store.close()

    asyncio.run(main())


def _show(url: str, name: str, until: str, timeout: float = 15) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = cli(url, "server", "show", name, "-o", "json")
        assert r.returncode == 0, r.stderr
        s = json.loads(r.stdout)
        if s["status"] == until:
            return s
        time.sleep(0.2)
    raise AssertionError(f"server {name} is {s['status']}, not {until}")


def test_cli_server_is_placed_with_reasons_and_impossible_one_says_why(up):
    url = up.start()
    login(url)
    for name, vcpus in (("small", "2"), ("large", "32")):
        r = cli(
            url,
            "host",
            "register",
            name,
            "--vcpus",
            vcpus,
            "--ram-mb",
            "65536",
            "--disk-gb",
            "500",
            "--label",
            "tier=gold" if name == "large" else "tier=iron",
        )
        assert r.returncode == 0, r.stderr
    _beat(url, up.data_dir, ["small", "large"])
    r = cli(url, "image", "create", "cirros", "--public")
    assert r.returncode == 0, r.stderr

    r = cli(
        url,
        "server",
        "create",
        "web",
        "--image",
        "cirros",
        "--vcpus",
        "12",
        "--ram-mb",
        "2048",
        "-o",
        "json",
    )
    assert r.returncode == 0, r.stderr
    web = _show(url, "web", "scheduled")
    assert web["host"] == "large"  # 12 vCPUs > 2 x 4.0 on small
    why = web["scheduling"]
    assert why["removed"] == {"insufficient vCPU": 1}
    assert why["hosts"] == 2 and why["top"][0]["host"] == "large"
    r = cli(url, "server", "show", "web")  # the table a person reads says it too
    assert "insufficient vCPU" in r.stdout and "large" in r.stdout
    wait_projected(url)
    r = cli(url, "host", "show", "large", "-o", "json")
    assert r.returncode == 0, r.stderr
    large = json.loads(r.stdout)
    assert (large["servers"], large["used_vcpus"], large["used_ram_mb"]) == (1, 12, 2048)

    r = cli(url, "why", web["id"], "-o", "json")
    assert r.returncode == 0, r.stderr
    chain = {row["type"]: row for row in json.loads(r.stdout)}
    assert chain["server.requested"]["depth"] == 0
    assert chain["server.scheduled"]["depth"] == 1  # caused by the request
    assert chain["server.scheduled"]["why"] == "on large: 1/2 hosts passed (1 insufficient vCPU)"
    assert chain["host.claimed"]["aggregate"] == {"kind": "host", "id": "large"}
    assert chain["host.claimed"]["why"] == f"12 vCPU, 2048 MB for {web['id']}"
    r = cli(url, "why", web["id"])  # the table a person reads
    assert "  server.scheduled" in r.stdout and "insufficient vCPU" in r.stdout
    r = cli(url, "why", "01a00000-0000-7000-8000-000000000000")
    assert r.returncode == 1 and "not_found" in r.stderr

    r = cli(
        url,
        "server",
        "create",
        "huge",
        "--image",
        "cirros",
        "--vcpus",
        "4",
        "--ram-mb",
        "1024",
        "--label",
        "tier=platinum",
    )
    assert r.returncode == 0, r.stderr
    huge = _show(url, "huge", "error")
    # --wait follows it until it settles; a server that fails exits 1 with why.
    r = cli(
        url,
        "server",
        "create",
        "huge-2",
        "--image",
        "cirros",
        "--vcpus",
        "1",
        "--ram-mb",
        "64",
        "--label",
        "tier=platinum",
        "--wait",
        "--wait-timeout",
        "20",
        "-o",
        "json",
    )
    assert r.returncode == 1 and r.stdout, r.stderr
    assert json.loads(r.stdout)["status"] == "error"
    assert "No valid host: 0/2 hosts: 2 label tier=platinum not matched" in r.stderr
    assert huge["reason"] == "No valid host: 0/2 hosts: 2 label tier=platinum not matched"

    # What-if: the same history, stacking instead of spreading.
    status = wait_projected(url)
    assert status["hosts"] == {"registered": 2, "enabled": 2, "alive": 2}
    assert status["services"]["scheduler"]["backlog"] == 0
    cfg = up.data_dir.parent / "stack.toml"
    cfg.write_text("host_subset_size = 1\n[weighers]\nLeastRequested = -1.0\n")
    r = cli(
        url,
        "scheduler",
        "replay",
        "--from",
        "1",
        "--config",
        str(cfg),
        "--data-dir",
        str(up.data_dir),
        "-o",
        "json",
    )
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["decisions"] == 3 and report["unknown"] == 0
    assert report["config"]["weighers"] == {"LeastRequested": -1.0}
    r = cli(url, "scheduler", "replay", "--from", "999999", "--data-dir", str(up.data_dir))
    assert r.returncode == 1 and "past the end of the log" in r.stderr
