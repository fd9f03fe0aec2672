"""Filters, weighers and the decision as pure functions: table-driven, no broker."""

from __future__ import annotations

import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stratus.events.errors import Invalid
from stratus.events.resources import SYSTEM, HostDisabled, ServerSpec
from stratus.events.scheduling import HostClaimed, HostReleased
from stratus.handlers.scheduler import Decider, HostTable, Request, SchedulerConfig, load_config
from stratus.handlers.scheduler.decide import Busy, NoValidHost, Placed
from stratus.handlers.scheduler.filters import (
    AvailabilityZone,
    HostAlive,
    HostEnabled,
    HostName,
    InstanceType,
    Labels,
    ResourceFit,
    Retry,
    ServerGroupAffinity,
    ServerGroupAntiAffinity,
    fits,
)
from stratus.handlers.scheduler.weighers import (
    BalancedAllocation,
    Candidates,
    LeastRequested,
    balanced_score,
    least_requested_score,
    normalise,
    weigh,
)
from stratus.ops.bench.schedkit import CAUSE, group_event, host_event


def table(*hosts, alive: bool = True) -> HostTable:
    t = HostTable(capacity=2)  # small, so the tests also cover growing
    for seq, h in enumerate(hosts, 1):
        t.apply(seq, h)
    if alive:
        t.alive_until[: len(t)] = time.time() + 60
    return t


def claim(t: HostTable, host: str, server: str, vcpus: int, ram_mb: int, group: str = "") -> None:
    e = CAUSE.make(
        HostClaimed,
        SYSTEM,
        "host",
        host,
        server=server,
        server_tenant="acme",
        spec=ServerSpec(name=server, image="i", vcpus=vcpus, ram_mb=ram_mb, group=group),
    )
    t.apply(t.last_applied + 1, e)


def req(exclude: tuple[str, ...] = (), **kw) -> Request:
    """A request for a 1-vCPU, 512 MB server; ``kw`` sets its spec's fields."""
    kw.setdefault("vcpus", 1)
    kw.setdefault("ram_mb", 512)
    spec = ServerSpec(name="s", image="i", **kw)
    return Request(server="s", tenant="acme", spec=spec, exclude=exclude)


def masks(f, t, r) -> dict[str, list[bool]]:
    return {why: m.tolist() for why, m in f.checks(t, r)}


# -- pure cores ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("capacity", "used", "requested", "expected"),
    [
        (16.0, 0.0, 16, True),  # exactly full fits
        (16.0, 15.0, 2, False),
        (16.0, 15.5, 0.5, True),
        (0.0, 0.0, 1, False),  # a host of no capacity takes nothing
    ],
)
def test_fits(capacity, used, requested, expected):
    assert fits(np.array([capacity]), np.array([used]), requested).tolist() == [expected]


@pytest.mark.parametrize(
    ("capacity", "used", "requested", "expected"),
    [
        (8.0, 0.0, 2, 0.75),  # (8 - 0 - 2) / 8
        (8.0, 6.0, 2, 0.0),  # full afterwards
        (4.0, 1.0, 1, 0.5),
        (0.0, 0.0, 1, 0.0),  # no capacity: no preference, not NaN
    ],
)
def test_least_requested_score(capacity, used, requested, expected):
    got = least_requested_score(np.array([capacity]), np.array([used]), requested)
    assert got.tolist() == pytest.approx([expected])


@pytest.mark.parametrize(
    ("cpu", "ram", "expected"),
    [
        (0.5, 0.5, 1.0),  # perfectly balanced
        (1.0, 0.0, 0.5),  # 1 - |1 - 0| / 2
        (0.25, 0.75, 0.75),
    ],
)
def test_balanced_score(cpu, ram, expected):
    assert balanced_score(np.array([cpu]), np.array([ram])).tolist() == pytest.approx([expected])


def test_normalise_spreads_to_unit_range_and_flattens_ties():
    assert normalise(np.array([2.0, 4.0, 3.0])).tolist() == [0.0, 1.0, 0.5]
    assert normalise(np.array([5.0, 5.0])).tolist() == [0.0, 0.0]


