"""Identity end to end: tokens, RBAC and tenant isolation on the running services.

Everything here talks to a real ``Stack`` (nats-server with its authorization
block, JetStream, SQLite projections, the command and query services, the
bootstrap admin) over NATS, as the CLI does; the last test drives the CLI
itself against ``stratus up``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import msgspec
import nats
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stratus.cli.client import Client
from stratus.cli.runtime import Stack
from stratus.events.commands import H_AUTHORIZATION, H_COMMAND_ID, Reply
from stratus.events.errors import Unauthenticated, Unavailable
from stratus.events.identity import UserCreated
from stratus.events.ids import new_id
from stratus.events.natscreds import connect_options
from stratus.events.tenants import TenantCreate
from stratus.handlers.keyring import KeyRing
from stratus.handlers.rbac import CLOUD_TENANT, PERMISSIONS, Rule, Scope
from stratus.handlers.registry import Handler, Special
from stratus.handlers.service import CommandService
from stratus.handlers.tenants import HANDLERS as TENANT_HANDLERS
from stratus.projections.query import Route

pytestmark = pytest.mark.timeout(90)

ADMIN_PASSWORD = "admin-pass-identity"
PASSWORD = "user-pass-identity"
STRATUS = [sys.executable, "-m", "stratus.cli.main"]
# How soon every verifier must honour a revocation (issue 3, item 4).
REVOCATION_S = 1.0

REFUSALS = {"forbidden", "not_found", "unauthenticated"}
# Verbs whose work happens on a host agent this matrix does not run: for
# them "allowed" means past authentication and RBAC (no refusal above).
AFTER_RBAC = {
    "cmd.server.exec",
    # No open offer, no framework's task: an allowed caller passes RBAC and
    # is refused by the decision (conflict, invalid), a refused one never
    # gets that far.
    "cmd.offer.accept",
    "cmd.offer.decline",
    "cmd.task.update",
    "cmd.task.running",
}


# -- harness ------------------------------------------------------------------


class Stacks:
    """Start ``Stack``s on data dirs under tmp_path; whatever still runs is stopped."""

    def __init__(self, root: Path, webhook_allow: tuple[str, ...] = ()) -> None:
        self.root = root
        self.webhook_allow = list(webhook_allow)
        self.running: list[Stack] = []

    async def start(self, data_dir: Path | None = None) -> Stack:
        # No scheduler: its answers to accepted server creates would land at
        # any moment, and these tests count what each command appended.
        s = Stack(
            data_dir or self.root / "data",
            port=0,
            admin_password=ADMIN_PASSWORD,
            scheduler_replicas=0,
            webhook_allow=self.webhook_allow,
        )
        await s.start()
        self.running.append(s)
        return s

    async def stop(self, s: Stack) -> None:
        self.running.remove(s)
        await s.stop()

    async def close(self) -> None:
        for s in reversed(self.running):
            with contextlib.suppress(Exception):
                await s.stop()
        self.running.clear()


@pytest.fixture
async def stacks(tmp_path):
    # The matrix subscribes webhooks to a closed port on loopback, which
    # only an allowed network may be.
    s = Stacks(tmp_path, webhook_allow=("127.0.0.0/8",))
    yield s
    await s.close()


class Cloud:
    """Client connections to a stack, as the CLI makes them: one per token
    (the broker admits a connection by its token), and one without a token
    (``client``: it may only log in).

    ``call`` never raises on a refusal: it returns the reply as the wire has
    it, and a token the broker refuses at connect as an ``unauthenticated``
    reply (what the services would say of it).
    """

    def __init__(self, stack: Stack, client: Client, refusals: list[str] | None = None) -> None:
        self.stack = stack
        self.client = client
        self.nc = client.nc
        self._clients: dict[str, Client] = {}
        # What the broker refused the tokenless connection (its error callback).
        self.refusals = refusals if refusals is not None else []
        self.refused = asyncio.Event()

    async def connection(self, token: str | None) -> Client:
        """The open connection of ``token`` (made, or made again if it was cut)."""
        if token is None:
            return self.client
        c = self._clients.get(token)
        if c is None or not c.nc.is_connected:
            c = self._clients[token] = await Client.connect(self.stack.url, token)
        return c

    async def call(
        self, subject: str, body: Any = None, token: str | None = None, *, raw: bytes | None = None
    ) -> dict:
        headers = {H_COMMAND_ID: new_id()}
        if token is not None:
            headers[H_AUTHORIZATION] = f"Bearer {token}"
        data = raw if raw is not None else json.dumps(body or {}).encode()
        if not token:
            # no token to connect by (an empty one is none): the tokenless connection
            return await self._anonymous(subject, data, headers)
        for attempt in range(2):
            try:
                client = await self.connection(token)
                return json.loads(await client.request_raw(subject, data, dict(headers)))
            except Unauthenticated as err:
                return {"ok": False, "error": {"kind": err.kind, "message": err.message}}
            except Unavailable:
                # Cut while asking (its token was revoked): connect again.
                if (
                    attempt
                    or token is None
                    or self._clients.get(token, self.client).nc.is_connected
                ):
                    raise
        raise AssertionError("unreachable")

    async def _anonymous(self, subject: str, data: bytes, headers: dict[str, str]) -> dict:
        """Without a token: the services' answer, or the broker's refusal to
        let the request out (a permissions violation), as an unauthenticated reply."""
        violation = f'permissions violation for publish to "{subject.lower()}"'
        request = asyncio.ensure_future(self.client.request_raw(subject, data, dict(headers)))
        try:
            while not request.done():
                if any(violation in r for r in self.refusals):
                    message = f"the broker refused {subject} to a connection without a token"
                    return {"ok": False, "error": {"kind": "unauthenticated", "message": message}}
                self.refused.clear()
                waiter = asyncio.ensure_future(self.refused.wait())
                await asyncio.wait([request, waiter], return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
            return json.loads(request.result())
        finally:
            request.cancel()
            self.refusals.clear()

    async def close(self) -> None:
        for c in (*self._clients.values(), self.client):
            with contextlib.suppress(Exception):
                await c.close()
        self._clients.clear()

    async def cmd(self, verb: str, body: dict, token: str | None) -> dict:
        return await self.call(f"cmd.{verb}", body, token)

    async def q(self, view: str, body: dict | None, token: str | None) -> dict:
        return await self.call(f"q.{view}", body or {}, token)

    async def ok(self, subject: str, body: dict | None, token: str | None) -> Any:
        """``subject`` (``cmd.<verb>`` or ``q.<view>``) must succeed; its data."""
        reply = await self.call(subject, body or {}, token)
        assert reply["ok"] is True, (subject, body, reply)
        return reply.get("data")

    async def login(self, user: str, password: str = PASSWORD, tenant: str | None = None) -> dict:
        body = {"user": user, "password": password}
        if tenant is not None:
            body["tenant"] = tenant
        return await self.ok("cmd.auth.login", body, None)

    async def settled(self, token: str, timeout: float = 10) -> dict:
        """Wait (bounded) until the projector has applied everything on the log."""
        deadline = time.monotonic() + timeout
        while True:
            status = await self.ok("q.status", {"digest": False}, token)
            if status["projector_lag"] == 0:
                return status
            assert time.monotonic() < deadline, f"projector did not catch up: {status}"
            await asyncio.sleep(0.02)


def kind(reply: dict) -> str:
    """``ok`` or the error kind of a reply."""
    return "ok" if reply.get("ok") else reply["error"]["kind"]


async def connect(stack: Stack) -> Cloud:
    """A ``Cloud`` whose tokenless connection reports what the broker refuses it."""
    refusals: list[str] = []
    cloud: Cloud | None = None

    async def on_error(exc: Exception) -> None:
        refusals.append(str(exc).lower())
        if cloud is not None:
            cloud.refused.set()

    nc = await nats.connect(
        stack.url, error_cb=on_error, allow_reconnect=False, **connect_options(None)
    )
    cloud = Cloud(stack, Client(nc), refusals)
    return cloud


@pytest.fixture
async def cloud(stacks):
    c = await connect(await stacks.start())
    yield c
    await c.close()


@dataclass
class Who:
    """A signed-in user: the token of one login, and what it speaks for."""

    user: str
    tenant: str
    roles: tuple[str, ...]
    token: str
    token_id: str
    password: str = PASSWORD


async def sign_in(cloud: Cloud, user: str, tenant: str | None = None, password=PASSWORD) -> Who:
    d = await cloud.login(user, password, tenant)
    return Who(d["user"], d["tenant"], tuple(d["roles"]), d["token"], d["token_id"], password)


@dataclass
class World:
    cloud: Cloud
    admin: Who
    people: dict[str, Who]


# The matrix' callers: (name, user, tenant, role). The cloud admin comes last so
# that cloud-only verbs that consume their resource (deleting ta) run after
# everyone else was refused on it.
CALLERS = [
    ("ta-admin", "ann", "ta", "admin"),
    ("ta-member", "mia", "ta", "member"),
    ("ta-reader", "rex", "ta", "reader"),
    ("tb-member", "bob", "tb", "member"),
    ("cloud-admin", "admin", CLOUD_TENANT, "admin"),
]


async def build_world(cloud: Cloud) -> World:
    """Tenants ta and tb; users with one role each; everyone signed in."""
    admin = await sign_in(cloud, "admin", password=ADMIN_PASSWORD)
    t = admin.token
    for tenant in ("ta", "tb"):
        await cloud.ok("cmd.tenant.create", {"name": tenant}, t)
    assignments = [(u, tn, r) for _, u, tn, r in CALLERS if u != "admin"]
    # Scratch users the matrix changes (one per caller, so repeats stay meaningful),
    # one who only logs in, and one with roles in two tenants.
    assignments += [(f"m{i}", "ta", "reader") for i in range(len(CALLERS))]
    assignments += [("lou", "ta", "member"), ("ivy", "ta", "member"), ("ivy", "tb", "member")]

    async def make(user: str) -> None:
        await cloud.ok("cmd.user.create", {"name": user, "password": PASSWORD}, t)

    await asyncio.gather(*(make(u) for u in sorted({u for u, _, _ in assignments})))
    for user, tenant, role in assignments:
        await cloud.ok("cmd.role.assign", {"user": user, "tenant": tenant, "role": role}, t)
    people = {"admin": admin}
    for _, user, tenant, _ in CALLERS:
        if user != "admin":
            people[user] = await sign_in(cloud, user, tenant)
    await cloud.settled(t)
    return World(cloud, admin, people)


@pytest.fixture
async def world(cloud):
    return await build_world(cloud)


async def refused_within(cloud: Cloud, token: str, seconds: float = REVOCATION_S) -> float:
    """Poll with ``token`` until the services refuse it; fail after ``seconds``."""
    t0 = time.monotonic()
    while True:
        reply = await cloud.q("status", {"digest": False}, token)
        if kind(reply) == "unauthenticated":
            return time.monotonic() - t0
        assert reply["ok"], reply
        assert time.monotonic() - t0 < seconds, f"token still accepted after {seconds}s"
        await asyncio.sleep(0.01)


async def accepted(cloud: Cloud, token: str) -> bool:
    reply = await cloud.q("status", {"digest": False}, token)
    assert kind(reply) in ("ok", "unauthenticated"), reply
    return reply["ok"]


# -- 1. the role x command matrix ---------------------------------------------

# One valid body per registered command verb, acting on a resource of tenant ta.
# Each takes the caller's index, so that a verb applied by two allowed callers
# is meaningful both times (m<i> is a scratch user per caller). A verb added to
# the command service without a sample here fails the matrix test.
COMMAND_SAMPLES: dict[str, Callable[[int], dict]] = {
    "auth.login": lambda i: {"user": "lou", "password": PASSWORD, "tenant": "ta"},
    "tenant.create": lambda i: {"name": f"new-{i}", "description": "matrix"},
    "tenant.rename": lambda i: {"tenant": "ta", "name": f"ta-{i}"},
    "tenant.delete": lambda i: {"tenant": "ta"},
    "user.create": lambda i: {"name": f"new-{i}", "password": PASSWORD},
    "user.set-password": lambda i: {"name": f"m{i}", "password": PASSWORD},
    "user.disable": lambda i: {"name": f"m{i}"},
    "user.enable": lambda i: {"name": f"m{i}"},
    "role.assign": lambda i: {"user": f"m{i}", "tenant": "ta", "role": "member"},
    "role.revoke": lambda i: {"user": f"m{i}", "tenant": "ta", "role": "reader"},
    # sent with a fresh token of the caller, which it revokes
    "token.revoke": lambda i: {},
    "key.rotate": lambda i: {},
    "role.create": lambda i: {"name": f"custom-{i}", "permissions": ["events.read"]},
    # the inventory (what each acts on is made by seed_inventory, per index)
    "host.register": lambda i: {"name": f"h-{i}", "vcpus": 8, "ram_mb": 8192, "disk_gb": 50},
    "host.enable": lambda i: {"name": f"hs-{i}"},
    "host.disable": lambda i: {"name": f"hs-{i}", "reason": "matrix"},
    "host.remove": lambda i: {"name": f"hr-{i}"},
    "flavor.create": lambda i: {"name": f"f-{i}", "vcpus": 1, "ram_mb": 64},
    "flavor.delete": lambda i: {"name": f"fd-{i}"},
    "image.create-public": lambda i: {"name": f"pub-{i}"},
    "network.create-external": lambda i: {"name": f"ext-{i}", "cidr": "198.51.100.0/24"},
    # Routed networks never overlap: each sample its own /16.
    "network.create-routed": lambda i: {"name": f"rt-{i}", "cidr": f"10.{100 + i}.0.0/16"},
    "image.create": lambda i: {"tenant": "ta", "name": f"img-{i}"},
    "image.delete": lambda i: {"tenant": "ta", "ref": f"imgd-{i}"},
    "image.upload": lambda i: {
        "tenant": "ta",
        "ref": f"img-{i}",
        "size_bytes": 1,
        "checksum": "a" * 64,
    },
    # Renames to the name a resource has (nothing appended, still allowed or not).
    "image.rename": lambda i: {"tenant": "ta", "ref": "base", "name": "base"},
    "network.rename": lambda i: {"tenant": "ta", "ref": "lan", "name": "lan"},
    "subnet.rename": lambda i: {"tenant": "ta", "ref": "lan-v4", "name": "lan-v4"},
    "router.rename": lambda i: {"tenant": "ta", "ref": f"ra-{i}"},
    "router.set": lambda i: {"tenant": "ta", "ref": f"ra-{i}", "admin_up": True},
    "security-group.ensure-default": lambda i: {"tenant": "ta"},
    "security-group.rename": lambda i: {"tenant": "ta", "ref": "web"},
    "server.create": lambda i: {
        "tenant": "ta",
        "name": f"new-{i}",
        "image": "base",
        "vcpus": 1,
        "ram_mb": 64,
    },
    "server.delete": lambda i: {"tenant": "ta", "ref": f"sd-{i}"},
    "server.reboot": lambda i: {"tenant": "ta", "ref": f"run-{i}"},
    "server.stop": lambda i: {"tenant": "ta", "ref": f"run-{i}"},
    "server.start": lambda i: {"tenant": "ta", "ref": f"off-{i}"},
    # run-i is a VM: an allowed caller passes RBAC and is told exec needs a
    # container (see AFTER_RBAC), a refused one never gets that far.
    "server.exec": lambda i: {"tenant": "ta", "ref": f"run-{i}", "command": ["true"]},
    "server.snapshot": lambda i: {"tenant": "ta", "ref": f"run-{i}", "name": f"snap-{i}"},
    "server-group.create": lambda i: {"tenant": "ta", "name": f"g-{i}", "policy": "affinity"},
    "server-group.delete": lambda i: {"tenant": "ta", "ref": f"gd-{i}"},
    "volume.create": lambda i: {"tenant": "ta", "name": f"v-{i}", "size_gb": 1},
    "volume.delete": lambda i: {"tenant": "ta", "ref": f"vd-{i}"},
    "volume.attach": lambda i: {"tenant": "ta", "volume": f"va-{i}", "server": f"run-{i}"},
    "volume.detach": lambda i: {"tenant": "ta", "volume": f"vt-{i}", "server": f"run-{i}"},
    "network.create": lambda i: {"tenant": "ta", "name": f"n-{i}"},
    "network.delete": lambda i: {"tenant": "ta", "ref": f"nd-{i}"},
    "subnet.create": lambda i: {
        "tenant": "ta",
        "name": f"sn-{i}",
        "network": f"nn-{i}",
        "cidr": "10.9.0.0/24",
    },
    "subnet.delete": lambda i: {"tenant": "ta", "ref": f"snd-{i}"},
    "port.create": lambda i: {"tenant": "ta", "name": f"p-{i}", "network": "lan"},
    "port.delete": lambda i: {"tenant": "ta", "ref": f"pd-{i}"},
    "port.set": lambda i: {"tenant": "ta", "ref": f"ps-{i}", "security_groups": ["default"]},
    "router.create": lambda i: {"tenant": "ta", "name": f"r-{i}"},
    "router.delete": lambda i: {"tenant": "ta", "ref": f"rd-{i}"},
    "router.add-subnet": lambda i: {"tenant": "ta", "router": f"ra-{i}", "subnet": f"sa-{i}"},
    "router.remove-subnet": lambda i: {"tenant": "ta", "router": f"rr-{i}", "subnet": f"sr-{i}"},
    "floating-ip.create": lambda i: {"tenant": "ta", "network": "public"},
    "floating-ip.delete": lambda i: {"tenant": "ta", "ref": SEEDED[f"fip-del-{i}"]},
    "floating-ip.associate": lambda i: {
        "tenant": "ta",
        "floating_ip": SEEDED[f"fip-assoc-{i}"],
        "server": f"run-{i}",
    },
    "floating-ip.disassociate": lambda i: {"tenant": "ta", "ref": SEEDED[f"fip-dis-{i}"]},
    "security-group.create": lambda i: {"tenant": "ta", "name": f"sg-{i}"},
    "security-group.delete": lambda i: {"tenant": "ta", "ref": f"sgd-{i}"},
    "security-group.rule-add": lambda i: {
        "tenant": "ta",
        "security_group": "web",
        "port_min": 1000 + i,
    },
    "security-group.rule-remove": lambda i: {
        "tenant": "ta",
        "security_group": "web",
        "rule": SEEDED[f"rule-{i}"],
    },
    "qos-policy.create": lambda i: {"tenant": "ta", "name": f"q-{i}", "max_kbps": 1000},
    "qos-policy.delete": lambda i: {"tenant": "ta", "ref": f"qd-{i}"},
    "quota.set": lambda i: {"tenant": "ta", "limits": {"instances": 100 + i}},
    "integration.create": lambda i: {"tenant": "ta", "name": f"int-{i}", "secret": "s" * 40},
    "integration.revoke": lambda i: {"tenant": "ta", "ref": f"intr-{i}"},
    "integration.reset": lambda i: {"tenant": "ta", "ref": f"intr-{i}", "start_seq": 1},
    "webhook.create": lambda i: {
        "tenant": "ta",
        "name": f"wh-{i}",
        "url": "http://127.0.0.1:9/",
        "types": ["server.*"],
    },
    "webhook.delete": lambda i: {"tenant": "ta", "ref": f"whd-{i}"},
    "credential.issue": lambda i: {"kind": "compute-agent", "host": f"hc-{i}"},
    "credential.revoke": lambda i: {"id": SEEDED[f"cred-{i}"]},
    # Two-level scheduling (see AFTER_RBAC for the answers to offers).
    "framework.register": lambda i: {"tenant": "ta", "name": f"fw-{i}"},
    "framework.beat": lambda i: {"tenant": "ta", "framework": SEEDED[f"fwb-{i}"]},
    "offer.accept": lambda i: {
        "tenant": "ta",
        "offer": "no-such-offer",
        "host": f"hs-{i}",
        "tasks": [{"name": f"task-{i}", "vcpus": 1, "ram_mb": 64}],
    },
    "offer.decline": lambda i: {"tenant": "ta", "offer": "no-such-offer"},
    "task.update": lambda i: {
        "tenant": "ta",
        "task": f"run-{i}",
        "host": f"hs-{i}",
        "state": "finished",
    },
    "task.running": lambda i: {"tenant": "ta", "task": f"run-{i}"},
}
# Ids and addresses seed_inventory learned (floating IPs and rules have no name).
SEEDED: dict[str, str] = {}


async def seed_inventory(cloud: Cloud, token: str, n: int) -> None:
    """What the inventory samples act on, for caller indexes 0..n, made as the cloud admin."""
    from stratus.events.model import Cause
    from stratus.events.resources import QUOTA_DEFAULTS, ServerRunning, ServerStopped

    async def ok(verb: str, body: dict) -> Any:
        return await cloud.ok(f"cmd.{verb}", body, token)

    def ta(body: dict) -> dict:
        return {"tenant": "ta", **body}

    big = {r: 100_000 for r in QUOTA_DEFAULTS}
    await ok("quota.set", ta({"limits": big}))
    await ok("image.create", ta({"name": "base"}))
    await ok("network.create-external", {"name": "public", "cidr": "203.0.113.0/24"})
    await ok("network.create", ta({"name": "lan"}))
    await ok("subnet.create", ta({"name": "lan-v4", "network": "lan", "cidr": "10.0.0.0/24"}))
    await ok("security-group.create", ta({"name": "web"}))
    store = cloud.stack.store
    for i in range(n + 1):
        for h in (f"hs-{i}", f"hr-{i}"):
            await ok("host.register", {"name": h, "vcpus": 4, "ram_mb": 4096, "disk_gb": 40})
        await ok("flavor.create", {"name": f"fd-{i}", "vcpus": 1, "ram_mb": 64})
        await ok("image.create", ta({"name": f"imgd-{i}"}))
        servers = {}
        for name in (f"sd-{i}", f"run-{i}", f"off-{i}"):
            body = {"name": name, "image": "base", "vcpus": 1, "ram_mb": 64, "networks": ["lan"]}
            servers[name] = await ok("server.create", ta(body))
        # what a compute agent would report
        cause = Cause(actor="compute-agent", correlation_id=new_id(), causation_id=new_id())
        for name, cls in ((f"run-{i}", ServerRunning), (f"off-{i}", ServerRunning)):
            sid = servers[name]["id"]
            await store.append([cause.make(cls, "ta", "server", sid, host=f"hs-{i}")])
        await store.append([cause.make(ServerStopped, "ta", "server", servers[f"off-{i}"]["id"])])
        await ok("server-group.create", ta({"name": f"gd-{i}", "policy": "anti-affinity"}))
        for v in (f"vd-{i}", f"va-{i}", f"vt-{i}"):
            await ok("volume.create", ta({"name": v, "size_gb": 1}))
        await ok("volume.attach", ta({"volume": f"vt-{i}", "server": f"run-{i}"}))
        for net in (f"nd-{i}", f"nn-{i}", f"nsd-{i}", f"na-{i}", f"nr-{i}"):
            await ok("network.create", ta({"name": net}))
        for sub, net in ((f"snd-{i}", f"nsd-{i}"), (f"sa-{i}", f"na-{i}"), (f"sr-{i}", f"nr-{i}")):
            await ok("subnet.create", ta({"name": sub, "network": net, "cidr": "10.5.0.0/24"}))
        for p in (f"pd-{i}", f"ps-{i}"):
            await ok("port.create", ta({"name": p, "network": "lan"}))
        for r in (f"rd-{i}", f"ra-{i}", f"rr-{i}"):
            await ok("router.create", ta({"name": r}))
        await ok("router.add-subnet", ta({"router": f"rr-{i}", "subnet": f"sr-{i}"}))
        for key in ("fip-del", "fip-assoc", "fip-dis"):
            fip = await ok("floating-ip.create", ta({"network": "public"}))
            SEEDED[f"{key}-{i}"] = fip["address"]
        await ok(
            "floating-ip.associate", ta({"floating_ip": SEEDED[f"fip-dis-{i}"], "port": f"pd-{i}"})
        )
        await ok("security-group.create", ta({"name": f"sgd-{i}"}))
        sg = await ok(
            "security-group.rule-add", ta({"security_group": "web", "port_min": 2000 + i})
        )
        SEEDED[f"rule-{i}"] = sg["rules"][-1]["rule"]
        await ok("qos-policy.create", ta({"name": f"qd-{i}", "max_kbps": 100}))
        await ok("integration.create", ta({"name": f"intr-{i}", "secret": "s" * 40}))
        hook = {"name": f"whd-{i}", "url": "http://127.0.0.1:9/", "types": ["*"]}
        await ok("webhook.create", ta(hook))
        SEEDED[f"cred-{i}"] = (await ok("credential.issue", {"kind": "projector"}))["id"]
        fw = await ok("framework.register", ta({"name": f"fwb-{i}"}))
        SEEDED[f"fwb-{i}"] = fw["id"]
    # An open offer for q.offer to show (no host beats here, so the allocator
    # makes none of its own).
    from stratus.events.frameworks import OfferMade

    cause = Cause(actor="test", correlation_id="seed-offer", causation_id="seed-offer")
    made = cause.make(
        OfferMade,
        "ta",
        "offer",
        "of-seed",
        framework=SEEDED["fwb-0"],
        host="hs-0",
        vcpus=1.0,
        ram_mb=64.0,
        disk_gb=0.0,
        expires_at=time.time() + 3600,
    )
    await store.append([made])


FRESH_TOKEN = {"token.revoke", "user.set-password"}
# Verbs that act on the caller's own user: the body names the caller.
ON_SELF = {"user.set-password"}
# Verbs that use up their resource (a tenant; every token of the caller):
# run after every other verb.
RUN_LAST = ("tenant.delete", "user.set-password")

QUERY_SAMPLES: dict[str, dict] = {
    "whoami": {},
    "tenants": {},
    "tenant": {"tenant": "ta"},
    "status": {"digest": False},
    "users": {},
    "roles": {"tenant": "ta"},
    "events": {"tenant": "ta", "limit": 5},
    "audit": {"tenant": "ta", "limit": 5},
    "quota": {"tenant": "ta"},
    "hosts": {},
    "host": {"ref": "hs-0"},
    "flavors": {},
    "flavor": {"ref": "fd-0"},
    **{
        plural: {"tenant": "ta"}
        for plural in (
            "images",
            "servers",
            "server-groups",
            "volumes",
            "networks",
            "subnets",
            "ports",
            "routers",
            "floating-ips",
            "security-groups",
            "qos-policies",
        )
    },
    "image": {"tenant": "ta", "ref": "base"},
    "server": {"tenant": "ta", "ref": "run-0"},
    "server-group": {"tenant": "ta", "ref": "gd-0"},
    "volume": {"tenant": "ta", "ref": "vd-0"},
    "network": {"tenant": "ta", "ref": "lan"},
    "subnet": {"tenant": "ta", "ref": "lan-v4"},
    "port": {"tenant": "ta", "ref": "pd-0"},
    "router": {"tenant": "ta", "ref": "rd-0"},
    "floating-ip": {"tenant": "ta", "ref": "203.0.113.2"},
    "security-group": {"tenant": "ta", "ref": "web"},
    "qos-policy": {"tenant": "ta", "ref": "qd-0"},
    "integrations": {"tenant": "ta"},
    "integration": {"tenant": "ta", "ref": "intr-0"},
    "webhooks": {"tenant": "ta"},
    "webhook": {"tenant": "ta", "ref": "whd-0"},
    "webhook-deliveries": {"tenant": "ta", "ref": "whd-0"},
    "frameworks": {"tenant": "ta"},
    "framework": {"tenant": "ta", "ref": "fwb-0"},
    "offers": {"tenant": "ta"},
    "offer": {"tenant": "ta", "ref": "of-seed"},
}


def expected(rule: Rule, user_tenant: str, roles: tuple[str, ...], resource: str) -> str:
    """What the permission table says, in the issue's words."""
    if rule.scope is Scope.PUBLIC:
        return "ok"
    if user_tenant == CLOUD_TENANT and "admin" in roles:
        return "ok"
    if rule.scope is Scope.CLOUD:
        return "forbidden"
    if rule.scope is Scope.SELF:
        return "ok"
    if user_tenant != resource:
        return "not_found"
    return "ok" if rule.roles & set(roles) else "forbidden"


