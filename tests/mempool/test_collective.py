"""The collective transport (torch.distributed point-to-point), run with gloo on CPU: what
is specific to it beyond the tests every transport takes (test_transport*.py, test_daemon.py
run it as `gloo`). The same code moves GPU memory as `nccl`: tests/mempool/test_cuda.py."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from bench.peer import PeerProcess
from services.mempool.region import ShmRegion
from services.mempool.transport import CopyRun, TransferError, make_transport
from services.mempool.transport.base import TransferRejected, region_crc32
from services.mempool.transport.collective import (
    GlooReceiver,
    GlooSender,
    _Gloo,
    _unpack_manifest,
)
from services.mempool.transport.frame import FrameError, Header, Kind

pytestmark = pytest.mark.integration

BLOCK = 64 << 10
BLOCKS = 160  # 10 MiB
FILL = 0x5A


class _SlowGloo(_Gloo):
    def wait(self, work: Any, timeout_s: float) -> None:
        time.sleep(0.02)  # per chunk: a transfer of many chunks is surely still running
        super().wait(work, timeout_s)


class SlowGlooReceiver(GlooReceiver):
    """A receiver that takes 20 ms per chunk (loaded by name in a peer process)."""

    backend = _SlowGloo()


@pytest.fixture
def src() -> Iterator[ShmRegion]:
    region = ShmRegion.create(BLOCK, BLOCKS)
    region.array[:] = np.random.default_rng(3).integers(0, 256, region.array.size, np.uint8)
    yield region
    region.close()


@pytest.fixture
def dst() -> Iterator[ShmRegion]:
    region = ShmRegion.create(BLOCK, BLOCKS)
    region.array.fill(FILL)
    yield region
    region.close()


def test_gloo_refuses_device_memory_and_nccl_host_memory(src: ShmRegion) -> None:
    with pytest.raises(ValueError, match="nccl"):
        make_transport("nccl", src)


async def test_peer_killed_mid_transfer_fails_fast_and_the_sender_recovers(
    src: ShmRegion,
) -> None:
    slow = PeerProcess.start("gloo", BLOCK, BLOCKS, receiver_class=f"{__name__}:SlowGlooReceiver")
    sender = GlooSender(retries=2, chunk_bytes=BLOCK)  # 160 chunks of 20 ms: 3.2 s at least
    timeout_s = 20.0
    try:
        await slow.acall("expect", 1, [(0, BLOCKS)])
        sending = asyncio.create_task(
            sender.send(slow.endpoint, 1, src, [CopyRun(0, 0, BLOCKS)], timeout_s=timeout_s)
        )
        start = time.monotonic()
        await asyncio.sleep(0.8)
        assert not sending.done()
        slow.kill()
        with pytest.raises(TransferError, match=slow.endpoint["gloo"]):
            await sending
        assert time.monotonic() - start < 5.0  # the broken pair is noticed, not waited out
    finally:
        slow.kill()

    fresh = PeerProcess.start("gloo", BLOCK, BLOCKS)
    try:
        await fresh.acall("expect", 2, [(0, 8)])
        await sender.send(fresh.endpoint, 2, src, [CopyRun(8, 0, 8)], timeout_s=timeout_s)
        crc = region_crc32(src, [(8, 8)])
        assert await fresh.acall("wait", 2, 30.0, crc) == 8 * BLOCK
    finally:
        await sender.close()
        fresh.close()


async def test_unreachable_peer_fails_within_the_timeout(src: ShmRegion) -> None:
    with socket.socket() as probe:  # a port with nobody listening
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    sender = GlooSender(retries=1)
    start = time.monotonic()
    with pytest.raises(TransferError, match=f"127.0.0.1:{port}"):
        await sender.send({"gloo": f"127.0.0.1:{port}"}, 1, src, [CopyRun(0, 0, 1)], timeout_s=2)
    assert time.monotonic() - start < 2 + 6  # run_blocking's margin at most
    await sender.close()


async def test_cancel_mid_transfer_keeps_later_chunks_out(src: ShmRegion, dst: ShmRegion) -> None:
    receiver = SlowGlooReceiver(dst)
    endpoint = await receiver.start()
    sender = GlooSender(retries=0, chunk_bytes=BLOCK)
    try:
        receiver.expect(1, [(0, BLOCKS)])
        sending = asyncio.create_task(
            sender.send(endpoint, 1, src, [CopyRun(0, 0, BLOCKS)], timeout_s=20)
        )
        await asyncio.sleep(0.5)
        receiver.cancel(1)
        with pytest.raises(TransferRejected, match="CANCELLED"):
            await sending
        # Chunks arrive in order, one block each: a prefix of the blocks was written (the
        # one in flight at the cancel included), nothing after it.
        written = next(b for b in range(BLOCKS) if bytes(dst.blocks(b)) != bytes(src.blocks(b)))
        assert 0 < written < BLOCKS - 1
        assert not np.any(dst.array[(written + 1) * BLOCK :] != FILL)
        with pytest.raises(TransferError, match="cancelled"):
            await receiver.wait_complete(1, 1)
        # The pair still works for the next transfer.
        receiver.expect(2, [(0, 4)])
        await sender.send(endpoint, 2, src, [CopyRun(10, 0, 4)], timeout_s=20)
        assert await receiver.wait_complete(2, 5) == 4 * BLOCK
        assert bytes(dst.blocks(0, 4)) == bytes(src.blocks(10, 4))
    finally:
        await sender.close()
        await receiver.close()


async def test_sender_reconnects_to_a_restarted_receiver(src: ShmRegion, dst: ShmRegion) -> None:
    receiver = GlooReceiver(dst)
    endpoint = await receiver.start()
    sender = GlooSender(retries=0)  # the stale pair must be noticed, not retried
    try:
        receiver.expect(1, [(0, 1)])
        await sender.send(endpoint, 1, src, [CopyRun(0, 0, 1)], timeout_s=5)
        await receiver.close()
        receiver = GlooReceiver(dst, port=receiver.port)
        assert await receiver.start() == endpoint
        receiver.expect(2, [(1, 1)])
        await sender.send(endpoint, 2, src, [CopyRun(1, 1, 1)], timeout_s=5)
        assert await receiver.wait_complete(2, 5) == BLOCK
        assert bytes(dst.blocks(0, 2)) == bytes(src.blocks(0, 2))
    finally:
        await sender.close()
        await receiver.close()


async def test_close_of_an_idle_receiver_is_prompt(src: ShmRegion, dst: ShmRegion) -> None:
    """Its threads wait on the store for minutes while idle; close wakes them."""
    receiver = GlooReceiver(dst)
    endpoint = await receiver.start()
    sender = GlooSender()
    receiver.expect(1, [(0, 2)])
    await sender.send(endpoint, 1, src, [CopyRun(0, 0, 2)], timeout_s=5)
    start = time.monotonic()
    await receiver.close()
    assert time.monotonic() - start < 1.5
    assert not any(t.is_alive() for t in receiver._threads)
    await sender.close()


@pytest.mark.parametrize(
    ("manifest", "why"),
    [
        (b"", "not whole headers"),
        (b"x" * 47, "not whole headers"),
        (Header(Kind.DATA, 1, 0, 1, 0, 64).pack(), "DATA headers followed by one FIN"),
        (Header(Kind.DATA, 1, 0, 1, 0, 0).pack() + Header(Kind.FIN, 1).pack(), "a chunk outside"),
        (Header(Kind.DATA, 2, 0, 1, 0, 8).pack() + Header(Kind.FIN, 1).pack(), "another transfer"),
    ],
)
def test_malformed_manifests_are_refused(manifest: bytes, why: str) -> None:
    with pytest.raises(FrameError, match=why):
        _unpack_manifest(manifest)


async def test_a_rogue_manifest_closes_only_its_own_pair(src: ShmRegion, dst: ShmRegion) -> None:
    """Garbage written into the receiver's store ends that pair; other senders go on."""
    receiver = GlooReceiver(dst)
    endpoint = await receiver.start()
    good, rogue = GlooSender(), GlooSender()
    try:
        receiver.expect(1, [(0, 1)])
        await rogue.send(endpoint, 1, src, [CopyRun(0, 0, 1)], timeout_s=5)
        pair = rogue._pairs[endpoint["gloo"]]
        pair.store.set(pair.key("m", pair.seq), b"not a manifest")
        receiver.expect(2, [(1, 2)])
        await good.send(endpoint, 2, src, [CopyRun(5, 1, 2)], timeout_s=5)
        assert await receiver.wait_complete(2, 5) == 2 * BLOCK
        assert bytes(dst.blocks(1, 2)) == bytes(src.blocks(5, 2))
    finally:
        await good.close()
        await rogue.close()
        await receiver.close()
