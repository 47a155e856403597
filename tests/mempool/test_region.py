"""Regions: a torch view and tier-to-tier copies over the same bytes; shared-memory
pre-faulting maps pages without touching their bytes, and a
populated range is resident in this process (RssShmem grows by it) before anything writes
it, so copies into fresh blocks take no page faults."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from services.mempool.region import HostRegion, ShmRegion, copy_blocks

BLOCK = 64 * 1024

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="MADV_POPULATE_WRITE")


def rss_shmem_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssShmem:"):
            return int(line.split()[1])
    raise AssertionError("no RssShmem in /proc/self/status")


@linux
def test_populate_maps_pages_without_changing_them() -> None:
    region = ShmRegion.create(BLOCK, 256, 128)  # 16 MiB reserved, 8 MiB capacity
    peer = ShmRegion.attach(region.name, BLOCK, 256)
    try:
        before = rss_shmem_kib()
        assert region.populate(0, 128)
        grown = rss_shmem_kib() - before
        assert grown >= 128 * BLOCK // 1024  # all of the capacity is resident now
        assert grown < 256 * BLOCK // 1024  # and nothing past it
        data = np.arange(BLOCK, dtype=np.uint8)
        region.blocks(5)[:] = data.tobytes()
        assert peer.populate(4, 3)
        assert bytes(peer.blocks(5)) == data.tobytes()  # the peer sees the bytes intact
        assert not peer.populate(300, 1)  # past the region: nothing to do
    finally:
        peer.close()
        region.close()


@linux
def test_create_and_attach_prefault() -> None:
    base = rss_shmem_kib()
    region = ShmRegion.create(BLOCK, 64, 32, prefault=True)
    try:
        assert rss_shmem_kib() - base >= 32 * BLOCK // 1024
        before = rss_shmem_kib()
        peer = ShmRegion.attach(region.name, BLOCK, 64, prefault_blocks=16)
        assert rss_shmem_kib() - before >= 16 * BLOCK // 1024  # mapped a second time
        peer.close()
    finally:
        region.close()


def test_tensor_view_shares_the_region_bytes() -> None:
    region = ShmRegion.create(64, 4)
    try:
        region.tensor()[64:128] = 7  # block 1, written through torch
        assert bytes(region.blocks(1)) == b"\x07" * 64
        assert bytes(region.host_view(0)) == b"\x00" * 64
    finally:
        region.close()  # the tensor view is dropped first: the segment unmaps cleanly


def test_copy_blocks_between_tiers() -> None:
    device, host = ShmRegion.create(32, 8), HostRegion(32, 4)
    try:
        device.array[:] = np.arange(device.array.size, dtype=np.uint8)
        copy_blocks(device, 2, host, 1, 3)
        assert bytes(host.blocks(1, 3)) == bytes(device.blocks(2, 3))
        assert bytes(host.blocks(0)) == b"\x00" * 32
        with pytest.raises(ValueError, match="block sizes differ"):
            copy_blocks(device, 0, HostRegion(16, 2), 0, 1)
    finally:
        device.close()
        host.close()
