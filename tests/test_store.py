"""The event store against a real nats-server: conditional appends, batches, dedup.

Reads are the log-reader contract, tests/test_logreader.py."""

from __future__ import annotations

import asyncio

import pytest

from stratus.events.errors import ConcurrencyConflict, Invalid
from stratus.events.model import Cause
from stratus.events.store import MAX_BATCH, AppendRequest, Condition
from stratus.events.tenants import TenantCreated, TenantDeleted, TenantRenamed

# A broken store must fail a test, not hang the run.
pytestmark = pytest.mark.timeout(60)

CAUSE = Cause(actor="test", correlation_id="corr", causation_id="corr")


def created(tenant: str, agg: str | None = None, name: str | None = None) -> TenantCreated:
    """A TenantCreated on ``ev.<tenant>.tenant.<agg>`` (agg defaults to the tenant)."""
    agg = agg or tenant
    return CAUSE.make(TenantCreated, tenant, "tenant", agg, name=name or agg)


def renamed(tenant: str, name: str, previous: str = "old") -> TenantRenamed:
    return CAUSE.make(TenantRenamed, tenant, "tenant", tenant, name=name, previous=previous)


def deleted(tenant: str) -> TenantDeleted:
    return CAUSE.make(TenantDeleted, tenant, "tenant", tenant)


def bounded(coro, seconds: float = 10):
    """Every store call in these tests fails within seconds instead of hanging."""
    return asyncio.wait_for(coro, seconds)


async def ids_at(store, subjects=("ev.>",)) -> list[tuple[int, str]]:
    """(seq, event id) of everything stored on ``subjects``."""
    recs = await bounded(store.read_all(subjects=list(subjects)))
    return [(r.seq, r.decode().id) for r in recs]


# -- conditional appends -----------------------------------------------------


async def test_a_stale_aggregate_expectation_is_refused_and_nothing_lands(store):
    # given an aggregate with two events (seqs 1 and 2)
    first = created("acme")
    await store.append([first], Condition(first.subject, 0))
    await store.append([renamed("acme", "acme-1")], Condition(first.subject, 1))
    assert await store.last_seq() == 2

    # when a writer that last saw seq 1 appends on the condition it held
    with pytest.raises(ConcurrencyConflict) as info:
        await store.append([renamed("acme", "acme-2")], Condition(first.subject, 1))

    # then it is told where the aggregate really is, and nothing was stored
    assert info.value.expected == 1
    assert info.value.actual == 2
    assert info.value.kind == "conflict"
    assert await store.last_seq() == 2
    assert await store.last_seq(first.subject) == 2


@pytest.mark.parametrize("expected", [0, 1, 7])
async def test_any_wrong_expectation_is_refused(store, expected):
    # given an aggregate whose last event is seq 2 (seq 1 is another tenant's)
    await store.append([created("other")])
    e = created("acme")
    await store.append([e])
    # when the expectation is anything but 2 (nothing yet, older, from the future)
    with pytest.raises(ConcurrencyConflict) as info:
        await store.append([deleted("acme")], Condition(e.subject, expected))
    # then it is refused with the true position
    assert info.value.actual == 2
    assert await store.last_seq() == 2


async def test_expecting_nothing_on_a_fresh_aggregate_is_accepted(store):
    await store.append([created("other")])
    e = created("acme")
    result = await store.append([e], Condition(e.subject, 0))
    assert result.seqs == [2]
    assert result.duplicate is False
    assert await store.last_seq(e.subject) == 2


