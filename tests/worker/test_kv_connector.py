"""The worker's KV connector over two real MemPool daemons: a finished prefill returns its
hand-off (pinned in one insert), `send` moves it and unpins our side, what arrived is
pinned for the decode worker, and the decode side's history goes back in one call that
moves only the blocks the prefill daemon lacks."""

from __future__ import annotations

import asyncio

import pytest

from common.mempool_client import MempoolClient
from common.protocol import worker as wp
from services.worker.kv_connector import KvPlan, KvPrefix, MempoolConnector
from services.worker.request import FinishReason
from tests.daemons import SpawnDaemon, assert_idle_and_intact
from tests.worker.helpers import prompt

pytestmark = pytest.mark.integration


async def test_hand_off_and_return_through_the_connector(spawn_daemon: SpawnDaemon) -> None:
    p = await spawn_daemon("p-kv", device_blocks=32)
    d = await spawn_daemon("d-kv", device_blocks=32)
    info = await p.client.info()
    bs, block_bytes = info.block_size, info.block_bytes
    prefill = MempoolConnector(MempoolClient(p.address), owner="p", block_size=bs)
    decode = MempoolConnector(MempoolClient(d.address), owner="d", block_size=bs)
    try:
        # Prefill: a prompt of two whole blocks and a partial one, computed into our blocks.
        tokens = prompt(2 * bs + 5, 1)
        blocks = await p.client.alloc_mem(3, owner="p")
        to = wp.HandOff(
            instance_id="d", address="tcp://127.0.0.1:9", mempool=d.address, insert=True, cache=True
        )
        done = await prefill.request_finished(
            tokens, blocks, KvPlan(cache=True, handoff=to), FinishReason.LENGTH
        )
        assert done.taken == blocks  # the index has them (the tail went to the free list)
        kv = done.transfer
        assert kv is not None and kv.pinned and kv.to == to
        assert kv.tokens == tokens[: 2 * bs] and len(kv.block_ids) == 2
        assert (await p.client.stats()).pinned["device"] == 2

        arrived = await prefill.send(kv)
        assert len(arrived.block_ids) == 2 and arrived.handle
        assert (await p.client.stats()).pinned["device"] == 0  # finished_sending unpinned
        assert (await d.client.stats()).pinned["device"] == 2  # pinned for the decode worker

        # Decode: the history (prompt + 20 decoded tokens) fills three whole blocks, the
        # first two borrowed from the arrival; it goes back in one call, only the third moves.
        history = tokens + prompt(20, 2)
        owned = await d.client.alloc_mem(2, owner="d")
        plan = KvPlan(cache=True, arrived=arrived, return_kv_to=p.address)
        assert await decode.get_prefix(tokens, plan) == arrived
        done = await decode.request_finished(
            history, arrived.block_ids + owned, plan, FinishReason.LENGTH
        )
        assert done.transfer is None
        await decode.release_prefix(arrived)
        await asyncio.gather(*decode.background)
        assert decode.returned_kv == 1
        hit = await p.client.match(history)
        assert hit.num_tokens == 3 * bs
        await p.client.release(hit.handle)
        assert (await p.client.stats()).bytes_received == block_bytes

        # Nothing cached at the sender: the call moves nothing and fails nothing.
        none = await decode.client.return_kv(p.address, prompt(2 * bs, 3))
        assert none.dst_ids == [] and none.nbytes == 0
        assert await decode.get_prefix(prompt(bs, 4), KvPlan(cache=False)) == KvPrefix()
    finally:
        for c in (prefill, decode):
            await c.close()
            c.client.close()
    await assert_idle_and_intact(p.client, "p")
    await assert_idle_and_intact(d.client, "d")
