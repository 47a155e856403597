"""The leader's live KV exchange (services/worker/pipeline/exchanger.py) driving a real
pipeline group in one process: requests running at the drop join the group once their
batch's KV is copied and give the reference tokens; a batch whose transfer fails falls
back to recompute with the same tokens; no block leaks either way."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from common.sampling import SamplingParams
from services.worker.async_engine import AsyncEngine, StreamOutput
from services.worker.config import EngineConfig
from services.worker.engine import Engine
from services.worker.pipeline.exchanger import Exchanger
from tests.worker.helpers import prompt, run_to_end
from tests.worker.pipeline_helpers import CONFIG, make_group, step_members

GREEDY = SamplingParams(max_tokens=20, ignore_eos=True)
REQUESTS = {
    f"r{i}": (
        prompt(n, 30 + i),
        GREEDY
        if i % 2
        else SamplingParams(max_tokens=20, ignore_eos=True, temperature=0.8, seed=i),
    )
    for i, n in enumerate([12, 27, 9, 33])
}


def reference() -> dict[str, list[int]]:
    fields = {f: getattr(CONFIG, f) for f in CONFIG.__struct_fields__}
    engine = Engine.from_config(EngineConfig(**{**fields, "num_kv_blocks": 256}))
    for rid, (p, params) in REQUESTS.items():
        engine.add_request(rid, p, params)
    return run_to_end(engine)


@pytest.mark.parametrize("fail", [False, True])
async def test_running_requests_join_after_their_batch(fail: bool) -> None:
    group = make_group(2)
    for i, (rid, (p, params)) in enumerate(REQUESTS.items()):
        engine = group.members[i % 2].engine
        assert engine is not None
        engine.add_request(rid, p, params)
    got: dict[str, list[int]] = {}
    step_members(group, got, 5)
    leader = group.drop(copy=False)
    plan = group.last_exchange
    assert plan is not None and len(plan.moves) == len(REQUESTS)
    assert not leader.requests  # nobody joined yet: their KV has not moved
    async_engine = AsyncEngine(leader)
    tasks: list[asyncio.Task[None]] = []

    async def consume(rid: str, stream: AsyncIterator[StreamOutput]) -> None:
        async for out in stream:
            got.setdefault(rid, []).extend(out.token_ids)

    def join(state):  # type: ignore[no-untyped-def]
        tasks.append(asyncio.create_task(consume(state.request_id, async_engine.adopt(state))))

    copied: list[int] = []

    async def transfer(src: int, dst: int, copies: list[tuple[int, int]]) -> int:
        if fail:
            raise RuntimeError("the destination daemon went away")
        copied.append(len(copies))
        return group.copy_kv([(src, s, dst, d) for s, d in copies])

    exchanger = Exchanger(
        plan.moves,
        group.stale_states,
        [],
        join=join,
        between_steps=async_engine.call_between_steps,
        unreserve=leader.unreserve,
        stepped=asyncio.Event(),
        sub_bytes=leader.cache.layout.bytes_per_block,
        transfer=transfer,
    )
    try:
        await asyncio.wait_for(exchanger.run(), 30)
        await asyncio.wait_for(asyncio.gather(*tasks), 60)
    finally:
        await async_engine.close()
    stats = exchanger.stats.to_dict()
    if fail:
        assert stats["recomputed"] == len(REQUESTS) and stats["exchanged"] == 0
    else:
        assert stats["exchanged"] == len(REQUESTS) and stats["recomputed"] == 0
        assert sum(copied) == sum(m.num_copies for m in plan.moves)
    assert got == reference()
    leader.check_integrity()
    assert leader.pool.num_free == leader.pool.num_blocks  # reserved sources freed too
