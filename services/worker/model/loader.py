"""Load a local Hugging Face checkpoint folder into a `LlamaModel`.

Reads config.json (+ generation_config.json for eos ids), one `model.safetensors` or the
shards named by `model.safetensors.index.json`. Loading is data-driven: each checkpoint name
maps to (parameter, slice) of our fused layout, so a pipeline stage reads only the tensors
of its own layers. A missing file, a missing tensor or a tensor of the wrong shape is a
`ModelError` that names it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import torch
from safetensors import SafetensorError, safe_open

from common.model.config import ModelConfig, ModelError
from services.worker.model.llama import DecoderLayer, LlamaModel

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def checkpoint_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ModelError(f"{index}: malformed index: {exc}") from None
        files = [folder / name for name in sorted(set(weight_map.values()))]
    else:
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise ModelError(f"{folder}: no *.safetensors weights found")
    for f in files:
        if not f.is_file():
            raise ModelError(f"{f}: weight file named by the index is missing")
    return files


def _targets(model: LlamaModel, name: str) -> tuple[torch.Tensor, slice | None] | None:
    """Map a checkpoint tensor name to (our parameter, rows to fill), or None to skip."""
    cfg = model.cfg
    if name == "model.embed_tokens.weight":
        return (model.embed_tokens, None) if model.embed_tokens is not None else None
    if name == "lm_head.weight":
        return (model.lm_head, None) if model.lm_head is not None else None
    if name == "model.norm.weight":
        return (model.norm.weight, None) if model.norm is not None else None
    m = _LAYER.match(name)
    if m is None:
        return None
    layer = int(m.group(1))
    if not model.first_layer <= layer < model.last_layer:
        return None
    dec = cast(DecoderLayer, model.layers[layer - model.first_layer])
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


def _expected_names(model: LlamaModel) -> Iterator[str]:
    cfg = model.cfg
    if model.is_first or (model.is_last and cfg.tie_word_embeddings):
        yield "model.embed_tokens.weight"
    if model.is_last:
        yield "model.norm.weight"
        if not cfg.tie_word_embeddings:
            yield "lm_head.weight"
    for layer in range(model.first_layer, model.last_layer):
        p = f"model.layers.{layer}."
        yield p + "input_layernorm.weight"
        yield p + "post_attention_layernorm.weight"
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            yield f"{p}self_attn.{proj}.weight"
        if cfg.qkv_bias:
            for proj in ("q_proj", "k_proj", "v_proj"):
                yield f"{p}self_attn.{proj}.bias"
        if cfg.o_bias:
            yield f"{p}self_attn.o_proj.bias"
        for proj in ("gate_proj", "up_proj", "down_proj"):
            yield f"{p}mlp.{proj}.weight"
            if cfg.mlp_bias:
                yield f"{p}mlp.{proj}.bias"


def load_weights(model: LlamaModel, folder: Path) -> None:
    expected = set(_expected_names(model))
    seen: set[str] = set()
    for path in checkpoint_files(folder):
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 - safe_open is not a Mapping
                    target = _targets(model, name)
                    if target is None:
                        continue
                    param, rows = target
                    dest = param.data if rows is None else param.data[rows]
                    tensor = f.get_tensor(name)
                    if tuple(tensor.shape) != tuple(dest.shape):
                        raise ModelError(
                            f"{path.name}: tensor {name} has shape {tuple(tensor.shape)}, "
                            f"expected {tuple(dest.shape)} from config.json"
                        )
                    dest.copy_(tensor.to(dtype=dest.dtype))
                    seen.add(name)
        except SafetensorError as exc:
            raise ModelError(f"{path}: unreadable safetensors file: {exc}") from None
    # A tied checkpoint may still carry lm_head.weight; an untied one may not omit it.
    missing = sorted(expected - seen)
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise ModelError(f"{folder}: checkpoint lacks {len(missing)} tensor(s): {shown}")


def load_model(
    folder: str | Path,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    first_layer: int = 0,
    last_layer: int | None = None,
    max_positions: int | None = None,
) -> tuple[LlamaModel, ModelConfig]:
    path = Path(folder)
    if not path.is_dir():
        raise ModelError(f"{path}: model folder does not exist")
    cfg = ModelConfig.from_folder(path)
    model = LlamaModel(
        cfg,
        first_layer=first_layer,
        last_layer=last_layer,
        dtype=dtype or torch.float32,
        device=device,
        max_positions=max_positions,
    )
    load_weights(model, path)
    return model.eval(), cfg
