"""How the OpenStack API reaches the control plane: as a client, like the CLI.

The API keeps no state of its own. Each HTTP request becomes the same
``cmd.<verb>`` and ``q.<view>`` requests the CLI sends, with the caller's
own token (``X-Auth-Token`` is a Stratus token), so the services verify it,
check RBAC and scope every answer to its tenant exactly as for the CLI.
Commands carry ids that name this channel (``openstack-api-<uuid>``), which
the audit trail shows as ``via``.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import jwt
import msgspec
import nats

from stratus.cli.client import Client
from stratus.events.commands import command_id_via
from stratus.events.errors import StratusError, Unauthenticated, Unavailable
from stratus.events.store import connect_nats

VIA = "openstack-api"


class Claims(msgspec.Struct, frozen=True):
    """What a token says about its holder, read without verifying it: for
    shaping answers only. Every decision is the services', which verify."""

    token_id: str
    user: str
    tenant: str
    roles: tuple[str, ...]
    issued_at: int
    expires_at: int


def claims_of(token: str) -> Claims:
    try:
        raw = jwt.decode(token, options={"verify_signature": False, "verify_exp": False})
        return Claims(
            token_id=str(raw["jti"]),
            user=str(raw["sub"]),
            tenant=str(raw["tenant"]),
            roles=tuple(str(r) for r in raw.get("roles", ())),
            issued_at=int(raw["iat"]),
            expires_at=int(raw["exp"]),
        )
    except (jwt.PyJWTError, KeyError, TypeError, ValueError):
        raise Unauthenticated("the token is not a Stratus token") from None


# How long a write waits for the projector to apply its events, so the
# caller's next read (Tempest's, the SDK's) sees what it just did.
SETTLE_S = 5.0
SETTLE_POLL_S = 0.01
# Commands wait behind the others of a busy handler: more than the CLI's 10 s.
TIMEOUT_S = 30.0


class Settler:
    """Waits until the projector has applied a sequence, for every waiting
    request of the process at once: one ``q.status`` poll at a time however
    many writes wait (a poll per waiter would load the query service with
    the very concurrency it is waiting out)."""

    def __init__(self) -> None:
        self.applied = 0
        # (sequence, future, client, deadline)
        self._waiters: list[tuple[int, asyncio.Future[None], Client, float]] = []
        self._task: asyncio.Task[None] | None = None

    async def wait(self, client: Client, seq: int) -> None:
        if seq <= self.applied:
            return
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        self._waiters.append((seq, fut, client, loop.time() + SETTLE_S))
        if self._task is None:
            self._task = asyncio.create_task(self._poll())
        # A stalled projector: answer anyway, the write is on the log.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(fut), SETTLE_S)

    async def _poll(self) -> None:
        try:
            while self._waiters:
                # Asked with a waiting caller's own token (status is any token's).
                client = self._waiters[-1][2]
                with contextlib.suppress(StratusError):
                    status = await client.query("status", {"digest": False})
                    self.applied = max(self.applied, int(status["projector_seq"]))
                now = asyncio.get_running_loop().time()
                waiting = []
                for w in self._waiters:
                    seq, fut, _, deadline = w
                    if seq <= self.applied and not fut.done():
                        fut.set_result(None)
                    elif not fut.done() and now < deadline:
                        waiting.append(w)
                self._waiters = waiting
                if waiting:
                    await asyncio.sleep(SETTLE_POLL_S)
        finally:
            self._task = None


class Session:
    """One request's access to the control plane, as the token's holder."""

    def __init__(self, client: Client, settler: Settler, request_id: str | None = None) -> None:
        self.client = client
        self.settler = settler
        # The request's id names its first command (X-OpenStack-Request-Id
        # req-<uuid> is the audit trail's openstack-api-<uuid>).
        self._first_id = f"{VIA}-{request_id}" if request_id else None

    @property
    def token(self) -> str | None:
        return self.client.token

    async def command(self, verb: str, body: dict[str, Any], *, settle: bool = True) -> Any:
        """Send a command; with ``settle`` (the default), answer once the
        views show its events: reads after a write see the write."""
        cid, self._first_id = self._first_id or command_id_via(VIA), None
        reply = await self.client.command(verb, body, cid)
        if settle and reply.seqs:
            await self.settler.wait(self.client, max(reply.seqs))
        return reply.data

    async def query(self, view: str, body: dict[str, Any] | None = None) -> Any:
        return await self.client.query(view, body)

    async def settle(self) -> None:
        """Wait until the views show everything on the log now (a write made
        by a service on the caller's behalf, whose sequence it never saw)."""
        status = await self.client.query("status", {"digest": False, "parts": False})
        await self.settler.wait(self.client, int(status["last_seq"]))


class ControlPlane:
    """One NATS connection for every request of the process: a gateway's,
    admitted by its openstack-api credential (``connect``: its connect
    options, ``events.natscreds``), forwarding each caller's own token."""

    def __init__(self, nc: nats.NATS, timeout: float = TIMEOUT_S) -> None:
        self.nc = nc
        self.timeout = timeout
        self.settler = Settler()

    @classmethod
    async def connect(
        cls, url: str, timeout: float = TIMEOUT_S, connect: dict[str, Any] | None = None
    ) -> ControlPlane:
        try:
            nc = await connect_nats(url, persistent=True, **(connect or {}))
        except Unavailable as exc:
            raise Unavailable(f"cannot reach the control plane: {exc.message}") from None
        return cls(nc, timeout)

    def session(self, token: str | None, request_id: str | None = None) -> Session:
        client = Client(self.nc, token, self.timeout)
        return Session(client, self.settler, request_id)

    async def close(self) -> None:
        try:
            await self.nc.drain()
        except Exception:
            await self.nc.close()
