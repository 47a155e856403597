"""MemPool daemons in separate processes: KV moves byte-exactly over every transport,
transfer_with_insert makes the receiver's index serve the prompt, bad requests get clear
errors while the daemon keeps serving, and a peer killed mid-transfer leaves both sides
consistent (no leaked block)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import zmq
import zmq.asyncio

from common.sockets import RpcError
from services.mempool.region import ShmRegion
from services.mempool.transport import available_transports
from tests.daemons import Daemon, SpawnDaemon, assert_clean
from tests.raw import raw_socket

pytestmark = pytest.mark.integration


async def region_of(d: Daemon) -> ShmRegion:
    info = await d.client.info()
    return ShmRegion.attach(info.device_name, info.block_bytes, info.device_max_blocks)


@pytest.mark.parametrize("transport", available_transports())
async def test_transfer_with_insert_is_byte_exact(
    spawn_daemon: SpawnDaemon, transport: str
) -> None:
    a = await spawn_daemon("a", transports=[transport])
    b = await spawn_daemon("b", transports=[transport])
    ra, rb = await region_of(a), await region_of(b)
    try:
        rng = np.random.default_rng(0)
        tokens = rng.integers(3, 259, size=16 * 4 + 5).tolist()  # 4 whole blocks + a tail of 5
        src = await a.client.alloc_mem(5, owner="worker")
        for blk in src:  # the 'worker' writes KV straight into the daemon's region
            ra.blocks(blk)[:] = rng.integers(0, 256, size=ra.block_bytes, dtype=np.uint8).tobytes()
        t = await a.client.transfer_with_insert(
            b.address, tokens, src, pin_owner="decoder", transport=transport, checksum=True
        )
        assert t.transport == transport and t.num_indexed_tokens == 64 and len(t.tail_ids) == 1
        assert t.nbytes == 5 * ra.block_bytes
        m = await b.client.match(tokens, owner="decoder")
        assert m.num_tokens == 64 and m.block_ids == t.dst_ids[:4]
        for s, d in zip(src, t.dst_ids, strict=True):
            assert bytes(rb.blocks(d)) == bytes(ra.blocks(s))
        # Plain transfer into blocks the receiver's client allocated.
        dst = await b.client.alloc_mem(2, owner="decoder")
        await a.client.transfer(b.address, src[3:5], dst, transport=transport, checksum=True)
        assert bytes(rb.blocks(dst[0], 2)) == bytes(ra.blocks(src[3])) + bytes(ra.blocks(src[4]))
        for h in (m.handle, t.handle):
            await b.client.release(h)
        await b.client.free_mem(dst + t.tail_ids)
        await a.client.free_mem(src)
        await assert_clean(a, b)
        assert (await b.client.stats()).index["device"] == 4
    finally:
        ra.close()
        rb.close()


async def test_large_transfer_over_tcp(spawn_daemon: SpawnDaemon) -> None:
    a = await spawn_daemon("a", device_blocks=2048, transports=["tcp"])  # 64 MiB of tiny-model KV
    b = await spawn_daemon("b", device_blocks=2048, transports=["tcp"])
    ra, rb = await region_of(a), await region_of(b)
    try:
        src = await a.client.alloc_mem(2048)
        ra.array[:] = np.random.default_rng(1).integers(0, 256, size=ra.array.size, dtype=np.uint8)
        dst = await b.client.alloc_mem(2048)
        order = list(reversed(dst))  # non-contiguous mapping: every block its own run
        t = await a.client.transfer(b.address, src, order, checksum=True)
        assert t.nbytes == 2048 * ra.block_bytes
        for i in (0, 777, 2047):
            assert bytes(rb.blocks(order[i])) == bytes(ra.blocks(src[i]))
        await a.client.free_mem(src)
        await b.client.free_mem(dst)
        await assert_clean(a, b)
    finally:
        ra.close()
        rb.close()


async def test_bad_requests_get_clear_errors_and_the_daemon_stays_up(
    spawn_daemon: SpawnDaemon,
) -> None:
    from common.protocol import mempool as mp

    d = await spawn_daemon("a", device_blocks=8)
    c = d.client
    ids = await c.alloc_mem(2)
    await c.free_mem(ids)
    cases = [
        (c.free_mem(ids), "free"),  # double free
        (c.free_mem([12345]), "unknown id"),
        (c.insert(list(range(40)), [0, 1]), "need 3 blocks"),
        (c.alloc_mem(9), "9 blocks asked"),
        (c.release(77), "unknown match handle"),
        (c.swap_in([0]), "host"),
        (c.transfer("tcp://127.0.0.1:1", [0], [0], timeout_s=1), "nothing to send"),
        (
            c.call(mp.Transfer("tcp://127.0.0.1:1", [0], [0], timeout_s=float("nan")), 5),
            "timeout_s",
        ),
        (c.call(mp.Transfer("tcp://127.0.0.1:1", [0], [0], timeout_s=-1), 5), "timeout_s"),
        (
            c.call(__import__("common.protocol.mempool", fromlist=["Insert"]).Insert(b"abc", [0])),
            "whole int32",
        ),
    ]
    for call, message in cases:
        with pytest.raises(RpcError, match=message):
            await call
    # A malformed message (not msgpack) on the raw socket gets an error reply.
    sock = raw_socket(zmq.DEALER)
    sock.connect(d.address)
    try:
        await sock.send_multipart([b"\x00" * 8, b"\xc1garbage"])
        reply = await asyncio.wait_for(sock.recv_multipart(), 5)
        assert reply[1] == b"\x01" and b"malformed" in reply[2]
        await sock.send_multipart([b"\x00" * 8])  # truncated: no body at all
    finally:
        sock.close(0)
    assert (await c.alloc_mem(8)) and (await c.stats()).free["device"] == 0
    await c.call(__import__("common.protocol.mempool", fromlist=["ReleaseOwner"]).ReleaseOwner(""))
    await assert_clean(d)


async def test_transfer_to_a_dead_peer_fails_fast(spawn_daemon: SpawnDaemon) -> None:
    a = await spawn_daemon("a")
    src = await a.client.alloc_mem(2)
    start = time.monotonic()
    with pytest.raises(RpcError, match="transfer to .* failed"):
        await a.client.transfer("tcp://127.0.0.1:9", src, [0, 1], timeout_s=2.0)
    assert time.monotonic() - start < 2.0 + 3.0
    await a.client.free_mem(src)
    await assert_clean(a)


async def _kill_when_pending(
    victim: Daemon, watched: Daemon, transfer: asyncio.Task[object]
) -> bool:
    """SIGKILL `victim` once `watched` has a transfer in flight; False if it finished first."""
    while not transfer.done():
        if (await watched.client.stats()).pending_transfers:
            victim.proc.kill()
            return True
        await asyncio.sleep(0.002)
    return False


async def test_receiver_killed_mid_transfer(spawn_daemon: SpawnDaemon) -> None:
    a = await spawn_daemon("a", device_blocks=8192, transports=["tcp"])
    for attempt in range(3):
        b = await spawn_daemon(f"b{attempt}", device_blocks=8192, transports=["tcp"])
        src = await a.client.alloc_mem(8192)  # 256 MiB
        task = asyncio.create_task(
            a.client.transfer_with_insert(b.address, list(range(8192 * 16)), src, timeout_s=5)
        )
        killed = await _kill_when_pending(b, b, task)
        start = time.monotonic()
        outcome = await asyncio.gather(task, return_exceptions=True)
        await a.client.free_mem(src)
        if killed:
            assert isinstance(outcome[0], RpcError) and "failed" in str(outcome[0])
            assert time.monotonic() - start < 5 + 3
            break
    else:
        pytest.skip("the transfer always finished before the receiver could be killed")
    assert (await a.client.stats()).transfers_failed == 1
    await assert_clean(a)
    # The sender is unharmed: the next transfer to a live peer works.
    c = await spawn_daemon("c", transports=["tcp"])
    ids = await a.client.alloc_mem(2)
    t = await a.client.transfer_with_insert(c.address, list(range(32)), ids)
    assert t.num_indexed_tokens == 32
    await a.client.free_mem(ids)
    await assert_clean(a, c)


async def test_sender_killed_mid_transfer(spawn_daemon: SpawnDaemon) -> None:
    b = await spawn_daemon("b", device_blocks=8192, transports=["tcp"])
    for attempt in range(3):
        a = await spawn_daemon(f"a{attempt}", device_blocks=8192, transports=["tcp"])
        src = await a.client.alloc_mem(8192)
        task = asyncio.create_task(
            a.client.transfer_with_insert(b.address, list(range(8192 * 16)), src, timeout_s=2)
        )
        killed = await _kill_when_pending(a, b, task)
        await asyncio.gather(task, return_exceptions=True)
        if killed:
            break
        await b.client.delete(list(range(8192 * 16)))
    else:
        pytest.skip("the transfer always finished before the sender could be killed")
    # The receiver expires the orphaned transfer after its deadline and frees its blocks.
    deadline = time.monotonic() + 10
    while (await b.client.stats()).pending_transfers and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    st = await b.client.stats()
    assert st.pending_transfers == 0 and st.transfers_failed >= 1
    assert st.free["device"] == 8192 and st.index["device"] == 0  # nothing was indexed
    await assert_clean(b)


WORKER = """
import sys, torch
from services.mempool.region import ShmRegion
from services.worker.kv_cache import KVCache, KVLayout
name, block_bytes, max_blocks, mode, *blocks = sys.argv[1:]
region = ShmRegion.attach(name, int(block_bytes), int(max_blocks))
layout = KVLayout(num_layers=4, block_size=16, num_kv_heads=2, head_dim=32, dtype=torch.float32)
cache = KVCache.from_buffer(layout, region.buffer, int(max_blocks))
for i, b in enumerate(map(int, blocks)):
    want = torch.arange(cache.tensor[b].numel(), dtype=torch.float32).view(layout.block_shape) + 1000 * i
    if mode == "write":
        cache.tensor[b] = want
    else:
        assert torch.equal(cache.tensor[b], want), f"block {b} holds other KV"
