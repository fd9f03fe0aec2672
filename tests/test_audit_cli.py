"""`stratus audit` and `stratus events tail --follow` against a real `stratus up`."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import threading
import time

import pytest

from .test_cli import CONFIG_HOME, STRATUS, Up, cli, login, wait_projected

pytestmark = pytest.mark.timeout(120)

FOLLOW_WITHIN_S = 5.0


@pytest.fixture
def running(tmp_path):
    CONFIG_HOME["value"] = str(tmp_path / "config")
    u = Up(tmp_path / "data")
    url = u.start()
    try:
        login(url)
        yield url
        rc, _ = u.stop()
        assert rc == 0
    finally:
        u.kill()
        # A killed `up` cannot stop its broker: do it here so nothing leaks.
        for ports in (tmp_path / "data" / "nats").glob("nats-server_*.ports"):
            try:
                os.kill(int(ports.stem.split("_")[1]), signal.SIGKILL)
            except ProcessLookupError:
                pass


def ok(url: str, *args: str) -> object:
    r = cli(url, *args)
    assert r.returncode == 0, (args, r.stderr)
    return json.loads(r.stdout) if "json" in args else r.stdout


def test_audit_answers_who_did_what_through_which_command(running):
    url = running
    ok(url, "tenant", "create", "acme", "-o", "json")
    ok(url, "tenant", "rename", "acme", "acme-eu", "-o", "json")
    r = cli(url, "login", "--user", "admin", "--password", "wrong-password-1")
    assert r.returncode == 4
    wait_projected(url)

    everything = ok(url, "audit", "-o", "json")
    types = [e["type"] for e in everything]
    assert types[-3:] == ["tenant.created", "tenant.renamed", "login.failed"]
    created, renamed, failed = everything[-3:]
    assert (created["actor"], created["aggregate"]["id"], created["result"]) == (
        "admin",
        "acme",
        "ok",
    )
    assert failed["result"] == "bad credentials" and failed["tenant"] == "_system"

    # --command: everything that one command caused, and nothing else
    by_command = ok(url, "audit", "--command", renamed["correlation_id"], "-o", "json")
    assert [e["seq"] for e in by_command] == [renamed["seq"]]
    # the filters, combined
    acme = ok(
        url, "audit", "--tenant", "acme", "--actor", "admin", "--type", "tenant.*", "-o", "json"
    )
    assert [e["seq"] for e in acme] == [created["seq"], renamed["seq"]]
    since = ok(url, "audit", "--resource", "acme", "--since", renamed["at"], "-o", "json")
    assert [e["seq"] for e in since] == [renamed["seq"]]
    until = ok(url, "audit", "--resource", "acme", "--until", created["at"], "-o", "yaml")
    assert f"seq: {created['seq']}" in until and f"seq: {renamed['seq']}" not in until
    paged = ok(url, "audit", "--after", str(created["seq"]), "--limit", "1", "-o", "json")
    assert [e["seq"] for e in paged] == [renamed["seq"]]

    # the table: time, actor, action, resource, command, via (the channel), result
    table = ok(url, "audit", "--type", "login.failed")
    header = next(line for line in table.splitlines() if "action" in line)
    cols = ["time", "actor", "action", "resource", "command", "via", "result"]
    assert [c for c in header.replace("┃", " ").split()] == cols
    assert "bad credentials" in table and "login.failed" in table

    # a time that is not one is a usage error (exit 2)
    r = cli(url, "audit", "--since", "yesterday")
    assert r.returncode == 2 and "ISO-8601" in r.stderr


def test_events_tail_follow_streams_a_new_command_within_seconds(running):
    url = running
    base = wait_projected(url)["last_seq"]
    env = {**os.environ, "XDG_CONFIG_HOME": CONFIG_HOME["value"], "PYTHONUNBUFFERED": "1"}
    env.pop("STRATUS_TOKEN", None)
    tail = subprocess.Popen(
        [*STRATUS, "--url", url, "events", "tail", "--follow", "-o", "json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert tail.stdout is not None
        for line in tail.stdout:
            lines.put(line)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()

    def next_event(deadline: float) -> dict:
        left = deadline - time.monotonic()
        assert left > 0, "no event in time"
        try:
            return json.loads(lines.get(timeout=left))
        except queue.Empty:
            raise AssertionError("the tail printed nothing in time") from None

    try:
        # it first prints the log so far...
        deadline = time.monotonic() + 30
        seen = [next_event(deadline)["seq"] for _ in range(base)]
        assert seen == list(range(1, base + 1))
        # ...then, still running, a command issued now shows up within seconds
        assert tail.poll() is None
        ok(url, "tenant", "create", "live-one", "-o", "json")
        issued = time.monotonic()
        event = next_event(issued + FOLLOW_WITHIN_S)
        assert (event["seq"], event["type"]) == (base + 1, "tenant.created")
        assert event["aggregate"]["id"] == "live-one" and event["actor"] == "admin"
        ok(url, "tenant", "rename", "live-one", "live-two", "-o", "json")
        event = next_event(time.monotonic() + FOLLOW_WITHIN_S)
        assert (event["seq"], event["type"]) == (base + 2, "tenant.renamed")
        assert tail.poll() is None
    finally:
        tail.kill()
        tail.wait(10)
        reader.join(10)
        if tail.stdout:
            tail.stdout.close()