# -- filters, table-driven ---------------------------------------------------------


def test_resource_fit_uses_allocation_ratios():
    t = table(
        host_event("a", vcpus=2, ram_mb=4096, cpu_ratio=4.0),  # 8 vCPUs after the ratio
        host_event("b", vcpus=4, ram_mb=2048, cpu_ratio=1.0, ram_ratio=1.5),  # 3072 MB
    )
    claim(t, "a", "x", 7, 1024)
    got = masks(ResourceFit(), t, req(vcpus=2, ram_mb=3000, disk_gb=5))
    assert got == {
        "insufficient vCPU": [False, True],  # a: 7 + 2 > 8
        "insufficient RAM": [True, True],  # b: 3000 <= 3072 thanks to the ratio
        "insufficient disk": [True, True],
    }
    assert "insufficient disk" not in masks(ResourceFit(), t, req(disk_gb=0))


def test_releasing_gives_capacity_back():
    t = table(host_event("a", vcpus=1, cpu_ratio=1.0))
    claim(t, "a", "x", 1, 512)
    assert masks(ResourceFit(), t, req())["insufficient vCPU"] == [False]
    released = CAUSE.make(HostReleased, SYSTEM, "host", "a", server="x", server_tenant="acme")
    t.apply(t.last_applied + 1, released)
    assert masks(ResourceFit(), t, req())["insufficient vCPU"] == [True]
    assert t.claims == {}


@pytest.mark.parametrize(
    ("filter_", "request_", "expected"),
    [
        (HostEnabled(), req(), {"disabled": [True, False, True]}),
        (
            InstanceType(),
            req(instance_type="container"),
            {"no container support": [True, True, False]},
        ),
        (InstanceType(), req(instance_type="vm"), {"no vm support": [True, True, True]}),
        (HostName(), req(requested_host="c"), {"not host c": [False, False, True]}),
        (HostName(), req(requested_host="nope"), {"not host nope": [False, False, False]}),
        (AvailabilityZone(), req(zone="z2"), {"not in zone z2": [False, True, True]}),
        (AvailabilityZone(), req(zone="z9"), {"not in zone z9": [False, False, False]}),
        (
            Labels(),
            req(labels={"ssd": "yes", "rack": "r1"}),
            {
                "label rack=r1 not matched": [True, True, False],
                "label ssd=yes not matched": [True, False, False],
            },
        ),
        (Retry(), req(exclude=("a", "c")), {"build failed there before": [False, True, False]}),
    ],
)
def test_filter_table(filter_, request_, expected):
    t = table(
        host_event("a", zone="z1", labels={"ssd": "yes", "rack": "r1"}),
        host_event("b", zone="z2", labels={"rack": "r1"}),
        host_event("c", zone="z2", types=["vm"]),
    )
    t.apply(t.last_applied + 1, CAUSE.make(HostDisabled, SYSTEM, "host", "b"))
    assert masks(filter_, t, request_) == expected


def test_filters_that_do_not_apply_are_skipped():
    r = req()
    for f in (
        Labels(),
        HostName(),
        AvailabilityZone(),
        ServerGroupAffinity(),
        ServerGroupAntiAffinity(),
        Retry(),
    ):
        assert not f.applies(r), f.name


def test_alive_follows_the_beat_deadline():
    t = table(host_event("a"), host_event("b"), alive=False)
    t.set_alive("a", time.time() + 30)
    t.set_alive("b", time.time() - 1)  # expired
    t.set_alive("later", time.time() + 30)  # heard before it registered
    t.apply(t.last_applied + 1, host_event("later"))
    assert masks(HostAlive(), t, req()) == {"not alive (no heartbeat)": [True, False, True]}


