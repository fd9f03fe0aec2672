"""The console's pages: each a bookmarkable URL, each rendered on the server
from the answers the control plane gives the browser's own token.

Every read page takes ``?at=SEQ|TIME`` (time travel, the CLI's ``--at``):
its queries carry the ``Stratus-At`` header and the page says it shows the
past; forms that would change something are not offered there.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

from aiohttp import web

from stratus.cli.client import Client
from stratus.cli.history import causal_chain
from stratus.console import session, timeline, topology
from stratus.console.app import CONSOLE, Console
from stratus.events.errors import Forbidden, Invalid, NotFound, StratusError, Unauthenticated
from stratus.events.ids import is_token

# The quotas drawn as bars on the overview (the rest are listed below them).
FEATURED_QUOTAS = ("instances", "vcpus", "ram_mb", "networks", "floating_ips")
# A server's statuses, in lifecycle order (counts are shown in this order).
LIFECYCLE = ("requested", "scheduled", "building", "running", "stopped", "error", "deleting")
# Sizes offered besides the cloud's flavors: (vCPUs, RAM MB).
SIZES = ((1, 256), (1, 512), (2, 1024), (2, 2048), (4, 4096))
AUDIT_PAGE = 50


@dataclass
class View:
    """One page request: who asks (``whoami``), about which tenant, as of when."""

    request: web.Request
    console: Console
    client: Client
    me: dict[str, Any]
    tenant: str
    at: str | None = None  # the sequence the page shows (None: now)
    at_asked: str | None = None  # what the browser asked for (a time, say)
    last_seq: int | None = None
    switcher: tuple[str, ...] = ()

    async def q(self, name: str, body: dict[str, Any] | None = None, *, scoped: bool = True) -> Any:
        """Ask ``q.<name>`` as the browser's user, about the page's tenant,
        as of the page's point in time."""
        body = dict(body or {})
        if scoped:
            body.setdefault("tenant", self.tenant)
        return await self.client.query(name, body, at=self.at)

    def render(self, template: str, status: int = 200, **values: Any) -> web.Response:
        token = self.request.cookies.get(session.TOKEN_COOKIE, "")
        return self.console.render(
            template,
            status=status,
            me=self.me,
            tenant=self.tenant,
            at=self.at,
            at_asked=self.at_asked,
            last_seq=self.last_seq,
            switcher=self.switcher,
            csrf=session.csrf_token(token),
            path=self.request.path,
            # The page's own parameters (filters): kept when travelling in time.
            keep={
                k: v for k, v in self.request.query.items() if k not in ("at", "before", "after")
            },
            **values,
        )


async def view(request: web.Request, *, tenant: str | None = None) -> View:
    console = request.app[CONSOLE]
    client = console.client(request.cookies.get(session.TOKEN_COOKIE))
    asked = session.at_param(request)
    me = await client.query("whoami")
    if me["cloud_admin"]:
        switcher = tuple(t["id"] for t in await client.query("tenants"))
    else:
        switcher = tuple(t["tenant"] for t in me["tenants"])
    if "tenant" in request.match_info:
        tenant = session.tenant_param(request.match_info["tenant"])
    v = View(request, console, client, me, tenant or me["tenant"], switcher=switcher)
    if asked is not None:
        # Resolved once, so every query of the page reads the same point.
        point = await client.query("status", {"digest": False}, at=asked)
        v.at, v.at_asked, v.last_seq = str(point["at"]), asked, point["last_seq"]
    return v


def _form_text(form: Any, name: str, limit: int = 256) -> str:
    value = form.get(name, "")
    return value.strip()[:limit] if isinstance(value, str) else ""


# -- signing in and out ---------------------------------------------------------------------


async def index(request: web.Request) -> web.StreamResponse:
    if not request.cookies.get(session.TOKEN_COOKIE):
        raise web.HTTPSeeOther("/login")
    v = await view(request)
    raise web.HTTPSeeOther(f"/t/{v.me['tenant']}/")


async def login_form(request: web.Request, *, status: int = 200, error: str = "") -> web.Response:
    console = request.app[CONSOLE]
    fresh = None
    secret = session.session_secret(request)
    if secret is None:
        fresh = secret = session.new_presession()
    source: Any = await request.post() if request.method == "POST" else request.query
    response = console.render(
        "login.html",
        status=status,
        me=None,
        at=None,
        csrf=session.csrf_token(secret),
        error=error,
        why=request.query.get("why", "")[:300],
        user=_form_text(source, "user", 63),
        tenant=_form_text(source, "tenant", 63),
        next=session.safe_next(_form_text(source, "next", 2000), ""),
    )
    if fresh is not None:
        session.set_cookie(response, request, session.PRESESSION_COOKIE, fresh, 3600)
    return response


