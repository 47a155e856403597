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

Live restore primitives (the group keeps serving while requests go home in batches):

- `retire(keep)`: only group blocks in `keep` are handed out from now on (`BlockPool.retire`).
  Each launch relocates up to `relocate_per_step` live blocks outside `keep` held by the
  launched microbatch's requests into free blocks of `keep`: the id is swapped in the
  request's block table before the metadata is built, the copy rides in the batch
  (`StageBatch.copies`, applied by every stage, the leader included, before its layers)
  and the old block leaves the pool right after the send. That is safe because none of
  these requests is in flight (their microbatch is being launched: its previous batch
  came back, so every stage wrote their KV), and every later batch reaches each stage
  after this one (FIFO per hop). `outside_live()` counts what is still to move.
- `park(ids)`: a request leaves as soon as no batch of it is in flight, exported with its
  KV (`take_parked`); its group blocks stay reserved (handed out) until `unreserve`.
- The leader runs the layers it held at construction (`layers`), like every stage, so
  its model's `restore_layers` may run in another thread meanwhile (`LlamaModel`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from common.protocol.elastic import RequestState
from services.worker.block_pool import BlockPool
from services.worker.config import EngineConfig
from services.worker.engine import Engine, RequestOutput
from services.worker.kv_cache import KVCache
from services.worker.model.llama import LlamaModel
from services.worker.model_runner import sampled_rows
from services.worker.pipeline.metadata import local_copies, remap, to_stage_batch
from services.worker.pipeline.microbatch import MicrobatchScheduler
from services.worker.pipeline.ring import Ring, StageTimeout
from services.worker.pipeline.views import copy_sub_blocks
from services.worker.request import Request
from services.worker.scheduler import ScheduledChunk


@dataclass
class _InFlight:
    step: int
    sampled: list[Request]  # requests whose logits come back, in row order
    chunks: list[ScheduledChunk]


