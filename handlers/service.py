"""The command service: ``cmd.<verb>`` requests in, events appended, replies out.

Run as many as you like: they share work as the NATS queue group
``handlers`` and never coordinate otherwise. Correctness under races comes
from the conditional append (see ``handlers.state``), not from locks.
"""

from __future__ import annotations

import asyncio
import random
from collections import OrderedDict
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
from stratus.events.responder import Responder, encode_reply
from stratus.events.store import Condition, EventStore, subject_matches
from stratus.handlers.rbac import ANONYMOUS, TRUSTED, Caller, RoleBook, Scope, authorize, rule
from stratus.handlers.registry import Handler, Special
from stratus.handlers.state import StateCache, Tracked

QUEUE_GROUP = "handlers"
# Enough for dozens of commands racing on one tenant or one pool.
MAX_ATTEMPTS = 16
MAX_IN_FLIGHT = 512
OWN_REMEMBERED = 4096

log = structlog.get_logger("stratus.handlers")


Authenticate = Callable[[dict[str, str]], Caller]


class CommandService(Responder):
    """Serves ``cmd.<kind>.<verb>``.

    ``authenticate`` turns request headers into a ``Caller`` (verifying the
    bearer token) or raises ``Unauthenticated``; without it every request is
    trusted as the cloud administrator, which is for tests and benchmarks of
    the write path only: ``stratus up`` and ``stratus serve`` always pass one.
    """

    internal_message = "internal error; see the handler log"
    failed = "command failed"

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
        # Verbs are ``<kind>.<verb>``: subjects of four tokens and more
        # (``cmd.image.upload.<session>``) are the image service's.
        super().__init__(store.nc, "cmd.*.*", queue=queue, max_in_flight=max_in_flight, log=log)
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
        self.max_attempts = max_attempts
        # Commands this service appended lately: their events, seen again
        # on the stream, are not news to its cache.
        self._own: OrderedDict[str, None] = OrderedDict()
        self.conflicts = 0

    async def start(self) -> None:
        # Stopped with the requests' subscription (``Responder.stop``).
        self._subs.append(await self.nc.subscribe("ev.>", cb=self._on_event))
        await super().start()

    async def _on_event(self, msg: Msg) -> None:
        try:
            event = self.store.codec.decode(msg.data)
        except Exception:
            return  # not ours to judge: the projector quarantines it
        if event.correlation_id not in self._own:
            self.cache.invalidate(msg.subject, event.tenant)

    def _mine(self, command_id: str) -> None:
        self._own[command_id] = None
        if len(self._own) > OWN_REMEMBERED:
            self._own.popitem(last=False)

    async def answer(self, msg: Msg) -> bytes:
        return await self.handle(msg.subject, msg.data, msg.headers or {})

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
            tenant = None
            if handler.tenant_of is not None:
                if getattr(cmd, "tenant", "") is None:
                    cmd = msgspec.structs.replace(cmd, tenant=caller.tenant)
                tenant = handler.tenant_of(cmd)
            authorize(caller, handler.permission, tenant, self.roles)
            return encode_reply(await handler.run(self, cmd, cause))
        if getattr(cmd, "tenant", "") is None:
            # Left out: the caller acts in the tenant of its token.
            cmd = msgspec.structs.replace(cmd, tenant=caller.tenant)
        tenant = handler.tenant_of(cmd) if handler.tenant_of else None
        authorize(caller, handler.permission, tenant, self.roles)
        if handler.prepare is not None:
            cmd = await handler.prepare(cmd, caller, self)
        reply = await self.execute(handler, cmd, cause)
        return encode_reply(reply)

    async def execute(self, handler: Handler, cmd: Any, cause: Cause) -> Reply:
        """Decide on the boundary's state and append on the condition it held."""
        boundary = handler.boundary(cmd)
        second = handler.also(cmd) if handler.also else None
        if second is None:
            async with self.cache.lock(boundary):
                return await self._decide_and_append(handler, cmd, cause, boundary, None)
        # Two boundaries: always lock in one order, so two commands that
        # need the same pair cannot wait on each other.
        first, last = sorted((boundary, second))
        async with self.cache.lock(first), self.cache.lock(last):
            return await self._decide_and_append(handler, cmd, cause, boundary, second)

    async def _decide_and_append(
        self, handler: Handler, cmd: Any, cause: Cause, boundary: str, second: str | None
    ) -> Reply:
        bind = {"correlation_id": cause.correlation_id, "verb": handler.verb}
        initial = (
            (lambda: handler.initial_for(boundary)) if handler.initial_for else handler.initial
        )
        also_fold = handler.also_fold or handler.fold
        tracked = self.cache.get(boundary, initial, handler.fold)
        other = (
            self.cache.get(second, handler.also_initial, also_fold)  # type: ignore[arg-type]
            if second is not None
            else None
        )

        async def refresh() -> None:
            # (Tracked.stale is cleared by the refresh itself.)
            await self.cache.refresh(boundary, tracked, handler.fold)
            if other is not None:
                await self.cache.refresh(second, other, also_fold)  # type: ignore[arg-type]

        refreshed = False
        if tracked.stale or (other is not None and other.stale):
            await refresh()
            refreshed = True
        for attempt in range(self.max_attempts):
            state = tracked.state if other is None else (tracked.state, other.state)
            try:
                events = handler.decide(state, cmd, cause)
            except StratusError as err:
                # The cache may be behind another handler's writes:
                # refuse only on state just read from the log.
                if not refreshed:
                    await refresh()
                    refreshed = True
                    continue
                # A retry of a command that landed is refused by the state
                # it made itself (already_exists, not_found, quota): answer
                # it as the original was answered.
                done = await self._applied(handler, tracked, cause)
                if done is not None:
                    return done
                log.info("command refused", kind=err.kind, reason=err.message, **bind)
                raise
            if not events:
                # (or a retry that finds its own events there: nothing to do)
                done = await self._applied(handler, tracked, cause)
                return done or self._ok(handler, tracked.state, [])
            conditions = (
                [Condition(boundary, tracked.seq)]
                if other is None
                else _conditions(events, [(boundary, tracked.seq), (second, other.seq)])  # type: ignore[list-item]
            )
            self._mine(cause.correlation_id)
            try:
                result = await self.appender.append(events, conditions, msg_id=cause.correlation_id)
            except ConcurrencyConflict:
                self.conflicts += 1
                await refresh()
                refreshed = True
                if attempt:
                    await asyncio.sleep(random.uniform(0, min(0.05, 0.002 * 2**attempt)))
                continue
            if result.duplicate:
                # A retry, decided again and stopped by the broker.
                await refresh()
                done = await self._applied(handler, tracked, cause)
                return done or self._ok(handler, tracked.state, result.seqs, duplicate=True)
            for seq, event in zip(result.seqs, events, strict=True):
                # Only what matches the boundary moves its position.
                if subject_matches(boundary, event.subject):
                    tracked.apply(seq, event, handler.fold)
                if other is not None and subject_matches(second, event.subject):  # type: ignore[arg-type]
                    other.apply(seq, event, also_fold)
            return self._ok(handler, tracked.state, result.seqs, events=events)
        raise Conflict(
            f"{handler.verb}: the state kept changing over {self.max_attempts} attempts; retry"
        )

    async def _applied(self, handler: Handler, tracked: Tracked[Any], cause: Cause) -> Reply | None:
        """The original answer to this command if it was applied already:
        its events, all of them, as the log has them (None: it was not).

        The broker remembers the command ids it stored for its duplicate
        window, across restarts (``EventStore.find_append``), so a retry is
        recognised whatever came between; nothing else needs to remember
        (``tracked`` is fresh when this is asked: it has the events).
        """
        recs = await self.store.find_append(cause.correlation_id)
        if not recs:
            return None
        events = [r.decode(self.store.codec) for r in recs]
        return self._ok(handler, tracked.state, [r.seq for r in recs], True, events)

    @staticmethod
    def _ok(
        handler: Handler,
        state: Any,
        seqs: list[int],
        duplicate: bool = False,
        events: list[Any] | None = None,
    ) -> Reply:
        if handler.result is not None:
            data = handler.result(state, events or [])
        else:
            data = handler.view(state) if handler.view else None
        return Reply(ok=True, seqs=seqs, data=data, duplicate=duplicate)


def _conditions(events: list, bounds: list[tuple[str, int]]) -> list[Condition]:
    """One condition per boundary, each on a different member of the batch
    (a message carries one expected-sequence check), preferring a member
    whose subject the boundary matches."""
    taken: set[int] = set()
    out: list[Condition] = []
    for subject, seq in bounds:
        order = sorted(
            range(len(events)), key=lambda i: not subject_matches(subject, events[i].subject)
        )
        index = next((i for i in order if i not in taken), None)
        if index is None:
            raise Internal(f"{len(bounds)} conditions need as many events; got {len(events)}")
        taken.add(index)
        out.append(Condition(subject, seq, index))
    return out