async def test_role_by_command_matrix_follows_the_permission_table(world):
    cloud, stack = world.cloud, world.cloud.stack
    verbs = sorted(stack.commands.handlers, key=lambda v: (v in RUN_LAST, v))
    views = sorted(stack.queries.routes)

    # every registered verb and query has a sample body and a permission entry
    assert not set(verbs) - COMMAND_SAMPLES.keys(), "add a sample body for these verbs"
    assert not set(views) - QUERY_SAMPLES.keys(), "add a sample body for these queries"
    for v in verbs:
        assert stack.commands.handlers[v].permission in PERMISSIONS, v
    for v in views:
        assert stack.queries.routes[v].permission in PERMISSIONS, v

    callers = [(name, world.people[user]) for name, user, _, _ in CALLERS]
    mismatches: list[str] = []
    await seed_inventory(cloud, world.admin.token, len(callers))
    await cloud.settled(world.admin.token)

    def check(what: str, name: str, want: str, reply: dict) -> None:
        got = kind(reply)
        allowed = got not in REFUSALS
        if want == "ok" and not reply["ok"] and not (what in AFTER_RBAC and allowed):
            mismatches.append(f"{what} as {name}: want allowed and ok, got {got}: {reply}")
        elif want != "ok" and (allowed or got != want):
            mismatches.append(f"{what} as {name}: want {want}, got {got}")
        if not reply["ok"]:
            assert reply.get("data") is None, (what, name, reply)

    # queries first (they read ta; the commands rename and finally delete it)
    for view in views:
        rule = PERMISSIONS[stack.queries.routes[view].permission]
        for name, who in callers:
            reply = await cloud.q(view, QUERY_SAMPLES[view], who.token)
            check(f"q.{view}", name, expected(rule, who.tenant, who.roles, "ta"), reply)
        reply = await cloud.q(view, QUERY_SAMPLES[view], None)
        want = "ok" if rule.scope is Scope.PUBLIC else "unauthenticated"
        check(f"q.{view}", "no token", want, reply)

    for verb in verbs:
        rule = PERMISSIONS[stack.commands.handlers[verb].permission]
        sample = COMMAND_SAMPLES[verb]
        no_token = "ok" if rule.scope is Scope.PUBLIC else "unauthenticated"
        calls = [("no token", None, no_token, sample(len(callers)))]
        calls += [
            (name, who, expected(rule, who.tenant, who.roles, "ta"), sample(i))
            for i, (name, who) in enumerate(callers)
        ]
        for name, who, want, body in calls:
            token = who.token if who else None
            if who and verb in FRESH_TOKEN:
                token = (await sign_in(cloud, who.user, who.tenant, who.password)).token
            before = await stack.store.last_seq()
            if who and verb in ON_SELF:
                # the same password again: later sign-ins still work
                body = {"name": who.user, "password": who.password}
            reply = await cloud.cmd(verb, body, token)
            check(f"cmd.{verb}", name, want, reply)
            if want != "ok":
                # nothing is appended for a refused command
                assert await stack.store.last_seq() == before, (verb, name, reply)

    assert not mismatches, "\n".join(mismatches)
    # and the cloud admin's tenant.delete really removed ta (a new token: the
    # password change voided the old ones)
    admin = world.admin
    token = (await sign_in(cloud, admin.user, admin.tenant, admin.password)).token
    await cloud.settled(token)
    shown = await cloud.ok("q.tenant", {"tenant": "ta"}, token)
    assert shown["status"] == "deleted"


