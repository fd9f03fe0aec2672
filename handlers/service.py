"""The command service: ``cmd.<verb>`` requests in, events appended, replies out.

Run as many as you like: they share work as the NATS queue group
``handlers`` and never coordinate otherwise. Correctness under races comes
from the conditional append (see ``handlers.state``), not from locks.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any

import msgspec
import structlog
from nats.aio.msg import Msg

from stratus.events.commands import (
    H_COMMAND_ID,
    MAX_COMMAND_BYTES,
    Reply,
    explain,
)
from stratus.events.errors import (
    ConcurrencyConflict,
    Conflict,
    Internal,
    Invalid,
    StratusError,
)
from stratus.events.group import GroupCommit
from stratus.events.ids import is_token, new_id
from stratus.events.model import Cause
from stratus.events.sealed import Sealer, respond
from stratus.events.store import Condition, EventStore, subject_matches
from stratus.handlers.rbac import ANONYMOUS, TRUSTED, Caller, RoleBook, Scope, authorize, rule
from stratus.handlers.registry import Handler, Special
from stratus.handlers.state import StateCache

QUEUE_GROUP = "handlers"
MAX_ATTEMPTS = 8
MAX_IN_FLIGHT = 512

log = structlog.get_logger("stratus.handlers")
_reply_encoder = msgspec.json.Encoder()


def encode_reply(reply: Reply) -> bytes:
    return _reply_encoder.encode(reply)


def error_reply(err: StratusError) -> bytes:
    return encode_reply(Reply(ok=False, error=err.to_wire()))


Authenticate = Callable[[dict[str, str]], Caller]


class CommandService:
    """Serves ``cmd.>``.

    ``authenticate`` turns request headers into a ``Caller`` (verifying the
    bearer token) or raises ``Unauthenticated``; without it every request is
    trusted as the cloud administrator, which is for tests and benchmarks of
    the write path only: ``stratus up`` and ``stratus serve`` always pass one.
    """

    def __init__(
        self,
        store: EventStore,
        handlers: Iterable[Handler | Special],
        *,
        authenticate: Authenticate | None = None,
        roles: RoleBook | None = None,
        queue: str = QUEUE_GROUP,
        max_attempts: int = MAX_ATTEMPTS,
        max_in_flight: int = MAX_IN_FLIGHT,
    ) -> None:
        self.store = store
        self.handlers: dict[str, Handler | Special] = {}
        for h in handlers:
            if h.verb in self.handlers:
                raise ValueError(f"two handlers for {h.verb}")
            rule(h.permission)  # no permission entry, no registration
            self.handlers[h.verb] = h
        self._decoders = {v: msgspec.json.Decoder(h.command) for v, h in self.handlers.items()}
        self.authenticate = authenticate
        self.roles = roles
        self.cache = StateCache(store)
        self.appender = GroupCommit(store)
        self.queue = queue
        self.max_attempts = max_attempts
        self._slots = asyncio.Semaphore(max_in_flight)
        self._tasks: set[asyncio.Task[None]] = set()
        self._sub: Any = None
        self.sealer = Sealer()

    async def start(self) -> None:
        self._sub = await self.store.nc.subscribe("cmd.>", queue=self.queue, cb=self._on_msg)

    async def stop(self) -> None:
        """Stop taking requests, then let the ones in flight finish."""
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)

    async def _on_msg(self, msg: Msg) -> None:
        # nats-py runs one callback at a time per subscription: hand each
        # request to its own task so slow appends do not queue the rest.
        await self._slots.acquire()
        task = asyncio.create_task(self._serve(msg))
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._slots.release()

    async def _serve(self, msg: Msg) -> None:
        try:
            body = await self.handle(msg.subject, msg.data, msg.headers or {})
        except StratusError as err:
            body = error_reply(err)
        except Exception:
            log.exception("command failed", subject=msg.subject)
            body = error_reply(Internal("internal error; see the handler log"))
        await respond(self.store.nc, msg, body, self.sealer)

    async def handle(self, subject: str, data: bytes, headers: dict[str, str]) -> bytes:
        verb = subject[4:] if subject.startswith("cmd.") else subject
        handler = self.handlers.get(verb)
        if handler is None:
            raise Invalid(f"unknown command {verb!r}; known: {', '.join(sorted(self.handlers))}")
        if len(data) > MAX_COMMAND_BYTES:
            raise Invalid(f"command body is {len(data)} bytes; the limit is {MAX_COMMAND_BYTES}")
        if rule(handler.permission).scope is Scope.PUBLIC:
            caller = ANONYMOUS
        elif self.authenticate is None:
            caller = TRUSTED
        else:
            caller = self.authenticate(headers)
        command_id = headers.get(H_COMMAND_ID) or new_id()
        if not is_token(command_id):
            raise Invalid(f"header {H_COMMAND_ID} must match [A-Za-z0-9_-]{{1,64}}")
        try:
            cmd = self._decoders[verb].decode(data or b"{}")
        except msgspec.ValidationError as exc:
            raise Invalid(f"{verb}: {explain(exc)}") from None
        except msgspec.DecodeError:
            raise Invalid(f"{verb}: body is not a JSON object") from None
        cause = Cause(
            actor=caller.user,
            correlation_id=command_id,
            causation_id=command_id,
            at=datetime.now(UTC),
        )
        if isinstance(handler, Special):
            authorize(caller, handler.permission, None, self.roles)
            return encode_reply(await handler.run(self, cmd, cause))
        tenant = handler.tenant_of(cmd) if handler.tenant_of else None
        authorize(caller, handler.permission, tenant, self.roles)
        if handler.prepare is not None:
            cmd = await handler.prepare(cmd, caller, self)
        reply = await self.execute(handler, cmd, cause)
        return encode_reply(reply)

    async def execute(self, handler: Handler, cmd: Any, cause: Cause) -> Reply:
        """Decide on the boundary's state and append on the condition it held."""
        boundary = handler.boundary(cmd)
        bind = {"correlation_id": cause.correlation_id, "verb": handler.verb}
        async with self.cache.lock(boundary):
            initial = (
                (lambda: handler.initial_for(boundary)) if handler.initial_for else handler.initial
            )
            tracked = self.cache.get(boundary, initial)
            refreshed = False
            for attempt in range(self.max_attempts):
                done = tracked.ledger.get(cause.correlation_id)
                if done is not None:
                    return self._ok(handler, tracked.state, done, duplicate=True)
                try:
                    events = handler.decide(tracked.state, cmd, cause)
                except StratusError as err:
                    # The cache may be behind another handler's writes:
                    # refuse only on state just read from the log.
                    if not refreshed:
                        await self.cache.refresh(boundary, tracked, handler.fold)
                        refreshed = True
                        continue
                    log.info("command refused", kind=err.kind, reason=err.message, **bind)
                    raise
                if not events:
                    return self._ok(handler, tracked.state, [])
                try:
                    result = await self.appender.append(
                        events,
                        Condition(boundary, tracked.seq),
                        msg_id=cause.correlation_id,
                    )
                except ConcurrencyConflict:
                    await self.cache.refresh(boundary, tracked, handler.fold)
                    refreshed = True
                    if attempt:
                        await asyncio.sleep(random.uniform(0, min(0.05, 0.002 * 2**attempt)))
                    continue
                if result.duplicate:
                    await self.cache.refresh(boundary, tracked, handler.fold)
                    return self._ok(handler, tracked.state, result.seqs, duplicate=True)
                for seq, event in zip(result.seqs, events, strict=True):
                    # Only what matches the boundary moves its position.
                    if subject_matches(boundary, event.subject):
                        tracked.apply(seq, event, handler.fold)
                return self._ok(handler, tracked.state, result.seqs)
        raise Conflict(
            f"{handler.verb}: the state kept changing over {self.max_attempts} attempts; retry"
        )

    @staticmethod
    def _ok(handler: Handler, state: Any, seqs: list[int], duplicate: bool = False) -> Reply:
        data = handler.view(state) if handler.view else None
        return Reply(ok=True, seqs=seqs, data=data, duplicate=duplicate)
