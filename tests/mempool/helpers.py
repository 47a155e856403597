"""MemPool core test helpers: the block size of the tiny test pools and a fake tier memory."""

from __future__ import annotations

from collections.abc import Sequence

from common.kv_geometry import KVGeometry
from common.model.config import ModelConfig
from common.model.presets import resolve_model
from services.mempool.prompt_tree import Tier

BS = 4


class Memory:
    """Fake tier memory: what each block holds, moved by copy_blocks like the real regions."""

    def __init__(self) -> None:
        self.data: dict[tuple[Tier, int], object] = {}

    def copy(self, src: Tier, src_ids: Sequence[int], dst: Tier, dst_ids: Sequence[int]) -> None:
        for s, d in zip(src_ids, dst_ids, strict=True):
            self.data[(dst, d)] = self.data.get((src, s))


def tiny_sizes() -> tuple[int, int]:
    """(parameter bytes, block bytes) of the tiny preset in float32, 16-token blocks."""
    params = ModelConfig.from_folder(resolve_model("tiny")).param_bytes("float32")
    return params, KVGeometry.for_model_name("tiny", 16, "float32").block_bytes