def test_server_group_filters():
    aff, anti = group_event("acme", "affinity"), group_event("acme", "anti-affinity")
    t = table(host_event("a"), host_event("b"), host_event("c"))
    t.apply(t.last_applied + 1, aff)
    t.apply(t.last_applied + 1, anti)
    g_aff, g_anti = aff.aggregate.id, anti.aggregate.id
    # The first member of either kind may go anywhere.
    assert masks(ServerGroupAffinity(), t, req(group=g_aff)) == {}
    assert masks(ServerGroupAntiAffinity(), t, req(group=g_anti)) == {}
    claim(t, "b", "m1", 1, 512, group=g_aff)
    claim(t, "a", "m2", 1, 512, group=g_anti)
    claim(t, "c", "m3", 1, 512, group=g_anti)
    assert masks(ServerGroupAffinity(), t, req(group=g_aff)) == {
        "affinity: not the group's host": [False, True, False]
    }
    assert masks(ServerGroupAntiAffinity(), t, req(group=g_anti)) == {
        "anti-affinity: group member there": [False, True, False]
    }
    # An affinity filter ignores anti-affinity groups and the reverse.
    assert masks(ServerGroupAffinity(), t, req(group=g_anti)) == {}
    assert masks(ServerGroupAntiAffinity(), t, req(group=g_aff)) == {}


# -- weighers and the decision -------------------------------------------------------


def test_least_requested_spreads_and_negative_multiplier_stacks():
    t = table(host_event("a", vcpus=8, ram_mb=8192), host_event("b", vcpus=8, ram_mb=8192))
    claim(t, "a", "x", 8, 4096)
    rows = np.arange(2)
    spread = weigh(t, req(), rows, [(LeastRequested(), 1.0)])
    stack = weigh(t, req(), rows, [(LeastRequested(), -1.0)])
    assert spread.tolist() == [0.0, 1.0]  # b is emptier
    assert stack.tolist() == [-0.0, -1.0]  # a wins when stacking


def test_balanced_allocation_prefers_even_use():
    t = table(
        host_event("cpu-heavy", vcpus=4, ram_mb=4096, cpu_ratio=1.0),
        host_event("even", vcpus=4, ram_mb=4096, cpu_ratio=1.0),
    )
    claim(t, "cpu-heavy", "x", 3, 0)
    claim(t, "even", "y", 1, 1024)
    scores = BalancedAllocation().scores(Candidates(t, req(vcpus=1, ram_mb=1024), np.arange(2)))
    # cpu-heavy: 4/4 CPU vs 1024/4096 RAM -> 1 - 0.75/2; even: 2/4 vs 2048/4096 -> 1
    assert scores.tolist() == pytest.approx([0.625, 1.0])


def test_decision_reports_counts_and_top_weights():
    t = table(
        host_event("big", vcpus=32), host_event("small", vcpus=2, cpu_ratio=1.0), host_event("off")
    )
    t.apply(t.last_applied + 1, CAUSE.make(HostDisabled, SYSTEM, "host", "off"))
    out = Decider(SchedulerConfig(seed=1, host_subset_size=1)).decide(t, req(vcpus=4))
    assert isinstance(out, Placed)
    assert out.host == "big"
    assert out.scheduling["removed"] == {"disabled": 1, "insufficient vCPU": 1}
    assert out.scheduling["hosts"] == 3 and out.scheduling["passed"] == 1
    assert [x["host"] for x in out.scheduling["top"]] == ["big"]


def test_no_valid_host_summary():
    t = table(
        *[host_event(f"h{i}", ram_mb=1024) for i in range(3)], host_event("z", labels={"zone": "b"})
    )
    out = Decider().decide(t, req(ram_mb=4096, labels={"zone": "a"}))
    assert isinstance(out, NoValidHost)
    assert out.reason == "No valid host: 0/4 hosts: 4 label zone=a not matched"


def test_busy_when_only_hosts_with_claims_in_flight_fit():
    t = table(host_event("a"), host_event("b"))
    t.hold[:2] = 1 << 62
    assert isinstance(Decider().decide(t, req()), Busy)
    t.hold[1] = 0
    out = Decider().decide(t, req())
    assert isinstance(out, Placed) and out.host == "b"


