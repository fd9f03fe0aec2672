"""The web console against a real ``stratus up --hosts 2``: in Debian's
chromium through Playwright (what a person does), and over plain HTTP (what
an attacker would try).

Each page's screenshot is saved under the test's temporary directory; with
``STRATUS_CONSOLE_DOCS=docs/console`` they are also copied there (the PNGs
the README shows).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import os
import re
import shutil
import signal
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import aiohttp
import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright
from yarl import URL

from stratus.cli.client import Client
from stratus.events.errors import Unauthenticated

from .test_cli import ADMIN_PASSWORD, Up

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
PASSWORDS = {"alice": "alice-secret", "bob": "bob-secret", "carol": "carol-secret"}
SCRIPT = "<script>alert(1)</script>"
T = TypeVar("T")

pytestmark = pytest.mark.timeout(180)


def arun(coro: Awaitable[T]) -> T:
    """Run a coroutine to the end on a thread of its own (Playwright's sync
    API owns this thread's event loop)."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()  # type: ignore[arg-type]


async def _with(url: str, token: str | None, fn: Callable[[Client], Awaitable[T]]) -> T:
    c = await Client.connect(url, token)
    try:
        return await fn(c)
    finally:
        await c.close()


def call(url: str, token: str | None, fn: Callable[[Client], Awaitable[T]]) -> T:
    return arun(_with(url, token, fn))


@dataclass
class Stack:
    nats: str
    console: str  # ends with "/"
    tokens: dict[str, str]
    secret_server: str  # a server of globex

    def last_seq(self) -> int:
        return call(self.nats, self.tokens["admin"], lambda c: c.query("status"))["last_seq"]


async def _populate(url: str) -> tuple[dict[str, str], str, str]:
    async def login(c: Client, user: str, password: str, tenant: str | None = None) -> str:
        body = {"user": user, "password": password} | ({"tenant": tenant} if tenant else {})
        return (await c.command("auth.login", body)).data["token"]

    c = await Client.connect(url)
    try:
        c.token = admin = await login(c, "admin", ADMIN_PASSWORD)
        console_url = (await c.query("status"))["console_url"]
        await c.command("tenant.create", {"name": "acme", "description": "Acme's web shop"})
        await c.command("tenant.create", {"name": "globex", "description": SCRIPT})
        await c.command(
            "network.create-external",
            {"name": "public", "external": True, "cidr": "203.0.113.0/24"},
        )
        for tenant in ("acme", "globex"):
            await c.command("image.create", {"name": "cirros", "tenant": tenant})
        await c.command("network.create", {"name": "lan", "tenant": "acme"})
        await c.command(
            "subnet.create",
            {"name": "lan-v4", "network": "lan", "cidr": "10.0.0.0/24", "tenant": "acme"},
        )
        await c.command(
            "router.create", {"name": "edge", "external_network": "public", "tenant": "acme"}
        )
        await c.command(
            "router.add-subnet", {"router": "edge", "subnet": "lan-v4", "tenant": "acme"}
        )
        # A server already running in acme, with a floating IP.
        await c.command(
            "server.create",
            {
                "name": "db-1",
                "image": "cirros",
                "vcpus": 2,
                "ram_mb": 1024,
                "networks": ["lan"],
                "tenant": "acme",
            },
        )
        fip = await c.command("floating-ip.create", {"network": "public", "tenant": "acme"})
        await c.command(
            "floating-ip.associate",
            {"floating_ip": fip.data["address"], "server": "db-1", "tenant": "acme"},
        )
        for user, password in PASSWORDS.items():
            await c.command("user.create", {"name": user, "password": password})
        for user, tenant, role in (
            ("alice", "acme", "member"),
            ("bob", "globex", "member"),
            ("carol", "acme", "member"),
            ("carol", "globex", "reader"),
        ):
            await c.command("role.assign", {"user": user, "tenant": tenant, "role": role})
        tokens = {"admin": admin}
        for user, tenant in (("alice", "acme"), ("bob", "globex")):
            tokens[user] = await login(c, user, PASSWORDS[user], tenant)
        c.token = tokens["bob"]
        secret = await c.command(
            "server.create",
            {"name": "secret-1", "image": "cirros", "vcpus": 1, "ram_mb": 256, "tenant": "globex"},
        )
        return tokens, console_url, secret.data["id"]
    finally:
        await c.close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("console")
    up = Up(tmp / "data", "--hosts", "2", "--console-port", "0")
    try:
        url = up.start(timeout=60)
        tokens, console_url, secret = arun(_populate(url))
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/", console_url), console_url
        yield Stack(url, console_url, tokens, secret)
        rc, _ = up.stop()
        assert rc == 0
    finally:
        up.kill()
        # A killed `up` cannot stop its broker: do it here so nothing leaks.
        for ports in (tmp / "data" / "nats").glob("nats-server_*.ports"):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(ports.stem.split("_")[1]), signal.SIGKILL)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def shots(tmp_path) -> Callable[[Page, str], Path]:
    """Save a page's screenshot under the test's directory (and into the
    docs folder STRATUS_CONSOLE_DOCS names)."""
    docs = os.environ.get("STRATUS_CONSOLE_DOCS")

    def shot(page: Page, name: str) -> Path:
        path = tmp_path / f"{name}.png"
        page.screenshot(path=str(path), full_page=True)
        assert path.stat().st_size > 5000
        if docs:
            Path(docs).mkdir(parents=True, exist_ok=True)
            shutil.copy(path, Path(docs) / path.name)
        return path

    return shot


