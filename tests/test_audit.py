"""The audit view and ``q.audit``: who did what, answered from SQL, checked against the log."""

from __future__ import annotations

import fnmatch
import random
from datetime import UTC, datetime, timedelta, timezone

import msgspec
import pytest
from sqlalchemy import select

from stratus.events.commands import via_of
from stratus.events.errors import Invalid, NotFound
from stratus.events.identity import LoginFailed, RoleAssigned, UserCreated
from stratus.events.ids import new_id
from stratus.events.model import Cause, Event
from stratus.events.tenants import TenantCreated, TenantDeleted, TenantRenamed
from stratus.handlers.rbac import Caller, authorize
from stratus.projections.audit import audit, result_of
from stratus.projections.projector import Projector, init_schema, quarantine_count
from stratus.projections.query import Point, QueryService

pytestmark = pytest.mark.timeout(60)

BASE = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
_PLUS2 = timezone(timedelta(hours=2))
SECRET_HASH = "scrypt$16384$8$1$c2FsdA$aGFzaC1vZi1hLXNlY3JldA"


def make_history(n_commands: int, seed: int, start: int = 0) -> list[Event]:
    """Commands by several actors in tenants ta and tb and on the system;
    each command (one correlation id) appends one to three events, a minute apart."""
    rng = random.Random(seed)
    events: list[Event] = []
    live: dict[str, list[str]] = {"ta": [], "tb": []}
    for i in range(start, start + n_commands):
        cid = new_id()
        at = BASE + timedelta(minutes=i)
        actor = rng.choice(["alice", "bob", "admin", "scheduler"])
        tenant = rng.choice(["ta", "tb"])
        cause = Cause(actor=actor, correlation_id=cid, causation_id=cid, at=at)
        roll = rng.random()
        if roll < 0.35 or not live[tenant]:
            rid = f"{tenant}-r{i}"
            live[tenant].append(rid)
            first = cause.make(TenantCreated, tenant, "tenant", rid, name=rid)
            events.append(first)
            if rng.random() < 0.5:
                # caused by the first event, same command
                then = Cause(actor, cid, first.id, at)
                events.append(
                    then.make(TenantRenamed, tenant, "tenant", rid, name=f"{rid}x", previous=rid)
                )
        elif roll < 0.55:
            rid = rng.choice(live[tenant])
            events.append(
                cause.make(TenantRenamed, tenant, "tenant", rid, name=f"{rid}-{i}", previous=rid)
            )
        elif roll < 0.65:
            rid = live[tenant].pop(rng.randrange(len(live[tenant])))
            events.append(cause.make(TenantDeleted, tenant, "tenant", rid))
        elif roll < 0.75:
            user = f"u{i}"
            events.append(
                cause.make(
                    UserCreated, "_system", "user", user, name=user, password_hash=SECRET_HASH
                )
            )
            events.append(
                cause.make(
                    RoleAssigned,
                    "_system",
                    "user",
                    user,
                    user=user,
                    role_tenant=tenant,
                    role="reader",
                )
            )
        else:
            who = rng.choice(["alice", "bob", "eve"])
            reason = rng.choice(["bad credentials", "disabled"])
            c = Cause(actor=who, correlation_id=cid, causation_id=cid, at=at)
            events.append(c.make(LoginFailed, "_system", "login", who, user=who, reason=reason))
    return events


async def append_all(store, events: list[Event]) -> None:
    for e in events:
        await store.append([e])


def matches(seq: int, e: Event, q: dict) -> bool:
    """The filter, applied to an event from the log, independently of the view."""
    if "tenant" in q and e.tenant != q["tenant"]:
        return False
    if "actor" in q and e.actor != q["actor"]:
        return False
    if "resource" in q and e.aggregate.id != q["resource"]:
        return False
    if "type" in q and not fnmatch.fnmatchcase(e.type_name(), q["type"]):
        return False
    if "command" in q and e.correlation_id != q["command"]:
        return False
    if "since" in q and e.at < datetime.fromisoformat(q["since"]):
        return False
    if "until" in q and e.at > datetime.fromisoformat(q["until"]):
        return False
    return seq > q.get("after", 0)


