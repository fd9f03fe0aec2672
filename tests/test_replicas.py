"""Two replicas of each service, as two machines would run them.

Each "machine" is a data dir of its own with `stratus serve handlers`,
`query`, `projector` (its own SQLite projection, as every query node keeps
one) and `scheduler` processes, against one nats-server. The broker's own
monitoring says which connection received which requests, so "both replicas
served" is read from outside the processes.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from stratus.cli.client import Client
from stratus.cli.creds import local_creds
from stratus.cli.runtime import auth_block, publish_signing_keys
from stratus.events.broker import EmbeddedNats
from stratus.events.commands import Reply
from stratus.events.errors import Conflict
from stratus.events.heartbeat import beat
from stratus.events.ids import new_id
from stratus.events.natscreds import dumps, write_private
from stratus.events.resources import ServerScheduled
from stratus.events.scheduling import HostClaimed
from stratus.events.store import EventStore
from stratus.handlers.catalog import all_handlers
from stratus.handlers.identity import bootstrap_admin
from stratus.handlers.keyring import KeyRing
from stratus.handlers.service import QUEUE_GROUP as COMMANDS_QUEUE
from stratus.handlers.service import CommandService
from stratus.ops.bench.schedkit import host_event, register_hosts
from stratus.projections.db import make_engine, sqlite_url
from stratus.projections.projector import Projector, store_digest
from stratus.projections.query import QUEUE_GROUP as QUERIES_QUEUE
from stratus.projections.rebuild import live_store_path

pytestmark = pytest.mark.timeout(240)

STRATUS = [sys.executable, "-m", "stratus.cli.main"]
PASSWORD = "replica-admin-pass"
SERVICES = ("handlers", "query", "projector", "scheduler")
# The machine holding the keys: it issues every credential and runs the auth callout.
KEYS_MACHINE = "m1"
SERVERS = 40
TENANTS = ("acme", "globex", "initech", "umbrella")
# A create refused as `conflict` is sent again, at most this many times in all.
CREATE_TRIES = 8


@pytest.fixture
def broker(tmp_path) -> Iterator[tuple[str, str]]:
    """A nats-server with its monitoring port and the auth callout's
    configuration (the keys of machine m1, where the cloud is initialised):
    (client URL, monitoring URL)."""
    auth = auth_block(tmp_path / "machines" / KEYS_MACHINE)
    srv = EmbeddedNats(tmp_path / "nats", extra_config=f'http: "127.0.0.1:-1"\n{auth}')
    url = srv.start()
    ports = json.loads(next((tmp_path / "nats").glob("nats-server_*.ports")).read_text())
    yield url, ports["monitoring"][0]
    srv.stop()


class Machines:
    """Service processes, each in its machine's data dir; stopped at the end."""

    def __init__(self, url: str, root: Path) -> None:
        self.url = url
        self.root = root
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, machine: str, service: str, *args: str) -> None:
        """``service`` on ``machine`` with its own credentials file, issued
        where the cloud was initialised (as `stratus credentials issue`)."""
        data = self.root / machine
        name = f"{machine}-{service}"
        creds = self.root / f"{name}.creds"
        write_private(creds, dumps(local_creds(self.root / KEYS_MACHINE, service)))
        with open(self.root / f"{name}.log", "ab") as out:
            self.procs[name] = subprocess.Popen(
                [
                    *STRATUS,
                    "--url",
                    self.url,
                    "serve",
                    service,
                    "--creds",
                    str(creds),
                    "--data-dir",
                    str(data),
                    *args,
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, "STRATUS_DATA_DIR": str(data)},
            )

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text(errors="replace")

    async def ready(self) -> None:
        for name, p in self.procs.items():
            for _ in range(300):  # bounded: 30 s each
                if "ready" in self.log(name):
                    break
                assert p.poll() is None, f"{name} exited: {self.log(name)[-2000:]}"
                await asyncio.sleep(0.1)
            else:
                raise AssertionError(f"{name} did not start: {self.log(name)[-2000:]}")

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.terminate()
        for p in self.procs.values():
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)


@pytest.fixture
def machines(broker, tmp_path) -> Iterator[Machines]:
    m = Machines(broker[0], tmp_path / "machines")
    yield m
    m.stop()


def served_by(monitoring: str, subject: str, queue: str) -> list[int]:
    """Messages each connection's ``subject`` subscription in ``queue``
    received, as the broker counts them."""
    with urllib.request.urlopen(f"{monitoring}/connz?subs=detail&limit=1024", timeout=10) as r:
        connz = json.loads(r.read())
    return [
        sub["msgs"]
        for conn in connz.get("connections") or []
        for sub in conn.get("subscriptions_list_detail") or []
        if sub["subject"] == subject and sub.get("qgroup") == queue
    ]


async def placements(store: EventStore) -> tuple[Counter, Counter]:
    """How many times the log scheduled each server, and claimed a host for it."""
    scheduled: Counter = Counter()
    claimed: Counter = Counter()
    async for batch in store.read(batch=1000):
        for rec in batch:
            event = rec.decode(store.codec)
            if isinstance(event, ServerScheduled):
                scheduled[event.aggregate.id] += 1
            elif isinstance(event, HostClaimed):
                claimed[event.server] += 1
    return scheduled, claimed