del cache
region.close()
print("ok")
"""


def run_worker(
    region_name: str, block_bytes: int, max_blocks: int, mode: str, blocks: list[int]
) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            WORKER,
            region_name,
            str(block_bytes),
            str(max_blocks),
            mode,
            *map(str, blocks),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=os.environ,
    )
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


async def test_worker_processes_map_the_daemon_regions(spawn_daemon: SpawnDaemon) -> None:
    """A worker process writes KV in place in daemon A's region; A reads it to send it to B;
    a worker process on B reads the same KV from B's region: no copy between worker and daemon."""
    a = await spawn_daemon("a")
    b = await spawn_daemon("b")
    info_a, info_b = await a.client.info(), await b.client.info()
    assert info_a.device_kind == "shm" and info_a.block_bytes == 4 * 2 * 16 * 2 * 32 * 4
    ids = await a.client.alloc_mem(3, owner="worker")
    await asyncio.to_thread(
        run_worker, info_a.device_name, info_a.block_bytes, info_a.device_max_blocks, "write", ids
    )
    dst = await b.client.alloc_mem(4, owner="worker")
    dst = dst[1:]  # other ids than the source's
    await a.client.transfer(b.address, ids, dst)
    await asyncio.to_thread(
        run_worker, info_b.device_name, info_b.block_bytes, info_b.device_max_blocks, "read", dst
    )
    await a.client.free_mem(ids)
    await b.client.free_mem(dst)
    await b.client.call(
        __import__("common.protocol.mempool", fromlist=["ReleaseOwner"]).ReleaseOwner("worker")
    )
    await assert_clean(a, b)


