"""Integration credentials: the NATS server itself confines them (issues 8 and 17).

Every check here goes through what an outside integrator has: the JSON that
``integration create`` prints, nats-py with its ``connect`` kwargs, and the
consumer Stratus made for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
from typing import Any

import nats
import nats.errors
import pytest

from stratus.cli.integrations import connect_info, wait_usable
from stratus.events.model import Cause
from stratus.events.natscreds import connect_options
from stratus.events.resources import QuotaSet
from stratus.handlers.natsauth import GENERATION

from .test_cli import cli, login
from .test_identity import ADMIN_PASSWORD, Cloud, Stacks, connect, kind

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
async def admin_cloud(tmp_path):
    # Webhooks here point at a closed port on 127.0.0.1: never off the machine.
    stacks = Stacks(tmp_path, webhook_allow=("127.0.0.1/32",))
    c = await connect(await stacks.start())
    token = (await c.login("admin", ADMIN_PASSWORD))["token"]
    for t in ("ta", "tb"):
        await c.ok("cmd.tenant.create", {"name": t}, token)
        await c.ok("cmd.quota.set", {"tenant": t, "limits": {"instances": 7}}, token)
    yield c, token
    await c.close()
    await stacks.close()


async def create_integration(c: Cloud, token: str, body: dict) -> dict[str, Any]:
    """What ``integration create -o json`` prints, once the credential works."""
    secret = secrets.token_urlsafe(32)
    data = await c.ok("cmd.integration.create", {**body, "secret": secret}, token)
    info = connect_info(c.stack.url, data, secret)
    assert await wait_usable(info) is not None, "the credential never worked"
    return info


class Watch:
    """One integration's connection; errors the server sent are kept."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.disconnected = asyncio.Event()

    async def connect(self, info: dict[str, Any], url: str | None = None) -> nats.NATS:
        async def on_error(e: Exception) -> None:
            self.errors.append(str(e))

        async def on_disconnect() -> None:
            self.disconnected.set()

        return await nats.connect(
            url or info["url"],
            **info["connect"],
            error_cb=on_error,
            disconnected_cb=on_disconnect,
            allow_reconnect=False,
            connect_timeout=2,
        )

    async def violation(self, subject_part: str, timeout: float = 3.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any("permissions violation" in e and subject_part.lower() in e for e in self.errors):
                return True
            await asyncio.sleep(0.02)
        return False


async def bound(nc: nats.NATS, info: dict[str, Any]) -> Any:
    """The integration's subscription to the consumer Stratus made (the README's way)."""
    js = nc.jetstream()
    consumer = await js.consumer_info(info["stream"], info["durable"])
    assert consumer.config.deliver_subject == info["deliver_subject"]
    return await js.subscribe_bind(
        info["stream"], consumer.config, info["durable"], manual_ack=True
    )


async def fetch_all(sub: Any, want: int, seconds: float = 20) -> list[tuple[int, str]]:
    """Acknowledge and list what arrives until ``want`` came or nothing more does."""
    got: list[tuple[int, str]] = []
    deadline = time.monotonic() + seconds
    while len(got) < want and time.monotonic() < deadline:
        try:
            m = await sub.next_msg(timeout=1)
        except nats.errors.TimeoutError:
            continue
        got.append((m.metadata.sequence.stream, m.subject))
        await m.ack()
    return got


async def next_msg(js: Any, durable: str) -> Any:
    sub = await js.pull_subscribe_bind(durable=durable, stream="EVENTS")
    return await sub.fetch(1, timeout=1)


async def test_an_integration_sees_exactly_its_tenants_events_and_nothing_else(admin_cloud):
    c, token = admin_cloud
    store = c.stack.store
    assert store is not None
    info = await create_integration(c, token, {"name": "billing", "tenant": "ta"})
    assert info["filter_subject"] == "ev.ta.>"
    assert info["deliver_subject"].startswith(info["connect"]["inbox_prefix"] + ".")
    # More events on both tenants after the credential exists.
    await c.ok("cmd.quota.set", {"tenant": "ta", "limits": {"instances": 8}}, token)
    await c.ok("cmd.quota.set", {"tenant": "tb", "limits": {"instances": 8}}, token)
    want = [(r.seq, r.subject) for r in await store.read_all(subjects=["ev.ta.>"])]
    assert any(s.startswith("ev.ta.integration.") for _, s in want)
    assert len(want) >= 4

    w = Watch()
    nc = await w.connect(info)
    try:
        got = await fetch_all(await bound(nc, info), len(want))
        assert got == want
        assert not any(s.startswith("ev.tb.") for _, s in got)

        before = await store.last_seq()
        consumers = {ci.name for ci in await store.js.consumers_info("EVENTS")}
        js = nc.jetstream(timeout=1)  # a refused API call just goes unanswered
        durable = info["durable"]
        refusals = [
            # creating or deleting any consumer, its own included; fetching
            ("durable.create", lambda: js.add_consumer("EVENTS", durable_name=durable)),
            ("consumer.create", lambda: js.add_consumer("EVENTS", name=durable)),
            ("EVENTS.other", lambda: js.pull_subscribe("ev.>", durable="other", stream="EVENTS")),
            (f"DELETE.EVENTS.{durable}", lambda: js.delete_consumer("EVENTS", durable)),
            ("DELETE.EVENTS.audit", lambda: js.delete_consumer("EVENTS", "audit")),
            ("STREAM.DELETE.EVENTS", lambda: js.delete_stream("EVENTS")),
            ("INFO.EVENTS.other", lambda: js.consumer_info("EVENTS", "other")),
            (f"MSG.NEXT.EVENTS.{durable}", lambda: next_msg(js, durable)),
            ("ev.ta.server.x", lambda: js.publish("ev.ta.server.x", b"forged", timeout=1)),
        ]
        for part, attempt in refusals:
            with pytest.raises((nats.errors.TimeoutError, TimeoutError, nats.errors.Error)):
                await attempt()
            assert await w.violation(part), (part, w.errors)
        core = await nc.subscribe("ev.tb.>")
        await nc.flush()
        assert await w.violation("ev.tb.>")
        with contextlib.suppress(Exception):
            await core.unsubscribe()
        assert await store.last_seq() == before, "a refused publish landed on the log"
        assert {ci.name for ci in await store.js.consumers_info("EVENTS")} == consumers
        # Its view lists it; the bcrypt hash is nowhere in it.
        rows = await c.ok("q.integrations", {"tenant": "ta"}, token)
        assert [r["name"] for r in rows] == ["billing"]
        assert "password_hash" not in rows[0] and "$2b$" not in str(rows)
    finally:
        await nc.close()


async def test_push_consumers_and_stray_replies_leak_nothing_to_anyone(admin_cloud):
    """Issue 17: a credential could create a push consumer delivering its
    tenant's events to ``_INBOX.leak``, which clients could once read, or
    into command and API subjects. Each variant is replayed; the broker
    refuses it, and a client without a token (it may read its own inbox
    prefix, nothing else: not even ``_INBOX.>``) sees none of it."""
    c, token = admin_cloud
    store = c.stack.store
    info = await create_integration(c, token, {"name": "billing", "tenant": "ta"})
    iid = info["durable"]
    # Another consumer on the tenant's events, made by Stratus: a webhook's.
    hook = {"tenant": "ta", "name": "h", "url": "http://127.0.0.1:9/x", "types": ["*"]}
    webhook = "webhook-" + (await c.ok("cmd.webhook.create", hook, token))["id"]

    spy_errors: list[str] = []

    async def on_spy_error(e: Exception) -> None:
        spy_errors.append(str(e))

    seen: list[tuple[str, bytes]] = []

    async def on_seen(m: Any) -> None:
        seen.append((m.subject, m.data))

    anonymous = connect_options(None)
    spy = await nats.connect(c.stack.url, error_cb=on_spy_error, allow_reconnect=False, **anonymous)
    w = Watch()
    nc = await w.connect(info)
    try:
        # what a client without a token may read: its own inbox
        await spy.subscribe(anonymous["inbox_prefix"] + ".>", cb=on_seen)
        for wider in ("_INBOX.>", ">", "ev.>", "$JS.>", "_INBOX_" + iid + ".>"):
            await spy.subscribe(wider, cb=on_seen)
        await spy.flush()
        await asyncio.sleep(0.2)
        assert len(spy_errors) == 5, spy_errors  # only its own inbox was allowed
        before = await store.last_seq()
        consumers = {ci.name for ci in await store.js.consumers_info("EVENTS")}

        def create(subject: str, deliver: str) -> tuple[str, bytes]:
            config = {
                "durable_name": iid,
                "name": iid,
                "deliver_subject": deliver,
                "filter_subject": "ev.ta.>",
                "deliver_policy": "all",
                "ack_policy": "none",
            }
            return subject, json.dumps({"stream_name": "EVENTS", "config": config}).encode()

        attacks = [
            create(f"$JS.API.CONSUMER.CREATE.EVENTS.{iid}.ev.ta.>", "_INBOX.leak"),
            create(f"$JS.API.CONSUMER.CREATE.EVENTS.{iid}.ev.ta.>", "cmd.tenant.create"),
            create(f"$JS.API.CONSUMER.CREATE.EVENTS.{iid}.ev.ta.>", "q.tenants"),
            create(f"$JS.API.CONSUMER.CREATE.EVENTS.{iid}.ev.ta.>", "$JS.API.STREAM.DELETE.EVENTS"),
            create(f"$JS.API.CONSUMER.DURABLE.CREATE.EVENTS.{iid}", "_INBOX.leak"),
            create("$JS.API.CONSUMER.CREATE.EVENTS", "_INBOX.leak"),
            # a fetch names its reply subject, where JetStream delivers
            (f"$JS.API.CONSUMER.MSG.NEXT.EVENTS.{iid}", b'{"batch": 50}', "_INBOX.leak"),
            (f"$JS.API.CONSUMER.MSG.NEXT.EVENTS.{webhook}", b'{"batch": 50}', "_INBOX.leak"),
        ]
        for attack in attacks:
            subject, body = attack[0], attack[1]
            reply = attack[2] if len(attack) > 2 else f"{info['connect']['inbox_prefix']}.r"
            w.errors.clear()
            await nc.publish(subject, body, reply=reply)
            await nc.flush()
            assert await w.violation(subject), (subject, w.errors)
        # What the credential may do, pointed at the anonymous client's inboxes:
        # ack-and-send-more and info, answered into _INBOX.leak*.
        sub = await bound(nc, info)
        first = await sub.next_msg(timeout=5)
        await nc.publish(first.reply, b'+NXT {"batch": 50}', reply="_INBOX.leak2")
        await nc.publish(f"$JS.API.CONSUMER.INFO.EVENTS.{iid}", b"", reply="_INBOX.info")
        await nc.flush()
        # New events of the tenant while all of that is in place.
        cause = Cause(actor="test", correlation_id="leak", causation_id="leak")
        for i in range(5):
            await store.append([cause.make(QuotaSet, "ta", "quota", "ta", limits={"x": i})])
        await asyncio.sleep(1.5)

        fresh = await store.read_all(before, subjects=["ev.ta.>"])
        assert len(fresh) == 5
        # Not even the answers the credential directed to _INBOX.leak2 and
        # _INBOX.info: no client may subscribe there.
        assert seen == [], seen
        assert await store.last_seq() == before + 5, "an attack appended or removed events"
        after = {ci.name: ci for ci in await store.js.consumers_info("EVENTS")}
        assert set(after) == consumers
        mine = after[iid].config
        assert mine.deliver_subject == info["deliver_subject"]
        assert mine.filter_subject == "ev.ta.>"
        assert (await store.js.stream_info("EVENTS")).config.name == "EVENTS"
    finally:
        await nc.close()
        await spy.close()


async def test_reset_restarts_the_consumer_at_a_sequence_from_the_cli(admin_cloud, tmp_path):
    c, token = admin_cloud
    store = c.stack.store
    url = c.stack.url
    from . import test_cli

    test_cli.CONFIG_HOME["value"] = str(tmp_path / "config")
    await asyncio.to_thread(login, url, "admin", ADMIN_PASSWORD)
    out = await asyncio.to_thread(
        cli,
        url,
        "integration",
        "create",
        "billing",
        "--tenant",
        "ta",
        "--ack-wait",
        "5",
        "-o",
        "json",
    )
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["ack_wait_s"] == 5 and info["start_seq"] == 1
    ta = [(r.seq, r.subject) for r in await store.read_all(subjects=["ev.ta.>"])]
    nc = await Watch().connect(info)
    try:
        sub = await bound(nc, info)
        assert await fetch_all(sub, len(ta)) == ta
        js = nc.jetstream()
        generation = (await js.consumer_info("EVENTS", info["durable"])).config.metadata[GENERATION]

        start = ta[2][0]
        await sub.unsubscribe()  # else the old consumer may send the reset event first
        out = await asyncio.to_thread(
            cli, url, "integration", "reset", "billing", "--from", str(start), "--tenant", "ta"
        )
        assert out.returncode == 0, out.stderr
        deadline = time.monotonic() + 10
        while True:  # Stratus re-makes it a moment after the command's reply
            ci = await js.consumer_info("EVENTS", info["durable"])
            if ci.config.metadata.get(GENERATION) != generation:
                break
            assert time.monotonic() < deadline, "the consumer was never re-made"
            await asyncio.sleep(0.05)
        assert ci.config.opt_start_seq == start and ci.config.ack_wait == 5
        want = [(r.seq, r.subject) for r in await store.read_all(subjects=["ev.ta.>"])]
        sub = await bound(nc, info)
        assert await fetch_all(sub, len(want) - 2) == want[2:]
    finally:
        await nc.close()
    await c.settled(token)
    rows = await c.ok("q.integrations", {"tenant": "ta"}, token)
    assert rows[0]["start_seq"] == start
    # Refusals change nothing.
    before = await store.last_seq()
    for args, code in (
        (["reset", "ghost", "--from", "1", "--tenant", "ta"], 1),
        (["reset", "billing", "--from", "0", "--tenant", "ta"], 2),
        (["create", "x", "--tenant", "ta", "--ack-wait", "0"], 2),
    ):
        r = await asyncio.to_thread(cli, url, "integration", *args)
        assert r.returncode == code, (args, r.stderr)
    assert await store.last_seq() == before


async def test_revoked_credentials_are_cut_off_within_seconds(admin_cloud):
    c, token = admin_cloud
    info = await create_integration(c, token, {"name": "siem", "all_tenants": True})
    assert info["filter_subject"] == "ev.>"
    w = Watch()
    nc = await w.connect(info)
    try:
        sub = await bound(nc, info)
        assert await sub.next_msg(timeout=5)
        t0 = time.monotonic()
        await c.ok("cmd.integration.revoke", {"ref": "siem", "all_tenants": True}, token)
        await asyncio.wait_for(w.disconnected.wait(), 5)
        took = time.monotonic() - t0
        print(f"revoked: disconnected after {took:.3f} s")
        assert took < 5
    finally:
        await nc.close()
    with pytest.raises(nats.errors.Error, match="Authorization"):
        await Watch().connect(info)
    rows = await c.ok("q.integrations", {}, token)
    assert [(r["name"], r["status"]) for r in rows] == [("siem", "revoked")]
    # ... and its consumer is gone with it.
    store = c.stack.store
    deadline = time.monotonic() + 5
    while info["durable"] in {ci.name for ci in await store.js.consumers_info("EVENTS")}:
        assert time.monotonic() < deadline, "the revoked integration's consumer stayed"
        await asyncio.sleep(0.05)
    reply = await c.cmd(
        "integration.reset", {"ref": "siem", "all_tenants": True, "start_seq": 1}, token
    )
    assert kind(reply) == "conflict"


async def test_bad_requests_change_nothing(admin_cloud):
    c, token = admin_cloud
    store = c.stack.store
    before = await store.last_seq()
    secret = "s" * 40
    cases = [
        ("integration.create", {"name": "x", "tenant": "nope", "secret": secret}, "not_found"),
        ("integration.create", {"name": "Bad Name", "tenant": "ta", "secret": secret}, "invalid"),
        ("integration.create", {"name": "x", "tenant": "ta", "secret": "short"}, "invalid"),
        (
            "integration.create",
            {"name": "x", "tenant": "ta", "secret": secret, "ack_wait_s": 0},
            "invalid",
        ),
        (
            "integration.create",
            {"name": "x", "tenant": "ta", "secret": secret, "start_seq": 0},
            "invalid",
        ),
        ("integration.revoke", {"ref": "ghost", "tenant": "ta"}, "not_found"),
        ("integration.reset", {"ref": "ghost", "tenant": "ta", "start_seq": 1}, "not_found"),
        ("integration.reset", {"ref": "ghost", "tenant": "ta", "start_seq": -1}, "invalid"),
        (
            "webhook.create",
            {"name": "w", "url": "ftp://x/", "types": ["*"], "tenant": "ta"},
            "invalid",
        ),
        ("webhook.create", {"name": "w", "url": "file:///etc/passwd", "types": ["*"]}, "invalid"),
        ("webhook.create", {"name": "w", "url": "http://", "types": ["*"]}, "invalid"),
        # internal targets (127.0.0.1/32 alone is allowed here)
        ("webhook.create", {"name": "w", "url": "http://127.0.0.2/", "types": ["*"]}, "invalid"),
        (
            "webhook.create",
            {"name": "w", "url": "http://169.254.169.254/", "types": ["*"]},
            "invalid",
        ),
        ("webhook.create", {"name": "w", "url": "http://[::1]:8080/", "types": ["*"]}, "invalid"),
        ("webhook.delete", {"ref": "ghost", "tenant": "ta"}, "not_found"),
    ]
    for verb, body, want in cases:
        reply = await c.cmd(verb, body, token)
        assert kind(reply) == want, (verb, body, reply)
    assert await store.last_seq() == before


async def test_a_restarted_stack_rebuilds_the_users_from_the_log(tmp_path):
    stacks = Stacks(tmp_path)
    try:
        stack = await stacks.start()
        c = await connect(stack)
        token = (await c.login("admin", ADMIN_PASSWORD))["token"]
        await c.ok("cmd.tenant.create", {"name": "ta"}, token)
        kept = await create_integration(c, token, {"name": "kept", "tenant": "ta"})
        gone = await create_integration(c, token, {"name": "gone", "tenant": "ta"})
        await c.ok("cmd.integration.revoke", {"ref": "gone", "tenant": "ta"}, token)
        nc = await Watch().connect(kept)
        try:
            sub = await bound(nc, kept)
            seen = await fetch_all(sub, len(await stack.store.read_all(subjects=["ev.ta.>"])))
            assert seen[0][1] == "ev.ta.tenant.ta"
        finally:
            await nc.close()
        await c.close()
        await stacks.stop(stack)

        stack = await stacks.start()  # same data dir: same log, a fresh nats-server config
        cause = Cause(actor="test", correlation_id="after", causation_id="after")
        await stack.store.append([cause.make(QuotaSet, "ta", "quota", "ta", limits={"x": 1})])
        nc = await Watch().connect(kept, stack.url)
        try:
            # The consumer kept its position: the new event, not the first again.
            sub = await bound(nc, kept)
            got = await fetch_all(sub, 1)
            assert got == [(await stack.store.last_seq(), "ev.ta.quota.ta")]
        finally:
            await nc.close()
        with pytest.raises(nats.errors.Error, match="Authorization"):
            await Watch().connect(gone, stack.url)
    finally:
        await stacks.close()
