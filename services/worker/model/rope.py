"""Rotary position embedding, computed exactly as transformers' rope init functions.

The cos/sin tables are precomputed for every position up to the context length; since
`outer(positions, inv_freq)` is the same product transformers forms at run time, the
values are bit-identical to the reference.
"""

from __future__ import annotations

import math

import torch

from common.model.config import ModelConfig


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    dim = cfg.head_dim
    r = cfg.rope
    inv = 1.0 / (r.theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if r.rope_type == "linear":
        inv = inv / r.factor
    elif r.rope_type == "llama3":
        low_wavelen = r.original_max_position_embeddings / r.low_freq_factor
        high_wavelen = r.original_max_position_embeddings / r.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / r.factor, inv)
        smooth = (r.original_max_position_embeddings / wavelen - r.low_freq_factor) / (
            r.high_freq_factor - r.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / r.factor + smooth * scaled
        is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv = torch.where(is_medium, smoothed, scaled)
    return inv


class RotaryEmbedding:
    """Holds `cos`/`sin` tables of shape [max_positions, head_dim] in the model dtype (applied
    by the model's ops: services/worker/kernels/ops.py)."""

    def __init__(
        self, cfg: ModelConfig, max_positions: int, dtype: torch.dtype, device: torch.device
    ):
        inv = rope_inv_freq(cfg)
        pos = torch.arange(max_positions, dtype=torch.float32)
        freqs = torch.outer(pos, inv)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos = emb.cos().to(dtype=dtype, device=device)
        self.sin = emb.sin().to(dtype=dtype, device=device)
