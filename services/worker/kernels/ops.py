"""The model's elementwise and attention work, as torch code or as this machine's kernels.

`TorchOps` is the reference: plain torch, any device and dtype, what the model always
computed. `CpuKernelOps` does the same work in cpu_ops.c for float32 on the CPU: one call
where torch takes several ops and passes over memory (RMSNorm with its residual add,
SiLU-and-mul, rotary in place, the K/V cache write), decode attention that reads the
paged KV blocks where they lie instead of gathering and masking a padded copy, and the
matmuls of decode batches (prefill-sized ones stay with torch's GEMM).

Both give the same tokens; the elementwise kernels give torch's bits, the reductions may
differ in the last bits (another summation order). `select_ops` picks the kernels when
they apply and could be built (build.py), so a machine without a compiler, a GPU or a
bfloat16 model runs the torch code.

Invariant for callers: tensors handed to a kernel are float32, on the CPU and contiguous
in the layouts cpu_ops.c documents; `CpuKernelOps` checks shapes it relies on and makes
rows contiguous where a caller's view may not be.
"""

from __future__ import annotations

import ctypes
import weakref
from array import array
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torch.nn.functional as F

from services.worker.kernels.build import load

if TYPE_CHECKING:
    from services.worker.attention import AttentionMetadata

# Up to this many rows, `linear` runs cpu_ops.c's weight-streaming kernel (decode steps).
SMALL_ROWS = 8

# Up to this many rows, cpu_ops.c's packed-weight kernel (decode batches). Measured here,
# weights cold, against oneDNN's packed matmul: 1.1-1.3x at 12-32 rows, 0.9-1.0x at 64-128;
# against torch's GEMM (MKL): ahead up to 128 rows, behind from 256 on (prefill chunks).
PACKED_ROWS = 128

# What `rope_for_step` returns and `rotary` takes: per-step rotary inputs.
RopeStep = tuple[torch.Tensor, ...]


class LayerWeights(NamedTuple):
    """A decoder layer's parameters as `decode_layers` takes them (y = x W^T + b)."""

    input_norm: torch.Tensor
    qkv: torch.Tensor
    qkv_bias: torch.Tensor | None
    o: torch.Tensor
    o_bias: torch.Tensor | None
    post_norm: torch.Tensor
    gate_up: torch.Tensor
    gate_up_bias: torch.Tensor | None
    down: torch.Tensor
    down_bias: torch.Tensor | None


class DecodeLayer(NamedTuple):
    """One layer of a `decode_layers` call: its weights, KV cache views and window."""

    weights: LayerWeights
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    window: int | None


class HeadShape(NamedTuple):
    num_heads: int
    num_kv_heads: int
    head_dim: int