def expected(log: list[tuple[int, Event]], q: dict) -> list[int]:
    seqs = [seq for seq, e in log if matches(seq, e, q)]
    limit = q.get("limit", 500)
    return seqs[:limit] if "after" in q else seqs[-limit:]


async def read_log(store) -> list[tuple[int, Event]]:
    return [(r.seq, r.decode()) for r in await store.read_all()]


def payload(e: Event) -> dict:
    raw = msgspec.to_builtins(e)
    skip = {"id", "type", "v", "tenant", "aggregate", "actor", "at"}
    skip |= {"correlation_id", "causation_id"}
    return {
        k: ("<redacted>" if k == "password_hash" else v) for k, v in raw.items() if k not in skip
    }


def row_from_log(seq: int, e: Event) -> dict:
    """What q.audit must show for one event, built from the event itself."""
    reason = getattr(e, "reason", None)
    return {
        "seq": seq,
        "subject": e.subject,
        "type": e.type_name(),
        "tenant": e.tenant,
        "aggregate": {"kind": e.aggregate.kind, "id": e.aggregate.id},
        "actor": e.actor,
        "at": e.at,
        "correlation_id": e.correlation_id,
        "causation_id": e.causation_id,
        "id": e.id,
        "result": reason or "ok",
        # the channel the command id names (openstack-api-<uuid>), else ""
        "via": via_of(e.correlation_id),
        "data": payload(e),
    }


def comparable(row: dict) -> dict:
    return {**row, "at": datetime.fromisoformat(row["at"])}


async def projected(store, engine) -> None:
    p = Projector(store, engine, batch=37)
    try:
        assert await p.catch_up() == await store.last_seq()
    finally:
        p.close()


TOKENS = {
    "ta-member": Caller("alice", "ta", ("member",)),
    "ta-reader": Caller("rex", "ta", ("reader",)),
    "tb-member": Caller("bob", "tb", ("member",)),
    "cloud-admin": Caller("admin", "admin", ("admin",)),
}


def service(store, engine) -> QueryService:
    """The query service with the real RBAC; a header names the caller."""
    return QueryService(store, engine, authenticate=lambda h: TOKENS[h["who"]], authorize=authorize)


async def ask(svc: QueryService, who: str, body: dict) -> list[dict]:
    return await svc.handle("audit", msgspec.json.encode(body), {"who": who})


@pytest.fixture
async def history(store, sqlite_engine):
    events = make_history(120, seed=7)
    await append_all(store, events)
    engine = sqlite_engine()
    await projected(store, engine)
    log = await read_log(store)
    assert len(log) == len(events) and len(log) > 150
    return store, engine, log


# -- filters --------------------------------------------------------------------


async def test_each_filter_alone_and_combined_returns_exactly_the_matching_events(history):
    store, engine, log = history
    svc = service(store, engine)
    by_seq = dict(log)
    rename = next(e for _, e in log if isinstance(e, TenantRenamed) and e.causation_id != e.id)
    two_event_command = next(
        e.correlation_id
        for _, e in log
        if sum(x.correlation_id == e.correlation_id for _, x in log) == 2
    )
    t1 = (BASE + timedelta(minutes=30)).isoformat()
    t2 = (BASE + timedelta(minutes=70)).isoformat()
    cases = [
        {},
        {"tenant": "ta"},
        {"tenant": "tb"},
        {"tenant": "_system"},
        {"actor": "alice"},
        {"actor": "eve"},
        {"actor": "nobody"},
        {"resource": rename.aggregate.id},
        {"type": "tenant.*"},
        {"type": "*.created"},
        {"type": "tenant.?enamed"},
        {"type": "login.failed"},
        {"type": "TENANT.*"},
        {"command": rename.correlation_id},
        {"command": two_event_command},
        {"since": t1},
        {"until": t2},
        {"since": t1, "until": t2},
        # an offset other than UTC means the same instant
        {"since": (BASE + timedelta(minutes=30)).astimezone(_PLUS2).isoformat()},
        {"tenant": "ta", "actor": "alice", "type": "tenant.*"},
        {"actor": "admin", "since": t1, "until": t2},
        {"tenant": "tb", "type": "tenant.deleted", "until": t2},
        {"resource": rename.aggregate.id, "command": rename.correlation_id},
        {"limit": 3},
        {"tenant": "ta", "limit": 5},
        {"after": 40, "limit": 10},
        {"after": 40, "actor": "bob", "limit": 4},
    ]
    for q in cases:
        rows = await ask(svc, "cloud-admin", {"limit": 1000, **q} if "limit" not in q else q)
        want = expected(log, q if "limit" in q else {**q, "limit": 1000})
        assert [r["seq"] for r in rows] == want, q
        # every row is the event as the log has it, plus its result
        for r in rows:
            assert comparable(r) == row_from_log(r["seq"], by_seq[r["seq"]]), q
    # the filters that should match something did (the cases are not vacuous)
    assert len(expected(log, {"command": two_event_command})) == 2
    for q in ({"tenant": "ta", "actor": "alice", "type": "tenant.*"}, {"type": "login.failed"}):
        assert expected(log, {**q, "limit": 1000}), q