async def login(request: web.Request) -> web.StreamResponse:
    console = request.app[CONSOLE]
    form = await request.post()
    body: dict[str, Any] = {
        "user": _form_text(form, "user", 63),
        "password": form.get("password", "") if isinstance(form.get("password"), str) else "",
    }
    tenant = _form_text(form, "tenant", 63)
    if tenant:
        body["tenant"] = tenant
    try:
        reply = await console.client(None).command("auth.login", body)
    except Unauthenticated as err:
        return await login_form(request, status=401, error=err.message)
    except StratusError as err:
        message = err.message
        if not tenant and err.kind == "forbidden":
            message += ": name the tenant to sign in to"
        return await login_form(
            request, status=400 if err.kind == "invalid" else 403, error=message
        )
    data = reply.data or {}
    old = request.cookies.get(session.TOKEN_COOKIE)
    if old:
        # Signing in again (another tenant): the token it replaces goes.
        with contextlib.suppress(StratusError):
            await console.client(old).command("token.revoke", {})
    target = session.safe_next(_form_text(form, "next", 2000), f"/t/{data['tenant']}/")
    response = web.HTTPSeeOther(target)
    session.set_cookie(
        response,
        request,
        session.TOKEN_COOKIE,
        data["token"],
        int(data["expires_at"] - time.time()),
    )
    session.clear_cookie(response, session.PRESESSION_COOKIE)
    raise response


async def logout(request: web.Request) -> web.StreamResponse:
    token = request.cookies.get(session.TOKEN_COOKIE)
    if token:
        # Revoked on the log: every service refuses it from now on, not just
        # this console. A token already void needs nothing more.
        with contextlib.suppress(Unauthenticated):
            await request.app[CONSOLE].client(token).command("token.revoke", {})
    response = web.HTTPSeeOther("/login?why=signed+out")
    session.clear_cookie(response, session.TOKEN_COOKIE)
    raise response


async def switch(request: web.Request) -> web.StreamResponse:
    """Go to another tenant: directly where the token reaches (the cloud
    admin's reaches every tenant), else through the login form, because a
    Stratus token speaks for one tenant."""
    target = session.tenant_param(request.query.get("tenant", ""))
    v = await view(request)
    if v.me["cloud_admin"] or v.me["tenant"] == target:
        raise web.HTTPSeeOther(f"/t/{target}/")
    params = {
        "user": v.me["user"],
        "tenant": target,
        "next": f"/t/{target}/",
        "why": f"Sign in again to act in tenant {target}: a token speaks for one tenant.",
    }
    raise web.HTTPSeeOther("/login?" + urlencode(params))


# -- the tenant's pages ------------------------------------------------------------------


async def to_overview(request: web.Request) -> web.StreamResponse:
    raise web.HTTPMovedPermanently(f"/t/{session.tenant_param(request.match_info['tenant'])}/")


async def overview(request: web.Request) -> web.Response:
    v = await view(request)
    tenant, quota, servers = await asyncio.gather(v.q("tenant"), v.q("quota"), v.q("servers"))
    rows = {q["resource"]: q for q in quota["quota"]}
    counts = Counter(s.get("status") or "unknown" for s in servers)
    statuses = [(s, counts.pop(s)) for s in LIFECYCLE if s in counts] + sorted(counts.items())
    return v.render(
        "overview.html",
        page="overview",
        info=tenant,
        featured=[rows[r] for r in FEATURED_QUOTAS if r in rows],
        other_quotas=[q for r, q in rows.items() if r not in FEATURED_QUOTAS],
        statuses=statuses,
        servers_total=len(servers),
    )


def server_row(s: dict[str, Any], seq: int = 0) -> dict[str, Any]:
    """What the servers table shows of one server (also sent live); ``seq``:
    the log position it reflects, so a page never applies an older row
    over a newer one."""
    return {
        "seq": seq,
        "id": s["id"],
        "name": s.get("name") or s["id"],
        "status": s.get("status") or "",
        "host": s.get("host") or "",
        "type": s.get("instance_type") or "",
        "size": f"{s.get('vcpus')} vCPU, {s.get('ram_mb')} MB",
        "addresses": ", ".join(a.get("ip") or "" for a in s.get("addresses") or []),
        "floating": ", ".join(s.get("floating_ips") or []),
    }