class TorchOps:
    """The reference implementation (eager torch)."""

    name = "torch"
    # Decode steps of up to this many sequences may take `decode_layers`.
    fused_decode_rows = 0

    def linear(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        return F.linear(x, weight, bias)

    def forget(self, weights: Iterable[torch.Tensor]) -> None:
        """`weights` are being freed: drop anything derived from them (nothing here)."""

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        # In float32 like transformers, cast back before the weight multiply.
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        return weight * h.to(x.dtype)

    def add_rms_norm(
        self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> torch.Tensor:
        """residual += x in place (the decoder's residual stream), then its RMSNorm."""
        residual.add_(x)
        return self.rms_norm(residual, weight, eps)

    def silu_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    def decode_layers(
        self,
        hidden: torch.Tensor,
        layers: Sequence[DecodeLayer],
        meta: AttentionMetadata,
        rope: RopeStep,
        heads: HeadShape,
        eps: float,
        scale: float,
    ) -> torch.Tensor:
        """A decode step's decoder layers in one call (hidden [D, dim] -> the residual
        stream after the last layer), for steps of up to `fused_decode_rows` decodes and
        nothing else; the torch code has no such call (its limit is 0)."""
        raise NotImplementedError("the torch code runs the layers one by one")

    def rope_for_step(
        self, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor
    ) -> RopeStep:
        """cos, sin of the step's positions, [T, 1, D]: looked up once, used by every layer."""
        return cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)

    def rotary(
        self, q: torch.Tensor, k: torch.Tensor, qkv: torch.Tensor, rope: RopeStep
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q [T, Hq, D], k [T, Hkv, D] (views of `qkv`) -> rotated q, k."""
        cos, sin = rope
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin

    def write_kv(
        self,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        meta: AttentionMetadata,
    ) -> None:
        k_cache[meta.slot_blocks, meta.slot_offsets] = k
        v_cache[meta.slot_blocks, meta.slot_offsets] = v

    def decode_attention(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        window: int | None,
    ) -> torch.Tensor:
        """q [D, Hq, Dh] of the step's decodes -> [D, Hq, Dh]: keys gathered from the block
        tables into a padded copy, masked to each context."""
        assert meta.decode_block_tables is not None
        block_size = k_cache.shape[1]
        table = meta.decode_block_tables
        kd = gather_blocks(k_cache, table).transpose(1, 2)  # [D, Hkv, L, Dh]
        vd = gather_blocks(v_cache, table).transpose(1, 2)
        mask = meta.decode_mask(block_size, window)
        out = F.scaled_dot_product_attention(
            q.unsqueeze(2), kd, vd, attn_mask=mask, scale=scale, enable_gqa=True
        )
        return out.squeeze(2)

    def prefill_attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        scale: float,
        window: int | None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One prefill chunk: q [T, Hq, Dh], k/v [S, Hkv, Dh] with S >= T, the queries
        being the last T positions; causal (and within `window` keys) -> [T, Hq, Dh],
        written into `out` when given (rows of a step's output) and returned."""
        _check_out(q, out)
        result = self._sdpa_prefill(q, k, v, scale, window)
        return result if out is None else out.copy_(result)

    @staticmethod
    def _sdpa_prefill(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, window: int | None
    ) -> torch.Tensor:
        t, s = q.shape[0], k.shape[0]
        mask = None
        if s != t or window is not None:
            qpos = torch.arange(t, device=q.device).unsqueeze(1) + (s - t)
            kpos = torch.arange(s, device=q.device).unsqueeze(0)
            mask = kpos <= qpos
            if window is not None:
                mask &= kpos > qpos - window
        # The leading batch dimension matters: torch's fused CPU kernel takes 4-D inputs only.
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1).unsqueeze(0),
            k.transpose(0, 1).unsqueeze(0),
            v.transpose(0, 1).unsqueeze(0),
            attn_mask=mask,
            is_causal=mask is None,
            scale=scale,
            enable_gqa=True,
        )
        return out[0].transpose(0, 1)


def _check_out(q: torch.Tensor, out: torch.Tensor | None) -> None:
    """An attention's `out` holds q's shape and dtype (ValueError)."""
    if out is not None and (out.shape != q.shape or out.dtype != q.dtype):
        raise ValueError(f"out {tuple(out.shape)} {out.dtype} is not q's {tuple(q.shape)}")


_P, _I, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
# cpu_ops.c's functions: pointers, then sizes and strides, then float scalars.
_SIGNATURES: dict[str, list[Any]] = {
    "memserve_paged_decode": [_P] * 6 + [_I] * 8 + [_F],
    "memserve_write_kv": [_P] * 4 + [_I, _P, _P] + [_I] * 3,
    "memserve_rotary": [_P, _I, _P, _P, _P] + [_I] * 4,
    "memserve_rms_norm": [_P] * 3 + [_I] * 2 + [_F],
    "memserve_add_rms_norm": [_P] * 4 + [_I] * 2 + [_F],
    "memserve_silu_and_mul": [_P] * 2 + [_I] * 2,
    "memserve_linear_small": [_P] * 4 + [_I] * 3,
    "memserve_pack_weight": [_P] * 2 + [_I] * 2,
    "memserve_linear_packed": [_P] * 4 + [_I] * 3,
    "memserve_prefill_attention": [_P, _I, _P, _I, _P, _P] + [_I] * 7 + [_F],
    "memserve_decode_layers": [_P, _P, _P] + [_I] * 8 + [_P] * 7 + [_I] * 2 + [_F] * 2,
}


