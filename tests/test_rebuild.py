"""Rebuild: a fresh store replayed from the log equals the live one, and swaps in live."""

from __future__ import annotations

import asyncio
import itertools
import json
import sqlite3
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from sqlalchemy import select
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine

from stratus.cli.client import Client
from stratus.events.errors import Internal, Invalid, StratusError
from stratus.handlers.identity import handlers as identity_handlers
from stratus.handlers.resources import handlers as resource_handlers
from stratus.handlers.service import CommandService
from stratus.handlers.tenants import HANDLERS as tenant_handlers
from stratus.projections.db import make_engine, sqlite_path, sqlite_url, sync_writer
from stratus.projections.projector import Projector, init_schema, read_checkpoint, store_digest
from stratus.projections.query import Point, QueryService, Route, TenantsQuery
from stratus.projections.rebuild import (
    LIVE_POINTER,
    SWAP_SUBJECT,
    LiveProjection,
    SwapService,
    build_store,
    live_store_path,
    new_store_path,
    remove_store,
)
from stratus.projections.resources import TABLES_BY_KIND
from stratus.projections.snapshots import Snapshots, snapshot_dir
from stratus.projections.sqlitefile import connect_existing
from stratus.projections.tenants import list_tenants
from stratus.projections.views import all_views

from .test_projector import append_all, make_history, wait_for_checkpoint

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

# The inventory, in few names so that commands meet each other's resources:
# overlapping prefixes, a small floating-IP pool, deletes of what is in use.
# Mostly tenants no random tenant.delete can take away (the log is shared by
# all the examples), sometimes one it can.
IN = st.sampled_from(["shop", "shop", "lab", "acme"])
NETS = st.sampled_from(["lan", "dmz"])
SUBNETS = st.sampled_from(["lan-v4", "dmz-v4", "v6"])
CIDRS = st.sampled_from(["10.0.0.0/29", "10.0.0.0/28", "10.1.0.0/29", "2001:db8::/64"])
PORTS = st.sampled_from(["p1", "p2"])
SERVERS = st.sampled_from(["web", "db"])
VOLUMES = st.sampled_from(["v1", "v2"])
GROUPS = st.sampled_from(["default", "sg1"])
ROUTERS = st.sampled_from(["r1", "r2"])
FIPS = st.sampled_from(["203.0.113.2", "203.0.113.3", "203.0.113.4"])
PUBLIC_CIDR = "203.0.113.0/29"
QUOTAS = st.sampled_from(["instances", "vcpus", "ports", "floating_ips", "volume_gb", "bogus"])


def _in(**fields: st.SearchStrategy) -> st.SearchStrategy:
    return st.fixed_dictionaries({"tenant": IN, **fields})


def _ref(names: st.SearchStrategy) -> st.SearchStrategy:
    return _in(ref=names)


SIZES = st.one_of(
    st.fixed_dictionaries({"flavor": st.sampled_from(["m1", "m9"])}),
    st.fixed_dictionaries({"vcpus": st.integers(1, 4), "ram_mb": st.sampled_from([64, 512])}),
)
VERBS.update(
    {
        "network.create": _in(name=NETS),
        "network.delete": _ref(NETS),
        "subnet.create": _in(name=SUBNETS, network=NETS, cidr=CIDRS),
        "subnet.delete": _ref(SUBNETS),
        "port.create": st.fixed_dictionaries(
            {"tenant": IN, "name": PORTS, "network": NETS},
            optional={"ip": st.sampled_from(["10.0.0.3", "10.1.0.2"])},
        ),
        "port.delete": _ref(PORTS),
        "server.create": st.tuples(
            _in(
                name=SERVERS,
                image=st.just("cirros"),
                networks=st.lists(NETS, max_size=2, unique=True),
            ),
            SIZES,
        ).map(lambda t: {**t[0], **t[1]}),
        "server.delete": _ref(SERVERS),
        "volume.create": _in(name=VOLUMES, size_gb=st.integers(1, 50)),
        "volume.attach": _in(volume=VOLUMES, server=SERVERS),
        "volume.detach": _in(volume=VOLUMES, server=SERVERS),
        "volume.delete": _ref(VOLUMES),
        "floating-ip.create": _in(network=st.just("public")),
        "floating-ip.associate": _in(floating_ip=FIPS, server=SERVERS),
        "floating-ip.disassociate": _ref(FIPS),
        "floating-ip.delete": _ref(FIPS),
        "security-group.create": _in(name=GROUPS),
        "security-group.rule-add": _in(
            security_group=GROUPS,
            protocol=st.sampled_from(["tcp", "icmp"]),
            port_min=st.sampled_from([0, 22]),
        ),
        "security-group.delete": _ref(GROUPS),
        "router.create": st.fixed_dictionaries(
            {"tenant": IN, "name": ROUTERS}, optional={"external_network": st.just("public")}
        ),
        "router.add-subnet": _in(router=ROUTERS, subnet=SUBNETS),
        "router.remove-subnet": _in(router=ROUTERS, subnet=SUBNETS),
        "router.delete": _ref(ROUTERS),
        "quota.set": _in(
            limits=st.dictionaries(QUOTAS, st.sampled_from([-1, 1, 3, 50]), max_size=3)
        ),
    }
)
# "seed" (no command: a few of them in a row) builds what the other verbs
# act on, so attaches, associations and interfaces happen in short histories.
VERBS["seed"] = _in(network=st.just("public"))


