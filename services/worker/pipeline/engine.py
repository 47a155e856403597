"""The leader of a pipeline group (KunServe): an `Engine` whose forward pass runs across
the group's members, g microbatches in flight.

    step():  mb = next microbatch
             if mb is in flight: recv its StageResult, logits (final norm + head here),
                                 sample, stop checks            -> outputs
             schedule mb, embed, run the leader's layers, send the hidden states on

Everything about requests stays here, as in a single engine: the queues, the block
table of every request, sampling with each request's generator, stop checks. A request's
blocks are *group* blocks: group block k is one sub-block on every member (the leader's
own is `table[k]`, the followers map k with their tables), so one allocation covers
every stage, and `check_integrity` of the engine covers the group.

With g microbatches every stage has work while the others compute. Tokens are those of a
single engine: each layer runs the same computation on the same rows, only the hidden
states cross a socket between layer ranges (fp32 CPU kernels are batch-invariant, which
the engine's preemption tests rely on too).

Invariant: a request's batch is in flight at most once (its microbatch is scheduled only
after its previous batch came back); a request aborted while in flight has its row
dropped when the result arrives.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from common.protocol.elastic import RequestState
from services.worker.block_pool import BlockPool
from services.worker.config import EngineConfig
from services.worker.engine import Engine, RequestOutput
from services.worker.kv_cache import KVCache
from services.worker.model.llama import LlamaModel
from services.worker.model_runner import sampled_rows
from services.worker.pipeline.metadata import remap, to_stage_batch
from services.worker.pipeline.microbatch import MicrobatchScheduler
from services.worker.pipeline.ring import Ring, StageTimeout
from services.worker.request import Request
from services.worker.scheduler import ScheduledChunk


@dataclass
class _InFlight:
    step: int
    sampled: list[Request]  # requests whose logits come back, in row order
    chunks: list[ScheduledChunk]


class PipelineEngine(Engine):
    def __init__(
        self,
        model: LlamaModel,
        cache: KVCache,
        config: EngineConfig,
        *,
        table: torch.Tensor,
        num_blocks: int,
        g: int,
        ring: Ring,
        epoch: int,
        stage_timeout_s: float = 10.0,
    ):
        """`cache`: the leader's KV in sub-blocks of its layer range; `table[k]`: the
        leader's sub-block of group block k, for k < `num_blocks` (every member holds at
        least `num_blocks`)."""
        if g < 2:
            raise ValueError(f"a pipeline group has at least 2 stages, not {g}")
        if len(table) < num_blocks:
            raise ValueError(f"table of {len(table)} sub-blocks for {num_blocks} group blocks")
        pool = BlockPool(num_blocks)
        super().__init__(model, cache, config, pool)
        self.scheduler = MicrobatchScheduler(  # type: ignore[assignment]
            pool, self.block_size, g, config.max_num_seqs, config.max_num_batched_tokens
        )
        self.table = table[:num_blocks].to(dtype=torch.long, device=self.runner.device)
        self.g = g
        self.ring = ring
        self.epoch = epoch
        self.stage_timeout_s = stage_timeout_s
        self._next = 0
        self._steps = 0
        self._in_flight: list[_InFlight | None] = [None] * g

    # ------------------------------------------------------------ exchange
    def reserve(self, ids: list[int]) -> None:
        """Group blocks that start taken: the blocks of requests whose KV is still being
        exchanged, and the exchange's sources. Held as handed-out blocks (so the integrity
        check counts them) until `adopt` gives them to their request or `unreserve` frees
        them."""
        self.pool.claim(ids)
        self.handed_out.update(ids)

    def unreserve(self, ids: list[int]) -> None:
        self.release_blocks(ids)

    def adopt(self, state: RequestState) -> Request:
        """As `Engine.adopt`; a request whose exchange is done brings reserved blocks."""
        reserved = [b for b in state.block_ids if b in self.handed_out]
        if reserved:
            self.unreserve(reserved)
        return super().adopt(state)

    @property
    def capacity_tokens(self) -> int:
        return self.pool.num_blocks * self.block_size

    @property
    def in_flight(self) -> int:
        return sum(f is not None for f in self._in_flight)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work() or self.in_flight > 0

    def step(self) -> list[RequestOutput]:
        mb = self._next
        self._next = (mb + 1) % self.g
        outputs = self._complete(mb) if self._in_flight[mb] is not None else []
        sched = self.scheduler.parts[mb].schedule()  # type: ignore[attr-defined]
        if sched.chunks:
            self._launch(mb, sched.chunks)
        return outputs

    def drain(self) -> list[RequestOutput]:
        """Wait for every batch in flight and return what they produced (before a restore)."""
        outputs: list[RequestOutput] = []
        for _ in range(self.g):
            mb = self._next
            self._next = (mb + 1) % self.g
            if self._in_flight[mb] is not None:
                outputs.extend(self._complete(mb))
        return outputs

    @torch.inference_mode()
    def _launch(self, mb: int, chunks: list[ScheduledChunk]) -> None:
        ordered, token_ids, meta = self.runner.build_metadata(chunks)
        ids = torch.tensor(token_ids, dtype=torch.long, device=self.runner.device)
        hidden = self.model(self.model.embed(ids), remap(meta, self.table), self.cache)
        rows, sampled = sampled_rows(ordered)
        self._steps += 1
        batch = to_stage_batch(
            meta, epoch=self.epoch, step=self._steps, mb=mb, return_rows=rows, hidden=hidden
        )
        self.ring.send(batch)
        # The tokens count as computed from here: this microbatch is not scheduled again
        # before its result is back, and the other stages write them in FIFO order.
        for c in chunks:
            c.request.num_computed_tokens += c.num_tokens
        self._in_flight[mb] = _InFlight(self._steps, sampled, chunks)

    @torch.inference_mode()
    def _complete(self, mb: int) -> list[RequestOutput]:
        flight = self._in_flight[mb]
        assert flight is not None
        self._in_flight[mb] = None
        result = self.ring.recv(self.stage_timeout_s)
        if result.error:
            raise StageTimeout(f"stage failed step {result.step}: {result.error}")
        if result.step != flight.step or result.mb != mb:
            raise StageTimeout(
                f"ring out of order: got step {result.step}/mb {result.mb}, "
                f"expected {flight.step}/{mb}"
            )
        live = [i for i, r in enumerate(flight.sampled) if self.requests.get(r.request_id) is r]
        if not live:
            return []
        hidden = result.hidden.to(self.runner.device)
        logits = self.model.compute_logits(hidden[live]).float()
        return self._emit([flight.sampled[i] for i in live], logits)