@pytest.mark.parametrize("transport", available_transports())
async def test_named_tensors_move_between_daemons(
    spawn_daemon: SpawnDaemon, transport: str
) -> None:
    import torch

    a = await spawn_daemon("a", transports=[transport])
    b = await spawn_daemon("b", transports=[transport])
    weights = {
        "layers.0.mlp": torch.randn(512, 1031).to(torch.bfloat16),  # bf16 travels as raw bytes
        "layers.1.norm": torch.arange(7, dtype=torch.float32),
    }
    for name, w in weights.items():
        await a.client.put_tensor(name, w)
    for name in weights:
        t = await a.client.send_tensor(b.address, name, transport=transport, checksum=True)
        assert t.transport == transport
    for name, w in weights.items():
        got = await b.client.get_tensor(name)
        assert got.dtype == w.dtype and torch.equal(got, w)
    listed = await b.client.list_tensors()
    assert sorted(t.name for t in listed.tensors) == sorted(weights)
    with pytest.raises(RpcError, match="no tensor named 'missing'"):
        await a.client.send_tensor(b.address, "missing")
    with pytest.raises(RpcError, match="bytes sent"):
        from common.protocol.mempool import PutTensor

        await a.client.call(PutTensor("bad", "float32", [4], np.zeros(3, dtype=np.uint8)))
    await b.client.delete_tensor("layers.0.mlp")
    with pytest.raises(RpcError, match="no tensor named"):
        await b.client.get_tensor("layers.0.mlp")
    await assert_clean(a, b)


