"""Webhook deliveries to receivers on loopback (issue 8)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult

from stratus.events import cloudevents
from stratus.handlers.targets import TargetPolicy

from .test_identity import ADMIN_PASSWORD, Stacks, connect

pytestmark = pytest.mark.timeout(120)

# The receivers here listen on loopback, which webhooks reach only when allowed.
LOOPBACK = ["127.0.0.0/8"]


class Receiver:
    """An HTTP server on 127.0.0.1 that records every POST; ``behave`` decides the answer."""

    def __init__(
        self, behave: Callable[[Receiver, dict], Awaitable[int | web.Response]] | None = None
    ) -> None:
        self.posts: list[tuple[dict, bytes, dict[str, str], float]] = []
        self.behave = behave
        self.release = asyncio.Event()
        self.runner: web.AppRunner | None = None
        self.url = ""
        self.port = 0

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        ce = json.loads(body) if body else {}
        self.posts.append((ce, body, dict(request.headers), time.monotonic()))
        answer = await self.behave(self, ce) if self.behave else 204
        return answer if isinstance(answer, web.Response) else web.Response(status=answer)

    async def start(self, host: str = "127.0.0.1") -> Receiver:
        app = web.Application()
        app.router.add_route("*", "/hook", self._handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, host, 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://{host}:{self.port}/hook"
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

    s = Stack(tmp_path / "data", port=0, admin_password=ADMIN_PASSWORD, webhook_allow=LOOPBACK)
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
        s = Stack(tmp_path / "data", port=0, admin_password=ADMIN_PASSWORD, webhook_allow=LOOPBACK)
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

        s = Stack(tmp_path / "data", port=0, admin_password=ADMIN_PASSWORD, webhook_allow=LOOPBACK)
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


class HostsResolver(AbstractResolver):
    """Names from a table, like /etc/hosts for one process: what a name
    resolves to can change between a webhook's creation and its delivery."""

    def __init__(self, table: dict[str, str]) -> None:
        self.table = table

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        if host not in self.table:
            raise OSError(f"{host}: no such name")
        return [
            ResolveResult(
                hostname=host, host=self.table[host], port=port, family=socket.AF_INET,
                proto=0, flags=0,
            )
        ]  # fmt: skip

    async def close(self) -> None:
        pass


async def policy_stack(stacks: Stacks, policy: TargetPolicy) -> tuple[Any, Any, str]:
    """A stack whose webhooks go by ``policy`` (two attempts, short backoff),
    an admin's client and token, and tenant ta."""
    from stratus.cli.runtime import Stack

    s = Stack(stacks.root / "data", port=0, admin_password=ADMIN_PASSWORD)
    s.webhook_policy = policy
    s.webhook_options = {"backoff_s": 0.05, "backoff_max_s": 0.1, "max_attempts": 2}
    await s.start()
    stacks.running.append(s)
    c = await connect(s)
    token = (await c.login("admin", ADMIN_PASSWORD))["token"]
    await c.ok("cmd.tenant.create", {"name": "ta"}, token)
    return s, c, token


async def test_internal_targets_are_refused_at_create_and_at_delivery(tmp_path):
    """Issue 17: no allowed network: a loopback, link-local, private,
    multicast or metadata URL is refused when created (the CLI exits 1 with
    the reason, nothing is appended); a name that resolves inward when the
    event is delivered is refused then, and its receiver sees nothing."""
    from .test_cli import CONFIG_HOME, cli, login

    rx = await Receiver().start()
    names = HostsResolver({"hooks.example": "93.184.215.14"})
    stacks = Stacks(tmp_path)
    try:
        s, c, token = await policy_stack(stacks, TargetPolicy((), resolver=names))
        CONFIG_HOME["value"] = str(tmp_path / "config")
        await asyncio.to_thread(login, s.url, "admin", ADMIN_PASSWORD)
        before = await s.store.last_seq()
        refused = {
            rx.url: "loopback",
            f"http://localhost:{rx.port}/hook": "loopback",
            f"http://2130706433:{rx.port}/hook": "loopback",  # 127.0.0.1, spelt as a number
            f"http://[::ffff:127.0.0.1]:{rx.port}/hook": "loopback",
            "http://169.254.169.254/latest/meta-data/": "link-local",
            "http://[fd00:ec2::254]/latest/meta-data/": "private",
            "http://10.20.30.40/hook": "private",
            "http://192.168.1.1/hook": "private",
            "http://100.100.100.200/hook": "not globally routable",
            "http://224.0.0.251/hook": "multicast",
            "http://0.0.0.0/hook": "unspecified",
        }
        for url, why in refused.items():
            out = await asyncio.to_thread(
                cli, s.url, "webhook", "create", "--url", url, "--types", "*", "--tenant", "ta"
            )
            assert out.returncode == 1, (url, out.stdout, out.stderr)
            assert out.stderr.startswith("error: invalid: ") and why in out.stderr, out.stderr
        assert await s.store.last_seq() == before, "a refused webhook was appended"

        # Created while the name points outward; delivered when it points home.
        url = f"http://hooks.example:{rx.port}/hook"
        hook = await c.ok(
            "cmd.webhook.create", {"tenant": "ta", "name": "h", "url": url, "types": ["quota.*"]},
            token,
        )  # fmt: skip
        names.table["hooks.example"] = "127.0.0.1"
        await quota(c, token, "ta", 3)
        rows = await deliveries(c, token, {"tenant": "ta", "ref": hook["id"]}, 1)
        assert [(r["status"], r["attempts"]) for r in rows] == [("dead", 2)]
        assert "refused" in rows[0]["last_error"] and "loopback" in rows[0]["last_error"]
        assert rx.posts == []
        await c.client.close()
    finally:
        await stacks.close()
        await rx.stop()


async def test_an_allowed_network_is_reached_and_redirects_are_not_followed(tmp_path):
    """A cloud admin allowed 127.0.0.1/32 (the tests' receivers): deliveries
    go there, by address or by a name resolving there; a 307 pointing at
    127.0.0.2, which is not allowed, is a failed attempt, never followed."""

    inside = await Receiver().start("127.0.0.2")

    async def bounce(r: Receiver, ce: dict) -> web.Response:
        return web.Response(status=307, headers={"Location": inside.url})

    rx, redirect = await Receiver().start(), await Receiver(bounce).start()
    stacks = Stacks(tmp_path)
    try:
        names = HostsResolver({"hooks.example": "127.0.0.1"})
        _, c, token = await policy_stack(stacks, TargetPolicy(["127.0.0.1/32"], resolver=names))
        for name, url in (
            ("direct", rx.url),
            ("named", f"http://hooks.example:{rx.port}/hook"),
            ("bounce", redirect.url),
        ):
            body = {"tenant": "ta", "name": name, "url": url, "types": ["quota.*"]}
            await c.ok("cmd.webhook.create", body, token)
        reply = await c.cmd(
            "webhook.create", {"tenant": "ta", "name": "x", "url": inside.url, "types": ["*"]},
            token,
        )  # fmt: skip
        assert reply["error"]["kind"] == "invalid" and "127.0.0.2" in reply["error"]["message"]
        await quota(c, token, "ta", 4)
        await wait_for(lambda: len(rx.posts) == 2, 10, "both deliveries to the allowed receiver")
        rows = await deliveries(c, token, {"tenant": "ta", "ref": "bounce"}, 1)
        assert [(r["status"], r["last_status"]) for r in rows] == [("dead", 307)]
        assert len(redirect.posts) == 2 and inside.posts == []
        await c.client.close()
    finally:
        await stacks.close()
        for r in (rx, redirect, inside):
            await r.stop()
