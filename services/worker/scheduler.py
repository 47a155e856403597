"""Continuous batching: which requests run in the next step, and how many tokens each.

One step has a token budget (`max_num_batched_tokens`) shared by decodes and prefill
chunks. Running requests come first, in arrival order; each takes the tokens it still has
to compute, cut to what is left of the budget (chunked prefill). Then waiting requests are
admitted in FIFO order while the budget, `max_num_seqs` and the free blocks allow; the head
of the queue is never skipped, so a long prompt cannot starve.

Blocks are allocated for exactly the tokens scheduled (`can_allocate` before `allocate`,
so nothing is half-allocated). When a running request needs a block and none is free, the
most recently admitted request is preempted (`preemption_mode`):

- recompute (default): its owned blocks go back to the pool, its computed count falls back
  to the borrowed prefix, and it waits at the head of the queue to be recomputed later
  with the same tokens;
- swap (vLLM's old `preemption_mode="swap"`, InferCept's swap): its KV moves to a host
  tier and it waits in `swapped` with its computed tokens; swapped requests come back
  (FCFS, before any waiting request is admitted) by moving their KV back to device blocks,
  and go on without recomputing anything.

The scheduler only decides; the copies are done between steps by whoever owns the host
tier (`Engine` with its host buffer, or `MempoolEngine` through its MemPool daemon), who
then reports back (`swap_out_done` / `swap_out_refused`, `swap_in_done` /
`swap_in_refused`). So a swap is two-phase:

    running --schedule()--> swapping_out --swap_out_done--> swapped
                              (device blocks still owned)     (KV on the host; owns
                                   |                           no device block)
                                   +--swap_out_refused--> waiting (recompute: host full)
    swapped --schedule()--> swapping_in --swap_in_done--> running
                              (device blocks reserved,         (KV back, computed count
                               not yet holding the KV)          restored)

A victim's device blocks are freed only once its KV is copied out, i.e. for the next step:
the request that needed them waits one step. (vLLM frees them at once and copies before
the forward pass; a worker's host tier is its daemon's, reached by RPC, which cannot run
inside a synchronous step, and deferring on every engine keeps one code path.) A swapped
request comes back only when its next chunk fits too, so it is not swapped out again at
once. Invariants: a request is in exactly one of
`running`, `waiting`, `swapping_out`, `swapped`, `swapping_in`; a request in `swapped` or
`swapping_in` has its host copy in `swapped_kv` and a computed count at its borrowed
prefix (its reserved blocks hold nothing yet), so every reader of `block_ids` /
`num_computed_tokens` (integrity, migration, load reports) sees a consistent request.
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import MutableSequence
from dataclasses import dataclass, field

from services.worker.block_pool import BlockPool
from services.worker.request import Request, RequestStatus

PREEMPTION_MODES = ("recompute", "swap")


@dataclass
class ScheduledChunk:
    request: Request
    num_tokens: int


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    # Swap mode: requests whose KV is to leave the device (a subset of `preempted`), and
    # requests whose KV is to come back into the blocks just reserved for them.
    swap_out: list[Request] = field(default_factory=list)
    swap_in: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)


@dataclass
class SwappedKV:
    """Where a swapped request's KV is: host blocks (the local host buffer's or the MemPool
    daemon's host tier), one per owned device block it had, holding its first
    `num_computed_tokens` tokens (with its borrowed prefix, which stayed on the device)."""

    host_block_ids: list[int]
    num_computed_tokens: int


@dataclass
class PreemptionStats:
    """Every preemption is a recompute or a swap-out; `swap_fallbacks` counts the
    recomputes that were meant to be swap-outs (the host tier refused: full)."""

    recomputes: int = 0
    swap_outs: int = 0
    swap_ins: int = 0
    swapped_out_blocks: int = 0
    swapped_in_blocks: int = 0
    swap_fallbacks: int = 0

    @property
    def preemptions(self) -> int:
        return self.recomputes + self.swap_outs


class Scheduler:
    def __init__(
        self,
        pool: BlockPool,
        block_size: int,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        *,
        preemption_mode: str = "recompute",
    ):
        if preemption_mode not in PREEMPTION_MODES:
            raise ValueError(
                f"preemption_mode must be one of {'|'.join(PREEMPTION_MODES)}, got {preemption_mode!r}"
            )
        self.pool = pool
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.preemption_mode = preemption_mode
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        # Swap mode (see the module docstring); always empty with recompute.
        self.swapping_out: list[Request] = []
        self.swapped: deque[Request] = deque()  # in arrival order: the head comes back first
        self.swapping_in: list[Request] = []
        self.swapped_kv: dict[str, SwappedKV] = {}
        # Host blocks of requests that ended (or left) while swapped: for the owner of the
        # host tier to free between steps.
        self.host_garbage: list[int] = []
        self.stats = PreemptionStats()

    def add(self, request: Request, *, front: bool = False) -> None:
        """Queue a request; `front`: ahead of every waiting one (a request that arrives
        holding its KV must not wait behind one that cannot get memory, or its blocks
        would be held by a request that cannot run)."""
        if front:
            self.waiting.appendleft(request)
        else:
            self.waiting.append(request)

    def has_work(self) -> bool:
        return bool(
            self.waiting or self.running or self.swapped or self.swapping_out or self.swapping_in
        )

    @property
    def swaps_pending(self) -> bool:
        """Copies the owner of the host tier must do before the next step."""
        return bool(self.swapping_out or self.swapping_in or self.host_garbage)

    def blocks_needed(self, request: Request, num_tokens: int) -> int:
        return -(-(request.num_computed_tokens + num_tokens) // self.block_size) - len(
            request.block_ids
        )

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        freeing = 0  # blocks this step's swap-outs free once their KV is copied out
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            need = self.blocks_needed(req, n)
            while self.pool.num_free + freeing < need:
                victim = self.running.pop()
                freeing += self._preempt(victim, out)
                out.preempted.append(victim)
                if victim is req:
                    break
            if req.status != RequestStatus.RUNNING:
                break
            if not self.pool.can_allocate(need):
                break  # the blocks come free when this step's swap-outs are done
            if need > 0:
                req.block_ids.extend(self.pool.allocate(need))
            out.chunks.append(ScheduledChunk(req, n))
            budget -= n
            i += 1
        # Admit only when nothing was preempted this step: a freshly preempted request
        # waits at the head and must not be overtaken by a newcomer. Swapped requests come
        # back before any waiting one is admitted (FCFS, as vLLM).
        if not out.preempted:
            self._schedule_swap_ins(out)
        while (
            self.waiting
            and budget > 0
            and len(self.running) + len(self.swapping_in) < self.max_num_seqs
            and not out.preempted
            and not self.swapped
        ):
            req = self.waiting[0]
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            need = self.blocks_needed(req, n)
            if not self.pool.can_allocate(need):
                break
            self.waiting.popleft()
            if need > 0:
                req.block_ids.extend(self.pool.allocate(need))
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            out.chunks.append(ScheduledChunk(req, n))
            budget -= n
        return out

    def _schedule_swap_ins(self, out: SchedulerOutput) -> None:
        """Reserve device blocks for swapped requests, head first, while they fit (with
        room for their next chunk) and seats are left; the copies come before the next step."""
        while self.swapped and len(self.running) + len(self.swapping_in) < self.max_num_seqs:
            req = self.swapped[0]
            if not self.pool.can_allocate(self._swap_in_need(req)):
                break
            self.swapped.popleft()
            req.block_ids.extend(
                self.pool.allocate(len(self.swapped_kv[req.request_id].host_block_ids))
            )
            self.swapping_in.append(req)
            out.swap_in.append(req)

    def _swap_in_need(self, req: Request) -> int:
        """Device blocks a swapped request needs to come back and run its next chunk (a
        request that could come back but not run would only be swapped out again)."""
        computed = self.swapped_kv[req.request_id].num_computed_tokens
        n = min(req.num_tokens - computed, self.max_num_batched_tokens)
        return -(-(computed + n) // self.block_size) - req.num_borrowed_blocks

    def demand(self) -> int:
        """Blocks the next `schedule()` would allocate if memory were unlimited: what a
        worker leases from its MemPool daemon before the step."""
        budget = self.max_num_batched_tokens
        need = 0
        for req in self.running:
            if budget <= 0:
                break
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            need += max(0, self.blocks_needed(req, n))
            budget -= n
        seats = self.max_num_seqs - len(self.running) - len(self.swapping_in)
        if self.swapped:  # they come back first; nothing is admitted meanwhile
            for req in list(self.swapped)[: max(0, seats)]:
                need += self._swap_in_need(req)
            return need
        for req in self.waiting:
            if budget <= 0 or seats <= 0:
                break
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            need += max(0, self.blocks_needed(req, n))
            budget -= n
            seats -= 1
        return need

    def _preempt(self, req: Request, out: SchedulerOutput) -> int:
        """Preempt a request taken off `running`; returns the blocks that come free once its
        swap-out is done (0 for a recompute, whose blocks are free at once). A request with
        no computed KV in owned blocks has nothing to swap: it is recomputed."""
        if (
            self.preemption_mode != "swap"
            or req.num_computed_tokens <= req.num_borrowed_blocks * self.block_size
        ):
            self.preempt(req)
            return 0
        req.status = RequestStatus.PREEMPTED
        req.num_preemptions += 1  # its block ids change (a live migration copies again)
        self.swapping_out.append(req)
        out.swap_out.append(req)
        return len(req.owned_block_ids)

    def preempt(self, req: Request) -> None:
        """Preempt by recompute (see the module docstring)."""
        req.num_preemptions += 1
        self._recompute(req)

    def _recompute(self, req: Request) -> None:
        self.release_owned(req)
        req.num_computed_tokens = min(
            req.num_computed_tokens, req.num_borrowed_blocks * self.block_size
        )
        req.status = RequestStatus.PREEMPTED
        self.stats.recomputes += 1
        self.waiting.appendleft(req)

    # ------------------------------------------------- swaps, reported by their owner
    def swap_out_done(self, req: Request, host_block_ids: list[int], *, disown: bool) -> None:
        """`req`'s owned blocks were copied to `host_block_ids` (in order); the device
        blocks leave it: freed in the pool, or `disown`ed when the host tier's owner freed
        them itself (the MemPool daemon's swap_out)."""
        owned = req.owned_block_ids
        if len(host_block_ids) != len(owned):
            raise ValueError(f"{len(owned)} blocks swapped out into {len(host_block_ids)}")
        self.swapping_out.remove(req)
        if disown:
            self.pool.disown(owned)
        else:
            self.pool.free(owned)
        del req.block_ids[req.num_borrowed_blocks :]
        self.swapped_kv[req.request_id] = SwappedKV(list(host_block_ids), req.num_computed_tokens)
        req.num_computed_tokens = req.num_borrowed_blocks * self.block_size
        _insert_by_arrival(self.swapped, req)
        self.stats.swap_outs += 1
        self.stats.swapped_out_blocks += len(owned)

    def swap_out_refused(self, req: Request) -> None:
        """The host tier could not take `req`'s KV (full): recompute it instead."""
        self.swapping_out.remove(req)
        self.stats.swap_fallbacks += 1
        self._recompute(req)

    def take_swap_in_blocks(self, req: Request) -> list[int]:
        """The host tier's owner places the KV itself (the MemPool daemon's swap_in picks
        the device blocks): the blocks reserved for `req` leave the pool, for the caller to
        give back, and `swap_in_done` gets the daemon's blocks."""
        reserved = req.owned_block_ids
        self.pool.disown(reserved)
        del req.block_ids[req.num_borrowed_blocks :]
        return reserved

    def swap_in_done(self, req: Request, block_ids: list[int] | None = None) -> None:
        """`req`'s KV is back on the device: in its reserved blocks, or in `block_ids`
        (which join the pool as allocated) after `take_swap_in_blocks`. It runs again."""
        kv = self.swapped_kv[req.request_id]
        if block_ids is not None:
            if req.owned_block_ids:
                raise ValueError("swap_in_done with new blocks, but the reserved ones are kept")
            self.pool.claim(block_ids)
            req.block_ids.extend(block_ids)
        if len(req.owned_block_ids) != len(kv.host_block_ids):
            raise ValueError(
                f"{len(kv.host_block_ids)} blocks swapped in into {len(req.owned_block_ids)}"
            )
        self.swapping_in.remove(req)
        del self.swapped_kv[req.request_id]
        req.num_computed_tokens = kv.num_computed_tokens
        req.status = RequestStatus.RUNNING
        _insert_by_arrival(self.running, req)
        self.stats.swap_ins += 1
        self.stats.swapped_in_blocks += len(kv.host_block_ids)

    def swap_in_refused(self, req: Request) -> None:
        """No device memory for `req`'s KV after all: it stays swapped (its reserved blocks,
        if still held, go back to the pool) and comes back later."""
        self.swapping_in.remove(req)
        self.release_owned(req)
        _insert_by_arrival(self.swapped, req)

    # ----------------------------------------------------------------- leaving
    def release_owned(self, req: Request) -> None:
        owned = req.owned_block_ids
        if owned:
            self.pool.free(owned)
        del req.block_ids[req.num_borrowed_blocks :]

    def remove(self, req: Request) -> None:
        """Take a finished or aborted request out of the queues (its blocks are handled by
        the caller). A request leaving while swapped leaves its host blocks in
        `host_garbage`, and one leaving mid swap-in its reserved blocks (holding nothing)
        in the pool."""
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        elif req in self.swapping_out:
            self.swapping_out.remove(req)
        elif req in self.swapped:
            self.swapped.remove(req)
        elif req in self.swapping_in:
            self.swapping_in.remove(req)
            self.release_owned(req)
        kv = self.swapped_kv.pop(req.request_id, None)
        if kv is not None:
            self.host_garbage.extend(kv.host_block_ids)


def _insert_by_arrival(queue: MutableSequence[Request], req: Request) -> None:
    """FCFS: keep `queue` in arrival order (requests that arrived together keep theirs)."""
    i = bisect.bisect_right([r.arrival_s for r in queue], req.arrival_s)
    queue.insert(i, req)