class PipelineEngine(Engine):
    relocate_per_step: int = 8  # live blocks moved into `keep` per launch after a retire

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
        # The leader's layers, fixed at the drop: its model may load the others in another
        # thread (a live restore) while the group keeps serving.
        self.layers = range(model.first_layer, model.last_layer)
        self.g = g
        self.ring = ring
        self.epoch = epoch
        self.stage_timeout_s = stage_timeout_s
        self._next = 0
        self._steps = 0
        self._in_flight: list[_InFlight | None] = [None] * g
        self._busy_s = 0.0
        self._waited = 0.0
        self._started = time.monotonic()
        self._to_park: dict[str, Request] = {}  # in flight when named: park on its return
        self._parked: list[RequestState] = []

    # ------------------------------------------------------------ live restore
    def retire(self, keep: set[int]) -> None:
        """Only group blocks in `keep` are handed out from now on: free ones outside it
        leave the pool now, held ones when they are freed; launches relocate live ones
        (module docstring). Calling it again replaces `keep`; what left stays out."""
        self.pool.retire(keep)

    def retired(self) -> set[int]:
        """Group ids that have left the pool by a retire."""
        return set(self.pool.retired())

    def outside_live(self) -> int:
        """Live group blocks (held by requests or reserved) outside `keep`; 0: the retire
        is complete (also before any retire)."""
        keep = self.pool.keep
        if keep is None:
            return 0
        return sum(b not in keep for b in self.pool.allocated())

    def in_flight_ids(self) -> set[str]:
        """Requests with a batch in flight (a park of one waits for its return)."""
        return {
            c.request.request_id
            for f in self._in_flight
            if f is not None
            for c in f.chunks
            if self.requests.get(c.request.request_id) is c.request
        }

    def park(self, request_ids: list[str]) -> None:
        """Each named request leaves the engine as soon as no batch of it is in flight (at
        once, or when its batch comes back, after its sampled token is emitted and before
        its microbatch is scheduled again), exported with its KV as
        `export_request(rid, keep_kv=True)`. Its group blocks stay reserved (handed out)
        until `unreserve`. Unknown or finished ids are ignored; one aborted while waiting
        to park just finishes. The states come out of `take_parked`."""
        flying = {
            c.request.request_id: c.request
            for f in self._in_flight
            if f is not None
            for c in f.chunks
        }
        for rid in request_ids:
            req = self.requests.get(rid)
            if req is None:
                continue
            if flying.get(rid) is req:
                self._to_park[rid] = req
            else:
                self._park_now(req)

    def take_parked(self) -> list[RequestState]:
        """The requests parked since the last call (oldest first)."""
        parked, self._parked = self._parked, []
        return parked

    def _park_now(self, req: Request) -> None:
        self._to_park.pop(req.request_id, None)
        state = self._export(req, keep_kv=True)
        # `_export` lets the blocks leave the pool; they stay here, reserved, until the
        # caller has copied their KV out and calls `unreserve`.
        self.reserve(list(state.block_ids))
        self._parked.append(state)

    def _park_returned(self, flight: _InFlight) -> None:
        for c in flight.chunks:
            req = c.request
            if self._to_park.get(req.request_id) is not req:
                continue
            if self.requests.get(req.request_id) is req:
                self._park_now(req)
            else:  # finished or aborted meanwhile
                del self._to_park[req.request_id]

    def _relocate(self, mb: int) -> list[tuple[int, int]]:
        """Move up to `relocate_per_step` live blocks outside `keep` of microbatch `mb`'s
        requests (none in flight) into free blocks of `keep`: swap the ids in their block
        tables and return the (old, new) copies for the batch about to be sent."""
        keep = self.pool.keep
        if keep is None or self.relocate_per_step <= 0:
            return []
        part = self.scheduler.parts[mb]  # type: ignore[attr-defined]
        copies: list[tuple[int, int]] = []
        for req in [*part.running, *part.waiting]:
            table = req.block_ids
            for i in range(req.num_borrowed_blocks, len(table)):
                if len(copies) >= self.relocate_per_step or self.pool.num_free == 0:
                    return copies  # no room in keep yet: a later launch goes on
                old = table[i]
                if old in keep:
                    continue
                (new,) = self.pool.allocate(1)  # free blocks are all in keep
                table[i] = new
                copies.append((old, new))
        return copies

    def check_integrity(self) -> None:
        """`Engine.check_integrity`, plus: a retired group id is neither free nor allocated
        (it left the pool), every free id is in `keep`, and every id is a group block."""
        super().check_integrity()
        retired, free, allocated = self.pool.retired(), self.pool.free_ids(), self.pool.allocated()
        assert not retired & (free | allocated), "a retired block is still in the pool"
        keep = self.pool.keep
        assert keep is None or free <= keep, f"free blocks outside keep: {sorted(free - keep)}"
        assert all(0 <= b < len(self.table) for b in retired | free | allocated)

    @property
    def capacity_tokens(self) -> int:
        # The group's size, not the pool's: a live restore's retire shrinks the pool for a
        # while, and a prompt that fits the group must not be refused meanwhile.
        return len(self.table) * self.block_size

    @property
    def launched(self) -> int:
        """Batches launched so far (each one's step number is its count)."""
        return self._steps

    def settled(self, step: int) -> bool:
        """Every batch up to `step` came back: each stage has applied its copies and
        written its KV (the last stage returns a batch after every stage ran it)."""
        return all(f is None or f.step > step for f in self._in_flight)

    @property
    def in_flight(self) -> int:
        return sum(f is not None for f in self._in_flight)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work() or self.in_flight > 0

    def step(self) -> list[RequestOutput]:
        t0 = time.perf_counter()
        waited = self._waited
        mb = self._next
        self._next = (mb + 1) % self.g
        outputs = self._complete(mb) if self._in_flight[mb] is not None else []
        sched = self.scheduler.parts[mb].schedule()  # type: ignore[attr-defined]
        if sched.chunks:
            self._launch(mb, sched.chunks)
        # Busy: the step less its wait on the ring (the leader stage's bubble).
        self._busy_s += time.perf_counter() - t0 - (self._waited - waited)
        return outputs

    def busy(self) -> dict[str, float]:
        """As `StageServer.busy`, for the leader's stage (its steps less their waits on
        the ring; idle time between steps counts as bubble too)."""
        return {
            "batches": self._steps,
            "busy_s": self._busy_s,
            "elapsed_s": time.monotonic() - self._started,
        }

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
        copies = self._relocate(mb)
        ordered, token_ids, meta = self.runner.build_metadata(chunks)
        ids = torch.tensor(token_ids, dtype=torch.long, device=self.runner.device)
        if copies:
            copy_sub_blocks(self.cache, local_copies(copies, self.table))
        hidden = self.model(
            self.model.embed(ids), remap(meta, self.table), self.cache, layers=self.layers
        )
        rows, sampled = sampled_rows(ordered)
        self._steps += 1
        batch = to_stage_batch(
            meta,
            epoch=self.epoch,
            step=self._steps,
            mb=mb,
            return_rows=rows,
            hidden=hidden,
            copies=copies,
        )
        self.ring.send(batch)
        if copies:  # read by every stage before any later batch: never needed again
            self.pool.free([old for old, _ in copies])
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
        t0 = time.perf_counter()
        try:
            result = self.ring.recv(self.stage_timeout_s)
        finally:
            self._waited += time.perf_counter() - t0
        if result.error:
            raise StageTimeout(f"stage failed step {result.step}: {result.error}")
        if result.step != flight.step or result.mb != mb:
            raise StageTimeout(
                f"ring out of order: got step {result.step}/mb {result.mb}, "
                f"expected {flight.step}/{mb}"
            )
        live = [i for i, r in enumerate(flight.sampled) if self.requests.get(r.request_id) is r]
        outputs: list[RequestOutput] = []
        if live:
            hidden = result.hidden.to(self.runner.device)
            logits = self.model.compute_logits(hidden[live]).float()
            outputs = self._emit([flight.sampled[i] for i in live], logits)
        if self._to_park:
            self._park_returned(flight)
        return outputs
