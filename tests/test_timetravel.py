"""Time travel: queries ``--at`` a sequence or a time, answered from a replayed store."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from stratus.events.commands import H_AT
from stratus.events.errors import Invalid, StratusError
from stratus.events.tenants import TenantCreated, TenantRenamed
from stratus.handlers.catalog import all_handlers
from stratus.handlers.service import CommandService
from stratus.projections.projector import Projector, init_schema, store_digest
from stratus.projections.query import QueryService
from stratus.projections.snapshots import Snapshots
from stratus.projections.timetravel import TimeTravel

from .test_projector import CAUSE, append_all, make_history, stop, wait_for_checkpoint

pytestmark = pytest.mark.timeout(120)


async def ask(svc: QueryService, view: str, at: str | int | None = None, body: dict | None = None):
    headers = {H_AT: str(at)} if at is not None else {}
    return await svc.handle(view, json.dumps(body or {}).encode(), headers)


async def fresh(store, engine, until: int) -> tuple[int, str]:
    """What a projection built from 1 had when it reached ``until``."""
    projector = Projector(store, engine, batch=97)
    try:
        await projector.catch_up(until=until)
    finally:
        projector.close()
    return await store_digest(engine)


def file_state(path: Path) -> dict[str, str]:
    """What the store's files hold. Reading a WAL database (the audit rows of
    a past point come from the live store) makes an index file and an empty
    log; neither is a change to the store."""
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.parent.glob(path.name + "*"))
        if p.is_file() and not p.name.endswith("-shm") and p.stat().st_size > 0
    }


async def test_at_a_sequence_is_the_world_a_fresh_projection_had_then(
    store, sqlite_engine, tmp_path
):
    # given a history, and a live projector taking a snapshot every 40 events
    events = make_history(150, seed=11)
    await append_all(store, events)
    last = await store.last_seq()
    live = sqlite_engine("live.db")
    snaps = Snapshots.for_store(tmp_path / "live.db", every=40, keep=3)
    projector = Projector(store, live, batch=10, snapshots=snaps)
    await init_schema(live)
    task = asyncio.create_task(projector.run())
    try:
        await wait_for_checkpoint(live, last)
    finally:
        await stop(task)
        await projector.aclose()
    taken = [s for s, _ in snaps.list()]
    assert 1 <= len(taken) <= 3, taken
    assert all(b - a >= 40 for a, b in itertools.pairwise(taken)), taken

    svc = QueryService(store, live)
    assert svc.timetravel.snapshots is not None
    assert svc.timetravel.snapshots.directory == snaps.directory
    try:
        # when the status and the tenants are asked as of several points
        points = sorted({1, 17, taken[0], taken[-1] + 3, last - 1, last} - {0})
        points = [p for p in points if p <= last]
        for i, seq in enumerate(points):
            status = await ask(svc, "status", seq)
            # then each is what a projection built from 1 had at that point
            cp, want = await fresh(store, sqlite_engine(f"fresh-{i}.db"), seq)
            assert cp == seq
            assert status["at"] == seq and status["projector_seq"] == seq
            assert status["projection_digest"] == want, f"at {seq}"
            listed = await ask(svc, "tenants", seq, {"include_deleted": True})
            created = {e.aggregate.id for e in events[:seq] if isinstance(e, TenantCreated)}
            assert {t["id"] for t in listed} == created
        # and points at or above a snapshot started from it, not from 1
        tt = svc.timetravel
        assert tt.builds == len(points)
        assert tt.replayed < sum(points) - taken[0], (tt.replayed, points)
    finally:
        await svc.stop()


async def test_at_a_time_is_the_last_event_at_or_before_it(store, sqlite_engine):
    # given acme created, then renamed after a pause
    await store.append([CAUSE.make(TenantCreated, "acme", "tenant", "acme", name="acme")])
    await asyncio.sleep(0.05)
    moment = datetime.now(UTC)
    await asyncio.sleep(0.05)
    await store.append(
        [CAUSE.make(TenantRenamed, "acme", "tenant", "acme", name="roadrunner", previous="acme")]
    )
    live = sqlite_engine("live.db")
    await fresh(store, live, 2)
    svc = QueryService(store, live)
    try:
        # when asked as of the moment in between (with and without an offset)
        for text in (moment.isoformat(), moment.replace(tzinfo=None).isoformat()):
            status = await ask(svc, "status", text)
            assert status["at"] == 1
            shown = await ask(svc, "tenant", text, {"tenant": "acme"})
            # then the tenant has its old name; now it has the new one
            assert shown["name"] == "acme"
        assert (await ask(svc, "tenant", body={"tenant": "acme"}))["name"] == "roadrunner"
        later = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
        assert (await ask(svc, "status", later))["at"] == 2
        # events and audit stop at the point too, without a store being built
        before = svc.timetravel.builds
        rows = await ask(svc, "events", 1)
        assert [r["seq"] for r in rows] == [1]
        rows = await ask(svc, "audit", moment.isoformat())
        assert [r["type"] for r in rows] == ["tenant.created"]
        assert svc.timetravel.builds == before
    finally:
        await svc.stop()


async def test_repeated_points_come_from_the_cache_and_evicted_files_go(store, sqlite_engine):
    await append_all(store, make_history(40, seed=12))
    live = sqlite_engine("live.db")
    await fresh(store, live, await store.last_seq())
    tt = TimeTravel(store, max_stores=2)
    svc = QueryService(store, live, timetravel=tt)
    try:
        first = await ask(svc, "status", 10)
        assert (tt.builds, tt.hits) == (1, 0)
        # the same point again: served from the cache, same answer
        for _ in range(3):
            assert await ask(svc, "status", 10) == first
        assert (tt.builds, tt.hits) == (1, 3)

        # concurrent requests for a new point share one build
        answers = await asyncio.gather(*(ask(svc, "status", 20) for _ in range(5)))
        assert tt.builds == 2
        assert len({a["projection_digest"] for a in answers}) == 1

        # a third point evicts the least recently used one and its file
        workdir = tt._workdir()
        await ask(svc, "status", 30)
        assert tt.cached() == [20, 30]
        assert len(list(workdir.glob("*.db"))) == 2
        # built from the nearest cached store, not from 1
        assert tt.replayed == 10 + 10 + 10
    finally:
        await svc.stop()
    # stopping removes every past store
    assert not workdir.exists()


async def test_time_travel_never_touches_the_live_store(store, sqlite_engine, tmp_path):
    await append_all(store, make_history(60, seed=13))
    last = await store.last_seq()
    live = sqlite_engine("live.db")
    await fresh(store, live, last - 5)
    await live.dispose()  # every connection closed: the files are at rest
    before = file_state(tmp_path / "live.db")
    svc = QueryService(store, live)
    try:
        for seq in (3, last - 20, last):
            await ask(svc, "status", seq)
            await ask(svc, "tenants", seq)
    finally:
        await svc.stop()
    assert file_state(tmp_path / "live.db") == before
    cp, _ = await store_digest(live)
    assert cp == last - 5


async def test_bad_at_is_refused_clearly_and_builds_nothing(store, sqlite_engine):
    first_at = datetime.now(UTC) - timedelta(seconds=5)
    await append_all(store, make_history(5, seed=14))
    last = await store.last_seq()
    live = sqlite_engine("live.db")
    await fresh(store, live, last)
    svc = QueryService(store, live)
    try:
        cases = {
            "yesterday-ish": "not a sequence number or an ISO-8601",
            "-3": "1 or more",
            "0": "1 or more",
            str(last + 1): f"beyond the end of the log (last sequence is {last})",
            "   ": "empty",
            first_at.isoformat(): "before the first event",
            "2026-13-45T00:00:00Z": "not a sequence number or an ISO-8601",
        }
        for at, words in cases.items():
            for view in ("status", "tenants", "events"):
                with pytest.raises(Invalid) as err:
                    await ask(svc, view, at)
                assert words in err.value.message, (at, err.value.message)
        assert svc.timetravel.builds == 0 and svc.timetravel.cached() == []
    finally:
        await svc.stop()


async def test_a_snapshot_is_the_store_without_the_audit_rows(store, sqlite_engine, tmp_path):
    import sqlite3

    await append_all(store, make_history(80, seed=5))
    live = sqlite_engine("live.db")
    last, _ = await fresh(store, live, await store.last_seq())
    await live.dispose()
    snaps = Snapshots.for_store(tmp_path / "live.db", every=1, keep=1)
    assert snaps.take(tmp_path / "live.db") == last
    (_, path), *_ = snaps.list()
    src, snap = sqlite3.connect(tmp_path / "live.db"), sqlite3.connect(path)
    try:

        def objects(db: sqlite3.Connection) -> list[tuple[str, str, str]]:
            q = "SELECT type, name, sql FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'"
            return sorted(db.execute(q).fetchall())

        # the same tables and indexes, defined alike
        assert objects(snap) == objects(src) and len(objects(src)) > 10
        for _kind, name, _sql in (o for o in objects(src) if o[0] == "table"):
            rows = snap.execute(f'SELECT * FROM "{name}" ORDER BY 1').fetchall()
            if name == "audit":
                assert rows == [] and src.execute("SELECT count(*) FROM audit").fetchone()[0] > 0
            else:
                assert rows == src.execute(f'SELECT * FROM "{name}" ORDER BY 1').fetchall(), name
    finally:
        src.close()
        snap.close()


# -- the inventory, as of a point ----------------------------------------------


async def inventory_history(store) -> dict[str, int]:
    """Servers made, given addresses and a floating IP, then deleted, and the
    quota moved, through the command service; the seqs between the acts."""
    svc = CommandService(store, all_handlers())

    async def do(verb: str, **body) -> None:
        reply = json.loads(await svc.handle(f"cmd.{verb}", json.dumps(body).encode(), {}))
        assert reply["ok"], (verb, reply)

    marks = {}
    await do("tenant.create", name="shop")
    await do("image.create-public", name="cirros")
    await do("network.create-external", name="public", cidr="203.0.113.0/29")
    await do("network.create", tenant="shop", name="lan")
    await do("subnet.create", tenant="shop", name="lan-v4", network="lan", cidr="10.0.0.0/28")
    marks["empty"] = await store.last_seq()
    for i in range(4):
        await do("server.create", tenant="shop", name=f"web{i}", image="cirros", vcpus=1,
                 ram_mb=64, networks=["lan"])  # fmt: skip
    marks["four"] = await store.last_seq()
    await do("quota.set", tenant="shop", limits={"instances": 4, "volumes": 3})
    await do("floating-ip.create", tenant="shop", network="public")
    await do("floating-ip.associate", tenant="shop", floating_ip="203.0.113.2", server="web0")
    await do("volume.create", tenant="shop", name="data", size_gb=8)
    await do("volume.attach", tenant="shop", volume="data", server="web1")
    marks["extras"] = await store.last_seq()
    await do("server.delete", tenant="shop", ref="web0")
    await do("server.delete", tenant="shop", ref="web1")
    await do("quota.set", tenant="shop", limits={"instances": 2})
    marks["two"] = await store.last_seq()
    return marks


async def answer(svc: QueryService, view: str, body: dict, at: int | None = None):
    try:
        return await ask(svc, view, at, body)
    except StratusError as exc:
        return (exc.kind, exc.message)


async def test_inventory_at_a_sequence_is_what_a_fresh_projection_had_then(store, sqlite_engine):
    marks = await inventory_history(store)
    last = await store.last_seq()
    live = sqlite_engine("live.db")
    await fresh(store, live, last)
    svc = QueryService(store, live)
    questions = [
        ("servers", {"tenant": "shop"}),
        ("server", {"tenant": "shop", "ref": "web0"}),
        ("server", {"tenant": "shop", "ref": "web2"}),
        ("floating_ips", {"tenant": "shop"}),
        ("volume", {"tenant": "shop", "ref": "data"}),
        ("ports", {"tenant": "shop"}),
        ("quota", {"tenant": "shop"}),
    ]
    try:
        seen = {}
        for i, seq in enumerate(sorted({*marks.values(), marks["four"] - 3, last})):
            # a projection built from 1 up to seq, asked as it is now
            then = QueryService(store, sqlite_engine(f"then-{i}.db"))
            await fresh(store, then.engine, seq)
            for view, body in questions:
                want = await answer(then, view, body)
                assert await answer(svc, view, body, seq) == want, (seq, view, body)
            seen[seq] = {v: await answer(then, v, b) for v, b in questions[:1] + questions[-1:]}
    finally:
        await svc.stop()

    # and those answers are the history told: none, four, then two servers
    def names(seq: int) -> list[str]:
        return sorted(s["name"] for s in seen[seq]["servers"])

    def quota(seq: int) -> dict[str, tuple[int, int]]:
        return {q["resource"]: (q["limit"], q["in_use"]) for q in seen[seq]["quota"]["quota"]}

    assert names(marks["empty"]) == []
    assert names(marks["four"]) == ["web0", "web1", "web2", "web3"]
    assert names(marks["two"]) == ["web2", "web3"]
    assert quota(marks["four"])["instances"] == (10, 4)
    assert quota(marks["extras"])["instances"] == (4, 4)
    assert quota(marks["extras"])["volume_gb"] == (1000, 8)
    assert quota(marks["two"])["instances"] == (2, 2)
    assert quota(marks["two"])["volumes"] == (3, 1)