async def _servers_page(
    request: web.Request, *, status: int = 200, error: str = "", form: Any = None
) -> web.Response:
    v = await view(request)
    since = None
    if v.at is None:
        # Live updates follow the log from what the projection held before
        # the table was read (an event in between is sent again: harmless).
        log_at = await v.q("status", {"digest": False, "parts": False}, scoped=False)
        since = log_at["projector_seq"]
    servers, ports, fips, images, flavors, networks = await asyncio.gather(
        v.q("servers"),
        v.q("ports"),
        v.q("floating-ips"),
        v.q("images"),
        v.q("flavors", scoped=False),
        v.q("networks"),
    )
    for s in servers:
        s["addresses"] = [p for p in ports if p.get("device") == s["id"]]
        s["floating_ips"] = [f["address"] for f in fips if f.get("server") == s["id"]]
    sizes = [
        (f"flavor:{f['id']}", f"{f['id']} ({f['vcpus']} vCPU, {f['ram_mb']} MB)") for f in flavors
    ]
    sizes += [(f"{c}x{m}", f"{c} vCPU, {m} MB") for c, m in SIZES]
    return v.render(
        "servers.html",
        status=status,
        page="servers",
        servers=[server_row(s) for s in servers],
        since=since,
        images=[(i["id"], i["name"]) for i in images if i.get("status") == "active"],
        sizes=sizes,
        networks=[(n["id"], n["name"]) for n in networks if not n.get("external")],
        error=error,
        form=form or {},
        created=request.query.get("created", "")[:63],
    )


async def servers(request: web.Request) -> web.Response:
    return await _servers_page(request)


async def server_create(request: web.Request) -> web.StreamResponse:
    """The create form. Posted by the page's script (``Accept:
    application/json``) it answers the new row, which the page inserts and
    the live stream then carries on; posted plainly, it redirects."""
    tenant = session.tenant_param(request.match_info["tenant"])
    as_json = "application/json" in request.headers.get("Accept", "")
    form = await request.post()
    fields = {k: _form_text(form, k) for k in ("name", "image", "size", "network", "type")}

    async def refuse(status: int, error: str) -> web.StreamResponse:
        if as_json:
            return web.json_response({"error": error}, status=status)
        return await _servers_page(request, status=status, error=error, form=fields)

    body: dict[str, Any] = {
        "tenant": tenant,
        "name": fields["name"],
        "image": fields["image"],
        "instance_type": fields["type"] or "vm",
    }
    if fields["network"]:
        body["networks"] = [fields["network"]]
    size = fields["size"]
    if size.startswith("flavor:"):
        body["flavor"] = size.removeprefix("flavor:")
    else:
        vcpus, _, ram = size.partition("x")
        if not (vcpus.isdigit() and ram.isdigit()):
            return await refuse(400, "invalid: choose a size")
        body["vcpus"], body["ram_mb"] = int(vcpus), int(ram)
    console = request.app[CONSOLE]
    try:
        reply = await console.client(request.cookies.get(session.TOKEN_COOKIE)).command(
            "server.create", body
        )
    except Unauthenticated:
        raise
    except StratusError as err:
        status = 409 if err.kind in ("quota_exceeded", "conflict", "already_exists") else 400
        return await refuse(status, f"{err.kind}: {err.message}")
    if as_json:
        return web.json_response({"row": server_row(reply.data or {}, max(reply.seqs, default=0))})
    raise web.HTTPSeeOther(f"/t/{tenant}/servers?created={fields['name']}")


async def server_delete(request: web.Request) -> web.StreamResponse:
    tenant = session.tenant_param(request.match_info["tenant"])
    ref = request.match_info["ref"]
    if not is_token(ref):
        raise NotFound(f"server {ref[:64]} not found")
    console = request.app[CONSOLE]
    await console.client(request.cookies.get(session.TOKEN_COOKIE)).command(
        "server.delete", {"tenant": tenant, "ref": ref}
    )
    raise web.HTTPSeeOther(f"/t/{tenant}/servers")


