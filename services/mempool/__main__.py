"""`memserve mempool --config FILE`: run one MemPool daemon until SIGINT / SIGTERM."""

from __future__ import annotations

import msgspec

from common import security
from common.config import SharedFile, load_config
from common.service_main import Service, run_main, run_service
from services.mempool.config import MempoolConfig
from services.mempool.service import MempoolDaemon


class MempoolSettings(SharedFile, forbid_unknown_fields=True):
    """Root of a daemon config file: a `[mempool]` table (env: MEMSERVE_MEMPOOL__KEY)."""

    mempool: MempoolConfig = msgspec.field(default_factory=MempoolConfig)  # type: ignore[assignment]  # typed: this service's table


def load(path: str | None) -> MempoolConfig:
    return load_config(MempoolSettings, path).mempool.validate()


def load_with_key(path: str | None) -> MempoolConfig:
    """The service's table, after installing the cluster key the file or environment
    names (every socket the service makes is locked with it)."""
    settings = load_config(MempoolSettings, path)
    cfg = settings.mempool.validate()
    security.install(security.load_key(settings.cluster))
    return cfg


def main(config_path: str | None, ready_address: str | None = None) -> None:
    cfg = load_with_key(config_path)

    async def start() -> tuple[Service, dict[str, str]]:
        daemon = MempoolDaemon(cfg)
        return daemon, await daemon.start()

    run_main(
        "mempool", cfg.log_level, run_service("mempool", cfg.instance_id, start, ready_address)
    )
