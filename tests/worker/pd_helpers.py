"""Prefill/decode test helpers: a pair of real worker processes (prefill and decode, each
on its own MemPool daemon) driven over their sockets, and `check_mode`, which runs two turns
of a conversation through one P/D mode and checks tokens, cache hits and bytes sent against
a single-process reference engine."""

from __future__ import annotations

import asyncio
import time

from common.modes import MODES as ALL_MODES
from common.modes import PD_MODES
from common.protocol import worker as wp
from common.sampling import SamplingParams
from common.sockets import PullSocket, PushSocket
from services.worker.engine import Engine
from tests.daemons import Daemon, Proc, SpawnDaemon, SpawnWorker, assert_idle_and_intact
from tests.worker.helpers import prompt, run_to_end

BS = 16
# (Generate.cache, HandOff.insert, HandOff.cache, HandOff.return_kv) per P/D mode.
MODES = {
    name: (m.cache, m.handoff_insert, m.decode_cache, m.return_kv)
    for name in PD_MODES
    for m in [ALL_MODES[name]]
}


class Cluster:
    def __init__(self, prefill: Proc, decode: Proc, pd: Daemon, dd: Daemon):
        self.prefill, self.decode, self.pd, self.dd = prefill, decode, pd, dd
        self.replies = PullSocket("tcp://127.0.0.1:0", wp.TokenChunk, bind=True)
        self.to_prefill = PushSocket(prefill.endpoints["requests"], wp.Generate, bind=False)
        self.to_decode = PushSocket(decode.endpoints["requests"], wp.Abort, bind=False)

    async def run(
        self,
        rid: str,
        tokens: list[int],
        params: SamplingParams,
        mode: str,
        decode_mempool: str | None = None,
    ) -> list[wp.TokenChunk]:
        cache, insert, dcache, ret = MODES[mode]
        handoff = wp.HandOff(
            instance_id=self.decode.instance_id,
            address=self.decode.endpoints["requests"],
            mempool=decode_mempool or self.dd.address,
            insert=insert,
            cache=dcache,
            return_kv=ret,
        )
        await self.to_prefill.send(
            wp.Generate(
                request_id=rid,
                token_ids=tokens,
                params=params,
                reply_to=self.replies.address,
                cache=cache,
                handoff=handoff,
            )
        )
        chunks: list[wp.TokenChunk] = []
        deadline = time.monotonic() + 60
        while not (chunks and chunks[-1].finished):
            c = await asyncio.wait_for(self.replies.recv(), max(0.01, deadline - time.monotonic()))
            assert c.request_id == rid
            chunks.append(c)
        return sorted(chunks, key=lambda c: (c.offset, c.finished))

    def close(self) -> None:
        for s in (self.replies, self.to_prefill, self.to_decode):
            s.close()


def tokens_of(chunks: list[wp.TokenChunk]) -> list[int]:
    return [t for c in chunks for t in c.token_ids]


async def start(spawn_daemon: SpawnDaemon, spawn_worker: SpawnWorker) -> Cluster:
    # One at a time: the launcher's readiness waiter serves one wait at a time.
    pd = await spawn_daemon("p0-kv", device_blocks=96)
    dd = await spawn_daemon("d0-kv", device_blocks=96)
    prefill = await spawn_worker("p0", pd.address, role="prefill", transfer_timeout_s=5)
    decode = await spawn_worker("d0", dd.address, role="decode", transfer_timeout_s=5)
    return Cluster(prefill, decode, pd, dd)


async def idle_and_intact(*daemons: Daemon) -> None:
    """Wait for background transfers to end, then every daemon passes check_integrity
    with nothing pinned and nothing held beyond the workers' spare lease."""
    for d in daemons:
        await assert_idle_and_intact(d.client, d.instance_id)


async def check_mode(c: Cluster, reference: Engine, mode: str, seed: int) -> None:
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    turn1 = prompt(37, seed)
    first = await c.run(f"{mode}-1", turn1, params, mode)
    reference.add_request("t1", turn1, params)
    out1 = tokens_of(first)
    assert out1 == run_to_end(reference)["t1"], mode
    assert first[-1].finished and first[-1].finish_reason == "length"
    assert first[0].instance_id == "p0" and first[-1].instance_id == "d0"
    await idle_and_intact(c.pd, c.dd)
    sent1 = (await c.pd.client.stats()).bytes_sent

    turn2 = turn1 + out1 + prompt(9, seed + 1)
    second = await c.run(f"{mode}-2", turn2, params, mode)
    reference.add_request("t2", turn2, params)
    assert tokens_of(second) == run_to_end(reference)["t2"], mode
    cached = second[-1].num_cached_tokens
    if mode == "pd-basic":
        assert cached == 0
    elif mode in ("pd-caching-1", "pd-caching-2"):
        assert cached == len(turn1) // BS * BS, mode  # the prefill side kept the prompt
    else:  # decode sent the decode-phase KV back: the prefill side has the whole turn
        assert cached == (len(turn1) + len(out1) - 1) // BS * BS
    await idle_and_intact(c.pd, c.dd)
    sent2 = (await c.pd.client.stats()).bytes_sent - sent1
    whole2 = len(turn2) // BS
    block_bytes = (await c.pd.client.info()).block_bytes
    if mode in ("pd-caching-2", "pd-caching-3"):
        # decode kept turn 1 (prompt + its decode phase): only the new blocks moved
        have = (len(turn1) + len(out1) - 1) // BS
        assert sent2 == (whole2 - have) * block_bytes, mode
    else:
        assert sent2 == whole2 * block_bytes, mode
    if mode == "pd-caching-3":
        hit = await c.pd.client.match(turn1 + out1)
        assert hit.num_tokens == (len(turn1) + len(out1) - 1) // BS * BS
        await c.pd.client.release(hit.handle)

    # A prompt under one block has no KV to send: decode still continues it (recomputes).
    short = prompt(6, seed + 2)
    chunks = await c.run(f"{mode}-short", short, params, mode)
    reference.add_request("short", short, params)
    assert tokens_of(chunks) == run_to_end(reference)["short"], mode
    assert chunks[-1].instance_id == "d0"
    await idle_and_intact(c.pd, c.dd)
