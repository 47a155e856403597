"""Fixtures of the MemPool tests: a source region of nonzero bytes and a zeroed
destination (tests/mempool/regions.py); a test file may define its own."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from services.mempool.region import ShmRegion
from tests.mempool.regions import BLOCK, BLOCKS


@pytest.fixture
def src() -> Iterator[ShmRegion]:
    region = ShmRegion.create(BLOCK, BLOCKS)
    region.array[:] = np.random.default_rng(5).integers(1, 256, region.array.size, np.uint8)
    yield region
    region.close()


@pytest.fixture
def dst() -> Iterator[ShmRegion]:
    region = ShmRegion.create(BLOCK, BLOCKS)
    yield region
    region.close()