async def test_tenant_views_are_filtered_to_the_callers_tenant(world):
    cloud, p = world.cloud, world.people
    roles = await cloud.ok("q.roles", {}, p["ann"].token)
    assert {r["tenant"] for r in roles} == {"ta"}
    for user, own in (("mia", "ta"), ("bob", "tb")):
        listed = await cloud.ok("q.tenants", {}, p[user].token)
        assert [t["id"] for t in listed] == [own]
        events = await cloud.ok("q.events", {}, p[user].token)
        assert events and {e["tenant"] for e in events} == {own}
        audit = await cloud.ok("q.audit", {}, p[user].token)
        assert {e["tenant"] for e in audit} == {own}
    # the other tenant is not found, by id and by name, and _system is nobody's
    assert kind(await cloud.q("tenant", {"tenant": "tb"}, p["mia"].token)) == "not_found"
    assert kind(await cloud.q("tenant", {"tenant": "nope"}, p["mia"].token)) == "not_found"
    for view in ("events", "audit", "roles"):
        assert kind(await cloud.q(view, {"tenant": "tb"}, p["mia"].token)) == "not_found"
        assert kind(await cloud.q(view, {"tenant": "_system"}, p["ann"].token)) == "not_found"
    # the cloud admin sees every tenant
    listed = await cloud.ok("q.tenants", {}, world.admin.token)
    assert {"admin", "ta", "tb"} <= {t["id"] for t in listed}


