"""The engine: a pure, synchronous `step()` over continuous batching and paged KV.

    add_request() --> Scheduler.waiting --schedule()--> ModelRunner.execute() --> sample
                                                               |
    RequestOutput  <-- stop checks, free blocks <--------------+

No sockets and no event loop here: the worker service and the in-process `AsyncEngine`
drive `step()`. A bad request is refused in `add_request` with `InvalidRequestError`
and never reaches the queues, so one bad request cannot disturb the others.

Block accounting: every pool block is free, owned by a live request, or handed to the
caller with a finished request that asked to keep its blocks (until `release_blocks`).
`check_integrity()` proves it.

Preemption by swap (`preemption_mode = "swap"`): the scheduler marks requests to swap out
and in (services/worker/scheduler.py), and the copies are done between steps by the owner
of the host tier. An engine over its own pool owns a host buffer (`swap_space`) and copies
at the start of each `step()`; an engine over a leased pool (a worker's) has none, and its
shell swaps through the MemPool daemon's host tier before each step (`MempoolEngine`).
Either way the scheduling decisions are the same.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from common.errors import InvalidRequestError
from common.model.config import ModelConfig
from common.model.presets import resolve_model
from common.protocol.elastic import RequestState
from common.sampling import SamplingParams
from services.worker.block_pool import BlockPool
from services.worker.config import EngineConfig
from services.worker.decode_graphs import CudaGraphCapture, DecodeGraphs, holds_whole_model
from services.worker.kv_cache import KVCache, KVLayout
from services.worker.malloc import keep_step_buffers
from services.worker.model.llama import LlamaModel
from services.worker.model.loader import load_model
from services.worker.model_runner import ModelRunner
from services.worker.request import FinishReason, Request, RequestStatus
from services.worker.sampler import generator_state, make_generator, sample
from services.worker.scheduler import PreemptionStats, Scheduler
from services.worker.swap_space import HostSwapSpace, SwapSpaceFull


@dataclass
class RequestOutput:
    request_id: str
    new_token_ids: list[int]
    finished: bool = False
    finish_reason: FinishReason | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    # Set on the final output of a request with keep_blocks: blocks (borrowed + owned) and
    # the number of tokens whose K/V they hold. The owned ones now belong to the caller.
    block_ids: list[int] = field(default_factory=list)
    num_kv_tokens: int = 0
    # Set on the final output of a sampled request: its generator's state, so another
    # engine can continue the request drawing what this one would have drawn.
    generator_state: bytes = b""
    error: str | None = None


def resolve_dtype(name: str, device: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


class Engine:
    def __init__(
        self, model: LlamaModel, cache: KVCache, config: EngineConfig, pool: BlockPool | None = None
    ):
        """`pool` defaults to every block of `cache`; a worker passes an empty pool and
        leases blocks into it from its MemPool daemon (whose host tier then holds what a
        preemption by swap moves out: this engine has no `swap_space` of its own)."""
        self.config = config.validate()
        self.model = model
        self.model_config: ModelConfig = model.cfg
        self.cache = cache
        self.block_size = cache.layout.block_size
        self.swap_space: HostSwapSpace | None = None
        if pool is None and config.preemption_mode == "swap":
            layout = cache.layout
            n = config.num_swap_blocks
            self.swap_space = HostSwapSpace(
                layout, layout.num_blocks_for(config.swap_space_bytes) if n is None else n
            )
        self.pool = BlockPool(cache.num_blocks) if pool is None else pool
        self.scheduler = Scheduler(
            self.pool,
            self.block_size,
            config.max_num_seqs,
            config.max_num_batched_tokens,
            preemption_mode=config.preemption_mode,
        )
        self.runner = ModelRunner(model, cache)
        limit = model.cfg.max_position_embeddings
        self.max_model_len = min(config.max_model_len or limit, limit)
        if config.cuda_graphs and model.device.type == "cuda" and holds_whole_model(model):
            self.runner.graphs = DecodeGraphs(
                model,
                max_batch=config.max_num_seqs,
                max_blocks=-(-self.max_model_len // self.block_size),
                capture=CudaGraphCapture(model.device),
            )
        self.eos_token_ids = frozenset(model.cfg.eos_token_ids)
        self.requests: dict[str, Request] = {}
        self.handed_out: set[int] = set()  # owned blocks of finished keep_blocks requests
        self._rng = random.Random(config.seed)

    @classmethod
    def from_config(
        cls,
        config: EngineConfig,
        *,
        kv_buffer: memoryview | torch.Tensor | None = None,
        pool: BlockPool | None = None,
    ) -> Engine:
        """Load the model and build the KV cache (on `kv_buffer` when one is handed in: host
        bytes, or a uint8 tensor such as a CUDA IPC mapping on `config.device`)."""
        config.validate()
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        if torch.device(config.device).type == "cpu":
            keep_step_buffers()  # no page faults on every prefill matmul (malloc.py)
        dtype = resolve_dtype(config.dtype, config.device)
        folder: Path = resolve_model(config.model)
        model, cfg = load_model(
            folder,
            dtype=dtype,
            device=config.device,
            max_positions=config.max_model_len,
            kernels=config.kernels,
        )
        layout = KVLayout.for_model(cfg, config.block_size, dtype)
        n = config.num_kv_blocks or layout.num_blocks_for(config.kv_cache_memory_bytes)
        if kv_buffer is not None:
            if isinstance(kv_buffer, torch.Tensor):
                if kv_buffer.device != torch.device(config.device):
                    raise ValueError(
                        f"KV memory is on {kv_buffer.device}, the engine on {config.device}"
                    )
                cache = KVCache.from_bytes(layout, kv_buffer, n)
            else:
                cache = KVCache.from_buffer(layout, kv_buffer, n)
        else:
            cache = KVCache.allocate(layout, n, config.device)
        return cls(model, cache, config, pool)

    # ------------------------------------------------------------------ requests
    def add_request(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
        *,
        borrowed_block_ids: Sequence[int] = (),
        num_computed_tokens: int = 0,
        keep_blocks: bool = False,
        generator_state: bytes = b"",
    ) -> Request:
        """Queue a request. `borrowed_block_ids` hold the K/V of its first
        `num_computed_tokens` tokens (whole blocks, owned by the caller). A sampled request
        continued from another engine brings its `generator_state` (instead of a new seed)."""
        if request_id in self.requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        params.validate()
        prompt = list(prompt_token_ids)
        if not prompt:
            raise InvalidRequestError("the prompt is empty")
        vocab = self.model_config.vocab_size
        if any(not 0 <= t < vocab for t in prompt):
            raise InvalidRequestError(f"prompt has token ids outside [0, {vocab})")
        if len(prompt) >= self.max_model_len:
            raise InvalidRequestError(
                f"prompt of {len(prompt)} tokens does not fit the context of {self.max_model_len} tokens"
            )
        if len(prompt) >= self.capacity_tokens:
            raise InvalidRequestError(
                f"prompt of {len(prompt)} tokens does not fit the KV pool of {self.capacity_tokens} tokens"
            )
        borrowed = list(borrowed_block_ids)
        bs = self.block_size
        if num_computed_tokens != len(borrowed) * bs:
            raise InvalidRequestError(
                f"{len(borrowed)} borrowed blocks hold {len(borrowed) * bs} tokens, not {num_computed_tokens}"
            )
        if num_computed_tokens >= len(prompt):
            raise InvalidRequestError(
                "a cached prefix must leave at least one prompt token to compute"
            )
        if any(not 0 <= b < self.cache.num_blocks for b in borrowed):
            raise InvalidRequestError(f"borrowed block ids outside [0, {self.cache.num_blocks})")
        # A borrowed block is someone else's: never one this engine could hand to a request.
        mine = [
            b
            for b in borrowed
            if self.pool.is_free(b) or (self.pool.is_allocated(b) and b not in self.handed_out)
        ]
        if mine:
            raise InvalidRequestError(f"borrowed blocks {mine} belong to this engine's pool")
        generator = make_generator(params, self._rng, generator_state)
        req = Request(
            request_id,
            prompt,
            params,
            borrowed_block_ids=borrowed,
            num_computed_tokens=num_computed_tokens,
            keep_blocks=keep_blocks,
            generator=generator,
        )
        self.requests[request_id] = req
        self.scheduler.add(req)
        return req

    def adopt(self, state: RequestState) -> Request:
        """Take over a request another engine exported (a group forming or dissolving):
        its tokens so far, its generator state, and optionally its KV (`state.block_ids`,
        owned by this engine from now on, holding `num_computed_tokens` tokens). Without
        KV the request is recomputed (preemption semantics): same tokens either way."""
        if state.request_id in self.requests:
            raise InvalidRequestError(f"request id {state.request_id!r} is already in use")
        params = state.params.validate()
        prompt, outputs = list(state.prompt_token_ids), list(state.output_token_ids)
        vocab = self.model_config.vocab_size
        if not prompt or any(not 0 <= t < vocab for t in prompt + outputs):
            raise InvalidRequestError(
                "an adopted request needs a prompt of token ids in the vocabulary"
            )
        total = len(prompt) + len(outputs)
        if total >= self.capacity_tokens:
            raise InvalidRequestError(
                f"request of {total} tokens does not fit the KV pool of {self.capacity_tokens} tokens"
            )
        blocks = list(state.block_ids)
        computed = state.num_computed_tokens
        if not 0 <= computed < total or computed > len(blocks) * self.block_size:
            raise InvalidRequestError(
                f"{len(blocks)} blocks cannot hold {computed} computed tokens of {total}"
            )
        if not params.greedy and outputs and not state.generator_state:
            raise InvalidRequestError("a sampled request with outputs needs its generator state")
        generator = make_generator(params, self._rng, state.generator_state)
        reserved = [b for b in blocks if b in self.handed_out]
        if reserved:  # reserved for it (`reserve`) while its KV was on the way
            self.unreserve(reserved)
        self.pool.claim(blocks)
        req = Request(
            state.request_id,
            prompt,
            params,
            output_token_ids=outputs,
            owned_block_ids=blocks,
            num_computed_tokens=computed,
            generator=generator,
        )
        req.num_cached_tokens = state.num_cached_tokens
        self.requests[req.request_id] = req
        self.scheduler.add(req, front=bool(blocks))
        return req

    def export_requests(self, *, keep_kv: bool = False) -> list[RequestState]:
        """Every request leaves this engine (running first, then waiting, in order) with
        its tokens and generator state. Without `keep_kv` its owned blocks go back to the
        pool and the adopting engine recomputes it (see `adopt`); with `keep_kv` the state
        names its blocks and computed tokens, and the blocks leave the pool with it (the
        caller moves the KV). Borrowed blocks stay with their owner either way (the caller
        releases them); a request holding some cannot keep its KV."""
        sched = self.scheduler
        reqs = list(sched.running) + list(sched.waiting)
        swapping = self.swapper()
        if swapping is not None:  # swapped ones after the running, before the waiting
            queued = swapping.swapping_out + swapping.swapping_in + list(swapping.swapped)
            reqs = list(sched.running) + queued + list(sched.waiting)
        out = [self._export(req, keep_kv) for req in reqs]
        self._settle_host_garbage()
        return out

    def export_request(self, request_id: str, *, keep_kv: bool) -> RequestState | None:
        """One request leaves this engine, as in `export_requests` (a live migration);
        None for an unknown id."""
        req = self.requests.get(request_id)
        if req is None:
            return None
        state = self._export(req, keep_kv)
        self._settle_host_garbage()
        return state

    def _export(self, req: Request, keep_kv: bool) -> RequestState:
        self.scheduler.remove(req)
        kept: list[int] = []
        computed = 0
        if keep_kv and not req.num_borrowed_blocks:
            kept, computed = list(req.block_ids), req.num_computed_tokens
            self.pool.disown(kept)
            req.block_ids.clear()
        else:
            self.scheduler.release_owned(req)
        del self.requests[req.request_id]
        return RequestState(
            request_id=req.request_id,
            prompt_token_ids=list(req.prompt_token_ids),
            output_token_ids=list(req.output_token_ids),
            params=req.params,
            reply_to="",
            generator_state=generator_state(req.generator),
            num_cached_tokens=req.num_cached_tokens,
            output_offset=req.num_output_tokens,
            block_ids=kept,
            num_computed_tokens=computed,
        )

    def abort(
        self, request_id: str, reason: FinishReason = FinishReason.ABORT
    ) -> RequestOutput | None:
        """End a request now (client gone, stop string matched). Unknown ids are ignored."""
        req = self.requests.get(request_id)
        if req is None:
            return None
        self.scheduler.remove(req)
        self._settle_host_garbage()
        return self._finish(req, reason, [])

    def reserve(self, ids: Sequence[int]) -> None:
        """Blocks taken for KV on its way here (a request adopted once its KV arrived):
        held as handed-out blocks, so the integrity check counts them, until `adopt` gives
        them to their request or `unreserve` frees them."""
        self.pool.claim(ids)
        self.handed_out.update(ids)

    def reserve_free(self, n: int) -> list[int]:
        """`reserve` n free blocks of the pool's choosing."""
        ids = self.pool.allocate(n)
        self.handed_out.update(ids)
        return ids

    def unreserve(self, ids: Sequence[int]) -> None:
        self.release_blocks(ids)

    def release_blocks(self, block_ids: Sequence[int]) -> None:
        """Give back blocks that a keep_blocks request handed over."""
        self.pool.free(self._take_handed_out(block_ids))

    def disown_blocks(self, block_ids: Sequence[int]) -> None:
        """Handed-out blocks now belong to someone else (the MemPool index took them)."""
        self.pool.disown(self._take_handed_out(block_ids))

    def _take_handed_out(self, block_ids: Sequence[int]) -> list[int]:
        ids = list(block_ids)
        unknown = [b for b in ids if b not in self.handed_out]
        if unknown:
            raise InvalidRequestError(f"blocks {unknown} were not handed out by this engine")
        lent = {b for r in self.requests.values() for b in r.borrowed_block_ids} & set(ids)
        if lent:
            raise InvalidRequestError(
                f"blocks {sorted(lent)} are still borrowed by a running request"
            )
        self.handed_out.difference_update(ids)
        return ids

    @property
    def capacity_tokens(self) -> int:
        return self.cache.num_blocks * self.block_size

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    # ---------------------------------------------------------------------- swap
    def swapper(self) -> Scheduler | None:
        """The scheduler when it preempts by swap (the swap queues and reports live
        there), else None (recompute, or a pipeline leader's microbatch scheduler)."""
        s = self.scheduler
        return s if isinstance(s, Scheduler) and s.preemption_mode == "swap" else None

    def swaps_pending(self) -> bool:
        """Swap copies wait for the next step (a step that only marked swaps made progress)."""
        s = self.swapper()
        return s is not None and s.swaps_pending

    def stalled_head(self) -> Request | None:
        """The request the next step would start first if memory allowed: the head of the
        swapped queue (they come back first), else of the waiting queue."""
        s = self.swapper()
        if s is not None and s.swapped:
            return s.swapped[0]
        return self.scheduler.waiting[0] if self.scheduler.waiting else None

    def swap_locally(self) -> None:
        """Do the swaps the scheduler marked, with this engine's host buffer: copy out (host
        full: recompute instead), copy in, free the host blocks of requests that left."""
        sched, space = self.swapper(), self.swap_space
        if sched is None or space is None:
            return
        for req in list(sched.swapping_out):
            try:
                host = space.swap_out(self.cache, req.owned_block_ids)
            except SwapSpaceFull:
                sched.swap_out_refused(req)
                continue
            sched.swap_out_done(req, host, disown=False)
        for req in list(sched.swapping_in):
            space.swap_in(
                self.cache, sched.swapped_kv[req.request_id].host_block_ids, req.owned_block_ids
            )
            sched.swap_in_done(req)
        self._settle_host_garbage()

    def _settle_host_garbage(self) -> None:
        sched, space = self.swapper(), self.swap_space
        if sched is not None and space is not None and sched.host_garbage:
            garbage, sched.host_garbage = sched.host_garbage, []
            space.free(garbage)

    def preemption_stats(self) -> dict[str, int]:
        """Preemptions so far, by kind, with the swapped blocks in bytes too."""
        stats = getattr(self.scheduler, "stats", None) or PreemptionStats()
        block_bytes = self.cache.layout.bytes_per_block
        return {
            "preemptions": stats.preemptions,
            "recomputes": stats.recomputes,
            "swap_outs": stats.swap_outs,
            "swap_ins": stats.swap_ins,
            "swapped_out_blocks": stats.swapped_out_blocks,
            "swapped_in_blocks": stats.swapped_in_blocks,
            "swapped_out_bytes": stats.swapped_out_blocks * block_bytes,
            "swapped_in_bytes": stats.swapped_in_blocks * block_bytes,
            "swap_fallbacks": stats.swap_fallbacks,
        }

    # ---------------------------------------------------------------------- step
    def step(self) -> list[RequestOutput]:
        self.swap_locally()
        sched = self.scheduler.schedule()
        if not sched.chunks:
            return []
        result = self.runner.execute(sched.chunks)
        for c in sched.chunks:
            c.request.num_computed_tokens += c.num_tokens
        return self._emit(result.sampled_requests, result.logits)

    def _emit(self, reqs: list[Request], logits: torch.Tensor) -> list[RequestOutput]:
        """Sample one token per request (rows of `logits`), check stops, build outputs."""
        outputs: list[RequestOutput] = []
        if not reqs:
            return outputs
        tokens = sample(logits, [r.params for r in reqs], [r.generator for r in reqs])
        for req, token in zip(reqs, tokens, strict=True):
            req.append_token(token)
            reason = self._check_stop(req, token)
            if reason is not None:
                self.scheduler.remove(req)
                outputs.append(self._finish(req, reason, [token]))
            else:
                outputs.append(
                    RequestOutput(
                        req.request_id,
                        [token],
                        num_prompt_tokens=req.num_prompt_tokens,
                        num_cached_tokens=req.num_cached_tokens,
                    )
                )
        return outputs

    def _check_stop(self, req: Request, token: int) -> FinishReason | None:
        p = req.params
        if not p.ignore_eos and token in self.eos_token_ids:
            return FinishReason.STOP
        if token in p.stop_token_ids:
            return FinishReason.STOP
        if req.num_output_tokens >= p.max_tokens:
            return FinishReason.LENGTH
        if req.num_tokens >= self.max_model_len or req.num_tokens >= self.capacity_tokens:
            return FinishReason.LENGTH
        return None

    def _finish(self, req: Request, reason: FinishReason, new_tokens: list[int]) -> RequestOutput:
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason
        del self.requests[req.request_id]
        out = RequestOutput(
            req.request_id,
            new_tokens,
            finished=True,
            finish_reason=reason,
            num_prompt_tokens=req.num_prompt_tokens,
            num_cached_tokens=req.num_cached_tokens,
            generator_state=generator_state(req.generator),
        )
        if req.keep_blocks:
            out.block_ids = list(req.block_ids)
            out.num_kv_tokens = req.num_computed_tokens
            self.handed_out.update(req.owned_block_ids)
        else:
            self.scheduler.release_owned(req)
        return out

    # ----------------------------------------------------------------- integrity
    def check_integrity(self) -> None:
        """Raise AssertionError unless every block is free, owned by exactly one live
        request, or handed out; borrowed blocks are never in the pool's allocated set."""
        owned: list[int] = []
        for req in self.requests.values():
            owned.extend(req.owned_block_ids)
            assert req.num_computed_tokens <= len(req.block_ids) * self.block_size, req
            for b in req.borrowed_block_ids:
                assert not self.pool.is_allocated(b) or b in self.handed_out, (
                    f"borrowed block {b} is pool-owned"
                )
        assert len(owned) == len(set(owned)), "a block is owned by two requests"
        assert not (set(owned) & self.handed_out), "a handed-out block is still owned by a request"
        allocated = self.pool.allocated()
        assert set(owned) | self.handed_out == allocated, (
            f"leak: allocated {len(allocated)}, owned {len(owned)}, handed out {len(self.handed_out)}"
        )
        assert self.pool.num_free + len(allocated) == self.pool.num_blocks
        self._check_swaps()

    def _check_swaps(self) -> None:
        """Every live request is in exactly one queue; a swapped one owns no device block
        (one coming back owns as many as it has host blocks), its computed count is its
        borrowed prefix, and the host blocks are each one request's (all of the host
        buffer's used blocks, for an engine with one)."""
        sched = self.swapper()
        if sched is None:
            return
        queues = [
            *sched.running,
            *sched.waiting,
            *sched.swapping_out,
            *sched.swapped,
            *sched.swapping_in,
        ]
        ids = [r.request_id for r in queues]
        assert sorted(ids) == sorted(self.requests), "a request is in no queue or in two"
        assert set(sched.swapped_kv) == {r.request_id for r in [*sched.swapped, *sched.swapping_in]}
        host: list[int] = list(sched.host_garbage)
        for req in [*sched.swapped, *sched.swapping_in]:
            kv = sched.swapped_kv[req.request_id]
            host.extend(kv.host_block_ids)
            owned = len(req.owned_block_ids)
            assert owned == (len(kv.host_block_ids) if req in sched.swapping_in else 0), req
            assert req.num_computed_tokens == req.num_borrowed_blocks * self.block_size, req
            assert (
                kv.num_computed_tokens
                <= (req.num_borrowed_blocks + len(kv.host_block_ids)) * self.block_size
            ), req
        assert len(host) == len(set(host)), "a host block is held twice"
        if self.swap_space is not None:
            assert self.swap_space.num_used == len(host), (
                f"host swap space: {self.swap_space.num_used} used, {len(host)} held"
            )
