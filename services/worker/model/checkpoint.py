"""Reading a local Hugging Face checkpoint's tensors into parameters, model-agnostic.

The model says where each checkpoint name goes (`Target`: a parameter and the rows of it
the tensor fills, our q/k/v and gate/up being fused); this module finds the safetensors
files, checks shapes and reports what is missing. It does not import the model, so both
the loader (a fresh model) and the model itself (restoring dropped layers) use it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from common.model.config import ModelConfig, ModelError

Target = tuple[torch.Tensor, slice | None]  # a parameter, and the rows to fill (None: all)


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


def checkpoint_names(
    cfg: ModelConfig, layers: Iterable[int], *, embed: bool, norm: bool, lm_head: bool
) -> Iterator[str]:
    """Checkpoint tensor names of `layers` and of the embedding / final norm / lm_head."""
    if embed:
        yield "model.embed_tokens.weight"
    if norm:
        yield "model.norm.weight"
    if lm_head:
        yield "lm_head.weight"
    for layer in layers:
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


def copy_tensors(
    folder: Path,
    target: Callable[[str], Target | None],
    expected: set[str],
    *,
    only_expected: bool = False,
) -> None:
    """Copy every checkpoint tensor that `target` maps into its parameter; raise ModelError
    naming any tensor of `expected` the checkpoint lacks. With `only_expected`, names outside
    `expected` are skipped unread (a partial load leaves the other parameters as they are)."""
    seen: set[str] = set()
    for path in checkpoint_files(folder):
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 - safe_open is not a Mapping
                    if only_expected and name not in expected:
                        continue
                    found = target(name)
                    if found is None:
                        continue
                    param, rows = found
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