@dataclass
class Visit:
    page: Page
    requests: list[str]
    dialogs: list[str]


@pytest.fixture
def visit(browser) -> Iterator[Callable[[], Visit]]:
    """A fresh browser context (no cookies) recording every request and
    every dialog (a script that ran would open one)."""
    contexts = []

    def open_() -> Visit:
        ctx = browser.new_context(viewport={"width": 1280, "height": 860})
        contexts.append(ctx)
        page = ctx.new_page()
        page.set_default_timeout(20_000)
        v = Visit(page, [], [])
        page.on("request", lambda r: v.requests.append(r.url))
        page.on("dialog", lambda d: (v.dialogs.append(d.message), d.dismiss()))
        return v

    yield open_
    for ctx in contexts:
        ctx.close()


def sign_in(page: Page, user: str, password: str, tenant: str = "") -> None:
    page.fill('input[name="user"]', user)
    page.fill('input[name="password"]', password)
    page.fill('input[name="tenant"]', tenant)
    page.click('form[action="/login"] button[type="submit"]')


def test_member_creates_a_server_and_follows_it_through_the_pages(stack, visit, shots):
    v = visit()
    page = v.page
    before = stack.last_seq()

    # A bookmark opened signed out goes through the login form and back.
    page.goto(stack.console + "t/acme/servers")
    expect(page).to_have_url(re.compile(r"/login\?next=/t/acme/servers$"))
    shots(page, "login")
    sign_in(page, "alice", PASSWORDS["alice"], "acme")
    expect(page).to_have_url(stack.console + "t/acme/servers")
    expect(page.locator("#live-state")).to_have_text("live")
    page.evaluate("window.stratusMarker = 42")

    # Created through the form; the row follows the log to running, live.
    page.fill('#create-server input[name="name"]', "web-1")
    page.select_option('#create-server select[name="size"]', "1x256")
    page.select_option('#create-server select[name="network"]', label="lan")
    page.click('#create-server button[type="submit"]')
    row = page.locator("table#servers tbody tr", has_text="web-1")
    expect(row.locator("td.status")).to_have_text("running", timeout=30_000)
    expect(row.locator("td.host")).to_have_text(re.compile(r"^host-0[12]$"))
    expect(row.locator("td.addresses")).to_have_text(re.compile(r"^10\.0\.0\.\d+$"))
    # Another's server appears, runs and goes, still without a reload.
    made = call(
        stack.nats,
        stack.tokens["admin"],
        lambda c: c.command(
            "server.create",
            {"name": "web-2", "image": "cirros", "vcpus": 1, "ram_mb": 512, "tenant": "acme"},
        ),
    )
    other = page.locator(f'table#servers tr[data-server-id="{made.data["id"]}"]')
    expect(other.locator("td.status")).to_have_text("running", timeout=30_000)
    shots(page, "servers")
    call(
        stack.nats,
        stack.tokens["admin"],
        lambda c: c.command("server.delete", {"ref": made.data["id"], "tenant": "acme"}),
    )
    expect(other).to_have_count(0, timeout=30_000)
    assert page.evaluate("window.stratusMarker") == 42  # the page was never reloaded

    # Its timeline, with the scheduler's reasons.
    row.locator("td.name a").click()
    expect(page.locator("h1")).to_contain_text("web-1")
    server_id = page.url.rstrip("/").rsplit("/", 1)[1]
    scheduled = page.locator('#timeline li[data-type="server.scheduled"]')
    expect(scheduled.locator(".reason")).to_have_text(
        re.compile(r"^on host-0[12]: 2/2 hosts passed")
    )
    expect(scheduled.locator(".considered")).to_have_text("2 hosts considered, 2 passed")
    expect(scheduled.locator(".top")).to_contain_text("top weights: host-0")
    expect(scheduled.locator(".cause")).to_contain_text("caused by server.requested")
    expect(page.locator('#timeline li[data-type="server.requested"]')).to_contain_text("by alice")
    expect(page.locator('#timeline li[data-type="server.running"]')).to_contain_text(
        "by compute-agent:host-0"
    )
    shots(page, "server")

    # The network drawn: the server in the SVG, joined to its network.
    page.click("header nav >> text=Network")
    node = page.locator(f'svg#topology g.node.server[data-id="{server_id}"]')
    expect(node).to_contain_text("web-1")
    expect(node).to_contain_text("running")
    expect(page.locator(f'svg#topology path.edge[data-to="{server_id}"]')).to_have_count(1)
    expect(page.locator("svg#topology g.node.router")).to_contain_text("edge")
    shots(page, "topology")

    # Back before the server existed: the page says it shows the past.
    page.click("header nav >> text=Servers")
    page.fill('form.timetravel input[name="at"]', str(before))
    page.click('form.timetravel button[type="submit"]')
    expect(page).to_have_url(re.compile(rf"/t/acme/servers\?at={before}$"))
    expect(page.locator("#past-banner")).to_contain_text("This page shows the past")
    expect(page.locator("#past-banner")).to_contain_text(f"as of log sequence {before}")
    expect(page.locator("table#servers")).not_to_contain_text("web-1")
    expect(page.locator("#create-server")).to_have_count(0)
    shots(page, "time-travel")
    page.click("#past-banner a")
    expect(page.locator("table#servers")).to_contain_text("web-1")

    # The audit trail, filtered.
    page.click("header nav >> text=Audit")
    page.fill('#audit-filters input[name="type"]', "server.*")
    page.click('#audit-filters button[type="submit"]')
    expect(page.locator("table#audit tbody tr").first).to_be_visible()
    types = page.locator("table#audit tbody td:nth-child(4)").all_inner_texts()
    assert types and all(t.startswith("server.") for t in types)
    assert "server.requested" in types and "server.running" in types
    shots(page, "audit")

    # Signing out revokes the token and leads back to the login form.
    token = next(c["value"] for c in page.context.cookies() if c["name"] == "stratus_token")
    page.click('form.signout button[type="submit"]')
    expect(page).to_have_url(re.compile(r"/login\?why=signed\+out$"))
    page.goto(stack.console + "t/acme/servers")
    expect(page).to_have_url(re.compile(r"/login\?next="))
    with pytest.raises(Unauthenticated):
        call(stack.nats, token, lambda c: c.query("whoami"))

    # Everything the pages used came from the console itself.
    assert v.requests and all(u.startswith(stack.console) for u in v.requests), v.requests
    assert v.dialogs == []


