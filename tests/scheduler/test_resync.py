"""A scheduler rebuilds its global trees from the daemons' index snapshots: a real MemPool
daemon answers `IndexSnapshot` in the hash form of its KV events (capped breadth first, so
a capped snapshot is whole prefixes), and a scheduler restarted on the same addresses
learns what was cached before it started (and while it was down), routes a cached prompt
to the instance holding it, and keeps following the live events after the snapshot."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

import pytest

from common.protocol import mempool as mp
from common.protocol import scheduler as sp
from common.sockets import PushSocket, RpcClient
from common.tokens import ROOT_HASH, as_token_bytes, block_hashes
from services.scheduler.config import SchedulerConfig
from services.scheduler.global_tree import PromptHashes
from services.scheduler.service import SchedulerService
from tests.daemons import SpawnDaemon
from tests.scheduler.helpers import BLOCK_SIZE, heartbeat, prompt

pytestmark = pytest.mark.integration


def hashes(tokens: list[int]) -> list[int]:
    return block_hashes(ROOT_HASH, as_token_bytes(tokens), BLOCK_SIZE * 4)


async def until_true(pred: Callable[[], bool], what: str, timeout_s: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not pred():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def test_index_snapshot_names_the_index_in_event_hashes(spawn_daemon: SpawnDaemon) -> None:
    d = await spawn_daemon("m0", block_size=BLOCK_SIZE)
    client = d.client
    empty = await client.index_snapshot()
    assert (empty.instance_id, empty.runs, empty.truncated) == ("m0", [], False)
    assert empty.block_size == BLOCK_SIZE and empty.events_address == d.endpoints["events"]
    doc = prompt(64, seed=1)
    branch = doc[:32] + prompt(32, seed=2)
    await client.insert(doc, await client.alloc_mem(4))
    await client.insert(branch, await client.alloc_mem(4))
    snap = await client.index_snapshot()
    assert snap.seq > empty.seq  # each snapshot is numbered in the daemon's batch sequence
    held = {h: run.tier for run in snap.runs for h in run.block_hashes}
    assert set(held) == set(hashes(doc)) | set(hashes(branch)) and set(held.values()) == {0}
    # Capped: breadth first, so what is kept is whole prefixes (the shared 2 blocks first).
    capped = await client.index_snapshot(max_blocks=3)
    kept = [h for run in capped.runs for h in run.block_hashes]
    assert capped.truncated and len(kept) == 3 and kept[:2] == hashes(doc)[:2]
    assert kept[2] in (hashes(doc)[2], hashes(branch)[2])
    # The cap never exceeds the daemon's own.
    assert not (await client.index_snapshot(max_blocks=mp.SNAPSHOT_MAX_BLOCKS * 4)).truncated


@contextlib.asynccontextmanager
async def scheduler(cfg: SchedulerConfig) -> AsyncIterator[SchedulerService]:
    svc = SchedulerService(cfg, call_timeout_s=2.0)
    serving = asyncio.create_task(svc.serve())
    try:
        yield svc
    finally:
        serving.cancel()
        await asyncio.gather(serving, return_exceptions=True)
        await svc.close()


async def test_a_restarted_scheduler_rebuilds_its_trees_from_the_daemons(
    spawn_daemon: SpawnDaemon,
) -> None:
    d = await spawn_daemon("m0", block_size=BLOCK_SIZE)
    client = d.client
    cfg = SchedulerConfig(admin_address="", heartbeat_timeout_s=5.0).validate()
    doc, while_down, after = prompt(64, seed=1), prompt(48, seed=2), prompt(32, seed=3)
    hb_w0 = heartbeat("w0", events=d.endpoints["events"], mempool=d.address, incarnation="a")
    # a1 (sorts first): an instance whose daemon is gone (no snapshot, no events).
    hb_w1 = heartbeat("a1", events="tcp://127.0.0.1:1", mempool="tcp://127.0.0.1:1")

    beats: PushSocket[sp.Heartbeat] | None = None
    beating: asyncio.Task[None] | None = None
    rpc: RpcClient[sp.SchedulerRequest, sp.SchedulerReply] | None = None
    try:
        async with scheduler(cfg) as first:
            # The next scheduler binds the very same addresses (a restart in place).
            cfg = SchedulerConfig(
                admin_address="",
                heartbeat_timeout_s=5.0,
                address=first.address,
                heartbeat_address=first.heartbeat_address,
                events_address=first.events_address,
            ).validate()
            beats = PushSocket(first.heartbeat_address, sp.Heartbeat, bind=False)

            async def beat_forever(push: PushSocket[sp.Heartbeat]) -> None:
                while True:  # what a worker does; its PUSH socket reconnects by itself
                    await push.send(hb_w0)
                    await push.send(hb_w1)
                    await asyncio.sleep(0.05)

            beating = asyncio.create_task(beat_forever(beats))
            await client.insert(doc, await client.alloc_mem(4))
            tree = first.core.trees["colocated"]
            await until_true(lambda: tree.match(PromptHashes(doc), "w0") == 64, "first has doc")
        await client.insert(while_down, await client.alloc_mem(3))  # no scheduler running

        async with scheduler(cfg) as second:
            tree = second.core.trees["colocated"]
            await until_true(
                lambda: tree.match(PromptHashes(while_down), "w0") == 48, "snapshot loaded"
            )
            assert tree.match(PromptHashes(doc), "w0") == 64
            # Its tree is the daemon's index, block for block.
            snap = await client.index_snapshot()
            index = {h for run in snap.runs for h in run.block_hashes}
            assert tree.num_blocks("w0") == len(index) == 4 + 3
            assert all(tree.tiers("w0", h) == {0} for h in index)
            # The same prompt goes where its prefix is cached, not to the idle a1.
            await until_true(lambda: second.core.registry.get("a1") is not None, "a1 back")
            rpc = RpcClient(second.address, sp.SchedulerRequest, sp.SchedulerReply)
            placed = await rpc.call(sp.Place("r1", [*doc, 9, 9], 4), timeout_s=10)
            assert isinstance(placed, sp.Placement)
            assert (placed.instance_id, placed.cached_tokens) == ("w0", 64)
            # Live events follow the snapshot.
            await client.insert(after, await client.alloc_mem(2))
            await until_true(lambda: tree.match(PromptHashes(after), "w0") == 32, "live event")
            assert second.core.counters["snapshots_loaded"] >= 1
    finally:
        if beating is not None:
            beating.cancel()
            await asyncio.gather(beating, return_exceptions=True)
        for sock in (beats, rpc):
            if sock is not None:
                sock.close()
