"""Our model against transformers on the same weights: logits within 1e-4 (float32) and
identical greedy continuations of 32 tokens, for every supported architecture, on this
machine's kernels and on the plain torch code."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from common.sampling import SamplingParams
from services.worker.config import EngineConfig
from services.worker.engine import Engine
from services.worker.kernels.ops import SMALL_ROWS, TorchOps
from services.worker.model.loader import checkpoint_files
from tests.worker.helpers import run_to_end, save_reference

CASES = {
    "llama": dict(kind="llama"),
    "llama3-rope-tied": dict(
        kind="llama",
        tie_word_embeddings=True,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
        rope_theta=500000.0,
    ),
    "llama-sharded": dict(kind="llama", shard_size="100KB"),
    "llama-bias": dict(kind="llama", attention_bias=True, mlp_bias=True, head_dim=24),
    "mistral-sliding": dict(kind="mistral", sliding_window=16),
    "qwen2-bias": dict(kind="qwen2"),
}

PROMPT = [5, 17, 42, 99, 7, 3, 150, 61, 23, 88, 12, 200, 33, 4, 71, 9, 130, 55, 66, 77, 8, 19, 140]


@pytest.fixture(scope="module", params=sorted(CASES))
def reference(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, Path, torch.nn.Module]:
    case = dict(CASES[request.param])
    kind = str(case.pop("kind"))
    folder = tmp_path_factory.mktemp(request.param)
    model = save_reference(kind, folder, **case)  # type: ignore[arg-type]
    return request.param, folder, model


def _engine(folder: Path, **kw: object) -> Engine:
    return Engine.from_config(EngineConfig(model=str(folder), num_kv_blocks=64, **kw))  # type: ignore[arg-type]


def test_logits_match_transformers(reference: tuple[str, Path, torch.nn.Module]) -> None:
    name, folder, hf = reference
    if name == "llama-sharded":
        assert len(checkpoint_files(folder)) > 1, "the sharded case must really be sharded"
    engine = _engine(folder)
    ids = torch.tensor(PROMPT)
    # Prefill through the paged path: one request, all prompt tokens, logits at every position.
    from services.worker.scheduler import ScheduledChunk

    req = engine.add_request("r", PROMPT, SamplingParams(max_tokens=1))
    sched = engine.scheduler.schedule()
    assert [c.num_tokens for c in sched.chunks] == [len(PROMPT)]
    _, token_ids, meta = engine.runner.build_metadata([ScheduledChunk(req, len(PROMPT))])
    with torch.inference_mode():
        hidden = engine.model(engine.model.embed(torch.tensor(token_ids)), meta, engine.cache)
        ours = engine.model.compute_logits(hidden)
        ref = hf(ids.unsqueeze(0)).logits[0]
    diff = (ours - ref).abs().max().item()
    assert diff <= 1e-4, f"{name}: max abs logit difference {diff}"


@pytest.mark.parametrize("kernels", [True, False], ids=["kernels", "torch"])
def test_forward_of_some_rows_matches_every_row(
    reference: tuple[str, Path, torch.nn.Module], kernels: bool
) -> None:
    """`rows` (the sampled rows of a step): the same hidden states as the full forward's
    rows, in the asked order, and the same K/V written for every row."""
    name, folder, _ = reference
    from services.worker.scheduler import ScheduledChunk

    engine = _engine(folder, kernels=kernels)
    req = engine.add_request("r", PROMPT, SamplingParams(max_tokens=1))
    assert [c.num_tokens for c in engine.scheduler.schedule().chunks] == [len(PROMPT)]
    _, token_ids, meta = engine.runner.build_metadata([ScheduledChunk(req, len(PROMPT))])
    ids = torch.tensor(token_ids)
    with torch.inference_mode():
        full = engine.model(engine.model.embed(ids), meta, engine.cache)
        kv_full = engine.cache.tensor.clone()
        engine.cache.tensor.zero_()
        rows = torch.tensor([len(PROMPT) - 1, 3, 0])
        some = engine.model(engine.model.embed(ids), meta, engine.cache, rows=rows)
        assert torch.equal(engine.cache.tensor, kv_full), f"{name}: K/V differ"
        none = engine.model(engine.model.embed(ids), meta, engine.cache, rows=rows[:0])
    assert some.shape == (3, full.shape[1]) and none.shape == (0, full.shape[1])
    torch.testing.assert_close(some, full[rows], rtol=1e-5, atol=1e-5)
    engine.check_integrity()


@pytest.mark.parametrize("kernels", [True, False], ids=["kernels", "torch"])
def test_greedy_continuation_matches_transformers(
    reference: tuple[str, Path, torch.nn.Module], kernels: bool
) -> None:
    """Both ways the engine can run a float32 CPU model (services/worker/kernels/ops.py)."""
    name, folder, hf = reference
    engine = _engine(folder, kernels=kernels)
    engine.add_request("r", PROMPT, SamplingParams(max_tokens=32, ignore_eos=True))
    ours = run_to_end(engine)["r"]
    with torch.inference_mode():
        out = hf.generate(
            torch.tensor([PROMPT]),
            attention_mask=torch.ones(1, len(PROMPT), dtype=torch.long),
            max_new_tokens=32,
            min_new_tokens=32,
            do_sample=False,
            pad_token_id=0,
        )
    ref = out[0, len(PROMPT) :].tolist()
    assert ours == ref, f"{name}: greedy continuation differs"
    assert len(set(ours)) > 4, "a degenerate continuation would not test much"
    engine.check_integrity()


@pytest.mark.parametrize("sequences", [1, 3, SMALL_ROWS + 1, 40])
def test_a_decode_step_in_one_call_gives_the_layer_loops_bits(
    reference: tuple[str, Path, torch.nn.Module],
    sequences: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A decode step's layers in one kernel call (ops.decode_layers: cpu_ops.c runs the
    kernels the layer loop calls, in its order) against the layer loop on the same
    kernels: the same hidden states and the same K/V, bit for bit; on the small-rows and
    the packed matmuls, with biases, sliding windows and odd head sizes."""
    name, folder, _ = reference
    engine = Engine.from_config(EngineConfig(model=str(folder), num_kv_blocks=256))
    ops = engine.model.ops
    assert 0 < sequences <= ops.fused_decode_rows, "this machine's kernels must be built"
    for i in range(sequences):
        # contexts of 5..22 tokens: sequences end in different blocks
        engine.add_request(f"r{i}", PROMPT[: 5 + (7 * i) % 18], SamplingParams(max_tokens=4))
    engine.step()  # every prompt's prefill
    chunks = engine.scheduler.schedule().chunks
    assert all(c.num_tokens == 1 for c in chunks) and len(chunks) == sequences
    _, token_ids, meta = engine.runner.build_metadata(list(chunks))
    calls: list[int] = []
    one_call = ops.decode_layers
    monkeypatch.setattr(
        ops,
        "decode_layers",
        lambda *a: calls.append(1) or one_call(*a),  # type: ignore[func-returns-value]
    )
    before = engine.cache.tensor.clone()
    with torch.inference_mode():
        hidden = engine.model.embed(torch.tensor(token_ids))
        fused = engine.model(hidden, meta, engine.cache)
        kv_fused = engine.cache.tensor.clone()
        engine.cache.tensor.copy_(before)
        monkeypatch.setattr(ops, "fused_decode_rows", 0)
        looped = engine.model(hidden, meta, engine.cache)
    assert calls == [1], "the first forward must have taken the one call"
    assert torch.equal(fused, looped), f"{name}: hidden states differ"
    assert torch.equal(kv_fused, engine.cache.tensor), f"{name}: K/V differ"
    assert not torch.equal(kv_fused, before), "the step wrote no K/V"
    engine.check_integrity()


