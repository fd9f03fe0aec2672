"""The scheduler service against a real nats-server: placements, reasons,
liveness, server groups, retries, releases."""

from __future__ import annotations

import asyncio
import subprocess
import time

import pytest

from stratus.events.model import Cause
from stratus.events.resources import ServerDeleted, ServerFailed, ServerScheduled
from stratus.events.scheduling import (
    HostClaimed,
    HostReleased,
    ServerBuildFailed,
    ServerBuildTimeout,
)
from stratus.events.store import STREAM
from stratus.handlers.scheduler import SchedulerConfig, SchedulerService
from stratus.handlers.scheduler.service import DURABLE, WORK_SUBJECT
from stratus.ops.bench.schedkit import (
    disable_host,
    fold_claims,
    group_event,
    host_event,
    outcome,
    register_hosts,
    server_request,
    wait_outcomes,
)


@pytest.fixture
async def scheduler(store):
    started: list[SchedulerService] = []

    async def _start(config: SchedulerConfig | None = None, s=None) -> SchedulerService:
        svc = SchedulerService(s or store, config or SchedulerConfig(seed=7))
        await svc.start()
        started.append(svc)
        return svc

    yield _start
    for svc in started:
        await svc.stop()


async def test_places_on_a_host_that_fits_and_says_why(store, scheduler):
    await register_hosts(
        store,
        [host_event("small", vcpus=1, ram_mb=1024, cpu_ratio=1.0), host_event("big", vcpus=8)],
    )
    await scheduler()
    req = server_request(vcpus=4, ram_mb=4096)
    await store.append([req])
    e = await outcome(store, "acme", req.aggregate.id)
    assert isinstance(e, ServerScheduled)
    assert e.host == "big"
    s = e.scheduling
    assert s["hosts"] == 2 and s["passed"] == 1
    assert s["removed"] == {"insufficient vCPU": 1}
    assert s["top"][0]["host"] == "big"
    # The claim landed on the host's own subject, with the server's size.
    claims = [r.decode() for r in await store.read_all(subjects=["ev._system.host.big"])]
    claim = claims[-1]
    assert isinstance(claim, HostClaimed)
    assert (claim.server, claim.spec.vcpus, claim.spec.ram_mb) == (req.aggregate.id, 4, 4096)
    assert claim.spec == req.spec  # the request's spec, whole
    assert claim.correlation_id == req.correlation_id


async def test_no_valid_host_counts_what_each_filter_removed(store, scheduler):
    hosts = [host_event(f"a{i}", ram_mb=2048, labels={"zone": "a"}) for i in range(3)]
    hosts += [host_event(f"b{i}", ram_mb=65536, labels={"zone": "b"}) for i in range(2)]
    await register_hosts(store, hosts)
    await scheduler()
    req = server_request(ram_mb=8192, labels={"zone": "a"})
    await store.append([req])
    e = await outcome(store, "acme", req.aggregate.id)
    assert isinstance(e, ServerFailed)
    assert e.reason == ("No valid host: 0/5 hosts: 2 label zone=a not matched, 3 insufficient RAM")
    assert e.scheduling["removed"] == {"label zone=a not matched": 2, "insufficient RAM": 3}


async def test_dead_and_disabled_hosts_get_nothing(store, scheduler):
    await register_hosts(store, [host_event("alive")])
    await register_hosts(store, [host_event("dead")], alive=False)
    await register_hosts(store, [host_event("off")])
    await disable_host(store, "off")
    await scheduler()
    reqs = [server_request() for _ in range(6)]
    await store.append(reqs)
    out = await wait_outcomes(store, {r.aggregate.id for r in reqs}, 10)
    assert {e.host for e in out.values()} == {"alive"}
    first = next(iter(out.values()))
    assert first.scheduling["removed"] == {"not alive (no heartbeat)": 1, "disabled": 1}


async def test_a_host_whose_beat_expires_is_skipped(store, scheduler):
    await register_hosts(store, [host_event("steady")])
    await register_hosts(store, [host_event("fading")], ttl=1)
    await scheduler()
    await asyncio.sleep(3)  # the 1 s beat expired on the server
    reqs = [server_request() for _ in range(4)]
    await store.append(reqs)
    out = await wait_outcomes(store, {r.aggregate.id for r in reqs}, 10)
    assert {e.host for e in out.values()} == {"steady"}


