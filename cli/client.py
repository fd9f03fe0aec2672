"""What the CLI (and any integration) uses to talk to the control plane."""

from __future__ import annotations

from typing import Any

import msgspec
import nats
import nats.errors

from stratus.events.commands import H_AT, H_AUTHORIZATION, H_COMMAND_ID, Reply
from stratus.events.errors import Internal, StratusError, Unavailable, from_wire
from stratus.events.ids import new_id
from stratus.events.sealed import H_REPLY_KEY, H_SEALED, Opener
from stratus.events.store import connect_nats

_reply = msgspec.json.Decoder(Reply)
_enc = msgspec.json.Encoder()


class Client:
    def __init__(
        self,
        nc: nats.NATS,
        token: str | None = None,
        timeout: float = 10.0,
        opener: Opener | None = None,
    ) -> None:
        self.nc = nc
        self.token = token
        self.timeout = timeout
        # A long-lived caller (the OpenStack API: a Client per request) shares
        # one key, so the services' per-peer key cache works for it.
        self.opener = opener or Opener()

    @classmethod
    async def connect(cls, url: str, token: str | None = None, timeout: float = 10.0) -> Client:
        try:
            nc = await connect_nats(url, persistent=False)
        except Unavailable as exc:
            raise Unavailable(f"cannot reach the control plane: {exc.message}") from None
        return cls(nc, token, timeout)

    async def close(self) -> None:
        try:
            await self.nc.drain()
        except Exception:
            await self.nc.close()

    async def request_raw(self, subject: str, data: bytes, headers: dict[str, str]) -> bytes:
        """One request; the reply's body, unsealed (see ``events.sealed``)."""
        headers[H_REPLY_KEY] = self.opener.public_b64
        try:
            msg = await self.nc.request(subject, data, timeout=self.timeout, headers=headers)
        except nats.errors.NoRespondersError:
            raise Unavailable(f"no service answers {subject}: is stratus up running?") from None
        except (TimeoutError, nats.errors.TimeoutError):
            raise Unavailable(f"{subject}: no answer within {self.timeout}s") from None
        except nats.errors.Error as exc:
            raise Unavailable(f"{subject}: {exc}") from None
        sealed = (msg.headers or {}).get(H_SEALED)
        return self.opener.open(sealed, msg.subject, msg.data) if sealed else msg.data

    async def _request(self, subject: str, body: Any, headers: dict[str, str]) -> Reply:
        if self.token:
            headers[H_AUTHORIZATION] = f"Bearer {self.token}"
        data = await self.request_raw(subject, _enc.encode(body), headers)
        try:
            reply = _reply.decode(data)
        except msgspec.DecodeError:
            raise Internal(f"{subject}: unreadable reply") from None
        if not reply.ok:
            if reply.error is None:
                raise StratusError("refused without a reason")
            raise from_wire(reply.error)
        return reply

    async def command(
        self, verb: str, body: dict[str, Any], command_id: str | None = None
    ) -> Reply:
        """Send ``cmd.<verb>``; the id makes a retry of the same call idempotent."""
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
