"""`memserve mempool --config FILE`: run one MemPool daemon until SIGINT / SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal

import msgspec

from common.config import load_config
from common.logging import get_logger, setup_logging
from common.protocol.ready import Failed, Ready
from common.ready import signal_ready
from services.mempool.config import MempoolConfig
from services.mempool.service import MempoolDaemon

log = get_logger(__name__)


class MempoolSettings(msgspec.Struct, forbid_unknown_fields=True):
    """Root of a daemon config file: a `[mempool]` table (env: MEMSERVE_MEMPOOL__KEY)."""

    mempool: MempoolConfig = msgspec.field(default_factory=MempoolConfig)


def load(path: str | None) -> MempoolConfig:
    return load_config(MempoolSettings, path).mempool.validate()


async def run(cfg: MempoolConfig, ready_address: str | None = None) -> None:
    try:
        daemon = MempoolDaemon(cfg)
        endpoints = await daemon.start()
    except Exception as exc:
        if ready_address:
            await signal_ready(
                ready_address, Failed("mempool", cfg.instance_id, f"{type(exc).__name__}: {exc}")
            )
        raise
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    serving = asyncio.create_task(daemon.serve())
    if ready_address:
        await signal_ready(ready_address, Ready("mempool", cfg.instance_id, os.getpid(), endpoints))
    print(f"mempool {cfg.instance_id} serving on {daemon.address}", flush=True)
    try:
        await asyncio.wait(
            [serving, asyncio.create_task(stop.wait())], return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        serving.cancel()
        await asyncio.gather(serving, return_exceptions=True)
        await daemon.close()
        log.info("mempool stopped", instance=cfg.instance_id)


def main(config_path: str | None, ready_address: str | None = None) -> None:
    cfg = load(config_path)
    setup_logging("mempool", json=True, level=cfg.log_level)
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop is a dependency; Windows lacks it
        pass
    asyncio.run(run(cfg, ready_address))