@pytest.mark.parametrize("preexisting", [0, 3], ids=["expect-0", "expect-N"])
async def test_twenty_racing_appenders_have_exactly_one_winner(store, connect_store, preexisting):
    # given an aggregate with `preexisting` events, and 20 writers on 4
    # connections that all read it at the same position
    subject = created("race").subject
    for i in range(preexisting):
        await store.append([renamed("race", f"n{i}")])
    await store.append([created("bystander")])  # the stream moves elsewhere, too
    position = await store.last_seq(subject)
    assert position == preexisting
    before = await store.last_seq()
    stores = [store] + [await connect_store() for _ in range(3)]
    events = [renamed("race", f"winner-{i}") for i in range(20)]

    # when all of them append on that same expectation at once
    results = await asyncio.gather(
        *(
            stores[i % len(stores)].append([e], Condition(subject, position))
            for i, e in enumerate(events)
        ),
        return_exceptions=True,
    )

    # then exactly one lands and 19 are told they lost to it
    wins = [(i, r) for i, r in enumerate(results) if not isinstance(r, BaseException)]
    conflicts = [r for r in results if isinstance(r, ConcurrencyConflict)]
    assert len(wins) == 1, results
    assert len(conflicts) == 19, results
    winner_index, win = wins[0]
    assert win.seqs == [before + 1]
    assert all(c.actual == before + 1 for c in conflicts)
    assert await store.last_seq() == before + 1
    stored = await ids_at(store, [subject])
    assert stored[-1] == (before + 1, events[winner_index].id)
    assert len(stored) == preexisting + 1


async def test_a_tenant_wide_expectation_sees_every_subject_of_the_tenant(store):
    # given tenant acme with one event, observed tenant-wide at its seq
    await store.append([created("acme")])
    seen = await store.last_seq("ev.acme.>")
    assert seen == 1

    # when another subject of the same tenant moves
    await store.append([created("acme", agg="side")])  # ev.acme.tenant.side, seq 2

    # then a tenant-wide condition on the old position is refused...
    with pytest.raises(ConcurrencyConflict) as info:
        await store.append([renamed("acme", "x")], Condition("ev.acme.>", seen))
    assert info.value.actual == 2
    assert await store.last_seq() == 2
    # ...although the aggregate subject itself did not move
    assert await store.last_seq("ev.acme.tenant.acme") == 1


async def test_a_tenant_wide_expectation_ignores_other_tenants(store):
    # given tenant acme observed tenant-wide at seq 1
    await store.append([created("acme")])
    seen = await store.last_seq("ev.acme.>")

    # when only other tenants move, including one whose name extends "acme"
    await store.append([created("globex")])
    await store.append([created("acme-2")])
    await store.append([created("acmeco", agg="acme")])

    # then the tenant-wide condition still holds and the append lands
    result = await store.append([renamed("acme", "x")], Condition("ev.acme.>", seen))
    assert result.seqs == [5]
    assert await store.last_seq("ev.acme.>") == 5


# -- atomic batches ----------------------------------------------------------


async def test_a_batch_with_one_stale_member_lands_nothing(store):
    # given tenant acme at seq 1 and tenant globex at seq 2
    await store.append([created("acme")])
    await store.append([created("globex")])
    before = await store.last_seq()

    # when a batch's second member expects acme to be untouched (stale: it is at 1)
    batch = [created("initech"), renamed("acme", "acme-x"), created("umbrella")]
    with pytest.raises(ConcurrencyConflict) as info:
        await store.append(
            batch,
            [Condition("ev.initech.>", 0), Condition("ev.acme.>", 0, index=1)],
        )

    # then no member landed, not even the ones whose condition held
    assert info.value.actual == 1
    assert await store.last_seq() == before
    assert await store.last_seq("ev.initech.>") == 0
    assert await store.last_seq("ev.umbrella.>") == 0
    assert [seq for seq, _ in await ids_at(store)] == [1, 2]


async def test_a_batch_whose_last_member_is_stale_lands_nothing(store):
    await store.append([created("acme")])
    batch = [created("a1"), created("a2"), created("a3"), renamed("acme", "z")]
    with pytest.raises(ConcurrencyConflict):
        await store.append(batch, Condition("ev.acme.tenant.acme", 0, index=3))
    assert await store.last_seq() == 1