async def test_anti_affinity_spreads_and_affinity_packs(store, scheduler):
    await register_hosts(store, [host_event(f"h{i}") for i in range(4)])
    anti, aff = group_event("acme", "anti-affinity"), group_event("acme", "affinity")
    await store.append([anti, aff])
    await scheduler()
    spread = [server_request(group=anti.aggregate.id) for _ in range(4)]
    packed = [server_request(group=aff.aggregate.id) for _ in range(4)]
    for r in [*spread, *packed]:  # one by one: each decision sees the last claim
        await store.append([r])
        await outcome(store, "acme", r.aggregate.id)
    out = await wait_outcomes(store, {r.aggregate.id for r in [*spread, *packed]}, 10)
    assert len({out[r.aggregate.id].host for r in spread}) == 4
    assert len({out[r.aggregate.id].host for r in packed}) == 1
    # A fifth anti-affine member has nowhere to go, and is told why.
    fifth = server_request(group=anti.aggregate.id)
    await store.append([fifth])
    e = await outcome(store, "acme", fifth.aggregate.id)
    assert isinstance(e, ServerFailed)
    assert "4 anti-affinity: group member there" in e.reason


async def test_host_name_zone_and_instance_type(store, scheduler):
    await register_hosts(
        store,
        [
            host_event("vm-only", types=["vm"], zone="z1"),
            host_event("both", zone="z2"),
            host_event("other", zone="z2"),
        ],
    )
    await scheduler()
    pinned = server_request(requested_host="other")
    container = server_request(instance_type="container", zone="z1")
    zoned = server_request(zone="z1")
    await store.append([pinned, container, zoned])
    out = await wait_outcomes(store, {r.aggregate.id for r in (pinned, container, zoned)}, 10)
    assert out[pinned.aggregate.id].host == "other"
    assert out[zoned.aggregate.id].host == "vm-only"
    failed = out[container.aggregate.id]
    assert isinstance(failed, ServerFailed)
    assert failed.scheduling["removed"] == {"no container support": 1, "not in zone z1": 2}


async def test_retry_after_build_failure_lands_elsewhere_then_gives_up(store, scheduler):
    await register_hosts(store, [host_event(f"h{i}") for i in range(3)])
    await scheduler(SchedulerConfig(seed=1, max_attempts=2))
    req = server_request(vcpus=2)
    sid = req.aggregate.id
    await store.append([req])
    first = await outcome(store, "acme", sid)
    assert isinstance(first, ServerScheduled)
    agent = Cause(actor="compute-agent", correlation_id=req.correlation_id, causation_id=first.id)
    mark = await store.last_seq()
    await store.append(
        [agent.make(ServerBuildFailed, "acme", "server", sid, host=first.host, reason="boom")]
    )
    second = await outcome(store, "acme", sid, after=mark)
    assert isinstance(second, ServerScheduled)
    assert second.host != first.host
    assert second.scheduling["attempt"] == 2
    assert second.scheduling["removed"] == {"build failed there before": 1}
    # The failed host's claim was given back in the same batch.
    _, holds = await fold_claims(store)
    assert sid not in holds.get(first.host, [])
    assert holds[second.host] == [sid]
    # The second failure spends the attempts: error, with every host named.
    mark = await store.last_seq()
    await store.append(
        [agent.make(ServerBuildFailed, "acme", "server", sid, host=second.host, reason="bang")]
    )
    last = await outcome(store, "acme", sid, after=mark)
    assert isinstance(last, ServerFailed)
    assert last.reason == f"build failed 2 times ({first.host}: boom; {second.host}: bang)"
    _, holds = await fold_claims(store)
    assert all(sid not in s for s in holds.values())


async def test_deleting_a_server_releases_its_claim(store, scheduler):
    await register_hosts(store, [host_event("only", vcpus=2, cpu_ratio=1.0)])
    await scheduler()
    a = server_request(vcpus=2)
    await store.append([a])
    placed = await outcome(store, "acme", a.aggregate.id)
    assert isinstance(placed, ServerScheduled)
    b = server_request(vcpus=2)
    await store.append([b])
    assert isinstance(await outcome(store, "acme", b.aggregate.id), ServerFailed)
    gone = Cause(actor="compute-agent", correlation_id="c-del", causation_id="c-del")
    await store.append([gone.make(ServerDeleted, "acme", "server", a.aggregate.id)])
    for _ in range(100):
        recs = await store.read_all(subjects=["ev._system.host.only"])
        if isinstance(recs[-1].decode(), HostReleased):
            break
        await asyncio.sleep(0.05)
    assert isinstance(recs[-1].decode(), HostReleased)
    c = server_request(vcpus=2)
    await store.append([c])
    assert isinstance(await outcome(store, "acme", c.aggregate.id), ServerScheduled)


