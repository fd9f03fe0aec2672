"""The command service's state cache: one entry per boundary and fold."""

from __future__ import annotations

from typing import Any

from stratus.handlers.state import StateCache


def count(n: int, _event: Any) -> int:
    return n + 1


def names(seen: tuple[str, ...], event: Any) -> tuple[str, ...]:
    return (*seen, str(event))


def test_two_folds_of_one_subject_keep_their_own_state() -> None:
    # Given two verbs folding the tenant's log differently
    cache = StateCache(store=None)  # type: ignore[arg-type]  # get/invalidate never read
    a = cache.get("ev.acme.>", int, count)
    b = cache.get("ev.acme.>", tuple, names)
    assert a is not b
    a.apply(5, "e1", count)
    b.apply(5, "e1", names)
    # Then each sees its own fold, not the other's
    assert cache.get("ev.acme.>", int, count).state == 1
    assert cache.get("ev.acme.>", tuple, names).state == ("e1",)


def test_an_event_marks_every_fold_of_its_boundaries_stale() -> None:
    cache = StateCache(store=None)  # type: ignore[arg-type]
    a = cache.get("ev.acme.>", int, count)
    b = cache.get("ev.acme.>", tuple, names)
    own = cache.get("ev.acme.volume.v1", int, count)
    other = cache.get("ev.zeta.>", int, count)
    cache.invalidate("ev.acme.volume.v1", "acme")
    assert a.stale and b.stale and own.stale
    assert not other.stale


def test_eviction_forgets_the_fold_it_evicted() -> None:
    cache = StateCache(store=None, max_entries=2)  # type: ignore[arg-type]
    first = cache.get("ev.acme.>", int, count)
    cache.get("ev.acme.>", tuple, names)
    cache.get("ev.zeta.>", int, count)  # evicts the least recently used: ``first``
    assert cache.get("ev.acme.>", int, count) is not first
    cache.invalidate("ev.zeta.x.y", "zeta")
    assert cache.get("ev.zeta.>", int, count).stale
