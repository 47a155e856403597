"""The in-process async API: concurrent streams, error results, stop strings, early exit."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from common.sampling import SamplingParams
from common.tokenizer import Tokenizer
from services.worker.async_engine import AsyncEngine, StreamOutput
from services.worker.engine import Engine
from tests.worker.helpers import MakeEngine, prompt, run_to_end, run_to_end_outputs


@pytest.fixture
def tokenizer(tiny_folder: Path) -> Tokenizer:
    return Tokenizer.from_folder(tiny_folder)


async def collect(
    aengine: AsyncEngine, p: str | list[int], params: SamplingParams
) -> list[StreamOutput]:
    return [out async for out in aengine.generate(p, params)]


async def test_concurrent_streams_match_the_engine(
    make_engine: MakeEngine, tokenizer: Tokenizer
) -> None:
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    prompts = [prompt(8 + 5 * i, i) for i in range(4)]
    ref_engine = make_engine(num_kv_blocks=64)
    expected = []
    for i, p in enumerate(prompts):
        ref_engine.add_request(str(i), p, params)
        expected.append(run_to_end(ref_engine)[str(i)])

    engine: Engine = make_engine(num_kv_blocks=64)
    aengine = AsyncEngine(engine, tokenizer)
    try:
        results = await asyncio.gather(*(collect(aengine, p, params) for p in prompts))
    finally:
        await aengine.close()
    for outs, want in zip(results, expected, strict=True):
        assert [t for o in outs for t in o.token_ids] == want
        assert "".join(o.text for o in outs) == tokenizer.decode(want)
        assert outs[-1].finished and outs[-1].finish_reason == "length"
    engine.check_integrity()
    assert engine.pool.num_free == engine.pool.num_blocks


async def test_bad_request_gets_an_error_result_and_others_finish(
    make_engine: MakeEngine, tokenizer: Tokenizer
) -> None:
    engine = make_engine(num_kv_blocks=64)
    aengine = AsyncEngine(engine, tokenizer)
    try:
        good, bad, too_long = await asyncio.gather(
            collect(aengine, "a good prompt", SamplingParams(max_tokens=8, ignore_eos=True)),
            collect(aengine, "bad", SamplingParams(temperature=-1.0)),
            collect(aengine, "x" * 5000, SamplingParams()),
        )
    finally:
        await aengine.close()
    assert (
        len(bad) == 1 and bad[0].finish_reason == "error" and "temperature" in (bad[0].error or "")
    )
    assert len(too_long) == 1 and "context" in (too_long[0].error or "")
    assert sum(len(o.token_ids) for o in good) == 8 and good[-1].error is None
    engine.check_integrity()


async def test_stop_string_ends_the_request(make_engine: MakeEngine, tokenizer: Tokenizer) -> None:
    engine = make_engine(num_kv_blocks=64)
    aengine = AsyncEngine(engine, tokenizer)
    try:
        free = await collect(aengine, "stop test", SamplingParams(max_tokens=24, ignore_eos=True))
        text = "".join(o.text for o in free)
        # Stop at a string that first appears some way into the output.
        cut = next(i for i in range(3, len(text) - 2) if text[i : i + 2] not in text[: i + 1])
        stop = text[cut : cut + 2]
        stopped = await collect(
            aengine, "stop test", SamplingParams(max_tokens=24, ignore_eos=True, stop=[stop])
        )
    finally:
        await aengine.close()
    assert "".join(o.text for o in stopped) == text[:cut]
    assert stopped[-1].finish_reason == "stop"
    assert sum(len(o.token_ids) for o in stopped) < 24
    engine.check_integrity()
    assert engine.pool.num_free == engine.pool.num_blocks


async def test_leaving_a_stream_early_aborts_and_frees(
    make_engine: MakeEngine, tokenizer: Tokenizer
) -> None:
    engine = make_engine(num_kv_blocks=64)
    aengine = AsyncEngine(engine, tokenizer)
    try:
        seen = 0
        async for _ in aengine.generate(
            "leave early", SamplingParams(max_tokens=200, ignore_eos=True)
        ):
            seen += 1
            if seen == 3:
                break
        # The abort is applied by the driver between steps.
        for _ in range(100):
            if not engine.has_unfinished():
                break
            await asyncio.sleep(0.01)
    finally:
        await aengine.close()
    assert not engine.has_unfinished()
    engine.check_integrity()
    assert engine.pool.num_free == engine.pool.num_blocks


async def test_requests_queued_while_admission_awaits_are_not_lost(make_engine: MakeEngine) -> None:
    """A refused request leaves the engine idle; one queued during its (slow) admission
    must still run."""

    class SlowAdmission(AsyncEngine):
        async def _admit(self, p: object) -> dict[str, object]:
            await asyncio.sleep(0.05)  # like a match RPC to the MemPool daemon
            return {}

    engine = make_engine(num_kv_blocks=64)
    aengine = SlowAdmission(engine)
    try:

        async def later() -> list[StreamOutput]:
            await asyncio.sleep(0.01)  # arrives while the first request is being admitted
            return await collect(
                aengine, prompt(8, 1), SamplingParams(max_tokens=3, ignore_eos=True)
            )

        bad, good = await asyncio.wait_for(
            asyncio.gather(collect(aengine, [5], SamplingParams(top_p=0.0)), later()), 10
        )
    finally:
        await aengine.close()
    assert bad[-1].error and good[-1].finished and sum(len(o.token_ids) for o in good) == 3


async def test_a_failing_step_ends_every_stream_with_an_error(make_engine: MakeEngine) -> None:
    engine = make_engine(num_kv_blocks=64)
    real_step = engine.step
    calls = {"n": 0}

    def flaky_step() -> list:  # type: ignore[type-arg]
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated device failure")
        return real_step()

    engine.step = flaky_step  # type: ignore[method-assign]
    aengine = AsyncEngine(engine)
    try:
        params = SamplingParams(max_tokens=20, ignore_eos=True)
        outs = await asyncio.wait_for(
            asyncio.gather(*(collect(aengine, prompt(10, i), params) for i in range(3))), 10
        )
        assert all(
            o[-1].finished and "simulated device failure" in (o[-1].error or "") for o in outs
        )
        # The engine keeps serving after the failure.
        after = await asyncio.wait_for(collect(aengine, prompt(10, 9), params), 10)
        assert after[-1].error is None and sum(len(o.token_ids) for o in after) == 20
    finally:
        await aengine.close()
    engine.check_integrity()


async def test_oversized_seed_and_duplicate_ids_are_refused(make_engine: MakeEngine) -> None:
    engine = make_engine(num_kv_blocks=64)
    aengine = AsyncEngine(engine)
    try:
        bad = await collect(aengine, prompt(5, 1), SamplingParams(temperature=1.0, seed=2**70))
        assert "seed" in (bad[-1].error or "")
        long = aengine.generate(
            prompt(5, 2), SamplingParams(max_tokens=50, ignore_eos=True), "same"
        )
        first = await long.__anext__()
        dup = [o async for o in aengine.generate(prompt(5, 3), SamplingParams(), "same")]
        assert "already in use" in (dup[-1].error or "")
        rest = [o async for o in long]  # the first request with that id is unharmed
        assert rest[-1].finished and rest[-1].error is None
        assert len(first.token_ids) + sum(len(o.token_ids) for o in rest) == 50
    finally:
        await aengine.close()
    engine.check_integrity()


async def test_a_request_that_cannot_get_memory_fails_instead_of_hanging(
    make_engine: MakeEngine,
) -> None:
    engine = make_engine(num_kv_blocks=4)
    engine.add_request("hog", prompt(40, 1), SamplingParams(max_tokens=1), keep_blocks=True)
    held = next(o for o in run_to_end_outputs(engine) if o.finished).block_ids  # 3 of 4 blocks
    aengine = AsyncEngine(engine, stall_timeout_s=0.3)
    try:
        outs = await asyncio.wait_for(
            collect(aengine, prompt(40, 2), SamplingParams(max_tokens=4)), 10
        )
        assert outs[-1].finish_reason == "error" and "not enough free KV memory" in (
            outs[-1].error or ""
        )
        engine.release_blocks(held)
        ok = await asyncio.wait_for(
            collect(aengine, prompt(40, 2), SamplingParams(max_tokens=4, ignore_eos=True)), 10
        )
        assert ok[-1].error is None and sum(len(o.token_ids) for o in ok) == 4
    finally:
        await aengine.close()
    engine.check_integrity()
