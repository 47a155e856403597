"""The engine computes exactly what a full recompute computes, whatever the batching,
chunking, caching, preemption or memory it runs on, and never leaks a block."""

from __future__ import annotations

import gc
from collections.abc import Callable
from multiprocessing import shared_memory

import pytest
import torch

from common.sampling import SamplingParams
from services.worker.config import EngineConfig
from services.worker.engine import Engine
from services.worker.request import FinishReason
from tests.worker.helpers import MakeEngine, prompt, run_to_end, run_to_end_outputs

GREEDY = SamplingParams(max_tokens=20, ignore_eos=True)


def full_recompute(engine: Engine, tokens: list[int], n: int) -> list[int]:
    """Greedy tokens where every token comes from a fresh prefill of the whole sequence."""
    seq = list(tokens)
    for i in range(n):
        engine.add_request(f"full-{i}", seq, SamplingParams(max_tokens=1, ignore_eos=True))
        seq.append(run_to_end(engine)[f"full-{i}"][0])
    return seq[len(tokens) :]


@pytest.fixture
def reference(make_engine: MakeEngine) -> Callable[[list[int], int], list[int]]:
    engine = make_engine(num_kv_blocks=64)
    return lambda tokens, n: full_recompute(engine, tokens, n)


def test_batched_chunked_paged_equals_full_recompute(
    make_engine: MakeEngine, reference: Callable[[list[int], int], list[int]]
) -> None:
    lengths = [5, 17, 33, 40, 64, 3, 16]
    prompts = {f"r{i}": prompt(n, i) for i, n in enumerate(lengths)}
    # A 24-token budget forces chunked prefills that share steps with decodes;
    # block size 4 puts every sequence on many scattered blocks.
    engine = make_engine(num_kv_blocks=256, block_size=4, max_num_batched_tokens=24)
    for rid, p in prompts.items():
        engine.add_request(rid, p, GREEDY)
    mixed_steps = 0
    outputs: dict[str, list[int]] = {}
    while engine.has_unfinished():
        sched_before = {r.request_id: r.num_computed_tokens for r in engine.scheduler.running}
        for out in engine.step():
            outputs.setdefault(out.request_id, []).extend(out.new_token_ids)
        mixed_steps += len(sched_before) > 1
    assert mixed_steps > 0
    for rid, p in prompts.items():
        assert outputs[rid] == reference(p, 20), rid
    engine.check_integrity()
    assert engine.pool.num_free == engine.pool.num_blocks


def test_resume_from_cached_kv_equals_fresh(make_engine: MakeEngine) -> None:
    engine = make_engine(num_kv_blocks=64)
    base = prompt(40, 1)
    first = engine.add_request("first", base, SamplingParams(max_tokens=1), keep_blocks=True)
    final = run_to_end_outputs(engine)[-1]
    assert final.finished and final.num_kv_tokens == 40 and final.block_ids == first.block_ids
    engine.check_integrity()

    longer = base + prompt(11, 2)
    cached = final.block_ids[:2]  # the 32 tokens of the whole blocks
    snapshot = engine.cache.tensor[cached].clone()
    engine.add_request("resumed", longer, GREEDY, borrowed_block_ids=cached, num_computed_tokens=32)
    engine.add_request("fresh", longer, GREEDY)
    outs = run_to_end_outputs(engine)
    tokens = {
        rid: [t for o in outs if o.request_id == rid for t in o.new_token_ids]
        for rid in ("resumed", "fresh")
    }
    cached_counts = {o.request_id: o.num_cached_tokens for o in outs if o.finished}
    assert tokens["resumed"] == tokens["fresh"] and len(tokens["fresh"]) == 20
    assert cached_counts == {"resumed": 32, "fresh": 0}
    # The borrowed blocks were read, never written or freed: their KV is still the first request's.
    assert torch.equal(engine.cache.tensor[cached], snapshot)
    engine.check_integrity()
    engine.release_blocks(final.block_ids)
    engine.check_integrity()
    assert engine.pool.num_free == engine.pool.num_blocks


def test_preempted_requests_give_uninterrupted_tokens(make_engine: MakeEngine) -> None:
    prompts = {f"p{i}": prompt(10, 10 + i) for i in range(4)}
    params = {
        "p0": GREEDY,
        "p1": GREEDY,
        "p2": SamplingParams(max_tokens=20, temperature=0.8, seed=7, ignore_eos=True),
        "p3": GREEDY,
    }
    roomy = make_engine(num_kv_blocks=128, block_size=4)
    expected = {}
    for rid, p in prompts.items():
        roomy.add_request(rid, p, params[rid])
        expected[rid] = run_to_end(roomy)[rid]
    # 4 requests x 30 tokens need 32 blocks of 4; 14 blocks force preemption by recompute.
    tight = make_engine(num_kv_blocks=14, block_size=4)
    reqs = [tight.add_request(rid, p, params[rid]) for rid, p in prompts.items()]
    got = run_to_end(tight)
    assert sum(r.num_preemptions for r in reqs) > 0
    assert got == expected
    tight.check_integrity()
    assert tight.pool.num_free == tight.pool.num_blocks


