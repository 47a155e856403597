"""Disaggregated prefill/decode between two real worker processes, each on its own MemPool
daemon: every caching mode gives the single-process reference's tokens, the next turn
hits the caches where the mode keeps history, pd-caching-2 sends only new KV, pd-caching-3
leaves the decode-phase KV on the prefill side, a seeded sampled request draws the same
tokens as in one process (its generator state travels), a failed transfer makes decode
recompute, and both daemons pass their integrity check when idle."""

from __future__ import annotations

import asyncio

import pytest

from common.protocol import worker as wp
from common.sampling import SamplingParams
from tests.daemons import SpawnDaemon, SpawnWorker
from tests.worker.helpers import MakeEngine, prompt, run_to_end
from tests.worker.pd_helpers import MODES, check_mode, idle_and_intact, start, tokens_of

pytestmark = pytest.mark.integration


async def test_each_mode_gives_the_reference_tokens_and_caches_the_next_turn(
    spawn_daemon: SpawnDaemon, spawn_worker: SpawnWorker, make_engine: MakeEngine
) -> None:
    # Modes are per request, so one pair of workers serves all four (own prompts each).
    c = await start(spawn_daemon, spawn_worker)
    try:
        for i, mode in enumerate(MODES):
            await check_mode(c, make_engine(num_kv_blocks=128), mode, seed=10 * i)
    finally:
        c.close()


async def test_seeded_sampling_gives_the_reference_tokens_in_every_mode(
    spawn_daemon: SpawnDaemon, spawn_worker: SpawnWorker, make_engine: MakeEngine
) -> None:
    # The request's generator state travels in `Continue`: decode draws where prefill
    # stopped, so a seeded request samples exactly as it would in one process.
    c = await start(spawn_daemon, spawn_worker)
    reference = make_engine(num_kv_blocks=128)
    params = SamplingParams(max_tokens=16, temperature=0.8, top_p=0.9, seed=1234, ignore_eos=True)
    try:
        for i, mode in enumerate(MODES):
            p = prompt(37, 50 + i)
            chunks = await c.run(f"seeded-{mode}", p, params, mode)
            reference.add_request(mode, p, params)
            assert tokens_of(chunks) == run_to_end(reference)[mode], mode
            assert chunks[-1].instance_id == "d0"
        await idle_and_intact(c.pd, c.dd)
    finally:
        c.close()


async def test_a_failed_transfer_makes_decode_recompute(
    spawn_daemon: SpawnDaemon, spawn_worker: SpawnWorker, make_engine: MakeEngine
) -> None:
    c = await start(spawn_daemon, spawn_worker)
    reference = make_engine(num_kv_blocks=128)
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    try:
        p = prompt(40, 3)
        # Nobody answers at this daemon address: the transfer times out (5 s).
        chunks = await c.run("x", p, params, "pd-caching-2", decode_mempool="tcp://127.0.0.1:9")
        reference.add_request("x", p, params)
        assert tokens_of(chunks) == run_to_end(reference)["x"]
        assert chunks[-1].instance_id == "d0"
        await idle_and_intact(c.pd, c.dd)
    finally:
        c.close()


async def test_an_abort_before_the_hand_off_lands_frees_the_kv(
    spawn_daemon: SpawnDaemon, spawn_worker: SpawnWorker
) -> None:
    c = await start(spawn_daemon, spawn_worker)
    try:
        # The decode side hears the abort first; the Continue that follows is dropped.
        await c.to_decode.send(wp.Abort("gone"))
        await asyncio.sleep(0.2)
        params = SamplingParams(max_tokens=50, ignore_eos=True)
        handoff = wp.HandOff(
            instance_id="d0",
            address=c.decode.endpoints["requests"],
            mempool=c.dd.address,
            insert=True,
            cache=True,
        )
        await c.to_prefill.send(
            wp.Generate(
                request_id="gone",
                token_ids=prompt(64, 4),
                params=params,
                reply_to=c.replies.address,
                cache=True,
                handoff=handoff,
            )
        )
        first = await asyncio.wait_for(c.replies.recv(), 30)
        assert first.request_id == "gone" and first.offset == 0 and not first.finished
        # No more chunks: decode dropped the request and freed what arrived.
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(c.replies.recv(), 1.5)
        await idle_and_intact(c.pd, c.dd)
        st = await c.dd.client.stats()
        assert st.bytes_received > 0
    finally:
        c.close()
