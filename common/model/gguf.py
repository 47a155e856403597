"""A GGUF file (llama.cpp's format) converted into a Hugging Face folder in the model cache.

The serving path reads only Hugging Face folders (config.json + safetensors +
tokenizer.json), so a GGUF is converted once and then loaded like any checkpoint:

    config.json             LlamaForCausalLM from the `llama.*` metadata; tied embeddings
                            when the file has no `output.weight`
    generation_config.json  bos / eos ids
    model.safetensors       float32, transformers' tensor names (quantized tensors are
                            dequantized; q/k rows un-permuted, see `_unpermute`)
    tokenizer.json          rebuilt from the vocabulary (common/model/gguf_tokenizer.py)
    tokenizer_config.json   special tokens' strings, add_bos_token, the chat template

Only the `llama` architecture without biases, MoE or llama3 rope factors is supported;
anything else (another architecture, a tensor this layout lacks, a quantization type
`gguf` cannot dequantize, a truncated file) is a `ModelError` that names it, raised before
anything is written. The folder name carries a digest of the file (its size, first and
last MiB) and of `CONVERTER_VERSION`, so a changed file or converter never reuses a stale
folder; see common/model/cache.py for how it is published.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from common.model.cache import models_dir, publish_folder
from common.model.config import ModelError

if TYPE_CHECKING:
    from gguf import GGUFReader, ReaderField, ReaderTensor

# Bump when the written folder changes: the digest changes with it, so old folders are
# never reused.
CONVERTER_VERSION = 1
_SAMPLE_BYTES = 1 << 20

# GGUF tensor suffix of a layer -> transformers name (after `model.layers.N.`).
_LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_TOP_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAME = re.compile(r"blk\.(\d+)\.(.+)")


def gguf_digest(path: Path) -> str:
    """12 hex digits naming this file's conversion: its size, first and last MiB, and the
    converter version (hashing all of a multi-GiB file on every start would be slow)."""
    h = hashlib.sha256(f"memserve-gguf:{CONVERTER_VERSION}:".encode())
    size = path.stat().st_size
    h.update(str(size).encode())
    with path.open("rb") as f:
        h.update(f.read(_SAMPLE_BYTES))
        if size > _SAMPLE_BYTES:
            f.seek(max(_SAMPLE_BYTES, size - _SAMPLE_BYTES))
            h.update(f.read())
    return h.hexdigest()[:12]


def convert_gguf(path: str | Path, *, name: str | None = None, root: Path | None = None) -> Path:
    """Return the cached Hugging Face folder of the GGUF at `path`, converting it first if
    it is not cached yet. `name` prefixes the folder name (default: the file's stem)."""
    src = Path(path)
    if not src.is_file():
        raise ModelError(f"{src}: GGUF file does not exist")
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", name or src.stem).strip(".-") or "gguf"
    folder = models_dir(root) / f"{stem}-{gguf_digest(src)}"
    return publish_folder(folder, lambda tmp: write_hf_folder(src, tmp))


def write_hf_folder(src: Path, dest: Path) -> None:
    """Write the Hugging Face files of the GGUF `src` into the existing folder `dest`."""
    from safetensors.numpy import save_file

    from common.model.gguf_tokenizer import build_tokenizer

    reader = _open(src)
    meta = read_metadata(reader, src)
    tensors = {t.name: t for t in reader.tensors}
    config = hf_config(meta, tensors, src)
    try:
        tokenizer, tok_config = build_tokenizer(meta)
    except ModelError as exc:
        raise ModelError(f"{src}: {exc}") from None
    except Exception as exc:  # the tokenizers library raises plain Exceptions
        raise ModelError(f"{src}: cannot build the tokenizer: {exc}") from None
    if tokenizer.get_vocab_size(with_added_tokens=True) > config["vocab_size"]:
        raise ModelError(
            f"{src}: the tokenizer has {tokenizer.get_vocab_size()} tokens, more than the "
            f"model's vocab_size {config['vocab_size']}"
        )
    weights = dict(_hf_weights(tensors, config, src))
    (dest / "config.json").write_text(json.dumps(config, indent=2))
    gen = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in config}
    (dest / "generation_config.json").write_text(json.dumps(gen, indent=2))
    tokenizer.save(str(dest / "tokenizer.json"))
    (dest / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))
    (dest / "gguf_source.json").write_text(
        json.dumps(
            {
                "file": src.name,
                "converter_version": CONVERTER_VERSION,
                "name": meta.get("general.name"),
            },
            indent=2,
        )
    )
    save_file(weights, str(dest / "model.safetensors"), metadata={"format": "pt"})


