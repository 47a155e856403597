"""A model folder that cannot be served gets one clear error naming the file and the cause."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from common.model.config import ModelError
from services.worker.model.loader import load_model


@pytest.fixture
def folder(tiny_folder: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "model"
    shutil.copytree(tiny_folder, dst)
    return dst


def edit_config(folder: Path, **changes: object) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="does not exist"):
        load_model(tmp_path / "nope")


def test_missing_config(folder: Path) -> None:
    (folder / "config.json").unlink()
    with pytest.raises(ModelError, match="no config.json"):
        load_model(folder)


def test_malformed_config(folder: Path) -> None:
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match="malformed JSON"):
        load_model(folder)


def test_missing_key(folder: Path) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    del cfg["hidden_size"]
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="hidden_size"):
        load_model(folder)


def test_unsupported_architecture(folder: Path) -> None:
    edit_config(folder, architectures=["GPT2LMHeadModel"], model_type="gpt2")
    with pytest.raises(ModelError, match="unsupported architecture GPT2LMHeadModel"):
        load_model(folder)


def test_unsupported_activation(folder: Path) -> None:
    edit_config(folder, hidden_act="gelu")
    with pytest.raises(ModelError, match="hidden_act"):
        load_model(folder)


def test_no_weights(folder: Path) -> None:
    (folder / "model.safetensors").unlink()
    with pytest.raises(ModelError, match="no \\*.safetensors"):
        load_model(folder)


def test_tensor_of_wrong_shape(folder: Path) -> None:
    weights = load_file(folder / "model.safetensors")
    weights["model.layers.1.mlp.up_proj.weight"] = torch.zeros(7, 7)
    save_file(weights, folder / "model.safetensors")
    with pytest.raises(ModelError, match=r"model.layers.1.mlp.up_proj.weight has shape \(7, 7\)"):
        load_model(folder)


def test_missing_tensor(folder: Path) -> None:
    weights = load_file(folder / "model.safetensors")
    del weights["model.layers.2.self_attn.k_proj.weight"]
    save_file(weights, folder / "model.safetensors")
    with pytest.raises(ModelError, match="lacks 1 tensor.*layers.2.self_attn.k_proj"):
        load_model(folder)


def test_missing_shard(folder: Path) -> None:
    index = {"weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(
        ModelError,
        match="model-00001-of-00002.safetensors: weight file named by the index is missing",
    ):
        load_model(folder)


def test_corrupt_weights(folder: Path) -> None:
    (folder / "model.safetensors").write_bytes(b"\x00\x01garbage")
    with pytest.raises(ModelError, match="unreadable safetensors"):
        load_model(folder)


def test_eos_ids_come_from_generation_config(folder: Path) -> None:
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    _, cfg = load_model(folder)
    assert cfg.eos_token_ids == (2, 7)