async def test_a_restarted_scheduler_places_what_a_killed_replica_held_at_once(store, scheduler):
    await register_hosts(store, [host_event("h1")])
    gone = SchedulerService(store, SchedulerConfig(seed=1))
    await gone.start()
    await gone.stop()
    req = server_request()
    sid = req.aggregate.id
    await store.append([req])
    # The work consumer delivers the request to a replica that dies before
    # acknowledging it: the broker would redeliver it after ack_wait (30 s).
    psub = await store.js.pull_subscribe(WORK_SUBJECT, durable=DURABLE, stream=STREAM)
    [held] = await psub.fetch(1, timeout=5)
    t0 = time.monotonic()
    await scheduler()
    placed = await outcome(store, "acme", sid, timeout=5)
    assert isinstance(placed, ServerScheduled) and placed.host == "h1"
    assert time.monotonic() - t0 < 5
    # Its redelivery, when it comes, places nothing twice.
    await held.nak()
    for _ in range(200):
        info = await store.js.consumer_info(STREAM, DURABLE)
        if info.num_ack_pending == 0 and info.num_pending == 0:
            break
        await asyncio.sleep(0.05)
    assert info.num_ack_pending == 0
    claims = [
        e
        for r in await store.read_all(subjects=["ev._system.host.h1"])
        if isinstance(e := r.decode(), HostClaimed)
    ]
    assert [c.server for c in claims] == [sid]


async def test_a_server_left_on_a_host_that_stopped_beating_is_timed_out_and_placed_again(
    store, scheduler
):
    await register_hosts(store, [host_event("fading")], ttl=3)
    await scheduler(SchedulerConfig(seed=1, build_timeout_s=1.0))
    req = server_request()
    sid = req.aggregate.id
    await store.append([req])
    first = await outcome(store, "acme", sid)
    assert isinstance(first, ServerScheduled) and first.host == "fading"
    mark = await store.last_seq()
    await register_hosts(store, [host_event("steady")])
    # No agent builds it; the host's beat expires (3 s), and a second after
    # the scheduler saw it dead the claim times out and is placed again.
    second = await outcome(store, "acme", sid, timeout=20, after=mark)
    assert isinstance(second, ServerScheduled) and second.host == "steady"
    evs = [r.decode() for r in await store.read_all(subjects=[f"ev.acme.server.{sid}"])]
    timeouts = [e for e in evs if isinstance(e, ServerBuildTimeout)]
    assert len(timeouts) == 1 and timeouts[0].host == "fading"
    assert "stopped beating" in timeouts[0].reason
    # (dead first, so the liveness filter is the one that counts it)
    assert second.scheduling["removed"] == {"not alive (no heartbeat)": 1}
    assert second.scheduling["attempt"] == 2
    _, holds = await fold_claims(store)
    assert holds.get("fading", []) == [] and holds["steady"] == [sid]


async def test_a_building_server_on_a_live_host_is_never_timed_out(store, scheduler):
    await register_hosts(store, [host_event("busy")])
    svc = await scheduler(SchedulerConfig(seed=1, build_timeout_s=0.5))
    req = server_request()
    await store.append([req])
    assert isinstance(await outcome(store, "acme", req.aggregate.id), ServerScheduled)
    await asyncio.sleep(1.5)  # three timeouts' worth, the host beating all along
    assert await svc.check_builds() == 0
    evs = [
        r.decode() for r in await store.read_all(subjects=[f"ev.acme.server.{req.aggregate.id}"])
    ]
    assert not any(isinstance(e, ServerBuildTimeout) for e in evs)


async def test_two_replicas_never_double_book(store, connect_store, scheduler):
    # Tight hosts, many requests at once, two replicas sharing the work.
    await register_hosts(
        store, [host_event(f"h{i:02d}", vcpus=4, ram_mb=8192, cpu_ratio=1.0) for i in range(20)]
    )
    other = await connect_store()
    await scheduler(SchedulerConfig(seed=1, host_subset_size=1))
    await scheduler(SchedulerConfig(seed=2, host_subset_size=1), s=other)
    reqs = [server_request(vcpus=1 + i % 2, ram_mb=1024 * (1 + i % 3)) for i in range(120)]
    for i in range(0, len(reqs), 20):
        await store.append(reqs[i : i + 20])
    out = await wait_outcomes(store, {r.aggregate.id for r in reqs}, 30)
    report, holds = await fold_claims(store)
    for h, r in report.items():
        assert r["peak_vcpus"] <= r["vcpus"] and r["peak_ram_mb"] <= r["ram_mb"], (h, r)
    placed = [e for e in out.values() if isinstance(e, ServerScheduled)]
    failed = [e for e in out.values() if isinstance(e, ServerFailed)]
    assert len(placed) + len(failed) == 120
    # 20 hosts x 4 vCPUs = 80; the requests ask 180: some must be refused, with reasons.
    assert sum(len(s) for s in holds.values()) == len(placed)
    assert failed and all(f.reason.startswith("No valid host: 0/20 hosts") for f in failed)