async def test_a_batch_lands_contiguously_and_returns_its_sequences(store, connect_store):
    # given single appends racing from another connection
    other = await connect_store()
    singles = [created(f"single-{i}") for i in range(40)]
    batches = [[created(f"b{b}-{i}") for i in range(8)] for b in range(5)]

    # when five 8-event batches are appended while they run
    async def single_writer():
        for e in singles:
            await other.append([e])

    writer = asyncio.create_task(single_writer())
    results = [await store.append(b) for b in batches]
    await asyncio.wait_for(writer, 30)

    # then each batch got 8 consecutive sequences, holding its events in order
    stored = dict(await ids_at(store))
    assert len(stored) == 40 + 5 * 8
    for batch, result in zip(batches, results, strict=True):
        first = result.seqs[0]
        assert result.seqs == list(range(first, first + len(batch)))
        assert result.duplicate is False
        assert [stored[s] for s in result.seqs] == [e.id for e in batch]


async def test_a_batch_with_its_conditions_holding_lands_whole(store):
    await store.append([created("acme")])
    batch = [renamed("acme", "a2"), created("acme", agg="side"), created("globex")]
    result = await store.append(
        batch,
        [Condition("ev.acme.tenant.acme", 1), Condition("ev.globex.>", 0, index=2)],
    )
    assert result.seqs == [2, 3, 4]
    assert [i for _, i in await ids_at(store)][1:] == [e.id for e in batch]


async def test_an_oversized_batch_or_a_misplaced_condition_is_invalid(store):
    await store.append([created("acme")])
    with pytest.raises(Invalid, match="at most"):
        await store.append([created(f"t{i}") for i in range(MAX_BATCH + 1)])
    with pytest.raises(Invalid, match="index 2"):
        await store.append([created("a"), created("b")], Condition("ev.a.>", 0, index=2))
    assert await store.last_seq() == 1
    assert (await store.append([])).seqs == []


# -- retries (msg id dedup) --------------------------------------------------


async def test_a_retried_single_append_returns_the_original_sequence(store):
    # given an event appended with a command id (the stream has moved on elsewhere too)
    e = created("acme")
    first = await bounded(store.append([e], Condition(e.subject, 0), msg_id="cmd-1"))
    await store.append([created("globex")])

    # when it is retried with the same id and the same (now stale) condition
    again = await bounded(store.append([e], Condition(e.subject, 0), msg_id="cmd-1"))
    # or without a condition
    again_unconditional = await bounded(store.append([e], msg_id="cmd-1"))

    # then nothing new lands and the original sequence comes back
    assert first.seqs == [1]
    assert again.seqs == [1] and again.duplicate is True
    assert again_unconditional.seqs == [1] and again_unconditional.duplicate is True
    assert await store.last_seq() == 2


async def test_a_retried_single_append_is_a_duplicate_even_after_its_aggregate_moved_on(store):
    # given an event appended with a command id, then another event on the same aggregate
    e = created("acme")
    first = await bounded(store.append([e], Condition(e.subject, 0), msg_id="cmd-1"))
    await bounded(
        store.append([renamed("acme", "acme-2")], Condition(e.subject, 1), msg_id="cmd-2")
    )

    # when the first command's append is retried (its condition is stale twice over)
    again = await bounded(store.append([e], Condition(e.subject, 0), msg_id="cmd-1"))

    # then it is recognised as the retry it is: nothing new, the original seq
    assert again.seqs == first.seqs == [1]
    assert again.duplicate is True
    assert await store.last_seq() == 2


async def test_a_retried_batch_returns_the_original_sequences(store):
    # given a batch appended with a command id, with two members on its first subject
    await store.append([created("zero")])
    batch = [created("acme"), renamed("acme", "acme-2"), created("globex")]
    first = await bounded(store.append(batch, Condition("ev.acme.>", 0), msg_id="batch-1"))
    assert first.seqs == [2, 3, 4]

    # when it is retried, with its (now stale) condition and without one
    again = await bounded(store.append(batch, Condition("ev.acme.>", 0), msg_id="batch-1"))
    again_unconditional = await bounded(store.append(batch, msg_id="batch-1"))

    # then nothing new lands and the original sequences come back
    for result in (again, again_unconditional):
        assert result.seqs == [2, 3, 4]
        assert result.duplicate is True
    assert await store.last_seq() == 4