def test_a_layers_weights_follow_a_conversion_that_makes_new_parameters() -> None:
    """`DecoderLayer.weights` (what the one-call decode step reads) names the Parameter
    objects the module holds, also after a `.to()` that replaces them."""
    from common.model.config import ModelConfig
    from services.worker.model.llama import DecoderLayer

    cfg = ModelConfig.from_dict(
        dict(
            architectures=["LlamaForCausalLM"],
            vocab_size=64,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    layer = DecoderLayer(cfg, 0, torch.float32, torch.device("cpu"), TorchOps())
    old = layer.weights
    replacing = torch.__future__.get_overwrite_module_params_on_conversion()
    torch.__future__.set_overwrite_module_params_on_conversion(True)
    try:
        layer.to(torch.float64)
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(replacing)
    assert layer.self_attn.qkv_weight is not old.qkv, "the conversion made new Parameters"
    held = dict(layer.named_parameters())
    want = (
        held["input_layernorm.weight"],
        held["self_attn.qkv_weight"],
        None,
        held["self_attn.o_weight"],
        None,
        held["post_attention_layernorm.weight"],
        held["mlp.gate_up_weight"],
        None,
        held["mlp.down_weight"],
        None,
    )
    assert all(a is b for a, b in zip(layer.weights, want, strict=True))
