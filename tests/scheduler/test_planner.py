"""The drop planner (services/scheduler/planner.py): property tests over random clusters,
layer counts, group limits and demands, and the worked examples of the design."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from services.scheduler.elastic import layer_ranges
from services.scheduler.planner import Candidate, plan_drop

P = 1000  # one full copy of the parameters


def cluster(n: int, usages: list[float] | None = None, hosts: int = 1) -> list[Candidate]:
    usages = usages or [0.5] * n
    return [Candidate(f"i{k:02d}", f"h{k % hosts}", usages[k]) for k in range(n)]


@st.composite
def cases(draw: st.DrawFn) -> tuple[list[Candidate], int, int, int]:
    n = draw(st.integers(0, 12))
    usages = draw(st.lists(st.floats(0, 1), min_size=n, max_size=n))
    hosts = draw(st.integers(1, 3))
    layers = draw(st.integers(1, 12))
    max_group = draw(st.integers(2, 6))
    demand = draw(st.integers(-P, 8 * P))
    return cluster(n, usages, hosts), layers, max_group, demand


@settings(max_examples=400, deadline=None)
@given(cases())
def test_plan_invariants(case: tuple[list[Candidate], int, int, int]) -> None:
    cands, layers, max_group, demand = case
    plan = plan_drop(cands, demand, P, layers, max_group)
    if plan is None:
        # No plan: even every admissible merge frees less than the demand.
        assert demand > 0
        return
    assert plan.freed_bytes >= demand  # a plan frees enough ...
    seen: set[str] = set()
    for group in plan.groups:
        g = len(group)
        assert 2 <= g <= max_group and layers % g == 0  # ... in admissible sizes ...
        assert group == sorted(group) and not seen & set(group)  # ... ranks by id, disjoint
        seen |= set(group)
        # Coverage: the members' layer ranges tile [0, L) once (one full copy).
        covered = [layer for lo, hi in layer_ranges(layers, g) for layer in range(lo, hi)]
        assert covered == list(range(layers))
    assert seen <= {c.instance_id for c in cands}
    # One copy freed per merge: a group of g is g - 1 merges.
    assert plan.freed_bytes == P * sum(len(g) - 1 for g in plan.groups)


@settings(max_examples=300, deadline=None)
@given(
    st.integers(2, 12),
    st.integers(1, 6).map(lambda k: 2 * k),
    st.integers(1, 8 * P),
)
def test_pairs_free_enough_iff_enough_pairs_exist(n: int, layers: int, demand: int) -> None:
    """max_group 2, L even: a plan exists iff the pairs can free the demand, and it forms
    the fewest pairs that do (no merge beyond what the demand needs)."""
    plan = plan_drop(cluster(n), demand, P, layers, 2)
    needed = -(-demand // P)
    if needed > n // 2:
        assert plan is None
    else:
        assert plan is not None and len(plan.groups) == needed
        assert all(len(g) == 2 for g in plan.groups)


@given(st.integers(0, 10), st.integers(1, 12), st.integers(2, 6), st.integers(-5 * P, 0))
def test_no_merge_when_nothing_is_queued(n: int, layers: int, max_group: int, demand: int) -> None:
    plan = plan_drop(cluster(n), demand, P, layers, max_group)
    assert plan is not None and plan.groups == [] and plan.freed_bytes == 0


def test_one_host_pairs_first_and_odd_layers_fall_back() -> None:
    cands = [
        Candidate("a", "h1", 0.99),
        Candidate("b", "h2", 0.97),
        Candidate("c", "h1", 0.98),
        Candidate("d", "h2", 0.20),
    ]
    plan = plan_drop(cands, P, P, 8, 2)
    assert plan is not None and plan.groups == [["a", "c"]]  # one pair, of one host
    plan = plan_drop(cands, 2 * P, P, 8, 2)
    assert plan is not None and plan.groups == [["a", "c"], ["b", "d"]]
    # Three layers: no pair divides them, and max_group 2 forbids a triple.
    assert plan_drop(cands, 1, P, 3, 2) is None
    # With max_group 3, a pair is still inadmissible: set aside one by one until none left.
    assert plan_drop(cands, 1, P, 3, 3) is None
    # More demand than every pair frees: fall back.
    assert plan_drop(cands, 2 * P + 1, P, 8, 2) is None
    # Groups of 4 when allowed and needed: pairs first, then the pairs merge.
    plan = plan_drop(cands, 3 * P, P, 8, 4)
    assert plan is not None and plan.groups == [["a", "b", "c", "d"]]
    assert plan.freed_bytes == 3 * P
