"""The OpenStack API refuses bad input as each service would, and appends
nothing: malformed JSON, unknown fields, wrong types, oversized bodies,
missing and expired tokens, another tenant's token, traversal in ids.

Given a running stack, when an attacker sends X, then the answer is status S
in the service's own fault format, and the log's last sequence has not moved.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aiohttp
import pytest
import yarl

from stratus.cli.client import Client
from stratus.cli.runtime import Stack
from stratus.handlers.keyring import KeyRing

PASSWORD = "admin-pass-for-tests"
USER_PASSWORD = "user-secret"


class Env:
    def __init__(self, stack: Stack, admin: Client, http: aiohttp.ClientSession) -> None:
        self.stack = stack
        self.admin = admin
        self.http = http
        self.base = stack.openstack_api.base_url
        self.tokens: dict[str, str] = {}

    async def last_seq(self) -> int:
        return (await self.admin.query("status", {"digest": False}))["last_seq"]

    async def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        token: str | None = "alice",
        raw: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, Any, str]:
        h = dict(headers or {})
        if token is not None:
            h["X-Auth-Token"] = self.tokens.get(token, token)
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        if data is not None:
            h.setdefault("Content-Type", "application/json")
        # Sent as written: no client-side normalisation of ".." or "%2F".
        url = yarl.URL(self.base + path, encoded=True)
        async with self.http.request(method, url, data=data, headers=h) as r:
            text = await r.text()
            try:
                parsed = json.loads(text) if text else None
            except ValueError:
                parsed = None
            return r.status, parsed, text


@pytest.fixture
async def env(tmp_path):
    stack = Stack(tmp_path / "data", port=0, admin_password=PASSWORD, openstack_port=0)
    url = await stack.start()
    admin = await Client.connect(url)
    admin.token = (await admin.command("auth.login", {"user": "admin", "password": PASSWORD})).data[
        "token"
    ]
    for verb, body in (
        ("tenant.create", {"name": "acme"}),
        ("tenant.create", {"name": "other"}),
        ("user.create", {"name": "alice", "password": USER_PASSWORD}),
        ("user.create", {"name": "bob", "password": USER_PASSWORD}),
        ("role.assign", {"user": "alice", "tenant": "acme", "role": "member"}),
        ("role.assign", {"user": "bob", "tenant": "other", "role": "member"}),
        ("flavor.create", {"name": "m1", "vcpus": 1, "ram_mb": 256}),
        ("quota.set", {"tenant": "acme", "limits": {"networks": 2, "instances": 1}}),
    ):
        await admin.command(verb, body)
    async with aiohttp.ClientSession() as http:
        e = Env(stack, admin, http)
        for user in ("alice", "bob"):
            login = {"user": user, "password": USER_PASSWORD}
            e.tokens[user] = (await admin.command("auth.login", login)).data["token"]
        try:
            yield e
        finally:
            await admin.close()
            await stack.stop()


async def _network(env: Env, name: str = "lan") -> str:
    status, body, text = await env.call(
        "POST", "/network/v2.0/networks", {"network": {"name": name}}
    )
    assert status == 201, text
    return body["network"]["id"]


async def _settled(env: Env, server: str, status: str, timeout: float = 20) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        code, body, _ = await env.call("GET", f"/compute/v2.1/servers/{server}")
        if code == 200 and body["server"]["status"] == status:
            return body["server"]
        await asyncio.sleep(0.05)
    raise AssertionError(f"server {server} not {status} within {timeout}s")


def neutron_fault(body: Any, kind: str) -> str:
    assert body["NeutronError"]["type"] == kind, body
    return body["NeutronError"]["message"]


def nova_fault(body: Any, key: str, code: int) -> str:
    assert body[key]["code"] == code, body
    return body[key]["message"]


async def test_malformed_unknown_and_mistyped_bodies_are_400_and_append_nothing(env: Env) -> None:
    before = await env.last_seq()
    cases = [
        ("POST", "/network/v2.0/networks", b'{"network": {"name": "x"'),  # cut short
        ("POST", "/network/v2.0/networks", b"[1, 2"),
        ("POST", "/network/v2.0/networks", json.dumps({"network": {"name": "x", "bogus": 1}})),
        ("POST", "/network/v2.0/networks", json.dumps({"network": {"name": 5}})),
        ("POST", "/network/v2.0/networks", json.dumps({"network": {"name": "a b"}})),
        ("POST", "/network/v2.0/subnets", json.dumps({"subnet": {"network_id": "../x"}})),
        ("POST", "/network/v2.0/ports", json.dumps({"port": {"network_id": 7}})),
    ]
    for method, path, raw in cases:
        data = raw if isinstance(raw, bytes) else raw.encode()
        status, body, text = await env.call(method, path, raw=data)
        assert status == 400, (raw, text)
        neutron_fault(body, "BadRequest")
    # The field is named.
    status, body, _ = await env.call("POST", "/network/v2.0/networks", {"network": {"name": 5}})
    assert "$.network.name" in neutron_fault(body, "BadRequest")
    server = {"name": "s", "imageRef": "i", "flavorRef": "m1"}
    for bad in (
        {"server": {**server, "bogus": True}},
        {"server": {**server, "name": ["list"]}},
        {"server": {**server, "name": ""}},
        {"server": {**server, "metadata": {"k": 1}}},
        {"servers": server},
    ):
        status, body, text = await env.call("POST", "/compute/v2.1/servers", bad)
        assert status == 400, (bad, text)
        nova_fault(body, "badRequest", 400)
    status, body, text = await env.call("POST", "/v3/auth/tokens", raw=b"{not json", token=None)
    assert status == 400 and body["error"]["code"] == 400, text
    status, _, text = await env.call(
        "POST", "/image/v2/images", {"name": "x", "disk_format": "vmdk"}
    )
    assert status == 400 and text.startswith("400 Bad Request"), text
    assert await env.last_seq() == before


async def test_oversized_bodies_are_413(env: Env) -> None:
    before = await env.last_seq()
    big = json.dumps({"network": {"name": "x", "description": "d" * 100_000}}).encode()
    status, body, text = await env.call("POST", "/network/v2.0/networks", raw=big)
    assert status == 413, text
    neutron_fault(body, "RequestEntityTooLarge")
    status, body, text = await env.call(
        "POST", "/compute/v2.1/servers", raw=b'{"server": {"name": "' + b"n" * 70_000 + b'"}}'
    )
    assert status == 413, text
    nova_fault(body, "overLimit", 413)
    assert await env.last_seq() == before


async def test_missing_bad_and_expired_tokens_are_401_in_each_format(env: Env) -> None:
    before = await env.last_seq()
    keys = KeyRing.load_or_create(env.stack.data_dir / "keys")
    # Signed with the real key, but it expired an hour ago.
    expired, _ = keys.sign("alice", "acme", ["member"], ttl_s=60, now=time.time() - 3600)
    forged = env.tokens["alice"][:-4] + (
        "AAAA" if not env.tokens["alice"].endswith("AAAA") else "BBBB"
    )
    for token in (None, "", "not-a-jwt", expired, forged):
        status, body, text = await env.call("GET", "/compute/v2.1/servers", token=token)
        assert status == 401, (token, text)
        nova_fault(body, "unauthorized", 401)
        status, body, text = await env.call(
            "POST", "/network/v2.0/networks", {"network": {}}, token=token
        )
        assert status == 401, text
        neutron_fault(body, "NotAuthorized")
        status, _, text = await env.call("GET", "/image/v2/images", token=token)
        assert status == 401 and text.startswith("401 Unauthorized"), text
        status, body, text = await env.call("GET", "/v3/auth/catalog", token=token)
        assert status == 401 and body["error"]["title"] == "Unauthorized", text
    assert await env.last_seq() == before


async def test_another_tenants_resources_are_404(env: Env) -> None:
    net = await _network(env)
    status, body, text = await env.call(
        "POST", "/image/v2/images", {"name": "img", "disk_format": "raw"}
    )
    assert status == 201, text
    image = body["id"]
    before = await env.last_seq()
    for method, path in (
        ("GET", f"/network/v2.0/networks/{net}"),
        ("DELETE", f"/network/v2.0/networks/{net}"),
        ("PUT", f"/network/v2.0/networks/{net}"),
        ("GET", f"/image/v2/images/{image}"),
        ("DELETE", f"/image/v2/images/{image}"),
        ("PUT", f"/image/v2/images/{image}/file"),
    ):
        body = {"network": {}} if method == "PUT" and "network" in path else None
        raw = b"bytes" if path.endswith("/file") else None
        headers = {"Content-Type": "application/octet-stream"} if raw else None
        status, _, text = await env.call(method, path, body, token="bob", raw=raw, headers=headers)
        assert status == 404, (method, path, text)
    # bob's listings do not show them; his own project's quota only.
    status, body, _ = await env.call("GET", "/network/v2.0/networks", token="bob")
    assert net not in [n["id"] for n in body["networks"]]
    status, body, _ = await env.call("GET", "/compute/v2.1/os-quota-sets/acme", token="bob")
    assert status == 403
    nova_fault(body, "forbidden", 403)
    assert await env.last_seq() == before
    # ... and alice still has them.
    status, _, _ = await env.call("GET", f"/network/v2.0/networks/{net}")
    assert status == 200


async def test_traversal_and_wildcards_in_ids_are_404(env: Env) -> None:
    before = await env.last_seq()
    for method, path in (
        ("GET", "/compute/v2.1/servers/..%2F..%2Fetc%2Fpasswd"),
        ("DELETE", "/compute/v2.1/servers/%2e%2e"),
        ("GET", "/network/v2.0/networks/a%20b"),
        ("DELETE", "/network/v2.0/ports/*"),
        ("GET", "/image/v2/images/..%2Fkeys/file"),
        ("PUT", "/image/v2/images/..%2F..%2Fx/file"),
        ("GET", "/compute/v2.1/flavors/%00"),
    ):
        status, _, text = await env.call(method, path, raw=b"x" if method == "PUT" else None)
        assert status == 404, (path, text)
    assert await env.last_seq() == before
    assert not list((env.stack.data_dir / "images").glob("*")) or all(
        p.name.startswith(".") is False for p in (env.stack.data_dir / "images").iterdir()
    )


async def test_quota_refusals_in_nova_and_neutron_shapes(env: Env) -> None:
    await _network(env, "one")
    await _network(env, "two")
    before = await env.last_seq()
    status, body, text = await env.call(
        "POST", "/network/v2.0/networks", {"network": {"name": "three"}}
    )
    assert status == 409, text
    assert "networks 2 of 2" in neutron_fault(body, "OverQuota")
    status, body, text = await env.call(
        "POST", "/image/v2/images", {"name": "img", "disk_format": "raw"}
    )
    image = body["id"]
    status, body, text = await env.call(
        "POST",
        "/compute/v2.1/servers",
        {"server": {"name": "a", "imageRef": image, "flavorRef": "m1", "networks": "none"}},
    )
    assert status == 202, text
    # No host: the scheduler fails it (its event is the last to wait for).
    await _settled(env, body["server"]["id"], "ERROR")
    before = await env.last_seq()
    status, body, text = await env.call(
        "POST",
        "/compute/v2.1/servers",
        {"server": {"name": "b", "imageRef": image, "flavorRef": "m1", "networks": "none"}},
    )
    assert status == 403, text
    assert nova_fault(body, "forbidden", 403).startswith("Quota exceeded")
    assert await env.last_seq() == before


async def test_a_bad_image_file_is_refused_and_nothing_stored(env: Env) -> None:
    status, body, text = await env.call(
        "POST", "/image/v2/images", {"name": "fake", "disk_format": "qcow2"}
    )
    assert status == 201 and body["status"] == "queued", text
    before = await env.last_seq()
    status, _, text = await env.call(
        "PUT",
        f"/image/v2/images/{body['id']}/file",
        raw=b"this is not a qcow2 image" * 100,
        headers={"Content-Type": "application/octet-stream"},
    )
    assert status == 400 and "qcow2" in text, text
    assert await env.last_seq() == before
    status, shown, _ = await env.call("GET", f"/image/v2/images/{body['id']}")
    assert shown["status"] == "queued" and shown["size"] is None
    # nothing left on its way either: the spool holds no file
    spool = env.stack.data_dir / "openstack-api-spool"
    assert not spool.exists() or list(spool.iterdir()) == []


async def test_tokens_validate_revoke_and_discovery(env: Env) -> None:
    status, body, text = await env.call("GET", "/", token=None)
    assert status == 300 and body["versions"]["values"][0]["id"].startswith("v3"), text
    status, body, _ = await env.call("GET", "/v3", token=None)
    assert body["version"]["media-types"][0]["type"] == "application/vnd.openstack.identity-v3+json"
    auth = {
        "auth": {
            "identity": {
                "methods": ["password"],
                "password": {
                    "user": {
                        "name": "alice",
                        "domain": {"id": "default"},
                        "password": USER_PASSWORD,
                    }
                },
            },
            "scope": {"project": {"name": "acme", "domain": {"id": "default"}}},
        }
    }
    async with env.http.post(env.base + "/v3/auth/tokens", json=auth) as r:
        assert r.status == 201
        token = r.headers["X-Subject-Token"]
        issued = await r.json()
    types = {s["type"]: s["endpoints"][0]["url"] for s in issued["token"]["catalog"]}
    assert types["compute"].endswith("/compute/v2.1") and types["image"].endswith("/image")
    assert issued["token"]["project"]["id"] == "acme"
    hdr = {"X-Subject-Token": token}
    status, shown, _ = await env.call("GET", "/v3/auth/tokens", headers=hdr, token=token)
    assert status == 200 and shown == issued
    # Someone else's token is not alice's to validate as hers: bob sees it
    # only if it is valid, and cannot revoke it.
    status, _, text = await env.call("DELETE", "/v3/auth/tokens", headers=hdr, token="bob")
    assert status == 403, text
    status, _, _ = await env.call("DELETE", "/v3/auth/tokens", headers=hdr, token=token)
    assert status == 204
    status, body, _ = await env.call("GET", "/v3/auth/tokens", headers=hdr, token="alice")
    assert status == 404 and body["error"]["code"] == 404
    status, _, _ = await env.call("GET", "/compute/v2.1/servers", token=token)
    assert status == 401
    # A wrong password is 401 (the attempt is on the audit trail, no token).
    auth["auth"]["identity"]["password"]["user"]["password"] = "wrong"
    async with env.http.post(env.base + "/v3/auth/tokens", json=auth) as r:
        assert r.status == 401 and "X-Subject-Token" not in r.headers


async def test_unreachable_control_plane_is_503(tmp_path) -> None:
    from stratus.api.app import ApiServer, bind
    from stratus.events.broker import EmbeddedNats

    broker = EmbeddedNats(tmp_path / "nats", log_file=str(tmp_path / "nats.log"))
    url = broker.start()
    api = ApiServer(url, bind("127.0.0.1:0"), tmp_path / "images")
    await api.start()
    try:
        async with aiohttp.ClientSession() as http:
            auth = {
                "auth": {
                    "identity": {
                        "methods": ["password"],
                        "password": {"user": {"name": "a", "password": "b"}},
                    }
                }
            }
            async with http.post(api.base_url + "/v3/auth/tokens", json=auth) as r:
                body = await r.json()
                assert r.status == 503 and body["error"]["code"] == 503
            async with http.get(
                api.base_url + "/compute/v2.1/flavors", headers={"X-Auth-Token": "x.y.z"}
            ) as r:
                assert r.status in (401, 503)
    finally:
        await api.stop()
        broker.stop()


async def test_server_name_filters_are_bounded_regular_expressions(env: Env) -> None:
    # A catastrophic pattern would hang the API's event loop: refused.
    for bad in ("(a%2B)%2B%24", "a.*.*.*", "*x", "%5B"):
        status, body, text = await env.call("GET", f"/compute/v2.1/servers?name={bad}")
        assert status == 400, (bad, text)
        nova_fault(body, "badRequest", 400)
    status, body, _ = await env.call("GET", "/compute/v2.1/servers?name=%5Eweb-.%2A")
    assert status == 200 and body == {"servers": []}
