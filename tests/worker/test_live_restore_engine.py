"""Engine-side primitives of a live restore (the group keeps serving while requests go
home in batches): a model running a layer sub-range, a restore of the layers while a
stage runs, retiring group blocks with relocation in the batches, and parking requests
with their KV. Token identity against the single-engine reference is the judge."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import msgspec
import pytest
import torch

import services.worker.model.llama as llama_module
from common.protocol.elastic import RequestState
from common.sampling import SamplingParams
from services.worker.block_pool import BlockPool
from services.worker.config import EngineConfig
from services.worker.engine import Engine
from services.worker.kv_cache import KVCache, KVLayout
from services.worker.model.loader import load_model
from services.worker.model_runner import ModelRunner
from services.worker.pipeline.engine import PipelineEngine
from services.worker.pipeline.local_group import LocalGroup
from services.worker.pipeline.metadata import to_stage_batch
from services.worker.pipeline.stage import StageServer
from services.worker.pipeline.views import kv_view, sub_layout
from services.worker.request import Request
from services.worker.scheduler import ScheduledChunk
from tests.worker.helpers import prompt, run_to_end
from tests.worker.pipeline_helpers import CONFIG, collect, finish_leader, make_group

GREEDY = SamplingParams(max_tokens=24, ignore_eos=True)


def seeded(seed: int) -> SamplingParams:
    return SamplingParams(max_tokens=24, ignore_eos=True, temperature=0.9, top_k=40, seed=seed)


REQUESTS = {
    f"r{i}": (prompt(n, 200 + i), GREEDY if i % 2 else seeded(300 + i))
    for i, n in enumerate([9, 30, 17, 5, 41, 12, 23, 8])
}


@pytest.fixture(scope="module")
def reference() -> dict[str, list[int]]:
    fields = {f: getattr(CONFIG, f) for f in CONFIG.__struct_fields__}
    engine = Engine.from_config(EngineConfig(**{**fields, "num_kv_blocks": 512}))
    for rid, (p, params) in REQUESTS.items():
        engine.add_request(rid, p, params)
    return run_to_end(engine)


def _group_with_requests(g: int, steps: int) -> tuple[LocalGroup, PipelineEngine, dict]:
    group = make_group(g)
    leader = group.drop(shuffle=torch.Generator().manual_seed(g))
    for rid, (p, params) in REQUESTS.items():
        leader.add_request(rid, p, params)
    got: dict[str, list[int]] = {}
    for _ in range(steps):
        collect(got, leader.step())
        leader.check_integrity()
    return group, leader, got


# ---------------------------------------------------------------- retire + relocation
@pytest.mark.parametrize(("g", "per_step"), [(2, 8), (4, 8), (2, 1)])
def test_retire_mid_stream_relocates_into_keep_with_reference_tokens(
    reference: dict[str, list[int]], g: int, per_step: int
) -> None:
    _, leader, got = _group_with_requests(g, 3 * g)
    leader.relocate_per_step = per_step
    n = len(leader.table)
    # Half the group blocks; the pool hands out low ids first, so many live ones are out.
    keep = {b for b in range(n) if b % 2}
    live_out = leader.outside_live()
    assert live_out == 0  # no retire yet
    free_out = {b for b in leader.pool.free_ids() if b not in keep}
    leader.retire(keep)
    assert leader.retired() == free_out  # free ones outside keep left at once
    assert leader.outside_live() > 0
    leader.check_integrity()
    relocated_mid_stream = False
    for _ in range(1000):
        if not leader.has_unfinished():
            break
        collect(got, leader.step())
        leader.check_integrity()
        assert leader.pool.free_ids() <= keep
        if leader.outside_live() == 0 and leader.has_unfinished():
            relocated_mid_stream = True
    assert not leader.has_unfinished()
    assert relocated_mid_stream  # the relocation finished before the requests did
    assert got == reference
    assert leader.outside_live() == 0
    assert leader.retired() == set(range(n)) - keep
    assert leader.pool.num_free == leader.pool.num_blocks == len(keep)


def test_retire_with_no_free_block_in_keep_waits_then_preempts(
    reference: dict[str, list[int]],
) -> None:
    """keep = half the live blocks and nothing free: relocation waits, new tokens need
    preemption (by recompute: same tokens), nothing crashes and nothing leaks."""
    _, leader, got = _group_with_requests(2, 6)
    live = sorted(leader.pool.allocated())
    keep = set(live[::2])
    leader.retire(keep)
    assert leader.pool.num_free == 0 and leader.outside_live() == len(live) - len(keep)
    finish_leader(leader, got)
    assert got == reference
    assert leader.outside_live() == 0
    assert leader.pool.num_free == leader.pool.num_blocks == len(keep)


# ---------------------------------------------------------------------------- park
def _solo_from_parked(group: LocalGroup, states: list[RequestState], blocks: int = 128) -> Engine:
    """A solo engine over fresh memory holding the parked requests' KV in whole blocks:
    group block k of a request becomes full block e, whose sub-block e*g + j is member
    j's sub-block table_j[k] (the split view's layout)."""
    g, layout = group.g, group.layout
    model, _ = load_model(group.folder, dtype=torch.float32)
    raw = torch.zeros(blocks * layout.bytes_per_block, dtype=torch.uint8)
    split = kv_view(raw, layout, g)
    solo = Engine(model, kv_view(raw, layout), CONFIG)
    next_block = 0
    for s in states:
        whole = list(range(next_block, next_block + len(s.block_ids)))
        next_block += len(whole)
        for e, k in zip(whole, s.block_ids, strict=True):
            for j, m in enumerate(group.members):
                split.tensor[e * g + j].copy_(group.views[j].tensor[int(m.table[k])])
        solo.pool.claim(whole)  # the blocks come with the request, as from a lease
        solo.pool.free(whole)
        solo.adopt(msgspec.structs.replace(s, block_ids=whole))
    return solo


@pytest.mark.parametrize("g", [2, 4])
def test_parked_requests_continue_on_a_solo_engine(reference: dict[str, list[int]], g: int) -> None:
    group, leader, got = _group_with_requests(g, 2 * g + 1)
    flying = leader.in_flight_ids()
    names = ["r1", "r4", "r6", "nope"]
    assert {"r1", "r4", "r6"} & flying  # some wait for their batch to come back
    leader.park(names)
    parked = leader.take_parked()
    assert {s.request_id for s in parked} == {"r1", "r4", "r6"} - flying
    for _ in range(g):
        collect(got, leader.step())
        parked += leader.take_parked()
        leader.check_integrity()
    assert sorted(s.request_id for s in parked) == ["r1", "r4", "r6"]
    assert not {"r1", "r4", "r6"} & set(leader.requests)
    reserved = [b for s in parked for b in s.block_ids]
    assert all(s.num_computed_tokens > 0 and s.block_ids for s in parked)
    assert set(reserved) <= leader.handed_out  # still counted as handed out
    solo = _solo_from_parked(group, parked)
    leader.unreserve(reserved)
    leader.check_integrity()
    finish_leader(leader, got)
    collect(got, [o for _ in range(1000) if solo.has_unfinished() for o in solo.step()])
    assert got == reference
    solo.check_integrity()
    assert leader.pool.num_free == leader.pool.num_blocks


def test_park_at_once_when_not_in_flight_and_abort_while_pending() -> None:
    _, leader, _ = _group_with_requests(2, 5)
    flying = sorted(leader.in_flight_ids())
    leader.drain()  # nothing in flight now
    idle = flying[0]
    req = leader.requests[idle]
    blocks, computed = list(req.block_ids), req.num_computed_tokens
    leader.park([idle])
    (state,) = leader.take_parked()
    assert (state.request_id, state.block_ids, state.num_computed_tokens) == (
        idle,
        blocks,
        computed,
    )
    assert leader.take_parked() == []
    leader.check_integrity()
    leader.step()
    leader.step()  # both microbatches in flight again
    pending = sorted(leader.in_flight_ids())[0]
    leader.park([pending])
    assert leader.take_parked() == [] and pending in leader.requests
    out = leader.abort(pending)
    assert out is not None and out.finished
    for _ in range(4):
        leader.step()
        leader.check_integrity()
    assert leader.take_parked() == []
    leader.unreserve(state.block_ids)
    finish_leader(leader, {})
    assert leader.pool.num_free == leader.pool.num_blocks


# ------------------------------------------------------------------ layer sub-ranges
def _steps(builder: ModelRunner, model_runs: Any) -> None:
    """Prefill then two decodes of two requests; `model_runs(meta, hidden)` per step
    (random hidden states: a stage's input). `builder` only builds the metadata."""
    reqs = [
        Request("a", prompt(13, 1), GREEDY, owned_block_ids=[0, 1, 2, 3, 4]),
        Request("b", prompt(6, 2), GREEDY, owned_block_ids=[5, 6, 7]),
    ]
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        chunks = [ScheduledChunk(r, r.num_tokens - r.num_computed_tokens) for r in reqs]
        _, ids, meta = builder.build_metadata(chunks)
        hidden = torch.randn(len(ids), builder.model.cfg.hidden_size, generator=gen)
        model_runs(meta, hidden)
        for c in chunks:
            c.request.num_computed_tokens += c.num_tokens
            c.request.append_token(3)


def test_forward_on_a_sub_range_equals_a_stage_model(tiny_folder: Path) -> None:
    whole, cfg = load_model(tiny_folder)
    stage, _ = load_model(tiny_folder)
    a, b = 1, 3
    stage.drop_layers(range(a, b), keep_embed=False, keep_head=False)
    layout = sub_layout(KVLayout.for_model(cfg, 4, torch.float32), cfg.num_layers // (b - a))
    kv_whole, kv_stage = KVCache.allocate(layout, 8), KVCache.allocate(layout, 8)
    outs: list[tuple[torch.Tensor, torch.Tensor]] = []

    def run(meta: Any, hidden: torch.Tensor) -> None:
        with torch.inference_mode():
            outs.append(
                (whole(hidden, meta, kv_whole, layers=range(a, b)), stage(hidden, meta, kv_stage))
            )

    _steps(ModelRunner(stage, kv_stage), run)
    assert len(outs) == 3
    for got, want in outs:
        assert torch.equal(got, want)
    assert torch.equal(kv_whole.tensor, kv_stage.tensor) and kv_stage.tensor.abs().sum() > 0
    for bad in (range(0, 2), range(2, 4), range(1, 1), range(1, 3, 2)):
        with pytest.raises(ValueError, match="held layers"):
            stage(torch.zeros(1, cfg.hidden_size), None, kv_stage, layers=bad)


def test_restore_layers_while_a_stage_runs_its_range(
    tiny_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The restore pauses with the new, still empty layers linked in (right before it
    loads them); a stage running its held range then computes what it computed before."""
    model, cfg = load_model(tiny_folder)
    a, b = 2, 4
    model.drop_layers(range(a, b), keep_embed=False, keep_head=False)
    layout = sub_layout(KVLayout.for_model(cfg, 4, torch.float32), cfg.num_layers // (b - a))
    table = torch.arange(8)
    batches: list[Any] = []
    _steps(
        ModelRunner(model, KVCache.allocate(layout, 8)),
        lambda meta, hidden: batches.append(
            to_stage_batch(meta, epoch=1, step=1, mb=0, return_rows=[0, 1], hidden=hidden)
        ),
    )

    def run_all(stage: StageServer) -> list[torch.Tensor]:
        return [stage.run(batch).hidden for batch in batches]

    before = run_all(StageServer(model, KVCache.allocate(layout, 8), table, epoch=1, last=True))
    linked, go = threading.Event(), threading.Event()
    real_copy = llama_module.copy_tensors

    def paused_copy(*args: Any, **kwargs: Any) -> None:
        linked.set()  # every layer is linked in now; the new ones are still empty
        assert go.wait(60)
        real_copy(*args, **kwargs)

    monkeypatch.setattr(llama_module, "copy_tensors", paused_copy)
    errors: list[BaseException] = []

    def restore() -> None:
        try:
            model.restore_layers(tiny_folder)
        except BaseException as e:  # surfaced below
            errors.append(e)

    thread = threading.Thread(target=restore)
    stage = StageServer(
        model, KVCache.allocate(layout, 8), table, epoch=1, last=True, layers=range(a, b)
    )
    thread.start()
    try:
        assert linked.wait(60)
        assert model.num_local_layers == cfg.num_layers  # mid-restore: all layers linked
        during = run_all(stage)
    finally:
        go.set()
        thread.join(60)
    assert not errors and not thread.is_alive()
    after = run_all(
        StageServer(
            model, KVCache.allocate(layout, 8), table, epoch=1, last=True, layers=range(a, b)
        )
    )
    for x, y, z in zip(before, during, after, strict=True):
        assert torch.equal(x, y) and torch.equal(x, z)
    with pytest.raises(ValueError, match="the stage runs 4"):
        StageServer(model, KVCache.allocate(layout, 8), table, epoch=1, last=True)


def test_block_pool_retire_narrows_the_pool_for_good() -> None:
    pool = BlockPool(8)
    held = pool.allocate(4)  # 0..3
    assert pool.retire({1, 3, 5, 7}) == [4, 6]  # free ones outside keep leave now
    assert pool.retired() == {4, 6} and pool.num_blocks == 6
    pool.free([0, 1])  # 0 leaves, 1 is free again
    assert pool.retired() == {0, 4, 6} and pool.free_ids() == {5, 7, 1}
    assert sorted(pool.allocate(3)) == [1, 5, 7]
    assert not pool.can_allocate(1)
    pool.claim([4])  # a lease arriving with KV: allocated again, leaves when freed
    assert 4 not in pool.retired() and pool.is_allocated(4)
    pool.free([4, 2, 3])
    assert pool.retired() == {0, 2, 4, 6} and pool.free_ids() == {3}
    assert held == [0, 1, 2, 3]


def test_group_serves_while_every_member_restores_its_layers(
    reference: dict[str, list[int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every member's `restore_layers` runs in a thread and pauses with the missing layers
    linked in but empty; the group keeps stepping meanwhile (leader and stages run the
    ranges they held), then the loads finish and the group goes on: reference tokens."""
    group, leader, got = _group_with_requests(2, 4)
    linked = [threading.Event() for _ in group.members]
    go = threading.Event()
    real_copy = llama_module.copy_tensors
    waiting = iter(linked)
    lock = threading.Lock()

    def paused_copy(*args: Any, **kwargs: Any) -> None:
        with lock:
            mine = next(waiting)
        mine.set()
        assert go.wait(60)
        real_copy(*args, **kwargs)

    monkeypatch.setattr(llama_module, "copy_tensors", paused_copy)
    errors: list[BaseException] = []

    def restore(model: Any) -> None:
        try:
            model.restore_layers(group.folder)
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=restore, args=(m.model,)) for m in group.members]
    for t in threads:
        t.start()
    try:
        assert all(e.wait(60) for e in linked)
        assert all(m.model.num_local_layers == m.model.cfg.num_layers for m in group.members)
        for _ in range(6):
            collect(got, leader.step())
            leader.check_integrity()
    finally:
        go.set()
        for t in threads:
            t.join(60)
    assert not errors and not any(t.is_alive() for t in threads)
    finish_leader(leader, got)
    assert got == reference
