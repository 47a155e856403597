"""Live migration in process: the stage planner (pure) and a request moved mid-decode from
one engine to another with its KV (tensor copies stand in for the MemPool transfer), while
the source keeps stepping between stages. Greedy and seeded requests give the
single-engine reference tokens; both engines pass check_integrity."""

from __future__ import annotations

import asyncio

import msgspec
import pytest

from common.sampling import SamplingParams
from services.worker.async_engine import AsyncEngine
from services.worker.engine import Engine
from services.worker.migration_plan import MigrationPlan, Stage
from tests.worker.helpers import MakeEngine, prompt, run_to_end

BS = 4
GREEDY = SamplingParams(max_tokens=60, ignore_eos=True)


def seeded(seed: int) -> SamplingParams:
    return SamplingParams(max_tokens=60, ignore_eos=True, temperature=0.9, top_k=40, seed=seed)


REQUESTS = {
    "g": (prompt(23, 1), GREEDY),
    "s": (prompt(30, 2), seeded(5)),
    "other": (prompt(17, 3), seeded(9)),
}


# ------------------------------------------------------------------ planner
def test_plan_copies_full_blocks_live_then_the_rest_paused() -> None:
    plan = MigrationPlan(BS, threshold_blocks=2, max_stages=3)
    ids = list(range(100, 120))
    s1 = plan.live_stage(ids, 4 * BS + 2, preemptions=0)  # 4 full blocks and a partial one
    assert s1 == Stage(0, ids[:4], final=False)
    assert plan.need(s1) == 4
    plan.dst.extend(range(4))
    plan.done(s1)
    s2 = plan.live_stage(ids, 8 * BS, preemptions=0)  # 4 new full blocks
    assert s2 == Stage(4, ids[4:8], final=False) and plan.need(s2) == 4
    plan.dst.extend(range(4, 8))
    plan.done(s2)
    assert plan.live_stage(ids, 9 * BS + 1, preemptions=0) is None  # 2 left: stop
    final = plan.final_stage(ids, 9 * BS + 1, preemptions=0)
    assert final == Stage(8, ids[8:10], final=True) and plan.need(final) == 2
    plan.dst.extend([8, 9, 10])  # one more than needed: spare
    plan.done(final)
    assert (plan.stages, plan.live_stages, plan.blocks_copied) == (3, 2, 10)
    assert plan.adopted_blocks(9 * BS + 1) == list(range(10))
    assert plan.spare_blocks(9 * BS + 1) == [10]


def test_plan_stops_after_max_stages_and_recopies_after_a_preemption() -> None:
    plan = MigrationPlan(BS, threshold_blocks=1, max_stages=1)
    ids = list(range(50))
    s1 = plan.live_stage(ids, 5 * BS, preemptions=2)
    assert s1 is not None
    plan.dst.extend(range(5))
    plan.done(s1)
    assert plan.live_stage(ids, 20 * BS, preemptions=2) is None  # one live stage at most
    # Preempted since: the blocks went back to the pool; everything is copied again.
    moved = list(range(200, 230))
    final = plan.final_stage(moved, 7 * BS + 1, preemptions=3)
    assert final == Stage(0, moved[:8], final=True) and plan.need(final) == 3
    # A block list that changed under the copies is not trusted either.
    plan2 = MigrationPlan(BS)
    s = plan2.live_stage(ids, 6 * BS, preemptions=0)
    assert s is not None
    plan2.dst.extend(range(6))
    plan2.done(s)
    assert plan2.final_stage(moved, 6 * BS + 1, preemptions=0).start == 0
    with pytest.raises(ValueError):
        MigrationPlan(BS, threshold_blocks=0)


def test_plan_of_a_request_without_kv_copies_nothing() -> None:
    plan = MigrationPlan(BS)
    assert plan.live_stage([], 0, preemptions=0) is None
    final = plan.final_stage([], 0, preemptions=0)
    assert final.src == [] and plan.need(final) == 0 and plan.adopted_blocks(0) == []


# --------------------------------------------------------------- two engines
def _copy(src: Engine, dst: Engine, plan: MigrationPlan, stage: Stage, held: list[int]) -> int:
    """Reserve at `dst` (blocks out of its pool, held aside) and copy the stage's blocks."""
    need = plan.need(stage)
    reserved = dst.pool.take_free(need)
    assert len(reserved) == need
    held.extend(reserved)
    plan.dst.extend(reserved)
    for s, d in zip(stage.src, plan.dst_for(stage), strict=True):
        dst.cache.tensor[d].copy_(src.cache.tensor[s])
    plan.done(stage)
    return len(stage.src)


def _step(engine: Engine, out: dict[str, list[int]], n: int) -> None:
    for _ in range(n):
        for o in engine.step():
            out.setdefault(o.request_id, []).extend(o.new_token_ids)


