"""CUDA paths of the engine: the same greedy tokens on the GPU as on the CPU (float32), the
xformers prefill kernel where it imports, and a bfloat16 engine that runs end to end.
Skipped on machines without CUDA (see tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.sampling import SamplingParams
from services.worker.config import EngineConfig
from services.worker.engine import Engine
from tests.worker.helpers import prompt, run_to_end

pytestmark = pytest.mark.gpu
PARAMS = SamplingParams(max_tokens=24, ignore_eos=True)


def _tokens(folder: Path, **kw: object) -> dict[str, list[int]]:
    engine = Engine.from_config(EngineConfig(model=str(folder), num_kv_blocks=128, **kw))  # type: ignore[arg-type]
    for i in range(4):
        engine.add_request(f"r{i}", prompt(20 + 9 * i, i), PARAMS)
    out = run_to_end(engine)
    engine.check_integrity()
    return out


def test_cuda_float32_matches_cpu(tiny_folder: Path) -> None:
    assert _tokens(tiny_folder, device="cuda", dtype="float32") == _tokens(
        tiny_folder, dtype="float32"
    )


def test_cuda_bfloat16_runs(tiny_folder: Path) -> None:
    out = _tokens(tiny_folder, device="cuda", dtype="bfloat16")
    assert all(len(v) == 24 for v in out.values())


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