def seed(tenant: str, public: str) -> list[tuple[str, dict]]:
    t = {"tenant": tenant}
    return [
        ("network.create", {**t, "name": "lan"}),
        ("subnet.create", {**t, "name": "lan-v4", "network": "lan", "cidr": "10.0.0.0/28"}),
        ("server.create", {**t, "name": "web", "image": "cirros", "flavor": "m1",
                           "networks": ["lan"]}),
        ("volume.create", {**t, "name": "v1", "size_gb": 5}),
        ("volume.attach", {**t, "volume": "v1", "server": "web"}),
        ("floating-ip.create", {**t, "network": public}),
        ("router.create", {**t, "name": "r1", "external_network": public}),
        ("router.add-subnet", {**t, "router": "r1", "subnet": "lan-v4"}),
        ("security-group.rule-add", {**t, "security_group": "default", "port_min": 22}),
    ]  # fmt: skip


# What every history starts with, so inventory commands have an image and a
# flavor to use (made once: the log is shared by the examples, and these
# names are never reused).
PREAMBLE = [
    ("image.create-public", {"name": "cirros"}),
    ("flavor.create", {"name": "m1", "vcpus": 2, "ram_mb": 256}),
]
STEPS = st.lists(
    st.sampled_from(sorted(VERBS)).flatmap(lambda v: st.tuples(st.just(v), VERBS[v])),
    min_size=20,
    max_size=50,
)


def fresh_tenants(steps: list, n: int) -> list:
    """The steps of example ``n`` in tenants and a floating-IP pool of its
    own: ``shop``, ``lab`` and ``public`` are new each time, so every example
    starts from the same worlds (``shop`` seeded, ``lab`` empty) and the
    addresses FIPS names are the ones its pool hands out."""
    own = {"shop": f"shop{n}", "lab": f"lab{n}", "public": f"pub{n}"}
    out = [
        *PREAMBLE,
        ("network.create-external", {"name": own["public"], "cidr": PUBLIC_CIDR}),
        *(("tenant.create", {"name": own[t]}) for t in ("shop", "lab")),
        ("seed", {"tenant": own["shop"], "network": own["public"]}),
    ]
    for verb, body in steps:
        if isinstance(body, dict):
            body = {k: own.get(v, v) if isinstance(v, str) else v for k, v in body.items()}
        out.append((verb, body))
    return out


_run = itertools.count()
networks = TABLES_BY_KIND["network"]


async def play(svc: CommandService, steps: list, took: list[str] | None = None) -> int:
    """Run the steps; returns how many were accepted (refusals append nothing),
    and adds the verbs that appended something to ``took``."""
    accepted = 0
    for verb, body in steps:
        if verb == "seed":
            accepted += await play(svc, seed(body["tenant"], body["network"]), took)
            continue
        if verb == "poison":
            await svc.store.js.publish("ev.x.tenant.x", body)
            accepted += 1
            continue
        try:
            reply = json.loads(await svc.handle(f"cmd.{verb}", json.dumps(body).encode(), {}))
            accepted += 1
            if took is not None and reply.get("seqs"):
                took.append(verb)
        except Internal:
            raise  # a refusal is fine; a crash of the handler is a bug
        except StratusError:
            pass
    return accepted


