"""Load a local Hugging Face checkpoint folder into a `LlamaModel`.

Reads config.json (+ generation_config.json for eos ids), one `model.safetensors` or the
shards named by `model.safetensors.index.json`. Loading is data-driven: each checkpoint name
maps to (parameter, slice) of our fused layout (`LlamaModel.checkpoint_target`), so a
pipeline stage reads only the tensors of its own layers. A missing file, a missing tensor or
a tensor of the wrong shape is a `ModelError` that names it.
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

import torch

from common.model.config import ModelConfig, ModelError
from services.worker.model.checkpoint import checkpoint_files, copy_tensors
from services.worker.model.llama import LlamaModel

__all__ = ["checkpoint_files", "load_model", "load_weights"]


def load_weights(model: LlamaModel, folder: Path, *, only: Collection[str] | None = None) -> None:
    """Fill the model's parameters from the checkpoint in `folder`.

    `only` restricts the load to those checkpoint names (filling just the missing parts, as
    a restore after a parameter drop does); each must name a parameter the model holds, and
    the other parameters are left untouched. Without it every held parameter is loaded.
    """
    expected = set(model.held_checkpoint_names())
    if only is None:
        copy_tensors(folder, model.checkpoint_target, expected)
        return
    stray = sorted(set(only) - expected)
    if stray:
        raise ValueError(f"cannot load {', '.join(stray[:5])}: not held by this model")
    copy_tensors(folder, model.checkpoint_target, set(only), only_expected=True)


def load_model(
    folder: str | Path,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    first_layer: int = 0,
    last_layer: int | None = None,
    max_positions: int | None = None,
    kernels: bool = True,
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
        kernels=kernels,
    )
    load_weights(model, path)
    return model.eval(), cfg
