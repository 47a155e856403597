"""The Llama family (Llama 2/3, Mistral, Qwen2) over a paged KV cache.

Computes what transformers' LlamaForCausalLM / MistralForCausalLM / Qwen2ForCausalLM
compute, on a flat batch of tokens from many requests. q/k/v and gate/up projections are
stored fused (one matmul each); the loader concatenates the checkpoint's tensors.

A model instance holds a contiguous range of decoder layers [first_layer, last_layer):
the first stage embeds tokens, the last applies the final norm and the lm_head, and any
stage maps hidden states to hidden states, so one model can be split across instances.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from common.model.config import ModelConfig
from services.worker.attention import AttentionMetadata, paged_attention
from services.worker.kv_cache import KVCache
from services.worker.model.rope import RotaryEmbedding

Rope = tuple[torch.Tensor, torch.Tensor]  # cos, sin of a step's positions


def _param(*shape: int, dtype: torch.dtype, device: torch.device) -> nn.Parameter:
    # Uninitialised: every parameter is overwritten by the loader.
    return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.weight = _param(size, dtype=dtype, device=device)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # In float32 like transformers, cast back before the weight multiply.
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class Attention(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        local_index: int,
        window: int | None,
        dtype: torch.dtype,
        device: torch.device,
    ):
        super().__init__()
        self.cfg = cfg
        self.local_index = local_index
        self.window = window
        self.scale = cfg.head_dim**-0.5
        qkv = cfg.q_size + 2 * cfg.kv_size
        self.qkv_weight = _param(qkv, cfg.hidden_size, dtype=dtype, device=device)
        self.qkv_bias = _param(qkv, dtype=dtype, device=device) if cfg.qkv_bias else None
        self.o_weight = _param(cfg.hidden_size, cfg.q_size, dtype=dtype, device=device)
        self.o_bias = _param(cfg.hidden_size, dtype=dtype, device=device) if cfg.o_bias else None

    def forward(
        self, x: torch.Tensor, rope: Rope, meta: AttentionMetadata, cache: KVCache
    ) -> torch.Tensor:
        cfg = self.cfg
        t = x.shape[0]
        qkv = F.linear(x, self.qkv_weight, self.qkv_bias)
        q, k, v = qkv.split((cfg.q_size, cfg.kv_size, cfg.kv_size), dim=-1)
        q = q.view(t, cfg.num_heads, cfg.head_dim)
        k = k.view(t, cfg.num_kv_heads, cfg.head_dim)
        v = v.view(t, cfg.num_kv_heads, cfg.head_dim)
        q, k = RotaryEmbedding.apply(q, k, *rope)
        out = paged_attention(q, k, v, cache, self.local_index, meta, self.scale, self.window)
        return F.linear(out.reshape(t, cfg.q_size), self.o_weight, self.o_bias)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device):
        super().__init__()
        i = cfg.intermediate_size
        self.intermediate = i
        self.gate_up_weight = _param(2 * i, cfg.hidden_size, dtype=dtype, device=device)
        self.gate_up_bias = _param(2 * i, dtype=dtype, device=device) if cfg.mlp_bias else None
        self.down_weight = _param(cfg.hidden_size, i, dtype=dtype, device=device)
        self.down_bias = (
            _param(cfg.hidden_size, dtype=dtype, device=device) if cfg.mlp_bias else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(x, self.gate_up_weight, self.gate_up_bias).split(
            self.intermediate, dim=-1
        )
        return F.linear(F.silu(gate) * up, self.down_weight, self.down_bias)


class DecoderLayer(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        layer: int,
        local_index: int,
        dtype: torch.dtype,
        device: torch.device,
    ):
        super().__init__()
        window = cfg.sliding_windows[layer] if cfg.sliding_windows else None
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        self.self_attn = Attention(cfg, local_index, window, dtype, device)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        self.mlp = MLP(cfg, dtype, device)

    def forward(
        self, h: torch.Tensor, rope: Rope, meta: AttentionMetadata, cache: KVCache
    ) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), rope, meta, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class LlamaModel(nn.Module):
    """Decoder layers [first_layer, last_layer) of a Llama-family model; see module docstring."""

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        first_layer: int = 0,
        last_layer: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        max_positions: int | None = None,
    ):
        super().__init__()
        last = cfg.num_layers if last_layer is None else last_layer
        if not 0 <= first_layer < last <= cfg.num_layers:
            raise ValueError(f"layer range [{first_layer}, {last}) outside [0, {cfg.num_layers})")
        dev = torch.device(device)
        self.cfg = cfg
        self.dtype = dtype
        self.device = dev
        self.first_layer = first_layer
        self.last_layer = last
        self.is_first = first_layer == 0
        self.is_last = last == cfg.num_layers
        needs_embed = self.is_first or (self.is_last and cfg.tie_word_embeddings)
        self.embed_tokens = (
            _param(cfg.vocab_size, cfg.hidden_size, dtype=dtype, device=dev)
            if needs_embed
            else None
        )
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, i, i - first_layer, dtype, dev) for i in range(first_layer, last)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, dev) if self.is_last else None
        untied_head = self.is_last and not cfg.tie_word_embeddings
        self.lm_head = (
            _param(cfg.vocab_size, cfg.hidden_size, dtype=dtype, device=dev)
            if untied_head
            else None
        )
        self.rope = RotaryEmbedding(cfg, max_positions or cfg.max_position_embeddings, dtype, dev)

    @property
    def num_local_layers(self) -> int:
        return self.last_layer - self.first_layer

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        if not self.is_first or self.embed_tokens is None:
            raise RuntimeError("only the first stage embeds tokens")
        return F.embedding(token_ids, self.embed_tokens)

    def forward(
        self, hidden: torch.Tensor, meta: AttentionMetadata, cache: KVCache
    ) -> torch.Tensor:
        """Runs the local layers: hidden [T, hidden_size] -> [T, hidden_size]."""
        rope = self.rope.lookup(meta.positions)
        for layer in self.layers:
            hidden = layer(hidden, rope, meta, cache)
        return hidden

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.norm is None:
            raise RuntimeError("only the last stage computes logits")
        head = self.embed_tokens if self.lm_head is None else self.lm_head
        assert head is not None
        return F.linear(self.norm(hidden), head)

    def param_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.parameters())


def param_bytes_per_layer(cfg: ModelConfig, dtype: torch.dtype) -> int:
    return cfg.layer_param_count() * torch.empty((), dtype=dtype).element_size()