@settings(
    max_examples=30,
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
    svc = CommandService(store, [*tenant_handlers, *identity_handlers(), *resource_handlers()])
    try:
        took: list[str] = []
        await play(svc, fresh_tenants(steps, n), took)
        for verb in sorted(set(took)):
            event(f"appended: {verb}")
        last = await store.last_seq()
        await wait_for_checkpoint(live_engine, last)
        # (the log is shared by the examples: the first one's preamble holds)
        async with live_engine.connect() as conn:
            q = select(networks.c.pool_end).where(networks.c.id == f"pub{n}")
            pool = (await conn.execute(q)).scalars().all()
        assert pool == ["203.0.113.6"]
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


async def caught_up_digest(store, engine, until: int) -> tuple[int, str]:
    """A projector on ``engine`` (fresh or part-built) caught up to ``until``: its digest."""
    projector = Projector(store, engine)
    assert await projector.catch_up(until=until) == until
    projector.close()
    return await store_digest(engine)


async def fresh_digest(store, path: Path, until: int) -> tuple[int, str]:
    engine = make_engine(sqlite_url(path))
    try:
        return await caught_up_digest(store, engine, until)
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


class Parked:
    """A query route that has taken its store and waits before it reads it,
    as a real query does across an await (a NATS request) between the two."""

    def __init__(self, queries: QueryService) -> None:
        self.entered = asyncio.Event()
        self.go = asyncio.Event()
        self.seen: list[AsyncEngine] = []

        async def run(_caller, _p, pt: Point) -> dict:
            self.seen.append(pt.engine)
            self.entered.set()
            await self.go.wait()
            async with pt.engine.connect() as conn:
                hosts = (await conn.execute(select(TABLES_BY_KIND["host"].c.id))).all()
                listed = await list_tenants(conn, True)
                applied = await read_checkpoint(conn)
            return {"hosts": len(hosts), "tenants": [t["id"] for t in listed], "seq": applied}

        queries.routes["parked"] = Route(TenantsQuery, run, "tenant.list")


def _files_of(path: Path) -> list[Path]:
    """A store's file and its companions that exist."""
    return [p for p in (Path(f"{path}{s}") for s in ("", "-wal", "-shm", "-journal")) if p.exists()]


@pytest.mark.parametrize("ends", ["while-the-swap-waits", "after-the-swap-answered"])
async def test_a_query_that_began_on_the_old_store_finishes_on_it(store, tmp_path, ends):
    events = make_history(200, seed=31)
    created = sorted(e.aggregate.id for e in events if type(e).__name__ == "TenantCreated")
    await append_all(store, events)
    data_dir = tmp_path / "data"
    async with Plant(store, data_dir) as plant:
        old_path = live_store_path(data_dir)
        await wait_for_checkpoint(plant.live.engine, len(events))
        old_engine = plant.queries.engine
        path = new_store_path(data_dir)
        await build_store(store, path)
        # given a query that took the live store and has not read it yet
        parked = Parked(plant.queries)
        query = asyncio.create_task(plant.queries.handle("parked", b"{}"))
        await asyncio.wait_for(parked.entered.wait(), 10)
        assert parked.seen == [old_engine]

        # when the rebuilt store is swapped in meanwhile
        if ends == "after-the-swap-answered":
            plant.swapper.old_store_wait_s = 0
            swapped = await plant.swapper.swap(path.name)
            assert swapped["old_store_removed"] is False
        else:
            swapping = asyncio.create_task(plant.swapper.swap(path.name))
            for _ in range(500):  # bounded: the swap switches within seconds
                if live_store_path(data_dir) == path or swapping.done():
                    break
                await asyncio.sleep(0.02)
            assert not swapping.done(), "the swap waits for the query on the old store"
        assert plant.queries.engine is not old_engine
        assert live_store_path(data_dir) == path
        # then the old store is still there for the query that holds it...
        assert old_path.is_file()
        parked.go.set()
        answer = await asyncio.wait_for(query, 10)
        # ...which reads it whole (not an empty file made in its place)
        assert answer == {"hosts": 0, "tenants": created, "seq": len(events)}
        if ends == "while-the-swap-waits":
            swapped = await asyncio.wait_for(swapping, 30)
            assert swapped["old_store_removed"] is True
        # and once that query is done the old store is gone, leaving nothing behind
        assert _files_of(old_path) == []
        assert not snapshot_dir(old_path).exists()
        assert sorted(p.name for p in data_dir.glob("projections*.db")) == [path.name]
        # new queries read the new store
        status = await plant.queries.handle("status", b"{}")
        assert status["projector_seq"] == len(events)


async def test_an_engine_never_makes_a_store_that_is_not_there(tmp_path):
    # given a store that existed when its engine was made, then was removed
    path = tmp_path / "projections.gone.db"
    engine = make_engine(sqlite_url(path))
    try:
        await init_schema(engine)
        await engine.dispose()
        remove_store(path)
        # when anything connects through that engine again, it is an error...
        with pytest.raises(OperationalError, match="unable to open database file"):
            async with engine.connect() as conn:
                await conn.exec_driver_sql("SELECT count(*) FROM tenants")
        # ...and no empty file took its place
        assert _files_of(path) == []
        # the projector's synchronous writer opens it the same way
        sync = sync_writer(engine)
        assert sync is not None
        with pytest.raises(OperationalError, match="unable to open database file"):
            sync.connect().close()
        sync.dispose()
        assert _files_of(path) == []
    finally:
        await engine.dispose()
    # an engine on a store that must exist refuses a missing one
    with pytest.raises(Invalid, match="no projection store"):
        make_engine(sqlite_url(path), create=False)
    # as do the plain sqlite3 readers (snapshots, time travel's copies)
    with pytest.raises(sqlite3.OperationalError):
        connect_existing(path)
    assert Snapshots.for_store(path).take(path) is None
    assert _files_of(path) == []
    # a store whose path needs escaping in a URI is still found
    odd = tmp_path / "a dir?#%" / "projections.db"
    odd.parent.mkdir()
    engine = make_engine(sqlite_url(odd))
    try:
        await init_schema(engine)
        assert sqlite_path(engine) == odd
        assert await store_digest(engine) == (0, await fresh_empty_digest(tmp_path))
    finally:
        await engine.dispose()
    assert odd.is_file() and sorted(p.name for p in odd.parent.iterdir()) == ["projections.db"]


async def test_an_engine_makes_its_store_at_its_first_connection_not_before(tmp_path):
    # given an engine on a store whose directory is not there yet (a
    # service that never opens its store, the handlers say, runs so)
    path = tmp_path / "later" / "projections.db"
    engine = make_engine(sqlite_url(path))
    try:
        # nothing is made until it connects
        assert not path.parent.exists()
        with pytest.raises(OperationalError, match="unable to open database file"):
            async with engine.connect() as conn:
                await conn.exec_driver_sql("SELECT 1")
        assert not path.parent.exists()
        # once the directory is there, the first connection makes the file
        path.parent.mkdir()
        await init_schema(engine)
        assert path.is_file()
        assert await store_digest(engine) == (0, await fresh_empty_digest(tmp_path))
    finally:
        await engine.dispose()


async def fresh_empty_digest(tmp_path: Path) -> str:
    engine = make_engine(sqlite_url(tmp_path / "empty.db"))
    try:
        await init_schema(engine)
        return (await store_digest(engine))[1]
    finally:
        await engine.dispose()


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


def _rows(path: Path, table: str) -> list[tuple]:
    import sqlite3

    db = sqlite3.connect(path)
    try:
        return db.execute(f"SELECT * FROM {table} ORDER BY 1").fetchall()
    finally:
        db.close()


async def _wait_for_seq(store, seq: int) -> int:
    for _ in range(100):
        if await store.last_seq() >= seq:
            return await store.last_seq()
        await asyncio.sleep(0.05)
    raise AssertionError(f"the stream did not reach {seq}")


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


@pytest.mark.parametrize("helper", [False, True], ids=["one-process", "writer-process"])
async def test_a_bulk_rebuild_defers_indexes_and_equals_a_plain_catch_up(store, tmp_path, helper):
    last = await _append_workload(store, 3000)
    assert last == 3000
    plain_seq, plain = await fresh_digest(store, tmp_path / "plain.db", last)
    want = _indexes(tmp_path / "plain.db")
    # Every view's secondary index, the audit trail's among them.
    assert "audit_tenant_seq" in want
    assert want == {ix.name for v in all_views() for t in v.tables for ix in t.indexes}

    bulk = tmp_path / "projections.bulk.db"
    built = await build_store(store, bulk, helper=helper)
    assert (built.seq, built.events) == (last, last)
    # The writer process reports its own peak memory (the bench adds it up).
    assert (built.helper_rss_mb is not None) == helper
    assert _indexes(bulk) == want
    assert _rows(bulk, "view_schemas") == _rows(tmp_path / "plain.db", "view_schemas")
    assert _rows(bulk, "checkpoints") == [("main", last)]
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


@pytest.mark.parametrize("helper", [False, True], ids=["one-process", "writer-process"])
async def test_a_bulk_rebuild_quarantines_text_with_a_nul_as_the_live_projector(
    store, tmp_path, helper
):
    from datetime import UTC, datetime

    from stratus.events.model import Cause
    from stratus.events.tenants import TenantCreated, TenantRenamed
    from stratus.projections.schema import quarantine

    cause = Cause(actor="test", correlation_id="corr", causation_id="corr")
    at = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)  # no microseconds: a format edge
    nul_actor = Cause(actor="a\x00dmin", correlation_id="c2", causation_id="c2", at=at)
    await store.append([cause.make(TenantCreated, "before", "tenant", "before", name="before")])
    # a NUL in an inventory value, in an audit value, and in a field no row holds
    await store.append([cause.make(TenantCreated, "nul", "tenant", "nul", name="a\x00b")])
    await store.append([nul_actor.make(TenantCreated, "act", "tenant", "act", name="act")])
    await store.append(
        [cause.make(TenantRenamed, "before", "tenant", "before", name="b-0", previous="\x00")]
    )
    await store.append(
        [cause.make(TenantCreated, "esc", "tenant", "esc", name='\\u0000 "q" \U0001f600')]
    )
    # ... and bytes that are no event at all.
    await store.nc.publish("ev.nul.tenant.junk", b"\x00\xff not msgpack")
    await store.nc.flush()
    last = await _wait_for_seq(store, 6)
    plain_seq, plain = await fresh_digest(store, tmp_path / "plain.db", last)
    bulk = tmp_path / "projections.bulk.db"
    await build_store(store, bulk, helper=helper)
    engine = make_engine(sqlite_url(bulk))
    try:
        assert await store_digest(engine) == (plain_seq, plain)
        async with engine.connect() as conn:
            kept = (await conn.execute(select(quarantine.c.seq).order_by(quarantine.c.seq))).all()
    finally:
        await engine.dispose()
    assert [r[0] for r in kept] == [2, 3, last]


