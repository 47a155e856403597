"""MemPool core test helpers: the block size of the tiny test pools and a fake tier memory."""

from __future__ import annotations

from collections.abc import Sequence

from services.mempool.prompt_tree import Tier

BS = 4


class Memory:
    """Fake tier memory: what each block holds, moved by copy_blocks like the real regions."""

    def __init__(self) -> None:
        self.data: dict[tuple[Tier, int], object] = {}

    def copy(self, src: Tier, src_ids: Sequence[int], dst: Tier, dst_ids: Sequence[int]) -> None:
        for s, d in zip(src_ids, dst_ids, strict=True):
            self.data[(dst, d)] = self.data.get((src, s))
