"""The requests the pool core answers alone (memory and index), wire types in and out,
and the wire -> core conversions every handler shares (tiers, token bytes, tree events).
No socket and no await here: each handler is one synchronous call into `MemPool`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from common.errors import ErrorKind
from common.protocol import kv_events as ev
from common.protocol import mempool as mp
from services.mempool.budget import BudgetError, MemoryBudget
from services.mempool.pool import MemPool, MemPoolError
from services.mempool.prompt_tree import Tier, TreeEvent
from services.mempool.region import ShmRegion

if TYPE_CHECKING:
    from services.mempool.cuda_region import CudaRegion


class PoolRequests:
    def __init__(
        self,
        pool: MemPool,
        device: ShmRegion | CudaRegion,
        *,
        prefault: bool,
        budget: MemoryBudget | None = None,
    ) -> None:
        self.pool = pool
        self.device = device
        self.prefault = prefault
        self.budget = budget  # None: no budget, capacity as configured
        self._reported_params = 0  # without a budget: the worker's report, for display only

    @property
    def param_bytes(self) -> int:
        return self.budget.param_bytes if self.budget else self._reported_params

    def alloc_mem(self, req: mp.AllocMem) -> mp.Blocks:
        return mp.Blocks(self.pool.alloc_mem(req.n, parse_tier(req.tier), req.owner))

    def free_mem(self, req: mp.FreeMem) -> mp.Ok:
        self.pool.free_mem(req.block_ids, parse_tier(req.tier))  # refuses blocks in transfer
        return mp.Ok(len(req.block_ids))

    def swap_out(self, req: mp.SwapOut) -> mp.Blocks | mp.Ok:
        if req.block_ids:
            return mp.Blocks(self.pool.swap_out(req.block_ids))
        if self.pool.alloc[Tier.HOST].capacity == 0:
            raise MemPoolError("swap_out(n): this daemon has no host tier", kind=ErrorKind.REFUSED)
        return mp.Ok(self.pool.evict(req.n, Tier.DEVICE, demote_only=True))

    def swap_in(self, req: mp.SwapIn) -> mp.Blocks:
        return mp.Blocks(self.pool.swap_in(req.block_ids))

    def insert(self, req: mp.Insert) -> mp.Inserted:
        r = self.pool.insert(
            parse_tokens(req.tokens),
            req.block_ids,
            parse_tier(req.tier),
            pin_owner=req.pin_owner or None,
        )
        return mp.Inserted(
            num_indexed_tokens=r.num_indexed_tokens,
            index_block_ids=r.index_block_ids,
            freed_block_ids=r.freed_block_ids,
            handle=r.handle,
        )

    def match(self, req: mp.Match) -> mp.Matched:
        cap = None if req.max_tokens < 0 else req.max_tokens
        m = self.pool.match(parse_tokens(req.tokens), req.owner, req.promote, cap)
        return mp.Matched(
            handle=m.handle,
            num_tokens=m.num_tokens,
            block_ids=m.block_ids,
            tiers=[int(t) for t in m.tiers],
        )

    def release(self, req: mp.Release) -> mp.Ok:
        self.pool.release(req.handle)
        return mp.Ok()

    def delete(self, req: mp.Delete) -> mp.Ok:
        return mp.Ok(self.pool.delete(parse_tokens(req.tokens)))

    def evict(self, req: mp.Evict) -> mp.Ok:
        return mp.Ok(self.pool.evict(req.n, parse_tier(req.tier)))

    def grow(self, req: mp.Grow) -> mp.Ok:
        if self.budget is not None and (why := self.budget.check(req.device_blocks)):
            raise BudgetError(f"grow to {req.device_blocks} blocks refused: {why}")
        self.grow_to(req.device_blocks)
        return mp.Ok(req.device_blocks)

    def set_params(self, req: mp.SetParams) -> mp.BudgetReply:
        """The worker's parameter bytes: with a budget, the KV capacity grows to what fits
        beside them (a report that does not fit is refused by `MemoryBudget`, unchanged)."""
        if self.budget is None:
            if req.nbytes < 0:
                raise BudgetError(
                    f"parameter bytes must be >= 0, got {req.nbytes}", kind=ErrorKind.BAD_REQUEST
                )
            self._reported_params = req.nbytes
        else:
            current = self.pool.alloc[Tier.DEVICE].capacity
            capacity = self.budget.set_params(req.nbytes, current)
            if capacity > current:
                self.grow_to(capacity)
        return self.budget_state()

    def budget_state(self) -> mp.BudgetReply:
        return mp.BudgetReply(
            budget_bytes=self.budget.budget if self.budget else 0,
            param_bytes=self.param_bytes,
            device_blocks=self.pool.alloc[Tier.DEVICE].capacity,
            block_bytes=self.device.block_bytes,
        )

    def check_budget(self) -> str:
        """Invariant M over the pool's device capacity: "" if it holds (or no budget)."""
        if self.budget is None:
            return ""
        return self.budget.check(self.pool.alloc[Tier.DEVICE].capacity)

    def grow_to(self, n: int) -> None:
        """Device capacity `n` (current units) in the pool, then in the region, committing
        the new range (`populate`) when the daemon prefaults. The region's capacity never
        goes down (after a shrink or a merge it may be above the pool's): only a range it
        did not cover yet is new."""
        self.pool.grow(n)  # first: it refuses a bad size before anything changes
        old = self.device.capacity_blocks
        if n > old:
            self.device.grow(n)
            if self.prefault:
                self.device.populate(old, n - old)

    def release_owner(self, req: mp.ReleaseOwner) -> mp.Ok:
        return mp.Ok(self.pool.release_owner(req.owner))

    def chown(self, req: mp.Chown) -> mp.Ok:
        return mp.Ok(self.pool.chown(req.block_ids, req.owner, expect=req.expect))


def parse_tier(value: int) -> Tier:
    try:
        return Tier(value)
    except ValueError:
        raise MemPoolError(
            f"unknown tier {value} (0 = device, 1 = host)", kind=ErrorKind.BAD_REQUEST
        ) from None


def parse_tokens(data: bytes) -> bytes:
    if len(data) % 4:
        raise MemPoolError(
            f"token bytes of length {len(data)} are not whole int32 tokens",
            kind=ErrorKind.BAD_REQUEST,
        )
    return bytes(data)


def wire_event(e: TreeEvent) -> ev.KvEvent:
    if e.stored:
        return ev.BlockStored(int(e.tier), e.parent_hash, e.hashes, e.token_bytes)
    return ev.BlockRemoved(int(e.tier), e.hashes)
