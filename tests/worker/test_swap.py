"""Preemption by swap in a standalone engine (its host buffer): a swapped request goes on
from its KV, with the tokens it would have produced uninterrupted; swapped requests come
back before waiting ones; a full host buffer falls back to recompute; nothing leaks."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
import torch

from common.sampling import SamplingParams
from services.worker.async_engine import AsyncEngine, StreamOutput, _Pending
from services.worker.config import EngineConfig
from services.worker.engine import Engine
from tests.worker.helpers import MakeEngine, prompt, run_to_end

GREEDY = SamplingParams(max_tokens=20, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=20, temperature=0.8, seed=7, ignore_eos=True)
PROMPTS = {f"p{i}": prompt(10, 10 + i) for i in range(4)}
PARAMS = {"p0": GREEDY, "p1": GREEDY, "p2": SEEDED, "p3": GREEDY}


@pytest.fixture
def expected(make_engine: MakeEngine) -> dict[str, list[int]]:
    """Each request alone in a roomy engine: never preempted."""
    roomy = make_engine(num_kv_blocks=128, block_size=4)
    out = {}
    for rid, p in PROMPTS.items():
        roomy.add_request(rid, p, PARAMS[rid])
        out[rid] = run_to_end(roomy)[rid]
    return out


def run_checked(engine: Engine) -> dict[str, list[int]]:
    """`run_to_end`, with the integrity check after every step (swaps mid-flight included)."""
    tokens: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
        engine.check_integrity()
    return tokens


def test_swapped_requests_give_uninterrupted_tokens(
    make_engine: MakeEngine, expected: dict[str, list[int]]
) -> None:
    # 4 requests x 30 tokens need 32 blocks of 4; 14 blocks force preemption.
    tight = make_engine(num_kv_blocks=14, block_size=4, preemption_mode="swap")
    reqs = [tight.add_request(rid, p, PARAMS[rid]) for rid, p in PROMPTS.items()]
    assert run_checked(tight) == expected
    stats = tight.preemption_stats()
    assert stats["swap_outs"] > 0 and stats["swap_ins"] == stats["swap_outs"]
    assert stats["recomputes"] == 0 and stats["swap_fallbacks"] == 0
    assert stats["preemptions"] == sum(r.num_preemptions for r in reqs)
    assert stats["swapped_out_blocks"] == stats["swapped_in_blocks"] > 0
    assert stats["swapped_out_bytes"] == stats["swapped_out_blocks"] * (
        tight.cache.layout.bytes_per_block
    )
    assert tight.swap_space is not None and tight.swap_space.num_used == 0
    assert tight.pool.num_free == tight.pool.num_blocks


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_swap_restores_the_kv_bytes(make_engine: MakeEngine, device: str) -> None:
    engine = make_engine(
        num_kv_blocks=8, block_size=4, preemption_mode="swap", device=device, dtype="float32"
    )
    short = SamplingParams(max_tokens=8, ignore_eos=True)
    engine.add_request("a", prompt(13, 1), short)
    engine.add_request("b", prompt(13, 2), short)  # 4 blocks each: b goes when a needs a 5th
    sched = engine.scheduler
    while not sched.swapping_out:
        engine.step()
    victim = sched.swapping_out[0]
    assert victim.request_id == "b" and victim not in sched.running
    before, computed = (
        engine.cache.tensor[victim.owned_block_ids].clone(),
        victim.num_computed_tokens,
    )
    engine.swap_locally()  # what the next step() starts with
    assert victim in sched.swapped and not victim.block_ids and victim.num_computed_tokens == 0
    engine.check_integrity()
    while not sched.swapping_in:  # a runs on in b's blocks; b comes back when a is done
        engine.step()
    assert "a" not in engine.requests
    engine.swap_locally()
    assert victim in sched.running and victim.num_computed_tokens == computed
    assert torch.equal(engine.cache.tensor[victim.owned_block_ids], before)
    engine.check_integrity()
    run_to_end(engine)
    stats = engine.preemption_stats()
    assert (stats["swap_outs"], stats["swap_ins"], stats["swapped_in_blocks"]) == (1, 1, 4)


def test_a_full_host_buffer_falls_back_to_recompute(
    make_engine: MakeEngine, expected: dict[str, list[int]]
) -> None:
    tight = make_engine(num_kv_blocks=14, block_size=4, preemption_mode="swap", num_swap_blocks=3)
    for rid, p in PROMPTS.items():
        tight.add_request(rid, p, PARAMS[rid])
    assert run_checked(tight) == expected
    stats = tight.preemption_stats()
    assert stats["swap_fallbacks"] > 0 and stats["recomputes"] >= stats["swap_fallbacks"]
    assert stats["swap_ins"] == stats["swap_outs"]


def test_swapped_requests_come_back_before_waiting_ones(make_engine: MakeEngine) -> None:
    engine = make_engine(num_kv_blocks=14, block_size=4, preemption_mode="swap")
    for rid, p in PROMPTS.items():
        engine.add_request(rid, p, PARAMS[rid])
    sched = engine.scheduler
    late = None
    late_started_with_swapped: list[bool] = []
    while engine.has_unfinished():
        engine.step()
        if late is None and sched.swapped:  # a request is swapped out: one arrives now
            late = engine.add_request("late", prompt(6, 99), GREEDY)
            assert late in sched.waiting
        if late is not None and late in sched.running and not late_started_with_swapped:
            late_started_with_swapped.append(bool(sched.swapped))
    assert late is not None and late_started_with_swapped == [False]


def test_abort_and_export_while_swapped(
    make_engine: MakeEngine, expected: dict[str, list[int]]
) -> None:
    engine = make_engine(num_kv_blocks=14, block_size=4, preemption_mode="swap")
    for rid, p in PROMPTS.items():
        engine.add_request(rid, p, PARAMS[rid])
    sched = engine.scheduler
    tokens: dict[str, list[int]] = {}

    def step_until_swapped() -> None:
        while not sched.swapped:
            for out in engine.step():
                tokens.setdefault(out.request_id, []).extend(out.new_token_ids)

    step_until_swapped()
    assert engine.swap_space is not None and engine.swap_space.num_used > 0
    victim = sched.swapped[0]
    out = engine.abort(victim.request_id)
    assert out is not None and out.finished and not out.block_ids
    engine.check_integrity()
    step_until_swapped()
    swapped = {r.request_id for r in sched.swapped}
    states = engine.export_requests()
    assert {s.request_id for s in states} == set(PROMPTS) - {victim.request_id}
    assert all(not s.block_ids and s.num_computed_tokens == 0 for s in states)
    assert not engine.requests and engine.swap_space.num_used == 0
    assert engine.pool.num_free == engine.pool.num_blocks
    engine.check_integrity()
    # The adopting engine recomputes them, a swapped one too: the same tokens.
    adopter = make_engine(num_kv_blocks=128, block_size=4)
    for s in states:
        adopter.adopt(s)
    for rid, more in run_to_end(adopter).items():
        tokens[rid] = tokens.get(rid, []) + more
    assert swapped and all(tokens[rid] == expected[rid] for rid in swapped)
    assert {rid: tokens[rid] for rid in tokens if rid != victim.request_id} == {
        rid: expected[rid] for rid in PROMPTS if rid != victim.request_id
    }


def test_preemption_mode_is_validated() -> None:
    with pytest.raises(ValueError, match="preemption_mode must be recompute|swap"):
        EngineConfig(preemption_mode="swapp").validate()
    with pytest.raises(ValueError, match="num_swap_blocks"):
        EngineConfig(num_swap_blocks=-1).validate()


async def test_a_swapped_request_that_cannot_come_back_fails_not_hangs(
    make_engine: MakeEngine,
) -> None:
    """Memory held outside the queues (a finished request's kept blocks) leaves no room for
    a swapped request: after the stall timeout it fails, as a waiting request would."""

    class KeepingX(AsyncEngine):
        async def _admit(self, p: _Pending) -> dict[str, Any]:
            return {"keep_blocks": p.request_id == "x"}

    engine = make_engine(num_kv_blocks=8, block_size=4, preemption_mode="swap")
    shell = KeepingX(engine, stall_timeout_s=0.2)
    short = SamplingParams(max_tokens=8, ignore_eos=True)
    try:
        x, r = await asyncio.gather(
            *(collect(shell.generate(prompt(13, i), short, rid)) for i, rid in enumerate("xr"))
        )
    finally:
        await shell.close()
    assert x[-1].finish_reason == "length" and x[-1].output is not None
    assert r[-1].finish_reason == "error" and "not enough free KV memory" in (r[-1].error or "")
    assert engine.preemption_stats()["swap_outs"] == 1
    assert engine.swap_space is not None and engine.swap_space.num_used == 0
    engine.release_blocks(x[-1].output.block_ids)
    engine.check_integrity()


async def collect(stream: AsyncIterator[StreamOutput]) -> list[StreamOutput]:
    return [o async for o in stream]
