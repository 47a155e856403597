"""The API's pure core: an OpenAI request -> what the gateway is asked (prompt text or token
ids, `SamplingParams`, routing key), the gateway's `Chunk` / `Final` -> OpenAI objects, and
every refusal as an `ApiError` (HTTP status + OpenAI error body). No I/O here.

Invariants: a request is either refused with a 4xx naming the offending field, or turned
into exactly one `Job`; a field MemServe cannot honour (n > 1, logprobs, penalties, tools,
suffix, ...) is refused, never silently dropped; harmless unknown fields are ignored.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

from common.chat_template import ChatTemplate, ChatTemplateError
from common.errors import InvalidRequestError
from common.protocol import client as cp
from common.sampling import SamplingParams
from services.api import protocol as op

MAX_STOP_STRINGS = 16


class ApiError(Exception):
    """A refusal: `status` (HTTP) and the OpenAI error's `type`, `param`, `code`."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> op.ErrorBody:
        return op.ErrorBody(
            error=op.ErrorInfo(
                message=self.message, type=self.type, param=self.param, code=self.code
            )
        )


def bad(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, "invalid_request_error", param)


@dataclass
class Job:
    """What one OpenAI request asks of the gateway, and how to answer it."""

    kind: str  # "completion" | "chat"
    prompt: str | list[int]
    params: SamplingParams
    stream: bool
    include_usage: bool
    route_key: str
    echo: str = ""  # text to put before the answer (completions' `echo`)
    return_token_ids: bool = False
    id: str = field(default_factory=lambda: "")
    created: int = field(default_factory=lambda: int(time.time()))


@dataclass
class Limits:
    model_name: str
    max_model_len: int
    vocab_size: int
    max_tokens: int  # the largest max_tokens a request may ask
    default_max_tokens: int


def route_key(user: str | None, session_header: str | None) -> str:
    """The gateway's routing hint: `X-Session-Id` wins over `user`. Hashed, so it has a
    bounded length and no user name reaches the cluster's logs."""
    raw = session_header or user
    if not raw:
        return ""
    return "k" + hashlib.blake2b(raw.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()


def check_model(name: str | None, limits: Limits, required: bool = True) -> None:
    if name is None and not required:
        return
    if name != limits.model_name:
        raise ApiError(
            404,
            f"The model `{name}` does not exist; this server serves `{limits.model_name}`",
            "not_found_error",
            "model",
            "model_not_found",
        )


def _unsupported(name: str, why: str = "") -> ApiError:
    return bad(f"{name} is not supported by this server{': ' + why if why else ''}", name)


def _stop(stop: str | list[str] | None) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOP_STRINGS:
        raise bad(f"at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}", "stop")
    if any(not s for s in stops):
        raise bad("stop strings must not be empty", "stop")
    return stops


def _params(
    req: op.CompletionRequest | op.ChatCompletionRequest, max_tokens: int | None, limits: Limits
) -> SamplingParams:
    if req.n not in (None, 1):
        raise _unsupported("n", "only n = 1")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(req, name) not in (None, 0, 0.0):
            raise _unsupported(name)
    if req.logit_bias:
        raise _unsupported("logit_bias")
    if max_tokens is None:
        max_tokens = limits.default_max_tokens
    if not 1 <= max_tokens <= limits.max_tokens:
        raise bad(f"max_tokens must be in [1, {limits.max_tokens}], got {max_tokens}", "max_tokens")
    top_k = req.top_k or 0
    if top_k < -1:
        raise bad(f"top_k must be >= -1 (-1 or 0: off), got {top_k}", "top_k")
    stop_ids = list(req.stop_token_ids or [])
    if any(not 0 <= t < limits.vocab_size for t in stop_ids):
        raise bad(f"stop_token_ids must be in [0, {limits.vocab_size})", "stop_token_ids")
    temperature = 1.0 if req.temperature is None else req.temperature
    if not 0.0 <= temperature <= 2.0:
        raise bad(f"temperature must be in [0, 2], got {temperature}", "temperature")
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=temperature,
        top_k=max(top_k, 0),
        top_p=1.0 if req.top_p is None else req.top_p,
        seed=req.seed,
        stop=_stop(req.stop),
        stop_token_ids=stop_ids,
        ignore_eos=req.ignore_eos,
    )
    try:
        return params.validate()
    except InvalidRequestError as exc:
        raise bad(str(exc), str(exc).split(" ", 1)[0]) from None


