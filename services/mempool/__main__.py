"""`memserve mempool --config FILE`: run one MemPool daemon until SIGINT / SIGTERM."""

from __future__ import annotations

import msgspec

from common.config import SharedFile, load_config
from common.service_main import Service, lock_process, run_main, run_service
from services.mempool.config import MempoolConfig
from services.mempool.service import MempoolDaemon


class MempoolSettings(SharedFile, forbid_unknown_fields=True):
    """Root of a daemon config file: a `[mempool]` table (env: MEMSERVE_MEMPOOL__KEY)."""

    mempool: MempoolConfig = msgspec.field(default_factory=MempoolConfig)  # type: ignore[assignment]  # typed: this service's table


def load(path: str | None) -> MempoolConfig:
    return load_config(MempoolSettings, path).mempool.validate()


def main(config_path: str | None, ready_address: str | None = None) -> None:
    settings = load_config(MempoolSettings, config_path)
    cfg = settings.mempool.validate()
    lock_process(settings.cluster)  # every socket it makes is locked with this key

    async def start() -> tuple[Service, dict[str, str]]:
        daemon = MempoolDaemon(cfg)
        return daemon, await daemon.start()

    run_main(
        "mempool", cfg.log_level, run_service("mempool", cfg.instance_id, start, ready_address)
    )
