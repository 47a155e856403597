"""A pipeline group in one process (KunServe): every request gets the single-engine
reference tokens, greedy and seeded, when admitted before a drop, during a group, and
across a restore; no block leaks anywhere."""

from __future__ import annotations

import pytest
import torch

from common.sampling import SamplingParams
from services.worker.config import EngineConfig
from services.worker.engine import Engine
from services.worker.pipeline.ring import LocalRing
from services.worker.pipeline.views import kv_view
from tests.worker.helpers import prompt, run_to_end
from tests.worker.pipeline_helpers import (
    CONFIG,
    collect,
    finish_leader,
    finish_members,
    make_group,
    step_members,
)

GREEDY = SamplingParams(max_tokens=24, ignore_eos=True)


def seeded(seed: int) -> SamplingParams:
    return SamplingParams(max_tokens=24, ignore_eos=True, temperature=0.9, top_k=40, seed=seed)


REQUESTS = {
    f"r{i}": (prompt(n, i), GREEDY if i % 2 else seeded(100 + i))
    for i, n in enumerate([9, 30, 17, 5, 41, 12])
}
LATE = {f"late{i}": (prompt(n, 50 + i), seeded(7 + i)) for i, n in enumerate([11, 26])}


@pytest.fixture(scope="module")
def reference() -> dict[str, list[int]]:
    engine = Engine.from_config(EngineConfig(**{**_fields(CONFIG), "num_kv_blocks": 512}))
    for rid, (p, params) in {**REQUESTS, **LATE}.items():
        engine.add_request(rid, p, params)
    return run_to_end(engine)


def _fields(cfg: EngineConfig) -> dict[str, object]:
    return {f: getattr(cfg, f) for f in cfg.__struct_fields__}


def test_group_from_the_start_gives_reference_tokens(reference: dict[str, list[int]]) -> None:
    group = make_group(2)
    leader = group.drop(shuffle=torch.Generator().manual_seed(1))
    for rid, (p, params) in REQUESTS.items():
        leader.add_request(rid, p, params)
    got: dict[str, list[int]] = {}
    finish_leader(leader, got)
    assert got == {rid: reference[rid] for rid in REQUESTS}
    assert leader.pool.num_free == leader.pool.num_blocks
    # Every stage counts its busy time (the bubble is the rest): the leader's steps less
    # their waits on the ring, each follower's batches.
    assert isinstance(leader.ring, LocalRing)
    for busy in [leader.busy()] + [st.busy() for st in leader.ring.stages]:
        assert busy["batches"] > 0 and 0 < busy["busy_s"] <= busy["elapsed_s"], busy


@pytest.mark.parametrize(("g", "exchange"), [(2, True), (4, True), (2, False)])
def test_drop_mid_stream_then_restore_gives_reference_tokens(
    reference: dict[str, list[int]], g: int, exchange: bool
) -> None:
    """Requests running at the drop keep their KV (exchange) or are recomputed."""
    group = make_group(g)
    ids = list(REQUESTS)
    for i, rid in enumerate(ids):  # spread over the members, as a scheduler would
        engine = group.members[i % g].engine
        assert engine is not None
        engine.add_request(rid, *REQUESTS[rid])
    got: dict[str, list[int]] = {}
    step_members(group, got, 6)
    assert any(got.values())  # some tokens were produced before the drop
    leader = group.drop(exchange=exchange, shuffle=torch.Generator().manual_seed(g))
    assert leader.capacity_tokens > group.members[0].capacity * CONFIG.block_size
    plan = group.last_exchange
    assert plan is not None and not plan.recompute
    assert len(plan.moves) == (len(REQUESTS) if exchange else 0)
    if exchange:  # they go on from where they were: nothing to recompute
        assert all(r.num_computed_tokens > 0 for r in leader.requests.values())
    for rid, (p, params) in LATE.items():  # admitted during the group
        leader.add_request(rid, p, params)
    for _ in range(14):
        collect(got, leader.step())
        leader.check_integrity()
    assert leader.has_unfinished()
    collect(got, group.restore())
    assert group.last_plan is not None and group.last_plan.moved > 0
    for m in group.members:
        assert m.engine is not None
        m.engine.check_integrity()
    finish_members(group, got)
    assert got == reference
    for m in group.members:
        assert m.engine is not None
        m.engine.check_integrity()
        assert m.engine.pool.num_free == m.engine.pool.num_blocks
        assert m.model.num_local_layers == m.model.cfg.num_layers


def test_restore_without_room_recomputes_at_home(reference: dict[str, list[int]]) -> None:
    group = make_group(2, capacity=20)
    leader = group.drop()
    for rid, (p, params) in REQUESTS.items():
        leader.add_request(rid, p, params)
    got: dict[str, list[int]] = {}
    for _ in range(20):
        collect(got, leader.step())
    collect(got, group.restore())
    plan = group.last_plan
    assert plan is not None and plan.recomputed > 0 and plan.moved > 0
    finish_members(group, got)
    assert got == {rid: reference[rid] for rid in REQUESTS}


def test_abort_while_in_flight_frees_every_block(reference: dict[str, list[int]]) -> None:
    group = make_group(2)
    leader = group.drop()
    for rid, (p, params) in REQUESTS.items():
        leader.add_request(rid, p, params)
    leader.step()
    leader.step()
    assert leader.in_flight == 2
    aborted = list(REQUESTS)[:3]
    for rid in aborted:
        out = leader.abort(rid)
        assert out is not None and out.finished
    leader.check_integrity()
    got: dict[str, list[int]] = {}
    finish_leader(leader, got, check=False)
    assert not set(got) & set(aborted)  # their rows in flight were dropped
    assert got == {rid: reference[rid] for rid in list(REQUESTS)[3:]}
    leader.check_integrity()
    assert leader.pool.num_free == leader.pool.num_blocks


def test_a_stage_refuses_a_batch_of_another_epoch() -> None:
    group = make_group(2)
    leader = group.drop()
    stage = leader.ring.stages[0]  # type: ignore[attr-defined]
    leader.add_request("a", *REQUESTS["r0"])
    stage.epoch += 1
    with pytest.raises(Exception, match="epoch"):
        leader.step()
    assert kv_view(group.members[0].raw, group.layout, 2).num_blocks > 0
