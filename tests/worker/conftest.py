"""Fixtures for the engine tests: the embedded tiny model, and small random checkpoints
written by transformers' own `save_pretrained` for reference comparisons."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from common.model.presets import materialize
from services.worker.config import EngineConfig
from services.worker.engine import Engine


@pytest.fixture(scope="session")
def tiny_folder() -> Path:
    return materialize("tiny")


@pytest.fixture
def make_engine(tiny_folder: Path) -> Iterator[object]:
    engines: list[Engine] = []

    def make(**overrides: object) -> Engine:
        cfg = EngineConfig(model=str(tiny_folder), **overrides)  # type: ignore[arg-type]
        engine = Engine.from_config(cfg)
        engines.append(engine)
        return engine

    yield make
    for e in engines:
        if not e.has_unfinished():
            e.check_integrity()


def save_reference(
    kind: str, folder: Path, *, shard_size: str = "2GB", **overrides: object
) -> torch.nn.Module:
    """Build a small random transformers model of `kind`, save it to `folder`, return it."""
    import transformers

    common: dict[str, object] = dict(
        vocab_size=211,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
    )
    common.update(overrides)
    cls_cfg, cls_model = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[kind]
    torch.manual_seed(0)
    model = cls_model(cls_cfg(**common)).eval()
    # Larger weights than the default init: activations of unit scale make logits spread
    # and greedy continuations vary, so a comparison of 32 tokens is a real test.
    # A tied embedding doubles as the lm_head, where unit-scale rows would make every token
    # predict itself; it gets the 1/sqrt(fan_in) scale of the other matrices.
    embed_std = (
        1.0 if not common.get("tie_word_embeddings") else float(common["hidden_size"]) ** -0.5
    )  # type: ignore[arg-type]
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, embed_std if "embed" in name else p.shape[-1] ** -0.5)
            elif "bias" in name:
                p.normal_(0.0, 0.1)
    model.save_pretrained(folder, max_shard_size=shard_size)
    return model


def run_to_end(engine: Engine) -> dict[str, list[int]]:
    """Step until idle; return each request's generated tokens."""
    tokens: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
    return tokens
