"""The HTTP shell: Starlette routes over the pure core (core.py) and one `GatewayClient`.

    POST /v1/completions, /v1/chat/completions ─▶ core.*_job ─▶ gateway stream ─▶ JSON | SSE
    GET  /v1/models · POST /tokenize, /detokenize     (the tokenizer, in a thread)
    GET  /health (the gateway answers) · /ready (the cluster can serve) · /metrics · /openapi.json

Every error is the OpenAI shape `{"error": {"message", "type", "param", "code"}}`, with
400 / 401 / 404 / 405 / 413 / 429 / 5xx as fits. A request's first gateway message is
awaited before the response starts, so a refusal (bad prompt, overload) gets its status
code even when streaming; after that an error is an SSE `error` event, then `[DONE]`.

Each request's gateway stream is read by a task of its own (relay.py), so that a client
that disconnects reliably cancels its request at the gateway.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, TypeVar

import msgspec
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from common.chat_template import ChatTemplate
from common.client import GatewayClient, GatewayClosed, GatewayGone, GatewayTimeout
from common.logging import get_logger
from common.protocol import client as cp
from common.tokenizer import Tokenizer
from services.api import core
from services.api import protocol as op
from services.api.core import ApiError, Limits
from services.api.metrics import CONTENT_TYPE, ApiMetrics, MetricsMiddleware
from services.api.openapi import document
from services.api.relay import Relay, RelayedStream, collect, disconnected

log = get_logger(__name__)

T = TypeVar("T")
_ENCODER = msgspec.json.Encoder()
HEALTH_TIMEOUT_S = 2.0


@dataclass
class ApiState:
    client: GatewayClient
    tokenizer: Tokenizer
    limits: Limits
    template: ChatTemplate | None
    api_key: str  # "" = no key asked
    max_body_bytes: int


def json_response(obj: Any, status: int = 200) -> Response:
    return Response(_ENCODER.encode(obj), status, media_type="application/json")


def error_response(err: ApiError) -> Response:
    headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
    return Response(
        _ENCODER.encode(err.body()), err.status, headers=headers, media_type="application/json"
    )


def sse(obj: Any) -> bytes:
    return b"data: " + _ENCODER.encode(obj) + b"\n\n"


DONE = b"data: [DONE]\n\n"


def _transport_error(exc: Exception) -> ApiError:
    if isinstance(exc, GatewayTimeout):
        return ApiError(504, f"the gateway did not answer in time: {exc}", "server_error")
    return ApiError(502, f"the gateway is unavailable: {exc}", "server_error")


class Handlers:
    def __init__(self, state: ApiState, metrics: ApiMetrics, openapi: dict[str, Any]) -> None:
        self.s = state
        self.metrics = metrics
        self.openapi = _ENCODER.encode(openapi)

    # ------------------------------------------------------------------ plumbing
    def _authorize(self, request: Request) -> None:
        if not self.s.api_key:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        ok = scheme.lower() == "bearer" and hmac.compare_digest(
            token.strip().encode(), self.s.api_key.encode()
        )
        if not ok:
            raise ApiError(
                401,
                "missing or wrong API key (send Authorization: Bearer KEY)",
                "authentication_error",
                None,
                "invalid_api_key",
            )

    async def _body(self, request: Request, kind: type[T]) -> T:
        limit = self.s.max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise ApiError(413, f"request body over {limit} bytes", "invalid_request_error")
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > limit:
                raise ApiError(413, f"request body over {limit} bytes", "invalid_request_error")
        try:
            return msgspec.json.decode(bytes(body), type=kind)
        except msgspec.ValidationError as exc:
            raise core.bad(f"invalid request body: {exc}", _param_of(str(exc))) from None
        except msgspec.DecodeError as exc:
            raise core.bad(f"malformed JSON: {exc}") from None

    # ----------------------------------------------------------------- generation
    async def completions(self, request: Request) -> Response:
        self._authorize(request)
        req = await self._body(request, op.CompletionRequest)
        job = core.completion_job(req, self.s.limits, request.headers.get("x-session-id"))
        if req.echo:
            job.echo = (
                job.prompt
                if isinstance(job.prompt, str)
                else await asyncio.to_thread(self.s.tokenizer.decode, job.prompt)
            )
        return await self._run(job, request)

    async def chat(self, request: Request) -> Response:
        self._authorize(request)
        req = await self._body(request, op.ChatCompletionRequest)
        job = core.chat_job(
            req, self.s.limits, self.s.template, request.headers.get("x-session-id")
        )
        assert isinstance(job.prompt, str)
        # The template writes its own special tokens: none added by the tokenizer.
        job.prompt = await asyncio.to_thread(
            self.s.tokenizer.encode, job.prompt, add_special_tokens=False
        )
        if len(job.prompt) >= self.s.limits.max_model_len:
            raise core.bad(
                f"prompt too long: {len(job.prompt)} tokens, limit "
                f"{self.s.limits.max_model_len - 1}",
                "messages",
            )
        if not job.prompt:
            raise core.bad("the rendered prompt is empty", "messages")
        return await self._run(job, request)

    async def _run(self, job: core.Job, request: Request) -> Response:
        model = self.s.limits.model_name
        relay = Relay(
            self.s.client.stream(job.prompt, job.params, request_id=job.id, route_key=job.route_key)
        )
        try:
            first = await relay.next()
        except (GatewayGone, GatewayTimeout, GatewayClosed) as exc:
            relay.close()
            raise _transport_error(exc) from None
        except BaseException:
            relay.close()
            raise
        if isinstance(first, cp.Final) and first.finish_reason in ("error", "abort"):
            relay.close()
            raise core.gateway_error(first)
        if job.stream:
            return RelayedStream(
                relay,
                self._events(job, model, first, relay),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        # A client that leaves before the answer cancels the request, as when streaming.
        whole = asyncio.create_task(collect(first, relay))
        gone = asyncio.create_task(disconnected(request))
        try:
            await asyncio.wait([whole, gone], return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not whole.done():
                whole.cancel()
            relay.close()
        if not whole.done() or whole.cancelled():
            return Response(status_code=499)  # nobody reads it: the client is gone
        try:
            texts, ids, final = whole.result()
        except (GatewayGone, GatewayTimeout, GatewayClosed) as exc:
            raise _transport_error(exc) from None
        if final.finish_reason in ("error", "abort"):
            raise core.gateway_error(final)
        return json_response(core.response(job, model, "".join(texts), ids, final))

    async def _events(
        self, job: core.Job, model: str, first: cp.Chunk | cp.Final, relay: Relay
    ) -> AsyncIterator[bytes]:
        try:
            if job.kind == "chat":  # the assistant's role first, as OpenAI streams it
                yield sse(core.chunk(job, model, "", [], first=True))
            if job.echo:
                yield sse(core.chunk(job, model, job.echo, []))
            item = first
            while True:
                if isinstance(item, cp.Chunk):
                    # Tokens whose text is undecided (a partial UTF-8 character, a possible
                    # stop string) come with later text; their ids only when asked for.
                    if item.text or (job.return_token_ids and item.token_ids):
                        yield sse(core.chunk(job, model, item.text, item.token_ids))
                    item = await relay.next()
                    continue
                if item.finish_reason in ("error", "abort"):
                    yield sse(core.gateway_error(item).body())
                    break
                reason = core.finish_reason(item)
                yield sse(core.chunk(job, model, item.text, [], reason))
                if job.include_usage:
                    yield sse(core.usage_chunk(job, model, item))
                break
            yield DONE
        except (GatewayGone, GatewayTimeout, GatewayClosed) as exc:
            yield sse(_transport_error(exc).body())
            yield DONE
        finally:
            relay.close()

    # ------------------------------------------------------------------ the rest
    async def models(self, request: Request) -> Response:
        self._authorize(request)
        lim = self.s.limits
        model = op.Model(
            id=lim.model_name, created=int(time.time()), max_model_len=lim.max_model_len
        )
        return json_response(op.ModelList(data=[model]))

    async def tokenize(self, request: Request) -> Response:
        self._authorize(request)
        req = await self._body(request, op.TokenizeRequest)
        core.check_model(req.model, self.s.limits, required=False)
        if (req.prompt is None) == (req.messages is None):
            raise core.bad("give exactly one of prompt and messages")
        if req.messages is not None:
            text = core.render_chat(self.s.template, req.messages, req.add_generation_prompt)
            specials = False
        else:
            assert req.prompt is not None
            text, specials = req.prompt, req.add_special_tokens
        if len(text.encode("utf-8", "surrogatepass")) > self.s.max_body_bytes:
            raise ApiError(413, "the prompt is too large to tokenize", "invalid_request_error")
        ids = await asyncio.to_thread(self.s.tokenizer.encode, text, add_special_tokens=specials)
        return json_response(
            op.TokenizeResponse(
                tokens=ids, count=len(ids), max_model_len=self.s.limits.max_model_len
            )
        )

    async def detokenize(self, request: Request) -> Response:
        self._authorize(request)
        req = await self._body(request, op.DetokenizeRequest)
        core.check_model(req.model, self.s.limits, required=False)
        vocab = self.s.limits.vocab_size
        if any(not 0 <= t < vocab for t in req.tokens):
            raise core.bad(f"tokens must be in [0, {vocab})", "tokens")
        text = await asyncio.to_thread(self.s.tokenizer.decode, req.tokens)
        return json_response(op.DetokenizeResponse(prompt=text))

    async def health(self, request: Request) -> Response:
        try:
            await self.s.client.status(HEALTH_TIMEOUT_S)
        except Exception as exc:
            return json_response(
                op.Health(status="unavailable", reason=f"the gateway does not answer: {exc}"), 503
            )
        return json_response(op.Health(status="ok"))

    async def ready(self, request: Request) -> Response:
        try:
            report = await self.s.client.status(HEALTH_TIMEOUT_S)
        except Exception as exc:
            return json_response(
                op.Health(status="unavailable", reason=f"the gateway does not answer: {exc}"), 503
            )
        body = op.Health(
            status="ok" if report.ready else "unavailable",
            reason=report.reason,
            instances=report.instances,
            needs=report.needs,
        )
        return json_response(body, 200 if report.ready else 503)

    async def metrics_endpoint(self, request: Request) -> Response:
        return Response(self.metrics.render(), media_type=CONTENT_TYPE)

    async def openapi_endpoint(self, request: Request) -> Response:
        return Response(self.openapi, media_type="application/json")


def _param_of(message: str) -> str | None:
    """The top-level field a msgspec error names (`... - at `$.messages[0].role``)."""
    _, sep, path = message.partition("at `$.")
    if not sep:
        return None
    name = path.rstrip("`").split(".")[0].split("[")[0]
    return name or None


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return error_response(exc)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    kinds = {404: "not_found_error", 405: "invalid_request_error"}
    err = ApiError(
        exc.status_code,
        f"{exc.detail}: {request.method} {request.url.path}",
        kinds.get(exc.status_code, "invalid_request_error"),
    )
    return error_response(err)


async def _crash(request: Request, exc: Exception) -> Response:
    log.error("request failed", path=request.url.path, error=repr(exc), exc_info=exc)
    return error_response(ApiError(500, "internal error", "server_error"))


def build_app(state: ApiState) -> Starlette:
    metrics = ApiMetrics(set())
    openapi = document(state.limits.model_name, state.limits.max_tokens, bool(state.api_key))
    h = Handlers(state, metrics, openapi)
    routes = [
        Route("/v1/completions", h.completions, methods=["POST"]),
        Route("/v1/chat/completions", h.chat, methods=["POST"]),
        Route("/v1/models", h.models, methods=["GET"]),
        Route("/tokenize", h.tokenize, methods=["POST"]),
        Route("/detokenize", h.detokenize, methods=["POST"]),
        Route("/health", h.health, methods=["GET"]),
        Route("/ready", h.ready, methods=["GET"]),
        Route("/metrics", h.metrics_endpoint, methods=["GET"]),
        Route("/openapi.json", h.openapi_endpoint, methods=["GET"]),
    ]
    metrics.routes.update(r.path for r in routes)
    app = Starlette(
        routes=routes,
        exception_handlers={ApiError: _api_error, HTTPException: _http_error, Exception: _crash},
    )
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    app.state.metrics = metrics
    return app
