"""The gateway in front of a real worker process on a real MemPool daemon (the scheduler is
a stand-in that places everything there): the greedy tokens of the single-process
reference, a session whose second turn is served from the cache, and requests cancelled
or left by their client, after which the daemon proves that no block leaked."""

from __future__ import annotations

import asyncio

import pytest

from common.client import GatewayClient
from common.sampling import SamplingParams
from tests.daemons import Daemon, Proc
from tests.gateway.harness import (
    FakeScheduler,
    admin,
    idle_and_intact,
    reference,
    running_gateway,
    until,
)

pytestmark = pytest.mark.integration

BS = 16  # the worker's block size (EngineConfig's default)
LONG = SamplingParams(max_tokens=3000, ignore_eos=True)


async def test_reference_tokens_and_a_cached_second_turn(
    cluster: tuple[FakeScheduler, Daemon, Proc],
) -> None:
    sched, daemon, _ = cluster
    async with running_gateway(sched) as (gw, _):
        client = GatewayClient(gw.endpoints["clients"], timeout_s=30)
        try:
            greedy = SamplingParams(max_tokens=12, ignore_eos=True)
            prompt = [1, *range(40, 85)]
            done = await client.complete(prompt, greedy)
            assert done.token_ids == reference(prompt, 12)
            assert done.final.finish_reason == "length" and done.final.instances == ["w0"]
            assert done.final.num_prompt_tokens == len(prompt)
            assert await sched.released(sched.places[0].request_id) == ["all"]

            sid = await client.open_session()
            t1 = await client.complete("The first turn of a conversation here.", greedy, sid)
            assert t1.final.num_cached_tokens == 0
            t2 = await client.complete(" A second one.", greedy, sid)
            history = t1.final.num_prompt_tokens + t1.final.num_output_tokens
            assert t2.final.num_prompt_tokens == history + len(" A second one.")
            # Every whole block of the history but its last token's is served from cache.
            assert t2.final.num_cached_tokens == (history - 1) // BS * BS > 0
            assert sched.places[-1].token_ids[:history] == (
                sched.places[-2].token_ids + t1.token_ids
            )
            st = await admin(gw.endpoints["control"], "status")
            assert (st.result["served"], st.result["failed"], st.result["sessions"]) == (3, 0, 1)
        finally:
            client.close()
        await idle_and_intact(daemon)


async def test_cancel_and_a_client_that_leaves_free_every_block(
    cluster: tuple[FakeScheduler, Daemon, Proc],
) -> None:
    sched, daemon, _ = cluster
    async with running_gateway(sched) as (gw, _):
        client = GatewayClient(gw.endpoints["clients"], timeout_s=30)
        try:
            # Cancel mid-stream: the stream ends with "abort", the worker stops.
            chunks = 0
            async for _ in client.generate([1, *range(50, 90)], LONG, request_id="c1"):
                chunks += 1
                if chunks == 3:
                    await client.cancel("c1")
            assert client.last_final is not None
            assert client.last_final.finish_reason == "abort"
            assert client.last_final.num_output_tokens < LONG.max_tokens
            await idle_and_intact(daemon)
        finally:
            client.close()

        # A client that closes mid-stream, without a Cancel: the gateway aborts its request.
        leaver = GatewayClient(gw.endpoints["clients"], timeout_s=30)
        stream = leaver.generate([1, *range(60, 99)], LONG)
        await stream.__anext__()
        leaver.close()

        async def none_in_flight() -> bool:
            return not gw.core.requests

        assert await until(none_in_flight)
        assert sched.releases[-1].phase == "all"
        await idle_and_intact(daemon)
        st = await admin(gw.endpoints["control"], "status")
        assert (st.result["served"], st.result["failed"], st.result["inflight"]) == (0, 0, 0)
        await asyncio.sleep(0)  # the abandoned generator is finalized with the loop
