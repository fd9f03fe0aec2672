"""The query service: ``q.<view>`` requests answered from the projection store."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Annotated, Any, Protocol

import msgspec
import nats.errors
import structlog
from nats.aio.msg import Msg
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from stratus.events.cluster import stream_cluster
from stratus.events.commands import H_AT, MAX_COMMAND_BYTES, Reply, explain
from stratus.events.errors import Invalid, NotFound, StratusError
from stratus.events.heartbeat import beating_hosts
from stratus.events.ids import is_name, is_token
from stratus.events.kinds import PLURALS
from stratus.events.model import record
from stratus.events.responder import Responder
from stratus.events.store import EventStore, Recorded
from stratus.projections import audit, resources, tenants, users
from stratus.projections.db import SharedEngine, sqlite_path
from stratus.projections.leased import lease_row
from stratus.projections.projector import DEFAULT_NAME, digest, quarantine_count, read_checkpoint
from stratus.projections.snapshots import Snapshots
from stratus.projections.timetravel import PastStore, TimeTravel

QUEUE_GROUP = "queries"
MAX_PAGE = 1000
# The longest an events query may wait for a new event (a live page's long
# poll); below the clients' request timeout.
MAX_WAIT_MS = 20_000
LONG_POLL_TICK_S = 0.5
# After a wake-up, how long (and how often) a long poll reads again for the
# event that woke it.
STORE_GRACE_S = 1.0
STORE_POLL_S = 0.005
# How long an audit query waits for the projector to reach the end of the log.
CATCH_UP_WAIT_S = 2.0

log = structlog.get_logger("stratus.query")


class TenantsQuery(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    include_deleted: bool = False


class TenantQuery(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    tenant: str


class StatusQuery(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    digest: bool = True
    # False: the log's and the projector's positions only, without the
    # hosts and services (what a live page asks many times a second).
    parts: bool = True


class UsersQuery(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    pass


class RolesQuery(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    user: str | None = None
    tenant: str | None = None


class EventsQuery(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    after: Annotated[int, msgspec.Meta(ge=0)] = 0
    limit: Annotated[int, msgspec.Meta(ge=1, le=MAX_PAGE)] = 500
    tenant: str | None = None
    # A long poll: when nothing is stored after ``after`` yet, wait up to this
    # long for the first new event instead of answering an empty page. Each
    # poll is authorised like any query, so a live page follows exactly what
    # its caller's token may read, and a revoked token stops it.
    wait_ms: Annotated[int, msgspec.Meta(ge=0, le=MAX_WAIT_MS)] = 0


class WhoamiQuery(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    pass


class AuditQuery(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    tenant: str | None = None
    actor: Annotated[str, msgspec.Meta(max_length=256)] | None = None
    resource: str | None = None
    type: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    # A correlation id: everything one command caused.
    command: str | None = None
    # Paging: rows after this sequence, oldest first (default: the newest).
    after: Annotated[int, msgspec.Meta(ge=0)] | None = None
    limit: Annotated[int, msgspec.Meta(ge=1, le=MAX_PAGE)] = 500


class ListQuery(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    tenant: str | None = None
    name: str | None = None


class ShowQuery(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    ref: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
    tenant: str | None = None


class QuotaQuery(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    tenant: str | None = None


# Kinds anyone may see some of besides their own: public images and
# external networks live in the tenant ``_system``.
_SHARED_KINDS = {"image", "network"}
# Cloud-wide kinds and the permission that reads them.
_CLOUD_KINDS = {"host": "host.list", "flavor": "flavor.list"}


class CallerLike(Protocol):
    user: str
    tenant: str

    @property
    def is_cloud_admin(self) -> bool: ...


class _Trusted:
    user = "system"
    tenant = "admin"
    is_cloud_admin = True


# The identity layer lives in handlers/; it is handed in, not imported, so
# that projections depend on events alone.
Authenticate = Callable[[dict[str, str]], CallerLike]
Authorize = Callable[[CallerLike, str, "str | None"], None]


class Point(msgspec.Struct, frozen=True):
    """The projection store a query reads: the live one (``seq`` None) or
    one rebuilt from the log up to ``seq`` (time travel). ``live`` is the
    live store as of the query's start, which a past point's audit rows
    and digest read (None: ``engine`` is the live store)."""

    engine: AsyncEngine
    seq: int | None = None
    live: AsyncEngine | None = None

    @property
    def live_engine(self) -> AsyncEngine:
        return self.live if self.live is not None else self.engine


class Route(msgspec.Struct, frozen=True):
    params: type
    # run(caller, params, point)
    run: Callable[[Any, Any, Point], Awaitable[Any]]
    permission: str
    # The tenant a request asks about (default: the caller's own).
    tenant_of: Callable[[Any], str | None] | None = None
    # Answered from the log itself: ``--at`` only bounds the read, no past
    # store is built.
    reads_log: bool = False


def _asked(params: Any) -> str | None:
    return params.tenant


class QueryService(Responder):
    """Serves ``q.>``: every answer is scoped to the caller's tenant.

    Without ``authenticate`` every caller is trusted as the cloud admin (tests
    and benchmarks); ``stratus up`` and ``stratus serve`` always pass one.
    """

    failed = "query failed"

    def __init__(
        self,
        store: EventStore,
        engine: AsyncEngine,
        *,
        authenticate: Authenticate | None = None,
        authorize: Authorize | None = None,
        projector_name: str = DEFAULT_NAME,
        queue: str = QUEUE_GROUP,
        timetravel: TimeTravel | None = None,
        quota_defaults: dict[str, int] | None = None,
    ) -> None:
        from stratus.events.resources import QUOTA_DEFAULTS

        super().__init__(store.nc, "q.>", queue=queue, log=log)
        self.quota_defaults = {**QUOTA_DEFAULTS, **(quota_defaults or {})}
        self.store = store
        # The live store, held by each query that reads it (see ``point``).
        self._live = SharedEngine(engine)
        self.timetravel = timetravel or TimeTravel(store, snapshots=_snapshots_of(engine))
        self._leases: dict[int, tuple[SharedEngine, PastStore | None]] = {}
        self.authenticate = authenticate
        self.authorize = authorize
        self.projector_name = projector_name
        self._stopping = False
        # (store, checkpoint, digest) of the last live digest computed.
        self._digest_cache: tuple[AsyncEngine, int, str] | None = None
        # Where the HTTP faces started beside this service answer (``status``).
        self.endpoints: dict[str, str] = {}
        # The broker nodes this service was started beside (``stratus up
        # --cluster``: name, url, alive); without it ``status`` names the
        # nodes holding the log's replicas.
        self.cluster_nodes: Callable[[], list[dict[str, Any]]] | None = None
        self.routes: dict[str, Route] = {
            "whoami": Route(WhoamiQuery, self.q_whoami, "tenant.list"),
            "tenants": Route(TenantsQuery, self.q_tenants, "tenant.list"),
            "tenant": Route(TenantQuery, self.q_tenant, "tenant.show", _asked),
            "status": Route(StatusQuery, self.q_status, "status.read"),
            "users": Route(UsersQuery, self.q_users, "user.list"),
            "roles": Route(RolesQuery, self.q_roles, "role.list", _asked),
            "events": Route(EventsQuery, self.q_events, "events.read", _asked, reads_log=True),
            "audit": Route(AuditQuery, self.q_audit, "audit.read", _asked, reads_log=True),
            "quota": Route(QuotaQuery, self.q_quota, "quota.show", _asked),
        }
        for kind, plural in PLURALS.items():
            perm = _CLOUD_KINDS.get(kind, f"{kind}.read")
            asked = None if kind in _CLOUD_KINDS else _asked
            self.routes[plural] = Route(ListQuery, self._lister(kind, perm), perm, asked)
            self.routes[kind] = Route(ShowQuery, self._shower(kind, perm), perm, asked)

    def permissions(self) -> dict[str, str]:
        return {view: r.permission for view, r in self.routes.items()}

    async def stop(self) -> None:
        # Long polls end at their next tick rather than run out their wait.
        self._stopping = True
        await super().stop()
        await self.timetravel.close()

    @property
    def engine(self) -> AsyncEngine:
        """The live store new queries read."""
        return self._live.engine

    def set_engine(self, engine: AsyncEngine) -> SharedEngine:
        """Answer from another live store from now on (a rebuild's swap).

        One assignment in the event loop: a query reads either store
        entirely, never a mix. Returns the previous store, which queries
        that began on it may still be reading: ``retire`` it to close it
        once they are done.
        """
        old, self._live = self._live, SharedEngine(engine)
        self.timetravel.snapshots = _snapshots_of(engine)
        self._digest_cache = None
        return old

    async def answer(self, msg: Msg) -> Reply:
        return Reply(ok=True, data=await self.handle(msg.subject[2:], msg.data, msg.headers or {}))

    async def handle(self, view: str, data: bytes, headers: dict[str, str] | None = None) -> Any:
        route = self.routes.get(view)
        if route is None:
            raise Invalid(f"unknown query {view!r}; known: {', '.join(sorted(self.routes))}")
        if len(data) > MAX_COMMAND_BYTES:
            raise Invalid("query body too large")
        caller: CallerLike = (
            _Trusted() if self.authenticate is None else self.authenticate(headers or {})
        )
        try:
            params = msgspec.json.decode(data or b"{}", type=route.params)
        except msgspec.ValidationError as exc:
            raise Invalid(f"{view}: {explain(exc)}") from None
        except msgspec.DecodeError:
            raise Invalid(f"{view}: body is not a JSON object") from None
        # Every route's own permission, checked here so no route can forget
        # it; routes narrow further to the caller's tenant themselves.
        asked = route.tenant_of(params) if route.tenant_of else None
        self._check(caller, route.permission, asked or caller.tenant)
        point = await self.point((headers or {}).get(H_AT), build=not route.reads_log)
        try:
            return await route.run(caller, params, point)
        finally:
            await self.release(point)

    async def point(self, at: str | None, *, build: bool = True) -> Point:
        """The store that answers as of ``at`` (None: now); see ``timetravel``.

        The live store (and a past one) is held for the caller until
        ``release(point)``, so a swap cannot close it underneath.
        ``build=False`` only resolves the sequence (routes reading the log).
        """
        live = self._live
        engine = live.hold()
        past: PastStore | None = None
        try:
            if at is None:
                point = Point(engine)
            else:
                seq = await self.timetravel.resolve(at)
                if build:
                    past = await self.timetravel.acquire(seq)
                    point = Point(past.engine, seq, engine)
                else:
                    point = Point(engine, seq)
        except BaseException:
            await live.release()
            raise
        self._leases[id(point)] = (live, past)
        return point

    async def release(self, point: Point) -> None:
        held = self._leases.pop(id(point), None)
        if held is None:
            return
        live, past = held
        try:
            if past is not None:
                await self.timetravel.release(past)
        finally:
            await live.release()

    def _check(self, caller: CallerLike, permission: str, tenant: str | None) -> None:
        if self.authorize is not None:
            self.authorize(caller, permission, tenant)

    def _own_tenant(self, caller: CallerLike, permission: str, asked: str | None) -> str | None:
        """The tenant a scoped read is limited to (None: all, cloud admin only)."""
        if caller.is_cloud_admin:
            return asked
        tenant = asked or caller.tenant
        self._check(caller, permission, tenant)
        return tenant

    def _visible(self, caller: CallerLike, kind: str, perm: str, asked: str | None) -> list | None:
        """Tenants whose ``kind`` rows the caller may read (None: all of them)."""
        if kind in _CLOUD_KINDS:
            return None
        tenant = self._own_tenant(caller, perm, asked)
        if tenant is None:
            return None
        return [tenant, "_system"] if kind in _SHARED_KINDS else [tenant]

    def _lister(self, kind: str, perm: str) -> Callable[..., Awaitable[Any]]:
        async def run(caller: CallerLike, p: ListQuery, pt: Point) -> list[dict]:
            tenants_ = self._visible(caller, kind, perm, p.tenant)
            async with pt.engine.connect() as conn:
                rows = await resources.list_rows(conn, kind, tenants_, p.name)
                if kind == "host":
                    use = await resources.host_use(conn)
                    for row in rows:
                        resources.add_host_use(row, use.get(row["id"]))
                elif kind == "framework":
                    await resources.add_framework_use(conn, rows)
            if kind == "host":
                await self._add_alive(rows, pt)
            return rows

        return run

    def _shower(self, kind: str, perm: str) -> Callable[..., Awaitable[Any]]:
        async def run(caller: CallerLike, p: ShowQuery, pt: Point) -> dict:
            tenants_ = self._visible(caller, kind, perm, p.tenant)
            async with pt.engine.connect() as conn, conn.begin():
                row = await resources.find_row(conn, kind, p.ref, tenants_)
                if row is None:
                    raise NotFound(f"{kind} {p.ref} not found")
                row = await resources.details(conn, kind, row)
            if kind == "host":
                await self._add_alive([row], pt)
            return row

        return run

    async def q_quota(self, caller: CallerLike, p: QuotaQuery, pt: Point) -> dict:
        tenant = p.tenant or caller.tenant
        self._check(caller, "quota.show", tenant)
        async with pt.engine.connect() as conn, conn.begin():
            return await resources.quota_usage(conn, tenant, self.quota_defaults)

    async def q_tenants(self, caller: CallerLike, p: TenantsQuery, pt: Point) -> list[dict]:
        self._check(caller, "tenant.list", None)
        async with pt.engine.connect() as conn:
            found = await tenants.list_tenants(conn, p.include_deleted)
        if caller.is_cloud_admin:
            return found
        return [t for t in found if t["id"] == caller.tenant]

    async def q_tenant(self, caller: CallerLike, p: TenantQuery, pt: Point) -> dict:
        async with pt.engine.connect() as conn:
            found = await tenants.get_tenant(conn, p.tenant)
        if found is None:
            raise NotFound(f"tenant {p.tenant} not found")
        self._check(caller, "tenant.show", found["id"])
        return found

    async def q_users(self, caller: CallerLike, _p: UsersQuery, pt: Point) -> list[dict]:
        self._check(caller, "user.list", None)
        async with pt.engine.connect() as conn:
            return await users.list_users(conn)

    async def q_roles(self, caller: CallerLike, p: RolesQuery, pt: Point) -> list[dict]:
        tenant = self._own_tenant(caller, "role.list", p.tenant)
        async with pt.engine.connect() as conn:
            return await users.list_roles(conn, p.user, tenant)

    async def q_events(self, caller: CallerLike, p: EventsQuery, pt: Point) -> list[dict]:
        tenant = self._own_tenant(caller, "events.read", p.tenant)
        if tenant is not None and not (is_name(tenant) or tenant == "_system"):
            raise Invalid(f"tenant {tenant!r} is not a tenant id")
        subject = f"ev.{tenant}.>" if tenant else "ev.>"
        if not p.wait_ms or pt.seq is not None:
            return await self._events_after(subject, p.after, pt.seq, p.limit)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + p.wait_ms / 1000
        arrivals = None
        woke = -1.0
        try:
            while True:
                out = await self._events_after(subject, p.after, None, p.limit)
                left = deadline - loop.time()
                if out or left <= 0:
                    return out
                if arrivals is None:
                    # Listen first, then read once more: an event stored
                    # between the read and the subscription is not missed.
                    arrivals = await self.store.nc.subscribe(subject, pending_msgs_limit=16)
                    continue
                if loop.time() - woke < STORE_GRACE_S:
                    # Subscribers can see a message before the stream has
                    # stored it: it is there a moment later.
                    await asyncio.sleep(STORE_POLL_S)
                    continue
                if not await self._arrival(arrivals, deadline):
                    return []
                woke = loop.time()
        finally:
            if arrivals is not None:
                with contextlib.suppress(Exception):
                    await arrivals.unsubscribe()

    async def _arrival(self, sub: Any, deadline: float) -> bool:
        """True once a message reaches ``sub`` before ``deadline``; False at
        the deadline or when the service stops (checked every tick, so
        stop() never waits for a long poll to run out)."""
        loop = asyncio.get_running_loop()
        while not self._stopping:
            left = deadline - loop.time()
            if left <= 0:
                return False
            try:
                await sub.next_msg(timeout=min(left, LONG_POLL_TICK_S))
                return True
            except (TimeoutError, nats.errors.TimeoutError):
                continue
        return False

    async def _events_after(
        self, subject: str, after: int, until: int | None, limit: int
    ) -> list[dict]:
        out: list[dict] = []
        async for batch in self.store.read(
            after=after, until=until, subjects=[subject], batch=limit
        ):
            out.extend(_record(r, self.store) for r in batch[: limit - len(out)])
            if len(out) >= limit:
                break
        return out

    async def q_whoami(self, caller: CallerLike, _p: WhoamiQuery, pt: Point) -> dict:
        """The caller's token as the services see it, and the tenants the
        caller holds a role in (where logging in again would take them)."""
        async with pt.engine.connect() as conn:
            assigned = await users.list_roles(conn, caller.user)
        tenants_: dict[str, list[str]] = {}
        for r in assigned:
            tenants_.setdefault(r["tenant"], []).append(r["role"])
        return {
            "user": caller.user,
            "tenant": caller.tenant,
            "roles": list(getattr(caller, "roles", ())),
            "cloud_admin": caller.is_cloud_admin,
            "tenants": [{"tenant": t, "roles": rs} for t, rs in sorted(tenants_.items())],
        }

    async def q_audit(self, caller: CallerLike, p: AuditQuery, pt: Point) -> list[dict]:
        """Who did what, from the audit view (newest last)."""
        tenant = self._own_tenant(caller, "audit.read", p.tenant)
        for what, value in (("resource", p.resource), ("command", p.command)):
            if value is not None and not is_token(value):
                raise Invalid(f"{what} must be an id")
        if tenant is not None and not (is_name(tenant) or tenant == "_system"):
            raise Invalid(f"tenant {tenant!r} is not a tenant id")
        f = audit.AuditFilter(
            tenant=tenant,
            actor=p.actor,
            resource=p.resource,
            type=p.type,
            command=p.command,
            since=p.since,
            until=p.until,
            after=p.after,
            upto=pt.seq,
            limit=p.limit,
        )
        if pt.seq is None:
            await self._caught_up(pt.engine)
        async with pt.engine.connect() as conn:
            rows = await audit.list_audit(conn, f)
        # The event's own fields come from the log itself, secrets redacted.
        for row, rec in zip(rows, await self.store.get([r["seq"] for r in rows]), strict=True):
            row["data"] = _record(rec, self.store).get("data")
        return rows

    async def _caught_up(self, engine: AsyncEngine, last: int | None = None) -> None:
        """Wait (briefly) until the projector has applied what the log held
        when asked (or up to ``last``), so the trail shows the command the
        caller just ran."""
        if last is None:
            last = await self.store.last_seq()
        deadline = asyncio.get_running_loop().time() + CATCH_UP_WAIT_S
        while True:
            async with engine.connect() as conn:
                if await read_checkpoint(conn, self.projector_name) >= last:
                    return
            if asyncio.get_running_loop().time() >= deadline:
                return  # a stalled projector: answer with what is there
            await asyncio.sleep(0.01)

    async def q_status(self, caller: CallerLike, p: StatusQuery, pt: Point) -> dict:
        self._check(caller, "status.read", None)
        last = await self.store.last_seq()
        async with pt.engine.connect() as conn, conn.begin():
            applied = await read_checkpoint(conn, self.projector_name)
            poisoned = await quarantine_count(conn)
            # Which projector process writes a shared store (PostgreSQL).
            lease = await lease_row(conn, self.projector_name) if pt.seq is None else None
            found: str | None = None
            if p.digest and pt.seq is not None:
                # A past store, with the audit rows of the live one up to then.
                await self._caught_up(pt.live_engine, pt.seq)
                async with pt.live_engine.connect() as live, live.begin():
                    found = await digest(conn, live=(live, pt.seq))
            elif p.digest:
                cached = self._digest_cache
                if cached is None or cached[:2] != (pt.engine, applied):
                    # Keyed by store too: a query that began before a swap
                    # must not leave the old store's digest for the new one.
                    cached = self._digest_cache = (pt.engine, applied, await digest(conn))
                found = cached[2]
        out: dict[str, Any] = {
            "last_seq": last,
            "projector_seq": applied,
            "projector_lag": max(0, last - applied),
            "quarantined": poisoned,
        }
        if found is not None:
            out["projection_digest"] = found
        if lease is not None:
            out["projector_lease"] = lease
        if pt.seq is not None:
            out["at"] = pt.seq
        elif p.parts:
            out.update(await self._live_parts(pt))
            out.update(self.endpoints)
        return out

    async def _add_alive(self, hosts: list[dict], pt: Point) -> None:
        """Whether each host beats now: a fact of the present, so a past
        answer (``--at``) says None rather than today's value."""
        alive = None if pt.seq is not None else await self._beating()
        for h in hosts:
            h["alive"] = None if alive is None else h["id"] in alive

    async def _beating(self) -> set[str]:
        try:
            return await beating_hosts(self.store.js)
        except Exception:  # no bucket yet (no agent ever beat), or no JetStream access
            return set()

    async def _live_parts(self, pt: Point) -> dict[str, Any]:
        """Hosts (registered, enabled, beating now) and the scheduler's
        backlog: facts of the present only, so not part of a ``--at`` answer."""
        t = resources.TABLES_BY_KIND["host"]
        async with pt.engine.connect() as conn:
            rows = (await conn.execute(select(t.c.id, t.c.status))).all()
        alive = await self._beating()
        hosts = {
            "registered": len(rows),
            "enabled": sum(1 for r in rows if r.status == "enabled"),
            "alive": len(alive),
        }
        services: dict[str, Any] = {}
        with contextlib.suppress(Exception):  # no scheduler has ever run
            info = await self.store.js.consumer_info(self.store.stream, "scheduler")
            services["scheduler"] = {
                "waiting_replicas": info.num_waiting,
                "backlog": (info.num_pending or 0) + (info.num_ack_pending or 0),
            }
        out: dict[str, Any] = {"hosts": hosts, "services": services}
        with contextlib.suppress(StratusError):  # the stream's leader is being elected
            state = await stream_cluster(self.store.js, self.store.stream)
            if state["name"] is not None:  # a cluster, not one node
                out["cluster"] = self._cluster_part(state)
        return out

    def _cluster_part(self, state: dict[str, Any]) -> dict[str, Any]:
        """The cluster's nodes, which one leads the log, and each replica's
        lag (in messages) behind the leader."""
        if self.cluster_nodes is not None:
            nodes = self.cluster_nodes()
        else:
            nodes = [
                {"name": r["name"], "url": None, "alive": not r["offline"]}
                for r in state["replicas"]
            ]
        return {
            "name": state["name"],
            "nodes": nodes,
            "stream": self.store.stream,
            "stream_leader": state["leader"],
            "replicas_configured": state["replicas_configured"],
            "replicas": state["replicas"],
        }


def _snapshots_of(engine: AsyncEngine) -> Snapshots | None:
    path = sqlite_path(engine)
    return Snapshots.for_store(path) if path is not None else None


def _record(rec: Recorded, store: EventStore) -> dict:
    try:
        return record(rec.seq, rec.subject, rec.decode(store.codec))
    except Exception as exc:
        return record(rec.seq, rec.subject, None, str(exc))
