"""Live pages: server-sent events fed from the tenant's subjects.

How this is authorised: the console has no subscription of its own on the
log. For each open page it long-polls ``q.events`` (``wait_ms``) with the
token of the browser that opened it, so the query service decides every
answer: it verifies the token (a revoked one ends the stream at the next
poll) and scopes the events to the tenant the token may read
(``ev.<tenant>.>``; another tenant is ``not_found``, exactly as in the CLI).
The console's own NATS user could not subscribe to ``ev.>`` even if its
code tried: the broker allows it requests and replies only.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import web

from stratus.cli.client import Client
from stratus.console import session
from stratus.console.app import CONSOLE, SECURITY_HEADERS
from stratus.console.pages import server_row
from stratus.events.errors import NotFound, StratusError, Unauthenticated
from stratus.events.ids import is_token

LONG_POLL_MS = 15_000
BATCH = 200
# How long an update waits for the projection to hold the events it is
# about, before the rows are read from it.
CATCH_UP_S = 3.0
CATCH_UP_POLL_S = 0.01


def _start(request: web.Request) -> int:
    """Where the stream starts: after the browser's last event on a
    reconnect (``Last-Event-ID``), else after ``?after=``."""
    for value in (request.headers.get("Last-Event-ID"), request.query.get("after")):
        if value and value.isdigit() and len(value) < 20:
            return int(value)
    return 0


def touched_servers(tenant: str, events: list[dict[str, Any]]) -> list[str]:
    """The servers whose table row the events change, in first-touched order:
    their own events, and their ports' and floating IPs'."""
    out: dict[str, None] = {}
    for e in events:
        if e.get("tenant") != tenant:
            continue
        agg = e.get("aggregate") or {}
        data = e.get("data") or {}
        if agg.get("kind") == "server":
            candidates = [agg.get("id")]
        elif agg.get("kind") in ("port", "floating-ip"):
            candidates = [data.get("device"), data.get("server")]
        else:
            continue
        for sid in candidates:
            if isinstance(sid, str) and is_token(sid):
                out[sid] = None
    return list(out)


async def _caught_up(c: Client, seq: int) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + CATCH_UP_S
    while loop.time() < deadline:
        status = await c.query("status", {"digest": False, "parts": False})
        if status["projector_seq"] >= seq:
            return
        # The projector is usually a few milliseconds behind the log.
        await asyncio.sleep(CATCH_UP_POLL_S)


async def server_updates(c: Client, tenant: str, events: list[dict[str, Any]]) -> list[dict]:
    """The current table row of each server the events touched (``deleted``
    for one that is gone), as of the last of them."""
    ids = touched_servers(tenant, events)
    if not ids:
        return []
    seq = events[-1]["seq"]
    await _caught_up(c, seq)
    rows = []
    for sid in ids:
        try:
            rows.append(server_row(await c.query("server", {"ref": sid, "tenant": tenant}), seq))
        except NotFound:
            rows.append({"id": sid, "seq": seq, "deleted": True})
    return rows


def _frame(event: str, data: Any, seq: int) -> bytes:
    return f"id: {seq}\nevent: {event}\ndata: {json.dumps(data)}\n\n".encode()


async def stream(request: web.Request) -> web.StreamResponse:
    console = request.app[CONSOLE]
    tenant = session.tenant_param(request.match_info["tenant"])
    c = console.client(request.cookies.get(session.TOKEN_COOKIE), timeout=LONG_POLL_MS / 1000 + 10)
    after = _start(request)
    poll = {"tenant": tenant, "after": after, "limit": BATCH}
    # The first poll is answered before the stream starts, so a refusal (not
    # the caller's tenant, a void token) is the response's status.
    batch = await c.query("events", poll)
    response = web.StreamResponse(
        headers={
            **SECURITY_HEADERS,
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-store",
            "X-Accel-Buffering": "no",
        }
    )
    await response.prepare(request)
    task = asyncio.current_task()
    assert task is not None
    console.streams.add(task)
    try:
        while not console.closing:
            if batch:
                seq = batch[-1]["seq"]
                for row in await server_updates(c, tenant, batch):
                    await response.write(_frame("server", row, seq))
                # Where the stream stands, so a reconnect resumes after it.
                await response.write(_frame("position", {"seq": seq}, seq))
                poll["after"] = seq
            else:
                await response.write(b": idle\n\n")
            batch = await c.query("events", {**poll, "wait_ms": LONG_POLL_MS})
    except Unauthenticated as err:
        # The page sends the browser to the login form.
        await response.write(_frame("signin", {"why": err.message}, poll["after"]))
    except StratusError as err:
        # The browser reconnects by itself and resumes after the last id.
        await response.write(_frame("trouble", {"why": err.message}, poll["after"]))
    except ConnectionResetError:
        pass  # the browser went away
    finally:
        console.streams.discard(task)
    return response
