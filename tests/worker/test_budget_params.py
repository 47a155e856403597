"""A worker on a budgeted daemon reports its resident parameter bytes at attach; a daemon
whose budget cannot hold them beside its KV refuses, and the worker does not start."""

from __future__ import annotations

import pytest

from common.errors import MemServeError
from common.kv_geometry import KVGeometry
from common.model.config import ModelConfig
from common.model.presets import resolve_model
from services.worker.config import EngineConfig
from services.worker.mempool_engine import MempoolEngine
from tests.daemons import SpawnDaemon

pytestmark = pytest.mark.integration


def tiny_sizes() -> tuple[int, int]:
    params = ModelConfig.from_folder(resolve_model("tiny")).param_bytes("float32")
    return params, KVGeometry.for_model_name("tiny", 16, "float32").block_bytes


async def test_worker_reports_its_parameter_bytes(spawn_daemon: SpawnDaemon) -> None:
    params, bb = tiny_sizes()
    budget = params + 32 * bb
    daemon = await spawn_daemon("wb-mempool", budget_bytes=budget)
    worker = await MempoolEngine.connect(EngineConfig(model="tiny"), daemon.address, owner="wb")
    try:
        model = worker.engine.model
        held = sum(p.numel() * p.element_size() for p in model.parameters())
        info = await daemon.client.info()
        assert info.param_bytes == held == params  # the estimate was exact for tiny
        assert info.device_blocks == 32 and info.budget_bytes == budget
        assert (await daemon.client.check_integrity()).ok
    finally:
        await worker.close()


async def test_worker_whose_params_do_not_fit_does_not_start(spawn_daemon: SpawnDaemon) -> None:
    params, bb = tiny_sizes()
    daemon = await spawn_daemon("wr-mempool", budget_bytes=params + 32 * bb)
    # Someone reported tiny params first: the KV grew into the whole budget.
    await daemon.client.set_params(bb)
    with pytest.raises(MemServeError, match="refused this worker's"):
        await MempoolEngine.connect(EngineConfig(model="tiny"), daemon.address, owner="wr")
    info = await daemon.client.info()
    assert info.param_bytes == bb and (await daemon.client.check_integrity()).ok
