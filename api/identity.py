"""Keystone v3: version discovery, password tokens, validation and
revocation, the service catalog and projects.

A project is a Stratus tenant and the one domain is ``default``. The token
in ``X-Subject-Token`` is the Stratus token itself (a signed JWT), so every
other service verifies it locally; its body is rendered from the token's
own claims, so issuing and validating it give the same body (Tempest
compares them).
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Any

import msgspec
from aiohttp import web

from stratus.api.control import Claims, claims_of
from stratus.api.http import (
    PLANE,
    TITLES,
    Face,
    auth_token,
    decode,
    json_response,
    no_content,
    origin,
    session,
)
from stratus.events.errors import (
    Forbidden,
    Invalid,
    NotFound,
    StratusError,
    Unauthenticated,
)

REGION = "RegionOne"
DOMAIN = {"id": "default", "name": "Default"}
MEDIA = [{"base": "application/json", "type": "application/vnd.openstack.identity-v3+json"}]
# How long a revocation may take to reach the services that verify tokens
# (one broker: milliseconds); DELETE answers once the token is refused.
REVOKE_SETTLE_S = 2.0


def fault(status: int, message: str, _kind: str) -> web.Response:
    title = TITLES.get(status, "Error")
    return json_response({"error": {"code": status, "message": message, "title": title}}, status)


FACE = Face("identity", "", fault)


def keystone_time(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%S.000000Z")


def _version(base: str) -> dict[str, Any]:
    return {
        "id": "v3.14",
        "status": "stable",
        "updated": "2020-04-07T00:00:00Z",
        "links": [{"rel": "self", "href": f"{base}/v3/"}],
        "media-types": MEDIA,
    }


async def versions(request: web.Request) -> web.Response:
    return json_response({"versions": {"values": [_version(origin(request))]}}, 300)


async def version(request: web.Request) -> web.Response:
    return json_response({"version": _version(origin(request))})


# -- catalog -------------------------------------------------------------------

SERVICES = (
    ("identity", "keystone", "/v3"),
    ("compute", "nova", "/compute/v2.1"),
    ("network", "neutron", "/network"),
    ("image", "glance", "/image"),
)


def catalog(base: str) -> list[dict[str, Any]]:
    return [
        {
            "id": kind,
            "type": kind,
            "name": name,
            "endpoints": [
                {
                    "id": f"{kind}-public",
                    "interface": "public",
                    "region": REGION,
                    "region_id": REGION,
                    "url": base + path,
                }
            ],
        }
        for kind, name, path in SERVICES
    ]


def token_body(c: Claims, base: str) -> dict[str, Any]:
    """The token as Keystone shows it, from its claims alone."""
    return {
        "token": {
            "methods": ["password"],
            "user": {"id": c.user, "name": c.user, "domain": DOMAIN, "password_expires_at": None},
            "audit_ids": [c.token_id],
            "expires_at": keystone_time(c.expires_at),
            "issued_at": keystone_time(c.issued_at),
            "project": {"id": c.tenant, "name": c.tenant, "domain": DOMAIN},
            "is_domain": False,
            "roles": [{"id": r, "name": r} for r in c.roles],
            "catalog": catalog(base),
        }
    }


# -- tokens --------------------------------------------------------------------


class _Domain(msgspec.Struct, frozen=True):
    id: str | None = None
    name: str | None = None


class _User(msgspec.Struct, frozen=True):
    id: str | None = None
    name: str | None = None
    password: str = ""
    domain: _Domain | None = None


class _Password(msgspec.Struct, frozen=True):
    user: _User


class _Identity(msgspec.Struct, frozen=True):
    methods: list[str]
    password: _Password | None = None
    token: dict[str, Any] | None = None


class _Project(msgspec.Struct, frozen=True):
    id: str | None = None
    name: str | None = None
    domain: _Domain | None = None


class _Scope(msgspec.Struct, frozen=True):
    project: _Project | None = None
    domain: _Domain | None = None
    system: dict[str, Any] | None = None


class _Auth(msgspec.Struct, frozen=True):
    identity: _Identity
    scope: _Scope | str | None = None


class AuthRequest(msgspec.Struct, frozen=True):
    auth: _Auth


def _default_domain(d: _Domain | None) -> None:
    if d is not None and (d.id or "default") != "default" and (d.name or "Default") != "Default":
        raise Unauthenticated("only the default domain exists")


async def issue(request: web.Request) -> web.Response:
    body = await decode(request, AuthRequest)
    ident = body.auth.identity
    if "password" not in ident.methods or ident.password is None:
        raise Unauthenticated("only the password method is supported")
    user = ident.password.user
    _default_domain(user.domain)
    name = user.id or user.name
    if not name:
        raise Invalid("auth.identity.password.user needs an id or a name")
    login: dict[str, Any] = {"user": name, "password": user.password}
    scope = body.auth.scope
    if isinstance(scope, _Scope):
        if scope.domain is not None or scope.system is not None:
            raise Unauthenticated("only project scope is supported")
        if scope.project is not None:
            _default_domain(scope.project.domain)
            project = scope.project.id or scope.project.name
            if not project:
                raise Invalid("auth.scope.project needs an id or a name")
            login["tenant"] = project
    plane = request.app[PLANE]
    try:
        # Nothing to settle: a login changes no view the caller reads next.
        data = await plane.session(None).command("auth.login", login, settle=False)
    except (Forbidden, Invalid) as err:
        # Keystone says 401 for a project the user has no role in.
        raise Unauthenticated(err.message) from None
    token = data["token"]
    return json_response(
        token_body(claims_of(token), origin(request)), 201, {"X-Subject-Token": token}
    )


async def _valid(request: web.Request, token: str) -> Claims:
    """The token's claims once the control plane accepts it."""
    c = claims_of(token)
    await request.app[PLANE].session(token).query("tenant", {"tenant": c.tenant})
    return c


