"""The API's pure core and configuration, without sockets: an OpenAI request -> the
gateway's prompt and SamplingParams (or a 4xx naming the field), the gateway's Final ->
status codes and finish reasons, the config's key policy, the generated OpenAPI document,
and the launcher's plan with the api process."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from common.chat_template import ChatTemplate
from common.protocol import client as cp
from services.api import core
from services.api import protocol as op
from services.api.config import ApiConfig
from services.api.openapi import document
from services.launcher.config import load
from services.launcher.plan import pinned, plan
from tests.api.cluster import CHATML

LIMITS = core.Limits("tiny", max_model_len=64, vocab_size=259, max_tokens=32, default_max_tokens=8)


def completion(**fields: Any) -> op.CompletionRequest:
    return msgspec.convert({"model": "tiny", "prompt": "hi", **fields}, op.CompletionRequest)


def chat(**fields: Any) -> op.ChatCompletionRequest:
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], **fields}
    return msgspec.convert(body, op.ChatCompletionRequest)


def refused(status: int, fn: Any, *args: Any) -> core.ApiError:
    with pytest.raises(core.ApiError) as info:
        fn(*args)
    assert info.value.status == status, info.value.message
    return info.value


def test_completion_maps_to_sampling_params() -> None:
    job = core.completion_job(
        completion(max_tokens=5, temperature=0.5, top_p=0.9, top_k=-1, seed=3, stop="\n"),
        LIMITS,
    )
    p = job.params
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k, p.seed, p.stop) == (
        5, 0.5, 0.9, 0, 3, ["\n"],
    )  # fmt: skip
    assert job.prompt == "hi" and not job.stream
    assert core.completion_job(completion(), LIMITS).params.temperature == 1.0  # OpenAI's
    assert core.completion_job(completion(prompt=[1, 5, 7]), LIMITS).prompt == [1, 5, 7]
    assert core.completion_job(completion(prompt=[[1, 5]]), LIMITS).prompt == [1, 5]
    assert core.completion_job(completion(prompt=["one"]), LIMITS).prompt == "one"
    streamed = core.completion_job(
        completion(stream=True, stream_options={"include_usage": True}), LIMITS
    )
    assert streamed.stream and streamed.include_usage
    # Harmless fields OpenAI defines and MemServe does not use are ignored.
    assert core.completion_job(completion(metadata={"a": 1}, store=False), LIMITS)


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"n": 2}, "n"),
        ({"logprobs": 1}, "logprobs"),
        ({"suffix": "x"}, "suffix"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"logit_bias": {"5": 1.0}}, "logit_bias"),
        ({"best_of": 3}, "best_of"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 33}, "max_tokens"),
        ({"temperature": 2.5}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"stop": ["", "x"]}, "stop"),
        ({"prompt": ["a", "b"]}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"prompt": [1, 999]}, "prompt"),
        ({"prompt": list(range(64))}, "prompt"),
        ({"stop_token_ids": [300]}, "stop_token_ids"),
    ],
)
def test_what_cannot_be_honoured_is_refused(fields: dict[str, Any], param: str) -> None:
    err = refused(400, core.completion_job, completion(**fields), LIMITS)
    assert err.param == param and err.type == "invalid_request_error"
    assert err.body().error.message


def test_unknown_model_is_404() -> None:
    err = refused(404, core.completion_job, completion(model="gpt-4"), LIMITS)
    assert err.code == "model_not_found" and err.param == "model"


def test_chat_renders_the_template_or_refuses() -> None:
    template = ChatTemplate(CHATML)
    job = core.chat_job(chat(max_completion_tokens=4, max_tokens=9), LIMITS, template)
    assert job.prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert job.params.max_tokens == 4  # max_completion_tokens wins over max_tokens
    assert job.params.max_tokens == 4 and job.kind == "chat"
    parts = chat(messages=[{"role": "user", "content": [{"type": "text", "text": "a"}]}])
    assert "user\na<|im_end|>" in str(core.chat_job(parts, LIMITS, template).prompt)
    err = refused(400, core.chat_job, chat(), LIMITS, None)
    assert err.code == "no_chat_template"
    image = chat(messages=[{"role": "user", "content": [{"type": "image_url"}]}])
    refused(400, core.chat_job, image, LIMITS, template)
    refused(400, core.chat_job, chat(messages=[]), LIMITS, template)
    refused(400, core.chat_job, chat(tools=[{"type": "function"}]), LIMITS, template)
    refused(400, core.chat_job, chat(logprobs=True), LIMITS, template)
    refused(400, core.chat_job, chat(response_format={"type": "json_object"}), LIMITS, template)
    assert core.chat_job(chat(response_format={"type": "text"}), LIMITS, template)


def test_route_key_is_bounded_and_prefers_the_header() -> None:
    a = core.route_key("alice" * 100, None)
    assert len(a) < 64 and a == core.route_key("alice" * 100, None)
    assert (
        core.route_key("alice", "s1") == core.route_key(None, "s1") != core.route_key("alice", None)
    )
    assert core.route_key(None, None) == ""


@pytest.mark.parametrize(
    ("final", "status"),
    [
        (cp.Final("r", "error", error="overloaded: 256 requests in flight"), 429),
        (cp.Final("r", "error", error="no placement: no instance of role decode"), 503),
        (cp.Final("r", "error", error="prompt too long: 5000 tokens"), 400),
        (cp.Final("r", "error", error="max_tokens too large: 9999"), 400),
        (cp.Final("r", "error", error="instance w0 is down (missed heartbeats)"), 502),
        (cp.Final("r", "abort"), 503),
    ],
)
def test_gateway_errors_map_to_statuses(final: cp.Final, status: int) -> None:
    assert core.gateway_error(final).status == status


def test_responses_and_usage() -> None:
    job = core.completion_job(completion(echo=True, return_token_ids=True), LIMITS)
    job.echo = "hi"
    final = cp.Final("r", "length", num_prompt_tokens=3, num_cached_tokens=2, num_output_tokens=4)
    body = msgspec.to_builtins(core.response(job, "tiny", " there", [5, 6], final))
    assert body["object"] == "text_completion" and body["choices"][0]["text"] == "hi there"
    assert body["choices"][0]["finish_reason"] == "length" and body["choices"][0]["token_ids"] == [
        5,
        6,
    ]
    assert body["usage"] == {
        "prompt_tokens": 3,
        "completion_tokens": 4,
        "total_tokens": 7,
        "prompt_tokens_details": {"cached_tokens": 2},
    }
    plain = core.completion_job(completion(), LIMITS)
    assert "token_ids" not in msgspec.to_builtins(core.chunk(plain, "tiny", "x", [1]))["choices"][0]
    chat_job = core.chat_job(chat(stream=True), LIMITS, ChatTemplate(CHATML))
    first = msgspec.to_builtins(core.chunk(chat_job, "tiny", "", [], first=True))
    assert first["object"] == "chat.completion.chunk"
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    last = msgspec.to_builtins(core.usage_chunk(chat_job, "tiny", final))
    assert last["choices"] == [] and last["usage"]["total_tokens"] == 7
    assert core.finish_reason(cp.Final("r", "stop")) == "stop"


def test_config_key_policy() -> None:
    assert ApiConfig().validate().needs_key is False  # loopback
    with pytest.raises(ValueError, match="api_key"):
        ApiConfig(address="http://0.0.0.0:8000").validate()
    assert ApiConfig(address="http://0.0.0.0:8000", api_key="k").validate().needs_key
    assert not ApiConfig(address="http://0.0.0.0:8000", require_api_key="off").validate().needs_key
    with pytest.raises(ValueError, match="api_key"):
        ApiConfig(require_api_key="on").validate()
    for bad in ("tcp://127.0.0.1:1", "http://127.0.0.1:99999", "http://h:1/path"):
        with pytest.raises(ValueError, match="address"):
            ApiConfig(address=bad).validate()
    with pytest.raises(ValueError, match="max_body_bytes"):
        ApiConfig(max_body_bytes=0).validate()
    assert ApiConfig(address="http://127.0.0.1:0").host_port == ("127.0.0.1", 0)
    assert ApiConfig(served_model_name="m").model_name == "m" and ApiConfig().model_name == "tiny"


def test_openapi_document_states_the_bounds() -> None:
    doc = document("tiny", 32, api_key=True)
    props = doc["components"]["schemas"]["CompletionRequest"]["properties"]
    assert props["model"]["enum"] == ["tiny"]
    assert props["max_tokens"]["anyOf"][0]["maximum"] == 32
    assert set(doc["paths"]) == {
        "/v1/completions", "/v1/chat/completions", "/v1/models", "/tokenize", "/detokenize",
        "/health", "/ready",
    }  # fmt: skip
    assert doc["security"] == [{"bearer": []}]
    assert doc["paths"]["/health"]["get"]["security"] == []


def test_the_launcher_plans_the_api_after_the_gateway() -> None:
    settings = load(None, {"api": {"api_key": "k"}})
    api = next(s for s in plan(settings, "t") if s.kind == "api")
    assert api.stage == 4 and api.links == {"gateway": ("gateway", "clients")}
    assert api.settings["address"] == "http://127.0.0.1:0" and api.settings["api_key"] == "k"
    assert pinned(api, {"http": "http://127.0.0.1:4321"})["address"] == "http://127.0.0.1:4321"
    off = load(None, {"api": {"enabled": False}})
    assert all(s.kind != "api" for s in plan(off, "t"))