def test_same_seed_same_choices():
    hosts = [host_event(f"h{i}", vcpus=16 + i % 3) for i in range(50)]
    picks = []
    for _ in range(2):
        t = table(*hosts)
        d = Decider(SchedulerConfig(seed=42))
        picks.append([d.decide(t, req()).host for _ in range(20)])
    assert picks[0] == picks[1]


def test_config_from_toml_and_its_errors(tmp_path):
    f = tmp_path / "s.toml"
    f.write_text(
        'filters = ["HostEnabled", "ResourceFit"]\nhost_subset_size = 2\n'
        "[weighers]\nLeastRequested = -1.0\n"
    )
    c = load_config(f, seed=3)
    assert c.filters == ["HostEnabled", "ResourceFit"]
    assert c.weighers == {"LeastRequested": -1.0}
    assert (c.host_subset_size, c.seed) == (2, 3)
    for text, fragment in [
        ('filters = ["Nope"]', "unknown filter Nope"),
        ("[weighers]\nMost = 1.0", "unknown weigher Most"),
        ("host_subset_size = 0", "at least 1"),
        ("colour = 1", "colour"),
        ("filters = [", "cannot read"),
    ]:
        f.write_text(text)
        with pytest.raises(Invalid, match=fragment):
            load_config(f)


def test_shipped_config_file_states_the_defaults():
    from pathlib import Path

    shipped = Path(__file__).resolve().parent.parent / "ops" / "scheduler.toml"
    assert load_config(shipped) == SchedulerConfig()


# -- sampling: filter and weigh only enough hosts ------------------------------------


@pytest.mark.parametrize(
    ("hosts", "pct", "expected"),
    [
        (50, 0, 50),  # at most MIN_FEASIBLE hosts: every one
        (1000, 0, 420),  # 50 - 1000/125 = 42 %
        (5000, 0, 500),  # 50 - 40 = 10 %
        (10000, 0, 500),  # 50 - 80 < 5: the 5 % floor
        (100000, 0, 5000),  # 5 %
        (1000, 5, 100),  # 5 % of 1000 is 50: the 100 floor
        (10000, 100, 10000),  # full scoring
        (10000, 20, 2000),
    ],
)
def test_feasible_to_find(hosts, pct, expected):
    from stratus.handlers.scheduler.decide import feasible_to_find

    assert feasible_to_find(hosts, pct) == expected


def test_every_filter_on_a_window_is_the_table_mask_sliced():
    """The contract the sampling relies on: a filter over rows lo..hi says
    what it says over the whole table for those rows."""
    hosts = [
        host_event(
            f"h{i}",
            vcpus=1 + i % 4,
            zone=f"z{i % 3}",
            labels={"rack": f"r{i % 5}"},
            types=["vm"] if i % 7 == 0 else ["vm", "container"],
        )
        for i in range(40)
    ]
    t = table(*hosts)
    g = group_event("acme", "anti-affinity")
    t.apply(t.last_applied + 1, g)
    claim(t, "h3", "m1", 1, 512, group=g.aggregate.id)
    claim(t, "h30", "m2", 1, 512, group=g.aggregate.id)
    t.alive_until[5] = 0.0
    requests = [
        req(vcpus=3),
        req(instance_type="container"),
        req(requested_host="h12"),
        req(zone="z1"),
        req(labels={"rack": "r2"}),
        req(group=g.aggregate.id),
        req(exclude=("h2", "h31")),
    ]
    from stratus.handlers.scheduler.filters import FILTERS

    for name, cls in FILTERS.items():
        f = cls()
        for r in requests:
            if not f.applies(r):
                continue
            whole = {why: m for why, m in f.checks(t, r)}
            for lo, hi in [(0, 40), (0, 13), (13, 31), (31, 40)]:
                part = {why: m for why, m in f.checks(t.window(lo, hi), r)}
                assert part.keys() == whole.keys(), name
                for why, m in part.items():
                    assert m.tolist() == whole[why][lo:hi].tolist(), (name, why, lo, hi)


