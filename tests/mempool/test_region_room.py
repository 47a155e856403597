"""A KV region the shared-memory filesystem cannot hold is refused when it is made, with
the way out, instead of a SIGBUS when a block is first written (a container's /dev/shm
is 64 MiB by default)."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.mempool.region import _check_room


def test_a_region_larger_than_the_free_space_is_refused(tmp_path: Path) -> None:
    with pytest.raises(MemoryError, match=r"MiB free but this KV region needs .*--shm-size"):
        _check_room(1 << 60, str(tmp_path))
    _check_room(4096, str(tmp_path))  # fits: no error
    _check_room(1 << 60, str(tmp_path / "absent"))  # no such filesystem: nothing to judge