# -- 2. no verb without a permission entry ------------------------------------


async def test_a_verb_without_a_permission_entry_is_refused_at_registration(store):
    unlisted = Handler(
        verb="widget.create",
        command=TenantCreate,
        permission="widget.create",
        boundary=lambda c: f"ev.{c.name}.widget.{c.name}",
        initial=dict,
        fold=lambda s, e: s,
        decide=lambda s, c, cause: [],
    )
    with pytest.raises(LookupError, match=r"widget\.create"):
        CommandService(store, [*TENANT_HANDLERS, unlisted])

    async def run(svc, cmd, cause):
        return Reply(ok=True)

    with pytest.raises(LookupError, match=r"widget\.poke"):
        CommandService(store, [Special("widget.poke", TenantCreate, "widget.poke", run)])
    # a verb may not borrow a permission under a misspelt name either
    typo = msgspec.structs.replace(TENANT_HANDLERS[0], verb="tenant.make", permission="tenant.mak")
    with pytest.raises(LookupError):
        CommandService(store, [typo])
    # the same verbs with entries register fine
    assert set(CommandService(store, TENANT_HANDLERS).handlers) == {
        "tenant.create",
        "tenant.rename",
        "tenant.delete",
    }


async def test_the_query_dispatcher_enforces_each_routes_declared_permission(world):
    # Issue 3, item 5: the pattern must make it impossible to add a query that
    # skips the check. A route declares its permission; a route whose run
    # forgets to call the check must still be refused to callers without it.
    cloud, stack = world.cloud, world.cloud.stack

    async def leaky(caller, params, point):
        return {"every_user": ["admin", "ann", "mia"]}

    stack.queries.routes["probe"] = Route(stack.queries.routes["users"].params, leaky, "user.list")
    assert kind(await cloud.q("probe", {}, world.admin.token)) == "ok"
    reply = await cloud.q("probe", {}, world.people["mia"].token)
    assert kind(reply) == "forbidden", reply