def completion_job(
    req: op.CompletionRequest, limits: Limits, session_header: str | None = None
) -> Job:
    check_model(req.model, limits)
    if req.suffix:
        raise _unsupported("suffix")
    if req.logprobs is not None:
        raise _unsupported("logprobs")
    if req.best_of not in (None, 1):
        raise _unsupported("best_of", "only best_of = 1")
    prompt = _one_prompt(req.prompt, limits)
    params = _params(req, req.max_tokens, limits)
    return Job(
        "completion",
        prompt,
        params,
        req.stream,
        bool(req.stream and req.stream_options and req.stream_options.include_usage),
        route_key(req.user, session_header),
        echo="",  # filled by the shell (token-id prompts are decoded there)
        return_token_ids=req.return_token_ids,
        id="cmpl-" + secrets.token_hex(12),
    )


def _one_prompt(prompt: str | list[str | int | list[int]], limits: Limits) -> str | list[int]:
    """One prompt, as text or token ids; several prompts are refused."""
    if isinstance(prompt, str):
        one: str | list[int] = prompt
    elif all(isinstance(p, int) and not isinstance(p, bool) for p in prompt):
        one = [p for p in prompt if isinstance(p, int)]
    elif len(prompt) == 1 and isinstance(prompt[0], str | list):
        one = prompt[0] if isinstance(prompt[0], str) else list(prompt[0])
    elif len(prompt) > 1 and all(isinstance(p, str | list) for p in prompt):
        raise _unsupported("prompt", "one prompt per request (send several requests)")
    else:
        raise bad("prompt must be a string, a list of token ids, or a list of one of them")
    if not one:
        raise bad("the prompt is empty", "prompt")
    if isinstance(one, list):
        if len(one) >= limits.max_model_len:
            raise bad(
                f"prompt too long: {len(one)} tokens, limit {limits.max_model_len - 1}", "prompt"
            )
        if any(not 0 <= t < limits.vocab_size for t in one):
            raise bad(f"token ids must be in [0, {limits.vocab_size})", "prompt")
    return one


def chat_job(
    req: op.ChatCompletionRequest,
    limits: Limits,
    template: ChatTemplate | None,
    session_header: str | None = None,
) -> Job:
    """A chat request -> its Job, the prompt being the template's text (tokenized by the
    shell without the tokenizer's specials: the template writes its own)."""
    check_model(req.model, limits)
    if req.logprobs or req.top_logprobs:
        raise _unsupported("logprobs")
    if req.tools:
        raise _unsupported("tools")
    if req.tool_choice not in (None, "none", "auto"):
        raise _unsupported("tool_choice")
    if req.response_format is not None and not (
        isinstance(req.response_format, Mapping) and req.response_format.get("type") == "text"
    ):
        raise _unsupported("response_format", 'only {"type": "text"}')
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else None
    if max_tokens is None:
        max_tokens = req.max_tokens
    params = _params(req, max_tokens, limits)
    text = render_chat(template, req.messages, req.add_generation_prompt)
    return Job(
        "chat",
        text,
        params,
        req.stream,
        bool(req.stream and req.stream_options and req.stream_options.include_usage),
        route_key(req.user, session_header),
        return_token_ids=req.return_token_ids,
        id="chatcmpl-" + secrets.token_hex(12),
    )


def render_chat(
    template: ChatTemplate | None, messages: Sequence[op.ChatMessage], add_generation_prompt: bool
) -> str:
    if template is None:
        raise ApiError(
            400,
            "this model has no chat template, so chat requests cannot be served: use "
            "/v1/completions, or set [api] chat_template",
            "invalid_request_error",
            "messages",
            "no_chat_template",
        )
    if not messages:
        raise bad("messages must not be empty", "messages")
    plain: list[dict[str, Any]] = []
    for m in messages:
        if isinstance(m.content, list):
            texts = []
            for part in m.content:
                if part.type != "text" or part.text is None:
                    raise _unsupported(f"content part of type {part.type!r}", "text parts only")
                texts.append(part.text)
            content = "".join(texts)
        else:
            content = m.content or ""
        one: dict[str, Any] = {"role": m.role, "content": content}
        if m.name is not None:
            one["name"] = m.name
        plain.append(one)
    try:
        return template.render(plain, add_generation_prompt=add_generation_prompt)
    except ChatTemplateError as exc:
        raise bad(f"the chat template refused the messages: {exc}", "messages") from None


