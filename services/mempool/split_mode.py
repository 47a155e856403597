"""KunServe split mode over the wire: `Split`, `Merge`, `Shrink` (design/kunserve-plan.md §4.5).

    Split(g):  pool.split(g)  ->  region.set_split(g), budget.set_split(g)  ->  grow into B
    Merge:     pool.merge()   ->  region.set_split(1), budget.set_split(1)
    Shrink(t): pool.shrink(t) (the ceiling; live ids above it are reported)

The pool decides (it refuses with nothing changed); only then do the region and the budget
follow, so the three always agree on the split factor: the region's `block_bytes` is
`whole / split`, the pool's ids and capacity and the budget's units are sub-blocks. The
region object is changed in place, so the transports' receivers (which hold it) see the
new geometry at the next PrepareReceive. No socket and no await here.
"""

from __future__ import annotations

from common.errors import ErrorKind
from common.protocol import mempool as mp
from services.mempool.pool import MemPoolError
from services.mempool.pool_requests import PoolRequests
from services.mempool.prompt_tree import Tier


class SplitRequests:
    def __init__(self, requests: PoolRequests, num_layers: int) -> None:
        self.requests = requests
        self.pool = requests.pool
        self.device = requests.device
        self.num_layers = num_layers  # of one whole block: g must divide it

    def split(self, req: mp.Split) -> mp.SplitState:
        g = req.g
        if g < 2 or self.num_layers % g or self.device.block_bytes % g:
            raise MemPoolError(
                f"cannot split into {g}: the split factor must be >= 2 and divide the "
                f"{self.num_layers} layers of a block",
                kind=ErrorKind.BAD_REQUEST,
            )
        if self.pool.split_factor != 1:
            raise MemPoolError(
                f"already split into {self.pool.split_factor}: merge first",
                kind=ErrorKind.REFUSED,
            )
        self.pool.split(g)  # refuses (REFUSED, unchanged) while transfers or pins hold blocks
        self.device.set_split(g)
        budget = self.requests.budget
        if budget is not None:
            budget.set_split(g)
            if req.grow:
                alloc = self.pool.alloc[Tier.DEVICE]
                target = min(budget.kv_capacity_blocks(), alloc.max_blocks)
                if target > alloc.capacity and alloc.ceiling == alloc.capacity:
                    self.requests.grow_to(target)
        return self.state()

    def merge(self, req: mp.Merge) -> mp.SplitState:
        if self.pool.split_factor == 1:
            raise MemPoolError("cannot merge: not split", kind=ErrorKind.REFUSED)
        self.pool.merge()  # refuses (REFUSED, unchanged) unless every aligned run agrees
        self.device.set_split(1)
        if self.requests.budget is not None:
            self.requests.budget.set_split(1)
        return self.state()

    def shrink(self, req: mp.Shrink) -> mp.SplitState:
        self.pool.shrink(req.target)  # refused (nothing changed) above the ceiling
        return self.state()

    def check(self) -> str:
        """The pool, the region and the budget agree on the split factor and the region
        covers the pool's ids: "" if so, else what differs (for `check_integrity`)."""
        alloc = self.pool.alloc[Tier.DEVICE]
        g, region, budget = alloc.split_factor, self.device, self.requests.budget
        if region.split != g or (budget is not None and budget.split != g):
            return (
                f"split factors differ: pool {g}, region {region.split}, "
                f"budget {budget.split if budget else '-'}"
            )
        if region.max_blocks != alloc.max_blocks or region.capacity_blocks < alloc.capacity:
            return (
                f"region of {region.max_blocks} blocks ({region.capacity_blocks} usable) does "
                f"not cover the pool's {alloc.capacity} of {alloc.max_blocks}"
            )
        if budget is not None and region.block_bytes != budget.unit_bytes:
            return (
                f"region blocks of {region.block_bytes} bytes, budget units of {budget.unit_bytes}"
            )
        return ""

    def state(self) -> mp.SplitState:
        alloc = self.pool.alloc[Tier.DEVICE]
        budget = self.requests.budget
        return mp.SplitState(
            split=alloc.split_factor,
            block_bytes=self.device.block_bytes,
            capacity_blocks=alloc.capacity,
            max_blocks=alloc.max_blocks,
            budget_bytes=budget.budget if budget else 0,
            param_bytes=self.requests.param_bytes,
            pending_shrink=self.pool.pending_shrink,
        )
