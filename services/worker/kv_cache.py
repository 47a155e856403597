"""Paged KV cache in the aggregated block layout.

    cache: [num_blocks, num_layers, 2, block_size, kv_heads, head_dim]
                        |           |
                        |           +-- 0 = K, 1 = V
                        +-- layers held by this instance (a pipeline stage holds a range)

One block is one contiguous buffer holding K and V of `block_size` tokens for every layer
(MemServe's "huge page"): moving a block, or a run of consecutive blocks, is one copy.
Because the layer axis sits inside the block, a block of L layers is also g contiguous
blocks of L/g layers: `split_blocks` reinterprets the same memory without copying, block b
layer-group j becoming block b*g + j (KunServe lends memory this way).

The tensor may live on memory the engine does not own (a shared-memory segment or a CUDA
IPC mapping created by the MemPool daemon): `KVCache.from_buffer` wraps it in place.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from common.kv_geometry import KVGeometry
from common.model.config import ModelConfig


@dataclass(frozen=True)
class KVLayout:
    num_layers: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @classmethod
    def for_model(
        cls, cfg: ModelConfig, block_size: int, dtype: torch.dtype, num_layers: int | None = None
    ) -> KVLayout:
        return cls(
            num_layers=cfg.num_layers if num_layers is None else num_layers,
            block_size=block_size,
            num_kv_heads=cfg.num_kv_heads,
            head_dim=cfg.head_dim,
            dtype=dtype,
        )

    @property
    def geometry(self) -> KVGeometry:
        name = str(self.dtype).removeprefix("torch.")
        return KVGeometry(self.num_layers, self.block_size, self.num_kv_heads, self.head_dim, name)

    @property
    def block_shape(self) -> tuple[int, int, int, int, int]:
        return self.geometry.block_shape

    @property
    def bytes_per_block(self) -> int:
        return self.geometry.block_bytes

    def num_blocks_for(self, memory_bytes: int) -> int:
        return memory_bytes // self.bytes_per_block


class KVCache:
    """The paged KV tensor of one instance plus views per layer."""

    def __init__(self, layout: KVLayout, tensor: torch.Tensor):
        expected = (tensor.shape[0], *layout.block_shape)
        if tuple(tensor.shape) != expected or tensor.dtype != layout.dtype:
            raise ValueError(
                f"KV tensor {tuple(tensor.shape)}/{tensor.dtype} does not match layout {expected}"
            )
        if not tensor.is_contiguous():
            raise ValueError("KV tensor must be contiguous (one block = one buffer)")
        self.layout = layout
        self._tensor = tensor
        # Per-layer (K, V) views, made on first use: slicing them anew cost ~12 us a layer
        # every step (a third of a millisecond a step on a 30-layer model).
        self._layers: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * layout.num_layers

    @property
    def tensor(self) -> torch.Tensor:
        """The whole cache, [num_blocks, *layout.block_shape]; fixed for the object's life
        (a reinterpretation, like split_blocks, makes a new KVCache)."""
        return self._tensor

    @classmethod
    def allocate(
        cls, layout: KVLayout, num_blocks: int, device: torch.device | str = "cpu"
    ) -> KVCache:
        tensor = torch.zeros((num_blocks, *layout.block_shape), dtype=layout.dtype, device=device)
        return cls(layout, tensor)

    @classmethod
    def from_buffer(
        cls, layout: KVLayout, buffer: memoryview | bytearray, num_blocks: int | None = None
    ) -> KVCache:
        """Wrap host memory owned by someone else (e.g. `SharedMemory.buf`) without copying."""
        return cls.from_bytes(layout, torch.frombuffer(buffer, dtype=torch.uint8), num_blocks)

    @classmethod
    def from_bytes(
        cls, layout: KVLayout, data: torch.Tensor, num_blocks: int | None = None
    ) -> KVCache:
        """Wrap a 1-D uint8 tensor owned by someone else without copying: host memory, or
        device memory mapped through a CUDA IPC handle (the cache lives on its device)."""
        if data.dtype != torch.uint8 or data.dim() != 1 or not data.is_contiguous():
            raise ValueError("KV bytes must be a contiguous 1-D uint8 tensor")
        capacity = data.numel() // layout.bytes_per_block
        n = capacity if num_blocks is None else num_blocks
        if n > capacity or n <= 0:
            raise ValueError(
                f"buffer of {data.numel()} bytes holds {capacity} blocks, asked for {n}"
            )
        flat = data[: n * layout.bytes_per_block].view(layout.dtype)
        return cls(layout, flat.view(n, *layout.block_shape))

    @property
    def num_blocks(self) -> int:
        return int(self.tensor.shape[0])

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(K, V) views of one local layer, each [num_blocks, block_size, kv_heads, head_dim]."""
        views = self._layers[index]
        if views is None:
            views = self._layers[index] = (self._tensor[:, index, 0], self._tensor[:, index, 1])
        return views


def split_blocks(cache: KVCache, groups: int) -> KVCache:
    """Reinterpret blocks of L layers as `groups` times as many blocks of L/groups layers."""
    layers = cache.layout.num_layers
    if groups <= 0 or layers % groups:
        raise ValueError(f"cannot split {layers} layers into {groups} groups")
    layout = KVLayout(
        num_layers=layers // groups,
        block_size=cache.layout.block_size,
        num_kv_heads=cache.layout.num_kv_heads,
        head_dim=cache.layout.head_dim,
        dtype=cache.layout.dtype,
    )
    return KVCache(layout, cache.tensor.view(cache.num_blocks * groups, *layout.block_shape))


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