def test_layer_range_split_matches_whole_model(tiny_folder: object) -> None:
    from services.worker.kv_cache import KVCache, KVLayout
    from services.worker.model.loader import load_model
    from services.worker.model_runner import ModelRunner
    from services.worker.request import Request
    from services.worker.scheduler import ScheduledChunk

    whole, cfg = load_model(str(tiny_folder))
    first, _ = load_model(str(tiny_folder), first_layer=0, last_layer=2)
    second, _ = load_model(str(tiny_folder), first_layer=2, last_layer=4)
    assert first.embed_tokens is not None and first.lm_head is None and first.norm is None
    assert second.embed_tokens is None and second.lm_head is not None
    assert first.param_bytes() + second.param_bytes() == whole.param_bytes()

    def cache(layers: int) -> KVCache:
        return KVCache.allocate(KVLayout.for_model(cfg, 16, torch.float32, num_layers=layers), 8)

    tokens = prompt(37, 5)
    req = Request("r", tokens, GREEDY, owned_block_ids=[0, 1, 2])
    runner = ModelRunner(whole, cache(4))
    _, ids, meta = runner.build_metadata([ScheduledChunk(req, 37)])
    with torch.inference_mode():
        ref = whole.compute_logits(whole(whole.embed(torch.tensor(ids)), meta, runner.cache))
        c1, c2 = cache(2), cache(2)
        h = first(first.embed(torch.tensor(ids)), meta, c1)
        split = second.compute_logits(second(h, meta, c2))
    assert torch.equal(ref, split)
    # The stages' caches together hold exactly the whole model's KV.
    assert torch.equal(torch.cat([c1.tensor, c2.tensor], dim=1), runner.cache.tensor)


def test_engine_on_shared_memory_kv(make_engine: MakeEngine, tiny_folder: object) -> None:
    plain = make_engine(num_kv_blocks=32)
    tokens = prompt(30, 6)
    plain.add_request("r", tokens, GREEDY)
    expected = run_to_end(plain)["r"]

    cfg = EngineConfig(model=str(tiny_folder), num_kv_blocks=32)
    nbytes = 32 * plain.cache.layout.bytes_per_block
    shm = shared_memory.SharedMemory(create=True, size=nbytes)
    try:
        engine = Engine.from_config(cfg, kv_buffer=shm.buf)
        engine.add_request("r", tokens, GREEDY, keep_blocks=True)
        outs = run_to_end_outputs(engine)
        assert [t for o in outs for t in o.new_token_ids] == expected
        final = outs[-1]
        # Another mapping of the segment (as the MemPool daemon holds) sees the KV in place.
        other = shared_memory.SharedMemory(name=shm.name)
        try:
            view = torch.frombuffer(other.buf, dtype=torch.float32).view_as(engine.cache.tensor)
            for b in final.block_ids:
                assert torch.equal(view[b], engine.cache.tensor[b])
            assert view[final.block_ids[0]].abs().sum() > 0
            del view
        finally:
            other.close()
        engine.release_blocks(final.block_ids)
        engine.check_integrity()
        del engine
        gc.collect()
    finally:
        shm.close()
        shm.unlink()


def test_split_blocks_reinterprets_without_copy() -> None:
    from services.worker.kv_cache import KVCache, KVLayout, split_blocks

    layout = KVLayout(num_layers=4, block_size=2, num_kv_heads=1, head_dim=3, dtype=torch.float32)
    cache = KVCache.allocate(layout, 5)
    cache.tensor.copy_(
        torch.arange(cache.tensor.numel(), dtype=torch.float32).view_as(cache.tensor)
    )
    halves = split_blocks(cache, 2)
    assert halves.num_blocks == 10 and halves.layout.num_layers == 2
    assert halves.tensor.data_ptr() == cache.tensor.data_ptr()
    for b in range(5):
        for j in range(2):
            assert torch.equal(halves.tensor[b * 2 + j], cache.tensor[b, j * 2 : (j + 1) * 2])
    assert halves.layout.bytes_per_block * 2 == layout.bytes_per_block
    with pytest.raises(ValueError, match="cannot split"):
        split_blocks(cache, 3)