async def _subject(request: web.Request) -> tuple[Claims, str]:
    await _valid(request, auth_token(request))
    subject = request.headers.get("X-Subject-Token", "").strip()
    if not subject:
        raise Invalid("the request needs an X-Subject-Token header")
    try:
        return await _valid(request, subject), subject
    except Unauthenticated:
        raise NotFound("could not find that token (invalid, expired or revoked)") from None


async def validate(request: web.Request) -> web.Response:
    c, subject = await _subject(request)
    if request.method == "HEAD":
        return web.Response(status=200, headers={"X-Subject-Token": subject})
    return json_response(token_body(c, origin(request)), 200, {"X-Subject-Token": subject})


async def revoke(request: web.Request) -> web.Response:
    c, subject = await _subject(request)
    me = claims_of(auth_token(request))
    if me.user == c.user:
        # The holder of a token may always revoke it: as itself.
        await session(request, subject).command("token.revoke", {}, settle=False)
    else:
        await session(request).command("token.revoke", {"token_id": c.token_id}, settle=False)
    deadline = time.monotonic() + REVOKE_SETTLE_S
    while time.monotonic() < deadline:
        try:
            await _valid(request, subject)
        except Unauthenticated:
            break
        except StratusError:
            break
        await asyncio.sleep(0.02)
    return no_content()


async def auth_catalog(request: web.Request) -> web.Response:
    await _valid(request, auth_token(request))
    return json_response({"catalog": catalog(origin(request)), "links": _links(request)})


# -- projects ------------------------------------------------------------------


def _links(request: web.Request) -> dict[str, Any]:
    return {"self": f"{origin(request)}{request.path}", "previous": None, "next": None}


def project_view(t: dict[str, Any], base: str) -> dict[str, Any]:
    return {
        "id": t["id"],
        "name": t["id"],
        "description": t.get("description", ""),
        "domain_id": "default",
        "enabled": t.get("status", "active") == "active",
        "is_domain": False,
        "parent_id": "default",
        "tags": [],
        "options": {},
        "links": {"self": f"{base}/v3/projects/{t['id']}"},
    }


async def projects(request: web.Request) -> web.Response:
    found = await session(request).query("tenants", {})
    name = request.query.get("name")
    rows = [t for t in found if name is None or t["id"] == name]
    base = origin(request)
    return json_response(
        {"projects": [project_view(t, base) for t in rows], "links": _links(request)}
    )


async def project(request: web.Request) -> web.Response:
    tenant = request.match_info["id"]
    found = await session(request).query("tenant", {"tenant": tenant[:64]})
    return json_response({"project": project_view(found, origin(request))})


def routes() -> list[web.RouteDef]:
    return [
        web.get("/", versions),
        web.get("/v3", version),
        web.get("/v3/", version),
        web.post("/v3/auth/tokens", issue),
        web.get("/v3/auth/tokens", validate),  # HEAD too
        web.delete("/v3/auth/tokens", revoke),
        web.get("/v3/auth/catalog", auth_catalog),
        web.get("/v3/auth/projects", projects),
        web.get("/v3/projects", projects),
        web.get("/v3/projects/{id}", project),
    ]
