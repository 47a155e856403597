"""/openapi.json, generated from the msgspec Structs of services/api/protocol.py (so the
document cannot drift from what the server decodes), with this server's bounds written
in: the one model name it serves, and the largest `max_tokens`. Fuzzers (schemathesis)
read it to generate requests."""

from __future__ import annotations

from typing import Any

import msgspec

from services.api import protocol as op

_REF = "#/components/schemas/{name}"
_ERRORS = {
    "400": "invalid request",
    "401": "missing or wrong API key",
    "404": "unknown model",
    "413": "request body too large",
    "429": "the gateway is overloaded",
    "502": "the cluster failed the request",
    "503": "the cluster cannot serve now",
}


def _ref(t: type) -> dict[str, str]:
    return {"$ref": _REF.format(name=t.__name__)}


def _json(t: type) -> dict[str, Any]:
    return {"application/json": {"schema": _ref(t)}}


def _operation(
    summary: str,
    ok: type,
    body: type | None = None,
    *,
    stream: type | None = None,
    errors: tuple[str, ...] = ("400", "401", "404", "413", "429", "502", "503"),
    secured: bool = True,
) -> dict[str, Any]:
    ok_content = _json(ok)
    if stream is not None:  # server-sent events of `stream` objects, then [DONE]
        ok_content["text/event-stream"] = {"schema": {"type": "string"}}
    op_: dict[str, Any] = {
        "summary": summary,
        "responses": {
            "200": {"description": "OK", "content": ok_content},
            **{
                code: {"description": why, "content": _json(op.ErrorBody)}
                for code, why in _ERRORS.items()
                if code in errors
            },
        },
    }
    if body is not None:
        op_["requestBody"] = {"required": True, "content": _json(body)}
    if not secured:
        op_["security"] = []
    return op_


def _probe(summary: str) -> dict[str, Any]:
    probe = _operation(summary, op.Health, errors=(), secured=False)
    probe["responses"]["503"] = {"description": "not (yet)", "content": _json(op.Health)}
    return probe


def document(model_name: str, max_tokens: int, api_key: bool) -> dict[str, Any]:
    types = [
        op.CompletionRequest,
        op.ChatCompletionRequest,
        op.TokenizeRequest,
        op.DetokenizeRequest,
        op.CompletionResponse,
        op.CompletionChunk,
        op.ChatCompletionResponse,
        op.ChatCompletionChunk,
        op.ModelList,
        op.TokenizeResponse,
        op.DetokenizeResponse,
        op.Health,
        op.ErrorBody,
    ]
    _, components = msgspec.json.schema_components(types, ref_template=_REF)
    for name in ("CompletionRequest", "ChatCompletionRequest"):
        props = components[name]["properties"]
        props["model"] = {"type": "string", "enum": [model_name]}
        for key in ("max_tokens", "max_completion_tokens"):
            if key in props:
                limit = {"type": "integer", "minimum": 1, "maximum": max_tokens}
                props[key] = {"anyOf": [limit, {"type": "null"}]}
    doc: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {"title": "MemServe OpenAI-compatible API", "version": "1"},
        "paths": {
            "/v1/completions": {
                "post": _operation(
                    "A completion",
                    op.CompletionResponse,
                    op.CompletionRequest,
                    stream=op.CompletionChunk,
                )
            },
            "/v1/chat/completions": {
                "post": _operation(
                    "A chat completion",
                    op.ChatCompletionResponse,
                    op.ChatCompletionRequest,
                    stream=op.ChatCompletionChunk,
                )
            },
            "/v1/models": {"get": _operation("The served model", op.ModelList, errors=("401",))},
            "/tokenize": {
                "post": _operation(
                    "Token ids of a prompt or of chat messages",
                    op.TokenizeResponse,
                    op.TokenizeRequest,
                    errors=("400", "401", "404", "413"),
                )
            },
            "/detokenize": {
                "post": _operation(
                    "Text of token ids",
                    op.DetokenizeResponse,
                    op.DetokenizeRequest,
                    errors=("400", "401", "404", "413"),
                )
            },
            "/health": {"get": _probe("This process serves and its gateway answers")},
            "/ready": {"get": _probe("The cluster can serve: every role it needs has an instance")},
        },
        "components": {"schemas": components},
    }
    if api_key:
        doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        doc["security"] = [{"bearer": []}]
    return doc
