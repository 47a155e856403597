"""Preemption by swap on a worker: a victim's KV moves to its MemPool daemon's host tier
and back (SwapOut / SwapIn), tokens equal a run without preemption, and when idle neither
the engine nor the daemon holds a block; without host room the worker recomputes."""

from __future__ import annotations

import asyncio

import pytest

from common.protocol.elastic import RequestState
from common.sampling import SamplingParams
from services.worker.config import EngineConfig
from services.worker.mempool_engine import MempoolEngine
from tests.daemons import SpawnDaemon
from tests.worker.helpers import MakeEngine, prompt, run_to_end

pytestmark = pytest.mark.integration
PARAMS = [
    SamplingParams(max_tokens=24, ignore_eos=True),
    SamplingParams(max_tokens=24, temperature=0.8, seed=3, ignore_eos=True),
    SamplingParams(max_tokens=24, ignore_eos=True),
    SamplingParams(max_tokens=24, temperature=0.9, seed=5, ignore_eos=True),
]
PROMPTS = [prompt(30, 40 + i) for i in range(4)]


async def run_all(worker: MempoolEngine) -> list[list[int]]:
    async def one(p: list[int], params: SamplingParams) -> list[int]:
        outs = [o async for o in worker.generate(p, params)]
        assert outs[-1].finished and outs[-1].error is None, outs[-1]
        return [t for o in outs for t in o.token_ids]

    return list(await asyncio.gather(*(one(p, s) for p, s in zip(PROMPTS, PARAMS, strict=True))))


def reference(make_engine: MakeEngine) -> list[list[int]]:
    roomy = make_engine(num_kv_blocks=64)
    out = []
    for i, (p, params) in enumerate(zip(PROMPTS, PARAMS, strict=True)):
        roomy.add_request(str(i), p, params)
        out.append(run_to_end(roomy)[str(i)])
    return out


async def run_on_small_daemon(
    spawn_daemon: SpawnDaemon, name: str, host_blocks: int, host_free: int
) -> tuple[list[list[int]], dict[str, int]]:
    """Run the 4 requests on a daemon of 9 device blocks (they need 16 of 16 tokens) with
    only `host_free` host blocks free (the others held by someone else)."""
    daemon = await spawn_daemon(name, device_blocks=9, host_blocks=host_blocks)
    held = await daemon.client.alloc_mem(host_blocks - host_free, tier=1, owner="someone-else")
    worker = await MempoolEngine.connect(
        EngineConfig(model="tiny", preemption_mode="swap"),
        daemon.address,
        owner=name,
        caching=False,
    )
    try:
        got = await run_all(worker)
        stats = worker.engine.preemption_stats()
        worker.engine.check_integrity()
        assert not worker.engine.requests
        assert not worker.engine.scheduler.host_garbage
    finally:
        await worker.close()
    await daemon.client.free_mem(held, tier=1)
    check = await daemon.client.check_integrity()
    assert check.ok, check.message
    st = await daemon.client.stats()
    assert st.client["device"] == 0 and st.client["host"] == 0, st
    return got, stats


async def test_swap_through_the_host_tier(
    spawn_daemon: SpawnDaemon, make_engine: MakeEngine
) -> None:
    got, stats = await run_on_small_daemon(spawn_daemon, "swap-w0", 32, host_free=32)
    assert got == reference(make_engine)
    assert stats["swap_outs"] > 0 and stats["swap_ins"] == stats["swap_outs"]
    assert stats["recomputes"] == 0 and stats["swap_fallbacks"] == 0
    assert stats["swapped_out_blocks"] == stats["swapped_in_blocks"] > 0


async def test_a_full_host_tier_falls_back_to_recompute(
    spawn_daemon: SpawnDaemon, make_engine: MakeEngine
) -> None:
    # One free host block: every victim holds at least 2 (a 30-token prompt).
    got, stats = await run_on_small_daemon(spawn_daemon, "swap-w1", 16, host_free=1)
    assert got == reference(make_engine)
    assert stats["swap_outs"] == stats["swap_ins"] == 0
    assert stats["swap_fallbacks"] == stats["recomputes"] > 0


