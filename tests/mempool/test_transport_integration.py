"""Transports between two daemons in separate processes: the parent sends from its region,
a peer process (`bench.peer`) receives into its own and checks."""

from __future__ import annotations

import asyncio
import os
import time
import zlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from bench.peer import PeerError, PeerProcess
from services.mempool.region import ShmRegion
from services.mempool.transport import (
    CopyRun,
    TransferError,
    available_transports,
    coalesce,
    make_transport,
)
from services.mempool.transport.tcp import TcpReceiver, TcpSender
from services.mempool.transport.tracking import TransferTable

os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
pytestmark = pytest.mark.integration

BLOCK = 256 << 10
BLOCKS = 320  # 80 MiB on each side
FILL = 0x5A


class SlowTcpReceiver(TcpReceiver):
    """Sleeps before every chunk, so a large transfer is surely still running when the test
    kills the process (the peer loads it by name: see `PeerProcess.start`)."""

    def _receive_chunk(self, conn: Any, table: TransferTable, header: Any, scratch: Any) -> bool:
        time.sleep(0.02)
        return bool(super()._receive_chunk(conn, table, header, scratch))


@pytest.fixture(scope="module")
def src() -> Iterator[ShmRegion]:
    region = ShmRegion.create(BLOCK, BLOCKS)
    region.array[:] = np.random.default_rng(7).integers(0, 256, region.array.size, np.uint8)
    yield region
    region.close()


@pytest.fixture(scope="module", params=available_transports())
def peer(request: pytest.FixtureRequest) -> Iterator[PeerProcess]:
    process = PeerProcess.start(request.param, BLOCK, BLOCKS, fill=FILL)
    yield process
    process.close()


def transport_of(peer: PeerProcess) -> str:
    return next(name for name in available_transports() if name in peer.endpoint)


def crc_of(region: ShmRegion, runs: list[tuple[int, int]]) -> int:
    crc = 0
    for first, count in runs:
        crc = zlib.crc32(region.blocks(first, count), crc)
    return crc


async def transfer(
    peer: PeerProcess, src: ShmRegion, tid: int, runs: list[CopyRun], **send: Any
) -> int | None:
    _, sender = make_transport(transport_of(peer), src)
    try:
        await peer.acall("expect", tid, [(r.dst_block, r.num_blocks) for r in runs])
        return await sender.send(peer.endpoint, tid, src, runs, timeout_s=30, **send)
    finally:
        await sender.close()


async def test_non_contiguous_blocks(peer: PeerProcess, src: ShmRegion) -> None:
    runs = coalesce([3, 4, 5, 9], [10, 11, 12, 2])
    crc = await transfer(peer, src, 1, runs, checksum=True)
    assert crc == crc_of(src, [(3, 3), (9, 1)])
    assert await peer.acall("wait", 1, 30.0, crc) == 4 * BLOCK
    assert await peer.acall("crc", [(10, 3), (2, 1)]) == crc
    untouched = zlib.crc32(bytes([FILL]) * BLOCK)
    for block in (1, 3, 9, 13):
        assert await peer.acall("crc", [(block, 1)]) == untouched


async def test_receiver_runs_coarser_than_sender_runs(peer: PeerProcess, src: ShmRegion) -> None:
    """As the daemon does it: the receiver expects coalesce(dst, dst), the sender sends
    coalesce(src, dst); scattered sources into contiguous destinations."""
    src_ids, dst_ids = [7, 30, 31, 2, 100], [60, 61, 62, 63, 64]
    expected = [(r.dst_block, r.num_blocks) for r in coalesce(dst_ids, dst_ids)]
    assert expected == [(60, 5)]
    runs = coalesce(src_ids, dst_ids)
    assert len(runs) == 4
    _, sender = make_transport(transport_of(peer), src)
    try:
        await peer.acall("expect", 4, expected)
        crc = await sender.send(peer.endpoint, 4, src, runs, timeout_s=30, checksum=True)
    finally:
        await sender.close()
    assert await peer.acall("wait", 4, 30.0, crc) == 5 * BLOCK
    assert crc == crc_of(src, [(7, 1), (30, 2), (2, 1), (100, 1)])


async def test_large_transfer(peer: PeerProcess, src: ShmRegion) -> None:
    count = (64 << 20) // BLOCK
    runs = coalesce(range(count), range(BLOCKS - count, BLOCKS))
    assert len(runs) == 1
    assert await transfer(peer, src, 2, runs) is None
    assert await peer.acall("wait", 2, 30.0, None) == 64 << 20
    assert await peer.acall("crc", [(BLOCKS - count, count)]) == crc_of(src, [(0, count)])


async def test_corrupted_checksum_is_detected(peer: PeerProcess, src: ShmRegion) -> None:
    runs = coalesce([20, 21, 40], [30, 31, 50])
    crc = await transfer(peer, src, 3, runs, checksum=True)
    assert crc is not None
    with pytest.raises(PeerError) as raised:
        await peer.acall("wait", 3, 30.0, crc ^ 0xFFFFFFFF)
    assert raised.value.kind == "ChecksumMismatch"


async def test_tcp_peer_killed_mid_transfer(src: ShmRegion) -> None:
    slow = PeerProcess.start(
        "tcp",
        BLOCK,
        BLOCKS,
        receiver_class=f"{__name__}:SlowTcpReceiver",
    )
    sender = TcpSender(retries=2, chunk_bytes=1 << 20)  # 80 chunks of 20 ms: 1.6 s at least
    timeout_s = 10.0
    try:
        await slow.acall("expect", 1, [(0, BLOCKS)])
        sending = asyncio.create_task(
            sender.send(slow.endpoint, 1, src, [CopyRun(0, 0, BLOCKS)], timeout_s=timeout_s)
        )
        start = time.monotonic()
        await asyncio.sleep(0.3)
        assert not sending.done()
        slow.kill()
        with pytest.raises(TransferError, match=slow.endpoint["tcp"]):
            await sending
        assert time.monotonic() - start < timeout_s + 2.0
    finally:
        slow.kill()

    fresh = PeerProcess.start("tcp", BLOCK, BLOCKS)
    try:
        await fresh.acall("expect", 2, [(0, 8)])
        await sender.send(fresh.endpoint, 2, src, [CopyRun(8, 0, 8)], timeout_s=timeout_s)
        assert await fresh.acall("wait", 2, 30.0, crc_of(src, [(8, 8)])) == 8 * BLOCK
    finally:
        await sender.close()
        fresh.close()
