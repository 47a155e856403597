"""An in-process pipeline group of `tiny` members for tests (tests/worker/test_pipeline.py,
test_pipeline_cuda.py), and stepping helpers that fail instead of hanging."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from common.model.presets import resolve_model
from services.worker.config import EngineConfig
from services.worker.engine import RequestOutput
from services.worker.kv_cache import KVLayout
from services.worker.model.loader import load_model
from services.worker.pipeline.engine import PipelineEngine
from services.worker.pipeline.local_group import LocalGroup, LocalMember

CONFIG = EngineConfig(model="tiny", dtype="float32", block_size=4, max_num_batched_tokens=32)


def make_group(
    g: int,
    capacity: int = 24,
    region_blocks: int = 96,
    device: str = "cpu",
    config: EngineConfig = CONFIG,
) -> LocalGroup:
    """g members with the full model, each serving alone on `capacity` blocks of a region
    of `region_blocks` (the rest: what a drop can lend)."""
    folder = resolve_model("tiny")
    members = []
    for _ in range(g):
        model, cfg = load_model(folder, dtype=torch.float32, device=device)
        layout = KVLayout.for_model(cfg, config.block_size, torch.float32)
        raw = torch.zeros(region_blocks * layout.bytes_per_block, dtype=torch.uint8, device=device)
        members.append(LocalMember(model, raw, capacity))
    group = LocalGroup(members, layout, config, folder)
    group.start()
    return group


def collect(into: dict[str, list[int]], outs: Iterable[RequestOutput]) -> None:
    for out in outs:
        into.setdefault(out.request_id, []).extend(out.new_token_ids)


def step_members(group: LocalGroup, into: dict[str, list[int]], steps: int) -> None:
    for _ in range(steps):
        for m in group.members:
            assert m.engine is not None
            collect(into, m.engine.step())


def finish_members(group: LocalGroup, into: dict[str, list[int]]) -> None:
    """Step every member until all are idle (bounded: a stuck queue fails, never hangs)."""
    for _ in range(1000):
        if not any(m.engine is not None and m.engine.has_unfinished() for m in group.members):
            return
        step_members(group, into, 1)
    raise AssertionError("members never finished their requests")


def finish_leader(leader: PipelineEngine, into: dict[str, list[int]], check: bool = True) -> None:
    for _ in range(1000):
        if not leader.has_unfinished():
            return
        collect(into, leader.step())
        if check:
            leader.check_integrity()
    raise AssertionError("the group never finished its requests")