async def test_a_bulk_load_stopped_between_commits_resumes_exactly_once(store, tmp_path):
    import sqlite3

    last = await _append_workload(store, 3000)
    path = tmp_path / "stopped.db"
    engine = make_engine(sqlite_url(path))
    try:
        bulk = Projector(store, engine, batch=500, bulk=True)
        bulk.commit_every = 1000

        class Stop(Exception):
            pass

        stopped: list[int] = []

        def stop_at(_n: int, seq: int) -> None:
            # Stopped with folded events not yet committed.
            if seq >= 2000 and seq > bulk.position:
                stopped.append(seq)
                raise Stop

        with pytest.raises(Stop):
            await bulk.catch_up(progress=stop_at)
        bulk.close()
        assert 0 < bulk.position < stopped[0] < last
        db = sqlite3.connect(path)
        try:
            # The store holds exactly what the committed checkpoint covers.
            assert db.execute("SELECT last_seq FROM checkpoints").fetchall() == [(bulk.position,)]
            audit_rows = db.execute("SELECT count(*), max(seq) FROM audit").fetchone()
            assert audit_rows == (bulk.position, bulk.position)
        finally:
            db.close()
        got = await caught_up_digest(store, engine, last)
    finally:
        await engine.dispose()
    assert got == await fresh_digest(store, tmp_path / "plain.db", last)