def test_stop_conditions(make_engine: MakeEngine) -> None:
    engine = make_engine(num_kv_blocks=64)
    tokens = prompt(12, 8)
    engine.add_request("free", tokens, SamplingParams(max_tokens=10, ignore_eos=True))
    free = run_to_end(engine)["free"]
    stop_at = free[4]
    first_hit = free.index(stop_at)
    engine.add_request("stop", tokens, SamplingParams(max_tokens=10, stop_token_ids=[stop_at]))
    outs = run_to_end_outputs(engine)
    assert [t for o in outs for t in o.new_token_ids] == free[: first_hit + 1]
    assert outs[-1].finish_reason == FinishReason.STOP
    engine.add_request("len", tokens, SamplingParams(max_tokens=3, ignore_eos=True))
    outs = run_to_end_outputs(engine)
    assert (
        outs[-1].finish_reason == FinishReason.LENGTH
        and sum(len(o.new_token_ids) for o in outs) == 3
    )
    engine.check_integrity()


def test_eos_ends_unless_ignored(make_engine: MakeEngine) -> None:
    engine = make_engine(num_kv_blocks=64)
    tokens = prompt(12, 8)
    engine.add_request("free", tokens, SamplingParams(max_tokens=10, ignore_eos=True))
    free = run_to_end(engine)["free"]
    engine.eos_token_ids = frozenset({free[2]})  # pretend the third token is the model's eos
    engine.add_request("eos", tokens, SamplingParams(max_tokens=10))
    assert run_to_end(engine)["eos"] == free[: free.index(free[2]) + 1]
    engine.add_request("ignore", tokens, SamplingParams(max_tokens=10, ignore_eos=True))
    assert run_to_end(engine)["ignore"] == free


def test_abort_frees_blocks(make_engine: MakeEngine) -> None:
    engine = make_engine(num_kv_blocks=64)
    engine.add_request("a", prompt(30, 1), SamplingParams(max_tokens=50, ignore_eos=True))
    engine.add_request("b", prompt(30, 2), SamplingParams(max_tokens=5, ignore_eos=True))
    engine.step()
    engine.step()
    assert engine.pool.num_allocated > 0
    out = engine.abort("a")
    assert out is not None and out.finished and out.finish_reason == FinishReason.ABORT
    assert engine.abort("a") is None and engine.abort("never-seen") is None
    run_to_end(engine)
    engine.check_integrity()
    assert engine.pool.num_free == engine.pool.num_blocks


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(params=SamplingParams(temperature=-0.5)), "temperature"),
        (dict(params=SamplingParams(top_p=0.0)), "top_p"),
        (dict(params=SamplingParams(top_p=1.5)), "top_p"),
        (dict(params=SamplingParams(max_tokens=0)), "max_tokens"),
        (dict(params=SamplingParams(top_k=-1)), "top_k"),
        (dict(tokens=[]), "empty"),
        (dict(tokens=[5] * 5000), "context"),
        (dict(tokens=[5, 900]), "token ids"),
        (dict(borrowed=[0], computed=10), "borrowed"),
        (dict(borrowed=[0, 1], computed=32, tokens=[5] * 32), "at least one"),
        (dict(borrowed=[60], computed=16, tokens=[5] * 20), "belong to this engine"),
    ],
)
def test_bad_requests_are_refused_and_engine_keeps_serving(
    make_engine: MakeEngine, kwargs: dict[str, object], message: str
) -> None:
    from common.errors import InvalidRequestError

    engine = make_engine(num_kv_blocks=64, max_model_len=4096)
    engine.add_request("good", prompt(10, 1), SamplingParams(max_tokens=8, ignore_eos=True))
    engine.step()
    with pytest.raises(InvalidRequestError, match=message):
        engine.add_request(
            "bad",
            kwargs.get("tokens", prompt(10, 2)),  # type: ignore[arg-type]
            kwargs.get("params", GREEDY),  # type: ignore[arg-type]
            borrowed_block_ids=kwargs.get("borrowed", ()),  # type: ignore[arg-type]
            num_computed_tokens=kwargs.get("computed", 0),  # type: ignore[arg-type]
        )
    assert len(run_to_end(engine)["good"]) == 7
    engine.check_integrity()


def test_prompt_larger_than_pool_and_duplicate_ids_are_refused(make_engine: MakeEngine) -> None:
    from common.errors import InvalidRequestError

    engine = make_engine(num_kv_blocks=4, block_size=4)
    with pytest.raises(InvalidRequestError, match="KV pool"):
        engine.add_request("big", prompt(20, 1), GREEDY)
    engine.add_request("x", prompt(5, 1), SamplingParams(max_tokens=50, ignore_eos=True))
    with pytest.raises(InvalidRequestError, match="already in use"):
        engine.add_request("x", prompt(5, 1), GREEDY)
    outs = run_to_end_outputs(engine)
    # A request that outgrows the whole pool ends with `length` rather than livelocking.
    assert outs[-1].finish_reason == FinishReason.LENGTH
    assert sum(len(o.new_token_ids) for o in outs) == 16 - 5
    with pytest.raises(InvalidRequestError, match="not handed out"):
        engine.release_blocks([0])
    engine.check_integrity()
