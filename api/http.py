"""What every OpenStack service face shares: bodies in, answers and faults out.

Each service answers errors in its own fault format (``Face.fault``); the
middleware turns every refusal into one, so a handler only raises. Request
bodies are decoded into msgspec Structs, so a wrong type, an unknown field
or a malformed document is a 400 naming the field before anything is sent
to the control plane.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import msgspec
import structlog
from aiohttp import web

from stratus.api.control import Claims, ControlPlane, Session, claims_of
from stratus.events.commands import explain
from stratus.events.errors import (
    Invalid,
    NotFound,
    StratusError,
    Unauthenticated,
)
from stratus.events.ids import new_id

log = structlog.get_logger("stratus.api")

T = TypeVar("T")
# JSON bodies (everything but image data) larger than this are refused (413).
MAX_BODY_BYTES = 64 * 1024
# Ids in paths: what a Stratus id or name can be; anything else (a path
# traversal, a wildcard) cannot name a resource, so it is a 404.
ID_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}(?!\n)$")

_enc = msgspec.json.Encoder()

STATUS = {
    "invalid": 400,
    "unauthenticated": 401,
    "forbidden": 403,
    "not_found": 404,
    "already_exists": 409,
    "conflict": 409,
    "quota_exceeded": 409,
    "unavailable": 503,
    "internal": 500,
}
TITLES = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflict",
    413: "Request Entity Too Large",
    415: "Unsupported Media Type",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


class HttpError(Exception):
    """A refusal with an HTTP status of its own (405, 413, ...)."""

    def __init__(self, status: int, message: str, kind: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind


Fault = Callable[[int, str, str], web.Response]


class Face(msgspec.Struct, frozen=True):
    """One OpenStack service on its path prefix, with its fault format and
    (Nova) how a quota refusal reads."""

    name: str
    prefix: str
    fault: Fault
    quota_status: int = 409


def json_response(
    data: Any, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=_enc.encode(data),
        status=status,
        content_type="application/json",
        headers=headers,
    )


def no_content(status: int = 204) -> web.Response:
    return web.Response(status=status)


async def decode(request: web.Request, kind: type[T]) -> T:
    """The request's JSON body as ``kind``; 400 naming the field, 413 if too large."""
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise HttpError(413, f"the body is larger than {MAX_BODY_BYTES} bytes")
    data = await request.content.read(MAX_BODY_BYTES + 1)
    if len(data) > MAX_BODY_BYTES:
        raise HttpError(413, f"the body is larger than {MAX_BODY_BYTES} bytes")
    try:
        return msgspec.json.decode(data or b"{}", type=kind)
    except msgspec.ValidationError as exc:
        raise Invalid(f"invalid body: {explain(exc)}") from None
    except msgspec.DecodeError:
        raise Invalid("the body is not a JSON document") from None


def path_id(request: web.Request, key: str = "id", what: str = "resource") -> str:
    value = request.match_info[key]
    if not ID_RE.match(value):
        raise NotFound(f"{what} {value[:64]!r} not found")
    return value


def auth_token(request: web.Request) -> str:
    token = request.headers.get("X-Auth-Token", "").strip()
    if not token:
        raise Unauthenticated("the request needs an X-Auth-Token header")
    return token


def session(request: web.Request, token: str | None = None) -> Session:
    """The caller's access to the control plane (401 without a token)."""
    plane: ControlPlane = request.app[PLANE]
    return plane.session(token or auth_token(request), request.get(REQUEST_ID))


# What a kind is called in messages.
LABELS = {"floating-ip": "floating IP", "security-group": "security group"}


async def fetch(s: Session, kind: str, tenant: str, rid: str) -> dict[str, Any]:
    """A resource of ``tenant`` by its id alone (OpenStack finds by id, where
    Stratus' queries take names too), else NotFound."""
    found = await s.query(kind, {"ref": rid, "tenant": tenant})
    if found["id"] != rid:
        raise NotFound(f"{LABELS.get(kind, kind)} {rid} could not be found")
    return found


def deleter(kind: str) -> Callable[[web.Request], Awaitable[web.Response]]:
    """``DELETE .../{id}``: the tenant's resource by id, through ``<kind>.delete``."""

    async def delete(request: web.Request) -> web.Response:
        rid = path_id(request, what=LABELS.get(kind, kind))
        me = caller(request)
        s = session(request)
        await fetch(s, kind, me.tenant, rid)
        await s.command(f"{kind}.delete", {"ref": rid, "tenant": me.tenant})
        return no_content()

    return delete


def caller(request: web.Request) -> Claims:
    return claims_of(auth_token(request))


def origin(request: web.Request) -> str:
    """The URL the client reached us at (links and the catalog use it)."""
    public = request.app[PUBLIC_URL]
    return public or str(request.url.origin())


def query_int(request: web.Request, key: str, default: int | None = None) -> int | None:
    raw = request.query.get(key)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise Invalid(f"{key} must be an integer, not {raw[:32]!r}") from None
    if value < 0:
        raise Invalid(f"{key} must not be negative")
    return value


def page(
    items: list[dict[str, Any]], marker: str | None, limit: int | None
) -> tuple[list[dict[str, Any]], bool]:
    """Items after ``marker`` (an id; unknown: 400, as Nova and Glance say),
    at most ``limit``; and whether more follow."""
    if marker:
        ids = [i["id"] for i in items]
        if marker not in ids:
            raise Invalid(f"marker {marker[:64]!r} not found")
        items = items[ids.index(marker) + 1 :]
    if limit is not None and len(items) > limit:
        return items[:limit], True
    return items, False


PLANE = web.AppKey("plane", ControlPlane)
PUBLIC_URL = web.AppKey("public_url", str)
FACES = web.AppKey("faces", list)


def face_of(request: web.Request) -> Face:
    faces: list[Face] = request.app[FACES]
    for face in faces:
        if face.prefix and request.path.startswith(face.prefix):
            return face
    return faces[-1]  # the identity service answers at the root


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


REQUEST_ID = "stratus.request_id"


@web.middleware
async def request_ids(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every answer names its request (``X-OpenStack-Request-Id``); the
    request's first command carries the same uuid, so the audit trail finds it."""
    rid = new_id()
    request[REQUEST_ID] = rid
    response = await handler(request)
    response.headers["X-OpenStack-Request-Id"] = f"req-{rid}"
    if face_of(request).name == "compute":
        response.headers["X-Compute-Request-Id"] = f"req-{rid}"
    return response


@web.middleware
async def faults(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every refusal in the fault format of the service that was asked."""
    face = face_of(request)
    try:
        return await handler(request)
    except StratusError as err:
        status = STATUS.get(err.kind, 500)
        if err.kind == "quota_exceeded":
            status = face.quota_status
        return face.fault(status, err.message, err.kind)
    except HttpError as err:
        return face.fault(err.status, err.message, err.kind)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        message = exc.text or exc.reason
        if exc.status == 413:
            message = f"the body is larger than {MAX_BODY_BYTES} bytes"
        return face.fault(exc.status, message, "")
    except Exception:
        log.exception("request failed", path=request.path, method=request.method)
        return face.fault(500, "internal error; see the API's log", "internal")
