"""The metering example (ops/examples/metering.py) against a real stack (issue 8)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import sqlite3
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import msgspec
import pytest

from stratus.cli.integrations import connect_info, wait_usable
from stratus.events import resources as r
from stratus.events.ids import new_id
from stratus.events.model import Cause

from .test_identity import ADMIN_PASSWORD, Stacks, connect

pytestmark = pytest.mark.timeout(180)

EXAMPLE = Path(__file__).resolve().parents[1] / "ops" / "examples" / "metering.py"
T0 = datetime(2026, 1, 1, tzinfo=UTC)


def cause(minutes: float) -> Cause:
    return Cause(
        actor="compute-agent",
        correlation_id=new_id(),
        causation_id=new_id(),
        at=T0 + timedelta(minutes=minutes),
    )


async def seed(store, tenant: str, servers: int) -> dict[str, float]:
    """Server lifecycles with known run times; the expected hours per size."""
    want: dict[str, float] = {}
    for i in range(servers):
        sid = new_id()
        size = ("small", "large")[i % 2]
        start = i * 3.0
        ran = 30.0 + 7 * i  # minutes
        spec = r.ServerSpec(
            name=f"s{i}", image="img", flavor=size, vcpus=1 + i % 2, ram_mb=512, disk_gb=1
        )
        requested = cause(start).make(r.ServerRequested, tenant, "server", sid, spec=spec)
        running = cause(start + 1).make(r.ServerRunning, tenant, "server", sid, host="h1")
        if i == 0:
            # As a Stratus before ServerSpec wrote it (version 1: the spec's
            # fields at the top level), which the log keeps as it was.
            old = msgspec.to_builtins(requested, builtin_types=(datetime,))
            old.update(old.pop("spec"), v=1)
            await store.js.publish(requested.subject, msgspec.msgpack.encode(old))
            await store.append([running])
        else:
            await store.append([requested, running])
        await store.append([cause(start + 1 + ran).make(r.ServerStopped, tenant, "server", sid)])
        await store.append([cause(start + 2 + ran).make(r.ServerDeleted, tenant, "server", sid)])
        want[size] = want.get(size, 0.0) + ran / 60
    return want


def saved(state: Path) -> int:
    """The last sequence a metering run saved in its state file (0: none yet)."""
    try:
        with contextlib.closing(sqlite3.connect(f"file:{state}?mode=ro", uri=True)) as db:
            row = db.execute("select v from meta where k = 'last_seq'").fetchone()
    except sqlite3.OperationalError:
        return 0  # not made yet, or being written
    return int(row[0]) if row else 0


def meter(
    creds: Path, state: Path, *extra: str, timeout: float = 60
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            str(EXAMPLE),
            "--creds",
            str(creds),
            "--state",
            str(state),
            "--idle-exit",
            "1",
            "--json",
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


async def test_killed_and_restarted_metering_counts_the_same_as_an_uninterrupted_run(tmp_path):
    stacks = Stacks(tmp_path)
    try:
        stack = await stacks.start()
        c = await connect(stack)
        token = (await c.login("admin", ADMIN_PASSWORD))["token"]
        for t in ("acme", "other"):
            await c.ok("cmd.tenant.create", {"name": t}, token)
        want = await seed(stack.store, "acme", 24)
        await seed(stack.store, "other", 5)  # never counted: another tenant
        creds = {}
        for name in ("whole", "killed", "crashed"):
            password = secrets.token_urlsafe(32)
            # A short ack wait: what a killed run held comes again soon.
            body = {"tenant": "acme", "name": name, "secret": password, "ack_wait_s": 2}
            created = await c.ok("cmd.integration.create", body, token)
            info = connect_info(stack.url, created, password)
            assert await wait_usable(info) is not None
            creds[name] = tmp_path / f"{name}.json"
            creds[name].write_text(json.dumps(info))
        await c.close()

        whole = await asyncio.to_thread(meter, creds["whole"], tmp_path / "whole.db")
        assert whole.returncode == 0, whole.stderr
        base = json.loads(whole.stdout)
        assert len(base["servers"]) == 24
        assert base["sizes"] == pytest.approx(want)

        # SIGKILL mid-stream (one event a batch, slowed down), then resume.
        state = tmp_path / "killed.db"
        args = [
            sys.executable,
            str(EXAMPLE),
            "--creds",
            str(creds["killed"]),
            "--state",
            str(state),
            "--batch",
            "1",
            "--delay",
            "0.05",
            "--idle-exit",
            "1",
        ]
        proc = await asyncio.create_subprocess_exec(
            *args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            # Killed once it has saved a position: not after a fixed time,
            # which a loaded machine can spend starting Python and connecting
            # (seen: nothing saved after 2 s). One event every 0.05 s leaves
            # most of the stream to go.
            for _ in range(600):
                if saved(state) or proc.returncode is not None:
                    break
                await asyncio.sleep(0.05)
        finally:
            proc.kill()
            await asyncio.wait_for(proc.wait(), 10)
        assert 0 < saved(state) < base["last_seq"], "not killed mid-stream"
        resumed = await asyncio.to_thread(meter, creds["killed"], state)
        assert resumed.returncode == 0, resumed.stderr
        assert json.loads(resumed.stdout)["sizes"] == base["sizes"]
        assert json.loads(resumed.stdout)["servers"] == base["servers"]

        # Dying after saving but before acknowledging: the batch comes again
        # and is not counted twice.
        state = tmp_path / "crashed.db"
        crashed = await asyncio.to_thread(
            meter, creds["crashed"], state, "--batch", "7", "--crash-after", "3"
        )
        assert crashed.returncode == 17
        again = await asyncio.to_thread(meter, creds["crashed"], state, "--batch", "7")
        assert again.returncode == 0, again.stderr
        assert json.loads(again.stdout)["sizes"] == base["sizes"]
        assert json.loads(again.stdout)["servers"] == base["servers"]
    finally:
        await stacks.close()
