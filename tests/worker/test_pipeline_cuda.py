"""A pipeline group on one GPU (float32): the tokens of the CPU reference through a group
formed from the start and through a drop and restore, hidden states staged through host
memory between stages. gpu-marked: `make gpu-check` runs it on a GPU machine."""

from __future__ import annotations

import pytest
import torch

from common.sampling import SamplingParams
from services.worker.config import EngineConfig
from services.worker.engine import Engine
from tests.worker.helpers import prompt, run_to_end
from tests.worker.pipeline_helpers import (
    CONFIG,
    collect,
    finish_leader,
    finish_members,
    make_group,
    step_members,
)

pytestmark = pytest.mark.gpu
GREEDY = SamplingParams(max_tokens=16, ignore_eos=True)
REQUESTS = {f"r{i}": prompt(n, i) for i, n in enumerate([9, 30, 17, 5])}


def cpu_reference() -> dict[str, list[int]]:
    engine = Engine.from_config(
        EngineConfig(
            **{**{f: getattr(CONFIG, f) for f in CONFIG.__struct_fields__}, "num_kv_blocks": 256}
        )
    )
    for rid, p in REQUESTS.items():
        engine.add_request(rid, p, GREEDY)
    return run_to_end(engine)


def test_group_on_cuda_gives_cpu_tokens() -> None:
    group = make_group(2, device="cuda")
    leader = group.drop()
    assert leader.cache.tensor.device.type == "cuda"
    for rid, p in REQUESTS.items():
        leader.add_request(rid, p, GREEDY)
    got: dict[str, list[int]] = {}
    finish_leader(leader, got)
    assert got == cpu_reference()


def test_drop_and_restore_on_cuda() -> None:
    group = make_group(2, device="cuda")
    for i, (rid, p) in enumerate(REQUESTS.items()):
        engine = group.members[i % 2].engine
        assert engine is not None
        engine.add_request(rid, p, GREEDY)
    got: dict[str, list[int]] = {}
    step_members(group, got, 4)
    leader = group.drop()
    for _ in range(6):
        collect(got, leader.step())
    collect(got, group.restore())
    finish_members(group, got)
    assert got == cpu_reference()
    for m in group.members:
        assert m.engine is not None
        m.engine.check_integrity()
        assert all(p.device.type == "cuda" for p in m.model.parameters())
    assert torch.cuda.is_available()
