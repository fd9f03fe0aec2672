"""Webhook deliveries to receivers on loopback (issue 8)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web

from stratus.events import cloudevents

from .test_identity import ADMIN_PASSWORD, Stacks, connect

pytestmark = pytest.mark.timeout(120)


class Receiver:
    """An HTTP server on 127.0.0.1 that records every POST; ``behave`` decides the answer."""

    def __init__(self, behave: Callable[[Receiver, dict], Awaitable[int]] | None = None) -> None:
        self.posts: list[tuple[dict, bytes, dict[str, str], float]] = []
        self.behave = behave
        self.release = asyncio.Event()
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        ce = json.loads(body)
        self.posts.append((ce, body, dict(request.headers), time.monotonic()))
        status = await self.behave(self, ce) if self.behave else 204
        return web.Response(status=status)

    async def start(self) -> Receiver:
        app = web.Application()
        app.router.add_post("/hook", self._handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}/hook"
        return self

    async def stop(self) -> None:
        self.release.set()
        if self.runner is not None:
            await self.runner.cleanup()

    def delivered_ids(self) -> list[str]:
        return [ce["id"] for ce, *_ in self.posts]


async def wait_for(pred: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


@pytest.fixture
async def cloud(tmp_path):
    stacks = Stacks(tmp_path)
    from stratus.cli.runtime import Stack

    s = Stack(tmp_path / "data", port=0, admin_password=ADMIN_PASSWORD)
    s.webhook_options = {"backoff_s": 0.05, "backoff_max_s": 0.2, "max_attempts": 5, "timeout_s": 3}
    await s.start()
    stacks.running.append(s)
    c = await connect(s)
    token = (await c.login("admin", ADMIN_PASSWORD))["token"]
    for t in ("ta", "tb"):
        await c.ok("cmd.tenant.create", {"name": t}, token)
    receivers: list[Receiver] = []
    yield c, token, receivers
    await c.client.close()
    await stacks.close()
    for r in receivers:
        with contextlib.suppress(Exception):
            await r.stop()


async def deliveries(c: Any, token: str, body: dict, n: int) -> list[dict]:
    """The deliveries list once it shows ``n`` final outcomes (each is recorded
    just after its POST returns)."""
    deadline = time.monotonic() + 10
    while True:
        rows = await c.ok("q.webhook-deliveries", body, token)
        if sum(r["status"] in ("delivered", "dead") for r in rows) >= n:
            return rows
        assert time.monotonic() < deadline, rows
        await asyncio.sleep(0.05)


async def quota(c: Any, token: str, tenant: str, n: int) -> None:
    await c.ok("cmd.quota.set", {"tenant": tenant, "limits": {"instances": n}}, token)


async def test_signed_cloudevents_in_log_order_retried_until_accepted(cloud):
    c, token, receivers = cloud
    failures = {"left": 3}

    async def flaky(r: Receiver, ce: dict) -> int:
        if failures["left"]:
            failures["left"] -= 1
            return 503
        return 200

    rx = await Receiver(flaky).start()
    receivers.append(rx)
    hook = await c.ok(
        "cmd.webhook.create",
        {"tenant": "ta", "name": "billing", "url": rx.url, "types": ["quota.*"]},
        token,
    )
    secret = hook["secret"]
    for i in range(6):
        await quota(c, token, "ta", 10 + i)
        await quota(c, token, "tb", 10 + i)  # another tenant: never delivered
    await c.ok("cmd.network.create", {"tenant": "ta", "name": "lan"}, token)  # not subscribed

    await wait_for(lambda: len(set(rx.delivered_ids())) == 6, 30, "6 distinct events")
    await asyncio.sleep(0.3)  # anything extra would arrive now
    ids = rx.delivered_ids()
    # The first event: 3 refusals then accepted, so it arrived 4 times; the rest once.
    assert ids[:4] == [ids[0]] * 4 and len(ids) == 9
    seqs = [ce["stratusseq"] for ce, *_ in rx.posts[3:]]
    assert seqs == sorted(seqs) and len(set(seqs)) == 6
    limits = [ce["data"]["limits"]["instances"] for ce, *_ in rx.posts[3:]]
    assert limits == [10, 11, 12, 13, 14, 15]
    for ce, body, headers, _ in rx.posts:
        assert ce["specversion"] == "1.0" and ce["type"] == "quota.set"
        assert ce["stratustenant"] == "ta" and ce["subject"] == "ta"
        assert ce["source"] == "/stratus/tenants/ta" and ce["time"]
        assert headers["Content-Type"] == cloudevents.CONTENT_TYPE
        assert cloudevents.verify(secret, body, headers[cloudevents.H_SIGNATURE])
        assert not cloudevents.verify("whsec_wrong", body, headers[cloudevents.H_SIGNATURE])
    assert [h[cloudevents.H_ATTEMPT] for _, _, h, _ in rx.posts[:4]] == ["1", "2", "3", "4"]

    rows = await deliveries(c, token, {"tenant": "ta", "ref": "billing"}, 6)
    assert [r["seq"] for r in rows] == seqs
    assert rows[0]["attempts"] == 4 and rows[0]["status"] == "delivered"
    assert all(r["attempts"] == 1 and r["status"] == "delivered" for r in rows[1:])
    # Another tenant's admin cannot read them.
    reply = await c.call("q.webhook-deliveries", {"tenant": "tb", "ref": "billing"}, token)
    assert reply["ok"] is False and reply["error"]["kind"] == "not_found"


async def test_a_hanging_receiver_delays_no_other_subscription_and_dead_letters(cloud):
    c, token, receivers = cloud

    async def hang(r: Receiver, ce: dict) -> int:
        await r.release.wait()
        return 200

    async def broken(r: Receiver, ce: dict) -> int:
        return 500

    slow, fast, dead = Receiver(hang), Receiver(), Receiver(broken)
    for r in (slow, fast, dead):
        receivers.append(await r.start())
    for name, r in (("slow", slow), ("fast", fast), ("dead", dead)):
        body = {"tenant": "ta", "name": name, "url": r.url, "types": ["quota.set"]}
        await c.ok("cmd.webhook.create", body, token)
    t0 = time.monotonic()
    for i in range(3):
        await quota(c, token, "ta", 20 + i)
    await wait_for(lambda: len(fast.posts) == 3, 10, "the fast receiver's 3 events")
    took = fast.posts[-1][3] - t0
    # The slow receiver's POST times out only after 3 s; the fast one did not wait for it.
    assert took < 2.5, took
    assert len(slow.posts) == 1
    # The broken receiver: 5 attempts per event, then dead-lettered, and on to the next.
    await wait_for(lambda: len(dead.posts) == 15, 20, "3 events x 5 attempts")
    rows = await deliveries(c, token, {"tenant": "ta", "ref": "dead"}, 3)
    assert [(r["status"], r["attempts"], r["last_status"]) for r in rows] == [("dead", 5, 500)] * 3
    dl = await c.ok(
        "q.webhook-deliveries", {"tenant": "ta", "ref": "dead", "status": "dead"}, token
    )
    assert len(dl) == 3
    # Deleting a subscription stops its deliveries.
    await c.ok("cmd.webhook.delete", {"tenant": "ta", "ref": "fast"}, token)
    await asyncio.sleep(0.3)
    await quota(c, token, "ta", 99)
    await asyncio.sleep(0.5)
    assert len(fast.posts) == 3


async def test_an_event_in_flight_when_the_service_stops_is_sent_again_after_restart(tmp_path):
    from stratus.cli.runtime import Stack

    gate = {"hold": True}

    async def held(r: Receiver, ce: dict) -> int:
        if gate["hold"]:
            await r.release.wait()
            return 503
        return 200

    rx = await Receiver(held).start()
    stacks = Stacks(tmp_path)
    try:
        s = Stack(tmp_path / "data", port=0, admin_password=ADMIN_PASSWORD)
        s.webhook_options = {"backoff_s": 0.05, "timeout_s": 30}
        await s.start()
        stacks.running.append(s)
        c = await connect(s)
        token = (await c.login("admin", ADMIN_PASSWORD))["token"]
        await c.ok("cmd.tenant.create", {"name": "ta"}, token)
        body = {"tenant": "ta", "name": "h", "url": rx.url, "types": ["quota.set"]}
        await c.ok("cmd.webhook.create", body, token)
        for i in range(3):
            await quota(c, token, "ta", 30 + i)
        await wait_for(lambda: len(rx.posts) == 1, 10, "the first POST, held open")
        first = rx.posts[0][0]["id"]
        await c.client.close()
        await stacks.stop(s)  # the POST is cut off: nothing was acknowledged
        gate["hold"] = False

        s = Stack(tmp_path / "data", port=0, admin_password=ADMIN_PASSWORD)
        s.webhook_options = {"backoff_s": 0.05, "timeout_s": 5}
        await s.start()
        stacks.running.append(s)
        await wait_for(lambda: len(rx.posts) == 4, 20, "the held event again, then the rest")
        ids = rx.delivered_ids()
        assert ids[0] == ids[1] == first  # at least once: receivers dedupe on id
        seqs = [ce["stratusseq"] for ce, *_ in rx.posts[1:]]
        assert seqs == sorted(seqs) and len(set(ids)) == 3
    finally:
        await stacks.close()
        await rx.stop()