@pytest.mark.parametrize("rid", ["g", "s"])
def test_migrate_mid_decode_gives_reference_tokens(make_engine: MakeEngine, rid: str) -> None:
    ref_engine = make_engine(block_size=BS, num_kv_blocks=256)
    for r, (p, params) in REQUESTS.items():
        ref_engine.add_request(r, p, params)
    ref = run_to_end(ref_engine)

    src = make_engine(block_size=BS, num_kv_blocks=128)
    dst = make_engine(block_size=BS, num_kv_blocks=128)
    dst.add_request("resident", prompt(12, 7), GREEDY)  # the destination is busy too
    for r, (p, params) in REQUESTS.items():
        src.add_request(r, p, params)
    out: dict[str, list[int]] = {}
    _step(src, out, 6)  # prefill done, decoding
    _step(dst, {}, 3)
    plan = MigrationPlan(BS, threshold_blocks=2, max_stages=3)
    held: list[int] = []
    while True:  # live stages, the source decoding between them
        req = src.requests[rid]
        stage = plan.live_stage(list(req.block_ids), req.num_computed_tokens, req.num_preemptions)
        if stage is None:
            break
        _copy(src, dst, plan, stage, held)
        _step(src, out, 12)  # three more blocks' worth of tokens
        _step(dst, {}, 2)
    assert plan.live_stages >= 2
    # Stop: the source is between steps; copy the rest, hand over.
    req = src.requests[rid]
    stage = plan.final_stage(list(req.block_ids), req.num_computed_tokens, req.num_preemptions)
    assert stage.start > 0  # the live copies stood
    _copy(src, dst, plan, stage, held)
    computed = req.num_computed_tokens
    state = src.export_request(rid, keep_kv=False)
    assert state is not None and src.export_request(rid, keep_kv=False) is None
    adopted = plan.adopted_blocks(computed)
    dst.pool.add(b for b in held if b not in set(adopted))  # spare: back to the pool
    state = msgspec.structs.replace(state, block_ids=adopted, num_computed_tokens=computed)
    src.check_integrity()
    dst.adopt(state)
    dst.check_integrity()
    moved_out: dict[str, list[int]] = {}
    while src.has_unfinished() or dst.has_unfinished():
        _step(src, out, 1)
        _step(dst, moved_out, 1)
    tokens = out[rid] + moved_out[rid]
    assert tokens == ref[rid]
    assert all(out[r] == ref[r] for r in REQUESTS if r != rid)
    src.check_integrity()
    dst.check_integrity()
    assert src.pool.num_free == src.pool.num_blocks and dst.pool.num_free == dst.pool.num_blocks


def test_export_request_keeps_kv_or_frees_it(make_engine: MakeEngine) -> None:
    engine = make_engine(block_size=BS, num_kv_blocks=64)
    for r, (p, params) in REQUESTS.items():
        engine.add_request(r, p, params)
    _step(engine, {}, 5)
    blocks = list(engine.requests["g"].block_ids)
    kept = engine.export_request("g", keep_kv=True)
    assert kept is not None and kept.block_ids == blocks and kept.num_computed_tokens > 0
    assert not any(engine.pool.is_allocated(b) or engine.pool.is_free(b) for b in blocks)
    engine.check_integrity()
    free_before = engine.pool.num_free
    dropped = engine.export_request("s", keep_kv=False)
    assert dropped is not None and dropped.block_ids == [] and dropped.generator_state
    assert engine.pool.num_free > free_before
    engine.check_integrity()
    engine.pool.add(blocks)  # the kept blocks come back (the caller moved their KV)
    run_to_end(engine)
    engine.check_integrity()


# ------------------------------------------------------------- async engines
async def test_export_one_moves_a_running_stream_and_gates_hold_its_end(
    make_engine: MakeEngine,
) -> None:
    ref_engine = make_engine(block_size=BS, num_kv_blocks=256)
    for r, (p, params) in REQUESTS.items():
        ref_engine.add_request(r, p, params)
    ref = run_to_end(ref_engine)
    src = AsyncEngine(make_engine(block_size=BS, num_kv_blocks=128))
    dst = AsyncEngine(make_engine(block_size=BS, num_kv_blocks=128))
    try:
        got: dict[str, list[int]] = {r: [] for r in REQUESTS}
        moved: list[bool] = []

        async def run(rid: str) -> None:
            async for out in src.generate(REQUESTS[rid][0], REQUESTS[rid][1], rid):
                got[rid].extend(out.token_ids)
                if out.moved:
                    moved.append(True)

        tasks = [asyncio.create_task(run(r)) for r in REQUESTS]
        while len(got["s"]) < 10:
            await asyncio.sleep(0.005)
        # A gate holds the end of a request (here: "other", about to finish) until set.
        gate = src.finish_gates["other"] = asyncio.Event()
        await src.pause()
        assert await src.export_one("nope") is None
        state = await src.export_one("s", keep_kv=False)
        assert state is not None and state.output_offset == len(state.output_token_ids)
        src.resume()
        async for out in dst.adopt(state):
            got["s"].extend(out.token_ids)
        assert moved == [True] and got["s"] == ref["s"]
        for _ in range(3000):  # "other" finishes in the engine; its end waits on the gate
            if "other" not in src.engine.requests:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        assert "other" not in src.engine.requests and not tasks[2].done()
        assert len(got["other"]) == len(ref["other"]) - 1  # the last token is held back
        gate.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 30)
        assert got["g"] == ref["g"] and got["other"] == ref["other"]
        src.engine.check_integrity()
        dst.engine.check_integrity()
    finally:
        await src.close()
        await dst.close()