async def server_detail(request: web.Request) -> web.Response:
    v = await view(request)
    ref = request.match_info["ref"]
    if not is_token(ref):
        raise NotFound(f"server {ref[:64]} not found")
    try:
        server: dict[str, Any] | None = await v.q("server", {"ref": ref})
    except NotFound:
        server = None  # deleted (its history remains), or not the caller's
    rid = server["id"] if server else ref
    rows, images, networks = await asyncio.gather(
        # Each command followed into every tenant the caller may read: for
        # the cloud admin that includes the claim on the host.
        causal_chain(v.client, rid, tenant=v.tenant, at=v.at, chain_tenant=False),
        v.q("images"),
        v.q("networks"),
    )
    names = {i["id"]: i["name"] for i in images} | {n["id"]: n["name"] for n in networks}
    return v.render(
        "server.html",
        page="servers",
        server=server,
        server_id=rid,
        view=server_row(server) if server else None,
        names=names,
        entries=timeline.entries(rows, rid),
    )


async def topology_page(request: web.Request) -> web.Response:
    v = await view(request)
    networks, subnets, routers, ports, servers_, fips = await asyncio.gather(
        v.q("networks"),
        v.q("subnets"),
        v.q("routers"),
        v.q("ports"),
        v.q("servers"),
        v.q("floating-ips"),
    )
    # The list leaves out a router's interfaces; ``show`` has them.
    routers = await asyncio.gather(*(v.q("router", {"ref": r["id"]}) for r in routers))
    drawn = topology.layout(networks, subnets, list(routers), ports, servers_, fips)
    return v.render("topology.html", page="topology", layout=drawn)


def _utc(value: str, name: str) -> str | None:
    """A time from the filter form (``datetime-local`` gives no zone: UTC)."""
    if not value:
        return None
    try:
        t = datetime.fromisoformat(value)
    except ValueError:
        raise Invalid(f"{name}: not a time (YYYY-MM-DDTHH:MM)") from None
    return (t.astimezone(UTC) if t.tzinfo else t.replace(tzinfo=UTC)).isoformat()


async def audit(request: web.Request) -> web.Response:
    """The audit trail, newest first, a page at a time: ``before`` pages back
    (the query's point in time bounds it), ``after`` forward."""
    v = await view(request)
    query = request.query
    filters = {k: query.get(k, "").strip()[:256] for k in ("actor", "type", "resource", "command")}
    times = {k: query.get(k, "").strip()[:40] for k in ("since", "until")}
    body: dict[str, Any] = {k: val for k, val in filters.items() if val}
    body.update({k: t for k, val in times.items() if (t := _utc(val, k))})
    size = query.get("limit", "")
    page_size = min(max(int(size), 5), 200) if size.isdigit() else AUDIT_PAGE
    body["limit"] = page_size
    upto = v.at
    before = query.get("before", "")
    after = query.get("after", "")
    if before.isdigit():
        bound = int(before) - 1
        upto = str(min(bound, int(v.at)) if v.at else bound)
    elif after.isdigit():
        body["after"] = int(after)
    rows: list[dict[str, Any]] = []
    if upto is None or int(upto) >= 1:
        body["tenant"] = v.tenant
        rows = await v.client.query("audit", body, at=upto)
    rows.reverse()  # newest first
    older = newer = None
    if rows:
        full = len(rows) == page_size
        # Older rows exist below a full page, and below any page reached by
        # paging forward; newer ones above a page reached by paging back,
        # and above a full page reached forward.
        if full or after.isdigit():
            older = rows[-1]["seq"]
        if before.isdigit() or (after.isdigit() and full):
            newer = rows[0]["seq"]
    return v.render(
        "audit.html",
        page="audit",
        rows=rows,
        filters=filters,
        times=times,
        params={**filters, **times, "limit": size if size.isdigit() else ""},
        older=older,
        newer=newer,
    )


# -- cloud administration ------------------------------------------------------------------


async def admin_hosts(request: web.Request) -> web.Response:
    v = await view(request)
    hosts = await v.q("hosts", scoped=False)
    return v.render("hosts.html", page="hosts", hosts=hosts)


async def admin_tenants(request: web.Request) -> web.Response:
    v = await view(request)
    if not v.me["cloud_admin"]:
        # The query would answer with the caller's own tenant only: say so.
        raise Forbidden("the list of tenants is the cloud admin's")
    tenants = await v.q("tenants", {"include_deleted": True}, scoped=False)
    return v.render("tenants.html", page="tenants", tenants=tenants)


async def admin_users(request: web.Request) -> web.Response:
    v = await view(request)
    users = await v.q("users", scoped=False)
    return v.render("users.html", page="users", users=users)