async def test_a_retried_batch_is_a_duplicate_even_after_its_subjects_moved_on(store):
    batch = [created("acme"), created("globex")]
    first = await bounded(store.append(batch, Condition("ev.acme.>", 0), msg_id="batch-1"))
    await store.append([renamed("acme", "later")])
    await store.append([renamed("globex", "later")])

    again = await bounded(store.append(batch, Condition("ev.acme.>", 0), msg_id="batch-1"))

    assert again.seqs == first.seqs == [1, 2]
    assert again.duplicate is True
    assert await store.last_seq() == 4


async def test_a_new_command_id_is_not_a_duplicate(store):
    e = created("acme")
    await bounded(store.append([e], msg_id="cmd-1"))
    second = await bounded(store.append([created("globex")], msg_id="cmd-2"))
    assert second.seqs == [2]
    assert second.duplicate is False


async def test_a_retry_of_a_batch_as_one_event_gets_every_original_sequence(store):
    # given a batch of three appended with a command id
    first = await bounded(store.append([created("a"), created("b"), created("c")], msg_id="b-1"))

    # when the retry decides differently: one event (on another subject)
    again = await bounded(store.append([created("z")], msg_id="b-1"))

    # then the answer is the original append, all of it
    assert again.seqs == first.seqs == [1, 2, 3]
    assert again.duplicate is True
    assert await store.last_seq() == 3


async def test_find_append_answers_from_the_broker_whatever_came_between(store):
    # given a lone event, then requests grouped into one atomic batch (with
    # ids on the members that start each request), then much else
    lone = await bounded(store.append([created("lone")], msg_id="lone"))
    await store.append([created("x0")])
    group = await bounded(
        store.append_group(
            [
                AppendRequest([created("g1"), created("g2")], None, "grp-a"),
                AppendRequest([created("g3")], None, "grp-b"),
                AppendRequest([created("g4"), created("g5"), created("g6")], None, "grp-c"),
            ],
            one_by_one=False,
        )
    )
    for i in range(50):
        await store.append([created(f"later-{i}")], msg_id=f"later-{i}")
    last = await store.last_seq()

    # when each id is looked up, then its own events come back, with headers
    found = {
        mid: await bounded(store.find_append(mid)) for mid in ("lone", "grp-a", "grp-b", "grp-c")
    }
    assert [r.seq for r in found["lone"]] == lone.seqs == [1]
    assert [[r.seq for r in found[m]] for m in ("grp-a", "grp-b", "grp-c")] == [
        r.seqs for r in group
    ]
    assert [r.seqs for r in group] == [[3, 4], [5], [6, 7, 8]]
    assert [r.decode().aggregate.id for r in found["grp-c"]] == ["g4", "g5", "g6"]
    assert found["grp-a"][0].headers["Nats-Msg-Id"] == "grp-a"

    # and an id never used is not found, and no lookup stored anything
    assert await bounded(store.find_append("never-used")) == []
    assert await store.last_seq() == last


@pytest.mark.parametrize(
    ("err_code", "description", "actual"),
    [(10071, "wrong last sequence: 7", 7), (10164, "wrong last sequence", None)],
)
def test_both_wrong_last_sequence_refusals_are_a_conflict(err_code, description, actual):
    """A replicated stream's leader refuses a condition with 10164 (no
    sequence) while another write to the subject is being proposed: a
    conflict like 10071, not an internal error (seen in the cluster bench)."""
    import nats.js.errors

    from stratus.events.store import _translate

    exc = nats.js.errors.APIError(code=400, err_code=err_code, description=description)
    got = _translate(exc, {0: Condition("ev.t.server.s", 3)})
    assert isinstance(got, ConcurrencyConflict)
    assert got.expected == 3 and got.actual == actual