class CpuKernelOps(TorchOps):
    """float32 CPU work in cpu_ops.c (see the module docstring)."""

    name = "cpu-kernels"
    fused_decode_rows = PACKED_ROWS  # every matmul of such a step is cpu_ops.c's

    def __init__(self, lib: ctypes.CDLL):
        self._lib = lib
        for name, args in _SIGNATURES.items():
            fn = getattr(lib, name)
            fn.restype = None
            fn.argtypes = args
        lib.memserve_pack_columns.restype = ctypes.c_int64
        lib.memserve_pack_columns.argtypes = []
        self._pack_columns = int(lib.memserve_pack_columns())
        # id(weight) -> (weakref to it, its data_ptr and _version when packed, packed copy)
        self._packed: dict[int, tuple[weakref.ref[torch.Tensor], int, int, torch.Tensor]] = {}

    def linear(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """By row count: up to SMALL_ROWS cpu_ops.c's weight-streaming kernel on the plain
        weight; up to PACKED_ROWS its outer-product kernel on a packed copy of the weight;
        above, torch's GEMM (MKL; on par with oneDNN's packed matmul at 2048 rows). The
        plain weight stays the truth: a packed copy is made on first use and again whenever
        the weight was rebound or written in place (data_ptr or version changed: a load, a
        restore, an arena move)."""
        rows = x.numel() // x.shape[-1] if x.numel() else 0
        if 0 < rows <= SMALL_ROWS:
            return self._linear_small(x, weight, bias)
        if rows == 0 or rows > PACKED_ROWS:
            return F.linear(x, weight, bias)
        packed = self._packed_copy(weight)
        return self._call_linear(self._lib.memserve_linear_packed, x, weight, packed, bias)

    def _packed_copy(self, weight: torch.Tensor) -> torch.Tensor:
        """`weight`'s packed copy, made anew when the weight changed (see `linear`)."""
        entry = self._packed.get(id(weight))
        if (
            entry is None
            or entry[0]() is not weight
            or entry[1] != weight.data_ptr()
            or entry[2] != weight._version
        ):
            entry = self._pack_weight(weight)
        return entry[3]

    def _linear_small(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        """cpu_ops.c's linear for a few rows: reads the plain weight once, no packed copy."""
        assert weight.is_contiguous()
        return self._call_linear(self._lib.memserve_linear_small, x, weight, weight, bias)

    @staticmethod
    def _call_linear(
        fn: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        data: torch.Tensor,
        bias: torch.Tensor | None,
    ) -> torch.Tensor:
        """y = x weight^T (+ bias) by a cpu_ops.c linear reading `data` (the weight itself
        or its packed copy); x may have leading dimensions."""
        x = x.contiguous()
        n, k = weight.shape
        out = x.new_empty((*x.shape[:-1], n))
        assert bias is None or bias.is_contiguous()
        fn(
            out.data_ptr(),
            x.data_ptr(),
            data.data_ptr(),
            _ptr(bias),
            x.numel() // k,
            n,
            k,
        )
        return out

    def _pack_weight(
        self, weight: torch.Tensor
    ) -> tuple[weakref.ref[torch.Tensor], int, int, torch.Tensor]:
        key = id(weight)
        n, k = weight.shape
        cols = self._pack_columns
        w = weight.detach().contiguous()
        packed = w.new_empty(-(-n // cols) * cols * k)
        self._lib.memserve_pack_weight(packed.data_ptr(), w.data_ptr(), n, k)

        def gone(_: object, key: int = key) -> None:
            self._packed.pop(key, None)

        entry = (weakref.ref(weight, gone), weight.data_ptr(), weight._version, packed)
        self._packed[key] = entry
        return entry

    def forget(self, weights: Iterable[torch.Tensor]) -> None:
        """Free the packed copies of `weights` now (a parameter drop frees their memory)."""
        for w in weights:
            self._packed.pop(id(w), None)

    @property
    def packed_bytes(self) -> int:
        """Memory held by packed weight copies (on top of the parameters themselves)."""
        return sum(e[3].numel() * e[3].element_size() for e in self._packed.values())

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        x = x.contiguous()
        out = torch.empty_like(x)
        n = x.shape[-1]
        self._lib.memserve_rms_norm(
            out.data_ptr(), x.data_ptr(), weight.data_ptr(), x.numel() // n, n, eps
        )
        return out

    def add_rms_norm(
        self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> torch.Tensor:
        assert residual.is_contiguous() and residual.shape == x.shape
        x = x.contiguous()
        out = torch.empty_like(x)
        n = x.shape[-1]
        self._lib.memserve_add_rms_norm(
            out.data_ptr(),
            x.data_ptr(),
            residual.data_ptr(),
            weight.data_ptr(),
            x.numel() // n,
            n,
            eps,
        )
        return out

    def silu_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate_up = gate_up.contiguous()
        inter = gate_up.shape[-1] // 2
        out = gate_up.new_empty((*gate_up.shape[:-1], inter))
        self._lib.memserve_silu_and_mul(
            out.data_ptr(), gate_up.data_ptr(), gate_up.numel() // (2 * inter), inter
        )
        return out

    def decode_layers(
        self,
        hidden: torch.Tensor,
        layers: Sequence[DecodeLayer],
        meta: AttentionMetadata,
        rope: RopeStep,
        heads: HeadShape,
        eps: float,
        scale: float,
    ) -> torch.Tensor:
        """cpu_ops.c's memserve_decode_layers: the kernels the layer loop would call, in
        its order, from C (same bits; none of the ~100 us of Python a layer)."""
        m, dim = hidden.shape
        tables, lens = meta.decode_block_tables, meta.decode_ctx_lens
        limit = self.fused_decode_rows
        if not 0 < m <= limit or meta.prefills or meta.num_decodes != m or not layers:
            raise ValueError(f"decode_layers takes 1-{limit} decodes and no prefill")
        assert tables is not None and lens is not None
        _check_geometry(layers[0].weights, dim, heads)  # every layer of a model has its shapes
        packed = m > SMALL_ROWS
        mat = self._packed_copy if packed else _plain
        flat: list[int] = []
        for w, k_cache, v_cache, window in layers:
            _check_paged(k_cache, v_cache)
            flat += (
                w.input_norm.data_ptr(),
                mat(w.qkv).data_ptr(),
                _ptr(w.qkv_bias),
                mat(w.o).data_ptr(),
                _ptr(w.o_bias),
                w.post_norm.data_ptr(),
                mat(w.gate_up).data_ptr(),
                _ptr(w.gate_up_bias),
                mat(w.down).data_ptr(),
                _ptr(w.down_bias),
                k_cache.data_ptr(),
                v_cache.data_ptr(),
                k_cache.stride(0),
                0 if window is None else window,
            )
        table = array("q", flat)
        cos, sin, positions = rope
        hidden = hidden.contiguous()
        out = torch.empty_like(hidden)
        k_cache = layers[0].k_cache
        self._lib.memserve_decode_layers(
            out.data_ptr(),
            hidden.data_ptr(),
            table.buffer_info()[0],
            len(layers),
            int(packed),
            m,
            dim,
            heads.num_heads,
            heads.num_kv_heads,
            heads.head_dim,
            layers[0].weights.down.shape[1],
            cos.data_ptr(),
            sin.data_ptr(),
            positions.data_ptr(),
            meta.slot_blocks.data_ptr(),
            meta.slot_offsets.data_ptr(),
            tables.data_ptr(),
            lens.data_ptr(),
            tables.shape[1],
            k_cache.shape[1],
            eps,
            scale,
        )
        return out

    def rope_for_step(
        self, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor
    ) -> RopeStep:
        return cos, sin, positions.contiguous()

    def rotary(
        self, q: torch.Tensor, k: torch.Tensor, qkv: torch.Tensor, rope: RopeStep
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotates q and k in place inside `qkv` ([T, row] contiguous, q heads first, then
        k heads) and returns the same views."""
        cos, sin, positions = rope
        assert qkv.is_contiguous() and cos.is_contiguous() and sin.is_contiguous()
        assert q.data_ptr() == qkv.data_ptr() and k.shape[-1] == q.shape[-1]
        self._lib.memserve_rotary(
            qkv.data_ptr(),
            qkv.shape[-1],
            cos.data_ptr(),
            sin.data_ptr(),
            positions.data_ptr(),
            qkv.shape[0],
            q.shape[1],
            k.shape[1],
            q.shape[2],
        )
        return q, k

    def write_kv(
        self,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        meta: AttentionMetadata,
    ) -> None:
        _check_paged(k_cache, v_cache)
        kv_cols = k.shape[1] * k.shape[2]
        row = k.stride(0)
        if k.stride(1) * k.shape[1] != kv_cols or v.stride(0) != row or k.stride(2) != 1:
            raise ValueError("write_kv wants k, v as [T, H, D] rows of one buffer")
        self._lib.memserve_write_kv(
            k_cache.data_ptr(),
            v_cache.data_ptr(),
            k.data_ptr(),
            v.data_ptr(),
            row,
            meta.slot_blocks.data_ptr(),
            meta.slot_offsets.data_ptr(),
            k.shape[0],
            kv_cols,
            k_cache.stride(0),
        )

    def decode_attention(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        window: int | None,
    ) -> torch.Tensor:
        """Reads each sequence's blocks in place: no gather, no padding, no mask."""
        tables, lens = meta.decode_block_tables, meta.decode_ctx_lens
        assert tables is not None and lens is not None
        _check_paged(k_cache, v_cache)
        q = q.contiguous()
        out = torch.empty_like(q)
        self._lib.memserve_paged_decode(
            out.data_ptr(),
            q.data_ptr(),
            k_cache.data_ptr(),
            v_cache.data_ptr(),
            tables.data_ptr(),
            lens.data_ptr(),
            q.shape[0],
            tables.shape[1],
            q.shape[1],
            k_cache.shape[2],
            q.shape[2],
            k_cache.shape[1],
            k_cache.stride(0),
            0 if window is None else window,
            scale,
        )
        return out

    def prefill_attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        scale: float,
        window: int | None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """cpu_ops.c's causal attention on GEMM tiles (the part above the diagonal is never
        computed); inputs, and `out`, may be rows of a wider buffer (q, k, v views of the
        qkv matmul's output), each head's Dh floats contiguous."""
        t, hq, d = q.shape
        s, hkv = k.shape[0], k.shape[1]
        _check_out(q, out)
        views = (q, k, v) if out is None else (q, k, v, out)
        if any(x.stride(2) != 1 or x.stride(1) != d for x in views) or k.stride(0) != v.stride(0):
            return super().prefill_attention(q, k, v, scale, window, out)
        if out is None:
            out = q.new_empty((t, hq, d))
        self._lib.memserve_prefill_attention(
            out.data_ptr(),
            out.stride(0),
            q.data_ptr(),
            q.stride(0),
            k.data_ptr(),
            v.data_ptr(),
            k.stride(0),
            t,
            s,
            hq,
            hkv,
            d,
            0 if window is None else window,
            scale,
        )
        return out


# K views already checked, with their V view (a KV cache hands out the same view objects
# every step: the check runs once per view instead of twice a layer a step).
# Keyed by id(K), holding weak references: an id reused by a later tensor fails the
# identity test and is checked anew.
_CHECKED: dict[int, tuple[weakref.ref[torch.Tensor], weakref.ref[torch.Tensor]]] = {}


def _check_paged(k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    """A layer's K or V view: [blocks, block_size, H, D], each block's rows contiguous."""
    seen = _CHECKED.get(id(k_cache))
    if seen is not None and seen[0]() is k_cache and seen[1]() is v_cache:
        return
    for c in (k_cache, v_cache):
        h, d = c.shape[2], c.shape[3]
        if c.stride(3) != 1 or c.stride(2) != d or c.stride(1) != h * d:
            raise ValueError(f"KV view of strides {c.stride()} is not block-contiguous")
    if k_cache.stride(0) != v_cache.stride(0):
        raise ValueError("K and V views have different block strides")
    if len(_CHECKED) > 4096:  # views of dropped caches: forget them all, rarely
        _CHECKED.clear()
    _CHECKED[id(k_cache)] = (weakref.ref(k_cache), weakref.ref(v_cache))


def _check_geometry(w: LayerWeights, dim: int, heads: HeadShape) -> None:
    """The shapes memserve_decode_layers assumes (it reads raw memory)."""
    q = heads.num_heads * heads.head_dim
    row = q + 2 * heads.num_kv_heads * heads.head_dim
    inter = w.down.shape[-1]
    want = {
        "qkv": (row, dim),
        "o": (dim, q),
        "gate_up": (2 * inter, dim),
        "down": (dim, inter),
        "input_norm": (dim,),
        "post_norm": (dim,),
    }
    for name, shape in want.items():
        if tuple(getattr(w, name).shape) != shape:
            raise ValueError(
                f"decode_layers: {name} is {tuple(getattr(w, name).shape)}, not {shape}"
            )


def _plain(weight: torch.Tensor) -> torch.Tensor:
    """A weight the small-rows kernel reads as it is (row-major [N, K])."""
    if not weight.is_contiguous():
        raise ValueError("decode_layers wants contiguous weights")
    return weight


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def gather_blocks(cache: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """cache [num_blocks, block_size, H, D] (a strided per-layer view), table [B, W] ->
    [B, W * block_size, H, D]. index_select copies whole blocks; advanced indexing on the
    strided view would copy element by element (several times slower)."""
    b, w = table.shape
    rows = cache.index_select(0, table.reshape(-1))
    return rows.view(b, w * cache.shape[1], cache.shape[2], cache.shape[3])


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def select_ops(device: torch.device, dtype: torch.dtype, kernels: bool = True) -> TorchOps:
    """The kernels when they apply here (float32 on the CPU, built for this machine and
    `kernels` asked for), else the torch code."""
    if kernels and device.type == "cpu" and dtype == torch.float32:
        lib = load()
        if lib is not None:
            return CpuKernelOps(lib)
    return TorchOps()


__all__ = [
    "CpuKernelOps",
    "DecodeLayer",
    "HeadShape",
    "LayerWeights",
    "RopeStep",
    "TorchOps",
    "gather_blocks",
    "select_ops",
]
