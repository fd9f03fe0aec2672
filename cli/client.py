"""What the CLI (and any integration) uses to talk to the control plane.

Commands and queries only: a plain nats-py connection, without the event
store (its JetStream reader, the event schemas), which a client never uses
and whose import would be most of a read command's start-up.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import time
from collections.abc import Iterator
from typing import Any

import msgspec
import nats
import nats.errors

from stratus.events.cluster import server_list
from stratus.events.commands import H_AT, H_AUTHORIZATION, H_COMMAND_ID, Reply
from stratus.events.errors import Internal, StratusError, Unauthenticated, Unavailable, from_wire
from stratus.events.ids import new_id
from stratus.events.natscreds import connect_options

_reply = msgspec.json.Decoder(Reply)
_enc = msgspec.json.Encoder()


# How often a request on a connection made elsewhere (whose disconnect
# callbacks are not ours) checks that the connection is still up.
POLL_S = 0.05
# A replica that dies with a request in flight never answers it, and a
# queue group gives no sign: a request that is safe to send again (a
# command with its id, which makes a repeat a duplicate; a query) goes
# again after RESEND_AFTER_S, then after twice as long each time, to
# whichever replica the broker picks, within the caller's timeout.
RESEND_AFTER_S = 1.0


class Drops:
    """The requests in flight on one connection, woken when it drops.

    A reply cannot come over a connection that is gone (and one sent while
    a connection reconnects is lost): a request in flight then fails at
    once as ``unavailable`` instead of waiting out its timeout. Its command
    may or may not have landed; the caller can send it again with the same
    command id (see the README's "Retries").
    """

    def __init__(self) -> None:
        self._waiting: set[asyncio.Future[None]] = set()

    async def dropped(self) -> None:
        """nats-py's ``disconnected_cb`` and ``closed_cb``."""
        for fut in self._waiting:
            if not fut.done():
                fut.set_result(None)

    @contextlib.contextmanager
    def watch(self) -> Iterator[asyncio.Future[None]]:
        """A future that is done once the connection drops (while in the block)."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.add(fut)
        try:
            yield fut
        finally:
            self._waiting.discard(fut)
            fut.cancel()


class Client:
    def __init__(
        self,
        nc: nats.NATS,
        token: str | None = None,
        timeout: float = 10.0,
        *,
        drops: Drops | None = None,
    ) -> None:
        """``drops``: fed by the callbacks of ``nc`` (``connect`` does that);
        without it, a request watches ``nc.is_connected`` instead."""
        self.nc = nc
        self.token = token
        self.timeout = timeout
        self.drops = drops
        self.resent = 0  # requests sent again while unanswered (RESEND_AFTER_S)
        # Made by ``connect``: where, and with which token. The broker admits
        # a connection by its token, so a token set later (after logging in)
        # takes a connection of its own (``_as_token``).
        self._url: str | None = None
        self._connected_as = token

    @classmethod
    async def connect(cls, url: str, token: str | None = None, timeout: float = 10.0) -> Client:
        """One attempt, no reconnecting: a command reaches the control plane
        or says at once that it cannot.

        The broker admits the connection by ``token`` (its auth callout
        verifies it: a revoked or expired token does not connect), with an
        inbox only this connection may read (``events.natscreds``). Without
        a token it may only log in; set ``token`` later and the next request
        connects again with it."""
        nc, drops = await _open(url, token, timeout)
        client = cls(nc, token, timeout, drops=drops)
        client._url = url
        return client

    async def _as_token(self) -> None:
        """Connect again if ``token`` changed since this client connected."""
        if self._url is None or self.token == self._connected_as:
            return
        nc, drops = await _open(self._url, self.token, self.timeout)
        old, self.nc, self.drops, self._connected_as = self.nc, nc, drops, self.token
        with contextlib.suppress(Exception):
            await old.close()

    async def close(self) -> None:
        try:
            await self.nc.drain()
        except Exception:
            await self.nc.close()

    async def request_raw(
        self, subject: str, data: bytes, headers: dict[str, str], timeout: float | None = None
    ) -> bytes:
        """One request (sent again while unanswered, if that is safe: see
        RESEND_AFTER_S); the reply's body."""
        wait = timeout or self.timeout
        deadline = time.monotonic() + wait
        again = subject.startswith("q.") or (subject.startswith("cmd.") and H_COMMAND_ID in headers)
        attempt = RESEND_AFTER_S if again else wait
        try:
            while True:
                left = deadline - time.monotonic()
                try:
                    msg = await self._send(subject, data, headers, min(attempt, left))
                    break
                except (TimeoutError, nats.errors.TimeoutError):
                    if attempt >= left:
                        raise
                attempt *= 2
                self.resent += 1
        except nats.errors.NoRespondersError:
            raise Unavailable(f"no service answers {subject}: is stratus up running?") from None
        except (TimeoutError, nats.errors.TimeoutError):
            raise Unavailable(f"{subject}: no answer within {wait:g}s") from None
        except nats.errors.Error as exc:
            raise Unavailable(f"{subject}: {exc}") from None
        return msg.data

    async def _send(
        self, subject: str, data: bytes, headers: dict[str, str], timeout: float
    ) -> Any:
        """``nc.request``, failing as soon as the connection drops."""
        if not self.nc.is_connected:
            raise Unavailable(f"{subject}: the connection to the control plane is down")
        request = asyncio.ensure_future(
            self.nc.request(subject, data, timeout=timeout, headers=headers)
        )
        with self._dropped() as dropped:
            try:
                await asyncio.wait([request, dropped], return_when=asyncio.FIRST_COMPLETED)
            finally:
                if not request.done():
                    request.cancel()
                    with contextlib.suppress(BaseException):
                        await request
        if request.cancelled():
            raise Unavailable(
                f"{subject}: the connection to the control plane dropped; the outcome is"
                " unknown (a command sent again with the same id is applied at most once)"
            )
        return request.result()

    @contextlib.contextmanager
    def _dropped(self) -> Iterator[asyncio.Future[None]]:
        """A future done once the connection drops."""
        if self.drops is not None:
            with self.drops.watch() as fut:
                yield fut
            return
        poll = asyncio.ensure_future(self._until_down())
        try:
            yield poll
        finally:
            poll.cancel()

    async def _until_down(self) -> None:
        # nats-py takes its disconnect callbacks only when connecting: a
        # connection made elsewhere can only be watched.
        while self.nc.is_connected:  # noqa: ASYNC110
            await asyncio.sleep(POLL_S)

    async def _request(self, subject: str, body: Any, headers: dict[str, str]) -> Reply:
        return decode_reply(subject, await self.send_bytes(subject, _enc.encode(body), headers))

    async def send_bytes(
        self, subject: str, data: bytes, headers: dict[str, str], timeout: float | None = None
    ) -> bytes:
        """A request with this client's token; the reply's body (for bodies
        that are not JSON, such as image chunks)."""
        await self._as_token()
        if self.token:
            headers[H_AUTHORIZATION] = f"Bearer {self.token}"
        return await self.request_raw(subject, data, headers, timeout)

    async def command(self, verb: str, body: Any, command_id: str | None = None) -> Reply:
        """Send ``cmd.<verb>``: its Struct (see ``cli.common.command``), or a
        dict as any client may send; the id makes a retry of the same call
        idempotent."""
        return await self._request(f"cmd.{verb}", body, {H_COMMAND_ID: command_id or new_id()})

    async def control(self, subject: str, body: dict[str, Any]) -> Any:
        """A control-plane request outside ``cmd.``/``q.`` (e.g. a store swap)."""
        return (await self._request(subject, body, {})).data

    async def query(
        self, view: str, body: dict[str, Any] | None = None, at: str | int | None = None
    ) -> Any:
        """Ask ``q.<view>``; ``at`` (a sequence or ISO time) asks about the past."""
        headers = {H_AT: str(at)} if at is not None else {}
        return (await self._request(f"q.{view}", body or {}, headers)).data


def refused_at_connect(exc: BaseException) -> bool:
    """Whether the broker turned the connection down (its auth callout did)."""
    return isinstance(exc, nats.errors.AuthorizationError) or (
        "authorization violation" in str(exc).lower()
    )


def token_refused(token: str | None) -> Unauthenticated:
    """Why the broker refused a connection, as far as the client can tell:
    the broker says only that it was not authorized."""
    if not token:
        return Unauthenticated("the control plane refused the connection")
    expires = _expiry(token)
    if expires is not None and expires < time.time():
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(expires))
        return Unauthenticated(f"token expired at {when}; sign in again (stratus login)")
    return Unauthenticated(
        "the control plane refused the token (revoked, expired, or not issued by this "
        "cloud); sign in again (stratus login)"
    )