def _open(src: Path) -> GGUFReader:
    from gguf import GGUFReader

    try:
        return GGUFReader(src)
    except Exception as exc:  # gguf raises ValueError, struct / numpy errors on bad bytes
        raise ModelError(
            f"{src}: not a readable GGUF file (truncated or corrupt?): {exc}"
        ) from None


def read_metadata(reader: GGUFReader, src: Path) -> dict[str, Any]:
    """Every key-value pair of the file: scalars as Python values, strings decoded, arrays
    as lists."""
    try:
        return {key: _value(field) for key, field in reader.fields.items()}
    except (UnicodeDecodeError, IndexError, ValueError) as exc:
        raise ModelError(f"{src}: malformed GGUF metadata: {exc}") from None


def _value(field: ReaderField) -> Any:
    from gguf import GGUFValueType

    if not field.types:
        return None
    kind = field.types[-1]
    parts = [field.parts[i] for i in field.data]

    def one(part: Any) -> Any:
        if kind == GGUFValueType.STRING:
            return bytes(part).decode("utf-8")
        if kind == GGUFValueType.FLOAT32:
            # The shortest decimal that is this float32 (1e-05, not 9.999999747378752e-06).
            return float(str(np.float32(part[0])))
        if kind == GGUFValueType.BOOL:
            return bool(part[0])
        return part[0].item()

    if field.types[0] == GGUFValueType.ARRAY:
        if len(field.types) > 2:
            return None  # nested arrays: no key this converter reads has them
        return [one(p) for p in parts]
    return one(parts[0])