def test_cloud_admin_sees_hosts_tenants_and_users(stack, visit, shots):
    page = visit().page
    page.goto(stack.console)
    sign_in(page, "admin", ADMIN_PASSWORD)
    expect(page).to_have_url(stack.console + "t/admin/")

    page.goto(stack.console + "t/acme/")
    expect(page.locator("h1")).to_contain_text("acme")
    expect(page.locator("#tenant-description")).to_have_text("Acme's web shop")
    expect(page.locator("[data-quota] meter")).to_have_count(5)
    expect(page.locator('[data-quota="networks"] .bar-figure')).to_have_text("1 of 10")
    shots(page, "overview")

    page.click("header nav >> text=Hosts")
    hosts = page.locator("table#hosts tbody tr")
    expect(hosts).to_have_count(2)
    for name in ("host-01", "host-02"):
        row = page.locator(f'table#hosts tr[data-host="{name}"]')
        expect(row).to_contain_text("alive")
        expect(row.locator("meter")).to_have_count(2)
        expect(row).to_contain_text("of 64")  # 16 vCPUs x 4.0
    shots(page, "hosts")

    page.click("header nav >> text=Tenants")
    expect(page.locator('table#tenants tr[data-tenant="globex"]')).to_contain_text(SCRIPT)
    shots(page, "tenants")
    page.click("header nav >> text=Users")
    expect(page.locator('table#users tr[data-user="carol"]')).to_contain_text("globex: reader")
    shots(page, "users")