def big_table(n: int, fit_every: int) -> HostTable:
    """``n`` hosts of 4 vCPUs; all but every ``fit_every``-th nearly full."""
    t = table(*[host_event(f"h{i:04d}", vcpus=4, cpu_ratio=1.0) for i in range(n)])
    for i in range(n):
        if i % fit_every:
            claim(t, f"h{i:04d}", f"s{i}", 3, 512)
    return t


def test_sampled_decision_never_picks_a_host_that_does_not_fit():
    t = big_table(2000, fit_every=37)
    fit = {f"h{i:04d}" for i in range(0, 2000, 37)}
    d = Decider(SchedulerConfig(seed=5, hosts_to_score_pct=5))
    for _ in range(200):
        out = d.decide(t, req(vcpus=2), use_holds=False)
        assert isinstance(out, Placed)
        assert out.host in fit
        s = out.scheduling
        # 100 feasible wanted out of 55: none to spare, so every host was examined
        assert s["passed"] == len(fit) and "examined" not in s


def test_sampled_placement_says_its_counts_are_of_the_hosts_examined():
    t = big_table(4000, fit_every=2)  # 2000 fit; 5 % of 4000 = 200 wanted
    out = Decider(SchedulerConfig(seed=1, hosts_to_score_pct=5)).decide(t, req(vcpus=2))
    assert isinstance(out, Placed)
    s = out.scheduling
    assert s["hosts"] == 4000
    assert 200 <= s["passed"] < 2000
    assert s["examined"] < 4000
    assert s["removed"]["insufficient vCPU"] + s["passed"] == s["examined"]
    assert s["note"].startswith("sampled")
    assert f"filtered {s['examined']} of 4000 hosts" in s["note"]


def test_no_valid_host_when_sampling_counts_every_host():
    t = big_table(3000, fit_every=3000)
    claim(t, "h0000", "s0", 3, 512)  # now no host has 2 vCPUs free
    out = Decider(SchedulerConfig(seed=1, hosts_to_score_pct=5)).decide(t, req(vcpus=2))
    assert isinstance(out, NoValidHost)
    assert out.reason == "No valid host: 0/3000 hosts: 3000 insufficient vCPU"
    assert "examined" not in out.scheduling


# -- a sampled walk from any start, against a scan of every host ---------------------


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(101, 400),
    fill=st.lists(st.tuples(st.integers(0, 399), st.integers(1, 4)), max_size=600),
    held=st.sets(st.integers(0, 399), max_size=80),
    start=st.one_of(st.none(), st.integers(-5, 450)),
    vcpus=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_a_decision_from_any_start_is_exact_against_a_full_scan(n, fill, held, start, vcpus, seed):
    """Whatever row a batch's walk starts from, a chosen host fits (vCPUs
    left >= asked), is not held by a claim in flight, and ``NoValidHost``
    comes only when a scan of every host finds none that fits."""
    t = table(*[host_event(f"h{i:03d}", vcpus=4, cpu_ratio=1.0) for i in range(n)])
    for k, (row, size) in enumerate(fill):
        row %= n
        if t.used_vcpus[row] + size <= 4:
            claim(t, f"h{row:03d}", f"s{k}", size, 512)
    for row in held:
        if row < n:
            t.hold[row] = 1 << 62
    fits_all = (t.col("cap_vcpus") - t.col("used_vcpus")) >= vcpus
    free = fits_all & (t.col("last_seq") >= t.col("hold"))
    d = Decider(SchedulerConfig(seed=seed, hosts_to_score_pct=5))
    out = d.decide(t, req(vcpus=vcpus), start=start)
    if not fits_all.any():
        assert isinstance(out, NoValidHost)
        assert out.scheduling["removed"]["insufficient vCPU"] == n
    elif not free.any():
        assert isinstance(out, Busy)
    else:
        # Held hosts found first may make a sampled walk come back Busy only
        # if it saw no free host; it walks on until it has found enough.
        assert isinstance(out, Placed), out
        assert fits_all[out.row] and free[out.row]
        assert out.scheduling["passed"] <= int(fits_all.sum())


