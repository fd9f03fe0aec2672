"""The client (the CLI's, and any integration's): a request in flight when
the broker dies fails at once as ``unavailable``, not at its timeout."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time

import nats
import pytest

from stratus.cli.client import Client
from stratus.events.errors import Unavailable
from stratus.events.store import EventStore

pytestmark = pytest.mark.timeout(60)

STRATUS = [sys.executable, "-m", "stratus.cli.main"]
# The client's reply timeout in these tests: what a request used to wait
# after the broker died. Failing fast means failing well within it.
TIMEOUT_S = 10.0
FAST_S = 3.0


async def hold_requests(url: str, subject: str) -> tuple[nats.NATS, asyncio.Event]:
    """A responder that takes requests on ``subject`` and never answers;
    the event is set once one has arrived."""
    arrived = asyncio.Event()
    nc = await nats.connect(url, allow_reconnect=False)

    async def take(_msg) -> None:
        arrived.set()

    await nc.subscribe(subject, cb=take)
    await nc.flush()
    return nc, arrived


@pytest.mark.parametrize("connection", ["its own", "a service's"])
async def test_a_request_in_flight_fails_as_unavailable_when_the_broker_dies(
    nats_server, connection
):
    # given a command in flight to a service that has not answered yet
    responder, arrived = await hold_requests(nats_server.url, "cmd.tenant.create")
    if connection == "its own":
        client = await Client.connect(nats_server.url, timeout=TIMEOUT_S)
        store = None
    else:  # a reconnecting connection made elsewhere (a swap in `projections rebuild`)
        store = await EventStore.connect(nats_server.url)
        client = Client(store.nc, timeout=TIMEOUT_S)
    try:
        sent = asyncio.create_task(client.command("tenant.create", {"name": "acme"}))
        await asyncio.wait_for(arrived.wait(), 10)

        # when the broker is killed
        killed = time.monotonic()
        nats_server.kill()

        # then the request fails at once, as unavailable, saying why
        with pytest.raises(Unavailable) as info:
            await asyncio.wait_for(sent, TIMEOUT_S * 2)
        took = time.monotonic() - killed
        assert took < FAST_S, f"failed {took:.1f}s after the broker died"
        assert "dropped" in info.value.message

        # and so does the next one, without waiting either
        t0 = time.monotonic()
        with pytest.raises(Unavailable):
            await client.command("tenant.create", {"name": "acme"})
        assert time.monotonic() - t0 < FAST_S
    finally:
        await client.close()
        if store is not None:
            await store.close()
        await responder.close()


def test_the_cli_exits_3_at_once_when_the_broker_dies_mid_command(nats_server):
    async def scenario() -> tuple[subprocess.CompletedProcess[str], float]:
        responder, arrived = await hold_requests(nats_server.url, "cmd.tenant.create")
        env = {**os.environ, "STRATUS_DATA_DIR": "/nonexistent-stratus"}
        env.pop("STRATUS_TOKEN", None)
        proc = await asyncio.create_subprocess_exec(
            *STRATUS,
            "--url",
            nats_server.url,
            "tenant",
            "create",
            "acme",
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        try:
            await asyncio.wait_for(arrived.wait(), 30)
            killed = time.monotonic()
            nats_server.kill()
            out, err = await asyncio.wait_for(proc.communicate(), 30)
            took = time.monotonic() - killed
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            await responder.close()
        done = subprocess.CompletedProcess(STRATUS, proc.returncode, out.decode(), err.decode())
        return done, took

    done, took = asyncio.run(scenario())
    assert done.returncode == 3, done.stderr
    assert "error: unavailable:" in done.stderr
    assert took < FAST_S, f"the CLI exited {took:.1f}s after the broker died"


async def test_a_command_whose_replica_dies_before_answering_is_sent_again_and_applied_once(
    nats_server, store
):
    """A handler replica killed with a command in flight: nothing tells the
    client, and it used to wait its whole timeout. It sends the command
    again (its id makes that safe) to the replica that lives."""
    from stratus.handlers.service import QUEUE_GROUP, CommandService
    from stratus.handlers.tenants import HANDLERS

    # given a replica that takes the command and dies before answering
    dead = await nats.connect(nats_server.url, allow_reconnect=False)
    arrived = asyncio.Event()

    async def take(_msg) -> None:
        arrived.set()

    await dead.subscribe("cmd.>", queue=QUEUE_GROUP, cb=take)
    await dead.flush()
    client = await Client.connect(nats_server.url, timeout=TIMEOUT_S)
    live = CommandService(store, HANDLERS)
    try:
        t0 = time.monotonic()
        sent = asyncio.create_task(client.command("tenant.create", {"name": "acme"}, "cmd-1"))
        await asyncio.wait_for(arrived.wait(), 10)
        await dead.close()
        # when the other replica runs
        await live.start()
        # then the command is answered within seconds, not after TIMEOUT_S
        reply = await asyncio.wait_for(sent, TIMEOUT_S * 2)
        took = time.monotonic() - t0
        assert reply.ok and reply.seqs and took < FAST_S, f"answered after {took:.1f}s"
        # and applied once: the same id again is the same append
        again = await client.command("tenant.create", {"name": "acme"}, "cmd-1")
        assert again.seqs == reply.seqs
        assert len(await store.read_all(subjects=["ev.acme.>"])) == len(reply.seqs)
    finally:
        await live.stop()
        await client.close()
