"""KV block geometry: the shape and size of one aggregated KV block.

    block: [num_layers, 2 (K, V), block_size, kv_heads, head_dim] of `dtype`

Every service that sizes or checks KV memory goes through `KVGeometry`: the worker's
`KVLayout` (services/worker/kv_cache.py), the MemPool daemon (which never loads torch or
the weights, only config.json) and the launcher. A worker refuses a daemon whose block
bytes differ from its own, so one formula in one place keeps the two byte-compatible.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from common.codec import DTYPE_BYTES
from common.model.config import ModelConfig
from common.model.presets import resolve_model


@dataclass(frozen=True)
class KVGeometry:
    num_layers: int  # layers held by this instance (a pipeline stage holds a range)
    block_size: int  # tokens per block
    num_kv_heads: int
    head_dim: int
    dtype: str  # a wire dtype name: float32, float16, bfloat16, ...

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(
                f"unknown KV dtype {self.dtype!r}; choose one of {', '.join(DTYPE_BYTES)}"
            )

    @classmethod
    def for_model(
        cls, model: ModelConfig, block_size: int, dtype: str, num_layers: int | None = None
    ) -> KVGeometry:
        layers = model.num_layers if num_layers is None else num_layers
        return cls(layers, block_size, model.num_kv_heads, model.head_dim, dtype)

    @classmethod
    def for_model_name(
        cls, model: str, block_size: int, dtype: str, num_layers: int | None = None
    ) -> KVGeometry:
        """From a preset name or a checkpoint folder (a preset is written on first use)."""
        cfg = ModelConfig.from_folder(Path(resolve_model(model)))
        return cls.for_model(cfg, block_size, dtype, num_layers)

    @property
    def block_shape(self) -> tuple[int, int, int, int, int]:
        return (self.num_layers, 2, self.block_size, self.num_kv_heads, self.head_dim)

    @property
    def block_bytes(self) -> int:
        return (
            2
            * self.num_layers
            * self.block_size
            * self.num_kv_heads
            * self.head_dim
            * DTYPE_BYTES[self.dtype]
        )
