"""Races around a group forming or dissolving, in process (`AsyncEngine` pause/export).

While a member is paused for a drop or a restore (between Prepare and Commit, or during
a restore), requests and aborts keep arriving. An abort that arrives then must not be lost
by the export: the aborted request must not leave with the others (it would be adopted
and run to its end elsewhere with nobody listening, holding KV all the while).
"""

from __future__ import annotations

import asyncio

from common.sampling import SamplingParams
from services.worker.async_engine import AsyncEngine, StreamOutput
from tests.worker.helpers import MakeEngine, prompt


async def _drain(stream, outs: list[StreamOutput]) -> None:  # type: ignore[no-untyped-def]
    async for out in stream:
        outs.append(out)


async def test_abort_while_paused_is_not_exported(make_engine: MakeEngine) -> None:
    engine = make_engine(num_kv_blocks=64)
    aengine = AsyncEngine(engine)
    params = SamplingParams(max_tokens=200, ignore_eos=True)
    running: list[StreamOutput] = []
    queued: list[StreamOutput] = []
    try:
        t1 = asyncio.create_task(_drain(aengine.generate(prompt(8, 1), params, "running"), running))
        while not running:  # admitted and producing tokens
            await asyncio.sleep(0.01)
        await aengine.pause()
        # Both arrive while paused (a member between Prepare and Commit).
        t2 = asyncio.create_task(_drain(aengine.generate(prompt(8, 2), params, "queued"), queued))
        await asyncio.sleep(0)
        aengine.abort("running")
        aengine.abort("queued")
        exported = await aengine.export()
        await asyncio.wait_for(asyncio.gather(t1, t2), 5)
    finally:
        await aengine.close()
    assert [s.request_id for s, _ in exported] == []
    assert running[-1].finished and not running[-1].moved
    assert queued and queued[-1].finished and not queued[-1].moved
    engine.check_integrity()
    assert engine.pool.num_free == engine.pool.num_blocks