# -- 3. tokens the running services refuse ------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(seg: str) -> bytes:
    return base64.urlsafe_b64decode(seg + "=" * (-len(seg) % 4))


async def assert_unauthenticated(cloud: Cloud, token: str) -> None:
    before = await cloud.stack.store.last_seq()
    for reply in (
        await cloud.q("status", {}, token),
        await cloud.q("tenants", {}, token),
        await cloud.cmd("tenant.create", {"name": "forged"}, token),
        await cloud.cmd("role.assign", {"user": "mia", "tenant": "admin", "role": "admin"}, token),
    ):
        assert kind(reply) == "unauthenticated", reply
    assert await cloud.stack.store.last_seq() == before


async def test_tampered_wrong_key_expired_and_future_tokens_are_refused(world, tmp_path):
    cloud = world.cloud
    mia = world.people["mia"]
    assert await accepted(cloud, mia.token)

    # a flipped signature byte
    h, p, s = mia.token.split(".")
    i = len(s) // 2
    await assert_unauthenticated(cloud, f"{h}.{p}.{s[:i]}{'A' if s[i] != 'A' else 'B'}{s[i + 1 :]}")
    # claims raised to the cloud admin, signature kept
    claims = json.loads(_unb64(p))
    raised = {**claims, "tenant": "admin", "roles": ["admin"]}
    await assert_unauthenticated(cloud, f"{h}.{_b64(json.dumps(raised).encode())}.{s}")
    # the signature stripped and the algorithm set to none
    none = _b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    await assert_unauthenticated(cloud, f"{none}.{_b64(json.dumps(raised).encode())}.")
    await assert_unauthenticated(cloud, f"{h}.{p}.")

    # signed by a key this cluster does not know (another ring), and under its kid
    other = KeyRing.load_or_create(tmp_path / "other-keys")
    forged, _ = other.sign("admin", "admin", ["admin"])
    await assert_unauthenticated(cloud, forged)
    cluster = KeyRing.load_or_create(cloud.stack.data_dir / "keys")
    stranger = Ed25519PrivateKey.generate()
    under_our_kid = jwt.encode(
        {**claims, "tenant": "admin", "roles": ["admin"]},
        stranger,
        algorithm="EdDSA",
        headers={"kid": cluster.signing_kid},
    )
    await assert_unauthenticated(cloud, under_our_kid)

    # the cluster's own key: valid now (control), expired, not yet valid
    good, _ = cluster.sign("mia", "ta", ["member"], ttl_s=60)
    assert await accepted(cloud, good)
    expired, _ = cluster.sign("mia", "ta", ["member"], ttl_s=60, now=time.time() - 3600)
    await assert_unauthenticated(cloud, expired)
    future, _ = cluster.sign("mia", "ta", ["member"], ttl_s=3600, now=time.time() + 600)
    await assert_unauthenticated(cloud, future)
    # a not-before claim in the future (the ring's own PEM file signs it)
    pem = (cloud.stack.data_dir / "keys" / f"{cluster.signing_kid}.pem").read_bytes()
    signing_key = serialization.load_pem_private_key(pem, password=None)
    nbf = jwt.encode(
        {**claims, "iat": int(time.time()), "exp": int(time.time()) + 3600, "nbf": 2**31},
        signing_key,
        algorithm="EdDSA",
        headers={"kid": cluster.signing_kid},
    )
    await assert_unauthenticated(cloud, nbf)
    # a short-lived token stops working once expired (leeway: 5 s)
    # (expiry + leeway lands 0.5-1.5 s from now, whatever the fraction of the second)
    short, _ = cluster.sign("mia", "ta", ["member"], ttl_s=1, now=time.time() - 4.5)
    assert await accepted(cloud, short)
    await refused_within(cloud, short, seconds=2.5)

    # and the genuine token still works after all that
    assert await accepted(cloud, mia.token)


async def test_revoked_tokens_are_refused_within_a_second(world):
    cloud, admin = world.cloud, world.admin
    one = await sign_in(cloud, "mia", "ta")
    two = await sign_in(cloud, "mia", "ta")
    three = await sign_in(cloud, "mia", "ta")

    # given mia revokes her own token (the default of `stratus token revoke`)
    await cloud.ok("cmd.token.revoke", {}, one.token)
    # then it is refused within a second, and her other tokens are not
    await refused_within(cloud, one.token)
    assert await accepted(cloud, two.token)
    assert kind(await cloud.cmd("token.revoke", {}, one.token)) == "unauthenticated"

    # a member may not revoke someone else's token
    before = await cloud.stack.store.last_seq()
    reply = await cloud.cmd("token.revoke", {"token_id": world.people["bob"].token_id}, two.token)
    assert kind(reply) == "forbidden", reply
    reply = await cloud.cmd("token.revoke", {"user": "bob"}, two.token)
    assert kind(reply) == "forbidden", reply
    assert await cloud.stack.store.last_seq() == before
    assert await accepted(cloud, world.people["bob"].token)

    # the cloud admin revokes one token by id, then every token of the user
    await cloud.ok("cmd.token.revoke", {"token_id": two.token_id}, admin.token)
    await refused_within(cloud, two.token)
    assert await accepted(cloud, three.token)
    await cloud.ok("cmd.token.revoke", {"user": "mia"}, admin.token)
    await refused_within(cloud, three.token)
    await refused_within(cloud, world.people["mia"].token)
    # the admin's own token is untouched by all this
    assert await accepted(cloud, admin.token)


async def test_disabling_a_user_refuses_their_tokens_and_their_login(world):
    cloud, admin, rex = world.cloud, world.admin, world.people["rex"]
    assert await accepted(cloud, rex.token)
    await cloud.ok("cmd.user.disable", {"name": "rex"}, admin.token)
    await refused_within(cloud, rex.token)
    reply = await cloud.cmd("auth.login", {"user": "rex", "password": PASSWORD}, None)
    assert kind(reply) == "unauthenticated", reply
    # the refused login is in the audit trail, as rex's, with the reason
    failed = await cloud.ok("q.audit", {"actor": "rex", "type": "login.failed"}, admin.token)
    assert [e["data"]["reason"] for e in failed] == ["disabled"]
    # other users are unaffected
    assert await accepted(cloud, world.people["mia"].token)


async def test_removing_a_role_assignment_refuses_tokens_for_that_tenant(world):
    cloud, admin = world.cloud, world.admin
    in_ta = await sign_in(cloud, "ivy", "ta")
    in_tb = await sign_in(cloud, "ivy", "tb")
    await cloud.ok(
        "cmd.role.revoke", {"user": "ivy", "tenant": "ta", "role": "member"}, admin.token
    )
    await refused_within(cloud, in_ta.token)
    assert await accepted(cloud, in_tb.token)
    # and she cannot sign in to ta any more
    reply = await cloud.cmd(
        "auth.login", {"user": "ivy", "password": PASSWORD, "tenant": "ta"}, None
    )
    assert kind(reply) == "forbidden", reply

    # a tenant admin revoking in its own tenant has the same effect
    lou = await sign_in(cloud, "lou", "ta")
    ann = world.people["ann"]
    await cloud.ok("cmd.role.revoke", {"user": "lou", "tenant": "ta", "role": "member"}, ann.token)
    await refused_within(cloud, lou.token)


