"""The real `openai` client against a real P/D cluster (PD-Caching-3: one prefill and one
decode instance, their MemPool daemons, scheduler, gateway and the api process, started
once for the module): greedy tokens equal the single-process engine's through prefill and
decode, a streamed chat with usage, a repeated prompt found in the cache, a disconnect
mid-stream frees every block, a gateway at its `max_inflight` gives 429, and /ready turns 503 while the decode role has no instance
that takes requests (drained), and 200 again after."""

from __future__ import annotations

from collections.abc import AsyncIterator

import openai
import pytest
import pytest_asyncio

from common.admin_client import admin_call
from common.sampling import SamplingParams
from services.launcher.supervisor import Cluster
from tests.api.cluster import (
    API_KEY,
    TOKEN,
    assert_error_shape,
    cluster_settings,
    until_gateway_idle,
    until_ready,
)
from tests.cluster_requests import all_idle_and_intact, prompt, reference

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def cluster(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Cluster]:
    tmp = tmp_path_factory.mktemp("api-pd")
    shape = {"mode": "pd-caching-3", "prefill": 1, "decode": 1}
    # One request at a time: a second one is refused as overloaded (429).
    async with Cluster(cluster_settings(tmp, shape, gateway={"max_inflight": 1})) as c:
        assert c.http is not None
        await until_ready(c.http)
        yield c


@pytest.fixture
def aclient(cluster: Cluster) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{cluster.http}/v1", api_key=API_KEY, max_retries=0)


async def test_greedy_tokens_through_prefill_and_decode(aclient: openai.AsyncOpenAI) -> None:
    p = prompt(45, 11)
    ref = reference({"r": (p, SamplingParams(max_tokens=10, ignore_eos=True))})["r"]
    done = await aclient.completions.create(
        model="tiny",
        prompt=p,
        max_tokens=10,
        temperature=0,
        extra_body={"ignore_eos": True, "return_token_ids": True},
    )
    assert (done.choices[0].model_extra or {})["token_ids"] == ref
    again = await aclient.completions.create(model="tiny", prompt=p, max_tokens=1, temperature=0)
    assert again.usage is not None and again.usage.prompt_tokens_details is not None
    assert again.usage.prompt_tokens_details.cached_tokens == 32  # whole blocks of 45


async def test_streamed_chat_with_usage(aclient: openai.AsyncOpenAI) -> None:
    stream = await aclient.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "Hello over prefill and decode."}],
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
        user="someone",  # routed by this key (the scheduler's session policy)
    )
    chunks = [c async for c in stream]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 8
    assert chunks[-2].choices[0].finish_reason == "length"


async def test_disconnect_frees_every_block(aclient: openai.AsyncOpenAI, cluster: Cluster) -> None:
    served = (await until_gateway_idle(cluster))["served"]
    stream = await aclient.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "A long answer, please."}],
        max_tokens=3000,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            break
    # The gateway holds one request at most (max_inflight = 1): a second is refused.
    with pytest.raises(openai.RateLimitError) as refused:
        await aclient.completions.create(model="tiny", prompt="me too", max_tokens=1)
    assert refused.value.status_code == 429
    error = assert_error_shape(refused.value.response.json())
    assert error["code"] == "overloaded" and "overloaded" in error["message"]
    await stream.close()
    assert (await until_gateway_idle(cluster))["served"] == served
    await all_idle_and_intact(cluster)


async def test_ready_follows_the_roles(cluster: Cluster) -> None:
    assert cluster.http is not None
    body = await until_ready(cluster.http)
    assert body["instances"]["decode"] == 1 and sorted(body["needs"]) == ["decode", "prefill"]
    scheduler = cluster.admin_address
    assert (await admin_call(scheduler, TOKEN, "drain", ["decode-0"])).ok
    try:
        body = await until_ready(cluster.http, want=503)
        assert "decode" in body["reason"] and body["status"] == "unavailable"
    finally:
        assert (await admin_call(scheduler, TOKEN, "undrain", ["decode-0"])).ok
    await until_ready(cluster.http)