def hf_config(meta: dict[str, Any], tensors: dict[str, Any], src: Path) -> dict[str, Any]:
    """transformers' config.json of a llama GGUF, after checking every tensor the layout
    needs is present and nothing it cannot place is."""
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ModelError(
            f"{src}: unsupported GGUF architecture general.architecture={arch!r} (supported: llama)"
        )

    def need(key: str) -> int:
        value = meta.get(f"llama.{key}")
        if value is None:
            raise ModelError(f"{src}: GGUF metadata lacks llama.{key}")
        return int(value)

    if meta.get("llama.expert_count"):
        raise ModelError(f"{src}: mixture-of-experts llama GGUFs are not supported")
    hidden, heads = need("embedding_length"), need("attention.head_count")
    layers = need("block_count")
    kv_heads = int(meta.get("llama.attention.head_count_kv") or heads)
    head_dim = int(meta.get("llama.attention.key_length") or hidden // heads)
    value_dim = int(meta.get("llama.attention.value_length") or head_dim)
    if value_dim != head_dim:
        raise ModelError(
            f"{src}: attention.value_length {value_dim} differs from key_length {head_dim}"
        )
    rotary = int(meta.get("llama.rope.dimension_count") or head_dim)
    if rotary != head_dim:
        raise ModelError(
            f"{src}: partial rotary embeddings (rope.dimension_count={rotary}, "
            f"head dim {head_dim}) are not supported"
        )
    tokens = meta.get("tokenizer.ggml.tokens") or []
    vocab = int(meta.get("llama.vocab_size") or len(tokens))
    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": need("feed_forward_length"),
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "max_position_embeddings": int(meta.get("llama.context_length") or 2048),
        "rms_norm_eps": float(meta.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(meta.get("llama.rope.freq_base", 10000.0)),
        "hidden_act": "silu",
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": "float32",
    }
    scaling = meta.get("llama.rope.scaling.type")
    if scaling not in (None, "none"):
        if scaling != "linear":
            raise ModelError(f"{src}: unsupported rope scaling llama.rope.scaling.type={scaling!r}")
        factor = float(meta.get("llama.rope.scaling.factor", 1.0))
        config["rope_scaling"] = {"rope_type": "linear", "factor": factor}
    for key, hf_key in (
        ("bos_token_id", "bos_token_id"),
        ("eos_token_id", "eos_token_id"),
        ("padding_token_id", "pad_token_id"),
    ):
        if f"tokenizer.ggml.{key}" in meta:
            config[hf_key] = int(meta[f"tokenizer.ggml.{key}"])
    _check_tensors(tensors, config, src)
    return config


def _hf_name(gguf_name: str, layers: int) -> str | None:
    if gguf_name in _TOP_TENSORS:
        return _TOP_TENSORS[gguf_name]
    m = _LAYER_NAME.fullmatch(gguf_name)
    if m and int(m.group(1)) < layers and m.group(2) in _LAYER_TENSORS:
        return f"model.layers.{m.group(1)}.{_LAYER_TENSORS[m.group(2)]}"
    return None


def _gguf_name(hf_name: str) -> str:
    """The GGUF name of a transformers tensor name (for messages)."""
    top = {v: k for k, v in _TOP_TENSORS.items()}
    if hf_name in top:
        return top[hf_name]
    layer, _, suffix = hf_name.removeprefix("model.layers.").partition(".")
    gguf_suffix = {v: k for k, v in _LAYER_TENSORS.items()}[suffix]
    return f"blk.{layer}.{gguf_suffix}"


def _expected_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    h, i, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    q = config["num_attention_heads"] * config["head_dim"]
    kv = config["num_key_value_heads"] * config["head_dim"]
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (v, h),
        "model.norm.weight": (h,),
    }
    if not config["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (v, h)
    per_layer = {
        "input_layernorm.weight": (h,),
        "post_attention_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (q, h),
        "self_attn.k_proj.weight": (kv, h),
        "self_attn.v_proj.weight": (kv, h),
        "self_attn.o_proj.weight": (h, q),
        "mlp.gate_proj.weight": (i, h),
        "mlp.up_proj.weight": (i, h),
        "mlp.down_proj.weight": (h, i),
    }
    for layer in range(config["num_hidden_layers"]):
        for suffix, shape in per_layer.items():
            shapes[f"model.layers.{layer}.{suffix}"] = shape
    return shapes


def _check_tensors(tensors: dict[str, ReaderTensor], config: dict[str, Any], src: Path) -> None:
    from gguf import GGMLQuantizationType

    layers = config["num_hidden_layers"]
    expected = _expected_shapes(config)
    placed: set[str] = set()
    for name, t in tensors.items():
        hf = _hf_name(name, layers)
        if hf is None:
            raise ModelError(f"{src}: unsupported tensor {name} (not part of a llama layout)")
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        if shape != expected[hf]:
            raise ModelError(
                f"{src}: tensor {name} has shape {shape}, expected {expected[hf]} from the metadata"
            )
        if int(t.data.nbytes) != int(t.n_bytes):
            raise ModelError(
                f"{src}: tensor {name} has {t.data.nbytes} of its {t.n_bytes} bytes "
                "(truncated file?)"
            )
        if not _dequantizable(t.tensor_type):
            kind = GGMLQuantizationType(t.tensor_type).name
            raise ModelError(f"{src}: tensor {name} has unsupported quantization type {kind}")
        placed.add(hf)
    missing = sorted(set(expected) - placed)
    if missing:
        shown = [_gguf_name(m) for m in missing[:5]]
        raise ModelError(f"{src}: GGUF lacks {len(missing)} tensor(s): {', '.join(shown)}")


def _dequantizable(kind: Any) -> bool:
    from gguf import GGMLQuantizationType, quants

    if kind in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
        return True
    traits = getattr(quants, "_type_traits", None)
    if isinstance(traits, dict):  # gguf >= 0.10 keeps one class per dequantizable type
        return kind in traits
    return kind == GGMLQuantizationType.BF16


def _hf_weights(
    tensors: dict[str, ReaderTensor], config: dict[str, Any], src: Path
) -> Iterator[tuple[str, np.ndarray]]:
    from gguf.quants import dequantize

    layers = config["num_hidden_layers"]
    for name, t in tensors.items():
        hf = _hf_name(name, layers)
        assert hf is not None  # _check_tensors placed every tensor
        try:
            w = dequantize(t.data, t.tensor_type)
        except (NotImplementedError, ValueError) as exc:
            raise ModelError(f"{src}: cannot dequantize tensor {name}: {exc}") from None
        w = np.asarray(w, dtype=np.float32).reshape(tuple(reversed(t.shape.tolist())))
        if name.endswith(".attn_q.weight"):
            w = _unpermute(w, config["num_attention_heads"])
        elif name.endswith(".attn_k.weight"):
            w = _unpermute(w, config["num_key_value_heads"])
        yield hf, np.ascontiguousarray(w)


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row order. Its converter interleaves the two rotary halves of
    each head (row pairs (j, j + d/2) become rows (2j, 2j + 1)) for its rope kernel;
    transformers' rotate_half wants them back as halves."""
    half = w.shape[0] // heads // 2
    return w.reshape(heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