async def _at_the_start_of_a_second() -> None:
    await asyncio.sleep(1.02 - time.time() % 1)


async def test_a_login_after_the_user_is_re_enabled_gives_a_working_token(world):
    # Given rex was disabled and is enabled again, when rex signs in, the
    # token the login hands out works: `stratus user enable rex; stratus login`
    # must not give rex a token that is refused as "issued before the disable".
    cloud, admin = world.cloud, world.admin
    await _at_the_start_of_a_second()
    await cloud.ok("cmd.user.disable", {"name": "rex"}, admin.token)
    await cloud.ok("cmd.user.enable", {"name": "rex"}, admin.token)
    fresh = await sign_in(cloud, "rex", "ta")
    reply = await cloud.q("tenants", {}, fresh.token)
    assert kind(reply) == "ok", reply


async def test_a_login_after_a_role_change_gives_a_working_token(world):
    # Given mia's role in ta changes from member to reader, when she signs in
    # again (as the refusal of her old token tells her to), the new token works.
    cloud, admin = world.cloud, world.admin
    await _at_the_start_of_a_second()
    await cloud.ok(
        "cmd.role.assign", {"user": "mia", "tenant": "ta", "role": "reader"}, admin.token
    )
    await cloud.ok(
        "cmd.role.revoke", {"user": "mia", "tenant": "ta", "role": "member"}, admin.token
    )
    fresh = await sign_in(cloud, "mia", "ta")
    assert fresh.roles == ("reader",)
    reply = await cloud.q("tenant", {"tenant": "ta"}, fresh.token)
    assert kind(reply) == "ok", reply


async def test_revocations_survive_a_restart_of_the_services(stacks, world):
    cloud, admin, p = world.cloud, world.admin, world.people
    data_dir = cloud.stack.data_dir
    # given: one token revoked, one assignment removed, one user disabled
    revoked = await sign_in(cloud, "mia", "ta")
    await cloud.ok("cmd.token.revoke", {}, revoked.token)
    ivy = await sign_in(cloud, "ivy", "ta")
    await cloud.ok(
        "cmd.role.revoke", {"user": "ivy", "tenant": "ta", "role": "member"}, admin.token
    )
    await cloud.ok("cmd.user.disable", {"name": "rex"}, admin.token)
    for token in (revoked.token, ivy.token, p["rex"].token):
        await refused_within(cloud, token)

    # when the services stop and a new stack starts on the same data dir
    await cloud.close()
    await stacks.stop(cloud.stack)
    again = await connect(await stacks.start(data_dir))
    try:
        # then every revocation still holds, at once
        for token in (revoked.token, ivy.token, p["rex"].token):
            assert kind(await again.q("status", {}, token)) == "unauthenticated"
        assert kind(await again.cmd("auth.login", {"user": "rex", "password": PASSWORD}, None)) == (
            "unauthenticated"
        )
        # tokens never revoked still work (the signing key survived), and a fresh login works
        assert await accepted(again, p["bob"].token)
        assert await accepted(again, admin.token)
        fresh = await sign_in(again, "mia", "ta")
        assert await accepted(again, fresh.token)
        assert kind(await again.q("tenant", {"tenant": "ta"}, fresh.token)) == "ok"
    finally:
        await again.close()


# -- 4. NATS itself refuses a client that tries to write the log --------------


# The server drops what a client may not publish: its request gets no answer.
NO_ANSWER = (nats.errors.TimeoutError, nats.errors.NoRespondersError)


async def client_nc(stack: Stack, token: str | None, errors: list[str]) -> nats.NATS:
    """A raw nats-py connection as a client with ``token``: its own nkey
    (which names its inbox) and the token, as ``Client.connect`` makes it."""

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc).lower())

    return await nats.connect(
        stack.url, error_cb=on_error, allow_reconnect=False, **connect_options(token)
    )


async def test_a_client_connection_cannot_append_or_delete_the_stream(world):
    cloud, stack = world.cloud, world.cloud.stack
    before = await stack.store.last_seq()
    errors: list[str] = []
    # the cloud admin's own connection: its token may do anything, its
    # connection only send commands and queries
    nc = await client_nc(stack, world.admin.token, errors)
    try:
        # a plain publish on an event subject
        await nc.publish("ev.ta.tenant.x", b"forged")
        await nc.flush(timeout=2)
        deadline = time.monotonic() + 2
        while not any("permissions violation" in e for e in errors):
            assert time.monotonic() < deadline, f"no permission violation reported: {errors}"
            await asyncio.sleep(0.02)
        assert "ev.ta.tenant.x" in " ".join(errors)

        js = nc.jetstream(timeout=0.5)
        with pytest.raises(NO_ANSWER):
            await js.publish("ev.ta.tenant.x", b"forged")
        with pytest.raises(NO_ANSWER):
            await js.delete_stream("EVENTS")
        for api in ("STREAM.DELETE.EVENTS", "STREAM.PURGE.EVENTS", "STREAM.MSG.DELETE.EVENTS"):
            with pytest.raises(NO_ANSWER):
                await nc.request(f"$JS.API.{api}", b'{"seq": 1}', timeout=0.5)
        # nor may it read the log or pose as a handler
        got: list[str] = []

        async def sniff(msg) -> None:
            got.append(msg.subject)

        for subject in ("ev.>", "cmd.>", "$JS.API.>"):
            await nc.subscribe(subject, cb=sniff)
        await nc.flush(timeout=2)
        await cloud.ok("cmd.tenant.create", {"name": "after"}, world.admin.token)
        await asyncio.sleep(0.2)
        assert got == []
        assert sum("permissions violation for subscription" in e for e in errors) == 3, errors
    finally:
        await nc.close()

    # the stream is there, holding exactly what the services appended
    info = await stack.store.js.stream_info("EVENTS")
    assert info.config.subjects == ["ev.>"]
    assert await stack.store.last_seq() == before + 1
    assert (await stack.store.read_all(after=before))[0].subject == "ev.after.tenant.after"


async def test_a_client_cannot_make_a_service_publish_its_reply_onto_the_log(world):
    # A request's reply subject is the client's choice; the services answer
    # it with a response permission. A client naming an event subject as its
    # reply must not get anything appended.
    cloud, stack = world.cloud, world.cloud.stack
    before = await stack.store.last_seq()
    nc = await client_nc(stack, world.admin.token, [])
    try:
        await nc.publish("q.status", b"{}", reply="ev.ta.tenant.injected")
        await nc.publish("cmd.tenant.create", b'{"name": "x"}', reply="ev.tb.tenant.injected")
        await nc.flush(timeout=2)
        # both services have answered something after these
        await cloud.ok("q.status", {}, world.admin.token)
        await asyncio.sleep(0.3)
    finally:
        await nc.close()
    appended = await stack.store.read_all(after=before)
    assert [r.subject for r in appended] == []


async def test_a_connection_without_a_token_may_only_log_in(world):
    stack = world.cloud.stack
    errors: list[str] = []
    nc = await client_nc(stack, None, errors)
    try:
        # logging in works
        msg = await nc.request(
            "cmd.auth.login",
            json.dumps({"user": "mia", "password": PASSWORD, "tenant": "ta"}).encode(),
            timeout=5,
        )
        assert kind(json.loads(msg.data)) == "ok"
        # anything else, even with a good token in its header, the broker refuses
        for subject in ("q.status", "cmd.tenant.create", "ctl.projections.swap"):
            with pytest.raises(NO_ANSWER):
                await nc.request(
                    subject,
                    b"{}",
                    timeout=0.5,
                    headers={H_AUTHORIZATION: f"Bearer {world.admin.token}"},
                )
    finally:
        await nc.close()
    assert sum("permissions violation for publish" in e for e in errors) == 3, errors


# -- 5. a wrong password ------------------------------------------------------


def cli_env(config_home: Path, token: str | None = None) -> dict[str, str]:
    env = {
        **os.environ,
        "STRATUS_DATA_DIR": "/nonexistent-stratus",
        "XDG_CONFIG_HOME": str(config_home),
    }
    env.pop("STRATUS_TOKEN", None)
    env.pop("STRATUS_URL", None)
    if token is not None:
        env["STRATUS_TOKEN"] = token
    return env


