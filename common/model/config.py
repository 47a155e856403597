"""Model configuration read from a Hugging Face `config.json`.

Only the Llama family as `transformers` defines it is supported: Llama 2/3 (with llama3
rope scaling), Mistral (sliding window) and Qwen2 (q/k/v bias). Both the transformers 4
(`rope_theta` + `rope_scaling`) and the transformers 5 (`rope_parameters`) spellings of
the rope settings are accepted.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.codec import DTYPE_BYTES

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}


class ModelError(ValueError):
    """A model folder that cannot be loaded: the message says which file and why."""


@dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    rope_type: str = "default"  # default | linear | llama3
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope: RopeConfig
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2: q/k/v only; Llama attention_bias: q/k/v and o
    o_bias: bool = False
    mlp_bias: bool = False
    # Per layer: None for full attention, else the window in tokens.
    sliding_windows: tuple[int | None, ...] = ()
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    torch_dtype: str = "float32"

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def layer_param_count(self) -> int:
        """Parameters of one decoder layer (attention + MLP + its two norms)."""
        h, i = self.hidden_size, self.intermediate_size
        attn = h * (self.q_size + 2 * self.kv_size) + self.q_size * h
        if self.qkv_bias:
            attn += self.q_size + 2 * self.kv_size
        if self.o_bias:
            attn += h
        mlp = 3 * h * i + (2 * i + h if self.mlp_bias else 0)
        return attn + mlp + 2 * h

    def embed_param_count(self) -> int:
        return self.vocab_size * self.hidden_size

    def head_param_count(self) -> int:
        """Final norm + lm_head (zero lm_head parameters when tied to the embedding)."""
        lm_head = 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size
        return self.hidden_size + lm_head

    def param_count(self) -> int:
        """Parameters of the whole model: embedding, every layer, final norm and lm_head."""
        return (
            self.embed_param_count()
            + self.num_layers * self.layer_param_count()
            + self.head_param_count()
        )

    def param_bytes(self, dtype: str) -> int:
        """Bytes of the whole model's parameters in `dtype` (a wire dtype name): an upper
        bound of what any worker of this model holds (a pipeline stage holds fewer)."""
        return self.param_count() * DTYPE_BYTES[dtype]

    @classmethod
    def from_dict(cls, raw: dict[str, Any], *, source: str = "config.json") -> ModelConfig:
        archs = raw.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            named = ", ".join(archs) if archs else f"model_type={raw.get('model_type')!r}"
            raise ModelError(
                f"{source}: unsupported architecture {named}; "
                f"supported: {', '.join(sorted(SUPPORTED_ARCHITECTURES))}"
            )
        try:
            hidden = int(raw["hidden_size"])
            heads = int(raw["num_attention_heads"])
            layers = int(raw["num_hidden_layers"])
            cfg = cls(
                architecture=arch,
                model_type=SUPPORTED_ARCHITECTURES[arch],
                vocab_size=int(raw["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(raw["intermediate_size"]),
                num_layers=layers,
                num_heads=heads,
                num_kv_heads=int(raw.get("num_key_value_heads") or heads),
                head_dim=int(raw.get("head_dim") or hidden // heads),
                max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
                rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
                rope=_parse_rope(raw),
                tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
                qkv_bias=SUPPORTED_ARCHITECTURES[arch] == "qwen2"
                or bool(raw.get("attention_bias")),
                o_bias=SUPPORTED_ARCHITECTURES[arch] != "qwen2" and bool(raw.get("attention_bias")),
                mlp_bias=bool(raw.get("mlp_bias", False)),
                sliding_windows=_parse_sliding_windows(raw, SUPPORTED_ARCHITECTURES[arch], layers),
                bos_token_id=raw.get("bos_token_id"),
                eos_token_ids=_as_ids(raw.get("eos_token_id")),
                torch_dtype=str(raw.get("dtype") or raw.get("torch_dtype") or "float32"),
            )
        except KeyError as exc:
            raise ModelError(f"{source}: missing required key {exc.args[0]!r}") from None
        except (TypeError, ValueError) as exc:
            raise ModelError(f"{source}: invalid value: {exc}") from None
        act = raw.get("hidden_act", "silu")
        if act != "silu":
            raise ModelError(f"{source}: unsupported hidden_act {act!r} (only 'silu')")
        if cfg.num_heads % cfg.num_kv_heads:
            raise ModelError(
                f"{source}: num_attention_heads must be a multiple of num_key_value_heads"
            )
        if cfg.rope.rope_type not in ("default", "linear", "llama3"):
            raise ModelError(f"{source}: unsupported rope_type {cfg.rope.rope_type!r}")
        return cfg

    @classmethod
    def from_folder(cls, folder: Path) -> ModelConfig:
        path = folder / "config.json"
        if not path.is_file():
            raise ModelError(f"{folder}: no config.json (not a Hugging Face model folder)")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ModelError(f"{path}: malformed JSON: {exc}") from None
        if not isinstance(raw, dict):
            raise ModelError(f"{path}: expected a JSON object")
        cfg = cls.from_dict(raw, source=str(path))
        gen_path = folder / "generation_config.json"
        if gen_path.is_file():
            try:
                gen = json.loads(gen_path.read_text())
            except json.JSONDecodeError as exc:
                raise ModelError(f"{gen_path}: malformed JSON: {exc}") from None
            eos = _as_ids(gen.get("eos_token_id"))
            if eos:
                cfg = _replace(cfg, eos_token_ids=eos)
        return cfg


def _replace(cfg: ModelConfig, **changes: Any) -> ModelConfig:
    from dataclasses import replace

    return replace(cfg, **changes)


def _as_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def _parse_rope(raw: dict[str, Any]) -> RopeConfig:
    params = dict(raw.get("rope_parameters") or {})
    scaling = raw.get("rope_scaling") or {}
    params = {**scaling, **params}
    theta = float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
    rope_type = str(params.get("rope_type", params.get("type", "default")))
    return RopeConfig(
        theta=theta,
        rope_type=rope_type,
        factor=float(params.get("factor", 1.0)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(
            params.get("original_max_position_embeddings", raw.get("max_position_embeddings", 8192))
        ),
    )


def _parse_sliding_windows(
    raw: dict[str, Any], model_type: str, layers: int
) -> tuple[int | None, ...]:
    window = raw.get("sliding_window")
    layer_types = raw.get("layer_types")
    if model_type == "qwen2" and not raw.get("use_sliding_window", False):
        window = None
    if not window:
        return (None,) * layers
    if layer_types:
        return tuple(int(window) if t == "sliding_attention" else None for t in layer_types)
    if model_type == "qwen2":
        first = int(raw.get("max_window_layers", layers))
        return tuple(int(window) if i >= first else None for i in range(layers))
    return (int(window),) * layers
