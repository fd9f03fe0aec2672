"""A replica's lane: where its next batch of sampled decisions walks from."""

from __future__ import annotations

import itertools

import pytest

from stratus.handlers.scheduler.lanes import Lane, ring_distance


@pytest.mark.parametrize(
    ("a", "b", "n", "expected"),
    [
        (0, 0, 100, 0),
        (10, 30, 100, 20),
        (95, 5, 100, 10),  # round the end of the table
        (0, 50, 100, 50),
    ],
)
def test_ring_distance(a, b, n, expected):
    assert ring_distance(a, b, n) == expected == ring_distance(b, a, n)


def draws(*rows: int):
    it = itertools.cycle(rows)
    return lambda: next(it)


def test_the_first_batch_starts_at_a_random_row_then_walks_on():
    lane = Lane()
    assert lane.start(1000, 100, draws(400)) == 400
    lane.placed(400, [420, 410, 455], 1000)
    # the next batch walks on from just past the furthest placement
    assert lane.start(1000, 100, draws(7)) == 456
    assert lane.jumps == 1


def test_walking_on_wraps_round_the_table():
    lane = Lane()
    lane.start(1000, 100, draws(990))
    lane.placed(990, [995, 3], 1000)  # 3 is past the end: furthest from 990
    assert lane.start(1000, 100, draws(500)) == 4


def test_another_replica_claiming_near_the_cursor_makes_it_jump_clear():
    lane = Lane()
    lane.start(1000, 100, draws(400))
    lane.placed(400, [450], 1000)
    lane.foreign(470)  # another replica walks just ahead of us
    # draws near 470 are refused; 800 is clear of it
    assert lane.start(1000, 100, draws(430, 520, 800)) == 800
    assert lane.jumps == 2


def test_with_no_clear_row_it_takes_the_last_draw_rather_than_wait():
    lane = Lane()
    for row in range(0, 1000, 50):
        lane.foreign(row)  # every stretch taken
    assert lane.start(1000, 100, draws(*range(8))) == 7


def test_only_the_latest_foreign_claims_count():
    lane = Lane(recent=2)
    for row in (100, 600, 900):
        lane.foreign(row)
    assert lane.clear(100, 1000, 50)  # forgotten
    assert not lane.clear(620, 1000, 50)


def test_an_empty_table_starts_at_zero():
    assert Lane().start(0, 10, draws(5)) == 0
