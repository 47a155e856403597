"""Which KV blocks a live migration copies in each stage (pure; the shell is migration.py).

A running request's block list grows at its end; its first `num_computed_tokens //
block_size` blocks are full and never written again (while it is not preempted), so they
can be copied while it keeps decoding. Each live stage copies the full blocks not yet
copied; the migration stops (pauses the source) once at most `threshold_blocks` blocks are
left to copy or after `max_stages` live stages, and the final stage copies the rest, the
partial last block included.

Invariant: `src[k]` (a source block id) was copied to `dst[k]` for every position k <
`len(src)`, and `src` is a prefix of the request's block list as long as the request was
not preempted since the first stage (`start_preemptions`); a preempted request's copies
are worthless (its blocks went back to the pool), so the final stage copies everything.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Stage:
    start: int  # position of the first block in the request's block list
    src: list[int]  # source block ids, positions start .. start + len(src) - 1
    final: bool


@dataclass
class MigrationPlan:
    block_size: int
    threshold_blocks: int = 2
    max_stages: int = 3
    src: list[int] = field(default_factory=list)  # copied so far, by position
    dst: list[int] = field(default_factory=list)  # destination blocks, by position
    live_stages: int = 0
    stages: int = 0
    blocks_copied: int = 0
    start_preemptions: int | None = None

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.threshold_blocks < 1 or self.max_stages < 0:
            raise ValueError(
                "a migration plan needs block_size >= 1, threshold_blocks >= 1, max_stages >= 0"
            )

    def used_blocks(self, num_computed_tokens: int) -> int:
        return -(-num_computed_tokens // self.block_size)

    def live_stage(
        self, block_ids: Sequence[int], num_computed_tokens: int, preemptions: int
    ) -> Stage | None:
        """The next stage to copy while the request runs, or None: time to stop and copy
        the rest (few blocks left, enough stages, or the request was preempted)."""
        if self.start_preemptions is None:
            self.start_preemptions = preemptions
        if preemptions != self.start_preemptions or self.live_stages >= self.max_stages:
            return None
        left = self.used_blocks(num_computed_tokens) - len(self.src)
        if left <= self.threshold_blocks:
            return None
        full = num_computed_tokens // self.block_size
        start = len(self.src)
        # left > threshold >= 1 and at most one used block is partial: at least one is full.
        return Stage(start, list(block_ids[start:full]), final=False)

    def final_stage(
        self, block_ids: Sequence[int], num_computed_tokens: int, preemptions: int
    ) -> Stage:
        """With the source paused: every used block not yet (validly) copied."""
        valid = (
            self.start_preemptions in (None, preemptions)
            and list(block_ids[: len(self.src)]) == self.src
        )
        start = len(self.src) if valid else 0
        if not valid:
            self.src = []
        used = self.used_blocks(num_computed_tokens)
        return Stage(start, list(block_ids[start:used]), final=True)

    def need(self, stage: Stage) -> int:
        """Destination blocks to reserve before `stage`: those past what is held."""
        return max(0, stage.start + len(stage.src) - len(self.dst))

    def dst_for(self, stage: Stage) -> list[int]:
        return self.dst[stage.start : stage.start + len(stage.src)]

    def done(self, stage: Stage) -> None:
        """`stage` was copied."""
        self.src[stage.start :] = stage.src
        self.stages += 1
        self.live_stages += not stage.final
        self.blocks_copied += len(stage.src)

    def adopted_blocks(self, num_computed_tokens: int) -> list[int]:
        """The destination blocks the adopting engine owns (holding the copied KV)."""
        return self.dst[: self.used_blocks(num_computed_tokens)]

    def spare_blocks(self, num_computed_tokens: int) -> list[int]:
        return self.dst[self.used_blocks(num_computed_tokens) :]