async def test_results_say_ok_or_the_reason(history):
    store, engine, log = history
    rows = await ask(service(store, engine), "cloud-admin", {"type": "login.failed"})
    assert rows and {r["result"] for r in rows} <= {"bad credentials", "disabled"}
    assert [r["result"] for r in rows] == [e.reason for _, e in log if isinstance(e, LoginFailed)]
    others = await ask(service(store, engine), "cloud-admin", {"type": "tenant.*"})
    assert others and {r["result"] for r in others} == {"ok"}


class _Failed(Event, frozen=True, tag="thing.failed"):
    pass


class _FailedWithReason(Event, frozen=True, tag="server.failed"):
    reason: str


class _Finished(Event, frozen=True, tag="job.finished"):
    error: str | None = None
    reason: str = ""


@pytest.mark.parametrize(
    ("cls", "fields", "want"),
    [
        (TenantCreated, {"name": "x"}, "ok"),
        (_Failed, {}, "failed"),  # a *.failed type says so, even without a reason
        (_FailedWithReason, {"reason": "no host has 64 GiB"}, "no host has 64 GiB"),
        (_FailedWithReason, {"reason": ""}, "failed"),
        (_Finished, {}, "ok"),  # empty error and reason: it went fine
        (_Finished, {"error": "disk full"}, "disk full"),
        (_Finished, {"reason": "cancelled"}, "cancelled"),
        (_Finished, {"error": "disk full", "reason": "cancelled"}, "disk full"),
        (_Finished, {"error": "x" * 2000}, "x" * 500),
    ],
)
def test_result_is_read_generically_from_the_events_fields(cls, fields, want):
    cause = Cause("u", "c", "c", BASE)
    assert result_of(cause.make(cls, "ta", "thing", "t1", **fields)) == want


# -- paging, points in the past ----------------------------------------------------


async def test_paging_returns_every_row_once(history):
    store, engine, log = history
    svc = service(store, engine)
    for q, page in (({}, 7), ({"tenant": "ta"}, 5), ({"type": "*.created"}, 1000)):
        seen: list[int] = []
        after = 0
        for _ in range(len(log) + 2):  # bounded: a page per row at worst
            rows = await ask(svc, "cloud-admin", {**q, "after": after, "limit": page})
            seen += [r["seq"] for r in rows]
            if len(rows) < page:
                break
            after = rows[-1]["seq"]
        assert seen == [s for s, e in log if matches(s, e, q)], q
        assert len(seen) == len(set(seen))


