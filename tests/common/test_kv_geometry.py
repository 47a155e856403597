"""One KV block geometry for the worker, the daemon and the launcher (common/kv_geometry.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from common.kv_geometry import KVGeometry
from common.model.config import ModelConfig
from common.model.presets import resolve_model
from services.launcher.config import ClusterSettings, kv_capacity
from services.mempool.config import MempoolConfig
from services.worker.kv_cache import KVLayout


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("num_layers", [None, 2])
def test_worker_layout_and_daemon_config_agree(dtype: str, num_layers: int | None) -> None:
    model = ModelConfig.from_folder(Path(resolve_model("tiny")))
    layout = KVLayout.for_model(model, 16, getattr(torch, dtype), num_layers)
    daemon = MempoolConfig(model="tiny", dtype=dtype, block_size=16, num_layers=num_layers)
    geometry = daemon.geometry()
    assert geometry == layout.geometry
    assert geometry.block_bytes == layout.bytes_per_block
    # The bytes of one block are what the worker's tensor holds per block.
    block = torch.empty(layout.block_shape, dtype=layout.dtype)
    assert block.numel() * block.element_size() == geometry.block_bytes


def test_unknown_dtype_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown KV dtype 'float8'"):
        KVGeometry(4, 16, 2, 32, "float8")


def test_launcher_sizes_kv_as_the_daemon_does() -> None:
    settings = ClusterSettings()
    settings.mempool = {"device_memory_bytes": 8 << 20, "block_size": 32}
    geometry, blocks = kv_capacity(settings)
    daemon = MempoolConfig(model="tiny", device_memory_bytes=8 << 20, block_size=32)
    assert geometry == daemon.geometry()
    assert (
        blocks
        == daemon.device_block_count(geometry.block_bytes)
        == (8 << 20) // (geometry.block_bytes)
    )
    settings.mempool["device_blocks"] = 7
    assert kv_capacity(settings)[1] == 7
