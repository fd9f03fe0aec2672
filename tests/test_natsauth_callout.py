"""The broker itself enforces who a connection is (issue 14, item 3).

Each test attacks a real ``stratus up`` stack (its nats-server, its auth
callout) from the outside, as a client or as a service holding credentials
of one kind, and asserts the server refuses: a permissions violation on the
wire, nothing seen, nothing appended.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import io
import json
import time
from dataclasses import dataclass

import nats
import nats.errors
import pytest

from stratus.cli.client import Client
from stratus.cli.runtime import Stack
from stratus.events.blobs import BlobStore, upload_bucket
from stratus.events.errors import Unauthenticated
from stratus.events.natscreds import connect_options, reader_names
from stratus.events.reports import REPORT_SUBJECT
from stratus.handlers.credentials import mint
from stratus.handlers.keyring import SERVICE_TTL_S

ADMIN_PASSWORD = "callout-admin-pw-1"


@pytest.fixture
async def stack(tmp_path):
    s = Stack(tmp_path / "data", port=0, admin_password=ADMIN_PASSWORD, scheduler_replicas=0)
    await s.start()
    yield s
    await s.stop()


async def login(url: str) -> dict:
    anon = await Client.connect(url)
    try:
        reply = await anon.command("auth.login", {"user": "admin", "password": ADMIN_PASSWORD})
        return reply.data
    finally:
        await anon.close()


class Errors:
    """A connection's asynchronous errors (the server's -ERR lines), waited on."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        self.changed = asyncio.Event()

    async def on_error(self, exc: Exception) -> None:
        self.seen.append(str(exc).lower())
        self.changed.set()

    async def wait_for(self, text: str, timeout: float = 5.0, since: int = 0) -> str:
        """The first error from ``since`` on that contains ``text``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            hit = [e for e in self.seen[since:] if text in e]
            if hit:
                return hit[0]
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), deadline - time.monotonic())
        raise AssertionError(f"no error with {text!r} within {timeout}s: {self.seen}")


async def routed_network(stack: Stack, name: str, cidr: str) -> str:
    """A routed network made by the admin, as ``network create --mode
    routed`` makes one; its id."""
    admin = await Client.connect(stack.url, token=(await login(stack.url))["token"])
    try:
        await admin.command(
            "network.create-routed", {"name": name, "cidr": cidr, "block_prefix": 26}
        )
    finally:
        await admin.close()
    net = (await stack.store.read_all(subjects=["ev._system.network.>"]))[-1]
    return net.decode().aggregate.id


async def network_agent(stack: Stack, host: str):
    """A network agent of ``host`` on its own credentials: its connection,
    its relay reporter, and a cause in its name."""
    from stratus.events.ids import new_id
    from stratus.events.model import Cause
    from stratus.events.reports import Reporter

    creds, _ = mint(stack.keyring, "network-agent", host, SERVICE_TTL_S)
    nc = await nats.connect(stack.url, allow_reconnect=False, **creds.connect_options())
    return nc, Reporter(nc, host), Cause(f"network-agent:{host}", new_id(), new_id())


async def raw(url: str, errors: Errors, **opts) -> nats.NATS:
    return await nats.connect(url, error_cb=errors.on_error, allow_reconnect=False, **opts)


# -- clients: one inbox per connection ------------------------------------------


async def test_a_client_cannot_subscribe_to_another_clients_inbox(stack):
    token = (await login(stack.url))["token"]
    victim_opts = connect_options(token)
    victim = await nats.connect(stack.url, allow_reconnect=False, **victim_opts)
    errors = Errors()
    # the attacker holds a good token of its own, even the same one
    attacker = await raw(stack.url, errors, **connect_options(token))
    seen: list[bytes] = []

    async def sniff(msg) -> None:
        seen.append(msg.data)

    try:
        await attacker.subscribe(f"{victim_opts['inbox_prefix']}.>", cb=sniff)
        await attacker.flush()
        await errors.wait_for(
            f'permissions violation for subscription to "{victim_opts["inbox_prefix"].lower()}'
        )
        # and it also cannot subscribe to every inbox at once
        await attacker.subscribe("_INBOX.>", cb=sniff)
        await errors.wait_for('permissions violation for subscription to "_inbox.>"')
        # the victim's own requests work and carry its token back and forth
        msg = await victim.request(
            "q.status",
            b"{}",
            timeout=5,
            headers={"Authorization": f"Bearer {token}"},
        )
        assert json.loads(msg.data)["ok"] is True
        again = await victim.request(
            "cmd.auth.login",
            json.dumps({"user": "admin", "password": ADMIN_PASSWORD}).encode(),
            timeout=5,
        )
        assert json.loads(again.data)["data"]["token"]
        await asyncio.sleep(0.2)
    finally:
        await victim.close()
        await attacker.close()
    assert seen == []


async def test_a_client_without_an_nkey_of_its_own_is_refused(stack):
    # a good token but no nkey signing the nonce (so no private inbox): the
    # callout turns the connection down
    errors = Errors()
    with pytest.raises(Exception) as info:
        await raw(stack.url, errors, token=(await login(stack.url))["token"])
    assert "authorization violation" in str(info.value).lower() or any(
        "authorization violation" in e for e in errors.seen
    )


# -- revocation ---------------------------------------------------------------------


async def test_a_revoked_token_cannot_connect_and_its_open_connection_is_cut(stack):
    d = await login(stack.url)
    cut = asyncio.Event()

    async def on_disconnect() -> None:
        cut.set()

    victim = await nats.connect(
        stack.url,
        allow_reconnect=False,
        disconnected_cb=on_disconnect,
        **connect_options(d["token"]),
    )
    other = await Client.connect(stack.url, (await login(stack.url))["token"])
    try:
        auth = {"Authorization": f"Bearer {d['token']}"}
        msg = await victim.request("q.status", b"{}", timeout=5, headers=auth)
        assert json.loads(msg.data)["ok"] is True
        t0 = time.monotonic()
        await other.command("token.revoke", {"token_id": d["token_id"]})
        # the server cuts the open connection (the callout kicks it)
        await asyncio.wait_for(cut.wait(), 10)
        cut_after = time.monotonic() - t0
        assert cut_after < 5, cut_after
        assert not victim.is_connected
        # and it cannot connect again
        with pytest.raises(Unauthenticated):
            await Client.connect(stack.url, d["token"])
        # while the other token's connection stays
        assert other.nc.is_connected
        assert (await other.query("status", {})) is not None
        assert stack.callout is not None and stack.callout.kicked >= 1
    finally:
        for c in (victim, other):
            with contextlib.suppress(Exception):
                await c.close()


# -- services: each credential kind only what it needs -------------------------------


@dataclass(frozen=True)
class Attempt:
    """One forbidden action: a publish (``subject``) or a subscription (``sub``)."""

    what: str
    subject: str = ""
    sub: str = ""


def forbidden_for_agents(host: str, other: str) -> list[Attempt]:
    return [
        Attempt("append a tenant event", "ev.ta.tenant.ta"),
        Attempt("append a quota event", "ev.ta.quota.ta"),
        Attempt("append a user event", "ev._system.user.admin"),
        Attempt("append on a server's subject", "ev.ta.server.s1"),
        Attempt("append on another host's subject", f"ev._system.host.{other}"),
        Attempt("delete the stream", "$JS.API.STREAM.DELETE.EVENTS"),
        Attempt("purge the stream", "$JS.API.STREAM.PURGE.EVENTS"),
        Attempt("read another host's consumer", f"$JS.API.CONSUMER.INFO.EVENTS.compute-{other}"),
        Attempt(
            "fetch from another host's consumer",
            f"$JS.API.CONSUMER.MSG.NEXT.EVENTS.compute-{other}",
        ),
        Attempt(
            "read through another host's reader",
            f"$JS.API.CONSUMER.CREATE.EVENTS.{reader_names('compute-agent', other)[0]}",
        ),
        Attempt("write another host's heartbeat", f"$KV.stratus-heartbeats.{other}"),
        Attempt("report for another host", REPORT_SUBJECT.format(host=other)),
        Attempt("send commands", "cmd.tenant.create"),
        Attempt("read another host's exec requests", sub=f"agent.{other}.exec"),
        Attempt("read the commands", sub="cmd.>"),
        Attempt("read every inbox", sub="_INBOX.>"),
    ]


# The meta subject of an image's object (``sha256/<hex>``, base64url as
# nats-py names it).
IMAGE_META = base64.urlsafe_b64encode(b"sha256/" + b"ab" * 32).decode()

COMMON = [
    Attempt("delete the stream", "$JS.API.STREAM.DELETE.EVENTS"),
    Attempt("purge the stream", "$JS.API.STREAM.PURGE.EVENTS"),
    Attempt("read every inbox", sub="_INBOX.>"),
]

# kind -> (host, forbidden actions)
TABLE: dict[str, tuple[str, list[Attempt]]] = {
    "compute-agent": (
        "hc-1",
        [
            *forbidden_for_agents("hc-1", "hc-2"),
            # the image bucket: read only (snapshots go to its own bucket)
            Attempt("overwrite or delete a user's image (its meta)", f"$O.images.M.{IMAGE_META}"),
            Attempt("add chunks to a user's image", "$O.images.C.SOMEOBJECTNUID"),
            Attempt("purge the image bucket", "$JS.API.STREAM.PURGE.OBJ_images"),
            Attempt("delete the image bucket", "$JS.API.STREAM.DELETE.OBJ_images"),
            Attempt("write another host's uploads", "$O.uploads-hc-2.M.eA"),
            Attempt("purge another host's uploads", "$JS.API.STREAM.PURGE.OBJ_uploads-hc-2"),
        ],
    ),
    "network-agent": (
        "hn-1",
        [
            *forbidden_for_agents("hn-1", "hn-2"),
            Attempt("append on its host's compute subject", "ev._system.host.hn-1"),
            # a routed network's blocks: only through the relay (below)
            Attempt("claim a block for itself directly", "ev._system.network.rn1"),
            Attempt(
                "hand out another host's block's addresses",
                "ev._system.ipblock.rn1-10-90-0-0-26",
            ),
            Attempt("append a tenant's network event", "ev.ta.network.n1"),
            Attempt("append a tenant's port event", "ev.ta.port.p1"),
        ],
    ),
    "scheduler": (
        "",
        [
            *COMMON,
            Attempt("append a tenant event", "ev.ta.tenant.ta"),
            Attempt("append a quota event", "ev.ta.quota.ta"),
            Attempt("append a user event", "ev._system.user.admin"),
            Attempt("answer commands", sub="cmd.>"),
        ],
    ),
    "allocator": (
        "",
        [
            *COMMON,
            Attempt("append a tenant event", "ev.ta.tenant.ta"),
            Attempt("append a quota event", "ev.ta.quota.ta"),
            Attempt("append a user event", "ev._system.user.admin"),
            Attempt("append a network event", "ev.ta.network.n1"),
            Attempt("answer commands", sub="cmd.>"),
            Attempt("beat for a host", "$KV.stratus-heartbeats.h1"),
            Attempt("take the projector lease", "$KV.stratus-leases.projector.main"),
        ],
    ),
    "projector": (
        "",
        [
            *COMMON,
            Attempt("append anything", "ev.ta.tenant.ta"),
            Attempt("answer queries", sub="q.>"),
            Attempt("write another lease", "$KV.stratus-leases.other.main"),
            Attempt("delete the lease bucket", "$JS.API.STREAM.DELETE.KV_stratus-leases"),
        ],
    ),
    "query": (
        "",
        [
            *COMMON,
            Attempt("append anything", "ev.ta.tenant.ta"),
            Attempt("answer commands", sub="cmd.>"),
            Attempt("take the projector lease", "$KV.stratus-leases.projector.main"),
        ],
    ),
    "webhooks": (
        "",
        [
            *COMMON,
            Attempt("append anything", "ev.ta.tenant.ta"),
            Attempt("answer commands", sub="cmd.>"),
        ],
    ),
    "console": (
        "",
        [
            *COMMON,
            Attempt("append anything", "ev.ta.tenant.ta"),
            Attempt("create a consumer", "$JS.API.CONSUMER.CREATE.EVENTS"),
            Attempt("answer commands", sub="cmd.>"),
        ],
    ),
    "openstack-api": (
        "",
        [
            *COMMON,
            Attempt("append anything", "ev.ta.tenant.ta"),
            Attempt("create a consumer", "$JS.API.CONSUMER.CREATE.EVENTS"),
            Attempt("answer commands", sub="cmd.>"),
            Attempt("write a framework's beat", "$KV.stratus-framework-beats.f1"),
        ],
    ),
    "handlers": (
        "",
        [
            Attempt("read every inbox", sub="_INBOX.>"),
            Attempt("delete the stream", "$JS.API.STREAM.DELETE.EVENTS"),
            Attempt("take the projector lease", "$KV.stratus-leases.projector.main"),
        ],
    ),
}


@pytest.mark.parametrize("kind", sorted(TABLE))
async def test_each_credential_kind_is_refused_what_it_may_not_do(stack, kind):
    host, attempts = TABLE[kind]
    assert stack.keyring is not None
    creds, _ = mint(stack.keyring, kind, host, SERVICE_TTL_S)
    before = await stack.store.last_seq()
    info = await stack.store.js.stream_info("EVENTS")
    errors = Errors()
    nc = await raw(stack.url, errors, **creds.connect_options())
    try:
        for a in attempts:
            n = len(errors.seen)
            if a.sub:
                await nc.subscribe(a.sub)
                await nc.flush()
                expected = f'permissions violation for subscription to "{a.sub.lower()}"'
            else:
                # a request, as the JetStream API and the services are asked
                with contextlib.suppress(nats.errors.Error, TimeoutError):
                    await nc.request(a.subject, b"{}", timeout=0.3)
                expected = f'permissions violation for publish to "{a.subject.lower()}"'
            # this attempt's own refusal (AssertionError naming it if none)
            await errors.wait_for(expected, since=n)
        assert nc.is_connected
    finally:
        await nc.close()
    assert await stack.store.last_seq() == before, f"{kind}: something was appended"
    after = await stack.store.js.stream_info("EVENTS")
    assert after.state.first_seq == info.state.first_seq


async def test_the_projector_and_the_allocator_credentials_do_what_they_are_for(stack):
    # the allowed side for the kinds the lease and the frameworks added
    from stratus.events.lease import Lease

    assert stack.keyring is not None
    creds, _ = mint(stack.keyring, "projector", "", SERVICE_TTL_S)
    errors = Errors()
    nc = await raw(stack.url, errors, **creds.connect_options())
    try:
        # the projector makes the lease bucket and takes the lease
        lease = Lease(nc.jetstream(), "projector.test", holder="p-1", ttl=5)
        assert await lease.try_acquire()
        await lease.release()
    finally:
        await nc.close()
    assert errors.seen == []
    creds, _ = mint(stack.keyring, "allocator", "", SERVICE_TTL_S)
    nc = await raw(stack.url, errors, **creds.connect_options())
    try:
        js = nc.jetstream()
        # it watches hosts' and frameworks' beats
        for bucket in ("stratus-heartbeats", "stratus-framework-beats"):
            await js.stream_info(f"KV_{bucket}")
    finally:
        await nc.close()
    assert errors.seen == []


async def test_a_host_agents_credential_works_for_its_own_host(stack):
    # the allowed side of the table: the same actions on its own names pass
    assert stack.keyring is not None
    creds, _ = mint(stack.keyring, "compute-agent", "hc-1", SERVICE_TTL_S)
    errors = Errors()
    nc = await raw(stack.url, errors, **creds.connect_options())
    try:
        js = nc.jetstream()
        ack = await js.publish("$KV.stratus-heartbeats.hc-1", b'{"host": "hc-1"}', timeout=5)
        assert ack.seq > 0
        await nc.subscribe("agent.hc-1.exec")
        await nc.flush()
        # its own upload bucket: made, written, read back, emptied
        uploads = await BlobStore.open(js, bucket=upload_bucket("hc-1"))
        data = b"snapshot bytes of hc-1"
        digest = hashlib.sha256(data).hexdigest()
        await uploads.put(digest, io.BytesIO(data))
        out = io.BytesIO()
        await uploads.get(digest, out)
        assert out.getvalue() == data
        assert await uploads.delete(digest)
        # and it reads the image bucket (as its cache does)
        await BlobStore.open(js)
        await asyncio.sleep(0.2)
    finally:
        await nc.close()
    assert errors.seen == []


async def test_a_network_agent_reports_only_its_own_hosts_blocks(stack):
    """The relay's side of the address blocks: hn-2 claims a block of a
    routed network; hn-1 (its own credentials) cannot hand out that block's
    addresses, give it back, claim it, or claim one in hn-2's name; each
    is refused and nothing is appended. A tenant's network event is not a
    report at all."""
    from stratus.events import network as nw
    from stratus.events.errors import Forbidden
    from stratus.events.store import Condition

    network = await routed_network(stack, "rn1", "10.90.0.0/16")
    store = stack.store
    subject = f"ev._system.network.{network}"
    nc2, r2, c2 = await network_agent(stack, "hn-2")
    nc1, r1, c1 = await network_agent(stack, "hn-1")
    try:
        block = "10.90.0.0/26"
        claim = c2.make(nw.BlockClaimed, "_system", "network", network, block=block, host="hn-2")
        last = await store.last_seq(subject)
        assert (await r2.append([claim], Condition(subject, last))).seqs
        before = await store.last_seq()
        bsub = nw.block_subject(network, block)
        holder = nw.Holder("ta", "p1")
        attempts = [
            (
                c1.make(
                    nw.BlockAddresses,
                    "_system",
                    "ipblock",
                    bsub.rsplit(".", 1)[-1],
                    network=network,
                    block=block,
                    allocated={"10.90.0.5": holder},
                ),
                Condition(bsub, 0),
            ),
            (
                c1.make(nw.BlockReleased, "_system", "network", network, block=block, host="hn-1"),
                Condition(subject, before),
            ),
            (
                c1.make(nw.BlockClaimed, "_system", "network", network, block=block, host="hn-1"),
                Condition(subject, before),
            ),
            (
                c1.make(
                    nw.BlockClaimed,
                    "_system",
                    "network",
                    network,
                    block="10.90.0.64/26",
                    host="hn-2",
                ),
                Condition(subject, before),
            ),
            # a tenant's network event, even conditioned on its own subject
            (
                c1.make(nw.BlockClaimed, "ta", "network", "n1", block=block, host="hn-1"),
                Condition("ev.ta.network.n1", 0),
            ),
        ]
        for ev, cond in attempts:
            with pytest.raises(Forbidden):
                await r1.append([ev], cond)
        # without a condition, hn-1's claim of a free block is refused too
        free = c1.make(
            nw.BlockClaimed, "_system", "network", network, block="10.90.0.128/26", host="hn-1"
        )
        with pytest.raises(Forbidden):
            await r1.append([free])
        assert await store.last_seq() == before
        # and the same claim, conditioned, is hn-1's to make
        assert (await r1.append([free], Condition(subject, before))).seqs
    finally:
        await nc1.close()
        await nc2.close()


async def test_a_network_agent_addresses_only_its_own_routed_ports_from_its_own_blocks(stack):
    """``port.address-assigned`` through the relay: hn-1 may give a port of
    its own server an address of a block it holds, and nothing else: not
    an address of hn-2's block or of no block, not a port of a tenant
    network (the handlers give those; re-addressing one would take
    another port's traffic), and its block ledger holds only addresses
    inside the block. Each refusal appends nothing."""
    from stratus.events import network as nw
    from stratus.events.errors import Forbidden
    from stratus.events.ids import new_id
    from stratus.events.model import Cause
    from stratus.events.resources import PortAddressAssigned, PortCreated, ServerScheduled
    from stratus.events.store import Condition

    network = await routed_network(stack, "rn2", "10.91.0.0/16")
    store = stack.store
    network = (await store.read_all(subjects=["ev._system.network.>"]))[-1].decode().aggregate.id
    subject = f"ev._system.network.{network}"
    boss = Cause("handlers", new_id(), new_id())
    await store.append([boss.make(ServerScheduled, "ta", "server", "s-9", host="hn-1")])
    for port, net in (("p-routed", network), ("p-tenant", "n1")):
        await store.append(
            [
                boss.make(
                    PortCreated, "ta", "port", port, name=port, network=net, subnet="",
                    mac="02:00:00:00:00:09", ip="", device="s-9", device_owner="compute",
                )
            ]
        )  # fmt: skip

    nc1, r1, c1 = await network_agent(stack, "hn-1")
    nc2, r2, c2 = await network_agent(stack, "hn-2")
    try:
        theirs, mine = "10.91.0.0/26", "10.91.0.64/26"
        for reporter, cause, block, host in ((r2, c2, theirs, "hn-2"), (r1, c1, mine, "hn-1")):
            claim = cause.make(
                nw.BlockClaimed, "_system", "network", network, block=block, host=host
            )
            assert (
                await reporter.append([claim], Condition(subject, await store.last_seq(subject)))
            ).seqs

        def assign(port: str, ip: str) -> PortAddressAssigned:
            return c1.make(PortAddressAssigned, "ta", "port", port, host="hn-1", ip=ip)

        bsub = nw.block_subject(network, mine)
        outside = c1.make(
            nw.BlockAddresses, "_system", "ipblock", bsub.rsplit(".", 1)[-1], network=network,
            block=mine, allocated={"10.91.0.5": nw.Holder("ta", "p-routed")},
        )  # fmt: skip
        before = await store.last_seq()
        for ev, cond in (
            (assign("p-routed", "10.91.0.5"), None),  # hn-2's block
            (assign("p-routed", "10.92.0.5"), None),  # no block at all
            (assign("p-routed", "not-an-ip"), None),
            (assign("p-tenant", "10.91.0.70"), None),  # a tenant network's port
            (outside, Condition(bsub, 0)),
        ):
            with pytest.raises(Forbidden):
                await r1.append([ev], cond)
        assert await store.last_seq() == before
        assert (await r1.append([assign("p-routed", "10.91.0.70")])).seqs
    finally:
        await nc1.close()
        await nc2.close()


async def test_a_snapshot_is_recorded_only_with_bytes_its_host_uploaded(stack):
    """A compute agent reports a snapshot of a server placed on it: without
    the bytes in its own upload bucket the relay refuses and nothing is
    appended; another host's uploads do not count; with its own, the relay
    copies them into the image bucket and records the image."""
    from stratus.events.errors import Forbidden
    from stratus.events.ids import new_id
    from stratus.events.model import Cause
    from stratus.events.reports import Reporter
    from stratus.events.resources import ImageCreated, ServerScheduled
    from stratus.events.store import Condition

    admin = Cause("scheduler", new_id(), new_id())
    await stack.store.append([admin.make(ServerScheduled, "ta", "server", "s-1", host="hc-1")])

    async def agent(host: str):
        creds, _ = mint(stack.keyring, "compute-agent", host, SERVICE_TTL_S)
        return await nats.connect(stack.url, allow_reconnect=False, **creds.connect_options())

    nc1, nc2 = await agent("hc-1"), await agent("hc-2")
    try:
        data = b"the disk of s-1 at a moment"
        digest = hashlib.sha256(data).hexdigest()
        snap = Cause("compute-agent:hc-1", new_id(), new_id()).make(
            ImageCreated, "ta", "image", "img-1", name="snap", format="raw",
            size_bytes=len(data), checksum=digest,
        )  # fmt: skip
        cond = Condition(snap.subject, 0)
        reporter = Reporter(nc1, "hc-1")
        before = await stack.store.last_seq()
        with pytest.raises(Forbidden):  # no bytes anywhere
            await reporter.append([snap], cond, server="s-1")
        # hc-2 uploads them into its own bucket: still not hc-1's
        other = await BlobStore.open(nc2.jetstream(), bucket=upload_bucket("hc-2"))
        await other.put(digest, io.BytesIO(data))
        with pytest.raises(Forbidden):
            await reporter.append([snap], cond, server="s-1")
        assert await stack.store.last_seq() == before
        images = await BlobStore.open(stack.store.js)
        assert await images.exists(digest) is None
        # hc-1's own upload: copied, checked, recorded
        mine = await BlobStore.open(nc1.jetstream(), bucket=upload_bucket("hc-1"))
        await mine.put(digest, io.BytesIO(data))
        assert (await reporter.append([snap], cond, server="s-1")).seqs
        out = io.BytesIO()
        await images.get(digest, out)
        assert out.getvalue() == data
        # another tenant's private image is in the image bucket: naming its
        # digest without its bytes does not make it this tenant's image
        secret = b"tenant tb's private disk"
        secret_digest = hashlib.sha256(secret).hexdigest()
        await images.put(secret_digest, io.BytesIO(secret))
        steal = Cause("compute-agent:hc-1", new_id(), new_id()).make(
            ImageCreated, "ta", "image", "img-2", name="stolen", format="raw",
            size_bytes=len(secret), checksum=secret_digest,
        )  # fmt: skip
        before = await stack.store.last_seq()
        with pytest.raises(Forbidden):
            await reporter.append([steal], Condition(steal.subject, 0), server="s-1")
        assert await stack.store.last_seq() == before
        # with the bytes in its own bucket (it has them, whole), it may
        await mine.put(secret_digest, io.BytesIO(secret))
        assert (await reporter.append([steal], Condition(steal.subject, 0), server="s-1")).seqs
    finally:
        await nc1.close()
        await nc2.close()
