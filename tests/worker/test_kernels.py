"""This machine's CPU kernels (services/worker/kernels) against the torch code they replace:
the elementwise ones bit for bit, the reductions within float32 rounding, on the shapes the
models use (GQA groups, a head size that is not a multiple of 8, sliding windows, paged
blocks scattered through a layer-interleaved cache); and the build's fallbacks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from services.worker.attention import AttentionMetadata, PrefillSpan
from services.worker.kernels import build as kbuild
from services.worker.kernels.ops import (
    PACKED_ROWS,
    SMALL_ROWS,
    CpuKernelOps,
    DecodeLayer,
    HeadShape,
    LayerWeights,
    TorchOps,
    select_ops,
)

TORCH = TorchOps()


@pytest.fixture(scope="module")
def kern() -> CpuKernelOps:
    ops = select_ops(torch.device("cpu"), torch.float32)
    assert isinstance(ops, CpuKernelOps), "the kernels build on every machine the suite runs on"
    return ops


def _close(a: torch.Tensor, b: torch.Tensor, atol: float = 1e-5) -> None:
    torch.testing.assert_close(a, b, rtol=1e-5, atol=atol)


def _close_sums(a: torch.Tensor, b: torch.Tensor) -> None:
    """Matmuls of k ~ 500 unit-variance products: outputs ~ 20, rounding ~ 1e-6 of that."""
    _close(a, b, atol=1e-4)


@pytest.mark.parametrize("rows,n", [(1, 64), (7, 512), (33, 24)])
def test_norms(kern: CpuKernelOps, rows: int, n: int) -> None:
    g = torch.Generator().manual_seed(rows)
    x, w = torch.randn(rows, n, generator=g), torch.randn(n, generator=g)
    _close(kern.rms_norm(x, w, 1e-5), TORCH.rms_norm(x, w, 1e-5))
    r1 = torch.randn(rows, n, generator=g)
    r2 = r1.clone()
    out1, out2 = kern.add_rms_norm(x, r1, w, 1e-6), TORCH.add_rms_norm(x, r2, w, 1e-6)
    assert torch.equal(r1, r2), "the residual add gives torch's bits"
    _close(out1, out2)


@pytest.mark.parametrize("rows,inter", [(1, 1408), (9, 20)])
def test_silu_and_mul(kern: CpuKernelOps, rows: int, inter: int) -> None:
    gu = torch.randn(rows, 2 * inter, generator=torch.Generator().manual_seed(inter)) * 4
    _close(kern.silu_and_mul(gu), TORCH.silu_and_mul(gu))


def _split(qkv: torch.Tensor, heads: int, kv_heads: int, d: int) -> list[torch.Tensor]:
    t = qkv.shape[0]
    q, k, v = qkv.split((heads * d, kv_heads * d, kv_heads * d), dim=-1)
    return [q.view(t, heads, d), k.view(t, kv_heads, d), v.view(t, kv_heads, d)]


@pytest.mark.parametrize("heads,kv_heads,d", [(8, 4, 64), (4, 4, 24), (9, 3, 64)])
def test_rotary_in_place_is_torch_bit_for_bit(
    kern: CpuKernelOps, heads: int, kv_heads: int, d: int
) -> None:
    g = torch.Generator().manual_seed(d)
    qkv = torch.randn(5, (heads + 2 * kv_heads) * d, generator=g)
    cos, sin = torch.randn(64, d, generator=g), torch.randn(64, d, generator=g)
    positions = torch.tensor([0, 3, 63, 7, 7])
    mine = qkv.clone()
    q, k, v = _split(mine, heads, kv_heads, d)
    q, k = kern.rotary(q, k, mine, kern.rope_for_step(cos, sin, positions))
    ref = qkv.clone()
    rq, rk, rv = _split(ref, heads, kv_heads, d)
    rq, rk = TORCH.rotary(rq, rk, ref, TORCH.rope_for_step(cos, sin, positions))
    assert torch.equal(q, rq) and torch.equal(k, rk) and torch.equal(v, rv)


@pytest.mark.parametrize("heads,kv_heads,d", [(8, 4, 64), (4, 4, 24), (9, 3, 64), (2, 1, 40)])
@pytest.mark.parametrize(
    "t,s,window",
    [
        (1, 1, None),
        (29, 29, None),
        (77, 77, None),
        (13, 50, None),
        (40, 40, 7),
        (25, 90, 16),
        (300, 300, None),  # enough blocks for every thread, in each kv head's turn
        (130, 700, 200),
    ],
)
def test_prefill_attention_is_torchs(
    kern: CpuKernelOps,
    heads: int,
    kv_heads: int,
    d: int,
    t: int,
    s: int,
    window: int | None,
) -> None:
    """A chunk's causal attention on GEMM tiles equals SDPA's: fresh chunks (q, k, v views
    of one qkv buffer, as the model hands them), chunks after cached keys (s > t), sliding
    windows, GQA groups 1-3, head sizes that are not a multiple of the vector width."""
    g = torch.Generator().manual_seed(t * 131 + s + d)
    q_cols, kv_cols = heads * d, kv_heads * d
    qkv = torch.randn(t, q_cols + 2 * kv_cols, generator=g)
    q = qkv[:, :q_cols].view(t, heads, d)
    if s == t:
        k = qkv[:, q_cols : q_cols + kv_cols].view(t, kv_heads, d)
        v = qkv[:, q_cols + kv_cols :].view(t, kv_heads, d)
    else:
        k = torch.randn(s, kv_heads, d, generator=g)
        v = torch.randn(s, kv_heads, d, generator=g)
    scale = d**-0.5
    _close(
        kern.prefill_attention(q, k, v, scale, window),
        TORCH.prefill_attention(q, k, v, scale, window),
        atol=2e-5,
    )


@pytest.mark.parametrize("ops", ["kern", "torch"])
def test_prefill_attention_writes_into_rows_of_a_wider_buffer(kern: CpuKernelOps, ops: str) -> None:
    """`out` given (a span's rows of a step's output): the result lands there, returned as
    it; rows around it are untouched; an `out` of another shape is refused."""
    o = kern if ops == "kern" else TORCH
    g = torch.Generator().manual_seed(5)
    t, heads, kv_heads, d = 45, 8, 2, 64
    q = torch.randn(t, heads, d, generator=g)
    k, v = torch.randn(t, kv_heads, d, generator=g), torch.randn(t, kv_heads, d, generator=g)
    step = torch.full((t + 20, heads, d), 7.0)
    into = step[10 : 10 + t]
    got = o.prefill_attention(q, k, v, d**-0.5, None, into)
    assert got.data_ptr() == into.data_ptr()
    _close(into, TORCH.prefill_attention(q, k, v, d**-0.5, None), atol=2e-5)
    assert bool((step[:10] == 7.0).all()) and bool((step[10 + t :] == 7.0).all())
    with pytest.raises(ValueError, match="is not q's"):
        o.prefill_attention(q, k, v, d**-0.5, None, torch.empty(t, heads, d + 1))
    strided = torch.zeros(t, heads, d + 3)[:, :, :d]  # rows the kernel cannot take: torch's
    o.prefill_attention(q, k, v, d**-0.5, None, strided)
    _close(strided, into, atol=2e-5)


def _paged_case(
    heads: int, kv_heads: int, d: int, lens: list[int], block_size: int = 16
) -> tuple[torch.Tensor, AttentionMetadata, torch.Tensor]:
    """A 3-layer aggregated cache, layer 1's blocks scattered; decode metadata for `lens`."""
    g = torch.Generator().manual_seed(sum(lens))
    num_blocks = 64
    cache = torch.randn(num_blocks, 3, 2, block_size, kv_heads, d, generator=g)
    width = max(-(-n // block_size) for n in lens)
    tables = torch.stack([torch.randperm(num_blocks, generator=g)[:width] for _ in lens])
    meta = AttentionMetadata(
        slot_blocks=torch.zeros(len(lens), dtype=torch.long),
        slot_offsets=torch.zeros(len(lens), dtype=torch.long),
        positions=torch.tensor(lens) - 1,
        num_decodes=len(lens),
        decode_block_tables=tables,
        decode_ctx_lens=torch.tensor(lens),
    )
    return cache, meta, torch.randn(len(lens), heads, d, generator=g)


@pytest.mark.parametrize(
    "heads,kv_heads,d,lens",
    [
        (8, 4, 64, [1]),
        (8, 4, 64, [1, 17, 33, 70, 16, 200]),
        (9, 3, 64, [5, 129]),
        (4, 4, 24, [31, 2]),
        (8, 2, 64, [300] * 24),  # enough work to run on every thread
    ],
)
@pytest.mark.parametrize("window", [None, 10])
def test_paged_decode_reads_blocks_in_place(
    kern: CpuKernelOps, heads: int, kv_heads: int, d: int, lens: list[int], window: int | None
) -> None:
    cache, meta, q = _paged_case(heads, kv_heads, d, lens)
    k_cache, v_cache = cache[:, 1, 0], cache[:, 1, 1]
    ours = kern.decode_attention(q, k_cache, v_cache, meta, d**-0.5, window)
    meta._decode_masks.clear()
    _close(ours, TORCH.decode_attention(q, k_cache, v_cache, meta, d**-0.5, window))


def test_write_kv_fills_the_same_slots(kern: CpuKernelOps) -> None:
    cache, meta, _ = _paged_case(8, 4, 64, [40, 3, 9])
    meta.slot_blocks = torch.tensor([5, 60, 5])
    meta.slot_offsets = torch.tensor([0, 15, 7])
    qkv = torch.randn(3, 16 * 64)
    _, k, v = _split(qkv, 8, 4, 64)
    mine, ref = cache.clone(), cache.clone()
    kern.write_kv(mine[:, 2, 0], mine[:, 2, 1], k, v, meta)
    TORCH.write_kv(ref[:, 2, 0], ref[:, 2, 1], k, v, meta)
    assert torch.equal(mine, ref) and not torch.equal(mine, cache)


def test_a_view_that_is_not_block_contiguous_is_refused(kern: CpuKernelOps) -> None:
    cache, meta, q = _paged_case(8, 4, 64, [20])
    transposed = cache[:, 0, 0].transpose(1, 2)  # [blocks, H, block_size, D]
    with pytest.raises(ValueError, match="block-contiguous"):
        kern.decode_attention(q, transposed, transposed, meta, 0.125, None)


def test_decode_layers_takes_decode_steps_only(kern: CpuKernelOps) -> None:
    """The one-call decode step refuses what it cannot run (the model never asks it to:
    it checks `fused_decode_rows` and the prefills first), before touching anything."""
    cache, meta, _ = _paged_case(8, 4, 64, [20, 7])
    dim, inter = 64, 96
    w = LayerWeights(
        torch.ones(dim),
        torch.randn(16 * 64, dim),
        None,
        torch.randn(dim, 8 * 64),
        None,
        torch.ones(dim),
        torch.randn(2 * inter, dim),
        None,
        torch.randn(dim, inter),
        None,
    )
    before = cache.clone()
    layers = [DecodeLayer(w, cache[:, 1, 0], cache[:, 1, 1], None)]
    rope = (torch.ones(64, 64), torch.zeros(64, 64), meta.positions)
    heads = HeadShape(8, 4, 64)
    meta.prefills = [PrefillSpan(2, 3, 3, torch.tensor([9]))]
    with pytest.raises(ValueError, match="decodes and no prefill"):
        kern.decode_layers(torch.randn(5, dim), layers, meta, rope, heads, 1e-6, 0.125)
    meta.prefills = []
    too_many = torch.randn(PACKED_ROWS + 1, dim)
    with pytest.raises(ValueError, match="decodes and no prefill"):
        kern.decode_layers(too_many, layers, meta, rope, heads, 1e-6, 0.125)
    with pytest.raises(ValueError, match="decodes and no prefill"):
        kern.decode_layers(torch.randn(2, dim), [], meta, rope, heads, 1e-6, 0.125)
    wrong = [DecodeLayer(w._replace(o=torch.randn(dim, 4 * 64)), *layers[0][1:])]
    with pytest.raises(ValueError, match="o is"):
        kern.decode_layers(torch.randn(2, dim), wrong, meta, rope, heads, 1e-6, 0.125)
    assert torch.equal(cache, before)
    assert TORCH.fused_decode_rows == 0 and kern.fused_decode_rows == PACKED_ROWS


def test_torch_runs_where_kernels_do_not_apply() -> None:
    assert isinstance(select_ops(torch.device("cpu"), torch.bfloat16), TorchOps)
    assert not isinstance(select_ops(torch.device("cpu"), torch.bfloat16), CpuKernelOps)
    assert not isinstance(select_ops(torch.device("cpu"), torch.float32, False), CpuKernelOps)
    assert not isinstance(select_ops(torch.device("meta"), torch.float32), CpuKernelOps)


def test_a_failed_build_names_the_compiler_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CC", "false")
    with pytest.raises(kbuild.BuildError, match="false"):
        kbuild.build(tmp_path)
    assert not any((tmp_path / "kernels").iterdir())
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    with pytest.raises(kbuild.BuildError, match="no C compiler"):
        kbuild.build(tmp_path)


def test_a_build_is_reused_and_keyed_by_its_source(tmp_path: Path) -> None:
    first = kbuild.build(tmp_path)
    stamp = first.stat().st_mtime_ns
    assert kbuild.build(tmp_path) == first and first.stat().st_mtime_ns == stamp
    assert first.name.startswith("cpu_ops-") and first.parent == tmp_path / "kernels"


def test_packed_linear_follows_its_weight(kern: CpuKernelOps) -> None:
    """A packed copy is made on first use and remade after the weight is rebound or written
    in place; `forget` and the weight's death free it."""
    g = torch.Generator().manual_seed(7)
    w = torch.nn.Parameter(torch.randn(96, 40, generator=g), requires_grad=False)
    b = torch.randn(96, generator=g)
    x = torch.randn(SMALL_ROWS + 3, 40, generator=g)  # rows for the packed kernel
    before = kern.packed_bytes
    _close(kern.linear(x, w, b), TORCH.linear(x, w, b))
    assert kern.packed_bytes == before + w.numel() * 4
    with torch.no_grad():
        w[3:9].mul_(-2.0)  # in place, as the loader writes rows
    _close(kern.linear(x, w), TORCH.linear(x, w))
    w.data = torch.randn(96, 40, generator=g)  # rebound, as the arena and a drop do
    _close(kern.linear(x, w), TORCH.linear(x, w))
    assert kern.packed_bytes == before + w.numel() * 4
    kern.forget([w])
    assert kern.packed_bytes == before
    kern.linear(x, w)
    del w
    assert kern.packed_bytes == before


@pytest.mark.parametrize("rows", [SMALL_ROWS + 1, 13, 32, 64, PACKED_ROWS])
@pytest.mark.parametrize("n,k", [(1024, 512), (259, 512), (30, 24), (7, 40)])
def test_linear_of_decode_batches_runs_on_a_packed_copy(
    kern: CpuKernelOps, rows: int, n: int, k: int
) -> None:
    """9..PACKED_ROWS rows: cpu_ops.c's outer-product kernel on the packed copy (panels
    padded past n, tiles of uneven row counts), with and without a bias; more rows go to
    torch's GEMM on the plain weight."""
    g = torch.Generator().manual_seed(rows * n + k)
    w, b = torch.randn(n, k, generator=g), torch.randn(n, generator=g)
    x = torch.randn(rows, k, generator=g)
    before = kern.packed_bytes
    _close_sums(kern.linear(x, w, b), TORCH.linear(x, w, b))
    _close_sums(kern.linear(x.view(1, rows, k), w), TORCH.linear(x.view(1, rows, k), w))
    assert kern.packed_bytes > before
    kern.forget([w])
    big = torch.randn(PACKED_ROWS + 1, k, generator=g)
    _close_sums(kern.linear(big, w, b), TORCH.linear(big, w, b))
    assert kern.packed_bytes == before


@pytest.mark.parametrize("rows,n", [(64, 512), (40, 259), (PACKED_ROWS, 1024)])
def test_packed_linear_gives_the_same_bits_on_any_thread_count(
    kern: CpuKernelOps, rows: int, n: int
) -> None:
    """Threads split the outputs by (panel, row tile), a panel between two threads at
    their boundary: every output is still one tile's whole sum, so the bits never depend on
    how many threads ran (a tensor-parallel or pipelined replica may run with others)."""
    g = torch.Generator().manual_seed(rows + n)
    w, x = torch.randn(n, 512, generator=g), torch.randn(rows, 512, generator=g)
    threads = torch.get_num_threads()
    try:
        outs = []
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            outs.append(kern.linear(x, w))
    finally:
        torch.set_num_threads(threads)
    _close_sums(outs[0], TORCH.linear(x, w))
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    kern.forget([w])


@pytest.mark.parametrize("rows", [1, 2, 3, SMALL_ROWS])
@pytest.mark.parametrize("n,k", [(1024, 512), (259, 512), (30, 24), (7, 40)])
def test_linear_of_a_few_rows_streams_the_plain_weight(
    kern: CpuKernelOps, rows: int, n: int, k: int
) -> None:
    """Decode-sized inputs run cpu_ops.c's kernel on the weight as it is (no packed copy),
    also for shapes its 4-row / 8-wide blocks do not divide, with and without a bias."""
    g = torch.Generator().manual_seed(rows * n + k)
    w, b = torch.randn(n, k, generator=g), torch.randn(n, generator=g)
    x = torch.randn(rows, k, generator=g)
    before = kern.packed_bytes
    _close_sums(kern.linear(x, w, b), TORCH.linear(x, w, b))
    _close_sums(kern.linear(x.unsqueeze(0), w), TORCH.linear(x.unsqueeze(0), w))
    assert kern.packed_bytes == before
