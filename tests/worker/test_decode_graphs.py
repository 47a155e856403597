"""Decode graphs' bucketing, padding and recapture (services/worker/decode_graphs.py), on
the CPU: the same runner code records steps with `eager_capture` here and with CUDA
graphs in test_gpu.py (`make gpu-check`). A padded step must leave the tokens and the KV
cache exactly as the plain step does."""

from __future__ import annotations

import msgspec
import pytest
import torch

from common.sampling import SamplingParams
from services.worker.decode_graphs import (
    DecodeGraphs,
    Step,
    batch_buckets,
    eager_capture,
    width_buckets,
)
from services.worker.engine import Engine
from tests.worker.helpers import MakeEngine, prompt, run_to_end


@pytest.mark.parametrize("largest", [1, 5, 8, 64, 100, 256])
def test_batch_buckets_cover_every_batch_up_to_the_largest(largest: int) -> None:
    sizes = batch_buckets(largest)
    assert sizes == sorted(set(sizes)) and sizes[0] == 1 and sizes[-1] == largest
    # every batch has a bucket, and small ones waste few rows
    for n in range(1, largest + 1):
        b = min(s for s in sizes if s >= n)
        assert b < 2 * n if n <= 8 else b - n < 16


@pytest.mark.parametrize("largest", [1, 2, 3, 64, 100])
def test_width_buckets_at_most_double_a_table(largest: int) -> None:
    widths = width_buckets(largest)
    assert widths[0] == 1 and widths[-1] == largest and widths == sorted(set(widths))
    for n in range(1, largest + 1):
        assert min(w for w in widths if w >= n) < 2 * n


def _with_graphs(engine: Engine, max_batch: int, max_blocks: int) -> DecodeGraphs:
    graphs = DecodeGraphs(engine.model, max_batch, max_blocks, eager_capture)
    engine.runner.graphs = graphs
    return graphs


def _serve(engine: Engine, n: int, params: SamplingParams) -> dict[str, list[int]]:
    """Prompts across several block-table widths (block size 16); requests finishing one
    after another, so the batch shrinks through several buckets."""
    for i in range(n):
        own = msgspec.structs.replace(params, max_tokens=params.max_tokens + 3 * i)
        engine.add_request(f"r{i}", prompt(5 + 23 * i, i), own)
    return run_to_end(engine)


@pytest.mark.parametrize("kernels", [True, False], ids=["kernels", "torch"])
@pytest.mark.parametrize("n", [3, 5, 11])
@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(max_tokens=20, ignore_eos=True),
        SamplingParams(max_tokens=20, ignore_eos=True, temperature=0.9, top_p=0.9, seed=7),
    ],
    ids=["greedy", "seeded"],
)
def test_padded_steps_give_the_plain_steps_tokens_and_cache(
    make_engine: MakeEngine, n: int, params: SamplingParams, kernels: bool
) -> None:
    """Batches of 3, 5 and 11 run in buckets of 4, 8 and 16 (rows repeating row 0), tables
    widened to powers of two: same tokens, same KV cache (bit for bit on this machine's
    kernels), no block leaked. Also on the torch ops CUDA runs (duplicate index_put
    writes, the gather of the padded tables, SDPA)."""
    plain = make_engine(num_kv_blocks=96, kernels=kernels)
    graphed = make_engine(num_kv_blocks=96, kernels=kernels)
    graphs = _with_graphs(graphed, max_batch=16, max_blocks=32)
    expected = _serve(plain, n, params)
    assert _serve(graphed, n, params) == expected
    assert graphs.captures >= 2  # several buckets were used
    if kernels:  # row-wise kernels: a row's results do not depend on the batch
        assert torch.equal(graphed.cache.tensor, plain.cache.tensor)
    else:  # torch's GEMM and SDPA pick other blockings for other shapes: last bits differ
        torch.testing.assert_close(graphed.cache.tensor, plain.cache.tensor)


def test_steps_no_bucket_fits_run_eagerly(make_engine: MakeEngine) -> None:
    """More decodes than the largest bucket, or a table wider than the widest: the plain
    step; the rest replay. Same tokens either way."""
    params = SamplingParams(max_tokens=12, ignore_eos=True)

    def serve(engine: Engine) -> dict[str, list[int]]:
        for i in range(6):  # 5-token prompts: 2 blocks until the last 4 tokens
            own = msgspec.structs.replace(params, max_tokens=12 + 3 * i)
            engine.add_request(f"r{i}", prompt(5, i), own)
        return run_to_end(engine)

    expected = serve(make_engine(num_kv_blocks=96))
    narrow = make_engine(num_kv_blocks=96)
    graphs = _with_graphs(narrow, max_batch=4, max_blocks=2)
    assert serve(narrow) == expected
    assert graphs.misses > 0 and graphs.replays > 0
    assert all(b <= 4 and w <= 2 for b, w in graphs._graphs)


def test_moved_weights_drop_the_captured_steps(make_engine: MakeEngine) -> None:
    """A parameter rebound to new memory (what a KunServe restore or an arena move does)
    changes the fingerprint: every graph is dropped and the next step captures anew."""
    engine = make_engine(num_kv_blocks=64)
    graphs = _with_graphs(engine, max_batch=8, max_blocks=16)
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    engine.add_request("a", prompt(9, 1), params)
    engine.add_request("b", prompt(30, 2), params)
    for _ in range(3):
        engine.step()
    held, before = dict(graphs._graphs), graphs.captures
    assert held
    weight = engine.model.layers[0].mlp.down_weight
    weight.data = weight.data.clone()
    engine.step()
    # only this step's bucket is held, captured anew
    assert graphs.captures == before + 1 and len(graphs._graphs) == 1
    assert all(replay not in held.values() for replay in graphs._graphs.values())
    run_to_end(engine)


def test_a_failed_capture_leaves_its_bucket_to_eager_steps(make_engine: MakeEngine) -> None:
    """A capture that raises (as CUDA's may) costs the bucket its graph, never a request:
    the step and every later one of that bucket run eagerly, with the plain tokens."""
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    expected = _serve(make_engine(num_kv_blocks=96), 3, params)
    engine = make_engine(num_kv_blocks=96)
    tried: list[int] = []

    def failing(step: Step) -> Step:
        tried.append(1)
        raise RuntimeError("operation not permitted when stream is capturing")

    graphs = DecodeGraphs(engine.model, 8, 32, failing)
    engine.runner.graphs = graphs
    assert _serve(engine, 3, params) == expected
    assert graphs.replays == 0 and graphs.captures == 0 and graphs.misses > len(tried)
    assert len(tried) == len(graphs._failed) > 0  # one try per bucket


def test_graphs_refuse_a_model_without_every_layer(make_engine: MakeEngine) -> None:
    from services.worker.model.llama import LlamaModel

    full = make_engine(num_kv_blocks=8).model
    stage = LlamaModel(full.cfg, first_layer=1)
    with pytest.raises(ValueError, match="every layer"):
        DecodeGraphs(stage, 4, 4, eager_capture)
    with pytest.raises(ValueError, match="must be > 0"):
        DecodeGraphs(full, 0, 4, eager_capture)


def test_cuda_graphs_option_leaves_a_cpu_engine_eager(make_engine: MakeEngine) -> None:
    """`cuda_graphs` (on by default) is a CUDA option: a CPU engine holds no graphs."""
    assert make_engine(num_kv_blocks=8, cuda_graphs=True).runner.graphs is None
