"""The same projections on PostgreSQL (asyncpg) as on SQLite: same rows, same digest.

Every test runs against a real PostgreSQL server (``postgres_server`` in
conftest: Debian's binaries, loopback only) in a throwaway database whose
default collation is linguistic (ICU en-US), as a production database's
usually is, so any ordering that leaned on SQLite's binary order would show.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import time
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncEngine

from stratus.cli.runtime import publish_signing_keys
from stratus.events.frameworks import HostOffered, OfferMade
from stratus.events.ids import new_id
from stratus.events.model import Cause
from stratus.events.resources import SYSTEM, ImageActivated
from stratus.events.tasks import cancel
from stratus.events.tenants import TenantCreated, TenantRenamed
from stratus.handlers.catalog import all_handlers
from stratus.handlers.identity import bootstrap_admin
from stratus.handlers.keyring import KeyRing
from stratus.handlers.service import CommandService
from stratus.projections import resources
from stratus.projections.db import make_engine
from stratus.projections.projector import (
    Projector,
    init_schema,
    quarantine_count,
    read_checkpoint,
    store_digest,
)
from stratus.projections.query import QueryService
from stratus.projections.schema import quarantine
from stratus.projections.tenants import list_tenants, tenants
from stratus.projections.users import role_assignments, users

from . import test_cli
from .test_cli import Up, cli, login, wait_projected

pytestmark = pytest.mark.timeout(120)

PASSWORD = "password-for-tests"
CAUSE = Cause(actor="test", correlation_id="corr", causation_id="corr")


@contextlib.asynccontextmanager
async def engine_at(url: str) -> AsyncIterator[AsyncEngine]:
    engine = make_engine(url)
    try:
        yield engine
    finally:
        await engine.dispose()


async def command(svc: CommandService, verb: str, **body) -> dict:
    reply = json.loads(
        await asyncio.wait_for(svc.handle(f"cmd.{verb}", json.dumps(body).encode(), {}), 10)
    )
    assert reply["ok"], (verb, body, reply)
    return reply


async def build_log(store, tmp_path, seed: int = 11) -> int:
    """A history made by the real command service, every verb it serves
    included (the handler list `stratus up` runs); returns the last seq."""
    keyring = KeyRing.load_or_create(tmp_path / "keys")
    await publish_signing_keys(store, keyring)
    svc = CommandService(store, all_handlers(keyring))
    await svc.start()
    try:
        assert await bootstrap_admin(svc, PASSWORD) == PASSWORD
        rng = random.Random(seed)
        # Names whose order is the same under any collation would hide a
        # backend sorting differently; these interleave hyphens and digits.
        names = ["a-c", "ab", "a0", "0a", "acme", "globex", *(f"t{i:02d}" for i in range(24))]
        for n in names:
            await command(svc, "tenant.create", name=n, description=f"Tenant {n.upper()} ü")
        people = ["alice", "bob", "b-ob", "carol"]
        for u in people:
            await command(svc, "user.create", name=u, password=PASSWORD)
        await command(svc, "role.create", name="auditor", permissions=["audit.read"])
        grants = set()
        for _ in range(24):
            g = (rng.choice(people), rng.choice(names), rng.choice(["member", "reader", "auditor"]))
            if g not in grants:
                grants.add(g)
                await command(svc, "role.assign", user=g[0], tenant=g[1], role=g[2])
        for g in sorted(grants)[::3]:
            await command(svc, "role.revoke", user=g[0], tenant=g[1], role=g[2])
        for n in rng.sample(names, 8):
            await command(svc, "tenant.rename", tenant=n, name=f"{n}-renamed")
        for n in rng.sample(names, 5):
            await command(svc, "tenant.delete", tenant=n)
        await command(svc, "user.disable", name="bob")
        await command(svc, "user.disable", name="carol")
        await command(svc, "user.enable", name="carol")
        await inventory(svc)
    finally:
        await svc.stop()
    return await store.last_seq()


async def inventory(svc: CommandService) -> None:
    """Every inventory kind, with JSON text columns (labels, lists), booleans,
    floats that are not exact in binary, deletes, rules, interfaces, quotas."""
    t = {"tenant": "inv"}
    await command(svc, "tenant.create", name="inv", description="inventory")
    await command(svc, "host.register", name="h1", vcpus=16, ram_mb=65536, disk_gb=500,
                  labels={"rack": "r-1", "ssd": "yes"}, cpu_ratio=1.1, ram_ratio=0.7)  # fmt: skip
    await command(svc, "host.register", name="h1", vcpus=32, ram_mb=65536, disk_gb=500,
                  types=["vm"], cpu_ratio=3.3, disk_ratio=0.1)  # fmt: skip
    await command(svc, "host.register", name="h2", vcpus=8, ram_mb=8192, disk_gb=100)
    await command(svc, "host.disable", name="h2", reason="maintenance ü")
    await command(svc, "host.remove", name="h2")
    await command(svc, "flavor.create", name="m1", vcpus=2, ram_mb=2048, disk_gb=20)
    await command(svc, "flavor.create", name="m2", vcpus=4, ram_mb=4096)
    await command(svc, "flavor.delete", name="m2")
    await command(svc, "image.create-public", name="cirros", size_bytes=12716032,
                  checksum="ab" * 32, min_disk_gb=1)  # fmt: skip
    # Its bytes as the image service records them once stored.
    stored = Cause(actor="admin", correlation_id=new_id(), causation_id=new_id()).make(
        ImageActivated, SYSTEM, "image", "cirros", size_bytes=12716032, checksum="ab" * 32,
        min_disk_gb=1, reason="",
    )  # fmt: skip
    await svc.store.append([stored])
    await command(svc, "image.create", **t, name="private-img", format="raw")
    await command(svc, "image.create", **t, name="gone-img")
    await command(svc, "image.delete", **t, ref="gone-img")
    await command(svc, "network.create-external", name="public", cidr="203.0.113.0/24")
    await command(svc, "quota.set", **t, limits={"instances": 20, "floating_ips": -1})
    await command(svc, "network.create", **t, name="lan")
    await command(svc, "network.create", **t, name="lan-2")
    await command(svc, "subnet.create", **t, name="lan-v4", network="lan", cidr="10.0.0.0/24",
                  dns=["9.9.9.9", "1.1.1.1"])  # fmt: skip
    await command(svc, "subnet.create", **t, name="lan-v6", network="lan", cidr="2001:db8::/64")
    await command(svc, "security-group.create", **t, name="web", description="Web ü")
    await command(svc, "security-group.rule-add", **t, security_group="web", port_min=80,
                  port_max=443, remote_cidr="0.0.0.0/0")  # fmt: skip
    await command(svc, "security-group.rule-add", **t, security_group="web", protocol="icmp")
    await command(svc, "qos-policy.create", **t, name="slow", max_kbps=1000, burst_kb=100)
    await command(svc, "server-group.create", **t, name="spread", policy="anti-affinity")
    for i, name in enumerate(["a-c", "ab", "a0", "0a"]):
        await command(svc, "server.create", **t, name=name, image="cirros", flavor="m1",
                      networks=["lan"], labels={"app": "web", "n": str(i)},
                      group="spread", security_groups=["web"])  # fmt: skip
    await command(svc, "server.create", **t, name="box", image="private-img", vcpus=1,
                  ram_mb=64, instance_type="container")  # fmt: skip
    await command(svc, "port.create", **t, name="vip", network="lan", ip="10.0.0.200",
                  qos_policy="slow")  # fmt: skip
    await command(svc, "port.create", **t, name="tmp", network="lan")
    await command(svc, "port.delete", **t, ref="tmp")
    await command(svc, "volume.create", **t, name="data", size_gb=10)
    await command(svc, "volume.create", **t, name="scratch", size_gb=1)
    await command(svc, "volume.attach", **t, volume="data", server="ab")
    await command(svc, "volume.attach", **t, volume="scratch", server="a0")
    await command(svc, "volume.detach", **t, volume="scratch", server="a0")
    await command(svc, "router.create", **t, name="edge", external_network="public")
    await command(svc, "router.add-subnet", **t, router="edge", subnet="lan-v4")
    await command(svc, "router.add-subnet", **t, router="edge", subnet="lan-v6")
    await command(svc, "router.remove-subnet", **t, router="edge", subnet="lan-v6")
    for _ in range(3):
        await command(svc, "floating-ip.create", **t, network="public")
    # (the router's gateway took 203.0.113.2)
    await command(svc, "floating-ip.associate", **t, floating_ip="203.0.113.3", server="a-c")
    await command(svc, "floating-ip.associate", **t, floating_ip="203.0.113.4", port="vip")
    await command(svc, "floating-ip.disassociate", **t, ref="203.0.113.4")
    await command(svc, "floating-ip.delete", **t, ref="203.0.113.5")
    await command(svc, "server.delete", **t, ref="0a")
    await command(svc, "network.delete", **t, ref="lan-2")
    await command(svc, "quota.set", **t, limits={"instances": 5})
    for name in ("billing", "old"):
        await command(svc, "integration.create", **t, name=name, secret="s" * 40)
    await command(svc, "integration.revoke", **t, ref="old")
    for name in ("cmdb", "gone"):
        await command(svc, "webhook.create", **t, name=name, url="https://example.test/h",
                      types=["server.*", "volume.attached"])  # fmt: skip
    await command(svc, "webhook.delete", **t, ref="gone")
    # Two-level scheduling: frameworks, an offer as the allocator makes it
    # (made and on the host's subject), accepted with a task, another open.
    fw = (await command(svc, "framework.register", **t, name="batch", weight=2.0))["data"]
    await command(svc, "framework.register", **t, name="idle")
    for offer in ("of-1", "of-2"):
        cause = Cause(actor="allocator", correlation_id=offer, causation_id=offer)
        await svc.store.append(
            [
                cause.make(OfferMade, "inv", "offer", offer, framework=fw["id"], host="h1",
                           vcpus=8.0, ram_mb=8192.0, disk_gb=0.0,
                           expires_at=time.time() + 3600),
                cause.make(HostOffered, SYSTEM, "host", "h1", offer=offer,
                           framework=fw["id"], framework_tenant="inv"),
            ]
        )  # fmt: skip
        if offer == "of-1":
            await command(svc, "offer.accept", **t, offer=offer, host="h1",
                          tasks=[{"name": "task-1", "vcpus": 1, "ram_mb": 512}])  # fmt: skip


async def rows(engine: AsyncEngine) -> dict[str, list[tuple]]:
    """Every row of the views, in primary key order as each backend sorts it."""
    out = {}
    async with engine.connect() as conn:
        for table in (tenants, users, role_assignments, *resources.TABLES):
            q = select(table).order_by(*table.primary_key.columns)
            out[table.name] = [
                tuple(v.replace(tzinfo=None) if hasattr(v, "tzinfo") else v for v in r)
                for r in (await conn.execute(q)).all()
            ]
    return out


async def publish_poison(store) -> list[int]:
    """Bytes that are no event, straight onto the log with the nats client."""
    seqs = []
    for data in (b"\x00\xffnot msgpack", b"", b"\x93\x01\x02\x03"):
        ack = await store.js.publish("ev.x.tenant.x", data)
        seqs.append(ack.seq)
    return seqs


# -- same log, same digest ---------------------------------------------------


async def test_a_log_from_the_command_service_gives_identical_digests(
    store, sqlite_engine, pg_url, tmp_path
):
    # given a history made through the command service
    last = await build_log(store, tmp_path)
    assert last > 80

    # when it is projected into SQLite and into PostgreSQL (batches that cut it apart)
    lite = sqlite_engine()
    assert await Projector(store, lite, batch=17).catch_up() == last
    async with engine_at(pg_url) as pg:
        assert await Projector(store, pg, batch=17).catch_up() == last

        # then both hold the same rows, sorted the same way, and the digests agree
        assert await rows(pg) == await rows(lite)
        assert await store_digest(pg) == await store_digest(lite)
        got = await rows(pg)
        assert len(got["tenants"]) == 32 and len(got["users"]) == 5
        # every inventory table has rows, deletes and all
        assert all(got[t.name] for t in resources.TABLES), [t.name for t in resources.TABLES]
        # four servers and a framework's task
        assert len(got["servers"]) == 4 + 1 and len(got["floating_ips"]) == 2
        assert len(got["security_group_rules"]) == 2 + 2  # web's and default's
        assert len(got["router_interfaces"]) == 1
        assert {r[3] for r in got["tenants"]} == {"active", "deleted"}
        assert [r[1] for r in got["users"] if r[0] in ("bob", "carol")] == [False, True]
        # the text columns are ordered by code point, whatever the database's collation
        async with pg.connect() as conn:
            collated = await conn.execute(
                text(
                    "SELECT collation_name FROM information_schema.columns"
                    " WHERE table_name = 'tenants' AND column_name = 'id'"
                )
            )
            assert collated.scalar_one() == "C"


async def test_text_keys_sort_by_code_point_on_both_backends(store, sqlite_engine, pg_url):
    # given tenants whose ids a linguistic collation orders differently from bytes
    # (written by an older or foreign writer: the projector folds whatever is logged)
    ids = ["b", "B", "_sys", "a-c", "ab", "0a", "Zeta", "é"]
    await store.append([CAUSE.make(TenantCreated, i, "tenant", i, name=i) for i in ids])
    lite = sqlite_engine()
    await Projector(store, lite).catch_up()
    async with engine_at(pg_url) as pg:
        await Projector(store, pg).catch_up()
        async with pg.connect() as conn:
            on_pg = [t["id"] for t in await list_tenants(conn)]
            # the database itself would sort them otherwise
            linguistic = (
                await conn.execute(
                    text("SELECT x FROM unnest(CAST(:ids AS text[])) AS x ORDER BY x"),
                    {"ids": ids},
                )
            ).scalars()
            assert list(linguistic) != sorted(ids)
        async with lite.connect() as conn:
            on_lite = [t["id"] for t in await list_tenants(conn)]
        assert on_pg == on_lite == sorted(ids)
        assert await store_digest(pg) == await store_digest(lite)


# -- resuming ----------------------------------------------------------------


async def test_the_projector_on_postgres_resumes_from_its_checkpoint(
    store, sqlite_engine, pg_url, tmp_path
):
    # given a log with poison in its first half: applying it twice would
    # insert its quarantine rows twice, which the primary key refuses
    first = await build_log(store, tmp_path, seed=3)
    poison = await publish_poison(store)
    await store.append(
        [
            CAUSE.make(TenantRenamed, "acme", "tenant", "acme", name=f"acme-{i}", previous="x")
            for i in range(30)
        ]
    )
    last = await store.last_seq()
    mid = first + len(poison) + 5
    assert first < poison[0] and poison[-1] < mid < last

    async with engine_at(pg_url) as pg:
        # when a projector stops mid-log...
        assert await Projector(store, pg, batch=9).catch_up(until=mid) == mid
        async with pg.connect() as conn:
            assert await read_checkpoint(conn) == mid
        # ...a follower is cancelled wherever it is, mid-transaction included...
        task = asyncio.create_task(Projector(store, pg, batch=3).run())
        await asyncio.sleep(0.05)
        assert await cancel(task)  # (3.11 can lose a plain cancel())
        cp, at_kill = await store_digest(pg)
        assert mid <= cp <= last
        # (what it left is exactly the world as of its checkpoint)
        assert (cp, at_kill) == await rebuilt(store, sqlite_engine("at-kill.db"), cp)
        # ...and another projector continues to the end
        resumed = Projector(store, pg, batch=9)
        assert await resumed.catch_up() == last

        # then it matches a one-shot run, and nothing was applied twice
        assert await store_digest(pg) == await rebuilt(store, sqlite_engine("one-shot.db"))
        async with pg.connect() as conn:
            assert await quarantine_count(conn) == len(poison)
            acme = (await conn.execute(select(tenants).where(tenants.c.id == "acme"))).one()
        assert (acme.name, acme.updated_seq) == ("acme-29", last)


async def rebuilt(store, engine: AsyncEngine, until: int | None = None) -> tuple[int, str]:
    await Projector(store, engine, batch=500).catch_up(until=until)
    return await store_digest(engine)


# -- poison ------------------------------------------------------------------


async def test_a_poison_event_is_quarantined_on_postgres(store, sqlite_engine, pg_url, tmp_path):
    # given a live projector on PostgreSQL, and undecodable bytes among good events
    await build_log(store, tmp_path, seed=5)
    async with engine_at(pg_url) as pg:
        await init_schema(pg)
        task = asyncio.create_task(Projector(store, pg, batch=10).run())
        try:
            poison = await publish_poison(store)
            await store.append([CAUSE.make(TenantCreated, "late", "tenant", "late", name="late")])
            last = await store.last_seq()
            # then the projector gets past them to the end (bounded wait)
            for _ in range(400):
                async with pg.connect() as conn:
                    if await read_checkpoint(conn) == last:
                        break
                await asyncio.sleep(0.025)
        finally:
            assert await cancel(task)  # (3.11 can lose a plain cancel())

        async with pg.connect() as conn:
            assert await read_checkpoint(conn) == last
            kept = (await conn.execute(select(quarantine).order_by(quarantine.c.seq))).all()
            late = (await conn.execute(select(tenants.c.name).where(tenants.c.id == "late"))).all()
        # the raw bytes are kept as they were (bytea), with the reason
        assert [(r.seq, r.subject, r.data) for r in kept] == [
            (s, "ev.x.tenant.x", d)
            for s, d in zip(poison, (b"\x00\xffnot msgpack", b"", b"\x93\x01\x02\x03"), strict=True)
        ]
        assert all(r.error for r in kept)
        assert late == [("late",)]
        # and the digest (quarantine included) equals SQLite's for the same log
        assert await store_digest(pg) == await rebuilt(store, sqlite_engine())


# -- the query service -------------------------------------------------------


async def test_the_query_service_answers_from_postgres(store, sqlite_engine, pg_url, tmp_path):
    last = await build_log(store, tmp_path, seed=7)
    lite = sqlite_engine()
    await Projector(store, lite).catch_up()
    async with engine_at(pg_url) as pg:
        await Projector(store, pg).catch_up()
        on_pg, on_lite = QueryService(store, pg), QueryService(store, lite)
        for view, body in [
            ("tenants", b"{}"),
            ("tenants", b'{"include_deleted": true}'),
            ("tenant", b'{"tenant": "acme"}'),
            ("users", b"{}"),
            ("roles", b"{}"),
        ]:
            answer = await on_pg.handle(view, body)
            assert answer == await on_lite.handle(view, body), view
        listed = await on_pg.handle("tenants", b"{}")
        assert "admin" in [t["id"] for t in listed]
        assert listed[0]["created_at"].endswith("Z")
        status = await on_pg.handle("status", b"{}")
        assert status["projector_lag"] == 0 and status["projector_seq"] == last
        assert (
            status["projection_digest"]
            == (await on_lite.handle("status", b"{}"))["projection_digest"]
        )


# -- stratus up --db postgresql+asyncpg://... ---------------------------------


@pytest.fixture
def pg_up(tmp_path, pg_url):
    """`stratus up` on PostgreSQL; stopped before its database is dropped."""
    test_cli.CONFIG_HOME["value"] = str(tmp_path / "config")
    u = Up(tmp_path / "data", "--db", pg_url)
    yield u
    u.kill()
    for ports in (tmp_path / "data" / "nats").glob("nats-server_*.ports"):
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(ports.stem.split("_")[1]), signal.SIGKILL)


async def test_stratus_up_runs_on_postgres(pg_up, pg_url):
    url = await asyncio.to_thread(pg_up.start)
    await asyncio.to_thread(login, url)
    r = await asyncio.to_thread(cli, url, "tenant", "create", "acme", "-o", "json")
    assert r.returncode == 0, r.stderr
    status = await asyncio.to_thread(wait_projected, url)
    assert status["projector_lag"] == 0 and status["quarantined"] == 0
    r = await asyncio.to_thread(cli, url, "tenant", "list", "-o", "json")
    assert [t["id"] for t in json.loads(r.stdout)] == ["acme", "admin"]
    # the rows are in PostgreSQL, and no SQLite store was made beside it
    async with engine_at(pg_url) as pg, pg.connect() as conn:
        assert await read_checkpoint(conn) == status["last_seq"]
        ids = (await conn.execute(select(tenants.c.id).order_by(tenants.c.id))).scalars()
        assert list(ids) == ["acme", "admin"]
    assert not (pg_up.data_dir / "projections.db").exists()
    rc, _ = await asyncio.to_thread(pg_up.stop)
    assert rc == 0


async def test_text_with_a_nul_is_quarantined_alike_on_both_backends(store, sqlite_engine, pg_url):
    # given an event whose text PostgreSQL cannot store (a foreign writer's),
    # between good ones; and a zero byte that is no text (the integer 0)
    await store.append([CAUSE.make(TenantCreated, "before", "tenant", "before", name="before")])
    await store.append([CAUSE.make(TenantCreated, "nul", "tenant", "nul", name="a\x00b")])
    await store.append(
        [CAUSE.make(TenantRenamed, "before", "tenant", "before", name="b-0", previous="\x00")]
    )
    await store.append([CAUSE.make(TenantCreated, "after", "tenant", "after", name="after")])
    lite = sqlite_engine()
    await Projector(store, lite).catch_up()
    async with engine_at(pg_url) as pg:
        # when both backends fold it, then neither is stuck on it...
        assert await Projector(store, pg).catch_up() == 4
        async with pg.connect() as conn:
            kept = (await conn.execute(select(quarantine.c.seq, quarantine.c.error))).all()
            names = [t["name"] for t in await list_tenants(conn)]
        # ...it is quarantined with the reason, and the rest applied
        assert [seq for seq, _ in kept] == [2]
        assert "NUL" in kept[0][1]
        assert names == ["after", "b-0"]  # the NUL in `previous` is not stored: no harm
        assert await store_digest(pg) == await store_digest(lite)
