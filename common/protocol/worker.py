"""The "worker" channel: gateway -> worker requests (PUSH -> the worker's PULL), and the
worker's token stream back (PUSH -> the `reply_to` PULL address named in the request).

The worker streams token ids only; the gateway owns the tokenizer, detokenizes, applies
stop strings (sending `Abort` on a match) and talks to the client. Each request ends with
exactly one chunk whose `finished` is true (with `error` set if the request was refused).
"""

from __future__ import annotations

import msgspec

from common.sampling import SamplingParams


class Generate(msgspec.Struct, tag=True, frozen=True):
    request_id: str
    token_ids: list[int]
    params: SamplingParams
    reply_to: str  # the gateway's PULL address for this request's chunks


class Abort(msgspec.Struct, tag=True, frozen=True):
    request_id: str


WorkerRequest = Generate | Abort


class TokenChunk(msgspec.Struct, frozen=True, array_like=True, omit_defaults=True):
    request_id: str
    token_ids: list[int]
    finished: bool = False
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    error: str | None = None
