"""The leader's scheduler: g microbatches, each a `Scheduler` over one shared pool.

A request stays in one microbatch for life (its chunks are in flight at most once at a
time: the leader schedules microbatch `mb` only after `mb`'s previous batch came back).
New requests join the microbatch with the fewest tokens to hold (the paper's lookahead
batching predicts cost; token count is the v1 stand-in). Preemption stays inside a
microbatch: a victim is never a request whose batch is in flight.

Exposes what the engine and the async shell read of a `Scheduler` (`running`, `waiting`,
`add`, `remove`, `release_owned`, `demand`, `has_work`).
"""

from __future__ import annotations

from collections import deque

from services.worker.block_pool import BlockPool
from services.worker.request import Request
from services.worker.scheduler import Scheduler


class MicrobatchScheduler:
    def __init__(
        self, pool: BlockPool, block_size: int, g: int, max_num_seqs: int, max_tokens: int
    ):
        self.pool = pool
        self.block_size = block_size
        self.parts = [Scheduler(pool, block_size, max_num_seqs, max_tokens) for _ in range(g)]
        self._part_of: dict[str, int] = {}

    @property
    def running(self) -> list[Request]:
        return [r for p in self.parts for r in p.running]

    @property
    def waiting(self) -> deque[Request]:
        return deque(r for p in self.parts for r in p.waiting)

    def _tokens(self, part: Scheduler) -> int:
        return sum(r.num_tokens for r in part.running) + sum(r.num_tokens for r in part.waiting)

    def add(self, request: Request, *, front: bool = False) -> None:
        i = min(range(len(self.parts)), key=lambda k: (self._tokens(self.parts[k]), k))
        self._part_of[request.request_id] = i
        self.parts[i].add(request, front=front)

    def remove(self, request: Request) -> None:
        i = self._part_of.pop(request.request_id, None)
        if i is not None:
            self.parts[i].remove(request)

    def release_owned(self, request: Request) -> None:
        self.parts[0].release_owned(request)

    def has_work(self) -> bool:
        return any(p.has_work() for p in self.parts)

    def demand(self) -> int:
        return sum(p.demand() for p in self.parts)