async def test_two_replicas_of_each_service_on_two_machines_share_the_work(
    broker, machines, tmp_path
):
    url, monitoring = broker
    root = machines.root
    # given the auth callout (it admits every other connection, this test's too)
    machines.start(KEYS_MACHINE, "auth-callout")
    await machines.ready()
    keys = KeyRing.load_or_create(root / KEYS_MACHINE / "keys")
    store = await EventStore.connect(url, creds=local_creds(root / KEYS_MACHINE, "handlers"))
    try:
        await store.ensure_stream()
        # the signing key handed to both machines' handlers (in their
        # credentials: both issue tokens), its public half on the log, and
        # the first admin
        await publish_signing_keys(store, keys)
        assert await bootstrap_admin(CommandService(store, all_handlers(keys)), PASSWORD)
        await register_hosts(store, [host_event(f"h{i}", vcpus=16) for i in range(4)], alive=False)
        # each host beating, as its agent would (only its credential may)
        for i in range(4):
            agent = local_creds(root / KEYS_MACHINE, "compute-agent", f"h{i}")
            host = await EventStore.connect(url, persistent=False, creds=agent)
            try:
                await beat(host.js, f"h{i}", ttl=600)
            finally:
                await host.close()
        # and on each machine: handlers, query, projector and scheduler
        for i, machine in enumerate(("m1", "m2")):
            for service in SERVICES:
                extra = ("--seed", str(i)) if service == "scheduler" else ()
                machines.start(machine, service, *extra)
        await machines.ready()

        # when a client logs in and sends commands
        anon = await Client.connect(url)
        login = await anon.command("auth.login", {"user": "admin", "password": PASSWORD})
        await anon.close()
        client = await Client.connect(url, login.data["token"], timeout=20)
        try:
            await client.command("image.create-public", {"name": "cirros"})
            unlimited = {"instances": -1, "vcpus": -1, "ram_mb": -1}
            for t in TENANTS:
                await client.command("tenant.create", {"name": t})
                await client.command("quota.set", {"tenant": t, "limits": unlimited})
            sent = 1 + 2 * len(TENANTS)
            conflicts = 0

            async def create(i: int) -> Reply:
                # Creates in one tenant race on its quota by conditional
                # appends, and the two replicas do not wait for each other:
                # a command can be refused as `conflict` ("retry"), having
                # changed nothing. A client retries it, under the same id.
                nonlocal sent, conflicts
                cid = new_id()
                body = {"tenant": TENANTS[i % len(TENANTS)], "name": f"web-{i}",
                        "image": "cirros", "vcpus": 1, "ram_mb": 256}  # fmt: skip
                for _ in range(CREATE_TRIES):
                    sent += 1
                    try:
                        return await client.command("server.create", body, command_id=cid)
                    except Conflict:
                        conflicts += 1
                raise AssertionError(f"web-{i}: conflict {CREATE_TRIES} times")

            replies = await asyncio.gather(*(create(i) for i in range(SERVERS)))
            assert all(r.ok for r in replies)
            ids = {r.data["id"] for r in replies}
            # then every server is placed exactly once (one decision, one claim)
            for _ in range(600):  # bounded: 60 s
                scheduled, claimed = await placements(store)
                if set(scheduled) >= ids:
                    break
                await asyncio.sleep(0.1)
            assert set(scheduled) == ids
            assert set(scheduled.values()) == {1} and claimed == scheduled

            # and each machine's own projection catches up to the same world
            last = await store.last_seq()
            digests = []
            for machine in ("m1", "m2"):
                path = live_store_path(root / machine)
                engine = make_engine(sqlite_url(path), create=False)
                try:
                    for _ in range(300):  # bounded: 30 s
                        seq, found = await store_digest(engine)
                        if seq == last:
                            break
                        await asyncio.sleep(0.1)
                    digests.append((seq, found))
                finally:
                    await engine.dispose()
            fresh = make_engine(sqlite_url(tmp_path / "fresh.db"))
            try:
                await Projector(store, fresh).catch_up(until=last)
                want = await store_digest(fresh)
            finally:
                await fresh.dispose()
            assert digests == [want, want]
            # queries answered by either machine agree with it
            for _ in range(30):
                listed = [s for t in TENANTS for s in await client.query("servers", {"tenant": t})]
                assert {s["id"] for s in listed} == ids and len(listed) == SERVERS
                assert {s["status"] for s in listed} == {"scheduled"}
        finally:
            await client.close()

        # and both replicas of each did some of it, as the broker counts
        commands = served_by(monitoring, "cmd.*.*", COMMANDS_QUEUE)
        queries = served_by(monitoring, "q.>", QUERIES_QUEUE)
        assert len(commands) == 2 and all(n > 0 for n in commands), commands
        # (the login too, and every command the client sent again while
        # unanswered: each request on the wire reached one replica)
        assert sum(commands) == sent + client.resent + 1 + anon.resent
        assert len(queries) == 2 and all(n > 0 for n in queries), queries
    finally:
        await store.close()
    machines.stop()
    # the schedulers' own counts, logged as they stopped: both placed some
    placed = []
    for machine in ("m1", "m2"):
        text = machines.log(f"{machine}-scheduler")
        stops = [line for line in text.splitlines() if "scheduler stopping" in line]
        assert stops, text[-2000:]
        placed.append(int(stops[-1].split("placed=")[1].split()[0]))
    assert sum(placed) == SERVERS
    # (both wait on the work consumer with a pull request; the broker hands
    # the requests, which arrive over a second or so, to both)
    assert all(n > 0 for n in placed), placed
    print(
        f"commands {commands} ({conflicts} conflicts retried), queries {queries},"
        f" placements {placed}"
    )