async def test_requests_leave_while_swapped_and_go_on_elsewhere(
    spawn_daemon: SpawnDaemon, make_engine: MakeEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Export (a group forming, a migration) while a request is swapped: it leaves without
    KV, its host blocks are freed at once, and adopted again it gives the same tokens."""
    daemon = await spawn_daemon("swap-w2", device_blocks=9, host_blocks=32)
    worker = await MempoolEngine.connect(
        EngineConfig(model="tiny", preemption_mode="swap"),
        daemon.address,
        owner="swap-w2",
        caching=False,
    )
    sched = worker.engine.swapper()
    assert sched is not None
    moving: list[asyncio.Future[list[tuple[RequestState, object]]]] = []
    swapped_when_exported: list[str] = []

    async def export_all() -> list[tuple[RequestState, object]]:
        await worker.pause()
        # Swapped, or coming back (device blocks reserved): its KV is on the host either way.
        swapped_when_exported.extend(r.request_id for r in [*sched.swapped, *sched.swapping_in])
        moved = await worker.export()
        st = await daemon.client.stats()
        assert st.client["host"] == 0, st
        worker.resume()
        return moved

    swap = worker._swap

    async def swap_then_export() -> None:
        await swap()
        if sched.swapped and not moving:  # the next pause comes right after this step
            moving.append(asyncio.ensure_future(export_all()))

    monkeypatch.setattr(worker, "_swap", swap_then_export)
    try:

        async def first_part(i: int) -> list[int]:
            outs = [o async for o in worker.generate(PROMPTS[i], PARAMS[i], request_id=str(i))]
            assert outs[-1].moved, outs[-1]
            return [t for o in outs for t in o.token_ids]

        before = await asyncio.gather(*(first_part(i) for i in range(4)))
        moved = await moving[0]
        assert swapped_when_exported and len(moved) == 4

        async def rest(state: RequestState) -> list[int]:
            assert not state.block_ids
            outs = [o async for o in worker.adopt(state)]
            assert outs[-1].finished and outs[-1].error is None, outs[-1]
            return [t for o in outs for t in o.token_ids]

        after = dict(
            zip(
                [s.request_id for s, _ in moved],
                await asyncio.gather(*(rest(s) for s, _ in moved)),
                strict=True,
            )
        )
        got = [before[i] + after[str(i)] for i in range(4)]
        worker.engine.check_integrity()
    finally:
        await worker.close()
    assert got == reference(make_engine)
    check = await daemon.client.check_integrity()
    assert check.ok, check.message
    st = await daemon.client.stats()
    assert st.client["device"] == 0 and st.client["host"] == 0, st


async def test_swap_with_a_cached_prefix(
    spawn_daemon: SpawnDaemon, make_engine: MakeEngine
) -> None:
    """Requests that borrow a cached prefix (pinned in the daemon's index) swap only the
    blocks they own; the prefix stays on the device, and the tokens stay the same."""
    daemon = await spawn_daemon("swap-w3", device_blocks=12, host_blocks=32)
    worker = await MempoolEngine.connect(
        EngineConfig(model="tiny", preemption_mode="swap"), daemon.address, owner="swap-w3"
    )
    shared = prompt(33, 77)  # its 2 whole blocks go to the index
    prompts = [shared + prompt(14, 80 + i) for i in range(4)]  # 5 blocks each with outputs
    greedy = SamplingParams(max_tokens=24, ignore_eos=True)
    try:
        [o async for o in worker.generate(shared, SamplingParams(max_tokens=1))]

        async def one(p: list[int]) -> tuple[list[int], int]:
            outs = [o async for o in worker.generate(p, greedy)]
            assert outs[-1].finished and outs[-1].error is None, outs[-1]
            return [t for o in outs for t in o.token_ids], outs[-1].num_cached_tokens

        results = await asyncio.gather(*(one(p) for p in prompts))
        stats = worker.engine.preemption_stats()
        worker.engine.check_integrity()
    finally:
        await worker.close()
    roomy = make_engine(num_kv_blocks=64)
    for i, p in enumerate(prompts):
        roomy.add_request(str(i), p, greedy)
        assert results[i][0] == run_to_end(roomy)[str(i)], i
    assert all(cached == 32 for _, cached in results)
    assert stats["swap_outs"] > 0 and stats["swap_ins"] == stats["swap_outs"]
    check = await daemon.client.check_integrity()
    assert check.ok, check.message
    st = await daemon.client.stats()
    assert st.client["device"] == 0 and st.client["host"] == 0 and st.pinned["device"] == 0, st
