"""A daemon's memory: the KV device tier, the optional host tier, and the tensor region.

    device tier   shm segment (CPU) or CUDA IPC memory: workers map it and compute in it
    host tier     private host memory: where the pool demotes evicted device blocks
    tensor region shm pages of named tensors (`tensor_store.py`)

The pool core moves blocks between tiers through `copy_blocks`, backed here by the
real regions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from services.mempool.config import MempoolConfig
from services.mempool.prompt_tree import Tier
from services.mempool.region import HostRegion, Region, ShmRegion, copy_blocks
from services.mempool.tensor_store import PAGE_BYTES
from services.mempool.transport import coalesce

if TYPE_CHECKING:
    from services.mempool.cuda_region import CudaRegion


class DaemonMemory:
    def __init__(
        self,
        cfg: MempoolConfig,
        block_bytes: int,
        max_blocks: int,
        device_blocks: int,
        host_blocks: int,
    ):
        self.device = _create_device_region(cfg, block_bytes, max_blocks, device_blocks)
        self.host: Region | None = HostRegion(block_bytes, host_blocks) if host_blocks else None
        self.tensor_pages = cfg.tensor_memory_bytes // PAGE_BYTES
        self.tensor_region = ShmRegion.create(PAGE_BYTES, max(1, self.tensor_pages))

    def copy_blocks(
        self, src: Tier, src_ids: Sequence[int], dst: Tier, dst_ids: Sequence[int]
    ) -> None:
        src_region, dst_region = self.region(src), self.region(dst)
        for run in coalesce(list(src_ids), list(dst_ids)):
            copy_blocks(src_region, run.src_block, dst_region, run.dst_block, run.num_blocks)

    def region(self, tier: Tier) -> Region:
        if tier == Tier.DEVICE:
            return self.device
        assert self.host is not None, "no host tier"
        return self.host

    def close(self) -> None:
        for region in (self.device, self.host, self.tensor_region):
            if region is not None:
                region.close()


def _create_device_region(
    cfg: MempoolConfig, block_bytes: int, max_blocks: int, capacity: int
) -> ShmRegion | CudaRegion:
    """The device tier: a shared-memory segment on CPU, device memory shared by CUDA IPC
    on a GPU (`mempool.device = "cuda:N"`)."""
    if cfg.device == "cpu":
        return ShmRegion.create(block_bytes, max_blocks, capacity, prefault=cfg.prefault)
    from services.mempool.cuda_region import CudaRegion, cuda_available

    if not cuda_available():
        raise ValueError(
            f"mempool.device = {cfg.device!r}, but cupy sees no CUDA device here "
            "(install the `cuda` extra on a GPU machine, or use device = 'cpu')"
        )
    return CudaRegion.create(
        block_bytes,
        max_blocks,
        capacity,
        cfg.device,
        nbytes=device_region_bytes(cfg, block_bytes, max_blocks),
    )


def device_region_bytes(cfg: MempoolConfig, block_bytes: int, max_blocks: int) -> int:
    """Bytes of the device tier's allocation. On a GPU with a budget: B itself, the instance
    arena (kunserve-plan.md §4.4) whose top holds the worker's parameters, one allocation
    that KV and parameters share, so what a drop frees is device memory KV can use. Else
    (or on CPU, where tmpfs commits only touched pages) just the blocks."""
    if cfg.device != "cpu" and cfg.budget_bytes:
        return max(cfg.budget_bytes, block_bytes * max_blocks)
    return block_bytes * max_blocks