def test_a_script_in_a_description_is_text_and_never_runs(stack, visit):
    v = visit()
    page = v.page
    page.goto(stack.console + "login")
    sign_in(page, "admin", ADMIN_PASSWORD)
    expect(page).to_have_url(stack.console + "t/admin/")
    for path in ("t/globex/", "admin/tenants"):
        page.goto(stack.console + path)
        page.wait_for_load_state("load")
        scripts = page.evaluate("[...document.scripts].map(s => s.src || s.textContent)")
        assert scripts == [stack.console + "static/console.js"]
    page.goto(stack.console + "t/globex/")
    expect(page.locator("#tenant-description")).to_have_text(SCRIPT)
    page.wait_for_timeout(300)  # time for a dialog, had anything run
    assert v.dialogs == []


# -- over plain HTTP, as an attacker would -------------------------------------------------


async def _session(console: str, user: str, tenant: str) -> tuple[aiohttp.ClientSession, str]:
    """A signed-in cookie jar, and the CSRF token of its pages."""
    s = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
    page = await (await s.get(console + "login")).text()
    csrf = re.search(r'name="csrf" value="([0-9a-f]+)"', page).group(1)
    password = PASSWORDS.get(user, ADMIN_PASSWORD)
    r = await s.post(
        console + "login",
        data={"user": user, "password": password, "tenant": tenant, "csrf": csrf},
        allow_redirects=False,
    )
    assert r.status == 303, await r.text()
    page = await (await s.get(console + f"t/{tenant}/servers")).text()
    return s, re.search(r'name="csrf" value="([0-9a-f]+)"', page).group(1)


