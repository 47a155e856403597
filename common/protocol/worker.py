"""The "worker" channel: gateway -> worker requests (PUSH -> the worker's PULL), prefill ->
decode hand-offs on the same PULL, and the token stream back (PUSH -> the `reply_to` PULL
address named in the request).

Workers stream token ids only; the gateway owns the tokenizer, detokenizes, applies stop
strings (sending `Abort` on a match) and talks to the client. Each request ends with exactly
one chunk whose `finished` is true (with `error` set if the request failed). In P/D modes
the prefill worker streams the first token and the decode worker the rest: `offset` (the
index in the output of a chunk's first token) lets the gateway order chunks that arrive
from two sockets.

What a request does with the MemPool is decided per request by the scheduler (the cluster's
caching mode, `common/modes.py`: `Generate.cache` is the mode's `cache`, `HandOff.insert` /
`cache` / `return_kv` its `handoff_insert` / `decode_cache` / `return_kv`), not by the
worker's configuration, so one worker binary serves every mode.
"""

from __future__ import annotations

import msgspec

from common.sampling import SamplingParams


class HandOff(msgspec.Struct, frozen=True, omit_defaults=True):
    """Where a prefill worker sends a request once its prompt is computed (P/D modes)."""

    instance_id: str  # the decode instance (worker and daemon share the id)
    address: str  # the decode worker's request PULL
    mempool: str  # the decode instance's MemPool daemon (RPC)
    # transfer_with_insert into the decode daemon's index (only blocks it lacks move);
    # otherwise a plain transfer into blocks allocated to the decode worker.
    insert: bool = False
    cache: bool = False  # the decode worker inserts the request's history when it ends
    return_kv: bool = False  # ... and sends the decode-phase KV back to the prefill daemon


class Fetch(msgspec.Struct, frozen=True, omit_defaults=True):
    """Before prefill, pull the first `num_tokens` tokens' KV from another instance's daemon
    into this instance's index (the scheduler judged the transfer cheaper than recompute).
    Best effort: if it fails, the worker computes those tokens."""

    instance_id: str
    mempool: str
    num_tokens: int


class Generate(msgspec.Struct, tag=True, frozen=True, omit_defaults=True):
    request_id: str
    token_ids: list[int]
    params: SamplingParams
    reply_to: str  # the gateway's PULL address for this request's chunks
    cache: bool = True  # match before prefill, insert at the end
    handoff: HandOff | None = None  # P/D: compute the prompt and the first token, then hand off
    fetch: Fetch | None = None


class Continue(msgspec.Struct, tag=True, frozen=True, omit_defaults=True, kw_only=True):
    """Prefill -> decode: go on with a request whose prompt KV is (mostly) already here.

    `token_ids` is the prompt plus the first output token; `kv_block_ids` hold the K/V of
    the first `len(kv_block_ids) * block_size` tokens in the decode daemon: pinned in its
    index by `kv_handle` (transfer_with_insert), or, with `kv_handle == 0`, allocated to the
    decode worker (plain transfer). Empty when the transfer failed: decode recomputes.
    `params.max_tokens` counts the tokens still to generate. `generator_state` is where a
    sampled request's `torch.Generator` stands after the prefill side drew its tokens
    (`get_state()` bytes): decode restores it instead of seeding anew, so a seeded request
    draws the same tokens as in one process. Built by keyword only (eleven fields)."""

    request_id: str
    token_ids: list[int]
    params: SamplingParams
    reply_to: str
    kv_block_ids: list[int] = msgspec.field(default_factory=list)
    kv_handle: int = 0
    cache: bool = False
    return_kv_to: str = ""  # pd-caching-3: the prefill daemon that gets the decode-phase KV
    num_prompt_tokens: int = 0  # the client's prompt (without the first token)
    num_cached_tokens: int = 0  # what the prefill side found cached, for the final report
    output_offset: int = 1  # output tokens already streamed by the prefill worker
    generator_state: bytes = b""  # empty for greedy requests


class Abort(msgspec.Struct, tag=True, frozen=True):
    request_id: str


WorkerRequest = Generate | Continue | Abort


class TokenChunk(msgspec.Struct, frozen=True, array_like=True, omit_defaults=True):
    request_id: str
    token_ids: list[int]
    finished: bool = False
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    error: str | None = None
    offset: int = 0  # index in the output of token_ids[0]
    instance_id: str = ""  # the worker that sent the chunk
    # Set on a hand-over's first chunk (a KunServe group or a migration took the request,
    # or gave it back): the request address of `instance_id`, where aborts go from now on.
    address: str = ""
