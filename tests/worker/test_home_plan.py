"""The live restore's cut of the home's sub-blocks (services/worker/pipeline/home_plan.py)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.worker.pipeline.home_plan import plan_home


def test_highest_first_table_leaves_the_low_blocks_for_the_home() -> None:
    # 4 whole blocks before the drop (8 sub-blocks at g=2), 6 lent sub-blocks above.
    table = list(range(13, -1, -1))  # group block k -> sub-block 13 - k (highest first)
    plan = plan_home(table, capacity=4, g=2, need=2, min_home=2)
    assert plan is not None
    assert plan.home_blocks == 3  # whole blocks 0..2 (sub-blocks 0..5); the tail is 6, 7
    assert plan.keep == frozenset({6, 7})  # the group blocks on sub-blocks 7 and 6


def test_no_cut_when_the_group_and_the_next_batch_do_not_both_fit() -> None:
    table = list(range(8))
    assert plan_home(table, capacity=4, g=2, need=3, min_home=3) is None  # 3 + 3*2 > 8
    assert plan_home(table, capacity=4, g=2, need=2, min_home=3) is not None
    # The cut moves up as the group shrinks: more whole blocks for the home.
    first = plan_home(table, capacity=4, g=2, need=4, min_home=1)
    later = plan_home(table, capacity=4, g=2, need=1, min_home=1)
    assert first is not None and later is not None
    assert (first.home_blocks, later.home_blocks) == (2, 3) and later.keep < first.keep


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError):
        plan_home([0, 1], capacity=0, g=2, need=0, min_home=0)
    with pytest.raises(ValueError):
        plan_home([0, 1], capacity=1, g=1, need=0, min_home=0)


@settings(max_examples=200, deadline=None)
@given(
    g=st.integers(2, 4),
    capacity=st.integers(1, 12),
    extra=st.integers(0, 12),
    need=st.integers(0, 12),
    min_home=st.integers(0, 12),
    data=st.data(),
)
def test_plan_invariants(
    g: int, capacity: int, extra: int, need: int, min_home: int, data: st.DataObject
) -> None:
    subs = data.draw(st.permutations(range(capacity * g + extra)))
    table = list(subs[: data.draw(st.integers(0, len(subs)))])
    plan = plan_home(table, capacity, g, need, min_home)
    ceiling = capacity * g
    feasible = [
        e
        for e in range(capacity + 1)
        if e >= min_home and sum(1 for s in table if e * g <= s < ceiling) >= need
    ]
    if plan is None:
        assert not feasible
        return
    assert plan.home_blocks == max(feasible)  # the largest home region that works
    tail = range(plan.home_blocks * g, ceiling)
    assert all(table[k] in tail for k in plan.keep)
    assert {k for k, s in enumerate(table) if s in tail} == plan.keep
    assert len(plan.keep) >= need and plan.home_blocks >= min_home
