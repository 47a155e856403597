"""The engine on a MemPool daemon's memory: the worker maps the daemon's region, leases
blocks, reuses cached prefixes across turns (same tokens as without the cache), hands its
KV to the daemon's index, and leaves no block behind."""

from __future__ import annotations

import asyncio

import pytest

from common.sampling import SamplingParams
from services.worker.config import EngineConfig
from services.worker.mempool_engine import MempoolEngine
from tests.daemons import SpawnDaemon
from tests.worker.helpers import MakeEngine, prompt, run_to_end

pytestmark = pytest.mark.integration
GREEDY = SamplingParams(max_tokens=12, ignore_eos=True)


async def tokens_of(
    engine: MempoolEngine, p: list[int], params: SamplingParams
) -> tuple[list[int], int]:
    outs = [o async for o in engine.generate(p, params)]
    assert outs[-1].finished and outs[-1].error is None, outs[-1]
    return [t for o in outs for t in o.token_ids], outs[-1].num_cached_tokens


async def test_multi_turn_reuses_the_cache_and_matches_reference(
    spawn_daemon: SpawnDaemon, make_engine: MakeEngine
) -> None:
    daemon = await spawn_daemon("w0-mempool", device_blocks=64)
    worker = await MempoolEngine.connect(EngineConfig(model="tiny"), daemon.address, owner="w0")
    reference = make_engine(num_kv_blocks=64)
    try:
        turn1 = prompt(37, 1)
        out1, cached1 = await tokens_of(worker, turn1, GREEDY)
        reference.add_request("t1", turn1, GREEDY)
        assert out1 == run_to_end(reference)["t1"] and cached1 == 0
        # The next turn carries the whole history: its whole blocks come from the cache.
        turn2 = turn1 + out1 + prompt(9, 2)
        out2, cached2 = await tokens_of(worker, turn2, GREEDY)
        reference.add_request("t2", turn2, GREEDY)
        assert out2 == run_to_end(reference)["t2"]
        history = len(turn1) + len(out1) - 1  # the last output token has no KV yet
        assert cached2 == history // 16 * 16 and cached2 > 0
        # Concurrent sampled requests that share that history all start from the cache.
        results = await asyncio.gather(
            *(
                tokens_of(
                    worker,
                    turn2 + prompt(5, 10 + i),
                    SamplingParams(max_tokens=8, temperature=0.8, seed=i),
                )
                for i in range(4)
            )
        )
        assert all(cached >= cached2 for _, cached in results)
    finally:
        await worker.close()
    check = await daemon.client.check_integrity()
    assert check.ok, check.message
    st = await daemon.client.stats()
    assert st.client["device"] == 0 and st.pinned["device"] == 0 and st.index["device"] > 0


async def test_without_caching_nothing_is_indexed(spawn_daemon: SpawnDaemon) -> None:
    daemon = await spawn_daemon("w1-mempool", device_blocks=32)
    worker = await MempoolEngine.connect(
        EngineConfig(model="tiny"), daemon.address, owner="w1", caching=False
    )
    try:
        p = prompt(40, 3)
        first, _ = await tokens_of(worker, p, GREEDY)
        again, cached = await tokens_of(worker, p, GREEDY)
        assert first == again and cached == 0
    finally:
        await worker.close()
    st = await daemon.client.stats()
    assert st.index["device"] == 0 and st.client["device"] == 0 and st.free["device"] == 32


async def test_a_small_daemon_forces_eviction_not_failure(
    spawn_daemon: SpawnDaemon, make_engine: MakeEngine
) -> None:
    daemon = await spawn_daemon("w2-mempool", device_blocks=12)
    worker = await MempoolEngine.connect(EngineConfig(model="tiny"), daemon.address, owner="w2")
    reference = make_engine(num_kv_blocks=64)
    try:
        for i in range(5):  # each prompt + output needs 4 blocks; the index must evict
            p = prompt(45, 20 + i)
            got, _ = await tokens_of(worker, p, GREEDY)
            reference.add_request(str(i), p, GREEDY)
            assert got == run_to_end(reference)[str(i)]
    finally:
        await worker.close()
    assert (await daemon.client.check_integrity()).ok
    assert (await daemon.client.stats()).evicted_blocks > 0
