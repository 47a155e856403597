"""The real `openai` client against a real colocated cluster (scheduler, MemPool daemon,
worker, gateway and the api process, started once for the module by `memserve up`'s
launcher): completions and chat, streamed and not, usage with cached tokens, greedy and
seeded tokens equal to the single-process engine's, stop strings, max_tokens, the models
list, /tokenize, /health and /ready, a client that disconnects mid-stream (the request is
cancelled at the gateway, the daemon's blocks come back), and the errors' OpenAI shape."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import openai
import pytest
import pytest_asyncio

from common.sampling import SamplingParams
from services.launcher.supervisor import Cluster
from tests.api.cluster import (
    API_KEY,
    assert_error_shape,
    cluster_settings,
    gateway_status,
    until_gateway_idle,
    until_ready,
)
from tests.cluster_requests import all_idle_and_intact, prompt, reference

pytestmark = pytest.mark.integration
MODULE_LOOP = pytest.mark.asyncio(loop_scope="module")  # the cluster's loop


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def cluster(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Cluster]:
    tmp = tmp_path_factory.mktemp("api-colocated")
    async with Cluster(cluster_settings(tmp, {"mode": "colocated"})) as c:
        assert c.http is not None
        await until_ready(c.http)
        yield c


@pytest.fixture
def client(cluster: Cluster) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{cluster.http}/v1", api_key=API_KEY, max_retries=0)


@pytest.fixture
def aclient(cluster: Cluster) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{cluster.http}/v1", api_key=API_KEY, max_retries=0)


def token_ids(choice: object) -> list[int]:
    extra = getattr(choice, "model_extra", None) or {}
    return list(extra["token_ids"])


GREEDY = {"ignore_eos": True, "return_token_ids": True}


@MODULE_LOOP
async def test_greedy_and_seeded_tokens_equal_the_engine(aclient: openai.AsyncOpenAI) -> None:
    p = prompt(40, 1)
    ref = reference(
        {
            "greedy": (p, SamplingParams(max_tokens=12, ignore_eos=True)),
            "seeded": (
                p,
                SamplingParams(max_tokens=12, temperature=0.9, top_k=50, seed=7, ignore_eos=True),
            ),
        }
    )
    done = await aclient.completions.create(
        model="tiny", prompt=p, max_tokens=12, temperature=0, extra_body=GREEDY
    )
    assert token_ids(done.choices[0]) == ref["greedy"]
    assert done.choices[0].finish_reason == "length"
    assert done.usage is not None
    assert (done.usage.prompt_tokens, done.usage.completion_tokens) == (40, 12)
    seeded = await aclient.completions.create(
        model="tiny",
        prompt=p,
        max_tokens=12,
        temperature=0.9,
        seed=7,
        extra_body={**GREEDY, "top_k": 50},
    )
    assert token_ids(seeded.choices[0]) == ref["seeded"]

    # Streamed, the same tokens and text arrive in pieces; include_usage adds a last chunk
    # with no choices.
    stream = await aclient.completions.create(
        model="tiny",
        prompt=p,
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=GREEDY,
    )
    chunks = [c async for c in stream]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 12
    assert [t for c in chunks[:-1] for t in token_ids(c.choices[0])] == ref["greedy"]
    assert "".join(c.choices[0].text for c in chunks[:-1]) == done.choices[0].text
    assert chunks[-2].choices[0].finish_reason == "length"


@MODULE_LOOP
async def test_chat_streamed_and_not(aclient: openai.AsyncOpenAI) -> None:
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Say something."},
    ]
    whole = await aclient.chat.completions.create(
        model="tiny",
        messages=messages,
        max_completion_tokens=10,
        temperature=0,  # type: ignore[arg-type]
        extra_body={"ignore_eos": True},
    )
    assert whole.object == "chat.completion"
    assert whole.choices[0].message.role == "assistant"
    assert whole.choices[0].finish_reason == "length"
    assert whole.usage is not None and whole.usage.completion_tokens == 10
    stream = await aclient.chat.completions.create(
        model="tiny",
        messages=messages,  # type: ignore[arg-type]
        max_tokens=10,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = [c async for c in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    text = "".join(c.choices[0].delta.content or "" for c in chunks[:-1])
    assert text == whole.choices[0].message.content
    # The prompt the server renders is the one /tokenize counts.
    async with httpx.AsyncClient(base_url=str(aclient.base_url).removesuffix("/v1/")) as http:
        counted = await http.post(
            "/tokenize",
            json={"model": "tiny", "messages": messages},
            headers={"Authorization": f"Bearer {API_KEY}"},
        )
    assert counted.json()["count"] == whole.usage.prompt_tokens


@MODULE_LOOP
async def test_repeated_long_prompt_is_cached(aclient: openai.AsyncOpenAI) -> None:
    text = "A long prompt, repeated so that its blocks are cached the second time. " * 3
    first = await aclient.completions.create(model="tiny", prompt=text, max_tokens=2)
    again = await aclient.completions.create(model="tiny", prompt=text, max_tokens=2)
    assert first.usage is not None and again.usage is not None
    assert again.usage.prompt_tokens_details is not None
    assert again.usage.prompt_tokens_details.cached_tokens >= 16 * ((len(text) - 1) // 16) - 16
    assert again.usage.prompt_tokens_details.cached_tokens > 0


def test_stop_strings_and_max_tokens(client: openai.OpenAI) -> None:
    p = "The stop string test: "
    full = client.completions.create(
        model="tiny", prompt=p, max_tokens=24, temperature=0, extra_body={"ignore_eos": True}
    )
    text = full.choices[0].text
    assert full.choices[0].finish_reason == "length"
    # A stop string from the middle of the greedy answer (printable, unambiguous).
    cut = next(i for i in range(4, len(text) - 2) if text[i : i + 2].isprintable())
    stop = text[cut : cut + 2]
    cut = text.index(stop)
    stopped = client.completions.create(
        model="tiny",
        prompt=p,
        max_tokens=24,
        temperature=0,
        stop=[stop, "never-seen"],
        extra_body={"ignore_eos": True},
    )
    assert stopped.choices[0].text == text[:cut]
    assert stopped.choices[0].finish_reason == "stop"
    one = client.completions.create(model="tiny", prompt=p, max_tokens=1, temperature=0)
    assert one.choices[0].finish_reason == "length" and one.usage is not None
    assert one.usage.completion_tokens == 1
    echoed = client.completions.create(
        model="tiny", prompt=p, max_tokens=3, temperature=0, echo=True
    )
    assert echoed.choices[0].text.startswith(p)


def test_models_tokenize_health(client: openai.OpenAI, cluster: Cluster) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    auth = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.Client(base_url=str(cluster.http)) as http:
        tokens = http.post(
            "/tokenize", json={"model": "tiny", "prompt": "Hello, MemServe"}, headers=auth
        )
        assert tokens.status_code == 200
        body = tokens.json()
        assert body["count"] == len(body["tokens"]) and body["max_model_len"] > 0
        back = http.post(
            "/detokenize", json={"model": "tiny", "tokens": body["tokens"]}, headers=auth
        )
        assert back.json() == {"prompt": "Hello, MemServe"}
        assert http.get("/health").json() == {"status": "ok"}
        ready = http.get("/ready")
        assert ready.status_code == 200 and ready.json()["instances"]["colocated"] == 1
        doc = http.get("/openapi.json").json()
        assert "/v1/chat/completions" in doc["paths"]
        metrics = http.get("/metrics").text
        assert 'memserve:http_requests_total{route="/tokenize",status="200"}' in metrics
        assert "memserve:http_request_duration_seconds_bucket" in metrics
        assert "memserve:http_requests_inflight" in metrics


def test_errors_have_the_openai_shape(client: openai.OpenAI, cluster: Cluster) -> None:
    wrong = openai.OpenAI(base_url=f"{cluster.http}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as auth:
        wrong.models.list()
    assert auth.value.status_code == 401
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="x", max_tokens=1)
    with pytest.raises(openai.BadRequestError, match="n"):
        client.completions.create(model="tiny", prompt="x", max_tokens=1, n=2)
    with pytest.raises(openai.BadRequestError, match="logprobs"):
        client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "x"}], logprobs=True
        )
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="tiny", prompt="x", max_tokens=10**9)
    with pytest.raises(openai.BadRequestError, match="one prompt"):
        client.completions.create(model="tiny", prompt=["a", "b"], max_tokens=1)
    auth_header = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.Client(base_url=str(cluster.http)) as http:
        cases = [
            (http.get("/v1/models"), 401),  # no key at all
            (http.post("/v1/completions", content=b"{not json", headers=auth_header), 400),
            (
                http.post(
                    "/v1/completions", json={"model": "tiny", "prompt": 5}, headers=auth_header
                ),
                400,
            ),
            (
                http.post(
                    "/v1/completions",
                    json={"model": "tiny", "prompt": "x", "temperature": "hot"},
                    headers=auth_header,
                ),
                400,
            ),
            (
                http.post(
                    "/v1/completions",
                    json={"model": "tiny", "prompt": "x" * (2 << 20)},
                    headers=auth_header,
                ),
                413,
            ),
            (http.get("/v1/nothing-here", headers=auth_header), 404),
            (http.get("/v1/completions", headers=auth_header), 405),
        ]
        for response, status in cases:
            assert response.status_code == status, response.text
            assert_error_shape(response.json())
        assert http.get("/v1/models").headers["www-authenticate"] == "Bearer"


@MODULE_LOOP
async def test_disconnect_cancels_the_request(
    aclient: openai.AsyncOpenAI, cluster: Cluster
) -> None:
    served = (await until_gateway_idle(cluster))["served"]
    stream = await aclient.completions.create(
        model="tiny",
        prompt=prompt(30, 3),
        max_tokens=3000,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    got = 0
    async for _ in stream:
        got += 1
        if got == 3:
            break
    await stream.close()  # the HTTP connection goes: the API cancels at the gateway
    status = await until_gateway_idle(cluster)
    assert status["served"] == served  # aborted, not run to its 3000 tokens
    await all_idle_and_intact(cluster)
    # And the cluster serves on.
    after = await aclient.completions.create(model="tiny", prompt="still there?", max_tokens=2)
    assert after.usage is not None and after.usage.completion_tokens == 2
    assert (await gateway_status(cluster))["inflight"] == 0


@MODULE_LOOP
async def test_a_client_that_leaves_a_whole_answer_cancels_it(cluster: Cluster) -> None:
    """Not streamed: nothing is sent until the answer is whole, so the client's read
    timeout makes it hang up first; the API notices and cancels at the gateway. (4000
    tokens take the engine ~4 s alone on this CPU: the half-second read timeout leaves a
    wide margin for faster machines.)"""
    served = (await until_gateway_idle(cluster))["served"]
    body = {"model": "tiny", "prompt": "x", "max_tokens": 4000, "ignore_eos": True}
    async with httpx.AsyncClient(
        base_url=str(cluster.http), timeout=httpx.Timeout(30, read=0.5)
    ) as http:
        with pytest.raises(httpx.ReadTimeout):
            await http.post(
                "/v1/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"}
            )
    assert (await until_gateway_idle(cluster))["served"] == served
    await all_idle_and_intact(cluster)