async def test_kv_events_are_published(spawn_daemon: SpawnDaemon) -> None:
    """A subscriber sees exactly what was cached and what left, with chained block hashes."""
    from common.protocol.kv_events import BlockRemoved, BlockStored, KvEventBatch
    from common.sockets import SubSocket
    from common.tokens import ROOT_HASH, as_token_bytes, block_hashes

    d = await spawn_daemon("ev", device_blocks=4)
    sub = SubSocket(d.endpoints["events"], KvEventBatch, bind=False, topics=[b"ev"])
    try:
        await asyncio.sleep(0.3)  # PUB/SUB: let the subscription reach the daemon
        tokens = list(range(40))
        await d.client.insert(tokens, await d.client.alloc_mem(3))
        topic, batch = await asyncio.wait_for(sub.recv(), 5)
        assert topic == b"ev" and batch.instance_id == "ev" and batch.block_size == 16
        stored = [e for e in batch.events if isinstance(e, BlockStored)]
        expected = block_hashes(ROOT_HASH, as_token_bytes(tokens[:32]), 16 * 4)
        assert [h for e in stored for h in e.block_hashes] == expected
        assert stored[0].tokens == as_token_bytes(tokens[:32])
        await d.client.alloc_mem(4)  # no host tier: both cached blocks are dropped
        _, later = await asyncio.wait_for(sub.recv(), 5)
        assert later.seq > batch.seq
        removed = [h for e in later.events if isinstance(e, BlockRemoved) for h in e.block_hashes]
        assert sorted(removed) == sorted(expected)
    finally:
        sub.close()
    await d.client.call(
        __import__("common.protocol.mempool", fromlist=["ReleaseOwner"]).ReleaseOwner("")
    )
    await assert_clean(d)


async def test_transfer_with_insert_into_a_warm_cache_returns_the_cached_blocks(
    spawn_daemon: SpawnDaemon,
) -> None:
    a = await spawn_daemon("a", transports=["tcp"])
    b = await spawn_daemon("b", transports=["tcp"])
    tokens = list(range(3, 3 + 40))
    src = await a.client.alloc_mem(3)
    first = await a.client.transfer_with_insert(b.address, tokens, src, pin_owner="dec")
    second = await a.client.transfer_with_insert(b.address, tokens, src, pin_owner="dec2")
    # The receiver already held the prefix: the received copies were freed as duplicates,
    # and the reply names the blocks that really hold (and pin) the prompt.
    assert second.index_block_ids == first.index_block_ids
    assert set(second.dst_ids[:2]).isdisjoint(second.index_block_ids)
    st = await b.client.stats()
    assert st.pinned["device"] == 2 and st.client["device"] == 2  # two kept tails
    for t in (first, second):
        await b.client.release(t.handle)
        await b.client.free_mem(t.tail_ids)
    await a.client.free_mem(src)
    await assert_clean(a, b)


