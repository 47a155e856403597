"""Continuous batching: which requests run in the next step, and how many tokens each.

One step has a token budget (`max_num_batched_tokens`) shared by decodes and prefill
chunks. Running requests come first, in arrival order; each takes the tokens it still has
to compute, cut to what is left of the budget (chunked prefill). Then waiting requests are
admitted in FIFO order while the budget, `max_num_seqs` and the free blocks allow; the head
of the queue is never skipped, so a long prompt cannot starve.

Blocks are allocated for exactly the tokens scheduled (`can_allocate` before `allocate`,
so nothing is half-allocated). When a running request needs a block and none is free, the
most recently admitted request is preempted by recompute: its owned blocks go back to the
pool, its computed count falls back to the borrowed prefix, and it waits at the head of the
queue to be recomputed later with the same tokens.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from services.worker.block_pool import BlockPool
from services.worker.request import Request, RequestStatus


@dataclass
class ScheduledChunk:
    request: Request
    num_tokens: int


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)


class Scheduler:
    def __init__(
        self, pool: BlockPool, block_size: int, max_num_seqs: int, max_num_batched_tokens: int
    ):
        self.pool = pool
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    def add(self, request: Request, *, front: bool = False) -> None:
        """Queue a request; `front`: ahead of every waiting one (a request that arrives
        holding its KV must not wait behind one that cannot get memory, or its blocks
        would be held by a request that cannot run)."""
        if front:
            self.waiting.appendleft(request)
        else:
            self.waiting.append(request)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def blocks_needed(self, request: Request, num_tokens: int) -> int:
        return -(-(request.num_computed_tokens + num_tokens) // self.block_size) - len(
            request.block_ids
        )

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            need = self.blocks_needed(req, n)
            while not self.pool.can_allocate(need):
                victim = self.running.pop()
                self.preempt(victim)
                out.preempted.append(victim)
                if victim is req:
                    break
            if req.status != RequestStatus.RUNNING:
                break
            if need > 0:
                req.block_ids.extend(self.pool.allocate(need))
            out.chunks.append(ScheduledChunk(req, n))
            budget -= n
            i += 1
        # Admit only when nothing was preempted this step: a freshly preempted request
        # waits at the head and must not be overtaken by a newcomer.
        while (
            self.waiting
            and budget > 0
            and len(self.running) < self.max_num_seqs
            and not out.preempted
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
        seats = self.max_num_seqs - len(self.running)
        for req in self.waiting:
            if budget <= 0 or seats <= 0:
                break
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            need += max(0, self.blocks_needed(req, n))
            budget -= n
            seats -= 1
        return need

    def preempt(self, req: Request) -> None:
        self.release_owned(req)
        req.num_computed_tokens = min(
            req.num_computed_tokens, req.num_borrowed_blocks * self.block_size
        )
        req.status = RequestStatus.PREEMPTED
        req.num_preemptions += 1
        self.waiting.appendleft(req)

    def release_owned(self, req: Request) -> None:
        owned = req.owned_block_ids
        if owned:
            self.pool.free(owned)
        del req.block_ids[req.num_borrowed_blocks :]

    def remove(self, req: Request) -> None:
        """Take a finished or aborted request out of the queues (its blocks are handled by the caller)."""
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
