"""CUDA paths of the engine: the same greedy tokens on the GPU as on the CPU (float32), with
decode steps replayed from CUDA graphs (the default) and without, the xformers prefill
kernel where it imports, and a bfloat16 engine that runs end to end. Skipped on machines
without CUDA (see tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from common.sampling import SamplingParams
from services.worker.config import EngineConfig
from services.worker.engine import Engine
from tests.worker.helpers import prompt, run_to_end

pytestmark = pytest.mark.gpu
PARAMS = SamplingParams(max_tokens=24, ignore_eos=True)


def _engine(folder: Path, **kw: object) -> Engine:
    return Engine.from_config(EngineConfig(model=str(folder), num_kv_blocks=128, **kw))  # type: ignore[arg-type]


def _tokens(folder: Path, **kw: object) -> dict[str, list[int]]:
    engine = _engine(folder, **kw)
    for i in range(4):
        # staggered lengths: the batch shrinks through several graph buckets
        own = msgspec.structs.replace(PARAMS, max_tokens=PARAMS.max_tokens + 5 * i)
        engine.add_request(f"r{i}", prompt(20 + 9 * i, i), own)
    out = run_to_end(engine)
    engine.check_integrity()
    graphs = engine.runner.graphs
    assert (graphs is not None and graphs.replays > 0) == (
        kw.get("device") == "cuda" and kw.get("cuda_graphs", True)
    )
    return out


def test_cuda_float32_matches_cpu(tiny_folder: Path) -> None:
    assert _tokens(tiny_folder, device="cuda", dtype="float32") == _tokens(
        tiny_folder, dtype="float32"
    )


def test_cuda_graphs_match_eager_steps(tiny_folder: Path) -> None:
    graphed = _tokens(tiny_folder, device="cuda", dtype="float32")
    assert graphed == _tokens(tiny_folder, device="cuda", dtype="float32", cuda_graphs=False)


def test_cuda_graphs_recapture_after_weights_move(tiny_folder: Path) -> None:
    """A weight rebound to new memory mid-generation (a restore, an arena move), its old
    memory then zeroed: a graph still reading it would change the tokens. The graphs are
    dropped, the step's bucket is captured anew, and the tokens stay the eager ones."""
    expected = _tokens(tiny_folder, device="cuda", dtype="float32", cuda_graphs=False)
    engine = _engine(tiny_folder, device="cuda", dtype="float32")
    for i in range(4):
        own = msgspec.structs.replace(PARAMS, max_tokens=PARAMS.max_tokens + 5 * i)
        engine.add_request(f"r{i}", prompt(20 + 9 * i, i), own)
    out: dict[str, list[int]] = {}

    def step() -> None:
        for o in engine.step():
            out.setdefault(o.request_id, []).extend(o.new_token_ids)

    for _ in range(6):
        step()
    graphs = engine.runner.graphs
    assert graphs is not None and graphs.replays > 0
    before = graphs.captures
    weight = engine.model.layers[0].mlp.down_weight
    old = weight.data
    weight.data = old.clone()
    old.zero_()
    step()
    # only this step's bucket is held, captured anew
    assert graphs.captures == before + 1 and len(graphs._graphs) == 1
    for rid, toks in run_to_end(engine).items():
        out.setdefault(rid, []).extend(toks)
    assert out == expected


def test_cuda_bfloat16_runs(tiny_folder: Path) -> None:
    out = _tokens(tiny_folder, device="cuda", dtype="bfloat16")
    assert [len(out[f"r{i}"]) for i in range(4)] == [PARAMS.max_tokens + 5 * i for i in range(4)]


def test_xformers_prefill_matches_sdpa() -> None:
    import torch
    import torch.nn.functional as F

    from services.worker import attention

    if attention._xformers_fmha is None:
        pytest.skip("xformers is not installed (the `cuda` extra)")
    q = torch.randn(37, 8, 64, device="cuda")
    k = torch.randn(37, 2, 64, device="cuda")
    v = torch.randn(37, 2, 64, device="cuda")
    ours = attention._xformers_causal(q, k, v, 0.125)
    ref = F.scaled_dot_product_attention(
        q.transpose(0, 1),
        k.transpose(0, 1),
        v.transpose(0, 1),
        is_causal=True,
        scale=0.125,
        enable_gqa=True,
    ).transpose(0, 1)
    assert (ours - ref).abs().max().item() < 1e-3
