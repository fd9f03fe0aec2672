"""The request/reply skeleton every Stratus service shares.

A service (the commands on ``cmd.>``, the queries on ``q.>``, the store swap)
subscribes to its subject, in a queue group when replicas share the work,
and answers each request in a task of its own: nats-py runs one callback at
a time per subscription, so one slow answer must not hold up the requests
behind it. A semaphore bounds the answers in flight; past it the callback
waits, so the backlog stays in nats-py's pending buffer (with its
slow-consumer limits) instead of growing as tasks.

Every answer leaves as a ``Reply``: a ``StratusError`` becomes its typed
refusal, anything else an ``internal`` one whose traceback goes to the
service's log, never to the caller. Replies go only to inboxes
(``respond``), and in clear: the broker lets no connection but the asker
subscribe to the asker's inbox (``events.natscreds``), which is what
sealing replies to a per-request key did when every client shared one
NATS user. ``stop`` stops taking requests, then lets the ones in flight
finish.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import msgspec
from nats.aio.msg import Msg

from stratus.events.commands import Reply, reply_allowed
from stratus.events.errors import Internal, StratusError

# Enough for hundreds of clients at once; past it requests wait in nats-py.
MAX_IN_FLIGHT = 512

_encoder = msgspec.json.Encoder()


def encode_reply(reply: Reply) -> bytes:
    return _encoder.encode(reply)


class Responder:
    """Serves requests on ``subject``; subclasses say how in ``answer``.

    ``internal_message`` is what a caller reads when an answer fails
    unexpectedly; ``log`` (a structlog logger) gets the traceback, with
    ``failed`` as the event.
    """

    internal_message = "internal error"
    failed = "request failed"

    def __init__(
        self,
        nc: Any,
        subject: str,
        *,
        queue: str | None = None,
        max_in_flight: int = MAX_IN_FLIGHT,
        drain_s: float = 5.0,
        log: Any,
    ) -> None:
        self.nc = nc
        self.subject = subject
        self.queue = queue
        self.drain_s = drain_s
        self.log = log
        # Every subscription ``stop`` ends (a subclass may add its own).
        self._subs: list[Any] = []
        self._slots = asyncio.Semaphore(max_in_flight)
        self._tasks: set[asyncio.Task[None]] = set()

    async def answer(self, msg: Msg) -> Reply | bytes:
        """The reply to one request (or its already encoded body); raise a
        ``StratusError`` to refuse."""
        raise NotImplementedError

    async def start(self) -> None:
        sub = await self.nc.subscribe(self.subject, queue=self.queue or "", cb=self._on_msg)
        self._subs.append(sub)

    async def stop(self) -> None:
        """Stop taking requests, then let the ones in flight finish (for at
        most ``drain_s``)."""
        subs, self._subs = self._subs, []
        for sub in subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=self.drain_s)

    async def _on_msg(self, msg: Msg) -> None:
        await self._slots.acquire()
        task = asyncio.create_task(self._serve(msg))
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._slots.release()

    async def _serve(self, msg: Msg) -> None:
        try:
            out = await self.answer(msg)
            body = out if isinstance(out, bytes) else encode_reply(out)
        except StratusError as err:
            body = encode_reply(Reply(ok=False, error=err.to_wire()))
        except Exception:
            self.log.exception(self.failed, subject=msg.subject)
            err = Internal(self.internal_message)
            body = encode_reply(Reply(ok=False, error=err.to_wire()))
        await respond(self.nc, msg, body)


async def respond(nc: Any, msg: Msg, body: bytes) -> None:
    """Answer a request, only if its reply subject is an inbox (a reply
    elsewhere, onto the log say, would be an event no one decided)."""
    if not reply_allowed(msg.reply):
        return
    with contextlib.suppress(Exception):
        await nc.publish(msg.reply, body)
