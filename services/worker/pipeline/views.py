"""A member's KV memory seen as full blocks (all L layers) or as sub-blocks (L/g layers).

The bytes are the daemon's region (a 1-D uint8 tensor over shm or device memory); only
the view changes when a group forms or dissolves, never the data: full block b is
sub-blocks b*g .. b*g+g-1 (`services/worker/kv_cache.py:split_blocks`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from services.worker.kv_cache import KVCache, KVLayout


def sub_layout(full: KVLayout, g: int) -> KVLayout:
    if g < 1 or full.num_layers % g:
        raise ValueError(f"cannot split {full.num_layers} layers into {g} groups")
    return KVLayout(
        full.num_layers // g, full.block_size, full.num_kv_heads, full.head_dim, full.dtype
    )


def kv_view(
    raw: torch.Tensor, full: KVLayout, g: int = 1, num_blocks: int | None = None
) -> KVCache:
    """The first `num_blocks` blocks (default: all) of `raw` in the layout of 1/g of the
    layers (g = 1: full blocks)."""
    layout = sub_layout(full, g)
    n = raw.numel() // layout.bytes_per_block if num_blocks is None else num_blocks
    return KVCache.from_bytes(layout, raw, n)


def copy_sub_blocks(cache: KVCache, copies: Sequence[tuple[int, int]]) -> None:
    """Local moves inside one member's KV (src, dst sub-block ids), in order."""
    for src, dst in copies:
        cache.tensor[dst].copy_(cache.tensor[src])