async def test_a_refused_commit_frees_what_the_transfer_allocated(
    spawn_daemon: SpawnDaemon,
) -> None:
    from common.protocol import mempool as mp

    d = await spawn_daemon("d")
    prep = await d.client.call(mp.PrepareReceive(2, transports=["tcp"], timeout_s=5))
    with pytest.raises(RpcError, match="do not fit"):
        await d.client.call(mp.CommitReceive(prep.transfer_id, tokens=b"\x01\x00\x00\x00" * 40))
    with pytest.raises(RpcError, match="unknown"):
        await d.client.call(mp.CommitReceive(prep.transfer_id))
    await assert_clean(d)


async def test_skip_cached_sends_only_the_blocks_the_receiver_lacks(
    spawn_daemon: SpawnDaemon,
) -> None:
    a = await spawn_daemon("a", transports=["shm", "tcp"])
    b = await spawn_daemon("b", transports=["shm", "tcp"])
    bb = (await a.client.info()).block_bytes
    region = await region_of(a)
    try:
        tokens = list(range(3, 3 + 64))  # 4 whole blocks
        src = await a.client.alloc_mem(4)
        for i, blk in enumerate(src):
            region.blocks(blk)[:] = bytes([i + 1]) * bb
        first = await a.client.transfer_with_insert(b.address, tokens[:32], src[:2])
        assert first.skipped_blocks == 0 and first.nbytes == 2 * bb
        # The receiver has the first two blocks: only the last two move.
        more = await a.client.transfer_with_insert(
            b.address, tokens, src, pin_owner="dec", skip_cached=True
        )
        assert more.skipped_blocks == 2 and more.nbytes == 2 * bb
        assert more.index_block_ids[:2] == first.index_block_ids
        rb = await region_of(b)
        try:
            assert [rb.blocks(x)[0] for x in more.index_block_ids] == [1, 2, 3, 4]
        finally:
            rb.close()
        # Everything cached already: nothing moves at all.
        again = await a.client.transfer_with_insert(b.address, tokens, src, skip_cached=True)
        assert again.skipped_blocks == 4 and again.nbytes == 0 and again.dst_ids == []
        await b.client.release(more.handle)
        await a.client.free_mem(src)
    finally:
        region.close()
    await assert_clean(a, b)


async def test_a_plain_transfer_allocates_for_the_named_owner(
    spawn_daemon: SpawnDaemon,
) -> None:
    a = await spawn_daemon("a", transports=["tcp"], admin_token="secret")
    b = await spawn_daemon("b", transports=["tcp"], admin_token="secret")
    src = await a.client.alloc_mem(3)
    t = await a.client.transfer(b.address, src, [], owner="decode-7")
    assert len(t.dst_ids) == 3
    # The blocks belong to that owner: releasing the owner (it died) frees them.
    assert await b.client.release_owner("decode-7") == 3
    await a.client.free_mem(src)
    await assert_clean(a, b)
    # The daemon answers admin status and shutdown with its token only.
    from common.protocol.admin import AdminRequest

    refused = await b.client.call(AdminRequest("wrong", "status"))
    assert not refused.ok and "token" in refused.error
    status = await b.client.call(AdminRequest("secret", "status"))
    assert status.ok and status.result["instance_id"] == "b"
    assert (await b.client.call(AdminRequest("secret", "shutdown"))).ok
    assert await asyncio.to_thread(b.proc.wait, 20) == 0