async def test_a_point_in_the_past_shows_only_what_had_happened(history):
    store, engine, log = history
    svc = service(store, engine)
    half = log[len(log) // 2][0]
    admin = TOKENS["cloud-admin"]
    params = msgspec.convert({"limit": 1000}, svc.routes["audit"].params)
    rows = await svc.q_audit(admin, params, Point(engine, seq=half))
    assert [r["seq"] for r in rows] == [s for s, _ in log if s <= half]


# -- tenant scoping --------------------------------------------------------------


async def test_a_member_sees_only_their_tenant_and_the_cloud_admin_sees_all(history):
    store, engine, log = history
    svc = service(store, engine)
    for who, own in (("ta-member", "ta"), ("ta-reader", "ta"), ("tb-member", "tb")):
        rows = await ask(svc, who, {"limit": 1000})
        assert [r["seq"] for r in rows] == expected(log, {"tenant": own, "limit": 1000}), who
        # a filter narrows within the own tenant, never beyond it
        by_alice = await ask(svc, who, {"actor": "alice", "limit": 1000})
        want = expected(log, {"tenant": own, "actor": "alice", "limit": 1000})
        assert [r["seq"] for r in by_alice] == want and want, who
        # another tenant, or the system's trail, is not theirs to know of
        other = "tb" if own == "ta" else "ta"
        for asked in (other, "_system"):
            with pytest.raises(NotFound):
                await ask(svc, who, {"tenant": asked})
    everything = await ask(svc, "cloud-admin", {"limit": 1000})
    assert [r["seq"] for r in everything] == [s for s, _ in log]
    assert {r["tenant"] for r in everything} == {"ta", "tb", "_system"}


async def test_bad_input_is_invalid_and_changes_nothing(history):
    store, engine, log = history
    svc = service(store, engine)
    last = await store.last_seq()
    for body in (
        {"type": "tenant.[ab]*"},
        {"type": ""},
        {"resource": "a.b"},
        {"command": "not an id"},
        {"tenant": "Not_A_Tenant"},
        {"limit": 0},
        {"limit": 1001},
        {"after": -1},
        {"since": "yesterday"},
        {"actor": "x" * 300},
        {"colour": "red"},
    ):
        with pytest.raises(Invalid):
            await ask(svc, "cloud-admin", body)
    assert await store.last_seq() == last
    async with engine.connect() as conn:
        assert len((await conn.execute(select(audit.c.seq))).all()) == len(log)


# -- the view itself ---------------------------------------------------------------


async def test_the_view_equals_the_log_after_a_projector_restart(store, sqlite_engine, tmp_path):
    events = make_history(60, seed=11)
    await append_all(store, events[: len(events) // 2])
    engine = sqlite_engine()
    first = Projector(store, engine, batch=9)
    try:
        assert await first.catch_up() == len(events) // 2
    finally:
        first.close()
    # more lands while no projector runs; a new one resumes from the checkpoint
    await append_all(store, events[len(events) // 2 :])
    second = Projector(store, engine, batch=9)
    try:
        assert await second.start_position() == len(events) // 2
        assert await second.catch_up() == len(events)
    finally:
        second.close()
    log = await read_log(store)
    rows = await ask(service(store, engine), "cloud-admin", {"limit": 1000})
    assert [comparable(r) for r in rows] == [row_from_log(s, e) for s, e in log]
    # secrets never reach the view: not in its rows, not in the database files
    assert any(r["type"] == "user.created" for r in rows)
    for f in tmp_path.glob("projections.db*"):
        assert SECRET_HASH.encode() not in f.read_bytes(), f


async def test_poison_events_do_not_break_the_audit_view(store, sqlite_engine):
    before = make_history(15, seed=3)
    after = make_history(15, seed=4, start=15)
    await append_all(store, before)
    poison = [b"\x00\xffnot msgpack", msgspec.msgpack.encode({"type": "alien.landed", "v": 1})]
    for data in poison:
        await store.js.publish("ev.ta.tenant.x", data)
    await append_all(store, after)
    engine = sqlite_engine()
    await init_schema(engine)
    await projected(store, engine)
    async with engine.connect() as conn:
        assert await quarantine_count(conn) == len(poison)
    log = []
    for r in await store.read_all():
        try:
            log.append((r.seq, r.decode()))
        except Exception:
            continue
    assert len(log) == len(before) + len(after)
    rows = await ask(service(store, engine), "cloud-admin", {"limit": 1000})
    assert [comparable(r) for r in rows] == [row_from_log(s, e) for s, e in log]
    ta = await ask(service(store, engine), "ta-member", {"limit": 1000})
    assert [r["seq"] for r in ta] == [s for s, e in log if e.tenant == "ta"]