def test_forms_without_the_csrf_token_change_nothing(stack):
    async def main() -> None:
        s, csrf = await _session(stack.console, "alice", "acme")
        origin = stack.console.rstrip("/")
        form = {"name": "csrf-1", "image": "cirros", "size": "1x256", "type": "vm"}
        try:
            before = stack.last_seq()
            for data, headers in (
                (form, {"Origin": origin}),  # no token
                ({**form, "csrf": "0" * 64}, {"Origin": origin}),  # a wrong one
                ({**form, "csrf": csrf}, {"Origin": "http://evil.example"}),  # from elsewhere
            ):
                r = await s.post(
                    stack.console + "t/acme/servers",
                    data=data,
                    headers=headers,
                    allow_redirects=False,
                )
                assert r.status == 403
                assert "CSRF" in await r.text()
            r = await s.post(stack.console + "logout", data={}, allow_redirects=False)
            assert r.status == 403
            assert stack.last_seq() == before  # no event, no revocation
            # The same form with its token is accepted: the token is what was missing.
            r = await s.post(
                stack.console + "t/acme/servers",
                data={**form, "csrf": csrf},
                headers={"Origin": origin},
                allow_redirects=False,
            )
            assert r.status == 303 and r.headers["Location"].endswith("created=csrf-1")
        finally:
            await s.close()
        anon = aiohttp.ClientSession()
        try:
            r = await anon.post(
                stack.console + "login",
                data={"user": "alice", "password": "x"},
                allow_redirects=False,
            )
            assert r.status == 403
        finally:
            await anon.close()

    arun(main())


def test_a_member_cannot_see_another_tenants_pages(stack):
    secret = stack.secret_server

    async def main() -> None:
        s, _ = await _session(stack.console, "alice", "acme")
        try:
            for path in (
                f"t/globex/servers/{secret}",
                f"t/acme/servers/{secret}",
                "t/globex/",
                "t/globex/servers",
                "t/globex/topology",
                "t/globex/audit",
                "t/globex/live",
                "admin/hosts",
                "admin/users",
                "admin/tenants",
            ):
                r = await s.get(stack.console + path, allow_redirects=False)
                text = await r.text()
                assert r.status in (403, 404), (path, r.status)
                # Nothing of it shows (its id only where the page repeats the URL).
                assert "secret-1" not in text and "host-0" not in text, path
            r = await s.get(stack.console + f"t/acme/audit?resource={secret}")
            assert r.status == 200 and "<tr data-seq=" not in await r.text()
            r = await s.get(stack.console + "t/acme/audit")  # the same page has rows of acme
            assert r.status == 200 and "<tr data-seq=" in await r.text()
        finally:
            await s.close()

    arun(main())


async def _frames(resp: aiohttp.ClientResponse, until: Callable[[list[dict]], bool]) -> list[dict]:
    """Server-sent events of a stream, until ``until`` holds (or 30 s)."""
    got: list[dict] = []
    event = ""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not until(got):
        try:
            line = await asyncio.wait_for(resp.content.readline(), deadline - time.monotonic())
        except TimeoutError:
            break
        text = line.decode().rstrip("\n")
        if text.startswith("event: "):
            event = text[7:]
        elif text.startswith("data: "):
            got.append({"event": event, **json.loads(text[6:])})
    return got


def test_live_events_stay_within_the_callers_tenant(stack):
    async def main() -> None:
        s, _ = await _session(stack.console, "alice", "acme")
        try:
            start = stack.last_seq()
            resp = await s.get(stack.console + f"t/acme/live?after={start}")
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            bob = await Client.connect(stack.nats, stack.tokens["bob"])
            admin = await Client.connect(stack.nats, stack.tokens["admin"])
            try:
                theirs = await bob.command(
                    "server.create",
                    {
                        "name": "globex-2",
                        "image": "cirros",
                        "vcpus": 1,
                        "ram_mb": 256,
                        "tenant": "globex",
                    },
                )
                ours = await admin.command(
                    "server.create",
                    {
                        "name": "acme-live",
                        "image": "cirros",
                        "vcpus": 1,
                        "ram_mb": 256,
                        "tenant": "acme",
                    },
                )
            finally:
                await bob.close()
                await admin.close()
            mine = ours.data["id"]
            frames = await _frames(
                resp,
                lambda got: any(f.get("id") == mine and f.get("status") == "running" for f in got),
            )
            resp.close()
            assert any(f.get("id") == mine and f["status"] == "running" for f in frames), frames
            ids = {f.get("id") for f in frames if f["event"] == "server"}
            assert ids == {mine}
            assert theirs.data["id"] not in json.dumps(frames)
            # Asking for the other tenant's stream is refused outright.
            r = await s.get(stack.console + "t/globex/live")
            assert r.status == 404
        finally:
            await s.close()

    arun(main())