async def test_grow_adds_blocks_and_refuses_past_the_reservation(
    spawn_daemon: SpawnDaemon,
) -> None:
    from common.protocol import mempool as mp

    d = await spawn_daemon("g", device_blocks=8, device_max_blocks=32)
    with pytest.raises(RpcError, match="32"):
        await d.client.call(mp.Grow(64))  # past the reservation: nothing changes
    assert (await d.client.stats()).capacity["device"] == 8
    await d.client.call(mp.Grow(24))
    assert (await d.client.stats()).capacity["device"] == 24
    ids = await d.client.alloc_mem(20, owner="w")  # the new blocks are usable
    assert len(ids) == 20 and max(ids) < 24
    await d.client.free_mem(ids)
    await assert_clean(d)


async def test_receivers_listen_and_advertise_on_data_host() -> None:
    """Peers on other hosts reach the data plane at `data_host` (it was ignored once)."""
    from services.mempool.config import MempoolConfig
    from services.mempool.service import MempoolDaemon

    cfg = MempoolConfig(
        device_blocks=4,
        tensor_memory_bytes=1 << 20,
        data_host="127.0.0.2",
        transports=["shm", "tcp", "gloo"],
    )
    daemon = MempoolDaemon(cfg)
    await daemon.start()
    try:
        for name in ("tcp", "gloo"):
            for endpoints in (daemon.endpoints, daemon.tensor_endpoints):
                assert endpoints[name][name].startswith("127.0.0.2:"), endpoints
    finally:
        await daemon.close()


def test_device_config_errors_are_clear() -> None:
    from services.mempool.config import MempoolConfig
    from services.mempool.cuda_region import cuda_available
    from services.mempool.service import MempoolDaemon

    with pytest.raises(ValueError, match="'cpu', 'cuda' or 'cuda:N'"):
        MempoolConfig(device="gpu0").validate()
    if not cuda_available():
        with pytest.raises(ValueError, match="cupy sees no CUDA device"):
            MempoolDaemon(MempoolConfig(device="cuda:0", device_blocks=4))
    with pytest.raises(ValueError, match="can move host memory"):
        MempoolDaemon(MempoolConfig(device_blocks=4, transports=["nccl"]))


async def test_return_kv_moves_the_cached_prefix_in_one_call(spawn_daemon: SpawnDaemon) -> None:
    """The daemon matches the tokens in its own index, sends that prefix (only what the
    receiver lacks) to be indexed there, and lets go of its pin, success or failure."""
    a = await spawn_daemon("a", transports=["tcp"])
    b = await spawn_daemon("b", transports=["tcp"])
    ra, rb = await region_of(a), await region_of(b)
    try:
        tokens = list(range(3, 3 + 16 * 3 + 7))  # 3 whole blocks + a tail of 7
        src = await a.client.alloc_mem(4)
        for i, blk in enumerate(src):
            ra.blocks(blk)[:] = bytes([i + 1]) * ra.block_bytes
        await a.client.insert(tokens, src)  # A's index holds the 3 whole blocks
        t = await a.client.return_kv(b.address, tokens, timeout_s=10)
        assert t.num_indexed_tokens == 48 and t.skipped_blocks == 0
        assert t.nbytes == 3 * ra.block_bytes
        m = await b.client.match(tokens)
        assert m.num_tokens == 48
        assert [rb.blocks(x)[0] for x in m.block_ids] == [1, 2, 3]
        await b.client.release(m.handle)
        # Again: B holds it all (skip_cached by default), so nothing moves.
        again = await a.client.return_kv(b.address, tokens, timeout_s=10)
        assert again.skipped_blocks == 3 and again.nbytes == 0
        # Nothing cached here: nothing to send, an empty reply.
        none = await a.client.return_kv(b.address, [999] * 40, timeout_s=10)
        assert none.dst_ids == [] and none.nbytes == 0 and none.num_indexed_tokens == 0
        # A dead receiver: the call fails, and A's pin on its prefix is released anyway.
        with pytest.raises(RpcError, match="transfer to .* failed"):
            await a.client.return_kv("tcp://127.0.0.1:9", tokens, timeout_s=1)
        for d in (a, b):
            st = await d.client.stats()
            assert st.pinned["device"] == 0 and st.index["device"] == 3
        await assert_clean(a, b)
    finally:
        ra.close()
        rb.close()
