"""The heartbeat's KV signals (services/worker/load.py) against a real engine scheduler:
used = blocks the running requests hold, waiting = what `Scheduler.blocks_needed` says
the queue still needs, capacity as given; and on the wire with their defaults."""

from __future__ import annotations

import msgspec

from common.protocol.scheduler import Heartbeat, InstanceLoad
from common.sampling import SamplingParams
from services.worker.block_pool import BlockPool
from services.worker.load import KvLoad, blocks_needed, kv_load
from services.worker.request import Request
from services.worker.scheduler import Scheduler

BS = 4


def request(rid: str, n: int) -> Request:
    return Request(rid, list(range(1, n + 1)), SamplingParams(max_tokens=8))


def test_load_of_a_full_pool_with_a_queue() -> None:
    pool = BlockPool(6)
    sched = Scheduler(pool, BS, max_num_seqs=8, max_num_batched_tokens=64)
    for rid, n in (("a", 9), ("b", 8), ("c", 10), ("d", 3)):
        sched.add(request(rid, n))
    sched.schedule()  # a (3 blocks) and b (2) run; c needs 3 > 1 free: it waits, d too
    assert [r.request_id for r in sched.running] == ["a", "b"]
    load = kv_load(sched.running, sched.waiting, [17], BS, capacity=6)
    assert load.used == 5 == pool.num_allocated
    # The queue: c (10 tokens: 3 blocks), d (1 block), an unadmitted 17-token prompt (5).
    assert load.waiting == 3 + 1 + 5
    for r in sched.waiting:
        assert blocks_needed(r, BS) == sched.blocks_needed(r, r.num_tokens - r.num_computed_tokens)
    assert load.free == 1 and load.capacity == 6


def test_evictable_cache_counts_as_free_and_nothing_is_negative() -> None:
    # A daemon with 100 blocks, 40 of them cached by finished requests: free is 100 - used.
    pool = BlockPool(3)
    sched = Scheduler(pool, BS, max_num_seqs=8, max_num_batched_tokens=64)
    sched.add(request("a", 12))
    sched.schedule()
    load = kv_load(sched.running, sched.waiting, [], BS, capacity=100)
    assert (load.used, load.waiting, load.free) == (3, 0, 97)
    assert KvLoad(used=5, capacity=3).free == 0
    assert kv_load([], [], [], BS, capacity=-1) == KvLoad()


def test_wire_fields_default_and_round_trip() -> None:
    old = InstanceLoad(1, 2, 3, 4, 5, 6)
    assert b"capacity_blocks" not in msgspec.msgpack.encode(old)  # omitted at their defaults
    new = InstanceLoad(used_blocks=7, waiting_blocks=8, capacity_blocks=9)
    hb = Heartbeat("i", "colocated", "a", "m", "e", "c", 16, 1024, 1.0, new, model="tiny")
    back = msgspec.msgpack.decode(msgspec.msgpack.encode(hb), type=Heartbeat)
    assert back.load.used_blocks == 7 and back.load.waiting_blocks == 8
    assert back.load.capacity_blocks == 9 and back.model == "tiny" and back.num_layers == 0