# ------------------------------------------------------------------ gateway -> OpenAI


def finish_reason(final: cp.Final) -> str:
    return "length" if final.finish_reason == "length" else "stop"


# Gateway refusals that are the request's fault (common/sampling.py, services/gateway/core.py).
_CLIENT_ERRORS = (
    "prompt too long",
    "max_tokens",
    "token ids outside",
    "the prompt is empty",
    "temperature",
    "top_k",
    "top_p",
    "seed",
    "stop strings",
    "stop_token_ids",
    "route_key longer",
    "give exactly one",
)


def gateway_error(final: cp.Final) -> ApiError:
    """The HTTP refusal of a request the gateway ended with an error (or an abort the API
    did not ask for): 400 when the request was at fault, 429 when the gateway is
    overloaded, 503 when the cluster cannot place it, 502 for any other failure."""
    msg = final.error or f"the request ended: {final.finish_reason}"
    if final.finish_reason == "abort":
        return ApiError(503, "the request was aborted by the cluster", "server_error", None)
    if msg.startswith("overloaded"):
        return ApiError(429, msg, "rate_limit_error", None, "overloaded")
    if msg.startswith(("no placement", "cluster stopping", "the gateway is stopping")):
        return ApiError(503, msg, "server_error", None, "unavailable")
    if msg.startswith(_CLIENT_ERRORS):
        return bad(msg)
    return ApiError(502, f"the cluster failed the request: {msg}", "server_error", None)


def usage(final: cp.Final) -> op.Usage:
    return op.Usage(
        prompt_tokens=final.num_prompt_tokens,
        completion_tokens=final.num_output_tokens,
        total_tokens=final.num_prompt_tokens + final.num_output_tokens,
        prompt_tokens_details=op.PromptTokensDetails(cached_tokens=final.num_cached_tokens),
    )


def response(
    job: Job, model: str, text: str, token_ids: list[int], final: cp.Final
) -> op.CompletionResponse | op.ChatCompletionResponse:
    """The non-streaming answer of a request that ended well."""
    ids: list[int] | msgspec.UnsetType = token_ids if job.return_token_ids else msgspec.UNSET
    if job.kind == "chat":
        return op.ChatCompletionResponse(
            id=job.id,
            created=job.created,
            model=model,
            choices=[
                op.ChatChoice(
                    index=0,
                    message=op.AssistantMessage(content=text),
                    finish_reason=finish_reason(final),
                    token_ids=ids,
                )
            ],
            usage=usage(final),
        )
    return op.CompletionResponse(
        id=job.id,
        created=job.created,
        model=model,
        choices=[
            op.CompletionChoice(
                index=0, text=job.echo + text, finish_reason=finish_reason(final), token_ids=ids
            )
        ],
        usage=usage(final),
    )


def chunk(
    job: Job,
    model: str,
    text: str,
    token_ids: list[int],
    reason: str | None = None,
    *,
    first: bool = False,
) -> op.ChatCompletionChunk | op.CompletionChunk:
    """One streamed event with `text` (a chat's first carries the assistant role)."""
    ids: list[int] | msgspec.UnsetType = token_ids if job.return_token_ids else msgspec.UNSET
    if job.kind == "chat":
        delta = op.Delta(role="assistant" if first else None, content=text)
        return op.ChatCompletionChunk(
            id=job.id,
            created=job.created,
            model=model,
            choices=[op.ChatChunkChoice(index=0, delta=delta, finish_reason=reason, token_ids=ids)],
        )
    return op.CompletionChunk(
        id=job.id,
        created=job.created,
        model=model,
        choices=[op.CompletionChoice(index=0, text=text, finish_reason=reason, token_ids=ids)],
    )


def usage_chunk(
    job: Job, model: str, final: cp.Final
) -> op.ChatCompletionChunk | op.CompletionChunk:
    """`stream_options.include_usage`: the last event, with no choices and the usage."""
    if job.kind == "chat":
        return op.ChatCompletionChunk(
            id=job.id, created=job.created, model=model, choices=[], usage=usage(final)
        )
    return op.CompletionChunk(
        id=job.id, created=job.created, model=model, choices=[], usage=usage(final)
    )
