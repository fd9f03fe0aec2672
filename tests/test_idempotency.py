"""A retried command within the broker's duplicate window gets its original
answer, through the real command path: `stratus serve handlers` processes
behind a real nats-server, reached by the client the CLI uses."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from stratus.cli.client import Client
from stratus.events.commands import Reply
from stratus.events.errors import AlreadyExists
from stratus.events.ids import new_id
from stratus.events.store import EventStore

pytestmark = pytest.mark.timeout(180)

STRATUS = [sys.executable, "-m", "stratus.cli.main"]


@contextlib.contextmanager
def serve_handlers(
    url: str, n: int, data_dir: str, *, crash: bool = False
) -> Iterator[list[subprocess.Popen]]:
    """``n`` `stratus serve handlers` processes sharing the queue group,
    each ready when yielded; stopped on the way out (``crash``: killed)."""
    procs: list[subprocess.Popen] = []
    env = {**os.environ, "STRATUS_DATA_DIR": data_dir}
    try:
        for _ in range(n):
            p = subprocess.Popen(
                [*STRATUS, "--url", url, "serve", "handlers", "--insecure-no-auth"],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
                env=env,
            )
            procs.append(p)
        for p in procs:
            deadline = time.monotonic() + 30
            assert p.stdout is not None
            line = ""
            while "ready" not in line:
                assert time.monotonic() < deadline, "handler did not start"
                line = p.stdout.readline()
                assert line, f"handler exited with {p.poll()}"
        yield procs
    finally:
        for p in procs:
            if crash:
                p.kill()
            else:
                p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
            if p.stdout:
                p.stdout.close()


async def setup_tenant(c: Client) -> None:
    """Tenant acme without limits, and a floating IP pool (public)."""
    await c.command("tenant.create", {"name": "acme"})
    await c.command("quota.set", {"tenant": "acme", "limits": {"networks": -1, "floating_ips": -1}})
    await c.command("network.create-external", {"name": "public", "cidr": "203.0.113.0/24"})


async def first_tries(c: Client) -> dict[str, tuple[dict, Reply]]:
    """One command of one event and one of two subjects (a floating IP is
    drawn from the shared pool in the same batch): id -> (command, reply)."""
    sent = {}
    for verb, body in (
        ("network.create", {"tenant": "acme", "name": "lan"}),
        ("floating-ip.create", {"tenant": "acme", "network": "public"}),
    ):
        cid = new_id()
        sent[cid] = ((verb, body), await c.command(verb, body, cid))
    return sent


async def assert_retries_answer_as_first(c: Client, sent: dict, url: str) -> None:
    before = await last_seq(url)
    for cid, ((verb, body), first) in sent.items():
        again = await c.command(verb, body, cid)
        assert first.duplicate is False
        assert again.ok and again.duplicate, f"{verb}: {again}"
        assert again.seqs == first.seqs, f"{verb}: {again.seqs} != {first.seqs}"
        assert again.data == first.data
    assert await last_seq(url) == before, "a retry appended something"
    _, (_, fip) = list(sent.items())[1]
    assert len(fip.seqs) == 2, "a floating IP lands on the tenant and on the pool"


async def last_seq(url: str) -> int:
    store = await EventStore.connect(url)
    try:
        return await store.last_seq()
    finally:
        await store.close()


async def test_a_retry_after_300_other_commands_gets_the_original_answer(nats_server, tmp_path):
    with serve_handlers(nats_server.url, 2, str(tmp_path / "nodata")):
        c = await Client.connect(nats_server.url)
        try:
            # given a network and a floating IP created by commands whose replies were lost
            await setup_tenant(c)
            sent = await first_tries(c)

            # and 300 other commands on the same tenant since
            for i in range(300):
                await c.command("network.create", {"tenant": "acme", "name": f"n-{i}"})

            # when each command is sent again with its id, then it is answered
            # as the first time: every seq, the same data, nothing appended
            await assert_retries_answer_as_first(c, sent, nats_server.url)

            # and a retry of a command that was refused is decided again (and
            # refused again: a refused command left nothing to recognise)
            cid = new_id()
            for _ in range(2):
                with pytest.raises(AlreadyExists):
                    await c.command("network.create", {"tenant": "acme", "name": "lan"}, cid)
        finally:
            await c.close()


async def test_a_retry_after_every_process_restarted_gets_the_original_answer(
    nats_server, tmp_path
):
    data = str(tmp_path / "nodata")
    # given commands answered by handlers that then crash, with the broker
    with serve_handlers(nats_server.url, 2, data, crash=True):
        c = await Client.connect(nats_server.url)
        try:
            await setup_tenant(c)
            sent = await first_tries(c)
        finally:
            await c.close()
    nats_server.kill()

    # when everything starts again (on the same broker store) and the
    # client, which never saw its replies, sends the commands again
    url = nats_server.start()
    with serve_handlers(url, 2, data):
        c = await Client.connect(url)
        try:
            # then each gets the original answer and nothing is appended
            await assert_retries_answer_as_first(c, sent, url)
        finally:
            await c.close()
