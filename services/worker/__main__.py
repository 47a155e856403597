"""`memserve worker --config FILE`: run one worker until SIGINT / SIGTERM."""

from __future__ import annotations

import msgspec

from common.config import SharedFile, load_config
from common.service_main import Service, lock_process, run_main, run_service
from services.worker.service import WorkerConfig, WorkerService


class WorkerSettings(SharedFile, forbid_unknown_fields=True):
    """Root of a worker config file: `[worker]` and `[worker.engine]` (env: MEMSERVE_WORKER__KEY)."""

    worker: WorkerConfig = msgspec.field(default_factory=WorkerConfig)  # type: ignore[assignment]  # typed: this service's table


def load(path: str | None) -> WorkerConfig:
    return load_config(WorkerSettings, path).worker.validate()


def main(config_path: str | None, ready_address: str | None = None) -> None:
    settings = load_config(WorkerSettings, config_path)
    cfg = settings.worker.validate()
    lock_process(settings.cluster)  # every socket it makes is locked with this key

    async def start() -> tuple[Service, dict[str, str]]:
        service = await WorkerService.create(cfg)
        return service, service.endpoints

    run_main("worker", cfg.log_level, run_service("worker", cfg.instance_id, start, ready_address))