def run_cli(url: str, config_home: Path, *args: str, token: str | None = None, timeout=30):
    return subprocess.run(
        [*STRATUS, "--url", url, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=cli_env(config_home, token),
        stdin=subprocess.DEVNULL,
    )


async def test_wrong_password_exits_4_is_audited_and_never_stored(world, tmp_path):
    cloud, stack, admin = world.cloud, world.cloud.stack, world.admin
    wrong = "Wr0ng-Secret-Guess-7f3a"
    home = tmp_path / "cfg"
    r = await asyncio.to_thread(
        run_cli, stack.url, home, "login", "--user", "mia", "--password", wrong
    )
    assert r.returncode == 4, (r.stdout, r.stderr)
    assert r.stderr.startswith("error: unauthenticated:")
    assert wrong not in r.stderr + r.stdout
    assert not (home / "stratus" / "token").exists()
    # an unknown user is refused the same way (nothing tells which part was wrong)
    r2 = await asyncio.to_thread(
        run_cli, stack.url, home, "login", "--user", "nobody", "--password", wrong
    )
    assert r2.returncode == 4 and r2.stderr == r.stderr

    # the attempt is in the audit trail as mia's, with no password
    failed = await cloud.ok("q.audit", {"actor": "mia", "type": "login.failed"}, admin.token)
    assert len(failed) == 1
    assert failed[0]["data"] == {"user": "mia", "reason": "bad credentials"}
    assert failed[0]["actor"] == "mia"
    nobody = await cloud.ok("q.audit", {"actor": "nobody"}, admin.token)
    assert [e["type"] for e in nobody] == ["login.failed"]

    # neither the wrong password nor any real one is anywhere on the log...
    records = await stack.store.read_all(headers=True)
    hashes = [r.decode().password_hash for r in records if isinstance(r.decode(), UserCreated)]
    assert len(hashes) >= len(world.people)
    for secret in (wrong, PASSWORD, ADMIN_PASSWORD):
        needle = secret.encode()
        for rec in records:
            assert needle not in rec.data, (secret, rec)
            assert needle not in json.dumps(rec.headers or {}).encode(), (secret, rec)
    # ...nor in any file of the data dir (stream store, projections, logs)
    for path in stack.data_dir.rglob("*"):
        if path.is_file() and path.name != "lock":
            content = path.read_bytes()
            for secret in (wrong, PASSWORD, ADMIN_PASSWORD):
                assert secret.encode() not in content, (secret, path)

    # and no query shows a password hash: they read <redacted>
    outputs = []
    after = 0
    while True:
        page = await cloud.ok("q.events", {"after": after, "limit": 1000}, admin.token)
        outputs.append(page)
        if len(page) < 1000:
            break
        after = page[-1]["seq"]
    created = [e for page in outputs for e in page if e["type"] == "user.created"]
    assert created and all(e["data"]["password_hash"] == "<redacted>" for e in created)
    outputs.append(await cloud.ok("q.audit", {"limit": 1000}, admin.token))
    outputs.append(await cloud.ok("q.audit", {"type": "user.*", "limit": 1000}, admin.token))
    outputs.append(await cloud.ok("q.users", {}, admin.token))
    outputs.append(await cloud.ok("q.roles", {}, admin.token))
    text = json.dumps(outputs)
    for h in hashes:
        assert h not in text
        assert h.split("$")[-1] not in text
    assert "scrypt$" not in text


# -- 6. garbage as a token ----------------------------------------------------

_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
_TEXT = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",)),  # what a str header can carry
    max_size=300,
)


def _jwtish(parts: tuple[Any, Any, bytes]) -> str:
    header, payload, sig = parts
    return ".".join(
        [_b64(json.dumps(header).encode()), _b64(json.dumps(payload).encode()), _b64(sig)]
    )


# The kid the running cluster signs with and a genuine token of it (set by the
# fixture), so that some garbage gets as far as the signature check.
CLUSTER = {"kid": "", "token": ""}
_KID = st.one_of(st.text(max_size=20), st.builds(lambda: CLUSTER["kid"]))


def _mutate(at: int, char: str) -> str:
    """The genuine token with one character changed."""
    token = CLUSTER["token"]
    at %= len(token)
    if token[at] == char:
        char = "A" if char != "A" else "B"
    return token[:at] + char + token[at + 1 :]


TOKENS = st.one_of(
    st.binary(max_size=300).map(lambda b: b.decode("latin-1")),
    st.binary(max_size=300).map(_b64),
    _TEXT,
    _JSON.map(json.dumps),
    st.builds(_mutate, st.integers(0, 2000), st.characters(blacklist_categories=("Cs",))),
    st.tuples(_JSON, _JSON, st.binary(max_size=80)).map(_jwtish),
    st.tuples(
        st.fixed_dictionaries(
            {"alg": st.sampled_from(["EdDSA", "none", "HS256"])},
            optional={"kid": _KID},
        ),
        st.fixed_dictionaries(
            {},
            optional={
                "jti": st.text(max_size=10),
                "sub": st.sampled_from(["admin", "mia", ""]),
                "tenant": st.sampled_from(["admin", "ta", ""]),
                "roles": st.lists(st.sampled_from(["admin", "member", 1]), max_size=2),
                "iat": st.integers(-(2**40), 2**40),
                "exp": st.integers(-(2**40), 2**40),
                "nbf": _JSON,
            },
        ),
        st.binary(min_size=64, max_size=64),
    ).map(_jwtish),
)


@pytest.fixture
async def garbage_target(stacks):
    c = await connect(await stacks.start())
    admin = await sign_in(c, "admin", password=ADMIN_PASSWORD)
    CLUSTER["kid"] = json.loads(_unb64(admin.token.split(".")[0]))["kid"]
    CLUSTER["token"] = admin.token
    yield c, admin
    await c.close()


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(token=TOKENS)
async def test_garbage_bearer_tokens_are_unauthenticated_and_the_services_keep_answering(
    garbage_target, token
):
    cloud, admin = garbage_target
    before = await cloud.stack.store.last_seq()
    for reply in (
        await cloud.q("status", {}, token),
        await cloud.cmd("tenant.create", {"name": "garbage"}, token),
    ):
        assert kind(reply) == "unauthenticated", (token, reply)
    assert await cloud.stack.store.last_seq() == before
    # the services still answer a genuine caller
    assert kind(await cloud.q("status", {"digest": False}, admin.token)) == "ok"


async def test_an_empty_or_non_bearer_authorization_is_unauthenticated(cloud):
    # over a connection the broker admitted by a good token: the services
    # check each request's own header all the same
    admin = await sign_in(cloud, "admin", password=ADMIN_PASSWORD)
    nc = (await cloud.connection(admin.token)).nc
    for value in ("", "Bearer", "Bearer ", "Basic YWRtaW46YWRtaW4=", "bearer", "Token abc"):
        msg = await nc.request("q.status", b"{}", timeout=5, headers={H_AUTHORIZATION: value})
        assert kind(json.loads(msg.data)) == "unauthenticated", value
    msg = await nc.request("cmd.tenant.create", b'{"name": "x"}', timeout=5)
    assert kind(json.loads(msg.data)) == "unauthenticated"


# -- 7. alice and bob, through the CLI ----------------------------------------


