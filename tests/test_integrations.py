"""Integration credentials: the NATS server itself confines them (issue 8)."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time

import nats
import nats.errors
import pytest
from nats.js.api import ConsumerConfig, DeliverPolicy

from stratus.handlers.natsauth import inbox_prefix

from .test_identity import ADMIN_PASSWORD, Cloud, Stacks, connect, kind

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
async def admin_cloud(tmp_path):
    stacks = Stacks(tmp_path)
    c = await connect(await stacks.start())
    token = (await c.login("admin", ADMIN_PASSWORD))["token"]
    for t in ("ta", "tb"):
        await c.ok("cmd.tenant.create", {"name": t}, token)
        await c.ok("cmd.quota.set", {"tenant": t, "limits": {"instances": 7}}, token)
    yield c, token
    await c.client.close()
    await stacks.close()


async def create_integration(c: Cloud, token: str, body: dict) -> tuple[dict, str]:
    secret = secrets.token_urlsafe(32)
    data = await c.ok("cmd.integration.create", {**body, "secret": secret}, token)
    return data, secret


class Watch:
    """One integration's connection; errors the server sent are kept."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.disconnected = asyncio.Event()

    async def connect(self, url: str, data: dict, secret: str) -> nats.NATS:
        async def on_error(e: Exception) -> None:
            self.errors.append(str(e))

        async def on_disconnect() -> None:
            self.disconnected.set()

        return await nats.connect(
            url,
            user=data["user"],
            password=secret,
            inbox_prefix=inbox_prefix(data["id"]),
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


async def test_an_integration_sees_exactly_its_tenants_events_and_nothing_else(admin_cloud):
    c, token = admin_cloud
    store = c.stack.store
    assert store is not None
    data, secret = await create_integration(c, token, {"name": "billing", "tenant": "ta"})
    assert data["filter_subject"] == "ev.ta.>"
    # More events on both tenants after the credential exists.
    await c.ok("cmd.quota.set", {"tenant": "ta", "limits": {"instances": 8}}, token)
    await c.ok("cmd.quota.set", {"tenant": "tb", "limits": {"instances": 8}}, token)
    want = [(r.seq, r.subject) for r in await store.read_all(subjects=["ev.ta.>"])]
    assert any(s.startswith("ev.ta.integration.") for _, s in want)
    assert len(want) >= 4

    w = Watch()
    nc = await w.connect(c.stack.url, data, secret)
    try:
        js = nc.jetstream()
        sub = await js.pull_subscribe(
            "ev.ta.>",
            durable=data["id"],
            stream="EVENTS",
            config=ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=1),
        )
        got: list[tuple[int, str]] = []
        for _ in range(20):
            if len(got) >= len(want):
                break
            with contextlib.suppress(nats.errors.TimeoutError):
                for m in await sub.fetch(100, timeout=1):
                    got.append((m.metadata.sequence.stream, m.subject))
                    await m.ack()
        assert got == want
        assert not any(s.startswith("ev.tb.") for _, s in got)

        before = await store.last_seq()
        js = nc.jetstream(timeout=1)  # a refused API call just goes unanswered
        refusals = [
            # another tenant's filter on its own durable; all tenants on another
            (
                "ev.tb.>",
                lambda: js.add_consumer(
                    "EVENTS", name=data["id"], durable_name=data["id"], filter_subject="ev.tb.>"
                ),
            ),
            ("EVENTS.other", lambda: js.pull_subscribe("ev.>", durable="other", stream="EVENTS")),
            ("DELETE.EVENTS.audit", lambda: js.delete_consumer("EVENTS", "audit")),
            ("STREAM.DELETE.EVENTS", lambda: js.delete_stream("EVENTS")),
            ("ev.ta.server.x", lambda: js.publish("ev.ta.server.x", b"forged", timeout=1)),
            # the legacy create, whose body could carry any filter
            ("DURABLE.CREATE", lambda: js.add_consumer("EVENTS", durable_name=data["id"])),
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
        # Its view lists it; the bcrypt hash is nowhere in it.
        rows = await c.ok("q.integrations", {"tenant": "ta"}, token)
        assert [r["name"] for r in rows] == ["billing"]
        assert "password_hash" not in rows[0] and "$2b$" not in str(rows)
    finally:
        await nc.close()


async def test_revoked_credentials_are_cut_off_within_seconds(admin_cloud):
    c, token = admin_cloud
    data, secret = await create_integration(c, token, {"name": "siem", "all_tenants": True})
    assert data["filter_subject"] == "ev.>"
    w = Watch()
    nc = await w.connect(c.stack.url, data, secret)
    try:
        js = nc.jetstream()
        sub = await js.pull_subscribe("ev.tb.>", durable=data["id"], stream="EVENTS")
        assert await sub.fetch(1, timeout=5)
        t0 = time.monotonic()
        await c.ok("cmd.integration.revoke", {"ref": "siem", "all_tenants": True}, token)
        await asyncio.wait_for(w.disconnected.wait(), 5)
        took = time.monotonic() - t0
        print(f"revoked: disconnected after {took:.3f} s")
        assert took < 5
    finally:
        await nc.close()
    with pytest.raises(nats.errors.Error, match="Authorization"):
        await Watch().connect(c.stack.url, data, secret)
    rows = await c.ok("q.integrations", {}, token)
    assert [(r["name"], r["status"]) for r in rows] == [("siem", "revoked")]


async def test_bad_requests_change_nothing(admin_cloud):
    c, token = admin_cloud
    store = c.stack.store
    before = await store.last_seq()
    member = None
    cases = [
        ("integration.create", {"name": "x", "tenant": "nope", "secret": "s" * 40}, "not_found"),
        ("integration.create", {"name": "Bad Name", "tenant": "ta", "secret": "s" * 40}, "invalid"),
        ("integration.create", {"name": "x", "tenant": "ta", "secret": "short"}, "invalid"),
        ("integration.revoke", {"ref": "ghost", "tenant": "ta"}, "not_found"),
        (
            "webhook.create",
            {"name": "w", "url": "ftp://x/", "types": ["*"], "tenant": "ta"},
            "invalid",
        ),
        ("webhook.create", {"name": "w", "url": "file:///etc/passwd", "types": ["*"]}, "invalid"),
        ("webhook.create", {"name": "w", "url": "http://", "types": ["*"]}, "invalid"),
        ("webhook.delete", {"ref": "ghost", "tenant": "ta"}, "not_found"),
    ]
    for verb, body, want in cases:
        reply = await c.cmd(verb, body, token)
        assert kind(reply) == want, (verb, body, reply)
    assert member is None
    assert await store.last_seq() == before


async def test_a_restarted_stack_rebuilds_the_users_from_the_log(tmp_path):
    stacks = Stacks(tmp_path)
    try:
        stack = await stacks.start()
        c = await connect(stack)
        token = (await c.login("admin", ADMIN_PASSWORD))["token"]
        await c.ok("cmd.tenant.create", {"name": "ta"}, token)
        kept, kept_secret = await create_integration(c, token, {"name": "kept", "tenant": "ta"})
        gone, gone_secret = await create_integration(c, token, {"name": "gone", "tenant": "ta"})
        await c.ok("cmd.integration.revoke", {"ref": "gone", "tenant": "ta"}, token)
        await c.client.close()
        await stacks.stop(stack)

        stack = await stacks.start()  # same data dir: same log, a fresh nats-server config
        nc = await Watch().connect(stack.url, kept, kept_secret)
        try:
            sub = await nc.jetstream().pull_subscribe(
                "ev.ta.>", durable=kept["id"], stream="EVENTS"
            )
            assert [m.subject for m in await sub.fetch(1, timeout=5)] == ["ev.ta.tenant.ta"]
        finally:
            await nc.close()
        with pytest.raises(nats.errors.Error, match="Authorization"):
            await Watch().connect(stack.url, gone, gone_secret)
    finally:
        await stacks.close()
