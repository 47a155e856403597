"""A process that dies before reporting ready says why in the launcher's error: the last
line of its log goes with "exited without reporting ready" (here the api refusing a
non-loopback address without an API key), so a container's user sees the reason."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.ready import StartupError
from services.launcher.config import load
from services.launcher.supervisor import Cluster

pytestmark = pytest.mark.integration


async def test_the_reason_of_a_dead_child_is_in_the_error(tmp_path: Path) -> None:
    settings = load(
        None,
        {
            "cluster": {"mode": "colocated", "run_dir": str(tmp_path), "restart": False},
            "mempool": {"device_blocks": 32, "tensor_memory_bytes": 1 << 20},
            "api": {"address": "http://0.0.0.0:0", "api_key": ""},
        },
    )
    with pytest.raises(StartupError) as info:
        async with Cluster(settings):
            pass
    message = str(info.value)
    assert "api exited without reporting ready" in message
    assert "is not loopback" in message and "api_key" in message, message
