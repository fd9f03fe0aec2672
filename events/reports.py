"""Host agents' reports on subjects they may not write: sent through a relay.

An agent's credential may append on its own host's subject only
(``ev._system.host.<host>``, ``ev._system.network-agent.<host>``): subject
permissions cannot know which servers are placed on a host, so it may not
append on ``ev.<tenant>.server.<id>`` at all. Its reports there (a server
building, running, stopped, failed, deleted; a snapshot's image; a port
bound) go as a request to ``report.<host>``, which the broker lets only
that host's agent send. The relay (``handlers.reports``, in the handlers)
appends each one, with the agent's own condition and message id, if and
only if it is about a server placed on that host. The agent sees what the
store's ``append`` gives: the sequence numbers, or the same typed errors
(``ConcurrencyConflict`` when its condition no longer holds).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

import msgspec
import nats.errors

from stratus.events.catalog import CODEC
from stratus.events.errors import (
    ConcurrencyConflict,
    ErrorBody,
    StratusError,
    Unavailable,
    from_wire,
)
from stratus.events.model import Codec, Event
from stratus.events.store import AppendResult, Condition

REPORT_SUBJECT = "report.{host}"

# A relay replica killed with a report in flight never answers it, and one
# not started yet is "no responders": an identified report (a message id)
# goes again, to whichever replica answers, after at most ATTEMPT_S, with
# a growing pause between tries, until the whole ``timeout`` is spent. The
# id makes a retry of a report that did land a duplicate (the relay's store
# finds the first append), so a retry never appends twice.
ATTEMPT_S = 2.5
PAUSES_S = (0.05, 0.2, 0.5, 1.0)


class ReportRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One event (codec-encoded) an agent reports, with its append's terms.

    ``server`` names the server (of the event's tenant) the report is about
    when the event is not on that server's own subject (a snapshot's image).
    ``more``: further events on the same subject, appended with ``event``
    as one atomic batch (a network agent's address-block claims).
    """

    event: bytes
    condition: Condition | None = None
    msg_id: str | None = None
    server: str = ""
    more: list[bytes] = []


class ReportReply(msgspec.Struct, frozen=True, omit_defaults=True):
    ok: bool
    seqs: list[int] = []
    duplicate: bool = False
    error: ErrorBody | None = None
    # A refused condition: the subject's last sequence, when the broker said.
    actual: int | None = None


_request = msgspec.msgpack.Encoder()
REQUEST = msgspec.msgpack.Decoder(ReportRequest)
_reply = msgspec.msgpack.Decoder(ReportReply)
REPLY = msgspec.msgpack.Encoder()


class Reporter:
    """An agent's side: ``append`` like ``EventStore.append``, through the
    relay of ``host``: one event, or several on one subject (atomic)."""

    def __init__(
        self,
        nc: Any,
        host: str,
        *,
        codec: Codec = CODEC,
        timeout: float = 15.0,
        attempt_s: float = ATTEMPT_S,
    ) -> None:
        self.nc = nc
        self.subject = REPORT_SUBJECT.format(host=host)
        self.codec = codec
        self.timeout = timeout
        self.attempt_s = attempt_s
        self.retried = 0  # tries after the first (for tests and status)

    async def append(
        self,
        events: Sequence[Event],
        condition: Condition | None = None,
        *,
        msg_id: str | None = None,
        server: str = "",
    ) -> AppendResult:
        if not events:
            raise ValueError("a report holds an event")
        first, *more = (self.codec.encode(ev) for ev in events)
        req = ReportRequest(first, condition, msg_id, server, more)
        data = _request.encode(req)
        deadline = time.monotonic() + self.timeout
        tries = 0
        while True:
            try:
                return await self._once(data, condition, deadline, retry=msg_id is not None)
            except Unavailable:
                pause = PAUSES_S[min(tries, len(PAUSES_S) - 1)]
                if msg_id is None or time.monotonic() + pause >= deadline:
                    raise
            await asyncio.sleep(pause)
            tries += 1
            self.retried += 1

    async def _once(
        self, data: bytes, condition: Condition | None, deadline: float, *, retry: bool
    ) -> AppendResult:
        left = deadline - time.monotonic()
        wait = min(self.attempt_s, left) if retry else left
        try:
            msg = await self.nc.request(self.subject, data, timeout=max(wait, 0.01))
        except nats.errors.NoRespondersError:
            raise Unavailable(
                f"no relay answers {self.subject}: are the handlers running?"
            ) from None
        except (TimeoutError, nats.errors.Error) as exc:
            raise Unavailable(f"{self.subject}: {type(exc).__name__} {exc}") from None
        try:
            reply = _reply.decode(msg.data)
        except msgspec.DecodeError:
            raise StratusError(f"{self.subject}: an unreadable answer") from None
        if reply.ok:
            return AppendResult(reply.seqs, reply.duplicate)
        err = reply.error or ErrorBody("error", "refused without a reason")
        if err.kind == ConcurrencyConflict.kind and condition is not None:
            raise ConcurrencyConflict(err.message, condition.last_seq, reply.actual)
        raise from_wire(err)
