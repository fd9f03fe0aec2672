"""The console's web application: routes, the middlewares every response
passes through, and the Jinja environment.

The console holds no credentials of its own. Its NATS connection is the
anonymous client user (the broker lets it send ``cmd.>`` and ``q.>``
requests and receive replies, nothing else), and every request it sends
carries the token of the browser it is serving, so the control plane
checks each page against the same RBAC as the CLI.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import jinja2
import structlog
from aiohttp import web

from stratus.cli.client import Client, Drops
from stratus.console import session
from stratus.events.errors import (
    Forbidden,
    Invalid,
    NotFound,
    StratusError,
    Unauthenticated,
    Unavailable,
)

log = structlog.get_logger("stratus.console")

HERE = Path(__file__).parent
STATIC = HERE / "static"

# No inline script or style anywhere, nothing from another origin: a
# description that slipped past escaping still could not run.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    # "no-referrer" would make Chrome send "Origin: null" with our own forms.
    "Referrer-Policy": "same-origin",
    "Cross-Origin-Opener-Policy": "same-origin",
}
# Paths anyone may open; the rest need a session.
PUBLIC = ("/login", "/static/", "/healthz")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

CONSOLE: web.AppKey[Console] = web.AppKey("console")


class Console:
    """What the handlers share: the NATS connection and the templates."""

    def __init__(self, nc: Any, *, timeout: float = 10.0, drops: Drops | None = None) -> None:
        self.nc = nc
        self.timeout = timeout
        # Fed by the connection's callbacks: requests in flight fail at once
        # when it drops, rather than each polling it.
        self.drops = drops
        self.templates = jinja2.Environment(
            loader=jinja2.FileSystemLoader(HERE / "templates"),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.templates.globals["href"] = href
        self.templates.filters["sid"] = short_id
        self.templates.filters["when"] = when
        # Live pages (server-sent events), ended when the console stops.
        self.closing = False
        self.streams: set[asyncio.Task[Any]] = set()

    def client(self, token: str | None, timeout: float | None = None) -> Client:
        """A client speaking for one browser: its token on every request."""
        return Client(self.nc, token, timeout or self.timeout, drops=self.drops)

    def render(self, template: str, status: int = 200, **values: Any) -> web.Response:
        text = self.templates.get_template(template).render(**values)
        return web.Response(text=text, status=status, content_type="text/html", charset="utf-8")


@jinja2.pass_context
def href(ctx: Any, path: str, **params: Any) -> str:
    """A link within the console that keeps the page's point in time."""
    at = ctx.get("at")
    query = {k: v for k, v in params.items() if v not in (None, "")}
    if at and "at" not in params:
        query["at"] = at
    return path + ("?" + urlencode(query) if query else "")


def short_id(value: str) -> str:
    """An id as a table shows it: UUIDv7s made together share their first
    half (a timestamp), so the distinct end is kept."""
    return value if len(value) <= 14 else "…" + value[-12:]


def when(value: str) -> str:
    """An ISO-8601 UTC time as ``2026-01-02 03:04:05`` (to the second)."""
    return value[:19].replace("T", " ") if len(value) >= 19 and value[10:11] == "T" else value


# -- middlewares ------------------------------------------------------------------------


