"""Rebuild: a fresh store replayed from the log equals the live one, and swaps in live."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stratus.cli.client import Client
from stratus.events.errors import Invalid, StratusError
from stratus.handlers.identity import handlers as identity_handlers
from stratus.handlers.service import CommandService
from stratus.handlers.tenants import HANDLERS as tenant_handlers
from stratus.projections.db import make_engine, sqlite_url
from stratus.projections.projector import Projector, init_schema, store_digest
from stratus.projections.query import QueryService
from stratus.projections.rebuild import (
    LIVE_POINTER,
    SWAP_SUBJECT,
    LiveProjection,
    SwapService,
    build_store,
    live_store_path,
    new_store_path,
)
from stratus.projections.views import all_views
from stratus.tests.test_projector import append_all, make_history, wait_for_checkpoint

pytestmark = pytest.mark.timeout(180)

# -- random histories through the real command service -----------------------

TENANTS = st.sampled_from(["acme", "globex", "initech", "umbrella"])
USERS = st.sampled_from(["alice", "bob", "carol"])
ROLES = st.sampled_from(["admin", "member", "reader"])
POISON = st.sampled_from([b"", b"\x00\xff not msgpack", b'{"type": "tenant.created"}'])

# verb -> how to draw its body. A verb added here (with its handler below) is
# exercised by the property test; "poison" is raw bytes a foreign writer put
# on the stream, bypassing the command service.
VERBS: dict[str, st.SearchStrategy] = {
    "tenant.create": st.fixed_dictionaries({"name": TENANTS}),
    "tenant.rename": st.fixed_dictionaries({"tenant": TENANTS, "name": TENANTS}),
    "tenant.delete": st.fixed_dictionaries({"tenant": TENANTS}),
    "user.create": st.fixed_dictionaries({"name": USERS, "password": st.just("pass-word-1")}),
    "user.disable": st.fixed_dictionaries({"name": USERS}),
    "user.enable": st.fixed_dictionaries({"name": USERS}),
    "role.assign": st.fixed_dictionaries({"user": USERS, "tenant": TENANTS, "role": ROLES}),
    "role.revoke": st.fixed_dictionaries({"user": USERS, "tenant": TENANTS, "role": ROLES}),
    "poison": POISON,
}
STEPS = st.lists(
    st.sampled_from(sorted(VERBS)).flatmap(lambda v: st.tuples(st.just(v), VERBS[v])),
    min_size=1,
    max_size=30,
)
_run = itertools.count()


async def play(svc: CommandService, steps: list) -> int:
    """Run the steps; returns how many were accepted (refusals append nothing)."""
    accepted = 0
    for verb, body in steps:
        if verb == "poison":
            await svc.store.js.publish("ev.x.tenant.x", body)
            accepted += 1
            continue
        try:
            await svc.handle(f"cmd.{verb}", json.dumps(body).encode(), {})
            accepted += 1
        except StratusError:
            pass
    return accepted


@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(steps=STEPS)
async def test_rebuild_equals_the_live_store_after_any_history(store, tmp_path, steps):
    n = next(_run)
    # given a live projector following the log while commands run
    live_engine = make_engine(sqlite_url(tmp_path / f"live-{n}.db"))
    live = LiveProjection(store, live_engine, snapshot_every=7)
    await live.start()
    svc = CommandService(store, [*tenant_handlers, *identity_handlers()])
    try:
        await play(svc, steps)
        last = await store.last_seq()
        await wait_for_checkpoint(live_engine, last)
        # when the log is replayed into a new file
        path = tmp_path / f"rebuilt-{n}.db"
        built = await build_store(store, path)
        assert built.seq == last
        rebuilt = make_engine(sqlite_url(path))
        try:
            # then both hold the same content at the same checkpoint
            assert await store_digest(rebuilt) == await store_digest(live_engine)
        finally:
            await rebuilt.dispose()
    finally:
        await live.stop()
        await live_engine.dispose()


# -- swapping under load -----------------------------------------------------


class Plant:
    """A live projection, a query service and the swap service, on NATS."""

    def __init__(self, store, data_dir: Path) -> None:
        self.store = store
        self.data_dir = data_dir
        data_dir.mkdir(parents=True, exist_ok=True)
        self.live = LiveProjection(store, make_engine(sqlite_url(live_store_path(data_dir))))
        self.queries = QueryService(store, self.live.engine)
        self.swapper = SwapService(store, self.live, self.queries, data_dir)

    async def __aenter__(self) -> Plant:
        await self.live.start()
        await self.queries.start()
        await self.swapper.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.swapper.stop()
        await self.queries.stop()
        await self.live.stop()
        await self.live.engine.dispose()


async def fresh_digest(store, path: Path, until: int) -> tuple[int, str]:
    engine = make_engine(sqlite_url(path))
    try:
        projector = Projector(store, engine)
        await projector.catch_up(until=until)
        projector.close()
        return await store_digest(engine)
    finally:
        await engine.dispose()


async def test_a_swap_under_a_stream_of_queries_fails_none(store, nats_server, tmp_path):
    events = make_history(400, seed=21)
    created = [e.aggregate.id for e in events if type(e).__name__ == "TenantCreated"]
    await append_all(store, events[:300])
    data_dir = tmp_path / "data"
    async with Plant(store, data_dir) as plant:
        old_path = live_store_path(data_dir)
        await wait_for_checkpoint(plant.live.engine, 300)
        client = await Client.connect(nats_server.url)
        answers: list[tuple[int, list[str]]] = []
        failures: list[BaseException] = []
        stop = asyncio.Event()

        async def ask_forever() -> None:
            deadline = time.monotonic() + 60
            for _ in range(5000):
                if stop.is_set() or time.monotonic() > deadline:
                    return
                try:
                    status = await client.query("status", {"digest": False})
                    listed = await client.query("tenants", {"include_deleted": True})
                except Exception as exc:
                    failures.append(exc)
                    continue
                answers.append((status["projector_seq"], sorted(t["id"] for t in listed)))

        asker = asyncio.create_task(ask_forever())
        try:
            # when a rebuilt store is swapped in while events keep landing
            path = new_store_path(data_dir)
            built = await build_store(store, path)
            assert built.seq == 300
            await append_all(store, events[300:])
            before = len(answers)
            swapped = await client.control(SWAP_SUBJECT, {"store": path.name})
            await asyncio.sleep(0.3)
            assert len(answers) > before, "queries kept being answered"
        finally:
            stop.set()
            await asyncio.wait_for(asker, 30)
            await client.close()

        # then no query failed, and every answer was a whole world: all the
        # tenants created up to some point, and never going back in time
        assert failures == []
        assert len(answers) > 10
        seen = [len(ids) for _, ids in answers]
        assert seen == sorted(seen)
        for _, ids in answers:
            assert ids == sorted(created[: len(ids)])
        assert swapped["store"] == path.name and swapped["built_at"] == 300
        assert swapped["caught_up"] == len(events) - 300

        # the new file is the live one now, and the old one is gone
        assert (data_dir / LIVE_POINTER).read_text().strip() == path.name
        assert live_store_path(data_dir) == path
        assert not old_path.exists()
        assert plant.queries.engine is plant.live.engine
        # the live projector goes on, on the new store
        more = make_history(10, seed=22, prefix="late")
        await append_all(store, more)
        last = await store.last_seq()
        await wait_for_checkpoint(plant.live.engine, last)
        status = await plant.queries.handle("status", b"{}")
        assert status["projector_seq"] == last
        _, want = await fresh_digest(store, tmp_path / "check.db", last)
        assert status["projection_digest"] == want


async def test_swap_refuses_what_is_not_a_rebuilt_store(store, tmp_path):
    data_dir = tmp_path / "data"
    async with Plant(store, data_dir) as plant:
        for name, words in (
            ("../etc/passwd", "not a rebuilt store name"),
            ("projections.db", "not a rebuilt store name"),
            ("projections.20260101T000000000000Z.db", "no store"),
        ):
            with pytest.raises(Invalid) as err:
                await plant.swapper.swap(name)
            assert words in err.value.message
        assert not (data_dir / LIVE_POINTER).exists()


async def test_poison_is_quarantined_counted_and_rebuilt_alike(store, tmp_path):
    await append_all(store, make_history(30, seed=23))
    data_dir = tmp_path / "data"
    async with Plant(store, data_dir) as plant:
        await init_schema(plant.live.engine)
        # when a foreign writer puts undecodable bytes on an event subject
        for data in (b"\x00\xff junk", b""):
            await store.js.publish("ev.acme.tenant.acme", data)
        await append_all(store, make_history(5, seed=24, prefix="after"))
        last = await store.last_seq()
        await wait_for_checkpoint(plant.live.engine, last)
        # then the projector went past them, status counts them...
        status = await plant.queries.handle("status", b"{}")
        assert status["quarantined"] == 2 and status["projector_seq"] == last
        # ...and a rebuild (which quarantines them too) has the same digest
        path = new_store_path(data_dir)
        await build_store(store, path)
        swapped = await plant.swapper.swap(path.name)
        assert swapped["digest"] == status["projection_digest"]
        status = await plant.queries.handle("status", b"{}")
        assert status["quarantined"] == 2


# -- schema changes ----------------------------------------------------------


async def test_a_view_whose_tables_changed_is_rebuilt_from_the_log(store, tmp_path):
    # given a store folded by an older version of the code: the tenants
    # table lacked a column then, and the users view did not exist yet
    await append_all(store, make_history(40, seed=25))
    await store.js.publish("ev.x.tenant.x", b"\x00 poison")
    svc = CommandService(store, [*tenant_handlers, *identity_handlers()])
    await play(svc, [("user.create", {"name": "alice", "password": "pass-word-1"})])
    last = await store.last_seq()
    path = tmp_path / "old.db"
    await build_store(store, path)
    engine = make_engine(sqlite_url(path))
    try:
        async with engine.begin() as conn:
            await conn.exec_driver_sql("ALTER TABLE tenants DROP COLUMN description")
            await conn.exec_driver_sql("UPDATE view_schemas SET fingerprint = 'old'")
            await conn.exec_driver_sql("DELETE FROM view_schemas WHERE view = 'users'")
            await conn.exec_driver_sql("DELETE FROM users")
        # when the current code's projector starts on it
        projector = Projector(store, engine)
        try:
            assert await projector.start_position() == last
        finally:
            projector.close()
        # then both views were rebuilt up to the checkpoint, the poison kept
        # quarantined once, and the store equals a fresh rebuild
        _, want = await fresh_digest(store, tmp_path / "fresh.db", last)
        assert await store_digest(engine) == (last, want)
        async with engine.connect() as conn:
            fps = dict((await conn.exec_driver_sql("SELECT * FROM view_schemas")).all())
            cps = (await conn.exec_driver_sql("SELECT name FROM checkpoints")).scalars().all()
        assert set(fps) == {v.name for v in all_views()} and "old" not in fps.values()
        assert cps == ["main"]
    finally:
        await engine.dispose()


# -- bulk rebuilds ----------------------------------------------------------------


def _indexes(path: Path) -> set[str]:
    import sqlite3

    db = sqlite3.connect(path)
    try:
        rows = db.execute(
            "SELECT name FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL"
        ).fetchall()
    finally:
        db.close()
    return {r[0] for r in rows}


async def _append_workload(store, n: int) -> int:
    from stratus.ops.bench.workload import Workload, batches

    for chunk in batches(Workload(tenants=20, seed=7), n, 500):
        await store.append(chunk)
    return await store.last_seq()


async def test_a_bulk_rebuild_defers_indexes_and_equals_a_plain_catch_up(store, tmp_path):
    last = await _append_workload(store, 3000)
    assert last == 3000
    plain_seq, plain = await fresh_digest(store, tmp_path / "plain.db", last)
    want = _indexes(tmp_path / "plain.db")
    # Every view's secondary index, the audit trail's among them.
    assert "audit_tenant_seq" in want
    assert want == {ix.name for v in all_views() for t in v.tables for ix in t.indexes}

    bulk = tmp_path / "projections.bulk.db"
    built = await build_store(store, bulk)
    assert (built.seq, built.events) == (last, last)
    assert _indexes(bulk) == want
    engine = make_engine(sqlite_url(bulk))
    try:
        assert await store_digest(engine) == (plain_seq, plain)
        async with engine.connect() as conn:
            plan = await conn.exec_driver_sql(
                "EXPLAIN QUERY PLAN SELECT seq FROM audit WHERE tenant = 't0001' ORDER BY seq"
            )
            assert "audit_tenant_seq" in " ".join(str(r) for r in plan.all())
    finally:
        await engine.dispose()


async def test_a_bulk_load_stopped_part_way_gets_its_indexes_back(store, tmp_path):
    last = await _append_workload(store, 2000)
    path = tmp_path / "stopped.db"
    engine = make_engine(sqlite_url(path))
    try:
        bulk = Projector(store, engine, bulk=True)
        await bulk.start_position()
        # Stopped after one batch, before the end of the load.
        async for recs in store.read(until=700, batch=700):
            await bulk.apply(recs)
        bulk.close()
        assert bulk.position == 700
        assert not any(name.startswith("audit_") for name in _indexes(path))
        # The next (ordinary) start creates them again and carries on.
        resumed = Projector(store, engine)
        assert await resumed.catch_up(until=last) == last
        resumed.close()
        want = {ix.name for v in all_views() for t in v.tables for ix in t.indexes}
        assert _indexes(path) == want
        got = await store_digest(engine)
    finally:
        await engine.dispose()
    assert got == await fresh_digest(store, tmp_path / "plain.db", last)