def _expiry(token: str) -> int | None:
    """The ``exp`` a token claims (unverified: only to explain a refusal)."""
    try:
        payload = token.split(".")[1]
        claims = msgspec.json.decode(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        return int(claims["exp"])
    except Exception:
        return None


def decode_reply(subject: str, data: bytes) -> Reply:
    """A service's ``Reply``, or the typed error it refused with."""
    try:
        reply = _reply.decode(data)
    except msgspec.DecodeError:
        raise Internal(f"{subject}: unreadable reply") from None
    if not reply.ok:
        if reply.error is None:
            raise StratusError("refused without a reason")
        raise from_wire(reply.error)
    return reply


# A refused connect of a token this process was admitted with before is
# tried again for this long: while the broker restarts its auth callout may
# not be back yet, and the server then refuses every connection alike. A
# token never admitted here (the CLI's one connection, a revoked token
# presented anew) is refused at once.
REFUSED_RETRY_S = 2.0
REFUSED_EVERY_S = 0.2
_admitted: set[str] = set()
_ADMITTED_MAX = 4096


async def _open(url: str, token: str | None, timeout: float) -> tuple[nats.NATS, Drops]:
    """A connection as ``Client.connect`` makes it."""
    deadline = time.monotonic() + REFUSED_RETRY_S
    while True:
        try:
            opened = await _open_once(url, token, timeout)
        except Unauthenticated:
            if token not in _admitted or time.monotonic() >= deadline:
                raise
            expires = _expiry(token) if token else None
            if expires is not None and expires < time.time():
                raise
            await asyncio.sleep(REFUSED_EVERY_S)
            continue
        if token:
            if len(_admitted) >= _ADMITTED_MAX:
                _admitted.clear()
            _admitted.add(token)
        return opened


async def _open_once(url: str, token: str | None, timeout: float) -> tuple[nats.NATS, Drops]:
    nc = nats.NATS()
    drops = Drops()
    try:
        await asyncio.wait_for(
            nc.connect(
                # Several servers (a cluster): each is tried before giving up.
                server_list(url),
                connect_timeout=2,
                allow_reconnect=False,
                # nats-py treats 0 as "no limit".
                max_reconnect_attempts=1,
                error_cb=_quiet,
                disconnected_cb=drops.dropped,
                closed_cb=drops.dropped,
                **connect_options(token),
            ),
            timeout,
        )
    except (TimeoutError, OSError, nats.errors.Error) as exc:
        with contextlib.suppress(Exception):
            await nc.close()
        if refused_at_connect(exc):
            raise token_refused(token) from None
        why = f"{exc or type(exc).__name__}"
        raise Unavailable(f"cannot reach the control plane at {url}: {why}") from None
    return nc, drops


async def _quiet(exc: Exception) -> None:
    # nats-py reports a failed connect here too; the caller gets Unavailable.
    return None
