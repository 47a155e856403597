"""The Llama family (Llama 2/3, Mistral, Qwen2) over a paged KV cache.

Computes what transformers' LlamaForCausalLM / MistralForCausalLM / Qwen2ForCausalLM
compute, on a flat batch of tokens from many requests. q/k/v and gate/up projections are
stored fused (one matmul each); the loader concatenates the checkpoint's tensors.

A model instance holds a contiguous range of decoder layers [first_layer, last_layer):
the first stage embeds tokens, the last applies the final norm and the lm_head, and any
stage maps hidden states to hidden states, so one model can be split across instances.

KunServe's parameter drop (design: kunserve-plan.md sections 4.3, 8.2): a loaded model can
give up the layers outside a sub-range, and its embedding / head, at run time
(`drop_layers`), and take them back from its checkpoint folder (`restore_layers`). What a
model can do is decided by what it holds (`has_embed`, `has_head`, the held range), never by
how it was constructed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from common.model.config import ModelConfig
from services.worker.attention import AttentionMetadata, paged_attention
from services.worker.kernels.ops import (
    DecodeLayer,
    HeadShape,
    LayerWeights,
    RopeStep,
    TorchOps,
    select_ops,
)
from services.worker.kv_cache import KVCache
from services.worker.model.checkpoint import Target, checkpoint_names, copy_tensors
from services.worker.model.rope import RotaryEmbedding

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def _param(*shape: int, dtype: torch.dtype, device: torch.device) -> nn.Parameter:
    # Uninitialised: every parameter is overwritten by the loader.
    return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)


class RMSNorm(nn.Module):
    def __init__(
        self, size: int, eps: float, dtype: torch.dtype, device: torch.device, ops: TorchOps
    ):
        super().__init__()
        self.weight = _param(size, dtype=dtype, device=device)
        self.eps = eps
        self.ops = ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.rms_norm(x, self.weight, self.eps)

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """residual += x (in place), then the norm of the new residual."""
        return self.ops.add_rms_norm(x, residual, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        window: int | None,
        dtype: torch.dtype,
        device: torch.device,
        ops: TorchOps,
    ):
        super().__init__()
        self.cfg = cfg
        self.ops = ops
        self.window = window
        self.scale = cfg.head_dim**-0.5
        qkv = cfg.q_size + 2 * cfg.kv_size
        self.qkv_weight = _param(qkv, cfg.hidden_size, dtype=dtype, device=device)
        self.qkv_bias = _param(qkv, dtype=dtype, device=device) if cfg.qkv_bias else None
        self.o_weight = _param(cfg.hidden_size, cfg.q_size, dtype=dtype, device=device)
        self.o_bias = _param(cfg.hidden_size, dtype=dtype, device=device) if cfg.o_bias else None

    def forward(
        self,
        x: torch.Tensor,
        rope: RopeStep,
        meta: AttentionMetadata,
        cache: KVCache,
        cache_layer: int,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`cache_layer`: the KV cache layer this call reads and writes (chosen per call
        by the model: the module itself holds no cache index). `rows`: project only these
        rows' attention outputs (every row's K/V is still written)."""
        cfg = self.cfg
        t = x.shape[0]
        qkv = self.ops.linear(x, self.qkv_weight, self.qkv_bias)
        q, k, v = qkv.split((cfg.q_size, cfg.kv_size, cfg.kv_size), dim=-1)
        q = q.view(t, cfg.num_heads, cfg.head_dim)
        k = k.view(t, cfg.num_kv_heads, cfg.head_dim)
        v = v.view(t, cfg.num_kv_heads, cfg.head_dim)
        q, k = self.ops.rotary(q, k, qkv, rope)
        out = paged_attention(q, k, v, cache, cache_layer, meta, self.scale, self.window, self.ops)
        out = out.reshape(t, cfg.q_size)
        if rows is not None:
            out = out.index_select(0, rows)
        return self.ops.linear(out, self.o_weight, self.o_bias)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device, ops: TorchOps):
        super().__init__()
        i = cfg.intermediate_size
        self.ops = ops
        self.gate_up_weight = _param(2 * i, cfg.hidden_size, dtype=dtype, device=device)
        self.gate_up_bias = _param(2 * i, dtype=dtype, device=device) if cfg.mlp_bias else None
        self.down_weight = _param(cfg.hidden_size, i, dtype=dtype, device=device)
        self.down_bias = (
            _param(cfg.hidden_size, dtype=dtype, device=device) if cfg.mlp_bias else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.ops.linear(x, self.gate_up_weight, self.gate_up_bias)
        return self.ops.linear(self.ops.silu_and_mul(gate_up), self.down_weight, self.down_bias)


class DecoderLayer(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        layer: int,
        dtype: torch.dtype,
        device: torch.device,
        ops: TorchOps,
    ):
        super().__init__()
        self.layer = layer  # index in the whole model; never changes
        window = cfg.sliding_windows[layer] if cfg.sliding_windows else None
        eps = cfg.rms_norm_eps
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps, dtype, device, ops)
        self.self_attn = Attention(cfg, window, dtype, device, ops)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps, dtype, device, ops)
        self.mlp = MLP(cfg, dtype, device, ops)
        self.weights = self._collect_weights()

    def _collect_weights(self) -> LayerWeights:
        """This layer's Parameter objects in the order ops.decode_layers reads them. A
        load, restore or arena move rebinds their data, never the objects; `_apply` (a
        `.to()`, which may make new ones) collects them again. Looking them up per step
        instead cost ~10 us a layer."""
        attn, mlp = self.self_attn, self.mlp
        return LayerWeights(
            self.input_layernorm.weight,
            attn.qkv_weight,
            attn.qkv_bias,
            attn.o_weight,
            attn.o_bias,
            self.post_attention_layernorm.weight,
            mlp.gate_up_weight,
            mlp.gate_up_bias,
            mlp.down_weight,
            mlp.down_bias,
        )

    def _apply(self, fn: Callable[..., torch.Tensor], recurse: bool = True) -> DecoderLayer:
        super()._apply(fn, recurse)
        self.weights = self._collect_weights()
        return self

    def forward(
        self,
        h: torch.Tensor,
        residual: torch.Tensor | None,
        rope: RopeStep,
        meta: AttentionMetadata,
        cache: KVCache,
        cache_layer: int,
        rows: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """transformers' `h += attn(norm(h)); h += mlp(norm(h))`, with the residual stream
        kept apart (vLLM's form): takes the previous layer's MLP output `h` and the stream
        before it was added (None for the first layer: `h` is the stream), returns this
        layer's MLP output and the stream it has not been added to yet. The adds happen in
        the norms, in place on `residual`, with the same bits as the plain form.

        `rows` (a model's last layer, when only some rows' outputs are wanted): every row's
        K/V is computed and written, the rest of the layer runs for `rows` only, and both
        returned tensors hold just those rows, in that order."""
        if residual is None:
            residual = h.clone()  # updated in place from here on; the caller's `h` is not
            x = self.input_layernorm(h)
        else:
            x = self.input_layernorm.add_forward(h, residual)
        h = self.self_attn(x, rope, meta, cache, cache_layer, rows)
        if rows is not None:
            residual = residual.index_select(0, rows)
        x = self.post_attention_layernorm.add_forward(h, residual)
        return self.mlp(x), residual


class LlamaModel(nn.Module):
    """Decoder layers [first_layer, last_layer) of a Llama-family model; see module docstring.

    Invariants: `layers` holds exactly the held layers, in order; `layers[i]` is layer
    `first_layer + i`; the head is present iff `norm` is (plus `lm_head`, or
    `embed_tokens` when the weights are tied). A layer module never changes once built:
    which KV cache layer it writes is decided per `forward` call (`layers` argument), so
    `drop_layers` / `restore_layers` only add or unlink modules.

    Concurrency (live restore): `restore_layers` may run in one thread while another runs
    `forward(..., layers=R)` with R inside the range held before the restore. The forward
    reads `self.layers` once and touches only the modules of R, which the restore keeps
    as they are (it builds and loads new modules for the layers outside the held range,
    and holds no lock the forward needs). A forward with `layers=None` during a restore
    is not covered: it may see layers whose weights are still loading.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        first_layer: int = 0,
        last_layer: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        max_positions: int | None = None,
        kernels: bool = True,
    ):
        super().__init__()
        last = cfg.num_layers if last_layer is None else last_layer
        if not 0 <= first_layer < last <= cfg.num_layers:
            raise ValueError(f"layer range [{first_layer}, {last}) outside [0, {cfg.num_layers})")
        dev = torch.device(device)
        self.cfg = cfg
        self.dtype = dtype
        self.device = dev
        # The elementwise and attention work: this machine's kernels where they apply
        # (float32 on the CPU, `kernels`), else torch (services/worker/kernels/ops.py).
        self.ops = select_ops(dev, dtype, kernels)
        self.first_layer = first_layer
        self.last_layer = last
        is_first, is_last = first_layer == 0, last == cfg.num_layers
        needs_embed = is_first or (is_last and cfg.tie_word_embeddings)
        self.embed_tokens: nn.Parameter | None = self._new_embed() if needs_embed else None
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, i, dtype, dev, self.ops) for i in range(first_layer, last)
        )
        self.norm: RMSNorm | None = self._new_norm() if is_last else None
        untied_head = is_last and not cfg.tie_word_embeddings
        self.lm_head: nn.Parameter | None = self._new_embed() if untied_head else None
        self.rope = RotaryEmbedding(cfg, max_positions or cfg.max_position_embeddings, dtype, dev)

    def _new_embed(self, device: torch.device | None = None) -> nn.Parameter:
        # embed_tokens and lm_head have the same shape
        return _param(
            self.cfg.vocab_size,
            self.cfg.hidden_size,
            dtype=self.dtype,
            device=device or self.device,
        )

    def _new_norm(self, device: torch.device | None = None) -> RMSNorm:
        return RMSNorm(
            self.cfg.hidden_size, self.cfg.rms_norm_eps, self.dtype, device or self.device, self.ops
        )

    @property
    def num_local_layers(self) -> int:
        """How many layers this model holds."""
        return self.last_layer - self.first_layer

    @property
    def is_first(self) -> bool:
        """The held range starts at layer 0 (says nothing about the embedding: `has_embed`)."""
        return self.first_layer == 0

    @property
    def is_last(self) -> bool:
        """The held range ends at the last layer (says nothing about the head: `has_head`)."""
        return self.last_layer == self.cfg.num_layers

    @property
    def has_embed(self) -> bool:
        return self.embed_tokens is not None

    @property
    def has_head(self) -> bool:
        if self.norm is None:
            return False
        head = self.embed_tokens if self.cfg.tie_word_embeddings else self.lm_head
        return head is not None

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        if self.embed_tokens is None:
            raise RuntimeError("this model holds no embedding (not a first stage, or dropped)")
        return F.embedding(token_ids, self.embed_tokens)

    def forward(
        self,
        hidden: torch.Tensor,
        meta: AttentionMetadata,
        cache: KVCache,
        layers: range | None = None,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Runs the held layers in `layers` (default: every held layer):
        hidden [T, hidden_size] -> [T, hidden_size]. Layer i reads and writes KV cache
        layer `i - layers.start`, so `cache` holds exactly those layers (a full model can
        serve as the stage of a sub-range, on that stage's sub-block view).

        `rows` (int64 indices into T): return only these rows, [len(rows), hidden_size];
        the last layer then projects and runs its MLP for them alone (a prefill chunk
        wants logits of its last token only: on an 8-layer model that skips ~10% of the
        step's matmuls). Every row's K/V is written as without it.

        A step of decodes only (no `rows`, at most `ops.fused_decode_rows` of them) runs
        its layers in one `ops.decode_layers` call: the kernels this loop would call, in
        its order (same bits), without the Python between them.

        `layers` must be a non-empty step-1 range inside the held layers (ValueError)."""
        held = list(self.layers)  # one read: a concurrent restore swaps in a new list
        first = cast(DecoderLayer, held[0]).layer
        if layers is None:
            layers = range(first, first + len(held))
        elif (
            not isinstance(layers, range)
            or layers.step != 1
            or len(layers) == 0
            or layers.start < first
            or layers.stop > first + len(held)
        ):
            raise ValueError(
                f"layers {layers!r} is not a non-empty range inside the held layers "
                f"[{first}, {first + len(held)})"
            )
        rope = self.ops.rope_for_step(self.rope.cos, self.rope.sin, meta.positions)
        if rows is None and not meta.prefills and 0 < hidden.shape[0] <= self.ops.fused_decode_rows:
            # A decode step: the same layers, in one call to the ops (same bits).
            cfg = self.cfg
            step = []
            for i in layers:
                layer = cast(DecoderLayer, held[i - first])
                k_cache, v_cache = cache.layer(i - layers.start)
                step.append(DecodeLayer(layer.weights, k_cache, v_cache, layer.self_attn.window))
            heads = HeadShape(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)
            scale = cast(DecoderLayer, held[0]).self_attn.scale
            return self.ops.decode_layers(hidden, step, meta, rope, heads, cfg.rms_norm_eps, scale)
        h, residual = hidden, None
        for i in layers:
            layer = cast(DecoderLayer, held[i - first])
            keep = rows if i == layers.stop - 1 else None
            h, residual = layer(h, residual, rope, meta, cache, i - layers.start, keep)
        assert residual is not None
        return residual.add_(h)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if not self.has_head:
            raise RuntimeError("this model holds no head (not a last stage, or dropped)")
        assert self.norm is not None
        head = self.embed_tokens if self.cfg.tie_word_embeddings else self.lm_head
        assert head is not None
        return self.ops.linear(self.norm(hidden), head)

    def param_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.parameters())

    def held_checkpoint_names(self) -> Iterator[str]:
        """What a checkpoint must supply for the parts this model holds."""
        return checkpoint_names(
            self.cfg,
            range(self.first_layer, self.last_layer),
            embed=self.embed_tokens is not None,
            norm=self.norm is not None,
            lm_head=self.lm_head is not None,
        )

    def checkpoint_target(self, name: str) -> Target | None:
        """Where checkpoint tensor `name` goes: (our parameter, rows to fill), or None when
        this model does not hold it."""
        cfg = self.cfg
        if name == "model.embed_tokens.weight":
            return (self.embed_tokens, None) if self.embed_tokens is not None else None
        if name == "lm_head.weight":
            return (self.lm_head, None) if self.lm_head is not None else None
        if name == "model.norm.weight":
            return (self.norm.weight, None) if self.norm is not None else None
        m = _LAYER.match(name)
        if m is None:
            return None
        layer = int(m.group(1))
        if not self.first_layer <= layer < self.last_layer:
            return None
        dec = cast(DecoderLayer, self.layers[layer - self.first_layer])
        attn, mlp = dec.self_attn, dec.mlp
        q, kv, i = cfg.q_size, cfg.kv_size, cfg.intermediate_size
        qkv_rows = {
            "q_proj": slice(0, q),
            "k_proj": slice(q, q + kv),
            "v_proj": slice(q + kv, q + 2 * kv),
        }
        rest = m.group(2)
        parts = rest.split(".")
        if rest == "input_layernorm.weight":
            return dec.input_layernorm.weight, None
        if rest == "post_attention_layernorm.weight":
            return dec.post_attention_layernorm.weight, None
        if len(parts) == 3 and parts[0] == "self_attn":
            proj, kind = parts[1], parts[2]
            if proj in qkv_rows:
                target = attn.qkv_weight if kind == "weight" else attn.qkv_bias
                return (target, qkv_rows[proj]) if target is not None else None
            if proj == "o_proj":
                target = attn.o_weight if kind == "weight" else attn.o_bias
                return (target, None) if target is not None else None
        if len(parts) == 3 and parts[0] == "mlp":
            proj, kind = parts[1], parts[2]
            rows = {"gate_proj": slice(0, i), "up_proj": slice(i, 2 * i)}
            if proj in rows:
                target = mlp.gate_up_weight if kind == "weight" else mlp.gate_up_bias
                return (target, rows[proj]) if target is not None else None
            if proj == "down_proj":
                target = mlp.down_weight if kind == "weight" else mlp.down_bias
                return (target, None) if target is not None else None
        return None

    def drop_layers(self, keep: range, *, keep_embed: bool, keep_head: bool) -> int:
        """Free every held layer outside `keep` and, unless kept, the embedding and the
        final norm + lm_head; return the parameter bytes freed.

        `keep` must be a non-empty, step-1 sub-range of the held range; keeping the embedding
        or head requires holding it, and keeping a tied head requires keeping the embedding
        (it is the head). Bad input raises ValueError before anything changes. Afterwards
        the held range is `keep` and (by default) `forward` writes layer `keep.start + i`
        into KV cache layer `i`.

        The freed tensors leave the process: their Parameters are emptied in place (so a
        stray reference to a module keeps no storage), the modules are unlinked, and the
        allocator is asked to hand the pages back (`_release_freed_memory`).
        """
        self._check_keep(keep, keep_embed=keep_embed, keep_head=keep_head)
        before = self.param_bytes()
        freed: list[nn.Parameter] = []
        kept: list[DecoderLayer] = []
        for module in self.layers:
            layer = cast(DecoderLayer, module)
            if layer.layer in keep:
                kept.append(layer)
            else:
                freed.extend(layer.parameters())
        if not keep_head:
            if self.norm is not None:
                freed.extend(self.norm.parameters())
            self.norm = None
            if self.lm_head is not None:
                freed.append(self.lm_head)
            self.lm_head = None
        if not keep_embed and self.embed_tokens is not None:
            freed.append(self.embed_tokens)
            self.embed_tokens = None
        self.ops.forget(freed)
        for p in freed:
            p.data = torch.empty(0, dtype=p.dtype, device=p.device)
        self._set_layers(kept, keep.start, keep.stop)
        del freed, kept
        _release_freed_memory(self.device)
        return before - self.param_bytes()

    def _check_keep(self, keep: range, *, keep_embed: bool, keep_head: bool) -> None:
        held = range(self.first_layer, self.last_layer)
        if not isinstance(keep, range) or keep.step != 1 or len(keep) == 0:
            raise ValueError(f"keep must be a non-empty range of step 1, got {keep!r}")
        if not (held.start <= keep.start and keep.stop <= held.stop):
            raise ValueError(
                f"keep [{keep.start}, {keep.stop}) is not inside the held layers "
                f"[{held.start}, {held.stop})"
            )
        if keep_embed and not self.has_embed:
            raise ValueError("keep_embed: this model holds no embedding")
        if keep_head and not self.has_head:
            raise ValueError("keep_head: this model holds no head")
        if keep_head and not keep_embed and self.cfg.tie_word_embeddings:
            raise ValueError(
                "tied word embeddings: the head is the embedding, keep_head needs keep_embed"
            )

    def _set_layers(self, layers: list[DecoderLayer], first: int, last: int) -> None:
        assert [d.layer for d in layers] == list(range(first, last))
        self.layers = nn.ModuleList(layers)
        self.first_layer, self.last_layer = first, last

    def restore_layers(self, folder: Path, *, build_on: torch.device | None = None) -> int:
        """Back to the whole model: layers [0, num_layers), embedding, final norm, lm_head.

        Loads only what is missing from the checkpoint in `folder` (the one the model was
        loaded from); held tensors are kept as they are. Returns the parameter bytes loaded.
        On a load error (ModelError) the model is left as it was before the call.
        `build_on` (default: the model's device) is where the new tensors are made; the
        instance arena (arena.py) builds them on the host and copies them into its memory.
        """
        cfg = self.cfg
        device = self.device if build_on is None else build_on
        before = self.param_bytes()
        saved = (
            [cast(DecoderLayer, m) for m in self.layers],
            self.first_layer,
            self.last_layer,
            self.embed_tokens,
            self.norm,
            self.lm_head,
        )
        held = {d.layer: d for d in saved[0]}
        new_layers = [i for i in range(cfg.num_layers) if i not in held]
        want_embed = self.embed_tokens is None
        want_norm = self.norm is None
        want_lm_head = self.lm_head is None and not cfg.tie_word_embeddings
        names = set(
            checkpoint_names(
                cfg, new_layers, embed=want_embed, norm=want_norm, lm_head=want_lm_head
            )
        )
        layers = [
            held[i] if i in held else DecoderLayer(cfg, i, self.dtype, device, self.ops)
            for i in range(cfg.num_layers)
        ]
        if want_embed:
            self.embed_tokens = self._new_embed(device)
        if want_norm:
            self.norm = self._new_norm(device)
        if want_lm_head:
            self.lm_head = self._new_embed(device)
        self._set_layers(layers, 0, cfg.num_layers)
        try:
            copy_tensors(folder, self.checkpoint_target, names, only_expected=True)
        except BaseException:
            old_layers, first, last, self.embed_tokens, self.norm, self.lm_head = saved
            self._set_layers(old_layers, first, last)
            del layers
            _release_freed_memory(self.device)
            raise
        return self.param_bytes() - before