async def test_replay_with_another_config_reports_changes_and_spread(store, scheduler):
    from stratus.handlers.scheduler.replay import replay

    # Distinct sizes: no ties, so a subset of 1 decides the same every time.
    await register_hosts(store, [host_event(f"h{i}", vcpus=8 + i, ram_mb=65536) for i in range(6)])
    spread_cfg = SchedulerConfig(seed=3, host_subset_size=1)
    await scheduler(spread_cfg)
    start = await store.last_seq() + 1
    reqs = [server_request(vcpus=2) for _ in range(12)]
    for r in reqs:
        await store.append([r])
        await outcome(store, "acme", r.aggregate.id)
    end = await store.last_seq()

    same = await replay(store, spread_cfg, start, end)
    assert same["decisions"] == 12 and same["changed"] == 0 and same["unknown"] == 0
    assert same["alternative"]["per_host"] == same["recorded"]["per_host"]

    stack_cfg = SchedulerConfig(seed=3, host_subset_size=1, weighers={"LeastRequested": -1.0})
    stacked = await replay(store, stack_cfg, start, end)
    assert stacked["changed"] > 0
    assert stacked["alternative"]["empty"] > stacked["recorded"]["empty"]
    assert stacked["alternative"]["stddev"] > stacked["recorded"]["stddev"]
    assert stacked == await replay(store, stack_cfg, start, end)  # deterministic
    # The live claims are untouched: a replay only reads.
    assert await store.last_seq() == end


def _serve_scheduler(url: str, seed: int, log_path):
    import sys

    with open(log_path, "wb") as log:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "stratus.cli.main",
                "--url",
                url,
                "serve",
                "scheduler",
                # a broker without authentication: no credentials to give
                "--insecure-no-auth",
                "--seed",
                str(seed),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )


async def test_two_replica_processes_5000_racing_requests_never_overcommit(
    nats_server, store, tmp_path
):
    """The issue's invariant: two ``stratus serve scheduler`` processes, 200
    hosts, 5,000 requests of mixed sizes appended at once. Folding the log,
    no host's claims ever exceed capacity x ratio, and every request is
    either placed or refused with a reason."""
    import random

    hosts = [
        host_event(f"h{i:03d}", vcpus=random.Random(i).choice([8, 16]), ram_mb=32768)
        for i in range(200)
    ]
    await register_hosts(store, hosts)
    logs = [tmp_path / f"scheduler-{i}.log" for i in range(2)]
    procs = [_serve_scheduler(nats_server.url, i, log) for i, log in enumerate(logs)]
    try:
        for log in logs:
            for _ in range(300):
                if b"ready" in log.read_bytes():
                    break
                await asyncio.sleep(0.1)
            assert b"ready" in log.read_bytes(), log.read_text()
        rng = random.Random(5)
        sizes = [(1, 1024), (2, 2048), (4, 4096), (8, 16384)]
        reqs = [server_request(f"t{i % 7}", *sizes[rng.randrange(4)]) for i in range(5000)]
        # More than fits (about 16,000 vCPUs asked of 9,600 after ratios).
        await asyncio.gather(*(store.append(reqs[i : i + 100]) for i in range(0, 5000, 100)))
        out = await wait_outcomes(store, {r.aggregate.id for r in reqs}, 120)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()  # never leave a replica behind, whatever failed
                p.wait(5)
    for log in logs:  # a clean run logs no refusals it could not place
        assert b"not appended" not in log.read_bytes(), log.read_text()[-2000:]
    report, holds = await fold_claims(store)
    over = [
        h
        for h, r in report.items()
        if r["peak_vcpus"] > r["vcpus"] or r["peak_ram_mb"] > r["ram_mb"]
    ]
    assert over == []
    placed = [e for e in out.values() if isinstance(e, ServerScheduled)]
    refused = [e for e in out.values() if isinstance(e, ServerFailed)]
    assert len(placed) + len(refused) == 5000
    assert placed and refused
    assert all(e.reason.startswith("No valid host: 0/200 hosts: ") for e in refused)
    # Each placed server holds exactly one claim, on the host it was told.
    where = {s: h for h, servers in holds.items() for s in servers}
    assert len(where) == len(placed)
    assert all(where[e.aggregate.id] == e.host for e in placed)
