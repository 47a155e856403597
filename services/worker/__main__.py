"""`memserve worker --config FILE`: run one worker until SIGINT / SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal

import msgspec

from common.config import load_config
from common.logging import get_logger, setup_logging
from common.protocol.ready import Failed, Ready
from common.ready import signal_ready
from services.worker.service import WorkerConfig, WorkerService

log = get_logger(__name__)


class WorkerSettings(msgspec.Struct, forbid_unknown_fields=True):
    """Root of a worker config file: `[worker]` and `[worker.engine]` (env: MEMSERVE_WORKER__KEY)."""

    worker: WorkerConfig = msgspec.field(default_factory=WorkerConfig)


def load(path: str | None) -> WorkerConfig:
    return load_config(WorkerSettings, path).worker.validate()


async def run(cfg: WorkerConfig, ready_address: str | None = None) -> None:
    try:
        service = await WorkerService.create(cfg)
    except Exception as exc:
        if ready_address:
            await signal_ready(
                ready_address, Failed("worker", cfg.instance_id, f"{type(exc).__name__}: {exc}")
            )
        raise
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    serving = asyncio.create_task(service.serve())
    if ready_address:
        await signal_ready(
            ready_address,
            Ready("worker", cfg.instance_id, os.getpid(), {"requests": service.address}),
        )
    log.info("worker serving", address=service.address, mempool=cfg.mempool, role=cfg.role)
    try:
        await asyncio.wait(
            [serving, asyncio.create_task(stop.wait())], return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        serving.cancel()
        await asyncio.gather(serving, return_exceptions=True)
        await service.close()


def main(config_path: str | None, ready_address: str | None = None) -> None:
    cfg = load(config_path)
    setup_logging("worker", json=True, level=cfg.log_level)
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop is a dependency; Windows lacks it
        pass
    asyncio.run(run(cfg, ready_address))