@web.middleware
async def security_headers(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        exc.headers.update(SECURITY_HEADERS)
        raise
    if not response.prepared:
        response.headers.update(SECURITY_HEADERS)
        response.headers.setdefault("Cache-Control", "no-store")
    return response


STATUS = {
    NotFound: 404,
    Forbidden: 403,
    Invalid: 400,
    Unavailable: 503,
}


def login_redirect(request: web.Request, message: str = "") -> web.HTTPSeeOther:
    """Back to the login form, then to where the browser was going."""
    params = {"next": request.path_qs if request.method == "GET" else "/"}
    if message:
        params["why"] = message
    exc = web.HTTPSeeOther("/login?" + urlencode(params))
    session.clear_cookie(exc, session.TOKEN_COOKIE)
    return exc


@web.middleware
async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A refusal of the control plane as a page with the matching status;
    an expired or revoked token back to the login form."""
    console = request.app[CONSOLE]
    try:
        return await handler(request)
    except Unauthenticated as err:
        if request.path.endswith("/live"):
            raise web.HTTPUnauthorized(text=err.message) from None
        raise login_redirect(request, err.message) from None
    except StratusError as err:
        status = next((s for cls, s in STATUS.items() if isinstance(err, cls)), 409)
        return error_page(console, status, err.kind, err.message)
    except web.HTTPNotFound:
        return error_page(console, 404, "not_found", f"No page at {request.path[:200]}")
    except web.HTTPException:
        raise
    except Exception:
        log.exception("console page failed", path=request.path)
        return error_page(console, 500, "internal", "Something went wrong; it is in the log.")


def error_page(console: Console, status: int, kind: str, message: str) -> web.Response:
    return console.render("error.html", status=status, kind=kind, message=message, me=None, at=None)


@web.middleware
async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A session for every page but the public ones; a same-origin post with
    the session's CSRF token for every form."""
    if request.method == "POST":
        form = await request.post()
        sent = form.get(session.CSRF_FIELD)
        if not session.same_origin(request) or not session.csrf_valid(
            request, sent if isinstance(sent, str) else None
        ):
            log.warning(
                "form refused: CSRF token missing or wrong",
                path=request.path,
                origin=request.headers.get("Origin"),
                session=session.session_secret(request) is not None,
                token=bool(sent),
            )
            return error_page(
                request.app[CONSOLE],
                403,
                "forbidden",
                "This form's CSRF token is missing or wrong; reload the page and retry.",
            )
    if request.path.startswith(PUBLIC) or request.path == "/":
        return await handler(request)
    if not request.cookies.get(session.TOKEN_COOKIE):
        if request.path.endswith("/live"):
            raise web.HTTPUnauthorized(text="log in first")
        raise login_redirect(request)
    return await handler(request)


# -- the application ------------------------------------------------------------------------


def make_app(nc: Any, *, timeout: float = 10.0, drops: Drops | None = None) -> web.Application:
    """The console over an open NATS connection (the anonymous client user);
    ``drops`` is fed by that connection's disconnect callbacks."""
    from stratus.console import live, pages

    app = web.Application(middlewares=[security_headers, errors, guard])
    console = Console(nc, timeout=timeout, drops=drops)
    app[CONSOLE] = console
    r = app.router
    r.add_get("/", pages.index)
    r.add_get("/healthz", healthz)
    r.add_get("/login", pages.login_form)
    r.add_post("/login", pages.login)
    r.add_post("/logout", pages.logout)
    r.add_get("/switch", pages.switch)
    r.add_get("/t/{tenant}/", pages.overview)
    r.add_get("/t/{tenant}", pages.to_overview)
    r.add_get("/t/{tenant}/servers", pages.servers)
    r.add_post("/t/{tenant}/servers", pages.server_create)
    r.add_get("/t/{tenant}/servers/{ref}", pages.server_detail)
    r.add_post("/t/{tenant}/servers/{ref}/delete", pages.server_delete)
    r.add_get("/t/{tenant}/live", live.stream)
    r.add_get("/t/{tenant}/topology", pages.topology_page)
    r.add_get("/t/{tenant}/audit", pages.audit)
    r.add_get("/admin/hosts", pages.admin_hosts)
    r.add_get("/admin/tenants", pages.admin_tenants)
    r.add_get("/admin/users", pages.admin_users)
    r.add_static("/static/", STATIC, append_version=False)
    app.on_shutdown.append(_closing)
    return app


async def healthz(_request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def _closing(app: web.Application) -> None:
    console = app[CONSOLE]
    console.closing = True
    for task in list(console.streams):
        task.cancel()