def _load_malloc_trim() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return cast(Callable[[int], int], libc.malloc_trim)
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        return None


_MALLOC_TRIM = _load_malloc_trim()


def _release_freed_memory(device: torch.device) -> None:
    """Make freed parameters' memory leave the process, not just the Python heap.

    CPU: torch allocates tensors with glibc malloc. Chunks above the mmap threshold are
    munmapped on free, but glibc raises that threshold (dynamically, up to 32 MiB) every time
    it frees an mmapped chunk, and loading frees many checkpoint-sized temporaries; later
    parameter-sized allocations (e.g. a restore) then come from the heap, and freeing heap
    chunks gives nothing back to the OS. `malloc_trim(0)` returns every free whole page of
    every arena (madvise(MADV_DONTNEED) inside the heap, not just its top), so the drop is
    honest whichever way the tensors were allocated. CUDA: the caching allocator keeps
    freed blocks for reuse; empty_cache hands them back to the driver.
    """
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def param_bytes_per_layer(cfg: ModelConfig, dtype: torch.dtype) -> int:
    return cfg.layer_param_count() * torch.empty((), dtype=dtype).element_size()


def stage_param_bytes(
    cfg: ModelConfig, keep: range, *, embed: bool, head: bool, dtype: torch.dtype
) -> int:
    """Parameter bytes a stage holding layers `keep` (and the embedding / head when asked)
    holds: `model.param_bytes()` after `drop_layers(keep, keep_embed=embed, keep_head=head)`.
    A tied head is the embedding, so `head` counts it even without `embed`."""
    count = len(keep) * cfg.layer_param_count()
    if embed or (head and cfg.tie_word_embeddings):
        count += cfg.embed_param_count()
    if head:
        count += cfg.head_param_count()
    return count * torch.empty((), dtype=dtype).element_size()
