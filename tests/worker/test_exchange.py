"""The group's tables and the live exchange plan (services/worker/pipeline/exchange.py),
checked against a simulation of the members' memory: after the plan's copies, every
exchanged request finds each of its blocks' layers, on every member, in the sub-block its
group block maps to there; nothing else is overwritten; every sub-block is used once."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from services.worker.pipeline.exchange import StaleRequest, build_tables, permute


@st.composite
def commits(draw: st.DrawFn) -> tuple[int, list[list[int]], list[StaleRequest]]:
    g = draw(st.sampled_from([2, 4]))
    rng = random.Random(draw(st.integers(0, 10_000)))
    held: list[list[int]] = []
    stale: list[StaleRequest] = []
    for m in range(g):
        capacity = draw(st.integers(1, 12))  # full blocks the member served with
        lent = draw(st.integers(0, 40))  # sub-blocks its parameters lent
        held.append(list(range(capacity * g + lent)))
        blocks = list(range(capacity))
        rng.shuffle(blocks)
        n_requests = draw(st.integers(0, 3))
        for i in range(n_requests):
            n = draw(st.integers(1, 4))
            mine, blocks = blocks[:n], blocks[n:]
            if mine:
                stale.append(StaleRequest(f"m{m}-r{i}", m, tuple(mine)))
    return g, held, stale


@settings(max_examples=200, deadline=None)
@given(commits(), st.integers(0, 1000))
def test_after_the_copies_every_exchanged_block_is_whole_in_the_group(
    commit: tuple[int, list[list[int]], list[StaleRequest]], seed: int
) -> None:
    g, held, stale = commit
    plan = build_tables(held, stale, g)
    if seed % 2:
        order = list(range(plan.num_blocks))
        random.Random(seed).shuffle(order)
        plan = permute(plan, order)
    # Tables: one length; within a member every sub-block once, all held.
    assert len({len(t) for t in plan.tables}) == 1
    for m, table in enumerate(plan.tables):
        assert len(set(table)) == len(table) and set(table) <= set(held[m])
    exchanged = {mv.request_id for mv in plan.moves}
    assert exchanged | set(plan.recompute) == {r.request_id for r in stale}
    assert not exchanged & set(plan.recompute)
    # Memory: stale sub-block b*g+j at home holds (request, b, j); everything else junk.
    memory = [dict.fromkeys(held[m], "junk") for m in range(g)]
    for r in stale:
        for b in r.blocks:
            for j in range(g):
                memory[r.home][b * g + j] = (r.request_id, b, j)
    for mv in plan.moves:
        for src_m, src, dst_m, dst in mv.copies:
            assert memory[dst_m][dst] == "junk", "a copy overwrote live data"
            memory[dst_m][dst] = memory[src_m][src]
    by_id = {r.request_id: r for r in stale}
    held_ids = plan.held()
    for mv in plan.moves:
        r = by_id[mv.request_id]
        assert len(mv.group_blocks) == len(r.blocks)
        assert plan.tables[r.home][mv.group_blocks[0]] == r.blocks[0] * g + r.home  # in place
        for k, b in zip(mv.group_blocks, r.blocks, strict=True):
            for j in range(g):
                assert memory[j][plan.tables[j][k]] == (r.request_id, b, j)
        assert set(mv.group_blocks) | set(mv.reserved) <= held_ids
        assert len(mv.reserved) == len(r.blocks) * (g - 1)
    # Group ids start taken exactly once each.
    all_taken = [k for mv in plan.moves for k in (*mv.group_blocks, *mv.reserved)]
    assert len(all_taken) == len(set(all_taken)) == len(held_ids)


def test_without_room_a_request_is_recomputed_and_its_blocks_are_free() -> None:
    g = 2
    held = [list(range(8)), list(range(4))]  # member 1 has 4 sub-blocks, no lent memory
    stale = [StaleRequest("big", 0, (0, 1, 2)), StaleRequest("small", 0, (3,))]
    plan = build_tables(held, stale, g)
    assert plan.recompute == ["big"] and [m.request_id for m in plan.moves] == ["small"]
    # small: in place 6, source 7 (reserved), each with a fresh sub-block on member 1;
    # big's stale sub-blocks are free again and pair with member 1's last two.
    assert plan.num_blocks == 4 and set(plan.tables[0]) == {4, 5, 6, 7}
    assert plan.held() == set(plan.moves[0].group_blocks) | set(plan.moves[0].reserved)
