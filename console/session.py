"""The browser's side of a console session: cookies, CSRF tokens, and the
few values from a request that reach the control plane.

The session is the Stratus token itself, in an HttpOnly, SameSite=Strict
cookie: the console keeps no session state, so any number of console
processes can serve the same browser, and logging out revokes the token
everywhere (``token.revoke``), not just in this process.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from urllib.parse import urlsplit

from aiohttp import web

from stratus.events.errors import Invalid
from stratus.events.ids import NAME_RE

TOKEN_COOKIE = "stratus_token"
# Before logging in there is no token to bind a form to: a random value in
# its own cookie takes its place (the login form's CSRF token derives from it).
PRESESSION_COOKIE = "stratus_presession"
CSRF_FIELD = "csrf"
_CSRF_PURPOSE = b"stratus-console-csrf-v1"

# What ``?at=`` may hold before it becomes a header of a query: a sequence
# number or an ISO-8601 time. Checked here because a header value with a
# line break would be a header of its own.
AT_RE = re.compile(r"^[0-9A-Za-z:.+-]{1,40}(?!\n)$")


def csrf_token(secret: str) -> str:
    """The token every form carries: an HMAC keyed by the session's secret
    (the Stratus token, else the pre-session value), which a page on another
    site can neither read nor compute."""
    return hmac.new(secret.encode(), _CSRF_PURPOSE, hashlib.sha256).hexdigest()


def session_secret(request: web.Request) -> str | None:
    return request.cookies.get(TOKEN_COOKIE) or request.cookies.get(PRESESSION_COOKIE)


def csrf_valid(request: web.Request, sent: str | None) -> bool:
    secret = session_secret(request)
    if not secret or not sent:
        return False
    return hmac.compare_digest(csrf_token(secret), sent)


def same_origin(request: web.Request) -> bool:
    """A form post's ``Origin`` (when the browser sends one) is this console's."""
    origin = request.headers.get("Origin")
    if origin is None:
        return True
    parts = urlsplit(origin)
    return parts.netloc == request.host and parts.scheme in ("http", "https")


def new_presession() -> str:
    return secrets.token_urlsafe(32)


def set_cookie(
    response: web.StreamResponse, request: web.Request, name: str, value: str, max_age: int
) -> None:
    response.set_cookie(
        name,
        value,
        max_age=max(0, max_age),
        path="/",
        httponly=True,
        samesite="Strict",
        # Over plain http (the loopback default) a Secure cookie would not
        # come back; behind TLS it must never travel without it.
        secure=request.secure,
    )


def clear_cookie(response: web.StreamResponse, name: str) -> None:
    response.del_cookie(name, path="/")


def safe_next(target: str | None, default: str) -> str:
    """A redirect target after logging in: a path on this console only
    (``//host`` and ``/\\host`` would leave it)."""
    if not target or not target.startswith("/") or target.startswith(("//", "/\\")):
        return default
    if any(c in target for c in "\r\n\t") or urlsplit(target).netloc:
        return default
    return target


def at_param(request: web.Request) -> str | None:
    """``?at=`` of a page (time travel), or None for now."""
    at = request.query.get("at", "").strip()
    if not at:
        return None
    if not AT_RE.match(at):
        raise Invalid("at: give a sequence number or an ISO-8601 UTC time (2026-01-02T03:04:05Z)")
    return at


def tenant_param(value: str) -> str:
    if not NAME_RE.match(value):
        raise Invalid(f"{value!r} is not a tenant id")
    return value