def test_the_tenant_switcher_signs_in_again_for_another_tenant(stack):
    async def main() -> None:
        s, _ = await _session(stack.console, "carol", "acme")
        try:
            page = await (await s.get(stack.console + "t/acme/")).text()
            options = re.findall(r'<option value="([a-z0-9-]+)"', page)
            assert options == ["acme", "globex"]
            old = s.cookie_jar.filter_cookies(URL(stack.console))["stratus_token"].value
            r = await s.get(stack.console + "switch?tenant=globex", allow_redirects=False)
            assert r.status == 303 and "tenant=globex" in r.headers["Location"]
            form = await (await s.get(stack.console + r.headers["Location"].lstrip("/"))).text()
            assert 'name="tenant" value="globex"' in form and 'name="user" value="carol"' in form
            csrf = re.search(r'name="csrf" value="([0-9a-f]+)"', form).group(1)
            r = await s.post(
                stack.console + "login",
                data={
                    "user": "carol",
                    "password": PASSWORDS["carol"],
                    "tenant": "globex",
                    "csrf": csrf,
                    "next": "/t/globex/",
                },
                allow_redirects=False,
            )
            assert r.status == 303 and r.headers["Location"] == "/t/globex/"
            r = await s.get(stack.console + "t/globex/")
            assert r.status == 200 and "globex" in await r.text()
        finally:
            await s.close()
        # The token it replaced is revoked, not merely forgotten.
        with pytest.raises(Unauthenticated):
            await _with(stack.nats, old, lambda c: c.query("whoami"))

    arun(main())


def test_the_audit_trail_pages_back_and_forth(stack):
    async def main() -> None:
        s, _ = await _session(stack.console, "alice", "acme")

        async def page(path: str) -> tuple[list[int], dict[str, str]]:
            text = await (await s.get(stack.console + path.lstrip("/"))).text()
            seqs = [int(x) for x in re.findall(r'<tr data-seq="(\d+)">', text)]
            links = {
                rel: href.replace("&amp;", "&")
                for href, rel in re.findall(r'<a href="([^"]+)" rel="(prev|next)">', text)
            }
            return seqs, links

        try:
            first, links = await page("/t/acme/audit?limit=5")
            assert len(first) == 5 and first == sorted(first, reverse=True)
            assert "prev" not in links  # the newest page
            second, links = await page(links["next"])
            assert len(second) == 5 and max(second) < min(first)
            assert second == sorted(second, reverse=True)
            back, _ = await page(links["prev"])
            assert back == first
            # Paging back within a point in time stays in that past.
            past, links = await page(f"/t/acme/audit?limit=5&at={second[0]}")
            assert past == second
            older, _ = await page(links["next"])
            assert older and max(older) < min(second)
        finally:
            await s.close()

    arun(main())


def test_every_response_carries_the_security_headers(stack):
    async def main() -> None:
        async with aiohttp.ClientSession() as s:
            for path, status in (
                ("login", 200),
                ("static/console.js", 200),
                ("static/nowhere.js", 404),
                ("t/acme/", 303),  # signed out: to the login form
            ):
                r = await s.get(stack.console + path, allow_redirects=False)
                assert r.status == status
                csp = r.headers["Content-Security-Policy"]
                assert "script-src 'self'" in csp and "default-src 'none'" in csp
                assert "unsafe-inline" not in csp
                assert r.headers["X-Frame-Options"] == "DENY"
            r = await s.get(stack.console + "login")
            cookie = r.headers["Set-Cookie"]
            assert "HttpOnly" in cookie and "SameSite=Strict" in cookie

    arun(main())
