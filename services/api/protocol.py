"""The OpenAI HTTP API's bodies as msgspec Structs (requests, responses, stream chunks,
errors), for /v1/completions, /v1/chat/completions, /v1/models, and vLLM's /tokenize and
/detokenize. /openapi.json is generated from these (services/api/openapi.py).

Request structs accept unknown fields and ignore them (as vLLM does: a client may send what
a newer OpenAI API defines); the fields MemServe cannot honour are declared, so that
services/api/core.py can refuse them with a 400 rather than silently drop them. Field
types are checked by msgspec (a string where a number belongs is a 400); ranges by core.
"""

from __future__ import annotations

from typing import Any

import msgspec

# ----------------------------------------------------------------------------- requests


class StreamOptions(msgspec.Struct, kw_only=True):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's; not honoured beyond the final usage


class CompletionRequest(msgspec.Struct, kw_only=True):
    model: str
    # One prompt: text or token ids ([str] and [[int]] of length 1 too; several: 400).
    prompt: str | list[str | int | list[int]]
    max_tokens: int | None = 16
    temperature: float | None = None  # None: 1.0, as OpenAI
    top_p: float | None = None
    top_k: int | None = None  # vLLM's extension; -1 or 0: off
    n: int | None = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    echo: bool = False
    user: str | None = None
    ignore_eos: bool = False  # vLLM's extension
    stop_token_ids: list[int] | None = None  # vLLM's extension
    return_token_ids: bool = False  # vLLM's extension: choices carry `token_ids`
    # Refused unless absent or neutral:
    suffix: str | None = None
    logprobs: int | None = None
    best_of: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None


class TextPart(msgspec.Struct, kw_only=True):
    type: str
    text: str | None = None


class ChatMessage(msgspec.Struct, kw_only=True):
    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None


class ChatCompletionRequest(msgspec.Struct, kw_only=True):
    model: str
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    n: int | None = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None  # vLLM's extension
    return_token_ids: bool = False
    add_generation_prompt: bool = True  # vLLM's extension
    # Refused unless absent or neutral:
    logprobs: bool | None = None
    top_logprobs: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: Any = None


class TokenizeRequest(msgspec.Struct, kw_only=True):
    """vLLM's: exactly one of `prompt` and `messages`."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(msgspec.Struct, kw_only=True):
    model: str | None = None
    tokens: list[int]


# ---------------------------------------------------------------------------- responses


class PromptTokensDetails(msgspec.Struct, kw_only=True):
    cached_tokens: int = 0


class Usage(msgspec.Struct, kw_only=True):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class CompletionChoice(msgspec.Struct, kw_only=True):
    index: int
    text: str
    finish_reason: str | None = None
    logprobs: None = None
    token_ids: list[int] | msgspec.UnsetType = msgspec.UNSET  # return_token_ids


class CompletionResponse(msgspec.Struct, kw_only=True):
    id: str
    object: str = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class AssistantMessage(msgspec.Struct, kw_only=True):
    role: str = "assistant"
    content: str = ""


class ChatChoice(msgspec.Struct, kw_only=True):
    index: int
    message: AssistantMessage
    finish_reason: str | None = None
    logprobs: None = None
    token_ids: list[int] | msgspec.UnsetType = msgspec.UNSET  # return_token_ids


class ChatCompletionResponse(msgspec.Struct, kw_only=True):
    id: str
    object: str = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None


class Delta(msgspec.Struct, kw_only=True, omit_defaults=True):
    role: str | None = None
    content: str | None = None


class ChatChunkChoice(msgspec.Struct, kw_only=True):
    index: int
    delta: Delta
    finish_reason: str | None = None
    token_ids: list[int] | msgspec.UnsetType = msgspec.UNSET  # return_token_ids


class ChatCompletionChunk(msgspec.Struct, kw_only=True):
    id: str
    object: str = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChunk(msgspec.Struct, kw_only=True):
    """A streamed completion's event: `text_completion` objects, as OpenAI streams them."""

    id: str
    object: str = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class Model(msgspec.Struct, kw_only=True):
    id: str
    object: str = "model"
    created: int
    owned_by: str = "memserve"
    max_model_len: int


class ModelList(msgspec.Struct, kw_only=True):
    object: str = "list"
    data: list[Model]


class TokenizeResponse(msgspec.Struct, kw_only=True):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeResponse(msgspec.Struct, kw_only=True):
    prompt: str


class Health(msgspec.Struct, kw_only=True, omit_defaults=True):
    status: str  # ok | unavailable
    reason: str = ""
    instances: dict[str, int] = msgspec.field(default_factory=dict)
    needs: list[str] = msgspec.field(default_factory=list)


class ErrorInfo(msgspec.Struct, kw_only=True):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(msgspec.Struct, kw_only=True):
    error: ErrorInfo
