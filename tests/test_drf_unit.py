"""Dominant Resource Fairness as pure functions: shares, one pass of
offers, and progressive filling task by task (the DRF paper's example)."""

from __future__ import annotations

import pytest

from stratus.handlers.allocator.drf import Framework, Res, dominant_share, plan_offers

GB = 1024


@pytest.mark.parametrize(
    ("held", "total", "weight", "expected"),
    [
        (Res(3, 12 * GB), Res(9, 18 * GB), 1.0, 2 / 3),  # A: max(3/9, 12/18)
        (Res(6, 2 * GB), Res(9, 18 * GB), 1.0, 2 / 3),  # B: max(6/9, 2/18)
        (Res(6, 2 * GB), Res(9, 18 * GB), 2.0, 1 / 3),  # weight 2 halves it
        (Res(), Res(9, 18 * GB), 1.0, 0.0),
        (Res(1, 1, 5), Res(10, 10, 0), 1.0, 0.1),  # no disk in the cluster: not counted
        (Res(1, 1), Res(), 1.0, 0.0),  # an empty cluster
    ],
)
def test_dominant_share(held, total, weight, expected):
    assert dominant_share(held, total, weight) == pytest.approx(expected)


def test_one_pass_counts_what_it_offered():
    # Two empty frameworks, three equal hosts: a pass does not hand every host
    # to the first framework it found lowest.
    free = {h: Res(4, 8 * GB) for h in ("h1", "h2", "h3")}
    plan = plan_offers(free, [Framework("a"), Framework("b")], {}, Res(12, 24 * GB))
    assert [(o.host, o.framework) for o in plan] == [("h1", "a"), ("h2", "b"), ("h3", "a")]


def test_refused_hosts_go_to_the_next_framework():
    free = {"h1": Res(4, 8 * GB)}
    plan = plan_offers(
        free, [Framework("a"), Framework("b")], {}, Res(4, 8 * GB), refused={"a": {"h1"}}
    )
    assert [(o.host, o.framework) for o in plan] == [("h1", "b")]
    assert plan_offers(free, [Framework("a")], {}, Res(4, 8), refused={"a": {"h1"}}) == []


def progressive_filling(
    hosts: dict[str, Res], demands: dict[str, Res], weights: dict[str, float] | None = None
) -> dict[str, dict[str, int]]:
    """The allocator and frameworks in rounds, with no broker, as the
    services behave: each round offers every free host (``plan_offers``);
    each framework takes one task from each offer that holds one and
    declines the others (refusing that host from then on); until a round
    makes no offer. Returns framework -> host -> tasks."""
    weights = weights or {}
    used = {h: Res() for h in hosts}
    held: dict[str, Res] = {}
    placed: dict[str, dict[str, int]] = {f: {} for f in demands}
    total = Res(
        sum(r.vcpus for r in hosts.values()),
        sum(r.ram_mb for r in hosts.values()),
        sum(r.disk_gb for r in hosts.values()),
    )
    fws = [Framework(f, weights.get(f, 1.0)) for f in demands]
    refused: dict[str, set[str]] = {}
    for _ in range(1000):
        free = {h: hosts[h] - used[h] for h in hosts}
        free = {h: r for h, r in free.items() if r.vcpus >= 1}
        plan = plan_offers(free, fws, held, total, refused)
        if not plan:
            return placed
        for o in plan:
            d = demands[o.framework]
            if d.vcpus <= o.resources.vcpus and d.ram_mb <= o.resources.ram_mb:
                used[o.host] = used[o.host] + d
                held[o.framework] = held.get(o.framework, Res()) + d
                placed[o.framework][o.host] = placed[o.framework].get(o.host, 0) + 1
            else:
                refused.setdefault(o.framework, set()).add(o.host)
    raise AssertionError("did not settle")


def test_the_drf_paper_example_on_one_host():
    # 9 vCPUs, 18 GB; A runs <1 vCPU, 4 GB>, B <3 vCPUs, 1 GB>.
    got = progressive_filling({"h": Res(9, 18 * GB)}, {"a": Res(1, 4 * GB), "b": Res(3, GB)})
    assert got == {"a": {"h": 3}, "b": {"h": 2}}
    total = Res(9, 18 * GB)
    assert dominant_share(Res(3, 12 * GB), total) == pytest.approx(2 / 3)
    assert dominant_share(Res(6, 2 * GB), total) == pytest.approx(2 / 3)


def test_weighted_drf_gives_the_heavier_framework_more():
    # Same tasks <1 vCPU, 1 GB> on 12 vCPUs, 12 GB: even weights share 6 / 6;
    # B at weight 2 ends with twice A's tasks, 8 / 4 (weighted shares
    # 4/12 = 1/3 and 8/12 / 2 = 1/3, equal again).
    host = {"h": Res(12, 12 * GB)}
    demand = {"a": Res(1, GB), "b": Res(1, GB)}
    assert progressive_filling(host, demand) == {"a": {"h": 6}, "b": {"h": 6}}
    assert progressive_filling(host, demand, {"b": 2.0}) == {"a": {"h": 4}, "b": {"h": 8}}


def test_weighted_paper_example_is_bound_by_the_host():
    # The paper's shapes with B at weight 2: B leads (1/12, 1/6, 1/4 ...)
    # but the 9 vCPUs run out at the same point: A 3, B 2 again. On twice
    # the host, 18 vCPUs / 36 GB, too: both unweighted and weighted end at
    # A 6, B 4, because B's fifth task needs 3 vCPUs where 2 are left.
    shapes = {"a": Res(1, 4 * GB), "b": Res(3, GB)}
    assert progressive_filling({"h": Res(9, 18 * GB)}, shapes, {"b": 2.0}) == {
        "a": {"h": 3},
        "b": {"h": 2},
    }
    big = {"h": Res(18, 36 * GB)}
    assert progressive_filling(big, shapes) == {"a": {"h": 6}, "b": {"h": 4}}
    assert progressive_filling(big, shapes, {"b": 2.0}) == {"a": {"h": 6}, "b": {"h": 4}}


def test_drf_across_three_hosts_fragments():
    # The same 9 vCPUs and 18 GB as three hosts of 3 vCPUs, 6 GB: a B task
    # needs a whole host's vCPUs, so a host with an A task can hold no B.
    hosts = {f"h{i}": Res(3, 6 * GB) for i in (1, 2, 3)}
    got = progressive_filling(hosts, {"a": Res(1, 4 * GB), "b": Res(3, GB)})
    # The first round offers h1 to A, h2 to B (A counts h1's offer), h3 to A:
    # A runs one task on h1 and one on h3 (4 GB of each host's 6: one per
    # host), B one on h2 (all its vCPUs). What is left, <2 vCPUs, 2 GB> on h1
    # and h3, holds neither shape: both decline. A 2 tasks (share 8/18 =
    # 0.44), B 1 (3/9 = 0.33): fragmentation, not fairness, stops them.
    assert got == {"a": {"h1": 1, "h3": 1}, "b": {"h2": 1}}
