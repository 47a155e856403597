"""Attention over the paged KV cache.

A step's tokens are laid out flat, decodes first, then one span per prefill chunk:

    tokens: [ d0 d1 ... d(D-1) | p0: q_len tokens | p1: q_len tokens | ... ]

Attention runs through the step's ops (kernels/ops.py). Decodes (one query token each):
this machine's kernel reads each sequence's KV blocks in place; the torch code runs one
batched SDPA over keys gathered from the block tables and padded to the longest context.
Each prefill chunk runs on its own, causal with the offset of the tokens already in the
cache (chunked prefill, cached prefixes): the kernel on GEMM tiles, the torch code SDPA. A
chunk with nothing cached attends only to its own fresh K/V, so it skips the gather.

On CUDA, xformers' memory_efficient_attention serves fresh prefill chunks when it imports;
everything else uses torch's scaled_dot_product_attention, which also has CUDA kernels.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from services.worker.kernels.ops import TorchOps, gather_blocks
from services.worker.kv_cache import KVCache

try:  # optional, CUDA only: xformers has no CPU kernels
    from xformers.ops import fmha as _xformers_fmha
except Exception:  # pragma: no cover - depends on the machine
    _xformers_fmha = None


@dataclass
class PrefillSpan:
    """One request's chunk: `q_len` new tokens at positions [ctx_len - q_len, ctx_len)."""

    q_start: int
    q_len: int
    ctx_len: int
    block_ids: torch.Tensor  # [ceil(ctx_len / block_size)] int64


@dataclass
class AttentionMetadata:
    slot_blocks: torch.Tensor  # [T] block id that receives each token's K/V
    slot_offsets: torch.Tensor  # [T] offset inside that block
    positions: torch.Tensor  # [T]
    num_decodes: int = 0
    decode_block_tables: torch.Tensor | None = None  # [D, max_blocks]
    decode_ctx_lens: torch.Tensor | None = None  # [D]
    prefills: list[PrefillSpan] = field(default_factory=list)
    _decode_masks: dict[int | None, torch.Tensor] = field(default_factory=dict)

    def decode_mask(self, block_size: int, window: int | None) -> torch.Tensor:
        """[D, 1, 1, max_blocks*block_size] bool, True where a key is visible; cached per window."""
        mask = self._decode_masks.get(window)
        if mask is None:
            assert self.decode_block_tables is not None and self.decode_ctx_lens is not None
            max_len = self.decode_block_tables.shape[1] * block_size
            keys = torch.arange(max_len, device=self.decode_ctx_lens.device)
            lens = self.decode_ctx_lens.unsqueeze(1)
            mask = keys.unsqueeze(0) < lens
            if window is not None:
                mask &= keys.unsqueeze(0) > lens - 1 - window
            mask = mask[:, None, None, :]
            self._decode_masks[window] = mask
        return mask


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cache: KVCache,
    layer: int,
    meta: AttentionMetadata,
    scale: float,
    window: int | None,
    ops: TorchOps,
) -> torch.Tensor:
    """q: [T, Hq, D]; k, v: [T, Hkv, D] for the new tokens. Writes k/v into the cache, returns
    [T, Hq, D]. `ops` does the cache write and the decodes' attention (kernels/ops.py)."""
    k_cache, v_cache = cache.layer(layer)
    ops.write_kv(k_cache, v_cache, k, v, meta)
    block_size = cache.layout.block_size
    nd = meta.num_decodes
    if nd and not meta.prefills:
        return ops.decode_attention(q, k_cache, v_cache, meta, scale, window)
    out = torch.empty_like(q)
    if nd:
        out[:nd] = ops.decode_attention(q[:nd], k_cache, v_cache, meta, scale, window)
    for span in meta.prefills:
        s, e = span.q_start, span.q_start + span.q_len
        _prefill_span(
            q[s:e], k[s:e], v[s:e], k_cache, v_cache, span, block_size, scale, window, ops, out[s:e]
        )
    return out


def _prefill_span(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    span: PrefillSpan,
    block_size: int,
    scale: float,
    window: int | None,
    ops: TorchOps,
    out: torch.Tensor,
) -> None:
    """The span's attention into `out` (its rows of the step's output)."""
    fresh = span.ctx_len == span.q_len
    if fresh:
        keys, values = k, v
    else:
        keys = gather_blocks(k_cache, span.block_ids.unsqueeze(0))[0, : span.ctx_len]
        values = gather_blocks(v_cache, span.block_ids.unsqueeze(0))[0, : span.ctx_len]
    if fresh and window is None and _xformers_fmha is not None and q.is_cuda:
        out.copy_(_xformers_causal(q, keys, values, scale))
    else:
        ops.prefill_attention(q, keys, values, scale, window, out)


def _xformers_causal(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> torch.Tensor:
    """Causal attention of one fresh chunk with xformers ([T, H, D] tensors; GQA by expansion)."""
    assert _xformers_fmha is not None
    group = q.shape[1] // k.shape[1]
    t, hkv, d = k.shape
    # xformers takes [B, M, G, H, D] for grouped-query attention.
    qx = q.view(1, t, hkv, group, d)
    kx = k.view(1, t, hkv, 1, d).expand(1, t, hkv, group, d)
    vx = v.view(1, t, hkv, 1, d).expand(1, t, hkv, group, d)
    bias = _xformers_fmha.attn_bias.LowerTriangularMask()
    out = _xformers_fmha.memory_efficient_attention_forward(qx, kx, vx, attn_bias=bias, scale=scale)
    return out.reshape(t, hkv * group, d)
