"""The query service: ``q.<view>`` requests answered from the projection store."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import structlog
from nats.aio.msg import Msg
from sqlalchemy.ext.asyncio import AsyncEngine

from stratus.events.commands import MAX_COMMAND_BYTES, Reply
from stratus.events.errors import Internal, Invalid, NotFound, StratusError
from stratus.events.store import EventStore
from stratus.projections import tenants
from stratus.projections.projector import DEFAULT_NAME, digest, quarantine_count, read_checkpoint

QUEUE_GROUP = "queries"

log = structlog.get_logger("stratus.query")
_enc = msgspec.json.Encoder()


class TenantsQuery(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    include_deleted: bool = False


class TenantQuery(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    tenant: str


class StatusQuery(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    digest: bool = True


class QueryService:
    def __init__(
        self,
        store: EventStore,
        engine: AsyncEngine,
        *,
        projector_name: str = DEFAULT_NAME,
        queue: str = QUEUE_GROUP,
    ) -> None:
        self.store = store
        self.engine = engine
        self.projector_name = projector_name
        self.queue = queue
        self._sub: Any = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._digest_cache: tuple[int, str] | None = None
        self.routes: dict[str, tuple[type, Callable[[Any], Awaitable[Any]]]] = {
            "tenants": (TenantsQuery, self.q_tenants),
            "tenant": (TenantQuery, self.q_tenant),
            "status": (StatusQuery, self.q_status),
        }

    async def start(self) -> None:
        self._sub = await self.store.nc.subscribe("q.>", queue=self.queue, cb=self._on_msg)

    async def stop(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)

    async def _on_msg(self, msg: Msg) -> None:
        task = asyncio.create_task(self._serve(msg))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, msg: Msg) -> None:
        try:
            data = await self.handle(msg.subject[2:], msg.data)
            body = _enc.encode(Reply(ok=True, data=data))
        except StratusError as err:
            body = _enc.encode(Reply(ok=False, error=err.to_wire()))
        except Exception:
            log.exception("query failed", subject=msg.subject)
            body = _enc.encode(Reply(ok=False, error=Internal("internal error").to_wire()))
        if msg.reply:
            with contextlib.suppress(Exception):
                await self.store.nc.publish(msg.reply, body)

    async def handle(self, view: str, data: bytes) -> Any:
        route = self.routes.get(view)
        if route is None:
            raise Invalid(f"unknown query {view!r}; known: {', '.join(sorted(self.routes))}")
        if len(data) > MAX_COMMAND_BYTES:
            raise Invalid("query body too large")
        typ, fn = route
        try:
            params = msgspec.json.decode(data or b"{}", type=typ)
        except msgspec.ValidationError as exc:
            raise Invalid(f"{view}: {exc}") from None
        except msgspec.DecodeError:
            raise Invalid(f"{view}: body is not a JSON object") from None
        return await fn(params)

    async def q_tenants(self, p: TenantsQuery) -> list[dict]:
        async with self.engine.connect() as conn:
            return await tenants.list_tenants(conn, p.include_deleted)

    async def q_tenant(self, p: TenantQuery) -> dict:
        async with self.engine.connect() as conn:
            found = await tenants.get_tenant(conn, p.tenant)
        if found is None:
            raise NotFound(f"tenant {p.tenant} not found")
        return found

    async def q_status(self, p: StatusQuery) -> dict:
        last = await self.store.last_seq()
        async with self.engine.connect() as conn, conn.begin():
            applied = await read_checkpoint(conn, self.projector_name)
            poisoned = await quarantine_count(conn)
            if p.digest and (self._digest_cache is None or self._digest_cache[0] != applied):
                self._digest_cache = (applied, await digest(conn))
        out: dict[str, Any] = {
            "last_seq": last,
            "projector_seq": applied,
            "projector_lag": max(0, last - applied),
            "quarantined": poisoned,
        }
        if p.digest and self._digest_cache is not None:
            out["projection_digest"] = self._digest_cache[1]
        return out