class Up:
    """`stratus up` as a child process on a free port."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.proc: subprocess.Popen[str] | None = None

    def start(self, timeout: float = 30) -> str:
        self.proc = subprocess.Popen(
            [
                *STRATUS,
                *("up", "--data-dir", str(self.data_dir), "--port", "0"),
                *("--admin-password", ADMIN_PASSWORD),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
            text=True,
            env=cli_env(self.data_dir / "no-config"),
        )
        deadline = time.monotonic() + timeout
        assert self.proc.stdout is not None
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                raise AssertionError(f"stratus up exited with {self.proc.wait(5)}")
            if "stratus ready" in line:
                return (self.data_dir / "url").read_text().strip()
        raise AssertionError("stratus up did not print ready in time")

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.proc.stdout:
            self.proc.stdout.close()
        self.proc = None
        # a killed `up` cannot stop its broker: do it here so nothing leaks
        for ports in (self.data_dir / "nats").glob("nats-server_*.ports"):
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(ports.stem.split("_")[1]), signal.SIGKILL)


@pytest.fixture
def stratus_up(tmp_path):
    u = Up(tmp_path / "data")
    yield u
    u.stop()


def test_alice_and_bob_through_the_cli(stratus_up, tmp_path):
    url = stratus_up.start()
    homes = {name: tmp_path / f"home-{name}" for name in ("admin", "alice", "bob")}

    def as_(who: str, *args: str, token: str | None = None):
        return run_cli(url, homes[who], *args, token=token)

    def ok(who: str, *args: str):
        r = as_(who, *args)
        assert r.returncode == 0, (who, args, r.stdout, r.stderr)
        return json.loads(r.stdout) if "json" in args else r.stdout

    def refused(who: str, code: int, kind_: str, *args: str, token: str | None = None):
        r = as_(who, *args, token=token)
        assert r.returncode == code, (who, args, r.stdout, r.stderr)
        assert r.stderr.startswith(f"error: {kind_}:"), (who, args, r.stderr)

    # the admin sets up two tenants and one member in each
    ok("admin", "login", "--user", "admin", "--password", ADMIN_PASSWORD)
    ok("admin", "tenant", "create", "ta", "-o", "json")
    ok("admin", "tenant", "create", "tb", "-o", "json")
    for user, tenant in (("alice", "ta"), ("bob", "tb")):
        ok("admin", "user", "create", user, "--password", f"{user}-password")
        ok("admin", "role", "assign", "--user", user, "--tenant", tenant, "--role", "member")
    for user in ("alice", "bob"):
        ok(user, "login", "--user", user, "--password", f"{user}-password", "-o", "json")
    token_file = homes["alice"] / "stratus" / "token"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    alice_token = token_file.read_text().strip()

    # each sees only their own tenant
    assert [t["id"] for t in ok("alice", "tenant", "list", "-o", "json")] == ["ta"]
    assert [t["id"] for t in ok("bob", "tenant", "list", "-o", "json")] == ["tb"]
    assert ok("alice", "tenant", "show", "ta", "-o", "json")["id"] == "ta"
    refused("alice", 1, "not_found", "tenant", "show", "tb")
    refused("bob", 1, "not_found", "tenant", "show", "ta")
    r = as_("alice", "events", "tail", "-o", "json")
    assert r.returncode == 0, r.stderr
    assert {json.loads(line)["tenant"] for line in r.stdout.splitlines()} == {"ta"}

    # alice cannot create tenants, get into tb, nor raise herself in ta; nothing is appended
    before = ok("admin", "status", "-o", "json")["last_seq"]
    refused("alice", 1, "forbidden", "tenant", "create", "tc")
    refused(
        "alice",
        1,
        "not_found",
        "role",
        "assign",
        "--user",
        "alice",
        "--tenant",
        "tb",
        "--role",
        "member",
    )
    refused(
        "alice",
        1,
        "forbidden",
        "role",
        "assign",
        "--user",
        "alice",
        "--tenant",
        "ta",
        "--role",
        "admin",
    )
    refused("alice", 1, "forbidden", "user", "create", "mallory", "--password", "mallory-pw")
    refused("alice", 1, "forbidden", "tenant", "delete", "tb")
    refused("alice", 1, "forbidden", "token", "revoke", "--user", "bob")
    assert ok("admin", "status", "-o", "json")["last_seq"] == before
    assert [t["id"] for t in ok("bob", "tenant", "list", "-o", "json")] == ["tb"]

    # a tampered token exits 4
    h, p, s = alice_token.split(".")
    i = len(s) // 2
    tampered = f"{h}.{p}.{s[:i]}{'A' if s[i] != 'A' else 'B'}{s[i + 1 :]}"
    refused("alice", 4, "unauthenticated", "tenant", "list", token=tampered)
    assert [t["id"] for t in ok("alice", "tenant", "list", "-o", "json")] == ["ta"]

    # after `token revoke` her token exits 4 (within a second)
    ok("alice", "token", "revoke")
    revoked_at = time.monotonic()
    while True:
        started = time.monotonic()
        r = as_("alice", "tenant", "list")
        if r.returncode == 4:
            assert r.stderr.startswith("error: unauthenticated:")
            break
        assert r.returncode == 0, r.stderr
        assert started - revoked_at < REVOCATION_S, "alice's revoked token still works"
    assert [t["id"] for t in ok("bob", "tenant", "list", "-o", "json")] == ["tb"]

    # the admin's audit of alice shows what she did: her login, her revoke
    trail = ok("admin", "audit", "--actor", "alice", "-o", "json")
    assert trail and {e["actor"] for e in trail} == {"alice"}
    assert [e["type"] for e in trail] == ["token.issued", "token.revoked"]
    assert trail[0]["data"]["token_tenant"] == "ta"
    payload = json.loads(_unb64(p))
    assert trail[1]["aggregate"]["id"] == payload["jti"]
    # and what was done to her, by the admin
    granted = ok("admin", "audit", "--resource", "alice", "--type", "role.*", "-o", "json")
    assert [(e["type"], e["actor"], e["data"]["role"]) for e in granted] == [
        ("role.assigned", "admin", "member")
    ]
    # a tenant member may not read the system's audit trail
    refused("bob", 1, "not_found", "audit", "--tenant", "_system")


# -- custom roles ---------------------------------------------------------------


async def test_a_custom_role_grants_its_permissions_in_its_tenant_only(world):
    cloud, admin = world.cloud, world.admin
    # Given a role that may read the log and the audit trail, and nothing else
    await cloud.ok(
        "cmd.role.create",
        {"name": "auditor", "permissions": ["events.read", "audit.read"]},
        admin.token,
    )
    await cloud.ok("cmd.user.create", {"name": "ada", "password": PASSWORD}, admin.token)
    await cloud.ok(
        "cmd.role.assign", {"user": "ada", "tenant": "ta", "role": "auditor"}, admin.token
    )
    ada = await sign_in(cloud, "ada", "ta")
    assert ada.roles == ("auditor",)
    # then she reads ta's events and audit trail...
    events = await cloud.ok("q.events", {"tenant": "ta"}, ada.token)
    assert events and all(e["tenant"] == "ta" for e in events)
    await cloud.ok("q.audit", {"tenant": "ta"}, ada.token)
    # ...but nothing the role does not grant, and nothing of another tenant
    reply = await cloud.q("roles", {"tenant": "ta"}, ada.token)
    assert reply["error"]["kind"] == "forbidden"
    reply = await cloud.q("events", {"tenant": "tb"}, ada.token)
    assert reply["error"]["kind"] == "not_found"
    reply = await cloud.cmd(
        "role.assign", {"user": "ada", "tenant": "ta", "role": "admin"}, ada.token
    )
    assert reply["error"]["kind"] == "forbidden"


async def test_custom_roles_are_checked_when_defined_and_assigned(world):
    cloud, admin = world.cloud, world.admin
    before = await world.cloud.stack.store.last_seq()
    # a cloud-wide permission cannot be granted by a role
    reply = await cloud.cmd(
        "role.create", {"name": "sneaky", "permissions": ["tenant.create"]}, admin.token
    )
    assert reply["error"]["kind"] == "invalid" and "tenant.create" in reply["error"]["message"]
    # a built-in name cannot be redefined
    reply = await cloud.cmd(
        "role.create", {"name": "member", "permissions": ["events.read"]}, admin.token
    )
    assert reply["error"]["kind"] == "already_exists"
    # an undefined role cannot be assigned
    reply = await cloud.cmd(
        "role.assign", {"user": "mia", "tenant": "ta", "role": "ghost"}, admin.token
    )
    assert reply["error"]["kind"] == "not_found"
    assert await world.cloud.stack.store.last_seq() == before


async def test_changing_a_password_voids_old_tokens_and_the_old_password(world):
    cloud, admin = world.cloud, world.admin
    await cloud.ok("cmd.user.create", {"name": "pat", "password": PASSWORD}, admin.token)
    await cloud.ok(
        "cmd.role.assign", {"user": "pat", "tenant": "ta", "role": "member"}, admin.token
    )
    pat = await sign_in(cloud, "pat", "ta")
    # pat may not change someone else's password
    reply = await cloud.cmd("user.set-password", {"name": "mia", "password": "x" * 12}, pat.token)
    assert reply["error"]["kind"] == "forbidden"
    # when pat changes their own
    await cloud.ok("cmd.user.set-password", {"name": "pat", "password": "new-pass-1234"}, pat.token)
    # then the old token is refused within a second, and only the new password works
    deadline = time.monotonic() + 5
    while True:
        reply = await cloud.q("status", {"digest": False}, pat.token)
        if not reply["ok"]:
            break
        assert time.monotonic() < deadline, "the old token still works"
        await asyncio.sleep(0.05)
    assert reply["error"]["kind"] == "unauthenticated"
    old = await cloud.cmd("auth.login", {"user": "pat", "password": PASSWORD}, None)
    assert old["error"]["kind"] == "unauthenticated"
    new = await sign_in(cloud, "pat", "ta", password="new-pass-1234")
    await cloud.ok("q.status", {"digest": False}, new.token)
