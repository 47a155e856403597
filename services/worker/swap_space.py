"""A standalone engine's host tier for preemption by swap: a host tensor of KV blocks.

    KVCache (device)  --swap_out(block ids)-->  HostSwapSpace  (host block ids)
                      <--swap_in(host ids, block ids)--

A worker has none: its MemPool daemon's host tier plays this part (SwapOut / SwapIn RPCs,
services/worker/mempool_engine.py). Blocks are copied whole, in the cache's layout, so a
block swapped out and in again holds the same bytes. The tensor is allocated on the first
swap-out (an engine that never preempts pays nothing); on a CUDA engine it is pinned.

Invariant: every host block is free or holds exactly one swapped request's block
(`num_used` counts them; the engine's `check_integrity` matches them to its requests).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from services.worker.block_pool import BlockPool
from services.worker.kv_cache import KVCache, KVLayout


class SwapSpaceFull(RuntimeError):
    pass


class HostSwapSpace:
    def __init__(self, layout: KVLayout, num_blocks: int):
        self.layout = layout
        self.num_blocks = num_blocks
        self._pool = BlockPool(num_blocks)
        self._tensor: torch.Tensor | None = None

    @property
    def num_used(self) -> int:
        return self._pool.num_allocated

    def _host(self, like: torch.Tensor) -> torch.Tensor:
        if self._tensor is None:
            pin = like.device.type == "cuda"
            self._tensor = torch.empty(
                (self.num_blocks, *self.layout.block_shape),
                dtype=self.layout.dtype,
                pin_memory=pin,
            )
        return self._tensor

    def swap_out(self, cache: KVCache, block_ids: Sequence[int]) -> list[int]:
        """Copy device blocks to new host blocks (returned in the same order); raises
        `SwapSpaceFull`, nothing changed, when they do not fit."""
        if not self._pool.can_allocate(len(block_ids)):
            raise SwapSpaceFull(
                f"host swap space: {len(block_ids)} blocks asked, {self._pool.num_free} free"
            )
        host_ids = self._pool.allocate(len(block_ids))
        src = torch.tensor(list(block_ids), dtype=torch.long, device=cache.tensor.device)
        self._host(cache.tensor)[torch.tensor(host_ids, dtype=torch.long)] = cache.tensor[src].cpu()
        return host_ids

    def swap_in(self, cache: KVCache, host_ids: Sequence[int], block_ids: Sequence[int]) -> None:
        """Copy host blocks into device blocks (same order) and free the host blocks."""
        if len(host_ids) != len(block_ids):
            raise ValueError(f"{len(host_ids)} host blocks into {len(block_ids)} device blocks")
        dst = torch.tensor(list(block_ids), dtype=torch.long, device=cache.tensor.device)
        rows = self._host(cache.tensor)[torch.tensor(list(host_ids), dtype=torch.long)]
        cache.tensor[dst] = rows.to(cache.tensor.device)
        self._pool.free(host_ids)

    def free(self, host_ids: Sequence[int]) -> None:
        self._pool.free(host_ids)
