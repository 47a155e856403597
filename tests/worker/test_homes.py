"""Property test of the restore planner (`services/worker/pipeline/homes.py`).

The plan's copies are simulated on dicts (member -> sub-block -> content): every sub-block
that holds a request's KV starts with a tag naming (request, group block, member); any
other sub-block holds garbage. The rounds run in order; inside a round every copy reads
its source before any copy of the round writes (pairs run at once), and the test also
checks that no copy of a round writes where another copy of the same round reads, so the
order inside a round cannot matter. After the rounds every request that moved must find,
at its home h, its group block k_i's member-j part in sub-block `e_i*g + j` for whole
blocks e_i below capacity[h]; keep(h) must list exactly those e-blocks.
"""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from services.worker.pipeline.homes import plan_restore


@st.composite
def groups(draw: st.DrawFn) -> tuple[list[Any], list[list[int]], list[int]]:
    g = draw(st.integers(2, 4))
    # Each member's pre-drop capacity (full blocks) and its grown capacity while split.
    capacity = [draw(st.integers(0, 6)) for _ in range(g)]
    grown = [c + draw(st.integers(0, 6)) for c in capacity]
    n_group = min(c * g for c in grown)  # group blocks: min over members of sub-blocks
    tables: list[list[int]] = []
    for j in range(g):
        subs = list(range(grown[j] * g))
        perm = draw(st.permutations(subs)) if subs else []
        # The real tables list ids highest first; the planner must not rely on it.
        if draw(st.booleans()):
            perm = sorted(subs, reverse=True)
        tables.append(list(perm[:n_group]))
    # Requests own disjoint sets of group blocks (no sharing in the group pool).
    free = list(draw(st.permutations(list(range(n_group))))) if n_group else []
    requests = []
    for i in range(draw(st.integers(0, 6))):
        n = draw(st.integers(0, len(free)))
        blocks, free = free[:n], free[n:]
        requests.append((f"r{i}", blocks, draw(st.integers(1, 50))))
    return requests, tables, capacity


@settings(max_examples=400, deadline=None)
@given(groups())
def test_plan_restore_moves_every_request_whole_below_capacity(
    case: tuple[list[Any], list[list[int]], list[int]],
) -> None:
    requests, tables, capacity = case
    g = len(tables)
    plan = plan_restore(requests, tables, capacity)

    # Every request has exactly one home.
    assert set(plan.homes) == {rid for rid, _, _ in requests}

    mem: list[dict[int, object]] = [{} for _ in range(g)]
    for j in range(g):
        for s in range(max(tables[j], default=-1) + 1):
            mem[j][s] = ("garbage", j, s)
    for rid, blocks, _ in requests:
        for j in range(g):
            for k in blocks:
                mem[j][tables[j][k]] = (rid, k, j)

    for ops in plan.rounds:
        reads = {(c.src_member, c.src) for c in ops}
        writes = [(c.dst_member, c.dst) for c in ops]
        assert len(writes) == len(set(writes)), "a round writes one sub-block twice"
        assert not reads & set(writes), "a round writes a sub-block it also reads"
        values = [mem[c.src_member][c.src] for c in ops]
        for c, v in zip(ops, values, strict=True):
            mem[c.dst_member][c.dst] = v

    for rid, blocks, _ in requests:
        home = plan.homes[rid]
        h = home.member
        assert 0 <= h < g
        if not home.blocks:
            continue
        assert len(home.blocks) == len(blocks)
        assert len(set(home.blocks)) == len(home.blocks)
        for k, e in zip(blocks, home.blocks, strict=True):
            assert 0 <= e < capacity[h]
            for j in range(g):
                assert mem[h][e * g + j] == (rid, k, j), (rid, k, e, j)

    for h in range(g):
        mine = [e for hm in plan.homes.values() if hm.member == h for e in hm.blocks]
        assert len(mine) == len(set(mine)), "two requests share a whole block at home"
        assert plan.keep(h) == sorted(mine)
        assert all(0 <= e < capacity[h] for e in plan.keep(h))
    assert plan.moved + plan.recomputed == len(requests)


def test_plan_restore_moves_all_when_group_kv_sits_above_capacity() -> None:
    """Tables highest first (as the members lease them): group KV sits in lent memory,
    above every member's pre-drop capacity, so everything fits in one round."""
    g, cap, grown = 2, 4, 8
    tables = [sorted(range(grown * g), reverse=True) for _ in range(g)]
    requests = [("a", [0, 1], 20), ("b", [2], 10), ("c", [3, 4, 5], 30)]
    plan = plan_restore(requests, tables, [cap, cap])
    assert plan.recomputed == 0
    assert len(plan.rounds) == 1