# -- a round's decisions sharing their filtering (``memo``) ------------------------


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(101, 400),
    fill=st.lists(st.tuples(st.integers(0, 399), st.integers(1, 4)), max_size=600),
    sizes=st.lists(st.integers(1, 4), min_size=1, max_size=60),
    pct=st.sampled_from([5.0, 100.0]),
    start=st.integers(0, 399),
    seed=st.integers(0, 2**16),
)
def test_a_round_sharing_its_filtering_decides_as_each_decision_alone_would(
    n, fill, sizes, pct, start, seed
):
    """A round of decisions over one table, each claim held as the round
    holds it: with the round's memo, every decision filters exactly as it
    would alone (same counts, same outcome kind, a chosen host fits and is
    not held), though the hosts it picks may differ."""
    t = table(*[host_event(f"h{i:03d}", vcpus=4, cpu_ratio=1.0) for i in range(n)])
    for k, (row, size) in enumerate(fill):
        row %= n
        if t.used_vcpus[row] + size <= 4:
            claim(t, f"h{row:03d}", f"s{k}", size, 512)
    shared = Decider(SchedulerConfig(seed=seed, hosts_to_score_pct=pct))
    alone = Decider(SchedulerConfig(seed=seed, hosts_to_score_pct=pct))
    memo: dict = {}
    start %= n
    for vcpus in sizes:
        r = req(vcpus=vcpus)
        fits_all = (t.col("cap_vcpus") - t.col("used_vcpus")) >= vcpus
        free = fits_all & (t.col("last_seq") >= t.col("hold"))
        expect = alone.decide(t, r, start=start)
        out = shared.decide(t, r, start=start, memo=memo)
        assert type(out) is type(expect)
        if isinstance(out, Busy):
            assert not free.any()
            continue
        drop = ("top",)
        assert {k: v for k, v in out.scheduling.items() if k not in drop} == {
            k: v for k, v in expect.scheduling.items() if k not in drop
        }
        if isinstance(out, Placed):
            assert fits_all[out.row] and free[out.row]
            t.hold[out.row] = 1 << 62  # in flight until the round ends
    assert len(memo) <= len(set(sizes))


def test_requests_that_read_alike_share_a_key_and_others_do_not():
    d = Decider()
    a = req(vcpus=2, ram_mb=1024)
    b = Request(
        server="other",
        tenant="elsewhere",
        spec=ServerSpec(name="b", image="j", vcpus=2, ram_mb=1024),
    )
    assert d.key(a) == d.key(b)  # name, image, server and tenant: read by no filter
    for other in (
        req(vcpus=3, ram_mb=1024),
        req(vcpus=2, ram_mb=2048),
        req(vcpus=2, ram_mb=1024, disk_gb=5),
        req(vcpus=2, ram_mb=1024, labels={"rack": "r1"}),
        req(vcpus=2, ram_mb=1024, zone="az1"),
        req(vcpus=2, ram_mb=1024, group="g1"),
        req(vcpus=2, ram_mb=1024, requested_host="h1"),
        req(vcpus=2, ram_mb=1024, instance_type="container"),
        req(("h1",), vcpus=2, ram_mb=1024),
    ):
        assert d.key(other) != d.key(a), other


def test_a_filter_that_does_not_say_what_it_reads_is_never_shared():
    from stratus.handlers.scheduler.filters import FILTERS, Filter

    calls = []

    class Odd(Filter):
        name = "Odd"

        def checks(self, t, r):
            calls.append(r.server)
            yield "odd", np.ones(len(t), np.bool_)

    FILTERS["Odd"] = Odd
    try:
        d = Decider(SchedulerConfig(filters=["Odd", "ResourceFit"]))
        t = table(*[host_event(f"h{i}") for i in range(4)])
        memo: dict = {}
        for _ in range(3):
            assert isinstance(d.decide(t, req(), memo=memo, use_holds=False), Placed)
        assert len(calls) == 3 and len(memo) == 3
    finally:
        del FILTERS["Odd"]
